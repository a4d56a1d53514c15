"""Queries about knowledge-base snapshots (table ``kb_roots``): the summary of each one
(its kb Merkle root, per-table row counts and checksums) that every manifest signs."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index


def add(db: sqlite3.Connection, uid: str, summary: dict) -> None:
    """Record the kb summary of snapshot ``uid`` (in the transaction that records it)."""
    db.execute(
        "INSERT OR REPLACE INTO kb_roots(uid, summary) VALUES (?, ?)",
        (uid, json.dumps(summary, sort_keys=True, separators=(",", ":"))),
    )


def summaries(index: Index) -> dict[str, dict]:
    """{snapshot uid: kb summary} of every knowledge-base snapshot the index still holds (a
    deleted snapshot's row is left behind and not listed)."""
    rows = index.q(
        "SELECT k.uid, k.summary FROM kb_roots k JOIN snapshots s ON s.uid = k.uid ORDER BY s.id"
    )
    return {uid: json.loads(text) for uid, text in rows}


def file_places(index: Index, snapshot: int) -> list[tuple[str, int, int]]:
    """(path as stored: names.to_db, size, lowest segment id holding one of its chunks, or
    -1 for an empty file) of every regular file of the snapshot with row id ``snapshot``:
    where a reader finds each file, so that it can read them segment by segment."""
    return index.q(
        "SELECT e.path, e.size, coalesce(min(c.segment), -1) FROM entries e"
        " LEFT JOIN content_chunks x ON x.content = e.content"
        " LEFT JOIN chunks c ON c.id = x.chunk"
        " WHERE e.snapshot = ? AND e.type = 'f' GROUP BY e.id",
        (snapshot,),
    )
