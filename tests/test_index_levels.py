"""The second map level (docs/format.md 9.2): a vault forced to describe its index in two
levels (the threshold :data:`metaship.ONE_LEVEL_MAX` lowered to nothing, segment pages of two
descriptors) backs up and snapshots over several commits, then restores in full and one file
(the lazy view) from exactly k remotes with no home, has its home rebuilt, verifies clean with
``--read-all``, keeps on the remotes only the meta segments a kept manifest names, and fails
clearly when a second-level page is corrupt on more than n-k remotes; a reader that knows one
level (or a body of unknown levels) refuses the manifest cleanly. Real rclone local remotes,
real crypto, real erasure coding."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sqlite3
from pathlib import Path

import format_reader as fr
import pytest
from helpers import PASSPHRASE, run_cli, tree_digest, vaultfs_env

from vaultfs import indexblocks, manifest
from vaultfs.backends import open_backend
from vaultfs.backup import backup_paths
from vaultfs.errors import IntegrityError, NotEnoughRemotes
from vaultfs.restore import ShardSource, index_description
from vaultfs.vault import Vault, metaship

K, N = 3, 5
TARGET = "tree/d03/target.bin"
COMMITS = 5  # more than Vault.KEEP_INDEX_COPIES: older index copies are garbage


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """A 3-of-5 vault of several thousand small files (an index of more than 128 blocks:
    several map pages) committed :data:`COMMITS` times with changes, every manifest in two
    levels. Returns (home, remotes, source tree)."""
    tmp = tmp_path_factory.mktemp("levels")
    home, src = tmp / "home", tmp / "src"
    remotes = [tmp / f"remote{i}" for i in range(N)]
    rng = random.Random(9)
    for d in range(8):
        (src / "tree" / f"d{d:02d}").mkdir(parents=True)
        for f in range(700):
            (src / "tree" / f"d{d:02d}" / f"f{f:03d}.txt").write_bytes(
                rng.randbytes(20 + rng.randrange(100))
            )
    (src / TARGET).write_bytes(rng.randbytes(200 << 10))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metaship, "ONE_LEVEL_MAX", 0)
        mp.setattr(metaship, "SEGMENT_PAGE_FANOUT", 2)
        v = Vault.create(home, [str(r) for r in remotes], K, N, PASSPHRASE, segment_size=1 << 20)
        with v:
            for i in range(COMMITS):
                if i:  # each commit changes a few files: blocks, map pages and segments move
                    for d in range(0, 8, 3):
                        (src / "tree" / f"d{d:02d}" / f"f{i:03d}.txt").write_bytes(
                            rng.randbytes(300)
                        )
                    (src / "tree" / f"new{i}.txt").write_bytes(b"commit %d\n" % i)
                backup_paths(v, [src / "tree"], name=f"c{i}")
                assert v.flush().complete
    return home, remotes, src


def _newest(keys_home: Path, remote: Path) -> manifest.Manifest:
    with Vault.open(keys_home, PASSPHRASE, lock=False) as v:
        keys = v.keys
    blob = sorted((remote / "manifests").iterdir())[-1].read_bytes()
    return manifest.read(keys, blob)


def _describe(home: Path, m: manifest.Manifest, remotes: list[Path]) -> manifest.IndexDescription:
    with Vault.open(home, PASSPHRASE, lock=False) as v:
        keys = v.keys
    src = ShardSource([open_backend(str(r)) for r in remotes])
    src.list_all()
    return index_description(keys, m, src, [])


def _restore(tmp: Path, home: Path, remotes: list[Path], *extra: str, check: int | None = 0):
    args = [a for r in remotes for a in ("--from", str(r))]
    empty = tmp / "empty-home"
    return run_cli(
        "restore", *args, "--keyfile", str(home / "key.json"), "--to", str(tmp / "out"),
        "--home", str(empty), "--json", *extra, home=empty, check=check, env=vaultfs_env(empty),
    )  # fmt: skip


def test_the_manifest_names_only_the_second_level(vault) -> None:
    home, remotes, _src = vault
    m = _newest(home, remotes[0])
    index = m.body["index"]
    assert index["levels"] == 2 and "map" not in index
    body = m.contents
    desc = _describe(home, m, remotes[:K])
    pages = indexblocks.map_pages(body.index_length, body.index_block_size)
    assert pages > 1 and len(desc.map) == pages  # the test means something: several pages
    assert len(body.index_map2) == 1 and len(body.index_segment_pages) > 1
    holders = {seg.uid for seg in body.index_segments}
    assert holders < {seg.uid for seg in desc.segments}
    # every block the map lists is in a segment the description names
    assert {p.uid for p in desc.map} <= {seg.uid for seg in desc.segments} - holders
    with contextlib.closing(sqlite3.connect(home / "index.db")) as db:
        named = {
            bytes(u)
            for (u,) in db.execute(
                "SELECT g.uid FROM segments g JOIN manifest_segments s ON s.segment = g.id"
                " WHERE s.manifest = ?",
                (m.seq,),
            )
        }
    assert named == {seg.uid for seg in desc.segments}  # garbage knows every one


def test_a_reader_of_one_level_or_of_unknown_levels_refuses_the_body(vault) -> None:
    """A version-2 reader that knows only one level (which ignores the unknown ``levels``
    key) finds no ``index.map`` and refuses the body as malformed, like a corrupt one; a body
    of a level count nobody writes is refused naming it. Neither is misread."""
    home, remotes, _src = vault
    body = _newest(home, remotes[0]).body
    one_level_view = body | {"index": {k: v for k, v in body["index"].items() if k != "levels"}}
    with pytest.raises(IntegrityError, match=r"index\.map: missing"):
        manifest.Body.from_dict(one_level_view)
    with pytest.raises(IntegrityError, match="an index of 3 levels; this vaultfs reads 1 or 2"):
        manifest.Body.from_dict(body | {"index": body["index"] | {"levels": 3}})


def test_full_and_one_file_restores_from_exactly_k_remotes_with_no_home(tmp_path, vault) -> None:
    home, remotes, src = vault
    rep = json.loads(_restore(tmp_path, home, remotes[2:]).stdout)
    assert rep["warnings"] == []
    assert tree_digest(tmp_path / "out" / "tree") == tree_digest(src / "tree")
    shutil.rmtree(tmp_path / "out")
    rep = json.loads(_restore(tmp_path, home, remotes[:K], "--include", TARGET).stdout)
    assert (tmp_path / "out" / TARGET).read_bytes() == (src / TARGET).read_bytes()
    meta = sum(p.stat().st_size for r in remotes for p in (r / "meta").iterdir())
    assert rep["bytes_read"] < meta * K // N // 2  # the lazy view: far from the whole index
    # the stranger's reader, from the document alone
    assert fr.recover_file(_seed(home), remotes[1:4], TARGET) == (src / TARGET).read_bytes()


def _seed(home: Path) -> bytes:
    with Vault.open(home, PASSPHRASE, lock=False) as v:
        return v.keys.seed


def test_verify_read_all_is_clean_and_only_named_meta_segments_stay(vault) -> None:
    home, remotes, _src = vault
    ver = json.loads(run_cli("verify", "--read-all", "--json", home=home).stdout)
    assert ver["clean"], ver
    # garbage: the remotes hold the meta segments the kept manifests name, no other
    kept = sorted((remotes[0] / "manifests").iterdir())
    assert len(kept) == Vault.KEEP_INDEX_COPIES < COMMITS
    with Vault.open(home, PASSPHRASE, lock=False) as v:
        keys = v.keys
    named = {
        s.name
        for p in kept
        for seg in _describe(home, manifest.read(keys, p.read_bytes()), remotes).segments
        for s in seg.shards
    }
    stored = {p.name for r in remotes for p in (r / "meta").iterdir()}
    assert stored == named


def test_a_second_level_page_corrupt_on_more_than_n_minus_k_remotes_fails_clearly(
    tmp_path, vault
) -> None:
    home, remotes, _src = vault
    body = _newest(home, remotes[0]).contents
    # the meta segment holding the second-level map page: its shards on n-k+1 remotes
    (holder,) = [seg for seg in body.index_segments if seg.uid == body.index_map2[0].uid]
    names = {s.name for s in holder.shards}
    copies = [tmp_path / f"copy{i}" for i in range(N)]
    for r, c in zip(remotes, copies, strict=True):
        shutil.copytree(r, c)
    bad = 0
    for c in copies:
        for p in (c / "meta").iterdir():
            if p.name in names and bad < N - K + 1:
                data = bytearray(p.read_bytes())
                data[-100] ^= 0x40
                p.write_bytes(bytes(data))
                bad += 1
    assert bad == N - K + 1
    proc = _restore(tmp_path, home, copies, check=None)
    err = proc.stderr.decode()
    assert proc.returncode in (NotEnoughRemotes.exit_code, 12), err
    assert "Traceback" not in err and "meta segment" in err


def test_home_rebuild_from_k_remotes_then_carry_on(tmp_path, vault) -> None:
    """Last in this module: the backup after the rebuild writes to the two remotes not
    given (they stay under their specs)."""
    home, remotes, src = vault
    copies = [tmp_path / f"copy{i}" for i in range(K)]
    for r, c in zip(remotes[2:], copies, strict=True):
        shutil.copytree(r, c)
    new_home = tmp_path / "rebuilt"
    args = [a for c in copies for a in ("--from", str(c))]
    run_cli("home", "rebuild", *args, "--keyfile", str(home / "key.json"), home=new_home)
    ver = json.loads(run_cli("verify", "--read-all", "--json", home=new_home).stdout)
    assert ver["clean"], ver
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "after.txt").write_bytes(b"after the rebuild\n")
    run_cli("backup", str(tmp_path / "more"), "--name", "after", home=new_home)
    out = tmp_path / "restored"
    run_cli("restore", "--snapshot", "c4", "--to", str(out), home=new_home)
    assert tree_digest(out / "tree") == tree_digest(src / "tree")


class Crash(Exception):
    pass


def test_crash_after_the_second_level_before_the_manifest(tmp_path, monkeypatch) -> None:
    """A two-level commit that dies after its second-level segments are recorded, before the
    manifest: the next open drops every unnamed segment, and the next commit ships a
    two-level manifest that restores."""
    monkeypatch.setattr(metaship, "ONE_LEVEL_MAX", 0)
    remotes = [tmp_path / f"r{i}" for i in range(N)]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}.txt").write_bytes(b"file %d\n" % i * 20)
    home = tmp_path / "home"
    with Vault.create(home, [str(r) for r in remotes], K, N, PASSPHRASE, segment_size=1 << 20) as v:
        backup_paths(v, [src])
        assert v.flush().complete
        (src / "g.txt").write_bytes(b"a change\n")
        real = metaship.ship_second_level
        made: list[int] = []

        def counted(*a, **kw):
            got = real(*a, **kw)
            made.append(len(got.new))
            return got

        def die(*a, **kw):
            raise Crash("the process dies before the manifest is written")

        with monkeypatch.context() as mp, pytest.raises(Crash):
            mp.setattr(metaship, "ship_second_level", counted)
            mp.setattr(manifest, "encode", die)
            backup_paths(v, [src])
    assert made and made[0] > 0
    with Vault.open(home, PASSPHRASE) as v:
        unnamed = v.index.q(
            "SELECT id FROM segments WHERE kind='meta' AND id NOT IN"
            " (SELECT segment FROM manifest_segments)"
        )
        assert not unnamed  # dropped at open
        (src / "h.txt").write_bytes(b"another change\n")
        backup_paths(v, [src])
        assert v.flush().complete
        seed = v.keys.seed
    assert fr.recover_file(seed, remotes[:K], "src/h.txt") == b"another change\n"
    assert (
        fr.choose_manifest(fr.Keys.from_seed(seed), fr.Remotes(remotes)).body["index"]["levels"]
        == 2
    )
