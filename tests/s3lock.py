"""An S3 gateway that enforces S3 Object Lock, in front of `rclone serve s3` (which records the
lock rclone sends and returns it, but lets anyone delete or overwrite the object).

:class:`LockingGateway` forwards every request unchanged (the SigV4 signature covers the
``Host`` header, which is forwarded as the client sent it, so the server behind checks each
request's credentials itself) and refuses, with ``403 AccessDenied`` as a provider does:

* a ``DELETE`` of an object whose retention has not ended, a multi-object delete
  (``POST ?delete``) naming one, an overwrite of one (``PUT``, server-side copy, a multipart
  upload started on its key) and a ``PUT ?retention`` that would shorten its lock: in
  ``COMPLIANCE`` mode for every key, in ``GOVERNANCE`` mode for every key but one of
  ``bypass_keys`` sending ``x-amz-bypass-governance-retention: true``;
* any object delete by an access key outside ``delete_keys`` (when given): an IAM policy
  denying ``s3:DeleteObject``.

The lock of an object is recorded from the ``x-amz-object-lock-mode`` and
``x-amz-object-lock-retain-until-date`` headers of the upload that wrote it (or the
``?retention`` call after it) once the server behind accepted it. The bucket is not
versioned: an overwrite the lock allows replaces the object (real Object Lock buckets are
versioned: a refused delete there is a DELETE of a version, and a plain DELETE adds a delete
marker instead; docs/operations.md, "Immutable vaults", says what that changes). ``now`` is the
gateway's clock: tests move it forward to let retention end.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from helpers import S3Server

ADMIN_ACCESS_KEY = "adminkey4567"
ADMIN_SECRET_KEY = "adminsecret9876543"
_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied because object protected by object lock.</Message></Error>"
)


class TwoKeyS3Server(S3Server):
    """`rclone serve s3` taking two access keys: the laptop's (S3Server's) and an
    administrator's (:data:`ADMIN_ACCESS_KEY`), which the gateway may let do more."""

    def _serve_args(self) -> list[str]:
        return [*super()._serve_args(), "--auth-key", f"{ADMIN_ACCESS_KEY},{ADMIN_SECRET_KEY}"]

    def admin_remote(self, path: str = "") -> str:
        """Connection-string remote for BUCKET/path with the administrator's key."""
        return self.remote(path).replace(
            f"access_key_id={self.access_key},secret_access_key={self.secret_key}",
            f"access_key_id={ADMIN_ACCESS_KEY},secret_access_key={ADMIN_SECRET_KEY}",
        )


class LockingGateway:
    """The gateway (see the module docstring) on a free loopback port in front of
    ``upstream``; ``remote``/``admin_remote`` give specs that reach it. ``refused`` counts the
    requests it refused, by method. Stop it with :meth:`stop`."""

    def __init__(
        self,
        upstream: TwoKeyS3Server,
        delete_keys: set[str] | None = None,
        bypass_keys: frozenset[str] = frozenset({ADMIN_ACCESS_KEY}),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.upstream = upstream
        self.delete_keys = delete_keys
        self.bypass_keys = bypass_keys
        self.now = now
        #: "bucket/key" -> (mode, retain until), as the accepted uploads asked
        self.locks: dict[str, tuple[str, datetime]] = {}
        self._pending: dict[str, tuple[str, datetime]] = {}  # multipart upload id -> lock
        self.refused: dict[str, int] = {}
        self._mu = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _spec(self, spec: str) -> str:
        return spec.replace(self.upstream.endpoint, f"http://127.0.0.1:{self.port}")

    def remote(self, path: str = "") -> str:
        """The laptop's remote for BUCKET/path, through the gateway."""
        return self._spec(self.upstream.remote(path))

    def admin_remote(self, path: str = "") -> str:
        """The administrator's remote for BUCKET/path, through the gateway."""
        return self._spec(self.upstream.admin_remote(path))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the rules ---------------------------------------------------------------------------
    def held(self, key: str, headers, access: str) -> bool:
        """Whether the lock on ``key`` forbids changing it for this request."""
        with self._mu:
            lock = self.locks.get(key)
        if lock is None or lock[1] <= self.now():
            return False
        bypass = headers.get("x-amz-bypass-governance-retention", "").lower() == "true"
        return not (lock[0] == "GOVERNANCE" and bypass and access in self.bypass_keys)

    def denies(self, method: str, key: str, query: dict, headers, body: bytes) -> bool:
        """Whether the request is refused (see the module docstring)."""
        access = _access_key(headers)
        if method == "DELETE" and "uploadId" not in query and "/" in key:
            if self.delete_keys is not None and access not in self.delete_keys:
                return True
            return self.held(key, headers, access)
        if method == "POST" and "delete" in query:
            names = [unquote(k) for k in re.findall(rb"<Key>(.*?)</Key>", body)]
            bucket = key.split("/", 1)[0]
            if self.delete_keys is not None and access not in self.delete_keys:
                return True
            return any(self.held(f"{bucket}/{n.decode()}", headers, access) for n in names)
        if method == "PUT" and "retention" in query:
            lock = self.locks.get(key)
            new = _retention(body)
            return (
                lock is not None
                and (new is None or new[1] < lock[1])
                and (self.held(key, headers, access))
            )
        if (method == "PUT" and "partNumber" not in query) or (
            method == "POST" and "uploads" in query
        ):
            return self.held(key, headers, access)
        return False

    def accepted(
        self, method: str, key: str, query: dict, headers, body: bytes, resp: bytes
    ) -> None:
        """Record the lock a request the server behind accepted put on an object."""
        lock = _lock_headers(headers)
        with self._mu:
            if method == "PUT" and "retention" in query:
                if (new := _retention(body)) is not None:
                    self.locks[key] = new
            elif method == "PUT" and "partNumber" not in query:
                if lock is not None:
                    self.locks[key] = lock
            elif method == "POST" and "uploads" in query and lock is not None:
                m = re.search(rb"<UploadId>(.*?)</UploadId>", resp)
                if m:
                    self._pending[m.group(1).decode()] = lock
            elif method == "POST" and "uploadId" in query:
                pending = self._pending.pop(query["uploadId"][0], None)
                if pending is not None:
                    self.locks[key] = pending


def _handler(gw: LockingGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            url = urlsplit(self.path)
            key = unquote(url.path).lstrip("/")
            query = parse_qs(url.query, keep_blank_values=True)
            if gw.denies(self.command, key, query, self.headers, body):
                with gw._mu:
                    gw.refused[self.command] = gw.refused.get(self.command, 0) + 1
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_DENIED)))
                self.end_headers()
                self.wfile.write(_DENIED)
                return
            conn = http.client.HTTPConnection(gw.upstream.host, gw.upstream.port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for h, v in self.headers.items():
                    if h.lower() != "expect":  # answered here (BaseHTTPRequestHandler)
                        conn.putheader(h, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if 200 <= resp.status < 300:
                gw.accepted(self.command, key, query, self.headers, body, data)
            self.send_response(resp.status)
            for h, v in resp.getheaders():
                if h.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(h, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            elif resp.getheader("Content-Length") is not None:
                self.send_header("Content-Length", resp.getheader("Content-Length"))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

    return Handler


def _access_key(headers) -> str:
    m = re.search(r"Credential=([^/]+)/", headers.get("Authorization", ""))
    return m.group(1) if m else ""


def _date(text: str) -> datetime | None:
    try:
        d = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def _lock_headers(headers) -> tuple[str, datetime] | None:
    mode = headers.get("x-amz-object-lock-mode", "").upper()
    until = _date(headers.get("x-amz-object-lock-retain-until-date", ""))
    return (mode, until) if mode and until else None


def _retention(body: bytes) -> tuple[str, datetime] | None:
    mode = re.search(rb"<Mode>(.*?)</Mode>", body)
    until = re.search(rb"<RetainUntilDate>(.*?)</RetainUntilDate>", body)
    if not (mode and until):
        return None
    d = _date(until.group(1).decode())
    return (mode.group(1).decode().upper(), d) if d else None
