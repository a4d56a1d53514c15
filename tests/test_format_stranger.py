"""A stranger recovers a real backup with docs/format.md alone.

The vault is made and filled by the real CLI over five local-directory remotes (3-of-5). Two
remotes are then destroyed, and the file is recovered from the other three plus the master
seed by tests/format_reader.py, which implements the document's "Recovering without vaultfs"
procedure on raw primitives. The only vaultfs import is ``read_keyfile``, to obtain the seed
the way a user would copy it from their keyfile, but for the two-level vault (docs/format.md
9.2), which is written in process so that the writer's threshold can be lowered.
"""

from __future__ import annotations

import os
import shutil

import blake3
import format_reader as fr
import pytest
from helpers import init_local_vault, run_cli

from vaultfs.backup import backup_paths
from vaultfs.keys import read_keyfile
from vaultfs.vault import Vault, metaship

PASSPHRASE = "stranger-danger"


def file_bytes(version: int) -> bytes:
    """~250 KB: incompressible parts (stored as is) and text (zstd), several chunks."""
    rnd = blake3.blake3(b"stranger-%d" % version).digest(length=120_000)
    text = b"".join(b"row %06d, belief %d: the sky is blue\n" % (i, version) for i in range(3500))
    return rnd[:60_000] + text + rnd[60_000:]


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    base = tmp_path_factory.mktemp("stranger")
    home, remotes = init_local_vault(base, 3, 5, passphrase=PASSPHRASE)
    src = base / "src" / "ledger.bin"
    src.parent.mkdir()
    src.write_bytes(file_bytes(1))
    run_cli("backup", str(src), home=home, passphrase=PASSPHRASE)
    src.write_bytes(file_bytes(2))  # a second snapshot: the newest manifest must win
    odd = bytes(base / "src") + b"/ledger-\xe9\xff.bin"  # a name that is not UTF-8
    with open(odd, "wb") as f:
        f.write(file_bytes(3))
    run_cli("backup", str(src), os.fsdecode(odd), home=home, passphrase=PASSPHRASE)
    run_cli("flush", home=home, passphrase=PASSPHRASE)
    seed = read_keyfile(home / "key.json", PASSPHRASE).seed
    return seed, remotes


def test_remote_layout_is_as_documented(vault):
    _seed, remotes = vault
    for r in remotes:
        assert sorted(p.name for p in r.iterdir()) == ["data", "manifests", "meta"]
        names = [p.name for p in (r / "manifests").iterdir()]
        assert all(len(nm) == 16 + 1 + 8 and nm[16] == "-" for nm in names)
        seqs = sorted(int(nm[:16]) for nm in names)
        assert seqs and seqs[-1] >= 2 and len(set(seqs)) == len(seqs)  # one per commit
        for sub in ("data", "meta"):
            objs = list((r / sub).iterdir())
            assert objs and all(len(p.name) == 32 for p in objs)
            for p in objs:
                # the plain header is magic and version only; the rest is whitened. Object
                # sizes come from the segment size alone: a power of two between 256 KiB and
                # the vault's segment size (1 MiB here), never the data's size
                body = p.read_bytes()
                assert body[: len(fr.SHARD_HEADER)] == fr.SHARD_HEADER
                assert len(body) in {5 + 80 + -(-(s << 10) // 3) for s in (256, 512, 1024)}


def test_every_object_unwhitens_to_the_fragment_its_index_row_names(vault, tmp_path):
    """With the seed, the index (and the manifest, for the index's own shards) names each
    object's fragment index and segment size; the reader unwhitens every object on every
    remote and finds liberasurecode's header agreeing with them (docs/format.md 7.1)."""
    seed, remotes = vault
    keys = fr.Keys.from_seed(seed)
    rem = fr.Remotes(remotes)
    m = fr.choose_manifest(keys, rem)
    expected: dict[str, tuple[int, int]] = {}  # name -> (idx, segment size)
    for seg in m.body["index"]["segments"]:
        for s in seg["shards"]:
            expected[s["name"]] = (s["idx"], seg.get("size", m.body["segment_size"]))
    db = fr.open_index(keys, rem, m, tmp_path / "index.db")
    try:
        data_names = set()
        for name, idx, size, kind in db.execute(
            "SELECT s.name, s.idx, g.size, g.kind FROM shards s JOIN segments g ON g.id = s.segment"
        ):
            expected[name] = (idx, size)
            if kind == "data":
                data_names.add(name)
    finally:
        db.close()
    seen = set()
    for r in remotes:
        for sub in ("data", "meta"):
            for p in (r / sub).iterdir():
                if p.name not in expected:
                    continue  # an older manifest's index copy, not named by the newest
                idx, size = expected[p.name]
                shard = fr.open_shard(keys.audit_key, p.read_bytes(), p.name, idx, size)
                assert shard.idx == idx
                seen.add(p.name)
    assert data_names and data_names <= seen


@pytest.mark.parametrize("keep", [(1, 3, 4), (0, 2, 4)])
def test_stranger_recovers_from_three_remotes(vault, tmp_path, keep):
    seed, remotes = vault
    # copies of three remotes only: the other two are gone
    dirs = []
    for i in keep:
        shutil.copytree(remotes[i], tmp_path / f"r{i}")
        dirs.append(tmp_path / f"r{i}")
    got = fr.recover_file(seed, dirs, "ledger.bin")
    assert got == file_bytes(2)
    assert fr.recover_file(seed, dirs, b"ledger-\xe9\xff.bin") == file_bytes(3)  # a BLOB path


def test_stranger_recovers_a_two_level_vault_from_three_remotes(tmp_path, monkeypatch):
    """The index described in two levels (second-level pages, segment pages of two
    descriptors), the vault written twice: the stranger reads the second level from the
    segments the manifest names and recovers the newest file from three remotes."""
    monkeypatch.setattr(metaship, "ONE_LEVEL_MAX", 0)
    monkeypatch.setattr(metaship, "SEGMENT_PAGE_FANOUT", 2)
    remotes = [tmp_path / f"r{i}" for i in range(5)]
    src = tmp_path / "src" / "ledger.bin"
    src.parent.mkdir()
    with Vault.create(
        tmp_path / "home", [str(r) for r in remotes], 3, 5, PASSPHRASE, segment_size=1 << 20
    ) as v:
        for version in (1, 2):
            src.write_bytes(file_bytes(version))
            backup_paths(v, [src])
            assert v.flush().complete
        seed = v.keys.seed
    keys = fr.Keys.from_seed(seed)
    dirs = [remotes[i] for i in (0, 2, 3)]
    index = fr.choose_manifest(keys, fr.Remotes(dirs)).body["index"]
    assert index["levels"] == 2 and "map" not in index
    assert fr.recover_file(seed, dirs, "ledger.bin") == file_bytes(2)


def test_stranger_decodes_around_a_corrupt_shard_and_rejects_a_forged_manifest(vault, tmp_path):
    seed, remotes = vault
    dirs = []
    for i in range(4):
        shutil.copytree(remotes[i], tmp_path / f"r{i}")
        dirs.append(tmp_path / f"r{i}")
    # flip one byte in every data shard of one remote: its BLAKE3 no longer matches the index
    for p in (dirs[0] / "data").iterdir():
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    # a "newer" manifest that is not validly signed must be ignored, not trusted
    newest = max((dirs[1] / "manifests").iterdir(), key=lambda p: p.name)
    forged = bytearray(newest.read_bytes())
    forged[24:32] = (99).to_bytes(8, "big")  # claims sequence 99
    (dirs[1] / "manifests" / f"{99:016d}-deadbeef").write_bytes(bytes(forged))
    keys = fr.Keys.from_seed(seed)
    assert fr.choose_manifest(keys, fr.Remotes(dirs)).seq == 2
    assert fr.recover_file(seed, dirs, "ledger.bin") == file_bytes(2)
    # and with only two remotes (plus the corrupt one) the reader refuses instead of guessing
    with pytest.raises(fr.FormatError, match="intact shards"):
        fr.recover_file(seed, [dirs[0], dirs[1], dirs[2]], "ledger.bin")


def test_stranger_recovers_a_one_copy_vault(tmp_path):
    """A 1-of-1 vault (erasure algorithm 3, format.md 7.5): one remote holding one object per
    segment, the segment in the clear after unwhitening; the reader restores from it."""
    home, remote = tmp_path / "home", tmp_path / "nas"
    run_cli("init", "-k", "1", "-n", "1", "--segment-mib", "1", "--remote", str(remote),
            home=home, passphrase=PASSPHRASE)  # fmt: skip
    src = tmp_path / "src" / "ledger.bin"
    src.parent.mkdir()
    src.write_bytes(file_bytes(3))
    run_cli("backup", str(src.parent), home=home, passphrase=PASSPHRASE)
    seed = read_keyfile(home / "key.json", PASSPHRASE).seed
    assert fr.recover_file(seed, [remote], "src/ledger.bin") == file_bytes(3)
