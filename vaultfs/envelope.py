"""Encryption envelopes for chunks and metadata blobs (docs/format.md, "Chunk record").

Chunk record (stored inside a segment, located by the index):

    salt(16) ‖ commitment(32) ‖ AES-256-GCM ciphertext+tag of (compression(1) ‖ body)

    key(32) ‖ nonce(12) ‖ commitment(32) =
        HKDF-SHA256(ikm = epoch data key, salt = vault id,
                    info = "vaultfs/v1/chunk" ‖ chunk id ‖ record salt, L = 76)
    associated data = "VFS1" ‖ format version(1) ‖ suite id(2, BE) ‖ vault id(16) ‖ chunk id(32)

The commitment is compared (constant time) before AES-GCM runs, so a record can only ever
decrypt under the one key that produced it (AES-GCM alone is not key-committing).

Metadata blob (the exported index, manifest bodies): the same construction with the metadata
key as ikm, info "vaultfs/v1/meta" ‖ kind ‖ salt, and associated data
"VFS1" ‖ version ‖ suite ‖ vault id ‖ kind (kind is b"index", or b"manifest" ‖ seq(8, BE)).

``salt`` is 16 random bytes per record; the optional ``salt=`` argument of :func:`seal_chunk`,
:func:`seal_payload_into` and :func:`seal_meta` exists only so test vectors are reproducible
(and so a sealer draws a job's salts in one call); never pass a salt otherwise: reusing one
for the same chunk id or kind reuses the AES-GCM key and nonce.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import threading

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .errors import IntegrityError
from .keys import LABEL_PREFIX, SUITE_XWING_AES256GCM

FORMAT_VERSION = 2  # the on-remote format version (docs/format.md), bound into every record
MAGIC = b"VFS1"
SALT_LEN = 16
COMMIT_LEN = 32
TAG_LEN = 16
RECORD_OVERHEAD = SALT_LEN + COMMIT_LEN + TAG_LEN + 1

COMP_NONE = 0
COMP_ZSTD = 1
ZSTD_LEVEL = 1  # on 16-32 KiB chunks of pg_dump text: faster than 3, compresses as well

_tls_compressors: dict[int, zstandard.ZstdCompressor] = {}


def _compressor() -> zstandard.ZstdCompressor:
    import threading

    ident = threading.get_ident()
    c = _tls_compressors.get(ident)
    if c is None:
        c = _tls_compressors[ident] = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


_tls = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "decompressor", None)
    if d is None:
        d = _tls.decompressor = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview) -> bytes:
    """Prefix a compression id; keep the data as it is when zstd does not make it smaller."""
    z = _compressor().compress(data)
    if len(z) < len(data):
        return bytes([COMP_ZSTD]) + z
    return bytes([COMP_NONE]) + data


def decompress(payload: bytes | memoryview) -> bytes:
    kind = payload[0]
    if kind == COMP_NONE:
        return bytes(payload[1:])
    if kind == COMP_ZSTD:
        return _decompressor().decompress(memoryview(payload)[1:])
    raise IntegrityError(f"unknown compression id {kind}")


def _ad(vault_id: bytes, suite: int, tail: bytes) -> bytes:
    return MAGIC + bytes([FORMAT_VERSION]) + struct.pack(">H", suite) + vault_id + tail


_prks: dict[tuple[bytes, bytes], bytes] = {}


def _derive(ikm: bytes, vault_id: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF-SHA256(ikm, salt = vault id, info = LABEL_PREFIX ‖ info, L = 76), split.

    HKDF is Expand(Extract(salt, ikm), info): the Extract step (one HMAC) depends only on
    the epoch key and the vault id, so it is done once per key and each record pays only
    for its Expand — the same bytes as :func:`vaultfs.keys.hkdf`, at a third less cost."""
    prk = _prks.get((ikm, vault_id))
    if prk is None:
        h = chmac.HMAC(vault_id, hashes.SHA256())
        h.update(ikm)
        prk = _prks[(ikm, vault_id)] = h.finalize()
        if len(_prks) > 64:  # a handful of epochs; never grows without bound
            _prks.pop(next(iter(_prks)))
    okm = HKDFExpand(hashes.SHA256(), 76, LABEL_PREFIX + info).derive(prk)
    return okm[:32], okm[32:44], okm[44:76]


def seal_chunk(
    data_key: bytes,
    vault_id: bytes,
    chunk_id: bytes,
    data: bytes | memoryview,
    suite: int = SUITE_XWING_AES256GCM,
    *,
    salt: bytes | None = None,
) -> bytes:
    """Compress and encrypt one chunk into a self-contained record (random salt by default)."""
    payload = compress(data)
    out = bytearray(record_len(payload))
    seal_payload_into(out, data_key, vault_id, chunk_id, payload, suite, salt=salt)
    return bytes(out)


def _record_salt(salt: bytes | None) -> bytes:
    """A record's salt: ``salt`` (tests and vectors fix it) checked, else a fresh random one."""
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    if len(salt) != SALT_LEN:
        raise ValueError(f"a record salt is {SALT_LEN} bytes")
    return salt


def record_len(payload: bytes) -> int:
    """Bytes of the chunk record that seals ``payload`` (a :func:`compress` output)."""
    return SALT_LEN + COMMIT_LEN + len(payload) + TAG_LEN


def seal_payload_into(
    out: bytearray | memoryview,
    data_key: bytes,
    vault_id: bytes,
    chunk_id: bytes,
    payload: bytes,
    suite: int = SUITE_XWING_AES256GCM,
    *,
    salt: bytes | None = None,
) -> None:
    """Write the record of chunk ``chunk_id`` whose :func:`compress` output is ``payload``
    into ``out``, a writable buffer of exactly :func:`record_len` bytes: the bytes
    :func:`seal_chunk` returns, encrypted in place (the sealers pack records straight into
    their open segment, with no ciphertext or record to copy)."""
    salt = _record_salt(salt)
    view = memoryview(out)
    if len(view) != record_len(payload):
        raise ValueError("the record buffer is not record_len(payload) bytes")
    key, nonce, commit = _derive(data_key, vault_id, b"chunk" + chunk_id + salt)
    head = SALT_LEN + COMMIT_LEN
    view[:SALT_LEN] = salt
    view[SALT_LEN:head] = commit
    AESGCM(key).encrypt_into(nonce, payload, _ad(vault_id, suite, chunk_id), view[head:])


def open_chunk(
    data_key: bytes,
    vault_id: bytes,
    chunk_id: bytes,
    record: bytes | memoryview,
    suite: int = SUITE_XWING_AES256GCM,
) -> bytes:
    view = memoryview(record)  # no copy of the ciphertext
    salt, commit = bytes(view[:SALT_LEN]), bytes(view[SALT_LEN : SALT_LEN + COMMIT_LEN])
    ct = view[SALT_LEN + COMMIT_LEN :]
    key, nonce, expect = _derive(data_key, vault_id, b"chunk" + chunk_id + salt)
    if not hmac.compare_digest(commit, expect):
        raise IntegrityError("chunk key commitment mismatch (wrong key or corrupt record)")
    try:
        payload = AESGCM(key).decrypt(nonce, ct, _ad(vault_id, suite, chunk_id))
    except InvalidTag:
        raise IntegrityError("chunk failed authentication (corrupt or tampered)") from None
    return decompress(payload)


def seal_meta(
    metadata_key: bytes,
    vault_id: bytes,
    kind: bytes,
    data: bytes,
    suite: int = SUITE_XWING_AES256GCM,
    *,
    salt: bytes | None = None,
) -> bytes:
    """Compress and encrypt a metadata blob of the given kind (random salt by default)."""
    salt = _record_salt(salt)
    key, nonce, commit = _derive(metadata_key, vault_id, b"meta" + kind + salt)
    ct = AESGCM(key).encrypt(nonce, compress(data), _ad(vault_id, suite, kind))
    return salt + commit + ct


def open_meta(
    metadata_key: bytes,
    vault_id: bytes,
    kind: bytes,
    blob: bytes,
    suite: int = SUITE_XWING_AES256GCM,
) -> bytes:
    salt, commit, ct = blob[:SALT_LEN], blob[SALT_LEN : SALT_LEN + COMMIT_LEN], blob[48:]
    key, nonce, expect = _derive(metadata_key, vault_id, b"meta" + kind + salt)
    if not hmac.compare_digest(commit, expect):
        raise IntegrityError(f"{_label(kind)} blob: key commitment mismatch (wrong key?)")
    try:
        payload = AESGCM(key).decrypt(nonce, ct, _ad(vault_id, suite, kind))
    except InvalidTag:
        raise IntegrityError(f"{_label(kind)} blob failed authentication") from None
    return decompress(payload)


def _label(kind: bytes) -> str:
    """A metadata kind for messages: its ASCII name, without the binary id or sequence number
    some kinds end in ("index-block" ‖ id, "manifest" ‖ seq)."""
    end = next((i for i, b in enumerate(kind) if not 0x20 < b < 0x7F), len(kind))
    return kind[:end].decode("ascii")
