"""What the command line does before its heavy imports: start unlocking the keyfile.

Importing typer, rich, cryptography and the engine takes about as long as the keyfile's
scrypt; scrypt releases the GIL, so starting it first lets the two overlap (vaultfs/kdf.py).
Only the standard library is imported here. A guess that turns out wrong (another keyfile,
another passphrase) costs one idle thread: the real unlock derives its own key.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Commands that never unlock an existing keyfile.
_NO_UNLOCK = {"init", "recover", "graph", "migrate"}


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def start(argv: list[str]) -> None:
    passphrase = os.environ.get("VAULTFS_PASSPHRASE")
    args = argv[1:]
    if not passphrase or not args or "--help" in args or "--seed-file" in args:
        return
    if os.environ.get("VAULTFS_SEED") or _NO_UNLOCK & set(args):
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
