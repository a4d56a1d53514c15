"""A one-file restore with no local state reads only the index blocks on the file's path (the
lazy index view, vaultfs/index/lazy.py) plus the file's data segments: byte-identical from
exactly k remotes, a corrupt meta shard decoded around and its remote named, too many corrupt
ones a clear error; the bytes read are those the metered backends and the in-place reads
count, reported by ``restore --json`` — with real rclone local remotes, real crypto and real
erasure coding."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from helpers import init_local_vault, run_cli, tree_digest, vaultfs_env

from vaultfs import erasure, merkle
from vaultfs.errors import IntegrityError, NotEnoughRemotes
from vaultfs.index import Index, segments
from vaultfs.indexblocks import BLOCK_SIZE

K, N = 3, 5
TARGET = "tree/d07/target.bin"
FIRST = ("--snapshot", "first")
FILES = 700  # per directory, of 12: an index of about 2 MiB


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path, Path]:
    """A 3-of-5 vault whose index spans several meta segments (many small files: many
    chunk, content and entry rows), with one file of 300 KiB among them, in snapshot
    "first"; the newest snapshot, "second", holds one directory. Returns (home, remotes,
    source tree, keyfile)."""
    tmp = tmp_path_factory.mktemp("lazy")
    home, remotes = init_local_vault(tmp, K, N, prefix="remote")
    src = tmp / "src"
    rng = random.Random(11)
    for d in range(12):
        (src / "tree" / f"d{d:02d}").mkdir(parents=True)
        for f in range(FILES):
            (src / "tree" / f"d{d:02d}" / f"f{f:03d}.txt").write_bytes(
                rng.randbytes(20 + rng.randrange(100))
            )
    (src / TARGET).write_bytes(rng.randbytes(300 << 10))
    # names that are not UTF-8: stored as BLOB paths (docs/format.md 9.1)
    (src / "tree" / "d03" / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n")
    odd = src / "tree" / "d05" / os.fsdecode(b"n\xffdir")
    odd.mkdir()
    (odd / "x.txt").write_bytes(b"under a directory whose name is not UTF-8\n")
    run_cli("backup", str(src / "tree"), "--name", "first", home=home)
    run_cli("backup", str(src / "tree" / "d00"), "--name", "second", home=home)
    return home, remotes, src, home / "key.json"


def _restore(
    tmp: Path, keyfile: Path, remotes: list[Path], *extra: str, check: int = 0, **env: str
):
    args = [a for r in remotes for a in ("--from", str(r))]
    return run_cli(
        "restore", *args, "--keyfile", str(keyfile), "--to", str(tmp / "out"),
        "--home", str(tmp / "empty-home"), "--json", *extra,
        home=tmp / "empty-home", check=check, env=vaultfs_env(tmp / "empty-home", **env),
    )  # fmt: skip


def _data_bytes(home: Path, path: str) -> int:
    """k shard objects of every data segment that holds a chunk of ``path`` (the newest
    snapshot's entry), from the writer's own index: what the file's data costs to read."""
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        segs = [
            s
            for (s,) in db.execute(
                "SELECT DISTINCT c.segment FROM entries e JOIN content_chunks x"
                " ON x.content = e.content JOIN chunks c ON c.id = x.chunk"
                " WHERE e.path = ? AND e.snapshot = (SELECT id FROM snapshots WHERE name = 'first')",
                (path,),
            )
        ]
        assert segs
        return sum(
            K * db.execute("SELECT max(size) FROM shards WHERE segment=?", (s,)).fetchone()[0]
            for s in segs
        )


def _meta_bytes(remotes: list[Path]) -> int:
    """Bytes of every meta object on the remotes given (what a full index fetch draws on)."""
    return sum(p.stat().st_size for r in remotes for p in (r / "meta").iterdir())


def _newest_manifest(remotes: list[Path]) -> int:
    return max(sorted((r / "manifests").iterdir())[-1].stat().st_size for r in remotes)


@pytest.mark.parametrize("in_place", ["1", "0"])
def test_one_file_from_exactly_k_remotes_reads_only_its_path(tmp_path, vault, in_place) -> None:
    """Read in place (local remotes), and through rclone: ranged ``cat`` of the shard
    objects, counted by the metered backends."""
    home, remotes, src, keyfile = vault
    proc = _restore(
        tmp_path, keyfile, remotes[1 : 1 + K], "--include", TARGET, *FIRST,
        VAULTFS_READ_IN_PLACE=in_place,
    )  # fmt: skip
    rep = json.loads(proc.stdout)
    out = tmp_path / "out"
    assert (out / TARGET).read_bytes() == (src / TARGET).read_bytes()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [TARGET]
    assert rep["warnings"] == []
    # the bytes read: a manifest per remote, the index blocks on the file's path (with the
    # map pages naming them), and k shards of the file's data segment
    index_budget = 24 * BLOCK_SIZE
    limit = K * _newest_manifest(remotes) + index_budget + _data_bytes(home, TARGET)
    assert 0 < rep["bytes_read"] <= limit, (rep["bytes_read"], limit)
    assert rep["bytes_read"] == sum(r["bytes_read"] for r in rep["remotes"])
    # and far less than the index a full fetch reads (k/n of the meta objects)
    assert rep["bytes_read"] - _data_bytes(home, TARGET) < _meta_bytes(remotes) * K // N // 3


def test_directory_and_non_utf8_paths_through_the_lazy_view(tmp_path, vault) -> None:
    """A directory: every entry under it (a name that is not UTF-8 included) and nothing
    else; a directory whose own name is not UTF-8."""
    home, remotes, src, keyfile = vault
    odd = os.fsdecode(b"tree/d05/n\xffdir")
    proc = _restore(
        tmp_path, keyfile, remotes[:K], "--include", "tree/d03/", "--include", odd, *FIRST
    )
    rep = json.loads(proc.stdout)
    got = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    want = sorted(
        p.relative_to(src) for d in ("tree/d03", odd) for p in (src / d).rglob("*") if p.is_file()
    )
    dirs = [Path("tree"), Path("tree/d03"), Path("tree/d05"), Path(odd)]
    assert got == sorted([*dirs, *want])
    for p in want:
        assert (tmp_path / "out" / p).read_bytes() == (src / p).read_bytes()
    assert rep["entries"] == len(want) + len(dirs)


def _corrupt_meta(remote: Path) -> int:
    """Flip one byte in every 4 KiB of every meta shard object on ``remote`` (same size)."""
    count = 0
    for p in (remote / "meta").iterdir():
        data = bytearray(p.read_bytes())
        for at in range(100, len(data), 4096):
            data[at] ^= 0x40
        p.write_bytes(bytes(data))
        count += 1
    return count


def _first_block_holder(home: Path, remotes: list[Path]) -> int:
    """Which remote holds data shard 0 of the newest commit's first meta segment: the one
    holding the shipped index's first block (sealed first, at offset 0), which every open
    of the lazy view reads."""
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        (spec,) = db.execute(
            "SELECT r.spec FROM shards s JOIN remotes r ON r.id = s.remote WHERE s.idx = 0"
            " AND s.segment = (SELECT min(id) FROM segments WHERE kind = 'meta' AND"
            " manifest = (SELECT max(manifest) FROM segments WHERE kind = 'meta'))"
        ).fetchone()
    return [str(r) for r in remotes].index(spec)


def test_corrupt_meta_shards_on_one_remote_are_decoded_around_and_named(tmp_path, vault) -> None:
    home, remotes, src, keyfile = vault
    bad = _first_block_holder(home, remotes)
    # copies (the module's vault stays intact): the remote holding the first block, and k more
    order = [bad, *[i for i in range(N) if i != bad][:K]]
    copies = [tmp_path / f"copy{i}" for i in order]
    for i, c in zip(order, copies, strict=True):
        shutil.copytree(remotes[i], c)
    assert _corrupt_meta(copies[0]) > 0
    proc = _restore(tmp_path, keyfile, copies, "--include", TARGET, *FIRST)
    rep = json.loads(proc.stdout)
    assert (tmp_path / "out" / TARGET).read_bytes() == (src / TARGET).read_bytes()
    named = [w for w in rep["warnings"] if str(copies[0]) in w]
    assert any("is corrupt; decoding around it" in w for w in named), rep["warnings"]
    assert not [w for w in rep["warnings"] if any(str(c) in w for c in copies[1:])]


def test_corrupt_meta_shards_on_more_than_n_minus_k_remotes_fail_clearly(tmp_path, vault) -> None:
    home, remotes, src, keyfile = vault
    copies = [tmp_path / f"copy{i}" for i in range(N)]
    for r, c in zip(remotes, copies, strict=True):
        shutil.copytree(r, c)
    for c in copies[: N - K + 1]:
        _corrupt_meta(c)
    proc = _restore(tmp_path, keyfile, copies, "--include", TARGET, *FIRST, check=None)
    err = proc.stderr.decode()
    assert proc.returncode in (NotEnoughRemotes.exit_code, 12), err
    assert "Traceback" not in err
    assert "meta segment" in err, err
    assert not (tmp_path / "out" / TARGET).exists()


@pytest.mark.parametrize(("k", "n", "alg"), [(3, 5, 1), (5, 9, 1), (7, 15, 2)])
def test_a_byte_range_of_any_k_fragments_decodes_to_the_data_payloads(k, n, alg) -> None:
    """The range decode the lazy view uses agrees with liberasurecode, fragment by
    fragment, for both erasure algorithms (a singular set of algorithm 1 raises)."""
    seg = random.Random(k * n).randbytes(100_000)
    frags = erasure.encode(seg, k, n, alg)
    payload = len(frags[0]) - erasure.FRAGMENT_HEADER
    lo, hi = 1234, 5678
    at = erasure.FRAGMENT_HEADER
    decoded = 0
    for subset in itertools.islice(itertools.combinations(range(n), k), 0, None, 7):
        pieces = {i: frags[i][at + lo : at + hi] for i in subset}
        for want in range(k):
            try:
                got = erasure.decode_range(pieces, want, k, alg)
            except IntegrityError:
                assert alg == 1 and n - k >= 5
                break
            assert got == seg[want * payload + lo : want * payload + hi]
            decoded += 1
    assert decoded > 0


def test_an_older_snapshot_whole_through_the_lazy_view_and_the_newest_streamed(
    tmp_path, vault
) -> None:
    home, remotes, src, keyfile = vault
    first = tmp_path / "first"
    first.mkdir()
    _restore(first, keyfile, remotes[2:], *FIRST)
    assert tree_digest(first / "out" / "tree") == tree_digest(src / "tree")
    newest = tmp_path / "newest"
    newest.mkdir()
    rep = json.loads(_restore(newest, keyfile, remotes[:K]).stdout)
    assert tree_digest(newest / "out" / "d00") == tree_digest(src / "tree" / "d00")
    assert rep["warnings"] == []


def test_the_data_segments_read_a_page_at_a_time_are_those_of_one_page(vault) -> None:
    # the vault-root check of a streamed restore reads them in pages (keyset on the id)
    home = vault[0]
    index = Index(home / "index.db")
    try:
        whole = list(segments.data_segment_roots(index, page=1 << 20))
        assert len(whole) >= 2
        for page in (1, 2):
            assert list(segments.data_segment_roots(index, page=page)) == whole
        assert [(sid, root) for sid, root, _shards in whole] == segments.data_roots_by_id(index)
        folded = merkle.Root()
        for _sid, root, shard_roots in whole:
            assert merkle.root(shard_roots) == root
            folded.add(root)
        assert folded.root() == merkle.root([root for _sid, root, _shards in whole])
    finally:
        index.close()
