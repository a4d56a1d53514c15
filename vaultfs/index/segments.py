"""Queries about segments and their shard objects (tables ``segments``, ``shards``)."""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from .. import merkle
from .chunks import LOOKUP_BATCH

if TYPE_CHECKING:
    from . import Index

#: A shard row as the write path records it: (idx, name, remote, size, hash, blocks, root).
NewShard = tuple[int, str, int, int, bytes, bytes, bytes]


class ShardRow(NamedTuple):
    """A shard's row with its segment's kind, uid and root (what audits and repair read)."""

    id: int
    segment: int
    idx: int
    name: str
    remote: int
    size: int
    hash: bytes
    blocks: bytes
    root: bytes
    state: str
    kind: str
    seg_uid: bytes
    seg_root: bytes

    @property
    def nblocks(self) -> int:
        """Merkle blocks of the object."""
        return max(1, math.ceil(self.size / merkle.BLOCK_SIZE))

    @property
    def path(self) -> str:
        """The object's path on its remote (``kind/name``)."""
        return f"{self.kind}/{self.name}"


_SHARD_ROWS = (
    "SELECT s.id, s.segment, s.idx, s.name, s.remote, s.size, s.hash, s.blocks, s.root, s.state,"
    " g.kind, g.uid, g.root FROM shards s JOIN segments g ON g.id = s.segment"
)
#: Segments whose redundancy matters: every data segment and the meta segments the newest
#: manifest names (the others only hold what older manifests need).
_LIVE = (
    "(g.kind = 'data' OR (g.kind = 'meta' AND g.id IN (SELECT segment FROM manifest_segments"
    " WHERE manifest = (SELECT max(seq) FROM manifests))))"
)
#: Meta segments no manifest from seq ? on names (bound twice: the same cutoff).
_UNREFERENCED_META = (
    "kind='meta' AND manifest < ? AND id NOT IN"
    " (SELECT segment FROM manifest_segments WHERE manifest >= ?)"
)


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


def ids_by_uid(index: Index, uids: Iterable[bytes]) -> dict[bytes, int]:
    """{uid: segment id} of the segments among ``uids`` the index records."""
    out: dict[bytes, int] = {}
    for uid in uids:
        row = index.one("SELECT id FROM segments WHERE uid=?", (uid,))
        if row is not None:
            out[uid] = row[0]
    return out


def max_id(index: Index) -> int:
    """The highest segment id recorded (0 for none)."""
    row = index.one("SELECT max(id) FROM segments")
    return (row[0] if row else None) or 0


def live_ids(index: Index) -> list[int]:
    """The ids of the segments whose redundancy matters (:func:`live_shards`): every data
    segment and the index copy the newest manifest names; older index copies kept for
    `restore --manifest` are not rebuilt by repair and do not count."""
    return [s for (s,) in index.q(f"SELECT g.id FROM segments g WHERE {_LIVE}")]


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


def queued_bytes_under_k(index: Index) -> int:
    """Bytes of the queued shards of segments that have fewer than k shards placed: what
    the queue holds that no k remotes have yet (the shards still needing a home)."""
    row = index.one(
        "SELECT coalesce(sum(s.size), 0) FROM shards s JOIN segments g ON g.id = s.segment"
        " WHERE s.state='queued' AND (SELECT count(*) FROM shards p"
        " WHERE p.segment = g.id AND p.state='placed') < g.k"
    )
    assert row is not None
    return row[0]


def unnamed_meta(index: Index) -> list[int]:
    """Ids of the meta segments no recorded manifest names: written for a manifest that was
    never recorded (a segment whose first manifest was pruned may still be named by later
    ones: ``manifest_segments`` says). Only meaningful while no commit is under way."""
    return [
        sid
        for (sid,) in index.q(
            "SELECT id FROM segments WHERE kind='meta'"
            " AND id NOT IN (SELECT segment FROM manifest_segments)"
        )
    ]


def forget(db: sqlite3.Connection, seg_ids: list[int]) -> None:
    """Delete segments ``seg_ids`` and their shard rows."""
    marks = _marks(seg_ids)
    db.execute(f"DELETE FROM shards WHERE segment IN ({marks})", tuple(seg_ids))
    db.execute(f"DELETE FROM segments WHERE id IN ({marks})", tuple(seg_ids))


def forget_unreferenced_meta(db: sqlite3.Connection, seq: int) -> None:
    """Delete the meta segments (and their shard rows) that no manifest from ``seq`` on
    names."""
    db.execute(
        f"DELETE FROM shards WHERE segment IN (SELECT id FROM segments WHERE {_UNREFERENCED_META})",
        (seq, seq),
    )
    db.execute(f"DELETE FROM segments WHERE {_UNREFERENCED_META}", (seq, seq))


def meta_named_by(index: Index, seq: int) -> dict[bytes, tuple[int, int]]:
    """{uid: (segment id, used)} of the meta segments manifest ``seq`` names that still have
    k shards placed or queued (a commit reuses blocks only where they can be read back)."""
    return {
        bytes(uid): (sid, used)
        for sid, uid, used in index.q(
            "SELECT g.id, g.uid, g.used FROM segments g JOIN manifest_segments m"
            " ON m.segment = g.id WHERE m.manifest=? AND (SELECT count(*) FROM shards s"
            " WHERE s.segment = g.id AND s.state IN ('placed', 'queued')) >= g.k",
            (seq,),
        )
    }


def meta_descriptors(
    index: Index, seg_ids: list[int]
) -> list[tuple[bytes, int, int, int, int, int, list[tuple[int, str, int, bytes]]]]:
    """(uid, used, size, k, n, ec_alg, shards) of meta segments ``seg_ids`` in id order, each
    shard as (idx, name, size, hash) of its current object (what a manifest names)."""
    out = []
    for i in range(0, len(seg_ids), 500):
        part = seg_ids[i : i + 500]
        rows = index.q(
            f"SELECT id, uid, used, size, k, n, ec_alg FROM segments WHERE id IN ({_marks(part)})"
            " ORDER BY id",
            tuple(part),
        )
        shards: dict[int, list[tuple[int, str, int, bytes]]] = defaultdict(list)
        for sid, idx, name, size, h in index.q(
            f"SELECT segment, idx, name, size, hash FROM shards WHERE segment IN ({_marks(part)})"
            " AND state IN ('placed', 'queued') ORDER BY segment, idx",
            tuple(part),
        ):
            shards[sid].append((idx, name, size, bytes(h)))
        out += [(bytes(uid), *rest, shards[sid]) for sid, uid, *rest in rows]
    return out


# -- shards --------------------------------------------------------------------------------
def add_queued_shards(db: sqlite3.Connection, seg_id: int, rows: Iterable[NewShard]) -> None:
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


def queued_count(index: Index, rid: int | None = None) -> int:
    """How many shards wait in the queue for remote ``rid`` (None: for any remote)."""
    if rid is None:
        row = index.one("SELECT count(*) FROM shards WHERE state='queued'")
    else:
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


def placed_unreferenced_meta(index: Index, seq: int) -> list[tuple[int, str, int]]:
    """(shard id, name, remote) of the placed shards of meta segments that no manifest from
    ``seq`` on names."""
    return index.q(
        "SELECT s.id, s.name, s.remote FROM shards s WHERE s.state='placed' AND s.segment IN"
        f" (SELECT id FROM segments WHERE {_UNREFERENCED_META})",
        (seq, seq),
    )


def geometry(index: Index, seg_id: int) -> tuple[str, int, int, int, bytes, int] | None:
    """(kind, size, k, n, uid, erasure algorithm) of segment ``seg_id``: what a reader needs
    to decode it; None when the index has no such segment."""
    return index.one("SELECT kind, size, k, n, uid, ec_alg FROM segments WHERE id=?", (seg_id,))


def shard_holders(index: Index, seg_id: int) -> list[tuple[int, str, bytes, str, int, str]]:
    """(idx, name, hash, state, remote id, remote spec) of every shard of ``seg_id``."""
    return index.q(
        "SELECT s.idx, s.name, s.hash, s.state, s.remote, r.spec FROM shards s"
        " JOIN remotes r ON r.id = s.remote WHERE s.segment=? ORDER BY s.idx",
        (seg_id,),
    )


def _by_ids(index: Index, sql: str, seg_ids: list[int]) -> Iterable[tuple]:
    """The rows of ``sql`` (which ends in ``IN ({marks})``) for ``seg_ids``, in batches of
    at most :data:`LOOKUP_BATCH` ids: point lookups, never a scan of the table (a restore
    of one file through the lazy index view reads only the pages on their paths)."""
    for i in range(0, len(seg_ids), LOOKUP_BATCH):
        part = seg_ids[i : i + LOOKUP_BATCH]
        yield from index.q(sql.format(marks=_marks(part)), tuple(part))


def layouts(index: Index, seg_ids: list[int]) -> dict[int, tuple[int, int, int, int, int]]:
    """{segment id: (size, k, n, key epoch, erasure algorithm)} of the segments ``seg_ids``."""
    return {
        sid: (size, k, n, epoch, alg)
        for sid, size, k, n, epoch, alg in _by_ids(
            index,
            "SELECT id, size, k, n, epoch, ec_alg FROM segments WHERE id IN ({marks})",
            seg_ids,
        )
    }


def data_segments(index: Index) -> list[tuple[int, int, int, int]]:
    """(id, size, used bytes, key epoch) of every data segment, in id order."""
    return index.q("SELECT id, size, used, epoch FROM segments WHERE kind='data' ORDER BY id")


def data_roots_by_id(index: Index) -> list[tuple[int, bytes]]:
    """(id, root) of every data segment in id order (the leaves of the vault root)."""
    return index.q("SELECT id, root FROM segments WHERE kind='data' ORDER BY id")


def data_after(index: Index, seg_id: int) -> int:
    """How many data segments have an id above ``seg_id``."""
    row = index.one("SELECT count(*) FROM segments WHERE kind='data' AND id > ?", (seg_id,))
    assert row is not None
    return row[0]


def first_meta(index: Index, seq: int) -> int | None:
    """The lowest id of the index-copy segments of manifest ``seq``; None when it has none."""
    return index.one("SELECT min(id) FROM segments WHERE kind='meta' AND manifest=?", (seq,))[0]


def shard_by_hash(index: Index, digest: bytes) -> tuple[int, int] | None:
    """(segment id, shard index) of the shard whose object has BLAKE3 ``digest``, if any.

    A scan (no index on ``hash``): for audits that found an object wrong, never per object."""
    return index.one("SELECT segment, idx FROM shards WHERE hash=? LIMIT 1", (digest,))


def shard_sizes(index: Index) -> set[int]:
    """The distinct sizes of the vault's shard objects (a handful: one per size class)."""
    return {size for (size,) in index.q("SELECT DISTINCT size FROM shards")}


def set_root(db: sqlite3.Connection, seg_id: int, root: bytes) -> None:
    """Record segment ``seg_id``'s Merkle root (over its shard roots)."""
    db.execute("UPDATE segments SET root=? WHERE id=?", (root, seg_id))


def records(index: Index, seg_id: int) -> list[ShardRow]:
    """Every shard of segment ``seg_id``, by shard index."""
    return [
        ShardRow(*r) for r in index.q(_SHARD_ROWS + " WHERE s.segment=? ORDER BY s.idx", (seg_id,))
    ]


def live_shards(index: Index, remote: int | None = None) -> list[ShardRow]:
    """The shards (of remote ``remote``; None: of every remote) of the segments whose
    redundancy matters: every data segment and the index copy named by the newest manifest.
    In segment, then shard index order."""
    if remote is None:
        rows = index.q(_SHARD_ROWS + f" WHERE {_LIVE} ORDER BY s.segment, s.idx")
    else:
        rows = index.q(
            _SHARD_ROWS + f" WHERE s.remote=? AND {_LIVE} ORDER BY s.segment, s.idx", (remote,)
        )
    return [ShardRow(*r) for r in rows]


def queued_on(index: Index, rids: set[int]) -> list[ShardRow]:
    """The queued shards bound for one of the remotes ``rids``."""
    marks = _marks(list(rids))
    return [
        ShardRow(*r)
        for r in index.q(
            _SHARD_ROWS + f" WHERE s.state='queued' AND s.remote IN ({marks})", tuple(rids)
        )
    ]


def holders(index: Index, seg_id: int, skip_idx: int | None = None) -> list[int]:
    """The remotes of segment ``seg_id``'s placed or queued shards (but shard ``skip_idx``),
    one entry per shard."""
    if skip_idx is None:
        rows = index.q(
            "SELECT remote FROM shards WHERE segment=? AND state IN ('placed','queued')",
            (seg_id,),
        )
    else:
        rows = index.q(
            "SELECT remote FROM shards WHERE segment=? AND idx<>? AND state IN ('placed','queued')",
            (seg_id, skip_idx),
        )
    return [r for (r,) in rows]


def healthy_counts(index: Index) -> dict[int, int]:
    """{segment id: its placed or queued shards on active remotes}; a segment with none is
    left out."""
    return dict(
        index.q(
            "SELECT s.segment, count(*) FROM shards s JOIN remotes r ON r.id = s.remote"
            " WHERE s.state IN ('placed', 'queued') AND r.state='active' GROUP BY s.segment"
        )
    )


def placed_live_on(index: Index, remote: int) -> int:
    """How many shards of live segments (:func:`live_shards`' sense) are placed on
    ``remote``."""
    row = index.one(
        "SELECT count(*) FROM shards s JOIN segments g ON g.id = s.segment"
        f" WHERE s.remote=? AND s.state='placed' AND {_LIVE}",
        (remote,),
    )
    assert row is not None
    return row[0]


def short_without(index: Index, remote: int | None = None) -> list[int]:
    """Ids of the live segments (:func:`live_shards`' sense) with fewer than k placed or
    queued shards on the active remotes (other than ``remote``): below k where the vault
    reads, and with ``remote``, those a removal of it can rebuild only from its own shards."""
    return [
        sid
        for (sid,) in index.q(
            "SELECT g.id FROM segments g WHERE "
            + _LIVE
            + " AND (SELECT count(*) FROM shards s JOIN remotes r ON r.id = s.remote"
            " WHERE s.segment = g.id AND s.state IN ('placed', 'queued') AND r.state = 'active'"
            " AND s.remote IS NOT ?) < g.k ORDER BY g.id",
            (remote,),
        )
    ]


def object_names(index: Index, remote: int | None = None, state: str | None = None) -> set[str]:
    """Object names of every shard the index has (on remote ``remote``; None: anywhere), or of
    those in ``state`` only."""
    sql, args = "SELECT name FROM shards WHERE 1", []
    if remote is not None:
        sql, args = sql + " AND remote=?", [*args, remote]
    if state is not None:
        sql, args = sql + " AND state=?", [*args, state]
    return {n for (n,) in index.q(sql, tuple(args))}


def move(db: sqlite3.Connection, shard_id: int, remote: int) -> None:
    """Send shard ``shard_id`` to remote ``remote`` instead (its queue file moved there)."""
    db.execute("UPDATE shards SET remote=? WHERE id=?", (remote, shard_id))


def requeue(
    db: sqlite3.Connection,
    shard_id: int,
    name: str,
    remote: int,
    hash: bytes,
    blocks: bytes,
    root: bytes,
) -> None:
    """Record a rebuilt shard ``shard_id``: new object ``name`` for ``remote``, queued, with
    its hash, Merkle leaves and root."""
    db.execute(
        "UPDATE shards SET name=?, remote=?, state='queued', hash=?, blocks=?, root=? WHERE id=?",
        (name, remote, hash, blocks, root, shard_id),
    )


def shard_roots(index: Index, seg_id: int) -> list[bytes]:
    """The Merkle roots of segment ``seg_id``'s shards, by shard index."""
    return [
        bytes(r)
        for (r,) in index.q("SELECT root FROM shards WHERE segment=? ORDER BY idx", (seg_id,))
    ]


def data_segment_roots(
    index: Index, page: int = LOOKUP_BATCH
) -> Iterator[tuple[int, bytes, list[bytes]]]:
    """(id, root, the Merkle roots of its shards by shard index) of every data segment, in id
    order, read ``page`` segments at a time (keyset on the id, then point lookups of their
    shards): a full restore checks the vault root holding one page, whatever the vault's
    size."""
    last = -1
    while True:
        rows = index.q(
            "SELECT id, root FROM segments WHERE kind='data' AND id > ? ORDER BY id LIMIT ?",
            (last, page),
        )
        if not rows:
            return
        shard_roots: dict[int, list[bytes]] = defaultdict(list)
        for sid, root in _by_ids(
            index,
            "SELECT segment, root FROM shards WHERE segment IN ({marks}) ORDER BY segment, idx",
            [sid for sid, _root in rows],
        ):
            shard_roots[sid].append(root)
        for sid, root in rows:
            yield sid, root, shard_roots.get(sid, [])
        if len(rows) < page:
            return
        last = rows[-1][0]


def shard_hashes(index: Index, seg_ids: list[int]) -> dict[int, list[tuple[int, str, bytes, int]]]:
    """{segment id: (idx, name, hash, size) of its shards, by shard index} of the segments
    ``seg_ids``."""
    out: dict[int, list[tuple[int, str, bytes, int]]] = defaultdict(list)
    for sid, idx, name, h, size in _by_ids(
        index,
        "SELECT segment, idx, name, hash, size FROM shards WHERE segment IN ({marks})"
        " ORDER BY segment, idx",
        seg_ids,
    ):
        out[sid].append((idx, name, h, size))
    return out


def meta_shard_hashes(index: Index, seq: int) -> list[tuple[str, bytes]]:
    """(name, hash) of the shards of the meta segments manifest ``seq`` names."""
    return index.q(
        "SELECT s.name, s.hash FROM shards s JOIN manifest_segments m ON m.segment = s.segment"
        " WHERE m.manifest=?",
        (seq,),
    )


def release_departed(index: Index, remote: int) -> int:
    """Shards still 'placed' on ``remote``, which left the vault, once a repair rebuilt every
    live segment elsewhere: only superseded index copies are left there (no one audits or
    rebuilds those, and ``prune_index_copies`` drops them). Marks them 'lost', so the
    departed remote no longer counts as holding anything; returns how many."""
    with index.tx() as db:
        return db.execute(
            "UPDATE shards SET state='lost' WHERE remote=? AND state='placed'", (remote,)
        ).rowcount


def bytes_by_remote(index: Index, seg_ids: list[int]) -> dict[int, int]:
    """{remote id: bytes of the placed or queued shard objects of ``seg_ids`` there}."""
    out: dict[int, int] = {}
    for i in range(0, len(seg_ids), 500):
        part = seg_ids[i : i + 500]
        for rid, size in index.q(
            f"SELECT remote, sum(size) FROM shards WHERE segment IN ({_marks(part)})"
            " AND state IN ('placed', 'queued') GROUP BY remote",
            tuple(part),
        ):
            out[rid] = out.get(rid, 0) + size
    return out


def placed_objects(index: Index, seg_ids: list[int]) -> dict[tuple[int, str], int]:
    """{(remote id, object name): size} of the placed shard objects of ``seg_ids``."""
    out: dict[tuple[int, str], int] = {}
    for i in range(0, len(seg_ids), 500):
        part = seg_ids[i : i + 500]
        for rid, name, size in index.q(
            f"SELECT remote, name, size FROM shards WHERE segment IN ({_marks(part)})"
            " AND state = 'placed'",
            tuple(part),
        ):
            out[(rid, name)] = size
    return out


def oldest_queued(index: Index) -> float | None:
    """Unix time the oldest shard still in the local upload queue was sealed; None when the
    queue is empty."""
    return index.one(
        "SELECT min(g.created) FROM shards h JOIN segments g ON g.id = h.segment"
        " WHERE h.state = 'queued'"
    )[0]


def data_shard_blocks(
    index: Index, seg_id: int, k: int
) -> list[tuple[int, str, int, bytes, str, int, str]]:
    """(idx, name, object size, Merkle leaves, state, remote id, remote spec) of the k data
    shards of segment ``seg_id``: what a range read of its records needs."""
    return index.q(
        "SELECT s.idx, s.name, s.size, s.blocks, s.state, s.remote, r.spec FROM shards s"
        " JOIN remotes r ON r.id = s.remote WHERE s.segment=? AND s.idx < ?",
        (seg_id, k),
    )
