"""The `valence` console script: the knowledge base specification's verbs, each mapped onto
the vaultfs commands (the table is in docs/valence.md).

    valence backup config --add-backend b2 --bucket B --key-id ID --key KEY
    valence backup run | verify | restore --from b2 --to DIR
    valence keys init | split --shares 5 --threshold 3 | recover
    valence graph show ID | add-edge A B --type supports | path A B

`keys` and `graph` are the vaultfs command groups themselves; `backup verify` is
`vaultfs verify`; the rest is here. Options and exit codes are vaultfs's (vaultfs/errors.py).
Secrets given to `backup config` are never printed: every message shows a remote's label.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import audit, graph_cmd, keys
from cli import main as vaultfs_cli
from cli import restore as restore_cmd
from cli.common import (
    HomeOpt,
    JsonOpt,
    KeyfileOpt,
    SeedOpt,
    err,
    home_dir,
    open_vault,
    out,
    passphrase,
    print_json,
    redundancy_warnings,
    report_flush,
)
from vaultfs import erasure
from vaultfs import repair as repair_mod
from vaultfs import valence as settings_mod
from vaultfs.backup import backup_paths
from vaultfs.errors import InputError
from vaultfs.kb.db import redact_dsn
from vaultfs.remotes import Remote
from vaultfs.scratch import owned_scratch
from vaultfs.vault import Vault

app = typer.Typer(
    name="valence",
    help="The knowledge base's backup, key and graph verbs, over vaultfs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
backup_app = typer.Typer(
    help="Configure, run, verify and restore the knowledge base's backup.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(graph_cmd.graph_app, name="graph")
backup_app.command("verify")(audit.verify)

SNAPSHOT_NAME = "valence"


@backup_app.command("config")
def config(
    add_backend: Annotated[
        str | None,
        typer.Option(
            "--add-backend",
            help=f"Add a backend: {', '.join(settings_mod.BACKENDS)} (the first one creates the vault).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The backend's name (default: its type).")
    ] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="b2/s3 bucket.")] = None,
    path: Annotated[str | None, typer.Option("--path", help="b2/s3 folder in the bucket.")] = None,
    key_id: Annotated[
        str | None, typer.Option("--key-id", help="b2 key id / s3 access key id.")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="b2 application key / s3 secret key (omit it to be asked, or set "
            "$VALENCE_BACKEND_KEY, and keep it out of your shell history).",
        ),
    ] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="s3 endpoint URL.")] = None,
    provider: Annotated[str, typer.Option("--provider", help="s3 provider (rclone's name).")] = (
        "Other"
    ),
    region: Annotated[str | None, typer.Option("--region", help="s3 region.")] = None,
    dir_: Annotated[Path | None, typer.Option("--dir", help="local backend directory.")] = None,
    spec: Annotated[str | None, typer.Option("--spec", help="rclone backend: any spec.")] = None,
    profile: Annotated[
        str, typer.Option(help="Erasure profile of a new vault (personal, federation, paranoid).")
    ] = "personal",
    source: Annotated[
        list[Path] | None,
        typer.Option("--source", help="A path `backup run` backs up (repeat; replaces the list)."),
    ] = None,
    dsn: Annotated[
        str | None,
        typer.Option("--dsn", help="A database `backup run` pg_dumps (no password; '' clears)."),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a backend, set what `backup run` backs up, or (no option) show the settings.

    A backend becomes an rclone remote of the vault (the first one creates the vault and its
    master key); its secrets are never printed."""
    h = home_dir(home)
    settings = settings_mod.Settings.load(h)
    if source is not None:  # every check before the vault changes
        settings.sources = [str(p.expanduser().resolve()) for p in source]
        for p in settings.sources:
            if not os.path.lexists(p):
                raise InputError(f"{p}: no such file or directory")
    if dsn is not None:
        settings.dsn = settings_mod.check_dsn(dsn) if dsn else None
    added = None
    if add_backend is not None:
        kind = add_backend.lower()
        if kind in ("b2", "s3") and not key:
            key = os.environ.get("VALENCE_BACKEND_KEY") or (
                typer.prompt("Backend key", hide_input=True) if sys.stdin.isatty() else None
            )
        remote_spec = settings_mod.backend_spec(
            kind, bucket=bucket, path=path, key_id=key_id, key=key, endpoint=endpoint,
            provider=provider, region=region, dir=dir_, spec=spec,
        )  # fmt: skip
        bname = name or kind
        if bname in settings.backends:
            raise InputError(f"a backend named {bname!r} exists: choose another --name")
        added = _add_remote(h, remote_spec, bname, profile)
        settings.backends[bname] = Remote(remote_spec).label
        if kind in ("b2", "s3", "rclone"):
            os.chmod(h, 0o700)  # the index now holds credentials: the home is the owner's only
    if added or source is not None or dsn is not None:
        h.mkdir(parents=True, exist_ok=True)
        settings.save(h)
    doc = {
        "home": str(h),
        "added": added,
        "backends": settings.backends,
        "sources": settings.sources,
        "dsn": redact_dsn(settings.dsn) if settings.dsn else None,
    }
    if as_json:
        print_json(doc)
        return
    if added:
        verb = "created the vault over" if added["created"] else "added"
        out.print(f"{verb} backend {added['name']}: {added['remote']}", highlight=False)
        if added["created"]:
            out.print(
                f"  vault {added['fingerprint']}: keep a copy of {h / 'key.json'} and your "
                "passphrase elsewhere, or make recovery shares with `valence keys split`.",
                highlight=False,
            )
        for w in added["warnings"]:
            err.print(f"[yellow]warning: {w}[/]")
    for bname, label in settings.backends.items():
        out.print(f"backend {bname}: {label}", highlight=False)
    out.print(f"sources: {', '.join(settings.sources) or '(none)'}", highlight=False)
    out.print(f"database: {doc['dsn'] or '(none)'}", highlight=False)


def _add_remote(home: Path, spec: str, name: str, profile: str) -> dict:
    """`vaultfs init --remote SPEC` when ``home`` holds no vault yet (this generates the
    master key), else `vaultfs remote add SPEC --domain NAME`."""
    if not (home / "index.db").exists():
        if profile not in erasure.PROFILES:
            raise InputError(
                f"unknown profile {profile!r}: choose from {', '.join(erasure.PROFILES)}"
            )
        k, n = erasure.PROFILES[profile]
        with Vault.create(home, [spec], k, n, passphrase(confirm=True)) as v:
            st = v.status()
        return {
            "name": name,
            "remote": Remote(spec).label,
            "created": True,
            "fingerprint": st["fingerprint"],
            "warnings": _spread(st),
        }
    with open_vault(home) as v:
        info = repair_mod.add_remote(v, spec, name)
        st = v.status()
    return {
        "name": name,
        "remote": info["remote"],
        "created": False,
        "errors": info["errors"],
        "warnings": _spread(st),
    }


def _spread(status: dict) -> list[str]:
    """The vault's redundancy warnings (cli.common.redundancy_warnings) from its status."""
    return redundancy_warnings(
        len(status["remotes"]), status["k"], status["n"], status["survives_losses_design"],
        "`valence backup config --add-backend`",
    )  # fmt: skip


@backup_app.command("run")
def run(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """One pass of the configured backup, as one snapshot named `valence`.

    The snapshot holds the configured sources and a pg_dump of the configured database
    (valence-postgres.sql); then everything is uploaded."""
    h = home_dir(home)
    settings = settings_mod.Settings.load(h)
    if not settings.sources and not settings.dsn:
        raise InputError(
            "nothing to back up: `valence backup config --source PATH` and/or `--dsn DSN` first"
        )
    with open_vault(home) as v:
        with owned_scratch("valence-", str(h)) as tmp:
            paths = [Path(p) for p in settings.sources]
            dumped = None
            if settings.dsn:
                dump = Path(tmp) / settings_mod.DUMP_NAME
                dumped = settings_mod.dump_database(settings.dsn, dump)
                paths.append(dump)
            uid, count, size = backup_paths(v, paths, SNAPSHOT_NAME, upload=True)
        info = {"snapshot": uid, "entries": count, "bytes": size, "database_dump_bytes": dumped}
        code = report_flush(v, as_json, info)
    if not as_json:
        out.print(f"snapshot {uid}: {count} entries, {size:,} bytes", highlight=False)
    raise typer.Exit(code)


@backup_app.command("restore")
def restore(
    to: Annotated[Path, typer.Option("--to", help="Target directory (created if missing).")],
    from_: Annotated[
        list[str] | None,
        typer.Option(
            "--from", help="A backend name from `backup config`, or an rclone spec (repeat)."
        ),
    ] = None,
    snapshot: Annotated[str, typer.Option(help="Snapshot id, name or 'latest'.")] = "latest",
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    force: Annotated[bool, typer.Option(help="Restore into a non-empty directory.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore the latest snapshot (vaultfs restore), --from backend names or specs."""
    specs = settings_mod.resolve_backends(home_dir(home), from_) if from_ else None
    restore_cmd.restore(
        to=to, from_=specs, snapshot=snapshot, include=None, keyfile=keyfile,
        seed_file=seed_file, force=force, home=home, as_json=as_json,
    )  # fmt: skip


def main() -> None:
    """Console entry point; errors as `vaultfs` reports them (one sentence, an exit code)."""
    from cli import early

    early.start(sys.argv)
    vaultfs_cli.run(app)


if __name__ == "__main__":
    main()
