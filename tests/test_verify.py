"""Audits, repair and remote management beyond the fault suite: sampling math, keyed piece tags,
resumable audits, retry/backoff and error states, failure domains, tampering with the local
index, unrecoverable segments, and the command line's bad-input contract."""

from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import PASSPHRASE, empty_remote, init_local_vault, run_cli, vaultfs_env

from vaultfs import audittag, merkle, segment
from vaultfs import repair as repair_mod
from vaultfs import verify as verify_mod
from vaultfs.backends import FaultInjecting, Wrapper, open_backend
from vaultfs.errors import IntegrityError, VaultError
from vaultfs.index import segments as segment_table
from vaultfs.keys import VaultKeys
from vaultfs.restore import open_remote_index, restore_files
from vaultfs.vault import Entry, Vault, place, survivable_losses
from vaultfs.vault.queue import write_durable


def _vault(tmp: Path, remotes: int = 5, k: int = 3, n: int = 5, mib: float = 3.0):
    specs = [str(tmp / f"r{i}") for i in range(remotes)]
    v = Vault.create(tmp / "home", specs, k, n, PASSPHRASE, segment_size=1 << 20)
    data = os.urandom(int(mib * 1024 * 1024))
    cids, total = v.store_stream(io.BytesIO(data))
    v.commit([Entry("blob", "f", 0o644, 0, total, cids=cids)], "one")
    rep = v.flush()
    assert rep.complete
    return v, specs, data


def _restore(keys: VaultKeys, specs: list[str], work: Path) -> bytes:
    work.mkdir()
    db, src, _m, _w = open_remote_index(keys, [open_backend(s) for s in specs], work)
    try:
        restore_files(keys, db, src, work / "out")
    finally:
        db.close()
    return (work / "out" / "blob").read_bytes()


# -- sampling math -----------------------------------------------------------------------------
def test_sampling_math() -> None:
    assert verify_mod.checks_needed(0.99, 0.01) == 459
    assert verify_mod.checks_needed(0.95, 0.01) == math.ceil(math.log(0.05) / math.log(0.99))
    assert verify_mod.checks_needed(0.99, 0.05) == 90
    # hypergeometric (without replacement) is never worse than the with-replacement bound
    for blocks in (1_000, 100_000, 10_000_000):
        c = verify_mod.confidence_reached(459, blocks, 0.01)
        assert c >= 1 - 0.99**459 >= 0.99
    assert verify_mod.confidence_reached(459, 1_000, 0.01) > verify_mod.confidence_reached(
        459, 10_000_000, 0.01
    )
    # checking every block that could hide the loss gives certainty; none gives nothing
    assert verify_mod.confidence_reached(991, 1_000, 0.01) == 1.0
    assert verify_mod.confidence_reached(0, 1_000, 0.01) == 0.0
    assert verify_mod.confidence_reached(20, 20, 0.01) == 1.0
    with pytest.raises(ValueError):
        verify_mod.checks_needed(1.0, 0.01)


@pytest.mark.parametrize(
    "size",
    [0, 1, audittag.PIECE, audittag.PIECE + 1, merkle.BLOCK_SIZE, merkle.BLOCK_SIZE + 1,
     2 * merkle.BLOCK_SIZE + 100],
)  # fmt: skip
def test_piece_tags_are_the_piece_tag_of_every_piece(size: int) -> None:
    """The sealers' batched :func:`audittag.piece_tags` gives, piece by piece, the tag that
    verify checks (:func:`audittag.piece_tag`), short last pieces and the empty object
    included."""
    key = os.urandom(32)
    body = os.urandom(size)
    leaves = b"".join(merkle.block_hashes(body))
    tags = audittag.piece_tags(key, body, leaves)
    base = audittag.tagger(key)
    expect = []
    for b in range(max(1, math.ceil(size / merkle.BLOCK_SIZE))):
        block = body[b * merkle.BLOCK_SIZE : (b + 1) * merkle.BLOCK_SIZE]
        for j in range(max(1, math.ceil(len(block) / audittag.PIECE))):
            piece = block[j * audittag.PIECE : (j + 1) * audittag.PIECE]
            expect.append(audittag.piece_tag(base, leaves[32 * b : 32 * b + 32], b, j, piece))
    assert tags == b"".join(expect)


def test_piece_tags_bind_bytes_and_leaf() -> None:
    key = os.urandom(32)
    seg = os.urandom(300_000)
    sh = segment.build_shards(seg + bytes(-len(seg) % 3), 3, 5, key)[0]
    tags = audittag.piece_tags(key, sh.body, sh.blocks)
    nblocks = math.ceil(len(sh.body) / merkle.BLOCK_SIZE)
    assert len(tags) == math.ceil(len(sh.body) / audittag.PIECE) * audittag.TAG_LEN
    base = audittag.tagger(key)
    b, j = nblocks - 1, 0
    off = b * merkle.BLOCK_SIZE + j * audittag.PIECE
    piece = sh.body[off : off + audittag.PIECE]
    leaf = sh.blocks[32 * b : 32 * b + 32]
    t = (b * (merkle.BLOCK_SIZE // audittag.PIECE) + j) * audittag.TAG_LEN
    stored = tags[t : t + 8]
    assert audittag.stored_tag(tags, b, j) == stored
    assert audittag.piece_tag(base, leaf, b, j, piece) == stored
    flipped = bytes([piece[0] ^ 1]) + piece[1:]
    assert audittag.piece_tag(base, leaf, b, j, flipped) != stored
    assert audittag.piece_tag(base, bytes(32), b, j, piece) != stored
    other = audittag.tagger(os.urandom(32))  # another vault's audit key
    assert audittag.piece_tag(other, leaf, b, j, piece) != stored


def test_piece_tags_equal_the_one_piece_tag_of_every_piece() -> None:
    """The inlined loop gives :func:`piece_tag`'s bytes for every piece: whole ones, the short
    last piece of the last block, and other piece sizes."""
    key = os.urandom(32)
    body = os.urandom(3 * merkle.BLOCK_SIZE + 5_000)
    leaves = b"".join(merkle.block_hashes(body))
    base = audittag.tagger(key)
    for size in (audittag.PIECE, 1000, 4096):
        tags = audittag.piece_tags(key, body, leaves, size)
        want = bytearray()
        for b, boff in enumerate(range(0, len(body), merkle.BLOCK_SIZE)):
            block = body[boff : boff + merkle.BLOCK_SIZE]
            for j, poff in enumerate(range(0, len(block), size)):
                leaf = leaves[32 * b : 32 * b + 32]
                want += audittag.piece_tag(base, leaf, b, j, block[poff : poff + size])
        assert tags == bytes(want)
    assert audittag.piece_tags(key, b"", merkle.block_hashes(b"")[0]) == audittag.piece_tag(
        base, merkle.block_hashes(b"")[0], 0, 0, b""
    )


# -- audits ------------------------------------------------------------------------------------
def test_ranged_audit_is_cheap_and_resumes_after_cut_off(tmp_path: Path) -> None:
    v, specs, _data = _vault(tmp_path, mib=2)
    try:
        # cut off before the first challenge: the plan is kept
        first = verify_mod.audit(v, [specs[0]], max_duration=1e-9, whole_budget=0)
        r = first.remotes[0]
        assert not r.complete and r.remaining == r.planned > 0 and r.checked == 0
        assert r.planned == min(r.blocks, 459)
        (run_id, finished) = v.index.one("SELECT id, finished FROM audit_runs ORDER BY id DESC")
        assert finished is None
        # the next audit resumes the same run and finishes it
        second = verify_mod.audit(v, [specs[0]], whole_budget=0)
        r2 = second.remotes[0]
        assert r2.resumed and r2.complete and r2.clean
        assert r2.checked == r.planned and r2.remaining == 0
        assert v.index.one("SELECT max(id) FROM audit_runs")[0] == run_id
        assert r2.confidence == 1.0  # a small remote: every block was challenged
        # ranged challenges read one 1 KiB piece each (plus the newest manifest)
        assert r2.bytes_read <= r2.checked * audittag.PIECE + 64 * 1024
        assert r2.bytes_read < r2.stored_bytes * 0.1
        # a sample of 10% draws ⌈0.1·blocks⌉ fresh random challenges
        third = verify_mod.audit(v, [specs[1]], mode="sample", sample=10, whole_budget=0)
        r3 = third.remotes[0]
        assert r3.planned == math.ceil(r3.blocks / 10) and r3.complete
        assert 0 < r3.confidence < 1
    finally:
        v.close()


def test_ranged_challenges_start_no_rclone_process_per_challenge(tmp_path, monkeypatch) -> None:
    """Challenged objects above the whole-object budget are read by ranges: through the rclone
    daemon, so the rclone processes started are bounded by the objects, not the challenges
    (one per challenge made a sampled audit ~30x slower than reading everything)."""
    from vaultfs.remotes import RcloneDaemon, rclone_binary

    v, specs, _data = _vault(tmp_path, mib=3)
    log = tmp_path / "rclone.log"
    fake = tmp_path / "rclone"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {rclone_binary()} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("VAULTFS_RCLONE", str(fake))
    RcloneDaemon.shutdown()  # the daemon this audit uses starts through the counting rclone
    try:
        rep = verify_mod.audit(v, [specs[0]], whole_budget=0).remotes[0]
        assert rep.complete and rep.clean
        objects = sum(1 for sub in ("data", "meta") for _ in (Path(specs[0]) / sub).iterdir())
        started = log.read_text().split() if log.exists() else []
        assert rep.checked > 2 * objects  # several challenges per object
        assert len(started) <= objects, started
    finally:
        RcloneDaemon.shutdown()
        v.close()


def test_tampered_local_index_is_caught(tmp_path: Path) -> None:
    v, specs, _data = _vault(tmp_path, mib=1.5)
    try:
        sid, blocks = v.index.one(
            "SELECT s.id, s.blocks FROM shards s JOIN segments g ON g.id = s.segment"
            " WHERE g.kind='data' LIMIT 1"
        )
        forged = bytes(32) + bytes(blocks)[32:]
        leaves = [forged[i : i + 32] for i in range(0, len(forged), 32)]
        with v.index.tx() as db:  # a forged leaf, with its shard root recomputed to match
            db.execute(
                "UPDATE shards SET blocks=?, root=? WHERE id=?", (forged, merkle.root(leaves), sid)
            )
        with pytest.raises(IntegrityError, match="signed vault root|index was altered"):
            verify_mod.audit(v, mode="read-all")
    finally:
        v.close()


def test_a_remote_whose_objects_are_all_gone_claims_no_confidence(tmp_path: Path) -> None:
    """A remote whose objects were all deleted (its directory left, emptied) lists as empty:
    every object placed there is missing and no block could be checked, so its row claims no
    confidence (0 in --json, "-" in the table; it used to say 100%: nothing to check means
    nothing can hide) and says why (`unchecked`), in a sampled audit and a --read-all one
    alike. The intact remotes' rows keep theirs, and `remote list` shows the 0 %. (A
    directory missing altogether is a remote down: tests/test_local_root.py.)"""
    home, remotes = init_local_vault(tmp_path, 2, 3)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(1_500_000))
    run_cli("backup", str(src), home=home)
    empty_remote(remotes[2])
    for mode in ([], ["--read-all"]):
        rep = json.loads(run_cli("verify", *mode, "--json", home=home, check=12).stdout)
        rows = {r["remote"]: r for r in rep["remotes"]}
        gone = rows.pop(str(remotes[2]))
        assert gone["missing"] and gone["checked"] == gone["objects"] == 0, gone
        assert gone["confidence"] == 0.0, gone
        assert gone["unchecked"] == (
            f"none of its {len(gone['missing'])} objects is there intact (all missing): is it "
            "unplugged, or its directory moved or deleted?"
        )
        assert all(r["confidence"] == 1.0 and r["unchecked"] is None for r in rows.values())
    res = run_cli("verify", home=home, check=12)
    row = next(ln for ln in res.stdout.decode().splitlines() if str(remotes[2]) in ln)
    assert "%" not in row, row
    said = res.stderr.decode().replace("\n", " ")
    assert f"{remotes[2]}: nothing could be checked: none of its" in said, said
    listed = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    assert [r["last_audit_confidence"] for r in listed if r["remote"] == str(remotes[2])] == [0]


def test_an_audit_beside_the_pusher_expects_only_what_was_placed_before_its_listing(
    tmp_path: Path,
) -> None:
    """On a live mount the pusher places queued shards while an audit lists the remotes (the
    pg_dump of tests/test_live.py beside verify): a shard placed after a listing was taken is
    not "missing" from it, and the next audit checks it."""
    v, _specs, _data = _vault(tmp_path)
    cids, total = v.store_stream(io.BytesIO(os.urandom(1 << 20)))
    v.commit([Entry("blob", "g", 0o644, 0, total, cids=cids)], "two")
    assert segment_table.queued_count(v.index) > 0
    pushed = threading.Lock()

    class PushedWhileListing(Wrapper):
        def list_tree(self, subs=("data", "meta", "manifests")):
            tree = self.inner.list_tree(subs)
            if pushed.acquire(blocking=False):  # the first listing taken: the pusher runs
                assert v.flush().complete
            return tree

    for mode in ("list", "sample"):
        if mode == "sample":
            cids, total = v.store_stream(io.BytesIO(os.urandom(1 << 20)))
            v.commit([Entry("blob", "h", 0o644, 0, total, cids=cids)], "three")
            pushed = threading.Lock()
        rep = verify_mod.audit(
            v, mode="sample", sample=50, list_only=mode == "list", wrap=PushedWhileListing
        )
        assert rep.clean, [r.details for r in rep.remotes]
        assert segment_table.queued_count(v.index) == 0
        after = verify_mod.audit(v, mode="sample", sample=50)
        assert after.clean
        assert sum(r.objects for r in after.remotes) > sum(r.objects for r in rep.remotes)
    v.close()


def test_repair_never_zero_fills_and_heals_from_live_data(tmp_path: Path) -> None:
    v, specs, data = _vault(tmp_path, mib=1.5)
    try:
        seg = v.index.one("SELECT min(id) FROM segments WHERE kind='data'")[0]
        rows = v.index.q(
            "SELECT s.name, r.spec FROM shards s JOIN remotes r ON r.id = s.remote"
            " WHERE s.segment=? ORDER BY s.idx LIMIT 3",
            (seg,),
        )
        for name, spec in rows:  # three of five shards gone: below k=3
            (Path(spec) / "data" / name).unlink()
        rep = repair_mod.repair(v)
        assert any(f"segment {seg}" in u for u in rep.unrecoverable)
        assert not [it for it in rep.items if it.segment == seg]
        left = v.index.one(
            "SELECT count(*) FROM shards WHERE segment=? AND state='placed'", (seg,)
        )[0]
        assert left == 2  # nothing invented, nothing dropped: the two good shards stay
        others = [it for it in rep.items if it.segment != seg]
        assert not others  # the other segments were healthy
        assert rep.damaged_files and all(f.endswith(":blob") for f in rep.damaged_files)
        # the live data still exists: heal the dead segment from it (matched by keyed id)
        live = tmp_path / "live"
        live.mkdir()
        (live / "renamed.bin").write_bytes(data)
        healed = repair_mod.repair(v, sources=[live])
        assert healed.ok and healed.healed_from_source > 0 and not healed.damaged_files
        assert v.index.one("SELECT count(*) FROM segments WHERE id=?", (seg,))[0] == 0
        assert verify_mod.audit(v, mode="read-all").clean
        keys = v.keys
    finally:
        v.close()
    assert _restore(keys, specs[2:], tmp_path / "w") == data


def test_repair_goes_most_at_risk_first(tmp_path: Path) -> None:
    v, specs, data = _vault(tmp_path, mib=1.6)
    try:
        segs = [s for (s,) in v.index.q("SELECT id FROM segments WHERE kind='data' ORDER BY id")]
        assert len(segs) >= 2
        low, high = segs[0], segs[-1]  # the older segment loses one shard, the newer two
        for seg, count in ((low, 1), (high, 2)):
            for name, spec in v.index.q(
                "SELECT s.name, r.spec FROM shards s JOIN remotes r ON r.id = s.remote"
                " WHERE s.segment=? ORDER BY s.idx LIMIT ?",
                (seg, count),
            ):
                (Path(spec) / "data" / name).unlink()
        rep = repair_mod.repair(v)
        assert rep.ok and [it.segment for it in rep.items] == [high, high, low]
        keys = v.keys
    finally:
        v.close()
    assert _restore(keys, specs[:3], tmp_path / "w") == data


def test_repair_killed_midway_recovers(tmp_path: Path) -> None:
    """kill -9 of `vaultfs repair` at a few points: the next repair finishes the job (crash
    states in docs/design.md), verify is clean and a restore from k is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=1.6)
    keys = v.keys
    v.close()
    home = tmp_path / "home"
    for delay in (1.2, 2.4):  # bounded: two kill points (after unlock, during the work)
        lost = Path(specs[1]) / "data"
        for p in list(lost.iterdir()):
            p.unlink()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "repair"],
            env=vaultfs_env(home),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        run_cli("repair", home=home)
        rep = json.loads(run_cli("verify", "--read-all", "--json", home=home).stdout)
        assert rep["clean"], rep
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


class _Crash(BaseException):
    """Stands for the process dying at that point."""


def test_repair_that_dies_before_publishing_is_published_by_the_next(tmp_path, monkeypatch):
    """A repair killed after re-pointing shard rows, before shipping the index: the next
    repair has nothing left to rebuild, but must still publish the index, or the remotes'
    copy names the objects the first one replaced (a restore from k would come up short)."""
    v, specs, data = _vault(tmp_path, mib=1.6)
    keys = v.keys
    for p in list((Path(specs[1]) / "data").iterdir()):
        p.write_bytes(p.read_bytes()[:-1])  # damaged (a missing one would keep its name)

    def die(*a, **kw):
        raise _Crash()

    monkeypatch.setattr(Vault, "ship_index", die)
    with pytest.raises(_Crash):
        repair_mod.repair(v, scan=True)
    monkeypatch.undo()
    assert v.index.get("unshipped_since") is not None
    # the replacements' new whitening changed segment roots the remotes' manifest does not
    # sign yet: verify says what to do instead of blaming the index
    with pytest.raises(IntegrityError, match="not yet published.*vaultfs repair"):
        verify_mod.audit(v)
    rep = repair_mod.repair(v, scan=True)
    assert rep.rebuilt == 0 and rep.manifest_seq is not None
    assert v.index.get("unshipped_since") is None
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_repair_that_dies_inside_a_batch_leaves_nothing_and_the_next_finishes(tmp_path):
    """A repair dying between two segments of one batch (docs/design.md, "Repair batches"):
    the batch's rebuilt objects wait in the queue with no rows, the shard rows still name the
    lost objects. Reopening the vault removes those files; the next repair rebuilds the whole
    batch, verify is clean and a restore from k remotes is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=3.0)
    keys = v.keys
    lost = list((Path(specs[1]) / "data").iterdir())
    for p in lost:
        p.unlink()
    before = {sh.id: sh.name for sh in segment_table.live_shards(v.index)}
    done = []

    def die_on_the_second(wrote: int, _total: int) -> None:
        if wrote:  # after a segment (the first call, 0 of the total, is at the start)
            done.append(wrote)
        if len(done) == 2:
            raise _Crash()

    with pytest.raises(_Crash):
        repair_mod.repair(v, progress=die_on_the_second)
    queued = [f for f in v.queue_dir.rglob("*") if f.is_file() and "manifests" not in f.parts]
    assert queued, "the first segment's rebuilt objects are in the queue"
    assert {sh.id: sh.name for sh in segment_table.live_shards(v.index)} == before
    v.close()
    v = Vault.open(tmp_path / "home", PASSPHRASE)
    assert not [f for f in v.queue_dir.rglob("*") if f.is_file() and "manifests" not in f.parts]
    rep = repair_mod.repair(v)
    assert rep.ok and rep.rebuilt == len(lost)
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_a_lost_object_pushed_before_its_batch_committed_is_found_again(tmp_path) -> None:
    """A repair dying inside a batch after a background push moved objects it rebuilt under
    their own names to their remote (docs/design.md, "Repair batches"): the remote holds the
    lost objects again while their rows are still ``lost``. The next repair's listing finds
    them there, reads each whole and, as it hashes as recorded, counts it placed again; it
    rebuilds the others. The remote then holds every lost object byte for byte, the audit is
    clean and a restore from k remotes including that one is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=3.0)
    keys = v.keys
    rid = v.index.one("SELECT id FROM remotes WHERE spec=?", (specs[1],))[0]
    lost = {p.name: p.read_bytes() for p in (Path(specs[1]) / "data").iterdir()}
    for name in lost:
        (Path(specs[1]) / "data" / name).unlink()

    def die_after_the_first(wrote: int, _total: int) -> None:
        if wrote:
            raise _Crash()

    with pytest.raises(_Crash):
        repair_mod.repair(v, progress=die_after_the_first)
    queued = list((v.queue_dir / f"r{rid}" / "data").iterdir())
    assert queued and {p.name for p in queued} <= set(lost)
    for p in queued:  # the push of an earlier batch took them along
        p.rename(Path(specs[1]) / "data" / p.name)
    v.close()
    v = Vault.open(tmp_path / "home", PASSPHRASE)
    rep = repair_mod.repair(v)
    rebuilt = {it.new.split("/")[1] for it in rep.items if it.kind == "data"}
    assert rep.ok and rebuilt == set(lost) - {p.name for p in queued}
    assert {p.name: p.read_bytes() for p in (Path(specs[1]) / "data").iterdir()} == lost
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_an_object_written_for_a_later_fsync_is_written_back_at_once(tmp_path: Path) -> None:
    """A repair batch's objects are written without an fsync (the batch's fsyncs come once
    all are written), and each write asks the kernel to start writing the pages back at once
    (`vault.queue.start_writeback`): the device has written them within seconds, where the
    kernel's own writeback waits for them to expire (30 s by default), and the batch's fsyncs
    then wait for less (docs/design.md, "Repair batches")."""
    dev = os.stat(tmp_path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if not stat.exists():
        pytest.skip("the test's directory is on no block device (tmpfs, overlay)")
    if int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) < 1000:
        pytest.skip("the kernel writes dirty pages back within 10 s by itself here")

    def written() -> int:  # bytes the device has written (sectors of 512 bytes)
        return int(stat.read_text().split()[6]) * 512

    size = 32 << 20
    before = written()
    write_durable(tmp_path / "object", os.urandom(size), fsync=False)
    deadline = time.monotonic() + 5
    while written() - before < size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written() - before >= size


def _objects(spec: str) -> dict[str, bytes]:
    """Every shard object of the remote at ``spec`` ("data/<name>", "meta/<name>"): bytes."""
    root = Path(spec)
    return {
        f"{sub}/{p.name}": p.read_bytes()
        for sub in ("data", "meta")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
    }


def _records(v: Vault) -> dict[tuple, tuple]:
    """What a rebuild under the objects' own names leaves as it was, by key: each shard's
    name, remote, size, hash and Merkle records, the audit tags, the segment roots."""
    q = v.index.q
    return {
        **{
            ("shard", r[0]): tuple(r[1:])
            for r in q(
                "SELECT id, segment, idx, name, remote, size, hash, blocks, root FROM shards"
            )
        },
        **{("tags", n, p): (t,) for n, p, t in q("SELECT name, piece, tags FROM audit_tags")},
        **{("segment", i): (r,) for i, r in q("SELECT id, root FROM segments")},
    }


def test_a_remote_that_lost_its_objects_gets_them_back_byte_for_byte(tmp_path: Path) -> None:
    """Every object of a remote deleted (data and index copies): repair writes each again
    under its own name, byte for byte the object that was lost (docs/format.md 7.1: the code
    and the whitening are deterministic), so the shard rows, Merkle records, audit tags and
    segment roots stay as they were; the audit is clean, and a restore from k remotes that
    include the repaired one is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=3.0)
    keys = v.keys
    lost = _objects(specs[1])
    assert any(p.startswith("data/") for p in lost) and any(p.startswith("meta/") for p in lost)
    before = _records(v)
    for sub in ("data", "meta"):
        for p in (Path(specs[1]) / sub).iterdir():
            p.unlink()
    rep = repair_mod.repair(v)
    assert rep.ok and rep.rebuilt == len(lost)
    assert all(it.new == it.old for it in rep.items), "each object came back under its name"
    after = _objects(specs[1])
    assert {p: after.get(p) for p in lost} == lost
    now = _records(v)  # and more: the index copy the repair shipped
    assert {key: now.get(key) for key in before} == before
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, [specs[1], specs[3], specs[4]], tmp_path / "w") == data


def test_repair_says_a_lost_object_came_back_under_its_own_name(tmp_path: Path) -> None:
    """The command's report of an object rebuilt byte for byte on the remote that lost it
    names it once, "under its own name", not as a move to a new object."""
    home, specs = init_local_vault(tmp_path)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    run_cli("backup", str(src), home=home)
    victim = next((Path(specs[1]) / "data").iterdir())
    victim.unlink()
    out = run_cli("repair", home=home).stdout.decode()
    assert f"rebuilt {specs[1]}:data/{victim.name} (missing" in out
    assert "under its own name" in out and "->" not in out
    assert victim.exists()


def test_repair_dry_run_says_which_objects_keep_their_names(tmp_path: Path) -> None:
    """`repair --dry-run` tells a deleted object, which goes back under its own name, from a
    corrupt one (here cut short), whose replacement gets a new name, in --json
    (``keep_name``) and in words; the repair then does what it said."""
    home, specs = init_local_vault(tmp_path, 2, 4)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    run_cli("backup", str(src), home=home)
    deleted = next((Path(specs[1]) / "data").iterdir())
    deleted.unlink()
    cut = next((Path(specs[2]) / "data").iterdir())
    cut.write_bytes(cut.read_bytes()[:-100])
    deleted_key = (str(specs[1]), f"data/{deleted.name}")
    cut_key = (str(specs[2]), f"data/{cut.name}")

    def plan(*args: str) -> dict[tuple[str, str], bool]:
        rep = json.loads(run_cli("repair", "--json", *args, home=home).stdout)
        return {(it["old_remote"], it["old"]): it["keep_name"] for it in rep["items"]}

    said = plan("--dry-run")
    assert said == {deleted_key: True, cut_key: False}, said
    lines = run_cli("repair", "--dry-run", home=home).stdout.decode().splitlines()
    (kept,) = [ln for ln in lines if f":data/{deleted.name} (missing" in ln]
    assert kept.startswith(f"would rebuild {specs[1]}:") and kept.endswith(" under its own name")
    (renamed,) = [ln for ln in lines if f":data/{cut.name} (corrupt" in ln]
    assert renamed.endswith(f"-> {specs[2]} under a new name"), renamed
    assert plan() == said
    assert deleted.exists() and not cut.exists()


def test_a_lost_object_that_does_not_come_out_as_recorded_gets_a_new_name(
    tmp_path: Path, monkeypatch
) -> None:
    """A missing object rebuilt under its own name that does not hash as its row records (as
    a liberasurecode writing other fragment headers would make it) is not written under that
    name: it gets a new name, whitening, Merkle records and audit tags, as a corrupt one's
    replacement does; the audit is clean and a restore from k is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=1.6)
    keys = v.keys
    gone = {p.name for p in (Path(specs[1]) / "data").iterdir()}
    for name in gone:
        (Path(specs[1]) / "data" / name).unlink()
    real = segment.stored_object

    def another_coder(idx: int, name: str, fragment: bytes, audit_key: bytes) -> bytearray:
        body = real(idx, name, fragment, audit_key)
        if name in gone:  # under the lost name only: the new name's object is the real one
            body[-1] ^= 1
        return body

    monkeypatch.setattr(segment, "stored_object", another_coder)  # forked workers inherit it
    rep = repair_mod.repair(v)
    monkeypatch.undo()
    data_items = [it for it in rep.items if it.kind == "data"]
    assert rep.ok and len(data_items) == len(gone)
    assert all(it.new != it.old and it.new.split("/")[1] not in gone for it in data_items)
    assert not gone & {p.name for p in (Path(specs[1]) / "data").iterdir()}
    tagged = {n for (n,) in v.index.q("SELECT DISTINCT name FROM audit_tags")}
    assert not gone & tagged and {it.new.split("/")[1] for it in data_items} <= tagged
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_a_shard_rebuilt_under_its_name_for_a_remote_gone_down_meanwhile_gets_a_new_name(
    tmp_path: Path, monkeypatch
) -> None:
    """A missing shard is rebuilt under its own name for the remote that lost it; when that
    remote is found down before the shard is queued (a fetch of the batch failed there),
    placement sends it to another remote, and the object is made again under a new name,
    whitening, Merkle records and audit tags first: the old name's bytes are the lost
    remote's object, not the new remote's. Nothing is left in the queue's tmp/, the audit
    is clean and a restore from the remotes but the lost one is byte-identical."""
    v, specs, data = _vault(tmp_path, remotes=6, mib=3.0)  # a free remote for each segment
    keys = v.keys
    rid = v.index.one("SELECT id FROM remotes WHERE spec=?", (specs[1],))[0]
    lost = {p.name for p in (Path(specs[1]) / "data").iterdir()}
    for name in lost:
        (Path(specs[1]) / "data" / name).unlink()
    renamed = []
    real_renamed, real_enqueue = repair_mod._renamed, repair_mod._enqueue

    def spy(*a):
        renamed.append(a[1].name)
        return real_renamed(*a)

    def gone_down(vault, job, todo, rb, fetcher, *rest):
        fetcher.down.add(rid)  # as a failed fetch there marks it
        return real_enqueue(vault, job, todo, rb, fetcher, *rest)

    monkeypatch.setattr(repair_mod, "_renamed", spy)
    monkeypatch.setattr(repair_mod, "_enqueue", gone_down)
    rep = repair_mod.repair(v)
    monkeypatch.undo()
    items = [it for it in rep.items if it.kind == "data"]
    assert rep.ok and len(items) == len(lost) and set(renamed) == lost
    assert all(it.target != it.old_remote and it.new != it.old for it in items)
    assert not list(v.queue.tmp.iterdir())
    tagged = {n for (n,) in v.index.q("SELECT DISTINCT name FROM audit_tags")}
    assert not lost & tagged and {it.new.split("/")[1] for it in items} <= tagged
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[:1] + specs[2:], tmp_path / "w") == data


def _die_in_a_worker(_job) -> None:
    os._exit(9)  # a rebuild worker killed (the OOM killer, kill -9)


def test_a_rebuild_worker_that_dies_fails_the_repair_clearly_and_the_next_finishes(
    tmp_path, monkeypatch
):
    """A rebuild worker process dying mid-batch: the repair stops with a VaultError that says
    what to do (no traceback, no hang), nothing of the batch is recorded, and the next repair
    rebuilds everything: verify --read-all is clean and a restore from k is byte-identical."""
    v, specs, data = _vault(tmp_path, mib=1.6)
    keys = v.keys
    lost = list((Path(specs[1]) / "data").iterdir())
    for p in lost:
        p.unlink()
    before = {sh.id: sh.name for sh in segment_table.live_shards(v.index)}
    gone = {p.name for p in lost}
    monkeypatch.setattr(repair_mod, "REBUILDERS", 2)
    monkeypatch.setattr(repair_mod, "_rebuild_job", _die_in_a_worker)  # forked workers see it
    with pytest.raises(VaultError, match="rebuild worker process died.*vaultfs repair"):
        repair_mod.repair(v)
    monkeypatch.undo()
    rows = segment_table.live_shards(v.index)
    assert {sh.id: sh.name for sh in rows} == before
    assert {sh.state for sh in rows if sh.name in gone} == {"lost"}  # nothing recorded
    rep = repair_mod.repair(v)
    assert rep.ok and rep.rebuilt == len(lost)
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def _one_remote_lost_in_batches_of_one(tmp_path, monkeypatch):
    """A vault of 4.5 MiB whose remote 1 lost every data object, repaired in batches of one
    segment by two workers: (vault, specs, data, lost paths, {name: bytes}, lost row ids)."""
    v, specs, data = _vault(tmp_path, mib=4.5)
    lost = list((Path(specs[1]) / "data").iterdir())
    gone = {p.name: p.read_bytes() for p in lost}
    for p in lost:
        p.unlink()
    lost_ids = [sh.id for sh in segment_table.live_shards(v.index) if sh.name in gone]
    monkeypatch.setattr(repair_mod, "REBUILDERS", 2)
    monkeypatch.setattr(repair_mod, "FIRST_BATCH", 1)
    monkeypatch.setattr(repair_mod, "BATCH_SEGMENTS", 1)
    return v, specs, data, lost, gone, lost_ids


def test_batches_rebuilt_while_a_commit_waits_commit_together(tmp_path, monkeypatch) -> None:
    """A group commit: while the first batch's commit waits (here 2 s, standing for fsyncs
    behind the disk's writeback), the workers rebuild the batches behind it; the next commit
    takes all of them in one transaction (repair.GROUP_BATCHES). A failure inside that group
    records none of it (all or nothing, as one batch), the batch before it stays committed,
    and the next repair finishes: verify --read-all is clean, a restore is identical."""
    v, specs, data, lost, gone, lost_ids = _one_remote_lost_in_batches_of_one(tmp_path, monkeypatch)
    keys = v.keys
    commits: list[int] = []
    real_commit = repair_mod._commit_batch

    def slow_first(vault, queued, *a):
        if not commits:
            time.sleep(2)  # the other batches are rebuilt meanwhile
        commits.append(len(queued))
        return real_commit(vault, queued, *a)

    monkeypatch.setattr(repair_mod, "_commit_batch", slow_first)
    rep = repair_mod.repair(v)
    assert rep.ok and rep.rebuilt == len(lost) > 4
    # the first commit (its batch, and the next if it was rebuilt by then), then all the
    # others at once
    assert len(commits) == 2 and sum(commits) == len(lost)
    assert {p.name: p.read_bytes() for p in (Path(specs[1]) / "data").iterdir()} == gone

    # the same loss again; this time the second commit fails after its first segment is
    # queued, before its transaction: nothing of its group is recorded
    for p in (Path(specs[1]) / "data").iterdir():
        p.unlink()
    assert repair_mod.repair(v, dry_run=True).items  # listed lost again
    commits.clear()

    def die_in_the_group(wrote: int, _total: int) -> None:
        if wrote and len(commits) == 1:  # a segment of the second commit's group
            raise _Crash()

    with pytest.raises(_Crash):
        repair_mod.repair(v, progress=die_in_the_group)
    after = {sh.id: sh.state for sh in segment_table.live_shards(v.index)}
    assert len(commits) == 1  # the group never reached its transaction
    assert len([i for i in lost_ids if after[i] != "lost"]) == commits[0] < len(lost)
    monkeypatch.undo()
    v.close()
    v = Vault.open(tmp_path / "home", PASSPHRASE)
    rep = repair_mod.repair(v)
    assert rep.ok
    assert {p.name: p.read_bytes() for p in (Path(specs[1]) / "data").iterdir()} == gone
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_repair_in_many_batches_commits_them_in_order(tmp_path, monkeypatch) -> None:
    """One segment a batch, two rebuild workers: several batches are handed to the workers
    while an earlier one is committed (repair.FLIGHT); each is committed once, in plan order
    (the report lists the segments as planned), and the result is exact: verify --read-all
    is clean and a restore from the k remotes that include the rebuilt one is identical."""
    v, specs, data = _vault(tmp_path, mib=4.5)
    keys = v.keys
    lost = list((Path(specs[1]) / "data").iterdir())
    for p in lost:
        p.unlink()
    monkeypatch.setattr(repair_mod, "REBUILDERS", 2)
    monkeypatch.setattr(repair_mod, "FIRST_BATCH", 1)
    monkeypatch.setattr(repair_mod, "BATCH_SEGMENTS", 1)
    rep = repair_mod.repair(v)
    assert rep.ok and rep.rebuilt == len(lost) > repair_mod.FLIGHT + 1
    segs = [it.segment for it in rep.items]
    assert segs == sorted(segs)  # one lost remote: every segment equally at risk, by id
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_a_commit_that_fails_stops_the_batches_behind_it(tmp_path, monkeypatch) -> None:
    """Batches are committed on their own thread while later ones are rebuilt: when one
    commit fails, the batches behind it, already handed to the workers, are not committed
    (each batch stays all or nothing, in plan order), the error reaches the caller, and the
    next repair finishes the rest: verify --read-all is clean, a restore is identical. (One
    batch a commit here; a group of batches is
    test_batches_rebuilt_while_a_commit_waits_commit_together's.)"""
    v, specs, data, lost, gone, lost_ids = _one_remote_lost_in_batches_of_one(tmp_path, monkeypatch)
    keys = v.keys
    monkeypatch.setattr(repair_mod, "GROUP_BATCHES", 1)
    calls = []

    def die_on_the_third(wrote: int, _total: int) -> None:
        if wrote:  # after a segment (the first call, 0 of the total, is at the start)
            calls.append(wrote)
        if len(calls) == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        repair_mod.repair(v, progress=die_on_the_third)
    # a committed batch's rows are queued (its objects back under their own names)
    after = {sh.id: sh.state for sh in segment_table.live_shards(v.index)}
    committed = [i for i in lost_ids if after[i] != "lost"]
    assert len(lost) > 4 and len(committed) == 2  # the two batches before the failed one
    assert len(calls) == 3  # no batch behind it reached its commit
    monkeypatch.undo()
    v.close()
    v = Vault.open(tmp_path / "home", PASSPHRASE)
    rep = repair_mod.repair(v)
    # the failed batch's object may have reached the remote before it failed (a background
    # push of the batches before it moves whatever is queued): found there again, not rebuilt
    assert rep.ok and rep.rebuilt <= len(lost) - 2
    assert {p.name: p.read_bytes() for p in (Path(specs[1]) / "data").iterdir()} == gone
    assert verify_mod.audit(v, mode="read-all").clean
    v.close()
    assert _restore(keys, specs[1:4], tmp_path / "w") == data


def test_remove_remote_rebuilds_elsewhere(tmp_path: Path) -> None:
    v, specs, data = _vault(tmp_path, remotes=6, mib=1.2)
    try:
        gone = specs[2]
        held = v.index.one(
            "SELECT count(*) FROM shards s JOIN remotes r ON r.id = s.remote WHERE r.spec=?",
            (gone,),
        )[0]
        rep = repair_mod.remove_remote(v, gone)
        assert rep.ok and rep.rebuilt == held > 0
        assert not list((Path(gone) / "data").iterdir())  # its objects were deleted
        assert verify_mod.audit(v).clean
        assert [r["member"] for r in repair_mod.list_remotes(v) if r["remote"] == gone] == [
            "removed"
        ]
        keys = v.keys
    finally:
        v.close()
    assert _restore(keys, [specs[0], specs[3], specs[5]], tmp_path / "w") == data


def _shard_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("data", "meta")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
    }


def test_remote_remove_of_a_moved_directory_says_nothing_was_deleted(tmp_path: Path) -> None:
    """`remote remove` of a remote whose directory was renamed (a disk unplugged, moved)
    takes it out of the vault, but finds none of its objects there to delete: it says so (a
    warning, `not_found`, exit 3) instead of a clean success, and the copies stay where they
    went. When only some of a remote's objects are gone, it counts those."""
    home, remotes = init_local_vault(tmp_path, 3, 5)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(2_500_000))
    run_cli("backup", str(src), home=home)
    moved = tmp_path / "moved"
    remotes[4].rename(moved)
    held = _shard_files(moved)
    rep = json.loads(
        run_cli("remote", "remove", str(remotes[4]), "--json", home=home, check=3).stdout
    )
    assert rep["not_found"] == len(held) > 0 and not rep["deleted"] and not rep["ok"], rep
    said = "".join(rep["warnings"])
    assert f"none of the {len(held)} objects {remotes[4]} held were found there" in said
    assert f"its directory {remotes[4]} is missing (is it unplugged or moved?)" in said, said
    assert not remotes[4].exists()  # not recreated
    assert _shard_files(moved) == held  # still there, under the new name
    rows = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    assert [r["member"] for r in rows if r["remote"] == str(remotes[4])] == ["removed"]
    # some of a remote's objects gone: the others are deleted, the missing ones counted
    lost = sorted((remotes[3] / "data").iterdir())[:2]
    for p in lost:
        p.unlink()
    left = len(_shard_files(remotes[3]))
    res = run_cli("remote", "remove", str(remotes[3]), home=home, check=3)
    assert f"2 of the {left + 2} objects {remotes[3]} held were not found there".encode() in (
        res.stderr.replace(b"\n", b" ")
    ), res.stderr
    assert not _shard_files(remotes[3])
    assert json.loads(run_cli("verify", "--json", home=home).stdout)["clean"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root (CAP_LINUX_IMMUTABLE)")
def test_remote_remove_whose_clearing_fails_exits_3_naming_what_is_left(tmp_path: Path) -> None:
    """`remote remove` of a remote that refuses deletes (its objects immutable: `chattr +i`)
    takes it out of the vault, its shards rebuilt on the others, but cannot clear it: it
    says what was left on which remote and how to finish (a rerun cannot: delete by hand),
    `not_cleared` names it in --json (`ok` false), and exits 3, not 0. Nothing is lost: the
    copies stay there and the vault verifies clean without them. Before, exit 0."""
    home, remotes = init_local_vault(tmp_path, 3, 5)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(2_500_000))
    run_cli("backup", str(src), home=home)
    gone = remotes[4]
    held = _shard_files(gone)
    files = [str(p) for p in gone.rglob("*") if p.is_file()]
    subprocess.run(["chattr", "+i", *files], check=True, capture_output=True)
    try:
        res = run_cli("remote", "remove", str(gone), "--json", home=home, check=3)
        rep = json.loads(res.stdout)
        assert rep["not_cleared"] == str(gone) and not rep["ok"] and rep["rebuilt"], rep
        said = rep["errors"][str(gone)]
        assert said.startswith("left its objects in place: clearing it failed"), said
        assert "a rerun cannot finish this" in said and "delete what is left by hand" in said
        assert _shard_files(gone) == held  # every copy still there
        rows = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
        assert [r["member"] for r in rows if r["remote"] == str(gone)] == ["removed"]
        assert json.loads(run_cli("verify", "--json", home=home).stdout)["clean"]
    finally:
        subprocess.run(["chattr", "-R", "-i", str(gone)], capture_output=True)


def test_shards_squeezed_by_remote_remove_are_spread_again(tmp_path: Path) -> None:
    """Removing two of a 3-of-5 vault's five remotes squeezes each segment's shards onto
    three (2, 2, 1), and the first removal says that the vault now survives one remote loss
    where its profile promised two. After two `remote add`, `status` says the profile
    promises two again while the shards sit on three remotes, and the routine's repair
    (`vaultfs run`) spreads them: a shard of each doubled-up domain is rebuilt on a new
    remote under a new name and the old object deleted. The vault survives two losses, the
    audit is clean, and the two new remotes with one old one restore it."""
    home, remotes = init_local_vault(tmp_path, 3, 5)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(2_500_000))
    run_cli("backup", str(src), home=home)
    res = run_cli("remote", "remove", str(remotes[4]), home=home)
    assert b"survives 1 remote loss(es), where its 3-of-5 profile promised 2" in res.stderr
    run_cli("remote", "remove", str(remotes[3]), home=home)
    new = [tmp_path / "n0", tmp_path / "n1"]
    for r in new:
        run_cli("remote", "add", str(r), home=home)
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["survives_losses_now"] == 1 < st["survives_losses_promised"] == 2
    assert b"spreads them" in run_cli("status", home=home).stdout
    held = {p.name for r in remotes[:3] for p in (r / "data").iterdir()}
    run_cli("schedule", "set", "repair=auto", home=home)
    ran = json.loads(run_cli("run", "--json", home=home).stdout)
    assert "repair" in ran["ran"], ran
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["survives_losses_now"] == st["survives_losses_promised"] == 2
    moved = {p.name for r in new for p in (r / "data").iterdir()}
    assert moved and not moved & held  # rebuilt under new names
    assert held - {p.name for r in remotes[:3] for p in (r / "data").iterdir()}  # old ones gone
    assert json.loads(run_cli("verify", "--read-all", "--json", home=home).stdout)["clean"]
    out = tmp_path / "out"
    run_cli("restore", "--from", str(new[0]), "--from", str(new[1]), "--from", str(remotes[0]),
            "--to", str(out), home=home)  # fmt: skip
    assert (out / "src" / "f.bin").read_bytes() == (src / "f.bin").read_bytes()


def test_repair_by_remote_replace_leaves_the_new_remote_ok_and_the_old_one_empty(
    tmp_path: Path,
) -> None:
    """After `remote replace` of a remote that is gone, the new remote is 'ok' (not 'stale'
    until the next verify) and the departed one holds nothing, old index copies included."""
    vault = init_local_vault(tmp_path, segment_mib=None)
    home, specs = vault.home, vault.specs
    src = tmp_path / "src.txt"
    for i in range(4):  # several index copies, the older ones superseded
        src.write_text(f"version {i}\n")
        run_cli("backup", str(src), home=home)
    run_cli("verify", home=home)
    subprocess.run(["rm", "-rf", specs[1]], check=True)  # the provider shut down
    run_cli("remote", "replace", specs[1], str(tmp_path / "new"), home=home)
    rows = {
        r["remote"]: r for r in json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    }
    new, old = rows[str(tmp_path / "new")], rows[specs[1]]
    assert new["health"] == "ok" and new["placed_objects"] > 0
    assert old["member"] == "removed" and old["placed_objects"] == 0
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert [r["health"] for r in st["remotes"]] == ["ok", "ok", "ok"]
    run_cli("verify", "--read-all", home=home)


# -- remote failure handling ---------------------------------------------------------------------
def test_slow_remote_does_not_hold_up_the_others(tmp_path: Path) -> None:
    v, specs, _data = _vault(tmp_path, mib=1.5)
    try:
        slow_rid = v.index.one("SELECT id FROM remotes WHERE spec=?", (specs[4],))[0]

        def slow(b):
            return FaultInjecting(b, delay=4.0) if b.rid == slow_rid else b

        rep = verify_mod.audit(v, max_duration=3.0, wrap=slow)
        by = {r.remote: r for r in rep.remotes}
        for spec in specs[:4]:  # audited in parallel: done while the slow one still lists
            assert by[spec].complete and by[spec].clean and by[spec].checked > 0
        lag = by[specs[4]]
        assert not lag.complete and lag.remaining == lag.planned > 0 and not lag.unreachable
        assert not rep.complete
        again = verify_mod.audit(v, [specs[4]])  # the slow remote's audit resumes later
        assert again.remotes[0].resumed and again.remotes[0].complete and again.clean
    finally:
        v.close()


def test_placement_counts_failure_domains(tmp_path: Path) -> None:
    remotes = [(1, "a"), (2, "b"), (3, "acme"), (4, "acme"), (5, "c")]
    doms = dict(remotes)
    lists = [place(remotes, s, 5) for s in range(10)]
    for lst in lists:
        per = {}
        for r in lst:
            per[doms[r]] = per.get(doms[r], 0) + 1
        assert max(per.values()) == 2 and len(per) == 4  # every domain used, none overloaded
    assert survivable_losses(lists, 3, doms) == 1
    solo = [(r, f"d{r}") for r, _d in remotes]
    assert place(solo, 7, 5) == [solo[(i + 7) % 5][0] for i in range(5)]  # the plain rule
    # the same through the vault: two buckets at one provider count as one domain
    v, specs, _data = _vault(tmp_path, remotes=3, mib=0.5)
    try:
        for i in (3, 4):
            info = repair_mod.add_remote(v, str(tmp_path / f"r{i}"), domain="acme")
            assert info["domain"] == "acme"
        st = v.status()
        assert st["domains"] == 4 and st["survives_losses_design"] == 1
        cids, total = v.store_stream(io.BytesIO(os.urandom(900_000)))
        v.commit([Entry("more", "f", 0o644, 0, total, cids=cids)])
        assert v.flush().complete
        dom = dict(v.index.q("SELECT id, coalesce(domain, 'r' || id) FROM remotes"))
        latest = v.index.one("SELECT max(id) FROM segments WHERE kind='data'")[0]
        acme = [
            r
            for (r,) in v.index.q("SELECT remote FROM shards WHERE segment=?", (latest,))
            if dom[r] == "acme"
        ]
        assert len(acme) <= 2
    finally:
        v.close()


# -- the command line ----------------------------------------------------------------------------
def test_cli_contract_and_bad_input(tmp_path: Path) -> None:
    vault = init_local_vault(tmp_path, 2, 4)
    home, specs = vault.home, vault.specs
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(700_000))
    run_cli("backup", str(src), home=home)

    # a remote that is not part of the vault: one sentence, exit 14
    for cmd in (["verify", "--remote", str(tmp_path / "elsewhere")],
                ["remote", "remove", str(tmp_path / "elsewhere")]):  # fmt: skip
        p = run_cli(*cmd, home=home, check=14)
        assert b"is not part of this vault" in p.stderr and b"Traceback" not in p.stderr
    # the wrong key (passphrase): exit 10, for verify and repair alike
    for cmd in (["verify"], ["repair"]):
        p = run_cli(*cmd, home=home, passphrase="wrong", check=10)
        assert b"wrong passphrase" in p.stderr and b"Traceback" not in p.stderr
    # another vault's keyfile in place of ours: refused, nothing audited
    other = tmp_path / "other"
    run_cli("init", "--remote", str(tmp_path / "o0"), "-k", "1", "-n", "2", home=other)
    run_cli("backup", str(src), home=other)
    os.replace(home / "key.json", tmp_path / "ours.json")
    os.link(other / "key.json", home / "key.json")
    p = run_cli("verify", home=home, check=None)
    assert p.returncode in (10, 16) and b"Traceback" not in p.stderr
    assert b"vault" in p.stderr
    os.unlink(home / "key.json")
    os.replace(tmp_path / "ours.json", home / "key.json")
    # flags that contradict each other
    p = run_cli("verify", "--sample", "5", "--read-all", home=home, check=18)
    assert b"not both" in p.stderr
    run_cli("verify", "--sample", "0", home=home, check=18)

    # cut off by --max-duration, then resumed; --json is data
    p = run_cli("verify", "--max-duration", "0.000001", home=home, check=0)
    assert b"cut off" in p.stderr
    rep = json.loads(run_cli("verify", "--json", home=home).stdout)
    assert rep["clean"] and rep["complete"] and all(r["resumed"] for r in rep["remotes"])
    assert rep["checks_needed"] == 459

    # damage one object; verify names it and exits 12; repair --dry-run changes nothing
    victim = sorted((Path(specs[1]) / "data").iterdir())[0]
    victim.unlink()
    p = run_cli("verify", home=home, check=12)
    assert victim.name.encode() in p.stderr and b"missing" in p.stderr
    dry = json.loads(run_cli("repair", "--dry-run", "--json", home=home).stdout)
    assert [it["old"] for it in dry["items"]] == [f"data/{victim.name}"] and dry["dry_run"]
    assert not victim.exists()
    run_cli("repair", home=home)
    run_cli("verify", "--read-all", home=home, check=0)

    # remote list / status / add with a failure domain
    run_cli("remote", "add", str(tmp_path / "r4"), "--domain", "acme", home=home)
    run_cli("remote", "add", str(tmp_path / "r5"), "--domain", "acme", home=home)
    rows = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    assert [r["domain"] for r in rows if r["remote"].endswith(("r4", "r5"))] == ["acme", "acme"]
    assert all(r["health"] in ("ok", "unknown") for r in rows)
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["domains"] == 5
    assert all("health" in r and "last_audit" in r for r in st["remotes"])
    txt = run_cli("status", home=home).stdout.decode()
    assert "failure-domain loss" in txt and "health" in txt
    # a replacement must be empty: a location holding another vault is refused
    p = run_cli("remote", "replace", specs[0], str(tmp_path / "o0"), home=home, check=16)
    assert b"already holds a vault" in p.stderr
    with sqlite3.connect(home / "index.db") as db:
        assert db.execute("SELECT count(*) FROM remotes WHERE state='active'").fetchone()[0] == 6


def test_verify_sample_takes_a_percent_sign_as_the_schedule_does(tmp_path) -> None:
    """`verify --sample 50%` is the schedule's `verify=daily:50%` (one parser): the same
    checks as `--sample 50`; a bad value is one clear line, exit 18. Before (review13), a
    trailing % was refused by the argument parser ("not a valid float", exit 2)."""
    home, _remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * 1024 * 1024))
    run_cli("backup", str(src), home=home)
    planned = []
    for pct in ("50%", "50"):
        rep = json.loads(run_cli("verify", "--sample", pct, "--json", home=home).stdout)
        assert rep["clean"] and all(r["mode"] == "sample" for r in rep["remotes"]), rep
        planned.append([r["planned"] for r in rep["remotes"]])
    assert planned[0] == planned[1] and all(planned[0]), planned
    for bad in ("0%", "101%", "abc", "-1", "%"):
        said = run_cli("verify", "--sample", bad, home=home, check=18).stderr.decode()
        assert f"invalid verify sample {bad!r}: a percentage" in said, said
        assert "Traceback" not in said and len(said.strip().splitlines()) == 1, said
    said = run_cli("schedule", "set", "verify=daily:0%", home=home, check=18).stderr.decode()
    assert "invalid verify sample '0%': a percentage" in said, said
