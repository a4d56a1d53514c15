"""Edges a new user meets (found by a review as a new user would): relative remote paths, local
paths that cannot be used, another vault's keyfile, an interrupted restore, snapshot names,
--include of nothing, a remote that comes back after looking empty. Real rclone local remotes,
the real command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import empty_remote, init_local_vault, run_cli, tree_digest, vaultfs_env

from vaultfs import errors

REPO = Path(__file__).resolve().parent.parent


def _cli(
    cwd: Path, home: Path, *args: str, check: int = 0, umask: int = 0o022, input: bytes = b""
) -> subprocess.CompletedProcess:
    """`vaultfs ARGS` run from ``cwd`` (run_cli runs from the repository) under ``umask``."""
    env = vaultfs_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env, capture_output=True,
        timeout=300, input=input, umask=umask,
    )  # fmt: skip
    assert proc.returncode == check, (args, proc.returncode, proc.stderr.decode())
    assert b"Traceback" not in proc.stderr
    return proc


def test_relative_remote_paths_are_made_absolute_at_init(tmp_path: Path) -> None:
    """A relative remote path names one directory, whatever the working directory of later
    commands (it used to spread the vault's objects over every directory commands ran in)."""
    base = tmp_path / "x"
    (base / "elsewhere").mkdir(parents=True)
    home = base / "home"
    _cli(base, home, "init", "-k", "2", "-n", "3", "--remote", "r1", "--remote", "./r2",
         "--remote", "r3")  # fmt: skip
    src = tmp_path / "f.txt"
    src.write_bytes(os.urandom(100_000))
    _cli(base / "elsewhere", home, "backup", str(src))
    assert list((base / "elsewhere").iterdir()) == []  # nothing landed beside the command
    remotes = json.loads(_cli(base / "elsewhere", home, "status", "--json").stdout)["remotes"]
    specs = sorted(r["remote"] for r in remotes)
    assert specs == [str(base / "r1"), str(base / "r2"), str(base / "r3")]
    assert all(any((base / f"r{i}" / "data").iterdir()) for i in (1, 2, 3))
    _cli(base / "elsewhere", home, "verify")
    # the same relative names work where they were typed: verify --remote, remote replace
    _cli(base, home, "verify", "--remote", "r1", "--remote", "./r2")
    domain = {r["remote"]: r["domain"] for r in remotes}[str(base / "r3")]
    _cli(base, home, "remote", "replace", "r3", "r4")
    remotes = json.loads(_cli(base, home, "status", "--json").stdout)["remotes"]
    assert {r["remote"]: r["domain"] for r in remotes}[str(base / "r4")] == domain


def test_local_paths_that_cannot_be_used_are_one_line_errors(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    run_cli("backup", str(src), home=home)
    for args, code in [
        (["restore", "--to", str(afile / "sub")], 18),
        (["keys", "public", "--out", str(afile / "sub")], 18),
        (["init", "--remote", str(tmp_path / "new-r"), "--home", str(afile / "sub")], 18),
    ]:
        proc = run_cli(*args, home=home, check=code)
        err = proc.stderr.decode()
        assert "Traceback" not in err and str(afile) in err, err
    # init through a file refuses before it touches any remote
    assert not (tmp_path / "new-r").exists()


def test_a_remote_path_that_is_a_file_is_a_rejected_spec(tmp_path: Path) -> None:
    """A local remote path that is (or lies under) a file: init, remote add and remote replace
    refuse the spec (exit 14) in one line naming the file, before any remote is touched."""
    afile = tmp_path / "file.bin"
    afile.write_text("x")
    others = [a for i in (8, 9) for a in ("--remote", str(tmp_path / f"x{i}"))]
    for spec in (afile, afile / "sub"):
        proc = run_cli("init", "-k", "2", "-n", "3", "--remote", str(spec), *others,
                       home=tmp_path / "new", check=14)  # fmt: skip
        err = proc.stderr.decode().strip()
        assert f"{afile} is a file" in err and "\n" not in err, err
    assert not (tmp_path / "x8").exists() and not (tmp_path / "new").exists()
    home, remotes = init_local_vault(tmp_path)
    run_cli("remote", "add", str(afile), home=home, check=14)
    run_cli("remote", "replace", str(remotes[0]), str(afile), home=home, check=14)
    assert afile.read_text() == "x"


def test_keys_recover_never_overwrites_another_vaults_keyfile(tmp_path: Path) -> None:
    home_a, _ = init_local_vault(tmp_path / "a")
    home_b, _ = init_local_vault(tmp_path / "b")
    split = json.loads(
        run_cli("keys", "split", "--shares", "3", "--threshold", "2",
                "--out-dir", str(tmp_path / "shares"), "--json", home=home_a).stdout
    )  # fmt: skip
    before = (home_b / "key.json").read_bytes()
    proc = run_cli(
        "keys", "recover", "--home", str(tmp_path / "empty"), "--keyfile-out",
        str(home_b / "key.json"), "--force", "--share-file", split["files"][0],
        "--share-file", split["files"][1], home=tmp_path / "empty", check=10,
    )  # fmt: skip
    assert "another vault" in proc.stderr.decode()
    assert (home_b / "key.json").read_bytes() == before
    run_cli("status", home=home_b)


def test_a_home_holding_another_vaults_keyfile_is_a_key_error(tmp_path: Path) -> None:
    """A key.json copied from another vault: exit 10 (a key problem, operations.md), with
    advice, and nothing in the home changes."""
    home_a, _ = init_local_vault(tmp_path / "a")
    home_b, _ = init_local_vault(tmp_path / "b")
    shutil.copy(home_b / "key.json", home_a / "key.json")
    before = (home_a / "index.db").read_bytes()
    for argv in (("status",), ("snapshots",), ("verify",)):
        proc = run_cli(*argv, home=home_a, check=10)
        assert "does not belong to the vault" in proc.stderr.decode()
        assert "Traceback" not in proc.stderr.decode()
    assert (home_a / "index.db").read_bytes() == before


def test_a_new_home_is_the_owners_only(tmp_path: Path) -> None:
    """The index names every file: init makes the home 0700 (whatever the umask, and also
    when the directory existed)."""
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    for home in (tmp_path / "fresh", existing):
        init_local_vault(tmp_path, 1, 2, prefix=f"r-{home.name}", home=home, segment_mib=None)
        assert home.stat().st_mode & 0o777 == 0o700, oct(home.stat().st_mode)


def test_flush_exits_3_while_a_remote_is_behind(tmp_path: Path) -> None:
    """`flush` returns 0 only when everything is on every remote (operations.md): with one
    remote of a 2-of-3 vault unreachable the backup succeeds (k placed) and flush exits 3,
    naming it; once it is back, flush places the rest and exits 0."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(300_000))
    shutil.move(remotes[2], tmp_path / "r2.off")
    remotes[2].write_text("not a directory")
    run_cli("backup", str(src), home=home)
    for argv in (("flush",), ("flush", "--json")):
        proc = run_cli(*argv, home=home, check=3)
    assert json.loads(proc.stdout)["complete"] is False
    assert "Traceback" not in proc.stderr.decode()
    remotes[2].unlink()
    shutil.move(tmp_path / "r2.off", remotes[2])
    assert json.loads(run_cli("flush", "--json", home=home).stdout)["complete"] is True


def test_status_shows_a_failed_upload_at_once(tmp_path: Path) -> None:
    """A remote audited ok whose upload then fails during a backup is `failing` in `status`
    right after that backup (the review saw `ok` until the next flush), with the error,
    whenever the failure was known when the backup ended; an upload still being tried then
    is cut off and judged by nobody (a slow remote is not failing, tests/test_status.py),
    and the next flush, which waits for every upload, shows it. A flush that reaches the
    remote makes it ok again."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(200_000))
    run_cli("backup", str(src), home=home)
    run_cli("verify", home=home)

    def health() -> list[tuple[str, str | None]]:
        st = json.loads(run_cli("status", "--json", home=home).stdout)
        return [(r["health"], r["health_detail"]) for r in st["remotes"]]

    assert [h for h, _ in health()] == ["ok", "ok", "ok"]
    shutil.move(remotes[2], tmp_path / "r2.off")
    remotes[2].write_text("not a directory")
    (src / "g.bin").write_bytes(os.urandom(200_000))
    # k remotes have it: the backup succeeds
    rep = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)
    now = health()
    if rep["errors"]:  # the failure was known before the backup ended
        assert [h for h, _ in now] == ["ok", "ok", "failing"], (now, rep)
    else:  # cut off while being tried: not judged, and still queued
        assert now[2][0] in ("ok", "failing"), (now, rep)
        assert rep["pending"][str(remotes[2])] > 0, rep
        run_cli("flush", home=home, check=None)
        now = health()
    assert [h for h, _ in now] == ["ok", "ok", "failing"], now
    assert "upload" in (now[2][1] or ""), now
    table = run_cli("status", home=home, env=vaultfs_env(home, COLUMNS="300")).stdout.decode()
    assert "failing" in table
    remotes[2].unlink()
    shutil.move(tmp_path / "r2.off", remotes[2])
    run_cli("flush", home=home)
    assert [h for h, _ in health()] == ["ok", "ok", "ok"]


def test_remote_add_beyond_n_says_how_many_remotes_a_restore_needs(tmp_path: Path) -> None:
    """2-of-3 over five remotes: a segment is on three of them, so two remotes no longer
    always restore; `remote add` says how many do (the review found 'any k' promised)."""
    home, remotes = init_local_vault(tmp_path)
    for extra in ("r3", "r4"):
        proc = run_cli("remote", "add", str(tmp_path / extra), home=home)
    assert "any 4 of its 5 remotes (with the key) restore everything" in proc.stdout.decode()
    rep = json.loads(run_cli("remote", "add", str(tmp_path / "r5"), "--json", home=home).stdout)
    assert rep["remotes"] == 6 and rep["restore_needs"] >= 3


def test_remote_add_to_a_vault_with_data_names_the_remotes_that_restore_it(tmp_path: Path) -> None:
    """2-of-3 over two remotes, then a third: the data already stored stays on the first two
    (one holds two shards of each segment), so "any 2 of its 3 remotes restore everything"
    was false (the review restored from r1 + r2 and failed). The message names the remotes
    the stored data needs; a restore from exactly those works, one from r1 + r2 does not."""
    home, remotes = init_local_vault(tmp_path, remotes=2)
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * 1024 * 1024)
    (src / "f.bin").write_bytes(data)
    run_cli("backup", str(src), home=home)
    extra = tmp_path / "r2"
    said = run_cli("remote", "add", str(extra), home=home).stdout.decode()
    said = " ".join(said.split())  # a terminal's line breaks
    assert "any 2 of its 3 remotes" not in said and "restore everything" not in said, said
    assert f"what is stored now needs both of {remotes[0]}, {remotes[1]}" in said, said
    assert "survives 0 domain loss(es) as it is placed now" in said, said
    rep = json.loads(run_cli("status", "--json", home=home).stdout)
    assert rep["survives_losses_design"] == 0
    keyfile = home / "key.json"
    named = [a for r in remotes for a in ("--from", str(r))]
    run_cli("restore", *named, "--to", str(tmp_path / "out"), "--keyfile", str(keyfile),
            home=tmp_path / "h2")  # fmt: skip
    assert next((tmp_path / "out").rglob("f.bin")).read_bytes() == data
    other = ["--from", str(remotes[1]), "--from", str(extra)]
    res = run_cli("restore", *other, "--to", str(tmp_path / "out2"), "--keyfile", str(keyfile),
                  home=tmp_path / "h3", check=None)  # fmt: skip
    assert res.returncode != 0


def test_remote_adds_in_a_row_claim_what_a_restore_of_the_stored_data_needs(
    tmp_path: Path,
) -> None:
    """3-of-5 over five remotes, one backup, then three `remote add`s: the review saw "needs
    any 4 of t1…t5" after the first (3-of-5 over five needs any 3) and "needs all of t1…t5"
    after the third while t1 + t2 + t3 restored: the figure counted the new index copy's
    shards on the added remotes but left those remotes out of the list. After each add the
    claim holds: the claimed number of the listed remotes restores, even the worst pick (the
    added remotes, which hold no data, first), and one fewer of that pick does not."""
    home, remotes = init_local_vault(tmp_path, 3, 5, segment_mib=None)  # one data segment
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(10_000)
    (src / "f.bin").write_bytes(data)
    run_cli("backup", str(src), home=home)
    keyfile = home / "key.json"
    added: list[str] = []

    def restores(names: list[str], out: Path) -> bool:
        named = [a for r in names for a in ("--from", r)]
        res = run_cli("restore", *named, "--to", str(out), "--keyfile", str(keyfile),
                      home=out.with_name(out.name + "-home"), check=None)  # fmt: skip
        return res.returncode == 0 and next(out.rglob("f.bin")).read_bytes() == data

    for i in range(3):
        extra = str(tmp_path / f"x{i}")
        rep = json.loads(run_cli("remote", "add", extra, "--json", home=home).stdout)
        added.append(extra)
        held, now = rep["stored_on"], rep["restore_needs_now"]
        assert set(held) <= {*map(str, remotes), *added}, rep
        assert set(map(str, remotes)) <= set(held), rep  # every old remote holds data
        # the data alone needs 3 of the five, whichever others are picked
        assert now == len(held) - 5 + 3, rep
        worst = [r for r in held if r in added] + [r for r in held if r not in added]
        assert restores(worst[:now], tmp_path / f"ok{i}"), (rep, worst[:now])
        assert not restores(worst[: now - 1], tmp_path / f"short{i}"), (rep, worst[: now - 1])
    said = " ".join(
        run_cli("remote", "add", str(tmp_path / "x3"), home=home).stdout.decode().split()
    )
    # the line says the same: the data needs 3 of the five, whichever listed others are picked
    if whole := re.search(r"any (\d+) of its (\d+) remotes \(with the key\) restore every", said):
        assert int(whole[1]) == int(whole[2]) - 2, said
    else:
        part = re.search(r"what is stored now needs any (\d+) of (.*?) \(the data", said)
        assert part and int(part[1]) == len(part[2].split(", ")) - 2, said


def test_status_names_the_snapshot_the_reachable_remotes_restore(tmp_path: Path) -> None:
    """3-of-5 with one remote down since before the first backup: no snapshot is fully placed
    (its manifest waits for that remote), yet the other four restore the newest one. The
    review saw "no snapshot is fully placed on the remotes yet"; status names it as the
    recovery point, and a restore from the four gives it back. `flush` warns of the failed
    uploads naming the remote once."""
    home, remotes = init_local_vault(tmp_path, 3, 5, segment_mib=None)
    shutil.move(remotes[2], tmp_path / "r2.off")
    remotes[2].write_text("not a directory")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(b"first")
    run_cli("backup", str(src), home=home)
    warned = run_cli("flush", home=home, check=3).stderr.decode()  # waits for every remote
    # the review saw "warning: R: R: upload … failed": the error already names the remote
    assert f"warning: {remotes[2]}: upload" in warned, warned
    assert f"{remotes[2]}: {remotes[2]}" not in warned, warned
    (src / "f.bin").write_bytes(b"second")
    run_cli("backup", str(src), home=home)
    snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert rt["newest_placed_snapshot"] is None, rt
    assert rt["newest_restorable_snapshot"] == snaps[-1]["id"], (rt, snaps)
    said = " ".join(run_cli("status", home=home).stdout.decode().split())
    assert "no snapshot" not in said, said
    assert f"newest snapshot the reachable remotes restore: {snaps[-1]['id']}" in said, said
    named = [a for r in remotes if r != remotes[2] for a in ("--from", str(r))]
    run_cli("restore", *named, "--to", str(tmp_path / "out"), "--keyfile",
            str(home / "key.json"), home=tmp_path / "h2")  # fmt: skip
    assert next((tmp_path / "out").rglob("f.bin")).read_bytes() == b"second"


def test_an_interrupted_restore_is_marked_and_finished_with_force(tmp_path: Path) -> None:
    """kill -9 mid-restore leaves a marker: the rerun names the interruption, --force
    finishes it byte-identical and removes the marker."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(6_000_000))
    run_cli("backup", str(src), home=home)
    shutil.copy(home / "key.json", tmp_path / "key.json")
    to = tmp_path / "out"
    args = [sys.executable, "-m", "cli.main", "restore", "--from", str(remotes[0]), "--from",
            str(remotes[2]), "--keyfile", str(tmp_path / "key.json"), "--to", str(to)]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=REPO, env=vaultfs_env(tmp_path / "empty-home"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (to / "src" / "f0").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:  # it finished first: no interruption to see
        assert not (to / ".vaultfs-restore-incomplete").exists()
        return
    assert (to / ".vaultfs-restore-incomplete").exists()
    again = args[3:]
    proc2 = run_cli(*again, home=tmp_path / "empty-home", check=13)
    assert "interrupted restore" in proc2.stderr.decode()
    run_cli(*again, "--force", home=tmp_path / "empty-home")
    assert not (to / ".vaultfs-restore-incomplete").exists()
    assert tree_digest(to / "src") == tree_digest(src)


def test_snapshot_names_are_checked_and_ids_win(tmp_path: Path) -> None:
    home, _ = init_local_vault(tmp_path)
    src = tmp_path / "f.txt"
    src.write_text("one")
    first = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)["snapshot"]
    for bad in [first, "latest", "..", ".", ".hidden", "a/b", "x\ny", "n" * 256, ""]:
        proc = run_cli("backup", str(src), "--name", bad, home=home, check=18)
        assert "Traceback" not in proc.stderr.decode()
    assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 1
    run_cli("backup", str(src), "--name", "n" * 255, home=home)
    src.write_text("two")
    run_cli("backup", str(src), "--name", "nightly", home=home)
    out = tmp_path / "o"
    run_cli("restore", "--snapshot", first, "--to", str(out), home=home)
    assert (out / "f.txt").read_text() == "one"


def test_include_of_a_path_the_snapshot_lacks_is_an_error(tmp_path: Path) -> None:
    home, _ = init_local_vault(tmp_path)
    src = tmp_path / "d"
    src.mkdir()
    (src / "a").write_text("a")
    run_cli("backup", str(src), home=home)
    proc = run_cli("restore", "--include", "d/a", "--include", "d/nope",
                   "--to", str(tmp_path / "o"), home=home, check=18)  # fmt: skip
    assert "d/nope" in proc.stderr.decode()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_remote_back_after_looking_empty_heals(tmp_path: Path) -> None:
    """Every remote looked empty for a while (an unmounted NAS): verify marks every shard
    lost. Once the objects are back unchanged, the next verify finds them intact again and
    the vault is whole: verify clean, flush complete, status survives n-k again."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3_000_000))
    run_cli("backup", str(src), home=home)
    aside = tmp_path / "aside"
    aside.mkdir()
    for r in remotes:
        r.rename(aside / r.name)
        r.mkdir()
    run_cli("verify", home=home, check=12)
    for r in remotes:
        shutil.rmtree(r)
        (aside / r.name).rename(r)
    run_cli("verify", home=home)
    run_cli("flush", home=home)
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["survives_losses_now"] == 1


def test_restore_names_a_from_that_is_no_directory(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "f.txt"
    src.write_text("one")
    run_cli("backup", str(src), home=home)
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_cli("restore", "--from", str(remotes[0]), "--from", str(afile), "--from",
                   str(tmp_path / "nowhere"), "--keyfile", str(home / "key.json"),
                   "--to", str(tmp_path / "o"), home=tmp_path / "empty", check=11)  # fmt: skip
    err = proc.stderr.decode()
    assert f"--from {afile} is not a directory" in err, err
    assert f"--from {tmp_path / 'nowhere'} does not exist" in err, err


def test_a_from_given_twice_is_refused_as_init_refuses_a_remote_given_twice(
    tmp_path: Path,
) -> None:
    """`--from R --from R` (or R and a path to the same directory) would be read as one
    remote, short of the k the user meant to give: restore, home rebuild and kb refuse it
    (exit 18, nothing written), naming the remote, as `init -r R -r R` does; it used to be
    counted once silently (then "1 gave them intact")."""
    home, remotes = init_local_vault(tmp_path)
    (tmp_path / "f.txt").write_text("one")
    run_cli("backup", str(tmp_path / "f.txt"), home=home)
    key = ["--keyfile", str(home / "key.json")]
    twice = ["--from", str(remotes[0]), "--from", str(remotes[1]), "--from", str(remotes[0])]
    alias = ["--from", str(remotes[0]), "--from", f"{remotes[0]}/../{remotes[0].name}"]
    for argv, said in [
        (["restore", *twice, *key, "--to", str(tmp_path / "o")], "is given twice"),
        (
            ["restore", *alias, *key, "--to", str(tmp_path / "o")],
            f"and {alias[3]} are one directory",
        ),
        (["home", "rebuild", *twice, *key], "is given twice"),
        (["kb", "show", "00000000-0000-4000-8000-000000000000", *twice, *key], "is given twice"),
    ]:
        res = run_cli(*argv, home=tmp_path / "empty", check=18)
        msg = " ".join(res.stderr.decode().split())
        assert f"--from {remotes[0]} {said}, which would be read as one remote" in msg, msg
        assert "Traceback" not in msg and not (tmp_path / "o").exists(), msg
        assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())
    run_cli("restore", *twice[:4], *key, "--to", str(tmp_path / "o"), home=tmp_path / "empty")
    assert (tmp_path / "o" / "f.txt").read_text() == "one"


def test_a_keyfile_that_does_not_exist_is_missing_input(tmp_path: Path) -> None:
    """`restore --keyfile MISSING` exits 18 like a missing share or receipt file (it is input
    not found, not "no vault here", 16), naming the file."""
    home, remotes = init_local_vault(tmp_path)
    froms = [a for r in remotes for a in ("--from", str(r))]
    missing = tmp_path / "nonexist.json"
    proc = run_cli("restore", *froms, "--keyfile", str(missing), "--to", str(tmp_path / "o"),
                   home=tmp_path / "empty", check=18)  # fmt: skip
    assert f"--keyfile {missing} does not exist" in proc.stderr.decode()


def test_stdin_backup_takes_the_umask(tmp_path: Path) -> None:
    """`(umask 077; pg_dump | vaultfs backup --stdin …)` records a file only its owner reads."""
    home, _ = init_local_vault(tmp_path)
    _cli(tmp_path, home, "backup", "--stdin", "--stdin-filename", "dumps/kb.sql",
         umask=0o077, input=b"-- dump\n")  # fmt: skip
    out = tmp_path / "o"
    run_cli("restore", "--to", str(out), home=home)
    assert (out / "dumps" / "kb.sql").stat().st_mode & 0o777 == 0o600
    assert (out / "dumps").stat().st_mode & 0o777 == 0o700


def test_too_few_remotes_names_the_snapshot_the_remotes_and_the_way_out(tmp_path: Path) -> None:
    """A 3-of-4 vault with two remotes gone: the restore (from the home, and with --from on an
    empty home) names the snapshot asked for, the remotes holding the vault and those found
    empty, and what to do, not only an internal segment (exit 11)."""
    home, remotes = init_local_vault(tmp_path, 3, 4)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(100_000))
    run_cli("backup", str(src), "--name", "monday", home=home)
    for r in remotes[2:]:
        empty_remote(r)  # found empty, not down (a missing directory is down)
    froms = [a for r in remotes[:3] for a in ("--from", str(r))]
    for argv, h in (
        (("--snapshot", "monday"), home),
        (("--keyfile", str(home / "key.json"), *froms), tmp_path / "empty"),
    ):
        res = run_cli("restore", *argv, "--to", str(tmp_path / f"out-{h.name}"), home=h, check=11)
        msg = " ".join(res.stderr.decode().split())
        assert "Traceback" not in msg
        what = "snapshot monday" if h == home else "snapshot latest"
        assert f"cannot restore {what}: it needs shards from 3 remotes and 2 gave them" in msg, msg
        assert f"Holding the vault: {remotes[0]}, {remotes[1]};" in msg, msg
        assert f"empty (lost, or the wrong path): {remotes[2]}" in msg, msg
        assert "until 3 hold it and run again" in msg and "`vaultfs repair`" in msg, msg


def test_every_reader_says_too_few_remotes_as_restore_does(tmp_path: Path) -> None:
    """A 2-of-3 vault with two remotes gone: `wal fetch`, `home rebuild`, `drill disk` and a
    restore from the home each name what they could not do, the remote holding the vault,
    the others, and the way forward (exit 11), not only "only 1 intact shard reachable"."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(100_000))
    run_cli("backup", str(src), home=home)
    wal_name = "000000010000000000000001"
    (tmp_path / wal_name).write_bytes(os.urandom(50_000))
    run_cli("wal", "push", str(tmp_path / wal_name), wal_name, home=home)
    run_cli("flush", home=home)
    for r in remotes[1:]:
        shutil.rmtree(r)

    def said(*argv: str, h: Path = home, check: int = 11) -> str:
        res = run_cli(*argv, home=h, check=check)
        msg = " ".join((res.stderr + res.stdout).decode().split())
        assert "Traceback" not in msg
        assert "it needs shards from 2 remotes and 1 gave them intact" in msg, msg
        assert f"Holding the vault: {remotes[0]}" in msg, msg
        assert "until 2 hold it" in msg and "`vaultfs repair` rebuilds it" in msg, msg
        return msg

    msg = said("wal", "fetch", wal_name, str(tmp_path / "wal.out"))
    assert f"cannot fetch WAL file {wal_name}:" in msg and "unreachable or failing: " in msg
    assert all(str(r) in msg.split("unreachable or failing: ")[1] for r in remotes[1:]), msg
    assert not (tmp_path / "wal.out").exists()
    keyfile = str(home / "key.json")
    msg = said("home", "rebuild", "--from", str(remotes[0]), "--keyfile", keyfile,
               h=tmp_path / "new-home")  # fmt: skip
    assert "cannot rebuild the home:" in msg and "(or give more --from)" in msg, msg
    msg = said("restore", "--to", str(tmp_path / "out"))
    assert "cannot restore snapshot latest:" in msg and "--from" not in msg, msg
    drill = run_cli("drill", "disk", "--scratch", str(tmp_path / "drill"), "--json", home=home,
                    check=errors.EXIT_DRILL_FAILED)  # fmt: skip
    notes = json.loads(drill.stdout)["drills"][0]["error"]
    assert notes.startswith("cannot restore the newest snapshot: it needs shards from 2 remotes")
    assert f"Holding the vault: {remotes[0]}" in notes, notes


def test_a_restore_refused_for_a_corrupt_shard_names_the_remote_that_served_it(
    tmp_path: Path,
) -> None:
    """A 2-of-3 vault with one remote gone and a data shard flipped on another: the restore
    refuses (exit 11) and names the remote that served the corrupt shard, and the shard (it
    used to say only "only 1 intact shard reachable"), from the home and with --from."""
    home, remotes = init_local_vault(tmp_path)
    (tmp_path / "f.bin").write_bytes(os.urandom(100_000))
    run_cli("backup", str(tmp_path / "f.bin"), home=home)
    shard = next((remotes[0] / "data").iterdir())
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 1
    shard.write_bytes(bytes(blob))
    shutil.rmtree(remotes[2])
    from_ = ["--from", str(remotes[0]), "--from", str(remotes[1]),
             "--keyfile", str(home / "key.json")]  # fmt: skip
    for i, (extra, h) in enumerate([([], home), (from_, tmp_path / "empty")]):
        res = run_cli("restore", *extra, "--to", str(tmp_path / f"out{i}"), home=h, check=11)
        msg = " ".join(res.stderr.decode().split())
        assert "Traceback" not in msg, msg
        assert f"served a corrupt shard: {remotes[0]} (shard {shard.name}, index" in msg, msg
        assert str(remotes[1]) not in msg.split("served a corrupt shard:")[1], msg


def test_the_exit_code_table_in_operations_md_lists_every_code_of_errors_py() -> None:
    """docs/operations.md's exit-code table and vaultfs/errors.py's (the source of truth) list
    the same codes: a user looking up an exit code finds it."""
    ours = {int(c) for c in re.findall(r"^(\d+) {2,}\S", errors.__doc__ or "", re.M)}
    text = (REPO / "docs" / "operations.md").read_text()
    table = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert ours == documented and 24 in ours, ours ^ documented


def test_a_snapshot_name_several_share_is_refused_by_delete_and_named_by_readers(
    tmp_path: Path,
) -> None:
    """Names need not be unique: `snapshot delete NAME` refuses (18) while several snapshots
    have it, listing their ids; `ls`/`restore` take the newest and say which on stderr; a
    delete prints the id it deleted."""
    home, _ = init_local_vault(tmp_path)
    src = tmp_path / "f.txt"
    ids = []
    for text in ("old", "new"):
        src.write_text(text)
        proc = run_cli("backup", str(src), "--name", "nightly", "--json", home=home)
        ids.append(json.loads(proc.stdout)["snapshot"])
    said = run_cli("snapshot", "delete", "nightly", home=home, check=18).stderr.decode()
    assert f"2 snapshots are named 'nightly' ({ids[1]}, {ids[0]}" in said, said
    assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 2
    proc = run_cli("ls", "nightly", home=home)
    assert "f.txt" in proc.stdout.decode()
    note = proc.stderr.decode()
    assert f"using the newest, {ids[1]}" in note and ids[0] in note, note
    proc = run_cli("restore", "--snapshot", "nightly", "--to", str(tmp_path / "out"), home=home)
    assert f"using the newest, {ids[1]}" in proc.stderr.decode()
    assert (tmp_path / "out" / "f.txt").read_text() == "new"
    assert "using the newest" not in run_cli("ls", ids[0], home=home).stderr.decode()
    proc = run_cli("snapshot", "delete", ids[1], home=home)
    assert f"deleted snapshot {ids[1]};" in proc.stdout.decode()
    proc = run_cli("snapshot", "delete", "nightly", "--json", home=home)  # one left: fine
    assert json.loads(proc.stdout)["deleted"] == ids[0]
    assert json.loads(run_cli("snapshots", "--json", home=home).stdout) == []


def test_a_closed_stdout_ends_every_command_quietly_with_141(tmp_path: Path) -> None:
    """`vaultfs ls | head`: once the reader has gone, a command stops with exit 141 (128 +
    SIGPIPE, as the shell shows for coreutils' `ls`) and says nothing, with or without
    --json, whether rich or a plain write meets the closed pipe."""
    home, _ = init_local_vault(tmp_path)
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(50):
        (tree / f"f{i}").write_text(str(i))
    run_cli("backup", str(tree), home=home)
    env = vaultfs_env(home)
    for args in (["ls", "latest"], ["ls", "latest", "--json"], ["snapshots"], ["status", "--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=REPO,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line
        with proc.stderr:
            said = proc.stderr.read()
        assert proc.wait(timeout=300) == errors.EXIT_STDOUT_CLOSED, (args, said)
        assert said == b"", (args, said)


def test_json_has_no_colour_off_a_terminal_even_with_force_color(tmp_path: Path) -> None:
    """CI sets FORCE_COLOR: `--json` into a pipe stays plain JSON."""
    home, _ = init_local_vault(tmp_path)
    env = {**vaultfs_env(home), "FORCE_COLOR": "1"}
    for args in (["status", "--json"], ["snapshots", "--json"]):
        text = run_cli(*args, home=home, env=env).stdout.decode()
        assert "\x1b[" not in text, text[:200]
        json.loads(text)


def test_backup_without_path_or_stdin_is_an_argument_error_as_errors_py_says(
    tmp_path: Path,
) -> None:
    """Arguments the command finds do not go together exit 18, and errors.py and
    docs/operations.md say so (2 is for what the argument parser refuses)."""
    home, _ = init_local_vault(tmp_path)
    said = run_cli("backup", home=home, check=18).stderr.decode()
    assert "give PATH" in said and "Traceback" not in said
    run_cli("backup", "--bogus", home=home, check=2)
    assert "`backup` without PATH or --stdin" in (errors.__doc__ or "")
    table = (REPO / "docs" / "operations.md").read_text().split("## Exit codes", 1)[1]
    assert "(`backup` without PATH or `--stdin`)" in table.split("\n## ", 1)[0]
