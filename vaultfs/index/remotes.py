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
