"""Read-only views of snapshots under ``MOUNTPOINT/.snapshots/<name>/``.

Inode numbers live above the live tree's range and cannot collide with it or each other:

* ``.snapshots`` itself: ``SNAPDIR_INO`` (2**62)
* the root of snapshot *s*: ``SNAPROOT_BASE + snapshots.seq`` (manifest sequence numbers
  only grow, so a deleted snapshot's numbers never come back, unlike SQLite row ids)
* an entry: ``ENTRY_BASE + (seq << 32) + rank``, rank = the entry's position in the
  snapshot (by entries.id); the entries of one hard-link group share the lowest rank's number
* a directory a snapshot names only implicitly (``a/b`` without ``a``): ``SYNTH_BASE + n``

A snapshot is loaded on first access (one query in a worker thread), so listing
``.snapshots`` costs nothing per snapshot; a file's chunk list is loaded when it is opened.
The directory name is the snapshot's name when it has a unique one, else its id.

Contract: the methods named ``load_*``/``query_*`` run in worker threads; the rest on the loop.
"""

from __future__ import annotations

import bisect
import json
import stat
from dataclasses import dataclass, field

from .index import Index

SNAPDIR_INO = 1 << 62
SNAPROOT_BASE = SNAPDIR_INO + 1
ENTRY_BASE = 1 << 61
SYNTH_BASE = SNAPDIR_INO + (1 << 40)
SNAPDIR_NAME = b".snapshots"


def is_snap_ino(ino: int) -> bool:
    return ino >= ENTRY_BASE


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
    entry: int | None = None  # entries.id holding the chunk list (files)
    children: dict[bytes, int] | None = None


@dataclass
class SnapInfo:
    id: int
    seq: int
    uid: str
    name: str | None
    created: float
    dirname: bytes


class SnapViews:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.nodes: dict[int, SNode] = {}
        self.loaded: set[int] = set()
        self._synth = 0
        self.chunk_maps: dict[int, tuple[list[int], list[tuple[bytes, int]]]] = {}
        self.roots: dict[int, int] = {}  # root inode -> snapshots.id
        self.members: dict[int, set[int]] = {}  # snapshots.id -> inodes loaded for it

    # -- listing snapshots ------------------------------------------------------------------
    def query_snapshots(self) -> list[SnapInfo]:
        rows = self.index.q("SELECT id, seq, uid, name, created FROM snapshots ORDER BY id")
        names: dict[str, int] = {}
        for _i, _s, _u, nm, _c in rows:
            if nm:
                names[nm] = names.get(nm, 0) + 1
        out = []
        uids = {u for _i, _s, u, _n, _c in rows}
        for i, seq, u, nm, c in rows:
            ok = nm and names[nm] == 1 and "/" not in nm and nm not in (".", "..")
            ok = ok and (nm == u or nm not in uids)
            out.append(SnapInfo(i, seq, u, nm, c, (nm if ok else u).encode()))
        return out

    def root_node(self, info: SnapInfo, uid: int, gid: int) -> SNode:
        ino = SNAPROOT_BASE + info.seq
        n = self.nodes.get(ino)
        if n is None:
            n = SNode(ino, stat.S_IFDIR | 0o555, int(info.created * 1e9), uid=uid, gid=gid)
            n.nlink = 2
            self.nodes[ino] = n
            self.roots[ino] = info.id
            self.members.setdefault(info.id, set()).add(ino)
        return n

    def snap_of_root(self, ino: int) -> int | None:
        return self.roots.get(ino)

    # -- loading one snapshot (worker thread) ----------------------------------------------
    def load_snapshot(self, snap_id: int, root: SNode) -> None:
        if snap_id in self.loaded:
            return
        seq = root.ino - SNAPROOT_BASE
        base = ENTRY_BASE + (seq << 32)
        members = self.members.setdefault(snap_id, set())
        rows = self.index.q(
            "SELECT id, path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link"
            " FROM entries WHERE snapshot=? ORDER BY path",
            (snap_id,),
        )
        rows.sort(key=lambda r: r[0])
        rank = {r[0]: i for i, r in enumerate(rows)}
        rows.sort(key=lambda r: r[1])
        groups: dict[int, list[int]] = {}
        for r in rows:
            if r[10] is not None:
                groups.setdefault(r[10], []).append(rank[r[0]])
        by_path: dict[str, SNode] = {"": root}
        root.children = {}
        for eid, path, typ, mode, mtime_ns, size, target, uid, gid, xattrs, link in rows:
            ino = base + (min(groups[link]) if link is not None else rank[eid])
            if typ == "d":
                fmt = stat.S_IFDIR
            elif typ == "l":
                fmt = stat.S_IFLNK
            else:
                fmt = stat.S_IFREG
            node = self.nodes.get(ino)
            if node is None:
                node = SNode(
                    ino,
                    fmt | (mode & 0o7777),
                    mtime_ns,
                    size=size,
                    uid=root.uid if uid is None else uid,
                    gid=root.gid if gid is None else gid,
                    target=target.encode("utf-8", "surrogateescape") if target else None,
                    xattrs={
                        k.encode("utf-8", "surrogateescape"): bytes.fromhex(v)
                        for k, v in json.loads(xattrs).items()
                    }
                    if xattrs
                    else {},
                    nlink=len(groups[link]) if link is not None else 1,
                    entry=eid if typ == "f" else None,
                )
                if typ == "l" and node.target is not None:
                    node.size = len(node.target)
                if typ == "d":
                    node.children = {}
                    node.nlink = 2
                self.nodes[ino] = node
                members.add(ino)
            by_path[path] = node
            parent_path, _, name = path.rpartition("/")
            parent = self._dir(by_path, parent_path, root, members)
            assert parent.children is not None
            parent.children[name.encode("utf-8", "surrogateescape")] = ino
            if typ == "d":
                parent.nlink += 1
        self.loaded.add(snap_id)

    def _dir(self, by_path: dict[str, SNode], path: str, root: SNode, members: set[int]) -> SNode:
        node = by_path.get(path)
        if node is not None and node.children is not None:
            return node
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(by_path, parent_path, root, members)
        self._synth += 1
        node = SNode(SYNTH_BASE + self._synth, stat.S_IFDIR | 0o555, root.mtime_ns)
        node.uid, node.gid, node.children, node.nlink = root.uid, root.gid, {}, 2
        self.nodes[node.ino] = node
        members.add(node.ino)
        by_path[path] = node
        assert parent.children is not None
        parent.children[name.encode("utf-8", "surrogateescape")] = node.ino
        return node

    def load_chunks(self, node: SNode) -> tuple[list[int], list[tuple[bytes, int]]]:
        """(start offsets, [(cid, length)]) of a snapshot file (worker thread)."""
        hit = self.chunk_maps.get(node.ino)
        if hit is not None:
            return hit
        rows = self.index.q(
            "SELECT c.cid, c.plain FROM entry_chunks e JOIN chunks c ON c.id = e.chunk"
            " WHERE e.entry=? ORDER BY e.seq",
            (node.entry,),
        )
        starts, pos = [], 0
        for _cid, n in rows:
            starts.append(pos)
            pos += n
        out = (starts, [(bytes(c), n) for c, n in rows])
        self.chunk_maps[node.ino] = out
        return out

    def forget_snapshot(self, snap_id: int) -> None:
        self.loaded.discard(snap_id)
        for ino in self.members.pop(snap_id, set()):
            self.nodes.pop(ino, None)
            self.roots.pop(ino, None)
            self.chunk_maps.pop(ino, None)


def read_snapshot_range(read_chunk, cmap, off: int, size: int) -> bytes:
    """Bytes [off, off+size) of a snapshot file given its chunk map (worker thread)."""
    starts, chunks = cmap
    out = bytearray()
    i = max(bisect.bisect_right(starts, off) - 1, 0)
    end = off + size
    while i < len(chunks) and starts[i] < end:
        cid, n = chunks[i]
        data = read_chunk(cid)
        lo = max(off - starts[i], 0)
        hi = min(end - starts[i], n)
        out += data[lo:hi]
        i += 1
    return bytes(out)
