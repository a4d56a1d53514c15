"""Challenge-response audits of every remote (`vaultfs verify`; docs/operations.md, "Verify").

What one audit of one remote does, in order:

1. **Manifest**: list ``manifests/`` and check the newest validly signed manifest. A remote whose
   newest one is older than the latest manifest it was sent is *stale* (rolled back). The signed
   vault root must equal the root the local index recomputes. Every other validly signed
   manifest (one this index's chain did not write: ``manifest_chain``) is a *fork*, reported
   with its place in the chain; the objects it may use are not called foreign.
2. **Listing**: list ``data/`` and ``meta/`` with sizes. A live shard the index places there that
   is absent is *missing*; one of the wrong size is *corrupt* (truncated or grown); an object the
   index does not place there is *foreign*. Listings cost a few bytes per object.
3. **Challenges**, drawn with :mod:`secrets` when the audit is planned, so the remote cannot
   predict them: a uniformly random 64 KiB Merkle block among all blocks the remote holds, and a
   random 2 KiB *piece* of it, fetched with a ranged read (``Backend.cat(sub, name, off, n)``:
   through the rclone daemon when it runs, so a challenge costs one GET and no process).
   The piece is checked against its keyed tag (``audit_tags``), which binds it to the block's
   Merkle leaf; the leaf is checked by its Merkle proof up to the shard root, the shard root up
   to the segment root and the segment root up to the vault root signed in the latest manifest
   (meta shards: up to their segment root, whose shard hashes the manifest signs). Provider
   hashes (ETags, ``rclone hashsum``) are never used. A shard without tags (an index restored
   from an old format) is challenged by whole blocks against the leaf itself.

Sampling math. If a remote lost a fraction x of its blocks, m independent random block checks
all miss the damage with probability (1−x)^m, so reaching confidence C needs
m = ⌈ln(1−C)/ln(1−x)⌉ checks: 459 for x = 1 %, C = 99 %, whatever the remote's size. We draw
blocks without replacement, so the exact miss probability is the hypergeometric
Π_{i<m} (N−L−i)/(N−i) with L = ⌈xN⌉ lost of N blocks, which is never larger; when m ≥ N−L+1
(small remotes) every block is checked and the confidence is 1. Bytes read per check are one
piece (2 KiB), so 99 % confidence costs about 918 KiB whatever the remote holds; a piece check
detects a lost or replaced block with certainty and a single flipped bit inside the block only if
it falls in the piece (``--read-all`` reads everything and catches every bit).

When every challenged object together is small (``WHOLE_OBJECT_BUDGET``), the audit fetches
those objects whole in one transfer and checks every block of each instead: fewer rclone
calls for small remotes, a stronger check, the same random choice of objects.

Progress is persisted (``audit_runs``, ``audit_plan``): a run cut off by ``--max-duration`` or
an outage keeps its remaining challenges and the next ``verify`` with the same mode resumes it.
Findings (``audit_findings``) mark shards ``lost`` so that ``vaultfs repair`` rebuilds them.

4. **Object lock** (an immutable vault only, not in repair's listing scan): the lock of the
   newest manifest and a random sample of the shard objects as large as the block checks
   (every object with ``--read-all``) is read back (:mod:`objectlock`); on a remote whose
   spec asks for one, an object without it, or locked for less than asked, is *unlocked*: a
   finding in the report (exit 12) that repair does not act on, since the bytes are intact.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import chain, manifest, merkle, objectlock, segment
from .audittag import PIECE, piece_tag, piece_tags, stored_tag, tagger
from .backends import open_backend
from .errors import (
    BadRemote,
    IntegrityError,
    ObjectMissing,
    RemoteError,
    ThawNeeded,
    Unreachable,
)
from .index import Index, manifests, segments
from .index import audit as audit_table
from .index import remotes as remote_table
from .index.segments import ShardRow
from .remotes import Remote, resolve_remote
from .restore import remote_index_description
from .scratch import owned_scratch
from .shardreader import intact

if TYPE_CHECKING:
    from .vault import Vault

BLOCK = merkle.BLOCK_SIZE
DEFAULT_CONFIDENCE = 0.99
DEFAULT_LOSS = 0.01
#: Fetch challenged objects whole when together they are at most this many bytes.
WHOLE_OBJECT_BUDGET = 8 * 1024 * 1024
#: Concurrent ranged reads per remote.
RANGE_WORKERS = 4
MODES = ("confidence", "sample", "read-all")
#: What to do about a local index that does not match what the vault signed.
REBUILD_ADVICE = (
    "move the home directory aside and make it again from the remotes with "
    "`vaultfs home rebuild --from REMOTE …` (any k of them)"
)

log = logging.getLogger("vaultfs.verify")


# -- tags ------------------------------------------------------------------------------------
def record_tags(index: Index, audit_key: bytes, shards: list) -> None:
    """Store audit tags for freshly built shard objects (``segment.Shard``: name, body, blocks).

    Called on the write path before the shard rows commit; an orphan row (crash in between) is
    harmless and pruned by :func:`index.audit.forget_orphans`.
    """
    rows = [(s.name, PIECE, piece_tags(audit_key, s.body, s.blocks)) for s in shards]
    with index.tx() as db:
        audit_table.put_tags(db, rows)


# -- sampling math ---------------------------------------------------------------------------
def checks_needed(confidence: float = DEFAULT_CONFIDENCE, loss: float = DEFAULT_LOSS) -> int:
    """⌈ln(1−C)/ln(1−x)⌉: random checks that detect a loss of fraction x with confidence C."""
    if not (0 < confidence < 1 and 0 < loss < 1):
        raise ValueError("confidence and loss must be in (0, 1)")
    return math.ceil(math.log(1 - confidence) / math.log(1 - loss))


def confidence_reached(checked: int, blocks: int, loss: float = DEFAULT_LOSS) -> float:
    """Probability that ``checked`` distinct random blocks out of ``blocks`` hit at least one of
    ⌈loss·blocks⌉ lost ones (hypergeometric; 1.0 once every block could not have been missed)."""
    if blocks <= 0:
        return 1.0
    lost = max(1, math.ceil(loss * blocks))
    if checked >= blocks - lost + 1:
        return 1.0
    miss = 1.0
    for i in range(checked):
        miss *= (blocks - lost - i) / (blocks - i)
    return 1.0 - miss


# -- what the index says ---------------------------------------------------------------------
class Anchor:
    """The latest manifest's signed vault root and Merkle proofs of segments up to it."""

    def __init__(self, index: Index) -> None:
        row = manifests.newest(index)
        self.seq, self.root = (row[0], bytes(row[1])) if row else (0, merkle.EMPTY_ROOT)
        data = segments.data_roots_by_id(index)
        self.ids = [r[0] for r in data]
        self.roots = [bytes(r[1]) for r in data]
        self.covered = self._covered(index)
        self.pos = {sid: i for i, sid in enumerate(self.ids[: self.covered])}
        self._proofs: dict[int, bool] = {}
        self._lock = threading.Lock()

    def _covered(self, index: Index) -> int:
        if self.seq == 0:
            return 0
        first_meta = segments.first_meta(index, self.seq)
        guess = sum(1 for i in self.ids if first_meta is None or i < first_meta)
        for n in [guess, *range(len(self.roots), -1, -1)]:
            if merkle.root(self.roots[:n]) == self.root:
                return n
        if manifests.unshipped_since(index) is not None:
            raise IntegrityError(
                "the local index holds changes not yet published (a repair or prune was "
                "interrupted): run `vaultfs repair` or `vaultfs prune` to publish them, then "
                "verify again"
            )
        raise IntegrityError(
            f"the local index does not match the vault root it signed in manifest #{self.seq}: "
            f"the index was altered; {REBUILD_ADVICE}"
        )

    def segment_ok(self, seg_id: int, seg_root: bytes) -> bool | None:
        """True if the segment's root proves up to the signed vault root, False if its proof
        fails, None if the segment is newer than the latest manifest (checked to the index)."""
        pos = self.pos.get(seg_id)
        if pos is None:
            return None
        with self._lock:
            hit = self._proofs.get(seg_id)
        if hit is None:
            path = merkle.proof(self.roots[: self.covered], pos)
            hit = merkle.verify_proof(seg_root, path, self.root)
            with self._lock:
                self._proofs[seg_id] = hit
        return hit


# -- the report ------------------------------------------------------------------------------
@dataclass
class RemoteAudit:
    remote: str
    rid: int
    domain: str
    state: str = "ok"
    mode: str = "confidence"
    objects: int = 0
    stored_bytes: int = 0
    blocks: int = 0
    planned: int = 0
    checked: int = 0
    remaining: int = 0
    queued: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    fork: list[str] = field(default_factory=list)  # valid manifests off this index's chain
    #: every manifest in ``fork`` follows this index's newest: the home is stale, no fork
    ahead: bool = False
    unreachable: bool = False
    error: str | None = None
    manifest_seq: int | None = None
    expected_seq: int = 0
    stale_manifest: bool = False
    bytes_read: int = 0
    confidence: float = 0.0
    #: why nothing could be checked (unreachable; every object missing): no confidence then
    unchecked: str | None = None
    complete: bool = False
    resumed: bool = False
    details: dict[str, str] = field(default_factory=dict)
    #: an immutable vault's remotes: the object lock read back (objectlock.LockState.summary)
    lock: str | None = None
    locked: bool | None = None
    #: objects read without the lock their remote's spec asks for (none, ended, or short)
    unlocked: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.missing
            or self.corrupt
            or self.stale
            or self.foreign
            or self.fork
            or self.unreachable
            or self.stale_manifest
            or self.unlocked
        )


@dataclass
class AuditReport:
    remotes: list[RemoteAudit]
    mode: str
    target_confidence: float
    loss: float
    checks_needed: int
    seconds: float = 0.0
    manifest_seq: int = 0
    unsigned_segments: int = 0
    #: live segments with fewer than k placed or queued shards on the active remotes (their
    #: other shards on a remote that left the vault, or known lost): never clean
    below_k: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.below_k and all(r.clean for r in self.remotes)

    @property
    def complete(self) -> bool:
        return all(r.complete or r.unreachable for r in self.remotes)

    @property
    def found(self) -> bool:
        """Whether a remote was found missing, corrupt, stale, foreign or unlocked objects,
        serves an old manifest or holds a fork: what the report's advice acts on (unreachable
        remotes are not)."""
        return bool(self.below_k) or any(
            r.missing
            or r.corrupt
            or r.stale
            or r.foreign
            or r.fork
            or r.stale_manifest
            or r.unlocked
            for r in self.remotes
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clean"] = self.clean
        d["complete"] = self.complete
        for r, rd in zip(self.remotes, d["remotes"], strict=True):
            rd["clean"] = r.clean
        return d


# -- the audit -------------------------------------------------------------------------------
def resolve_remotes(vault: Vault, wanted: list[str] | None) -> list[tuple[int, str, str]]:
    """(id, spec, domain) of the active remotes to audit; ``wanted`` entries match a spec or
    its label (:func:`vaultfs.remotes.resolve_remote`). Raises BadRemote for a name that is not
    an active remote of this vault, InputError for one that names several."""
    rows = remote_table.members(vault.index)
    if not wanted:
        return [(r[0], r[1], r[2]) for r in rows]
    domains = {rid: dom for rid, _spec, dom in rows}
    out = []
    for w in wanted:
        hit = resolve_remote(w, ((rid, spec) for rid, spec, _dom in rows))
        if hit is None:
            raise BadRemote(
                f"remote {w!r} is not part of this vault: see `vaultfs remote list` for its remotes"
            )
        out.append((hit[0], hit[1], domains[hit[0]]))
    return out


class _Ctx:
    def __init__(
        self,
        vault: Vault,
        mode: str,
        sample: float | None,
        deadline: float | None,
        confidence: float,
        loss: float,
        wrap: Callable[[object], object] | None,
        whole_budget: int,
        plan_only: bool,
    ) -> None:
        self.vault = vault
        self.index = vault.index
        self.keys = vault.keys
        self.mode = mode
        self.sample = sample
        self.deadline = deadline
        self.confidence = confidence
        self.loss = loss
        self.wrap = wrap
        self.whole_budget = whole_budget
        self.list_only = plan_only
        self.anchor = Anchor(vault.index)
        self.tagger = tagger(vault.keys.audit_key)
        #: the sizes of this vault's shard objects: an object of another size is no genuine
        #: object of the vault, so it is not downloaded to tell whether it is one
        self.shard_sizes = segments.shard_sizes(vault.index)
        self.seg_ok: dict[int, bool] = {}
        self._described: dict[bytes, manifest.IndexDescription] = {}
        self._describe_lock = threading.Lock()
        self.lock = threading.Lock()
        #: ``progress(done, total)``: bytes read of those the planned checks read, over all
        #: the remotes (each adds its plan when its listing is done)
        self.progress: Callable[[int, int], None] | None = None
        self._tally = [0, 0]

    def count(self, planned: int = 0, read: int = 0) -> None:
        """Add ``planned`` bytes to the total to read and ``read`` to those read; tell
        :attr:`progress`. Called once per remote's plan and once per object checked."""
        if self.progress is None:
            return
        with self.lock:
            self._tally[0] += read
            self._tally[1] += planned
            done, total = self._tally
        self.progress(done, total)

    def describe(self, m: manifest.Manifest) -> manifest.IndexDescription:
        """Manifest ``m``'s whole index description
        (:func:`restore.remote_index_description`), once per manifest for all the remotes
        audited."""
        with self._describe_lock:
            got = self._described.get(m.hash)
            if got is None:
                got = self._described[m.hash] = remote_index_description(self.vault, m)
            return got

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    # chain: shard root -> segment root -> signed vault root (cached per shard/segment)
    def chain_ok(self, sh: ShardRow) -> bool:
        with self.lock:
            hit = self.seg_ok.get(sh.segment)
        if hit is None:
            roots = segments.shard_roots(self.index, sh.segment)
            hit = merkle.root(roots) == sh.seg_root
            if hit and sh.kind == "data":
                hit = self.anchor.segment_ok(sh.segment, sh.seg_root) is not False
            with self.lock:
                self.seg_ok[sh.segment] = hit
        if not hit:
            raise IntegrityError(
                f"segment {sh.segment}: its Merkle records in the local index do not prove up to "
                f"the signed vault root; the index was altered — {REBUILD_ADVICE}"
            )
        leaves = [sh.blocks[i : i + 32] for i in range(0, len(sh.blocks), 32)]
        if merkle.root(leaves) != sh.root:
            raise IntegrityError(f"shard {sh.name}: its leaf hashes do not match its root")
        return True

    def leaf_ok(self, sh: ShardRow, block: int, data: bytes) -> bool:
        leaves = [sh.blocks[i : i + 32] for i in range(0, len(sh.blocks), 32)]
        leaf = merkle.leaf_hash(data)
        return leaf == leaves[block] and merkle.verify_proof(
            leaf, merkle.proof(leaves, block), sh.root
        )


def _classify_body(ctx: _Ctx, sh: ShardRow, body: bytes) -> tuple[str, str] | None:
    """None if the object is intact, else (kind, detail) with kind 'corrupt' or 'stale'."""
    if intact(body, sh.hash, sh.size):
        return None
    return _why_bad(ctx, sh, segment.object_hash(body), len(body))


def _why_bad(ctx: _Ctx, sh: ShardRow, digest: bytes | None, size: int | None) -> tuple[str, str]:
    """Why the object served as ``sh`` is not it: 'stale' when what the remote serves
    (``digest``, its BLAKE3, when it was read whole) is another genuine object of this vault,
    else 'corrupt'. Shard headers name no segment (docs/format.md 7.1), so only the hash the
    index records for every object can tell."""
    if digest is not None:
        other = segments.shard_by_hash(ctx.index, digest)
        if other is not None and other != (sh.segment, sh.idx):
            return (
                "stale",
                f"holds another genuine object of this vault (segment {other[0]}, index {other[1]})",
            )
    if size is not None and size != sh.size:
        return "corrupt", f"size {size}, expected {sh.size}"
    return "corrupt", "content does not match its Merkle leaves"


def _read_size(sh: ShardRow, blk: int, piece: int) -> int:
    """The bytes one challenge reads (:meth:`_RemoteAuditor._check_one`): block ``blk`` of
    ``sh``, or one piece of it (``piece`` >= 0), or the whole object (``blk`` < 0)."""
    if blk < 0:
        return sh.size
    blen = min(BLOCK, sh.size - blk * BLOCK)
    return blen if piece < 0 else min(PIECE, blen - piece * PIECE)


class _RemoteAuditor:
    def __init__(self, ctx: _Ctx, rid: int, spec: str, domain: str) -> None:
        self.ctx = ctx
        self.rid = rid
        self.spec = spec
        # the rclone daemon when it runs, as for a restore: the challenges' hundreds of small
        # ranged reads are then GETs on its open connections, not one rclone process each;
        # within the vault's pace, so a remote the audit found silent is not waited for
        # again by the same command (repair's flush after its scan)
        self.b = open_backend(spec, rid, wrap=ctx.wrap, paces=ctx.vault.paces)
        self.rep = RemoteAudit(Remote(spec).label, rid, domain, mode=ctx.mode)
        self.run_id: int | None = None
        self.tree: dict[str, dict[str, int]] = {}
        self.unknown: list[tuple[str, str]] = []  # (sub, name) listed, not placed here by the index
        self.prefetched: dict[str, bytes] = {}  # manifest name -> bytes fetched with objects

    # -- findings ----------------------------------------------------------------------------
    def _finding(self, sh: ShardRow, kind: str, detail: str) -> None:
        self._findings([(sh, kind, detail)])

    def _findings(self, found: list[tuple[ShardRow, str, str]]) -> None:
        """Record findings (shard, kind, detail) in one transaction: a lost remote's listing
        finds hundreds at once, and a commit each took ~1 ms (0.2 s of a repair's scan)."""
        if not found:
            return
        now = time.time()
        with self.ctx.index.tx() as db:
            for sh, kind, detail in found:
                audit_table.record_finding(db, sh.id, self.rid, kind, detail, now)
                if self.run_id is not None:
                    audit_table.drop_shard_challenges(db, self.run_id, sh.id)
        for sh, kind, detail in found:
            self.rep.details[sh.path] = f"{kind}: {detail}"

    def run(self) -> RemoteAudit:
        self.rep.queued = segments.queued_count(self.ctx.index, self.rid)
        try:
            # what is placed before the listing starts is what it must show: on a live mount
            # the pusher places more meanwhile (shards, manifests), which a later audit covers
            self.rep.expected_seq = manifests.newest_placed(self.ctx.index, self.rid) or 0
            placed = {
                sh.id
                for sh in segments.live_shards(self.ctx.index, self.rid)
                if sh.state == "placed"
            }
            self.tree = self.b.list_tree()  # one listing: data/, meta/, manifests/ with sizes
            shards = self._listing(placed)
            if self.ctx.list_only:
                self._prefetch_manifest()
            else:
                self._challenges(shards)  # fetching whole objects prefetches the manifest too
            signed = self._manifests()
            self._foreign(signed)
            if self.ctx.vault.immutable and not self.ctx.list_only:
                self._locks(shards)
        except Unreachable as e:
            self.rep.unreachable, self.rep.error = True, e.message
        except RemoteError as e:
            # a failure that is neither an outage nor an answer: report as unreachable
            self.rep.unreachable, self.rep.error = True, e.message
        finally:
            self.rep.bytes_read = self.b.bytes_read
            self._finish()
        return self.rep

    # -- 1. manifests ------------------------------------------------------------------------
    def _manifest_names(self) -> list[str]:
        """Manifest names newest first, but not those listed larger than a manifest can be."""
        names = self.tree.get("manifests", {})
        return sorted(
            (
                nm
                for nm, size in names.items()
                if manifest.seq_of_name(nm) is not None and size <= manifest.MAX_BYTES
            ),
            reverse=True,
        )

    def _manifests(self) -> set[str] | None:
        """Check the newest manifest of this index's chain on the remote (stale? its vault
        root and index shards as the index says?) and report every validly signed manifest
        off the chain (``fork``). Names this chain wrote are read newest first until one
        verifies; every other name is read once (at most ``chain.MAX_READS``), so the cap
        follows the forks, not the history. Returns the ``meta/`` names the off-chain
        manifests sign, or None when one of them was left unread (a fork may hide there)."""
        idx = self.ctx.index
        latest = self.ctx.anchor.seq
        ours = manifests.chain_names(idx)
        best: manifest.Manifest | None = None
        signed: set[str] = set()
        off: dict[str, manifest.Manifest] = {}  # name -> valid manifest off this chain
        for nm, size in self.tree.get("manifests", {}).items():
            if manifest.seq_of_name(nm) is not None and size > manifest.MAX_BYTES:
                self.rep.foreign.append(f"manifests/{nm}")
                self.rep.details[f"manifests/{nm}"] = (
                    f"listed at {size:,} bytes, more than a manifest can be; not read"
                )
        names = self._manifest_names()
        others = [nm for nm in names if nm not in ours]
        complete = len(others) <= chain.MAX_READS
        if not complete:
            self.rep.details["manifests/"] = (
                f"{len(others) - chain.MAX_READS} manifest name(s) not examined"
            )
        for nm in [nm for nm in names if nm in ours] + others[: chain.MAX_READS]:
            if nm in ours and best is not None:
                continue
            m = self._read_manifest(nm, branch=nm not in ours)
            if m is None:
                continue
            if nm in ours:
                best = m
            else:
                off[nm] = m
                signed |= {s.name for seg in self.ctx.describe(m).segments for s in seg.shards}
        head = manifests.newest_link(idx)
        by_hash = {m.hash: m for m in off.values()}
        self.rep.ahead = bool(off) and all(chain.follows(m, head, by_hash) for m in off.values())
        for nm, m in off.items():
            self.rep.fork.append(f"manifests/{nm}")
            self.rep.details[f"manifests/{nm}"] = (
                f"stale home: manifest {m.summary()} follows this home's newest #{latest} "
                "(another machine, or a newer copy of this home, wrote it): run `vaultfs "
                "home rebuild --from ...` to carry on from the remotes; its objects are kept"
                if self.rep.ahead
                else f"fork: manifest {m.summary()} is validly signed but not of this vault's "
                "chain (another writer, or a home that went back in time); its objects "
                "are kept"
            )
        self.rep.manifest_seq = best.seq if best else None
        if self.rep.expected_seq and (best is None or best.seq < self.rep.expected_seq):
            self.rep.stale_manifest = True
            have = f"#{best.seq}" if best else "none"
            self.rep.details["manifests/"] = (
                f"stale: newest valid manifest {have}, expected #{self.rep.expected_seq}"
            )
        if best is not None and best.seq == latest:
            if best.contents.vault_root != self.ctx.anchor.root:
                raise IntegrityError(
                    f"{self.rep.remote}: the signed vault root of manifest #{latest} differs "
                    f"from the local index's: the index was altered; {REBUILD_ADVICE}"
                )
            ours_signed = {
                s.name: s.hash for seg in self.ctx.describe(best).segments for s in seg.shards
            }
            for name, h in segments.meta_shard_hashes(idx, latest):
                if name in ours_signed and ours_signed[name] != bytes(h):
                    raise IntegrityError(
                        f"index shard {name} does not match the hash signed in manifest "
                        f"#{latest}: the index was altered; {REBUILD_ADVICE}"
                    )
        return signed if complete else None

    def _prefetch_manifest(self) -> None:
        """Fetch the newest listed manifest with one bulk transfer (a call to the rclone
        daemon, where ``cat`` would start a process), cut off past the size a manifest can
        have, into :attr:`prefetched`. Whatever does not arrive so is read by
        :meth:`_read_manifest` with ``cat``, as before."""
        newest = self._manifest_names()[:1]
        if not newest:
            return
        with owned_scratch("vaultfs-audit-") as tmp:
            try:
                self.b.get("manifests", newest, Path(tmp), manifest.MAX_BYTES + 1)
            except Unreachable:
                raise
            except RemoteError:
                return
            for nm in newest:
                mp = Path(tmp) / nm
                if mp.is_file() and mp.stat().st_size <= manifest.MAX_BYTES:
                    self.prefetched[nm] = mp.read_bytes()

    def _read_manifest(self, nm: str, branch: bool = False) -> manifest.Manifest | None:
        """Manifest ``nm`` of this remote, verified; None (and a ``foreign`` finding for a
        forged or misnamed one) when it is not a valid manifest. ``branch``: a name off this
        index's chain, read with :func:`manifest.read_branch` (a suite retired since is no
        reason to call another branch's manifest forged)."""
        try:
            blob = self.prefetched.pop(nm, None) or self.b.cat(
                "manifests", nm, 0, manifest.MAX_BYTES + 1
            )
            if len(blob) > manifest.MAX_BYTES:
                raise IntegrityError("longer than a manifest can be; not read further")
            read = manifest.read_branch if branch else manifest.read
            m = read(self.ctx.keys, blob)
        except ObjectMissing:
            return None
        except IntegrityError as e:
            self.rep.foreign.append(f"manifests/{nm}")
            self.rep.details[f"manifests/{nm}"] = f"forged or corrupt manifest: {e.message}"
            return None
        if m.seq != manifest.seq_of_name(nm):
            self.rep.foreign.append(f"manifests/{nm}")
            self.rep.details[f"manifests/{nm}"] = "name does not match its signed sequence"
            return None
        return m

    def _foreign(self, signed: set[str] | None) -> None:
        """Record the objects listed here that the index does not place here as *foreign*
        (repair moves them to ``quarantine/``), but not the index shards another branch's
        manifest signs, and while the remote holds such a branch (a fork) none at all under
        ``data/``: that branch's data cannot be told from junk without its index. ``signed``
        None: a fork may be hidden among unread names, so nothing is recorded."""
        kept = []
        foreign = []
        for sub, nm in self.unknown:
            if signed is None or nm in signed or (self.rep.fork and sub == "data"):
                kept.append((sub, nm))
            else:
                foreign.append((sub, nm))
        audit_table.set_foreign(self.ctx.index, self.rid, foreign, time.time())
        for sub, nm in foreign:
            self.rep.foreign.append(f"{sub}/{nm}")
            self.rep.details.setdefault(f"{sub}/{nm}", "foreign: not an object of this vault here")
        why = (
            "not this home's chain; kept: the remote holds newer manifests (stale home)"
            if signed is not None and self.rep.ahead
            else "not this chain's; kept: the remote holds another branch (a fork)"
            if signed is not None
            else "not this chain's; kept: more manifest names than examined (a fork may hide)"
        )
        for sub, nm in kept:
            self.rep.details.setdefault(f"{sub}/{nm}", why)

    def _locks(self, present: list[ShardRow]) -> None:
        """Read back the object lock of this remote's objects (an immutable vault's protection,
        docs/operations.md "Immutable vaults"): every present shard object and manifest with
        ``--read-all``, else the newest manifest and as many random shard objects as the mode
        checks blocks. On a remote whose spec asks for a lock (objectlock.wanted) each object
        without one in force, or locked for less than the retention asked, is a finding
        (``unlocked``); elsewhere the lock is reported only: such a remote's protection, if
        any, is the server's own. Skipped once the audit's time budget is spent."""
        if self.ctx.deadline is not None and time.monotonic() > self.ctx.deadline:
            self.rep.lock = "lock not checked: the audit's time budget (--max-duration) is spent"
            return
        names = self._manifest_names()
        if self.ctx.mode == "read-all":
            paths = [s.path for s in present] + [f"manifests/{nm}" for nm in names]
        else:
            if self.ctx.mode == "sample":
                want = math.ceil(len(present) * (self.ctx.sample or 0) / 100)
            else:
                want = checks_needed(self.ctx.confidence, self.ctx.loss)
            rng = secrets.SystemRandom()  # chosen now, like the block challenges
            paths = [s.path for s in rng.sample(present, min(want, len(present)))]
            paths += [f"manifests/{nm}" for nm in names[:1]]
        try:
            st = objectlock.read(self.spec, paths)
        except RemoteError as e:  # the audit stands; only the lock is unknown
            self.rep.lock = f"lock not checked: {e.message}"
            return
        self.rep.lock, self.rep.locked = st.summary(), st.ok
        if objectlock.wanted(self.spec) is None:
            return
        for path, why in sorted({**st.unlocked, **st.short}.items()):
            self.rep.unlocked.append(path)
            self.rep.details[path] = f"unlocked: {why}"

    # -- 2. listing --------------------------------------------------------------------------
    def _listing(self, placed: set[int]) -> list[ShardRow]:
        """Compare the listing with the index: each shard placed both before the listing
        (``placed``, shard ids) and after it is checked for presence and size (one placed
        meanwhile may be missing from it, one dropped meanwhile may be gone); every listed
        name the index does not know here, read after the listing, is unknown (a name the
        pusher placed meanwhile is known by then). Returns the shards present."""
        idx = self.ctx.index
        listed = {sub: self.tree.get(sub, {}) for sub in segment.KIND_NAMES.values()}
        rows = segments.live_shards(idx, self.rid)
        # garbage is this vault's too: waiting to be deleted, or kept for good (immutable)
        mine_all = segments.object_names(idx, self.rid) | manifests.garbage_names(idx, self.rid)
        present: list[ShardRow] = []
        revived: list[ShardRow] = []
        # only a shard lost because the listing lacked it may come back by itself (a remote
        # unmounted or offline for a while); one found corrupt or stale waits for repair
        absent = {sid for sid, kind, _d in audit_table.findings(idx) if kind == "missing"}
        found: list[tuple[ShardRow, str, str]] = []
        for sh in rows:
            if sh.state == "lost" and sh.id in absent:
                if listed[sh.kind].get(sh.name) == sh.size and self._intact(sh):
                    revived.append(sh)
                continue
            if sh.state != "placed" or sh.id not in placed:
                continue
            size = listed[sh.kind].get(sh.name)
            if size is None:
                found.append((sh, "missing", "object absent from the listing"))
            elif size >= 0 and size != sh.size:
                why = _why_bad(self.ctx, sh, self._served_digest(sh, size), size)
                found.append((sh, *why))
            else:
                present.append(sh)
        self._findings(found)
        if revived:
            with idx.tx() as db:
                audit_table.revive(db, [sh.id for sh in revived])
            for sh in revived:
                present.append(sh._replace(state="placed"))
                self.rep.details[sh.path] = "revived: present and intact again"
            log.info("%s: %d lost shard(s) present and intact again", self.rep.remote, len(revived))
        self.unknown = [
            (sub, nm)
            for sub, objs in listed.items()
            for nm in objs
            if nm not in mine_all and not nm.startswith(".") and not nm.endswith(".partial")
        ]
        self.rep.objects = len(present)
        self.rep.stored_bytes = sum(s.size for s in present)
        self.rep.blocks = sum(s.nblocks for s in present)
        return present

    def _intact(self, sh: ShardRow) -> bool:
        """Whether the remote serves ``sh`` exactly (its whole object hashes to the index's
        hash): one object read, only for a lost shard the listing shows at its size."""
        try:
            data = self.b.cat(sh.kind, sh.name, 0, sh.size + 1)
        except RemoteError:
            return False
        return len(data) == sh.size and segment.object_hash(data) == sh.hash

    def _served_digest(self, sh: ShardRow, size: int) -> bytes | None:
        """BLAKE3 of the object the remote serves as ``sh`` (listed at ``size`` bytes), read
        whole, for :func:`_why_bad`; None when that size is no shard size of the vault or the
        read does not give ``size`` bytes. Costs one object read, only for objects found bad."""
        if size not in self.ctx.shard_sizes:
            return None
        try:
            data = self.b.cat(sh.kind, sh.name, 0, size + 1)
        except ObjectMissing:
            return None
        return segment.object_hash(data) if len(data) == size else None

    # -- 3. challenges -----------------------------------------------------------------------
    def _plan(self, present: list[ShardRow]) -> None:
        idx = self.ctx.index
        mode = self.ctx.mode
        row = audit_table.open_run(idx, self.rid)
        if row is not None and row[1] == mode and self.ctx.sample is None:
            self.run_id = row[0]
            self.rep.resumed = True
            return
        if row is not None:  # a different kind of audit was asked for: close the old one
            audit_table.close_run(idx, row[0], time.time())
        total = self.rep.blocks
        tagged = audit_table.tagged_on(idx, self.rid, PIECE)
        plan: list[tuple[int, int, int]] = []
        if mode == "read-all":
            plan = [(sh.id, -1, -1) for sh in present]
        else:
            if mode == "sample":
                m = min(total, math.ceil(total * (self.ctx.sample or 0) / 100))
            else:
                m = min(total, checks_needed(self.ctx.confidence, self.ctx.loss))
            picks = sorted(secrets.SystemRandom().sample(range(total), m)) if m else []
            it = iter(picks)
            nxt = next(it, None)
            base = 0
            for sh in present:
                while nxt is not None and nxt < base + sh.nblocks:
                    blk = nxt - base
                    if sh.name in tagged:
                        blen = min(BLOCK, sh.size - blk * BLOCK)
                        piece = secrets.randbelow(max(1, math.ceil(blen / PIECE)))
                    else:
                        piece = -1
                    plan.append((sh.id, blk, piece))
                    nxt = next(it, None)
                base += sh.nblocks
        self.run_id = audit_table.start_run(idx, self.rid, mode, time.time(), total, plan)

    def _challenges(self, present: list[ShardRow]) -> None:
        self._plan(present)
        idx = self.ctx.index
        by_id = {sh.id: sh for sh in present}
        assert self.run_id is not None
        rows = audit_table.challenges(idx, self.run_id)
        gone = [r for r in rows if r[0] not in by_id]
        if gone:  # shards repaired or moved since the plan was drawn
            with idx.tx() as db:
                audit_table.drop_challenges(db, self.run_id, gone)
        rows = [r for r in rows if r[0] in by_id]
        per_shard: dict[int, list[tuple[int, int]]] = {}
        for sid, blk, piece in rows:
            per_shard.setdefault(sid, []).append((blk, piece))
        whole_cost = sum(by_id[s].size for s in per_shard)
        whole = self.ctx.mode == "read-all" or whole_cost <= self.ctx.whole_budget
        if whole:
            self.ctx.count(planned=whole_cost)
            self._whole(by_id, per_shard)
        else:
            self.ctx.count(planned=sum(_read_size(by_id[sid], b, p) for sid, b, p in rows))
            self._ranged(by_id, rows)

    def _done(self, shard: int, answers: list[tuple[int, int]], ok: int, bad: int) -> None:
        assert self.run_id is not None
        with self.ctx.index.tx() as db:
            audit_table.drop_challenges(db, self.run_id, [(shard, b, p) for b, p in answers])
            audit_table.count_answers(db, self.run_id, ok, bad)

    def _whole(self, by_id: dict[int, ShardRow], per_shard: dict[int, list]) -> None:
        order = list(per_shard)
        with owned_scratch("vaultfs-audit-") as tmp:
            i = 0
            while i < len(order):
                if self.ctx.expired():
                    return
                batch, size = [], 0
                while i < len(order) and (not batch or size < 64 * 1024 * 1024) and len(batch) < 64:
                    batch.append(by_id[order[i]])
                    size += by_id[order[i]].size
                    i += 1
                d = Path(tmp) / f"b{i}"
                d.mkdir()
                one_by_one = False
                paths = [sh.path for sh in batch]
                newest = self._manifest_names()[:1]
                if i == len(batch):  # first batch: the newest manifest rides along
                    paths += [f"manifests/{nm}" for nm in newest]
                try:
                    self.b.get("", paths, d)
                except (Unreachable, ThawNeeded):  # not corrupt: ends this remote's audit
                    raise
                except RemoteError:  # some object in the batch is unreadable: find which
                    one_by_one = True
                for nm in newest:
                    mp = d / "manifests" / nm
                    if mp.exists() and mp.stat().st_size <= manifest.MAX_BYTES:
                        self.prefetched[nm] = mp.read_bytes()
                for sh in batch:
                    try:
                        self.ctx.chain_ok(sh)
                        p = d / sh.kind / sh.name
                        answers = per_shard[sh.id]
                        if one_by_one and not p.exists():
                            try:
                                p.parent.mkdir(exist_ok=True)
                                p.write_bytes(self.b.cat(sh.kind, sh.name, 0, sh.size + 1))
                            except ObjectMissing:
                                pass
                            except (Unreachable, ThawNeeded):
                                raise
                            except RemoteError as e:
                                self._finding(sh, "corrupt", f"unreadable: {e.message}")
                                self._done(sh.id, answers, 0, len(answers))
                                continue
                        if not p.exists():
                            self._finding(sh, "missing", "listed, but could not be downloaded")
                            self._done(sh.id, answers, 0, len(answers))
                            continue
                        got = p.stat().st_size  # checked first: read no more than the index says
                        if got != sh.size:
                            digest = None
                            if got in self.ctx.shard_sizes:  # perhaps another genuine object
                                digest = segment.object_hash(p.read_bytes())
                            bad = _why_bad(self.ctx, sh, digest, got)
                        else:
                            bad = _classify_body(self.ctx, sh, p.read_bytes())
                        p.unlink()
                        if bad:
                            self._finding(sh, *bad)
                            self._done(sh.id, answers, 0, len(answers))
                        else:
                            self._done(sh.id, answers, len(answers), 0)
                    finally:
                        self.ctx.count(read=sh.size)

    def _check_one(self, sh: ShardRow, blk: int, piece: int) -> tuple[str, str] | None:
        self.ctx.chain_ok(sh)
        boff = blk * BLOCK
        blen = min(BLOCK, sh.size - boff)
        if piece < 0:
            data = self.b.cat(sh.kind, sh.name, boff, blen)
            if len(data) == blen and self.ctx.leaf_ok(sh, blk, data):
                return None
        else:
            tags = audit_table.tags_of(self.ctx.index, sh.name)
            off = boff + piece * PIECE
            cnt = min(PIECE, blen - piece * PIECE)
            data = self.b.cat(sh.kind, sh.name, off, cnt)
            leaf = sh.blocks[32 * blk : 32 * blk + 32]
            if (
                tags is not None
                and len(data) == cnt
                and piece_tag(self.ctx.tagger, leaf, blk, piece, data)
                == stored_tag(tags, blk, piece)
                and merkle.verify_proof(
                    leaf,
                    merkle.proof(
                        [sh.blocks[i : i + 32] for i in range(0, len(sh.blocks), 32)], blk
                    ),
                    sh.root,
                )
            ):
                return None
        if len(data) < (cnt if piece >= 0 else blen):
            return "corrupt", f"short read at block {blk}: got {len(data)} bytes (truncated?)"
        kind, detail = _why_bad(self.ctx, sh, self._served_digest(sh, sh.size), None)
        if kind == "corrupt":
            where = f"block {blk}" + (f", piece {piece}" if piece >= 0 else "")
            detail = f"wrong bytes at {where}"
        return kind, detail

    def _ranged(self, by_id: dict[int, ShardRow], rows: list[tuple[int, int, int]]) -> None:
        """Answer the challenges with ranged reads, one task per object: its challenges in
        offset order, up to its first bad answer (the object is then a finding and the rest of
        its challenges go with it), objects in random order so a cut-off audit is no bias."""
        per_shard: dict[int, list[tuple[int, int]]] = {}
        for sid, blk, piece in sorted(rows):
            per_shard.setdefault(sid, []).append((blk, piece))
        order = list(per_shard)
        secrets.SystemRandom().shuffle(order)

        def one(sid: int) -> tuple[int, list[tuple[int, int]], tuple[str, str] | None]:
            answered: list[tuple[int, int]] = []
            for blk, piece in per_shard[sid]:
                if self.ctx.expired():
                    break
                try:
                    bad = self._check_one(by_id[sid], blk, piece)
                except ObjectMissing as e:
                    bad = ("missing", e.message)
                answered.append((blk, piece))
                if bad is not None:
                    return sid, answered, bad
            return sid, answered, None

        with ThreadPoolExecutor(max_workers=RANGE_WORKERS) as ex:
            for sid, answered, bad in ex.map(one, order):
                self.ctx.count(read=sum(_read_size(by_id[sid], b, p) for b, p in per_shard[sid]))
                if bad is None:
                    if answered:
                        self._done(sid, answered, len(answered), 0)
                    continue
                if answered[:-1]:
                    self._done(sid, answered[:-1], len(answered) - 1, 0)
                self._done(sid, answered[-1:], 0, 1)
                self._finding(by_id[sid], *bad)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _finish(self) -> None:
        idx = self.ctx.index
        rep = self.rep
        # open findings (this run's and earlier ones not yet repaired) belong in the report
        for name, sub, kind, detail in audit_table.open_findings(idx, self.rid):
            path = f"{sub}/{name}"
            bucket = {"missing": rep.missing, "stale": rep.stale}.get(kind, rep.corrupt)
            if kind != "removed" and path not in bucket:
                bucket.append(path)
                rep.details.setdefault(path, f"{kind}: {detail}")
        if self.run_id is not None:
            blocks, planned, checked, failed, left = audit_table.run_progress(idx, self.run_id)
            rep.planned, rep.checked, rep.remaining = planned, checked, left
            rep.complete = left == 0
        bad = len(rep.missing) + len(rep.corrupt) + len(rep.stale)
        if rep.unreachable and not rep.checked:
            rep.unchecked = f"unreachable ({rep.error})"
        elif bad and not rep.objects:  # a directory gone or moved lists as empty
            what = "all missing" if bad == len(rep.missing) else f"{len(rep.missing)} missing"
            rep.unchecked = (
                f"none of its {bad} objects is there intact ({what}): is it unplugged, or its "
                "directory moved or deleted?"
            )
        if self.run_id is not None:
            if rep.unchecked:  # no block of it was there to check: no confidence in it
                rep.confidence = 0.0
            elif self.ctx.mode == "read-all":
                rep.confidence = 1.0 if rep.complete else 0.0
            else:
                rep.confidence = confidence_reached(checked + failed, blocks, self.ctx.loss)
            audit_table.finish_run(
                idx, self.run_id, rep.bytes_read, rep.confidence, time.time() if left == 0 else None
            )
        elif self.ctx.list_only and not rep.unreachable:
            rep.complete = True
        if rep.unreachable:
            state = "unreachable"
        elif rep.stale_manifest or rep.stale:
            state = "stale"
        elif rep.fork:
            state = "forked"
        elif not rep.clean:
            state = "degraded"
        else:
            state = "ok"
        rep.state = state
        now = time.time()
        summary = None
        if state != "ok":
            summary = rep.error or "; ".join(f"{k}: {v}" for k, v in list(rep.details.items())[:3])
        with idx.tx() as db:
            remote_table.record_health(db, self.rid, state, now, summary)
            remote_table.note_result(db, self.rid, rep.error if rep.unreachable else None, now)


def audit(
    vault: Vault,
    remotes: list[str] | None = None,
    *,
    mode: str = "confidence",
    sample: float | None = None,
    max_duration: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    loss: float = DEFAULT_LOSS,
    wrap: Callable[[object], object] | None = None,
    whole_budget: int = WHOLE_OBJECT_BUDGET,
    list_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Audit the vault's remotes in parallel (one thread each) and return the report.

    ``mode``: 'confidence' (enough random checks for ``confidence`` against ``loss``),
    'sample' (``sample`` percent of the blocks) or 'read-all'. ``list_only`` does steps 1-2
    only (the cheap scan repair starts with). ``wrap`` inserts a layer in every remote's stack
    (tests). ``progress(done, total)``: bytes read of those the planned checks read (the
    total grows as each remote's plan is made), after each object checked. Raises BadRemote for a remote that is not part of the vault and IntegrityError when
    the local index contradicts the signed manifest; everything else is reported per remote.
    """
    if mode not in MODES:
        raise ValueError(f"unknown audit mode {mode!r}")
    if mode == "sample" and not (sample and 0 < sample <= 100):
        raise ValueError("--sample takes a percentage in (0, 100]")
    t0 = time.monotonic()
    targets = resolve_remotes(vault, remotes)
    vault.seal()
    audit_table.forget_orphans(vault.index)
    deadline = t0 + max_duration if max_duration else None
    ctx = _Ctx(vault, mode, sample, deadline, confidence, loss, wrap, whole_budget, list_only)
    ctx.progress = progress
    results: list[RemoteAudit] = []
    errors: list[BaseException] = []

    def one(t: tuple[int, str, str]) -> None:
        try:
            results.append(_RemoteAuditor(ctx, *t).run())
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    order = {t[0]: i for i, t in enumerate(targets)}
    results.sort(key=lambda r: order[r.rid])
    forks = {r.details[f]: None for r in results for f in r.fork}
    if not remotes and any(not r.unreachable for r in results):  # for `status`
        manifests.note_fork(vault.index, list(forks))
    unsigned = segments.data_after(
        vault.index, ctx.anchor.ids[ctx.anchor.covered - 1] if ctx.anchor.covered else 0
    )
    return AuditReport(
        results,
        mode,
        confidence,
        loss,
        checks_needed(confidence, loss),
        time.monotonic() - t0,
        ctx.anchor.seq,
        unsigned,
        segments.short_without(vault.index),
    )
