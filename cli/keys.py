"""Key commands: `vaultfs keys …` (split, recover, show, passwd, rotate, init, public),
`vaultfs reencrypt --suite NAME` and `vaultfs receipt SNAPSHOT` / `vaultfs receipt verify FILE`.

Exit codes are those of vaultfs/errors.py (19: a recovery share is mistyped, missing or from
another share set; 3: re-encryption paused because remotes are behind).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    HomeOpt,
    IKnowOpt,
    JsonOpt,
    advance_segments,
    app,
    err,
    home_dir,
    new_passphrase,
    open_vault,
    out,
    passphrase,
    print_json,
    progress,
)
from cli.mounted import report_from, run_in_mount
from vaultfs import receipt as receipts
from vaultfs import rotation, shamir
from vaultfs.errors import InputError, NoVault, ShareError, WrongKey
from vaultfs.index import manifests, stored_vault_id
from vaultfs.index import remotes as remote_rows
from vaultfs.index import snapshots as snapshot_rows
from vaultfs.keys import (
    SUITES,
    VaultKeys,
    parse_seed,
    read_keyfile,
    slhdsa_field,
    suite_name,
    write_keyfile,
)
from vaultfs.remotes import Remote

keys_app = typer.Typer(
    help="Master seed, Shamir shares, passphrase, key epochs and public keys.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _keyfile_doc(home: Path, name: str = "key.json") -> dict | None:
    """The keyfile's JSON document (its public fields), or None if unreadable."""
    try:
        doc = json.loads((home / name).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600) with ``text``; never overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(f"{path} already exists: choose another --out-dir") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# -- split / recover ---------------------------------------------------------------------------
def _split(keys: VaultKeys, threshold: int, shares: int) -> tuple[list[str], list[str], int]:
    """(mnemonics, share file texts, share set id) of a new split of ``keys``' seed."""
    mnemonics = shamir.split(keys, threshold, shares)
    texts = [shamir.share_file_text(keys, m, threshold, shares) for m in mnemonics]
    return mnemonics, texts, shamir.check_share(shamir.ParsedShare("new", mnemonics[0])).identifier


@keys_app.command()
def split(
    shares: Annotated[int, typer.Option("--shares", help="Number of shares to make.")] = 5,
    threshold: Annotated[
        int, typer.Option("--threshold", help="Shares needed to recover the seed.")
    ] = 3,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Write share-I-of-N.txt files here.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Split the master seed into SLIP-39 word shares (any THRESHOLD of SHARES recover it).
    In a strategy home (a keyfile, no vault of its own) this is the master seed of every
    tier (docs/operations.md, Tiers)."""
    h = home_dir(home)
    if not (h / "index.db").exists() and (h / "key.json").exists():
        keys = read_keyfile(h / "key.json", passphrase())  # nowhere to record the split
        mnemonics, texts, set_id = _split(keys, threshold, shares)
    else:
        with open_vault(home, lock=False) as v:
            keys = v.keys
            mnemonics, texts, set_id = _split(keys, threshold, shares)
            splits = json.loads(v.index.get("shamir_splits") or "[]")
            splits.append(
                {"set": set_id, "threshold": threshold, "shares": shares, "created": time.time()}
            )
            v.index.set("shamir_splits", json.dumps(splits))
    fp = keys.fingerprint()
    files = []
    if out_dir is not None:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            p = out_dir / f"share-{i + 1}-of-{shares}.txt"
            _write_private(p, text)
            files.append(str(p))
    if as_json:
        print_json(
            {
                "fingerprint": fp,
                "set": set_id,
                "threshold": threshold,
                "shares": shares,
                "files": files,
                "mnemonics": [] if files else mnemonics,
            }
        )
        return
    if files:
        out.print(f"wrote {shares} shares of vault {fp} (any {threshold} recover it):")
        for f in files:
            out.print(f"  {f}", highlight=False)
        out.print("Hand each file to a different holder, then delete them from this machine.")
    else:
        for text in texts:
            out.print(text, highlight=False)
            out.print("-" * 72, highlight=False)
    err.print(
        "[yellow]These words ARE the vault's master seed once enough of them meet: "
        "never store two shares together.[/]"
    )


def _typed_shares(expected: str | None) -> list[shamir.ParsedShare]:
    """Prompt for shares until the set's threshold is met (each checked as it is typed)."""
    if not sys.stdin.isatty():
        raise ShareError(
            "no --share-file given and no terminal to type shares into: "
            "pass --share-file FILE for each share"
        )
    if expected:
        out.print(f"Recovering vault {expected}.")
    got: list[shamir.ParsedShare] = []
    need = None
    while need is None or len(got) < need:
        for attempt in range(5):
            text = typer.prompt(f"Share {len(got) + 1} (its words, separated by spaces)")
            p = shamir.parse_share_text(text, f"share {len(got) + 1}")
            try:
                s = shamir.check_share(p)
            except ShareError as e:
                err.print(f"[red]{e.message}[/] (try again)", highlight=False)
                if attempt == 4:
                    raise
                continue
            need = s.member_threshold
            got.append(p)
            break
    return got


@keys_app.command()
def recover(
    share_file: Annotated[
        list[Path] | None, typer.Option("--share-file", help="A share file (repeat).")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="The vault fingerprint the shares must recover.")
    ] = None,
    keyfile_out: Annotated[
        Path | None, typer.Option(help="Where to write the new keyfile (default HOME/key.json).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing keyfile.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    i_know: IKnowOpt = False,
) -> None:
    """Recover the master seed from shares and write a new passphrase-protected keyfile."""
    h = home_dir(home)
    expected = fingerprint
    expected_id = None
    doc = _keyfile_doc(h)
    if doc and not expected:
        expected = doc.get("fingerprint")
    if (stored := stored_vault_id(h / "index.db")) is not None:
        expected_id = bytes.fromhex(stored)
    parsed = []
    for f in share_file or []:
        try:
            parsed.append(shamir.parse_share_text(f.read_text(), f.name))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read share file {f}: {e}") from None
    if not parsed:
        parsed = _typed_shares(expected)
    keys = shamir.recover(parsed, expected, expected_id)
    dest = keyfile_out or h / "key.json"
    if dest.exists() and not force:
        raise InputError(f"{dest} already exists: pass --force to replace it, or --keyfile-out")
    if (there := _keyfile_doc(dest.parent, dest.name)) and there.get("fingerprint") not in (
        None,
        keys.fingerprint(),
    ):  # --force replaces this vault's keyfile (a new passphrase), never another vault's
        raise WrongKey(
            f"{dest} is the keyfile of another vault ({there['fingerprint']}), not of the "
            f"recovered one ({keys.fingerprint()}); choose another --keyfile-out"
        )
    pw = new_passphrase(i_know)
    write_keyfile(dest, keys, pw)
    if as_json:
        print_json(
            {
                "fingerprint": keys.fingerprint(),
                "vault_id": keys.vault_id.hex(),
                "keyfile": str(dest),
            }
        )
        return
    out.print(f"recovered vault {keys.fingerprint()}; wrote {dest}", highlight=False)
    out.print(
        "Next: `vaultfs restore --from REMOTE --from REMOTE … --to DIR` (any k remotes).",
        highlight=False,
    )


# -- show / passwd / rotate / init / public ----------------------------------------------------
@keys_app.command()
def show(
    reveal_seed: Annotated[
        bool,
        typer.Option("--reveal-seed", help="Also print the master seed (64 hex digits)."),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fingerprints, suites, key epochs and where the keyring copies are."""
    h = home_dir(home)
    with open_vault(home, lock=False) as v:
        pub = v.keys.public_bytes()
        seed = v.keys.seed.hex() if reveal_seed else None
        slh_field = slhdsa_field(v.keys.slhdsa_param)
        info = {
            "vault_id": v.keys.vault_id.hex(),
            "fingerprint": v.keys.fingerprint(),
            "public_keys": {
                "mldsa65_sha256": _sha256(pub["mldsa65"]),
                "ed25519": pub["ed25519"].hex(),
                slh_field: v.keys.slhdsa_public.hex() if v.keys.slhdsa_public else None,
            },
            "suites": {str(i): n for i, n in SUITES.items()},
            **rotation.status(v),
            "shamir_splits": json.loads(v.index.get("shamir_splits") or "[]"),
            "keyring_copies": _keyring_copies(v, h),
        }
    if seed:
        info["seed"] = seed
        err.print(
            "[yellow]The master seed is the whole vault: write it on paper, never store it "
            "next to the remotes' credentials. `vaultfs keys init --seed-file` and "
            "`vaultfs restore --seed-file` take it back.[/]"
        )
    if as_json:
        print_json(info)
        return
    if seed:
        out.print("master seed: " + " ".join(seed[i : i + 8] for i in range(0, 64, 8)))
    out.print(f"vault {info['fingerprint']}  (id {info['vault_id']})", highlight=False)
    out.print(f"  ML-DSA-65 public key SHA-256: {info['public_keys']['mldsa65_sha256']}")
    out.print(f"  Ed25519 public key:           {info['public_keys']['ed25519']}")
    slh = info["public_keys"][slh_field] or "none (run `vaultfs keys init`)"
    out.print(f"  SLH-DSA-{v.keys.slhdsa_param.upper()} public key: {slh}")
    out.print(f"current suite: {suite_name(info['suite'])}, epoch {info['epoch']}")
    for e in info["epochs"]:
        flags = ("current " if e["current"] else "") + ("retired" if e["retired"] else "")
        out.print(
            f"  epoch {e['epoch']}: {suite_name(e['suite'])}, {e['data_segments']} data "
            f"segment(s), since {time.strftime('%Y-%m-%d %H:%M', time.localtime(e['created']))}"
            f" {flags}",
            highlight=False,
        )
    if info["reencrypt"]:
        out.print(
            f"[yellow]re-encryption to epoch {info['reencrypt']['epoch']} unfinished: "
            f"{info['reencrypt']['remaining_segments']} segment(s) left; rerun `vaultfs reencrypt`[/]"
        )
    for s in info["shamir_splits"]:
        out.print(
            f"Shamir share set {s['set']}: {s['threshold']} of {s['shares']}, made "
            f"{time.strftime('%Y-%m-%d', time.localtime(s['created']))}",
            highlight=False,
        )
    out.print("keyring copies:")
    for c in info["keyring_copies"]:
        out.print(f"  {c['where']}: {c['what']}", highlight=False)


def _sha256(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _keyring_copies(v, home: Path) -> list[dict]:
    copies = [
        {"where": str(home / "key.json"), "what": "master seed, sealed under the passphrase"},
        {"where": str(home / "index.db"), "what": "wrapped epoch keys (epochs table)"},
    ]
    for rid, spec in remote_rows.active(v.index):
        newest = manifests.newest_placed(v.index, rid)
        copies.append(
            {
                "where": f"{Remote(spec).label}/manifests/",
                "what": f"wrapped epoch keys in every signed manifest (newest placed: #{newest})"
                if newest
                else "no manifest placed yet (run `vaultfs flush`)",
            }
        )
    return copies


@keys_app.command()
def passwd(home: HomeOpt = None, i_know: IKnowOpt = False) -> None:
    """Change the keyfile's passphrase (re-seals the seed; nothing else changes).

    The current passphrase comes from $VAULTFS_PASSPHRASE or a prompt, the new one from
    $VAULTFS_NEW_PASSPHRASE or a prompt.
    """
    h = home_dir(home)
    kf = h / "key.json"
    if not kf.exists():
        raise NoVault(f"no keyfile at {kf}: run `vaultfs keys recover` or pass --home")
    keys = read_keyfile(kf, passphrase())
    new = new_passphrase(i_know, env="VAULTFS_NEW_PASSPHRASE", label="New passphrase")
    write_keyfile(kf, keys, new)
    out.print(f"passphrase changed for vault {keys.fingerprint()} ({kf})", highlight=False)


@keys_app.command()
def rotate(
    suite: Annotated[
        str | None, typer.Option(help="Suite for the new epoch (default: the current one).")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a new key epoch: new writes use a fresh data key; old data stays readable."""
    target = rotation.parse_suite(suite) if suite else None
    if (info := run_in_mount(home, "rotate", {"suite": target})) is None:
        with open_vault(home) as v:
            epoch = rotation.rotate(v, target)
            rep = v.flush()
            info = {"epoch": epoch, "suite": v.suite, "complete": rep.complete}
            info["errors"] = rep.errors
    if as_json:
        print_json(info)
    else:
        out.print(f"new key epoch {info['epoch']} under {suite_name(info['suite'])}")
        if not info["complete"]:
            err.print("[yellow]the new keyring is not on every remote yet: run `vaultfs flush`[/]")


@keys_app.command("init")
def init_keys(
    seed_file: Annotated[
        Path | None,
        typer.Option(help="Write HOME/key.json from this master seed (64 hex digits)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing keyfile.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    i_know: IKnowOpt = False,
) -> None:
    """Complete a vault's key material: with --seed-file, write a keyfile from the master seed
    (a vault whose keyfile was lost); and create the SLH-DSA key pair a vault made by an older
    vaultfs lacks. Idempotent."""
    h = home_dir(home)
    wrote = None
    if seed_file is not None:
        try:
            keys = VaultKeys.from_seed(parse_seed(seed_file.read_text()))
        except OSError as e:
            raise InputError(f"cannot read {seed_file}: {e.strerror}") from None
        stored = stored_vault_id(h / "index.db")
        if stored and stored != keys.vault_id.hex():
            raise WrongKey(f"that seed belongs to vault id {keys.vault_id.hex()}, not {stored}")
        kf = h / "key.json"
        if kf.exists() and not force:
            raise InputError(f"{kf} already exists: pass --force to replace it")
        write_keyfile(kf, keys, new_passphrase(i_know))
        wrote = str(kf)
        if not (h / "index.db").exists():  # no local vault: the keyfile is for `restore --from`
            if as_json:
                print_json({"fingerprint": keys.fingerprint(), "keyfile": wrote})
            else:
                out.print(f"wrote {kf} for vault {keys.fingerprint()}", highlight=False)
            return
    with open_vault(home) as v:
        if created := v.complete_slhdsa():
            v.flush()
        fp = v.keys.fingerprint()
    if as_json:
        print_json({"fingerprint": fp, "slhdsa_created": created, "keyfile": wrote})
        return
    if wrote:
        out.print(f"wrote {wrote}", highlight=False)
    out.print(
        f"vault {fp}: "
        + ("SLH-DSA key created; manifests are now signed by it" if created else "keys complete")
    )
    out.print("Next: `vaultfs keys split --shares 5 --threshold 3 --out-dir DIR`.")


@keys_app.command()
def public(
    out_file: Annotated[Path | None, typer.Option("--out", help="Write to this file.")] = None,
    home: HomeOpt = None,
) -> None:
    """Print the vault's public keys (what `vaultfs receipt verify --public-key` pins)."""
    with open_vault(home, lock=False) as v:
        doc = receipts.public_document(v.keys)
    text = json.dumps(doc, indent=2) + "\n"
    if out_file:
        out_file.write_text(text)
        out.print(f"wrote public keys of vault {doc['fingerprint']} to {out_file}")
    else:
        sys.stdout.write(text)


# -- reencrypt ---------------------------------------------------------------------------------
@app.command()
def reencrypt(
    suite: Annotated[
        str, typer.Option(help="Target suite: mlkem1024, mlkem1024-p384, xwing (or its id).")
    ],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-encrypt every data segment under a new suite/epoch, then retire the old suite.

    Interruptible (Ctrl-C, kill -9) and resumable: rerun the same command.
    """
    target = rotation.parse_suite(suite)
    h = home_dir(home)
    if (
        done := run_in_mount(home, "reencrypt", {"suite": target}, "re-encrypt", as_json)
    ) is not None:
        rep = report_from(rotation.ReencryptReport, done)
    else:
        with open_vault(home) as v:
            with progress("re-encrypt", quiet=as_json) as prog:
                rep = rotation.reencrypt(
                    v, target, advance_segments(prog, v.segment_size), keyfile=h / "key.json"
                )
    if as_json:
        print_json(rep.__dict__)
        return
    out.print(
        f"re-encrypted {rep.rewritten} segment(s) to epoch {rep.epoch} under {suite_name(rep.suite)}"
    )
    for s in rep.retired:
        out.print(f"retired {suite_name(s)}: readers now refuse data under it")
    if rep.garbage_held:
        err.print(
            f"[yellow]{rep.garbage_left} replaced object(s) kept on the remotes: "
            f"{rep.garbage_held}; a later `vaultfs prune` deletes them once that is over[/]",
            highlight=False,
        )
    elif rep.garbage_left:
        err.print(
            f"[yellow]{rep.garbage_left} replaced object(s) could not be deleted from remotes "
            "yet; rerun `vaultfs reencrypt` later to remove them[/]"
        )


# -- receipts ----------------------------------------------------------------------------------
@app.command()
def receipt(
    what: Annotated[str, typer.Argument(help="SNAPSHOT (id, name, latest) or the word 'verify'.")],
    file: Annotated[Path | None, typer.Argument(help="With 'verify': the receipt file.")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the receipt here.")] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="With 'verify': pin this public-key file.")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="With 'verify': the vault fingerprint to expect.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """`receipt SNAPSHOT` prints a signed statement; `receipt verify FILE` checks one.

    Verification needs no vault and no secret: only the receipt and, to pin who signed it,
    --public-key FILE (from `vaultfs keys public`) or --fingerprint. (A snapshot named
    "verify" is addressed by its id.)
    """
    if what == "verify":
        if file is None:
            raise InputError(
                "usage: vaultfs receipt verify FILE [--public-key F | --fingerprint FP]"
            )
        doc = receipts.load_json(file, "receipt")
        pk = receipts.load_json(public_key, "public-key file") if public_key else None
        st = receipts.verify(doc, pk, fingerprint)
        if as_json:
            print_json({"valid": True, "statement": st})
            return
        out.print(
            f"valid receipt: snapshot {st['snapshot']} of vault {st['fingerprint']}, root "
            f"{st['snapshot_root']}, {st['files']} entries, {st['bytes']:,} bytes, issued "
            f"{st['issued']}; {st['redundancy']['k']}-of-{st['redundancy']['n']}, survives "
            f"{st['redundancy']['survives_losses_now']} remote loss(es)",
            highlight=False,
        )
        if pk is None and fingerprint is None:
            err.print(
                "[yellow]checked against the keys inside the receipt: compare the fingerprint "
                "with the one on your shares, or pass --public-key/--fingerprint[/]"
            )
        return
    if file is not None:
        raise InputError("`vaultfs receipt SNAPSHOT` takes one argument")
    with open_vault(home, lock=False) as v:
        doc = receipts.make(v, what)
        if note := snapshot_rows.newest_of_name(v.index, what):
            err.print(f"[yellow]note:[/] {note}", highlight=False)
    text = json.dumps(doc, indent=2) + "\n"
    if out_file:
        out_file.write_text(text)
        out.print(f"wrote receipt for snapshot {doc['statement']['snapshot']} to {out_file}")
    else:
        sys.stdout.write(text)
