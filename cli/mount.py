"""Commands for the mount: `vaultfs mount`, `umount`, `snapshot [--name]`, `snapshot delete`.

A running mount holds the vault's lock; these commands (and `flush`/`status` in core.py)
reach it through the control socket (cli/mounted.py). Exit codes: vaultfs/errors.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    JsonOpt,
    app,
    err,
    home_dir,
    open_vault,
    out,
    passphrase,
    report_flush,
)
from cli.mounted import call, mounted, print_report, sync_mount, syncfs
from vaultfs import control, names
from vaultfs.errors import InputError, VaultBusy
from vaultfs.index import snapshots as snapshot_rows
from vaultfs.scratch import alive

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' → bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"invalid size {text!r}: use bytes or a suffix like 256M or 2G")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


# -- mount / umount ---------------------------------------------------------------------------
@app.command()
def mount(
    mountpoint: Annotated[Path, typer.Argument(help="An empty directory.")],
    home: HomeOpt = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", "-f", help="Serve in this process until unmounted.")
    ] = False,
    cache_size: Annotated[
        str, typer.Option("--cache-size", help="Dirty-data budget of the local cache (e.g. 512M).")
    ] = "1G",
    read_cache_size: Annotated[
        str,
        typer.Option(
            "--read-cache-size",
            help="Budget of the local read cache of chunks read or written (e.g. 2G; 0: none).",
        ),
    ] = "1G",
    allow_other: Annotated[
        bool,
        typer.Option(
            "--allow-other",
            help="Let every user of the machine in, the kernel checking modes "
            "(non-root mounts need user_allow_other in /etc/fuse.conf).",
        ),
    ] = False,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Mount the vault's live tree at MOUNTPOINT (snapshots under .snapshots/)."""
    from vaultfs import daemon

    h = home_dir(home)
    size = parse_size(cache_size)
    read_size = parse_size(read_cache_size)
    from vaultfs.cache import MIN_BUDGET_BLOCKS
    from vaultfs.livetree import DEFAULT_BLOCK_SIZE

    floor = MIN_BUDGET_BLOCKS * DEFAULT_BLOCK_SIZE
    if size < floor:
        err.print(
            f"[yellow]warning:[/] --cache-size {cache_size} is below the least the cache "
            f"works with ({floor >> 20} MiB: {MIN_BUDGET_BLOCKS} blocks); using that",
            highlight=False,
        )
    mp = Path(os.path.abspath(mountpoint))
    from vaultfs.vault.home import held_by_mount

    if held := held_by_mount(h):  # said before asking for a passphrase it does not need
        raise VaultBusy(held)
    if foreground:
        level = os.environ.get("VAULTFS_LOG", "INFO").upper()
        logging.basicConfig(
            level=getattr(logging, level, logging.INFO),
            format="%(asctime)s %(name)s %(levelname)s: %(message)s",
            stream=sys.stderr,
        )
        code = daemon.run_foreground(h, mp, size, passphrase(), ready_fd, read_size, allow_other)
        raise typer.Exit(code)
    if not daemon.path_exists(mp):
        raise InputError(f"mountpoint {mp} does not exist: create an empty directory")
    pid = daemon.spawn(
        h, mp, size, passphrase(), read_cache_size=read_size, allow_other=allow_other
    )
    out.print(f"mounted vault {h} at {mp} (daemon pid {pid}; log {h / 'mount.log'})")


@app.command()
def umount(
    mountpoint: Annotated[Path, typer.Argument(help="Where the vault is mounted.")],
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for the daemon to exit after unmounting (0: do not wait)."
        ),
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Flush the kernel and the cache, wait until shards are placed, then unmount."""
    from vaultfs import daemon

    if not timeout >= 0:  # also NaN: refused before anything is flushed or unmounted
        raise InputError(f"--timeout takes 0 or more seconds, not {timeout:g}")
    mp = Path(os.path.abspath(mountpoint))
    addr = control.mount_address(mp)
    ping = call(addr, {"cmd": "ping"}, timeout=30)
    if ping is None:
        if daemon.is_dead_mount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            err.print(
                f"[yellow]{mp} was a dead mount (its daemon had died); cleaned it up. "
                "Run `vaultfs mount` to recover the cached data.[/]"
            )
            return
        raise InputError(f"{mp} is not a vaultfs mount")
    if ping.get("detached"):  # nothing to unmount, and its daemon needs no umount to finish
        from vaultfs.vault.home import detached_mount

        raise VaultBusy(
            f"{mp} is no longer mounted: {detached_mount(ping)}. Close those files: its daemon "
            "then finishes and exits by itself (`vaultfs status` shows it until then)"
        )
    syncfs(mp)
    reply = call(addr, {"cmd": "umount"})
    assert reply is not None
    code = print_report(reply["report"], as_json, {"mountpoint": str(mp)})
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise VaultBusy(
            f"cannot unmount {mp}: {res.stderr.strip() or 'busy'}. It stays mounted: its daemon "
            f"(pid {ping['pid']}) serves it and runs the routine (`vaultfs status`). Close the "
            "files and directories open there (`fuser -vm MOUNTPOINT` lists them) and retry"
        )
    pid = int(ping["pid"])
    if timeout > 0:
        _wait_for_exit(mp, pid, reply, timeout)
    elif alive(pid):  # --timeout 0: not waiting is no failure, the daemon exits by itself
        err.print(
            f"unmounted {mp}; its daemon (pid {pid}) closes the vault by itself (--timeout 0 "
            "does not wait): until it exits, `vaultfs mount` and the commands that take the "
            "vault's lock refuse (exit 17)",
            highlight=False,
        )
    if not as_json:
        out.print(f"unmounted {mp}")
    raise typer.Exit(code)


def _wait_for_exit(mp: Path, pid: int, reply: dict, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the daemon of the unmounted ``mp`` to exit, saying
    what it finishes once that takes a while; VaultBusy (17) if it still runs then: it
    holds the vault's lock until it exits."""
    started = time.monotonic()
    deadline = started + timeout
    look = started + UMOUNT_QUIET  # when to look at what the daemon finishes (None: said)
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        now = time.monotonic()
        if look is not None and now > look:
            job, what = _finishing(reply, pid)
            look = now + 1.0
            if job or now - started > UMOUNT_QUIET_UPLOADS:
                look = None
                err.print(
                    f"unmounted {mp}; waiting up to {timeout:.0f}s (--timeout) for its daemon "
                    f"(pid {pid}) to finish {what}",
                    highlight=False,
                )
        time.sleep(0.05)
    raise VaultBusy(
        f"unmounted {mp}, but its daemon (pid {pid}) is still finishing after "
        f"{timeout:.0f}s: {_finishing(reply, pid)[1]}. It exits by itself; until then "
        "the vault stays locked (`vaultfs mount` and other commands refuse with exit "
        "17): wait for it to exit, then mount again"
    )


#: seconds `umount` waits for the daemon to exit before it says which maintenance job the
#: daemon finishes, and (closing the vault takes a few seconds) before it says it waits for
#: the uploads under way
UMOUNT_QUIET = 1.0
UMOUNT_QUIET_UPLOADS = 10.0


def _finishing(reply: dict, pid: int) -> tuple[bool, str]:
    """(whether a maintenance job runs, what an unmounted daemon finishes before it exits):
    what its HOME/mount.json says (vaultfs/daemon.py), else the job its umount reply named,
    else the uploads."""
    job = reply.get("maintenance")
    home = reply.get("home")
    if home:
        try:
            state = json.loads((Path(home) / "mount.json").read_text())
            if state.get("pid") == pid and isinstance(state.get("finishing"), dict):
                job = state["finishing"].get("job")
        except (OSError, ValueError):
            pass
    uploads = "the uploads under way (placing what is queued, retrying remotes that fail)"
    if not isinstance(job, dict) or not job.get("job"):
        return False, uploads
    try:
        since = time.strftime("%H:%M:%S", time.localtime(float(job.get("started") or 0)))
    except (TypeError, ValueError, OverflowError, OSError):
        return True, f"its {job['job']}, then {uploads}"
    return True, f"its {job['job']} (running since {since}), then {uploads}"


# -- snapshots --------------------------------------------------------------------------------
snap_app = typer.Typer(
    help="Take a snapshot of the mounted live tree, or delete one.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(snap_app, name="snapshot")


@snap_app.callback()
def snapshot(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="A label (also the .snapshots/ name).")] = None,
    fork: Annotated[
        bool,
        typer.Option(
            "--fork",
            help="If the remotes hold manifests this home never wrote (exit 21), record an "
            "explicit fork instead of refusing.",
        ),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot the live tree of the running mount (flushing the kernel first)."""
    if ctx.invoked_subcommand is not None:
        return
    if name is not None:
        names.check_snapshot_name(name)
    h = home_dir(home)
    info = mounted(h)
    if info is None:  # not mounted: record the live tree as the index holds it
        from vaultfs import daemon

        reply = daemon.offline_snapshot(h, passphrase(), name, fork)
    else:
        sync_mount(info)
        reply = call(control.home_address(h), {"cmd": "snapshot", "name": name, "fork": fork})
        assert reply is not None
    extra = {"snapshot": reply["snapshot"], "entries": reply["entries"], "seq": reply["seq"]}
    if not reply["entries"]:  # the live tree is not what `backup PATH` stored
        err.print(
            "[yellow]warning:[/] the live tree is empty, so this snapshot is too: `vaultfs "
            "snapshot` records what was written through the mount, while each `vaultfs backup "
            "PATH` is a snapshot of its own already (`vaultfs snapshots`); delete this one with "
            f"`vaultfs snapshot delete {reply['snapshot']}`",
            highlight=False,
        )
    code = print_report(reply["report"], as_json, extra)
    if not as_json:
        out.print(
            f"snapshot {reply['snapshot']}: {reply['entries']} entries, manifest "
            f"#{reply['seq']}/{reply['report']['manifest_hash']}",
            highlight=False,
        )
    raise typer.Exit(code)


@snap_app.command("delete")
def snapshot_delete(
    ref: Annotated[
        str, typer.Argument(metavar="SNAPSHOT", help="Snapshot id or name (see `snapshots`).")
    ],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a snapshot (data other snapshots or the live tree use stays; `vaultfs prune`
    frees the rest). A name shared by several snapshots is refused (exit 18, their ids
    listed): give the id."""
    h = home_dir(home)
    reply = call(control.home_address(h), {"cmd": "delete", "id": ref})
    if reply is not None:
        uid = reply.get("snapshot", ref)  # a daemon of an older vaultfs does not say
        code = print_report(reply["report"], as_json, {"deleted": uid})
    else:
        with open_vault(home) as v:
            uid = snapshot_rows.require(v.index, ref, unique=True)[1]
            v.delete_snapshot(uid)
            code = report_flush(v, as_json, {"deleted": uid})
    if not as_json:
        named = f" ({ref})" if ref != uid else ""
        out.print(
            f"deleted snapshot {uid}{named}; `vaultfs prune` frees its space", highlight=False
        )
    raise typer.Exit(code)
