"""Signed manifests: the root of trust a restore starts from (docs/format.md, "Manifest").

offset size   field
0      4      magic "VFSM"
4      1      format version (1)
5      2      suite id (big-endian)
7      1      signature algorithm id (1 = ML-DSA-65 ‖ Ed25519;
                                      2 = ML-DSA-65 ‖ Ed25519 ‖ SLH-DSA-SHA2-128s;
                                      3 = ML-DSA-65 ‖ Ed25519 ‖ SLH-DSA-SHA2-128f)
8      16     vault id
24     8      sequence number (big-endian, strictly increasing per commit)
32     8      creation time, milliseconds since the Unix epoch
40     4      body length L
44     L      body: metadata envelope (envelope.seal_meta, kind "manifest" ‖ seq) of JSON
44+L   2      signature length S
46+L   S      signature over "vaultfs/v1/manifest" ‖ bytes [0, 44+L): algorithm 1 is the
              composite ML-DSA-65 (3309) ‖ Ed25519 (64); algorithm 2 appends SLH-DSA-SHA2-128s
              (7856) over the same message, algorithm 3 SLH-DSA-SHA2-128f (17088), the public
              key named in the body ("slhdsa_public")

The suite id is the vault's current crypto suite when the manifest was written; it is bound
into the body's AEAD associated data, and a reader that knows a suite was retired refuses
manifests under it (a stale pre-re-encryption state). With algorithm 2 or 3 the composite is
checked first, then the body is opened, then SLH-DSA is checked against the pinned public key
(the caller's ``keys.slhdsa_public``, of parameter set ``keys.slhdsa_param``) or, with no pinned
key (a seed-only restore), the one the authenticated body names. A reader with a pinned key
refuses algorithm 1 (a downgrade) and the other SLH-DSA algorithm than its key's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from . import envelope
from .errors import IntegrityError
from .keys import (
    ED25519_SIG_LEN,
    MLDSA65_SIG_LEN,
    SIG_MLDSA65_ED25519,
    SLHDSA_BY_SIG_ALG,
    SLHDSA_PARAMS,
    SUITE_XWING_AES256GCM,
    VaultKeys,
    verify_slhdsa,
)

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
    suite: int = SUITE_XWING_AES256GCM
    sig_alg: int = SIG_MLDSA65_ED25519


def object_name(seq: int, rnd: str) -> str:
    return f"{seq:016d}-{rnd}"


def seq_of_name(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() and len(head) == 16 else None


def _kind(seq: int) -> bytes:
    return b"manifest" + struct.pack(">Q", seq)


def encode(
    keys: VaultKeys, seq: int, created_ms: int, body: dict, suite: int = SUITE_XWING_AES256GCM
) -> bytes:
    """Seal and sign a manifest; with an SLH-DSA key, signature algorithm 2 or 3 (its
    parameter set's)."""
    sig_alg = SIG_MLDSA65_ED25519
    if keys.slhdsa_secret is not None and keys.slhdsa_public is not None:
        sig_alg = SLHDSA_PARAMS[keys.slhdsa_param][2]
        body = {**body, "slhdsa_public": keys.slhdsa_public.hex()}
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    sealed = envelope.seal_meta(keys.metadata_key, keys.vault_id, _kind(seq), raw, suite)
    head = HEAD.pack(
        MAGIC, VERSION, suite, sig_alg, keys.vault_id, seq, created_ms, len(sealed),
    )  # fmt: skip
    signed = head + sealed
    sig = keys.sign(SIGN_LABEL + signed)
    if sig_alg != SIG_MLDSA65_ED25519:
        sig += keys.sign_slhdsa(SIGN_LABEL + signed)
    return signed + struct.pack(">H", len(sig)) + sig


def decode(keys: VaultKeys, blob: bytes) -> Manifest:
    """Verify the signature first, then decrypt. Raises IntegrityError on any mismatch."""
    if len(blob) < HEAD.size + 2:
        raise IntegrityError("manifest too short")
    magic, ver, suite, sig_alg, vid, seq, created, blen = HEAD.unpack_from(blob)
    if magic != MAGIC or ver != VERSION:
        raise IntegrityError("not a vaultfs manifest (bad magic or version)")
    if sig_alg != SIG_MLDSA65_ED25519 and sig_alg not in SLHDSA_BY_SIG_ALG:
        raise IntegrityError(f"manifest uses unknown signature algorithm {sig_alg}")
    if sig_alg == SIG_MLDSA65_ED25519 and keys.slhdsa_public is not None:
        raise IntegrityError(
            "manifest lacks the SLH-DSA signature this vault requires (downgrade refused)"
        )
    param = SLHDSA_BY_SIG_ALG.get(sig_alg)
    if param is not None and keys.slhdsa_public is not None and param != keys.slhdsa_param:
        raise IntegrityError(
            f"manifest is signed with SLH-DSA-{param.upper()}, this vault's key is "
            f"SLH-DSA-{keys.slhdsa_param.upper()}"
        )
    if vid != keys.vault_id:
        raise IntegrityError("manifest belongs to another vault (vault id differs)")
    end = HEAD.size + blen
    if len(blob) < end + 2:
        raise IntegrityError("manifest truncated")
    (slen,) = struct.unpack_from(">H", blob, end)
    sig = blob[end + 2 : end + 2 + slen]
    if len(blob) != end + 2 + slen:
        raise IntegrityError("manifest has trailing or missing bytes")
    composite_len = (
        len(sig) if sig_alg == SIG_MLDSA65_ED25519 else MLDSA65_SIG_LEN + ED25519_SIG_LEN
    )
    keys.verify(SIGN_LABEL + blob[:end], sig[:composite_len])
    keys.check_suite(suite)
    raw = envelope.open_meta(
        keys.metadata_key, keys.vault_id, _kind(seq), blob[HEAD.size : end], suite
    )
    body = json.loads(raw)
    if param is not None:
        named = bytes.fromhex(str(body.get("slhdsa_public", "")))
        if keys.slhdsa_public is not None and named != keys.slhdsa_public:
            raise IntegrityError("manifest names a different SLH-DSA key than the vault's")
        verify_slhdsa(
            keys.slhdsa_public or named, SIGN_LABEL + blob[:end], sig[composite_len:], param
        )
    return Manifest(seq, created, body, suite, sig_alg)
