"""Prune: free the space of chunks that no snapshot and no file of the live tree uses.

Deleting a snapshot (``vaultfs snapshot delete``) only forgets its entries: file contents and
chunks are shared between snapshots and the mount's live tree, so nothing can be freed at that
moment without knowing every other reference. ``vaultfs prune`` does the accounting, with the
vault locked (so no backup or mount adds references meanwhile):

1. **Live contents and chunks**: a content is live while an entry names it
   (``entries.content``); the others are deleted first, in one transaction (a dry run only
   counts them). A chunk is live while a live content lists it (``content_chunks``) or a
   block of the live tree refers to it (``live_blocks``, which names chunks, not contents).
   Nothing else keeps a chunk alive.
2. **Plan**, per data segment: no live chunk → *drop* it; live records taking less than
   ``repack_below`` of its bytes → *repack*: its live records are copied, as they are
   (records are self-contained and already encrypted), into new full segments together with
   those of other sparse segments of the same key epoch; otherwise *keep* it (its dead chunk
   rows stay, so a later backup can still deduplicate against them).
3. **Rewrite**, group by group (``Vault.rewrite_segments``): the new segment's shards are
   durable in the queue before one transaction repoints the live chunks, deletes the dead
   chunk rows and the old segments, and lists the old placed shards in ``garbage``.
4. **Publish and collect**: a new index copy and manifest are shipped and placed; only then are
   the garbage objects deleted from the remotes (``rotation.collect_garbage``, invariant 8 of
   docs/design.md). A remote that is down keeps its garbage until a later prune; while the
   remotes hold a fork (manifests off this index's chain, which may use the same objects)
   every remote keeps it (``garbage_left``): prune never deletes what another branch's
   validly signed manifest may reference.

Crash states: a crash before a group's transaction leaves the old segments in use and orphan
queue files (removed at the next open); after it, the old objects wait in ``garbage``, and
the index is marked unshipped (the signed vault root no longer covers its data segments):
the next prune ships the index even when it has nothing left to rewrite, and collects the
garbage once that manifest is placed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .errors import ImmutableVault, IntegrityError
from .index import audit, chunks, contents, manifests, segments
from .index import remotes as remote_rows
from .remotes import Remote
from .vault import Vault

#: A segment whose live records take less than this share of its bytes is repacked.
REPACK_BELOW = 0.5


@dataclass
class PruneReport:
    dry_run: bool
    segments: int = 0  # data segments looked at
    contents_freed: int = 0  # file contents no entry named, deleted
    dropped: int = 0  # segments with no live chunk, deleted
    repacked: int = 0  # sparse segments whose live records moved to new segments
    written: int = 0  # new segments those went into
    chunks_freed: int = 0  # chunk rows deleted
    bytes_freed: int = 0  # plaintext bytes of those chunks
    stored_freed: int = 0  # segment bytes freed (padded, per copy of the data)
    manifest_seq: int | None = None
    garbage_deleted: int = 0  # objects deleted from remotes
    garbage_left: int = 0  # objects still to delete (a remote was down, or not yet safe)
    garbage_held: str = ""  # why none was deleted this time (chain.Survey.hold)
    #: of garbage_left: objects whose replacing manifest is still queued (`vaultfs flush`)
    garbage_waiting: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    # per remote (label): bytes of the shard objects of dropped and repacked segments, which
    # leave it, and of the new segments' shard objects placed there instead
    remote_deleted: dict[str, int] = field(default_factory=dict)
    remote_written: dict[str, int] = field(default_factory=dict)
    # per remote (label): bytes of those old objects still there, their deletion deferred to
    # a later prune (the remote was down, or the remotes hold a fork)
    remote_deferred: dict[str, int] = field(default_factory=dict)

    @property
    def freed_per_remote(self) -> dict[str, int]:
        """Net bytes each remote holds less now: the old objects deleted, less the new
        segments' objects placed there; deferred deletions do not count (in a dry run: once
        the old objects are deleted, before the repacked segments' new objects)."""
        out = dict(self.remote_deleted)
        for r, b in [*self.remote_written.items(), *self.remote_deferred.items()]:
            out[r] = out.get(r, 0) - b
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "freed_per_remote": self.freed_per_remote}


def prune(
    v: Vault,
    repack_below: float = REPACK_BELOW,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    forgetting: tuple[str, ...] = (),
) -> PruneReport:
    """Free what nothing refers to; see the module docstring. ``v`` must be opened with the
    lock (a writer). ImmutableVault for an immutable vault: freeing is deleting.
    ``forgetting`` (a dry run only): count as if the snapshots of those uids were forgotten
    already (`forget --dry-run --prune`)."""
    from . import rotation

    if v.immutable:
        raise ImmutableVault(
            "this vault is immutable: prune would delete objects from its remotes, which it "
            "never does. `vaultfs forget` still drops snapshots from the index; space on the "
            "remotes is freed by retiring the whole vault once its locks end, with separate credentials "
            '(docs/operations.md, "Immutable vaults")'
        )
    if not 0 <= repack_below <= 1:
        raise ValueError("repack_below is a fraction between 0 and 1")
    if forgetting and not dry_run:
        raise ValueError("forgetting is for a dry run: forget the snapshots first")
    report = PruneReport(dry_run)
    v.seal()
    if dry_run:
        report.contents_freed = contents.unreferenced(v.index, forgetting)
    else:  # before the live chunks are known: a dead content must not outlive its chunks
        report.contents_freed = contents.delete_unreferenced(v.index)
    live = chunks.referenced(v.index, forgetting)
    segs = segments.data_segments(v.index)
    report.segments = len(segs)
    rows: dict[int, list[tuple[bytes, int, int, int]]] = defaultdict(list)
    for sid, cid, off, ln, plain in chunks.in_data_segments(v.index):
        rows[sid].append((bytes(cid), off, ln, plain))

    drop: list[int] = []
    sparse: dict[int, list[int]] = defaultdict(list)  # epoch -> segments to repack
    for sid, size, used, epoch in segs:
        keep = [r for r in rows[sid] if r[0] in live]
        dead = [r for r in rows[sid] if r[0] not in live]
        live_bytes = sum(r[2] for r in keep)
        if not keep:
            drop.append(sid)
        elif dead and live_bytes < repack_below * max(used, 1):
            sparse[epoch].append(sid)
        else:
            continue
        report.chunks_freed += len(dead)
        report.bytes_freed += sum(r[3] for r in dead)
        report.stored_freed += size
    report.dropped = len(drop)
    report.repacked = sum(len(s) for s in sparse.values())
    groups = _groups(v, sparse, rows, live)
    report.written = len(groups)
    labels = {r.id: Remote(r.spec).label for r in remote_rows.every(v.index)}
    gone = drop + [sid for sids in sparse.values() for sid in sids]
    report.remote_deleted = {
        labels[rid]: b for rid, b in segments.bytes_by_remote(v.index, gone).items()
    }
    if dry_run:
        report.stored_freed -= sum(_size_class(v, sum(g[2].values())) for g in groups)
        return report
    old_objects = segments.placed_objects(v.index, gone)  # listed as garbage by the rewrites
    done = 0
    total = len(drop) + len(groups)
    if drop:
        v.rewrite_segments(drop, [], v.epoch)
        done += len(drop)
        if progress:
            progress(done, total)
    for epoch, olds, wanted in groups:
        records = []
        for sid in olds:
            data = v.segment_bytes(sid)
            for cid, off, ln, plain in rows[sid]:
                if cid in wanted:
                    records.append((cid, bytes(data[off : off + ln]), plain))
        new = v.rewrite_segments(olds, records, epoch)
        if new is not None:
            made = segments.geometry(v.index, new)
            assert made is not None
            report.stored_freed -= made[1]  # its size
            for rid, b in segments.bytes_by_remote(v.index, [new]).items():
                report.remote_written[labels[rid]] = report.remote_written.get(labels[rid], 0) + b
        done += len(olds)
        if progress:
            progress(done, total)
    # the rewrites mark the index unshipped, and so did those of a prune that died before
    # shipping it: either way the remotes' index copy still names the old segments
    if manifests.unshipped_since(v.index) is not None:
        report.manifest_seq = v.ship_index()
        rep = v.flush()
        report.errors.update(rep.errors)
        audit.forget_orphans(v.index)
    elif manifests.pending_uploads(v.index):
        # a manifest still queued (a remote was down at an earlier prune or backup) holds
        # back every old object it replaces: send it first, as `vaultfs flush` would
        report.errors.update(v.flush().errors)
    gc = rotation.collect_garbage(v)
    report.garbage_deleted, report.garbage_left, report.garbage_held = gc.deleted, gc.left, gc.held
    report.garbage_waiting = gc.waiting
    for name, rid, _kind, _seq in manifests.garbage(v.index):
        if (size := old_objects.get((rid, name))) is not None:
            label = labels[rid]
            report.remote_deferred[label] = report.remote_deferred.get(label, 0) + size
    return report


def _groups(
    v: Vault,
    sparse: dict[int, list[int]],
    rows: dict[int, list[tuple[bytes, int, int, int]]],
    live: set[bytes],
) -> list[tuple[int, list[int], dict[bytes, int]]]:
    """Pack the live records of sparse segments into as few new segments as they fill:
    (epoch, old segment ids, {live chunk id: record length}) per new segment."""
    out = []
    for epoch, sids in sorted(sparse.items()):
        olds: list[int] = []
        wanted: dict[bytes, int] = {}
        fill = 0
        for sid in sids:
            mine = {cid: ln for cid, _off, ln, _pl in rows[sid] if cid in live}
            need = sum(mine.values())
            if need > v.segment_size:
                raise IntegrityError(f"internal: segment {sid} holds more than a segment")
            if olds and fill + need > v.segment_size:
                out.append((epoch, olds, wanted))
                olds, wanted, fill = [], {}, 0
            olds.append(sid)
            wanted.update(mine)
            fill += need
        if olds:
            out.append((epoch, olds, wanted))
    return out


def _size_class(v: Vault, used: int) -> int:
    from . import segment

    return segment.size_class(used, v.segment_size)
