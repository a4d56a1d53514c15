"""The index shipped as content-addressed blocks (docs/format.md 9, vaultfs/vault/metaship.py):
a small change seals a few blocks, restore and the stranger's reader reassemble the shipped
copy byte for byte, a crash between sealing and the manifest (or before the sidecar) loses
nothing, and garbage collection never deletes what a kept manifest names — with real rclone
local remotes, real crypto and real erasure coding."""

from __future__ import annotations

import contextlib
import random
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import format_reader as fr
import pytest

from vaultfs import indexblocks, manifest, segment
from vaultfs.backends import open_backend
from vaultfs.backup import backup_paths
from vaultfs.errors import IntegrityError, VaultError
from vaultfs.index import Index, audit
from vaultfs.index import remotes as remote_rows
from vaultfs.index import segments as seg_table
from vaultfs.index.shipped import ShippedObjects
from vaultfs.indexblocks import BLOCK_SIZE, MAP_FANOUT, object_id
from vaultfs.keys import VaultKeys
from vaultfs.restore import ShardSource, fetch_index, find_manifest
from vaultfs.vault import Vault, metaship

PW = "pw-for-metaship-tests"


class Crash(Exception):
    pass


def make_vault(tmp_path: Path) -> tuple[Vault, list[str]]:
    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    return Vault.create(tmp_path / "home", remotes, 2, 3, PW, segment_size=1 << 20), remotes


def many_files(src: Path, count: int, seed: int) -> None:
    """``count`` small files of distinct content: many index rows, so many blocks."""
    rng = random.Random(seed)
    src.mkdir(exist_ok=True)
    for i in range(count):
        (src / f"f{i:05d}.txt").write_bytes(rng.randbytes(200 + rng.randrange(300)))


@pytest.fixture
def shipped_copies(monkeypatch) -> list[bytes]:
    """Every index copy :func:`metaship.ship` ships, in order (read before it is deleted)."""
    copies: list[bytes] = []
    real = metaship.ship

    def keep(index, keys, suite, segment_size, export, shipped, write, *more, **kw):
        copies.append(export.read_bytes())
        return real(index, keys, suite, segment_size, export, shipped, write, *more, **kw)

    monkeypatch.setattr(metaship, "ship", keep)
    return copies


def remote_index(
    keys: VaultKeys, remotes: list[str], dest: Path, shipped: ShippedObjects | None = None
) -> manifest.Manifest:
    """Fetch the newest manifest's index from ``remotes`` into ``dest`` (restore's path)."""
    src = ShardSource([open_backend(r) for r in remotes])
    src.start()
    try:
        m, _w = find_manifest(keys, src)
        src.stop_read_ahead()
        src.list_all()
        fetch_index(keys, m, src, dest, shipped)
    finally:
        src.stop()
    return m


def kept_manifests(keys: VaultKeys, remote: str) -> list[manifest.Manifest]:
    return [
        manifest.read(keys, p.read_bytes()) for p in sorted(Path(remote, "manifests").iterdir())
    ]


def test_a_small_change_seals_a_few_blocks_and_restore_reassembles_the_shipped_copy(
    tmp_path, shipped_copies
):
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 10000, seed=1)
    with v:
        backup_paths(v, [src])
        first = v.committer.last_shipped
        assert first is not None and first.blocks == -(-len(shipped_copies[-1]) // BLOCK_SIZE)
        assert first.blocks > MAP_FANOUT  # a map of several pages: the test means something
        assert first.sealed_blocks == first.blocks  # nothing was shipped before
        assert first.map_pages == -(-first.blocks // MAP_FANOUT)
        assert v.flush().complete
        # a snapshot of one small file (a snapshot repeats every entry of its tree: that
        # cost belongs to the entries, not to how the index is shipped)
        small = tmp_path / "small"
        small.mkdir()
        (small / "note.txt").write_bytes(b"a small change\n")
        backup_paths(v, [small])
        second = v.committer.last_shipped
        assert v.flush().complete
        new_meta = v.index.q(
            "SELECT used FROM segments WHERE kind='meta' AND manifest=(SELECT max(seq) FROM manifests)"
        )
        keys = v.keys
    assert second is not None and second.blocks >= first.blocks
    # only the blocks the change touched (and the map pages listing them) were sealed ...
    assert 0 < second.sealed_blocks <= min(32, second.blocks // 4)
    assert second.sealed_map_pages <= second.map_pages and second.recopied == 0
    # ... and the bytes queued for meta segments are theirs alone: about a block each
    assert sum(u for (u,) in new_meta) == second.sealed_bytes
    objects = second.sealed_blocks + second.sealed_map_pages
    assert second.sealed_bytes <= objects * (BLOCK_SIZE + 100)
    assert second.sealed_bytes < len(shipped_copies[-1]) // 3
    # restore and the stranger's reader both give back the very file that was shipped
    side = ShippedObjects(tmp_path / "rebuilt-sidecar.db")
    m = remote_index(keys, remotes[:2], tmp_path / "restored.db", side)
    assert (tmp_path / "restored.db").read_bytes() == shipped_copies[-1]
    assert m.contents.index_length == len(shipped_copies[-1])
    # a rebuilt home's sidecar knows where every block is, in a segment the manifest names
    named = {seg.uid for seg in m.contents.index_segments}
    copy = shipped_copies[-1]
    with side.reader(m.suite) as look:
        for off in range(0, len(copy), BLOCK_SIZE):
            loc = look.get(object_id(keys.metadata_key, copy[off : off + BLOCK_SIZE]))
            assert loc is not None and loc.uid in named
    stranger = fr.Remotes([Path(r) for r in remotes[1:]])
    fkeys = fr.Keys.from_seed(keys.seed)
    with contextlib.closing(
        fr.open_index(fkeys, stranger, fr.choose_manifest(fkeys, stranger), tmp_path / "s.db")
    ):
        assert (tmp_path / "s.db").read_bytes() == shipped_copies[-1]


def test_restore_refuses_a_map_that_does_not_cover_the_length(tmp_path):
    """A manifest whose index length and block map disagree is refused with an
    IntegrityError, never reassembled into a shorter or padded file."""
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 300, seed=2)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    m = remote_index(keys, remotes, tmp_path / "ok.db")
    doc = m.body | {"index": m.body["index"] | {"length": m.contents.index_length + BLOCK_SIZE}}
    longer = manifest.Manifest(m.seq, m.created_ms, doc, m.suite, m.sig_alg)
    src_ = ShardSource([open_backend(r) for r in remotes])
    src_.start()
    try:
        src_.stop_read_ahead()
        src_.list_all()
        with pytest.raises(IntegrityError, match="index map"):
            fetch_index(keys, longer, src_, tmp_path / "bad.db")
    finally:
        src_.stop()


def test_crash_after_sealing_blocks_before_the_manifest(tmp_path, monkeypatch, shipped_copies):
    """A commit that dies after its new meta segments are recorded (before the manifest), and
    one that dies after the manifest but before the sidecar is written: the next open drops
    the unnamed segments, the next commit seals what the remotes lack again, and the remotes
    restore the newest state."""
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 400, seed=3)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        (src / "g.txt").write_bytes(b"first change\n" * 100)

        def boom(*a, **kw):
            raise Crash("the process dies before the manifest is written")

        with monkeypatch.context() as mp, pytest.raises(Crash):
            mp.setattr("vaultfs.manifest.encode", boom)
            backup_paths(v, [src], upload=True)
    v = Vault.open(tmp_path / "home", PW)
    with v:
        unnamed = v.index.q(
            "SELECT id FROM segments WHERE kind='meta' AND id NOT IN"
            " (SELECT segment FROM manifest_segments)"
        )
        assert not unnamed  # dropped at open
        (src / "h.txt").write_bytes(b"second change\n" * 100)
        with monkeypatch.context() as mp, pytest.raises(Crash):
            mp.setattr(ShippedObjects, "record", boom)
            backup_paths(v, [src])
    v = Vault.open(tmp_path / "home", PW)
    with v:
        (src / "i.txt").write_bytes(b"third change\n" * 100)
        backup_paths(v, [src])
        third = v.committer.last_shipped
        assert v.flush().complete
        keys = v.keys
    # the sidecar missed the second commit's blocks: sealed again, and nothing else is wrong
    assert third is not None and third.sealed_blocks > 0
    assert remote_index(keys, remotes[:2], tmp_path / "restored.db").seq == 3
    assert (tmp_path / "restored.db").read_bytes() == shipped_copies[-1]
    for name in ("g.txt", "h.txt", "i.txt"):
        assert (
            fr.recover_file(keys.seed, [Path(r) for r in remotes[1:]], f"src/{name}")
            == (src / name).read_bytes()
        )


def test_garbage_and_compaction_keep_everything_a_kept_manifest_names(
    tmp_path, monkeypatch, shipped_copies
):
    """Many commits, the vault reopened in between (recovery runs: a segment whose first
    manifest was pruned but that a kept one still names is no leftover of a crash), then
    compaction forced on (any sparse segment is moved): the remotes hold only meta segments
    a kept manifest names, every kept manifest's segments are all there and each kept
    manifest's index reassembles."""
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 300, seed=4)

    def commits(v: Vault, first: int, count: int) -> int:
        recopied = 0
        for i in range(first, first + count):
            (src / f"change{i}.txt").write_bytes(f"change {i}\n".encode() * 50)
            backup_paths(v, [src])
            recopied += v.committer.last_shipped.recopied
            assert v.flush().complete
        return recopied

    with v:
        commits(v, 0, 5)
        first_named = v.index.one(
            "SELECT count(*) FROM segments WHERE kind='meta' AND manifest NOT IN"
            " (SELECT seq FROM manifests)"
        )[0]
    assert first_named > 0  # a shared segment whose first manifest was pruned: the case
    v = Vault.open(tmp_path / "home", PW)
    monkeypatch.setattr(metaship, "SPARSE_KEPT", 0)
    with v:
        recopied = commits(v, 5, 4)
        keys = v.keys
    assert recopied > 0  # compaction ran
    mans = kept_manifests(keys, remotes[0])
    assert len(mans) == Vault.KEEP_INDEX_COPIES
    named = {s.name for m in mans for seg in m.contents.index_segments for s in seg.shards}
    stored = {p.name for r in remotes for p in Path(r, "meta").iterdir()}
    assert stored == named  # garbage went; every shard a kept manifest names is there
    # every kept manifest's index reassembles (the oldest kept one too) from two remotes
    stranger = fr.Remotes([Path(r) for r in remotes[:2]])
    fkeys = fr.Keys.from_seed(keys.seed)
    seqs = sorted(m.seq for m in kept_manifests(keys, remotes[0]))
    for seq, copy in zip(seqs, shipped_copies[-len(seqs) :], strict=True):
        blob = next(Path(remotes[0], "manifests").glob(f"{seq:016d}-*")).read_bytes()
        out = tmp_path / f"kept-{seq}.db"
        fr.open_index(fkeys, stranger, fr.open_manifest(fkeys, blob), out).close()
        assert out.read_bytes() == copy


def test_a_manifest_readers_would_refuse_is_never_written(tmp_path, monkeypatch):
    """An index whose manifest would pass the readers' size bound fails the commit with a
    clear error; the remotes keep the previous manifest and the vault opens and restores."""
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 50, seed=5)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        with monkeypatch.context() as mp:
            mp.setattr(manifest, "MAX_BYTES", 1000)
            with pytest.raises(VaultError, match="more than readers accept"):
                backup_paths(v, [src])
        keys = v.keys
    with Vault.open(tmp_path / "home", PW) as v:
        assert v.flush().complete
    assert remote_index(keys, remotes[:2], tmp_path / "restored.db").seq == 1


def test_records_just_over_a_size_class_are_split_into_two_classes_not_padded_to_the_next(
    tmp_path,
):
    """About 1.1 MiB of fresh records would be padded to a 2 MiB segment: they are shipped as
    a 1 MiB segment and a 256 KiB one instead (both size classes), and every map entry and
    map page points at a record that opens to its object, the moved ones included."""
    v, _remotes = make_vault(tmp_path)
    written: dict[bytes, bytes] = {}

    def write(uid: bytes, padded: bytes):
        written[uid] = padded
        return len(written), [], b"\0" * 32

    export = tmp_path / "export.db"
    export.write_bytes(random.Random(5).randbytes(70 * BLOCK_SIZE))  # incompressible
    with v:
        keys, suite = v.keys, v.committer.suite
        got = metaship.ship(
            v.index, keys, suite, 4 << 20, export, ShippedObjects(tmp_path / "side.db"), write
        )
    assert sorted(m.size for m in got.new) == [256 << 10, 1 << 20]
    assert sum(m.used for m in got.new) == got.stats.sealed_bytes > 1 << 20

    def opened(oid: bytes, loc) -> bytes:
        record = written[loc.uid][loc.offset : loc.offset + loc.length]
        return indexblocks.open_record(keys.metadata_key, keys.vault_id, oid, record, suite)

    data = export.read_bytes()
    pos = 0
    for page in got.pages:
        entries = indexblocks.decode_map_page(opened(page.id, page))
        for oid, loc in entries:
            assert opened(oid, loc) == data[pos * BLOCK_SIZE : (pos + 1) * BLOCK_SIZE]
            pos += 1
    assert pos == 70
    assert {loc.uid for loc in got.sealed.values()} == set(written)


def test_map_pages_fill_the_segment_below_when_no_block_record_has_to_move(tmp_path):
    """Block records that end a few KiB under 1 MiB, and the map page that follows them: the
    page fits in the 1 MiB segment, so one segment is written (before, the page opened a
    256 KiB segment of its own), and every object opens from where the map says."""
    v, _remotes = make_vault(tmp_path)
    written: dict[bytes, bytes] = {}

    def write(uid: bytes, padded: bytes):
        written[uid] = padded
        return len(written), [], b"\0" * 32

    rng = random.Random(6)
    with v:
        keys, suite = v.keys, v.committer.suite
        sample = rng.randbytes(BLOCK_SIZE)
        record = len(
            indexblocks.seal(
                keys.metadata_key, keys.vault_id, object_id(keys.metadata_key, sample),
                sample, suite,
            )
        )  # fmt: skip
        # 63 whole blocks and a short one whose record ends 5,000 bytes under 1 MiB
        last = (1 << 20) - 5000 - 64 * record + BLOCK_SIZE
        export = tmp_path / "export.db"
        export.write_bytes(rng.randbytes(63 * BLOCK_SIZE + last))  # incompressible
        got = metaship.ship(
            v.index, keys, suite, 4 << 20, export, ShippedObjects(tmp_path / "side.db"), write
        )
    sealed_blocks = got.stats.sealed_bytes - got.pages[0].length
    assert sealed_blocks == (1 << 20) - 5000  # the page's bound (7.7 KiB) would pass 1 MiB
    assert [m.size for m in got.new] == [1 << 20] and got.stats.sealed_map_pages == 1

    def opened(oid: bytes, loc) -> bytes:
        record = written[loc.uid][loc.offset : loc.offset + loc.length]
        return indexblocks.open_record(keys.metadata_key, keys.vault_id, oid, record, suite)

    data = export.read_bytes()
    (page,) = got.pages
    raw = opened(page.id, page)
    for pos, (oid, loc) in enumerate(indexblocks.decode_map_page(raw)):
        assert indexblocks.map_entry(raw, pos) == (oid, loc)  # the lazy view's one-entry read
        assert opened(oid, loc) == data[pos * BLOCK_SIZE : (pos + 1) * BLOCK_SIZE]


def test_an_index_with_shards_state_over_every_shard_gets_the_partial_one(tmp_path):
    """``shards_state`` indexes only the shards still to upload (a placed shard leaves it, so
    a big backup's shards placed do not rewrite it); an index written with the index over
    every shard gets the partial one at open, its layout version unchanged, and the upload
    queue's lookups still use it."""
    path = tmp_path / "index.db"
    Index(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(
            "DROP INDEX shards_state; CREATE INDEX shards_state ON shards(state, remote);"
        )
        (version,) = db.execute("PRAGMA user_version").fetchone()
    index = Index(path)
    try:
        (sql,) = index.one("SELECT sql FROM sqlite_schema WHERE name='shards_state'")
        assert sql.endswith("WHERE state = 'queued'")
        assert index.one("PRAGMA user_version")[0] == version
        plan = index.q("EXPLAIN QUERY PLAN SELECT count(*) FROM shards WHERE state='queued'")
        assert any("shards_state" in row[3] for row in plan)
    finally:
        index.close()


def _name_index_pages(copy: Path) -> dict[str, dict[int, bytes]]:
    """{B-tree name: {page number: page bytes}} of the two name-keyed indexes in ``copy``."""
    db = sqlite3.connect(copy)
    try:
        (psz,) = db.execute("PRAGMA page_size").fetchone()
        rows = db.execute(
            "SELECT name, pageno FROM dbstat WHERE name IN"
            " ('sqlite_autoindex_shards_1', 'sqlite_autoindex_audit_tags_1')"
        ).fetchall()
    finally:
        db.close()
    data = copy.read_bytes()
    out: dict[str, dict[int, bytes]] = {}
    for name, pageno in rows:
        out.setdefault(name, {})[pageno] = data[(pageno - 1) * psz : pageno * psz]
    return out


def _dirty_name_pages(tmp_path: Path, draw: Callable[[int], str]) -> dict[str, int]:
    """A history of 6,000 shards (2,000 segments of 3, each with its audit tags, 100 segments
    a second as a big backup makes them), then 60 more an hour later (about the meta shards
    of a big commit, which the next commit's index is the first to record): the pages of
    each name index that changed in the shipped copy. ``draw(t)`` names a shard made at
    second ``t``."""
    index = Index(tmp_path / "index.db")
    seg_id = 0

    def add(count: int, t: int) -> None:
        nonlocal seg_id
        with index.tx() as db:
            for _ in range(count):
                seg_id += 1
                seg_table.insert(
                    db, seg_id, seg_id.to_bytes(16, "big"), "data", 1, 1, 2, 3, 1, 0, b"r", float(t)
                )
                names = [draw(t) for _ in range(3)]
                seg_table.add_queued_shards(
                    db, seg_id, [(i, nm, rid, 1, b"h", b"b", b"r") for i, nm in enumerate(names)]
                )
                audit.put_tags(db, [(nm, 2048, bytes(40)) for nm in names])

    try:
        with index.tx() as db:
            rid = remote_rows.add(db, "r0", 0)
        t0 = 1_800_000_000
        for second in range(20):
            add(100, t0 + second)
        index.export_to(tmp_path / "a.db")
        add(20, t0 + 3600)
        index.export_to(tmp_path / "b.db")
    finally:
        index.close()
    before, after = _name_index_pages(tmp_path / "a.db"), _name_index_pages(tmp_path / "b.db")
    assert set(after) == {"sqlite_autoindex_shards_1", "sqlite_autoindex_audit_tags_1"}
    return {
        name: sum(before[name].get(p) != page for p, page in pages.items())
        for name, pages in after.items()
    }


def test_names_follow_the_clock_so_a_commits_rows_touch_few_pages_of_the_name_indexes(tmp_path):
    """Shard names are 32 lowercase hex digits, the first 8 the second they were drawn in
    (format.md 2): a commit's new rows go to the last pages of ``shards.name`` and
    ``audit_tags.name`` (a leaf, and at a split its siblings and parent), where random names
    dirty about a page each (docs/benchmarks.md, "lifetime")."""
    names = [segment.new_name(t) for t in (1_800_000_000, 1_800_000_001, 1_800_000_001)]
    assert all(re.fullmatch("[0-9a-f]{32}", nm) for nm in names)
    assert names[0][:8] == f"{1_800_000_000:08x}" and len(set(names)) == 3
    assert names[0] < names[1] and names[0] < names[2]
    assert segment.new_name(2**32 + 5)[:8] == "00000005"  # modulo 2**32: only locality
    (tmp_path / "timed").mkdir()
    (tmp_path / "random").mkdir()
    timed = _dirty_name_pages(tmp_path / "timed", segment.new_name)
    rng = random.Random(11)
    scattered = _dirty_name_pages(tmp_path / "random", lambda _t: rng.randbytes(16).hex())
    for name in timed:
        # a balance touches the last leaf, up to two siblings, a new leaf and the parent
        assert timed[name] <= 8, (name, timed, scattered)
        assert scattered[name] >= 4 * timed[name], (name, timed, scattered)


def test_a_commit_that_writes_many_meta_segments_ships_the_index_again_recording_them(
    tmp_path, monkeypatch, shipped_copies
):
    """Past ``SETTLE_AFTER`` new meta segments (forced here: any), a commit records them and
    ships the index a second time: the index its manifest names already holds their shard
    rows and audit tags (so the next commit does not carry them), the manifest names the
    segments of both passes, and restore and the stranger's reader read it back whole."""
    monkeypatch.setattr(metaship, "SETTLE_AFTER", 0)
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 400, seed=7)
    with v:
        backup_paths(v, [src])
        stats = v.committer.last_shipped
        assert v.flush().complete
        seq = v.index.one("SELECT max(seq) FROM manifests")[0]
        both = {
            sid
            for (sid,) in v.index.q(
                "SELECT id FROM segments WHERE kind='meta' AND manifest=?", (seq,)
            )
        }
        named = {
            sid
            for (sid,) in v.index.q(
                "SELECT segment FROM manifest_segments WHERE manifest=?", (seq,)
            )
        }
        keys = v.keys
    assert stats is not None and stats.settled is not None and stats.segments >= 1
    assert len(shipped_copies) == 2  # the two passes of the one commit
    assert both == named  # every segment of both passes is named by the manifest
    m = remote_index(keys, remotes[1:], tmp_path / "restored.db")
    assert m.seq == seq and (tmp_path / "restored.db").read_bytes() == shipped_copies[-1]
    with contextlib.closing(sqlite3.connect(tmp_path / "restored.db")) as db:
        first = [
            sid
            for (sid,) in db.execute(
                "SELECT id FROM segments WHERE kind='meta' AND manifest=?", (seq,)
            )
        ]
        tagged = db.execute(
            "SELECT count(*) FROM shards s JOIN audit_tags t ON t.name = s.name"
            f" WHERE s.segment IN ({','.join('?' * len(first))})",
            first,
        ).fetchone()[0]
    # the first pass's segments, their n shards and tags, are in the index the manifest names
    assert len(first) == stats.segments and tagged == 3 * len(first)
    assert len(named) == stats.segments + stats.settled.segments
    f = sorted(src.iterdir())[5]
    assert fr.recover_file(keys.seed, [Path(r) for r in remotes[:2]], f"src/{f.name}") == (
        f.read_bytes()
    )


def test_a_crash_between_the_two_passes_drops_the_first_ones_segments(tmp_path, monkeypatch):
    """A commit that dies in its second pass (its first pass's meta segments recorded, no
    manifest): the next open drops them like any unnamed segments, and the next commit
    ships an index the remotes restore."""
    monkeypatch.setattr(metaship, "SETTLE_AFTER", 0)
    v, remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 200, seed=8)
    real = metaship.ship

    def second_pass_dies(*a, **kw):
        if a[-1] is not None:  # ``earlier``: the second pass
            raise Crash("the process dies in the second pass")
        return real(*a, **kw)

    with v:
        with monkeypatch.context() as mp, pytest.raises(Crash):
            mp.setattr(metaship, "ship", second_pass_dies)
            backup_paths(v, [src])
        assert v.index.q("SELECT id FROM segments WHERE kind='meta'")  # the first pass's
    v = Vault.open(tmp_path / "home", PW)
    with v:
        assert not v.index.q(
            "SELECT id FROM segments WHERE kind='meta' AND id NOT IN"
            " (SELECT segment FROM manifest_segments)"
        )
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    f = sorted(src.iterdir())[3]
    assert fr.recover_file(keys.seed, [Path(r) for r in remotes[1:]], f"src/{f.name}") == (
        f.read_bytes()
    )


def test_the_export_is_the_checkpointed_file_or_the_online_backup_page_for_page(tmp_path):
    """``Index.export_to`` copies the database file after a checkpoint empties the log; while
    another connection reads an older state the checkpoint cannot finish and the online
    backup copies instead. Both copies hold the same pages (but the header page) and the
    same rows, with queued shards placed, in rollback-journal mode."""
    v, _remotes = make_vault(tmp_path)
    src = tmp_path / "src"
    many_files(src, 300, seed=9)
    with v:
        backup_paths(v, [src])  # not flushed: its shards are still queued
        index = v.index
        assert index.one("SELECT count(*) FROM shards WHERE state='queued'")[0] > 0
        index.set("export-test", 1)  # a page in the log
        with contextlib.closing(sqlite3.connect(index.path)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM settings").fetchone()  # holds the log
            slow = tmp_path / "slow.db"
            index.export_to(slow)
            assert Path(f"{index.path}-wal").stat().st_size > 0  # not emptied: a backup
            reader.execute("COMMIT")
        fast = tmp_path / "fast.db"
        index.export_to(fast)  # nothing written since
        assert Path(f"{index.path}-wal").stat().st_size == 0  # the checkpoint emptied it
    a, b = fast.read_bytes(), slow.read_bytes()
    page = int.from_bytes(a[16:18], "big")
    assert len(a) == len(b) and a[page:] == b[page:]
    for copy in (fast, slow):
        assert copy.read_bytes()[18:20] == b"\x01\x01"  # rollback journal: one file
        with contextlib.closing(sqlite3.connect(copy)) as db:
            assert db.execute("SELECT count(*) FROM shards WHERE state='queued'").fetchone()[0] == 0
            assert db.execute("SELECT value FROM settings WHERE key='export-test'").fetchone() == (
                "1",
            )
