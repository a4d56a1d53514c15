"""Signed receipts through the CLI, checked with only the public key; tampering fails, and a
tampered manifest on the remotes fails verification."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import init_local_vault

from vaultfs import receipt as receipts
from vaultfs.errors import IntegrityError

REPO = Path(__file__).resolve().parents[1]


def run(home: Path, *args: str, pw: str | None = "pw", check: bool = True):
    e = {**os.environ, "VAULTFS_HOME": str(home)}
    e.pop("VAULTFS_PASSPHRASE", None)
    if pw is not None:
        e["VAULTFS_PASSPHRASE"] = pw
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO, env=e, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"vaultfs {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def init_vault(tmp: Path, name: str, n_remotes: int = 3) -> tuple[Path, list[Path]]:
    home, remotes = init_local_vault(
        tmp, remotes=n_remotes, prefix=f"{name}-r", home=tmp / f"{name}-home", segment_mib=None,
        passphrase="pw",
    )  # fmt: skip
    src = tmp / f"{name}-src"
    src.mkdir()
    (src / "kb.sql").write_text(
        "".join(f"INSERT INTO beliefs VALUES ({i});\n" for i in range(5000))
    )
    run(home, "backup", "--name", "nightly", str(src))
    return home, remotes


def test_receipt_signed_and_checked_with_only_the_public_key(tmp_path: Path) -> None:
    home, remotes = init_vault(tmp_path, "a")
    snap = json.loads(run(home, "snapshots", "--json").stdout)[0]
    rfile, pub = tmp_path / "receipt.json", tmp_path / "vault.pub.json"
    run(home, "receipt", "nightly", "--out", str(rfile))
    run(home, "keys", "public", "--out", str(pub))
    doc = json.loads(rfile.read_text())
    st = doc["statement"]
    assert st["snapshot"] == snap["id"] and st["files"] == snap["entries"]
    assert st["redundancy"]["k"] == 2 and st["redundancy"]["n"] == 3
    assert st["redundancy"]["survives_losses_now"] == 1
    assert [r["remote"] for r in st["remotes"]] == [str(r) for r in remotes]
    assert all(r["manifest_placed"] for r in st["remotes"])
    assert len(st["snapshot_root"]) == 64

    # a verifier has no vault, no keyfile, no passphrase: only the receipt and the public key
    nobody = tmp_path / "auditor"
    ok = run(nobody, "receipt", "verify", str(rfile), "--public-key", str(pub), pw=None)
    assert f"snapshot {snap['id']}" in ok.stdout and st["fingerprint"] in ok.stdout
    fp_ok = run(
        nobody, "receipt", "verify", str(rfile), "--fingerprint", st["fingerprint"], pw=None
    )
    assert "valid receipt" in fp_ok.stdout

    def verify_altered(change, *extra: str) -> subprocess.CompletedProcess:
        bad = json.loads(rfile.read_text())
        change(bad)
        p = tmp_path / "altered.json"
        p.write_text(json.dumps(bad))
        return run(nobody, "receipt", "verify", str(p), *extra, pw=None, check=False)

    def flip_sig(field: str):
        def change(d: dict) -> None:
            raw = bytearray(base64.b64decode(d["signature"][field]))
            raw[len(raw) // 2] ^= 1
            d["signature"][field] = base64.b64encode(bytes(raw)).decode()

        return change

    cases = {
        "more bytes claimed": lambda d: d["statement"].update(bytes=d["statement"]["bytes"] + 1),
        "other root": lambda d: d["statement"].update(snapshot_root="00" * 32),
        "extra remote": lambda d: d["statement"]["remotes"].append({"remote": "/x"}),
        "ML-DSA signature": flip_sig("mldsa65"),
        "Ed25519 signature": flip_sig("ed25519"),
        "SLH-DSA signature": flip_sig("slhdsa"),
    }
    for what, change in cases.items():
        res = verify_altered(change, "--public-key", str(pub))
        assert res.returncode == 12, (what, res.stdout, res.stderr)
        assert "does not verify" in res.stderr or "altered" in res.stderr, what

    # pinning: another vault's public key or fingerprint is refused
    other_home, _ = init_vault(tmp_path, "b")
    other_pub = tmp_path / "other.pub.json"
    run(other_home, "keys", "public", "--out", str(other_pub))
    res = run(
        nobody,
        "receipt",
        "verify",
        str(rfile),
        "--public-key",
        str(other_pub),
        pw=None,
        check=False,
    )
    assert res.returncode == 12 and "other keys" in res.stderr
    other_fp = json.loads(other_pub.read_text())["fingerprint"]
    res = run(
        nobody, "receipt", "verify", str(rfile), "--fingerprint", other_fp, pw=None, check=False
    )
    assert res.returncode == 12 and f"not by {other_fp}" in res.stderr
    # a receipt whose embedded keys were swapped for the other vault's: signatures fail
    swapped = json.loads(rfile.read_text())
    swapped["public_keys"] = json.loads(other_pub.read_text())
    with pytest.raises(IntegrityError):
        receipts.verify(swapped)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    res = run(nobody, "receipt", "verify", str(garbage), pw=None, check=False)
    assert res.returncode == 18 and "not JSON" in res.stderr


def test_tampered_manifest_on_the_remotes_fails_verification(tmp_path: Path) -> None:
    home, remotes = init_vault(tmp_path, "m")
    for r in remotes:  # flip one byte in the signed body of every copy of the manifest
        for f in (r / "manifests").iterdir():
            raw = bytearray(f.read_bytes())
            raw[60] ^= 0x01
            f.write_bytes(bytes(raw))
    res = run(tmp_path / "empty", "restore", "--keyfile", str(home / "key.json"),
              "--from", str(remotes[0]), "--from", str(remotes[1]),
              "--to", str(tmp_path / "out"), check=False)  # fmt: skip
    assert res.returncode == 12, res.stderr
    assert "no validly signed manifest" in res.stderr and "does not verify" in res.stderr
    assert not (tmp_path / "out").exists()


def test_receipts_name_the_slhdsa_parameter_set_and_older_128s_keys_still_sign(
    tmp_path: Path,
) -> None:
    """A receipt says which SLH-DSA parameter set signed it (the algorithm string and the
    public key's field); one made with an older SHA2-128s key verifies as well, and claiming
    the other parameter set fails."""
    from vaultfs.keys import SLHDSA_128S
    from vaultfs.vault import Vault

    home, _remotes = init_vault(tmp_path, "p")
    v = Vault.open(home, "pw")
    try:
        new = receipts.make(v, "latest")
        v.keys.generate_slhdsa(SLHDSA_128S)  # as a vault made before 128f was the default
        old = receipts.make(v, "latest")
    finally:
        v.close()
    assert new["signature"]["algorithm"].endswith("SLH-DSA-SHA2-128f")
    assert new["public_keys"]["slhdsa_sha2_128f"] and "slhdsa_sha2_128s" not in new["public_keys"]
    assert old["signature"]["algorithm"].endswith("SLH-DSA-SHA2-128s")
    assert old["public_keys"]["slhdsa_sha2_128s"]
    for doc in (new, old):
        assert receipts.verify(doc)["snapshot"] == doc["statement"]["snapshot"]
    swapped = json.loads(json.dumps(old))
    swapped["signature"]["algorithm"] = new["signature"]["algorithm"]
    swapped["public_keys"]["slhdsa_sha2_128f"] = swapped["public_keys"].pop("slhdsa_sha2_128s")
    with pytest.raises(IntegrityError):
        receipts.verify(swapped)


def test_a_receipt_for_a_name_several_snapshots_share_says_which_it_signed(
    tmp_path: Path,
) -> None:
    """`receipt NAME` over two snapshots named alike signs the newest, as `ls` and `restore`
    read it, and says so on stderr with the other id (it used to pick one silently)."""
    home, _ = init_vault(tmp_path, "a")
    (tmp_path / "a-src" / "more.txt").write_text("second")
    run(home, "backup", "--name", "nightly", str(tmp_path / "a-src"))
    ids = [s["id"] for s in json.loads(run(home, "snapshots", "--json").stdout)]
    assert len(ids) == 2
    proc = run(home, "receipt", "nightly")
    assert json.loads(proc.stdout)["statement"]["snapshot"] == ids[1]
    note = " ".join(proc.stderr.split())
    assert f"2 snapshots are named 'nightly': using the newest, {ids[1]}" in note, note
    assert ids[0] in note, note
    proc = run(home, "receipt", ids[0])
    assert json.loads(proc.stdout)["statement"]["snapshot"] == ids[0]
    assert "snapshots are named" not in proc.stderr, proc.stderr
