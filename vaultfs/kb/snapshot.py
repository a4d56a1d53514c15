"""Graph snapshots: export ``sources``, ``beliefs`` and ``belief_edges`` from one consistent
database snapshot into the ``kb/`` layout (vaultfs/kb/layout.py) and commit it as a vault
snapshot through the engine (the vault's chunker, ``Vault.store_chunks``, ``Vault.commit``).

The export reads in a ``REPEATABLE READ READ ONLY`` transaction whose snapshot a second
connection joins (``pg_export_snapshot``): the three tables as of one instant, whatever
writers do meanwhile, read by two server processes. Postgres itself renders every line
(:func:`line_sql`: the bytes ``json_build_object`` writes) and every embedding
(``vector_send``), a bucket at a time, so the snapshot is exactly what the database holds
and the Python side only hashes and stores bytes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import merkle
from ..errors import InputError, IntegrityError
from ..vault import Entry, Vault
from . import layout, schema
from .db import connect, one_line
from .layout import FileInfo, KbManifest

#: The keys of each kind of line, in order, with how Postgres renders each value (docs/kb.md).
SOURCE_KEYS = (("id", "uuid"), ("uri", "json"), ("title", "json"), ("fetched_at", "json"))
BELIEF_KEYS = (
    ("id", "uuid"),
    ("content", "json"),
    ("confidence", "real"),
    ("domains", "json"),
    ("provenance", "jsonb"),
    ("created_at", "json"),
    ("superseded_by", "uuid"),
)
EDGE_OUT_KEYS = (
    ("source_belief_id", "uuid"),
    ("id", "uuid"),
    ("target_belief_id", "uuid"),
    ("edge_type", "edge_type"),
    ("weight", "real"),
    ("created_at", "json"),
    ("metadata", "jsonb"),
)
EDGE_IN_KEYS = (
    ("target_belief_id", "uuid"),
    ("id", "uuid"),
    ("source_belief_id", "uuid"),
    ("edge_type", "edge_type"),
    ("weight", "real"),
)

# A value as json_build_object renders it (datum_to_json): a uuid as its quoted text, jsonb
# as its canonical text, anything else through to_json (escaped text, shortest-exact reals
# with NaN and infinities quoted, ISO timestamps, arrays); SQL NULL as null. Two shortcuts
# with the same bytes, each about half the server's cost of to_json on 300,000 edges: a
# finite number is its output text (what to_json writes for one), and an edge type of
# schema.EDGE_TYPES (which need no escaping) a constant.
_TYPES = " ".join(f"WHEN '{t}' THEN '\"{t}\"'" for t in schema.EDGE_TYPES)
_VALUE = {
    "uuid": "coalesce('\"' || {c}::uuid || '\"', 'null')",
    "jsonb": "coalesce({c}::jsonb::text, 'null')",
    "json": "coalesce(to_json({c})::text, 'null')",
    "real": "coalesce(CASE WHEN abs({c}) < 'Infinity' THEN {c}::text END,"
    " to_json({c})::text, 'null')",
    "edge_type": f"CASE {{c}} {_TYPES} ELSE coalesce(to_json({{c}})::text, 'null') END",
}


def line_sql(keys: tuple[tuple[str, str], ...]) -> str:
    """An SQL text expression for a row's line: byte for byte what ``json_build_object``
    of the same keys and columns writes (``{"k" : v, "k2" : v2}``), built by concatenation,
    which costs Postgres about a third less than the variadic function. Columns must have
    the schema's types (vaultfs/kb/schema.py); a uuid column that holds something else fails
    the cast rather than yield a line that is not JSON."""
    parts = []
    for i, (key, kind) in enumerate(keys):
        parts.append(f"'{'{' if i == 0 else ', '}\"{key}\" : '")
        parts.append(_VALUE[kind].format(c=key))
    return " || ".join(parts) + " || '}'"


# JSON escapes every control character, so a newline separates lines safely; embedding
# records are built as bytea (vector_send's length is 4 + 4·dims: serialising each vector
# once, not twice).
SOURCES_SQL = f"""SELECT convert_to(coalesce(string_agg({line_sql(SOURCE_KEYS)},
  E'\\n' ORDER BY id), ''), 'UTF8') FROM sources"""
BELIEFS_SELECT = f"""count(*) AS n, convert_to(string_agg({line_sql(BELIEF_KEYS)},
  E'\\n' ORDER BY id), 'UTF8'),
  string_agg(uuid_send(id) || coalesce(int4send(4 + 4 * vector_dims(embedding))
    || vector_send(embedding), int4send(-1)), ''::bytea ORDER BY id)"""
EDGES_OUT_SELECT = f"""count(*) AS n, convert_to(string_agg({line_sql(EDGE_OUT_KEYS)},
  E'\\n' ORDER BY source_belief_id, id), 'UTF8')"""
EDGES_IN_SELECT = f"""count(*) AS n, convert_to(string_agg({line_sql(EDGE_IN_KEYS)},
  E'\\n' ORDER BY target_belief_id, id), 'UTF8')"""


def _buckets_sql(first: int, last: int) -> str:
    """One row per non-empty bucket in [first, last]: (bucket, beliefs: rows, lines,
    embedding records, out-edges: rows, lines, in-edges: rows, lines). Each part reads the
    bucket by a range condition on its key (an index scan: the primary key, and the edge
    indexes of schema.ddl), so Postgres hands over a bucket at a time, not a message per row,
    and a bucket's files are stored side by side (``kb show`` then reads one segment). No
    ORDER BY: a sort would hold every bucket back until the last is built; the rows come in
    generate_series order anyway, and the order only affects where files land in segments."""
    w = layout.BUCKET_HEX
    lo = "0" * (8 - w) + "-0000-0000-0000-000000000000"
    hi = "f" * (8 - w) + "-ffff-ffff-ffff-ffffffffffff"

    def part(select: str, table: str, key: str) -> str:
        return f"""CROSS JOIN LATERAL (SELECT {select} FROM {table}
  WHERE {key} BETWEEN (g.b || '{lo}')::uuid AND (g.b || '{hi}')::uuid)"""

    return f"""SELECT g.b, bl.*, eo.*, ei.* FROM
  (SELECT lpad(to_hex(i), {w}, '0') AS b FROM generate_series({first}, {last}) i) g
{part(BELIEFS_SELECT, "beliefs", "id")} bl
{part(EDGES_OUT_SELECT, "belief_edges", "source_belief_id")} eo
{part(EDGES_IN_SELECT, "belief_edges", "target_belief_id")} ei
WHERE bl.n + eo.n + ei.n > 0"""


#: Called with each finished file of the layout, in a deterministic order.
Sink = Callable[[str, bytes], None]


def _rows(conn, sql: str, types: list[str]) -> Iterator[tuple]:
    with conn.cursor().copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as cp:
        cp.set_types(types)
        yield from cp.rows()


_BUCKET_TYPES = ["text", "int8", "bytea", "bytea", "int8", "bytea", "int8", "bytea"]


def _export_buckets(conn, first: int, last: int, put: Callable[[list[tuple]], None]) -> None:
    """The files of buckets ``first``..``last``, handed to ``put`` a bucket at a time as
    (path, data, rows, leaves or None) in the order they are stored: beliefs, out-edges,
    in-edges (what ``kb show`` reads), then embeddings."""
    for b, n, text, recs, n_out, out, n_in, inc in _rows(
        conn, _buckets_sql(first, last), _BUCKET_TYPES
    ):
        files = []
        if n:
            lines = text.split(b"\n")
            records = [rec for _id, _vec, rec in layout.iter_embeddings(recs)]
            if len(lines) != n or len(records) != n:
                raise IntegrityError(f"bucket {b}: {n} beliefs but {len(lines)} lines")
            leaves = layout.belief_leaves(lines, records)
            files.append((layout.beliefs_path(b), text + b"\n", n, leaves))
        if n_out:
            leaves = merkle.leaf_hashes(out.split(b"\n"))
            files.append((layout.edges_out_path(b), out + b"\n", n_out, leaves))
        if n_in:
            files.append((layout.edges_in_path(b), inc + b"\n", n_in, None))
        if n:
            files.append((layout.embeddings_path(b), recs, n, None))
        put(files)


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

    def put(group: list[tuple]) -> None:
        with lock:  # a bucket's files stay together in the stored stream
            for path, data, rows, leaves in group:
                root = None if leaves is None else merkle.root(leaves).hex()
                files[path] = FileInfo(rows, len(data), layout.file_hash(data), root)
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

        (text,) = conn.execute(SOURCES_SQL, binary=True).fetchone()
        lines = text.split(b"\n") if text else []
        leaves = merkle.leaf_hashes(lines)
        put([(layout.SOURCES, text + b"\n" if lines else b"", len(lines), leaves)])
        half = 16**layout.BUCKET_HEX // 2
        with ThreadPoolExecutor(1, thread_name_prefix="vaultfs-kb-export") as ex:
            upper = ex.submit(_export_buckets, conns[1], half, 2 * half - 1, put)
            _export_buckets(conn, 0, half - 1, put)
            upper.result()
    except psycopg.Error as e:
        raise InputError(f"exporting the belief graph failed: {one_line(e)}") from None
    finally:
        for c in conns:
            with contextlib.suppress(psycopg.Error):
                c.rollback()
            c.close()
    tables = {t: layout.table_summary(files, t) for t in layout.TABLE_ORDER}
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
#: Bytes of exported files that may wait between the export threads and the storing thread:
#: room for Postgres to render about a sixth of a 100,000-belief graph (≈ 370 MB of files)
#: while the key is unlocked and the vault opens (scrypt alone is ≈ 0.4 s of one core),
#: and a bound that does not grow with the buckets (≈ 10 MB of files each at a million
#: beliefs). A larger file waits alone.
STORE_QUEUE_BYTES = 64 << 20


class _Abandoned(Exception):
    """Storing failed: the export stops at its next file."""


class Export:
    """An export of the belief graph of ``dsn`` (:func:`export`) running in threads of its
    own, its files waiting (at most :data:`STORE_QUEUE_BYTES`) until :func:`snapshot` stores
    them. Started
    before the vault is open, it lets Postgres render the first buckets while the key is
    being unlocked. Use it as a context manager: leaving the block stops an export whose
    files nobody took (its next file raises inside it; its transaction is rolled back)."""

    def __init__(self, dsn: str) -> None:
        self.started = time.perf_counter()
        self._handoff: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._waiting = 0  # bytes handed over and not yet taken, under _room
        self._abandon = threading.Event()
        self._drained = False
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="vaultfs-kb-snapshot")
        self._done = self._ex.submit(self._produce, dsn)

    def _sink(self, path: str, data: bytes) -> None:
        with self._room:
            while (
                self._waiting
                and self._waiting + len(data) > STORE_QUEUE_BYTES
                and not self._abandon.is_set()
            ):
                self._room.wait()
            if self._abandon.is_set():
                raise _Abandoned
            self._waiting += len(data)
        self._handoff.put((path, data))

    def _produce(self, dsn: str) -> KbManifest:
        try:
            return export(dsn, self._sink)
        finally:
            self._handoff.put(None)

    def files(self) -> Iterator[tuple[str, bytes]]:
        """Every exported file as (path, data), in the order they are to be stored, until
        the export ends (then :meth:`manifest` says how)."""
        while (item := self._handoff.get()) is not None:
            with self._room:
                self._waiting -= len(item[1])
                self._room.notify()
            yield item
        self._drained = True

    def manifest(self) -> KbManifest:
        """The export's manifest, once :meth:`files` is exhausted; raises what the export
        raised (InputError for a bad DSN or a database without the belief schema)."""
        return self._done.result()

    def close(self) -> None:
        """Stop the export if it still runs and wait for its threads."""
        self._abandon.set()
        with self._room:  # a producer waiting for room sees the flag
            self._room.notify_all()
        while not self._drained and self._handoff.get() is not None:
            pass
        self._drained = True
        self._ex.shutdown()

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot(
    vault: Vault, source: str | Export, name: str | None = None, upload: bool = False
) -> SnapshotResult:
    """Export the belief graph of ``source`` (a DSN, or an :class:`Export` already running,
    which this closes) and commit it as a vault snapshot holding only ``kb/``. ``upload``
    starts placing shards during the commit (the caller flushes next).

    The export runs in threads of its own and hands finished files over a bounded queue to
    this thread, which chunks and stores them: Postgres renders the next buckets while the
    vault seals the last ones. ``seconds`` of the result counts from the export's start."""
    stored: list[tuple[str, list[bytes], int]] = []
    pending: list[tuple[str, bytes]] = []

    def store() -> None:
        # views, not copies: store_chunks hashes each chunk and copies the new ones once,
        # into a sealer's slot
        chunks: list[bytes | memoryview] = []
        counts = []
        for _p, data in pending:
            spans = vault.chunker.spans(data) if data else []
            view = memoryview(data)
            chunks += [view[o : o + n] for o, n in spans]
            counts.append(len(spans))
        cids = vault.store_chunks(chunks)
        at = 0
        for (p, data), c in zip(pending, counts, strict=True):
            stored.append((p, cids[at : at + c], len(data)))
            at += c
        pending.clear()

    with source if isinstance(source, Export) else Export(source) as ex:
        size = 0
        for item in ex.files():
            pending.append(item)
            size += len(item[1])
            if size >= STORE_BATCH:
                store()
                size = 0
        m = ex.manifest()
        store()
    mtime = _time_ns(m.created)
    # a knowledge base is private: readable by its owner only (on a mount with --allow-other
    # and in a restore, as the database itself is)
    entries = [Entry(d, "d", 0o700, mtime) for d in layout.DIRS]
    entries += [Entry(p, "f", 0o600, mtime, size=n, cids=c) for p, c, n in sorted(stored)]
    uid, seq = vault.commit(entries, name=name, prepush=upload, kb=m.summary())
    return SnapshotResult(
        uid, seq, m, sum(n for _p, _c, n in stored), time.perf_counter() - ex.started
    )


def _time_ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1e9)
