"""The storage engine: a vault's local state plus the write path (chunk → encrypt → segment →
erasure code → queue → remotes) and the commit protocol.

Ordering invariants (docs/design.md has the full crash-state table):

1. A shard object is written to ``queue/tmp``, fsync'd, and renamed into
   ``queue/<remote>/<data|meta>/`` *before* the index transaction that records it commits.
2. Chunk rows are inserted in the same transaction as their segment and shards, so a chunk
   the index knows is always backed by durable shards (queued or placed).
3. A snapshot's entries commit only after every chunk they reference is recorded (2).
4. A manifest is uploaded to any remote only after every segment it covers has at least k
   shards placed; on each remote, data and meta shards go before the manifest.
5. A queued shard becomes ``placed`` only after rclone removed it from the queue, which it
   does only after a successful upload.

The engine is a library: the CLI and the FUSE mount both call it. CPU-heavy work (hashing,
AEAD, erasure coding) runs in a thread pool; callers on an event loop should call the
blocking methods from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from . import envelope, erasure, manifest, merkle, names, segment
from .backends import Backend, open_backend
from .chunker import AVG_SIZE, NEW_VAULT_AVG, Chunker
from .errors import (
    DiskFull,
    InputError,
    IntegrityError,
    NotEnoughRemotes,
    NoVault,
    RemoteError,
    VaultBusy,
)
from .index import Index, chunk_rows
from .keys import SLHDSA_128S, SUITE_XWING_AES256GCM, VaultKeys, read_keyfile, write_keyfile
from .remotes import Remote
from .sealer import (
    SLOT_SIZE,
    SealConfig,
    SealerPool,
    SegmentReport,
    ShardFile,
    build_shard_files,
    write_new_file,
)
from .verify import PIECE as AUDIT_PIECE

DEFAULT_SEGMENT_SIZE = 4 * 1024 * 1024
SUBDIRS = ("data", "meta")


def default_home() -> Path:
    env = os.environ.get("VAULTFS_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "vaultfs"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)
            raise DiskFull(
                f"local disk full while writing {path.parent}: free space and retry "
                "(nothing acknowledged was lost)"
            ) from None
        raise


def survivable_losses(placement: list[list[int]], k: int, domains: dict[int, str]) -> int:
    """How many failure domains can be lost, worst case, with every segment still >= k shards.

    ``placement`` lists, per segment, the remote id of each shard. Brute force over domain
    subsets (the number of domains is small).
    """
    from itertools import combinations

    doms = sorted(set(domains.values()))
    best = 0
    for lose in range(1, len(doms) + 1):
        ok = True
        for gone in combinations(doms, lose):
            g = set(gone)
            for shards in placement:
                if sum(1 for r in shards if domains.get(r) not in g) < k:
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            break
        best = lose
    return best


def place(remotes: list[tuple[int, str]], seg_id: int, n: int) -> list[int]:
    """Remote id for each of the n shards of segment ``seg_id``, spreading failure domains.

    ``remotes`` lists (id, domain) of the active remotes in position order. Shard i goes to
    domain (i + seg_id) mod D (domains ordered by their first remote's position), and within a
    domain to its remotes in turn, so every domain holds ⌊n/D⌋ or ⌈n/D⌉ shards. With one remote
    per domain this is the plain rule: shard i → remote at position (i + seg_id) mod R.
    """
    doms: dict[str, list[int]] = {}
    for rid, dom in remotes:
        doms.setdefault(dom, []).append(rid)
    order = list(doms.values())
    seen = [0] * len(order)
    out = []
    for i in range(n):
        d = (i + seg_id) % len(order)
        members = order[d]
        out.append(members[(seen[d] + seg_id // len(order)) % len(members)])
        seen[d] += 1
    return out


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
    uploaded: int = 0
    pending: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    under_k: int = 0
    manifests_pending: int = 0

    @property
    def complete(self) -> bool:
        return not any(self.pending.values()) and self.manifests_pending == 0


@dataclass
class Entry:
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


class Vault:
    """An open vault. Use :meth:`create` or :meth:`open`; close with :meth:`close`."""

    def __init__(self, home: Path, keys: VaultKeys, index: Index, lock_fd: int | None) -> None:
        self.home = home
        self.keys = keys
        self.index = index
        self._lock_fd = lock_fd
        self.k = int(index.get("k") or 0)
        self.n = int(index.get("n") or 0)
        self.segment_size = int(index.get("segment_size") or DEFAULT_SEGMENT_SIZE)
        self.ec_alg = erasure.choose_alg(self.k, self.n) if self.k else 0  # for new segments
        avg = int(index.get("chunk_avg") or AVG_SIZE)
        self.chunker = Chunker(keys.chunker_seed, keys.chunk_id_key, avg)
        self._sealers: SealerPool | None = None
        self._write_lock = threading.RLock()
        self._seg_cache: OrderedDict[int, bytes] = OrderedDict()
        self._seg_cache_lock = threading.Lock()
        self._load_data_keys()

    # -- lifecycle -------------------------------------------------------------------------
    @staticmethod
    def _paths(home: Path) -> dict[str, Path]:
        return {
            "keyfile": home / "key.json",
            "index": home / "index.db",
            "queue": home / "queue",
            "lock": home / "lock",
        }

    @staticmethod
    def _take_lock(home: Path) -> int:
        fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VaultBusy(
                f"the vault at {home} is in use by another vaultfs process "
                "(a mount or a running backup); wait for it or unmount first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

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
    ) -> Vault:
        from . import erasure
        from .keys import new_seed

        erasure.validate(k, n)
        if not remote_specs:
            raise NotEnoughRemotes("a vault needs at least one --remote")
        if len(set(remote_specs)) != len(remote_specs):
            raise NotEnoughRemotes("the same remote was given twice")
        p = cls._paths(home)
        if p["index"].exists() or p["keyfile"].exists():
            raise NoVault(f"a vault already exists at {home}; use another --home")
        remotes = [open_backend(s) for s in remote_specs]
        for r in remotes:
            r.ensure()
            existing = r.list("manifests")
            if existing:
                raise NoVault(
                    f"remote {r.label} already holds a vault (manifests/ is not empty); "
                    "give an empty location"
                )
        home.mkdir(parents=True, exist_ok=True)
        lock = cls._take_lock(home)
        keys = VaultKeys.from_seed(seed or new_seed())
        keys.generate_slhdsa()  # hash-based second signature (docs/keys.md)
        write_keyfile(p["keyfile"], keys, passphrase)
        index = Index(p["index"])
        data_key = keys.new_epoch_key()
        with index.tx() as db:
            for key, value in {
                "schema": 1,
                "vault_id": keys.vault_id.hex(),
                "k": k,
                "n": n,
                "segment_size": segment_size,
                "chunk_avg": NEW_VAULT_AVG,
                "suite": SUITE_XWING_AES256GCM,
                "epoch": 0,
                "created": time.time(),
                "slhdsa_public": keys.slhdsa_public.hex(),
                "slhdsa_sealed": keys.seal_slhdsa_secret().hex(),
                "slhdsa_param": keys.slhdsa_param,
            }.items():
                db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))
            for pos, spec in enumerate(remote_specs):
                db.execute("INSERT INTO remotes(spec, position) VALUES (?, ?)", (spec, pos))
            db.execute(
                "INSERT INTO epochs VALUES (0, ?, ?, ?)",
                (SUITE_XWING_AES256GCM, keys.wrap_data_key(0, data_key), time.time()),
            )
        for sub in ("tmp", "manifests"):
            (p["queue"] / sub).mkdir(parents=True, exist_ok=True)
        v = cls(home, keys, index, lock)
        return v

    @classmethod
    def open(
        cls,
        home: Path,
        passphrase: str | None = None,
        keys: VaultKeys | None = None,
        lock: bool = True,
    ) -> Vault:
        p = cls._paths(home)
        if not p["index"].exists():
            raise NoVault(f"no vault at {home}: run `vaultfs init` or pass --home")
        if keys is None:
            if passphrase is None:
                raise NoVault("a passphrase is needed to open the vault")
            keys = read_keyfile(p["keyfile"], passphrase)
        lock_fd = cls._take_lock(home) if lock else None
        index = Index(p["index"])
        if index.get("vault_id") != keys.vault_id.hex():
            index.close()
            raise NoVault(f"the key does not belong to the vault at {home}")
        v = cls(home, keys, index, lock_fd)
        if lock:
            v.recover()
        return v

    def close(self) -> None:
        """Stop the sealers and close the index. Chunks stored since the last :meth:`seal`
        (or commit) are discarded: nothing acknowledged refers to them."""
        if self._sealers is not None:
            self._sealers.close()
            self._sealers = None
        if self._prepushing is not None:
            self._prepushing[0].join()
            self._prepushing = None
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

    def _load_data_keys(self) -> None:
        """Load key material from the index: SLH-DSA key, retired suites, epoch data keys.

        Epochs under a retired suite get no data key, so nothing under them can be read.
        """
        pub, sealed = self.index.get("slhdsa_public"), self.index.get("slhdsa_sealed")
        if pub and sealed:
            param = self.index.get("slhdsa_param") or SLHDSA_128S  # older vaults: 128s
            self.keys.load_slhdsa(bytes.fromhex(pub), bytes.fromhex(sealed), param)
        self.keys.retired_suites |= {
            sid for (sid,) in self.index.q("SELECT id FROM suites WHERE state='retired'")
        }
        self.epoch_suites: dict[int, int] = {}
        for epoch, suite, wrapped in self.index.q("SELECT epoch, suite, wrapped FROM epochs"):
            self.epoch_suites[epoch] = suite
            if suite not in self.keys.retired_suites:
                self.keys.data_keys[epoch] = self.keys.unwrap_data_key(epoch, wrapped, suite)
        self.epoch = int(self.index.get("epoch") or 0)
        self.suite = int(self.index.get("suite") or SUITE_XWING_AES256GCM)

    def reload_keys(self) -> None:
        """Re-read key epochs and suites after a rotation or re-encryption step."""
        with self._write_lock:
            self.keys.data_keys.clear()
            self._load_data_keys()

    @property
    def queue_dir(self) -> Path:
        return self.home / "queue"

    def remotes(self) -> list[Backend]:
        rows = self.index.q(
            "SELECT id, spec FROM remotes WHERE state='active' ORDER BY position, id"
        )
        return [open_backend(spec, rid) for rid, spec in rows]

    # -- crash recovery --------------------------------------------------------------------
    def recover(self) -> None:
        """Bring the queue directory and the index back in line after a crash.

        Queue files with no index row were written by a transaction that never committed:
        they are removed (nothing acknowledged refers to them). Queued shards whose file is
        gone were uploaded before the crash: they become placed (invariant 5).
        """
        q = self.queue_dir
        for f in (q / "tmp").glob("*"):
            f.unlink(missing_ok=True)
        known = {name for (name,) in self.index.q("SELECT name FROM shards WHERE state='queued'")}
        for rdir in q.glob("r*"):
            for sub in SUBDIRS:
                d = rdir / sub
                if d.exists():
                    for f in d.iterdir():
                        if f.name not in known:
                            f.unlink()
        self._reconcile()
        for sub in ("tmp", "manifests"):
            (q / sub).mkdir(parents=True, exist_ok=True)
        mans = {name for (name,) in self.index.q("SELECT name FROM manifests")}
        for f in (q / "manifests").iterdir():
            if f.name not in mans:
                f.unlink()
        self._drop_unnamed_index_copies()

    def _drop_unnamed_index_copies(self) -> None:
        """Index copies recorded for a manifest that was never written (a crash between the
        two transactions of :meth:`_ship_index`): delete their queue files, send placed
        shards to ``garbage`` and forget them."""
        segs = self.index.q(
            "SELECT id, manifest FROM segments WHERE kind='meta'"
            " AND manifest NOT IN (SELECT seq FROM manifests)"
        )
        if not segs:
            return
        ids = [sid for sid, _m in segs]
        marks = ",".join("?" * len(ids))
        shards = self.index.q(
            f"SELECT name, remote, state FROM shards WHERE segment IN ({marks})", tuple(ids)
        )
        for name, rid, state in shards:
            if state == "queued":
                (self.queue_dir / f"r{rid}" / "meta" / name).unlink(missing_ok=True)
        self._reconcile()  # a shard whose queue file is gone was uploaded: it is garbage now
        placed = self.index.q(
            f"SELECT name, remote FROM shards WHERE segment IN ({marks}) AND state='placed'",
            tuple(ids),
        )
        with self.index.tx() as db:
            nxt = (db.execute("SELECT max(seq) FROM manifests").fetchone()[0] or 0) + 1
            db.executemany(
                "INSERT OR IGNORE INTO garbage VALUES (?, ?, 'meta', ?)",
                [(name, rid, nxt) for name, rid in placed],
            )
            db.execute(f"DELETE FROM shards WHERE segment IN ({marks})", tuple(ids))
            db.execute(f"DELETE FROM segments WHERE id IN ({marks})", tuple(ids))

    def _reconcile(self) -> int:
        """Mark queued shards whose queue file is gone as placed. Returns how many."""
        rows = self.index.q(
            "SELECT s.id, s.name, s.remote, g.kind FROM shards s "
            "JOIN segments g ON g.id = s.segment WHERE s.state='queued'"
        )
        done = [
            (sid,)
            for sid, name, rid, kind in rows
            if not (self.queue_dir / f"r{rid}" / kind / name).exists()
        ]
        if done:
            with self.index.tx() as db:
                db.executemany("UPDATE shards SET state='placed' WHERE id=?", done)
        return len(done)

    # -- write path ------------------------------------------------------------------------
    #: Sealer processes (vaultfs/sealer.py); 0 seals inline on the calling thread.
    SEALERS = int(os.environ.get("VAULTFS_SEALERS", "2"))

    @cached_property
    def pool(self) -> ThreadPoolExecutor:
        """Threads for CPU work outside the write path (re-encryption re-seals records)."""
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="vaultfs-cpu")

    def start_sealers(self) -> SealerPool:
        """Start the sealer processes now (they fork: see vaultfs/sealer.py, "Forking").

        The mount calls this before its FUSE loop and threads start; otherwise the first
        store does, on the caller's thread."""
        with self._write_lock:
            if self._sealers is not None and self._sealers.broken:
                self._sealers.close()  # a sealer died: its error was raised once already
                self._sealers = None
            if self._sealers is None:
                cfg = SealConfig(
                    self.keys.vault_id,
                    self.keys.audit_key,
                    self.k,
                    self.n,
                    self.ec_alg,
                    self.segment_size,
                    str(self.queue_dir / "tmp"),
                )
                pool = SealerPool(cfg, self._commit_sealed, self.SEALERS)
                pool.start()
                self._sealers = pool
            return self._sealers

    def _epoch_key(self) -> tuple[int, bytes, int]:
        return self.epoch, self.keys.data_keys[self.epoch], self.epoch_suites[self.epoch]

    def store_stream(
        self, stream: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> tuple[list[bytes], int]:
        """Chunk, deduplicate, encrypt and pack a stream. Returns (chunk ids, total bytes).

        This thread reads the stream into shared-memory slots, cuts keyed CDC chunks, hashes
        their ids and drops the ones the vault has; sealer processes compress, encrypt and
        pack the rest. The chunks are durable (queued) only after :meth:`seal` or
        :meth:`commit`.
        """
        readinto = getattr(stream, "readinto", None)
        cids: list[bytes] = []
        total = 0
        with self._write_lock:
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
                    pool.submit(slot, *self._epoch_key(), items)
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

    def store_chunks(self, chunks: list[bytes]) -> list[bytes]:
        """Store a batch of chunks (deduplicated); return their ids in order."""
        cids = [self.chunker.chunk_id(c) for c in chunks]
        with self._write_lock:
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
                pool.submit(slot, *self._epoch_key(), items)
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
        with self.index.lock:
            known = chunk_rows(self.index.db, [cids[i] for i in cand])
        return [(cids[i], *spans[i]) for i in cand if cids[i] not in known]

    def _commit_sealed(self, reports: list[SegmentReport]) -> None:
        """Collector thread: queue the shard files of sealed segments and record them.

        Invariants 1 and 2: the shard files are fsync'd (by the sealer) and renamed into the
        queue, the queue directories fsync'd, and only then one transaction records the
        segments with their shards, chunks and audit tags."""
        placed: list[tuple[int, SegmentReport, list[tuple]]] = []
        dirs: set[Path] = set()
        for r in reports:
            seg_id = self._next_segment_id()
            rows = self._queue_shard_files(seg_id, segment.KIND_DATA, r.shards, dirs)
            placed.append((seg_id, r, rows))
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):  # moved to the remote meanwhile
                _fsync_dir(d)
        now = time.time()
        with self.index.tx() as db:
            for seg_id, r, rows in placed:
                db.execute(
                    "INSERT INTO segments(id, uid, kind, size, used, k, n, ec_alg, epoch, root,"
                    f" created) VALUES (?, ?, 'data', ?, ?, ?, ?, {self.ec_alg}, ?, ?, ?)",
                    (seg_id, r.uid, r.size, r.used, self.k, self.n, r.epoch, r.root, now),
                )
                db.executemany(
                    "INSERT INTO shards(segment, idx, name, remote, size, hash, blocks, root, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    [(seg_id, *row) for row in rows],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO audit_tags(name, piece, tags) VALUES (?, ?, ?)",
                    [(sh.name, AUDIT_PIECE, sh.tags) for sh in r.shards],
                )
                db.executemany(
                    "INSERT OR IGNORE INTO chunks(cid, segment, offset, length, plain)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(cid, seg_id, off, ln, pl) for cid, off, ln, pl in r.chunks],
                )

    def _queue_shard_files(
        self, seg_id: int, kind: int, shards: list[ShardFile], dirs: set[Path]
    ) -> list[tuple]:
        """Rename fsync'd ``queue/tmp`` shard files to their remotes' queue directories.

        Returns the shard rows (idx, name, remote, size, hash, blocks, root); adds the
        directories to fsync to ``dirs``."""
        placement = self._placement(seg_id, self.n)
        tmp = self.queue_dir / "tmp"
        rows = []
        for sh, rid in zip(shards, placement, strict=True):
            dest_dir = self.queue_dir / f"r{rid}" / segment.KIND_NAMES[kind]
            t = tmp / sh.name
            for attempt in range(5):
                # a concurrent flush may move the whole queue directory away (rclone's
                # server-side DirMove to a local remote): recreate it and retry
                dest_dir.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(t, dest_dir / sh.name)
                    break
                except FileNotFoundError:
                    if attempt == 4 or not t.exists():
                        raise
            dirs.add(dest_dir)
            rows.append((sh.idx, sh.name, rid, sh.size, sh.hash, sh.blocks, sh.root))
        return rows

    def seal(self) -> None:
        """Make every chunk stored so far durable in the queue (padding open segments)."""
        with self._write_lock:
            if self._sealers is not None:
                self._sealers.seal()

    def _placement(self, seg_id: int, n: int) -> list[int]:
        rows = self.index.q(
            "SELECT id, coalesce(domain, 'remote' || id) FROM remotes WHERE state='active'"
            " ORDER BY position, id"
        )
        if not rows:
            raise NotEnoughRemotes("the vault has no active remotes")
        return place(rows, seg_id, n)

    def _write_shards(
        self, db_seg_id: int, uid: bytes, kind: int, padded: bytes
    ) -> tuple[list[tuple], bytes]:
        """Erasure-code a padded segment on this thread and queue its shard objects durably
        (for index copies and re-encrypted segments; data goes through the sealers).
        Returns (shard rows, segment root); records the audit tags."""
        files = build_shard_files(
            padded, uid, kind, self.k, self.n, self.ec_alg, self.keys.audit_key
        )
        tmp = self.queue_dir / "tmp"
        for meta, body in files:
            fd = write_new_file(str(tmp / meta.name), body)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs: set[Path] = set()
        shards = [m for m, _b in files]
        rows = self._queue_shard_files(db_seg_id, kind, shards, dirs)
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):  # moved to the remote meanwhile
                _fsync_dir(d)
        with self.index.tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO audit_tags(name, piece, tags) VALUES (?, ?, ?)",
                [(sh.name, AUDIT_PIECE, sh.tags) for sh in shards],
            )
        return rows, merkle.root([r[6] for r in rows])

    def _write_segment(
        self, builder: segment.SegmentBuilder, chunks: dict[bytes, tuple[int, int, int]]
    ) -> int:
        """Seal ``builder`` on this thread as a new data segment of the current epoch and
        record it with ``chunks`` (cid -> (offset, record length, plain length); rows that
        exist already are left alone). Repair uses it; writes go through the sealers."""
        seg_id = self._next_segment_id()
        uid = secrets.token_bytes(16)
        rows, root = self._write_shards(seg_id, uid, segment.KIND_DATA, builder.padded())
        with self.index.tx() as db:
            db.execute(
                "INSERT INTO segments(id, uid, kind, size, used, k, n, ec_alg, epoch, root, created)"
                f" VALUES (?, ?, 'data', ?, ?, ?, ?, {self.ec_alg}, ?, ?, ?)",
                (seg_id, uid, builder.padded_size(), builder.used, self.k, self.n, self.epoch,
                 root, time.time()),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO shards(segment, idx, name, remote, size, hash, blocks, root, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                [(seg_id, *r) for r in rows],
            )
            db.executemany(
                "INSERT OR IGNORE INTO chunks(cid, segment, offset, length, plain)"
                " VALUES (?, ?, ?, ?, ?)",
                [(cid, seg_id, off, ln, pl) for cid, (off, ln, pl) in chunks.items()],
            )
        return seg_id

    def _next_segment_id(self) -> int:
        with self._seg_id_lock:
            row = self.index.one("SELECT max(id) FROM segments")
            nxt = max((row[0] or 0) + 1, self._last_seg_id + 1)
            self._last_seg_id = nxt
            return nxt

    _seg_id_lock = threading.Lock()
    _last_seg_id = 0

    # -- snapshots and commit --------------------------------------------------------------
    def commit(
        self, entries: Iterable[Entry], name: str | None = None, prepush: bool = False
    ) -> tuple[str, int]:
        """Record a snapshot of ``entries``, then export and sign the index.

        Returns (snapshot uid, manifest seq). Everything is durable locally when this
        returns; call :meth:`flush` to place it on the remotes. ``prepush`` starts moving
        the data shards to the remotes while the index is exported and signed (for a caller
        that flushes right after).
        """
        with self._write_lock:
            return self._commit(entries, name, prepush)

    def _commit(self, entries: Iterable[Entry], name: str | None, prepush: bool) -> tuple[str, int]:
        self.seal()
        uid = secrets.token_hex(4)
        now = time.time()
        with self.index.tx() as db:
            seq = (db.execute("SELECT max(seq) FROM manifests").fetchone()[0] or 0) + 1
            cur = db.execute(
                "INSERT INTO snapshots(uid, name, created, seq) VALUES (?, ?, ?, ?)",
                (uid, name, now, seq),
            )
            snap_id = cur.lastrowid
            files = size = 0
            dirs: dict[bytes, int] = {}  # directory path -> entries.id (for entries.parent)
            for e in entries:
                path = names.raw(e.path)
                parts = names.split_path(path)
                parent = None if parts is None else (dirs.get(parts[0]) if parts[0] else 0)
                c = db.execute(
                    "INSERT INTO entries(snapshot, path, type, mode, mtime_ns, size, target,"
                    " uid, gid, xattrs, link, parent, rdev)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        snap_id,
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
                    ),
                )
                if e.type == "d" and parts is not None:
                    dirs[path] = c.lastrowid
                if e.type == "f":
                    ids = self._chunk_rows(db, e.cids)
                    db.executemany(
                        "INSERT INTO entry_chunks(entry, seq, chunk) VALUES (?, ?, ?)",
                        [(c.lastrowid, i, cid) for i, cid in enumerate(ids)],
                    )
                    size += e.size
                files += 1
            root = self._vault_root(db)
            db.execute(
                "UPDATE snapshots SET root=?, files=?, bytes=? WHERE id=?",
                (root, files, size, snap_id),
            )
        self._ship_index(seq, root, prepush)
        return uid, seq

    @staticmethod
    def _chunk_rows(db, cids: list[bytes]) -> list[int]:
        """The chunks-table row id of every chunk id, in order."""
        ids = chunk_rows(db, list(dict.fromkeys(cids)))
        try:
            return [ids[c] for c in cids]
        except KeyError:
            raise IntegrityError("internal: a chunk of the snapshot was not stored") from None

    @staticmethod
    def _vault_root(db) -> bytes:
        roots = [
            r[0] for r in db.execute("SELECT root FROM segments WHERE kind='data' ORDER BY id")
        ]
        return merkle.root(roots)

    def _ship_index(self, seq: int, root: bytes, prepush: bool = False) -> None:
        """Export, encrypt and erasure-code the index; queue a signed manifest naming it.
        ``prepush`` starts uploading every queued shard before the manifest is signed."""
        blob = envelope.seal_meta(
            self.keys.metadata_key,
            self.keys.vault_id,
            b"index",
            self.index.export_bytes(),
            self.suite,
        )
        segs = []
        for off in range(0, len(blob), self.segment_size):
            piece = blob[off : off + self.segment_size]
            padded = segment.pad(piece, segment.size_class(len(piece), self.segment_size))
            seg_id = self._next_segment_id()
            uid = secrets.token_bytes(16)
            rows, seg_root = self._write_shards(seg_id, uid, segment.KIND_META, padded)
            segs.append((seg_id, uid, len(piece), rows, seg_root, len(padded)))
        keyring = [
            {"epoch": e, "suite": s, "wrapped": w.hex()}
            for e, s, w in self.index.q("SELECT epoch, suite, wrapped FROM epochs ORDER BY epoch")
        ]
        body = {
            "vault_root": root.hex(),
            "k": self.k,
            "n": self.n,
            "segment_size": self.segment_size,
            "keyring": keyring,
            "index": {
                "length": len(blob),
                "segments": [
                    {
                        "uid": uid.hex(),
                        "used": used,
                        "size": size,
                        "k": self.k,
                        "n": self.n,
                        "ec_alg": self.ec_alg,
                        "shards": [
                            {"idx": r[0], "name": r[1], "size": r[3], "hash": r[4].hex()}
                            for r in rows
                        ],
                    }
                    for _sid, uid, used, rows, _root, size in segs
                ],
            },
        }
        # the index copy is durable in the queue: record it first (a crash before its manifest
        # is written leaves a copy no manifest names; recover() drops it), then sign the
        # manifest while the shards already go out (prepush: rclone runs beside the signing)
        with self.index.tx() as db:
            for seg_id, uid, used, rows, seg_root, size in segs:
                db.execute(
                    "INSERT INTO segments(id, uid, kind, size, used, k, n, ec_alg, epoch, root,"
                    f" manifest, created) VALUES (?, ?, 'meta', ?, ?, ?, ?, {self.ec_alg}, ?, ?, ?,"
                    " ?)",
                    (seg_id, uid, size, used, self.k, self.n, self.epoch, seg_root, seq,
                     time.time()),
                )  # fmt: skip
                db.executemany(
                    "INSERT INTO shards(segment, idx, name, remote, size, hash, blocks, root, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    [(seg_id, *r) for r in rows],
                )
        if prepush:
            self.prepush()
        created_ms = int(time.time() * 1000)
        if self.keys.slhdsa_public is not None:
            body["slhdsa_sealed"] = self.index.get("slhdsa_sealed")
        body["retired_suites"] = sorted(self.keys.retired_suites)
        blob_m = manifest.encode(self.keys, seq, created_ms, body, self.suite)
        name = manifest.object_name(seq, secrets.token_hex(4))
        _write_durable(self.queue_dir / "manifests" / name, blob_m)
        _fsync_dir(self.queue_dir / "manifests")
        with self.index.tx() as db:
            db.execute("INSERT INTO manifests VALUES (?, ?, ?, ?)", (seq, name, time.time(), root))
            db.execute("DELETE FROM settings WHERE key='unshipped_since'")
            db.executemany(
                "INSERT INTO manifest_queue VALUES (?, ?)", [(seq, r.rid) for r in self.remotes()]
            )

    @staticmethod
    def mark_unshipped(db) -> None:
        """Inside a transaction that changes where shards are (repair): note that the index
        copy on the remotes is out of date until the next :meth:`ship_index` (which clears
        the mark in the transaction that records its manifest)."""
        db.execute("INSERT OR REPLACE INTO settings VALUES ('unshipped_since', ?)", (time.time(),))

    def ship_index(self) -> int:
        """Export and sign the index as a new manifest without recording a snapshot (after a
        snapshot deletion, or to publish the mount's live tree). Returns the manifest seq;
        durable locally when this returns, placed by :meth:`flush`."""
        with self._write_lock:
            self.seal()
            with self.index.tx() as db:
                seq = (db.execute("SELECT max(seq) FROM manifests").fetchone()[0] or 0) + 1
                root = self._vault_root(db)
            self._ship_index(seq, root)
            return seq

    def delete_snapshot(self, uid: str) -> int:
        """Forget snapshot ``uid`` (its entries) and ship the index; returns the manifest seq.

        Chunks are never freed here: other snapshots and the mount's live tree may use them.
        Raises InputError when no snapshot has that id.
        """
        with self._write_lock:
            with self.index.tx() as db:
                row = db.execute("SELECT id FROM snapshots WHERE uid=?", (uid,)).fetchone()
                if row is None:
                    raise InputError(f"no snapshot with id {uid!r}: see `vaultfs snapshots`")
                db.execute(
                    "DELETE FROM entry_chunks WHERE entry IN"
                    " (SELECT id FROM entries WHERE snapshot=?)",
                    row,
                )
                db.execute("DELETE FROM entries WHERE snapshot=?", row)
                db.execute("DELETE FROM snapshots WHERE id=?", row)
            return self.ship_index()

    # -- key epochs and re-encryption (driven by vaultfs/rotation.py) ----------------------
    def begin_epoch(self, suite: int) -> int:
        """Seal what is open, then make a new key epoch (a fresh random data key wrapped to
        ``suite``) the one new writes use. Returns the new epoch number."""
        self.keys.check_suite(suite)
        with self._write_lock:
            self.seal()
            data_key = self.keys.new_epoch_key()
            with self.index.tx() as db:
                epoch = (db.execute("SELECT max(epoch) FROM epochs").fetchone()[0] or 0) + 1
                wrapped = self.keys.wrap_data_key(epoch, data_key, suite)
                db.execute(
                    "INSERT INTO epochs VALUES (?, ?, ?, ?)", (epoch, suite, wrapped, time.time())
                )
                for key, value in (("epoch", epoch), ("suite", suite)):
                    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))
                db.execute(
                    "INSERT OR IGNORE INTO suites VALUES (?, 'active', ?)", (suite, time.time())
                )
            self.reload_keys()
            return epoch

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
        ``records`` ((chunk id, record sealed under ``epoch``, plaintext length)), or by none
        when ``records`` is empty. Returns the new segment id (None: none was needed).

        The new shards are durable in the queue before the one transaction that inserts the
        new segment, repoints the records' chunks, deletes every other chunk row still in an
        old segment (chunks nothing refers to: the caller's business), deletes the old
        segments' rows and lists their placed shards in ``garbage`` (deleted from the
        remotes only once a manifest no longer naming them is placed). A crash before that
        transaction leaves the old segments in use and orphan queue files that
        :meth:`recover` removes.
        """
        with self._write_lock:
            builder = segment.SegmentBuilder(self.segment_size)
            where: dict[bytes, tuple[int, int, int]] = {}
            for cid, rec, plain in records:
                if not builder.fits(len(rec)):
                    raise IntegrityError("internal: rewritten records outgrow one segment")
                where[cid] = (builder.add(rec), len(rec), plain)
            seg_id = rows = root = uid = None
            if where:
                seg_id = self._next_segment_id()
                uid = secrets.token_bytes(16)
                rows, root = self._write_shards(seg_id, uid, segment.KIND_DATA, builder.padded())
            marks = ",".join("?" * len(old_ids))
            old = self.index.q(
                f"SELECT name, remote, state FROM shards WHERE segment IN ({marks})",
                tuple(old_ids),
            )
            with self.index.tx() as db:
                next_seq = (db.execute("SELECT max(seq) FROM manifests").fetchone()[0] or 0) + 1
                if seg_id is not None:
                    assert rows is not None
                    db.execute(
                        "INSERT INTO segments(id, uid, kind, size, used, k, n, ec_alg, epoch,"
                        f" root, created) VALUES (?, ?, 'data', ?, ?, ?, ?, {self.ec_alg}, ?, ?, ?)",
                        (seg_id, uid, builder.padded_size(), builder.used, self.k, self.n,
                         epoch, root, time.time()),
                    )  # fmt: skip
                    db.executemany(
                        "INSERT INTO shards(segment, idx, name, remote, size, hash, blocks, root,"
                        " state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                        [(seg_id, *r) for r in rows],
                    )
                    db.executemany(
                        "UPDATE chunks SET segment=?, offset=?, length=? WHERE cid=?",
                        [(seg_id, off, ln, cid) for cid, (off, ln, _pl) in where.items()],
                    )
                db.execute(f"DELETE FROM chunks WHERE segment IN ({marks})", tuple(old_ids))
                db.execute(f"DELETE FROM shards WHERE segment IN ({marks})", tuple(old_ids))
                db.execute(f"DELETE FROM segments WHERE id IN ({marks})", tuple(old_ids))
                db.executemany(
                    "INSERT OR IGNORE INTO garbage VALUES (?, ?, 'data', ?)",
                    [(name, rid, next_seq) for name, rid, state in old if state == "placed"],
                )
            for name, rid, state in old:
                if state == "queued":
                    (self.queue_dir / f"r{rid}" / "data" / name).unlink(missing_ok=True)
            with self._seg_cache_lock:
                for sid in old_ids:
                    self._seg_cache.pop(sid, None)
            return seg_id

    # -- upload queue ----------------------------------------------------------------------
    def flush(
        self, progress: Callable[[str], None] | None = None, seal: bool = True
    ) -> FlushReport:
        """Upload everything queued. Never raises for an unreachable remote: it reports.

        ``seal=False`` pushes only what is already sealed, so a caller that flushes often
        (the mount's background pusher) does not pad the open segment on every pass.
        """
        if seal:
            self.seal()
        report = FlushReport()
        remotes = self.remotes()
        ok = self._push_shards(remotes, report)
        report.uploaded = self._reconcile()
        for r in remotes:
            if ok.get(r.rid):
                self._remote_state(r.rid, None)
        report.under_k = self.segments_under_k()
        if report.under_k == 0:
            self._push_manifests(remotes, ok, report)
        for r in remotes:
            (cnt,) = self.index.one(
                "SELECT count(*) FROM shards WHERE state='queued' AND remote=?", (r.rid,)
            )
            report.pending[r.label] = cnt
        (report.manifests_pending,) = self.index.one("SELECT count(*) FROM manifest_queue")
        if report.manifests_pending == 0 and not report.errors:
            self.prune_index_copies()
        return report

    def prepush(self) -> None:
        """Start moving the queued shards to the remotes in the background (a commit does,
        so uploads overlap exporting and signing the index); the next :meth:`flush` waits
        for it, and does not try again in the same flush a remote that failed it."""
        if self._prepushing is not None:
            return
        errors: dict[int, str] = {}
        t = threading.Thread(
            target=self._push_shards, args=(self.remotes(), None, errors), name="vaultfs-prepush"
        )
        self._prepushing = (t, errors)
        t.start()

    _prepushing: tuple[threading.Thread, dict[int, str]] | None = None
    _push_lock = threading.Lock()

    def _push_shards(
        self,
        remotes: list[Backend],
        report: FlushReport | None,
        errors: dict[int, str] | None = None,
    ) -> dict[int, bool]:
        """One ``rclone move`` per remote of its queue directory (data/ and meta/ shards), all
        remotes at once. Returns {remote id: success}; records errors in ``report`` (or, for
        the background push, in ``errors``)."""
        failed_before: dict[int, str] = {}
        if report is not None and self._prepushing is not None:
            bg, failed_before = self._prepushing
            bg.join()
            self._prepushing = None
        ok: dict[int, bool] = {}

        def push(r: Backend) -> None:
            if r.rid in failed_before:  # it failed moments ago in the background push
                ok[r.rid] = False
                assert report is not None
                report.errors[r.label] = failed_before[r.rid]
                self._remote_state(r.rid, failed_before[r.rid])
                return
            d = self.queue_dir / f"r{r.rid}"
            try:
                if any(any((d / sub).iterdir()) for sub in SUBDIRS if (d / sub).is_dir()):
                    r.move_dir(d, "")
                ok[r.rid] = True
            except RemoteError as e:
                ok[r.rid] = False
                if errors is not None:
                    errors[r.rid] = e.message
                if report is not None:
                    report.errors[r.label] = e.message
                    self._remote_state(r.rid, e.message)

        with self._push_lock:
            _each(push, remotes)
        return ok

    #: How many of the newest manifests (and the index copies they name) stay on the remotes.
    KEEP_INDEX_COPIES = 3

    def prune_index_copies(self, keep: int | None = None) -> int:
        """Delete index copies (meta segments) and manifests older than the newest ``keep``.

        Called only after a flush placed every manifest on every remote (invariant 6: an old
        index copy is deleted only once newer ones are placed). Returns objects deleted;
        a remote that fails keeps its old copies until the next successful flush.
        """
        keep = keep or self.KEEP_INDEX_COPIES
        seqs = [s for (s,) in self.index.q("SELECT seq FROM manifests ORDER BY seq DESC")]
        if len(seqs) <= keep:
            return 0
        cutoff = seqs[keep - 1]
        old_shards = self.index.q(
            "SELECT s.id, s.name, s.remote FROM shards s JOIN segments g ON g.id = s.segment"
            " WHERE g.kind='meta' AND g.manifest < ? AND s.state='placed'",
            (cutoff,),
        )
        old_mans = [
            n for (n,) in self.index.q("SELECT name FROM manifests WHERE seq < ?", (cutoff,))
        ]
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
            db.execute(
                "DELETE FROM shards WHERE segment IN"
                " (SELECT id FROM segments WHERE kind='meta' AND manifest < ?)",
                (cutoff,),
            )
            db.execute("DELETE FROM segments WHERE kind='meta' AND manifest < ?", (cutoff,))
            db.execute("DELETE FROM manifests WHERE seq < ?", (cutoff,))
        return deleted

    def _push_manifests(
        self, remotes: list[Backend], ok: dict[int, bool], report: FlushReport
    ) -> None:
        """Upload queued manifests, oldest first, every remote at once (invariant 4: only
        called once every segment has k shards placed)."""
        rows = self.index.q(
            "SELECT q.seq, q.remote, m.name FROM manifest_queue q JOIN manifests m ON m.seq = q.seq"
            " ORDER BY q.seq"
        )
        by_id = {r.rid: r for r in remotes}
        todo: dict[int, list[tuple[int, str]]] = {}
        for seq, rid, name in rows:
            if rid not in by_id:  # remote removed since: drop the obligation
                with self.index.tx() as db:
                    db.execute("DELETE FROM manifest_queue WHERE seq=? AND remote=?", (seq, rid))
            elif ok.get(rid):
                todo.setdefault(rid, []).append((seq, name))
        lock = threading.Lock()

        def push(rid: int) -> None:
            r = by_id[rid]
            for seq, name in todo[rid]:
                try:
                    r.put_file(self.queue_dir / "manifests" / name, "manifests", name)
                except RemoteError as e:
                    with lock:
                        report.errors[r.label] = e.message
                    return
                with self.index.tx() as db:
                    db.execute("DELETE FROM manifest_queue WHERE seq=? AND remote=?", (seq, rid))

        _each(push, list(todo))
        still = {s for (s,) in self.index.q("SELECT DISTINCT seq FROM manifest_queue")}
        for seq, name in self.index.q("SELECT seq, name FROM manifests"):
            f = self.queue_dir / "manifests" / name
            if seq not in still and f.exists():
                f.unlink()

    def _remote_state(self, rid: int, error: str | None) -> None:
        with self.index.tx() as db:
            if error is None:
                db.execute(
                    "UPDATE remotes SET last_ok=?, last_error=NULL WHERE id=?", (time.time(), rid)
                )
            else:
                db.execute("UPDATE remotes SET last_error=? WHERE id=?", (error, rid))

    def segments_under_k(self) -> int:
        (cnt,) = self.index.one(
            "SELECT count(*) FROM segments g WHERE (SELECT count(*) FROM shards s"
            " WHERE s.segment = g.id AND s.state='placed') < g.k"
        )
        return cnt

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict:
        remotes = self.index.q(
            "SELECT id, spec, domain, last_ok, last_error FROM remotes WHERE state='active' ORDER BY position"
        )
        domains = {rid: (dom or f"remote{rid}") for rid, _s, dom, _o, _e in remotes}
        placed: dict[int, list[int]] = {}
        planned: dict[int, list[int]] = {}
        for seg, rid, state in self.index.q("SELECT segment, remote, state FROM shards"):
            planned.setdefault(seg, []).append(rid)
            if state == "placed":
                placed.setdefault(seg, []).append(rid)
        segs = [s for (s,) in self.index.q("SELECT id FROM segments")]
        placed_lists = [placed.get(s, []) for s in segs]
        planned_lists = [planned.get(s, []) for s in segs]
        per_remote = []
        for rid, spec, _dom, last_ok, last_err in remotes:
            q = self.index.one(
                "SELECT count(*), coalesce(sum(size),0) FROM shards WHERE remote=? AND state='queued'",
                (rid,),
            )
            p = self.index.one(
                "SELECT count(*), coalesce(sum(size),0) FROM shards WHERE remote=? AND state='placed'",
                (rid,),
            )
            per_remote.append(
                {
                    "remote": Remote(spec).label,
                    "domain": domains[rid],
                    "placed_objects": p[0],
                    "placed_bytes": p[1],
                    "queued_objects": q[0],
                    "queued_bytes": q[1],
                    "last_ok": last_ok,
                    "last_error": last_err,
                    **self._health(rid),
                }
            )
        # shards on a remote that is unreachable right now do not count as placed "now"
        down = {
            r for (r,) in self.index.q("SELECT remote FROM remote_health WHERE state='unreachable'")
        }
        placed_lists = [[r for r in lst if r not in down] for lst in placed_lists]
        under_k = self.segments_under_k() if segs else 0
        snaps = self.index.one("SELECT count(*), max(created) FROM snapshots")
        logical = self.index.one(
            "SELECT coalesce(sum(plain),0), coalesce(sum(length),0) FROM chunks"
        )
        return {
            "vault_id": self.keys.vault_id.hex(),
            "fingerprint": self.keys.fingerprint(),
            "k": self.k,
            "n": self.n,
            "remotes": per_remote,
            "domains": len(set(domains.values())),
            "segments": len(segs),
            "segments_below_k_placed": under_k,
            "snapshots": snaps[0],
            "last_snapshot": snaps[1],
            "unique_bytes": logical[0],
            "stored_bytes": logical[1],
            "survives_losses_design": survivable_losses(planned_lists, self.k, domains)
            if segs
            else self._design_losses(domains),
            "survives_losses_now": survivable_losses(placed_lists, self.k, domains)
            if segs and under_k == 0
            else (0 if segs else self._design_losses(domains)),
            "manifests_pending": self.index.one("SELECT count(*) FROM manifest_queue")[0],
        }

    def _health(self, rid: int) -> dict:
        """Reachability and last audit of one remote (tables remote_health, audit_runs)."""
        h = self.index.one(
            "SELECT state, since, checked, detail FROM remote_health WHERE remote=?", (rid,)
        )
        a = self.index.one(
            "SELECT started, finished, mode, checked, confidence FROM audit_runs WHERE remote=?"
            " ORDER BY id DESC LIMIT 1",
            (rid,),
        )
        (lost,) = self.index.one(
            "SELECT count(*) FROM shards WHERE remote=? AND state='lost'", (rid,)
        )
        return {
            "health": h[0] if h else "unknown",
            "health_since": h[1] if h else None,
            "health_detail": h[3] if h else None,
            "lost_objects": lost,
            "last_audit": (a[1] or a[0]) if a else None,
            "last_audit_mode": a[2] if a else None,
            "last_audit_complete": (a[1] is not None) if a else None,
            "last_audit_checks": a[3] if a else 0,
            "last_audit_confidence": a[4] if a else None,
        }

    def _design_losses(self, domains: dict[int, str]) -> int:
        rows = [(rid, dom) for rid, dom in domains.items()]
        if not rows:
            return 0
        lists = [place(rows, s, self.n) for s in range(len(rows))]
        return survivable_losses(lists, self.k, domains)

    # -- read path -------------------------------------------------------------------------
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
                    body = open_backend(spec, rid).cat(kind, name)
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
