"""The index's tables (every column documented) and the migrations that bring an older file
to the current layout. The schema is the single source of truth for what the vault holds and
where; the query modules beside this one (``vaultfs/index/*.py``) are the only SQL over it.
"""

from __future__ import annotations

import sqlite3

from .. import chunker, names
from . import contents

#: ``PRAGMA user_version`` of an index in the current layout. 1: the first layout (0 in the
#: file); 2: entries.parent, entries.rdev and the entries_parent/entries_link indexes
#: (:func:`migrate` adds them to an older file and fills ``parent``); 3: file contents
#: shared across files and snapshots (contents, content_chunks, entries.content) instead of
#: a chunk list per entry (entry_chunks).
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,          -- setting name: vault_id, k, n, segment_size, suite, ...
                                     -- (unshipped_since: set by a repair that moved shards,
                                     -- cleared when the next manifest is recorded;
                                     -- immutable: '1' in an append-only vault, see
                                     -- settings.VaultParams)
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
    uid       BLOB NOT NULL UNIQUE,  -- 16 random bytes naming the segment (index and manifest only)
    kind      TEXT NOT NULL,         -- 'data' (chunk records) or 'meta' (index objects)
    size      INTEGER NOT NULL,      -- padded plaintext size that was erasure coded
    used      INTEGER NOT NULL,      -- bytes of records before the zero padding
    k         INTEGER NOT NULL,      -- shards needed to decode
    n         INTEGER NOT NULL,      -- shards written
    ec_alg    INTEGER NOT NULL,      -- erasure algorithm id (1 = isa_l_rs_vand)
    epoch     INTEGER NOT NULL,      -- key epoch of the records inside (data segments)
    root      BLOB NOT NULL,         -- Merkle root over the n shard roots
    manifest  INTEGER,               -- for 'meta' segments: the first manifest seq naming
                                     -- them (later ones may too: manifest_segments)
    created   REAL NOT NULL          -- unix time sealed
);
CREATE TABLE IF NOT EXISTS shards (
    id        INTEGER PRIMARY KEY,
    segment   INTEGER NOT NULL REFERENCES segments(id), -- segment this shard belongs to
    idx       INTEGER NOT NULL,      -- fragment index 0..n-1 (< k: data, >= k: parity)
    name      TEXT NOT NULL UNIQUE,  -- object name on the remote (32 hex digits: segment.new_name)
    remote    INTEGER NOT NULL REFERENCES remotes(id), -- remote it is placed on
    size      INTEGER NOT NULL,      -- object size in bytes (header + fragment)
    hash      BLOB NOT NULL,         -- BLAKE3 of the whole object (fast whole-object check)
    blocks    BLOB NOT NULL,         -- concatenated 32-byte Merkle leaf hashes of its blocks
    root      BLOB NOT NULL,         -- Merkle root over those leaves
    state     TEXT NOT NULL,         -- 'queued' (in local queue dir), 'placed', 'lost'
    UNIQUE (segment, idx)
);
-- only the shards still to upload: a placed shard leaves the index, so flipping a big
-- backup's shards to 'placed' (in the shipped copy at once, locally as they upload, in
-- another order) does not rewrite an index as big as the table (docs/benchmarks.md,
-- "lifetime": 26 of 188 dirty blocks at 4 GiB before it was partial)
CREATE INDEX IF NOT EXISTS shards_state ON shards(state, remote) WHERE state = 'queued';
CREATE TABLE IF NOT EXISTS chunks (
    id        INTEGER PRIMARY KEY,   -- local chunk number (referenced by content_chunks)
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
    content   INTEGER,               -- (schema 3) contents.id of a file ('f') entry, else NULL.
                                     -- No REFERENCES clause and no index: either would make
                                     -- every snapshot touch pages all over an index of old
                                     -- content ids; prune finds the unused contents by a scan
    UNIQUE (snapshot, path)
);
-- (schema 2) a directory's children: the mount's readdir, and its subdirectory count
CREATE INDEX IF NOT EXISTS entries_parent ON entries(snapshot, parent, type);
-- (schema 2) the members of a hard-link group (one inode number, nlink = their count)
CREATE INDEX IF NOT EXISTS entries_link ON entries(snapshot, link) WHERE link IS NOT NULL;
-- (schema 3) File contents: one row per distinct chunk list, shared by every file entry of
-- every snapshot with those bytes, so a snapshot of an unchanged file adds one entries row and
-- no chunk rows. New contents take the next id, so their rows (and their content_chunks rows)
-- go at the end of the tables. A content no entry names stays until `vaultfs prune`.
CREATE TABLE IF NOT EXISTS contents (
    id        INTEGER PRIMARY KEY,   -- content number (entries.content)
    ref       BLOB NOT NULL UNIQUE,  -- keyed BLAKE3 of the ordered chunk ids (chunker.content_ref,
                                     -- chunk-id key): how a commit finds an existing content
    size      INTEGER NOT NULL,      -- bytes: the sum of its chunks' plaintext lengths
    chunks    INTEGER NOT NULL       -- number of chunks (its content_chunks rows)
);
CREATE TABLE IF NOT EXISTS content_chunks (
    content   INTEGER NOT NULL REFERENCES contents(id), -- content
    seq       INTEGER NOT NULL,      -- position of the chunk in the content (0-based)
    chunk     INTEGER NOT NULL REFERENCES chunks(id),   -- chunk holding those bytes
    PRIMARY KEY (content, seq)
) WITHOUT ROWID;
-- The summary of each knowledge-base snapshot (vaultfs/kb/layout.py KbManifest.summary():
-- kb Merkle root, per-table rows and checksums), written in the transaction that records the
-- snapshot; every manifest body carries those of the snapshots still held (docs/format.md
-- 10.2, key `kb`). A row of a deleted snapshot is ignored (joined on snapshots.uid).
CREATE TABLE IF NOT EXISTS kb_roots (
    uid       TEXT PRIMARY KEY,      -- snapshots.uid
    summary   TEXT NOT NULL          -- canonical JSON (sorted keys, no spaces)
);
CREATE TABLE IF NOT EXISTS manifests (
    seq       INTEGER PRIMARY KEY,   -- manifest sequence number (strictly increasing)
    name      TEXT NOT NULL,         -- object name under manifests/
    created   REAL NOT NULL,         -- unix time
    root      BLOB NOT NULL          -- vault Merkle root it signs
);
-- Every manifest of this index's chain, never pruned (40-odd bytes a commit): the base check
-- and fork detection tell this chain's manifests from another branch's by name and hash
-- (docs/format.md 10.3). A shipped index holds the rows of its manifest's ancestors.
CREATE TABLE IF NOT EXISTS manifest_chain (
    seq       INTEGER PRIMARY KEY,   -- manifest sequence number
    name      TEXT NOT NULL,         -- object name under manifests/
    hash      BLOB NOT NULL,         -- BLAKE3 of the whole manifest object (its chain link)
    fork_seq  INTEGER,               -- an explicit fork: the remotes' newest manifest it
    fork_hash BLOB                   -- forked from (body "fork"); NULL otherwise
);
CREATE TABLE IF NOT EXISTS manifest_segments (
    manifest  INTEGER NOT NULL,      -- manifests.seq
    segment   INTEGER NOT NULL,      -- a 'meta' segment holding an index object it names
                                     -- (written with the manifests row: garbage rules read it)
    PRIMARY KEY (manifest, segment)
) WITHOUT ROWID;
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


def migrate(db: sqlite3.Connection, chunk_id_key: bytes | None = None) -> None:
    """Create missing tables and bring an older index to SCHEMA_VERSION (idempotent).

    Version 1 → 2 adds ``entries.parent`` and ``entries.rdev`` (ALTER TABLE, no rewrite),
    creates the two entries indexes and fills ``parent`` from the paths. Every step can be
    repeated, and ``user_version`` is set last, so a crash midway is finished at the next
    open. Version 2 → 3 (:func:`_share_contents`) needs ``chunk_id_key`` (content refs are
    keyed) and is one transaction: a crash leaves the file at 2, redone at the next open.
    Without the key (opens that read settings only) a version-2 file stays at 2 and the next
    open with the key finishes it. Runs on every open, also on a restore's downloaded copy; a
    current file costs one PRAGMA and the CREATE ... IF NOT EXISTS script."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    cols = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
    if version < 2 and cols:  # an index written by schema 1
        for col in ("parent", "rdev"):
            if col not in cols:
                db.execute(f"ALTER TABLE entries ADD COLUMN {col} INTEGER")
    db.executescript(SCHEMA)
    _partial_shards_state(db)
    if not cols:  # a new file
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return
    if version < 2:
        _fill_parents(db)
        db.execute("PRAGMA user_version=2")
    if version < 3 and chunk_id_key is not None:
        _share_contents(db, chunk_id_key)


def _partial_shards_state(db: sqlite3.Connection) -> None:
    """Replace an index ``shards_state`` over every shard (indexes written before it was
    partial) by the partial one of :data:`SCHEMA`, in one transaction. No reader uses it:
    the layout and ``user_version`` stay; the next commit ships the freed pages once."""
    (sql,) = db.execute("SELECT sql FROM sqlite_schema WHERE name = 'shards_state'").fetchone()
    if "WHERE" in sql.upper():
        return
    db.executescript(
        "BEGIN IMMEDIATE; DROP INDEX shards_state;"
        " CREATE INDEX shards_state ON shards(state, remote) WHERE state = 'queued'; COMMIT;"
    )


def _share_contents(db: sqlite3.Connection, chunk_id_key: bytes) -> None:
    """Schema 2 → 3 in one transaction: every file entry's chunk list (``entry_chunks``)
    becomes a shared ``contents`` row named by its keyed ref, with ``content_chunks`` rows
    only for the first entry of each distinct list; ``entry_chunks`` is dropped and
    ``user_version`` set. One ordered pass over the old rows, one file in memory at a time."""
    refs: dict[bytes, int] = {}  # content ref -> contents.id (one per distinct list)

    def share(entry: int, rows: list[tuple[int, bytes, int]]) -> None:
        ref = chunker.content_ref(chunk_id_key, [cid for _c, cid, _n in rows])
        content = refs.get(ref)
        if content is None:
            size = sum(n for _c, _cid, n in rows)
            content = refs[ref] = contents.add(db, ref, size, [c for c, _cid, _n in rows])
        db.execute("UPDATE entries SET content = ? WHERE id = ?", (content, entry))

    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE entries ADD COLUMN content INTEGER")
        entry, rows = None, []
        for e, chunk, cid, plain in db.execute(
            "SELECT x.entry, x.chunk, c.cid, c.plain FROM entry_chunks x"
            " JOIN chunks c ON c.id = x.chunk ORDER BY x.entry, x.seq"
        ):
            if e != entry:
                if entry is not None:
                    share(entry, rows)
                entry, rows = e, []
            rows.append((chunk, bytes(cid), plain))
        if entry is not None:
            share(entry, rows)
        empty = db.execute("SELECT id FROM entries WHERE type = 'f' AND content IS NULL")
        for (e,) in empty.fetchall():  # files of no chunks (empty files): one shared content
            share(e, [])
        db.execute("DROP TABLE entry_chunks")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
