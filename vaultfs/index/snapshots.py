"""Queries about snapshots and their entries (tables ``snapshots``, ``entries``; a file's
chunks through the content it names: vaultfs/index/contents.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import InputError
from ..names import DbText, from_db, is_text, raw, to_db
from .remotes import unreachable

if TYPE_CHECKING:
    from . import Index

#: Columns of an entry row as :func:`add_entry` takes them (after the snapshot id).
ENTRY_COLUMNS = (
    "path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link, parent, rdev, content"
)


def add(db: sqlite3.Connection, uid: str, name: str | None, created: float, seq: int) -> int:
    """Record a new snapshot to be carried first by manifest ``seq``; returns its row id."""
    cur = db.execute(
        "INSERT INTO snapshots(uid, name, created, seq) VALUES (?, ?, ?, ?)",
        (uid, name, created, seq),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def add_entry(db: sqlite3.Connection, snapshot: int, row: tuple) -> int:
    """Record one entry of ``snapshot`` (``row`` in :data:`ENTRY_COLUMNS` order, names in
    their stored form); returns its id."""
    cur = db.execute(
        f"INSERT INTO entries(snapshot, {ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?, ?)",
        (snapshot, *row),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def finish(db: sqlite3.Connection, snapshot: int, root: bytes, files: int, size: int) -> None:
    """Record a snapshot's vault root, entry count and logical bytes."""
    db.execute(
        "UPDATE snapshots SET root=?, files=?, bytes=? WHERE id=?", (root, files, size, snapshot)
    )


def delete(db: sqlite3.Connection, uid: str) -> bool:
    """Forget snapshot ``uid`` and its entries; False when there is none. The contents its
    files named stay (others may name them) until prune deletes those nobody names."""
    row = db.execute("SELECT id FROM snapshots WHERE uid=?", (uid,)).fetchone()
    if row is None:
        return False
    db.execute("DELETE FROM entries WHERE snapshot=?", row)
    db.execute("DELETE FROM snapshots WHERE id=?", row)
    return True


def summary(index: Index) -> tuple[int, float | None]:
    """(number of snapshots, creation time of the newest)."""
    row = index.one("SELECT count(*), max(created) FROM snapshots")
    assert row is not None
    return row


def rows(index: Index) -> list[tuple[str, str | None, float, int, int, int]]:
    """Every snapshot as (uid, name, created, files, bytes, seq), oldest first."""
    return index.q("SELECT uid, name, created, files, bytes, seq FROM snapshots ORDER BY id")


def find(index: Index, ref: str) -> tuple[int, str] | None:
    """(row id, uid) of snapshot ``ref``: its uid, its name (the newest snapshot of that
    name) or 'latest' (the newest of all); None when nothing matches."""
    if ref == "latest":
        return index.one("SELECT id, uid FROM snapshots ORDER BY id DESC LIMIT 1")
    # an id wins over a name (names shaped like ids are refused, older ones may exist)
    return index.one(
        "SELECT id, uid FROM snapshots WHERE uid=? OR name=? ORDER BY uid=? DESC, id DESC LIMIT 1",
        (ref, ref, ref),
    )


def require(index: Index, ref: str, unique: bool = False) -> tuple[int, str]:
    """:func:`find`, or InputError (exit 18) naming ``ref`` and where to look: the one
    refusal of every command given a snapshot that does not exist. With ``unique`` (a
    command that deletes), a name several snapshots share is refused too (InputError, their
    ids listed): only an id picks one of them."""
    found = find(index, ref)
    if found is None:
        raise InputError(f"no snapshot with id or name {ref!r}: see `vaultfs snapshots`")
    if unique and len(same := namesakes(index, ref)) > 1:
        raise InputError(
            f"{len(same)} snapshots are named {ref!r} ({', '.join(same)}, newest first): "
            "give the id of the one you mean (`vaultfs snapshots`)"
        )
    return found


def namesakes(index: Index, ref: str) -> list[str]:
    """The ids of the snapshots named ``ref``, newest first; none when ``ref`` is a
    snapshot's id or 'latest' (which pick one snapshot whatever the names)."""
    if ref == "latest" or index.one("SELECT 1 FROM snapshots WHERE uid=?", (ref,)):
        return []
    return [
        u for (u,) in index.q("SELECT uid FROM snapshots WHERE name=? ORDER BY id DESC", (ref,))
    ]


def newest_of_name(index: Index, ref: str) -> str | None:
    """For a command that reads the snapshot ``ref`` names: when several snapshots share that
    name, the sentence saying that the newest was taken (and how to pick another); None when
    ``ref`` picks one snapshot. Names need not be unique; the newest of a name wins
    (docs/operations.md, "Snapshots")."""
    return newest_note(ref, namesakes(index, ref))


def newest_note(ref: str, same: list[str]) -> str | None:
    """The sentence of :func:`newest_of_name` for ``same``, the ids of the snapshots named
    ``ref`` newest first (None when fewer than two): for a reader that picks among some
    snapshots only (the knowledge-base commands: those holding a knowledge base)."""
    if len(same) < 2:
        return None
    return (
        f"{len(same)} snapshots are named {ref!r}: using the newest, {same[0]} (the others: "
        f"{', '.join(same[1:])}; give an id to read another)"
    )


def entry_rows(index: Index, snapshot: int) -> list[tuple]:
    """(path, type, mode, size, mtime_ns, target, rdev) of every entry of the snapshot with
    row id ``snapshot``, in no particular order (paths as stored: names.from_db)."""
    return index.q(
        "SELECT path, type, mode, size, mtime_ns, target, rdev FROM entries WHERE snapshot=?",
        (snapshot,),
    )


def listed(index: Index, ref: str, path: str | None = None) -> tuple[str, str | None, list[tuple]]:
    """`vaultfs ls`: (uid, note, rows) of snapshot ``ref``, the rows of :func:`entry_rows`
    in byte order of their paths, only those at or under ``path`` (file-system form) when
    given (none: the snapshot does not hold it); ``note`` is :func:`newest_of_name`'s.
    InputError (exit 18) for a snapshot that does not exist. The mount's daemon answers it
    too, so a mounted vault lists a snapshot without the passphrase."""
    found = require(index, ref)
    note = newest_of_name(index, ref)
    got = entry_rows(index, found[0])
    got.sort(key=lambda r: from_db(r[0]))  # byte order, whatever the stored form
    if path:
        p = raw(path.strip("/"))
        got = [r for r in got if (b := from_db(r[0])) == p or b.startswith(p + b"/")]
    return found[1], note, got


def file_chunk_ids(index: Index, entry: int) -> list[bytes]:
    """The chunk ids of file entry ``entry``, in file order."""
    return [
        cid
        for (cid,) in index.q(
            "SELECT c.cid FROM entries e JOIN content_chunks x ON x.content = e.content"
            " JOIN chunks c ON c.id = x.chunk WHERE e.id=? ORDER BY x.seq",
            (entry,),
        )
    ]


def details(index: Index, snapshot: int) -> tuple[str, str | None, float, int, bytes, int, int]:
    """(uid, name, created, manifest seq, vault root, files, bytes) of the snapshot with row
    id ``snapshot``."""
    row = index.one(
        "SELECT uid, name, created, seq, root, files, bytes FROM snapshots WHERE id=?",
        (snapshot,),
    )
    assert row is not None
    return row


def full_entries(index: Index, snapshot: int) -> list[tuple]:
    """Every entry of the snapshot with row id ``snapshot`` as (id, path, type, mode,
    mtime_ns, size, target, uid, gid, xattrs, link, rdev), in path order (names as stored:
    names.from_db): all a restore needs to recreate it."""
    return index.q(
        "SELECT id, path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link, rdev"
        " FROM entries WHERE snapshot=? ORDER BY path",
        (snapshot,),
    )


_ENTRY_ROW = "SELECT id, path, type, mode, mtime_ns, size, target, uid, gid, xattrs, link, rdev"


def entries_on(index: Index, snapshot: int, paths: list[str]) -> list[tuple]:
    """The entries of the snapshot with row id ``snapshot`` that are one of ``paths``
    (relative, in file-system form), lie under one, or are a directory above one: rows as
    :func:`full_entries` gives them, in the same order. Point lookups and range scans on
    ``(snapshot, path)``, never a scan of the snapshot (a restore of one file through the
    lazy index view reads only the pages on its path). A path's canonical value is TEXT or
    BLOB (names.to_db), and SQLite orders every TEXT before every BLOB, so what lies under a
    path is two ranges: TEXT values between ``p/`` and ``p0`` ('0' follows '/'), and BLOB
    values between the same bytes."""
    exact: set[DbText] = set()
    found: dict[int, tuple] = {}
    for p in paths:
        parts = p.split("/")
        exact |= {to_db("/".join(parts[:n])) for n in range(1, len(parts) + 1)}
        b = raw(p)
        bounds: list[tuple[DbText, DbText]] = [(b + b"/", b + b"0")]
        if is_text(b):
            bounds.append(((b + b"/").decode(), (b + b"0").decode()))
        for lo, hi in bounds:
            for r in index.q(
                f"{_ENTRY_ROW} FROM entries WHERE snapshot=? AND path>? AND path<?",
                (snapshot, lo, hi),
            ):
                found[r[0]] = r
    for value in exact:
        r = index.one(f"{_ENTRY_ROW} FROM entries WHERE snapshot=? AND path=?", (snapshot, value))
        if r is not None:
            found[r[0]] = r
    # SQLite's order of the path column: every TEXT before every BLOB, each by its bytes
    return sorted(found.values(), key=lambda r: (isinstance(r[1], bytes), from_db(r[1])))


def file_chunks(index: Index, entry: int) -> list[tuple[bytes, int, int, int, int]]:
    """(cid, segment, offset, record length, plain length) of the chunks of file entry
    ``entry``, in file order."""
    return index.q(
        "SELECT c.cid, c.segment, c.offset, c.length, c.plain FROM entries e"
        " JOIN content_chunks x ON x.content = e.content JOIN chunks c ON c.id = x.chunk"
        " WHERE e.id=? ORDER BY x.seq",
        (entry,),
    )


def file_chunk_pages(
    index: Index, entry: int, page: int
) -> Iterator[list[tuple[bytes, int, int, int, int]]]:
    """:func:`file_chunks` of file entry ``entry`` in pages of at most ``page`` rows, in file
    order (keyset on the chunk's position), so a huge file's rows are never all in memory."""
    seq = -1
    while True:
        rows = index.q(
            "SELECT x.seq, c.cid, c.segment, c.offset, c.length, c.plain FROM entries e"
            " JOIN content_chunks x ON x.content = e.content JOIN chunks c ON c.id = x.chunk"
            " WHERE e.id=? AND x.seq > ? ORDER BY x.seq LIMIT ?",
            (entry, seq, page),
        )
        if not rows:
            return
        seq = rows[-1][0]
        yield [r[1:] for r in rows]
        if len(rows) < page:
            return


def segment_epochs(index: Index, entries: list[int]) -> set[int]:
    """The key epochs of the segments holding the chunks of file entries ``entries`` (a
    restore checks their suites before it writes anything)."""
    out: set[int] = set()
    for i in range(0, len(entries), 500):
        part = entries[i : i + 500]
        out |= {
            epoch
            for (epoch,) in index.q(
                "SELECT DISTINCT g.epoch FROM entries e JOIN content_chunks x"
                " ON x.content = e.content JOIN chunks c ON c.id = x.chunk"
                f" JOIN segments g ON g.id = c.segment WHERE e.id IN ({','.join('?' * len(part))})",
                tuple(part),
            )
        }
    return out


def files_in_segment(index: Index, seg_id: int) -> list[tuple[str, str]]:
    """(snapshot uid, path as stored) of every file with a chunk in segment ``seg_id``, by
    snapshot and path."""
    return index.q(
        "SELECT DISTINCT s.uid, e.path FROM entries e JOIN snapshots s ON s.id = e.snapshot"
        " WHERE e.content IN (SELECT x.content FROM chunks c JOIN content_chunks x"
        " ON x.chunk = c.id WHERE c.segment=?) ORDER BY s.id, e.path",
        (seg_id,),
    )


def entry_place(index: Index, entry_id: int) -> tuple[DbText, str] | None:
    """(path as stored, snapshot name or else uid) of entry ``entry_id``; None if gone."""
    return index.one(
        "SELECT e.path, COALESCE(s.name, s.uid) FROM entries e"
        " JOIN snapshots s ON s.id = e.snapshot WHERE e.id=?",
        (entry_id,),
    )


def holding(index: Index, path: str) -> list[tuple[int, str, str | None, float, int]]:
    """(row id, uid, name, created, manifest seq) of every snapshot with an entry at ``path``
    (as stored: names.to_db), oldest first."""
    return index.q(
        "SELECT s.id, s.uid, s.name, s.created, s.seq FROM snapshots s WHERE EXISTS"
        " (SELECT 1 FROM entries e WHERE e.snapshot = s.id AND e.path = ?) ORDER BY s.id",
        (path,),
    )


def present(index: Index, snapshot: int, paths: list[str]) -> set[str]:
    """Which of ``paths`` (as stored: names.to_db) the snapshot with row id ``snapshot`` has
    an entry at."""
    marks = ",".join("?" * len(paths))
    return {
        p
        for (p,) in index.q(
            f"SELECT path FROM entries WHERE snapshot = ? AND path IN ({marks})",
            (snapshot, *paths),
        )
    }


def newest_placed(index: Index) -> tuple[str, float] | None:
    """(uid, created) of the newest snapshot that is fully placed: the manifest that first
    carried it is on every active remote and no shard of a segment sealed by then still
    waits in the local queue. None when no snapshot is."""
    return index.one(
        "SELECT uid, created FROM snapshots s"
        " WHERE s.seq <= (SELECT coalesce(min(p), 0) FROM (SELECT (SELECT max(m.seq)"
        "   FROM manifests m WHERE m.seq NOT IN (SELECT q.seq FROM manifest_queue q"
        "   WHERE q.remote = r.id)) AS p FROM remotes r WHERE r.state = 'active'))"
        " AND NOT EXISTS (SELECT 1 FROM shards h JOIN segments g ON g.id = h.segment"
        "   WHERE h.state = 'queued' AND g.created <= s.created)"
        " ORDER BY s.created DESC, s.id DESC LIMIT 1"
    )


def newest_restorable(index: Index, down: set[int]) -> tuple[str, float] | None:
    """(uid, created) of the newest snapshot the remotes alone restore, those in ``down``
    (unreachable) left out: a manifest carrying it is on one of the others, that manifest's
    index copy and every data segment sealed by then have k shards placed on them. A remote
    that stays down keeps snapshots from being fully placed (:func:`newest_placed`), not
    from being restorable. None when no snapshot is."""
    marks = ",".join("?" * len(down))
    placed = (
        "(SELECT count(*) FROM shards h WHERE h.segment = g.id AND h.state = 'placed'"
        f" AND h.remote NOT IN ({marks})) < g.k"
    )
    gone = tuple(down)
    cutoff = index.one(
        f"SELECT min(g.created) FROM segments g WHERE g.kind='data' AND {placed}", gone
    )[0]
    seq = index.one(
        "SELECT max(m.seq) FROM manifests m WHERE EXISTS (SELECT 1 FROM remotes r"
        f" WHERE r.state = 'active' AND r.id NOT IN ({marks}) AND NOT EXISTS (SELECT 1"
        " FROM manifest_queue q WHERE q.remote = r.id AND q.seq = m.seq)) AND NOT EXISTS"
        " (SELECT 1 FROM manifest_segments x JOIN segments g ON g.id = x.segment"
        f" WHERE x.manifest = m.seq AND {placed})",
        gone * 2,
    )[0]
    if seq is None:
        return None
    return index.one(
        "SELECT uid, created FROM snapshots WHERE seq <= ? AND created < ?"
        " ORDER BY created DESC, id DESC LIMIT 1",
        (seq, float("inf") if cutoff is None else cutoff),
    )


def recovery_point(index: Index) -> tuple[str, float] | None:
    """(uid, created) of the newest snapshot the remotes not marked unreachable restore alone
    (:func:`newest_restorable`): what a lost home disk would leave. `status` shows it as the
    recovery point, and `forget` never forgets it (vaultfs/forget.py)."""
    return newest_restorable(index, unreachable(index))


def listing(index: Index) -> list[dict]:
    """`vaultfs snapshots --json`: every snapshot, oldest first, with its manifest (the
    mount's daemon answers it too, so a mounted vault lists them without the passphrase)."""
    from . import manifests

    links = manifests.chain_links(index)
    return [
        {
            "id": u, "name": nm, "time": c, "entries": f, "bytes": b, "seq": s,
            "manifest_hash": links[s].hex()[:16] if s in links else None,
        }
        for u, nm, c, f, b, s in rows(index)
    ]  # fmt: skip
