"""What every command module shares: the typer app, the consoles, the --home and --json
options, the passphrase prompt, :func:`open_vault`, the progress bar and the flush report.

Command modules (cli/core.py, cli/restore.py, cli/audit.py, cli/keys.py, cli/mount.py, ...)
import this module and register their commands on :data:`app`. They are imported lazily, when
a command of theirs is looked up (:class:`LazyCommands`, :data:`COMMANDS`): `vaultfs restore`
pays for the restore's imports only, not for the knowledge base's or the mount's. This module
imports typer and rich's console only; the engine is imported in the functions that use it,
so `vaultfs COMMAND --help` and a usage error load none of it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core
import typer.main
from rich.console import Console

from cli.early import secret
from vaultfs.errors import EXIT_PARTIAL, InputError, NoVault, StaleBase

if TYPE_CHECKING:  # each imported where used: a command's --help needs none of them
    from rich.progress import Progress, TaskID
    from rich.table import Table

    from vaultfs.keys import VaultKeys
    from vaultfs.manifest import Link
    from vaultfs.strategy import Strategy
    from vaultfs.vault import Vault

#: Each command and command group of `vaultfs`, in the order `vaultfs --help` lists them,
#: and the module that registers it on :data:`app` (tests/test_cli.py checks the map against
#: what the modules register).
COMMANDS: dict[str, str] = {
    "init": "cli.core",
    "backup": "cli.core",
    "flush": "cli.core",
    "snapshots": "cli.core",
    "ls": "cli.core",
    "status": "cli.core",
    "restore": "cli.restore",
    "verify": "cli.audit",
    "repair": "cli.audit",
    "prune": "cli.audit",
    "fork": "cli.fork_cmd",
    "reencrypt": "cli.keys",
    "receipt": "cli.keys",
    "mount": "cli.mount",
    "umount": "cli.mount",
    "forget": "cli.routine",
    "run": "cli.routine",
    "drill": "cli.drill_cmd",
    "remote": "cli.audit",
    "graph": "cli.graph_cmd",
    "keys": "cli.keys",
    "snapshot": "cli.mount",
    "kb": "cli.kb_cmd",
    "home": "cli.home_cmd",
    "schedule": "cli.routine",
    "strategy": "cli.strategy_cmd",
    "wal": "cli.wal_cmd",
}


class LazyCommands(typer.core.TyperGroup):
    """The top-level command group of :data:`app`: it knows every command's name from
    :data:`COMMANDS` and imports the module that registers a command the first time the
    command is looked up, so a run imports only what its command needs. `vaultfs --help`
    looks up (and imports) them all; so does an unknown name, for the "did you mean"."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(
        self, ctx: typer.Context, cmd_name: str
    ) -> typer.core.TyperCommand | typer.core.TyperGroup | None:
        if cmd_name not in self.commands:
            wanted = COMMANDS.get(cmd_name)
            for module in [wanted] if wanted else sorted(set(COMMANDS.values())):
                self._load(module)
        return self.commands.get(cmd_name)

    def _load(self, module: str) -> None:
        """Import ``module`` (it registers its commands on :data:`app`) and add what it
        registered, help texts reflowed, as click commands."""
        importlib.import_module(module)
        reflow_help(app)
        opts = {
            "pretty_exceptions_short": app.pretty_exceptions_short,
            "rich_markup_mode": app.rich_markup_mode,
        }
        for info in app.registered_commands:
            if (
                info.name or typer.main.get_command_name(info.callback.__name__)
            ) not in self.commands:
                cmd = typer.main.get_command_from_info(info, **opts)
                self.commands[cmd.name] = cmd
        for group in app.registered_groups:
            if group.name not in self.commands:
                self.commands[group.name] = typer.main.get_group_from_info(
                    group, suggest_commands=app.suggest_commands, **opts
                )


app = typer.Typer(
    name="vaultfs",
    cls=LazyCommands,
    help="An encrypted, erasure-coded, post-quantum vault over rclone remotes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _vaultfs() -> None:
    # Typer makes a group (not a single command) of an app with a callback; the commands
    # come from LazyCommands, so without this the app would have nothing to make one of.
    pass


class _Console(Console):
    """A rich console whose closed stream ends the command as a closed pipe ends any: rich's
    own answer (``on_broken_pipe``) points standard output at /dev/null and exits 1, which
    hides what happened. A closed standard output raises BrokenPipeError, which cli/main.py
    turns into its quiet exit (EXIT_STDOUT_CLOSED); on a closed standard error there is
    nothing more to say, and the command goes on without it."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if not self.stderr:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


err = _Console(stderr=True, soft_wrap=True)
out = _Console(soft_wrap=True)


def print_json(doc: object, ensure_ascii: bool = False) -> None:
    """Print ``doc`` as JSON (indented by two) on standard output, the one way every
    ``--json`` report is printed. Plain ``json.dumps`` when stdout is not a terminal
    (scripts, pipes): rich's ``print_json`` parses the text again and highlights it, which
    took 0.24 s for a repair's report of ~400 rebuilt objects; a terminal still gets the
    colours. Never coloured when stdout is not a terminal, whatever FORCE_COLOR says
    (rich's ``is_terminal`` obeys it): JSON with colour codes is not JSON."""
    if out.is_terminal and sys.stdout.isatty():
        out.print_json(data=doc, ensure_ascii=ensure_ascii)
        return
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=ensure_ascii) + "\n")


def print_table(t: Table, console: Console = out) -> None:
    """Print ``t`` (every table the CLI shows goes through here) without ever cutting a
    cell: at its natural width, however wide, when not a terminal (a pipe or a file has no
    edge) or when it fits the terminal; on a terminal too narrow for it, as a list of
    records instead (the first column's cell, then each other column's ``header: cell``
    on a line of its own, which the terminal wraps)."""
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(1 << 20), t).maximum
    if not console.is_terminal or natural <= console.width:
        t.width = natural  # rich would squeeze it to the console's width (80 off a terminal)
        console.print(t, crop=False)
        return
    columns = [(str(c.header), list(c.cells)) for c in t.columns]
    for i, first in enumerate(columns[0][1] if columns else []):
        console.print(first, highlight=False)
        for header, cells in columns[1:]:
            if cells[i] != "":
                console.print(f"  {header}: ", cells[i], sep="", highlight=False)


def local_time(t: float | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """``t`` on the local clock in ``fmt``; "never" for no time, and for a time past what the
    platform's clock can show (a stored schedule interval too large to reach)."""
    if not t:
        return "never"
    try:
        return time.strftime(fmt, time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "never"


def next_run_cell(every: float | None, due: float | None, now: float) -> str:
    """When a routine job runs next, as `status` and `schedule show` say it: "next each
    pass" (repair), "due at the next pass" (it never ran), "overdue since T" (no pass ran it
    when due: is the timer running?), else "next T"."""
    if every == 0:
        return "next each pass"
    if not due:
        return "due at the next pass (never ran)"
    if due < now:
        return f"[yellow]overdue since {local_time(due)}[/]"
    return f"next {local_time(due)}"


def last_audit_cell(r: dict) -> str:
    """A remote's last audit as `status` and `remote list` show it: its time and the
    confidence it reached, or "never"."""
    if not r.get("last_audit"):
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_audit"]))
    conf = r.get("last_audit_confidence")
    return when if conf is None else f"{when} ({conf * 100:.1f}%)"


HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Local state directory (default $VAULTFS_HOME or XDG data dir)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
KeyfileOpt = Annotated[Path | None, typer.Option(help="Keyfile (asks for its passphrase).")]
SeedOpt = Annotated[Path | None, typer.Option(help="File holding the master seed in hex.")]
StrategyOpt = Annotated[
    Path | None,
    typer.Option("--strategy", help="Strategy file (default: strategy.yaml in the home)."),
]
IKnowOpt = Annotated[
    bool,
    typer.Option("--i-know", help="Accept a new passphrase the strength estimator calls weak."),
]
#: the rollback floor of a read from the remotes (`restore --from`, `home rebuild`):
#: :func:`rollback_floor` turns the two into one
MinSeqOpt = Annotated[
    int,
    typer.Option(
        "--min-seq",
        min=0,
        help="Refuse (exit 12) if the remotes' newest manifest is older than this sequence "
        "number (restore: with --from).",
    ),
]
ReceiptOpt = Annotated[
    Path | None,
    typer.Option(
        "--receipt",
        help="A receipt (`vaultfs receipt`); refuse (exit 12) if the remotes hide its manifest "
        "(restore: with --from).",
    ),
]

#: zxcvbn score (0-4) below which a new passphrase is called weak: 3 is "safely
#: unguessable: moderate protection from offline slow-hash scenario" (~10^10 guesses), the
#: attack a stolen keyfile faces.
MIN_PASSPHRASE_SCORE = 3


def reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of ``typer_app`` (and of its sub-apps) its docstring as help text
    with each paragraph on one line: typer keeps a docstring's hard line breaks, so help
    wrapped for the source file broke mid-sentence at every other terminal width. Call once
    its commands are registered (:meth:`LazyCommands._load`)."""
    infos = [*typer_app.registered_commands]
    for group in typer_app.registered_groups:
        reflow_help(group.typer_instance)
        if group.typer_instance.registered_callback is not None:
            infos.append(group.typer_instance.registered_callback)
    for info in infos:
        doc = inspect.getdoc(info.callback) if info.callback else None
        if info.help is None and doc:
            paras = [" ".join(p.split()) for p in doc.split("\n\n")]
            info.help = "\n\n".join(paras)


def home_dir(home: Path | None) -> Path:
    """The vault's local state directory: --home, else $VAULTFS_HOME or the XDG data dir."""
    if home is None:
        from vaultfs.vault import default_home

        home = default_home()
    return home.expanduser()


def passphrase(
    confirm: bool = False, env: str = "VAULTFS_PASSPHRASE", label: str = "Passphrase"
) -> str:
    """``$env`` (taken out of the environment, cli/early.py), else a prompt (twice with
    ``confirm``); InputError without a terminal to prompt on. Returned as given: the keyfile
    layer normalises it to NFC (vaultfs/kdf.py), and a version-1 keyfile may need the raw
    spelling."""
    pw = secret(env)
    if pw == "":
        raise InputError(f"{env} is set but empty: set it to the passphrase, or unset it")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise InputError(f"no passphrase: set {env} or run in a terminal")
    return typer.prompt(label, hide_input=True, confirmation_prompt=confirm)


def new_passphrase(i_know: bool, env: str = "VAULTFS_PASSPHRASE", label: str = "Passphrase") -> str:
    """A passphrase to seal a keyfile under (:func:`passphrase`, confirmed when typed), checked
    by the zxcvbn estimator. A weak one typed at the prompt is refused (InputError) unless
    ``i_know``; one from ``$env`` (scripts, tests) only gets a warning on stderr, because
    nobody is there to choose another."""
    from_env = secret(env) is not None
    pw = passphrase(confirm=True, env=env, label=label)
    if i_know:
        return pw
    from zxcvbn import zxcvbn

    from vaultfs.kdf import normalize

    verdict = zxcvbn(normalize(pw)[:100])  # the estimator is quadratic in the length
    if verdict["score"] >= MIN_PASSPHRASE_SCORE:
        return pw
    hint = " ".join(
        filter(None, [verdict["feedback"]["warning"], *verdict["feedback"]["suggestions"]])
    )
    msg = (
        f"the new passphrase is weak (zxcvbn score {verdict['score']} of 4; a stolen keyfile "
        f"falls to an offline guesser). {hint}".strip()
    )
    if from_env:
        err.print(f"[yellow]warning:[/] {msg}", highlight=False)
        return pw
    raise InputError(f"{msg} Choose a stronger one, or pass --i-know to use it anyway.")


def load_strategy(home: Path | None, path: Path | None) -> Strategy:
    """The strategy of --strategy ``path``, else the home's strategy.yaml (docs/operations.md,
    Tiers), validated; its tiers live under the home. ConfigError/InputError otherwise."""
    from vaultfs import strategy

    h = home_dir(home)
    return strategy.load(path or strategy.default_path(h), h)


@contextlib.contextmanager
def open_vault(
    home: Path | None, lock: bool = True, keys: VaultKeys | None = None
) -> Iterator[Vault]:
    """The vault at ``home`` (see :func:`home_dir`), open for the ``with`` block and closed
    when it ends, also on error. ``lock`` takes the vault's lock (and finishes an interrupted
    commit) for commands that write; reading commands pass False. The key is ``keys`` if
    given, else the keyfile unlocked with :func:`passphrase`; with ``lock`` the rclone daemon
    starts meanwhile (RcloneDaemon.starting). Errors are VaultErrors, which cli/main.py turns
    into one sentence and an exit code."""
    from vaultfs.errors import VaultBusy
    from vaultfs.remotes import RcloneDaemon
    from vaultfs.vault import Vault

    # a command that writes reaches the remotes: rclone starts while the key unlocks
    ahead = RcloneDaemon.starting() if lock else contextlib.nullcontext()
    h = home_dir(home)
    try:
        with ahead:
            v = Vault.open(h, passphrase() if keys is None else None, keys=keys, lock=lock)
    except VaultBusy:
        from vaultfs.control import mounted

        if (info := mounted(h)) is None or info.get("detached"):
            raise  # detached: the lock's refusal says so (vaultfs/vault/home.py)
        raise VaultBusy(
            f"the vault is mounted at {info['mountpoint']}: write into the mount and take "
            "`vaultfs snapshot`, or `vaultfs umount` it first"
        ) from None
    with v:
        yield v


@contextlib.contextmanager
def progress(
    label: str, total: int | None = None, quiet: bool = False
) -> Iterator[tuple[Progress, TaskID] | None]:
    """A transient progress bar (bytes, rate, time left) on a terminal's stderr for the
    block; None when stderr is not a terminal or ``quiet`` (--json: scripts see nothing)."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

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


def track(prog: tuple[Progress, TaskID] | None) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback setting ``prog``'s bar to ``done`` bytes of
    ``total``; None without a bar."""
    if prog is None:
        return None
    p, task = prog
    return lambda done, total: p.update(task, completed=done, total=total)


def advance_segments(
    prog: tuple[Progress, TaskID] | None, segment_size: int
) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback counting segments, shown as bytes (a segment
    is ``segment_size`` bytes of work), so the bar has a rate and a time left; None
    without a bar."""
    if prog is None:
        return None
    p, task = prog
    return lambda done, total: p.update(
        task, completed=done * segment_size, total=total * segment_size
    )


def newest_manifest(v: Vault) -> Link | None:
    """The newest manifest of ``v``'s chain (seq and hash, for every output); None before
    the first."""
    from vaultfs.index import manifests
    from vaultfs.manifest import Link

    row = manifests.newest_link(v.index)
    return None if row is None else Link(*row)


def manifest_fields(v: Vault) -> dict:
    """``seq`` and ``manifest_hash`` of the newest manifest, for JSON outputs."""
    link = newest_manifest(v)
    return link.as_json() if link else {"seq": 0, "manifest_hash": None}


def report_flush(
    v: Vault,
    as_json: bool,
    extra: dict | None = None,
    quorum: bool = False,
    every_remote: bool = False,
) -> int:
    """Flush ``v`` (``quorum``: done once k shards of everything are placed, see
    :meth:`Vault.flush`), report what went out (JSON with ``extra`` merged in, or warnings)
    and return the exit code: StaleBase's when the remotes moved on without this home (its
    manifests stay queued, never placed), EXIT_PARTIAL when a segment has fewer than k shards
    placed (with ``every_remote``, the `flush` command's promise: when anything is still
    queued for any remote)."""
    from vaultfs import chain

    rep = v.flush(quorum=quorum)
    # the flush counted the segments under k after its uploads; the whole status (a scan of
    # every shard row and chunk, read from disk at 16 GiB once the page cache has moved on)
    # only for the JSON report's survives_losses_now
    code = 0
    msg = None
    if rep.stale_base:
        code = StaleBase.exit_code
    elif rep.under_k:
        code = EXIT_PARTIAL
        msg = (
            f"{rep.under_k} segment(s) have fewer than k={v.k} shards on "
            "remotes: the data is safe in the local queue and goes out on the next "
            "`vaultfs flush` or `vaultfs run` once remotes are back"
        )
    elif not rep.complete:
        behind = ", ".join(f"{r} ({c} queued)" for r, c in rep.pending.items() if c)
        msg = f"some remotes are behind: {behind or 'manifests pending'}; run `vaultfs flush` later"
        code = EXIT_PARTIAL if every_remote else 0
    if as_json:
        print_json(
            {
                **manifest_fields(v),
                **(extra or {}),
                "uploaded": rep.uploaded,
                "pending": rep.pending,
                "errors": rep.errors,
                "stale_base": rep.stale_base,
                "not_checked": rep.unchecked,
                "segments_below_k_placed": rep.under_k,
                "survives_losses_now": v.status()["survives_losses_now"],
                "complete": rep.complete,
            }
        )
    else:
        warn_remote_errors(rep.errors)
        for r in rep.unchecked:
            err.print(f"[yellow]warning:[/] {chain.unchecked_warning(r)}", highlight=False)
        if rep.stale_base:
            err.print(f"[red]error:[/] {rep.stale_base}", highlight=False)
        if msg:
            err.print(f"[yellow]{msg}[/]")
    return code


def warn_remote_errors(errors: dict[str, str]) -> None:
    """One warning line per remote that failed: the remote's label, then what failed, once
    (a remote's error message already starts with its label)."""
    for label, e in errors.items():
        said = e if e.startswith(f"{label}: ") else f"{label}: {e}"
        err.print(f"[yellow]warning:[/] {said}", highlight=False)


def redundancy_warnings(remotes: int, k: int, n: int, survives: int, add: str) -> list[str]:
    """What a user must hear about a k-of-n vault over ``remotes`` remotes that survives
    ``survives`` remote losses by design: shards of one segment crowded onto one remote, or
    any loss losing data. ``add`` is the command that adds a remote (init's and valence's
    differ). Empty when the vault is spread as its profile promises."""
    from vaultfs.vault.placement import remotes_needed

    warnings = []
    _needed, crowded = remotes_needed(remotes, k, n)
    if crowded > 1:
        warnings.append(
            f"up to {crowded} of each segment's {n} shards share one remote (fewer remotes "
            f"than n): losing that remote loses all {crowded}; add remotes in separate "
            f"failure domains ({add}) to spread them"
        )
    if survives == 0:
        warnings.append("with this many remotes, losing any one loses data")
    return warnings


def rollback_floor(min_seq: int, receipt: Path | None, keys: VaultKeys) -> tuple[int, Link | None]:
    """--min-seq and --receipt as one floor for a read from the remotes: (the lowest manifest
    seq the remotes may offer, the manifest link they must hold or None). The receipt must
    verify under ``keys`` (vaultfs/receipt.py: IntegrityError, or InputError)."""
    if receipt is None:
        return min_seq, None
    from vaultfs import receipt as receipts

    floor, anchor = receipts.rollback_anchor(receipt, keys)
    return max(min_seq, floor), anchor


def keys_for_restore(home: Path, keyfile: Path | None, seed_file: Path | None) -> VaultKeys:
    """The key from --seed-file, $VAULTFS_SEED, or a keyfile (--keyfile, else HOME/key.json).
    A --keyfile that does not exist is missing input (InputError, exit 18, like a missing share
    or receipt file); a home without key.json holds no vault (NoVault, exit 16)."""
    from vaultfs.keys import VaultKeys, parse_seed, read_keyfile
    from vaultfs.remotes import RcloneDaemon

    if seed_file:
        try:
            return VaultKeys.from_seed(parse_seed(seed_file.read_text()))
        except OSError as e:
            raise InputError(f"cannot read {seed_file}: {e.strerror}") from None
    env_seed = secret("VAULTFS_SEED")
    if env_seed:
        return VaultKeys.from_seed(parse_seed(env_seed))
    if keyfile and not keyfile.exists():
        raise InputError(f"--keyfile {keyfile} does not exist; give the vault's key.json")
    kf = keyfile or home / "key.json"
    if not kf.exists():
        raise NoVault(f"no key: {kf} does not exist; give --keyfile FILE or --seed-file FILE")
    with RcloneDaemon.starting():  # every caller reads the remotes next: rclone starts meanwhile
        return read_keyfile(kf, passphrase())
