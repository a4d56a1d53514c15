"""What `vaultfs status` says about each remote, through the real command line and real
rclone remotes (issue 15's small things): a slow remote a quorum backup left behind is not
`failing`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import run_cli

from bench.netem import Link

FAST = Link(rtt=0.004, rate_bps=400e6)
SLOW = Link(rtt=1.0, rate_bps=1e6)


def _status(home: Path) -> dict:
    return json.loads(run_cli("status", "--json", home=home).stdout)


@pytest.mark.network
def test_a_slow_remote_cut_off_at_quorum_is_behind_not_failing(tmp_path, emulated_network):
    """`backup` ends at quorum while the slow remote's upload still runs (cut off with the
    command): that remote is healthy, only behind. Its health stays as the audit left it and
    no error is recorded (the routine's remote-down alert reads last_error), its queue shows
    what it has not received, and a flush on a fast link places it."""
    net = emulated_network([FAST] * 3)
    home = tmp_path / "home"
    args = ["init", "-k", "2", "-n", "3", "--segment-mib", "1"]
    for r in net.remotes:
        args += ["--remote", r.spec("bkt/v")]
    run_cli(*args, home=home)
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(15)
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(rng.randbytes(700_000))
    run_cli("backup", str(src), home=home)
    run_cli("verify", home=home)
    assert [r["health"] for r in _status(home)["remotes"]] == ["ok"] * 3
    net.set_link(2, SLOW)
    (src / "g.bin").write_bytes(rng.randbytes(2_000_000))
    rep = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)
    assert rep["complete"] is False, rep  # the slow remote was still uploading: cut off
    st = _status(home)
    slow = st["remotes"][2]
    assert slow["queued_objects"] > 0, slow
    assert [r["health"] for r in st["remotes"]] == ["ok"] * 3, st["remotes"]
    assert [r["last_error"] for r in st["remotes"]] == [None] * 3, st["remotes"]
    net.set_link(2, FAST)
    assert json.loads(run_cli("flush", "--json", home=home).stdout)["complete"] is True
    assert _status(home)["remotes"][2]["queued_objects"] == 0
