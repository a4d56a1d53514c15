"""The local SQLite index: the single source of truth for what the vault holds and where.

Every column is documented in the schema below. Sentinels that crash recovery reads:
``shards.state = 'queued'`` means the shard object is durable in the local queue directory
but not yet known to be on its remote; ``segments.state = 'open'`` never reaches disk (a
segment is inserted only once it is sealed and its shards are durable in the queue).

After every commit the whole index is exported (``Index.export_bytes``), encrypted and
erasure-coded like data, and named by a signed manifest (see vault.py and docs/design.md).
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from . import names

#: ``PRAGMA user_version`` of an index in the current layout. 1: the first layout (0 in the
#: file); 2: entries.parent, entries.rdev and the entries_parent/entries_link indexes
#: (:func:`migrate` adds them to an older file and fills ``parent``).
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,          -- setting name: vault_id, k, n, segment_size, suite, ...
                                     -- (unshipped_since: set by a repair that moved shards,
                                     -- cleared when the next manifest is recorded)
    value TEXT NOT NULL              -- its value, as text (integers in decimal, bytes in hex)
);
CREATE TABLE IF NOT EXISTS remotes (
    id        INTEGER PRIMARY KEY,   -- stable remote number used by shards.remote_id
    spec      TEXT NOT NULL UNIQUE,  -- rclone remote spec as the user gave it
    position  INTEGER NOT NULL,      -- placement order (shard i of segment s goes to
                                     -- position (i + s) mod number-of-remotes)
    domain    TEXT,                  -- failure domain label; NULL = its own domain
    state     TEXT NOT NULL DEFAULT 'active', -- 'active' or 'removed'
    last_ok   REAL,                  -- unix time of the last successful operation
    last_error TEXT                  -- last error message from rclone, NULL after a success
);
CREATE TABLE IF NOT EXISTS epochs (
    epoch     INTEGER PRIMARY KEY,   -- key epoch number, 0 at init
    suite     INTEGER NOT NULL,      -- crypto suite id the epoch's data key is used with
    wrapped   BLOB NOT NULL,         -- data key sealed with HPKE to the vault's KEM key
    created   REAL NOT NULL          -- unix time the epoch began
);
-- Crypto suites the vault has used (vaultfs/rotation.py). Settings used with them: suite
-- (suite id new epochs use), epoch (epoch new writes use), reencrypt_epoch (target epoch of an
-- unfinished `vaultfs reencrypt`; absent when none runs), slhdsa_public / slhdsa_sealed (the
-- SLH-DSA public key and its secret key sealed under HKDF "sign/slhdsa-seal", hex),
-- slhdsa_param (its parameter set, "sha2-128f"; absent in vaults made before: "sha2-128s").
CREATE TABLE IF NOT EXISTS suites (
    id        INTEGER PRIMARY KEY,   -- suite id (keys.SUITES)
    state     TEXT NOT NULL,         -- 'active': readable; 'retired': every read under it is
                                     -- refused (set only after no data segment uses it)
    changed   REAL NOT NULL          -- unix time of the last state change
);
-- Shard objects on remotes that no segment uses any more (re-encryption replaced them). They
-- are deleted from their remote only after a manifest that no longer names them is placed.
CREATE TABLE IF NOT EXISTS garbage (
    name      TEXT PRIMARY KEY,      -- shard object name (32 hex digits)
    remote    INTEGER NOT NULL,      -- remote it was placed on (remotes.id)
    kind      TEXT NOT NULL,         -- 'data' or 'meta': the remote subdirectory
    seq       INTEGER NOT NULL       -- first manifest seq that no longer names it
);
CREATE TABLE IF NOT EXISTS segments (
    id        INTEGER PRIMARY KEY,   -- segment sequence number (orders the vault Merkle root)
    uid       BLOB NOT NULL UNIQUE,  -- 16 random bytes, written in every shard header
    kind      TEXT NOT NULL,         -- 'data' (chunk records) or 'meta' (exported index)
    size      INTEGER NOT NULL,      -- padded plaintext size that was erasure coded
    used      INTEGER NOT NULL,      -- bytes of records before the zero padding
    k         INTEGER NOT NULL,      -- shards needed to decode
    n         INTEGER NOT NULL,      -- shards written
    ec_alg    INTEGER NOT NULL,      -- erasure algorithm id (1 = isa_l_rs_vand)
    epoch     INTEGER NOT NULL,      -- key epoch of the records inside (data segments)
    root      BLOB NOT NULL,         -- Merkle root over the n shard roots
    manifest  INTEGER,               -- for 'meta' segments: the manifest seq that names them
    created   REAL NOT NULL          -- unix time sealed
);
CREATE TABLE IF NOT EXISTS shards (
    id        INTEGER PRIMARY KEY,
    segment   INTEGER NOT NULL REFERENCES segments(id), -- segment this shard belongs to
    idx       INTEGER NOT NULL,      -- fragment index 0..n-1 (< k: data, >= k: parity)
    name      TEXT NOT NULL UNIQUE,  -- random object name (32 hex digits) on the remote
    remote    INTEGER NOT NULL REFERENCES remotes(id), -- remote it is placed on
    size      INTEGER NOT NULL,      -- object size in bytes (header + fragment)
    hash      BLOB NOT NULL,         -- BLAKE3 of the whole object (fast whole-object check)
    blocks    BLOB NOT NULL,         -- concatenated 32-byte Merkle leaf hashes of its blocks
    root      BLOB NOT NULL,         -- Merkle root over those leaves
    state     TEXT NOT NULL,         -- 'queued' (in local queue dir), 'placed', 'lost'
    UNIQUE (segment, idx)
);
CREATE INDEX IF NOT EXISTS shards_state ON shards(state, remote);
CREATE TABLE IF NOT EXISTS chunks (
    id        INTEGER PRIMARY KEY,   -- local chunk number (referenced by entry_chunks)
    cid       BLOB NOT NULL UNIQUE,  -- keyed BLAKE3 chunk id; never leaves the client unencrypted
    segment   INTEGER NOT NULL REFERENCES segments(id), -- data segment holding the record
    offset    INTEGER NOT NULL,      -- byte offset of the record in the segment plaintext
    length    INTEGER NOT NULL,      -- record length (salt + commitment + ciphertext + tag)
    plain     INTEGER NOT NULL       -- plaintext length of the chunk
);
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY,   -- snapshot number
    uid       TEXT NOT NULL UNIQUE,  -- short random hex id shown to users
    name      TEXT,                  -- optional user label
    created   REAL NOT NULL,         -- unix time of the commit
    seq       INTEGER NOT NULL,      -- manifest sequence number that first carried it
    root      BLOB,                  -- vault Merkle root signed in that manifest
    files     INTEGER NOT NULL DEFAULT 0, -- number of entries
    bytes     INTEGER NOT NULL DEFAULT 0  -- logical bytes of regular files
);
-- A snapshot's entries. Names are bytes (anything but '/' and NUL): `path` and `target` hold
-- their canonical form (vaultfs/names.py): a TEXT value when the bytes are valid UTF-8, else
-- a BLOB of the raw bytes, so each byte string has exactly one stored value. The entries of
-- one snapshot are inserted by one transaction, parents before children, so their ids are
-- consecutive (the mount's snapshot inode numbers rely on that: vaultfs/snapview.py).
CREATE TABLE IF NOT EXISTS entries (
    id        INTEGER PRIMARY KEY,
    snapshot  INTEGER NOT NULL REFERENCES snapshots(id), -- owning snapshot
    path      TEXT NOT NULL,         -- relative POSIX path, no '..', no leading '/' (TEXT or
                                     -- BLOB, see above)
    type      TEXT NOT NULL,         -- 'f' file, 'd' directory, 'l' symlink, 'p' fifo,
                                     -- 'c' character device, 'b' block device, 's' socket
    mode      INTEGER NOT NULL,      -- permission bits (st_mode & 0o7777)
    mtime_ns  INTEGER NOT NULL,      -- modification time, nanoseconds since the epoch
    size      INTEGER NOT NULL,      -- logical size in bytes (files; 0 for other types)
    target    TEXT,                  -- symlink target (symlinks only; TEXT or BLOB as path)
    uid       INTEGER,               -- owner user id (NULL: unknown, restore as the caller)
    gid       INTEGER,               -- owner group id (NULL: unknown)
    xattrs    TEXT,                  -- extended attributes, JSON: {name: hex value} when every
                                     -- name is UTF-8, else [[hex name, hex value], ...]
    link      INTEGER,               -- hard-link group: entries of one snapshot with the same
                                     -- non-NULL value are one inode (NULL: not hard-linked)
    parent    INTEGER,               -- (schema 2) id of the directory entry holding this one;
                                     -- 0 at the top of the snapshot; NULL when the snapshot
                                     -- has no entry for its directory or the path is invalid.
                                     -- Derived from path (readers may ignore it); lets the
                                     -- mount list one directory without reading the rest
    rdev      INTEGER,               -- (schema 2) device number (st_rdev) of 'c'/'b' entries
    UNIQUE (snapshot, path)
);
-- (schema 2) a directory's children: the mount's readdir, and its subdirectory count
CREATE INDEX IF NOT EXISTS entries_parent ON entries(snapshot, parent, type);
-- (schema 2) the members of a hard-link group (one inode number, nlink = their count)
CREATE INDEX IF NOT EXISTS entries_link ON entries(snapshot, link) WHERE link IS NOT NULL;
CREATE TABLE IF NOT EXISTS entry_chunks (
    entry     INTEGER NOT NULL REFERENCES entries(id), -- file entry
    seq       INTEGER NOT NULL,      -- position of the chunk in the file (0-based)
    chunk     INTEGER NOT NULL REFERENCES chunks(id),  -- chunk holding those bytes
    PRIMARY KEY (entry, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    seq       INTEGER PRIMARY KEY,   -- manifest sequence number (strictly increasing)
    name      TEXT NOT NULL,         -- object name under manifests/
    created   REAL NOT NULL,         -- unix time
    root      BLOB NOT NULL          -- vault Merkle root it signs
);
CREATE TABLE IF NOT EXISTS manifest_queue (
    seq       INTEGER NOT NULL,      -- manifest waiting to be uploaded
    remote    INTEGER NOT NULL,      -- to this remote
    PRIMARY KEY (seq, remote)
);
-- Audits and repair (vaultfs/verify.py, vaultfs/repair.py, docs/operations.md).
CREATE TABLE IF NOT EXISTS audit_tags (
    name      TEXT PRIMARY KEY,      -- shard object name (shards.name); a row with no shard
                                     -- is an orphan of a crashed seal (ignored, pruned)
    piece     INTEGER NOT NULL,      -- challenge granularity in bytes (2048): each 64 KiB
                                     -- Merkle block is split into pieces of this size
    tags      BLOB NOT NULL          -- 8-byte keyed tag per piece, block-major: tag(b, j) =
                                     -- BLAKE3(audit_key; label ‖ leaf(b) ‖ b ‖ j ‖ piece)[:8]
);
CREATE TABLE IF NOT EXISTS remote_health (
    remote    INTEGER PRIMARY KEY REFERENCES remotes(id), -- remote described
    state     TEXT NOT NULL,         -- 'ok', 'unreachable' (temporary: timeouts, refused,
                                     -- 429/503; data presumed intact), 'degraded' (lost or
                                     -- corrupt objects found, not yet repaired), 'stale'
                                     -- (serves an older manifest: rolled back)
    since     REAL NOT NULL,         -- unix time the remote entered this state
    checked   REAL NOT NULL,         -- unix time of the last contact attempt (audit or scan)
    detail    TEXT                   -- last error or finding summary, NULL when ok
);
CREATE TABLE IF NOT EXISTS audit_runs (
    id        INTEGER PRIMARY KEY,   -- run number
    remote    INTEGER NOT NULL REFERENCES remotes(id), -- remote audited
    mode      TEXT NOT NULL,         -- 'confidence', 'sample' or 'read-all'
    started   REAL NOT NULL,         -- unix time the run was planned
    finished  REAL,                  -- unix time it completed; NULL = cut off by
                                     -- --max-duration or an outage (resumed by the next verify)
    blocks    INTEGER NOT NULL,      -- 64 KiB blocks the remote held when planned
    planned   INTEGER NOT NULL,      -- challenges drawn (rows in audit_plan at the start)
    checked   INTEGER NOT NULL DEFAULT 0, -- challenges answered correctly so far
    failed    INTEGER NOT NULL DEFAULT 0, -- challenges answered wrongly or not at all
    bytes_read INTEGER NOT NULL DEFAULT 0, -- bytes fetched from the remote by this run
    confidence REAL                  -- confidence reached that < 1% of blocks are lost
);
CREATE TABLE IF NOT EXISTS audit_plan (
    run       INTEGER NOT NULL REFERENCES audit_runs(id), -- run the challenge belongs to
    shard     INTEGER NOT NULL,      -- shards.id challenged
    block     INTEGER NOT NULL,      -- 64 KiB block number in the object; -1 = whole object
    piece     INTEGER NOT NULL,      -- piece in the block; -1 = the whole block
    PRIMARY KEY (run, shard, block, piece)
) WITHOUT ROWID;                     -- a row is deleted once answered: what is left resumes
CREATE TABLE IF NOT EXISTS audit_findings (
    shard     INTEGER PRIMARY KEY,   -- shards.id found bad (its state is then 'lost')
    remote    INTEGER NOT NULL,      -- remote it was found bad on
    kind      TEXT NOT NULL,         -- 'missing', 'corrupt', 'stale' (another genuine object
                                     -- of this vault served in its place) or 'removed'
                                     -- (its remote left the vault)
    detail    TEXT,                  -- what was seen, for the report
    found     REAL NOT NULL          -- unix time; the row is deleted when repair rebuilds it
);
CREATE TABLE IF NOT EXISTS audit_foreign (
    remote    INTEGER NOT NULL,      -- remote holding an object the index does not place there
    sub       TEXT NOT NULL,         -- 'data' or 'meta'
    name      TEXT NOT NULL,         -- object name; repair deletes it
    found     REAL NOT NULL,         -- unix time first seen
    PRIMARY KEY (remote, sub, name)
);
-- The live tree: what `vaultfs mount` shows (vaultfs/livetree.py, docs/mount.md). It travels
-- with the index to the remotes. Settings used: live_next_inode (next inode number to hand
-- out; inode numbers are never reused), live_block_size (bytes per file block, fixed at the
-- first mount). Dirty file data lives in <home>/cache/<inode>.<block> files, which override
-- live_blocks rows after a crash (the next mount re-uploads them).
CREATE TABLE IF NOT EXISTS live_inodes (
    id        INTEGER PRIMARY KEY,   -- inode number (1 = root of the mount)
    mode      INTEGER NOT NULL,      -- st_mode: file type and permission bits
    uid       INTEGER NOT NULL,      -- owner user id
    gid       INTEGER NOT NULL,      -- owner group id
    size      INTEGER NOT NULL,      -- logical size in bytes (symlinks: target length)
    atime_ns  INTEGER NOT NULL,      -- access time, nanoseconds since the epoch
    mtime_ns  INTEGER NOT NULL,      -- modification time, nanoseconds since the epoch
    ctime_ns  INTEGER NOT NULL,      -- status change time, nanoseconds since the epoch
    nlink     INTEGER NOT NULL,      -- directory entries naming it; 0 = unlinked while still
                                     -- open (removed at the next mount)
    rdev      INTEGER NOT NULL DEFAULT 0, -- device number (character/block special files)
    target    BLOB                   -- symlink target bytes (symlinks only, else NULL)
);
CREATE TABLE IF NOT EXISTS live_dirents (
    parent    INTEGER NOT NULL,      -- directory inode (live_inodes.id)
    name      BLOB NOT NULL,         -- entry name as bytes (no '/', no NUL)
    inode     INTEGER NOT NULL,      -- inode the entry names (several rows: hard links)
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS live_xattrs (
    inode     INTEGER NOT NULL,      -- inode (live_inodes.id)
    name      BLOB NOT NULL,         -- attribute name, e.g. b'user.comment'
    value     BLOB NOT NULL,         -- attribute value
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS live_blocks (
    inode     INTEGER NOT NULL,      -- file inode (live_inodes.id)
    block     INTEGER NOT NULL,      -- block number b: file bytes [b*bs, (b+1)*bs)
    chunks    BLOB NOT NULL,         -- stored content: repeated (32-byte chunk id ‖ 4-byte
                                     -- little-endian plaintext length); every id is in
                                     -- chunks (written only after its segment is sealed);
                                     -- content shorter than the block is followed by zeros;
                                     -- no row = a hole (zeros) unless a cache file exists
    PRIMARY KEY (inode, block)
) WITHOUT ROWID;
"""


class Index:
    """A thread-safe handle on the SQLite index (one connection, serialised by a lock).

    Callers use :meth:`tx` for writes, so a crash leaves either all or none of an update.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if path != ":memory:" else path
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        migrate(self.db)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- small helpers ---------------------------------------------------------------------
    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def tx(self) -> _Tx:
        return _Tx(self)

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.one("SELECT value FROM settings WHERE key=?", (key,))
        return row[0] if row else default

    def set(self, key: str, value: object) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))

    def newest_manifest_seq(self) -> int:
        """The highest manifest sequence number this index has recorded (0 before the first)."""
        return self.one("SELECT coalesce(max(seq), 0) FROM manifests")[0]

    def snapshot_rows(self) -> list[tuple[str, str | None, float, int, int, int]]:
        """Every snapshot as (uid, name, created, files, bytes, seq), oldest first."""
        return self.q("SELECT uid, name, created, files, bytes, seq FROM snapshots ORDER BY id")

    def find_snapshot(self, ref: str) -> tuple[int, str] | None:
        """(row id, uid) of snapshot ``ref``: its uid, its name (the newest snapshot of that
        name) or 'latest' (the newest of all); None when nothing matches."""
        if ref == "latest":
            return self.one("SELECT id, uid FROM snapshots ORDER BY id DESC LIMIT 1")
        return self.one(
            "SELECT id, uid FROM snapshots WHERE uid=? OR name=? ORDER BY id DESC LIMIT 1",
            (ref, ref),
        )

    def entry_rows(self, snapshot: int) -> list[tuple]:
        """(path, type, mode, size, mtime_ns, target, rdev) of every entry of the snapshot
        with row id ``snapshot``, in no particular order (paths as stored: names.from_db)."""
        return self.q(
            "SELECT path, type, mode, size, mtime_ns, target, rdev FROM entries WHERE snapshot=?",
            (snapshot,),
        )

    def active_remotes(self) -> list[tuple[int, str]]:
        """(id, spec) of every remote in use (not removed), in placement order."""
        return self.q("SELECT id, spec FROM remotes WHERE state='active' ORDER BY position")

    def newest_manifest_placed(self, remote: int) -> int | None:
        """The highest manifest sequence number that is on remote ``remote`` (no longer queued
        for it); None when none is."""
        return self.one(
            "SELECT max(seq) FROM manifests WHERE seq NOT IN"
            " (SELECT seq FROM manifest_queue WHERE remote=?)",
            (remote,),
        )[0]

    def mark_healed(self, seq: int) -> list[int]:
        """After a repair published manifest ``seq``: every active remote marked 'stale' or
        'degraded' that now holds that manifest and has no lost shard and no foreign object
        left is 'ok' again (a replacement remote, a rolled-back one brought forward).
        Returns their ids."""
        now = time.time()
        with self.tx() as db:
            rows = db.execute(
                "SELECT h.remote FROM remote_health h JOIN remotes r ON r.id = h.remote"
                " WHERE r.state = 'active' AND h.state IN ('stale', 'degraded')"
                " AND NOT EXISTS (SELECT 1 FROM manifest_queue q WHERE q.remote = h.remote"
                "   AND q.seq <= ?)"
                " AND NOT EXISTS (SELECT 1 FROM shards s WHERE s.remote = h.remote"
                "   AND s.state = 'lost')"
                " AND NOT EXISTS (SELECT 1 FROM audit_foreign f WHERE f.remote = h.remote)",
                (seq,),
            ).fetchall()
            healed = [rid for (rid,) in rows]
            db.executemany(
                "UPDATE remote_health SET state='ok', since=?, detail=NULL WHERE remote=?",
                [(now, rid) for rid in healed],
            )
        return healed

    def release_departed(self, remote: int) -> int:
        """Shards still 'placed' on ``remote``, which left the vault, once a repair rebuilt
        every live segment elsewhere: only superseded index copies are left there (no one
        audits or rebuilds those, and `prune_index_copies` drops them). Marks them 'lost', so
        the departed remote no longer counts as holding anything; returns how many."""
        with self.tx() as db:
            return db.execute(
                "UPDATE shards SET state='lost' WHERE remote=? AND state='placed'", (remote,)
            ).rowcount

    def shard_bytes_by_remote(self, segments: list[int]) -> dict[int, int]:
        """{remote id: bytes of the placed or queued shard objects of ``segments`` there}."""
        out: dict[int, int] = {}
        for i in range(0, len(segments), LOOKUP_BATCH):
            part = segments[i : i + LOOKUP_BATCH]
            marks = ",".join("?" * len(part))
            for rid, size in self.q(
                f"SELECT remote, sum(size) FROM shards WHERE segment IN ({marks})"
                " AND state IN ('placed', 'queued') GROUP BY remote",
                tuple(part),
            ):
                out[rid] = out.get(rid, 0) + size
        return out

    def newest_placed_snapshot(self) -> tuple[str, float] | None:
        """(uid, created) of the newest snapshot that is fully placed: the manifest that first
        carried it is on every active remote and no shard of a segment sealed by then still
        waits in the local queue. None when no snapshot is."""
        return self.one(
            "SELECT uid, created FROM snapshots s"
            " WHERE s.seq <= (SELECT coalesce(min(p), 0) FROM (SELECT (SELECT max(m.seq)"
            "   FROM manifests m WHERE m.seq NOT IN (SELECT q.seq FROM manifest_queue q"
            "   WHERE q.remote = r.id)) AS p FROM remotes r WHERE r.state = 'active'))"
            " AND NOT EXISTS (SELECT 1 FROM shards h JOIN segments g ON g.id = h.segment"
            "   WHERE h.state = 'queued' AND g.created <= s.created)"
            " ORDER BY s.created DESC, s.id DESC LIMIT 1"
        )

    def oldest_queued(self) -> float | None:
        """Unix time the oldest shard still in the local upload queue was sealed; None when
        the queue is empty."""
        return self.one(
            "SELECT min(g.created) FROM shards h JOIN segments g ON g.id = h.segment"
            " WHERE h.state = 'queued'"
        )[0]

    def export_bytes(self) -> bytes:
        """A consistent copy of the whole database as bytes (SQLite online backup)."""
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "export.db"
            dst = sqlite3.connect(out)
            with self.lock:
                self.db.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            dst.execute("VACUUM")
            dst.close()
            return out.read_bytes()


def stored_vault_id(path: Path) -> str | None:
    """The vault id (hex) recorded in the index file at ``path``; None when there is no file
    there (none is created) or it records no vault id."""
    if not path.exists():
        return None
    with contextlib.closing(Index(path)) as index:
        return index.get("vault_id")


def seen_manifest_seq(path: Path, vault_id: str) -> int:
    """The newest manifest sequence number the index file at ``path`` has recorded, if it is
    the index of vault ``vault_id`` (hex); 0 when there is no file there (none is created)
    or it belongs to another vault."""
    if not path.exists():
        return 0
    with contextlib.closing(Index(path)) as index:
        if index.get("vault_id") != vault_id:
            return 0
        return index.newest_manifest_seq()


def migrate(db: sqlite3.Connection) -> None:
    """Create missing tables and bring an older index to SCHEMA_VERSION (idempotent).

    Version 1 → 2 adds ``entries.parent`` and ``entries.rdev`` (ALTER TABLE, no rewrite),
    creates the two entries indexes and fills ``parent`` from the paths. Every step can be
    repeated, and ``user_version`` is set last, so a crash midway is finished at the next
    open. Runs on every open, also on a restore's downloaded copy; a current file costs one
    PRAGMA and the CREATE ... IF NOT EXISTS script."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    cols = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
    if version < 2 and cols:  # an index written by schema 1
        for col in ("parent", "rdev"):
            if col not in cols:
                db.execute(f"ALTER TABLE entries ADD COLUMN {col} INTEGER")
    db.executescript(SCHEMA)
    if version < 2:
        if cols:
            _fill_parents(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _fill_parents(db: sqlite3.Connection) -> None:
    """entries.parent for rows written before schema 2, one snapshot at a time."""
    snaps = [s for (s,) in db.execute("SELECT DISTINCT snapshot FROM entries WHERE parent IS NULL")]
    for snap in snaps:
        rows = db.execute(
            "SELECT id, path, type FROM entries WHERE snapshot=? ORDER BY id", (snap,)
        ).fetchall()
        dirs = {names.from_db(path): eid for eid, path, typ in rows if typ == "d"}
        updates = []
        for eid, path, _typ in rows:
            parts = names.split_path(names.from_db(path))
            parent = None if parts is None else (dirs.get(parts[0]) if parts[0] else 0)
            if parent is not None:
                updates.append((parent, eid))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE entries SET parent=? WHERE id=?", updates)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


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


class _Tx:
    def __init__(self, index: Index) -> None:
        self.index = index

    def __enter__(self) -> sqlite3.Connection:
        self.index.lock.acquire()
        self.index.db.execute("BEGIN IMMEDIATE")
        return self.index.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.index.db.execute("COMMIT")
            else:
                self.index.db.execute("ROLLBACK")
        finally:
            self.index.lock.release()
