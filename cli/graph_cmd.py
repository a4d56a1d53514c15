"""`vaultfs graph show|add-edge|path|stats`: the belief graph in the live database
(vaultfs/kb/graph.py). The database is --dsn, else $VAULTFS_DSN, else the embedded Postgres
in the vault home. Exit codes (vaultfs/errors.py): 18 for a malformed or unknown belief id,
an unknown edge type, a bad weight or depth, a duplicate edge, an unreachable database or one
without the belief schema; 2 for bad flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.table import Table

from cli.common import HomeOpt, JsonOpt, app, err, home_dir, out, print_json, print_table
from vaultfs.kb import db, graph
from vaultfs.kb.schema import EDGE_TYPES
from vaultfs.valence import database

graph_app = typer.Typer(
    help="The belief graph in the live database: show, add-edge, path, stats.",
    no_args_is_help=True,
)
app.add_typer(graph_app, name="graph")

DsnOpt = Annotated[
    str | None,
    typer.Option(
        "--dsn", help="Database (default $VAULTFS_DSN, else the vault's embedded Postgres)."
    ),
]
TypeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--type", "-t", help=f"Only edges of this type (repeat): {', '.join(EDGE_TYPES)}."
    ),
]


@contextlib.contextmanager
def connection(dsn: str | None, home: Path | None) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the graph's database (see :func:`vaultfs.valence.database`), closed
    after the command."""
    conn = db.connect(database(dsn, home_dir(home)), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def _json(doc: Any) -> None:
    print_json(doc, ensure_ascii=True)


def _short(text: str | None, width: int = 70) -> str:
    if text is None:
        return "(missing belief)"
    return text if len(text) <= width else text[: width - 1] + "…"


@graph_app.command("show")
def show(
    belief_id: Annotated[str, typer.Argument(help="The belief's id (a UUID).")],
    dsn: DsnOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A belief and its relationships by type, out and in, with weights."""
    bid = graph.parse_id(belief_id)
    with connection(dsn, home) as conn:
        view = graph.show(conn, bid)
    if as_json:
        _json(view)
        return
    out.print(f"belief {view['id']}", highlight=False)
    out.print(f"  {view['content']}", highlight=False, markup=False)
    out.print(
        f"  confidence {view['confidence']:.3f}  domains {', '.join(view['domains']) or '-'}"
        f"  created {view['created_at']}"
        + (f"  superseded by {view['superseded_by']}" if view["superseded_by"] else ""),
        highlight=False,
    )
    for direction, arrow in (("out", "→"), ("in", "←")):
        t = Table(
            "type", arrow, "weight", "content", title=f"edges {direction}", title_justify="left"
        )
        for etype, edges in view[direction].items():
            for e in edges:
                t.add_row(etype, e["belief"], f"{e['weight']:.3f}", _short(e["content"]))
        if t.row_count:
            print_table(t)
        else:
            out.print(f"no edges {direction}")


@graph_app.command("add-edge")
def add_edge(
    source: Annotated[str, typer.Argument(help="Source belief id.")],
    target: Annotated[str, typer.Argument(help="Target belief id.")],
    edge_type: Annotated[
        str, typer.Option("--type", "-t", help=f"One of {', '.join(EDGE_TYPES)}.")
    ],
    weight: Annotated[float, typer.Option("--weight", help="Between 0 and 1.")] = 1.0,
    dsn: DsnOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add the edge SOURCE -[TYPE]-> TARGET (both beliefs must exist; no duplicate of the
    same source, target and type; no self-loop)."""
    a, b = graph.parse_id(source), graph.parse_id(target)
    with connection(dsn, home) as conn:
        edge = graph.add_edge(conn, a, b, edge_type, weight, {"added_by": "vaultfs graph add-edge"})
    if as_json:
        _json(edge)
        return
    out.print(f"added edge {edge['edge_id']}: {a} -[{edge_type} {weight:g}]-> {b}", highlight=False)


@graph_app.command("path")
def path(
    source: Annotated[str, typer.Argument(help="Start belief id.")],
    target: Annotated[str, typer.Argument(help="End belief id.")],
    max_depth: Annotated[
        int, typer.Option("--max-depth", help=f"Longest path searched (1-{graph.MAX_DEPTH}).")
    ] = graph.DEFAULT_DEPTH,
    edge_type: TypeOpt = None,
    undirected: Annotated[
        bool, typer.Option("--undirected", help="Follow edges in either direction.")
    ] = False,
    dsn: DsnOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The shortest typed path from SOURCE to TARGET (exit 0 whether or not one exists; the
    output says which)."""
    a, b = graph.parse_id(source), graph.parse_id(target)
    with connection(dsn, home) as conn:
        res = graph.find_path(conn, a, b, max_depth, edge_type, undirected)
    if as_json:
        _json(res)
        return
    if not res["found"]:
        out.print(
            f"no path from {a} to {b} within {max_depth} hop(s) over {', '.join(res['types'])}",
            highlight=False,
        )
        return
    out.print(f"path of {res['length']} hop(s) ({res['engine']}):", highlight=False)
    for h in res["hops"]:
        left, right = ("<-", "-") if h["direction"] == "in" else ("-", "->")
        out.print(
            f"  {h['from']} {left}[{h['edge_type']} {h['weight']:.3f}]{right} {h['to']}",
            highlight=False,
            markup=False,
        )


@graph_app.command("stats")
def stats(dsn: DsnOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Counts by edge type, the degree distribution, orphan beliefs and dangling edges."""
    with connection(dsn, home) as conn:
        st = graph.stats(conn)
    if as_json:
        _json(st)
        return
    out.print(f"{st['beliefs']:,} beliefs, {st['edges']:,} edges", highlight=False)
    t = Table("edge type", "count", "mean weight")
    for etype, row in st["by_type"].items():
        mean = "-" if row["mean_weight"] is None else f"{row['mean_weight']:.3f}"
        t.add_row(etype, f"{row['count']:,}", mean)
    print_table(t)
    d = st["degree"]
    mean = "-" if d["mean"] is None else f"{d['mean']:.2f}"
    out.print(
        f"degree (in+out): min {d['min']}, median {d['median']}, p90 {d['p90']}, "
        f"max {d['max']}, mean {mean}",
        highlight=False,
    )
    out.print(f"orphans (no edge at all): {st['orphans']:,}", highlight=False)
    if st["dangling_edges"] or st["self_loops"]:
        err.print(
            f"[yellow]warning:[/] {st['dangling_edges']} edge(s) point at a missing belief, "
            f"{st['self_loops']} self-loop(s)",
            highlight=False,
        )
