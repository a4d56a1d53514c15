"""Behaviour stacked around a :class:`~vaultfs.remotes.Remote`, in one visible place.

:func:`open_backend` builds the stack every audit and repair uses::

    Metered(Retrying(FaultInjecting?(RcloneBackend(spec))))

* :class:`RcloneBackend` is the engine's rclone-CLI remote with tight network timeouts and a
  classification of every failure into :class:`Unreachable` (temporary: connection refused,
  timeouts, HTTP 429/503 — the data is presumed intact), :class:`ObjectMissing` (the remote
  answered: no such object) or a plain :class:`RemoteError` (any other failure).
* :class:`Retrying` retries ``Unreachable`` and plain ``RemoteError`` with exponential backoff
  and jitter, a bounded number of times; ``ObjectMissing`` and ``BadRemote`` are answers, not
  outages, and are never retried. Every method of the stack is idempotent (reads, uploads of
  write-once objects under fixed names, deletes of named objects), so retrying is safe.
* :class:`FaultInjecting` (tests only) lies, fails or stalls on purpose, within a bounded budget.
* :class:`Metered` counts calls and bytes read, for reports and the benchmark.

Method contract (shared by every layer): ``list_sizes(sub) -> {name: size}`` (empty when the
folder does not exist), ``list(sub)``, ``cat(sub, name, offset, count)`` (bytes; raises
``ObjectMissing`` for an absent object; may return fewer bytes than asked for a short object),
``get(sub, names, dir)`` (absent names are skipped), ``put_file``, ``put_bytes``, ``delete``
(absent names are not an error), ``move_dir``, ``ensure``.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import BadRemote
from .remotes import Remote, RemoteError, join

#: Substrings of rclone/provider errors that mean "try again later", not "data gone".
TRANSIENT_MARKERS = (
    "connection refused",
    "connection reset",
    "timed out",
    "timeout",
    "no route to host",
    "network is unreachable",
    "couldn't connect",
    "broken pipe",
    "unexpected eof",
    "429",
    "too many requests",
    "slowdown",
    "slow down",
    "503",
    "service unavailable",
    "temporarily",
)
MISSING_MARKERS = ("not found", "no such file", "nosuchkey", "object not found", "404")

#: rclone flags that make a dead or hung remote fail fast (our own Retrying layer retries).
NET_FLAGS = ["--contimeout", "5s", "--timeout", "30s", "--low-level-retries", "1", "--retries", "1"]


class Unreachable(RemoteError):
    """The remote is temporarily unreachable (refused, timed out, throttled with 429/503)."""

    exit_code = 11


class ObjectMissing(RemoteError):
    """The remote answered, and the object is not there."""

    exit_code = 12


def classify(exc: RemoteError) -> RemoteError:
    """Map a generic RemoteError to Unreachable / ObjectMissing where the message tells."""
    if isinstance(exc, Unreachable | ObjectMissing | BadRemote):
        return exc
    low = exc.message.lower()
    if any(m in low for m in TRANSIENT_MARKERS):
        return Unreachable(exc.message)
    if any(m in low for m in MISSING_MARKERS):
        return ObjectMissing(exc.message)
    return exc


class RcloneBackend(Remote):
    """The engine's :class:`Remote` with network timeouts and classified errors (one rclone
    command per call, with :data:`NET_FLAGS`, not the shared daemon)."""

    use_rcd = False

    def __init__(self, spec: str, rid: int | None = None, op_timeout: float = 300) -> None:
        super().__init__(spec, rid)
        self.op_timeout = op_timeout

    def _run(
        self, args: list[str], *, timeout: float = 3600, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess:
        # flags go right after the subcommand; TRANSFER_FLAGS given later by the engine win
        args = [args[0], *NET_FLAGS, *args[1:]]
        return super()._run(args, timeout=min(timeout, self.op_timeout), stdin=stdin)

    def _call(self, fn: Callable, *a, **kw):
        try:
            return fn(*a, **kw)
        except RemoteError as e:
            raise classify(e) from None

    def ensure(self) -> None:
        self._call(super().ensure)

    def list(self, sub: str) -> list[str]:
        return self._call(super().list, sub)

    def list_sizes(self, sub: str) -> dict[str, int]:
        """{name: size in bytes} of the objects directly under ``sub``."""
        proc = self._run(
            ["lsf", "--files-only", "--format", "sp", "--separator", "\t", join(self.spec, sub)],
            timeout=600,
        )
        if proc.returncode == 3 or (
            proc.returncode != 0 and b"directory not found" in proc.stderr.lower()
        ):
            return {}
        self._call(self._check, proc, f"list {sub}")
        out: dict[str, int] = {}
        for ln in proc.stdout.decode().splitlines():
            size, _, name = ln.partition("\t")
            if name:
                out[name] = int(size) if size.lstrip("-").isdigit() else -1
        return out

    def list_tree(self, subs: tuple[str, ...] = ("data", "meta", "manifests")) -> dict:
        return self._call(super().list_tree, subs)

    def move_dir(self, local_dir: Path, sub: str) -> None:
        self._call(super().move_dir, local_dir, sub)

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        self._call(super().put_bytes, sub, name, data)

    def put_file(self, path: Path, sub: str, name: str) -> None:
        self._call(super().put_file, path, sub, name)

    def get(self, sub: str, names: list[str], local_dir: Path) -> None:
        self._call(super().get, sub, names, local_dir)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        # `rclone cat` of an absent file lists it as a directory: "directory not found"
        try:
            data = super().cat(sub, name, offset, count)
        except RemoteError as e:
            err = classify(e)
            if "directory not found" in e.message.lower():
                err = ObjectMissing(f"{self.label}: {sub}/{name} not found")
            raise err from None
        return data

    def delete(self, sub: str, names: list[str]) -> None:
        try:
            super().delete(sub, names)
        except RemoteError as e:
            err = classify(e)
            if not isinstance(err, ObjectMissing):
                raise err from None


class RemoteWrapper:
    """Base of the wrappers: forwards every attribute to the wrapped backend."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class Retrying(RemoteWrapper):
    """Retry transient failures with exponential backoff and full jitter.

    ``attempts`` bounds the calls per operation; the last error is re-raised. Only
    :class:`Unreachable` and plain :class:`RemoteError` are retried.
    """

    OPS = ("ensure", "list", "list_sizes", "list_tree", "cat", "get", "put_file", "put_bytes",
           "delete", "move_dir")  # fmt: skip

    def __init__(
        self,
        inner,
        attempts: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(inner)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.retries = 0

    def __getattr__(self, name: str):
        target = getattr(self.inner, name)
        if name not in self.OPS:
            return target

        def call(*a, **kw):
            for attempt in range(self.attempts):
                try:
                    return target(*a, **kw)
                except (ObjectMissing, BadRemote):
                    raise
                except RemoteError:
                    if attempt + 1 >= self.attempts:
                        raise
                    self.retries += 1
                    cap = min(self.max_delay, self.base_delay * 2**attempt)
                    self.sleep(random.uniform(cap / 2, cap))
            raise AssertionError("unreachable")  # pragma: no cover

        return call


class Metered(RemoteWrapper):
    """Counts operations and the bytes read from the remote (cat and get)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.bytes_read = 0
        self.calls = 0
        self._lock = threading.Lock()

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        data = self.inner.cat(sub, name, offset, count)
        with self._lock:
            self.bytes_read += len(data)
            self.calls += 1
        return data

    def get(self, sub: str, names: list[str], local_dir: Path) -> None:
        self.inner.get(sub, names, local_dir)
        got = sum((local_dir / n).stat().st_size for n in names if (local_dir / n).exists())
        with self._lock:
            self.bytes_read += got
            self.calls += 1


class FaultInjecting(RemoteWrapper):
    """For tests: misbehave on purpose, each fault within a bounded budget, then behave.

    * ``wrong_ranges``: the next N range reads (``cat`` with an offset or a count) return
      bytes with one bit flipped — a remote that lies about byte ranges only;
    * ``unavailable``: the next N calls fail with an injected HTTP 503;
    * ``delay``: seconds added to every call (a slow remote).
    ``injected`` counts the faults delivered.
    """

    def __init__(
        self, inner, *, wrong_ranges: int = 0, unavailable: int = 0, delay: float = 0.0
    ) -> None:
        super().__init__(inner)
        self.wrong_ranges = wrong_ranges
        self.unavailable = unavailable
        self.delay = delay
        self.injected = 0
        self.lied_about: list[str] = []
        self._lock = threading.Lock()

    def _maybe_fail(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            if self.unavailable > 0:
                self.unavailable -= 1
                self.injected += 1
                raise Unreachable(f"{self.inner.label}: 503 Service Unavailable (injected)")

    def __getattr__(self, name: str):
        target = getattr(self.inner, name)
        if name not in Retrying.OPS or name == "cat":
            return target

        def call(*a, **kw):
            self._maybe_fail()
            return target(*a, **kw)

        return call

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        self._maybe_fail()
        data = self.inner.cat(sub, name, offset, count)
        ranged = offset != 0 or count >= 0
        with self._lock:
            lie = ranged and data and self.wrong_ranges > 0
            if lie:
                self.wrong_ranges -= 1
                self.injected += 1
                self.lied_about.append(name)
        if lie:
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x10
            return bytes(buf)
        return data


def open_backend(
    spec: str,
    rid: int | None = None,
    *,
    retry: bool = True,
    wrap: Callable[[object], object] | None = None,
) -> Metered:
    """The standard stack for one remote. ``wrap`` inserts a layer (fault injection in tests)
    between the rclone backend and the retry layer, so retries see injected faults too."""
    b: object = RcloneBackend(spec, rid)
    if wrap is not None:
        b = wrap(b)
    if retry:
        b = Retrying(b)
    return Metered(b)
