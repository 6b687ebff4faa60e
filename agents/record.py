"""Frozen value records for the agents' monitor path, without dataclasses.

Why not dataclasses: importing it imports inspect (and with it dis, ast, tokenize), about 19 ms of a
new process here, and the cluster engine starts one process per monitor of every resource. A record
lists its fields in ``__slots__``; it compares, hashes and prints by them, and cannot be changed.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~9 ms more of the same process; mypy still reads the block below
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    __slots__: tuple[str, ...] = ()

    def _init(self, **values: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frozen) and type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"
