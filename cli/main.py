"""The `vaultfs` command line (typer + rich). Exit codes: see vaultfs/errors.py."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # `python -m cli.main`: start unlocking before the heavy imports
    from cli import early

    early.start(sys.argv)

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from vaultfs import erasure, names
from vaultfs.backup import backup_paths, backup_stream
from vaultfs.errors import EXIT_PARTIAL, InputError, NoVault, VaultError
from vaultfs.keys import VaultKeys, parse_seed, read_keyfile
from vaultfs.remotes import Remote
from vaultfs.restore import ShardSource, open_remote_index, restore_files, staging_dir
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


def _home(home: Path | None) -> Path:
    return (home or default_home()).expanduser()


def _passphrase(confirm: bool = False) -> str:
    pw = os.environ.get("VAULTFS_PASSPHRASE")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise InputError("no passphrase: set VAULTFS_PASSPHRASE or run in a terminal")
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


def _open(home: Path | None, lock: bool = True) -> Vault:
    return Vault.open(_home(home), _passphrase(), lock=lock)


@contextlib.contextmanager
def _progress(label: str, total: int | None = None) -> Iterator:
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


def _advance(prog) -> object:
    if prog is None:
        return None
    p, task = prog
    return lambda n: p.advance(task, n)


def _report_flush(v: Vault, as_json: bool, extra: dict | None = None) -> int:
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
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a vault over one or more remotes."""
    if profile and (k or n):
        raise InputError("give either --profile or -k/-n, not both")
    if k or n:
        if not (k and n):
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
    h = _home(home)
    pw = _passphrase(confirm=True)
    v = Vault.create(h, remote, k, n, pw, segment_size=segment_mib * 1024 * 1024)
    try:
        st = v.status()
    finally:
        v.close()
    if as_json:
        out.print_json(json.dumps({"home": str(h), **st}))
        return
    out.print(f"Created vault {st['fingerprint']} at {h}")
    out.print(
        f"  {k}-of-{n} over {len(remote)} remote(s); survives {st['survives_losses_design']} remote loss(es)"
    )
    if st["survives_losses_design"] == 0:
        err.print("[yellow]warning: with this many remotes, losing any one loses data[/]")
    out.print(
        f"  Keep a copy of {h / 'key.json'} and your passphrase somewhere else: with any "
        f"{k} remotes they restore everything."
    )


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
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Back up files/directories (or stdin) as a new snapshot, then upload."""
    if stdin == bool(paths):
        raise InputError("give PATH… or --stdin (with --stdin-filename), not both or neither")
    if stdin and not stdin_filename:
        raise InputError("--stdin needs --stdin-filename NAME")
    v = _open(home)
    t0 = time.perf_counter()
    try:
        with _progress("backup") as prog:
            if stdin:
                uid, count, size = backup_stream(
                    v, sys.stdin.buffer, stdin_filename or "", name, _advance(prog),
                    upload=not no_upload,
                )  # fmt: skip
            else:
                uid, count, size = backup_paths(
                    v, list(paths or []), name, _advance(prog), upload=not no_upload
                )
        info = {"snapshot": uid, "entries": count, "bytes": size}
        if no_upload:
            code = 0
            if as_json:
                out.print_json(json.dumps({**info, "uploaded": 0, "complete": False}))
        else:
            code = _report_flush(v, as_json, info)
    finally:
        v.close()
    if not as_json:
        dt = time.perf_counter() - t0
        out.print(f"snapshot {uid}: {count} entries, {size:,} bytes in {dt:.1f}s")
    raise typer.Exit(code)


@app.command()
def flush(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Upload every queued shard and manifest; wait until done or report who is behind."""
    from cli.mount import flush_via_mount  # a mounted vault is flushed by its daemon

    if (code := flush_via_mount(home, as_json)) is not None:
        raise typer.Exit(code)
    v = _open(home)
    try:
        code = _report_flush(v, as_json)
    finally:
        v.close()
    raise typer.Exit(code)


# -- listing -----------------------------------------------------------------------------------
@app.command()
def snapshots(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List snapshots."""
    v = _open(home, lock=False)
    try:
        rows = v.index.q("SELECT uid, name, created, files, bytes, seq FROM snapshots ORDER BY id")
    finally:
        v.close()
    items = [
        {"id": u, "name": nm, "time": c, "entries": f, "bytes": b, "seq": s}
        for u, nm, c, f, b, s in rows
    ]
    if as_json:
        out.print_json(json.dumps(items))
        return
    t = Table("id", "time", "name", "entries", "bytes")
    for it in items:
        t.add_row(
            it["id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(it["time"])),
            it["name"] or "",
            str(it["entries"]),
            f"{it['bytes']:,}",
        )
    out.print(t)


@app.command()
def ls(
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, name or 'latest'.")],
    path: Annotated[str | None, typer.Argument(help="Only entries under this path.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the entries of a snapshot. Names that are not UTF-8, and control characters,
    are shown escaped (\\xNN, \\n, \\\\); --json gives them exactly (path_hex)."""
    v = _open(home, lock=False)
    try:
        if snapshot == "latest":
            row = v.index.one("SELECT id FROM snapshots ORDER BY id DESC LIMIT 1")
        else:
            row = v.index.one(
                "SELECT id FROM snapshots WHERE uid=? OR name=? ORDER BY id DESC LIMIT 1",
                (snapshot, snapshot),
            )
        if row is None:
            raise InputError(f"snapshot {snapshot!r} not found")
        rows = v.index.q(
            "SELECT path, type, mode, size, mtime_ns, target, rdev FROM entries WHERE snapshot=?",
            (row[0],),
        )
    finally:
        v.close()
    rows.sort(key=lambda r: names.from_db(r[0]))  # byte order, whatever the stored form
    if path:
        p = names.raw(path.strip("/"))
        rows = [r for r in rows if (b := names.from_db(r[0])) == p or b.startswith(p + b"/")]
    if as_json:
        items = []
        for pth, typ, mode, size, mt, target, rdev in rows:
            item = {**names.json_fields("path", pth), "type": typ, "mode": mode, "size": size}
            item |= {"mtime_ns": mt, **names.json_fields("target", target)}
            if typ in ("c", "b"):
                item["rdev"] = rdev
            items.append(item)
        out.print_json(json.dumps(items), ensure_ascii=True)  # lone surrogates as \udcXX
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
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show remotes, queue, redundancy and how many remote losses the vault survives."""
    v = _open(home, lock=False)
    try:
        st = v.status()
    finally:
        v.close()
    from cli.mount import mount_status  # the running mount's cache and upload state

    if (mounted := mount_status(home)) is not None:
        st["mount"] = mounted
    if as_json:
        out.print_json(json.dumps(st))
        return
    out.print(f"vault {st['fingerprint']}  {st['k']}-of-{st['n']}  snapshots: {st['snapshots']}")
    if mounted:
        out.print(
            f"mounted at {mounted['mountpoint']}: {mounted['cache_dirty_bytes']:,} of "
            f"{mounted['cache_budget']:,} cache bytes dirty"
        )
    t = Table(
        Column("remote", overflow="fold"), "domain", "health", "placed", "queued", "last audit",
        "last error",
    )  # fmt: skip
    for r in st["remotes"]:
        audited = "never"
        if r.get("last_audit"):
            audited = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_audit"]))
            if r.get("last_audit_confidence") is not None:
                audited += f" ({r['last_audit_confidence'] * 100:.1f}%)"
        t.add_row(
            r["remote"],
            r["domain"],
            r.get("health", "unknown")
            + (f", {r['lost_objects']} lost" if r.get("lost_objects") else ""),
            f"{r['placed_objects']} ({r['placed_bytes']:,} B)",
            f"{r['queued_objects']} ({r['queued_bytes']:,} B)",
            audited,
            r["last_error"] or "",
        )
    out.print(t)
    out.print(
        f"survives {st['survives_losses_now']} failure-domain loss(es) now "
        f"({st['survives_losses_design']} once the queue is empty and every remote is healthy; "
        f"{st['domains']} domain(s))"
    )
    if st["segments_below_k_placed"]:
        out.print(
            f"[yellow]{st['segments_below_k_placed']} segment(s) not yet recoverable from "
            "remotes alone (queued locally)[/]"
        )


# -- restore -----------------------------------------------------------------------------------
def _keys_for_restore(home: Path, keyfile: Path | None, seed_file: Path | None) -> VaultKeys:
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
    return read_keyfile(kf, _passphrase())


@app.command()
def restore(
    to: Annotated[Path, typer.Option("--to", help="Target directory (created if missing).")],
    from_: Annotated[
        list[str] | None,
        typer.Option("--from", help="Remote to read from (repeat; any k suffice)."),
    ] = None,
    snapshot: Annotated[str, typer.Option(help="Snapshot id, name or 'latest'.")] = "latest",
    include: Annotated[
        list[str] | None, typer.Option(help="Only restore this path (repeat).")
    ] = None,
    keyfile: Annotated[Path | None, typer.Option(help="Keyfile (asks for its passphrase).")] = None,
    seed_file: Annotated[
        Path | None, typer.Option(help="File holding the master seed in hex.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Restore into a non-empty directory.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a snapshot; with --from it needs no local state, only the key."""
    h = _home(home)
    t0 = time.perf_counter()
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="vaultfs-"))
        early = None
        if from_:  # list the remotes and fetch their manifests while scrypt unlocks the key
            early = ShardSource([Remote(s) for s in from_])
            ahead = None
            if not include:  # a whole snapshot: download ahead meanwhile (bounded)
                ahead = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="vaultfs-ahead-", dir=staging_dir())))  # fmt: skip
            early.start(Path(work) / "manifests", read_ahead=ahead)
            stack.callback(early.stop)  # its rclone calls end before the directories go
        keys = _keys_for_restore(h, keyfile, seed_file)
        if from_:
            min_seq = 0
            if (h / "index.db").exists():
                with contextlib.closing(sqlite3.connect(h / "index.db")) as local:
                    if local.execute(
                        "SELECT value FROM settings WHERE key='vault_id'"
                    ).fetchone() == (keys.vault_id.hex(),):
                        min_seq = local.execute(
                            "SELECT coalesce(max(seq),0) FROM manifests"
                        ).fetchone()[0]
            assert early is not None
            db, src, m, warnings = open_remote_index(
                keys, early.remotes, Path(work), min_seq, src=early
            )
            seq = m.seq
        else:
            v = Vault.open(h, keys=keys, lock=False)
            db = v.index.db
            src = ShardSource(v.remotes(), v.queue_dir)
            src.list_all()
            seq = v.index.one("SELECT coalesce(max(seq),0) FROM manifests")[0]
        try:
            with _progress("restore") as prog:
                total_cb = None
                if prog:
                    p, task = prog
                    total_cb = lambda t: p.update(task, total=t)  # noqa: E731
                uid, files, size, w2 = restore_files(
                    keys, db, src, to, snapshot, include, force, _advance(prog), total_cb
                )
        finally:
            db.close()
    warnings += w2
    dt = time.perf_counter() - t0
    reports = [
        {
            "remote": r.label,
            "reachable": r.reachable,
            "error": r.error,
            "newest_manifest": r.best_seq,
        }
        for r in src.reports.values()
    ]
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "snapshot": uid,
                    "entries": files,
                    "bytes": size,
                    "seq": seq,
                    "seconds": dt,
                    "remotes": reports,
                    "warnings": warnings,
                }
            )
        )
        return
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    for r in reports:
        if not r["reachable"]:
            err.print(f"[yellow]warning:[/] {r['remote']} unreachable: {r['error']}")
    out.print(f"restored snapshot {uid}: {files} entries, {size:,} bytes to {to} in {dt:.1f}s")


import cli.audit  # noqa: E402,F401
import cli.keys  # noqa: E402,F401  (registers the `keys`, `reencrypt`, `receipt` commands)
import cli.mount  # noqa: E402,F401
from cli.kb_cmd import kb_app  # noqa: E402

app.add_typer(kb_app, name="kb")


def main() -> None:
    """Console entry point: known errors become one sentence and a documented exit code."""
    import errno

    code: int | str | None = 0
    try:
        app()  # standalone: typer exits itself on success, usage errors and Ctrl-C
    except SystemExit as e:
        code = e.code
    except VaultError as e:
        err.print(f"[red]error:[/] {e.message}", highlight=False)
        code = e.exit_code
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err.print(f"[red]error:[/] disk full: {e}; free space and retry", highlight=False)
        code = 15
    _exit(code)


def _exit(code: int | str | None) -> None:
    """End the process without the interpreter's teardown (tens of milliseconds of module
    and object finalisation for nothing): every command has closed what it opened by now,
    so flush the standard streams and the log, stop the rclone daemon, and leave."""
    import logging

    from vaultfs.remotes import RcloneDaemon

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
        pass
    logging.shutdown()
    RcloneDaemon.shutdown()
    os._exit(code or 0)


if __name__ == "__main__":
    # run the imported module's app: command modules (cli/mount.py, ...) register on cli.main
    from cli.main import main as _main

    _main()
