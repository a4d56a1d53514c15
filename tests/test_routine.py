"""The routine (vaultfs/routine.py, `vaultfs run`, `vaultfs schedule`): with intervals of a
second, passes of `vaultfs run` take snapshots, apply retention, audit, repair a deleted
remote without a command, send alert events to the hook, and `status --json` reports them;
`schedule install` writes units that `systemd-analyze verify` accepts."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    SilentServer,
    WebdavServer,
    break_remote,
    init_local_vault,
    mend_remote,
    mount_pid,
    needs_fuse,
    remote_args,
    run_cli,
    unmount,
    vaultfs_env,
)


def make(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    return home, remotes, src


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def run(home: Path, code: int = 0) -> dict:
    return json.loads(run_cli("run", "--json", home=home, check=code).stdout)


def test_schedule_set_validates_and_show_reports(tmp_path) -> None:
    home, _remotes, _src = make(tmp_path)
    for bad in ("snapshot=5x", "verify=daily:200%", "repair=sometimes", "nokey=1",
                "retention=--keep-dayly 3", "grace=", "snapshot", "sources=/nonexistent",
                "sources=relative/path"):  # fmt: skip
        if bad == "grace=":
            continue  # unsetting is allowed
        res = run_cli("schedule", "set", bad, home=home, check=None)
        assert res.returncode in (2, 18), bad
    sched = json.loads(
        run_cli(
            "schedule", "set", "snapshot=1h", "verify=daily:2%", "prune=weekly",
            "retention=--keep-daily 7 --keep-weekly 4", "--json", home=home,
        ).stdout
    )  # fmt: skip
    assert sched["verify"] == "daily:2%" and sched["retention"].startswith("--keep-daily")
    run_cli("schedule", "set", "prune=", home=home)
    shown = json.loads(run_cli("schedule", "show", "--json", home=home).stdout)
    assert "prune" not in shown["schedule"] and shown["schedule"]["snapshot"] == "1h"
    assert "snapshot: last success never" in run_cli("schedule", "show", home=home).stdout.decode()


def test_run_snapshots_audits_repairs_a_deleted_remote_and_alerts(tmp_path) -> None:
    home, remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli(
        "schedule", "set", "snapshot=1s", f"sources={src}", "verify=1s:100%",
        "retention=--keep-last 2", f"alert=cat >> {log}", home=home,
    )  # fmt: skip
    first = run(home)
    assert set(first["ran"]) == {"snapshot", "retention", "verify", "repair"}
    assert first["ran"]["verify"]["clean"] and not first["ran"]["repair"]["needed"]
    assert not first["alerts"] and not events(log)

    for f in (remotes[1] / "data").iterdir():  # a remote loses everything it held
        f.unlink()
    time.sleep(1.1)
    second = run(home, code=20)
    assert second["failed"].keys() == {"verify"}
    assert second["ran"]["repair"]["needed"] and second["ran"]["repair"]["rebuilt"] >= 1
    (ev,) = events(log)
    assert ev["event"] == "audit_failed" and ev["remotes"] == [str(remotes[1])]
    assert ev["vault"] == str(home) and ev["time"] > 0

    time.sleep(1.1)
    third = run(home)
    assert third["ran"]["verify"]["clean"] and not third["ran"]["repair"]["needed"]
    snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert len(snaps) == 2 and all(s["name"].startswith("auto-") for s in snaps)

    st = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert st["newest_placed_snapshot"] == snaps[-1]["id"]
    assert 0 <= st["rpo_seconds"] < 60
    for job in ("snapshot", "verify", "repair"):
        j = st["jobs"][job]
        assert j["last_success"] is not None and j["next_run"] == j["last_run"] + j["every"]
    assert st["jobs"]["retention"]["every"] == 86400


def test_alerts_for_a_remote_down_past_grace_a_stale_queue_and_a_failed_job(tmp_path) -> None:
    home, remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli(
        "schedule", "set", "snapshot=1s", f"sources={src}", "grace=1s", "queue_age=1s",
        "repair=off", f"alert=cat >> {log}", home=home,
    )  # fmt: skip
    run(home)
    shutil.rmtree(remotes[2])
    remotes[2].write_text("not a directory any more")  # the remote stops taking anything
    time.sleep(1.2)
    run(home)
    time.sleep(1.2)
    (tmp_path / "gone").mkdir()
    run_cli("schedule", "set", f"sources={tmp_path / 'gone'}", home=home)
    (tmp_path / "gone").rmdir()  # a source that disappears after it was set
    res = run(home, code=20)
    assert "snapshot" in res["failed"]
    kinds = [e["event"] for e in events(log)]
    assert kinds.count("remote_unreachable") == 1, kinds  # announced once while it holds
    assert "queue_stale" in kinds and "job_failed" in kinds
    down = next(e for e in events(log) if e["event"] == "remote_unreachable")
    assert down["remote"] == str(remotes[2])
    st = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert f"remote_unreachable:{remotes[2]}" in st["alerts"] and "queue_stale" in st["alerts"]
    assert st["jobs"]["snapshot"]["last_error"]


def test_a_remote_directory_gone_is_down_for_the_routine_not_recreated(tmp_path) -> None:
    """`rm -rf r2` (or a disk unplugged) between passes: the next pass notes the remote down
    (a stat, before anything is written), its snapshots leave r2's shards queued instead of
    recreating the directory, and once past the grace `remote_unreachable` fires, naming the
    missing directory; `status` says unreachable, not ok. It used to say ok, and "repair:
    needed no", with the directory silently made again."""
    home, remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli(
        "schedule", "set", "snapshot=1s", f"sources={src}", "grace=1s", "repair=off",
        f"alert=cat >> {log}", home=home,
    )  # fmt: skip
    run(home)
    shutil.rmtree(remotes[2])
    run(home)
    # down within the grace: only the redundancy it takes away is alerted yet
    assert [e["event"] for e in events(log)] == ["redundancy_low"], events(log)
    time.sleep(1.2)
    (src / "b.bin").write_bytes(os.urandom(100_000))
    run(home)
    assert not remotes[2].exists()
    down = [e for e in events(log) if e["event"] == "remote_unreachable"]
    assert [e["remote"] for e in down] == [str(remotes[2])], events(log)
    assert f"{remotes[2]}: directory missing (a disk unplugged" in down[0]["message"], down
    row = next(
        r
        for r in json.loads(run_cli("status", "--json", home=home).stdout)["remotes"]
        if r["remote"] == str(remotes[2])
    )
    assert row["health"] == "unreachable" and row["queued_objects"] > 0, row


def test_an_unmounted_pass_sends_what_is_queued_once_the_remote_is_back(tmp_path) -> None:
    """A backup leaves a down remote's shards queued. A pass while it is still down reports
    its error without failing, and queue_stale names the remote and `vaultfs flush`; once it
    is back, the next pass (no prune or snapshot due) empties the queue onto it."""
    home, remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    break_remote(remotes[2])
    run_cli("backup", str(src), home=home)  # k=2 remotes take it; remote 2's shards wait
    run_cli(
        "schedule", "set", "snapshot=1h", f"sources={src}", "queue_age=1s",
        f"alert=cat >> {log}", home=home,
    )  # fmt: skip
    time.sleep(1.1)  # past queue_age
    down = run(home)
    assert set(down["ran"]) == {"snapshot", "repair"} and not down["failed"]
    assert str(remotes[2]) in down["upload"]["errors"] and not down["upload"]["complete"]
    assert down["upload"]["pending"][str(remotes[2])] > 0
    (stale,) = [e for e in events(log) if e["event"] == "queue_stale"]
    assert stale["remotes"] == [str(remotes[2])], stale
    assert str(remotes[2]) in stale["message"] and "`vaultfs flush`" in stale["message"]

    mend_remote(remotes[2])
    back = run(home)
    assert set(back["ran"]) == {"repair"} and not back["failed"]
    assert back["upload"]["complete"] and back["upload"]["uploaded"] > 0, back["upload"]
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert [r["queued_objects"] for r in st["remotes"]] == [0, 0, 0]
    held = [sorted(p.name for p in (r / "data").iterdir()) for r in remotes]
    assert held[2] and len(held[2]) == len(held[0]), held  # remote 2 has its share now
    assert not st["routine"]["alerts"]  # queue_stale cleared
    assert run(home)["upload"] is None  # nothing queued: no remote is asked


def test_an_unmounted_pass_asks_a_down_remote_once(tmp_path, rclone_bin) -> None:
    """A remote that fails fast (a WebDAV address whose listener drops every connection) is
    asked no more by a pass with a snapshot due than by `vaultfs flush` alone: the pass's push
    finds it down, and the snapshot job does not ask it again (the old code asked it once
    more for the commit's survey, the shards and the flush's survey). The snapshot is
    recorded, its shards queued for that remote, and a flush once it is back places them."""
    dav = WebdavServer(tmp_path / "dav", rclone_bin)
    home = tmp_path / "home"
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    run_cli("init", "-k", "2", "-n", "3", *remote_args([*dirs, dav.remote("vault")]),
            home=home)  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    dav.stop()
    with SilentServer(dav.port, hang=False) as down:
        run_cli("backup", str(src), home=home)  # k=2 remotes take it; the third's shards wait
        before = down.accepted
        run_cli("flush", home=home, check=3)
        by_flush = down.accepted - before
        run_cli("schedule", "set", "snapshot=1s", f"sources={src}", home=home)
        time.sleep(1.1)  # the snapshot is due
        before = down.accepted
        res = run(home)
        by_pass = down.accepted - before
    assert by_flush > 0 and 0 < by_pass <= by_flush, (by_flush, by_pass)
    assert set(res["ran"]) == {"snapshot", "repair"} and not res["failed"], res
    assert not res["upload"]["complete"] and not res["ran"]["snapshot"]["complete"]
    snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert res["ran"]["snapshot"]["snapshot"] in [s["id"] for s in snaps], snaps
    dav.start()
    try:
        run_cli("flush", home=home)
        st = json.loads(run_cli("status", "--json", home=home).stdout)
        assert [r["queued_objects"] for r in st["remotes"]] == [0, 0, 0], st["remotes"]
    finally:
        dav.stop()


def test_redundancy_drop_is_alerted_when_repair_is_off(tmp_path) -> None:
    home, remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli("backup", str(src), home=home)
    run_cli("schedule", "set", "verify=1h:100%", "repair=off", f"alert=cat >> {log}", home=home)
    for f in (remotes[1] / "data").iterdir():
        f.unlink()
    res = run(home, code=20)
    assert "repair" not in res["ran"]
    kinds = [e["event"] for e in events(log)]
    assert kinds == ["audit_failed", "redundancy_low"]
    low = events(log)[1]
    assert low["survives_now"] < low["promised"] == 1
    assert run(home)["alerts"] == []  # verify not due again; the condition holds: no repeat
    assert [e["event"] for e in events(log)] == kinds


def test_schedule_install_writes_units_systemd_accepts(tmp_path) -> None:
    home, _remotes, _src = make(tmp_path)
    units = tmp_path / "units"
    # the schedule's own words ('daily') become a span systemd reads; nonsense is refused
    run_cli("schedule", "install", "--unit-dir", str(units), "--every", "banana", home=home,
            check=18)  # fmt: skip
    # a unit name systemd would not take is refused in one line, nothing written
    bad = run_cli("schedule", "install", "--unit-dir", str(units), "--name", "my run/x",
                  home=home, check=18)  # fmt: skip
    assert b"is not a systemd unit name" in bad.stderr and not units.exists(), bad.stderr
    daily = run_cli("schedule", "install", "--unit-dir", str(units), "--every", "daily",
                    home=home)  # fmt: skip
    assert "OnUnitInactiveSec=86400s" in (units / "vaultfs-run.timer").read_text()
    assert "routine.env does not exist" in daily.stderr.decode()  # the passphrase file
    res = json.loads(
        run_cli("schedule", "install", "--unit-dir", str(units), "--every", "1h", "--json",
                home=home).stdout
    )  # fmt: skip
    files = sorted(Path(p).name for p in res["written"])
    assert files == ["vaultfs-run.service", "vaultfs-run.timer"]
    service = (units / "vaultfs-run.service").read_text()
    assert (
        f"run --home {home}" in service
        and "OnUnitInactiveSec=3600s" in (units / "vaultfs-run.timer").read_text()
    )
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the units were not checked")
    check = subprocess.run(
        ["systemd-analyze", "verify", *res["written"]], capture_output=True, text=True
    )
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr


def test_a_pass_that_cannot_open_the_vault_alerts(tmp_path) -> None:
    """A timer's pass with no passphrase (a missing routine.env) or a wrong one fails, and the
    alert hook hears of it: backups must not stop silently."""
    home, _remotes, _src = make(tmp_path)
    log = tmp_path / "alerts.jsonl"
    run_cli("schedule", "set", f"alert=cat >> {log}", "snapshot=1h", home=home)
    env = vaultfs_env(home)
    env["VAULTFS_PASSPHRASE"] = "not the passphrase"
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "run"], env=env, capture_output=True, timeout=300,
        cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 10, proc.stderr
    (ev,) = events(log)
    assert ev["event"] == "job_failed" and ev["job"] == "run", ev
    assert "could not open the vault" in ev["message"]


def _wait(cond, what: str, timeout: float = 120) -> None:
    """Wait until ``cond()`` holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


@needs_fuse
def test_a_mount_that_stays_up_keeps_its_routine_which_stops_with_the_mount(tmp_path) -> None:
    """A refused unmount (a file open there) leaves the vault mounted, and says so: its daemon
    serves it and runs the routine, as any mount. A lazy unmount detaches it while the file
    stays open: the daemon serves that file until it is closed, but the routine stops at
    once (no timed snapshot of a tree nobody sees), and the daemon then exits."""
    home, _remotes, _src = make(tmp_path)
    run_cli("schedule", "set", "snapshot=1s", home=home)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    pid = json.loads((home / "mount.json").read_text())["pid"]

    def autos() -> int:
        rows = json.loads(run_cli("snapshots", "--json", home=home).stdout)
        return sum(r["name"].startswith("auto-") for r in rows)

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    held = None
    try:
        (mp / "held.txt").write_text("still served\n")
        held = open(mp / "held.txt")  # noqa: SIM115 (closed below, or in finally)
        _wait(lambda: autos() >= 1, "a timed snapshot of the mount")
        res = run_cli("umount", str(mp), home=home, check=17)
        msg = " ".join(res.stderr.decode().split())
        assert "It stays mounted: its daemon" in msg and "runs the routine" in msg, msg
        assert os.path.ismount(mp) and alive()
        n = autos()
        (mp / "more.txt").write_text("a change\n")
        _wait(lambda: autos() > n, "the routine going on while the vault stays mounted")

        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=True)  # detached
        assert not os.path.ismount(mp)
        log = home / "mount.log"
        _wait(lambda: "the routine stops" in log.read_text(), "the routine stopping")
        stopped = autos()
        assert held.read() == "still served\n" and alive()  # the open file is still served
        held.close()
        held = None
        _wait(lambda: not alive(), "the daemon exiting after the last open file")
        assert autos() == stopped  # nothing ran after the routine stopped
        assert "routine pass in the mount daemon failed" not in log.read_text()
    finally:
        if held is not None:
            held.close()
        if os.path.ismount(mp):
            run_cli("umount", str(mp), home=home, check=None, timeout=300)
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@needs_fuse
def test_a_pass_that_fails_in_the_mount_daemon_is_alerted_recorded_and_shown(tmp_path) -> None:
    """A pass of the mount daemon's routine that fails outright (its record, routine.json,
    edited into bad JSON) was only logged: nobody was told and the routine stayed stopped.
    Now the alert command hears it (job ``run``), the next pass starts a new record and
    the routine goes on. An unreadable schedule cannot name an alert command: `status`
    (through the mount) shows why the routine makes no pass, and routine.json keeps it."""
    home, _remotes, _src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli("schedule", "set", "snapshot=1s", f"alert=cat >> {log}", home=home)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)

    def autos() -> int:
        rows = json.loads(run_cli("snapshots", "--json", home=home).stdout)
        return sum(r["name"].startswith("auto-") for r in rows)

    try:
        _wait(lambda: autos() >= 1, "a timed snapshot of the mount")
        with open(home / "routine.lock", "a") as lock:  # between two passes
            fcntl.flock(lock, fcntl.LOCK_EX)
            (home / "routine.json").write_text("{")
        _wait(lambda: any(e["job"] == "run" for e in events(log) if "job" in e),
              "an alert of the failed pass")  # fmt: skip
        (ev,) = [e for e in events(log) if e.get("job") == "run"]
        assert ev["event"] == "job_failed" and "routine.json" in ev["error"], ev
        assert "could not make its pass in the mount daemon" in ev["message"], ev
        n = autos()
        _wait(lambda: autos() > n, "the routine going on after the failed pass")
        _wait(lambda: "last_pass" in json.loads((home / "routine.json").read_text()),
              "a pass recorded in the new routine.json")  # fmt: skip

        with open(home / "routine.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (home / "schedule.json").write_text("{")
        _wait(lambda: "schedule.json" in (home / "routine.json").read_text(),
              "the failed pass recorded")  # fmt: skip
        res = run_cli("status", home=home)  # through the mount: the rest still shows
        text = " ".join(res.stderr.decode().split())
        assert "the routine makes no pass: cannot read" in text, text
        assert "the last pass failed at" in text and "schedule.json" in text, text
        rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
        assert "schedule.json" in rt["unreadable"][0] and rt["last_pass_failed"]["error"]
        assert len([e for e in events(log) if e.get("job") == "run"]) == 1  # no command known
    finally:
        unmount(mp, home)


@needs_fuse
def test_a_schedule_set_on_a_mounted_vault_takes_effect_at_once(tmp_path) -> None:
    """The mount daemon's routine waited out the schedule it had read (a minute with none)
    before it saw a new one: `schedule set` on a mounted vault now takes effect within
    seconds. And `status` gives retention's next run as the next snapshot's (it runs after
    each timed snapshot), not a day after its last run."""
    home, _remotes, _src = make(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        time.sleep(1)  # the daemon's routine is waiting, with no schedule
        run_cli("schedule", "set", "snapshot=1h", "retention=--keep-last 5", home=home)
        set_at = time.monotonic()

        def autos() -> int:
            rows = json.loads(run_cli("snapshots", "--json", home=home).stdout)
            return sum(r["name"].startswith("auto-") for r in rows)

        _wait(lambda: autos() >= 1, "a timed snapshot soon after the schedule was set", 20)
        assert time.monotonic() - set_at < 20
        rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
        snap, ret = rt["jobs"]["snapshot"], rt["jobs"]["retention"]
        assert ret["last_run"] and ret["next_run"] == snap["next_run"], rt["jobs"]
    finally:
        unmount(mp, home)


def test_retention_that_would_keep_nothing_is_refused_and_alerted(tmp_path) -> None:
    """`schedule set` refuses a retention that forgets each timed snapshot it takes; a
    retention that would forget every snapshot fails its job (exit 20, job_failed alert)
    and forgets nothing."""
    home, _remotes, src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    typo = "retention=--keep-name 'nigthly*'"
    res = run_cli("schedule", "set", "snapshot=1s", f"sources={src}", typo, home=home, check=2)
    assert "would forget each snapshot the routine takes" in res.stderr.decode()
    assert (
        "retention"
        not in json.loads(run_cli("schedule", "show", "--json", home=home).stdout)["schedule"]
    )
    run_cli("backup", str(src), home=home)
    run_cli("schedule", "set", typo, f"alert=cat >> {log}", home=home)  # no timed snapshots
    out = run(home, code=20)
    assert "refusing to forget all 1 snapshot(s)" in out["failed"]["retention"]
    (ev,) = events(log)
    assert ev["event"] == "job_failed" and ev["job"] == "retention"
    assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 1


def test_intervals_past_the_clock_are_refused_and_a_stored_one_shows_never(tmp_path) -> None:
    """`schedule set` refuses an interval past 100 years (exit 18, the bound named); one
    stored before the bound existed is held to it: it runs once, then `status` and `schedule
    show` show its next run a century on (no OverflowError from the clock)."""
    home, _remotes, src = make(tmp_path)
    huge = "99999999999999999999d"
    res = run_cli("schedule", "set", f"snapshot={huge}", home=home, check=18)
    msg = res.stderr.decode()
    assert "at most 100 years" in msg and "Traceback" not in msg, msg
    assert (
        "snapshot"
        not in json.loads(run_cli("schedule", "show", "--json", home=home).stdout)["schedule"]
    )
    run_cli("schedule", "set", "snapshot=1h", f"sources={src}", home=home)
    stored = home / "schedule.json"
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "snapshot": huge}))
    assert "snapshot" in run(home)["ran"]
    for cmd in (("status",), ("schedule", "show")):
        out = run_cli(*cmd, home=home).stdout.decode()
        assert re.search(r"snapshot: last success \S+ \S+, next 2[1-9]\d\d-", out), out


def _alive(pid: int) -> bool:
    """``pid`` is a live process (not a zombie) still running ``sleep``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and cmd.startswith(b"sleep")


def test_an_alert_hook_past_its_timeout_is_stopped_with_all_it_started(tmp_path) -> None:
    """A hook that takes longer than alert_timeout is stopped with every process it started
    (its process group; these ignore SIGTERM, so SIGKILL after the grace): before, only the
    `sh` was killed, its children lived on (one more set at every pass), and the pass always
    took the whole 60 s."""
    home, _remotes, _src = make(tmp_path)
    gone = tmp_path / "gone"
    gone.mkdir()
    pids = tmp_path / "hook.pids"
    hook = f'trap "" TERM; sleep 611 & echo $! >> {pids}; sleep 612 & echo $! >> {pids}; wait'
    run_cli("schedule", "set", f"alert={hook}", "alert_timeout=1", "snapshot=1s",
            f"sources={gone}", home=home)  # fmt: skip
    assert run_cli("schedule", "set", "alert_timeout=0", home=home, check=18)
    assert run_cli("schedule", "set", "alert_timeout=soon", home=home, check=18)
    gone.rmdir()  # the timed snapshot fails: a job_failed event for the hook
    started = time.monotonic()
    try:
        res = run(home, code=20)
        took = time.monotonic() - started
        (problem,) = res["alert_errors"]
        assert "timed out after 1s" in problem and "alert_timeout" in problem, problem
        assert took < 30, took  # 1 s and the 2 s grace, not the default 60 s
        started_pids = [int(x) for x in pids.read_text().split()]
        assert len(started_pids) == 2
        deadline = time.monotonic() + 5  # SIGKILL is sent before run returns; allow reaping
        while any(_alive(p) for p in started_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started_pids if _alive(p)], "the hook's processes outlived it"
    finally:
        for p in [int(x) for x in pids.read_text().split()] if pids.exists() else []:
            if _alive(p):
                os.kill(p, 9)


@needs_fuse
def test_a_snapshot_that_cannot_be_taken_fails_and_alerts_and_a_dead_mount_shows(tmp_path) -> None:
    """Unmounted with no sources, the timed snapshot takes nothing: the job fails (exit 20, a
    job_failed alert at each pass), its last success stays never. When the mount's daemon
    died (kill -9), the failure and `status` say so and send the user to `vaultfs mount`,
    which cleans the dead mount up (docs/mount.md). Before, the pass exited 0 and recorded
    a success that took no snapshot, and `status` showed nothing of the dead mount; then
    (review13) both said to `fusermount3 -u` it first."""
    home, _remotes, _src = make(tmp_path)
    log = tmp_path / "events.jsonl"
    run_cli("schedule", "set", "snapshot=1s", f"alert=cat >> {log}", home=home)
    res = run(home, code=20)
    assert "no snapshot taken: the vault is not mounted" in res["failed"]["snapshot"]
    (ev,) = events(log)
    assert ev["event"] == "job_failed" and ev["job"] == "snapshot", ev
    snap = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]["jobs"]
    assert snap["snapshot"]["last_success"] is None and snap["snapshot"]["last_error"]

    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        pid = mount_pid(home)
        assert pid is not None
        os.kill(pid, 9)
        _wait(lambda: not os.path.exists(f"/proc/{pid}"), "the killed daemon gone")
        time.sleep(1.1)  # the snapshot is due again
        res = run(home, code=20)
        assert f"the mount at {mp} is gone" in res["failed"]["snapshot"], res
        assert f"`vaultfs mount {mp}` cleans up the dead mount" in res["failed"]["snapshot"]
        assert "fusermount" not in res["failed"]["snapshot"], res
        assert [e["event"] for e in events(log)] == ["job_failed", "job_failed"]
        st = run_cli("status", home=home)
        said = " ".join(st.stdout.decode().split())
        assert f"the mount at {mp} is gone: its daemon (pid {pid}) died" in said, said
        assert f"`vaultfs mount {mp}` cleans up the dead mount" in said, said
        assert f"`vaultfs umount {mp}` only cleans it up" in said and "fusermount" not in said
        st = json.loads(run_cli("status", "--json", home=home).stdout)
        assert st["dead_mount"]["pid"] == pid
        assert st["routine"]["jobs"]["snapshot"]["last_success"] is None
        run_cli("mount", str(mp), home=home)  # as status says: it cleans the dead mount up
        assert os.path.ismount(mp) and "dead_mount" not in json.loads(
            run_cli("status", "--json", home=home).stdout
        )
    finally:
        unmount(mp, home)
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)  # still dead


def test_a_failed_pass_and_a_failing_alert_command_show_in_status(tmp_path) -> None:
    """A pass that cannot open the vault (a wrong passphrase) and an alert command that
    fails (not found: exit 127) are kept in routine.json and shown by `status` (text and
    --json) until a pass runs and the command works again."""
    home, _remotes, src = make(tmp_path)
    run_cli("schedule", "set", "alert=no-such-alert-command", "snapshot=1h",
            f"sources={src}", home=home)  # fmt: skip
    run_cli("run", home=home, passphrase="not the passphrase", check=10)
    rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert rt["last_pass_failed"]["error"] and rt["last_pass_failed"]["time"] > 0
    assert "exited 127" in rt["last_alert_error"]["error"], rt["last_alert_error"]
    text = " ".join(run_cli("status", home=home).stderr.decode().split())
    assert "the last pass failed at" in text and "the alert command failed at" in text, text
    assert "exited 127" in text
    run(home)  # the snapshot runs: the pass completes, no alert
    rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert rt["last_pass_failed"] is None and rt["last_pass"] > 0
    assert rt["last_alert_error"]["error"]  # no alert since: the last error stands
    log = tmp_path / "events.jsonl"
    run_cli("schedule", "set", f"alert=cat >> {log}", home=home)
    run_cli("run", home=home, passphrase="not the passphrase", check=10)
    assert events(log)[-1]["job"] == "run"
    rt = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]
    assert rt["last_alert_error"] is None and rt["last_pass_failed"]


def test_an_overdue_job_shows_as_overdue(tmp_path) -> None:
    """A job whose time has passed with no pass to run it (no timer, no mount) shows as
    overdue since then in `status` and `schedule show`, not as due "now"."""
    home, _remotes, src = make(tmp_path)
    run_cli("schedule", "set", "snapshot=1s", f"sources={src}", home=home)
    text = run_cli("status", home=home).stdout.decode()
    assert "snapshot: last success never, due at the next pass (never ran)" in text, text
    run(home)
    time.sleep(1.1)
    for cmd in (("status",), ("schedule", "show")):
        text = run_cli(*cmd, home=home).stdout.decode()
        assert re.search(r"snapshot: last success \S+ \S+, overdue since \S+ \S+", text), text
    j = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]["jobs"]
    assert j["snapshot"]["overdue"] and j["snapshot"]["next_run"] < time.time()
    assert not j["repair"]["overdue"]  # every pass: never overdue


def test_schedule_show_and_status_say_the_same_next_runs(tmp_path) -> None:
    """Retention also runs after each timed snapshot: `schedule show` (text and --json) says
    its next run is the next snapshot's, as `status` does. Before (review13), `schedule
    show` said a day after its last run."""
    home, _remotes, src = make(tmp_path)
    run_cli("schedule", "set", "snapshot=1h", "retention=--keep-last 3", f"sources={src}",
            home=home)  # fmt: skip
    assert set(run(home)["ran"]) >= {"snapshot", "retention"}

    def next_retention(*cmd: str) -> str:
        text = run_cli(*cmd, home=home).stdout.decode()
        (line,) = [x for x in text.splitlines() if x.strip().startswith("retention:")]
        return line.rpartition(", ")[2]  # "next T" (the last success has its own format)

    said = next_retention("schedule", "show")
    assert said == next_retention("status") and said.startswith("next "), said
    shown = json.loads(run_cli("schedule", "show", "--json", home=home).stdout)["jobs"]
    status = json.loads(run_cli("status", "--json", home=home).stdout)["routine"]["jobs"]
    assert shown["retention"]["next_run"] == shown["snapshot"]["next_run"], shown
    assert {j: v["next_run"] for j, v in shown.items()} == {
        j: v["next_run"] for j, v in status.items()
    }


def test_the_prune_job_says_which_bytes_it_freed(tmp_path) -> None:
    """The pass's prune line tells the plaintext freed (6 bytes of a forgotten file) from
    the stored bytes each remote holds less (its shards). Before (review13) it said "bytes
    freed 6" beside "freed per remote … 174934"."""
    home, remotes, src = make(tmp_path)
    run_cli("backup", str(src), home=home)
    (src / "a.txt").write_text("world, again\n")
    run_cli("backup", str(src), home=home)
    run_cli("forget", "--keep-last", "1", home=home)
    run_cli("schedule", "set", "prune=1h", home=home)
    said = run_cli("run", home=home).stdout.decode()
    line = " ".join(x for x in said.splitlines() if x.startswith("prune:"))
    assert line.startswith("prune: data bytes freed 6, stored bytes freed per remote ("), said
    stored = dict(re.findall(r"(\S+) (\d+)[,)]", line.partition("per remote (")[2]))
    assert sorted(stored) == sorted(map(str, remotes)), line
    assert all(int(b) > 6 for b in stored.values()), line  # whole shards, not the plaintext


def test_schedule_errors_are_one_clear_line(tmp_path) -> None:
    """A bad alert_timeout is named as the other keys are; `schedule set` and `schedule
    show` without a vault exit 16 (no vault), as other commands do."""
    home, _remotes, _src = make(tmp_path)
    res = run_cli("schedule", "set", "alert_timeout=abc", home=home, check=18)
    msg = res.stderr.decode()
    assert "invalid alert_timeout='abc': a positive number of seconds" in msg, msg
    assert "could not convert" not in msg
    nowhere = tmp_path / "nowhere"
    for cmd in (("schedule", "set", "snapshot=1h"), ("schedule", "show")):
        res = run_cli(*cmd, home=nowhere, check=16)
        assert f"no vault at {nowhere}" in res.stderr.decode(), res.stderr


def test_the_documented_cron_line_reads_a_passphrase_with_spaces(tmp_path) -> None:
    """docs/operations.md's commands, run as they stand: its printf writes routine.env into
    the default home, where `schedule install`'s unit reads it, and its cron line sources
    that file: a passphrase with spaces reaches `vaultfs run`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    (printf,) = [ln for ln in text.splitlines() if ln.startswith("printf ") and "routine.env" in ln]
    (cron,) = [ln for ln in text.splitlines() if ln.startswith("*/15 ") and "vaultfs run" in ln]
    user = tmp_path / "user"  # the user's $HOME: the vault in its default home
    (user / ".local" / "share").mkdir(parents=True)
    (user / ".local" / "state").mkdir()
    home, _remotes, src = make(tmp_path)
    (user / ".local" / "share" / "vaultfs").symlink_to(home)
    run_cli("schedule", "set", "snapshot=1h", f"sources={src}", home=home)
    # a short runtime directory: the control socket's path under the long test $HOME's
    # ~/.cache would not fit a unix socket
    runtime = Path(tempfile.mkdtemp(prefix="vfrt-"))
    env = vaultfs_env(home, HOME=str(user), XDG_RUNTIME_DIR=str(runtime))
    del env["VAULTFS_PASSPHRASE"], env["VAULTFS_HOME"]
    subprocess.run(["sh", "-c", printf], env=env, check=True, timeout=60)
    unit = run_cli("schedule", "install", "--unit-dir", str(tmp_path / "units"), home=home)
    assert (
        f"EnvironmentFile=-{home / 'routine.env'}"
        in (tmp_path / "units" / "vaultfs-run.service").read_text()
    ), unit.stdout  # the file the docs' printf wrote
    command = cron.split(None, 5)[5].replace(
        "vaultfs run", f"{sys.executable} -m cli.main run"
    )  # the cron fields off, this interpreter's vaultfs
    proc = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    shutil.rmtree(runtime, ignore_errors=True)
    logged = (user / ".local" / "state" / "vaultfs-run.log").read_text()
    assert proc.returncode == 0, logged
    assert "snapshot" in logged and "not found" not in logged, logged
