"""A stranger recovers a real backup with docs/format.md alone.

The vault is made and filled by the real CLI over five local-directory remotes (3-of-5). Two
remotes are then destroyed, and the file is recovered from the other three plus the master
seed by tests/format_reader.py, which implements the document's "Recovering without vaultfs"
procedure on raw primitives. The only vaultfs import is ``read_keyfile``, to obtain the seed
the way a user would copy it from their keyfile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import format_reader as fr
import pytest

from vaultfs.keys import read_keyfile

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "stranger-danger"


def vaultfs(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VAULTFS_HOME=str(home), VAULTFS_PASSPHRASE=PASSPHRASE)
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"vaultfs {' '.join(args)} failed: {r.stdout}\n{r.stderr}"
    return r


def file_bytes(version: int) -> bytes:
    """~250 KB: incompressible parts (stored as is) and text (zstd), several chunks."""
    rnd = blake3.blake3(b"stranger-%d" % version).digest(length=120_000)
    text = b"".join(b"row %06d, belief %d: the sky is blue\n" % (i, version) for i in range(3500))
    return rnd[:60_000] + text + rnd[60_000:]


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    base = tmp_path_factory.mktemp("stranger")
    home = base / "home"
    remotes = [base / f"r{i}" for i in range(5)]
    args = ["init", "-k", "3", "-n", "5", "--segment-mib", "1"]
    for r in remotes:
        args += ["--remote", str(r)]
    vaultfs(home, *args)
    src = base / "src" / "ledger.bin"
    src.parent.mkdir()
    src.write_bytes(file_bytes(1))
    vaultfs(home, "backup", str(src))
    src.write_bytes(file_bytes(2))  # a second snapshot: the newest manifest must win
    odd = bytes(base / "src") + b"/ledger-\xe9\xff.bin"  # a name that is not UTF-8
    with open(odd, "wb") as f:
        f.write(file_bytes(3))
    vaultfs(home, "backup", str(src), os.fsdecode(odd))
    vaultfs(home, "flush")
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
                shard = fr.parse_shard(p.read_bytes())
                assert shard.kind == (1 if sub == "data" else 2)
                assert (shard.k, shard.n, shard.ec_alg) == (3, 5, 1)
                # object sizes come from the segment size alone: a power of two between
                # 256 KiB and the vault's segment size (1 MiB here), never the data's size
                size = shard.segment_size
                assert size & (size - 1) == 0 and 256 * 1024 <= size <= 1024 * 1024
                assert p.stat().st_size == 36 + 80 + -(-size // 3)


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
