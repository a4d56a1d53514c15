"""The common harness every benchmark section uses.

- :func:`run` starts a command and measures its wall time and memory: the exact peak RSS of
  the largest process in its tree (``wait4``'s ``ru_maxrss``, which Linux reports as the
  maximum over the child and every descendant it waited for; taken by ``bench/launch.py`` so
  the driver's own size is not folded in, see :func:`launched`), the polled high-water mark
  of the command alone (``VmHWM`` from /proc) and the polled peak of the whole tree's summed
  RSS, plus the load average before and after (the machine may be shared).
- :func:`section` registers a section; ``bench/sections/<name>.py`` files register themselves
  on import, so adding a section is adding a file.
- :class:`Metric` is one reported figure with an optional target; :func:`render_table` prints
  them.
"""

from __future__ import annotations

import operator
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000  # throughput and sizes are reported in decimal megabytes
MiB = 1024 * 1024
#: The memory poller's period. It competes for the same cores as the command it watches, so
#: it reads only the tree's own /proc entries (~1% of a core at this period).
POLL_S = 0.03


class BenchError(Exception):
    """A benchmark step failed (a command exited non-zero, output was wrong, ...)."""


@dataclass
class Measurement:
    """What :func:`run` observed for one command."""

    cmd: list[str]
    seconds: float
    returncode: int
    cpu_seconds: float  # user + system time of the process and its waited-for descendants
    peak_rss: int  # bytes: exact, largest single process in the tree (wait4 ru_maxrss)
    peak_rss_top: int  # bytes: polled VmHWM of the started process itself
    peak_rss_tree: int  # bytes: polled peak of the summed RSS of the whole tree
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stdout: str = ""
    stderr: str = ""
    # (seconds since start, RSS of the started process in bytes), at most ~200 points
    rss_series: list[tuple[float, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout"] = self.stdout[-2000:]
        d["stderr"] = self.stderr[-2000:]
        return d


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/<pid>/task/<tid>/children (a few small reads)
    rather than a scan of every process on the machine."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


PAGE = os.sysconf("SC_PAGE_SIZE")


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


LAUNCH = Path(__file__).with_name("launch.py")


def launched(argv: Sequence[str], report: Path) -> list[str]:
    """``argv`` started through ``bench/launch.py``, which writes the command's own peak RSS
    and CPU time to ``report`` (read with :func:`launch_report`). A direct child of a large
    process would report at least that process's resident size as its ``ru_maxrss``."""
    return [sys.executable, "-I", "-S", str(LAUNCH), str(report), *argv]


def launch_report(report: Path) -> tuple[int, float]:
    """(peak RSS in bytes, CPU seconds) that ``bench/launch.py`` wrote, or (0, 0.0) when the
    launcher was killed before the command ended."""
    try:
        rss, cpu = report.read_text().split()
        return int(rss), float(cpu)
    except (OSError, ValueError):
        return 0, 0.0


def run(
    cmd: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    stdin_path: Path | None = None,
    sync_first: bool = True,
) -> Measurement:
    """Run ``cmd`` to completion, measuring time and peak memory (see the module docstring).

    With ``sync_first`` (the default) dirty pages left by earlier steps are written out before
    the clock starts, so one command's writeback is not charged to the next.

    Raises :class:`BenchError` when ``check`` and the command exits non-zero.
    """
    argv = [str(c) for c in cmd]
    if sync_first:
        os.sync()
    load_before = os.getloadavg()
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    out_f = _TempText()
    err_f = _TempText()
    report_fd, report_name = tempfile.mkstemp(prefix="vaultfs-bench-rusage-")
    os.close(report_fd)
    report = Path(report_name)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        launched(argv, report),
        env=dict(env) if env else None,
        cwd=cwd,
        stdin=stdin,
        stdout=out_f.f,
        stderr=err_f.f,
    )
    launcher = proc.pid
    peaks = {"top": 0, "tree": 0}
    series: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        top = 0  # the command: the launcher's one child
        while not done.is_set():
            if not top:
                top = next(iter(_children(launcher)), 0)
            tree = _tree(launcher)
            total = 0
            for q in tree[1:]:
                rss = _rss(q)
                if rss is None:
                    continue
                total += rss
                if q == top:
                    series.append((round(time.perf_counter() - t0, 3), rss))
            peaks["tree"] = max(peaks["tree"], total)
            if top:
                peaks["top"] = max(peaks["top"], _vm_hwm(top))
            done.wait(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        _pid, status, _usage = os.wait4(launcher, 0)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): do not leave the child running
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()
        poller.join()
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_rss, cpu_seconds = launch_report(report)
    report.unlink(missing_ok=True)
    m = Measurement(
        argv,
        seconds,
        proc.returncode,
        cpu_seconds,
        peak_rss,
        peaks["top"],
        peaks["tree"],
        load_before,
        os.getloadavg(),
        out_f.read(),
        err_f.read(),
        series[:: max(1, len(series) // 200)],
    )
    if check and m.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:3])} … exited with {m.returncode}:\n{m.stderr[-3000:] or m.stdout[-3000:]}"
        )
    return m


class _TempText:
    """A temporary file for a child's output (no pipe to drain while we wait4)."""

    def __init__(self) -> None:
        import tempfile

        self.f = tempfile.TemporaryFile()

    def read(self) -> str:
        self.f.seek(0)
        data = self.f.read().decode(errors="replace")
        self.f.close()
        return data


def tree_bytes(*roots: Path) -> int:
    """Sum of the apparent sizes of every regular file under ``roots`` (what a provider bills)."""
    total = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def warm(path: Path) -> None:
    """Read a file once so both sides of a comparison start with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- metrics -----------------------------------------------------------------------------------
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass
class Metric:
    """One reported figure. ``target`` is (op, threshold) with op in >=, <=, ==; None = info.

    ``ours`` / ``peer`` are the human-readable figures behind a ratio (vaultfs and the
    reference measured in the same run).
    """

    name: str
    value: float | bool
    unit: str = ""
    target: tuple[str, float | bool] | None = None
    ours: str = ""
    peer: str = ""
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        op, threshold = self.target
        return bool(_OPS[op](self.value, threshold))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass
class SectionResult:
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(m.passed is not False for m in self.metrics)


@dataclass
class Section:
    name: str
    description: str
    fn: Callable[[Any], SectionResult]


SECTIONS: dict[str, Section] = {}


def section(name: str, description: str) -> Callable:
    """Decorator: register ``fn(ctx) -> SectionResult`` as the benchmark section ``name``."""

    def deco(fn: Callable[[Any], SectionResult]) -> Callable[[Any], SectionResult]:
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} registered twice")
        SECTIONS[name] = Section(name, description, fn)
        return fn

    return deco


def fmt_value(m: Metric) -> str:
    if isinstance(m.value, bool):
        return "yes" if m.value else "NO"
    if m.unit == "x":
        return f"{m.value:.2f}x"
    if m.unit == "MB":
        return f"{m.value:.0f} MB"
    return f"{m.value:.3g}{(' ' + m.unit) if m.unit else ''}"


def fmt_target(m: Metric) -> str:
    if m.target is None:
        return ""
    op, t = m.target
    if isinstance(t, bool):
        return "yes" if t else "no"
    if m.unit == "x":
        return f"{op} {t:.3g}x"
    return f"{op} {t:.3g}{(' ' + m.unit) if m.unit else ''}"


def render_table(results: Mapping[str, SectionResult]) -> str:
    """A plain-text table of every metric: figures, ratio, target, PASS/FAIL."""
    rows = [("section", "metric", "vaultfs", "peer", "value", "target", "result")]
    for name, res in results.items():
        if res.error:
            rows.append((name, "ERROR", "", "", "", "", "FAIL"))
        for m in res.metrics:
            verdict = {True: "PASS", False: "FAIL", None: "info"}[m.passed]
            rows.append((name, m.name, m.ours, m.peer, fmt_value(m), fmt_target(m), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
