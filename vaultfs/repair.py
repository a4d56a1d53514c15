"""Repair: bring every live segment back to n good shards, and change the set of remotes.

`vaultfs repair` (docs/operations.md, "Repair"):

1. **Scan**: a listing audit of every remote (``verify.audit(list_only=True)``) marks missing and
   wrongly sized objects ``lost``; earlier audits' findings (``audit_findings``) stand.
2. **Plan**: a shard needs rebuilding when it is ``lost`` or sits on a remote that left the vault;
   segments are repaired most-at-risk first (fewest healthy shards left).
   A shard on a remote that is only *unreachable* is not rebuilt: it is presumed intact.
3. **Rebuild**: for each such segment fetch k shards whose BLAKE3 matches the index — from the
   local queue first, then from reachable remotes (data fragments first) — decode, re-encode and
   take the missing fragments. Fewer than k good shards means the segment is reported
   unrecoverable; nothing is ever zero-filled or guessed. Given the live data (``sources``),
   such a data segment is healed instead: its chunks are re-read from the files by keyed chunk
   id into a new segment (:func:`_heal_from_source`).
4. **Place**: each rebuilt object gets a fresh random name and a target remote chosen to spread
   failure domains (its old remote when that one is still a healthy member). It is written
   durably to the queue and its row updated in one transaction (invariant 1, vaultfs/vault/writer.py), then
   :meth:`Vault.flush` uploads it. ISA-L coding is deterministic, so a rebuilt object is
   byte-identical to the original and its Merkle records are unchanged; if it ever were not, the
   shard and segment records are updated and the next manifest signs the new vault root.
5. **Publish**: a new manifest and index export go to every remote (``Vault.ship_index``), which
   also heals remotes serving a stale manifest; then replaced and foreign objects are deleted.

Remote set changes (`vaultfs remote add/remove/replace`) are here too: they are repairs with a
different target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import erasure, merkle, segment, verify
from .backends import open_backend
from .errors import BadRemote, NotEnoughRemotes, NoVault, RemoteError, Unreachable
from .names import display, from_db
from .remotes import Remote
from .shardreader import Lie, ShardRef, ShardsUnavailable, ShardsUndecodable, choose, read_segment
from .verify import SHARD_SQL, ShardRow, live_segments_sql

if TYPE_CHECKING:
    from .vault import Vault

BATCH_SEGMENTS = 8
KIND_CODE = {v: k for k, v in segment.KIND_NAMES.items()}


@dataclass
class RepairItem:
    segment: int
    kind: str
    idx: int
    old: str  # object path on the old remote
    old_remote: str
    reason: str
    target: str
    bytes: int
    new: str | None = None


@dataclass
class RepairReport:
    dry_run: bool
    items: list[RepairItem] = field(default_factory=list)
    segments: int = 0
    rebuilt: int = 0
    retargeted_queued: int = 0
    unrecoverable: list[str] = field(default_factory=list)
    unrecoverable_segments: list[int] = field(default_factory=list)
    healed_from_source: int = 0  # chunks re-read from --source files into new segments
    damaged_files: list[str] = field(default_factory=list)  # "snapshot:path" still unreadable
    bad_sources: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    bytes_written: int = 0
    deleted: list[str] = field(default_factory=list)
    manifest_seq: int | None = None
    pending: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unrecoverable and not any(self.pending.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _active(vault: Vault) -> list[tuple[int, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in vault.index.q(
            "SELECT id, spec, coalesce(domain, 'remote' || id) FROM remotes WHERE state='active'"
            " ORDER BY position, id"
        )
    ]


def _unreachable(vault: Vault) -> set[int]:
    return {
        r for (r,) in vault.index.q("SELECT remote FROM remote_health WHERE state='unreachable'")
    }


def _choose_target(
    vault: Vault,
    seg_id: int,
    idx: int,
    holders: list[int],
    active: list[tuple[int, str, str]],
    down: set[int],
    prefer: int | None,
) -> int | None:
    """Remote for shard ``idx`` of ``seg_id``: fewest shards of the segment in its failure
    domain, then on itself; ties go to ``prefer``, then to the placement rule's choice."""
    from .vault import place

    usable = [(rid, dom) for rid, _s, dom in active if rid not in down]
    if not usable:
        return None
    dom_of = {rid: dom for rid, _s, dom in active}
    per_dom: dict[str, int] = defaultdict(int)
    per_rem: dict[int, int] = defaultdict(int)
    for h in holders:
        if h in dom_of:
            per_dom[dom_of[h]] += 1
            per_rem[h] += 1
    rule = place([(rid, dom) for rid, _s, dom in active], seg_id, vault.n)[idx]
    pos = {rid: i for i, (rid, _d) in enumerate(usable)}
    return min(
        (rid for rid, _d in usable),
        key=lambda r: (per_dom[dom_of[r]], per_rem[r], r != prefer, r != rule, pos[r]),
    )


def _retarget_queued(vault: Vault, removed: set[int], prefer: int | None) -> int:
    """Move queued shard files of removed remotes to active ones (no rebuild needed)."""
    if not removed:
        return 0
    active = _active(vault)
    moved = 0
    rows = [
        ShardRow(*r)
        for r in vault.index.q(
            SHARD_SQL + f" WHERE s.state='queued' AND s.remote IN ({','.join('?' * len(removed))})",
            tuple(removed),
        )
    ]
    for sh in rows:
        holders = [
            r
            for (r,) in vault.index.q(
                "SELECT remote FROM shards WHERE segment=? AND idx<>? AND state IN ('placed','queued')",
                (sh.segment, sh.idx),
            )
        ]
        tgt = _choose_target(vault, sh.segment, sh.idx, holders, active, set(), prefer)
        if tgt is None:
            break
        src = vault.queue_dir / f"r{sh.remote}" / sh.kind / sh.name
        dst_dir = vault.queue_dir / f"r{tgt}" / sh.kind
        dst_dir.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.replace(src, dst_dir / sh.name)
        with vault.index.tx() as db:
            db.execute("UPDATE shards SET remote=? WHERE id=?", (tgt, sh.id))
            vault.mark_unshipped(db)
        moved += 1
    return moved


def _plan(vault: Vault) -> dict[int, list[tuple[ShardRow, str]]]:
    """segment id -> [(shard needing a rebuild, reason)]."""
    removed = {r for (r,) in vault.index.q("SELECT id FROM remotes WHERE state<>'active'")}
    reasons = {
        sid: f"{kind}: {detail}" if detail else kind
        for sid, kind, detail in vault.index.q("SELECT shard, kind, detail FROM audit_findings")
    }
    rows = [
        ShardRow(*r)
        for r in vault.index.q(
            SHARD_SQL + f" WHERE {live_segments_sql()} ORDER BY s.segment, s.idx"
        )
    ]
    out: dict[int, list[tuple[ShardRow, str]]] = defaultdict(list)
    for sh in rows:
        if sh.remote in removed and sh.state != "queued":
            out[sh.segment].append((sh, "its remote left the vault"))
        elif sh.state == "lost":
            out[sh.segment].append((sh, reasons.get(sh.id, "lost")))
    return out


class _Fetcher:
    """Repair's shard transport: shard objects from the local queue or from the remotes'
    backends, with the bytes counted and unreachable remotes remembered in :attr:`down`."""

    def __init__(self, vault: Vault, down: set[int], wrap, report: RepairReport) -> None:
        self.vault = vault
        self.down = down
        self.report = report
        self.specs = dict(vault.index.q("SELECT id, spec FROM remotes"))
        self.backends: dict[int, object] = {}
        self.wrap = wrap
        self.lock = threading.Lock()

    def backend(self, rid: int):
        with self.lock:
            b = self.backends.get(rid)
            if b is None:
                b = self.backends[rid] = open_backend(
                    self.specs[rid], rid, fail_fast=True, wrap=self.wrap
                )
            return b

    def sources(self, seg_id: int, exclude: set[int]) -> list[ShardRef]:
        """The shards of a segment to read it from (``ShardRef.tag``: the shard row): placed or
        queued, on a reachable remote, not in ``exclude`` (the shards being rebuilt)."""
        rows = [
            ShardRow(*r)
            for r in self.vault.index.q(
                SHARD_SQL + " WHERE s.segment=? AND s.state IN ('placed', 'queued') ORDER BY s.idx",
                (seg_id,),
            )
        ]
        return [
            ShardRef(
                r.idx, r.name, r.hash, Remote(self.specs[r.remote]).label, r.state == "queued", r
            )
            for r in rows
            if r.id not in exclude and r.remote not in self.down
        ]

    def fetch(self, wanted: Sequence[ShardRef], into: Path) -> dict[str, bytes]:
        """Bodies of the wanted shards, by name, unverified; those not had are left out (a
        queued shard is read from the queue only, and none from a remote known down)."""
        got: dict[str, bytes] = {}
        per_remote: dict[int, list[ShardRow]] = defaultdict(list)
        for ref in wanted:
            sh: ShardRow = ref.tag
            q = self.vault.queue_dir / f"r{sh.remote}" / sh.kind / sh.name
            if sh.state == "queued" and q.exists():
                got[sh.name] = q.read_bytes()
            elif sh.remote not in self.down:
                per_remote[sh.remote].append(sh)

        def pull(item: tuple[int, list[ShardRow]]) -> None:
            rid, shards = item
            b = self.backend(rid)
            d = into / f"r{rid}"
            d.mkdir(parents=True, exist_ok=True)
            try:
                for sub in segment.KIND_NAMES.values():
                    names = [s.name for s in shards if s.kind == sub]
                    if names:
                        b.get(sub, names, d)
            except Unreachable:
                with self.lock:
                    self.down.add(rid)
            except RemoteError as e:
                with self.lock:
                    self.report.errors[Remote(self.specs[rid]).label] = e.message
            for s in shards:
                p = d / s.name
                if not p.exists():
                    continue
                body = p.read_bytes()
                p.unlink()
                with self.lock:
                    self.report.bytes_fetched += len(body)
                    got[s.name] = body

        with ThreadPoolExecutor(max_workers=max(1, len(per_remote))) as ex:
            list(ex.map(pull, per_remote.items()))
        return got


class _SegmentShards:
    """The transport for one segment's rebuild: the objects its batch fetched ahead, then the
    fetcher, one round at a time."""

    def __init__(self, fetcher: _Fetcher, ahead: dict[str, bytes], into: Path) -> None:
        self.fetcher, self.ahead, self.into = fetcher, ahead, into

    def fetch(self, refs: Sequence[ShardRef]) -> dict[str, bytes]:
        got = {r.name: self.ahead.pop(r.name) for r in refs if r.name in self.ahead}
        rest = [r for r in refs if r.name not in got]
        if rest:
            got.update(self.fetcher.fetch(rest, self.into))
        return got


def _mark_lost(vault: Vault, sh: ShardRow, kind: str, detail: str) -> None:
    with vault.index.tx() as db:
        db.execute(
            "INSERT OR REPLACE INTO audit_findings(shard, remote, kind, detail, found)"
            " VALUES (?, ?, ?, ?, ?)",
            (sh.id, sh.remote, kind, detail, time.time()),
        )
        db.execute("UPDATE shards SET state='lost' WHERE id=? AND state='placed'", (sh.id,))


def _note_bad_sources(vault: Vault, fetcher: _Fetcher, lies: list[Lie]) -> None:
    """Report and mark lost every remote copy the shard reader found corrupt."""
    for lie in lies:
        if lie.kind == "corrupt" and not lie.ref.local:
            sh: ShardRow = lie.ref.tag
            with fetcher.lock:
                fetcher.report.bad_sources.append(f"{lie.ref.holder}:{sh.path}")
            _mark_lost(vault, sh, "corrupt", "found corrupt while used as a source")


def _rebuild_segment(
    vault: Vault,
    seg_id: int,
    todo: list[tuple[ShardRow, str]],
    fetcher: _Fetcher,
    tmp: Path,
    report: RepairReport,
    prefer: int | None,
    active: list[tuple[int, str, str]],
    ahead: dict[str, bytes],
) -> list[tuple[str, int]]:
    """Rebuild the listed shards of one segment into the queue. ``ahead`` holds shard
    objects fetched already (in one batch for many segments, :func:`shardreader.choose` of
    each); the shard reader fetches more as it needs them. A source found corrupt is marked
    lost. Returns (old path, old remote) of objects to delete once the new ones are placed."""
    g = vault.index.one("SELECT kind, size, k, n, uid, ec_alg FROM segments WHERE id=?", (seg_id,))
    kind, size, k, n, uid, alg = g[0], g[1], g[2], g[3], bytes(g[4]), g[5]
    refs = fetcher.sources(seg_id, {sh.id for sh, _r in todo})
    transport = _SegmentShards(fetcher, ahead, tmp)
    try:
        read = read_segment(refs, k, n, size, transport, f"{kind} segment {seg_id}")
    except (ShardsUnavailable, ShardsUndecodable) as e:
        _note_bad_sources(vault, fetcher, e.lies)
        report.unrecoverable.append(e.message)
        report.unrecoverable_segments.append(seg_id)
        return []
    _note_bad_sources(vault, fetcher, read.lies)
    data = read.data
    frags = erasure.encode(data, k, n, alg)
    holders = [
        r
        for (r,) in vault.index.q(
            "SELECT remote FROM shards WHERE segment=? AND state IN ('placed','queued')", (seg_id,)
        )
    ]
    old_objects: list[tuple[str, int]] = []
    tmpq = vault.queue_dir / "tmp"
    tmpq.mkdir(parents=True, exist_ok=True)
    changed_root = False
    for sh, reason in todo:
        frag = frags[sh.idx]
        head = segment.HEADER.pack(
            segment.SHARD_MAGIC, segment.SHARD_VERSION, KIND_CODE[kind], alg,
            k, n, sh.idx, 0, size, uid, len(frag),
        )  # fmt: skip
        body = head + frag
        h = segment.object_hash(body)
        if h == sh.hash:
            leaves, root = sh.blocks, sh.root
        else:  # never expected with ISA-L; records follow the bytes, the manifest re-signs
            lv = merkle.block_hashes(body)
            leaves, root = b"".join(lv), merkle.root(lv)
            changed_root = True
        tgt = _choose_target(vault, seg_id, sh.idx, holders, active, fetcher.down, prefer)
        if tgt is None:
            report.unrecoverable.append(f"{kind} segment {seg_id}: no reachable remote to hold it")
            return old_objects
        holders.append(tgt)
        name = segment.new_name()
        dest = vault.queue_dir / f"r{tgt}" / kind
        dest.mkdir(parents=True, exist_ok=True)
        from .vault.queue import fsync_dir, write_durable

        write_durable(tmpq / name, body)
        os.replace(tmpq / name, dest / name)
        fsync_dir(dest)
        verify.record_tags(
            vault.index,
            vault.keys.audit_key,
            [segment.Shard(sh.idx, name, body, h, leaves, root)],
        )
        with vault.index.tx() as db:
            db.execute(
                "UPDATE shards SET name=?, remote=?, state='queued', hash=?, blocks=?, root=?"
                " WHERE id=?",
                (name, tgt, h, leaves, root, sh.id),
            )
            vault.mark_unshipped(db)
            db.execute("DELETE FROM audit_findings WHERE shard=?", (sh.id,))
            db.execute("DELETE FROM audit_tags WHERE name=?", (sh.name,))
        if not reason.startswith("missing"):  # a missing object has nothing to delete
            old_objects.append((f"{kind}/{sh.name}", sh.remote))
        label = Remote(fetcher.specs[tgt]).label
        report.items.append(
            RepairItem(
                seg_id,
                kind,
                sh.idx,
                sh.path,
                Remote(fetcher.specs[sh.remote]).label,
                reason,
                label,
                len(body),
                f"{kind}/{name}",
            )
        )
        report.rebuilt += 1
        report.bytes_written += len(body)
    if changed_root:
        roots = [
            bytes(r[0])
            for r in vault.index.q(
                "SELECT root FROM shards WHERE segment=? ORDER BY idx", (seg_id,)
            )
        ]
        with vault.index.tx() as db:
            db.execute("UPDATE segments SET root=? WHERE id=?", (merkle.root(roots), seg_id))
    return old_objects


def _iter_files(paths: list[Path]):
    for p in paths:
        if p.is_file():
            yield p
        elif p.is_dir():
            for dirpath, _dirs, files in os.walk(p):
                for f in sorted(files):
                    q = Path(dirpath) / f
                    if q.is_file() and not q.is_symlink():
                        yield q


def _heal_from_source(
    vault: Vault, report: RepairReport, sources: list[Path]
) -> list[tuple[str, int]]:
    """Re-home the chunks of unrecoverable data segments from the live files in ``sources``.

    Every file is chunked with the vault's keyed chunker; a chunk whose keyed id belongs to a
    dead segment is sealed again into a new segment (queued like any write) and its index row
    moved there. A dead segment left with no chunks is dropped (its surviving shards are
    deleted from the remotes). Files still referring to a dead segment are listed in
    ``report.damaged_files``. Returns objects to delete.
    """
    from . import envelope

    dead = sorted({s for s in report.unrecoverable_segments})
    dead = [
        s
        for s in dead
        if vault.index.one("SELECT kind FROM segments WHERE id=?", (s,)) == ("data",)
    ]
    if not dead:
        return []
    marks = ",".join("?" * len(dead))
    wanted = {
        bytes(cid): plain
        for cid, plain in vault.index.q(
            f"SELECT cid, plain FROM chunks WHERE segment IN ({marks})", tuple(dead)
        )
    }
    found: dict[bytes, bytes] = {}
    for path in _iter_files(sources):
        if len(found) == len(wanted):
            break
        try:
            with open(path, "rb") as f:
                for chunk in vault.chunker.chunks(f):
                    cid = vault.chunker.chunk_id(chunk)
                    if cid in wanted and cid not in found and len(chunk) == wanted[cid]:
                        found[cid] = chunk
        except OSError as e:
            report.errors[str(path)] = f"cannot read: {e.strerror}"
    if found:
        with vault.write_lock:  # the engine's writers and this one must not interleave
            key = vault.keys.data_keys[vault.epoch]
            builder = segment.SegmentBuilder(vault.segment_size)
            placed: dict[bytes, tuple[int, int, int]] = {}

            def seal_segment() -> None:
                seg_id = vault.write_segment(builder, dict(placed))
                with vault.index.tx() as db:
                    db.executemany(
                        "UPDATE chunks SET segment=?, offset=?, length=? WHERE cid=?",
                        [(seg_id, off, ln, cid) for cid, (off, ln, _pl) in placed.items()],
                    )

            for cid, data in found.items():
                rec = envelope.seal_chunk(key, vault.keys.vault_id, cid, data, vault.suite)
                if not builder.fits(len(rec)):
                    seal_segment()
                    builder = segment.SegmentBuilder(vault.segment_size)
                    placed = {}
                placed[cid] = (builder.add(rec), len(rec), len(data))
            if placed:
                seal_segment()
        report.healed_from_source += len(found)
    old: list[tuple[str, int]] = []
    for seg_id in dead:
        (left,) = vault.index.one("SELECT count(*) FROM chunks WHERE segment=?", (seg_id,))
        if left:
            for snap, path in vault.index.q(
                "SELECT DISTINCT s.uid, e.path FROM chunks c JOIN entry_chunks x ON x.chunk = c.id"
                " JOIN entries e ON e.id = x.entry JOIN snapshots s ON s.id = e.snapshot"
                " WHERE c.segment=? ORDER BY s.id, e.path",
                (seg_id,),
            ):
                item = f"{snap}:{display(from_db(path))}"
                if item not in report.damaged_files:
                    report.damaged_files.append(item)
            continue
        rows = vault.index.q(
            "SELECT s.id, g.kind, s.name, s.remote FROM shards s JOIN segments g"
            " ON g.id = s.segment WHERE s.segment=?",
            (seg_id,),
        )
        with vault.index.tx() as db:
            for sid, _kind, _name, _rid in rows:
                db.execute("DELETE FROM audit_findings WHERE shard=?", (sid,))
            db.execute("DELETE FROM shards WHERE segment=?", (seg_id,))
            db.execute("DELETE FROM segments WHERE id=?", (seg_id,))
            vault.mark_unshipped(db)
        old += [(f"{kind}/{name}", rid) for _sid, kind, name, rid in rows]
        report.unrecoverable = [
            u for u in report.unrecoverable if not u.startswith(f"data segment {seg_id}:")
        ]
        report.unrecoverable_segments.remove(seg_id)
    return old


def repair(
    vault: Vault,
    *,
    dry_run: bool = False,
    scan: bool = True,
    prefer: int | None = None,
    wrap: Callable[[object], object] | None = None,
    progress: Callable[[int], None] | None = None,
    sources: list[Path] | None = None,
) -> RepairReport:
    """Rebuild every live segment below full redundancy; see the module docstring.

    ``sources`` are files or directories holding the live data (the paths that were backed
    up): a data segment that cannot be rebuilt from its shards is healed by re-reading the
    chunks it held from them (matched by keyed chunk id, so only identical bytes qualify).

    ``prefer`` is a remote id that wins ties when placing rebuilt shards (`remote replace`).
    ``dry_run`` scans and plans, and changes nothing else.
    """
    t0 = time.monotonic()
    report = RepairReport(dry_run)
    if scan:
        scanned = verify.audit(vault, list_only=True, wrap=wrap)
        report.unreachable = [r.remote for r in scanned.remotes if r.unreachable]
    else:
        vault.seal()
    down = _unreachable(vault)
    active = _active(vault)
    removed = {r for (r,) in vault.index.q("SELECT id FROM remotes WHERE state<>'active'")}
    plan = _plan(vault)
    specs = dict(vault.index.q("SELECT id, spec FROM remotes"))
    if dry_run:
        holders_cache: dict[int, list[int]] = {}
        for seg_id, todo in sorted(plan.items()):
            holders = holders_cache.setdefault(
                seg_id,
                [
                    r
                    for (r,) in vault.index.q(
                        "SELECT remote FROM shards WHERE segment=? AND state IN ('placed','queued')",
                        (seg_id,),
                    )
                ],
            )
            (good,) = vault.index.one(
                "SELECT count(*) FROM shards WHERE segment=? AND state IN ('placed','queued')"
                f" AND remote NOT IN ({','.join(str(d) for d in down | removed) or '-1'})",
                (seg_id,),
            )
            if good < vault.k:
                report.unrecoverable.append(
                    f"segment {seg_id}: only {good} good shards on reachable remotes, need {vault.k}"
                )
                continue
            for sh, reason in todo:
                tgt = _choose_target(vault, seg_id, sh.idx, holders, active, down, prefer)
                holders.append(tgt or -1)
                report.items.append(
                    RepairItem(
                        seg_id,
                        sh.kind,
                        sh.idx,
                        sh.path,
                        Remote(specs[sh.remote]).label,
                        reason,
                        Remote(specs[tgt]).label if tgt else "(none reachable)",
                        sh.size,
                    )
                )
        report.segments = len(plan)
        report.deleted = [
            f"{Remote(specs[r]).label}:{s}/{n}"
            for r, s, n in vault.index.q("SELECT remote, sub, name FROM audit_foreign")
        ]
        report.seconds = time.monotonic() - t0
        return report

    report.retargeted_queued = _retarget_queued(vault, removed, prefer)
    fetcher = _Fetcher(vault, set(down), wrap, report)
    old_objects: list[tuple[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="vaultfs-repair-") as tmp:
        # most at risk first: the segments with the fewest healthy shards left (Storj's order)
        healthy = {
            seg: cnt
            for seg, cnt in vault.index.q(
                "SELECT s.segment, count(*) FROM shards s JOIN remotes r ON r.id = s.remote"
                " WHERE s.state IN ('placed', 'queued') AND r.state='active' GROUP BY s.segment"
            )
        }
        todo_all = sorted(plan.items(), key=lambda it: (healthy.get(it[0], 0), it[0]))
        batches = [
            todo_all[b : b + BATCH_SEGMENTS] for b in range(0, len(todo_all), BATCH_SEGMENTS)
        ]

        def download(bi: int):
            # one transfer per remote for the whole batch: k sources per segment
            d = Path(tmp) / f"b{bi}"
            d.mkdir()
            firsts = [
                ref
                for seg_id, todo in batches[bi]
                for ref in choose(fetcher.sources(seg_id, {sh.id for sh, _r in todo}), vault.k)
            ]
            return d, fetcher.fetch(firsts, d)

        # the next batch downloads while this one is decoded, re-encoded and queued
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaultfs-repair") as pre:
            nxt = pre.submit(download, 0) if batches else None
            for bi, batch in enumerate(batches):
                assert nxt is not None
                d, got = nxt.result()
                nxt = pre.submit(download, bi + 1) if bi + 1 < len(batches) else None
                for seg_id, todo in batch:
                    old_objects += _rebuild_segment(
                        vault, seg_id, todo, fetcher, d, report, prefer, active, got
                    )  # fmt: skip
                    if progress:
                        progress(1)
                shutil.rmtree(d, ignore_errors=True)
    report.segments = len(plan)
    if report.unrecoverable_segments:
        old_objects += _heal_from_source(vault, report, sources or [])
    # also when an earlier repair changed shard rows and died before publishing them: the
    # remotes' index copy would still name the objects that repair replaced
    unshipped = vault.index.get("unshipped_since") is not None
    if report.rebuilt or report.retargeted_queued or plan or unshipped or _any_stale(vault):
        report.manifest_seq = vault.ship_index()  # flush places data before manifests
    flush = vault.flush()
    report.pending = {k: v for k, v in flush.pending.items() if v}
    report.errors.update(flush.errors)
    # delete what was replaced, and foreign objects, on reachable active remotes
    doomed: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, rid in old_objects:
        sub, name = path.split("/", 1)
        doomed[rid][sub].append(name)
    for rid, sub, name in vault.index.q("SELECT remote, sub, name FROM audit_foreign"):
        doomed[rid][sub].append(name)
    still = {n for (n,) in vault.index.q("SELECT name FROM shards")}
    for rid, subs in doomed.items():
        if rid in removed or rid in fetcher.down or rid not in specs:
            continue
        b = fetcher.backend(rid)
        for sub, names in subs.items():
            names = [n for n in names if n not in still]
            try:
                b.delete(sub, names)
            except RemoteError as e:
                report.errors[Remote(specs[rid]).label] = e.message
                continue
            report.deleted += [f"{Remote(specs[rid]).label}:{sub}/{n}" for n in names]
            with vault.index.tx() as db:
                db.executemany(
                    "DELETE FROM audit_foreign WHERE remote=? AND sub=? AND name=?",
                    [(rid, sub, n) for n in names],
                )
    report.seconds = time.monotonic() - t0
    return report


def _any_stale(vault: Vault) -> bool:
    return bool(vault.index.one("SELECT 1 FROM remote_health WHERE state='stale'"))


# -- the set of remotes ------------------------------------------------------------------------
def find_remote(vault: Vault, name: str, active_only: bool = True) -> tuple[int, str]:
    """(id, spec) of the remote whose spec or label is ``name``; BadRemote if none."""
    rows = vault.index.q("SELECT id, spec, state FROM remotes ORDER BY position, id")
    for rid, spec, state in rows:
        if name in (spec, Remote(spec).label) and (state == "active" or not active_only):
            return rid, spec
    raise BadRemote(
        f"remote {name!r} is not part of this vault: see `vaultfs remote list` for its remotes"
    )


def _check_new(vault: Vault, spec: str, wrap=None) -> None:
    for rid, s, state in vault.index.q("SELECT id, spec, state FROM remotes"):
        if s == spec and state == "active":
            raise BadRemote(f"remote {Remote(spec).label} is already part of this vault (id {rid})")
    b = open_backend(spec, fail_fast=True, wrap=wrap)
    try:
        b.ensure()
        existing = b.list("manifests")
    except Unreachable as e:
        raise NotEnoughRemotes(
            f"remote {Remote(spec).label} is unreachable ({e.message}); try again when it is up"
        ) from None
    if existing:
        raise NoVault(
            f"remote {Remote(spec).label} already holds a vault (manifests/ is not empty); "
            "give an empty location"
        )
    tree = b.list_tree()
    if tree.get("data") or tree.get("meta"):
        raise NoVault(
            f"remote {Remote(spec).label} is not empty (it holds data/ or meta/ objects); "
            "give an empty location"
        )


def add_remote(vault: Vault, spec: str, domain: str | None = None, wrap=None) -> dict:
    """Add an empty remote to the vault; new segments use it, a new manifest goes to it."""
    Remote(spec)  # validates the spec's form
    _check_new(vault, spec, wrap)
    with vault.index.tx() as db:
        pos = (db.execute("SELECT max(position) FROM remotes").fetchone()[0] or 0) + 1
        row = db.execute("SELECT id FROM remotes WHERE spec=?", (spec,)).fetchone()
        if row:
            db.execute(
                "UPDATE remotes SET state='active', position=?, domain=? WHERE id=?",
                (pos, domain, row[0]),
            )
            rid = row[0]
        else:
            rid = db.execute(
                "INSERT INTO remotes(spec, position, domain) VALUES (?, ?, ?)", (spec, pos, domain)
            ).lastrowid
    seq = vault.ship_index()
    rep = vault.flush()
    return {
        "remote": Remote(spec).label,
        "id": rid,
        "domain": domain or f"remote{rid}",
        "manifest_seq": seq,
        "pending": {k: v for k, v in rep.pending.items() if v},
        "errors": rep.errors,
    }


def _guard_removal(vault: Vault, rid: int) -> None:
    (left,) = vault.index.one("SELECT count(*) FROM remotes WHERE state='active' AND id<>?", (rid,))
    if left == 0:
        raise NotEnoughRemotes("cannot remove the vault's last remote: add another one first")


def remove_remote(vault: Vault, name: str, wrap=None) -> RepairReport:
    """Take a remote out of the vault: rebuild its shards on the others, then delete what it
    held (best effort; an unreachable remote keeps its encrypted objects)."""
    rid, spec = find_remote(vault, name)
    _guard_removal(vault, rid)
    with vault.index.tx() as db:
        db.execute("UPDATE remotes SET state='removed' WHERE id=?", (rid,))
        db.execute("DELETE FROM manifest_queue WHERE remote=?", (rid,))
    report = repair(vault, wrap=wrap)
    if report.unrecoverable:
        return report
    b = open_backend(spec, rid, fail_fast=True, wrap=wrap)
    try:
        for sub in (*segment.KIND_NAMES.values(), "manifests"):
            names = b.list(sub)
            b.delete(sub, names)
            report.deleted += [f"{Remote(spec).label}:{sub}/{n}" for n in names]
    except RemoteError as e:
        report.errors[Remote(spec).label] = f"left its objects in place: {e.message}"
    return report


def replace_remote(
    vault: Vault, old: str, new: str, domain: str | None = None, wrap=None
) -> RepairReport:
    """Swap remote ``old`` (e.g. a provider that shut down) for the empty remote ``new``: the new
    one takes the old one's position and failure domain, and the old one's shards are rebuilt
    onto it from the others (queued ones are moved)."""
    rid, _spec = find_remote(vault, old)
    Remote(new)
    _check_new(vault, new, wrap)
    with vault.index.tx() as db:
        pos, dom = db.execute("SELECT position, domain FROM remotes WHERE id=?", (rid,)).fetchone()
        db.execute("UPDATE remotes SET state='removed' WHERE id=?", (rid,))
        db.execute("DELETE FROM manifest_queue WHERE remote=?", (rid,))
        row = db.execute("SELECT id FROM remotes WHERE spec=?", (new,)).fetchone()
        if row:
            db.execute(
                "UPDATE remotes SET state='active', position=?, domain=? WHERE id=?",
                (pos, domain or dom, row[0]),
            )
            nid = row[0]
        else:
            nid = db.execute(
                "INSERT INTO remotes(spec, position, domain) VALUES (?, ?, ?)",
                (new, pos, domain or dom),
            ).lastrowid
        db.execute("DELETE FROM remote_health WHERE remote=?", (rid,))
    return repair(vault, prefer=nid, wrap=wrap)


def list_remotes(vault: Vault) -> list[dict]:
    """Every remote the vault knows (active and removed) with health and holdings."""
    out = []
    for rid, spec, pos, dom, state, last_ok, last_err in vault.index.q(
        "SELECT id, spec, position, domain, state, last_ok, last_error FROM remotes"
        " ORDER BY state, position, id"
    ):
        counts = dict.fromkeys(("placed", "queued", "lost"), (0, 0))
        for st, cnt, size in vault.index.q(
            "SELECT state, count(*), coalesce(sum(size), 0) FROM shards WHERE remote=? GROUP BY state",
            (rid,),
        ):
            counts[st] = (cnt, size)
        h = vault.remote_health(rid)
        (foreign,) = vault.index.one("SELECT count(*) FROM audit_foreign WHERE remote=?", (rid,))
        out.append(
            {
                "remote": Remote(spec).label,
                "id": rid,
                "position": pos,
                "domain": dom or f"remote{rid}",
                "member": state,
                "health": h["health"] if state == "active" else "removed",
                "health_detail": h["health_detail"],
                "placed_objects": counts["placed"][0],
                "placed_bytes": counts["placed"][1],
                "queued_objects": counts["queued"][0],
                "queued_bytes": counts["queued"][1],
                "lost_objects": counts["lost"][0],
                "foreign_objects": foreign,
                "last_audit": h["last_audit"],
                "last_audit_mode": h["last_audit_mode"],
                "last_audit_confidence": h["last_audit_confidence"],
                "last_ok": last_ok,
                "last_error": last_err,
            }
        )
    return out
