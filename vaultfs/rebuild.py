"""Rebuilding a lost home (``vaultfs home rebuild``): a vault's local state made again from
any k of its remotes and the key, so the vault carries on after the machine holding its home
is lost (backup, snapshot, verify, mount), not only restores files.

Where each part of the new home comes from (docs/operations.md, "Losing the home"):

- ``index.db``: the index copy that the newest validly signed manifest names, fetched and
  checked as a restore does (:func:`restore.open_remote_index`), then

  * the ``remotes`` table: each given remote is matched to the row whose shard objects it
    holds (object names under ``data/`` and ``meta/``) and takes the spec given here; the
    other rows keep theirs (unreachable from this machine until ``vaultfs remote replace``);
  * the newest manifest itself and the index copy it names, which that copy cannot hold
    (it was exported before they were recorded): their rows are made again from the shard
    objects, each checked against the hash the manifest signs. The manifest's sequence
    number is the rollback anchor of the new home;
  * uploads the lost home still had queued are forgotten; shards it had queued count as
    placed (recovery's invariant 5) until ``vaultfs verify`` has looked at their remote.

- Rollback floors: ``min_seq`` and a receipt's manifest (``anchor``) as a restore from the
  remotes takes them (Rollback otherwise). The vault's other remotes, those not given, are
  then asked under their old specs: one reachable that holds a validly signed manifest
  newer than the one rebuilt from makes the rebuild refuse (Rollback: the given remotes are
  behind), so a home is not rebuilt from old copies while a newer state is in reach.

- ``key.json``: the given keyfile, copied; or, from a seed, a new keyfile under a new
  passphrase. ``queue/`` starts empty, as do the local caches.

It is built in a staging directory beside the home and renamed into place once complete
(:func:`vault.home.install`), so a crash leaves either no home or a complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import chain, erasure, manifest, merkle, segment
from .backends import Backend, open_backend
from .errors import InputError, IntegrityError, NotEnoughRemotes, RemoteError, Rollback, VaultError
from .index import Index, keyring, segments, snapshots
from .index import manifests as manifest_table
from .index import remotes as remote_table
from .index.shipped import ShippedObjects
from .keys import VaultKeys, write_keyfile
from .restore import ShardSource, index_description, open_remote_index, too_few_remotes
from .shardreader import ShardRef, read_segment
from .vault import Vault
from .vault.home import index_path, install, keyfile_path, rebuild_staging
from .vault.placement import shard_remotes
from .vault.queue import ShardQueue
from .vault.recovery import reconcile
from .verify import record_tags


@dataclass
class RebuildReport:
    """What :func:`rebuild_home` made: the manifest it started from (``seq``; ``manifest``,
    its object name under ``manifests/``, ``<seq>-<rnd>``: a random suffix, not its hash;
    ``link``, its sequence number and hash), the snapshots the home knows, each
    given remote with the spec it replaced (``matched``: given spec -> old spec), the remotes
    left under their old specs (``kept``), and warnings (shards decoded around, stale
    remotes)."""

    home: Path
    seq: int
    manifest: str
    link: manifest.Link
    snapshots: int
    matched: dict[str, str]
    kept: list[str]
    warnings: list[str] = field(default_factory=list)


def rebuild_home(
    home: Path,
    keys: VaultKeys,
    remotes: list[Backend],
    passphrase: str | None = None,
    keyfile: Path | None = None,
    min_seq: int = 0,
    anchor: manifest.Link | None = None,
) -> RebuildReport:
    """Make a home at ``home`` (absent or an empty directory; TargetNotEmpty otherwise) for
    the vault of ``keys`` from ``remotes`` (any k of its remotes, by any spec). Its keyfile
    is a copy of ``keyfile`` if given, else ``keys`` sealed under ``passphrase`` (one of the
    two is required). ``min_seq`` and ``anchor`` are rollback floors as for a restore
    (:func:`open_remote_index`). Raises as a restore from the remotes does (NotEnoughRemotes,
    IntegrityError, Rollback), Rollback when a remote of the vault not given holds a newer
    manifest (:func:`_check_others`), and InputError when a given remote cannot be matched
    to one of the vault's (one that cannot be listed is left out, with a warning); nothing
    is left at ``home`` then."""
    if (keyfile is None) == (passphrase is None):
        raise ValueError("give exactly one of keyfile and passphrase")
    if len({r.spec for r in remotes}) != len(remotes):
        raise InputError("the same remote was given twice")
    staging, lock = rebuild_staging(home)
    try:
        src = ShardSource(remotes)
        src.start()
        try:
            # the sidecar too: the next commit then seals only the blocks that changed
            shipped = ShippedObjects(staging / "index-objects.db")
            with too_few_remotes(src, "rebuild the home", " (or give more --from)"):
                index, src, m, warnings = open_remote_index(
                    keys, remotes, staging, min_seq, src=src, shipped=shipped, anchor=anchor
                )
        except NotEnoughRemotes as e:
            # name the --from remotes that gave nothing (empty, or another vault's): with
            # too few left, the typo is the user's way out, not the internal segment
            strangers = [
                r.label for r in src.reports.values() if r.reachable and r.best_seq is None
            ]
            if not strangers:
                raise
            raise NotEnoughRemotes(
                f"{', '.join(strangers)} {'holds' if len(strangers) == 1 else 'hold'} nothing "
                "of this vault (no manifest of it): give the vault's own remotes with --from; "
                f"the others are too few ({e.message})"
            ) from None
        finally:
            src.stop()
        with contextlib.closing(index):
            if Path(index.path) != index_path(staging):
                raise IntegrityError(f"internal: the index was fetched to {index.path}")
            matched = _match_remotes(index, src, remotes, warnings)
            name = _manifest_name(keys, src, m)
            _adopt_newest(index, keys, src, m, name, matched, warnings)
            old_specs = remote_table.specs(index)
            with index.tx() as db:
                remote_table.respec(db, {rid: b.spec for rid, b in matched.items()})
            queue = ShardQueue(staging)
            queue.make_dirs()
            reconcile(index, queue)  # shards the lost home had queued: presumed placed
            snaps = snapshots.summary(index)[0]
            kept = [spec for rid, spec in remote_table.active(index) if rid not in matched]
            _check_others(keys, index, kept, m, [b.spec for b in remotes])
        if keyfile is not None:
            shutil.copyfile(keyfile, keyfile_path(staging))
        else:
            assert passphrase is not None
            write_keyfile(keyfile_path(staging), keys, passphrase)
        install(staging, home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    with Vault.open(home, keys=keys):  # it opens as any home does (lock, recovery)
        pass
    return RebuildReport(
        home,
        m.seq,
        name,
        m.link,
        snaps,
        {b.spec: old_specs[rid] for rid, b in matched.items()},
        kept,
        warnings,
    )


def _check_others(
    keys: VaultKeys, index: Index, others: list[str], m: manifest.Manifest, given: list[str]
) -> None:
    """Rollback when one of ``others`` (the vault's remotes not given, by their old specs)
    holds a validly signed manifest newer than ``m``, the one rebuilt from (``index`` holds
    its chain). One that cannot be reached, holds nothing of this vault, or has not listed
    its manifests within :data:`chain.CHECK_BOUND` says nothing (it is named by ``verify``):
    the look is :func:`chain.survey`'s, bounded like a backup's."""
    backends = []
    for spec in others:
        with contextlib.suppress(VaultError):  # a spec this machine cannot open: unreachable
            backends.append(open_backend(spec))
    if not backends:
        return
    newer = [s for s in chain.survey(keys, index, backends).others if s.manifest.seq > m.seq]
    if not newer:
        return
    newest = max(newer, key=lambda s: s.manifest.seq)
    holders = newest.holders
    raise Rollback(
        f"the remotes given ({', '.join(given)}) are behind: their newest manifest is "
        f"{m.link.short}, but {', '.join(holders)} (a remote of this vault, not given) holds "
        f"{newest.link.short}. Nothing was written. Rebuild from remotes including it, up to "
        f"date with #{newest.manifest.seq}: `vaultfs home rebuild --from {holders[0]} --from ...`"
    )


def _match_remotes(
    index: Index, src: ShardSource, given: list[Backend], warnings: list[str]
) -> dict[int, Backend]:
    """{remote id: given remote}: each given remote is the vault remote most of whose shard
    objects it lists (and at least one). A given remote that cannot be listed is left out
    (named in ``warnings``; the vault's remote keeps its old spec). InputError when one lists
    no object of the vault, when two remotes of the vault tie, when it matches a removed
    remote, or when two given remotes match one."""
    rows = remote_table.every(index)
    held = {r.id: segments.object_names(index, r.id) for r in rows}
    state = {r.id: r.state for r in rows}
    out: dict[int, Backend] = {}
    for b in given:
        tree = src.listed.get(b.spec)
        if tree is None:
            why = src.reports[b.spec].error or "not listed"
            warnings.append(f"{b.label} could not be listed ({why}): left out")
            continue
        names = set(tree.get("data", {})) | set(tree.get("meta", {}))
        score = {rid: len(names & objs) for rid, objs in held.items()}
        best = max(score.values(), default=0)
        winners = [rid for rid, s in score.items() if s == best]
        if best == 0:
            raise InputError(
                f"{b.label} holds no shard object of this vault; is it one of its remotes?"
            )
        if len(winners) > 1:
            raise InputError(
                f"{b.label} holds as many objects of remotes #{winners[0]} and #{winners[1]}: "
                "cannot tell which of the vault's remotes it is"
            )
        rid = winners[0]
        if state[rid] != "active":
            raise InputError(f"{b.label} holds the objects of a remote removed from the vault")
        if rid in out:
            raise InputError(
                f"{b.label} and {out[rid].label} both hold the objects of remote #{rid}: "
                "give each remote once"
            )
        out[rid] = b
    return out


def _manifest_name(keys: VaultKeys, src: ShardSource, m: manifest.Manifest) -> str:
    """The object name under ``manifests/`` of manifest ``m`` on the given remotes."""
    for r in src.remotes:
        with contextlib.suppress(RemoteError):
            for nm, listed in src.manifest_names(r):
                if manifest.seq_of_name(nm) != m.seq:
                    continue
                blob = src.read_manifest(r, nm, listed)
                if isinstance(blob, str):
                    continue
                with contextlib.suppress(IntegrityError):
                    got = manifest.read(keys, blob)
                    if (got.created_ms, got.body) == (m.created_ms, m.body):
                        return nm
    raise IntegrityError(f"manifest #{m.seq} could not be read again from the given remotes")


class _OneByOne:
    """The shard reader's transport over a started :class:`ShardSource`: each object read
    from a remote that listed it, at its signed size (:meth:`ShardSource.fetch_one`)."""

    def __init__(self, src: ShardSource, warnings: list[str]) -> None:
        self.src, self.warnings = src, warnings

    def fetch(self, refs: Sequence[ShardRef]) -> Mapping[str, segment.Body | str]:
        out: dict[str, segment.Body | str] = {}
        for ref in refs:
            got = self.src.fetch_one("meta", ref, self.warnings)
            if got is not None:
                out[ref.name] = got[0]
        return out


def _adopt_newest(
    index: Index,
    keys: VaultKeys,
    src: ShardSource,
    m: manifest.Manifest,
    name: str,
    matched: dict[int, Backend],
    warnings: list[str],
) -> None:
    """Record manifest ``m`` (object ``name``) and the index copy it names as the lost home
    recorded them when it shipped that copy: segment ids after the copy's last, the current
    key epoch, every shard on the remote that holds it (among the given ones) or else where
    placement put it, with its Merkle leaves and audit tags. Each shard object is made again
    from the decoded segment (the code is deterministic) and must hash to what ``m`` signs."""
    rid_of = {b.spec: rid for rid, b in matched.items()}
    epoch, _suite = keyring.current(index, m.suite)
    named = index_description(keys, m, src, warnings).segments
    # the copy already records the meta segments earlier manifests wrote (blocks are shared
    # across manifests, docs/format.md 9.2); only those written for ``m`` itself are missing
    known = segments.ids_by_uid(index, [seg.uid for seg in named])
    first = segments.max_id(index) + 1
    made: list[tuple[int, manifest.IndexSegment, int, list, bytes]] = []
    for i, seg in enumerate(s for s in named if s.uid not in known):
        seg_id = first + i
        signed = sorted(seg.shards, key=lambda s: s.idx)
        refs = src.refs("meta", [(s.idx, s.name, s.hash, s.size) for s in signed])
        alg = seg.ec_alg or erasure.choose_alg(seg.k, seg.n)
        what = f"index segment {seg.uid.hex()} of manifest #{m.seq}"
        data = read_segment(
            refs, seg.k, seg.n, seg.size, _OneByOne(src, warnings), what,
            alg=alg, audit_key=keys.audit_key,
        ).data  # fmt: skip
        # the code and the whitening are deterministic: each object comes out again under
        # its signed name (and must hash to what the manifest signs)
        frags = erasure.encode(data, seg.k, seg.n, alg)
        built = {
            s.idx: segment.stored_shard(s.idx, s.name, frags[s.idx], keys.audit_key) for s in signed
        }
        placement = shard_remotes(index, seg_id, seg.n)
        rows, shards = [], []
        for s in signed:
            sh = built[s.idx]
            if sh.hash != s.hash or len(sh.body) != s.size:
                raise IntegrityError(f"{what}: shard {s.idx} does not come out as signed")
            holders = [rid_of[b.spec] for b in src.holders(s.name) if b.spec in rid_of]
            rid = holders[0] if holders else placement[s.idx]
            rows.append((s.idx, s.name, rid, s.size, s.hash, sh.blocks, sh.root))
            shards.append(segment.Shard(s.idx, s.name, sh.body, sh.hash, sh.blocks, sh.root))
        record_tags(index, keys.audit_key, shards)
        made.append((seg_id, seg, alg, rows, merkle.root([r[6] for r in rows])))
    created = m.created_ms / 1000
    with index.tx() as db:
        for seg_id, seg, alg, rows, root in made:
            segments.insert(
                db, seg_id, seg.uid, "meta", seg.size, seg.used, seg.k, seg.n, alg,
                epoch, root, created, manifest=m.seq,
            )  # fmt: skip
            segments.add_queued_shards(db, seg_id, rows)
        fork = m.contents.fork
        manifest_table.adopt(
            db, m.seq, name, created, m.contents.vault_root, m.hash,
            [*known.values(), *(made_id for made_id, *_rest in made)],
            None if fork is None else (fork.seq, fork.hash),
        )  # fmt: skip
