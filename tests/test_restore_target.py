"""Restoring over a target that holds a symlink where a file goes: a clear refusal naming the
path, its target and what to do (exit 18), and the file the symlink points to untouched.
A killed restore's staging directory is removed by the next restore."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers import PASSPHRASE, REPO_ROOT, run_cli, vaultfs_env

from vaultfs.restore import SHM, STAGING_PREFIXES


def test_restore_over_a_symlinked_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli("init", "-k", "1", "-n", "2", "--remote", str(tmp_path / "r0"),
            "--remote", str(tmp_path / "r1"), home=home)  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("from the snapshot\n")
    run_cli("backup", str(src), home=home)
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    to = tmp_path / "to"
    (to / "src").mkdir(parents=True)
    (to / "src" / "f.txt").symlink_to(outside)
    res = run_cli("restore", "--to", str(to), "--force", home=home, check=18)
    said = res.stderr.decode()
    assert f"{to / 'src' / 'f.txt'} is a symlink (to {outside})" in said, said
    assert "Remove or rename it" in said and "Traceback" not in said
    assert "Too many levels" not in said
    assert outside.read_text() == "not yours\n"


def _staged(pid: int) -> list[Path]:
    """The staging directories restore process ``pid`` made (/dev/shm or the temporary
    directory, whichever it chose)."""
    return [
        d
        for parent in (SHM, tempfile.gettempdir())
        for prefix in STAGING_PREFIXES
        for d in Path(parent).glob(f"{prefix}{pid}-*")
    ]


def _restore_at_the_prompt(home: Path, args: list[str]) -> tuple[subprocess.Popen, int]:
    """A `vaultfs restore` stopped at its passphrase prompt (a terminal of its own, no
    passphrase in the environment): it has made its read-ahead staging directory by then.
    Returns the process (its stdout open) and the terminal's master side."""
    master, slave = os.openpty()
    env = vaultfs_env(home)
    del env["VAULTFS_PASSPHRASE"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "restore", *args],
        cwd=REPO_ROOT, env=env, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal: it prompts on stdout, reads the pty
    )  # fmt: skip
    os.close(slave)
    assert proc.stdout is not None
    said = b""
    while b"Passphrase" not in said:
        got = os.read(proc.stdout.fileno(), 4096)
        if not got:
            _end(proc, master)
            raise AssertionError(f"restore ended before its prompt: {said!r}")
        said += got
    return proc, master


def _end(proc: subprocess.Popen, master: int) -> int:
    """Close the terminal, kill ``proc`` if it still runs; its exit code."""
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    return rc


def test_a_killed_restores_staging_is_removed_by_the_next_restore_not_a_live_ones(
    tmp_path: Path,
) -> None:
    """A restore killed with -9 leaves its staging directory (in /dev/shm when roomy); the
    next restore removes it, and leaves alone the one of a restore still running."""
    home = tmp_path / "home"
    remotes = [str(tmp_path / "r0"), str(tmp_path / "r1")]
    run_cli("init", "-k", "1", "-n", "2", "--remote", remotes[0], "--remote", remotes[1],
            home=home)  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(200_000))
    run_cli("backup", str(src), home=home)
    common = ["--from", remotes[0], "--from", remotes[1], "--keyfile", str(home / "key.json")]
    nobody = tmp_path / "elsewhere"  # a machine with no vault: the disaster path

    killed, m1 = _restore_at_the_prompt(nobody, [*common, "--to", str(tmp_path / "a")])
    left = _staged(killed.pid)
    assert _end(killed, m1) == -9 and left
    assert all(d.is_dir() for d in left)  # no clean-up ran

    live, m2 = _restore_at_the_prompt(nobody, [*common, "--to", str(tmp_path / "b")])
    try:
        running = _staged(live.pid)
        assert running
        run_cli("restore", *common, "--to", str(tmp_path / "c"), home=nobody)
        assert not any(d.exists() for d in left)
        assert all(d.is_dir() for d in running)
        os.write(m2, f"{PASSPHRASE}\n".encode())
        assert live.wait(timeout=300) == 0
    finally:
        _end(live, m2)
    assert (tmp_path / "b" / "src" / "f.bin").read_bytes() == (src / "f.bin").read_bytes()
    assert not _staged(live.pid)
