"""The shipped index as content-addressed blocks (docs/format.md, section 9).

The SQLite index file is cut into blocks of :data:`BLOCK_SIZE` bytes (the last may be
shorter). Each block is an **index object**, named by its id
``BLAKE3_keyed(metadata key, ID_PREFIX ‖ bytes)`` and sealed as a metadata record of kind
``"index-block" ‖ id`` (section 5). The **block map** lists, for every block in file order,
where its record is: ``id (32) ‖ segment uid (16) ‖ offset (4) ‖ length (4)``. The map is cut
into map pages of :data:`MAP_FANOUT` entries; a map page is an index object too (same id rule,
same record kind), and the signed manifest names the map pages with their locations.

Every sealed message is therefore bounded (one block, or one map page of 7 KiB), and an
unchanged block keeps its id from one commit to the next, so a commit seals only the blocks
that changed (and the map pages that list them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from . import envelope
from .errors import IntegrityError

#: Bytes per index block. Measured (docs/benchmarks.md, "lifetime"): a 1 MiB change dirties
#: about 60 scattered 4 KiB SQLite pages (random-key indexes: chunks.cid, shards.name,
#: audit_tags.name); 16 KiB blocks keep that near 1 MiB sealed, while smaller blocks grow the
#: map faster than they shrink the blocks.
BLOCK_SIZE = 16 << 10
#: Map entries per map page (7 KiB of plaintext).
MAP_FANOUT = 128
#: Domain prefix of index object ids under the metadata key.
ID_PREFIX = b"vaultfs/v1/index-object"
#: A map entry: object id, segment uid, offset of its record in the segment, record length.
ENTRY = struct.Struct(">32s16sII")
assert ENTRY.size == 56


@dataclass(frozen=True)
class Location:
    """Where an index object's record is: meta segment ``uid``, bytes [offset, offset+length)."""

    uid: bytes
    offset: int
    length: int


def object_id(metadata_key: bytes, data: bytes | memoryview) -> bytes:
    """The content id of an index object (a block or a map page)."""
    h = blake3.blake3(ID_PREFIX, key=metadata_key)
    h.update(data)
    return h.digest()


def record_kind(oid: bytes) -> bytes:
    """The metadata record kind of index object ``oid`` (section 5)."""
    return b"index-block" + oid


def seal(metadata_key: bytes, vault_id: bytes, oid: bytes, data: bytes, suite: int) -> bytes:
    """The record of index object ``oid`` holding ``data``."""
    return envelope.seal_meta(metadata_key, vault_id, record_kind(oid), data, suite)


def open_record(
    metadata_key: bytes, vault_id: bytes, oid: bytes, record: bytes, suite: int
) -> bytes:
    """Open the record of index object ``oid`` and check that its content has that id.
    Raises :class:`IntegrityError`."""
    data = envelope.open_meta(metadata_key, vault_id, record_kind(oid), record, suite)
    if object_id(metadata_key, data) != oid:
        raise IntegrityError(f"index object {oid.hex()[:16]}… does not hash to its id")
    return data


def encode_map_page(entries: list[tuple[bytes, Location]]) -> bytes:
    """The plaintext of a map page listing ``entries`` (object id, location) in order."""
    return b"".join(ENTRY.pack(oid, loc.uid, loc.offset, loc.length) for oid, loc in entries)


def decode_map_page(data: bytes) -> list[tuple[bytes, Location]]:
    """The (object id, location) entries of a map page. Raises :class:`IntegrityError`."""
    if len(data) % ENTRY.size or not data:
        raise IntegrityError(f"index map page of {len(data)} bytes is not whole entries")
    return [(oid, Location(uid, off, length)) for oid, uid, off, length in ENTRY.iter_unpack(data)]


def map_entry(data: bytes, at: int) -> tuple[bytes, Location]:
    """Entry ``at`` of the map page ``data`` (whole entries, as :func:`decode_map_page`
    checks): a page kept as its bytes costs 7 KiB, decoded into objects ~40 KiB."""
    oid, uid, off, length = ENTRY.unpack_from(data, at * ENTRY.size)
    return oid, Location(uid, off, length)


def block_count(length: int, block_size: int) -> int:
    """How many blocks a file of ``length`` bytes has (a last short block counts)."""
    return -(-length // block_size)


def map_pages(length: int, block_size: int) -> int:
    """How many map pages list the blocks of a file of ``length`` bytes."""
    return -(-block_count(length, block_size) // MAP_FANOUT)
