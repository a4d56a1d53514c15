"""The keyfile's passphrase KDF (scrypt), with an optional head start.

Unlocking the keyfile costs one scrypt (N=2^17, r=8: ~0.35 s of one core) and starting the
command line costs about as much in imports. scrypt (libsodium's or OpenSSL's, :func:`scrypt`)
releases the GIL, so the command line starts it on a thread *before* importing the rest
(:func:`prefetch`), and :func:`derive` takes the result when the same keyfile, salt,
parameters and passphrase are asked for. This module imports only the standard library (and
PyNaCl's scrypt, on the thread that runs it), so it can run first.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

#: Largest scrypt memory (128·r·N bytes) a keyfile may ask for: a hostile keyfile cannot make
#: the unlock, or its head start here, allocate more (the default parameters take 128 MiB).
MAX_MEM = 1 << 30

_pending: dict[tuple, Future] = {}
_lock = threading.Lock()


def normalize(passphrase: str) -> str:
    """The form a passphrase is sealed and unsealed in: Unicode NFC, so "é" typed as one code
    point or as "e" + combining accent opens the same keyfile (docs/keys.md)."""
    return unicodedata.normalize("NFC", passphrase)


def scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The 32-byte key-encryption key scrypt(passphrase, salt, N, r, p) (RFC 7914).

    libsodium's scrypt (through PyNaCl: SIMD Salsa20/8, ~25 % less time than OpenSSL's at
    the default N=2^17, r=8, and it too runs without the GIL) when it takes the parameters,
    else OpenSSL's (:mod:`hashlib`); both compute the same function (RFC 7914's vectors in
    tests/test_kdf.py). ``maxmem`` allows the 128·r·N bytes it needs. Raises ValueError for
    parameters OpenSSL refuses."""
    maxmem = 128 * r * n + (1 << 24)
    sodium = _sodium_scrypt()
    if sodium is not None and n > 1 and n & (n - 1) == 0 and r * p < 1 << 30:
        try:
            return sodium(passphrase.encode(), salt, n, r, p, 32, maxmem=maxmem)
        except Exception:  # noqa: BLE001 - libsodium refused them: OpenSSL decides below
            pass
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=maxmem)


def _sodium_scrypt() -> Callable[..., bytes] | None:
    """PyNaCl's binding of libsodium's scrypt, or None when PyNaCl is not installed."""
    try:
        from nacl.bindings import crypto_pwhash_scryptsalsa208sha256_ll
    except ImportError:
        return None
    return crypto_pwhash_scryptsalsa208sha256_ll


def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> tuple:
    # the passphrase itself is not kept as a dictionary key
    return (hashlib.sha256(passphrase.encode()).digest(), salt, n, r, p)


def derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt, or the result of a matching :func:`prefetch` (waiting for it if needed)."""
    with _lock:
        fut = _pending.pop(_key(passphrase, salt, n, r, p), None)
    if fut is not None:
        try:
            return fut.result()
        except ValueError:
            pass  # computed again below, to raise in this thread
    return scrypt(passphrase, salt, n, r, p)


def prefetch(keyfile: Path, passphrase: str) -> Future | None:
    """Start deriving the key-encryption key of ``keyfile`` for the NFC form of
    ``passphrase`` (:func:`normalize`) on a daemon thread; returns its future. Does nothing
    (None) when the file is missing or not a scrypt keyfile (the real unlock reports that)."""
    import base64
    import binascii

    try:
        doc = json.loads(Path(keyfile).read_text())
        kdf = doc["kdf"]
        if kdf.get("name") != "scrypt":
            return None
        salt = base64.b64decode(doc["salt"])
        params = (int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
        binascii.Error,
    ):
        return None
    if 128 * params[0] * params[1] > MAX_MEM:
        return None  # the real unlock refuses it
    passphrase = normalize(passphrase)
    fut: Future = Future()
    with _lock:
        _pending[_key(passphrase, salt, *params)] = fut

    def run() -> None:
        try:
            fut.set_result(scrypt(passphrase, salt, *params))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, name="vaultfs-scrypt", daemon=True).start()
    return fut
