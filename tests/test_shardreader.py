"""The shard reader (vaultfs/shardreader.py): choice, verification, widening and the lies it
names, first over an in-process transport (fast tier), then through the vault's read path
over real rclone and local-directory remotes."""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
from pathlib import Path

import pytest

from vaultfs import erasure, segment
from vaultfs.errors import IntegrityError, NotEnoughRemotes
from vaultfs.shardreader import (
    Lie,
    ShardRef,
    ShardsUnavailable,
    ShardsUndecodable,
    choose,
    intact,
    read_segment,
    rebuild_fragments,
)
from vaultfs.vault import Vault

PW = "pw-for-shardreader-tests"
K, N = 3, 5
#: the audit key the fast tier's shard objects are whitened under
AK = os.urandom(32)


class FakeTransport:
    """Serves shard objects from a dict: bytes (or header/fragment tuples) are delivered, a
    str is a failure with that reason, an absent name is simply not had."""

    def __init__(self, objects: dict[str, segment.Body | str]) -> None:
        self.objects = objects
        self.calls: list[list[str]] = []

    def fetch(self, refs):
        self.calls.append([r.name for r in refs])
        return {r.name: self.objects[r.name] for r in refs if r.name in self.objects}

    @property
    def fetched(self) -> list[str]:
        return [nm for call in self.calls for nm in call]


def make_segment(k: int = K, n: int = N) -> tuple[bytes, list[segment.Shard], list[ShardRef]]:
    data = random.Random(k * 10 + n).randbytes(48 * 1024)
    shards = segment.build_shards(data, k, n, AK)
    refs = [ShardRef(s.idx, s.name, s.hash, holder=f"remote{s.idx}") for s in shards]
    return data, shards, refs


def objects_of(shards: list[segment.Shard]) -> dict[str, segment.Body | str]:
    return {s.name: s.body for s in shards}


def test_all_intact_reads_exactly_the_k_data_shards_in_one_call():
    data, shards, refs = make_segment()
    t = FakeTransport(objects_of(shards))
    read = read_segment(list(reversed(refs)), K, N, len(data), t, "segment 1", alg=1, audit_key=AK)
    assert read.data == data and read.lies == []
    assert t.calls == [[s.name for s in shards[:K]]]


def test_local_copies_come_first_then_data_fragments():
    _data, _shards, refs = make_segment()
    local4 = ShardRef(refs[4].idx, refs[4].name, refs[4].hash, local=True)
    chosen = choose([*refs[:4], local4], K)
    assert [r.idx for r in chosen] == [4, 0, 1]


def test_a_corrupt_shard_among_the_first_k_is_read_around_and_named():
    data, shards, refs = make_segment()
    objs = objects_of(shards)
    bad = bytearray(shards[1].body)
    bad[-1] ^= 1
    objs[shards[1].name] = bytes(bad)
    t = FakeTransport(objs)
    read = read_segment(refs, K, N, len(data), t, "segment 1", alg=1, audit_key=AK)
    assert read.data == data
    assert read.lies == [Lie(refs[1], "corrupt")]
    assert "remote1" in str(read.lies[0]) and "corrupt" in str(read.lies[0])
    # one more shard fetched in a second round, none twice
    assert t.calls == [[s.name for s in shards[:K]], [shards[3].name]]


def test_missing_shards_are_named_with_the_reason_the_transport_gave():
    data, shards, refs = make_segment()
    objs = objects_of(shards)
    del objs[shards[0].name]
    objs[shards[2].name] = "remote2: connection refused"
    t = FakeTransport(objs)
    read = read_segment(refs, K, N, len(data), t, "segment 1", alg=1, audit_key=AK)
    assert read.data == data
    assert read.lies == [
        Lie(refs[0], "missing"),
        Lie(refs[2], "missing", "remote2: connection refused"),
    ]
    assert sorted(t.fetched) == sorted(s.name for s in shards)


def test_rebuild_fragments_reconstructs_exactly_the_missing_ones_around_a_corrupt_source():
    """Repair's read: the missing fragments, byte for byte those the encoder made, from k
    intact sources (a corrupt one is read around and named), never the whole segment."""
    data, shards, refs = make_segment()
    frags = erasure.encode(data, K, N, 1)
    objs = objects_of(shards)
    got = rebuild_fragments(
        [refs[0], refs[1], refs[3]], K, N, [2, 4], FakeTransport(objs), "s", alg=1, audit_key=AK
    )
    assert got.fragments == {2: frags[2], 4: frags[4]} and got.lies == []
    bad = bytearray(shards[0].body)
    bad[-1] ^= 1
    objs[shards[0].name] = bytes(bad)
    got = rebuild_fragments(refs[:4], K, N, [4], FakeTransport(objs), "s", alg=1, audit_key=AK)
    assert got.fragments == {4: frags[4]}
    assert got.lies == [Lie(refs[0], "corrupt")]
    with pytest.raises(ShardsUnavailable) as e:
        rebuild_fragments(refs[:3], K, N, [4], FakeTransport(objs), "s", alg=1, audit_key=AK)
    assert e.value.lies == [Lie(refs[0], "corrupt")]


def test_header_and_fragment_tuples_are_checked_and_decoded_like_whole_objects():
    data, shards, refs = make_segment()
    objs: dict[str, segment.Body | str] = {
        s.name: (s.body[: segment.HEADER_SIZE], s.body[segment.HEADER_SIZE :]) for s in shards
    }
    head, frag = objs[shards[0].name]
    objs[shards[0].name] = (head, frag[:-1] + b"\0")
    read = read_segment(
        refs, K, N, len(data), FakeTransport(objs), "segment 1", alg=1, audit_key=AK
    )
    assert read.data == data and [lie.ref.idx for lie in read.lies] == [0]


def test_fewer_than_k_intact_raises_not_enough_remotes_with_the_lies():
    data, shards, refs = make_segment()
    objs = objects_of(shards)
    for s in shards[:3]:
        objs[s.name] = b"garbage"
    with pytest.raises(NotEnoughRemotes, match="segment 7: only 2 intact shards") as e:
        read_segment(refs, K, N, len(data), FakeTransport(objs), "segment 7", alg=1, audit_key=AK)
    assert isinstance(e.value, ShardsUnavailable)
    assert [(lie.ref.idx, lie.kind) for lie in e.value.lies] == [(i, "corrupt") for i in range(3)]


def test_a_subset_that_does_not_decode_is_widened_one_shard_at_a_time(monkeypatch):
    """A singular k-subset (possible with erasure algorithm 1 when n - k >= 5) is simulated at
    the decoder: the reader adds intact shards until the set decodes."""
    data, shards, refs = make_segment()
    real = segment.decode_segment

    def singular_first_k(frags, k, n, size, alg):
        if len(frags) == k:
            raise IntegrityError("matrix is singular")
        return real(frags, k, n, size, alg)

    monkeypatch.setattr(segment, "decode_segment", singular_first_k)
    t = FakeTransport(objects_of(shards))
    read = read_segment(refs, K, N, len(data), t, "segment 1", alg=1, audit_key=AK)
    assert read.data == data and read.lies == []
    assert t.calls == [[s.name for s in shards[:K]], [shards[3].name]]


def test_shards_that_never_decode_raise_integrity_error_after_trying_all(monkeypatch):
    data, shards, refs = make_segment()

    def never(frags, k, n, size, alg):
        raise IntegrityError("matrix is singular")

    monkeypatch.setattr(segment, "decode_segment", never)
    t = FakeTransport(objects_of(shards))
    with pytest.raises(IntegrityError, match="segment 1: its shards do not decode") as e:
        read_segment(refs, K, N, len(data), t, "segment 1", alg=1, audit_key=AK)
    assert isinstance(e.value, ShardsUndecodable)
    assert sorted(t.fetched) == sorted(s.name for s in shards)


def test_an_intact_object_whitened_under_another_key_is_refused_at_once():
    """The hash the index records matches, but the audit key does not open the object (a
    wrong key, never a lying remote): no widening, no lie, a clear error."""
    data, shards, refs = make_segment()
    frag0 = segment.open_fragment(shards[0].body, AK, shards[0].name, 0)
    other = segment.stored_shard(0, shards[0].name, frag0, os.urandom(32))
    objs = objects_of(shards)
    objs[shards[0].name] = other.body
    refs[0] = ShardRef(0, shards[0].name, other.hash)
    with pytest.raises(ShardsUndecodable, match="does not unwhiten to fragment 0") as e:
        read_segment(refs, K, N, len(data), FakeTransport(objs), "segment 1", alg=1, audit_key=AK)
    assert e.value.lies == []


def test_reader_errors_cross_process_boundaries_with_their_lies():
    """Restore decodes in forked processes: the errors come back through pickle."""
    ref = ShardRef(2, "n" * 32, b"h" * 32, "r2")
    for cls in (ShardsUnavailable, ShardsUndecodable):
        e = pickle.loads(pickle.dumps(cls("segment 3: nope", [Lie(ref, "corrupt")])))
        assert type(e) is cls and e.message == "segment 3: nope"
        assert e.lies == [Lie(ref, "corrupt")]


# -- through real remotes --------------------------------------------------------------------


def test_read_path_decodes_around_a_corrupt_and_a_missing_shard_and_names_the_remotes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The mount's read path (Vault.read_chunk → segment_bytes) over local directories through
    the real rclone: shard 0 of a segment flipped on its remote and shard 1 deleted; the chunk
    still reads back, and the log names both remotes."""
    remotes = [str(tmp_path / f"r{i}") for i in range(N)]
    data = random.Random(5).randbytes(1_500_000)
    with Vault.create(tmp_path / "home", remotes, K, N, PW, segment_size=1 << 20) as v:
        cids, _total = v.store_stream(io.BytesIO(data))
        assert v.flush().complete
        (seg_id,) = v.index.one("SELECT segment FROM chunks WHERE cid=?", (cids[0],))
        rows = v.index.q(
            "SELECT s.idx, s.name, r.spec FROM shards s JOIN remotes r ON r.id = s.remote"
            " WHERE s.segment=? AND s.idx < 2 ORDER BY s.idx",
            (seg_id,),
        )
    (idx0, name0, spec0), (idx1, name1, spec1) = rows
    assert (idx0, idx1) == (0, 1)
    p0 = Path(spec0) / "data" / name0
    body = bytearray(p0.read_bytes())
    body[len(body) // 2] ^= 0x40
    p0.write_bytes(bytes(body))
    (Path(spec1) / "data" / name1).unlink()
    with Vault.open(tmp_path / "home", PW) as v, caplog.at_level(logging.WARNING, "vaultfs.vault"):
        assert b"".join(v.read_chunk(c) for c in cids) == data
    said = [r.getMessage() for r in caplog.records if f"segment {seg_id}:" in r.getMessage()]
    assert any(name0 in m and spec0 in m and "corrupt" in m for m in said), said
    assert any(name1 in m and spec1 in m and "missing" in m for m in said), said


def test_read_path_widens_when_its_first_k_shards_do_not_decode(tmp_path: Path, monkeypatch):
    """The behaviour Vault.segment_bytes gained from the reader: a k-subset that does not
    decode (simulated at the decoder) no longer fails the read; one more shard is fetched."""
    remotes = [str(tmp_path / f"r{i}") for i in range(N)]
    data = random.Random(6).randbytes(300_000)
    with Vault.create(tmp_path / "home", remotes, K, N, PW, segment_size=1 << 20) as v:
        cids, _total = v.store_stream(io.BytesIO(data))
        assert v.flush().complete
    real = segment.decode_segment
    sizes: list[int] = []

    def singular_first_k(frags, k, n, size, alg):
        sizes.append(len(frags))
        if len(frags) == k:
            raise IntegrityError("matrix is singular")
        return real(frags, k, n, size, alg)

    monkeypatch.setattr(segment, "decode_segment", singular_first_k)
    with Vault.open(tmp_path / "home", PW) as v:
        assert b"".join(v.read_chunk(c) for c in cids) == data
    assert sizes[:2] == [K, K + 1]


def test_intact_checks_size_then_hash_in_either_form():
    _data, shards, _refs = make_segment()
    s = shards[0]
    split = (s.body[: segment.HEADER_SIZE], s.body[segment.HEADER_SIZE :])
    assert intact(s.body, s.hash, len(s.body)) and intact(split, s.hash, len(s.body))
    assert intact(s.body, s.hash) and not intact(s.body, s.hash, len(s.body) - 1)
    assert not intact(s.body[:-1] + b"x", s.hash, len(s.body))


def test_repair_reads_around_a_corrupt_source_and_marks_it_lost(tmp_path: Path):
    """Repair's rebuild through the reader: shard 1 of a segment deleted (found by the listing
    audit) and shard 0 bit-flipped (same size, so only reading it shows it): the rebuild
    decodes from other shards, names the corrupt source and marks it lost for the next run."""
    from vaultfs.repair import repair

    remotes = [str(tmp_path / f"r{i}") for i in range(N)]
    data = random.Random(7).randbytes(300_000)
    with Vault.create(tmp_path / "home", remotes, K, N, PW, segment_size=1 << 20) as v:
        cids, _total = v.store_stream(io.BytesIO(data))
        assert v.flush().complete
        (seg_id,) = v.index.one("SELECT segment FROM chunks WHERE cid=?", (cids[0],))
        rows = v.index.q(
            "SELECT s.id, s.name, r.spec FROM shards s JOIN remotes r ON r.id = s.remote"
            " WHERE s.segment=? AND s.idx < 2 ORDER BY s.idx",
            (seg_id,),
        )
        (id0, name0, spec0), (_id1, name1, spec1) = rows
        p0 = Path(spec0) / "data" / name0
        body = bytearray(p0.read_bytes())
        body[100] ^= 1
        p0.write_bytes(bytes(body))
        (Path(spec1) / "data" / name1).unlink()
        rep = repair(v)
        assert rep.rebuilt == 1 and not rep.unrecoverable, rep
        assert rep.bad_sources == [f"{spec0}:data/{name0}"]
        assert v.index.one("SELECT state FROM shards WHERE id=?", (id0,)) == ("lost",)
        assert repair(v).rebuilt == 1  # the next run rebuilds the corrupt one
    with Vault.open(tmp_path / "home", PW) as v:
        assert b"".join(v.read_chunk(c) for c in cids) == data
