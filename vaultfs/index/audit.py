"""Queries about audits: the keyed tags of shard pieces and the audit runs (tables
``audit_tags``, ``audit_runs``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index


def put_tags(db: sqlite3.Connection, rows: Iterable[tuple[str, int, bytes]]) -> None:
    """Record the audit tags of shard objects: rows of (object name, piece size, tags)."""
    db.executemany("INSERT OR REPLACE INTO audit_tags(name, piece, tags) VALUES (?, ?, ?)", rows)


def last_run(index: Index, rid: int) -> tuple[float, float | None, str, int, float | None] | None:
    """(started, finished, mode, checked, confidence) of the newest audit run of remote
    ``rid``; None when it was never audited."""
    return index.one(
        "SELECT started, finished, mode, checked, confidence FROM audit_runs WHERE remote=?"
        " ORDER BY id DESC LIMIT 1",
        (rid,),
    )
