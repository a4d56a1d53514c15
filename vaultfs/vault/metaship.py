"""Shipping the index as content-addressed blocks (docs/format.md 9; the format is
vaultfs/indexblocks.py).

One pass over a page-identical copy of the index (:meth:`Index.export_to`): every block that
may have changed since the last export is hashed, the others take their id (and place) from
the last shipping's block map, kept locally (vaultfs/index/exportmap.py: the pages the
write-ahead log names since then); a block whose id the sidecar (:class:`ShippedObjects`)
places in a meta segment the newest manifest names (and that has k shards left) is
referenced where it is, any other is sealed into a new meta segment. Then compaction, and
the block map's pages, sealed likewise when they changed. Cost: writing the changed pages
into the kept copy of the last export (the whole index when that copy or the map is lost or
stale), hashing the blocks that changed (all of them when the map is lost or stale), a loop
over the block map, plus sealing and coding what changed.

The records sealed go into meta segments padded to size classes (powers of two, as data
segments: remotes see a handful of sizes). Just over a class, padding would double the
upload, so before the map pages the records that fit in the class below are closed as a
segment of that class and the rest start the next (:meth:`_Packer.split`, which counts the
map pages that change, not every page of the map): at 4 GiB, a commit after a 1 MiB change
seals 1.09 MiB, shipped as 1 MiB + 256 KiB instead of 2 MiB.

Compaction keeps the meta segments a manifest names bounded: a segment whose objects still in
use fill less than half a full segment is *sparse*; while more than :data:`SPARSE_KEPT` are
sparse, the live objects of the sparsest are sealed again into this commit's segments, at most
:data:`COMPACT_BUDGET` bytes of records per commit. A segment no kept manifest names is
garbage (:meth:`UploadQueue.prune_index_copies`).

The copy records the meta segments of earlier shippings, not those written from it: a
commit that wrote more than :data:`SETTLE_AFTER` records them and ships a second time
(``earlier``), so that the next commit does not carry their rows.

Past :data:`ONE_LEVEL_MAX` bytes of one-level description, the committer adds the second
level (:func:`ship_second_level`, docs/format.md 9.2): the map pages and the segment
descriptors listed in pages that are index objects themselves, which the manifest names.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .. import indexblocks, segment
from ..index import Index, exportmap, manifests
from ..index import segments as seg_table
from ..index.exportmap import Export
from ..index.segments import NewShard
from ..index.shipped import ShippedObjects
from ..indexblocks import ENTRY, MAP_FANOUT, Location
from ..keys import VaultKeys
from ..manifest import IndexSegment, MapPage, encode_segment_page

#: Most bytes of JSON a manifest's one-level index description (its meta segments and map
#: pages, docs/format.md 10.2) may take; past it the writer uses two levels (9.2). A quarter
#: of :data:`manifest.MAX_BYTES` (near a 1 GiB index, ~60 GiB of data), so that the body
#: stays far below the bound that readers enforce.
ONE_LEVEL_MAX = 256 << 10
#: Descriptors per second-level segment page (~750 bytes of JSON each at 3-of-5).
SEGMENT_PAGE_FANOUT = MAP_FANOUT
#: Sparse meta segments a manifest may name before compaction starts.
SPARSE_KEPT = 16
#: New meta segments past which a commit ships the index a second time, once it has recorded
#: them (:func:`ship`'s ``earlier``). Each adds n shard rows and n audit tags (~30 KiB at
#: 3-of-5) to the index; shipped by the next commit instead, the ~65 segments of a 16 GiB
#: backup's index doubled a 1 MiB commit's upload (10.2 MiB). A second pass costs another
#: copy and hash of the index, small beside a commit that wrote that much; steady commits
#: write one or two segments and never pay it.
SETTLE_AFTER = 4
#: Most bytes of one sealed map page (128 entries, the record's salt, commitment, tag and
#: compression frame): what the packer reserves for the pages still to come.
MAP_PAGE_RECORD = MAP_FANOUT * ENTRY.size + 512


@dataclass
class ShipStats:
    """What one shipping of the index cost, in index objects and record bytes."""

    blocks: int = 0  # blocks of the shipped file
    hashed_blocks: int = 0  # blocks read and hashed (the others: unchanged since the last export)
    #: pages the export wrote into the kept copy of the last one; None: it copied the whole
    #: index (no valid copy or map), or was not told (:meth:`Index.export_to`)
    copied_pages: int | None = None
    sealed_blocks: int = 0  # blocks sealed by this shipping (new or changed ones)
    map_pages: int = 0
    sealed_map_pages: int = 0
    recopied: int = 0  # objects sealed again by compaction
    sealed_bytes: int = 0  # bytes of records written into new meta segments (before coding)
    segments: int = 0  # new meta segments
    settled: ShipStats | None = None  # the second pass that recorded them (:data:`SETTLE_AFTER`)


@dataclass
class NewMetaSegment:
    """A meta segment this shipping wrote: durable in the queue, not yet in the index."""

    seg_id: int
    uid: bytes
    used: int
    size: int
    rows: list[NewShard]
    root: bytes


@dataclass
class Shipment:
    """The result of :func:`ship`: what the manifest names and what to record."""

    length: int  # bytes of the shipped file
    pages: list[MapPage]  # the block map, in order
    named: list[int]  # ids of the already recorded meta segments the objects are in
    new: list[NewMetaSegment]  # meta segments written now (to record, then name)
    sealed: dict[bytes, Location] = field(default_factory=dict)  # for the sidecar
    stats: ShipStats = field(default_factory=ShipStats)
    entries: bytes = b""  # the block map, ENTRY.size bytes per block (for the export map)


class _Packer:
    """Packs sealed records back to back into meta segments of at most ``segment_size``
    bytes, writing each one's shards to the queue when it is full (memory: one segment)."""

    def __init__(
        self, segment_size: int, write: Callable[[bytes, bytes], tuple[int, list[NewShard], bytes]]
    ) -> None:
        self.segment_size = segment_size
        self.write = write
        self.buf = bytearray()
        self.ends: list[int] = []  # where each record in buf ends
        self.uid = secrets.token_bytes(16)
        self.done: list[NewMetaSegment] = []
        self.limit = segment_size  # bytes the segment being filled may hold (:meth:`split`)

    def add(self, record: bytes) -> Location:
        if len(self.buf) + len(record) > self.limit:
            self.close()
        loc = Location(self.uid, len(self.buf), len(record))
        self.buf += record
        self.ends.append(len(self.buf))
        return loc

    def split(self, more: int) -> tuple[bytes, int, bytes] | None:
        """Before about ``more`` further bytes of records: if the segment being filled would
        be padded to a size class much larger than it holds (1.03 MiB of records is padded to
        2 MiB, and every byte is uploaded n/k times), write the records that fit in the size
        class just below as a segment of that class now, and keep the rest (moved to a new
        segment, which the further records join) when the two classes add up to less. Both stay in the size classes, so remotes learn nothing more.
        When every record fits in the class below, none moves: the further records fill this
        segment up to that class and the rest start the next one.
        Returns (old uid, cut offset, new uid) when records moved: a record at ``offset >=
        cut`` of the old uid is now at ``offset - cut`` of the new one."""
        used = len(self.buf)
        whole = segment.size_class(used + more, self.segment_size)
        below = whole // 2
        if below < segment.MIN_SEGMENT or used + more <= below:
            return None
        cut = max((e for e in self.ends if e <= below), default=0)
        rest = used + more - (below if cut == used else cut)
        if not cut or below + segment.size_class(rest, self.segment_size) >= whole:
            return None
        if cut == used:
            self.limit = below
            return None
        old = self.uid
        tail, tail_ends = bytes(self.buf[cut:]), [e - cut for e in self.ends if e > cut]
        del self.buf[cut:]
        self.close()
        if not tail:  # every record fitted: the pages start the next segment
            return None
        self.buf, self.ends = bytearray(tail), tail_ends
        return old, cut, self.uid

    def close(self) -> None:
        """Write the segment being filled, if it holds anything."""
        if not self.buf:
            return
        used = len(self.buf)
        padded = segment.pad(bytes(self.buf), segment.size_class(used, self.segment_size))
        seg_id, rows, root = self.write(self.uid, padded)
        self.done.append(NewMetaSegment(seg_id, self.uid, used, len(padded), rows, root))
        self.buf, self.ends = bytearray(), []
        self.uid = secrets.token_bytes(16)
        self.limit = self.segment_size


def ship(
    index: Index,
    keys: VaultKeys,
    suite: int,
    segment_size: int,
    export: Path,
    shipped: ShippedObjects,
    write: Callable[[bytes, bytes], tuple[int, list[NewShard], bytes]],
    earlier: Shipment | None = None,
    exported: Export | None = None,
) -> Shipment:
    """Ship the index copy at ``export``: seal the objects the remotes lack into new meta
    segments (``write(uid, padded segment)`` codes and queues one, returning (segment id,
    shard rows, root)) and return the block map and the segments it needs. The caller records
    the new segments, then the manifest naming ``named`` and the new ones, then the sidecar.

    ``earlier``: a shipping of this same commit whose new segments are recorded (in the copy
    at ``export``) but named by no manifest yet; its records are reused like those of the
    newest manifest's segments, and ``named`` lists those of its segments that hold any.

    ``exported``: what :meth:`Index.export_to` reported about the copy; a block it shows
    unchanged since the last export takes its id (and, in a segment still named, its place)
    from the last shipping's block map instead of being read and hashed."""
    key, vid, block = keys.metadata_key, keys.vault_id, indexblocks.BLOCK_SIZE
    stats = ShipStats(copied_pages=None if exported is None else exported.patched)
    reusable = seg_table.meta_named_by(index, manifests.newest_seq(index))
    prior: dict[bytes, Location] = {}
    if earlier is not None:
        reusable |= {m.uid: (m.seg_id, m.used) for m in earlier.new}
        prior = earlier.sealed
    packer = _Packer(segment_size, write)
    sealed: dict[bytes, Location] = {}
    live: dict[bytes, int] = {}  # uid -> bytes of records still in use
    counted: set[bytes] = set()
    entries = bytearray()  # the block map, ENTRY.size bytes per block

    def seal(oid: bytes, data: bytes) -> Location:
        record = indexblocks.seal(key, vid, oid, data, suite)
        stats.sealed_bytes += len(record)
        sealed[oid] = loc = packer.add(record)
        return loc

    length = export.stat().st_size
    same = _unchanged_blocks(exported, key, suite, length) if exported is not None else None
    with shipped.reader(suite) as look, export.open("rb") as f:

        def placed(oid: bytes) -> Location | None:
            """Where an earlier commit, or this one's earlier pass, sealed object ``oid``."""
            return prior.get(oid) or look.get(oid)

        def read(i: int) -> bytes:
            f.seek(i * block)
            return f.read(block)

        if same is not None:  # the few blocks to hash: from the disk together, not one by one
            for i in range(indexblocks.block_count(length, block)):
                if same(i) is None:
                    os.posix_fadvise(f.fileno(), i * block, block, os.POSIX_FADV_WILLNEED)

        for i in range(indexblocks.block_count(length, block)):
            stats.blocks += 1
            data: bytes | None = None
            if same is not None and (known := same(i)) is not None:
                oid, loc = known
                if loc is not None and loc.uid in reusable and oid not in sealed:
                    if oid not in counted:
                        counted.add(oid)
                        live[loc.uid] = live.get(loc.uid, 0) + loc.length
                    entries += ENTRY.pack(oid, loc.uid, loc.offset, loc.length)
                    continue
            else:
                data = read(i)
                oid = indexblocks.object_id(key, data)
                stats.hashed_blocks += 1
            loc = sealed.get(oid)
            if loc is None:
                loc = placed(oid)
                if loc is None or loc.uid not in reusable:
                    loc = seal(oid, data if data is not None else read(i))
                    stats.sealed_blocks += 1
                elif oid not in counted:
                    counted.add(oid)
                    live[loc.uid] = live.get(loc.uid, 0) + loc.length
            entries += ENTRY.pack(oid, loc.uid, loc.offset, loc.length)
        moved = _sparse_to_move(live, segment_size)
        if moved:
            stats.recopied = _recopy(entries, moved, f, block, seal)

        def page_ids() -> Iterator[tuple[bytes, bytes]]:
            """(id, bytes) of each page of the block map, in order."""
            for p in range(0, len(entries), MAP_FANOUT * ENTRY.size):
                raw = bytes(entries[p : p + MAP_FANOUT * ENTRY.size])
                yield indexblocks.object_id(key, raw), raw

        def kept(oid: bytes) -> Location | None:
            """Where map page ``oid`` is sealed already and stays; None: seal it now."""
            loc = sealed.get(oid)
            if loc is None:
                loc = placed(oid)
                if loc is None or loc.uid not in reusable or loc.uid in moved:
                    return None
            return loc

        # the pages to seal, counted (a page that changes holds a block sealed now, so moving
        # records in the split changes no other): bounding them by every page of the map
        # grew with the vault, and at 16 GiB (97 pages) kept a commit's 1.14 MiB of records
        # from being split (2 MiB padded, 6.85 MiB uploaded; split, 5.60 MiB)
        fresh = sum(kept(oid) is None for oid, _raw in page_ids())
        if (cut := packer.split(fresh * MAP_PAGE_RECORD)) is not None:
            _relocate(entries, sealed, *cut)
        pages: list[MapPage] = []
        for oid, raw in page_ids():
            loc = kept(oid)
            if loc is None:
                loc = seal(oid, raw)
                stats.sealed_map_pages += 1
            pages.append(MapPage(oid, loc.uid, loc.offset, loc.length))
    packer.close()
    uids = {uid for (_oid, uid, _o, _l) in ENTRY.iter_unpack(entries)} | {p.uid for p in pages}
    stats.map_pages, stats.segments = len(pages), len(packer.done)
    named = sorted(reusable[u][0] for u in uids if u in reusable)
    return Shipment(length, pages, named, packer.done, sealed, stats, bytes(entries))


def key_id(metadata_key: bytes) -> bytes:
    """Which metadata key the ids of an export map are under: the id of an empty object."""
    return indexblocks.object_id(metadata_key, b"")


def _unchanged_blocks(
    exported: Export, metadata_key: bytes, suite: int, length: int
) -> Callable[[int], tuple[bytes, Location | None] | None] | None:
    """For the copy ``exported`` describes: a function giving, for a block that has the
    bytes it had in the last export, its id and (when sealed under ``suite``) where the last
    shipping put it; None for a block that may have changed. None when the last export's
    map is not known to describe the copy (:mod:`vaultfs.index.exportmap`): every block is
    hashed."""
    m = exported.prior
    block = indexblocks.BLOCK_SIZE
    if m is None or m.block_size != block or m.key_id != key_id(metadata_key):
        return None
    changed = exportmap.changed_blocks(
        set(exported.changed), exported.page_size, block, m.length, length
    )
    entries, count = m.entries, len(m.entries) // ENTRY.size
    where = m.suite == suite

    def same(i: int) -> tuple[bytes, Location | None] | None:
        if i in changed or i >= count:
            return None
        oid, uid, off, n = ENTRY.unpack_from(entries, i * ENTRY.size)
        return oid, Location(uid, off, n) if where else None

    return same


def _relocate(
    entries: bytearray, sealed: dict[bytes, Location], old: bytes, cut: int, new: bytes
) -> None:
    """Point the map entries and the sidecar rows of the records :meth:`_Packer.split`
    moved (offset >= ``cut`` in segment ``old``) at their place in segment ``new``."""

    def moved(loc: Location) -> Location | None:
        if loc.uid != old or loc.offset < cut:
            return None
        return Location(new, loc.offset - cut, loc.length)

    for i, (oid, uid, off, length) in enumerate(ENTRY.iter_unpack(bytes(entries))):
        if (loc := moved(Location(uid, off, length))) is not None:
            ENTRY.pack_into(entries, i * ENTRY.size, oid, loc.uid, loc.offset, loc.length)
    for oid, loc in list(sealed.items()):
        if (to := moved(loc)) is not None:
            sealed[oid] = to


def _sparse_to_move(live: dict[bytes, int], segment_size: int) -> set[bytes]:
    """The sparse segments (see the module docstring) whose objects this commit seals again,
    sparsest first, within the budget; none while at most :data:`SPARSE_KEPT` are sparse."""
    sparse = sorted((n, uid) for uid, n in live.items() if n < segment_size // 2)
    moved: set[bytes] = set()
    budget = segment_size // 2
    for n, uid in sparse[: max(0, len(sparse) - SPARSE_KEPT)]:
        if n > budget:
            break
        moved.add(uid)
        budget -= n
    return moved


def _recopy(
    entries: bytearray,
    moved: set[bytes],
    f: BinaryIO,
    block: int,
    seal: Callable[[bytes, bytes], Location],
) -> int:
    """Seal again every block whose record is in a ``moved`` segment (read back from the
    export ``f``) and point its map entries at the new record. Returns objects sealed."""
    again: dict[bytes, Location] = {}
    for i, (oid, uid, _off, _len) in enumerate(ENTRY.iter_unpack(bytes(entries))):
        if uid not in moved:
            continue
        loc = again.get(oid)
        if loc is None:
            f.seek(i * block)
            loc = again[oid] = seal(oid, f.read(block))
        ENTRY.pack_into(entries, i * ENTRY.size, oid, loc.uid, loc.offset, loc.length)
    return len(again)


@dataclass
class SecondLevel:
    """The result of :func:`ship_second_level`: what a two-level manifest names."""

    map2: list[MapPage]  # the pages listing the map pages, in order
    segment_pages: list[MapPage]  # the pages listing the meta segments of the index
    named: list[int]  # ids of recorded meta segments holding pages reused from them
    new: list[NewMetaSegment]  # meta segments written now, holding the pages sealed now
    sealed: dict[bytes, Location] = field(default_factory=dict)  # for the sidecar


def ship_second_level(
    index: Index,
    keys: VaultKeys,
    suite: int,
    segment_size: int,
    pages: list[MapPage],
    segments: list[IndexSegment],
    shipped: ShippedObjects,
    write: Callable[[bytes, bytes], tuple[int, list[NewShard], bytes]],
) -> SecondLevel:
    """The second level (docs/format.md 9.2) over the block map ``pages`` and the meta
    ``segments`` holding the blocks and map pages (in segment id order, so that a commit
    mostly appends and changes only the last segment page): pages of :data:`MAP_FANOUT`
    map-page entries and pages of :data:`SEGMENT_PAGE_FANOUT` descriptors, each an index
    object. A page the newest manifest's segments already hold unchanged is referenced
    there, any other is sealed into new meta segments of its own (so that the segment
    pages never have to list the segments holding them); once pages would be reused from
    more than :data:`SPARSE_KEPT` segments, every page is sealed again, which keeps the
    segments the manifest names directly bounded."""
    key, vid = keys.metadata_key, keys.vault_id
    reusable = seg_table.meta_named_by(index, manifests.newest_seq(index))
    objects = [_map2_page(pages[i : i + MAP_FANOUT]) for i in range(0, len(pages), MAP_FANOUT)]
    nmaps = len(objects)
    objects += [
        encode_segment_page(segments[i : i + SEGMENT_PAGE_FANOUT])
        for i in range(0, len(segments), SEGMENT_PAGE_FANOUT)
    ]
    ids = [indexblocks.object_id(key, raw) for raw in objects]
    with shipped.reader(suite) as look:
        found = {oid: look.get(oid) for oid in ids}
    kept = {oid: loc for oid, loc in found.items() if loc is not None and loc.uid in reusable}
    if len({loc.uid for loc in kept.values()}) > SPARSE_KEPT:
        kept = {}
    packer = _Packer(segment_size, write)
    sealed: dict[bytes, Location] = {}
    out: list[MapPage] = []
    for oid, raw in zip(ids, objects, strict=True):
        loc = kept.get(oid) or sealed.get(oid)
        if loc is None:
            loc = sealed[oid] = packer.add(indexblocks.seal(key, vid, oid, raw, suite))
        out.append(MapPage(oid, loc.uid, loc.offset, loc.length))
    packer.close()
    named = sorted({reusable[loc.uid][0] for loc in kept.values()})
    return SecondLevel(out[:nmaps], out[nmaps:], named, packer.done, sealed)


def _map2_page(pages: list[MapPage]) -> bytes:
    """The plaintext of a second-level map page: the map pages' entries, as in a map page."""
    return indexblocks.encode_map_page([(p.id, Location(p.uid, p.offset, p.length)) for p in pages])
