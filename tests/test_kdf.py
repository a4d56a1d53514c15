"""The keyfile's scrypt: libsodium's (PyNaCl) and OpenSSL's give RFC 7914's answers."""

from __future__ import annotations

import hashlib

import pytest

from vaultfs import kdf

# RFC 7914, section 12 (the first 32 bytes: scrypt's output is PBKDF2's, so a 32-byte
# output is the 64-byte one's first half)
RFC7914 = [
    ("", b"", 16, 1, 1, "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"),
    ("password", b"NaCl", 1024, 8, 16, "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"),
]  # fmt: skip


@pytest.mark.parametrize(("pw", "salt", "n", "r", "p", "want"), RFC7914)
def test_scrypt_gives_rfc7914s_answers(
    pw: str, salt: bytes, n: int, r: int, p: int, want: str
) -> None:
    assert kdf._sodium_scrypt() is not None, "PyNaCl is a dependency (pyproject.toml)"
    assert kdf.scrypt(pw, salt, n, r, p).hex() == want


def test_scrypt_equals_openssls_at_the_keyfile_parameters() -> None:
    pw, salt = "corrëct horse", bytes(range(16))
    want = hashlib.scrypt(pw.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32, maxmem=1 << 26)
    assert kdf.scrypt(pw, salt, 2**14, 8, 1) == want


def test_scrypt_without_libsodium_is_openssls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdf, "_sodium_scrypt", lambda: None)
    for pw, salt, n, r, p, want in RFC7914:
        assert kdf.scrypt(pw, salt, n, r, p).hex() == want


def test_parameters_neither_takes_raise_valueerror() -> None:
    with pytest.raises(ValueError):
        kdf.scrypt(
            "pw", b"salt", 3, 8, 1
        )  # N not a power of two: libsodium skipped, OpenSSL refuses
