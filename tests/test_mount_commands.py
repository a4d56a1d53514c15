"""`ls`, `run` and `restore` on a mounted vault, through a real FUSE mount and no passphrase
(docs/mount.md, "Maintenance while mounted"): `ls` is answered by the mount's daemon exactly as
the command answers unmounted (output, notes, errors, exit codes), `run` hands its pass to the
daemon, and `restore` without a passphrase fails at once naming the mount's `.snapshots/`
copy. Before, all three asked for the passphrase (off a terminal: exit 18, "no passphrase")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    init_local_vault,
    make_odd_tree,
    mount_pid,
    mounted_vault,
    needs_fuse,
    on_a_terminal,
    run_cli,
    tree_digest,
    unmount,
    vaultfs_env,
)

pytestmark = needs_fuse

#: files in one directory of the listed snapshot: its rows take several part lines
#: (vaultfs/control.py, PART_SIZE)
MANY = 3000


def _no_passphrase(home: Path) -> dict[str, str]:
    env = vaultfs_env(home)
    del env["VAULTFS_PASSPHRASE"]
    return env


def _answer(home: Path, args: tuple[str, ...], env: dict[str, str] | None = None) -> tuple:
    """(exit code, stdout, stderr) of `vaultfs ARGS`, stdin not a terminal."""
    res = run_cli(*args, home=home, env=env, input=b"", check=None)
    return res.returncode, res.stdout, res.stderr


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """(home, mountpoint, {args: unmounted answer}) of a mounted 2-of-3 vault holding three
    backups of one tree (names not UTF-8, special files, MANY files in one directory): two
    named "odd" (so a note says which one is read) and one "other". The answers were taken
    with the passphrase before mounting."""
    root = tmp_path_factory.mktemp("mounted-ls")
    home, _remotes = init_local_vault(root)
    src = root / "src"
    make_odd_tree(src / "odd")
    (src / "many").mkdir()
    for i in range(MANY):
        (src / "many" / f"file-{i:05d}-{'x' * 60}.txt").write_bytes(b"%d" % i)
    ids = []
    for name in ("odd", "odd", "other"):
        rep = run_cli("backup", str(src), "--name", name, "--json", home=home)
        ids.append(json.loads(rep.stdout)["snapshot"])
    top = src.name  # a backup of SRC stores its entries under its name
    cases = [
        ("ls", "odd"),
        ("ls", "odd", "--json"),
        ("ls", "latest", f"{top}/many", "--json"),
        ("ls", ids[0], os.fsdecode(f"{top}/odd/caf".encode() + b"\xe9")),
        ("ls", ids[0], os.fsdecode(f"/{top}/odd/".encode() + b"link\x80"), "--json"),
        ("ls", "odd", f"{top}/no-such-path"),  # the note, then exit 18
        ("ls", "other", f"{top}/no-such-path", "--json"),
        ("ls", "no-such-snapshot"),
        ("ls", "no-such-snapshot", "--json"),
    ]
    answers = {args: _answer(home, args) for args in cases}
    mp = root / "mnt"
    mp.mkdir()
    run_cli("mount", "--cache-size", "64M", str(mp), home=home)
    try:
        yield home, mp, answers
    finally:
        unmount(mp, home)


def test_mounted_ls_answers_as_unmounted_without_the_passphrase(listed) -> None:
    home, _mp, answers = listed
    env = _no_passphrase(home)
    for args, unmounted in answers.items():
        assert _answer(home, args, env) == unmounted, args
    # the cases say what they claim: listings, a note, the errors and their codes
    code, out, said = answers[("ls", "odd")]
    assert code == 0 and b"caf\\xe9/new\\nline.txt" in out and b"using the newest" in said
    many = [e for e in json.loads(answers[("ls", "latest", "src/many", "--json")][1])]
    assert len([e for e in many if e["type"] == "f"]) == MANY
    code, out, said = answers[("ls", "odd", "src/no-such-path")]
    assert code == 18 and out == b"" and b"using the newest" in said, said
    assert b"'src/no-such-path' is not in snapshot" in said, said
    code, _out, said = answers[("ls", "no-such-snapshot")]
    assert code == 18 and b"no snapshot with id or name 'no-such-snapshot'" in said, said


def test_mounted_restore_without_a_passphrase_names_the_mount_and_with_one_restores(
    listed, tmp_path: Path
) -> None:
    """Restore reads the vault itself (not through the daemon: docs/mount.md says why): no
    passphrase and no terminal fails at once, exit 18, naming the snapshot's directory under
    the mount (a name two snapshots share: the newest one's id) and creating nothing; with
    the passphrase it restores beside the mount, as before."""
    home, mp, _answers = listed
    env = _no_passphrase(home)
    target = tmp_path / "restored"
    snaps = json.loads(run_cli("snapshots", "--json", home=home, env=env).stdout)
    newest_odd = [s["id"] for s in snaps if s["name"] == "odd"][-1]
    for snapshot, directory in (("other", "other"), ("odd", newest_odd), ("latest", "other")):
        args = ("restore", "--to", str(target), "--snapshot", snapshot, "--include", "src/many")
        code, out, said = _answer(home, args, env)
        view = mp / ".snapshots" / directory / "src" / "many"
        message = said.decode()
        assert code == 18 and out == b"", message
        assert "no passphrase" in message and f"cp -a {view} DEST" in message, message
        assert view.is_dir() and not target.exists()
    res = run_cli("restore", "--to", str(target), "--snapshot", "other", home=home)
    assert "restored snapshot" in res.stdout.decode()
    assert tree_digest(target / "src" / "many") == tree_digest(
        mp / ".snapshots" / "other" / "src" / "many"
    )


def test_mounted_restore_on_a_terminal_names_the_mount_before_it_asks(
    listed, tmp_path: Path
) -> None:
    """On a terminal the passphrase is asked for as unmounted, after a note naming the copy
    under the mount; typed there, it restores."""
    home, mp, _answers = listed
    target = tmp_path / "restored"
    args = ["restore", "--to", str(target), "--snapshot", "other", "--include", "src/odd"]
    # click draws "Passphrase:", then getpass turns the echo off (discarding what was typed)
    # and draws the space: typed before it, the passphrase would be lost and the test hang
    typed = (b"Passphrase: ", PASSPHRASE.encode() + b"\n")
    code, drawn = on_a_terminal(args, home, stdout=True, typed=typed, passphrase=None)
    plain = " ".join(drawn.split())  # the note as one line, however the terminal wrapped it
    view = mp / ".snapshots" / "other" / "src" / "odd"
    assert code == 0, drawn
    assert f"cp -a {view} DEST" in plain and plain.index(str(view)) < plain.index("Passphrase")
    assert "restored snapshot" in plain, plain
    assert (target / "src" / "odd").is_dir()


@pytest.fixture
def mounted(tmp_path):
    """(home, mountpoint, remotes) of a mounted 2-of-3 vault holding a file, flushed."""
    with mounted_vault(tmp_path) as (home, mp, remotes):
        (mp / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        run_cli("flush", home=home)
        yield home, mp, remotes


def test_mounted_run_makes_its_pass_in_the_daemon_without_the_passphrase(tmp_path) -> None:
    """`vaultfs run` on a mounted vault: the daemon makes the pass now and the command prints
    its report and exits as unmounted: 20 when the audit finds a remote's shards gone (the
    same pass repairs them), then 0 with nothing left to do. (The schedule is set before the
    mount: the daemon's own first pass then comes a minute after it, routine.DAEMON_TICK,
    and these passes are the command's; a schedule set on the mounted vault would start
    one within seconds.)"""
    home, remotes = init_local_vault(tmp_path)
    run_cli("schedule", "set", "snapshot=1h", "verify=1h:100%", home=home)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        _run_in_the_daemon(home, mp, remotes)
    finally:
        unmount(mp, home)


def _run_in_the_daemon(home: Path, mp: Path, remotes: list[Path]) -> None:
    (mp / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    run_cli("flush", home=home)
    env = _no_passphrase(home)
    for shard in (remotes[1] / "data").iterdir():
        shard.unlink()
    res = run_cli("run", home=home, env=env, input=b"", check=20)
    out, said = res.stdout.decode(), res.stderr.decode()
    assert out.startswith("snapshot: snapshot ") and "name auto-" in out, out
    assert "verify failed:" in said and "missing" in said, said
    assert "repair: needed yes, rebuilt " in out and "{" not in out, out
    assert any((remotes[1] / "data").iterdir())
    snaps = json.loads(run_cli("snapshots", "--json", home=home, env=env).stdout)
    assert [s["name"][:5] for s in snaps] == ["auto-"]
    rep = json.loads(run_cli("run", "--json", home=home, env=env, input=b"").stdout)
    assert rep["ran"] == {"repair": {"needed": False}} and not rep["failed"], rep
    assert json.loads(run_cli("verify", "--json", home=home, env=env).stdout)["clean"]


def test_mounted_run_on_a_detached_mount_makes_no_pass(mounted) -> None:
    """Detached by a lazy unmount while a file stays open, the daemon still answers, but as
    its routine stops at once (tests/test_routine.py), `run` makes no pass there either:
    exit 17, nothing taken (a timed snapshot of a tree nobody sees)."""
    home, mp, _remotes = mounted
    env = _no_passphrase(home)
    run_cli("schedule", "set", "snapshot=1h", home=home, env=env)
    pid = json.loads((home / "mount.json").read_text())["pid"]
    with open(mp / "data.bin", "rb") as held:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=True)
        res = run_cli("run", home=home, env=env, input=b"", check=17)
        said = " ".join(res.stderr.decode().split())
        assert "is ending" in said and "takes no new work (no routine pass)" in said, said
        assert held.read(4) and not json.loads(
            run_cli("snapshots", "--json", home=home, env=env).stdout
        )
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemon exits after the last open file
    assert not os.path.exists(f"/proc/{pid}")


def test_a_detached_mount_takes_no_new_work_and_its_flush_says_so(mounted, tmp_path) -> None:
    """Detached by a lazy unmount while a file stays open for writing, the daemon takes no
    new work, as its routine takes none: `snapshot` (of a tree nobody sees, which that file
    may still change), `snapshot delete` and every maintenance job are refused (exit 17),
    each naming the detached mount and the way on: close the files, and once the daemon has
    exited the command works unmounted. `flush` still stores and uploads what was written,
    and says the mount is detached (`detached` in --json). Once the file is closed the daemon
    stores what it wrote and exits, and `snapshot` records it unmounted. Before, `snapshot`
    and the jobs ran in the detached daemon and `flush` said nothing of it."""
    home, mp, remotes = mounted
    env = _no_passphrase(home)
    pid = json.loads((home / "mount.json").read_text())["pid"]
    with open(mp / "held.txt", "wb") as held:
        held.write(b"before the lazy unmount\n")
        held.flush()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=True)
        held.write(b"after it\n")
        held.flush()
        for args in (
            ("snapshot", "--name", "nobody-sees"),
            ("snapshot", "delete", "nobody-sees"),
            ("verify",),
            ("repair",),
            ("prune",),
            ("forget", "--keep-last", "1"),
            ("remote", "add", str(tmp_path / "r9")),
            ("remote", "remove", str(remotes[0])),
            ("remote", "replace", str(remotes[0]), str(tmp_path / "r8")),
            ("keys", "rotate"),
            ("reencrypt", "--suite", "xwing"),
        ):
            code, _out, said = _answer(home, args, env)
            said = " ".join(said.decode().split())
            assert code == 17, (args, code, said)
            assert f"the mount at {mp} is ending (detached by a lazy unmount" in said, said
            assert "takes no new work" in said and "Close those files" in said, said
            assert "run this again: it then works unmounted" in said, said
        assert not (tmp_path / "r9").exists() and not (tmp_path / "r8").exists()
        rep = json.loads(run_cli("flush", "--json", home=home, env=env).stdout)
        assert rep["detached"] is True and rep["complete"], rep
        said = " ".join(run_cli("flush", home=home, env=env).stderr.decode().split())
        assert f"note: the mount at {mp} was detached by a lazy unmount" in said, said
        assert "This flush stored and uploaded what was written so far" in said, said
        assert not json.loads(run_cli("snapshots", "--json", home=home, env=env).stdout)
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemon exits after the last open file
    assert not os.path.exists(f"/proc/{pid}")
    snap = json.loads(run_cli("snapshot", "--name", "after", "--json", home=home).stdout)
    rows = run_cli("ls", snap["snapshot"], "--json", home=home).stdout.decode()
    assert "held.txt" in rows, rows
    assert len(b"before the lazy unmount\nafter it\n") == next(
        r["size"] for r in json.loads(rows) if r["path"].endswith("held.txt")
    ), rows


def test_a_detached_mount_says_so_in_status_umount_and_mount(tmp_path) -> None:
    """Detached by a lazy unmount while a file stays open, the daemon serves that file and
    exits after it: `status` says so (`mount.detached` in --json) instead of "mounted at",
    `umount` says it is no longer mounted and to close the files (exit 17), and `mount`, here
    or elsewhere, and `backup` (which takes the vault's lock) say the previous mount is
    detached instead of sending the user to that umount (exit 17). Once the file is closed the daemon exits and the vault mounts again.
    Before, `status` said "mounted at", `umount` "It stays mounted: its daemon serves it and
    runs the routine" and `mount` "`vaultfs umount` it first"."""
    with mounted_vault(tmp_path) as (home, mp, _remotes):
        env = _no_passphrase(home)
        (mp / "held.txt").write_text("still served\n")
        st = json.loads(run_cli("status", "--json", home=home, env=env).stdout)
        assert st["mount"]["detached"] is False, st["mount"]
        pid = json.loads((home / "mount.json").read_text())["pid"]
        other = tmp_path / "mnt2"
        other.mkdir()
        held = open(mp / "held.txt")  # noqa: SIM115 (closed below, or in finally)
        try:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=True)
            assert not os.path.ismount(mp)

            st = json.loads(run_cli("status", "--json", home=home, env=env).stdout)
            assert st["mount"]["detached"] is True and st["mount"]["pid"] == pid, st["mount"]
            said = " ".join(run_cli("status", home=home, env=env).stdout.decode().split())
            assert f"the mount at {mp} was detached by a lazy unmount" in said, said
            assert f"its daemon (pid {pid}) serves those files" in said, said
            assert "its routine has stopped" in said and "mounted at" not in said, said

            code, _out, said = _answer(home, ("umount", str(mp)), env)
            said = " ".join(said.decode().split())
            assert code == 17 and f"{mp} is no longer mounted: the mount at" in said, said
            assert "Close those files: its daemon then finishes and exits" in said, said
            assert "nothing is lost" in said and "stays mounted" not in said, said

            # a command that takes the vault's lock says the same as `mount`
            for args in (("mount", str(mp)), ("mount", str(other)), ("backup", str(other))):
                code, _out, said = _answer(home, args, vaultfs_env(home))
                said = " ".join(said.decode().split())
                assert code == 17 and "still held by its previous mount" in said, (args, said)
                assert f"the mount at {mp} was detached" in said, said
                assert "`vaultfs umount` it first" not in said, said
            assert not os.path.ismount(other) and not os.path.ismount(mp)
            assert held.read() == "still served\n"  # served all along
        finally:
            held.close()
        deadline = time.monotonic() + 120
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)  # the daemon exits after the last open file
        assert not os.path.exists(f"/proc/{pid}")
        run_cli("mount", str(mp), home=home)  # mounted_vault unmounts it
        assert (mp / "held.txt").read_text() == "still served\n"


def test_mounting_a_mounted_vault_names_where_it_is_mounted(tmp_path) -> None:
    """A second `vaultfs mount` of a mounted vault: exit 17 naming the mountpoint, with or
    without the passphrase (it needs none to say so). Before, without one it said "no
    passphrase" (exit 18), and with one "in use by another vaultfs process (a mount or a
    running backup)", not which mount."""
    with mounted_vault(tmp_path) as (home, mp, _remotes):
        other = tmp_path / "mnt2"
        other.mkdir()
        for env in (_no_passphrase(home), vaultfs_env(home)):
            code, _out, said = _answer(home, ("mount", str(other)), env)
            said = " ".join(said.decode().split())
            assert code == 17 and f"is mounted at {mp}: `vaultfs umount` it first" in said, said
            assert not os.path.ismount(other)


def test_umount_refuses_a_negative_timeout_and_with_0_does_not_wait(tmp_path) -> None:
    """`umount --timeout -5` is refused (exit 18) before anything is done: the vault stays
    mounted; `--timeout 0` unmounts without waiting for the daemon and exits 0 (nothing was
    queued): it only notes that the daemon closes the vault by itself. Before (review13),
    both unmounted and then exited 17, "still finishing after -5s"."""
    with mounted_vault(tmp_path) as (home, mp, _remotes):
        (mp / "f").write_bytes(b"data")
        for bad in ("-5", "nan"):
            res = run_cli("umount", str(mp), "--timeout", bad, home=home, check=18)
            said = res.stderr.decode()
            assert "--timeout takes 0 or more seconds" in said and "Traceback" not in said
            assert os.path.ismount(mp), bad
        pid = mount_pid(home)
        res = run_cli("umount", str(mp), "--timeout", "0", home=home)
        said = res.stderr.decode()
        assert not os.path.ismount(mp) and f"unmounted {mp}" in res.stdout.decode()
        assert "still finishing" not in said, said
        deadline = time.monotonic() + 120
        while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)  # the daemon exits by itself, releasing the vault
        run_cli("mount", str(mp), home=home)
        assert (mp / "f").read_bytes() == b"data"


def test_a_snapshot_name_that_would_be_hidden_in_snapshots_is_refused(tmp_path) -> None:
    """A snapshot's name is its directory under `.snapshots/`: one starting with '.' is
    refused (exit 18, one line) and takes no snapshot. Before (review13), `--name
    .snapshots` was taken and `.snapshots/` listed a hidden `.snapshots` inside itself."""
    with mounted_vault(tmp_path) as (home, mp, _remotes):
        (mp / "f").write_bytes(b"data")
        for bad in (".snapshots", ".hidden", ".", ".."):
            res = run_cli("snapshot", "--name", bad, home=home, check=18)
            said = res.stderr.decode()
            assert "it cannot start with '.'" in said and "Traceback" not in said, said
            assert len(said.strip().splitlines()) == 1, said
        assert os.listdir(mp / ".snapshots") == []
        run_cli("snapshot", "--name", "nightly.1", home=home)
        assert os.listdir(mp / ".snapshots") == ["nightly.1"]
        assert (mp / ".snapshots" / "nightly.1" / "f").read_bytes() == b"data"


def test_the_fixtures_cleanup_removes_a_dead_mount(tmp_path) -> None:
    """helpers.unmount looks the mount up in the mount table: a dead mount (its daemon
    killed) fails a stat, so ``os.path.ismount`` said False and a test that failed after a
    kill -9 left the dead mount behind (and pytest its directory, as garbage)."""
    from vaultfs.daemon import in_mount_table

    with mounted_vault(tmp_path) as (home, mp, _remotes):
        pid = mount_pid(home)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # bounded: the kernel reaps it within moments
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        assert not os.path.ismount(mp) and in_mount_table(mp)  # what fooled the old cleanup
    assert not in_mount_table(mp)
