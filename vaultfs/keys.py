"""The key hierarchy: one 256-bit master seed, every other key derived from it by HKDF.

    master seed (32 random bytes from `secrets`)
      ├─ HKDF "vault-id"          → 16-byte vault id (public; names the vault)
      ├─ HKDF "kem/mlkem768"      → 64-byte ML-KEM-768 seed  ┐ X-Wing (HPKE MLKEM768-X25519)
      ├─ HKDF "kem/x25519"        → 32-byte X25519 key       ┘ key pair that wraps data keys
      ├─ HKDF "kem/mlkem1024"     → 64-byte ML-KEM-1024 seed (suite 2, HPKE KEM 0x0042)
      ├─ HKDF "kem/p384-hybrid/mlkem1024" → 64-byte ML-KEM-1024 seed ┐ suite 3, HPKE
      ├─ HKDF "kem/p384-hybrid/p384"      → 64 bytes → P-384 scalar  ┘ MLKEM1024-P384 (0x0051)
      ├─ HKDF "chunk-id"          → BLAKE3 key for chunk ids (ids never leave the client)
      ├─ HKDF "chunker"           → gear seed for content-defined chunking (63 bits, low bit 1;
      │                              only bits 1-47 move a cut point: docs/keys.md)
      ├─ HKDF "metadata"          → AES-256 key for the index and manifest bodies
      ├─ HKDF "sign/mldsa65"      → ML-DSA-65 signing key seed ┐ composite signature on
      ├─ HKDF "sign/ed25519"      → Ed25519 signing key        ┘ manifests and the keyring
      ├─ HKDF "sign/slhdsa-seal"  → AES-256 key sealing the (random) SLH-DSA secret key
      ├─ HKDF "keyfile-policy"    → HMAC key authenticating the keyfile's policy (KDF, retired
      │                              suites, SLH-DSA parameter set)
      ├─ HKDF "audit"             → key for audit challenges (reserved)
      └─ HKDF "tier/" + NAME      → 32-byte master seed of tier NAME's vault (a strategy's
                                     tiers: vaultfs/tiers.py), which derives all of the
                                     above for that vault in turn

Data keys are random per epoch and stored wrapped with HPKE to the public key of the epoch's
suite (`keyring`), so the seed alone re-derives everything needed to unwrap them.

SLH-DSA (FIPS 205, via `pqcrypto`, which has no seeded key generation; SHA2-128f for keys made
since 2026-12-01, SHA2-128s before) is the one key pair that is *not* derived: it is generated once, and its secret key is stored sealed under
HKDF "sign/slhdsa-seal" in the index and in every manifest body, so seed + any k remotes still
recover it (vaultfs/rotation.py, docs/keys.md).

HKDF parameters: HKDF-SHA256, salt = b"vaultfs/v1", info = b"vaultfs/v1/" + label.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import kdf
from .errors import InputError, IntegrityError, WrongKey

SEED_LEN = 32
HKDF_SALT = b"vaultfs/v1"
LABEL_PREFIX = b"vaultfs/v1/"

#: Suite 1: X-Wing (HPKE KEM 0x647a, MLKEM768-X25519) + HKDF-SHA256 + AES-256-GCM.
SUITE_XWING_AES256GCM = 1
#: Suite 2: ML-KEM-1024 (HPKE KEM 0x0042) + HKDF-SHA384 + AES-256-GCM.
SUITE_MLKEM1024_AES256GCM = 2
#: Suite 3: MLKEM1024-P384 hybrid (HPKE KEM 0x0051) + HKDF-SHA384 + AES-256-GCM.
SUITE_MLKEM1024P384_AES256GCM = 3
SUITES = {
    SUITE_XWING_AES256GCM: "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM",
    SUITE_MLKEM1024_AES256GCM: "MLKEM1024/HKDF-SHA384/AES-256-GCM",
    SUITE_MLKEM1024P384_AES256GCM: "MLKEM1024-P384/HKDF-SHA384/AES-256-GCM",
}
#: Names accepted on the command line (`vaultfs reencrypt --suite NAME`).
SUITE_NAMES = {
    "xwing": SUITE_XWING_AES256GCM,
    "mlkem1024": SUITE_MLKEM1024_AES256GCM,
    "mlkem1024-p384": SUITE_MLKEM1024P384_AES256GCM,
}

#: Signature algorithm 1: ML-DSA-65 signature (3309 bytes) followed by Ed25519 (64 bytes).
SIG_MLDSA65_ED25519 = 1
MLDSA65_SIG_LEN = 3309
ED25519_SIG_LEN = 64
#: Signature algorithm 2: algorithm 1's composite followed by SLH-DSA-SHA2-128s (7856 bytes).
SIG_MLDSA65_ED25519_SLHDSA = 2
#: Signature algorithm 3: algorithm 1's composite followed by SLH-DSA-SHA2-128f (17088 bytes).
SIG_MLDSA65_ED25519_SLHDSA128F = 3
SLHDSA_PK_LEN = 32

#: SLH-DSA parameter sets: name -> (pqcrypto module, signature length, signature algorithm).
#: Both are NIST security category 1 with 32-byte public keys; "s" signs in ~0.28 s here,
#: "f" in ~0.012 s for a signature of 17 KB instead of 8 KB. A manifest is signed at every
#: commit (every backup, every snapshot of the mount), so new keys are "f".
SLHDSA_128S = "sha2-128s"
SLHDSA_128F = "sha2-128f"
SLHDSA_PARAMS: dict[str, tuple[str, int, int]] = {
    SLHDSA_128S: ("slh_dsa_sha2_128s", 7856, SIG_MLDSA65_ED25519_SLHDSA),
    SLHDSA_128F: ("slh_dsa_sha2_128f", 17088, SIG_MLDSA65_ED25519_SLHDSA128F),
}
SLHDSA_BY_SIG_ALG = {alg: name for name, (_m, _n, alg) in SLHDSA_PARAMS.items()}
#: The parameter set of keys generated now.
SLHDSA_DEFAULT = SLHDSA_128F
#: Signature length of the original parameter set (kept for readers of algorithm 2).
SLHDSA_SIG_LEN = SLHDSA_PARAMS[SLHDSA_128S][1]


def slhdsa_field(param: str) -> str:
    """The JSON field naming a public key of this parameter set ("slhdsa_sha2_128f") in
    `vaultfs keys show` and receipts."""
    return "slhdsa_" + param.replace("-", "_")


def _slhdsa_module(param: str):
    import importlib

    if param not in SLHDSA_PARAMS:
        raise IntegrityError(f"unknown SLH-DSA parameter set {param!r}")
    return importlib.import_module(f"pqcrypto.sign.{SLHDSA_PARAMS[param][0]}")


SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1


def hkdf(ikm: bytes, label: bytes, length: int, salt: bytes = HKDF_SALT) -> bytes:
    """HKDF-SHA256 with vaultfs's domain-separated info string."""
    return HKDF(hashes.SHA256(), length, salt, LABEL_PREFIX + label).derive(ikm)


def _hpke_suite(suite: int = SUITE_XWING_AES256GCM) -> hpke.Suite:
    if suite == SUITE_XWING_AES256GCM:
        return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    if suite == SUITE_MLKEM1024_AES256GCM:
        return hpke.Suite(hpke.KEM.MLKEM1024, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
    if suite == SUITE_MLKEM1024P384_AES256GCM:
        return hpke.Suite(hpke.KEM.MLKEM1024_P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
    raise IntegrityError(f"unknown crypto suite id {suite}")


def suite_name(suite: int) -> str:
    """Human-readable name of a suite id (``"suite 9 (unknown)"`` for ids we do not know)."""
    return f"suite {suite} ({SUITES.get(suite, 'unknown')})"


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
    #: SLH-DSA key pair (random, stored sealed); None until loaded or generated.
    slhdsa_public: bytes | None = None
    slhdsa_secret: bytes | None = None
    #: its parameter set (SLHDSA_PARAMS); a key stored without one is SHA2-128s
    slhdsa_param: str = SLHDSA_128S
    #: suite ids the vault has retired: data, keyrings and manifests under them are refused.
    retired_suites: set[int] = field(default_factory=set)
    #: the SLH-DSA parameter set the keyfile's authenticated policy names (None: not recorded);
    #: :meth:`load_slhdsa` refuses a stored key of another set
    policy_slhdsa: str | None = None
    _kem_keys: dict[int, object] = field(default_factory=dict, repr=False)

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
    def kem_key(self, suite: int = SUITE_XWING_AES256GCM):
        """The HPKE private key of ``suite``, derived from the seed (cached)."""
        if suite == SUITE_XWING_AES256GCM:
            return self.kem_private
        key = self._kem_keys.get(suite)
        if key is not None:
            return key
        if suite == SUITE_MLKEM1024_AES256GCM:
            key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(hkdf(self.seed, b"kem/mlkem1024", 64))
        elif suite == SUITE_MLKEM1024P384_AES256GCM:
            curve = ec.SECP384R1()
            order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
            scalar = int.from_bytes(hkdf(self.seed, b"kem/p384-hybrid/p384", 64), "big")
            key = hpke.MLKEM1024P384PrivateKey(
                mlkem.MLKEM1024PrivateKey.from_seed_bytes(
                    hkdf(self.seed, b"kem/p384-hybrid/mlkem1024", 64)
                ),
                ec.derive_private_key(scalar % (order - 1) + 1, curve),
            )
        else:
            raise IntegrityError(f"unknown crypto suite id {suite}")
        self._kem_keys[suite] = key
        return key

    def check_suite(self, suite: int) -> None:
        """Raise IntegrityError for a suite this build does not know or the vault retired."""
        if suite not in SUITES:
            raise IntegrityError(f"data under unknown crypto {suite_name(suite)}: upgrade vaultfs")
        if suite in self.retired_suites:
            raise IntegrityError(
                f"refusing data under retired {suite_name(suite)}: this vault was re-encrypted "
                "and retired that suite (a stale or rolled-back copy is being served)"
            )

    def wrap_data_key(
        self, epoch: int, data_key: bytes, suite: int = SUITE_XWING_AES256GCM
    ) -> bytes:
        """HPKE base-mode seal of a data key to the public key of ``suite``.

        info = "vaultfs/v1/keyring" ‖ vault id ‖ epoch(4, BE); HPKE binds the suite itself.
        """
        info = b"vaultfs/v1/keyring" + self.vault_id + struct.pack(">I", epoch)
        return _hpke_suite(suite).encrypt(data_key, self.kem_key(suite).public_key(), info=info)

    def unwrap_data_key(
        self, epoch: int, wrapped: bytes, suite: int = SUITE_XWING_AES256GCM
    ) -> bytes:
        self.check_suite(suite)
        info = b"vaultfs/v1/keyring" + self.vault_id + struct.pack(">I", epoch)
        try:
            return _hpke_suite(suite).decrypt(wrapped, self.kem_key(suite), info=info)
        except Exception:
            raise WrongKey(f"cannot unwrap data key of epoch {epoch}: wrong key") from None

    # -- SLH-DSA (hash-based second signature) -----------------------------------------------
    def generate_slhdsa(self, param: str = SLHDSA_DEFAULT) -> None:
        """Create the vault's SLH-DSA key pair (random: pqcrypto has no seeded keygen)."""
        self.slhdsa_public, self.slhdsa_secret = _slhdsa_module(param).keygen()
        self.slhdsa_param = param

    def _slhdsa_ad(self, public: bytes) -> bytes:
        return b"vaultfs/v1/slhdsa" + self.vault_id + public

    def seal_slhdsa_secret(self) -> bytes:
        """nonce(12) ‖ AES-256-GCM(HKDF "sign/slhdsa-seal", secret key), AD binds the public key."""
        if self.slhdsa_public is None or self.slhdsa_secret is None:
            raise InputError("this vault has no SLH-DSA key yet: run `vaultfs keys init`")
        nonce = secrets.token_bytes(12)
        key = hkdf(self.seed, b"sign/slhdsa-seal", 32)
        return nonce + AESGCM(key).encrypt(
            nonce, self.slhdsa_secret, self._slhdsa_ad(self.slhdsa_public)
        )

    def slhdsa_settings(self) -> dict[str, str]:
        """The index settings that store the SLH-DSA key pair: public key, secret sealed under
        the seed (:meth:`seal_slhdsa_secret`) and parameter set; the vault reads them back
        with :meth:`load_slhdsa`."""
        assert self.slhdsa_public is not None
        return {
            "slhdsa_public": self.slhdsa_public.hex(),
            "slhdsa_sealed": self.seal_slhdsa_secret().hex(),
            "slhdsa_param": self.slhdsa_param,
        }

    def load_slhdsa(self, public: bytes, sealed: bytes, param: str = SLHDSA_128S) -> None:
        """Unseal the SLH-DSA secret key; raises WrongKey if it was sealed by another seed and
        IntegrityError if ``param`` is not the set the keyfile's policy names."""
        _slhdsa_module(param)  # an unknown parameter set is refused before anything else
        if self.policy_slhdsa is not None and param != self.policy_slhdsa:
            raise IntegrityError(
                f"the vault's SLH-DSA key is {param} but the keyfile's policy says "
                f"{self.policy_slhdsa}: the local index was replaced or downgraded"
            )
        key = hkdf(self.seed, b"sign/slhdsa-seal", 32)
        try:
            secret = AESGCM(key).decrypt(sealed[:12], sealed[12:], self._slhdsa_ad(public))
        except InvalidTag:
            raise WrongKey("the stored SLH-DSA key was not sealed by this vault's seed") from None
        self.slhdsa_public, self.slhdsa_secret, self.slhdsa_param = public, secret, param

    def sign_slhdsa(self, message: bytes) -> bytes:
        if self.slhdsa_secret is None:
            raise InputError("this vault has no SLH-DSA key yet: run `vaultfs keys init`")
        return _slhdsa_module(self.slhdsa_param).sign(self.slhdsa_secret, message)

    def policy_mac(self, policy: dict) -> str:
        """HMAC-SHA256 (key HKDF "keyfile-policy") over the canonical JSON of a keyfile policy."""
        return hmac.new(
            hkdf(self.seed, b"keyfile-policy", 32), _canonical(policy), "sha256"
        ).hexdigest()

    def new_epoch_key(self) -> bytes:
        return secrets.token_bytes(32)


def verify_slhdsa(
    public: bytes, message: bytes, signature: bytes, param: str = SLHDSA_128S
) -> None:
    """Raise IntegrityError unless ``signature`` is a valid SLH-DSA signature with parameter
    set ``param`` (SLHDSA_PARAMS)."""
    from pqcrypto import InvalidSignatureError

    mod = _slhdsa_module(param)
    if len(public) != SLHDSA_PK_LEN or len(signature) != SLHDSA_PARAMS[param][1]:
        raise IntegrityError("SLH-DSA key or signature has the wrong length")
    try:
        mod.verify(public, message, signature)
    except (InvalidSignatureError, ValueError):
        raise IntegrityError("SLH-DSA signature does not verify (tampered or foreign)") from None


def tier_seed(master: bytes, tier: str) -> bytes:
    """The master seed of the vault of strategy tier ``tier`` (vaultfs/strategy.py):
    HKDF(master, "tier/" + name). One master seed, one keyfile and one Shamir split so
    recover every tier; a tier's seed reveals nothing of the master or of another tier."""
    if len(master) != SEED_LEN:
        raise WrongKey(f"a master seed is {SEED_LEN} bytes; got {len(master)}")
    return hkdf(master, b"tier/" + tier.encode(), SEED_LEN)


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_LEN)


# -- keyfile: the seed sealed under the passphrase ------------------------------------------

#: Version of keyfiles written now. Version 1 (authenticated policy optional, raw passphrase)
#: still opens and becomes version 2 at its next rewrite (`keys passwd`, `keys init`...).
KEYFILE_VERSION = 2
#: Largest scrypt memory (128·r·N bytes) a keyfile may ask for (vaultfs/kdf.py).
SCRYPT_MAX_MEM = kdf.MAX_MEM


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _keyfile_ad(version: int, vault_id: bytes, kdf_params: dict) -> bytes:
    """Associated data of the sealed seed. Version 2 binds the KDF parameters, so a keyfile
    cannot be relabelled as version 1 (whose policy is optional) or given other parameters."""
    if version == 1:
        return b"vaultfs/v1/keyfile" + vault_id
    return b"vaultfs/v2/keyfile" + vault_id + _canonical(kdf_params)


def _kdf_params(kdf_doc: object) -> tuple[int, int, int]:
    """(N, r, p) of a keyfile's ``kdf`` section; InputError unless it is scrypt with
    parameters within :data:`SCRYPT_MAX_MEM`."""
    if not isinstance(kdf_doc, dict) or kdf_doc.get("name") != "scrypt":
        name = kdf_doc.get("name") if isinstance(kdf_doc, dict) else kdf_doc
        raise InputError(f"the keyfile uses an unknown KDF {name!r}")
    n, r, p = (kdf_doc.get(f) for f in ("n", "r", "p"))
    if not all(type(x) is int and x >= 1 for x in (n, r, p)):
        raise InputError("keyfile scrypt parameters are invalid")
    if n < 2 or n & (n - 1) or 128 * r * n > SCRYPT_MAX_MEM or p > 16:
        raise InputError("keyfile scrypt parameters are out of range")
    return n, r, p


def scrypt_kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The keyfile's key-encryption key: scrypt through :mod:`vaultfs.kdf` (which may have
    started it before the command line finished importing)."""
    try:
        return kdf.derive(passphrase, salt, n, r, p)
    except ValueError as e:  # parameters out of range: a damaged or foreign keyfile
        raise InputError(f"keyfile scrypt parameters are invalid ({e})") from None


def write_keyfile(path: Path, keys: VaultKeys, passphrase: str) -> None:
    """Seal the master seed under scrypt(NFC(passphrase)) with AES-256-GCM, the KDF
    parameters in the associated data, and the policy (KDF parameters, retired suites,
    SLH-DSA parameter set) under a MAC keyed from the seed; write atomically (version 2)."""
    if not passphrase:
        raise InputError("an empty passphrase is not allowed")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    kdf_params = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    kek = scrypt_kek(kdf.normalize(passphrase), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    ad = _keyfile_ad(KEYFILE_VERSION, keys.vault_id, kdf_params)
    doc = {
        "format": "vaultfs-keyfile",
        "version": KEYFILE_VERSION,
        "vault_id": keys.vault_id.hex(),
        "fingerprint": keys.fingerprint(),
        "kdf": kdf_params,
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "sealed_seed": base64.b64encode(AESGCM(kek).encrypt(nonce, keys.seed, ad)).decode(),
    }
    doc.update(_policy_fields(keys, KEYFILE_VERSION, kdf_params))
    _write_json_atomic(path, doc)


def _policy_fields(keys: VaultKeys, version: int, kdf_params: dict) -> dict:
    """The ``policy`` section and its MAC. Version 2 names the KDF parameters and the SLH-DSA
    parameter set (None while the vault has no SLH-DSA key) beside the retired suites."""
    policy: dict = {"retired_suites": sorted(keys.retired_suites)}
    if version >= 2:
        known = keys.slhdsa_param if keys.slhdsa_public is not None else keys.policy_slhdsa
        policy.update({"kdf": kdf_params, "slhdsa_param": known})
    return {"policy": policy, "policy_mac": keys.policy_mac(policy)}


def _write_json_atomic(path: Path, doc: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_doc(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(f"keyfile {path} not found") from None
    except OSError as e:
        raise InputError(f"cannot read keyfile {path}: {e.strerror}") from None
    except (ValueError, RecursionError):
        raise InputError(f"{path} is not a vaultfs keyfile") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a vaultfs keyfile")
    return doc


def read_keyfile(path: Path, passphrase: str) -> VaultKeys:
    """Unseal the keyfile at ``path``: the keys of its seed, with the retired suites and the
    SLH-DSA parameter set of its authenticated policy.

    The passphrase is taken in NFC (:func:`vaultfs.kdf.normalize`); a version-1 keyfile
    sealed under a non-NFC spelling also opens with that spelling as typed. Raises InputError
    for a file that is not a keyfile (or asks for scrypt memory beyond
    :data:`SCRYPT_MAX_MEM`), WrongKey for a wrong passphrase or a seed of another vault, and
    IntegrityError for a policy that is missing (version 2) or altered."""
    doc = _load_doc(path)
    version = doc.get("version", 1)
    try:
        if version not in (1, 2):
            raise ValueError
        kdf_doc = doc["kdf"]
        salt = base64.b64decode(doc["salt"])
        nonce = base64.b64decode(doc["nonce"])
        sealed = base64.b64decode(doc["sealed_seed"])
        vault_id = bytes.fromhex(doc["vault_id"])
        if not 8 <= len(nonce) <= 128:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a vaultfs keyfile") from None
    n, r, p = _kdf_params(kdf_doc)
    ad = _keyfile_ad(version, vault_id, kdf_doc)
    tries = [kdf.normalize(passphrase)]
    if version == 1 and passphrase != tries[0]:
        tries.append(passphrase)  # sealed before passphrases were normalised
    seed = None
    for pw in tries:
        try:
            seed = AESGCM(scrypt_kek(pw, salt, n, r, p)).decrypt(nonce, sealed, ad)
            break
        except InvalidTag:
            continue
    if seed is None:
        raise WrongKey("wrong passphrase for keyfile " + str(path))
    keys = VaultKeys.from_seed(seed)
    if keys.vault_id != vault_id:
        raise WrongKey(f"keyfile {path} is damaged: its seed does not match its vault id")
    policy = doc.get("policy")
    if policy is None and version == 1:
        return keys  # version 1 wrote no policy before suites could be retired
    if not isinstance(policy, dict) or not hmac.compare_digest(
        str(doc.get("policy_mac", "")).encode(), keys.policy_mac(policy).encode()
    ):
        raise IntegrityError(f"keyfile {path}: its policy section is missing or was altered")
    if version >= 2 and policy.get("kdf") != kdf_doc:
        raise IntegrityError(f"keyfile {path}: its policy names other scrypt parameters")
    retired = policy.get("retired_suites", [])
    if not isinstance(retired, list) or not all(type(s) is int for s in retired):
        raise IntegrityError(f"keyfile {path}: its policy section is malformed")
    keys.retired_suites = set(retired)
    param = policy.get("slhdsa_param")
    if param is not None and param not in SLHDSA_PARAMS:
        raise IntegrityError(f"keyfile {path}: unknown SLH-DSA parameter set {param!r}")
    keys.policy_slhdsa = param
    return keys


def update_keyfile_policy(path: Path, keys: VaultKeys) -> None:
    """Rewrite only the keyfile's authenticated policy (retired suites); no passphrase needed.
    The keyfile keeps its version (a version-1 file becomes version 2 when it is re-sealed)."""
    try:
        doc = _load_doc(path)
    except InputError:
        if not Path(path).exists():
            return
        raise
    if doc.get("vault_id") != keys.vault_id.hex():
        raise WrongKey(f"keyfile {path} belongs to another vault")
    doc.update(_policy_fields(keys, doc.get("version", 1), doc.get("kdf")))
    _write_json_atomic(Path(path), doc)


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
