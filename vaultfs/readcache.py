"""The mount's local read cache: plaintext chunks on local disk under a byte budget, LRU.

One file per chunk, ``<home>/readcache/<hex chunk id>``, holding the chunk's plaintext. It is
filled when a chunk is read from the vault (the mount, every snapshot view) and when the
write-back cache stores a block (so data just written reads back without a fetch). The same
threat model as the write-back cache applies: plaintext on the local disk, readable by the
vault's user and root (docs/threat-model.md).

Crash safety: a file is written under a temporary name and renamed into place, and every hit
is checked against its chunk id (keyed BLAKE3 of the plaintext) before it is returned, so a
file torn by ``kill -9`` or a power loss, or altered on disk, is discarded and read again from
the vault: the cache never returns wrong bytes. Nothing is fsync'd (a lost file is only a
miss). At start the directory is scanned, temporary files are removed and the least recently
modified files are dropped until the budget holds.

Thread-safe: :meth:`get` and :meth:`put` run in worker threads; the bookkeeping is under a
lock, the file I/O outside it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("vaultfs.readcache")

#: ``vaultfs mount --read-cache-size`` default (docs/mount.md).
DEFAULT_READ_CACHE_SIZE = 1024 * 1024 * 1024
TMP_SUFFIX = ".tmp"


class ReadCache:
    """Chunk plaintext by chunk id, at most ``budget`` bytes on disk (0 disables the cache).

    ``chunk_id`` is the vault's keyed chunk-id function: a hit is returned only if its bytes
    hash to the id asked for."""

    def __init__(self, directory: Path, budget: int, chunk_id: Callable[[bytes], bytes]) -> None:
        self.dir = directory
        self.budget = max(0, budget)
        self.chunk_id = chunk_id
        self._lock = threading.Lock()
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # LRU order, oldest first
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.discarded = 0  # files that failed their check (torn, altered)
        self._seq = 0

    def load(self) -> int:
        """Scan the directory (before use): drop temporary files and anything over the
        budget, oldest first. Returns the bytes kept."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        found: list[tuple[float, bytes, int, Path]] = []
        for f in self.dir.iterdir():
            try:
                cid = bytes.fromhex(f.name)
                st = f.stat()
            except (ValueError, OSError):
                f.unlink(missing_ok=True)  # a temporary file or a stranger
                continue
            found.append((st.st_mtime, cid, st.st_size, f))
        found.sort()
        for _t, cid, size, _f in found:
            self._sizes[cid] = size
            self.used += size
        self._trim()
        return self.used

    def path(self, cid: bytes) -> Path:
        return self.dir / cid.hex()

    def get(self, cid: bytes) -> bytes | None:
        """The chunk's plaintext if cached and intact, else None (a damaged file is removed)."""
        with self._lock:
            if cid not in self._sizes:
                self.misses += 1
                return None
            self._sizes.move_to_end(cid)
        try:
            data = self.path(cid).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or self.chunk_id(data) != cid:
            self._forget(cid, unlink=data is not None)
            with self._lock:
                self.misses += 1
                self.discarded += data is not None
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, cid: bytes, data: bytes) -> None:
        """Keep a chunk the caller has verified (its plaintext hashes to ``cid``)."""
        if not self.budget or len(data) > self.budget:
            return
        with self._lock:
            if cid in self._sizes:
                self._sizes.move_to_end(cid)
                return
            self._seq += 1
            tmp = self.dir / f"{threading.get_ident()}.{self._seq}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # plaintext: ours only
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path(cid))
        except OSError as e:  # a full disk costs a miss, never a failed read
            log.warning("read cache: cannot keep a chunk: %s", e)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            if cid not in self._sizes:
                self._sizes[cid] = len(data)
                self.used += len(data)
            self._trim()

    def _forget(self, cid: bytes, unlink: bool) -> None:
        with self._lock:
            size = self._sizes.pop(cid, None)
            if size is not None:
                self.used -= size
        if unlink:
            self.path(cid).unlink(missing_ok=True)

    def _trim(self) -> None:
        """Evict least recently used files until the budget holds (lock held)."""
        while self.used > self.budget and self._sizes:
            cid, size = self._sizes.popitem(last=False)
            self.used -= size
            self.path(cid).unlink(missing_ok=True)

    def stats(self) -> dict:
        with self._lock:
            return {
                "budget": self.budget,
                "used": self.used,
                "chunks": len(self._sizes),
                "hits": self.hits,
                "misses": self.misses,
                "discarded": self.discarded,
            }
