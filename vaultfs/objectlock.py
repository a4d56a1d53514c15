"""Reading a remote's object lock back (docs/operations.md, "Immutable vaults"): the
server-side retention that protects an immutable vault from a thief of this machine's
credentials, as the provider reports it.

rclone (1.75.2) sets S3 Object Lock on upload from the backend options ``object_lock_mode``
and ``object_lock_retain_until_date`` (given in the remote's config or spec), and lists an
object's lock as the metadata keys ``object-lock-mode`` and ``object-lock-retain-until-date``
(``rclone lsjson --metadata``, one HEAD request per object). Remotes of other types report no
such keys; neither does an S3 object uploaded without a lock. So "no lock reported" means
either, and this module says so rather than guessing: only a remote whose spec asks for a lock
(:func:`wanted`) is held to it. ``verify`` reads the objects it names (:func:`read`): every
object with ``--read-all``, else a random sample as large as the audit's block checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import InputError
from .remotes import Remote, classify, net_flags, rclone_binary, rclone_env, rclone_tempfile

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
#: A retention rclone takes (``--s3-object-lock-retain-until-date``): a duration from each
#: upload (days, months, years) or a fixed RFC 3339 date.
RETENTION = re.compile(r"^\d+[dMy]$|^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
#: Days per unit of a duration retention; a month and a year are taken at their shortest
#: (28 and 365 days), so an object locked by a provider that counts them longer is never
#: reported short.
_UNIT_DAYS = {"d": 1, "M": 28, "y": 365}
#: How much earlier than the retention asks a lock may end and still count as given: the
#: retention counts from the upload as the uploader's clock saw it, the upload time read back
#: is the server's (its Last-Modified).
SKEW = timedelta(days=1)


def check_retention(retain: str) -> str:
    """``retain`` if rclone takes it as a retention (:data:`RETENTION`); InputError otherwise."""
    if not RETENTION.match(retain):
        raise InputError(
            f"--object-lock {retain!r}: give a retention such as 365d, 6M, 1y or a date "
            "2030-01-01T00:00:00Z"
        )
    return retain


def lock_spec(spec: str, retain: str | None) -> str:
    """``spec`` with S3 Object Lock on every upload (COMPLIANCE mode, retention ``retain``)
    when it is an S3 remote: a connection string ``:s3,...:path`` or a configured remote of
    type s3 (rclone's ``name,option=value:path`` override); any other spec, a spec that
    already names ``object_lock_mode``, or ``retain`` None: unchanged. The bucket must have
    Object Lock enabled, or the provider refuses the uploads."""
    if not retain or "object_lock_mode=" in spec:
        return spec
    end = _head_end(spec)
    if end is None:
        return spec  # a local path
    head, rest = spec[:end], spec[end:]
    name = head.lstrip(":").split(",", 1)[0]
    kind = name if head.startswith(":") else _configured_types().get(name)
    if kind != "s3":
        return spec
    return f"{head},object_lock_mode=COMPLIANCE,object_lock_retain_until_date={retain}{rest}"


def wanted(spec: str) -> str | None:
    """The lock ``spec`` asks the provider for: its ``object_lock_retain_until_date`` ("" when
    it names ``object_lock_mode`` without one: any lock in force will do), or None when it
    names no ``object_lock_mode`` (a remote vaultfs does not lock: its protection, if any, is
    the server's own and is not read back)."""
    end = _head_end(spec)
    head = spec[:end] if end is not None else ""
    if "object_lock_mode=" not in head:
        return None
    m = re.search(r"object_lock_retain_until_date=([^,:]+)", head)
    return m.group(1).strip("'\"") if m else ""


def needed_until(retain: str, uploaded: datetime) -> datetime | None:
    """The earliest end of a lock that gives an object uploaded at ``uploaded`` the retention
    ``retain`` (:data:`RETENTION`), less :data:`SKEW`; None for "" (no retention asked)."""
    if not retain:
        return None
    if retain[-1] in _UNIT_DAYS:
        return uploaded + timedelta(days=int(retain[:-1]) * _UNIT_DAYS[retain[-1]]) - SKEW
    return _date(retain)


def _head_end(spec: str) -> int | None:
    """Index of the ``:`` that ends a spec's remote name and options (quotes respected);
    None for a plain path."""
    quote = ""
    for i, c in enumerate(spec):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "/" and i > 0:
            return None
        elif c == ":" and i > 0:
            return i
    return None


def _configured_types() -> dict[str, str]:
    """{remote name: backend type} from rclone's config (``rclone listremotes --long``)."""
    proc = subprocess.run(
        [rclone_binary(), "listremotes", "--long"], capture_output=True, text=True, check=False
    )
    out = {}
    for line in proc.stdout.splitlines():
        name, _, kind = line.partition(":")
        if kind.strip():
            out[name.strip()] = kind.split()[0]
    return out


@dataclass
class LockState:
    """The object lock of the objects read: ``locked`` (a lock mode and a retention date in
    the future), ``unlocked`` (path -> why: no lock, or one that has ended), ``short`` (path ->
    why: locked, but for less than the retention asked), the earliest retention date of the
    locked ones and their modes."""

    objects: int = 0
    locked: int = 0
    unlocked: dict[str, str] = field(default_factory=dict)
    short: dict[str, str] = field(default_factory=dict)
    until: str | None = None
    modes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every object read is locked for the retention asked (and at least one was read)."""
        return self.objects > 0 and not self.unlocked and not self.short

    def summary(self) -> str:
        if not self.objects:
            return "no object to check"
        if self.ok:
            return (
                f"locked ({'/'.join(self.modes)}) until at least {self.until}: "
                f"{self.locked} of {self.objects} objects read"
            )
        parts = []
        if self.unlocked:
            parts.append(f"no object lock in force on {len(self.unlocked)} of {self.objects} "
                         "objects read")  # fmt: skip
        if self.short:
            parts.append(f"{len(self.short)} locked for less than the retention asked")
        return "; ".join(parts) + (
            ": a remote type without object lock (local, SFTP, B2 native...), an S3 bucket "
            "written without object_lock_mode/object_lock_retain_until_date, or locks that "
            "have ended; only a server-side lock protects an immutable vault"
        )


def parse(listing: list[dict], now: datetime, retain: str | None = None) -> LockState:
    """The :class:`LockState` of an ``rclone lsjson --metadata`` listing at time ``now``;
    ``retain`` (:func:`wanted`): the retention each object's lock must give it from its upload
    (the metadata ``btime``, else its modification time), or None/"" to check for any lock."""
    st = LockState()
    modes: set[str] = set()
    for obj in listing:
        if obj.get("IsDir"):
            continue
        st.objects += 1
        path = str(obj.get("Path") or obj.get("Name") or "?")
        meta = obj.get("Metadata") or {}
        mode = str(meta.get("object-lock-mode", "")).upper()
        until = _date(meta.get("object-lock-retain-until-date"))
        if mode not in LOCK_MODES or until is None:
            st.unlocked[path] = "no object lock reported"
            continue
        if until <= now:
            st.unlocked[path] = f"its object lock ended {until.isoformat()}"
            continue
        uploaded = _date(meta.get("btime")) or _date(obj.get("ModTime"))
        need = needed_until(retain, uploaded) if retain and uploaded else None
        if need is not None and until < need:
            st.short[path] = (
                f"locked only until {until.isoformat()}, less than the retention {retain} "
                f"from its upload ({uploaded.isoformat() if uploaded else '?'})"
            )
            continue
        st.locked += 1
        modes.add(mode)
        text = until.isoformat()
        st.until = text if st.until is None else min(st.until, text)
    st.modes = sorted(modes)
    return st


def _date(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def read(spec: str, paths: list[str], timeout: float = 300) -> LockState:
    """The lock of the objects ``paths`` (``data/NAME``, ``meta/NAME``, ``manifests/NAME``)
    of the remote ``spec``, held to the retention its spec asks for (:func:`wanted`). One
    rclone listing of just those objects (``--files-from-raw``: a HEAD request each); an
    object absent from the remote is left out (the audit reports it missing). Raises
    RemoteError (from :func:`remotes.classify`) when the listing fails."""
    label = Remote(spec).label
    with rclone_tempfile("vaultfs-lock-", "w", ".txt") as f:
        f.write("".join(p + "\n" for p in paths))
        f.flush()
        cmd = [rclone_binary(), "-q", "lsjson", *net_flags(), "--metadata", "--files-only", "-R",
               "--files-from-raw", f.name, spec]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False,
                                  env=rclone_env(os.path.dirname(f.name)))  # fmt: skip
        except subprocess.TimeoutExpired:
            raise classify(label, "lock check", "timed out") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise classify(label, "lock check", msg[-1] if msg else "failed",
                       exit_code=proc.returncode)  # fmt: skip
    return parse(json.loads(proc.stdout or b"[]"), datetime.now(UTC), wanted(spec))
