"""The upload queue's way out: moving queued shards and manifests to the remotes, and
deleting the meta segments that only superseded manifests name.

Ordering invariants enforced here (numbered as in docs/design.md):

4. A manifest is uploaded to any remote only after every segment it covers has at least k
   shards placed; on each remote, data and meta shards go before the manifest.
5. A queued shard becomes ``placed`` only after rclone removed it from the queue, which it
   does only after a successful upload (:func:`vaultfs.vault.recovery.reconcile`).
6. An old index copy is deleted only once a flush placed every newer manifest everywhere.
7. A manifest is placed only after a survey of the reachable remotes found the base current
   (:mod:`vaultfs.chain`): a refused manifest is never uploaded (it stays queued, and the
   flush reports ``stale_base``). With no remote reachable nothing is placed anyway. The
   survey starts as the flush starts, beside the shard uploads, so a slow remote's answer
   costs no time of its own; placing waits for it, and a remote silent for
   :data:`chain.CHECK_BOUND` seconds is reported as not checked (``unchecked``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import chain, hedging
from ..backends import Backend
from ..errors import NotEnoughRemotes, RemoteError
from ..index import Index, VaultParams, manifests, segments
from ..index import remotes as remote_table
from ..keys import VaultKeys
from .queue import SUBDIRS, ShardQueue, queue_bound
from .recovery import reconcile

MIB = 1024 * 1024
#: How many of the newest manifests (and the meta segments they name) stay on the remotes.
KEEP_INDEX_COPIES = 3


def _each(fn: Callable, items: list) -> None:
    """Run ``fn(item)`` for every item at once, one thread each (remote operations are
    rclone subprocesses: they overlap whatever the GIL does)."""
    if len(items) <= 1:
        for it in items:
            fn(it)
        return
    threads = [threading.Thread(target=fn, args=(it,)) for it in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class FlushReport:
    """What a flush did and what is left (:meth:`UploadQueue.flush`)."""

    uploaded: int = 0
    pending: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    under_k: int = 0
    manifests_pending: int = 0
    stale_base: str | None = None  # why queued manifests were refused (StaleBase message)
    #: remotes whose manifests the placement's survey could not look at (chain.CHECK_BOUND)
    unchecked: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not any(self.pending.values()) and self.manifests_pending == 0


class UploadQueue:
    """Moves what the queue holds to the vault's remotes.

    ``remotes`` gives the active remotes; ``seal`` makes what the write path holds durable
    in the queue (a flush seals first unless told not to)."""

    def __init__(
        self,
        index: Index,
        keys: VaultKeys,
        queue: ShardQueue,
        remotes: Callable[[], list[Backend]],
        seal: Callable[[], None],
        immutable: bool = False,
    ) -> None:
        self.index = index
        self.immutable = immutable
        self.keys = keys
        self.queue = queue
        self.remotes = remotes
        self.seal = seal
        #: remote id -> its upload running in the background (a :meth:`prepush`, or one a
        #: quorum flush stopped waiting for); one at a time per remote
        self._inflight: dict[int, threading.Thread] = {}
        #: remote id -> why its background upload failed (for the next flush to report)
        self._bg_failed: dict[int, str] = {}
        self._lock = threading.Lock()
        # one flush at a time: the mount's pusher and a maintenance job in the same daemon
        # would otherwise both upload a queued manifest while the other deletes its file
        self._flush_lock = threading.Lock()

    def close(self) -> None:
        """Wait for the background pushes of :meth:`prepush` to end; an upload a quorum
        flush left running is not waited for (its rest stays queued, see :meth:`flush`).
        The outcome of such an upload that ended by now is recorded for `status`
        (remotes.last_error); one still running is cut off with the command and records
        nothing: a slow remote is behind (its queue shows it), not failing."""
        with self._lock:
            waits = [t for rid, t in self._inflight.items() if rid not in self._left]
            left = {rid: t for rid, t in self._inflight.items() if rid in self._left}
        for t in waits:
            t.join()
        for rid, t in left.items():
            if not t.is_alive() and rid in self._left_results:
                remote_table.record_result(self.index, rid, self._left_results[rid])

    #: remote ids whose upload a quorum flush stopped waiting for
    _left: frozenset[int] = frozenset()
    #: the outcomes of those uploads, as their threads end (remote id -> None or the error)
    _left_results: dict[int, str | None] = {}  # replaced by each quorum flush, never mutated

    def flush(
        self,
        progress: Callable[[str], None] | None = None,
        seal: bool = True,
        quorum: bool = False,
    ) -> FlushReport:
        """Upload everything queued. Never raises for an unreachable remote: it reports.

        ``seal=False`` pushes only what is already sealed, so a caller that flushes often
        (the mount's background pusher) does not pad the open segment on every pass.
        With ``quorum`` (a backup) the flush returns once every segment has k shards placed,
        k remotes have everything (and so get the manifest), and the remotes still uploading
        had a grace to finish (:func:`hedging.grace`): one slow
        remote does not set the pace. What it has not received stays queued (reported in
        ``pending``; its manifest waits, invariant 4) and goes out on a later flush; its
        upload keeps running in the background meanwhile (every flush waits for a remote's
        running upload before it starts another there; :meth:`close` does not wait for it).
        Thread-safe: concurrent calls run one after the other.
        """
        with self._flush_lock:
            return self._flush(seal, quorum)

    def _flush(self, seal: bool, quorum: bool = False) -> FlushReport:
        if seal:
            self.seal()
        report = FlushReport()
        remotes = self.remotes()
        # invariant 7's survey runs while the shards go out: placing waits only for its rest
        survey = (
            chain.survey_ahead(self.keys, self.index, remotes)
            if manifests.pending_uploads(self.index)
            else None
        )
        # remotes an audit found unreachable: whether each has shards to take (see _recheck)
        marked = remote_table.unreachable(self.index)
        had = {
            r.rid: bool(self._held(self.queue.remote_dir(r.rid)))
            for r in remotes
            if r.rid in marked
        }
        ok = self._push_shards(remotes, report, quorum=quorum)
        report.uploaded += reconcile(self.index, self.queue)
        for r in remotes:
            if ok.get(r.rid):
                remote_table.record_result(self.index, r.rid, None)
        if had:
            self._recheck(remotes, had, ok, probe=seal)
        report.under_k = segments.count_under_k(self.index)
        if report.under_k == 0:
            self._push_manifests(remotes, ok, report, survey)
        for r in remotes:
            report.pending[r.label] = segments.queued_count(self.index, r.rid)
        report.manifests_pending = manifests.pending_uploads(self.index)
        if report.manifests_pending == 0 and not report.errors:
            self.prune_index_copies(survey=survey)
        return report

    def _recheck(
        self, remotes: list[Backend], had: dict[int, bool], ok: dict[int, bool], probe: bool
    ) -> None:
        """Clear the 'unreachable' mark of the remotes in ``had`` (remote id: whether it had
        shards queued) that answered this flush: an upload of its shards went through, or,
        with nothing to upload (so not contacted), one listing of ``manifests/`` (with
        ``probe``: a flush the user or a job asked for, not the mount's frequent pushes),
        all at once. A remote that does not answer keeps its mark; no remote that is not
        marked is asked anything."""
        answered = [rid for rid, queued in had.items() if queued and ok.get(rid)]
        ask = [r for r in remotes if r.rid in had and not had[r.rid] and ok.get(r.rid)]
        if probe and ask:
            lock = threading.Lock()

            def listing(r: Backend) -> None:
                try:
                    r.list("manifests")
                except RemoteError:
                    return
                with lock:
                    answered.append(r.rid)

            threads = [threading.Thread(target=listing, args=(r,), daemon=True) for r in ask]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if answered:
            remote_table.mark_reachable(self.index, answered)

    def drain(self, sealing: int, settle: Callable[[], None]) -> None:
        """Keep the queue within its bound while a backup writes (``Writer.store_stream``).
        When the shards that fewer than k remotes have (``queued_bytes_under_k``) and the
        ``sealing`` bytes the sealers will add are over :func:`queue_bound`, let the sealers
        queue what they hold (``settle``), then flush what is sealed and wait for it: the
        queue exceeds the bound by at most the sealers' open segments. The bound counts only
        those shards: a remote that is down while k others take everything does not stop a
        backup (its shards wait for it, as after any backup). When the uploads cannot bring
        the queue under the bound (errors, or nothing moved), raises
        :class:`NotEnoughRemotes` with the way forward; nothing acknowledged is lost (what is
        queued stays queued, and the next backup finds its chunks already stored)."""
        held = segments.queued_bytes_under_k(self.index)
        bound = queue_bound(self.queue.dir, held)
        if held + sealing <= bound:
            return
        settle()
        # a quorum flush, as the backup's own at its end: one slow remote does not set the pace
        report = self.flush(seal=False, quorum=True)
        held = segments.queued_bytes_under_k(self.index)
        if held > bound:
            why = "; ".join(report.errors.values()) or "no upload moved"
            raise NotEnoughRemotes(
                f"the upload queue holds {held / MIB:.1f} MiB of shards that fewer than k "
                f"remotes have, over its bound of {bound / MIB:.1f} MiB, and the uploads "
                f"cannot empty it ({why}): bring the remotes back or replace them "
                "(`vaultfs status` names them), then back up again "
                "(VAULTFS_QUEUE_MIB sets the bound); nothing acknowledged was lost"
            )

    def prepush(self) -> None:
        """Start moving the queued shards to the remotes in the background (a commit does,
        so uploads overlap exporting and signing the index); the next :meth:`flush` waits
        for them (a quorum flush as for its own), and does not try again in the same flush
        a remote that failed. Repair calls it after each batch, so batch i uploads while
        batch i+1 is rebuilt; a remote whose background upload failed is left for the flush."""
        with self._lock:
            failed = set(self._bg_failed)
        for r in self.remotes():
            if r.rid not in failed:
                self._start(r, None)

    def _start(self, r: Backend, results: dict[int, str | None] | None) -> bool:
        """Start one ``rclone move`` of ``r``'s queue directory in a daemon thread (another
        as long as shards arrived during the last one), unless one is running; its outcome (None: success, else the error) goes to ``results``,
        or for a background push to :attr:`_bg_failed`. Returns whether it started. Only
        the flushing thread writes to the index: these threads touch nothing but results."""

        def push() -> None:
            d = self.queue.remote_dir(r.rid)
            msg: str | None = None
            try:
                # again while shards arrived during a move (a repair or commit queueing
                # more): the link stays busy instead of idling until the next prepush
                seen: set[str] = set()
                new = self._held(d)
                while new:
                    seen |= new
                    r.move_dir(d, "")
                    new = self._held(d) - seen  # a shard left behind is not tried again
            except RemoteError as e:
                msg = e.message
            if results is not None:
                results[r.rid] = msg
            elif msg is not None:
                with self._lock:
                    self._bg_failed[r.rid] = msg

        with self._lock:
            t = self._inflight.get(r.rid)
            if t is not None and t.is_alive():
                return False
            t = threading.Thread(target=push, daemon=True, name=f"vaultfs-push-{r.rid}")
            self._inflight[r.rid] = t
        t.start()
        return True

    @staticmethod
    def _held(d: Path) -> set[str]:
        """The shard files queued in remote directory ``d``."""
        return {f.name for sub in SUBDIRS if (d / sub).is_dir() for f in (d / sub).iterdir()}

    def _push_shards(
        self, remotes: list[Backend], report: FlushReport, quorum: bool = False
    ) -> dict[int, bool]:
        """One ``rclone move`` per remote of its queue directory (data/ and meta/ shards), all
        remotes at once, each after any upload to it still running has ended. Waits for
        them all, or with ``quorum`` (see :meth:`flush`) until every segment has k shards
        placed and the uploads to k remotes ended well (so the manifest can go to k
        remotes), and the grace has passed, leaving the rest running. Returns {remote id:
        success} of the remotes whose upload of this flush ended; records errors in
        ``report`` and the index."""
        results: dict[int, str | None] = {}
        with self._lock:
            failed_before, self._bg_failed = self._bg_failed, {}
        waiting = []
        for r in remotes:
            if r.rid in failed_before:  # it failed moments ago in the background push
                results[r.rid] = failed_before[r.rid]
            else:
                waiting.append(r)
        k = VaultParams.read(self.index).k if quorum else 0
        t0 = time.monotonic()
        reached: float | None = None
        while True:
            waiting = [r for r in waiting if not self._start(r, results)]
            with self._lock:
                running = [t for t in self._inflight.values() if t.is_alive()]
            if not running and not waiting:
                break
            if running:
                running[0].join(0.2)
            if not quorum:
                continue
            now = time.monotonic()
            if reached is None:
                # a shard whose queue file is gone is placed (invariant 5)
                report.uploaded += reconcile(self.index, self.queue)
                # and the manifest can go to k remotes: k uploads of this flush ended well
                placed_on = sum(msg is None for msg in list(results.values()))
                if placed_on >= k and segments.count_under_k(self.index) == 0:
                    reached = now
            elif now - reached > hedging.grace(reached - t0):
                break
        with self._lock:
            self._left = frozenset(rid for rid, t in self._inflight.items() if t.is_alive())
            self._left_results = results
        done = dict(results)  # a thread still running may add to results later
        for r in remotes:
            msg = done.get(r.rid)
            if msg is not None:
                report.errors[r.label] = msg
                remote_table.record_result(self.index, r.rid, msg)
        return {rid: msg is None for rid, msg in done.items()}

    def prune_index_copies(
        self, keep: int | None = None, survey: Callable[[], chain.Survey] | None = None
    ) -> int:
        """Delete the manifests older than the newest ``keep`` and the meta segments none of
        the kept ones names (a segment a kept manifest names a block in stays).

        Called only after a flush placed every manifest on every remote (invariant 6: an old
        index copy is deleted only once newer ones are placed); an immutable vault deletes
        nothing, and nothing is deleted while the remotes hold another branch, whose index
        may name blocks in this chain's older meta segments (invariant 8: ``survey``, the
        flush's, else one taken here; :meth:`chain.Survey.hold`). Returns objects deleted;
        a remote that fails keeps its old copies until the next successful flush.
        """
        if self.immutable:  # an append-only vault keeps every index copy (Vault.immutable)
            return 0
        keep = keep or KEEP_INDEX_COPIES
        seqs = manifests.seqs_newest_first(self.index)
        if len(seqs) <= keep:
            return 0
        cutoff = seqs[keep - 1]
        old_shards = segments.placed_unreferenced_meta(self.index, cutoff)
        old_mans = manifests.names_before(self.index, cutoff)
        if not old_shards and not old_mans:
            return 0
        found = survey() if survey else chain.survey(self.keys, self.index, self.remotes())
        if found.hold():
            return 0
        counts: dict[int, int] = {}
        failed: list[int] = []

        def drop(r: Backend) -> None:
            mine = [name for _sid, name, rid in old_shards if rid == r.rid]
            try:  # one rclone call per remote
                r.delete("", [f"meta/{n}" for n in mine] + [f"manifests/{m}" for m in old_mans])
            except RemoteError:
                failed.append(r.rid)
                return
            counts[r.rid] = len(mine) + len(old_mans)

        _each(drop, self.remotes())
        deleted = sum(counts.values())
        if failed:  # that remote keeps its old copies until the next successful flush
            return deleted
        with self.index.tx() as db:
            manifests.forget_before(db, cutoff)
        return deleted

    def _push_manifests(
        self,
        remotes: list[Backend],
        ok: dict[int, bool],
        report: FlushReport,
        survey: Callable[[], chain.Survey] | None = None,
    ) -> None:
        """Upload queued manifests, oldest first, every remote at once (invariant 4: only
        called once every segment has k shards placed), once the base is found current
        (invariant 7; a stale base is reported in ``report.stale_base``). ``survey``: the
        flush's survey, started as it began (:func:`chain.survey_ahead`); without one (no
        manifest was queued then) the remotes are surveyed now."""
        rows = manifests.queued_uploads(self.index)
        if not rows:
            return
        found = survey() if survey else chain.survey(self.keys, self.index, remotes)
        report.unchecked = found.unchecked
        if found.reachable:
            manifests.note_fork(self.index, found.describe())
        if stale := found.stale(self.index):
            report.stale_base = chain.stale_error(stale, "manifest not placed").message
            return
        by_id = {r.rid: r for r in remotes}
        todo: dict[int, list[tuple[int, str]]] = {}
        for seq, rid, name in rows:
            if rid not in by_id:  # remote removed since: drop the obligation
                manifests.dequeue(self.index, seq, rid)
            elif ok.get(rid):
                todo.setdefault(rid, []).append((seq, name))
        lock = threading.Lock()

        def push(rid: int) -> None:
            r = by_id[rid]
            for seq, name in todo[rid]:
                try:
                    r.put_file(self.queue.manifests / name, "manifests", name)
                except RemoteError as e:
                    with lock:
                        report.errors[r.label] = e.message
                    return
                manifests.dequeue(self.index, seq, rid)

        _each(push, list(todo))
        still = manifests.queued_seqs(self.index)
        for seq, name in manifests.seqs_and_names(self.index):
            f = self.queue.manifests / name
            if seq not in still and f.exists():
                f.unlink()
