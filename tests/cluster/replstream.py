"""The checksummed stream of tests/cluster/test_lab_replication.py: the writer a container runs, the
check of what a site holds, and (run inside a lab node) the sampler of a secondary's checkpoints.

A record is one line, ``SEQ TIME PAYLOAD MD5``: its sequence number (from 1, no gaps), the writer's
clock (/proc/uptime: every container of the lab shares the kernel's), a payload, and the MD5 of the
first three fields. The shell's ``echo`` writes a line with one write(2), which a checkpoint's freeze
never splits: a checkpoint holds whole records only, and a torn delta shows as a bad or missing one.

    python3 -m tests.cluster.replstream sample RVG VOLUME SECONDS   (inside the secondary's node)

prints one JSON line per consistent checkpoint seen during SECONDS: its seq and what ``check`` says
of the stream in it, read from a read-only mount of the checkpoint's image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# sh in localbusybox; it appends to /data/stream, going on from the records already there
WRITER = r"""
f=/data/stream
i=0
[ -f $f ] && i=$(busybox wc -l < $f)
while :; do
  i=$((i+1))
  read t _ < /proc/uptime
  p="payload-$i-$RANDOM$RANDOM$RANDOM-0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz"
  c=$(echo -n "$i $t $p" | busybox md5sum)
  echo "$i $t $p ${c%% *}" >> $f
  busybox sleep 0.02
done
"""


@dataclass
class Stream:
    """What a copy of the stream holds: ``records`` whole, verified records from 1; ``last_time`` the
    writer's clock at the last; ``error`` what is wrong after them (empty: nothing)."""

    records: int
    last_time: float
    error: str

    @property
    def ok(self) -> bool:
        return not self.error


def check(text: str) -> Stream:
    """Verify ``text`` record by record: every line whole (newline-terminated, four fields), its
    checksum right, the sequence contiguous from 1."""
    lines = text.split("\n")
    if lines[-1] != "":
        return _first_bad(lines[:-1], f"a partial record at the end: {lines[-1][:80]!r}")
    return _first_bad(lines[:-1], "")


def _first_bad(lines: list[str], tail_error: str) -> Stream:
    last = 0.0
    for n, line in enumerate(lines, 1):
        f = line.split(" ")
        if len(f) != 4:
            return Stream(n - 1, last, f"record {n} is not whole: {line[:80]!r}")
        if f[0] != str(n):
            return Stream(n - 1, last, f"record {n} carries sequence number {f[0]!r}: the sequence has a gap")
        if hashlib.md5(f"{f[0]} {f[1]} {f[2]}".encode()).hexdigest() != f[3]:
            return Stream(n - 1, last, f"record {n} fails its checksum: {line[:80]!r}")
        last = float(f[1])
    return Stream(len(lines), last, tail_error)


def records(text: str) -> list[str]:
    """The whole lines of ``text`` (each a record)."""
    return text.split("\n")[:-1]


def _read_image(image_fd: int) -> str:
    """The stream in the filesystem of an image (read-only, without log recovery: a checkpoint's
    image is of a frozen, so clean, filesystem; nouuid: the primary's copy is the same filesystem)."""
    mnt = tempfile.mkdtemp(prefix="replstream-")
    try:
        subprocess.run(["mount", "-o", "loop,ro,norecovery,nouuid", f"/proc/{os.getpid()}/fd/{image_fd}", mnt],
                       check=True, capture_output=True, text=True, timeout=60, pass_fds=(image_fd,))
        try:
            p = Path(mnt) / "stream"
            return p.read_text() if p.exists() else ""
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)
    finally:
        os.rmdir(mnt)


def sample(rvg_name: str, volume: str, seconds: float) -> None:
    """Check every consistent checkpoint of the replica that can be caught in ``seconds``. A committed
    checkpoint's images are never written again (the next is built beside it), so one opened while it
    is the consistent one is that checkpoint, even if a later apply removes its directory meanwhile."""
    from storage import diskgroup
    from storage.config import load_config
    from storage.replication import rvg
    from storage.replication.apply import Replica

    dg = diskgroup.default_dg(load_config())
    try:
        root = rvg.replica_root(dg, rvg_name)
        rep = Replica(root, rvg_name)
        seen: set[int] = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            seq = rep.seq
            if seq in seen or seq == 0:
                time.sleep(0.1)
                continue
            try:
                fd = os.open(root / str(seq) / f"{volume}.0.img", os.O_RDONLY)
            except FileNotFoundError:
                continue  # superseded between the two reads: take the next
            with contextlib.closing(_Fd(fd)):
                seen.add(seq)
                st = check(_read_image(fd))
            print(json.dumps({"seq": seq, **asdict(st)}), flush=True)
    finally:
        dg.close()


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["sample"] and len(sys.argv) == 5:
        sample(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit("usage: python3 -m tests.cluster.replstream sample RVG VOLUME SECONDS")
