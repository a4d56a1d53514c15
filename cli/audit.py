"""`vaultfs verify`, `vaultfs repair` and `vaultfs remote add|remove|replace|list`.

Exit codes (docs/operations.md): verify exits 0 when every audited remote is clean, 12 when
anything is missing, corrupt, stale, foreign or (an immutable vault's) unlocked, 11 when the only problem is an unreachable
remote; repair exits 0 when every live segment is back at full redundancy on the remotes,
12 when a segment could not be rebuilt (fewer than k good shards), 3 when rebuilt shards are
still queued for a remote that is down; 14 for a remote that is not part of the vault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    HomeOpt,
    JsonOpt,
    advance_segments,
    app,
    err,
    last_audit_cell,
    open_vault,
    out,
    print_json,
    print_table,
    progress,
    track,
    warn_remote_errors,
)
from cli.mounted import report_from, run_in_mount
from vaultfs import prune as prune_mod
from vaultfs import repair as repair_mod
from vaultfs import routine
from vaultfs import verify as verify_mod
from vaultfs.errors import EXIT_PARTIAL, InputError
from vaultfs.remotes import absolute, check_archive, check_local_dir

EXIT_FOUND = 12
EXIT_UNREACHABLE = 11


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1.0:
        return "100%"
    return f"{x * 100:.2f}%"


@app.command()
def verify(
    remote: Annotated[
        list[str] | None, typer.Option("--remote", help="Audit only this remote (repeat).")
    ] = None,
    sample_pct: Annotated[
        str | None,
        typer.Option(
            "--sample",
            metavar="PERCENT",
            help="Check this percentage (2 or 2%) of each remote's blocks.",
        ),
    ] = None,
    read_all: Annotated[
        bool, typer.Option("--read-all", help="Read and check every byte of every remote.")
    ] = False,
    max_duration: Annotated[
        float | None,
        typer.Option(
            "--max-duration", help="Stop after SECONDS; the next verify resumes the audit."
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit every remote with random challenges checked up to the signed vault root.

    Without --sample or --read-all, each remote gets enough random block checks to detect a 1%
    block loss with 99% confidence (459 checks).
    """
    if sample_pct is not None and read_all:
        raise InputError("give --sample PERCENT or --read-all, not both")
    sample = None if sample_pct is None else routine.parse_sample(sample_pct)
    if max_duration is not None and max_duration <= 0:
        raise InputError("--max-duration takes a positive number of seconds")
    mode = "read-all" if read_all else ("sample" if sample is not None else "confidence")
    remote = [absolute(r) for r in remote] if remote else remote  # the daemon runs in /
    args = {"remotes": remote, "mode": mode, "sample": sample, "max_duration": max_duration}
    if (done := run_in_mount(home, "verify", args, "verify", as_json)) is not None:
        rep = report_from(verify_mod.AuditReport, done, {"remotes": verify_mod.RemoteAudit})
    else:
        with open_vault(home) as v, progress("verify", quiet=as_json) as prog:
            # bytes read of those the planned checks read (read-all: every object)
            rep = verify_mod.audit(
                v, remote, mode=mode, sample=sample, max_duration=max_duration,
                progress=track(prog),
            )  # fmt: skip
    if as_json:
        print_json(rep.to_dict())
    else:
        _print_audit(rep)
    if not rep.clean:
        raise typer.Exit(EXIT_FOUND if rep.found else EXIT_UNREACHABLE)


def _print_audit(rep: verify_mod.AuditReport) -> None:
    if rep.mode == "confidence":
        out.print(
            f"target: {_pct(rep.target_confidence)} confidence against {_pct(rep.loss)} block "
            f"loss = {rep.checks_needed} random checks per remote "
            f"(⌈ln(1−C)/ln(1−x)⌉); anchored to manifest #{rep.manifest_seq}",
            highlight=False,
        )
    t = Table(
        "remote",
        "state",
        "checked",
        "missing",
        "corrupt",
        "stale",
        "foreign",
        "confidence",
        "read",
    )
    for r in rep.remotes:
        checked = f"{r.checked}/{r.planned}" if r.planned else str(r.checked)
        t.add_row(
            r.remote,
            r.state + ("" if r.complete or r.unreachable else " (partial)"),
            checked,
            str(len(r.missing)),
            str(len(r.corrupt)),
            str(len(r.stale) + (1 if r.stale_manifest else 0)),
            str(len(r.foreign)),
            _pct(r.confidence) if r.unchecked is None and not r.unreachable else "-",
            f"{r.bytes_read:,} B",
        )
    print_table(t)
    for r in rep.remotes:
        if r.unreachable:
            err.print(
                f"[yellow]{r.remote}: unreachable[/] ({r.error}); its data is presumed intact "
                "until an audit says otherwise",
                highlight=False,
            )
        elif r.unchecked is not None:
            err.print(
                f"[yellow]{r.remote}: nothing could be checked:[/] {r.unchecked}", highlight=False
            )
        for path, detail in r.details.items():
            err.print(f"[red]{r.remote}[/]: {path}: {detail}", highlight=False)
        if r.lock is not None:  # an immutable vault: its server-side protection
            color = "green" if r.locked else "yellow"
            err.print(f"[{color}]{r.remote}: object lock:[/] {r.lock}", highlight=False)
        if not r.complete and not r.unreachable:
            err.print(
                f"{r.remote}: audit cut off with {r.remaining} of {r.planned} checks left; "
                "run `vaultfs verify` again to resume it",
                highlight=False,
            )
    if rep.unsigned_segments:
        out.print(
            f"{rep.unsigned_segments} segment(s) newer than the latest manifest were checked "
            "against the local index only"
        )
    if rep.clean:
        out.print(f"all audited remotes are clean ({rep.seconds:.1f}s)")
    elif any(r.fork for r in rep.remotes) and all(r.ahead for r in rep.remotes if r.fork):
        err.print(
            f"[yellow]stale home: the remotes' chain goes on past this home's newest manifest "
            f"#{rep.manifest_seq} (another machine, or a newer copy of this home, wrote to the "
            "vault; no fork): move this home aside and run `vaultfs home rebuild --from ...` "
            "(any k remotes) to carry on from the remotes[/]",
            highlight=False,
        )
    elif any(r.fork for r in rep.remotes):
        err.print(
            f"[yellow]fork: the remotes hold manifests off this vault's chain (this home uses "
            f"#{rep.manifest_seq}); repair keeps every object of both branches. Restore either "
            "with `vaultfs restore --from ... --manifest SEQ/HASH`; carry on from the other "
            "with `vaultfs home rebuild --from ...`; end a fork made on purpose with `vaultfs "
            "fork retire` in the home of the branch you keep[/]",
            highlight=False,
        )
    elif rep.found:
        if rep.below_k:
            err.print(
                f"[red]{len(rep.below_k)} segment(s) (first: {rep.below_k[0]}) have fewer than k "
                "shards on the vault's remotes[/]: run `vaultfs repair`; a `remote remove` cut "
                "short is finished by running it again",
                highlight=False,
            )
        if any(
            r.missing or r.corrupt or r.stale or r.foreign or r.stale_manifest for r in rep.remotes
        ):
            err.print("[yellow]problems found: run `vaultfs repair` to restore full redundancy[/]")
        if any(r.unlocked for r in rep.remotes):
            err.print(
                "[yellow]unlocked objects: their remote's spec asks for S3 Object Lock, but they "
                "are not locked for the retention asked (a bucket without Object Lock, a spec "
                "that lost its lock options, or locks that ended while snapshots still need "
                'the objects): see docs/operations.md, "Immutable vaults"[/]'
            )
    else:  # only unreachable remotes: nothing to repair yet
        err.print(
            "[yellow]some remotes could not be audited: run `vaultfs verify` again once they "
            "are reachable; one gone for good is rebuilt onto a new empty remote by "
            "`vaultfs remote replace OLD NEW`[/]"
        )


@app.command()
def repair(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be rebuilt; change nothing.")
    ] = False,
    source: Annotated[
        list[Path] | None,
        typer.Option(
            "--source",
            help="Live copy of backed-up files (repeat): heals segments no k shards can rebuild.",
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild every shard that is lost, corrupt, stale or on a departed remote, from k good
    shards or the local queue, and place it on a healthy remote."""
    for p in source or []:
        if not p.exists():
            raise InputError(f"--source {p} does not exist")
    sources = [str(p.resolve()) for p in source or []]  # the daemon has its own cwd
    if (
        done := run_in_mount(
            home, "repair", {"dry_run": dry_run, "sources": sources}, "repair", as_json or dry_run
        )
    ) is not None:
        rep = _repair_report(done)
    else:
        repair_mod.keep_rebuild_buffers()  # not in the daemon: its resident size is bounded
        with open_vault(home) as v:
            with progress("repair", quiet=as_json or dry_run) as prog:
                # bytes of rebuilt shards written, of the total the plan rebuilds
                rep = repair_mod.repair(v, dry_run=dry_run, sources=source, progress=track(prog))
    _print_repair(rep, as_json)
    raise typer.Exit(_repair_code(rep))


def _repair_report(data: dict) -> repair_mod.RepairReport:
    """A repair report the mount's daemon returned, as the command's own."""
    return report_from(repair_mod.RepairReport, data, {"items": repair_mod.RepairItem})


def _repair_code(rep: repair_mod.RepairReport) -> int:
    if rep.unrecoverable:
        return EXIT_FOUND
    if not rep.dry_run and (any(rep.pending.values()) or rep.not_found or rep.not_cleared):
        return EXIT_PARTIAL
    return 0


def _print_repair(rep: repair_mod.RepairReport, as_json: bool) -> None:
    if as_json:
        print_json(rep.to_dict())
        return
    verb = "would rebuild" if rep.dry_run else "rebuilt"
    for it in rep.items:
        if it.keep_name:  # the lost object, byte for byte
            out.print(
                f"{verb} {it.old_remote}:{it.old} ({it.reason}) under its own name",
                highlight=False,
            )
            continue
        out.print(
            f"{verb} {it.old_remote}:{it.old} ({it.reason}) -> {it.target}"
            + (f":{it.new}" if it.new else " under a new name"),
            highlight=False,
        )
    for d in rep.deleted:
        out.print(f"{'would delete' if rep.dry_run else 'deleted'} {d}", highlight=False)
    for d in rep.quarantined:
        out.print(
            f"{'would move' if rep.dry_run else 'moved'} {d} to quarantine/ (not recognised)",
            highlight=False,
        )
    for d in rep.retained:
        out.print(f"kept {d}: the vault is immutable (replaced, never deleted)", highlight=False)
    if rep.fork:
        err.print(
            "[yellow]fork: the remotes hold manifests off this vault's chain; replaced objects "
            "were kept (they may be that branch's):[/]\n  " + "\n  ".join(rep.fork),
            highlight=False,
        )
    if rep.healed_from_source:
        out.print(f"healed {rep.healed_from_source} chunk(s) from the --source files")
    for u in rep.unrecoverable:
        err.print(f"[red]cannot repair:[/] {u}", highlight=False)
    for f in rep.damaged_files:
        err.print(f"[red]damaged:[/] {f} (give its live copy with --source)", highlight=False)
    for r in rep.unreachable:
        err.print(f"[yellow]{r} is unreachable: its shards were left alone[/]", highlight=False)
    warn_remote_errors(rep.errors)
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if rep.pending:
        behind = ", ".join(f"{r} ({c} queued)" for r, c in rep.pending.items())
        err.print(f"[yellow]still queued for: {behind}; run `vaultfs flush` later[/]")
    out.print(
        f"{verb} {len(rep.items) if rep.dry_run else rep.rebuilt} shard(s) of "
        f"{rep.segments} segment(s); "
        f"fetched {rep.bytes_fetched:,} B, wrote {rep.bytes_written:,} B"
        + (f"; manifest #{rep.manifest_seq}" if rep.manifest_seq else "")
        + f" ({rep.seconds:.1f}s)"
    )


# -- remotes -----------------------------------------------------------------------------------
remote_app = typer.Typer(help="Add, remove, replace and list the vault's remotes.")
app.add_typer(remote_app, name="remote")


@app.command()
def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be freed; change nothing.")
    ] = False,
    repack_below: Annotated[
        float,
        typer.Option(
            help="Repack a segment whose live records fill less than this share of it (0-1)."
        ),
    ] = prune_mod.REPACK_BELOW,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Free what no snapshot and no file of the live tree uses any more (after
    `vaultfs snapshot delete`): drop unused segments, repack sparse ones, then delete the old
    objects from the remotes once the new index is placed. On a mounted vault the mount's
    daemon prunes (storing dirty blocks pauses meanwhile)."""
    if not 0 <= repack_below <= 1:
        raise InputError("--repack-below is a fraction between 0 and 1")
    args = {"repack_below": repack_below, "dry_run": dry_run}
    if (done := run_in_mount(home, "prune", args, "prune", as_json or dry_run)) is not None:
        rep = report_from(prune_mod.PruneReport, done)
    else:
        with open_vault(home) as v:
            with progress("prune", quiet=as_json or dry_run) as prog:
                rep = prune_mod.prune(
                    v, repack_below=repack_below, dry_run=dry_run,
                    progress=advance_segments(prog, v.segment_size),
                )  # fmt: skip
    if as_json:
        print_json(rep.as_dict())
    else:
        print_prune(rep)
    raise typer.Exit(prune_exit_code(rep))


def print_prune(rep: prune_mod.PruneReport) -> None:
    """What a prune (or its dry run) freed, per remote, what waits, and the remotes' errors:
    `vaultfs prune`'s report, also `forget --prune`'s."""
    dry_run = rep.dry_run
    verb = "would free" if dry_run else "freed"
    out.print(
        f"{verb} {rep.contents_freed} file content(s) no snapshot names,"
        f" {rep.chunks_freed} chunk(s), {rep.bytes_freed:,} bytes of data"
        f" ({rep.stored_freed:,} bytes per copy stored): {rep.dropped} segment(s) dropped,"
        f" {rep.repacked} repacked into {rep.written}",
        highlight=False,
    )
    for r, b in sorted(rep.freed_per_remote.items()):
        later = rep.remote_deferred.get(r, 0)
        out.print(
            f"  {r}: {b:,} bytes"
            + (" to free" if dry_run else " freed")
            + (f"; {later:,} bytes to free at a later prune" if later else ""),
            highlight=False,
        )
    if not dry_run:
        out.print(
            f"deleted {rep.garbage_deleted} old object(s) from the remotes"
            + (f"; {rep.garbage_left} wait for a later prune" if rep.garbage_left else ""),
            highlight=False,
        )
        if rep.garbage_waiting:
            err.print(
                f"[yellow]{rep.garbage_waiting} of them wait for queued uploads to land "
                "(a remote did not take the newest manifest): run `vaultfs flush` once "
                "every remote is reachable, then `vaultfs prune` again[/]",
                highlight=False,
            )
        elif rep.garbage_left and not rep.garbage_held:
            err.print(
                f"[yellow]{rep.garbage_left} could not be deleted (a remote failed): run "
                "`vaultfs prune` again once every remote is reachable[/]",
                highlight=False,
            )
        if rep.garbage_held:
            err.print(f"[yellow]old objects kept: {rep.garbage_held}[/]", highlight=False)
    warn_remote_errors(rep.errors)


def prune_exit_code(rep: prune_mod.PruneReport) -> int:
    """`vaultfs prune`'s exit code (also `forget --prune`'s): EXIT_PARTIAL when old objects
    wait for a later prune or a remote failed, else 0 (a dry run: 0)."""
    return EXIT_PARTIAL if (rep.garbage_left or rep.errors) and not rep.dry_run else 0


@remote_app.command("add")
def remote_add(
    spec: Annotated[str, typer.Argument(help="rclone remote spec of an empty location.")],
    domain: Annotated[
        str | None,
        typer.Option("--domain", help="Failure domain label (e.g. the provider's name)."),
    ] = None,
    archive: Annotated[
        bool,
        typer.Option("--archive", help="Accept remotes on an archive storage class (Glacier)."),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a remote; new data is spread over it and the latest manifest is sent to it."""
    spec = absolute(spec)
    check_archive(spec, archive)
    check_local_dir(spec)
    if (info := run_in_mount(home, "remote-add", {"spec": spec, "domain": domain})) is None:
        with open_vault(home) as v:
            info = repair_mod.add_remote(v, spec, domain)
            info["survives_losses_design"] = v.status()["survives_losses_design"]
    if as_json:
        print_json(info)
        return
    out.print(remote_add_summary(info), highlight=False)


def remote_add_summary(info: dict) -> str:
    """`remote add`'s line: the placement rule's figure for new data, and the truth about
    the data stored before the add, which stays where it was (``stored_on``)."""
    head = f"added {info['remote']} (domain {info['domain']}); "
    held, now = info["stored_on"], info["restore_needs_now"]
    if not held or (len(held) == info["remotes"] and now == info["restore_needs"]):
        return (
            head + f"the vault now survives {info['survives_losses_design']} domain loss(es) "
            f"by design; any {info['restore_needs']} of its {info['remotes']} remotes (with "
            "the key) restore everything"
        )
    names = ", ".join(held)
    if now is None:
        stored = f"what is stored now is on {names} and some of it is below k shards there"
    elif now == len(held):
        stored = f"what is stored now needs {'both' if now == 2 else 'all'} of {names}"
    else:
        stored = f"what is stored now needs any {now} of {names}"
    return (
        head + f"new data spreads over it (any {info['restore_needs']} of the "
        f"{info['remotes']} remotes, with the key, will restore that); {stored} (the data "
        f"already stored is not moved), so the vault survives "
        f"{info['survives_losses_design']} domain loss(es) as it is placed now"
    )


@remote_app.command("remove")
def remote_remove(
    spec: Annotated[str, typer.Argument(help="The remote to take out of the vault.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a remote: rebuild its shards on the others, then delete what it held."""
    spec = absolute(spec)  # a relative path names a directory of this working directory
    if (
        done := run_in_mount(home, "remote-remove", {"name": spec}, "remote remove", as_json)
    ) is not None:
        rep = _repair_report(done)
    else:
        repair_mod.keep_rebuild_buffers()  # they rebuild as repair does
        with open_vault(home) as v, progress("remote remove", quiet=as_json) as prog:
            # bytes of rebuilt shards written, as repair's bar
            rep = repair_mod.remove_remote(v, spec, progress=track(prog))
    _print_repair(rep, as_json)
    raise typer.Exit(_repair_code(rep))


@remote_app.command("replace")
def remote_replace(
    old: Annotated[str, typer.Argument(help="The remote being replaced (may be gone).")],
    new: Annotated[str, typer.Argument(help="An empty remote that takes its place.")],
    domain: Annotated[
        str | None, typer.Option("--domain", help="Failure domain of the new remote.")
    ] = None,
    archive: Annotated[
        bool,
        typer.Option("--archive", help="Accept remotes on an archive storage class (Glacier)."),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a remote (a provider that shut down): rebuild its shards onto the new one."""
    old, new = absolute(old), absolute(new)
    check_archive(new, archive)
    check_local_dir(new)
    args = {"old": old, "new": new, "domain": domain}
    if (done := run_in_mount(home, "remote-replace", args, "remote replace", as_json)) is not None:
        rep = _repair_report(done)
    else:
        repair_mod.keep_rebuild_buffers()  # they rebuild as repair does
        with open_vault(home) as v, progress("remote replace", quiet=as_json) as prog:
            # bytes of rebuilt shards written, as repair's bar
            rep = repair_mod.replace_remote(v, old, new, domain, progress=track(prog))
    _print_repair(rep, as_json)
    raise typer.Exit(_repair_code(rep))


@remote_app.command("list")
def remote_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Each remote's health, last audit and what it holds."""
    with open_vault(home, lock=False) as v:
        rows = repair_mod.list_remotes(v)
    if as_json:
        print_json(rows)
        return
    t = Table(
        "remote",
        "domain",
        "health",
        "placed",
        "queued",
        "lost",
        "last audit",
    )
    for r in rows:
        t.add_row(
            r["remote"],
            r["domain"],
            r["health"],
            f"{r['placed_objects']} ({r['placed_bytes']:,} B)",
            f"{r['queued_objects']}",
            f"{r['lost_objects']}",
            last_audit_cell(r),
        )
    print_table(t)
