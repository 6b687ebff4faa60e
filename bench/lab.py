#!/usr/bin/env python3
"""Lab benchmark: how long ``scripts/lab up`` takes, the figure tests and people wait for.

Prints one JSON object per figure on stdout (progress on stderr), in the format of bench/common.py:

  lab_up_3_nodes_swarm   `scripts/lab up --nodes 3 --swarm` (three nodes with their own namespaces,
                         dockerd and veritas plugin, then a swarm: manager node1, two workers), in
                         seconds; baseline: `scripts/lab up --nodes 3 --no-plugin`, the same three bare
                         engines without plugins or swarm, in interleaved pairs in the same run.
                         Target: value < 15 s. Median of 3 pairs (1 with --quick).

Runs as root. Each lab lives in its own directory under a fresh /tmp root and is taken down by
``scripts/lab down`` (processes by PID, namespaces, loop devices, mounts), also on error or SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "scripts" / "lab"


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.pairs = 1 if quick else 3
        self.n = 0
        self.dirs: list[Path] = []

    def setup(self) -> None:
        pass

    def _lab(self, d: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(LAB), *args], env={**os.environ, "VERITAS_LAB_DIR": str(d)},
                              capture_output=True, text=True, timeout=300, check=False)

    def _up(self, *args: str) -> float:
        self.n += 1
        d = self.root / f"lab{self.n}"
        self.dirs.append(d)
        t0 = time.perf_counter()
        proc = self._lab(d, "up", "--nodes", "3", *args)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/lab up {' '.join(args)} failed: {proc.stderr[-2000:]}")
        assert len(json.loads(proc.stdout)["nodes"]) == 3
        down = self._lab(d, "down")
        if down.returncode != 0:
            raise RuntimeError(f"scripts/lab down failed: {down.stderr[-2000:]}")
        self.dirs.remove(d)
        common.log(f"up {' '.join(args) or '(bare)'}: {took:.2f} s")
        return took

    def up(self) -> None:
        res = common.run_pairs(lambda i: self._up("--swarm"), lambda i: self._up("--no-plugin"),
                               "value<15", self.pairs)
        res.emit("lab_up_3_nodes_swarm", "s", "value<15")

    def cleanup(self) -> None:
        for d in self.dirs:
            if d.exists():
                common.log(f"forced clean-up: scripts/lab down in {d}")
                self._lab(d, "down")
        try:
            self.root.rmdir()
        except OSError as exc:
            common.log(f"left behind: {exc}")


def main(argv: list[str] | None = None) -> int:
    return common.main("bench-lab", __doc__, argv, tools=("dockerd", "docker", "nsenter", "unshare", "ip"),
                       groups=["up"], make=Bench, run_group=lambda bench, group: bench.up())


if __name__ == "__main__":
    sys.exit(main())
