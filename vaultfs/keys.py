"""The key hierarchy: one 256-bit master seed, every other key derived from it by HKDF.

    master seed (32 random bytes from `secrets`)
      ├─ HKDF "vault-id"          → 16-byte vault id (public; names the vault)
      ├─ HKDF "kem/mlkem768"      → 64-byte ML-KEM-768 seed  ┐ X-Wing (HPKE MLKEM768-X25519)
      ├─ HKDF "kem/x25519"        → 32-byte X25519 key       ┘ key pair that wraps data keys
      ├─ HKDF "chunk-id"          → BLAKE3 key for chunk ids (ids never leave the client)
      ├─ HKDF "chunker"           → 64-bit gear seed for content-defined chunking
      ├─ HKDF "metadata"          → AES-256 key for the index and manifest bodies
      ├─ HKDF "sign/mldsa65"      → ML-DSA-65 signing key seed ┐ composite signature on
      ├─ HKDF "sign/ed25519"      → Ed25519 signing key        ┘ manifests and the keyring
      └─ HKDF "audit"             → key for audit challenges (reserved)

Data keys are random per epoch and stored wrapped with HPKE to the X-Wing public key
(`keyring`), so the seed alone re-derives everything needed to unwrap them.

HKDF parameters: HKDF-SHA256, salt = b"vaultfs/v1", info = b"vaultfs/v1/" + label.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import InputError, IntegrityError, WrongKey

SEED_LEN = 32
HKDF_SALT = b"vaultfs/v1"
LABEL_PREFIX = b"vaultfs/v1/"

#: Suite 1: X-Wing (HPKE KEM 0x647a, MLKEM768-X25519) + HKDF-SHA256 + AES-256-GCM.
SUITE_XWING_AES256GCM = 1
SUITES = {SUITE_XWING_AES256GCM: "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"}

#: Signature algorithm 1: ML-DSA-65 signature (3309 bytes) followed by Ed25519 (64 bytes).
SIG_MLDSA65_ED25519 = 1
MLDSA65_SIG_LEN = 3309
ED25519_SIG_LEN = 64

SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1


def hkdf(ikm: bytes, label: bytes, length: int, salt: bytes = HKDF_SALT) -> bytes:
    """HKDF-SHA256 with vaultfs's domain-separated info string."""
    return HKDF(hashes.SHA256(), length, salt, LABEL_PREFIX + label).derive(ikm)


def _hpke_suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


@dataclass
class VaultKeys:
    """All keys derived from one master seed. Construct with :meth:`from_seed`."""

    seed: bytes
    vault_id: bytes
    chunk_id_key: bytes
    chunker_seed: int
    metadata_key: bytes
    audit_key: bytes
    kem_private: hpke.MLKEM768X25519PrivateKey
    mldsa_private: mldsa.MLDSA65PrivateKey
    ed25519_private: ed25519.Ed25519PrivateKey
    data_keys: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def from_seed(cls, seed: bytes) -> VaultKeys:
        if len(seed) != SEED_LEN:
            raise WrongKey(f"a master seed is {SEED_LEN} bytes; got {len(seed)}")
        kem = hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(hkdf(seed, b"kem/mlkem768", 64)),
            x25519.X25519PrivateKey.from_private_bytes(hkdf(seed, b"kem/x25519", 32)),
        )
        # pyfastcdc shifts the seed left by one in a uint64, so it must fit in 63 bits;
        # the low bit is forced so the seed is never 0 (which would disable keying)
        gear = (int.from_bytes(hkdf(seed, b"chunker", 8), "big") & (2**63 - 1)) | 1
        return cls(
            seed=seed,
            vault_id=hkdf(seed, b"vault-id", 16),
            chunk_id_key=hkdf(seed, b"chunk-id", 32),
            chunker_seed=gear,
            metadata_key=hkdf(seed, b"metadata", 32),
            audit_key=hkdf(seed, b"audit", 32),
            kem_private=kem,
            mldsa_private=mldsa.MLDSA65PrivateKey.from_seed_bytes(hkdf(seed, b"sign/mldsa65", 32)),
            ed25519_private=ed25519.Ed25519PrivateKey.from_private_bytes(
                hkdf(seed, b"sign/ed25519", 32)
            ),
        )

    # -- public identity -------------------------------------------------------------------
    def public_bytes(self) -> dict[str, bytes]:
        """The vault's public keys, raw encodings."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = (Encoding.Raw, PublicFormat.Raw)
        return {
            "mldsa65": self.mldsa_private.public_key().public_bytes(*raw),
            "ed25519": self.ed25519_private.public_key().public_bytes(*raw),
        }

    def fingerprint(self) -> str:
        """Public fingerprint: BLAKE3 over the vault id and the signing public keys."""
        pub = self.public_bytes()
        h = blake3.blake3(
            b"vaultfs/v1/fingerprint" + self.vault_id + pub["mldsa65"] + pub["ed25519"]
        )
        d = h.hexdigest()[:32]
        return "-".join(d[i : i + 4] for i in range(0, 32, 4))

    # -- signatures ------------------------------------------------------------------------
    def sign(self, message: bytes) -> bytes:
        """Composite signature: ML-DSA-65 then Ed25519, over the same message."""
        return self.mldsa_private.sign(message) + self.ed25519_private.sign(message)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise IntegrityError unless *both* signatures verify."""
        if len(signature) != MLDSA65_SIG_LEN + ED25519_SIG_LEN:
            raise IntegrityError("signature has the wrong length")
        try:
            self.mldsa_private.public_key().verify(signature[:MLDSA65_SIG_LEN], message)
            self.ed25519_private.public_key().verify(signature[MLDSA65_SIG_LEN:], message)
        except InvalidSignature:
            raise IntegrityError("signature does not verify (tampered or foreign)") from None

    # -- data keys (keyring) ---------------------------------------------------------------
    def wrap_data_key(self, epoch: int, data_key: bytes) -> bytes:
        """HPKE base-mode seal of a data key to the vault's X-Wing public key."""
        info = b"vaultfs/v1/keyring" + self.vault_id + struct.pack(">I", epoch)
        return _hpke_suite().encrypt(data_key, self.kem_private.public_key(), info=info)

    def unwrap_data_key(self, epoch: int, wrapped: bytes) -> bytes:
        info = b"vaultfs/v1/keyring" + self.vault_id + struct.pack(">I", epoch)
        try:
            return _hpke_suite().decrypt(wrapped, self.kem_private, info=info)
        except Exception:
            raise WrongKey(f"cannot unwrap data key of epoch {epoch}: wrong key") from None

    def new_epoch_key(self) -> bytes:
        return secrets.token_bytes(32)


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_LEN)


# -- keyfile: the seed sealed under the passphrase ------------------------------------------


def write_keyfile(path: Path, keys: VaultKeys, passphrase: str) -> None:
    """Seal the master seed under scrypt(passphrase) with AES-256-GCM; write atomically."""
    if not passphrase:
        raise InputError("an empty passphrase is not allowed")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    kek = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )
    ad = b"vaultfs/v1/keyfile" + keys.vault_id
    doc = {
        "format": "vaultfs-keyfile",
        "version": 1,
        "vault_id": keys.vault_id.hex(),
        "fingerprint": keys.fingerprint(),
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "sealed_seed": base64.b64encode(AESGCM(kek).encrypt(nonce, keys.seed, ad)).decode(),
    }
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_keyfile(path: Path, passphrase: str) -> VaultKeys:
    try:
        doc = json.loads(Path(path).read_text())
        kdf = doc["kdf"]
        salt = base64.b64decode(doc["salt"])
        nonce = base64.b64decode(doc["nonce"])
        sealed = base64.b64decode(doc["sealed_seed"])
        vault_id = bytes.fromhex(doc["vault_id"])
    except FileNotFoundError:
        raise InputError(f"keyfile {path} not found") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a vaultfs keyfile") from None
    if kdf.get("name") != "scrypt":
        raise InputError(f"keyfile {path} uses an unknown KDF {kdf.get('name')!r}")
    kek = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        passphrase.encode()
    )
    try:
        seed = AESGCM(kek).decrypt(nonce, sealed, b"vaultfs/v1/keyfile" + vault_id)
    except InvalidTag:
        raise WrongKey("wrong passphrase for keyfile " + str(path)) from None
    keys = VaultKeys.from_seed(seed)
    if keys.vault_id != vault_id:
        raise WrongKey(f"keyfile {path} is damaged: its seed does not match its vault id")
    return keys


def parse_seed(text: str) -> bytes:
    """A master seed written as 64 hex digits (spaces and dashes ignored)."""
    clean = "".join(ch for ch in text.strip() if ch not in " -\n\t")
    try:
        seed = bytes.fromhex(clean)
    except ValueError:
        raise InputError("a master seed is written as 64 hexadecimal digits") from None
    if len(seed) != SEED_LEN:
        raise InputError(f"a master seed is 64 hexadecimal digits; got {len(clean)}")
    return seed
