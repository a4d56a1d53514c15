"""Graph commands on the live belief database: show a belief's relationships, add a validated
edge, find the shortest typed path between two beliefs, and summarise the graph.

Every function takes an open psycopg connection (see :mod:`vaultfs.kb.db`) and returns plain
JSON-ready dicts (UUIDs and times as strings). User mistakes raise
:class:`~vaultfs.errors.InputError` (exit 18) with a sentence that says what was wrong:
a malformed UUID, a belief that does not exist, an unknown edge type, a weight outside
[0, 1], a duplicate edge, a self-loop, a depth outside [1, :data:`MAX_DEPTH`].

Paths (:func:`find_path`) are found by a recursive CTE over ``belief_edges``: breadth first
(Postgres evaluates a recursive CTE level by level and stops pulling rows at ``LIMIT 1``, so
the first row that reaches the target is a shortest path), one row per belief per level
(``DISTINCT ON``, keeping the lexicographically first path, so the answer is deterministic
and a level never holds more rows than there are beliefs: the search costs at most
max-depth × edges, never the number of paths), cycle-safe (a walk never revisits a belief
it holds in its path array) and bounded (``--max-depth``, and a statement timeout). Why one
row per belief suffices: a belief at distance k has a predecessor at distance k-1, and no
path of length k-1 can already contain a belief at distance k.
When the Apache AGE extension is installed *and* holds a graph named :data:`AGE_GRAPH`
(vertices labelled ``Belief`` with an ``id`` property, edges labelled by edge type) the query
goes through AGE's Cypher instead; otherwise, the normal case, the CTE is used. The result
says which engine answered.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import InputError
from .db import schema_errors
from .schema import EDGE_TYPES, check_edge_type

#: Longest path :func:`find_path` searches (a walk enumerates simple paths, so depth is cost).
MAX_DEPTH = 12
DEFAULT_DEPTH = 6
#: Milliseconds a path search may run before it is cancelled with a clear error.
PATH_TIMEOUT_MS = 30_000
#: The AGE graph :func:`find_path` queries when the ``age`` extension is installed.
AGE_GRAPH = "belief_graph"
_NO_SCHEMA = "the database has no belief schema (tables beliefs, belief_edges)"


def parse_id(text: str) -> uuid.UUID:
    """A belief id from the command line; InputError if it is not a UUID."""
    try:
        return uuid.UUID(text.strip())
    except (ValueError, AttributeError):
        raise InputError(f"{text!r} is not a belief id (a UUID like 1b4e28ba-2fa1-…)") from None


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _require_beliefs(cur: psycopg.Cursor, ids: list[uuid.UUID]) -> None:
    cur.execute("SELECT id FROM beliefs WHERE id = ANY(%s)", (ids,))
    found = {r[0] for r in cur.fetchall()}
    missing = [str(i) for i in dict.fromkeys(ids) if i not in found]
    if missing:
        raise InputError(f"no belief with id {', '.join(missing)} in this database")


def show(conn: psycopg.Connection, belief_id: uuid.UUID) -> dict[str, Any]:
    """The belief (content, confidence, domains, provenance, created_at, superseded_by) and its
    relationships: ``out`` and ``in``, each ``{edge_type: [edge, …]}`` ordered by weight
    (heaviest first); an edge is ``{edge_id, belief, content, weight, metadata, created_at}``
    where ``belief`` is the other end. Every edge type appears as a key, possibly empty."""
    with schema_errors(_NO_SCHEMA), conn.cursor() as cur:
        cur.execute(
            "SELECT content, confidence, domains, provenance, created_at, superseded_by "
            "FROM beliefs WHERE id = %s",
            (belief_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise InputError(f"no belief with id {belief_id} in this database")
        content, confidence, domains, provenance, created, superseded = row
        view: dict[str, Any] = {
            "id": str(belief_id),
            "content": content,
            "confidence": confidence,
            "domains": list(domains),
            "provenance": provenance,
            "created_at": _iso(created),
            "superseded_by": str(superseded) if superseded else None,
        }
        for direction, here, there in (
            ("out", "source_belief_id", "target_belief_id"),
            ("in", "target_belief_id", "source_belief_id"),
        ):
            cur.execute(
                sql.SQL(
                    "SELECT e.id, e.edge_type, e.{there}, b.content, e.weight, e.metadata, "
                    "e.created_at FROM belief_edges e LEFT JOIN beliefs b ON b.id = e.{there} "
                    "WHERE e.{here} = %s ORDER BY e.edge_type, e.weight DESC, e.id"
                ).format(here=sql.Identifier(here), there=sql.Identifier(there)),
                (belief_id,),
            )
            groups: dict[str, list[dict[str, Any]]] = {t: [] for t in EDGE_TYPES}
            for eid, etype, other, other_content, weight, meta, ecreated in cur.fetchall():
                groups.setdefault(etype, []).append(
                    {
                        "edge_id": str(eid),
                        "belief": str(other),
                        "content": other_content,  # None: the other end is missing (no FKs)
                        "weight": weight,
                        "metadata": meta,
                        "created_at": _iso(ecreated),
                    }
                )
            view[direction] = groups
    return view


def check_weight(weight: float) -> float:
    """``weight`` if it lies in [0, 1] (the scale the belief graph uses), else InputError."""
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"edge weight {weight} is outside [0, 1]")
    return weight


def add_edge(
    conn: psycopg.Connection,
    source: uuid.UUID,
    target: uuid.UUID,
    edge_type: str,
    weight: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Insert the edge ``source -[edge_type, weight]-> target`` and commit; return it.

    Refuses (InputError, nothing written) a self-loop (a belief cannot support, contradict,
    supersede or derive from itself: such an edge carries no information and would make every
    path query trivially cyclic), an unknown type, a weight outside [0, 1], a missing belief
    and a duplicate (an edge with the same source, target and type exists: change its weight
    instead of adding a second one). The duplicate check and the insert hold a transaction
    advisory lock on the triple, so two concurrent add-edge calls cannot both insert it."""
    check_edge_type(edge_type)
    check_weight(weight)
    if source == target:
        raise InputError(f"a belief cannot have an edge to itself ({source})")
    edge_id = uuid.uuid4()
    with schema_errors(_NO_SCHEMA), conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"vaultfs-edge:{source}:{target}:{edge_type}",),
        )
        _require_beliefs(cur, [source, target])
        cur.execute(
            "SELECT id FROM belief_edges WHERE source_belief_id = %s AND target_belief_id = %s "
            "AND edge_type = %s LIMIT 1",
            (source, target, edge_type),
        )
        if (dup := cur.fetchone()) is not None:
            raise InputError(
                f"an edge {source} -[{edge_type}]-> {target} already exists (id {dup[0]})"
            )
        cur.execute(
            "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type, "
            "weight, created_at, metadata) VALUES (%s, %s, %s, %s, %s, now(), %s) "
            "RETURNING created_at",
            (edge_id, source, target, edge_type, weight, psycopg.types.json.Jsonb(metadata or {})),
        )
        (created,) = cur.fetchone() or (None,)
    return {
        "edge_id": str(edge_id),
        "source": str(source),
        "target": str(target),
        "edge_type": edge_type,
        "weight": weight,
        "metadata": metadata or {},
        "created_at": _iso(created),
    }


def age_available(conn: psycopg.Connection) -> bool:
    """True when the ``age`` extension is installed in this database and holds
    :data:`AGE_GRAPH`."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'age'")
        if cur.fetchone() is None:
            return False
        cur.execute("SELECT 1 FROM ag_catalog.ag_graph WHERE name = %s", (AGE_GRAPH,))
        return cur.fetchone() is not None


def cypher_path_query(
    source: uuid.UUID,
    target: uuid.UUID,
    max_depth: int,
    types: list[str] | None,
    undirected: bool,
) -> str:
    """The Cypher text (inside AGE's ``cypher()``) for the shortest path; every interpolated
    value is validated first (UUIDs, known edge types, an int depth), so it cannot inject."""
    arrow = "-" if undirected else "->"
    where = ""
    if types:
        labels = ", ".join(f"'{check_edge_type(t)}'" for t in types)
        where = f" WHERE all(r IN relationships(p) WHERE label(r) IN [{labels}])"
    return (
        f"MATCH p = (a:Belief {{id: '{uuid.UUID(str(source))}'}})-[*1..{int(max_depth)}]{arrow}"
        f"(b:Belief {{id: '{uuid.UUID(str(target))}'}}){where} "
        "WITH p ORDER BY length(p) LIMIT 1 "
        "RETURN [n IN nodes(p) | n.id], [r IN relationships(p) | label(r)], "
        "[r IN relationships(p) | r.weight]"
    )


def _path_cte(types: list[str] | None, undirected: bool) -> sql.Composed:
    """The breadth-first walk; parameters: source, max_depth, target (see module docstring)."""
    edges = sql.SQL(
        "SELECT id, source_belief_id AS a, target_belief_id AS b, edge_type, weight, "
        "'out' AS dir FROM belief_edges"
    )
    if undirected:
        edges = sql.SQL("{} UNION ALL {}").format(
            edges,
            sql.SQL(
                "SELECT id, target_belief_id, source_belief_id, edge_type, weight, 'in' "
                "FROM belief_edges"
            ),
        )
    filt = sql.SQL("")
    if types:
        filt = sql.SQL(" WHERE edge_type = ANY({})").format(
            sql.Literal([check_edge_type(t) for t in types])
        )
    return sql.SQL(
        "WITH RECURSIVE e AS (SELECT * FROM ({edges}) x{filt}), "
        "walk(node, depth, nodes, edges, types, weights, dirs) AS ("
        "  SELECT %(src)s::uuid, 0, ARRAY[%(src)s::uuid], ARRAY[]::uuid[], ARRAY[]::text[],"
        "         ARRAY[]::real[], ARRAY[]::text[]"
        "  UNION ALL"
        "  SELECT * FROM ("
        "    SELECT DISTINCT ON (e.b) e.b, w.depth + 1, w.nodes || e.b, w.edges || e.id,"
        "           w.types || e.edge_type, w.weights || e.weight, w.dirs || e.dir"
        "    FROM walk w JOIN e ON e.a = w.node"
        "    WHERE w.depth < %(depth)s AND w.node <> %(dst)s AND NOT e.b = ANY(w.nodes)"
        "    ORDER BY e.b, w.nodes, e.id) step"
        ") SELECT nodes, edges, types, weights, dirs FROM walk WHERE node = %(dst)s LIMIT 1"
    ).format(edges=edges, filt=filt)


def find_path(
    conn: psycopg.Connection,
    source: uuid.UUID,
    target: uuid.UUID,
    max_depth: int = DEFAULT_DEPTH,
    types: list[str] | None = None,
    undirected: bool = False,
) -> dict[str, Any]:
    """The shortest path from ``source`` to ``target`` following edges in their direction
    (either direction with ``undirected``), using only edges of ``types`` when given, of at
    most ``max_depth`` hops.

    Returns ``{found, engine ("cte" | "age"), length, nodes: [id…], hops: [{from, to,
    edge_id, edge_type, weight, direction}]}``; ``found`` is False (and ``hops`` empty) when no
    such path exists within the bound. InputError for a missing belief, an unknown type, a
    depth outside [1, MAX_DEPTH], or a search that ran past :data:`PATH_TIMEOUT_MS`."""
    if not 1 <= max_depth <= MAX_DEPTH:
        raise InputError(f"--max-depth must be between 1 and {MAX_DEPTH}")
    for t in types or []:
        check_edge_type(t)
    result: dict[str, Any] = {
        "source": str(source),
        "target": str(target),
        "max_depth": max_depth,
        "types": list(types or EDGE_TYPES),
        "undirected": undirected,
    }
    with schema_errors(_NO_SCHEMA), conn.transaction(), conn.cursor() as cur:
        _require_beliefs(cur, [source, target])
        cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(PATH_TIMEOUT_MS))
        try:
            if age_available(conn):
                return result | _age_path(cur, source, target, max_depth, types, undirected)
            cur.execute(
                _path_cte(types, undirected),
                {"src": source, "dst": target, "depth": max_depth},
            )
            row = cur.fetchone()
        except psycopg.errors.QueryCanceled:
            raise InputError(
                f"the path search took longer than {PATH_TIMEOUT_MS // 1000}s: lower "
                "--max-depth or narrow it with --type"
            ) from None
    result["engine"] = "cte"
    if row is None:
        return result | {"found": False, "length": None, "nodes": [], "hops": []}
    nodes, edges, etypes, weights, dirs = row
    hops = [
        {
            "from": str(nodes[i]),
            "to": str(nodes[i + 1]),
            "edge_id": str(edges[i]),
            "edge_type": etypes[i],
            "weight": weights[i],
            "direction": dirs[i],
        }
        for i in range(len(edges))
    ]
    return result | {
        "found": True,
        "length": len(hops),
        "nodes": [str(n) for n in nodes],
        "hops": hops,
    }


def _age_path(
    cur: psycopg.Cursor,
    source: uuid.UUID,
    target: uuid.UUID,
    max_depth: int,
    types: list[str] | None,
    undirected: bool,
) -> dict[str, Any]:
    import json

    cur.execute("LOAD 'age'")
    cur.execute('SET LOCAL search_path = ag_catalog, "$user", public')
    query = cypher_path_query(source, target, max_depth, types, undirected)
    cur.execute(
        sql.SQL(
            "SELECT nodes::text, labels::text, weights::text FROM cypher({graph}, $cypher$"
            + query
            + "$cypher$) AS (nodes agtype, labels agtype, weights agtype)"
        ).format(graph=sql.Literal(AGE_GRAPH))
    )
    row = cur.fetchone()
    if row is None:
        return {"engine": "age", "found": False, "length": None, "nodes": [], "hops": []}
    nodes, labels, weights = (json.loads(x) for x in row)
    hops = [
        {"from": nodes[i], "to": nodes[i + 1], "edge_id": None, "edge_type": labels[i],
         "weight": weights[i], "direction": None}
        for i in range(len(labels))
    ]  # fmt: skip
    return {"engine": "age", "found": True, "length": len(hops), "nodes": nodes, "hops": hops}


def stats(conn: psycopg.Connection) -> dict[str, Any]:
    """A summary of the graph: ``beliefs``, ``edges``, ``by_type`` (``{type: {count,
    mean_weight}}``, every known type present), ``degree`` (total in+out degree over all
    beliefs: min, median, p90, max, mean), ``orphans`` (beliefs with no edge at all),
    ``dangling_edges`` (edges whose source or target belief is missing, possible only
    without foreign keys) and ``self_loops``."""
    with schema_errors(_NO_SCHEMA), conn.transaction(), conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur.execute("SELECT count(*) FROM beliefs")
        (n_beliefs,) = cur.fetchone() or (0,)
        cur.execute(
            "SELECT edge_type, count(*), avg(weight) FROM belief_edges GROUP BY edge_type "
            "ORDER BY edge_type"
        )
        by_type = {t: {"count": 0, "mean_weight": None} for t in EDGE_TYPES}
        for etype, count, mean in cur.fetchall():
            by_type[etype] = {"count": count, "mean_weight": round(float(mean), 6)}
        cur.execute(
            "WITH ends AS (SELECT source_belief_id AS id FROM belief_edges UNION ALL "
            "SELECT target_belief_id FROM belief_edges), "
            "deg AS (SELECT b.id, count(ends.id) AS d FROM beliefs b "
            "LEFT JOIN ends ON ends.id = b.id GROUP BY b.id) "
            "SELECT min(d), percentile_disc(0.5) WITHIN GROUP (ORDER BY d), "
            "percentile_disc(0.9) WITHIN GROUP (ORDER BY d), max(d), avg(d), "
            "count(*) FILTER (WHERE d = 0) FROM deg"
        )
        dmin, dmed, dp90, dmax, dmean, orphans = cur.fetchone() or (None,) * 6
        cur.execute(
            "SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM beliefs b WHERE "
            "b.id = e.source_belief_id) OR NOT EXISTS (SELECT 1 FROM beliefs b WHERE "
            "b.id = e.target_belief_id)), count(*) FILTER (WHERE source_belief_id = "
            "target_belief_id), count(*) FROM belief_edges e"
        )
        dangling, loops, n_edges = cur.fetchone() or (0, 0, 0)
    return {
        "beliefs": n_beliefs,
        "edges": n_edges,
        "by_type": by_type,
        "degree": {
            "min": dmin,
            "median": dmed,
            "p90": dp90,
            "max": dmax,
            "mean": round(float(dmean), 6) if dmean is not None else None,
        },
        "orphans": orphans or 0,
        "dangling_edges": dangling,
        "self_loops": loops,
    }
