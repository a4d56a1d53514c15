"""What the command line does before its heavy imports: start unlocking the keyfile (and,
for a restore from remotes alone, the rclone daemon).

Importing typer, rich, cryptography and the engine takes about as long as the keyfile's
scrypt; scrypt releases the GIL, so starting it first lets the two overlap (vaultfs/kdf.py).
Only the standard library and two small engine modules (kdf, remotes) are imported here. A
guess that turns out wrong (another keyfile, another passphrase) costs one idle thread: the
real unlock derives its own key.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Commands that never unlock an existing keyfile.
_NO_UNLOCK = {"init", "recover", "graph", "migrate"}

#: Secrets the command line takes from the environment. They are moved out of
#: ``os.environ`` as soon as they are read (:func:`secret`), so no child process (rclone,
#: decoders, pg tools) inherits them.
SECRETS = ("VAULTFS_PASSPHRASE", "VAULTFS_NEW_PASSPHRASE", "VAULTFS_SEED")
_taken: dict[str, str] = {}


def secret(name: str) -> str | None:
    """The value of secret environment variable ``name`` (one of :data:`SECRETS`), removed
    from the environment on first read; a value set again later replaces the one taken."""
    value = os.environ.pop(name, None)
    if value is not None:
        _taken[name] = value
    return _taken.get(name)


def take_secrets() -> None:
    """Move every secret out of the environment now (the first thing the command line does).
    A passphrase handed over on a pipe (``VAULTFS_PASSPHRASE_FD``, how the mount daemon gets
    it from vaultfs/daemon.py) is read and the pipe closed."""
    fd = os.environ.pop("VAULTFS_PASSPHRASE_FD", None)
    if fd is not None and fd.isdigit():
        try:
            with os.fdopen(int(fd), "rb") as f:
                _taken["VAULTFS_PASSPHRASE"] = os.fsdecode(f.read())
        except OSError:  # not an open pipe: as if none was handed over
            pass
    for name in SECRETS:
        secret(name)


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def start(argv: list[str]) -> None:
    """Take the secrets out of the environment, then start the keyfile's scrypt if this
    command will unlock one (vaultfs/kdf.py normalises the passphrase), and the rclone
    daemon if its first step lists remotes (`restore --from`: vaultfs/remotes.py)."""
    take_secrets()
    passphrase = secret("VAULTFS_PASSPHRASE")
    args = argv[1:]
    if args[:1] == ["restore"] and "--help" not in args:
        if any(a == "--from" or a.startswith("--from=") for a in args):
            from vaultfs.remotes import RcloneDaemon

            RcloneDaemon.start_ahead()
    if not passphrase or not args or "--help" in args or "--seed-file" in args:
        return
    if secret("VAULTFS_SEED") or _NO_UNLOCK & set(args):
        return
    keyfile = _value(args, "--keyfile")
    if keyfile is None:
        home = _value(args, "--home") or os.environ.get("VAULTFS_HOME")
        if home is None:
            xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            home = os.path.join(xdg, "vaultfs")
        keyfile = os.path.join(os.path.expanduser(home), "key.json")
    from vaultfs import kdf

    kdf.prefetch(Path(keyfile), passphrase)
