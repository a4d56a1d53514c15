"""The mount's chunk reader: chunk plaintext for the live tree and every snapshot view, from
memory, the local read cache, or range reads of just the data-shard bytes that hold a record.

Where a chunk comes from, first hit wins:

1. a small in-memory LRU of recently read chunks (``memory`` bytes);
2. the local read cache (:mod:`vaultfs.readcache`, pack files on disk, every hit checked:
   a whole chunk against its id, a few pages against their in-memory tags);
3. a **range read**: the code is systematic (docs/format.md 7.3), so data shard *i* of a
   segment holds segment bytes [i·P, (i+1)·P) at object offset 5 + 80, whitened; the reader
   fetches only the 64 KiB Merkle blocks of the data shards that cover the chunk's record,
   checks each against its leaf in ``shards.blocks`` (docs/format.md 8: leaves are over the
   stored bytes), unwhitens just the record's bytes (the keystream is seekable, docs/format.md
   7.1) and opens the record (AEAD). Shard
   bytes are read from the upload queue's copy, in place from a plain local-directory remote,
   or with a ranged read through the remote's backend (at least 1 MiB); verified blocks are
   kept in a small LRU so neighbouring chunks cost no second read;
4. whenever a range read cannot deliver (a data shard missing or unreachable, a block whose
   leaf does not match, a record that does not open, a chunk still with a sealer):
   ``Vault.read_chunk``, the whole-segment shard reader, which decodes around lost and lying
   shards.

Every chunk fetched from the vault goes into the memory LRU and the read cache. Fetches run on
a pool of worker threads (never the FUSE loop): :meth:`ChunkReader.read_many` reads the read
cache's hits of one request in one pass and fetches the rest in parallel, and
:meth:`ChunkReader.prefetch` starts read-ahead in jobs of neighbouring chunks without
waiting; a chunk being fetched is fetched once, whoever asks for it. Only
:meth:`ChunkReader.read_inline` runs in the FUSE loop: memory slices, and pages the read cache
can check and read without waiting for the disk.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import envelope, erasure, merkle, segment
from .backends import open_backend
from .errors import RemoteError, VaultError
from .index import chunks as chunk_table
from .index import segments as segment_table
from .readcache import ReadCache
from .remotes import Remote
from .vault import Vault

log = logging.getLogger("vaultfs.chunkreader")

#: shard object bytes before the payload: shard header, then the liberasurecode header
PAYLOAD_AT = segment.HEADER_SIZE + erasure.FRAGMENT_HEADER
BLOCK = merkle.BLOCK_SIZE
WORKERS = 4
MEMORY = 32 * 1024 * 1024
#: at most this many read-ahead jobs queued or running at once
PREFETCH_LIMIT = 16
#: chunks per read-ahead job (about 1 MiB of 32 KiB chunks)
PREFETCH_BATCH = 32
#: at most this many bytes of one request are read from the read cache in the FUSE loop
INLINE_PEEK = 64 * 1024
_BLOCKS_KEPT = 128  # verified 64 KiB shard blocks (8 MiB)
#: a read through rclone (a process per call) takes at least this much of the shard, so the
#: neighbouring chunks of a sequential read cost no further call
REMOTE_SPAN = 16 * BLOCK
_LAYOUTS_KEPT = 256  # segments whose data-shard rows are known


class _RangeFailed(Exception):
    """A range read could not deliver; the whole-segment reader takes over."""


class _Shard:
    __slots__ = ("idx", "name", "size", "leaves", "paths", "spec", "rid")

    def __init__(
        self, idx: int, name: str, size: int, leaves: bytes, paths: list[Path], spec: str, rid: int
    ):
        self.idx = idx  # with the name, what the object's whitening is keyed by
        self.name = name
        self.size = size
        self.leaves = leaves
        self.paths = paths  # local copies to try in order (upload queue, local-dir remote)
        self.spec = spec  # else through the remote's backend
        self.rid = rid


class ChunkReader:
    """Chunk plaintext by id (see the module docstring for the order of sources). Thread-safe;
    :meth:`close` stops the worker pool."""

    def __init__(self, vault: Vault, cache: ReadCache, memory: int = MEMORY) -> None:
        self.vault = vault
        self.cache = cache
        self.memory = memory
        self._lock = threading.Lock()
        self._mem: OrderedDict[bytes, bytes] = OrderedDict()
        self._mem_used = 0
        self._inflight: dict[bytes, Future] = {}
        self._prefetching = 0
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._layouts: OrderedDict[int, tuple[int, int, int, dict[int, _Shard]]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="chunkread")
        self.stats = {"range_reads": 0, "segment_reads": 0, "prefetched": 0, "shard_bytes": 0}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- public reads ---------------------------------------------------------------------------
    def read(self, cid: bytes) -> bytes:
        """A chunk's plaintext. Raises VaultError (NotEnoughRemotes, IntegrityError) only when
        the whole-segment reader cannot produce it either."""
        return self.read_many([cid])[0]

    def read_many(self, cids: Sequence[bytes]) -> list[bytes]:
        """Plaintexts of ``cids`` (in order): from memory, then the read cache in one pass
        (neighbouring records with one ``pread``), the rest fetched in parallel: the first in
        the calling thread (a single chunk costs no hand-over), the others on the pool."""
        out = self._from_memory(cids)
        missing = list(dict.fromkeys(c for c, got in zip(cids, out, strict=True) if got is None))
        futures, mine = self._claim(missing)
        self._serve(mine, inline=True)
        for i, c in enumerate(cids):
            if out[i] is None:
                out[i] = futures[c].result()
        return out  # type: ignore[return-value]

    def prefetch(self, cids: Sequence[bytes]) -> None:
        """Start fetching ``cids`` in the background (read-ahead) and return at once, in
        batches of :data:`PREFETCH_BATCH` (neighbours in the read cache cost one read);
        skipped beyond :data:`PREFETCH_LIMIT` batches in flight. Cheap enough for the FUSE
        loop."""
        with self._lock:
            todo = [
                c for c in dict.fromkeys(cids) if c not in self._mem and c not in self._inflight
            ]
        for i in range(0, len(todo), PREFETCH_BATCH):
            with self._lock:
                if self._prefetching >= PREFETCH_LIMIT:
                    return
                self._prefetching += 1
            batch = todo[i : i + PREFETCH_BATCH]
            self._pool.submit(self._prefetch_batch, batch)

    def read_inline(
        self, parts: Sequence[tuple[bytes, int, int]], wait: bool = False
    ) -> bytes | None:
        """The concatenation of ``data[lo:hi]`` for each (cid, lo, hi) if every piece is in
        memory or its pages in the read cache (checked page by page), else None (then
        :meth:`read_slices`). At most :data:`INLINE_PEEK` bytes are read from the read cache
        this way. Unless ``wait``, only pages in the page cache are read: never blocks, for
        the FUSE loop."""
        pieces: list[bytes | memoryview] = []
        peeked = 0
        mem = self._from_memory([c for c, _lo, _hi in parts])
        for (c, lo, hi), data in zip(parts, mem, strict=True):
            if data is not None:
                pieces.append(memoryview(data)[lo:hi])
                continue
            peeked += hi - lo
            if peeked > INLINE_PEEK:
                return None
            got = self.cache.peek(c, lo, hi, wait)
            if got is None:
                return None
            pieces.append(got)
        return b"".join(pieces)

    def keep(self, cid: bytes, data: bytes) -> None:
        """A chunk just stored from the write-back cache: keep it in the read cache, so data
        written reads back without a fetch once its cache file is gone."""
        self.cache.put(cid, data)

    def read_range(self, chunks: Sequence[tuple[bytes, int]], start: int, size: int) -> bytes:
        """Bytes [start, start+size) of the content made of ``chunks`` ((cid, length) in
        order), zeros past its end."""
        out = self.read_slices(_content_slices(chunks, start, size))
        return out + bytes(size - len(out)) if len(out) < size else out

    def read_range_inline(
        self, chunks: Sequence[tuple[bytes, int]], start: int, size: int
    ) -> bytes | None:
        """:meth:`read_range` if it can be served without blocking (:meth:`read_inline`),
        else None."""
        out = self.read_inline(_content_slices(chunks, start, size))
        if out is None:
            return None
        return out + bytes(size - len(out)) if len(out) < size else out

    def read_slices(self, parts: list[tuple[bytes, int, int]]) -> bytes:
        """The concatenation of ``data[lo:hi]`` for each (cid, lo, hi). A small read of
        chunks whose pages are tagged reads just those pages (a 4 KiB random read costs
        4 KiB from the disk, not the chunk)."""
        small = self.read_inline(parts, wait=True)
        if small is not None:
            return small
        datas = self.read_many([c for c, _lo, _hi in parts])
        return b"".join(memoryview(d)[lo:hi] for d, (_c, lo, hi) in zip(datas, parts, strict=True))

    # -- plumbing ------------------------------------------------------------------------------
    def _from_memory(self, cids: Sequence[bytes]) -> list[bytes | None]:
        """The memory LRU's copy of each of ``cids`` (None if not there), under one take of
        the lock: the FUSE loop must not queue behind the workers once per chunk."""
        with self._lock:
            out = [self._mem.get(c) for c in cids]
            for c, data in zip(cids, out, strict=True):
                if data is not None:
                    self._mem.move_to_end(c)
        return out

    def _claim(self, cids: Sequence[bytes]) -> tuple[dict[bytes, Future], list[bytes]]:
        """The future of each of ``cids``, and those of them the caller now fetches (not
        in flight before): it must settle each of those with :meth:`_serve`."""
        futures: dict[bytes, Future] = {}
        mine: list[bytes] = []
        with self._lock:
            for c in cids:
                fut = self._inflight.get(c)
                if fut is None:
                    fut = self._inflight[c] = Future()
                    mine.append(c)
                futures[c] = fut
        return futures, mine

    def _serve(self, cids: Sequence[bytes], inline: bool) -> None:
        """Fetch claimed ``cids``: the read cache's hits at once, the misses from the vault
        (the first here when ``inline``, the rest on the pool). A read of one or two chunks
        (random access, not a stream) has their pages tagged, for later small reads."""
        if not cids:
            return
        try:
            hits = self.cache.get_many(cids, tag=len(cids) <= 2)
        except BaseException as e:
            for c in cids:
                self._settle(c, None, e)
            raise
        misses = []
        for c in cids:
            if c in hits:
                self._settle(c, hits[c], None)
            else:
                misses.append(c)
        for n, c in enumerate(misses):
            if inline and n == 0:
                self._fetch_settle(c)
                continue
            try:
                self._pool.submit(self._fetch_settle, c)
            except RuntimeError as e:  # the pool is shut down (unmounting)
                self._settle(c, None, e)

    def _fetch_settle(self, cid: bytes) -> None:
        try:
            data = self._fetch(cid)
        except BaseException as e:  # handed to every waiter
            self._settle(cid, None, e)
            return
        self._settle(cid, data, None)  # waiters first: keeping it on disk can follow
        self.cache.put(cid, data)

    def _settle(self, cid: bytes, data: bytes | None, exc: BaseException | None) -> None:
        """Keep a claimed chunk in memory and wake its waiters."""
        with self._lock:
            fut = self._inflight.pop(cid)
            if data is not None and cid not in self._mem and len(data) <= self.memory:
                self._mem[cid] = data
                self._mem_used += len(data)
                while self._mem_used > self.memory:
                    _c, old = self._mem.popitem(last=False)
                    self._mem_used -= len(old)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(data)

    def _prefetch_batch(self, cids: list[bytes]) -> None:
        try:
            self._serve(self._claim(cids)[1], inline=True)
        except Exception as e:  # read-ahead only: the read itself will say
            log.debug("read-ahead failed: %s", e)
        finally:
            with self._lock:
                self._prefetching -= 1
                self.stats["prefetched"] += len(cids)

    def _fetch(self, cid: bytes) -> bytes:
        try:
            data = self._range_read(cid)
            with self._lock:
                self.stats["range_reads"] += 1
            return data
        except (_RangeFailed, OSError, RemoteError) as e:
            log.debug("range read of a chunk failed (%s): whole segment", e)
        except VaultError as e:  # a record that did not open, a refused suite
            log.info("range read of a chunk failed (%s): whole segment", e.message)
        with self._lock:
            self.stats["segment_reads"] += 1
        return self.vault.read_chunk(cid)

    # -- range reads ---------------------------------------------------------------------------
    def _range_read(self, cid: bytes) -> bytes:
        vault = self.vault
        row = chunk_table.location(vault.index, cid)
        if row is None:
            raise _RangeFailed("chunk not in the index yet (with a sealer)")
        seg, off, ln, epoch = row
        suite = vault.epoch_suites.get(epoch, 0)
        vault.keys.check_suite(suite)
        k, payload, _size, shards = self._layout(seg)
        record = bytearray()
        pos, end = off, off + ln
        while pos < end:
            i, a = divmod(pos, payload)
            b = min(end - i * payload, payload)
            shard = shards.get(i)
            if i >= k or shard is None:
                raise _RangeFailed(f"data shard {i} of segment {seg} is not readable")
            stored = self._shard_bytes(shard, PAYLOAD_AT + a, PAYLOAD_AT + b)
            record += segment.whiten(
                vault.keys.audit_key, shard.name, shard.idx, stored, erasure.FRAGMENT_HEADER + a
            )
            pos = i * payload + b
        return envelope.open_chunk(vault.keys.data_keys[epoch], vault.keys.vault_id, cid, record, suite)  # fmt: skip

    def _layout(self, seg: int) -> tuple[int, int, int, dict[int, _Shard]]:
        """(k, payload length P, segment size, {data shard idx: shard}) of a data segment."""
        with self._lock:
            hit = self._layouts.get(seg)
            if hit is not None:
                self._layouts.move_to_end(seg)
                return hit
        vault = self.vault
        g = segment_table.geometry(vault.index, seg)
        if g is None or g[0] != "data":
            raise _RangeFailed(f"segment {seg} is not a data segment in the index")
        kind, size, k = g[:3]
        shards: dict[int, _Shard] = {}
        sizes = set()
        for idx, name, osize, leaves, state, rid, spec in segment_table.data_shard_blocks(
            vault.index, seg, k
        ):
            sizes.add(osize)
            if state not in ("placed", "queued"):
                continue
            paths = [vault.queue_dir / f"r{rid}" / kind / name]
            if (d := Remote(spec, rid).local_dir) is not None:
                paths.append(d / kind / name)
            shards[idx] = _Shard(idx, name, osize, bytes(leaves), paths, spec, rid)
        if len(sizes) != 1:
            raise _RangeFailed(f"segment {seg}: data shards of differing sizes")
        payload = sizes.pop() - PAYLOAD_AT
        if payload * k < size:
            raise _RangeFailed(f"segment {seg}: shards too short for its size")
        layout = (k, payload, size, shards)
        with self._lock:
            self._layouts[seg] = layout
            while len(self._layouts) > _LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return layout

    def _shard_bytes(self, shard: _Shard, lo: int, hi: int) -> bytes:
        """Stored object bytes [lo, hi) of a shard, each 64 KiB block checked against its
        leaf (still whitened)."""
        first, last = lo // BLOCK, (hi - 1) // BLOCK
        blocks: list[bytes] = []
        need: list[int] = []
        with self._lock:
            for b in range(first, last + 1):
                got = self._blocks.get((shard.name, b))
                if got is not None:
                    self._blocks.move_to_end((shard.name, b))
                blocks.append(got)  # type: ignore[arg-type]
                if got is None:
                    need.append(b)
        if need:
            start, stop = need[0] * BLOCK, min((need[-1] + 1) * BLOCK, shard.size)
            raw = self._object_range(shard, start, stop)
            if len(raw) < stop - start:
                raise _RangeFailed(f"shard {shard.name}: short read")
            view = memoryview(raw)
            got: dict[int, bytes] = {}
            for i in range(0, len(raw), BLOCK):  # what was asked for, and any span beyond
                b = need[0] + i // BLOCK
                block = bytes(view[i : i + BLOCK])
                if merkle.leaf_hash(block) != shard.leaves[32 * b : 32 * b + 32]:
                    raise _RangeFailed(f"shard {shard.name}: block {b} does not match its leaf")
                got[b] = block
            for b in range(need[0], need[-1] + 1):
                blocks[b - first] = got[b]
            with self._lock:
                self.stats["shard_bytes"] += len(raw)
                self._blocks.update(((shard.name, b), block) for b, block in got.items())
                while len(self._blocks) > _BLOCKS_KEPT:
                    self._blocks.popitem(last=False)
        joined = b"".join(blocks)
        return joined[lo - first * BLOCK : hi - first * BLOCK]

    def _object_range(self, shard: _Shard, start: int, stop: int) -> bytes:
        """Object bytes from ``start``: exactly up to ``stop`` from a local copy; through
        rclone at least :data:`REMOTE_SPAN` (block-aligned, at most the object's end)."""
        for p in shard.paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                return os.pread(fd, stop - start, start)
            finally:
                os.close(fd)
        stop = min(max(stop, start + REMOTE_SPAN), shard.size)
        b = open_backend(shard.spec, shard.rid, paces=self.vault.paces)  # the vault's pace
        return b.cat("data", shard.name, start, stop - start)


def _content_slices(
    chunks: Sequence[tuple[bytes, int]], start: int, size: int
) -> list[tuple[bytes, int, int]]:
    """:func:`slices` for content given only as ``chunks``: one walk that stops past the end
    (on the path of every warm request, so no list of starts is built)."""
    out = []
    end = start + size
    pos = 0
    for cid, n in chunks:
        nxt = pos + n
        if nxt > start:
            if pos >= end:
                break
            lo, hi = max(start - pos, 0), min(end - pos, n)
            if hi > lo:
                out.append((cid, lo, hi))
        pos = nxt
    return out


def slices(
    starts: Sequence[int], chunks: Sequence[tuple[bytes, int]], off: int, size: int
) -> list[tuple[bytes, int, int]]:
    """(cid, lo, hi) pieces covering bytes [off, off+size) of content made of ``chunks``
    starting at ``starts`` (stops at the content's end)."""
    out = []
    i = max(bisect.bisect_right(starts, off) - 1, 0)
    end = off + size
    while i < len(chunks) and starts[i] < end:
        cid, n = chunks[i]
        lo, hi = max(off - starts[i], 0), min(end - starts[i], n)
        if hi > lo:
            out.append((cid, lo, hi))
        i += 1
    return out
