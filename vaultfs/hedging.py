"""Which remotes to ask first: each remote's speed, measured and remembered, and the order of
preference built on it (issue 16: one slow provider must not set the pace of a read).

:data:`SPEEDS` is the process's table: :class:`~vaultfs.backends.Metered` (the top of every
backend stack) reports each listing and read it timed, keyed by the remote's spec. A remote's
expected time for an object of ``b`` bytes is its latency plus ``b`` over its throughput,
each an exponentially weighted mean of what was observed (latency from small calls, throughput
from reads of at least :data:`BULK_BYTES`). A remote with no observation yet is expected to be
as fast as the best one: it is asked, and then measured.

:func:`tier` puts a remote in the *slow* tier when its expected time is more than
:data:`SLOW_FACTOR` times the best of the remotes that could serve the same read, and more
than :data:`SLOW_GAP` above it; a reader
asks the fast tier first and the slow one only for what the fast one cannot give. The factor
is wide on purpose: remotes within a few times of each other are all "fast", so the usual
order (local copies, then data fragments, which decode by copying) decides among them and
measurement noise never flips a choice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

#: Once enough remotes answered (k shards of every segment placed, k remotes listed), the
#: others get this fraction of the time that took, at least GRACE_MIN seconds, before the
#: work goes on without them (a restore fetches the index meanwhile): remotes of about equal
#: speed all count, one far slower is left.
GRACE = 0.15
GRACE_MIN = 0.25

#: A read at least this large measures throughput; smaller calls measure latency.
BULK_BYTES = 256 * 1024
#: Weight of a new observation in the running means.
ALPHA = 0.3
#: A remote expected to take more than this many times the best is in the slow tier...
SLOW_FACTOR = 3.0
#: ...and at least this many seconds more: calls of a few milliseconds (a local directory,
#: a LAN, the rclone daemon's pooled connections) differ by multiples from noise alone.
SLOW_GAP = 0.05


@dataclass
class Speed:
    """One remote's running means: ``latency`` (seconds per call) and ``throughput`` (bytes
    per second beyond the latency); None until observed."""

    latency: float | None = None
    throughput: float | None = None

    def expect(self, nbytes: int) -> float | None:
        """Seconds expected for one call returning ``nbytes``; None when nothing is known."""
        if self.latency is None and self.throughput is None:
            return None
        t = self.latency or 0.0
        if self.throughput:
            t += nbytes / self.throughput
        return t


class Speeds:
    """Per-remote speeds, thread-safe. Keys are remote specs."""

    def __init__(self) -> None:
        self._by: dict[str, Speed] = {}
        self._lock = threading.Lock()

    def observe(self, spec: str, nbytes: int, seconds: float) -> None:
        """Record one call that returned ``nbytes`` in ``seconds`` (failed calls count too:
        a remote that times out is slow)."""
        seconds = max(seconds, 1e-6)
        with self._lock:
            s = self._by.setdefault(spec, Speed())
            if nbytes < BULK_BYTES:
                s.latency = _mean(s.latency, seconds)
            else:
                lat = s.latency or 0.0
                rate = nbytes / max(seconds - lat, seconds / 2)
                s.throughput = _mean(s.throughput, rate)

    def expect(self, spec: str, nbytes: int) -> float | None:
        """Seconds ``spec`` is expected to take for a read of ``nbytes``; None if unknown."""
        with self._lock:
            s = self._by.get(spec)
            return None if s is None else s.expect(nbytes)

    def tiers(self, specs: Iterable[str], nbytes: int) -> dict[str, int]:
        """{spec: 0 (fast) or 1 (slow)} for a read of ``nbytes`` that any of ``specs`` could
        serve (see the module docstring); unknown remotes are fast."""
        specs = list(specs)
        known = {s: t for s in specs if (t := self.expect(s, nbytes)) is not None}
        if not known:
            return dict.fromkeys(specs, 0)
        best = min(known.values())
        slow = max(SLOW_FACTOR * best, best + SLOW_GAP)
        return {s: int(s in known and known[s] > slow) for s in specs}

    def forget(self) -> None:
        """Drop every observation (tests; a long-lived process whose network changed)."""
        with self._lock:
            self._by.clear()


def grace(waited: float) -> float:
    """Seconds the remotes still answering get once enough answered after ``waited``
    seconds (:data:`GRACE`)."""
    return max(GRACE_MIN, GRACE * waited)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


#: The process's table: every backend stack feeds it; restore's choice of shards reads it.
SPEEDS = Speeds()
