"""The read path: a chunk's plaintext from its segment, decoded from the local queue or
the remotes, with a small cache of decoded segments."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import envelope, segment
from ..errors import IntegrityError, NotEnoughRemotes
from ..index import Index
from ..keys import VaultKeys
from ..remotes import Remote, RemoteError
from ..sealer import SealerPool
from .epochs import KeyEpochs
from .queue import ShardQueue
from .writer import Writer


class SegmentReads:
    """Reads chunks back (the mount, restore from a local vault, re-encryption).

    A chunk still with a sealer is sealed first through ``writer``; keys and the suite
    of each epoch come from ``epochs``."""

    def __init__(
        self, index: Index, keys: VaultKeys, epochs: KeyEpochs, writer: Writer, queue: ShardQueue
    ) -> None:
        self.index = index
        self.keys = keys
        self.epochs = epochs
        self.queue_dir: Path = queue.dir
        self.seal: Callable[[], None] = writer.seal
        self._writer = writer
        self._seg_cache: OrderedDict[int, bytes] = OrderedDict()
        self._seg_cache_lock = threading.Lock()

    # segment_bytes, read_chunk and iter_file moved here from the Vault class as they were:
    # they keep the names they used there (seal, queue_dir, and these two)
    @property
    def epoch_suites(self) -> dict[int, int]:
        """Suite of every key epoch."""
        return self.epochs.epoch_suites

    @property
    def _sealers(self) -> SealerPool | None:
        return self._writer.sealers

    def forget(self, seg_ids: list[int]) -> None:
        """Drop segments ``seg_ids`` from the cache (they were rewritten)."""
        with self._seg_cache_lock:
            for sid in seg_ids:
                self._seg_cache.pop(sid, None)

    def segment_bytes(self, seg_id: int) -> bytes:
        """Decoded plaintext of a segment, from the local queue if still there, else remotes."""
        with self._seg_cache_lock:
            hit = self._seg_cache.get(seg_id)
            if hit is not None:
                self._seg_cache.move_to_end(seg_id)
                return hit
        g = self.index.one("SELECT kind, size, k, n FROM segments WHERE id=?", (seg_id,))
        if g is None:
            raise IntegrityError(f"segment {seg_id} is not in the index")
        kind, size, k, n = g
        shards = self.index.q(
            "SELECT s.idx, s.name, s.hash, s.state, s.remote, r.spec FROM shards s"
            " JOIN remotes r ON r.id = s.remote WHERE s.segment=? ORDER BY s.idx",
            (seg_id,),
        )
        good: list[bytes] = []
        for _idx, name, h, state, rid, spec in shards:
            if len(good) >= k:
                break
            body = None
            qf = self.queue_dir / f"r{rid}" / kind / name
            with contextlib.suppress(FileNotFoundError):
                body = qf.read_bytes()
            if body is None and state in ("placed", "queued"):
                # 'queued' with no queue file: a concurrent flush has just uploaded it
                try:
                    body = Remote(spec, rid).cat(kind, name)
                except RemoteError:
                    body = None
            if body is not None and segment.object_hash(body) == h:
                good.append(body)
        if len(good) < k:
            raise NotEnoughRemotes(
                f"segment {seg_id}: only {len(good)} intact shards reachable, need {k}"
            )
        data = segment.decode_segment(good, k, n, size)
        with self._seg_cache_lock:
            self._seg_cache[seg_id] = data
            while len(self._seg_cache) > 4:
                self._seg_cache.popitem(last=False)
        return data

    def read_chunk(self, cid: bytes) -> bytes:
        """A chunk's plaintext. A chunk still with a sealer is sealed first (so it reads
        back at once, like everything stored)."""
        pool = self._sealers
        if pool is not None and cid in pool.inflight:
            self.seal()
        row = self.index.one(
            "SELECT c.segment, c.offset, c.length, g.epoch FROM chunks c JOIN segments g"
            " ON g.id = c.segment WHERE c.cid=?",
            (cid,),
        )
        if row is None:
            raise IntegrityError("chunk not in the index")
        seg, off, ln, epoch = row
        suite = self.epoch_suites.get(epoch, 0)
        self.keys.check_suite(suite)  # refuses retired and unknown suites
        data = self.segment_bytes(seg)
        return envelope.open_chunk(
            self.keys.data_keys[epoch], self.keys.vault_id, cid, data[off : off + ln], suite
        )

    def iter_file(self, entry_id: int) -> Iterator[bytes]:
        for (cid,) in self.index.q(
            "SELECT c.cid FROM entry_chunks e JOIN chunks c ON c.id = e.chunk WHERE e.entry=? ORDER BY e.seq",
            (entry_id,),
        ):
            yield self.read_chunk(cid)
