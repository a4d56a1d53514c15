"""Queries about audits: the keyed tags of shard pieces, the audit runs and their planned
challenges, what audits found (tables ``audit_tags``, ``audit_runs``, ``audit_plan``,
``audit_findings``, ``audit_foreign``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Index

#: A planned challenge: (shard id, block, piece); block and piece -1 for a whole object,
#: piece -1 for a whole block.
Challenge = tuple[int, int, int]


# -- tags ----------------------------------------------------------------------------------
def put_tags(db: sqlite3.Connection, rows: Iterable[tuple[str, int, bytes]]) -> None:
    """Record the audit tags of shard objects: rows of (object name, piece size, tags)."""
    db.executemany("INSERT OR REPLACE INTO audit_tags(name, piece, tags) VALUES (?, ?, ?)", rows)


def tags_of(index: Index, name: str) -> bytes | None:
    """The audit tags of shard object ``name``; None when it has none."""
    row = index.one("SELECT tags FROM audit_tags WHERE name=?", (name,))
    return None if row is None else row[0]


def tagged_on(index: Index, rid: int, piece: int) -> set[str]:
    """Names of the shard objects of remote ``rid`` with tags over pieces of ``piece`` bytes."""
    return {
        n
        for (n,) in index.q(
            "SELECT t.name FROM audit_tags t JOIN shards s ON s.name = t.name"
            " WHERE s.remote=? AND t.piece=?",
            (rid, piece),
        )
    }


def forget_tags(db: sqlite3.Connection, names: list[str]) -> None:
    """Drop the tags of the shard objects ``names`` (replaced)."""
    db.executemany("DELETE FROM audit_tags WHERE name=?", [(n,) for n in names])


def forget_orphans(index: Index) -> None:
    """Drop tags, findings and planned challenges whose shard is gone (crashed seals, pruned
    index copies)."""
    with index.tx() as db:
        db.execute("DELETE FROM audit_tags WHERE name NOT IN (SELECT name FROM shards)")
        db.execute("DELETE FROM audit_findings WHERE shard NOT IN (SELECT id FROM shards)")
        db.execute("DELETE FROM audit_plan WHERE shard NOT IN (SELECT id FROM shards)")


# -- runs and their challenges ---------------------------------------------------------------
def last_run(index: Index, rid: int) -> tuple[float, float | None, str, int, float | None] | None:
    """(started, finished, mode, checked, confidence) of the newest audit run of remote
    ``rid``; None when it was never audited."""
    return index.one(
        "SELECT started, finished, mode, checked, confidence FROM audit_runs WHERE remote=?"
        " ORDER BY id DESC LIMIT 1",
        (rid,),
    )


def open_run(index: Index, rid: int) -> tuple[int, str] | None:
    """(run id, mode) of remote ``rid``'s newest unfinished audit run; None when none is."""
    return index.one(
        "SELECT id, mode FROM audit_runs WHERE remote=? AND finished IS NULL"
        " ORDER BY id DESC LIMIT 1",
        (rid,),
    )


def close_run(index: Index, run: int, finished: float) -> None:
    """End run ``run`` unfinished (at ``finished``): its remaining challenges are dropped."""
    with index.tx() as db:
        db.execute("DELETE FROM audit_plan WHERE run=?", (run,))
        db.execute("UPDATE audit_runs SET finished=? WHERE id=?", (finished, run))


def start_run(
    index: Index, rid: int, mode: str, started: float, blocks: int, plan: list[Challenge]
) -> int:
    """Record a new audit run of remote ``rid`` over ``blocks`` blocks with its challenges;
    returns its id."""
    with index.tx() as db:
        cur = db.execute(
            "INSERT INTO audit_runs(remote, mode, started, blocks, planned) VALUES (?, ?, ?, ?, ?)",
            (rid, mode, started, blocks, len(plan)),
        )
        run = cur.lastrowid
        assert run is not None
        db.executemany(
            "INSERT OR IGNORE INTO audit_plan(run, shard, block, piece) VALUES (?, ?, ?, ?)",
            [(run, *p) for p in plan],
        )
    return run


def challenges(index: Index, run: int) -> list[Challenge]:
    """The challenges of run ``run`` not answered yet."""
    return index.q("SELECT shard, block, piece FROM audit_plan WHERE run=?", (run,))


def drop_challenges(db: sqlite3.Connection, run: int, rows: Iterable[Challenge]) -> None:
    """Strike challenges off run ``run``'s plan (answered, or their shard is gone)."""
    db.executemany(
        "DELETE FROM audit_plan WHERE run=? AND shard=? AND block=? AND piece=?",
        [(run, *r) for r in rows],
    )


def drop_shard_challenges(db: sqlite3.Connection, run: int, shard: int) -> None:
    """Strike every challenge of shard ``shard`` off run ``run``'s plan."""
    db.execute("DELETE FROM audit_plan WHERE run=? AND shard=?", (run, shard))


def count_answers(db: sqlite3.Connection, run: int, ok: int, failed: int) -> None:
    """Add ``ok`` passed and ``failed`` failed checks to run ``run``."""
    db.execute(
        "UPDATE audit_runs SET checked = checked + ?, failed = failed + ? WHERE id=?",
        (ok, failed, run),
    )


def run_progress(index: Index, run: int) -> tuple[int, int, int, int, int]:
    """(blocks, planned, checked, failed, challenges left) of run ``run``."""
    row = index.one("SELECT blocks, planned, checked, failed FROM audit_runs WHERE id=?", (run,))
    assert row is not None
    (left,) = index.one("SELECT count(*) FROM audit_plan WHERE run=?", (run,))
    return (*row, left)


def finish_run(
    index: Index, run: int, bytes_read: int, confidence: float, finished: float | None
) -> None:
    """Add ``bytes_read`` to run ``run`` and record its confidence; ``finished`` (a time)
    ends it, None leaves it to be resumed."""
    with index.tx() as db:
        db.execute(
            "UPDATE audit_runs SET bytes_read = bytes_read + ?, confidence=?, finished=?"
            " WHERE id=?",
            (bytes_read, confidence, finished, run),
        )


# -- findings ----------------------------------------------------------------------------------
def record_finding(
    db: sqlite3.Connection, shard: int, remote: int, kind: str, detail: str, found: float
) -> None:
    """Record what an audit (or a repair using it as a source) found wrong with shard
    ``shard`` on ``remote`` ('missing', 'corrupt', 'stale'); a placed shard becomes 'lost'
    so that repair rebuilds it."""
    db.execute(
        "INSERT OR REPLACE INTO audit_findings(shard, remote, kind, detail, found)"
        " VALUES (?, ?, ?, ?, ?)",
        (shard, remote, kind, detail, found),
    )
    db.execute("UPDATE shards SET state='lost' WHERE id=? AND state='placed'", (shard,))


def findings(index: Index) -> list[tuple[int, str, str | None]]:
    """(shard id, kind, detail) of every finding."""
    return index.q("SELECT shard, kind, detail FROM audit_findings")


def open_findings(index: Index, rid: int) -> list[tuple[str, str, str, str | None]]:
    """(object name, segment kind, finding kind, detail) of the findings on remote ``rid``
    whose shard is still lost (not yet repaired)."""
    return index.q(
        "SELECT s.name, g.kind, f.kind, f.detail FROM audit_findings f JOIN shards s"
        " ON s.id = f.shard JOIN segments g ON g.id = s.segment WHERE f.remote=?"
        " AND s.state='lost'",
        (rid,),
    )


def revive(db: sqlite3.Connection, shards: list[int]) -> None:
    """Lost ``shards`` found present and intact again on their remotes: placed once more,
    their findings dropped."""
    db.executemany(
        "UPDATE shards SET state='placed' WHERE id=? AND state='lost'", [(s,) for s in shards]
    )
    forget_findings(db, shards)


def forget_findings(db: sqlite3.Connection, shards: list[int]) -> None:
    """Drop the findings of ``shards`` (rebuilt or gone)."""
    db.executemany("DELETE FROM audit_findings WHERE shard=?", [(s,) for s in shards])


# -- foreign objects ---------------------------------------------------------------------------
def set_foreign(index: Index, rid: int, objects: list[tuple[str, str]], found: float) -> None:
    """Replace the foreign objects (subdirectory, name) recorded for remote ``rid``: objects
    its listing showed that the vault does not place there."""
    with index.tx() as db:
        db.execute("DELETE FROM audit_foreign WHERE remote=?", (rid,))
        db.executemany(
            "INSERT OR IGNORE INTO audit_foreign(remote, sub, name, found) VALUES (?, ?, ?, ?)",
            [(rid, sub, nm, found) for sub, nm in objects],
        )


def foreign(index: Index) -> list[tuple[int, str, str]]:
    """(remote, subdirectory, name) of every foreign object recorded."""
    return index.q("SELECT remote, sub, name FROM audit_foreign")


def foreign_count(index: Index, rid: int) -> int:
    """How many foreign objects are recorded on remote ``rid``."""
    row = index.one("SELECT count(*) FROM audit_foreign WHERE remote=?", (rid,))
    assert row is not None
    return row[0]


def forget_foreign(index: Index, rid: int, sub: str, names: list[str]) -> None:
    """Strike the foreign objects ``names`` of ``sub`` on remote ``rid`` (deleted) off the list."""
    with index.tx() as db:
        db.executemany(
            "DELETE FROM audit_foreign WHERE remote=? AND sub=? AND name=?",
            [(rid, sub, n) for n in names],
        )
