"""The upload queue on disk: ``<home>/queue``, and durable writes into it.

Layout: ``tmp/`` (shard files being written; anything there after a crash is removed),
``r<remote id>/data/`` and ``r<remote id>/meta/`` (shard objects waiting for their
remote; ``rclone move`` removes each after its upload), ``manifests/`` (signed manifests
waiting for every remote). Queue files are the truth about what is pending (invariant 5,
vaultfs/vault/uploads.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from .. import segment
from ..errors import ConfigError, DiskFull
from ..index.segments import NewShard
from ..sealer import ShardFile

#: The subdirectories of a remote's queue directory (and of the remote).
SUBDIRS = ("data", "meta")


def queue_bound(home: Path, held: int) -> int:
    """How many bytes of shards still needing a home (fewer than k of their segment placed)
    the queue may hold while a backup writes more, given that it holds ``held`` now: half of
    what is free beside them on the home's file system, so that the shards of the remotes
    that are behind and the index find room too; ``VAULTFS_QUEUE_MIB`` sets it instead
    (docs/operations.md, "Free space in the home"). Not a fixed cap: a backup waits on its
    uploads (:meth:`UploadQueue.drain`) only when the home runs short, so where there is
    room sealing runs ahead of the uploads as it did unbounded."""
    env = os.environ.get("VAULTFS_QUEUE_MIB")
    if env:
        try:
            mib = float(env)
        except ValueError:
            mib = 0.0
        if not 0 < mib < 1 << 40:
            raise ConfigError(f"VAULTFS_QUEUE_MIB={env!r}: give a positive number of MiB")
        return int(mib * 1024 * 1024)
    st = os.statvfs(home)
    return (st.f_bavail * st.f_frsize + held) // 2


def fsync_dir(path: Path) -> None:
    """fsync directory ``path`` (so renames and creations in it are durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync the file at ``path`` (written and closed earlier)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: sync_file_range(2)'s flag that starts writing a range's dirty pages back, without waiting.
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """libc's sync_file_range (Linux), which Python's :mod:`os` does not wrap; None
    elsewhere."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages to the disk now, without waiting
    and without making anything durable (no metadata, no cache flush): the fsync that must
    follow then waits for less. Without it the pages wait for the fsync, and a repair's
    fsyncs of one batch after another were its bound once the rebuild was done (measured:
    the last batches committed 0.3 s after the workers had finished, docs/benchmarks.md,
    "audit"). Best effort: does nothing where sync_file_range is missing or refuses."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def write_durable(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` and fsync it. A full disk removes the partial file and
    raises DiskFull (the caller's transaction has not recorded it). With ``fsync=False`` the
    caller makes it durable later, before any transaction names it (:func:`sync_files`:
    repair fsyncs a whole batch's objects together); its writeback starts now
    (:func:`start_writeback`)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
            else:
                start_writeback(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)
            raise DiskFull(
                f"local disk full while writing {path.parent}: free space and retry "
                "(nothing acknowledged was lost)"
            ) from None
        raise


class ShardQueue:
    """Paths of the queue directory, and moving fsync'd shard files into it."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "queue"

    @property
    def tmp(self) -> Path:
        """Where shard files are written and fsync'd before they are queued."""
        return self.dir / "tmp"

    @property
    def manifests(self) -> Path:
        """Signed manifests waiting for their remotes."""
        return self.dir / "manifests"

    def remote_dir(self, rid: int) -> Path:
        """Remote ``rid``'s queue directory (moved to the remote as a whole)."""
        return self.dir / f"r{rid}"

    def shard_path(self, rid: int, kind: str, name: str) -> Path:
        """Where shard object ``name`` of a ``kind`` ('data' or 'meta') segment waits for
        remote ``rid``."""
        return self.dir / f"r{rid}" / kind / name

    def make_dirs(self) -> None:
        """Create ``tmp/`` and ``manifests/`` if missing."""
        for d in (self.tmp, self.manifests):
            d.mkdir(parents=True, exist_ok=True)

    def enqueue(
        self, kind: int, shards: list[ShardFile], placement: list[int], dirs: set[Path]
    ) -> list[NewShard]:
        """Rename the fsync'd ``tmp/`` files of ``shards`` to their remotes' queue
        directories (shard i to remote ``placement[i]``). Returns the shard rows for the
        transaction that records them; adds the directories to fsync (:func:`sync_dirs`)
        before that transaction to ``dirs`` (invariant 1, vaultfs/vault/writer.py)."""
        rows = []
        for sh, rid in zip(shards, placement, strict=True):
            dest_dir = self.remote_dir(rid) / segment.KIND_NAMES[kind]
            t = self.tmp / sh.name
            for attempt in range(5):
                # a concurrent flush may move the whole queue directory away (rclone's
                # server-side DirMove to a local remote): recreate it and retry
                dest_dir.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(t, dest_dir / sh.name)
                    break
                except FileNotFoundError:
                    if attempt == 4 or not t.exists():
                        raise
            dirs.add(dest_dir)
            rows.append((sh.idx, sh.name, rid, sh.size, sh.hash, sh.blocks, sh.root))
        return rows


def sync_files(paths: list[Path], pool: Executor) -> None:
    """fsync files written with ``write_durable(..., fsync=False)``, all at once on ``pool``'s
    threads; returns when every one is durable. Concurrent fsyncs share the file system's
    journal commits (ext4's jbd2 joins them into one), where one after the other each waits
    for a commit of its own (docs/design.md, "Repair batches")."""
    for _ in pool.map(fsync_file, paths):
        pass


def sync_dirs(dirs: set[Path]) -> None:
    """fsync the queue directories :meth:`ShardQueue.enqueue` renamed files into."""
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):  # moved to the remote meanwhile
            fsync_dir(d)
