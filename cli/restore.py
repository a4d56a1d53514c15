"""`vaultfs restore`: from the local vault, or with --from from any k remotes and the key
alone (the disaster path: no local state needed).

Exit codes: vaultfs/errors.py.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    MinSeqOpt,
    ReceiptOpt,
    SeedOpt,
    advance,
    app,
    err,
    home_dir,
    keys_for_restore,
    open_vault,
    out,
    print_json,
    progress,
    rollback_floor,
)
from cli.early import secret
from vaultfs.backends import open_backend
from vaultfs.errors import InputError
from vaultfs.index import manifests
from vaultfs.index import snapshots as snapshot_rows
from vaultfs.manifest import Link
from vaultfs.remotes import check_distinct, is_local
from vaultfs.restore import (
    Branches,
    ShardSource,
    check_late,
    open_remote_index,
    restore_files,
    staging_tempdir,
    too_few_remotes,
)
from vaultfs.scratch import owned_scratch


def check_mounted_key(home: Path, snapshot: str, include: list[str] | None) -> None:
    """On a mounted vault, before the key is asked for: restore reads the vault itself with
    the key unlocked here (its mount daemon does not restore for it: a restore must stop
    at Ctrl-C and write as the user who runs it, docs/mount.md), so without a passphrase
    (or seed) and no terminal to ask on, fail now naming the mount's read-only copy of
    every snapshot; on a terminal, name it before the prompt."""
    from cli.mounted import call
    from vaultfs import control
    from vaultfs.snapview import dir_names

    if secret("VAULTFS_PASSPHRASE") is not None or secret("VAULTFS_SEED") is not None:
        return
    if (info := control.mounted(home)) is None:
        return
    reply = call(control.home_address(home), {"cmd": "snapshots"}, timeout=60)
    items = [] if reply is None else reply["snapshots"]  # oldest first
    # the snapshot `snapshot` names, as snapshots.find picks it: latest, an id, a name's newest
    picked = items[-1:] if snapshot == "latest" else [s for s in items if s["id"] == snapshot]
    picked = picked or [s for s in items if s["name"] == snapshot][-1:]
    where = f"{info['mountpoint']}/.snapshots"
    if picked:
        name = dir_names([(s["id"], s["name"]) for s in items])[picked[0]["id"]]
        inside = include[0].strip("/") if include else "."
        hint = f"copy it from there, e.g. `cp -a {where}/{name}/{inside} DEST`"
    else:
        hint = f"`ls {where}` lists them"
    hint = (
        f"the vault is mounted: its snapshots are readable under {where}/ without the "
        f"passphrase; {hint}"
    )
    if not sys.stdin.isatty():
        raise InputError(
            f"no passphrase: restore reads the vault itself and needs it (set VAULTFS_PASSPHRASE "
            f"or run in a terminal); {hint}"
        )
    err.print(f"[yellow]note:[/] {hint}; or give the passphrase to restore here", highlight=False)


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
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    force: Annotated[bool, typer.Option(help="Restore into a non-empty directory.")] = False,
    manifest: Annotated[
        str | None,
        typer.Option(
            "--manifest",
            help="With --from: restore from this manifest (SEQ, SEQ/HASH-PREFIX or its object "
            "name), e.g. one branch of a fork; default the newest.",
        ),
    ] = None,
    min_seq: MinSeqOpt = 0,
    receipt: ReceiptOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a snapshot; with --from it needs no local state, only the key. A mounted
    vault's snapshots are also readable under MOUNTPOINT/.snapshots/ without the passphrase."""
    if not from_ and (manifest or min_seq or receipt):
        raise InputError(
            "--manifest, --min-seq and --receipt choose among the remotes' manifests: give --from"
        )
    check_distinct(from_ or [], read_with="--from")  # one remote given twice counts once
    h = home_dir(home)
    what = f"{', '.join(include)} of snapshot {snapshot}" if include else f"snapshot {snapshot}"
    branches = Branches()
    t0 = time.perf_counter()
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(owned_scratch("vaultfs-work-"))
        early = None
        if from_:  # list the remotes and fetch their manifests while scrypt unlocks the key
            for spec in from_:  # a mistyped path is named, not only counted as missing
                p = Path(spec).expanduser()
                if is_local(spec) and not p.is_dir():
                    why = "is not a directory" if p.exists() else "does not exist"
                    err.print(f"[yellow]warning:[/] --from {spec} {why}", highlight=False)
            early = ShardSource([open_backend(s) for s in from_])
            ahead = None
            if not include:  # a whole snapshot: download ahead meanwhile (bounded)
                ahead = staging_tempdir("vaultfs-ahead-")
                stack.callback(shutil.rmtree, ahead, ignore_errors=True)
            early.start(read_ahead=ahead)
            stack.callback(early.stop)  # its rclone calls end before the directories go
            stack.enter_context(too_few_remotes(early, f"restore {what}", " (or give more --from)"))
        if not from_ and seed_file is None:
            check_mounted_key(h, snapshot, include)
        keys = keys_for_restore(h, keyfile, seed_file)
        if from_:
            assert early is not None
            min_seq, anchor = rollback_floor(min_seq, receipt, keys)
            index, src, m, warnings = open_remote_index(
                keys,
                early.remotes,
                Path(work),
                min_seq,
                src=early,
                home=h,
                want=manifest,
                anchor=anchor,
                branches=branches,
                # one path, or one older snapshot: read only the index blocks on the way
                # (a whole newest snapshot streams the index: as fast, and sequential)
                lazy=bool(include) or snapshot != "latest",
                late_ok=manifest is None,  # a slow remote is checked at the end (check_late)
            )  # fmt: skip  (the local index, if any, is a rollback floor too)
            stack.callback(index.close)
            link: Link | None = m.link
        else:
            v = stack.enter_context(open_vault(h, lock=False, keys=keys))
            index = v.index
            src = ShardSource(v.remotes(), v.queue_dir)
            stack.enter_context(too_few_remotes(src, f"restore {what}"))
            src.list_all()
            newest = manifests.newest_link(v.index)
            link = None if newest is None else Link(*newest)
        with progress("restore", quiet=as_json) as prog:
            total_cb = None
            if prog:
                p, task = prog
                total_cb = lambda t: p.update(task, total=t)  # noqa: E731
            uid, files, size, w2 = restore_files(
                keys, index, src, to, snapshot, include, force, advance(prog), total_cb,
                each_include=True,
            )  # fmt: skip
        if from_:  # before success: the remotes left behind hold no newer manifest
            w2 += check_late(keys, src, branches, index, warnings)
        held = [  # what the manifest restored from holds, to choose another --snapshot
            {"id": u, "name": nm, "seq": sq} for u, nm, _c, _f, _b, sq in snapshot_rows.rows(index)
        ]
    warnings += w2
    dt = time.perf_counter() - t0
    read = src.count_reads()
    reports = [
        {
            "remote": r.label,
            "reachable": r.reachable,
            "error": r.error,
            "newest_manifest": r.best_seq,
            "rejected": r.rejected,
            "bytes_read": r.bytes_read,
        }
        for r in src.reports.values()
    ]
    if as_json:
        print_json(
            {
                "snapshot": uid,
                "entries": files,
                "bytes": size,
                **(link.as_json() if link else {"seq": 0, "manifest_hash": None}),
                "fork": branches.to_dict()["fork"] if branches.used else [],
                "snapshots": held,
                "seconds": dt,
                "bytes_read": read,
                "remotes": reports,
                "warnings": warnings,
            }
        )
        return
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    for r in reports:
        if not r["reachable"]:
            err.print(f"[yellow]warning:[/] {r['remote']} unreachable: {r['error']}")
        if r["rejected"]:  # a remote serving or listing wrong objects: named, decoded around
            shown = "; ".join(r["rejected"][:3])
            more = len(r["rejected"]) - 3
            err.print(
                f"[yellow]warning:[/] {r['remote']}: {len(r['rejected'])} object(s) refused"
                f" and decoded around: {shown}" + (f" and {more} more" if more > 0 else ""),
                highlight=False,
            )
    out.print(
        f"restored snapshot {uid}: {files} entries, {size:,} bytes to {to} in {dt:.1f}s, "
        f"from manifest {link.short if link else '#0'}; read {read:,} bytes from the remotes",
        highlight=False,
    )
