"""zram block devices for integration tests: real block devices with no loop device in the way.

A pool hands out devices it made itself (``hot_add``) and removes exactly those numbers again
(``hot_remove``), never any other: /dev/zram0 belongs to the machine and other tests make their own.
"""

from __future__ import annotations

import errno
from pathlib import Path

CONTROL = Path("/sys/class/zram-control")


def sysfs(num: int) -> Path:
    return Path(f"/sys/block/zram{num}")


class ZramPool:
    """The zram devices one test made, by the numbers the kernel gave it."""

    def __init__(self) -> None:
        self.numbers: list[int] = []

    def add(self, size: str) -> Path:
        """A new zram device of ``size`` (as the kernel's disksize takes it: 1G, 512M); its /dev path."""
        num = int((CONTROL / "hot_add").read_text().strip())
        self.numbers.append(num)  # recorded before sizing: a failed sizing still gets removed
        (sysfs(num) / "disksize").write_text(size)
        dev = Path(f"/dev/zram{num}")
        if not dev.is_block_device():
            raise RuntimeError(f"zram device {num} was added but {dev} is no block device")
        return dev

    def remove_all(self) -> list[str]:
        """Remove every device this pool added; what could not be removed (held: hot_remove refused)."""
        problems = []
        for num in list(self.numbers):
            try:
                (CONTROL / "hot_remove").write_text(str(num))
            except OSError as exc:
                holders = sorted(p.name for p in (sysfs(num) / "holders").glob("*")) if sysfs(num).exists() else []
                why = "busy (mounted or held)" if exc.errno == errno.EBUSY else exc.strerror
                problems.append(f"zram{num}: hot_remove failed: {why}; holders {holders}")
                continue
            # hot_remove returns once the kernel has deleted the disk; zram<num> existing afterwards is
            # another test's device (in the parallel pass a worker's hot_add may get the number at once)
            self.numbers.remove(num)
        return problems

    def left(self) -> list[str]:
        """The devices this pool added that are still there (the leak check)."""
        return [f"zram{n}" for n in self.numbers if sysfs(n).exists()]
