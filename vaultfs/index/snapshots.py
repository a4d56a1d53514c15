"""Queries about snapshots and their entries (tables ``snapshots``, ``entries``,
``entry_chunks``)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index

#: Columns of an entry row as :func:`add_entry` takes them (after the snapshot id).
ENTRY_COLUMNS = "path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link, parent, rdev"


def add(db: sqlite3.Connection, uid: str, name: str | None, created: float, seq: int) -> int:
    """Record a new snapshot to be carried first by manifest ``seq``; returns its row id."""
    cur = db.execute(
        "INSERT INTO snapshots(uid, name, created, seq) VALUES (?, ?, ?, ?)",
        (uid, name, created, seq),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def add_entry(db: sqlite3.Connection, snapshot: int, row: tuple) -> int:
    """Record one entry of ``snapshot`` (``row`` in :data:`ENTRY_COLUMNS` order, names in
    their stored form); returns its id."""
    cur = db.execute(
        f"INSERT INTO entries(snapshot, {ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?)",
        (snapshot, *row),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def add_file_chunks(db: sqlite3.Connection, entry: int, chunk_ids: list[int]) -> None:
    """Record the chunks (chunks-table row ids, in file order) of file entry ``entry``."""
    db.executemany(
        "INSERT INTO entry_chunks(entry, seq, chunk) VALUES (?, ?, ?)",
        [(entry, i, cid) for i, cid in enumerate(chunk_ids)],
    )


def finish(db: sqlite3.Connection, snapshot: int, root: bytes, files: int, size: int) -> None:
    """Record a snapshot's vault root, entry count and logical bytes."""
    db.execute(
        "UPDATE snapshots SET root=?, files=?, bytes=? WHERE id=?", (root, files, size, snapshot)
    )


def delete(db: sqlite3.Connection, uid: str) -> bool:
    """Forget snapshot ``uid`` and its entries; False when there is none."""
    row = db.execute("SELECT id FROM snapshots WHERE uid=?", (uid,)).fetchone()
    if row is None:
        return False
    db.execute(
        "DELETE FROM entry_chunks WHERE entry IN (SELECT id FROM entries WHERE snapshot=?)", row
    )
    db.execute("DELETE FROM entries WHERE snapshot=?", row)
    db.execute("DELETE FROM snapshots WHERE id=?", row)
    return True


def summary(index: Index) -> tuple[int, float | None]:
    """(number of snapshots, creation time of the newest)."""
    row = index.one("SELECT count(*), max(created) FROM snapshots")
    assert row is not None
    return row


def rows(index: Index) -> list[tuple[str, str | None, float, int, int, int]]:
    """Every snapshot as (uid, name, created, files, bytes, seq), oldest first."""
    return index.q("SELECT uid, name, created, files, bytes, seq FROM snapshots ORDER BY id")


def find(index: Index, ref: str) -> tuple[int, str] | None:
    """(row id, uid) of snapshot ``ref``: its uid, its name (the newest snapshot of that
    name) or 'latest' (the newest of all); None when nothing matches."""
    if ref == "latest":
        return index.one("SELECT id, uid FROM snapshots ORDER BY id DESC LIMIT 1")
    return index.one(
        "SELECT id, uid FROM snapshots WHERE uid=? OR name=? ORDER BY id DESC LIMIT 1",
        (ref, ref),
    )


def entry_rows(index: Index, snapshot: int) -> list[tuple]:
    """(path, type, mode, size, mtime_ns, target, rdev) of every entry of the snapshot with
    row id ``snapshot``, in no particular order (paths as stored: names.from_db)."""
    return index.q(
        "SELECT path, type, mode, size, mtime_ns, target, rdev FROM entries WHERE snapshot=?",
        (snapshot,),
    )


def file_chunk_ids(index: Index, entry: int) -> list[bytes]:
    """The chunk ids of file entry ``entry``, in file order."""
    return [
        cid
        for (cid,) in index.q(
            "SELECT c.cid FROM entry_chunks e JOIN chunks c ON c.id = e.chunk"
            " WHERE e.entry=? ORDER BY e.seq",
            (entry,),
        )
    ]
