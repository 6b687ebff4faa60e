"""A plain copy of a file over TCP: the baseline of bench/replication's initial_sync_throughput, what
``cat image | socat - TCP:host:port`` into ``socat TCP-LISTEN:port - > copy`` does, in two processes.

    python3 -m bench.tcpcopy recv OUT         listen on 127.0.0.1 (an ephemeral port, printed), take one
                                              connection, write what arrives to OUT, fsync it, print the
                                              byte count, exit
    python3 -m bench.tcpcopy send HOST:PORT FILE   read FILE, write it to the socket, close

Only the standard library, so that starting it costs a bare interpreter's start.
"""

from __future__ import annotations

import os
import socket
import sys

CHUNK = 1 << 20


def recv(out: str) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    srv.close()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with conn, open(out, "wb") as fh:
        while n := conn.recv_into(buf):
            fh.write(view[:n])
            total += n
        fh.flush()
        os.fsync(fh.fileno())  # as the replica's apply makes its images durable before it acknowledges
    print(total, flush=True)
    return total


def send(addr: str, path: str) -> None:
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port))) as s, open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the receiver closes once it has it all


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "recv":
        recv(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "send":
        send(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
