"""The five disaster drills (``vaultfs drill``): each recovers a vault the way a real disaster
would force, inside a scratch directory, and checks the result byte for byte.

Contract shared by every drill (docs/operations.md, "Disaster drills"):

- The live home is only read (its index, without the lock; its keyfile, only copied) and the
  remotes' live objects are only read (listed, fetched). What a scenario changes or destroys
  (a home, a remote, a re-encryption) happens to copies under ``scratch``: a home rebuilt
  there, remotes copied there (``scratch/remotes/``) or new empty ones made there.
- Each returns a :class:`DrillResult`: RTO (seconds from the start of the recovery to files
  restored), RPO (age of the snapshot restored), bytes and entries restored, and whether every
  restored file equals, byte for byte, what the snapshot recorded (:func:`check_identical`:
  the file's size and the keyed BLAKE3 id of each of its chunks, from the snapshot's index).
  A drill that fails says why in ``error``; it never raises a VaultError for a failed
  recovery (the caller reports and sets the exit code), only for bad input (no vault, no
  key, a scratch directory that is not empty).

:func:`run_drill` is the one entry point; it takes a home and its keys, so the strategy layer
can run it against whichever tier a scenario needs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

from . import keys as keymod
from . import rotation, shamir, verify
from .backends import Backend, open_backend
from .errors import InputError, IntegrityError, NotEnoughRemotes, TargetNotEmpty, VaultError
from .index import Index
from .index import remotes as remote_table
from .index import snapshots as snapshot_rows
from .keys import SUITE_NAMES, VaultKeys, suite_name
from .names import fs_path
from .rebuild import rebuild_home
from .repair import replace_remote
from .restore import ShardSource, open_remote_index, restore_files, too_few_remotes
from .vault import Vault
from .vault.placement import remotes_needed

SCENARIOS = ("disk", "home", "provider", "crypto", "keys")
#: Objects a drill copies from a remote: everything a reader uses (docs/format.md section 2).
REMOTE_FOLDERS = ("data", "meta", "manifests")
#: The key drill's split: any THRESHOLD of SHARES shares recover the seed (docs/keys.md).
SHARE_THRESHOLD, SHARE_COUNT = 3, 5
#: Stands in for a provider that shut down (the provider drill): a loopback port nothing
#: listens on, so every call fails as unreachable and no live remote is ever named.
DEAD_REMOTE = ":sftp,host=127.0.0.1,port=1,user=vaultfs-drill:gone-{rid}"


@dataclass
class DrillResult:
    """What one drill did. ``ok``: the recovery worked and every restored file is identical.
    ``rto``: seconds to recover; ``rpo``: age in seconds of the snapshot restored (None when
    nothing was restored); ``details``: what the scenario chose and checked (remotes dropped,
    shares used, suites, ...); ``error``: why it failed, else None."""

    scenario: str
    ok: bool = False
    rto: float | None = None
    rpo: float | None = None
    bytes: int = 0
    entries: int = 0
    snapshot: str | None = None
    seq: int | None = None
    identical: bool = False
    mismatched: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Restored:
    uid: str
    entries: int
    bytes: int
    created: float
    mismatched: list[str]


def run_drill(
    scenario: str,
    home: Path,
    keys: VaultKeys,
    scratch: Path,
    *,
    rng: random.Random | None = None,
    master: tuple[VaultKeys, str] | None = None,
) -> DrillResult:
    """Run drill ``scenario`` (one of :data:`SCENARIOS`) for the vault at ``home`` unlocked by
    ``keys``, working only under ``scratch`` (created; must be absent or empty: TargetNotEmpty
    otherwise). ``rng`` chooses the remotes dropped and the shares used (default: fresh
    randomness). ``master`` = (master keys, tier name) for a tier of a strategy: the keys
    drill then splits the master seed and derives the tier's key from the recovered one
    (keys.tier_seed). Raises InputError for an unknown scenario, NoVault when ``home`` holds no
    vault; a failed recovery is a result with ``ok`` False, not an exception."""
    if scenario not in SCENARIOS:
        raise InputError(f"unknown drill {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if scratch.exists() and any(scratch.iterdir()):
        raise TargetNotEmpty(f"the scratch directory {scratch} is not empty")
    scratch.mkdir(parents=True, exist_ok=True)
    with Vault.open(home, keys=keys, lock=False) as v:
        specs = [spec for _rid, spec in remote_table.active(v.index)]
        # any this many remotes hold k shards of every segment (n > remotes: some hold more)
        needed, _crowded = remotes_needed(len(specs), v.k, v.n)
    result = DrillResult(scenario)
    # each drill gets its own copy of the keys: a re-encryption retires suites in its copy
    fresh = VaultKeys.from_seed(keys.seed)
    fresh.retired_suites = set(keys.retired_suites)
    drill = _DRILLS[scenario]
    try:
        extra = {"master": master} if scenario == "keys" and master is not None else {}
        drill(result, home, fresh, specs, needed, scratch, rng or random.Random(), **extra)
    except VaultError as e:
        result.error = e.message
    result.ok = result.error is None and result.identical
    return result


# -- the scenarios -----------------------------------------------------------------------------
def _disk(
    res: DrillResult, home: Path, keys: VaultKeys, specs: list[str], needed: int, scratch: Path,
    rng: random.Random,
) -> None:  # fmt: skip
    """The disk died: the newest snapshot from the remotes alone, with no home."""
    t0 = time.monotonic()
    got = _restore_from_remotes(res, keys, [open_backend(s) for s in specs], scratch)
    _finish(res, got, t0)
    res.details["remotes"] = len(specs)


def _home(
    res: DrillResult, home: Path, keys: VaultKeys, specs: list[str], needed: int, scratch: Path,
    rng: random.Random,
) -> None:  # fmt: skip
    """The home is lost: a new home rebuilt from the remotes, then a restore from it."""
    t0 = time.monotonic()
    new_home = scratch / "home"
    rep = _rebuild(home, keys, [open_backend(s) for s in specs], new_home)
    res.details["rebuilt_from_seq"] = rep.seq
    res.details["rebuild_seconds"] = time.monotonic() - t0
    with Vault.open(new_home, keys=keys, lock=False) as v:
        src = ShardSource(v.remotes(), v.queue_dir)
        src.list_all()
        got = _restore(keys, v.index, src, scratch / "restored")
        res.seq = rep.seq
    _finish(res, got, t0)


def _provider(
    res: DrillResult, home: Path, keys: VaultKeys, specs: list[str], needed: int, scratch: Path,
    rng: random.Random,
) -> None:  # fmt: skip
    """Providers shut down: any ``needed`` remotes restore (k, or more when fewer remotes
    than n hold several shards each); then each lost one is replaced, in a scratch copy of
    the vault, by a new empty remote, and the copy verifies clean. A vault whose every
    remote is needed for a restore cannot lose a provider: that is a failed drill."""
    if needed >= len(specs):
        raise NotEnoughRemotes(
            f"no provider can be lost: a restore needs all {len(specs)} remote(s) of this "
            "vault (add remotes, or drill a tier spread over several providers)"
        )
    survivors = sorted(rng.sample(range(len(specs)), needed))
    dropped = [i for i in range(len(specs)) if i not in survivors]
    live = [open_backend(specs[i]) for i in survivors]
    res.details["survivors"] = [b.label for b in live]
    res.details["dropped"] = [open_backend(specs[i]).label for i in dropped]
    t0 = time.monotonic()
    got = _restore_from_remotes(res, keys, live, scratch)
    _finish(res, got, t0)
    # the replacement, on copies: the survivors copied, the dropped ones made unreachable
    copies = _copy_remotes(live, scratch / "remotes")
    t1 = time.monotonic()
    new_home = scratch / "home"
    lost = _scratch_home(home, keys, copies, new_home)
    replaced = []
    with Vault.open(new_home, keys=keys) as v:
        for n, dead in enumerate(lost.values()):
            new = scratch / "remotes" / f"new{n}"
            rep = replace_remote(v, dead, str(new))
            if rep.unrecoverable:
                raise IntegrityError(f"remote replace left {len(rep.unrecoverable)} unrecoverable")
            replaced.append(str(new))
        audit = verify.audit(v, mode="read-all")
    res.details["replaced_onto"] = replaced
    res.details["replace_seconds"] = time.monotonic() - t1
    res.details["verify_clean"] = audit.clean
    if not audit.clean:
        res.error = "after `remote replace` the scratch vault does not verify clean"


def _crypto(
    res: DrillResult, home: Path, keys: VaultKeys, specs: list[str], needed: int, scratch: Path,
    rng: random.Random,
) -> None:  # fmt: skip
    """The vault's suite is broken: a copy of the vault re-encrypted to another suite restores
    from ``needed`` of its remotes, and the old state (the live remotes) is refused under the new key
    policy."""
    live = [open_backend(s) for s in specs]
    copies = _copy_remotes(live, scratch / "remotes")
    new_home = scratch / "home"
    _scratch_home(home, keys, copies, new_home)  # a live remote not copied is dead there
    t0 = time.monotonic()
    with Vault.open(new_home, keys=keys) as v:
        old = v.suite
        target = next(
            (s for s in SUITE_NAMES.values() if s != old and s not in v.keys.retired_suites),
            None,
        )
        if target is None:
            raise InputError("every other suite is retired in this vault: none to re-encrypt to")
        rep = rotation.reencrypt(v, target)
        after = v.keys
    res.details.update(
        {"from_suite": suite_name(old), "to_suite": suite_name(target),
         "rewritten_segments": rep.rewritten, "retired": [suite_name(s) for s in rep.retired]}
    )  # fmt: skip
    got = _restore_from_remotes(res, after, rng.sample(copies, needed), scratch / "new")
    _finish(res, got, t0)
    refused = scratch / "refused"
    try:
        _restore_from_remotes(DrillResult("crypto"), after, live, refused)
    except IntegrityError as e:
        res.details["old_suite_refused"] = True
        msg = e.message  # the first remote's words matter; the others repeat them
        res.details["refusal"] = msg if len(msg) <= 300 else msg[:300].rsplit(" ", 1)[0] + " …"
    else:
        res.error = f"data under the retired {suite_name(old)} was still accepted"
    shutil.rmtree(refused, ignore_errors=True)


def _keys(
    res: DrillResult, home: Path, keys: VaultKeys, specs: list[str], needed: int, scratch: Path,
    rng: random.Random, master: tuple[VaultKeys, str] | None = None,
) -> None:  # fmt: skip
    """The keyfile and passphrase are lost: the seed from 3 of 5 shares, then a restore from
    the remotes with it. For a tier (``master``), the shares are the master seed's and the
    tier's key is derived from the recovered master."""
    split = keys if master is None else master[0]
    mnemonics = shamir.split(split, SHARE_THRESHOLD, SHARE_COUNT)
    chosen = sorted(rng.sample(range(SHARE_COUNT), SHARE_THRESHOLD))
    res.details["shares_used"] = [f"{i + 1} of {SHARE_COUNT}" for i in chosen]
    t0 = time.monotonic()
    parsed = [shamir.ParsedShare(f"share {i + 1}", mnemonics[i]) for i in chosen]
    recovered = shamir.recover(parsed, split.fingerprint(), split.vault_id)
    if master is not None:
        res.details["master_fingerprint"] = recovered.fingerprint()
        recovered = VaultKeys.from_seed(keymod.tier_seed(recovered.seed, master[1]))
        if recovered.fingerprint() != keys.fingerprint():
            raise IntegrityError(f"the key derived for tier {master[1]} is not the tier's key")
    res.details["fingerprint"] = recovered.fingerprint()
    got = _restore_from_remotes(res, recovered, [open_backend(s) for s in specs], scratch)
    _finish(res, got, t0)


_DRILLS: dict[str, Callable[..., None]] = {
    "disk": _disk, "home": _home, "provider": _provider, "crypto": _crypto, "keys": _keys,
}  # fmt: skip


# -- shared steps ------------------------------------------------------------------------------
def _finish(res: DrillResult, got: _Restored, t0: float) -> None:
    res.rto = time.monotonic() - t0
    res.rpo = max(0.0, time.time() - got.created)
    res.snapshot, res.entries, res.bytes = got.uid, got.entries, got.bytes
    res.mismatched = got.mismatched
    res.identical = not got.mismatched
    if got.mismatched:
        res.error = f"{len(got.mismatched)} restored file(s) differ from the snapshot"


#: what the drills that restore could not do, when too few remotes hold the vault
RESTORE = "restore the newest snapshot"


def _restore_from_remotes(
    res: DrillResult, keys: VaultKeys, remotes: list[Backend], scratch: Path
) -> _Restored:
    """The newest snapshot of the newest manifest on ``remotes``, restored under
    ``scratch/restored`` with no home (the disaster path of ``vaultfs restore --from``)."""
    with _remote_index(keys, remotes, scratch / "index") as (index, src, seq):
        res.seq = seq
        return _restore(keys, index, src, scratch / "restored")


@contextlib.contextmanager
def _remote_index(
    keys: VaultKeys, remotes: list[Backend], work: Path
) -> Iterator[tuple[Index, ShardSource, int]]:
    src = ShardSource(remotes)
    src.start()
    try:
        with too_few_remotes(src, RESTORE):
            index, src, m, _warnings = open_remote_index(keys, remotes, work, src=src)
        try:
            yield index, src, m.seq
        finally:
            index.close()
    finally:
        src.stop()


def _restore(keys: VaultKeys, index: Index, src: ShardSource, to: Path) -> _Restored:
    with too_few_remotes(src, RESTORE):
        uid, entries, size, _warnings = restore_files(keys, index, src, to)
    found = snapshot_rows.find(index, uid)
    assert found is not None  # restore_files just restored it
    created = snapshot_rows.details(index, found[0])[2]
    return _Restored(uid, entries, size, created, check_identical(keys, index, found[0], to))


def check_identical(keys: VaultKeys, index: Index, snapshot: int, root: Path) -> list[str]:
    """Paths of the snapshot's regular files and symlinks (row id ``snapshot``) that the tree
    at ``root`` does not hold exactly as recorded: a file must have the recorded size and, cut
    at the recorded chunk lengths, each piece the recorded keyed BLAKE3 chunk id; a symlink
    the recorded target. Empty when everything is identical."""
    bad = []
    for eid, path, typ, _mode, _mtime, size, target, *_rest in snapshot_rows.full_entries(
        index, snapshot
    ):
        p = root / fs_path(path)
        try:
            if typ == "l":
                if os.readlink(p) != fs_path(target):
                    bad.append(fs_path(path))
            elif typ == "f" and not _same_file(keys, index, eid, size, p):
                bad.append(fs_path(path))
        except OSError:
            bad.append(fs_path(path))
    return bad


def _same_file(keys: VaultKeys, index: Index, entry: int, size: int, p: Path) -> bool:
    if p.is_symlink() or p.stat().st_size != size:
        return False
    with open(p, "rb") as f:
        for cid, _seg, _off, _len, plain in snapshot_rows.file_chunks(index, entry):
            data = f.read(plain)
            if blake3.blake3(data, key=keys.chunk_id_key).digest() != bytes(cid):
                return False
        return f.read(1) == b""


def _copy_remotes(remotes: list[Backend], into: Path) -> list[Backend]:
    """Copies of ``remotes`` (every object a reader uses) as local directories under ``into``:
    the remotes a drill may change."""
    out = []
    for i, b in enumerate(remotes):
        dest = into / f"copy{i}"
        for sub in REMOTE_FOLDERS:
            b.get_dir(sub, dest / sub)
        out.append(open_backend(str(dest)))
    return out


def _scratch_home(
    home: Path, keys: VaultKeys, copies: list[Backend], new_home: Path
) -> dict[int, str]:
    """A home rebuilt at ``new_home`` from ``copies`` (scratch copies of remotes) in which no
    spec names a live remote: each remote of the vault (active or removed) that is not among
    the copies gets :data:`DEAD_REMOTE`, before anything opens the home for writing. Returns
    {id: dead spec} of the active ones (the remotes to replace)."""
    _rebuild(home, keys, copies, new_home)
    mine = {c.spec for c in copies}
    with Vault.open(new_home, keys=keys, lock=False) as v:
        # removed remotes too: garbage collection still deletes from those
        dead = {
            r.id: DEAD_REMOTE.format(rid=r.id)
            for r in remote_table.every(v.index)
            if r.spec not in mine
        }
        with v.index.tx() as db:
            remote_table.respec(db, dead)
        active = {rid for rid, _spec in remote_table.active(v.index)}
    return {rid: spec for rid, spec in dead.items() if rid in active}


def _rebuild(home: Path, keys: VaultKeys, remotes: list[Backend], new_home: Path):
    """``vaultfs home rebuild`` of the vault into ``new_home`` from ``remotes``; the keyfile
    copied from the live home (the scratch home opens with ``keys`` anyway), or sealed under a
    throwaway passphrase when the live home has none."""
    keyfile = home / "key.json"
    if keyfile.exists():
        return rebuild_home(new_home, keys, remotes, keyfile=keyfile)
    return rebuild_home(new_home, keys, remotes, passphrase=os.urandom(16).hex())
