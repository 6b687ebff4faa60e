"""Run inside a fresh mount namespace: detach the copies of other tests' and the host's loop-backed
and /tmp mounts, so this namespace does not keep their filesystems (and loop devices) busy.
The code is lab.nsprune (the lab's nodes do the same); this file is the path DockerNode runs.

Usage: ns_prune.py KEEP_ROOT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.nsprune import main

if __name__ == "__main__":
    main()
