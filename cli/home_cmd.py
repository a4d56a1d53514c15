"""`vaultfs home …`: the vault's local state directory. `home rebuild` makes it again from
any k remotes and the key after the machine holding it was lost (vaultfs/rebuild.py).

Exit codes: vaultfs/errors.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    IKnowOpt,
    JsonOpt,
    KeyfileOpt,
    MinSeqOpt,
    ReceiptOpt,
    SeedOpt,
    app,
    err,
    home_dir,
    keys_for_restore,
    new_passphrase,
    out,
    print_json,
    rollback_floor,
)
from vaultfs.backends import open_backend
from vaultfs.errors import InputError
from vaultfs.rebuild import rebuild_home
from vaultfs.remotes import Remote, absolute, check_distinct

home_app = typer.Typer(help="The vault's local state directory (its home).")
app.add_typer(home_app, name="home")


@home_app.command("rebuild")
def home_rebuild(
    from_: Annotated[
        list[str],
        typer.Option("--from", help="A remote of the vault, by any spec (repeat; any k)."),
    ],
    keyfile: KeyfileOpt = None,
    seed_file: SeedOpt = None,
    min_seq: MinSeqOpt = 0,
    receipt: ReceiptOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    i_know: IKnowOpt = False,
) -> None:
    """Make this machine's home of an existing vault from any k of its remotes and the key,
    after the machine that held it was lost: the index from the newest signed manifest, the
    keyfile (the given one copied, or from --seed-file a new one under a new passphrase), an
    empty upload queue. Each given remote is recognised by the objects it holds and keeps the
    spec given here (give every remote this machine reaches); the vault's other remotes keep
    their old specs (one gone for good: `vaultfs remote replace`). The home must be absent or
    empty. Refused (exit 12, nothing written) when the remotes' newest manifest is below
    --min-seq or hides --receipt's, or when one of the vault's other remotes that this machine
    reaches holds a newer manifest: rebuild from remotes including it. Backup, snapshot,
    verify, mount and restore then carry on from it."""
    if not from_:
        raise InputError("give the vault's remotes with --from (any k of them)")
    check_distinct(from_, read_with="--from")  # one remote given twice counts once
    h = home_dir(home)
    keys = keys_for_restore(h, keyfile, seed_file)
    # from a seed: the new keyfile's passphrase, asked before anything is fetched
    pw = new_passphrase(i_know) if keyfile is None else None
    min_seq, anchor = rollback_floor(min_seq, receipt, keys)
    given = [open_backend(absolute(s)) for s in from_]
    rep = rebuild_home(h, keys, given, pw, keyfile, min_seq=min_seq, anchor=anchor)
    # remotes by label, as every command shows them: a spec may hold a secret
    matched = {Remote(new).label: Remote(old).label for new, old in rep.matched.items()}
    kept = [Remote(s).label for s in rep.kept]
    if as_json:
        print_json(
            {
                "home": str(rep.home),
                # the manifest as every output names it (its hash: BLAKE3 of the object),
                # and its object on the remotes (whose name ends in a random part, no hash)
                **rep.link.as_json(),
                "object": f"manifests/{rep.manifest}",
                "snapshots": rep.snapshots,
                "matched": matched,
                "kept": kept,
                "warnings": rep.warnings,
            }
        )
        return
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    out.print(
        f"rebuilt the home at {rep.home} from manifest {rep.link.short} ({rep.snapshots} snapshot(s))",
        highlight=False,
    )
    for new, old in rep.matched.items():
        was = "same spec as before" if new == old else f"known before as {Remote(old).label}"
        out.print(f"  {Remote(new).label}: {was}", highlight=False)
    if kept:
        out.print(
            f"  not given, kept under their old specs: {', '.join(kept)} (`vaultfs verify` "
            "says whether this machine reaches them; one gone for good is rebuilt onto a new "
            "empty remote by `vaultfs remote replace OLD NEW`)",
            highlight=False,
        )
