"""`vaultfs drill disk|home|provider|crypto|keys`: the disaster drills (vaultfs/drill.py), each
in a scratch directory, reported as a table or JSON.

Exit codes: vaultfs/errors.py (22 when a drill failed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    SeedOpt,
    StrategyOpt,
    app,
    err,
    home_dir,
    keys_for_restore,
    load_strategy,
    print_json,
    print_table,
)
from vaultfs import strategy, tiers
from vaultfs.drill import SCENARIOS, DrillResult, run_drill
from vaultfs.errors import EXIT_DRILL_FAILED, InputError, NoVault
from vaultfs.keys import VaultKeys
from vaultfs.scratch import owned_scratch


@app.command()
def drill(
    scenarios: Annotated[
        list[str],
        typer.Argument(help=f"Drills to run: {', '.join(SCENARIOS)} or all (repeat)."),
    ],
    scratch: Annotated[
        Path | None,
        typer.Option(
            "--scratch",
            help="An absent or empty directory to work in, kept afterwards (default: a "
            "temporary directory, removed).",
        ),
    ] = None,
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    home: HomeOpt = None,
    strategy_file: StrategyOpt = None,
    tier: Annotated[
        str | None,
        typer.Option("--tier", help="With a strategy: drill this tier (default: per drill)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rehearse a disaster, never touching the live home or the remotes' objects: disk
    (restore the newest snapshot from the remotes alone), home (rebuild an empty home from
    the remotes, then restore), provider (any k remotes restore; the others replaced by new
    empty remotes in a scratch copy, which then verifies clean), crypto (re-encrypt a scratch
    copy to another suite; the old suite refused), keys (the master seed from 3 of 5 shares,
    then restore). Each reports RTO, RPO, bytes and a byte-for-byte check against the
    snapshot's recorded chunk hashes.

    With a strategy (--strategy, or strategy.yaml in a home that holds no vault of its own),
    each drill runs against the tier it is about unless --tier names one: disk against the
    tier on one backend (the NAS), the others against the tier spread over the most backends
    (offsite); the keys drill splits the master seed and derives the tier's key."""
    wanted = list(SCENARIOS) if scenarios == ["all"] else scenarios
    for s in wanted:
        if s not in SCENARIOS:
            raise InputError(f"unknown drill {s!r}: choose from {', '.join(SCENARIOS)} or all")
    h = home_dir(home)
    tiered = strategy_file is not None or (
        strategy.default_path(h).exists() and not (h / "index.db").exists()
    )
    if tier is not None and not tiered:
        raise InputError("--tier needs a strategy: give --strategy FILE")
    if scratch is not None and scratch.exists() and any(scratch.iterdir()):
        raise InputError(f"--scratch {scratch} is not empty: give an absent or empty directory")
    targets = _tier_targets(h, strategy_file, tier, wanted, keyfile, seed_file) if tiered else {
        s: (h, keys_for_restore(h, keyfile, seed_file), None) for s in wanted
    }  # fmt: skip
    with contextlib.ExitStack() as stack:  # --scratch is the user's: kept
        base = scratch or stack.enter_context(owned_scratch("vaultfs-drill-"))
        results = []
        for s in wanted:
            where, keys, master = targets[s]
            results.append(run_drill(s, where, keys, base / s, master=master))
            if master is not None:
                results[-1].details["tier"] = master[1]
    if as_json:
        print_json({"ok": all(r.ok for r in results),
                                   "drills": [r.as_dict() for r in results]})  # fmt: skip
    else:
        _table(results)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_DRILL_FAILED)


def _tier_targets(
    home: Path | None,
    strategy_file: Path | None,
    only: str | None,
    wanted: list[str],
    keyfile: Path | None,
    seed_file: Path | None,
) -> dict[str, tuple[Path, VaultKeys, tuple[VaultKeys, str]]]:
    """Per drill: (the tier's home, its keys, (master keys, tier name)). The master key is
    the strategy home's (or --keyfile/--seed-file's); every chosen tier must have been made."""
    s = load_strategy(home, strategy_file)
    master = keys_for_restore(s.home, keyfile, seed_file)
    stored = [t for t in s.tiers.values() if not t.live]
    if only is not None:
        if only not in s.tiers or s.tiers[only].live:
            names = ", ".join(t.name for t in stored)
            raise InputError(f"no tier {only!r} with backends in {s.path} (tiers: {names})")
        stored = [s.tiers[only]]
    if not stored:
        raise InputError(f"{s.path} has no tier with backends to drill")
    widest = max(stored, key=lambda t: len(t.backends))
    single = next((t for t in stored if len(t.backends) == 1), widest)
    out: dict[str, tuple[Path, VaultKeys, tuple[VaultKeys, str]]] = {}
    for name in wanted:
        t = single if name == "disk" else widest
        if not (t.home / "index.db").exists():
            raise NoVault(f"tier {t.name} has no vault yet at {t.home}: run `vaultfs run` first")
        out[name] = (t.home, tiers.tier_keys(master, t), (master, t.name))
    return out


def _table(results: list[DrillResult]) -> None:
    t = Table("drill", "result", "RTO", "RPO", "bytes", "entries", "identical", "notes")
    for r in results:
        notes = r.error or "; ".join(f"{k}: {_show(v)}" for k, v in r.details.items())
        t.add_row(
            r.scenario,
            "[green]pass[/]" if r.ok else "[red]FAIL[/]",
            "-" if r.rto is None else f"{r.rto:.1f} s",
            "-" if r.rpo is None else _age(r.rpo),
            f"{r.bytes:,}",
            str(r.entries),
            "yes" if r.identical else "no",
            notes,
        )
    print_table(t)
    for r in results:
        for p in r.mismatched[:10]:
            err.print(f"[red]{r.scenario}: differs from the snapshot:[/] {p}", highlight=False)


def _show(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
