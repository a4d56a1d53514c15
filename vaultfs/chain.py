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
from .errors import IntegrityError, RemoteError, StaleBase
from .index import Index, manifests
from .keys import VaultKeys

#: Seconds a survey waits for a remote's ``manifests/`` listing, from the survey's start; a
#: remote that has not answered by then is reported as not checked (:attr:`Survey.unchecked`,
#: docs/format.md 10.3) rather than holding up the command for rclone's own timeouts.
CHECK_BOUND = 20.0

#: Most manifest objects one survey reads (a hostile remote listing junk names costs at most
#: this many capped reads); names left unread are counted in :attr:`Survey.unread`.
MAX_READS = 64


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


def survey(keys: VaultKeys, index: Index, remotes: Iterable[Backend]) -> Survey:
    """List ``manifests/`` on every remote once (all at once) and read, newest first, the
    names this chain does not know; a remote that fails to list is skipped (reported in
    ``errors``), one whose listing has not come back within :data:`CHECK_BOUND` seconds is
    left behind (reported in ``unchecked``). Never writes to a remote."""
    return _survey(keys, manifests.chain_names(index), list(remotes))


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


def _survey(keys: VaultKeys, known: set[str], remotes: list[Backend]) -> Survey:
    out = Survey()
    listed: dict[str, list[tuple[Backend, int]]] = defaultdict(list)
    lock = threading.Lock()
    answered: set[int] = set()  # indexes into remotes of those whose listing came back
    closed = threading.Event()  # set once the bound passed: a late answer is not looked at

    def lst(i: int, r: Backend) -> None:
        try:
            names = r.list_sizes("manifests")
        except RemoteError as e:
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
    deadline = time.monotonic() + CHECK_BOUND
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        closed.set()
        out.unchecked = [r.label for i, r in enumerate(remotes) if i not in answered]
    order = sorted(listed, reverse=True)  # the zero-padded seq leads the name
    out.unread = max(0, len(order) - MAX_READS)
    for nm in order[:MAX_READS]:
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
