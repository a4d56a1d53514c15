"""The keyfile authenticates its own policy (docs/keys.md §2): version 2 binds the scrypt
parameters into the seal's associated data and MACs the policy (KDF parameters, retired
suites, SLH-DSA parameter set) under a key from the seed, and the MAC is required. Version 1
keyfiles still open. Passphrases are NFC-normalised; weak new ones are warned about; secrets
in the environment never reach a child process."""

from __future__ import annotations

import base64
import json
import os
import stat
import unicodedata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from helpers import PASSPHRASE, rclone_path, run_cli, vaultfs_env

from vaultfs import kdf
from vaultfs.errors import InputError, IntegrityError, WrongKey
from vaultfs.keys import (
    KEYFILE_VERSION,
    SCRYPT_MAX_MEM,
    VaultKeys,
    read_keyfile,
    update_keyfile_policy,
    write_keyfile,
)
from vaultfs.vault import Vault

SEED = bytes(range(32))
COMPOSED = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"  # NFC
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)


def _keys(retired: set[int] | None = None) -> VaultKeys:
    keys = VaultKeys.from_seed(SEED)
    keys.retired_suites = set(retired or ())
    return keys


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _v1_keyfile(path: Path, keys: VaultKeys, passphrase: str, policy: bool = True) -> None:
    """A keyfile as version 1 wrote it: the raw passphrase, no KDF in the associated data."""
    salt, nonce = b"s" * 16, b"n" * 12
    kek = kdf.scrypt(passphrase, salt, 2**14, 8, 1)
    doc = {
        "format": "vaultfs-keyfile",
        "version": 1,
        "vault_id": keys.vault_id.hex(),
        "fingerprint": keys.fingerprint(),
        "kdf": {"name": "scrypt", "n": 2**14, "r": 8, "p": 1},
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "sealed_seed": base64.b64encode(
            AESGCM(kek).encrypt(nonce, keys.seed, b"vaultfs/v1/keyfile" + keys.vault_id)
        ).decode(),
    }
    if policy:
        pol = {"retired_suites": sorted(keys.retired_suites)}
        doc.update(policy=pol, policy_mac=keys.policy_mac(pol))
    path.write_text(json.dumps(doc))


def test_new_keyfiles_are_version_2_with_the_whole_policy_under_the_mac(tmp_path):
    kf = tmp_path / "key.json"
    write_keyfile(kf, _keys({2}), "pw")
    doc = json.loads(kf.read_text())
    assert doc["version"] == KEYFILE_VERSION == 2
    assert doc["policy"] == {
        "kdf": doc["kdf"],
        "retired_suites": [2],
        "slhdsa_param": None,
    }
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert read_keyfile(kf, "pw").retired_suites == {2}


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("policy"),  # deleting the list must not forget a retirement
        lambda d: d.pop("policy_mac"),
        lambda d: d["policy"].update(retired_suites=[]),
        lambda d: d["policy"].update(slhdsa_param="sha2-128s"),
        lambda d: d["policy"]["kdf"].update(n=2**14),
    ],
    ids=["no-policy", "no-mac", "unretire", "sig-param", "policy-kdf"],
)
def test_an_edited_policy_is_refused(tmp_path, change):
    kf = tmp_path / "key.json"
    write_keyfile(kf, _keys({2}), "pw")
    _edit(kf, change)
    with pytest.raises(IntegrityError, match="policy"):
        read_keyfile(kf, "pw")


def test_kdf_parameters_are_bound_and_version_cannot_be_downgraded(tmp_path):
    kf = tmp_path / "key.json"
    write_keyfile(kf, _keys({2}), "pw")
    good = kf.read_text()
    # the same parameters, spelt differently in the top-level section: not the sealed AD
    _edit(kf, lambda d: d["kdf"].update(extra=1))
    with pytest.raises((WrongKey, IntegrityError)):
        read_keyfile(kf, "pw")
    # relabelled version 1 (whose policy is optional) with the policy dropped
    kf.write_text(good)
    _edit(kf, lambda d: (d.update(version=1), d.pop("policy"), d.pop("policy_mac")))
    with pytest.raises(WrongKey):
        read_keyfile(kf, "pw")
    # a keyfile cannot ask for more scrypt memory than the stated bound
    kf.write_text(good)
    _edit(kf, lambda d: d["kdf"].update(n=SCRYPT_MAX_MEM // (128 * 8) * 2))
    with pytest.raises(InputError, match="out of range"):
        read_keyfile(kf, "pw")


def test_passphrases_are_nfc_normalised(tmp_path):
    kf = tmp_path / "key.json"
    write_keyfile(kf, _keys(), DECOMPOSED)
    assert read_keyfile(kf, COMPOSED).seed == SEED
    assert read_keyfile(kf, DECOMPOSED).seed == SEED


def test_version_1_keyfiles_open_with_the_raw_spelling_and_upgrade_on_rewrite(tmp_path):
    kf = tmp_path / "key.json"
    _v1_keyfile(kf, _keys({2}), DECOMPOSED)
    keys = read_keyfile(kf, DECOMPOSED)  # NFC first, then the raw spelling (version 1 only)
    assert keys.seed == SEED and keys.retired_suites == {2}
    update_keyfile_policy(kf, keys)  # no passphrase: stays version 1
    assert json.loads(kf.read_text())["version"] == 1
    write_keyfile(kf, keys, DECOMPOSED)  # `keys passwd` and friends re-seal: version 2
    assert json.loads(kf.read_text())["version"] == 2
    assert read_keyfile(kf, COMPOSED).retired_suites == {2}
    # a version-1 keyfile written before policies existed still opens
    _v1_keyfile(kf, _keys(), "pw", policy=False)
    assert read_keyfile(kf, "pw").retired_suites == set()


def test_a_replayed_older_keyfile_does_not_forget_a_retirement(tmp_path):
    """The index records retirements too (suites table); the vault takes the union."""
    home = tmp_path / "home"
    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    for r in remotes:
        os.mkdir(r)
    Vault.create(home, remotes, 2, 3, "pw").close()
    old = (home / "key.json").read_bytes()
    with Vault.open(home, "pw") as v:
        with v.index.tx() as db:
            db.execute("INSERT INTO suites VALUES (2, 'retired', 0)")
        v.reload_keys()
        update_keyfile_policy(home / "key.json", v.keys)
    assert read_keyfile(home / "key.json", "pw").retired_suites == {2}
    (home / "key.json").write_bytes(old)  # the attacker puts the older keyfile back
    assert read_keyfile(home / "key.json", "pw").retired_suites == set()
    with Vault.open(home, "pw", lock=False) as v:
        assert 2 in v.keys.retired_suites
        with pytest.raises(IntegrityError, match="retired"):
            v.keys.check_suite(2)


def test_the_keyfile_pins_the_slhdsa_parameter_set(tmp_path):
    home = tmp_path / "home"
    remotes = [str(tmp_path / f"r{i}") for i in range(3)]
    for r in remotes:
        os.mkdir(r)
    Vault.create(home, remotes, 2, 3, "pw").close()
    assert json.loads((home / "key.json").read_text())["policy"]["slhdsa_param"] == "sha2-128f"
    with Vault.open(home, "pw") as v, v.index.tx() as db:  # a downgraded local index
        db.execute("UPDATE settings SET value='sha2-128s' WHERE key='slhdsa_param'")
    with pytest.raises(IntegrityError, match="SLH-DSA"):
        Vault.open(home, "pw", lock=False)


def _fake_rclone(tmp_path: Path) -> tuple[Path, Path]:
    """An rclone that appends its environment's VAULTFS_* names to a file, then runs rclone."""
    seen = tmp_path / "child-env"
    fake = tmp_path / "rclone"
    fake.write_text(
        f"#!/bin/sh\nenv | grep '^VAULTFS_' | cut -d= -f1 >> {seen}\nexec {rclone_path()} \"$@\"\n"
    )
    fake.chmod(0o755)
    return fake, seen


def test_secrets_in_the_environment_do_not_reach_child_processes(tmp_path):
    fake, seen = _fake_rclone(tmp_path)
    home = tmp_path / "home"
    remotes = []
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        remotes += ["--remote", str(tmp_path / f"r{i}")]
    env = vaultfs_env(home, VAULTFS_RCLONE=str(fake), VAULTFS_RCD="0", VAULTFS_SEED=SEED.hex())
    run_cli("init", "-k", "1", "-n", "2", *remotes, home=home, env=env)
    run_cli("status", home=home, env=env)
    names = set(seen.read_text().split())
    assert "VAULTFS_RCLONE" in names  # the fake did see the environment
    assert not names & {"VAULTFS_PASSPHRASE", "VAULTFS_SEED", "VAULTFS_NEW_PASSPHRASE"}


def test_a_weak_new_passphrase_from_the_environment_warns_and_goes_on(tmp_path):
    for name, pw in (("a", "hunter2"), ("b", PASSPHRASE)):
        remotes = []
        for i in range(2):
            (tmp_path / f"{name}{i}").mkdir()
            remotes += ["--remote", str(tmp_path / f"{name}{i}")]
        res = run_cli("init", "-k", "1", "-n", "2", *remotes, home=tmp_path / name, passphrase=pw)
        assert ("passphrase is weak" in res.stderr.decode()) == (pw == "hunter2")


def test_a_weak_typed_passphrase_is_refused_without_i_know(monkeypatch):
    from cli import common

    monkeypatch.delenv("VAULTFS_PASSPHRASE", raising=False)
    monkeypatch.setattr(common, "secret", lambda name: None)
    monkeypatch.setattr(common.sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(common.typer, "prompt", lambda *a, **k: "hunter2")
    with pytest.raises(InputError, match="--i-know"):
        common.new_passphrase(False)
    assert common.new_passphrase(True) == "hunter2"
    monkeypatch.setattr(common.typer, "prompt", lambda *a, **k: "Tr0ub4dor&3 gallant")
    assert common.new_passphrase(False) == "Tr0ub4dor&3 gallant"


def test_version_2_opens_from_raw_primitives_as_format_md_says(tmp_path):
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    kf = tmp_path / "key.json"
    keys = _keys({3})
    write_keyfile(kf, keys, DECOMPOSED)
    doc = json.loads(kf.read_text())
    k = doc["kdf"]
    kek = hashlib.scrypt(
        COMPOSED.encode(),
        salt=base64.b64decode(doc["salt"]),
        n=k["n"],
        r=k["r"],
        p=k["p"],
        dklen=32,
        maxmem=1 << 28,
    )

    def canonical(o):
        return json.dumps(o, separators=(",", ":"), sort_keys=True).encode()

    ad = b"vaultfs/v2/keyfile" + bytes.fromhex(doc["vault_id"]) + canonical(k)
    seed = AESGCM(kek).decrypt(
        base64.b64decode(doc["nonce"]), base64.b64decode(doc["sealed_seed"]), ad
    )
    assert seed == SEED
    mac_key = HKDF(hashes.SHA256(), 32, b"vaultfs/v1", b"vaultfs/v1/keyfile-policy").derive(seed)
    mac = hmac.new(mac_key, canonical(doc["policy"]), "sha256").hexdigest()
    assert mac == doc["policy_mac"] and doc["policy"]["retired_suites"] == [3]
