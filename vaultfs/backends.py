"""The backend stack: the :class:`Backend` contract, its wrappers, and the one factory.

Every path that talks to a remote (flush and upload, restore, audit, repair, prune, key
rotation) gets its backend from :func:`open_backend`, which stacks, in one visible place::

    Metered(Retrying(Paced(LocalRoot?(wrap?(base)))))

* ``base`` is an implementation of :class:`Backend`: the shared rclone daemon
  (:class:`~vaultfs.remotes.RcloneRc`) when it runs, else one rclone command per call
  (:class:`~vaultfs.remotes.RcloneCommand`); repair always takes the command
  (``fail_fast``: each command bounded to 300 s). :class:`MemoryBackend` keeps its objects
  in memory, for tests (:func:`stack` wraps it the same way).
* ``wrap`` inserts a layer right above the base, so retries see what it does:
  :class:`FaultInjecting` (tests only) lies, fails or stalls on purpose, within a budget;
  :class:`Throttled` keeps background work within a :class:`Share` (maintenance on a
  mounted vault, vaultfs/maintenance.py).
* :class:`LocalRoot` (a local-directory remote only) makes a remote whose directory is
  missing (a disk unplugged, a path moved) down: every operation but ``ensure`` raises
  :class:`RootMissing` (never retried) instead of letting rclone recreate the directory.
* :class:`Retrying` retries :class:`Unreachable` and plain :class:`RemoteError` with
  exponential backoff and jitter, a bounded number of times; :class:`ObjectMissing` and
  :class:`BadRemote` are answers, not outages, and are never retried, nor is a remote that
  sent nothing for :data:`~vaultfs.remotes.SILENT_AFTER` seconds (``silent``): asking it
  again would only cost that long again.
* :class:`Paced` keeps each remote's concurrent operations within a limit that adapts to
  what the remote sustains (additive increase on success, halved on a 429/503), and makes
  every caller of a throttling remote wait out a shared, growing pause. The :class:`Pace`
  is per remote and per owner (:class:`Paces`: an open vault shares one across its
  flushes), never process-wide; a slot is freed on every path and a wait is bounded. A
  remote found silent is not asked again for a while: its later operations fail at once.
* :class:`Metered` counts operations and the bytes read, and times reads and listings
  for :data:`vaultfs.hedging.SPEEDS` (which remotes a reader asks first).

The wrappers work per call, never per byte: ``cat`` returns the base's bytes object as is.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from .errors import BadRemote, ObjectMissing, RemoteError, RootMissing, ThawNeeded, Unreachable
from .hedging import SPEEDS
from .remotes import RcloneCommand, RcloneDaemon, RcloneRc, Remote


class Job(Protocol):
    """A background transfer started by :meth:`Backend.copy_dir_async`."""

    def stop(self) -> None:
        """Stop the transfer if still running and wait until it has finished."""


class Backend(Protocol):
    """An object store holding ``<sub>/<name>`` objects (docs/format.md's layout).

    Errors: every method either succeeds or raises :class:`RemoteError`: its subclass
    :class:`Unreachable` for an outage (refused, timed out, throttled: try again later),
    :class:`ObjectMissing` when the remote answered that an object is not there, or a plain
    :class:`RemoteError` for any other failure; :class:`BadRemote` when the spec itself is
    invalid. Every method is idempotent and may be retried after any error: reads have no
    effect, uploads write write-once objects under fixed names (a retry writes the same
    bytes), deletes name their objects, and ``move_dir`` deletes a local file only after it
    was uploaded (a retry moves what is left). Safe to call from several threads at once.
    """

    @property
    def spec(self) -> str:
        """The rclone spec (a secret may be in it: show :attr:`label` instead)."""
        ...

    @property
    def rid(self) -> int | None:
        """The remote's id in the vault; None for a remote not (yet) part of one."""
        ...

    @property
    def label(self) -> str:
        """The spec with secrets elided, for messages."""
        ...

    @property
    def local_dir(self) -> Path | None:
        """For a plain local-directory remote, the directory holding ``<sub>/<name>`` files,
        which a reader may open in place (read only); None for every other remote."""
        ...

    def ensure(self) -> None:
        """Create the remote's root if needed and prove it can be listed."""
        ...

    def list(self, sub: str) -> list[str]:
        """Names of the objects directly under ``sub``; empty when ``sub`` does not exist."""
        ...

    def list_sizes(self, sub: str) -> dict[str, int]:
        """{name: size in bytes} of the objects directly under ``sub`` (size -1: unknown);
        empty when ``sub`` does not exist."""
        ...

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        """{sub: {name: size}} of the objects directly under each of ``subs``, in one
        listing; every sub is a key, with {} when it does not exist."""
        ...

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        """The object's bytes from ``offset``, at most ``count`` of them (-1: to the end).
        Returns fewer bytes than asked for a short object, and ``b""`` from its end on.
        Raises :class:`ObjectMissing` when the object does not exist."""
        ...

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        """Download the named objects of ``sub`` to ``local_dir/<name>``; absent names are
        skipped (the caller checks what arrived). With ``max_bytes`` the transfer stops after
        that many bytes, inside an object if need be (a cut object never appears under its
        name), and RemoteError is raised: a remote cannot make it write more than asked."""
        ...

    def get_dir(self, sub: str, local_dir: Path) -> None:
        """Download every object under ``sub`` into ``local_dir``; nothing when ``sub`` does
        not exist."""
        ...

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> Job | None:
        """Start downloading the objects under ``sub`` into ``local_dir`` in the background,
        about ``max_bytes`` at most (0: no limit); files appear under their own names only
        once complete. None when the backend cannot (then nothing was started)."""
        ...

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        """Store ``data`` as ``sub/name`` (replacing an object of that name)."""
        ...

    def put_file(self, path: Path, sub: str, name: str) -> None:
        """Store the local file ``path`` as ``sub/name`` (replacing an object of that name)."""
        ...

    def move_dir(self, local_dir: Path, sub: str) -> None:
        """Upload every file under ``local_dir`` to ``sub`` (keeping relative paths) and
        delete each local file once it is stored: after a failure, exactly the files not
        yet uploaded are left. Raises :class:`ObjectMissing` if ``local_dir`` is missing."""
        ...

    def delete(self, sub: str, names: list[str]) -> None:
        """Delete the named objects of ``sub``; absent ones are not an error."""
        ...

    def quarantine(self, sub: str, names: list[str]) -> None:
        """Move the named objects of ``sub`` to ``quarantine/<sub>/`` on the same remote
        (server-side where the provider can; nothing is deleted: repair's way with objects
        it does not recognise); absent ones are not an error."""
        ...


class Wrapper:
    """Base of the wrappers: a :class:`Backend` that passes every call to ``inner`` through
    :meth:`_op` (the one place a wrapper hooks in) and forwards the identity attributes."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    @property
    def spec(self) -> str:
        return self.inner.spec

    @property
    def rid(self) -> int | None:
        return self.inner.rid

    @property
    def label(self) -> str:
        return self.inner.label

    @property
    def local_dir(self) -> Path | None:
        return self.inner.local_dir

    def read_in_place(self, nbytes: int) -> None:
        """Account ``nbytes`` that a reader took from :attr:`local_dir` directly, past the
        backend's methods (repair's sources, :data:`restore.READ_IN_PLACE`): passed down to
        the layer that meters them (:class:`Throttled`); nothing for the others."""
        fn = getattr(self.inner, "read_in_place", None)
        if fn is not None:
            fn(nbytes)

    def ensure(self) -> None:
        self._op(self.inner.ensure)

    def list(self, sub: str) -> list[str]:
        return self._op(self.inner.list, sub)

    def list_sizes(self, sub: str) -> dict[str, int]:
        return self._op(self.inner.list_sizes, sub)

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        return self._op(self.inner.list_tree, subs)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        return self._op(self.inner.cat, sub, name, offset, count)

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        self._op(self.inner.get, sub, names, local_dir, max_bytes)

    def get_dir(self, sub: str, local_dir: Path) -> None:
        self._op(self.inner.get_dir, sub, local_dir)

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> Job | None:
        # a background job is started, not awaited: nothing to retry, meter or fail
        return self.inner.copy_dir_async(sub, local_dir, max_bytes)

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        self._op(self.inner.put_bytes, sub, name, data)

    def put_file(self, path: Path, sub: str, name: str) -> None:
        self._op(self.inner.put_file, path, sub, name)

    def move_dir(self, local_dir: Path, sub: str) -> None:
        self._op(self.inner.move_dir, local_dir, sub)

    def delete(self, sub: str, names: list[str]) -> None:
        self._op(self.inner.delete, sub, names)

    def quarantine(self, sub: str, names: list[str]) -> None:
        self._op(self.inner.quarantine, sub, names)


class Retrying(Wrapper):
    """Retry transient failures with exponential backoff and full jitter.

    ``attempts`` bounds the calls per operation; the last error is re-raised. Only
    :class:`Unreachable` and plain :class:`RemoteError` are retried (safe: every operation is
    idempotent, see :class:`Backend`), never a ``silent`` one (the remote sent nothing for
    :data:`~vaultfs.remotes.SILENT_AFTER` seconds); ``retries`` counts the retries made.
    """

    def __init__(
        self,
        inner: Backend,
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

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        for attempt in range(self.attempts):
            try:
                return fn(*args)
            # a thaw takes hours, a missing directory a person: not seconds
            except (ObjectMissing, BadRemote, ThawNeeded, RootMissing):
                raise
            except RemoteError as e:
                if attempt + 1 >= self.attempts or getattr(e, "silent", False):
                    raise
                self.retries += 1
                cap = min(self.max_delay, self.base_delay * 2**attempt)
                self.sleep(random.uniform(cap / 2, cap))
        raise AssertionError("unreachable")  # pragma: no cover


class LocalRoot(Wrapper):
    """A local-directory remote (:attr:`Backend.local_dir`) that is down while its directory
    is missing (:meth:`~vaultfs.remotes.Remote.missing_root`: a disk unplugged, a path
    moved): every operation but :meth:`ensure` checks it first (one stat) and raises
    :class:`RootMissing` instead of asking rclone. The one place every write passes through
    (the upload queue's pushes, commit's and repair's uploads, deletes): rclone would
    otherwise recreate the directory on whatever disk holds the path now, and a listing
    would read the missing directory as an empty remote whose objects are all lost. Only
    :meth:`ensure` creates it (``init``, ``remote add``, ``remote replace``)."""

    def __init__(self, inner: Backend, check: Callable[[], str | None]) -> None:
        super().__init__(inner)
        self.check = check

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        if (why := self.check()) is not None:
            raise RootMissing(why)
        return fn(*args)

    def ensure(self) -> None:
        self.inner.ensure()


class Pace:
    """One remote's adaptive concurrency, shared by the backends of that remote that one
    owner opened (:class:`Paces`: an open vault, or one job).

    At most ``limit`` operations run at once (``start`` at first, between 1 and
    ``ceiling``): each success adds 1/limit (about one more per round of operations), each
    throttling answer halves it and sets a pause every new operation waits out, doubling
    from ``pause`` up to ``max_pause`` while the throttling goes on, back to ``pause`` after
    a success. ``throttles`` counts the throttling answers seen.

    Never blocks forever: an operation waiting for a slot while no operation of the remote
    ended for ``max_wait`` seconds (they are presumed stuck on a remote that stopped
    answering) raises :class:`Unreachable`, and so does, at once, every later one that finds
    no slot before some operation ends (retries do not wait again), and every wait once the
    pace is closed (:meth:`close`). A slot is freed on every path out of :meth:`slot`, exceptions and
    interrupted pauses included.

    A remote found silent (:meth:`silenced`: it sent nothing for
    :data:`~vaultfs.remotes.SILENT_AFTER` seconds) is not asked again for ``silent_hold``
    seconds: every operation starting meanwhile raises a ``silent`` :class:`Unreachable` at
    once, so one command pays the silence once, not once per operation or retry. An
    operation that succeeds there (the remote answered after all) ends the hold. An owner
    that found the remote down may also hold it until it says otherwise (:meth:`hold`,
    :meth:`release`: a pass of the routine, vaultfs/routine.py)."""

    def __init__(
        self,
        start: float = 8,
        ceiling: float = 32,
        pause: float = 0.5,
        max_pause: float = 30.0,
        max_wait: float = 300.0,
        silent_hold: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = float(start)
        self.ceiling = ceiling
        self.base_pause = self.pause = pause
        self.max_pause = max_pause
        self.max_wait = max_wait
        self.silent_hold = silent_hold
        self.sleep = sleep
        self.clock = clock
        self.active = 0  # operations holding a slot
        self.waiting = 0  # operations waiting for one
        self.throttles = 0
        self.closed = False
        self._resume_at = 0.0
        self._last_end = clock()
        self._stuck = False  # a wait timed out and no call has ended since
        self._silent_until = 0.0  # clock() until which the remote is not asked (silenced)
        self._silence = ""  # why: the error that found it silent
        self._held = ""  # why the owner holds it (:meth:`hold`): not asked until released
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, label: str) -> Iterator[None]:
        """Hold one of the remote's slots (``label`` names it in errors) for the body, after
        any pause: freed when the body ends, counted a success only if it returned."""
        with self._cond:
            since = self.clock()
            self.waiting += 1
            try:
                while True:
                    if self.closed:
                        raise Unreachable(f"{label}: not asked: the vault or job using it closed")
                    if self._held:
                        raise Unreachable(self._held, silent=True)
                    if self.clock() < self._silent_until:
                        raise Unreachable(
                            f"{self._silence}; so not asked again for {self.silent_hold:g} s",
                            silent=True,
                        )
                    if self.active < int(self.limit):
                        break
                    left = max(self._last_end, since) + self.max_wait - self.clock()
                    if left <= 0 or self._stuck:
                        self._stuck = True  # later callers fail at once until a call ends
                        raise Unreachable(
                            f"{label}: no operation on it ended for {self.max_wait:.0f} s while "
                            f"{self.active} still run: it stopped answering; try again later"
                        )
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
            self.active += 1
            wait = self._resume_at - self.clock()
        ok = False
        try:
            if wait > 0:
                self.sleep(wait)
            yield
            ok = True
        finally:
            self._release(ok)

    def _release(self, ok: bool) -> None:
        with self._cond:
            self.active -= 1
            self._last_end = self.clock()
            self._stuck = False
            if ok:
                self.limit = min(self.ceiling, self.limit + 1 / self.limit)
                self.pause = self.base_pause
                self._silent_until = 0.0  # it answered
            self._cond.notify_all()

    def silenced(self, why: str) -> None:
        """The remote sent nothing for :data:`~vaultfs.remotes.SILENT_AFTER` seconds (``why``:
        that error): fail every operation that starts in the next ``silent_hold`` seconds."""
        with self._cond:
            self._silent_until = self.clock() + self.silent_hold
            self._silence = why
            self._cond.notify_all()  # the waiting ones fail at once too

    def hold(self, why: str) -> None:
        """The owner found the remote down: until :meth:`release`, every operation that
        starts raises a ``silent`` :class:`Unreachable` saying ``why``, at once and without
        a retry, as in a silent hold."""
        with self._cond:
            self._held = why
            self._cond.notify_all()  # the waiting ones fail at once too

    def release(self) -> None:
        """End :meth:`hold`: the remote is asked again."""
        with self._cond:
            self._held = ""

    def throttled(self) -> None:
        """The remote said 429/503: halve the limit, pause everyone."""
        with self._cond:
            self.throttles += 1
            self.limit = max(1.0, self.limit / 2)
            self._resume_at = max(self._resume_at, self.clock() + self.pause)
            self.pause = min(self.max_pause, self.pause * 2)

    def close(self) -> None:
        """Refuse every later operation and wake the waiting ones (they raise): operations
        an owner abandoned still running end into a pace nobody else uses."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Paces:
    """The :class:`Pace` of each remote, by spec, for one owner: an open vault (every
    backend it opens, across flushes, shares its remote's pace) or one job. Never shared
    between owners, so an operation one left stuck on a remote that stopped answering, or
    a pace it throttled down, never holds back another that opens the same spec (a test
    server restarted on a reused port, a vault opened again). :meth:`close` closes them all
    (the owner's close does)."""

    def __init__(self, **pace: Any) -> None:
        self._pace = pace  # keyword arguments of every Pace made (tests: max_wait)
        self._by: dict[str, Pace] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, spec: str) -> Pace:
        """``spec``'s pace (made on first use; a closed one after :meth:`close`)."""
        with self._lock:
            p = self._by.get(spec)
            if p is None:
                p = self._by[spec] = Pace(**self._pace)
                if self._closed:
                    p.close()
            return p

    @contextmanager
    def holding(self, down: dict[str, str]) -> Iterator[None]:
        """Ask the remotes in ``down`` (spec: why) nothing in the body (:meth:`Pace.hold`):
        what wants them meets the error at once, as it would from a remote that is down."""
        paces = [(self.get(spec), why) for spec, why in down.items()]
        for p, why in paces:
            p.hold(why)
        try:
            yield
        finally:
            for p, _why in paces:
                p.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            paces = list(self._by.values())
        for p in paces:
            p.close()


class Paced(Wrapper):
    """A backend within its remote's :class:`Pace` (its own one when none is given): every
    operation holds a slot; an :class:`Unreachable` that says the provider throttles
    (``throttled``: 429, 503, slow down) tells the pace, then is raised as is for
    :class:`Retrying` to retry; one that says the remote is silent tells the pace too
    (:meth:`Pace.silenced`), and is not retried."""

    def __init__(self, inner: Backend, pace: Pace | None = None) -> None:
        super().__init__(inner)
        self.pace = pace if pace is not None else Pace()

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.pace.slot(self.label):
            try:
                return fn(*args)
            except Unreachable as e:
                if e.throttled:
                    self.pace.throttled()
                if e.silent:
                    self.pace.silenced(e.message)
                raise


class Metered(Wrapper):
    """Counts the operations (``calls``) and the bytes that ``cat`` and ``get`` returned
    (``bytes_read``), and reports how long each read and listing took to
    :data:`vaultfs.hedging.SPEEDS`, so readers can ask the remotes expected fastest."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.bytes_read = 0
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self.calls += 1
        return fn(*args)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """``fn(*args)`` and its seconds; a failure is observed as a zero-byte call."""
        t0 = time.monotonic()
        try:
            return fn(*args), time.monotonic() - t0
        except RemoteError:
            SPEEDS.observe(self.spec, 0, time.monotonic() - t0)
            raise

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        tree, secs = self._timed(super().list_tree, subs)
        SPEEDS.observe(self.spec, 0, secs)
        return tree

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        data, secs = self._timed(super().cat, sub, name, offset, count)
        SPEEDS.observe(self.spec, len(data), secs)
        self._count(len(data))
        return data

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        _, secs = self._timed(super().get, sub, names, local_dir, max_bytes)
        got = sum(p.stat().st_size for n in names if (p := local_dir / n).exists())
        SPEEDS.observe(self.spec, got, secs)
        self._count(got)


class FaultInjecting(Wrapper):
    """For tests: misbehave on purpose, each fault within a bounded budget, then behave.

    * ``wrong_ranges``: the next N range reads (``cat`` with an offset or a count) return
      bytes with one bit flipped — a remote that lies about byte ranges only;
    * ``unavailable``: the next N calls fail with an injected HTTP 503 (:class:`Unreachable`);
    * ``delay``: seconds added to every call (a slow remote);
    * ``stall``: every call waits until the event is set (a remote that stopped answering
      in the middle of an operation: the budget is the test's).
    ``injected`` counts the faults delivered; ``lied_about`` names the objects lied about.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        wrong_ranges: int = 0,
        unavailable: int = 0,
        delay: float = 0.0,
        stall: threading.Event | None = None,
    ) -> None:
        super().__init__(inner)
        self.wrong_ranges = wrong_ranges
        self.unavailable = unavailable
        self.delay = delay
        self.stall = stall
        self.injected = 0
        self.lied_about: list[str] = []
        self._lock = threading.Lock()

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        if self.stall is not None:
            self.stall.wait()
        with self._lock:
            if self.unavailable > 0:
                self.unavailable -= 1
                self.injected += 1
                raise Unreachable(f"{self.label}: 503 Service Unavailable (injected)", True)
        return fn(*args)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        data = super().cat(sub, name, offset, count)
        ranged = offset != 0 or count >= 0
        with self._lock:
            lie = ranged and bool(data) and self.wrong_ranges > 0
            if lie:
                self.wrong_ranges -= 1
                self.injected += 1
                self.lied_about.append(name)
        if not lie:
            return data
        buf = bytearray(data)
        buf[len(buf) // 2] ^= 0x10
        return bytes(buf)


class Share:
    """The share of the remotes that background work (maintenance on a mounted vault) may
    take, shared by every backend of one job (:class:`Throttled`): at most ``ops`` remote
    operations at once, a token bucket of ``rate`` bytes per second over what they read
    (0: no limit), and before each operation a pause while ``busy()`` says the foreground
    needs the machine, at most ``max_pause`` seconds so the job still moves on."""

    def __init__(
        self,
        rate: float = 0.0,
        ops: int = 0,
        busy: Callable[[], bool] | None = None,
        max_pause: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.busy = busy
        self.max_pause = max_pause
        self.sleep = sleep
        self.clock = clock
        self.slots = threading.BoundedSemaphore(ops) if ops > 0 else None
        self.paused = 0.0  # seconds spent waiting for the foreground or the byte rate
        self._lock = threading.Lock()
        self._free_at = clock()  # when the bytes read so far are paid for

    def before(self) -> None:
        """Wait while the foreground is busy (bounded by ``max_pause``)."""
        if self.busy is None:
            return
        t0 = self.clock()
        while self.busy() and self.clock() - t0 < self.max_pause:
            self.sleep(0.05)
        self._waited(self.clock() - t0)

    def charge(self, nbytes: int) -> None:
        """Account ``nbytes`` read; sleep until the rate allows them."""
        if self.rate <= 0 or nbytes <= 0:
            return
        with self._lock:
            now = self.clock()
            self._free_at = max(self._free_at, now) + nbytes / self.rate
            wait = self._free_at - now
        if wait > 0:
            self.sleep(wait)
            self._waited(wait)

    def _waited(self, seconds: float) -> None:
        with self._lock:
            self.paused += seconds

    def wrap(self, inner: Backend) -> Backend:
        """A ``wrap`` for :func:`open_backend`: ``inner`` within this share."""
        return Throttled(inner, self)


class Throttled(Wrapper):
    """A backend within a :class:`Share`: each operation waits for a slot and for a quiet
    foreground; the bytes ``cat`` and ``get`` return are charged to the share's byte rate."""

    def __init__(self, inner: Backend, share: Share) -> None:
        super().__init__(inner)
        self.share = share

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.share.before()
        if self.share.slots is None:
            return fn(*args)
        with self.share.slots:
            return fn(*args)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        data = super().cat(sub, name, offset, count)
        self.share.charge(len(data))
        return data

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        super().get(sub, names, local_dir, max_bytes)
        self.share.charge(sum(p.stat().st_size for n in names if (p := local_dir / n).exists()))

    def read_in_place(self, nbytes: int) -> None:
        """Bytes read from :attr:`local_dir` directly are the share's too: wait for a quiet
        foreground and for the byte rate, as a download of them would."""
        self.share.before()
        self.share.charge(nbytes)


class MemoryBackend(Remote):
    """A :class:`Backend` keeping its objects in a dict, for fast tests: the same contract
    (ranged ``cat``, :class:`ObjectMissing`, idempotent deletes), thread-safe. ``spec`` is
    ``memory:<name>``; it has no :attr:`local_dir`."""

    def __init__(self, name: str = "mem", rid: int | None = None) -> None:
        super().__init__(f"memory:{name}", rid)
        self.objects: dict[str, bytes] = {}  # "<sub>/<name>" -> bytes
        self._lock = threading.Lock()

    @staticmethod
    def _key(sub: str, name: str) -> str:
        return f"{sub}/{name}" if sub else name

    def _under(self, sub: str) -> dict[str, bytes]:
        """{path relative to ``sub``: bytes} of every object under ``sub``, at any depth."""
        prefix = f"{sub}/" if sub else ""
        with self._lock:
            return {k[len(prefix) :]: v for k, v in self.objects.items() if k.startswith(prefix)}

    def ensure(self) -> None:
        return None

    def list(self, sub: str) -> list[str]:
        return list(self.list_sizes(sub))

    def list_sizes(self, sub: str) -> dict[str, int]:
        return {n: len(v) for n, v in self._under(sub).items() if "/" not in n}

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        return {sub: self.list_sizes(sub) for sub in subs}

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        with self._lock:
            data = self.objects.get(self._key(sub, name))
        if data is None:
            raise ObjectMissing(f"{self.label}: read {sub}/{name} failed: object not found")
        return data[offset : None if count < 0 else offset + count]

    def _write(self, files: dict[str, bytes], local_dir: Path) -> None:
        for rel, data in files.items():
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        objs = self._under(sub)  # objects are what was put: max_bytes cannot be exceeded
        self._write({n: objs[n] for n in names if n in objs}, local_dir)

    def get_dir(self, sub: str, local_dir: Path) -> None:
        self._write(self._under(sub), local_dir)

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> None:
        return None

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        with self._lock:
            self.objects[self._key(sub, name)] = bytes(data)

    def put_file(self, path: Path, sub: str, name: str) -> None:
        self.put_bytes(sub, name, Path(path).read_bytes())

    def move_dir(self, local_dir: Path, sub: str) -> None:
        if not local_dir.is_dir():
            raise ObjectMissing(f"{self.label}: upload to {sub} failed: directory not found")
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.put_bytes(sub, f.relative_to(local_dir).as_posix(), f.read_bytes())
            f.unlink()  # only once stored: a failure leaves the rest to a retry

    def delete(self, sub: str, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self.objects.pop(self._key(sub, n), None)

    def quarantine(self, sub: str, names: list[str]) -> None:
        with self._lock:
            for n in names:
                if (data := self.objects.pop(self._key(sub, n), None)) is not None:
                    self.objects[self._key(f"quarantine/{sub}", n)] = data


def stack(
    base: Backend, wrap: Callable[[Backend], Backend] | None = None, pace: Pace | None = None
) -> Metered:
    """The wrappers every path uses, around ``base``:
    ``Metered(Retrying(Paced(LocalRoot?(wrap?(base)))))``, within ``pace`` (else a pace of
    its own); :class:`LocalRoot` for a local-directory remote only."""
    b = base if wrap is None else wrap(base)
    if isinstance(base, Remote) and base.local_dir is not None:
        b = LocalRoot(b, base.missing_root)
    return Metered(Retrying(Paced(b, pace)))


def open_backend(
    spec: str,
    rid: int | None = None,
    *,
    fail_fast: bool = False,
    wrap: Callable[[Backend], Backend] | None = None,
    paces: Paces | None = None,
) -> Metered:
    """The backend for one remote, for every path. The base is the shared rclone daemon when
    it runs, else one rclone command per call (also when ``VAULTFS_RCD=0``); ``fail_fast``
    (repair) always takes the command, with at most
    300 s per command. ``wrap`` inserts a layer
    between the base and the retries (fault injection in tests), see :func:`stack`.
    ``paces``: the owner's paces (an open vault's), so its backends of one remote share
    that remote's concurrency; without it the backend paces itself alone."""
    base: Backend
    if fail_fast:
        base = RcloneCommand(spec, rid, op_timeout=300)
    elif RcloneDaemon.get() is not None:
        base = RcloneRc(spec, rid)
    else:
        base = RcloneCommand(spec, rid)
    return stack(base, wrap, None if paces is None else paces.get(spec))
