"""File contents shared across files and snapshots (index schema 3, docs/format.md section 9):
a snapshot of an unchanged tree adds entries and no chunk lists, prune frees exactly the
contents no entry names and the chunks only they used, restores of old and new snapshots are
byte-identical, and an index written by schema 2 is converted in place, in one transaction.

Run through the CLI over real rclone local remotes; the index is read with sqlite3 to count
rows (the structure, not timings)."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli, tree_digest

from vaultfs import chunker
from vaultfs.errors import WrongKey
from vaultfs.index import Index
from vaultfs.index import contents as contents_mod
from vaultfs.keys import VaultKeys, read_keyfile
from vaultfs.vault import home as home_mod

DATA = Path(__file__).resolve().parent / "data"


def rows(home: Path) -> dict[str, int]:
    """Row counts of the tables a snapshot writes, and the index's size in bytes."""
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        out = {
            t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("entries", "contents", "content_chunks", "chunks")
        }
        (out["last_content"],) = db.execute("SELECT coalesce(max(id), 0) FROM contents").fetchone()
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    out["bytes"] = pages * size
    return out


def content_of(home: Path, snapshot_name: str, path: str) -> tuple[int, int]:
    """(contents.id, its number of chunks) of ``path`` in the snapshot named so."""
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        row = db.execute(
            "SELECT c.id, c.chunks FROM entries e JOIN snapshots s ON s.id = e.snapshot"
            " JOIN contents c ON c.id = e.content WHERE s.name = ? AND e.path = ?",
            (snapshot_name, path),
        ).fetchone()
    assert row is not None, f"{path} is not a file of {snapshot_name}"
    return row


def write(p: Path, seed: int, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(random.Random(seed).randbytes(size))


def restore(home: Path, snapshot: str, to: Path, *extra: str) -> dict[str, tuple]:
    run_cli("restore", "--snapshot", snapshot, "--to", str(to), *extra, home=home)
    return tree_digest(to)


def test_unchanged_snapshots_add_entries_and_no_chunk_lists(tmp_path):
    """1101 files (40 of several chunks; more entries than a commit records in one batch,
    with a copy in each): a second snapshot of the unchanged tree adds one entries row per
    entry and no contents or content_chunks rows; a changed file adds one content and its
    own chunks; every snapshot restores byte for byte, whole and by path."""
    home, _remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    for i in range(40):
        write(src / f"big{i % 4}" / f"b{i:02d}.bin", i, 160_000)  # ~5 chunks each
    for i in range(1059):
        (src / f"small{i % 8}").mkdir(parents=True, exist_ok=True)
        (src / f"small{i % 8}" / f"s{i:03d}.txt").write_text(f"file {i}\n")
    shutil.copy(src / "big0" / "b00.bin", src / "copy-of-b00.bin")  # same bytes, another path
    shutil.copy(src / "big0" / "b00.bin", src / "small7" / "zz-copy-of-b00.bin")
    files = 40 + 1059 + 2
    run_cli("backup", str(src), "--name", "one", home=home)
    one = rows(home)
    per_snapshot = one["entries"]
    assert per_snapshot == files + 1 + 4 + 8  # the files, src and the twelve directories
    assert one["contents"] == files - 2  # the copies name b00's content
    digest_one = tree_digest(src)

    run_cli("backup", str(src), "--name", "two", home=home)
    two = rows(home)
    assert two["entries"] - one["entries"] == per_snapshot
    assert (two["contents"], two["content_chunks"], two["chunks"]) == (
        one["contents"],
        one["content_chunks"],
        one["chunks"],
    )
    assert content_of(home, "one", "src/big3/b07.bin") == content_of(
        home, "two", "src/big3/b07.bin"
    )
    # what it cost the index: its entries rows and their indexes (~110 bytes an entry), no
    # chunk list
    assert two["bytes"] - one["bytes"] <= 256 * per_snapshot

    write(src / "big1" / "b05.bin", 1000, 200_000)
    run_cli("backup", str(src), "--name", "three", home=home)
    three = rows(home)
    new_content, new_chunks = content_of(home, "three", "src/big1/b05.bin")
    assert new_content == two["last_content"] + 1  # appended: the pages a commit touches are few
    assert three["contents"] - two["contents"] == 1
    assert three["content_chunks"] - two["content_chunks"] == new_chunks > 1

    for name, expected in (("one", digest_one), ("two", digest_one), ("three", tree_digest(src))):
        restore(home, name, tmp_path / f"out-{name}")
        assert tree_digest(tmp_path / f"out-{name}" / "src") == expected, name
    # one file, by path, from the old and the new snapshot
    old = restore(home, "one", tmp_path / "p1", "--include", "src/big1/b05.bin")
    new = restore(home, "three", tmp_path / "p3", "--include", "src/big1/b05.bin")
    assert list(old) == list(new) and old != new
    assert (tmp_path / "p1" / "src/big1/b05.bin").read_bytes() == random.Random(5).randbytes(
        160_000
    )
    assert (tmp_path / "p3" / "src/big1/b05.bin").read_bytes() == (
        src / "big1" / "b05.bin"
    ).read_bytes()


def test_prune_frees_exactly_the_contents_and_chunks_no_snapshot_uses(tmp_path):
    """After a snapshot is deleted, a dry run counts and prune deletes the contents no entry
    names (and not one that another snapshot names under another path), then frees their
    chunks; the remaining snapshot restores from k remotes with no local state."""
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    write(src / "kept.bin", 1, 3_000_000)  # in both snapshots
    write(src / "only-old.bin", 2, 4_000_000)  # only in the first one
    (src / "empty").write_bytes(b"")
    run_cli("backup", str(src), "--name", "old", home=home)
    _gone, gone_chunks = content_of(home, "old", "src/only-old.bin")
    kept = content_of(home, "old", "src/kept.bin")
    (src / "only-old.bin").unlink()
    shutil.copy(src / "kept.bin", src / "renamed-kept.bin")  # kept's bytes under a new path
    write(src / "new.bin", 3, 1_000_000)
    run_cli("backup", str(src), "--name", "new", home=home)
    assert content_of(home, "new", "src/renamed-kept.bin") == kept
    before = rows(home)

    run_cli("snapshot", "delete", "old", home=home)
    assert rows(home)["contents"] == before["contents"], "deleting a snapshot frees nothing"
    dry = json.loads(run_cli("prune", "--dry-run", "--json", home=home).stdout)
    assert dry["contents_freed"] == 1 and dry["chunks_freed"] == gone_chunks
    assert rows(home)["contents"] == before["contents"], "a dry run deletes nothing"

    rep = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert rep["contents_freed"] == 1 and rep["chunks_freed"] == gone_chunks
    assert rep["bytes_freed"] == 4_000_000
    after = rows(home)
    assert after["contents"] == before["contents"] - 1
    assert after["content_chunks"] == before["content_chunks"] - gone_chunks
    assert after["chunks"] == before["chunks"] - gone_chunks
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        named = {c for (c,) in db.execute("SELECT content FROM entries WHERE type = 'f'")}
        held = {c for (c,) in db.execute("SELECT id FROM contents")}
        (missing,) = db.execute(
            "SELECT count(*) FROM content_chunks x WHERE NOT EXISTS"
            " (SELECT 1 FROM chunks c WHERE c.id = x.chunk)"
        ).fetchone()
    assert named == held and missing == 0
    again = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert again["contents_freed"] == 0 and again["chunks_freed"] == 0

    shutil.copy(home / "key.json", tmp_path / "key.json")
    expected = tree_digest(src)
    shutil.rmtree(home)
    out = tmp_path / "out"
    run_cli(
        "restore", "--keyfile", str(tmp_path / "key.json"), "--from", str(remotes[0]),
        "--from", str(remotes[2]), "--to", str(out), home=tmp_path / "fresh",
    )  # fmt: skip
    assert tree_digest(out / "src") == expected


def test_prune_that_died_after_deleting_contents_frees_their_chunks_next_time(tmp_path):
    """Crash state (docs/design.md): prune deleted the contents no entry names, then died
    before rewriting segments. Their chunks stay recorded, named by nothing; the next prune
    frees them and the rest of the vault still restores."""
    home, _remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    write(src / "keep.bin", 1, 300_000)
    run_cli("backup", str(src), "--name", "keep", home=home)
    write(tmp_path / "other" / "drop.bin", 2, 300_000)
    run_cli("backup", str(tmp_path / "other"), "--name", "drop", home=home)
    _content, dropped = content_of(home, "drop", "other/drop.bin")
    run_cli("snapshot", "delete", "drop", home=home)
    with contextlib.closing(Index(home / "index.db")) as index:
        assert contents_mod.delete_unreferenced(index) == 1  # prune's first step, then a crash
    rep = json.loads(run_cli("prune", "--json", home=home).stdout)
    assert rep["contents_freed"] == 0 and rep["chunks_freed"] == dropped
    assert restore(home, "keep", tmp_path / "out")["src/keep.bin"] == tree_digest(src)["keep.bin"]


# -- the migration from schema 2 ----------------------------------------------------------------
# tests/data/schema2_home.tar.gz holds home/index.db and home/key.json (passphrase PASSPHRASE)
# of a vault made by vaultfs with index schema 2 (before contents existed): `init -k 2 -n 3
# --segment-mib 1`, then `backup src` twice (snapshots "one" and "two") of the tree that
# fixture_tree() writes, with generation 1 and then 2.


def fixture_tree(root: Path, generation: int) -> None:
    """The tree backed up into the schema-2 fixture (``generation`` changes one file)."""
    r = random.Random(7)
    (root / "d" / "e").mkdir(parents=True, exist_ok=True)
    (root / "a.bin").write_bytes(r.randbytes(40_000))
    (root / "d" / "same.bin").write_bytes((root / "a.bin").read_bytes())
    (root / "d" / "e" / "empty").write_bytes(b"")
    (root / "d" / "small.txt").write_bytes(b"hello\n" * 10)
    (root / "changes.bin").write_bytes(random.Random(100 + generation).randbytes(30_000))


def schema2_home(tmp_path: Path) -> Path:
    with tarfile.open(DATA / "schema2_home.tar.gz") as t:
        t.extractall(tmp_path, filter="data")
    return tmp_path / "home"


def file_cids(db: sqlite3.Connection) -> dict[tuple[str, str], list[bytes]]:
    """{(snapshot name, path): chunk ids in order} of every file, read as schema 3 lays it."""
    out: dict[tuple[str, str], list[bytes]] = {}
    for name, path, content in db.execute(
        "SELECT s.name, e.path, e.content FROM entries e JOIN snapshots s ON s.id = e.snapshot"
        " WHERE e.type = 'f'"
    ).fetchall():
        out[(name, path)] = [
            bytes(cid)
            for (cid,) in db.execute(
                "SELECT c.cid FROM content_chunks x JOIN chunks c ON c.id = x.chunk"
                " WHERE x.content = ? ORDER BY x.seq",
                (content,),
            )
        ]
    return out


def test_a_schema2_index_is_converted_in_place(tmp_path):
    """An open without the key leaves the file at schema 2; the vault's open converts it:
    one content per distinct chunk list, each file's chunks those the chunker gives for its
    bytes, entry_chunks gone; a wrong key converts nothing."""
    home = schema2_home(tmp_path)
    keys = read_keyfile(home / "key.json", PASSPHRASE)
    path = home / "index.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        (old_lists,) = db.execute("SELECT count(*) FROM entry_chunks").fetchone()
    assert old_lists == 17

    with contextlib.closing(Index(path)) as index:  # no key: reading settings only
        assert index.one("PRAGMA user_version") == (2,)
    with pytest.raises(WrongKey):
        home_mod.load(home, None, VaultKeys.from_seed(bytes(32)), lock=False)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)

    _keys, index, _lock = home_mod.load(home, None, keys, lock=False)
    index.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "entry_chunks" not in tables
        (contents, lists) = db.execute(
            "SELECT (SELECT count(*) FROM contents), (SELECT count(*) FROM content_chunks)"
        ).fetchone()
        got = file_cids(db)
        refs = dict(db.execute("SELECT id, ref FROM contents"))
        named = dict(
            ((n, p), c)
            for n, p, c in db.execute(
                "SELECT s.name, e.path, e.content FROM entries e"
                " JOIN snapshots s ON s.id = e.snapshot WHERE e.type = 'f'"
            )
        )
        (avg,) = db.execute("SELECT value FROM settings WHERE key = 'chunk_avg'").fetchone()
    # a.bin and d/same.bin in both snapshots, changes.bin twice, empty, small.txt
    assert (contents, lists) == (5, 7)
    assert len({named[("one", "src/a.bin")], named[("two", "src/d/same.bin")]}) == 1
    cut = chunker.Chunker(keys.chunker_seed, keys.chunk_id_key, int(avg))
    for generation, snap in ((1, "one"), (2, "two")):
        tree = tmp_path / f"tree{generation}" / "src"
        fixture_tree(tree, generation)
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            rel = f"src/{f.relative_to(tree)}"
            want = [cut.chunk_id(c) for c in cut.chunks(io.BytesIO(f.read_bytes()))]
            assert got[(snap, rel)] == want, rel
            assert refs[named[(snap, rel)]] == chunker.content_ref(keys.chunk_id_key, want)

    # the converted vault carries on (its remotes moved here, new empty directories: a
    # missing one would be a remote unplugged, vaultfs/backends.py LocalRoot): a backup of
    # the unchanged tree adds entries and shares every content
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE remotes SET spec = ? || '/r' || id", (str(tmp_path),))
        db.commit()
        for (spec,) in db.execute("SELECT spec FROM remotes"):
            Path(spec).mkdir()
    run_cli("backup", str(tmp_path / "tree2" / "src"), "--name", "three", home=home)
    with contextlib.closing(Index(path)) as index:
        index.upgrade(keys.chunk_id_key)  # a current file: nothing to do
        assert index.one("SELECT count(*) FROM contents") == (5,)
        assert index.one("SELECT count(*) FROM content_chunks") == (7,)
        assert index.one("SELECT count(*) FROM entries") == (8 * 3,)


def test_the_schema2_conversion_is_one_transaction(tmp_path, monkeypatch):
    """A failure midway (here: the third content ref) leaves the file exactly at schema 2;
    the next open converts it."""
    home = schema2_home(tmp_path)
    keys = read_keyfile(home / "key.json", PASSPHRASE)
    path = home / "index.db"
    real = chunker.content_ref
    calls = []

    def failing(key: bytes, cids: list[bytes]) -> bytes:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("power cut")
        return real(key, cids)

    monkeypatch.setattr(chunker, "content_ref", failing)
    with contextlib.closing(Index(path)) as index, pytest.raises(OSError, match="power cut"):
        index.upgrade(keys.chunk_id_key)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM entry_chunks").fetchone() == (17,)
        assert db.execute("SELECT count(*) FROM contents").fetchone() == (0,)
        cols = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
        assert "content" not in cols
    monkeypatch.setattr(chunker, "content_ref", real)
    with contextlib.closing(Index(path)) as index:
        index.upgrade(keys.chunk_id_key)
        assert index.one("SELECT count(*) FROM contents") == (5,)
