"""The mount daemon does not depend on the working directory of `vaultfs mount`.

- Nothing it (or the processes it starts: multiprocessing's forkserver and its rebuild
  workers) imports comes from that directory: a ``rich.py`` there must not run as the
  process that holds the key.
- It runs in ``/``: a relative remote name means the same as unmounted (the client resolves
  it against its own working directory), a deleted starting directory changes nothing, and
  the daemon does not hold that directory busy.

Through a real FUSE mount and the installed ``vaultfs`` console script, run from chosen
working directories. Skips only where /dev/fuse is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import PASSPHRASE, mount_pid, needs_fuse

from vaultfs.selfexec import cli_argv

pytestmark = needs_fuse

ROOT = Path(__file__).resolve().parent.parent
#: the console script a user runs (its own directory, not the working one, is on its path)
VAULTFS = Path(sys.executable).parent / "vaultfs"


def _env(home: Path) -> dict[str, str]:
    # this tree's code from any working directory (the test run may give PYTHONPATH=.)
    path = [str(ROOT), *(os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]  # fmt: skip
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "VAULTFS_HOME": str(home),
        "VAULTFS_PASSPHRASE": PASSPHRASE,
    }


class Mount:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.mp = root / "mnt"
        self.mp.mkdir()
        self.env = _env(self.home)

    def cli(self, *args: str, cwd: Path, check: int | None = 0) -> subprocess.CompletedProcess:
        assert VAULTFS.exists(), f"{VAULTFS}: the venv's console script (scripts/bootstrap)"
        res = subprocess.run(
            [str(VAULTFS), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        if check is not None and res.returncode != check:
            raise AssertionError(
                f"vaultfs {' '.join(args)} (in {cwd}) exited {res.returncode}, expected "
                f"{check}:\n{res.stdout}{res.stderr}"
            )
        return res

    @property
    def pid(self) -> int | None:
        return mount_pid(self.home)

    def cleanup(self) -> None:
        pid = self.pid
        if os.path.ismount(self.mp):
            res = self.cli("umount", str(self.mp), cwd=self.root, check=None)
            if res.returncode not in (0, 3):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
        if pid:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mount(tmp_path: Path):
    m = Mount(tmp_path)
    m.cli("init", "-k", "2", "-n", "3", "--segment-mib", "1",
          *(a for i in range(3) for a in ("--remote", f"r{i}")), cwd=tmp_path)  # fmt: skip
    try:
        yield m
    finally:
        m.cleanup()


def test_cli_argv_leaves_the_working_directory_off_the_path(tmp_path: Path) -> None:
    (tmp_path / "rich.py").write_text("raise SystemExit('imported from the cwd')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        cli_argv("--help"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "imported from the cwd" not in res.stdout + res.stderr


@pytest.mark.parametrize("foreground", [False, True], ids=["mount", "mount-foreground"])
def test_modules_in_the_working_directory_never_run_in_the_daemon(
    mount: Mount, foreground: bool
) -> None:
    """The review's reproduction: `vaultfs mount ../mnt` from a directory holding rich.py
    and trio.py mounts, and neither file runs in the daemon nor in the forkserver and the
    rebuild workers it starts (a `remote replace` through the mount rebuilds in them). Also
    with `mount --foreground` run there (the console script's own path is safe; the
    forkserver's ``python -c`` would put the working directory first)."""
    proj = mount.root / "proj"
    proj.mkdir()
    marker = mount.root / "imported"
    for mod in ("rich", "trio", "pyeclib", "cli", "vaultfs"):
        (proj / f"{mod}.py").write_text(
            f"open({str(marker)!r}, 'a').write('{mod} ')\n"
            f"raise SystemExit('this is proj/{mod}.py')\n"
        )
    daemon = None
    if foreground:
        log = open(mount.root / "foreground.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(
            [str(VAULTFS), "mount", "--foreground", "../mnt"],
            cwd=proj, env=mount.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        # reap it the moment it exits: `umount` waits until its pid is gone, a zombie too
        reaper = threading.Thread(target=daemon.wait, daemon=True)
        reaper.start()
        deadline = time.monotonic() + 120
        while not os.path.ismount(mount.mp) and daemon.poll() is None:
            assert time.monotonic() < deadline, "the foreground mount did not mount"
            time.sleep(0.1)
        assert daemon.poll() is None, (mount.root / "foreground.log").read_text()
    else:
        mount.cli("mount", "../mnt", cwd=proj)
    try:
        assert os.path.ismount(mount.mp)
        (mount.mp / "data.bin").write_bytes(os.urandom(3 << 20))
        mount.cli("flush", cwd=proj)
        # rebuild r2's shards onto r3: the daemon's clean worker pool (forkserver) runs
        res = mount.cli("remote", "replace", "../r2", "../r3", "--json", cwd=proj)
        assert json.loads(res.stdout)["rebuilt"], res.stdout
        assert not marker.exists(), f"ran from the working directory: {marker.read_text()}"
        mount.cli("umount", str(mount.mp), cwd=proj)
    finally:
        if daemon is not None:
            mount.cleanup()
            reaper.join(timeout=60)
            if daemon.poll() is None:
                daemon.kill()
                reaper.join()
    logs = [mount.home / "mount.log", mount.root / "foreground.log"]
    assert not any("this is proj" in p.read_text() for p in logs if p.exists())


def _same(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> None:
    """The same exit code and the same messages (stdout: a repair's report may differ)."""
    assert (a.returncode, a.stderr) == (b.returncode, b.stderr)


def test_relative_remote_names_mean_the_clients_directory(mount: Mount) -> None:
    """Mounted from elsewhere, run from the vault's directory: `verify --remote r1`,
    `remote replace r2 r3` and `remote remove` resolve r1/r2 as unmounted does."""
    other = mount.root / "elsewhere"
    other.mkdir()
    here = mount.root
    unmounted_ok = mount.cli("verify", "--remote", "r1", "--json", cwd=here)
    unmounted_bad = mount.cli("verify", "--remote", "r9", cwd=here, check=14)
    mount.cli("mount", str(mount.mp), cwd=other)
    (mount.mp / "f").write_bytes(os.urandom(1 << 20))
    mount.cli("flush", cwd=here)
    mounted_ok = mount.cli("verify", "--remote", "r1", "--json", cwd=here)
    assert (
        [r["remote"] for r in json.loads(mounted_ok.stdout)["remotes"]]
        == [r["remote"] for r in json.loads(unmounted_ok.stdout)["remotes"]]
        == [str(here / "r1")]
    )
    _same(mount.cli("verify", "--remote", "r9", cwd=here, check=14), unmounted_bad)
    mount.cli("remote", "replace", "r2", "r3", cwd=here)
    mount.cli("remote", "remove", "r3", cwd=here)
    rows = json.loads(mount.cli("remote", "list", "--json", cwd=here).stdout)
    members = {r["remote"]: r["member"] for r in rows}
    assert members == {
        str(here / "r0"): "active",
        str(here / "r1"): "active",
        str(here / "r2"): "removed",
        str(here / "r3"): "removed",
    }, members
    mount.cli("umount", str(mount.mp), cwd=here)


def test_a_deleted_starting_directory_changes_nothing(mount: Mount) -> None:
    """`vaultfs mount` run from a directory deleted afterwards: repair and verify answer as
    unmounted, and the daemon runs in / (it holds no directory of the user's busy)."""
    gone = mount.root / "gone"
    gone.mkdir()
    mount.cli("mount", "../mnt", cwd=gone)
    (mount.mp / "f").write_bytes(os.urandom(2 << 20))
    mount.cli("flush", cwd=mount.root)
    for p in sorted((mount.root / "r0").rglob("*"))[-3:]:  # something for repair to rebuild
        if p.is_file():
            p.unlink()
    gone.rmdir()
    mounted = [
        mount.cli("repair", cwd=mount.root, check=None),
        mount.cli("verify", "--remote", "r9", cwd=mount.root, check=None),
    ]
    pid = mount.pid
    cwd = pid and os.readlink(f"/proc/{pid}/cwd")
    mount.cli("umount", str(mount.mp), cwd=mount.root)
    unmounted = [
        mount.cli("repair", cwd=mount.root, check=None),
        mount.cli("verify", "--remote", "r9", cwd=mount.root, check=14),
    ]
    assert "FileNotFoundError" not in mounted[0].stderr, mounted[0].stderr
    for a, b in zip(mounted, unmounted, strict=True):
        _same(a, b)
    assert cwd == "/"
