"""Restore: rebuild files from any k remotes plus the key, with or without local state.

With no local state the chain of trust is: master seed → signing public keys → the highest
validly signed manifest on any remote → the index shards it names (BLAKE3 hashes in the
signed body) → the index → every data shard's hash and Merkle root → the vault root signed in
the manifest → each chunk's AEAD tag, key commitment and keyed chunk id.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import stat
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import blake3

from . import chain, envelope, erasure, hedging, holes, indexblocks, manifest, merkle, segment
from .backends import Backend, Job
from .backup import check_name
from .errors import (
    InputError,
    IntegrityError,
    NotEnoughRemotes,
    RemoteError,
    Rollback,
    TargetNotEmpty,
    ThawNeeded,
    WrongKey,
)
from .hedging import SPEEDS
from .index import Index, keyring, manifests, open_shipped, seen_manifest_seq, segments, snapshots
from .index.lazy import LazyIndex, open_lazy
from .index.shipped import BlockPlan, ShippedObjects
from .indexblocks import Location
from .keys import SLHDSA_BY_SIG_ALG, VaultKeys
from .listing import Listed, compact
from .names import display, fs_path, xattrs_from_db
from .remotes import needs_thaw
from .scratch import owned_scratch, owned_tempdir, sweep_dead_dirs
from .shardreader import ShardRef, ShardsUnavailable, preference, read_segment

if TYPE_CHECKING:
    from .vault import Vault

BATCH_SEGMENTS = 12
FIRST_BATCH = 2
#: Decoder processes for restores (0: decode on the calling thread).
DECODERS = int(os.environ.get("VAULTFS_DECODERS", "2"))
#: Read the shard objects of plain local-directory remotes where they lie instead of copying
#: them through rclone into the staging area first (``VAULTFS_READ_IN_PLACE=0``: copy them).
READ_IN_PLACE = os.environ.get("VAULTFS_READ_IN_PLACE", "1") != "0"


@dataclass
class RemoteReport:
    """What one remote did during a restore. ``rejected`` names the objects it served (or
    listed) that were not what the signed metadata says, each refused unread or decoded
    around: a malicious or broken remote is named here, not fatal."""

    label: str
    reachable: bool = True
    error: str | None = None
    best_seq: int | None = None
    bad_manifests: list[str] = field(default_factory=list)
    objects: int = 0
    rejected: list[str] = field(default_factory=list)
    bytes_read: int = 0  # bytes of objects read from it (:meth:`ShardSource.count_reads`)


@dataclass
class RestoreResult:
    snapshot: str
    files: int
    bytes: int
    seq: int
    remotes: list[RemoteReport]
    repaired_reads: int = 0
    warnings: list[str] = field(default_factory=list)


#: Bytes a download of named objects may exceed the sum of their expected sizes by before
#: rclone cuts it off (its byte count may include a little more than the object bodies).
GET_SLACK = 1 << 16


class Fetched(NamedTuple):
    """A shard object ready to be read: its file, and who served it (for messages)."""

    path: Path
    holder: str


def read_object(path: Path, size: int) -> segment.Body | str:
    """A shard object file (downloaded, read ahead, lying in place on a local remote, or in the
    upload queue) as (header, fragment) if it is a regular file of exactly ``size`` bytes;
    otherwise a reason, for messages. Reads at most ``size`` bytes whatever the file holds: a
    200 GB file under a shard's name costs one ``fstat``, a FIFO never blocks the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "is not a regular file"
            if st.st_size != size:
                return f"is {st.st_size:,} bytes, the signed metadata says {size:,}"
            head = f.read(min(size, segment.HEADER_SIZE))
            frag = f.read(size - len(head))
    except OSError as e:
        return f"could not be read ({e.strerror})"
    if len(head) + len(frag) != size:
        return "shrank while it was read"
    return head, frag


class ShardSource:
    """Where each shard object can be fetched from: listed remotes and the local queue.

    Every read is bounded before it happens (docs/threat-model.md, "Hostile remotes"): the
    expected size of each object comes from signed metadata (the manifest names its index
    shards with their sizes; the index names every data shard with its size) and the remote's
    listing must agree with it, or the object is not asked for and the remote is named in its
    :class:`RemoteReport` (``rejected``); downloads are cut off at the expected bytes, reads
    ask for at most one byte more, files are checked with ``fstat`` before they are read.
    Manifests are at most :data:`manifest.MAX_BYTES` bytes each, read newest first.

    Objects of a plain local-directory remote (:attr:`Backend.local_dir`) are read where they
    lie (:data:`READ_IN_PLACE`): listing, manifests and every write still go through rclone,
    but a restore from a USB disk or NAS mount copies nothing into a staging area first. An
    object that cannot be read in place, or whose hash is wrong, is decoded around like any
    missing shard. Nothing here ever writes to or deletes from a remote."""

    def __init__(self, remotes: list[Backend], queue_dir: Path | None = None) -> None:
        self.remotes = remotes
        self.queue_dir = queue_dir
        self.reports = {r.spec: RemoteReport(r.label) for r in remotes}
        #: spec -> directory, for the remotes read in place
        self.in_place: dict[str, Path] = {}
        if READ_IN_PLACE:
            for r in remotes:
                if (d := r.local_dir) is not None:
                    self.in_place[r.spec] = d
        #: spec -> sub -> {name: listed size (-1: the remote did not say)}, of the remotes
        #: :meth:`list_all` took in (compact: :mod:`vaultfs.listing`)
        self.listed: dict[str, dict[str, Listed]] = {}
        #: (spec, name) of the objects a remote listed at another size than expected
        self._wrong: set[tuple[str, str]] = set()
        self.local: dict[str, Path] = {}
        #: specs whose listing :meth:`list_all` took in
        self._taken: set[str] = set()
        self._ahead_lock = threading.Lock()
        #: spec -> bytes read without the backend (in place, read ahead): Metered counts the rest
        self._read_here: dict[str, int] = defaultdict(int)
        self._count_lock = threading.Lock()
        if queue_dir and queue_dir.exists():
            for rdir in queue_dir.glob("r*"):
                for sub in ("data", "meta"):
                    if (rdir / sub).exists():
                        for f in (rdir / sub).iterdir():
                            self.local[f.name] = f

    def start(self, read_ahead: Path | None = None, manifests: bool = True) -> None:
        """Begin, in the background, what a restore needs from every remote before it has
        the key: one listing of each remote and (with ``manifests``) a read of its newest
        manifest (:meth:`read_manifest`). Runs beside the keyfile's scrypt; :meth:`list_all`
        and :meth:`read_manifest` wait for it.

        With ``read_ahead`` (a whole-snapshot restore) it also starts downloading the
        remotes' ``data/`` objects there (not ``meta/``: the index shards are fetched by
        name once a manifest is verified), at most :func:`read_ahead_budget` bytes in all
        (each remote's share cut off hard, even inside an object: a remote serving a 200 GB
        object spends only its own share), until :meth:`stop_read_ahead` (called
        once the index says what is needed): the time the key derivation takes is spent
        moving data a full restore needs anyway. Nothing read ahead is used before its size
        and hash are checked against the index."""
        self._ex = ThreadPoolExecutor(max_workers=2 * max(1, len(self.remotes)))
        self._lists = {r.spec: self._ex.submit(self._list_one, r) for r in self.remotes}
        if manifests:
            self._first = {r.spec: self._ex.submit(self._newest, r) for r in self.remotes}
        if read_ahead is not None:
            self._ahead = []
            budget = read_ahead_budget() // max(1, len(self.remotes))
            for i, r in enumerate(self.remotes):
                if r.spec not in self.in_place:  # read in place later: nothing to move ahead
                    into = read_ahead / f"a{i}" / "data"
                    self._lists[r.spec].add_done_callback(
                        lambda f, r=r, into=into: self._read_ahead_from(r, f, into, budget)
                    )

    _ex: ThreadPoolExecutor | None = None
    _lists: dict = {}
    _first: dict = {}
    #: the read-ahead downloads started (directory, remote, job); None when none may start
    _ahead: list[tuple[Path, Backend, Job]] | None = None
    #: shard objects downloaded ahead: name -> where (deleted once used)
    staged: dict[str, Fetched] = {}

    def _read_ahead_from(self, r: Backend, listed: Future, into: Path, budget: int) -> None:
        """Start the bounded download of ``r``'s ``data/`` into ``into`` as soon as its
        listing came back (a callback of that listing), so no remote waits for another's:
        unless the read-ahead was stopped meanwhile, the listing failed, or it put ``r`` in
        the slow tier (:mod:`vaultfs.hedging`, timed by the listings so far: a slow remote
        must not hold the budget)."""
        if listed.cancelled() or listed.exception() or isinstance(listed.result(), Exception):
            return
        tiers = SPEEDS.tiers([x.spec for x in self.remotes if self.listed_yet(x)], 0)
        if tiers[r.spec]:
            return
        with self._ahead_lock:
            if self._ahead is None:
                return
            job = r.copy_dir_async("data", into, budget)
            if job is not None:
                self._ahead.append((into, r, job))

    def stop_read_ahead(self) -> None:
        """Stop downloading ahead; what arrived complete becomes :attr:`staged`."""
        with self._ahead_lock:
            jobs, self._ahead = self._ahead, None
        if jobs is None:
            return
        if jobs:  # all at once: each stop waits for its transfer to end (a round trip or so)
            with ThreadPoolExecutor(len(jobs)) as ex:
                list(ex.map(lambda j: j[2].stop(), jobs))
        staged: dict[str, Fetched] = {}
        for into, r, _job in jobs:
            for f in into.glob("*"):
                if f.is_file() and len(f.name) == 32 and "." not in f.name:  # not a .partial
                    staged[f.name] = Fetched(f, r.label)
                    self._note_read(r.spec, f.stat().st_size)
        self.staged = staged

    def _note_read(self, spec: str, nbytes: int) -> None:
        with self._count_lock:
            self._read_here[spec] += nbytes

    def count_reads(self) -> int:
        """Fill in each report's ``bytes_read`` and return their sum: the bytes of objects
        read from the remotes by this process, through the backend (its :class:`Metered`
        count: listings excluded) or not (objects read in place, or downloaded ahead, counted
        once they are staged). Reads a decoder process makes around a corrupt data shard are
        not counted."""
        total = 0
        for r in self.remotes:
            rep = self.reports[r.spec]
            with self._count_lock:
                rep.bytes_read = getattr(r, "bytes_read", 0) + self._read_here[r.spec]
            total += rep.bytes_read
        return total

    def _list_one(self, r: Backend) -> dict[str, Listed] | RemoteError:
        try:  # made compact here, in the listing's thread: no full-size listing outlives it
            return compact(r.list_tree(("data", "meta", "manifests")))
        except RemoteError as e:
            return e

    def _listing(self, r: Backend) -> dict[str, Listed]:
        """The one listing of ``r`` (started by :meth:`start`); raises RemoteError."""
        if self._ex is None:
            self.start(manifests=False)
        got = self._lists[r.spec].result()
        if isinstance(got, RemoteError):
            raise got
        return got

    def manifest_names(self, r: Backend) -> list[tuple[str, int]]:
        """(name, listed size) of the manifest objects of ``r``, newest first (objects whose
        name is not a manifest name are ignored); raises RemoteError."""
        names = self._listing(r)["manifests"]
        return sorted(
            ((nm, sz) for nm, sz in names.items() if manifest.seq_of_name(nm) is not None),
            reverse=True,  # the zero-padded sequence number leads the name
        )

    def _newest(self, r: Backend) -> tuple[str, bytes | str] | None:
        """The newest manifest of ``r`` listed at a plausible size, read (for :meth:`start`)."""
        try:
            names = [(nm, sz) for nm, sz in self.manifest_names(r) if sz <= manifest.MAX_BYTES]
        except RemoteError:
            return None
        return (names[0][0], self._read_manifest(r, *names[0])) if names else None

    def read_manifest(self, r: Backend, name: str, listed: int) -> bytes | str:
        """The bytes of one manifest object of ``r``, or why they were not read: an object
        listed larger than :data:`manifest.MAX_BYTES` is refused unread, and no read asks for more
        than one byte beyond it (a longer object is refused). Unverified: see
        :func:`manifest.read`."""
        first = self._first.get(r.spec)
        if first is not None and (got := first.result()) is not None and got[0] == name:
            return got[1]
        return self._read_manifest(r, name, listed)

    def _read_manifest(self, r: Backend, name: str, listed: int) -> bytes | str:
        if listed > manifest.MAX_BYTES:
            return f"listed at {listed:,} bytes, more than a manifest can be; not read"
        try:
            blob = r.cat("manifests", name, 0, manifest.MAX_BYTES + 1)
        except RemoteError as e:
            return f"could not be read ({e.message})"
        if len(blob) > manifest.MAX_BYTES:
            return f"longer than a manifest can be ({manifest.MAX_BYTES:,} bytes); not read further"
        return blob

    def stop(self) -> None:
        """End the background work of :meth:`start`: stop the read-ahead and wait for the
        listing and manifest calls. Safe to call more than once."""
        try:
            self.stop_read_ahead()
        except Exception:  # noqa: BLE001 - only cleaning up; the caller reports its own error
            pass
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)

    def listed_yet(self, r: Backend) -> bool:
        """Whether the listing of ``r`` has come back (or was never started)."""
        f = self._lists.get(r.spec)
        return f is None or f.done()

    def list_all(self, skip: Iterable[str] = ()) -> None:
        """Learn which remote holds which shard object, at which listed size (one listing per
        remote), except the remotes whose specs are in ``skip`` (left behind as late: their
        listing is not waited for, and nothing is fetched from them). Called again with
        fewer to skip, it adds the remotes it skipped before."""
        skip = set(skip)
        if self._ex is None:
            self.start(manifests=False)
        for r in self.remotes:
            if r.spec in skip or r.spec in self._taken:
                continue
            self._taken.add(r.spec)
            rep = self.reports[r.spec]
            tree = self._lists[r.spec].result()
            if isinstance(tree, RemoteError):
                rep.reachable, rep.error = False, tree.message
                continue
            self.listed[r.spec] = tree
            rep.objects = len(tree["data"]) + len(tree["meta"])
        if self._ex is not None:
            self._ex.shutdown(wait=not skip)

    def holders(self, name: str) -> list[Backend]:
        """The remotes taken in by :meth:`list_all` that listed shard object ``name`` (under
        ``data/`` or ``meta/``), in the order of :attr:`remotes`, except those :meth:`refs`
        found listing it at another size than expected."""
        out = []
        for r in self.remotes:
            tree = self.listed.get(r.spec)
            if (
                tree is not None
                and (name in tree["data"] or name in tree["meta"])
                and (r.spec, name) not in self._wrong
            ):
                out.append(r)
        return out

    def reject(self, r: Backend, what: str) -> None:
        """Name an object ``r`` served or listed wrongly in its report."""
        self.reports[r.spec].rejected.append(what)

    def refs(self, kind: str, shards: Iterable[tuple[int, str, bytes, int]]) -> list[ShardRef]:
        """The shard reader's view of a segment's (idx, name, hash, size) rows, as the signed
        metadata records them: the shards this source can reach, queue copies marked local.
        A remote whose listing gives an object another size is not asked for it (it is named
        in its report, and the shard decoded around). Call after :meth:`list_all`."""
        out: list[ShardRef] = []
        for idx, name, h, size in shards:
            if name not in self.local:
                holders = self.holders(name)
                if not holders:
                    continue
                right = [r for r in holders if self._listed_right(r, kind, name, size)]
                self._wrong.update((r.spec, name) for r in holders if r not in right)
                if not right:
                    continue
            out.append(ShardRef(idx, name, h, local=name in self.local, size=size))
        return out

    def _tiers(self, nbytes: int) -> dict[str, int]:
        """{spec: 0 fast, 1 slow} of the remotes for a read of ``nbytes`` (hedging.SPEEDS);
        remotes read in place are fast."""
        tiers = SPEEDS.tiers([r.spec for r in self.remotes], nbytes)
        return {s: 0 if s in self.in_place else t for s, t in tiers.items()}

    def choose(self, refs: Sequence[ShardRef], k: int) -> list[ShardRef]:
        """The k shards to fetch first: :func:`shardreader.choose`'s order (local copies, data
        fragments, index), except that a shard only a slow remote holds comes after every
        shard a fast one does (:mod:`vaultfs.hedging`): one slow provider is asked only for
        what the others cannot give, and does not set the pace of the read."""
        if not refs:
            return []
        tiers = self._tiers(max(r.size or 0 for r in refs))

        def tier(ref: ShardRef) -> int:
            if ref.local or ref.name in self.staged:
                return 0
            return min((tiers.get(h.spec, 0) for h in self.holders(ref.name)), default=1)

        return sorted(refs, key=lambda r: (tier(r), preference(r, k)))[:k]

    def _listed_right(self, r: Backend, kind: str, name: str, size: int) -> bool:
        listed = self.listed.get(r.spec, {}).get(kind, {}).get(name)
        if listed is None:
            return False  # listed under another folder: not this object
        if listed not in (size, -1):
            self.reject(r, f"{kind}/{name} listed at {listed:,} bytes, not {size:,}; not read")
            return False
        return True

    def fetch(self, wanted: list[tuple[str, ShardRef]], into: Path) -> dict[str, Fetched]:
        """Stage the (kind, shard) objects: queue copies, read-ahead and in-place files as
        they are; others downloaded into ``into``, spreading the load across remotes: only
        objects listed at their expected size (:meth:`refs`), each download cut off at the
        sum of those sizes; every file is checked again when read (:func:`read_object`)."""
        got: dict[str, Fetched] = {}
        per_remote: dict[str, tuple[Backend, dict[str, list[ShardRef]]]] = {}
        load: dict[str, int] = defaultdict(int)
        tiers = self._tiers(max((ref.size or 0 for _k, ref in wanted), default=0))
        for kind, ref in wanted:
            name = ref.name
            if name in self.local:
                got[name] = Fetched(self.local[name], "the upload queue")
                continue
            if name in self.staged:
                got[name] = self.staged[name]
                continue
            cands = self.holders(name)
            if not cands:
                continue
            here = [c for c in cands if c.spec in self.in_place]
            if here:  # read where it lies, spreading the reads over the directories
                r = min(here, key=lambda x: load[x.spec])
                load[r.spec] += 1
                got[name] = Fetched(self.in_place[r.spec] / kind / name, r.label)
                self._note_read(r.spec, ref.size or 0)
                continue
            r = min(cands, key=lambda x: (tiers.get(x.spec, 0), load[x.spec]))
            load[r.spec] += 1
            per_remote.setdefault(r.spec, (r, defaultdict(list)))[1][kind].append(ref)

        def pull(item: tuple[Backend, dict[str, list[ShardRef]]]) -> None:
            r, kinds = item
            d = into / f"r{abs(hash(r.spec))}"
            d.mkdir(parents=True, exist_ok=True)
            for kind, refs in kinds.items():
                expected = sum(x.size or 0 for x in refs)
                try:
                    r.get(kind, [x.name for x in refs], d, expected + GET_SLACK)
                except RemoteError as e:
                    self.reports[r.spec].error = e.message
                for x in refs:
                    if (d / x.name).exists():
                        got[x.name] = Fetched(d / x.name, r.label)

        with ThreadPoolExecutor(max_workers=max(1, len(per_remote))) as ex:
            list(ex.map(pull, per_remote.values()))
        return got

    def fetch_one(
        self, kind: str, ref: ShardRef, warnings: list[str], skip: str = ""
    ) -> tuple[segment.Body, str] | None:
        """One object, with who served it, from the first remote (other than the one
        labelled ``skip``) that listed it and serves it at its expected size (read in place,
        or at most one byte more than expected); None if none can. Each remote that fails is
        named in ``warnings``."""
        assert ref.size is not None
        for r in self.holders(ref.name):
            if r.label == skip:
                continue
            body: segment.Body | str
            if r.spec in self.in_place:
                body = read_object(self.in_place[r.spec] / kind / ref.name, ref.size)
                self._note_read(r.spec, ref.size)
            else:
                try:
                    body = r.cat(kind, ref.name, 0, ref.size + 1)
                except RemoteError as e:
                    body = f"could not be read ({e.message})"
                else:
                    if len(body) != ref.size:
                        body = f"came back with {len(body):,} bytes, not {ref.size:,}"
            if isinstance(body, str):
                warnings.append(f"{r.label}: shard {ref.name} (index {ref.idx}) {body}")
                continue
            return body, r.label
        return None

    def read_range(self, kind: str, ref: ShardRef, lo: int, hi: int) -> tuple[bytes, str] | None:
        """Bytes [lo, hi) of shard object ``ref`` (unverified: the caller checks what they
        make), with who served them: from the upload queue, in place, or one ranged read of a
        remote that listed the object at its expected size; None when none can. Each holder
        is tried once, local copies first."""
        assert ref.size is not None and 0 <= lo <= hi <= ref.size
        paths = [(self.local[ref.name], "the upload queue", None)] if ref.name in self.local else []
        remote: list[Backend] = []
        for r in self.holders(ref.name):
            if r.spec in self.in_place:
                paths.append((self.in_place[r.spec] / kind / ref.name, r.label, r.spec))
            else:
                remote.append(r)
        for path, holder, spec in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size != ref.size:
                        continue
                    data = os.pread(fd, hi - lo, lo)
                finally:
                    os.close(fd)
            except OSError:
                continue
            if spec is not None:
                self._note_read(spec, len(data))
            if len(data) == hi - lo:
                return data, holder
        for r in remote:
            try:
                data = r.cat(kind, ref.name, lo, hi - lo)
            except RemoteError:
                continue
            if len(data) == hi - lo:
                return data, r.label
        return None


@contextlib.contextmanager
def too_few_remotes(src: ShardSource, doing: str, more: str = "") -> Iterator[None]:
    """Say a ShardsUnavailable of the ``with`` block in the user's terms, from what ``src``
    heard of every remote (:meth:`ShardsUnavailable.for_user`, exit 11 still): what could not
    be done (``doing``, e.g. "restore snapshot monday"), which remotes hold the vault, which
    were found empty and which did not answer, and what to do (``more``: other ways to bring
    a remote, e.g. " (or give more --from)"); the internal segment it was stays at the end.
    Every reader through a ShardSource says it so: restore, home rebuild, drill, kb."""
    try:
        yield
    except ShardsUnavailable as e:
        reports = list(src.reports.values())
        raise e.for_user(
            doing,
            held=[r.label for r in reports if r.reachable and r.objects],
            down=[f"{r.label} ({r.error or 'unreachable'})" for r in reports if not r.reachable],
            empty=[r.label for r in reports if r.reachable and not r.objects],
            more=more,
        ) from None


class _Staged:
    """The shard reader's transport for restore: shard objects staged (downloaded, read ahead,
    or lying in place on a local remote, as :meth:`ShardSource.fetch` found them), then the
    upload queue, then one read from any remote that listed the object. Every read is bounded
    by the ref's size; a staged object that cannot be read, or has the wrong size, is noted in
    ``warnings`` with its holder and fetched again from a remote. ``holders`` says who served
    each object returned."""

    def __init__(
        self, src: ShardSource, kind: str, staged: dict[str, Fetched], warnings: list[str]
    ) -> None:
        self.src, self.kind, self.staged, self.warnings = src, kind, staged, warnings
        self.holders: dict[str, str] = {}

    def fetch(self, refs: Sequence[ShardRef]) -> dict[str, segment.Body]:
        out: dict[str, segment.Body] = {}
        for ref in refs:
            assert ref.size is not None
            f = self.staged.get(ref.name)
            local = self.src.local.get(ref.name)
            if f is None and local is not None:
                f = Fetched(local, "the upload queue")
            if f is not None:
                body = read_object(f.path, ref.size)
                if not isinstance(body, str):
                    out[ref.name], self.holders[ref.name] = body, f.holder
                    continue
                self.warnings.append(f"{f.holder}: shard {ref.name} (index {ref.idx}) {body}")
            got = self.src.fetch_one(self.kind, ref, self.warnings, f.holder if f else "")
            if got is not None:
                out[ref.name], self.holders[ref.name] = got
        return out


def _read_segment(
    src: ShardSource,
    kind: str,
    refs: list[ShardRef],
    k: int,
    n: int,
    size: int,
    staged: dict[str, Fetched],
    warnings: list[str],
    what: str,
    alg: int,
    audit_key: bytes,
) -> bytes:
    """One segment (coded with erasure algorithm ``alg``, whitened under ``audit_key``)
    through the shard reader, from the objects ``staged`` for it (the first
    :meth:`ShardSource.choose` of ``refs``) and more from ``src`` as needed; corrupt shards
    are added to ``warnings`` with the remote that served them. The staged objects count as
    local copies, so the reader starts from them rather than from its own first choice (a
    data fragment a slow remote holds, which the choice left out on purpose)."""
    transport = _Staged(src, kind, staged, warnings)
    refs = [replace(r, local=True) if r.name in staged else r for r in refs]
    try:
        read = read_segment(refs, k, n, size, transport, what, alg=alg, audit_key=audit_key)
    except ShardsUnavailable as e:  # the refusal names the remote that served each lie
        e.lies = [
            replace(lie, ref=replace(lie.ref, holder=h))
            if (h := transport.holders.get(lie.ref.name))
            else lie
            for lie in e.lies
        ]
        raise
    warnings += [
        f"{transport.holders.get(lie.ref.name, 'a remote')}: shard {lie.ref.name}"
        f" (index {lie.ref.idx}) is corrupt; decoding around it"
        for lie in read.lies
        if lie.kind == "corrupt"
    ]
    return read.data


@dataclass
class Branches:
    """What a restore learnt about the manifest chain on the remotes (docs/format.md 10.3):
    every validly signed manifest it read, the one it uses, and those off its chain."""

    valid: dict[str, manifest.Manifest] = field(default_factory=dict)  # name -> manifest
    holders: dict[str, list[str]] = field(default_factory=dict)  # name -> remote labels
    used: str = ""  # the name of the manifest restored from
    tried: set[str] = field(default_factory=set)  # names read (or refused) already
    off_chain: list[str] = field(default_factory=list)  # valid names not on its chain
    unread: int = 0  # names left unread (more than chain.MAX_READS)
    #: spec -> the scan of a remote that had not answered when enough others had
    #: (:func:`find_manifest` with ``late_ok``); :func:`check_late` waits for them
    late: dict[str, Future] = field(default_factory=dict)
    started: float = 0.0  # time.monotonic() when the manifests were first examined
    #: time.monotonic() until which a late remote still counts as one of the first to
    #: answer (:func:`hedging.grace` after enough answered): :func:`open_remote_index`
    #: fetches the index meanwhile, then hears them (:func:`_hear_in_grace`)
    grace_end: float = 0.0

    def describe(self, name: str) -> str:
        """Manifest ``name`` and the remotes listing it, for messages."""
        return f"{self.valid[name].summary()} on {', '.join(self.holders.get(name, []))}"

    def heads(self) -> list[str]:
        """The off-chain manifests no other off-chain manifest follows: the other branches'
        newest, newest first."""
        followed = {
            self.valid[n].contents.prev.hash
            for n in self.off_chain
            if self.valid[n].contents.prev is not None
        }
        return sorted(
            (n for n in self.off_chain if self.valid[n].hash not in followed), reverse=True
        )

    def to_dict(self) -> dict:
        """The JSON form: the manifest used and every other branch head."""
        used = self.valid[self.used].link if self.used else None
        return {
            "manifest": None if used is None else used.as_json(),
            "fork": [
                {**self.valid[n].link.as_json(), "name": n, "holders": self.holders.get(n, [])}
                for n in self.heads()
            ],
        }


def find_manifest(
    keys: VaultKeys,
    src: ShardSource,
    min_seq: int = 0,
    want: str | None = None,
    branches: Branches | None = None,
    late_ok: bool = False,
) -> tuple[manifest.Manifest, list[str]]:
    """The manifest to restore from: the highest validly signed one on the given remotes, or
    the one ``want`` names (:func:`select`); warns about stale remotes.

    With ``late_ok`` (and no ``want``) it returns once k remotes answered (k of the newest
    valid manifest, at or above ``min_seq``); the others are left to answer in the
    background (``branches.late``), with a grace (:func:`hedging.grace`, until
    ``branches.grace_end``) in which they still count as answering first: the caller spends
    it on useful work (:func:`open_remote_index` fetches the index) and then hears them
    (:func:`_hear_in_grace`; it chooses again if one of them holds a newer manifest). It
    must call :func:`check_late` before it reports success, which refuses the restore if a
    remote that answered later still holds a newer manifest (docs/format.md 10.3).

    Each remote is examined on its own thread, its manifest names newest first (by the
    sequence number that leads each name), until one verifies: an honest remote costs one
    read. A name listed larger than :data:`manifest.MAX_BYTES` is refused unread, every other read
    is capped there; junk names above a remote's newest valid manifest cost one capped read
    each and are named in its report, so a remote cannot hide its valid manifests and cannot
    make the restore hold more than one manifest per remote at a time. With ``want`` every
    other name listed is read too (newest first, at most ``chain.MAX_READS``); otherwise the
    names off the chosen manifest's chain are read once its index is known
    (:func:`_chain_report`), so that the other branches of a fork are named (``branches``).
    The rollback floor ``min_seq`` is checked against the newest valid manifest (Rollback
    when it is lower): one up-to-date remote defeats a rollback by the others
    (docs/threat-model.md, section 5)."""
    found = branches if branches is not None else Branches()

    def scan(r: Backend) -> tuple[set[str], tuple[str, manifest.Manifest] | None]:
        """Examine the manifests of one remote newest first; stop at the first valid one.
        Returns (the names read, the valid one); writes only to the remote's report."""
        rep = src.reports[r.spec]
        tried: set[str] = set()
        try:
            names = src.manifest_names(r)
        except RemoteError as e:
            rep.reachable, rep.error = False, e.message
            return tried, None
        for nm, listed in names:
            m = _valid_manifest(keys, src, r, nm, listed)
            tried.add(nm)
            if isinstance(m, str):
                rep.bad_manifests.append(f"{nm}: {m}")
                continue
            rep.best_seq = m.seq
            return tried, (nm, m)
        return tried, None

    found.started = time.monotonic()
    ex = ThreadPoolExecutor(max_workers=max(1, len(src.remotes)))
    scans = {r.spec: ex.submit(scan, r) for r in src.remotes}
    ex.shutdown(wait=False)
    pending = set(scans.values())
    while pending:
        done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
        _merge(found, done)
        if late_ok and want is None and pending and _enough(found, src, scans, min_seq):
            now = time.monotonic()
            found.grace_end = now + hedging.grace(now - found.started)
            break
    found.late = {spec: f for spec, f in scans.items() if f in pending}
    answered = [r.spec for r in src.remotes if r.spec not in found.late]
    reps = [src.reports[spec] for spec in answered]
    if not found.valid:
        details = "; ".join(
            f"{r.label}: {r.error or (r.bad_manifests[0] if r.bad_manifests else 'no manifest')}"
            for r in reps
        )
        bad = [b for r in reps for b in r.bad_manifests]
        if bad and all(b.endswith(manifest.OTHER_VAULT) for b in bad):
            raise WrongKey(
                f"the remotes hold a vault other than this key's ({details}): give that "
                "vault's keyfile or seed. If this is a strategy's master key, it opens no "
                "tier directly: write the tier's seed with `vaultfs strategy seed TIER --out "
                "FILE` and give `--seed-file FILE` (drills: `vaultfs drill … --tier TIER`)"
            )
        if bad:
            raise IntegrityError(f"no validly signed manifest for this key ({details})")
        raise NotEnoughRemotes(f"no manifest found on the given remotes ({details})")
    newest = max(m.seq for m in found.valid.values())
    if newest < min_seq:
        raise Rollback(
            f"rollback detected: the newest manifest on the remotes is #{newest}, "
            f"but #{min_seq} was already seen"
        )
    if want is not None:  # the branch asked for may be below every remote's newest
        _read_the_rest(keys, src, found)
    where = _listed(src)
    found.holders |= {nm: [r.label for r, _l in where[nm]] for nm in found.valid}
    found.used = select(found, want)
    return found.valid[found.used], _answer_warnings(src, answered, newest)


def _answer_warnings(src: ShardSource, specs: Iterable[str], newest: int) -> list[str]:
    """What the manifest scans of the remotes ``specs`` found wrong: a newest valid manifest
    below #``newest`` (stale), manifests refused."""
    out = []
    for spec in specs:
        rep = src.reports[spec]
        if rep.reachable and rep.best_seq is not None and rep.best_seq < newest:
            out.append(f"{rep.label} is stale: newest manifest #{rep.best_seq} < #{newest}")
        out += [f"{rep.label}: rejected manifest {b}" for b in rep.bad_manifests]
    return out


def _hear_in_grace(src: ShardSource, found: Branches) -> tuple[list[str], bool]:
    """Wait for the remotes :func:`find_manifest` left late until its grace ends
    (``found.grace_end``): those that answered by then count as if they had answered first,
    listed for the shards they hold (:meth:`ShardSource.list_all`) and no longer late.
    Returns the warnings about them (:func:`_answer_warnings`) and whether one of them holds
    a valid manifest newer than ``found.used`` (the caller then chooses again)."""
    if not found.late:
        return [], False
    used = found.valid[found.used].seq
    wait(list(found.late.values()), timeout=max(0.0, found.grace_end - time.monotonic()))
    heard = [spec for spec, f in found.late.items() if f.done()]
    _merge(found, [found.late.pop(spec) for spec in heard])
    src.list_all(skip=found.late)
    newer = any(m.seq > used for m in found.valid.values())
    return _answer_warnings(src, heard, used), newer


def _merge(found: Branches, scans: Iterable[Future]) -> None:
    """Add what finished scans of :func:`find_manifest` found to ``found``."""
    for f in scans:
        tried, got = f.result()
        found.tried |= tried
        if got is not None:
            found.valid.setdefault(*got)


def _enough(found: Branches, src: ShardSource, scans: dict[str, Future], min_seq: int) -> bool:
    """Whether the remotes that answered so far are enough to go on without the others: k
    of them (k of the newest valid manifest found) reachable, and that manifest at or above
    the rollback floor (below it, only a remote still answering could hold the newer one)."""
    if not found.valid:
        return False
    newest = max(found.valid.values(), key=lambda m: m.seq)
    if newest.seq < min_seq:
        return False
    answered = [s for s, f in scans.items() if f.done() and src.reports[s].reachable]
    return len(answered) >= newest.contents.k


def check_late(
    keys: VaultKeys, src: ShardSource, found: Branches, index: Index, said: Iterable[str] = ()
) -> list[str]:
    """After a restore that went on without the remotes :func:`find_manifest` left behind
    (``found.late``): wait for them, at most until :data:`chain.CHECK_BOUND` seconds after
    the manifests were first examined. Raises Rollback when one of them holds a valid
    manifest newer than the one restored from (the remotes restored from are behind or
    rolled back: the files written are the older state). Returns warnings: each remote that
    did not answer in time (not checked), and other branches of a fork found on the late
    remotes that are not already in ``said``."""
    if not found.late:
        return []
    left = chain.CHECK_BOUND - (time.monotonic() - found.started)
    done, pending = wait(list(found.late.values()), timeout=max(0.0, left))
    _merge(found, done)
    used = found.valid[found.used]
    warnings = [
        f"{src.reports[spec].label} did not answer within {chain.CHECK_BOUND:g}s: not checked "
        "for a newer manifest or another branch (docs/format.md 10.3)"
        for spec, f in found.late.items()
        if f in pending
    ]
    warnings += _answer_warnings(src, [s for s, f in found.late.items() if f in done], used.seq)
    found.late = {spec: f for spec, f in found.late.items() if f in pending}
    newer = [n for n, m in found.valid.items() if m.seq > used.seq]
    if newer:
        where = _listed(src)
        found.holders |= {n: [r.label for r, _l in where[n]] for n in newer}
        top = max(newer, key=lambda n: found.valid[n].seq)
        raise Rollback(
            f"restored from manifest {found.describe(found.used)}, but a remote that answered "
            f"late holds the newer {found.describe(top)}: the other remotes are behind or "
            "rolled back, so the files written are the older state. Bring those remotes up "
            "to date from the writing machine (`vaultfs flush`, `vaultfs repair`) and restore "
            f"again, or keep the older state knowingly with --manifest {used.link.short}"
        )
    seen = set(said)
    return warnings + [w for w in _chain_report(keys, src, found, index) if w not in seen]


def _valid_manifest(
    keys: VaultKeys, src: ShardSource, r: Backend, name: str, listed: int
) -> manifest.Manifest | str:
    """Manifest ``name`` of ``r`` read and verified, or why it was refused."""
    blob = src.read_manifest(r, name, listed)
    if isinstance(blob, str):
        return blob
    try:
        m = manifest.read(keys, blob)
    except IntegrityError as e:
        return e.message
    if m.seq != manifest.seq_of_name(name):
        return f"name does not match signed sequence {m.seq}"
    return m


def _listed(src: ShardSource) -> dict[str, list[tuple[Backend, int]]]:
    """Manifest name -> (remote, listed size) of every reachable remote listing it (a remote
    whose listing has not come back yet is left out: :meth:`ShardSource.listed_yet`)."""
    where: dict[str, list[tuple[Backend, int]]] = defaultdict(list)
    for r in src.remotes:
        if not src.reports[r.spec].reachable or not src.listed_yet(r):
            continue
        try:
            names = src.manifest_names(r)
        except RemoteError:
            continue
        for nm, listed in names:
            where[nm].append((r, listed))
    return where


def _read_the_rest(
    keys: VaultKeys, src: ShardSource, found: Branches, skip: frozenset[str] = frozenset()
) -> None:
    """Read every manifest name the remotes list that was not read yet and is not in
    ``skip``, newest first, at most ``chain.MAX_READS`` (one holder after another until one
    serves a valid one); note every remote listing each valid one."""
    where = _listed(src)
    rest = sorted((nm for nm in where if nm not in found.tried and nm not in skip), reverse=True)
    found.unread = max(0, len(rest) - chain.MAX_READS)
    for nm in rest[: chain.MAX_READS]:
        found.tried.add(nm)
        for r, listed in where[nm]:
            m = _valid_manifest(keys, src, r, nm, listed)
            if not isinstance(m, str):
                found.valid[nm] = m
                break
            src.reports[r.spec].bad_manifests.append(f"{nm}: {m}")
    for nm in found.valid:
        found.holders[nm] = [r.label for r, _l in where.get(nm, [])]


def select(found: Branches, want: str | None) -> str:
    """The name of the manifest to use among ``found.valid``: with no ``want`` the newest
    (at one sequence number, the one most remotes list, then the smallest name); else the one
    ``want`` names: its object name, ``SEQ``, or ``SEQ/HASH`` (a hash prefix, as outputs
    print it). InputError when none or several match."""
    if want is None:
        top = max(m.seq for m in found.valid.values())
        at_top = [n for n, m in found.valid.items() if m.seq == top]
        return min(at_top, key=lambda n: (-len(found.holders.get(n, [])), n))
    w = want.strip().lstrip("#").lower()
    seq_s, _sep, prefix = w.partition("/")
    hits = [
        n
        for n, m in found.valid.items()
        if n == want
        or (seq_s.isdigit() and int(seq_s) == m.seq and m.hash.hex().startswith(prefix))
    ]
    listing = ", ".join(found.valid[n].link.short for n in sorted(found.valid, reverse=True))
    if not hits:
        raise InputError(f"no validly signed manifest {want!r} on the remotes (found: {listing})")
    if len(hits) > 1:
        raise InputError(
            f"--manifest {want!r} matches {len(hits)} manifests: add a hash prefix, as in "
            f"{', '.join(found.valid[n].link.short for n in hits)}"
        )
    return hits[0]


def _chain_report(keys: VaultKeys, src: ShardSource, found: Branches, index: Index) -> list[str]:
    """Read the manifest names not on the chain of the one used (its index remembers its
    ancestors, ``manifest_chain``: an honest vault costs no read here), place every valid
    manifest on or off that chain and warn about each other branch."""
    ours = manifests.chain_names(index) | {found.used}
    _read_the_rest(keys, src, found, frozenset(ours))
    found.off_chain = [n for n in found.valid if n not in ours]
    line = _line_after(found)  # an older manifest asked for: its successors are no fork
    found.off_chain = [n for n in found.off_chain if n not in line]
    used = found.describe(found.used)
    out = [
        f"fork: the remotes hold another branch, newest {found.describe(n)}; restoring from "
        f"{used} (choose a branch with --manifest SEQ/HASH)"
        for n in found.heads()
    ]
    if found.unread:
        out.append(f"{found.unread} manifest name(s) not examined (more than {chain.MAX_READS})")
    return out


def _line_after(found: Branches) -> set[str]:
    """The off-chain manifests that continue the used one's line: its child, that one's
    child, ... while each has exactly one (a fork is two children of one parent,
    docs/format.md 10.3). Restoring an ancestor of the newest manifest (``--manifest``)
    finds them off the ancestor's chain, yet they are its future, not another branch."""
    children: dict[bytes, list[str]] = defaultdict(list)
    for n in found.off_chain:
        prev = found.valid[n].contents.prev
        if prev is not None:
            children[prev.hash].append(n)
    line: set[str] = set()
    head = found.valid[found.used].hash
    while len(children.get(head, [])) == 1:
        (nxt,) = children[head]
        line.add(nxt)
        head = found.valid[nxt].hash
    return line


def fetch_index(
    keys: VaultKeys,
    m: manifest.Manifest,
    src: ShardSource,
    dest: Path,
    shipped: ShippedObjects | None = None,
) -> list[str]:
    """Rebuild the index database named by a manifest into ``dest``; returns warnings (the
    shards decoded around, with the remotes that served them). Each index shard is read at
    the size the signed manifest records, never more.

    Streams (docs/format.md 11, step 4): the block map's pages are read one at a time into a
    scratch table, then every meta segment is fetched and decoded once and its blocks are
    written in place, so memory holds one segment and one map page whatever the vault's size.
    Every object is checked against its id, every block's length and the total length.

    With ``shipped`` (a home rebuilt from the remotes), the sidecar then records where every
    block and map page is, so the next commit seals only what changed; it counts only once
    the rebuilt index records manifest ``m`` and the segments it names
    (``manifest_segments``)."""
    warnings: list[str] = []
    _map_large_buffers()
    with owned_scratch("vaultfs-idx-") as tmp:
        segs = _IndexSegments(keys, m, src, Path(tmp), warnings)
        desc = segs.describe()
        block, length = desc.block_size, desc.length
        with contextlib.closing(BlockPlan(Path(tmp) / "map.db")) as plan:
            for i in range(len(desc.map)):
                plan.add(i * indexblocks.MAP_FANOUT, map_page(segs, desc, i))
            with open(dest, "wb") as out:
                out.truncate(length)
                for pos, oid, loc in plan.by_segment():
                    data = segs.object(oid, loc)
                    if len(data) != min(block, length - pos * block):
                        raise IntegrityError(f"index block {pos} has {len(data)} bytes")
                    out.seek(pos * block)
                    out.write(data)
            if shipped is not None:
                body = m.contents
                pages = [
                    (p.id, Location(p.uid, p.offset, p.length))
                    for p in (*desc.map, *(body.index_map2 or ()), *body.index_segment_pages)
                ]
                shipped.record(
                    itertools.chain(plan.objects(), pages),
                    m.suite,
                    {seg.uid for seg in desc.segments},
                )
    return warnings


#: Buffers at least this large are mapped for themselves and unmapped when freed, from the
#: first index fetch on (:func:`_map_large_buffers`).
MAP_ABOVE = 256 << 10


def _map_large_buffers() -> None:
    """Have this process map every buffer of :data:`MAP_ABOVE` bytes or more and unmap it
    when freed. glibc's default threshold follows the largest buffer freed, so after the
    first meta segment the shards and segments the index fetch reads (MiB each, several live
    at once) came from the heap, between small objects that outlive them, and the heap grew
    with the segments decoded: the fetch peaked at 86.5 MiB for the 43 meta segments of a
    16 GiB vault's index, 76.0 for the 4 of a 1 GiB one; 75.6 and 69.4 mapped
    (docs/benchmarks.md, "lifetime"). Mapped, they cost a page fault per 4 KiB touched
    (~16 MiB a 4 MiB meta segment); the data path's own buffers are the decoder processes',
    which keep theirs (:func:`sealer.tune_malloc`)."""
    from .sealer import keep_freed_buffers

    keep_freed_buffers(MAP_ABOVE, 2 * MAP_ABOVE)


def index_description(
    keys: VaultKeys, m: manifest.Manifest, src: ShardSource, warnings: list[str]
) -> manifest.IndexDescription:
    """The whole index description of manifest ``m`` (:func:`manifest.index_description`):
    free for one level; for two, the second-level pages are fetched from ``src`` (warnings
    about shards decoded around are added to ``warnings``). For the readers that need only
    which meta segments a manifest names (verify, repair, home rebuild)."""
    with owned_scratch("vaultfs-idx-") as tmp:
        return _IndexSegments(keys, m, src, Path(tmp), warnings).describe()


def remote_index_description(vault: Vault, m: manifest.Manifest) -> manifest.IndexDescription:
    """:func:`index_description` of manifest ``m`` from ``vault``'s active remotes and
    upload queue (listed only when the index has second-level pages to fetch)."""
    src = ShardSource(vault.remotes(), vault.queue_dir)
    if m.contents.index_map2 is not None:
        src.list_all()
    return index_description(vault.keys, m, src, [])


def map_page(
    segs: _IndexSegments, desc: manifest.IndexDescription, i: int
) -> list[tuple[bytes, Location]]:
    """Page ``i`` of the block map ``desc`` names: the (object id, location) of blocks
    ``128·i`` on, checked against its id and its length (docs/format.md 9). The one answer to
    "where is block j" (page ``j // 128``, entry ``j % 128``) for both ways of reading an
    index: :func:`fetch_index` and the lazy view (:func:`open_lazy_index`, which keeps the
    pages' bytes instead: :func:`map_page_bytes`)."""
    return indexblocks.decode_map_page(map_page_bytes(segs, desc, i))


def map_page_bytes(segs: _IndexSegments, desc: manifest.IndexDescription, i: int) -> bytes:
    """The plaintext of page ``i`` of the block map, checked as :func:`map_page` says: whole
    entries, as many as the blocks from ``128·i`` on (read one with
    :func:`indexblocks.map_entry`)."""
    blocks = indexblocks.block_count(desc.length, desc.block_size)
    if len(desc.map) != indexblocks.map_pages(desc.length, desc.block_size):
        raise IntegrityError("the manifest's index map does not cover the index length")
    page = desc.map[i]
    data = segs.object(page.id, Location(page.uid, page.offset, page.length))
    first = i * indexblocks.MAP_FANOUT
    count, odd = divmod(len(data), indexblocks.ENTRY.size)
    if odd or count != min(indexblocks.MAP_FANOUT, blocks - first):
        raise IntegrityError(f"index map page {i} of {len(data)} bytes is not its blocks' entries")
    return data


#: Bytes of decoded meta segments the lazy view keeps (a record that no range read delivers
#: costs its whole segment, once).
SEGMENT_CACHE_BYTES = 16 << 20
#: Map pages the lazy view keeps, as their bytes (7 KiB each: 1.75 MiB at most; decoded into
#: Python objects a page took ~40 KiB, 4 MiB of a full restore's memory at 16 GiB).
MAP_PAGES_KEPT = 256
#: Bytes of a shard object before the segment bytes it holds: our header, then
#: liberasurecode's (docs/format.md 7.1, 7.2).
PAYLOAD_AT = segment.HEADER_SIZE + erasure.FRAGMENT_HEADER


class _IndexSegments:
    """The meta segments a manifest names, and the index objects in them.

    Whole segments are fetched and decoded through the shard reader (decoding around missing
    and corrupt shards) and kept up to ``keep`` bytes, at least the last one (the streaming
    fetch reads the objects grouped by segment). With ``ranged`` (the lazy view), an object
    of a segment not kept is first read by range reads of just the data-shard bytes that hold
    its record (the code is systematic: docs/format.md 7.3; the whitening is seekable: 7.1),
    and only when that fails (a shard missing, a record that does not open) from the whole
    segment. Every object is opened and checked against its id before it is returned."""

    def __init__(
        self,
        keys: VaultKeys,
        m: manifest.Manifest,
        src: ShardSource,
        tmp: Path,
        warnings: list[str],
        ranged: bool = False,
        keep: int = 0,
    ) -> None:
        self.keys, self.suite, self.src, self.tmp, self.warnings = keys, m.suite, src, tmp, warnings
        self.ranged, self.keep = ranged, keep
        self.body = m.contents
        # until :meth:`describe`: the segments the manifest itself names
        self.named = {seg.uid: seg for seg in self.body.index_segments}
        self.segments: OrderedDict[bytes, bytes] = OrderedDict()
        self.kept = 0

    def describe(self) -> manifest.IndexDescription:
        """The manifest's whole index description (second-level pages read from the
        segments the manifest names); every meta segment it lists is readable after."""
        desc = manifest.index_description(
            self.body, lambda p: self.object(p.id, Location(p.uid, p.offset, p.length))
        )
        self.named = {seg.uid: seg for seg in desc.segments}
        return desc

    def object(self, oid: bytes, loc: Location) -> bytes:
        """Index object ``oid`` at ``loc``, opened and checked against its id."""
        seg = self.named.get(loc.uid)
        if seg is None:
            raise IntegrityError(
                f"the index map names meta segment {loc.uid.hex()}, which the manifest does not"
            )
        if loc.offset + loc.length > seg.used:
            raise IntegrityError(f"index object {oid.hex()[:16]}… lies outside its segment")
        if self.ranged and loc.uid not in self.segments:
            got = self._ranged(oid, loc, seg)
            if got is not None:
                return got
        data = self._segment(loc.uid, seg)
        return indexblocks.open_record(
            self.keys.metadata_key,
            self.keys.vault_id,
            oid,
            data[loc.offset : loc.offset + loc.length],
            self.suite,
        )

    def _refs(self, seg: manifest.IndexSegment) -> list[ShardRef]:
        return self.src.refs("meta", [(s.idx, s.name, s.hash, s.size) for s in seg.shards])

    def _ranged(self, oid: bytes, loc: Location, seg: manifest.IndexSegment) -> bytes | None:
        """The object read from just the shard bytes that hold its record: data shard *i*
        holds segment bytes [i·P, (i+1)·P) (the code is systematic); when it is out of reach,
        the same range of k other shards decodes to them (:func:`erasure.decode_range`).
        None when the bytes cannot be had or do not open (named in the warnings): the caller
        reads the whole segment, which decodes around what lies."""
        sizes = {s.size for s in seg.shards}
        payload = sizes.pop() - PAYLOAD_AT if len(sizes) == 1 else 0
        if payload <= 0 or payload * seg.k < seg.size:
            return None
        refs = sorted(self._refs(seg), key=lambda r: preference(r, seg.k))
        alg = seg.ec_alg or erasure.EC_ISA_L_RS_VAND
        record = bytearray()
        served: set[str] = set()
        pos, end = loc.offset, loc.offset + loc.length
        while pos < end:
            i, a = divmod(pos, payload)
            b = min(end - i * payload, payload)
            pieces: dict[int, bytes] = {}
            # data shard i itself when in reach; else (or if it fails) any k shards
            for ref in sorted(refs, key=lambda r: r.idx != i):
                got = self.src.read_range("meta", ref, PAYLOAD_AT + a, PAYLOAD_AT + b)
                if got is None:
                    continue
                off = erasure.FRAGMENT_HEADER + a
                pieces[ref.idx] = segment.whiten(
                    self.keys.audit_key, ref.name, ref.idx, got[0], off
                )
                served.add(f"{got[1]}: shard {ref.name} (index {ref.idx})")
                if i in pieces or len(pieces) == seg.k:
                    break
            try:
                record += erasure.decode_range(pieces, i, seg.k, alg)
            except IntegrityError:  # too few shards within reach, or a singular set
                return None
            pos = i * payload + b
        try:
            return indexblocks.open_record(
                self.keys.metadata_key, self.keys.vault_id, oid, bytes(record), self.suite
            )
        except IntegrityError:
            # one shard served them: it lied; several: the whole segment's read finds which
            blame = f"{served.pop()}: " if len(served) == 1 else ""
            self.warnings.append(
                f"{blame}the bytes read for index object {oid.hex()[:16]}… do not open; "
                f"reading the whole meta segment {loc.uid.hex()}"
            )
            return None

    def _segment(self, uid: bytes, seg: manifest.IndexSegment) -> bytes:
        got = self.segments.get(uid)
        if got is not None:
            self.segments.move_to_end(uid)
            return got
        refs = self._refs(seg)
        into = self.tmp / uid.hex()
        into.mkdir()
        try:
            fetched = self.src.fetch([("meta", r) for r in self.src.choose(refs, seg.k)], into)
            what = f"meta segment {uid.hex()}"
            # the earliest manifests name no algorithm: they predate algorithm 2
            alg = seg.ec_alg or erasure.EC_ISA_L_RS_VAND
            data = _read_segment(
                self.src, "meta", refs, seg.k, seg.n, seg.size, fetched, self.warnings, what,
                alg, self.keys.audit_key,
            )  # fmt: skip
        finally:
            shutil.rmtree(into)
        self.segments[uid] = data
        self.kept += len(data)
        while len(self.segments) > 1 and self.kept > self.keep:
            _uid, old = self.segments.popitem(last=False)
            self.kept -= len(old)
        return data


class _LazyBlocks:
    """``read_block`` of the lazy view: block j's entry from its map page
    (:func:`map_page_bytes`, :data:`MAP_PAGES_KEPT` pages kept), then the block itself,
    checked against its id."""

    def __init__(self, segs: _IndexSegments, desc: manifest.IndexDescription) -> None:
        self.segs, self.desc = segs, desc
        self.pages: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, j: int) -> bytes:
        p, at = divmod(j, indexblocks.MAP_FANOUT)
        page = self.pages.get(p)
        if page is None:
            page = self.pages[p] = map_page_bytes(self.segs, self.desc, p)
            while len(self.pages) > MAP_PAGES_KEPT:
                self.pages.popitem(last=False)
        else:
            self.pages.move_to_end(p)
        return self.segs.object(*indexblocks.map_entry(page, at))


def open_lazy_index(
    keys: VaultKeys, m: manifest.Manifest, src: ShardSource, tmp: Path, warnings: list[str]
) -> LazyIndex | None:
    """The lazy view (vaultfs/index/lazy.py) of the index manifest ``m`` names: each query
    reads only the index blocks it touches, each checked against its id (range reads first,
    :class:`_IndexSegments`). Warnings about shards decoded around are added to ``warnings``
    as the blocks are read, for as long as the view is used; ``tmp`` holds segments being
    fetched. None when the index needs a migration (:func:`open_lazy`): fetch it whole."""
    tmp.mkdir(parents=True, exist_ok=True)
    segs = _IndexSegments(keys, m, src, tmp, warnings, ranged=True, keep=SEGMENT_CACHE_BYTES)
    desc = segs.describe()
    return open_lazy(desc.length, desc.block_size, _LazyBlocks(segs, desc))


class Row(NamedTuple):
    """One snapshot entry as stored in the index (see index.SCHEMA, table entries); path
    and target in file-system form (names.fs_path)."""

    id: int
    path: str
    type: str
    mode: int
    mtime_ns: int
    size: int
    target: str | None
    uid: int | None
    gid: int | None
    xattrs: str | None
    link: int | None
    rdev: int | None

    @classmethod
    def of(cls, r: tuple) -> Row:
        target = None if r[6] is None else fs_path(r[6])
        return cls(r[0], fs_path(r[1]), *r[2:6], target, *r[7:])


SPECIAL = {"p": stat.S_IFIFO, "s": stat.S_IFSOCK, "c": stat.S_IFCHR, "b": stat.S_IFBLK}


def _make_special(p: Path, e: Row) -> str | None:
    """Create a fifo, socket or device node; a reason instead when it cannot be made."""
    if e.type in ("c", "b") and os.geteuid() != 0:
        return "device nodes are restored only as root"
    try:
        os.mknod(p, SPECIAL[e.type] | 0o600, e.rdev or 0)
    except OSError as exc:
        return exc.strerror
    return None


class _FdCache:
    """A decoder's open target files, the ``size`` most recently used."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.fds: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int:
        """A descriptor for writing the file at ``path``, which :func:`_create_files` made.
        InputError when ``path`` is now a hard link (someone swapped the entry since): the
        restore's files have one link until its last step, and a restore never writes into
        a file elsewhere."""
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        if os.fstat(fd).st_nlink != 1:
            os.close(fd)
            raise InputError(
                f"{path} was replaced by a hard link while the restore wrote it: restore "
                "never writes into a file it did not make. Restore into a directory nothing "
                "else writes to"
            )
        self.fds[path] = fd
        if len(self.fds) > self.size:
            _p, old = self.fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _safe_target(root: Path, rel: str) -> Path:
    """``root / rel`` for a snapshot path ``rel`` (:func:`check_name`), ``root`` a real path.
    InputError naming the symlink when a directory on the way is one: restore never writes
    through a symlink, whether it points outside the target or inside it."""
    check_name(rel)
    p = root / rel
    if os.path.realpath(p.parent) != str(p.parent):
        up = p.parent
        while up != root and not up.is_symlink():
            up = up.parent
        if up == root:  # the target itself changed under the restore
            raise InputError(
                f"refusing to write {rel!r}: the target {root} was moved or replaced while "
                "the restore ran; run it again"
            )
        raise _symlink_in_the_way(up)
    return p


def _symlink_in_the_way(p: Path) -> InputError:
    """The refusal of a symlink ``p`` in the target where the snapshot writes (exit 18)."""
    return InputError(
        f"{p} is a symlink (to {os.readlink(p)}): restore never writes through a symlink, "
        "and its target is untouched. Remove or rename it, or restore into an empty "
        "directory, then run again"
    )


def _clear_for(p: Path, what: str) -> None:
    """Make room at ``p`` for a new entry of type ``what`` (a --force restore): whatever is
    there is unlinked, so a hard link to a file elsewhere is replaced, never written into.
    InputError (exit 18) for a symlink where a file goes (:func:`_symlink_in_the_way`) and
    for a directory, which is never removed."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise _in_the_way(p, "a directory", what)
    if stat.S_ISLNK(st.st_mode) and what == "a file":
        raise _symlink_in_the_way(p)
    os.unlink(p)


def _in_the_way(p: Path, found: str, what: str) -> InputError:
    return InputError(
        f"{p} is {found} where the snapshot has {what}: move it away, or restore into an "
        "empty directory, then run again"
    )


#: Most bytes a whole-snapshot restore downloads ahead while the key is derived.
READ_AHEAD_BYTES = 512 << 20


def read_ahead_budget() -> int:
    """:data:`READ_AHEAD_BYTES`, or an eighth of the memory available if that is less (the
    staging area is usually memory-backed /dev/shm)."""
    avail = READ_AHEAD_BYTES
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024 // 8
                break
    except (OSError, ValueError):
        pass
    return min(READ_AHEAD_BYTES, avail)


#: memory-backed: where fetched shards are staged when it has room (:func:`_staging_dir`)
SHM = "/dev/shm"
#: a restore's staging directories: fetched batches (:func:`restore_files`) and what a
#: whole-snapshot restore reads ahead (the command line); the pid in their names
#: (:func:`scratch.owned_tempdir`) lets the next restore remove those a killed one left
STAGING_PREFIXES = ("vaultfs-restore-", "vaultfs-ahead-")


def staging_tempdir(prefix: str) -> Path:
    """A new staging directory ``<prefix><pid>-*`` (``prefix`` one of
    :data:`STAGING_PREFIXES`): in /dev/shm when roomy, else the temporary directory. First
    the staging directories of restores that died (killed: no clean-up ran) are removed
    from both, so their shards give the memory back; a live restore's are left alone."""
    for parent in (SHM, None):
        for p in STAGING_PREFIXES:
            sweep_dead_dirs(p, parent)
    return Path(owned_tempdir(prefix, _staging_dir()))


#: Fetched shards wait in memory-backed /dev/shm when it has this much room (what was read
#: ahead and the batches fetched ahead, each at most :func:`read_ahead_budget` bytes), else
#: in the temporary directory.
STAGING_ROOM = 1 << 30


def _staging_dir() -> str | None:
    """Where fetched shards are staged: /dev/shm (no writeback, cheap unlink) when roomy."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize >= STAGING_ROOM and os.access(SHM, os.W_OK):
        return SHM
    return None


@dataclass
class _RestoreContext:
    """What a decoder needs; inherited by the forked decoder processes, never pickled."""

    vault_id: bytes
    chunk_id_key: bytes
    audit_key: bytes  # shard objects are whitened under it
    data_keys: dict[int, bytes]
    epoch_suites: dict[int, int]
    src: ShardSource


_ctx: _RestoreContext | None = None
_fds: _FdCache | None = None


def _decoder_init(ctx: _RestoreContext, pdeathsig: bool) -> None:
    global _ctx, _fds
    from .sealer import _set_pdeathsig, tune_malloc

    if pdeathsig:
        _set_pdeathsig()
    tune_malloc()
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the restoring process's
    _ctx, _fds = ctx, _FdCache()


def _restore_segment(job: tuple) -> tuple[int, int, list[str]]:
    """Decoder: decode one data segment from its fetched shards, open and check every chunk,
    write the runs into the target files, except all-zero chunks: the files are new and sized
    by ftruncate (:func:`_create_files`), so those stay holes and a sparse file comes back
    sparse. Returns (batch, bytes restored, warnings)."""
    bi, sid, size, k, n, epoch, alg, refs, paths, items = job
    ctx, fds = _ctx, _fds
    assert ctx is not None and fds is not None
    warnings: list[str] = []
    staged = {nm: Fetched(Path(p), holder) for nm, (p, holder) in paths.items()}
    what = f"data segment {sid}"
    seg = memoryview(
        _read_segment(ctx.src, "data", refs, k, n, size, staged, warnings, what, alg, ctx.audit_key)
    )
    key, suite, vid, idkey = (
        ctx.data_keys[epoch],
        ctx.epoch_suites[epoch],
        ctx.vault_id,
        ctx.chunk_id_key,
    )
    written = 0
    run_target, run_pos, run_parts = None, -1, []
    end = -1

    def flush_run() -> None:
        nonlocal written
        written += write_parts(fds.get(run_target), run_parts, run_pos)

    for cid, off, ln, target, pos, plain in items:
        data = envelope.open_chunk(key, vid, cid, seg[off : off + ln], suite)
        if len(data) != plain or blake3.blake3(data, key=idkey).digest() != cid:
            raise IntegrityError("a restored chunk does not match its id (wrong data)")
        if holes.is_hole(data):  # left a hole: the file is new, sized by ftruncate
            written += len(data)
            continue
        if target == run_target and pos == end:
            run_parts.append(data)
        else:
            if run_parts:
                flush_run()
            run_target, run_pos, run_parts = target, pos, [data]
        end = pos + len(data)
    if run_parts:
        flush_run()
    return bi, written, warnings


#: Bytes per write call. Larger writes into the page cache cost far more kernel time on the
#: machines measured (457 MB written in 16 MiB calls: 0.8-1.6 s of system time; in 1 MiB
#: calls: 0.1-0.25 s), so a gathered run of chunks is cut at this size.
WRITE_MAX = 1 << 20


def _batches(order: list[int], sizes: dict[int, int]) -> list[list[int]]:
    """Segments in fetch batches: a small first one (:data:`FIRST_BATCH`), so decoding
    starts while the rest is still being fetched, then :data:`BATCH_SEGMENTS` each, every
    batch at most half of :func:`read_ahead_budget` bytes of shards (so one is fetched while
    the one before is decoded), and at least one segment."""
    budget = read_ahead_budget() // 2
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_bytes, limit = 0, FIRST_BATCH
    for sid in order:
        if cur and (len(cur) >= limit or cur_bytes + sizes[sid] > budget):
            batches.append(cur)
            cur, cur_bytes, limit = [], 0, BATCH_SEGMENTS
        cur.append(sid)
        cur_bytes += sizes[sid]
    if cur:
        batches.append(cur)
    return batches


def write_parts(fd: int, parts: list[bytes], pos: int) -> int:
    """Write ``parts`` back to back at ``pos`` in gathered calls of at most :data:`WRITE_MAX`
    bytes (and the system's limit of iovecs), with no joined copy. Returns the bytes written."""
    start, i, n = pos, 0, len(parts)
    while i < n:
        j, size = i + 1, len(parts[i])
        while j < n and j - i < 512 and size + len(parts[j]) <= WRITE_MAX:
            size += len(parts[j])
            j += 1
        group = parts[i:j]
        done = os.pwritev(fd, group, pos)
        if done != size:  # short write (rare): finish it piece by piece
            blob = memoryview(b"".join(group))[done:]
            while blob:
                k = os.pwrite(fd, blob, pos + done)
                blob, done = blob[k:], done + k
        pos += size
        i = j
    return pos - start


@contextlib.contextmanager
def _decoders(ctx: _RestoreContext) -> Iterator[Callable]:
    """``run(jobs)`` → results of :func:`_restore_segment`, in completion order, from
    DECODERS forked processes (or this thread)."""
    if DECODERS <= 0:
        _decoder_init(ctx, False)
        try:
            yield lambda jobs: map(_restore_segment, jobs)
        finally:
            assert _fds is not None
            _fds.close()
        return
    import multiprocessing

    main = threading.current_thread() is threading.main_thread()
    pool = multiprocessing.get_context("fork").Pool(
        DECODERS, initializer=_decoder_init, initargs=(ctx, main)
    )
    try:
        yield lambda jobs: pool.imap_unordered(_restore_segment, jobs)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def restore_files(
    keys: VaultKeys,
    index: Index,
    src: ShardSource,
    to: Path,
    snapshot: str = "latest",
    include: list[str] | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    total_cb: Callable[[int], None] | None = None,
    each_include: bool = False,
) -> tuple[str, int, int, list[str]]:
    """Write a snapshot's files under ``to``. Returns (snapshot uid, files, logical bytes
    restored (each name of a hard link counted, as `snapshots` lists them), warnings).
    ``each_include``: InputError, before anything is written, when one of ``include`` matches
    nothing (a user's --include; readers that ask for files a snapshot may lack leave it off).
    ThawNeeded when shards were out of reach because remotes hold them in archive storage."""
    snap_uid, entries = _entries(index, snapshot, include, each_include)
    files = [e.id for e in entries if e.type == "f"]
    epochs = snapshots.segment_epochs(index, files)
    epoch_suites = _check_suites(keys, index, epochs)
    to = _prepare_target(to, force)
    marker = to / INCOMPLETE
    marker.write_text(f"{snap_uid}\n")  # until the last file is finished
    file_rows, link_later = _create_files(to, entries, force)
    total = sum(e.size for e in file_rows)
    if total_cb:
        total_cb(total)
    # a window of chunks at a time, so memory stays flat however large the snapshot, through
    # one fetch/decode pipeline (a segment two windows need is fetched twice: rare, only I/O)
    batches = _window_batches(index, src, _plan_windows(to, index, file_rows))
    try:
        warnings = _write_chunks(keys, index, src, batches, epochs, epoch_suites, progress)
    except NotEnoughRemotes as e:
        frozen = [r for r in src.reports.values() if r.error and needs_thaw(r.error)]
        if not frozen:
            raise
        raise ThawNeeded(
            f"{e.message}: thaw needed on {', '.join(r.label for r in frozen)} (archive "
            f"storage; request a restore of the vault's objects there, wait, and rerun): "
            f"{frozen[0].error}"
        ) from None
    _finish_entries(to, entries, link_later, force, warnings)
    marker.unlink()
    if note := snapshots.newest_of_name(index, snapshot):
        warnings.insert(0, note)
    # the snapshot's logical bytes, as `snapshots` lists them: each name of a hard link counts
    # (``total``, the bytes written, counts a hard-link group once)
    return snap_uid, len(entries), sum(e.size for e in entries if e.type == "f"), warnings


def _entries(
    index: Index, snapshot: str, include: list[str] | None, each_include: bool = False
) -> tuple[str, list[Row]]:
    """(uid, entries to restore) of ``snapshot`` (uid, name or 'latest'), cut to ``include``;
    raises before anything is written for a missing snapshot, an unsafe name, an unknown
    entry type, or (``each_include``) an include that matches nothing."""
    snap_id, snap_uid = snapshots.require(index, snapshot)
    if include:
        inc = [i.strip("/") for i in include]
        entries = [Row.of(r) for r in snapshots.entries_on(index, snap_id, inc)]
        if not entries:
            raise InputError(f"nothing in snapshot {snap_uid} matches --include {include}")
        unmatched = [
            i for i in inc if not any(e.path == i or e.path.startswith(i + "/") for e in entries)
        ]
        if unmatched and each_include:
            raise InputError(
                f"--include {unmatched[0]} matches nothing in snapshot {snap_uid} "
                "(see `vaultfs ls`)"
            )
    else:
        entries = [Row.of(r) for r in snapshots.full_entries(index, snap_id)]
    for e in entries:
        check_name(e.path)  # a manifest naming ../x or /etc/x is refused before any write
        if e.type not in ("f", "d", "l", *SPECIAL):
            raise IntegrityError(f"unknown entry type {e.type!r} for {e.path!r}")
    return snap_uid, entries


def _check_suites(keys: VaultKeys, index: Index, epochs: set[int]) -> dict[int, int]:
    """Refuse (before anything is written) data the restore reads, sealed in key ``epochs``
    (:func:`snapshots.segment_epochs` of its files), under a suite ``keys`` or the index
    retire; returns {epoch: suite}. Only those epochs count (a one-file restore through the
    lazy view reads no other segment rows)."""
    keys.retired_suites |= keyring.retired_suites(index)
    epoch_suites = {epoch: suite for epoch, suite, _wrapped in keyring.epochs(index)}
    for epoch in epochs:
        keys.check_suite(epoch_suites.get(epoch, 0))
    return epoch_suites


#: a file in the restore target while a restore writes into it: files are created at their
#: full size before their bytes arrive, so an interrupted restore leaves files that look whole
INCOMPLETE = ".vaultfs-restore-incomplete"


def _prepare_target(to: Path, force: bool) -> Path:
    """The restore target as a real absolute directory, made if missing; TargetNotEmpty when
    it is a file, or holds something and ``force`` is not given."""
    to = Path(os.path.abspath(to))
    if to.exists():
        if not to.is_dir():
            raise TargetNotEmpty(f"restore target {to} exists and is not a directory")
        if (to / INCOMPLETE).exists() and not force:
            raise TargetNotEmpty(
                f"restore target {to} holds an interrupted restore (its files may be "
                "incomplete); rerun with --force to finish it"
            )
        if any(to.iterdir()) and not force:
            raise TargetNotEmpty(
                f"restore target {to} is not empty; pass --force to restore into it"
            )
    to.mkdir(parents=True, exist_ok=True)
    return Path(os.path.realpath(to))


def _create_files(
    to: Path, entries: list[Row], force: bool
) -> tuple[list[Row], list[tuple[Row, Path]]]:
    """Directories, then empty files sized to their final length; later members of a
    hard-link group become links to the first one and are not written again. Returns (the
    files to write, (later member, first member's path) of each hard link)."""
    for e in entries:
        if e.type == "d":
            d = _safe_target(to, e.path)
            if d.is_symlink():
                raise _symlink_in_the_way(d)
            if os.path.lexists(d) and not d.is_dir():
                raise _in_the_way(d, "a file", "a directory")
            d.mkdir(parents=True, exist_ok=True)
    file_rows: list[Row] = []
    link_first: dict[int, Path] = {}
    link_later: list[tuple[Row, Path]] = []
    for e in entries:
        if e.type != "f":
            continue
        if e.link is not None and e.link in link_first:
            link_later.append((e, link_first[e.link]))
            continue
        p = _safe_target(to, e.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        _safe_target(to, e.path)
        if force:
            _clear_for(p, "a file")
        # a new inode, always: holes of the ftruncate read as zeros (the writers skip zero
        # chunks), and nothing the target held (a hard link elsewhere) is written into
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if os.path.islink(p):
                raise _symlink_in_the_way(p) from None
            raise
        try:
            os.ftruncate(fd, e.size)
        finally:
            os.close(fd)
        if e.link is not None:
            link_first[e.link] = p
        file_rows.append(e)
    return file_rows, link_later


#: Chunks a restore plans at a time (~512 MiB of data at the 32 KiB average chunk). A plan
#: costs ~350 bytes of Python objects a chunk (a whole-snapshot plan held ~120 MB at 16 GiB);
#: a window of 16,384 ~6 MB. Smaller than a 1 GiB snapshot, so a full restore's memory is the
#: same from 1 GiB up (at 65,536 it was 70 MiB at 1 GiB, 103-112 MiB from 4 GiB up). The
#: fetch/decode pipeline runs on through the windows (:func:`_write_chunks`).
WINDOW_CHUNKS = 1 << 14


def _plan_windows(
    to: Path, index: Index, file_rows: list[Row], window: int | None = None
) -> Iterator[dict[int, list[tuple[bytes, int, int, str, int, int]]]]:
    """Where the chunks of ``file_rows`` go, a window of about ``window`` (default
    :data:`WINDOW_CHUNKS`; at most twice that) chunks at a time: segment -> [(cid, offset in
    segment, record length, file path, file offset, plain length)]. A large file spans
    windows. Raises IntegrityError when a file's chunk lengths do not add up to its size."""
    window = window or WINDOW_CHUNKS
    plan: dict[int, list[tuple[bytes, int, int, str, int, int]]] = defaultdict(list)
    held = 0
    for e in file_rows:
        target = str(_safe_target(to, e.path))
        pos = 0
        for rows in snapshots.file_chunk_pages(index, e.id, window):
            for cid, seg, off, ln, plain in rows:
                plan[seg].append((cid, off, ln, target, pos, plain))
                pos += plain
            held += len(rows)
            if held >= window:
                yield plan
                plan, held = defaultdict(list), 0
        if pos != e.size:
            raise IntegrityError(f"{e.path}: chunk lengths add up to {pos}, not {e.size}")
    if plan:
        yield plan


class _SegmentJob(NamedTuple):
    """One data segment to restore: its layout (size, k, n, key epoch, erasure algorithm),
    its shards, and its chunks (a :func:`_plan_windows` entry)."""

    sid: int
    layout: tuple[int, int, int, int, int]
    refs: list[ShardRef]
    items: list[tuple[bytes, int, int, str, int, int]]


def _window_batches(
    index: Index,
    src: ShardSource,
    windows: Iterator[dict[int, list[tuple[bytes, int, int, str, int, int]]]],
) -> Iterator[list[_SegmentJob]]:
    """The segments of each plan of ``windows`` in fetch batches (:func:`_batches`), with their
    layouts and shards: one window's rows are held at a time, planned when the batches of
    the window before have all been taken. In a window, the segments whose k shards the
    read-ahead already holds (:attr:`ShardSource.staged`) come first, so the first batches
    need no download and the decoders start while the links fetch the rest."""
    for plan in windows:
        seg_ids = sorted(plan)
        seg_rows = segments.layouts(index, seg_ids)
        shard_rows = segments.shard_hashes(index, seg_ids)
        refs = {sid: src.refs("data", shard_rows[sid]) for sid in seg_ids}
        del shard_rows
        held = {
            sid
            for sid in seg_ids
            if sum(r.name in src.staged for r in refs[sid]) >= seg_rows[sid][1]
        }
        order = sorted(seg_ids, key=lambda sid: sid not in held)  # stable: by id otherwise
        for batch in _batches(order, {sid: seg_rows[sid][0] for sid in seg_ids}):
            yield [_SegmentJob(sid, seg_rows[sid], refs[sid], plan[sid]) for sid in batch]
        del plan, seg_rows, refs  # not held while the next window is planned


def _write_chunks(
    keys: VaultKeys,
    index: Index,
    src: ShardSource,
    batches: Iterator[list[_SegmentJob]],
    epochs: set[int],
    epoch_suites: dict[int, int],
    progress: Callable[[int], None] | None,
) -> list[str]:
    """Fetch the segments of ``batches`` (:func:`_window_batches`; sealed under key
    ``epochs``), decode them and write their chunks into the files. Returns warnings.

    The fetch thread draws the batches (and so plans the windows) and downloads them one
    after another, each as soon as the shards of the batches not yet written leave it room
    under :func:`read_ahead_budget` (one batch is always let through): the links keep moving
    the next batches while the decoders work, instead of waiting for the batch before to be
    written. A batch's staged shards are deleted, and its room given back, once every
    segment of it is written."""
    data_keys = {
        e: keys.unwrap_data_key(e, w, s) for e, s, w in keyring.epochs(index) if e in epochs
    }
    warnings: list[str] = []
    tmp_root = staging_tempdir("vaultfs-restore-")
    budget = read_ahead_budget()
    ctx = _RestoreContext(
        keys.vault_id, keys.chunk_id_key, keys.audit_key, data_keys, epoch_suites, src
    )
    left: dict[int, int] = {}  # batch -> segments not yet written
    held: dict[int, int] = {}  # batch -> bytes of shards staged for it, until it is written
    room = threading.Condition()  # notified when a batch is written (or on abort)
    abort = threading.Event()
    #: fetched batches in order: (batch number, jobs, its directory, what was fetched, the
    #: read-ahead files it owns); then an exception if the fetch thread failed, then None
    ready: queue.SimpleQueue = queue.SimpleQueue()
    dirs: dict[int, Path] = {}
    ahead: dict[int, list[Path]] = {}  # read-ahead files a batch uses, deleted with it

    def fetch_ahead() -> None:
        try:
            for bi, batch in enumerate(batches):
                wanted = [("data", r) for job in batch for r in src.choose(job.refs, job.layout[1])]
                nbytes = sum(r.size or 0 for _kind, r in wanted)
                with room:
                    while held and sum(held.values()) + nbytes > budget and not abort.is_set():
                        room.wait()
                    if abort.is_set():
                        return
                    held[bi] = nbytes
                d = tmp_root / f"b{bi}"
                d.mkdir()
                fetched = src.fetch(wanted, d)
                # the batch owns the read-ahead files it uses (deleted once it is written): a
                # later batch that needs one of those shards again downloads it anew
                own = [nm for nm, f in fetched.items() if src.staged.get(nm) == f]
                ready.put((bi, batch, d, fetched, [src.staged.pop(nm).path for nm in own]))
        except BaseException as e:
            ready.put(e)
        finally:
            ready.put(None)

    # the decoders fork before the fetch thread starts: no child inherits a busy thread
    with _decoders(ctx) as run, ThreadPoolExecutor(1, thread_name_prefix="vaultfs-fetch") as fx:

        def jobs() -> Iterator[tuple]:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                bi, batch, bdir, fetched, owned = item
                dirs[bi], ahead[bi] = bdir, owned
                if abort.is_set():  # a decoder failed: stop feeding the pool
                    return
                left[bi] = len(batch)
                # queued behind the batches before, so the decoders do not run dry between them
                for job in batch:
                    size, k, n, epoch, alg = job.layout
                    paths = {
                        r.name: (str(f.path), f.holder)
                        for r in job.refs
                        if (f := fetched.get(r.name)) is not None
                    }
                    yield (bi, job.sid, size, k, n, epoch, alg, job.refs, paths, job.items)

        fx.submit(fetch_ahead)
        try:
            for bi, nbytes, warns in run(jobs()):
                warnings += warns
                if progress:
                    progress(nbytes)
                left[bi] -= 1
                if not left[bi]:  # every segment of the batch is written: drop its shards
                    shutil.rmtree(dirs.pop(bi), ignore_errors=True)
                    for p in ahead.pop(bi, []):
                        p.unlink(missing_ok=True)
                    with room:
                        del held[bi]
                        room.notify()
        except BaseException:
            with room:
                abort.set()
                room.notify()
            raise
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)

    return warnings


def _finish_entries(
    to: Path,
    entries: list[Row],
    link_later: list[tuple[Row, Path]],
    force: bool,
    warnings: list[str],
) -> None:
    """Hard links, symbolic links and special files, then owners and xattrs, modes and
    times; what cannot be restored is added to ``warnings``."""
    for e, first in link_later:
        p = _safe_target(to, e.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if force:
            _clear_for(p, "a file")
        os.link(first, p)
    for e in entries:
        if e.type == "l":
            p = _safe_target(to, e.path)
            if force:
                _clear_for(p, "a symlink")
            os.symlink(e.target or "", p)
    skipped: set[str] = set()
    for e in entries:
        if e.type in SPECIAL:
            p = _safe_target(to, e.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if force:
                _clear_for(p, "a special file")
            if (why := _make_special(p, e)) is not None:
                warnings.append(f"{display(e.path)}: not restored ({why})")
                skipped.add(e.path)
    # owners and xattrs, then modes and times (deepest first so parents keep their mtime)
    is_root = os.geteuid() == 0
    for e in sorted(entries, key=lambda e: -e.path.count("/")):
        if e.path in skipped:
            continue
        p = _safe_target(to, e.path)
        if is_root and e.uid is not None and e.gid is not None:
            os.chown(p, e.uid, e.gid, follow_symlinks=False)
        for name, value in xattrs_from_db(e.xattrs).items():
            try:
                os.setxattr(p, name, value, follow_symlinks=False)
            except OSError as exc:
                warnings.append(
                    f"{display(e.path)}: could not set xattr {display(name)}: {exc.strerror}"
                )
        if e.type != "l":
            os.chmod(p, stat.S_IMODE(e.mode))
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def _open_index(
    keys: VaultKeys,
    m: manifest.Manifest,
    src: ShardSource,
    workdir: Path,
    lazy: bool,
    shipped: ShippedObjects | None,
    warnings: list[str],
) -> Index:
    """The index manifest ``m`` names, as :func:`open_remote_index` describes (the lazy view,
    or fetched whole into ``workdir``/index.db and checked); adds warnings to ``warnings``."""
    if lazy and shipped is None:
        index = open_lazy_index(keys, m, src, workdir / "lazy", warnings)
        if index is not None:
            return index
    dbpath = workdir / "index.db"
    warnings += fetch_index(keys, m, src, dbpath, shipped)
    index = open_shipped(dbpath, keys.chunk_id_key)  # checked, migrated to the current schema
    verify_index_against_manifest(index, m)
    return index


def verify_index_against_manifest(index: Index, m: manifest.Manifest) -> None:
    """Recompute every data segment root from its shards and the vault root; compare. Reads
    the segments a page at a time and folds their roots as they come (:class:`merkle.Root`):
    memory flat in the vault's size."""
    vault_root = merkle.Root()
    for sid, root, shard_roots in segments.data_segment_roots(index):
        if merkle.root(shard_roots) != root:
            raise IntegrityError(f"segment {sid}: Merkle root does not match its shards")
        vault_root.add(root)
    if vault_root.root() != m.contents.vault_root:
        raise IntegrityError("the index does not match the signed vault root in the manifest")


def open_remote_index(
    keys: VaultKeys,
    remotes: list[Backend],
    workdir: Path,
    min_seq: int = 0,
    src: ShardSource | None = None,
    home: Path | None = None,
    want: str | None = None,
    anchor: manifest.Link | None = None,
    branches: Branches | None = None,
    shipped: ShippedObjects | None = None,
    lazy: bool = False,
    late_ok: bool = False,
) -> tuple[Index, ShardSource, manifest.Manifest, list[str]]:
    """Disaster path: find the newest manifest (or the one ``want`` names, :func:`select`),
    fetch and check the index it names; a fork on the remotes is reported in the warnings and
    in ``branches``.

    The index is fetched whole (streamed, :func:`fetch_index`) and its data segments checked
    against the signed vault root, unless ``lazy``: then it is the lazy view
    (:func:`open_lazy_index`), which reads only the blocks the queries touch; every block is
    still checked against the id the signed map names, but the vault-root cross-check, which
    reads every segment and shard row, is left to full restores and ``verify``. The lazy
    view's warnings keep arriving in the returned list while it is queried. An index whose
    schema needs a migration is fetched whole either way.

    Rollback floor: a newest manifest below ``min_seq`` raises Rollback; with ``home``
    (this machine's vault state directory, if it has one) the floor is also the newest
    manifest its index recorded for this vault, so remotes rolled back to an older state are
    refused. ``anchor`` (a receipt's manifest) must be the manifest used or one of its
    ancestors (Rollback otherwise). ``src`` may be a :class:`ShardSource` over ``remotes``
    already started (listing and manifest copies running while the key was unlocked).
    ``shipped``: the sidecar of a home being rebuilt (:func:`fetch_index`). ``late_ok``: go
    on without remotes slow to answer (:func:`find_manifest`): the index is fetched during
    their grace, then those that answered in it are heard (one holding a newer manifest
    makes the choice start again; an index the first to answer cannot give is fetched
    again with them); the caller then calls :func:`check_late` with ``branches`` before it
    reports success."""
    workdir.mkdir(parents=True, exist_ok=True)
    if home is not None:
        min_seq = max(min_seq, seen_manifest_seq(home / "index.db", keys.vault_id.hex()))
    if anchor is not None:
        min_seq = max(min_seq, anchor.seq)
    if src is None:
        src = ShardSource(remotes)
        src.start()
    found = branches if branches is not None else Branches()
    while True:
        m, warnings = find_manifest(keys, src, min_seq, want, found, late_ok)
        src.stop_read_ahead()  # from here on the index says what to fetch
        # the newest signed manifest says which suites the vault retired and names its
        # SLH-DSA key
        keys.retired_suites |= m.contents.retired_suites
        if keys.slhdsa_public is None and m.contents.slhdsa_public:
            keys.slhdsa_public = m.contents.slhdsa_public
            keys.slhdsa_param = SLHDSA_BY_SIG_ALG.get(m.sig_alg, keys.slhdsa_param)
        src.list_all(skip=found.late)
        reachable = [r for r in src.reports.values() if r.reachable]
        if not reachable:
            raise NotEnoughRemotes("none of the given remotes is reachable")
        said = len(warnings)
        index: Index | None = None
        try:
            index = _open_index(keys, m, src, workdir, lazy, shipped, warnings)
        except NotEnoughRemotes:
            if not found.late:
                raise
            del warnings[said:]  # too few shards on the first to answer: hear the rest first
        # the grace for the late remotes ran while the index was fetched
        heard, newer = _hear_in_grace(src, found)
        if not newer:
            if index is None:
                index = _open_index(keys, m, src, workdir, lazy, shipped, warnings)
            warnings += heard
            break
        if index is not None:
            index.close()  # one heard in the grace holds a newer manifest: choose again
    warnings += _chain_report(keys, src, found, index)
    if (
        anchor is not None
        and anchor != m.link
        and manifests.hash_of(index, anchor.seq) != anchor.hash
    ):
        elsewhere = any(x.link == anchor for x in found.valid.values())
        raise Rollback(
            f"the receipt's manifest {anchor.short} is not on the chain of {m.link.short}, "
            "the manifest restored from: "
            + (
                "the remotes hold it on another branch (a fork): restore that branch with "
                f"--manifest {anchor.short} (and this --receipt)"
                if elsewhere
                else "the remotes hide it (rolled back or forked)"
            )
        )
    return index, src, m, warnings
