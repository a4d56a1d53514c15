"""Scratch directories of killed commands (vaultfs/scratch.py): a command's scratch under
the temporary directory carries its pid, goes when it ends, and the next command that makes
scratch of the same kind removes what a killed one (kill -9: no clean-up runs) left; never a
live process's directory, never through a symlink, never another user's."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT, needs_fuse, run_cli, tree_digest, vaultfs_env

from vaultfs.pgembed import PG_PREFIX
from vaultfs.scratch import owned_scratch, sweep_dead_dirs


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    """The pid of a process running for the length of the test."""
    p = subprocess.Popen(["sleep", "600"])
    yield p.pid
    p.kill()
    p.wait()


def _plant(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    (d / "shard").write_bytes(b"x" * 100)
    return d


def test_a_sweep_removes_only_dead_processes_directories_of_its_prefix(tmp_path, live_pid):
    top, outside = tmp_path / "tmp", tmp_path / "outside"
    top.mkdir()
    _plant(tmp_path, "outside")
    dead = _dead_pid()
    gone = [_plant(top, f"vaultfs-repair-{dead}-a1b2"), _plant(top, f"vaultfs-repair-{dead}-c3")]
    kept = [
        _plant(top, f"vaultfs-repair-{live_pid}-x"),  # another command at work now
        _plant(top, f"vaultfs-repair-{os.getpid()}-x"),  # this process's own
        _plant(top, "vaultfs-repair-abcd1234"),  # an older version's: no pid
        _plant(top, f"vaultfs-repair-{dead}"),  # no random part: not a scratch name
        _plant(top, f"vaultfs-audit-{dead}-x"),  # another prefix
        _plant(top, "vaultfs-repair-0-x"),  # pid 0 names no process
    ]
    link = top / f"vaultfs-repair-{dead}-link"
    link.symlink_to(outside, target_is_directory=True)  # never followed
    afile = top / f"vaultfs-repair-{dead}-file"
    afile.write_bytes(b"not a directory")
    if os.geteuid() == 0:  # another user's: not ours to judge
        theirs = _plant(top, f"vaultfs-repair-{dead}-theirs")
        os.chown(theirs, 65534, 65534)
        kept.append(theirs)

    assert sorted(sweep_dead_dirs("vaultfs-repair-", str(top))) == sorted(gone)
    assert not any(d.exists() for d in gone)
    assert all((d / "shard").is_file() for d in kept)
    assert link.is_symlink() and (outside / "shard").is_file() and afile.is_file()
    # a shorter prefix does not reach into longer ones: "repair" is no pid
    assert sweep_dead_dirs("vaultfs-", str(top)) == []
    assert all(d.is_dir() for d in kept)
    with pytest.raises(ValueError, match="not a path"):
        sweep_dead_dirs("../vaultfs-repair-", str(top))
    assert sweep_dead_dirs("vaultfs-repair-", str(tmp_path / "absent")) == []


def test_owned_scratch_is_named_with_the_pid_and_removed_however_the_block_ends(tmp_path):
    with owned_scratch("vaultfs-t-", str(tmp_path)) as d:
        assert d.parent == tmp_path and d.name.startswith(f"vaultfs-t-{os.getpid()}-")
        assert (d.stat().st_mode & 0o777) == 0o700
        (d / "sub").mkdir()
        (d / "sub" / "f").write_bytes(b"x")
        (d / "sub").chmod(0o500)  # read-only inside (a drill restores modes)
    assert not d.exists()
    with pytest.raises(RuntimeError), owned_scratch("vaultfs-t-", str(tmp_path)) as d:
        raise RuntimeError("the command failed")
    assert not d.exists()


def _vault(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    home = tmp_path / "home"
    remotes = [tmp_path / f"r{i}" for i in range(3)]
    args = ["init", "-k", "2", "-n", "3", "--segment-mib", "1"]
    for r in remotes:
        args += ["--remote", str(r)]
    run_cli(*args, home=home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random.Random(7).randbytes(3_500_000))
    run_cli("backup", str(src), home=home)
    return home, remotes, src


def _scratch(top: Path) -> list[str]:
    return sorted(p.name for p in top.iterdir())


def test_a_repair_killed_mid_rebuild_leaves_its_scratch_and_the_next_repair_removes_it(
    tmp_path, live_pid
):
    """kill -9 of `vaultfs repair` while it rebuilds (its sources downloaded into its
    scratch, before the batch's transaction): the directory stays, named with the dead pid;
    the next `vaultfs repair` removes it, finishes the job and leaves nothing of its own.
    A running command's directory of the same kind, and a symlink named like a dead one's,
    stay."""
    home, remotes, src = _vault(tmp_path)
    top = tmp_path / "tmp"  # this test's temporary directory ($TMPDIR of its commands)
    top.mkdir()
    live = _plant(top, f"vaultfs-repair-{live_pid}-busy")
    outside = _plant(tmp_path, "outside")
    link = top / f"vaultfs-repair-{_dead_pid()}-link"
    link.symlink_to(outside, target_is_directory=True)
    for p in (remotes[1] / "data").iterdir():
        p.unlink()
    env = vaultfs_env(home, TMPDIR=str(top), VAULTFS_READ_IN_PLACE="0")  # sources downloaded
    killed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "killpoint.py"),
         "vaultfs.repair:_commit_batch:before", "repair"],
        env=env, cwd=REPO_ROOT, capture_output=True, start_new_session=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr.decode()
    left = [p for p in top.glob("vaultfs-repair-*") if p not in (live, link)]
    assert len(left) == 1, _scratch(top)
    named = re.fullmatch(r"vaultfs-repair-(\d+)-\w+", left[0].name)
    assert named, f"{left[0].name}: no pid in the name"
    pid = int(named[1])
    assert pid != live_pid and not os.path.exists(f"/proc/{pid}")
    assert any(f.is_file() for f in left[0].rglob("*")), "the sources it downloaded"

    rep = json.loads(run_cli("repair", "--json", home=home, env=env).stdout)
    assert rep["rebuilt"] > 0, rep
    assert not left[0].exists()
    assert (live / "shard").is_file() and (outside / "shard").is_file() and link.is_symlink()
    assert _scratch(top) == sorted([live.name, link.name])  # and none of its own
    assert json.loads(run_cli("verify", "--read-all", "--json", home=home).stdout)["clean"]
    (remotes[0]).rename(tmp_path / "r0-away")  # the rebuilt remote restores with one other
    run_cli("restore", "--to", str(tmp_path / "out"), home=home)
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_verify_and_restore_sweep_their_kinds_of_scratch_and_leave_none(tmp_path, live_pid):
    """The other commands making scratch in the temporary directory use the same mechanism:
    an audit (`vaultfs-audit-`), a restore from the remotes (`vaultfs-work-`, its index
    fetch `vaultfs-idx-`) remove what killed ones left of their kind, keep a running one's,
    and leave none of their own behind."""
    home, remotes, src = _vault(tmp_path)
    top = tmp_path / "tmp"
    top.mkdir()
    dead = _dead_pid()
    kinds = ("vaultfs-audit-", "vaultfs-work-", "vaultfs-idx-")
    for kind in kinds:
        _plant(top, f"{kind}{dead}-left")
        _plant(top, f"{kind}{live_pid}-busy")
    env = vaultfs_env(home, TMPDIR=str(top))
    rep = json.loads(run_cli("verify", "--read-all", "--json", home=home, env=env).stdout)
    assert rep["clean"], rep
    assert not (top / f"vaultfs-audit-{dead}-left").exists()
    assert (top / f"vaultfs-work-{dead}-left").is_dir()  # not an audit's: not swept by one
    nohome = tmp_path / "nohome"  # a restore from the remotes and the key alone
    run_cli("restore", "--from", str(remotes[0]), "--from", str(remotes[2]),
            "--to", str(tmp_path / "out"), "--keyfile", str(home / "key.json"),
            home=nohome, env=vaultfs_env(nohome, TMPDIR=str(top)))  # fmt: skip
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert _scratch(top) == sorted(f"{kind}{live_pid}-busy" for kind in kinds)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_an_embedded_postgres_whose_owner_was_killed_is_stopped_and_swept(tmp_path):
    """The embedded Postgres (vaultfs/pgembed.py: the demo, benchmarks, tests) outlives an
    owner killed with kill -9: the next embedded server started stops that orphan and removes
    its directory; the new one's goes when it stops."""
    # not under tmp_path: the server runs as its own user (we are root), and any pytest
    # session starting meanwhile makes /tmp/pytest-of-root private again (mode 0700)
    top = Path(tempfile.mkdtemp(prefix="vaultfs-test-pgtop-"))
    try:
        _orphan_is_swept(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _orphan_is_swept(top: Path) -> None:
    env = dict(os.environ, TMPDIR=str(top), PYTHONPATH=str(REPO_ROOT))
    code = (
        "import sys, time; from vaultfs.pgembed import EmbeddedPostgres; pg = EmbeddedPostgres();"
        "pg.sql('SELECT 1'); print(pg.basedir, pg._srv.get_pid(), flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    try:
        line = owner.stdout.readline().split()  # type: ignore[union-attr]
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()  # type: ignore[union-attr]
    assert len(line) == 2, "the embedded server did not start"
    basedir, postmaster = Path(line[0]), int(line[1])
    try:
        assert basedir.parent == top and basedir.name.startswith(f"{PG_PREFIX}{owner.pid}-")
        assert _alive(postmaster), "kill -9 of the owner leaves its server running"

        code = (
            "from vaultfs.pgembed import EmbeddedPostgres; pg = EmbeddedPostgres();"
            "print(pg.sql('SELECT 2')[0][0], flush=True); pg.stop()"
        )
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0 and res.stdout.strip() == "2", res.stderr
        assert not _alive(postmaster) and not basedir.exists()
        assert list(top.glob(f"{PG_PREFIX}*")) == []  # (the package's socket dirs aside)
    finally:
        if _alive(postmaster):  # the test failed: leave no server running
            os.kill(postmaster, signal.SIGQUIT)


@needs_fuse
def test_a_mount_daemon_that_ran_a_repair_leaves_no_multiprocessing_directory(tmp_path, live_pid):
    """A repair in the mount daemon rebuilds in a forkserver's pool, whose socket lives in
    multiprocessing's temporary directory. That was ``pymp-*``, removed only by an atexit
    finalizer the daemon's os._exit skips: every such daemon left one behind. Now it is the
    daemon's scratch, ``vaultfs-mp-<pid>-*``: gone when the daemon ends, and one a killed
    daemon left is swept by the next pool (a running process's stays)."""
    home, remotes, _src = _vault(tmp_path)
    # not under tmp_path: the forkserver's socket path must fit in 108 bytes
    top = Path(tempfile.mkdtemp(prefix="vfmp-"))
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = vaultfs_env(home, TMPDIR=str(top))
    try:
        dead = _plant(top, f"vaultfs-mp-{_dead_pid()}-left")
        busy = _plant(top, f"vaultfs-mp-{live_pid}-busy")
        run_cli("mount", str(mp), home=home, env=env)
        daemon = json.loads((home / "mount.json").read_text())["pid"]
        for p in (remotes[1] / "data").iterdir():
            p.unlink()
        rep = json.loads(run_cli("repair", "--json", home=home, env=env).stdout)
        assert rep["rebuilt"] > 0, rep
        assert not dead.exists() and busy.is_dir()
        (own,) = top.glob(f"vaultfs-mp-{daemon}-*")  # the forkserver listens in it
        assert any(f.is_socket() for f in own.iterdir()), list(own.iterdir())
        run_cli("umount", str(mp), home=home, env=env)
        assert not os.path.exists(f"/proc/{daemon}")
        assert _scratch(top) == [busy.name]  # no pymp-*, nothing of the daemon's
    finally:
        if os.path.ismount(mp):
            run_cli("umount", str(mp), home=home, check=None, timeout=300)
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


#: what the killed process was doing when it held a file for rclone: the file's prefix, where
#: it was killed (tests/killpoint.py), the vaultfs command or the call (its remote "R") it
#: ran, and the command after it, which sweeps
_HANDED_TO_RCLONE = {
    # a repair's list of the sources to download (VAULTFS_READ_IN_PLACE=0), once made
    "list": ("vaultfs-list-", "tempfile:NamedTemporaryFile:after", "repair", "repair"),
    # an upload's bytes (as a fork's take-back from quarantine/), before rclone ran; a
    # backup hands rclone no file: its rclone daemon's start sweeps
    "put": ("vaultfs-put-", "vaultfs.remotes:RcloneCommand._run:before",
            "remotes.RcloneCommand(R).put_bytes('data', 'x', bytes(3_000_000))", "backup"),
    # an audit's list of the objects whose lock it reads (an immutable vault's), before
    # rclone ran
    "lock": ("vaultfs-lock-", "subprocess:run:before", "objectlock.read(R, ['data/x'])",
             "verify"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_HANDED_TO_RCLONE))
def test_a_file_handed_to_rclone_by_a_killed_process_is_swept_by_the_next_command(
    tmp_path, live_pid, kind
):
    """The files vaultfs hands rclone (a list of names, an object's bytes to upload) were
    made loose in the temporary directory, and a process killed (-9) holding one left it
    there for good. They live in the process's scratch directory ``vaultfs-rclone-<pid>-*``
    now: the next command that talks to the remotes removes it; a running process's stays."""
    home, remotes, src = _vault(tmp_path)
    top = tmp_path / "tmp"
    top.mkdir()
    busy = _plant(top, f"vaultfs-rclone-{live_pid}-busy")
    prefix, point, what, after = _HANDED_TO_RCLONE[kind]
    if after == "repair":  # something to download and rebuild
        for p in (remotes[1] / "data").iterdir():
            p.unlink()
    env = vaultfs_env(home, TMPDIR=str(top), VAULTFS_READ_IN_PLACE="0")
    if " " not in what:
        cmd = [sys.executable, str(REPO_ROOT / "tests" / "killpoint.py"), point, what]
    else:
        code = (f"import killpoint; killpoint.arm({point!r}); from vaultfs import objectlock, "
                f"remotes; R = {str(remotes[1])!r}; {what}")  # fmt: skip
        cmd = [sys.executable, "-c", code]
        env["PYTHONPATH"] = f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"
    killed = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True,
                            start_new_session=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr.decode()
    loose = [p.name for p in top.iterdir()
             if p.name.startswith(prefix) or re.fullmatch(r"rclone\d+", p.name)]  # fmt: skip
    assert not loose, f"{loose}: left loose in the temporary directory"
    (left,) = [p for p in top.glob("vaultfs-rclone-*") if p != busy]
    named = re.fullmatch(r"vaultfs-rclone-(\d+)-\w+", left.name)
    assert named and not os.path.exists(f"/proc/{named[1]}"), left.name
    held = list(left.iterdir())  # a repair downloads from two remotes at once: one or two
    assert held and all(f.name.startswith(prefix) for f in held), held
    assert any(f.stat().st_size > 0 for f in held) or point.endswith(":after"), "killed before"

    run_cli(after, *([str(src)] if after == "backup" else []), home=home, env=env)
    assert not left.exists()
    assert _scratch(top) == [busy.name]  # and nothing of its own


def test_each_file_handed_to_rclone_goes_when_its_call_is_done_and_the_directory_at_exit(
    tmp_path,
):
    """In normal operation each file handed to rclone is removed as soon as its call is done
    (a mount daemon lives for weeks and makes thousands), by both the rclone daemon's
    backend and the command's; the process's directory goes when it exits (here through
    the interpreter's exit; a vaultfs command's os._exit: the test above)."""
    remote, top, got = tmp_path / "r", tmp_path / "tmp", tmp_path / "got"
    top.mkdir()
    code = f"""
import os, pathlib
from vaultfs import objectlock, remotes
from vaultfs.scratch import process_scratch
top = pathlib.Path({str(top)!r})
for backend in (remotes.RcloneCommand({str(remote)!r}), remotes.RcloneRc({str(remote)!r})):
    backend.ensure()
    backend.put_bytes("data", "a", b"x" * 3_000_000)
    own = process_scratch(remotes.RCLONE_TMP_PREFIX)
    assert own.parent == top and own.name.startswith(f"vaultfs-rclone-{{os.getpid()}}-"), own
    for call in (
        lambda: backend.put_bytes("data", "b", b"y" * 1000),
        lambda: backend.get("data", ["a", "b"], pathlib.Path({str(got)!r})),
        lambda: objectlock.read({str(remote)!r}, ["data/a", "data/b"]),
        lambda: backend.quarantine("data", ["a"]),
        lambda: backend.delete("data", ["b"]),
    ):
        call()
        assert list(own.iterdir()) == [], list(own.iterdir())
    assert list(top.glob("vaultfs-rclone-*")) == [own]  # one directory for the process
    # rclone's own temporary directories (rclone<digits>, made during a download) are made
    # in a directory of ours, named with our pid, never loose in the temporary directory
    rcd = remotes.RcloneDaemon.get()
    env = dict(e.split("=", 1) for e in open(f"/proc/{{rcd.proc.pid}}/environ").read().split(chr(0)) if e)
    assert env["TMPDIR"] == rcd.dir and os.path.basename(rcd.dir).startswith(f"vaultfs-rcd-{{os.getpid()}}-"), env["TMPDIR"]
    assert remotes.rclone_env(str(own))["TMPDIR"] == str(own)
    assert (pathlib.Path({str(got)!r}) / "a").stat().st_size == 3_000_000
    assert (pathlib.Path({str(remote)!r}) / "quarantine" / "data" / "a").is_file()
    assert not (pathlib.Path({str(remote)!r}) / "data" / "b").exists()
    (pathlib.Path({str(remote)!r}) / "quarantine" / "data" / "a").unlink()
print("done")
"""
    env = dict(os.environ, TMPDIR=str(top), PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr
    assert _scratch(top) == []
