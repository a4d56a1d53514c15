"""Reading a remote's object lock back (docs/operations.md, "Immutable vaults"): the
server-side retention that protects an immutable vault from a thief of this machine's
credentials, as the provider reports it.

rclone (1.75.2) sets S3 Object Lock on upload from the backend options ``object_lock_mode``
and ``object_lock_retain_until_date`` (given in the remote's config or spec), and lists an
object's lock as the metadata keys ``object-lock-mode`` and ``object-lock-retain-until-date``
(``rclone lsjson --metadata``, one HEAD request per object). Remotes of other types report no
such keys; neither does an S3 object uploaded without a lock. So "no lock reported" means
either, and this module says so rather than guessing. Only ``manifests/`` is read (a few
objects): every upload of the vault goes through the same remote options, so the manifests'
lock stands for the rest.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .errors import InputError
from .remotes import NET_FLAGS, Remote, classify, join, rclone_binary

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
#: A retention rclone takes (``--s3-object-lock-retain-until-date``): a duration from each
#: upload (days, months, years) or a fixed RFC 3339 date.
RETENTION = re.compile(r"^\d+[dMy]$|^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


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
    the future), ``unlocked`` (names with none, or expired), the earliest retention date of the
    locked ones and their modes."""

    objects: int = 0
    locked: int = 0
    unlocked: list[str] = field(default_factory=list)
    until: str | None = None
    modes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every object read is locked (and at least one was read)."""
        return self.objects > 0 and not self.unlocked

    def summary(self) -> str:
        if not self.objects:
            return "no object to check"
        if self.ok:
            return (
                f"locked ({'/'.join(self.modes)}) until at least {self.until}: "
                f"{self.locked} of {self.objects} manifests"
            )
        return (
            f"no object lock reported on {len(self.unlocked)} of {self.objects} manifests: "
            "a remote type without object lock (local, SFTP, B2 native...) or an S3 bucket "
            "written without object_lock_mode/object_lock_retain_until_date; only a server-side "
            "lock protects an immutable vault"
        )


def parse(listing: list[dict], now: datetime) -> LockState:
    """The :class:`LockState` of an ``rclone lsjson --metadata`` listing at time ``now``."""
    st = LockState()
    modes: set[str] = set()
    for obj in listing:
        if obj.get("IsDir"):
            continue
        st.objects += 1
        meta = obj.get("Metadata") or {}
        mode = str(meta.get("object-lock-mode", "")).upper()
        until = _date(meta.get("object-lock-retain-until-date"))
        if mode in LOCK_MODES and until is not None and until > now:
            st.locked += 1
            modes.add(mode)
            text = until.isoformat()
            st.until = text if st.until is None else min(st.until, text)
        else:
            st.unlocked.append(str(obj.get("Name", "?")))
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


def read(spec: str, timeout: float = 300) -> LockState:
    """The lock of the objects under the remote's ``manifests/``. Raises RemoteError (from
    :func:`remotes.classify`) when the listing fails."""
    cmd = [rclone_binary(), "-q", "lsjson", *NET_FLAGS, "--metadata", "--files-only",
           join(spec, "manifests")]  # fmt: skip
    label = Remote(spec).label
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise classify(label, "lock check", "timed out") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise classify(label, "lock check", msg[-1] if msg else "failed",
                       exit_code=proc.returncode)  # fmt: skip
    return parse(json.loads(proc.stdout or b"[]"), datetime.now(UTC))
