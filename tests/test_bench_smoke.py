"""Keep scripts/bench from rotting: run its engine section on a tiny dataset.

Asserts the run produced a results file with every expected figure and that both restores
were byte-identical. Timings are not asserted (they belong to scripts/bench, not to tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.pg, pytest.mark.slow]

EXPECTED = {
    "first backup throughput",
    "restore, no local state (3 of 5)",
    "restored bytes identical",
    "new bytes after 1% change",
    "first backup stored (per copy)",
    "backup after 1% change throughput",
    "first backup CPU time (restic / vaultfs)",
    "restore CPU time (restic / vaultfs)",
    "peak RSS, backup",
    "peak RSS, restore",
    "data-path RSS growth, backup (full / quarter input)",
    "data-path RSS growth, restore (full / quarter input)",
}


def test_bench_engine_smoke(tmp_path: Path) -> None:
    if not (REPO_ROOT.parent / "shared" / "datasets" / "make_kb.py").exists():
        pytest.skip("shared/datasets/make_kb.py is not beside the repo")
    out = tmp_path / "results"
    env = {**os.environ, "VAULTFS_BENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "bench", "--beliefs", "300", "--only", "engine"]
    cmd += ["--repeats", "1", "--out", str(out), "--workdir", str(tmp_path / "work")]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    # exit 1 (a performance target missed on 300 rows) is fine here; 2 or a crash is not
    assert res.returncode in (0, 1), res.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, res.stdout + res.stderr
    doc = json.loads(files[0].read_text())
    eng = doc["sections"]["engine"]
    assert eng["error"] is None, eng["error"]
    metrics = {m["name"]: m for m in eng["metrics"]}
    # 300 rows can restore before the first 50 ms memory sample: the section says which
    # growth figures it could not sample instead of making one up
    unsampled = eng["details"]["unsampled"]
    assert all(u.startswith("data-path RSS growth, ") for u in unsampled), unsampled
    assert set(metrics) == {m for m in EXPECTED if not any(m.startswith(u) for u in unsampled)}
    assert metrics["restored bytes identical"]["value"] is True
    for run in eng["details"]["runs"]:
        assert run["steps"]["vaultfs_restore"]["identical"] is True
        assert run["steps"]["restic_restore"]["identical"] is True
        # the change really added data on both sides
        assert run["steps"]["vaultfs_changed"]["added"] > 0
        assert run["steps"]["restic_changed"]["added"] > 0
    assert eng["details"]["restic_version"].startswith("restic ")
    assert doc["dataset"]["beliefs"] == 300
    assert doc["dataset"]["changed_beliefs"] == 3
    assert "engine" in res.stdout  # the table was printed
    # no scratch left behind
    assert not any((tmp_path / "work").iterdir())
