"""A strategy's tiers as vaults: made from one master seed, run when due, reported.

Every tier that is not the live database is an ordinary vault (format version 2) in its own
home, ``<home>/tiers/<name>/``, over the tier's backends with its k-of-n, made on first use
(:func:`ensure`; `vaultfs strategy apply` or the first `vaultfs run`). Its master seed is
``keys.tier_seed(master, name)``, the master seed being the one in ``<home>/key.json``: one
keyfile and one Shamir split of it recover every tier (docs/keys.md). The tier's own keyfile
(written when it is made, under the same passphrase) is a convenience; opening goes through
the derived keys.

:func:`run` makes one pass: for every due tier (``frequency`` has passed since its last
success; a tier that failed is due again at the next pass) it takes one snapshot of the
sources (a ``pg`` source is dumped by pg_dump into a staging directory first, once per pass,
so every tier of the pass holds the same consistent dump), places it on the remotes, applies
the tier's retention (forget, then prune; an ``immutable`` tier skips it: it is freed whole, with
separate credentials, docs/operations.md), and audits a sample of every remote. What a tier
did is recorded in ``<tier home>/tier.json`` (replaced atomically), which :func:`report`
reads without a key. Time is :func:`vaultfs.clock.now`.

The Python API for other commands (drills): :func:`master_keys`, :func:`tier_keys`,
:func:`ensure`, :func:`differences`, :func:`open_tier`, :func:`run`, :func:`report`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from . import clock, keys, routine
from .errors import InputError, NoVault, RemoteHoldsVault, VaultBusy, VaultError
from .index import remotes as remote_table
from .index import snapshots as snapshot_table
from .index import stored_coding
from .keys import VaultKeys, read_keyfile
from .strategy import Source, Strategy, Tier
from .vault import Vault

log = logging.getLogger("vaultfs.tiers")

STATE_FILE = "tier.json"
#: Held (flock) by the one pass over a strategy home's tiers.
LOCK_FILE = "run.lock"
#: Staging directory of one pass's database dumps, under the strategy home.
STAGING = "staging"
#: The sampled audit after a tier's snapshot: percent of each remote's blocks, time budget.
AUDIT_SAMPLE = 1.0
AUDIT_BUDGET = 600.0


def master_keys(home: Path, passphrase: str) -> VaultKeys:
    """The master keys of the strategy home ``home`` (its ``key.json``). NoVault when there is
    none (`vaultfs strategy apply` makes one, or `vaultfs keys recover` from shares)."""
    kf = home / "key.json"
    if not kf.exists():
        raise NoVault(
            f"no master key at {kf}: `vaultfs strategy apply` makes one, `vaultfs keys recover "
            "--home HOME` restores it from shares"
        )
    return read_keyfile(kf, passphrase)


def tier_keys(master: VaultKeys, tier: Tier) -> VaultKeys:
    """The keys of ``tier``'s vault, derived from the master seed (keys.tier_seed)."""
    return VaultKeys.from_seed(keys.tier_seed(master.seed, tier.name))


def ensure(tier: Tier, master: VaultKeys, passphrase: str) -> bool:
    """Make ``tier``'s vault unless its home holds it already; True when made now. The
    existing one must be the tier's (NoVault otherwise). Idempotent; the live tier has none."""
    if tier.live:
        return False
    if (tier.home / "index.db").exists():
        with Vault.open(tier.home, keys=tier_keys(master, tier), lock=False):
            return False
    if (tier.home / "key.json").exists():
        raise NoVault(
            f"tier {tier.name}'s home {tier.home} holds a keyfile but no index: its creation was "
            f"interrupted (delete {tier.home} and run again) or the index was lost (`vaultfs "
            f"home rebuild --home {tier.home} --from REMOTE`)"
        )
    k, n = tier.k, tier.n
    seed = keys.tier_seed(master.seed, tier.name)
    try:
        with Vault.create(
            tier.home, list(tier.backends), k, n, passphrase, seed=seed, immutable=tier.immutable
        ):
            return True
    except RemoteHoldsVault as e:  # most likely this tier's own vault, its home lost
        raise RemoteHoldsVault(
            f"tier {tier.name}'s home {tier.home} is gone but {e.spec} already holds a vault: "
            f"if it is the tier's, rebuild its home from the remotes: `vaultfs strategy seed "
            f"{tier.name} --out SEED` then `vaultfs home rebuild --home {tier.home} --from "
            f"{e.spec} --seed-file SEED` (and delete SEED); else give the tier an empty location",
            e.spec,
        ) from None


def made_coding(tier: Tier) -> tuple[int, int, list[str]] | None:
    """(k, n, active remote specs) of ``tier``'s made vault as its index records them, read
    without a key; None before it is made (or for the live tier)."""
    return None if tier.live else stored_coding(tier.home / "index.db")


def differences(tier: Tier, master: VaultKeys) -> list[str]:
    """How ``tier``'s existing vault differs from the strategy file, one sentence each that
    ends with the command making them agree: backends the vault does not use or uses beyond
    the file, another k-of-n. The file never changes a made vault, and a vault's k-of-n is
    fixed when it is made (no re-coding of stored segments), so for another k-of-n the file
    is what must change (or a new tier on empty locations)."""
    with open_tier(tier, master, lock=False) as v:
        have = [spec for _rid, spec in remote_table.active(v.index)]
        k, n = v.k, v.n
    h = tier.home
    out = [
        f"{b} is in the file, not a remote of the vault: `vaultfs remote add --home {h} {b}`"
        for b in tier.backends
        if b not in have
    ]
    out += [
        f"{r} is a remote of the vault, not in the file: add it to {tier.name}'s backends, or "
        f"`vaultfs remote remove --home {h} {r}`"
        for r in have
        if r not in tier.backends
    ]
    if (k, n) != (tier.k, tier.n):
        more = f" and list at least {n} backends" if n > len(tier.backends) else ""
        out.append(
            f"the vault is {k}-of-{n}, the file says {tier.k}_of_{tier.n}: a vault's k-of-n is "
            f"fixed when it is made, so set `erasure_coding: {k}_of_{n}` in the file{more} (N "
            "may be fewer than the backends), or put the coding you want in a new tier over "
            "empty locations"
        )
    return out


@contextlib.contextmanager
def open_tier(tier: Tier, master: VaultKeys, lock: bool = True) -> Iterator[Vault]:
    """``tier``'s vault, open (with its lock if ``lock``) for the ``with`` block. NoVault
    before it was made (:func:`ensure`)."""
    with Vault.open(tier.home, keys=tier_keys(master, tier), lock=lock) as v:
        yield v


# -- state -------------------------------------------------------------------------------------
def load_state(tier: Tier) -> dict:
    """What ``tier``'s runs did: last_run, last_success, last_error, last_snapshot
    (time of the newest fully placed snapshot), survives_losses_now, result."""
    try:
        data = json.loads((tier.home / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {tier.home / STATE_FILE}: {e}; fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _save_state(tier: Tier, state: dict) -> None:
    path = tier.home / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def next_due(tier: Tier, state: dict) -> float | None:
    """When ``tier`` is next due (0: now, it never succeeded); None for the live tier."""
    if tier.live:
        return None
    last = state.get("last_success")
    if last is None or state.get("last_error"):
        return 0.0
    return last + tier.frequency


# -- sources -----------------------------------------------------------------------------------
def _dump(src: Source, dest: Path) -> Path:
    """pg_dump ``src`` (plain SQL: chunks deduplicate across days) into ``dest``."""
    from psycopg.conninfo import conninfo_to_dict

    dbname = str(conninfo_to_dict(src.value).get("dbname") or "")  # checked by strategy.py
    name = re.sub(r"[^\w.-]", "_", dbname)
    out = dest / f"pg-{name or 'db'}.sql"
    try:
        res = subprocess.run(
            [src.pg_dump, "--format=plain", "--no-password", f"--file={out}", src.value],
            capture_output=True,
            text=True,
        )
    except OSError as e:
        raise InputError(f"cannot run {src.pg_dump}: {e.strerror}") from None
    if res.returncode != 0:
        raise InputError(f"pg_dump failed ({res.returncode}): {res.stderr.strip()[:300]}")
    return out


def _stage(strategy: Strategy) -> list[Path]:
    """The paths one snapshot of the sources backs up: directories as they are, databases
    dumped into ``<home>/staging/`` (emptied first: a crashed pass's dump is stale)."""
    staging = strategy.home / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    paths = []
    for src in strategy.sources:
        if src.kind == "path":
            paths.append(Path(src.value))
        else:
            staging.mkdir(parents=True, exist_ok=True)
            paths.append(_dump(src, staging))
    return paths


# -- a pass ------------------------------------------------------------------------------------
def _run_tier(tier: Tier, master: VaultKeys, paths: list[Path], now: float) -> dict:
    """Snapshot, place, retention, audit for one tier; its report. Raises on failure."""
    from . import prune, verify
    from .backup import backup_paths

    result: dict = {}
    with open_tier(tier, master) as v:
        name = time.strftime(f"{tier.name}-%Y-%m-%d-%H%M%S", time.localtime(now))
        uid, count, size = backup_paths(v, paths, name, upload=True)
        rep = v.flush()
        result["snapshot"] = {"id": uid, "name": name, "entries": count, "bytes": size,
                              "complete": rep.complete}  # fmt: skip
        if tier.retention is not None and tier.immutable:
            result["retention"] = (
                "skipped: an immutable tier is freed whole, with separate credentials"
            )
        elif tier.retention is not None:
            d = routine.forget(tier.home, v, tier.retention, dry_run=False, mounted=False, now=now)
            result["forgot"] = [s.id for s in d.forget]
            result["kept"] = len(d.keep)
            if d.forget:
                result["pruned_bytes"] = prune.prune(v).as_dict()["bytes_freed"]
                v.flush()
        audit = verify.audit(v, None, mode="sample", sample=AUDIT_SAMPLE,
                             max_duration=AUDIT_BUDGET).to_dict()  # fmt: skip
        bad = [r["remote"] for r in audit["remotes"]
               if r["missing"] or r["corrupt"] or r["stale"] or r["foreign"]]  # fmt: skip
        result["audit"] = {"clean": audit["clean"], "complete": audit["complete"], "bad": bad}
        st = v.status()
        result["survives_losses_now"] = st["survives_losses_now"]
        placed = snapshot_table.newest_placed(v.index)
        result["last_snapshot"] = placed[1] if placed else None
        if not rep.complete:
            behind = ", ".join(r for r, c in rep.pending.items() if c) or "manifests pending"
            raise _Partial(f"placed locally, remotes behind: {behind}", result)
        if bad:
            raise _Partial(f"the audit found damage on {', '.join(bad)}", result)
    return result


class _Partial(VaultError):
    """A tier's pass did its work but must be reported failed (with what it did)."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


def run(
    strategy: Strategy,
    master: VaultKeys | None,
    passphrase: str | None,
    only: str | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> dict:
    """One pass over the tiers (``only``: that tier alone, due or not): each due tier is made
    if missing, then snapshot → place → retention → audit. ``dry_run`` opens nothing and
    needs no key (``master`` and ``passphrase`` may be None): it reports what is due.
    Returns {"time", "tiers": {name: {"due", "ran"|"skipped"|"failed", ...}}}; a tier's
    failure is reported, never raised, and the other tiers still run."""
    now = clock.now() if now is None else now
    tiers = [strategy.tier(only)] if only else list(strategy.tiers.values())
    out: dict = {"time": now, "dry_run": dry_run, "tiers": {}}
    due = []
    for t in tiers:
        state = load_state(t)
        nxt = next_due(t, state)
        if t.live:
            out["tiers"][t.name] = {"skipped": "the live database (docs/operations.md, Tiers)"}
        elif nxt is not None and (nxt <= now or only):
            due.append(t)
            out["tiers"][t.name] = {"due": True, "exists": (t.home / "index.db").exists()}
        else:
            out["tiers"][t.name] = {"due": False, "next_due": nxt}
    if dry_run or not due:
        return out
    assert master is not None and passphrase is not None
    with _pass_lock(strategy.home):
        _run_due(strategy, master, passphrase, due, now, out)
    return out


@contextlib.contextmanager
def _pass_lock(home: Path) -> Iterator[None]:
    """One pass at a time per strategy home: they share the staging directory."""
    with open(home / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaultBusy(
                f"another `vaultfs run` is working on the tiers of {home}; let it finish"
            ) from None
        yield


def _run_due(
    strategy: Strategy, master: VaultKeys, passphrase: str, due: list[Tier], now: float, out: dict
) -> None:
    try:
        paths = _stage(strategy)
    except VaultError as e:
        for t in due:
            if t.home.exists():
                _record(t, now, e.message, {})
            out["tiers"][t.name] |= {"failed": e.message}
        return
    try:
        for t in due:
            rec = out["tiers"][t.name]
            try:
                ensure(t, master, passphrase)
                rec["ran"] = _run_tier(t, master, paths, now)
                _record(t, now, None, rec["ran"])
            except _Partial as e:
                rec |= {"ran": e.result, "failed": e.message}
                _record(t, now, e.message, e.result)
            except Exception as e:  # a tier's failure is reported, never fatal to the pass
                log.debug("tier %s failed:\n%s", t.name, traceback.format_exc())
                rec["failed"] = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                if t.home.exists():
                    _record(t, now, rec["failed"], {})
    finally:
        shutil.rmtree(strategy.home / STAGING, ignore_errors=True)


def _record(tier: Tier, now: float, error: str | None, result: dict) -> None:
    state = load_state(tier)
    state["last_run"] = now
    state["last_error"] = error
    if error is None:
        state["last_success"] = now
    for key in ("last_snapshot", "survives_losses_now"):
        if result.get(key) is not None:
            state[key] = result[key]
    state["result"] = result
    _save_state(tier, state)


def report(strategy: Strategy, now: float | None = None) -> list[dict]:
    """For `status --strategy` (no key needed): per tier the file's coding and, once made,
    what its vault really has (``vault``: k, n, remotes, whether that agrees with the file),
    last run and success, last error, next due, RPO (age of the newest snapshot on the
    remotes, as of the last run) and redundancy (remote losses survivable by design, the
    vault's when made, and as of the last run)."""
    now = clock.now() if now is None else now
    rows = []
    for t in strategy.tiers.values():
        state = load_state(t)
        nxt = next_due(t, state)
        last = state.get("last_snapshot")
        made = made_coding(t)
        vault = None
        if made is not None:
            k, n, specs = made
            vault = {"k": k, "n": n, "remotes": specs,
                     "agrees": (k, n) == (t.k, t.n) and set(specs) == set(t.backends)}  # fmt: skip
        rows.append({
            "tier": t.name,
            "live": t.live,
            "coding": f"{t.k}_of_{t.n}",
            "vault": vault,
            "backends": len(t.backends),
            "frequency": t.frequency_text,
            "retention": t.retention_text,
            "immutable": t.immutable,
            "made": (t.home / "index.db").exists(),
            "last_run": state.get("last_run"),
            "last_success": state.get("last_success"),
            "last_error": state.get("last_error"),
            "next_due": None if nxt is None else max(nxt, now),
            "rpo_seconds": None if last is None else max(0.0, now - last),
            "survives_losses_design": t.survives_losses if vault is None
            else vault["n"] - vault["k"],
            "survives_losses_now": state.get("survives_losses_now"),
        })  # fmt: skip
    return rows
