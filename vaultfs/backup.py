"""Backups: turn files, directories or a stdin stream into a snapshot of the vault."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from .errors import InputError
from .names import SPECIAL_TYPES

if TYPE_CHECKING:
    from .vault import Vault

Progress = Callable[[int], None]


def check_name(name: str) -> str:
    """Validate a relative snapshot path: no absolute paths, no '..', no empty parts."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise InputError(f"invalid path in snapshot: {name!r} (must be relative, without '..')")
    if "\0" in name:
        raise InputError(f"invalid path in snapshot: {name!r}")
    return str(p)


def _walk(root: Path, prefix: str) -> Iterator[tuple[Path, str, os.stat_result]]:
    st = root.lstat()
    yield root, prefix, st
    if stat.S_ISDIR(st.st_mode):
        try:
            children = sorted(os.listdir(root))
        except PermissionError as e:
            raise InputError(f"cannot read directory {root}: {e.strerror}") from None
        for name in children:
            yield from _walk(root / name, f"{prefix}/{name}")


def plan_paths(paths: list[Path]) -> list[tuple[Path, str]]:
    """Map each command-line path to its top-level name in the snapshot."""
    out: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for p in paths:
        if not os.path.lexists(p):
            raise InputError(f"{p}: no such file or directory")
        name = Path(os.path.abspath(p)).name or "root"
        if name in seen:
            raise InputError(
                f"{p} and {seen[name]} would both be stored as {name!r}; back them up separately"
            )
        seen[name] = p
        out.append((Path(p), name))
    return out


def _xattrs(p: Path) -> dict[str, bytes] | None:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return None
    out = {}
    for nm in names:
        try:
            out[nm] = os.getxattr(p, nm, follow_symlinks=False)
        except OSError:
            continue
    return out or None


def backup_paths(
    vault: Vault,
    paths: list[Path],
    name: str | None = None,
    progress: Progress | None = None,
    upload: bool = False,
    fork: bool = False,
    planned: Callable[[int], None] | None = None,
) -> tuple[str, int, int]:
    """Back up files and directories as one snapshot. Returns (snapshot uid, entries, bytes).
    ``fork``: record an explicit fork if the remotes moved on (:meth:`Vault.commit`).

    Keeps modes, owners, times, symlinks, extended attributes, hard links (files that
    share an inode get one link group and are stored once), fifos, sockets and device
    nodes, and names of any bytes (vaultfs/names.py). ``upload`` starts placing the
    shards on the remotes during the commit (the caller flushes next), and keeps the upload
    queue within its bound meanwhile (:meth:`Vault.store_stream`). ``planned`` is told the
    bytes of the regular files to read (a hard-linked file once) before the first is read:
    the tree is walked (lstat, listdir) once, first, and its stats serve both the total and
    the entries, so the total costs no system call more.
    """
    from .vault import Entry  # here, so that a restore (check_name) needs no Vault

    vault.survey_ahead()  # the remotes answer while the files are read
    entries: list[Entry] = []
    total = 0
    links: dict[tuple[int, int], Entry] = {}
    walked = [w for path, top in plan_paths(paths) for w in _walk(path, top)]
    if planned is not None:
        inodes = {
            (st.st_dev, st.st_ino): st.st_size for _p, _r, st in walked if stat.S_ISREG(st.st_mode)
        }
        planned(sum(inodes.values()))
    for p, rel, st in walked:
        mode = stat.S_IMODE(st.st_mode)
        common = {"uid": st.st_uid, "gid": st.st_gid, "xattrs": _xattrs(p)}
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(rel, "d", mode, st.st_mtime_ns, **common))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, "l", mode, st.st_mtime_ns, target=os.readlink(p), **common))
        elif stat.S_ISREG(st.st_mode):
            first = links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None:
                entries.append(
                    Entry(
                        rel,
                        "f",
                        mode,
                        first.mtime_ns,
                        size=first.size,
                        cids=first.cids,
                        link=first.link,
                        **common,
                    )  # fmt: skip
                )
                continue
            try:
                f = open(p, "rb")  # noqa: SIM115
            except OSError as e:
                raise InputError(f"cannot read {p}: {e.strerror}") from None
            with f:
                cids, size = vault.store_stream(f, progress, bounded=upload)
            e = Entry(rel, "f", mode, st.st_mtime_ns, size=size, cids=cids, **common)
            if st.st_nlink > 1:
                e.link = len(links) + 1
                links[(st.st_dev, st.st_ino)] = e
            entries.append(e)
            total += size
        elif (special := SPECIAL_TYPES.get(stat.S_IFMT(st.st_mode))) is not None:
            # fifos, sockets and devices hold no data: kept as entries (rdev for devices)
            rdev = st.st_rdev if special in ("c", "b") else None
            entries.append(Entry(rel, special, mode, st.st_mtime_ns, rdev=rdev, **common))
    uid, _seq = vault.commit(entries, name=name, prepush=upload, fork=fork)
    return uid, len(entries), total


def backup_stream(
    vault: Vault,
    stream: BinaryIO,
    filename: str,
    name: str | None = None,
    progress: Progress | None = None,
    upload: bool = False,
    fork: bool = False,
) -> tuple[str, int, int]:
    """Back up one stream as file ``filename`` of a new snapshot; as :func:`backup_paths`.
    The file and its directories get the modes the process's umask gives new files (``umask
    077`` before ``pg_dump | vaultfs backup --stdin``: readable by the owner only)."""
    import time

    from .vault import Entry

    rel = check_name(filename)
    mask = os.umask(0o077)  # read it (no getter); the file is made as the shell would
    os.umask(mask)
    vault.survey_ahead()
    cids, size = vault.store_stream(stream, progress, bounded=upload)
    parts = rel.split("/")
    now = time.time_ns()
    entries = [Entry("/".join(parts[:i]), "d", 0o777 & ~mask, now) for i in range(1, len(parts))]
    entries.append(Entry(rel, "f", 0o666 & ~mask, now, size=size, cids=cids))
    uid, _seq = vault.commit(entries, name=name, prepush=upload, fork=fork)
    return uid, len(entries), size
