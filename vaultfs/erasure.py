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
"""

from __future__ import annotations

import threading

from pyeclib.ec_iface import ECDriver

from .errors import IntegrityError

#: liberasurecode's fragment header (fragment_header_t) in front of every fragment payload.
FRAGMENT_HEADER = 80
#: its magic, a little-endian uint32 at byte 59 (docs/format.md 7.2)
FRAGMENT_MAGIC = 0x0B0C5ECC
_MAGIC_AT = 59

EC_ISA_L_RS_VAND = 1
EC_ISA_L_RS_CAUCHY = 2
EC_BACKENDS = {EC_ISA_L_RS_VAND: "isa_l_rs_vand", EC_ISA_L_RS_CAUCHY: "isa_l_rs_cauchy"}


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
    return EC_ISA_L_RS_VAND if n - k <= 4 else EC_ISA_L_RS_CAUCHY


PROFILES = {"personal": (3, 5), "federation": (5, 9), "paranoid": (7, 15)}

_drivers: dict[tuple[int, int, int], ECDriver] = {}
_lock = threading.Lock()


def driver(k: int, n: int, alg: int = EC_ISA_L_RS_VAND) -> ECDriver:
    key = (k, n, alg)
    with _lock:
        d = _drivers.get(key)
        if d is None:
            d = _drivers[key] = ECDriver(k=k, m=n - k, ec_type=EC_BACKENDS[alg])
        return d


def validate(k: int, n: int) -> None:
    if not (1 <= k < n <= 32):
        raise ValueError(f"need 1 <= k < n <= 32, got k={k} n={n}")


def encode(segment: bytes, k: int, n: int, alg: int | None = None) -> list[bytes]:
    """Encode a segment into n fragments (fragment i is shard index i).

    ``alg`` defaults to :func:`choose_alg`; re-encoding an existing segment (repair) must
    pass the segment's recorded algorithm."""
    return driver(k, n, alg or choose_alg(k, n)).encode(segment)


def decode(fragments: list[bytes], k: int, n: int, alg: int = EC_ISA_L_RS_VAND) -> bytes:
    """Decode from at least k fragments (any indices) coded with algorithm ``alg``."""
    if len(fragments) < k:
        raise IntegrityError(f"only {len(fragments)} good shards, need {k}")
    if alg not in EC_BACKENDS:
        raise IntegrityError(f"unknown erasure algorithm id {alg}")
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
    if alg not in EC_BACKENDS:
        raise IntegrityError(f"unknown erasure algorithm id {alg}")
    try:
        frags = [f if isinstance(f, bytes) else bytes(f) for f in fragments]  # pyeclib: bytes only
        return driver(k, n, alg).reconstruct(frags, missing)
    except Exception as e:  # pyeclib raises its own hierarchy
        raise IntegrityError(f"erasure reconstruction failed: {e}") from None
