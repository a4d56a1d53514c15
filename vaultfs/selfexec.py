"""How a vaultfs process starts another vaultfs process (the mount daemon, `mount.vaultfs`'s
`vaultfs mount`, the systemd unit's `vaultfs run`) and how the mount daemon leaves the
working directory it was started in.

``python -m cli.main`` alone puts the working directory first on ``sys.path``: a ``rich.py``
or ``trio.py`` lying there would run, as root for a root mount, in the process that holds the
vault's key. ``-P`` (Python 3.11) leaves it out and keeps ``PYTHONPATH``, so the child
imports what its parent imports.
"""

from __future__ import annotations

import os
import sys


def cli_argv(*args: str) -> list[str]:
    """The command line of `vaultfs ARGS…` run by this interpreter, the working directory
    not on its import path."""
    return [sys.executable, "-P", "-m", "cli.main", *args]


def leave_cwd() -> None:
    """Make this process (a long-lived daemon) independent of its working directory: every
    Python it starts later (multiprocessing's forkserver runs ``python -c``, which puts
    ``''``, the working directory, first on its path) leaves the working directory off its
    import path (``PYTHONSAFEPATH``) and finds the modules this one found (``PYTHONPATH``
    made absolute, an empty entry, the working directory, dropped); then go to ``/``, so the
    daemon neither keeps the directory busy nor fails when it is deleted. Call it before any
    thread starts and after every relative path it needs is made absolute."""
    entries = os.environ.get("PYTHONPATH")
    if entries is not None:
        kept = [os.path.abspath(p) for p in entries.split(os.pathsep) if p]
        if kept:
            os.environ["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del os.environ["PYTHONPATH"]
    os.environ["PYTHONSAFEPATH"] = "1"
    os.chdir("/")
