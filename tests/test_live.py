"""Every maintenance command on a live mount, through a real FUSE mount, while a writer works
in the mount in a loop: verify, repair of a remote whose directory was deleted, forget
--prune (which frees bytes on every remote), remote replace, keys rotate beside a real
``pg_dump`` of the embedded Postgres writing into the mount (issue 15); reencrypt and remote
add/remove beside a file copy; a client interrupted by Ctrl-C leaves the daemon serving. The
last written file restores byte-identical from k remotes after umount (the dump also into a
fresh database, the same rows as the source). Skips where /dev/fuse is missing; every test
unmounts, also when it fails. The unit tier: tests/test_maintenance.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    PgServer,
    init_local_vault,
    mounted_vault,
    needs_fuse,
    progress_bars,
    run_cli,
    stderr_on_a_terminal,
    unmount,
    vaultfs_env,
)

pytestmark = needs_fuse

SIZE = 1024 * 1024 + 17


class Writer(threading.Thread):
    """Copies a fresh version of ``big.bin`` into the mount until stopped; ``last`` is the
    content of the newest complete copy, ``rounds`` how many were written."""

    NAME = "big.bin"

    def __init__(self, mp: Path) -> None:
        super().__init__(name="test-writer", daemon=True)
        self.mp = mp
        self.stop = threading.Event()
        self.last: bytes | None = None
        self.rounds = 0
        self.error: BaseException | None = None

    def write(self, tmp: Path) -> bytes:
        """Write one version to ``tmp`` in the mount; return its content."""
        data = os.urandom(SIZE)
        with open(tmp, "wb") as f:
            for i in range(0, len(data), 256 * 1024):
                f.write(data[i : i + 256 * 1024])
        return data

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                tmp = self.mp / f"{self.NAME}.tmp"
                data = self.write(tmp)
                os.replace(tmp, self.mp / self.NAME)
                self.last = data
                self.rounds += 1
                self.stop.wait(0.2)  # the vault grows by every version: keep the test short
        except BaseException as e:  # reported by the test
            self.error = e

    def wait_rounds(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` versions are complete; fail on the writer's error or a stall."""
        deadline = time.monotonic() + timeout
        while self.rounds < n and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.error is None, self.error
        assert self.rounds >= n, "the writer made no progress"


class PgDumpWriter(Writer):
    """``pg_dump -Fp`` of database ``db`` of the embedded Postgres straight into the mount as
    ``kb.sql``, again and again; ``last`` is the newest complete dump as the mount reads it
    back (the same database each time, so every version has the same rows)."""

    NAME = "kb.sql"

    def __init__(self, mp: Path, pg: PgServer, db: str) -> None:
        super().__init__(mp)
        self.pg, self.db = pg, db

    def write(self, tmp: Path) -> bytes:
        self.pg.pg_dump(self.db, tmp)
        return tmp.read_bytes()


def _listing(remote: Path) -> dict[str, int]:
    return {str(p.relative_to(remote)): p.stat().st_size for p in remote.rglob("*") if p.is_file()}


def _json(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout)


def _beside_writer(*args: str, home: Path) -> subprocess.CompletedProcess:
    """A command that uploads while the writer runs: exit 3 only says that segments the
    writer sealed meanwhile are not yet on every remote (or on k)."""
    res = run_cli(*args, home=home, check=None)
    assert res.returncode in (0, 3), (res.stdout, res.stderr)
    return res


@pytest.fixture
def live(tmp_path):
    """(home, mountpoint, remotes) of a mounted 2-of-3 vault over three local remotes."""
    with mounted_vault(tmp_path) as vault:
        yield vault


def test_maintenance_on_a_live_mount_while_pg_dump_writes(live, tmp_path, pg_server) -> None:
    home, mp, remotes = live
    pg_server.make_kb(1500, seed=13, dbname="kb_live")
    source = pg_server.table_checksums("kb_live")
    writer = PgDumpWriter(mp, pg_server, "kb_live")
    writer.start()
    try:
        writer.wait_rounds(2)
        _beside_writer("flush", home=home)

        # verify: the same report and exit code as unmounted, run by the daemon
        rep = _json(run_cli("verify", "--sample", "5", "--json", home=home))
        assert rep["clean"] and {r["remote"] for r in rep["remotes"]} == {str(r) for r in remotes}
        human = run_cli("verify", "--sample", "5", home=home).stdout.decode()
        assert "all audited remotes are clean" in human

        # repair of a remote whose disk was replaced by a new, empty one at its path
        shutil.rmtree(remotes[1])
        remotes[1].mkdir()
        rep = _json(_beside_writer("repair", "--json", home=home))
        assert rep["rebuilt"] > 0 and not rep["unrecoverable"], rep
        assert _json(run_cli("verify", "--sample", "5", "--json", home=home))["clean"]

        # forget + prune: a file only old snapshots hold is freed on every remote
        (mp / "junk.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        _beside_writer("snapshot", "--name", "with-junk", home=home)
        (mp / "junk.bin").unlink()
        _beside_writer("snapshot", "--name", "without-junk", home=home)
        before = [_listing(r) for r in remotes]
        rep = _json(_beside_writer("forget", "--keep-last", "1", "--prune", "--json", home=home))
        assert [s["name"] for s in rep["forget"]] == ["with-junk"]
        pruned = rep["prune"]
        assert pruned["bytes_freed"] >= 4 * 1024 * 1024 and not pruned["garbage_left"]
        for r, old in zip(remotes, before, strict=True):
            now = _listing(r)
            gone = sum(size for name, size in old.items() if name not in now)
            # shards the writer's segments had still queued at `before` are not in `gone`
            assert pruned["freed_per_remote"][str(r)] > 0 and gone > 0, (r, pruned, gone)

        # remote replace: the old remote's shards are rebuilt onto the new one
        new = tmp_path / "r3"
        rep = _json(
            _beside_writer("remote", "replace", str(remotes[2]), str(new), "--json", home=home)
        )
        assert rep["rebuilt"] > 0 and not rep["unrecoverable"], rep
        remotes[2] = new

        rep = _json(run_cli("keys", "rotate", "--json", home=home))
        assert rep["epoch"] == 1  # the first rotation (epoch 0 came with init)

        # Ctrl-C of a client: the daemon finishes the job and serves the next one
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "verify", "--sample", "20"],
            env=vaultfs_env(home),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            st: dict = {}
            for _ in range(600):  # until the daemon runs it (or it already ended)
                st = _json(run_cli("status", "--json", home=home))
                if st["mount"]["maintenance"] or proc.poll() is not None:
                    break
                time.sleep(0.05)
            running = proc.poll() is None and st["mount"]["maintenance"]
            proc.send_signal(signal.SIGINT)
        finally:
            _out, stderr = proc.communicate(timeout=60)
        if running and proc.returncode != 0:  # the client says where its job went
            assert b"goes on in the mount daemon" in stderr, stderr
        for _ in range(1200):  # "busy" (exit 17) until the interrupted job ends
            res = run_cli("verify", "--sample", "5", "--json", home=home, check=None)
            if res.returncode != 17:
                break
            assert b"busy: verify running" in res.stderr
            time.sleep(0.1)
        assert res.returncode == 0 and _json(res)["clean"], res.stderr
        assert _json(run_cli("status", "--json", home=home))["mount"]["maintenance"] is None
        writer.wait_rounds(writer.rounds + 1)  # still writing
    finally:
        writer.stop.set()
        writer.join(120)
    assert writer.error is None, writer.error
    assert writer.last is not None and (mp / "kb.sql").read_bytes() == writer.last
    run_cli("snapshot", "--name", "final", home=home)
    run_cli("umount", str(mp), home=home, timeout=300)

    # byte-identical from any k=2 of the (repaired, replaced) remotes, without the local index
    out = tmp_path / "restored"
    args = ["restore", "--to", str(out), "--snapshot", "final"]
    args += ["--from", str(remotes[1]), "--from", str(remotes[2])]
    run_cli(*args, home=home, timeout=300)
    assert (out / "kb.sql").read_bytes() == writer.last
    assert not (out / "junk.bin").exists()
    # and the dump restores: the same rows as the database it was dumped from
    pg_server.create_database("kb_live_restored")
    pg_server.psql_file("kb_live_restored", out / "kb.sql")
    assert pg_server.table_checksums("kb_live_restored") == source


def test_reencrypt_and_remote_changes_on_a_live_mount(live, tmp_path) -> None:
    home, mp, remotes = live
    writer = Writer(mp)
    writer.start()
    try:
        writer.wait_rounds(2)
        # every data segment rewritten under a new suite while the mount stores new ones
        _beside_writer("reencrypt", "--suite", "mlkem1024", "--json", home=home)
        extra = tmp_path / "r-extra"
        rep = _json(run_cli("remote", "add", str(extra), "--domain", "extra", "--json", home=home))
        assert rep["remote"] == str(extra) and rep["survives_losses_design"] >= 1
        rep = _json(_beside_writer("remote", "remove", str(remotes[0]), "--json", home=home))
        assert not rep["unrecoverable"], rep
        remotes = [remotes[1], remotes[2], extra]
        writer.wait_rounds(writer.rounds + 1)
    finally:
        writer.stop.set()
        writer.join(120)
    assert writer.error is None, writer.error
    run_cli("snapshot", "--name", "final", home=home)
    run_cli("umount", str(mp), home=home, timeout=300)
    show = _json(run_cli("keys", "show", "--json", home=home))
    assert show["reencrypt"] is None, show["reencrypt"]  # finished, nothing left to rewrite
    assert _json(run_cli("verify", "--read-all", "--json", home=home))["clean"]
    out = tmp_path / "restored"
    args = ["restore", "--to", str(out), "--snapshot", "final"]
    args += ["--from", str(remotes[1]), "--from", str(remotes[2])]
    run_cli(*args, home=home, timeout=300)
    assert (out / "big.bin").read_bytes() == writer.last


def test_the_routine_audits_and_repairs_a_mounted_vault(live) -> None:
    home, mp, remotes = live
    (mp / "f.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    run_cli("flush", home=home)
    shutil.rmtree(remotes[2])
    remotes[2].mkdir()  # a new, empty disk at its path (a missing one is a remote down)
    run_cli("schedule", "set", "verify=1h:100%", "repair=auto", home=home)
    # one pass: the daemon's own (it sees the new schedule within seconds) or the timer's,
    # whichever takes the routine's lock first: the audit finds the remote empty, repair
    # rebuilds it in the same pass, both in the mount's daemon; the other pass finds
    # nothing left to do
    res = run_cli("run", "--json", home=home, check=None)
    assert res.returncode in (0, 20), res.stderr  # 20: the audit found damage, as it should
    state = json.loads((home / "routine.json").read_text())["jobs"]
    first = (state, res.stdout.decode())
    if not state["repair"].get("last_success"):
        # seen once in CI (2026-12-07), never reproduced since: the pass's repair failed or
        # waited; the routine's contract is that the next pass retries it, so one more pass
        # must finish it (and the message keeps what the first one recorded)
        res = run_cli("run", "--json", home=home, check=None)
        state = json.loads((home / "routine.json").read_text())["jobs"]
    why = (first, state, res.stdout.decode(), (home / "mount.log").read_text()[-6000:])
    assert state["verify"]["last_run"] and state["repair"].get("last_success"), why
    assert any((remotes[2] / "data").iterdir())  # rebuilt
    assert _json(run_cli("verify", "--read-all", "--json", home=home))["clean"]
    assert (mp / "f.bin").stat().st_size == 2 * 1024 * 1024


def test_commands_beside_the_mount_see_its_newest_index_state(tmp_path) -> None:
    """The daemon's snapshot copies the index file for shipping; that copy used to drop the
    daemon's SQLite locks (closing any descriptor of a file drops a process's POSIX locks),
    so the next command that closed its own connection deleted the write-ahead log the daemon
    still wrote to: `snapshots` and `status` beside the mount then missed every later commit
    (the newest snapshot's manifest '?', the recovery point one snapshot behind)."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        for i in range(3):
            (mp / f"f{i}.txt").write_text(f"version {i}")
            run_cli("snapshot", "--name", f"s{i}", home=home)
            listed = _json(run_cli("snapshots", "--json", home=home))
            assert [s["name"] for s in listed] == [f"s{j}" for j in range(i + 1)], listed
            assert all(s["manifest_hash"] for s in listed), listed
        assert (home / "index.db-wal").exists()  # the daemon's log, still the one on disk
    finally:
        unmount(mp, home)


def test_a_read_with_too_few_remotes_names_the_file_the_remotes_and_the_way_out(tmp_path) -> None:
    """A file of a snapshot and of the live tree whose segment has fewer than k remotes left:
    `cat` gets EIO and the mount's log says, as restore does, which file of which snapshot,
    the remote holding the vault and the ones failing, and what to do (bring remotes back,
    `vaultfs verify`, `vaultfs repair`), not only an internal segment."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", "--read-cache-size", "0", str(mp), home=home)
    try:
        (mp / "w.bin").write_bytes(os.urandom(1_200_000))
        run_cli("snapshot", "--name", "t", home=home)
        # a name that is not there: refused through the daemon as unmounted (it said "no
        # snapshot with id" when given a name)
        res = run_cli("snapshot", "delete", "nosuch", home=home, check=18)
        assert b"no snapshot with id or name 'nosuch'" in res.stderr, res.stderr
        # every shard placed, and a new mount: nothing of the file is left on this machine
        run_cli("umount", str(mp), home=home, timeout=300)
        for r in remotes[1:]:
            shutil.rmtree(r)
        run_cli("mount", "--read-cache-size", "0", str(mp), home=home)
        res = subprocess.run(["cat", str(mp / ".snapshots" / "t" / "w.bin")], capture_output=True)
        assert res.returncode != 0 and b"Input/output error" in res.stderr, res
        log = " ".join((home / "mount.log").read_text().split())
        assert "cannot read w.bin of snapshot t: it needs shards from 2 remotes and 1 gave" in log
        assert f"Holding the vault: {remotes[0]};" in log, log
        assert "; unreachable or failing: " in log, log
        for r in remotes[1:]:  # each with the reason, in either order
            assert f"{r} ({r}: directory missing (a disk unplugged or the path moved?)" in log
        assert "`vaultfs verify` names what is lost and `vaultfs repair` rebuilds it" in log
        res = subprocess.run(["cat", str(mp / "w.bin")], capture_output=True)
        assert res.returncode != 0 and b"Input/output error" in res.stderr, res
        log = " ".join((home / "mount.log").read_text().split())
        assert "cannot read w.bin (the live tree): it needs shards from 2 remotes" in log, log
        assert os.path.ismount(mp)
    finally:
        unmount(mp, home)


def test_a_snapshot_file_pruned_while_open_is_eio_for_its_reader_only(tmp_path) -> None:
    """A reader holds a file of a snapshot that is deleted and pruned meanwhile (by hand or
    by the routine's retention): its next read of a chunk not in memory is EIO; the mount
    stays up for everyone else (the daemon once died of it)."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", "--read-cache-size", "0", str(mp), home=home)
    try:
        (mp / "w.bin").write_bytes(os.urandom(1_200_000))
        run_cli("snapshot", "--name", "t", home=home)
        (mp / "w.bin").unlink()
        with open(mp / ".snapshots" / "t" / "w.bin", "rb", buffering=0) as f:
            assert len(f.read(100)) == 100
            run_cli("snapshot", "delete", "t", home=home)
            run_cli("prune", home=home)
            with pytest.raises(OSError) as e:
                f.seek(1_000_000)
                f.read(100_000)
            assert e.value.errno == errno.EIO
        assert os.path.ismount(mp)
        (mp / "after.txt").write_text("still serving")
        assert (mp / "after.txt").read_text() == "still serving"
        assert "read of file handle" in (home / "mount.log").read_text()
    finally:
        unmount(mp, home)


def test_maintenance_rate_bounds_a_repair_reading_local_remotes_in_place(live) -> None:
    """A repair in the daemon reads a local-directory remote's shards where they lie (no
    download): those reads are charged to the maintenance share too, so a lost remote's
    repair takes at least the bytes it read over ``maintenance_rate`` (it took 0.5 s for
    91 MB at 2M before)."""
    home, mp, remotes = live
    (mp / "f.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    run_cli("flush", home=home)
    rate = 2 * 1024 * 1024
    run_cli("schedule", "set", "maintenance_rate=2M", home=home)
    shutil.rmtree(remotes[2])
    remotes[2].mkdir()  # a new, empty disk at its path
    t0 = time.monotonic()
    rep = _json(run_cli("repair", "--json", home=home))
    took = time.monotonic() - t0
    assert rep["rebuilt"] > 0 and not rep["unrecoverable"], rep
    assert rep["bytes_fetched"] >= 4 * 1024 * 1024, rep  # k shards of each lost one, in place
    assert took >= rep["bytes_fetched"] / rate * 0.95, (took, rep["bytes_fetched"])
    assert _json(run_cli("verify", "--read-all", "--json", home=home))["clean"]


def test_maintenance_in_the_daemon_shows_progress_on_the_client_terminal(live) -> None:
    """verify --read-all and repair run in the mount daemon: their progress comes back over
    the control socket and the client draws it (bytes of a known total, rate, time left) on
    a terminal; --json stays quiet."""
    home, mp, remotes = live
    (mp / "f.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    run_cli("flush", home=home)
    run_cli("schedule", "set", "maintenance_rate=8M", home=home)  # a few updates at least
    whole = sum(p.stat().st_size for r in remotes for p in r.glob("data/*"))
    drawn = stderr_on_a_terminal(["verify", "--read-all"], home)
    assert "runs in the mount daemon" in drawn
    bars = progress_bars(drawn, "verify")
    assert bars and bars[-1][0] == bars[-1][1] >= round(whole / 1e6, 1), bars
    lost = remotes[2]
    rebuilt = sum(p.stat().st_size for sub in ("data", "meta") for p in lost.glob(f"{sub}/*"))
    shutil.rmtree(lost)
    lost.mkdir()  # a new, empty disk at its path
    bars = progress_bars(stderr_on_a_terminal(["repair"], home), "repair")
    assert bars and bars[-1][0] == bars[-1][1] == round(rebuilt / 1e6, 1), (bars, rebuilt)
    assert "/s" not in stderr_on_a_terminal(["verify", "--read-all", "--json"], home)


def test_remote_remove_and_replace_in_the_daemon_show_progress_on_the_client_terminal(
    live, tmp_path
) -> None:
    """`remote replace` and `remote remove` run their rebuild in the mount daemon: its
    progress comes back over the control socket as repair's does, and the client draws it
    (the departing remote's bytes rebuilt, rate, time left) on a terminal; nothing with
    --json nor when stderr is a pipe."""
    home, mp, remotes = live
    (mp / "f.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    run_cli("flush", home=home)
    run_cli("schedule", "set", "maintenance_rate=8M", home=home)  # a few updates at least

    def held(remote: Path) -> float:
        sizes = (p.stat().st_size for sub in ("data", "meta") for p in remote.glob(f"{sub}/*"))
        return round(sum(sizes) / 1e6, 1)

    new = [tmp_path / f"new{i}" for i in range(3)]
    size = held(remotes[2])
    drawn = stderr_on_a_terminal(["remote", "replace", str(remotes[2]), str(new[0])], home)
    assert "runs in the mount daemon" in drawn
    bars = progress_bars(drawn, "remote replace")
    assert bars and bars[-1][0] == bars[-1][1] == size > 0, (bars, size)
    quiet = stderr_on_a_terminal(["remote", "replace", str(new[0]), str(new[1]), "--json"], home)
    assert "remote replace" not in quiet and "MB" not in quiet and held(new[1]) > 0, quiet
    res = run_cli("remote", "replace", str(new[1]), str(new[2]), home=home)  # stderr: a pipe
    assert b"remote replace" not in res.stderr and b"MB" not in res.stderr, res.stderr
    size = held(new[2])
    assert size > 0
    bars = progress_bars(
        stderr_on_a_terminal(["remote", "remove", str(new[2])], home), "remote remove"
    )
    # the bytes of its live segments' shards: at most all it holds
    assert bars and bars[-1][0] == bars[-1][1] and 0 < bars[-1][1] <= size, (bars, size)


def test_umount_names_the_job_its_daemon_finishes_and_mount_says_to_wait(tmp_path) -> None:
    """`umount --timeout` while a verify holds the daemon: umount says it waits for that
    verify, and at the timeout says to wait for the daemon before mounting again (it used to
    promise that "a new mount waits for it", and a mount right after failed at once with "in
    use by another vaultfs process"). That mount is refused naming the daemon and its job;
    once the daemon is gone the vault mounts."""
    home, remotes = init_local_vault(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    verify = None
    try:
        (mp / "f.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        run_cli("flush", home=home)
        run_cli("schedule", "set", "maintenance_rate=500k", home=home)  # ~12 s of reading
        daemon = json.loads((home / "mount.json").read_text())["pid"]
        verify = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "verify", "--read-all", "--json"],
            env=vaultfs_env(home), cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the verify runs in the daemon
            st = _json(run_cli("status", "--json", home=home))
            if (st.get("mount") or {}).get("maintenance"):
                break
            assert time.monotonic() < deadline and verify.poll() is None, "no verify ran"
            time.sleep(0.2)
        res = run_cli("umount", "--timeout", "3", str(mp), home=home, check=17)
        said = res.stderr.decode()
        assert "waiting up to 3s" in said and "its verify (running since" in said, said
        assert "still finishing after 3s: its verify" in said, said
        assert "wait for it to exit, then mount again" in said, said
        assert "a new mount waits" not in said, said
        assert not os.path.ismount(mp) and os.path.exists(f"/proc/{daemon}")
        refused = run_cli("mount", str(mp), home=home, check=17)
        why = refused.stderr.decode()
        assert f"held by the daemon of its last mount (pid {daemon})" in why, why
        assert "its verify (running since" in why and "Wait for it to exit" in why, why
        deadline = time.monotonic() + 120
        while os.path.exists(f"/proc/{daemon}"):
            assert time.monotonic() < deadline, "the daemon never finished"
            time.sleep(0.2)
        assert not (home / "mount.json").exists()
        verify.wait(60)
        run_cli("mount", str(mp), home=home)
        assert (mp / "f.bin").stat().st_size == 4 * 1024 * 1024
    finally:
        if verify is not None and verify.poll() is None:
            verify.kill()
            verify.wait()
        unmount(mp, home)
