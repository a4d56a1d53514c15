"""Segments (zero-padded containers of chunk records, in a few fixed sizes) and shard objects.

Shard object = 36-byte header ‖ liberasurecode fragment (docs/format.md, "Shard object"):

    offset size field
    0      4    magic "VFSH"
    4      1    format version (1)
    5      1    kind (1 = data segment, 2 = meta segment: exported index)
    6      1    erasure algorithm id (1 = isa_l_rs_vand)
    7      1    k
    8      1    n
    9      1    fragment index (0..n-1)
    10     2    reserved, zero
    12     4    segment size in bytes (big-endian)
    16     16   segment uid (random; groups the n shards of one segment)
    32     4    fragment length (big-endian)
    36     ...  fragment (liberasurecode header of 80 bytes ‖ payload)
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

import blake3

from . import erasure, merkle
from .errors import IntegrityError

SHARD_MAGIC = b"VFSH"
SHARD_VERSION = 1
HEADER = struct.Struct(">4sBBBBBBHI16sI")
assert HEADER.size == 36
KIND_DATA = 1
KIND_META = 2
KIND_NAMES = {KIND_DATA: "data", KIND_META: "meta"}


@dataclass
class Shard:
    idx: int
    name: str
    body: bytes
    hash: bytes
    blocks: bytes
    root: bytes


@dataclass
class ShardHeader:
    kind: int
    ec_alg: int
    k: int
    n: int
    idx: int
    segment_size: int
    uid: bytes
    fragment_len: int


def new_name() -> str:
    return secrets.token_hex(16)


def object_hash(body: bytes | memoryview) -> bytes:
    return blake3.blake3(body).digest()


def build_shards(
    segment: bytes, uid: bytes, kind: int, k: int, n: int, alg: int | None = None
) -> list[Shard]:
    """Erasure-code a padded segment and wrap each fragment as a shard object."""
    alg = alg or erasure.choose_alg(k, n)
    frags = erasure.encode(segment, k, n, alg)
    out = []
    for i, frag in enumerate(frags):
        head = HEADER.pack(
            SHARD_MAGIC, SHARD_VERSION, kind, alg, k, n, i, 0,
            len(segment), uid, len(frag),
        )  # fmt: skip
        body = head + frag
        leaves = merkle.block_hashes(body)
        out.append(
            Shard(i, new_name(), body, object_hash(body), b"".join(leaves), merkle.root(leaves))
        )
    return out


def parse_header(body: bytes | memoryview, fragment_len: int | None = None) -> ShardHeader:
    """The header of a shard object (``body`` whole, or its header with ``fragment_len``
    the length of the fragment read after it)."""
    if len(body) < HEADER.size:
        raise IntegrityError("shard object too short")
    magic, ver, kind, alg, k, n, idx, _res, size, uid, flen = HEADER.unpack_from(body)
    if magic != SHARD_MAGIC or ver != SHARD_VERSION:
        raise IntegrityError("not a vaultfs shard object (bad magic or version)")
    total = len(body) if fragment_len is None else HEADER.size + fragment_len
    if total != HEADER.size + flen:
        raise IntegrityError("shard object length does not match its header")
    return ShardHeader(kind, alg, k, n, idx, size, uid, flen)


#: A shard object as bytes, or as (header, fragment) read separately (no copy to split it).
Body = bytes | tuple[bytes, bytes]


def split_body(body: Body) -> tuple[bytes | memoryview, bytes | memoryview]:
    if isinstance(body, tuple):
        return body
    view = memoryview(body)
    return view[: HEADER.size], view[HEADER.size :]


def body_hash(body: Body) -> bytes:
    """:func:`object_hash` of a shard object in either form."""
    if isinstance(body, tuple):
        h = blake3.blake3(body[0])
        h.update(body[1])
        return h.digest()
    return object_hash(body)


def read_body(path) -> tuple[bytes, bytes]:
    """A shard object file as (header, fragment): the fragment is its own bytes object, so
    the erasure decoder can take it as it is."""
    with open(path, "rb") as f:
        return f.read(HEADER.size), f.read()


def decode_segment(bodies: list[Body], k: int, n: int, size: int) -> bytes:
    """Decode a segment from at least k verified shard objects."""
    parts = [split_body(b) for b in bodies]
    heads = [parse_header(h, len(f)) for h, f in parts]
    algs = {h.ec_alg for h in heads}
    if len(algs) != 1:
        raise IntegrityError("shards of one segment name different erasure algorithms")
    alg = algs.pop()
    by_idx: dict[int, bytes | memoryview] = {
        h.idx: f for h, (_hd, f) in zip(heads, parts, strict=True)
    }
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
