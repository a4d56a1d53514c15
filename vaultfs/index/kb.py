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
