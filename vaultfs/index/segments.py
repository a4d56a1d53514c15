"""Queries about segments and their shard objects (tables ``segments``, ``shards``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index

#: A shard row as the write path records it: (idx, name, remote, size, hash, blocks, root).
ShardRow = tuple[int, str, int, int, bytes, bytes, bytes]


def _marks(ids: list[int]) -> str:
    return ",".join("?" * len(ids))


# -- segments ------------------------------------------------------------------------------
def insert(
    db: sqlite3.Connection,
    seg_id: int,
    uid: bytes,
    kind: str,
    size: int,
    used: int,
    k: int,
    n: int,
    ec_alg: int,
    epoch: int,
    root: bytes,
    created: float,
    manifest: int | None = None,
) -> None:
    """Record sealed segment ``seg_id`` ('data', or 'meta' with the manifest seq naming it)."""
    db.execute(
        "INSERT INTO segments(id, uid, kind, size, used, k, n, ec_alg, epoch, root, manifest,"
        " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seg_id, uid, kind, size, used, k, n, ec_alg, epoch, root, manifest, created),
    )


def max_id(index: Index) -> int:
    """The highest segment id recorded (0 for none)."""
    row = index.one("SELECT max(id) FROM segments")
    return (row[0] if row else None) or 0


def ids(index: Index) -> list[int]:
    """Every segment id."""
    return [s for (s,) in index.q("SELECT id FROM segments")]


def data_roots(db: sqlite3.Connection) -> list[bytes]:
    """The roots of the data segments in id order (the leaves of the vault root)."""
    return [r for (r,) in db.execute("SELECT root FROM segments WHERE kind='data' ORDER BY id")]


def count_under_k(index: Index) -> int:
    """How many segments have fewer than k shards placed."""
    row = index.one(
        "SELECT count(*) FROM segments g WHERE (SELECT count(*) FROM shards s"
        " WHERE s.segment = g.id AND s.state='placed') < g.k"
    )
    assert row is not None
    return row[0]


def unnamed_meta(index: Index) -> list[int]:
    """Ids of index-copy segments recorded for a manifest that was never recorded."""
    return [
        sid
        for (sid,) in index.q(
            "SELECT id FROM segments WHERE kind='meta'"
            " AND manifest NOT IN (SELECT seq FROM manifests)"
        )
    ]


def forget(db: sqlite3.Connection, seg_ids: list[int]) -> None:
    """Delete segments ``seg_ids`` and their shard rows."""
    marks = _marks(seg_ids)
    db.execute(f"DELETE FROM shards WHERE segment IN ({marks})", tuple(seg_ids))
    db.execute(f"DELETE FROM segments WHERE id IN ({marks})", tuple(seg_ids))


def forget_meta_before(db: sqlite3.Connection, seq: int) -> None:
    """Delete the index-copy segments (and their shard rows) of manifests older than ``seq``."""
    db.execute(
        "DELETE FROM shards WHERE segment IN"
        " (SELECT id FROM segments WHERE kind='meta' AND manifest < ?)",
        (seq,),
    )
    db.execute("DELETE FROM segments WHERE kind='meta' AND manifest < ?", (seq,))


# -- shards --------------------------------------------------------------------------------
def add_queued_shards(db: sqlite3.Connection, seg_id: int, rows: Iterable[ShardRow]) -> None:
    """Record the shards of segment ``seg_id`` as queued (their files are in the queue)."""
    db.executemany(
        "INSERT INTO shards(segment, idx, name, remote, size, hash, blocks, root, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
        [(seg_id, *row) for row in rows],
    )


def shards_of(index: Index, seg_ids: list[int]) -> list[tuple[str, int, str]]:
    """(name, remote, state) of every shard of segments ``seg_ids``."""
    return index.q(
        f"SELECT name, remote, state FROM shards WHERE segment IN ({_marks(seg_ids)})",
        tuple(seg_ids),
    )


def queued_names(index: Index) -> set[str]:
    """Object names of the queued shards."""
    return {name for (name,) in index.q("SELECT name FROM shards WHERE state='queued'")}


def queued_shards(index: Index) -> list[tuple[int, str, int, str]]:
    """(shard id, name, remote, segment kind) of every queued shard."""
    return index.q(
        "SELECT s.id, s.name, s.remote, g.kind FROM shards s "
        "JOIN segments g ON g.id = s.segment WHERE s.state='queued'"
    )


def mark_placed(index: Index, shard_ids: list[int]) -> None:
    """Record shards ``shard_ids`` as placed on their remotes."""
    with index.tx() as db:
        db.executemany("UPDATE shards SET state='placed' WHERE id=?", [(s,) for s in shard_ids])


def queued_count(index: Index, rid: int) -> int:
    """How many shards wait in the queue for remote ``rid``."""
    row = index.one("SELECT count(*) FROM shards WHERE state='queued' AND remote=?", (rid,))
    assert row is not None
    return row[0]


def remote_totals(index: Index, rid: int, state: str) -> tuple[int, int]:
    """(objects, bytes) of the shards of remote ``rid`` in ``state``."""
    row = index.one(
        "SELECT count(*), coalesce(sum(size),0) FROM shards WHERE remote=? AND state=?",
        (rid, state),
    )
    assert row is not None
    return row


def placements(index: Index) -> list[tuple[int, int, str]]:
    """(segment, remote, state) of every shard."""
    return index.q("SELECT segment, remote, state FROM shards")


def placed_meta_before(index: Index, seq: int) -> list[tuple[int, str, int]]:
    """(shard id, name, remote) of the placed shards of index copies older than manifest
    ``seq``."""
    return index.q(
        "SELECT s.id, s.name, s.remote FROM shards s JOIN segments g ON g.id = s.segment"
        " WHERE g.kind='meta' AND g.manifest < ? AND s.state='placed'",
        (seq,),
    )


def geometry(index: Index, seg_id: int) -> tuple[str, int, int, int] | None:
    """(kind, size, k, n) of segment ``seg_id``; None when the index has no such segment."""
    return index.one("SELECT kind, size, k, n FROM segments WHERE id=?", (seg_id,))


def shard_holders(index: Index, seg_id: int) -> list[tuple[int, str, bytes, str, int, str]]:
    """(idx, name, hash, state, remote id, remote spec) of every shard of ``seg_id``."""
    return index.q(
        "SELECT s.idx, s.name, s.hash, s.state, s.remote, r.spec FROM shards s"
        " JOIN remotes r ON r.id = s.remote WHERE s.segment=? ORDER BY s.idx",
        (seg_id,),
    )
