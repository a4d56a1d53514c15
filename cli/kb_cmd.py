"""`vaultfs kb snapshot|restore|show|history|diff`: the knowledge base in the vault
(docs/kb.md).

Exit codes (vaultfs/errors.py): 0 success (a restore that quarantined edges still exits 0
and reports them), 2 bad flags, 3 snapshot committed but not yet on k remotes, 12 ``--strict``
restore that would not be whole (nothing written), 13 rows with the same ids exist (pass
``--replace``), 18 unknown snapshot, unknown belief, bad DSN or a database without the belief
schema.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    SeedOpt,
    app,
    err,
    home_dir,
    keys_for_restore,
    open_vault,
    out,
    print_json,
    report_flush,
)
from cli.migrate_cmd import register as register_migrate
from vaultfs import names
from vaultfs.kb import history as history_mod
from vaultfs.kb import restore as restore_mod
from vaultfs.kb import snapshot as snapshot_mod
from vaultfs.kb.reader import KbFiles, open_kb_files
from vaultfs.remotes import check_distinct
from vaultfs.valence import database

kb_app = typer.Typer(
    help="The knowledge base (beliefs, edges, sources) as graph-aware snapshots.",
    no_args_is_help=True,
)
app.add_typer(kb_app, name="kb")

DsnOpt = Annotated[
    str | None,
    typer.Option("--dsn", help="Database (default $VAULTFS_DSN, else the embedded Postgres)."),
]
FromOpt = Annotated[
    list[str] | None,
    typer.Option("--from", help="Read from this remote (repeat; any k suffice, no local state)."),
]


@contextlib.contextmanager
def _files(
    home: Path | None, from_: list[str] | None, keyfile: Path | None, seed_file: Path | None
) -> Iterator[KbFiles]:
    check_distinct(from_ or [], read_with="--from")  # one remote given twice counts once
    h = home_dir(home)
    keys = keys_for_restore(h, keyfile, seed_file)
    with open_kb_files(keys, h, from_) as files:
        for w in files.warnings:
            err.print(f"[yellow]warning:[/] {w}")
        try:
            yield files
        finally:  # a name several snapshots share: which one was read (as `vaultfs ls` says)
            for note in files.notes:
                err.print(f"[yellow]note:[/] {note}", highlight=False)


def _when(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO date or time", param_hint=flag) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@kb_app.command("snapshot")
def snapshot_cmd(
    dsn: DsnOpt = None,
    name: Annotated[str | None, typer.Option(help="A label for the snapshot.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot the belief graph (one consistent read) into kb/ of a new vault snapshot.

    Uploads like `backup`; the kb root and row counts are in --json."""
    if name is not None:
        names.check_snapshot_name(name)
    # the export starts first: Postgres renders while the key is unlocked and the vault opens
    with (
        snapshot_mod.Export(database(dsn, home_dir(home))) as export,
        open_vault(home) as v,
    ):
        res = snapshot_mod.snapshot(v, export, name, upload=True)
        info = {
            "snapshot": res.uid,
            "bytes": res.bytes,
            "seconds": round(res.seconds, 3),
            "kb": res.manifest.summary(),
        }
        code = report_flush(v, as_json, info)
    if not as_json:
        t = res.manifest.tables
        out.print(
            f"kb snapshot {res.uid}: {t['beliefs']['rows']:,} beliefs, "
            f"{t['belief_edges']['rows']:,} edges, {t['sources']['rows']:,} sources "
            f"({res.bytes:,} bytes) in {res.seconds:.1f}s; root {res.manifest.root[:16]}…"
        )
    raise typer.Exit(code)


@kb_app.command("restore")
def restore_cmd(
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, name or 'latest'.")],
    dsn: Annotated[str, typer.Option("--dsn", help="The database to restore into.")],
    replace: Annotated[bool, typer.Option(help="Overwrite rows whose id already exists.")] = False,
    strict: Annotated[
        bool, typer.Option(help="Fail (restore nothing) instead of quarantining edges.")
    ] = False,
    belief: Annotated[
        str | None, typer.Option(help="Only the beliefs within --depth edges of this one.")
    ] = None,
    depth: Annotated[int, typer.Option(help="Edges from --belief (either direction).")] = 1,
    domain: Annotated[str | None, typer.Option(help="Only beliefs in this domain.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only beliefs created at or after (ISO time, UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Only beliefs created before (ISO time, UTC).")
    ] = None,
    from_: FromOpt = None,
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a knowledge-base snapshot, or part of it, into Postgres.

    Edges whose ends are missing go to belief_edges_quarantine and are reported."""
    if depth < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--depth")
    sel = restore_mod.Selection(
        belief, depth, domain, _when(since, "--since"), _when(until, "--until")
    )
    with _files(home, from_, keyfile, seed_file) as files:
        rep = restore_mod.restore(files, snapshot, dsn, sel, replace, strict)
    if as_json:
        print_json(rep.as_json())
        return
    for i, r in rep.quarantined:
        err.print(f"[yellow]quarantined edge {i}:[/] {r}", highlight=False)
    for i in rep.cleared_superseded_by:
        err.print(f"[yellow]belief {i}:[/] superseded_by cleared (that belief was not restored)")
    out.print(
        f"restored kb snapshot {rep.snapshot}: {rep.beliefs:,} beliefs, {rep.edges:,} edges, "
        f"{rep.sources:,} sources in {rep.seconds:.1f}s; {len(rep.quarantined)} edge(s) "
        f"quarantined in belief_edges_quarantine; {rep.orphans_after} orphan edge(s)"
    )


@kb_app.command("show")
def show_cmd(
    belief_id: Annotated[str, typer.Argument(metavar="ID", help="The belief's id.")],
    snapshot: Annotated[str, typer.Option(help="Snapshot id, name or 'latest'.")] = "latest",
    from_: FromOpt = None,
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One belief as a snapshot holds it, with its edges out and in.

    Fetches only the belief's bucket files, not the whole snapshot."""
    with _files(home, from_, keyfile, seed_file) as files:
        doc = history_mod.show(files, belief_id, snapshot)
    if as_json:
        print_json(doc)
        return
    out.print(json.dumps(doc, indent=2, ensure_ascii=False), highlight=False, markup=False)


@kb_app.command("history")
def history_cmd(
    belief_id: Annotated[str, typer.Argument(metavar="ID", help="The belief's id.")],
    from_: FromOpt = None,
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """How a belief, its confidence and its edges changed across the snapshots."""
    with _files(home, from_, keyfile, seed_file) as files:
        h = history_mod.history(files, belief_id)
    if as_json:
        print_json(h)
        return
    for step in h["snapshots"]:
        s = step["snapshot"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"]))
        label = f"{s['id']}{' (' + s['name'] + ')' if s['name'] else ''}"
        line = f"{when}  {label}: {step['state']}"
        if step.get("changes") and step["state"] == "changed":
            line += "; " + ", ".join(
                f"{k} {json.dumps(a)[:40]} -> {json.dumps(b)[:40]}"
                for k, (a, b) in step["changes"].items()
            )
        if step["state"] in ("changed", "added"):
            add = sum(len(v) for v in step["edges_added"].values())
            rem = sum(len(v) for v in step["edges_removed"].values())
            if add or rem:
                line += f"; edges +{add} -{rem}"
        out.print(line, highlight=False, markup=False)


@kb_app.command("diff")
def diff_cmd(
    old: Annotated[str, typer.Argument(metavar="S1", help="The older snapshot.")],
    new: Annotated[str, typer.Argument(metavar="S2", help="The newer snapshot.")],
    from_: FromOpt = None,
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Beliefs and edges added, changed and removed between two snapshots."""
    with _files(home, from_, keyfile, seed_file) as files:
        d = history_mod.diff(files, old, new)
    if as_json:
        print_json(d)
        return
    out.print(f"{d['from']['id']} -> {d['to']['id']}", highlight=False)
    for table in ("beliefs", "belief_edges"):
        c = d["counts"][table]
        out.print(f"{table}: +{c['added']} ~{c['changed']} -{c['removed']}", highlight=False)
        for i in d[table]["added"]:
            out.print(f"  + {i}", highlight=False)
        for i, fields in d[table]["changed"].items():
            out.print(f"  ~ {i} ({', '.join(fields)})", highlight=False)
        for i in d[table]["removed"]:
            out.print(f"  - {i}", highlight=False)


register_migrate(kb_app)  # `kb migrate` (cli/migrate_cmd.py), listed last
