"""`vaultfs restore`: from the local vault, or with --from from any k remotes and the key
alone (the disaster path: no local state needed).

Exit codes: vaultfs/errors.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    JsonOpt,
    advance,
    app,
    err,
    home_dir,
    open_vault,
    out,
    passphrase,
    progress,
)
from vaultfs.errors import InputError, NoVault
from vaultfs.index import manifests
from vaultfs.keys import VaultKeys, parse_seed, read_keyfile
from vaultfs.remotes import Remote
from vaultfs.restore import ShardSource, open_remote_index, restore_files, staging_dir


def _keys_for_restore(home: Path, keyfile: Path | None, seed_file: Path | None) -> VaultKeys:
    """The key from --seed-file, $VAULTFS_SEED, or a keyfile (--keyfile, else HOME/key.json)."""
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
    return read_keyfile(kf, passphrase())


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
    h = home_dir(home)
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
            assert early is not None
            db, src, m, warnings = open_remote_index(
                keys, early.remotes, Path(work), src=early, home=h
            )  # the local index, if any, is the rollback floor
            stack.callback(db.close)
            seq = m.seq
        else:
            v = stack.enter_context(open_vault(h, lock=False, keys=keys))
            db = v.index.db
            src = ShardSource(v.remotes(), v.queue_dir)
            src.list_all()
            seq = manifests.newest_seq(v.index)
        with progress("restore", quiet=as_json) as prog:
            total_cb = None
            if prog:
                p, task = prog
                total_cb = lambda t: p.update(task, total=t)  # noqa: E731
            uid, files, size, w2 = restore_files(
                keys, db, src, to, snapshot, include, force, advance(prog), total_cb
            )
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
