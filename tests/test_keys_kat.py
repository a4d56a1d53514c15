"""Known-answer tests for the key hierarchy's primitives.

Published vectors (tests/data/keys_kat_vectors.json, extracted from the cryptography-vectors
50.0.2 wheel): HPKE MLKEM768-X25519 (X-Wing, KEM 0x647a) and ML-KEM-1024 (KEM 0x0042) from the
draft-ietf-hpke-pq test vectors, ML-DSA-65 from kat_MLDSA_65_det_pure.rsp, Ed25519 from
RFC 8032 section 7.1. Self-generated regression vectors (tests/data/keys_regression_vectors.json)
pin vaultfs's own derivations and formats; they prove stability, not correctness.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vaultfs import manifest
from vaultfs.errors import IntegrityError, WrongKey
from vaultfs.keys import (
    SIG_MLDSA65_ED25519,
    SIG_MLDSA65_ED25519_SLHDSA,
    SIG_MLDSA65_ED25519_SLHDSA128F,
    SLHDSA_128F,
    SLHDSA_128S,
    SUITES,
    VaultKeys,
    verify_slhdsa,
)

DATA = Path(__file__).parent / "data"
KAT = json.loads((DATA / "keys_kat_vectors.json").read_text())
REG = json.loads((DATA / "keys_regression_vectors.json").read_text())
RAW = (Encoding.Raw, PublicFormat.Raw)
XWING_LABEL = b"\\.//^\\"


def _decrypt(suite: hpke.Suite, v: dict, key: object) -> bytes:
    """HPKE single-shot open of a published vector's first encryption (enc ‖ ct, info, aad)."""
    return rust_openssl.hpke._decrypt_with_aad(
        suite,
        bytes.fromhex(v["enc"] + v["ct"]),
        key,
        info=bytes.fromhex(v["info"]),
        aad=bytes.fromhex(v["aad"]),
    )


def test_xwing_hpke_published_vector() -> None:
    v = KAT["hpke_xwing"]
    assert (v["kem_id"], v["kdf_id"], v["aead_id"]) == (0x647A, 1, 3)
    # X-Wing key generation: SHAKE256(seed, 96) = ML-KEM-768 seed (d ‖ z) ‖ X25519 secret
    expanded = hashlib.shake_256(bytes.fromhex(v["skRm"])).digest(96)
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    xk = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    pk_x = xk.public_key().public_bytes(*RAW)
    assert (mk.public_key().public_bytes(*RAW) + pk_x).hex() == v["pkRm"]
    # the X-Wing combiner by hand: SHA3-256(ss_M ‖ ss_X ‖ ct_X ‖ pk_X ‖ label)
    enc = bytes.fromhex(v["enc"])
    ct_m, ct_x = enc[:1088], enc[1088:]
    ss_x = xk.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    ss = hashlib.sha3_256(mk.decapsulate(ct_m) + ss_x + ct_x + pk_x + XWING_LABEL).digest()
    assert ss.hex() == v["shared_secret"]
    # and cryptography's HPKE KEM (the one vaultfs wraps data keys with) opens the vector
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    key = hpke.MLKEM768X25519PrivateKey(mk, xk)
    assert _decrypt(suite, v, key).hex() == v["pt"]
    tampered = dict(v, ct=v["ct"][:-2] + format(int(v["ct"][-2:], 16) ^ 1, "02x"))
    with pytest.raises(InvalidTag):
        _decrypt(suite, tampered, key)


def test_mlkem1024_hpke_published_vector() -> None:
    """Suite 2's exact HPKE parameters: ML-KEM-1024, HKDF-SHA384, AES-256-GCM."""
    v = KAT["hpke_mlkem1024"]
    assert (v["kem_id"], v["kdf_id"], v["aead_id"]) == (0x0042, 2, 2)
    key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(bytes.fromhex(v["skRm"]))
    assert key.public_key().public_bytes(*RAW).hex() == v["pkRm"]
    assert key.decapsulate(bytes.fromhex(v["enc"])).hex() == v["shared_secret"]
    suite = hpke.Suite(hpke.KEM.MLKEM1024, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
    assert _decrypt(suite, v, key).hex() == v["pt"]


def test_mldsa65_published_vector() -> None:
    v = KAT["mldsa65"]
    key = mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes.fromhex(v["xi"]))
    pub = key.public_key()
    assert pub.public_bytes(*RAW).hex() == v["pk"]
    pub.verify(bytes.fromhex(v["sig"]), bytes.fromhex(v["msg"]), bytes.fromhex(v["ctx"]))
    with pytest.raises(InvalidSignature):
        pub.verify(bytes.fromhex(v["sig"]), bytes.fromhex(v["msg"]) + b"x", bytes.fromhex(v["ctx"]))


def test_ed25519_rfc8032_vectors() -> None:
    for v in KAT["ed25519"]:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["sk"]))
        assert key.public_key().public_bytes(*RAW).hex() == v["pk"]
        assert key.sign(bytes.fromhex(v["msg"])).hex() == v["sig"]  # Ed25519 is deterministic


def test_composite_signature_needs_both_halves() -> None:
    keys = VaultKeys.from_seed(bytes(range(32)))
    msg = b"vaultfs composite"
    sig = keys.sign(msg)
    keys.verify(msg, sig)
    for pos in (10, len(sig) - 10):  # flip a byte in the ML-DSA half, then in the Ed25519 half
        bad = bytearray(sig)
        bad[pos] ^= 1
        with pytest.raises(IntegrityError):
            keys.verify(msg, bytes(bad))
    with pytest.raises(IntegrityError):
        keys.verify(msg + b"!", sig)


def test_regression_derivations_and_wraps() -> None:
    """Self-generated: seed 00..1f must keep deriving the same ids and unwrapping old keyrings."""
    keys = VaultKeys.from_seed(bytes.fromhex(REG["seed"]))
    assert keys.vault_id.hex() == REG["vault_id"]
    assert keys.fingerprint() == REG["fingerprint"]
    p2 = keys.kem_key(2).public_key().public_bytes(*RAW)
    assert hashlib.sha256(p2).hexdigest() == REG["mlkem1024_public_sha256"]
    for suite in SUITES:
        wrapped = bytes.fromhex(REG["wrapped"][str(suite)])
        assert keys.unwrap_data_key(REG["epoch"], wrapped, suite).hex() == REG["data_key"]
        other = next(s for s in SUITES if s != suite)
        with pytest.raises(WrongKey):  # a keyring entry opens only under its own suite
            keys.unwrap_data_key(REG["epoch"], wrapped, other)
        with pytest.raises(WrongKey):  # and only for its own epoch
            keys.unwrap_data_key(REG["epoch"] + 1, wrapped, suite)
    for entry, param in (("slhdsa", SLHDSA_128S), ("slhdsa_128f", SLHDSA_128F)):
        pub, msg, sig = (bytes.fromhex(REG[entry][f]) for f in ("public", "message", "signature"))
        verify_slhdsa(pub, msg, sig, param)
        with pytest.raises(IntegrityError):
            verify_slhdsa(pub, b"other", sig, param)
        other = SLHDSA_128F if param == SLHDSA_128S else SLHDSA_128S
        with pytest.raises(IntegrityError):  # a signature of one parameter set is not the other's
            verify_slhdsa(pub, msg, sig, other)


def test_fresh_wraps_round_trip_in_every_suite() -> None:
    keys = VaultKeys.from_seed(bytes(range(1, 33)))
    for suite in SUITES:
        dk = keys.new_epoch_key()
        assert keys.unwrap_data_key(3, keys.wrap_data_key(3, dk, suite), suite) == dk


@pytest.mark.parametrize(
    ("param", "alg"),
    [(SLHDSA_128F, SIG_MLDSA65_ED25519_SLHDSA128F), (SLHDSA_128S, SIG_MLDSA65_ED25519_SLHDSA)],
)
def test_manifest_signatures_and_tampering(param: str, alg: int) -> None:
    """Algorithms 3 and 2 (composite + SLH-DSA-SHA2-128f / -128s) round-trip; any altered
    byte, a downgrade or the other parameter set fails."""
    keys = VaultKeys.from_seed(bytes(range(32)))
    keys.generate_slhdsa(param)
    blob = manifest.encode(keys, 5, 1_700_000_000_000, {"vault_root": "00" * 32}, 2)
    m = manifest.decode(keys, blob)
    assert (m.seq, m.suite, m.sig_alg) == (5, 2, alg)
    assert m.body["slhdsa_public"] == keys.slhdsa_public.hex()
    # a seed-only reader (no pinned SLH-DSA key) learns it from the authenticated body
    fresh = VaultKeys.from_seed(keys.seed)
    assert manifest.decode(fresh, blob).body["vault_root"] == "00" * 32
    for pos in (9, 50, len(blob) - 100, len(blob) - 5000):  # header, body, SLH-DSA, ML-DSA
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            manifest.decode(keys, bytes(bad))
    plain = VaultKeys.from_seed(keys.seed)  # same vault, signing without the SLH-DSA key
    old_style = manifest.encode(plain, 6, 1_700_000_000_000, {"vault_root": "11" * 32})
    assert manifest.decode(plain, old_style).sig_alg == SIG_MLDSA65_ED25519
    with pytest.raises(IntegrityError, match="downgrade"):
        manifest.decode(keys, old_style)
    # a reader pinning this key under the other parameter set refuses the manifest
    pinned = VaultKeys.from_seed(keys.seed)
    pinned.slhdsa_public = keys.slhdsa_public
    pinned.slhdsa_param = SLHDSA_128S if param == SLHDSA_128F else SLHDSA_128F
    with pytest.raises(IntegrityError, match="this vault's key is"):
        manifest.decode(pinned, blob)
    keys.retired_suites.add(2)
    with pytest.raises(IntegrityError, match="retired suite 2"):
        manifest.decode(keys, blob)
