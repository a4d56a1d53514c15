"""The storage engine: a vault's local state plus the write path (chunk → encrypt → segment →
erasure code → queue → remotes) and the commit protocol.

:class:`Vault` is the one object callers hold (the CLI, the mount, backup, restore, repair,
prune, verify, rotation, receipts): a facade over the parts, each in its own module:

- ``home.py``      opening: the home directory's files, the process lock, making a vault
- ``recovery.py``  crash recovery when a vault is opened (queue ↔ index)
- ``queue.py``     the upload queue on disk and durable writes into it
- ``epochs.py``    key epochs: which data key new writes use, loading them from the index
- ``writer.py``    the write path: store, dedup, sealers, shard queueing (invariants 1, 2)
- ``placement.py`` which remote each shard goes to; failure domains survivable
- ``commit.py``    snapshots and index shipping: index copy, signed manifest (invariant 3)
- ``uploads.py``   flushing the queue to the remotes, pruning old index copies (4, 5, 6)
- ``rewrite.py``   replacing data segments (re-encryption, repacking)
- ``health.py``    ``vaultfs status``: placement, remotes' health, losses survivable
- ``reads.py``     the read path: chunks from segments, queue or remotes

The ordering invariants (numbered as in docs/design.md, which has the crash-state table)
are stated in the module that enforces them. The SQL is in vaultfs/index/ (named queries).

CPU-heavy work (hashing, AEAD, erasure coding) runs in sealer processes or a thread pool;
callers on an event loop should call the blocking methods from a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from .. import chain, segment
from ..backends import Backend, Paces, open_backend
from ..chunker import Chunker
from ..index import Index, VaultParams, keyring
from ..index import remotes as remote_table
from ..index import segments as segment_table
from ..index.settings import DEFAULT_SEGMENT_SIZE
from ..index.shipped import ShippedObjects
from ..keys import VaultKeys
from ..sealer import SealerPool
from . import commit, health, recovery, rewrite, uploads
from .commit import Committer, Entry
from .epochs import KeyEpochs
from .home import default_home, initialize, load
from .placement import place, survivable_losses
from .queue import ShardQueue
from .reads import SegmentReads
from .uploads import FlushReport, UploadQueue
from .writer import Writer

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "Entry",
    "FlushReport",
    "Vault",
    "default_home",
    "place",
    "survivable_losses",
]


class Vault:
    """An open vault. Use :meth:`create` or :meth:`open`; close with :meth:`close`.

    Public attributes: ``home``, ``keys``, ``index`` (the :class:`Index`), ``params``
    (:class:`VaultParams`) and their ``k``, ``n``, ``segment_size``, ``ec_alg``;
    ``chunker``; ``epoch``, ``suite``, ``epoch_suites`` (key epochs); ``write_lock``.
    """

    #: Sealer processes (vaultfs/sealer.py); 0 seals inline on the calling thread.
    SEALERS = int(os.environ.get("VAULTFS_SEALERS", "2"))
    #: How many of the newest manifests (and the index copies they name) stay on the remotes.
    KEEP_INDEX_COPIES = uploads.KEEP_INDEX_COPIES

    def __init__(self, home: Path, keys: VaultKeys, index: Index, lock_fd: int | None) -> None:
        self.home = home
        self.keys = keys
        self.index = index
        self._lock_fd = lock_fd
        self.params = VaultParams.read(index)
        self.queue = ShardQueue(home)
        self.epochs = KeyEpochs(keys, index, threading.RLock())
        self.writer = Writer(index, keys, self.params, self.queue, self.epochs, self.SEALERS)
        #: each remote's adaptive concurrency, shared by every backend this vault opens
        self.paces = Paces()
        self.uploads = UploadQueue(
            index, keys, self.queue, self.remotes, self.writer.seal, self.params.immutable
        )
        self.committer = Committer(
            index,
            keys,
            self.params,
            self.epochs,
            self.writer,
            self.queue,
            self.remotes,
            self.uploads.prepush,
            ShippedObjects(home / "index-objects.db"),
        )
        self.reads = SegmentReads(index, keys, self.epochs, self.writer, self.queue, self.paces)

    # -- lifecycle (home.py, recovery.py) ---------------------------------------------------
    @classmethod
    def create(
        cls,
        home: Path,
        remote_specs: list[str],
        k: int,
        n: int,
        passphrase: str,
        seed: bytes | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        immutable: bool = False,
        object_lock: str | None = None,
    ) -> Vault:
        """Make a new k-of-n vault at ``home`` over ``remote_specs`` (empty locations), with
        a new key (or the one of ``seed``) kept in a keyfile under ``passphrase``;
        ``immutable`` makes it append-only (:attr:`immutable`), ``object_lock`` records the
        retention its S3 remotes lock objects for (the specs carry it: objectlock.lock_spec).
        All or nothing (:func:`~vaultfs.vault.home.initialize`): on an error, also one
        opening the new vault, nothing is left at ``home``."""
        with initialize(
            home, remote_specs, k, n, passphrase, seed, segment_size, immutable, object_lock
        ) as (keys, index, lock):
            return cls(home, keys, index, lock)

    @classmethod
    def open(
        cls,
        home: Path,
        passphrase: str | None = None,
        keys: VaultKeys | None = None,
        lock: bool = True,
    ) -> Vault:
        """Open the vault at ``home``; with ``lock`` (the default) take its lock and
        recover from a crash (:meth:`recover`). Raises NoVault or VaultBusy."""
        v = cls(home, *load(home, passphrase, keys, lock))
        if lock:
            v.recover()
        return v

    def close(self) -> None:
        """Stop the sealers and close the index. Chunks stored since the last :meth:`seal`
        (or commit) are discarded: nothing acknowledged refers to them. An upload a quorum
        flush left running goes on into closed paces: it holds back no later vault."""
        self.writer.close()
        self.uploads.close()
        self.paces.close()
        if "pool" in self.__dict__:
            self.pool.shutdown(wait=True)
        self.index.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        """Bring the queue directory and the index back in line after a crash
        (:func:`vaultfs.vault.recovery.recover`)."""
        recovery.recover(self.index, self.queue)

    # -- parameters and keys (epochs.py) ---------------------------------------------------
    @property
    def k(self) -> int:
        return self.params.k

    @property
    def immutable(self) -> bool:
        """An append-only vault: nothing here asks a remote to delete, move or overwrite an
        object. Replaced objects stay on the remotes, listed as garbage (kept, never deleted);
        prune refuses (:class:`~vaultfs.errors.ImmutableVault`). The protection against a
        thief of this machine's credentials is the server's lock, not this flag
        (docs/threat-model.md, "Immutable vaults")."""
        return self.params.immutable

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def segment_size(self) -> int:
        return self.params.segment_size

    @property
    def ec_alg(self) -> int:
        """Erasure algorithm of new segments."""
        return self.params.ec_alg

    @property
    def chunker(self) -> Chunker:
        return self.writer.chunker

    @property
    def queue_dir(self) -> Path:
        return self.queue.dir

    @property
    def epoch(self) -> int:
        """Key epoch new writes use."""
        return self.epochs.epoch

    @property
    def suite(self) -> int:
        """Crypto suite new epochs and manifests use."""
        return self.epochs.suite

    @property
    def epoch_suites(self) -> dict[int, int]:
        """Suite of every key epoch."""
        return self.epochs.epoch_suites

    @property
    def write_lock(self) -> threading.RLock:
        """Held by every writer of segments. Code outside the engine that writes segments
        (repair) holds it around :meth:`write_segment` and its transaction."""
        return self.writer.write_lock

    @cached_property
    def pool(self) -> ThreadPoolExecutor:
        """Threads for CPU work outside the write path (re-encryption re-seals records)."""
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="vaultfs-cpu")

    def reload_keys(self) -> None:
        """Re-read key epochs and suites after a rotation or re-encryption step."""
        self.epochs.reload()

    def begin_epoch(self, suite: int) -> int:
        """Seal what is open, then make a new key epoch (a fresh random data key wrapped to
        ``suite``) the one new writes use. Returns the new epoch number."""
        self.keys.check_suite(suite)
        with self.write_lock:
            self.seal()
            return self.epochs.begin(suite)

    def complete_slhdsa(self) -> bool:
        """Give a vault made by an older vaultfs the SLH-DSA key pair it lacks: generate it,
        store it in the index and ship a manifest signed by it (the caller flushes).
        Idempotent: returns False, changing nothing, when the vault already has one."""
        if keyring.slhdsa(self.index) is not None:
            return False
        self.keys.generate_slhdsa()
        with self.index.tx() as db:
            keyring.set_slhdsa(db, self.keys)
            keyring.add_active_suite(db, self.suite, time.time())
        self.ship_index()
        return True

    def remotes(self) -> list[Backend]:
        """The active remotes, in placement order, within this vault's :attr:`paces`."""
        return [
            open_backend(spec, rid, paces=self.paces)
            for rid, spec in remote_table.active(self.index)
        ]

    # -- write path (writer.py) ------------------------------------------------------------
    def start_sealers(self) -> SealerPool:
        """Start the sealer processes now (see :meth:`Writer.start_sealers`)."""
        return self.writer.start_sealers()

    def store_stream(
        self,
        stream: BinaryIO,
        progress: Callable[[int], None] | None = None,
        bounded: bool = False,
    ) -> tuple[list[bytes], int]:
        """Chunk, deduplicate, encrypt and pack a stream; returns (chunk ids, total bytes).
        Durable only after :meth:`seal` or :meth:`commit` (:meth:`Writer.store_stream`).
        ``bounded`` (a backup that uploads) keeps the queue within its bound by uploading
        meanwhile (:meth:`UploadQueue.drain`)."""
        return self.writer.store_stream(stream, progress, self.uploads.drain if bounded else None)

    def store_chunks(self, chunks: Sequence[bytes | memoryview]) -> list[bytes]:
        """Store a batch of chunks (deduplicated, views allowed); return their ids in order."""
        return self.writer.store_chunks(chunks)

    def seal(self) -> None:
        """Make every chunk stored so far durable in the queue (padding open segments)."""
        self.writer.seal()

    def write_segment(
        self, builder: segment.SegmentBuilder, chunks: dict[bytes, tuple[int, int, int]]
    ) -> int:
        """Seal ``builder`` on this thread as a new data segment and record it with
        ``chunks``; for repair, holding :attr:`write_lock` (:meth:`Writer.write_segment`)."""
        return self.writer.write_segment(builder, chunks)

    # -- snapshots and commit (commit.py) --------------------------------------------------
    def commit(
        self,
        entries: Iterable[Entry],
        name: str | None = None,
        prepush: bool = False,
        kb: dict | None = None,
        fork: bool = False,
    ) -> tuple[str, int]:
        """Record a snapshot of ``entries`` (with its knowledge-base summary ``kb``, if it
        holds one), then export and sign the index; returns (snapshot uid, manifest seq),
        durable locally. Raises StaleBase on a stale base unless ``fork``
        (:meth:`Committer.commit`)."""
        return self.committer.commit(entries, name, prepush, kb=kb, fork=fork)

    def survey_ahead(self) -> Callable[[], chain.Survey]:
        """Start the next :meth:`commit`'s base check now, beside the caller's work before it;
        returns a function that waits for it (:meth:`Committer.survey_ahead`)."""
        return self.committer.survey_ahead()

    def ship_index(self) -> int:
        """Export and sign the index as a new manifest without recording a snapshot; returns
        the manifest seq, durable locally, placed by :meth:`flush`."""
        return self.committer.ship_index()

    def delete_snapshot(self, uid: str) -> int:
        """Forget snapshot ``uid`` and ship the index; returns the manifest seq. Raises
        InputError when no snapshot has that id."""
        return self.committer.delete_snapshots([uid])

    def delete_snapshots(self, uids: list[str]) -> int:
        """Forget every snapshot of ``uids`` at once (one index copy shipped, as `forget`
        wants); returns the manifest seq. InputError, and none forgotten, when one of the ids
        names no snapshot."""
        return self.committer.delete_snapshots(uids)

    @staticmethod
    def mark_unshipped(db: sqlite3.Connection) -> None:
        """Inside a transaction that changes where shards are (repair, a segment rewrite):
        note that the index copy on the remotes is out of date until the next
        :meth:`ship_index`."""
        commit.mark_unshipped(db)

    # -- segment rewriting (rewrite.py) ----------------------------------------------------
    def replace_segment(
        self, old_id: int, records: list[tuple[bytes, bytes, int]], epoch: int
    ) -> int:
        """Atomically replace data segment ``old_id`` by a new one holding ``records``
        ((chunk id, record sealed under ``epoch``, plaintext length)); returns the new id.
        See :meth:`rewrite_segments`."""
        seg_id = self.rewrite_segments([old_id], records, epoch)
        assert seg_id is not None
        return seg_id

    def rewrite_segments(
        self, old_ids: list[int], records: list[tuple[bytes, bytes, int]], epoch: int
    ) -> int | None:
        """Atomically replace data segments ``old_ids`` by one new segment holding
        ``records``, or by none when it is empty; returns the new segment id or None
        (:func:`vaultfs.vault.rewrite.rewrite_segments`)."""
        return rewrite.rewrite_segments(
            self.writer, self.index, self.queue, self.reads.forget, old_ids, records, epoch
        )

    # -- upload queue (uploads.py) ---------------------------------------------------------
    def flush(
        self,
        progress: Callable[[str], None] | None = None,
        seal: bool = True,
        quorum: bool = False,
    ) -> FlushReport:
        """Upload everything queued. Never raises for an unreachable remote: it reports
        (:meth:`UploadQueue.flush`; ``quorum``: return once k shards of everything are
        placed, leaving a slow remote's rest queued)."""
        return self.uploads.flush(progress, seal, quorum)

    def prepush(self) -> None:
        """Start moving the queued shards to the remotes in the background."""
        self.uploads.prepush()

    def prune_index_copies(self, keep: int | None = None) -> int:
        """Delete index copies and manifests older than the newest ``keep``; returns objects
        deleted (:meth:`UploadQueue.prune_index_copies`)."""
        return self.uploads.prune_index_copies(keep)

    # -- health and status (health.py) -----------------------------------------------------
    def segments_under_k(self) -> int:
        """How many segments have fewer than k shards placed."""
        return segment_table.count_under_k(self.index)

    def status(self) -> dict:
        """The vault's state as ``vaultfs status`` reports it."""
        return health.status(self.index, self.keys, self.params)

    def remote_health(self, rid: int) -> dict:
        """Reachability, lost objects and last audit of remote ``rid``."""
        return health.remote_health(self.index, rid)

    def note_missing_roots(self, now: float) -> list[int]:
        """Record the local-directory remotes whose directory is missing as unreachable
        (:func:`health.note_missing_roots`); their ids."""
        return health.note_missing_roots(self.index, now)

    # -- read path (reads.py) --------------------------------------------------------------
    def segment_bytes(self, seg_id: int) -> bytes:
        """Decoded plaintext of a segment (:meth:`SegmentReads.segment_bytes`)."""
        return self.reads.segment_bytes(seg_id)

    def read_chunk(self, cid: bytes) -> bytes:
        """A chunk's plaintext (:meth:`SegmentReads.read_chunk`)."""
        return self.reads.read_chunk(cid)

    def iter_file(self, entry_id: int) -> Iterator[bytes]:
        """The plaintext chunks of file entry ``entry_id``, in order."""
        return self.reads.iter_file(entry_id)
