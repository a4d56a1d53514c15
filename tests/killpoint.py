"""Run a vaultfs command that kills itself at an exact step: the deterministic twin of the
random kills of tests/torture.py, for regression tests of one crash window.

    python tests/killpoint.py MODULE:QUALNAME:WHEN[:N] VAULTFS-ARGS...

wraps the function or method ``QUALNAME`` of ``MODULE`` (for example
``vaultfs.rotation:collect_garbage`` or ``vaultfs.backends:Metered.delete``) and, at its
``N``-th call (1 by default), sends SIGKILL to the whole process group, before the call
(``WHEN`` = ``before``) or after it returned (``after``). Run it in a session of its own
(``start_new_session=True``) so that the kill takes the rclone daemon with it, as a crash
does. Exit status as ``vaultfs``'s when the point is never reached.
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def arm(spec: str) -> None:
    """Wrap the function ``spec`` names so that its N-th call kills the process group."""
    module, qualname, when, *count = spec.split(":")
    if when not in ("before", "after"):
        raise SystemExit(f"killpoint: WHEN is before or after, not {when!r}")
    nth = int(count[0]) if count else 1
    owner: Any = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    fn: Callable[..., Any] = getattr(owner, name)
    calls = 0
    counting = threading.Lock()

    def die() -> None:
        sys.stdout.flush()
        os.killpg(0, signal.SIGKILL)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        # each call's number is its own: threads calling at once (one download per remote)
        # must not both see the count move past N before either checks it
        with counting:
            calls += 1
            this = calls
        if this == nth and when == "before":
            die()
        out = fn(*args, **kwargs)
        if this == nth and when == "after":
            die()
        return out

    setattr(owner, name, wrapped)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    arm(sys.argv[1])
    sys.argv = ["vaultfs", *sys.argv[2:]]
    runpy.run_module("cli.main", run_name="__main__")
