"""The control socket: how `vaultfs snapshot|flush|status|umount` reach a running mount.

The mount daemon holds the vault's lock, so other commands talk to it instead of opening the
vault. It listens on two unix sockets, one named after the vault home and one after the
mountpoint (so `vaultfs umount MOUNTPOINT` needs no --home).

Trust runs both ways. The sockets live in a directory only the user can enter
(:func:`run_dir`: ``$XDG_RUNTIME_DIR/vaultfs``, or ``~/.cache/vaultfs/run``; created 0700 and
refused when another user owns it or others may write in it), so no other local user can
bind a name first, squat it, or keep the owner from mounting. The server serves only its own
user and root (``SO_PEERCRED`` of the client); the client talks only to a server running as
its own user or root (``SO_PEERCRED`` of the server), so a fake daemon gets a clear error,
never a trusted answer. A socket file left by a crashed daemon is replaced by the next one.

Protocol: one JSON object per line each way. Request ``{"cmd": ...}``; reply
``{"ok": true, ...}`` or ``{"ok": false, "error": message, "code": exit code}``.
Commands: ``ping`` (reply ``pid``, ``mountpoint``, ``detached``), ``status`` (`vaultfs status`'s report), ``snapshots``, ``ls``
(``snapshot``, ``path``: `vaultfs ls`; the rows come before the reply, in lines
``{"part": [row, ...]}`` of about :data:`PART_SIZE` characters, so no listing is too large
for :data:`MAX_REPLY`), ``run`` (a pass of the routine, as `vaultfs run` makes it:
vaultfs/routine.py; reply ``pass``, its report), ``flush``, ``snapshot`` (``name``),
``delete`` (``id``), ``umount`` (store, ship, upload and report; the client then unmounts),
``job`` (``job``, ``args``: verify, repair, prune, forget, remote
changes, key rotation and re-encryption run in the daemon, one at a time (`forget` without
--prune beside one); reply ``result``, the command's report: vaultfs/maintenance.py).
Once the mount is ending (detached by a lazy unmount, or unmounted) ``run``, ``snapshot``,
``delete`` and ``job`` are refused with exit 17 (vaultfs/daemon.py, NEW_WORK).
A ``job`` request with ``"progress": true`` also gets, before its reply, lines
``{"progress": {"done": N, "total": T}}`` (bytes; ``total`` null while unknown), at most
:data:`PROGRESS_EVERY` seconds apart and the last one when the work is done; a client that
does not ask gets none, and a daemon that does not know the key sends none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EXIT_DAEMON_GONE, InputError, VaultError, disk_full

log = logging.getLogger("vaultfs.control")

#: A reply larger than this is not a control reply (status replies are a few KiB).
MAX_REPLY = 16 * 1024 * 1024
#: The size a part line of a reply sent in parts (``ls``) is cut at, in characters of JSON:
#: far below MAX_REPLY, which the client allows a line.
PART_SIZE = 1024 * 1024
#: The least interval between two progress lines of a job (a terminal's bar redraws ~10/s).
PROGRESS_EVERY = 0.1


class ControlError(VaultError):
    exit_code = 1


class DaemonGone(ControlError):
    """The mount daemon closed the control connection without answering: it died (``kill
    -9``, a crash) or stopped mid-request. Its mount.log says why; the next ``vaultfs mount``
    recovers a dead mount, then the command can run again."""

    exit_code = EXIT_DAEMON_GONE


def _private_dir(path: Path) -> Path:
    """``path`` created 0700 if missing; ControlError unless it is a real directory owned by
    this user that no one else may write in."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ControlError(f"cannot create the control directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ControlError(
            f"the control directory {path} is not a directory private to this user "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):#o}); remove it or fix "
            "its owner and mode (0700)"
        )
    return path


def run_dir() -> Path:
    """Where this user's control sockets live: ``$XDG_RUNTIME_DIR/vaultfs`` when that runtime
    directory is this user's and private, else ``~/.cache/vaultfs/run``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
            if st.st_uid == os.getuid() and not st.st_mode & 0o077:
                return _private_dir(Path(xdg) / "vaultfs")
        except OSError:
            pass
        log.warning("XDG_RUNTIME_DIR=%s is not private to this user; not using it", xdg)
    return _private_dir(Path.home() / ".cache" / "vaultfs" / "run")


def _name(kind: str, real: str) -> str:
    path = str(run_dir() / f"{kind}-{hashlib.sha256(real.encode()).hexdigest()[:24]}.sock")
    if len(path.encode()) > 107:  # sun_path holds 108 bytes with the NUL
        raise ControlError(
            f"the control socket path {path} is longer than unix sockets allow; "
            "set XDG_RUNTIME_DIR to a short private directory"
        )
    return path


def home_address(home: Path) -> str:
    return _name("h", os.path.realpath(os.path.abspath(home)))


def mount_address(mountpoint: Path) -> str:
    """Never stats the mountpoint itself: the daemon computes this while it is mounted and
    not yet serving, and a dead mount would answer ENOTCONN."""
    absolute = os.path.abspath(mountpoint)
    parent = os.path.realpath(os.path.dirname(absolute))
    return _name("m", os.path.join(parent, os.path.basename(absolute)))


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return struct.unpack("3i", creds)[1]


def _trusted(uid: int) -> bool:
    return uid == os.getuid() or uid == 0


def call(
    address: str,
    request: dict,
    timeout: float | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    parts: Callable[[object], None] | None = None,
) -> dict | None:
    """Send one request; None if no daemon listens there. Raises the daemon's error, and
    ControlError if whoever listens is another user (never trusts its answer). With
    ``progress``, asks for the job's progress lines and calls ``progress(done, total)`` for
    each (``timeout`` then bounds the wait for each line); with ``parts``, calls
    ``parts(part)`` for each part line of a reply sent in parts (``ls``)."""
    if progress is not None:
        request = {**request, "progress": True}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        try:
            s.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        uid = _peer_uid(s)
        if not _trusted(uid):
            raise ControlError(
                f"the control socket {address} is served by uid {uid}, not by this user: "
                "not a vaultfs mount of yours; its answer was not read"
            )
        s.settimeout(timeout)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while True:
            while b"\n" not in buf:
                try:
                    part = s.recv(65536)
                except TimeoutError:
                    raise ControlError(
                        f"the mount daemon did not answer {request.get('cmd')!r} within "
                        f"{timeout:.0f}s (see mount.log)"
                    ) from None
                if not part:
                    raise DaemonGone(
                        "the mount daemon closed the connection without an answer: it stopped "
                        "(see mount.log); run `vaultfs mount` again (it recovers a dead "
                        "mount), then rerun this command"
                    )
                buf += part
                if len(buf) > MAX_REPLY:
                    raise ControlError("the mount daemon's reply is too large (see mount.log)")
            line, buf = buf.split(b"\n", 1)
            reply = _parse(line)
            if "ok" in reply:
                break
            if parts is not None and "part" in reply:
                parts(reply["part"])
                continue
            if progress is None or "progress" not in reply:
                break
            event = reply["progress"]
            if isinstance(event, dict) and isinstance(event.get("done"), int):
                total = event.get("total")
                progress(event["done"], total if isinstance(total, int) else None)
    finally:
        s.close()
    if not reply.get("ok"):
        err = ControlError(str(reply.get("error", "the mount daemon reported an error")))
        code = reply.get("code", 1)
        err.exit_code = code if isinstance(code, int) and 0 < code < 256 else 1
        raise err
    return reply


def _parse(line: bytes) -> dict:
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise ControlError("the mount daemon sent a malformed reply (see mount.log)")
    return reply


def mounted(home: Path) -> dict | None:
    """The running mount of the vault at ``home`` (its ping reply: pid, mountpoint, and
    ``detached``: true after a lazy unmount, its daemon serving the files still open), or
    None."""
    return call(home_address(home), {"cmd": "ping"}, timeout=30)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        if not _trusted(_peer_uid(self.request)):
            return
        line = self.rfile.readline(65536)
        try:
            try:
                req = json.loads(line)
            except (ValueError, RecursionError):
                req = None
            if not isinstance(req, dict):
                raise InputError("a control request is one JSON object")
            if req.get("progress") is True:  # the job's dispatch reports through it
                req["progress"] = _Progress(self.wfile)
            else:
                req.pop("progress", None)
            result = self.server.dispatch(req)  # type: ignore[attr-defined]
            for part in result.pop("parts", ()):  # an iterator: computed as it is sent
                try:
                    self.wfile.write(json.dumps({"part": part}).encode() + b"\n")
                except OSError:
                    log.info("control client left during the reply to %r", req)
                    return
            reply = {"ok": True, **result}
        except VaultError as e:
            reply = {"ok": False, "error": e.message, "code": e.exit_code}
        except Exception as e:  # reported to the client, logged here
            log.exception("control request failed")
            if (full := disk_full(e)) is not None:  # the home's disk, as the CLI says it
                reply = {"ok": False, "error": full.message, "code": full.exit_code}
            else:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": 1}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:  # the client went away (Ctrl-C) while its request ran
            log.info("control client left before the reply to %r", req)


class _Progress:
    """A job's ``progress(done, total)`` for a client that asked for it: a progress line on
    the connection, at most one per :data:`PROGRESS_EVERY` seconds (and the one that reaches
    the total); silent once the client is gone (the job goes on)."""

    def __init__(self, wfile) -> None:
        self.wfile = wfile
        self.last = 0.0
        self.gone = False
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        with self.lock:
            if self.gone or (now - self.last < PROGRESS_EVERY and done != total):
                return
            self.last = now
            line = json.dumps({"progress": {"done": done, "total": total}}).encode() + b"\n"
            try:
                self.wfile.write(line)
            except OSError:  # the client went away (Ctrl-C)
                self.gone = True


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def server_bind(self) -> None:
        """Bind, replacing a socket file that no daemon listens on (left by a crash)."""
        try:
            super().server_bind()
        except OSError as e:
            if e.errno != errno.EADDRINUSE or call(self.server_address, {"cmd": "ping"}, 5):
                raise
            os.unlink(self.server_address)
            super().server_bind()
        os.chmod(self.server_address, 0o600)


class ControlServer:
    """Serves requests in threads; ``dispatch(request) -> dict`` does the work (it runs
    in the handler thread and reaches the trio loop through ``trio.from_thread``)."""

    def __init__(self, addresses: list[str], dispatch) -> None:
        self.servers = []
        for addr in addresses:
            srv = _Server(addr, _Handler)
            srv.dispatch = dispatch  # type: ignore[attr-defined]
            self.servers.append(srv)
        self.threads = [
            threading.Thread(target=s.serve_forever, name="vaultfs-control", daemon=True)
            for s in self.servers
        ]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
            with contextlib.suppress(OSError):
                os.unlink(s.server_address)
