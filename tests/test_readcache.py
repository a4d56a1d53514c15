"""The read cache's pack files on a real directory (fast tier; the mount's use of it is in
tests/test_fs_ops.py and tests/test_mount_io.py): the budget, eviction of whole packs with
what is used copied forward, torn tails after a crash, records altered on disk (checked
whole on a first hit, page by page after), files that are not packs."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import blake3
import pytest

from vaultfs.readcache import HEADER, PAGE, ReadCache, pack_size

KEY = bytes(range(32))


def chunk_id(data: bytes) -> bytes:
    return blake3.blake3(data, key=KEY).digest()


def chunks(n: int, size: int = 32 * 1024, seed: int = 1) -> list[tuple[bytes, bytes]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        data = rnd.randbytes(size + rnd.randrange(-1000, 1000))
        out.append((chunk_id(data), data))
    return out


def fresh(directory: Path, budget: int) -> ReadCache:
    rc = ReadCache(directory, budget, chunk_id)
    rc.load()
    return rc


def on_disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())


def test_chunks_read_back_whole_and_by_pages(tmp_path: Path) -> None:
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    cs = chunks(10)
    for cid, data in cs:
        rc.put(cid, data)
    got = rc.get_many([cid for cid, _d in cs] + [b"\0" * 32])
    assert got == dict(cs)
    cid, data = cs[3]
    for lo, hi in [(0, 1), (PAGE - 1, PAGE + 1), (5000, 9096), (len(data) - 7, len(data))]:
        assert rc.peek(cid, lo, hi, wait=True) == data[lo:hi]
    st = rc.stats()
    assert st["packs"] == 1 and st["chunks"] == 10 and st["misses"] == 1
    assert st["used"] == on_disk(tmp_path) == sum(HEADER.size + len(d) for _c, d in cs)


def test_the_budget_holds_and_the_oldest_pack_goes_whole(tmp_path: Path) -> None:
    budget = 8 * 100 * 1024  # packs of 100 KiB: three chunks each
    rc = fresh(tmp_path, budget)
    cs = chunks(60)
    for cid, data in cs:
        rc.put(cid, data)
        assert rc.used <= budget and on_disk(tmp_path) <= budget
    kept = rc.get_many([c for c, _d in cs])
    assert kept and all(kept[c] == d for c, d in cs if c in kept)
    assert cs[-1][0] in kept and cs[0][0] not in kept  # the newest stay, the oldest went
    assert len(list(tmp_path.iterdir())) <= budget // pack_size(budget)


def test_a_chunk_hit_in_a_pack_about_to_go_is_copied_forward(tmp_path: Path) -> None:
    budget = 8 * 100 * 1024
    rc = fresh(tmp_path, budget)
    cs = chunks(80)
    hot_cid, hot = cs[0]
    for i, (cid, data) in enumerate(cs):
        rc.put(cid, data)
        if i % 4 == 0:
            assert rc.get(hot_cid) == hot  # used all along: never evicted
    assert rc.get(hot_cid) == hot
    assert cs[1][0] not in rc.get_many([cs[1][0]])  # its unused neighbour went


def test_a_torn_tail_is_cut_and_a_miss(tmp_path: Path) -> None:
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    cs = chunks(5)
    for cid, data in cs:
        rc.put(cid, data)
    del rc
    (pack,) = tmp_path.iterdir()
    whole = pack.stat().st_size
    os.truncate(pack, whole - 100)  # kill -9 or a power loss mid-append
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    assert pack.stat().st_size == whole - HEADER.size - len(cs[-1][1])
    got = rc.get_many([c for c, _d in cs])
    assert got == dict(cs[:-1])
    assert rc.stats()["discarded"] == 0
    rc.put(*cs[-1])  # appended after the cut, read back
    assert rc.get(cs[-1][0]) == cs[-1][1]


@pytest.mark.parametrize("first_hit", [True, False])
def test_a_record_altered_on_disk_is_never_served(tmp_path: Path, first_hit: bool) -> None:
    """``first_hit``: after a restart (checked whole against the id); else in the process
    that wrote it (a small read checks its pages against their tags)."""
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    cs = chunks(3)
    for cid, data in cs:
        rc.put(cid, data)
    (pack,) = tmp_path.iterdir()
    at = HEADER.size + len(cs[0][1]) + HEADER.size + 2 * PAGE + 10  # in chunk 1, page 2
    fd = os.open(pack, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff\x00", at)
    finally:
        os.close(fd)
    cid, data = cs[1]
    if first_hit:
        rc = fresh(tmp_path, 64 * 1024 * 1024)
        assert rc.peek(cid, 2 * PAGE, 3 * PAGE, wait=True) is None  # not checked whole yet
    else:
        assert rc.peek(cid, 2 * PAGE, 3 * PAGE) is None  # in the page cache, but wrong
        assert rc.peek(cid, 0, PAGE) == data[:PAGE]  # an intact page of it is still good
    assert rc.get(cid) is None
    assert rc.stats()["discarded"] == 1
    assert rc.get(cid) is None and rc.peek(cid, 0, 1) is None  # forgotten
    assert rc.get_many([cs[0][0], cs[2][0]]) == {cs[0][0]: cs[0][1], cs[2][0]: cs[2][1]}


def test_files_that_are_not_packs_are_removed_and_a_zero_budget_keeps_nothing(
    tmp_path: Path,
) -> None:
    cid, data = chunks(1)[0]
    (tmp_path / cid.hex()).write_bytes(data)  # a chunk file of the earlier cache
    (tmp_path / "123.4.tmp").write_bytes(b"half")
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    assert list(tmp_path.iterdir()) == [] and rc.get(cid) is None
    rc.put(cid, data)
    assert rc.get(cid) == data
    rc = fresh(tmp_path, 0)
    assert list(tmp_path.iterdir()) == [] and rc.get(cid) is None
    rc.put(cid, data)
    assert list(tmp_path.iterdir()) == [] and rc.used == 0


def test_every_page_tag_catches_its_page_altered_whether_tagged_by_put_or_a_first_hit(
    tmp_path: Path,
) -> None:
    """8-byte page tags: a byte changed in any page (the short last one too) fails that page's
    check and only that page's; tags taken on a first hit (after a restart) as well."""
    rc = fresh(tmp_path, 64 * 1024 * 1024)
    cs = chunks(2, size=5 * PAGE + 300)
    for cid, data in cs:
        rc.put(cid, data)
    (pack,) = tmp_path.iterdir()
    for restarted in (False, True):
        if restarted:
            rc = fresh(tmp_path, 64 * 1024 * 1024)
            for cid, data in cs:
                assert rc.get(cid) == data  # checked whole, pages tagged
        cid, data = cs[1]
        base = HEADER.size + len(cs[0][1]) + HEADER.size
        pages = (len(data) + PAGE - 1) // PAGE
        for p in range(pages):
            at = base + p * PAGE + (p * 37) % min(PAGE, len(data) - p * PAGE)
            old = data[at - base : at - base + 1]
            fd = os.open(pack, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([old[0] ^ 0x01]), at)
                for q in range(pages):
                    lo, hi = q * PAGE, min((q + 1) * PAGE, len(data))
                    got = rc.peek(cid, lo, hi, wait=True)
                    assert got == (None if q == p else data[lo:hi])
            finally:
                os.pwrite(fd, old, at)
                os.close(fd)
        assert rc.stats()["discarded"] == 0  # peek never forgets: the whole check does


def test_the_bookkeeping_of_a_cached_chunk_is_compact(tmp_path: Path) -> None:
    """The map and tags of a cached chunk stay small (the daemon's peak RSS counts them for
    every chunk of a 1 GiB cache): packed arrays, 8-byte tags, no object per chunk."""
    rc = fresh(tmp_path, 1024 * 1024 * 1024)
    cs = chunks(2000)  # about 32 KiB each: 8 or 9 pages
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for cid, data in cs:
            rc.put(cid, data)
        per_chunk = (tracemalloc.get_traced_memory()[0] - before) / len(cs)
    finally:
        tracemalloc.stop()
    assert rc.stats()["chunks"] == len(cs)
    assert per_chunk < 240  # 175 measured (was 359 with an object and 16-byte tags per page)
