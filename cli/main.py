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
from vaultfs.errors import EXIT_STDOUT_CLOSED, VaultError  # noqa: E402


def main() -> None:
    """Console entry point: known errors become one sentence and a documented exit code."""
    run(app)


def run(application) -> None:
    """Run a typer application as a console script (``vaultfs``, ``valence``): a VaultError
    becomes one sentence and its exit code, a full disk likewise (errors.disk_full: ENOSPC or
    SQLite's "database or disk is full"), a local path that cannot be used (through a file, a
    loop of links, a system directory) one line naming it and exit 18, and a standard output
    whose reader went away (`vaultfs ls | head`) a quiet exit EXIT_STDOUT_CLOSED (141);
    never returns."""
    from vaultfs.errors import InputError, disk_full

    code: int | str | None = 0
    try:
        application()  # standalone: typer exits itself on success, usage errors and Ctrl-C
    except SystemExit as e:
        code = e.code
        # typer turns a broken pipe into a silent exit 1 (and wraps stdout to hush it)
        if code == 1 and _stdout_closed():
            code = EXIT_STDOUT_CLOSED
    except VaultError as e:
        _say(e)
        code = e.exit_code
    except Exception as e:
        if (full := disk_full(e)) is not None:
            _say(full)
            code = full.exit_code
        elif isinstance(e, OSError) and e.filename is not None:
            # a path the user gave that cannot be used as asked
            where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else e.filename
            err.print(f"[red]error:[/] {where}: {e.strerror or e}", highlight=False)
            code = InputError.exit_code
        else:
            raise
    _exit(code)


def _say(e: VaultError) -> None:
    """Print ``e``'s message on stderr, one "error:" per line (a message of several problems,
    as `strategy check` gives, reads alike)."""
    for line in e.message.splitlines() or [""]:
        err.print(f"[red]error:[/] {line}", highlight=False)


def _stdout_closed() -> bool:
    """True when standard output is a pipe or socket whose reader has gone (its write end
    polls POLLERR): writing there can only fail with EPIPE."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.__stdout__.fileno() if sys.__stdout__ else 1, select.POLLOUT)
        return any(ev & select.POLLERR for _fd, ev in poll.poll(0))
    except (OSError, ValueError):
        return False


def _exit(code: int | str | None) -> None:
    """End the process without the interpreter's teardown (tens of milliseconds of module
    and object finalisation for nothing): every command has closed what it opened by now,
    so flush the standard streams and the log, stop the rclone daemon, remove
    multiprocessing's directory (vaultfs/sealer.py: release_mp_tempdir) and the process's
    scratch (vaultfs/scratch.py: release_process_scratch), and leave."""
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away before the end (`--json | head -c 10`)
        code = code or EXIT_STDOUT_CLOSED
    except (OSError, ValueError):  # nothing more can be said
        pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    logging.shutdown()
    # a command that never imported the remote stack started no daemon: no import for it
    if (remotes := sys.modules.get("vaultfs.remotes")) is not None:
        remotes.RcloneDaemon.shutdown()
    # the forkserver's directory (a mount daemon's repair): only atexit would remove it
    if (sealer := sys.modules.get("vaultfs.sealer")) is not None:
        sealer.release_mp_tempdir()
    # the process's scratch (the files handed to rclone): only atexit would remove it
    if (scratch := sys.modules.get("vaultfs.scratch")) is not None:
        scratch.release_process_scratch()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
