"""`vaultfs kb migrate`: a plain pgvector table with its own schema into the belief schema —
dry run, a real run, a second idempotent run, inferred edges on vectors with known
similarities, a dimension mismatch, and bad tables and columns."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import REPO_ROOT, PgServer, vaultfs_env

from vaultfs.errors import InputError
from vaultfs.kb import migrate as mig
from vaultfs.kb.db import redact_dsn

pytestmark = pytest.mark.pg


def _vec(*nonzero: tuple[int, float], dim: int = 8) -> str:
    v = [0.0] * dim
    for i, x in nonzero:
        v[i] = x
    return "[" + ",".join(repr(x) for x in v) + "]"


# (doc_id, body, emb, meta, ts); d1~d2 (cosine 0.99, d2 newer), d4 = d5 (same time)
ROWS = [
    ("d1", "first note", _vec((0, 1.0)), {"confidence": 0.9, "domains": ["science"]}, "2024-01-01"),
    ("d2", "second note", _vec((0, 0.99), (1, 0.141)), {"domain": "health"}, "2024-01-02"),
    ("d3", "third note", _vec((1, 1.0)), None, "2024-01-03"),
    ("d4", "twin one", _vec((2, 1.0)), {}, None),
    ("d5", "twin two", _vec((2, 1.0)), {}, None),
    ("d6", "  ", _vec((0, 1.0)), None, None),
    ("d7", "no vector", None, None, None),
    ("d8", "bad confidence", _vec((4, 1.0)), {"confidence": 3}, None),
    ("d9", "plain text meta", _vec((3, 1.0)), "just text", "2024-02-01"),
]


@pytest.fixture(scope="module")
def dbs(pg_server: PgServer) -> Iterator[tuple[str, str]]:
    src = pg_server.create_database("migsrc")
    dst = pg_server.create_database("migdst")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            "CREATE TABLE docs (doc_id text PRIMARY KEY, body text, emb vector(8), meta jsonb, "
            "ts timestamptz)"
        )
        for doc_id, body, emb, meta, ts in ROWS:
            conn.execute(
                "INSERT INTO docs VALUES (%s, %s, %s::vector, %s, %s)",
                (doc_id, body, emb, None if meta is None else json.dumps(meta), ts),
            )
        conn.execute('CREATE TABLE "Odd Docs" ("doc id" int, "the text" text, "the emb" vector(4))')
        conn.execute("""INSERT INTO "Odd Docs" VALUES (1, 'four dims', '[1,2,3,4]')""")
    yield src, dst
    pg_server.drop_database("migsrc")
    pg_server.drop_database("migdst")


def _spec(src: str, table: str = "docs") -> mig.SourceSpec:
    return mig.SourceSpec(src, table, "doc_id", "body", "emb", "meta", "ts")


def _count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchone()[0]  # type: ignore[index]


def test_migrate_dry_run_then_idempotent(dbs: tuple[str, str]) -> None:
    src, dst = dbs
    dry = mig.migrate(_spec(src), dst, confidence=0.6, domains=["notes"], dry_run=True)
    assert (dry.rows_read, dry.written, dry.skipped) == (9, 6, 3)
    assert _count(dst, "SELECT count(*) FROM pg_tables WHERE tablename = 'beliefs'") == 0

    rep = mig.migrate(_spec(src), dst, confidence=0.6, domains=["notes"])
    assert rep.schema_created and (rep.rows_read, rep.written, rep.skipped) == (9, 6, 3)
    assert rep.skipped_by_reason == {
        "empty content": 1,
        "metadata confidence is not a number in [0, 1]": 1,
        "no embedding": 1,
    }
    with psycopg.connect(dst) as conn:
        got = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT provenance->'source'->>'row_id', confidence, domains, embedding::text, "
                "provenance, created_at::date::text FROM beliefs"
            )
        }
    assert set(got) == {"d1", "d2", "d3", "d4", "d5", "d9"}
    assert got["d1"][:2] == (pytest.approx(0.9), ["science"])
    assert got["d2"][:2] == (pytest.approx(0.6), ["health"])
    assert got["d9"][:2] == (pytest.approx(0.6), ["notes"]) and got["d9"][3]["source_metadata"] == "just text"  # fmt: skip
    assert got["d1"][3]["source"]["table"] == "docs" and got["d1"][4] == "2024-01-01"
    with psycopg.connect(src) as conn:  # embeddings bit-exact (pgvector prints round-trip floats)
        src_emb = dict(conn.execute("SELECT doc_id, emb::text FROM docs").fetchall())
    assert all(got[k][2] == src_emb[k] for k in got)

    again = mig.migrate(_spec(src), dst, confidence=0.6, domains=["notes"])
    assert (again.written, again.skipped_by_reason["already migrated"]) == (0, 6)
    assert _count(dst, "SELECT count(*) FROM beliefs") == 6


def test_infer_edges_known_similarities(dbs: tuple[str, str]) -> None:
    src, dst = dbs
    dry = mig.migrate(_spec(src), dst, infer_edges=True, threshold=0.9, dry_run=True)
    assert (dry.edges_inferred, dry.edges_written) == (2, 2)
    assert _count(dst, "SELECT count(*) FROM belief_edges") == 0
    rep = mig.migrate(_spec(src), dst, infer_edges=True, threshold=0.9)
    assert (rep.written, rep.edges_inferred, rep.edges_written) == (0, 2, 2)
    with psycopg.connect(dst) as conn:
        edges = conn.execute(
            "SELECT s.provenance->'source'->>'row_id', t.provenance->'source'->>'row_id', "
            "e.edge_type, e.weight, e.metadata FROM belief_edges e "
            "JOIN beliefs s ON s.id = e.source_belief_id JOIN beliefs t ON t.id = e.target_belief_id "
            "ORDER BY 1"
        ).fetchall()
    (a, b, t1, w1, m1), (c, d, t2, w2, m2) = edges
    assert (a, b, t1) == ("d2", "d1", "derives_from")  # the newer derives from the older
    assert w1 == pytest.approx(0.99 / (0.99**2 + 0.141**2) ** 0.5, abs=1e-4)
    assert m1["inferred"] is True and m1["similarity"] == pytest.approx(w1, abs=1e-5)
    assert {c, d} == {"d4", "d5"} and t2 == "supports" and w2 == pytest.approx(1.0)
    again = mig.migrate(_spec(src), dst, infer_edges=True, threshold=0.9)
    assert (again.edges_written, again.edges_existing) == (0, 2)
    loose = mig.migrate(_spec(src), dst, infer_edges=True, threshold=0.1, dry_run=True)
    assert loose.edges_inferred == 3  # d2~d3 at 0.141 joins in


def test_bad_inputs(dbs: tuple[str, str]) -> None:
    src, dst = dbs
    odd = mig.SourceSpec(src, "Odd Docs", "doc id", "the text", "the emb")
    with pytest.raises(InputError, match="dimension mismatch: Odd Docs.the emb has 4"):
        mig.migrate(odd, dst)
    bad = [
        (mig.SourceSpec(src, "nope", "a", "b", "c"), "no table 'nope'"),
        (mig.SourceSpec(src, "docs", "doc_id", "body", "missing"), "no column 'missing'"),
        (mig.SourceSpec(src, "docs", "doc_id", "body", "meta"), "not a pgvector vector"),
        (mig.SourceSpec(src, "a.b.c", "a", "b", "c"), "SCHEMA.NAME"),
        (mig.SourceSpec(src, 'docs"; DROP TABLE docs; --', "a", "b", "c"), "no table"),
    ]
    for spec, msg in bad:
        with pytest.raises(InputError, match=msg):
            mig.migrate(spec, dst)
    assert _count(src, "SELECT count(*) FROM docs") == len(ROWS)
    assert _count(dst, "SELECT count(*) FROM beliefs") == 6
    assert redact_dsn("postgresql://me:s3cret@db.example:5433/kb") == (
        "user=me dbname=kb host=db.example port=5433"
    )


# `kb migrate` through the real entry point (cli/kb_cmd.py registers it on the `kb` group).


def _kb_migrate(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "kb", "migrate", *args],
        capture_output=True,
        text=True,
        env=vaultfs_env(home),
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli(dbs: tuple[str, str], tmp_path: Path) -> None:
    src, dst = dbs
    args = ["--from", src, "--to", dst, "--table", "docs", "--id-col", "doc_id"]
    args += ["--content-col", "body", "--embedding-col", "emb", "--metadata-col", "meta"]
    proc = _kb_migrate(tmp_path, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["rows_read"] == 9 and rep["written"] == 0 and rep["skipped"] == 9
    text = _kb_migrate(tmp_path, *args, "--dry-run", "--infer-edges")
    assert text.returncode == 0 and "would write 0 belief(s)" in text.stdout
    assert "already there" in text.stdout
    odd = ["--from", src, "--to", dst, "--table", "Odd Docs", "--id-col", "doc id"]
    odd += ["--content-col", "the text", "--embedding-col", "the emb"]
    bad = _kb_migrate(tmp_path, *odd)
    assert bad.returncode == 18 and "dimension mismatch" in bad.stderr
    assert "Traceback" not in bad.stderr
    down = _kb_migrate(tmp_path, *args[:1], "postgresql://x:pw9@127.0.0.1:1/x", *args[2:])
    assert down.returncode == 18 and "cannot connect" in down.stderr and "pw9" not in down.stderr


def test_duplicate_ids_and_bare_table(dbs: tuple[str, str]) -> None:
    """A table without metadata or created columns, whose id column is not unique."""
    src, dst = dbs
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE dups (id int, t text, e vector)")
        conn.execute(
            "INSERT INTO dups VALUES (1, 'one', %s), (1, 'one again', %s), (2, 'short', '[1,2]')",
            (_vec((5, 1.0)), _vec((6, 1.0))),
        )
    rep = mig.migrate(mig.SourceSpec(src, "dups", "id", "t", "e"), dst, domains=["x"])
    assert (rep.rows_read, rep.written, rep.dimension) == (3, 1, 8)
    assert rep.skipped_by_reason == {
        "duplicate id in the source": 1,
        "embedding has 2 dimensions, target has 8": 1,
    }
