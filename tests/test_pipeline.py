"""The parallel write and read paths: sealer processes, restore decoders, the shared rclone
daemon and the keyfile's early unlock — each through the real parts, with the failures they
must survive (a sealer killed mid-stream, the daemon killed between calls, a crash between
recording an index copy and writing its manifest)."""

from __future__ import annotations

import functools
import io
import os
import random
import signal
from pathlib import Path

import pytest

from vaultfs import kdf
from vaultfs.backends import Wrapper, open_backend
from vaultfs.backup import backup_paths, backup_stream
from vaultfs.errors import WrongKey
from vaultfs.index import remotes as remote_table
from vaultfs.keys import VaultKeys, new_seed, read_keyfile, write_keyfile
from vaultfs.remotes import RcloneDaemon, Remote
from vaultfs.restore import ShardSource, open_remote_index, restore_files
from vaultfs.sealer import SLOT_SIZE, SealerError, worker_pool
from vaultfs.shardreader import ShardRef
from vaultfs.vault import Vault
from vaultfs.vault.uploads import UploadQueue

PW = "pw-for-pipeline-tests"


def make_vault(tmp_path: Path, k: int = 2, n: int = 3) -> tuple[Vault, list[str]]:
    remotes = [str(tmp_path / f"r{i}") for i in range(n)]
    return Vault.create(tmp_path / "home", remotes, k, n, PW, segment_size=1 << 20), remotes


def text(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        ln = f"belief {rng.randrange(10**9)}: confidence {rng.random():.6f}\n".encode()
        lines.append(ln)
        total += len(ln)
    return b"".join(lines)[:size]


def restore_all(keys: VaultKeys, remotes: list[str], work: Path, out: Path) -> None:
    db, src, _m, _w = open_remote_index(keys, [open_backend(r) for r in remotes], work)
    try:
        restore_files(keys, db, src, out)
    finally:
        db.close()


@pytest.mark.parametrize("sealers", [0, 2])
def test_stream_larger_than_the_slots_round_trips_with_either_transport(
    tmp_path, monkeypatch, sealers
):
    """Inline sealing and sealer processes store the same stream; it spans many slots
    (so chunks are carried across slot boundaries) and dedups against itself."""
    monkeypatch.setattr(Vault, "SEALERS", sealers)
    data = text(1, 3 * SLOT_SIZE + 12345)
    data += data[: 2 * SLOT_SIZE]  # the second copy dedups
    v, remotes = make_vault(tmp_path)
    with v:
        backup_stream(v, io.BytesIO(data), "kb.sql")
        stored = v.index.one("SELECT coalesce(sum(plain), 0) FROM chunks")[0]
        assert stored < len(data) * 0.7, "the repeated part is stored once"
        assert v.flush().complete
        keys = v.keys
    restore_all(keys, remotes[:2], tmp_path / "w", tmp_path / "out")
    assert (tmp_path / "out" / "kb.sql").read_bytes() == data


def test_chunks_read_back_at_once_and_cut_points_match_a_plain_stream(tmp_path):
    v, _ = make_vault(tmp_path)
    data = text(2, SLOT_SIZE + 99_999)
    with v:
        cids, total = v.store_stream(io.BytesIO(data))
        assert total == len(data)
        pieces = [v.read_chunk(c) for c in cids]  # in flight: read_chunk seals first
        # the same cut points as the chunker over one stream: slots change nothing
        assert [len(p) for p in pieces] == [len(c) for c in v.chunker.chunks(io.BytesIO(data))]
        assert b"".join(pieces) == data


def test_a_killed_sealer_fails_the_commit_loses_nothing_and_the_vault_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.sql").write_bytes(text(3, 3_000_000))
    v, remotes = make_vault(tmp_path)
    with v:
        pool = v.start_sealers()
        v.store_stream(io.BytesIO(text(4, 2_000_000)))
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(SealerError, match="died"):
            v.seal()
        assert pool.broken and not v.index.q("SELECT 1 FROM snapshots")
        # a new pool is started; the chunks the dead sealer held are stored again
        backup_paths(v, [src])
        assert v.start_sealers() is not pool
        assert v.flush().complete
        keys = v.keys
    restore_all(keys, remotes[1:], tmp_path / "w", tmp_path / "out")
    assert (tmp_path / "out" / "src" / "a.sql").read_bytes() == (src / "a.sql").read_bytes()
    assert not os.listdir(tmp_path / "home" / "queue" / "tmp")


def test_sealers_never_hold_the_vault_lock_and_die_with_the_vault(tmp_path):
    v, _ = make_vault(tmp_path)
    pids = v.start_sealers().pids
    lock = os.path.realpath(tmp_path / "home" / "lock")
    for pid in pids:
        fds = [os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert lock not in fds
        assert len(fds) <= 4, fds  # the standard streams and its own pipe end, nothing else
    v.close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


class Crash(BaseException):
    """Stands for the process dying at that point (nothing after it runs)."""


@pytest.mark.parametrize("clean", [False, True], ids=["fork", "forkserver"])
def test_worker_pool_runs_background_work_below_the_callers_priority(clean: bool) -> None:
    """The pool repair rebuilds on (sealer.worker_pool): asked for nice 10 (the mount daemon's
    maintenance), every worker runs at nice 10 or lower priority, forked from this process or
    from a clean server process; without it, at the caller's own priority."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    ask = functools.partial(os.getpriority, os.PRIO_PROCESS)
    with worker_pool(2, int, (), nice=10, clean=clean) as pool:
        niced = list(pool.map(ask, [0] * 4))
    with worker_pool(2, int, ()) as pool:
        plain = list(pool.map(ask, [0] * 4))
    assert niced == [max(10, mine)] * 4
    assert plain == [mine] * 4


def test_crash_between_index_copy_and_manifest_is_recovered(tmp_path, monkeypatch):
    """docs/design.md, crash states: an index copy recorded, its manifest never written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(text(5, 400_000))
    v, remotes = make_vault(tmp_path)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        (src / "g.txt").write_bytes(text(6, 300_000))

        def boom(*a, **kw):
            raise Crash("the process dies before the manifest is written")

        monkeypatch.setattr("vaultfs.manifest.encode", boom)
        with pytest.raises(Crash):
            backup_paths(v, [src], upload=True)
        monkeypatch.undo()
        orphans = v.index.q(
            "SELECT id FROM segments WHERE kind='meta' AND manifest NOT IN"
            " (SELECT seq FROM manifests)"
        )
        assert orphans, "the crash state under test"
    v = Vault.open(tmp_path / "home", PW)
    with v:
        assert not v.index.q(
            "SELECT id FROM segments WHERE kind='meta' AND manifest NOT IN"
            " (SELECT seq FROM manifests)"
        )
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    restore_all(keys, remotes[:2], tmp_path / "w", tmp_path / "out")
    assert (tmp_path / "out" / "src" / "g.txt").read_bytes() == (src / "g.txt").read_bytes()


def test_rclone_daemon_is_restarted_after_it_dies(tmp_path):
    d = RcloneDaemon.get()
    assert d is not None and d.alive()
    r = open_backend(str(tmp_path / "remote"))
    r.ensure()
    (tmp_path / "f").write_bytes(b"x" * 1000)
    r.put_file(tmp_path / "f", "data", "obj")
    d.proc.kill()
    d.proc.wait()
    assert r.list("data") == ["obj"]  # a new daemon answered
    assert RcloneDaemon.get() is not d
    r.delete("data", ["obj", "absent"])
    assert r.list("data") == []
    assert r.list("nothing-here") == []


def test_rclone_daemon_reports_bad_specs_like_the_command_line(tmp_path):
    from vaultfs.errors import BadRemote

    with pytest.raises(BadRemote, match="rejected"):
        open_backend("nosuchremote:bucket").ensure()


def test_restore_decoders_match_inline_decoding(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.bin").write_bytes(random.Random(i).randbytes(700_000 + i))
    v, remotes = make_vault(tmp_path, k=2, n=3)
    with v:
        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    for decoders in (0, 2):
        monkeypatch.setattr("vaultfs.restore.DECODERS", decoders)
        out = tmp_path / f"out{decoders}"
        restore_all(keys, [remotes[0], remotes[2]], tmp_path / f"w{decoders}", out)
        for i in range(5):
            assert (out / "src" / f"f{i}.bin").read_bytes() == (src / f"f{i}.bin").read_bytes()


def test_early_unlock_is_used_only_for_the_same_passphrase(tmp_path, monkeypatch):
    keys = VaultKeys.from_seed(new_seed())
    kf = tmp_path / "key.json"
    write_keyfile(kf, keys, "right")
    fut = kdf.prefetch(kf, "right")
    wrong = kdf.prefetch(kf, "wrong")
    assert fut is not None and wrong is not None
    fut.result(timeout=60)
    wrong.result(timeout=60)

    def no_scrypt(*a, **kw):
        raise AssertionError("scrypt ran again")

    monkeypatch.setattr(kdf, "scrypt", no_scrypt)
    assert read_keyfile(kf, "right").seed == keys.seed  # the head start was used
    with pytest.raises(WrongKey):  # and for a wrong passphrase it proves nothing
        read_keyfile(kf, "wrong")
    with pytest.raises(AssertionError, match="ran again"):  # nothing prefetched for this one
        read_keyfile(kf, "other")
    assert kdf.prefetch(tmp_path / "missing.json", "x") is None


def test_restore_lists_and_fetches_manifests_before_the_key_is_known(tmp_path):
    v, remotes = make_vault(tmp_path)
    with v:
        backup_stream(v, io.BytesIO(text(7, 500_000)), "kb.sql")
        assert v.flush().complete
        keys = v.keys
    src = ShardSource([open_backend(r) for r in remotes])
    src.start()
    names = src.manifest_names(src.remotes[0])
    assert len(names) == 1
    ((name, listed),) = names
    assert (
        src.read_manifest(src.remotes[0], name, listed)
        == (Path(remotes[0]) / "manifests" / name).read_bytes()
    )
    db, src2, m, warnings = open_remote_index(keys, src.remotes, tmp_path / "w", 0, src=src)
    db.close()
    assert src2 is src and m.seq == 1 and not warnings


def test_a_decoder_failure_stops_the_restore_with_a_clear_error(tmp_path):
    """A segment that cannot be decoded (here: too few shards left) fails the restore from
    the decoder process, with the engine's error, and nothing hangs."""
    from vaultfs.errors import NotEnoughRemotes

    v, remotes = make_vault(tmp_path, k=2, n=3)
    with v:
        backup_stream(v, io.BytesIO(random.Random(9).randbytes(6_000_000)), "blob")
        assert v.flush().complete
        keys = v.keys
    victims = sorted(os.listdir(Path(remotes[0]) / "data"))[2:4]
    for name in victims:  # two segments lose their shard on r0: r0 + r1 cannot serve them
        (Path(remotes[0]) / "data" / name).unlink()
    with pytest.raises(NotEnoughRemotes, match="only 1 intact shard reachable, need 2"):
        restore_all(keys, remotes[:2], tmp_path / "w", tmp_path / "out")


def test_a_failing_caller_mid_stream_gives_back_every_slot(tmp_path):
    """An error in the caller's progress callback (or reading its stream) part-way through
    must leave no slot held or handed out twice: the next stream stores and reads back."""
    from vaultfs.sealer import SLOTS

    data = text(10, 5 * SLOT_SIZE)
    v, _ = make_vault(tmp_path)
    with v:
        calls = []

        def progress(n: int) -> None:
            calls.append(n)
            if len(calls) == 2:
                raise RuntimeError("the caller gave up")

        with pytest.raises(RuntimeError, match="gave up"):
            v.store_stream(io.BytesIO(data), progress)
        pool = v.start_sealers()
        v.seal()
        assert pool.free_slots == SLOTS
        cids, total = v.store_stream(io.BytesIO(data))
        assert total == len(data) and b"".join(v.read_chunk(c) for c in cids) == data
        assert pool.free_slots == SLOTS


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("/mnt/usb/vault", "/mnt/usb/vault"),
        ("relative/dir", "relative/dir"),
        ("/srv/odd:name", "/srv/odd:name"),  # a colon after a slash: still a path to rclone
        ("b2:bucket/vault", None),
        ("nas:", None),
        (":s3,endpoint=http://127.0.0.1:9:bucket/v", None),
        (":local:/tmp/x", None),
    ],
)
def test_which_remotes_are_plain_directories(spec, local):
    d = Remote(spec).local_dir
    assert (str(d) if d is not None else None) == local


def _remote_state(remotes: list[str]) -> dict[str, tuple[int, int, bytes]]:
    import hashlib

    out = {}
    for r in remotes:
        for p in sorted(Path(r).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
    return out


@pytest.mark.parametrize("in_place", [True, False])
def test_local_remotes_are_read_in_place_or_copied_and_never_changed(
    tmp_path, monkeypatch, in_place
):
    """A restore from plain directories reads their shard objects where they lie (or, with
    VAULTFS_READ_IN_PLACE=0, copies them through rclone first); either way the restored
    bytes are the same and not one file on a remote is changed, added or removed."""
    monkeypatch.setattr("vaultfs.restore.READ_IN_PLACE", in_place)
    data = random.Random(3).randbytes(3_000_000) + text(3, 2_000_000)
    v, remotes = make_vault(tmp_path, k=2, n=3)
    with v:
        backup_stream(v, io.BytesIO(data), "kb.sql")
        assert v.flush().complete
        keys = v.keys
    before = _remote_state(remotes)
    db, src, _m, _w = open_remote_index(
        keys, [open_backend(r) for r in remotes[1:]], tmp_path / "w"
    )
    try:
        assert bool(src.in_place) is in_place
        name, size = next(iter(src.listed[src.remotes[0].spec]["data"].items()))
        got = src.fetch([("data", ShardRef(0, name, b"", size=size))], tmp_path / "probe")
        where = got[name].path.resolve()
        assert any(where.is_relative_to(Path(r).resolve()) for r in remotes) is in_place
        restore_files(keys, db, src, tmp_path / "out")
    finally:
        db.close()
    assert (tmp_path / "out" / "kb.sql").read_bytes() == data
    assert _remote_state(remotes) == before


def test_a_shard_gone_between_listing_and_reading_is_decoded_around(tmp_path):
    """Another client's prune can delete an object after this restore listed it: the read in
    place fails, rclone cannot find it either, and the segment is decoded from other shards
    with a warning."""
    data = random.Random(4).randbytes(2_500_000)
    v, remotes = make_vault(tmp_path, k=2, n=3)
    with v:
        backup_stream(v, io.BytesIO(data), "blob")
        assert v.flush().complete
        keys = v.keys
    db, src, _m, _w = open_remote_index(keys, [open_backend(r) for r in remotes], tmp_path / "w")
    try:
        gone = sorted((Path(remotes[0]) / "data").iterdir())
        for p in gone:  # every data shard of r0, after the listing
            p.unlink()
        _uid, _files, size, warnings = restore_files(keys, db, src, tmp_path / "out")
    finally:
        db.close()
    assert size == len(data) and (tmp_path / "out" / "blob").read_bytes() == data
    assert any("could not be read" in w for w in warnings), warnings


def test_restore_writes_are_gathered_in_calls_of_at_most_a_mebibyte(tmp_path, monkeypatch):
    """Restored runs go out in gathered writes no larger than WRITE_MAX (larger writes into
    the page cache cost several times more kernel time), in order, and a short write is
    finished piece by piece."""
    from vaultfs import restore

    rng = random.Random(5)
    parts = [rng.randbytes(rng.choice([1, 700, 32_768, 90_000])) for _ in range(120)]
    parts.append(rng.randbytes(restore.WRITE_MAX + 5))  # one part larger than the cap
    parts += [rng.randbytes(40_000) for _ in range(30)]
    calls: list[int] = []
    real = os.pwritev
    short = {"left": 2}

    def spy(fd, bufs, pos):
        size = sum(len(b) for b in bufs)
        calls.append(size)
        if short["left"] and size > 10:  # the kernel may write less than asked
            short["left"] -= 1
            return real(fd, [bytes(memoryview(b"".join(bufs))[: size // 3])], pos)
        return real(fd, bufs, pos)

    monkeypatch.setattr(restore.os, "pwritev", spy)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert restore.write_parts(fd, parts, 10) == sum(map(len, parts))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + b"".join(parts)
    assert max(calls) == restore.WRITE_MAX + 5  # the lone big part, nothing else above the cap
    assert sorted(calls)[-2] <= restore.WRITE_MAX and len(calls) > 5


class _QueuesMoreDuringItsMove(Wrapper):
    """A remote during whose first upload another shard lands in its queue directory (a
    repair or a commit queueing the next batch)."""

    def __init__(self, inner, later: Path) -> None:
        super().__init__(inner)
        self.later = later
        self.moves = 0

    def move_dir(self, local_dir: Path, sub: str) -> None:
        super().move_dir(local_dir, sub)
        self.moves += 1
        if self.moves == 1:
            self.later.write_bytes(b"queued while the first move ran")


def test_a_background_push_moves_what_was_queued_during_it(tmp_path):
    """The link stays busy: a prepush whose move ends with new shards in the queue moves
    again, rather than leaving them for the next prepush or flush."""
    v, _remotes = make_vault(tmp_path)
    with v:
        rid, spec = next(iter(remote_table.specs(v.index).items()))
        d = v.uploads.queue.remote_dir(rid) / "data"
        d.mkdir(parents=True, exist_ok=True)
        first, later = d / ("e" * 32), d / ("f" * 32)
        first.write_bytes(b"queued before the push")
        b = _QueuesMoreDuringItsMove(open_backend(spec, rid), later)
        uq = UploadQueue(v.index, v.keys, v.uploads.queue, lambda: [b], v.seal)
        uq.prepush()
        uq.close()
    assert b.moves == 2
    assert not first.exists() and not later.exists()
    placed = Path(spec) / "data"
    assert (placed / first.name).exists() and (placed / later.name).exists()
