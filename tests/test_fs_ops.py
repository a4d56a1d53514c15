"""The file-system tier: VaultFS handlers, the write-back cache and the live tree, called
directly without a kernel (tests/fsdriver.py), over a real vault on local-directory remotes.

Every ``Harness.run`` ends with the consistency check (fsdriver.check_consistency): the live
tree in memory equals a fresh load of the index, stored blocks' chunks are in the index and
the cache directory holds exactly the dirty blocks. tests/test_mount.py checks the same
semantics through a real FUSE mount; this tier needs no /dev/fuse and runs in seconds.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from fsdriver import (
    PASSPHRASE,
    Driver,
    Harness,
    Listing,
    cheap_keyfile,
    check_consistency,
    fuse_errno,
    mode_of,
    neutralise_kernel,
)

from vaultfs import segment
from vaultfs.cache import MIN_BUDGET_BLOCKS
from vaultfs.daemon import offline_snapshot
from vaultfs.fs import KILLPRIV_V2
from vaultfs.livetree import DEFAULT_BLOCK_SIZE, ROOT_INODE, Journal, LiveTree
from vaultfs.readcache import HEADER
from vaultfs.restore import ShardSource, restore_files
from vaultfs.snapview import EXACT_CHUNKS, SNAPDIR_INO

BS = 64 * 1024
CAPS = b"security.capability"


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The pyfuse3 kernel calls replaced; the invalidations fs.py asked for."""
    return neutralise_kernel(monkeypatch)


@pytest.fixture
def make_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: list[tuple]
) -> Iterator[Callable[..., Harness]]:
    """Make harnesses (keyword arguments as Harness takes them); all closed at teardown."""
    cheap_keyfile(monkeypatch)
    made: list[Harness] = []

    def make(**kw: int) -> Harness:
        h = Harness(tmp_path / f"v{len(made)}", **kw)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.crash()


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def test_the_consistency_check_notices_divergence(h: Harness) -> None:
    """The check itself: an in-memory change the journal never saw, a stray cache file and
    a block list naming an unknown chunk are each reported."""

    async def body(d: Driver) -> None:
        fs = d.fs
        ino = await d.write_file(b"f", b"abc")
        await fs.journal.commit()
        check_consistency(fs)
        n = fs.tree.get(ino)
        assert n is not None and n.blocks is not None
        n.size += 1  # not marked dirty: the index keeps the old size
        with pytest.raises(AssertionError, match="attributes"):
            check_consistency(fs)
        n.size -= 1
        (fs.cache.dir / "999.0").write_bytes(b"stray")
        with pytest.raises(AssertionError, match="999.0"):
            check_consistency(fs)
        (fs.cache.dir / "999.0").unlink()
        fs.tree.set_block(n, 0, [(bytes(32), 3)])
        await fs.journal.commit()
        with pytest.raises(AssertionError, match="missing in the index"):
            check_consistency(fs)
        fs.tree.set_block(n, 0, None)
        await fs.journal.commit()

    h.run(body, uploader=False)


# -- lookups, attributes, errors ----------------------------------------------------------------
def test_lookup_getattr_and_the_errors_posix_names(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        dino = await d.mkdir(b"d")
        fino = await d.write_file(b"d/f", b"x")
        a = await d.lookup(b"d/f")
        assert a.st_ino == fino and mode_of(a) == (stat.S_IFREG, 0o644) and a.st_size == 1
        assert a.st_uid == ctx.uid and a.st_nlink == 1
        assert mode_of(await fs.getattr(dino, ctx)) == (stat.S_IFDIR, 0o755)
        neg = await fs.lookup(dino, b"missing", ctx)  # a negative entry the kernel caches
        assert neg.st_ino == 0 and neg.entry_timeout > 0
        assert await fuse_errno(fs.lookup(fino, b"x", ctx)) == errno.ENOTDIR
        assert await fuse_errno(fs.getattr(10**9, ctx)) == errno.ENOENT
        assert await fuse_errno(fs.create(dino, b"f", 0o644, os.O_RDWR, ctx)) == errno.EEXIST
        assert await fuse_errno(fs.mkdir(dino, b"f", 0o755, ctx)) == errno.EEXIST
        assert await fuse_errno(fs.mkdir(fino, b"sub", 0o755, ctx)) == errno.ENOTDIR
        assert await fuse_errno(fs.mkdir(dino, b"n" * 256, 0o755, ctx)) == errno.ENAMETOOLONG
        assert await fuse_errno(fs.unlink(ROOT_INODE, b"d", ctx)) == errno.EISDIR
        assert await fuse_errno(fs.unlink(dino, b"missing", ctx)) == errno.ENOENT
        assert await fuse_errno(fs.rmdir(dino, b"f", ctx)) == errno.ENOTDIR
        assert await fuse_errno(fs.rmdir(dino, b"missing", ctx)) == errno.ENOENT
        assert await fuse_errno(fs.opendir(fino, ctx)) == errno.ENOTDIR
        assert await fuse_errno(fs.open(dino, os.O_RDONLY, ctx)) == errno.EISDIR
        assert await fuse_errno(fs.readlink(fino, ctx)) == errno.EINVAL
        assert await fuse_errno(d.setattr(dino, st_size=0)) == errno.EINVAL
        # the snapshot directory's name is taken in the root, and cannot be removed
        assert await fuse_errno(fs.mkdir(ROOT_INODE, b".snapshots", 0o755, ctx)) == errno.EEXIST
        assert await fuse_errno(fs.rmdir(ROOT_INODE, b".snapshots", ctx)) == errno.EROFS
        assert await fuse_errno(fs.unlink(ROOT_INODE, b".snapshots", ctx)) == errno.EROFS

    h.run(body)


def test_setattr_mode_owner_and_times(h: Harness) -> None:
    async def body(d: Driver) -> None:
        ino = await d.write_file(b"f", b"data")
        before = await d.lookup(b"f")
        a = await d.setattr(ino, st_mode=stat.S_IFDIR | 0o4711)  # the type bits are ignored
        assert mode_of(a) == (stat.S_IFREG, 0o4711)
        assert a.st_ctime_ns >= before.st_ctime_ns and a.st_mtime_ns == before.st_mtime_ns
        a = await d.setattr(ino, st_uid=1234, st_gid=5678)
        assert (a.st_uid, a.st_gid) == (1234, 5678)
        a = await d.setattr(ino, st_atime_ns=1_000_000_007, st_mtime_ns=2_000_000_011)
        assert (a.st_atime_ns, a.st_mtime_ns) == (1_000_000_007, 2_000_000_011)
        a = await d.setattr(ino, st_ctime_ns=3_000_000_013)
        assert a.st_ctime_ns == 3_000_000_013
        assert (await d.lookup(b"f")).st_mtime_ns == 2_000_000_011
        assert await d.read_file(b"f") == b"data"

    h.run(body)
    # attributes are what the index holds: a fresh file system sees them
    assert h.run(lambda d: d.lookup(b"f")).st_uid == 1234


@pytest.mark.parametrize("stored", [False, True], ids=["dirty", "stored"])
def test_truncate_down_into_a_block_then_up_reads_zeros(h: Harness, stored: bool) -> None:
    data = random.Random(3).randbytes(3 * BS + 500)

    async def body(d: Driver) -> None:
        ino = await d.write_file(b"f", data)
        if stored:
            await d.fs.cache.drain()
            assert not d.fs.cache.blocks_of(ino)
        a = await d.setattr(ino, st_size=BS + 123)
        assert a.st_size == BS + 123
        assert await d.read_file(b"f") == data[: BS + 123]
        await d.setattr(ino, st_size=2 * BS + 7)  # up again: the cut tail reads as zeros
        assert await d.read_file(b"f") == data[: BS + 123] + bytes(BS - 116)
        await d.setattr(ino, st_size=BS)  # exactly on a block boundary
        assert await d.read_file(b"f") == data[:BS]
        await d.setattr(ino, st_size=0)
        assert await d.read_file(b"f") == b""

    h.run(body)


def test_st_blocks_counts_what_a_restore_would_allocate(h: Harness) -> None:
    """Holes (blocks never written) count nothing; dirty blocks what their cache files hold;
    stored blocks their chunks that are not zeros; a snapshot's file (listed or looked up)
    the same; and a fresh life counts from the index, by lookup and by listing."""
    data = random.Random(4).randbytes(2 * BS)

    async def body(d: Driver) -> None:
        fs = d.fs
        for name in (b"a", b"b"):
            fh, ino = await d.create(name)
            await fs.write(fh, 20 * BS, data)  # blocks 20 and 21; 0..19 are holes
            await fs.write(fh, 30 * BS, bytes(BS))  # block 30: zeros, written
            await d.setattr(ino, st_size=40 * BS)
            await fs.release(fh)
            a = await fs.getattr(ino, d.ctx)
            assert a.st_size == 40 * BS
            assert 3 * BS <= a.st_blocks * 512 <= 3 * BS + 8192, a.st_blocks
        await fs.cache.drain()
        ino = await d.ino(b"a")
        assert not fs.cache.blocks_of(ino)
        assert (await fs.getattr(ino, d.ctx)).st_blocks * 512 == 2 * BS
        await fs.snapshot("s")
        view = await d.lookup(b".snapshots/s/a")
        assert (view.st_size, view.st_blocks * 512) == (40 * BS, 2 * BS)
        listed = (await d.listdir(await d.ino(b".snapshots/s"))).entries
        assert {n: a.st_blocks * 512 for n, a, _x in listed} == {b"a": 2 * BS, b"b": 2 * BS}
        await d.setattr(ino, st_size=20 * BS + 100)  # into the data: block 20 is cut
        assert (await fs.getattr(ino, d.ctx)).st_blocks * 512 <= 8192
        fh = await d.open(b"b")
        await fs.write(fh, 5 * BS, b"x")  # a hole becomes a dirty block
        await fs.release(fh)
        assert 2 * BS < (await d.lookup(b"b")).st_blocks * 512 <= 2 * BS + 8192
        await d.mkdir(b"dir")
        fh, _ino = await d.create(b"dir/c")
        await fs.write(fh, 9 * BS, data)
        await fs.release(fh)
        await fs.cache.drain()

    async def again(d: Driver) -> None:
        fs = d.fs
        listed = (await d.listdir(await d.ino(b"dir"))).entries  # counted by opendir
        assert [(n, a.st_blocks * 512) for n, a, _x in listed] == [(b"c", 2 * BS)]
        assert (await d.lookup(b"a")).st_blocks == 1  # 100 bytes left, counted from the index
        b = fs.tree.nodes[await d.ino(b"b")]
        assert b.alloc == 2 * BS + 1 and b.blocks is None  # counted with a, lists not kept
        assert (await d.lookup(b"b")).st_blocks * 512 == 2 * BS + 512

    h.run(body)
    h.run(again)


def test_st_blocks_of_a_large_snapshot_file_skips_its_zero_chunks(h: Harness) -> None:
    """A content of more than EXACT_CHUNKS chunks counts its holes among the known zero
    chunks and checks its last chunk's record: after a restart, which knows no zero chunk of
    the 1000-byte tail's length, the tail still counts as a hole."""
    data = random.Random(5).randbytes(BS)
    size = (EXACT_CHUNKS + 100) * BS + 1000

    async def body(d: Driver) -> None:
        fh, ino = await d.create(b"big")
        await d.fs.write(fh, 7 * BS, data)
        await d.setattr(ino, st_size=size)
        await d.fs.release(fh)
        await d.fs.snapshot("s")
        a = await d.lookup(b".snapshots/s/big")
        assert (a.st_size, a.st_blocks * 512) == (size, BS)

    async def again(d: Driver) -> None:
        a = await d.lookup(b".snapshots/s/big")
        assert (a.st_size, a.st_blocks * 512) == (size, BS)
        assert (await d.lookup(b"big")).st_blocks * 512 == BS

    h.run(body)
    h.run(again)


# -- data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [BS, DEFAULT_BLOCK_SIZE], ids=["64KiB", "1MiB"])
def test_random_writes_across_blocks_and_holes_match_a_model(make_harness, block_size) -> None:
    h = make_harness(block_size=block_size)
    rnd = random.Random(block_size)
    model = bytearray()

    async def body(d: Driver) -> None:
        fh, _ino = await d.create(b"model")
        for i in range(40):
            off = rnd.randrange(0, 4 * block_size)
            data = rnd.randbytes(rnd.choice([1, 100, 4096, block_size // 3, block_size + 17]))
            assert await d.fs.write(fh, off, data) == len(data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
            if i == 20:  # half the blocks stored, half still in the cache
                await d.fs.cache.drain()
        # a hole of whole blocks, then a tail: the hole reads as zeros and stores nothing
        tail = 9 * block_size + 5
        await d.fs.write(fh, tail, b"end")
        model.extend(bytes(tail - len(model)))
        model.extend(b"end")
        assert (await d.lookup(b"model")).st_size == len(model)
        for off, size in [(0, len(model) + 10), (block_size - 3, 7), (len(model) - 1, 100)]:
            assert await d.fs.read(fh, off, size) == bytes(model[off : off + size])
        assert await d.fs.read(fh, len(model), 10) == b""
        await d.fs.release(fh)
        await d.fs.cache.drain()
        n = d.fs.tree.get(await d.ino(b"model"))
        assert n is not None and n.blocks is not None
        assert not any(6 <= b < 9 for b in n.blocks), "a hole stored blocks"
        assert await d.read_file(b"model") == bytes(model)

    h.run(body)

    async def remounted(d: Driver) -> None:
        # a partial overwrite of a stored block of a file not opened since the mount
        fh = await d.open(b"model")
        off = block_size + block_size // 2
        await d.fs.write(fh, off, b"mid")
        model[off : off + 3] = b"mid"
        await d.fs.release(fh)
        assert await d.read_file(b"model") == bytes(model)

    h.run(remounted)
    assert h.run(lambda d: d.read_file(b"model")) == bytes(model)


def test_unlinked_open_file_stays_readable_until_released_and_forgotten(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs = d.fs
        fh, ino = await d.create(b"gone")
        await fs.write(fh, 0, b"still here" * 10000)
        await fs.unlink(ROOT_INODE, b"gone", d.ctx)
        assert await fuse_errno(d.lookup(b"gone")) == errno.ENOENT
        assert (await fs.getattr(ino, d.ctx)).st_nlink == 0
        await fs.write(fh, 5, b"!")
        assert (await fs.read(fh, 0, 12)) == b"still!here" + b"st"
        await fs.fsync(fh, False)
        await fs.release(fh)
        assert fs.tree.get(ino) is not None, "the kernel still holds a lookup"
        await fs.forget([(ino, 1)])
        assert fs.tree.get(ino) is None
        await fs.journal.commit()
        assert not fs.cache.blocks_of(ino)
        assert not list(fs.cache.dir.glob(f"{ino}.*")), "cache files outlived the purge"

    h.run(body)


# -- names -----------------------------------------------------------------------------------------
def test_rename_over_a_file_and_of_directories(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        a, b = await d.mkdir(b"a"), await d.mkdir(b"b")
        one = await d.write_file(b"a/one", b"1")
        two = await d.write_file(b"b/two", b"2")
        await fs.rename(a, b"one", b, b"two", 0, ctx)  # over an existing file, across dirs
        assert await d.ino(b"b/two") == one and await d.read_file(b"b/two") == b"1"
        assert await fuse_errno(d.lookup(b"a/one")) == errno.ENOENT
        assert (await fs.getattr(two, ctx)).st_nlink == 0
        await fs.forget([(two, 1)])
        assert fs.tree.get(two) is None
        # a directory moves across parents: the parents' link counts follow
        sub = await d.mkdir(b"a/sub")
        await d.write_file(b"a/sub/x", b"x")
        assert (await fs.getattr(a, ctx)).st_nlink == 3
        await fs.rename(a, b"sub", b, b"sub", 0, ctx)
        assert (await fs.getattr(a, ctx)).st_nlink == 2
        assert (await fs.getattr(b, ctx)).st_nlink == 3
        assert await d.read_file(b"b/sub/x") == b"x" and await d.ino(b"b/sub") == sub
        # over an empty directory is allowed; over a non-empty one, a file or from a file not
        empty = await d.mkdir(b"a/empty")
        await fs.rename(b, b"sub", a, b"empty", 0, ctx)
        assert await d.ino(b"a/empty") == sub and (await fs.getattr(empty, ctx)).st_nlink == 0
        assert (await fs.getattr(a, ctx)).st_nlink == 3
        await d.mkdir(b"b/full")
        await d.write_file(b"b/full/y", b"y")
        assert await fuse_errno(fs.rename(a, b"empty", b, b"full", 0, ctx)) == errno.ENOTEMPTY
        assert await fuse_errno(fs.rename(a, b"empty", b, b"two", 0, ctx)) == errno.ENOTDIR
        assert await fuse_errno(fs.rename(b, b"two", a, b"empty", 0, ctx)) == errno.EISDIR
        assert await fuse_errno(fs.rename(a, b"nope", b, b"x", 0, ctx)) == errno.ENOENT
        assert await fuse_errno(fs.rename(a, b"empty", ROOT_INODE, b".snapshots", 0, ctx)) == errno.EROFS  # fmt: skip
        # a rename onto another name of the same inode does nothing
        await fs.link(one, b, b"again", ctx)
        await fs.rename(b, b"two", b, b"again", 0, ctx)
        assert sorted(await d.names(b)) == [b"again", b"full", b"two"]

    h.run(body)


def test_rename_noreplace_and_exchange(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        a, b = await d.mkdir(b"a"), await d.mkdir(b"b")
        f = await d.write_file(b"a/f", b"file")
        sub = await d.mkdir(b"b/sub")
        await d.write_file(b"b/g", b"g")
        flags = pyfuse3.RENAME_NOREPLACE
        assert await fuse_errno(fs.rename(a, b"f", b, b"g", flags, ctx)) == errno.EEXIST
        await fs.rename(a, b"f", a, b"f2", flags, ctx)
        assert await d.ino(b"a/f2") == f
        flags = pyfuse3.RENAME_EXCHANGE
        assert await fuse_errno(fs.rename(a, b"f2", b, b"none", flags, ctx)) == errno.ENOENT
        await fs.rename(a, b"f2", b, b"sub", flags, ctx)  # a file and a directory swap places
        assert await d.ino(b"a/f2") == sub and await d.ino(b"b/sub") == f
        assert (await fs.getattr(a, ctx)).st_nlink == 3
        assert (await fs.getattr(b, ctx)).st_nlink == 2
        assert await d.read_file(b"b/sub") == b"file"
        other = await d.mkdir(b"b/other")
        await fs.rename(a, b"f2", b, b"other", flags, ctx)  # two directories: counts stay
        assert await d.ino(b"a/f2") == other and await d.ino(b"b/other") == sub
        assert [(await fs.getattr(p, ctx)).st_nlink for p in (a, b)] == [3, 3]

    h.run(body)


def test_hard_links_share_data_and_count_links(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        dino = await d.mkdir(b"d")
        ino = await d.write_file(b"f", b"shared")
        a = await fs.link(ino, dino, b"g", ctx)
        assert a.st_ino == ino and a.st_nlink == 2
        assert await fuse_errno(fs.link(ino, dino, b"g", ctx)) == errno.EEXIST
        assert await fuse_errno(fs.link(dino, ROOT_INODE, b"dlink", ctx)) == errno.EPERM
        fh = await d.open(b"d/g")
        await fs.write(fh, 0, b"SH")
        await fs.release(fh)
        assert await d.read_file(b"f") == b"SHared"
        await fs.unlink(ROOT_INODE, b"f", ctx)
        assert (await d.lookup(b"d/g")).st_nlink == 1
        assert await d.read_file(b"d/g") == b"SHared"

    h.run(body)
    assert h.run(lambda d: d.read_file(b"d/g")) == b"SHared"


def test_symlinks_and_special_files(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        target = b"caf\xe9/../t\x80"
        a = await fs.symlink(ROOT_INODE, b"l", target, ctx)
        assert mode_of(a) == (stat.S_IFLNK, 0o777) and a.st_size == len(target)
        assert await fs.readlink(a.st_ino, ctx) == target
        fifo = await fs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o640, 0, ctx)
        assert mode_of(fifo) == (stat.S_IFIFO, 0o640)
        dev = await fs.mknod(ROOT_INODE, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), ctx)
        assert mode_of(dev) == (stat.S_IFCHR, 0o666) and dev.st_rdev == os.makedev(1, 3)
        sock = await fs.mknod(ROOT_INODE, b"sock", stat.S_IFSOCK | 0o600, 0, ctx)
        assert mode_of(sock) == (stat.S_IFSOCK, 0o600)
        assert await fuse_errno(fs.open(fifo.st_ino, os.O_RDONLY, ctx)) == errno.EINVAL

    h.run(body)

    async def again(d: Driver) -> None:
        assert await d.fs.readlink(await d.ino(b"l"), d.ctx) == b"caf\xe9/../t\x80"
        assert (await d.lookup(b"null")).st_rdev == os.makedev(1, 3)

    h.run(again)


def test_mkdir_rmdir_and_set_group_id_directories(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        root_links = (await fs.getattr(ROOT_INODE, ctx)).st_nlink
        top = await d.mkdir(b"top", 0o2775)
        assert (await fs.getattr(ROOT_INODE, ctx)).st_nlink == root_links + 1
        await d.setattr(top, st_gid=4242)
        # in a set-group-ID directory, new entries take its group; subdirectories the bit
        sub = await fs.mkdir(top, b"sub", 0o755, ctx)
        assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID
        f = await d.write_file(b"top/f", b"")
        a = await fs.getattr(f, ctx)
        assert a.st_gid == 4242 and not a.st_mode & stat.S_ISGID
        assert await fuse_errno(fs.rmdir(ROOT_INODE, b"top", ctx)) == errno.ENOTEMPTY
        await fs.unlink(top, b"f", ctx)
        await fs.rmdir(top, b"sub", ctx)
        await fs.rmdir(ROOT_INODE, b"top", ctx)
        assert (await fs.getattr(ROOT_INODE, ctx)).st_nlink == root_links
        assert await fuse_errno(d.lookup(b"top")) == errno.ENOENT

    h.run(body)


def test_readdir_of_a_large_directory_resumes_at_offsets(h: Harness) -> None:
    names = [f"file-{i:05d}".encode() for i in range(1500)]

    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        dino = await d.mkdir(b"big")
        for name in names:
            await fs.mknod(dino, name, stat.S_IFREG | 0o600, 0, ctx)
        fh = await fs.opendir(dino, ctx)
        seen: list[bytes] = []
        start = 0
        # removed (and forgotten by the kernel) after opendir: skipped
        gone = await d.ino(b"big/" + names[700])
        await fs.unlink(dino, names[700], ctx)
        await fs.forget([(gone, 2)])
        while True:
            listing = Listing(room=128)
            await fs.readdir(fh, start, listing)
            if not listing.entries:
                break
            seen += [name for name, _a, _n in listing.entries]
            start = listing.entries[-1][2]
        await fs.releasedir(fh)
        assert seen == names[:700] + names[701:]
        root = await d.names(ROOT_INODE)
        assert root == [b".snapshots", b"big"]
        tail = await d.listdir(dino, start=1400)
        assert [n for n, _a, _i in tail.entries] == names[1401:]

    h.run(body)


def test_xattrs_set_get_list_remove(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        ino = await d.write_file(b"f", b"")
        await fs.setxattr(ino, b"user.a", b"1", ctx)
        await fs.setxattr(ino, b"user.\xff\xfe", b"\x00bin", ctx)
        await fs.setxattr(ino, b"user.a", b"2", ctx)  # replaced
        assert await fs.getxattr(ino, b"user.a", ctx) == b"2"
        assert sorted(await fs.listxattr(ino, ctx)) == [b"user.a", b"user.\xff\xfe"]
        assert await fuse_errno(fs.getxattr(ino, b"user.none", ctx)) == pyfuse3.ENOATTR
        assert await fuse_errno(fs.removexattr(ino, b"user.none", ctx)) == pyfuse3.ENOATTR
        too_big = bytes(64 * 1024 + 1)
        assert await fuse_errno(fs.setxattr(ino, b"user.big", too_big, ctx)) == errno.E2BIG
        await fs.removexattr(ino, b"user.a", ctx)
        assert await fs.listxattr(ino, ctx) == [b"user.\xff\xfe"]
        await fs.setxattr(ROOT_INODE, b"user.root", b"r", ctx)

    h.run(body)
    assert h.run(lambda d: d.fs.getxattr(ROOT_INODE, b"user.root", d.ctx)) == b"r"


def test_statfs_counts_the_live_tree(h: Harness) -> None:
    async def body(d: Driver) -> None:
        await d.write_file(b"f", bytes(10_000))
        s = await d.fs.statfs(d.ctx)
        assert s.f_bsize == s.f_frsize == 4096 and s.f_namemax == 255
        assert s.f_blocks * 4096 >= 10_000 and s.f_files >= 2
        assert s.f_bfree <= s.f_blocks

    h.run(body)


# -- set-id bits and capabilities (FUSE_HANDLE_KILLPRIV_V2) --------------------------------------
def test_writes_truncates_and_chown_clear_privileges(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx

        async def make(name: bytes, mode: int) -> int:
            ino = await d.write_file(name, b"abc")
            await d.setattr(ino, st_mode=mode)
            await fs.setxattr(ino, CAPS, b"cap", ctx)
            return ino

        def bits(ino: int) -> tuple[int, bool]:
            n = fs.tree.get(ino)
            assert n is not None
            return stat.S_IMODE(n.mode), CAPS in n.xattrs

        # a write back from the page cache changes nothing (for a capability the kernel
        # sends REMOVEXATTR itself); one that bypassed it clears S_ISUID, S_ISGID if
        # group-exec is set, and the capability
        ino = await make(b"write", 0o6755)
        fh = (await fs.open(ino, os.O_RDWR, ctx)).fh
        await fs.write(fh, 0, b"x")
        assert bits(ino) == (0o6755, True)
        await fs.write(fh, 0, b"y", writepage=False)
        assert bits(ino) == (0o0755, False)
        await fs.release(fh)
        ino = await make(b"nogx", 0o6745)  # S_ISGID without group-exec grants nothing: kept
        fh = (await fs.open(ino, os.O_RDWR, ctx)).fh
        await fs.write(fh, 0, b"y", writepage=False)
        await fs.release(fh)
        assert bits(ino) == (0o2745, False)
        # truncate: the capability always, set-id bits when the kernel asks (no CAP_FSETID)
        ino = await make(b"trunc", 0o6755)
        await d.setattr(ino, st_size=1)
        assert bits(ino) == (0o6755, False)
        await fs.setxattr(ino, CAPS, b"cap", ctx)
        await d.setattr(ino, st_size=0, kill_suidgid=True)
        assert bits(ino) == (0o0755, False)
        # chown: likewise; a directory keeps everything
        ino = await make(b"chown", 0o6755)
        await d.setattr(ino, st_uid=1)
        assert bits(ino) == (0o6755, False)
        await d.setattr(ino, st_gid=1, kill_suidgid=True)
        assert bits(ino) == (0o0755, False)
        dino = await d.mkdir(b"dir", 0o2755)
        await fs.setxattr(dino, CAPS, b"cap", ctx)
        await d.setattr(dino, st_gid=3, kill_suidgid=True)
        assert bits(dino) == (0o2755, True)
        # chmod keeps a capability; open(O_TRUNC) clears it, and the set-id bits for every
        # caller (libfuse does not say who opens)
        ino = await make(b"otrunc", 0o6710)
        await d.setattr(ino, st_mode=0o6700)
        assert bits(ino) == (0o6700, True)
        fh = (await fs.open(ino, os.O_RDWR | os.O_TRUNC, ctx)).fh
        await fs.release(fh)
        assert bits(ino) == ((0o2700 if KILLPRIV_V2 else 0o6700), False)
        assert (await fs.getattr(ino, ctx)).st_size == 0

    h.run(body)


# -- durability ------------------------------------------------------------------------------------
def test_fsync_commits_the_tree_and_a_crash_keeps_the_synced_data(make_harness) -> None:
    h = make_harness(cache_size=64 * BS)  # the open file's blocks stay in the cache
    data = random.Random(5).randbytes(5 * BS + 99)

    async def body(d: Driver) -> None:
        fs = d.fs
        fh, ino = await d.create(b"synced")
        await fs.write(fh, 0, data)
        await fs.fsync(fh, False)
        # without any further commit, the index already names the file at its size
        fresh = LiveTree(fs.vault.index)
        fresh.load(fs.uid, fs.gid)
        assert fresh.nodes[ino].size == len(data)
        assert fresh.nodes[ROOT_INODE].children == {b"synced": ino}
        assert len(fs.cache.blocks_of(ino)) == 6, "nothing stored yet: all in the cache"

    h.run(body)
    h.crash()  # the dirty blocks were never stored: only their cache files hold them

    async def recovered(d: Driver) -> None:
        assert d.fs.cache.used == 6 * BS
        assert await d.read_file(b"synced") == data
        await d.fs.cache.drain()
        assert not d.fs.cache.dirty and await d.read_file(b"synced") == data

    h.run(recovered)
    assert h.run(lambda d: d.read_file(b"synced")) == data


def test_a_crash_before_any_commit_leaves_a_consistent_tree(h: Harness) -> None:
    async def body(d: Driver) -> None:
        await d.write_file(b"kept", b"k")
        await d.fs.fsyncdir(0, False)
        fh, _ino = await d.create(b"maybe")
        await d.fs.write(fh, 0, b"m" * (3 * BS))

    h.run(body, check=False)  # killed: no commit beyond the journal's own
    h.crash()

    async def after(d: Driver) -> None:
        assert await d.read_file(b"kept") == b"k"
        names = await d.names(ROOT_INODE)
        if b"maybe" in names:  # the journal committed it on its own: then it is whole
            assert await d.read_file(b"maybe") in (b"", b"m" * (3 * BS))

    h.run(after)


def test_offline_snapshot_stores_what_a_crash_left(h: Harness) -> None:
    """`vaultfs snapshot` with no mount (daemon.offline_snapshot) loads the same VaultFS,
    stores the dirty blocks a killed daemon left in the cache and records the tree."""
    data = random.Random(6).randbytes(2 * BS + 3)

    async def body(d: Driver) -> None:
        fh, _ino = await d.create(b"f")
        await d.fs.write(fh, 0, data)
        await d.fs.fsync(fh, False)

    h.run(body)
    h.crash()
    out = offline_snapshot(h.home, PASSPHRASE, "offline")
    assert out["entries"] == 1 and out["report"]["complete"]

    async def after(d: Driver) -> None:
        assert not d.fs.cache.dirty, "the offline snapshot stored the recovered blocks"
        assert await d.read_file(b".snapshots/offline/f") == data
        assert await d.read_file(b"f") == data

    h.run(after)


def test_a_file_grown_after_crash_recovery_reads_zeros_past_its_old_end(h: Harness) -> None:
    async def body(d: Driver) -> int:
        fh, ino = await d.create(b"f")
        await d.fs.write(fh, 0, b"a" * 100)
        await d.fs.fsync(fh, False)
        return ino

    ino = h.run(body)
    h.crash()
    # the crash state: a later write reached the cache file, its new size never committed
    with open(h.home / "cache" / f"{ino}.0", "ab") as f:
        f.write(b"b" * 900)

    async def grow(d: Driver) -> None:
        assert await d.read_file(b"f") == b"a" * 100
        await d.setattr(ino, st_size=1000)
        assert await d.read_file(b"f") == b"a" * 100 + bytes(900)

    h.run(grow)


def test_a_failed_journal_commit_is_retried_with_nothing_lost(h: Harness) -> None:
    """A transaction that fails (a full disk) leaves its marks dirty; the journal retries
    and fsync returns once the state is committed."""

    async def body(d: Driver) -> None:
        tree = d.fs.tree
        apply = tree.apply_batch
        failures = []

        def flaky(batch) -> None:
            if not failures:
                failures.append(batch)
                raise OSError(errno.ENOSPC, "No space left on device")
            apply(batch)

        tree.apply_batch = flaky  # type: ignore[method-assign]
        try:
            await d.write_file(b"f", b"kept")
            await d.fs.fsyncdir(ROOT_INODE, False)
        finally:
            tree.apply_batch = apply  # type: ignore[method-assign]
        assert failures and not tree.dirty
        fresh = LiveTree(d.fs.vault.index)
        fresh.load(d.fs.uid, d.fs.gid)
        assert b"f" in fresh.nodes[ROOT_INODE].children

    h.run(body)


def test_a_journal_that_keeps_failing_fails_fsync_and_commits_once_space_is_back(
    h: Harness,
) -> None:
    """A disk that stays full: fsync of the directory fails with ENOSPC after a few attempts
    instead of hanging (as umount would behind it); the marks stay dirty and are committed
    once the disk takes them again."""

    async def body(d: Driver) -> None:
        tree = d.fs.tree
        apply = tree.apply_batch
        full = [True]

        def full_disk(batch) -> None:
            if full[0]:
                raise sqlite3.OperationalError("database or disk is full")
            apply(batch)

        tree.apply_batch = full_disk  # type: ignore[method-assign]
        try:
            await d.write_file(b"g", b"kept")
            with pytest.raises(pyfuse3.FUSEError) as exc, trio.fail_after(120):
                await d.fs.fsyncdir(ROOT_INODE, False)  # before: waited for ever
            assert exc.value.errno == errno.ENOSPC
            assert tree.dirty
            full[0] = False
            await d.fs.fsyncdir(ROOT_INODE, False)
        finally:
            tree.apply_batch = apply  # type: ignore[method-assign]
        assert not tree.dirty
        fresh = LiveTree(d.fs.vault.index)
        fresh.load(d.fs.uid, d.fs.gid)
        assert b"g" in fresh.nodes[ROOT_INODE].children

    h.run(body)


def test_freeze_holds_mutations_until_thaw(h: Harness) -> None:
    async def body(d: Driver) -> None:
        fs = d.fs
        fh, _ino = await d.create(b"f")
        done = trio.Event()

        async def writer() -> None:
            await fs.write(fh, 0, b"late")
            done.set()

        await fs.freeze()
        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await trio.sleep(0.05)
            assert not done.is_set(), "a write passed the closed gate"
            assert (await d.lookup(b"f")).st_size == 0
            fs.thaw()
        assert (await d.lookup(b"f")).st_size == 4
        await fs.release(fh)

    h.run(body)


# -- snapshots ---------------------------------------------------------------------------------------
TREE = {
    b"top.txt": b"top level\n",
    b"dir/big.bin": random.Random(9).randbytes(3 * BS + 1234),
    b"dir/sparse": bytes(2 * BS) + b"after a hole",
    b"dir/deep/empty": b"",
}


async def make_tree(d: Driver) -> None:
    await d.mkdir(b"dir")
    await d.mkdir(b"dir/deep", 0o700)
    for path, data in TREE.items():
        if path == b"dir/sparse":
            fh, _ino = await d.create(path)
            await d.fs.write(fh, 2 * BS, data[2 * BS :])
            await d.fs.release(fh)
        else:
            await d.write_file(path, data)
    await d.fs.link(await d.ino(b"top.txt"), await d.ino(b"dir"), b"hard", d.ctx)
    await d.fs.symlink(ROOT_INODE, b"link", b"dir/big.bin", d.ctx)
    await d.fs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o600, 0, d.ctx)
    await d.fs.setxattr(await d.ino(b"top.txt"), b"user.k", b"v", d.ctx)


async def read_tree(d: Driver, base: bytes) -> dict[bytes, bytes]:
    pre = base + b"/" if base else b""
    return {p: await d.read_file(pre + p) for p in TREE}


def test_snapshot_view_is_read_only_and_point_in_time(h: Harness, kernel: list[tuple]) -> None:
    async def body(d: Driver) -> None:
        fs, ctx = d.fs, d.ctx
        await make_tree(d)
        uid, _seq, count = await fs.snapshot("first")
        assert count == 9
        # the live tree moves on; the snapshot does not
        fh = await d.open(b"top.txt")
        await fs.write(fh, 0, b"TOP")
        await fs.release(fh)
        await fs.unlink(await d.ino(b"dir"), b"big.bin", ctx)
        snap = await d.ino(b".snapshots/first")
        assert await d.names(SNAPDIR_INO) == [b"first"]
        assert sorted(await d.names(snap)) == [b"dir", b"fifo", b"link", b"top.txt"]
        assert await read_tree(d, b".snapshots/first") == TREE
        top = await d.lookup(b".snapshots/first/top.txt")
        assert top.st_nlink == 2 and mode_of(top) == (stat.S_IFREG, 0o644)
        assert await fs.getxattr(top.st_ino, b"user.k", ctx) == b"v"
        assert await fs.readlink(await d.ino(b".snapshots/first/link"), ctx) == b"dir/big.bin"
        assert mode_of(await d.lookup(b".snapshots/first/fifo"))[0] == stat.S_IFIFO
        assert mode_of(await d.lookup(b".snapshots/first/dir/deep"))[1] == 0o700
        # every way to change it is refused
        sdir = await d.ino(b".snapshots/first/dir")
        t = top.st_ino
        for aw in [
            fs.open(t, os.O_RDWR, ctx),
            fs.open(t, os.O_RDONLY | os.O_TRUNC, ctx),
            d.setattr(t, st_mode=0o600),
            fs.setxattr(t, b"user.x", b"1", ctx),
            fs.removexattr(t, b"user.k", ctx),
            fs.mkdir(sdir, b"new", 0o755, ctx),
            fs.create(sdir, b"new", 0o644, os.O_RDWR, ctx),
            fs.unlink(sdir, b"sparse", ctx),
            fs.rmdir(snap, b"dir", ctx),
            fs.rename(sdir, b"sparse", ROOT_INODE, b"stolen", 0, ctx),
            fs.rename(ROOT_INODE, b"top.txt", sdir, b"x", 0, ctx),
            fs.link(t, ROOT_INODE, b"x", ctx),
            fs.link(await d.ino(b"top.txt"), sdir, b"x", ctx),
            fs.symlink(sdir, b"s", b"t", ctx),
            fs.mknod(SNAPDIR_INO, b"n", stat.S_IFIFO | 0o600, 0, ctx),
        ]:
            assert await fuse_errno(aw) == errno.EROFS
        fh = (await fs.open(t, os.O_RDONLY, ctx)).fh
        assert await fuse_errno(fs.write(fh, 0, b"x")) == errno.EROFS
        assert await fs.read(fh, 4, 100) == b"level\n"
        await fs.release(fh)
        await fs.delete_snapshot(uid)
        assert await fuse_errno(d.lookup(b".snapshots/first")) == errno.ENOENT

    h.run(body)
    # the kernel had looked it up: its entry is invalidated (synchronously, off the loop)
    assert [c[0] for c in kernel] == ["invalidate_entry"]
    assert kernel[0][1] == (SNAPDIR_INO, b"first")


def test_snapshot_reads_back_through_a_fresh_file_system_and_restore(h: Harness, tmp_path) -> None:
    async def body(d: Driver) -> None:
        await make_tree(d)
        await d.fs.snapshot("s")
        rep = await d.fs.prepare_umount()  # what `vaultfs umount` does before unmounting
        assert rep.complete and not rep.errors

    h.run(body)
    h.crash()  # the process ends (all was stored); the next run opens everything again

    async def again(d: Driver) -> None:
        assert await read_tree(d, b"") == await read_tree(d, b".snapshots/s") == TREE
        assert (await d.lookup(b"dir/hard")).st_nlink == 2

    h.run(again)
    v = h.open()
    out = tmp_path / "out"
    source = ShardSource(v.remotes(), v.queue_dir)
    source.list_all()
    restore_files(v.keys, v.index, source, out, "s")
    for path, data in TREE.items():
        assert (out / os.fsdecode(path)).read_bytes() == data
    assert os.readlink(out / "link") == "dir/big.bin"
    assert os.stat(out / "dir" / "hard").st_ino == os.stat(out / "top.txt").st_ino
    assert os.getxattr(out / "top.txt", "user.k") == b"v"
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(out / "dir" / "deep").st_mode) == 0o700


# -- the write-back cache ------------------------------------------------------------------------
def test_tiny_cache_applies_backpressure_and_stays_within_budget(make_harness) -> None:
    h = make_harness(cache_size=0)  # the floor: MIN_BUDGET_BLOCKS blocks
    data = random.Random(11).randbytes(6 * MIN_BUDGET_BLOCKS * BS)
    budget = MIN_BUDGET_BLOCKS * BS
    peak = {"used": 0, "waited": 0}

    async def body(d: Driver) -> None:
        fs = d.fs
        assert fs.cache.budget == budget

        async def watch() -> None:
            while True:
                peak["used"] = max(peak["used"], fs.cache.used)
                peak["waited"] = max(peak["waited"], fs.cache.waiting)
                await trio.sleep(0.001)

        fh, ino = await d.create(b"stream")
        async with trio.open_nursery() as n:
            n.start_soon(watch)
            for off in range(0, len(data), BS // 2):  # the file stays open: only pressure
                await fs.write(fh, off, data[off : off + BS // 2])
                assert len(list(fs.cache.dir.iterdir())) <= MIN_BUDGET_BLOCKS
            n.cancel_scope.cancel()
        assert fs.cache.stored_blocks >= 5 * MIN_BUDGET_BLOCKS
        assert await fs.read(fh, 0, len(data)) == data
        await fs.release(fh)

    h.run(body)
    assert peak["used"] <= budget and peak["waited"] >= 1


def test_budget_counts_a_block_stored_while_its_writer_waited(make_harness) -> None:
    h = make_harness(cache_size=0)

    async def body(d: Driver) -> None:
        fs = d.fs
        fh, _ino = await d.create(b"f")
        await fs.write(fh, 0, bytes(MIN_BUDGET_BLOCKS * BS))  # the budget is full
        written = trio.Event()

        async def writer() -> None:
            # touches the last dirty block and a new one: waits for room ...
            await fs.write(fh, MIN_BUDGET_BLOCKS * BS - 10, b"x" * 20)
            written.set()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            # nothing but the budget blocks it on the way (the blocks are loaded, no lock is
            # held): once every task waits, it waits for room
            await trio.testing.wait_all_tasks_blocked()
            assert fs.cache.waiting == 1
            # ... while the uploader stores every dirty block, the last one too
            n.start_soon(fs.cache.run)
            await written.wait()
            n.cancel_scope.cancel()
        assert fs.cache.used == BS * len(fs.cache.dirty)
        await fs.release(fh)

    h.run(body, uploader=False)


def test_cache_reserve_waits_for_unreserve(h: Harness) -> None:
    async def body(d: Driver) -> None:
        cache = d.fs.cache
        blocks = cache.budget // cache.bs
        await cache.reserve(blocks)
        got = trio.Event()

        async def second() -> None:
            await cache.reserve()
            got.set()

        async with trio.open_nursery() as n:
            n.start_soon(second)
            await trio.sleep(0.02)
            assert not got.is_set() and cache.waiting == 1
            cache.unreserve()
            await got.wait()
        cache.unreserve(blocks)
        assert cache.used == 0

    h.run(body)


# -- the live tree and its journal -------------------------------------------------------------------
def test_journal_commit_replay_and_requeue(h: Harness) -> None:
    index = h.open().index
    tree = LiveTree(index)
    tree.load(0, 0)
    root = tree.nodes[ROOT_INODE]
    d = tree.new_node(stat.S_IFDIR | 0o755, 0, 0)
    tree.set_entry(root, b"d", d.ino)
    root.nlink += 1
    f = tree.new_node(stat.S_IFREG | 0o600, 1, 2, size=10)
    tree.set_entry(d, b"f", f.ino)
    f.xattrs[b"user.x"] = b"y"
    tree.touch_xattrs(f)
    tree.set_block(f, 0, [(bytes(32), 10)])
    ran: list[int] = []
    tree.after_commit(lambda: ran.append(1))

    async def journal() -> None:
        j = Journal(tree, interval=10)
        async with trio.open_nursery() as n:
            n.start_soon(j.run)
            await j.commit()
            n.cancel_scope.cancel()

    trio.run(journal)
    assert ran == [1] and not tree.dirty

    def replay() -> LiveTree:
        t = LiveTree(index)
        t.load(0, 0)
        return t

    again = replay()
    assert again.nodes[f.ino].row() == f.row() and again.nodes[f.ino].xattrs == f.xattrs
    assert again.nodes[d.ino].children == {b"f": f.ino}
    assert again.load_blocks(f.ino) == {0: [(bytes(32), 10)]}
    # a batch whose transaction failed is marked dirty again and goes out with the next
    f.size = 20
    tree.touch(f)
    batch = tree.take_batch()
    tree.requeue(batch)
    tree.apply_batch(tree.take_batch())
    assert replay().nodes[f.ino].size == 20
    # an inode no entry names (unlinked while open at a crash) is purged on load, and link
    # counts are recounted from the entries
    tree.set_entry(d, b"f", None)
    tree.apply_batch(tree.take_batch())
    index.set("live_next_inode", 1)  # a stale counter never hands out a used number
    t = replay()
    assert f.ino not in t.nodes and t.nodes[ROOT_INODE].nlink == 3
    assert t.next_ino > max(t.nodes)


# -- the read path: range reads, the read cache, read-ahead -------------------------------------
def _stored_file(h: Harness, data: bytes, snapshot: bool = False) -> None:
    """Write ``data`` to /f, store and upload everything (the queue empties), then end the
    process: the next run reads only from the remotes (and the read cache)."""

    async def body(d: Driver) -> None:
        await d.write_file(b"f", data)
        if snapshot:
            await d.fs.snapshot("s")
        rep = await d.fs.prepare_umount()
        assert rep.complete and not rep.errors

    h.run(body)
    h.crash()
    assert not any(p.is_file() for p in (h.home / "queue").rglob("*"))


def _damage_data_shard(h: Harness, idx: int, at: int) -> None:
    """Flip one byte ``at`` bytes into the payload of every data shard ``idx`` on the remotes
    (the index names each object's fragment index: shard objects do not, docs/format.md 7.1)."""
    db = sqlite3.connect(f"file:{h.home / 'index.db'}?mode=ro", uri=True)
    try:
        names = {nm for (nm,) in db.execute("SELECT name FROM shards WHERE idx=?", (idx,))}
    finally:
        db.close()
    hit = 0
    for f in h.root.glob("r*/data/*"):
        if f.name in names:
            raw = bytearray(f.read_bytes())
            raw[segment.HEADER_SIZE + 80 + at] ^= 0xFF
            f.write_bytes(bytes(raw))
            hit += 1
    assert hit


def test_reads_fetch_only_data_shard_ranges_and_fall_back_past_a_damaged_block(
    make_harness,
) -> None:
    h = make_harness(read_cache_size=0)
    data = random.Random(5).randbytes(5 * BS + 1234)
    _stored_file(h, data)

    async def read(d: Driver) -> dict:
        fh = await d.open(b"f", os.O_RDONLY)
        assert await d.fs.read(fh, 3 * BS + 7, 4096) == data[3 * BS + 7 : 3 * BS + 7 + 4096]
        assert await d.fs.read(fh, 0, len(data) + 1) == data
        await d.fs.release(fh)
        return dict(d.fs.reader.stats)

    stats = h.run(read)
    assert stats["range_reads"] and not stats["segment_reads"]
    h.crash()
    _damage_data_shard(h, 0, 100)  # the first records' bytes in shard 0 no longer match
    stats = h.run(read)
    assert stats["segment_reads"] >= 1 and stats["range_reads"]


def test_the_read_cache_is_filled_on_read_and_kept_on_write_and_survives_a_crash(
    make_harness,
) -> None:
    h = make_harness()
    data = random.Random(6).randbytes(4 * BS)
    _stored_file(h, data)  # writing kept the stored chunks in the read cache

    async def read(d: Driver) -> dict:
        assert await d.read_file(b"f") == data
        return {**d.fs.readcache.stats(), **d.fs.reader.stats}

    got = h.run(read)
    assert got["hits"] and not got["range_reads"] and not got["segment_reads"]
    h.crash()
    # a kill -9 mid-append leaves a torn record at a pack's end: not served, a miss
    rc = h.home / "readcache"
    (pack,) = rc.iterdir()
    raw = pack.read_bytes()
    pack.write_bytes(raw[:-10])
    (rc / "123.4.tmp").write_bytes(b"a stranger")
    got = h.run(read)
    assert got["range_reads"] == 1 and not got["discarded"] and not got["segment_reads"]
    assert not (rc / "123.4.tmp").exists()
    h.crash()
    # a record altered on disk fails its check against the chunk id: discarded, read again
    packs = sorted(rc.iterdir())
    raw = bytearray(packs[0].read_bytes())
    raw[HEADER.size + 100] ^= 0xFF  # in the first record's plaintext
    packs[0].write_bytes(bytes(raw))
    got = h.run(read)
    assert got["discarded"] == 1 and got["range_reads"] == 1
    h.crash()
    # emptied, it is filled again by reads
    for f in rc.iterdir():
        f.unlink()
    assert h.run(read)["range_reads"]
    assert h.run(read)["hits"]


def test_small_reads_served_in_the_fuse_loop_never_return_altered_bytes(make_harness) -> None:
    h = make_harness()
    data = random.Random(10).randbytes(4 * BS)

    async def body(d: Driver) -> None:
        await d.write_file(b"f", data)
        await d.fs.drain()  # stored: its chunks are in the read cache, pages tagged
        fh = await d.open(b"f", os.O_RDONLY)
        reads, cache = d.fs.read_stats, d.fs.readcache
        assert await d.fs.read(fh, 5000, 4096) == data[5000:9096]
        assert reads["inline"] == 1  # answered in the FUSE loop, no worker thread
        # a byte of those pages altered on disk under the running mount
        (pack,) = (h.home / "readcache").iterdir()
        raw = bytearray(pack.read_bytes())
        at = raw.find(data[6000:6100])
        raw[at] ^= 0xFF
        pack.write_bytes(bytes(raw))
        assert await d.fs.read(fh, 5000, 4096) == data[5000:9096]
        assert reads["inline"] == 1 and cache.stats()["discarded"] == 1
        assert d.fs.reader.stats["range_reads"] == 1  # read again from the vault
        assert await d.fs.read(fh, 0, len(data)) == data
        await d.fs.release(fh)

    h.run(body)


def test_the_read_cache_stays_within_a_small_budget(make_harness) -> None:
    budget = 3 * 32 * 1024
    h = make_harness(read_cache_size=budget)
    data = random.Random(7).randbytes(6 * BS)
    _stored_file(h, data, snapshot=True)

    async def read(d: Driver) -> None:
        for path in (b"f", b".snapshots/s/f"):  # the live tree and a snapshot share it
            assert await d.read_file(path) == data
            # under the cache's lock: a worker thread's append counts its record, then
            # trims, both under it (the mount counts a snapshot file's allocation on one)
            assert d.fs.readcache.stats()["used"] <= budget

    h.run(read)
    files = list((h.home / "readcache").iterdir())
    assert files and sum(f.stat().st_size for f in files) <= budget


def test_sequential_reads_start_read_ahead(make_harness) -> None:
    h = make_harness(read_cache_size=0)
    data = random.Random(8).randbytes(12 * BS)
    _stored_file(h, data, snapshot=True)

    for path in (b"f", b".snapshots/s/f"):  # each in a fresh process: nothing in memory

        async def read(d: Driver, path: bytes = path) -> None:
            fh = await d.open(path, os.O_RDONLY)
            got = bytearray()
            for off in range(0, len(data), 16 * 1024):
                got += await d.fs.read(fh, off, 16 * 1024)
                await trio.sleep(0.001)  # the read-ahead runs in worker threads meanwhile
            await d.fs.release(fh)
            assert got == data
            assert d.fs.reader.stats["prefetched"] > 0

        h.run(read)
        h.crash()


def test_fsync_syncs_only_blocks_written_since_and_the_directory_only_for_new_files(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vaultfs.cache

    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(vaultfs.cache.os, "fsync", fsync)

    async def body(d: Driver) -> None:
        fh, ino = await d.create(b"db")
        await d.fs.write(fh, 0, bytes(4 * BS))
        await d.fs.fsync(fh, False)
        assert sorted(synced) == sorted([f"{ino}.{b}" for b in range(4)] + ["cache"])
        synced.clear()
        await d.fs.write(fh, 2 * BS + 5, b"x" * 4096)
        await d.fs.fsync(fh, False)
        assert synced == [f"{ino}.2"]
        synced.clear()
        await d.fs.fsync(fh, True)
        assert synced == []
        await d.fs.release(fh)

    h.run(body, uploader=False)


def test_range_reads_through_rclone_take_a_span_so_neighbours_cost_no_call(
    make_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vaultfs.chunkreader
    from vaultfs.remotes import Remote

    h = make_harness(read_cache_size=0)
    data = random.Random(9).randbytes(8 * BS)
    _stored_file(h, data)
    calls: list[tuple[int, int]] = []
    real_open = vaultfs.chunkreader.open_backend

    class Counted:
        def __init__(self, inner) -> None:
            self.inner = inner

        def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
            calls.append((offset, count))
            return self.inner.cat(sub, name, offset, count)

    # as for a cloud remote: no local copy, every shard byte through the remote's backend
    monkeypatch.setattr(Remote, "local_dir", property(lambda self: None))
    monkeypatch.setattr(
        vaultfs.chunkreader, "open_backend", lambda *a, **kw: Counted(real_open(*a, **kw))
    )

    async def read(d: Driver) -> dict:
        assert await d.read_file(b"f") == data
        return dict(d.fs.reader.stats)

    stats = h.run(read)
    assert stats["range_reads"] and not stats["segment_reads"]
    assert calls and all(c >= vaultfs.chunkreader.BLOCK for _o, c in calls)
    assert len(calls) < stats["range_reads"]  # neighbours came from the verified blocks
