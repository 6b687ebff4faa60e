"""Run a command as the first process of fresh mount and network namespaces (made by ``unshare -m -n
--propagation slave`` around this script): detach the copies of other tests' mounts, record the network
namespace's inode in NSFILE (so the test can find every process left in it, by PID), then exec CMD.

A dockerd the agent starts from here lives in these namespaces, never in the host's network namespace
(where ``--bridge=none`` would delete the host engine's docker0).

Usage: agent_ns.py KEEP_ROOT NSFILE CMD [ARG...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.nsprune import prune

if __name__ == "__main__":
    keep, nsfile, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    prune(keep)
    Path(nsfile).write_text(str(os.stat("/proc/self/ns/net").st_ino))
    os.execvp(cmd[0], cmd)
