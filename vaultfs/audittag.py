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

:func:`piece_tags` runs in native code when ``scripts/build-native`` has built it (the BLAKE3
team's C implementation, hashing eight pieces at a time: ~4x faster than one Python call a
piece, and it releases the GIL); otherwise, or with ``VAULTFS_NATIVE=0``, in Python
(:func:`piece_tags_py`, the reference). Both give the same bytes: tests/test_audittag.py.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import blake3

from .merkle import BLOCK_SIZE

PIECE = 2048  # 459 challenges read ~0.9 MiB: under 2% of a remote holding >= 46 MiB
TAG_LEN = 8
TAG_LABEL = b"vaultfs/v1/audit-tag"
_PIECE_ID = struct.Struct(">IH")
#: bytes of a tag's message before the piece: label, leaf, block and piece numbers
_HEAD_LEN = len(TAG_LABEL) + 32 + _PIECE_ID.size


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


def piece_tags(
    audit_key: bytes, body: bytes | bytearray, leaves: bytes, piece: int = PIECE
) -> bytes:
    """All tags of a shard object ``body`` whose Merkle leaves are ``leaves`` (32 bytes each),
    block-major (see index.SCHEMA, audit_tags): :func:`piece_tag` of every piece, in native
    code when it is built (module docstring), else :func:`piece_tags_py`."""
    native = _native()
    if native is None:
        return piece_tags_py(audit_key, body, leaves, piece)
    return native(audit_key, body, leaves, piece)


def piece_tags_py(
    audit_key: bytes, body: bytes | bytearray, leaves: bytes, piece: int = PIECE
) -> bytes:
    """:func:`piece_tags` in Python: the reference the native code is checked against.

    Same bytes as :func:`piece_tag` for every piece. This runs for every byte a sealer
    writes (about a fifth of its CPU), so the per-piece Python is cut to a minimum: each
    piece's whole message (label, leaf, position, bytes) is laid out in one buffer (one
    copy of ``body``), and one keyed hasher is reset between pieces instead of copying a
    state and feeding it twice: 2.2 instead of 3.3 µs a piece, 1.8 of them hashing."""
    n = len(body)
    mv = memoryview(body)
    pack = _PIECE_ID.pack
    parts: list[bytes | memoryview] = []
    ends: list[int] = []  # where each piece's message ends in the joined buffer
    pos = 0
    for b, boff in enumerate(range(0, max(n, 1), BLOCK_SIZE)):
        head = TAG_LABEL + leaves[32 * b : 32 * b + 32]
        end = min(boff + BLOCK_SIZE, n)
        for j, poff in enumerate(range(boff, max(end, boff + 1), piece)):
            pend = poff + piece if poff + piece < end else end
            parts += (head + pack(b, j), mv[poff:pend])
            pos += _HEAD_LEN + pend - poff
            ends.append(pos)
    messages = memoryview(b"".join(parts))
    h = blake3.blake3(key=audit_key)
    update, digest, reset = h.update, h.digest, h.reset
    out: list[bytes] = []
    start = 0
    for stop in ends:
        update(messages[start:stop])
        out.append(digest(TAG_LEN))
        reset()
        start = stop
    return b"".join(out)


def stored_tag(tags: bytes, block: int, piece: int) -> bytes:
    """The tag of (``block``, ``piece``) inside a shard's :func:`piece_tags` string (every
    block but the last has ``BLOCK_SIZE // PIECE`` pieces)."""
    t = (block * (BLOCK_SIZE // PIECE) + piece) * TAG_LEN
    return tags[t : t + TAG_LEN]


#: Where scripts/build-native puts the library (inside the venv, like the other built parts).
NATIVE_LIB = Path(sys.prefix) / "opt" / "vaultfs-native" / "libvaultfs_tags.so"
_NativeFn = Callable[[bytes, "bytes | bytearray", bytes, int], bytes]
_loaded: list[_NativeFn | None] = []  # [] until the first call looks


def _native() -> _NativeFn | None:
    """The native :func:`piece_tags`, or None (not built, ``VAULTFS_NATIVE=0``, or it fails
    its check on a fixed vector against :func:`piece_tags_py` — then it is never used)."""
    if not _loaded:
        _loaded.append(_load_native())
    return _loaded[0]


def native_available() -> bool:
    """Whether :func:`piece_tags` runs in native code in this process."""
    return _native() is not None


def _load_native() -> _NativeFn | None:
    if os.environ.get("VAULTFS_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(NATIVE_LIB))
    except OSError:
        return None
    count = lib.vaultfs_piece_tag_count
    count.argtypes = [ctypes.c_size_t] * 3
    count.restype = ctypes.c_size_t
    tags = lib.vaultfs_piece_tags
    tags.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
    ]  # fmt: skip
    tags.restype = ctypes.c_size_t

    def native(audit_key: bytes, body: bytes | bytearray, leaves: bytes, piece: int) -> bytes:
        n = len(body)
        if len(audit_key) != 32 or len(leaves) < 32 * max(1, -(-n // BLOCK_SIZE)):
            raise ValueError("piece_tags: a 32-byte key and one 32-byte leaf a block")
        want = count(n, BLOCK_SIZE, piece)
        out = ctypes.create_string_buffer(want * TAG_LEN)
        # no copy of the body: a bytes object's buffer as it is, a writable one in place
        src: bytes | ctypes.Array[ctypes.c_char]
        try:
            src = body if isinstance(body, bytes) else (ctypes.c_char * n).from_buffer(body)
        except TypeError:  # a read-only view
            src = bytes(body)
        got = tags(
            audit_key, TAG_LABEL, len(TAG_LABEL), src, n, bytes(leaves), BLOCK_SIZE, piece,
            out, TAG_LEN,
        )  # fmt: skip
        if got != want:
            raise ValueError(f"piece_tags: piece size {piece} is not one the tags take")
        return out.raw

    # a fixed vector through both: whole pieces, a short last piece, a second block
    body = bytes(range(256)) * (BLOCK_SIZE // 256 + 13)
    key = bytes(range(32))
    leaves = bytes(range(64))
    try:
        ok = native(key, body, leaves, PIECE) == piece_tags_py(key, body, leaves, PIECE)
    except (OSError, ValueError):
        ok = False
    if not ok:
        logging.getLogger(__name__).warning(
            "%s gives other audit tags than the Python reference: not used (rebuild it with "
            "scripts/build-native)",
            NATIVE_LIB,
        )
        return None
    return native
