"""Segments (zero-padded containers of chunk records, in a few fixed sizes) and shard objects.

Shard object = 5-byte plain header ‖ whitened liberasurecode fragment (docs/format.md 7.1):

    offset size field
    0      4    magic "VFSH"
    4      1    format version
    5      ...  fragment XOR keystream (liberasurecode header of 80 bytes ‖ payload)

Everything else a reader needs (kind, erasure algorithm, k, n, fragment index, sizes, which
segment) comes from the index or the signed manifest, so the header links no object to
another. The keystream is AES-256-CTR under a key derived from the vault's audit key and the
object's identity (its name and fragment index, :func:`whitening_key`): k stored objects of a
segment no longer regenerate the other stored objects without the key, so an audit of a
remote's stored bytes proves that remote holds its own objects (docs/threat-model.md).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import erasure, merkle
from .errors import IntegrityError
from .keys import hkdf

SHARD_MAGIC = b"VFSH"
SHARD_VERSION = 2  # the on-remote format version (docs/format.md)
#: the plain header of every shard object: nothing in it tells two objects apart
HEADER = SHARD_MAGIC + bytes([SHARD_VERSION])
HEADER_SIZE = len(HEADER)
KIND_DATA = 1
KIND_META = 2
KIND_NAMES = {KIND_DATA: "data", KIND_META: "meta"}
#: HKDF label of the per-object whitening key (info = "vaultfs/v1/whiten" ‖ name ‖ idx)
WHITEN_LABEL = b"whiten"
_CTR_BLOCK = 16


@dataclass
class Shard:
    """A shard object as written: ``body`` is the stored (whitened) bytes, and ``hash``,
    ``blocks`` (Merkle leaves) and ``root`` are over those bytes."""

    idx: int
    name: str
    body: bytes | bytearray
    hash: bytes
    blocks: bytes
    root: bytes


#: bytes of a shard name's time prefix (unix seconds, big-endian, modulo 2**32)
NAME_TIME_BYTES = 4


def new_name(now: float | None = None) -> str:
    """A fresh shard object name: 32 lowercase hex digits, unique in the vault (docs/format.md
    2). The first 4 bytes are the unix time in seconds (``now``, default the clock), the other
    12 are random: names drawn later sort after earlier ones, so the rows a commit adds to the
    index's name-keyed B-trees (``shards.name``, ``audit_tags.name``) land on their last leaves
    instead of on a random leaf each (docs/benchmarks.md, "lifetime"). Uniqueness rests on the
    96 random bits alone; a clock that jumps back costs only that locality. Readers never
    parse a name."""
    seconds = int(time.time() if now is None else now) % (1 << (8 * NAME_TIME_BYTES))
    return seconds.to_bytes(NAME_TIME_BYTES, "big").hex() + secrets.token_hex(16 - NAME_TIME_BYTES)


def object_hash(body: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(body).digest()


def whitening_key(audit_key: bytes, name: str, idx: int) -> bytes:
    """The AES-256 key of object ``name`` (32 hex digits), fragment index ``idx``:
    HKDF(audit key, salt "vaultfs/v1", info "vaultfs/v1/whiten" ‖ name ‖ idx (1), 32)."""
    return hkdf(audit_key, WHITEN_LABEL + name.encode("ascii") + bytes([idx]), 32)


def whiten(
    audit_key: bytes, name: str, idx: int, data: bytes | memoryview, offset: int = 0
) -> bytes:
    """``data`` XOR the keystream of object (``name``, ``idx``) from fragment byte ``offset``
    on; the same call unwhitens. The keystream is AES-256-CTR under :func:`whitening_key`
    with the initial counter block 0 (128-bit big-endian), so any offset is reachable without
    computing what precedes it (range reads). CPU work: callers run it off the FUSE loop."""
    return _keystream(audit_key, name, idx, offset).update(data)


def _keystream(audit_key: bytes, name: str, idx: int, offset: int = 0):
    """The AES-256-CTR context of :func:`whiten`, advanced to fragment byte ``offset`` (a
    stream mode: ``update`` returns as many bytes as it is given, ``finalize`` none)."""
    block, skip = divmod(offset, _CTR_BLOCK)
    key = whitening_key(audit_key, name, idx)
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    if skip:
        enc.update(bytes(skip))
    return enc


def build_shards(
    segment: bytes, k: int, n: int, audit_key: bytes, alg: int | None = None
) -> list[Shard]:
    """Erasure-code a padded segment and store each fragment, whitened under a fresh name,
    as a shard object (with its hash and Merkle leaves over the stored bytes)."""
    alg = alg or erasure.choose_alg(k, n)
    return [
        stored_shard(i, new_name(), frag, audit_key)
        for i, frag in enumerate(erasure.encode(segment, k, n, alg))
    ]


def stored_object(idx: int, name: str, fragment: bytes, audit_key: bytes) -> bytearray:
    """The stored bytes of fragment ``idx`` as object ``name``: header ‖ whitened fragment.
    The keystream is applied straight into the object's one buffer (no ciphertext to copy
    behind the header: a fifth of the object's whitening time, measured on 1.4 MB)."""
    body = bytearray(HEADER_SIZE + len(fragment))
    body[:HEADER_SIZE] = HEADER
    _keystream(audit_key, name, idx).update_into(fragment, memoryview(body)[HEADER_SIZE:])
    return body


def stored_shard(idx: int, name: str, fragment: bytes, audit_key: bytes) -> Shard:
    """Fragment ``idx`` stored as object ``name`` (:func:`stored_object`), hashed, with its
    Merkle leaves and root."""
    body = stored_object(idx, name, fragment, audit_key)
    leaves = merkle.block_hashes(body)
    return Shard(idx, name, body, object_hash(body), b"".join(leaves), merkle.root(leaves))


#: A shard object as bytes, or as (header, fragment) read separately (no copy to split it).
Body = bytes | tuple[bytes, bytes]


def split_body(body: Body) -> tuple[bytes | memoryview, bytes | memoryview]:
    if isinstance(body, tuple):
        return body
    view = memoryview(body)
    return view[:HEADER_SIZE], view[HEADER_SIZE:]


def body_hash(body: Body) -> bytes:
    """:func:`object_hash` of a shard object in either form."""
    if isinstance(body, tuple):
        h = blake3.blake3(body[0])
        h.update(body[1])
        return h.digest()
    return object_hash(body)


def open_fragment(body: Body, audit_key: bytes, name: str, idx: int) -> bytes:
    """The liberasurecode fragment inside stored object ``name`` (fragment index ``idx``),
    unwhitened. Raises IntegrityError when the header is not this version's, or when the
    result is not fragment ``idx`` (a wrong audit key, or an object of another identity)."""
    head, frag = split_body(body)
    if bytes(head) != HEADER:
        got = bytes(head)
        if got[:4] == SHARD_MAGIC and len(got) == HEADER_SIZE:
            raise IntegrityError(
                f"shard object {name} is of on-remote format version {got[4]}; this vaultfs "
                f"reads version {SHARD_VERSION} only (docs/format.md, section 14)"
            )
        raise IntegrityError(f"shard object {name} is not a vaultfs shard object (bad magic)")
    plain = whiten(audit_key, name, idx, frag)
    if erasure.fragment_index(plain) != idx:
        raise IntegrityError(
            f"shard object {name} does not unwhiten to fragment {idx} (wrong audit key?)"
        )
    return plain


def decode_segment(
    fragments: Mapping[int, bytes | memoryview], k: int, n: int, size: int, alg: int
) -> bytes:
    """Decode a segment of ``size`` bytes from at least k plain fragments ({index:
    fragment}, :func:`open_fragment`) coded k-of-n with erasure algorithm ``alg``."""
    by_idx = dict(fragments)
    missing = [i for i in range(k) if i not in by_idx]
    if missing:
        # rebuild only the missing data fragments (see erasure.reconstruct)
        rebuilt = erasure.reconstruct(list(by_idx.values()), missing, k, n, alg)
        by_idx.update(zip(missing, rebuilt, strict=True))
    # systematic code: the data fragments' payloads, in order, are the segment
    fh = erasure.FRAGMENT_HEADER
    data = b"".join(memoryview(by_idx[i])[fh:] for i in range(k))
    if len(data) < size:
        raise IntegrityError("decoded segment is shorter than recorded")
    return data if len(data) == size else data[:size]


class SegmentBuilder:
    """Accumulates records into one segment of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray()

    @property
    def used(self) -> int:
        return len(self.buf)

    def fits(self, n: int) -> bool:
        return len(self.buf) + n <= self.size

    def add(self, record: bytes) -> int:
        off = len(self.buf)
        self.buf += record
        return off

    def padded_size(self) -> int:
        """The size this segment is padded to when sealed now (see :func:`size_class`)."""
        return size_class(len(self.buf), self.size)

    def padded(self) -> bytes:
        """The segment with its padding. Padding is random, not zeros: with a systematic
        linear code, zero padding would leave a zero run in every shard (parity included)
        that tells a provider exactly how full the segment is (docs/threat-model.md)."""
        return pad(bytes(self.buf), self.padded_size())


def pad(data: bytes, size: int) -> bytes:
    """``data`` followed by random bytes up to ``size`` (readers never look at padding)."""
    return data + secrets.token_bytes(size - len(data))


#: Smallest padded segment: a commit of a few bytes costs at most this much (times n/k).
MIN_SEGMENT = 256 * 1024


def size_class(used: int, full: int) -> int:
    """Pad to the full segment size, or — for a partly filled segment sealed at a commit — to
    the next power of two >= MIN_SEGMENT. Remotes then see a handful of object sizes, which
    reveal at most the order of magnitude of a small commit (docs/threat-model.md)."""
    if used >= full:
        return full
    size = MIN_SEGMENT
    while size < used:
        size *= 2
    return min(size, full)
