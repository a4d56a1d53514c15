"""Queries about the vault's remotes and their reachability (tables ``remotes``,
``remote_health``)."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from . import Index


class RemoteRow(NamedTuple):
    """One row of the ``remotes`` table (columns documented in schema.py)."""

    id: int
    spec: str
    position: int
    domain: str | None
    state: str
    last_ok: float | None
    last_error: str | None


def add(db: sqlite3.Connection, spec: str, position: int, domain: str | None = None) -> int:
    """Make remote ``spec`` active at placement ``position`` in failure domain ``domain``
    (None: its own); a remote of that spec the vault had before comes back under its old id.
    Returns its id."""
    row = db.execute("SELECT id FROM remotes WHERE spec=?", (spec,)).fetchone()
    if row:
        db.execute(
            "UPDATE remotes SET state='active', position=?, domain=? WHERE id=?",
            (position, domain, row[0]),
        )
        return row[0]
    cur = db.execute(
        "INSERT INTO remotes(spec, position, domain) VALUES (?, ?, ?)", (spec, position, domain)
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def respec(db: sqlite3.Connection, specs: dict[int, str]) -> None:
    """Give the remotes ``specs`` (id -> spec) new specs, as ``vaultfs home rebuild`` does when
    the same remotes are reached another way on a new machine. One spec may move from one row
    to another in the same call (the column is unique), so every row is first parked on a
    spec no rclone remote can have."""
    db.executemany("UPDATE remotes SET spec=? WHERE id=?", [(f"\0{r}", r) for r in specs])
    db.executemany("UPDATE remotes SET spec=? WHERE id=?", [(s, r) for r, s in specs.items()])


def next_position(db: sqlite3.Connection) -> int:
    """The placement position after every remote's (1 for the first)."""
    return (db.execute("SELECT max(position) FROM remotes").fetchone()[0] or 0) + 1


def position_of(db: sqlite3.Connection, rid: int) -> tuple[int, str | None]:
    """(placement position, failure domain or None) of remote ``rid``."""
    return db.execute("SELECT position, domain FROM remotes WHERE id=?", (rid,)).fetchone()


def remove(db: sqlite3.Connection, rid: int) -> None:
    """Take remote ``rid`` out of the vault: its row stays (state 'removed'), the manifest
    uploads still queued for it are dropped."""
    db.execute("UPDATE remotes SET state='removed' WHERE id=?", (rid,))
    db.execute("DELETE FROM manifest_queue WHERE remote=?", (rid,))


def rejoin(db: sqlite3.Connection, rid: int) -> None:
    """Undo :func:`remove` of remote ``rid`` (a removal whose rebuild failed): a member
    again; the next shipped manifest is queued for it as for every active remote."""
    db.execute("UPDATE remotes SET state='active' WHERE id=?", (rid,))


def every(index: Index) -> list[RemoteRow]:
    """Every remote the vault has known (active and removed), in placement order."""
    return [
        RemoteRow(*r)
        for r in index.q(
            "SELECT id, spec, position, domain, state, last_ok, last_error FROM remotes"
            " ORDER BY position, id"
        )
    ]


def specs(index: Index) -> dict[int, str]:
    """{id: spec} of every remote the vault has known (active and removed)."""
    return {r.id: r.spec for r in every(index)}


def removed(index: Index) -> set[int]:
    """Ids of the remotes taken out of the vault."""
    return {r.id for r in every(index) if r.state != "active"}


def members(index: Index) -> list[tuple[int, str, str]]:
    """(id, spec, failure domain) of the active remotes in placement order; a remote with no
    domain is its own (``remote<id>``)."""
    return index.q(
        "SELECT id, spec, coalesce(domain, 'remote' || id) FROM remotes WHERE state='active'"
        " ORDER BY position, id"
    )


def placement_domains(index: Index) -> list[tuple[int, str]]:
    """(id, failure domain) of the active remotes in placement order (:func:`members`)."""
    return [(rid, dom) for rid, _spec, dom in members(index)]


def active_states(index: Index) -> list[tuple[int, str, str | None, float | None, str | None]]:
    """(id, spec, domain, last_ok, last_error) of the active remotes in placement order."""
    return index.q(
        "SELECT id, spec, domain, last_ok, last_error FROM remotes WHERE state='active'"
        " ORDER BY position"
    )


def note_result(db: sqlite3.Connection, rid: int, error: str | None, now: float) -> None:
    """Note the outcome of an operation on remote ``rid`` at ``now``: success (``error``
    None: now is its last_ok, its last error is cleared) or the error message."""
    if error is None:
        db.execute("UPDATE remotes SET last_ok=?, last_error=NULL WHERE id=?", (now, rid))
    else:
        db.execute("UPDATE remotes SET last_error=? WHERE id=?", (error, rid))


def record_result(index: Index, rid: int, error: str | None) -> None:
    """:func:`note_result` now, in a transaction of its own."""
    with index.tx() as db:
        note_result(db, rid, error, time.time())


def unreachable(index: Index) -> set[int]:
    """Ids of the remotes last found unreachable."""
    return {r for (r,) in index.q("SELECT remote FROM remote_health WHERE state='unreachable'")}


def mark_reachable(index: Index, rids: list[int]) -> None:
    """Remotes marked 'unreachable' (by an audit) that answered since (a flush reached
    them): the mark is cleared as such an audit would leave them, 'ok', or 'degraded' while
    lost shards or foreign objects an earlier audit found there wait for a repair; their last
    error is cleared (the data of an unreachable remote is presumed intact)."""
    now = time.time()
    with index.tx() as db:
        for rid in rids:
            row = db.execute("SELECT state FROM remote_health WHERE remote=?", (rid,)).fetchone()
            if row is None or row[0] != "unreachable":
                continue
            lost = db.execute(
                "SELECT count(*) FROM shards WHERE remote=? AND state='lost'", (rid,)
            ).fetchone()[0]
            foreign = db.execute(
                "SELECT count(*) FROM audit_foreign WHERE remote=?", (rid,)
            ).fetchone()[0]
            if lost or foreign:
                detail = f"reachable again; {lost} lost and {foreign} foreign object(s) to repair"
                record_health(db, rid, "degraded", now, detail)
            else:
                record_health(db, rid, "ok", now, None)
            note_result(db, rid, None, now)


def stale(index: Index) -> set[int]:
    """Ids of the remotes last found serving a stale manifest or objects."""
    return {r for (r,) in index.q("SELECT remote FROM remote_health WHERE state='stale'")}


def last_error(index: Index, rid: int) -> str | None:
    """The error of the last operation on remote ``rid`` when it failed (an upload, an audit
    that could not reach it); None once one succeeded since (:func:`note_result`)."""
    row = index.one("SELECT last_error FROM remotes WHERE id=?", (rid,))
    return row[0] if row else None


def health(index: Index, rid: int) -> tuple[str, float, float, str | None] | None:
    """(state, since, checked, detail) of remote ``rid``; None when never checked."""
    return index.one(
        "SELECT state, since, checked, detail FROM remote_health WHERE remote=?", (rid,)
    )


def record_health(
    db: sqlite3.Connection, rid: int, state: str, now: float, detail: str | None
) -> None:
    """Record that remote ``rid`` was found in ``state`` ('ok', 'degraded', 'stale' or
    'unreachable') at ``now``; ``since`` keeps its time while the state stays the same."""
    old = db.execute("SELECT state, since FROM remote_health WHERE remote=?", (rid,)).fetchone()
    since = old[1] if old and old[0] == state else now
    db.execute(
        "INSERT OR REPLACE INTO remote_health(remote, state, since, checked, detail)"
        " VALUES (?, ?, ?, ?, ?)",
        (rid, state, since, now, detail),
    )


def forget_health(db: sqlite3.Connection, rid: int) -> None:
    """Forget what audits found about remote ``rid``'s health."""
    db.execute("DELETE FROM remote_health WHERE remote=?", (rid,))


def active(index: Index) -> list[tuple[int, str]]:
    """(id, spec) of every remote in use (not removed), in placement order."""
    return [(rid, spec) for rid, spec, _dom in members(index)]


#: Active remotes marked 'stale' or 'degraded' with no lost shard and no foreign object left.
_HEALABLE = (
    "SELECT h.remote FROM remote_health h JOIN remotes r ON r.id = h.remote"
    " WHERE r.state = 'active' AND h.state IN ('stale', 'degraded')"
    " AND NOT EXISTS (SELECT 1 FROM shards s WHERE s.remote = h.remote AND s.state = 'lost')"
    " AND NOT EXISTS (SELECT 1 FROM audit_foreign f WHERE f.remote = h.remote)"
)


def _heal(db: sqlite3.Connection, rids: list[int], now: float) -> None:
    db.executemany(
        "UPDATE remote_health SET state='ok', since=?, detail=NULL WHERE remote=?",
        [(now, rid) for rid in rids],
    )


#: What :func:`heal_ahead` changed: (remote id, state, since, checked, detail) before.
HealthRow = tuple[int, str, float, float, str | None]


def heal_ahead(index: Index) -> list[HealthRow]:
    """Before a repair ships the index copy that goes to every remote: every remote
    :func:`mark_healed` would call 'ok' once it holds that copy's manifest is recorded 'ok'
    now, so the copy says how it is as of the repair (a home rebuilt from it later does not
    show a just-rebuilt replacement remote as stale). The caller puts back with
    :func:`mark_behind` those the flush did not give the manifest. Returns their rows as
    they were."""
    with index.tx() as db:
        ahead = db.execute(
            "SELECT remote, state, since, checked, detail FROM remote_health"
            f" WHERE remote IN ({_HEALABLE})"
        ).fetchall()
        _heal(db, [row[0] for row in ahead], time.time())
    return ahead


def mark_behind(index: Index, ahead: list[HealthRow], seq: int | None) -> list[int]:
    """Of the remotes :func:`heal_ahead` called 'ok', put back the health of those that have
    not received manifest ``seq`` (None: of all, no manifest was shipped). Returns their
    ids."""
    with index.tx() as db:
        behind = [
            row
            for row in ahead
            if seq is None
            or db.execute(
                "SELECT 1 FROM manifest_queue WHERE remote=? AND seq <= ?", (row[0], seq)
            ).fetchone()
        ]
        db.executemany(
            "INSERT OR REPLACE INTO remote_health(remote, state, since, checked, detail)"
            " VALUES (?, ?, ?, ?, ?)",
            behind,
        )
    return [row[0] for row in behind]


def mark_healed(index: Index, seq: int) -> list[int]:
    """After a repair published manifest ``seq``: every active remote marked 'stale' or
    'degraded' that now holds that manifest and has no lost shard and no foreign object left
    is 'ok' again (a replacement remote, a rolled-back one brought forward). Returns their
    ids."""
    with index.tx() as db:
        rows = db.execute(
            _HEALABLE + " AND NOT EXISTS (SELECT 1 FROM manifest_queue q"
            " WHERE q.remote = h.remote AND q.seq <= ?)",
            (seq,),
        ).fetchall()
        healed = [rid for (rid,) in rows]
        _heal(db, healed, time.time())
    return healed
