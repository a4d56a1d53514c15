"""The write path: chunk → deduplicate → (sealer processes: encrypt, pack, erasure code) →
queue → index.

Ordering invariants enforced here (numbered as in docs/design.md):

1. A shard object is written to ``queue/tmp``, fsync'd, and renamed into
   ``queue/<remote>/<data|meta>/`` *before* the index transaction that records it commits.
2. Chunk rows are inserted in the same transaction as their segment and shards, so a chunk
   the index knows is always backed by durable shards (queued or placed).

Every writer of segments holds :attr:`Writer.write_lock` (an RLock): the stores, sealing,
commits, key epochs, segment rewrites, and repair while it writes rebuilt segments.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from .. import merkle, segment
from ..audittag import PIECE as AUDIT_PIECE
from ..chunker import Chunker
from ..index import Index, VaultParams, audit, chunks, segments
from ..index.segments import NewShard
from ..keys import VaultKeys
from ..sealer import (
    SLOT_SIZE,
    SLOTS,
    SealConfig,
    SealerPool,
    SegmentReport,
    build_shard_files,
    write_new_file,
)
from .epochs import KeyEpochs
from .placement import shard_remotes
from .queue import ShardQueue, sync_dirs


class Writer:
    """Stores chunks and seals them into queued segments, recorded in the index.

    ``sealers`` is the number of sealer processes (vaultfs/sealer.py); 0 seals inline on
    the calling thread."""

    def __init__(
        self,
        index: Index,
        keys: VaultKeys,
        params: VaultParams,
        queue: ShardQueue,
        epochs: KeyEpochs,
        sealers: int,
    ) -> None:
        self.index = index
        self.keys = keys
        self.params = params
        self.queue = queue
        self.epochs = epochs
        self.write_lock = epochs.write_lock
        self.chunker = Chunker(keys.chunker_seed, keys.chunk_id_key, params.chunk_avg)
        self._sealer_count = sealers
        self._sealers: SealerPool | None = None
        self._seg_id_lock = threading.Lock()
        self._last_seg_id = 0

    @property
    def sealers(self) -> SealerPool | None:
        """The running sealer pool, if started."""
        return self._sealers

    def close(self) -> None:
        """Stop the sealers (chunks not sealed yet are discarded)."""
        if self._sealers is not None:
            self._sealers.close()
            self._sealers = None

    def start_sealers(self) -> SealerPool:
        """Start the sealer processes now (they fork: see vaultfs/sealer.py, "Forking").

        The mount calls this before its FUSE loop and threads start; otherwise the first
        store does, on the caller's thread."""
        with self.write_lock:
            if self._sealers is not None and self._sealers.broken:
                self._sealers.close()  # a sealer died: its error was raised once already
                self._sealers = None
            if self._sealers is None:
                p = self.params
                cfg = SealConfig(
                    self.keys.vault_id,
                    self.keys.audit_key,
                    p.k,
                    p.n,
                    p.ec_alg,
                    p.segment_size,
                    str(self.queue.tmp),
                )
                pool = SealerPool(cfg, self._commit_sealed, self._sealer_count)
                pool.start()
                self._sealers = pool
            return self._sealers

    def store_stream(
        self,
        stream: BinaryIO,
        progress: Callable[[int], None] | None = None,
        drain: Callable[[int, Callable[[], None]], None] | None = None,
    ) -> tuple[list[bytes], int]:
        """Chunk, deduplicate, encrypt and pack a stream. Returns (chunk ids, total bytes).

        This thread reads the stream into shared-memory slots, cuts keyed CDC chunks, hashes
        their ids and drops the ones the vault has; sealer processes compress, encrypt and
        pack the rest. The chunks are durable (queued) only after :meth:`seal` or
        :meth:`commit`. ``drain`` is called after each slot handed to a sealer, holding the
        write lock, with the bytes of shards the slots the sealers hold will make at most,
        and a callable that waits until they took them in (the queue bound, :meth:`UploadQueue.drain`: it waits while uploads empty
        the queue, or raises when they cannot).
        """
        readinto = getattr(stream, "readinto", None)
        cids: list[bytes] = []
        total = 0
        with self.write_lock:
            pool = self.start_sealers()
            size = SLOT_SIZE
            slot = pool.acquire()
            held = [slot]  # slots this call owns and has not handed to a sealer
            fill = 0
            try:
                while True:
                    buf = pool.view[slot * size : (slot + 1) * size]
                    eof = False
                    while fill < size:
                        if readinto is not None:
                            got = readinto(buf[fill:])
                        else:
                            data = stream.read(size - fill)
                            got = len(data)
                            buf[fill : fill + got] = data
                        if not got:
                            eof = True
                            break
                        fill += got
                    spans = self.chunker.spans(buf[:fill])
                    carry = 0
                    if not eof and spans:
                        carry_off, carry = spans.pop()  # the tail is cut again with what follows
                    ids = [self.chunker.chunk_id(buf[o : o + ln]) for o, ln in spans]
                    items = self._unknown(ids, spans)
                    nxt = None
                    if not eof:
                        nxt = pool.acquire()
                        held.append(nxt)
                        if carry:
                            dst = pool.view[nxt * size : nxt * size + carry]
                            dst[:] = buf[carry_off : carry_off + carry]
                            del dst
                    del buf
                    held.remove(slot)
                    pool.submit(slot, *self.epochs.current(), items)
                    if drain is not None:
                        sealing = SLOTS - pool.free_slots - len(held)
                        drain(
                            sealing * size * self.params.n // self.params.k,
                            lambda: pool.wait_free(SLOTS - len(held)),
                        )
                    slot_bytes = sum(ln for _o, ln in spans)
                    cids += ids
                    total += slot_bytes
                    if progress and slot_bytes:
                        progress(slot_bytes)
                    if nxt is None:
                        break
                    slot, fill = nxt, carry
            finally:
                for s in held:  # an error before they were handed over
                    pool.release(s)
        return cids, total

    def store_chunks(self, chunks: Sequence[bytes | memoryview]) -> list[bytes]:
        """Store a batch of chunks (deduplicated); return their ids in order. Chunks may be
        views of a larger buffer: each is copied once, into a sealer's slot."""
        cids = [self.chunker.chunk_id(c) for c in chunks]
        with self.write_lock:
            pool = self.start_sealers()
            size = SLOT_SIZE
            spans: list[tuple[int, int]] = []
            pos = 0
            for c in chunks:
                spans.append((pos, len(c)))
                pos += len(c)
            items_all = self._unknown(cids, spans)
            by_off = {o: chunks[i] for i, (o, _l) in enumerate(spans)}
            i = 0
            while i < len(items_all):  # pack the new chunks into as few slots as they need
                slot = pool.acquire()
                try:
                    buf = pool.view[slot * size : (slot + 1) * size]
                    items, fill = [], 0
                    while i < len(items_all) and fill + items_all[i][2] <= size:
                        cid, off, ln = items_all[i]
                        buf[fill : fill + ln] = by_off[off]
                        items.append((cid, fill, ln))
                        fill += ln
                        i += 1
                    del buf
                except BaseException:
                    pool.release(slot)
                    raise
                pool.submit(slot, *self.epochs.current(), items)
        return cids

    def _unknown(
        self, cids: list[bytes], spans: list[tuple[int, int]]
    ) -> list[tuple[bytes, int, int]]:
        """(cid, offset, length) of the chunks neither in flight nor in the index, first
        occurrence only. In-flight chunks are checked before the index: a chunk committed
        between the two checks is then found in the index."""
        pool = self._sealers
        assert pool is not None
        seen: set[bytes] = set()
        cand: list[int] = []
        for i, cid in enumerate(cids):
            if cid in seen or cid in pool.inflight:
                continue
            seen.add(cid)
            cand.append(i)
        known = chunks.known(self.index, [cids[i] for i in cand])
        return [(cids[i], *spans[i]) for i in cand if cids[i] not in known]

    def _commit_sealed(self, reports: list[SegmentReport]) -> None:
        """Collector thread: queue the shard files of sealed segments and record them.

        Invariants 1 and 2: the shard files are fsync'd (by the sealer) and renamed into the
        queue, the queue directories fsync'd, and only then one transaction records the
        segments with their shards, chunks and audit tags."""
        p = self.params
        placed: list[tuple[int, SegmentReport, list[NewShard]]] = []
        dirs: set[Path] = set()
        for r in reports:
            seg_id = self.next_segment_id()
            where = shard_remotes(self.index, seg_id, p.n)
            placed.append((seg_id, r, self.queue.enqueue(segment.KIND_DATA, r.shards, where, dirs)))
        sync_dirs(dirs)
        now = time.time()
        with self.index.tx() as db:
            for seg_id, r, rows in placed:
                segments.insert(
                    db, seg_id, r.uid, "data", r.size, r.used, p.k, p.n, p.ec_alg, r.epoch,
                    r.root, now,
                )  # fmt: skip
                segments.add_queued_shards(db, seg_id, rows)
                audit.put_tags(db, [(sh.name, AUDIT_PIECE, sh.tags) for sh in r.shards])
                chunks.insert(db, [(cid, seg_id, off, ln, pl) for cid, off, ln, pl in r.chunks])

    def seal(self) -> None:
        """Make every chunk stored so far durable in the queue (padding open segments)."""
        with self.write_lock:
            if self._sealers is not None:
                self._sealers.seal()

    def next_segment_id(self) -> int:
        """A segment id no segment has or will get from another caller (ids increase)."""
        with self._seg_id_lock:
            nxt = max(segments.max_id(self.index) + 1, self._last_seg_id + 1)
            self._last_seg_id = nxt
            return nxt

    def write_shards(self, seg_id: int, kind: int, padded: bytes) -> tuple[list[NewShard], bytes]:
        """Erasure-code a padded segment on this thread and queue its shard objects durably
        (for index copies and rewritten segments; data goes through the sealers).
        Returns (shard rows, segment root); records the audit tags. The caller records the
        segment and the rows in a later transaction (invariant 1)."""
        p = self.params
        files = build_shard_files(padded, p.k, p.n, p.ec_alg, self.keys.audit_key)
        for meta, body in files:
            fd = write_new_file(str(self.queue.tmp / meta.name), body)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs: set[Path] = set()
        shards = [m for m, _b in files]
        rows = self.queue.enqueue(kind, shards, shard_remotes(self.index, seg_id, p.n), dirs)
        sync_dirs(dirs)
        with self.index.tx() as db:
            audit.put_tags(db, [(sh.name, AUDIT_PIECE, sh.tags) for sh in shards])
        return rows, merkle.root([r[6] for r in rows])

    def write_segment(
        self,
        builder: segment.SegmentBuilder,
        chunk_places: dict[bytes, tuple[int, int, int]],
    ) -> int:
        """Seal ``builder`` on this thread as a new data segment of the current key epoch and
        record it with ``chunk_places`` (cid -> (offset, record length,
        plain length); chunk rows that exist already are left alone). Returns its id.

        For repair, which holds :attr:`write_lock` around it; writes go through the sealers.
        """
        p = self.params
        seg_id = self.next_segment_id()
        uid = secrets.token_bytes(16)
        rows, root = self.write_shards(seg_id, segment.KIND_DATA, builder.padded())
        with self.index.tx() as db:
            segments.insert(
                db, seg_id, uid, "data", builder.padded_size(), builder.used, p.k, p.n,
                p.ec_alg, self.epochs.epoch, root, time.time(),
            )  # fmt: skip
            segments.add_queued_shards(db, seg_id, rows)
            chunks.insert(
                db, [(cid, seg_id, off, ln, pl) for cid, (off, ln, pl) in chunk_places.items()]
            )
        return seg_id
