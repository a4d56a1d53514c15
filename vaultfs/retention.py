"""Retention: which snapshots a `vaultfs forget` policy keeps, and why (pure; no I/O).

The rules are restic's `forget` (restic 0.16 and later, ``internal/restic/snapshot_policy.go``),
so a policy written for restic means the same here:

- Snapshots are ordered newest first (ties: the later-made snapshot first).
- ``--keep-last N`` keeps the N newest. ``--keep-hourly/-daily/-weekly/-monthly/-yearly N``
  each walk that order and keep a snapshot whenever it starts a period (hour, day, ISO week,
  month, year of its *local* time) different from the previous kept one's for that option, until
  N periods are kept: the newest snapshot of each of the N most recent periods that have one.
  ``-1`` means unlimited. When an option still has periods left at the oldest snapshot, that
  snapshot is kept too (reason "oldest …"): a young vault keeps its first snapshot.
- ``--keep-within D`` keeps every snapshot newer than the newest snapshot minus D (not now
  minus D: a vault that stopped taking snapshots keeps its last ones). D is restic's duration,
  e.g. ``1y6m2d12h``: years, months and days are calendar steps in local time (Go's
  ``AddDate``: 31 March minus one month is 3 March), hours are exact. The newest snapshot
  here is the newest one not in the future.
- ``--keep-within-hourly/-daily/-weekly/-monthly/-yearly D`` keep the newest snapshot of each
  such period among those within D of the newest.
- ``--keep-name GLOB`` (ours; restic has ``--keep-tag``) keeps every snapshot whose name
  matches the shell pattern, without counting against any other option.
- A snapshot is kept if any option keeps it; every other is forgotten. An empty policy keeps
  everything (restic does the same). A non-empty policy that keeps none is refused by the
  caller (:func:`vaultfs.routine.forget`, as restic 0.17 refuses to empty a group).

Differences from restic: one vault is one group (restic groups by host and paths first), and
names play the part of tags. `vaultfs forget` also keeps the newest snapshot the remotes
restore alone, whatever the policy (:func:`vaultfs.forget.decide`: not a rule of this module).
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

_DURATION = re.compile(r"(\d+)([ymdh])")


#: the longest duration a policy can name: --keep-within 1000y keeps everything anyway
MAX_YEARS = 1000


@dataclass(frozen=True)
class Duration:
    """A restic duration: calendar years, months, days and exact hours."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """'1y2m3d4h' (any subset, each unit at most once, :data:`MAX_YEARS` years at most in
        all) → Duration; ValueError otherwise."""
        units: dict[str, int] = {}
        pos = 0
        for m in _DURATION.finditer(text):
            if m.start() != pos or m.group(2) in units:
                break
            units[m.group(2)] = int(m.group(1))
            pos = m.end()
        if not units or pos != len(text):
            raise ValueError(
                f"invalid duration {text!r}: use numbers with y, m, d, h, e.g. 1y6m or 7d12h"
            )
        d = cls(units.get("y", 0), units.get("m", 0), units.get("d", 0), units.get("h", 0))
        hours = ((d.years * 12 + d.months) * 31 + d.days) * 24 + d.hours
        if hours > MAX_YEARS * 372 * 24:  # within reach of the calendar (year 1 and later)
            raise ValueError(
                f"invalid duration {text!r}: at most {MAX_YEARS} years in all (e.g. {MAX_YEARS}y)"
            )
        return d

    def __bool__(self) -> bool:
        return any((self.years, self.months, self.days, self.hours))

    def __str__(self) -> str:
        parts = zip((self.years, self.months, self.days, self.hours), "ymdh", strict=True)
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"

    def before(self, t: float) -> float:
        """The unix time D before ``t``: calendar steps on the local wall clock, then hours."""
        wall = datetime.fromtimestamp(t)
        month0 = wall.month - 1 - self.months
        year = wall.year - self.years + month0 // 12
        day = date(year, month0 % 12 + 1, 1) + timedelta(days=wall.day - 1 - self.days)
        stepped = datetime.combine(day, wall.time())
        return time.mktime(stepped.timetuple()) + stepped.microsecond / 1e6 - self.hours * 3600


@dataclass
class Policy:
    """A forget policy; counts are 0 (off), N, or -1 (unlimited)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration = field(default_factory=Duration)
    within_hourly: Duration = field(default_factory=Duration)
    within_daily: Duration = field(default_factory=Duration)
    within_weekly: Duration = field(default_factory=Duration)
    within_monthly: Duration = field(default_factory=Duration)
    within_yearly: Duration = field(default_factory=Duration)
    names: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.names or any(self._counts()) or self.within or any(self._withins()))

    def _counts(self) -> list[int]:
        return [self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly]

    def _withins(self) -> list[Duration]:
        return [
            self.within_hourly,
            self.within_daily,
            self.within_weekly,
            self.within_monthly,
            self.within_yearly,
        ]

    def describe(self) -> str:
        """The policy in words, e.g. 'keep 7 daily, 4 weekly snapshots'."""
        words = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]
        parts = [
            f"{'all' if c == -1 else c} {w}"
            for c, w in zip(self._counts(), words, strict=True)
            if c
        ]
        parts += [f"{w} within {d}" for d, w in zip(self._withins(), words[1:], strict=True) if d]
        if self.within:
            parts.append(f"all within {self.within} of the newest")
        parts += [f"names matching {g!r}" for g in self.names]
        return "keep " + (", ".join(parts) if parts else "everything (empty policy)")

    @classmethod
    def from_args(cls, args: list[str]) -> Policy:
        """A policy from forget's command-line options as words, e.g. ['--keep-daily', '7',
        '--keep-within', '2d'] (how `vaultfs schedule` stores it); ValueError if malformed."""
        p = cls()
        it = iter(args)
        for opt in it:
            key = opt.removeprefix("--keep-").replace("-", "_")
            if not opt.startswith("--keep-") or (key not in _COUNTS | _WITHINS and key != "name"):
                raise ValueError(f"unknown retention option {opt!r}")
            value = next(it, None)
            if value is None:
                raise ValueError(f"{opt} needs a value")
            if key == "name":
                p.names += (value,)
            elif key in _WITHINS:
                setattr(p, key, Duration.parse(value))
            else:
                n = int(value) if re.fullmatch(r"-?\d+", value) else -2
                if n < -1:
                    raise ValueError(f"{opt} takes a count (or -1 for unlimited), not {value!r}")
                setattr(p, key, n)
        return p


_COUNTS = {"last", "hourly", "daily", "weekly", "monthly", "yearly"}
_WITHINS = {f"within_{w}" for w in _COUNTS - {"last"}} | {"within"}


@dataclass(frozen=True)
class Snap:
    """What retention needs of a snapshot: its id, unix time and name."""

    id: str
    time: float
    name: str | None = None


@dataclass
class Decision:
    """The outcome: ``keep`` newest first with the reasons for each, ``forget`` newest first."""

    keep: list[tuple[Snap, list[str]]]
    forget: list[Snap]


def _period(kind: str) -> Callable[[float, int], object]:
    if kind == "last":
        return lambda _t, nr: nr
    fmt = {"hourly": "%Y%m%d%H", "daily": "%Y%m%d", "monthly": "%Y%m", "yearly": "%Y"}
    if kind == "weekly":
        return lambda t, _nr: datetime.fromtimestamp(t).isocalendar()[:2]
    return lambda t, _nr: time.strftime(fmt[kind], time.localtime(t))


def apply(snaps: Iterable[Snap], policy: Policy, now: float | None = None) -> Decision:
    """Which of ``snaps`` ``policy`` keeps and why (module docstring). Input order breaks
    ties between equal times: of two, the one listed later counts as newer."""
    order = sorted(enumerate(snaps), key=lambda e: (e[1].time, e[0]), reverse=True)
    ordered = [s for _i, s in order]
    if policy.empty():
        return Decision([(s, ["policy is empty"]) for s in ordered], [])
    now = time.time() if now is None else now
    past = [s.time for s in ordered if s.time <= now]  # at `now` is not in the future
    newest = past[0] if past else 0.0
    kinds = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]
    counts = dict(zip(kinds, policy._counts(), strict=True))
    last_seen: dict[str, object] = {}
    withins = [
        (w, d, d.before(newest)) for w, d in zip(kinds[1:], policy._withins(), strict=True) if d
    ]
    within_seen: dict[str, object] = {}
    cutoff = policy.within.before(newest) if policy.within else None
    decision = Decision([], [])
    for nr, s in enumerate(ordered):
        reasons = [
            f"name matches {g!r}" for g in policy.names if fnmatch.fnmatchcase(s.name or "", g)
        ]
        if cutoff is not None and s.time > cutoff:
            reasons.append(f"within {policy.within}")
        oldest = nr == len(ordered) - 1
        for kind in kinds:
            if counts[kind] == 0:
                continue
            val = _period(kind)(s.time, nr)
            if val != last_seen.get(kind, _NONE) or oldest:
                reasons.append(
                    ("oldest " if val == last_seen.get(kind, _NONE) else "")
                    + ("last" if kind == "last" else kind)
                    + " snapshot"
                )
                last_seen[kind] = val
                if counts[kind] > 0:
                    counts[kind] -= 1
        for kind, d, since in withins:
            if s.time > since:
                val = _period(kind)(s.time, nr)
                if val != within_seen.get(kind, _NONE):
                    within_seen[kind] = val
                    reasons.append(f"{kind} within {d}")
        if reasons:
            decision.keep.append((s, reasons))
        else:
            decision.forget.append(s)
    return decision


_NONE = object()
