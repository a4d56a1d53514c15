"""Queries about file contents: the chunk lists that file entries share across files and
snapshots (tables ``contents`` and ``content_chunks``; ``entries.content`` names one)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index

#: The contents some entry names (NULLs left out: ``NOT IN`` over a NULL matches nothing).
_NAMED = "SELECT content FROM entries WHERE content IS NOT NULL"


def find(db: sqlite3.Connection, ref: bytes) -> int | None:
    """The id of the content whose ref is ``ref`` (chunker.content_ref); None when new."""
    row = db.execute("SELECT id FROM contents WHERE ref = ?", (ref,)).fetchone()
    return None if row is None else row[0]


def add(db: sqlite3.Connection, ref: bytes, size: int, chunk_rows: list[int]) -> int:
    """Record a new content: its ref, its size in bytes and its chunks (chunks-table row ids,
    in order); returns its id. The caller has checked with :func:`find` that it is new."""
    cur = db.execute(
        "INSERT INTO contents(ref, size, chunks) VALUES (?, ?, ?)", (ref, size, len(chunk_rows))
    )
    assert cur.lastrowid is not None
    db.executemany(
        "INSERT INTO content_chunks(content, seq, chunk) VALUES (?, ?, ?)",
        [(cur.lastrowid, i, c) for i, c in enumerate(chunk_rows)],
    )
    return cur.lastrowid


def _named_without(without: tuple[str, ...]) -> str:
    """:data:`_NAMED`, leaving out the entries of the snapshots whose uids are ``without``
    (as many ``?`` parameters)."""
    if not without:
        return _NAMED
    marks = ", ".join("?" * len(without))
    return f"{_NAMED} AND snapshot NOT IN (SELECT id FROM snapshots WHERE uid IN ({marks}))"


def unreferenced(index: Index, without: tuple[str, ...] = ()) -> int:
    """How many contents no entry names (what :func:`delete_unreferenced` would delete);
    ``without``: as if the snapshots of those uids were forgotten (a dry run of `forget
    --prune`)."""
    row = index.one(
        f"SELECT count(*) FROM contents WHERE id NOT IN ({_named_without(without)})", without
    )
    assert row is not None
    return row[0]


def delete_unreferenced(index: Index) -> int:
    """Delete, in one transaction, every content no entry names and its chunk list; returns
    how many. Only prune calls it, under the vault lock, before it decides which chunks are
    live: a commit may reuse any content still recorded, so its chunks stay until then."""
    with index.tx() as db:
        db.execute(f"DELETE FROM content_chunks WHERE content NOT IN ({_NAMED})")
        return db.execute(f"DELETE FROM contents WHERE id NOT IN ({_NAMED})").rowcount
