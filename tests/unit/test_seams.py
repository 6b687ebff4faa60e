"""The catalog's files and the flock files are the SQLite store's own: no other module names them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BACKEND = {"storage/catalog/sqlite.py", "storage/catalog/sqlite_store.py"}
SOURCES = sorted(p for pkg in ("storage", "plugin", "veritas") for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("word", ["catalog.db", "SqliteCatalog", "FlockLocks", '"locks"', "-wal"])
def test_no_module_outside_the_sqlite_store_knows_its_files(word: str) -> None:
    allowed = BACKEND | ({"storage/locks.py"} if word == "FlockLocks" else set())
    found = [str(p.relative_to(REPO)) for p in SOURCES
             if str(p.relative_to(REPO)) not in allowed and word in p.read_text()]
    assert found == [], f"{word!r} appears outside the SQLite store in {found}"


def test_recovery_asks_whether_an_owner_is_gone_not_whether_a_lock_is_free() -> None:
    text = (REPO / "storage/recovery.py").read_text()
    assert "try_hold" not in text and "owner_gone" in text
