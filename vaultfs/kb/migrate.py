"""Migration of any pgvector table into the belief schema (:func:`vaultfs.kb.schema.ddl`).

Contract of :func:`migrate`:

- **Source**: a table (``name`` or ``schema.name``) with an id column, a content column and a
  pgvector ``vector`` column; optionally a metadata column (any type: ``to_jsonb`` of it is
  read, and only a JSON object is looked into) and a created-at column (cast to timestamptz).
  Every identifier comes from the user and is quoted with :class:`psycopg.sql.Identifier`.
- **Beliefs**: one per accepted row, id ``uuid5(NAMESPACE, "<host>:<port>/<dbname>|<table>|
  <row id>")`` — deterministic, so a second run finds every belief already there and adds
  nothing (the same table reached through another host name counts as another source).
  ``confidence`` is the metadata's ``confidence`` when present, else the stated default;
  ``domains`` the metadata's ``domains`` (a list of strings) or ``domain`` (a string), else
  the stated defaults; ``created_at`` the created column, else the time of the migration.
  ``provenance`` records ``{"source_type": "pgvector_migration", "source": {"dsn" (without
  password), "table", "id_column", "row_id"}, "source_metadata": …}``.
- **Skipped rows** (counted by reason, never silently): a null id, an id seen before in
  the same run (the id column is not unique), empty content, no embedding, an embedding
  of another dimension than the target's, a metadata confidence that is not a number in
  [0, 1], and rows whose belief already exists (``already migrated``).
- **Dimensions**: the source column's dimension (declared, or for an unconstrained
  ``vector`` the first row's in id order) must equal the target's ``beliefs.embedding``
  (InputError before anything is written); a target without the belief schema gets it, with
  the source's dimension.
- **Writes** go in batches of :data:`BATCH`, each its own transaction (a migration that
  stops half-way is finished by running it again). ``dry_run`` reads and classifies every
  row exactly as a real run would and writes nothing.
- **Inferred edges** (``infer_edges``): for each accepted row its :data:`NEIGHBOURS` nearest
  rows by cosine distance (computed in the source database with pgvector's ``<=>``, so a dry
  run sees them too); a pair whose cosine similarity is at least ``threshold`` becomes one
  candidate edge: ``derives_from`` from the newer belief to the older when their created
  times differ, else ``supports`` from the smaller id to the larger. Its weight is the
  similarity and its metadata ``{"inferred": true, "similarity": s, "method": …}``; its id is
  a uuid5 of the triple, and an existing edge with the same (source, target, type) is left
  alone, so inference is idempotent too.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ..errors import InputError
from .db import connect, redact_dsn, schema_errors
from .schema import ddl

#: Namespace of migrated belief and inferred edge ids (uuid5).
NAMESPACE = uuid.UUID("6f1c3c52-0b7e-5d3a-9a52-6b8f4de1a7c1")
BATCH = 1000
NEIGHBOURS = 5
DEFAULT_CONFIDENCE = 0.5
DEFAULT_THRESHOLD = 0.9


@dataclass
class SourceSpec:
    """Where the rows come from; column names as the user typed them."""

    dsn: str
    table: str
    id_col: str
    content_col: str
    embedding_col: str
    metadata_col: str | None = None
    created_col: str | None = None


@dataclass
class MigrateReport:
    """What a migration read, wrote and skipped (and why); ``as_dict`` is the --json form."""

    source: dict[str, Any]
    target: str
    dimension: int
    dry_run: bool
    rows_read: int = 0
    written: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    edges_inferred: int | None = None
    edges_written: int | None = None
    edges_existing: int | None = None
    schema_created: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    belief_id: uuid.UUID
    row_id: str
    content: str
    embedding: str
    confidence: float
    domains: list[str]
    metadata: Any
    created: datetime


def _table_ident(table: str) -> sql.Identifier:
    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise InputError(f"--table {table!r}: give NAME or SCHEMA.NAME")
    return sql.Identifier(*parts)


def _columns(conn: psycopg.Connection, table: str) -> dict[str, tuple[str, int]]:
    """{column: (type name, typmod)} of ``table``; InputError if there is no such table."""
    ident = _table_ident(table).as_string(conn)
    cur = conn.execute(
        "SELECT a.attname, t.typname, a.atttypmod FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = to_regclass(%s) "
        "AND a.attnum > 0 AND NOT a.attisdropped",
        (ident,),
    )
    cols = {name: (typ, mod) for name, typ, mod in cur.fetchall()}
    if not cols:
        raise InputError(f"no table {table!r} in the source database")
    return cols


def _source_dimension(conn: psycopg.Connection, spec: SourceSpec, typ: str, mod: int) -> int:
    if typ != "vector":
        raise InputError(
            f"column {spec.embedding_col!r} of {spec.table} is of type {typ}, not a pgvector vector"
        )
    if mod > 0:  # pgvector keeps the declared dimension as the type modifier
        return mod
    cur = conn.execute(
        sql.SQL(
            "SELECT vector_dims({c}) FROM {t} WHERE {c} IS NOT NULL ORDER BY {i} LIMIT 1"
        ).format(
            c=sql.Identifier(spec.embedding_col),
            t=_table_ident(spec.table),
            i=sql.Identifier(spec.id_col),
        )
    )
    row = cur.fetchone()
    if row is None:
        raise InputError(f"column {spec.embedding_col!r} of {spec.table} holds no embedding")
    return int(row[0])


def _target_dimension(conn: psycopg.Connection) -> int | None:
    """The target's ``beliefs.embedding`` dimension, None when it has no beliefs table."""
    row = conn.execute(
        "SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass('beliefs') "
        "AND a.attname = 'embedding' AND NOT a.attisdropped"
    ).fetchone()
    if row is None:
        return None
    return int(row[0])


def _source_identity(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"{info.host}:{info.port}/{info.dbname}"


def belief_id(source_identity: str, table: str, row_id: str) -> uuid.UUID:
    """The deterministic belief id of one source row."""
    return uuid.uuid5(NAMESPACE, f"{source_identity}|{table}|{row_id}")


def _classify(
    raw: tuple,
    dim: int,
    defaults: tuple[float, list[str]],
    ident: str,
    spec: SourceSpec,
    now: datetime,
) -> _Row | str:
    """One source row as a belief, or the reason it is skipped."""
    row_id, content, emb, emb_dims, meta, created = raw
    if row_id is None:
        return "null id"
    if content is None or not content.strip():
        return "empty content"
    if emb is None:
        return "no embedding"
    if emb_dims != dim:
        return f"embedding has {emb_dims} dimensions, target has {dim}"
    confidence, domains = defaults
    if isinstance(meta, dict):
        if "confidence" in meta:
            c = meta["confidence"]
            if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c <= 1:
                return "metadata confidence is not a number in [0, 1]"
            confidence = float(c)
        doms = meta.get("domains", meta.get("domain"))
        if isinstance(doms, str):
            domains = [doms]
        elif isinstance(doms, list) and doms and all(isinstance(d, str) for d in doms):
            domains = list(doms)
    return _Row(
        belief_id(ident, spec.table, row_id), row_id, content, emb, confidence, domains, meta,
        created or now,
    )  # fmt: skip


def _read(src: psycopg.Connection, spec: SourceSpec) -> Iterator[tuple]:
    """Yield ``(row id text, content, embedding text, dims, metadata, created)`` in id order
    through a server-side cursor (bounded memory on any table size)."""
    c = sql.Identifier
    emb = c(spec.embedding_col)
    meta = sql.SQL("to_jsonb({})").format(c(spec.metadata_col)) if spec.metadata_col else sql.NULL
    created = (
        sql.SQL("{}::timestamptz").format(c(spec.created_col)) if spec.created_col else sql.NULL
    )
    query = sql.SQL(
        "SELECT {id}::text, {content}::text, {emb}::text, vector_dims({emb}), {meta}, {created} "
        "FROM {table} ORDER BY {id}"
    ).format(
        id=c(spec.id_col), content=c(spec.content_col), emb=emb, meta=meta, created=created,
        table=_table_ident(spec.table),
    )  # fmt: skip
    with src.cursor(name="vaultfs_migrate") as cur:
        cur.itersize = BATCH
        cur.execute(query)
        yield from cur


def _write_batch(
    dst: psycopg.Connection, batch: list[_Row], provenance: dict, dry_run: bool
) -> int:
    """Insert the beliefs of ``batch`` not yet in the target; return how many are new."""
    ids = [r.belief_id for r in batch]
    with dst.transaction():
        present = {r[0] for r in dst.execute("SELECT id FROM beliefs WHERE id = ANY(%s)", (ids,))}
        new = [r for r in batch if r.belief_id not in present]
        if new and not dry_run:
            with dst.cursor() as cur:
                cur.executemany(
                    "INSERT INTO beliefs (id, content, embedding, confidence, domains, "
                    "provenance, created_at) VALUES (%s, %s, %s::vector, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    [
                        (
                            r.belief_id, r.content, r.embedding, r.confidence, r.domains,
                            Jsonb(_provenance(provenance, r)), r.created,
                        )
                        for r in new
                    ],
                )  # fmt: skip
    return len(new)


def _provenance(base: dict, r: _Row) -> dict:
    doc = {"source_type": "pgvector_migration", "source": {**base, "row_id": r.row_id}}
    if r.metadata is not None:
        doc["source_metadata"] = r.metadata
    return doc


def migrate(
    spec: SourceSpec,
    to_dsn: str,
    confidence: float = DEFAULT_CONFIDENCE,
    domains: list[str] | None = None,
    dry_run: bool = False,
    infer_edges: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
) -> MigrateReport:
    """Migrate ``spec``'s table into the belief schema at ``to_dsn`` (see the module
    docstring for the contract); InputError for a missing table or column, a non-vector
    embedding column, a dimension mismatch, or a default outside its range."""
    if not 0 <= confidence <= 1:
        raise InputError("--confidence must be between 0 and 1")
    if not -1 <= threshold <= 1:
        raise InputError("--threshold is a cosine similarity between -1 and 1")
    with connect(spec.dsn) as src, connect(to_dsn, autocommit=True) as dst:
        cols = _columns(src, spec.table)
        wanted = [spec.id_col, spec.content_col, spec.embedding_col]
        wanted += [c for c in (spec.metadata_col, spec.created_col) if c]
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise InputError(
                f"{spec.table} has no column {', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(sorted(cols))}"
            )
        dim = _source_dimension(src, spec, *cols[spec.embedding_col])
        target_dim = _target_dimension(dst)
        if target_dim is not None and target_dim > 0 and target_dim != dim:  # -1: any
            raise InputError(
                f"embedding dimension mismatch: {spec.table}.{spec.embedding_col} has {dim} "
                f"dimensions, the target's beliefs.embedding has {target_dim}; migrate into "
                "another database (--to) or re-embed the source"
            )
        report = MigrateReport(
            source={"dsn": redact_dsn(spec.dsn), "table": spec.table},
            target=redact_dsn(to_dsn),
            dimension=dim,
            dry_run=dry_run,
        )
        if target_dim is None and not dry_run:
            dst.execute(ddl(dim))
            report.schema_created = True
        ident = _source_identity(src)
        base = {"dsn": redact_dsn(spec.dsn), "table": spec.table, "id_column": spec.id_col}
        defaults = (confidence, list(domains or []))
        reasons: Counter[str] = Counter()
        accepted: dict[str, tuple[uuid.UUID, datetime]] = {}  # row id: (belief id, created)
        batch: list[_Row] = []
        now = datetime.now(UTC)

        def flush() -> None:
            if target_dim is None and dry_run:  # no target table yet: every row would be new
                report.written += len(batch)
            else:
                new = _write_batch(dst, batch, base, dry_run)
                report.written += new
                reasons["already migrated"] += len(batch) - new
            batch.clear()

        with schema_errors("the target database's beliefs table is not the belief schema"):
            for raw in _read(src, spec):
                report.rows_read += 1
                got = _classify(raw, dim, defaults, ident, spec, now)
                if isinstance(got, str):
                    reasons[got] += 1
                    continue
                if got.row_id in accepted:
                    reasons["duplicate id in the source"] += 1
                    continue
                accepted[got.row_id] = (got.belief_id, got.created)
                batch.append(got)
                if len(batch) >= BATCH:
                    flush()
            flush()
            src.commit()
            if infer_edges:
                _infer(src, dst, spec, accepted, threshold, report, dry_run)
        report.skipped_by_reason = {k: v for k, v in sorted(reasons.items()) if v}
        report.skipped = sum(report.skipped_by_reason.values())
    return report


def _infer(
    src: psycopg.Connection,
    dst: psycopg.Connection,
    spec: SourceSpec,
    accepted: dict[str, tuple[uuid.UUID, datetime]],
    threshold: float,
    report: MigrateReport,
    dry_run: bool,
) -> None:
    c = sql.Identifier
    table = _table_ident(spec.table)
    query = sql.SQL(
        "SELECT a.{id}::text, n.id, 1 - (a.{emb} <=> n.emb) FROM {t} a CROSS JOIN LATERAL ("
        " SELECT b.{id}::text AS id, b.{emb} AS emb FROM {t} b"
        " WHERE b.{id} <> a.{id} AND b.{emb} IS NOT NULL AND vector_dims(b.{emb}) = %(dim)s"
        " ORDER BY a.{emb} <=> b.{emb} LIMIT %(k)s) n"
        " WHERE a.{emb} IS NOT NULL AND vector_dims(a.{emb}) = %(dim)s"
        " AND 1 - (a.{emb} <=> n.emb) >= %(thr)s"
    ).format(id=c(spec.id_col), emb=c(spec.embedding_col), t=table)
    pairs: dict[tuple[uuid.UUID, uuid.UUID, str], float] = {}
    for a_id, b_id, sim in src.execute(
        query, {"dim": report.dimension, "k": NEIGHBOURS, "thr": threshold}
    ):
        a, b = accepted.get(a_id), accepted.get(b_id)
        if a is None or b is None:
            continue
        if a[1] != b[1]:
            newer, older = (a, b) if a[1] > b[1] else (b, a)
            key = (newer[0], older[0], "derives_from")
        else:
            lo, hi = sorted((a[0], b[0]))
            key = (lo, hi, "supports")
        pairs[key] = round(float(sim), 6)
    src.commit()
    report.edges_inferred = len(pairs)
    report.edges_written = report.edges_existing = 0
    if not pairs:
        return
    with dst.transaction():
        existing: set[tuple[uuid.UUID, uuid.UUID, str]] = set()
        if _target_dimension(dst) is not None:
            srcs = list({k[0] for k in pairs})
            existing = {
                (s, t, ty)
                for s, t, ty in dst.execute(
                    "SELECT source_belief_id, target_belief_id, edge_type FROM belief_edges "
                    "WHERE source_belief_id = ANY(%s)",
                    (srcs,),
                )
            }
        new = {k: s for k, s in pairs.items() if k not in existing}
        report.edges_existing = len(pairs) - len(new)
        report.edges_written = len(new)
        if dry_run or not new:
            return
        with dst.cursor() as cur:
            cur.executemany(
                "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type, "
                "weight, created_at, metadata) VALUES (%s, %s, %s, %s, %s, now(), %s) "
                "ON CONFLICT (id) DO NOTHING",
                [
                    (
                        uuid.uuid5(NAMESPACE, f"edge|{s}|{t}|{ty}"), s, t, ty, max(sim, 0.0),
                        Jsonb({"inferred": True, "similarity": sim,
                               "method": f"cosine, {NEIGHBOURS} nearest neighbours"}),
                    )
                    for (s, t, ty), sim in new.items()
                ],
            )  # fmt: skip
