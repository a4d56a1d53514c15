"""Sealers: worker processes that turn new chunks into sealed, erasure-coded segments.

Almost all the CPU work of a backup is in library calls that hold Python's GIL (AES-GCM,
pyeclib, the per-piece audit tags, pyfastcdc) or release it only briefly (zstd on
32 KiB chunks), so threads keep about one core busy. The write path therefore runs that work in
sealer *processes* forked from the vault, and the vault's own process only reads, chunks,
hashes, deduplicates and commits.

Data flow (docs/design.md, "Write path"):

1. The vault process reads input into a **slot** of a shared anonymous mapping (created
   before the fork, so every sealer sees it), cuts it with keyed CDC, hashes chunk ids and
   drops chunks the index or an earlier job already has. A job names the slot and the new
   chunks in it: ``(chunk id, offset, length)``. The slot is not reused until the sealer
   answers ``done``.
2. A sealer compresses and encrypts each chunk into *its own* open segment. A full segment
   (or one asked to seal) is padded, erasure-coded into shard objects (Merkle leaves, audit
   tags), and every shard object is written to ``queue/tmp/<name>``. A background thread of
   the sealer fsyncs those files and only then reports the segment.
3. The vault process's collector thread commits reports: it places the shards (segment id →
   remotes), renames the tmp files into ``queue/r<id>/data/``, fsyncs those directories and
   records segment, shards, chunks and audit tags in one transaction (invariants 1 and 2).

Protocol (tuples over a duplex pipe per sealer)::

    vault → sealer   ("chunks", job, epoch, data_key, suite, slot_offset, [(cid, off, len)])
                     ("seal", token)        seal the open segment now
                     ("stop",)
    sealer → vault   ("done", job)          the job's slot may be reused
                     ("segment", report)    a sealed segment, its shard files durable in tmp
                     ("sealed", token)      every segment sealed before it has been reported
                     ("error", kind, text)  the sealer failed (its open segment is lost)

Crash states: a sealer that dies (or a vault process killed while sealers run) leaves only
files in ``queue/tmp`` and chunks no transaction recorded; ``Vault.recover`` deletes the
former, and nothing acknowledged referred to the latter (``Vault.seal`` had not returned).
Sealers die with the vault process (``PR_SET_PDEATHSIG``) and never hold the vault lock.

Forking: :meth:`SealerPool.start` forks. Call it while the process has no other thread doing
library work (the mount starts its pool before the FUSE loop; the CLI's first store runs on
the main thread), so no child inherits a lock held mid-call. ``workers=0`` runs the same
sealer inline in the calling thread (no processes), for tests of a single stage and for
``VAULTFS_SEALERS=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from . import envelope, merkle, segment
from .audittag import piece_tags
from .errors import DiskFull, VaultError

#: Bytes per shared-memory slot: one job's input. Larger slots mean fewer messages; the
#: mapping holds SLOTS of them (touched pages count in every process's RSS).
SLOT_SIZE = 4 * 1024 * 1024
SLOTS = 8


@dataclass(frozen=True)
class SealConfig:
    """What a sealer needs besides each job's data key: fixed for the pool's lifetime."""

    vault_id: bytes
    audit_key: bytes
    k: int
    n: int
    ec_alg: int
    segment_size: int
    tmp_dir: str


@dataclass
class ShardFile:
    """A shard object written (and, once reported, fsync'd) as ``tmp_dir/<name>``."""

    idx: int
    name: str
    size: int
    hash: bytes
    blocks: bytes
    root: bytes
    tags: bytes


@dataclass
class SegmentReport:
    """A sealed data segment whose shard files are durable in the tmp directory."""

    uid: bytes
    used: int
    size: int  # padded size that was erasure coded
    epoch: int
    root: bytes
    chunks: list[tuple[bytes, int, int, int]]  # (cid, offset, record length, plain length)
    shards: list[ShardFile] = field(default_factory=list)
    worker: int = -1


class SealerError(VaultError):
    """A sealer failed; its open segment is lost and must be stored again."""


def build_shard_files(
    padded: bytes, k: int, n: int, alg: int, audit_key: bytes
) -> list[tuple[ShardFile, bytes]]:
    """Erasure-code a padded segment into stored (whitened) shard objects with their audit
    tags, both keyed by ``audit_key`` (docs/format.md 7.1, 13.3).

    Returns (metadata, object bytes) per shard, in fragment order; nothing is written."""
    out = []
    for sh in segment.build_shards(padded, k, n, audit_key, alg):
        meta = ShardFile(
            sh.idx, sh.name, len(sh.body), sh.hash, sh.blocks, sh.root,
            piece_tags(audit_key, sh.body, sh.blocks),
        )  # fmt: skip
        out.append((meta, sh.body))
    return out


def write_new_file(path: str, data: bytes) -> int:
    """Create ``path`` (it must not exist) holding ``data``; return the open descriptor, not
    yet fsync'd. ENOSPC/EDQUOT become :class:`DiskFull` (the file is removed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise _disk_error(e, path) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise _disk_error(e, path) from None
    return fd


def _disk_error(e: OSError, path: str) -> OSError | DiskFull:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"local disk full while writing {os.path.dirname(path)}: free space and retry "
            "(nothing acknowledged was lost)"
        )
    return e


class _Sealer:
    """The sealing state machine of one worker: an open segment and a syncer.

    ``send`` delivers a reply to the vault process (thread-safe). With ``background`` the
    fsync of shard files and the report run on a thread of their own, so the next segment's
    CPU work overlaps the disk's."""

    def __init__(
        self,
        wid: int,
        cfg: SealConfig,
        shm: memoryview,
        send: Callable[[tuple], None],
        background: bool,
    ) -> None:
        self.wid = wid
        self.cfg = cfg
        self.shm = shm
        self.send = send
        # the open segment, allocated once at full size: growing a bytearray record by record
        # would copy it over and over (CPython grows it by an eighth at a time)
        self.buf = bytearray(cfg.segment_size)
        self.view = memoryview(self.buf)  # the buffer never changes size
        self.used = 0
        self.chunks: list[tuple[bytes, int, int, int]] = []
        self.epoch: int | None = None
        self._sync: queue.Queue | None = None
        if background:
            self._sync = queue.Queue()
            threading.Thread(target=self._syncer, name="vaultfs-fsync", daemon=True).start()

    # -- requests ------------------------------------------------------------------------
    def on_chunks(
        self, job: int, epoch: int, key: bytes, suite: int, base: int, items: list
    ) -> None:
        if self.epoch is not None and epoch != self.epoch:
            self.seal_open()  # a segment holds records of one key epoch only
        self.epoch = epoch
        sl = envelope.SALT_LEN
        salts = secrets.token_bytes(sl * len(items))  # one syscall a job
        vid, size, shm = self.cfg.vault_id, self.cfg.segment_size, self.shm
        for i, (cid, off, ln) in enumerate(items):
            payload = envelope.compress(shm[base + off : base + off + ln])
            rlen = envelope.record_len(payload)
            pos = self.used
            if pos + rlen > size:
                self.seal_open()
                self.epoch = epoch
                pos = 0
            # sealed straight into the open segment: no record to copy in
            envelope.seal_payload_into(
                self.view[pos : pos + rlen], key, vid, cid, payload, suite,
                salt=salts[i * sl : (i + 1) * sl],
            )  # fmt: skip
            self.chunks.append((cid, pos, rlen, ln))
            self.used = pos + rlen
        self.send(("done", job))

    def on_seal(self, token: int) -> None:
        self.seal_open()
        self._after_reports(("sealed", token))

    def seal_open(self) -> None:
        """Erasure-code the open segment, write its shard files, hand them to the syncer."""
        if not self.used:
            return
        cfg = self.cfg
        used = self.used
        size = segment.size_class(used, cfg.segment_size)
        # random padding (segment.pad explains why), written in place: one copy, not two
        self.buf[used:size] = secrets.token_bytes(size - used)
        padded = bytes(self.view[:size])
        uid = secrets.token_bytes(16)
        assert self.epoch is not None
        files = build_shard_files(padded, cfg.k, cfg.n, cfg.ec_alg, cfg.audit_key)
        report = SegmentReport(
            uid, used, size, self.epoch, segment_root([m.root for m, _b in files]), self.chunks,
            [m for m, _b in files], self.wid,
        )  # fmt: skip
        self.used = 0
        self.chunks = []
        fds: list[tuple[int, str]] = []
        try:
            for meta, body in files:
                path = os.path.join(cfg.tmp_dir, meta.name)
                fds.append((write_new_file(path, body), path))
        except BaseException:
            for fd, path in fds:
                os.close(fd)
                os.unlink(path)
            raise
        if self._sync is None:
            self._sync_and_report(fds, report)
        else:
            self._sync.put((fds, report))

    def drain(self) -> None:
        """Wait until every handed-over segment is fsync'd and reported."""
        if self._sync is not None:
            done = threading.Event()
            self._sync.put(done)
            done.wait()

    # -- the syncer ----------------------------------------------------------------------
    def _after_reports(self, msg: tuple) -> None:
        if self._sync is None:
            self.send(msg)
        else:
            self._sync.put(msg)

    def _syncer(self) -> None:
        assert self._sync is not None
        while True:
            item = self._sync.get()
            if isinstance(item, threading.Event):
                item.set()
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], SegmentReport):
                try:
                    self._sync_and_report(*item)
                except Exception as e:  # reported; the segment is lost, the sealer goes on
                    self.send(("error", type(e).__name__, _describe(e)))
            else:
                self.send(item)

    def _sync_and_report(self, fds: list[tuple[int, str]], report: SegmentReport) -> None:
        err: OSError | None = None
        for fd, _path in fds:
            try:
                if err is None:
                    os.fsync(fd)
            except OSError as e:
                err = e
            finally:
                os.close(fd)
        if err is not None:
            for _fd, path in fds:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise _disk_error(err, fds[0][1])
        self.send(("segment", report))


def segment_root(shard_roots: list[bytes]) -> bytes:
    return merkle.root(shard_roots)


def _describe(e: BaseException) -> str:
    return e.message if isinstance(e, VaultError) else f"{type(e).__name__}: {e}"


def _set_pdeathsig() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_buffers(mmap_above: int, keep: int, arenas: int | None = None) -> None:
    """Keep freed buffers for reuse instead of handing them back to the kernel: allocations
    of up to ``mmap_above`` bytes come from the heap, which keeps up to ``keep`` free bytes at
    its top. Each segment allocates a few MiB-sized buffers; with glibc's defaults every one
    is a fresh mmap, and touching it costs a page fault per 4 KiB (hundreds of thousands per
    backup or restore, a fifth of their CPU time), and in a process with several busy threads
    each unmap also interrupts the other cores. ``arenas`` caps glibc's malloc arenas (by
    default one per thread, up to eight per core): each arena keeps its own ``keep`` bytes, so
    fewer arenas keep fewer in all and reuse more of what they keep, for threads that
    allocate a few large buffers each (no lock contention worth the name). For short-lived
    commands and worker processes, not the mount (its resident size is bounded)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_above)
        libc.mallopt(_M_TRIM_THRESHOLD, keep)
        if arenas is not None:
            libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def tune_malloc() -> None:
    """In a worker process: :func:`keep_freed_buffers` (the heap then stays at the worker's
    peak, a few segments' worth), and no garbage collector."""
    keep_freed_buffers(32 << 20, 128 << 20)
    # workers make no reference cycles worth collecting: skip the collector's passes over
    # everything inherited from the parent
    import gc

    gc.freeze()
    gc.disable()


def _pool_worker_init(
    init: Callable[..., None], initargs: tuple, nice: int | None, parent: int | None
) -> None:
    """First thing in a :func:`worker_pool` process: die with the parent (``parent``: the
    pid that forked it; None: the forkserver), keep freed buffers, leave Ctrl-C to the
    parent, lower the priority to ``nice`` (never raise it), then ``init(*initargs)``."""
    _set_pdeathsig()
    if parent is None:  # the forkserver's preload module knows its pid (never import it here)
        server = sys.modules.get("vaultfs.pdeathsig")
        parent = server.server if server is not None else os.getppid()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    tune_malloc()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if nice is not None and nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    init(*initargs)


@contextlib.contextmanager
def worker_pool(
    processes: int,
    init: Callable[..., None],
    initargs: tuple = (),
    *,
    nice: int | None = None,
    clean: bool = False,
) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``processes`` worker processes for CPU work that holds the GIL (pyeclib,
    whitening, audit tags), as an executor whose futures fit ``concurrent.futures.wait``.
    Each worker runs :func:`_pool_worker_init` first: it dies with the parent
    (``PR_SET_PDEATHSIG``; the pool lives inside the ``with`` block of the thread that
    forked it), tunes malloc as a sealer does, and runs at nice ``nice`` at least (background
    work: a worker process holds no GIL of the parent, so a lower priority cannot stall it).

    Workers are forked from this process (jobs and results are pickled, the
    ``initargs`` inherited), or with ``clean`` from a fresh single-threaded server process
    (multiprocessing's forkserver: for a parent whose other threads may hold library locks
    mid-call, such as the mount daemon; ``initargs`` are pickled then). A worker that dies
    fails every pending future with ``BrokenProcessPool``. Leaving the block waits for the
    workers; an exception leaving it cancels the jobs not started. The forkserver dies with
    the thread that started it (:mod:`vaultfs.pdeathsig`; a dead one is started again by the
    next pool): use ``clean`` pools from one long-lived thread (the daemon's maintenance
    thread), and within the ``with`` block submit from the thread that entered it."""
    ctx = multiprocessing.get_context("forkserver" if clean else "fork")
    if clean:
        own_mp_tempdir()  # where the forkserver's socket goes: before it starts
        ctx.set_forkserver_preload(["__main__", "vaultfs.pdeathsig"])
    pool = ProcessPoolExecutor(
        processes,
        mp_context=ctx,
        initializer=_pool_worker_init,
        initargs=(init, initargs, nice, None if clean else os.getpid()),
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


#: seconds :meth:`SealerPool._raise_pending` waits for the jobs in flight before it raises
ERROR_SETTLE = 30.0
#: multiprocessing's temporary directory (the forkserver's socket), made by
#: :func:`own_mp_tempdir`: ``<tmp>/vaultfs-mp-<pid>-*``
MP_PREFIX = "vaultfs-mp-"
#: the longest socket path multiprocessing makes in its temporary directory, after the
#: directory: "/listener-" and 8 random characters (multiprocessing.connection)
_MP_SOCKET_NAME = len("/listener-12345678")
_mp_tempdir: str | None = None


def own_mp_tempdir() -> None:
    """Make this process's multiprocessing temporary directory (where its forkserver listens)
    a scratch directory of ours, ``<tmp>/vaultfs-mp-<pid>-*``, once per process; first
    remove those of processes that are gone (:func:`scratch.sweep_dead_dirs`).

    multiprocessing's own, ``<tmp>/pymp-*``, is removed only by its finalizer at interpreter
    exit: a vaultfs command ends by ``os._exit`` (cli/main.py, which calls
    :func:`release_mp_tempdir` instead), and ``kill -9`` runs nothing, so every mount daemon
    that ran a repair left one behind (a dead socket in it), with no name to tell it from
    another program's. Where ``$TMPDIR`` is too long for the socket's path, ``/tmp`` is
    used; where neither fits, multiprocessing's own choice stays."""
    global _mp_tempdir
    from multiprocessing import process, util

    from . import scratch

    config = process.current_process()._config
    if config.get("tempdir") is not None:
        return
    import tempfile

    for parent in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        # the directory's name: the prefix, a pid (up to 7 digits), "-" and 8 characters
        longest = len(os.path.join(parent, MP_PREFIX).encode()) + 7 + 9 + _MP_SOCKET_NAME
        if longest > 107 or not os.access(parent, os.W_OK | os.X_OK):
            continue
        scratch.sweep_dead_dirs(MP_PREFIX, parent)
        try:
            d = scratch.owned_tempdir(MP_PREFIX, parent)
        except OSError:
            continue
        config["tempdir"] = _mp_tempdir = d
        # an interpreter that exits normally (a script, not cli/main.py) removes it too
        util.Finalize(None, scratch.remove_tree, args=(d,), exitpriority=-100)
        return


def release_mp_tempdir() -> None:
    """Remove this process's multiprocessing temporary directory (:func:`own_mp_tempdir`) at
    its exit, which multiprocessing's atexit finalizer would do but ``os._exit`` skips. Only
    in the process that made it (a forked child inherits the setting); never raises."""
    d = _mp_tempdir
    if d is None or not os.path.basename(d).startswith(f"{MP_PREFIX}{os.getpid()}-"):
        return
    from . import scratch

    with contextlib.suppress(OSError):
        scratch.remove_tree(d)


def _worker_main(
    wid: int,
    conn: Connection,
    cfg: SealConfig,
    shm: mmap.mmap,
    pdeathsig: bool,
) -> None:
    if pdeathsig:
        _set_pdeathsig()
    tune_malloc()
    # keep only the standard streams and our own pipe end: never the vault lock, the FUSE
    # device, the index or another sealer's pipe, which must all close when the vault
    # process dies (the shared mapping needs no descriptor)
    own = conn.fileno()
    os.closerange(3, own)
    os.closerange(own + 1, 1 << 20)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the vault process's to handle
    conn.send(("ready", wid))  # the descriptors above are closed: start() may return
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        with lock:
            conn.send(msg)

    sealer = _Sealer(wid, cfg, memoryview(shm), send, background=True)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if msg[0] == "chunks":
                sealer.on_chunks(*msg[1:])
            elif msg[0] == "seal":
                sealer.on_seal(msg[1])
            elif msg[0] == "stop":
                sealer.drain()
                return
        except Exception as e:
            sealer.used, sealer.chunks = 0, []
            send(("error", type(e).__name__, _describe(e)))
            if msg[0] == "chunks":
                send(("done", msg[1]))
            elif msg[0] == "seal":
                sealer._after_reports(("sealed", msg[1]))


class SealerPool:
    """N sealer processes (or one inline sealer) fed from shared-memory slots.

    ``commit(reports)`` is called with sealed-segment reports, in order per sealer, from the
    collector thread (inline: from the submitting thread); it must make them durable in the
    index or raise. Every public method may raise the first failure since the last call
    (:class:`SealerError`, :class:`DiskFull`) once.
    """

    def __init__(
        self,
        cfg: SealConfig,
        commit: Callable[[list[SegmentReport]], None],
        workers: int = 2,
    ) -> None:
        self.cfg = cfg
        self._commit = commit
        self.workers = workers
        self._shm = mmap.mmap(-1, SLOTS * SLOT_SIZE)
        self.view = memoryview(self._shm)
        self._cond = threading.Condition()
        self._free = list(range(SLOTS))
        self._jobs: dict[int, tuple[int, int, list[bytes]]] = {}  # job -> (slot, worker, cids)
        self._outstanding = [0] * max(workers, 1)
        self._next = 0
        self._sealed: dict[int, set[int]] = {}  # token -> workers that answered
        self._error: BaseException | None = None
        #: chunk id -> sealer holding it until its segment is committed
        self.inflight: dict[bytes, int] = {}
        self._procs: list[multiprocessing.Process] = []
        self._conns: list[Connection] = []
        self._inline: _Sealer | None = None
        self._collector: threading.Thread | None = None
        self._dead: set[int] = set()  # sealers whose pipe closed (died)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self.workers == 0:
            self._inline = _Sealer(0, self.cfg, self.view, self._on_inline, background=False)
            return
        ctx = multiprocessing.get_context("fork")
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits: only ask for it when
        # that thread is the main one, which lives as long as the process
        main = threading.current_thread() is threading.main_thread()
        for wid in range(self.workers):
            ours, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=_worker_main,
                args=(wid, theirs, self.cfg, self._shm, main),
                name=f"vaultfs-sealer-{wid}",
                daemon=True,
            )
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(ours)
        for wid, c in enumerate(self._conns):  # each one set up before anything is sent
            try:
                ok = c.poll(30) and c.recv() == ("ready", wid)
            except (EOFError, OSError):
                ok = False
            if not ok:
                self.close()
                raise SealerError(f"sealer process {wid} did not start")
        self._collector = threading.Thread(
            target=self._collect, name="vaultfs-collector", daemon=True
        )
        self._collector.start()

    def close(self) -> None:
        """Stop the sealers (an unsealed open segment is discarded: seal first)."""
        if self._closed:
            return
        self._closed = True
        for c in self._conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        if self._collector is not None:
            self._collector.join(timeout=30)
        for c in self._conns:
            c.close()
        try:
            self.view.release()
            self._shm.close()
        except BufferError:  # a slice is still referenced (an exception's traceback holds it):
            pass  # the mapping goes when the last reference does

    # -- slots and jobs -------------------------------------------------------------------
    def acquire(self) -> int:
        """A free slot number (waits for one); its bytes are ``view[slot*SLOT_SIZE:…]``."""
        with self._cond:
            while not self._free:
                self._raise_pending()
                self._cond.wait(timeout=1.0)
                self._check_alive()
            self._raise_pending()
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    def submit(
        self, slot: int, epoch: int, key: bytes, suite: int, items: list[tuple[bytes, int, int]]
    ) -> None:
        """Seal ``items`` (chunk id, offset in the slot, length) of ``slot``; the slot comes
        back to the free list when the sealer is done with it (or at once, when this raises
        a pending error). Marks the ids in flight."""
        if not items:
            self.release(slot)
            return
        base = slot * SLOT_SIZE
        with self._cond:
            if self._error is not None:  # the slot is ours again before the error goes up
                self._free.append(slot)
                self._cond.notify_all()
                self._raise_pending()
            w = min(range(len(self._outstanding)), key=lambda i: self._outstanding[i])
            job = self._next
            self._next += 1
            self._outstanding[w] += 1
            cids = [c for c, _o, _l in items]
            self._jobs[job] = (slot, w, cids)
            for c in cids:
                self.inflight[c] = w
        msg = ("chunks", job, epoch, key, suite, base, items)
        if self._inline is not None:
            self._inline.on_chunks(*msg[1:])
        else:
            try:
                self._conns[w].send(msg)
            except OSError:
                self._check_alive()
                raise

    def seal(self) -> None:
        """Return once every chunk submitted so far is committed (or raise why not)."""
        if self._inline is not None:
            self._inline.on_seal(0)
            self._raise_pending()
            return
        with self._cond:
            token = self._next
            self._next += 1
            self._sealed[token] = set()
        for c in self._conns:
            c.send(("seal", token))
        with self._cond:
            while len(self._sealed[token]) < len(self._conns):
                self._cond.wait(timeout=1.0)
                self._check_alive()
            del self._sealed[token]
            self._raise_pending()

    def pending_error(self) -> None:
        with self._cond:
            self._raise_pending()

    # -- replies --------------------------------------------------------------------------
    def _on_inline(self, msg: tuple) -> None:
        self._handle([(0, msg)])

    def _collect(self) -> None:
        conns = list(self._conns)
        index = {id(c): i for i, c in enumerate(conns)}
        while conns:
            try:
                self._collect_once(conns, index)
            except BaseException as e:  # never let the collector die silently
                with self._cond:
                    self._fail(e)
                    self._cond.notify_all()

    def _collect_once(self, conns: list[Connection], index: dict[int, int]) -> None:
        batch: list[tuple[int, tuple]] = []
        for c in wait(conns):
            while True:  # everything already there, in order
                try:
                    batch.append((index[id(c)], c.recv()))
                except (EOFError, OSError):
                    conns.remove(c)
                    self._lost(index[id(c)])
                    break
                if not c.poll():
                    break
        self._handle(batch)

    def _handle(self, batch: list[tuple[int, tuple]]) -> None:
        reports = [m[1] for _w, m in batch if m[0] == "segment"]
        if reports:
            try:
                self._commit(reports)
            except BaseException as e:
                with self._cond:
                    self._fail(e)
                    for r in reports:
                        for cid, *_rest in r.chunks:
                            self.inflight.pop(cid, None)
            else:
                with self._cond:
                    for r in reports:
                        for cid, *_rest in r.chunks:
                            if self.inflight.get(cid) == r.worker:
                                del self.inflight[cid]
        with self._cond:
            for w, m in batch:
                kind = m[0]
                if kind == "done":
                    slot, jw, _cids = self._jobs.pop(m[1])
                    self._outstanding[jw] -= 1
                    self._free.append(slot)
                elif kind == "sealed":
                    self._sealed.setdefault(m[1], set()).add(w)
                elif kind == "error":
                    exc = DiskFull(m[2]) if m[1] == "DiskFull" else SealerError(m[2])
                    self._fail(exc)
                    self._forget_worker(w)
            self._cond.notify_all()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e

    def _forget_worker(self, w: int) -> None:
        """Chunks a failed sealer held are no longer in flight: a retry stores them again."""
        for cid in [c for c, ww in self.inflight.items() if ww == w]:
            del self.inflight[cid]

    def _lost(self, w: int) -> None:
        if self._closed:
            return
        with self._cond:
            self._dead.add(w)
            code = self._procs[w].exitcode if w < len(self._procs) else None
            self._fail(SealerError(f"sealer process {w} died unexpectedly (exit code {code})"))
            self._forget_worker(w)
            for job, (slot, jw, _c) in list(self._jobs.items()):
                if jw == w:
                    del self._jobs[job]
                    self._free.append(slot)
            self._sealed_all_for(w)
            self._cond.notify_all()

    def _sealed_all_for(self, w: int) -> None:
        for waiting in self._sealed.values():
            waiting.add(w)

    def _raise_pending(self) -> None:
        """Raise the error a sealer reported, once (under ``self._cond``). The jobs handed
        out before it are waited for first (at most :data:`ERROR_SETTLE` seconds): the other
        sealers' errors for them are the same failure (a full disk fails every sealer), and
        one arriving after the raise would fail the caller's retry once space is back."""
        if self._error is not None:
            deadline = time.monotonic() + ERROR_SETTLE
            while self._jobs and not self._closed and time.monotonic() < deadline:
                self._cond.wait(timeout=0.1)
            e, self._error = self._error, None
            raise e

    def _check_alive(self) -> None:
        if self._closed:
            raise SealerError("the sealer pool is closed")

    def wait_free(self, n: int) -> None:
        """Return once at least ``n`` slots are free: the sealers took in every other slot
        handed to them (or raise why not)."""
        with self._cond:
            while len(self._free) < n:
                self._raise_pending()
                self._cond.wait(timeout=1.0)
                self._check_alive()
            self._raise_pending()

    @property
    def free_slots(self) -> int:
        """Slots not held by a caller or a sealer."""
        with self._cond:
            return len(self._free)

    @property
    def pids(self) -> list[int]:
        """Process ids of the sealers (none when sealing inline)."""
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def broken(self) -> bool:
        """True when a sealer process is gone: the vault starts a new pool."""
        return bool(self._dead) or any(not p.is_alive() for p in self._procs)
