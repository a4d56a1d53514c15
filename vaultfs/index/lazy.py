"""A lazy, read-only view of a shipped index (docs/format.md 9): SQLite reads the database
through an apsw VFS whose file is served block by block from the remotes, so a query touches
only the index blocks on its B-tree paths, not the whole file.

The VFS knows nothing of remotes: it asks ``read_block(j)`` for block *j* (``block_size``
bytes, the last one shorter) and trusts what comes back, so the caller must have checked
every block against its id first (vaultfs/restore.py does, before SQLite sees a byte). An
exception ``read_block`` raises (a remote that cannot deliver, a block that is not what the
signed map names) reaches the caller of the query unchanged; any other SQLite error is an
:class:`IntegrityError`.

The database is opened ``immutable=1``, read-only: no journal, no locks, no writes, and the
file's length is the shipped length the manifest signs.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import apsw

from ..errors import IntegrityError, VaultError
from . import Index
from .schema import SCHEMA_VERSION

#: Blocks of the file kept in memory (4 MiB at 16 KiB): SQLite's own page cache sits above.
BLOCKS_KEPT = 256

_names = itertools.count()
T = TypeVar("T")


class _BlockFile:
    """The shipped index file, block by block (apsw's VFS file protocol, read-only)."""

    def __init__(self, length: int, block_size: int, read_block: Callable[[int], bytes]) -> None:
        self.length, self.block_size, self.read_block = length, block_size, read_block
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def _block(self, j: int) -> bytes:
        with self.lock:
            got = self.cache.get(j)
            if got is not None:
                self.cache.move_to_end(j)
                return got
        data = self.read_block(j)
        if len(data) != min(self.block_size, self.length - j * self.block_size):
            raise IntegrityError(f"index block {j} has {len(data)} bytes")
        with self.lock:
            self.cache[j] = data
            while len(self.cache) > BLOCKS_KEPT:
                self.cache.popitem(last=False)
        return data

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802 - apsw's names
        out = bytearray()
        end = min(offset + amount, self.length)
        pos = offset
        while pos < end:
            j, at = divmod(pos, self.block_size)
            take = min(end - pos, self.block_size - at)
            out += self._block(j)[at : at + take]
            pos += take
        return bytes(out)  # short: apsw zero-fills and reports SQLITE_IOERR_SHORT_READ

    def xFileSize(self) -> int:  # noqa: N802
        return self.length

    def xLock(self, level: int) -> None:  # noqa: N802 - immutable: nothing to lock
        pass

    def xUnlock(self, level: int) -> None:  # noqa: N802
        pass

    def xCheckReservedLock(self) -> bool:  # noqa: N802
        return False

    def xClose(self) -> None:  # noqa: N802
        with self.lock:
            self.cache.clear()

    def xSectorSize(self) -> int:  # noqa: N802
        return 4096

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return apsw.SQLITE_IOCAP_IMMUTABLE

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        return False


class _VFS(apsw.VFS):
    """A VFS serving one file, the shipped index, and nothing else (no journal exists)."""

    def __init__(self, name: str, file: _BlockFile) -> None:
        super().__init__(name, base="")
        self.file = file

    def xOpen(self, name: object, flags: list[int]) -> _BlockFile:  # noqa: N802
        if not flags[0] & apsw.SQLITE_OPEN_MAIN_DB:  # temp files stay in memory (temp_store)
            raise apsw.CantOpenError("the lazy index view opens no other file")
        return self.file

    def xAccess(self, pathname: str, flags: int) -> bool:  # noqa: N802 - only the one file
        return False

    def xFullPathname(self, name: str) -> str:  # noqa: N802
        return name


class LazyIndex(Index):
    """An :class:`Index` for queries only, over a shipped index read lazily (module
    docstring). Every query function of vaultfs/index that only reads works on it; writing
    raises. Close it to release the VFS."""

    def __init__(self, length: int, block_size: int, read_block: Callable[[int], bytes]) -> None:
        self.path = Path("lazy-index")
        self.lock = threading.RLock()
        self.vfs_name = f"vaultfs-lazy-{next(_names)}"
        self._vfs = _VFS(self.vfs_name, _BlockFile(length, block_size, read_block))
        try:
            self.db = apsw.Connection(  # type: ignore[assignment]
                "file:index.db?immutable=1",
                flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
                vfs=self.vfs_name,
            )
        except apsw.Error as e:
            self._vfs.unregister()
            raise IntegrityError(f"the shipped index is not a usable SQLite file: {e}") from None

    def close(self) -> None:
        with self.lock:
            self.db.close()
            self._vfs.unregister()

    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return _checked(lambda: self.db.execute(sql, args).fetchall())

    def one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self.lock:
            return _checked(lambda: self.db.execute(sql, args).fetchone())

    def tx(self):  # noqa: ANN201 - never returns
        raise VaultError("the lazy view of a shipped index is read-only")

    def set(self, key: str, value: object) -> None:
        raise VaultError("the lazy view of a shipped index is read-only")

    def upgrade(self, chunk_id_key: bytes) -> None:
        raise VaultError("the lazy view of a shipped index is read-only")

    def export_to(self, dest: Path) -> None:
        raise VaultError("the lazy view of a shipped index is read-only")


def _checked(run: Callable[[], T]) -> T:
    try:
        return run()
    except apsw.Error as e:
        raise IntegrityError(f"the shipped index cannot be read: {e}") from None


def open_lazy(length: int, block_size: int, read_block: Callable[[int], bytes]) -> LazyIndex | None:
    """The lazy view of a shipped index of ``length`` bytes in blocks of ``block_size``, each
    checked by ``read_block`` (module docstring); None when its schema is not the current one
    (:data:`SCHEMA_VERSION`: an older layout needs the migration of a full copy,
    :func:`vaultfs.index.open_shipped`). Functions in its views and triggers are not trusted,
    and every cell is checked as it is read (``cell_size_check``), as in a full copy."""
    view = LazyIndex(length, block_size, read_block)
    try:
        view.one("PRAGMA trusted_schema=OFF")
        view.one("PRAGMA cell_size_check=ON")
        view.one("PRAGMA temp_store=MEMORY")  # sorts and temporary tables: never a file
        row = view.one("PRAGMA user_version")
        if row is None or row[0] != SCHEMA_VERSION:
            view.close()
            return None
    except BaseException:
        view.close()
        raise
    return view
