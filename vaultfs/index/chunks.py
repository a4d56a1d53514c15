"""Queries about chunks: where each chunk's record lives (table ``chunks``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index

#: Ids per chunk lookup: queries always carry this many parameters (padded), so SQLite
#: prepares one statement per query shape once instead of once per call.
LOOKUP_BATCH = 256


def chunk_rows(db: sqlite3.Connection, cids: list[bytes]) -> dict[bytes, int]:
    """{chunk id: chunks-table row id} for the ids of ``cids`` that the index has."""
    marks = ",".join("?" * LOOKUP_BATCH)
    sql = f"SELECT cid, id FROM chunks WHERE cid IN ({marks})"
    out: dict[bytes, int] = {}
    for i in range(0, len(cids), LOOKUP_BATCH):
        part = cids[i : i + LOOKUP_BATCH]
        if len(part) < LOOKUP_BATCH:  # padding no chunk id can equal (ids are 32 bytes)
            part = [*part, *([b""] * (LOOKUP_BATCH - len(part)))]
        out.update(db.execute(sql, part))
    return out


def known(index: Index, cids: list[bytes]) -> dict[bytes, int]:
    """:func:`chunk_rows` outside a transaction (under the index lock)."""
    with index.lock:
        return chunk_rows(index.db, cids)


def insert(db: sqlite3.Connection, rows: Iterable[tuple[bytes, int, int, int, int]]) -> None:
    """Record chunks (cid, segment, offset, record length, plain length); a chunk id the
    index has already keeps its row."""
    db.executemany(
        "INSERT OR IGNORE INTO chunks(cid, segment, offset, length, plain) VALUES (?, ?, ?, ?, ?)",
        rows,
    )


def repoint(db: sqlite3.Connection, rows: Iterable[tuple[int, int, int, bytes]]) -> None:
    """Move chunks to a new place: rows of (segment, offset, record length, cid)."""
    db.executemany("UPDATE chunks SET segment=?, offset=?, length=? WHERE cid=?", rows)


def delete_in_segments(db: sqlite3.Connection, seg_ids: list[int]) -> None:
    """Forget every chunk still recorded in one of ``seg_ids``."""
    marks = ",".join("?" * len(seg_ids))
    db.execute(f"DELETE FROM chunks WHERE segment IN ({marks})", tuple(seg_ids))


def totals(index: Index) -> tuple[int, int]:
    """(plaintext bytes, record bytes) of every chunk the vault holds once."""
    row = index.one("SELECT coalesce(sum(plain),0), coalesce(sum(length),0) FROM chunks")
    assert row is not None
    return row


def location(index: Index, cid: bytes) -> tuple[int, int, int, int] | None:
    """(segment, offset, length, key epoch) of chunk ``cid``; None when it is not stored."""
    return index.one(
        "SELECT c.segment, c.offset, c.length, g.epoch FROM chunks c JOIN segments g"
        " ON g.id = c.segment WHERE c.cid=?",
        (cid,),
    )


def records_in(index: Index, seg_id: int) -> list[tuple[bytes, int, int, int]]:
    """(cid, offset, record length, plain length) of every chunk stored in segment
    ``seg_id``, in offset order."""
    return index.q(
        "SELECT cid, offset, length, plain FROM chunks WHERE segment=? ORDER BY offset", (seg_id,)
    )


def in_data_segments(index: Index) -> list[tuple[int, bytes, int, int, int]]:
    """(segment, cid, offset, record length, plain length) of every chunk of a data segment."""
    return index.q(
        "SELECT c.segment, c.cid, c.offset, c.length, c.plain FROM chunks c"
        " JOIN segments g ON g.id = c.segment WHERE g.kind='data'"
    )


def referenced(index: Index, without: tuple[str, ...] = ()) -> set[bytes]:
    """Chunk ids of a content some snapshot entry names (``entries.content``) or that some
    block of the mount's live tree (``live_blocks``) refers to: nothing else keeps a chunk
    alive (a content no entry names does not: prune deletes it first). ``without``: as if
    the snapshots of those uids were forgotten (a dry run of `forget --prune`)."""
    named = "SELECT content FROM entries WHERE content IS NOT NULL"
    if without:
        marks = ", ".join("?" * len(without))
        named += f" AND snapshot NOT IN (SELECT id FROM snapshots WHERE uid IN ({marks}))"
    live = {
        bytes(cid)
        for (cid,) in index.q(
            "SELECT DISTINCT c.cid FROM content_chunks x JOIN chunks c ON c.id = x.chunk"
            f" WHERE x.content IN ({named})",
            without,
        )
    }
    for (blob,) in index.q("SELECT chunks FROM live_blocks"):
        blob = bytes(blob)
        for off in range(0, len(blob) - 35, 36):  # 32-byte id ‖ 4-byte length, repeated
            live.add(blob[off : off + 32])
    return live
