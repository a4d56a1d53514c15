"""Maintenance on a mounted vault: the mount daemon runs verify, repair, prune, forget,
remote add/remove/replace, key rotation and re-encryption for the commands that would otherwise
need the vault's lock (which the daemon holds), and for the routine's passes.

A client (cli/mounted.py :func:`run_in_mount`) sends ``{"cmd": "job", "job": NAME, "args":
{...}}`` on the control socket (vaultfs/control.py); the reply's ``result`` is the report the
same command prints unmounted (its ``--json`` form), so the client prints it and exits with
the same code. Rules (docs/mount.md, "Maintenance while mounted"):

* **One job at a time.** A request while a job runs is refused at once with VaultBusy
  ("busy: verify running since ..."); `vaultfs status` shows the running job. `forget
  --prune` is one job, refused whole before it forgets anything; `forget` without
  --prune only forgets snapshots (as `snapshot delete` does) and runs beside a job.
* **Off the FUSE loop and the control socket.** A job runs in the runner's own thread; the
  control request waits in its handler thread, other requests are served meanwhile. The
  thread keeps the daemon's priority: a thread of lower priority holding the GIL would make
  the FUSE loop wait for it whenever the machine is busy (priority inversion).
* **A client that goes away** (Ctrl-C) does not stop the job: every job is crash-safe and
  resumable, so it runs to its end and the next request is served after it. `umount` waits
  for it before the daemon closes the vault.
* **Foreground first.** Every remote operation of a job goes through one :class:`Share`
  (vaultfs/backends.py): at most ``maintenance_ops`` at once, ``maintenance_rate`` bytes per
  second read, and a pause (at most 0.5 s per operation) while writers wait for cache
  budget. Both settings are schedule keys
  (``vaultfs schedule set maintenance_rate=64M maintenance_ops=4``; vaultfs/routine.py),
  read when a job starts. Prune also holds the mount's chunk references still
  (:meth:`VaultFS.hold_references`): a block stored meanwhile could deduplicate against a
  chunk it is about to drop. Writes go on into the cache, up to its budget.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import Share
from .errors import InputError, VaultBusy

if TYPE_CHECKING:
    from .vault import Vault

log = logging.getLogger("vaultfs.maintenance")

DEFAULT_RATE = 64 * 1024 * 1024
DEFAULT_OPS = 4
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_rate(text: str) -> int:
    """'64M', '500k', '0' (no limit) → bytes per second; ValueError otherwise."""
    t = text.strip().lower().removesuffix("/s").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ValueError("a byte rate such as 64M, 500k or 0 (no limit)") from None
    if value < 0:
        raise ValueError("a byte rate such as 64M, 500k or 0 (no limit)")
    return int(value * _SIZE_UNITS[unit])


def share_settings(sched: dict[str, str]) -> tuple[int, int]:
    """(bytes per second, concurrent remote operations) from the schedule's settings."""
    rate = parse_rate(sched["maintenance_rate"]) if sched.get("maintenance_rate") else DEFAULT_RATE
    ops = int(sched["maintenance_ops"]) if sched.get("maintenance_ops") else DEFAULT_OPS
    return rate, ops


class Runner:
    """Runs the jobs of :data:`JOBS` on the daemon's open vault, one at a time.

    ``hold_references()`` is called from the job's thread around prune and returns the
    function that lets go; ``busy()`` says the foreground needs the machine; ``settings()``
    gives the schedule (for :func:`share_settings`)."""

    def __init__(
        self,
        vault: Vault,
        home: Path,
        hold_references: Callable[[], Callable[[], None]],
        busy: Callable[[], bool],
        settings: Callable[[], dict[str, str]],
        delete_snapshots: Callable[[list[str]], dict] | None = None,
    ) -> None:
        self.vault = vault
        self.delete_snapshots = delete_snapshots
        self.home = home
        self.hold_references = hold_references
        self.busy = busy
        self.settings = settings
        self.current: dict | None = None  # {"job", "started"} of the running job
        #: the running job's ``progress(done, total)`` (bytes; total None while unknown),
        #: for a client that asked for it (vaultfs/control.py); None otherwise
        self.progress: Callable[[int, int | None], None] | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaultfs-maintenance")

    def run(
        self, job: str, args: dict, progress: Callable[[int, int | None], None] | None = None
    ) -> dict:
        """Run ``job`` with ``args`` and return its report; blocks the calling thread (a
        control handler) until it ends. VaultBusy when a job is running; InputError for an
        unknown job; the job's own errors as they are. ``progress(done, total)``: told the
        bytes done by the jobs that count them (verify, repair, prune, reencrypt, remote
        remove and replace)."""
        fn = JOBS.get(job)
        if fn is None:
            raise InputError(f"unknown maintenance job {job!r}: choose from {', '.join(JOBS)}")
        try:
            inspect.signature(fn).bind(self, **args)
        except TypeError as e:  # also args that are not an object of named values
            raise InputError(f"bad arguments for maintenance job {job!r}: {e}") from None
        if not exclusive(job, args):  # forgets only: beside a running job, in this thread
            return fn(self, **args)
        if not self._lock.acquire(blocking=False):
            cur = self.current or {}
            since = time.strftime("%H:%M:%S", time.localtime(cur.get("started", time.time())))
            raise VaultBusy(
                f"busy: {cur.get('job', 'a job')} running since {since} in the mount daemon; "
                "run this again when it has finished (`vaultfs status` shows it)"
            )
        self.current = {"job": job, "started": time.time()}
        self.progress = progress

        def work() -> dict:
            t0 = time.monotonic()
            log.info("maintenance: %s started", job)
            try:
                return fn(self, **args)
            finally:  # before the caller sees the result: its next request is not "busy"
                log.info("maintenance: %s ended after %.1fs", job, time.monotonic() - t0)
                self.current = None
                self.progress = None
                self._lock.release()

        try:
            fut = self._pool.submit(work)
        except BaseException:
            self.current = None
            self._lock.release()
            raise
        return fut.result()

    def segments(self) -> Callable[[int, int], None] | None:
        """A ``progress(done, total)`` in segments for :attr:`progress`, in bytes (a segment is
        ``segment_size`` bytes of work, as the commands count it unmounted)."""
        progress = self.progress
        if progress is None:
            return None
        size = self.vault.segment_size
        return lambda done, total: progress(done * size, total * size)

    def share(self) -> Share:
        """A fresh share for one job, from the current settings."""
        rate, ops = share_settings(self.settings())
        return Share(rate=rate, ops=ops, busy=self.busy)

    def close(self) -> None:
        """Wait for a running job to end (the vault is closed next)."""
        self._pool.shutdown(wait=True)


# -- the jobs: the same engine calls as the commands make unmounted ---------------------------
def _verify(
    r: Runner,
    remotes: list[str] | None = None,
    mode: str = "confidence",
    sample: float | None = None,
    max_duration: float | None = None,
) -> dict:
    from . import verify

    rep = verify.audit(
        r.vault, remotes, mode=mode, sample=sample, max_duration=max_duration,
        wrap=r.share().wrap, progress=r.progress,
    )  # fmt: skip
    return rep.to_dict()


def _repair(r: Runner, dry_run: bool = False, sources: list[str] | None = None) -> dict:
    from . import repair

    paths = [Path(p) for p in sources or []]
    rep = repair.repair(
        r.vault, dry_run=dry_run, sources=paths, wrap=r.share().wrap, background=True,
        progress=None if dry_run else r.progress,
    )  # fmt: skip
    return rep.to_dict()


def _prune(r: Runner, repack_below: float | None = None, dry_run: bool = False) -> dict:
    from . import prune

    below = prune.REPACK_BELOW if repack_below is None else repack_below
    release = r.hold_references()
    try:
        return prune.prune(
            r.vault, repack_below=below, dry_run=dry_run,
            progress=None if dry_run else r.segments(),
        ).as_dict()  # fmt: skip
    finally:
        release()


def _remote_add(r: Runner, spec: str, domain: str | None = None) -> dict:
    from . import repair

    info = repair.add_remote(r.vault, spec, domain, wrap=r.share().wrap)
    return {**info, "survives_losses_design": r.vault.status()["survives_losses_design"]}


def _remote_remove(r: Runner, name: str) -> dict:
    from . import repair

    return repair.remove_remote(
        r.vault, name, wrap=r.share().wrap, background=True, progress=r.progress
    ).to_dict()


def _remote_replace(r: Runner, old: str, new: str, domain: str | None = None) -> dict:
    from . import repair

    return repair.replace_remote(
        r.vault, old, new, domain, wrap=r.share().wrap, background=True, progress=r.progress
    ).to_dict()


def _rotate(r: Runner, suite: int | None = None) -> dict:
    from . import rotation

    epoch = rotation.rotate(r.vault, suite)
    rep = r.vault.flush()
    return {"epoch": epoch, "suite": r.vault.suite, "complete": rep.complete, "errors": rep.errors}


def _reencrypt(r: Runner, suite: int) -> dict:
    from . import rotation

    rep = rotation.reencrypt(r.vault, suite, r.segments(), keyfile=r.home / "key.json")
    return dict(rep.__dict__)


def _forget(r: Runner, policy: list[str], dry_run: bool = False, prune: bool = False) -> dict:
    from . import forget, retention

    if r.delete_snapshots is None:
        raise InputError("this daemon cannot forget snapshots")
    pol = retention.Policy.from_args(policy)
    hold = r.hold_references if prune and not dry_run else None
    return forget.command(r.vault, pol, dry_run, prune, r.delete_snapshots, hold)


def exclusive(job: str, args: dict) -> bool:
    """Whether ``job`` takes the runner (one at a time, refused while another runs): every
    job but `forget` without --prune, which only forgets snapshots (as `snapshot delete`
    does beside a running job). `forget --prune` takes it before it forgets anything, so a
    busy daemon refuses the whole command."""
    return not (job == "forget" and not args.get("prune"))


#: The jobs a mount daemon runs: name -> function(runner, **args) -> report (JSON).
JOBS: dict[str, Callable[..., dict]] = {
    "verify": _verify,
    "repair": _repair,
    "prune": _prune,
    "forget": _forget,
    "remote-add": _remote_add,
    "remote-remove": _remote_remove,
    "remote-replace": _remote_replace,
    "rotate": _rotate,
    "reencrypt": _reencrypt,
}
