"""Queries about manifests, their chain, their upload queue and what they leave behind
(tables ``manifests``, ``manifest_chain``, ``manifest_queue``, ``garbage``; settings
``unshipped_since`` and ``fork_seen``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import segments, settings

if TYPE_CHECKING:
    from . import Index


def next_seq(db: sqlite3.Connection) -> int:
    """The sequence number the next manifest gets."""
    return (db.execute("SELECT max(seq) FROM manifests").fetchone()[0] or 0) + 1


def record(
    db: sqlite3.Connection,
    seq: int,
    name: str,
    created: float,
    root: bytes,
    remotes: list[int],
    link_hash: bytes,
    meta_segments: Iterable[int],
    fork: tuple[int, bytes] | None = None,
) -> None:
    """Record manifest ``seq`` (object ``name`` hashing to ``link_hash``, signing vault root
    ``root``, naming index objects in ``meta_segments``; ``fork``: the (seq, hash) it
    explicitly forked from) as written and to be uploaded to ``remotes``; the index copy on
    the remotes is current again (clears :func:`mark_unshipped`)."""
    db.execute("INSERT INTO manifests VALUES (?, ?, ?, ?)", (seq, name, created, root))
    db.executemany(
        "INSERT INTO manifest_segments VALUES (?, ?)", [(seq, sid) for sid in meta_segments]
    )
    db.execute(
        "INSERT OR REPLACE INTO manifest_chain VALUES (?, ?, ?, ?, ?)",
        (seq, name, link_hash, *(fork or (None, None))),
    )
    db.execute("DELETE FROM settings WHERE key='unshipped_since'")
    db.executemany("INSERT INTO manifest_queue VALUES (?, ?)", [(seq, rid) for rid in remotes])


def adopt(
    db: sqlite3.Connection,
    seq: int,
    name: str,
    created: float,
    root: bytes,
    link_hash: bytes,
    meta_segments: Iterable[int],
    fork: tuple[int, bytes] | None = None,
) -> None:
    """Record manifest ``seq`` (object ``name`` under manifests/, hashing to ``link_hash``,
    naming index objects in ``meta_segments``) found on the remotes, with nothing to upload (``vaultfs home rebuild``), as :func:`record`
    would have: the index copy on the remotes is current and the manifest is this chain's
    newest link. Every upload still queued is forgotten: the manifest objects they would
    read were in the lost home's queue."""
    db.execute("DELETE FROM manifest_queue")
    record(db, seq, name, created, root, [], link_hash, meta_segments, fork)


def newest_link(index: Index) -> tuple[int, bytes] | None:
    """(seq, hash) of the newest manifest of this chain (the ``prev`` of the next one, and what
    outputs print); None before the first."""
    row = index.one("SELECT seq, hash FROM manifest_chain ORDER BY seq DESC LIMIT 1")
    return None if row is None else (row[0], bytes(row[1]))


def chain_names(index: Index) -> set[str]:
    """Object names of every manifest of this chain (pruned ones too)."""
    return {n for (n,) in index.q("SELECT name FROM manifest_chain")}


def chain_links(index: Index) -> dict[int, bytes]:
    """{seq: object hash} of every manifest of this chain."""
    return {seq: bytes(h) for seq, h in index.q("SELECT seq, hash FROM manifest_chain")}


def hash_of(index: Index, seq: int) -> bytes | None:
    """The object hash of this chain's manifest ``seq``; None if it has none."""
    row = index.one("SELECT hash FROM manifest_chain WHERE seq=?", (seq,))
    return None if row is None else bytes(row[0])


def newest_fork(index: Index) -> int:
    """The highest sequence number an explicit fork of this chain forked from (0: none):
    other branches' manifests up to it were seen and knowingly left."""
    return index.one("SELECT coalesce(max(fork_seq), 0) FROM manifest_chain")[0]


def unqueue_upto(db: sqlite3.Connection, seq: int) -> None:
    """Drop the uploads of manifests up to ``seq``: an explicit fork above them supersedes
    them (placing them would put two manifests at one sequence number)."""
    db.execute("DELETE FROM manifest_queue WHERE seq<=?", (seq,))


def note_fork(index: Index, found: list[str] | None) -> None:
    """Remember what the last look at the remotes found off this chain (``status`` shows it);
    None or empty: no fork seen."""
    with index.tx() as db:
        if found:
            settings.put(db, {"fork_seen": json.dumps(found)})
        else:
            db.execute("DELETE FROM settings WHERE key='fork_seen'")


def fork_seen(index: Index) -> list[str]:
    """What the last look at the remotes found off this chain (:func:`note_fork`)."""
    value = index.get("fork_seen")
    return [] if value is None else json.loads(value)


def names(index: Index) -> set[str]:
    """Object names of the recorded manifests."""
    return {name for (name,) in index.q("SELECT name FROM manifests")}


def seqs_and_names(index: Index) -> list[tuple[int, str]]:
    """(seq, object name) of every recorded manifest."""
    return index.q("SELECT seq, name FROM manifests")


def seqs_newest_first(index: Index) -> list[int]:
    """Sequence numbers of the recorded manifests, newest first."""
    return [s for (s,) in index.q("SELECT seq FROM manifests ORDER BY seq DESC")]


def names_before(index: Index, seq: int) -> list[str]:
    """Object names of the manifests older than ``seq``."""
    return [n for (n,) in index.q("SELECT name FROM manifests WHERE seq < ?", (seq,))]


def forget_before(db: sqlite3.Connection, seq: int) -> None:
    """Forget the manifests older than ``seq`` and the meta segments only they name."""
    segments.forget_unreferenced_meta(db, seq)
    db.execute("DELETE FROM manifest_segments WHERE manifest < ?", (seq,))
    db.execute("DELETE FROM manifests WHERE seq < ?", (seq,))


def queued_uploads(index: Index) -> list[tuple[int, int, str]]:
    """(seq, remote, object name) of every manifest upload still to do, oldest first."""
    return index.q(
        "SELECT q.seq, q.remote, m.name FROM manifest_queue q JOIN manifests m ON m.seq = q.seq"
        " ORDER BY q.seq"
    )


def dequeue(index: Index, seq: int, rid: int) -> None:
    """Drop the upload of manifest ``seq`` to remote ``rid`` (done, or the remote left)."""
    with index.tx() as db:
        db.execute("DELETE FROM manifest_queue WHERE seq=? AND remote=?", (seq, rid))


def queued_seqs(index: Index) -> set[int]:
    """Manifests with an upload still to do."""
    return {s for (s,) in index.q("SELECT DISTINCT seq FROM manifest_queue")}


def pending_uploads(index: Index) -> int:
    """How many (manifest, remote) uploads are still to do."""
    row = index.one("SELECT count(*) FROM manifest_queue")
    assert row is not None
    return row[0]


def mark_unshipped(db: sqlite3.Connection, now: float) -> None:
    """Note that the index copy on the remotes is out of date since ``now`` (cleared by
    the transaction that records the next manifest)."""
    settings.put(db, {"unshipped_since": now})


def add_garbage(db: sqlite3.Connection, objects: Iterable[tuple[str, int]], kind: str, seq: int):
    """List placed shard objects (name, remote) of ``kind`` ('data' or 'meta') as garbage:
    deleted from their remotes once manifest ``seq``, the first not naming them, is placed."""
    db.executemany(
        "INSERT OR IGNORE INTO garbage VALUES (?, ?, ?, ?)",
        [(name, rid, kind, seq) for name, rid in objects],
    )


def newest_seq(index: Index) -> int:
    """The highest manifest sequence number this index has recorded (0 before the first)."""
    return index.one("SELECT coalesce(max(seq), 0) FROM manifests")[0]


def newest_placed(index: Index, remote: int) -> int | None:
    """The highest manifest sequence number that is on remote ``remote`` (no longer queued
    for it); None when none is."""
    return index.one(
        "SELECT max(seq) FROM manifests WHERE seq NOT IN"
        " (SELECT seq FROM manifest_queue WHERE remote=?)",
        (remote,),
    )[0]


def newest(index: Index) -> tuple[int, bytes] | None:
    """(seq, signed vault root) of the newest recorded manifest; None before the first."""
    return index.one("SELECT seq, root FROM manifests ORDER BY seq DESC LIMIT 1")


def unshipped_since(index: Index) -> float | None:
    """When the index copy on the remotes went out of date (:func:`mark_unshipped`); None
    when it is current."""
    value = index.get("unshipped_since")
    return None if value is None else float(value)


def queued_up_to(index: Index, rid: int, seq: int) -> bool:
    """Whether an upload to remote ``rid`` of a manifest up to ``seq`` is still to do."""
    return (
        index.one("SELECT 1 FROM manifest_queue WHERE remote=? AND seq<=?", (rid, seq)) is not None
    )


def garbage(index: Index) -> list[tuple[str, int, str, int]]:
    """(name, remote, kind, seq) of every shard object listed as garbage (:func:`add_garbage`)."""
    return index.q("SELECT name, remote, kind, seq FROM garbage")


def garbage_names(index: Index, remote: int) -> set[str]:
    """Names of the garbage objects (:func:`add_garbage`) placed on remote ``remote``."""
    return {n for (n,) in index.q("SELECT name FROM garbage WHERE remote=?", (remote,))}


def garbage_count(index: Index) -> int:
    """How many shard objects wait to be deleted as garbage."""
    row = index.one("SELECT count(*) FROM garbage")
    assert row is not None
    return row[0]


def forget_garbage(index: Index, names: list[str]) -> None:
    """Strike the objects ``names`` (deleted from their remote) off the garbage list."""
    with index.tx() as db:
        db.executemany("DELETE FROM garbage WHERE name=?", [(n,) for n in names])
