"""A local-directory remote whose directory is missing (a disk unplugged, a path moved) is
down, through the real CLI: no command but ``init``/``remote add``/``remote replace``
recreates it, its shards wait in the queue, ``status`` says why, and once the directory is
back a flush places them (vaultfs/backends.py, LocalRoot)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from helpers import init_local_vault, run_cli


def _backup(home: Path, src: Path, name: str, size: int, check: int = 0):
    (src / name).write_bytes(os.urandom(size))
    return run_cli("backup", str(src), home=home, check=check)


def _row(home: Path, remote: Path) -> dict:
    rows = json.loads(run_cli("status", "--json", home=home).stdout)["remotes"]
    return next(r for r in rows if r["remote"] == str(remote))


def test_a_backup_with_a_remote_directory_missing_queues_its_shards_and_recreates_nothing(
    tmp_path: Path,
) -> None:
    """`mv r4 r4.usb; vaultfs backup` (3-of-5): the backup completes on the four others
    (exit 0, as with any one remote down) and says the directory is missing, ``r4`` is
    not recreated, its shards stay queued, and ``status`` shows it unreachable with the
    reason and counts no redundancy it lacks; `flush` (exit 3), `verify` (exit 11:
    unreachable, no object marked lost) and `repair` neither recreate it nor write there.
    Moved back, `vaultfs flush` places the shards and `verify` is clean."""
    home, remotes = init_local_vault(tmp_path, 3, 5)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "a.bin", 1_500_000)
    away = tmp_path / "r4.usb"
    remotes[4].rename(away)
    before = sorted(p.name for p in (away / "data").iterdir())
    # status notices before any write
    row = _row(home, remotes[4])
    assert row["health"] == "unreachable", row
    assert f"{remotes[4]}: directory missing" in row["health_detail"], row
    res = _backup(home, src, "b.bin", 2_500_000)
    said = res.stderr.decode().replace("\n", " ")
    assert f"{remotes[4]}: directory missing (a disk unplugged or the path moved?)" in said, said
    assert not remotes[4].exists()
    row = _row(home, remotes[4])
    assert row["health"] == "unreachable" and "plug it back" in row["health_detail"], row
    assert row["queued_objects"] > 0, row
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["survives_losses_now"] < st["survives_losses_design"], st
    table = run_cli("status", home=home).stdout.decode()
    assert "unreachable" in next(ln for ln in table.splitlines() if str(remotes[4]) in ln)
    listed = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    assert [r["health"] for r in listed if r["remote"] == str(remotes[4])] == ["unreachable"]
    res = run_cli("flush", home=home, check=3)
    assert b"directory missing" in res.stderr, res.stderr
    res = run_cli("verify", home=home, check=11)  # unreachable, not every object missing
    assert b"directory missing" in res.stderr, res.stderr
    rep = json.loads(run_cli("repair", "--json", home=home, check=None).stdout)
    assert str(remotes[4]) in rep["unreachable"] and not rep["rebuilt"], rep
    assert not remotes[4].exists()
    assert sorted(p.name for p in (away / "data").iterdir()) == before  # nothing went there
    away.rename(remotes[4])
    run_cli("flush", home=home)
    row = _row(home, remotes[4])
    assert row["queued_objects"] == 0 and row["health"] == "ok", row
    assert json.loads(run_cli("verify", "--json", "--read-all", home=home).stdout)["clean"]


def test_a_deleted_remote_directory_is_rebuilt_only_once_made_again(tmp_path: Path) -> None:
    """`rm -rf r1` (2-of-3): `status` says unreachable, not ok; `repair` does not recreate
    it (the remote is down); after `mkdir r1` (a new empty disk at that path) `repair`
    rebuilds every shard there and `verify` is clean."""
    home, remotes = init_local_vault(tmp_path, 2, 3)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "a.bin", 1_500_000)
    shutil.rmtree(remotes[1])
    assert _row(home, remotes[1])["health"] == "unreachable"
    run_cli("repair", home=home, check=None)
    assert not remotes[1].exists()
    remotes[1].mkdir()
    run_cli("repair", home=home)
    assert _row(home, remotes[1])["health"] == "ok"
    assert json.loads(run_cli("verify", "--json", "--read-all", home=home).stdout)["clean"]
