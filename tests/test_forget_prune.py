"""`vaultfs forget --prune` and `--dry-run` through the real CLI, unmounted and on a real FUSE
mount (local-directory remotes): it reports and exits as `vaultfs prune` does when deletions
wait (a remote failing), a busy daemon refuses the whole command before anything is
forgotten, a mounted vault needs no passphrase (`forget`, `status`, `snapshots`), and `--dry-run --prune` shows what the prune
would free. The review that found these: "forget --prune exits 0 while objects wait"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    break_remote,
    init_local_vault,
    mend_remote,
    needs_fuse,
    run_cli,
    unmount,
    vaultfs_env,
)

MiB = 1024 * 1024


def _no_passphrase(home: Path) -> dict[str, str]:
    env = vaultfs_env(home)
    del env["VAULTFS_PASSPHRASE"]
    return env


def _two_backups(tmp_path: Path, home: Path) -> None:
    """Two snapshots sharing nothing: forgetting the older one frees its data."""
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "data.bin").write_bytes(os.urandom(3 * MiB))
        run_cli("backup", str(src), "--name", f"b{i}", home=home)


def _check_deferred(res: subprocess.CompletedProcess, remote: Path) -> None:
    """The prune's own report: objects wait for a later prune, the failing remote named."""
    out, said = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 3, (out, said)
    assert "forgotten" in out  # the forget table is there too
    assert "wait for a later prune" in out, out
    why = ("old objects kept", "could not be deleted", "wait for queued uploads")
    assert any(w in said for w in why), said
    assert said.count(f"warning: {remote}:") == 1, said  # named once, not once per step


def test_forget_prune_exits_3_and_names_the_remote_when_deletions_wait(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path)
    _two_backups(tmp_path, home)
    break_remote(remotes[2])
    res = run_cli("forget", "--keep-last", "1", "--prune", home=home, check=None)
    _check_deferred(res, remotes[2])
    # the same verdict as a plain prune right after
    again = run_cli("prune", home=home, check=3)
    assert "wait for a later prune" in again.stdout.decode()
    mend_remote(remotes[2])
    rep = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert rep["garbage_left"] == 0


def test_forget_prune_json_exits_3_with_the_prune_report(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path)
    _two_backups(tmp_path, home)
    break_remote(remotes[0])
    res = run_cli("forget", "--keep-last", "1", "--prune", "--json", home=home, check=3)
    rep = json.loads(res.stdout)
    assert [s["name"] for s in rep["forget"]] == ["b0"]
    assert rep["prune"]["garbage_left"] > 0 and str(remotes[0]) in rep["prune"]["errors"]


def test_forget_dry_run_prune_shows_what_the_prune_would_free(tmp_path: Path) -> None:
    home, _remotes = init_local_vault(tmp_path)
    _two_backups(tmp_path, home)
    args = ("forget", "--keep-last", "1", "--prune")
    dry = json.loads(run_cli(*args, "--dry-run", "--json", home=home).stdout)
    assert dry["dry_run"] and dry["prune"]["dry_run"]
    assert [s["name"] for s in dry["forget"]] == ["b0"]
    # counted as if b0 were gone: the 3 MiB only it holds
    assert dry["prune"]["bytes_freed"] == 3 * MiB, dry["prune"]
    human = run_cli(*args, "--dry-run", home=home).stdout.decode()
    assert "as if the 1 snapshot(s) above were forgotten" in human, human
    assert "would free" in human and f"{3 * MiB:,} bytes of data" in human, human
    # nothing changed; the real run frees what the dry run said
    assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 2
    real = json.loads(run_cli(*args, "--json", home=home).stdout)
    assert real["prune"]["bytes_freed"] == dry["prune"]["bytes_freed"]
    assert real["prune"]["freed_per_remote"] == dry["prune"]["freed_per_remote"]


def test_forget_keeps_the_newest_snapshot_the_remotes_restore_alone(tmp_path: Path) -> None:
    """Two of three remotes down (k=2): newer snapshots wait in the local queue, and only the
    first is restorable from the remotes. `forget --keep-last 1` (dry run, human and JSON, and
    the real run) keeps that one too, saying why, where restic's rule would forget it; it
    stays the recovery point, and with the remotes back the rule keeps nothing extra."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("placed\n")
    first = json.loads(run_cli("backup", str(src), "--name", "placed", "--json", home=home).stdout)
    for r in remotes[1:]:
        break_remote(r)
    for i in range(2):
        (src / "f.txt").write_text(f"queued {i}\n")
        run_cli("backup", str(src), "--name", f"queued-{i}", home=home, check=3)
    point = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert point["newest_restorable_snapshot"] == first["snapshot"]

    args = ("forget", "--keep-last", "1")
    human = run_cli(*args, "--dry-run", home=home).stdout.decode()
    assert re.search(r"placed .*keep .*newest restorable from the remotes", human), human
    assert "keep 2 snapshot(s), would forget 1" in human, human
    dry = json.loads(run_cli(*args, "--dry-run", "--json", home=home).stdout)
    kept = {s["name"]: s["reasons"] for s in dry["keep"]}
    assert kept == {"queued-1": ["last snapshot"], "placed": ["newest restorable from the remotes"]}
    assert [s["name"] for s in dry["forget"]] == ["queued-0"]
    real = json.loads(run_cli(*args, "--json", home=home, check=3).stdout)  # still queued
    assert real["keep"] == dry["keep"] and real["forget"] == dry["forget"]
    left = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert [s["name"] for s in left] == ["placed", "queued-1"]
    point = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert point["newest_restorable_snapshot"] == first["snapshot"]

    for r in remotes[1:]:
        mend_remote(r)
    run_cli("flush", home=home)  # queued-1 is restorable now: "placed" is no longer held
    again = json.loads(run_cli(*args, "--json", home=home).stdout)
    assert [s["name"] for s in again["forget"]] == ["placed"]
    assert [s["reasons"] for s in again["keep"]] == [["last snapshot"]]


# -- mounted ------------------------------------------------------------------------------------
@pytest.fixture
def mounted(tmp_path):
    """(home, mountpoint, remotes) of a mounted 2-of-3 vault holding two snapshots that
    share nothing (b0 older)."""
    home, remotes = init_local_vault(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", "--cache-size", "64M", str(mp), home=home)
    try:
        for i in range(2):
            (mp / "data.bin").write_bytes(os.urandom(4 * MiB))
            run_cli("snapshot", "--name", f"b{i}", home=home)
        (mp / "data.bin").unlink()
        run_cli("flush", home=home)
        yield home, mp, remotes
    finally:
        unmount(mp, home)


def _names(home: Path) -> list[str]:
    """The snapshots' names, read as a mounted vault lists them: without the passphrase."""
    env = _no_passphrase(home)
    return [
        s["name"] for s in json.loads(run_cli("snapshots", "--json", home=home, env=env).stdout)
    ]


@needs_fuse
def test_mounted_forget_prune_exits_3_when_deletions_wait_and_needs_no_passphrase(
    mounted,
) -> None:
    home, _mp, remotes = mounted
    env = _no_passphrase(home)
    human = run_cli("status", home=home, env=env).stdout.decode()  # no passphrase either
    assert "snapshots: 2" in human, human
    args = ("forget", "--keep-last", "1", "--prune")
    dry = json.loads(run_cli(*args, "--dry-run", "--json", home=home, env=env).stdout)
    assert dry["mounted"] and [s["name"] for s in dry["forget"]] == ["b0"]
    assert dry["prune"]["dry_run"] and dry["prune"]["bytes_freed"] == 4 * MiB, dry["prune"]
    assert _names(home) == ["b0", "b1"]
    break_remote(remotes[1])
    res = run_cli(*args, home=home, env=env, check=None)
    _check_deferred(res, remotes[1])
    assert _names(home) == ["b1"]
    run_cli("prune", home=home, env=env, check=3)
    mend_remote(remotes[1])
    rep = json.loads(run_cli("prune", "--json", home=home, env=env).stdout)
    assert rep["garbage_left"] == 0


@needs_fuse
def test_mounted_forget_prune_beside_a_running_job_forgets_nothing(mounted, tmp_path) -> None:
    home, mp, _remotes = mounted
    (mp / "more.bin").write_bytes(os.urandom(6 * MiB))  # for the audit to read slowly
    run_cli("flush", home=home)
    run_cli("schedule", "set", "maintenance_rate=1M", home=home)
    env = _no_passphrase(home)
    verify = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "verify", "--read-all"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        job = None
        while job is None and time.monotonic() < deadline:
            st = json.loads(run_cli("status", "--json", home=home, env=env).stdout)
            job = st["mount"]["maintenance"]
            if job is None:
                time.sleep(0.1)
        assert job is not None and job["job"] == "verify"
        res = run_cli("forget", "--keep-last", "1", "--prune", home=home, env=env, check=17)
        assert "busy: verify running" in res.stderr.decode()
        assert _names(home) == ["b0", "b1"]  # refused as a whole: nothing forgotten
        # a forget without --prune only forgets, beside the running job
        dry = run_cli("forget", "--keep-last", "1", "--dry-run", home=home, env=env)
        assert "would forget 1" in dry.stdout.decode()
        assert verify.poll() is None, "the audit ended too soon for this test"
    finally:
        verify.wait(timeout=300)
    run_cli("schedule", "set", "maintenance_rate=", home=home)
    res = run_cli("forget", "--keep-last", "1", "--prune", home=home, env=env)
    assert "freed" in res.stdout.decode() and _names(home) == ["b1"]
