"""`vaultfs kb migrate`: any pgvector table into the belief schema (vaultfs/kb/migrate.py).

This module does not create the `kb` command group (cli/kb_cmd.py owns it): the group calls
:func:`register` once, ``register(kb_app)``. Exit codes (vaultfs/errors.py): 18 for a source
or target that cannot be reached, a missing table or column, a non-vector embedding column,
a dimension mismatch or a default out of range; 2 for bad flags.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import HomeOpt, JsonOpt, home_dir, out, print_json, print_table
from vaultfs.kb import migrate as migrate_mod
from vaultfs.valence import database


def migrate(
    from_dsn: Annotated[str, typer.Option("--from", help="DSN of the database holding the table.")],
    table: Annotated[str, typer.Option("--table", help="The table: NAME or SCHEMA.NAME.")],
    id_col: Annotated[str, typer.Option("--id-col", help="Its unique row id column.")],
    content_col: Annotated[str, typer.Option("--content-col", help="Its text column.")],
    embedding_col: Annotated[str, typer.Option("--embedding-col", help="Its pgvector column.")],
    metadata_col: Annotated[
        str | None,
        typer.Option("--metadata-col", help="A JSON column: confidence, domains are read from it."),
    ] = None,
    created_col: Annotated[
        str | None, typer.Option("--created-col", help="A timestamp column for created_at.")
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Target DSN (default $VAULTFS_DSN, else the embedded Postgres)."),
    ] = None,
    confidence: Annotated[
        float, typer.Option("--confidence", help="Confidence when the metadata has none.")
    ] = migrate_mod.DEFAULT_CONFIDENCE,
    domain: Annotated[
        list[str] | None,
        typer.Option("--domain", help="Domain when the metadata has none (repeat)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read and count everything; write nothing.")
    ] = False,
    infer_edges: Annotated[
        bool,
        typer.Option("--infer-edges", help="Nearest neighbours become candidate edges."),
    ] = False,
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Cosine similarity an inferred edge needs."),
    ] = migrate_mod.DEFAULT_THRESHOLD,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate a pgvector table into the belief schema: idempotent (a second run adds
    nothing), provenance names the source row, skipped rows are counted with the reason."""
    spec = migrate_mod.SourceSpec(
        from_dsn, table, id_col, content_col, embedding_col, metadata_col, created_col
    )
    rep = migrate_mod.migrate(
        spec, database(to, home_dir(home)), confidence, domain, dry_run, infer_edges, threshold
    )
    if as_json:
        print_json(rep.as_dict(), ensure_ascii=True)
        return
    verb = "would write" if dry_run else "wrote"
    out.print(
        f"{rep.source['table']}: read {rep.rows_read:,} row(s), {verb} {rep.written:,} "
        f"belief(s), skipped {rep.skipped:,} ({rep.dimension} dimensions) into {rep.target}",
        highlight=False,
        markup=False,
    )
    if rep.skipped_by_reason:
        t = Table("skipped because", "rows")
        for reason, n in rep.skipped_by_reason.items():
            t.add_row(reason, f"{n:,}")
        print_table(t)
    if rep.edges_inferred is not None:
        out.print(
            f"inferred {rep.edges_inferred:,} candidate edge(s) at similarity ≥ {threshold}: "
            f"{verb} {rep.edges_written:,}, {rep.edges_existing:,} already there",
            highlight=False,
        )


def register(kb_app: typer.Typer) -> None:
    """Add ``migrate`` to the ``kb`` command group."""
    kb_app.command("migrate")(migrate)
