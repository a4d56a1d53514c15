"""Scratch directories a vaultfs process owns, and the sweep of those a killed one left.

A command's scratch (a repair's downloaded sources, an index fetched from the remotes, an
audit's batch, a restore's staging …) lives in a private (0700) directory named
``<prefix><pid>-<random>`` under the temporary directory (``$TMPDIR``, else ``/tmp``;
restores stage in ``/dev/shm`` when roomy). It is removed when the command ends, also on an
error; a process killed with ``kill -9`` (an OOM kill, a power cut) runs no clean-up, so the
pid in the name lets the next command that makes scratch of the same prefix remove it once
that pid is gone (:func:`sweep_dead_dirs`, one listing of the parent). A process that makes
many short-lived files (the file lists and payloads handed to rclone) keeps one such
directory for its whole life instead (:func:`process_scratch`), each file removed as soon as
its call is done: one sweep per process, not one per file. Contract of a sweep:
only direct children of the parent are considered, only real directories (never a symlink,
never followed) owned by this user, and never one whose pid is alive (another command at work
now; a reused pid keeps the directory until that process ends too).

The home's own scratch is not here: a rebuild's staging directory beside the home is guarded
by its lock (``vault/home.py``), a strategy pass's ``HOME/staging/`` by the run lock.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


def owned_tempdir(prefix: str, parent: str | None = None) -> str:
    """A new private (0700) directory ``<parent>/<prefix><pid>-*`` (``parent`` defaults to
    the temporary directory): the pid in the name lets a later process remove it
    (:func:`sweep_dead_dirs`) if this one is killed (-9), which runs no clean-up."""
    if "/" in prefix:
        raise ValueError(f"a scratch prefix is a name, not a path: {prefix!r}")
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie not yet reaped counts; another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def sweep_dead_dirs(
    prefix: str, parent: str | None = None, release: Callable[[Path], None] | None = None
) -> list[Path]:
    """Remove the directories ``<parent>/<prefix><pid>-*`` of processes that no longer exist
    (``parent`` defaults to the temporary directory); returns those removed.

    Left alone: a directory whose pid is alive (perhaps reused by another process: it stays
    until that one ends too) or is this process's, whose name carries no pid (made by an older
    version), another user's, and anything not a directory (a symlink is never followed).
    ``release`` is called on a directory before it is removed (:mod:`vaultfs.pgembed` stops
    the server a killed owner left running in it)."""
    if "/" in prefix:
        raise ValueError(f"a scratch prefix is a name, not a path: {prefix!r}")
    top = parent or tempfile.gettempdir()
    try:
        with os.scandir(top) as it:
            found = [e for e in it if e.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for e in found:
        pid, sep, _rest = e.name[len(prefix) :].partition("-")
        if not sep or not pid.isdigit() or not 0 < int(pid) < 1 << 31:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        if int(pid) == os.getpid() or alive(int(pid)):
            continue
        path = Path(e.path)
        if release is not None:
            release(path)
        remove_tree(path)
        removed.append(path)
    return removed


def remove_tree(path: Path | str) -> None:
    """Remove a scratch tree, also where it holds read-only directories (a drill restores
    modes); what still cannot go is left (the next sweep tries again)."""

    top = os.path.abspath(path)

    def retry(func: Callable[..., object], p: str, exc: object) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc
        if func not in (os.unlink, os.rmdir) or not isinstance(err, PermissionError):
            return
        if os.path.abspath(p) == top:  # its parent (the temporary directory) is not ours
            return
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)  # a directory inside the tree: ours
            func(p)

    shutil.rmtree(path, onerror=retry)


@contextlib.contextmanager
def owned_scratch(
    prefix: str, parent: str | None = None, release: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """A scratch directory for the length of the block: first the dead processes' directories
    of this ``prefix`` are swept (:func:`sweep_dead_dirs`), then this process's is made
    (:func:`owned_tempdir`) and removed when the block ends, however it ends."""
    sweep_dead_dirs(prefix, parent, release)
    d = Path(owned_tempdir(prefix, parent))
    try:
        yield d
    finally:
        remove_tree(d)


#: this process's directories of :func:`process_scratch`, by prefix
_process_dirs: dict[str, Path] = {}
_process_lock = threading.Lock()


def process_scratch(prefix: str) -> Path:
    """This process's scratch directory of ``prefix`` for the rest of its life, made on first
    use (after a sweep of the dead processes' of that prefix, :func:`sweep_dead_dirs`) in the
    temporary directory, and removed at exit (:func:`release_process_scratch`). It is made
    again if it went meanwhile (a cleaner of old files in /tmp, under a mount daemon running
    for weeks); a forked child makes its own. Whatever is put in it is removed by its user
    when done: the directory only gives a killed process's leftovers a name to be swept by."""
    with _process_lock:
        d = _process_dirs.get(prefix)
        if d is None or not d.is_dir():
            sweep_dead_dirs(prefix)
            d = _process_dirs[prefix] = Path(owned_tempdir(prefix))
        return d


def release_process_scratch() -> None:
    """Remove this process's :func:`process_scratch` directories: at interpreter exit, and
    from cli/main.py's ``os._exit``, which skips that. Never raises."""
    with _process_lock:
        dirs = list(_process_dirs.values())
        _process_dirs.clear()
    for d in dirs:
        remove_tree(d)


def _forget_process_scratch() -> None:
    """In a forked child: the parent's directories are not the child's to use or remove, and
    the lock may have been held by another thread of the parent at the fork."""
    global _process_lock
    _process_lock = threading.Lock()
    _process_dirs.clear()


atexit.register(release_process_scratch)
os.register_at_fork(after_in_child=_forget_process_scratch)
