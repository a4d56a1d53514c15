"""`vaultfs drill disk|home|provider|crypto|keys`: the disaster drills (vaultfs/drill.py), each
in a scratch directory, reported as a table or JSON.

Exit codes: vaultfs/errors.py (22 when a drill failed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    SeedOpt,
    app,
    err,
    home_dir,
    keys_for_restore,
    out,
)
from vaultfs.drill import SCENARIOS, DrillResult, run_drill
from vaultfs.errors import EXIT_DRILL_FAILED, InputError


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
    as_json: JsonOpt = False,
) -> None:
    """Rehearse a disaster, never touching the live home or the remotes' objects: disk
    (restore the newest snapshot from the remotes alone), home (rebuild an empty home from
    the remotes, then restore), provider (any k remotes restore; the others replaced by new
    empty remotes in a scratch copy, which then verifies clean), crypto (re-encrypt a scratch
    copy to another suite; the old suite refused), keys (the master seed from 3 of 5 shares,
    then restore). Each reports RTO, RPO, bytes and a byte-for-byte check against the
    snapshot's recorded chunk hashes."""
    wanted = list(SCENARIOS) if scenarios == ["all"] else scenarios
    for s in wanted:
        if s not in SCENARIOS:
            raise InputError(f"unknown drill {s!r}: choose from {', '.join(SCENARIOS)} or all")
    h = home_dir(home)
    keys = keys_for_restore(h, keyfile, seed_file)
    if scratch is not None and scratch.exists() and any(scratch.iterdir()):
        raise InputError(f"--scratch {scratch} is not empty: give an absent or empty directory")
    base = scratch or Path(tempfile.mkdtemp(prefix="vaultfs-drill-"))
    try:
        results = [run_drill(s, h, keys, base / s) for s in wanted]
    finally:
        if scratch is None:
            shutil.rmtree(base, ignore_errors=True)
    if as_json:
        out.print_json(json.dumps({"ok": all(r.ok for r in results),
                                   "drills": [r.as_dict() for r in results]}))  # fmt: skip
    else:
        _table(results)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_DRILL_FAILED)


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
    out.print(t)
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
