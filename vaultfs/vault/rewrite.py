"""Segment rewriting: replace data segments by one new segment holding some of their records
(re-encryption, vaultfs/rotation.py; repacking, vaultfs/prune.py)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from .. import segment
from ..errors import IntegrityError
from ..index import Index, chunks, manifests, segments
from .commit import mark_unshipped
from .queue import ShardQueue
from .writer import Writer


def rewrite_segments(
    writer: Writer,
    index: Index,
    queue: ShardQueue,
    forget: Callable[[list[int]], None],
    old_ids: list[int],
    records: list[tuple[bytes, bytes, int]],
    epoch: int,
) -> int | None:
    """Atomically replace data segments ``old_ids`` by one new segment holding ``records``
    ((chunk id, record sealed under ``epoch``, plaintext length)), or by none when
    ``records`` is empty. Returns the new segment id (None: none was needed). ``forget``
    drops the old segments from the read path's cache.

    The new shards are durable in the queue before the one transaction that inserts the
    new segment, repoints the records' chunks, deletes every other chunk row still in an
    old segment (chunks nothing refers to: the caller's business), deletes the old
    segments' rows, lists their placed shards in ``garbage`` (deleted from the remotes
    only once a manifest no longer naming them is placed) and marks the index unshipped
    (the caller ships it; a crash first leaves the mark for the next prune or repair). A
    crash before that transaction leaves the old segments in use and orphan queue files
    that recovery removes.
    """
    p = writer.params
    with writer.write_lock:
        builder = segment.SegmentBuilder(p.segment_size)
        where: dict[bytes, tuple[int, int, int]] = {}
        for cid, rec, plain in records:
            if not builder.fits(len(rec)):
                raise IntegrityError("internal: rewritten records outgrow one segment")
            where[cid] = (builder.add(rec), len(rec), plain)
        seg_id = rows = root = uid = None
        if where:
            seg_id = writer.next_segment_id()
            uid = secrets.token_bytes(16)
            rows, root = writer.write_shards(seg_id, segment.KIND_DATA, builder.padded())
        old = segments.shards_of(index, old_ids)
        with index.tx() as db:
            next_seq = manifests.next_seq(db)
            if seg_id is not None:
                assert rows is not None and uid is not None and root is not None
                segments.insert(
                    db, seg_id, uid, "data", builder.padded_size(), builder.used, p.k, p.n,
                    p.ec_alg, epoch, root, time.time(),
                )  # fmt: skip
                segments.add_queued_shards(db, seg_id, rows)
                chunks.repoint(
                    db, [(seg_id, off, ln, cid) for cid, (off, ln, _pl) in where.items()]
                )
            chunks.delete_in_segments(db, old_ids)
            segments.forget(db, old_ids)
            manifests.add_garbage(
                db, [(name, rid) for name, rid, state in old if state == "placed"], "data", next_seq
            )
            # the signed vault root no longer covers the data segments: until a manifest is
            # recorded, the index copy on the remotes is out of date (a crash here must still
            # lead the next prune to ship one, docs/design.md "Crash states")
            mark_unshipped(db)
        for name, rid, state in old:
            if state == "queued":
                queue.shard_path(rid, "data", name).unlink(missing_ok=True)
        forget(old_ids)
        return seg_id
