"""Issue 16's network benchmark: vaultfs 3-of-5 over five emulated remotes against restic to
one, in the same run (bench/netem.py: each remote an ``rclone serve s3`` behind a link of
40 ms RTT and 100 Mbit/s; docs/benchmarks.md describes the set-up).

Per repeat:

1. first backup of the dump: vaultfs to the five remotes (``vaultfs backup`` returns at
   quorum: k shards of every segment placed; a ``vaultfs flush`` after it, untimed, places
   what a remote still lacked), restic to
   remote 5 (its ``s3:`` backend);
2. restore with no local state: vaultfs from remotes 1-3 ("any 3") and from all five
   ("fastest 3 of 5": the restore chooses), restic from its repository;
3. remote 5 slowed to 5 Mbit/s and 400 ms RTT: a fresh vaultfs backup and a restore from all
   five, restic backup and restore to a fresh repository on the slowed remote (reference);
4. links restored; remote 3's objects deleted, ``vaultfs repair`` rebuilds them.

Under ``--quick`` steps 1-4 run on the first 64 MiB of the dump, then steps 1, 2, vaultfs's
half of 3 and 4 once more on the whole dump, the size the issue's targets are set for (at
64 MiB start-up, the key's unlock and the chain check of the slowed remote are about half of
a step): the targets are judged on the whole dump, the slice's figures kept as information.
Restic against the slowed remote (a reference, not a target) runs on the slice only: at
5 Mbit/s it would take some 12 minutes a run on the whole dump.

Each figure is reported beside its **link-capacity bound**: the least time the emulated links
allow for the bytes that step must move (a backup: each remote's stored bytes over its link,
or with the slowed remote, k/n of them over the fastest links, as for a restore;
a restore: k/n of the stored bytes drawn from the links it may use, each giving at most what
it holds; a repair: the rebuilt bytes into one link, and k times them out of the others), and
the fraction of it reached (bound / measured). Peak RSS of every vaultfs step must stay
within 256 MiB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..context import Context
from ..harness import MB, BenchError, Measurement, Metric, MiB, SectionResult, median, run, section
from ..harness import tree_bytes as _tree_bytes
from ..netem import ACCESS_KEY, SECRET_KEY, Link, Network

K, N = 3, 5
PASSPHRASE = "vaultfs-bench-passphrase"
RESTIC_PASSWORD = "restic-bench-password"
RSS_LIMIT = 256 * MiB
QUICK_BYTES = 64 * MiB
NORMAL = Link(rtt=0.040, rate_bps=100e6)
SLOW = Link(rtt=0.400, rate_bps=5e6)
SLOWED = 4  # remote 5: slowed in step 3, restic's remote throughout
LOST = 2  # remote 3: lost in step 4


def read_bound(need: float, shares: list[float], rates: list[float]) -> float:
    """Least seconds to draw ``need`` bytes from links of ``rates`` bytes/s, each holding
    ``shares`` bytes (no link gives more than it holds): bisection on the time T for which
    sum(min(share, rate*T)) reaches ``need``."""
    if need <= 0:
        return 0.0
    if sum(shares) < need:
        return float("inf")
    lo, hi = 0.0, max(s / r for s, r in zip(shares, rates, strict=True))
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(min(s, r * mid) for s, r in zip(shares, rates, strict=True)) >= need:
            hi = mid
        else:
            lo = mid
    return hi


def _cut(src: Path, dest: Path, limit: int) -> None:
    """The first ``limit`` bytes of ``src`` (cut at a line end) as ``dest``."""
    with open(src, "rb") as f:
        data = f.read(limit)
    dest.write_bytes(data[: data.rfind(b"\n") + 1] or data)


def _identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


class _Vault:
    """A vaultfs vault over the emulated remotes (bucket ``bkt``, path ``name``)."""

    def __init__(self, ctx: Context, net: Network, root: Path, name: str) -> None:
        self.ctx, self.net, self.root, self.name = ctx, net, root, name
        self.home = root / f"{name}-home"
        self.specs = [r.spec(f"bkt/{name}") for r in net.remotes]
        self.env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(self.home))

    def stored(self) -> list[int]:
        """Bytes each remote holds for this vault."""
        return [_tree_bytes(r.root / "bkt" / self.name) for r in self.net.remotes]

    def init_and_backup(self, src: Path) -> Measurement:
        cmd = [*self.ctx.vaultfs, "init", "-k", str(K), "-n", str(N)]
        for s in self.specs:
            cmd += ["--remote", s]
        run(cmd, env=self.env)
        m = run([*self.ctx.vaultfs, "backup", "--json", str(src)], env=self.env)
        # done at quorum (k shards of every segment placed): a slow remote's rest may be queued
        if json.loads(m.stdout or "{}").get("segments_below_k_placed", 1):
            raise BenchError(f"vaultfs backup left segments below k: {m.stdout[-1000:]}")
        return m

    def flush(self) -> None:
        """Place what a quorum backup left queued (before a restore that needs every
        remote's shards, or a repair)."""
        run([*self.ctx.vaultfs, "flush"], env=self.env)

    def restore(self, src: Path, which: list[int], tag: str) -> tuple[Measurement, bool]:
        empty = self.root / f"{self.name}-{tag}-home"
        empty.mkdir()
        out = self.root / f"{self.name}-{tag}-out"
        env = self.ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(empty))
        cmd = [*self.ctx.vaultfs, "restore", "--json", "--to", str(out)]
        cmd += ["--keyfile", str(self.home / "key.json")]
        for i in which:
            cmd += ["--from", self.specs[i]]
        m = run(cmd, env=env)
        ok = _identical(src, out / src.name)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)
        return m, ok


class _Restic:
    """A restic repository on one emulated remote (its s3: backend)."""

    def __init__(self, ctx: Context, net: Network, root: Path, name: str) -> None:
        r = net.remotes[SLOWED]
        r.spec(f"restic/{name}")  # creates the bucket
        self.remote, self.name, self.root = r, name, root
        self.env = ctx.env(
            RESTIC_PASSWORD=RESTIC_PASSWORD,
            RESTIC_REPOSITORY=f"s3:{r.endpoint}/restic/{name}",
            RESTIC_CACHE_DIR=str(root / f"restic-{name}-cache"),
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        )

    def stored(self) -> int:
        return _tree_bytes(self.remote.root / "restic" / self.name)

    def init_and_backup(self, src: Path) -> Measurement:
        run(["restic", "init"], env=self.env)
        return run(["restic", "backup", "--json", str(src)], env=self.env)

    def restore(self, src: Path) -> tuple[Measurement, bool]:
        out = self.root / f"restic-{self.name}-out"
        env = {**self.env, "RESTIC_CACHE_DIR": str(self.root / f"restic-{self.name}-cold")}
        m = run(["restic", "restore", "latest", "--target", str(out)], env=env)
        ok = _identical(src, out / str(src).lstrip("/"))
        shutil.rmtree(out, ignore_errors=True)
        return m, ok


def _rclone() -> str:
    from ..netem import _rclone as find

    return find()


@section("net", "issue 16: 3-of-5 over emulated 40 ms / 100 Mbit/s links vs restic to one")
def net(ctx: Context) -> SectionResult:
    ds = ctx.dataset()
    res = SectionResult()
    steps: list[dict] = []
    for i in range(ctx.repeats):
        root = ctx.scratch(f"net-{i}")
        src = root / "kb.sql"
        if ctx.quick:
            _cut(ds.base, src, QUICK_BYTES)
        else:
            shutil.copyfile(ds.base, src)
        with Network(root / "net", [NORMAL] * N) as netw:
            steps.append(_one_run(ctx, netw, root, src, i))
            if ctx.quick:
                full = steps[-1]["full"] = _full_run(ctx, netw, root, ds.base, i)
                steps[-1]["peak_rss"] = max(steps[-1]["peak_rss"], full["peak_rss"])
                steps[-1]["identical"] = steps[-1]["identical"] and full["identical"]
            res.details["network"] = netw.describe()
        if not ctx.keep:
            shutil.rmtree(root, ignore_errors=True)
    res.details["runs"] = steps

    # the whole dump's steps (under --quick: each run's "full") are the ones judged
    whole = [s["full"] for s in steps] if ctx.quick else steps

    def fig(key: str, runs: list[dict] = steps) -> dict:
        """The median run's figures of one step (by its seconds)."""
        by_time = sorted((s[key] for s in runs), key=lambda s: s["seconds"])
        return by_time[len(by_time) // 2]

    def tput(s: dict, size: int = steps[0]["size"]) -> str:
        return (
            f"{size / MB / s['seconds']:.1f} MB/s ({s['seconds']:.1f}s; link bound "
            f"{s['bound']:.1f}s, {100 * s['bound'] / s['seconds']:.0f}% of it)"
        )

    def ratio(ours: str, peer: str, runs: list[dict] = steps) -> float:
        return median([s[peer]["seconds"] / s[ours]["seconds"] for s in runs])

    def repair(s: dict) -> str:
        return f"{s['bytes'] / MB:.0f} MB in {s['seconds']:.1f}s"

    wsize = whole[0]["size"]
    what = " (whole dump)" if ctx.quick else ""
    slice_ = " (on the --quick slice)" if ctx.quick else ""
    res.metrics += [
        Metric(f"first backup throughput{what}", ratio("vb", "rb", whole), "x", (">=", 1.5),
               tput(fig("vb", whole), wsize), tput(fig("rb", whole), wsize),
               "vaultfs places all 5 shards; restic to one"),
        Metric(f"restore, no local state (any 3){what}", ratio("vr3", "rr", whole), "x",
               (">=", 2.0), tput(fig("vr3", whole), wsize), tput(fig("rr", whole), wsize)),
        Metric(f"restore, no local state (fastest 3 of 5){what}", ratio("vr5", "rr", whole),
               "x", (">=", 2.0), tput(fig("vr5", whole), wsize), tput(fig("rr", whole), wsize)),
        Metric(f"backup, one remote slowed (vs not slowed){what}",
               median([s["vbs"]["seconds"] / s["vb"]["seconds"] for s in whole]), "x",
               ("<=", 1.2), tput(fig("vbs", whole), wsize), tput(fig("vb", whole), wsize),
               f"remote 5 at {SLOW}; restic to it{slice_}: {tput(fig('rbs'))}"),
        Metric(f"restore, one remote slowed (vs not slowed){what}",
               median([s["vrs"]["seconds"] / s["vr5"]["seconds"] for s in whole]), "x",
               ("<=", 1.2), tput(fig("vrs", whole), wsize), tput(fig("vr5", whole), wsize),
               f"restic from it{slice_}: {tput(fig('rrs'))}"),
        Metric("repair of a lost remote, fraction of link capacity (whole dump)",
               median([s["rep"]["bound"] / s["rep"]["seconds"] for s in whole]), "x",
               (">=", 0.5), repair(fig("rep", whole)), f"bound {fig('rep', whole)['bound']:.1f}s"),
    ]  # fmt: skip
    if ctx.quick:  # the slice's figures of the same steps, as information
        fixed = "fixed costs (start-up, scrypt, listings) weigh most at this size"
        res.metrics += [
            Metric("first backup throughput (--quick slice)", ratio("vb", "rb"), "x", None,
                   tput(fig("vb")), tput(fig("rb")), fixed),
            Metric("restore, no local state (any 3) (--quick slice)", ratio("vr3", "rr"), "x",
                   None, tput(fig("vr3")), tput(fig("rr")), fixed),
            Metric("restore, no local state (fastest 3 of 5) (--quick slice)",
                   ratio("vr5", "rr"), "x", None, tput(fig("vr5")), tput(fig("rr")), fixed),
            Metric("backup, one remote slowed (vs not slowed) (--quick slice)",
                   median([s["vbs"]["seconds"] / s["vb"]["seconds"] for s in steps]), "x",
                   None, tput(fig("vbs")), tput(fig("vb")), fixed),
            Metric("restore, one remote slowed (vs not slowed) (--quick slice)",
                   median([s["vrs"]["seconds"] / s["vr5"]["seconds"] for s in steps]), "x",
                   None, tput(fig("vrs")), tput(fig("vr5")), fixed),
            Metric("repair of a lost remote, fraction of link capacity (--quick slice)",
                   median([s["rep"]["bound"] / s["rep"]["seconds"] for s in steps]), "x", None,
                   repair(fig("rep")), f"bound {fig('rep')['bound']:.1f}s", fixed),
        ]  # fmt: skip
    res.metrics += [
        Metric("restored bytes identical", all(s["identical"] for s in steps), "", ("==", True)),
        Metric("peak RSS, vaultfs (every step)",
               max(s["peak_rss"] for s in steps) / MiB, "MiB", ("<=", RSS_LIMIT / MiB),
               note="exact (wait4 ru_maxrss), largest process; includes scrypt's 128 MiB"),
    ]  # fmt: skip
    size = steps[0]["size"]
    sizes = f"{size / MB:.0f} MB input"
    if ctx.quick:
        sizes = (
            f"--quick: the whole dump ({wsize / MB:.0f} MB) for the judged figures, a "
            f"{size / MB:.0f} MB slice for restic against the slowed remote and as information"
        )
    res.details["notes"] = [
        f"{sizes}; links {NORMAL}, slowed remote {SLOW}; emulation {res.details.get('network')}",
        "link bound: the least time the emulated links allow for the bytes the step moves",
    ]
    return res


def _step(m: Measurement, bound: float, **extra: object) -> dict:
    return {"seconds": m.seconds, "bound": bound, "peak_rss": m.peak_rss, **extra}


def _one_run(ctx: Context, netw: Network, root: Path, src: Path, i: int) -> dict:
    size = src.stat().st_size
    out: dict = {"size": size}
    ok: list[bool] = []
    rss: list[int] = []

    def log(msg: str) -> None:
        ctx.log(f"net run {i + 1}/{ctx.repeats}: {msg}")

    v, stored = _backups_and_restores(ctx, netw, root, src, "", log, out, ok, rss)

    # 3. remote 5 slowed
    netw.set_link(SLOWED, SLOW)
    _slowed(ctx, netw, root, src, "", stored, log, out, ok, rss)
    rs = _Restic(ctx, netw, root, "rs")
    log("restic backup and restore against the slowed remote")
    m = rs.init_and_backup(src)
    out["rbs"] = _step(m, rs.stored() / SLOW.bytes_per_s)
    m, same = rs.restore(src)
    out["rrs"] = _step(m, rs.stored() / SLOW.bytes_per_s)
    ok.append(same)
    netw.set_link(SLOWED, NORMAL)

    # 4. repair of a lost remote
    return _repaired(ctx, v, stored, log, out, ok, rss)


def _backups_and_restores(
    ctx: Context,
    netw: Network,
    root: Path,
    src: Path,
    tag: str,
    log: Callable[[str], None],
    out: dict,
    ok: list[bool],
    rss: list[int],
) -> tuple[_Vault, list[int]]:
    """Steps 1 and 2 on ``src`` (vault ``v{tag}``, restic repository ``r{tag}``): their
    figures into ``out``, restored-bytes checks into ``ok``, vaultfs peak RSS into ``rss``.
    Returns the vault and each remote's stored bytes after the flush."""
    size = src.stat().st_size
    rate = NORMAL.bytes_per_s
    # 1. first backups
    v = _Vault(ctx, netw, root, f"v{tag}")
    log(f"vaultfs first backup of {size / MB:.0f} MB to 5 remotes")
    m = v.init_and_backup(src)
    at_return = v.stored()
    v.flush()  # what the quorum left queued, if anything: the restores read every remote
    stored = v.stored()
    out["vb"] = _step(m, max(s / rate for s in stored), stored=at_return)
    rss.append(m.peak_rss)
    rt = _Restic(ctx, netw, root, f"r{tag}")
    log("restic first backup to one remote")
    m = rt.init_and_backup(src)
    out["rb"] = _step(m, rt.stored() / rate, stored=rt.stored())

    # 2. restores with no local state
    need = sum(stored) * K / N
    for key, which in (("vr3", [0, 1, 2]), ("vr5", list(range(N)))):
        log(f"vaultfs restore from remotes {[w + 1 for w in which]}")
        m, same = v.restore(src, which, key)
        out[key] = _step(m, read_bound(need, [stored[w] for w in which], [rate] * len(which)))
        ok.append(same)
        rss.append(m.peak_rss)
    log("restic restore")
    m, same = rt.restore(src)
    out["rr"] = _step(m, rt.stored() / rate)
    ok.append(same)
    return v, stored


def _slowed(
    ctx: Context,
    netw: Network,
    root: Path,
    src: Path,
    tag: str,
    stored: list[int],
    log: Callable[[str], None],
    out: dict,
    ok: list[bool],
    rss: list[int],
) -> None:
    """Step 3's vaultfs half on ``src`` with remote 5 already slowed (vault ``vs{tag}``): a
    fresh backup and a restore from all five, figures into ``out``; ``stored``: each
    remote's bytes of the same data in step 1's vault (for the bounds)."""
    rates = [NORMAL.bytes_per_s] * N
    rates[SLOWED] = SLOW.bytes_per_s
    vs = _Vault(ctx, netw, root, f"vs{tag}")
    log(f"vaultfs backup with remote 5 at {SLOW}")
    m = vs.init_and_backup(src)
    st = vs.stored()
    # the bound of a quorum backup: k shards of every segment over the fastest links
    out["vbs"] = _step(m, read_bound(sum(stored) * K / N, stored, rates), stored=st)
    rss.append(m.peak_rss)
    log("vaultfs restore from all five, one slowed")
    m, same = vs.restore(src, list(range(N)), "slow")
    out["vrs"] = _step(m, read_bound(sum(stored) * K / N, st, rates))
    ok.append(same)
    rss.append(m.peak_rss)


def _repair(ctx: Context, v: _Vault, stored: list[int]) -> dict:
    """Remote 3's objects deleted (through its server, so its listing cache agrees), then
    ``vaultfs repair``, timed; ``stored``: each remote's bytes before."""
    lost = stored[LOST]
    for sub in ("data", "meta"):
        subprocess.run(
            [_rclone(), "-q", "purge", f"{v.specs[LOST]}/{sub}"], capture_output=True, check=False
        )
    m = run([*ctx.vaultfs, "repair", "--json"], env=v.env, check=False)
    rj = json.loads(m.stdout or "{}")
    if m.returncode != 0 or not rj.get("ok"):
        raise BenchError(f"vaultfs repair failed: {m.stderr[-2000:] or m.stdout[-2000:]}")
    rate = NORMAL.bytes_per_s
    others = [s for j, s in enumerate(stored) if j != LOST]
    bound = max(lost / rate, read_bound(K * lost, others, [rate] * len(others)))
    return _step(m, bound, bytes=rj.get("bytes_written", lost))


def _full_run(ctx: Context, netw: Network, root: Path, dump: Path, i: int) -> dict:
    """Under --quick: steps 1, 2 and 4 on the whole dump (its own vault and restic
    repository), the size the issue's targets are set for."""
    out: dict = {"size": dump.stat().st_size}
    ok: list[bool] = []
    rss: list[int] = []

    def log(msg: str) -> None:
        ctx.log(f"net run {i + 1}/{ctx.repeats}, whole dump: {msg}")

    v, stored = _backups_and_restores(ctx, netw, root, dump, "f", log, out, ok, rss)
    netw.set_link(SLOWED, SLOW)
    try:
        _slowed(ctx, netw, root, dump, "f", stored, log, out, ok, rss)
    finally:
        netw.set_link(SLOWED, NORMAL)
    return _repaired(ctx, v, stored, log, out, ok, rss)


def _repaired(
    ctx: Context,
    v: _Vault,
    stored: list[int],
    log: Callable[[str], None],
    out: dict,
    ok: list[bool],
    rss: list[int],
) -> dict:
    """Step 4 (repair of remote 3, on the normal links) into ``out``, then the run's totals
    (every restore identical, the largest vaultfs peak RSS); returns ``out``."""
    log(f"vaultfs repair of remote 3 ({stored[LOST] / MB:.0f} MB)")
    out["rep"] = _repair(ctx, v, stored)
    rss.append(out["rep"]["peak_rss"])
    out["identical"] = all(ok)
    out["peak_rss"] = max(rss)
    return out
