"""Graph snapshots: export ``sources``, ``beliefs`` and ``belief_edges`` from one consistent
database snapshot into the ``kb/`` layout (vaultfs/kb/layout.py) and commit it as a vault
snapshot through the engine (``Vault.store_stream`` + ``Vault.commit``).

The export runs in one ``REPEATABLE READ READ ONLY`` transaction, so the three tables are
read as of the same instant whatever writers do meanwhile. Postgres itself renders every line
(``json_build_object``) and every embedding (``vector_send``), so the snapshot is exactly what
the database holds and the Python side only groups, hashes and stores bytes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from .. import merkle
from ..errors import InputError, IntegrityError
from ..vault import Entry, Vault
from . import layout
from .layout import FileInfo, KbManifest

# Every line is rendered by Postgres (json_build_object: JSON escapes every control
# character, so a newline separates lines safely); embedding records are built as bytea.
SOURCES_SQL = """SELECT convert_to(coalesce(string_agg(json_build_object(
  'id', id, 'uri', uri, 'title', title, 'fetched_at', fetched_at)::text, E'\\n' ORDER BY id), ''),
  'UTF8') FROM sources"""
BELIEFS_SELECT = """count(*) AS n, convert_to(string_agg(json_build_object(
  'id', id, 'content', content, 'confidence', confidence, 'domains', domains,
  'provenance', provenance, 'created_at', created_at, 'superseded_by', superseded_by)::text,
  E'\\n' ORDER BY id), 'UTF8'),
  string_agg(uuid_send(id) || int4send(coalesce(octet_length(vector_send(embedding)), -1))
    || coalesce(vector_send(embedding), ''::bytea), ''::bytea ORDER BY id)"""
EDGES_OUT_SELECT = """count(*) AS n, convert_to(string_agg(json_build_object(
  'source_belief_id', source_belief_id, 'id', id, 'target_belief_id', target_belief_id,
  'edge_type', edge_type, 'weight', weight, 'created_at', created_at, 'metadata', metadata)::text,
  E'\\n' ORDER BY source_belief_id, id), 'UTF8')"""
EDGES_IN_SELECT = """count(*) AS n, convert_to(string_agg(json_build_object(
  'target_belief_id', target_belief_id, 'id', id, 'source_belief_id', source_belief_id,
  'edge_type', edge_type, 'weight', weight)::text, E'\\n' ORDER BY target_belief_id, id), 'UTF8')"""


def _per_bucket(select: str, table: str, key: str) -> str:
    """One row per non-empty bucket: (bucket, rows, aggregates of ``select``), each bucket
    read by a range condition on ``key`` (an index scan where ``key`` is indexed), so
    Postgres hands over a bucket at a time instead of a message per row."""
    w = layout.BUCKET_HEX
    lo = "0" * (8 - w) + "-0000-0000-0000-000000000000"
    hi = "f" * (8 - w) + "-ffff-ffff-ffff-ffffffffffff"
    return f"""SELECT g.b, x.* FROM
  (SELECT lpad(to_hex(i), {w}, '0') AS b FROM generate_series(0, {16**w - 1}) i) g
CROSS JOIN LATERAL (SELECT {select} FROM {table}
  WHERE {key} BETWEEN (g.b || '{lo}')::uuid AND (g.b || '{hi}')::uuid) x
WHERE x.n > 0 ORDER BY g.b"""


#: Called with each finished file of the layout, in a deterministic order.
Sink = Callable[[str, bytes], None]


def connect(dsn: str):
    """A psycopg connection; an InputError that names the problem for a bad DSN."""
    import psycopg

    try:
        return psycopg.connect(dsn)
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot connect to the database: {first}") from None
    except Exception as e:  # noqa: BLE001 - libpq rejects a malformed DSN with ProgrammingError etc.
        raise InputError(f"bad database DSN: {e}") from None


def _rows(conn, sql: str, types: list[str]) -> Iterator[tuple]:
    with conn.cursor().copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as cp:
        cp.set_types(types)
        yield from cp.rows()


class _Table:
    """Accumulates one table's rows bucket by bucket and hands each finished file to the sink;
    keeps the file infos, the bucket roots and the table checksum."""

    def __init__(self, sink: Sink, files: dict[str, FileInfo]) -> None:
        self.sink, self.files = sink, files
        self.rows = 0
        self.roots: list[bytes] = []
        self.checksum = blake3.blake3()

    def put(self, path: str, data: bytes, rows: int, leaves: list[bytes] | None) -> None:
        root = None
        if leaves is not None:
            r = merkle.root(leaves)
            self.roots.append(r)
            root = r.hex()
        self.files[path] = FileInfo(rows, len(data), layout.file_hash(data), root)
        self.checksum.update(data)
        self.sink(path, data)

    def summary(self) -> dict:
        return {
            "rows": self.rows,
            "checksum": self.checksum.hexdigest(),
            "root": merkle.root(self.roots).hex(),
        }


def _export_beliefs(conn, table: _Table) -> None:
    sql = _per_bucket(BELIEFS_SELECT, "beliefs", "id")
    for b, n, text, recs in _rows(conn, sql, ["text", "int8", "bytea", "bytea"]):
        lines = text.split(b"\n")
        records = [rec for _id, _vec, rec in layout.iter_embeddings(recs)]
        if len(lines) != n or len(records) != n:
            raise IntegrityError(f"bucket {b}: {n} beliefs but {len(lines)} lines")
        leaves = [layout.belief_leaf(x, r) for x, r in zip(lines, records, strict=True)]
        table.rows += n
        table.put(layout.beliefs_path(b), text + b"\n", n, leaves)
        table.put(layout.embeddings_path(b), recs, n, None)


def _export_grouped(
    conn, select: str, key: str, path: Callable[[str], str], table: _Table, leaves: bool
) -> None:
    """Edge lines grouped into files by the bucket of ``key`` (a belief id)."""
    sql = _per_bucket(select, "belief_edges", key)
    for b, n, text in _rows(conn, sql, ["text", "int8", "bytea"]):
        hashes = [merkle.leaf_hash(x) for x in text.split(b"\n")] if leaves else None
        table.rows += n
        table.put(path(b), text + b"\n", n, hashes)


def _begin(conn, snapshot_id: str | None = None) -> None:
    """Start a REPEATABLE READ READ ONLY transaction (on ``snapshot_id``, a snapshot exported
    by another one, if given) with timestamps rendered in UTC."""
    import psycopg
    from psycopg import sql

    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    if snapshot_id is not None:  # must be the transaction's first statement
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
    conn.execute("SET LOCAL TimeZone = 'UTC'")


def export(dsn: str, sink: Sink) -> KbManifest:
    """Export the three tables of ``dsn`` as of one database snapshot; hand every file of
    the layout (manifest last) to ``sink`` (called from two threads, one at a time); return
    the manifest.

    Sources and beliefs are read on one connection, the edges on a second one that shares
    its exported snapshot (``pg_export_snapshot``): one consistent view, two server cores.
    Raises InputError for an unreachable database or one without the belief schema."""
    import psycopg

    files: dict[str, FileInfo] = {}
    lock = threading.Lock()

    def locked(path: str, data: bytes) -> None:
        with lock:
            sink(path, data)

    conns = [connect(dsn)]
    try:
        conn = conns[0]
        _begin(conn)
        missing = [
            t
            for t in layout.TABLE_ORDER
            if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None
        ]
        if missing:
            raise InputError(
                f"the database has no {', '.join(missing)} table: not a belief graph "
                "(see docs/kb.md for the schema, or `vaultfs kb migrate`)"
            )
        created, snap, version, snap_id = conn.execute(
            "SELECT to_json(now())#>>'{}', pg_current_snapshot()::text,"
            " current_setting('server_version'), pg_export_snapshot()"
        ).fetchone()
        (dim,) = conn.execute(
            "SELECT atttypmod FROM pg_attribute"
            " WHERE attrelid = 'beliefs'::regclass AND attname = 'embedding'"
        ).fetchone()
        conns.append(connect(dsn))
        _begin(conns[1], snap_id)

        edges = _Table(locked, files)
        derived = _Table(locked, files)  # the in-edge index: not part of any checksum

        def export_edges() -> None:
            _export_grouped(
                conns[1], EDGES_OUT_SELECT, "source_belief_id", layout.edges_out_path, edges, True
            )
            _export_grouped(
                conns[1], EDGES_IN_SELECT, "target_belief_id", layout.edges_in_path, derived, False
            )

        with ThreadPoolExecutor(1, thread_name_prefix="vaultfs-kb-edges") as ex:
            edges_done = ex.submit(export_edges)
            sources = _Table(locked, files)
            (text,) = conn.execute(SOURCES_SQL, binary=True).fetchone()
            lines = text.split(b"\n") if text else []
            sources.rows = len(lines)
            data = text + b"\n" if lines else b""
            sources.put(layout.SOURCES, data, len(lines), [merkle.leaf_hash(x) for x in lines])
            beliefs = _Table(locked, files)
            _export_beliefs(conn, beliefs)
            edges_done.result()
    except psycopg.Error as e:
        raise InputError(f"exporting the belief graph failed: {str(e).strip()}") from None
    finally:
        for c in conns:
            with contextlib.suppress(psycopg.Error):
                c.rollback()
            c.close()
    tables = {"sources": sources.summary(), "beliefs": beliefs.summary()}
    tables["belief_edges"] = edges.summary()
    root = merkle.root([bytes.fromhex(tables[t]["root"]) for t in layout.TABLE_ORDER])
    m = KbManifest(
        created=created,
        dim=dim if dim and dim > 0 else 0,
        files=files,
        tables=tables,
        root=root.hex(),
        database={"server_version": version, "snapshot": snap},
    )
    sink(layout.MANIFEST, m.to_bytes())
    return m


@dataclass
class SnapshotResult:
    """A committed knowledge-base snapshot: the vault snapshot's uid and manifest sequence,
    the kb manifest (``manifest.summary()`` is what the signed manifest should carry), the
    bytes exported and the seconds the export and commit took."""

    uid: str
    seq: int
    manifest: KbManifest
    bytes: int
    seconds: float


#: Files are chunked and handed to the vault in batches of about this many bytes (one
#: ``store_chunks`` call fills whole sealer slots instead of one slot per small file).
STORE_BATCH = 8 << 20


def snapshot(
    vault: Vault, dsn: str, name: str | None = None, upload: bool = False
) -> SnapshotResult:
    """Export the belief graph of ``dsn`` and commit it as a vault snapshot holding only
    ``kb/``. ``upload`` starts placing shards during the commit (the caller flushes next)."""
    t0 = time.perf_counter()
    stored: list[tuple[str, list[bytes], int]] = []
    pending: list[tuple[str, bytes]] = []
    size = 0

    def store() -> None:
        chunks: list[bytes] = []
        counts = []
        for _p, data in pending:
            spans = vault.chunker.spans(data) if data else []
            chunks += [data[o : o + n] for o, n in spans]
            counts.append(len(spans))
        cids = vault.store_chunks(chunks)
        at = 0
        for (p, data), c in zip(pending, counts, strict=True):
            stored.append((p, cids[at : at + c], len(data)))
            at += c
        pending.clear()

    def sink(path: str, data: bytes) -> None:
        nonlocal size
        pending.append((path, data))
        size += len(data)
        if size >= STORE_BATCH:
            store()
            size = 0

    m = export(dsn, sink)
    store()
    mtime = _time_ns(m.created)
    entries = [Entry(d, "d", 0o755, mtime) for d in layout.DIRS]
    entries += [Entry(p, "f", 0o644, mtime, size=n, cids=c) for p, c, n in sorted(stored)]
    uid, seq = vault.commit(entries, name=name, prepush=upload)
    return SnapshotResult(uid, seq, m, sum(n for _p, _c, n in stored), time.perf_counter() - t0)


def _time_ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1e9)
