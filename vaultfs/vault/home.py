"""Opening a vault's home directory: its files, the process lock, making a new vault, and
the staging directory a lost home is rebuilt in (vaultfs/rebuild.py).

``<home>/key.json`` (the keyfile), ``<home>/index.db`` (the index),
``<home>/index-objects.db`` (the index blocks already shipped: vaultfs/index/shipped.py, a
cache), ``<home>/index.db-exportmap`` and ``<home>/index.db-export`` (the last export's block
map and the export itself, which the next commit patches: vaultfs/index/exportmap.py, caches),
``<home>/queue/`` (vaultfs/vault/queue.py), ``<home>/lock`` (held by the one process using the
vault).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .. import erasure
from ..backends import open_backend
from ..chunker import NEW_VAULT_AVG
from ..errors import (
    InputError,
    NotEnoughRemotes,
    NoVault,
    RemoteHoldsVault,
    TargetNotEmpty,
    VaultBusy,
    WrongKey,
)
from ..index import Index, VaultParams, keyring
from ..index import remotes as remote_table
from ..keys import SUITE_XWING_AES256GCM, VaultKeys, new_seed, read_keyfile, write_keyfile
from ..remotes import check_distinct
from .queue import ShardQueue, fsync_dir


def default_home() -> Path:
    """``$VAULTFS_HOME``, else ``$XDG_DATA_HOME/vaultfs`` (``~/.local/share/vaultfs``)."""
    env = os.environ.get("VAULTFS_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "vaultfs"


def keyfile_path(home: Path) -> Path:
    return home / "key.json"


def index_path(home: Path) -> Path:
    return home / "index.db"


def take_lock(home: Path) -> int:
    """Lock the vault at ``home`` for this process; returns the lock file's descriptor
    (closing it releases the lock). Raises VaultBusy when another process holds it."""
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VaultBusy(
            held_by_mount(home)
            or f"the vault at {home} is in use by another vaultfs process "
            "(a mount or a running backup); wait for it or unmount first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def held_by_mount(home: Path) -> str | None:
    """Why the vault at ``home`` cannot be taken when a mount's daemon holds it: finishing
    after an unmount (:func:`_finishing_mount`), serving its mountpoint (it answers on the
    control socket), or detached and serving the files still open (:func:`detached_mount`);
    None when no mount does."""
    from ..control import mounted

    if finishing := _finishing_mount(home):
        return finishing
    if (info := mounted(home)) is None:
        return None
    if info.get("detached"):
        return (
            f"the vault at {home} is still held by its previous mount: "
            f"{detached_mount(info)}. Close those files (or wait until they are closed) and "
            "for its daemon to exit, then run this again"
        )
    return f"the vault at {home} is mounted at {info['mountpoint']}: `vaultfs umount` it first"


def detached_mount(info: dict) -> str:
    """What a mount detached by a lazy unmount (``fusermount3 -u -z`` while files there stay
    open) still does, ``info`` being its daemon's ``ping`` or ``status`` mount reply: said by
    `status`, `umount` and whatever the daemon's lock refuses, so none of them sends the
    user to an unmount that cannot work (vaultfs/daemon.py, in_mount_table)."""
    return (
        f"the mount at {info['mountpoint']} was detached by a lazy unmount while files there "
        f"stayed open: its daemon (pid {info['pid']}) serves those files until they are "
        "closed, then stores what they wrote and exits (nothing is lost); its routine has "
        "stopped"
    )


def _finishing_mount(home: Path) -> str | None:
    """Why the lock is held when it is a mount's daemon that is unmounted and still
    finishing (HOME/mount.json, vaultfs/daemon.py): the job it waits for, or the uploads
    under way; None otherwise."""
    try:
        state = json.loads((home / "mount.json").read_text())
        pid, finishing = int(state["pid"]), state.get("finishing")
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(finishing, dict):
        return None
    job = finishing.get("job")
    what = "the uploads under way"
    if isinstance(job, dict) and job.get("job"):
        with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
            since = time.strftime("%H:%M:%S", time.localtime(float(job.get("started") or 0)))
            what = f"its {job['job']} (running since {since}), then {what}"
    return (
        f"the vault at {home} is still held by the daemon of its last mount (pid {pid}): "
        f"unmounted, it finishes {what} and exits by itself. Wait for it to exit, then "
        f"run this again (its log: {home / 'mount.log'})"
    )


def check_vault(home: Path) -> None:
    """NoVault, saying what to do, unless ``home`` holds a vault (its index)."""
    if index_path(home).exists():
        return
    tiers = home / "tiers"  # strategy.TIERS_DIR (not imported: it pulls in the YAML parser)
    if tiers.is_dir() and any((t / "index.db").exists() for t in tiers.iterdir()):
        names = sorted(t.name for t in tiers.iterdir() if (t / "index.db").exists())
        raise NoVault(
            f"{home} is a strategy's home, not a vault's: each tier is a vault of its own "
            f"({', '.join(names)}); pass --home {tiers}/NAME, or use `vaultfs strategy show`"
        )
    raise NoVault(
        f"no vault at {home}: run `vaultfs init`, or `vaultfs home rebuild --from REMOTE` "
        "to make this machine's copy of an existing vault, or pass --home"
    )


def dead_mount(home: Path) -> dict | None:
    """What HOME/mount.json says of a mount whose daemon is dead (killed or crashed: a
    daemon that exits removes the file, vaultfs/daemon.py), {"pid", "mountpoint", ...};
    None when there is no such file or its daemon lives."""
    try:
        state = json.loads((home / "mount.json").read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return state
    except OSError:  # alive, another user's (a reused pid)
        pass
    return None


def _check_home_path(home: Path) -> None:
    """InputError unless ``home`` is, or can be made as, a directory: its nearest existing
    ancestor must be a directory."""
    p = home
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise InputError(f"cannot make the vault home {home}: {p} is not a directory")


#: Prefix of the directory inside the home that :func:`initialize` builds a new vault in.
INIT_STAGING = ".init-"
#: In an init's staging directory: the names it moves into the home, written before the
#: first move (:func:`_sweep_init` rolls back an init killed midway by it).
INIT_NAMES = ".names"


@contextlib.contextmanager
def initialize(
    home: Path,
    remote_specs: list[str],
    k: int,
    n: int,
    passphrase: str,
    seed: bytes | None,
    segment_size: int,
    immutable: bool = False,
    object_lock: str | None = None,
) -> Iterator[tuple[VaultKeys, Index, int]]:
    """Make a new vault at ``home`` over empty remotes: keys and keyfile, the index with
    its parameters (``immutable``: an append-only vault; ``object_lock``: the S3 Object Lock
    retention its S3 remotes' specs carry), remotes and key epoch 0, the queue. Yields
    (keys, index, lock fd) for the caller to open the vault with.

    All or nothing: the vault is built in a staging directory inside the home (``.init-*``)
    and its files are moved into the home once complete, ``index.db`` last. Until the
    ``with`` block ends well, any error (a full disk, a remote refusing, Ctrl-C) removes what
    this call made: the moved files, the staging directory, the lock file and the home
    directory (and its parents) if it made them; what the home held before (a strategy
    file, valence.toml) stays. An init killed midway leaves the staging directory (and
    maybe some moved files, never ``index.db``): the next `init` of that home rolls it back
    (:func:`_sweep_init`). docs/design.md, crash states."""
    erasure.validate(k, n)
    if not remote_specs:
        raise NotEnoughRemotes("a vault needs at least one --remote")
    check_distinct(remote_specs)  # one spec twice, or one directory under two names
    if index_path(home).exists():  # index.db comes last: its presence means a vault
        raise NoVault(f"a vault already exists at {home}; use another --home")
    _check_home_path(home)  # before any remote is touched
    made = _make_dirs(home)
    mode = home.stat().st_mode & 0o7777
    lock_made = not (home / "lock").exists()
    lock: int | None = None
    staging: Path | None = None
    moved: list[str] = []
    try:
        lock = take_lock(home)
        _sweep_init(home)
        if index_path(home).exists() or keyfile_path(home).exists():
            raise NoVault(f"a vault already exists at {home}; use another --home")
        if (home / "queue").exists():
            raise NoVault(
                f"{home / 'queue'} is left from an earlier vault (its index and keyfile are "
                "gone): move it away, or use another --home"
            )
        remotes = [open_backend(s) for s in remote_specs]
        for r in remotes:
            r.ensure()
            existing = r.list("manifests")
            if existing:
                # the command to run names the remote by the spec given (a label elides the
                # parameters of a connection string, so `--from LABEL` would not open it)
                raise RemoteHoldsVault(
                    f"remote {r.label} already holds a vault (manifests/ is not empty); give an "
                    "empty location, or, if it is the vault whose home this was, rebuild the "
                    f"home from it: `vaultfs home rebuild --home {shlex.quote(str(home))} "
                    f"--from {shlex.quote(r.spec)}`",
                    r.spec,
                )
        # the owner's only: the index names every file and its size, mount.log names paths
        os.chmod(home, 0o700)
        staging = Path(tempfile.mkdtemp(prefix=INIT_STAGING, dir=home))
        keys = _build(staging, remote_specs, k, n, passphrase, seed, segment_size,
                      immutable, object_lock)  # fmt: skip
        names = sorted(os.listdir(staging), key=lambda nm: (nm == index_path(staging).name, nm))
        (staging / INIT_NAMES).write_text("".join(f"{nm}\n" for nm in names))
        sync_tree(staging)
        for nm in names:
            if (home / nm).exists():  # appeared meanwhile: not ours to replace
                raise NoVault(f"{home / nm} appeared while the vault was made; nothing kept")
            os.rename(staging / nm, home / nm)
            moved.append(nm)
        fsync_dir(home)
        shutil.rmtree(staging)
        staging = None
        index = Index(index_path(home))
        try:
            yield keys, index, lock
        except BaseException:
            index.close()
            raise
    except BaseException:
        for nm in reversed(moved):
            _remove(home / nm)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            if lock_made:
                _remove(home / "lock")
            os.close(lock)
        with contextlib.suppress(OSError):
            os.chmod(home, mode)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _build(
    staging: Path,
    remote_specs: list[str],
    k: int,
    n: int,
    passphrase: str,
    seed: bytes | None,
    segment_size: int,
    immutable: bool,
    object_lock: str | None,
) -> VaultKeys:
    """Write a new vault's keyfile, index and queue into the directory ``staging``
    (:func:`initialize`); returns its keys. The index is closed again (its write-ahead log
    folded away), so the files can move."""
    keys = VaultKeys.from_seed(seed or new_seed())
    keys.generate_slhdsa()  # hash-based second signature (docs/keys.md)
    assert keys.slhdsa_public is not None
    write_keyfile(keyfile_path(staging), keys, passphrase)
    data_key = keys.new_epoch_key()
    params = VaultParams(
        keys.vault_id.hex(), k, n, segment_size, NEW_VAULT_AVG, time.time(), immutable,
        object_lock,
    )  # fmt: skip
    with contextlib.closing(Index(index_path(staging))) as index, index.tx() as db:
        params.write(db)
        keyring.set_current(db, 0, SUITE_XWING_AES256GCM)
        keyring.set_slhdsa(db, keys)
        for pos, spec in enumerate(remote_specs):
            remote_table.add(db, spec, pos)
        keyring.add_epoch(
            db, 0, SUITE_XWING_AES256GCM, keys.wrap_data_key(0, data_key), time.time()
        )
    ShardQueue(staging).make_dirs()
    return keys


def _make_dirs(home: Path) -> list[Path]:
    """Make ``home`` and its missing parents; returns those made, outermost first."""
    missing = []
    p = home
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours to remove
            continue
        made.append(d)
    return made


def _remove(path: Path) -> None:
    """Remove the file or directory tree at ``path``, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sweep_init(home: Path) -> None:
    """Roll back what an init of ``home`` killed midway left (its caller holds the home's
    lock, so no init runs there): each staging directory goes, and the files such an init
    had moved into the home before ``index.db`` (those its names list shows gone from the
    staging directory) go with it. One whose ``index.db`` has moved made a whole vault:
    only its empty staging directory goes."""
    for staging in home.glob(f"{INIT_STAGING}*"):
        if not staging.is_dir() or staging.is_symlink():
            continue
        names = staging / INIT_NAMES
        if names.exists() and index_path(staging).exists():
            for nm in names.read_text().split():
                if not (staging / nm).exists():
                    _remove(home / nm)
        shutil.rmtree(staging, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def load(
    home: Path, passphrase: str | None, keys: VaultKeys | None, lock: bool
) -> tuple[VaultKeys, Index, int | None]:
    """Open the vault at ``home`` with ``keys`` (or the keyfile's, unlocked with
    ``passphrase``), taking its lock if ``lock``. Returns (keys, index, lock fd or None).
    Raises NoVault when there is none, WrongKey when the key is another vault's."""
    check_vault(home)
    if keys is None:
        if passphrase is None:
            raise NoVault("a passphrase is needed to open the vault")
        keys = read_keyfile(keyfile_path(home), passphrase)
    lock_fd = take_lock(home) if lock else None
    index = Index(index_path(home))
    stored = VaultParams.read(index).vault_id
    if stored != keys.vault_id.hex():
        index.close()
        if lock_fd is not None:
            os.close(lock_fd)
        if not stored:  # made by an init of an older vaultfs that failed midway
            raise NoVault(
                f"{home} holds a half-made vault (an `init` that failed before it recorded the "
                "vault; nothing was backed up into it): delete its index.db, key.json, queue/ "
                "and lock, then run `vaultfs init` again"
            )
        raise WrongKey(
            f"the key does not belong to the vault at {home} (its key.json was replaced or "
            "copied from another vault; use this vault's keyfile or `vaultfs keys recover`)"
        )
    index.upgrade(keys.chunk_id_key)  # the key is this vault's: keyed migrations are safe
    return keys, index, lock_fd


def rebuild_staging(home: Path) -> tuple[Path, int]:
    """A new empty directory beside ``home`` to build a home in (``vaultfs home rebuild``),
    once ``home`` is known to hold nothing (TargetNotEmpty when it holds anything, so an
    existing index is never replaced), with its lock taken (:func:`take_lock`; the lock file
    becomes the home's). Returns (directory, lock fd). Staging directories of the same home
    that an interrupted rebuild left behind (``.<name>.rebuild-*``, never a usable home) are
    removed first; one whose lock is held belongs to a rebuild still running and stays."""
    if home.is_dir() and [p.name for p in home.iterdir()] == ["key.json"]:
        raise TargetNotEmpty(
            f"{home} holds a keyfile (from `vaultfs keys recover`?): move it out and give it "
            f"with --keyfile, e.g. `mv {home}/key.json {home.parent}/key.json`, then "
            f"`vaultfs home rebuild --home {home} --keyfile {home.parent}/key.json --from …`"
        )
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise TargetNotEmpty(
            f"{home} is not empty: a home is rebuilt only where none is; give another --home, "
            "or move what is there away first (an existing index is never replaced)"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    for old in home.parent.glob(f".{home.name}.rebuild-*"):
        try:
            fd = take_lock(old)
        except VaultBusy:
            continue
        except OSError:  # not a directory, or gone meanwhile: not ours to judge
            continue
        try:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.rebuild-", dir=home.parent))
    return staging, take_lock(staging)


def install(staging: Path, home: Path) -> None:
    """Make the complete home built in ``staging`` the home at ``home``, in one rename once
    every file in it is durable: a crash before the rename leaves no home at ``home`` (and a
    staging directory the next rebuild removes), after it a complete one. ``home`` must be
    absent or an empty directory (which the rename replaces); TargetNotEmpty when something
    appeared there meanwhile."""
    sync_tree(staging)
    try:
        os.rename(staging, home)
    except OSError as e:  # ENOTEMPTY / EEXIST / ENOTDIR: someone wrote there meanwhile
        raise TargetNotEmpty(
            f"{home} is no longer empty ({e.strerror}); nothing replaced"
        ) from None
    fsync_dir(home.parent)
