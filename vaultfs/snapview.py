"""Read-only views of snapshots under ``MOUNTPOINT/.snapshots/<name>/``, loaded lazily.

Nothing of a snapshot is read until the kernel asks: a lookup reads one entry (by
``UNIQUE (snapshot, path)``), a directory listing reads that directory's children (index
``entries_parent``), a file's chunk list is read when it is opened. Listing ``.snapshots``
costs one small count per snapshot. So a snapshot of millions of entries opens at once and
``stat`` of one deep file reads one row per path component. A file's ``st_blocks`` (its
chunks that are not holes, vaultfs/holes.py) comes with its row: the hole candidates of its
content (records as small as zeros compress to), counted once per content and kept in an LRU
(``CACHE_CONTENTS``), shared by every snapshot holding those bytes.

Inode numbers live above the live tree's range and never collide with it or each other:

* ``.snapshots`` itself: ``SNAPDIR_INO`` (2**62)
* the root of snapshot *s*: ``SNAPROOT_BASE + snapshots.seq`` (manifest sequence numbers only
  grow, so a deleted snapshot's numbers never come back, unlike SQLite row ids)
* an entry: ``ENTRY_BASE + (seq << 32) + (entries.id mod 2**32)``. A snapshot's entries are
  inserted by one transaction, so their ids are consecutive and distinct mod 2**32 (a
  snapshot holds fewer than 2**32 entries); the entries of one hard-link group share the
  number of the group's lowest id (index ``entries_link``), and nlink is the group's size
* a directory a snapshot names only implicitly (``a/b`` without ``a``, possible only in an
  index not written by vaultfs): ``SYNTH_BASE + n``, n counting up for the life of the mount

Memory stays bounded: a node the kernel holds (lookup count above zero, or open) is kept;
others go to a small LRU (``CACHE_NODES``) and are read again from the index when needed.
An open directory holds its listing until it is released; chunk lists of recently opened
files are kept in a small LRU too. ``stats`` counts what was read (``vaultfs status``).

Contract: ``query_*`` methods run in worker threads, touch only SQLite and return plain rows;
everything else runs on the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from . import names
from .holes import HOLE_MAX, HOLE_RECORD_BASE, HOLE_RECORD_STEP, ZeroChunks
from .index import Index, snapshots

log = logging.getLogger("vaultfs.snapview")

SNAPDIR_INO = 1 << 62
SNAPROOT_BASE = SNAPDIR_INO + 1
ENTRY_BASE = 1 << 61
SYNTH_BASE = SNAPDIR_INO + (1 << 40)
SNAPDIR_NAME = b".snapshots"
CACHE_NODES = 4096
CACHE_CHUNK_MAPS = 64
CACHE_CONTENTS = 65536
#: Contents of more chunks (about 128 MiB) count their holes among the known zero chunks
#: only (SnapViews._holes): every other chunk's record would cost a lookup.
EXACT_CHUNKS = 4096

_COLS = "id, path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link, rdev, content"
_FMT = {
    "d": stat.S_IFDIR,
    "l": stat.S_IFLNK,
    "f": stat.S_IFREG,
    "p": stat.S_IFIFO,
    "c": stat.S_IFCHR,
    "b": stat.S_IFBLK,
    "s": stat.S_IFSOCK,
}


def is_snap_ino(ino: int) -> bool:
    return ino >= ENTRY_BASE


def entry_ino(seq: int, eid: int) -> int:
    return ENTRY_BASE + (seq << 32) + (eid & 0xFFFFFFFF)


@dataclass(slots=True, eq=False)
class SNode:
    ino: int
    mode: int  # full st_mode
    mtime_ns: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    nlink: int = 1
    rdev: int = 0
    entry: int | None = None  # entries.id of a file (its content lists the chunks)
    snap: int | None = None  # snapshots.id (None: .snapshots itself)
    dir_id: int | None = None  # directories: entries.id of their children's parent (0: root)
    path: bytes | None = None  # directories: path in the snapshot (b"" for its root)
    lookups: int = 0  # kernel lookup count
    opens: int = 0  # open handles
    view: bool = False  # a generated file (vaultfs/kb/view.py), not an entry
    alloc: int | None = None  # files: bytes that are not holes (None: not known, all)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class SnapInfo:
    id: int
    seq: int
    uid: str
    name: str | None
    created: float
    dirname: bytes


def dir_names(snaps: list[tuple[str, str | None]]) -> dict[str, str]:
    """The directory each snapshot of ``snaps`` ((uid, name) pairs) has under
    ``.snapshots/``, by uid: its name when no other snapshot has that name and it can name a
    directory there (no '/', not '.' or '..', not another snapshot's id), else its uid."""
    counts: dict[str, int] = {}
    for _u, nm in snaps:
        if nm:
            counts[nm] = counts.get(nm, 0) + 1
    uids = {u for u, _n in snaps}
    out = {}
    for u, nm in snaps:
        ok = nm and counts[nm] == 1 and "/" not in nm and nm not in (".", "..")
        ok = ok and (nm == u or nm not in uids)
        out[u] = nm if ok and nm else u
    return out


@dataclass
class _Root:
    """What is known about one snapshot once its root was looked up."""

    info: SnapInfo
    # directories named only implicitly, and entries whose directory has no entry:
    # dir path -> {name: row or None for a synthetic directory}; empty for vaultfs' own
    extra: dict[bytes, dict[bytes, tuple | None]] = field(default_factory=dict)
    synth: dict[bytes, int] = field(default_factory=dict)  # implicit dir path -> inode


@dataclass
class Stats:
    """What the views read from the index since the mount (shown by `vaultfs status`)."""

    entries_read: int = 0  # rows of `entries` read
    lookups: int = 0  # single-name queries
    listings: int = 0  # directory listings read
    chunk_lists: int = 0  # file chunk lists read
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:  # worker threads count concurrently
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {
            "entries_read": self.entries_read,
            "lookups": self.lookups,
            "listings": self.listings,
            "chunk_lists": self.chunk_lists,
        }


class SnapViews:
    def __init__(self, index: Index, uid: int, gid: int, zeros: ZeroChunks | None = None) -> None:
        self.index = index
        self.uid, self.gid = uid, gid
        self.zeros = zeros  # None: every chunk counts as data
        # contents.id -> bytes of its chunks that are holes (worker threads, under the lock)
        self.hole_bytes: OrderedDict[int, int] = OrderedDict()
        self._holes_lock = threading.Lock()
        self._zero_rows_of: tuple[int, dict[int, int]] = (0, {})  # (ids known, rows)
        self.pinned: dict[int, SNode] = {}  # nodes the kernel holds (or roots)
        self.lru: OrderedDict[int, SNode] = OrderedDict()
        self.roots: dict[int, _Root] = {}  # snapshots.id -> root state
        self.root_inos: dict[int, int] = {}  # root inode -> snapshots.id
        self.chunk_maps: OrderedDict[int, tuple[list[int], list[tuple[bytes, int]]]] = OrderedDict()
        self._synth = 0
        self.stats = Stats()

    # -- nodes the kernel knows (loop) ------------------------------------------------------
    def get(self, ino: int) -> SNode | None:
        n = self.pinned.get(ino)
        if n is None:
            n = self.lru.get(ino)
            if n is not None:
                self.lru.move_to_end(ino)
        return n

    def intern(self, node: SNode) -> SNode:
        """The node already known for this inode number, else ``node`` (cached)."""
        old = self.get(node.ino)
        if old is not None:
            return old
        self.lru[node.ino] = node
        self._trim()
        return node

    def ref(self, node: SNode, lookups: int = 0, opens: int = 0) -> None:
        """The kernel took a lookup reference or opened it: keep it until released."""
        node.lookups += lookups
        node.opens += opens
        if node.ino not in self.pinned:
            self.lru.pop(node.ino, None)
            self.pinned[node.ino] = node

    def unref(self, ino: int, lookups: int = 0, opens: int = 0) -> None:
        n = self.pinned.get(ino)
        if n is None:
            return
        n.lookups -= lookups
        n.opens -= opens
        if n.lookups <= 0 and n.opens <= 0 and ino not in self.root_inos and ino != SNAPDIR_INO:
            del self.pinned[ino]
            self.lru[ino] = n
            self._trim()

    def _trim(self) -> None:
        while len(self.lru) > CACHE_NODES:
            self.lru.popitem(last=False)

    @property
    def cached(self) -> int:
        return len(self.pinned) + len(self.lru)

    # -- listing snapshots ------------------------------------------------------------------
    def query_snapshots(self) -> list[SnapInfo]:
        rows = self.index.q("SELECT id, seq, uid, name, created FROM snapshots ORDER BY id")
        dirs = dir_names([(u, nm) for _i, _s, u, nm, _c in rows])
        return [SnapInfo(i, seq, u, nm, c, dirs[u].encode()) for i, seq, u, nm, c in rows]

    def query_root(self, info: SnapInfo) -> tuple[int, list[tuple]]:
        """(top-level directories, entries with no directory entry) of a snapshot."""
        (dirs,) = self.index.one(
            "SELECT count(*) FROM entries WHERE snapshot=? AND parent=0 AND type='d'", (info.id,)
        )
        orphans = self.index.q(
            f"SELECT {_COLS} FROM entries WHERE snapshot=? AND parent IS NULL", (info.id,)
        )
        self.stats.add(entries_read=len(orphans))
        holes = self._holes(orphans)
        return dirs, [(*r, r[0], 1, 0, holes.get(r[12])) for r in orphans]

    def root_node(self, info: SnapInfo, loaded: tuple[int, list[tuple]] | None) -> SNode:
        """The root directory of a snapshot (``loaded``: query_root's answer, needed the
        first time)."""
        ino = SNAPROOT_BASE + info.seq
        n = self.pinned.get(ino)
        if n is not None:
            return n
        dirs, orphans = loaded or (0, [])  # None: deleted meanwhile, nothing to show
        n = SNode(ino, stat.S_IFDIR | 0o555, int(info.created * 1e9), uid=self.uid, gid=self.gid)
        n.nlink, n.snap, n.dir_id, n.path = 2 + dirs, info.id, 0, b""
        root = _Root(info)
        for row in orphans:
            parts = names.split_path(names.from_db(row[1]))
            if parts is None:
                continue  # '../x', '/x' and the like: no directory can show it
            head, tail = parts
            root.extra.setdefault(head, {})[tail] = row
            while head:  # the implicit directories up to the root
                up, _s, nm = head.rpartition(b"/")
                root.extra.setdefault(up, {}).setdefault(nm, None)
                head = up
        self.roots[info.id] = root
        self.root_inos[ino] = info.id
        self.pinned[ino] = n
        return n

    def known_root(self, ino: int) -> bool:
        return ino in self.root_inos

    # -- reading directories (worker threads) -----------------------------------------------
    def query_child(self, d: SNode, name: bytes) -> tuple | None:
        """The entry ``name`` of directory ``d`` (one row), or None."""
        assert d.snap is not None and d.path is not None
        if b"/" in name or name in (b"", b".", b".."):
            return None
        path = d.path + b"/" + name if d.path else name
        row = self.index.one(
            f"SELECT {_COLS} FROM entries WHERE snapshot=? AND path=?",
            (d.snap, names.to_db(path)),
        )
        self.stats.add(lookups=1, entries_read=int(row is not None))
        if row is None:
            return None
        return self._extend(d.snap, [row])[0]

    def query_children(self, d: SNode) -> list[tuple]:
        """Every entry of directory ``d`` whose parent is recorded (one listing)."""
        assert d.snap is not None
        self.stats.add(listings=1)
        if d.dir_id is None:  # an implicit directory: its children are all in _Root.extra
            return []
        rows = self.index.q(
            f"SELECT {_COLS} FROM entries WHERE snapshot=? AND parent=?", (d.snap, d.dir_id)
        )
        self.stats.add(entries_read=len(rows))
        return self._extend(d.snap, rows)

    def _extend(self, snap: int, rows: list[tuple]) -> list[tuple]:
        """Add (group's lowest id, group size, subdirectories) to each row."""
        links = sorted({r[10] for r in rows if r[10] is not None})
        groups: dict[int, tuple[int, int]] = {}
        for i in range(0, len(links), 500):
            part = links[i : i + 500]
            marks = ",".join("?" * len(part))
            for link, low, count in self.index.q(
                f"SELECT link, min(id), count(*) FROM entries WHERE snapshot=? AND link IN ({marks})"
                " GROUP BY link",
                (snap, *part),
            ):
                groups[link] = (low, count)
        dirs = [r[0] for r in rows if r[2] == "d"]
        subdirs: dict[int, int] = {}
        for i in range(0, len(dirs), 500):
            part = dirs[i : i + 500]
            marks = ",".join("?" * len(part))
            subdirs.update(
                self.index.q(
                    f"SELECT parent, count(*) FROM entries WHERE snapshot=? AND parent IN ({marks})"
                    " AND type='d' GROUP BY parent",
                    (snap, *part),
                )
            )
        holes = self._holes(rows)
        out = []
        for r in rows:
            low, count = groups.get(r[10], (r[0], 1)) if r[10] is not None else (r[0], 1)
            out.append((*r, low, count, subdirs.get(r[0], 0), holes.get(r[12])))
        return out

    def _holes(self, rows: list[tuple]) -> dict[int, int]:
        """{content id: bytes of its chunks that are holes} of the file rows' contents, from
        the LRU or counted (worker thread): a content of at most ``EXACT_CHUNKS`` chunks
        exactly, from the records of its hole candidates; a larger one by its chunks among
        the known zero chunks (:meth:`_zero_rows`) and its last chunk (a file's zero tail)
        checked as the small ones, so its cost is a scan of its chunk numbers, not a lookup
        of every chunk's record."""
        if self.zeros is None:
            return {}
        out: dict[int, int] = {}
        todo: set[int] = set()
        with self._holes_lock:
            for r in rows:
                c = r[12]
                if r[2] != "f" or c is None:
                    continue
                hit = self.hole_bytes.get(c)
                if hit is None:
                    todo.add(c)
                else:
                    self.hole_bytes.move_to_end(c)
                    out[c] = hit
        if not todo:
            return out
        try:
            out.update(self._count_holes(todo))
        except sqlite3.Error:  # st_blocks is advice: the size stands in, counted next time
            log.exception("counting the holes of %d snapshot file(s) failed", len(todo))
        return out

    def _count_holes(self, todo: set[int]) -> dict[int, int]:
        """:meth:`_holes` of contents not in the LRU, which keeps them."""
        assert self.zeros is not None
        got = dict.fromkeys(todo, 0)
        counts = dict(self._in(sorted(todo), "SELECT id, chunks FROM contents WHERE id IN ({})"))
        small = sorted(c for c in todo if counts.get(c, 0) <= EXACT_CHUNKS)
        big = sorted(c for c in todo if counts.get(c, 0) > EXACT_CHUNKS)
        candidates = (
            "SELECT x.content, c.id, c.cid, c.plain, c.length FROM content_chunks x"
            " JOIN chunks c ON c.id = x.chunk WHERE x.content IN ({})"
            f" AND c.plain <= {HOLE_MAX} AND c.length <= {HOLE_RECORD_BASE} + c.plain / {HOLE_RECORD_STEP}"
        )
        for content, _id, cid, plain, length in self._in(small, candidates):
            if self.zeros.record_is_hole(bytes(cid), plain, length):
                got[content] += plain
        if big:
            zero_rows = self._zero_rows()
            if zero_rows:
                marks = ",".join(str(i) for i in zero_rows)
                for content, chunk, count in self._in(
                    big,
                    "SELECT content, chunk, count(*) FROM content_chunks WHERE content IN ({})"
                    f" AND chunk IN ({marks}) GROUP BY content, chunk",
                ):
                    got[content] += zero_rows[chunk] * count
            for content in big:
                tail = self.index.one(
                    "SELECT c.id, c.cid, c.plain, c.length FROM content_chunks x"
                    " JOIN chunks c ON c.id = x.chunk WHERE x.content=? ORDER BY x.seq DESC LIMIT 1",
                    (content,),
                )
                if tail is not None and tail[0] not in zero_rows:
                    if self.zeros.record_is_hole(bytes(tail[1]), tail[2], tail[3]):
                        got[content] += tail[2]
        with self._holes_lock:
            for c, n in got.items():
                self.hole_bytes[c] = n
            while len(self.hole_bytes) > CACHE_CONTENTS:
                self.hole_bytes.popitem(last=False)
        return got

    def _in(self, ids: list[int], sql: str) -> list[tuple]:
        """Rows of ``sql`` whose ``{}`` is filled with ``ids``' placeholders, 500 at a time."""
        out: list[tuple] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            out += self.index.q(sql.format(",".join("?" * len(part))), part)
        return out

    def _zero_rows(self) -> dict[int, int]:
        """{chunks.id: plain length} of the zero chunks the index holds among those
        :class:`ZeroChunks` knows (looked up again when it learns more)."""
        assert self.zeros is not None
        known = self.zeros.known()
        if known and self._zero_rows_of[0] != len(known):
            rows = self.index.q(
                f"SELECT id, plain FROM chunks WHERE cid IN ({','.join('?' * len(known))})",
                known,
            )
            self._zero_rows_of = (len(known), dict(rows))
        return self._zero_rows_of[1]

    # -- building nodes (loop) ----------------------------------------------------------------
    def child_node(self, d: SNode, name: bytes, row: tuple | None) -> SNode | None:
        """The node of ``d/name`` from query_child's row, or an implicit one (or None)."""
        root = self.roots.get(d.snap) if d.snap is not None else None
        if root is None:
            return None
        if row is not None:
            return self.intern(self._from_row(root, d, row))
        extra = root.extra.get(d.path or b"", {})
        if name not in extra:
            return None
        return self.intern(self._extra_node(root, d, name, extra[name]))

    def listing(self, d: SNode, rows: list[tuple]) -> list[tuple[bytes, SNode]]:
        """(name, node) of every entry of ``d``, sorted by name (for one open directory)."""
        root = self.roots.get(d.snap) if d.snap is not None else None
        if root is None:
            return []
        out: dict[bytes, SNode] = {}
        for row in rows:
            parts = names.split_path(names.from_db(row[1]))
            if parts is None or parts[0] != (d.path or b""):
                continue  # a parent id that does not match the path: not shown
            out[parts[1]] = self.intern(self._from_row(root, d, row))
        for name, row in root.extra.get(d.path or b"", {}).items():
            if name not in out:
                out[name] = self.intern(self._extra_node(root, d, name, row))
        return sorted(out.items())

    def _extra_node(self, root: _Root, d: SNode, name: bytes, row: tuple | None) -> SNode:
        if row is not None:  # an entry whose directory has no entry of its own
            return self._from_row(root, d, row)
        path = d.path + b"/" + name if d.path else name
        ino = root.synth.get(path)
        if ino is None:
            self._synth += 1
            ino = root.synth[path] = SYNTH_BASE + self._synth
        n = SNode(ino, stat.S_IFDIR | 0o555, d.mtime_ns, uid=d.uid, gid=d.gid, nlink=2)
        n.snap, n.path = d.snap, path  # dir_id None: no entry, so no recorded children
        return n

    def view_node(self, d: SNode, name: bytes, size: int) -> SNode | None:
        """A generated read-only file ``name`` of directory ``d`` (a document of the kb view,
        vaultfs/kb/view.py): its inode number comes from the implicit-path counter, so it stays
        the same for the life of the mount. None if ``d``'s snapshot is gone."""
        root = self.roots.get(d.snap) if d.snap is not None else None
        if root is None or d.path is None:
            return None
        path = d.path + b"/" + name
        ino = root.synth.get(path)
        if ino is None:
            self._synth += 1
            ino = root.synth[path] = SYNTH_BASE + self._synth
        old = self.get(ino)
        if old is not None:
            return old
        # readable by whom may read the kb directory it is listed in, never more
        mode = 0o444 & d.mode
        n = SNode(ino, stat.S_IFREG | mode, d.mtime_ns, size=size, uid=d.uid, gid=d.gid)
        n.snap, n.path, n.view = d.snap, path, True
        return self.intern(n)

    def _from_row(self, root: _Root, d: SNode, row: tuple) -> SNode:
        (eid, path, typ, mode, mtime_ns, size, target, uid, gid, xattrs, _link, rdev) = row[:12]
        low, count, subdirs, holes = row[13:17]
        ino = entry_ino(root.info.seq, low)
        old = self.get(ino)
        if old is not None:
            return old
        n = SNode(
            ino,
            _FMT.get(typ, stat.S_IFREG) | (mode & 0o7777),
            mtime_ns,
            size=size if typ == "f" else 0,
            uid=d.uid if uid is None else uid,
            gid=d.gid if gid is None else gid,
            target=names.from_db(target) if typ == "l" and target is not None else None,
            xattrs=names.xattrs_from_db(xattrs),
            nlink=count,
            rdev=rdev or 0,
            entry=eid if typ == "f" else None,
            snap=root.info.id,
            alloc=None if typ != "f" or holes is None else max(size - holes, 0),
        )
        if typ == "l":
            n.size = len(n.target or b"")
        if typ == "d":
            n.nlink = 2 + subdirs + sum(1 for r in root.extra.get(names.from_db(path), {}).values() if r is None)  # fmt: skip
            n.dir_id, n.path = eid, names.from_db(path)
        return n

    # -- files --------------------------------------------------------------------------------
    def cached_chunks(self, node: SNode):
        hit = self.chunk_maps.get(node.ino)
        if hit is not None:
            self.chunk_maps.move_to_end(node.ino)
        return hit

    def query_chunks(self, node: SNode) -> tuple[list[int], list[tuple[bytes, int]]]:
        """(start offsets, [(cid, length)]) of a snapshot file (worker thread)."""
        assert node.entry is not None
        rows = snapshots.file_chunks(self.index, node.entry)
        self.stats.add(chunk_lists=1)
        starts, pos = [], 0
        for _cid, _seg, _off, _len, n in rows:
            starts.append(pos)
            pos += n
        return starts, [(bytes(c), n) for c, _seg, _off, _len, n in rows]

    def keep_chunks(self, node: SNode, cmap) -> None:
        self.chunk_maps[node.ino] = cmap
        while len(self.chunk_maps) > CACHE_CHUNK_MAPS:
            self.chunk_maps.popitem(last=False)

    # -- deleting -----------------------------------------------------------------------------
    def forget_snapshot(self, snap_id: int) -> None:
        """A snapshot was deleted: its names disappear (nodes the kernel still holds stay
        readable until it forgets them; chunks are never freed)."""
        self.roots.pop(snap_id, None)
        for ino in [i for i, s in self.root_inos.items() if s == snap_id]:
            del self.root_inos[ino]
            self.pinned.pop(ino, None)
        for ino in [i for i, n in self.lru.items() if n.snap == snap_id]:
            del self.lru[ino]
