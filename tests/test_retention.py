"""Retention (vaultfs/retention.py): the policy keeps exactly what `restic forget` keeps.

A series of snapshots over simulated time is made twice: as a restic repository (`restic backup
--time` of a tiny directory per timestamp) and as plain retention.Snap values. For each policy,
`restic forget --dry-run --json` and retention.apply must keep the same snapshots for the same
reasons. Both run under one TZ with daylight saving time, since periods are local time.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from vaultfs.retention import Duration, Policy, Snap, apply

TZ = "Europe/Berlin"
POLICIES = [
    ["--keep-last", "5"],
    ["--keep-hourly", "6"],
    ["--keep-daily", "7"],
    ["--keep-weekly", "5"],
    ["--keep-monthly", "12"],
    ["--keep-yearly", "10"],
    ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6", "--keep-yearly", "-1"],
    ["--keep-last", "2", "--keep-daily", "-1"],
    ["--keep-within", "10d"],
    ["--keep-within", "1m2d"],
    ["--keep-within", "1y"],
    ["--keep-within", "36h", "--keep-weekly", "3"],
    ["--keep-within-daily", "20d"],
    ["--keep-within-weekly", "3m", "--keep-within-monthly", "1y"],
    ["--keep-hourly", "100"],
]


@pytest.fixture
def local_tz(monkeypatch):
    monkeypatch.setenv("TZ", TZ)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _series(seed: int = 7) -> list[float]:
    """~40 irregular times over two and a half years: bursts within one hour and one day,
    gaps of weeks, and a stretch across the March and October clock changes."""
    rng = random.Random(seed)
    t = time.mktime((2022, 12, 30, 22, 15, 0, 0, 0, -1))
    out = []
    while len(out) < 40:
        t += rng.choice([600, 1800, 3 * 3600, 20 * 3600, 2 * 86400, 9 * 86400, 40 * 86400])
        t += rng.randrange(60)
        out.append(float(int(t)))
    return out


@pytest.fixture(scope="module")
def restic_repo(tmp_path_factory):
    """(env, {restic snapshot id: Snap}) for the series, made with real restic."""
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed")
    root = tmp_path_factory.mktemp("restic")
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    env = {**os.environ, "RESTIC_PASSWORD": "x", "RESTIC_REPOSITORY": str(root / "repo"), "TZ": TZ}
    env["RESTIC_CACHE_DIR"] = str(root / "cache")
    subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
    old = os.environ.get("TZ")
    os.environ["TZ"] = TZ
    time.tzset()
    try:
        times = _series()
        stamps = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in times]
    finally:
        os.environ.pop("TZ") if old is None else os.environ.__setitem__("TZ", old)
        time.tzset()
    by_id: dict[str, Snap] = {}
    for i, (t, stamp) in enumerate(zip(times, stamps, strict=True)):
        res = subprocess.run(
            ["restic", "backup", "--json", "--host", "h", "--time", stamp, "d"],
            env=env, cwd=root, check=True, capture_output=True, text=True,
        )  # fmt: skip
        summary = [json.loads(x) for x in res.stdout.splitlines() if '"summary"' in x][-1]
        by_id[summary["snapshot_id"]] = Snap(f"s{i:02d}", t, "weekly-job" if i % 11 == 0 else None)
    return env, by_id


def _restic_version(env) -> tuple[int, int]:
    out = subprocess.run(["restic", "version"], env=env, capture_output=True, text=True).stdout
    m = re.search(r"restic (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("args", POLICIES, ids=[" ".join(a) for a in POLICIES])
def test_policy_keeps_what_restic_forget_keeps(restic_repo, local_tz, args) -> None:
    env, by_id = restic_repo
    old_restic = _restic_version(env) < (0, 16)
    # restic before 0.16 has no -1 (unlimited, restic PR 2565): a count no series reaches
    theirs_args = [("1000000" if a == "-1" and old_restic else a) for a in args]
    res = subprocess.run(
        ["restic", "forget", "--dry-run", "--json", *theirs_args],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    (group,) = json.loads(res.stdout)
    by_time = {s.time: s.id for s in by_id.values()}
    theirs = {
        by_time[datetime.fromisoformat(r["snapshot"]["time"]).timestamp()]: set(r["matches"])
        for r in group["reasons"]
    }  # (restic 0.14's reasons carry no snapshot id)

    decision = apply(by_id.values(), Policy.from_args(args))
    ours = {s.id: set(reasons) for s, reasons in decision.keep}
    assert {s.id for s in decision.forget} | set(ours) == {s.id for s in by_id.values()}

    oldest = min(by_id.values(), key=lambda s: s.time).id
    if old_restic:
        # restic before 0.16 did not keep the oldest snapshot for an option with periods
        # left (restic PR 4366): that is the one difference allowed
        extra = {r for r in ours.get(oldest, set()) if r.startswith("oldest ")}
        if extra:
            ours[oldest] -= extra
            if not ours[oldest]:
                del ours[oldest]
    assert ours == theirs


def test_keep_name_keeps_matching_snapshots_without_counting(local_tz) -> None:
    snaps = [
        Snap(f"s{i}", 1_700_000_000 + i * 86400, "nightly" if i % 2 else "adhoc") for i in range(6)
    ]
    d = apply(snaps, Policy(last=1, names=("ad*",)))
    kept = {s.id: r for s, r in d.keep}
    assert set(kept) == {"s5", "s0", "s2", "s4"}
    assert kept["s5"] == ["last snapshot"]
    assert kept["s4"] == ["name matches 'ad*'"]


def test_oldest_snapshot_is_kept_while_an_option_has_periods_left(local_tz) -> None:
    day = time.mktime((2024, 5, 2, 9, 0, 0, 0, 0, -1))
    snaps = [Snap("a", day), Snap("b", day + 3600), Snap("c", day + 86400)]
    d = apply(snaps, Policy(daily=5))
    assert [(s.id, r) for s, r in d.keep] == [
        ("c", ["daily snapshot"]),
        ("b", ["daily snapshot"]),
        ("a", ["oldest daily snapshot"]),
    ]


def test_empty_policy_keeps_everything_and_future_snapshots_do_not_move_within(local_tz) -> None:
    now = time.time()
    snaps = [Snap("old", now - 10 * 86400), Snap("new", now - 3600), Snap("future", now + 86400)]
    assert not apply(snaps, Policy()).forget
    d = apply(snaps, Policy(within=Duration.parse("2d")), now=now)
    assert [s.id for s in d.forget] == ["old"]


def test_durations_parse_like_restic_and_step_the_calendar(local_tz) -> None:
    assert Duration.parse("1y2m3d4h") == Duration(1, 2, 3, 4)
    assert Duration.parse("36h") == Duration(hours=36)
    for bad in ("", "5", "1w", "1d1d", "d", "1h2d "):
        with pytest.raises(ValueError):
            Duration.parse(bad)
    # Go's AddDate: 31 March minus one month is "31 February" = 3 March (2023)
    t = time.mktime((2023, 3, 31, 12, 0, 0, 0, 0, -1))
    assert time.localtime(Duration(months=1).before(t))[:4] == (2023, 3, 3, 12)
    # across the clock change: one day back is the same wall-clock hour, 23 or 25 hours
    t = time.mktime((2024, 3, 31, 12, 0, 0, 0, 0, -1))
    assert t - Duration(days=1).before(t) == 23 * 3600


def test_policy_from_args_refuses_what_it_does_not_know() -> None:
    for bad in (["--keep-daly", "3"], ["--keep-daily"], ["--keep-daily", "x"], ["daily", "1"],
                ["--keep-within", "3"], ["--keep-last", "-2"]):  # fmt: skip
        with pytest.raises(ValueError):
            Policy.from_args(bad)
    p = Policy.from_args(["--keep-daily", "7", "--keep-name", "pre-*", "--keep-within", "2d"])
    assert (p.daily, p.names, p.within) == (7, ("pre-*",), Duration(days=2))
    assert p.describe() == "keep 7 daily, all within 2d of the newest, names matching 'pre-*'"


def _restic_kept(times: list[float], args: list[str], root: Path) -> set[float]:
    """The times `restic forget --dry-run` keeps of a restic repository with ``times``."""
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    env = {**os.environ, "RESTIC_PASSWORD": "x", "RESTIC_REPOSITORY": str(root / "repo"), "TZ": TZ}
    env["RESTIC_CACHE_DIR"] = str(root / "cache")
    subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
    for t in times:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
        subprocess.run(
            ["restic", "backup", "-q", "--host", "h", "--time", stamp, "d"],
            env=env, cwd=root, check=True, capture_output=True,
        )  # fmt: skip
    res = subprocess.run(
        ["restic", "forget", "--dry-run", "--json", *args],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    (group,) = json.loads(res.stdout)
    return {datetime.fromisoformat(s["time"]).timestamp() for s in group["keep"]}


def test_forget_command_keeps_what_restic_keeps_then_prunes(tmp_path, local_tz) -> None:
    """Snapshots with injected times (the index's snapshot time column): `vaultfs forget
    --dry-run` keeps what restic keeps; `forget --prune` deletes the rest and frees bytes on
    every remote."""
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed")
    from helpers import PASSPHRASE, run_cli, vaultfs_env

    from vaultfs.backup import backup_paths
    from vaultfs.vault import Vault

    times = _series(seed=3)[::4]
    home = tmp_path / "home"
    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    src = tmp_path / "src"
    src.mkdir()
    with Vault.create(home, remotes, 2, 3, PASSPHRASE, segment_size=1 << 20) as v:
        for i, t in enumerate(times):
            (src / "f.bin").write_bytes(random.Random(i).randbytes(1_200_000))
            uid, _n, _b = backup_paths(v, [src], f"snap{i}")
            with v.index.tx() as db:  # test-only: the snapshot was "made" at time t
                db.execute("UPDATE snapshots SET created=? WHERE uid=?", (t, uid))
        v.flush()
    args = ["--keep-daily", "2", "--keep-weekly", "2", "--keep-monthly", "2"]
    env = vaultfs_env(home, TZ=TZ)
    dry = json.loads(run_cli("forget", "--dry-run", "--json", *args, home=home, env=env).stdout)
    assert {s["time"] for s in dry["keep"]} == _restic_kept(times, args, tmp_path / "restic")
    assert dry["forget"] and len(dry["keep"]) + len(dry["forget"]) == len(times)

    rep = json.loads(run_cli("forget", "--prune", "--json", *args, home=home, env=env).stdout)
    left = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert sorted(s["id"] for s in left) == sorted(s["id"] for s in dry["keep"])
    assert len(rep["prune"]["freed_per_remote"]) == 3
    assert all(b > 0 for b in rep["prune"]["freed_per_remote"].values())
    assert rep["prune"]["garbage_left"] == 0


def test_a_policy_that_would_keep_nothing_is_refused(tmp_path) -> None:
    """A --keep-name glob with a typo matches no snapshot: forget (with --prune, or as a dry
    run) refuses with exit 2 naming the policy, and forgets nothing (restic 0.17's rule)."""
    from helpers import PASSPHRASE, run_cli

    from vaultfs.backup import backup_paths
    from vaultfs.vault import Vault

    home = tmp_path / "home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("x")
    with Vault.create(home, [str(tmp_path / f"r{i}") for i in range(3)], 2, 3, PASSPHRASE) as v:
        for i in range(2):
            backup_paths(v, [src], f"nightly-{i}")
        v.flush()
    for extra in (["--prune"], ["--dry-run"]):
        res = run_cli("forget", "--keep-name", "nigthly*", *extra, home=home, check=2)
        msg = res.stderr.decode()
        assert "refusing to forget all 2 snapshot(s)" in msg and "'nigthly*'" in msg, msg
        assert "nightly-0" in msg and "Traceback" not in msg
    left = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert sorted(s["name"] for s in left) == ["nightly-0", "nightly-1"]
    kept = json.loads(run_cli("forget", "--keep-name", "nightly-1", "--json", home=home).stdout)
    assert [s["name"] for s in kept["keep"]] == ["nightly-1"] and len(kept["forget"]) == 1


def test_a_duration_past_the_calendar_is_refused(tmp_path) -> None:
    """`forget --keep-within` past 1000 years: exit 18 naming the bound, not an
    OverflowError from the calendar."""
    from helpers import PASSPHRASE, run_cli

    from vaultfs.backup import backup_paths
    from vaultfs.vault import Vault

    home = tmp_path / "home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("x")
    with Vault.create(home, [str(tmp_path / f"r{i}") for i in range(3)], 2, 3, PASSPHRASE) as v:
        backup_paths(v, [src], "one")
        v.flush()
    res = run_cli("forget", "--keep-within", "99999999999y", "--dry-run", home=home, check=18)
    msg = res.stderr.decode()
    assert "at most 1000 years" in msg and "Traceback" not in msg, msg
    kept = json.loads(
        run_cli("forget", "--keep-within", "1000y", "--dry-run", "--json", home=home).stdout
    )
    assert [s["name"] for s in kept["keep"]] == ["one"] and kept["forget"] == []
