"""Retention and the routine: `vaultfs forget`, `vaultfs run`, `vaultfs schedule set|show|install`.

The rules are vaultfs/retention.py's (restic's); the jobs, their schedule and the alert events
are vaultfs/routine.py's. Exit codes: vaultfs/errors.py (`run` exits 20 when a job failed or
an audit found damage; `forget` 3 when what it shipped is not yet on k remotes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    HomeOpt,
    JsonOpt,
    StrategyOpt,
    app,
    err,
    home_dir,
    load_strategy,
    local_time,
    next_run_cell,
    open_vault,
    out,
    passphrase,
    print_json,
    print_table,
)
from cli.mounted import call, report_from, run_in_mount
from vaultfs import forget as forget_mod
from vaultfs import prune as prune_mod
from vaultfs import retention, routine, strategy, tiers
from vaultfs.errors import EXIT_JOB_FAILED, EXIT_PARTIAL, InputError, VaultError
from vaultfs.selfexec import cli_argv
from vaultfs.vault.home import check_vault


def _when(t: float | None) -> str:
    return local_time(t, "%Y-%m-%d %H:%M:%S")


# -- forget ------------------------------------------------------------------------------------
@app.command()
def forget(
    keep_last: Annotated[int, typer.Option(help="Keep the N newest snapshots.")] = 0,
    keep_hourly: Annotated[int, typer.Option(help="Keep the newest of each of N hours.")] = 0,
    keep_daily: Annotated[int, typer.Option(help="Keep the newest of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option(help="Keep the newest of each of N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option(help="Keep the newest of each of N months.")] = 0,
    keep_yearly: Annotated[int, typer.Option(help="Keep the newest of each of N years.")] = 0,
    keep_within: Annotated[
        str | None,
        typer.Option(help="Keep all newer than the newest snapshot minus DURATION (1y2m3d4h)."),
    ] = None,
    keep_within_hourly: Annotated[str | None, typer.Option(help="Hourly within DURATION.")] = None,
    keep_within_daily: Annotated[str | None, typer.Option(help="Daily within DURATION.")] = None,
    keep_within_weekly: Annotated[str | None, typer.Option(help="Weekly within DURATION.")] = None,
    keep_within_monthly: Annotated[
        str | None, typer.Option(help="Monthly within DURATION.")
    ] = None,
    keep_within_yearly: Annotated[str | None, typer.Option(help="Yearly within DURATION.")] = None,
    keep_name: Annotated[
        list[str] | None, typer.Option(help="Keep snapshots whose name matches GLOB (repeat).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be kept and forgotten.")
    ] = False,
    run_prune: Annotated[
        bool, typer.Option("--prune", help="Then free the space (`vaultfs prune`).")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget the snapshots a retention policy does not keep, with restic's rules: each
    --keep-hourly/daily/weekly/monthly/yearly N keeps the newest snapshot of each of the N
    most recent such periods (local time) that have one; counts of -1 mean unlimited.
    Works on a mounted vault too (through the mount, --prune as well)."""
    args: list[str] = []
    for opt, value in (
        ("last", keep_last), ("hourly", keep_hourly), ("daily", keep_daily),
        ("weekly", keep_weekly), ("monthly", keep_monthly), ("yearly", keep_yearly),
        ("within", keep_within), ("within-hourly", keep_within_hourly),
        ("within-daily", keep_within_daily), ("within-weekly", keep_within_weekly),
        ("within-monthly", keep_within_monthly), ("within-yearly", keep_within_yearly),
    ):  # fmt: skip
        if value:
            args += [f"--keep-{opt}", str(value)]
    for glob in keep_name or []:
        args += ["--keep-name", glob]
    try:
        policy = retention.Policy.from_args(args)
    except ValueError as e:
        raise InputError(str(e)) from None
    args_ = {"policy": args, "dry_run": dry_run, "prune": run_prune}
    result = run_in_mount(home, "forget", args_)
    if result is not None:
        result["mounted"] = True
    else:
        with open_vault(home) as v:

            def delete(uids: list[str]) -> dict:
                v.delete_snapshots(uids)
                rep = v.flush()
                below = v.status()["segments_below_k_placed"]
                return {"uploaded": rep.uploaded, "pending": rep.pending, "errors": rep.errors,
                        "segments_below_k_placed": below}  # fmt: skip

            result = forget_mod.command(v, policy, dry_run, run_prune, delete)
        result["mounted"] = False
    code = EXIT_PARTIAL if result.get("segments_below_k_placed") else 0
    prune_rep = None
    if "prune" in result:
        from cli.audit import prune_exit_code

        prune_rep = report_from(prune_mod.PruneReport, result["prune"])
        code = code or prune_exit_code(prune_rep)
    if as_json:
        print_json(result)
        raise typer.Exit(code)
    _print_forget(result, prune_rep)
    raise typer.Exit(code)


def _print_forget(result: dict, prune_rep: prune_mod.PruneReport | None) -> None:
    dry_run = result["dry_run"]
    out.print(f"applying policy: {result['policy']}", highlight=False)
    t = Table("id", "time", "name", "action", "reasons")
    rows = [(s, "keep", ", ".join(s["reasons"])) for s in result["keep"]]
    rows += [(s, "would forget" if dry_run else "forgotten", "") for s in result["forget"]]
    for s, action, why in sorted(rows, key=lambda x: x[0]["time"], reverse=True):
        t.add_row(s["id"], _when(s["time"]), s["name"] or "", action, why)
    print_table(t)
    verb = "would forget" if dry_run else "forgot"
    out.print(f"keep {len(result['keep'])} snapshot(s), {verb} {len(result['forget'])}")
    if not dry_run:
        for r, e in result.get("errors", {}).items():
            if prune_rep is not None and r in prune_rep.errors:
                continue  # the prune's report names it
            err.print(f"[yellow]warning:[/] {r}: {e}", highlight=False)
        if result.get("segments_below_k_placed"):
            err.print(
                f"[yellow]{result['segments_below_k_placed']} segment(s) have fewer than k "
                "shards on remotes: the data is safe in the local queue and goes out once "
                "remotes are back (`vaultfs flush`, or the next `vaultfs run`)[/]",
                highlight=False,
            )
    if prune_rep is not None:
        from cli.audit import print_prune

        if dry_run and result["forget"]:
            out.print(
                f"prune (dry run, as if the {len(result['forget'])} snapshot(s) above were "
                "forgotten):",
                highlight=False,
            )
        else:
            out.print("prune" + (" (dry run):" if dry_run else ":"))
        print_prune(prune_rep)
    elif result["forget"] and not dry_run and result.get("immutable"):
        out.print("immutable vault: the remotes keep every object (docs/operations.md)")
    elif result["forget"] and not dry_run:
        out.print("`vaultfs prune` frees their space")


# -- run ---------------------------------------------------------------------------------------
@app.command()
def run(
    strategy_file: StrategyOpt = None,
    tier: Annotated[str | None, typer.Option("--tier", help="Only this tier (due or not).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say which tiers are due; change nothing.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One pass of the vault's routine: every scheduled job that is due (`vaultfs schedule`),
    then the alert checks. With a strategy (--strategy, or strategy.yaml in the home): every
    due tier instead, each one sources → snapshot → place → retention → sampled audit
    (docs/operations.md, Tiers). For a systemd timer or cron. On a mounted vault the mount
    makes the pass now, as its own routine does (no passphrase)."""
    h = home_dir(home)
    if strategy_file or strategy.default_path(h).exists():
        _run_tiers(load_strategy(home, strategy_file), tier, dry_run, as_json)
        return
    if tier or dry_run:
        raise InputError(
            f"--tier and --dry-run need a strategy file: give --strategy or write "
            f"{strategy.default_path(h)}"
        )
    opened = False
    try:
        if (res := _pass_in_mount(h)) is None:
            with open_vault(home) as v:
                opened = True
                res = routine.run_pass(h, v, False)
    except (VaultError, OSError) as e:  # no pass at all (no passphrase, a wrong one…): say so
        what = "make its pass" if opened else "open the vault"
        if problem := routine.failed_pass(h, getattr(e, "message", None) or str(e), what=what):
            err.print(f"[red]{problem}[/]", highlight=False)
        raise
    if as_json:
        print_json(res)
    else:
        if res.get("upload"):
            out.print(f"upload: {_brief(res['upload'])}", highlight=False)
        for job, r in res["ran"].items():
            out.print(f"{job}: {_brief(r)}", highlight=False)
        for job, why in res["waiting"].items():
            out.print(f"{job}: waiting ({why})", highlight=False)
        for job, e in res["failed"].items():
            err.print(f"[red]{job} failed:[/] {e}", highlight=False)
        for ev in res["alerts"]:
            err.print(f"[yellow]alert {ev['event']}:[/] {ev['message']}", highlight=False)
        for e in res.get("alert_errors", []):
            err.print(f"[red]{e}[/]", highlight=False)
        if not (res["ran"] or res["waiting"] or res["failed"] or res.get("upload")):
            out.print("nothing due")
    raise typer.Exit(EXIT_JOB_FAILED if res["failed"] else 0)


def _brief(result: dict) -> str:
    """A job's result for a person (`run --json` gives it as it is): ``needed yes, rebuilt 4,
    segments 4``; nested values in parentheses."""

    def said(value: object) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {said(v)}" for k, v in value.items())
            return f"({inner})" if inner else "none"
        if isinstance(value, list):
            return ", ".join(said(v) for v in value) if value else "none"
        return str(value)

    return ", ".join(f"{k.replace('_', ' ')} {said(v)}" for k, v in result.items() if v is not None)


def _pass_in_mount(home: Path) -> dict | None:
    """On a mounted vault, the pass its daemon makes for `vaultfs run` now (its routine's
    own, without a passphrase: vaultfs/routine.py), as run_pass reports it; None when the
    vault is not mounted. A pass of the routine under way is waited for first (one pass at
    a time), then only what is still due runs."""
    from vaultfs import control

    try:
        reply = call(control.home_address(home), {"cmd": "run"})
    except KeyboardInterrupt:
        err.print(
            "interrupted: the pass goes on in the mount daemon (`vaultfs status` shows "
            "what its jobs did)",
            highlight=False,
        )
        raise
    return None if reply is None else reply["pass"]


def _run_tiers(s: strategy.Strategy, only: str | None, dry_run: bool, as_json: bool) -> None:
    if only is not None:
        s.tier(only)  # a mistyped tier is named before the passphrase and the key are asked for
    master = pw = None
    if not dry_run:
        pw = passphrase()
        master = tiers.master_keys(s.home, pw)
    res = tiers.run(s, master, pw, only, dry_run)
    failed = [n for n, r in res["tiers"].items() if "failed" in r]
    if as_json:
        print_json(res)
        raise typer.Exit(EXIT_JOB_FAILED if failed else 0)
    for name, r in res["tiers"].items():
        if "skipped" in r:
            out.print(f"{name}: skipped: {r['skipped']}", highlight=False)
        elif not r["due"]:
            out.print(f"{name}: not due until {_when(r['next_due'])}", highlight=False)
        elif dry_run:
            out.print(f"{name}: due (would snapshot, place, apply retention, audit)")
        elif "ran" in r and "snapshot" in r["ran"]:
            ran = r["ran"]
            snap = ran["snapshot"]
            out.print(
                f"{name}: snapshot {snap['id']} ({snap['entries']} entries, {snap['bytes']:,} "
                f"bytes), forgot {len(ran.get('forgot', []))}, audit "
                f"{'clean' if ran['audit']['clean'] else 'found damage'}",
                highlight=False,
            )
        if "failed" in r:
            err.print(f"[red]{name} failed:[/] {r['failed']}", highlight=False)
    raise typer.Exit(EXIT_JOB_FAILED if failed else 0)


# -- schedule ----------------------------------------------------------------------------------
sched_app = typer.Typer(help="Set, show and install the vault's routine (`vaultfs run`).")
app.add_typer(sched_app, name="schedule")


@sched_app.command("set")
def schedule_set(
    pairs: Annotated[
        list[str],
        typer.Argument(
            metavar="KEY=VALUE...",
            help="e.g. snapshot=1h verify=daily:2% prune=weekly "
            'retention="--keep-daily 7" alert="CMD"; KEY= unsets.',
        ),
    ],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the routine's schedule (stored in the vault's home; applies from the next pass).
    Keys: snapshot, sources, retention, verify, verify_budget, repair, prune, alert,
    alert_timeout, grace, queue_age, maintenance_rate, maintenance_ops (docs/operations.md)."""
    changes = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq:
            raise InputError(f"{p!r} is not KEY=VALUE")
        changes[key.strip()] = value
    h = home_dir(home)
    check_vault(h)
    sched = routine.set_schedule(h, changes)
    if as_json:
        print_json(sched)
    else:
        _print_schedule(sched)


@sched_app.command("show")
def schedule_show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the schedule and when each job last ran and runs next."""
    h = home_dir(home)
    check_vault(h)
    sched = routine.load_schedule(h)
    state = routine.load_state(h)
    now = time.time()
    jobs = routine.job_times(sched, state, now)
    if as_json:
        print_json({"schedule": sched, "state": state, "jobs": jobs})
        return
    _print_schedule(sched)
    for job, j in jobs.items():
        out.print(
            f"  {job}: last success {_when(j['last_success'])}, "
            f"{next_run_cell(j['every'], j['next_run'], now)}",
            highlight=False,
        )


def _print_schedule(sched: dict[str, str]) -> None:
    if not sched:
        out.print("no schedule set (see `vaultfs schedule set --help`)")
    for k, val in sched.items():
        out.print(f"{k}={shlex.quote(val)}", highlight=False)


def default_unit_dir(system: bool) -> Path:
    if system:
        return Path("/etc/systemd/system")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "systemd" / "user"


def unit_files(home: Path, every: str, name: str, env_file: Path) -> dict[str, str]:
    """The service and timer that run `vaultfs run` for the vault at ``home`` every
    ``every`` (a systemd time span, e.g. 900s)."""
    cmd = cli_argv("run", "--home", str(home))
    pypath = os.environ.get("PYTHONPATH")
    service = f"""[Unit]
Description=vaultfs routine for {home}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
# VAULTFS_PASSPHRASE='...' (quoted) in a file only you can read (chmod 600)
EnvironmentFile=-{env_file}
Environment="VAULTFS_HOME={home}"
{f'Environment="PYTHONPATH={pypath}"' if pypath else ""}
ExecStart={shlex.join(cmd)}
Nice=10
IOSchedulingClass=idle
"""
    timer = f"""[Unit]
Description=Run the vaultfs routine for {home} every {every}

[Timer]
OnBootSec=5min
OnUnitInactiveSec={every}
RandomizedDelaySec=60

[Install]
WantedBy=timers.target
"""
    return {f"{name}.service": service, f"{name}.timer": timer}


@sched_app.command("install")
def schedule_install(
    unit_dir: Annotated[
        Path | None,
        typer.Option(help="Where to write the units (default: the user unit directory)."),
    ] = None,
    system: Annotated[
        bool, typer.Option("--system", help="Default to /etc/systemd/system instead.")
    ] = False,
    every: Annotated[
        str, typer.Option(help="How often the timer runs a pass: 15m, 1h, daily…")
    ] = "15m",
    name: Annotated[str, typer.Option(help="Unit name (without suffix).")] = "vaultfs-run",
    env_file: Annotated[
        Path | None, typer.Option(help="EnvironmentFile holding VAULTFS_PASSPHRASE.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a systemd service and timer that run `vaultfs run` for this vault."""
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", name):  # systemd's unit name characters
        raise InputError(
            f"--name {name!r} is not a systemd unit name: use letters, digits, '-', '_', '.'"
            " and ':' only"
        )
    h = home_dir(home).absolute()
    span = f"{int(routine.parse_every(every))}s"  # a systemd time span, whatever words we took
    env = (env_file or h / "routine.env").absolute()
    d = unit_dir or default_unit_dir(system)
    d.mkdir(parents=True, exist_ok=True)
    files = unit_files(h, span, name, env)
    for fname, text in files.items():
        (d / fname).write_text(text)
    written = [str(d / f) for f in files]
    if as_json:
        print_json({"written": written})
        return
    for w in written:
        out.print(f"wrote {w}", highlight=False)
    if not env.exists():
        err.print(
            f"[yellow]warning: {env} does not exist: write VAULTFS_PASSPHRASE='...' into it "
            f"(the value in single quotes; chmod 600), or every pass fails (the alert hook is "
            f"told)[/]",
            highlight=False,
        )
    ctl = "systemctl" + ("" if system else " --user")
    out.print(f"enable with: {ctl} daemon-reload && {ctl} enable --now {name}.timer")
    if shutil.which("systemd-analyze"):
        res = subprocess.run(
            ["systemd-analyze", "verify", *written], capture_output=True, text=True
        )
        if res.returncode != 0:
            err.print(f"[yellow]systemd-analyze verify: {res.stderr.strip()}[/]")
