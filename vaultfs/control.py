"""The control socket: how `vaultfs snapshot|flush|status|umount` reach a running mount.

The mount daemon holds the vault's lock, so other commands talk to it instead of opening the
vault. It listens on two Linux abstract unix sockets, one named after the vault home and one
after the mountpoint (so `vaultfs umount MOUNTPOINT` needs no --home). Abstract sockets leave
no file behind after a crash; only processes of the same user are served (SO_PEERCRED).

Protocol: one JSON object per line each way. Request ``{"cmd": ...}``; reply
``{"ok": true, ...}`` or ``{"ok": false, "error": message, "code": exit code}``.
Commands: ``ping``, ``status``, ``flush``, ``snapshot`` (``name``), ``delete`` (``id``),
``umount`` (store, ship, upload and report; the client then unmounts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path

from .errors import VaultError

log = logging.getLogger("vaultfs.control")


def _name(kind: str, real: str) -> str:
    return "\0vaultfs-" + kind + "-" + hashlib.sha256(real.encode()).hexdigest()[:32]


def home_address(home: Path) -> str:
    return _name("home", os.path.realpath(os.path.abspath(home)))


def mount_address(mountpoint: Path) -> str:
    """Never stats the mountpoint itself: the daemon computes this while it is mounted and
    not yet serving, and a dead mount would answer ENOTCONN."""
    absolute = os.path.abspath(mountpoint)
    parent = os.path.realpath(os.path.dirname(absolute))
    return _name("mnt", os.path.join(parent, os.path.basename(absolute)))


class ControlError(VaultError):
    exit_code = 1


def call(address: str, request: dict, timeout: float | None = None) -> dict | None:
    """Send one request; None if no daemon listens there. Raises the daemon's error."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        try:
            s.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        s.settimeout(timeout)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                part = s.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the mount daemon did not answer {request.get('cmd')!r} within "
                    f"{timeout:.0f}s (see mount.log)"
                ) from None
            if not part:
                raise ControlError("the mount daemon closed the connection (see mount.log)")
            buf += part
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        err = ControlError(reply.get("error", "the mount daemon reported an error"))
        err.exit_code = int(reply.get("code", 1))
        raise err
    return reply


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid() and uid != 0:
            return
        line = self.rfile.readline()
        try:
            req = json.loads(line)
            reply = {"ok": True, **self.server.dispatch(req)}  # type: ignore[attr-defined]
        except VaultError as e:
            reply = {"ok": False, "error": e.message, "code": e.exit_code}
        except Exception as e:  # reported to the client, logged here
            log.exception("control request failed")
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": 1}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


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
