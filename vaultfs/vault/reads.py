"""The read path: a chunk's plaintext from its segment, decoded from the local queue or
the remotes, with a small cache of decoded segments."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import envelope
from ..backends import Paces, open_backend
from ..errors import IntegrityError, RemoteError
from ..index import Index, chunks, segments, snapshots
from ..keys import VaultKeys
from ..remotes import Remote
from ..shardreader import ShardRef, read_segment
from .epochs import KeyEpochs
from .queue import ShardQueue
from .writer import Writer

log = logging.getLogger("vaultfs.vault")


class SegmentReads:
    """Reads chunks back (the mount, restore from a local vault, re-encryption).

    A chunk still with a sealer is sealed first through ``writer``; keys and the suite
    of each epoch come from ``epochs``."""

    def __init__(
        self,
        index: Index,
        keys: VaultKeys,
        epochs: KeyEpochs,
        writer: Writer,
        queue: ShardQueue,
        paces: Paces,
    ) -> None:
        self.index = index
        self.paces = paces  # the vault's: its remote reads share each remote's pace
        self.keys = keys
        self.epochs = epochs
        self.queue_dir: Path = queue.dir
        self._writer = writer
        self._seg_cache: OrderedDict[int, bytes] = OrderedDict()
        self._seg_cache_lock = threading.Lock()

    def forget(self, seg_ids: list[int]) -> None:
        """Drop segments ``seg_ids`` from the cache (they were rewritten)."""
        with self._seg_cache_lock:
            for sid in seg_ids:
                self._seg_cache.pop(sid, None)

    def segment_bytes(self, seg_id: int) -> bytes:
        """Decoded plaintext of a segment, from the local queue if still there, else remotes,
        through the shard reader: a corrupt or missing shard is read around (and logged with
        the remote that holds it) while k intact shards decode. Raises NotEnoughRemotes
        (fewer than k intact shards reachable) or IntegrityError (they do not decode)."""
        with self._seg_cache_lock:
            hit = self._seg_cache.get(seg_id)
            if hit is not None:
                self._seg_cache.move_to_end(seg_id)
                return hit
        g = segments.geometry(self.index, seg_id)
        if g is None:
            raise IntegrityError(f"segment {seg_id} is not in the index")
        kind, size, k, n, _uid, alg = g
        refs = []
        for idx, name, h, state, rid, spec in segments.shard_holders(self.index, seg_id):
            local = (self.queue_dir / f"r{rid}" / kind / name).exists()
            if local or state in ("placed", "queued"):
                holder = "the upload queue" if local else Remote(spec).label
                refs.append(ShardRef(idx, name, h, holder, local, (rid, spec, state)))
        read = read_segment(
            refs, k, n, size, _QueueOrRemote(self.queue_dir, kind, self.paces), f"segment {seg_id}",
            alg=alg, audit_key=self.keys.audit_key,
        )  # fmt: skip
        for lie in read.lies:
            log.warning("segment %d: read around %s", seg_id, lie)
        with self._seg_cache_lock:
            self._seg_cache[seg_id] = read.data
            while len(self._seg_cache) > 4:
                self._seg_cache.popitem(last=False)
        return read.data

    def read_chunk(self, cid: bytes) -> bytes:
        """A chunk's plaintext. A chunk still with a sealer is sealed first (so it reads
        back at once, like everything stored)."""
        pool = self._writer.sealers
        if pool is not None and cid in pool.inflight:
            self._writer.seal()
        row = chunks.location(self.index, cid)
        if row is None:
            raise IntegrityError("chunk not in the index")
        seg, off, ln, epoch = row
        suite = self.epochs.epoch_suites.get(epoch, 0)
        self.keys.check_suite(suite)  # refuses retired and unknown suites
        data = self.segment_bytes(seg)
        return envelope.open_chunk(
            self.keys.data_keys[epoch], self.keys.vault_id, cid, data[off : off + ln], suite
        )

    def iter_file(self, entry_id: int) -> Iterator[bytes]:
        """The plaintext chunks of a file entry, in order (see :meth:`read_chunk`)."""
        for cid in snapshots.file_chunk_ids(self.index, entry_id):
            yield self.read_chunk(cid)


class _QueueOrRemote:
    """The read path's shard transport: a shard's copy in the upload queue, else one read
    from its remote. ``ShardRef.tag`` is (remote id, spec, shard state)."""

    def __init__(self, queue_dir: Path, kind: str, paces: Paces) -> None:
        self.queue_dir = queue_dir
        self.kind = kind
        self.paces = paces

    def fetch(self, refs: Sequence[ShardRef]) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for ref in refs:
            rid, spec, state = ref.tag
            with contextlib.suppress(FileNotFoundError):
                out[ref.name] = (self.queue_dir / f"r{rid}" / self.kind / ref.name).read_bytes()
                continue
            if state in ("placed", "queued"):
                # 'queued' with no queue file: a concurrent flush has just uploaded it
                try:
                    out[ref.name] = open_backend(spec, rid, paces=self.paces).cat(
                        self.kind, ref.name
                    )
                except RemoteError as e:
                    out[ref.name] = e.message
        return out
