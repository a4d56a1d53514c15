"""Commit and metadata shipping: record a snapshot, then ship the index's changed blocks
(vaultfs/vault/metaship.py) and queue a signed manifest naming its block map.

Ordering invariant enforced here (numbered as in docs/design.md):

3. A snapshot's entries commit only after every chunk they reference is recorded
   (invariant 2, vaultfs/vault/writer.py): a commit seals the write path first.

An index copy is recorded before the manifest naming it is written; a crash between the
two leaves a copy no manifest names, which recovery drops
(:func:`vaultfs.vault.recovery.drop_unnamed_index_copies`).

The chain (docs/format.md 10.3): each manifest's ``prev`` is this index's newest manifest
(``manifest_chain``). Before a snapshot is recorded, :meth:`Committer.commit` surveys the
reachable remotes (:mod:`vaultfs.chain`) and refuses a stale base (StaleBase), or with
``fork`` records an explicit fork above the remotes' newest manifest. With no remote
reachable the commit goes ahead: the flush checks again before any manifest is placed
(:meth:`vaultfs.vault.uploads.UploadQueue.flush`). A backup starts that survey as it begins
(:meth:`Committer.survey_ahead`), so a slow remote's answer arrives while the files are read
rather than after; a manifest another writer places meanwhile is still found by the flush's
survey, which guards the placement (invariant 7).

Index objects: new meta segments are recorded before the manifest naming them is written; a crash between
the two leaves segments no manifest names, which recovery drops
(:func:`vaultfs.vault.recovery.drop_unnamed_index_copies`). The shipped-objects sidecar is
written last: a crash before it costs the next commit sealing those blocks again. The copy
shipped is kept (``<home>/index.db-export``) and the next export writes only the pages that
changed into it (:meth:`Index.export_to`); a crash at any step of that costs one commit that
copies the whole index.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import chain, chunker, clock, indexblocks, manifest, merkle, names, segment
from ..backends import Backend
from ..errors import InputError, IntegrityError, NotEnoughRemotes, VaultError
from ..index import (
    Index,
    VaultParams,
    chunk_rows,
    exportmap,
    keyring,
    manifests,
    segments,
    snapshots,
)
from ..index import contents as content_table
from ..index import kb as kbroots
from ..index.shipped import ShippedObjects
from ..keys import VaultKeys
from . import metaship
from .epochs import KeyEpochs
from .queue import ShardQueue, fsync_dir, write_durable
from .writer import Writer

log = logging.getLogger("vaultfs.vault")


@dataclass
class Entry:
    """One entry of a snapshot, as :meth:`Committer.commit` records it."""

    path: str | bytes  # os.fsdecode form or raw bytes (stored as names.to_db gives)
    type: str  # 'f', 'd', 'l', 'p' fifo, 'c'/'b' device, 's' socket
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | bytes | None = None
    cids: list[bytes] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None
    xattrs: dict[str, bytes] | dict[bytes, bytes] | None = None
    link: int | None = None  # hard-link group within the snapshot
    rdev: int | None = None  # device number of 'c'/'b' entries


class Committer:
    """Records snapshots and ships the index (its changed blocks and a signed manifest).

    Holds the write path's lock while it does (:attr:`Writer.write_lock`); ``remotes``
    gives the remotes a new manifest is queued for, ``prepush`` starts moving queued
    shards out while a manifest is signed (:meth:`UploadQueue.prepush`), ``shipped`` is the
    sidecar of index objects already sealed."""

    def __init__(
        self,
        index: Index,
        keys: VaultKeys,
        params: VaultParams,
        epochs: KeyEpochs,
        writer: Writer,
        queue: ShardQueue,
        remotes: Callable[[], list[Backend]],
        prepush: Callable[[], None],
        shipped: ShippedObjects,
    ) -> None:
        self.index = index
        self.shipped = shipped
        #: What the last index shipping sealed (None before the first in this process).
        self.last_shipped: metaship.ShipStats | None = None
        self.keys = keys
        self.params = params
        self.epochs = epochs
        self.writer = writer
        self.queue = queue
        self.remotes = remotes
        self.prepush = prepush
        #: the base check's survey, started by :meth:`survey_ahead` for the next commit
        self._ahead: Callable[[], chain.Survey] | None = None

    def survey_ahead(self) -> Callable[[], chain.Survey]:
        """Start the next commit's base check now, on a thread (:func:`chain.survey_ahead`),
        for a caller with work to do before it commits (a backup reading its files). The
        commit then uses what it found instead of surveying the remotes itself; the returned
        function waits for the survey and returns it."""
        self._ahead = chain.survey_ahead(self.keys, self.index, self.remotes())
        return self._ahead

    @property
    def epoch(self) -> int:
        return self.epochs.epoch

    @property
    def suite(self) -> int:
        return self.epochs.suite

    @property
    def queue_dir(self) -> Path:
        return self.queue.dir

    def commit(
        self,
        entries: Iterable[Entry],
        name: str | None = None,
        prepush: bool = False,
        kb: dict | None = None,
        fork: bool = False,
    ) -> tuple[str, int]:
        """Record a snapshot of ``entries``, then export and sign the index.
        ``kb``: the snapshot's knowledge-base summary, recorded with it and signed in this and
        every later manifest while the snapshot exists (docs/format.md 10.2).

        Returns (snapshot uid, manifest seq). Everything is durable locally when this
        returns; a flush places it on the remotes. ``prepush`` starts moving the shards to
        the remotes (for a caller that flushes right after) as soon as the open segment is
        sealed, before the base check: the data shards go out while a slow remote answers
        it. A refused commit leaves them on the remotes unnamed (a later ``--fork`` names
        them; another home's verify reports them as foreign and its repair moves them to
        ``quarantine/``, from where the ``--fork`` copies them back first:
        :func:`take_back_quarantined`). Raises StaleBase, recording no snapshot, when the reachable remotes
        hold a manifest newer than this chain's base (:meth:`Survey.stale`), unless ``fork``:
        then the manifest is an explicit fork of the newest of them (its body's ``fork``),
        numbered above it, and supersedes this home's manifests not yet placed.
        """
        if name is not None:
            names.check_snapshot_name(name)
        with self.writer.write_lock:
            self.writer.seal()  # invariant 3
            if prepush:  # the data goes out while the base check waits for a slow remote
                self.prepush()
            forked = self._check_base(fork)
            if forked is not None:
                take_back_quarantined(self.index, self.remotes())
            uid = secrets.token_hex(4)
            with self.index.tx() as db:
                seq = manifests.next_seq(db)
                if forked is not None:
                    seq = max(seq, forked.seq + 1)
                snap_id = snapshots.add(db, uid, name, clock.now(), seq)  # simulated days: clock.py
                files, size = _add_entries(db, snap_id, entries, self.keys.chunk_id_key)
                if kb is not None:
                    kbroots.add(db, uid, kb)
                root = _vault_root(db)
                snapshots.finish(db, snap_id, root, files, size)
            self._ship_index(seq, root, prepush, forked)
            return uid, seq

    def _check_base(
        self, fork: bool, at: str = "backup refused", nothing: str = "No snapshot was recorded."
    ) -> manifest.Link | None:
        """Survey the reachable remotes; the link to record as an explicit fork, or None when
        the base is current (or no remote answered: the flush checks again). Raises
        StaleBase on a stale base without ``fork`` (:func:`chain.stale_error` with ``at`` and
        ``nothing``)."""
        ahead, self._ahead = self._ahead, None
        found = ahead() if ahead else chain.survey(self.keys, self.index, self.remotes())
        if found.reachable:
            manifests.note_fork(self.index, found.describe())
        stale = found.stale(self.index)
        if not stale:
            return None
        if not fork:
            raise chain.stale_error(stale, at, nothing)
        return max(stale, key=lambda s: (s.manifest.seq, s.name)).link

    def _ship_index(
        self, seq: int, root: bytes, prepush: bool = False, fork: manifest.Link | None = None
    ) -> None:
        """Ship the index as blocks (:func:`metaship.ship`: only those the remotes lack are
        sealed); queue a signed manifest naming its block map, chained to this index's newest
        manifest (``fork``: recorded as an explicit fork of that manifest). ``prepush`` starts
        uploading every queued shard before the manifest is signed."""
        p = self.params
        # the new segments are durable in the queue: record them first (a crash before the
        # manifest is recorded leaves segments no manifest names; recover() drops them), then
        # sign the manifest while the shards already go out (prepush: rclone runs beside it)
        shipment = self._ship_once(seq)
        self.last_shipped = shipment.stats
        named = shipment.named + [m.seg_id for m in shipment.new]
        if len(shipment.new) > metaship.SETTLE_AFTER:
            # the index now records those segments' shards and audit tags: ship it once more,
            # so that the next commit does not carry them (metaship.SETTLE_AFTER); the
            # manifest names every segment of both passes, so each stays a named one
            again = self._ship_once(seq, shipment)
            shipment.stats.settled = again.stats
            named = sorted(set(again.named) | {m.seg_id for m in shipment.new})
            named += [m.seg_id for m in again.new]
            again.sealed = shipment.sealed | again.sealed  # for the sidecar: the newest place
            shipment = again
        described = self._descriptors(named)
        created_ms = int(time.time() * 1000)
        stored = keyring.slhdsa(self.index) if self.keys.slhdsa_public is not None else None
        prev = manifests.newest_link(self.index)
        body = manifest.Body(
            vault_root=root,
            k=p.k,
            n=p.n,
            segment_size=p.segment_size,
            keyring=tuple(manifest.KeyringEntry(*row) for row in keyring.epochs(self.index)),
            index_length=shipment.length,
            index_block_size=indexblocks.BLOCK_SIZE,
            index_segments=described,
            index_map=tuple(shipment.pages),
            retired_suites=frozenset(self.keys.retired_suites),
            slhdsa_sealed=bytes.fromhex(stored[1]) if stored else None,
            kb=kbroots.summaries(self.index),
            prev=None if prev is None else manifest.Link(*prev),
            fork=fork,
        )
        sealed = list(shipment.sealed.items())
        one_level = json.dumps(body.to_dict()["index"], separators=(",", ":"))
        if len(one_level) > metaship.ONE_LEVEL_MAX:
            level2 = metaship.ship_second_level(
                self.index, self.keys, self.suite, p.segment_size, shipment.pages,
                list(described), self.shipped, self._write_meta_segment,
            )  # fmt: skip
            self._record_meta_segments(seq, level2.new)
            holders = level2.named + [m.seg_id for m in level2.new]
            body = replace(
                body,
                index_segments=self._descriptors(holders),
                index_map=(),
                index_map2=tuple(level2.map2),
                index_segment_pages=tuple(level2.segment_pages),
            )
            named += holders
            sealed += level2.sealed.items()
        if prepush:
            self.prepush()
        blob_m = manifest.encode(self.keys, seq, created_ms, body.to_dict(), self.suite)
        if len(blob_m) > manifest.MAX_BYTES:  # readers would refuse it: never write one
            raise VaultError(
                f"the manifest would be {len(blob_m):,} bytes, more than readers accept"
                f" ({manifest.MAX_BYTES:,}), even with the index described in two levels"
                " (docs/format.md 9.2). Nothing new reached the remotes; the snapshot is kept"
                " locally."
            )
        name = manifest.object_name(seq, secrets.token_hex(4))
        write_durable(self.queue_dir / "manifests" / name, blob_m)
        fsync_dir(self.queue_dir / "manifests")
        with self.index.tx() as db:
            if fork is not None:  # superseded: placing them would put two manifests at a seq
                manifests.unqueue_upto(db, fork.seq)
            manifests.record(
                db, seq, name, time.time(), root, [r.rid for r in self.remotes()],
                manifest.object_hash(blob_m), named,
                None if fork is None else (fork.seq, fork.hash),
            )  # fmt: skip
        self.shipped.record(
            sealed, self.suite, {seg.uid for seg in described + body.index_segments}
        )

    def _ship_once(self, seq: int, earlier: metaship.Shipment | None = None) -> metaship.Shipment:
        """One pass of :func:`metaship.ship` over a fresh copy of the index (``earlier``: this
        commit's pass before it), its new meta segments recorded for manifest ``seq``."""
        export = self.index.export_copy  # kept: the next export patches it (Index.export_to)
        if export is None:
            raise VaultError("internal: an index in memory cannot be shipped")
        exported = self.index.export_to(export)
        shipment = metaship.ship(
            self.index, self.keys, self.suite, self.params.segment_size, export,
            self.shipped, self._write_meta_segment, earlier, exported=exported,
        )  # fmt: skip
        if exported.stamp is not None:  # the next export hashes and copies only what changed
            self.index.remember_export(
                exportmap.ExportMap(
                    exported.stamp,
                    exported.copy,
                    exported.page_size,
                    indexblocks.BLOCK_SIZE,
                    self.suite,
                    shipment.length,
                    metaship.key_id(self.keys.metadata_key),
                    set(exported.touched),
                    shipment.entries,
                )
            )
        self._record_meta_segments(seq, shipment.new)
        return shipment

    def _record_meta_segments(self, seq: int, new: list[metaship.NewMetaSegment]) -> None:
        """Record the meta segments a shipping wrote for manifest ``seq`` (durable in the
        queue already) with their queued shards."""
        p = self.params
        with self.index.tx() as db:
            for m in new:
                segments.insert(
                    db, m.seg_id, m.uid, "meta", m.size, m.used, p.k, p.n, p.ec_alg, self.epoch,
                    m.root, time.time(), manifest=seq,
                )  # fmt: skip
                segments.add_queued_shards(db, m.seg_id, m.rows)

    def _descriptors(self, seg_ids: list[int]) -> tuple[manifest.IndexSegment, ...]:
        """How a manifest names the meta segments ``seg_ids`` (in id order)."""
        return tuple(
            manifest.IndexSegment(
                uid=uid,
                used=used,
                size=size,
                k=k,
                n=n,
                ec_alg=ec_alg,
                shards=tuple(manifest.ShardRef(*s) for s in shards),
            )
            for uid, used, size, k, n, ec_alg, shards in segments.meta_descriptors(
                self.index, seg_ids
            )
        )

    def _write_meta_segment(self, uid: bytes, padded: bytes) -> tuple[int, list, bytes]:
        """Code one padded meta segment and queue its shards durably: (id, shard rows, root)."""
        seg_id = self.writer.next_segment_id()
        rows, seg_root = self.writer.write_shards(seg_id, segment.KIND_META, padded)
        return seg_id, rows, seg_root

    def ship_index(self) -> int:
        """Export and sign the index as a new manifest without recording a snapshot (after a
        snapshot deletion, or to publish the mount's live tree). Returns the manifest seq;
        durable locally when this returns, placed by a flush."""
        with self.writer.write_lock:
            self.writer.seal()
            with self.index.tx() as db:
                seq = manifests.next_seq(db)
                root = _vault_root(db)
            self._ship_index(seq, root)
            return seq

    def delete_snapshots(self, uids: list[str]) -> int:
        """Forget the snapshots ``uids`` (their entries) in one transaction and ship the
        index once; returns the manifest seq.

        Chunks are never freed here: other snapshots and the mount's live tree may use them.
        Raises InputError, and forgets none, when one of the ids names no snapshot; StaleBase,
        and forgets none, on a stale base (checked first, as a commit checks it).
        """
        with self.writer.write_lock:
            self._check_base(False, "snapshot delete refused", "Nothing was deleted.")
            with self.index.tx() as db:
                for uid in uids:
                    if not snapshots.delete(db, uid):
                        raise InputError(f"no snapshot with id {uid!r}: see `vaultfs snapshots`")
            return self.ship_index()


def mark_unshipped(db: sqlite3.Connection) -> None:
    """Inside a transaction that changes where shards are (repair, a segment rewrite):
    note that the index
    copy on the remotes is out of date until the next index shipping (which clears the mark
    in the transaction that records its manifest)."""
    manifests.mark_unshipped(db, time.time())


#: Entries recorded together: the chunk rows of their new contents are looked up in one
#: pass (chunk_rows batches the ids) instead of one padded query per file.
ENTRY_BATCH = 1024


def _add_entries(
    db: sqlite3.Connection, snap_id: int, entries: Iterable[Entry], chunk_id_key: bytes
) -> tuple[int, int]:
    """Record ``entries`` in snapshot ``snap_id``, parents before children; returns (entry
    count, logical bytes of regular files). A file names the content of its chunk list,
    found by its keyed ref (chunker.content_ref under ``chunk_id_key``) or recorded once:
    a file already in the vault, in any snapshot or path, adds no chunk rows."""
    files = size = 0
    dirs: dict[bytes, int] = {}  # directory path -> entries.id (for entries.parent)
    it = iter(entries)
    while batch := list(itertools.islice(it, ENTRY_BATCH)):
        contents = iter(_contents(db, [e for e in batch if e.type == "f"], chunk_id_key))
        for e in batch:
            path = names.raw(e.path)
            parts = names.split_path(path)
            parent = None if parts is None else (dirs.get(parts[0]) if parts[0] else 0)
            content = next(contents) if e.type == "f" else None
            entry_id = snapshots.add_entry(
                db,
                snap_id,
                (
                    names.to_db(path),
                    e.type,
                    e.mode,
                    e.mtime_ns,
                    e.size,
                    None if e.target is None else names.to_db(e.target),
                    e.uid,
                    e.gid,
                    names.xattrs_to_db(e.xattrs),
                    e.link,
                    parent,
                    e.rdev,
                    content,
                ),
            )
            if e.type == "d" and parts is not None:
                dirs[path] = entry_id
            if e.type == "f":
                size += e.size
            files += 1
    return files, size


def _contents(db: sqlite3.Connection, file_entries: list[Entry], chunk_id_key: bytes) -> list[int]:
    """The contents id of each file entry's chunk list, in order, recording the new ones;
    the chunk rows of every new content are looked up together."""
    refs = [chunker.content_ref(chunk_id_key, e.cids) for e in file_entries]
    ids = {r: content_table.find(db, r) for r in refs}
    new = [c for e, r in zip(file_entries, refs, strict=True) if ids[r] is None for c in e.cids]
    rows = chunk_rows(db, list(dict.fromkeys(new))) if new else {}
    out = []
    for e, r in zip(file_entries, refs, strict=True):
        if ids[r] is None:
            try:
                chunk_list = [rows[c] for c in e.cids]
            except KeyError:
                raise IntegrityError("internal: a chunk of the snapshot was not stored") from None
            ids[r] = content_table.add(db, r, e.size, chunk_list)
        out.append(ids[r])
    return out


def _vault_root(db: sqlite3.Connection) -> bytes:
    """The vault root: the Merkle root over the data segments' roots in id order."""
    return merkle.root(segments.data_roots(db))


def take_back_quarantined(index: Index, remotes: list[Backend]) -> int:
    """Before an explicit fork names this home's data: every shard the index holds as placed
    must still be on its remote. A backup refused for a stale base may already have placed
    its data shards, which no signed manifest names yet; another home's ``repair`` moves such
    objects to ``quarantine/`` (it never deletes them). Each one found there, whole and
    hashing to its row, is copied back under its name; the count is returned. Raises
    :class:`NotEnoughRemotes` when a segment would be named with fewer than k shards on the
    remotes that answered (shards still queued here count: the flush places them), so the
    fork never records a snapshot it cannot restore. One listing per remote: forks are rare
    and explicit."""
    found: dict[int, int] = {}  # segment id -> shards on a remote or still queued here
    for sh in segments.live_shards(index):
        if sh.state == "queued":
            found[sh.segment] = found.get(sh.segment, 0) + 1
        else:
            found.setdefault(sh.segment, 0)
    taken = 0
    subs = ("data", "meta", "quarantine/data", "quarantine/meta")
    for b in remotes:
        rows = [sh for sh in segments.live_shards(index, b.rid) if sh.state == "placed"]
        try:
            tree = b.list_tree(subs)
        except VaultError as e:  # its shards are not counted: the others must hold k
            log.warning("fork check: %s not listed (%s)", b.label, e.message)
            continue
        for sh in rows:
            if tree[sh.kind].get(sh.name) == sh.size:
                found[sh.segment] += 1
            elif _take_back(b, sh, tree[f"quarantine/{sh.kind}"]):
                found[sh.segment] += 1
                taken += 1
    layouts = segments.layouts(index, sorted(found))
    short = sorted(s for s, got in found.items() if got < layouts[s][1])
    if short:
        first = short[0]
        raise NotEnoughRemotes(
            f"fork refused: {len(short)} segment(s) of this home's data are on fewer remotes "
            f"than they need (segment {first}: {found[first]} of {layouts[first][1]} shards "
            "found); nothing was recorded. Bring the missing remotes back, or run `vaultfs "
            "verify` and `vaultfs repair`, then fork again"
        )
    if taken:
        log.warning("fork: %d shard object(s) taken back from quarantine/", taken)
    return taken


def _take_back(b: Backend, sh: segments.ShardRow, quarantined: dict[str, int]) -> bool:
    """Copy ``sh`` back from the remote's ``quarantine/`` when it is there whole and intact."""
    q = f"quarantine/{sh.kind}"
    if quarantined.get(sh.name) != sh.size:
        return False
    try:
        data = b.cat(q, sh.name, 0, sh.size + 1)
    except VaultError:
        return False
    if len(data) != sh.size or segment.object_hash(data) != sh.hash:
        return False
    b.put_bytes(sh.kind, sh.name, data)
    return True
