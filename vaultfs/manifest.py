"""Signed manifests: the root of trust a restore starts from (docs/format.md, "Manifest").

offset size   field
0      4      magic "VFSM"
4      1      format version (1)
5      2      suite id (big-endian)
7      1      signature algorithm id (1 = ML-DSA-65 ‖ Ed25519)
8      16     vault id
24     8      sequence number (big-endian, strictly increasing per commit)
32     8      creation time, milliseconds since the Unix epoch
40     4      body length L
44     L      body: metadata envelope (envelope.seal_meta, kind "manifest" ‖ seq) of JSON
44+L   2      signature length S
46+L   S      composite signature over "vaultfs/v1/manifest" ‖ bytes [0, 44+L)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from . import envelope
from .errors import IntegrityError
from .keys import SIG_MLDSA65_ED25519, SUITE_XWING_AES256GCM, VaultKeys

MAGIC = b"VFSM"
VERSION = 1
HEAD = struct.Struct(">4sBHB16sQQI")
assert HEAD.size == 44
SIGN_LABEL = b"vaultfs/v1/manifest"


@dataclass
class Manifest:
    seq: int
    created_ms: int
    body: dict


def object_name(seq: int, rnd: str) -> str:
    return f"{seq:016d}-{rnd}"


def seq_of_name(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() and len(head) == 16 else None


def _kind(seq: int) -> bytes:
    return b"manifest" + struct.pack(">Q", seq)


def encode(keys: VaultKeys, seq: int, created_ms: int, body: dict) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    sealed = envelope.seal_meta(keys.metadata_key, keys.vault_id, _kind(seq), raw)
    head = HEAD.pack(
        MAGIC, VERSION, SUITE_XWING_AES256GCM, SIG_MLDSA65_ED25519, keys.vault_id, seq,
        created_ms, len(sealed),
    )  # fmt: skip
    signed = head + sealed
    sig = keys.sign(SIGN_LABEL + signed)
    return signed + struct.pack(">H", len(sig)) + sig


def decode(keys: VaultKeys, blob: bytes) -> Manifest:
    """Verify the signature first, then decrypt. Raises IntegrityError on any mismatch."""
    if len(blob) < HEAD.size + 2:
        raise IntegrityError("manifest too short")
    magic, ver, suite, sig_alg, vid, seq, created, blen = HEAD.unpack_from(blob)
    if magic != MAGIC or ver != VERSION:
        raise IntegrityError("not a vaultfs manifest (bad magic or version)")
    if sig_alg != SIG_MLDSA65_ED25519:
        raise IntegrityError(f"manifest uses unknown signature algorithm {sig_alg}")
    if vid != keys.vault_id:
        raise IntegrityError("manifest belongs to another vault (vault id differs)")
    end = HEAD.size + blen
    if len(blob) < end + 2:
        raise IntegrityError("manifest truncated")
    (slen,) = struct.unpack_from(">H", blob, end)
    sig = blob[end + 2 : end + 2 + slen]
    if len(blob) != end + 2 + slen:
        raise IntegrityError("manifest has trailing or missing bytes")
    keys.verify(SIGN_LABEL + blob[:end], sig)
    raw = envelope.open_meta(
        keys.metadata_key, keys.vault_id, _kind(seq), blob[HEAD.size : end], suite
    )
    return Manifest(seq, created, json.loads(raw))
