"""Audit tags: keyed BLAKE3 tags of 2 KiB pieces of stored (whitened) shard objects
(docs/format.md, "Audits"). Stored objects cannot be regenerated from other shards without
the audit key (docs/format.md 7.1), so a piece that matches its tag was kept by the remote
that serves it.

tag(block b, piece j) = BLAKE3-keyed(audit key, "vaultfs/v1/audit-tag" ‖ leaf_b ‖ b (4) ‖ j (2)
                                     ‖ piece bytes)[:8]

``leaf_b`` is the Merkle leaf of block ``b`` (merkle.py), so a tag binds the piece's bytes to
its place in the shard and to the shard's Merkle tree; ``b`` and ``j`` are big-endian. Pieces
are :data:`PIECE` bytes, cut per 64 KiB Merkle block (the last piece of a block, and the only
piece of an empty object, may be shorter). A shard's tags are stored block-major as one byte
string in the local index (``audit_tags``); they never leave the client. The sealers compute
them for every shard object written; ``vaultfs verify`` checks ranged reads against them.
"""

from __future__ import annotations

import struct

import blake3

from .merkle import BLOCK_SIZE

PIECE = 2048  # 459 challenges read ~0.9 MiB: under 2% of a remote holding >= 46 MiB
TAG_LEN = 8
TAG_LABEL = b"vaultfs/v1/audit-tag"
_PIECE_ID = struct.Struct(">IH")


def tagger(audit_key: bytes) -> blake3.blake3:
    """The keyed hash state every tag of one vault starts from (pass it to :func:`piece_tag`)."""
    return blake3.blake3(TAG_LABEL, key=audit_key)


def piece_tag(base: blake3.blake3, leaf: bytes, block: int, piece: int, data: bytes) -> bytes:
    """Tag of piece ``piece`` of block ``block`` (whose Merkle leaf is ``leaf``); ``base``
    from :func:`tagger`."""
    h = base.copy()
    h.update(leaf + _PIECE_ID.pack(block, piece))
    h.update(data)
    return h.digest(length=TAG_LEN)


def piece_tags(audit_key: bytes, body: bytes, leaves: bytes, piece: int = PIECE) -> bytes:
    """All tags of a shard object ``body`` whose Merkle leaves are ``leaves`` (32 bytes each),
    block-major (see index.SCHEMA, audit_tags).

    Same bytes as :func:`piece_tag` for every piece, inlined: this runs for every byte
    written, so it avoids a copy and a call per piece."""
    base = tagger(audit_key)
    mv = memoryview(body)
    pack = _PIECE_ID.pack
    out = bytearray()
    for b, boff in enumerate(range(0, max(len(body), 1), BLOCK_SIZE)):
        leaf = leaves[32 * b : 32 * b + 32]
        end = min(boff + BLOCK_SIZE, len(body))
        for j, poff in enumerate(range(boff, max(end, boff + 1), piece)):
            h = base.copy()
            h.update(leaf + pack(b, j))
            h.update(mv[poff : min(poff + piece, end)])
            out += h.digest(length=TAG_LEN)
    return bytes(out)


def stored_tag(tags: bytes, block: int, piece: int) -> bytes:
    """The tag of (``block``, ``piece``) inside a shard's :func:`piece_tags` string (every
    block but the last has ``BLOCK_SIZE // PIECE`` pieces)."""
    t = (block * (BLOCK_SIZE // PIECE) + piece) * TAG_LEN
    return tags[t : t + TAG_LEN]
