"""Drive the mount's file system (:class:`vaultfs.fs.VaultFS`) without a kernel.

The file-system tier of the tests (style.md point 8; S3QL's t3 tier calls its ``Operations``
directly): a real :class:`Vault` over local-directory remotes (real chunking, encryption,
erasure coding, SQLite) and a :class:`VaultFS` loaded as ``daemon.run_foreground`` loads it,
but never mounted. A test body is a coroutine that awaits the FUSE handlers; the harness runs
it inside ``trio.run`` with the journal and the uploader in a nursery it owns (the daemon's
background tasks, without the remote pusher and the signal handler).

What the kernel would hand over is faked here: :class:`Ctx` for ``pyfuse3.RequestContext``,
:class:`Fields` for ``pyfuse3.SetattrFields`` (both read-only from Python), and a
:class:`Listing` as readdir's reply buffer. :func:`neutralise_kernel` swaps the pyfuse3
functions that reach the kernel (``readdir_reply``, ``invalidate_*``) for test doubles; it
takes a pytest ``monkeypatch``, so fs.py itself runs unchanged.

Every run ends with :func:`check_consistency` (S3QL runs fsck after each test): the journal
is committed and the in-memory live tree must equal a fresh :class:`LiveTree` loaded from the
index, with every stored block's chunks in the index and the cache directory holding exactly
the dirty blocks.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

from vaultfs import keys
from vaultfs.fs import VaultFS
from vaultfs.livetree import ROOT_INODE, LiveTree
from vaultfs.readcache import DEFAULT_READ_CACHE_SIZE
from vaultfs.vault import Vault

T = TypeVar("T")

PASSPHRASE = "fs-tier"
#: Live block size of the harness' vaults: small, so block boundaries are cheap to cross.
SMALL_BLOCKS = 64 * 1024


@dataclass
class Ctx:
    """Stands in for ``pyfuse3.RequestContext`` (fs.py reads ``uid`` and ``gid``)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@dataclass
class Fields:
    """Stands in for ``pyfuse3.SetattrFields``: which attributes a setattr changes.
    ``kill_suidgid`` is the kernel's FUSE_HANDLE_KILLPRIV_V2 request (patched pyfuse3)."""

    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    kill_suidgid: bool = False


@dataclass
class Listing:
    """readdir's reply buffer: takes up to ``room`` entries, then reports it is full."""

    room: int = 1 << 30
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)


def _readdir_reply(
    token: Listing, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
) -> bool:
    if len(token.entries) >= token.room:
        return False
    token.entries.append((bytes(name), attr, next_id))
    return True


def neutralise_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace the pyfuse3 calls that talk to the kernel; returns the list that records the
    invalidations fs.py asked for, as (function name, args)."""
    calls: list[tuple] = []
    monkeypatch.setattr(pyfuse3, "readdir_reply", _readdir_reply)
    for name in ("invalidate_entry", "invalidate_entry_async", "invalidate_inode"):
        monkeypatch.setattr(
            pyfuse3, name, lambda *args, _n=name: calls.append((_n, args)), raising=False
        )
    return calls


async def fuse_errno(aw: Awaitable[Any]) -> int:
    """The errno of the FUSEError ``aw`` raises (fails the test if it succeeds)."""
    try:
        await aw
    except pyfuse3.FUSEError as e:
        return e.errno
    raise AssertionError("the handler succeeded; an error was expected")


class Driver:
    """A VaultFS with path-level helpers over its handlers (what the kernel would send).

    Paths are bytes relative to the root, components separated by ``/``. Every helper that
    returns an inode took a kernel lookup reference, as the kernel would."""

    def __init__(self, fs: VaultFS, ctx: Ctx) -> None:
        self.fs = fs
        self.ctx = ctx

    async def lookup(self, path: bytes) -> pyfuse3.EntryAttributes:
        ino = ROOT_INODE
        attr = await self.fs.getattr(ino, self.ctx)
        for part in path.split(b"/") if path else []:
            attr = await self.fs.lookup(ino, part, self.ctx)
            if attr.st_ino == 0:  # a negative entry: the kernel answers ENOENT
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino = attr.st_ino
        return attr

    async def ino(self, path: bytes) -> int:
        return (await self.lookup(path)).st_ino

    async def _parent(self, path: bytes) -> tuple[int, bytes]:
        head, _sep, name = path.rpartition(b"/")
        return await self.ino(head), name

    async def mkdir(self, path: bytes, mode: int = 0o755) -> int:
        parent, name = await self._parent(path)
        return (await self.fs.mkdir(parent, name, mode, self.ctx)).st_ino

    async def create(self, path: bytes, mode: int = 0o644) -> tuple[int, int]:
        """Create a file and open it: (file handle, inode)."""
        parent, name = await self._parent(path)
        info, attr = await self.fs.create(parent, name, mode, os.O_RDWR, self.ctx)
        return info.fh, attr.st_ino

    async def open(self, path: bytes, flags: int = os.O_RDWR) -> int:
        return (await self.fs.open(await self.ino(path), flags, self.ctx)).fh

    async def write_file(self, path: bytes, data: bytes, mode: int = 0o644) -> int:
        """Create ``path`` holding ``data`` (written in one call) and close it; its inode."""
        fh, ino = await self.create(path, mode)
        if data:
            assert await self.fs.write(fh, 0, data) == len(data)
        await self.fs.release(fh)
        return ino

    async def read_file(self, path: bytes) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            size = (await self.lookup(path)).st_size
            return await self.fs.read(fh, 0, size + 1)
        finally:
            await self.fs.release(fh)

    async def listdir(self, ino: int, start: int = 0, room: int = 1 << 30) -> Listing:
        """One readdir call from ``start`` on a fresh opendir handle."""
        fh = await self.fs.opendir(ino, self.ctx)
        try:
            listing = Listing(room)
            await self.fs.readdir(fh, start, listing)
            return listing
        finally:
            await self.fs.releasedir(fh)

    async def names(self, ino: int) -> list[bytes]:
        return [name for name, _a, _n in (await self.listdir(ino)).entries]

    async def setattr(self, ino: int, **changes: int) -> pyfuse3.EntryAttributes:
        """setattr with ``st_size``, ``st_mode``, ``st_uid``, ``st_gid``, ``st_atime_ns``,
        ``st_mtime_ns``, ``st_ctime_ns`` (those given are updated) and ``kill_suidgid``."""
        attr = pyfuse3.EntryAttributes()
        fields = Fields(kill_suidgid=bool(changes.pop("kill_suidgid", False)))
        for key, value in changes.items():
            setattr(attr, key, value)
            flag = "update_" + key.removeprefix("st_").removesuffix("_ns")
            assert hasattr(fields, flag), key
            setattr(fields, flag, True)
        return await self.fs.setattr(ino, attr, fields, None, self.ctx)


def check_consistency(fs: VaultFS) -> None:
    """fsck of the live tree, on the loop, with the journal committed, no handler running
    and the uploader stopped: raise AssertionError naming every difference between the
    in-memory tree and a fresh load of the index, or any broken invariant."""
    tree = fs.tree
    assert not tree.dirty, "the journal left marks uncommitted"
    problems: list[str] = []
    reachable = {ROOT_INODE: tree.nodes[ROOT_INODE], **{n.ino: n for _p, n in tree.walk()}}
    for ino, n in tree.nodes.items():  # unnamed inodes live only while the kernel holds them
        if ino not in reachable and (n.nlink != 0 or (n.lookups <= 0 and n.opens <= 0)):
            problems.append(f"inode {ino}: unnamed, nlink {n.nlink}, not held yet not purged")
    fresh = LiveTree(fs.vault.index)
    fresh.load(fs.uid, fs.gid)
    if set(fresh.nodes) != set(reachable):
        problems.append(
            f"inodes in memory only {sorted(set(reachable) - set(fresh.nodes))}, "
            f"in the index only {sorted(set(fresh.nodes) - set(reachable))}"
        )
    if fresh.next_ino != tree.next_ino or tree.next_ino <= max(tree.nodes):
        problems.append(f"next inode: memory {tree.next_ino}, index {fresh.next_ino}")
    bs = tree.block_size
    cids: set[bytes] = set()
    for ino, n in reachable.items():
        old = fresh.nodes.get(ino)
        if old is None:
            continue
        for what, mine, theirs in (
            ("attributes", n.row(), old.row()),
            ("xattrs", n.xattrs, old.xattrs),
            ("entries", n.children, old.children),
        ):
            if mine != theirs:
                problems.append(f"inode {ino} {what}: memory {mine!r}, index {theirs!r}")
        if n.is_dir:
            assert n.children is not None
            subdirs = sum(1 for i in n.children.values() if tree.nodes[i].is_dir)
            if n.nlink != 2 + subdirs:
                problems.append(f"directory {ino}: nlink {n.nlink}, {subdirs} subdirectories")
        if n.is_reg:
            blocks = n.blocks if n.blocks is not None else tree.load_blocks(ino)
            if blocks != fresh.load_blocks(ino):
                problems.append(f"inode {ino}: block lists differ from the index")
            # st_blocks: the count kept as blocks change, against a recount (it may exceed
            # it: a zero chunk counted as data before its length was known, vaultfs/holes.py)
            recount = sum(tree.block_alloc(c) for c in blocks.values())
            if n.alloc is not None and n.alloc < recount:
                problems.append(f"inode {ino}: alloc {n.alloc} below its blocks' {recount}")
            for blk, chunks in blocks.items():
                cids.update(c for c, _len in chunks)
                if blk * bs >= n.size or sum(ln for _c, ln in chunks) > bs:
                    problems.append(f"inode {ino} block {blk}: outside the file or oversized")
    known = _known_chunks(fs, sorted(cids))
    if known != cids:
        problems.append(f"{len(cids - known)} chunk(s) of stored blocks missing in the index")
    problems += _cache_problems(fs)
    assert not problems, "live tree inconsistent:\n" + "\n".join(problems)


def _known_chunks(fs: VaultFS, cids: list[bytes]) -> set[bytes]:
    out: set[bytes] = set()
    for i in range(0, len(cids), 500):
        part = cids[i : i + 500]
        marks = ",".join("?" * len(part))
        out.update(
            bytes(r[0])
            for r in fs.vault.index.q(f"SELECT cid FROM chunks WHERE cid IN ({marks})", tuple(part))
        )
    return out


def _cache_problems(fs: VaultFS) -> list[str]:
    """Dirty blocks belong to live files, each has its cache file, nothing else is in the
    cache directory, and the budget counts exactly the dirty blocks."""
    cache, bs = fs.cache, fs.tree.block_size
    problems = []
    for (ino, blk), _d in cache.dirty.items():
        n = fs.tree.get(ino)
        if n is None or not n.is_reg or blk * bs >= n.size:
            problems.append(f"dirty block {ino}.{blk} outside a live file")
        elif cache.path(ino, blk).stat().st_size > bs:
            problems.append(f"cache file {ino}.{blk} larger than a block")
    files = {p.name for p in cache.dir.iterdir()}
    want = {cache.path(i, b).name for i, b in cache.dirty}
    if files != want:
        problems.append(f"cache files without a dirty block {sorted(files - want)}, "
                        f"dirty blocks without a file {sorted(want - files)}")  # fmt: skip
    if cache.used != bs * len(cache.dirty):
        problems.append(f"cache budget counts {cache.used} bytes for {len(cache.dirty)} blocks")
    return problems


class Harness:
    """A k-of-n vault over n local-directory remotes under ``root`` and, for each ``run``,
    a VaultFS on it, unmounted.

    ``run(body)`` serves one life of the file system: it loads a fresh VaultFS (as a mount
    does), awaits ``body(driver)``, then runs the consistency check. ``crash()`` closes the
    vault without storing what is dirty, as a killed daemon would (the next ``run``
    recovers like the next mount); it also releases the vault at the end of a test."""

    def __init__(
        self,
        root: Path,
        block_size: int = SMALL_BLOCKS,
        cache_size: int = 0,
        read_cache_size: int = DEFAULT_READ_CACHE_SIZE,
        k: int = 2,
        n: int = 3,
    ) -> None:
        self.root = root
        self.home = root / "home"
        self.cache_size = cache_size
        self.read_cache_size = read_cache_size
        remotes = [str(root / f"r{i}") for i in range(n)]
        self.vault: Vault | None = Vault.create(
            self.home, remotes, k, n, PASSPHRASE, segment_size=1 << 20
        )
        self.keys = self.vault.keys
        self.vault.index.set("live_block_size", block_size)
        self.vault.start_sealers()  # before any thread, as the daemon does
        self.ctx = Ctx(uid=os.getuid(), gid=os.getgid())

    def open(self) -> Vault:
        """The vault, opened again (with its key, no passphrase) after a crash."""
        if self.vault is None:
            self.vault = Vault.open(self.home, keys=self.keys)
            self.vault.start_sealers()
        return self.vault

    def run(
        self, body: Callable[[Driver], Awaitable[T]], check: bool = True, uploader: bool = True
    ) -> T:
        """Serve a fresh VaultFS for the length of ``body``; with ``check``, the
        consistency check follows (the body's nursery tasks are gone by then). Without
        ``uploader`` the body starts ``fs.cache.run`` itself when it wants blocks stored."""
        fs = VaultFS(
            self.open(), self.home, self.root / "mnt", self.cache_size, self.read_cache_size
        )
        fs.load()
        try:
            return trio.run(self._serve, fs, body, check, uploader)
        finally:
            fs.reader.close()

    async def _serve(
        self, fs: VaultFS, body: Callable[[Driver], Awaitable[T]], check: bool, uploader: bool
    ) -> T:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def upload() -> None:
            try:
                with scope:
                    await fs.cache.run()
            finally:
                stopped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.journal.run)
            if uploader:
                nursery.start_soon(upload)
            else:
                stopped.set()
            result = await body(Driver(fs, self.ctx))
            if check:
                scope.cancel()  # the only writer to the tree besides the handlers
                await stopped.wait()
                await fs.journal.commit()
                await fs.cache.retired()  # the blocks it committed lose their cache files
                check_consistency(fs)
            nursery.cancel_scope.cancel()
        return result

    def crash(self) -> None:
        """Close the vault without storing the dirty blocks: what is committed to the
        index and written to cache files is what a killed daemon leaves."""
        if self.vault is not None:
            self.vault.close()
            self.vault = None


def cheap_keyfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seal test keyfiles with a small scrypt cost (the default takes ~0.35 s a vault)."""
    monkeypatch.setattr(keys, "SCRYPT_N", 2**10)


def mode_of(attr: pyfuse3.EntryAttributes) -> tuple[int, int]:
    """(file type, permission bits) of an attribute reply."""
    return stat.S_IFMT(attr.st_mode), stat.S_IMODE(attr.st_mode)
