"""Every process a vaultfs process starts ends with it, also after ``kill -9``
(docs/operations.md, "Processes and tuning"): here the clean worker pool the mount daemon's
maintenance thread uses for rebuilds (multiprocessing's forkserver and its workers).

Also: a client whose mount daemon closes the control connection without an answer exits
with the documented code for it, not 1 ("a bug").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vaultfs import control
from vaultfs.errors import EXIT_DAEMON_GONE

# A process like the mount daemon: a long-lived non-main thread (its maintenance thread)
# opens a clean pool at nice 10, as repair does for `remote replace` while mounted, and keeps
# it while the test kills the process.
_SCRIPT = """
import os, sys, threading
from vaultfs.sealer import worker_pool

def maintenance():
    with worker_pool(2, os.getpid, (), nice=10, clean=True) as pool:
        pids = {f.result() for f in [pool.submit(os.getpid) for _ in range(16)]}
        print("ready", len(pids), flush=True)
        threading.Event().wait()

t = threading.Thread(target=maintenance, name="vaultfs-maintenance")
t.start()
t.join()
"""


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            out[int(d)] = int(fields[1])
    return out


def _descendants(root: int) -> set[int]:
    ppids = _ppids()
    found, grew = {root}, True
    while grew:
        more = {p for p, pp in ppids.items() if pp in found} - found
        grew = bool(more)
        found |= more
    return found - {root}


def _alive(pids: set[int]) -> set[int]:
    return pids & set(_ppids())


def test_clean_pool_dies_with_a_killed_parent():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    )
    children: set[int] = set()
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        children = _descendants(proc.pid)
        # the forkserver and at least one worker under it (and multiprocessing's tracker)
        assert len(children) >= 2, children
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # bounded: the kernel delivers the death signals at once; a leak never ends
        deadline = time.monotonic() + 60
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in _alive(children)}
        assert not left, f"outlived their killed parent: {left}"
    finally:
        for pid in _alive(children):  # only the processes this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_a_daemon_that_hangs_up_is_a_documented_exit_code(tmp_path):
    """The daemon dying mid-request (kill -9, a crash) closes the connection unanswered."""
    address = str(tmp_path / "ctl")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(address)
    srv.listen(1)

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        try:
            control.call(address, {"cmd": "status"})
        except control.ControlError as e:
            err = e
        else:
            raise AssertionError("a hung-up connection was taken for an answer")
    finally:
        t.join()
        srv.close()
    assert err.exit_code == EXIT_DAEMON_GONE != 1
    assert "mount.log" in err.message and "vaultfs mount" in err.message
