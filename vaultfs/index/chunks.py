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
