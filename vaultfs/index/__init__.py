"""The local SQLite index: the single source of truth for what the vault holds and where, and
the only place SQL over it is written (the live tree's own tables, ``live_*``, are read and
written by vaultfs/livetree.py and vaultfs/snapview.py).

Every column is documented in the schema (``schema.py``). Sentinels that crash recovery reads:
``shards.state = 'queued'`` means the shard object is durable in the local queue directory
but not yet known to be on its remote; ``segments.state = 'open'`` never reaches disk (a
segment is inserted only once it is sealed and its shards are durable in the queue).

The queries live beside it, one named function per question, grouped by what they are
about: ``settings`` (the typed :class:`VaultParams` and the other settings rows),
``keyring`` (key epochs and suites), ``remotes`` (the remotes table and their health),
``segments`` (segments and their shards), ``chunks`` (and which are still referenced),
``snapshots`` (snapshots and entries), ``contents`` (the file contents entries share),
``manifests`` (manifests, their upload queue, garbage), ``audit`` (audit tags, runs, challenges, findings, foreign objects). A
function that reads takes the :class:`Index` (it holds the lock itself); one that writes as
part of a larger update takes the connection of the caller's :meth:`Index.tx`, one that
writes on its own opens its transaction itself.

After every commit the index is copied (``Index.export_to``) and shipped as content-addressed
blocks, of which only those the remotes lack are sealed and erasure-coded like data, named by a
signed manifest (see vaultfs/vault/metaship.py and docs/design.md). ``shipped`` is the local
sidecar that remembers which blocks are already there; ``exportmap`` keeps the last export's
block map, so that the next one hashes only the blocks whose pages the write-ahead log names,
and the commit keeps the last export itself (``index.db-export``), into which the next one
writes only those pages.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import IntegrityError
from . import exportmap, manifests
from .chunks import LOOKUP_BATCH, chunk_rows
from .exportmap import Export
from .schema import SCHEMA, SCHEMA_VERSION, migrate
from .settings import VaultParams

__all__ = [
    "LOOKUP_BATCH",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Index",
    "VaultParams",
    "chunk_rows",
    "migrate",
    "open_shipped",
    "seen_manifest_seq",
    "stored_coding",
    "stored_remote_specs",
    "stored_vault_id",
]


#: Bytes of write-ahead log past which a transaction's end folds it into the file
#: (:meth:`Index.fold_log`): automatic checkpoints are off, and a mount may write for a long
#: time between two exports.
WAL_FOLD_BYTES = 64 << 20


class Index:
    """A thread-safe handle on the SQLite index (one connection, serialised by a lock).

    Callers use :meth:`tx` for writes, so a crash leaves either all or none of an update.
    Opening migrates what needs no key; :meth:`upgrade` finishes what needs the vault's key.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if path != ":memory:" else path
        self.lock = threading.RLock()
        self.closed = False
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            # the log holds every page written since the last export or fold (.exportmap)
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA trusted_schema=OFF")  # no functions from views or triggers
            migrate(self.db)
        except BaseException:
            self.db.close()
            raise
        #: a descriptor of the database file that :meth:`export_to` copies from, opened once
        #: and closed only after the connection: closing any descriptor of a file drops
        #: every POSIX lock this process holds on it, SQLite's included, and then another
        #: process's closing connection deletes the write-ahead log this one still writes to
        #: (its later commits stay invisible to everyone else, as a mounted vault's were)
        self._copy_fd: int | None = None

    def upgrade(self, chunk_id_key: bytes) -> None:
        """Finish the migrations that need the vault's chunk-id key (schema 2 → 3: content
        refs are keyed; :func:`migrate`). Call it once the key is known to be this index's
        vault's: a wrong key would name every content wrongly. A current file: one PRAGMA."""
        with self.lock:
            migrate(self.db, chunk_id_key)

    def close(self) -> None:
        """Fold the write-ahead log (:meth:`fold_log`) and close; a second call does nothing.
        A fold that fails (a full disk) is not an error of the close: SQLite's own
        checkpoint at close then changes the file behind the map, whose stamp then makes
        the next export hash every block."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(OSError, sqlite3.Error):
                self.fold_log()
            self.db.close()
            if self._copy_fd is not None:
                os.close(self._copy_fd)
                self._copy_fd = None

    # -- small helpers ---------------------------------------------------------------------
    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        """All rows of one statement (under the lock)."""
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> tuple | None:
        """The first row of one statement, or None (under the lock)."""
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def tx(self) -> _Tx:
        """A write transaction (``with index.tx() as db``): BEGIN IMMEDIATE under the lock,
        COMMIT on success, ROLLBACK on an exception."""
        return _Tx(self)

    def get(self, key: str, default: str | None = None) -> str | None:
        """Settings row ``key`` as text (the vault's parameters: :class:`VaultParams`)."""
        row = self.one("SELECT value FROM settings WHERE key=?", (key,))
        return row[0] if row else default

    def set(self, key: str, value: object) -> None:
        """Set settings row ``key`` to ``str(value)``, outside a transaction."""
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))

    @property
    def export_map(self) -> Path | None:
        """Where the map of the last export is kept (:mod:`.exportmap`); None in memory."""
        return Path(f"{self.path}-exportmap") if isinstance(self.path, Path) else None

    @property
    def export_copy(self) -> Path | None:
        """Where the commit keeps the last export itself (:meth:`export_to` brings it up to
        date page by page); None in memory."""
        return Path(f"{self.path}-export") if isinstance(self.path, Path) else None

    def export_to(self, dest: Path) -> Export:
        """Make the file ``dest`` a consistent copy of the whole database, page for page: no
        VACUUM, so a page the next commits do not touch stays at the same offset with the
        same bytes, and the shipped copy's unchanged blocks keep their ids (docs/format.md
        9). Holds the lock while it copies; the copy is in rollback-journal mode, so the one
        file is the whole database. Returns which pages may differ from the last export
        (:class:`Export`; :mod:`.exportmap`).

        The copy is the database file itself, once a checkpoint has moved every page of the
        write-ahead log into it; the log's frame headers, read just before, name the pages
        written since the last export or fold. When ``dest`` is the copy the last export
        left (the map's ``copy`` stamp: the commit keeps it, :attr:`export_copy`), of the
        pages that may differ from it (those the log names, the map's carried ones, the
        header page) those that do are written into it, and only they count as changed, so
        that the cost follows the change, not the index's size (the flush after a big backup
        rewrites every shard row with the bytes its export already had); otherwise the whole
        file is copied (a kernel copy: at a 261 MiB index, 16 GiB of data, SQLite's online
        backup took 1.3 s). When the checkpoint cannot finish (another connection reads an older state) or a page reaches the log
        meanwhile, SQLite's online backup, and every page counts as changed. The work is
        done in ``<dest>.part`` (the kept copy renamed there first), fsync'd, then renamed
        to ``dest``: a crash at any step leaves no ``dest``, or one whose stamp the map
        does not hold, and the next export copies the whole file (docs/design.md, crash
        states).

        Shards still ``queued`` are ``placed`` in the copy: the upload queue is this
        machine's bookkeeping, and the flush that follows every commit flips the same rows
        locally by the same same-size update, so the next commit's copy has the same page
        bytes and does not ship the whole shards table again (docs/format.md 9). The update
        runs in the copy's own log, so that its pages are known; the copy then switched to
        rollback mode has the bytes of switching before the update (the test of that:
        ``tests/test_metaship_exportmap.py``)."""
        part = Path(f"{dest}.part")
        with self.lock:
            prior = self._valid_export_map()
            _remove_database(part)  # a crash's leftover
            base = prior if prior is not None and _kept(dest, prior.copy) else None
            if base is not None:
                dest.rename(part)  # from here a crash leaves no kept copy
            else:
                _remove_database(dest)
            copied = self._copy_checkpointed(part, base)
            logged, written = copied if copied is not None else (None, None)
            after = exportmap.stamp(self.path) if logged is not None else None
            if logged is None:
                prior = None
                _remove_database(part)
                with contextlib.closing(sqlite3.connect(part)) as dst:
                    dst.execute("PRAGMA synchronous=OFF")
                    self.db.backup(dst)
        with contextlib.closing(sqlite3.connect(part, isolation_level=None)) as dst:
            dst.execute("PRAGMA synchronous=OFF")  # fsync'd once, below
            touched: set[int] = set()
            if logged is not None:  # a copy of the WAL-mode file: update in its log
                dst.execute("PRAGMA wal_autocheckpoint=0")
                flipped = dst.execute(
                    "UPDATE shards SET state='placed' WHERE state='queued'"
                ).rowcount
                touched = exportmap.wal_pages(Path(f"{part}-wal"))
                dst.execute("PRAGMA journal_mode=DELETE")
                if flipped and 1 not in touched:
                    # in rollback mode the update would have counted itself in the header's
                    # change counter (in a log, only a write of page 1 does): rewrite the
                    # user version as it is, one rollback-mode write of page 1, so that the
                    # copy has the former bytes exactly
                    (version,) = dst.execute("PRAGMA user_version").fetchone()
                    dst.execute(f"PRAGMA user_version={int(version)}")
                    touched.add(1)
            else:
                dst.execute("PRAGMA journal_mode=DELETE")
                dst.execute("UPDATE shards SET state='placed' WHERE state='queued'")
            (page_size,) = dst.execute("PRAGMA page_size").fetchone()
        # durable before it is renamed into place and a map names its stamp: after a power
        # loss, a kept copy whose pages did not reach the disk must not look current
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        part.rename(dest)
        changed = frozenset()
        if prior is not None and logged is not None:
            # patched: the pages that differ from the last export, exactly; else a superset
            changed = frozenset((logged | prior.carried if written is None else written) | touched)
        return Export(
            dest.stat().st_size,
            after,
            page_size,
            frozenset(touched),
            changed,
            prior,
            exportmap.stamp(dest),
            None if written is None else len(written),
        )

    def remember_export(self, m: exportmap.ExportMap) -> None:
        """Keep ``m`` as the map of the last export, if the index file is still the one it
        was taken from (else the next export hashes every block)."""
        path = self.export_map
        if path is None:
            return
        with self.lock:
            if exportmap.stamp(self.path) == m.stamp:
                exportmap.save(path, m)
            else:
                exportmap.forget(path)

    def _valid_export_map(self) -> exportmap.ExportMap | None:
        """The map of the last export, when it still describes the index file (its stamp)."""
        path = self.export_map
        if path is None:
            return None
        m = exportmap.load(path)
        if m is None or m.stamp != exportmap.stamp(self.path):
            return None
        (page_size,) = self.db.execute("PRAGMA page_size").fetchone()
        return m if m.page_size == page_size else None

    def fold_log(self) -> None:
        """Empty the write-ahead log into the file (automatic checkpoints are off: see
        :mod:`.exportmap`), first recording the pages it holds, durably, as carried by the
        map of the last export, so that the next export still knows them; then stamp the map
        with the file as the checkpoint left it. When the checkpoint emptied the log and the
        kept copy of the last export is valid (:meth:`export_to`), the carried pages that
        now hold the bytes they have in it are dropped first: the flush after a big backup
        rewrites every shard row with the bytes its export already showed, and compared
        here, while those pages are still in the page cache, they cost the next export
        nothing (compared there, after a big restore, they were thousands of reads from
        disk)."""
        with self.lock:
            m = self._valid_export_map()
            path = self.export_map
            wal = Path(f"{self.path}-wal")
            if m is not None and path is not None:
                pages = exportmap.wal_pages(wal)
                m.carried |= pages
                exportmap.save(path, m)
            busy, log, moved = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if m is not None and path is not None:
                m.stamp = exportmap.stamp(self.path)
                kept = self.export_copy
                if not busy and log == moved and not _size(wal) and kept and _kept(kept, m.copy):
                    m.carried = self._differing(kept, m.carried, m.page_size)
                exportmap.save(path, m)

    def _differing(self, copy: Path, pages: set[int], page_size: int) -> set[int]:
        """Those of ``pages`` (1-based) whose bytes in the index file differ from those in
        the file ``copy`` (a page past the end of either counts by what is there)."""
        if self._copy_fd is None:
            self._copy_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        fd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return {p for p, _page in _pages_differing(self._copy_fd, fd, pages, page_size)}
        finally:
            os.close(fd)

    def _copy_checkpointed(
        self, dest: Path, base: exportmap.ExportMap | None
    ) -> tuple[set[int], set[int] | None] | None:
        """Copy the database file to ``dest`` after a checkpoint that empties the write-ahead
        log (under the lock: no write of this connection comes between). With ``base``, the
        valid map of the last export, ``dest`` holds that export: of the pages that may
        differ from it (those the log held, ``base.carried``, page 1) those that do are
        written into it, and it is cut to the file's length; without, the whole file is
        copied. Returns the pages the log held (read from its frame headers just before the
        checkpoint) and the pages written into ``dest`` (None: the whole file) when the
        copy is whole: the log was emptied, and is still empty after the copy, so no
        checkpoint can have written into the file while it was read (another process's,
        say); None when it is not."""
        if not isinstance(self.path, Path):
            return None
        wal = Path(f"{self.path}-wal")
        pages = exportmap.wal_pages(wal)
        busy, log, moved = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy or log != moved or _size(wal):
            return None
        if self._copy_fd is None:
            self._copy_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        src = self._copy_fd
        size = os.fstat(src).st_size
        if base is None:
            with open(dest, "wb") as out:
                done = 0
                while done < size:  # at explicit offsets: the shared descriptor has no position
                    sent = os.sendfile(out.fileno(), src, done, size - done)
                    if sent == 0:
                        break
                    done += sent
            whole, written = done == size, None
        else:
            # a page the log or the map names may hold the bytes it had (the flush after a
            # big backup rewrites every shard row its export already showed placed): only
            # those that differ are written, and only they count as changed
            written = set()
            step = base.page_size
            todo = {p for p in pages | base.carried | {1} if (p - 1) * step < size}
            with open(dest, "r+b") as out:
                for p, page in _pages_differing(src, out.fileno(), todo, step):
                    os.pwrite(out.fileno(), page, (p - 1) * step)
                    written.add(p)
                os.ftruncate(out.fileno(), size)
            whole = True
        return None if not whole or _size(wal) else (pages, written)


def _pages_differing(
    src: int, copy: int, pages: set[int], page_size: int
) -> Iterator[tuple[int, bytes]]:
    """(page number, its bytes in ``src``) of each of ``pages`` (1-based) whose bytes differ
    between the files open at ``src`` and ``copy``, in order. Both files' pages are asked of
    the kernel first (``POSIX_FADV_WILLNEED``, by runs of adjacent pages), so that pages
    not in the page cache are read from the disk together rather than one at a time."""
    order = sorted(pages)
    runs: list[tuple[int, int]] = []  # (first page, count)
    for p in order:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    for fd in (src, copy):
        for first, count in runs:
            os.posix_fadvise(fd, (first - 1) * page_size, count * page_size, os.POSIX_FADV_WILLNEED)
    for p in order:
        at = (p - 1) * page_size
        page = os.pread(src, page_size, at)
        if os.pread(copy, page_size, at) != page:
            yield p, page


def _kept(path: Path, copy: exportmap.Stamp) -> bool:
    """Whether the file at ``path`` is the copy an export left with stamp ``copy``, untouched
    since: same stamp, and no SQLite journal or log beside it (one would be replayed into
    it when it is opened)."""
    try:
        if exportmap.stamp(path) != copy:
            return False
    except FileNotFoundError:
        return False
    return not any(Path(f"{path}{s}").exists() for s in _COMPANIONS)


#: The files SQLite keeps beside a database file.
_COMPANIONS = ("-journal", "-wal", "-shm")


def _remove_database(path: Path) -> None:
    """Delete the database file at ``path`` and any journal or log SQLite left beside it."""
    for f in (path, *(Path(f"{path}{s}") for s in _COMPANIONS)):
        f.unlink(missing_ok=True)


def _size(path: Path) -> int:
    """Bytes of the file at ``path``; 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _Tx:
    def __init__(self, index: Index) -> None:
        self.index = index

    def __enter__(self) -> sqlite3.Connection:
        self.index.lock.acquire()
        self.index.db.execute("BEGIN IMMEDIATE")
        return self.index.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.index.db.execute("COMMIT")
                path = self.index.path
                if isinstance(path, Path) and _size(Path(f"{path}-wal")) > WAL_FOLD_BYTES:
                    # the transaction is committed: a fold that fails is retried at the next
                    # one (a stale map costs one full hashing, never a wrong id)
                    with contextlib.suppress(OSError, sqlite3.Error):
                        self.index.fold_log()
            else:
                self.index.db.execute("ROLLBACK")
        finally:
            self.index.lock.release()


def stored_vault_id(path: Path) -> str | None:
    """The vault id (hex) recorded in the index file at ``path``; None when there is no file
    there (none is created) or it records no vault id."""
    if not path.exists():
        return None
    with contextlib.closing(Index(path)) as index:
        return index.get("vault_id")


def stored_remote_specs(path: Path) -> list[str]:
    """The specs of every remote (active or removed) recorded in the index file at ``path``,
    read without changing the file (no migration, no journal); none when there is no file."""
    if not path.exists():
        return []
    uri = path.resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return [s for (s,) in db.execute("SELECT spec FROM remotes")]


def stored_coding(path: Path) -> tuple[int, int, list[str]] | None:
    """(k, n, specs of the active remotes in placement order) as the index file at ``path``
    records them, read without a key and without changing the file; None when there is no
    file there."""
    if not path.exists():
        return None
    uri = path.resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        kn = dict(db.execute("SELECT key, value FROM settings WHERE key IN ('k', 'n')"))
        specs = db.execute("SELECT spec FROM remotes WHERE state='active' ORDER BY position, id")
        return int(kn.get("k") or 0), int(kn.get("n") or 0), [s for (s,) in specs]


def seen_manifest_seq(path: Path, vault_id: str) -> int:
    """The newest manifest sequence number the index file at ``path`` has recorded, if it is
    the index of vault ``vault_id`` (hex); 0 when there is no file there (none is created)
    or it belongs to another vault."""
    if not path.exists():
        return 0
    with contextlib.closing(Index(path)) as index:
        if index.get("vault_id") != vault_id:
            return 0
        return manifests.newest_seq(index)


def open_shipped(path: Path, chunk_id_key: bytes) -> Index:
    """Open an index file downloaded from the remotes (restore's disaster path), brought to
    the current schema (:func:`migrate`, with the key of the vault it was sealed under).

    The file was authenticated before it got here (AEAD under the seed, its shards pinned by
    the signed manifest), so only a seed holder can make a hostile one. Even so, a file that
    SQLite cannot read, that fails its structural check (``PRAGMA quick_check``: every page
    read once), or whose schema the migration cannot apply is an IntegrityError, never a
    sqlite3 exception; and functions in its views and triggers are not trusted."""
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("PRAGMA trusted_schema=OFF")
            db.execute("PRAGMA cell_size_check=ON")
            (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
        index = Index(path)
        try:
            index.upgrade(chunk_id_key)
        except BaseException:
            index.close()
            raise
        return index
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # its report may not be UTF-8
        raise IntegrityError(f"the downloaded index is not a usable SQLite file: {e}") from None
