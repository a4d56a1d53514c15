"""`vaultfs strategy check|show|apply|seed`: the strategy file and its tiers (vaultfs/strategy.py,
vaultfs/tiers.py). `vaultfs run --strategy`, `status --strategy` and `backup config
--add-backend` live with their commands (cli/routine.py, cli/core.py).

Exit codes: vaultfs/errors.py; an invalid strategy file exits 2 with its line and key named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    HomeOpt,
    IKnowOpt,
    JsonOpt,
    StrategyOpt,
    app,
    err,
    home_dir,
    load_strategy,
    new_passphrase,
    out,
    passphrase,
    print_json,
    print_table,
)
from vaultfs import keys, tiers
from vaultfs.errors import ConfigError, InputError
from vaultfs.strategy import Strategy, default_path
from vaultfs.strategy import check as check_file

strategy_app = typer.Typer(help="The strategy file: tiers of copies from one master seed.")
app.add_typer(strategy_app, name="strategy")

FileArg = Annotated[
    Path | None,
    typer.Argument(help="Strategy file (default: --strategy, else strategy.yaml in the home)."),
]


def _path(file: Path | None, option: Path | None) -> Path | None:
    """The strategy file given as the argument or as --strategy (not two different ones)."""
    if file and option and file != option:
        raise InputError("give the strategy file as an argument or as --strategy, not both")
    return file or option


def _load(home: Path | None, file: Path | None, option: Path | None) -> Strategy:
    return load_strategy(home, _path(file, option))


@strategy_app.command()
def check(
    file: FileArg = None,
    strategy: StrategyOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a strategy file and that this machine can run it (the `path:` sources exist,
    the `pg_dump` program is there): exit 0, else 2 with every problem, one line each naming
    the file, the line and the key."""
    h = home_dir(home)
    s, problems = check_file(_path(file, strategy) or default_path(h), h)
    if problems or s is None:
        raise ConfigError("\n".join(problems))
    if as_json:
        print_json({"valid": True, "path": str(s.path), "tiers": list(s.tiers)})
        return
    out.print(f"{s.path}: valid, {len(s.tiers)} tier(s): {', '.join(s.tiers)}", highlight=False)


@strategy_app.command()
def show(
    file: FileArg = None,
    strategy: StrategyOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the tiers as vaultfs reads them: backends, coding, frequency, retention, homes."""
    s = _load(home, file, strategy)
    if as_json:
        print_json(s.as_json())
        return
    t = Table(
        "tier", "backends", "coding", "survives", "frequency", "retention", "immutable",
        "home",
    )  # fmt: skip
    for tier in s.tiers.values():
        t.add_row(
            tier.name, "\n".join(tier.backends), "live" if tier.live else f"{tier.k}_of_{tier.n}",
            str(tier.survives_losses), tier.frequency_text, tier.retention_text or "-",
            "yes" if tier.immutable else "no", "-" if tier.live else str(tier.home),
        )  # fmt: skip
    print_table(t)
    for src in s.sources:
        out.print(f"source {src.kind}: {src.value}", highlight=False)


@strategy_app.command()
def apply(
    strategy: StrategyOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    i_know: IKnowOpt = False,
) -> None:
    """Make every tier's vault that does not exist yet, with keys derived from the home's
    master seed (made now, under a new passphrase, if the home has no key.json), and say
    where a made one differs from the file (remotes, k-of-n). Idempotent."""
    s = load_strategy(home, strategy)
    h = home_dir(home)
    made_master = not (h / "key.json").exists()
    if made_master:
        pw = new_passphrase(i_know)
        master = keys.VaultKeys.from_seed(keys.new_seed())
        keys.write_keyfile(h / "key.json", master, pw)
    else:
        pw = passphrase()
        master = tiers.master_keys(h, pw)
    vaults = [t for t in s.tiers.values() if not t.live]
    made = {t.name: tiers.ensure(t, master, pw) for t in vaults}
    differs = {t.name: d for t in vaults if (d := tiers.differences(t, master))}
    if as_json:
        print_json({"master_created": made_master, "made": made, "differs": differs})
        return
    if made_master:
        out.print(f"made a master key at {h / 'key.json'}: keep it and its passphrase safe")
    for name, new in made.items():
        out.print(f"tier {name}: {'made' if new else 'exists'}", highlight=False)
        for d in differs.get(name, []):
            err.print(f"[yellow]  {d}[/]", highlight=False)


@strategy_app.command()
def seed(
    tier: Annotated[str, typer.Argument(help="The tier.")],
    out_file: Annotated[Path, typer.Option("--out", help="File to write (mode 600).")],
    strategy: StrategyOpt = None,
    home: HomeOpt = None,
) -> None:
    """Write a tier's master seed (hex), derived from the home's master key, for
    `vaultfs restore --from … --seed-file FILE` of that tier on a machine without its home.
    Whoever holds it can read that tier (and no other): delete it after use."""
    s = load_strategy(home, strategy)
    t = s.tier(tier)
    if t.live:
        raise InputError(f"tier {tier} is the live database: it has no vault")
    master = tiers.master_keys(home_dir(home), passphrase())
    try:
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise InputError(f"cannot write {out_file}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(keys.tier_seed(master.seed, t.name).hex() + "\n")
    out.print(f"wrote tier {tier}'s seed to {out_file}", highlight=False)
