"""The export map (vaultfs/index/exportmap.py): a commit hashes only the index blocks whose
pages the write-ahead log (or the map's carried pages) names since the last export, and the
block map it ships is the one hashing every block would give — after a close and reopen, a
log folded mid-way, and with the map lost, torn, stale, or the index file written behind
the vault's back (all of which fall back to hashing every block). Real vault, real rclone
local remotes, real crypto."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vaultfs import indexblocks
from vaultfs.backup import backup_paths
from vaultfs.index import Index, exportmap
from vaultfs.index.exportmap import Export
from vaultfs.indexblocks import BLOCK_SIZE, ENTRY
from vaultfs.vault import Vault, metaship

PW = "pw-for-exportmap-tests"


class Crash(Exception):
    pass


@pytest.fixture
def exports(tmp_path, monkeypatch) -> list[Export]:
    """Every export of the index, each checked byte for byte against the former procedure
    (the whole file copied once the log is empty, switched to rollback mode, its queued
    shards placed), whether it patched the kept copy of the last export or copied it all."""
    out: list[Export] = []
    real = Index.export_to

    def checked(self: Index, dest: Path) -> Export:
        got = real(self, dest)
        if got.stamp is not None:  # the checkpoint emptied the log: the file is the database
            ref = tmp_path / "reference.db"
            shutil.copyfile(self.path, ref)
            with contextlib.closing(sqlite3.connect(ref, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode=DELETE")
                db.execute("UPDATE shards SET state='placed' WHERE state='queued'")
            assert dest.read_bytes() == ref.read_bytes()
            ref.unlink()
        out.append(got)
        return got

    monkeypatch.setattr(Index, "export_to", checked)
    return out


@pytest.fixture
def shipments(monkeypatch, exports) -> list[tuple[bytes, metaship.Shipment]]:
    """Every shipping: (the copy shipped, its result), each checked against hashing every
    block of the copy: the block map names each block by its true id."""
    out: list[tuple[bytes, metaship.Shipment]] = []
    real = metaship.ship

    def checked(index, keys, suite, segment_size, export, *more, **kw):
        got = real(index, keys, suite, segment_size, export, *more, **kw)
        data = export.read_bytes()
        ids = [oid for oid, _u, _o, _l in ENTRY.iter_unpack(got.entries)]
        assert ids == [
            indexblocks.object_id(keys.metadata_key, data[i : i + BLOCK_SIZE])
            for i in range(0, len(data), BLOCK_SIZE)
        ]
        out.append((data, got))
        return got

    monkeypatch.setattr(metaship, "ship", checked)
    return out


def make_vault(tmp_path: Path) -> Vault:
    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    return Vault.create(tmp_path / "home", remotes, 2, 3, PW, segment_size=1 << 20)


def change(tmp_path: Path, name: str, count: int = 1) -> Path:
    """A new directory of ``count`` small files of random content."""
    src = tmp_path / name
    src.mkdir()
    rng = random.Random(name)
    for i in range(count):
        (src / f"f{i:05d}.bin").write_bytes(rng.randbytes(300 + rng.randrange(300)))
    return src


def commit(v: Vault, src: Path) -> metaship.ShipStats:
    backup_paths(v, [src])
    assert v.flush().complete
    stats = v.committer.last_shipped
    assert stats is not None
    return stats


def few(stats: metaship.ShipStats) -> bool:
    """Only some blocks were hashed (the map was used) and only their pages were copied
    into the kept export (4 KiB pages, 16 KiB blocks)."""
    copied = stats.copied_pages
    return (
        0 < stats.hashed_blocks <= stats.blocks // 4
        and copied is not None
        and 0 < copied <= 4 * stats.hashed_blocks
    )


def test_a_commit_hashes_only_what_changed_across_reopens_and_folds(
    tmp_path, shipments, monkeypatch
):
    v = make_vault(tmp_path)
    with v:
        first = commit(v, change(tmp_path, "big", 6000))
        assert first.hashed_blocks == first.blocks > 64  # no map yet: every block
        second = commit(v, change(tmp_path, "c1"))
        assert few(second)
        assert second.sealed_blocks <= second.hashed_blocks
    # closed: the log folded into the file; the map carries exactly the pages that differ
    # from the kept export (the flush's rows already showed placed there are not carried)
    home = tmp_path / "home"
    m = exportmap.load(Path(f"{home / 'index.db'}-exportmap"))
    assert m is not None
    now, kept = (home / "index.db").read_bytes(), (home / "index.db-export").read_bytes()
    size = m.page_size
    assert m.carried == {
        i // size + 1 for i in range(0, len(now), size) if now[i : i + size] != kept[i : i + size]
    }
    # reopened
    v = Vault.open(tmp_path / "home", PW)
    with v:
        assert few(commit(v, change(tmp_path, "c2")))
        # a log folded at a transaction's end, between two exports
        monkeypatch.setattr("vaultfs.index.WAL_FOLD_BYTES", 0)
        assert few(commit(v, change(tmp_path, "c3")))
    assert len(shipments) == 4


@pytest.mark.parametrize("damage", ["lost", "torn", "written behind", "copied back"])
def test_a_lost_torn_or_stale_map_falls_back_to_hashing_every_block(tmp_path, shipments, damage):
    v = make_vault(tmp_path)
    home = tmp_path / "home"
    with v:
        commit(v, change(tmp_path, "big", 6000))
        commit(v, change(tmp_path, "c1"))
    old = tmp_path / "old-index.db"
    shutil.copyfile(home / "index.db", old)
    mapfile = Path(f"{home / 'index.db'}-exportmap")
    assert exportmap.load(mapfile) is not None
    if damage == "lost":
        mapfile.unlink()
    elif damage == "torn":
        raw = bytearray(mapfile.read_bytes())
        raw[len(raw) // 2] ^= 1
        mapfile.write_bytes(bytes(raw))
    elif damage == "written behind":  # another program writes and checkpoints the file
        with contextlib.closing(sqlite3.connect(home / "index.db", isolation_level=None)) as db:
            db.execute("CREATE TABLE foreign_scratch (x)")  # the schema cookie changes
            db.execute("DROP TABLE foreign_scratch")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:  # the index put back from a copy of it (a backup of the home restored)
        shutil.copyfile(old, home / "index.db")
    v = Vault.open(home, PW)
    with v:
        again = commit(v, change(tmp_path, "c2"))
        assert again.hashed_blocks == again.blocks
        assert again.copied_pages is None  # the whole file copied
        assert few(commit(v, change(tmp_path, "c3")))  # the map is whole again


def test_a_crash_before_the_map_is_kept_makes_the_next_commit_hash_everything(
    tmp_path, shipments, monkeypatch
):
    v = make_vault(tmp_path)
    with v:
        commit(v, change(tmp_path, "big", 6000))
        with monkeypatch.context() as mp, pytest.raises(Crash):

            def dies(self, m):
                raise Crash("the process dies before the map of its export is kept")

            mp.setattr("vaultfs.index.Index.remember_export", dies)
            backup_paths(v, [change(tmp_path, "c1")])
    v = Vault.open(tmp_path / "home", PW)
    with v:
        again = commit(v, change(tmp_path, "c2"))
        assert again.hashed_blocks == again.blocks
        assert again.copied_pages is None


@pytest.mark.parametrize("dies", ["before its checkpoint", "before its new stamp"])
def test_a_fold_that_dies_costs_at_most_one_full_hashing(tmp_path, shipments, monkeypatch, dies):
    """A fold of the log that dies once it has recorded the log's pages (the file still as
    stamped: the next commit hashes only what changed), or after its checkpoint, before the
    map's new stamp (the map is stale: the next commit hashes every block)."""
    v = make_vault(tmp_path)
    with v:
        commit(v, change(tmp_path, "big", 6000))
        commit(v, change(tmp_path, "c1"))
        backup_paths(v, [change(tmp_path, "c2")])  # its rows are in the log now
        real = exportmap.save
        calls = []

        def save(path, m):
            calls.append(path)
            if len(calls) == (1 if dies == "before its checkpoint" else 2):
                raise Crash("the process dies while folding the log")
            real(path, m)

        with monkeypatch.context() as mp, pytest.raises(Crash):
            mp.setattr(exportmap, "save", save)
            v.index.fold_log()
        assert v.flush().complete
        after = commit(v, change(tmp_path, "c3"))
        if dies == "before its checkpoint":
            assert few(after)
        else:
            assert after.hashed_blocks == after.blocks


def test_the_copy_has_the_bytes_of_switching_to_rollback_mode_before_the_update(tmp_path):
    """The copy's ``queued -> placed`` update now runs in its log, to learn its pages; the
    shipped bytes are those of the former order (rollback mode first, then the update)."""
    v = make_vault(tmp_path)

    def both(name: str) -> tuple[bytes, bytes]:
        new, old = tmp_path / f"{name}-new.db", tmp_path / f"{name}-old.db"
        v.index.export_to(new)
        shutil.copyfile(tmp_path / "home" / "index.db", old)  # the log is empty now
        with contextlib.closing(sqlite3.connect(old, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("UPDATE shards SET state='placed' WHERE state='queued'")
        return new.read_bytes(), old.read_bytes()

    with v:
        backup_paths(v, [change(tmp_path, "big", 2000)])  # not flushed: shards still queued
        assert v.index.q("SELECT count(*) FROM shards WHERE state='queued'")[0][0] > 0
        new, old = both("queued")
        assert new == old
        assert v.flush().complete  # nothing queued: the update writes nothing
        new, old = both("placed")
        assert new == old


def test_changed_blocks_covers_pages_header_growth_and_shrinking():
    page, block = 4096, BLOCK_SIZE
    # page 5 is in block 1; page 1 (the header) always; nothing else
    assert exportmap.changed_blocks({5}, page, block, 10 * block, 10 * block) == {0, 1}
    # grown by a block and a half: the new blocks, and the old last block
    grown = exportmap.changed_blocks(set(), page, block, 10 * block, 11 * block + block // 2)
    assert grown == {0, 9, 10, 11}
    # shrunk to a short last block: that block
    assert exportmap.changed_blocks(set(), page, block, 10 * block, 5 * block + page) == {0, 5}


def test_wal_pages_names_every_page_the_checkpoint_writes(tmp_path):
    db_path = tmp_path / "w.db"
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        db.executemany("INSERT INTO t VALUES (?, randomblob(700))", [(i,) for i in range(3000)])
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert exportmap.wal_pages(Path(f"{db_path}-wal")) == set()
        before = db_path.read_bytes()
        db.execute("UPDATE t SET v=randomblob(700) WHERE k % 97 = 0")
        pages = exportmap.wal_pages(Path(f"{db_path}-wal"))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = db_path.read_bytes()
    size = 4096
    differ = {
        i // size + 1
        for i in range(0, len(after), size)
        if before[i : i + size] != after[i : i + size]
    }
    assert differ and differ <= pages


def test_a_vacuum_through_the_index_goes_through_the_log_and_ships_true_ids(tmp_path, shipments):
    """VACUUM moves pages (vaultfs never runs it; a user might): in WAL mode it writes them
    through the log, which names them all, so the next commit hashes what moved."""
    v = make_vault(tmp_path)
    with v:
        commit(v, change(tmp_path, "big", 6000))
        commit(v, change(tmp_path, "c1"))
        v.index.db.execute("VACUUM")
        after = commit(v, change(tmp_path, "c2"))  # the fixture checks every id
        assert after.hashed_blocks > after.blocks // 2
        assert few(commit(v, change(tmp_path, "c3")))


@pytest.mark.parametrize("damage", ["lost", "written", "journal beside", "left as part"])
def test_a_lost_or_touched_kept_export_is_copied_whole_and_the_map_still_serves(
    tmp_path, shipments, damage
):
    """The kept copy of the last export (``index.db-export``) is patched only while it is
    the file that export left: lost, written by anything else, with a journal beside it
    that SQLite would replay, or left at ``.part`` by a crash while it was patched, it is
    copied whole again (the bytes checked by ``exports``); the map, still valid, keeps the
    hashing to the changed blocks."""
    v = make_vault(tmp_path)
    home = tmp_path / "home"
    kept = home / "index.db-export"
    with v:
        commit(v, change(tmp_path, "big", 6000))
        assert few(commit(v, change(tmp_path, "c1")))
        if damage == "lost":
            kept.unlink()
        elif damage == "written":
            with kept.open("r+b") as f:
                f.seek(3 * BLOCK_SIZE)
                byte = f.read(1)
                f.seek(3 * BLOCK_SIZE)
                f.write(bytes([byte[0] ^ 1]))
        elif damage == "journal beside":
            Path(f"{kept}-journal").write_bytes(b"\0" * 512)
        else:
            kept.rename(Path(f"{kept}.part"))
        again = commit(v, change(tmp_path, "c2"))
        assert 0 < again.hashed_blocks <= again.blocks // 4
        assert again.copied_pages is None
        assert few(commit(v, change(tmp_path, "c3")))
    assert sorted(p.name for p in home.glob("index.db-export*")) == [
        "index.db-export",
        "index.db-exportmap",
    ]


ROOT = Path(__file__).resolve().parent.parent


def vaultfs(tmp_path: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``vaultfs ARGS`` on the test's home; with ``kill_at``, killed at that step
    (tests/killpoint.py)."""
    env = dict(
        os.environ,
        VAULTFS_HOME=str(tmp_path / "home"),
        VAULTFS_PASSPHRASE=PW,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    start = [sys.executable, "-m", "cli.main"]
    if kill_at is not None:
        start = [sys.executable, str(ROOT / "tests" / "killpoint.py"), kill_at]
    return subprocess.run(
        [*start, *args], capture_output=True, env=env, cwd=ROOT, timeout=600,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("at", "whole"),
    [
        ("vaultfs.index:_kept:after", False),  # the kept copy checked, not yet renamed
        ("os:pwrite:after:2", True),  # writing the changed pages into it
        ("vaultfs.index.exportmap:wal_pages:after:2", True),  # its update, in its own log
        ("vaultfs.index:Index.remember_export:before", True),  # in place, its map not kept
        ("vaultfs.index.exportmap:save:after", False),  # the map kept, no segment recorded
    ],
)
def test_kill_9_at_every_step_of_the_kept_export_ships_the_right_blocks(
    tmp_path, shipments, at, whole
):
    """A ``vaultfs backup`` killed at each step of bringing the kept export up to date: the
    next commit copies the whole index (``whole``) or patches the copy, and either way ships
    the bytes and ids of the former whole-file procedure (``exports``, ``shipments``); the
    commit after it patches again, and the remotes restore the newest snapshot on an empty
    home."""
    v = make_vault(tmp_path)
    with v:
        commit(v, change(tmp_path, "big", 6000))
        commit(v, change(tmp_path, "c1"))
    res = vaultfs(tmp_path, "backup", str(change(tmp_path, "c2")), kill_at=at)
    assert res.returncode == -signal.SIGKILL, res.stderr
    v = Vault.open(tmp_path / "home", PW)
    with v:
        after = commit(v, change(tmp_path, "c3"))
        assert (after.copied_pages is None) == whole
        assert few(commit(v, change(tmp_path, "c4")))
    home = tmp_path / "home"
    assert sorted(p.name for p in home.glob("index.db-export*")) == [
        "index.db-export",
        "index.db-exportmap",
    ]
    out = tmp_path / "out"
    res = vaultfs(
        tmp_path, "restore", "--from", str(tmp_path / "r0"), "--from", str(tmp_path / "r1"),
        "--keyfile", str(home / "key.json"), "--home", str(tmp_path / "empty"), "--to", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    src = tmp_path / "c4"
    restored = next(out.rglob("f00000.bin"))
    assert restored.read_bytes() == (src / "f00000.bin").read_bytes()
