"""Reed-Solomon k-of-n coding of fixed-size segments, through pyeclib with ISA-L.

Erasure algorithm id 1 = liberasurecode backend ``isa_l_rs_vand`` (ISA-L, GF(2^8),
systematic Vandermonde-derived matrix). Each fragment carries liberasurecode's own
80-byte header (index, sizes, checksum); its payload for indices < k is the plain slice of
the segment, so the data fragments alone are the segment (see docs/format.md).

The Vandermonde code is not MDS once n - k >= 5 (ISA-L's gf_gen_rs_matrix): some
k-subsets of fragments are singular and cannot be decoded (36 of the 6435 7-subsets for the
"paranoid" 7/15 profile; tests/test_format_vectors.py). So new segments with n - k >= 5 use
erasure algorithm id 2 = ``isa_l_rs_cauchy`` (ISA-L's gf_gen_cauchy1_matrix), which decodes
from every k-subset; with n - k <= 4 they keep id 1, where every k-subset decodes too.
The id is recorded in the index and the signed manifest, and readers use what it says.

Erasure algorithm id 3 = one whole copy (k = n = 1, a strategy's ``1_of_1`` tier): the
only fragment is an 80-byte header in liberasurecode's layout, written here (backend id 0,
no library), followed by the segment itself. No liberasurecode is involved, no parity is
stored (1x the space), and the fragment is read exactly like the data fragment of a
systematic code, so range reads and audits are unchanged; a lost copy cannot be rebuilt.
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import TYPE_CHECKING

from .errors import IntegrityError

if TYPE_CHECKING:  # imported by driver(): every command imports this module, few code
    from pyeclib.ec_iface import ECDriver

#: liberasurecode's fragment header (fragment_header_t) in front of every fragment payload.
FRAGMENT_HEADER = 80
#: its magic, a little-endian uint32 at byte 59 (docs/format.md 7.2)
FRAGMENT_MAGIC = 0x0B0C5ECC
_MAGIC_AT = 59

EC_ISA_L_RS_VAND = 1
EC_ISA_L_RS_CAUCHY = 2
EC_COPY = 3
EC_BACKENDS = {EC_ISA_L_RS_VAND: "isa_l_rs_vand", EC_ISA_L_RS_CAUCHY: "isa_l_rs_cauchy"}
#: every erasure algorithm id this version reads and writes (docs/format.md 3)
EC_ALGS = (EC_ISA_L_RS_VAND, EC_ISA_L_RS_CAUCHY, EC_COPY)
#: liberasurecode's fragment_header_t (docs/format.md 7.2), as algorithm 3 writes it
_HEADER = struct.Struct("<IIIQB32sBBIIII9s")
_CHKSUM_NONE = 1


def fragment_index(fragment: bytes | memoryview) -> int | None:
    """The fragment index a liberasurecode fragment header names (little-endian uint32 at
    byte 0), or None when ``fragment`` does not start with such a header (its magic)."""
    if len(fragment) < FRAGMENT_HEADER:
        return None
    if int.from_bytes(fragment[_MAGIC_AT : _MAGIC_AT + 4], "little") != FRAGMENT_MAGIC:
        return None
    return int.from_bytes(fragment[:4], "little")


def choose_alg(k: int, n: int) -> int:
    """The erasure algorithm for new segments of a k-of-n vault (see the module docstring)."""
    if n == 1:
        return EC_COPY
    return EC_ISA_L_RS_VAND if n - k <= 4 else EC_ISA_L_RS_CAUCHY


PROFILES = {"personal": (3, 5), "federation": (5, 9), "paranoid": (7, 15)}

_drivers: dict[tuple[int, int, int], ECDriver] = {}
_lock = threading.Lock()


def driver(k: int, n: int, alg: int = EC_ISA_L_RS_VAND) -> ECDriver:
    from pyeclib.ec_iface import ECDriver

    key = (k, n, alg)
    with _lock:
        d = _drivers.get(key)
        if d is None:
            d = _drivers[key] = ECDriver(k=k, m=n - k, ec_type=EC_BACKENDS[alg])
        return d


def validate(k: int, n: int) -> None:
    """ValueError unless k-of-n is a code vaultfs writes: 1 <= k < n <= 32, or 1-of-1 (one
    whole copy, algorithm 3)."""
    if not (1 <= k < n <= 32 or k == n == 1):
        raise ValueError(f"need 1 <= k < n <= 32 (or 1-of-1), got k={k} n={n}")


def _check_alg(alg: int, k: int, n: int) -> None:
    if alg not in EC_ALGS:
        raise IntegrityError(f"unknown erasure algorithm id {alg}")
    if (alg == EC_COPY) != (k == n == 1):
        raise IntegrityError(f"erasure algorithm {alg} does not code {k}-of-{n}")


def copy_fragment(segment: bytes) -> bytes:
    """The one fragment of algorithm 3: its header (index 0, payload and original size the
    segment's length, magic, CRC-32 of bytes 0-58) and the segment (docs/format.md 7.5)."""
    head = _HEADER.pack(
        0, len(segment), 0, len(segment), _CHKSUM_NONE, bytes(32), 0, 0, 0, FRAGMENT_MAGIC, 0,
        0, bytes(9),
    )  # fmt: skip
    head = head[:67] + struct.pack("<I", zlib.crc32(head[:59])) + head[71:]
    return head + segment


def encode(segment: bytes, k: int, n: int, alg: int | None = None) -> list[bytes]:
    """Encode a segment into n fragments (fragment i is shard index i).

    ``alg`` defaults to :func:`choose_alg`; re-encoding an existing segment (repair) must
    pass the segment's recorded algorithm."""
    alg = alg or choose_alg(k, n)
    _check_alg(alg, k, n)
    if alg == EC_COPY:
        return [copy_fragment(segment)]
    return driver(k, n, alg).encode(segment)


def decode(fragments: list[bytes], k: int, n: int, alg: int = EC_ISA_L_RS_VAND) -> bytes:
    """Decode from at least k fragments (any indices) coded with algorithm ``alg``."""
    if len(fragments) < k:
        raise IntegrityError(f"only {len(fragments)} good shards, need {k}")
    _check_alg(alg, k, n)
    if alg == EC_COPY:
        return fragments[0][FRAGMENT_HEADER:]
    try:
        return driver(k, n, alg).decode(fragments)
    except Exception as e:  # pyeclib raises its own hierarchy
        raise IntegrityError(f"erasure decode failed: {e}") from None


def reconstruct(
    fragments: list[bytes | memoryview], missing: list[int], k: int, n: int, alg: int
) -> list[bytes]:
    """Rebuild the fragments with indices ``missing`` from at least k others (any indices).

    Rebuilding only the missing data fragments is several times cheaper than a full
    ``decode`` in liberasurecode, which allocates and clears buffers for every fragment."""
    if len(fragments) < k:
        raise IntegrityError(f"only {len(fragments)} good shards, need {k}")
    _check_alg(alg, k, n)
    if alg == EC_COPY:  # one fragment: never missing while k = 1 others are at hand
        raise IntegrityError("a one-copy segment has no other fragment to rebuild from")
    try:
        frags = [f if isinstance(f, bytes) else bytes(f) for f in fragments]  # pyeclib: bytes only
        return driver(k, n, alg).reconstruct(frags, missing)
    except Exception as e:  # pyeclib raises its own hierarchy
        raise IntegrityError(f"erasure reconstruction failed: {e}") from None


# -- byte ranges -----------------------------------------------------------------------------
# The code works byte by byte (docs/format.md 7.3, 7.4): payload byte b of every fragment is
# a combination of payload byte b of the data fragments. So the same byte range of any k
# fragments' payloads decodes to that range of the data payloads, without the rest of them:
# the lazy index view reads one record of a meta segment that way when a data shard it lies
# in is out of reach. Small k×k matrices over GF(2^8) here; the bytes go through
# bytes.translate (one multiplication table per coefficient) and big-integer XOR.
_POLY = 0x11D
_EXP = [0] * 510
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i] = _EXP[_i + 255] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= _POLY


def _mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _inv(a: int) -> int:
    return _EXP[255 - _LOG[a]]


_tables: dict[int, bytes] = {}


def _times(c: int, data: bytes) -> int:
    """``data`` multiplied by ``c`` byte by byte, as a little-endian integer (to XOR)."""
    table = _tables.get(c)
    if table is None:
        table = _tables[c] = bytes(_mul(c, x) for x in range(256))
    return int.from_bytes(data.translate(table), "little")


def _row(i: int, k: int, alg: int) -> list[int]:
    """Row ``i`` of the code's n×k generator matrix: the identity for i < k, then ISA-L's
    ``gf_gen_rs_matrix`` (algorithm 1: ``(2^p)^j``, p = i − k) or ``gf_gen_cauchy1_matrix``
    (algorithm 2: ``inv(i ⊕ j)``)."""
    if i < k:
        return [1 if j == i else 0 for j in range(k)]
    if alg == EC_ISA_L_RS_VAND:
        return [_EXP[((i - k) * j) % 255] for j in range(k)]
    if alg == EC_ISA_L_RS_CAUCHY:
        return [_inv(i ^ j) for j in range(k)]
    raise IntegrityError(f"unknown erasure algorithm id {alg}")


def decode_range(pieces: dict[int, bytes], want: int, k: int, alg: int) -> bytes:
    """Payload bytes of data fragment ``want`` (< k) over one byte range, from the same range
    of k fragments' payloads ({fragment index: bytes}, all of one length). IntegrityError
    when those k rows are singular (algorithm 1 with n − k ≥ 5: take another set)."""
    if want in pieces:
        return pieces[want]
    idxs = sorted(pieces)[:k]
    if len(idxs) < k:
        raise IntegrityError(f"only {len(idxs)} fragment ranges, need {k}")
    m = [_row(i, k, alg) + [1 if t == r else 0 for t in range(k)] for r, i in enumerate(idxs)]
    for col in range(k):  # Gauss-Jordan: m becomes [I | inverse]
        piv = next((r for r in range(col, k) if m[r][col]), None)
        if piv is None:
            raise IntegrityError(f"fragments {idxs} do not decode (a singular set)")
        m[col], m[piv] = m[piv], m[col]
        inv = _inv(m[col][col])
        m[col] = [_mul(inv, v) for v in m[col]]
        for r in range(k):
            if r != col and m[r][col]:
                f = m[r][col]
                m[r] = [v ^ _mul(f, w) for v, w in zip(m[r], m[col], strict=True)]
    acc = 0
    length = len(pieces[idxs[0]])
    for c, i in zip(m[want][k:], idxs, strict=True):
        if c:
            acc ^= _times(c, pieces[i])
    return acc.to_bytes(length, "little")
