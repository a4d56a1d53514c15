"""The mount's read path and its other users through a real kernel FUSE mount: fio with
``--verify=crc32c`` (random read/write mixes, mmap writes, data read back from the remotes
after a flush and a remount), the read cache across ``kill -9``, and another user (``nobody``)
through ``--allow-other`` against the same operations on a local directory.

Few and bounded: the logic is tested without a kernel in tests/test_fs_ops.py. The vault
helper is tests/test_mount.py's; skips where /dev/fuse, fio or root is missing.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import needs_fuse
from test_mount import Vault

pytestmark = needs_fuse
needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")

MiB = 1024 * 1024


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    v = Vault(tmp_path)
    try:
        yield v
    finally:
        v.cleanup()


def fio(directory: Path, *args: str) -> None:
    """Run one fio job in ``directory``; fio exits non-zero on any verify failure."""
    # no verify state files (fio would write them into the working directory: the repository)
    cmd = ["fio", "--output-format=json", "--verify_state_save=0", f"--directory={directory}"]
    cmd += args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    jobs = json.loads(res.stdout[res.stdout.index("{") :])["jobs"]
    assert all(j["error"] == 0 for j in jobs), jobs


# what the jobs write; the same parameters verify it again later (fio regenerates the data)
SEQ = ["--name=seq", "--rw=write", "--bs=128k", "--size=24m", "--verify=crc32c"]


@needs_fio
def test_fio_verifies_random_mixes_mmap_writes_and_data_read_back_from_the_remotes(
    vault: Vault,
) -> None:
    vault.mount("--cache-size", "16M", "--read-cache-size", "4M")
    mp = vault.mp
    # random 4 KiB reads and writes mixed, each written block verified
    fio(mp, "--name=mix", "--rw=randrw", "--rwmixread=50", "--bs=4k", "--size=8m",
        "--verify=crc32c", "--verify_backlog=64", "--ioengine=psync", "--fsync=32")  # fmt: skip
    # writes through a shared mapping (page faults, msync), then verified
    fio(mp, "--name=mmap", "--rw=randwrite", "--bs=16k", "--size=8m", "--ioengine=mmap",
        "--verify=crc32c")  # fmt: skip
    fio(mp, *SEQ, "--do_verify=0")
    vault.cli("flush")
    vault.umount()
    shutil.rmtree(vault.home / "readcache")  # nothing local: every byte from the remotes
    assert not any(p.is_file() for p in (vault.home / "queue").rglob("*"))
    vault.mount("--read-cache-size", "4M")
    fio(mp, *SEQ, "--verify_only")
    fio(mp, "--name=mmap", "--rw=randwrite", "--bs=16k", "--size=8m", "--ioengine=mmap",
        "--verify=crc32c", "--verify_only")  # fmt: skip
    st = vault.status()["mount"]
    assert st["chunk_reads"]["range_reads"] > 0
    assert st["read_cache"]["used"] <= 4 * MiB


def _read_direct_until(
    path: Path, lo: int, expect: bytes, stop: threading.Event, started: threading.Event, bad: list
) -> None:
    """Read ``len(expect)`` bytes at ``lo`` with O_DIRECT again and again until ``stop`` (at
    least three times); note in ``bad`` each read that does not return ``expect``."""
    buf = mmap.mmap(-1, len(expect))  # O_DIRECT wants aligned buffers
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        reads = 0
        while not stop.is_set() or reads < 3:
            got = os.preadv(fd, [buf], lo)
            if buf[:got] != expect:
                bad.append(f"offset {lo}: wrong bytes")
            reads += 1
            started.set()
    except OSError as e:
        bad.append(f"offset {lo}: {os.strerror(e.errno)}")
    finally:
        started.set()
        os.close(fd)


def test_reads_racing_the_write_that_dirties_a_stored_block_get_its_bytes(vault: Vault) -> None:
    """A write to a stored block makes it dirty and creates its cache file (the stored
    content copied in, then the new bytes); a read of another part of that block meanwhile
    gets the stored bytes, never the half-made file (zeros, or EIO once it is retried out);
    so do reads while a stored block's cache file is deleted. O_DIRECT on every side, so
    every request reaches the daemon."""
    vault.mount("--cache-size", "64M")
    bs, nblk, half = MiB, 12, MiB // 2
    p = vault.mp / "race.bin"
    want = bytearray(random.Random(7).randbytes(nblk * bs))
    p.write_bytes(want)
    patch = mmap.mmap(-1, 4096)
    for rnd in range(3):
        # every block stored and its cache file deleted, while the whole file is read: a
        # block whose file is being deleted is read from its chunks (before, ENOENT retried
        # into EIO)
        bad: list[str] = []
        stop, started = threading.Event(), threading.Event()
        t = threading.Thread(
            target=_read_direct_until, args=(p, 0, bytes(want), stop, started, bad)
        )
        t.start()
        started.wait()
        vault.cli("flush")
        stop.set()
        t.join()
        assert bad == []
        for b in range(nblk):
            lo = b * bs + half  # the reader checks the second half; the write goes to the first
            bad = []
            stop, started = threading.Event(), threading.Event()
            args = (p, lo, bytes(want[lo : lo + half]), stop, started, bad)
            t = threading.Thread(target=_read_direct_until, args=args)
            t.start()
            started.wait()
            patch[:] = bytes([rnd * nblk + b + 1]) * 4096
            at = b * bs + rnd * 4096
            fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
            try:
                assert os.pwritev(fd, [patch], at) == 4096
            finally:
                os.close(fd)
            want[at : at + 4096] = patch[:]
            stop.set()
            t.join()
            assert bad == []
    vault.cli("flush")
    vault.umount()
    vault.mount()
    assert p.read_bytes() == want


def test_kill9_with_a_full_read_cache_never_serves_wrong_bytes(vault: Vault) -> None:
    vault.mount("--read-cache-size", "2M")
    data = {f"f{i}": random.Random(i).randbytes(3 * MiB + i) for i in range(3)}
    for name, blob in data.items():
        (vault.mp / name).write_bytes(blob)
    vault.cli("flush")
    vault.umount()
    vault.mount("--read-cache-size", "2M")
    for name, blob in data.items():  # fills and churns the small cache
        assert (vault.mp / name).read_bytes() == blob
    # killed while reading (the cache is being written), then the cache is read from
    proc = subprocess.Popen(["cat", *(str(vault.mp / n) for n in data)], stdout=subprocess.DEVNULL)
    time.sleep(0.2)
    os.kill(vault.pid, signal.SIGKILL)
    proc.wait(30)
    left = [f for f in (vault.home / "readcache").iterdir() if not f.name.endswith(".tmp")]
    assert sum(f.stat().st_size for f in left) > MiB  # the daemon died with a full cache
    vault.mount("--read-cache-size", "2M")
    for name, blob in sorted(data.items(), reverse=True):
        assert (vault.mp / name).read_bytes() == blob
    rc = vault.status()["mount"]["read_cache"]
    assert rc["used"] <= 2 * MiB and rc["hits"] + rc["misses"] > 0


# -- another user through --allow-other ----------------------------------------------------------
# Run as `nobody` with the system's python (stdlib only); prints {operation: errno or 0}.
AS_OTHER = r"""
import errno, json, os, stat, sys
root = sys.argv[1]
out = {}
def do(name, fn):
    try:
        fn()
        out[name] = 0
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
p = lambda *a: os.path.join(root, *a)
def create():
    with open(p("pub", "mine"), "w") as f:
        f.write("nobody was here")
do("create in a 1777 dir", create)
do("read own file", lambda: open(p("pub", "mine")).read() == "nobody was here" or 1 / 0)
do("read a 0644 file", lambda: open(p("open")).read())
do("read a 0600 file", lambda: open(p("secret")).read())
do("write a 0644 file", lambda: open(p("open"), "a").close())
do("list a 0700 dir", lambda: os.listdir(p("priv")))
do("enter a 0700 dir", lambda: os.stat(p("priv", "x")))
do("create in a 0755 dir", lambda: open(p("ro", "new"), "w").close())
do("chmod root's file", lambda: os.chmod(p("open"), 0o666))
do("chmod own file", lambda: os.chmod(p("pub", "mine"), 0o600))
do("chown own file to root", lambda: os.chown(p("pub", "mine"), 0, -1))
do("utime root's file", lambda: os.utime(p("open"), (1, 1)))
do("utime now on root's 0666 file", lambda: os.utime(p("pub", "shared")))
do("unlink root's file in a sticky dir", lambda: os.unlink(p("pub", "roots")))
do("rename root's file in a sticky dir", lambda: os.rename(p("pub", "roots"), p("pub", "x")))
do("rmdir in a 0755 dir", lambda: os.rmdir(p("ro", "sub")))
do("setxattr user on root's file", lambda: os.setxattr(p("open"), "user.k", b"v"))
def write_suid():
    with open(p("pub", "suid"), "r+") as f:
        f.write("x")
do("write a 04777 file", write_suid)
out["suid bit after the write"] = bool(os.stat(p("pub", "suid")).st_mode & stat.S_ISUID)
print(json.dumps(out))
"""


def _populate(root: Path) -> None:
    """The tree the other user meets (made by root)."""
    (root / "pub").mkdir()
    os.chmod(root / "pub", 0o1777)
    (root / "priv").mkdir(mode=0o700)
    (root / "priv" / "x").write_text("x")
    (root / "ro").mkdir(mode=0o755)
    (root / "ro" / "sub").mkdir()
    for name, mode in [("open", 0o644), ("secret", 0o600)]:
        (root / name).write_text(name)
        os.chmod(root / name, mode)
    for name, mode in [("roots", 0o644), ("shared", 0o666), ("suid", 0o4777)]:
        (root / "pub" / name).write_text(name)
        os.chmod(root / "pub" / name, mode)


def _as_nobody(root: Path) -> dict:
    python = shutil.which("python3", path="/usr/bin:/bin")
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]
    res = subprocess.run(
        [*cmd, python, "-c", AS_OTHER, str(root)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
def test_another_user_through_allow_other_meets_the_mode_bits_as_on_a_local_disk() -> None:
    # under a directory every user may traverse (pytest's tmp_path is private to root)
    top = Path(tempfile.mkdtemp(prefix="vaultfs-other-", dir="/tmp"))
    os.chmod(top, 0o755)
    vault = Vault(top / "vault")
    try:
        os.chmod(top / "vault", 0o755)
        local = top / "local"
        local.mkdir(mode=0o755)
        vault.mount("--allow-other")
        os.chmod(vault.mp, 0o755)
        for root in (local, vault.mp):
            _populate(root)
        want, got = _as_nobody(local), _as_nobody(vault.mp)
        assert got == want
        # the outcomes a local disk gives, spelled out
        assert want["create in a 1777 dir"] == want["read own file"] == 0
        assert want["read a 0600 file"] == want["list a 0700 dir"] == "EACCES"
        assert want["chmod root's file"] == want["chown own file to root"] == "EPERM"
        assert want["unlink root's file in a sticky dir"] == "EPERM"
        assert want["write a 04777 file"] == 0 and not want["suid bit after the write"]
        mine = vault.mp / "pub" / "mine"
        assert (mine.stat().st_uid, mine.read_text()) == (65534, "nobody was here")
    finally:
        vault.cleanup()
        shutil.rmtree(top, ignore_errors=True)
