"""The everyday commands: `vaultfs init`, `backup`, `flush`, `snapshots`, `ls`, `status`.

Exit codes: vaultfs/errors.py; `backup` and `flush` exit 3 when a segment has fewer than k
shards on the remotes (the rest waits in the local queue for the next flush).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import (
    HomeOpt,
    IKnowOpt,
    JsonOpt,
    StrategyOpt,
    advance,
    app,
    err,
    home_dir,
    last_audit_cell,
    load_strategy,
    local_time,
    manifest_fields,
    new_passphrase,
    newest_manifest,
    next_run_cell,
    open_vault,
    out,
    print_json,
    print_table,
    progress,
    redundancy_warnings,
    report_flush,
)
from vaultfs import names
from vaultfs.errors import InputError

if TYPE_CHECKING:
    from vaultfs.strategy import Strategy


# -- init --------------------------------------------------------------------------------------
@app.command()
def init(
    remote: Annotated[
        list[str], typer.Option("--remote", "-r", help="rclone remote spec (repeat).")
    ],
    profile: Annotated[
        str | None, typer.Option(help="personal (3/5), federation (5/9) or paranoid (7/15).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="Shards needed to read.")] = None,
    n: Annotated[int | None, typer.Option("-n", help="Shards written.")] = None,
    segment_mib: Annotated[int, typer.Option(help="Segment size in MiB.")] = 4,
    immutable: Annotated[
        bool,
        typer.Option(
            "--immutable",
            help="Append-only: never ask a remote to delete or overwrite (prune refuses).",
        ),
    ] = False,
    object_lock: Annotated[
        str | None,
        typer.Option(
            "--object-lock",
            help="With --immutable: lock every object on S3 remotes for this long (365d, 1y) "
            "with S3 Object Lock, COMPLIANCE mode.",
        ),
    ] = None,
    archive: Annotated[
        bool,
        typer.Option("--archive", help="Accept remotes on an archive storage class (Glacier)."),
    ] = False,
    seed_file: Annotated[
        Path | None,
        typer.Option(help="Make the vault from this master seed (64 hex digits), not a new one."),
    ] = None,
    share_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--share-file",
            "--shares",
            help="Make the vault from the seed these Shamir shares "
            "recover (repeat; `vaultfs keys split`).",
        ),  # fmt: skip
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    i_know: IKnowOpt = False,
) -> None:
    """Create a vault over one or more remotes, with a new master seed or an existing one
    (--seed-file, --share-file: a second vault under a seed whose shares you already hold).
    With --immutable it is append-only: no command asks a remote to delete, move or overwrite
    an object (lock the objects on the server too: docs/operations.md, "Immutable vaults")."""
    from vaultfs import erasure
    from vaultfs.objectlock import check_retention, lock_spec
    from vaultfs.remotes import absolute, check_archive, check_distinct, check_local_dir
    from vaultfs.vault import Vault
    from vaultfs.vault.placement import remotes_needed

    if profile and (k is not None or n is not None):
        raise InputError("give either --profile or -k/-n, not both")
    if k is not None or n is not None:
        if k is None or n is None:
            raise InputError("-k and -n go together")
    else:
        name = profile or "personal"
        if name not in erasure.PROFILES:
            raise InputError(f"unknown profile {name!r}: choose from {', '.join(erasure.PROFILES)}")
        k, n = erasure.PROFILES[name]
    try:
        erasure.validate(k, n)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not 1 <= segment_mib <= 64:
        raise InputError("--segment-mib must be between 1 and 64")
    remote = [absolute(spec) for spec in remote]
    check_distinct(remote)  # as Vault.create does, but before the passphrase is asked
    for spec in remote:
        check_archive(spec, archive)
        check_local_dir(spec)
    if object_lock is not None:
        if not immutable:
            raise InputError("--object-lock goes with --immutable")
        remote = [lock_spec(s, check_retention(object_lock)) for s in remote]
    seed = _given_seed(seed_file, share_file or [])
    h = home_dir(home)
    pw = new_passphrase(i_know)
    with Vault.create(
        h, remote, k, n, pw, seed, segment_mib * 1024 * 1024, immutable=immutable,
        object_lock=object_lock,
    ) as v:  # fmt: skip
        st = v.status()
    if as_json:
        print_json({"home": str(h), **st})
        return
    out.print(f"Created vault {st['fingerprint']} at {h}")
    out.print(
        f"  {k}-of-{n} over {len(remote)} remote(s); survives {st['survives_losses_design']} remote loss(es)"
    )
    needed, _crowded = remotes_needed(len(remote), k, n)
    survives = st["survives_losses_design"]
    for w in redundancy_warnings(len(remote), k, n, survives, "`vaultfs remote add`"):
        err.print(f"[yellow]warning: {w}[/]")
    which = "the remote" if len(remote) == 1 else f"any {needed} of the {len(remote)} remotes"
    out.print(
        f"  Keep a copy of {h / 'key.json'} and your passphrase somewhere else: with "
        f"{which} they restore everything."
    )


def _given_seed(seed_file: Path | None, share_files: list[Path]) -> bytes | None:
    """The seed of --seed-file or of --share-file shares; None for a new one."""
    from vaultfs import shamir
    from vaultfs.keys import parse_seed

    if seed_file and share_files:
        raise InputError("give --seed-file or --share-file, not both")
    if seed_file:
        try:
            return parse_seed(seed_file.read_text())
        except OSError as e:
            raise InputError(f"cannot read {seed_file}: {e.strerror}") from None
    if not share_files:
        return None
    parsed = []
    for f in share_files:
        try:
            parsed.append(shamir.parse_share_text(f.read_text(), f.name))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read share file {f}: {e}") from None
    return shamir.recover(parsed).seed


# -- backup ------------------------------------------------------------------------------------
@app.command()
def backup(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files and directories.")] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Read one file from standard input.")
    ] = False,
    stdin_filename: Annotated[
        str | None, typer.Option("--stdin-filename", help="Name of the stdin file in the snapshot.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for the snapshot.")] = None,
    no_upload: Annotated[
        bool, typer.Option("--no-upload", help="Commit locally; leave shards queued.")
    ] = False,
    fork: Annotated[
        bool,
        typer.Option(
            "--fork",
            help="If the remotes hold manifests this home never wrote (exit 21), record an "
            "explicit fork instead of refusing.",
        ),
    ] = False,
    add_backend: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--add-backend",
            metavar="TIER REMOTE",
            help="With `backup config`: add REMOTE to TIER's backends in the strategy file "
            "(comments kept; K_of_N becomes K_of_N+1).",
        ),  # fmt: skip
    ] = None,
    strategy_file: StrategyOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Back up files/directories (or stdin) as a new snapshot, then upload. `backup config
    --add-backend TIER REMOTE` edits the strategy file instead (docs/operations.md, Tiers)."""
    if add_backend is not None:
        from vaultfs import strategy, tiers

        if [str(p) for p in paths or []] != ["config"] or stdin:
            raise InputError("--add-backend goes with `vaultfs backup config` alone")
        h = home_dir(home)
        path = strategy_file or strategy.default_path(h)
        name, spec = add_backend
        made = tiers.made_coding(strategy.load(path, h).tier(name))
        keep = None if made is None else (made[0], made[1])
        s = strategy.add_backend(path, h, name, spec, keep=keep)
        tier = s.tiers[name]
        if as_json:
            print_json(tier.as_json())
            return
        out.print(
            f"{s.path}: tier {tier.name} now {tier.k}_of_{tier.n} over {', '.join(tier.backends)}",
            highlight=False,
        )
        if made is not None:
            err.print(
                f"[yellow]tier {tier.name}'s vault exists and stays {made[0]}-of-{made[1]} (a "
                "vault's k-of-n is fixed when it is made): to spread it over the new backend, "
                f"run `vaultfs remote add --home {tier.home} {spec}`[/]",
                highlight=False,
            )
        return
    if stdin == bool(paths):
        raise InputError("give PATH… or --stdin (with --stdin-filename), not both or neither")
    if stdin and not stdin_filename:
        raise InputError("--stdin needs --stdin-filename NAME")
    if name is not None:
        names.check_snapshot_name(name)  # before anything is read
    from vaultfs.backup import backup_paths, backup_stream

    with open_vault(home) as v:
        t0 = time.perf_counter()
        with progress("backup", quiet=as_json) as prog:
            # the bar's total: the files' sizes from the walk backup_paths makes first
            # anyway (no stat more), or stdin's size when it is a regular file (`< FILE`)
            planned = None if prog is None else (lambda n: prog[0].update(prog[1], total=n))
            if stdin:
                if planned is not None and (n := _stdin_size()) is not None:
                    planned(n)
                uid, count, size = backup_stream(
                    v, sys.stdin.buffer, stdin_filename or "", name, advance(prog),
                    upload=not no_upload, fork=fork,
                )  # fmt: skip
            else:
                uid, count, size = backup_paths(
                    v, list(paths or []), name, advance(prog), upload=not no_upload,
                    fork=fork, planned=planned,
                )  # fmt: skip
        info = {"snapshot": uid, "entries": count, "bytes": size, **manifest_fields(v)}
        link = newest_manifest(v)
        if no_upload:
            code = 0
            if as_json:
                print_json({**info, "uploaded": 0, "complete": False})
        else:  # one slow remote must not set the pace: the rest of it stays queued
            code = report_flush(v, as_json, info, quorum=True)
    if not as_json:
        dt = time.perf_counter() - t0
        out.print(
            f"snapshot {uid}: {count} entries, {size:,} bytes in {dt:.1f}s, "
            f"manifest {link.short if link else '#0'}",
            highlight=False,
        )
    raise typer.Exit(code)


def _stdin_size() -> int | None:
    """The bytes left to read on stdin when it is a regular file; None for a pipe or a
    terminal (their size is not known before the end)."""
    try:
        fd = sys.stdin.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
    except (OSError, ValueError):
        return None


@app.command()
def flush(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Upload every queued shard and manifest; wait until done or report who is behind.

    Exits 0 only when everything is on every remote, 3 while anything is still queued."""
    from cli.mounted import flush_via_mount

    if (code := flush_via_mount(home, as_json)) is not None:  # flushed by the mount's daemon
        raise typer.Exit(code)
    with open_vault(home) as v:
        code = report_flush(v, as_json, every_remote=True)
    raise typer.Exit(code)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _tier_status(s: Strategy, as_json: bool) -> None:
    from vaultfs import tiers

    rows = tiers.report(s)
    if as_json:
        print_json({"strategy": str(s.path), "tiers": rows})
        return
    t = Table("tier", "coding", "last success", "next due", "RPO", "survives", "last error")
    differ: list[str] = []
    for r in rows:
        if r["live"]:
            t.add_row(r["tier"], "live", "-", "-", "-", "-", "the database itself")
            continue
        now_ok = r["survives_losses_now"]
        survives = f"{'?' if now_ok is None else now_ok} of {r['survives_losses_design']}"
        coding, vault = r["coding"], r["vault"]
        if vault is not None and not vault["agrees"]:
            coding = (
                f"vault {vault['k']}-of-{vault['n']} on {len(vault['remotes'])} remote(s); "
                f"file {coding} on {r['backends']}"
            )
            differ.append(r["tier"])
        t.add_row(
            r["tier"], coding, local_time(r["last_success"]),
            local_time(r["next_due"]) if r["last_success"] else "now", _ago(r["rpo_seconds"]),
            survives, r["last_error"] or "",
        )  # fmt: skip
    print_table(t)
    if differ:
        err.print(
            f"[yellow]{', '.join(differ)}: the vault differs from the file; `vaultfs strategy "
            "apply` names the command that makes them agree[/]",
            highlight=False,
        )


# -- listing -----------------------------------------------------------------------------------
@app.command()
def snapshots(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List snapshots."""
    from cli.mounted import call
    from vaultfs import control
    from vaultfs.index import snapshots as snapshot_rows

    # mounted: the daemon lists them (no passphrase asked, docs/mount.md)
    reply = call(control.home_address(home_dir(home)), {"cmd": "snapshots"}, timeout=60)
    if reply is not None:
        items = reply["snapshots"]
    else:
        with open_vault(home, lock=False) as v:
            items = snapshot_rows.listing(v.index)
    if as_json:
        print_json(items)
        return
    t = Table("id", "time", "name", "entries", "bytes", "manifest")
    for it in items:
        t.add_row(
            it["id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(it["time"])),
            it["name"] or "",
            str(it["entries"]),
            f"{it['bytes']:,}",
            f"#{it['seq']}/{it['manifest_hash'] or '?'}",
        )
    print_table(t)


@app.command()
def ls(
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, name or 'latest'.")],
    path: Annotated[str | None, typer.Argument(help="Only entries under this path.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the entries of a snapshot. Names that are not UTF-8, and control characters,
    are shown escaped (\\xNN, \\n, \\\\); --json gives them exactly (path_hex). On a mounted
    vault the mount answers (no passphrase)."""
    from cli.mounted import call
    from vaultfs import control
    from vaultfs.index import snapshots as snapshot_rows

    # mounted: the daemon lists it (no passphrase asked, docs/mount.md), in parts
    rows: list = []
    req = {"cmd": "ls", "snapshot": snapshot, "path": path}
    reply = call(control.home_address(home_dir(home)), req, timeout=300, parts=rows.extend)
    if reply is not None:
        uid, note = reply["snapshot"], reply["note"]
    else:
        with open_vault(home, lock=False) as v:
            uid, note, rows = snapshot_rows.listed(v.index, snapshot, path)
    if note:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if path and not rows:
        raise InputError(f"{path!r} is not in snapshot {uid}")
    if as_json:
        items = []
        for pth, typ, mode, size, mt, target, rdev in rows:
            item = {**names.json_fields("path", pth), "type": typ, "mode": mode, "size": size}
            item |= {"mtime_ns": mt, **names.json_fields("target", target)}
            if typ in ("c", "b"):
                item["rdev"] = rdev
            items.append(item)
        print_json(items, ensure_ascii=True)  # lone surrogates as \udcXX
        return
    for pth, typ, mode, size, _mt, target, rdev in rows:
        suffix = f" -> {names.display(names.from_db(target or ''))}" if typ == "l" else ""
        if typ == "d":
            suffix = "/"
        if typ in ("c", "b") and rdev is not None:
            suffix = f" ({os.major(rdev)},{os.minor(rdev)})"
        out.print(
            f"{typ} {mode:04o} {size:>14,} {names.display(names.from_db(pth))}{suffix}",
            highlight=False,
            markup=False,
        )


@app.command()
def status(
    strategy_file: StrategyOpt = None, home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Show remotes, queue, redundancy and how many remote losses the vault survives. With
    --strategy (or in a home that holds a strategy.yaml and no vault of its own): every tier's
    last success, next due, RPO and redundancy."""
    from cli.mounted import call
    from vaultfs import control, routine
    from vaultfs.index import manifests
    from vaultfs.vault.home import dead_mount, detached_mount

    h = home_dir(home)
    if strategy_file or not (h / "index.db").exists():  # a strategy's home? (YAML: load late)
        from vaultfs import strategy

        if strategy_file or strategy.default_path(h).exists():
            _tier_status(load_strategy(home, strategy_file), as_json)
            return
    # mounted: the daemon reports (no passphrase asked, docs/mount.md)
    reply = call(control.home_address(h), {"cmd": "status"}, timeout=60)
    if reply is not None:
        st, mounted = reply["status"], reply["mount"]
    else:
        with open_vault(home, lock=False) as v:
            st = v.status()
            st["routine"] = routine.report(h, v)
            st |= manifest_fields(v)
            st["fork"] = manifests.fork_seen(v.index)
        mounted = None
        st["dead_mount"] = dead_mount(h)
    if mounted is not None:
        st["mount"] = mounted
    if as_json:
        print_json(st)
        return
    out.print(
        f"vault {st['fingerprint']}  {st['k']}-of-{st['n']}  snapshots: {st['snapshots']}  "
        f"manifest #{st['seq']}/{st['manifest_hash'] or '-'}",
        highlight=False,
    )
    if st["fork"]:  # what the last backup, flush or verify found on the remotes off this chain
        out.print(
            "[yellow]fork: the remotes hold manifests this home's chain did not write "
            f"(this home uses #{st['seq']}/{st['manifest_hash']}):[/]\n  "
            + "\n  ".join(st["fork"]),
            highlight=False,
        )
    if dead := st.get("dead_mount"):
        out.print(
            f"[red]the mount at {dead.get('mountpoint')} is gone: its daemon (pid {dead['pid']}) "
            f"died (killed or crashed), and with it the routine's timed snapshots; `vaultfs "
            f"mount {dead.get('mountpoint')}` cleans up the dead mount and recovers what the "
            f"cache held (`vaultfs umount {dead.get('mountpoint')}` only cleans it up; its "
            f"log: {h / 'mount.log'})[/]",
            highlight=False,
        )
    if mounted:
        cache = f"{mounted['cache_dirty_bytes']:,} of {mounted['cache_budget']:,} cache bytes dirty"
        if mounted.get("detached"):  # a lazy unmount: `vaultfs umount` has nothing to do
            out.print(f"[yellow]{escape(detached_mount(mounted))}[/]; {cache}", highlight=False)
        else:
            out.print(f"mounted at {mounted['mountpoint']}: {cache}")
        if held := mounted.get("memory_blocks"):
            out.print(
                f"[yellow]disk full: {held} dirty block(s) only in the mount daemon's memory (no "
                "room in the home's cache directory); free space on that disk: they are stored "
                "then, and `vaultfs umount` exits 15 until they are[/]",
                highlight=False,
            )
        if job := mounted.get("maintenance"):
            since = time.strftime("%H:%M:%S", time.localtime(job["started"]))
            out.print(f"maintenance: {job['job']} running in the mount daemon since {since}")
    t = Table(
        "remote", "domain", "health", "placed", "queued", "last audit",
        "last error",
    )  # fmt: skip
    for r in st["remotes"]:
        t.add_row(
            r["remote"],
            r["domain"],
            r.get("health", "unknown")
            + (f", {r['lost_objects']} lost" if r.get("lost_objects") else ""),
            f"{r['placed_objects']} ({r['placed_bytes']:,} B)",
            f"{r['queued_objects']} ({r['queued_bytes']:,} B)",
            last_audit_cell(r),
            r["last_error"] or "",
        )
    print_table(t)
    out.print(
        f"survives {st['survives_losses_now']} failure-domain loss(es) now "
        f"({st['survives_losses_design']} once the queue is empty and every remote is healthy; "
        f"{st['domains']} domain(s))"
    )
    promised = st.get("survives_losses_promised", 0)
    if st["segments"] and max(st["survives_losses_design"], st["survives_losses_now"]) < promised:
        out.print(
            f"[yellow]its {st['k']}-of-{st['n']} profile promises {promised} over these "
            "remotes, but shards sit on fewer of them (a `remote remove`): `vaultfs repair` "
            "spreads them[/]"
        )
    if st["segments_below_k_placed"]:
        out.print(
            f"[yellow]{st['segments_below_k_placed']} segment(s) not yet recoverable from "
            "remotes alone (queued locally): `vaultfs flush` sends them once the remotes are "
            "reachable[/]"
        )
    _print_routine(st["routine"])


def _print_routine(rt: dict) -> None:
    """The routine's part of `status`: the recovery point and each job's last and next run."""

    if rt["rpo_seconds"] is None:
        out.print("no snapshot is restorable from the reachable remotes alone")
    else:
        age = rt["rpo_seconds"]
        shown = f"{age / 3600:.1f} h" if age >= 3600 else f"{age / 60:.0f} min"
        point = rt["newest_restorable_snapshot"]
        if point == rt["newest_placed_snapshot"]:
            said = f"newest fully placed snapshot: {point}"
        else:  # a remote is behind: the others restore it
            said = f"newest snapshot the reachable remotes restore: {point} (not on every remote)"
        out.print(f"{said}, {shown} old (the recovery point)")
    now = time.time()
    for job, j in rt["jobs"].items():
        nxt = next_run_cell(j["every"], j["next_run"], now)
        line = f"  {job}: last success {local_time(j['last_success'])}, {nxt}"
        if j["last_error"]:
            line += f" (last error: {escape(j['last_error'])})"
        out.print(line, highlight=False)
    for why in rt.get("unreadable", []):
        err.print(f"[red]the routine makes no pass: {escape(why)}[/]", highlight=False)
    if failed := rt.get("last_pass_failed"):
        err.print(
            f"[red]the last pass failed at {local_time(failed['time'])}: "
            f"{escape(failed['error'])}[/]",
            highlight=False,
        )
    if hook := rt.get("last_alert_error"):
        err.print(
            f"[red]the alert command failed at {local_time(hook['time'])}: "
            f"{escape(hook['error'])}[/]",
            highlight=False,
        )
    for a in rt["alerts"]:
        err.print(f"[yellow]alert holds: {a}[/]", highlight=False)
