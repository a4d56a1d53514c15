"""The mount's local read cache: plaintext chunks on local disk under a byte budget, in packs.

Chunks are appended to **pack files** ``<home>/readcache/<seq>.pack`` of at most
:func:`pack_size` bytes (64 MiB under the default 1 GiB budget), each chunk as a record: a
36-byte header (the chunk id, the plaintext length, little-endian u32) and the plaintext.
An in-memory map holds chunk id → (pack, offset, length). Chunks stored or read one after
another land next to each other, so a sequential read costs one ``pread`` per run of chunks,
not one small file each. The budget counts whole pack files; the oldest pack is dropped
whole when it is exceeded (a chunk hit in the oldest quarter of the packs is copied forward
into the newest, so what is used stays: least recently used, pack by pack). The cache is
filled when a chunk is read from the vault (the mount, every snapshot view) and when the
write-back cache stores a block (so data just written reads back without a fetch). The same
threat model as the write-back cache applies: plaintext on the local disk, readable by the
vault's user and root (docs/threat-model.md).

Nothing read from a pack is returned unchecked. The first hit of a chunk reads it whole and
checks it against its chunk id (keyed BLAKE3); its 4 KiB pages then get an 8-byte keyed
BLAKE3 tag each, held in memory only under a key drawn per process, so a later small read
(:meth:`ReadCache.peek`) checks just the pages it returns. Eight bytes suffice: the key
never leaves the daemon's memory, so a page altered on disk (by accident or by someone who
can write the user's files) passes its check with probability 2^-64 per try, and every try
costs a read through the daemon (docs/threat-model.md, "The mount's caches"). A chunk put by the caller (already
verified) gets its page tags at once. A record torn by ``kill -9`` or a power loss, or a pack
altered on disk, fails its check and is read again from the vault: the cache never returns
wrong bytes. Nothing is fsync'd (a lost record is only a miss).

Crash safety: at start every pack is scanned header by header; a header that runs past the
end of its pack (a torn tail) ends the scan and the pack is cut there; files that are not
packs (a temporary file, the one-file-per-chunk cache of earlier versions) are removed;
the oldest packs are dropped until the budget holds.

Memory: a cached chunk costs its map entry (the chunk id and one int: pack and record
number) and its record's slots in its pack's packed arrays (offset, length, where its tags
start: 12 bytes) plus 8 bytes per page once tagged, no Python object of its own (about
170 bytes for a 32 KiB chunk; a 1 GiB cache of them about 5 MB).

Thread-safe: :meth:`get`, :meth:`get_many` and :meth:`put` run in worker threads,
:meth:`peek` in the FUSE loop (it never blocks on the disk: ``RWF_NOWAIT``); the
bookkeeping is under a lock, the file I/O outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3

log = logging.getLogger("vaultfs.readcache")

#: ``vaultfs mount --read-cache-size`` default (docs/mount.md).
DEFAULT_READ_CACHE_SIZE = 1024 * 1024 * 1024
#: the largest pack file (a smaller budget has packs of an eighth of it)
PACK_MAX = 64 * 1024 * 1024
HEADER = struct.Struct("<32sI")  # chunk id, plaintext length
PAGE = 4096
TAG = 8  # bytes of keyed BLAKE3 per page (the collision and forgery argument: above)
#: a run of records read with one ``pread`` spans at most this much (gaps included)
SPAN_MAX = 4 * 1024 * 1024
_SPAN_GAP = 256 * 1024  # records this close are read in one span (the gap read and dropped)
_PACK_NAME = re.compile(r"([0-9]{8})\.pack")
#: a record found in the map: (chunk id, map value, pack, record number, offset, length)
_Found = tuple[bytes, int, "_Pack", int, int, int]


def pack_size(budget: int) -> int:
    """The size at which a pack is closed: an eighth of the budget, at most :data:`PACK_MAX`
    (eviction drops whole packs, so at most an eighth of the cache goes at once)."""
    return max(1, min(PACK_MAX, budget // 8))


_UNTAGGED = 0xFFFFFFFF  # a record's ``tag_at`` until its pages are tagged
_IDX_BITS = 32  # a map value is ``seq << _IDX_BITS | record number``
_IDX_MASK = (1 << _IDX_BITS) - 1


class _Pack:
    """One pack file, open for reading and appending, and its records in packed arrays (record
    ``i``: ``cids[i]``, plaintext at ``offs[i]`` of ``lens[i]`` bytes, its page tags at
    ``tags[tag_at[i] : tag_at[i] + TAG * pages]`` or ``tag_at[i] == _UNTAGGED``). Records
    are only appended; a record superseded by a later copy stays until the pack goes. The
    descriptor is closed when the last reference goes (a reader may hold a pack its eviction
    has already unlinked)."""

    __slots__ = ("seq", "path", "fd", "size", "cids", "offs", "lens", "tag_at", "tags")

    def __init__(self, seq: int, path: Path, fd: int, size: int) -> None:
        self.seq = seq
        self.path = path
        self.fd = fd
        self.size = size  # bytes reserved, written or being written
        self.cids: list[bytes] = []
        self.offs = array("I")  # packs stay far below 4 GiB (PACK_MAX, or one chunk)
        self.lens = array("I")
        self.tag_at = array("I")
        self.tags = bytearray()

    def add(self, cid: bytes, off: int, length: int, tags: bytes | None) -> int:
        """Record a chunk's record (lock held); returns its number."""
        self.cids.append(cid)
        self.offs.append(off)
        self.lens.append(length)
        self.tag_at.append(_UNTAGGED)
        i = len(self.cids) - 1
        if tags is not None:
            self.set_tags(i, tags)
        return i

    def set_tags(self, i: int, tags: bytes) -> None:
        """Keep record ``i``'s page tags, once (lock held)."""
        if self.tag_at[i] == _UNTAGGED:
            self.tag_at[i] = len(self.tags)
            self.tags += tags

    def __del__(self) -> None:
        os.close(self.fd)


class ReadCache:
    """Chunk plaintext by chunk id, at most ``budget`` bytes on disk (0 disables the cache).

    ``chunk_id`` is the vault's keyed chunk-id function: a chunk is returned only if its
    bytes hash to the id asked for (or, for :meth:`peek`, its pages match the tags taken
    when they did)."""

    def __init__(self, directory: Path, budget: int, chunk_id: Callable[[bytes], bytes]) -> None:
        self.dir = directory
        self.budget = max(0, budget)
        self.chunk_id = chunk_id
        self.pack_size = pack_size(self.budget)
        self._tag_key = os.urandom(32)  # page tags live in this process's memory only
        self._lock = threading.Lock()
        self._map: dict[bytes, int] = {}  # chunk id -> seq << _IDX_BITS | record number
        self._packs: OrderedDict[int, _Pack] = OrderedDict()  # oldest first; the last is open
        self._next_seq = 0
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.discarded = 0  # records that failed their check (torn, altered)

    # -- start ---------------------------------------------------------------------------------
    def load(self) -> int:
        """Scan the directory (before use): map every intact record header, cut torn tails,
        remove what is not a pack, drop the oldest packs over the budget. Returns the bytes
        kept."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        found: list[tuple[int, Path]] = []
        for f in self.dir.iterdir():
            m = _PACK_NAME.fullmatch(f.name)
            if m is None or not self.budget:
                f.unlink(missing_ok=True)  # a temporary file, an old chunk file, a stranger
            else:
                found.append((int(m.group(1)), f))
        for seq, f in sorted(found):
            self._scan(seq, f)
            self._next_seq = seq + 1
        with self._lock:
            self._trim()
        return self.used

    def _scan(self, seq: int, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        pack = _Pack(seq, path, fd, 0)
        end = os.fstat(fd).st_size
        pos = 0
        while pos + HEADER.size <= end:
            cid, length = HEADER.unpack(os.pread(fd, HEADER.size, pos))
            if length == 0 or pos + HEADER.size + length > end:
                break  # a hole or a torn record: the rest of the pack is not trusted
            self._map[cid] = seq << _IDX_BITS | pack.add(cid, pos + HEADER.size, length, None)
            pos += HEADER.size + length
        if pos < end:
            os.ftruncate(fd, pos)
        pack.size = pos
        self._packs[seq] = pack
        self.used += pos

    # -- reads ---------------------------------------------------------------------------------
    def get(self, cid: bytes) -> bytes | None:
        """The chunk's plaintext if cached and intact, else None (a damaged record is
        forgotten). Its pages are tagged for :meth:`peek`."""
        return self.get_many([cid], tag=True).get(cid)

    def get_many(self, cids: Sequence[bytes], tag: bool = False) -> dict[bytes, bytes]:
        """The cached and intact chunks of ``cids``: records next to each other in a pack are
        read with one ``pread``. Chunks missing from the result are misses. With ``tag``,
        chunks whose pages have no tags yet get them (worth it for small random reads, which
        :meth:`peek` then serves; not for a stream)."""
        found: list[_Found] = []
        with self._lock:
            for c in dict.fromkeys(cids):
                if (v := self._map.get(c)) is not None:
                    pack, i = self._packs[v >> _IDX_BITS], v & _IDX_MASK
                    found.append((c, v, pack, i, pack.offs[i], pack.lens[i]))
            self.misses += len(set(cids)) - len(found)
        found.sort(key=lambda f: (f[2].seq, f[4]))
        out: dict[bytes, bytes] = {}
        i = 0
        while i < len(found):
            j = i + 1
            _c, _v, pack, _i, first, _n = found[i]
            while j < len(found):
                _c, _v, p, _i, off, _n = found[j]
                prev_end = found[j - 1][4] + found[j - 1][5]
                if p is not pack or off - prev_end > _SPAN_GAP:
                    break
                if off + found[j][5] - first > SPAN_MAX:
                    break
                j += 1
            end = found[j - 1][4] + found[j - 1][5]
            try:
                span = os.pread(pack.fd, end - first, first)
            except OSError as e:
                log.warning("read cache: cannot read a pack: %s", e)
                span = b""
            view = memoryview(span)
            for f in found[i:j]:
                off, length = f[4], f[5]
                data = bytes(view[off - first : off - first + length])
                if len(data) < length:  # the pack was cut under us: a miss
                    with self._lock:
                        self.misses += 1
                elif self._verified(f, data, tag):
                    out[f[0]] = data
            i = j
        return out

    def _verified(self, f: _Found, data: bytes, tag: bool) -> bool:
        """Check a whole chunk read from its record (and tag its pages if ``tag``); a
        failure forgets the record."""
        cid, v, pack, i, _off, _n = f
        if self.chunk_id(data) != cid:
            with self._lock:
                if self._map.get(cid) == v:
                    del self._map[cid]
                self.misses += 1
                self.discarded += 1
            return False
        with self._lock:
            tagged = pack.tag_at[i] != _UNTAGGED
        tags = self._tags(data) if tag and not tagged else None
        with self._lock:
            self.hits += 1
            if tags is not None:
                pack.set_tags(i, tags)
            stale = self._doomed(pack)
        if stale:  # about to be evicted with its pack while in use: keep it
            self._append(cid, data, tags if tags is not None else self._tags(data))
        return True

    def peek(self, cid: bytes, lo: int, hi: int, wait: bool = False) -> bytes | None:
        """Bytes [lo, hi) of a chunk whose pages are tagged, read and checked page by page,
        if they match their tags; else None (the caller reads the chunk whole). Unless
        ``wait``, only if they are in the page cache (never waits for the disk): for the
        FUSE loop, a few small pages of hashing."""
        with self._lock:
            v = self._map.get(cid)
            if v is None:
                return None
            pack, i = self._packs[v >> _IDX_BITS], v & _IDX_MASK
            t0 = pack.tag_at[i]
            if t0 == _UNTAGGED:
                return None
            off, length = pack.offs[i], pack.lens[i]
            tags = pack.tags  # grows only at its end: the slice checked below stays put
        hi = min(hi, length)
        p0, p1 = lo // PAGE, (hi - 1) // PAGE + 1
        want = min(p1 * PAGE, length) - p0 * PAGE
        buf = bytearray(want)
        try:
            got = os.preadv(pack.fd, [buf], off + p0 * PAGE, 0 if wait else os.RWF_NOWAIT)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                log.warning("read cache: cannot read a pack: %s", e)
            return None
        if got != want:
            return None
        if wait:  # the disk was read: have the kernel bring in the rest of the chunk meanwhile,
            # so the neighbouring pages are in the page cache the next time (no extra wait)
            with contextlib.suppress(OSError):  # only a hint
                os.posix_fadvise(pack.fd, off, length, os.POSIX_FADV_WILLNEED)
        view = memoryview(buf)
        key = self._tag_key
        at = t0 + p0 * TAG
        for p in range(0, want, PAGE):
            if blake3.blake3(view[p : p + PAGE], key=key).digest(TAG) != tags[at : at + TAG]:
                return None  # a worker thread reads it whole and forgets the record
            at += TAG
        with self._lock:
            self.hits += 1
        return bytes(view[lo - p0 * PAGE : hi - p0 * PAGE])

    # -- writes --------------------------------------------------------------------------------
    def put(self, cid: bytes, data: bytes) -> None:
        """Keep a chunk the caller has verified (its plaintext hashes to ``cid``)."""
        if not self.budget or HEADER.size + len(data) > self.budget:
            return
        with self._lock:
            if cid in self._map:
                return
        self._append(cid, data, self._tags(data))

    def _tags(self, data: bytes) -> bytes:
        view = memoryview(data)
        key = self._tag_key
        return b"".join(
            blake3.blake3(view[p : p + PAGE], key=key).digest(TAG)
            for p in range(0, len(data), PAGE)
        )

    def _append(self, cid: bytes, data: bytes, tags: bytes) -> None:
        record = HEADER.size + len(data)
        with self._lock:
            pack = next(reversed(self._packs.values()), None)
            if pack is None or (pack.size and pack.size + record > self.pack_size):
                pack = self._new_pack()
                if pack is None:
                    return
            at = pack.size
            pack.size += record
            self.used += record
            self._trim()
        try:
            os.pwrite(pack.fd, HEADER.pack(cid, len(data)) + data, at)
        except OSError as e:  # a full disk costs a miss, never a failed read
            log.warning("read cache: cannot keep a chunk: %s", e)
            return
        with self._lock:
            if self._packs.get(pack.seq) is pack:  # not evicted meanwhile
                i = pack.add(cid, at + HEADER.size, len(data), tags)
                self._map[cid] = pack.seq << _IDX_BITS | i

    def _new_pack(self) -> _Pack | None:
        """Open the next pack (lock held)."""
        seq = self._next_seq
        self._next_seq += 1
        path = self.dir / f"{seq:08d}.pack"
        try:  # plaintext: ours only
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            log.warning("read cache: cannot start a pack: %s", e)
            return None
        pack = self._packs[seq] = _Pack(seq, path, fd, 0)
        return pack

    def _doomed(self, pack: _Pack) -> bool:
        """Whether ``pack`` is among the next to be evicted: the cache is within two packs of
        its budget and the pack among its oldest quarter (lock held)."""
        if self.used + 2 * self.pack_size <= self.budget or len(self._packs) < 3:
            return False
        oldest = list(self._packs)[: max(1, len(self._packs) // 4)]
        return pack.seq in oldest

    def _trim(self) -> None:
        """Drop the oldest packs until the budget holds (lock held)."""
        while self.used > self.budget and self._packs:
            _seq, pack = self._packs.popitem(last=False)
            self.used -= pack.size
            for c in pack.cids:
                if (v := self._map.get(c)) is not None and v >> _IDX_BITS == pack.seq:
                    del self._map[c]
            pack.path.unlink(missing_ok=True)

    def stats(self) -> dict:
        with self._lock:
            return {
                "budget": self.budget,
                "used": self.used,
                "chunks": len(self._map),
                "packs": len(self._packs),
                "hits": self.hits,
                "misses": self.misses,
                "discarded": self.discarded,
            }
