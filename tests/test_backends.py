"""The backend conformance suite: every implementation of `Backend` keeps the same contract.

Backends under test: a local directory through the rclone command and through the rclone
daemon, the in-memory backend, and `rclone serve s3`, `sftp` and `webdav` on 127.0.0.1
(through the daemon, as the engine reaches them, and s3 through the fail-fast command, as
audits do). Then the wrappers (Retrying, Metered, FaultInjecting), the one error
classification and the factory that stacks them.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RcloneServer, S3Server, SftpServer, WebdavServer, rclone_path

from vaultfs.backends import (
    Backend,
    FaultInjecting,
    MemoryBackend,
    Metered,
    Pace,
    Paced,
    Paces,
    Retrying,
    open_backend,
    stack,
)
from vaultfs.errors import (
    BadRemote,
    IntegrityError,
    ObjectMissing,
    RemoteError,
    RootMissing,
    Unreachable,
    VaultError,
)
from vaultfs.remotes import RcloneCommand, RcloneDaemon, RcloneRc, classify

SERVERS: dict[str, type[RcloneServer]] = {
    "s3": S3Server,
    "sftp": SftpServer,
    "webdav": WebdavServer,
}
KINDS = ["local-command", "local-daemon", "memory", "s3", "s3-command", "sftp", "webdav"]
_fresh = itertools.count()


class _Servers(dict):
    """protocol -> server, each started on first use."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base

    def __missing__(self, proto: str) -> RcloneServer:
        srv = self[proto] = SERVERS[proto](self.base / proto, rclone_path())
        return srv


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Servers]:
    """One server per protocol for the whole module."""
    running = _Servers(tmp_path_factory.mktemp("servers"))
    try:
        yield running
    finally:
        for srv in running.values():
            srv.stop()


def _make(kind: str, tmp_path: Path, servers: dict[str, RcloneServer]) -> Backend:
    """A fresh, empty remote of ``kind`` (its root does not exist yet)."""
    n = next(_fresh)
    if kind == "memory":
        return MemoryBackend(f"m{n}")
    if kind == "local-command":
        return RcloneCommand(str(tmp_path / "remote"))
    if kind == "local-daemon":
        return RcloneRc(str(tmp_path / "remote"))
    proto, _, how = kind.partition("-")
    spec = servers[proto].remote(f"bucket/t{n}" if proto == "s3" else f"t{n}")
    if how == "command":
        return RcloneCommand(spec, op_timeout=300)
    return RcloneRc(spec)


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, servers) -> Backend:
    if request.param != "memory" and not request.param.endswith("command"):
        if RcloneDaemon.get() is None:
            pytest.skip("the rclone daemon cannot start here")
    b = _make(request.param, tmp_path, servers)
    b.ensure()
    return b


# -- the contract, on every backend -------------------------------------------------------------
def test_empty_and_missing_folders_list_empty(backend: Backend) -> None:
    assert backend.list("data") == [] and backend.list_sizes("data") == {}
    assert backend.list("no/such/folder") == [] and backend.list_sizes("nothing") == {}
    assert backend.list_tree() == {"data": {}, "meta": {}, "manifests": {}}
    assert backend.list_tree(("data",)) == {"data": {}}
    backend.ensure()  # idempotent


def test_put_then_list(backend: Backend, tmp_path: Path) -> None:
    backend.put_bytes("data", "a" * 32, b"x" * 1000)
    f = tmp_path / "file"
    f.write_bytes(b"y" * 300)
    backend.put_file(f, "meta", "b" * 32)
    backend.put_bytes("manifests", "1-ab", b"m")
    backend.put_bytes("data", "a" * 32, b"x" * 1000)  # the same write again: idempotent
    assert backend.list("data") == ["a" * 32]
    assert backend.list_sizes("meta") == {"b" * 32: 300}
    assert backend.list_tree() == {
        "data": {"a" * 32: 1000},
        "meta": {"b" * 32: 300},
        "manifests": {"1-ab": 1},
    }
    assert backend.list_tree(("meta",)) == {"meta": {"b" * 32: 300}}


def test_cat_whole_ranged_and_past_the_end(backend: Backend) -> None:
    body = bytes(range(256)) * 40  # 10240 bytes
    backend.put_bytes("data", "obj", body)
    assert backend.cat("data", "obj") == body
    assert backend.cat("data", "obj", 100, 50) == body[100:150]
    assert backend.cat("data", "obj", 10000) == body[10000:]
    assert backend.cat("data", "obj", 0, 10) == body[:10]
    assert backend.cat("data", "obj", 10200, 100) == body[10200:]  # short object: short read
    assert backend.cat("data", "obj", len(body), 10) == b""  # from the end on: nothing


def test_cat_of_an_absent_object_is_object_missing(backend: Backend) -> None:
    with pytest.raises(ObjectMissing):
        backend.cat("data", "absent")
    with pytest.raises(ObjectMissing):
        backend.cat("nofolder", "absent", 0, 10)


def test_get_skips_absent_names(backend: Backend, tmp_path: Path) -> None:
    backend.put_bytes("data", "one", b"1" * 10)
    backend.put_bytes("manifests", "2-x", b"m2")
    out = tmp_path / "out"
    backend.get("data", ["one", "absent"], out)
    assert (
        sorted(p.name for p in out.iterdir()) == ["one"] and (out / "one").read_bytes() == b"1" * 10
    )
    backend.get("", ["data/one", "meta/absent"], tmp_path / "paths")  # names with a folder
    assert (tmp_path / "paths" / "data" / "one").read_bytes() == b"1" * 10
    backend.get("data", [], tmp_path / "none")
    backend.get_dir("manifests", tmp_path / "mans")
    assert (tmp_path / "mans" / "2-x").read_bytes() == b"m2"
    backend.get_dir("nothing", tmp_path / "empty")  # a missing folder: nothing, no error
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_delete_is_idempotent(backend: Backend) -> None:
    for n in ("a", "b", "c"):
        backend.put_bytes("data", n, n.encode())
    backend.delete("data", ["a", "absent"])
    backend.delete("data", ["a", "absent"])  # again: nothing left to do, no error
    backend.delete("", ["data/b"])  # a name with its folder
    backend.delete("nofolder", ["x"])
    backend.delete("data", [])
    assert backend.list("data") == ["c"]


def test_move_dir_uploads_then_removes_local_files(backend: Backend, tmp_path: Path) -> None:
    q = tmp_path / "queue"
    (q / "data").mkdir(parents=True)
    (q / "meta").mkdir()
    (q / "data" / "d1").write_bytes(b"d" * 100)
    (q / "meta" / "m1").write_bytes(b"m" * 50)
    backend.move_dir(q, "")
    assert not [p for p in q.rglob("*") if p.is_file()]
    # a retry after a partial move: what was sent is gone locally, the rest goes now
    (q / "data" / "d2").write_bytes(b"e" * 7)
    backend.move_dir(q, "")
    assert not [p for p in q.rglob("*") if p.is_file()]
    assert backend.list_tree(("data", "meta")) == {"data": {"d1": 100, "d2": 7}, "meta": {"m1": 50}}
    with pytest.raises(ObjectMissing):
        backend.move_dir(tmp_path / "no-such-dir", "")


def test_local_dir_is_set_for_plain_directories_only(backend: Backend, tmp_path: Path) -> None:
    local = backend.local_dir
    if backend.spec == str(tmp_path / "remote"):
        assert local == tmp_path / "remote" and backend.label == backend.spec
        backend.put_bytes("data", "x", b"abc")
        assert (local / "data" / "x").read_bytes() == b"abc"  # what a restore reads in place
    else:
        assert local is None
    assert "secret" not in backend.label and "pass=" not in backend.label


# -- outages ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "s3-command", "sftp", "webdav"])
def test_a_stopped_server_is_unreachable_fast(kind: str, tmp_path: Path, servers) -> None:
    b = _make(kind, tmp_path, servers)
    b.ensure()
    b.put_bytes("data", "obj", b"z" * 10)
    srv = servers[kind.partition("-")[0]]
    srv.stop()
    try:
        for op in (lambda: b.list_sizes("data"), lambda: b.cat("data", "obj", 0, 5)):
            t0 = time.monotonic()
            with pytest.raises(Unreachable):
                op()
            assert time.monotonic() - t0 < 20
    finally:
        srv.start()
    assert b.cat("data", "obj") == b"z" * 10  # the data was intact all along


# -- wrappers -----------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "local-command"])
def plain(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    b = _make(request.param, tmp_path, {})
    b.ensure()
    b.put_bytes("data", "obj", b"x" * 5000)
    return b


def test_retrying_retries_outages_with_backoff_not_answers(plain: Backend) -> None:
    slept: list[float] = []
    flaky = FaultInjecting(plain, unavailable=2)
    b = Retrying(flaky, attempts=3, base_delay=0.2, sleep=slept.append)
    assert b.list_tree()["data"] == {"obj": 5000}
    assert flaky.injected == 2 and b.retries == 2 and len(slept) == 2
    assert 0.1 <= slept[0] <= 0.2 and 0.2 <= slept[1] <= 0.4  # exponential, jittered
    down = Retrying(FaultInjecting(plain, unavailable=10), sleep=slept.append)
    with pytest.raises(Unreachable, match="503"):
        down.cat("data", "obj", 0, 10)
    assert down.retries == 2  # bounded: three attempts in all
    slept.clear()
    with pytest.raises(ObjectMissing):
        b.cat("data", "absent", 0, 10)
    assert slept == [] and b.retries == 2  # an answer, not an outage: never retried
    assert b.cat("data", "obj", 4990, 100) == b"x" * 10


def test_retrying_never_retries_a_bad_spec() -> None:
    calls = []

    class Bad(MemoryBackend):
        def list(self, sub: str) -> list[str]:
            calls.append(sub)
            raise BadRemote("rclone rejected remote x: parse error")

    b = Retrying(Bad(), sleep=lambda s: None)
    with pytest.raises(BadRemote):
        b.list("data")
    assert calls == ["data"]


def test_metered_counts_calls_and_bytes_read(plain: Backend, tmp_path: Path) -> None:
    m = Metered(plain)
    assert m.cat("data", "obj", 0, 100) == b"x" * 100
    m.get("data", ["obj", "absent"], tmp_path / "g")
    m.list("data")
    assert m.bytes_read == 5100 and m.calls == 3
    assert (m.spec, m.rid, m.label, m.local_dir) == (
        plain.spec,
        plain.rid,
        plain.label,
        plain.local_dir,
    )


def test_fault_injection_stays_within_its_budgets(plain: Backend) -> None:
    f = FaultInjecting(plain, wrong_ranges=2, unavailable=1)
    with pytest.raises(Unreachable):
        f.list("data")
    assert f.list("data") == ["obj"]  # the outage budget is spent
    assert f.cat("data", "obj") == b"x" * 5000  # whole reads are never lied about
    lies = [f.cat("data", "obj", 10, 100) for _ in range(3)]
    assert [d == b"x" * 100 for d in lies] == [False, False, True]  # two lies, then the truth
    assert all(len(d) == 100 for d in lies)
    assert f.injected == 3 and f.lied_about == ["obj", "obj"]


def test_fault_injection_delays_every_call(plain: Backend) -> None:
    f = FaultInjecting(plain, delay=0.05)
    t0 = time.monotonic()
    f.list("data")
    f.cat("data", "obj", 0, 1)
    assert time.monotonic() - t0 >= 0.1


def test_memory_backend_is_thread_safe() -> None:
    b = MemoryBackend()

    def writer(i: int) -> None:
        for j in range(200):
            b.put_bytes("data", f"{i}-{j}", bytes([i]) * j)
            b.list("data")
        b.delete("data", [f"{i}-{j}" for j in range(0, 200, 2)])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(b.list_sizes("data")) == 400 and b.cat("data", "3-7") == b"\x03" * 7


# -- one classification, one factory --------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "kw", "cls"),
    [
        ("s3: 429 Too Many Requests", {}, Unreachable),
        ("SlowDown: please reduce rate", {}, Unreachable),
        ("503 Service Unavailable", {}, Unreachable),
        ("dial tcp: connection refused", {}, Unreachable),
        ('error listing "data": connection lost', {}, Unreachable),
        ("rclone rcd unreachable: no socket", {"http_status": 0}, Unreachable),
        ("NoSuchKey: object not found", {}, ObjectMissing),
        ("directory not found", {"exit_code": 3}, ObjectMissing),
        ("something gone", {"http_status": 404}, ObjectMissing),
        ("something gone", {"exit_code": 4}, ObjectMissing),
        ("didn't find section in config file", {}, BadRemote),
        ("fatal error", {"earlier": "didn't find section in config file"}, BadRemote),
        ("permission denied", {}, RemoteError),
        ("permission denied", {"http_status": 500, "exit_code": 1}, RemoteError),
    ],
)
def test_one_classification_of_rclone_errors(message: str, kw: dict, cls: type) -> None:
    err = classify("lbl", "read x", message, **kw)
    assert type(err) is cls and "lbl" in err.message and message in err.message


def test_exit_codes_live_in_errors_and_keep_integrity_apart() -> None:
    assert issubclass(ObjectMissing, RemoteError) and issubclass(Unreachable, RemoteError)
    assert ObjectMissing.exit_code == Unreachable.exit_code == RemoteError.exit_code == 11
    assert ObjectMissing.exit_code != IntegrityError.exit_code
    assert issubclass(BadRemote, VaultError) and BadRemote.exit_code == 14


def _chain(b: object) -> list[str]:
    names = []
    while True:
        names.append(type(b).__name__)
        if not hasattr(b, "inner"):
            return names
        b = b.inner  # type: ignore[attr-defined]


def test_open_backend_stacks_every_path_the_same_way(tmp_path: Path, monkeypatch) -> None:
    spec = str(tmp_path / "r")
    base = "RcloneRc" if RcloneDaemon.get() is not None else "RcloneCommand"
    assert _chain(open_backend(spec, 3)) == ["Metered", "Retrying", "Paced", "LocalRoot", base]
    assert _chain(open_backend("b2:bucket/v")) == ["Metered", "Retrying", "Paced", base]
    audit = open_backend(spec, 3, fail_fast=True, wrap=lambda b: FaultInjecting(b))
    assert _chain(audit) == [
        "Metered", "Retrying", "Paced", "LocalRoot", "FaultInjecting", "RcloneCommand"
    ]  # fmt: skip
    assert audit.rid == 3 and audit.inner.inner.inner.inner.inner.op_timeout == 300
    monkeypatch.setenv("VAULTFS_RCD", "0")
    assert _chain(open_backend(spec)) == [
        "Metered", "Retrying", "Paced", "LocalRoot", "RcloneCommand"
    ]  # fmt: skip
    assert _chain(stack(MemoryBackend())) == ["Metered", "Retrying", "Paced", "MemoryBackend"]
    with pytest.raises(BadRemote):
        open_backend("  ")
    with pytest.raises(BadRemote, match="rejected"):
        open_backend("nosuchremote:bucket").ensure()


def test_a_local_remote_whose_directory_is_missing_is_down_and_never_recreated(
    tmp_path: Path,
) -> None:
    """A local-directory remote whose directory is gone (a disk unplugged): every operation,
    writes and listings alike, raises RootMissing (an Unreachable) at once, with no retry
    and without the directory coming back; only ``ensure`` (init, remote add, remote
    replace) makes it. Back, it is an ordinary remote again."""
    root = tmp_path / "usb" / "vault"
    b = open_backend(str(root), 1)
    b.ensure()
    b.put_bytes("data", "a", b"x")
    root.rename(tmp_path / "usb" / "away")
    for op in (
        lambda: b.put_bytes("data", "b", b"y"),
        lambda: b.put_file(tmp_path / "usb" / "away" / "data" / "a", "data", "c"),
        lambda: b.list_tree(),
        lambda: b.cat("data", "a"),
        lambda: b.delete("data", ["a"]),
    ):
        with pytest.raises(RootMissing, match="directory missing .a disk unplugged"):
            op()
    assert not root.exists() and b.inner.retries == 0
    assert isinstance(RootMissing("x"), Unreachable)
    (tmp_path / "usb" / "away").rename(root)
    b.put_bytes("data", "b", b"y")
    assert b.list("data") == ["a", "b"]


def test_a_throttling_remote_is_paced_as_a_whole() -> None:
    """429/503 halve the remote's concurrency and pause every caller (growing while it goes
    on); successes win the concurrency back. Fast unit tier: a memory remote that answers
    503 on purpose, the pauses recorded instead of slept."""
    slept: list[float] = []
    now = [0.0]
    pace = Pace(start=8, pause=0.5, sleep=slept.append, clock=lambda: now[0])
    mem = MemoryBackend("paced")
    mem.put_bytes("data", "x", b"abc")
    flaky = FaultInjecting(mem, unavailable=2)
    b = Retrying(Paced(flaky, pace), attempts=3, base_delay=0.01, sleep=lambda s: None)
    assert b.cat("data", "x") == b"abc"  # two 503s, then the answer
    assert pace.throttles == 2 and flaky.injected == 2
    assert pace.limit < 8 / 2  # halved twice, then one success added a little
    assert slept == [0.5, 1.0]  # the second and third attempts waited out growing pauses
    assert pace.pause == 0.5 and pace.active == 0  # a success resets the pause
    before = pace.limit
    for _ in range(20):
        b.cat("data", "x")
    assert pace.limit > before  # additive increase
    # an outage that is not throttling does not pace the remote

    class Refusing(MemoryBackend):
        def list(self, sub: str) -> list[str]:
            raise Unreachable(f"{self.label}: list failed: connection refused")

    with pytest.raises(Unreachable):
        Paced(Refusing("paced"), pace).list("data")
    assert pace.throttles == 2 and pace.active == 0
    # one pace per remote and owner; another owner (a fresh vault) has its own
    mine, other = Paces(), Paces()
    assert mine.get("memory:paced") is mine.get("memory:paced")
    assert mine.get("memory:paced") is not other.get("memory:paced")
    assert Paced(mem).pace is not Paced(mem).pace  # no owner: a pace of its own


def test_throttling_is_read_from_rclones_words_not_from_names_or_ports() -> None:
    """Only the provider's own answer (429, 503, SlowDown) makes a throttle; the digits of a
    port or of a hex object name in the same message never do."""
    name = "ab503f429c" + "0" * 54
    for msg in ("s3: 429 Too Many Requests", "SlowDown: please reduce rate", "503 x"):
        err = classify(":s3:…:bkt", f"cat data/{name}", msg)
        assert isinstance(err, Unreachable) and err.throttled, msg
    refused = f'Get "http://127.0.0.1:35031/bkt/data/{name}": dial tcp: connection refused'
    err = classify(":s3:…:bkt-429", f"cat data/{name}", refused)
    assert isinstance(err, Unreachable) and not err.throttled


class _Boom(BaseException):
    """Stands for an interruption outside the error hierarchy (Ctrl-C, a test's timeout)."""


def test_a_slot_is_freed_on_every_path_and_no_wait_is_endless() -> None:
    """Fast unit tier, on a memory remote. A slot is freed when the operation returns,
    raises, or is interrupted during the throttling pause; a wait for a slot held by
    operations stuck on a remote that stopped answering ends in a clear Unreachable; closing
    the pace's owner wakes a waiter with an error instead of leaving it blocked."""
    mem = MemoryBackend("stuck")
    mem.put_bytes("data", "x", b"abc")

    def interrupt(_s: float) -> None:
        raise _Boom

    pace = Pace(start=2, sleep=interrupt)
    pace.throttled()  # the next operations wait out a pause, which is interrupted
    with pytest.raises(_Boom):
        Paced(mem, pace).cat("data", "x")
    assert pace.active == 0

    class Broken(MemoryBackend):
        def list(self, sub: str) -> list[str]:
            raise _Boom

    pace = Pace(start=1)
    with pytest.raises(_Boom):
        Paced(Broken("stuck"), pace).list("data")
    assert pace.active == 0
    assert Paced(mem, pace).cat("data", "x") == b"abc" and pace.active == 0

    # two slots, both held by operations on a remote that stopped answering
    gate = threading.Event()
    paces = Paces(start=2, max_wait=0.2)  # the registry a vault keeps
    pace = paces.get(mem.spec)
    stalled = Paced(FaultInjecting(mem, stall=gate), pace)
    held = [threading.Thread(target=stalled.cat, args=("data", "x")) for _ in range(2)]
    for t in held:
        t.start()
    while pace.active < 2:
        time.sleep(0.01)
    with pytest.raises(Unreachable, match="stopped answering"):
        Paced(mem, pace).cat("data", "x")
    pace.max_wait = 3600.0  # a retry finds the remote stuck still: it fails at once
    with pytest.raises(Unreachable, match="stopped answering"):
        Paced(mem, pace).cat("data", "x")
    # the owner closes: a waiter on another of its remotes, held the same way, is woken
    # with an error, not left blocked
    mem2 = MemoryBackend("stuck2")
    mem2.put_bytes("data", "x", b"abc")
    pace2 = paces.get(mem2.spec)
    pace2.max_wait = 3600.0
    stalled2 = Paced(FaultInjecting(mem2, stall=gate), pace2)
    held2 = [threading.Thread(target=stalled2.cat, args=("data", "x")) for _ in range(2)]
    for t in held2:
        t.start()
    while pace2.active < 2:
        time.sleep(0.01)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            Paced(mem2, pace2).cat("data", "x")
        except Unreachable as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    while not pace2.waiting:
        time.sleep(0.01)
    paces.close()
    waiter.join()
    assert len(errors) == 1 and "closed" in errors[0].message
    assert paces.get(mem.spec).closed and not Paces().get(mem.spec).closed
    gate.set()  # the abandoned operations end into the closed paces
    for t in held + held2:
        t.join()
    assert pace.active == pace2.active == 0


def test_daemon_dir_of_a_killed_process_is_swept() -> None:
    """A process killed with SIGKILL leaves its rclone daemon directory (no atexit); the
    next process that starts a daemon removes it, and never a live process's."""
    code = (
        "import sys, time; from vaultfs.remotes import RcloneDaemon; d = RcloneDaemon.get();"
        "print(d.dir if d else '', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(child.stdout.readline().strip())  # type: ignore[union-attr]
        if not str(left) or str(left) == ".":
            pytest.skip("the rclone daemon cannot start here")
        live = Path(tempfile.mkdtemp(prefix=f"vaultfs-rcd-{os.getpid()}-"))  # ours: alive
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    assert left.is_dir()  # SIGKILL ran no cleanup
    RcloneDaemon.shutdown()
    try:
        assert RcloneDaemon.get() is not None
        assert not left.exists()
        assert live.is_dir()
    finally:
        live.rmdir()


def test_a_daemon_started_ahead_is_the_one_every_caller_gets(monkeypatch) -> None:
    """RcloneDaemon.starting (the command line starts rclone while the keyfile unlocks): a
    get() inside the block waits for the start under way instead of beginning a second
    daemon; the starting thread has ended when the block does (a sealer fork after it
    inherits no thread); with a daemon running, or VAULTFS_RCD=0, nothing is started."""
    from vaultfs.remotes import RCD_PREFIX

    def starters() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "vaultfs-rcd-start"]

    def dirs() -> list[Path]:
        return list(Path(tempfile.gettempdir()).glob(f"{RCD_PREFIX}{os.getpid()}-*"))

    RcloneDaemon.shutdown()
    try:
        with RcloneDaemon.starting():
            ahead = starters()
            d = RcloneDaemon.get()
        if d is None:
            pytest.skip("the rclone daemon cannot start here")
        assert ahead and not any(t.is_alive() for t in ahead)
        assert RcloneDaemon.get() is d and d.alive() and len(dirs()) == 1
        with RcloneDaemon.starting():
            assert not starters()
        assert RcloneDaemon.get() is d
    finally:
        RcloneDaemon.shutdown()
    assert not dirs()
    monkeypatch.setenv("VAULTFS_RCD", "0")
    with RcloneDaemon.starting():
        assert not starters()
    assert RcloneDaemon.get() is None and not dirs()


def test_a_restore_from_remotes_starts_the_daemon_before_its_imports(monkeypatch) -> None:
    """cli/early.py starts the rclone daemon for `restore --from` (whose first step lists
    the remotes) on a thread while the command line still imports (RcloneDaemon.start_ahead):
    the command's get() returns that daemon, never a second one. Other commands, a restore
    from the home and `--help` start none there."""
    from cli import early
    from vaultfs.remotes import RCD_PREFIX

    for name in (*early.SECRETS, "VAULTFS_PASSPHRASE_FD"):
        monkeypatch.delenv(name, raising=False)
    # --seed-file: nothing to unlock, so only the daemon's start is exercised
    argv = ["vaultfs", "restore", "--from", "remote:v", "--to", "out", "--seed-file", "s"]
    RcloneDaemon.shutdown()
    try:
        early.start(argv)
        ahead = [t for t in threading.enumerate() if t.name == "vaultfs-rcd-start"]
        d = RcloneDaemon.get()
        if d is None:
            pytest.skip("the rclone daemon cannot start here")
        for t in ahead:
            t.join()
        assert ahead and RcloneDaemon.get() is d and d.alive()
        assert len(list(Path(tempfile.gettempdir()).glob(f"{RCD_PREFIX}{os.getpid()}-*"))) == 1
    finally:
        RcloneDaemon.shutdown()
    started: list[int] = []
    monkeypatch.setattr(RcloneDaemon, "start_ahead", lambda: started.append(1))
    for other in (
        ["vaultfs", "restore", "--from", "remote:v", "--help"],
        ["vaultfs", "restore", "--to", "out", "--seed-file", "s"],
        ["vaultfs", "verify", "--from", "remote:v", "--seed-file", "s"],
    ):
        early.start(other)
    assert not started
    early.start(["vaultfs", "restore", "--from=remote:v", "--seed-file", "s"])
    assert started == [1]
