"""`vaultfs wal push|fetch`: Postgres's archive_command and restore_command, continuous
archiving of a primary's WAL into a vault (vaultfs/wal.py; docs/operations.md, "Continuous
archiving of Postgres (WAL)").

Exit codes: push 0 once the file is committed and on at least k remotes (also for a retry of
a file archived with the same bytes), 3 when committed but not yet on k remotes (Postgres
keeps the file and retries), 12 when the name is archived with other bytes, 17 when another
vaultfs process holds the vault (Postgres retries); fetch 0 once the file is written, 18 when
the vault holds no such file (the end of the archive, for Postgres).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import HomeOpt, app, open_vault, report_flush
from vaultfs import wal

wal_app = typer.Typer(help="Continuous archiving of Postgres WAL (archive/restore_command).")
app.add_typer(wal_app, name="wal")


@wal_app.command("push")
def push(
    path: Annotated[Path, typer.Argument(help="The WAL file (%p).")],
    name: Annotated[str, typer.Argument(help="Its name (%f).")],
    home: HomeOpt = None,
) -> None:
    """archive_command: `vaultfs wal push %p %f`. Exits 0 only once the file is durable in
    the home and placed on at least k remotes."""
    wal.check(name)
    with open_vault(home) as v:
        wal.push(v, path, name)
        code = report_flush(v, as_json=False, quorum=True)
    raise typer.Exit(code)


@wal_app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="The WAL file's name (%f).")],
    path: Annotated[Path, typer.Argument(help="Where to write it (%p).")],
    home: HomeOpt = None,
) -> None:
    """restore_command: `vaultfs wal fetch %f %p`. Exits 18 when the vault holds no such file
    (for Postgres, the end of the archive)."""
    wal.check(name)
    with open_vault(home, lock=False) as v:
        wal.fetch(v, name, path)
