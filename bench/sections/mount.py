"""Issue 3's mount benchmark: the mount against local disk and against a null FUSE file system,
measured in the same run (3-of-5 over five local-directory remotes, default 1 GiB cache).

1. ``pg_dump -Fp`` of the knowledge base (the cached dump loaded into an embedded Postgres)
   into the mount vs into a local directory: wall-time ratio, target ≤ 1.15. The mount is
   flushed (not timed) between measurements, so each dump starts with an idle uploader;
   the time until the dump is placed on the remotes is reported beside it.
2. ``restic backup`` of the dump with restic's repository inside the mount vs on local disk:
   wall-time ratio, target ≤ 2.
3. A sequential write of ``VAULTFS_BENCH_SEQ_MB`` (default 2048) MB of incompressible,
   non-repeating data in 1 MiB writes through the mount, next to the same write into
   ``bench/nullfs.py`` (a pyfuse3 file system that discards writes, with the same writeback
   cache): both throughputs, until ``close`` returns; for the mount also until every byte is
   placed (``vaultfs flush``).

Sides alternate per repeat; a ratio is the median of the per-repeat ratios (the two sides of a
repeat ran back to back, which cancels the machine's drift); times are medians.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..context import Context
from ..harness import MB, BenchError, Metric, SectionResult, median, run, section, warm
from ..pg import PgServer

K, N = 3, 5
PASSPHRASE = "vaultfs-bench-passphrase"
RESTIC_PASSWORD = "restic-bench-password"

# 1 MiB writes of random data whose every 4 KiB carries a counter: incompressible and never
# repeating (so neither zstd nor dedup helps), generated at memory speed
WRITER = """
import os, struct, sys
path, total = sys.argv[1], int(sys.argv[2])
buf = bytearray(os.urandom(1 << 20))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
n = 0
while n < total:
    for i in range(0, 1 << 20, 4096):
        buf[i:i + 8] = struct.pack("<Q", n + i)
    os.write(fd, buf)
    n += 1 << 20
os.close(fd)
"""


class Mounted:
    """A vault over five local directories, mounted at ``root/mnt``."""

    def __init__(self, ctx: Context, root: Path) -> None:
        self.ctx = ctx
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True)
        self.remotes = [root / f"remote{i}" for i in range(1, N + 1)]
        self.env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(root / "home"))
        cmd = [*ctx.vaultfs, "init", "-k", str(K), "-n", str(N)]
        for r in self.remotes:
            cmd += ["--remote", str(r)]
        run(cmd, env=self.env)
        run([*ctx.vaultfs, "mount", str(self.mnt)], env=self.env)

    def flush(self) -> float:
        t = time.perf_counter()
        m = run([*self.ctx.vaultfs, "flush", "--json"], env=self.env)
        if not json.loads(m.stdout).get("complete"):
            raise BenchError(f"vaultfs flush left data queued: {m.stdout[-500:]}")
        return time.perf_counter() - t

    def umount(self) -> None:
        run([*self.ctx.vaultfs, "umount", str(self.mnt)], env=self.env, check=False)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)


def _mbps(size: int, seconds: float) -> str:
    return f"{size / MB / seconds:.1f} MB/s ({seconds:.1f}s)"


@section(
    "mount", "issue 3: pg_dump and restic into the mount vs local disk; seq write vs null FUSE"
)
def mount(ctx: Context) -> SectionResult:
    ds = ctx.dataset()
    size = ds.base.stat().st_size
    res = SectionResult()
    root = ctx.scratch("mount")
    times: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    with PgServer() as pg:
        ctx.log(f"loading the {size / MB:.0f} MB dump into Postgres")
        pg.sql('CREATE DATABASE "kb"')
        psql = [str(pg.bin_dir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1"]
        run([*psql, "-d", pg.dsn("kb"), "-f", str(ds.base)])
        vault = Mounted(ctx, root / "vault")
        local = ctx.scratch("mount/local")
        try:
            for i in range(ctx.repeats):
                sides = [("local", local), ("mount", vault.mnt)]
                if i % 2:
                    sides.reverse()
                for name, where in sides:
                    out = where / f"kb-{i}.sql"
                    ctx.log(f"run {i + 1}/{ctx.repeats}: pg_dump -Fp into {name}")
                    cmd = [str(pg.bin_dir / "pg_dump"), "-Fp", "-f", str(out), "-d", pg.dsn("kb")]
                    add(f"pg_dump_{name}", run(cmd).seconds)
                    if name == "mount":
                        add("pg_dump_placed", times["pg_dump_mount"][-1] + vault.flush())
                    out.unlink()
            src = ctx.scratch("mount/input") / "kb.sql"
            shutil.copyfile(ds.base, src)
            for i in range(ctx.repeats):
                sides = [("local", local), ("mount", vault.mnt)]
                if i % 2:
                    sides.reverse()
                for name, where in sides:
                    repo = where / f"restic-{i}"
                    env = ctx.env(
                        RESTIC_PASSWORD=RESTIC_PASSWORD,
                        RESTIC_REPOSITORY=str(repo),
                        RESTIC_CACHE_DIR=str(root / f"restic-cache-{name}-{i}"),
                    )
                    run(["restic", "init"], env=env)
                    warm(src)
                    ctx.log(f"run {i + 1}/{ctx.repeats}: restic backup, repository in {name}")
                    add(f"restic_{name}", run(["restic", "backup", str(src)], env=env).seconds)
                    if name == "mount":
                        vault.flush()
            seq = int(os.environ.get("VAULTFS_BENCH_SEQ_MB", "2048")) * 1024 * 1024
            null_mnt = ctx.scratch("mount/null")
            null = subprocess.Popen(
                [sys.executable, "-m", "bench.nullfs", str(null_mnt)], env=ctx.env()
            )
            try:
                deadline = time.monotonic() + 30
                while not os.path.ismount(null_mnt):
                    if time.monotonic() > deadline or null.poll() is not None:
                        raise BenchError("the null FUSE file system did not mount")
                    time.sleep(0.1)
                for i in range(ctx.repeats):
                    sides = [("null", null_mnt), ("mount", vault.mnt)]
                    if i % 2:
                        sides.reverse()
                    for name, where in sides:
                        out = where / f"seq-{i}.bin"
                        ctx.log(f"run {i + 1}/{ctx.repeats}: {seq / MB:.0f} MB written into {name}")
                        add(f"seq_{name}", run([sys.executable, "-c", WRITER, out, seq]).seconds)
                        if name == "mount":
                            add("seq_placed", times["seq_mount"][-1] + vault.flush())
                        out.unlink()
            finally:
                subprocess.run(["fusermount3", "-u", str(null_mnt)], check=False)
                null.wait(30)
        finally:
            vault.umount()
    med = {k: median(v) for k, v in times.items()}

    def paired(ours: str, peer: str) -> float:
        """Median over runs of our time / the peer's (the two ran back to back)."""
        return median([o / p for o, p in zip(times[ours], times[peer], strict=True)])

    def of_medians(ours: str, peer: str) -> str:
        return f"ratio of the medians {med[ours] / med[peer]:.2f}x"

    res.metrics += [
        Metric(
            "pg_dump -Fp into the mount / into a local dir (wall)",
            paired("pg_dump_mount", "pg_dump_local"),
            "x",
            ("<=", 1.15),
            _mbps(size, med["pg_dump_mount"]),
            _mbps(size, med["pg_dump_local"]),
            of_medians("pg_dump_mount", "pg_dump_local"),
        ),
        Metric(
            "pg_dump -Fp into the mount until placed on the remotes",
            med["pg_dump_placed"],
            "s",
            None,
            _mbps(size, med["pg_dump_placed"]),
            note="dump + `vaultfs flush` (stores the cache, seals, uploads 3-of-5)",
        ),
        Metric(
            "restic backup, repository in the mount / on local disk (wall)",
            paired("restic_mount", "restic_local"),
            "x",
            ("<=", 2.0),
            _mbps(size, med["restic_mount"]),
            _mbps(size, med["restic_local"]),
            of_medians("restic_mount", "restic_local"),
        ),
        Metric(
            "sequential write through the mount (until close)",
            seq / MB / med["seq_mount"],
            "MB/s",
            None,
            _mbps(seq, med["seq_mount"]),
            _mbps(seq, med["seq_null"]),
            "peer: the null pyfuse3 file system (bench/nullfs.py), same writes",
        ),
        Metric(
            "sequential write through the mount until placed",
            seq / MB / med["seq_placed"],
            "MB/s",
            None,
            _mbps(seq, med["seq_placed"]),
        ),
        Metric("null FUSE ceiling", seq / MB / med["seq_null"], "MB/s", None),
    ]
    res.details = {
        "dump_bytes": size,
        "sequential_bytes": seq,
        "seconds": times,
        "notes": [
            "mount: default 1 GiB cache; each measurement starts after `vaultfs flush`",
            "page caches are not dropped; inputs are read once before restic runs",
        ],
    }
    return res
