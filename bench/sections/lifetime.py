"""Issue 11's lifetime benchmark: does a commit cost what changed, not what the vault holds?

For each size in ``--lifetime-sizes`` (GiB of unique data; default 1, 4 and 16; ``--quick``:
1/16 and 1/4), a 3-of-5 vault over five local-directory remotes:

1. ``vaultfs backup`` of that much unique (random) data, in files of 64 MiB;
2. a full restore with an empty home (``--from`` three remotes, the keyfile): peak RSS of the
   data path (after scrypt) and time;
3. a 1 MiB change (a new file of random bytes) and its commit, ``vaultfs backup`` of the
   directory holding it: bytes uploaded (every object that appeared on the five remotes: data
   and meta shards and manifests), wall time, peak RSS of the data path (after the keyfile's
   scrypt). (A backup of the whole tree would also re-read every file — there is no files
   cache yet — and record every entry again: costs of the backup walk and of the snapshot's
   rows, not of the commit, which this section isolates.)
4. a restore of the one changed file (``--include``) with an empty home: time, and the bytes it
   read from the remotes, as its ``--json`` report counts them (``bytes_read``: manifests,
   the index blocks on the file's path through the lazy index view, the file's data shards);
   the target adds k/n of the data objects the change added (the file's segments);
5. another 1 MiB change and its commit: bytes uploaded in the steady state (the commit in 3
   also records, in the index it ships, the meta segments the big backup's commit wrote:
   their shard rows and audit tags, scattered over random-key index pages).

Targets (issue 11): uploaded ≤ 4 MiB + 1 MiB × n/k at every size and flat (largest vs
smallest ≤ 1.5×), commit time flat (≤ 1.5×), peak RSS of commit and full restore flat
(≤ 1.2×), single-file restore ≤ 8 MiB + the file's segments and ≤ 3 s.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ..context import Context
from ..harness import Measurement, Metric, MiB, SectionResult, run, section
from .engine import data_path_peak

K, N = 3, 5
PASSPHRASE = "vaultfs-bench-passphrase"
FILE = 64 * MiB
CHANGE = 1 * MiB
GiB = 1024 * MiB


def _objects(remotes: list[Path]) -> dict[str, int]:
    """{path: size} of every object on the remotes."""
    return {
        str(p): p.stat().st_size
        for r in remotes
        for sub in ("data", "meta", "manifests")
        if (r / sub).is_dir()
        for p in (r / sub).iterdir()
    }


def _fill(src: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    src.mkdir(parents=True, exist_ok=True)
    for i, off in enumerate(range(0, size, FILE)):
        (src / f"data-{i:05d}.bin").write_bytes(rng.randbytes(min(FILE, size - off)))


def _one(ctx: Context, gib: float) -> dict:
    root = ctx.scratch(f"lifetime-{gib:g}")
    remotes = [root / f"remote{j}" for j in range(1, N + 1)]
    home = root / "home"
    env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(home))
    init = [*ctx.vaultfs, "init", "-k", str(K), "-n", str(N)]
    for r in remotes:
        init += ["--remote", str(r)]
    run(init, env=env)
    src = root / "src"
    size = int(gib * GiB)
    ctx.log(f"lifetime {gib:g} GiB: writing and backing up {size / MiB:.0f} MiB of unique data")
    _fill(src, size, seed=int(gib * 1000))
    run([*ctx.vaultfs, "backup", str(src)], env=env)
    key = ["--keyfile", str(home / "key.json")]
    frm = [x for r in remotes[:K] for x in ("--from", str(r))]
    ctx.log(f"lifetime {gib:g} GiB: full restore with an empty home")
    full = run(
        [*ctx.vaultfs, "restore", *frm, *key, "--to", str(root / "out-full"),
         "--home", str(root / "empty-full")],
        env=env,
    )  # fmt: skip
    shutil.rmtree(root / "out-full")

    before = _objects(remotes)
    change = root / "change"
    change.mkdir()
    (change / "change.bin").write_bytes(random.Random(1).randbytes(CHANGE))
    ctx.log(f"lifetime {gib:g} GiB: the 1 MiB change and its commit")
    commit = run([*ctx.vaultfs, "backup", str(change)], env=env)
    after = _objects(remotes)
    new = {p: s for p, s in after.items() if p not in before}
    uploaded = sum(new.values())
    change_data = sum(s for p, s in new.items() if "/data/" in p)
    ctx.log(f"lifetime {gib:g} GiB: restore of the changed file with an empty home")
    one = run(
        [*ctx.vaultfs, "restore", *frm, *key, "--include", "change/change.bin",
         "--to", str(root / "out-one"), "--home", str(root / "empty-one"), "--json"],
        env=env,
    )  # fmt: skip
    one_read = json.loads(one.stdout)["bytes_read"]
    restored = root / "out-one" / "change" / "change.bin"
    if restored.read_bytes() != (change / "change.bin").read_bytes():
        raise ValueError("the single-file restore gave other bytes")
    # a second 1 MiB change: the first commit after the big backup also records the index
    # of that backup's meta segments (their shard rows and audit tags); this one does not
    settled = _objects(remotes)
    again = root / "change2"
    again.mkdir()
    (again / "change.bin").write_bytes(random.Random(2).randbytes(CHANGE))
    run([*ctx.vaultfs, "backup", str(again)], env=env)
    uploaded_next = sum(s for p, s in _objects(remotes).items() if p not in settled)
    return {
        "gib": gib,
        "uploaded": uploaded,
        "uploaded_next": uploaded_next,
        "commit": _summary(commit),
        "full_restore": _summary(full),
        "one_file": _summary(one),
        "one_file_reads": one_read,
        "one_file_data": change_data * K // N,
    }


def _summary(m: Measurement) -> dict:
    s = m.summary()
    return {"seconds": m.seconds, "peak_rss": data_path_peak(s), "peak_rss_all": m.peak_rss}


@section("lifetime", "issue 11: commit cost after a 1 MiB change, restores, at growing sizes")
def lifetime(ctx: Context) -> SectionResult:
    res = SectionResult()
    rows = [_one(ctx, gib) for gib in ctx.lifetime_sizes]
    res.details["sizes"] = rows
    limit_up = 4 * MiB + CHANGE * N / K
    for r in rows:
        g = f"{r['gib']:g} GiB"
        res.metrics += [
            Metric(
                f"{g}: uploaded by the commit after a 1 MiB change",
                r["uploaded"] / MiB,
                "MiB",
                ("<=", limit_up / MiB),
                note="every new object on the five remotes: data, meta, manifests",
            ),
            Metric(
                f"{g}: uploaded by the next commit, after another 1 MiB change",
                r["uploaded_next"] / MiB,
                "MiB",
                ("<=", limit_up / MiB),
                note="steady state: the commit before it was small too",
            ),
            Metric(f"{g}: commit wall time", r["commit"]["seconds"], "s"),
            Metric(f"{g}: commit peak RSS", r["commit"]["peak_rss"] / MiB, "MiB"),
            Metric(f"{g}: full restore peak RSS", r["full_restore"]["peak_rss"] / MiB, "MiB"),
            Metric(f"{g}: full restore time", r["full_restore"]["seconds"], "s"),
            Metric(
                f"{g}: one-file restore, bytes read (no local state)",
                r["one_file_reads"] / MiB,
                "MiB",
                ("<=", (8 * MiB + r["one_file_data"]) / MiB),
                note="measured: the restore's own count (--json bytes_read)",
            ),
            Metric(f"{g}: one-file restore time", r["one_file"]["seconds"], "s", ("<=", 3.0)),
        ]
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        span = f"{hi['gib']:g} vs {lo['gib']:g} GiB"
        for name, get, limit in (
            ("uploaded per commit", lambda r: r["uploaded"], 1.5),
            ("commit wall time", lambda r: r["commit"]["seconds"], 1.5),
            ("commit peak RSS", lambda r: r["commit"]["peak_rss"], 1.2),
            ("full restore peak RSS", lambda r: r["full_restore"]["peak_rss"], 1.2),
        ):
            res.metrics.append(
                Metric(f"{name}, {span}", get(hi) / max(get(lo), 1), "x", ("<=", limit))
            )
    return res
