"""Crash recovery: bring the queue directory and the index back in line when a vault is
opened (docs/design.md, "Crash states").

Relies on invariants 1 (a queue file with no index row was never acknowledged) and 5 (a
queued shard whose file is gone was uploaded).
"""

from __future__ import annotations

from ..index import Index, manifests, segments
from .queue import SUBDIRS, ShardQueue


def recover(index: Index, queue: ShardQueue) -> None:
    """Bring the queue directory and the index back in line after a crash.

    Queue files with no index row were written by a transaction that never committed:
    they are removed (nothing acknowledged refers to them). Queued shards whose file is
    gone were uploaded before the crash: they become placed (invariant 5).
    """
    for f in queue.tmp.glob("*"):
        f.unlink(missing_ok=True)
    known = segments.queued_names(index)
    for rdir in queue.dir.glob("r*"):
        for sub in SUBDIRS:
            d = rdir / sub
            if d.exists():
                for f in d.iterdir():
                    if f.name not in known:
                        f.unlink()
    reconcile(index, queue)
    queue.make_dirs()
    mans = manifests.names(index)
    for f in queue.manifests.iterdir():
        if f.name not in mans:
            f.unlink()
    drop_unnamed_index_copies(index, queue)


def reconcile(index: Index, queue: ShardQueue) -> int:
    """Mark queued shards whose queue file is gone as placed (invariant 5). Returns how
    many."""
    done = [
        sid
        for sid, name, rid, kind in segments.queued_shards(index)
        if not queue.shard_path(rid, kind, name).exists()
    ]
    if done:
        segments.mark_placed(index, done)
    return len(done)


def drop_unnamed_index_copies(index: Index, queue: ShardQueue) -> None:
    """Meta segments recorded for a manifest that was never recorded (a crash between the
    two transactions of shipping the index, vaultfs/vault/commit.py): delete their queue
    files, send placed shards to ``garbage`` and forget them. Sidecar rows that point into
    them are ignored from then on (vaultfs/index/shipped.py)."""
    ids = segments.unnamed_meta(index)
    if not ids:
        return
    for name, rid, state in segments.shards_of(index, ids):
        if state == "queued":
            queue.shard_path(rid, "meta", name).unlink(missing_ok=True)
    reconcile(index, queue)  # a shard whose queue file is gone was uploaded: it is garbage now
    placed = [
        (name, rid) for name, rid, state in segments.shards_of(index, ids) if state == "placed"
    ]
    with index.tx() as db:
        manifests.add_garbage(db, placed, "meta", manifests.next_seq(db))
        segments.forget(db, ids)
