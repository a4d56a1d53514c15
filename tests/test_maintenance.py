"""Unit tier of maintenance on a mounted vault (vaultfs/maintenance.py): one job at a time with
a clear "busy" answer, a job that outlives its caller, and the background share of the remotes
(vaultfs/backends.py Share/Throttled) on a memory backend with a fake clock. The same paths
through a real mount: tests/test_live.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vaultfs import maintenance, routine
from vaultfs.backends import MemoryBackend, Share, stack
from vaultfs.errors import InputError, VaultBusy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _runner(tmp_path: Path) -> maintenance.Runner:
    return maintenance.Runner(
        None,  # type: ignore[arg-type]  # the jobs below do not touch the vault
        tmp_path,
        hold_references=lambda: lambda: None,
        busy=lambda: False,
        settings=dict,
    )


def test_one_job_at_a_time_and_a_job_outlives_its_caller(tmp_path, monkeypatch) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(r: maintenance.Runner, n: int) -> dict:
        started.set()
        release.wait(60)
        return {"n": n}

    monkeypatch.setitem(maintenance.JOBS, "slow", slow)
    runner = _runner(tmp_path)
    got: dict = {}
    first = threading.Thread(target=lambda: got.update(runner.run("slow", {"n": 1})))
    first.start()
    assert started.wait(60)
    assert runner.current is not None and runner.current["job"] == "slow"
    with pytest.raises(VaultBusy, match="busy: slow running since"):
        runner.run("slow", {"n": 2})
    release.set()
    first.join(60)
    assert got == {"n": 1} and runner.current is None
    assert runner.run("slow", {"n": 3}) == {"n": 3}  # free again
    with pytest.raises(InputError, match="unknown maintenance job"):
        runner.run("format-disk", {})
    with pytest.raises(InputError, match="bad arguments for maintenance job 'slow'"):
        runner.run("slow", {"n": 1, "force": True})
    runner.close()


def test_a_failing_job_frees_the_runner(tmp_path, monkeypatch) -> None:
    def broken(r: maintenance.Runner) -> dict:
        raise InputError("no such remote")

    monkeypatch.setitem(maintenance.JOBS, "broken", broken)
    runner = _runner(tmp_path)
    for _ in range(2):  # the second call is not refused as busy
        with pytest.raises(InputError, match="no such remote"):
            runner.run("broken", {})
    runner.close()


def test_share_charges_the_byte_rate_and_caps_operations() -> None:
    clock = FakeClock()
    share = Share(rate=1000, ops=1, sleep=clock.sleep, clock=clock)
    mem = MemoryBackend("m")
    mem.put_bytes("data", "a", b"x" * 500)
    mem.put_bytes("data", "b", b"y" * 1500)
    b = stack(mem, share.wrap)
    assert b.cat("data", "a") == b"x" * 500
    assert b.cat("data", "b") == b"y" * 1500
    # 2000 bytes at 1000 B/s: two seconds of waiting in all, charged after each read
    assert sum(clock.slept) == pytest.approx(2.0)
    assert share.paused == pytest.approx(2.0)
    assert share.slots is not None and share.slots.acquire(blocking=False)  # released after use
    share.slots.release()


def test_share_pauses_while_the_foreground_is_busy_but_never_stops() -> None:
    clock = FakeClock()
    busy_for = {"calls": 3}

    def busy() -> bool:
        busy_for["calls"] -= 1
        return busy_for["calls"] >= 0

    share = Share(busy=busy, sleep=clock.sleep, clock=clock)
    b = stack(MemoryBackend("m"), share.wrap)
    assert b.list("data") == []
    assert len(clock.slept) == 3  # waited while busy, then went on
    forever = Share(busy=lambda: True, max_pause=1.0, sleep=clock.sleep, clock=clock)
    assert stack(MemoryBackend("n"), forever.wrap).list("data") == []  # bounded pause
    assert forever.paused == pytest.approx(1.0)


def test_share_settings_from_the_schedule() -> None:
    assert maintenance.share_settings({}) == (maintenance.DEFAULT_RATE, maintenance.DEFAULT_OPS)
    sched = {"maintenance_rate": "500k", "maintenance_ops": "2"}
    assert maintenance.share_settings(sched) == (500 * 1024, 2)
    assert maintenance.parse_rate("0") == 0
    assert maintenance.parse_rate("64MB/s") == 64 * 1024 * 1024
    routine.validate("maintenance_rate", "10M")
    for key, bad in (("maintenance_rate", "fast"), ("maintenance_ops", "0")):
        with pytest.raises(InputError, match=f"invalid {key}"):
            routine.validate(key, bad)


def test_share_charges_bytes_read_in_place_through_the_stack() -> None:
    """Repair reads a local-directory remote's objects where they lie: reported through the
    backend stack (read_in_place), they cost the share's byte rate like a download; a stack
    without a share charges nothing."""
    clock = FakeClock()
    share = Share(rate=1000, sleep=clock.sleep, clock=clock)
    b = stack(MemoryBackend("m"), share.wrap)
    b.read_in_place(3000)
    assert sum(clock.slept) == pytest.approx(3.0) and share.paused == pytest.approx(3.0)
    stack(MemoryBackend("n")).read_in_place(3000)  # no share: no wait, no error
    assert sum(clock.slept) == pytest.approx(3.0)
