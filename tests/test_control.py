"""The control socket trusted both ways (vaultfs/control.py): a private directory, the
client checking who serves, stale sockets replaced, malformed replies refused cleanly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from vaultfs import control

NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture
def rundir(monkeypatch: pytest.MonkeyPatch):
    """A short private runtime directory (pytest's own paths can exceed sun_path)."""
    xdg = Path(tempfile.mkdtemp(prefix="vx", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    yield xdg / "vaultfs"
    shutil.rmtree(xdg, ignore_errors=True)


def test_sockets_live_in_a_private_directory(rundir: Path, tmp_path: Path) -> None:
    addr = control.home_address(tmp_path / "home")
    assert Path(addr).parent == rundir
    assert (os.stat(rundir).st_mode & 0o777) == 0o700
    server = control.ControlServer([addr], lambda req: {"echo": req["cmd"]})
    try:
        assert os.stat(addr).st_mode & 0o777 == 0o600
        assert control.call(addr, {"cmd": "ping"}, timeout=5) == {"ok": True, "echo": "ping"}
    finally:
        server.close()
    assert not Path(addr).exists()
    assert control.call(addr, {"cmd": "ping"}, timeout=5) is None


def test_a_runtime_dir_others_can_write_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert control.run_dir() == tmp_path / "user" / ".cache" / "vaultfs" / "run"
    assert not (shared / "vaultfs").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's directory")
def test_a_control_directory_owned_by_another_user_is_refused(rundir: Path) -> None:
    rundir.mkdir(mode=0o700)
    os.chown(rundir, NOBODY, NOBODY)
    with pytest.raises(control.ControlError, match="not a directory private to this user"):
        control.home_address(Path("/nonexistent-home"))


def test_a_stale_socket_file_is_replaced(rundir: Path, tmp_path: Path) -> None:
    addr = control.home_address(tmp_path / "home")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(addr)  # a crashed daemon's socket: the file stays, nobody listens
    dead.close()
    assert control.call(addr, {"cmd": "ping"}, timeout=5) is None
    server = control.ControlServer([addr], lambda req: {"fresh": True})
    try:
        assert control.call(addr, {"cmd": "ping"}, timeout=5)["fresh"] is True
    finally:
        server.close()


def _serve_once(addr: str, reply: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(addr)
    s.listen(1)

    def answer() -> None:
        conn, _ = s.accept()
        conn.recv(65536)
        conn.sendall(reply)
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    return s


@pytest.mark.parametrize("reply", [b"[1, 2]\n", b"not json\n", b'{"ok": false, "code": "x"}\n'])
def test_a_malformed_reply_is_a_clear_error(rundir: Path, tmp_path: Path, reply: bytes) -> None:
    addr = control.home_address(tmp_path / "home")
    s = _serve_once(addr, reply)
    try:
        with pytest.raises(control.ControlError) as e:
            control.call(addr, {"cmd": "status"}, timeout=5)
        assert e.value.exit_code == 1
    finally:
        s.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or SYSTEM_PYTHON is None,
    reason="needs root, setpriv and a system python3 to run a squatter as nobody",
)
def test_the_client_refuses_a_server_of_another_user() -> None:
    """The old attack: another user listens where the client connects and answers "flushed".
    The client reads the server's credentials first and refuses without reading an answer."""
    where = Path(tempfile.mkdtemp(prefix="vx", dir="/tmp"))
    where.chmod(0o777)
    addr = str(where / "squat.sock")
    squatter = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind({addr!r}); s.listen(1); print("ready", flush=True)
        c, _ = s.accept(); c.recv(65536)
        c.sendall(b'{{"ok": true, "report": {{"complete": true}}}}\\n')
    """)
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + [SYSTEM_PYTHON, "-c", squatter],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(control.ControlError, match=f"served by uid {NOBODY}"):
            control.call(addr, {"cmd": "flush"}, timeout=5)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
        shutil.rmtree(where, ignore_errors=True)


def test_a_job_streams_progress_lines_only_to_a_client_that_asks(
    rundir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"progress": true``: the dispatch gets a callable that sends progress lines before
    the reply (at most one per PROGRESS_EVERY, and the one that reaches the total); a client
    that does not ask gets the reply alone, and its dispatch sees no callable."""
    monkeypatch.setattr(control, "PROGRESS_EVERY", 0.0)
    seen: list[object] = []

    def dispatch(req: dict) -> dict:
        tell = req.get("progress")
        seen.append(tell)
        if tell is not None:
            tell(0, None)
            tell(5, 10)
            tell(10, 10)
        return {"result": "done"}

    addr = control.home_address(tmp_path / "home")
    server = control.ControlServer([addr], dispatch)
    try:
        got: list[tuple[int, int | None]] = []
        reply = control.call(
            addr, {"cmd": "job"}, timeout=5, progress=lambda d, t: got.append((d, t))
        )
        assert reply == {"ok": True, "result": "done"}
        assert got == [(0, None), (5, 10), (10, 10)]
        assert control.call(addr, {"cmd": "job"}, timeout=5) == {"ok": True, "result": "done"}
        assert seen[1] is None  # not asked: nothing sent, nothing to call
    finally:
        server.close()
    monkeypatch.setattr(control, "PROGRESS_EVERY", 60.0)
    lines: list[bytes] = []

    class Sink:
        def write(self, b: bytes) -> None:
            lines.append(b)

    tell = control._Progress(Sink())
    for i in range(1, 101):
        tell(i, 100)
    assert len(lines) == 2 and b'"done": 100' in lines[-1]  # the first, then the last only
