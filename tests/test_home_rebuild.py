"""`vaultfs home rebuild`: a lost home made again from exactly k remotes (found under new
specs), then backup, snapshot, verify, mount and restore carry on from it, and the rebuilt
index equals the lost one table by table (docs/operations.md, "Losing the home")."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli, tree_digest, vaultfs_env

from vaultfs.index import Index
from vaultfs.index import remotes as remote_table
from vaultfs.vault.home import rebuild_staging

#: Tables compared row by row, with the columns that may differ and why (kept short here;
#: the reasons are in docs/operations.md, "Losing the home").
SAME = [
    "shards", "chunks", "snapshots", "entries", "contents", "content_chunks", "epochs", "suites",
    "audit_tags", "garbage", "live_inodes", "live_dirents", "live_xattrs", "live_blocks",
]  # fmt: skip


def _rows(db: Path, table: str, skip: tuple[str, ...] = ()) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        cols = [r[1] for r in c.execute(f"PRAGMA table_info({table})") if r[1] not in skip]
        return c.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY 1, 2").fetchall()


def _copy_db(src: Path, dest: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dest)) as b,
    ):
        a.backup(b)


def _make_vault(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    home, remotes = init_local_vault(tmp_path, 3, 5, prefix="remote")
    src = tmp_path / "data"
    (src / "docs").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (src / "docs" / "a.txt").write_text("alpha\n" * 5000)
    os.symlink("docs/a.txt", src / "link")
    return home, remotes, src


def test_rebuild_from_k_remotes_under_new_specs_then_carry_on(tmp_path: Path) -> None:
    home, remotes, src = _make_vault(tmp_path)
    run_cli("backup", str(src), home=home)
    (src / "docs" / "b.txt").write_text("beta\n" * 3000)
    newest = json.loads(run_cli("backup", str(src), "--name", "second", "--json", home=home).stdout)
    lost = tmp_path / "lost-index.db"
    _copy_db(home / "index.db", lost)
    keyfile = tmp_path / "usb" / "key.json"
    keyfile.parent.mkdir()
    shutil.copy(home / "key.json", keyfile)
    shutil.rmtree(home)  # the laptop is gone

    # three of the five remotes now reached under other specs; the other two where they were
    moved = [tmp_path / "elsewhere" / f"copy-of-{i}" for i in (4, 1, 2)]
    for i, dest in zip((4, 1, 2), moved, strict=True):
        shutil.copytree(remotes[i], dest)
        shutil.rmtree(remotes[i])
    new_home = tmp_path / "new-laptop" / "vaultfs"
    args = [a for d in moved for a in ("--from", str(d))]
    rep = json.loads(
        run_cli("home", "rebuild", *args, "--keyfile", str(keyfile), "--json", home=new_home).stdout
    )
    assert rep["matched"] == {
        str(d): str(remotes[i]) for i, d in zip((4, 1, 2), moved, strict=True)
    }
    assert sorted(rep["kept"]) == [str(remotes[0]), str(remotes[3])]
    assert rep["snapshots"] == 2
    assert rep["seq"] == max(r[0] for r in _rows(lost, "manifests"))  # the rollback anchor
    # one manifest, one hash: the BLAKE3 of its object (docs/format.md 10.3), as `backup`
    # names it; its object's name (a random suffix, no hash) is given as an object
    name = max(_rows(lost, "manifests"))[1]
    assert rep["object"] == f"manifests/{name}" and "manifest" not in rep, rep
    blob = (moved[0] / "manifests" / name).read_bytes()
    assert rep["manifest_hash"] == blake3.blake3(blob).hexdigest()[:16], rep
    assert rep["manifest_hash"] == newest["manifest_hash"], (rep, newest)
    assert (new_home / "key.json").read_bytes() == keyfile.read_bytes()
    assert not list(new_home.parent.glob(".vaultfs.rebuild-*"))

    rebuilt = tmp_path / "rebuilt-index.db"
    _copy_db(new_home / "index.db", rebuilt)
    for table in SAME:
        assert _rows(rebuilt, table) == _rows(lost, table), table
    # the newest manifest's record and its index copy's segments are made from the remotes:
    # their time is the one the manifest signs (a few milliseconds after the lost home's)
    assert _rows(rebuilt, "segments", ("created",)) == _rows(lost, "segments", ("created",))
    assert [r[-1] for r in _rows(rebuilt, "segments")] == pytest.approx(
        [r[-1] for r in _rows(lost, "segments")], abs=60
    )
    assert _rows(rebuilt, "manifests", ("created",)) == _rows(lost, "manifests", ("created",))
    assert [r[2] for r in _rows(rebuilt, "manifests")][-1] == pytest.approx(
        [r[2] for r in _rows(lost, "manifests")][-1], abs=60
    )
    assert _rows(rebuilt, "manifest_queue") == []
    # the remotes table: the given ones under their new specs, the others as they were
    old = {r[0]: r for r in _rows(lost, "remotes", ("last_ok", "last_error"))}
    new = {r[0]: r for r in _rows(rebuilt, "remotes", ("last_ok", "last_error"))}
    by_old_spec = {was: now for now, was in rep["matched"].items()}
    assert {rid: r[1] for rid, r in new.items()} == {
        rid: by_old_spec.get(r[1], r[1]) for rid, r in old.items()
    }
    assert {rid: r[2:] for rid, r in new.items()} == {rid: r[2:] for rid, r in old.items()}
    assert _rows(rebuilt, "settings") == _rows(lost, "settings")

    env = vaultfs_env(new_home)
    # straight after the rebuild: every remote clean (the newest index copy is recorded, so
    # its shards are not foreign), nothing queued
    assert json.loads(run_cli("verify", "--json", home=new_home).stdout)["clean"]
    assert (
        json.loads(run_cli("status", "--json", home=new_home).stdout)["segments_below_k_placed"]
        == 0
    )
    # backup carries on: unchanged files dedup against the old chunks
    (src / "new.txt").write_text("gamma\n" * 100)
    chunks_before = len(_rows(rebuilt, "chunks"))
    out = json.loads(run_cli("backup", str(src), "--json", home=new_home, env=env).stdout)
    assert out["complete"]
    _copy_db(new_home / "index.db", rebuilt)
    assert len(_rows(rebuilt, "chunks")) == chunks_before + 1  # only new.txt's one chunk
    snaps = json.loads(run_cli("snapshots", "--json", home=new_home).stdout)
    assert len(snaps) == 3 and snaps[-1]["seq"] > max(r[0] for r in _rows(lost, "manifests"))
    run_cli("snapshot", "--name", "after-rebuild", home=new_home)
    ver = json.loads(run_cli("verify", "--read-all", "--json", home=new_home).stdout)
    assert ver["clean"], ver
    restored = tmp_path / "restored"
    run_cli("restore", "--snapshot", out["snapshot"], "--to", str(restored), home=new_home)
    assert tree_digest(restored / "data") == tree_digest(src)
    # a restore from the given remotes alone finds the newest manifest, made by the new home
    run_cli(
        "restore", *args, "--snapshot", "second", "--to", str(tmp_path / "r2"),
        "--keyfile", str(keyfile), home=tmp_path / "third-machine",
    )  # fmt: skip
    assert (tmp_path / "r2" / "data" / "docs" / "b.txt").read_text() == "beta\n" * 3000
    _mount_reads(new_home, tmp_path / "mnt")


def _mount_reads(home: Path, mp: Path) -> None:
    """Mount the rebuilt home and read a file of the last backup through .snapshots/."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return  # no FUSE here: the mount part is skipped, as the mount tests are
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        snaps = sorted((mp / ".snapshots").iterdir())
        assert snaps, "no snapshot under .snapshots"
        found = list((mp / ".snapshots").glob("*/data/docs/b.txt"))
        assert found and found[0].read_text() == "beta\n" * 3000
    finally:
        res = run_cli("umount", str(mp), home=home, check=None, timeout=120)
        if res.returncode not in (0, 3):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def test_rebuild_refuses_a_home_that_holds_anything(tmp_path: Path) -> None:
    home, remotes, src = _make_vault(tmp_path)
    run_cli("backup", str(src), home=home)
    before = (home / "index.db").read_bytes()
    args = [a for r in remotes[:3] for a in ("--from", str(r))]
    res = run_cli(
        "home", "rebuild", *args, "--keyfile", str(home / "key.json"), home=home, check=13
    )
    assert b"not empty" in res.stderr and b"Traceback" not in res.stderr
    assert (home / "index.db").read_bytes() == before


def test_rebuild_from_a_seed_asks_a_new_passphrase_and_refuses_strangers(tmp_path: Path) -> None:
    home, remotes, src = _make_vault(tmp_path)
    run_cli("backup", str(src), home=home)
    seed = json.loads(run_cli("keys", "show", "--reveal-seed", "--json", home=home).stdout)
    seed_file = tmp_path / "seed.hex"
    seed_file.write_text(seed["seed"])
    new_home = tmp_path / "new"
    # a directory that is no remote of this vault: refused, and no home is left behind
    stranger = tmp_path / "stranger"
    (stranger / "data").mkdir(parents=True)
    (stranger / "data" / ("ab" * 16)).write_bytes(b"x")
    args = [a for r in [*remotes[:3], stranger] for a in ("--from", str(r))]
    res = run_cli("home", "rebuild", *args, "--seed-file", str(seed_file), home=new_home, check=18)
    assert b"holds no shard object of this vault" in res.stderr
    assert not new_home.exists() and not list(tmp_path.glob(".new.rebuild-*"))
    # with only k-1 remotes of the vault beside it: too few (exit 11), and the stranger named
    args = [a for r in [*remotes[:2], stranger] for a in ("--from", str(r))]
    res = run_cli("home", "rebuild", *args, "--seed-file", str(seed_file), home=new_home, check=11)
    assert f"{stranger} holds nothing of this vault" in res.stderr.decode(), res.stderr
    assert not new_home.exists() and not list(tmp_path.glob(".new.rebuild-*"))
    args = [a for r in remotes[2:] for a in ("--from", str(r))]
    env = vaultfs_env(new_home, "another passphrase, long enough to be strong")
    run_cli("home", "rebuild", *args, "--seed-file", str(seed_file), home=new_home, env=env)
    run_cli("status", home=new_home, passphrase=PASSPHRASE, check=10)  # the old one: wrong
    run_cli("backup", str(src), home=new_home, env=env)


def test_interrupted_rebuild_leaves_no_home_and_the_next_one_completes(tmp_path: Path) -> None:
    """Crash state (docs/design.md): killed mid-rebuild, the home is absent; the staging
    directory left beside it is removed by the next rebuild, which completes."""
    home, remotes, src = _make_vault(tmp_path)
    run_cli("backup", str(src), home=home)
    keyfile = home / "key.json"
    new_home = tmp_path / "new"
    args = [a for r in remotes[:3] for a in ("--from", str(r))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "home", "rebuild", *args, "--keyfile", str(keyfile)],
        env=vaultfs_env(new_home),
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list(tmp_path.glob(".new.rebuild-*/index.db")) and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if not new_home.exists():  # killed before the rename (the usual case)
        assert list(tmp_path.glob(".new.rebuild-*"))
        res = run_cli("status", home=new_home, check=16)
        assert b"vaultfs home rebuild" in res.stderr
    else:  # it had finished: the home is complete
        shutil.rmtree(new_home)
    run_cli("home", "rebuild", *args, "--keyfile", str(keyfile), home=new_home)
    assert not list(tmp_path.glob(".new.rebuild-*"))
    assert json.loads(run_cli("snapshots", "--json", home=new_home).stdout)


def test_respec_moves_a_spec_from_one_remote_to_another() -> None:
    """Remotes found at each other's old paths (the spec column is unique) swap specs."""
    index = Index(":memory:")
    with index.tx() as db:
        a = remote_table.add(db, "/mnt/a", 0)
        b = remote_table.add(db, "/mnt/b", 1)
        c = remote_table.add(db, "/mnt/c", 2)
        remote_table.respec(db, {a: "/mnt/b", b: "/mnt/a"})
    assert remote_table.specs(index) == {a: "/mnt/b", b: "/mnt/a", c: "/mnt/c"}
    index.close()


def test_a_running_rebuilds_staging_directory_is_left_alone(tmp_path: Path) -> None:
    """Leftovers of an interrupted rebuild are removed; the one a running rebuild holds
    locked is not."""
    home = tmp_path / "home"
    running, fd = rebuild_staging(home)
    dead = tmp_path / ".home.rebuild-dead"
    (dead / "queue").mkdir(parents=True)
    mine, fd2 = rebuild_staging(home)
    try:
        assert running.is_dir() and not dead.exists() and mine.is_dir()
    finally:
        os.close(fd)
        os.close(fd2)


def test_rebuild_from_old_copies_is_refused_by_a_newer_remote_min_seq_or_receipt(
    tmp_path: Path,
) -> None:
    """Copies of k remotes taken at an older manifest: the rebuild refuses (exit 12, nothing
    written) when a remote of the vault not given holds a newer manifest, and, with those
    out of reach, when --min-seq or --receipt say the given remotes are behind; from
    up-to-date remotes it prints the manifest it started from."""
    home, remotes, src = _make_vault(tmp_path)
    run_cli("backup", str(src), home=home)
    old = [tmp_path / "old" / f"r{i}" for i in range(3)]
    for r, copy in zip(remotes[:3], old, strict=True):
        shutil.copytree(r, copy)
    (src / "docs" / "b.txt").write_text("beta\n" * 3000)
    run_cli("backup", str(src), "--name", "second", home=home)
    receipt = tmp_path / "receipt.json"
    run_cli("receipt", "second", "--out", str(receipt), home=home)
    newest = json.loads(receipt.read_text())["statement"]["manifest_seq"]
    keyfile = home / "key.json"
    new_home = tmp_path / "new"
    from_old = [a for r in old for a in ("--from", str(r))]

    res = run_cli("home", "rebuild", *from_old, "--keyfile", str(keyfile), home=new_home, check=12)
    msg = res.stderr.decode()
    assert "are behind: their newest manifest is" in msg and f"#{newest}/" in msg, msg
    assert str(remotes[3]) in msg or str(remotes[4]) in msg
    assert "--from" in msg and "Traceback" not in msg
    assert not new_home.exists() and not list(tmp_path.glob(".new.rebuild-*"))

    for r in remotes[3:]:  # the up-to-date remotes this machine reached are gone
        r.rename(r.with_name(r.name + ".away"))
    for extra in (["--min-seq", str(newest)], ["--receipt", str(receipt)]):
        args = [*from_old, "--keyfile", str(keyfile), *extra]
        res = run_cli("home", "rebuild", *args, home=new_home, check=12)
        assert b"rollback" in res.stderr.lower() and b"Traceback" not in res.stderr, res.stderr
        assert not new_home.exists()

    up_to_date = [a for r in remotes[:3] for a in ("--from", str(r))]
    args = [*up_to_date, "--keyfile", str(keyfile), "--receipt", str(receipt)]
    res = run_cli("home", "rebuild", *args, "--min-seq", str(newest), home=new_home)
    assert f"from manifest #{newest}/" in res.stdout.decode()


def test_a_home_rebuilt_after_a_remote_replace_shows_the_new_remote_as_the_replace_left_it(
    tmp_path: Path,
) -> None:
    """The index copy a replace ships records the new remote's health as of the replace: a
    home rebuilt from it does not show the just-rebuilt remote as stale (never audited)."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None)
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    run_cli("backup", str(src), home=home)
    new = tmp_path / "rn"
    run_cli("remote", "replace", str(remotes[2]), str(new), home=home)

    def health(h: Path) -> dict[str, str]:
        rows = json.loads(run_cli("remote", "list", "--json", home=h).stdout)
        return {r["remote"]: r["health"] for r in rows if r["member"] == "active"}

    assert health(home)[str(new)] == "ok"
    keyfile = tmp_path / "key.json"
    shutil.copy(home / "key.json", keyfile)
    shutil.rmtree(home)
    args = [a for r in (remotes[0], remotes[1], new) for a in ("--from", str(r))]
    run_cli("home", "rebuild", *args, "--keyfile", str(keyfile), home=home)
    assert health(home)[str(new)] == "ok"
