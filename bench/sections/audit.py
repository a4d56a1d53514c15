"""Issue 4's audit and repair benchmark (3-of-5 over five local-directory remotes).

1. **Audit cost**: after backing up the dump, ``vaultfs verify --remote R1`` (the default audit:
   enough random challenges for 99 % confidence against a 1 % block loss, 459 of them). Bytes
   read from R1 (counted by the audit's metering layer: every byte rclone returned, plus the
   newest manifest) against the bytes R1 stores; target ≤ 2 %. The confidence reached must be
   at least 99 %.
2. **Repair throughput**: every object of R3 is deleted (a lost remote), then ``vaultfs repair``
   rebuilds them from the other remotes and places them back. Its throughput (bytes rebuilt per
   second, wall time of the whole command) is reported next to ``rclone copy`` of exactly the
   objects it wrote (``--files-from-raw`` of the report's new paths, from R3 into an empty
   directory) — the time a plain copy of those bytes takes on this machine, measured in the
   same run; target ≥ 0.5 of its throughput (issue 15). Beside it, for information, the same
   ratio on the command's own account of its time (without interpreter start and the
   keyfile's scrypt: the fixed costs, which weigh heavily at the ~60 MB one remote of the
   457 MB dump holds).
3. ``vaultfs verify --read-all --remote R3`` afterwards must be clean.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..context import Context
from ..harness import MB, BenchError, Metric, SectionResult, median, run, section, tree_bytes

K, N = 3, 5
PASSPHRASE = "vaultfs-bench-passphrase"
AUDIT_LIMIT = 0.02


def _rclone() -> str:
    local = Path(sys.executable).parent / "rclone"
    return str(local) if local.exists() else "rclone"


@section("audit", "issue 4: audit bytes for 99% confidence, repair of a lost remote vs rclone copy")
def audit(ctx: Context) -> SectionResult:
    ds = ctx.dataset()
    res = SectionResult()
    ratios, confidences, repair_s, copy_s, rebuilt, clean = [], [], [], [], [], []
    internal_s: list[float] = []
    for i in range(ctx.repeats):
        root = ctx.scratch(f"audit-{i}")
        remotes = [root / f"remote{j}" for j in range(1, N + 1)]
        env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(root / "home"))
        cmd = [*ctx.vaultfs, "init", "-k", str(K), "-n", str(N)]
        for r in remotes:
            cmd += ["--remote", str(r)]
        run(cmd, env=env)
        src = root / "kb.sql"
        shutil.copyfile(ds.base, src)
        ctx.log(f"run {i + 1}/{ctx.repeats}: backup of {src.stat().st_size / MB:.0f} MB")
        run([*ctx.vaultfs, "backup", str(src)], env=env)

        ctx.log(f"run {i + 1}/{ctx.repeats}: default audit of remote1")
        m = run([*ctx.vaultfs, "verify", "--json", "--remote", str(remotes[0])], env=env)
        rep = json.loads(m.stdout)["remotes"][0]
        stored = tree_bytes(remotes[0] / "data", remotes[0] / "meta")
        ratios.append(rep["bytes_read"] / stored)
        confidences.append(rep["confidence"])
        res.details[f"audit_{i}"] = {
            "bytes_read": rep["bytes_read"],
            "stored": stored,
            "checks": rep["checked"],
            "blocks": rep["blocks"],
            "seconds": m.seconds,
        }

        lost = remotes[2]
        lost_bytes = tree_bytes(lost / "data", lost / "meta")
        for sub in ("data", "meta"):
            shutil.rmtree(lost / sub, ignore_errors=True)
        ctx.log(f"run {i + 1}/{ctx.repeats}: repair of a lost remote ({lost_bytes / MB:.0f} MB)")
        m = run([*ctx.vaultfs, "repair", "--json"], env=env, check=False)
        rj = json.loads(m.stdout or "{}")
        if m.returncode != 0 or not rj.get("ok"):
            raise BenchError(f"vaultfs repair failed: {m.stderr[-2000:] or m.stdout[-2000:]}")
        repair_s.append(m.seconds)
        rebuilt.append(rj["bytes_written"])

        written = root / "rebuilt.txt"
        written.write_text("".join(f"{it['new']}\n" for it in rj["items"]))
        dest = root / "rclone-copy"
        c = run(
            [_rclone(), "copy", "--files-from-raw", str(written), str(lost), str(dest)],
            env=ctx.env(),
        )
        copy_s.append(c.seconds)
        internal_s.append(rj["seconds"])
        res.details[f"repair_{i}"] = {
            "rebuilt_bytes": rj["bytes_written"],
            "fetched_bytes": rj["bytes_fetched"],
            "repair_seconds": m.seconds,
            # the command's own account: without interpreter start and the passphrase's scrypt
            "repair_internal_seconds": rj["seconds"],
            "copy_bytes": tree_bytes(dest),
            "copy_seconds": c.seconds,
        }
        shutil.rmtree(dest, ignore_errors=True)

        v = run(
            [*ctx.vaultfs, "verify", "--read-all", "--json", "--remote", str(lost)],
            env=env,
            check=False,
        )
        clean.append(v.returncode == 0 and json.loads(v.stdout)["clean"])

    ratio = median(ratios)
    res.metrics.append(
        Metric(
            "audit bytes read / stored (99% vs 1% loss)",
            ratio * 100,
            "%",
            ("<=", AUDIT_LIMIT * 100),
            ours=f"{median([d['bytes_read'] for k, d in res.details.items() if k.startswith('audit')]) / MB:.2f} MB read",
            peer=f"{median([d['stored'] for k, d in res.details.items() if k.startswith('audit')]) / MB:.0f} MB stored",
            note="one 2 KiB piece per random 64 KiB block, checked by keyed tag and Merkle proof",
        )
    )
    res.metrics.append(
        Metric("audit confidence reached", min(confidences) * 100, "%", (">=", 99.0))
    )
    rb, rs, cs = median(rebuilt), median(repair_s), median(copy_s)
    cb = median([d["copy_bytes"] for k, d in res.details.items() if k.startswith("repair")])
    res.metrics.append(
        Metric(
            "repair throughput vs rclone copy",
            (rb / rs) / (cb / cs),
            "x",
            (">=", 0.5),  # issue 15
            ours=f"{rb / MB / rs:.1f} MB/s ({rs:.1f}s)",
            peer=f"{cb / MB / cs:.1f} MB/s ({cs:.1f}s)",
            note="repair scans every remote, reads and checks k shards per rebuilt one, "
            "reconstructs the missing fragment, whitens, hashes and tags it, fsyncs it, ships "
            "the index, and its wall time includes start-up and the keyfile's scrypt; the copy "
            "only copies (no fsync)",
        )
    )
    ri = median(internal_s)
    res.metrics.append(
        Metric(
            "repair throughput vs rclone copy, the command's own time (no start-up, no scrypt)",
            (rb / ri) / (cb / cs),
            "x",
            None,
            ours=f"{rb / MB / ri:.1f} MB/s ({ri:.1f}s)",
            peer=f"{cb / MB / cs:.1f} MB/s ({cs:.1f}s)",
            note="the steady-state figure: what the throughput approaches on a larger loss",
        )
    )
    res.metrics.append(Metric("read-all audit clean after repair", all(clean), "", ("==", True)))
    return res
