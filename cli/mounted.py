"""Reaching a running mount through its control socket (vaultfs/control.py): the hooks that
`flush`, `umount` and `snapshot` use, the report a mount's flush returns, and
:func:`run_in_mount`, through which `verify`, `repair`, `prune`, `forget`, `remote
add|remove|replace`, `keys rotate` and `reencrypt` run in the daemon (vaultfs/maintenance.py).

A running mount holds the vault's lock, so commands that would open the vault ask its daemon
instead. No commands are defined here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

from cli.common import err, home_dir, out, print_json, progress, warn_remote_errors
from vaultfs import control
from vaultfs.control import mounted
from vaultfs.errors import EXIT_PARTIAL, StaleBase


def syncfs(path: Path) -> None:
    """Flush the kernel's dirty pages of the file system at ``path`` (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(fd)


def call(
    address: str, req: dict, timeout: float | None = None, progress=None, parts=None
) -> dict | None:
    """A control request; ``timeout`` None for work that takes as long as it takes;
    ``progress(done, total)`` for a job's progress lines, ``parts(part)`` for the parts of a
    reply sent in parts (:func:`control.call`)."""
    return control.call(address, req, timeout=timeout, progress=progress, parts=parts)


def print_report(
    rep: dict, as_json: bool, extra: dict | None = None, every_remote: bool = False
) -> int:
    """Report a flush the mount's daemon did (its reply's ``report``: JSON with ``extra``
    merged in, or warnings and the redundancy line); return StaleBase's code when the remotes
    moved on without this home, EXIT_PARTIAL when a segment has fewer than k shards placed
    (with ``every_remote``, as :func:`cli.common.report_flush`: when anything is still queued
    for any remote), else 0."""
    behind = not rep["complete"] and every_remote
    code = EXIT_PARTIAL if rep["segments_below_k_placed"] or behind else 0
    if rep.get("stale_base"):
        code = StaleBase.exit_code
    if as_json:
        print_json({**(extra or {}), **rep})
        return code
    warn_remote_errors(rep["errors"])
    if rep.get("stale_base"):
        err.print(f"[red]error:[/] {rep['stale_base']}", highlight=False)
    if rep["segments_below_k_placed"]:
        err.print(
            f"[yellow]{rep['segments_below_k_placed']} segment(s) have fewer than k shards on "
            "remotes: the data is safe in the local queue and goes out once remotes are back "
            "(`vaultfs flush`, or the next `vaultfs run`)[/]"
        )
    elif not rep["complete"]:
        behind = ", ".join(f"{r} ({c} queued)" for r, c in rep["pending"].items() if c)
        err.print(f"[yellow]some remotes are behind: {behind or 'manifests pending'}[/]")
    out.print(
        f"redundancy: survives {rep['survives_losses_now']} remote loss(es) now "
        f"({rep['survives_losses_design']} once every shard is placed)"
    )
    return code


def sync_mount(info: dict) -> None:
    """Flush the kernel's dirty pages of the mount ``info`` names (its daemon's ping reply);
    nothing once it is detached: its mountpoint is another file system's directory then."""
    if not info.get("detached"):
        syncfs(Path(info["mountpoint"]))


def flush_via_mount(home: Path | None, as_json: bool) -> int | None:
    """If the vault is mounted, flush through the daemon and return the exit code. A mount
    detached by a lazy unmount is flushed too (only what is written goes out, nothing new is
    made: vaultfs/daemon.py NEW_WORK), and the command says it is detached (``detached`` in
    --json)."""
    h = home_dir(home)
    if (info := mounted(h)) is None:
        return None
    sync_mount(info)
    reply = call(control.home_address(h), {"cmd": "flush"})
    assert reply is not None
    detached = {"detached": True} if info.get("detached") else None
    code = print_report(reply["report"], as_json, detached, every_remote=True)
    if detached and not as_json:
        from vaultfs.vault.home import detached_mount

        err.print(
            f"[yellow]note:[/] {detached_mount(info)}. This flush stored and uploaded what was "
            "written so far; the daemon stores the rest once those files are closed",
            highlight=False,
        )
    return code


def run_in_mount(
    home: Path | None, job: str, args: dict, bar: str | None = None, quiet: bool = False
) -> dict | None:
    """If the vault at ``home`` is mounted, run maintenance ``job`` with ``args`` in its daemon
    and return the report (the command's ``--json`` form); None when it is not mounted. The
    daemon's errors come back with their exit codes (VaultBusy while another job runs, or
    once the mount is ending: detached by a lazy unmount).
    ``bar``: the label of a progress bar (bytes, rate, time left) the daemon's progress
    lines move on a terminal, unless ``quiet`` (--json)."""
    h = home_dir(home)
    if mounted(h) is None:
        return None
    if sys.stderr.isatty():
        err.print(f"the vault is mounted: {job} runs in the mount daemon", highlight=False)
    try:
        req = {"cmd": "job", "job": job, "args": args}
        with progress(bar or job, quiet=quiet or bar is None) as prog:
            if prog is None:
                reply = call(control.home_address(h), req)
            else:
                p, task = prog
                reply = call(
                    control.home_address(h), req,
                    progress=lambda done, total: p.update(task, completed=done, total=total),
                )  # fmt: skip
    except KeyboardInterrupt:
        err.print(
            f"interrupted: the {job} goes on in the mount daemon (`vaultfs status` shows it; "
            "other maintenance waits for it)",
            highlight=False,
        )
        raise
    if reply is None:  # unmounted between the two calls: let the caller open the vault
        return None
    return reply["result"]


T = TypeVar("T")


def report_from(cls: type[T], data: dict[str, Any], nested: dict[str, type] | None = None) -> T:
    """The dataclass ``cls`` back from its JSON form (fields the form adds, such as
    computed properties, are dropped); ``nested`` names list fields of dataclasses."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kw = {k: v for k, v in data.items() if k in names}
    for key, sub in (nested or {}).items():
        kw[key] = [report_from(sub, item) for item in kw.get(key, [])]
    return cls(**kw)
