"""The storage engine through its library API, over real rclone and local-directory remotes.

Tier 1/2 tests (style.md point 8): units of one stage with real primitives, then the whole
write → remotes → disaster-restore path, restoring from every k-subset of a 3-of-5 vault.
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from vaultfs import envelope, erasure, merkle, segment
from vaultfs.backends import FaultInjecting, open_backend
from vaultfs.backup import backup_paths
from vaultfs.errors import IntegrityError, NotEnoughRemotes, RemoteError, VaultBusy, WrongKey
from vaultfs.keys import VaultKeys, new_seed, read_keyfile, write_keyfile
from vaultfs.restore import ShardSource, open_remote_index, restore_files
from vaultfs.vault import Entry, Vault

PW = "pw-for-tests"


# -- units ------------------------------------------------------------------------------------


def test_key_derivation_is_deterministic_and_separated():
    seed = bytes(range(32))
    a, b = VaultKeys.from_seed(seed), VaultKeys.from_seed(seed)
    assert a.vault_id == b.vault_id and a.fingerprint() == b.fingerprint()
    derived = [a.vault_id, a.chunk_id_key, a.metadata_key, a.audit_key]
    assert len({d[:16] for d in derived}) == len(derived), "labels must give distinct keys"
    other = VaultKeys.from_seed(bytes(32))
    assert other.vault_id != a.vault_id
    assert 0 < a.chunker_seed < 2**63


def test_keyfile_roundtrip_and_wrong_passphrase(tmp_path):
    keys = VaultKeys.from_seed(new_seed())
    write_keyfile(tmp_path / "key.json", keys, "secret")
    assert read_keyfile(tmp_path / "key.json", "secret").seed == keys.seed
    with pytest.raises(WrongKey):
        read_keyfile(tmp_path / "key.json", "not the passphrase")
    assert oct((tmp_path / "key.json").stat().st_mode & 0o777) == "0o600"


def test_data_key_wrap_is_hybrid_pq_and_bound_to_epoch():
    keys = VaultKeys.from_seed(new_seed())
    dk = keys.new_epoch_key()
    wrapped = keys.wrap_data_key(3, dk)
    # X-Wing encapsulation (1120 bytes) + AES-256-GCM sealed 32-byte key (48 bytes)
    assert len(wrapped) == 1120 + 48
    assert keys.unwrap_data_key(3, wrapped) == dk
    with pytest.raises(WrongKey):
        keys.unwrap_data_key(4, wrapped)
    with pytest.raises(WrongKey):
        VaultKeys.from_seed(new_seed()).unwrap_data_key(3, wrapped)


def test_a_record_sealed_in_place_is_the_record_seal_chunk_gives():
    """The sealers' path (compress, then encrypt into a slice of the open segment) writes the
    bytes of :func:`envelope.seal_chunk` and leaves the rest of the buffer alone; a buffer of
    the wrong size is refused before anything is written."""
    vid, dk, cid, salt = os.urandom(16), os.urandom(32), os.urandom(32), os.urandom(16)
    data = memoryview(b"a chunk of a dump\n" * 300)
    payload = envelope.compress(data)
    n = envelope.record_len(payload)
    seg = bytearray(b"\xee" * (n + 20))
    envelope.seal_payload_into(memoryview(seg)[10 : 10 + n], dk, vid, cid, payload, salt=salt)
    assert bytes(seg[10 : 10 + n]) == envelope.seal_chunk(dk, vid, cid, data, salt=salt)
    assert seg[:10] == seg[10 + n :] == b"\xee" * 10
    assert envelope.open_chunk(dk, vid, cid, seg[10 : 10 + n]) == bytes(data)
    short = bytearray(n - 1)
    with pytest.raises(ValueError, match="record_len"):
        envelope.seal_payload_into(short, dk, vid, cid, payload, salt=salt)
    assert short == bytearray(n - 1)


def test_chunk_record_roundtrip_commitment_and_tamper():
    keys = VaultKeys.from_seed(new_seed())
    dk, cid = os.urandom(32), os.urandom(32)
    text = b"belief: the vault outlives the disk\n" * 500
    rec = envelope.seal_chunk(dk, keys.vault_id, cid, text)
    assert len(rec) < len(text) // 4, "text is compressed before encryption"
    assert envelope.open_chunk(dk, keys.vault_id, cid, rec) == text
    noise = os.urandom(5000)
    assert len(envelope.seal_chunk(dk, keys.vault_id, cid, noise)) == len(noise) + 65
    with pytest.raises(IntegrityError, match="commitment"):
        envelope.open_chunk(os.urandom(32), keys.vault_id, cid, rec)
    with pytest.raises(IntegrityError):  # chunk id is bound as associated data
        envelope.open_chunk(dk, keys.vault_id, os.urandom(32), rec)
    bad = bytearray(rec)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match="authentication"):
        envelope.open_chunk(dk, keys.vault_id, cid, bytes(bad))


@pytest.mark.parametrize("n", range(1, 10))
def test_merkle_proofs_verify_for_every_leaf(n):
    leaves = [merkle.leaf_hash(bytes([i]) * 10) for i in range(n)]
    root = merkle.root(leaves)
    for i in range(n):
        assert merkle.verify_proof(leaves[i], merkle.proof(leaves, i), root)
        assert not merkle.verify_proof(merkle.leaf_hash(b"x"), merkle.proof(leaves, i), root)


def test_merkle_last_leaf_is_not_duplicated():
    a, b, c = (merkle.leaf_hash(x) for x in (b"a", b"b", b"c"))
    assert merkle.root([a, b, c]) != merkle.root([a, b, c, c])  # CVE-2012-2459
    # a leaf can never equal an interior node over the same bytes (0x00 vs 0x01 prefix)
    assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)
    assert merkle.root([a]) == a


def test_merkle_root_folded_one_hash_at_a_time_is_the_same_root():
    # restore checks the vault root with merkle.Root: every tree shape up to 5 levels of
    # promoted odd nodes, and larger ones
    for n in [*range(70), 255, 256, 257, 1000, 1023, 1025]:
        leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
        folded = merkle.Root()
        for h in leaves:
            folded.add(h)
        assert folded.root() == merkle.root(leaves), n


@pytest.mark.parametrize("k,n", [(3, 5), (5, 9), (7, 15)])
def test_erasure_profiles_decode_from_any_k(k, n):
    seg = os.urandom(64 * 1024)
    key = os.urandom(32)
    alg = erasure.choose_alg(k, n)
    assert alg == (1 if n - k <= 4 else 2)
    shards = segment.build_shards(seg, k, n, key)
    assert len({len(s.body) for s in shards}) == 1, "all shard objects have one size"
    # the plain header is the same 5 bytes in every object: it tells no two apart
    assert (
        {bytes(s.body[: segment.HEADER_SIZE]) for s in shards} == {segment.HEADER} == {b"VFSH\x02"}
    )
    frags = {s.idx: segment.open_fragment(s.body, key, s.name, s.idx) for s in shards}
    rng = random.Random(k * 100 + n)
    subsets = list(itertools.combinations(range(n), k))
    for subset in rng.sample(subsets, min(12, len(subsets))):
        assert segment.decode_segment({i: frags[i] for i in subset}, k, n, len(seg), alg) == seg
    assert erasure.fragment_index(frags[n - 1]) == n - 1
    with pytest.raises(IntegrityError):
        erasure.decode([frags[i] for i in range(k - 1)], k, n, alg)
    # another key, or another identity, does not open an object
    with pytest.raises(IntegrityError):
        segment.open_fragment(shards[0].body, os.urandom(32), shards[0].name, 0)
    with pytest.raises(IntegrityError):
        segment.open_fragment(shards[0].body, key, shards[1].name, 0)


def test_paranoid_profile_decodes_from_every_one_of_its_6435_subsets():
    seg = os.urandom(7 * 1024)
    frags = dict(enumerate(erasure.encode(seg, 7, 15)))
    for subset in itertools.combinations(range(15), 7):
        assert segment.decode_segment({i: frags[i] for i in subset}, 7, 15, len(seg), 2) == seg


# -- the engine end to end ----------------------------------------------------------------------


def make_vault(tmp_path: Path, nremotes: int = 5, k: int = 3, n: int = 5, seg_mib: int = 1):
    remotes = [str(tmp_path / f"r{i}") for i in range(nremotes)]
    v = Vault.create(tmp_path / "home", remotes, k, n, PW, segment_size=seg_mib << 20)
    return v, remotes


def write_tree(root: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "random.bin").write_bytes(rng.randbytes(2_500_000))
    text = "".join(
        f"belief {i}: {rng.random():.6f} supports {rng.randint(0, 10**6)}\n" for i in range(60000)
    )
    (root / "docs" / "kb.sql").write_text(text)
    (root / "docs" / "deep" / "copy.sql").write_text(text)  # deduplicates with kb.sql
    (root / "empty").write_bytes(b"")
    (root / "docs" / "link").symlink_to("kb.sql")


def test_backup_dedups_and_restores_from_every_k_subset(tmp_path):
    src = tmp_path / "src"
    write_tree(src)
    v, remotes = make_vault(tmp_path)
    with v:
        uid, count, size = backup_paths(v, [src])
        rep = v.flush()
        assert rep.complete and not rep.errors
        st = v.status()
        assert st["survives_losses_now"] == 2 and st["segments_below_k_placed"] == 0
        unique, stored = st["unique_bytes"], st["stored_bytes"]
        # the second copy of kb.sql was stored once, and text compressed before encryption
        assert unique < size - (src / "docs" / "kb.sql").stat().st_size * 0.9
        assert stored < unique
        segs_before = v.index.one("SELECT count(*) FROM segments WHERE kind='data'")[0]
        uid2, _, _ = backup_paths(v, [src])
        segs_after = v.index.one("SELECT count(*) FROM segments WHERE kind='data'")[0]
        assert segs_after == segs_before, "an unchanged tree adds no data segments"
        assert v.flush().complete
        keys = v.keys
    expected = tree_digest_of(src)
    for subset in itertools.combinations(remotes, 3):
        out = tmp_path / ("out-" + "".join(s[-1] for s in subset))
        with_remote_index(keys, list(subset), tmp_path, out)
        assert tree_digest_of(out / "src") == expected, f"restore from {subset} differs"


def tree_digest_of(root: Path) -> dict:
    from helpers import tree_digest

    return tree_digest(root)


def with_remote_index(keys, specs, tmp_path, out, snapshot="latest", min_seq=0):
    work = tmp_path / f"work-{out.name}"
    work.mkdir()
    db, src, m, warnings = open_remote_index(keys, [open_backend(s) for s in specs], work, min_seq)
    try:
        return restore_files(keys, db, src, out, snapshot), warnings, m
    finally:
        db.close()


def test_corrupt_and_missing_shards_are_decoded_around(tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=2)
    v, remotes = make_vault(tmp_path)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    objs = sorted((Path(remotes[0]) / "data").iterdir())
    assert len(objs) >= 3
    for i, obj in enumerate(objs):  # every shard on remote 0 damaged, two ways
        body = bytearray(obj.read_bytes())
        if i % 2:
            obj.write_bytes(bytes(body[:100]))  # truncated
        else:
            body[len(body) // 2] ^= 0x40  # one bit flipped
            obj.write_bytes(bytes(body))
    (Path(remotes[1]) / "data" / sorted(os.listdir(Path(remotes[1]) / "data"))[0]).unlink()
    # at most two shards of any segment are damaged: the other three decode it
    work = tmp_path / "work-damaged"
    work.mkdir()
    db, source, _m, _w = open_remote_index(keys, [open_backend(s) for s in remotes], work, 0)
    try:
        res = restore_files(keys, db, source, tmp_path / "out", "latest")
    finally:
        db.close()
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)
    # remote 0 is named: a truncated object is refused by its listed size (``rejected``), a
    # flipped bit is found when the shard is read (a warning); which of its shards a restore
    # needs depends on the placement (a parity shard is not read while k data shards decode)
    named = source.reports[remotes[0]].rejected + [w for w in res[3] if "corrupt" in w]
    assert named, (res[3], source.reports)
    # too much damage on one segment: 3 of 5 shards of the same segment corrupted
    db = sqlite3.connect(tmp_path / "home" / "index.db")
    (seg,) = db.execute("SELECT id FROM segments WHERE kind='data' ORDER BY id LIMIT 1").fetchone()
    rows = db.execute(
        "SELECT s.name, r.spec FROM shards s JOIN remotes r ON r.id = s.remote WHERE s.segment=?",
        (seg,),
    ).fetchall()
    db.close()
    for name, spec in rows[:3]:
        p = Path(spec) / "data" / name
        if p.exists():
            p.write_bytes(b"garbage" * 10)
    with pytest.raises(NotEnoughRemotes, match="only 1 intact shard reachable, need 3"):
        with_remote_index(keys, remotes, tmp_path, tmp_path / "out2")


def test_remotes_hold_no_plaintext_names_or_contents(tmp_path, s3_server):
    marker = b"PLAINTEXT-MARKER-7f3a9c"
    src = tmp_path / "src"
    src.mkdir()
    (src / "very-secret-filename.txt").write_bytes(marker * 40000)
    (src / "small.txt").write_bytes(marker)
    specs = [str(tmp_path / "r0"), str(tmp_path / "r1"), s3_server.remote("bucket/v")]
    v = Vault.create(tmp_path / "home", specs, 2, 3, PW, segment_size=1 << 20)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
    roots = [tmp_path / "r0", tmp_path / "r1", s3_server.root]
    seen = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                blob = (Path(dirpath) / f).read_bytes()
                seen += 1
                for needle in (marker, b"very-secret-filename", b"small.txt", marker[::-1]):
                    assert needle not in blob, f"{needle!r} found in {dirpath}/{f}"
                assert b"very-secret" not in f.encode()
    assert seen >= 9


def test_network_remotes_s3_and_sftp_round_trip(tmp_path, s3_server, sftp_server):
    src = tmp_path / "src"
    write_tree(src, seed=3)
    specs = [
        s3_server.remote("bucket1/vault"),
        s3_server.remote("bucket2/vault"),
        sftp_server.remote("vault"),
        str(tmp_path / "local"),
    ]
    v = Vault.create(tmp_path / "home", specs, 2, 4, PW, segment_size=1 << 20)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    # the network remotes alone (the local directory is gone)
    import shutil

    shutil.rmtree(tmp_path / "local")
    with_remote_index(keys, specs[1:3], tmp_path, tmp_path / "out")
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)


def test_remote_down_queues_and_catches_up(tmp_path, s3_server_factory):
    servers = [s3_server_factory() for _ in range(3)]
    specs = [s.remote("bkt/v") for s in servers] + [str(tmp_path / "l0"), str(tmp_path / "l1")]
    v = Vault.create(tmp_path / "home", specs, 3, 5, PW, segment_size=1 << 20)
    src = tmp_path / "src"
    write_tree(src, seed=4)
    with v:
        servers[0].stop()
        backup_paths(v, [src])
        rep = v.flush()
        assert not rep.complete and rep.under_k == 0, "k can still be placed: backup holds"
        assert any("bkt/v" in r for r in rep.errors)
        assert v.status()["survives_losses_now"] == 1
        # fewer than k reachable: data stays queued, nothing is lost
        servers[1].stop()
        servers[2].stop()
        (src / "new.txt").write_bytes(os.urandom(300_000))
        backup_paths(v, [src])
        rep = v.flush()
        assert rep.under_k > 0 and rep.manifests_pending > 0
        for s in servers:
            s.start()
        rep = v.flush()
        assert rep.complete, rep
        assert v.status()["survives_losses_now"] == 2
        keys = v.keys
    with_remote_index(keys, specs[:3], tmp_path, tmp_path / "out")
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)


@pytest.mark.timeout(240)  # the guard: before the fix this waited forever in Pace.acquire
def test_a_remote_stopped_mid_operation_holds_back_no_fresh_vault(tmp_path, s3_server_factory):
    """Operations a vault left stuck on a remote that stopped answering, its server then
    stopped, hold back no later vault whose remote has the same spec (a new server on the
    reused port): each vault paces its remotes with its own slots."""
    old_srv = s3_server_factory()
    spec = old_srv.remote("bkt/v")
    old = Vault.create(
        tmp_path / "old", [spec, str(tmp_path / "o0"), str(tmp_path / "o1")], 2, 3, PW
    )
    gate = threading.Event()  # the remote stops answering mid-operation, until the end
    pace = old.paces.get(spec)

    def stuck() -> None:
        b = open_backend(spec, paces=old.paces, wrap=lambda b: FaultInjecting(b, stall=gate))
        try:
            b.list("data")
        except RemoteError:
            pass  # after the gate: whatever the remote says then

    held = [threading.Thread(target=stuck) for _ in range(int(pace.limit))]
    for t in held:
        t.start()
    try:
        while pace.active < int(pace.limit):  # every slot of the remote is held
            gate.wait(0.01)
        old.close()
        old_srv.stop()
        srv = s3_server_factory()  # a new server on the port the old one freed
        srv.stop()
        srv.port = old_srv.port
        srv.start()
        assert srv.remote("bkt/v") == spec
        src = tmp_path / "src"
        write_tree(src, seed=6)
        specs = [spec, str(tmp_path / "n0"), str(tmp_path / "n1")]
        with Vault.create(tmp_path / "new", specs, 2, 3, PW, segment_size=1 << 20) as v:
            backup_paths(v, [src])
            assert v.flush().complete
            keys = v.keys
        assert (srv.root / "bkt" / "v" / "data").is_dir()
        with_remote_index(keys, specs[:2], tmp_path, tmp_path / "out")
        assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)
    finally:
        gate.set()  # the abandoned operations end into the old vault's closed pace
        for t in held:
            t.join()
    assert pace.active == 0 and pace.closed


def test_rollback_and_tampered_manifest_detected(tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=5)
    v, remotes = make_vault(tmp_path, nremotes=3, k=2, n=3)
    with v:
        backup_paths(v, [src])
        v.flush()
        keys = v.keys
        old = {r: sorted(os.listdir(Path(r) / "manifests")) for r in remotes}
        (src / "later.txt").write_text("written after the first snapshot\n")
        backup_paths(v, [src])
        v.flush()
    # remote 0 rolled back to the first manifest: a restore warns it is stale
    for name in os.listdir(Path(remotes[0]) / "manifests"):
        if name not in old[remotes[0]]:
            os.unlink(Path(remotes[0]) / "manifests" / name)
    (_r, warnings, m) = with_remote_index(keys, remotes, tmp_path, tmp_path / "o1")
    assert m.seq == 2 and any("stale" in w for w in warnings)
    # every remote rolled back, but we have seen #2 before: refuse
    for r in remotes[1:]:
        for name in os.listdir(Path(r) / "manifests"):
            if name not in old[r]:
                os.unlink(Path(r) / "manifests" / name)
    with pytest.raises(IntegrityError, match="rollback"):
        with_remote_index(keys, remotes, tmp_path, tmp_path / "o2", min_seq=2)
    # a tampered manifest is rejected; with no valid one left, restore refuses
    for r in remotes:
        for name in os.listdir(Path(r) / "manifests"):
            p = Path(r) / "manifests" / name
            b = bytearray(p.read_bytes())
            b[60] ^= 1
            p.write_bytes(bytes(b))
    with pytest.raises(IntegrityError, match="signed manifest"):
        with_remote_index(keys, remotes, tmp_path, tmp_path / "o3")
    # a manifest from another vault's key is not accepted either: a wrong key (exit 10),
    # which names a strategy's tier seeds (the usual way to get here)
    with pytest.raises(WrongKey, match="strategy seed TIER"):
        with_remote_index(VaultKeys.from_seed(new_seed()), remotes, tmp_path, tmp_path / "o4")


@pytest.mark.parametrize(
    "evil",
    ["../escape.txt", "/tmp/vaultfs-abs-escape.txt", "a/../../b", b"..\xff/../../escape.txt"],
)
def test_restore_refuses_paths_outside_target(tmp_path, evil):
    v, remotes = make_vault(tmp_path, nremotes=3, k=2, n=3)
    with v:
        cids, size = v.store_chunks([b"evil payload"]), 12
        v.commit([Entry(evil, "f", 0o644, 0, size=size, cids=cids)])
        v.flush()
        keys = v.keys
    out = tmp_path / "target" / "inner"
    with pytest.raises(Exception, match="invalid path|outside"):
        with_remote_index(keys, remotes, tmp_path, out)
    assert not (tmp_path / "target" / "escape.txt").exists()
    assert not Path("/tmp/vaultfs-abs-escape.txt").exists()
    assert not out.exists() or not any(out.iterdir())


def test_second_writer_is_refused(tmp_path):
    v, _ = make_vault(tmp_path, nremotes=2, k=1, n=2)
    with v, pytest.raises(VaultBusy):
        Vault.open(tmp_path / "home", PW)


def test_crash_states_are_recovered_on_open(tmp_path):
    """The crash-state table of docs/design.md, one row at a time."""
    src = tmp_path / "src"
    write_tree(src, seed=6)
    v, remotes = make_vault(tmp_path, nremotes=3, k=2, n=3)
    with v:
        backup_paths(v, [src])
        q = v.queue_dir
        rid = v.remotes()[0].rid
        queued = v.index.q("SELECT name FROM shards WHERE state='queued' AND remote=?", (rid,))
    # (1) crash after writing shard files, before the index transaction: orphans removed
    orphan = q / f"r{rid}" / "data" / ("0" * 32)
    orphan.write_bytes(b"half a segment")
    (q / "tmp" / "partial").write_bytes(b"torn write")
    # (2) crash after rclone uploaded a shard, before the index marked it placed
    name = queued[0][0]
    moved = q / f"r{rid}" / "data" / name
    (Path(remotes[0]) / "data").mkdir(parents=True, exist_ok=True)
    os.replace(moved, Path(remotes[0]) / "data" / name)
    # (3) crash after writing a manifest file but before its index row
    (q / "manifests" / "0000000000000099-deadbeef").write_bytes(b"unsigned junk")
    v = Vault.open(tmp_path / "home", PW)
    with v:
        assert not orphan.exists() and not (q / "tmp" / "partial").exists()
        assert v.index.one("SELECT state FROM shards WHERE name=?", (name,))[0] == "placed"
        assert not (q / "manifests" / "0000000000000099-deadbeef").exists()
        assert v.flush().complete
        keys = v.keys
    with_remote_index(keys, remotes[1:], tmp_path, tmp_path / "out")
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)


def test_restore_with_local_state_reads_queue_before_upload(tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=7)
    v, remotes = make_vault(tmp_path, nremotes=3, k=2, n=3)
    with v:
        backup_paths(v, [src])  # nothing uploaded yet
        source = ShardSource(v.remotes(), v.queue_dir)
        source.list_all()
        restore_files(v.keys, v.index, source, tmp_path / "out")
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)
    assert not any((Path(r) / "data").exists() for r in remotes)


def test_restore_in_windows_of_chunks_is_byte_identical(tmp_path, monkeypatch):
    """A restore plans and writes a window of chunks at a time (memory flat in the snapshot's
    size): with windows of 7 chunks, files spanning several windows and several files in one
    window restore byte-identical."""
    from vaultfs import restore as restore_mod

    src = tmp_path / "src"
    write_tree(src, seed=11)
    v, remotes = make_vault(tmp_path)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
        chunks = v.index.one("SELECT count(*) FROM content_chunks")[0]
    assert chunks > 3 * 7
    windows: list[int] = []
    plan_windows = restore_mod._plan_windows

    def counted(to, index, file_rows, window=None):
        for plan in plan_windows(to, index, file_rows, 7):
            windows.append(sum(len(rows) for rows in plan.values()))
            yield plan

    monkeypatch.setattr(restore_mod, "_plan_windows", counted)
    with_remote_index(keys, remotes[:3], tmp_path, tmp_path / "out")
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)
    assert len(windows) > 3 and max(windows) <= 7 + 6  # a window ends once it holds >= 7
    assert not (tmp_path / "out" / restore_mod.INCOMPLETE).exists()


def test_old_index_copies_are_pruned_after_newer_ones_are_placed(tmp_path):
    v, remotes = make_vault(tmp_path, nremotes=3, k=2, n=3)
    src = tmp_path / "src"
    src.mkdir()
    with v:
        for i in range(5):
            (src / f"f{i}.txt").write_text(f"version {i}\n" * 1000)
            backup_paths(v, [src])
            assert v.flush().complete
        keys = v.keys
        meta_segments = v.index.one("SELECT count(*) FROM segments WHERE kind='meta'")[0]
        # the meta segments left are exactly those a kept manifest names (a block in them)
        named = v.index.one("SELECT count(DISTINCT segment) FROM manifest_segments")[0]
        kept = v.index.one("SELECT count(DISTINCT manifest) FROM manifest_segments")[0]
    for r in remotes:
        assert len(os.listdir(Path(r) / "manifests")) == Vault.KEEP_INDEX_COPIES
        assert len(os.listdir(Path(r) / "meta")) == meta_segments  # one shard each per remote
    assert meta_segments == named and kept == Vault.KEEP_INDEX_COPIES
    (res, _w, m) = with_remote_index(keys, remotes[:2], tmp_path, tmp_path / "out")
    assert m.seq == 5 and sorted(os.listdir(tmp_path / "out" / "src")) == [
        f"f{i}.txt" for i in range(5)
    ]


def test_restore_fetches_ahead_of_the_decoders_within_the_budget(tmp_path, monkeypatch):
    """The fetch thread moves the next batches while the decoders still work on the first
    (a decoder held on batch 0 until batch 2 is being fetched: the restore would hang, and
    fail, if a fetch waited for the batch before to be written); with a budget smaller than a
    batch, one batch at a time is staged. Both restores byte-identical."""
    from vaultfs import restore as restore_mod

    src = tmp_path / "src"
    write_tree(src, seed=5)
    v, remotes = make_vault(tmp_path)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
        nseg = v.index.one("SELECT count(*) FROM segments WHERE kind='data'")[0]
    assert nseg >= 3
    monkeypatch.setattr(restore_mod, "DECODERS", 0)  # decoders here, so a spy can hold them
    monkeypatch.setattr(restore_mod, "FIRST_BATCH", 1)
    monkeypatch.setattr(restore_mod, "BATCH_SEGMENTS", 1)
    staged_at_fetch: list[int] = []  # batch directories staged when each batch is fetched
    third = threading.Event()
    real_fetch, real_decode = ShardSource.fetch, restore_mod._restore_segment

    def fetch(self, wanted, into):
        if into.parent.name.startswith("vaultfs-restore-"):  # a data batch, not the index
            staged_at_fetch.append(len(list(into.parent.glob("b*"))))
            if len(staged_at_fetch) == 3:
                third.set()
        return real_fetch(self, wanted, into)

    def decode(job):
        if job[0] == 0:
            assert third.wait(120), "batch 2 was not fetched while batch 0 was decoded"
        return real_decode(job)

    monkeypatch.setattr(ShardSource, "fetch", fetch)
    monkeypatch.setattr(restore_mod, "_restore_segment", decode)
    with_remote_index(keys, remotes[:3], tmp_path, tmp_path / "ahead")
    assert tree_digest_of(tmp_path / "ahead" / "src") == tree_digest_of(src)
    assert len(staged_at_fetch) == nseg and max(staged_at_fetch) >= 3

    staged_at_fetch.clear()
    third.set()
    monkeypatch.setattr(restore_mod, "read_ahead_budget", lambda: 1)
    with_remote_index(keys, remotes[:3], tmp_path, tmp_path / "one")
    assert tree_digest_of(tmp_path / "one" / "src") == tree_digest_of(src)
    assert len(staged_at_fetch) == nseg and set(staged_at_fetch) == {1}


def test_a_restore_uses_each_read_ahead_shard_once(tmp_path, monkeypatch):
    """Shards downloaded ahead are used by the first batch that needs them and deleted with
    it; a segment met again in a later window (windows of 7 chunks) is downloaded anew, not
    read from a deleted file: the restore is byte-identical and warns of nothing."""
    from vaultfs import restore as restore_mod

    src = tmp_path / "src"
    write_tree(src, seed=11)
    v, remotes = make_vault(tmp_path)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    monkeypatch.setattr(restore_mod, "READ_IN_PLACE", False)  # read ahead through rclone
    plan_windows = restore_mod._plan_windows
    monkeypatch.setattr(
        restore_mod,
        "_plan_windows",
        lambda to, index, rows, window=None: plan_windows(to, index, rows, 7),
    )
    source = ShardSource([open_backend(s) for s in remotes[:3]])
    ahead = tmp_path / "ahead"
    source.start(read_ahead=ahead)
    want = sum(len(os.listdir(Path(r) / "data")) for r in remotes[:3])
    while len([f for f in ahead.rglob("*") if len(f.name) == 32]) < want:  # all read ahead
        threading.Event().wait(0.05)
    work = tmp_path / "work"
    work.mkdir()
    db, source, _m, _w = open_remote_index(keys, source.remotes, work, src=source)
    try:
        staged = len(source.staged)
        *_res, warnings = restore_files(keys, db, source, tmp_path / "out")
    finally:
        db.close()
        source.stop()
    assert staged == want and not source.staged  # every one used, and by one batch
    assert warnings == []
    assert tree_digest_of(tmp_path / "out" / "src") == tree_digest_of(src)
