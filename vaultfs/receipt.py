"""Signed receipts: a statement about one snapshot that anyone holding the public key can check.

A receipt is a JSON document (docs/keys.md, "Receipts")::

    {
      "format": "vaultfs-receipt", "version": 1,
      "statement": {vault_id, fingerprint, snapshot, name, snapshot_created, manifest_seq,
                    manifest_hash, snapshot_root, files, bytes, issued, suite, redundancy{...}, remotes[...]},
      "public_keys": {vault_id, fingerprint, mldsa65, ed25519,
                      slhdsa_sha2_128f (or slhdsa_sha2_128s), slhdsa_endorsement},
      "signature": {algorithm, mldsa65, ed25519, slhdsa}
    }

Binary values are base64 (keys, signatures) or hex (ids, roots). The signed message is
``"vaultfs/v1/receipt" ‖ canonical JSON of "statement"`` (keys sorted, no spaces, UTF-8), signed
by ML-DSA-65, Ed25519 and SLH-DSA (SHA2-128f for keys made since 2026-12-01, SHA2-128s before;
the algorithm string and the public key's field name say which); all three must verify.

The public-key document (``vaultfs keys public``) is the ``public_keys`` object. Its fingerprint
is the vault's public fingerprint, BLAKE3 over the vault id and the ML-DSA-65 and Ed25519 keys
(keys.VaultKeys.fingerprint: derivable from the seed, printed on every Shamir share). The
SLH-DSA key, being random, is bound to it by ``slhdsa_endorsement``: the composite signature over
``"vaultfs/v1/slhdsa-endorsement" ‖ vault id ‖ SLH-DSA public key``. Pinning the whole public-key
document (``--public-key FILE``) keeps a receipt checkable by SLH-DSA alone should ML-DSA and
Ed25519 both fall; pinning only the fingerprint trusts the endorsement.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from .errors import InputError, IntegrityError
from .index import manifests, segments, snapshots
from .index import remotes as remote_table
from .keys import SLHDSA_128F, SLHDSA_128S, SUITES, VaultKeys, slhdsa_field, verify_slhdsa
from .manifest import Link
from .remotes import Remote

if TYPE_CHECKING:
    from .vault import Vault

FORMAT = "vaultfs-receipt"
RECEIPT_LABEL = b"vaultfs/v1/receipt"
ENDORSE_LABEL = b"vaultfs/v1/slhdsa-endorsement"
#: signature algorithm string -> SLH-DSA parameter set
ALGORITHMS = {
    "ML-DSA-65+Ed25519+SLH-DSA-SHA2-128s": SLHDSA_128S,
    "ML-DSA-65+Ed25519+SLH-DSA-SHA2-128f": SLHDSA_128F,
}
ALGORITHM_OF = {param: name for name, param in ALGORITHMS.items()}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except ValueError:
        raise IntegrityError(f"receipt field {what} is not valid base64") from None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint_of(vault_id: bytes, mldsa65: bytes, ed: bytes) -> str:
    """The public fingerprint (same as keys.VaultKeys.fingerprint) from public keys alone."""
    d = blake3.blake3(b"vaultfs/v1/fingerprint" + vault_id + mldsa65 + ed).hexdigest()[:32]
    return "-".join(d[i : i + 4] for i in range(0, 32, 4))


def public_document(keys: VaultKeys) -> dict:
    """The vault's public keys, as handed to auditors (`vaultfs keys public`)."""
    pub = keys.public_bytes()
    doc = {
        "format": "vaultfs-public-key",
        "vault_id": keys.vault_id.hex(),
        "fingerprint": keys.fingerprint(),
        "mldsa65": _b64(pub["mldsa65"]),
        "ed25519": _b64(pub["ed25519"]),
        slhdsa_field(keys.slhdsa_param): None,
        "slhdsa_endorsement": None,
    }
    if keys.slhdsa_public is not None:
        doc[slhdsa_field(keys.slhdsa_param)] = _b64(keys.slhdsa_public)
        doc["slhdsa_endorsement"] = _b64(
            keys.sign(ENDORSE_LABEL + keys.vault_id + keys.slhdsa_public)
        )
    return doc


def make(v: Vault, snapshot: str) -> dict:
    """Build and sign a receipt for ``snapshot`` (id, name or 'latest')."""
    if v.keys.slhdsa_secret is None:
        raise InputError("this vault has no SLH-DSA key yet: run `vaultfs keys init` first")
    found = snapshots.require(v.index, snapshot)
    uid, name, created, seq, root, files, size = snapshots.details(v.index, found[0])
    st = v.status()
    remotes = []
    for rid, spec in remote_table.active(v.index):
        placed, _bytes = segments.remote_totals(v.index, rid, "placed")
        queued = segments.queued_count(v.index, rid)
        pending = manifests.queued_up_to(v.index, rid, seq)
        remotes.append(
            {
                "remote": Remote(spec).label,
                "placed_objects": placed,
                "queued_objects": queued,
                "manifest_placed": not pending,
            }
        )
    statement = {
        "vault_id": v.keys.vault_id.hex(),
        "fingerprint": v.keys.fingerprint(),
        "snapshot": uid,
        "name": name,
        "snapshot_created": _iso(created),
        "manifest_seq": seq,
        "manifest_hash": (h := manifests.hash_of(v.index, seq)) and h.hex(),
        "snapshot_root": root.hex() if root else None,
        "files": files,
        "bytes": size,
        "issued": _iso(time.time()),
        "suite": SUITES.get(v.suite, str(v.suite)),
        "redundancy": {
            "k": v.k,
            "n": v.n,
            "survives_losses_now": st["survives_losses_now"],
            "survives_losses_design": st["survives_losses_design"],
            "segments_below_k_placed": st["segments_below_k_placed"],
        },
        "remotes": remotes,
    }
    msg = RECEIPT_LABEL + canonical(statement)
    composite = v.keys.sign(msg)
    return {
        "format": FORMAT,
        "version": 1,
        "statement": statement,
        "public_keys": public_document(v.keys),
        "signature": {
            "algorithm": ALGORITHM_OF[v.keys.slhdsa_param],
            "mldsa65": _b64(composite[:-64]),
            "ed25519": _b64(composite[-64:]),
            "slhdsa": _b64(v.keys.sign_slhdsa(msg)),
        },
    }


def load_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{path} is not a vaultfs {what} (not JSON)") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a vaultfs {what}")
    return doc


def verify(receipt: dict, public_key: dict | None = None, fingerprint: str | None = None) -> dict:
    """Check a receipt with public keys only; returns its statement or raises IntegrityError.

    ``public_key`` (a public-key document) pins every key; ``fingerprint`` pins the
    seed-derived keys and trusts the SLH-DSA endorsement. With neither, the receipt is checked
    against the keys it carries and the caller must compare the returned fingerprint.
    """
    if receipt.get("format") != FORMAT or receipt.get("version") != 1:
        raise IntegrityError("not a vaultfs receipt (format/version)")
    statement, keys, sig = (receipt.get(f) for f in ("statement", "public_keys", "signature"))
    try:
        if not all(isinstance(x, dict) for x in (statement, keys, sig)):
            raise TypeError
        vault_id = bytes.fromhex(keys["vault_id"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(
            "receipt is missing fields (statement, public_keys, signature)"
        ) from None
    param = ALGORITHMS.get(str(sig.get("algorithm")))
    if param is None:
        raise IntegrityError(f"unknown receipt signature algorithm {sig.get('algorithm')!r}")
    slh = slhdsa_field(param)
    mpk = _unb64(keys.get("mldsa65"), "mldsa65")
    epk = _unb64(keys.get("ed25519"), "ed25519")
    spk = _unb64(keys.get(slh), slh)
    fp = fingerprint_of(vault_id, mpk, epk)
    if public_key is not None:
        for field in ("vault_id", "mldsa65", "ed25519", slh):
            if public_key.get(field) != keys.get(field):
                raise IntegrityError(
                    f"the receipt is signed by other keys than the given public key ({field})"
                )
    if fingerprint is not None and fingerprint.strip().lower() != fp:
        raise IntegrityError(f"the receipt is signed by vault {fp}, not by {fingerprint}")
    if statement.get("fingerprint") != fp or statement.get("vault_id") != vault_id.hex():
        raise IntegrityError("the receipt's statement names another vault than its keys")
    try:
        mkey = mldsa.MLDSA65PublicKey.from_public_bytes(mpk)
        ekey = ed25519.Ed25519PublicKey.from_public_bytes(epk)
    except ValueError:
        raise IntegrityError("receipt public keys are malformed") from None
    endorse = ENDORSE_LABEL + vault_id + spk
    msg = RECEIPT_LABEL + canonical(statement)
    try:
        e = _unb64(keys.get("slhdsa_endorsement"), "slhdsa_endorsement")
        mkey.verify(e[:-64], endorse)
        ekey.verify(e[-64:], endorse)
        mkey.verify(_unb64(sig.get("mldsa65"), "mldsa65"), msg)
        ekey.verify(_unb64(sig.get("ed25519"), "ed25519"), msg)
    except InvalidSignature:
        raise IntegrityError("receipt signature does not verify: it was altered") from None
    verify_slhdsa(spk, msg, _unb64(sig.get("slhdsa"), "slhdsa"), param)
    return statement


def rollback_anchor(path: Path, keys: VaultKeys) -> tuple[int, Link | None]:
    """The rollback floor the receipt at ``path`` sets for a restore or a home rebuild from
    the remotes (``--receipt``): (its manifest seq, its manifest link if it names the hash).
    The receipt must verify and be signed by this vault's keys (IntegrityError otherwise;
    InputError when it names no usable manifest)."""
    statement = verify(load_json(path, "receipt"))
    if statement.get("fingerprint") != keys.fingerprint():
        raise IntegrityError(
            f"the receipt {path} is signed by another vault ({statement.get('fingerprint')})"
        )
    seq = statement.get("manifest_seq")
    if type(seq) is not int or seq < 0:
        raise InputError(f"the receipt {path} names no manifest_seq")
    h = statement.get("manifest_hash")
    try:
        return seq, Link(seq, bytes.fromhex(h)) if isinstance(h, str) and len(h) == 64 else None
    except ValueError:
        raise InputError(f"the receipt {path} has a malformed manifest_hash") from None
