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
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .remotes import NET_FLAGS, Remote, classify, join, rclone_binary

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


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
