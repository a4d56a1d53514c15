"""`vaultfs reencrypt --suite mlkem1024`: killed (SIGKILL) at a random segment, readable while
interrupted, resumed, completed; afterwards the retired suite is refused on read."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import init_local_vault

from vaultfs.backends import open_backend
from vaultfs.errors import IntegrityError
from vaultfs.keys import SUITE_MLKEM1024_AES256GCM, SUITE_XWING_AES256GCM, VaultKeys, read_keyfile
from vaultfs.restore import open_remote_index, restore_files
from vaultfs.vault import Vault

REPO = Path(__file__).resolve().parents[1]


def env(home: Path) -> dict:
    return {**os.environ, "VAULTFS_HOME": str(home), "VAULTFS_PASSPHRASE": "pw"}


def run(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO, env=env(home), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"vaultfs {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def progress(home: Path) -> tuple[int | None, int, int]:
    """(target epoch, data segments under it, all data segments), read like any reader would."""
    with closing(sqlite3.connect(f"file:{home / 'index.db'}?mode=ro", uri=True, timeout=5)) as db:
        row = db.execute("SELECT value FROM settings WHERE key='reencrypt_epoch'").fetchone()
        total = db.execute("SELECT count(*) FROM segments WHERE kind='data'").fetchone()[0]
        if row is None:
            return None, 0, total
        done = db.execute(
            "SELECT count(*) FROM segments WHERE kind='data' AND epoch=?", (int(row[0]),)
        ).fetchone()[0]
        return int(row[0]), done, total


def test_reencrypt_killed_resumed_then_old_suite_refused(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path, 3, 5, passphrase="pw")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"part{i}.bin").write_bytes(os.urandom(900_000))
    (src / "dedup.bin").write_bytes((src / "part0.bin").read_bytes())
    run(home, "backup", str(src))
    _t, _d, total = progress(home)
    assert total >= 6
    stale = [tmp_path / f"stale{i}" for i in range(3)]  # a copy of the pre-re-encryption remotes
    for r, s in zip(remotes[:3], stale, strict=True):
        shutil.copytree(r, s)
    stale_home = tmp_path / "stale-home"  # and of the local state (an old backup of $HOME)
    shutil.copytree(home, stale_home)

    # 1. start, and SIGKILL once a random number of segments (>= 1, < all) is re-encrypted
    rng = random.Random()
    stop_at = rng.randint(1, total - 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "reencrypt", "--suite", "mlkem1024"],
        cwd=REPO, env=env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _target, done, _all = progress(home)
            except sqlite3.OperationalError:  # busy for a moment: the writer holds the lock
                done = 0
            if done >= stop_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"re-encryption ended before the kill ({stop_at=})"
    target, done, total_now = progress(home)
    assert target is not None and 1 <= done < total_now, (stop_at, done, total_now)

    # 2. readable while interrupted: locally (mixed epochs) and from the remotes (old manifest)
    show = json.loads(run(home, "keys", "show", "--json").stdout)
    assert show["reencrypt"]["remaining_segments"] == total_now - done
    run(home, "restore", "--to", str(tmp_path / "mid-local"))
    same_tree(src, tmp_path / "mid-local" / "src")
    run(tmp_path / "h-mid", "restore", "--keyfile", str(home / "key.json"),
        "--from", str(remotes[2]), "--from", str(remotes[3]), "--from", str(remotes[4]),
        "--to", str(tmp_path / "mid-remote"))  # fmt: skip
    same_tree(src, tmp_path / "mid-remote" / "src")

    # 3. resume to completion
    done_run = run(home, "reencrypt", "--suite", "mlkem1024")
    assert "retired suite 1" in done_run.stdout
    show = json.loads(run(home, "keys", "show", "--json").stdout)
    assert show["reencrypt"] is None and show["suite"] == SUITE_MLKEM1024_AES256GCM
    assert show["retired_suites"] == [SUITE_XWING_AES256GCM] and show["garbage_objects"] == 0
    by_epoch = {e["epoch"]: e for e in show["epochs"]}
    assert by_epoch[target]["data_segments"] == total_now and by_epoch[0]["data_segments"] == 0

    # every data object on the remotes is a shard of a live segment (old ones and the killed
    # run's orphans are gone), and the new state restores from any 3 remotes
    with closing(sqlite3.connect(home / "index.db")) as db:
        live = {
            n for (n,) in db.execute(
                "SELECT s.name FROM shards s JOIN segments g ON g.id = s.segment WHERE g.kind='data'"
            )
        }  # fmt: skip
    on_remotes = {n for r in remotes for n in open_backend(str(r)).list("data")}
    assert on_remotes == live
    run(tmp_path / "h-new", "restore", "--keyfile", str(home / "key.json"),
        "--from", str(remotes[0]), "--from", str(remotes[1]), "--from", str(remotes[4]),
        "--to", str(tmp_path / "after"))  # fmt: skip
    same_tree(src, tmp_path / "after" / "src")
    with Vault.open(home, "pw") as v:
        cids = [c for (c,) in v.index.q("SELECT cid FROM chunks")]
        assert all(v.read_chunk(c) for c in cids)

    # 4. the pre-re-encryption state (stale remotes) is refused by a reader that knows
    stale_run = run(tmp_path / "h-stale", "restore", "--keyfile", str(home / "key.json"),
                    "--from", str(stale[0]), "--from", str(stale[1]), "--from", str(stale[2]),
                    "--to", str(tmp_path / "stale-out"), check=False)  # fmt: skip
    assert stale_run.returncode == 12 and "retired suite 1" in stale_run.stderr
    assert not (tmp_path / "stale-out" / "src").exists()
    # ... down to the data: an old index's segments under the retired suite are refused
    keys = read_keyfile(home / "key.json", "pw")
    assert keys.retired_suites == {SUITE_XWING_AES256GCM}
    unaware = VaultKeys.from_seed(keys.seed)  # a seed holder who never heard of the retirement
    with tempfile.TemporaryDirectory() as work:
        db, src_shards, m, _w = open_remote_index(
            unaware, [open_backend(str(s)) for s in stale], Path(work)
        )
        try:
            assert m.suite == SUITE_XWING_AES256GCM
            unaware.retired_suites.add(SUITE_XWING_AES256GCM)  # now told, as the keyfile says
            with pytest.raises(IntegrityError, match="refusing data under retired suite 1"):
                restore_files(unaware, db, src_shards, tmp_path / "stale-data")
        finally:
            db.close()
    assert not any((tmp_path / "stale-data").rglob("*.bin"))
    # ... and an old copy of the local state, opened with today's keyfile, reads nothing
    shutil.copy(home / "key.json", stale_home / "key.json")
    res = run(stale_home, "restore", "--to", str(tmp_path / "stale-home-out"), check=False)
    assert res.returncode == 12 and "retired suite 1" in res.stderr
    with Vault.open(stale_home, "pw", lock=False) as v:
        old_cid = v.index.one("SELECT cid FROM chunks")[0]
        with pytest.raises(IntegrityError, match="refusing data under retired suite 1"):
            v.read_chunk(old_cid)


def test_reencrypt_pauses_while_a_remote_is_down_then_finishes(tmp_path: Path) -> None:
    """A remote that cannot be written: exit 3, old suite not yet retired; rerun once it is
    back: retired, and the replaced objects are deleted from every remote."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None, passphrase="pw")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(400_000))
    run(home, "backup", str(src))
    before = set(open_backend(str(remotes[0])).list("data"))
    down = remotes[2]
    shutil.move(down, tmp_path / "r2-away")
    down.write_text("not a directory: every write to this remote fails")
    paused = run(home, "reencrypt", "--suite", "mlkem1024-p384", check=False)
    assert paused.returncode == 3, paused.stderr
    assert "rerun `vaultfs reencrypt`" in paused.stderr
    show = json.loads(run(home, "keys", "show", "--json").stdout)
    assert show["retired_suites"] == [] and show["reencrypt"] is not None
    down.unlink()
    shutil.move(tmp_path / "r2-away", down)
    done = run(home, "reencrypt", "--suite", "mlkem1024-p384")
    assert "retired suite 1" in done.stdout
    after = set(open_backend(str(remotes[0])).list("data"))
    assert after and not (after & before)  # old shards deleted, new ones placed
    run(tmp_path / "h2", "restore", "--keyfile", str(home / "key.json"),
        "--from", str(remotes[1]), "--from", str(remotes[2]), "--to", str(tmp_path / "out"))  # fmt: skip
    same_tree(src, tmp_path / "out" / "src")
