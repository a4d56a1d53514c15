"""Repair: bring every live segment back to n good shards, and change the set of remotes.

`vaultfs repair` (docs/operations.md, "Repair"):

1. **Scan**: a listing audit of every remote (``verify.audit(list_only=True)``) marks missing and
   wrongly sized objects ``lost``; earlier audits' findings (``audit_findings``) stand.
2. **Plan**: a shard needs rebuilding when it is ``lost`` or sits on a remote that left the vault;
   segments are repaired most-at-risk first (fewest healthy shards left).
   A shard on a remote that is only *unreachable* is not rebuilt: it is presumed intact.
3. **Rebuild**: for each such segment fetch k shards whose BLAKE3 matches the index — from the
   local queue first, then from reachable remotes (data fragments first) — and reconstruct only
   the missing fragments (:func:`shardreader.rebuild_fragments`), batch by batch in a bounded
   pipeline (:func:`_rebuild_all`). Fewer than k good shards means the segment is reported
   unrecoverable; nothing is ever zero-filled or guessed. Given the live data (``sources``),
   such a data segment is healed instead: its chunks are re-read from the files by keyed chunk
   id into a new segment (:func:`_heal_from_source`).
4. **Place**: each rebuilt object gets a target remote chosen to spread failure domains (its
   old remote when that one is still a healthy member). It is written durably to the queue,
   and its batch's rows are updated in one transaction (invariant 1,
   vaultfs/vault/writer.py; docs/design.md, "Repair batches"); a background push uploads
   it while later batches are rebuilt, and :meth:`Vault.flush` places it. The fragment is
   the original (ISA-L coding is deterministic). A *missing* object going back to the remote
   that lost it is whitened under its own name again, so it is the lost object byte for
   byte, which the hash its row records proves: its row keeps its hash, Merkle records and
   audit tags, and the segment root is unchanged (:func:`_keepable`). Any other rebuilt
   object (a corrupt one's replacement, one going to another remote, one that does not come
   out as recorded) gets a fresh random name and so a new whitening (docs/format.md 7.1):
   its hash, Merkle records and audit tags are new, the shard row and the segment root
   change in the same transaction, and the manifest published next signs the new vault root.
5. **Publish**: a new manifest and index export go to every remote (``Vault.ship_index``), which
   also heals remotes serving a stale manifest; then replaced objects are deleted and foreign
   ones moved to ``quarantine/`` on their remote (never deleted: an object repair does not
   recognise may be another writer's). While the remotes hold a fork (manifests off this
   index's chain, :mod:`vaultfs.chain`) nothing is deleted at all.

Remote set changes (`vaultfs remote add/remove/replace`) are here too: they are repairs with a
different target.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import chain, merkle, segment, verify
from .audittag import PIECE as AUDIT_PIECE
from .audittag import piece_tags
from .backends import Backend, open_backend
from .errors import (
    BadRemote,
    IntegrityError,
    NotEnoughRemotes,
    NoVault,
    RemoteError,
    Unreachable,
    VaultError,
)
from .index import audit as audit_table
from .index import chunks as chunk_table
from .index import manifests as manifest_table
from .index import remotes as remote_table
from .index import segments as segment_table
from .index import snapshots as snapshot_table
from .index.segments import ShardRow
from .names import display, from_db
from .objectlock import lock_spec
from .remotes import Remote, check_distinct, resolve_remote
from .restore import READ_IN_PLACE, read_object, remote_index_description
from .scratch import owned_scratch
from .sealer import ShardFile, keep_freed_buffers, worker_pool
from .shardreader import (
    Lie,
    ShardRef,
    ShardsUnavailable,
    ShardsUndecodable,
    Transport,
    choose,
    rebuild_fragments,
)
from .vault.health import design_losses
from .vault.placement import remotes_needed, restore_needs_now
from .vault.queue import sync_dirs, sync_files, write_durable

if TYPE_CHECKING:
    from .vault import Vault

#: Segments per batch: one download per remote and one index transaction each.
BATCH_SEGMENTS = 8
#: Segments of the first batch: few, so the rebuilt shards start uploading (the rebuilt
#: remote's link is a network repair's bound) while the next batch is still fetched.
FIRST_BATCH = 2
#: Worker processes rebuilding segments (``VAULTFS_REBUILDERS``; 0: one thread of the
#: repairing process): one per core, at least two, at most a batch's segments. A segment's
#: rebuild is ~9 ms of CPU per shard object, about half of it in calls that hold the GIL
#: (pyeclib's reconstruction, the audit tags), so threads of one process used ~1.4 cores at
#: most; processes read their sources, rebuild and write the new objects themselves, and
#: hand back only their names, hashes, Merkle leaves and tags (docs/benchmarks.md, "audit").
REBUILDERS = int(
    os.environ.get("VAULTFS_REBUILDERS", max(2, min(os.cpu_count() or 2, BATCH_SEGMENTS)))
)
#: The rebuild workers' nice value for background work (the mount daemon's maintenance):
#: the FUSE side's requests and stores come first (docs/mount.md, "Foreground first").
BACKGROUND_NICE = 10
#: Batches handed to the rebuild workers and not yet committed: one being committed (its
#: objects fsync'd, its transaction) while the workers rebuild the next two, so they never
#: wait for a commit (docs/benchmarks.md, "audit").
FLIGHT = 3
#: The same for batches whose sources are all read where they lie (local-directory remotes,
#: the local queue: nothing staged, so a deeper queue costs no disk). A batch's fsync
#: sometimes waits a quarter of a second on the kernel's writeback of earlier objects; with
#: two batches queued the workers ran dry meanwhile (measured, docs/benchmarks.md, "audit").
FLIGHT_IN_PLACE = 8
#: Threads fsyncing a commit's new objects at once (:func:`vault.queue.sync_files`): about one
#: per object of a batch that lost one shard per segment.
FSYNC_THREADS = BATCH_SEGMENTS
#: Batches one commit takes at most: the batch it waited for and those behind it already
#: rebuilt by then (a group commit). A commit's fixed cost (the queue directories' fsyncs,
#: the index transaction's) waits behind the disk's writeback of the rebuilt objects; one
#: commit per batch was the rebuild's bound on a local disk, the workers idle a third of
#: the time waiting for commits (docs/benchmarks.md, "audit").
GROUP_BATCHES = FLIGHT_IN_PLACE


def keep_rebuild_buffers() -> None:
    """For a command process about to run :func:`repair` (not the mount's daemon): buffers up
    to 2 MiB (a shard object of a 4 MiB segment and the fragments around it) are reused from
    the heap, which keeps at most 32 MiB free at its top, in two malloc arenas for all the
    threads. Measured when the rebuild ran on this process's threads (192 MB rebuilt, against
    8 MiB kept in an arena per thread): 210,000–360,000 minor page faults down to
    79,000–102,000, ~12% less CPU time, a lower peak RSS (docs/benchmarks.md, "audit"). The
    rebuild workers are processes now (:data:`REBUILDERS`, which tune their own malloc as the
    sealers do); this process still unlocks the keyfile (scrypt's 128 MiB), stages sources
    and rebuilds the segments a worker gives back (:func:`_rebuild_widened`)."""
    keep_freed_buffers(2 << 20, 32 << 20, arenas=2)


@dataclass
class RepairItem:
    segment: int
    kind: str
    idx: int
    old: str  # object path on the old remote
    old_remote: str
    reason: str
    target: str
    bytes: int
    new: str | None = None  # the rebuilt object's path (None in a dry run: not yet named)
    #: rebuilt under its own name, byte for byte as recorded (:func:`_keepable`); otherwise
    #: under a fresh one (docs/format.md 7.1). A dry run says what the rebuild would do
    keep_name: bool = False


@dataclass
class RepairReport:
    dry_run: bool
    items: list[RepairItem] = field(default_factory=list)
    segments: int = 0
    rebuilt: int = 0
    retargeted_queued: int = 0
    unrecoverable: list[str] = field(default_factory=list)
    unrecoverable_segments: list[int] = field(default_factory=list)
    healed_from_source: int = 0  # chunks re-read from --source files into new segments
    damaged_files: list[str] = field(default_factory=list)  # "snapshot:path" still unreadable
    bad_sources: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    bytes_written: int = 0
    deleted: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # moved to quarantine/, not deleted
    retained: list[str] = field(default_factory=list)  # replaced, kept (an immutable vault)
    fork: list[str] = field(default_factory=list)  # manifests off this chain (chain.Survey)
    not_found: int = 0  # `remote remove`: objects the departed remote held, absent from it
    not_cleared: str | None = None  # `remote remove`: the departed remote, its objects left
    manifest_seq: int | None = None
    pending: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.unrecoverable
            and not any(self.pending.values())
            and not self.not_found
            and not self.not_cleared
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _choose_target(
    vault: Vault,
    seg_id: int,
    idx: int,
    holders: list[int],
    active: list[tuple[int, str, str]],
    down: set[int],
    prefer: int | None,
) -> int | None:
    """Remote for shard ``idx`` of ``seg_id``: fewest shards of the segment in its failure
    domain, then on itself; ties go to ``prefer``, then to the placement rule's choice."""
    from .vault import place

    usable = [(rid, dom) for rid, _s, dom in active if rid not in down]
    if not usable:
        return None
    dom_of = {rid: dom for rid, _s, dom in active}
    per_dom: dict[str, int] = defaultdict(int)
    per_rem: dict[int, int] = defaultdict(int)
    for h in holders:
        if h in dom_of:
            per_dom[dom_of[h]] += 1
            per_rem[h] += 1
    rule = place([(rid, dom) for rid, _s, dom in active], seg_id, vault.n)[idx]
    pos = {rid: i for i, (rid, _d) in enumerate(usable)}
    return min(
        (rid for rid, _d in usable),
        key=lambda r: (per_dom[dom_of[r]], per_rem[r], r != prefer, r != rule, pos[r]),
    )


def _retarget_queued(vault: Vault, removed: set[int], prefer: int | None) -> int:
    """Move queued shard files of removed remotes to active ones (no rebuild needed)."""
    if not removed:
        return 0
    active = remote_table.members(vault.index)
    moved = 0
    rows = segment_table.queued_on(vault.index, removed)
    for sh in rows:
        holders = segment_table.holders(vault.index, sh.segment, skip_idx=sh.idx)
        tgt = _choose_target(vault, sh.segment, sh.idx, holders, active, set(), prefer)
        if tgt is None:
            break
        src = vault.queue_dir / f"r{sh.remote}" / sh.kind / sh.name
        dst_dir = vault.queue_dir / f"r{tgt}" / sh.kind
        dst_dir.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.replace(src, dst_dir / sh.name)
        with vault.index.tx() as db:
            segment_table.move(db, sh.id, tgt)
            vault.mark_unshipped(db)
        moved += 1
    return moved


def _plan(vault: Vault, down: set[int]) -> dict[int, list[tuple[ShardRow, str]]]:
    """segment id -> [(shard needing a rebuild, reason)]: lost shards, shards on a remote
    that left the vault, and shards to spread (:func:`_spread`)."""
    removed = remote_table.removed(vault.index)
    reasons = {
        sid: f"{kind}: {detail}" if detail else kind
        for sid, kind, detail in audit_table.findings(vault.index)
    }
    rows = segment_table.live_shards(vault.index)
    out: dict[int, list[tuple[ShardRow, str]]] = defaultdict(list)
    for sh in rows:
        if sh.remote in removed and sh.state != "queued":
            out[sh.segment].append((sh, "its remote left the vault"))
        elif sh.state == "lost":
            out[sh.segment].append((sh, reasons.get(sh.id, "lost")))
    for sh, reason in _spread(vault, rows, down, set(out)):
        out[sh.segment].append((sh, reason))
    return out


def _spread(
    vault: Vault, rows: list[ShardRow], down: set[int], planned: set[int]
) -> list[tuple[ShardRow, str]]:
    """Placed shards to move so that each segment's shards spread over the failure domains
    the vault has: a segment with two (or more) shards more in one domain than in another
    that answers survives fewer domain losses than the placement rule gives it, as after a
    `remote remove` squeezed its shards onto fewer remotes and a `remote add` brought the
    domains back. One shard leaves the fullest domain for each such difference (it is
    rebuilt from the others under a new name on a remote :func:`_choose_target` picks, the
    emptiest domain, and the old object goes once the new one is placed, as for a corrupt
    one). Segments already ``planned`` for other reasons are placed by that rebuild; a
    vault whose domains are all balanced (``max - min <= 1``) moves nothing, so this
    costs a repair nothing in the usual case."""
    members = remote_table.members(vault.index)
    dom_of = {rid: dom for rid, _s, dom in members}
    usable = {dom for rid, dom in dom_of.items() if rid not in down}
    if len(usable) < 2:
        return []
    by_seg: dict[int, list[ShardRow]] = defaultdict(list)
    for sh in rows:
        if sh.segment not in planned and sh.remote in dom_of and sh.state in ("placed", "queued"):
            by_seg[sh.segment].append(sh)
    out: list[tuple[ShardRow, str]] = []
    for shards in by_seg.values():
        count: dict[str, int] = dict.fromkeys(usable, 0)
        for sh in shards:
            count[dom_of[sh.remote]] = count.get(dom_of[sh.remote], 0) + 1
        movable = sorted((sh for sh in shards if sh.state == "placed"), key=lambda s: -s.idx)
        while movable:
            hi = max(count, key=lambda d: count[d])
            lo = min(usable, key=lambda d: count[d])
            if count[hi] - count[lo] < 2:
                break
            sh = next((m for m in movable if dom_of[m.remote] == hi), None)
            if sh is None:  # only queued shards there: the flush places them first
                break
            movable.remove(sh)
            out.append((sh, f"spread: {count[hi]} shards of its segment in failure domain {hi}"))
            count[hi] -= 1
            count[lo] += 1
    return out


class _Fetcher:
    """Repair's shard transport: shard objects from the local queue or from the remotes'
    backends, with the bytes counted and unreachable remotes remembered in :attr:`down`."""

    def __init__(
        self, vault: Vault, down: set[int], wrap, report: RepairReport, departing: int | None
    ) -> None:
        self.vault = vault
        self.departing = departing
        self.down = down
        self.report = report
        self.specs = remote_table.specs(vault.index)
        self.labels = {rid: Remote(spec).label for rid, spec in self.specs.items()}
        self.backends: dict[int, object] = {}
        self.wrap = wrap
        self.lock = threading.Lock()

    def backend(self, rid: int):
        """Remote ``rid``'s backend: the rclone daemon's when one runs, whose connections
        stay open from one batch's download to the next (a command per download would pay a
        new connection and a cold congestion window each time over a network link)."""
        with self.lock:
            b = self.backends.get(rid)
            if b is None:
                b = self.backends[rid] = open_backend(self.specs[rid], rid, wrap=self.wrap)
            return b

    def sources(self, seg_id: int, exclude: set[int]) -> list[ShardRef]:
        """The shards of a segment to read it from (``ShardRef.tag``: the shard row): placed or
        queued, on a reachable remote, not in ``exclude`` (the shards being rebuilt) unless on
        the departing remote (still readable; the rebuild gives its fragment a new object)."""
        return [
            ShardRef(r.idx, r.name, r.hash, self.labels[r.remote], r.state == "queued", r, r.size)
            for r in segment_table.records(self.vault.index, seg_id)
            if r.state in ("placed", "queued")
            and (r.id not in exclude or r.remote == self.departing)
            and r.remote not in self.down
        ]

    def fetch(self, wanted: Sequence[ShardRef], into: Path) -> dict[str, segment.Body | str]:
        """Bodies of the wanted shards, by name, unverified, each read only up to the size the
        index records (:func:`restore.read_object`; a name mapped to a ``str`` was refused for
        the reason given); those not had are left out. Where they come from:
        :meth:`locate`; a downloaded file is removed once read."""
        got: dict[str, segment.Body | str] = {}
        sizes = {ref.name: ref.tag.size for ref in wanted}
        for name, p in self.locate(wanted, into).items():
            got[name] = read_object(p, sizes[name])
            if p.is_relative_to(into):
                p.unlink(missing_ok=True)
        return got

    def locate(self, wanted: Sequence[ShardRef], into: Path) -> dict[str, Path]:
        """Where the wanted shards can be read, by name: a queued shard in the local queue
        only, none from a remote known down; a plain local-directory remote's objects where
        they lie (as restore reads them, :data:`restore.READ_IN_PLACE`), the others'
        downloaded into ``into`` first, one transfer per remote (the caller removes
        ``into``); the objects not had are left out. Nothing is read or verified here (a
        rebuild worker reads each object itself, :func:`restore.read_object`, which says why
        a file will not do); the bytes counted as fetched are those of the files found at the
        size the index records."""
        got: dict[str, Path] = {}
        per_remote: dict[int, list[ShardRow]] = defaultdict(list)
        for ref in wanted:
            sh: ShardRow = ref.tag
            q = self.vault.queue_dir / f"r{sh.remote}" / sh.kind / sh.name
            if sh.state == "queued" and q.exists():
                got[sh.name] = q
            elif sh.remote not in self.down:
                per_remote[sh.remote].append(sh)

        def pull(item: tuple[int, list[ShardRow]]) -> None:
            rid, shards = item
            b = self.backend(rid)
            here = b.local_dir if READ_IN_PLACE else None
            d = into / f"r{rid}"
            if here is None:
                d.mkdir(parents=True, exist_ok=True)
                try:
                    for sub in segment.KIND_NAMES.values():
                        names = [s.name for s in shards if s.kind == sub]
                        if names:
                            b.get(sub, names, d)
                except Unreachable:
                    with self.lock:
                        self.down.add(rid)
                except RemoteError as e:
                    with self.lock:
                        self.report.errors[self.labels[rid]] = e.message
            in_place = 0
            for s in shards:
                p = here / s.kind / s.name if here is not None else d / s.name
                try:
                    size = p.stat().st_size
                except OSError:
                    if here is None:
                        continue  # not downloaded: missing, for no reason known here
                    size = -1
                with self.lock:
                    if size == s.size:
                        self.report.bytes_fetched += s.size
                    got[s.name] = p
                if here is not None and size > 0:
                    in_place += min(size, s.size)  # the workers read no more than the index says
            if in_place and self.wrap is not None:
                # background work (the mount daemon's share, backends.Throttled): bytes the
                # workers will read in place are charged before they get the paths, as a
                # download would be; a foreground repair (no wrap) pays nothing here
                charge = getattr(b, "read_in_place", None)
                if charge is not None:
                    charge(in_place)

        with ThreadPoolExecutor(max_workers=max(1, len(per_remote))) as ex:
            list(ex.map(pull, per_remote.items()))
        return got


class _SegmentShards:
    """This process's transport for one segment's rebuild: the fetcher, one round at a time,
    downloading into ``into``."""

    def __init__(self, fetcher: _Fetcher, into: Path) -> None:
        self.fetcher, self.into = fetcher, into

    def fetch(self, refs: Sequence[ShardRef]) -> dict[str, segment.Body | str]:
        return self.fetcher.fetch(refs, self.into)


def _mark_lost(vault: Vault, sh: ShardRow, kind: str, detail: str) -> None:
    with vault.index.tx() as db:
        audit_table.record_finding(db, sh.id, sh.remote, kind, detail, time.time())


def _note_bad_sources(vault: Vault, fetcher: _Fetcher, lies: list[Lie]) -> None:
    """Report and mark lost every remote copy the shard reader found corrupt."""
    for lie in lies:
        if lie.kind == "corrupt" and not lie.ref.local:
            sh: ShardRow = lie.ref.tag
            with fetcher.lock:
                fetcher.report.bad_sources.append(f"{lie.ref.holder}:{sh.path}")
            _mark_lost(vault, sh, "corrupt", "found corrupt while used as a source")


@dataclass
class _Job:
    """One segment's rebuild as a worker process gets it: the segment's coding, the fragment
    indices to rebuild, its sources (:meth:`_Fetcher.sources`) and where its batch put the
    ones fetched ahead (:meth:`_Fetcher.locate`)."""

    seg_id: int
    kind: str
    k: int
    n: int
    alg: int
    missing: list[int]
    refs: list[ShardRef]
    located: dict[str, Path]
    #: the rows of ``missing`` shards rebuilt under their own names if they come out as
    #: recorded (:func:`_keepable`)
    keep: dict[int, ShardRow] = field(default_factory=dict)


@dataclass
class _Rebuild:
    """One segment's rebuild as a worker leaves it: the new shard objects, written to the
    queue's ``tmp/`` (not fsync'd, not queued; in ``missing`` order), the sources found lying,
    or why the segment could not be rebuilt (``failed``). ``widen``: the objects fetched ahead
    did not do, and the worker has no transport to fetch more (the parent rebuilds the
    segment itself, :func:`_rebuild_widened`)."""

    seg_id: int
    shards: list[ShardFile] = field(default_factory=list)
    lies: list[Lie] = field(default_factory=list)
    failed: str | None = None
    widen: bool = False
    #: names of the shards rebuilt under their own names, byte for byte as recorded: their
    #: rows, Merkle records and audit tags stand (``tags`` is empty)
    kept: set[str] = field(default_factory=set)


class _Widen(Exception):
    """A rebuild worker needs a shard its batch did not fetch ahead."""


class _Located:
    """A worker's transport: the objects its batch located, read here with
    :func:`restore.read_object`; asking for any other raises :class:`_Widen`."""

    def __init__(self, located: dict[str, Path]) -> None:
        self.located = located

    def fetch(self, refs: Sequence[ShardRef]) -> dict[str, segment.Body | str]:
        if any(r.name not in self.located for r in refs):
            raise _Widen
        return {r.name: read_object(self.located[r.name], r.tag.size) for r in refs}


#: A rebuild worker's (audit key, queue tmp directory), set by :func:`_worker_init`.
_worker: tuple[bytes, Path] | None = None


def _worker_init(audit_key: bytes, tmp: Path) -> None:
    global _worker
    _worker = (audit_key, tmp)


def _rebuild_job(job: _Job) -> _Rebuild:
    """In a rebuild worker (:data:`REBUILDERS`): rebuild one segment's missing shards from the
    objects its batch fetched ahead, into the queue's ``tmp/``, not yet fsync'd
    (:func:`_rebuild_all` fsyncs a batch's objects together). Reads only files: never the
    index, never a remote."""
    assert _worker is not None
    audit_key, tmp = _worker
    try:
        return _rebuild(job, _Located(job.located), audit_key, tmp)
    except _Widen:
        return _Rebuild(job.seg_id, widen=True)


def _rebuild(job: _Job, transport: Transport, audit_key: bytes, tmp: Path) -> _Rebuild:
    """Rebuild the shards ``job.missing`` of one segment from its sources through
    ``transport``, into ``tmp`` (not fsync'd).

    Only the missing fragments are reconstructed (:func:`shardreader.rebuild_fragments`). A
    shard of ``job.keep`` is first whitened under its own name: the code and the whitening
    are deterministic, so it comes out as the object that was lost, which its hash recorded
    in the row proves; its Merkle records and audit tags then stand. Any other (or one that
    does not come out as recorded: another liberasurecode, say) gets a new name and so a new
    whitening (docs/format.md 7.1): new bytes, hash, Merkle leaves and audit tags."""
    out = _Rebuild(job.seg_id)
    try:
        got = rebuild_fragments(
            job.refs,
            job.k,
            job.n,
            job.missing,
            transport,
            f"{job.kind} segment {job.seg_id}",
            alg=job.alg,
            audit_key=audit_key,
        )
    except (ShardsUnavailable, ShardsUndecodable) as e:
        out.lies, out.failed = e.lies, e.message
        if job.n == 1:  # docs/format.md 7.5: one copy, no other fragment exists anywhere
            out.failed += (
                ": a 1-of-1 segment is one copy and cannot be rebuilt; restore it from "
                "another tier or a live copy (--source)"
            )
        return out
    out.lies = got.lies
    for idx in job.missing:
        row = job.keep.get(idx)
        if row is not None:
            body = segment.stored_object(idx, row.name, got.fragments[idx], audit_key)
            if segment.object_hash(body) == row.hash:
                write_durable(tmp / row.name, body, fsync=False)  # the batch's sync_files
                out.shards.append(
                    ShardFile(idx, row.name, len(body), row.hash, row.blocks, row.root, b"")
                )
                out.kept.add(row.name)
                continue
        name = segment.new_name()
        st = segment.stored_shard(idx, name, got.fragments[idx], audit_key)
        write_durable(tmp / name, st.body, fsync=False)  # the batch's sync_files
        tags = piece_tags(audit_key, st.body, st.blocks)
        out.shards.append(ShardFile(idx, name, len(st.body), st.hash, st.blocks, st.root, tags))
    return out


def _rebuild_widened(vault: Vault, job: _Job, fetcher: _Fetcher, into: Path) -> _Rebuild:
    """Rebuild a segment a worker gave back (``widen``) on this thread, fetching its sources
    again and more as the shard reader needs them (rare: a source fetched ahead was missing
    or corrupt)."""
    return _rebuild(job, _SegmentShards(fetcher, into), vault.keys.audit_key, vault.queue.tmp)


@dataclass
class _Batch:
    """A batch as its download leaves it: the staging directory ``dir`` and each segment's
    job with the objects located for it, beside the shards it rebuilds."""

    dir: Path
    jobs: list[tuple[_Job, list[tuple[ShardRow, str]]]]
    #: some of its sources were downloaded into ``dir`` (not read where they lie)
    staged: bool = False


@dataclass
class _Queued:
    """A rebuilt object renamed into its target's queue directory, its row not yet updated."""

    seg_id: int
    row: ShardRow
    reason: str
    shard: ShardFile
    target: int
    #: rebuilt under its own name, as recorded (:func:`_rebuild`): the row only goes queued
    kept: bool = False


def _enqueue(
    vault: Vault,
    job: _Job,
    todo: list[tuple[ShardRow, str]],
    rb: _Rebuild,
    fetcher: _Fetcher,
    report: RepairReport,
    prefer: int | None,
    active: list[tuple[int, str, str]],
    dirs: set[Path],
) -> list[_Queued]:
    """Choose a target for each object of one finished rebuild and rename it into that
    remote's queue directory (adding the directory to ``dirs``, fsync'd before the batch's
    transaction). A failed rebuild is reported unrecoverable; corrupt sources are marked lost."""
    _note_bad_sources(vault, fetcher, rb.lies)
    if rb.failed is not None:
        report.unrecoverable.append(rb.failed)
        report.unrecoverable_segments.append(rb.seg_id)
        return []
    holders = segment_table.holders(vault.index, rb.seg_id)
    out: list[_Queued] = []
    for (sh, reason), sf in zip(todo, rb.shards, strict=True):
        tgt = _choose_target(vault, rb.seg_id, sh.idx, holders, active, fetcher.down, prefer)
        if tgt is None:
            report.unrecoverable.append(
                f"{job.kind} segment {rb.seg_id}: no reachable remote to hold it"
            )
            for left in rb.shards[len(out) :]:
                (vault.queue.tmp / left.name).unlink(missing_ok=True)
            break
        holders.append(tgt)
        kept = sf.name in rb.kept
        if kept and tgt != sh.remote:  # rare: its remote went down during the rebuild
            sf, kept = _renamed(vault, sf), False
        kind = segment.KIND_DATA if job.kind == "data" else segment.KIND_META
        vault.queue.enqueue(kind, [sf], [tgt], dirs)
        out.append(_Queued(rb.seg_id, sh, reason, sf, tgt, kept))
    return out


def _keepable(
    vault: Vault,
    seg_id: int,
    todo: list[tuple[ShardRow, str]],
    fetcher: _Fetcher,
    active: list[tuple[int, str, str]],
    prefer: int | None,
) -> dict[int, ShardRow]:
    """The shards of segment ``seg_id``'s ``todo`` its rebuild may write again under their
    own names (:attr:`_Job.keep`): those missing from their remote, where
    :func:`_choose_target` puts them back, as it does unless the vault's remotes or failure
    domains changed since they were placed. The object is then the one that remote lost, byte
    for byte: no new whitening, hash, Merkle records or audit tags, and the shard rows and the
    segment root the newest manifest signs stay as they are (docs/format.md 7.1). A corrupt
    object, or one going to another remote, gets a new name: the old one may still be read
    there, or deleted. So does every object of an immutable vault: "missing" may mean only
    that the listing left it out, and a write-once remote refuses to be written the same
    name again (nothing there is ever overwritten, docs/operations.md, "Immutable vaults")."""
    holders = segment_table.holders(vault.index, seg_id)
    keep: dict[int, ShardRow] = {}
    for sh, reason in todo:
        tgt = _choose_target(vault, seg_id, sh.idx, holders, active, fetcher.down, prefer)
        if tgt is None:
            break
        holders.append(tgt)
        if _keeps_name(vault, sh, reason, tgt):
            keep[sh.idx] = sh
    return keep


def _keeps_name(vault: Vault, sh: ShardRow, reason: str, target: int | None) -> bool:
    """Whether shard ``sh``, rebuilt for ``reason`` and placed on ``target``, goes under its
    own name (:func:`_keepable` says when and why)."""
    return not vault.immutable and target == sh.remote and reason.startswith("missing")


def _renamed(vault: Vault, sf: ShardFile) -> ShardFile:
    """A shard rebuilt under its own name (in the queue's ``tmp/``, fsync'd with its batch)
    made again under a new name, whitening, Merkle records and audit tags, fsync'd: for a
    target other than the remote that lost it. The object under the old name is deleted.
    Its bytes read back must still hash as recorded (IntegrityError otherwise: the batch
    fails whole, nothing of it recorded, and the next repair rebuilds it)."""
    key, tmp = vault.keys.audit_key, vault.queue.tmp
    old = tmp / sf.name
    body = old.read_bytes()
    if segment.object_hash(body) != sf.hash:
        raise IntegrityError(f"rebuilt object {old} changed on the local disk before it was queued")
    frag = segment.open_fragment(body, key, sf.name, sf.idx)
    name = segment.new_name()
    st = segment.stored_shard(sf.idx, name, frag, key)
    write_durable(tmp / name, st.body)
    old.unlink()
    tags = piece_tags(key, st.body, st.blocks)
    return ShardFile(sf.idx, name, len(st.body), st.hash, st.blocks, st.root, tags)


def _commit_batch(
    vault: Vault, queued: list[_Queued], dirs: set[Path], fetcher: _Fetcher, report: RepairReport
) -> list[tuple[str, int]]:
    """Make a batch's queued objects durable and record them: one fsync per queue directory,
    then one transaction for all their shard rows, audit tags and segment roots (docs/design.md,
    "Repair batches"). Returns (old path, old remote) of objects to delete once the new ones
    are placed."""
    if not queued:
        return []
    sync_dirs(dirs)
    fresh = [q for q in queued if not q.kept]
    with vault.index.tx() as db:
        # a shard rebuilt under its own name keeps its hash, Merkle records and audit tags
        audit_table.put_tags(db, [(q.shard.name, AUDIT_PIECE, q.shard.tags) for q in fresh])
        for q in queued:
            sf = q.shard
            segment_table.requeue(db, q.row.id, sf.name, q.target, sf.hash, sf.blocks, sf.root)
            audit_table.forget_findings(db, [q.row.id])
        audit_table.forget_tags(db, [q.row.name for q in fresh])
        for seg_id in sorted({q.seg_id for q in queued}):
            # the segment root follows its shard roots in the same transaction (the
            # connection is shared, so the query sees the rows just changed)
            roots = segment_table.shard_roots(vault.index, seg_id)
            segment_table.set_root(db, seg_id, merkle.root(roots))
        vault.mark_unshipped(db)
    old_objects: list[tuple[str, int]] = []
    for q in queued:
        sh, kind = q.row, q.row.kind
        if not q.reason.startswith("missing"):  # a missing object has nothing to delete
            old_objects.append((f"{kind}/{sh.name}", sh.remote))
        report.items.append(
            RepairItem(
                q.seg_id,
                kind,
                sh.idx,
                sh.path,
                fetcher.labels[sh.remote],
                q.reason,
                fetcher.labels[q.target],
                q.shard.size,
                f"{kind}/{q.shard.name}",
                q.kept,
            )
        )
        report.rebuilt += 1
        report.bytes_written += q.shard.size
    return old_objects


def _iter_files(paths: list[Path]):
    for p in paths:
        if p.is_file():
            yield p
        elif p.is_dir():
            for dirpath, _dirs, files in os.walk(p):
                for f in sorted(files):
                    q = Path(dirpath) / f
                    if q.is_file() and not q.is_symlink():
                        yield q


def _heal_from_source(
    vault: Vault, report: RepairReport, sources: list[Path]
) -> list[tuple[str, int]]:
    """Re-home the chunks of unrecoverable data segments from the live files in ``sources``.

    Every file is chunked with the vault's keyed chunker; a chunk whose keyed id belongs to a
    dead segment is sealed again into a new segment (queued like any write) and its index row
    moved there. A dead segment left with no chunks is dropped (its surviving shards are
    deleted from the remotes). Files still referring to a dead segment are listed in
    ``report.damaged_files``. Returns objects to delete.
    """
    from . import envelope

    dead = sorted({s for s in report.unrecoverable_segments})
    dead = [s for s in dead if (g := segment_table.geometry(vault.index, s)) and g[0] == "data"]
    if not dead:
        return []
    wanted = {
        bytes(cid): plain
        for s in dead
        for cid, _off, _len, plain in chunk_table.records_in(vault.index, s)
    }
    found: dict[bytes, bytes] = {}
    for path in _iter_files(sources):
        if len(found) == len(wanted):
            break
        try:
            with open(path, "rb") as f:
                for chunk in vault.chunker.chunks(f):
                    cid = vault.chunker.chunk_id(chunk)
                    if cid in wanted and cid not in found and len(chunk) == wanted[cid]:
                        found[cid] = chunk
        except OSError as e:
            report.errors[str(path)] = f"cannot read: {e.strerror}"
    if found:
        with vault.write_lock:  # the engine's writers and this one must not interleave
            key = vault.keys.data_keys[vault.epoch]
            builder = segment.SegmentBuilder(vault.segment_size)
            placed: dict[bytes, tuple[int, int, int]] = {}

            def seal_segment() -> None:
                seg_id = vault.write_segment(builder, dict(placed))
                with vault.index.tx() as db:
                    chunk_table.repoint(
                        db, [(seg_id, off, ln, cid) for cid, (off, ln, _pl) in placed.items()]
                    )

            for cid, data in found.items():
                rec = envelope.seal_chunk(key, vault.keys.vault_id, cid, data, vault.suite)
                if not builder.fits(len(rec)):
                    seal_segment()
                    builder = segment.SegmentBuilder(vault.segment_size)
                    placed = {}
                placed[cid] = (builder.add(rec), len(rec), len(data))
            if placed:
                seal_segment()
        report.healed_from_source += len(found)
    old: list[tuple[str, int]] = []
    for seg_id in dead:
        if chunk_table.records_in(vault.index, seg_id):
            for snap, path in snapshot_table.files_in_segment(vault.index, seg_id):
                item = f"{snap}:{display(from_db(path))}"
                if item not in report.damaged_files:
                    report.damaged_files.append(item)
            continue
        rows = segment_table.records(vault.index, seg_id)
        with vault.index.tx() as db:
            audit_table.forget_findings(db, [sh.id for sh in rows])
            segment_table.forget(db, [seg_id])
            vault.mark_unshipped(db)
        old += [(sh.path, sh.remote) for sh in rows]
        report.unrecoverable = [
            u for u in report.unrecoverable if not u.startswith(f"data segment {seg_id}:")
        ]
        report.unrecoverable_segments.remove(seg_id)
    return old


def repair(
    vault: Vault,
    *,
    dry_run: bool = False,
    scan: bool = True,
    prefer: int | None = None,
    wrap: Callable[[object], object] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sources: list[Path] | None = None,
    background: bool = False,
    departing: int | None = None,
) -> RepairReport:
    """Rebuild every live segment below full redundancy; see the module docstring.

    ``sources`` are files or directories holding the live data (the paths that were backed
    up): a data segment that cannot be rebuilt from its shards is healed by re-reading the
    chunks it held from them (matched by keyed chunk id, so only identical bytes qualify).

    ``prefer`` is a remote id that wins ties when placing rebuilt shards (`remote replace`).
    ``dry_run`` scans and plans, and changes nothing else. ``progress(done, total)``: bytes
    of rebuilt shards written of those planned, once the plan is known and after each
    rebuilt segment (a segment that rebuilds less than planned lowers the total).
    ``background``: the mount daemon's
    maintenance, whose CPU work must yield to the foreground (:func:`_workers`).
    ``departing``: a remote just taken out of the vault (`remote remove`) whose shards are
    still read as sources while it answers, though they are being rebuilt elsewhere.
    """
    t0 = time.monotonic()
    report = RepairReport(dry_run)
    if not dry_run and manifest_table.unshipped_since(vault.index) is not None:
        # an earlier repair died before publishing: its rebuilt shards changed segment roots
        # the newest manifest does not sign yet, and the scan's proofs need them signed
        report.manifest_seq = vault.ship_index()
    if scan:
        scanned = verify.audit(vault, list_only=True, wrap=wrap)
        report.unreachable = [r.remote for r in scanned.remotes if r.unreachable]
    else:
        vault.seal()
    down = remote_table.unreachable(vault.index)
    active = remote_table.members(vault.index)
    removed = remote_table.removed(vault.index)
    plan = _plan(vault, set(down))
    specs = remote_table.specs(vault.index)
    if dry_run:
        _dry_run(vault, report, plan, active, down, removed, specs, prefer)
        report.seconds = time.monotonic() - t0
        return report

    report.retargeted_queued = _retarget_queued(vault, removed, prefer)
    fetcher = _Fetcher(vault, set(down), wrap, report, departing)
    old_objects = _rebuild_all(vault, plan, fetcher, report, prefer, active, progress, background)
    report.segments = len(plan)
    if report.unrecoverable_segments:
        old_objects += _heal_from_source(vault, report, sources or [])
    # also when an earlier repair changed shard rows and died before publishing them: the
    # remotes' index copy would still name the objects that repair replaced
    unshipped = manifest_table.unshipped_since(vault.index) is not None
    ahead: list[remote_table.HealthRow] = []
    if (
        report.rebuilt
        or report.retargeted_queued
        or plan
        or unshipped
        or remote_table.stale(vault.index)
    ):
        # the shipped copy records the health as of this repair (a home rebuilt from it
        # must not call a just-rebuilt replacement stale); put back below if not placed
        ahead = remote_table.heal_ahead(vault.index)
        try:
            report.manifest_seq = vault.ship_index()  # flush places data before manifests
        except BaseException:
            remote_table.mark_behind(vault.index, ahead, None)
            raise
    flush = vault.flush()
    report.pending = {k: v for k, v in flush.pending.items() if v}
    report.errors.update(flush.errors)
    if report.manifest_seq is not None:
        remote_table.mark_behind(vault.index, ahead, report.manifest_seq)
        remote_table.mark_healed(vault.index, report.manifest_seq)
    if vault.immutable:  # replacements went out under new names; the old objects stay
        _retain(vault, report, old_objects)
    else:
        _delete_replaced(vault, fetcher, report, old_objects, removed, specs)
    report.seconds = time.monotonic() - t0
    return report


def _dry_run(
    vault: Vault,
    report: RepairReport,
    plan: dict[int, list[tuple[ShardRow, str]]],
    active: list[tuple[int, str, str]],
    down: set[int],
    removed: set[int],
    specs: dict[int, str],
    prefer: int | None,
) -> None:
    """Fill ``report`` with what :func:`repair` would do for ``plan``: each shard it would
    rebuild, where, and whether under its own name (as :func:`_keepable` decides: unless
    the rebuild does not come out as recorded), the segments it could not, the foreign
    objects it would quarantine."""
    for seg_id, todo in sorted(plan.items()):
        holders = segment_table.holders(vault.index, seg_id)
        good = sum(1 for r in holders if r not in down | removed)
        if good < vault.k:
            shards = "shard" if good == 1 else "shards"
            report.unrecoverable.append(
                f"segment {seg_id}: only {good} good {shards} on reachable remotes, need {vault.k}"
            )
            continue
        for sh, reason in todo:
            tgt = _choose_target(vault, seg_id, sh.idx, holders, active, down, prefer)
            holders.append(tgt or -1)
            report.items.append(
                RepairItem(
                    seg_id,
                    sh.kind,
                    sh.idx,
                    sh.path,
                    Remote(specs[sh.remote]).label,
                    reason,
                    Remote(specs[tgt]).label if tgt else "(none reachable)",
                    sh.size,
                    keep_name=_keeps_name(vault, sh, reason, tgt),
                )
            )
    report.segments = len(plan)
    report.quarantined = [
        f"{Remote(specs[r]).label}:{s}/{n}" for r, s, n in audit_table.foreign(vault.index)
    ]


def _workers(vault: Vault, background: bool) -> Executor:
    """The rebuild workers: :data:`REBUILDERS` processes (:func:`sealer.worker_pool`), at nice
    :data:`BACKGROUND_NICE` and from a clean server process for ``background`` work (the mount
    daemon's maintenance: its FUSE side keeps the CPU first, and its threads may hold library
    locks a plain fork would copy); with ``VAULTFS_REBUILDERS=0``, one thread of this
    process, running the same jobs."""
    args = (vault.keys.audit_key, vault.queue.tmp)
    if REBUILDERS <= 0:
        _worker_init(*args)
        return ThreadPoolExecutor(1, thread_name_prefix="vaultfs-rebuild")
    nice = BACKGROUND_NICE if background else None
    return worker_pool(REBUILDERS, _worker_init, args, nice=nice, clean=background)


def _rebuild_all(
    vault: Vault,
    plan: dict[int, list[tuple[ShardRow, str]]],
    fetcher: _Fetcher,
    report: RepairReport,
    prefer: int | None,
    active: list[tuple[int, str, str]],
    progress: Callable[[int, int], None] | None,
    background: bool,
) -> list[tuple[str, int]]:
    """Rebuild the planned shards into the queue, most-at-risk segment first. A bounded
    pipeline of batches of :data:`BATCH_SEGMENTS` segments (the first of :data:`FIRST_BATCH`),
    each committed as soon as it is rebuilt: one thread locates (downloads, where the remote
    is not a local directory) the sources of the next batch, the worker processes
    (:func:`_workers`) rebuild the segments of this one from those files
    (:func:`_rebuild_job`), and this thread, once the whole batch is rebuilt, fsyncs its
    new objects all at once on :data:`FSYNC_THREADS` threads (they share journal commits),
    queues them and commits the batch in one transaction (:func:`_commit_batch`; invariant
    7), then starts uploading it in the background (:meth:`Vault.prepush`); a commit thread
    commits each batch, in order, as soon as it is rebuilt, while this thread keeps the
    workers fed. One batch downloads while at most :data:`FLIGHT` (:data:`FLIGHT_IN_PLACE`
    when nothing is staged) are rebuilt or committed, which bounds the staged objects; the
    workers hold one segment's objects each.
    Returns (old path, old remote) of objects to delete once the new ones are placed."""
    old_objects: list[tuple[str, int]] = []
    with owned_scratch("vaultfs-repair-") as tmp:
        # most at risk first: the segments with the fewest healthy shards left (Storj's order)
        healthy = segment_table.healthy_counts(vault.index)
        todo_all = sorted(plan.items(), key=lambda it: (healthy.get(it[0], 0), it[0]))
        cuts = [0, *range(min(FIRST_BATCH, len(todo_all)), len(todo_all), BATCH_SEGMENTS)]
        batches = [todo_all[a:b] for a, b in itertools.pairwise([*cuts, len(todo_all)]) if b > a]
        # progress: [bytes written, bytes planned]; the planned total drops by what a segment
        # did not rebuild, so the bar ends full (one update per segment, nothing per byte)
        tally = [0, sum(sh.size for _s, todo in todo_all for sh, _r in todo)]
        if progress and todo_all:
            progress(*tally)

        def download(bi: int) -> _Batch:
            # one transfer per remote for the whole batch: k sources per segment
            d = Path(tmp) / f"b{bi}"
            d.mkdir()
            jobs: list[tuple[_Job, list[tuple[ShardRow, str]]]] = []
            for seg_id, todo in batches[bi]:
                g = segment_table.geometry(vault.index, seg_id)
                assert g is not None
                refs = fetcher.sources(seg_id, {sh.id for sh, _r in todo})
                missing = [sh.idx for sh, _r in todo]
                keep = _keepable(vault, seg_id, todo, fetcher, active, prefer)
                jobs.append((_Job(seg_id, g[0], g[2], g[3], g[5], missing, refs, {}, keep), todo))
            located = fetcher.locate([r for j, _t in jobs for r in choose(j.refs, j.k)], d)
            for j, _t in jobs:
                j.located = {r.name: located[r.name] for r in j.refs if r.name in located}
            return _Batch(d, jobs, any(p.is_relative_to(d) for p in located.values()))

        def finish(group: list[tuple[_Batch, list[Future[_Rebuild]]]]) -> None:
            """Commit the batches of ``group`` (in plan order) together."""
            dirs: set[Path] = set()
            queued: list[_Queued] = []
            rebuilt: list[tuple[_Batch, list[_Rebuild]]] = []
            for batch, futures in group:
                try:
                    done = [f.result() for f in futures]
                except BrokenProcessPool:
                    raise VaultError(
                        "a rebuild worker process died (killed, or out of memory): nothing of "
                        "its batch was recorded; run `vaultfs repair` again to finish"
                    ) from None
                done = [
                    _rebuild_widened(vault, job, fetcher, batch.dir) if rb.widen else rb
                    for (job, _t), rb in zip(batch.jobs, done, strict=True)
                ]
                rebuilt.append((batch, done))
            # invariant 7: the objects are durable before their transaction, and before
            # they leave tmp/ (a background push may move a queue directory away)
            sync_files(
                [
                    vault.queue.tmp / sf.name
                    for _b, done in rebuilt
                    for rb in done
                    for sf in rb.shards
                ],
                syncer,
            )
            for batch, done in rebuilt:
                for (job, todo), rb in zip(batch.jobs, done, strict=True):
                    new = _enqueue(vault, job, todo, rb, fetcher, report, prefer, active, dirs)
                    queued += new
                    if progress:
                        wrote = sum(q.shard.size for q in new)
                        tally[0] += wrote
                        tally[1] -= max(0, sum(sh.size for sh, _r in todo) - wrote)
                        progress(*tally)
            old_objects.extend(_commit_batch(vault, queued, dirs, fetcher, report))
            for batch, _f in group:
                shutil.rmtree(batch.dir, ignore_errors=True)
            if queued:  # upload these batches while the next ones are rebuilt
                vault.prepush()

        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaultfs-fetch") as pre,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaultfs-commit") as commit,
            _workers(vault, background) as work,
            ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="vaultfs-fsync") as syncer,
        ):
            # three stages at once: the fetch thread locates (downloads) batch i+1, the
            # workers rebuild the batches handed to them, and the commit thread commits each
            # in order once rebuilt (its fsync can wait a quarter of a second on the kernel's
            # writeback; this loop keeps handing out batches meanwhile). The commit stage is
            # the outer one of the two: leaving on an error cancels the workers' jobs first,
            # so a commit waiting on them fails instead of finishing the batches queued.
            abort = threading.Event()  # no batch is committed after one failed
            # batches handed to the workers and not yet taken by a commit, by number: this
            # thread adds each before its commit is submitted, the commit thread takes them
            handed: dict[int, tuple[_Batch, list[Future[_Rebuild]]]] = {}

            def commit_from(bi: int) -> None:
                # batch bi, and those behind it whose segments are all rebuilt by the time bi
                # is: one commit for all (GROUP_BATCHES at most). A batch an earlier commit
                # took is done (this thread runs the commits in order).
                if abort.is_set() or bi not in handed:
                    return
                try:
                    wait(handed[bi][1])
                    group = [bi]
                    while (
                        len(group) < GROUP_BATCHES
                        and (nb := group[-1] + 1) in handed
                        and all(f.done() for f in handed[nb][1])
                    ):
                        group.append(nb)
                    finish([handed.pop(g) for g in group])
                except BaseException:
                    abort.set()
                    raise

            nxt = pre.submit(download, 0) if batches else None
            flight: deque[tuple[_Batch, Future[None]]] = deque()
            try:
                for bi in range(len(batches)):
                    assert nxt is not None
                    got = nxt.result()
                    nxt = pre.submit(download, bi + 1) if bi + 1 < len(batches) else None
                    handed[bi] = (got, [work.submit(_rebuild_job, job) for job, _t in got.jobs])
                    flight.append((got, commit.submit(commit_from, bi)))
                    # at most FLIGHT batches (FLIGHT_IN_PLACE with nothing staged) rebuilt
                    # or committed at once: this bounds the staged objects; a failed commit
                    # stops the loop at once
                    limit = FLIGHT if any(b.staged for b, _c in flight) else FLIGHT_IN_PLACE
                    while flight and (len(flight) > limit or flight[0][1].done()):
                        flight.popleft()[1].result()
                while flight:
                    flight.popleft()[1].result()
            except BaseException:
                abort.set()
                raise
    return old_objects


def _delete_replaced(
    vault: Vault,
    fetcher: _Fetcher,
    report: RepairReport,
    old_objects: list[tuple[str, int]],
    removed: set[int],
    specs: dict[int, str],
) -> None:
    """Delete what was replaced, and move foreign objects to ``quarantine/`` (never delete
    them), on reachable active remotes; an object the index names again is kept. While the
    remotes hold manifests off this index's chain (a fork), replaced objects are kept too:
    the other branch may use them (docs/design.md, invariant 8)."""
    strays: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rid, sub, name in audit_table.foreign(vault.index):
        strays[rid][sub].append(name)
    if not old_objects and not strays:  # a lost remote's repair: nothing to delete or keep
        return
    doomed: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    found = chain.survey(vault.keys, vault.index, vault.remotes())
    report.fork = found.describe()
    if not report.fork:
        for path, rid in old_objects:
            sub, name = path.split("/", 1)
            doomed[rid][sub].append(name)
    still = segment_table.object_names(vault.index) | found.referenced(
        lambda m: remote_index_description(vault, m)
    )
    for rid in set(doomed) | set(strays):
        if rid in removed or rid in fetcher.down or rid not in specs:
            continue
        b = fetcher.backend(rid)
        label = Remote(specs[rid]).label
        for sub, names in doomed[rid].items():
            names = [n for n in names if n not in still]
            try:
                b.delete(sub, names)
            except RemoteError as e:
                report.errors[label] = e.message
                continue
            report.deleted += [f"{label}:{sub}/{n}" for n in names]
        for sub, names in strays[rid].items():
            names = [n for n in names if n not in still]
            try:
                b.quarantine(sub, names)
            except RemoteError as e:
                report.errors[label] = e.message
                continue
            report.quarantined += [f"{label}:{sub}/{n}" for n in names]
            audit_table.forget_foreign(vault.index, rid, sub, names)


def _retain(vault: Vault, report: RepairReport, old_objects: list[tuple[str, int]]) -> None:
    """An immutable vault's way with what repair replaced: nothing is deleted or moved to
    ``quarantine/``; the replaced objects are listed as garbage (kept for good, so audits do
    not call them foreign) and named in ``report.retained``."""
    seq = manifest_table.newest_seq(vault.index)
    with vault.index.tx() as db:
        for path, rid in old_objects:
            kind, name = path.split("/", 1)
            manifest_table.add_garbage(db, [(name, rid)], kind, seq)
    report.retained += [path for path, _rid in old_objects]


# -- the set of remotes ------------------------------------------------------------------------
def find_remote(vault: Vault, name: str, active_only: bool = True) -> tuple[int, str]:
    """(id, spec) of the remote ``name`` names (:func:`vaultfs.remotes.resolve_remote`);
    BadRemote if none, InputError if several."""
    rows = remote_table.every(vault.index)
    hit = resolve_remote(
        name, ((r.id, r.spec) for r in rows if r.state == "active" or not active_only)
    )
    if hit is not None:
        return hit
    raise BadRemote(
        f"remote {name!r} is not part of this vault: see `vaultfs remote list` for its remotes"
    )


def _check_new(vault: Vault, spec: str, wrap=None) -> None:
    for r in remote_table.every(vault.index):
        if r.spec == spec and r.state == "active":
            raise BadRemote(
                f"remote {Remote(spec).label} is already part of this vault (id {r.id})"
            )
    check_distinct([spec], [r.spec for r in remote_table.every(vault.index) if r.state == "active"])
    b = open_backend(spec, fail_fast=True, wrap=wrap)
    try:
        b.ensure()
        existing = b.list("manifests")
    except Unreachable as e:
        raise NotEnoughRemotes(
            f"remote {Remote(spec).label} is unreachable ({e.message}); try again when it is up"
        ) from None
    if existing:
        raise NoVault(
            f"remote {Remote(spec).label} already holds a vault (manifests/ is not empty); "
            "give an empty location"
        )
    tree = b.list_tree()
    if tree.get("data") or tree.get("meta"):
        raise NoVault(
            f"remote {Remote(spec).label} is not empty (it holds data/ or meta/ objects); "
            "give an empty location"
        )


def add_remote(vault: Vault, spec: str, domain: str | None = None, wrap=None) -> dict:
    """Add an empty remote to the vault; new segments use it, a new manifest goes to it. An
    S3 remote of a vault with an object lock retention gets it (objectlock.lock_spec).
    ``restore_needs``: how many of the ``remotes`` any restore of data stored from now on
    needs (the placement rule's figure); ``stored_on`` and ``restore_needs_now``: where the
    data stored so far is, and how many of those remotes restoring it needs
    (:func:`restore_needs_now`: the add moves nothing)."""
    spec = lock_spec(spec, vault.params.object_lock)
    Remote(spec)  # validates the spec's form
    _check_new(vault, spec, wrap)
    with vault.index.tx() as db:
        rid = remote_table.add(db, spec, remote_table.next_position(db), domain)
    seq = vault.ship_index()
    rep = vault.flush()
    active = len(remote_table.active(vault.index))
    labels = {r: Remote(sp).label for r, sp in remote_table.active(vault.index)}
    live = set(segment_table.live_ids(vault.index))
    data = {sid for sid, *_ in segment_table.data_segments(vault.index)}
    where: dict[int, list[int]] = {}
    for seg, remote, state in segment_table.placements(vault.index):
        if seg in live and state in ("placed", "queued"):
            where.setdefault(seg, []).append(remote)
    holders, now = restore_needs_now(
        list(where.values()), [w for s, w in where.items() if s in data], vault.k
    )
    return {
        "remote": Remote(spec).label,
        "id": rid,
        "domain": domain or f"remote{rid}",
        "remotes": active,
        # more remotes than n: a segment is on n of them, so any k remotes no longer suffice
        "restore_needs": remotes_needed(active, vault.k, vault.n)[0],
        # what is stored already stays where it was placed: on these remotes, any
        # ``restore_needs_now`` of which restore it (None: not even all of them)
        "stored_on": [labels.get(r, str(r)) for r in holders],
        "restore_needs_now": now,
        "manifest_seq": seq,
        "pending": {k: v for k, v in rep.pending.items() if v},
        "errors": rep.errors,
    }


def _guard_removal(vault: Vault, rid: int) -> None:
    if not [r for r, _spec in remote_table.active(vault.index) if r != rid]:
        raise NotEnoughRemotes("cannot remove the vault's last remote: add another one first")


def remove_remote(
    vault: Vault,
    name: str,
    wrap=None,
    background: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RepairReport:
    """Take a remote out of the vault: rebuild its shards on the others (reading its own
    shards too while it is reachable), then clear what it held. ``background`` and
    ``progress`` (the rebuild's bytes): as :func:`repair`'s. A rerun finishes a removal that was cut short (its remote already
    marked removed, shards of live segments still placed on it).

    Refused before anything changes (NotEnoughRemotes) when a segment would keep fewer than
    k shards on the other remotes and the departing one cannot be read. When the rebuild
    still fails (``report.unrecoverable``) the remote stays in the vault, active, and nothing
    is deleted from it (the shards already rebuilt elsewhere stay there; its old copies of
    them are foreign to the next audit). Clearing deletes only the objects this index names
    there, moves the others to its ``quarantine/``, and deletes nothing at all while the
    remotes hold another branch (:meth:`chain.Survey.hold`, docs/design.md invariant 8)."""
    try:
        rid, spec = find_remote(vault, name)
        resuming = False
    except BadRemote:  # a removal cut short (kill, crash) is finished from where it stopped
        rid, spec = find_remote(vault, name, active_only=False)
        if not segment_table.placed_live_on(vault.index, rid):
            raise  # it left the vault, and nothing live is on it: nothing to finish
        resuming = True
    _guard_removal(vault, rid)
    label = Remote(spec).label
    b = open_backend(spec, rid, fail_fast=True, wrap=wrap)
    _guard_departure(vault, rid, b)
    known = segment_table.object_names(vault.index, rid)  # before the rebuild renames them
    placed = segment_table.object_names(vault.index, rid, "placed")  # what should be there
    doms = dict(remote_table.placement_domains(vault.index))
    promised = design_losses(doms, vault.k, vault.n)
    left = design_losses({r: d for r, d in doms.items() if r != rid}, vault.k, vault.n)
    if not resuming:
        with vault.index.tx() as db:
            remote_table.remove(db, rid)
    report = repair(vault, wrap=wrap, background=background, departing=rid, progress=progress)
    if report.unrecoverable:
        with vault.index.tx() as db:
            remote_table.rejoin(db, rid)
            vault.mark_unshipped(db)
        report.manifest_seq = vault.ship_index()  # the remote is named again, and gets it
        report.errors.update(vault.flush().errors)
        report.errors[label] = (
            "not removed: the rebuild above failed, so it stays in the vault as a member and "
            "nothing was deleted from it; run `vaultfs repair` (with --source to re-read the "
            "live files), then remove it again"
        )
        return report
    segment_table.release_departed(vault.index, rid)
    if not resuming and left < promised:
        report.warnings.append(
            f"without {label} the vault survives {left} remote loss(es), where its "
            f"{vault.k}-of-{vault.n} profile promised {promised} over {len(doms)} remotes: "
            "add a remote (`vaultfs remote add`; `vaultfs repair` then spreads the shards over "
            f"it), or use `vaultfs remote replace {label} NEW` to take a remote's place"
        )
    if vault.immutable:  # its objects stay where they are (Vault.immutable)
        return report
    _clear_departed(vault, b, label, known, placed, report)
    return report


def _guard_departure(vault: Vault, rid: int, b: Backend) -> None:
    """Refuse (NotEnoughRemotes) to remove remote ``rid`` when a live segment would keep
    fewer than k shards on the other active remotes and ``b`` (the departing one) cannot be
    listed, so its shards cannot be read for the rebuild."""
    short = segment_table.short_without(vault.index, rid)
    if not short:
        return
    try:
        b.list("manifests")
    except RemoteError as e:
        raise NotEnoughRemotes(
            f"cannot remove {b.label}: {len(short)} segment(s) (first: {short[0]}) keep fewer "
            f"than k shards on the other remotes, and it is unreachable to rebuild them from "
            f"({e.message}); nothing was changed. Retry when it is back, or run `vaultfs "
            "repair` first if the other remotes lost shards"
        ) from None


def _clear_departed(
    vault: Vault, b: Backend, label: str, known: set[str], placed: set[str], report: RepairReport
) -> None:
    """Delete from departed remote ``b`` the objects of this index's chain (``known``: its
    shard names there, and this chain's manifests) and move the rest to its ``quarantine/``;
    nothing at all while a survey of every remote, ``b`` too, finds another branch or could
    not look everywhere (docs/design.md invariant 8). Garbage rows stay for
    :func:`rotation.collect_garbage`. A remote that fails keeps its objects, and one held
    keeps them all: ``report.not_cleared`` names it, and its error says what is left there and
    how to finish (a rerun cannot: the remote has left the vault). The shards placed there
    (``placed``) that its listing lacks are counted (``report.not_found``) and warned of: a
    local remote whose directory is missing (unplugged or renamed:
    :meth:`Remote.missing_root`) is not asked at all and counts every one, as its copies may
    live on elsewhere."""
    if Remote(b.spec).missing_root():
        report.not_found = len(placed)
        if placed:
            report.warnings.append(
                f"none of the {len(placed)} objects {label} held were found there: its "
                f"directory {b.local_dir} is missing (is it unplugged or moved?): nothing was "
                "deleted; delete them yourself if the copies must go"
            )
        return
    found = chain.survey(vault.keys, vault.index, [*vault.remotes(), b])
    if held := found.hold():
        report.fork = found.describe()
        report.not_cleared = label
        report.errors[label] = (
            f"left its objects in place: {held}; they are this vault's, encrypted, and the "
            "location can be emptied by hand once no branch needs them"
        )
        return
    mine = known | manifest_table.chain_names(vault.index)
    later = {name for name, rid, _kind, _seq in manifest_table.garbage(vault.index) if rid == b.rid}
    listed: set[str] = set()
    try:
        for sub in (*segment.KIND_NAMES.values(), "manifests"):
            names = b.list(sub)
            listed.update(names)
            names = [n for n in names if n not in later]
            b.delete(sub, [n for n in names if n in mine])
            report.deleted += [f"{label}:{sub}/{n}" for n in names if n in mine]
            b.quarantine(sub, [n for n in names if n not in mine])
            report.quarantined += [f"{label}:{sub}/{n}" for n in names if n not in mine]
    except RemoteError as e:
        done = sum(d.startswith(f"{label}:") for d in [*report.deleted, *report.quarantined])
        report.not_cleared = label
        report.errors[label] = (
            f"left its objects in place: clearing it failed ({e.message}) after {done} of "
            "them were deleted or moved to its quarantine/. It has left the vault (its shards "
            "are rebuilt on the others), so a rerun cannot finish this: the vault reads nothing "
            "there any more; delete what is left by hand if the copies must go"
        )
        return
    report.not_found = len(placed - listed)
    if report.not_found == len(placed) and placed and not report.deleted:
        report.warnings.append(
            f"none of the {len(placed)} objects {label} held were found there (is it unplugged "
            "or moved?): nothing was deleted; delete them yourself if the copies must go"
        )
    elif report.not_found:
        report.warnings.append(
            f"{report.not_found} of the {len(placed)} objects {label} held were not found there "
            "(is it unplugged or moved, or were they deleted?): those were not deleted; delete "
            "them yourself if the copies must go"
        )


def replace_remote(
    vault: Vault,
    old: str,
    new: str,
    domain: str | None = None,
    wrap=None,
    background: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RepairReport:
    """Swap remote ``old`` (e.g. a provider that shut down) for the empty remote ``new``: the new
    one takes the old one's position and failure domain, and the old one's shards are rebuilt
    onto it from the others (queued ones are moved). ``background`` and ``progress`` (the
    rebuild's bytes): as :func:`repair`'s.
    A rerun finishes a replace that was cut short (kill, crash: ``old`` already removed,
    ``new`` in its position): the rebuild onto ``new`` goes on from where it stopped."""
    new = lock_spec(new, vault.params.object_lock)
    Remote(new)
    try:
        rid, _spec = find_remote(vault, old)
    except BadRemote as e:
        rid, nid = _replaced(vault, old, new, e)
    else:
        _check_new(vault, new, wrap)
        with vault.index.tx() as db:
            pos, dom = remote_table.position_of(db, rid)
            remote_table.remove(db, rid)
            # an old remote with no named domain was its own (``remote<id>``): the new one
            # keeps it
            nid = remote_table.add(db, new, pos, domain or dom or f"remote{rid}")
            remote_table.forget_health(db, rid)
    report = repair(vault, prefer=nid, wrap=wrap, background=background, progress=progress)
    if not report.unrecoverable:
        segment_table.release_departed(vault.index, rid)
    return report


def _replaced(vault: Vault, old: str, new: str, missing: BadRemote) -> tuple[int, int]:
    """(old id, new id) when ``old`` already left the vault and ``new`` took its position (a
    replace cut short); else BadRemote that says what to run (``missing``: ``old`` was never
    a remote of this vault)."""
    rows = remote_table.every(vault.index)
    hit = resolve_remote(old, ((r.id, r.spec) for r in rows if r.state != "active"))
    if hit is None:
        raise missing
    gone = [r for r in rows if r.id == hit[0]]
    took = [r for r in rows if r.spec == new and r.state == "active"]
    for g in gone:
        for t in took:
            if t.position == g.position:
                return g.id, t.id
    raise BadRemote(
        f"remote {Remote(gone[-1].spec).label} already left this vault, and "
        f"{Remote(new).label} did not take its place: to add it, run `vaultfs remote add "
        f"{new}` (`vaultfs remote list` shows the vault's remotes)"
    )


def list_remotes(vault: Vault) -> list[dict]:
    """Every remote the vault knows (active and removed) with health and holdings."""
    out = []
    rows = sorted(remote_table.every(vault.index), key=lambda r: r.state)  # stable: by position
    for rid, spec, pos, dom, state, last_ok, last_err in rows:
        counts = {
            st: segment_table.remote_totals(vault.index, rid, st)
            for st in ("placed", "queued", "lost")
        }
        h = vault.remote_health(rid)
        foreign = audit_table.foreign_count(vault.index, rid)
        out.append(
            {
                "remote": Remote(spec).label,
                "id": rid,
                "position": pos,
                "domain": dom or f"remote{rid}",
                "member": state,
                "health": h["health"] if state == "active" else "removed",
                "health_detail": h["health_detail"],
                "placed_objects": counts["placed"][0],
                "placed_bytes": counts["placed"][1],
                "queued_objects": counts["queued"][0],
                "queued_bytes": counts["queued"][1],
                "lost_objects": counts["lost"][0],
                "foreign_objects": foreign,
                "last_audit": h["last_audit"],
                "last_audit_mode": h["last_audit_mode"],
                "last_audit_confidence": h["last_audit_confidence"],
                "last_ok": last_ok,
                "last_error": last_err,
            }
        )
    return out
