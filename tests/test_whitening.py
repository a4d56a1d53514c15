"""Shards that prove their own storage (docs/format.md 7.1): every stored shard object is its
fragment XOR a keystream of its own, keyed by the audit key, its name and its index.

Shown here with real pyeclib, real rclone local remotes and the real CLI:

- k honest stored objects of a segment no longer regenerate the other stored objects: a
  colluding provider running liberasurecode's reconstruct/decode on the stored bytes (as they
  are, or with valid fragment headers put in front of the whitened payloads so the library
  does its linear algebra) gets bytes that differ from the stored objects, while the same
  procedure on plain fragments does regenerate them (the attack is real without whitening);
- `vaultfs verify` of a remote that deleted its objects and rebuilt them, without the key,
  from k objects held elsewhere fails and names that remote, whole-object and ranged alike;
- range reads (the mount's chunk reader) still verify and unwhiten at any offset.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli
from pyeclib.ec_iface import ECDriver

from vaultfs import erasure, segment
from vaultfs import verify as verify_mod
from vaultfs.chunkreader import ChunkReader
from vaultfs.readcache import ReadCache
from vaultfs.remotes import Remote
from vaultfs.vault import Vault

AK = bytes(range(32))
H = segment.HEADER_SIZE


def regenerate_without_key(
    stored: dict[int, bytes], want: list[int], k: int, n: int, size: int
) -> dict[int, bytes]:
    """The best a colluder holding the stored objects ``stored`` ({index: object}) of one
    segment, and told their indices, can make of objects ``want`` without the audit key:
    liberasurecode reconstructs over the whitened payloads, each given a valid plain fragment
    header of its index (taken from an encoding of any segment of the same size, which anyone
    can make). Returns {index: forged object} (same size as the real ones)."""
    drv = ECDriver(k=k, m=n - k, ec_type=erasure.EC_BACKENDS[erasure.choose_alg(k, n)])
    heads = [f[: erasure.FRAGMENT_HEADER] for f in drv.encode(bytes(size))]
    frags = [heads[i] + obj[H + erasure.FRAGMENT_HEADER :] for i, obj in stored.items()]
    rebuilt = drv.reconstruct(frags, want)
    return {
        i: segment.HEADER + heads[i] + r[erasure.FRAGMENT_HEADER :]
        for i, r in zip(want, rebuilt, strict=True)
    }


@pytest.mark.parametrize("k,n", [(3, 5), (5, 9)])
def test_k_stored_shards_do_not_regenerate_the_other_stored_objects(k: int, n: int) -> None:
    size = 256 * 1024
    seg = random.Random(k).randbytes(size)
    shards = segment.build_shards(seg, k, n, AK)
    stored = {s.idx: bytes(s.body) for s in shards}  # pyeclib takes bytes only
    plain = {s.idx: segment.open_fragment(s.body, AK, s.name, s.idx) for s in shards}
    drv = ECDriver(k=k, m=n - k, ec_type=erasure.EC_BACKENDS[erasure.choose_alg(k, n)])
    subsets = [tuple(range(k)), tuple(range(n - k, n)), (0, *range(n - k + 1, n))]
    for have in subsets:
        want = [i for i in range(n) if i not in have]
        # 1. liberasurecode on the stored bytes as they are: refused, or other bytes
        try:
            got = drv.reconstruct([stored[i][H:] for i in have], want)
        except Exception:  # pyeclib's own errors: the whitened headers are not fragments
            got = None
        if got is not None:
            for i, r in zip(want, got, strict=True):
                assert segment.HEADER + r != stored[i]
        try:
            decoded = drv.decode([stored[i][H:] for i in have])
        except Exception:
            decoded = None
        assert decoded is None or decoded[:size] != seg
        # 2. with valid fragment headers, so the library runs on the whitened payloads
        forged = regenerate_without_key({i: stored[i] for i in have}, want, k, n, size)
        for i in want:
            assert len(forged[i]) == len(stored[i])
            assert forged[i] != stored[i]
            # not a byte range in common beyond chance: the whole payload differs
            same = sum(
                a == b for a, b in zip(forged[i][H + 80 :], stored[i][H + 80 :], strict=True)
            )
            assert same < len(stored[i]) // 100
        # 3. control: the same procedure on plain fragments regenerates them exactly, so the
        # colluder above is competent and only the whitening stops it
        again = drv.reconstruct([plain[i] for i in have], want)
        for i, r in zip(want, again, strict=True):
            assert r[erasure.FRAGMENT_HEADER :] == plain[i][erasure.FRAGMENT_HEADER :]


def test_whitening_is_keyed_by_the_audit_key_the_name_and_the_index() -> None:
    frag = erasure.encode(bytes(3 * 4096), 3, 5)[3]
    base = segment.stored_shard(3, "a" * 32, frag, AK).body
    assert segment.stored_shard(3, "a" * 32, frag, AK).body == base  # deterministic
    for other in (
        segment.stored_shard(3, "b" * 32, frag, AK).body,  # another name
        segment.stored_shard(2, "a" * 32, frag, AK).body,  # another index
        segment.stored_shard(3, "a" * 32, frag, bytes(32)).body,  # another vault
    ):
        assert other[:H] == base[:H] and other[H:] != base[H:]


# -- through the CLI and real remotes ------------------------------------------------------


@pytest.fixture
def vault(tmp_path: Path) -> tuple[Path, list[Path], bytes]:
    home, remotes = init_local_vault(tmp_path, 3, 5)
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(11).randbytes(2_500_000)
    (src / "blob.bin").write_bytes(data)
    run_cli("backup", str(src), home=home)
    run_cli("flush", home=home)
    return home, remotes, data


def _forge_remote(home: Path, victim: Path) -> list[str]:
    """Replace every object on ``victim`` (data and the newest index copy) by what a colluder
    regenerates from k stored objects held on the other remotes; returns the forged paths."""
    with Vault.open(home, PASSPHRASE) as v:
        rows = v.index.q(
            "SELECT s.segment, s.idx, s.name, g.kind, g.k, g.n, g.size, r.spec FROM shards s"
            " JOIN segments g ON g.id = s.segment JOIN remotes r ON r.id = s.remote"
            " WHERE s.state = 'placed'"
        )
    by_seg: dict[int, list[tuple]] = {}
    for row in rows:
        by_seg.setdefault(row[0], []).append(row)
    forged: list[str] = []
    for shards in by_seg.values():
        mine = [r for r in shards if Path(r[7]) == victim]
        others = [r for r in shards if Path(r[7]) != victim]
        if not mine:
            continue
        _sid, _i, _nm, kind, k, n, size, _spec = shards[0]
        stored = {r[1]: (Path(r[7]) / kind / r[2]).read_bytes() for r in others[:k]}
        fakes = regenerate_without_key(stored, [r[1] for r in mine], k, n, size)
        for r in mine:
            p = victim / kind / r[2]
            assert p.stat().st_size == len(fakes[r[1]])
            p.unlink()  # it deleted its objects ...
            p.write_bytes(fakes[r[1]])  # ... and keeps what it regenerated
            forged.append(f"{kind}/{r[2]}")
    return forged


def test_verify_fails_a_remote_that_keeps_only_regenerable_data_and_names_it(vault) -> None:
    home, remotes, data = vault
    victim = remotes[1]
    forged = _forge_remote(home, victim)
    assert any(f.startswith("data/") for f in forged)
    proc = run_cli("verify", "--json", home=home, check=12)
    rep = json.loads(proc.stdout)
    label = Remote(str(victim)).label
    bad = next(r for r in rep["remotes"] if r["remote"] == label)
    assert not bad["clean"] and bad["state"] == "degraded", bad
    assert set(bad["corrupt"]) >= {f for f in forged if f.startswith("data/")}, bad
    for other in rep["remotes"]:
        if other["remote"] != label:
            assert other["clean"], other
    # ranged challenges (a piece of a block against its keyed tag) catch it as well
    with Vault.open(home, PASSPHRASE) as v:
        ranged = verify_mod.audit(v, [str(victim)], whole_budget=0)
    (r,) = ranged.remotes
    assert r.remote == label and not r.clean and r.corrupt
    # repair rebuilds the remote's own objects; then it audits clean and restores
    rj = json.loads(run_cli("repair", "--json", home=home).stdout)
    assert rj["ok"], rj
    assert json.loads(run_cli("verify", "--json", home=home).stdout)["clean"]
    out = home.parent / "out"
    run_cli("restore", "--to", str(out), home=home)
    assert (out / "src" / "blob.bin").read_bytes() == data


def test_range_reads_unwhiten_and_verify(tmp_path: Path) -> None:
    """The mount's chunk reader reads only the data-shard blocks of each chunk, checks them
    against their leaves (over the stored bytes) and unwhitens the record at its offset."""
    specs = [str(tmp_path / f"r{i}") for i in range(5)]
    data = random.Random(3).randbytes(1_200_000)
    with Vault.create(tmp_path / "home", specs, 3, 5, PASSPHRASE, segment_size=1 << 20) as v:
        cids, _total = v.store_stream(io.BytesIO(data))
        assert v.flush().complete
        reader = ChunkReader(v, ReadCache(tmp_path / "cache", 0, v.chunker.chunk_id))
        try:
            got = b"".join(reader.read_many(cids))
            assert got == data
            assert reader.stats["range_reads"] == len(set(cids))
            assert reader.stats["segment_reads"] == 0
        finally:
            reader.close()
    # a flipped stored byte is caught by its leaf; the reader falls back and still delivers
    victim = next(p for s in specs for p in sorted((Path(s) / "data").iterdir()))
    body = bytearray(victim.read_bytes())
    for off in range(H + 80, len(body), 4096):
        body[off] ^= 0x01
    victim.write_bytes(bytes(body))
    with Vault.open(tmp_path / "home", PASSPHRASE) as v:
        reader = ChunkReader(v, ReadCache(tmp_path / "cache2", 0, v.chunker.chunk_id))
        try:
            assert b"".join(reader.read_many(cids)) == data
        finally:
            reader.close()


def test_every_subset_of_stored_objects_still_decodes_with_the_key() -> None:
    k, n, size = 3, 5, 64 * 1024
    seg = os.urandom(size)
    shards = segment.build_shards(seg, k, n, AK)
    for have in itertools.combinations(shards, k):
        frags = {s.idx: segment.open_fragment(s.body, AK, s.name, s.idx) for s in have}
        assert segment.decode_segment(frags, k, n, size, erasure.choose_alg(k, n)) == seg
