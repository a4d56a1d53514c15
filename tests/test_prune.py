"""`vaultfs prune`: what no snapshot and no live file uses is freed on the remotes, what is
still used survives — checked by restoring from k remotes with no local state, through the
CLI and the real rclone, and through a real mount for the live tree."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli, tree_digest, vaultfs_env


def remote_bytes(remotes: list[Path]) -> int:
    return sum(f.stat().st_size for r in remotes for f in (r / "data").glob("*"))


def write(p: Path, seed: int, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(random.Random(seed).randbytes(size))


def snapshots(home: Path) -> list[dict]:
    return json.loads(run_cli("snapshots", "--json", home=home).stdout)


def test_prune_frees_deleted_snapshots_and_keeps_what_others_use(tmp_path):
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    write(src / "kept.bin", 1, 3_000_000)  # in both snapshots
    write(src / "only-old.bin", 2, 4_000_000)  # only in the first one
    run_cli("backup", str(src), "--name", "old", home=home)
    (src / "only-old.bin").unlink()
    write(src / "new.bin", 3, 1_000_000)
    run_cli("backup", str(src), "--name", "new", home=home)
    before = remote_bytes(remotes)

    dry = json.loads(run_cli("prune", "--dry-run", "--json", home=home).stdout)
    assert dry["chunks_freed"] == 0, "both snapshots still use everything"

    run_cli("snapshot", "delete", "old", home=home)  # by name, like every other command
    assert [s["name"] for s in snapshots(home)] == ["new"]
    dry = json.loads(run_cli("prune", "--dry-run", "--json", home=home).stdout)
    assert dry["bytes_freed"] == 4_000_000 and remote_bytes(remotes) == before

    each = [remote_bytes([r]) for r in remotes]
    rep = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert rep["bytes_freed"] == 4_000_000 and rep["garbage_left"] == 0
    after = remote_bytes(remotes)
    # the report's freed bytes per remote are what left each remote's data/
    freed = [b - remote_bytes([r]) for b, r in zip(each, remotes, strict=True)]
    assert sorted(rep["freed_per_remote"].values()) == sorted(freed)
    assert dry["freed_per_remote"] == rep["freed_per_remote"]  # nothing repacked here
    # 4 MB of random data is 4 MB per copy, stored 3/2 times over the remotes
    assert before - after >= 4_000_000 * 3 // 2 * 0.9
    again = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert again["chunks_freed"] == 0 and again["manifest_seq"] is None

    # a disaster restore from k remotes with no local state gives back the kept snapshot
    shutil.copy(home / "key.json", tmp_path / "key.json")
    shutil.rmtree(home)
    out = tmp_path / "out"
    run_cli(
        "restore", "--keyfile", str(tmp_path / "key.json"), "--from", str(remotes[0]),
        "--from", str(remotes[2]), "--to", str(out), home=tmp_path / "fresh",
    )  # fmt: skip
    assert tree_digest(out / "src") == tree_digest(src)


def test_prune_repacks_sparse_segments(tmp_path):
    """Many small files in few segments; most deleted: the survivors move to a new segment
    and the old segments go, with the data intact."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    for i in range(40):
        write(src / f"f{i:02}.bin", 10 + i, 60_000)
    run_cli("backup", str(src), "--name", "all", home=home)
    keep = src.parent / "keep"
    keep.mkdir()
    for i in range(0, 40, 10):  # a tenth of the data stays, spread over the segments
        shutil.copy(src / f"f{i:02}.bin", keep / f"f{i:02}.bin")
    run_cli("backup", str(keep), "--name", "few", home=home)
    run_cli("snapshot", "delete", snapshots(home)[0]["id"], home=home)
    rep = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert rep["repacked"] >= 1 and rep["written"] >= 1
    assert rep["bytes_freed"] == 36 * 60_000
    run_cli("verify", "--read-all", home=home)
    shutil.copy(home / "key.json", tmp_path / "key.json")
    out = tmp_path / "out"
    run_cli(
        "restore", "--keyfile", str(tmp_path / "key.json"), "--from", str(remotes[1]),
        "--from", str(remotes[2]), "--to", str(out), home=tmp_path / "fresh",
    )  # fmt: skip
    assert tree_digest(out / "keep") == tree_digest(keep)


def test_prune_keeps_what_the_live_tree_of_the_mount_uses(tmp_path):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    home, _remotes = init_local_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = vaultfs_env(home)
    subprocess.run(
        [sys.executable, "-m", "cli.main", "mount", str(mnt)], env=env, check=True, timeout=120
    )
    try:
        write(mnt / "live.bin", 7, 2_500_000)
        data = (mnt / "live.bin").read_bytes()
        run_cli("snapshot", "--name", "s", home=home)
        run_cli("snapshot", "delete", snapshots(home)[0]["id"], home=home)
        rep = json.loads(run_cli("prune", "--json", home=home).stdout)  # by the mount's daemon
        assert rep["chunks_freed"] == 0, "the live tree still uses every chunk"
        assert (mnt / "live.bin").read_bytes() == data
    finally:
        subprocess.run([sys.executable, "-m", "cli.main", "umount", str(mnt)], env=env, timeout=300)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    rep = json.loads(run_cli("prune", "--json", home=home).stdout)  # unmounted: the same
    assert rep["chunks_freed"] == 0, "the live tree still uses every chunk"
    subprocess.run(
        [sys.executable, "-m", "cli.main", "mount", str(mnt)], env=env, check=True, timeout=120
    )
    try:
        assert (mnt / "live.bin").read_bytes() == data
    finally:
        subprocess.run([sys.executable, "-m", "cli.main", "umount", str(mnt)], env=env, timeout=300)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_prune_bad_input(tmp_path):
    home, _ = init_local_vault(tmp_path)
    proc = run_cli("prune", "--repack-below", "2", home=home, check=18)
    assert b"fraction" in proc.stderr
    proc = run_cli("prune", home=tmp_path / "nothing", check=16)
    assert PASSPHRASE not in proc.stderr.decode()


class _Crash(BaseException):
    """Stands for the process dying at that point."""


def test_prune_killed_between_new_segment_and_its_transaction_recovers(tmp_path, monkeypatch):
    """A crash after the repacked segment's shards are queued, before the transaction that
    uses them: the next open removes them, the next prune does the job, nothing is lost."""
    import io

    from vaultfs import prune as prune_mod
    from vaultfs.backends import open_backend
    from vaultfs.backup import backup_stream
    from vaultfs.restore import open_remote_index, restore_files
    from vaultfs.vault import Vault

    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    v = Vault.create(tmp_path / "home", remotes, 2, 3, PASSPHRASE, segment_size=1 << 20)
    keep = random.Random(1).randbytes(150_000)
    with v:
        backup_stream(v, io.BytesIO(random.Random(2).randbytes(900_000) + keep), "a", "a")
        backup_stream(v, io.BytesIO(keep), "b", "b")
        v.delete_snapshot(v.index.one("SELECT uid FROM snapshots WHERE name='a'")[0])
        assert v.flush().complete

        real = v.index.tx

        def crash_on_rewrite():
            import traceback

            if any(f.name == "rewrite_segments" for f in traceback.extract_stack()):
                raise _Crash()
            return real()

        monkeypatch.setattr(v.index, "tx", crash_on_rewrite)
        with pytest.raises(_Crash):
            prune_mod.prune(v, repack_below=0.9)
        monkeypatch.undo()
    v = Vault.open(tmp_path / "home", PASSPHRASE)
    with v:
        rep = prune_mod.prune(v, repack_below=0.9)
        # a's own 900,000 bytes at least; at most all of a's 1,050,000: the chunks of `keep`
        # inside a are cut by a keyed CDC from another start than in b, and with some keys
        # none of them lines up with b's within 150,000 bytes (then all of a is freed; b is
        # restored below either way)
        assert 900_000 <= rep.bytes_freed <= 1_050_000 and rep.garbage_left == 0
        keys = v.keys
    work = tmp_path / "w"
    db, src, _m, _w = open_remote_index(keys, [open_backend(r) for r in remotes[:2]], work)
    try:
        restore_files(keys, db, src, tmp_path / "out")
    finally:
        db.close()
    assert (tmp_path / "out" / "b").read_bytes() == keep
    assert not os.listdir(tmp_path / "home" / "queue" / "tmp")


def test_stale_snapshot_delete_changes_nothing_and_deferred_deletions_are_not_freed(tmp_path):
    """In a stale home `snapshot delete` is refused (exit 21) before it forgets anything; a
    prune while the remotes hold a fork deletes nothing and says so per remote: 0 bytes
    freed, the rest to free at a later prune (exit 3)."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    write(src / "kept.bin", 1, 1_000_000)
    write(src / "only-old.bin", 2, 2_000_000)
    run_cli("backup", str(src), "--name", "old", home=home)
    old_home = tmp_path / "old-home"
    shutil.copytree(home, old_home)
    (src / "only-old.bin").unlink()
    run_cli("backup", str(src), "--name", "new", home=home)

    res = run_cli("snapshot", "delete", "old", home=old_home, check=21)
    said = res.stderr.decode()
    assert "snapshot delete refused" in said and "Nothing was deleted" in said, said
    assert [s["name"] for s in snapshots(old_home)] == ["old"]

    run_cli("snapshot", "delete", "old", home=home)
    run_cli("backup", str(src), "--name", "branch", "--fork", home=old_home)
    before = remote_bytes(remotes)
    said = run_cli("prune", home=home, check=3).stdout.decode()
    assert remote_bytes(remotes) == before  # a fork: nothing deleted anywhere
    for r in remotes:
        line = next(x for x in said.splitlines() if x.strip().startswith(f"{r}:"))
        assert " 0 bytes freed; " in line and "bytes to free at a later prune" in line, said


def test_deletions_held_by_a_queued_manifest_say_why_and_the_next_prune_sends_it(tmp_path):
    """A remote failing uploads during prune keeps the new manifest queued for it, which holds back
    every old object it replaces, on every remote: prune says so and names `vaultfs flush`
    (exit 3); once the remote is back, the next prune sends the manifest first and deletes
    them (exit 0), without a flush of the user's."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    write(src / "kept.bin", 1, 500_000)
    write(src / "only-old.bin", 2, 1_500_000)
    run_cli("backup", str(src), "--name", "old", home=home)
    (src / "only-old.bin").unlink()
    run_cli("backup", str(src), "--name", "new", home=home)
    run_cli("snapshot", "delete", "old", home=home)

    # r2 lists its manifests but takes no upload of the new index copy (as a read-only
    # remote would; a file where its meta/ was)
    meta = remotes[2] / "meta"
    away = remotes[2].with_name("r2-meta")
    meta.rename(away)
    meta.write_text("not a directory: rclone cannot write here\n")
    try:
        res = run_cli("prune", home=home, check=3)
    finally:
        meta.unlink()
        away.rename(meta)
    said = res.stdout.decode() + res.stderr.decode()
    assert "wait for queued uploads to land" in said and "`vaultfs flush`" in said, said
    before = remote_bytes(remotes)

    said = run_cli("prune", home=home).stdout.decode()
    assert "wait for" not in said, said
    assert remote_bytes(remotes) < before
