"""The mount through a real kernel FUSE mount: POSIX semantics, snapshots, durability, crash,
cache budget, offline remotes and bad input.

Every test mounts with `vaultfs mount` in a subprocess and the fixtures always unmount (and
kill a daemon that is left), even when the test fails. Skips only where /dev/fuse is missing.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import bytes_tree_digest, make_odd_tree, mount_pid, needs_fuse

from vaultfs.fs import KILLPRIV_V2

pytestmark = needs_fuse

MiB = 1024 * 1024


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Vault:
    """A vault made with `vaultfs init` over local-directory remotes, driven by the CLI."""

    def __init__(self, root: Path, remotes: list[str] | None = None, k: int = 2, n: int = 3):
        self.root = root
        self.home = root / "home"
        self.remotes = remotes or [str(root / f"r{i}") for i in range(n)]
        self.env = {
            **os.environ,
            "VAULTFS_HOME": str(self.home),
            "VAULTFS_PASSPHRASE": "correct horse",
        }
        self.mp = root / "mnt"
        self.mp.mkdir(parents=True)
        args = ["init", "-k", str(k), "-n", str(n), "--segment-mib", "1"]
        for r in self.remotes:
            args += ["--remote", r]
        self.cli(*args)

    def cli(self, *args: str, check: bool = True, env: dict | None = None, timeout: float = 180):
        res = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"vaultfs {' '.join(args)} exited {res.returncode}:\n{res.stdout}{res.stderr}"
            )
        return res

    def mount(self, *extra: str) -> None:
        self.cli("mount", str(self.mp), *extra)

    @property
    def pid(self) -> int | None:
        return mount_pid(self.home)

    def umount(self) -> subprocess.CompletedProcess:
        return self.cli("umount", str(self.mp))

    def cleanup(self) -> None:
        """Unmount whatever state the mount is in; never raises."""
        pid = self.pid
        if os.path.ismount(self.mp) or _dead(self.mp):
            try:
                res = self.cli("umount", str(self.mp), check=False, timeout=120)
                ok = res.returncode in (0, 3)
            except subprocess.TimeoutExpired:
                ok = False
            if not ok:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
        if pid and _pid_alive(pid):
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)


def _dead(mp: Path) -> bool:
    try:
        os.listdir(mp)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def tree_digest(root: Path, skip: tuple[str, ...] = (".snapshots",)) -> dict[str, tuple]:
    """{relative path: (type, mode, size, sha256 or link target, xattrs)} of a tree."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) == root and d in skip))
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            xa = tuple(sorted((a, os.getxattr(p, a, follow_symlinks=False)) for a in os.listxattr(p, follow_symlinks=False)))  # fmt: skip
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), xa)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), xa)
            else:
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, h, xa)
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Vault:
    """One mounted vault for the POSIX tests of this module (mounting costs an scrypt)."""
    v = Vault(tmp_path_factory.mktemp("shared"))
    v.mount("--cache-size", "32M")
    try:
        yield v
    finally:
        v.cleanup()


@pytest.fixture
def vault(tmp_path) -> Vault:
    v = Vault(tmp_path)
    try:
        yield v
    finally:
        v.cleanup()


# -- (1) POSIX basics -------------------------------------------------------------------------
def test_files_random_and_append_writes_match_a_model(shared: Vault) -> None:
    p = shared.mp / "model.bin"
    rnd = random.Random(1)
    model = bytearray()
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for _ in range(60):
            off = rnd.randrange(0, 3 * MiB + 5000)
            data = rnd.randbytes(rnd.choice([1, 100, 4096, 70000, 300000]))
            os.pwrite(fd, data, off)
            if off > len(model):
                model += bytes(off - len(model))
            model[off : off + len(data)] = data
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    with open(p, "ab") as f:  # O_APPEND
        f.write(b"tail")
    model += b"tail"
    assert p.read_bytes() == bytes(model)
    # ftruncate shrinking into the middle of a block, then growing: zeros appear
    with open(p, "r+b") as f:
        f.truncate(MiB + 123)
        f.truncate(MiB + 1000)
    assert p.read_bytes() == bytes(model[: MiB + 123]) + bytes(1000 - 123)
    os.truncate(p, 0)
    assert p.stat().st_size == 0 and p.read_bytes() == b""


def test_rename_unlink_dirs_and_inodes(shared: Vault) -> None:
    root = shared.mp / "ren"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "one").write_bytes(b"1")
    (root / "b" / "two").write_bytes(b"2")
    ino = (root / "a" / "one").stat().st_ino
    os.rename(root / "a" / "one", root / "b" / "two")  # over an existing file, across dirs
    assert (root / "b" / "two").read_bytes() == b"1"
    assert (root / "b" / "two").stat().st_ino == ino
    assert not (root / "a" / "one").exists()
    os.rename(root / "a", root / "c")  # a directory
    (root / "c" / "x").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.rename(root / "b", root / "c")  # over a non-empty directory
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rmdir(root / "c")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(root / "c" / "x")
    os.rename(root / "b", root / "c")  # over an empty directory
    assert sorted(os.listdir(root)) == ["c"]
    assert (root / "c" / "two").read_bytes() == b"1"
    # renameat2 flags: RENAME_NOREPLACE refuses, RENAME_EXCHANGE swaps
    libc = ctypes.CDLL(None, use_errno=True)
    (root / "p").write_bytes(b"P")
    (root / "q").write_bytes(b"Q")
    at = -100  # AT_FDCWD
    rc = libc.renameat2(at, bytes(root / "p"), at, bytes(root / "q"), 1)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert libc.renameat2(at, bytes(root / "p"), at, bytes(root / "q"), 2) == 0
    assert (root / "p").read_bytes() == b"Q" and (root / "q").read_bytes() == b"P"
    os.unlink(root / "p")
    os.unlink(root / "q")
    # unlink while open: data lives until the last close
    f = open(root / "c" / "two", "r+b")  # noqa: SIM115
    os.unlink(root / "c" / "two")
    f.write(b"after")
    f.seek(0)
    assert f.read() == b"after"
    f.close()
    assert os.listdir(root / "c") == []
    # inode numbers are never reused
    (root / "n1").write_bytes(b"")
    i1 = (root / "n1").stat().st_ino
    os.unlink(root / "n1")
    (root / "n2").write_bytes(b"")
    assert (root / "n2").stat().st_ino > i1


def test_links_metadata_xattrs_excl_statfs(shared: Vault) -> None:
    d = shared.mp / "meta"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"data")
    os.link(f, d / "g")
    assert (d / "g").stat().st_ino == f.stat().st_ino and f.stat().st_nlink == 2
    os.symlink("f", d / "s")
    assert os.readlink(d / "s") == "f" and (d / "s").read_bytes() == b"data"
    assert stat.S_ISLNK((d / "s").lstat().st_mode)
    os.chmod(f, 0o600)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = (d / "g").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 2_000_000_456 and st.st_atime_ns == 1_000_000_123
    os.setxattr(f, "user.comment", b"\x00binary\xff")
    os.setxattr(f, "user.other", b"v")
    assert os.getxattr(d / "g", "user.comment") == b"\x00binary\xff"
    assert sorted(os.listxattr(f)) == ["user.comment", "user.other"]
    os.removexattr(f, "user.other")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.other")
    assert e.value.errno == errno.ENODATA
    os.unlink(f)
    assert (d / "g").stat().st_nlink == 1 and (d / "g").read_bytes() == b"data"
    fd = os.open(d / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(d / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    sv = os.statvfs(shared.mp)
    local = os.statvfs(shared.home)
    assert sv.f_namemax == 255
    # free space is what the local disk holding the cache and queue can still take
    assert abs(sv.f_bavail * sv.f_frsize - local.f_bavail * local.f_frsize) < 256 * MiB


def test_names_longer_than_255_bytes_are_refused_like_a_local_disk(shared: Vault) -> None:
    """NAME_MAX is 255 bytes: every call taking a longer name answers ENAMETOOLONG (FUSE
    itself would pass up to 1,024 bytes); a 255-byte name works throughout."""
    d = shared.mp / "names"
    d.mkdir()
    ok, long = d / ("n" * 255), d / ("n" * 256)
    ok.write_bytes(b"x")
    os.link(ok, d / ("l" * 255))
    os.rename(d / ("l" * 255), d / ("m" * 255))
    assert sorted(p.name for p in d.iterdir()) == ["m" * 255, "n" * 255]
    calls = {
        "create": lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        "stat": lambda: os.stat(long),
        "mkdir": lambda: os.mkdir(long),
        "rename": lambda: os.rename(ok, long),
        "link": lambda: os.link(ok, long),
        "symlink": lambda: os.symlink("t", long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 1, 1),
        "truncate": lambda: os.truncate(long, 0),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
    }
    for what, call in calls.items():
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENAMETOOLONG, what
    assert ok.read_bytes() == b"x" and os.statvfs(d).f_namemax == 255


def test_open_with_o_trunc_truncates_an_existing_file(shared: Vault) -> None:
    """libfuse negotiates atomic O_TRUNC, so the kernel truncates only its own cache and
    leaves the file to OPEN; a snapshot shows what the daemon holds."""
    p = shared.mp / "otrunc"
    p.write_bytes(b"the old, longer content" * 100)
    with open(p, "r+b") as f:
        os.fsync(f.fileno())
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert p.read_bytes() == b"new"
    shared.cli("snapshot", "--name", "after-otrunc")
    assert (shared.mp / ".snapshots" / "after-otrunc" / "otrunc").read_bytes() == b"new"


@pytest.mark.skipif(
    not KILLPRIV_V2,
    reason="the stock pyfuse3 (scripts/bootstrap fell back) cannot negotiate KILLPRIV_V2",
)
def test_small_writes_cost_no_getxattr_round_trip(shared: Vault) -> None:
    """FUSE_HANDLE_KILLPRIV_V2 (the patched pyfuse3): the kernel stops asking for
    security.capability before every write(2), as it did for each of pg_dump's 8 KiB writes."""
    before = shared.status()["mount"]["getxattr_requests"]
    data = random.Random(3).randbytes(8192)
    with open(shared.mp / "small-writes", "wb", buffering=0) as f:
        for _ in range(2000):
            f.write(data)
    asked = shared.status()["mount"]["getxattr_requests"] - before
    assert asked <= 2, f"{asked} GETXATTR requests for 2000 writes"
    assert (shared.mp / "small-writes").read_bytes() == data * 2000


# -- set-id bits and file capabilities (the kernel hands them to us with KILLPRIV_V2) ----------
#: what setcap writes for cap_net_raw=ep: VFS_CAP_REVISION_2 | effective, permitted = 1 << 13
FILE_CAPS = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
#: The kernel keys on CAP_FSETID. FUSE admits only the mounting user (no allow_other), so the
#: unprivileged writer is root without CAP_FSETID (bounding and inheritable sets, so the
#: exec'd interpreter cannot regain it).
NO_FSETID = ["setpriv", "--bounding-set=-fsetid", "--inh-caps=-fsetid"]
KILLPRIV_OPS = {
    "append": "f = open(p, 'ab', buffering=0)\nfor _ in range(3): f.write(b'x' * 8192)\nf.close()",
    "truncate": "os.truncate(p, 1)",
    "open-trunc": "open(p, 'wb').write(b'z')",
    "chown": "os.chown(p, 65534, -1)",
}
# (operation, writer has CAP_FSETID, mode, file capability) -> mode after, capability after;
# the last column is the mount's where it differs from the kernel's own (None: it does not)
KILLPRIV_CASES = [
    ("append", False, 0o6777, False, 0o0777, False, None),  # world-writable set-id file
    ("append", True, 0o6777, False, 0o6777, False, None),
    ("append", False, 0o2766, False, 0o2766, False, None),  # S_ISGID without group-exec
    ("append", True, 0o0755, True, 0o0755, False, None),
    ("truncate", False, 0o6775, False, 0o0775, False, None),
    ("truncate", True, 0o6775, True, 0o6775, False, None),
    ("open-trunc", False, 0o6775, False, 0o0775, False, None),
    # libfuse 3.17 does not relay FUSE_OPEN_KILL_SUIDGID: the mount clears for every caller
    ("open-trunc", True, 0o6775, True, 0o6775, False, 0o0775),
    ("chown", True, 0o6775, True, 0o0775, False, None),
    ("chown", True, 0o6765, False, 0o2765, False, None),
]


def _killpriv_outcomes(root: Path) -> list[tuple[int, bool]]:
    out = []
    for i, (op, fsetid, mode, caps, *_expected) in enumerate(KILLPRIV_CASES):
        p = root / f"case-{i}-{op}"
        p.write_bytes(b"abc")
        os.chmod(p, mode)
        os.setxattr(p, "user.kept", b"yes")
        if caps:
            os.setxattr(p, "security.capability", FILE_CAPS)
            assert os.getxattr(p, "security.capability") == FILE_CAPS
        prefix = [] if fsetid else NO_FSETID
        code = f"import os\np = {str(p)!r}\n{KILLPRIV_OPS[op]}"
        subprocess.run([*prefix, sys.executable, "-c", code], check=True)
        assert os.getxattr(p, "user.kept") == b"yes"
        out.append((stat.S_IMODE(p.stat().st_mode), "security.capability" in os.listxattr(p)))
    return out


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (security.capability, chown) and setpriv (util-linux)",
)
def test_set_id_bits_and_file_capabilities_are_cleared_as_the_kernel_does(
    shared: Vault, tmp_path: Path
) -> None:
    """Write, truncate and chown, with and without CAP_FSETID, on the mount and on a local
    directory (the kernel's own rules): the same outcomes but for one documented case."""
    local = _killpriv_outcomes(tmp_path)
    (shared.mp / "killpriv").mkdir()
    mounted = _killpriv_outcomes(shared.mp / "killpriv")
    for case, got_local, got_mount in zip(KILLPRIV_CASES, local, mounted, strict=True):
        op, fsetid, mode, caps, want_mode, want_caps, mount_mode = case
        name = f"{op} by {'root' if fsetid else 'a writer without CAP_FSETID'} of {mode:#o}"
        assert got_local == (want_mode, want_caps), f"local disk, {name}"
        # the documented exception is the patched pyfuse3's (libfuse 3.17); the stock one leaves
        # set-id handling to the kernel, which then matches the local disk
        exact = mount_mode is None or not KILLPRIV_V2
        want_mount = (want_mode if exact else mount_mode, want_caps)
        assert got_mount == want_mount, f"mount, {name}"
    # a directory keeps S_ISGID through chown
    d = shared.mp / "killpriv" / "sgid-dir"
    d.mkdir()
    os.chmod(d, 0o2775)
    os.chown(d, 65534, -1)
    assert stat.S_IMODE(d.stat().st_mode) == 0o2775


def test_large_directory_and_fsync(shared: Vault) -> None:
    d = shared.mp / "many"
    d.mkdir()
    names = [f"file-{i:05d}" for i in range(1200)]
    for name in names:
        (d / name).write_bytes(name.encode())
    listed = os.listdir(d)
    assert sorted(listed) == names and len(set(listed)) == len(names)
    inos = {e.name: e.inode() for e in os.scandir(d)}
    assert len(set(inos.values())) == len(names)
    assert (d / names[1111]).read_bytes() == names[1111].encode()
    fd = os.open(d / names[0], os.O_WRONLY)
    os.write(fd, b"synced")
    os.fsync(fd)
    os.close(fd)


def test_everything_survives_umount_and_remount(shared: Vault) -> None:
    d = shared.mp / "persist"
    d.mkdir()
    (d / "big").write_bytes(random.Random(5).randbytes(3 * MiB + 17))
    (d / "small").write_bytes(b"s")
    os.link(d / "small", d / "small-link")
    os.symlink("big", d / "ln")
    os.setxattr(d / "big", "user.k", b"v")
    os.utime(d / "small", ns=(5, 7_000_000_000))
    (d / "rewritten").write_bytes(random.Random(6).randbytes(MiB + 10))
    shared.cli("flush")  # stored: the rewrite below replaces stored blocks
    (d / "rewritten").write_bytes(b"short")  # open(O_TRUNC) of a stored file
    (d / "dirty").write_bytes(b"long content, still in the cache")
    (d / "dirty").write_bytes(b"tiny")  # open(O_TRUNC) of a file with dirty blocks
    before = tree_digest(d)
    entries = sorted(os.listdir(shared.mp))
    inode = (d / "big").stat().st_ino
    shared.umount()
    assert not os.path.ismount(shared.mp) and os.listdir(shared.mp) == []
    shared.mount("--cache-size", "32M")
    assert tree_digest(d) == before
    assert sorted(os.listdir(shared.mp)) == entries
    assert (d / "big").stat().st_ino == inode
    assert (d / "small").stat().st_nlink == 2 and (d / "small").stat().st_mtime_ns == 7_000_000_000
    assert (d / "rewritten").read_bytes() == b"short" and (d / "dirty").read_bytes() == b"tiny"


def _allocated(p: Path) -> int:
    return p.stat().st_blocks * 512


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_sparse_file_reports_what_a_restore_would_allocate(shared: Vault, tmp_path) -> None:
    """st_blocks (du, ls -s, cp, rsync -S) counts the chunks that are not holes: a 64 MiB file
    holding 3 MiB of data shows about 3 MiB, live (dirty, then stored and counted from the
    index after a remount) and in a snapshot; written zeros count while they sit in the
    cache (its files hold them), not once stored. Before this every byte counted."""
    d = shared.mp / "sparse"
    d.mkdir()
    f, z = d / "vm.img", d / "zeros"
    data = random.Random(9).randbytes(3 * MiB)
    with open(f, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(10 * MiB + 4096)  # not on a block boundary
        fh.write(data)
        fh.seek(40 * MiB)
        fh.write(b"x" * 100)
        os.fsync(fh.fileno())
    with open(z, "wb") as fh:
        fh.write(bytes(8 * MiB) + b"end")  # written zeros, not holes
        os.fsync(fh.fileno())
    assert f.stat().st_size == 64 * MiB
    assert 3 * MiB <= _allocated(f) <= 4 * MiB, _allocated(f)  # the cache files hold that
    assert _allocated(z) >= 8 * MiB  # so do these: zeros, written
    shared.cli("snapshot", "--name", "sparse1")
    view = shared.mp / ".snapshots" / "sparse1" / "sparse"
    assert (view / "vm.img").stat().st_size == 64 * MiB
    assert 3 * MiB <= _allocated(view / "vm.img") <= 4 * MiB, _allocated(view / "vm.img")
    assert _allocated(view / "zeros") <= 64 * 1024, _allocated(view / "zeros")
    du = subprocess.run(["du", "-sk", str(view)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 5 * 1024, du.stdout  # KiB: not 72 MiB
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", str(view / "vm.img"), str(copy)], check=True)
    assert _sha(copy) == _sha(f)
    assert _allocated(copy) <= 4 * MiB, _allocated(copy)
    plain = tmp_path / "plain.img"  # cp's default (--sparse=auto) trusts st_blocks
    subprocess.run(["cp", str(view / "vm.img"), str(plain)], check=True)
    assert _sha(plain) == _sha(f)
    assert _allocated(plain) <= 4 * MiB, _allocated(plain)
    # a remount counts the stored blocks from the index (none is loaded, nothing is dirty)
    shared.umount()
    shared.mount("--cache-size", "32M")
    assert 3 * MiB <= _allocated(f) <= 4 * MiB, _allocated(f)
    assert _allocated(z) <= 64 * 1024, _allocated(z)  # stored: its zero chunks are holes
    live = subprocess.run(["du", "-sk", str(d)], capture_output=True, text=True, check=True)
    assert int(live.stdout.split()[0]) <= 5 * 1024, live.stdout
    copy.unlink()
    subprocess.run(["cp", "--sparse=always", str(f), str(copy)], check=True)
    assert _sha(copy) == _sha(view / "vm.img")
    assert _allocated(copy) <= 4 * MiB, _allocated(copy)
    assert _sha(z) == hashlib.sha256(bytes(8 * MiB) + b"end").hexdigest()
    # written into, a stored block becomes dirty again: its cache file holds it whole
    with open(f, "r+b") as fh:
        fh.seek(50 * MiB)
        fh.write(b"y")
        os.fsync(fh.fileno())
    assert 3 * MiB <= _allocated(f) <= 4 * MiB + 8192, _allocated(f)


def _meta_digest(root: Path) -> dict[str, tuple]:
    """{relative path: (mode, uid, gid, size, atime_ns, mtime_ns, sha256 or link target, link
    count, user.* xattrs, the first path of its inode)} (a directory's size and link count and
    a symlink's atime are the file system's own; the last field shows which names share an
    inode, whatever its number)."""
    out: dict[str, tuple] = {}
    first: dict[int, str] = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        rel = str(p.relative_to(root))
        size, atime, nlink = st.st_size, st.st_atime_ns, st.st_nlink
        if stat.S_ISLNK(st.st_mode):
            what: str | None = os.readlink(p)
            atime = None
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(p, os.O_RDONLY | os.O_NOATIME)  # reading must not move the atime
            with open(fd, "rb") as f:
                what = hashlib.sha256(f.read()).hexdigest()
        else:
            what = size = nlink = None
        names = sorted(n for n in os.listxattr(p, follow_symlinks=False) if n.startswith("user."))
        xattrs = tuple((n, os.getxattr(p, n, follow_symlinks=False)) for n in names)
        same = first.setdefault(st.st_ino, rel)
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, atime, st.st_mtime_ns, what, nlink, xattrs, same)  # fmt: skip
    return out


def test_cp_a_keeps_modes_owners_times_and_bytes_exactly(shared: Vault, tmp_path: Path) -> None:
    """`cp -a` of empty, small and multi-block files, directories, symlinks and hard links:
    everything it sets (mode through the access ACL, owner as root, also a symlink's, times to
    the nanosecond, user xattrs, which names share an inode) is exact afterwards, also once
    stored, though no FLUSH reaches the daemon (the first close answers ENOSYS and the kernel
    stops asking)."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    rnd = random.Random(12)
    sizes = [0, 1, 4096, 100_000, 128 * 1024, 128 * 1024 + 1, 200_000, MiB + MiB // 2]
    modes = [0o644, 0o600, 0o755, 0o640, 0o2750, 0o444, 0o4755, 0o620]
    for i, (size, mode) in enumerate(zip(sizes, modes, strict=True)):
        f = src / ("sub" if i % 2 else "sub/deeper") / f"f{i}"
        f.write_bytes(rnd.randbytes(size))
        if os.geteuid() == 0 and i % 3 == 0:
            os.chown(f, 65534, 65534)
        f.chmod(mode)
    os.symlink("sub/f1", src / "ln")
    if os.geteuid() == 0:
        os.chown(src / "ln", 65534, 65534, follow_symlinks=False)
    os.link(src / "sub" / "f1", src / "sub" / "deeper" / "hard")  # cp -a keeps the pair linked
    os.setxattr(src / "sub" / "f3", "user.tag", b"kept by cp -a")
    (src / "sub").chmod(0o750)
    for i, p in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        t = 1_600_000_000_000_000_007 + i * 1_000_003
        os.utime(p, ns=(t + 500_000_001, t), follow_symlinks=False)
    want = _meta_digest(src)
    dest = shared.mp / "cp-a"
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    assert _meta_digest(dest) == want
    shared.cli("flush")  # stored: the bytes now come from the stored chunks
    assert _meta_digest(dest) == want
    # the access ACL sets the mode as on Linux: kept only when it says more than the mode
    f, acl = dest / "sub" / "f1", "system.posix_acl_access"
    entry = lambda tag, perm, id_=0xFFFFFFFF: struct.pack("<HHI", tag, perm, id_)  # noqa: E731
    plain = struct.pack("<I", 2) + entry(1, 7) + entry(4, 5) + entry(0x20, 1)
    os.setxattr(f, acl, plain)
    assert stat.S_IMODE(f.stat().st_mode) == 0o751 and acl not in os.listxattr(f)
    extended = struct.pack("<I", 2) + entry(1, 6) + entry(2, 7, 1234) + entry(4, 4)
    extended += entry(0x10, 6) + entry(0x20, 0)
    os.setxattr(f, acl, extended)
    assert stat.S_IMODE(f.stat().st_mode) == 0o660 and os.getxattr(f, acl) == extended
    with pytest.raises(OSError) as e:
        os.setxattr(f, acl, b"\2\0\0\0\1\0")
    assert e.value.errno == errno.EINVAL


# -- snapshots, read-only views, delete ----------------------------------------------------------
def test_snapshot_views_are_read_only_and_point_in_time(shared: Vault) -> None:
    d = shared.mp / "snapme"
    d.mkdir()
    (d / "f").write_bytes(b"version 1")
    os.link(d / "f", d / "hl")
    os.setxattr(d / "f", "user.tag", b"t1")
    res = shared.cli("snapshot", "--name", "s1", "--json")
    snap = json.loads(res.stdout)["snapshot"]
    (d / "f").write_bytes(b"version 2, longer")
    view = shared.mp / ".snapshots" / "s1" / "snapme"
    assert (view / "f").read_bytes() == b"version 1"
    assert (d / "f").read_bytes() == b"version 2, longer"
    assert (view / "f").stat().st_ino == (view / "hl").stat().st_ino
    assert (view / "f").stat().st_nlink == 2
    assert os.getxattr(view / "f", "user.tag") == b"t1"
    assert "s1" in os.listdir(shared.mp / ".snapshots")
    for attempt in (
        lambda: (view / "new").write_bytes(b"x"),
        lambda: open(view / "f", "r+b"),
        lambda: os.unlink(view / "f"),
        lambda: os.mkdir(view / "dir"),
        lambda: os.setxattr(view / "f", "user.x", b"1"),
        lambda: os.chmod(view / "f", 0o777),
        lambda: os.rename(view / "f", view / "g"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    with pytest.raises(OSError):
        os.rmdir(shared.mp / ".snapshots")
    listed = json.loads(shared.cli("snapshots", "--json").stdout)  # works while mounted
    assert snap in [s["id"] for s in listed]
    shared.cli("snapshot", "--name", "s2")  # shares every unchanged chunk with s1
    shared.cli("snapshot", "delete", snap)
    assert "s1" not in os.listdir(shared.mp / ".snapshots")
    view2 = shared.mp / ".snapshots" / "s2" / "snapme"
    assert (view2 / "f").read_bytes() == b"version 2, longer"  # data s2 uses is not freed
    assert (view2 / "hl").read_bytes() == b"version 2, longer"  # a hard link of f
    assert snap not in [s["id"] for s in json.loads(shared.cli("snapshots", "--json").stdout)]
    assert (d / "f").read_bytes() == b"version 2, longer"  # the live data is untouched


def test_deleting_a_snapshot_the_kernel_never_looked_up_logs_no_error(vault: Vault) -> None:
    """Deleting a snapshot (`snapshot delete`, retention's `forget` in the mount) invalidates
    its entry under .snapshots; one the kernel never looked up is in no cache, and the
    invalidation failed in pyfuse3's notify thread: mount.log got "pyfuse3 ERROR: Failed to
    submit invalidate_entry request" and a FileNotFoundError traceback. Now only a looked-up
    entry is invalidated, and it is: the deleted name is gone at once."""
    vault.mount()
    (vault.mp / "f").write_bytes(b"x")
    for name in ("never", "seen", "kept"):
        vault.cli("snapshot", "--name", name)
    vault.cli("snapshot", "delete", "never")  # .snapshots not even listed yet
    assert (vault.mp / ".snapshots" / "seen" / "f").read_bytes() == b"x"  # looked up
    vault.cli("snapshot", "delete", "seen")
    assert not (vault.mp / ".snapshots" / "seen").exists()
    assert sorted(os.listdir(vault.mp / ".snapshots")) == ["kept"]  # listed: readdirplus
    for name in ("new1", "new2"):  # never looked up
        vault.cli("snapshot", "--name", name)
    vault.cli("forget", "--keep-last", "1")  # in the mount: forgets kept and new1
    assert sorted(os.listdir(vault.mp / ".snapshots")) == ["new2"]
    vault.umount()
    log = (vault.home / "mount.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]


def _downgrade_index_to_schema_1(index_db: Path) -> None:
    """Make an index look as a vaultfs before schema 2 wrote it (no entries.parent/rdev, a
    chunk list per entry in entry_chunks instead of shared contents)."""
    db = sqlite3.connect(index_db)
    try:
        db.execute(
            "CREATE TABLE entry_chunks (entry INTEGER NOT NULL REFERENCES entries(id),"
            " seq INTEGER NOT NULL, chunk INTEGER NOT NULL REFERENCES chunks(id),"
            " PRIMARY KEY (entry, seq)) WITHOUT ROWID"
        )
        db.execute(
            "INSERT INTO entry_chunks SELECT e.id, x.seq, x.chunk FROM entries e"
            " JOIN content_chunks x ON x.content = e.content"
        )
        db.execute("DROP TABLE content_chunks")
        db.execute("DROP TABLE contents")
        db.execute("ALTER TABLE entries DROP COLUMN content")
        db.execute("DROP INDEX entries_parent")
        db.execute("DROP INDEX entries_link")
        db.execute("ALTER TABLE entries DROP COLUMN parent")
        db.execute("ALTER TABLE entries DROP COLUMN rdev")
        db.execute("PRAGMA user_version=0")
        db.commit()
    finally:
        db.close()


def test_large_snapshot_loads_one_directory_at_a_time(vault: Vault, tmp_path: Path) -> None:
    """20,000 files in nested directories: stat of one deep file reads one entry per path
    component, ls of one directory reads that directory (the daemon's counters say so). The
    index is first turned back into a schema-1 file: the mount migrates it."""
    src = tmp_path / "big"
    for a in range(20):
        for b in range(20):
            d = src / f"a{a:02d}" / f"b{b:02d}"
            d.mkdir(parents=True)
            for c in range(50):
                (d / f"f{c:02d}").touch()
    deep = src / "a07" / "b13" / "f42"
    deep.write_bytes(b"the deep one")
    os.link(deep, src / "a07" / "b13" / "hard")
    vault.cli("backup", "--name", "big", str(src))
    _downgrade_index_to_schema_1(vault.home / "index.db")
    vault.mount("--cache-size", "8M")

    def views() -> dict:
        return vault.status()["mount"]["snapshot_views"]

    assert views()["entries_read"] == 0
    top = vault.mp / ".snapshots" / "big" / "big"
    st = os.stat(top / "a07" / "b13" / "f42")
    assert st.st_size == 12 and st.st_nlink == 2
    seen = views()
    assert seen["entries_read"] <= 4 and seen["listings"] == 0  # big, a07, b13, f42
    assert sorted(os.listdir(top / "a03" / "b04")) == [f"f{c:02d}" for c in range(50)]
    after = views()
    assert after["listings"] == 1
    assert after["entries_read"] - seen["entries_read"] <= 2 + 50  # a03, b04, its 50 files
    assert after["nodes_cached"] < 200
    assert (top / "a07" / "b13" / "f42").read_bytes() == b"the deep one"
    assert (top / "a07" / "b13" / "hard").stat().st_ino == st.st_ino  # one inode, stable
    assert os.stat(top / "a07" / "b13" / "f42").st_ino == st.st_ino
    inos = {e.inode() for e in os.scandir(top / "a03" / "b04")}
    assert len(inos) == 50 and st.st_ino not in inos
    assert os.stat(top / "a03").st_nlink == 2 + 20  # its subdirectories, counted in SQL
    with pytest.raises(OSError) as e:
        (top / "a03" / "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS
    final = views()
    assert final["entries_read"] < 200 and final["listings"] == 2
    assert sorted(os.listdir(top)) == [f"a{a:02d}" for a in range(20)]


def test_sqlite_database_on_the_mount_survives_heavy_random_writes(shared: Vault) -> None:
    path = shared.mp / "db" / "test.sqlite"
    path.parent.mkdir()
    rnd = random.Random(3)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB, n INTEGER)")
    expect: dict[int, tuple[bytes, int]] = {}
    for _tx in range(60):
        with db:
            for _ in range(25):
                i = rnd.randrange(2000)
                if rnd.random() < 0.15 and i in expect:
                    db.execute("DELETE FROM t WHERE id=?", (i,))
                    del expect[i]
                else:
                    v, n = rnd.randbytes(rnd.randrange(10, 3000)), rnd.randrange(1 << 30)
                    db.execute("INSERT OR REPLACE INTO t VALUES (?, ?, ?)", (i, v, n))
                    expect[i] = (v, n)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    shared.cli("flush")  # through the daemon: stores, seals and places everything
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        got = {i: (bytes(v), n) for i, v, n in db.execute("SELECT id, v, n FROM t")}
    finally:
        db.close()
    assert got == expect


# -- (9) bad input -------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(shared: Vault, tmp_path: Path) -> None:
    other = Vault(tmp_path / "v2")
    res = other.cli("mount", str(tmp_path / "missing"), check=False)
    assert res.returncode == 18 and "does not exist" in res.stderr
    # the mounted vault says so first, wherever it is asked to mount
    res = shared.cli("mount", str(tmp_path / "missing"), check=False)
    assert res.returncode == 17 and f"mounted at {shared.mp}" in " ".join(res.stderr.split())
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    res = other.cli("mount", str(full), check=False)
    assert res.returncode == 13 and "not empty" in res.stderr
    res = other.cli(
        "mount", str(other.mp), check=False, env={**other.env, "VAULTFS_PASSPHRASE": "wrong"}
    )
    assert res.returncode == 10 and not os.path.ismount(other.mp)
    empty = tmp_path / "second"
    empty.mkdir()
    res = shared.cli("mount", str(empty), check=False)  # the shared vault is mounted already
    assert res.returncode == 17 and f"mounted at {shared.mp}" in " ".join(res.stderr.split())
    assert not os.path.ismount(empty)
    res = shared.cli("backup", str(full), check=False)  # a command that needs the vault's lock
    said = " ".join(res.stderr.split())
    assert res.returncode == 17 and "mounted at" in said and "vaultfs snapshot" in said, said
    res = shared.cli("umount", str(empty), check=False)
    assert res.returncode == 18 and "not a vaultfs mount" in res.stderr
    res = shared.cli("snapshot", "delete", "nosuchid", check=False)
    assert res.returncode == 18 and "no snapshot" in res.stderr


# -- (3) crash ----------------------------------------------------------------------------------
def test_kill9_leaves_a_dead_mount_and_remount_recovers_fsynced_data(vault: Vault) -> None:
    vault.mount("--cache-size", "16M")
    rnd = random.Random(9)
    synced = rnd.randbytes(2 * MiB + 333)
    p = vault.mp / "synced.bin"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, synced)
    os.fsync(fd)
    os.close(fd)
    (vault.mp / "dir").mkdir()
    fd = os.open(vault.mp / "dir" / "small", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"small and synced")
    os.fsync(fd)
    # keep writing without fsync while the daemon is killed
    stop = threading.Event()

    def writer() -> None:
        try:
            with open(vault.mp / "unsynced", "wb") as f:
                while not stop.is_set():
                    f.write(b"u" * 65536)
        except OSError:  # the daemon died under us
            return

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)
    os.kill(vault.pid, signal.SIGKILL)
    stop.set()
    t.join(10)
    try:
        os.close(fd)
    except OSError:
        pass
    with pytest.raises(OSError) as e:
        os.listdir(vault.mp)
    assert e.value.errno == errno.ENOTCONN  # not an empty directory a backup would fill
    with pytest.raises(OSError):
        (vault.mp / "new-file").write_bytes(b"x")
    # with no daemon, `vaultfs snapshot` records the live tree as the index and cache hold it
    vault.cli("snapshot", "--name", "after-crash")
    vault.mount("--cache-size", "16M")  # cleans up the dead mount and recovers by itself
    assert p.read_bytes() == synced
    assert (vault.mp / ".snapshots" / "after-crash" / "synced.bin").read_bytes() == synced
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert (vault.mp / "dir" / "small").read_bytes() == b"small and synced"
    if (vault.mp / "unsynced").exists():  # never fsync'd: may or may not have survived
        assert set((vault.mp / "unsynced").read_bytes()) <= {ord("u")}
    res = vault.umount()
    assert "unmounted" in res.stdout
    st = vault.status()
    assert st["segments_below_k_placed"] == 0
    assert all(r["queued_objects"] == 0 for r in st["remotes"])


def test_plain_fusermount_unmount_loses_nothing(vault: Vault) -> None:
    vault.mount("--cache-size", "16M")
    data = random.Random(12).randbytes(3 * MiB + 5)
    (vault.mp / "f.bin").write_bytes(data)  # acknowledged by close, never fsync'd
    pid = vault.pid
    subprocess.run(["fusermount3", "-u", str(vault.mp)], check=True)
    deadline = time.monotonic() + 60
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid)  # the daemon stored the cache and exited by itself
    assert not (vault.home / "cache").exists() or not any((vault.home / "cache").iterdir())
    vault.mount("--cache-size", "16M")
    assert (vault.mp / "f.bin").read_bytes() == data


# -- (4) cache budget ----------------------------------------------------------------------------
def test_cache_stays_within_budget_for_a_stream_five_times_larger(vault: Vault) -> None:
    budget = 8 * MiB
    vault.mount("--cache-size", str(budget))
    cache = vault.home / "cache"
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            total = 0
            for f in cache.iterdir():
                try:
                    total += f.stat().st_blocks * 512
                except FileNotFoundError:
                    pass
            peak = max(peak, total)
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    h = hashlib.sha256()
    rnd = random.Random(4)
    try:
        with open(vault.mp / "stream.bin", "wb") as f:
            for _ in range(5 * budget // (256 * 1024)):
                block = rnd.randbytes(256 * 1024)
                h.update(block)
                f.write(block)
    finally:
        done.set()
        t.join()
    assert 0 < peak <= budget
    assert hashlib.sha256((vault.mp / "stream.bin").read_bytes()).digest() == h.digest()
    st = json.loads(vault.cli("status", "--json").stdout)
    assert st["mount"]["cache_budget"] == budget
    assert st["mount"]["cache_dirty_bytes"] <= budget


# -- (5) offline remotes -------------------------------------------------------------------------
def test_writes_work_with_every_remote_offline_and_go_out_when_back(tmp_path, s3_server) -> None:
    remotes = [s3_server.remote(f"bucket{i}") for i in range(3)]
    v = Vault(tmp_path, remotes=remotes)
    try:
        v.mount("--cache-size", "16M")
        s3_server.stop()
        data = random.Random(7).randbytes(3 * MiB)
        (v.mp / "offline.bin").write_bytes(data)
        res = v.cli("flush", "--json", check=False)  # stores and seals; remotes refuse
        assert res.returncode == 3, res.stdout + res.stderr
        rep = json.loads(res.stdout)
        assert rep["segments_below_k_placed"] > 0 and rep["errors"]
        st = v.status()
        assert sum(r["queued_objects"] for r in st["remotes"]) > 0
        assert st["segments_below_k_placed"] > 0 and st["survives_losses_now"] == 0
        assert (v.mp / "offline.bin").read_bytes() == data  # readable from the local queue
        s3_server.start()
        res = v.cli("flush", "--json")
        assert json.loads(res.stdout)["complete"]
        st = v.status()
        assert sum(r["queued_objects"] for r in st["remotes"]) == 0
        assert st["segments_below_k_placed"] == 0 and st["survives_losses_now"] == 1
    finally:
        v.cleanup()


# -- (2) pg_dump straight into the mount, restore from exactly k remotes -----------------------
@pytest.mark.pg
def test_pg_dump_into_the_mount_then_restore_from_k_remotes(vault: Vault, pg_server, tmp_path):
    dsn = pg_server.make_kb(2000, seed=11, dbname="mountkb")
    source = pg_server.table_checksums("mountkb")
    vault.mount("--cache-size", "16M")
    dumps = vault.mp / "dumps"
    dumps.mkdir()
    bin_dir = pg_server.bin_dir
    subprocess.run(
        [str(bin_dir / "pg_dump"), "-Fp", "-f", str(dumps / "kb.sql"), "-d", dsn], check=True
    )
    subprocess.run(
        [str(bin_dir / "pg_dump"), "-Fd", "-j", "2", "-f", str(dumps / "kbdir"), "-d", dsn],
        check=True,
    )
    size = (dumps / "kb.sql").stat().st_size
    snap = json.loads(vault.cli("snapshot", "--name", "pg", "--json").stdout)["snapshot"]
    assert (vault.mp / ".snapshots" / "pg" / "dumps" / "kb.sql").stat().st_size == size
    assert sorted(os.listdir(vault.mp / ".snapshots" / "pg" / "dumps" / "kbdir")) == sorted(
        os.listdir(dumps / "kbdir")
    )
    vault.umount()
    # disaster: no local state, one remote gone; restore from exactly k = 2 remotes
    shutil.rmtree(vault.remotes[1])
    empty_home = tmp_path / "empty-home"
    env = {**vault.env, "VAULTFS_HOME": str(empty_home)}
    out = tmp_path / "restored"
    keyfile = vault.home / "key.json"
    vault.cli(
        "restore", "--from", vault.remotes[0], "--from", vault.remotes[2], "--to", str(out),
        "--snapshot", snap, "--keyfile", str(keyfile), env=env,
    )  # fmt: skip
    assert (out / "dumps" / "kb.sql").stat().st_size == size
    pg_server.create_database("mountkb_plain")
    pg_server.psql_file("mountkb_plain", out / "dumps" / "kb.sql")
    assert pg_server.table_checksums("mountkb_plain") == source
    pg_server.create_database("mountkb_dir")
    subprocess.run(
        [str(bin_dir / "pg_restore"), "-j", "2", "-d", pg_server.dsn_for("mountkb_dir"),
         str(out / "dumps" / "kbdir")],
        check=True,
    )  # fmt: skip
    assert pg_server.table_checksums("mountkb_dir") == source
    for db in ("mountkb", "mountkb_plain", "mountkb_dir"):
        pg_server.drop_database(db)


# -- (6) restic with its repository inside the mount -------------------------------------------
def _make_tree(root: Path, seed: int) -> None:
    rnd = random.Random(seed)
    for i in range(12):
        d = root / f"dir{i % 4}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rand{i}.bin").write_bytes(rnd.randbytes(rnd.randrange(1, 400_000)))
        (d / f"text{i}.txt").write_text(f"line {i}\n" * rnd.randrange(1, 5000))
    (root / "empty").write_bytes(b"")


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic not installed")
def test_restic_repository_inside_the_mount(shared: Vault, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src, 21)
    env = {
        **os.environ,
        "RESTIC_PASSWORD": "restic-pass",
        "RESTIC_REPOSITORY": str(shared.mp / "restic-repo"),
        "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache"),
    }

    def restic(*args: str) -> None:
        subprocess.run(["restic", "--quiet", *args], env=env, check=True, timeout=300)

    restic("init")
    restic("backup", str(src))
    restic("check", "--read-data")
    out = tmp_path / "out"
    restic("restore", "latest", "--target", str(out))
    assert tree_digest(out / src.relative_to("/")) == tree_digest(src)


# -- (7) rsync -aHAX into the mount and through a snapshot ----------------------------------------
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync_preserves_everything_into_the_mount_and_snapshot(shared: Vault, tmp_path) -> None:
    src = tmp_path / "src"
    _make_tree(src, 22)
    os.symlink("dir0/sub0/text0.txt", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.link(src / "dir1" / "sub1" / "rand1.bin", src / "hardlink.bin")
    os.setxattr(src / "dir0" / "sub0" / "text0.txt", "user.origin", b"rsync test")
    os.setxattr(src / "dir1", "user.dir", b"on a directory")
    os.chmod(src / "dir2", 0o750)
    os.chmod(src / "empty", 0o600)
    os.utime(src / "empty", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    dst = shared.mp / "rsync"
    subprocess.run(["rsync", "-aHAX", f"{src}/", f"{dst}/"], check=True, timeout=300)

    def differences(target: Path) -> str:
        res = subprocess.run(
            ["rsync", "-aHAXc", "--dry-run", "--itemize-changes", f"{src}/", f"{target}/"],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        return res.stdout.strip()

    assert differences(dst) == ""
    assert (dst / "hardlink.bin").stat().st_ino == (
        dst / "dir1" / "sub1" / "rand1.bin"
    ).stat().st_ino
    shared.cli("snapshot", "--name", "rsync-snap")
    assert differences(shared.mp / ".snapshots" / "rsync-snap" / "rsync") == ""


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_odd_names_and_special_files_through_the_mount_snapshot_and_restore(
    shared: Vault, tmp_path: Path
) -> None:
    """rsync -aHAX of names that are not UTF-8 (and hold newlines), a fifo, a socket, devices
    (as root), a hard link and a non-UTF-8 xattr name; then snapshot and restore."""
    src = tmp_path / "odd"
    make_odd_tree(src)
    dst = shared.mp / "odd"
    subprocess.run(["rsync", "-aHAX", f"{src}/", f"{dst}/"], check=True, timeout=300)
    assert bytes_tree_digest(dst) == bytes_tree_digest(src)
    snap = json.loads(shared.cli("snapshot", "--name", "odd-snap", "--json").stdout)["snapshot"]
    view = shared.mp / ".snapshots" / "odd-snap" / "odd"
    assert bytes_tree_digest(view) == bytes_tree_digest(src)  # the lazy view shows them all
    assert stat.S_ISFIFO(os.lstat(bytes(view) + b"/caf\xe9/\xff\xfe/fifo\xfe").st_mode)
    out = tmp_path / "restored"
    shared.cli("restore", "--snapshot", snap, "--include", "odd", "--to", str(out))
    assert bytes_tree_digest(out / "odd") == bytes_tree_digest(src)
    listing = shared.cli("ls", "odd-snap", "odd", "--json").stdout
    paths = {bytes.fromhex(e["path_hex"]) for e in json.loads(listing) if "path_hex" in e}
    assert b"odd/caf\xe9/new\nline.txt" in paths and b"odd/sock\xe9" in paths


# -- scripts/bench's mount section must not rot ------------------------------------------------
@pytest.mark.pg
@pytest.mark.slow
def test_bench_mount_section_smoke(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared" / "datasets" / "make_kb.py").exists():
        pytest.skip("shared/datasets/make_kb.py is not beside the repo")
    out = tmp_path / "results"
    env = {
        **os.environ,
        "VAULTFS_BENCH_CACHE": str(tmp_path / "cache"),
        "VAULTFS_BENCH_SEQ_MB": "16",
    }
    cmd = [sys.executable, "-m", "bench", "--beliefs", "300", "--only", "mount"]
    cmd += ["--repeats", "1", "--out", str(out), "--workdir", str(tmp_path / "work")]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 1), res.stderr[-3000:]  # 1: a target missed on 300 rows
    (doc,) = [json.loads(f.read_text()) for f in out.glob("*.json")]
    sec = doc["sections"]["mount"]
    assert sec["error"] is None, sec["error"]
    names = {m["name"] for m in sec["metrics"]}
    assert "pg_dump -Fp into the mount / into a local dir (wall)" in names
    assert "restic backup, repository in the mount / on local disk (wall)" in names
    assert "null FUSE ceiling" in names
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts  # the section unmounted everything it mounted


def _synced_writer(mp: Path, rnd: random.Random, synced: dict, state: dict, lock, stop) -> None:
    """Rewrite, patch and create files through the mount, fsync'ing each change; record the
    content once fsync has returned. ``state['flux']`` names the file being changed."""
    try:
        while not stop.is_set():
            names = sorted(synced)
            ops = ["rewrite", "patch"] + (["new"] if len(names) < 8 else [])
            op = rnd.choice(ops if names else ["new"])
            name = f"f{len(names):03d}.bin" if op == "new" else rnd.choice(names)
            with lock:
                state["flux"] = name
            p = mp / "crash" / name
            if op == "patch":
                data = bytearray(synced[name])
                off = rnd.randrange(len(data) + 1)
                piece = rnd.randbytes(rnd.choice([1, 4096, 300_000, 1_100_000]))
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, piece, off)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if off > len(data):
                    data += bytes(off - len(data))
                data[off : off + len(piece)] = piece
                content = bytes(data)
            else:
                content = rnd.randbytes(rnd.choice([0, 1, 5000, 700_000, 1_100_000, 2_200_000]))
                fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, content)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)  # the new name is durable too
                finally:
                    os.close(dfd)
            with lock:
                synced[name] = content
                state["flux"] = None
                state["ops"][op] += 1
    except OSError as e:  # the daemon was killed under us
        state["error"] = e.errno


def test_kill9_at_random_moments_never_loses_fsynced_bytes(vault: Vault) -> None:
    """Seeded: several rounds of fsync'd writes, SIGKILL at a random moment (some while a
    segment's shards are being written to the queue), remount, compare every synced byte."""
    rnd = random.Random(20240607)
    vault.mount("--cache-size", "8M")
    (vault.mp / "crash").mkdir()
    synced: dict[str, bytes] = {}
    tmp_dir = vault.home / "queue" / "tmp"
    kinds = []
    ops = {"new": 0, "rewrite": 0, "patch": 0}  # fsync'd changes, over all rounds
    for round_no in range(5):
        state: dict = {"flux": None, "error": None, "ops": ops}
        lock = threading.Lock()
        stop = threading.Event()
        wrnd = random.Random(rnd.random())
        t = threading.Thread(
            target=_synced_writer, args=(vault.mp, wrnd, synced, state, lock, stop)
        )
        t.start()
        time.sleep(0.3)
        kind = rnd.choice(["sealing", "random"]) if round_no else "sealing"
        if kind == "sealing":  # wait for a shard being written into queue/tmp
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if os.listdir(tmp_dir):
                        break
                except FileNotFoundError:
                    pass
            else:
                kind = "sealing-missed"
        else:
            time.sleep(rnd.uniform(0.0, 3.0))
        kinds.append(kind)
        pid = vault.pid
        with lock:  # the writer is not between a returned fsync and its record
            os.kill(pid, signal.SIGKILL)
            flux = state["flux"]
        stop.set()
        t.join(30)
        assert not t.is_alive()
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(OSError) as e:
            os.listdir(vault.mp)
        assert e.value.errno == errno.ENOTCONN  # a dead mount, not an empty directory
        with pytest.raises(OSError):
            (vault.mp / "written-while-dead").write_bytes(b"x")
        vault.mount("--cache-size", "8M")  # recovers by itself: no fsck
        for name, content in sorted(synced.items()):
            if name == flux:
                continue  # changed after its last fsync: any state is allowed
            got = (vault.mp / "crash" / name).read_bytes()
            assert len(got) == len(content), (round_no, kind, name)
            assert got == content, (round_no, kind, name)
        if flux in synced:  # the file being changed must still be readable
            (vault.mp / "crash" / flux).read_bytes()
            # its content is now whatever survived: make that the reference again
            synced[flux] = (vault.mp / "crash" / flux).read_bytes()
        elif flux is not None and (vault.mp / "crash" / flux).exists():
            synced[flux] = (vault.mp / "crash" / flux).read_bytes()
    assert len(synced) >= 3 and "sealing" in kinds, kinds
    assert ops["rewrite"] >= 2 and ops["patch"] >= 2, ops
    res = vault.umount()
    assert "unmounted" in res.stdout
    vault.mount("--cache-size", "8M")
    for name, content in synced.items():
        assert (vault.mp / "crash" / name).read_bytes() == content
