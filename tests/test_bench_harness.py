"""The benchmark harness measures the command's own memory, not its caller's.

Linux folds the address space a process leaves at ``exec`` into its ``ru_maxrss``, so a tiny
command started straight from a large process reports the large one's size (this failed the
hostile-remote tests' memory bound in CI, where the pytest process had grown past it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.harness import launch_report, launched, run

BIG = 300 << 20


def _grow() -> bytearray:
    ballast = bytearray(BIG)
    for i in range(0, BIG, os.sysconf("SC_PAGE_SIZE")):
        ballast[i] = 1
    return ballast


def test_a_direct_child_reports_its_parents_size() -> None:
    """The quirk the launcher exists for (if a kernel stops doing it, the launcher is moot)."""
    ballast = _grow()
    proc = subprocess.Popen(["true"])
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    assert usage.ru_maxrss * 1024 >= BIG
    del ballast


def test_launched_reports_the_commands_own_peak(tmp_path: Path) -> None:
    ballast = _grow()
    report = tmp_path / "rusage"
    small = subprocess.run(launched(["true"], report), check=True)
    assert small.returncode == 0
    rss, cpu = launch_report(report)
    assert 0 < rss < 64 << 20, rss
    assert cpu >= 0.0
    grow = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    subprocess.run(launched([sys.executable, "-c", grow], report), check=True)
    rss, _cpu = launch_report(report)
    assert 200 << 20 <= rss < BIG, rss
    del ballast


def test_launched_passes_on_exit_codes_and_signals(tmp_path: Path) -> None:
    report = tmp_path / "rusage"
    assert subprocess.run(launched(["sh", "-c", "exit 7"], report)).returncode == 7
    killed = subprocess.run(launched(["sh", "-c", "kill -TERM $$"], report))
    assert killed.returncode == -15
    assert launch_report(report)[0] > 0


def test_harness_run_measures_the_command(tmp_path: Path) -> None:
    ballast = _grow()
    m = run(["sh", "-c", "echo hi"], sync_first=False)
    assert m.returncode == 0 and m.stdout == "hi\n"
    assert 0 < m.peak_rss < 64 << 20
    del ballast
