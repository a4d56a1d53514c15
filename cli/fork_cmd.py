"""`vaultfs fork retire`: end a fork made on purpose (docs/operations.md, "Living with a fork").

Exit codes (docs/operations.md): 0 when the other branches' manifests are gone from every
remote (or there were none), 11 when a remote could not be looked at or did not delete them
(they stay to be done: run it again), 18 when not confirmed (no --yes and no terminal, or the
answer no), 21 in a stale home or on a branch older than the other, 23 in an immutable vault
or with a holder that locks its objects.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from cli.common import HomeOpt, JsonOpt, app, err, open_vault, out, print_json, print_table
from vaultfs import chain
from vaultfs.errors import EXIT_PARTIAL, InputError, Unreachable

fork_app = typer.Typer(help="End a fork of the vault made on purpose.")
app.add_typer(fork_app, name="fork")


@fork_app.command("retire")
def retire(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Delete without asking (scripts, no terminal).")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire every branch of a fork but this home's: delete the other branches' manifest
    objects (manifests/NAME, as `verify --json` lists them under `fork`) from every remote of
    the vault, and nothing else.

    Run it in the home of the branch you keep, which must be the vault's newest (a `--fork`
    backup or snapshot here makes it so). Data objects stay: the next `verify` calls the
    retired branch's objects foreign, `repair` moves them to quarantine/, `prune` frees what
    this branch kept back during the fork. Asks first on a terminal; --yes does not ask.
    """
    with open_vault(home) as v:
        remotes = v.remotes()
        plan = chain.plan_retirement(v.keys, v.index, remotes, v.immutable)
        if not plan.manifests:
            _report(plan, dry_run, as_json)
            raise typer.Exit(EXIT_PARTIAL if plan.unread else 0)
        if dry_run:
            _report(plan, dry_run, as_json)
            return
        if not yes:
            if not as_json:
                _print_plan(plan)
            _confirm(plan, as_json)
        chain.retire(plan, v.index, remotes)
    _report(plan, dry_run, as_json, listed=yes or as_json)
    if plan.errors:
        raise typer.Exit(Unreachable.exit_code)
    if plan.unread:
        raise typer.Exit(EXIT_PARTIAL)


def _confirm(plan: chain.Retirement, as_json: bool) -> None:
    """Ask on a terminal whether to delete ``plan``'s objects; InputError (nothing deleted)
    without a terminal to ask on, with --json, or when the answer is no."""
    count = sum(len(o) for o in plan.objects().values())
    if as_json or not sys.stdin.isatty():
        raise InputError(
            f"nothing deleted: pass --yes to delete these {count} manifest object(s) of the "
            "other branch (`vaultfs fork retire --dry-run` lists them)"
        )
    if not typer.confirm(
        f"Delete these {count} manifest object(s)? The branch cannot be restored afterwards "
        "(restore what you need of it first: `vaultfs restore --from ... --manifest SEQ/HASH`)",
        default=False,
    ):
        raise InputError("nothing deleted: not confirmed")


def _print_plan(plan: chain.Retirement) -> None:
    t = Table("branch", "seq", "manifest", "object", "remotes")
    for s in plan.manifests:
        t.add_row(
            plan.branch[s.name],
            str(s.manifest.seq),
            s.link.short_hash,
            f"manifests/{s.name}",
            ", ".join(s.holders),
        )
    print_table(t)


def _report(plan: chain.Retirement, dry_run: bool, as_json: bool, listed: bool = True) -> None:
    if as_json:
        print_json({"dry_run": dry_run, **plan.to_dict()})
        return
    if not plan.manifests and not plan.unread:
        out.print("no fork: the remotes hold no manifest off this home's chain; nothing to do")
        return
    if listed:
        _print_plan(plan)
    objects = plan.objects()
    count = sum(len(o) for o in objects.values())
    if dry_run:
        out.print(
            f"would delete {count} manifest object(s) of {len(plan.manifests)} manifest(s) "
            f"from {len(objects)} remote(s); nothing deleted (--dry-run)",
            highlight=False,
        )
    else:
        done = sum(len(o) for o in plan.deleted.values())
        out.print(
            f"deleted {done} manifest object(s) of the other branch from "
            f"{len(plan.deleted)} remote(s); its data objects stay: `vaultfs verify` now calls "
            "them foreign, `vaultfs repair` moves them to quarantine/, `vaultfs prune` frees "
            "what this branch kept back during the fork",
            highlight=False,
        )
    for label, why in plan.errors.items():
        err.print(
            f"[yellow]{label}: could not delete ({why}): its {len(objects[label])} object(s) "
            "stay to be done; run `vaultfs fork retire` again once it answers[/]",
            highlight=False,
        )
    if plan.unread:
        err.print(
            f"[yellow]{plan.unread} more manifest name(s) off this chain were not read this "
            f"time (more than {chain.RETIRE_READS}): run `vaultfs fork retire` again[/]",
            highlight=False,
        )
