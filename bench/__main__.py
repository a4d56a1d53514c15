"""``scripts/bench`` entry point: run the selected sections, print a table, write JSON.

Exit codes: 0 every target met; 1 a target missed or a section failed; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

from . import harness
from .context import REPO_ROOT, Context
from .sections import load_all


def _host() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark vaultfs against reference tools measured in the same run.",
    )
    ap.add_argument("--beliefs", type=int, default=100_000, help="dataset size (default 100000)")
    ap.add_argument("--seed", type=int, default=7, help="dataset seed (default 7)")
    ap.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="SECTION",
        help="run only these sections (default: all)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement (median)")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench" / "results",
        help="directory for the results JSON (default bench/results)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: temp)")
    ap.add_argument(
        "--ref",
        default=None,
        help="measure vaultfs at this git commit (exported) instead of the working tree",
    )
    ap.add_argument(
        "--src",
        type=Path,
        default=None,
        help="measure the vaultfs source tree in DIR (e.g. a patched copy) instead",
    )
    ap.add_argument(
        "--lifetime-sizes",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1.0, 4.0, 16.0],
        metavar="GIB,…",
        help="vault sizes of the lifetime section, GiB of unique data (default 1,4,16)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the small variant of each section that has one (net: 64 MiB of the dump; lifetime: 1/16 and 1/4 GiB)",
    )
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    a = ap.parse_args(argv)
    if a.beliefs < 100:
        ap.error("--beliefs must be at least 100")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    if a.quick:
        a.lifetime_sizes = [0.0625, 0.25]
    if not a.lifetime_sizes or min(a.lifetime_sizes) <= 0:
        ap.error("--lifetime-sizes must be positive sizes in GiB")
    if a.ref and a.src:
        ap.error("give --ref or --src, not both")
    if a.src and not (a.src / "vaultfs" / "vault" / "__init__.py").exists():
        ap.error(f"--src {a.src}: not a vaultfs source tree (no vaultfs/vault/__init__.py)")
    return a


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the scratch directory and running children are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_all()
    try:
        a = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if a.list:
        for s in harness.SECTIONS.values():
            print(f"{s.name:10} {s.description}")
        return 0
    names = a.only or list(harness.SECTIONS)
    unknown = [n for n in names if n not in harness.SECTIONS]
    if unknown:
        print(
            f"scripts/bench: unknown section(s) {', '.join(unknown)}; "
            f"choose from {', '.join(harness.SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="vaultfs-bench-", dir=a.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="vaultfs-bench-"))
    ctx = Context(
        a.beliefs, a.seed, a.repeats, workdir, a.keep, quick=a.quick,
        lifetime_sizes=a.lifetime_sizes,
    )  # fmt: skip
    if a.src:
        ctx.src_root = a.src.resolve()
    if a.ref:
        try:
            a.ref = ctx.export_ref(a.ref)
        except ValueError as e:
            print(f"scripts/bench: {e}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
    if ctx.src_root is not None:
        # `python -m cli.main` puts the current directory first on sys.path, ahead of
        # PYTHONPATH: from the repository root the working tree would run, not the tree asked for
        os.chdir(workdir)
    started = time.time()
    doc: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "args": {
            "beliefs": a.beliefs,
            "seed": a.seed,
            "repeats": a.repeats,
            "sections": names,
            "ref": a.ref,
            "lifetime_sizes": a.lifetime_sizes,
            "quick": a.quick,
        },
        "host": _host(),
        "load_at_start": os.getloadavg(),
        "sections": {},
    }
    results: dict[str, harness.SectionResult] = {}
    try:
        for name in names:
            ctx.log(f"section {name}: {harness.SECTIONS[name].description}")
            try:
                res = harness.SECTIONS[name].fn(ctx)
            except Exception as e:  # a failed section is reported, the others still run
                res = harness.SectionResult(error=f"{type(e).__name__}: {e}")
                ctx.log(f"section {name} failed:\n{traceback.format_exc()}")
            results[name] = res
            doc["sections"][name] = {
                "passed": res.passed,
                "error": res.error,
                "metrics": [m.to_json() for m in res.metrics],
                "details": res.details,
            }
    finally:
        if ctx.keep:
            ctx.log(f"scratch kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if ctx._dataset is not None:
        doc["dataset"] = ctx._dataset.describe()
    doc["seconds"] = time.time() - started
    doc["load_at_end"] = os.getloadavg()
    doc["passed"] = all(r.passed for r in results.values())
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    out = a.out / f"{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(harness.render_table(results))
    for name, res in results.items():
        for m in res.metrics:
            if m.note:
                print(f"  {name} / {m.name}: {m.note}")
        for note in res.details.get("notes", []):
            print(f"note ({name}): {note}")
    print(f"\nresults: {out}")
    print("ALL TARGETS MET" if doc["passed"] else "SOME TARGETS MISSED (see FAIL rows)")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
