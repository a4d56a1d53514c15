"""The live tree: the mount's inodes, directory entries, xattrs and file block lists.

The in-memory :class:`LiveTree` is authoritative while the mount runs; the ``live_*`` tables
of the index (schema in index.py) follow it through a *state journal*: every mutation marks
the keys it touched (an inode, a directory entry, an inode's xattrs, a file block) dirty,
and :meth:`LiveTree.take_batch` turns the dirty keys into the rows they hold *now*. The batch
is written in one SQLite transaction from a worker thread (:meth:`apply_batch`), so the
database is always a consistent state the tree went through, and a crash loses at most the
mutations of the last fraction of a second that nobody fsync'd.

Contract: every method except :meth:`load`, :meth:`apply_batch` and :meth:`load_blocks` is
called on the event loop only (no locking inside); those three run in worker threads and
touch only SQLite and the objects handed to them.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import DiskFull, VaultError
from .holes import ZeroChunks
from .index import Index

ROOT_INODE = 1
#: Live inode numbers stay below this; snapshot views use the range above (snapview.py).
LIVE_INODE_LIMIT = 1 << 60
DEFAULT_BLOCK_SIZE = 1024 * 1024
CID_LEN = 32
_REC = struct.Struct("<I")

Chunks = list[tuple[bytes, int]]  # (chunk id, plaintext length) in file order


def pack_chunks(chunks: Chunks) -> bytes:
    return b"".join(cid + _REC.pack(n) for cid, n in chunks)


def unpack_chunks(blob: bytes) -> Chunks:
    step = CID_LEN + 4
    return [
        (blob[i : i + CID_LEN], _REC.unpack_from(blob, i + CID_LEN)[0])
        for i in range(0, len(blob), step)
    ]


@dataclass(slots=True, eq=False)
class Node:
    """One live inode. ``children`` for directories, ``blocks`` for regular files (None
    until loaded from the index). ``alloc``: bytes of the stored blocks' chunks that are not
    holes (:mod:`vaultfs.holes`), kept while ``blocks`` change; None until counted."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    rdev: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, int] | None = None
    blocks: dict[int, Chunks] | None = None
    lookups: int = 0  # kernel lookup count (not persisted)
    opens: int = 0  # open file handles (not persisted)
    alloc: int | None = None  # stored bytes that are not holes (not persisted)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def row(self) -> tuple:
        return (
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.nlink,
            self.rdev,
            self.target,
        )


@dataclass
class Batch:
    """Rows captured on the loop, written by :meth:`LiveTree.apply_batch` in a thread."""

    nodes: list[tuple] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    dirents: list[tuple[int, bytes, int | None]] = field(default_factory=list)
    xattrs: list[tuple[int, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    blocks: list[tuple[int, int, bytes | None]] = field(default_factory=list)
    next_ino: int | None = None
    after: list[Callable[[], None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.nodes or self.gone or self.dirents or self.xattrs or self.blocks or self.after
        ) or (self.next_ino is not None)


class LiveTree:
    def __init__(self, index: Index, zeros: ZeroChunks | None = None) -> None:
        self.index = index
        #: which chunks are holes (counting ``Node.alloc``); None: every chunk is data
        self.zeros = zeros
        self.nodes: dict[int, Node] = {}
        self.next_ino = ROOT_INODE + 1
        self.block_size = DEFAULT_BLOCK_SIZE
        self._d_nodes: set[int] = set()
        self._d_dirents: set[tuple[int, bytes]] = set()
        self._d_xattrs: set[int] = set()
        self._d_blocks: set[tuple[int, int]] = set()
        self._d_next = False
        self._after: list[Callable[[], None]] = []
        self.changed_since_ship = False

    # -- loading (worker thread, before the mount serves requests) --------------------------
    def load(self, uid: int, gid: int) -> None:
        """Read the live tree from the index; create the root on first use. Inodes with no
        directory entry left (unlinked while open at a crash) are purged."""
        bs = self.index.get("live_block_size")
        if bs is None:
            self.index.set("live_block_size", DEFAULT_BLOCK_SIZE)
            bs = DEFAULT_BLOCK_SIZE
        self.block_size = int(bs)
        for row in self.index.q("SELECT * FROM live_inodes"):
            n = Node(*row[:11])
            if n.is_dir:
                n.children = {}
            self.nodes[n.ino] = n
        for parent, name, ino in self.index.q("SELECT parent, name, inode FROM live_dirents"):
            p = self.nodes.get(parent)
            if p is not None and p.children is not None and ino in self.nodes:
                p.children[bytes(name)] = ino
            else:  # an entry whose inode row never committed: drop it
                self._d_dirents.add((parent, bytes(name)))
        for ino, name, value in self.index.q("SELECT inode, name, value FROM live_xattrs"):
            if ino in self.nodes:
                self.nodes[ino].xattrs[bytes(name)] = bytes(value)
        if ROOT_INODE not in self.nodes:
            now = time.time_ns()
            root = Node(ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, 0, now, now, now, 2)
            root.children = {}
            self.nodes[ROOT_INODE] = root
            self._d_nodes.add(ROOT_INODE)
        # recount links from the directory entries (the journal may have stopped between
        # an entry and its inode's row) and purge what nothing names any more
        links = dict.fromkeys(self.nodes, 0)
        for n in self.nodes.values():
            if n.children:
                for ino in n.children.values():
                    links[ino] += 1
                    if self.nodes[ino].is_dir:
                        links[n.ino] += 1
        links[ROOT_INODE] += 1
        for ino, n in list(self.nodes.items()):
            want = links[ino] + (1 if n.is_dir else 0)  # '.' of a directory
            if links[ino] == 0:
                del self.nodes[ino]
                self._d_nodes.add(ino)
            elif n.nlink != want:
                n.nlink = want
                self._d_nodes.add(ino)
        stored = int(self.index.get("live_next_inode") or 0)
        self.next_ino = max(stored, max(self.nodes) + 1, ROOT_INODE + 1)
        self._d_next = True

    def load_blocks(self, ino: int) -> dict[int, Chunks]:
        """A file's stored block lists from the index (worker thread)."""
        return {
            blk: unpack_chunks(blob)
            for blk, blob in self.index.q(
                "SELECT block, chunks FROM live_blocks WHERE inode=?", (ino,)
            )
        }

    def count_alloc(self, inos: list[int]) -> dict[int, int]:
        """``Node.alloc`` of files whose blocks are not loaded, from the index (worker thread;
        the block lists are not kept). Files with no stored block are left out (0)."""
        out: dict[int, int] = {}
        for i in range(0, len(inos), 500):
            part = inos[i : i + 500]
            marks = ",".join("?" * len(part))
            for ino, blob in self.index.q(
                f"SELECT inode, chunks FROM live_blocks WHERE inode IN ({marks})", part
            ):
                out[ino] = out.get(ino, 0) + self.block_alloc(unpack_chunks(blob))
        return out

    def block_alloc(self, chunks: Chunks | None) -> int:
        """Bytes of a stored block that are not holes (no hashing: any thread)."""
        if not chunks:
            return 0
        if self.zeros is None:
            return sum(n for _c, n in chunks)
        return self.zeros.allocated(chunks)

    def attach_blocks(self, n: Node, blocks: dict[int, Chunks]) -> None:
        """Give ``n`` its block lists just loaded (event loop), unless it has them already."""
        if n.blocks is None:
            n.blocks = blocks
            n.alloc = sum(self.block_alloc(c) for c in blocks.values())

    def set_alloc(self, n: Node, alloc: int) -> None:
        """``n.alloc`` from :meth:`count_alloc` (event loop): kept only while ``n``'s blocks
        are not loaded (loading counts them again, and every change needs them loaded)."""
        if n.blocks is None:
            n.alloc = alloc

    # -- mutations (event loop) -------------------------------------------------------------
    def new_node(self, mode: int, uid: int, gid: int, **kw: object) -> Node:
        ino = self.next_ino
        if ino >= LIVE_INODE_LIMIT:
            raise OverflowError("live inode numbers exhausted")
        self.next_ino += 1
        self._d_next = True
        now = time.time_ns()
        n = Node(ino, mode, uid, gid, atime_ns=now, mtime_ns=now, ctime_ns=now, **kw)  # type: ignore[arg-type]
        if n.is_dir:
            n.children = {}
            n.nlink = 2
        if n.is_reg:
            n.blocks = {}
            n.alloc = 0
        self.nodes[ino] = n
        self._d_nodes.add(ino)
        return n

    def touch(self, n: Node) -> None:
        """Mark an inode's attributes changed."""
        self._d_nodes.add(n.ino)

    def touch_xattrs(self, n: Node) -> None:
        self._d_xattrs.add(n.ino)
        self._d_nodes.add(n.ino)

    def set_entry(self, parent: Node, name: bytes, ino: int | None) -> None:
        """Point ``parent/name`` at ``ino`` (None removes the entry)."""
        assert parent.children is not None
        if ino is None:
            parent.children.pop(name, None)
        else:
            parent.children[name] = ino
        self._d_dirents.add((parent.ino, name))

    def set_block(self, n: Node, blk: int, chunks: Chunks | None) -> None:
        """Record a block's stored chunk list (None: the block holds no stored data)."""
        assert n.blocks is not None
        old = n.blocks.pop(blk, None) if chunks is None else n.blocks.get(blk)
        if chunks is not None:
            n.blocks[blk] = chunks
        if n.alloc is not None:
            n.alloc += self.block_alloc(chunks) - self.block_alloc(old)
        self._d_blocks.add((n.ino, blk))

    def drop_blocks_from(self, n: Node, first: int) -> None:
        assert n.blocks is not None
        for blk in [b for b in n.blocks if b >= first]:
            self.set_block(n, blk, None)

    def purge(self, n: Node) -> None:
        """Forget an inode that no entry names and the kernel no longer holds."""
        self.nodes.pop(n.ino, None)
        self._d_nodes.add(n.ino)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop once everything marked so far is committed."""
        self._after.append(fn)

    @property
    def dirty(self) -> bool:
        return bool(
            self._d_nodes or self._d_dirents or self._d_xattrs or self._d_blocks or self._after
        )

    def take_batch(self) -> Batch:
        """Capture the current rows of every dirty key (event loop, O(dirty keys))."""
        b = Batch()
        for ino in self._d_nodes:
            n = self.nodes.get(ino)
            if n is None:
                b.gone.append(ino)
            else:
                b.nodes.append(n.row())
        for parent, name in self._d_dirents:
            p = self.nodes.get(parent)
            ino = p.children.get(name) if p is not None and p.children is not None else None
            b.dirents.append((parent, name, ino))
        for ino in self._d_xattrs:
            n = self.nodes.get(ino)
            if n is not None:
                b.xattrs.append((ino, list(n.xattrs.items())))
        for ino, blk in self._d_blocks:
            n = self.nodes.get(ino)
            chunks = n.blocks.get(blk) if n is not None and n.blocks is not None else None
            b.blocks.append((ino, blk, pack_chunks(chunks) if chunks else None))
        if self._d_next:
            b.next_ino = self.next_ino
        b.after = self._after
        if b.nodes or b.gone or b.dirents or b.xattrs or b.blocks:
            self.changed_since_ship = True
        self._d_nodes, self._d_dirents, self._d_xattrs, self._d_blocks = set(), set(), set(), set()
        self._d_next, self._after = False, []
        return b

    def requeue(self, b: Batch) -> None:
        """Mark a batch's keys dirty again after its transaction failed."""
        self._d_nodes.update(r[0] for r in b.nodes)
        self._d_nodes.update(b.gone)
        self._d_dirents.update((p, n) for p, n, _i in b.dirents)
        self._d_xattrs.update(i for i, _x in b.xattrs)
        self._d_blocks.update((i, k) for i, k, _b in b.blocks)
        self._d_next = self._d_next or b.next_ino is not None
        self._after[:0] = b.after

    def apply_batch(self, b: Batch) -> None:
        """Write a batch in one transaction (worker thread)."""
        if not (b.nodes or b.gone or b.dirents or b.xattrs or b.blocks or b.next_ino):
            return
        with self.index.tx() as db:
            if b.nodes:
                db.executemany(
                    "INSERT OR REPLACE INTO live_inodes VALUES (?,?,?,?,?,?,?,?,?,?,?)", b.nodes
                )
            for ino in b.gone:
                db.execute("DELETE FROM live_inodes WHERE id=?", (ino,))
                db.execute("DELETE FROM live_xattrs WHERE inode=?", (ino,))
                db.execute("DELETE FROM live_blocks WHERE inode=?", (ino,))
            for parent, name, ino in b.dirents:
                if ino is None:
                    db.execute("DELETE FROM live_dirents WHERE parent=? AND name=?", (parent, name))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO live_dirents VALUES (?,?,?)", (parent, name, ino)
                    )
            for ino, items in b.xattrs:
                db.execute("DELETE FROM live_xattrs WHERE inode=?", (ino,))
                db.executemany(
                    "INSERT INTO live_xattrs VALUES (?,?,?)", [(ino, k, v) for k, v in items]
                )
            for ino, blk, blob in b.blocks:
                if blob is None:
                    db.execute("DELETE FROM live_blocks WHERE inode=? AND block=?", (ino, blk))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO live_blocks VALUES (?,?,?)", (ino, blk, blob)
                    )
            if b.next_ino is not None:
                db.execute(
                    "INSERT OR REPLACE INTO settings VALUES ('live_next_inode', ?)",
                    (str(b.next_ino),),
                )

    # -- queries (event loop) ---------------------------------------------------------------
    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def walk(self) -> list[tuple[bytes, Node]]:
        """Every (relative path as bytes, node) reachable from the root, parents before
        children."""
        out: list[tuple[bytes, Node]] = []
        stack: list[tuple[bytes, Node]] = [(b"", self.nodes[ROOT_INODE])]
        while stack:
            prefix, d = stack.pop()
            assert d.children is not None
            for name in sorted(d.children):
                n = self.nodes[d.children[name]]
                path = prefix + b"/" + name if prefix else name
                out.append((path, n))
                if n.is_dir:
                    stack.append((path, n))
        return out

    def path_of(self, ino: int) -> bytes | None:
        """A relative path of ``ino`` (one of them for a hard link), None if no directory
        holds it. Walks the whole tree: for messages on a rare error path only."""
        return next((path for path, n in self.walk() if n.ino == ino), None)


class Journal:
    """Writes the tree's dirty state to the index in the background (group commit).

    ``run`` commits whatever is dirty every ``interval`` seconds or when asked;
    :meth:`commit` waits until everything marked before the call is committed (fsync uses it:
    SQLite runs with synchronous=FULL, so a committed batch is on disk). A commit that fails
    (a full disk) keeps the state dirty and is retried every second; :meth:`commit` waits
    through :data:`COMMIT_TRIES` - 1 failed attempts, then raises (unless asked to wait on):
    a disk that stays full fails fsync, flush and umount instead of hanging them.
    """

    def __init__(self, tree: LiveTree, interval: float = 0.5) -> None:
        self.tree = tree
        self.interval = interval
        self._wake = trio.Event()
        self._asked = 0
        self._done = 0
        self._done_evt = trio.Event()
        #: the last commit's failure, None once one succeeds; failed attempts so far
        self.error: Exception | None = None
        self._failures = 0

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self._commit_once()
            except Exception as e:  # e.g. a full disk: keep the state dirty and retry
                logging.getLogger(__name__).exception("committing the live tree failed")
                self.error = e
                self._failures += 1
                evt, self._done_evt = self._done_evt, trio.Event()
                evt.set()  # waiters see the failure (commit)
                await trio.sleep(1)

    async def _commit_once(self) -> None:
        target = self._asked
        if self.tree.dirty:
            batch = self.tree.take_batch()
            try:
                await trio.to_thread.run_sync(self.tree.apply_batch, batch)
            except BaseException:
                self.tree.requeue(batch)
                raise
            for fn in batch.after:
                fn()
        self._done = max(self._done, target)
        self.error = None
        evt, self._done_evt = self._done_evt, trio.Event()
        evt.set()

    def kick(self) -> None:
        self._wake.set()

    async def commit(self, wait_through_errors: bool = False) -> None:
        """Wait until everything changed before the call is committed. When
        :data:`COMMIT_TRIES` attempts fail meanwhile, raises :class:`DiskFull` (a full disk)
        or VaultError, the state staying dirty for the next attempt; ``wait_through_errors``
        waits on instead."""
        self._asked += 1
        mine = self._asked
        start = self._failures
        while self._done < mine:
            evt = self._done_evt
            self._wake.set()
            await evt.wait()
            failed = self._failures - start
            if self._done < mine and self.error is not None and failed >= COMMIT_TRIES:
                if not wait_through_errors:
                    raise _commit_error(self.error)


#: Failed attempts (one a second) :meth:`Journal.commit` waits through before it raises: a
#: passing failure is retried, a disk that stays full is reported.
COMMIT_TRIES = 3


def _commit_error(e: Exception) -> VaultError:
    """What a failed live-tree commit means to the user: a full disk (SQLite's "database or
    disk is full", ENOSPC, EDQUOT) or another error, both with the way forward."""
    if isinstance(e, VaultError):
        return e
    full = isinstance(e, sqlite3.OperationalError) and "full" in str(e)
    full = full or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    if full:
        return DiskFull(
            "local disk full while committing the live tree to the index: free space and "
            "retry (the changes stay in the mount daemon and are committed then)"
        )
    return VaultError(f"committing the live tree failed: {e}; see mount.log")
