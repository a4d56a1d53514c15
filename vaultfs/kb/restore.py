"""Restore a knowledge-base snapshot into Postgres, keeping the graph whole.

The whole graph or a part of it (:class:`Selection`: a belief's neighbourhood, a domain, a
creation-time window) goes into a fresh or existing database in one transaction:

1. the schema is created where missing (:func:`vaultfs.kb.schema.ddl` with the snapshot's
   embedding dimension, plus :data:`QUARANTINE_DDL`);
2. rows whose id already exists with other values are refused (TargetNotEmpty) unless
   ``replace``, which overwrites them; a row already there as it is (a source two partial
   restores share) is left alone, as are the database's other rows;
3. lines are loaded as they are stored (COPY of the JSON lines, binary COPY of the
   embeddings: bit-exact), then typed into the tables by SQL; into empty tables the keys,
   indexes and foreign keys are dropped first and made again after the load;
4. referential integrity: an edge whose endpoint is neither restored nor already in the
   database, or whose type is unknown, goes to ``belief_edges_quarantine`` with the reason;
   a ``superseded_by`` that points at a missing belief is cleared and reported. With
   ``strict`` any of these rolls the whole restore back (IntegrityError) instead;
5. afterwards the database is checked for orphan edges (there must be none).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import InputError, IntegrityError, TargetNotEmpty
from . import layout, schema
from .db import connect, one_line
from .layout import KbManifest
from .reader import KbFiles, KbSnap

QUARANTINE_DDL = """
CREATE TABLE IF NOT EXISTS belief_edges_quarantine (
  id UUID PRIMARY KEY,                 -- the edge's id in the snapshot
  source_belief_id UUID NOT NULL,
  target_belief_id UUID NOT NULL,
  edge_type TEXT NOT NULL,
  weight REAL,
  created_at TIMESTAMPTZ,
  metadata JSONB,
  reason TEXT NOT NULL,                -- which endpoint is missing, or the unknown type
  snapshot TEXT NOT NULL,              -- the vault snapshot it was restored from
  quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now());
"""

# the staged lines, typed (a null in a jsonb column's place is JSON null: the schema's jsonb
# columns are NOT NULL, so SQL NULL cannot have been exported); a belief's line and its embedding
# share a staged row (one binary COPY, no join). A staged row (≈ 2 KB with a 384-dimension
# embedding) is over Postgres's default TOAST threshold, so the staging table raises it to
# the most a page holds: the rows are written once as they come instead of having their
# line compressed and their embedding moved out of line (half the COPY's server time); a
# larger row is still TOASTed.
_BELIEF_STAGE = """CREATE TEMP TABLE kb_in_beliefs (id uuid, j jsonb, embedding vector)
  WITH (toast_tuple_target = 8160) ON COMMIT DROP"""
_BELIEF_COLS = "id, content, embedding, confidence, domains, provenance, created_at, superseded_by"
_BELIEF_SELECT = """SELECT id, j->>'content', embedding, (j->>'confidence')::real,
  ARRAY(SELECT jsonb_array_elements_text(j->'domains')), j->'provenance',
  (j->>'created_at')::timestamptz, (j->>'superseded_by')::uuid
FROM kb_in_beliefs"""
_EDGE_COLS = "id, source_belief_id, target_belief_id, edge_type, weight, created_at, metadata"
_EDGE_TYPED = """CREATE TEMP TABLE kb_edges ON COMMIT DROP AS
SELECT (j->>'id')::uuid AS id, (j->>'source_belief_id')::uuid AS source_belief_id,
  (j->>'target_belief_id')::uuid AS target_belief_id, j->>'edge_type' AS edge_type,
  (j->>'weight')::real AS weight, (j->>'created_at')::timestamptz AS created_at,
  j->'metadata' AS metadata
FROM kb_in_edges"""
_SOURCE_COLS = "id, uri, title, fetched_at"
_SOURCE_SELECT = """SELECT (j->>'id')::uuid, j->>'uri', j->>'title', (j->>'fetched_at')::timestamptz
FROM kb_in_sources"""

_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")


@dataclass
class Selection:
    """Which part of the graph to restore; the filters combine (AND). Empty: everything.

    ``belief`` with ``depth``: the beliefs within ``depth`` edges of it (either direction);
    ``domain``: beliefs listing it in ``domains``; ``since``/``until``: ``created_at`` in
    [since, until)."""

    belief: str | None = None
    depth: int = 1
    domain: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def whole(self) -> bool:
        return self.belief is None and self.domain is None and not (self.since or self.until)


@dataclass
class RestoreReport:
    """What a restore did. ``quarantined``: (edge id, reason) of each edge set aside."""

    snapshot: str
    sources: int = 0
    beliefs: int = 0
    edges: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    cleared_superseded_by: list[str] = field(default_factory=list)
    orphans_after: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "snapshot": self.snapshot,
            "restored": {
                "sources": self.sources,
                "beliefs": self.beliefs,
                "belief_edges": self.edges,
            },
            "quarantined": [{"id": i, "reason": r} for i, r in self.quarantined],
            "cleared_superseded_by": self.cleared_superseded_by,
            "orphan_edges_after": self.orphans_after,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }


#: Staged belief rows are written to the database in COPY messages of about this many bytes.
COPY_BATCH = 4 << 20


def _copy_beliefs(cur, lines: list[bytes], files: list[bytes], keep: set[bytes] | None) -> None:
    """Binary COPY of (id, line as jsonb, embedding) into ``kb_in_beliefs``: the lines and
    the embedding records (of ``keep`` only, if given) pair up in order, as exported (both
    by id within a bucket, buckets in path order). A record's length field followed by its
    vector is the binary form of the ``vector`` column as it stands (-1: NULL), so it is
    copied, not converted. IntegrityError when the two do not pair up in number (their
    ids are compared by :func:`_check_pairs` once every part is staged)."""
    if not lines and not files:
        return
    recs = (
        (id16, rec)
        for data in files
        for id16, _vec, rec in layout.iter_embeddings(data)
        if keep is None or id16 in keep
    )
    three, sixteen, one = _I16.pack(3), _I32.pack(16), b"\x01"  # jsonb binary: version 1
    with cur.copy("COPY kb_in_beliefs (id, j, embedding) FROM STDIN (FORMAT BINARY)") as cp:
        out, size = [_PGCOPY_HEADER], 0
        try:
            for line, (id16, rec) in zip(lines, recs, strict=True):
                out.append(three + sixteen + id16 + _I32.pack(len(line) + 1) + one + line)
                out.append(rec[16:])
                size += len(line) + len(rec)
                if size >= COPY_BATCH:
                    cp.write(b"".join(out))
                    out, size = [], 0
        except ValueError:
            raise IntegrityError("the snapshot's beliefs and embeddings do not pair up") from None
        out.append(_I16.pack(-1))
        cp.write(b"".join(out))


def _check_pairs(cur) -> None:
    """IntegrityError unless every staged belief line has the id of its embedding record."""
    cur.execute("SELECT count(*) FROM kb_in_beliefs WHERE id IS DISTINCT FROM (j->>'id')::uuid")
    if cur.fetchone()[0]:
        raise IntegrityError("the snapshot's beliefs and embeddings do not pair up")


def _copy_lines(cur, table: str, lines: list[bytes]) -> None:
    """COPY JSON lines into a one-column jsonb table (text format: backslashes doubled;
    the lines hold no raw tab, newline or carriage return: JSON escapes them)."""
    if not lines:
        return
    with cur.copy(f"COPY {table} (j) FROM STDIN") as cp:
        cp.write((b"\n".join(lines) + b"\n").replace(b"\\", b"\\\\"))


@dataclass
class _Staged:
    """A part of a restore, read in one pass: source lines, belief lines with the
    embeddings files they pair with (``keep``: the ids to take from those, None for all),
    and edge lines to consider. A restore is a sequence of these."""

    sources: list[bytes]
    lines: list[bytes]
    embeddings: list[bytes]
    keep: set[bytes] | None
    edges: list[bytes]


#: A whole graph is read in parts of about this many bytes (at most :data:`MAX_PARTS`), so
#: the database stages one while the next is being read and decoded.
PART_BYTES = 32 << 20
MAX_PARTS = 4
#: The files of a bucket a whole restore reads (a bucket's lines and embeddings must be in
#: the same part: they pair up in order).
_WHOLE_KINDS = (layout.beliefs_path, layout.embeddings_path, layout.edges_out_path)


def whole_parts(places: dict[str, tuple[int, int]]) -> list[list[str]]:
    """How a whole graph is read: its buckets in 1 to :data:`MAX_PARTS` parts of about
    :data:`PART_BYTES`, given ``places`` ({path: (size, lowest segment id of its chunks)},
    :meth:`KbFiles.places`). Every bucket with a beliefs, embeddings or out-edges file is
    in exactly one part (its files pair up within a part); buckets go in the order they lie
    in the segments (a bucket's place: the lowest segment of those files), so a part's
    files share segments and each segment is fetched about once, not once per part (the
    export stores the two halves of the buckets interleaved, the sealers interleave their
    segments). No bucket at all: one empty part."""
    size: dict[str, int] = {}
    seg: dict[str, int] = {}
    for b in (f"{i:0{layout.BUCKET_HEX}x}" for i in range(16**layout.BUCKET_HEX)):
        for path in (f(b) for f in _WHOLE_KINDS):
            if path in places:
                n, s = places[path]
                size[b] = size.get(b, 0) + n
                seg[b] = min(seg.get(b, s), s)
    total = sum(size.values())
    parts = max(1, min(MAX_PARTS, -(-total // PART_BYTES)))
    groups: list[list[str]] = [[] for _ in range(parts)]
    acc = 0
    for b in sorted(size, key=lambda b: (seg[b], b)):
        groups[min(parts - 1, acc * parts // max(total, 1))].append(b)
        acc += size[b]
    return groups


def _whole(files: KbFiles, snap: KbSnap) -> Iterator[_Staged]:
    """A whole graph in parts (:func:`whole_parts`). The last part in segment order is read
    first, together with kb/manifest.json (stored last, checked against what that pass
    found); the sources (stored first) come with the first part in segment order."""
    groups = whole_parts(files.places(snap))
    order = [len(groups) - 1, *range(len(groups) - 1)]
    for i, g in enumerate(order):
        paths = [f(b) for b in groups[g] for f in _WHOLE_KINDS]
        if g == 0:
            paths.append(layout.SOURCES)
        got = files.read_dirs(snap, paths) if i == 0 else files.read(snap, paths)
        held = [p for p in paths if p in got]  # in bucket order: lines and records pair up
        yield _Staged(
            layout.split_lines(got.get(layout.SOURCES, b"")),
            _lines(got, held, "kb/beliefs/"),
            [got[p] for p in held if p.startswith("kb/embeddings/")],
            None,
            _lines(got, held, "kb/edges/out/"),
        )


def _lines(got: dict[str, bytes], paths: list[str], prefix: str) -> list[bytes]:
    """The lines of the files of ``paths`` under ``prefix``, in that order."""
    return [x for p in paths if p.startswith(prefix) for x in layout.split_lines(got[p])]


def _parts(files: KbFiles, snap: KbSnap, sel: Selection) -> Iterator[_Staged]:
    """The selection as a sequence of :class:`_Staged` parts, read in turn (a whole graph
    in several, so that reading overlaps loading; a selection in one, every edge touching
    a selected belief)."""
    if sel.whole:
        yield from _whole(files, snap)
        return

    m = files.manifest(snap)
    out_paths = [layout.edges_out_path(b) for b in m.buckets("edges/out")]
    edge_rows: list[tuple[bytes, str, str]] = []
    if sel.belief is not None:  # the neighbourhood needs the edges first
        got = files.read(snap, out_paths)
        adj: dict[str, set[str]] = defaultdict(set)
        for p in out_paths:
            for x in layout.split_lines(got[p]):
                e = json.loads(x)
                s, t = e["source_belief_id"], e["target_belief_id"]
                edge_rows.append((x, s, t))
                adj[s].add(t)
                adj[t].add(s)
        start = str(layout.parse_id(sel.belief))
        reach, frontier = {start}, {start}
        for _ in range(sel.depth):
            frontier = {n for f in frontier for n in adj.get(f, ())} - reach
            reach |= frontier
        buckets = sorted({i[: layout.BUCKET_HEX] for i in reach} & set(m.buckets("beliefs")))
    else:
        reach = None
        buckets = m.buckets("beliefs")
    paths = [layout.beliefs_path(b) for b in buckets]
    got = files.read(snap, [*paths, layout.SOURCES])
    sources = layout.split_lines(got.get(layout.SOURCES, b""))
    lines, ids, seen = [], set(), set()
    for p in paths:
        for x in layout.split_lines(got[p]):
            b = json.loads(x)
            seen.add(b["id"])
            if reach is not None and b["id"] not in reach:
                continue
            if sel.domain is not None and sel.domain not in b["domains"]:
                continue
            created = datetime.fromisoformat(b["created_at"])
            if (sel.since and created < sel.since) or (sel.until and created >= sel.until):
                continue
            lines.append(x)
            ids.add(b["id"])
    if sel.belief is not None and str(layout.parse_id(sel.belief)) not in seen:
        raise InputError(f"belief {sel.belief} is not in snapshot {snap.label}")
    if not ids and not sel.whole:  # a selection that matches nothing is a mistake, not a no-op
        raise InputError(
            f"no belief of snapshot {snap.label} matches the selection (domain, since, until)"
        )
    embs_paths = [layout.embeddings_path(b) for b in sorted({i[: layout.BUCKET_HEX] for i in ids})]
    got = files.read(snap, embs_paths)
    embs = [got[p] for p in embs_paths if p in got]  # bucket order: they pair with the lines
    if not edge_rows:
        got = files.read(snap, out_paths)
        for p in out_paths:
            for x in layout.split_lines(got[p]):
                e = json.loads(x)
                edge_rows.append((x, e["source_belief_id"], e["target_belief_id"]))
    keep = {uuid.UUID(i).bytes for i in ids}
    yield _Staged(sources, lines, embs, keep, [x for x, s, t in edge_rows if s in ids or t in ids])


def restore(
    files: KbFiles,
    snapshot: str,
    dsn: str,
    sel: Selection | None = None,
    replace: bool = False,
    strict: bool = False,
) -> RestoreReport:
    """Restore knowledge-base snapshot ``snapshot`` (uid, name or ``latest``) of ``files``
    into ``dsn``; see the module docstring for the steps. Raises TargetNotEmpty for rows that
    exist (without ``replace``), IntegrityError with ``strict`` when anything would be
    quarantined or cleared (nothing is written then), InputError for a bad DSN or selection."""
    t0 = time.perf_counter()
    sel = sel or Selection()
    snap = files.find(snapshot)
    parts = _parts(files, snap, sel)
    first = next(parts)  # an unknown --belief fails here, before the database is touched
    m = files.manifest(snap)  # read with the first part
    files.check_signed(snap, m)
    rep = RestoreReport(snap.uid)
    handoff: queue.Queue[_Staged | None] = queue.Queue(1)
    with ThreadPoolExecutor(1, thread_name_prefix="vaultfs-kb-load") as ex:
        loaded = ex.submit(_load, dsn, m, first, handoff.get, replace, strict, rep)
        try:
            for part in itertools.chain(parts, [_END]):
                if not _hand_over(handoff, part, loaded):
                    break  # the loader failed: stop reading, report its error
        except BaseException:
            _abandon(handoff)  # the loader rolls back
            raise
        loaded.result()
    rep.bytes_read = files.bytes_read
    rep.seconds = time.perf_counter() - t0
    return rep


#: The end of the parts (:func:`restore` to :func:`_load`); None means the reading failed.
_END = _Staged([], [], [], None, [])


def _hand_over(handoff: queue.Queue, part: _Staged, loaded: Future) -> bool:
    """Put ``part`` on the hand-off once the loader takes it; False if the loader ended
    (failed) instead, so the reading side never waits on a loader that is gone."""
    while True:
        try:
            handoff.put(part, timeout=0.2)
            return True
        except queue.Full:
            if loaded.done():
                return False


def _abandon(handoff: queue.Queue) -> None:
    """Tell the loader the reading failed (None), in place of a part it has not taken."""
    with contextlib.suppress(queue.Empty):
        handoff.get_nowait()
    handoff.put_nowait(None)  # only this thread puts: the queue has room now


class _Abandoned(Exception):
    """The reading side failed: roll the load back."""


def _load(
    dsn: str,
    m: KbManifest,
    first: _Staged,
    next_part: Callable[[], _Staged | None],
    replace: bool,
    strict: bool,
    rep: RestoreReport,
) -> None:
    """The database side of :func:`restore`, in one transaction (a thread of its own: it
    stages each part while the next one is read, then types, checks and inserts)."""
    import psycopg

    conn = connect(dsn)
    try:
        with conn.transaction():
            cur = conn.cursor()
            cur.execute("SET LOCAL TimeZone = 'UTC'")
            cur.execute(schema.ddl(m.dim or schema.DEFAULT_DIM))
            cur.execute(QUARANTINE_DDL)
            for t in ("sources", "edges"):
                cur.execute(f"CREATE TEMP TABLE kb_in_{t} (j jsonb) ON COMMIT DROP")
            cur.execute(_BELIEF_STAGE)
            rebuild = _drop_indexes_if_empty(cur)
            # into empty tables nothing can clash: no check, plain inserts (no unique index)
            check, upsert = not replace and rebuild is None, replace and rebuild is None
            part: _Staged | None = first
            while part is not _END:
                if part is None:
                    raise _Abandoned
                _copy_lines(cur, "kb_in_sources", part.sources)
                _copy_beliefs(cur, part.lines, part.embeddings, part.keep)
                _copy_lines(cur, "kb_in_edges", part.edges)
                part = next_part()
            _check_pairs(cur)
            if check:
                _refuse_existing(
                    cur,
                    (
                        ("sources", _SOURCE_COLS, _SOURCE_SELECT),
                        ("beliefs", _BELIEF_COLS, _BELIEF_SELECT),
                    ),
                )
            rep.sources = _upsert(cur, "sources", _SOURCE_COLS, _SOURCE_SELECT, upsert, check)
            rep.beliefs = _upsert(cur, "beliefs", _BELIEF_COLS, _BELIEF_SELECT, upsert, check)
            for stmt in rebuild.nodes if rebuild else ():  # the checks below look ids up
                cur.execute(stmt)
            rep.cleared_superseded_by = _clear_dangling_superseded(cur)

            cur.execute(_EDGE_TYPED)
            edges = f"SELECT {_EDGE_COLS} FROM kb_edges"
            if check:
                _refuse_existing(cur, (("belief_edges", _EDGE_COLS, edges),))
            rep.quarantined = _quarantine(cur, rep.snapshot)
            rep.edges = _upsert(cur, "belief_edges", _EDGE_COLS, edges, upsert, check)
            for stmt in rebuild.rest if rebuild else ():
                cur.execute(stmt)
            cur.execute(
                "SELECT count(*) FROM belief_edges e WHERE NOT EXISTS"
                " (SELECT 1 FROM beliefs b WHERE b.id = e.source_belief_id) OR NOT EXISTS"
                " (SELECT 1 FROM beliefs b WHERE b.id = e.target_belief_id)"
            )
            rep.orphans_after = cur.fetchone()[0]
            if strict and (rep.quarantined or rep.cleared_superseded_by or rep.orphans_after):
                raise IntegrityError(_strict_message(rep))
    except _Abandoned:
        return
    except psycopg.Error as e:
        raise InputError(f"restoring into the database failed: {one_line(e)}") from None
    finally:
        conn.close()


def _strict_message(rep: RestoreReport) -> str:
    parts = []
    if rep.quarantined:
        i, r = rep.quarantined[0]
        parts.append(f"{len(rep.quarantined)} edge(s) would be quarantined (first: {i}: {r})")
    if rep.cleared_superseded_by:
        parts.append(
            f"{len(rep.cleared_superseded_by)} belief(s) point superseded_by at a missing belief"
        )
    if rep.orphans_after:
        parts.append(f"{rep.orphans_after} orphan edge(s) in the database")
    return (
        "--strict: the restored graph would not be whole: "
        + "; ".join(parts)
        + "; nothing was restored"
    )


def _refuse_existing(cur, tables: tuple[tuple[str, str, str], ...]) -> None:
    """TargetNotEmpty if a staged row of one of ``tables`` ((table, columns, typed select))
    has an id the database already holds with other values. A row already there as it is
    (a source two partial restores share, a belief in both neighbourhoods) is no clash: the
    insert leaves it alone."""
    clashes = []
    for table, cols, select in tables:
        row = ", ".join(f"t.{c}" for c in cols.split(", "))
        staged = ", ".join(f"s.{c}" for c in cols.split(", "))
        cur.execute(
            f"WITH s ({cols}) AS ({select}) SELECT count(*) FROM s JOIN {table} t"
            f" ON t.id = s.id WHERE ({row}) IS DISTINCT FROM ({staged})"
        )
        if n := cur.fetchone()[0]:
            clashes.append(f"{n} in {table}")
    if clashes:
        raise TargetNotEmpty(
            f"the database already holds other rows with the same ids ({', '.join(clashes)}); "
            "pass --replace to overwrite them, or restore into an empty database"
        )


@dataclass
class _Rebuild:
    """What :func:`_drop_indexes_if_empty` dropped, as the statements that make it again."""

    nodes: list  # the keys of sources and beliefs, made once those are loaded
    rest: list  # then the edges' keys, every index, every foreign key (pg_dump's order)


def _drop_indexes_if_empty(cur) -> _Rebuild | None:
    """If the three tables are empty (a fresh database), drop their keys, foreign keys
    (also those of other tables that point at them) and indexes, and return the statements
    that make them again (:class:`_Rebuild`): the keys of ``sources`` and ``beliefs`` once
    those are loaded (the edges are checked against them), then the rest in pg_dump's
    script's order: keys, indexes, foreign keys. One bulk build and one
    validating join each instead of an index update and a check per row. None (nothing
    dropped) if any of the tables holds a row."""
    from psycopg import sql

    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM sources) OR EXISTS (SELECT 1 FROM beliefs)"
        " OR EXISTS (SELECT 1 FROM belief_edges)"
    )
    if cur.fetchone()[0]:
        return None
    tables = "('sources'::regclass, 'beliefs'::regclass, 'belief_edges'::regclass)"
    # foreign keys first (they depend on the keys they reference), then keys and uniques
    cur.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        f" WHERE (contype = 'f' AND (conrelid IN {tables} OR confrelid IN {tables}))"
        f" OR (contype IN ('p', 'u') AND conrelid IN {tables})"
        " ORDER BY contype <> 'f', conname"
    )
    constraints = cur.fetchall()
    cur.execute(
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
        f" WHERE indrelid IN {tables} AND NOT EXISTS"
        " (SELECT 1 FROM pg_constraint c WHERE c.conindid = indexrelid) ORDER BY 1"
    )
    idx = cur.fetchall()
    nodes, keys, fks = [], [], []
    for table, name, definition in constraints:
        t, c = sql.SQL(table), sql.Identifier(name)
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(t, c))
        again = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(t, c, sql.SQL(definition))
        if definition.startswith("FOREIGN KEY"):
            fks.append(again)
        else:
            (keys if table == "belief_edges" else nodes).append(again)
    for name, _definition in idx:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    return _Rebuild(nodes, [*keys, *(sql.SQL(d) for _n, d in idx), *fks])


def _upsert(cur, table: str, cols: str, select: str, upsert: bool, keep: bool) -> int:
    """INSERT ``select`` into ``table``; with ``upsert`` a row whose id exists is overwritten,
    with ``keep`` it is left as it is (either is ON CONFLICT on the table's key, so the key
    must be there). Returns the rows written."""
    sql = f"INSERT INTO {table} ({cols}) {select}"
    if upsert:
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols.split(", ")[1:])
        sql += f" ON CONFLICT (id) DO UPDATE SET {sets}"
    elif keep:
        sql += " ON CONFLICT (id) DO NOTHING"
    cur.execute(sql)
    return cur.rowcount


def _clear_dangling_superseded(cur) -> list[str]:
    """Clear ``superseded_by`` of restored beliefs that point at a belief the database does
    not hold (a partial restore); return their ids. A cheap anti-join over the beliefs comes
    first: in the usual restore nothing dangles and the staged ids need not be parsed again."""
    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM beliefs b WHERE b.superseded_by IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM beliefs t WHERE t.id = b.superseded_by))"
    )
    if not cur.fetchone()[0]:
        return []
    cur.execute(
        "UPDATE beliefs b SET superseded_by = NULL WHERE b.id IN"
        " (SELECT id FROM kb_in_beliefs) AND b.superseded_by IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM beliefs t WHERE t.id = b.superseded_by) RETURNING b.id"
    )
    return sorted(str(r[0]) for r in cur.fetchall())


def _quarantine(cur, snapshot: str) -> list[tuple[str, str]]:
    """Move the staged edges that cannot go in (an endpoint missing, an unknown type) to
    ``belief_edges_quarantine`` with the reason; return (id, reason) of each."""
    types = ",".join(f"'{t}'" for t in schema.EDGE_TYPES)
    # joins, not EXISTS subqueries per edge: hash joins whether or not beliefs has its key
    # yet (a fresh database gets it after the load)
    cur.execute(
        f"""CREATE TEMP TABLE kb_bad ON COMMIT DROP AS
SELECT x.id, concat_ws('; ',
  CASE WHEN s.id IS NULL THEN 'source belief ' || x.source_belief_id || ' missing' END,
  CASE WHEN t.id IS NULL THEN 'target belief ' || x.target_belief_id || ' missing' END,
  CASE WHEN x.edge_type NOT IN ({types}) THEN 'unknown edge type ' || x.edge_type END) AS reason
FROM kb_edges x LEFT JOIN beliefs s ON s.id = x.source_belief_id
  LEFT JOIN beliefs t ON t.id = x.target_belief_id
WHERE s.id IS NULL OR t.id IS NULL OR x.edge_type NOT IN ({types})"""
    )
    cur.execute(
        f"""INSERT INTO belief_edges_quarantine ({_EDGE_COLS}, reason, snapshot)
SELECT {", ".join("x." + c for c in _EDGE_COLS.split(", "))}, q.reason, %s
FROM kb_edges x JOIN kb_bad q USING (id)
ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, snapshot = EXCLUDED.snapshot,
  quarantined_at = now()""",
        (snapshot,),
    )
    cur.execute("DELETE FROM kb_edges WHERE id IN (SELECT id FROM kb_bad)")
    # an edge restored whole now is no longer quarantined
    cur.execute("DELETE FROM belief_edges_quarantine WHERE id IN (SELECT id FROM kb_edges)")
    cur.execute("SELECT id, reason FROM kb_bad ORDER BY id")
    return [(str(i), r) for i, r in cur.fetchall()]
