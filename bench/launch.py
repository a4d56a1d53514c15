"""Run a command and report its own peak RSS and CPU time, untainted by the caller's memory.

Linux folds the high-water mark of the address space a process leaves at ``exec`` into that
process's ``ru_maxrss``. A child that a big process (a pytest session, a benchmark driver)
forks or vforks and then execs therefore reports at least the parent's resident size, however
small it really is. This file is started with ``python -I -S`` (a fresh, small interpreter);
it starts the command, waits for it with ``wait4`` and writes ``<ru_maxrss bytes> <cpu
seconds>`` to the report path, so the figure is the command's own (the largest of the command
and every descendant it waited for; at least this launcher's ~10 MB).

Usage: ``python -I -S launch.py REPORT_PATH CMD [ARG...]``. The exit status is the command's
(a command killed by a signal kills this launcher with the same signal); SIGTERM, SIGINT and
SIGHUP are passed on, and the command dies with the launcher (``PR_SET_PDEATHSIG``).
"""

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    report, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)  # noqa: PLW1509
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: proc.send_signal(n))
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    with open(report, "w") as f:
        f.write(f"{usage.ru_maxrss * 1024} {usage.ru_utime + usage.ru_stime}\n")
    if proc.returncode < 0:
        signal.signal(-proc.returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -proc.returncode)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
