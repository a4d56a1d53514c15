"""Key epochs, rotation and re-encryption under a new crypto suite (docs/keys.md).

Rotation (``rotate``) starts a new key epoch: a fresh random data key, wrapped with HPKE to the
seed-derived public key of the chosen suite, is what new writes use; older epochs stay in the
keyring so old data remains readable. It protects data written *after* the rotation against a
leak of an old data key; it does nothing for data already stored, nor against a provider that
harvested the wrapped keys and later breaks the KEM (that is what ``reencrypt`` is for).

Re-encryption (``reencrypt``) moves every data segment to a new epoch under a target suite:

1. A new epoch under the target suite becomes current (``settings.reencrypt_epoch`` records
   the unfinished run; new writes already use it).
2. Data segments of other epochs are rewritten one by one: decode, open each chunk record
   under its old epoch, re-seal it under the new one, write the new shards to the queue, then
   one index transaction swaps old for new (``Vault.replace_segment``). A kill -9 at any point
   leaves either the old or the new segment in use; a rerun continues with what is left.
   Every few segments the queue is flushed so local disk use stays bounded.
3. The index is shipped in a new manifest and flushed to every remote.
4. Suites no epoch with data uses any more are marked retired (``suites`` table, the keyfile's
   authenticated policy, every later manifest body), and the index is shipped again. Readers
   from then on refuse data, keyrings and manifests under a retired suite.
5. The replaced shards are deleted from the remotes (``garbage`` table; retried on later runs
   when a remote is down). Never while the remotes hold another branch (a fork): its
   manifests, even under the suite step 4 just retired, may reference them
   (:func:`collect_garbage`).

Until step 4 the vault stays readable through both the old manifests (old shards are not yet
deleted) and the local index (both epochs' keys are loaded).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import chain, envelope
from .backends import open_backend
from .errors import EXIT_PARTIAL, InputError, IntegrityError, RemoteError, VaultError
from .index import chunks, keyring, manifests, segments
from .index import remotes as remote_table
from .keys import SUITE_NAMES, SUITES, suite_name, update_keyfile_policy
from .vault import Vault

#: Flush the queue after this many rewritten segments (bounds local disk use).
FLUSH_EVERY = 16


class ReencryptIncomplete(VaultError):
    """Re-encryption finished locally, but some remotes are behind; rerun to finish."""

    exit_code = EXIT_PARTIAL


@dataclass
class ReencryptReport:
    suite: int
    epoch: int
    rewritten: int = 0
    retired: list[int] = field(default_factory=list)
    garbage_deleted: int = 0
    garbage_left: int = 0
    garbage_held: str = ""  # why no garbage was deleted (chain.Survey.hold)


def parse_suite(name: str) -> int:
    """A suite given on the command line: a name from keys.SUITE_NAMES or a numeric id."""
    if name.isdigit() and int(name) in SUITES:
        return int(name)
    if name.lower() in SUITE_NAMES:
        return SUITE_NAMES[name.lower()]
    choices = ", ".join(f"{n} ({SUITES[i]})" for n, i in SUITE_NAMES.items())
    raise InputError(f"unknown suite {name!r}: choose one of {choices}")


def rotate(v: Vault, suite: int | None = None) -> int:
    """Start a new key epoch (under ``suite``, default the current one) and ship the index.

    Returns the new epoch. The keyring travels in the manifest, so seed + k remotes still
    unwrap the new key. Call ``v.flush()`` to place it.
    """
    target = v.suite if suite is None else suite
    if target in v.keys.retired_suites:
        raise InputError(f"{suite_name(target)} is retired in this vault; choose another suite")
    if keyring.reencrypt_target(v.index) is not None:
        raise InputError(
            "a re-encryption is unfinished: run `vaultfs reencrypt` to finish it first"
        )
    epoch = v.begin_epoch(target)
    v.ship_index()
    return epoch


def status(v: Vault) -> dict:
    """Epochs, suites and re-encryption progress, for `vaultfs keys show`."""
    epochs = []
    per_epoch = Counter(epoch for _id, _size, _used, epoch in segments.data_segments(v.index))
    for epoch, suite, created in keyring.epoch_times(v.index):
        epochs.append(
            {
                "epoch": epoch,
                "suite": suite,
                "suite_name": SUITES.get(suite, "unknown"),
                "created": created,
                "data_segments": per_epoch[epoch],
                "current": epoch == v.epoch,
                "retired": suite in v.keys.retired_suites,
            }
        )
    target = keyring.reencrypt_target(v.index)
    remaining = 0
    if target is not None:
        remaining = sum(e != target for _id, _size, _used, e in segments.data_segments(v.index))
    garbage = manifests.garbage_count(v.index)
    return {
        "suite": v.suite,
        "suite_name": SUITES.get(v.suite, "unknown"),
        "epoch": v.epoch,
        "epochs": epochs,
        "retired_suites": sorted(v.keys.retired_suites),
        "reencrypt": {"epoch": target, "remaining_segments": remaining}
        if target is not None
        else None,
        "garbage_objects": garbage,
    }


def reencrypt(
    v: Vault,
    suite: int,
    progress: Callable[[int, int], None] | None = None,
    keyfile: Path | None = None,
) -> ReencryptReport:
    """Re-encrypt every data segment under a new epoch of ``suite``, then retire old suites.

    Resumable: a rerun (after a crash, kill -9 or Ctrl-C) continues where the last one
    stopped. ``progress(done, total)`` is called after every segment. ``keyfile`` (a path)
    receives the retired-suite policy. Raises ReencryptIncomplete (exit 3) when remotes are
    behind; the rerun then finishes the job.
    """
    if suite in v.keys.retired_suites:
        raise InputError(f"{suite_name(suite)} is retired in this vault; choose another suite")
    pending = keyring.reencrypt_target(v.index)
    if pending is not None:
        target = pending
        target_suite = v.epoch_suites[target]
        if target_suite != suite:
            raise InputError(
                f"a re-encryption to {suite_name(target_suite)} is unfinished: finish it with "
                f"`vaultfs reencrypt --suite {target_suite}` first"
            )
    else:
        target = v.begin_epoch(suite)
        keyring.set_reencrypt_target(v.index, target)
    report = ReencryptReport(suite, target)
    todo = [(sid, e) for sid, _size, _used, e in segments.data_segments(v.index) if e != target]
    new_key = v.keys.data_keys[target]
    for i, (sid, old_epoch) in enumerate(todo):
        old_suite = v.epoch_suites[old_epoch]
        old_key = v.keys.data_keys[old_epoch]
        data = v.segment_bytes(sid)
        rows = chunks.records_in(v.index, sid)
        reseal = partial(
            _reseal, v, data=data, old_key=old_key, old_suite=old_suite, new_key=new_key,
            new_suite=suite, seg=sid,
        )  # fmt: skip
        records = list(v.pool.map(reseal, rows))
        v.replace_segment(sid, records, target)
        report.rewritten += 1
        if progress:
            progress(i + 1, len(todo))
        if (i + 1) % FLUSH_EVERY == 0:
            v.flush()

    # 3. publish the index that no longer names old segments
    _flush_complete(v, v.ship_index(), "the re-encrypted index")
    # 4. retire suites that no longer protect any data
    used = keyring.data_suites(v.index) | {suite}
    known = {s for _epoch, s, _wrapped in keyring.epochs(v.index)}
    retire = sorted(known - used - v.keys.retired_suites)
    if retire:
        with v.index.tx() as db:
            keyring.retire(db, retire, time.time())
        v.reload_keys()
        if keyfile is not None:
            update_keyfile_policy(keyfile, v.keys)
        _flush_complete(v, v.ship_index(), "the manifest that retires the old suite")
    report.retired = retire
    keyring.clear_reencrypt_target(v.index)
    # 5. delete replaced shards from the remotes
    gc = collect_garbage(v)
    report.garbage_deleted, report.garbage_left, report.garbage_held = gc.deleted, gc.left, gc.held
    return report


def _reseal(
    v: Vault,
    chunk: tuple,
    data: bytes,
    old_key: bytes,
    old_suite: int,
    new_key: bytes,
    new_suite: int,
    seg: int,
) -> tuple[bytes, bytes, int]:
    """Open one record under its old epoch, check it against its chunk id, seal it anew."""
    cid, off, ln, plain = chunk
    vid = v.keys.vault_id
    plaintext = envelope.open_chunk(old_key, vid, cid, data[off : off + ln], old_suite)
    if len(plaintext) != plain or v.chunker.chunk_id(plaintext) != cid:
        raise IntegrityError(f"segment {seg}: a chunk does not match its id; run an audit")
    return cid, envelope.seal_chunk(new_key, vid, cid, plaintext, new_suite), plain


#: Flushes :func:`_flush_complete` tries while a mount's writes keep fresh segments below k
#: (manifests wait for those: vaultfs/vault/uploads.py) and no remote fails.
FLUSH_TRIES = 5


def _flush_complete(v: Vault, seq: int, what: str) -> None:
    """Flush until manifest ``seq`` is placed on every remote (so is every segment it names:
    invariant 4), else raise ReencryptIncomplete. Shards queued after it (a mount's writes
    meanwhile) need not be placed."""
    for _ in range(FLUSH_TRIES):
        rep = v.flush()
        if seq not in manifests.queued_seqs(v.index):
            return
        if rep.errors:
            break
    behind = ", ".join(f"{r}: {e}" for r, e in rep.errors.items()) or "uploads pending"
    raise ReencryptIncomplete(
        f"re-encryption paused: {what} is not on every remote yet ({behind}); "
        "rerun `vaultfs reencrypt` with the same --suite once the remotes are back"
    )


@dataclass
class Collected:
    """What one :func:`collect_garbage` did."""

    deleted: int = 0  # objects deleted from remotes
    left: int = 0  # garbage objects left for a later run
    #: of those, the ones whose replacing manifest is still queued for some remote (they go
    #: once `vaultfs flush` lands it); the rest are on a remote that refused the delete
    waiting: int = 0
    held: str = ""  # why nothing was deleted this time (chain.Survey.hold)


def collect_garbage(v: Vault) -> Collected:
    """Delete replaced shard objects from their remotes once no placed manifest needs them.

    Only objects whose replacing manifest (``garbage.seq``) is recorded and has left the
    upload queue are deleted, and none at all unless a survey (:mod:`vaultfs.chain`) of every
    remote's ``manifests/`` read each name off this index's chain and found no validly
    signed one there (a fork, under any suite, retired or not: the other branch may still
    use them, docs/design.md invariant 8). An immutable vault deletes nothing and leaves
    nothing for later: its garbage rows stay as the record of what the remotes keep
    (:attr:`Vault.immutable`).
    """
    if v.immutable:
        return Collected()
    held = chain.survey(v.keys, v.index, v.remotes()).hold()
    if held:
        return Collected(left=manifests.garbage_count(v.index), held=held)
    pending_min = min(manifests.queued_seqs(v.index), default=None)
    newest = manifests.newest(v.index)
    recorded = newest[0] if newest else 0  # a replacing manifest not even recorded yet waits
    rows = manifests.garbage(v.index)
    remotes = {r.rid: r for r in v.remotes()}
    specs = remote_table.specs(v.index)
    by_remote: dict[tuple[int, str], list[str]] = defaultdict(list)
    waiting = 0
    for name, rid, kind, seq in rows:
        if seq > recorded or (pending_min is not None and seq >= pending_min):
            waiting += 1
            continue
        by_remote[(rid, kind)].append(name)
    deleted = 0
    for (rid, kind), names in by_remote.items():
        r = remotes.get(rid)
        if r is None:  # the remote was removed from the vault: nothing to delete there
            spec = specs.get(rid)
            if spec is None:
                manifests.forget_garbage(v.index, names)
                continue
            r = open_backend(spec, rid)
        try:
            r.delete(kind, names)
        except RemoteError:
            continue
        manifests.forget_garbage(v.index, names)
        deleted += len(names)
    return Collected(deleted, manifests.garbage_count(v.index), waiting=waiting)
