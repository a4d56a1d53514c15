"""The manifest chain as the remotes hold it: what a writer, an audit, repair and prune learn
about manifests this index did not write (docs/format.md 10.3, docs/design.md invariants 7-8).

Every manifest body names its predecessor (``prev``: seq and BLAKE3 of its object bytes), and
the index remembers every manifest of its own chain by name and hash (``manifest_chain``).
A validly signed manifest on a remote that this chain does not hold was written by another
writer: a home directory that went back in time, a second machine, or an explicit fork. A
:class:`Survey` finds them with one ``manifests/`` listing per remote and reads only the names
this chain does not know (newest first, at most :data:`MAX_READS` in all, each capped at
:data:`manifest.MAX_BYTES`): in the steady state it reads nothing.

A base is *stale* (:meth:`Survey.stale`) when such a manifest is newer than the newest one
this chain explicitly forked from (``manifest_chain.fork_seq``): the remotes moved on without
this writer. The writer then refuses to commit and to place manifests
(:class:`vaultfs.errors.StaleBase`) until the home is rebuilt from the remotes or the user
records an explicit fork.

A fork made on purpose ends with :func:`plan_retirement` and :func:`retire` (`vaultfs fork
retire`): from the home of the branch kept, which must be the vault's newest, they delete the
other branches' manifest objects (only those: never this chain's, never a data or index
object) from every remote of the vault, and nothing while a remote cannot be looked at.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import manifest
from .backends import Backend
from .errors import ImmutableVault, IntegrityError, RemoteError, StaleBase, Unreachable
from .index import Index, manifests
from .keys import VaultKeys
from .objectlock import wanted as lock_wanted
from .remotes import SILENT_AFTER

#: Seconds a survey waits for a remote's ``manifests/`` listing, from the survey's start; a
#: remote that has not answered by then is reported as not checked (:attr:`Survey.unchecked`,
#: docs/format.md 10.3) rather than holding up the command. The bound after which a remote
#: counts as silent (:data:`vaultfs.remotes.SILENT_AFTER`, ``VAULTFS_SILENT_AFTER``).
CHECK_BOUND = SILENT_AFTER
#: Seconds a survey waits past :data:`CHECK_BOUND` for a listing still out: rclone cuts off a
#: silent remote's listing that long after it sent it, a moment after the survey started, and
#: that failure marks the remote silent for the rest of the command (the next survey, a
#: flush's after a backup's, then does not wait for it again).
ANSWER_SLACK = 2.0

#: Most manifest objects one survey reads (a hostile remote listing junk names costs at most
#: this many capped reads); names left unread are counted in :attr:`Survey.unread`.
MAX_READS = 64

#: Most manifest objects the survey of a retirement (:func:`plan_retirement`) reads: a fork
#: that lived long holds many (neither branch prunes its old index copies meanwhile); a
#: retirement that leaves names unread says so, and running it again reads the next ones.
RETIRE_READS = 4096


@dataclass
class Seen:
    """A validly signed manifest on the remotes that this index's chain does not hold."""

    name: str
    manifest: manifest.Manifest
    holders: list[str]  # labels of the remotes listing it

    @property
    def link(self) -> manifest.Link:
        return self.manifest.link

    def describe(self) -> str:
        """``#seq/hash (prev #seq/hash) on R1, R2``, for messages."""
        return f"{self.manifest.summary()} on {', '.join(self.holders)}"


@dataclass
class Survey:
    """What one look at the remotes' ``manifests/`` found (:func:`survey`)."""

    reachable: int = 0  # remotes whose listing succeeded
    others: list[Seen] = field(default_factory=list)  # off this chain, newest first
    unread: int = 0  # unknown names not read (over MAX_READS)
    invalid: list[str] = field(default_factory=list)  # "label: name: why" of names refused
    errors: dict[str, str] = field(default_factory=dict)  # label -> why it was not listed
    unchecked: list[str] = field(default_factory=list)  # labels silent for CHECK_BOUND seconds

    def referenced(
        self, describe: Callable[[manifest.Manifest], manifest.IndexDescription]
    ) -> set[str]:
        """Names of the index shard objects (``meta/``) the other manifests sign, each
        manifest's index read whole with ``describe`` (its second-level pages too:
        :func:`vaultfs.restore.remote_index_description`)."""
        return {
            s.name
            for seen in self.others
            for seg in describe(seen.manifest).segments
            for s in seg.shards
        }

    def stale(self, index: Index) -> list[Seen]:
        """The other manifests newer than the newest one this chain explicitly forked from:
        the remotes moved on without this writer (empty: the base is current)."""
        floor = manifests.newest_fork(index)
        return [s for s in self.others if s.manifest.seq > floor]

    def describe(self) -> list[str]:
        """One line per other manifest, for ``status`` and messages."""
        return [s.describe() for s in self.others]

    def hold(self) -> str:
        """Why a command must delete nothing from the remotes after this survey (empty: it
        may delete what this chain no longer names): another branch's manifests, or remotes
        and names the survey could not look at, where one may hide (docs/design.md,
        invariant 8). A manifest under a suite retired since counts: it is still read."""
        if self.others:
            return "the remotes hold another branch (a fork), which may use them: " + "; ".join(
                self.describe()
            )
        unseen = [*self.errors, *self.unchecked]
        if unseen:
            return f"not every remote listed its manifests ({', '.join(unseen)})"
        if self.unread:
            return f"{self.unread} manifest name(s) off this chain were not read"
        return ""


def survey(
    keys: VaultKeys, index: Index, remotes: Iterable[Backend], max_reads: int = MAX_READS
) -> Survey:
    """List ``manifests/`` on every remote once (all at once) and read, newest first, the
    names this chain does not know (at most ``max_reads``); a remote that fails to list is
    skipped (reported in ``errors``), one whose listing has not come back within
    :data:`CHECK_BOUND` seconds is left behind (reported in ``unchecked``). Never writes to a
    remote."""
    return _survey(keys, manifests.chain_names(index), list(remotes), max_reads)


def survey_ahead(keys: VaultKeys, index: Index, remotes: Iterable[Backend]) -> Callable[[], Survey]:
    """Start :func:`survey` on a thread now (against the chain as the index holds it now);
    the returned function waits for it and returns its :class:`Survey` (or raises what it
    raised). For a caller with other work to do while slow remotes answer (a backup reads
    its files, a flush uploads the shards meanwhile). A daemon thread: a survey nobody waits
    for (a flush that placed no manifest) does not hold up the process's exit."""
    pending: Future[Survey] = Future()
    known, listed = manifests.chain_names(index), list(remotes)

    def run() -> None:
        try:
            pending.set_result(_survey(keys, known, listed))
        except BaseException as e:  # noqa: BLE001 - handed to the caller that waits
            pending.set_exception(e)

    threading.Thread(target=run, name="vaultfs-survey", daemon=True).start()
    return pending.result


def _survey(
    keys: VaultKeys, known: set[str], remotes: list[Backend], max_reads: int = MAX_READS
) -> Survey:
    out = Survey()
    listed: dict[str, list[tuple[Backend, int]]] = defaultdict(list)
    lock = threading.Lock()
    answered: set[int] = set()  # indexes into remotes of those whose listing came back
    closed = threading.Event()  # set once the bound passed: a late answer is not looked at

    def lst(i: int, r: Backend) -> None:
        try:
            names = r.list_sizes("manifests")
        except RemoteError as e:
            if isinstance(e, Unreachable) and e.silent:
                return  # it sent nothing: not checked (``unchecked``), as if still silent
            with lock:
                if not closed.is_set():
                    answered.add(i)
                    out.errors[r.label] = e.message
            return
        with lock:
            if closed.is_set():
                return
            answered.add(i)
            out.reachable += 1
            for nm, size in names.items():
                if manifest.seq_of_name(nm) is not None and nm not in known:
                    listed[nm].append((r, size))

    # daemon threads: a remote that never answers must not keep the process alive
    threads = [threading.Thread(target=lst, args=it, daemon=True) for it in enumerate(remotes)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + CHECK_BOUND + ANSWER_SLACK
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        closed.set()
        out.unchecked = [r.label for i, r in enumerate(remotes) if i not in answered]
    order = sorted(listed, reverse=True)  # the zero-padded seq leads the name
    out.unread = max(0, len(order) - max_reads)
    for nm in order[:max_reads]:
        m = _read_any(keys, nm, listed[nm], out.invalid)
        if m is not None:
            out.others.append(Seen(nm, m, [r.label for r, _s in listed[nm]]))
    return out


def _read_any(
    keys: VaultKeys, name: str, holders: list[tuple[Backend, int]], invalid: list[str]
) -> manifest.Manifest | None:
    """Manifest ``name`` from the first holder that serves a valid one; each refusal is
    added to ``invalid``."""
    for r, size in holders:
        why = ""
        if size > manifest.MAX_BYTES:
            why = f"listed at {size:,} bytes, more than a manifest can be; not read"
        else:
            try:
                blob = r.cat("manifests", name, 0, manifest.MAX_BYTES + 1)
                if len(blob) > manifest.MAX_BYTES:
                    raise IntegrityError("longer than a manifest can be")
                m = manifest.read_branch(keys, blob)  # off the chain: maybe retired
                if m.seq != manifest.seq_of_name(name):
                    raise IntegrityError(f"name does not match its signed sequence {m.seq}")
                return m
            except RemoteError as e:
                why = f"could not be read ({e.message})"
            except IntegrityError as e:
                why = e.message
        invalid.append(f"{r.label}: {name}: {why}")
    return None


def unchecked_warning(label: str) -> str:
    """The warning for a remote a survey left behind (:attr:`Survey.unchecked`)."""
    return (
        f"{label} did not list its manifests within {CHECK_BOUND:g}s: not checked this time "
        "for manifests another writer placed there (docs/format.md 10.3); the next backup or "
        "`vaultfs flush` checks it again"
    )


def stale_error(
    stale: list[Seen], at: str, nothing: str = "No snapshot was recorded."
) -> StaleBase:
    """The refusal for a stale base, naming what the remotes hold, what was not done
    (``nothing``) and the ways forward."""
    newest = max(stale, key=lambda s: s.manifest.seq)
    return StaleBase(
        f"{at}: the remotes hold manifest {newest.describe()}, which this vault's home never "
        "wrote: the home is older than the remotes (copied back in time, or another machine "
        f"writes to this vault). {nothing} Either rebuild the home from the remotes "
        "(`vaultfs home rebuild --from REMOTE ...`) and carry on from their newest state, or "
        "record an explicit fork with `--fork` (`vaultfs backup --fork ...`): the vault then "
        "holds two branches, and restore can be asked for either (`--manifest`)"
    )


def follows(
    m: manifest.Manifest, head: tuple[int, bytes] | None, by_hash: dict[bytes, manifest.Manifest]
) -> bool:
    """Whether ``m``'s ``prev`` links lead, through manifests in ``by_hash`` (by object hash),
    to ``head`` (this chain's newest (seq, hash)): ``m`` extends this chain, no fork."""
    seen: set[bytes] = set()
    while head is not None and m.contents.prev is not None and m.hash not in seen:
        seen.add(m.hash)
        prev = m.contents.prev
        if (prev.seq, prev.hash) == head:
            return True
        nxt = by_hash.get(prev.hash)
        if nxt is None:
            return False
        m = nxt
    return False


# -- ending a fork made on purpose (`vaultfs fork retire`) -------------------------------------
@dataclass
class Retirement:
    """The other branches' manifests a retirement deletes (:func:`plan_retirement`) and what
    :func:`retire` did with them."""

    manifests: list[Seen]  # off this chain, newest first
    #: object name -> the newest manifest of its branch (``#seq/hash``): which branch it is
    branch: dict[str, str] = field(default_factory=dict)
    unread: int = 0  # names off this chain the survey left unread (a later round reads them)
    deleted: dict[str, list[str]] = field(default_factory=dict)  # label -> objects deleted
    errors: dict[str, str] = field(default_factory=dict)  # label -> why its objects stay

    def objects(self) -> dict[str, list[str]]:
        """{remote label: the ``manifests/NAME`` objects to delete there}."""
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.manifests:
            for label in s.holders:
                out[label].append(f"manifests/{s.name}")
        return dict(out)

    @property
    def complete(self) -> bool:
        """Every listed object is deleted from every remote that held it."""
        return not self.errors and not self.unread

    def to_dict(self) -> dict:
        return {
            "manifests": [
                {
                    "branch": self.branch[s.name],
                    **s.link.as_json(),
                    "object": f"manifests/{s.name}",
                    "remotes": s.holders,
                }
                for s in self.manifests
            ],
            "unread": self.unread,
            "deleted": self.deleted,
            "errors": self.errors,
            "complete": self.complete,
        }


def plan_retirement(
    keys: VaultKeys, index: Index, remotes: list[Backend], immutable: bool
) -> Retirement:
    """The manifests off this home's chain on ``remotes`` (every remote of the vault), to be
    deleted by :func:`retire` to end a fork made on purpose; empty when the remotes hold no
    other branch. Refuses, deleting nothing: :class:`StaleBase` when the remotes continue this
    home's chain (a stale home: no fork) or hold a branch newer than this home's base (run it
    from the vault's newest branch, or record a ``--fork`` here first); :class:`Unreachable`
    when a remote did not list its manifests (it may hold them too);
    :class:`ImmutableVault` for an immutable vault or a holder whose spec asks for S3 Object
    Lock (its objects cannot be deleted)."""
    found = survey(keys, index, remotes, RETIRE_READS)
    head = manifests.newest_link(index)
    by_hash = {s.manifest.hash: s.manifest for s in found.others}
    ahead = [s for s in found.others if follows(s.manifest, head, by_hash)]
    if ahead:
        newest = max(ahead, key=lambda s: s.manifest.seq)
        raise StaleBase(
            f"stale home: the remotes' chain goes on past this home's newest manifest "
            f"#{head[0] if head else 0} (to {newest.describe()}): another machine, or a newer "
            "copy of this home, wrote to the vault, which is no fork; nothing was deleted. "
            "Move this home aside and run `vaultfs home rebuild --from ...` (any k remotes) to "
            "carry on from the remotes"
        )
    if stale := found.stale(index):
        newest = max(stale, key=lambda s: s.manifest.seq)
        raise StaleBase(
            f"the remotes hold another branch newer than this home's: {newest.describe()}; "
            "retiring it from here would delete the vault's newest branch, the one a restore "
            "takes, so nothing was deleted. Run `vaultfs fork retire` in the home of the "
            "branch you keep: to keep this one, record an explicit fork from here first "
            "(`vaultfs snapshot --fork` or `vaultfs backup --fork ...`), then run it again; to "
            "keep the other, run it in that branch's home (or `vaultfs home rebuild --from "
            "...` to make one)"
        )
    unseen = {**found.errors, **{label: "no answer" for label in found.unchecked}}
    if unseen:
        said = "; ".join(f"{label} ({why})" for label, why in unseen.items())
        raise Unreachable(
            f"not every remote listed its manifests: {said}. It may hold the other branch's "
            "manifests too, so nothing was deleted: the retirement stays to be done. Run "
            "`vaultfs fork retire` again once it answers (a remote gone for good: `vaultfs "
            "remote replace OLD NEW` first)"
        )
    order = {r.label: i for i, r in enumerate(remotes)}
    for s in found.others:  # in the vault's order, not the order the listings came back in
        s.holders.sort(key=lambda label: order.get(label, len(order)))
    plan = Retirement(found.others, unread=found.unread)
    _name_branches(plan)
    if not plan.manifests:
        return plan
    if immutable:
        raise ImmutableVault(
            "this vault is immutable: retiring a branch deletes its manifests from the remotes, "
            "which it never does; nothing was deleted. Both branches stay, and `verify` keeps "
            'reporting the fork (docs/operations.md, "Immutable vaults")'
        )
    spec = {r.label: r.spec for r in remotes}
    locked = [
        label
        for label in sorted({h for s in plan.manifests for h in s.holders})
        if lock_wanted(spec.get(label, "")) is not None
    ]
    if locked:
        raise ImmutableVault(
            f"{', '.join(locked)} lock their objects (S3 Object Lock: the spec names "
            "object_lock_mode): the other branch's manifests there cannot be deleted while "
            "their lock is in force, and vaultfs asks no locked remote to delete; nothing was "
            "deleted. Once the locks end, delete the objects `vaultfs fork retire --dry-run` "
            "lists with the bucket administrator's credentials"
        )
    return plan


def _name_branches(plan: Retirement) -> None:
    """Fill ``plan.branch``: each manifest's branch, named by its newest manifest (a head:
    no other manifest of the plan names it as ``prev``), newest branch first."""
    by_hash = {s.manifest.hash: s for s in plan.manifests}
    parents = {s.manifest.contents.prev.hash for s in plan.manifests if s.manifest.contents.prev}
    heads = [s for s in plan.manifests if s.manifest.hash not in parents]  # newest first
    for h in heads:
        s: Seen | None = h
        while s is not None and s.name not in plan.branch:
            plan.branch[s.name] = h.link.short
            prev = s.manifest.contents.prev
            s = by_hash.get(prev.hash) if prev else None
    for s in plan.manifests:  # a loop of prev links has no head: each names itself
        plan.branch.setdefault(s.name, s.link.short)


def retire(plan: Retirement, index: Index, remotes: list[Backend]) -> Retirement:
    """Delete the manifest objects of ``plan`` (:func:`plan_retirement`) from each remote of
    ``remotes`` that listed them, and nothing else: a remote that fails keeps them (named in
    ``plan.errors``; deleting is idempotent, so running the retirement again finishes it).
    Once every one is gone, ``status`` no longer shows the fork (:func:`manifests.note_fork`).
    Returns ``plan`` with ``deleted`` and ``errors`` filled in."""
    by_label = {r.label: r for r in remotes}
    for label, objects in plan.objects().items():
        names = [o.removeprefix("manifests/") for o in objects]
        try:
            by_label[label].delete("manifests", names)
        except RemoteError as e:
            plan.errors[label] = e.message
        else:
            plan.deleted[label] = objects
    if plan.complete:
        manifests.note_fork(index, None)
    return plan
