"""The vault's routine: timed snapshots, retention, sampled audits, repair, prune and alerts,
run one pass at a time (`vaultfs run`, a systemd timer or cron; docs/operations.md).

Configuration lives in ``HOME/schedule.json`` (``vaultfs schedule set KEY=VALUE ...``), so it
needs no passphrase to change and applies from the next pass; what the jobs did lives in
``HOME/routine.json``. Both are replaced atomically; a pass holds ``HOME/routine.lock``, so
the mount daemon's passes and a timer's never overlap (on a mounted vault `vaultfs run` asks
the daemon for the pass: vaultfs/daemon.py). Keys (see :data:`KEYS`):

=================  ==========================================================================
snapshot=EVERY     a snapshot named ``auto-YYYY-MM-DD-HHMMSS``: of the mounted live tree
                   (through the mount's control socket); unmounted, a backup of
                   ``sources`` (without sources the job fails: no snapshot can be taken)
sources=P[:P...]   the paths an unmounted vault's timed snapshot backs up
retention=ARGS     forget's options, e.g. ``--keep-daily 7 --keep-weekly 4``: applied after
                   each timed snapshot and at least daily
verify=EVERY[:P%]  an audit sampling P% (default 1%) of each remote's blocks, every remote
verify_budget=S    the audit's time budget in seconds (default 600); a cut-off audit
                   resumes at the next pass, so every remote is covered within a few periods
repair=auto|off    rebuild, most at risk first, whenever a shard is lost or the vault
                   survives fewer remote losses than its profile promises (default auto)
prune=EVERY        free what forgotten snapshots used
alert=COMMAND      run by ``sh -c`` with one JSON event on stdin (:func:`alert`)
alert_timeout=S    seconds the alert command may take (default 60); then it is stopped,
                   with every process it started in its process group
grace=EVERY        how long a remote may stay unreachable before an alert (default 1h)
queue_age=EVERY    how old the oldest queued shard may get before an alert (default 1h)
maintenance_rate=R bytes per second that maintenance on a mounted vault may read from the
                   remotes (``64M``, ``500k``; ``0``: no limit; default 64M)
maintenance_ops=N  remote operations it may run at once (default 4)
=================  ==========================================================================

EVERY is ``30s``, ``15m``, ``1h``, ``2d``, ``1w`` or ``hourly``, ``daily``, ``weekly``. A
job is due when EVERY has passed since it last ran (failed or not). An unmounted pass first
sends what the upload queue holds (:func:`_push_queue`; mounted, the daemon's pusher does
that all the time); a remote found down there is asked nothing more in that pass. On a
vault that is mounted every job goes through the mount's control socket: verify, repair and
prune run in the daemon as maintenance jobs (vaultfs/maintenance.py, within the
foreground's share), one at a time; a job due while another runs there is reported as
``waiting: busy`` and stays due.

Events (the alert command's stdin, one JSON object): ``{"event": KIND, "time": unix time,
"vault": HOME, "message": sentence, ...}`` with KIND one of ``audit_failed``,
``remote_unreachable`` (``remote``, ``since``), ``redundancy_low`` (``survives_now``,
``promised``), ``queue_stale`` (``oldest_queued``, ``remotes``), ``job_failed`` (``job``,
``error``; job ``upload`` when sending the queue failed other than by a remote's error). A
condition that persists is announced once, again only after it cleared; job failures each
time. A pass that cannot run at all (the vault does not open; in the mount daemon, a pass that
stops) is a ``job_failed`` of job ``run`` (:func:`failed_pass`); routine.json keeps it and
the alert command's last error, and `vaultfs status` shows both.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import clock, control, maintenance, retention
from . import forget as forget_mod
from .errors import InputError, PolicyKeepsNothing, VaultBusy, VaultError
from .index import manifests as manifest_table
from .index import segments as segment_table
from .index import snapshots as snapshot_table

if TYPE_CHECKING:
    from .vault import Vault

log = logging.getLogger("vaultfs.routine")

SCHEDULE_FILE = "schedule.json"
STATE_FILE = "routine.json"
LOCK_FILE = "routine.lock"
#: Scheduled jobs, in the order a pass runs them.
JOBS = ("snapshot", "retention", "verify", "repair", "prune")
KEYS = (
    "snapshot", "sources", "retention", "verify", "verify_budget", "repair", "prune", "alert",
    "alert_timeout", "grace", "queue_age", "maintenance_rate", "maintenance_ops",
)  # fmt: skip
_WORDS = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400}
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_GRACE = 3600.0
DEFAULT_QUEUE_AGE = 3600.0
DEFAULT_VERIFY_BUDGET = 600.0
DEFAULT_SAMPLE = 1.0
#: seconds the alert command may take unless ``alert_timeout`` says otherwise
ALERT_TIMEOUT = 60.0
#: after SIGTERM at the timeout, how long the hook's process group has before SIGKILL
ALERT_KILL_GRACE = 2.0
#: the longest interval a job can have: a hundred years (what the clock can show stays far off)
MAX_EVERY = 100 * 365 * 86400.0


def _seconds(text: str) -> float:
    if text in _WORDS:
        return float(_WORDS[text])
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(min|[smhdw])", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise InputError(
            f"invalid interval {text!r}: use a number with s, m, h, d or w (e.g. 30m, 1h, 2d) "
            "or hourly, daily, weekly"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_every(text: str) -> float:
    """'15m' (or systemd's '15min'), '1h', '2d', 'daily' → seconds, at most :data:`MAX_EVERY`;
    InputError otherwise."""
    seconds = _seconds(text)
    if seconds > MAX_EVERY:
        raise InputError(
            f"invalid interval {text!r}: at most 100 years (36500d); to stop a job, unset it "
            "(e.g. `vaultfs schedule set snapshot=`)"
        )
    return seconds


def stored_every(text: str) -> float:
    """A stored interval in seconds (:func:`parse_every`), held to :data:`MAX_EVERY`: a value
    stored before the bound existed still works (as "practically never")."""
    return min(_seconds(text), MAX_EVERY)


def parse_sample(text: str) -> float:
    """'2%' (or '2') → 2.0: the percentage of each remote's blocks an audit checks, greater
    than 0 and at most 100 (`verify --sample` and the schedule's ``verify=daily:2%``);
    InputError otherwise."""
    try:
        sample = float(text.rstrip("%"))
    except ValueError:
        sample = -1.0
    if not 0 < sample <= 100:
        raise InputError(
            f"invalid verify sample {text!r}: a percentage greater than 0 and at most 100, e.g. 2%"
        )
    return sample


def _verify_spec(text: str, every_of: Callable[[str], float] = parse_every) -> tuple[float, float]:
    every, _, pct = text.partition(":")
    return every_of(every), parse_sample(pct) if pct else DEFAULT_SAMPLE


def validate(key: str, value: str) -> None:
    """InputError unless ``key=value`` is a valid schedule setting (an empty value unsets)."""
    if key not in KEYS:
        raise InputError(f"unknown schedule key {key!r}: choose from {', '.join(KEYS)}")
    if value == "":
        return
    try:
        if key in ("snapshot", "prune", "grace", "queue_age"):
            parse_every(value)
        elif key == "verify":
            _verify_spec(value)
        elif key in ("verify_budget", "alert_timeout"):
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < float("inf"):
                raise ValueError("a positive number of seconds")
        elif key == "repair" and value not in ("auto", "off"):
            raise ValueError("auto or off")
        elif key == "retention":
            retention.Policy.from_args(shlex.split(value))
        elif key == "maintenance_rate":
            maintenance.parse_rate(value)
        elif key == "maintenance_ops" and not (value.isdigit() and int(value) > 0):
            raise ValueError("a number of operations, at least 1")
        elif key == "sources":
            missing = [p for p in value.split(":") if p and not os.path.lexists(p)]
            if missing:  # found now, not at the first timed pass
                raise ValueError(f"{missing[0]}: no such file or directory")
            if not all(os.path.isabs(p) for p in value.split(":") if p):
                raise ValueError("give absolute paths (the routine runs from anywhere)")
    except ValueError as e:
        raise InputError(f"invalid {key}={value!r}: {e}") from None


# -- files -------------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}; fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_schedule(home: Path) -> dict[str, str]:
    """The schedule settings of the vault at ``home`` ({} when none is set)."""
    return {k: str(v) for k, v in _read(home / SCHEDULE_FILE).items()}


def set_schedule(home: Path, changes: dict[str, str]) -> dict[str, str]:
    """Validate and apply ``changes`` (an empty value removes the key); the new schedule."""
    for k, v in changes.items():
        validate(k, v)
    sched = load_schedule(home)
    for k, v in changes.items():
        if v == "":
            sched.pop(k, None)
        else:
            sched[k] = v
    _check_keeps_own_snapshots(sched)
    _write(home / SCHEDULE_FILE, sched)
    return sched


def _check_keeps_own_snapshots(sched: dict[str, str]) -> None:
    """PolicyKeepsNothing when the schedule's retention would forget each snapshot its
    ``snapshot`` job takes as soon as it is taken (a --keep-name glob matching no
    ``auto-…`` name, and no count or duration): every pass would snapshot, then forget."""
    if not (sched.get("snapshot") and sched.get("retention")):
        return
    policy = retention.Policy.from_args(shlex.split(sched["retention"]))
    now = clock.now()
    probe = retention.Snap("probe", now, snapshot_name(now))
    if not retention.apply([probe], policy, now).keep:
        raise PolicyKeepsNothing(
            f"retention={sched['retention']!r} ({policy.describe()}) would forget each "
            f"snapshot the routine takes (named like {probe.name}) right after taking it: add "
            "a glob that matches them (--keep-name 'auto-*') or a count (--keep-last 7)"
        )


def load_state(home: Path) -> dict:
    """What the jobs did: {"jobs": {job: {last_run, last_success, last_error, result}},
    "alerts": {condition: since}, "last_pass": time, "last_pass_failed": {time, error} (the
    newest pass could not run at all: :func:`failed_pass`), "last_alert_error": {time, error}
    (the alert command failed at the newest pass that alerted)}."""
    st = _read(home / STATE_FILE)
    st.setdefault("jobs", {})
    st.setdefault("alerts", {})
    return st


def interval(sched: dict[str, str], job: str) -> float | None:
    """Seconds between runs of ``job``; None when it is not scheduled (repair: every pass)."""
    if job == "verify":
        return _verify_spec(sched["verify"], stored_every)[0] if sched.get("verify") else None
    if job == "repair":
        return 0.0 if sched.get("repair", "auto") == "auto" and sched else None
    if job == "retention":
        return float(_WORDS["daily"]) if sched.get("retention") else None
    return stored_every(sched[job]) if sched.get(job) else None


def next_run(sched: dict[str, str], state: dict, job: str) -> float | None:
    """Unix time ``job`` is next due (0 when it never ran; a time in the past means due at
    the next pass); None if it is not scheduled."""
    every = interval(sched, job)
    if every is None:
        return None
    last = state["jobs"].get(job, {}).get("last_run")
    return 0.0 if last is None else last + every


# -- alerts ------------------------------------------------------------------------------------
def alert(home: Path, sched: dict[str, str], event: dict) -> str | None:
    """Run the alert command with ``event`` (plus time and vault) as JSON on stdin and
    VAULTFS_EVENT set to its kind; returns an error sentence when the command failed, None
    otherwise (also when no command is set). Never raises."""
    event = {"time": time.time(), "vault": str(home), **event}
    log.info("alert %s: %s", event["event"], event.get("message"))
    cmd = sched.get("alert")
    if not cmd:
        return None
    try:
        timeout = float(sched.get("alert_timeout") or ALERT_TIMEOUT)
    except ValueError:  # schedule.json edited by hand: `schedule set` validates the key
        timeout = ALERT_TIMEOUT
    if not 0 < timeout < float("inf"):
        timeout = ALERT_TIMEOUT
    problem = _run_alert(cmd, event, timeout)
    if problem:  # the mount daemon's log keeps it too, beside `status`'s last_alert_error
        log.info("alert %s not delivered: %s", event["event"], problem)
    return problem


def _run_alert(cmd: str, event: dict, timeout: float) -> str | None:
    """Run the alert command ``cmd`` with ``event`` on stdin; an error sentence when it
    failed, None when it worked."""
    try:
        # its own session and process group: at the timeout the whole group goes, not just
        # sh (a `sleep`, a `curl` it started would live on, one more at every pass)
        proc = subprocess.Popen(
            ["sh", "-c", cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "VAULTFS_EVENT": event["event"]},
        )
    except OSError as e:
        return f"alert command failed: {e}"
    try:
        _out, errs = proc.communicate(json.dumps(event) + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return (
            f"alert command timed out after {timeout:g}s (schedule key alert_timeout): it "
            "was stopped, with every process it started"
        )
    if proc.returncode != 0:
        return f"alert command exited {proc.returncode}: {errs.strip()[:200]}"
    return None


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL what is left after
    :data:`ALERT_KILL_GRACE`; reap ``proc`` and close its pipes. Bounded: a process that left
    the group (its own ``setsid``) and holds the pipes open is not waited for."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + ALERT_KILL_GRACE
        while time.monotonic() < deadline:
            proc.poll()  # reap sh: a zombie leader still counts as a member of its group
            os.killpg(proc.pid, 0)  # ProcessLookupError once no member is left
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone
        pass
    try:
        proc.communicate(timeout=ALERT_KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def _conditions(v: Vault, sched: dict[str, str], now: float) -> dict[str, dict]:
    """Alert conditions that hold now: {key: event}."""
    found: dict[str, dict] = {}
    v.note_missing_roots(now)  # a disk unplugged is down from then on, not ok
    st = v.status()
    grace = stored_every(sched["grace"]) if sched.get("grace") else DEFAULT_GRACE
    for r in st["remotes"]:
        since = r.get("health_since") if r.get("health") == "unreachable" else None
        if since is None and r["last_error"]:
            since = r["last_ok"] or 0.0
        if since is not None and now - since > grace:
            found[f"remote_unreachable:{r['remote']}"] = {
                "event": "remote_unreachable",
                "remote": r["remote"],
                "since": since,
                "message": f"remote {r['remote']} unreachable for {now - since:.0f}s "
                f"(grace {grace:.0f}s): {r['last_error'] or r.get('health_detail') or ''}",
            }
    queued = any(r["queued_objects"] for r in st["remotes"])
    promise = _promised(st)
    if st["segments"] and (
        st["survives_losses_now"] < st["survives_losses_design"]
        and any(r["lost_objects"] for r in st["remotes"])
        or st["segments_below_k_placed"]
        and not queued
        # shards squeezed onto fewer remotes than the vault has (a `remote remove`)
        or st["survives_losses_now"] < promise
        and not queued
    ):
        found["redundancy_low"] = {
            "event": "redundancy_low",
            "survives_now": st["survives_losses_now"],
            "promised": promise,
            "message": f"the vault survives {st['survives_losses_now']} remote loss(es), "
            f"fewer than the {promise} its profile promises",
        }
    limit = stored_every(sched["queue_age"]) if sched.get("queue_age") else DEFAULT_QUEUE_AGE
    oldest = segment_table.oldest_queued(v.index)
    if oldest is not None and now - oldest > limit:
        behind = {r["remote"]: r["queued_objects"] for r in st["remotes"] if r["queued_objects"]}
        held = ", ".join(f"{r} ({c} shards)" for r, c in behind.items())
        found["queue_stale"] = {
            "event": "queue_stale",
            "oldest_queued": oldest,
            "remotes": list(behind),
            "message": f"the oldest shard in the upload queue has waited {now - oldest:.0f}s "
            f"(limit {limit:.0f}s), queued for {held or 'a remote'}: check "
            f"{'those remotes' if len(behind) > 1 else 'that remote'} (`vaultfs status` shows "
            "the last error), then run `vaultfs flush` (each pass of the routine retries too)",
        }
    return found


# -- jobs --------------------------------------------------------------------------------------
def snapshot_name(now: float) -> str:
    return time.strftime("auto-%Y-%m-%d-%H%M%S", time.localtime(now))


def forget(
    home: Path,
    v: Vault,
    policy: retention.Policy,
    dry_run: bool,
    mounted: bool,
    now: float | None = None,
) -> retention.Decision:
    """Apply ``policy`` to the vault's snapshots as of ``now`` (default: vaultfs/clock.py);
    unless ``dry_run``, delete the ones it does not keep: through the mount's control socket
    when ``mounted`` (``v`` is then opened without the lock), else on ``v`` (opened with it).
    The caller flushes an unmounted vault. A policy that would forget every snapshot raises
    PolicyKeepsNothing, dry run or not, before anything is forgotten (restic 0.17's rule)."""
    decision = forget_mod.decide(v, policy, now)
    if dry_run or not decision.forget:
        return decision
    if not mounted:  # one transaction, one index copy
        v.delete_snapshots([s.id for s in decision.forget])
        return decision
    for s in decision.forget:
        try:
            control.call(control.home_address(home), {"cmd": "delete", "id": s.id})
        except VaultError as e:  # forgotten meanwhile (by a `vaultfs forget` of its own)
            if e.exit_code != InputError.exit_code:
                raise
    return decision


def _job_snapshot(home: Path, v: Vault, sched: dict, mounted: bool, now: float) -> dict:
    from .vault.home import dead_mount

    name = snapshot_name(now)
    if mounted:
        reply = control.call(control.home_address(home), {"cmd": "snapshot", "name": name})
        assert reply is not None
        return {"snapshot": reply["snapshot"], "entries": reply["entries"], "name": name}
    if sched.get("sources"):
        from .backup import backup_paths

        paths = [Path(p) for p in sched["sources"].split(":") if p]
        uid, count, size = backup_paths(v, paths, name, upload=True)
        rep = v.flush()
        return {"snapshot": uid, "entries": count, "bytes": size, "name": name,
                "complete": rep.complete}  # fmt: skip
    # unmounted, nothing can be snapshotted: a failure, not a success that took nothing (a
    # crashed mount would otherwise look backed up)
    if crashed := dead_mount(home):
        raise VaultError(
            f"no snapshot taken: the mount at {crashed.get('mountpoint')} is gone (its daemon, "
            f"pid {crashed['pid']}, died) and no sources are set; `vaultfs mount "
            f"{crashed.get('mountpoint')}` cleans up the dead mount and recovers what the cache "
            "held"
        )
    raise VaultError(
        "no snapshot taken: the vault is not mounted and no sources are set; mount it (its "
        "daemon snapshots the live tree) or set sources=PATH[:PATH...]"
    )


def _job_retention(home: Path, v: Vault, sched: dict, mounted: bool, now: float) -> dict:
    policy = retention.Policy.from_args(shlex.split(sched["retention"]))
    d = forget(home, v, policy, dry_run=False, mounted=mounted)
    if d.forget and not mounted:
        v.flush()
    return {"kept": len(d.keep), "forgot": [s.id for s in d.forget]}


def _in_mount(home: Path, job: str, args: dict) -> dict:
    """Run maintenance ``job`` in the mount's daemon (vaultfs/maintenance.py); its report."""
    reply = control.call(control.home_address(home), {"cmd": "job", "job": job, "args": args})
    if reply is None:
        raise VaultError("the mount went away during the pass")
    return reply["result"]


def _job_verify(home: Path, v: Vault, sched: dict, mounted: bool, now: float) -> dict:
    from . import verify

    _every, sample = _verify_spec(sched["verify"], stored_every)
    budget = float(sched.get("verify_budget") or DEFAULT_VERIFY_BUDGET)
    args = {"mode": "sample", "sample": sample, "max_duration": budget}
    if mounted:
        rep = _in_mount(home, "verify", args)
    else:
        rep = verify.audit(v, None, **args).to_dict()  # type: ignore[arg-type]
    remotes = rep["remotes"]
    out = {
        "clean": rep["clean"],
        "complete": rep["complete"],
        "bytes_read": sum(r["bytes_read"] for r in remotes),
    }
    # what makes `vaultfs verify` exit 12 (AuditReport.found) fails the job and alerts
    kinds = {"missing": "missing", "corrupt": "corrupt", "stale": "stale", "foreign": "foreign",
             "stale_manifest": "an old manifest", "unlocked": "unlocked"}  # fmt: skip
    found: dict[str, list[str]] = {}
    for r in remotes:
        what = [word for key, word in kinds.items() if r[key]]
        if r["fork"]:
            what.append("a newer manifest (stale home)" if r["ahead"] else "a fork")
        if what:
            found[r["remote"]] = what
    if found:
        said = "; ".join(f"{remote}: {', '.join(what)}" for remote, what in found.items())
        out["alert"] = {
            "event": "audit_failed",
            "remotes": list(found),
            "details": {r["remote"]: r["details"] for r in remotes if r["remote"] in found},
            "message": f"the audit found problems ({said}); run `vaultfs verify` for the way "
            "forward",
        }
    return out


def _promised(st: dict) -> int:
    """The remote losses the vault should survive (``status``): its placement's figure, or
    the profile's over the remotes it has now when that is more (shards a `remote remove`
    squeezed onto fewer remotes, which repair spreads again)."""
    return max(st["survives_losses_design"], st["survives_losses_promised"])


def _repair_needed(v: Vault) -> bool:
    st = v.status()
    if any(r["lost_objects"] for r in st["remotes"]):
        return True
    queued = any(r["queued_objects"] for r in st["remotes"])
    return bool(st["segments"]) and not queued and (st["survives_losses_now"] < _promised(st))


def _job_repair(home: Path, v: Vault, sched: dict, mounted: bool, now: float) -> dict:
    from . import repair

    if not _repair_needed(v):
        return {"needed": False}
    rep = _in_mount(home, "repair", {}) if mounted else repair.repair(v).to_dict()
    if rep["unrecoverable"]:
        raise RuntimeError(f"repair could not rebuild: {'; '.join(rep['unrecoverable'][:3])}")
    return {"needed": True, "rebuilt": rep["rebuilt"], "segments": rep["segments"]}


def _job_prune(home: Path, v: Vault, sched: dict, mounted: bool, now: float) -> dict:
    from . import prune

    # two figures of two kinds: the plaintext of the chunks freed, and the stored bytes
    # (padded, erasure-coded shards) each remote holds less; the pass prints the keys as words
    if v.immutable:  # nothing to free: an immutable vault never deletes (Vault.immutable)
        return {"skipped": "immutable vault", "data_bytes_freed": 0,
                "stored_bytes_freed_per_remote": {}}  # fmt: skip
    rep = _in_mount(home, "prune", {}) if mounted else prune.prune(v).as_dict()
    return {"data_bytes_freed": rep["bytes_freed"],
            "stored_bytes_freed_per_remote": rep["freed_per_remote"]}  # fmt: skip


def _push_queue(v: Vault) -> dict | None:
    """What an unmounted pass does before its jobs: send what the upload queue holds, as
    `vaultfs flush` does, so shards a backup or an unmount left queued while remotes were down
    go out at the next pass once they are back, whichever jobs are due. A remote still down
    fails within the backends' bounds (rclone's timeouts, a few retries) and does not fail the
    pass: its error is in the result, and ``remote_unreachable``/``queue_stale`` alert once it
    lasts. None when nothing is queued (no remote is asked anything)."""
    if not (segment_table.queued_count(v.index) or manifest_table.pending_uploads(v.index)):
        return None
    rep = v.flush()
    return {"uploaded": rep.uploaded, "pending": {r: c for r, c in rep.pending.items() if c},
            "errors": rep.errors, "stale_base": rep.stale_base,
            "complete": rep.complete}  # fmt: skip


_RUNNERS: dict[str, Callable[[Path, Vault, dict, bool, float], dict]] = {
    "snapshot": _job_snapshot,
    "retention": _job_retention,
    "verify": _job_verify,
    "repair": _job_repair,
    "prune": _job_prune,
}


def run_pass(
    home: Path,
    v: Vault,
    mounted: bool,
    now: float | None = None,
    stop: threading.Event | None = None,
) -> dict:
    """One pass of whatever is due (module docstring), then the alert checks. ``v`` is opened
    with the lock unless ``mounted`` (the mount's daemon holds it then). Returns
    {"ran": {job: result}, "failed": {job: error}, "waiting": {job: why}, "alerts": [events],
    "upload": what the unmounted pass sent first (:func:`_push_queue`) or None} and records
    the outcome in HOME/routine.json. Once ``stop`` is set (the mount ends) no
    job starts, and one that fails meanwhile is left due ("waiting"), not alerted."""
    with open(home / LOCK_FILE, "a") as lock:
        # one pass at a time (the mount daemon's, a timer's): the second sees what the first
        # did and runs only what is still due
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _pass(home, v, mounted, clock.now() if now is None else now, stop)


def _pass(home: Path, v: Vault, mounted: bool, now: float, stop: threading.Event | None) -> dict:
    sched = load_schedule(home)
    state = load_state(home)
    out: dict = {"ran": {}, "failed": {}, "waiting": {}, "alerts": [], "upload": None}
    events: list[dict] = []
    down: dict[str, str] = {}  # spec: why, of the remotes the push found down
    if not mounted:  # the mount's daemon pushes all the time (vaultfs/fs.py, _pusher)
        try:
            out["upload"] = _push_queue(v)
            errors = out["upload"]["errors"] if out["upload"] else {}
            down = {r.spec: f"{errors[r.label]}; not asked again in this pass"
                    for r in v.remotes() if r.label in errors}  # fmt: skip
        except Exception as e:  # reported and alerted as a job's failure, never fatal
            log.debug("upload failed:\n%s", traceback.format_exc())
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            out["failed"]["upload"] = msg
            events.append({"event": "job_failed", "job": "upload", "error": msg,
                           "message": f"uploading the queue failed: {msg}"})  # fmt: skip
    # a remote the push found down is asked nothing more in this pass (its shards stay queued
    # for the next one): a pass waits for a down remote once, not again in each job
    with v.paces.holding(down):
        for job in JOBS:
            if stop is not None and stop.is_set():
                break
            due_at = next_run(sched, state, job)
            forced = job == "retention" and "snapshot" in out["ran"] and due_at is not None
            if due_at is None or (due_at > now and not forced):
                continue
            rec = state["jobs"].setdefault(job, {})
            try:
                result = _RUNNERS[job](home, v, sched, mounted, now)
            except Exception as e:  # a job's failure is reported and alerted, never fatal
                if isinstance(e, VaultError) and e.exit_code == VaultBusy.exit_code:
                    out["waiting"][job] = e.message  # the mount runs another job: still due
                    continue
                if stop is not None and stop.is_set():  # the mount (and its socket) went away
                    out["waiting"][job] = "the mount ended"
                    continue
                rec["last_run"] = now
                log.debug("job %s failed:\n%s", job, traceback.format_exc())
                msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                rec["last_error"] = msg
                out["failed"][job] = msg
                events.append({"event": "job_failed", "job": job, "error": msg,
                               "message": f"scheduled {job} failed: {msg}"})  # fmt: skip
                continue
            rec["last_run"] = now
            if ev := result.pop("alert", None):
                events.append(ev)
                rec["last_error"] = ev["message"]
                out["failed"][job] = ev["message"]
            else:
                rec["last_success"] = now
                rec["last_error"] = None
            rec["result"] = result
            out["ran"][job] = result
    held = _conditions(v, sched, now)
    for key, ev in held.items():
        if key not in state["alerts"]:
            state["alerts"][key] = now
            events.append(ev)
    state["alerts"] = {k: t for k, t in state["alerts"].items() if k in held}
    for ev in events:
        if problem := alert(home, sched, ev):
            out.setdefault("alert_errors", []).append(problem)
        out["alerts"].append(ev)
    if events:
        _record_alert(state, now, out.get("alert_errors", []))
    state["last_pass"] = now
    state.pop("last_pass_failed", None)
    _write(home / STATE_FILE, state)
    return out


def _record_alert(state: dict, now: float, problems: list[str]) -> None:
    """Keep the alert command's last error (or none: it worked) in ``state``."""
    state.pop("alert_error", None)  # the old form: a sentence without a time
    state["last_alert_error"] = {"time": now, "error": problems[-1]} if problems else None


def failed_pass(
    home: Path, error: str, now: float | None = None, what: str = "open the vault"
) -> str | None:
    """A pass that could not run at all (the vault did not open: no passphrase, a wrong
    one…; in the mount daemon, a pass that stopped: ``what`` it could not do): tell the
    alert command (``job_failed``, job ``run``) and record when and why in
    HOME/routine.json, with the alert command's error, which is returned (None: it worked or
    there is none). A home without a vault records nothing; an unreadable schedule (the
    error, then) alerts nothing, and an unreadable routine.json is replaced by the record."""
    now = clock.now() if now is None else now
    try:
        sched = load_schedule(home)
    except InputError:  # the schedule itself is what failed: no alert command to run
        sched = {}
    event = {"event": "job_failed", "job": "run", "error": error,
             "message": f"the routine could not {what}: {error}"}  # fmt: skip
    problem = alert(home, sched, event) if sched else None
    if not (home / "key.json").exists():
        return problem
    with open(home / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not into a pass's read-modify-write
        try:
            state = load_state(home)
        except InputError:  # unreadable: a new record says why the pass failed
            state = {"jobs": {}, "alerts": {}}
        state["last_pass_failed"] = {"time": now, "error": error}
        if sched:
            _record_alert(state, now, [problem] if problem else [])
        _write(home / STATE_FILE, state)
    return problem


def job_times(sched: dict[str, str], state: dict, now: float) -> dict[str, dict]:
    """Each scheduled job's interval, last run, last success, last error, when it runs next
    (``next_run``: None when it never ran, so due at the next pass; retention also runs
    after each timed snapshot, as :func:`_pass` runs it) and whether it is ``overdue``: what
    `status` and `schedule show` both say."""
    jobs: dict[str, dict] = {}
    for job in JOBS:
        nxt = next_run(sched, state, job)
        if nxt is None:
            continue
        if job == "retention" and "snapshot" in jobs:  # it also runs after each snapshot
            nxt = min(nxt, jobs["snapshot"]["next_run"] or 0.0)
        rec = state["jobs"].get(job, {})
        every = interval(sched, job)
        jobs[job] = {
            "every": every,
            "last_run": rec.get("last_run"),
            "last_success": rec.get("last_success"),
            "last_error": rec.get("last_error"),
            "next_run": nxt or None,
            "overdue": bool(every and nxt and nxt < now),
        }
    return jobs


def report(home: Path, v: Vault, now: float | None = None) -> dict:
    """For `status`: each scheduled job's last run, last success, last error, when it is due
    (``next_run``: None when it never ran, so due at the next pass; in the past when it is
    ``overdue``: no pass ran it, e.g. the timer is not running), the last pass and whether
    the newest one failed, the alert command's last error, the active alert conditions, the
    newest fully placed snapshot, and the newest snapshot the reachable remotes restore with
    its age (the real recovery point); ``unreadable``: why the schedule or the routine's
    record could not be read (the routine makes no pass until it is fixed)."""
    now = time.time() if now is None else now
    unreadable = []  # a file edited by hand into bad JSON: the rest of status still shows
    try:
        sched = load_schedule(home)
    except InputError as e:
        sched, unreadable = {}, [e.message]
    try:
        state = load_state(home)
    except InputError as e:
        state, unreadable = {"jobs": {}, "alerts": {}}, [*unreadable, e.message]
    jobs = job_times(sched, state, now)
    placed = snapshot_table.newest_placed(v.index)
    # the recovery point: a remote that stays down keeps later snapshots from being fully
    # placed while the others restore them
    point = snapshot_table.recovery_point(v.index)
    return {
        "schedule": sched,
        "jobs": jobs,
        "last_pass": state.get("last_pass"),
        "last_pass_failed": state.get("last_pass_failed"),
        "last_alert_error": state.get("last_alert_error"),
        "alerts": sorted(state["alerts"]),
        "newest_placed_snapshot": placed[0] if placed else None,
        "newest_restorable_snapshot": point[0] if point else None,
        "rpo_seconds": (now - point[1]) if point else None,
        "unreadable": unreadable,
    }


#: Longest wait between the mount daemon's passes (it also wakes for shorter intervals).
DAEMON_TICK = 60.0


def _stamp(path: Path) -> tuple[int, int] | None:
    """What tells a file changed: its mtime and size (None: it does not exist)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


#: How often the mount daemon's routine looks whether the schedule changed while it waits.
SCHEDULE_POLL = 2.0


def _wait_unless_changed(
    stop: threading.Event, secs: float, path: Path, seen: tuple[int, int] | None
) -> bool:
    """Wait ``secs``, or less when ``path`` changes from ``seen`` (a `schedule set` meanwhile
    takes effect within :data:`SCHEDULE_POLL`, not at the old schedule's next tick). True
    when ``stop`` was set."""
    deadline = time.monotonic() + secs
    while (left := deadline - time.monotonic()) > 0:
        if stop.wait(min(left, SCHEDULE_POLL)):
            return True
        if _stamp(path) != seen:
            break
    return stop.is_set()


def serve_mounted(home: Path, v: Vault, attached: Callable[[], bool]) -> threading.Event:
    """Run the routine inside the mount daemon: a thread that makes a pass (``mounted``, so
    through the control socket) whenever a job may be due, until the returned event is set
    (the mount ended) or ``attached()`` says the mount is no longer in the mount table
    (detached by a lazy unmount while files stay open: the daemon serves those files and
    exits after them, and the routine stops with the mount). A pass that fails (a job's
    failure is the pass's report, not this) is logged and recorded, and alerted once per
    distinct error (:func:`failed_pass`; `status` shows it); the next one tries again.
    Setting the event in a pass lets no new job start (run_pass)."""
    stop = threading.Event()

    def loop() -> None:
        told = None  # the error last alerted: a failure that persists is told once
        while not stop.is_set():
            tick = DAEMON_TICK  # until the schedule is read
            try:
                seen = _stamp(home / SCHEDULE_FILE)
                sched = load_schedule(home)
                ticks = [interval(sched, j) for j in JOBS]  # repair (0: each pass) drops out
                tick = min([t for t in ticks if t] + [DAEMON_TICK])
                if _wait_unless_changed(stop, max(tick, 1.0), home / SCHEDULE_FILE, seen):
                    return
                if not attached():
                    log.warning(
                        "the mount is detached (a lazy unmount): the routine stops; the daemon "
                        "serves the files still open and exits after them"
                    )
                    stop.set()
                    return
                if load_schedule(home):  # as it is now: it may have changed meanwhile
                    run_pass(home, v, mounted=True, stop=stop)
                told = None
            except Exception as e:
                log.exception("routine pass in the mount daemon failed")
                msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                if msg != told and not stop.is_set():
                    told = msg
                    try:
                        failed_pass(home, msg, what="make its pass in the mount daemon")
                    except Exception:
                        log.exception("recording the failed pass failed")
                stop.wait(max(tick, 1.0))  # never a busy loop

    threading.Thread(target=loop, name="vaultfs-routine", daemon=True).start()
    return stop
