"""Continuous archiving of Postgres into a vault (vaultfs/wal.py; docs/operations.md,
"Continuous archiving of Postgres (WAL)"): the point-in-time recovery drill with the embedded
Postgres, and the archive/restore commands' contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import init_local_vault, run_cli, vaultfs_env

from vaultfs.errors import InputError, IntegrityError
from vaultfs.pgembed import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
SEGMENT = "000000010000000000000001"


def test_push_and_fetch_contract(tmp_path: Path) -> None:
    """A push is durable and idempotent; other bytes under an archived name are refused;
    fetch writes the bytes back, and a name not archived is exit 18 (the end of the archive)."""
    home = init_local_vault(tmp_path, segment_mib=None).home
    seg = tmp_path / SEGMENT
    seg.write_bytes(os.urandom(1 << 20))
    run_cli("wal", "push", str(seg), SEGMENT, home=home)
    run_cli("wal", "push", str(seg), SEGMENT, home=home)  # a retry: acknowledged, no snapshot
    snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert [s["name"] for s in snaps] == [f"wal-{SEGMENT}"]
    other = tmp_path / "other"
    other.write_bytes(os.urandom(1 << 20))
    res = run_cli("wal", "push", str(other), SEGMENT, home=home, check=IntegrityError.exit_code)
    assert b"other contents" in res.stderr
    res = run_cli("wal", "push", SEGMENT, str(seg), home=home, check=InputError.exit_code)
    assert b"not a WAL file name" in res.stderr  # %p and %f swapped
    out = tmp_path / "pg_wal" / "RECOVERYXLOG"
    out.parent.mkdir()
    run_cli("wal", "fetch", SEGMENT, str(out), home=home)
    assert out.read_bytes() == seg.read_bytes()
    res = run_cli("wal", "fetch", "00000002.history", str(out), home=home, check=18)
    assert b"not in the vault" in res.stderr and b"Traceback" not in res.stderr


#: Postgres runs its archive and restore commands as its own system user (as root the embedded
#: server makes one), which may not run this Python (here it lives under /root); the test hands
#: each call to a relay thread that runs `vaultfs wal VERB A B` as the vault's owner and
#: returns its exit code: Postgres still waits for the command's real exit code.
BRIDGE = """#!/bin/sh
req=$(mktemp -d "{spool}/req.XXXXXX") || exit 1
chmod 755 "$req"
mkfifo -m 622 "$req/rc" || exit 1
printf '%s\\n%s\\n%s\\n%s\\n' "$PWD" "$1" "$2" "$3" > "$req/args.tmp"
mv "$req/args.tmp" "$req/args"
read rc < "$req/rc"
exit "$rc"
"""


class Relay:
    """Serves :data:`BRIDGE` requests under ``spool`` (see there) until :meth:`stop`; a
    fetched file is given to ``user`` (the server's), as if the server's user had fetched it."""

    def __init__(self, spool: Path, home: Path, user: str | None) -> None:
        self.spool = spool
        self.user = user
        self.env = vaultfs_env(home, PYTHONPATH=str(ROOT))
        self.calls: list[tuple[str, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for args in sorted(self.spool.glob("req.*/args")):
                cwd, verb, a, b = args.read_text().split("\n")[:4]
                # %p is relative to the data directory, where Postgres runs the command
                if verb == "push":
                    a = str(Path(cwd) / a)
                else:
                    b = str(Path(cwd) / b)
                res = subprocess.run([sys.executable, "-m", "cli.main", "wal", verb, a, b],
                                     capture_output=True, env=self.env, cwd=ROOT)  # fmt: skip
                self.calls.append((verb, b if verb == "push" else a, res.returncode))
                if verb == "fetch" and res.returncode == 0 and self.user:
                    shutil.chown(b, self.user)
                try:  # the caller may be gone (a server stopped mid-command): never block
                    fd = os.open(args.parent / "rc", os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    pass
                else:
                    os.write(fd, f"{res.returncode}\n".encode())
                    os.close(fd)
                shutil.rmtree(args.parent)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _as(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


@pytest.mark.skipif(shutil.which("runuser") is None and os.geteuid() == 0, reason="runuser")
def test_point_in_time_recovery_from_the_vault() -> None:
    """The drill: Postgres archives into the vault (archive_command `vaultfs wal push %p %f`);
    a base backup (pg_basebackup, without WAL: it needs the archive) goes into the vault too;
    rows are written before and after a noted time; then, with the server and its data gone,
    the base is restored from the vault into a new data directory and replayed
    (restore_command `vaultfs wal fetch %f %p`) to the noted time: exactly the rows committed
    before it are there."""
    # its own server (archive_mode needs a restart), in a directory under /tmp whose
    # parents the server's user can pass (pytest's are private to root)
    scratch = Path(tempfile.mkdtemp(prefix="vaultfs-pitr-"))
    os.chmod(scratch, 0o777)  # the server's user writes the base backup and its socket here
    try:
        _drill(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _drill(scratch: Path) -> None:
    home = init_local_vault(scratch).home
    spool = scratch / "spool"
    spool.mkdir(mode=0o777)
    os.chmod(spool, 0o777)
    bridge = scratch / "bridge.sh"
    bridge.write_text(BRIDGE.format(spool=spool))
    bridge.chmod(0o755)
    pg = EmbeddedPostgres(scratch / "pg")
    user = pg.os_user
    relay = Relay(spool, home, user)
    bin_dir = pg.bin_dir
    try:
        pg.sql("ALTER SYSTEM SET wal_level = 'replica'")
        pg.sql("ALTER SYSTEM SET archive_mode = 'on'")
        pg.sql(f"ALTER SYSTEM SET archive_command = '{bridge} push %p %f'")
        pg.restart()
        pg.sql("CREATE TABLE t (id int PRIMARY KEY)")
        pg.sql("INSERT INTO t SELECT generate_series(1, 100)")
        base = scratch / "base"
        res = subprocess.run(
            _as(user, [str(bin_dir / "pg_basebackup"), "-d", pg.dsn(), "-D", str(base),
                       "-Fp", "-X", "none", "-c", "fast"]),
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert res.returncode == 0, (res.stderr, relay.calls)
        for _ in range(120):  # the archiver's push may hold the vault (exit 17): retry
            res = run_cli("backup", str(base), "--name", "pgbase", home=home, check=None)
            if res.returncode != 17:
                break
            time.sleep(0.5)
        assert res.returncode == 0, res.stderr
        pg.sql("INSERT INTO t SELECT generate_series(101, 200)")
        time.sleep(1.1)
        target = pg.sql("SELECT clock_timestamp()")[0][0]
        time.sleep(1.1)
        pg.sql("INSERT INTO t SELECT generate_series(201, 300)")
        done = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + 240
        last = None
        while time.monotonic() < deadline:
            last = pg.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
            if last and last >= done:
                break
            time.sleep(0.5)
        assert last and last >= done, (done, last, relay.calls)
    except BaseException:
        relay.stop()
        raise
    finally:
        pg.stop()

    # the server and its data are gone: the base and the WAL come from the vault alone
    try:
        restored = scratch / "restored"
        run_cli("restore", "--snapshot", "pgbase", "--to", str(restored), home=home)
        new = restored / "base"
        (new / "recovery.signal").write_text("")
        with open(new / "postgresql.auto.conf", "a") as f:
            f.write(
                f"restore_command = '{bridge} fetch %f %p'\n"
                f"recovery_target_time = '{target.isoformat()}'\n"
                "recovery_target_action = 'promote'\narchive_mode = 'off'\n"
                "hot_standby = 'off'\n"  # no reads before the recovery has ended
                f"port = 55439\nunix_socket_directories = '{scratch}'\nlisten_addresses = ''\n"
            )
        if user:
            subprocess.run(["chown", "-R", user, str(new)], check=True)
        os.chmod(new, 0o700)
        log = scratch / "restored.log"
        ctl = [str(bin_dir / "pg_ctl"), "-D", str(new), "-l", str(log), "-w", "-t", "120"]
        res = subprocess.run(_as(user, [*ctl, "start"]), capture_output=True, text=True)
        try:
            assert res.returncode == 0, log.read_text()[-3000:]
            psql = [str(bin_dir / "psql"), "-h", str(scratch), "-p", "55439", "-U", "postgres",
                    "-Atc", "SELECT count(*), min(id), max(id) FROM t"]  # fmt: skip
            deadline = time.monotonic() + 120
            while True:  # no connection before recovery ends and promotes (hot_standby off)
                q = subprocess.run(psql, capture_output=True, text=True)
                if q.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            rows = q.stdout.strip()
            assert rows == "200|1|200", (q.stderr, log.read_text()[-3000:])
            fetched = [c for c in relay.calls if c[0] == "fetch" and c[2] == 0]
            assert fetched, relay.calls  # replayed from the vault's archive
        finally:
            subprocess.run(_as(user, [*ctl, "stop"]), capture_output=True)
    finally:
        relay.stop()
