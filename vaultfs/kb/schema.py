"""The belief schema (the one ``shared/datasets/make_kb.py`` creates) and where the live
database is.

Tables: ``sources(id, uri, title, fetched_at)``; ``beliefs(id uuid, content, embedding
vector(dim), confidence real 0..1, domains text[], provenance jsonb, created_at,
superseded_by uuid)``; ``belief_edges(id uuid, source_belief_id, target_belief_id, edge_type,
weight, created_at, metadata jsonb)`` with ``edge_type`` one of :data:`EDGE_TYPES`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

EDGE_TYPES = ("supports", "contradicts", "supersedes", "derives_from")
TABLES = ("sources", "beliefs", "belief_edges")
DEFAULT_DIM = 384
#: The database the embedded server holds the knowledge base in.
EMBEDDED_DBNAME = "kb"


def ddl(dim: int = DEFAULT_DIM, foreign_keys: bool = True) -> str:
    """CREATE statements for the three tables (IF NOT EXISTS) and their indexes.

    ``foreign_keys=False`` leaves out the REFERENCES clauses (the quarantine tests need a
    source database without them)."""
    ref = " REFERENCES beliefs(id)" if foreign_keys else ""
    sup = " REFERENCES beliefs(id) DEFERRABLE INITIALLY DEFERRED" if foreign_keys else ""
    types = ",".join(f"'{t}'" for t in EDGE_TYPES)
    return f"""
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS sources (
  id UUID PRIMARY KEY, uri TEXT NOT NULL, title TEXT, fetched_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS beliefs (
  id UUID PRIMARY KEY,
  content TEXT NOT NULL,
  embedding vector({int(dim)}),
  confidence REAL NOT NULL CHECK (confidence BETWEEN 0 AND 1),
  domains TEXT[] NOT NULL DEFAULT '{{}}',
  provenance JSONB NOT NULL DEFAULT '{{}}',
  created_at TIMESTAMPTZ NOT NULL,
  superseded_by UUID{sup});
CREATE TABLE IF NOT EXISTS belief_edges (
  id UUID PRIMARY KEY,
  source_belief_id UUID NOT NULL{ref},
  target_belief_id UUID NOT NULL{ref},
  edge_type TEXT NOT NULL CHECK (edge_type IN ({types})),
  weight REAL NOT NULL DEFAULT 1.0,
  created_at TIMESTAMPTZ NOT NULL,
  metadata JSONB NOT NULL DEFAULT '{{}}');
CREATE INDEX IF NOT EXISTS idx_belief_edges_source ON belief_edges(source_belief_id);
CREATE INDEX IF NOT EXISTS idx_belief_edges_target ON belief_edges(target_belief_id);
CREATE INDEX IF NOT EXISTS idx_belief_edges_type ON belief_edges(edge_type);
CREATE INDEX IF NOT EXISTS idx_beliefs_domains ON beliefs USING gin(domains);
"""


def check_edge_type(edge_type: str) -> str:
    """``edge_type`` if it is one of :data:`EDGE_TYPES`, else an InputError naming them."""
    if edge_type not in EDGE_TYPES:
        raise InputError(f"unknown edge type {edge_type!r}; choose one of {', '.join(EDGE_TYPES)}")
    return edge_type


def resolve_dsn(dsn: str | None, home: Path | None = None) -> str:
    """The DSN to use: ``dsn``, else ``$VAULTFS_DSN``, else the database ``valence backup
    config --dsn`` recorded in the home, else the embedded Postgres kept in
    ``<vault home>/postgres`` (started on first use and left running, as a database server
    is; database :data:`EMBEDDED_DBNAME`)."""
    if dsn:
        return dsn
    env = os.environ.get("VAULTFS_DSN")
    if env:
        return env
    from ..pgembed import EmbeddedPostgres
    from ..valence import Settings
    from ..vault import default_home

    home = home or default_home()
    if configured := Settings.load(home).dsn:
        return configured
    pg = EmbeddedPostgres(home / "postgres")
    rows = pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=(EMBEDDED_DBNAME,))
    if not rows:
        pg.create_database(EMBEDDED_DBNAME, replace=False)
    return pg.dsn(EMBEDDED_DBNAME)
