"""Fuzz targets: every parser of bytes that come from outside the client, with the property
each must keep, the seed corpus they start from and the mutations that explore around it.

tests/test_fuzz.py runs every target for a short, derandomised budget on every change;
``scripts/fuzz`` runs them for hours (docs/operations.md). Both use this module.

The property (docs/threat-model.md, "Attacks and the tests that show them"): whatever the
bytes, a target returns or raises a :class:`~vaultfs.errors.VaultError` with a documented
exit code (never 1, "a bug"; the control client passes on the code its daemon sent), and the
Python heap it allocates stays under ``BOUND_FIXED + BOUND_PER_BYTE · len(input)``.

A target is a function of one ``bytes``; structure-aware mutation happens before it: byte
targets get bit flips, interesting integers over length fields, truncation, insertion,
deletion, duplication and splices of valid seeds; JSON targets get their tree edited
(fields dropped, retyped, set to boundary values) and then, sometimes, their bytes.

The seed corpus lives in tests/fuzz_corpus/<target>/ (``scripts/fuzz --make-corpus``
rewrites it, keeping ``crash-*`` files: inputs that once failed, kept as regressions). Key material is the fixed test seed ``bytes(range(32))``: nothing secret.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import os
import random
import shutil
import socket
import socketserver
import sqlite3
import struct
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import strategies as st

from vaultfs import control, envelope, erasure, kdf, manifest, receipt, segment, shamir
from vaultfs.chunkreader import ChunkReader
from vaultfs.errors import VaultError
from vaultfs.index import chunks as chunk_table
from vaultfs.index import migrate, open_shipped
from vaultfs.index import segments as segment_table
from vaultfs.keys import VaultKeys, read_keyfile
from vaultfs.readcache import ReadCache
from vaultfs.remotes import RcloneCommand, RcloneRc, Remote
from vaultfs.vault import Vault

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SEED = bytes(range(32))
PASSPHRASE = "fuzz passphrase"
CHUNK_ID = bytes(range(100, 132))
DATA_KEY = bytes(range(50, 82))
#: Heap bound of one execution: this much, plus this many times the input's length.
BOUND_FIXED = 64 << 20
BOUND_PER_BYTE = 16


@cache
def keys() -> VaultKeys:
    """The keys of the fixed fuzzing seed (no SLH-DSA pinned: manifests name their own)."""
    return VaultKeys.from_seed(SEED)


def _scratch() -> Path:
    """A private directory for targets that need files or sockets (short path: sockets),
    removed when the process exits."""
    d = Path(tempfile.mkdtemp(prefix="vfz-", dir="/tmp"))
    atexit.register(shutil.rmtree, d, True)
    return d


_dir = _scratch()


# -- targets ------------------------------------------------------------------------------
#: the object name the shard seeds are stored under (their whitening is keyed by it)
SHARD_NAME = "5eed" * 8


def shard_header(data: bytes) -> None:
    """A stored shard object (plain header, whitened fragment) opened as fragment 0."""
    segment.open_fragment(data, keys().audit_key, SHARD_NAME, 0)


def _segment_k_n() -> tuple[int, int]:
    return 2, 3


def shard_decode(data: bytes) -> None:
    """One hostile fragment (index 0) among honest ones: the decoder must refuse it or
    decode."""
    k, n = _segment_k_n()
    frags = {0: data}
    for parity in _corpus_file("shard_decode", "parity"):  # honest fragment k: the pair decodes
        frags[k] = parity
    segment.decode_segment(frags, k, n, 4096, 1)


def chunk_record(data: bytes) -> None:
    k = keys()
    envelope.open_chunk(DATA_KEY, k.vault_id, CHUNK_ID, data)


def meta_blob(data: bytes) -> None:
    k = keys()
    envelope.open_meta(k.metadata_key, k.vault_id, b"index", data)


def manifest_blob(data: bytes) -> None:
    manifest.read(keys(), data)


def manifest_body(data: bytes) -> None:
    """A body the vault's own key signed (an insider or a bug wrote it): the schema check."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return
    if not isinstance(body, dict):
        return
    blob = manifest.encode(keys(), 7, 0, body)
    manifest.read(keys(), blob)


def shipped_index(data: bytes) -> None:
    """A downloaded index.db as restore opens it: migrations, then the vault-root check."""
    from vaultfs.restore import verify_index_against_manifest

    path = _dir / "index.db"
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(path) + suffix)
    path.write_bytes(data)
    db = open_shipped(path, keys().chunk_id_key)
    try:
        body = manifest.Body(bytes(32), 2, 3, 1 << 20, (), 0, 16384, (), ())
        m = manifest.Manifest(1, 0, body.to_dict())
        try:
            verify_index_against_manifest(db, m)
        except sqlite3.DatabaseError as e:
            raise AssertionError(f"open_shipped let a broken file through: {e}") from e
    finally:
        db.close()


def keyfile(data: bytes) -> None:
    """A keyfile, as the command line's head start (never raises) and the unlock read it."""
    path = _dir / "key.json"
    path.write_bytes(data)
    fut = kdf.prefetch(path, PASSPHRASE)
    read_keyfile(path, PASSPHRASE)
    if fut is not None:
        fut.exception()  # it has finished (or failed) by itself: no thread outlives the run


def share_text(data: bytes) -> None:
    """A share file as typed or read, combined with an honest second share."""
    text = data.decode("utf-8", errors="replace")
    other = _corpus_file("share_text", "share-2")
    parsed = shamir.parse_share_text(text, "fuzzed")
    shamir.check_share(parsed)
    if other:
        honest = shamir.parse_share_text(other[0].decode(), "honest")
        shamir.recover([parsed, honest])


def receipt_doc(data: bytes) -> None:
    path = _dir / "receipt.json"
    path.write_bytes(data)
    doc = receipt.load_json(path, "receipt")
    receipt.verify(doc)


def control_request(data: bytes) -> None:
    """A request line from a (same-user) client: the server answers one JSON object and stays
    up; whatever reaches ``dispatch`` is a JSON object."""
    srv = _control_server()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(srv)
        s.sendall(data[:65535] + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while part := s.recv(65536):
            buf += part
    reply = json.loads(buf)
    if not isinstance(reply, dict) or "ok" not in reply:
        raise AssertionError(f"the control server answered {buf[:80]!r}")
    if not reply["ok"] and reply.get("code") == 1:
        raise AssertionError(f"the control server hit a bug: {reply.get('error')}")


def control_reply(data: bytes) -> None:
    """A reply from whoever serves the socket (after the peer-credential check)."""
    addr = _reply_server()
    _reply_server.payload = data  # type: ignore[attr-defined]
    control.call(addr, {"cmd": "status"}, timeout=10)


def rclone_listing(data: bytes) -> None:
    """What rclone says a remote holds, as parsed by the listing calls of both
    implementations: the rc API's JSON (RcloneRc) and ``lsf`` text (RcloneCommand)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    for r in (_FakeRc("fuzz:vault", doc), _FakeCommand("fuzz:vault", data)):
        r.list("manifests")
        r.list_sizes("data")
        r.list_tree()


# -- harness pieces ---------------------------------------------------------------------------
def _dispatch(req: dict) -> dict:
    if not isinstance(req, dict):
        raise AssertionError("dispatch got a request that is not an object")
    return {"echo": str(req.get("cmd"))[:40]}


@cache
def _control_server() -> str:
    addr = str(_dir / "ctl.sock")
    control.ControlServer([addr], _dispatch)
    return addr


class _ReplyHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline(65536)
        with contextlib.suppress(OSError):
            self.wfile.write(_reply_server.payload)  # type: ignore[attr-defined]


@cache
def _reply_server() -> str:
    addr = str(_dir / "reply.sock")
    srv = socketserver.UnixStreamServer(addr, _ReplyHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return addr


class _FakeDaemon:
    def __init__(self, result: object) -> None:
        self.result = result

    def call(self, method: str, params: dict, timeout: float = 0, object_hook=None) -> object:
        if object_hook is None:
            return self.result
        return json.loads(json.dumps(self.result), object_hook=object_hook)


class _FakeRc(RcloneRc):
    """The rc implementation, its daemon answering with the fuzzed JSON."""

    def __init__(self, spec: str, result: object) -> None:
        super().__init__(spec)
        self._fake = _FakeDaemon(result)

    def _daemon(self, what: str):  # type: ignore[override]
        return self._fake


class _FakeCommand(RcloneCommand):
    """The command implementation, rclone printing the fuzzed bytes."""

    def __init__(self, spec: str, output: bytes) -> None:
        super().__init__(spec)
        self._output = output

    def _run(self, args, *, timeout=3600, stdin=None):  # type: ignore[override]
        import subprocess

        return subprocess.CompletedProcess(args, 0, self._output, b"")


#: the data the ``range_read`` vault holds, and the seed of its bytes
RANGE_DATA = 600_000
_PATCH = struct.Struct(">IB")


@dataclass
class _RangeVault:
    """A 3-of-5 vault over local directories holding :data:`RANGE_DATA` random bytes, and
    the data shard the ``range_read`` target corrupts (its honest bytes kept for undoing)."""

    vault: Vault
    cids: list[bytes]
    data: bytes
    victim: Path
    honest: bytes


@cache
def _range_vault() -> _RangeVault:
    from vaultfs import keys as keymod

    root = _dir / "range"
    specs = [str(root / f"r{i}") for i in range(5)]
    data = random.Random(11).randbytes(RANGE_DATA)
    old = keymod.SCRYPT_N
    keymod.SCRYPT_N = 16  # the reader, not scrypt, is under test
    try:
        v = Vault.create(root / "home", specs, 3, 5, PASSPHRASE, SEED, segment_size=1 << 20)
    finally:
        keymod.SCRYPT_N = old
    atexit.register(v.close)
    cids, _total = v.store_stream(io.BytesIO(data))
    if not v.flush().complete:
        raise RuntimeError("the range_read vault did not place its shards")
    # data shard 0 of the first chunk's segment: the first one range reads go to
    seg = chunk_table.location(v.index, cids[0])[0]
    k = v.params.k
    _idx, name, *_rest, rid, spec = min(segment_table.data_shard_blocks(v.index, seg, k))
    victim = Remote(spec, rid).local_dir / "data" / name
    return _RangeVault(v, cids, data, victim, victim.read_bytes())


def range_read(data: bytes) -> None:
    """The mount's chunk reader (range reads of data-shard blocks, verified by their Merkle
    leaves) over one remote whose data shard was edited: ``offset (4) ‖ mode (1) ‖ bytes``
    overwrites at the offset (mode 0), truncates there (1), appends (2) or replaces the whole
    object (3). The other four remotes are honest, so every chunk must come back exactly:
    the reader falls back to a whole-segment read and decodes around the bad shard."""
    rv = _range_vault()
    if len(data) < _PATCH.size:
        return
    offset, mode = _PATCH.unpack_from(data)
    payload = data[_PATCH.size :]
    body = bytearray(rv.honest)
    offset %= len(body) + 1
    match mode % 4:
        case 0:
            body[offset : offset + len(payload)] = payload
        case 1:
            del body[offset:]
        case 2:
            body += payload
        case _:
            body = bytearray(payload)
    rv.victim.write_bytes(body)
    cache_dir = _dir / "range-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    reader = ChunkReader(rv.vault, ReadCache(cache_dir, 0, rv.vault.chunker.chunk_id))
    try:
        got = b"".join(reader.read_many(rv.cids))
    finally:
        reader.close()
        rv.victim.write_bytes(rv.honest)
    if got != rv.data:
        raise AssertionError("the chunk reader returned wrong bytes past one bad remote")


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: ``run(bytes)``, the mutation ``kind`` ("bytes" or "json") and
    whether exit code 1 is legitimate (the control client passes on the daemon's code)."""

    name: str
    run: Callable[[bytes], None]
    kind: str = "bytes"
    code_1_ok: bool = False


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("shard_header", shard_header),
        Target("shard_decode", shard_decode),
        Target("chunk_record", chunk_record),
        Target("meta_blob", meta_blob),
        Target("manifest_blob", manifest_blob),
        Target("manifest_body", manifest_body, "json"),
        Target("shipped_index", shipped_index),
        Target("keyfile", keyfile, "json"),
        Target("share_text", share_text),
        Target("receipt", receipt_doc, "json"),
        Target("control_request", control_request, "json"),
        Target("control_reply", control_reply, "json", code_1_ok=True),
        Target("rclone_listing", rclone_listing, "json"),
        Target("range_read", range_read),
    )
}

#: Exit codes a parser may end with (vaultfs/errors.py): everything documented but 1.
DOCUMENTED_CODES = {3, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}


def check(target: Target, data: bytes) -> None:
    """Run ``target`` on ``data`` and assert the fuzzing property (module docstring)."""
    tracemalloc.start()
    try:
        target.run(data)
    except VaultError as e:
        ok = e.exit_code in DOCUMENTED_CODES or (target.code_1_ok and e.exit_code >= 1)
        if not ok:
            raise AssertionError(
                f"{target.name}: {type(e).__name__} with exit code {e.exit_code}: {e.message}"
            ) from e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    bound = BOUND_FIXED + BOUND_PER_BYTE * len(data)
    if peak > bound:
        raise AssertionError(f"{target.name}: {peak} bytes of heap for {len(data)} input bytes")


# -- corpus -------------------------------------------------------------------------------------
def corpus(name: str) -> list[bytes]:
    """The seed inputs of target ``name`` (files of tests/fuzz_corpus/<name>/, sorted)."""
    d = CORPUS / name
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def _corpus_file(name: str, stem: str) -> list[bytes]:
    p = CORPUS / name / stem
    return [p.read_bytes()] if p.exists() else []


def make_corpus() -> dict[str, int]:
    """Write the seed corpus from the fixed seed (valid inputs of every target); returns the
    number of files per target."""
    import secrets

    from vaultfs import keys as keymod

    k = keys()
    seeds: dict[str, dict[str, bytes]] = {}
    segdata = bytes(range(256)) * 16  # 4 KiB: small shards for a small corpus
    frags = erasure.encode(segdata, *_segment_k_n())
    stored = segment.stored_shard(0, SHARD_NAME, frags[0], k.audit_key)
    seeds["shard_header"] = {"data": stored.body, "short": stored.body[:64]}
    seeds["shard_decode"] = {"honest": frags[0], "parity": frags[2]}
    seeds["chunk_record"] = {
        "zstd": envelope.seal_chunk(DATA_KEY, k.vault_id, CHUNK_ID, b"a" * 300),
        "plain": envelope.seal_chunk(DATA_KEY, k.vault_id, CHUNK_ID, secrets.token_bytes(40)),
    }
    seeds["meta_blob"] = {
        "index": envelope.seal_meta(k.metadata_key, k.vault_id, b"index", b"x" * 200)
    }
    body = manifest.Body(
        vault_root=bytes(32),
        k=2,
        n=3,
        segment_size=1 << 20,
        keyring=(manifest.KeyringEntry(0, 1, bytes(40)),),
        index_length=300,
        index_segments=(
            manifest.IndexSegment(
                bytes(16),
                300,
                256 * 1024,
                2,
                3,
                1,
                tuple(manifest.ShardRef(i, f"{i:032x}", 131204, bytes(32)) for i in range(3)),
            ),
        ),
        index_block_size=16384,
        index_map=(manifest.MapPage(bytes(32), bytes(16), 0, 300),),
        retired_suites=frozenset({2}),
    ).to_dict()
    seeds["manifest_body"] = {"body": json.dumps(body, sort_keys=True).encode()}
    seeds["manifest_blob"] = {"alg1": manifest.encode(k, 5, 1_700_000_000_000, body)}
    signer = VaultKeys.from_seed(SEED)
    signer.generate_slhdsa()
    seeds["manifest_blob"]["alg3"] = manifest.encode(signer, 6, 1_700_000_000_000, body)
    idx_path = _dir / "corpus-index.db"
    with contextlib.closing(sqlite3.connect(idx_path, isolation_level=None)) as db:
        db.execute("PRAGMA page_size=512")  # the schema in ~20 KiB: a small seed
        migrate(db)
        db.execute("INSERT INTO settings VALUES ('vault_id', ?)", (k.vault_id.hex(),))
    seeds["shipped_index"] = {"schema": idx_path.read_bytes()}
    with contextlib.closing(sqlite3.connect(idx_path, isolation_level=None)) as db:
        _as_schema_2(db)
    seeds["shipped_index"]["schema2"] = idx_path.read_bytes()  # the opening converts it
    old = keymod.SCRYPT_N
    keymod.SCRYPT_N = 16  # cheap to unlock: the parser, not scrypt, is under test
    try:
        kf = _dir / "corpus-key.json"
        keymod.write_keyfile(kf, k, PASSPHRASE)
        v2 = json.loads(kf.read_bytes())
        seeds["keyfile"] = {"v2": json.dumps(v2).encode()}
        v1 = {f: v2[f] for f in ("format", "vault_id", "fingerprint", "kdf", "salt", "nonce")}
        nonce = base64.b64decode(v2["nonce"])
        kek = keymod.scrypt_kek(PASSPHRASE, base64.b64decode(v2["salt"]), 16, 8, 1)
        sealed = AESGCM(kek).encrypt(nonce, k.seed, b"vaultfs/v1/keyfile" + k.vault_id)
        policy = {"retired_suites": [2]}
        v1.update(version=1, sealed_seed=base64.b64encode(sealed).decode(), policy=policy)
        v1["policy_mac"] = k.policy_mac(policy)
        seeds["keyfile"]["v1"] = json.dumps(v1).encode()
    finally:
        keymod.SCRYPT_N = old
    words = shamir.split(k, 2, 3)
    seeds["share_text"] = {
        "share-1": shamir.share_file_text(k, words[0], 2, 3).encode(),
        "share-2": shamir.share_file_text(k, words[1], 2, 3).encode(),
        "typed": words[2].encode(),
    }
    seeds["receipt"] = {"receipt": json.dumps(_receipt(signer)).encode()}
    seeds["control_request"] = {
        "status": b'{"cmd": "status"}',
        "flush": b'{"cmd": "flush", "wait": true}',
    }
    seeds["control_reply"] = {
        "ok": b'{"ok": true, "uploaded": 3, "pending": {"r1": 0}}\n',
        "err": b'{"ok": false, "error": "busy", "code": 17}\n',
    }
    listing = {
        "list": [
            {"Path": "manifests/0000000000000005-ab", "Name": "0000000000000005-ab", "Size": 99},
            {"Path": "data/" + "0" * 32, "Name": "0" * 32, "Size": 131204},
        ]
    }
    seeds["rclone_listing"] = {"rc": json.dumps(listing).encode()}
    seeds["range_read"] = {  # offset ‖ mode ‖ bytes (the target's docstring)
        "flip": _PATCH.pack(segment.HEADER_SIZE + 100, 0) + b"\xff",
        "truncate": _PATCH.pack(70_000, 1),
        "append": _PATCH.pack(0, 2) + b"x" * 64,
        "replace": _PATCH.pack(0, 3) + b"VFSH",
    }
    counts = {}
    for name, files in seeds.items():
        d = CORPUS / name
        d.mkdir(parents=True, exist_ok=True)
        for old_file in d.iterdir():
            if not old_file.name.startswith("crash-"):  # found crashes stay as regressions
                old_file.unlink()
        for stem, blob in files.items():
            (d / stem).write_bytes(blob)
        counts[name] = len(files)
    return counts


def _as_schema_2(db: sqlite3.Connection) -> None:
    """Turn the schema seed into an index as schema 2 wrote it, holding one snapshot whose
    two files share two chunks in a per-entry list (``entry_chunks``)."""
    db.executescript(
        """
        INSERT INTO segments VALUES (1, x'00', 'data', 512, 100, 2, 3, 1, 0, zeroblob(32), NULL, 0);
        INSERT INTO chunks VALUES (1, zeroblob(32), 1, 0, 50, 10), (2, x'01', 1, 50, 50, 10);
        INSERT INTO snapshots(id, uid, created, seq) VALUES (1, 'ab', 0, 1);
        INSERT INTO entries(id, snapshot, path, type, mode, mtime_ns, size, parent)
            VALUES (1, 1, 'a', 'f', 420, 0, 20, 0), (2, 1, 'b', 'f', 420, 0, 20, 0);
        DROP TABLE content_chunks;
        DROP TABLE contents;
        ALTER TABLE entries DROP COLUMN content;
        CREATE TABLE entry_chunks (entry INTEGER NOT NULL, seq INTEGER NOT NULL,
            chunk INTEGER NOT NULL, PRIMARY KEY (entry, seq)) WITHOUT ROWID;
        INSERT INTO entry_chunks VALUES (1, 0, 1), (1, 1, 2), (2, 0, 1), (2, 1, 2);
        PRAGMA user_version=2;
        VACUUM;
        """
    )


def _receipt(signer: VaultKeys) -> dict:
    """A receipt as receipt.make lays it out, for a made-up snapshot (no vault needed)."""
    doc = receipt.public_document(signer)
    statement = {
        "fingerprint": signer.fingerprint(),
        "vault_id": signer.vault_id.hex(),
        "snapshot": "s1",
        "manifest_seq": 5,
        "snapshot_root": "00" * 32,
    }
    msg = receipt.RECEIPT_LABEL + receipt.canonical(statement)
    comp = signer.sign(msg)
    param_field = next(f for f in doc if f.startswith("slhdsa_sha2"))
    return {
        "format": receipt.FORMAT,
        "version": 1,
        "statement": statement,
        "public_keys": {
            "vault_id": doc["vault_id"],
            "mldsa65": doc["mldsa65"],
            "ed25519": doc["ed25519"],
            param_field: doc[param_field],
            "slhdsa_endorsement": doc["slhdsa_endorsement"],
        },
        "signature": {
            "algorithm": receipt.ALGORITHM_OF[signer.slhdsa_param],
            "mldsa65": base64.b64encode(comp[:-64]).decode(),
            "ed25519": base64.b64encode(comp[-64:]).decode(),
            "slhdsa": base64.b64encode(signer.sign_slhdsa(msg)).decode(),
        },
    }


# -- mutations ----------------------------------------------------------------------------------
_INTS = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
_JSON_SCALARS = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, 10**30, 1.5, float("1e308"),
    "", "00", "zz", "a" * 65, "0" * 64, "../../etc/passwd", "\u0000", "é", [], {},
]  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


@st.composite
def _byte_mutant(draw, seeds: list[bytes], base: bytes | None = None) -> bytes:
    data = bytearray(base if base is not None else draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        pos = draw(st.integers(0, min(n, 96)) | st.integers(0, n))
        op = draw(st.integers(0, 7))
        if op == 0 and n:  # flip a bit
            p = min(pos, n - 1)
            data[p] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:  # an interesting big-endian integer over 1, 2 or 4 bytes
            width = draw(st.sampled_from([1, 2, 4]))
            v = draw(st.sampled_from(_INTS + [n, n + 1, max(n - 1, 0)])) % (1 << (8 * width))
            data[pos : pos + width] = v.to_bytes(width, "big")
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # insert
            data[pos:pos] = draw(st.binary(max_size=64))
        elif op == 4:  # delete a span
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == 5:  # duplicate a span
            span = data[pos : pos + draw(st.integers(1, 256))]
            data[pos:pos] = span
        elif op == 6 and seeds:  # splice another seed's tail
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
        else:  # overwrite with random bytes
            data[pos : pos + 8] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _paths(node: object, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, v in node.items():
            out += _paths(v, (*path, key))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


@st.composite
def _json_mutant(draw, seeds: list[bytes]) -> bytes:
    seed = draw(st.sampled_from(seeds))
    try:
        doc = json.loads(seed)
    except ValueError:
        return draw(_byte_mutant(seeds, seed))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        value = draw(st.sampled_from(_JSON_SCALARS) | _JSON)
        op = draw(st.integers(0, 3))
        if not path:
            doc = value if op == 0 else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if op == 1:  # drop it
            del parent[last]
        elif op == 2 and isinstance(parent[last], int) and not isinstance(parent[last], bool):
            parent[last] = draw(st.sampled_from(_INTS + [-1, 2**64, 10**30]))
        elif op == 3:  # wrap it
            parent[last] = [parent[last]]
        else:
            parent[last] = value
    out = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        out = draw(_byte_mutant(seeds, out))
    return out


def mutants(target: Target) -> st.SearchStrategy[bytes]:
    """Inputs for ``target``: its seeds, mutated as its kind says, and some raw bytes."""
    seeds = corpus(target.name) or [b""]
    mutate = _json_mutant(seeds) if target.kind == "json" else _byte_mutant(seeds)
    return st.one_of(mutate, mutate, mutate, st.sampled_from(seeds), st.binary(max_size=200))
