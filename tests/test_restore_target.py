"""Restoring with ``--force`` into a target that already holds things: a hard link to a file
outside the target is replaced, never written through; a symlink (to a file or a directory)
or a directory where the snapshot has a file is refused with one line naming it and the way
out (exit 18), and whatever it points to is untouched. Sparse files come back sparse. A
killed restore's staging directory is removed by the next restore."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import PASSPHRASE, REPO_ROOT, init_local_vault, run_cli, vaultfs_env

from vaultfs.restore import SHM, STAGING_PREFIXES


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    """A 1-of-2 vault over two local directories (its home), with one snapshot of ``src``:
    ``f.txt``, and ``a`` and ``b`` one hard-linked file of mode 640."""
    home = init_local_vault(tmp_path, 1, 2, segment_mib=None).home
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("from the snapshot\n")
    (src / "a").write_text("linked\n")
    os.link(src / "a", src / "b")
    os.chmod(src / "a", 0o640)
    os.utime(src / "a", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    run_cli("backup", str(src), home=home)
    return home


def test_restore_over_a_symlinked_file_is_refused_with_the_way_out(
    tmp_path: Path, vault: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    to = tmp_path / "to"
    (to / "src").mkdir(parents=True)
    (to / "src" / "f.txt").symlink_to(outside)
    res = run_cli("restore", "--to", str(to), "--force", home=vault, check=18)
    said = res.stderr.decode()
    assert f"{to / 'src' / 'f.txt'} is a symlink (to {outside})" in said, said
    assert "Remove or rename it" in said and "Traceback" not in said
    assert "Too many levels" not in said
    assert outside.read_text() == "not yours\n"


def test_force_replaces_a_hard_link_to_a_file_outside_and_leaves_that_file_alone(
    tmp_path: Path, vault: Path
) -> None:
    """A target made with `cp -al` (rsnapshot) shares inodes with files elsewhere: the
    restore replaces the entry, and the snapshot's own hard links, modes and times hold."""
    keep = tmp_path / "keep"
    keep.write_text("PRECIOUS\n")
    os.chmod(keep, 0o604)
    to = tmp_path / "to"
    (to / "src").mkdir(parents=True)
    for name in ("f.txt", "a", "b"):
        os.link(keep, to / "src" / name)
    run_cli("restore", "--to", str(to), "--force", home=vault)
    assert keep.read_text() == "PRECIOUS\n"
    st = keep.stat()
    assert (st.st_nlink, st.st_mode & 0o777) == (1, 0o604)
    assert (to / "src" / "f.txt").read_text() == "from the snapshot\n"
    a, b = (to / "src" / "a").stat(), (to / "src" / "b").stat()
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert (a.st_mode & 0o777, a.st_mtime_ns) == (0o640, 1_600_000_000_000_000_000)
    assert (to / "src" / "b").read_text() == "linked\n"


def test_force_over_a_symlinked_directory_is_refused_like_a_symlinked_file(
    tmp_path: Path, vault: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f.txt").write_text("not yours\n")
    to = tmp_path / "to"
    to.mkdir()
    (to / "src").symlink_to(elsewhere)
    res = run_cli("restore", "--to", str(to), "--force", home=vault, check=18)
    said = res.stderr.decode()
    assert f"{to / 'src'} is a symlink (to {elsewhere})" in said, said
    assert "Remove or rename it" in said and "Traceback" not in said
    assert len(said.strip().splitlines()) == 1, said
    assert sorted(os.listdir(elsewhere)) == ["f.txt"]
    assert (elsewhere / "f.txt").read_text() == "not yours\n"


def test_force_over_a_symlink_inside_the_target_is_refused_too(tmp_path: Path, vault: Path) -> None:
    """A symlink that stays inside the target is still not written through."""
    to = tmp_path / "to"
    (to / "other").mkdir(parents=True)
    (to / "src").symlink_to("other")
    res = run_cli("restore", "--to", str(to), "--force", "--include", "src/f.txt", home=vault,
                  check=18)  # fmt: skip
    assert f"{to / 'src'} is a symlink (to other)" in res.stderr.decode(), res.stderr
    assert os.listdir(to / "other") == []


@pytest.mark.parametrize("kind", ["directory where a file goes", "file where a directory goes"])
def test_force_says_what_is_in_the_way_and_what_to_do(
    tmp_path: Path, vault: Path, kind: str
) -> None:
    to = tmp_path / "to"
    if kind.startswith("directory"):
        (to / "src" / "f.txt").mkdir(parents=True)
        (to / "src" / "f.txt" / "mine").write_text("mine\n")
        blocked, what = to / "src" / "f.txt", "is a directory where the snapshot has a file"
    else:
        to.mkdir()
        (to / "src").write_text("mine\n")
        blocked, what = to / "src", "is a file where the snapshot has a directory"
    res = run_cli("restore", "--to", str(to), "--force", home=vault, check=18)
    said = res.stderr.decode()
    assert f"{blocked} {what}" in said, said
    assert "move it away, or restore into an empty directory" in said, said
    assert len(said.strip().splitlines()) == 1 and "Traceback" not in said, said
    assert "mine\n" in {p.read_text() for p in (blocked, blocked / "mine") if p.is_file()}


def test_a_sparse_file_restores_sparse_with_the_same_bytes(tmp_path: Path) -> None:
    """50 MiB, data only at both ends: the zero chunks are left as holes of the new file."""
    home = init_local_vault(tmp_path, 1, 2, segment_mib=None).home
    src = tmp_path / "src"
    src.mkdir()
    size = 50 << 20
    with open(src / "sparse", "wb") as f:
        f.write(b"head" * 1000)
        f.truncate(size)
        f.seek(size - 4000)
        f.write(b"tail" * 1000)
    run_cli("backup", str(src), home=home)
    to = tmp_path / "to"
    run_cli("restore", "--to", str(to), home=home)
    out = to / "src" / "sparse"
    st = out.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 <= 1 << 20, st.st_blocks  # two chunks' worth, not 50 MiB
    assert out.read_bytes() == (src / "sparse").read_bytes()


def test_a_decoder_refuses_a_file_swapped_for_a_hard_link(tmp_path: Path) -> None:
    """The decoders reopen each file by name: one swapped since for a hard link to a file
    elsewhere is refused, and that file keeps its bytes."""
    from vaultfs.errors import InputError
    from vaultfs.restore import _FdCache

    keep = tmp_path / "keep"
    keep.write_text("PRECIOUS\n")
    os.link(keep, tmp_path / "f")
    fds = _FdCache()
    with pytest.raises(InputError, match="replaced by a hard link"):
        fds.get(str(tmp_path / "f"))
    (tmp_path / "g").write_text("")
    assert fds.get(str(tmp_path / "g")) == fds.get(str(tmp_path / "g"))
    fds.close()
    assert keep.read_text() == "PRECIOUS\n"


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
    vault = init_local_vault(tmp_path, 1, 2, segment_mib=None)
    home, remotes = vault.home, vault.specs
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
