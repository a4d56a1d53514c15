"""What the last export of the index held, kept locally so that the next commit hashes only
the blocks that may have changed (``<home>/index.db-exportmap``; vaultfs/vault/metaship.py),
and copies only the pages that may have changed into the last export itself, kept beside it
(``<home>/index.db-export``, :meth:`Index.export_to`).

The index connection runs with SQLite's automatic checkpoints off (:class:`Index`), so a page
written since the last export is, when the next export checkpoints the write-ahead log, a
frame of that log (whose 24-byte frame headers name the pages: :func:`wal_pages`), or, when
the log was emptied in between by the index itself (closing it, or a log past
``WAL_FOLD_BYTES``), in the map's ``carried`` pages, which that fold records durably before
its checkpoint. The export's own ``queued -> placed`` update is run in the copy's log too, so
its pages are known; they differ between the file and its copy, so the map carries them to
the next export as well. A block none of whose pages is among these has the bytes, and so
the id, it had in the last export. With the kept copy valid, the fold keeps carried only the
pages that then differ from it, and the export counts as changed only the named pages that
differ from it: the copy is the last export, byte for byte.

It is a cache, never the truth. The map counts only while the index file is the one it
stamped (inode, size, modification and change times, taken after every checkpoint the index
runs itself), with the page size, the metadata key (by the id of an empty object) and the
block size the commit uses; locations in it count only under the same suite and, as the
sidecar's, only in segments the newest manifest names. A lost, torn (its BLAKE3 digest is
checked) or stale map, a log that grew while it was read, or an index file written any other
way (a checkpoint by another program, a restored copy, ``home rebuild``'s new home) costs one
commit that hashes every block. The kept copy of the export counts only while the map is
valid and the copy is the file it stamped (``copy``, taken once the export renamed it into
place); else the next export copies the whole index file again. Local only: nothing here
reaches the remotes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..indexblocks import ENTRY

_MAGIC = b"vaultfs-expmap-2"
#: magic, stamp of the index file (inode, size, mtime_ns, ctime_ns), stamp of the kept copy
#: of the export, page size, block size, suite, export length, key fingerprint, carried
#: pages, map entries
_HEAD = struct.Struct(">16sQQqqQQqqIIIQ32sII")
_PAGE = struct.Struct(">I")
_WAL_HEADER = struct.Struct(">IIIIII")  # magic, version, page size, checkpoint seq, salts
_WAL_MAGIC = (0x377F0682, 0x377F0683)
_FRAME = struct.Struct(">IIII")  # page number, size after commit, salts (then checksums)
_FRAME_HEADER = 24

Stamp = tuple[int, int, int, int]


def stamp(path: Path) -> Stamp:
    """What identifies the state of the file at ``path``: inode, size, modification and
    change times. Any write to it changes one of them (to the file system's timestamp
    granularity)."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def wal_pages(wal: Path) -> set[int]:
    """The page numbers of the frames of the write-ahead log at ``wal`` that belong to its
    current generation (their salts are the header's), from the start to the first that
    does not: a superset of the committed frames' pages (a torn last transaction counts
    too). None when there is no log."""
    pages: set[int] = set()
    try:
        f = wal.open("rb")
    except FileNotFoundError:
        return pages
    with f:
        head = f.read(32)
        if len(head) < 32:
            return pages
        magic, _version, page_size, _seq, salt1, salt2 = _WAL_HEADER.unpack_from(head)
        if magic not in _WAL_MAGIC:
            return pages
        at, step = 32, _FRAME_HEADER + page_size
        while len(frame := f.read(_FRAME.size)) == _FRAME.size:
            pgno, _commit, s1, s2 = _FRAME.unpack(frame)
            if (s1, s2) != (salt1, salt2):
                break
            pages.add(pgno)
            at += step
            f.seek(at)
    return pages


@dataclass
class ExportMap:
    """The last export of the index: the file state it was taken from and its block map."""

    stamp: Stamp  # the index file right after the export's checkpoint (or a later fold's)
    copy: Stamp  # the kept copy of the export (Index.export_copy) as the export left it
    page_size: int
    block_size: int
    suite: int  # the suite the records ``entries`` locates were sealed under
    length: int  # bytes of the export
    key_id: bytes  # indexblocks.object_id(metadata key, b""): which key the ids are under
    carried: set[int]  # pages that may differ from the export though no log names them
    entries: bytes  # the export's block map (indexblocks.ENTRY per block, in order)

    def encode(self) -> bytes:
        body = b"".join(
            [
                _HEAD.pack(
                    _MAGIC,
                    *self.stamp,
                    *self.copy,
                    self.page_size,
                    self.block_size,
                    self.suite,
                    self.length,
                    self.key_id,
                    len(self.carried),
                    len(self.entries) // ENTRY.size,
                ),  # fmt: skip
                b"".join(_PAGE.pack(p) for p in sorted(self.carried)),
                self.entries,
            ]
        )
        return body + blake3.blake3(body).digest()

    @classmethod
    def decode(cls, raw: bytes) -> ExportMap | None:
        """The map ``raw`` encodes; None when it is torn or not a map."""
        body, digest = raw[:-32], raw[-32:]
        if len(body) < _HEAD.size or blake3.blake3(body).digest() != digest:
            return None
        head = _HEAD.unpack_from(body)
        magic, (ino, size, mtime, ctime), (c_ino, c_size, c_mtime, c_ctime) = (
            head[0],
            head[1:5],
            head[5:9],
        )
        page, block, suite, length, key_id, ncar, nent = head[9:]
        if magic != _MAGIC or len(body) != _HEAD.size + ncar * _PAGE.size + nent * ENTRY.size:
            return None
        at = _HEAD.size + ncar * _PAGE.size
        carried = {p for (p,) in _PAGE.iter_unpack(body[_HEAD.size : at])}
        return cls(
            (ino, size, mtime, ctime),
            (c_ino, c_size, c_mtime, c_ctime),
            page,
            block,
            suite,
            length,
            key_id,
            carried,
            body[at:],
        )


def load(path: Path) -> ExportMap | None:
    """The map at ``path``; None when there is none or it is torn."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return ExportMap.decode(raw)


def save(path: Path, m: ExportMap) -> None:
    """Replace the map at ``path`` with ``m``, durably (a fold's carried pages must be on
    disk before its checkpoint: a crash then leaves the old map or the new, never a torn one
    that decodes)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(m.encode())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def forget(path: Path) -> None:
    """Delete the map at ``path`` (the next export hashes every block)."""
    path.unlink(missing_ok=True)


def changed_blocks(
    pages: set[int], page_size: int, block_size: int, prior_length: int, length: int
) -> set[int]:
    """The blocks of an export of ``length`` bytes that may differ from those of the prior
    export of ``prior_length``: those holding one of ``pages`` (1-based) or page 1 (its
    header), those past the prior export's blocks, and the last one when the length
    changed (a last block of another length has another id)."""
    out = {0}
    for p in pages:
        first = (p - 1) * page_size
        out.update(range(first // block_size, (first + page_size - 1) // block_size + 1))
    nblocks = -(-length // block_size)
    prior_blocks = -(-prior_length // block_size)
    out.update(range(min(prior_blocks, nblocks), nblocks))
    if length != prior_length:
        out.update({prior_blocks - 1, nblocks - 1})
    return {b for b in out if b < nblocks}


@dataclass(frozen=True)
class Export:
    """What :meth:`Index.export_to` reports about the copy it wrote."""

    length: int  # bytes of the copy
    stamp: Stamp | None  # the index file right after the checkpoint; None: not known
    page_size: int
    touched: frozenset[int]  # pages the copy's own queued -> placed update wrote
    #: pages that may differ from the last export's (when ``prior`` is its valid map)
    changed: frozenset[int]
    prior: ExportMap | None  # the last export's map, when it still describes the file
    copy: Stamp  # the copy as the export left it (for the next map's ``copy``)
    patched: int | None  # pages written into the kept copy; None: the whole file was copied
