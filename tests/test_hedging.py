"""Issue 16 through the emulated network (bench/netem.py): one slow provider must set the
pace of neither a restore nor a backup. Hedged reads: remotes are measured and remembered
(vaultfs.hedging) and a read asks the remotes expected fastest. Quorum backups: a backup is
done once k shards of everything are placed; a slow remote's rest stays queued.

Asserted on which remotes were read or written and how many bytes, never on wall time.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import tree_digest

from bench.netem import Link
from vaultfs.backends import open_backend
from vaultfs.backup import backup_paths
from vaultfs.hedging import BULK_BYTES, SLOW_FACTOR, SLOW_GAP, Speeds
from vaultfs.restore import ShardSource, open_remote_index, restore_files
from vaultfs.vault import Vault

pytestmark = [pytest.mark.network]

PW = "pw-for-tests"
FAST = Link(rtt=0.004, rate_bps=400e6)
SLOW = Link(rtt=1.0, rate_bps=8e6)


def test_unknown_remotes_are_fast_and_a_measured_slow_one_is_not():
    s = Speeds()
    assert s.tiers(["a", "b"], 1 << 20) == {"a": 0, "b": 0}
    s.observe("a", 0, 0.05)
    s.observe("b", 0, 0.05 * SLOW_FACTOR * 2)
    assert s.tiers(["a", "b", "c"], 0) == {"a": 0, "b": 1, "c": 0}
    # throughput counts for big reads: b's latency is high but its rate makes up for it
    s.observe("a", 4 * BULK_BYTES, 0.05 + 4 * BULK_BYTES / 1e6)
    s.observe("b", 4 * BULK_BYTES, 0.3 + 4 * BULK_BYTES / 1e8)
    assert s.tiers(["a", "b"], 64 << 20) == {"a": 1, "b": 0}
    # within the factor, both are fast: measurement noise never flips a choice
    s.forget()
    s.observe("a", 0, 0.05)
    s.observe("b", 0, 0.05 * SLOW_FACTOR * 0.9)
    assert s.tiers(["a", "b"], 0) == {"a": 0, "b": 0}
    # and calls of milliseconds are all fast, whatever their ratio (local, LAN, pooled)
    s.forget()
    s.observe("a", 0, 0.002)
    s.observe("b", 0, 0.002 + SLOW_GAP * 0.9)
    assert s.tiers(["a", "b"], 0) == {"a": 0, "b": 0}


def _write_tree(root: Path) -> None:
    rng = random.Random(16)
    root.mkdir()
    for i in range(6):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(700_000))


def test_restore_leaves_a_slow_remote_alone(tmp_path, emulated_network, monkeypatch):
    from vaultfs import hedging

    monkeypatch.setattr(hedging, "SPEEDS", Speeds())  # nothing remembered from other tests
    monkeypatch.setattr("vaultfs.backends.SPEEDS", hedging.SPEEDS)
    monkeypatch.setattr("vaultfs.restore.SPEEDS", hedging.SPEEDS)
    net = emulated_network([FAST] * 5)
    specs = [r.spec("bkt/v") for r in net.remotes]
    src = tmp_path / "src"
    _write_tree(src)
    v = Vault.create(tmp_path / "home", specs, 3, 5, PW, segment_size=1 << 20)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    slow = net.remotes[0]
    held = sorted((slow.root / "bkt" / "v" / "data").iterdir())
    assert len(held) >= 4, "the slow remote holds shards of many segments (data fragments too)"
    manifest_bytes = sum(
        p.stat().st_size for p in (slow.root / "bkt" / "v" / "manifests").iterdir()
    )
    net.set_link(0, SLOW)
    before = net.bytes_sent(0)

    backends = [open_backend(s) for s in specs]
    src_ = ShardSource(backends)
    src_.start()
    db, src_, _m, _warnings = open_remote_index(keys, backends, tmp_path / "work", src=src_)
    try:
        restore_files(keys, db, src_, tmp_path / "out")
    finally:
        db.close()
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    # the slow remote gave its listing and (at most) its newest manifest, no shard at all:
    # counted in this process and, where the link can say, on the wire (the decoder
    # processes read through backends of their own)
    assert backends[0].bytes_read <= manifest_bytes
    after = net.bytes_sent(0)
    if before is not None and after is not None:
        down = after[1] - before[1]
        assert down < manifest_bytes + 64 * 1024, down  # + HTTP headers of a few calls
    assert hedging.SPEEDS.tiers(specs, 0)[specs[0]] == 1
    # every shard came from the four fast remotes
    assert sum(b.bytes_read for b in backends[1:]) > 3 * 700_000


def test_a_slow_remote_still_serves_what_only_it_holds(tmp_path, emulated_network, monkeypatch):
    """With two remotes down, the slow one is among the only k left: it is read (the tier
    orders the choice; it never excludes a remote)."""
    from vaultfs import hedging

    monkeypatch.setattr(hedging, "SPEEDS", Speeds())
    monkeypatch.setattr("vaultfs.backends.SPEEDS", hedging.SPEEDS)
    monkeypatch.setattr("vaultfs.restore.SPEEDS", hedging.SPEEDS)
    net = emulated_network([FAST] * 5)
    specs = [r.spec("bkt/v") for r in net.remotes]
    src = tmp_path / "src"
    _write_tree(src)
    v = Vault.create(tmp_path / "home", specs, 3, 5, PW, segment_size=1 << 20)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    net.set_link(2, Link(rtt=0.3, rate_bps=50e6))
    given = [specs[0], specs[1], specs[2]]
    backends = [open_backend(s) for s in given]
    db, src_, _m, _w = open_remote_index(keys, backends, tmp_path / "work")
    try:
        restore_files(keys, db, src_, tmp_path / "out")
    finally:
        db.close()
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert backends[2].bytes_read > 3 * 700_000 // 3


def test_backup_completes_once_k_shards_are_placed(tmp_path, emulated_network):
    """A quorum flush (what `vaultfs backup` does) returns once every segment has k shards
    placed and k remotes have the manifest: the slow remote's rest stays queued, its
    manifest waits, and a later flush places both."""
    net = emulated_network([FAST] * 5)
    net.set_link(4, Link(rtt=1.0, rate_bps=1e6))
    specs = [r.spec("bkt/v") for r in net.remotes]
    src = tmp_path / "src"
    _write_tree(src)
    v = Vault.create(tmp_path / "home", specs, 3, 5, PW, segment_size=1 << 20)
    with v:
        backup_paths(v, [src])
        rep = v.flush(quorum=True)
        assert rep.under_k == 0 and not rep.complete, rep
        assert sum(rep.pending.values()) > 0, "the slow remote is behind"
        held = [len(list((r.root / "bkt" / "v" / "data").glob("*"))) for r in net.remotes]
        # k fast remotes hold everything; the slow one is behind
        assert sum(h == max(held) for h in held[:4]) >= 3 and held[4] < max(held), held
        status = v.status()
        assert status["segments_below_k_placed"] == 0
        # k remotes have the manifest (a fast one may still have been uploading when the
        # grace ended); the slow one will get it after its shards
        with_manifest = [
            i for i, r in enumerate(net.remotes) if any((r.root / "bkt" / "v").glob("manifests/*"))
        ]
        assert len(with_manifest) >= 3 and 4 not in with_manifest, with_manifest
        net.set_link(4, FAST)
        rep = v.flush()
        assert rep.complete, rep
        assert any((net.remotes[4].root / "bkt" / "v" / "manifests").iterdir())
        keys = v.keys
    backends = [open_backend(s) for s in specs[2:]]
    db, src_, _m, _w = open_remote_index(keys, backends, tmp_path / "work")
    try:
        restore_files(keys, db, src_, tmp_path / "out")
    finally:
        db.close()
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
