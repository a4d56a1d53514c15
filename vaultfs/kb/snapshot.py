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
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3

from .. import merkle
from ..errors import InputError
from ..vault import Entry, Vault
from . import layout
from .layout import FileInfo, KbManifest

SOURCES_SQL = """SELECT convert_to(json_build_object(
  'id', id, 'uri', uri, 'title', title, 'fetched_at', fetched_at)::text, 'UTF8')
FROM sources ORDER BY id"""
BELIEFS_SQL = """SELECT uuid_send(id), convert_to(json_build_object(
  'id', id, 'content', content, 'confidence', confidence, 'domains', domains,
  'provenance', provenance, 'created_at', created_at, 'superseded_by', superseded_by)::text,
  'UTF8'), vector_send(embedding)
FROM beliefs ORDER BY id"""
EDGES_OUT_SQL = """SELECT uuid_send(source_belief_id), convert_to(json_build_object(
  'id', id, 'source_belief_id', source_belief_id, 'target_belief_id', target_belief_id,
  'edge_type', edge_type, 'weight', weight, 'created_at', created_at,
  'metadata', metadata)::text, 'UTF8')
FROM belief_edges ORDER BY source_belief_id, id"""
EDGES_IN_SQL = """SELECT uuid_send(target_belief_id), convert_to(json_build_object(
  'id', id, 'target_belief_id', target_belief_id, 'source_belief_id', source_belief_id,
  'edge_type', edge_type, 'weight', weight)::text, 'UTF8')
FROM belief_edges ORDER BY target_belief_id, id"""

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
    cur: str | None = None
    lines: list[bytes] = []
    recs: list[bytes] = []
    leaves: list[bytes] = []

    def flush() -> None:
        if cur is None:
            return
        table.put(layout.beliefs_path(cur), b"\n".join(lines) + b"\n", len(lines), leaves)
        table.put(layout.embeddings_path(cur), b"".join(recs), len(recs), None)

    leaf = layout.belief_leaf
    for id16, line, vec in _rows(conn, BELIEFS_SQL, ["bytea", "bytea", "bytea"]):
        b = id16[:1].hex()
        if b != cur:
            flush()
            cur, lines, recs, leaves = b, [], [], []
        rec = layout.embedding_record(id16, vec)
        lines.append(line)
        recs.append(rec)
        leaves.append(leaf(line, rec))
        table.rows += 1
    flush()


def _export_grouped(
    conn, sql: str, path: Callable[[str], str], table: _Table, with_leaves: bool
) -> None:
    """Lines grouped by the bucket of their first column (a belief id) into files."""
    cur: str | None = None
    lines: list[bytes] = []

    def flush() -> None:
        if cur is not None:
            leaves = [merkle.leaf_hash(x) for x in lines] if with_leaves else None
            table.put(path(cur), b"\n".join(lines) + b"\n", len(lines), leaves)

    for key16, line in _rows(conn, sql, ["bytea", "bytea"]):
        b = key16[:1].hex()
        if b != cur:
            flush()
            cur, lines = b, []
        lines.append(line)
        table.rows += 1
    flush()


def export(dsn: str, sink: Sink) -> KbManifest:
    """Export the three tables of ``dsn`` as of one database snapshot; hand every file of
    the layout (manifest last) to ``sink``; return the manifest.

    Raises InputError for an unreachable database or one without the belief schema."""
    import psycopg

    files: dict[str, FileInfo] = {}
    conn = connect(dsn)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute("SET LOCAL TimeZone = 'UTC'")
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
        created, snap, version = conn.execute(
            "SELECT to_json(now())#>>'{}', pg_current_snapshot()::text,"
            " current_setting('server_version')"
        ).fetchone()
        (dim,) = conn.execute(
            "SELECT atttypmod FROM pg_attribute"
            " WHERE attrelid = 'beliefs'::regclass AND attname = 'embedding'"
        ).fetchone()

        sources = _Table(sink, files)
        lines = [line for (line,) in _rows(conn, SOURCES_SQL, ["bytea"])]
        sources.rows = len(lines)
        data = b"\n".join(lines) + b"\n" if lines else b""
        sources.put(layout.SOURCES, data, len(lines), [merkle.leaf_hash(x) for x in lines])

        beliefs = _Table(sink, files)
        _export_beliefs(conn, beliefs)
        edges = _Table(sink, files)
        _export_grouped(conn, EDGES_OUT_SQL, layout.edges_out_path, edges, True)
        # the in-edge index is derived from the same rows: not part of any table's checksum
        _export_grouped(conn, EDGES_IN_SQL, layout.edges_in_path, _Table(sink, files), False)
    except psycopg.Error as e:
        raise InputError(f"exporting the belief graph failed: {str(e).strip()}") from None
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        conn.close()
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


def snapshot(
    vault: Vault, dsn: str, name: str | None = None, upload: bool = False
) -> SnapshotResult:
    """Export the belief graph of ``dsn`` and commit it as a vault snapshot holding only
    ``kb/``. ``upload`` starts placing shards during the commit (the caller flushes next)."""
    t0 = time.perf_counter()
    stored: list[tuple[str, list[bytes], int]] = []

    def sink(path: str, data: bytes) -> None:
        cids, size = vault.store_stream(io.BytesIO(data))
        stored.append((path, cids, size))

    m = export(dsn, sink)
    mtime = _time_ns(m.created)
    entries = [Entry(d, "d", 0o755, mtime) for d in layout.DIRS]
    entries += [Entry(p, "f", 0o644, mtime, size=n, cids=c) for p, c, n in stored]
    uid, seq = vault.commit(entries, name=name, prepush=upload)
    return SnapshotResult(uid, seq, m, sum(n for _p, _c, n in stored), time.perf_counter() - t0)


def _time_ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1e9)
