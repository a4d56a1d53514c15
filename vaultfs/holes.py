"""Holes: which chunks are all zeros, known without reading them.

A restore writes every chunk except an all-zero one of at most :data:`HOLE_MAX` bytes, which
it leaves as a hole (restore.py), so a sparse file comes back sparse. The mount reports the
same allocation as ``st_blocks`` (fs.py): the bytes of a file's chunks that are not holes.

Chunk ids are keyed BLAKE3 of the plaintext, so the id of an all-zero chunk depends only on
its length. :class:`ZeroChunks` keeps those ids by length and answers two questions:

* :meth:`ZeroChunks.is_hole` (any thread, the FUSE loop included): a dictionary lookup, never
  a hash. It knows the lengths the mount's chunker gives a block of zeros (learnt once at
  mount), and every zero chunk seen since (the mount stores a block, a snapshot fills a
  gap). A zero chunk of a length it never met counts as data: the answer errs towards
  allocated, never towards a hole.
* :meth:`ZeroChunks.record_is_hole` (worker threads): also given the chunk's record length
  from the index (``chunks.length``), exact. A record is a candidate only when its payload
  is as small as zstd makes zeros of that length (:func:`hole_record_limit`), which data
  almost never is; only a candidate costs a hash of zeros, once per length.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from . import envelope

#: The longest chunk a restore leaves as a hole (longer all-zero chunks are written).
HOLE_MAX = 1 << 20
_ZEROS = bytes(HOLE_MAX)
_ZERO_VIEW = memoryview(_ZEROS)  # slices without a copy
#: Most lengths :class:`ZeroChunks` learns beyond those it was seeded with (then it learns
#: no more: what it knows only grows, so a count kept up to date by differences never drops
#: below the truth).
MEMO_LENGTHS = 4096


def is_hole(data: bytes | memoryview) -> bool:
    """Whether a restore leaves ``data`` (a chunk's plaintext) as a hole: all zeros, at most
    :data:`HOLE_MAX` bytes (a memcmp, no copy)."""
    return len(data) <= HOLE_MAX and _ZEROS.startswith(data)


#: An all-zero chunk of n bytes has a record (``chunks.length``) of at most
#: ``HOLE_RECORD_BASE + n // HOLE_RECORD_STEP`` bytes: zstd stores a run of zeros in about 14
#: bytes plus 4 per 128 KiB (a payload of 52 bytes for 1 MiB); the bound leaves room for more.
HOLE_RECORD_BASE = envelope.SALT_LEN + envelope.COMMIT_LEN + envelope.TAG_LEN + 32
HOLE_RECORD_STEP = 16384


def hole_record_limit(plain: int) -> int:
    """The largest record an all-zero chunk of ``plain`` bytes can have."""
    return HOLE_RECORD_BASE + plain // HOLE_RECORD_STEP


class ZeroChunks:
    """Ids of all-zero chunks by length (``chunk_id``: the vault's keyed chunk id)."""

    def __init__(self, chunk_id: Callable[[bytes], bytes]) -> None:
        self._chunk_id = chunk_id
        self._seeded: dict[int, bytes] = {}  # never forgotten
        self._seen: dict[int, bytes] = {}  # at most MEMO_LENGTHS
        self._lock = threading.Lock()

    def seed(self, lengths: Iterable[int]) -> None:
        """Learn the zero ids of ``lengths`` for good (hashes zeros: a worker thread)."""
        for n in set(lengths):
            if 0 < n <= HOLE_MAX and n not in self._seeded:
                self._seeded[n] = self._chunk_id(_ZERO_VIEW[:n])

    def note(self, cid: bytes, length: int) -> None:
        """``cid`` is the id of ``length`` zero bytes (the caller saw them)."""
        if 0 < length <= HOLE_MAX and length not in self._seeded:
            with self._lock:
                if len(self._seen) < MEMO_LENGTHS:
                    self._seen.setdefault(length, cid)

    def is_hole(self, cid: bytes, length: int) -> bool:
        """Whether chunk ``cid`` of ``length`` bytes is all zeros, from what is known (no
        hashing: safe on the FUSE loop). Unknown lengths answer False."""
        zid = self._seeded.get(length)
        if zid is None:
            zid = self._seen.get(length)
        return zid is not None and zid == cid

    def record_is_hole(self, cid: bytes, plain: int, record: int) -> bool:
        """Exact :meth:`is_hole` for a chunk whose record is ``record`` bytes (worker threads:
        may hash ``plain`` zero bytes, once per length while fewer than MEMO_LENGTHS are
        known)."""
        if plain <= 0 or plain > HOLE_MAX or record > hole_record_limit(plain):
            return False
        zid = self._seeded.get(plain) or self._seen.get(plain)
        if zid is None:
            zid = self._chunk_id(_ZERO_VIEW[:plain])
            self.note(zid, plain)
        return zid == cid

    def known(self) -> list[bytes]:
        """Every zero chunk id known so far (their number grows, never shrinks)."""
        with self._lock:
            return [*self._seeded.values(), *self._seen.values()]

    def allocated(self, chunks: Iterable[tuple[bytes, int]]) -> int:
        """Bytes of ``chunks`` ((cid, length) pairs) that are not holes (no hashing)."""
        return sum(n for c, n in chunks if not self.is_hole(c, n))
