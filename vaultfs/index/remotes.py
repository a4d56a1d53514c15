"""Queries about the vault's remotes and their reachability (tables ``remotes``,
``remote_health``)."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index


def add(db: sqlite3.Connection, spec: str, position: int) -> None:
    """Record remote ``spec`` at placement ``position`` (active, its own failure domain)."""
    db.execute("INSERT INTO remotes(spec, position) VALUES (?, ?)", (spec, position))


def placement_domains(index: Index) -> list[tuple[int, str]]:
    """(id, failure domain) of the active remotes in placement order; a remote with no
    domain is its own (``remote<id>``)."""
    return index.q(
        "SELECT id, coalesce(domain, 'remote' || id) FROM remotes WHERE state='active'"
        " ORDER BY position, id"
    )


def active_states(index: Index) -> list[tuple[int, str, str | None, float | None, str | None]]:
    """(id, spec, domain, last_ok, last_error) of the active remotes in placement order."""
    return index.q(
        "SELECT id, spec, domain, last_ok, last_error FROM remotes WHERE state='active'"
        " ORDER BY position"
    )


def record_result(index: Index, rid: int, error: str | None) -> None:
    """Note the outcome of an operation on remote ``rid``: success (``error`` None: now is
    its last_ok, its last error is cleared) or the error message."""
    with index.tx() as db:
        if error is None:
            db.execute(
                "UPDATE remotes SET last_ok=?, last_error=NULL WHERE id=?", (time.time(), rid)
            )
        else:
            db.execute("UPDATE remotes SET last_error=? WHERE id=?", (error, rid))


def unreachable(index: Index) -> set[int]:
    """Ids of the remotes last found unreachable."""
    return {r for (r,) in index.q("SELECT remote FROM remote_health WHERE state='unreachable'")}


def health(index: Index, rid: int) -> tuple[str, float, float, str | None] | None:
    """(state, since, checked, detail) of remote ``rid``; None when never checked."""
    return index.one(
        "SELECT state, since, checked, detail FROM remote_health WHERE remote=?", (rid,)
    )


def active(index: Index) -> list[tuple[int, str]]:
    """(id, spec) of every remote in use (not removed), in placement order."""
    return index.q("SELECT id, spec FROM remotes WHERE state='active' ORDER BY position, id")


def mark_healed(index: Index, seq: int) -> list[int]:
    """After a repair published manifest ``seq``: every active remote marked 'stale' or
    'degraded' that now holds that manifest and has no lost shard and no foreign object left
    is 'ok' again (a replacement remote, a rolled-back one brought forward). Returns their
    ids."""
    now = time.time()
    with index.tx() as db:
        rows = db.execute(
            "SELECT h.remote FROM remote_health h JOIN remotes r ON r.id = h.remote"
            " WHERE r.state = 'active' AND h.state IN ('stale', 'degraded')"
            " AND NOT EXISTS (SELECT 1 FROM manifest_queue q WHERE q.remote = h.remote"
            "   AND q.seq <= ?)"
            " AND NOT EXISTS (SELECT 1 FROM shards s WHERE s.remote = h.remote"
            "   AND s.state = 'lost')"
            " AND NOT EXISTS (SELECT 1 FROM audit_foreign f WHERE f.remote = h.remote)",
            (seq,),
        ).fetchall()
        healed = [rid for (rid,) in rows]
        db.executemany(
            "UPDATE remote_health SET state='ok', since=?, detail=NULL WHERE remote=?",
            [(now, rid) for rid in healed],
        )
    return healed
