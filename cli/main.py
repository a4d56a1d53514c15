"""The `vaultfs` command line (typer + rich): run the app.

Commands live in their own modules and register on ``cli.common.app``: cli/core.py (init,
backup, flush, snapshots, ls, status), cli/restore.py, cli/audit.py (verify, repair, prune,
remote), cli/keys.py (keys, reencrypt, receipt), cli/mount.py (mount, umount, snapshot),
cli/routine.py (forget, run, schedule), cli/home_cmd.py (home rebuild), cli/drill_cmd.py
(drill), cli/strategy_cmd.py (strategy), cli/wal_cmd.py (wal), cli/fork_cmd.py (fork
retire), cli/graph_cmd.py, cli/kb_cmd.py. The app imports a module when one of its commands
is looked up (cli.common.COMMANDS), not before.
Exit codes: see vaultfs/errors.py.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # `python -m cli.main`: start unlocking before the heavy imports
    from cli import early

    early.start(sys.argv)

from cli.common import app, err  # noqa: E402
from vaultfs.errors import VaultError  # noqa: E402


def main() -> None:
    """Console entry point: known errors become one sentence and a documented exit code."""
    run(app)


def run(application) -> None:
    """Run a typer application as a console script (``vaultfs``, ``valence``): a VaultError
    becomes one sentence and its exit code, a full disk likewise, and a local path that
    cannot be used (through a file, a loop of links, a system directory) one line naming it
    and exit 18; never returns."""
    import errno

    from vaultfs.errors import DiskFull, InputError

    code: int | str | None = 0
    try:
        application()  # standalone: typer exits itself on success, usage errors and Ctrl-C
    except SystemExit as e:
        code = e.code
    except VaultError as e:
        # one "error:" per line: a message of several problems (strategy check) reads alike
        for line in e.message.splitlines() or [""]:
            err.print(f"[red]error:[/] {line}", highlight=False)
        code = e.exit_code
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            err.print(f"[red]error:[/] disk full: {e}; free space and retry", highlight=False)
            code = DiskFull.exit_code
        elif e.filename is not None:  # a path the user gave that cannot be used as asked
            where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else e.filename
            err.print(f"[red]error:[/] {where}: {e.strerror or e}", highlight=False)
            code = InputError.exit_code
        else:
            raise
    _exit(code)


def _exit(code: int | str | None) -> None:
    """End the process without the interpreter's teardown (tens of milliseconds of module
    and object finalisation for nothing): every command has closed what it opened by now,
    so flush the standard streams and the log, stop the rclone daemon, and leave."""
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
        pass
    logging.shutdown()
    # a command that never imported the remote stack started no daemon: no import for it
    if (remotes := sys.modules.get("vaultfs.remotes")) is not None:
        remotes.RcloneDaemon.shutdown()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
