"""The mount as a service, through a real FUSE mount: `mount.vaultfs` as mount(8) calls it
from /etc/fstab, a clean stop on SIGTERM that stores and uploads what was written, and the
routine while mounted (timed snapshots and an audit by the daemon itself, `vaultfs run`,
`forget --prune`).
Skips where /dev/fuse is missing; every test unmounts, also when it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, mount_pid, needs_fuse, run_cli

pytestmark = needs_fuse


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def vault(tmp_path):
    """(home, mountpoint, remotes) of a 2-of-3 vault; unmounted (or killed) at the end."""
    home, remotes = init_local_vault(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        yield home, mp, remotes
    finally:
        pid = mount_pid(home)
        if os.path.ismount(mp):
            run_cli("umount", str(mp), home=home, check=None, timeout=120)
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        if pid and not _wait_gone(pid, 30):
            os.kill(pid, signal.SIGKILL)


def _helper(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.fstab", *args], env=env, capture_output=True, text=True,
        timeout=180, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip


def test_mount_helper_from_fstab_and_sigterm_stops_cleanly(vault, tmp_path) -> None:
    home, mp, remotes = vault
    secret = tmp_path / "pass"
    secret.write_text(PASSPHRASE + "\n")
    env = {k: v for k, v in os.environ.items() if k != "VAULTFS_PASSPHRASE"}
    bad = _helper(str(home), str(mp), "-o", "ro_please", env=env)
    assert bad.returncode == 1 and "unknown option 'ro_please'" in bad.stderr
    # no passphrase at all: one line naming the option, nothing started
    bare = _helper(str(home), str(mp), "-o", "noauto", env=env)
    assert bare.returncode == 32 and "add passphrase_file=PATH" in bare.stderr, bare.stderr
    assert "Traceback" not in bare.stderr and not os.path.ismount(mp)
    opts = f"noauto,_netdev,x-systemd.automount,passphrase_file={secret},cache_size=16M"
    res = _helper(str(home), str(mp), "-n", "-o", opts, env=env)
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(mp)
    data = os.urandom(3 * 1024 * 1024 + 11)
    (mp / "f.bin").write_bytes(data)  # closed, never fsync'd
    pid = mount_pid(home)
    os.kill(pid, signal.SIGTERM)  # what systemd sends to stop the service
    assert _wait_gone(pid), "the daemon did not exit on SIGTERM"
    assert not os.path.ismount(mp)
    assert not (home / "cache").exists() or not any((home / "cache").iterdir())
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert not any(r["queued_objects"] for r in st["remotes"]), "SIGTERM left uploads queued"
    res = _helper(str(home), str(mp), "-o", f"passphrase_file={secret}", env=env)
    assert res.returncode == 0, res.stderr
    assert (mp / "f.bin").read_bytes() == data


def test_routine_while_mounted(vault, tmp_path) -> None:
    home, mp, _remotes = vault
    run_cli("schedule", "set", "snapshot=1s", "retention=--keep-last 3", "verify=1h",
            home=home)  # fmt: skip
    run_cli("mount", str(mp), home=home)
    (mp / "a.txt").write_text("one")
    deadline = time.monotonic() + 60
    snaps: list[dict] = []
    while time.monotonic() < deadline and len(snaps) < 3:  # the daemon snapshots by itself
        time.sleep(1)
        snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert len(snaps) >= 3 and all(s["name"].startswith("auto-") for s in snaps)

    res = json.loads(run_cli("run", "--json", home=home).stdout)
    assert not res["failed"], res
    st = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    # the audit ran in the mount daemon (by its own pass, or by `run` through it)
    assert st["jobs"]["verify"]["last_success"] is not None, st["jobs"]
    assert st["jobs"]["snapshot"]["last_success"] is not None
    assert st["rpo_seconds"] is not None and st["rpo_seconds"] < 60

    run_cli("schedule", "set", "snapshot=", "retention=", home=home)
    time.sleep(2)  # a pass already under way finishes
    dry = json.loads(run_cli("forget", "--keep-last", "1", "--dry-run", "--json", home=home).stdout)
    assert dry["mounted"] and len(dry["keep"]) == 1
    rep = json.loads(run_cli("forget", "--keep-last", "1", "--prune", "--json", home=home).stdout)
    assert rep["prune"]["garbage_left"] == 0 and "freed_per_remote" in rep["prune"]
    left = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert [s["id"] for s in left] == [dry["keep"][0]["id"]]
    run_cli("snapshot", "delete", left[0]["name"], home=home)  # by name, through the mount
    assert json.loads(run_cli("snapshots", "--json", home=home).stdout) == []
    assert (mp / "a.txt").read_text() == "one"
