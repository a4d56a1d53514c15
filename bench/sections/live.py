"""Issue 15's live-mount benchmark: maintenance beside the foreground, 3-of-5 over five local
remotes (the same vault as the ``mount`` section).

1. ``pg_dump -Fp`` of the knowledge base into the idle mount, then again while the mount's
   daemon runs maintenance in a loop (``vaultfs verify --read-all``, then a ``vaultfs repair``
   of one remote whose objects were all deleted, again until the dump ends): wall-time ratio of
   the busy dump to the idle one, target ≤ 1.3 (maintenance within its share:
   docs/mount.md, "Maintenance while mounted"). The mount is flushed (not timed) between
   dumps.
2. Repair of one lost remote on the mounted vault (within the share maintenance gets):
   bytes the rebuilt remote holds per second, against a plain ``rclone copy`` of that
   directory, for information. The unmounted repair against ``rclone copy`` (target ≥ 0.5)
   is the ``audit`` section's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ..context import Context
from ..harness import MB, BenchError, Metric, SectionResult, median, run, section, tree_bytes
from ..pg import PgServer
from .mount import Mounted


class _Maintenance(threading.Thread):
    """Runs verify --read-all, then repair of remote ``lost`` (emptied first), until stopped;
    ``rounds`` counts the commands completed before the stop (while the dump ran), ``error``
    keeps the first failure."""

    def __init__(self, vault: Mounted, lost: int) -> None:
        super().__init__(name="bench-maintenance", daemon=True)
        self.vault = vault
        self.lost = lost
        self.stop = threading.Event()
        self.rounds = 0
        self.error: str | None = None

    def _cli(self, *args: str) -> None:
        res = subprocess.run(
            [*self.vault.ctx.vaultfs, *args], env=self.vault.env, capture_output=True, text=True
        )
        if res.returncode not in (0, 3):  # 3: rebuilt shards still queued for a remote
            self.error = self.error or f"vaultfs {' '.join(args)}: {res.stderr[-500:]}"
        if not self.stop.is_set():
            self.rounds += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self._cli("verify", "--read-all", "--json")
            if self.stop.is_set():
                break
            _lose(self.vault.remotes[self.lost])
            self._cli("repair", "--json")


def _lose(remote: Path) -> None:
    """Every object of the local remote ``remote`` lost, its directory kept: a remote whose
    directory is missing is a disk unplugged, which vaultfs waits for and never fills again
    on its own (docs/operations.md), not an empty one to repair."""
    for p in remote.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _repair_seconds(vault: Mounted, lost: int) -> tuple[float, int]:
    """Empty remote ``lost``, repair, and return (seconds, bytes it holds again)."""
    _lose(vault.remotes[lost])
    m = run([*vault.ctx.vaultfs, "repair", "--json"], env=vault.env)
    rep = json.loads(m.stdout)
    if rep["unrecoverable"] or not rep["rebuilt"]:
        raise BenchError(f"repair did not rebuild the remote: {m.stdout[-500:]}")
    return m.seconds, tree_bytes(vault.remotes[lost])


@section("live", "issue 15: pg_dump while verify+repair run in the mount; repair vs rclone copy")
def live(ctx: Context) -> SectionResult:
    ds = ctx.dataset()
    size = ds.base.stat().st_size
    res = SectionResult()
    root = ctx.scratch("live")
    times: dict[str, list[float]] = {}
    rounds: list[int] = []
    with PgServer() as pg:
        ctx.log(f"loading the {size / MB:.0f} MB dump into Postgres")
        pg.sql('CREATE DATABASE "kb"')
        psql = [str(pg.bin_dir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1"]
        run([*psql, "-d", pg.dsn("kb"), "-f", str(ds.base)])
        vault = Mounted(ctx, root / "vault")
        try:
            # something to audit and repair from the start: one dump, placed
            dump = [str(pg.bin_dir / "pg_dump"), "-Fp", "-d", pg.dsn("kb"), "-f"]
            run([*dump, str(vault.mnt / "seed.sql")])
            vault.flush()
            for i in range(ctx.repeats):
                for busy in (False, True) if i % 2 == 0 else (True, False):
                    out = vault.mnt / f"kb-{i}-{busy}.sql"
                    bg = _Maintenance(vault, lost=1) if busy else None
                    if bg is not None:
                        bg.start()
                        time.sleep(2)  # the audit is under way in the daemon
                    ctx.log(f"run {i + 1}/{ctx.repeats}: pg_dump into the mount, busy={busy}")
                    try:
                        times.setdefault(f"dump_{busy}", []).append(run([*dump, out]).seconds)
                    finally:
                        if bg is not None:
                            bg.stop.set()
                            bg.join()
                    if bg is not None:
                        if bg.error:
                            raise BenchError(f"maintenance failed: {bg.error}")
                        rounds.append(bg.rounds)
                    out.unlink()
                    vault.flush()
            for i in range(ctx.repeats):
                ctx.log(f"run {i + 1}/{ctx.repeats}: repair of one lost remote on the mount")
                sec, nbytes = _repair_seconds(vault, lost=2)
                times.setdefault("repair_mounted", []).append(sec)
                copy = root / f"copy-{i}"
                m = run(["rclone", "copy", str(vault.remotes[2]), str(copy)], env=ctx.env())
                times.setdefault("rclone_copy", []).append(m.seconds)
                shutil.rmtree(copy)
        finally:
            vault.umount()
    med = {k: median(v) for k, v in times.items()}

    def mbps(nbytes: int, seconds: float) -> str:
        return f"{nbytes / MB / seconds:.1f} MB/s ({seconds:.1f}s)"

    ratio = median([b / i for b, i in zip(times["dump_True"], times["dump_False"], strict=True)])
    repair_vs_copy = med["rclone_copy"] / med["repair_mounted"]  # same bytes: throughput ratio
    res.metrics += [
        Metric(
            "pg_dump into the mount while verify --read-all + repair run / idle mount",
            ratio,
            "x",
            ("<=", 1.3),
            mbps(size, med["dump_True"]),
            mbps(size, med["dump_False"]),
            f"maintenance commands completed during the busy dumps: {rounds}",
        ),
        Metric(
            "repair of one lost remote on the mount / rclone copy of its bytes (throughput)",
            repair_vs_copy,
            "x",
            None,
            mbps(nbytes, med["repair_mounted"]),
            mbps(nbytes, med["rclone_copy"]),
            "within the default share (maintenance_rate=64M, maintenance_ops=4); the "
            "unmounted figure (target >= 0.5) is the audit section's",
        ),
    ]
    res.details = {"dump_bytes": size, "seconds": times, "maintenance_rounds": rounds}
    return res
