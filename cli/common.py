"""What every command module shares: the typer app, the consoles, the --home and --json
options, the passphrase prompt, :func:`open_vault`, the progress bar and the flush report.

Command modules (cli/core.py, cli/restore.py, cli/audit.py, cli/keys.py, cli/mount.py)
import this module and register their commands on :data:`app`; cli/main.py imports them all
and runs the app. Nothing here imports a command module, so the imports form no cycle.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vaultfs.errors import EXIT_PARTIAL, InputError, NoVault
from vaultfs.keys import VaultKeys, parse_seed, read_keyfile
from vaultfs.vault import Vault, default_home

app = typer.Typer(
    name="vaultfs",
    help="An encrypted, erasure-coded, post-quantum vault over rclone remotes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Local state directory (default $VAULTFS_HOME or XDG data dir)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def home_dir(home: Path | None) -> Path:
    """The vault's local state directory: --home, else $VAULTFS_HOME or the XDG data dir."""
    return (home or default_home()).expanduser()


def passphrase(confirm: bool = False) -> str:
    """$VAULTFS_PASSPHRASE, else a prompt (twice with ``confirm``); InputError without a
    terminal to prompt on."""
    pw = os.environ.get("VAULTFS_PASSPHRASE")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise InputError("no passphrase: set VAULTFS_PASSPHRASE or run in a terminal")
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


@contextlib.contextmanager
def open_vault(
    home: Path | None, lock: bool = True, keys: VaultKeys | None = None
) -> Iterator[Vault]:
    """The vault at ``home`` (see :func:`home_dir`), open for the ``with`` block and closed
    when it ends, also on error. ``lock`` takes the vault's lock (and finishes an interrupted
    commit) for commands that write; reading commands pass False. The key is ``keys`` if
    given, else the keyfile unlocked with :func:`passphrase`. Errors are VaultErrors, which
    cli/main.py turns into one sentence and an exit code."""
    pw = passphrase() if keys is None else None
    with Vault.open(home_dir(home), pw, keys=keys, lock=lock) as v:
        yield v


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[tuple[Progress, TaskID] | None]:
    """A transient progress bar on a terminal's stderr for the block; None otherwise."""
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as p:
        task = p.add_task(label, total=total)
        yield p, task


def advance(prog: tuple[Progress, TaskID] | None) -> Callable[[int], None] | None:
    """A callback that moves ``prog``'s bar on by n bytes; None without a bar."""
    if prog is None:
        return None
    p, task = prog
    return lambda n: p.advance(task, n)


def report_flush(v: Vault, as_json: bool, extra: dict | None = None) -> int:
    """Flush ``v``, report what went out (JSON with ``extra`` merged in, or warnings) and
    return the exit code: EXIT_PARTIAL when a segment has fewer than k shards placed."""
    rep = v.flush()
    status = v.status()
    code = 0
    msg = None
    if status["segments_below_k_placed"]:
        code = EXIT_PARTIAL
        msg = (
            f"{status['segments_below_k_placed']} segment(s) have fewer than k={v.k} shards on "
            "remotes: the data is safe in the local queue and goes out on the next "
            "`vaultfs flush` once remotes are back"
        )
    elif not rep.complete:
        behind = ", ".join(f"{r} ({c} queued)" for r, c in rep.pending.items() if c)
        msg = f"some remotes are behind: {behind or 'manifests pending'}; run `vaultfs flush` later"
    if as_json:
        out.print_json(
            json.dumps(
                {
                    **(extra or {}),
                    "uploaded": rep.uploaded,
                    "pending": rep.pending,
                    "errors": rep.errors,
                    "segments_below_k_placed": status["segments_below_k_placed"],
                    "survives_losses_now": status["survives_losses_now"],
                    "complete": rep.complete,
                }
            )
        )
    else:
        for r, e in rep.errors.items():
            err.print(f"[yellow]warning:[/] {r}: {e}")
        if msg:
            err.print(f"[yellow]{msg}[/]")
    return code


def keys_for_restore(home: Path, keyfile: Path | None, seed_file: Path | None) -> VaultKeys:
    """The key from --seed-file, $VAULTFS_SEED, or a keyfile (--keyfile, else HOME/key.json)."""
    if seed_file:
        try:
            return VaultKeys.from_seed(parse_seed(seed_file.read_text()))
        except OSError as e:
            raise InputError(f"cannot read {seed_file}: {e.strerror}") from None
    env_seed = os.environ.get("VAULTFS_SEED")
    if env_seed:
        return VaultKeys.from_seed(parse_seed(env_seed))
    kf = keyfile or home / "key.json"
    if not kf.exists():
        raise NoVault(f"no key: {kf} does not exist; give --keyfile FILE or --seed-file FILE")
    return read_keyfile(kf, passphrase())
