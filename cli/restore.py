"""`vaultfs restore`: from the local vault, or with --from from any k remotes and the key
alone (the disaster path: no local state needed).

Exit codes: vaultfs/errors.py.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    SeedOpt,
    advance,
    app,
    err,
    home_dir,
    keys_for_restore,
    open_vault,
    out,
    progress,
)
from vaultfs.backends import open_backend
from vaultfs.index import manifests
from vaultfs.restore import ShardSource, open_remote_index, restore_files, staging_dir


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
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a snapshot; with --from it needs no local state, only the key."""
    h = home_dir(home)
    t0 = time.perf_counter()
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="vaultfs-"))
        early = None
        if from_:  # list the remotes and fetch their manifests while scrypt unlocks the key
            early = ShardSource([open_backend(s) for s in from_])
            ahead = None
            if not include:  # a whole snapshot: download ahead meanwhile (bounded)
                ahead = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="vaultfs-ahead-", dir=staging_dir())))  # fmt: skip
            early.start(read_ahead=ahead)
            stack.callback(early.stop)  # its rclone calls end before the directories go
        keys = keys_for_restore(h, keyfile, seed_file)
        if from_:
            assert early is not None
            index, src, m, warnings = open_remote_index(
                keys, early.remotes, Path(work), src=early, home=h
            )  # the local index, if any, is the rollback floor
            stack.callback(index.close)
            seq = m.seq
        else:
            v = stack.enter_context(open_vault(h, lock=False, keys=keys))
            index = v.index
            src = ShardSource(v.remotes(), v.queue_dir)
            src.list_all()
            seq = manifests.newest_seq(v.index)
        with progress("restore", quiet=as_json) as prog:
            total_cb = None
            if prog:
                p, task = prog
                total_cb = lambda t: p.update(task, total=t)  # noqa: E731
            uid, files, size, w2 = restore_files(
                keys, index, src, to, snapshot, include, force, advance(prog), total_cb
            )
    warnings += w2
    dt = time.perf_counter() - t0
    reports = [
        {
            "remote": r.label,
            "reachable": r.reachable,
            "error": r.error,
            "newest_manifest": r.best_seq,
            "rejected": r.rejected,
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
        if r["rejected"]:  # a remote serving or listing wrong objects: named, decoded around
            shown = "; ".join(r["rejected"][:3])
            more = len(r["rejected"]) - 3
            err.print(
                f"[yellow]warning:[/] {r['remote']}: {len(r['rejected'])} object(s) refused"
                f" and decoded around: {shown}" + (f" and {more} more" if more > 0 else ""),
                highlight=False,
            )
    out.print(f"restored snapshot {uid}: {files} entries, {size:,} bytes to {to} in {dt:.1f}s")
