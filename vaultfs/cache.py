"""The mount's write-back cache: dirty file blocks on local disk under a hard byte budget.

A block (``live_block_size`` bytes of a file, 1 MiB by default) that a write touches becomes
*dirty*: its current content lives in ``<home>/cache/<inode>.<block>`` and counts one whole
block against the budget until it is stored. Writers that would exceed the budget wait
(backpressure); they never fail for lack of cache.

The uploader (:meth:`BlockCache.run`) stores dirty blocks through the engine in worker
threads: read the cache file, cut it into keyed CDC chunks, ``Vault.store_chunks`` (hash,
compress, encrypt, pack). Once the chunks are durable in a sealed segment (the engine's
``chunks`` table knows them) the block's chunk list goes into the live tree; after *that*
commit the cache file is deleted and the budget released. A block written again while it
was being stored stays dirty (a version counter tells). Below ``HIGH_WATER`` of the budget
only blocks of closed files (complete ones at the uploader's next tick, every 0.5 s, so the
files closed meanwhile share one round; others ``idle`` seconds after the last write) and
blocks untouched for ``OPEN_IDLE`` seconds are stored; above it, every dirty block at once,
so a stream larger than the cache releases it block by block. The cache files of the blocks
one commit settled are deleted together, in one worker-thread call.

A full disk (ENOSPC, EDQUOT on the home's file system): a write whose cache file cannot be
written keeps its block's whole content in the daemon's memory instead (``Dirty.mem``), and
the write succeeds. Reads serve that memory, the uploader stores from it once the engine has
room for segments again, ``fsync`` first writes it to a cache file (and fails with ENOSPC
while that is impossible), and ``drain`` fails with :class:`DiskFull` naming the files whose
blocks are not stored. So the mount never shows bytes it will not store: before this, the
kernel's page cache kept serving a write the daemon had refused, and the file was stored
short (docs/mount.md, "A full home disk"). Memory-held blocks count against the budget like
any dirty block, so the memory is bounded by ``--cache-size``.

Crash states: a cache file always holds the newest content of its block, except while the
block is held in memory (then it holds an older content, or a new block has none); at the
next mount every cache file of a live block is dirty again (``recover``), so nothing
fsync'd is lost. A crash between storing chunks and the live tree commit leaves
unreferenced chunks (wasted space, never wrong data).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .chunkreader import ChunkReader
from .errors import DiskFull, VaultError
from .holes import is_hole
from .index import chunks as chunk_table
from .livetree import Chunks, LiveTree, Node
from .names import display
from .vault import Vault

log = logging.getLogger("vaultfs.cache")

MIN_BUDGET_BLOCKS = 8
#: Above this fraction of the budget every dirty block is stored at once; below it, only
#: blocks of closed files (and blocks untouched for OPEN_IDLE seconds), so a burst such as a
#: pg_dump smaller than the cache is absorbed without competing with the writer for CPU.
HIGH_WATER = 0.5
OPEN_IDLE = 30.0


@dataclass(eq=False)
class Dirty:
    """A dirty block. ``version`` changes on every modification; ``writers`` counts writes in
    flight (the uploader skips a block while it is being written). ``synced`` is the version
    last made durable by fsync, ``linked`` whether the cache file's directory entry is."""

    ino: int
    blk: int
    version: int = 0
    writers: int = 0
    uploading: bool = False
    ready: bool = False
    since: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)  # last write
    synced: int = -1
    linked: bool = False
    #: set while its cache file is being deleted (stored, committed); writers wait for it
    retiring: trio.Event | None = None
    #: True while the write that made the block dirty creates its cache file (the stored
    #: content copied in, then the new bytes): until then readers read the stored content
    filling: bool = False
    #: bytes the cache file allocates on the local disk (its st_blocks), as of the last
    #: write; None until the first one (st_blocks of the mount's files, fs.py); for a block
    #: held in memory, its length (what its cache file will take)
    alloc: int | None = None
    #: the block's whole current content, held in memory because the home's disk had no room
    #: for its cache file (which then holds an older content, or does not exist): reads, the
    #: uploader and fsync use this, never the file
    mem: bytearray | None = None

    @property
    def readable(self) -> bool:
        """Whether reads of the block go to its cache file: not while the file is being
        created (absent, or emptied before the stored content is copied in) nor once it is
        being deleted (the committed chunks hold the same bytes then)."""
        return not self.filling and self.retiring is None


class BlockCache:
    def __init__(
        self,
        vault: Vault,
        tree: LiveTree,
        cache_dir: Path,
        budget: int,
        journal,
        reader: ChunkReader,
        idle=2.0,
    ) -> None:
        self.vault = vault
        self.reader = reader
        self.tree = tree
        self.dir = cache_dir
        self.bs = tree.block_size
        self.budget = max(budget, MIN_BUDGET_BLOCKS * self.bs)
        self.journal = journal
        self.idle = idle
        self.dirty: dict[tuple[int, int], Dirty] = {}
        self._per_ino: dict[int, int] = {}  # inode -> its blocks in dirty (blocks_of)
        self.used = 0  # bytes reserved: one block per dirty block
        self.waiting = 0  # writers waiting for budget
        self._freed = trio.Event()
        self._kick = trio.Event()
        self._pending: list[tuple[Dirty, int, Chunks, float]] = []
        self._retiring: list[Dirty] = []  # committed blocks whose cache files go next
        self._retires = 0  # _retire tasks spawned and not finished
        self._retired = trio.Event()  # set (and replaced) when the last of them finishes
        self.stored_blocks = 0
        self.stored_bytes = 0
        self.error: str | None = None
        self._rounds = trio.Lock()  # one store/settle round at a time (uploader vs drain)

    # -- paths and recovery -----------------------------------------------------------------
    def path(self, ino: int, blk: int) -> Path:
        return self.dir / f"{ino}.{blk}"

    def recover(self) -> int:
        """Register cache files left by a previous run as dirty (before serving requests).
        Files of blocks that no longer exist are removed. Returns bytes recovered."""
        self.dir.mkdir(parents=True, exist_ok=True)
        found = 0
        for f in self.dir.iterdir():
            try:
                ino_s, blk_s = f.name.split(".")
                ino, blk = int(ino_s), int(blk_s)
            except ValueError:
                f.unlink()
                continue
            n = self.tree.get(ino)
            if n is None or not n.is_reg or blk * self.bs >= n.size:
                f.unlink()
                continue
            # a write may have reached the file but not the index (no fsync before the
            # crash): bytes past the committed size must read as zeros if the file grows
            keep = min(self.bs, n.size - blk * self.bs)
            if f.stat().st_size > keep:
                os.truncate(f, keep)
            st = f.stat()
            d = Dirty(ino, blk, ready=True, synced=0, linked=True, alloc=st.st_blocks * 512)
            self._put(d)
            self.used += self.bs
            found += st.st_size
        return found

    # -- budget -----------------------------------------------------------------------------
    async def reserve(self, count: int = 1) -> None:
        """Wait until ``count`` more blocks fit in the budget, then reserve them."""
        need = count * self.bs
        while self.used + need > self.budget and self.used > 0:
            self.waiting += 1
            try:
                self._kick.set()
                evt = self._freed
                await evt.wait()
            finally:
                self.waiting -= 1
        self.used += need

    def unreserve(self, count: int = 1) -> None:
        self.used -= count * self.bs
        self._freed.set()
        self._freed = trio.Event()

    def kick(self) -> None:
        self._kick.set()

    # -- dirty bookkeeping (event loop) -----------------------------------------------------
    def get(self, ino: int, blk: int) -> Dirty | None:
        return self.dirty.get((ino, blk))

    def add(self, ino: int, blk: int) -> Dirty:
        """Register a new dirty block (budget already reserved); it is ``filling`` until the
        caller has created its cache file and clears the flag."""
        d = Dirty(ino, blk, filling=True)
        self._put(d)
        return d

    def _put(self, d: Dirty) -> None:
        self.dirty[(d.ino, d.blk)] = d
        self._per_ino[d.ino] = self._per_ino.get(d.ino, 0) + 1

    def _pop(self, ino: int, blk: int) -> Dirty | None:
        d = self.dirty.pop((ino, blk), None)
        if d is not None:
            left = self._per_ino[ino] - 1
            if left:
                self._per_ino[ino] = left
            else:
                del self._per_ino[ino]
        return d

    def discard(self, ino: int, blk: int, unlink: bool = True) -> Path:
        """Forget a dirty block (truncated away or file deleted) and delete its cache file;
        with ``unlink=False`` the caller deletes it (after the index no longer needs it)."""
        d = self._pop(ino, blk)
        if d is not None:
            d.version += 1
            if unlink:
                self.path(ino, blk).unlink(missing_ok=True)
            self.unreserve()
        return self.path(ino, blk)

    def blocks_of(self, ino: int) -> list[Dirty]:
        if ino not in self._per_ino:  # most files: no scan of every dirty block
            return []
        return [d for (i, _b), d in self.dirty.items() if i == ino]

    @property
    def dirty_bytes(self) -> int:
        return self.used

    # -- uploader ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Background task: store dirty blocks as they become ready."""
        while True:
            with trio.move_on_after(0.5):
                await self._kick.wait()
            self._kick = trio.Event()
            try:
                async with self._rounds:
                    while await self.round(force=False):
                        pass
            except Exception as e:  # keep the mount alive; data stays dirty and is retried
                self.error = f"{type(e).__name__}: {e}"
                log.exception("storing dirty blocks failed")
                await trio.sleep(2)

    def _pressure(self) -> bool:
        return self.waiting > 0 or self.used + 2 * self.bs > self.budget

    def _candidates(self, force: bool) -> list[tuple[Dirty, int]]:
        now = time.monotonic()
        eager = force or self._pressure() or self.used >= self.budget * HIGH_WATER
        out = []
        for d in self.dirty.values():
            if d.uploading or d.writers:
                continue
            n = self.tree.get(d.ino)
            closed = n is None or n.opens <= 0
            idle = now - d.touched
            if eager or (closed and (d.ready or idle >= self.idle)) or idle >= OPEN_IDLE:
                out.append(d)
        out.sort(key=lambda d: (not d.ready, d.since))
        batch, nbytes = [], 0
        for d in out[:256]:
            n = self.tree.get(d.ino)
            nbytes += 0 if n is None else max(0, min(self.bs, n.size - d.blk * self.bs))
            batch.append((d, d.version))
            if nbytes >= 32 * self.bs:
                break
        return batch

    async def round(self, force: bool, settle: bool = True) -> bool:
        """Store one batch of blocks and (if ``settle``) move durable ones into the tree.
        Returns True if it did work."""
        work = self._candidates(force)
        did = False
        if work:
            did = True
            jobs = []
            for d, ver in work:
                n = self.tree.get(d.ino)
                length = 0 if n is None else min(self.bs, n.size - d.blk * self.bs)
                d.uploading = True
                jobs.append((d, ver, length))
            try:
                results = await trio.to_thread.run_sync(self._store, jobs)
            except BaseException:
                for d, _v, _l in jobs:
                    d.uploading = False
                raise
            now = time.monotonic()
            for (d, ver, _length), chunks in zip(jobs, results, strict=True):
                if self.dirty.get((d.ino, d.blk)) is not d or d.version != ver:
                    d.uploading = False
                    continue
                if chunks is None:  # past the end of the file, or no cache file: nothing to keep
                    d.uploading = False
                    self.discard(d.ino, d.blk)
                    continue
                self._pending.append((d, ver, chunks, now))
        if self._pending and settle:
            did = await self._settle(force) or did
        return did

    def _store(self, jobs: list[tuple[Dirty, int, int]]) -> list[Chunks | None]:
        """Worker thread: read cache files, chunk and store. None = nothing to store."""
        out: list[Chunks | None] = []
        for d, _ver, length in jobs:
            if length <= 0:
                out.append(None)
                continue
            mem = d.mem
            if mem is not None:
                data = bytes(mem[:length])
            else:
                try:
                    with open(self.path(d.ino, d.blk), "rb") as f:
                        data = f.read(length)
                except FileNotFoundError:
                    out.append(None)
                    continue
            pieces = list(self.vault.chunker.chunks(io.BytesIO(data))) if data else []
            cids = self.vault.store_chunks(pieces) if pieces else []
            zeros = self.tree.zeros
            for cid, piece in zip(cids, pieces, strict=True):
                self.reader.keep(cid, piece)  # reads back without a fetch once stored
                if zeros is not None and is_hole(piece):
                    zeros.note(cid, len(piece))  # st_blocks counts it as a hole
            out.append([(c, len(p)) for c, p in zip(cids, pieces, strict=True)])
            self.stored_bytes += len(data)
        return out

    async def _settle(self, force: bool) -> bool:
        """Move pending blocks whose chunks are durable into the live tree."""
        cids = list({c for _d, _v, chunks, _t in self._pending for c, _n in chunks})
        durable = await trio.to_thread.run_sync(self._durable, cids)
        oldest = min(t for *_x, t in self._pending)
        if len(durable) < len(cids) and (
            force or self._pressure() or time.monotonic() - oldest > self.idle
        ):
            await trio.to_thread.run_sync(self.vault.seal)
            durable = await trio.to_thread.run_sync(self._durable, cids)
            sealed = True
        else:
            sealed = False
        for d, *_rest in self._pending:  # files not opened since the mount: load block lists
            n = self.tree.get(d.ino)
            if n is not None and n.blocks is None:
                blocks = await trio.to_thread.run_sync(self.tree.load_blocks, d.ino)
                self.tree.attach_blocks(n, blocks)
        keep = []
        moved = False
        for item in self._pending:
            d, ver, chunks, _t = item
            if not all(c in durable for c, _n in chunks):
                if sealed:  # its segment failed to seal: store the block again
                    d.uploading = False
                else:
                    keep.append(item)
                continue
            moved = True
            self._finish(d, ver, chunks)
        self._pending = keep
        if moved:
            self.journal.kick()
        return moved

    def _durable(self, cids: list[bytes]) -> set[bytes]:
        return set(chunk_table.known(self.vault.index, cids))

    def _finish(self, d: Dirty, ver: int, chunks: Chunks) -> None:
        key = (d.ino, d.blk)
        n = self.tree.get(d.ino)
        if self.dirty.get(key) is not d or d.version != ver or n is None or n.blocks is None:
            d.uploading = False
            return
        self.tree.set_block(n, d.blk, chunks or None)
        self.stored_blocks += 1

        def done() -> None:
            if self.dirty.get(key) is d and d.version == ver:
                d.retiring = trio.Event()
                self._retiring.append(d)
                if len(self._retiring) == 1:  # one task (and one thread hop) per commit
                    self._retires += 1
                    trio.lowlevel.spawn_system_task(self._retire)
            else:
                d.uploading = False

        self.tree.after_commit(done)

    async def _retire(self) -> None:
        """Stored blocks' lists are committed: delete their cache files in one worker thread
        call (an unlink can wait long on a busy disk, and the FUSE loop must not) and forget
        the blocks. Writers of a block wait for its ``retiring`` event meanwhile
        (:meth:`retiring`)."""
        batch, self._retiring = self._retiring, []
        failed = set(range(len(batch)))  # until the thread says otherwise
        try:
            failed = await trio.to_thread.run_sync(
                unlink_each, [self.path(d.ino, d.blk) for d in batch]
            )
        except Exception:  # the files stay: stored again (dedup) at worst
            log.exception("removing stored blocks' cache files failed")
        finally:
            for i, d in enumerate(batch):
                key = (d.ino, d.blk)
                if i not in failed and self.dirty.get(key) is d:  # not discarded meanwhile
                    self._pop(*key)
                    self.unreserve()
                evt, d.retiring = d.retiring, None
                d.uploading = False
                if evt is not None:
                    evt.set()
            self._retires -= 1
            if not self._retires:
                self._retired.set()
                self._retired = trio.Event()

    async def retired(self) -> None:
        """Wait until the blocks whose lists are committed so far have lost their cache files
        and left :attr:`dirty` (:meth:`_retire` runs after the commit, in a worker thread):
        then the cache directory holds exactly the dirty blocks' files."""
        while self._retires:
            await self._retired.wait()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """No dirty block is stored inside the block (writers go on filling the cache, up to
        its budget). Entering moves every block already stored into the live tree and commits
        it, so the index names every chunk the cache's blocks refer to (prune relies on it)."""
        async with self._rounds:
            if self._pending:
                await self._settle(force=True)
            await self.journal.commit()
            yield

    def retiring(self, ino: int, first: int, last: int) -> list[trio.Event]:
        """Events of blocks first..last of ``ino`` whose cache files are being deleted: a
        writer waits for them, then finds those blocks clean."""
        return [
            d.retiring
            for b in range(first, last + 1)
            if (d := self.dirty.get((ino, b))) is not None and d.retiring is not None
        ]

    async def drain(self, ino: int | None = None) -> None:
        """Store every dirty block (of one inode, or all) and commit the live tree.

        Callers make sure no new writes arrive meanwhile (snapshot/umount freeze the mount).
        A full disk raises :class:`DiskFull` naming the files whose blocks are not stored
        (:meth:`unstored`); they stay dirty, and a later drain stores them."""
        try:
            await self._drain(ino)
        except DiskFull as e:
            raise DiskFull(
                f"{e.message.rstrip('.')}; not stored yet: {self.unstored(ino)}"
            ) from None

    def unstored(self, ino: int | None = None) -> str:
        """What is not stored, for a message: the dirty blocks, the files they belong to (the
        first few), and how many of them only the daemon's memory holds."""
        ds = [d for (i, _b), d in self.dirty.items() if ino is None or i == ino]
        inos = sorted({d.ino for d in ds})
        names = []
        for i in inos[:5]:
            path = self.tree.path_of(i)
            names.append(display(path) if path is not None else f"inode {i} (unlinked)")
        more = f" and {len(inos) - 5} more file(s)" if len(inos) > 5 else ""
        if not ds:
            return "every block is stored; the live tree's last changes wait in the daemon"
        mem = sum(1 for d in ds if d.mem is not None)
        held = (
            f"; {mem} of them only in the mount daemon's memory (no room in the cache "
            "directory): they are lost if the daemon dies before they are stored"
            if mem
            else "; they stay safe in the cache directory"
        )
        return f"{len(ds)} block(s) of {', '.join(names) or 'no file'}{more}{held}"

    async def _drain(self, ino: int | None) -> None:
        stuck = 0
        for _ in range(100000):
            left = sum(1 for i, _b in self.dirty if ino is None or i == ino)
            if not left:
                break
            async with self._rounds:
                while await self.round(force=True, settle=False):
                    pass  # store everything first, then seal once
                if self._pending:
                    await self._settle(force=True)
            await self.journal.commit()
            await self.retired()
            now_left = sum(1 for i, _b in self.dirty if ino is None or i == ino)
            stuck = stuck + 1 if now_left >= left else 0
            if stuck > 200:
                raise VaultError(
                    f"could not store {now_left} dirty block(s) ({self.error or 'no progress'}): "
                    f"{self.unstored(ino)}; see mount.log"
                )
            if now_left:
                await trio.sleep(0.01)
        await self.journal.commit()

    # -- reading and writing block content (worker threads) --------------------------------
    def load_stored(self, chunks: Chunks, limit: int) -> bytes:
        """The stored content of a block (its first ``limit`` bytes, fewer if it is shorter)."""
        return self.reader.read_range(chunks, 0, min(limit, sum(n for _c, n in chunks)))

    def write_block(self, d: Dirty, base: bytes | None, ws: int, piece) -> None:
        """Write ``piece`` at ``ws`` into block ``d`` (worker thread; the caller holds the
        inode's lock). ``base``: the block's stored content when the write makes it dirty
        (``b""`` for none), None when it is dirty already. A block held in memory is written
        there. When the home's disk has no room, the block moves into memory whole
        (``Dirty.mem``) and the write succeeds; a new block's partial cache file is removed
        first, so a crash leaves the stored content rather than a torn copy of it. Any other
        error is raised, a new block's partial file removed the same way."""
        path = self.path(d.ino, d.blk)
        if d.mem is None:
            try:
                d.alloc = write_block_file(path, base, [(ws, piece)])
                return
            except OSError as e:
                if base is not None:
                    path.unlink(missing_ok=True)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
            if base is None:  # dirty before: its file holds the content, with this write begun
                with open(path, "rb") as f:
                    base = f.read()
            log.warning(
                "no room in %s for block %d of inode %d: held in memory until it is stored",
                self.dir, d.blk, d.ino,
            )  # fmt: skip
            d.mem = bytearray(base)
        mem = d.mem
        if len(mem) < ws:
            mem.extend(bytes(ws - len(mem)))
        mem[ws : ws + len(piece)] = piece
        d.alloc = len(mem)

    def cut_block(self, d: Dirty, base: bytes | None, cut: int) -> None:
        """Make block ``d`` end at ``cut`` bytes (worker thread); ``base`` as in
        :meth:`write_block`. A block held in memory is cut there; a full disk moves it into
        memory as :meth:`write_block` does."""
        self.write_block(d, base, 0, b"")
        if d.mem is not None:
            del d.mem[cut:]
            d.alloc = len(d.mem)
            return
        path = self.path(d.ino, d.blk)
        os.truncate(path, min(cut, os.path.getsize(path)))
        d.alloc = os.stat(path).st_blocks * 512

    def spill(self, items: list[tuple[Dirty, bytes]]) -> None:
        """Write memory-held blocks to their cache files (worker thread, for fsync): each to a
        temporary file, fsync'd, renamed over the older cache file, so a failure leaves the
        older file whole. Raises OSError (ENOSPC) while the disk has no room."""
        for d, data in items:
            path = self.path(d.ino, d.blk)
            tmp = path.with_name(path.name + ".spill")  # not a block's name: recover drops it
            try:
                alloc = write_block_file(tmp, data, [], sync=True)
                os.replace(tmp, path)
                d.alloc = alloc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


def write_block_file(
    path: Path,
    base: bytes | None,
    writes: list[tuple[int, bytes]],
    sync: bool = False,
    cut: int | None = None,
) -> int:
    """Create or update a cache file: ``base`` (the block's stored content, when it becomes
    dirty) then each (offset, data), then cut it to ``cut`` bytes if longer. Returns the
    bytes it allocates (st_blocks * 512: ``Dirty.alloc``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if base is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, base, 0)
        for off, data in writes:
            os.pwrite(fd, data, off)
        st = os.fstat(fd)
        if cut is not None and st.st_size > cut:
            os.ftruncate(fd, cut)
            st = os.fstat(fd)
        if sync:
            os.fsync(fd)
        return st.st_blocks * 512
    finally:
        os.close(fd)


def unlink_files(paths: list[Path]) -> None:
    """Delete each file (a missing one counts as deleted); the first error is raised."""
    for p in paths:
        p.unlink(missing_ok=True)


def unlink_each(paths: list[Path]) -> set[int]:
    """Delete each file (a missing one counts as deleted); returns the indexes of those that
    could not be deleted, logged (they stay: their blocks stay dirty and are stored again,
    deduplicated, at worst)."""
    failed = set()
    for i, p in enumerate(paths):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            log.exception("removing a stored block's cache file failed")
            failed.add(i)
    return failed


def fsync_files(paths: list[Path], dir_path: Path | None) -> None:
    """fsync each file (one stored and removed meanwhile is durable in the vault), then the
    directory when ``dir_path`` is given (files were created since its last fsync)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue  # stored and removed meanwhile: durable in the vault
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if dir_path is None:
        return
    fd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "BlockCache",
    "Dirty",
    "Node",
    "write_block_file",
    "fsync_files",
    "unlink_each",
    "unlink_files",
]
