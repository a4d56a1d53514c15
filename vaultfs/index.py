"""The local SQLite index: the single source of truth for what the vault holds and where.

Every column is documented in the schema below. Sentinels that crash recovery reads:
``shards.state = 'queued'`` means the shard object is durable in the local queue directory
but not yet known to be on its remote; ``segments.state = 'open'`` never reaches disk (a
segment is inserted only once it is sealed and its shards are durable in the queue).

After every commit the whole index is exported (``Index.export_bytes``), encrypted and
erasure-coded like data, and named by a signed manifest (see vault.py and docs/design.md).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,          -- setting name: vault_id, k, n, segment_size, suite, ...
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
CREATE TABLE IF NOT EXISTS entries (
    id        INTEGER PRIMARY KEY,
    snapshot  INTEGER NOT NULL REFERENCES snapshots(id), -- owning snapshot
    path      TEXT NOT NULL,         -- relative POSIX path, no '..', no leading '/'
    type      TEXT NOT NULL,         -- 'f' file, 'd' directory, 'l' symlink
    mode      INTEGER NOT NULL,      -- permission bits (st_mode & 0o7777)
    mtime_ns  INTEGER NOT NULL,      -- modification time, nanoseconds since the epoch
    size      INTEGER NOT NULL,      -- logical size in bytes (files)
    target    TEXT,                  -- symlink target (symlinks only)
    uid       INTEGER,               -- owner user id (NULL: unknown, restore as the caller)
    gid       INTEGER,               -- owner group id (NULL: unknown)
    xattrs    TEXT,                  -- JSON object {name: hex value} of extended attributes
    link      INTEGER,               -- hard-link group: entries of one snapshot with the same
                                     -- non-NULL value are one inode (NULL: not hard-linked)
    UNIQUE (snapshot, path)
);
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
        self.db.executescript(SCHEMA)

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
