"""The shipped-objects sidecar: where each index object already sealed to the remotes is
(``<home>/index-objects.db``, table ``objects``), so a commit seals only the blocks that
changed (vaultfs/vault/metaship.py).

It is a separate SQLite file on purpose: the index ships itself, so recording what was
shipped inside it would dirty more blocks at every commit. It is a cache, never the truth:
a row counts only while its segment uid is one the newest recorded manifest names (the
caller checks, against the index), so a row written before a crash, or one whose segment was
since deleted, is ignored; losing the file costs one commit that ships every block again.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..indexblocks import Location

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id      BLOB PRIMARY KEY,   -- index object id (docs/format.md 9)
    suite   INTEGER NOT NULL,   -- suite id bound into the record (a new suite seals anew)
    uid     BLOB NOT NULL,      -- meta segment holding its newest record
    offset  INTEGER NOT NULL,   -- the record's offset in that segment
    length  INTEGER NOT NULL    -- the record's length
) WITHOUT ROWID;
"""


class ShippedObjects:
    """The sidecar at ``path`` (created on first use). One writer: the commit path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _open(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def reader(self, suite: int) -> Iterator[ShippedLookup]:
        """A lookup over the sidecar for the duration of a commit's pass over the blocks: it
        finds only records sealed under ``suite`` (the manifest's, which a reader opens every
        object of the index with)."""
        with self._open() as db:
            yield ShippedLookup(db, suite)

    def record(
        self, rows: Iterable[tuple[bytes, Location]], suite: int, live_uids: set[bytes]
    ) -> None:
        """Note where the objects ``rows``, sealed under ``suite``, now are, and forget every
        row whose segment is not in ``live_uids`` (the segments the manifest just recorded
        names)."""
        with self._open() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                ((oid, suite, loc.uid, loc.offset, loc.length) for oid, loc in rows),
            )
            stale = [
                (uid,)
                for (uid,) in db.execute("SELECT DISTINCT uid FROM objects")
                if bytes(uid) not in live_uids
            ]
            db.executemany("DELETE FROM objects WHERE uid=?", stale)
            db.execute("COMMIT")


class ShippedLookup:
    """Point lookups in the sidecar (:meth:`ShippedObjects.reader`)."""

    def __init__(self, db: sqlite3.Connection, suite: int) -> None:
        self._db = db
        self._suite = suite

    def get(self, oid: bytes) -> Location | None:
        """Where object ``oid`` was last sealed under this lookup's suite, if the sidecar
        knows."""
        row = self._db.execute(
            "SELECT uid, offset, length FROM objects WHERE id=? AND suite=?", (oid, self._suite)
        ).fetchone()
        return None if row is None else Location(bytes(row[0]), row[1], row[2])


class BlockPlan:
    """A scratch table of the block map read from a manifest (restore: docs/format.md 11,
    step 4), on disk at ``path``, so that the blocks can be fetched grouped by segment with
    memory flat in the index's size."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute(
            "CREATE TABLE map (pos INTEGER, uid BLOB, offset INTEGER, length INTEGER, id BLOB)"
        )

    def close(self) -> None:
        self._db.close()

    def add(self, first: int, entries: list[tuple[bytes, Location]]) -> None:
        """Blocks ``first``, ``first + 1``, … are the objects ``entries`` (id, location)."""
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO map VALUES (?, ?, ?, ?, ?)",
            [
                (first + i, loc.uid, loc.offset, loc.length, oid)
                for i, (oid, loc) in enumerate(entries)
            ],
        )
        self._db.execute("COMMIT")

    def by_segment(self) -> Iterator[tuple[int, bytes, Location]]:
        """(block number, object id, location) of every block, grouped by segment."""
        for pos, uid, off, length, oid in self._db.execute(
            "SELECT pos, uid, offset, length, id FROM map ORDER BY uid, offset, pos"
        ):
            yield pos, bytes(oid), Location(bytes(uid), off, length)

    def objects(self) -> Iterator[tuple[bytes, Location]]:
        """(object id, location) of every block, in block order."""
        for oid, uid, off, length in self._db.execute(
            "SELECT id, uid, offset, length FROM map ORDER BY pos"
        ):
            yield bytes(oid), Location(bytes(uid), off, length)
