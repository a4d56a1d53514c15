"""The FUSE file system (pyfuse3 + trio) over the engine: the live tree plus snapshot views.

Concurrency model: every handler runs as a trio task on one thread (the FUSE loop). Handlers
touch the in-memory live tree (livetree.py) directly and hand everything else to worker
threads with ``trio.to_thread.run_sync``: cache-file I/O, chunk reads (decrypt, decode),
SQLite batches (the journal) and storing blocks (the cache's uploader). Writes to one inode
are serialised by a per-inode ``trio.Lock``. Mutating handlers pass a *gate* that a snapshot
closes while it stores the dirty blocks and records the tree, so a snapshot is a point in
time.

Set-id bits and file capabilities: the mount negotiates FUSE_HANDLE_KILLPRIV_V2 (through the
pyfuse3 that scripts/bootstrap patches), so the kernel no longer asks for
``security.capability`` before every ``write(2)``; in exchange this file system clears
set-user-ID / set-group-ID bits and ``security.capability`` on write, truncate and chown
(:meth:`VaultFS._kill_privs`, rules in docs/mount.md, "Semantics").

Durability (docs/design.md, "Mount"): ``fsync`` returns once the file's dirty blocks are
fsync'd in the cache directory and the live tree is committed to the index (SQLite
synchronous=FULL): the data survives a crash of the daemon or the machine and the next
mount stores and queues it. ``vaultfs flush``/``umount`` store everything, seal, ship the
index and wait until the shards are placed on the remotes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import stat
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyfuse3
import trio

from .cache import BlockCache, fsync_files, unlink_files
from .chunkreader import ChunkReader, slices
from .errors import DiskFull, VaultError
from .holes import HOLE_MAX, ZeroChunks
from .index import manifests, segments
from .index import snapshots as snapshot_table
from .kb.view import VIEW_DIR, BeliefView
from .livetree import ROOT_INODE, Journal, LiveTree, Node
from .names import SPECIAL_TYPES, display, from_db
from .readcache import DEFAULT_READ_CACHE_SIZE, ReadCache
from .shardreader import ShardsUnavailable
from .snapview import (
    SNAPDIR_INO,
    SNAPDIR_NAME,
    SNAPROOT_BASE,
    SnapViews,
    SNode,
    is_snap_ino,
)
from .vault import Entry, Vault

log = logging.getLogger("vaultfs.fs")
_T = TypeVar("_T")

TIMEOUT = 60.0
#: A lookup that counts a file's allocation counts its directory's other files too, in the
#: same worker-thread call, up to this many entries and bytes of files (about one block
#: list row read per MiB): VaultFS._with_siblings.
SIBLINGS_MAX = 4096
SIBLINGS_BYTES = 4 << 30
XATTR_MAX = 64 * 1024
CAPS_XATTR = b"security.capability"
ACL_ACCESS_XATTR = b"system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")  # the xattr form of a POSIX ACL: version 2, then entries
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permissions (rwx), uid or gid
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x10, 0x20
#: True for the pyfuse3 that scripts/bootstrap builds (it relays the kernel's kill signals).
KILLPRIV_V2 = hasattr(pyfuse3.SetattrFields, "kill_suidgid")


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


#: Longest name in bytes (what statfs reports): FUSE itself passes names of up to 1,024 bytes,
#: but such a file could not be restored onto ext4 or any common file system.
NAME_MAX = 255


def acl_mode(value: bytes) -> tuple[int, bool]:
    """The permission bits an access ACL (``system.posix_acl_access``, its xattr form) sets,
    as Linux derives them (owner from the owner entry, group from the mask if there is one,
    else from the group entry, others from the other entry), and whether the ACL holds
    nothing more than those bits (then Linux keeps no ACL, only the mode). Raises
    FUSEError(EINVAL) for a value that is not a well-formed ACL."""
    if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        raise _err(errno.EINVAL)
    if _ACL_HEADER.unpack_from(value)[0] != 2:
        raise _err(errno.EINVAL)
    perms: dict[int, int] = {}
    extended = False
    for tag, perm, _id in _ACL_ENTRY.iter_unpack(value[_ACL_HEADER.size :]):
        if tag in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER):
            perms[tag] = perm & 0o7
        extended = extended or tag not in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER)
    if not all(t in perms for t in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER)):
        raise _err(errno.EINVAL)
    group = perms.get(_ACL_MASK, perms[_ACL_GROUP_OBJ])
    return perms[_ACL_USER_OBJ] << 6 | group << 3 | perms[_ACL_OTHER], not extended


def _mem_range(mem: bytearray, off: int, ln: int) -> bytes:
    """Bytes [off, off + ln) of a block held in memory, zeros past its end (as a short cache
    file reads)."""
    data = bytes(mem[off : off + ln])
    return data + bytes(ln - len(data))


def _check_name(name: bytes) -> None:
    """ENAMETOOLONG for a name longer than :data:`NAME_MAX`, as a local file system answers
    every call that takes one (lookup, create, link, rename, unlink, rmdir, …)."""
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG)


#: Read-ahead: after READ_AHEAD_AFTER sequential reads on a handle, the chunks of the next
#: bytes are fetched in the background, the window doubling per sequential read up to
#: READ_AHEAD_MAX.
READ_AHEAD_AFTER = 2
READ_AHEAD_MIN = 512 * 1024
READ_AHEAD_MAX = 16 * 1024 * 1024


#: Kernel read-ahead for the mount, KiB. FUSE starts at 128 KiB (reads of 128 KiB, at most
#: two in flight); with 4 MiB the kernel sends 1 MiB reads and several at once, which the
#: chunk reader serves in parallel. Only root may set it (sysfs); others keep 128 KiB.
READ_AHEAD_KB = 4096


def raise_readahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Set the mount's kernel read-ahead (its backing device's ``read_ahead_kb``), when
    allowed. The device comes from /proc/self/mountinfo: a stat of the mountpoint would ask
    this very file system, which does not serve requests yet."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return

    def unescape(field: str) -> str:  # mountinfo writes space, tab, newline, \ as \ooo
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    fields = (line.split() for line in lines)
    devs = [f[2] for f in fields if len(f) > 4 and unescape(f[4]) == str(mountpoint)]
    if not devs:
        return
    try:
        Path(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb").write_text(str(kb))
    except OSError as e:
        log.info("kernel read-ahead stays at its default (%s)", e)


@dataclass(eq=False)
class Handle:
    """An open file. ``next_off`` is where a sequential read would continue, ``streak`` how
    many reads in a row were sequential, ``ahead`` how far read-ahead has been started."""

    ino: int
    snap: bool = False
    cmap: object = None
    data: bytes | None = None  # a generated file's content (the kb view)
    next_off: int = -1
    streak: int = 0
    ahead: int = 0


class VaultFS(pyfuse3.Operations):
    """FUSE operations. ``load()`` (sync, before mounting) reads the live tree and recovers
    the cache; ``run()`` serves until the kernel unmounts, then stores what is dirty."""

    enable_writeback_cache = True
    #: Ask the kernel for FUSE_HANDLE_KILLPRIV_V2 (read by the patched pyfuse3 only).
    enable_killpriv_v2 = True

    def __init__(
        self,
        vault: Vault,
        home: Path,
        mountpoint: Path,
        cache_size: int,
        read_cache_size: int = DEFAULT_READ_CACHE_SIZE,
    ) -> None:
        super().__init__()
        self.vault = vault
        self.home = home
        self.mountpoint = mountpoint
        self.cache_size = cache_size
        self.read_cache_size = read_cache_size
        self.uid = os.getuid()
        self.gid = os.getgid()
        #: which chunks are holes: st_blocks counts the rest (vaultfs/holes.py)
        self.zeros = ZeroChunks(vault.chunker.chunk_id)
        self.tree = LiveTree(vault.index, self.zeros)
        self.snaps = SnapViews(vault.index, self.uid, self.gid, self.zeros)
        self.fhs: dict[int, Handle] = {}
        # open directories: (name, inode) of live entries, (name, node) of snapshot ones
        self.dirs: dict[int, list[tuple[bytes, int | SNode]]] = {}
        self._next_fh = 1
        self._locks: dict[int, trio.Lock] = {}
        self._frozen = False
        self._thaw = trio.Event()
        self._active = 0
        self._idle = trio.Event()
        self._push_lock = trio.Lock()
        #: held by whatever adds chunk references outside the cache's rounds (a snapshot's
        #: commit) and by :meth:`hold_references`
        self._refs = trio.Lock()
        self._push_wake = trio.Event()
        self.last_push: dict = {}
        self.getxattr_requests = 0  # shown by `vaultfs status` (tests count them)
        # `vaultfs status`; "inline": requests served in the FUSE loop, without a thread hop
        self.read_stats = {"requests": 0, "inline": 0, "bytes": 0, "seconds": 0.0}

    # -- lifecycle ------------------------------------------------------------------------
    def load(self) -> dict:
        """Read the live tree and register dirty cache files left by a crash."""
        self.tree.load(self.uid, self.gid)
        self.bs = self.tree.block_size
        # what a sparse file's holes are made of: a snapshot's gap chunk of a whole block
        # (_file_cids) and the chunks the chunker cuts a block, or a long run, of zeros into
        cuts = self.vault.chunker.spans
        self.zeros.seed([self.bs, *(ln for size in {self.bs, HOLE_MAX} for _o, ln in cuts(bytes(size)))])  # fmt: skip
        self.journal = Journal(self.tree)
        self.readcache = ReadCache(
            self.home / "readcache", self.read_cache_size, self.vault.chunker.chunk_id
        )
        self.readcache.load()
        self.reader = ChunkReader(self.vault, self.readcache)
        self.kbview = BeliefView(self._snap_file)
        self.cache = BlockCache(
            self.vault,
            self.tree,
            self.home / "cache",
            self.cache_size,
            self.journal,
            self.reader,
        )
        recovered = self.cache.recover()
        self.tree.apply_batch(self.tree.take_batch())
        if not KILLPRIV_V2:
            log.warning(
                "this pyfuse3 cannot negotiate FUSE_HANDLE_KILLPRIV_V2 (scripts/bootstrap "
                "builds one that can): every write(2) will cost a GETXATTR round trip"
            )
        return {"inodes": len(self.tree.nodes), "recovered_bytes": recovered}

    async def run(self, ready, control_start) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.journal.run)
            nursery.start_soon(self.cache.run)
            nursery.start_soon(self._pusher)
            nursery.start_soon(self._signals)
            self.token = trio.lowlevel.current_trio_token()
            control_start(self)
            ready()
            await pyfuse3.main()
            log.info("unmounted by the kernel; storing what is dirty")
            try:
                await self.cache.drain()
            except VaultError as e:  # a full disk: the cache directory keeps what it holds
                log.error("unmounted with blocks not stored: %s", e.message)
            await self._final_push()
            nursery.cancel_scope.cancel()
        self.reader.close()

    def init(self) -> None:
        """FUSE_INIT is being answered: once the kernel has applied the reply (which sets the
        read-ahead to the default), raise it."""
        self._nursery.start_soon(trio.to_thread.run_sync, raise_readahead, self.mountpoint)

    async def _final_push(self) -> None:
        """After an unmount not done by `vaultfs umount`: ship the live tree if it changed
        and try one upload pass when the remotes were reachable lately."""
        if self.tree.changed_since_ship:
            await trio.to_thread.run_sync(self.vault.ship_index)
            self.tree.changed_since_ship = False
        if not self.last_push.get("errors") and await trio.to_thread.run_sync(self._queued_count):
            async with self._push_lock:
                await trio.to_thread.run_sync(lambda: self.vault.flush(seal=False))

    async def _signals(self) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _sig in sigs:
                log.info("signal received: unmounting")
                await trio.to_thread.run_sync(self._self_unmount)

    def _self_unmount(self) -> None:
        import subprocess

        mp = str(self.mountpoint)
        if subprocess.run(["fusermount3", "-u", mp], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)

    async def _pusher(self) -> None:
        """Background: push sealed shards to the remotes every few seconds, backing off
        while remotes fail (the queue is persistent, nothing is lost meanwhile)."""
        delay = 3.0
        while True:
            with trio.move_on_after(delay):
                await self._push_wake.wait()
            self._push_wake = trio.Event()
            try:
                queued = await trio.to_thread.run_sync(self._queued_count)
                if not queued:
                    delay = 3.0
                    continue
                async with self._push_lock:
                    rep = await trio.to_thread.run_sync(lambda: self.vault.flush(seal=False))
            except Exception as e:  # never let the uploader take the mount down
                log.exception("background upload failed")
                self.last_push = {"time": time.time(), "errors": {"*": str(e)}, "pending": {}}
                delay = min(delay * 2, 60.0)
                continue
            self.last_push = {"time": time.time(), "errors": rep.errors, "pending": rep.pending}
            delay = min(delay * 2, 60.0) if rep.errors else 3.0

    def _queued_count(self) -> int:
        index = self.vault.index
        return segments.queued_count(index) + manifests.pending_uploads(index)

    # -- the gate that snapshots close ------------------------------------------------------
    @asynccontextmanager
    async def _mut(self) -> AsyncIterator[None]:
        while self._frozen:
            await self._thaw.wait()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def freeze(self) -> None:
        while self._frozen:
            await self._thaw.wait()
        self._frozen = True
        self._thaw = trio.Event()
        while self._active:
            self._idle = trio.Event()
            await self._idle.wait()

    def thaw(self) -> None:
        self._frozen = False
        self._thaw.set()

    def _lock(self, ino: int) -> trio.Lock:
        lk = self._locks.get(ino)
        if lk is None:
            lk = self._locks[ino] = trio.Lock()
        return lk

    # -- attributes -----------------------------------------------------------------------
    def _attr(self, n: Node | SNode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = n.mode
        a.st_nlink = n.nlink
        a.st_uid = n.uid
        a.st_gid = n.gid
        a.st_size = n.size
        a.st_blksize = 128 * 1024
        a.st_blocks = (min(self._allocated(n), n.size) + 511) // 512
        if isinstance(n, Node):
            a.st_rdev = n.rdev
            a.st_atime_ns = n.atime_ns
            a.st_mtime_ns = n.mtime_ns
            a.st_ctime_ns = n.ctime_ns
        else:
            a.st_rdev = n.rdev
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
        return a

    def _allocated(self, n: Node | SNode) -> int:
        """Bytes of a file a restore would allocate: its chunks that are not holes, a dirty
        block as much as its cache file holds, nothing for a block never written. Only what
        is in memory (the FUSE loop): ``n.size`` while not counted yet (:meth:`_count`)."""
        if n.alloc is None:
            return n.size
        if isinstance(n, SNode):
            return n.alloc
        alloc = n.alloc
        for d in self.cache.blocks_of(n.ino):
            if d.alloc is not None:  # else its file is being made: the stored bytes count
                stored = n.blocks.get(d.blk) if n.blocks is not None else None
                alloc += d.alloc - self.tree.block_alloc(stored)
        return max(alloc, 0)

    async def _count(self, nodes: list[Node]) -> None:
        """Count ``alloc`` of the live files among ``nodes`` not counted yet, from the index
        in one worker thread call (the block lists are not kept). A file with dirty blocks
        (cache files a crash left) loads its block lists instead."""
        todo = [n for n in nodes if n.alloc is None and n.is_reg]
        if not todo:
            return
        for n in todo:
            if self.cache.blocks_of(n.ino):
                await self._ensure_blocks(n)
        todo = [n for n in todo if n.alloc is None]
        try:
            counted = await trio.to_thread.run_sync(self.tree.count_alloc, [n.ino for n in todo])
        except sqlite3.Error:  # st_blocks is advice: the size stands in, counted next time
            log.exception("counting the allocation of %d file(s) failed", len(todo))
            return
        for n in todo:
            self.tree.set_alloc(n, counted.get(n.ino, 0))

    def _with_siblings(self, p: Node, n: Node) -> list[Node]:
        """``n`` and the other files of ``p`` not counted yet, when ``p`` is small enough
        (``SIBLINGS_MAX`` entries, their sizes up to ``SIBLINGS_BYTES``): whoever looks up
        one file of a directory (rsync, find, ls of each name) likely looks up the rest, and
        one worker-thread call then counts them all."""
        assert p.children is not None
        out, size = [n], n.size
        if len(p.children) > SIBLINGS_MAX:
            return out
        for i in p.children.values():
            c = self.tree.nodes.get(i)
            if c is not None and c is not n and c.alloc is None and c.is_reg:
                size += c.size
                if size > SIBLINGS_BYTES:
                    break
                out.append(c)
        return out

    def _snapdir_node(self) -> SNode:
        n = self.snaps.get(SNAPDIR_INO)
        if n is None:
            n = SNode(SNAPDIR_INO, stat.S_IFDIR | 0o555, time.time_ns(), uid=self.uid)
            n.gid, n.nlink = self.gid, 2
            self.snaps.pinned[SNAPDIR_INO] = n
        return n

    def _node(self, ino: int) -> Node:
        n = self.tree.get(ino)
        if n is None:
            raise _err(errno.ENOENT)
        return n

    def _any(self, ino: int) -> Node | SNode:
        if ino == SNAPDIR_INO:
            return self._snapdir_node()
        if is_snap_ino(ino):
            n = self.snaps.get(ino)
            if n is None:
                raise _err(errno.ENOENT)
            return n
        return self._node(ino)

    def _dir(self, ino: int) -> Node:
        if is_snap_ino(ino):
            raise _err(errno.EROFS)
        n = self._node(ino)
        if not n.is_dir:
            raise _err(errno.ENOTDIR)
        return n

    def _snap_file(self, snap: int, path: str) -> bytes | None:
        """The regular file ``path`` of snapshot ``snap`` read whole, or None if it holds no
        such file (worker thread: the kb view's reader)."""
        d, _, name = path.encode().rpartition(b"/")
        row = self.snaps.query_child(SNode(0, stat.S_IFDIR, 0, snap=snap, path=d), name)
        if row is None or row[2] != "f":
            return None
        f = SNode(0, stat.S_IFREG, 0, size=row[5], entry=row[0], snap=snap)
        starts, chunks = self.snaps.query_chunks(f)
        return self.reader.read_slices(slices(starts, chunks, 0, f.size))

    async def _in_view(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` of the kb view in a worker thread (it reads and parses files); a
        snapshot whose kb files cannot be read or parsed is an I/O error, logged."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except VaultError as e:
            log.error("kb view: %s", e.message)
            raise _err(errno.EIO) from None

    async def _snap_roots(self) -> list[tuple[bytes, SNode]]:
        """(directory name, root node) of every snapshot, for ``.snapshots``."""

        def query():
            infos = self.snaps.query_snapshots()
            return [(i, None if self.snaps.known_root(SNAPROOT_BASE + i.seq) else self.snaps.query_root(i)) for i in infos]  # fmt: skip

        return [
            (info.dirname, self.snaps.root_node(info, loaded))
            for info, loaded in await trio.to_thread.run_sync(query)
        ]

    async def _ensure_blocks(self, n: Node) -> None:
        if n.blocks is None and n.is_reg:
            blocks = await trio.to_thread.run_sync(self.tree.load_blocks, n.ino)
            self.tree.attach_blocks(n, blocks)

    def _maybe_purge(self, n: Node) -> None:
        if n.nlink <= 0 and n.lookups <= 0 and n.opens <= 0 and n.ino != ROOT_INODE:
            # cache files go once the purge is committed: a crash before that brings the
            # file back whole (its unlink was not durable), never with holes
            doomed = [self.cache.discard(d.ino, d.blk, unlink=False) for d in self.cache.blocks_of(n.ino)]  # fmt: skip
            self._locks.pop(n.ino, None)
            self.tree.purge(n)
            if doomed:
                self.tree.after_commit(lambda: unlink_files(doomed))

    # -- lookups ----------------------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx):
        _check_name(name)
        if parent_inode == ROOT_INODE and name == SNAPDIR_NAME:
            return self._attr(self._snapdir_node())
        if parent_inode == SNAPDIR_INO:
            for dirname, root in await self._snap_roots():
                if dirname == name:
                    self.snaps.ref(root, lookups=1)
                    return self._attr(root)
            raise _err(errno.ENOENT)
        if is_snap_ino(parent_inode):
            p = self._any(parent_inode)
            assert isinstance(p, SNode)
            if not p.is_dir:
                raise _err(errno.ENOTDIR)
            row = await trio.to_thread.run_sync(self.snaps.query_child, p, bytes(name))
            n = self.snaps.child_node(p, bytes(name), row)
            if n is None and p.path == VIEW_DIR:
                size = await self._in_view(self.kbview.size, p.snap, bytes(name))
                n = None if size is None else self.snaps.view_node(p, bytes(name), size)
            if n is None:
                raise _err(errno.ENOENT)
            self.snaps.ref(n, lookups=1)
            return self._attr(n)
        p = self._node(parent_inode)
        if p.children is None:
            raise _err(errno.ENOTDIR)
        ino = p.children.get(name)
        if ino is None:
            # a negative entry the kernel may cache: names in the live tree appear only
            # through the kernel (create, mkdir, link, rename), which replaces it
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = TIMEOUT
            return neg
        n = self.tree.nodes[ino]
        if n.alloc is None and n.is_reg:
            await self._count(self._with_siblings(p, n))
            if p.children.get(name) != ino:  # changed meanwhile: look it up again
                return await self.lookup(parent_inode, name, ctx)
        n.lookups += 1
        return self._attr(n)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            if is_snap_ino(ino):
                self.snaps.unref(ino, lookups=count)
                continue
            n = self.tree.get(ino)
            if n is not None:
                n.lookups -= count
                self._maybe_purge(n)

    async def getattr(self, inode, ctx):
        n = self._any(inode)
        if isinstance(n, Node) and n.alloc is None and n.is_reg:
            await self._count([n])
        return self._attr(n)

    async def readlink(self, inode, ctx):
        n = self._any(inode)
        if n.target is None:
            raise _err(errno.EINVAL)
        return n.target

    # -- attributes -----------------------------------------------------------------------
    async def setattr(self, inode, attr, fields, fh, ctx):
        if is_snap_ino(inode):
            raise _err(errno.EROFS)
        async with self._mut():
            n = self._node(inode)
            now = time.time_ns()
            if fields.update_size:
                if not n.is_reg:
                    raise _err(errno.EINVAL)
                await self._truncate(n, attr.st_size)
                n.mtime_ns = now
            if fields.update_mode:
                n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                n.uid = attr.st_uid
            if fields.update_gid:
                n.gid = attr.st_gid
            kill = getattr(fields, "kill_suidgid", False)
            if kill or fields.update_size or fields.update_uid or fields.update_gid:
                # the kernel asks (kill) on chown, and on truncate by a caller without
                # CAP_FSETID; a file capability goes in every case, as on Linux
                self._kill_privs(n, kill)
            if fields.update_atime:
                n.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                n.mtime_ns = attr.st_mtime_ns
            n.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
            self.tree.touch(n)
            await self._count([n])
            return self._attr(n)

    def _kill_privs(self, n: Node, setid: bool) -> None:
        """The kernel's duty under FUSE_HANDLE_KILLPRIV_V2, for a write, truncate or chown of
        ``n``: drop ``security.capability``, and if ``setid``, S_ISUID and S_ISGID, the latter
        only with group-exec, the rule the KILLPRIV_V2 protocol states (without group-exec
        S_ISGID grants nothing on exec; Linux's own file systems also drop it for a writer
        outside the file's group, which FUSE does not tell us). Directories keep everything
        (chown keeps a directory's S_ISGID). In memory only, so cheap enough for the loop."""
        if n.is_dir:
            return
        changed = False
        if setid and n.mode & (stat.S_ISUID | stat.S_ISGID):
            mode = n.mode & ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
            changed = mode != n.mode
            n.mode = mode
        if CAPS_XATTR in n.xattrs:
            del n.xattrs[CAPS_XATTR]
            self.tree.touch_xattrs(n)
            changed = True
        if changed:
            n.ctime_ns = time.time_ns()
            self.tree.touch(n)

    async def _truncate(self, n: Node, size: int) -> None:
        async with self._lock(n.ino):
            await self._ensure_blocks(n)
            assert n.blocks is not None
            bs = self.bs
            if size < n.size:
                keep = (size + bs - 1) // bs  # blocks that still hold bytes
                blks = [d.blk for d in self.cache.blocks_of(n.ino) if d.blk >= keep]
                doomed = [self.cache.discard(n.ino, b, unlink=False) for b in blks]
                self.tree.drop_blocks_from(n, keep)
                n.size = size
                self.tree.touch(n)
                if doomed:
                    # the index still gives the old size, which these cache files back:
                    # delete them only once the new size is committed (a crash before
                    # that leaves the old file whole, after it the truncated one)
                    try:
                        await self.journal.commit()
                    except VaultError as e:  # a full disk: delete them once it commits
                        log.error("truncate: %s", e.message)
                        self._nursery.start_soon(self._unlink_when_committed, n.ino, blks)
                    else:
                        await trio.to_thread.run_sync(unlink_files, doomed)
                cut = size % bs
                if cut:
                    blk = size // bs
                    await self._cut_block(n, blk, cut)
            n.size = size
            self.tree.touch(n)

    async def _unlink_when_committed(self, ino: int, blks: list[int]) -> None:
        """Delete the cache files of blocks a truncate dropped once the live tree commits
        (the commit failed at the truncate: a full disk), except those written again since
        (a write recreates its cache file from scratch, so an old one is harmless until
        then). In the loop, without a thread hop: so no write can slip in between."""
        await self.journal.commit(wait_through_errors=True)
        unlink_files([self.cache.path(ino, b) for b in blks if self.cache.get(ino, b) is None])

    async def _cut_block(self, n: Node, blk: int, cut: int) -> None:
        """Make block ``blk`` end at ``cut`` bytes (its tail lies past the new size)."""
        assert n.blocks is not None
        for evt in self.cache.retiring(n.ino, blk, blk):
            await evt.wait()
        d = self.cache.get(n.ino, blk)
        chunks = n.blocks.get(blk)
        if d is None:
            if not chunks or sum(c for _i, c in chunks) <= cut:
                return
            await self.cache.reserve()
            d = self.cache.add(n.ino, blk)
            base = ("load", chunks, cut)
        else:
            base = None
        d.writers += 1
        d.version += 1
        try:
            await trio.to_thread.run_sync(self._cut_exec, d, base, cut)
        except (OSError, VaultError) as e:
            if base is not None and d.mem is None and self.cache.get(n.ino, blk) is d:
                self.cache.discard(n.ino, blk)  # clean again: the stored content stays
            log.error("cutting a block failed: %s", getattr(e, "message", e))
            raise _err(getattr(e, "errno", None) or errno.EIO) from None
        finally:
            d.writers -= 1
            d.version += 1
            d.filling = False
        self.tree.set_block(n, blk, None)

    def _cut_exec(self, d, base, cut: int) -> None:
        data = None
        if base is not None:
            data = self.cache.load_stored(base[1], base[2])
        self.cache.cut_block(d, data, cut)

    # -- creating and removing -------------------------------------------------------------
    def _check_new(self, p: Node, name: bytes) -> None:
        if p.ino == ROOT_INODE and name == SNAPDIR_NAME:
            raise _err(errno.EEXIST)
        _check_name(name)
        if name in (p.children or {}):
            raise _err(errno.EEXIST)

    def _add(self, p: Node, name: bytes, mode: int, ctx, **kw) -> Node:
        self._check_new(p, name)
        gid = ctx.gid
        if p.mode & stat.S_ISGID:
            gid = p.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        n = self.tree.new_node(mode, ctx.uid, gid, **kw)
        self.tree.set_entry(p, name, n.ino)
        if n.is_dir:
            p.nlink += 1
        p.mtime_ns = p.ctime_ns = n.ctime_ns
        self.tree.touch(p)
        n.lookups += 1
        return n

    async def create(self, parent_inode, name, mode, flags, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            n = self._add(p, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
            n.opens += 1
            fh = self._new_fh(Handle(n.ino))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(n)

    async def mkdir(self, parent_inode, name, mode, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            return self._attr(self._add(p, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            return self._attr(self._add(p, name, mode, ctx, rdev=rdev))

    async def symlink(self, parent_inode, name, target, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            n = self._add(p, name, stat.S_IFLNK | 0o777, ctx, target=bytes(target))
            n.size = len(target)
            return self._attr(n)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        if is_snap_ino(inode):
            raise _err(errno.EROFS)
        async with self._mut():
            p = self._dir(new_parent_inode)
            n = self._node(inode)
            if n.is_dir:
                raise _err(errno.EPERM)
            self._check_new(p, new_name)
            self.tree.set_entry(p, new_name, n.ino)
            n.nlink += 1
            n.lookups += 1
            n.ctime_ns = p.mtime_ns = p.ctime_ns = time.time_ns()
            self.tree.touch(n)
            self.tree.touch(p)
            await self._count([n])
            return self._attr(n)

    def _child(self, p: Node, name: bytes) -> Node:
        _check_name(name)
        if p.ino == ROOT_INODE and name == SNAPDIR_NAME:
            raise _err(errno.EROFS)
        ino = (p.children or {}).get(name)
        if ino is None:
            raise _err(errno.ENOENT)
        return self.tree.nodes[ino]

    async def unlink(self, parent_inode, name, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            n = self._child(p, name)
            if n.is_dir:
                raise _err(errno.EISDIR)
            self._unlink_entry(p, name, n)

    def _unlink_entry(self, p: Node, name: bytes, n: Node) -> None:
        self.tree.set_entry(p, name, None)
        now = time.time_ns()
        if n.is_dir:
            n.nlink = 0
            p.nlink -= 1
        else:
            n.nlink -= 1
        n.ctime_ns = p.mtime_ns = p.ctime_ns = now
        self.tree.touch(n)
        self.tree.touch(p)
        self._maybe_purge(n)

    async def rmdir(self, parent_inode, name, ctx):
        async with self._mut():
            p = self._dir(parent_inode)
            n = self._child(p, name)
            if not n.is_dir:
                raise _err(errno.ENOTDIR)
            if n.children:
                raise _err(errno.ENOTEMPTY)
            self._unlink_entry(p, name, n)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        async with self._mut():
            po = self._dir(parent_inode_old)
            pn = self._dir(parent_inode_new)
            src = self._child(po, name_old)
            _check_name(name_new)
            if pn.ino == ROOT_INODE and name_new == SNAPDIR_NAME:
                raise _err(errno.EROFS)
            dst_ino = (pn.children or {}).get(name_new)
            dst = self.tree.nodes[dst_ino] if dst_ino is not None else None
            now = time.time_ns()
            if flags & pyfuse3.RENAME_EXCHANGE:
                if dst is None:
                    raise _err(errno.ENOENT)
                self.tree.set_entry(po, name_old, dst.ino)
                self.tree.set_entry(pn, name_new, src.ino)
                if po is not pn and src.is_dir != dst.is_dir:
                    delta = 1 if src.is_dir else -1
                    po.nlink -= delta
                    pn.nlink += delta
            else:
                if dst is not None:
                    if flags & pyfuse3.RENAME_NOREPLACE:
                        raise _err(errno.EEXIST)
                    if dst is src:
                        return
                    if src.is_dir and not dst.is_dir:
                        raise _err(errno.ENOTDIR)
                    if dst.is_dir and not src.is_dir:
                        raise _err(errno.EISDIR)
                    if dst.is_dir and dst.children:
                        raise _err(errno.ENOTEMPTY)
                    self._unlink_entry(pn, name_new, dst)
                self.tree.set_entry(po, name_old, None)
                self.tree.set_entry(pn, name_new, src.ino)
                if src.is_dir and po is not pn:
                    po.nlink -= 1
                    pn.nlink += 1
            src.ctime_ns = po.mtime_ns = po.ctime_ns = pn.mtime_ns = pn.ctime_ns = now
            for x in (src, po, pn):
                self.tree.touch(x)

    # -- files ------------------------------------------------------------------------------
    def _new_fh(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.fhs[fh] = h
        return fh

    async def open(self, inode, flags, ctx):
        if is_snap_ino(inode):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise _err(errno.EROFS)
            n = self._any(inode)
            assert isinstance(n, SNode)
            if n.view:
                assert n.path is not None
                data = await self._in_view(self.kbview.document, n.snap, n.path.rpartition(b"/")[2])
                if data is None:
                    raise _err(errno.ENOENT)
                self.snaps.ref(n, opens=1)
                return pyfuse3.FileInfo(fh=self._new_fh(Handle(inode, True, data=data)), keep_cache=True)  # fmt: skip
            if n.entry is None:
                raise _err(errno.EISDIR if n.is_dir else errno.EINVAL)
            cmap = self.snaps.cached_chunks(n)
            if cmap is None:
                cmap = await trio.to_thread.run_sync(self.snaps.query_chunks, n)
                self.snaps.keep_chunks(n, cmap)
            self.snaps.ref(n, opens=1)
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(inode, True, cmap)), keep_cache=True)
        n = self._node(inode)
        if not n.is_reg:
            raise _err(errno.EISDIR if n.is_dir else errno.EINVAL)
        await self._ensure_blocks(n)
        if flags & os.O_TRUNC:
            # libfuse negotiates FUSE_ATOMIC_O_TRUNC: the kernel truncates only its own
            # view and leaves the file to us (before this, `echo x > f` kept f's old tail)
            await self._open_truncate(n)
        n.opens += 1
        return pyfuse3.FileInfo(fh=self._new_fh(Handle(inode)), keep_cache=True)

    async def _open_truncate(self, n: Node) -> None:
        async with self._mut():
            if n.size:
                await self._truncate(n, 0)
            n.mtime_ns = n.ctime_ns = time.time_ns()
            self.tree.touch(n)
            # libfuse 3.17 does not relay FUSE_OPEN_KILL_SUIDGID (set for callers without
            # CAP_FSETID): clear the set-id bits for every caller, the safe side
            self._kill_privs(n, KILLPRIV_V2)

    async def read(self, fh, off, size):
        t = time.perf_counter()
        try:
            data = await self._read(fh, off, size)
        except VaultError as e:  # one reader's EIO, never the mount going down
            log.error("read of file handle %d failed: %s", fh, self._read_failed(fh, e))
            raise _err(errno.EIO) from None
        finally:
            self.read_stats["seconds"] += time.perf_counter() - t
        self.read_stats["requests"] += 1
        self.read_stats["bytes"] += len(data)
        return data

    async def _read(self, fh: int, off: int, size: int) -> bytes:
        h = self.fhs[fh]
        if h.data is not None:
            return h.data[off : off + size]
        if h.snap:
            n = self._any(h.ino)
            size = min(size, n.size - off)
            if size <= 0:
                return b""
            self._read_ahead(h, n, off, size)
            starts, chunks = h.cmap
            parts = slices(starts, chunks, off, size)
            data = self.reader.read_inline(parts)
            if data is not None:
                self.read_stats["inline"] += 1
                return data
            return await trio.to_thread.run_sync(self.reader.read_slices, parts)
        n = self._node(h.ino)
        self._read_ahead(h, n, off, size)
        for _attempt in range(8):
            size2 = min(size, n.size - off)
            if size2 <= 0:
                return b""
            plan = self._read_plan(n, off, size2)
            data = self._read_inline(plan)
            if data is not None:
                self.read_stats["inline"] += 1
                return data
            try:
                return await trio.to_thread.run_sync(self._read_exec, plan)
            except FileNotFoundError:  # the block was stored meanwhile: plan again
                continue
            except VaultError as e:
                log.error("read of file handle %d failed: %s", fh, self._read_failed(fh, e))
                raise _err(errno.EIO) from None
        raise _err(errno.EIO)

    def _read_failed(self, fh: int, e: VaultError) -> str:
        """What the log says of a read of ``fh`` that failed with ``e``: too few shards in the
        user's terms (the file, the remotes holding and failing, the way forward:
        :meth:`ShardsUnavailable.as_seen`, as restore says it), anything else as it is."""
        if not isinstance(e, ShardsUnavailable):
            return e.message
        h = self.fhs.get(fh)
        n = self.snaps.get(h.ino) if h and h.snap else None
        if n is not None and n.entry is not None:
            place = snapshot_table.entry_place(self.vault.index, n.entry)
            path = display(from_db(place[0])) if place else "?"
            what = f"{path} of snapshot {place[1] if place else '?'}"
        else:
            live = self.tree.path_of(h.ino) if h else None
            what = f"{display(live) if live is not None else '?'} (the live tree)"
        return e.as_seen(f"read {what}", again="read it again").message

    def _read_ahead(self, h: Handle, n: Node | SNode, off: int, size: int) -> None:
        """Detect sequential reads on ``h`` and start fetching the chunks ahead of them."""
        h.streak = h.streak + 1 if off == h.next_off else 0
        h.next_off = off + size
        if h.streak < READ_AHEAD_AFTER:
            h.ahead = 0
            return
        window = min(READ_AHEAD_MAX, READ_AHEAD_MIN << (h.streak - READ_AHEAD_AFTER))
        lo, hi = max(h.ahead, off + size), min(off + size + window, n.size)
        if hi - lo < window // 4:
            return  # most of the window is already on its way
        h.ahead = hi
        if isinstance(n, SNode):
            starts, chunks = h.cmap
            cids = [c for c, _lo, _hi in slices(starts, chunks, lo, hi - lo)]
        else:
            cids = self._stored_cids(n, lo, hi)
        if cids:
            self.reader.prefetch(cids)

    def _stored_cids(self, n: Node, lo: int, hi: int) -> list[bytes]:
        """Chunk ids of the stored (not dirty) blocks of ``n`` that bytes [lo, hi) touch."""
        out: list[bytes] = []
        if n.blocks is None:
            return out
        for blk in range(lo // self.bs, (hi - 1) // self.bs + 1):
            chunks = n.blocks.get(blk)
            if chunks and self.cache.get(n.ino, blk) is None:
                base = blk * self.bs
                starts, pos = [], 0
                for _c, ln in chunks:
                    starts.append(pos)
                    pos += ln
                a, b = max(lo - base, 0), min(hi - base, self.bs)
                out += [c for c, _x, _y in slices(starts, chunks, a, b - a)]
        return out

    def _read_plan(self, n: Node, off: int, size: int) -> list[tuple]:
        bs = self.bs
        plan = []
        pos = off
        end = off + size
        assert n.blocks is not None
        while pos < end:
            blk, inb = divmod(pos, bs)
            ln = min(bs - inb, end - pos)
            d = self.cache.get(n.ino, blk)
            if d is not None and d.readable and d.mem is not None:
                plan.append(("mem", d.mem, inb, ln))
            elif d is not None and d.readable:
                plan.append(("cache", self.cache.path(n.ino, blk), inb, ln))
            elif blk in n.blocks:  # stored, or its cache file is being created or deleted
                plan.append(("stored", n.blocks[blk], inb, ln))
            else:
                plan.append(("zero", None, inb, ln))
            pos += ln
        return plan

    def _read_inline(self, plan: list[tuple]) -> bytes | None:
        """The plan's bytes if memory and the page cache hold them (no waiting, no more than
        a few pages of hashing: :meth:`ChunkReader.read_inline`), else None: then
        :meth:`_read_exec` in a worker thread. Saves a thread hop per warm request."""
        out: list[bytes] = []
        for kind, arg, inb, ln in plan:
            if kind == "stored":
                got = self.reader.read_range_inline(arg, inb, ln)
                if got is None:
                    return None
                out.append(got)
            elif kind == "zero":
                out.append(bytes(ln))
            elif kind == "mem":
                out.append(_mem_range(arg, inb, ln))
            else:  # a dirty block's cache file
                return None
        return b"".join(out)

    def _read_exec(self, plan: list[tuple]) -> bytes:
        out = bytearray()
        for kind, arg, inb, ln in plan:
            if kind == "cache":
                with open(arg, "rb") as f:
                    data = os.pread(f.fileno(), ln, inb)
                out += data
                if len(data) < ln:
                    out += bytes(ln - len(data))
            elif kind == "stored":
                out += self.reader.read_range(arg, inb, ln)
            elif kind == "mem":
                out += _mem_range(arg, inb, ln)
            else:
                out += bytes(ln)
        return bytes(out)

    async def write(self, fh, off, buf, writepage: bool = True):
        """``writepage`` comes from the patched pyfuse3: False for a write that bypassed the
        page cache. The kernel sends those (writethrough) for a set-id file written by a
        caller without CAP_FSETID, with FUSE_WRITE_KILL_SUIDGID, which libfuse 3.17 drops;
        so such a write clears the set-id bits (O_DIRECT writes too, whoever writes).
        Write-backs never carry the flag. Without the patched pyfuse3 the kernel does it."""
        h = self.fhs[fh]
        if h.snap:
            raise _err(errno.EROFS)
        async with self._mut():
            n = self._node(h.ino)
            if not writepage:
                self._kill_privs(n, True)
            async with self._lock(n.ino):
                await self._write(n, off, buf)
        return len(buf)

    async def _write(self, n: Node, off: int, buf: bytes) -> None:
        await self._ensure_blocks(n)
        assert n.blocks is not None
        bs = self.bs
        end = off + len(buf)
        first, last = off // bs, (end - 1) // bs
        while True:
            await self._reserve_fresh(n.ino, first, last)
            waits = self.cache.retiring(n.ino, first, last)
            if not waits:
                break  # nothing awaits from here until the blocks are added
            # blocks whose cache files are being deleted become clean: reserve for them too
            self.cache.unreserve(sum(1 for b in range(first, last + 1) if self.cache.get(n.ino, b) is None))  # fmt: skip
            for evt in waits:
                await evt.wait()
        jobs, ds, fresh = [], [], []
        view = memoryview(buf)  # slices without copying a 1 MiB write
        for b in range(first, last + 1):
            bstart = b * bs
            ws, we = max(off, bstart) - bstart, min(end, bstart + bs) - bstart
            d = self.cache.get(n.ino, b)
            base: object = None
            if d is None:
                d = self.cache.add(n.ino, b)
                existing = max(0, min(bs, n.size - bstart))
                chunks = n.blocks.get(b)
                if chunks and existing > 0 and not (ws == 0 and we >= existing):
                    base = ("load", chunks, existing)
                else:
                    base = b""
                fresh.append(d)
            d.writers += 1
            d.version += 1
            ds.append(d)
            jobs.append((d, base, ws, view[ws + bstart - off : we + bstart - off]))
        try:
            await trio.to_thread.run_sync(self._write_exec, jobs)
        except (OSError, VaultError) as e:
            # a block this write made dirty has no cache file now (BlockCache.write_block):
            # it is clean again, its stored content what reads and the next mount see
            for d in fresh:
                if d.mem is None and self.cache.get(n.ino, d.blk) is d:
                    self.cache.discard(n.ino, d.blk)
            if isinstance(e, OSError):
                log.error("cache write failed: %s", e)
                raise _err(e.errno or errno.EIO) from None
            log.error("reading a block to update it failed: %s", e.message)
            raise _err(errno.EIO) from None
        finally:
            touched = time.monotonic()
            for d in ds:
                d.writers -= 1
                d.version += 1
                d.touched = touched
                d.filling = False
        now = time.time_ns()
        if end > n.size:
            n.size = end
        n.mtime_ns = n.ctime_ns = now
        self.tree.touch(n)
        full = False
        for b, d in zip(range(first, last + 1), ds, strict=True):
            if (b + 1) * bs <= end:
                d.ready = full = True
        if full:
            self.cache.kick()

    async def _reserve_fresh(self, ino: int, first: int, last: int) -> None:
        """Reserve budget for the blocks first..last that are not dirty yet. Waiting for the
        budget lets the storer finish blocks, so a block dirty before the wait may be gone
        after it: count again until the reservation matches (then nothing awaits before the
        caller adds them)."""
        reserved = 0
        while True:
            fresh = sum(1 for b in range(first, last + 1) if self.cache.get(ino, b) is None)
            if fresh <= reserved:
                break
            await self.cache.reserve(fresh - reserved)
            reserved = fresh
        if reserved > fresh:
            self.cache.unreserve(reserved - fresh)

    def _write_exec(self, jobs: list[tuple]) -> None:
        for d, base, ws, piece in jobs:
            if isinstance(base, tuple):
                base = self.cache.load_stored(base[1], base[2])
            self.cache.write_block(d, base, ws, piece)

    async def flush(self, fh):
        """Not implemented, on purpose: the first ENOSYS makes the kernel stop sending FLUSH
        (``fc->no_flush``), one round trip less per ``close(2)``. Nothing is lost: with the
        writeback cache the kernel still writes the file's dirty pages to us before ``close``
        returns, and this file system has nothing to report at close (write errors are
        reported by the write, durability by ``fsync``) and no POSIX locks to drop."""
        raise _err(errno.ENOSYS)

    async def release(self, fh):
        h = self.fhs.pop(fh, None)
        if h is not None and h.snap:
            self.snaps.unref(h.ino, opens=1)
        if h is None or h.snap:
            return
        n = self.tree.get(h.ino)
        if n is None:
            return
        n.opens -= 1
        if n.opens <= 0:
            # the uploader's next tick (at most 0.5 s away) stores them, with every file
            # closed meanwhile: kicking it here made `cp -a` of small files run a store round
            # (4 hops to worker threads) per file beside the FUSE loop, and every request of
            # the loop took twice as long (docs/benchmarks.md, "cp -a, request by request")
            for d in self.cache.blocks_of(n.ino):
                d.ready = True
        self._maybe_purge(n)

    async def fsync(self, fh, datasync):
        h = self.fhs.get(fh)
        if h is None or h.snap:
            return
        # only blocks written since their last fsync, the directory only for new files; the
        # data and the tree's commit go to disk side by side (ext4 joins the two into one
        # journal commit): the promise needs both before returning, not an order between them
        todo = [(d, d.version) for d in self.cache.blocks_of(h.ino) if d.synced != d.version]
        held = [(d, v) for d, v in todo if d.mem is not None]
        if held:  # blocks the disk had no room for: to cache files first, or ENOSPC
            try:
                await trio.to_thread.run_sync(
                    self.cache.spill, [(d, bytes(d.mem or b"")) for d, _v in held]
                )
            except OSError as e:
                log.error("fsync: %s", self.cache.unstored(h.ino))
                raise _err(e.errno or errno.EIO) from None
            for d, v in held:
                d.linked = False  # renamed into place: the directory needs its fsync
                if d.version == v:  # not written meanwhile: the file holds it all now
                    d.mem = None
        paths = [self.cache.path(d.ino, d.blk) for d, _v in todo if d.mem is None]
        new = any(not d.linked for d, _v in todo)
        failed: list[VaultError] = []

        async def commit() -> None:
            try:
                await self.journal.commit()
            except VaultError as e:  # a full disk: the tree's changes are not durable
                failed.append(e)

        async with trio.open_nursery() as nursery:
            if paths:
                nursery.start_soon(
                    trio.to_thread.run_sync, fsync_files, paths, self.cache.dir if new else None
                )
            nursery.start_soon(commit)
        if failed:
            log.error("fsync: %s", failed[0].message)
            raise _err(errno.ENOSPC if isinstance(failed[0], DiskFull) else errno.EIO)
        for d, version in todo:
            d.synced, d.linked = version, True

    # -- directories ------------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        items: list[tuple[bytes, int | SNode]]
        if inode == SNAPDIR_INO:
            items = list(await self._snap_roots())
        elif is_snap_ino(inode):
            n = self._any(inode)
            assert isinstance(n, SNode)
            if not n.is_dir:
                raise _err(errno.ENOTDIR)
            rows = await trio.to_thread.run_sync(self.snaps.query_children, n)
            items = list(self.snaps.listing(n, rows))
            if n.path == VIEW_DIR:
                docs = await self._in_view(self.kbview.listing, n.snap, [x for x, _ in items])
                for name, size in docs:
                    if (node := self.snaps.view_node(n, name, size)) is not None:
                        items.append((name, node))
                items.sort(key=lambda item: item[0])
        else:
            n = self._node(inode)
            if n.children is None:
                raise _err(errno.ENOTDIR)
            items = list(sorted(n.children.items()))
            # readdirplus gives each entry's attributes: count the files' allocation first
            await self._count([c for _name, i in items if (c := self.tree.nodes.get(i))])
            if inode == ROOT_INODE:
                items.insert(0, (SNAPDIR_NAME, SNAPDIR_INO))
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = items
        return fh

    async def readdir(self, fh, start_id, token):
        items = self.dirs.get(fh, [])
        for i in range(start_id, len(items)):
            name, item = items[i]
            if isinstance(item, SNode):
                n: Node | SNode = item
            else:
                try:
                    n = self._any(item)
                except pyfuse3.FUSEError:
                    continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, self._attr(n), i + 1):
                break
            if isinstance(n, Node):
                n.lookups += 1
            else:
                self.snaps.ref(n, lookups=1)

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        try:
            await self.journal.commit()
        except VaultError as e:
            log.error("fsync of a directory: %s", e.message)
            raise _err(errno.ENOSPC if isinstance(e, DiskFull) else errno.EIO) from None

    # -- xattrs -----------------------------------------------------------------------------
    async def setxattr(self, inode, name, value, ctx):
        if is_snap_ino(inode):
            raise _err(errno.EROFS)
        if len(value) > XATTR_MAX:
            raise _err(errno.E2BIG)
        async with self._mut():
            n = self._node(inode)
            name, value = bytes(name), bytes(value)
            if name == ACL_ACCESS_XATTR:
                # an access ACL sets the mode's permission bits, as on Linux (`cp -a` creates
                # a file 0600 and relies on this to give it its mode); one that says no more
                # than the mode is not kept, as on Linux
                perms, plain = acl_mode(value)
                n.mode = n.mode & ~0o777 | perms
                self.tree.touch(n)
                # the kernel keeps its cached mode after an ACL it hands through (no
                # FUSE_POSIX_ACL): have it ask again. Attributes only: takes no inode lock, so
                # safe inside a request (unlike invalidating pages under the writeback cache)
                with contextlib.suppress(OSError):  # ENOENT: the kernel holds no such inode
                    pyfuse3.invalidate_inode(inode, attr_only=True)
                if plain:
                    if n.xattrs.pop(name, None) is not None:
                        self.tree.touch_xattrs(n)
                    n.ctime_ns = time.time_ns()
                    return
            n.xattrs[name] = value
            n.ctime_ns = time.time_ns()
            self.tree.touch_xattrs(n)

    async def getxattr(self, inode, name, ctx):
        self.getxattr_requests += 1
        n = self._any(inode)
        try:
            return n.xattrs[name]
        except KeyError:
            raise _err(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode, ctx):
        return list(self._any(inode).xattrs)

    async def removexattr(self, inode, name, ctx):
        if is_snap_ino(inode):
            raise _err(errno.EROFS)
        async with self._mut():
            n = self._node(inode)
            if name not in n.xattrs:
                raise _err(pyfuse3.ENOATTR)
            del n.xattrs[name]
            n.ctime_ns = time.time_ns()
            self.tree.touch_xattrs(n)

    # -- statfs -----------------------------------------------------------------------------
    async def statfs(self, ctx):
        st = await trio.to_thread.run_sync(os.statvfs, self.home)
        used = sum(n.size for n in self.tree.nodes.values() if n.is_reg)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        free = st.f_bavail * st.f_frsize
        s.f_blocks = (used + free) // 4096
        s.f_bfree = s.f_bavail = free // 4096
        s.f_files = len(self.tree.nodes) + st.f_favail
        s.f_ffree = s.f_favail = st.f_favail
        s.f_namemax = NAME_MAX
        return s

    # -- control operations (called through control.py) -------------------------------------
    async def drain(self) -> None:
        await self.cache.drain()

    async def push(self, seal: bool = True):
        async with self._push_lock:
            rep = await trio.to_thread.run_sync(lambda: self.vault.flush(seal=seal))
        self.last_push = {"time": time.time(), "errors": rep.errors, "pending": rep.pending}
        return rep

    async def snapshot(self, name: str | None, fork: bool = False) -> tuple[str, int, int]:
        """A point-in-time snapshot of the live tree: close the gate, store every dirty
        block, record the tree through ``Vault.commit`` (``fork``: see there), open the
        gate."""
        async with self._refs:  # waits for a prune before the gate closes, not after
            await self.freeze()
            try:
                await self.cache.drain()
                # the gate is closed: the tree cannot change while a thread walks it
                uid, seq, count = await trio.to_thread.run_sync(self._commit_tree, name, fork)
                self.tree.changed_since_ship = False
            finally:
                self.thaw()
        return uid, seq, count

    def _commit_tree(self, name: str | None, fork: bool = False) -> tuple[str, int, int]:
        walk = self.tree.walk()
        entries: list[Entry] = []
        files: dict[int, tuple[list[bytes], int]] = {}
        zero: dict[int, bytes] = {}
        bs = self.bs
        for path, n in walk:
            common = {"uid": n.uid, "gid": n.gid, "xattrs": dict(n.xattrs) or None}
            mode = stat.S_IMODE(n.mode)
            special = SPECIAL_TYPES.get(stat.S_IFMT(n.mode))
            if n.is_dir:
                entries.append(Entry(path, "d", mode, n.mtime_ns, **common))
            elif stat.S_ISLNK(n.mode):
                target = n.target or b""
                entries.append(Entry(path, "l", mode, n.mtime_ns, target=target, **common))
            elif n.is_reg:
                if n.ino not in files:
                    files[n.ino] = (self._file_cids(n, bs, zero), n.size)
                cids, size = files[n.ino]
                link = n.ino if n.nlink > 1 else None
                entries.append(
                    Entry(path, "f", mode, n.mtime_ns, size=size, cids=cids, link=link, **common)
                )
            elif special is not None:  # fifo, device, socket: no data, rdev for devices
                rdev = n.rdev if special in ("c", "b") else None
                entries.append(Entry(path, special, mode, n.mtime_ns, rdev=rdev, **common))
        uid, seq = self.vault.commit(entries, name=name, fork=fork)
        return uid, seq, len(entries)

    def _file_cids(self, n: Node, bs: int, zero: dict[int, bytes]) -> list[bytes]:
        blocks = n.blocks if n.blocks is not None else self.tree.load_blocks(n.ino)
        cids: list[bytes] = []
        nblocks = (n.size + bs - 1) // bs
        for b in range(nblocks):
            want = min(bs, n.size - b * bs)
            chunks = blocks.get(b) or []
            have = sum(c for _i, c in chunks)
            if have > want:  # a stale tail (crash between truncate and commit): re-store
                data = self.cache.load_stored(chunks, want)
                pieces = [data] if data else []
                chunks = list(zip(self.vault.store_chunks(pieces), [want], strict=False))
                have = want
            cids += [c for c, _n in chunks]
            if have < want:
                gap = want - have
                if gap not in zero:
                    zero[gap] = self.vault.store_chunks([bytes(gap)])[0]
                    self.zeros.note(zero[gap], gap)
                cids.append(zero[gap])
        return cids

    async def hold_references(self) -> trio.Event:
        """For prune on the mounted vault (called from its thread through
        ``trio.from_thread``): until the returned event is set, nothing adds a reference to a
        chunk: no dirty block is stored (writers keep filling the cache, up to its budget)
        and no snapshot records the tree; every block stored before is in the committed live
        tree. Raises VaultError if the cache could not settle."""
        held, release = trio.Event(), trio.Event()
        failed: list[BaseException] = []

        async def holder() -> None:
            try:
                async with self._refs, self.cache.held():
                    held.set()
                    await release.wait()
            except Exception as e:  # a system task must not raise: the caller reports it
                failed.append(e)
                held.set()

        trio.lowlevel.spawn_system_task(holder)
        await held.wait()
        if failed:
            raise VaultError(f"could not pause storing blocks for prune: {failed[0]}")
        return release

    def foreground_busy(self) -> bool:
        """True while writers wait for cache budget (the foreground is held up by storing):
        background work then yields (vaultfs/maintenance.py). Safe to call from any thread:
        it reads a counter."""
        return self.cache.waiting > 0

    async def delete_snapshot(self, uid: str) -> int:
        infos = await trio.to_thread.run_sync(self.snaps.query_snapshots)
        info = next((i for i in infos if i.uid == uid), None)
        seq = await trio.to_thread.run_sync(self.vault.delete_snapshot, uid)
        if info is None:
            return seq
        root = self.snaps.get(SNAPROOT_BASE + info.seq)
        self.snaps.forget_snapshot(info.id)
        # only an entry the kernel looked up (or listed: readdirplus) can be in its cache. An
        # invalidation of one it never knew fails with ENOENT, which the asynchronous form
        # (pyfuse3's notify thread) logs as an error with a traceback, out of our reach: the
        # synchronous one, in a worker thread (it may wait for a request on .snapshots that
        # the loop serves meanwhile), raises it here, for an entry the kernel dropped since
        if root is not None and root.lookups > 0:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, SNAPDIR_INO, info.dirname)
            except OSError as e:
                log.debug("invalidating .snapshots/%r: %s", info.dirname, e)
        return seq

    async def prepare_umount(self):
        """Store everything, ship the live tree if it changed, upload; report."""
        await self.freeze()
        try:
            t0 = time.monotonic()
            await self.cache.drain()
            t1 = time.monotonic()
            if self.tree.changed_since_ship:
                await trio.to_thread.run_sync(self.vault.ship_index)
                self.tree.changed_since_ship = False
            t2 = time.monotonic()
            rep = await self.push(seal=True)
            log.info(
                "umount: stored dirty blocks in %.2fs, shipped the index in %.2fs, "
                "uploaded in %.2fs",
                t1 - t0,
                t2 - t1,
                time.monotonic() - t2,
            )
            return rep
        finally:
            self.thaw()

    def mount_status(self) -> dict:
        return {
            "mountpoint": str(self.mountpoint),
            "pid": os.getpid(),
            "cache_budget": self.cache.budget,
            "cache_dirty_bytes": self.cache.used,
            "dirty_blocks": len(self.cache.dirty),
            # held in memory: the home's disk had no room for their cache files
            "memory_blocks": sum(1 for d in self.cache.dirty.values() if d.mem is not None),
            "writers_waiting": self.cache.waiting,
            "blocks_stored": self.cache.stored_blocks,
            "inodes": len(self.tree.nodes),
            "snapshot_views": {**self.snaps.stats.as_dict(), "nodes_cached": self.snaps.cached},
            "uploader_error": self.cache.error,
            "getxattr_requests": self.getxattr_requests,
            "read_cache": self.readcache.stats(),
            "chunk_reads": dict(self.reader.stats),
            "reads": dict(self.read_stats),
            "last_push": self.last_push,
        }
