"""`vaultfs keys …` through the real CLI: the recovery drill, typed recovery on a terminal,
rotation, passphrase change, `keys show` and `keys init` on a vault made without SLH-DSA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import init_local_vault

from vaultfs import manifest
from vaultfs.backends import open_backend
from vaultfs.index import Index
from vaultfs.keys import (
    SIG_MLDSA65_ED25519_SLHDSA,
    SIG_MLDSA65_ED25519_SLHDSA128F,
    SLHDSA_128F,
    SLHDSA_128S,
    read_keyfile,
    write_keyfile,
)

REPO = Path(__file__).resolve().parents[1]


def run(home: Path, *args: str, pw: str | None = "pw", check: bool = True, **env: str):
    e = {**os.environ, "VAULTFS_HOME": str(home), **env}
    e.pop("VAULTFS_PASSPHRASE", None)
    if pw is not None:
        e["VAULTFS_PASSPHRASE"] = pw
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vaultfs {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def make_tree(root: Path, seed: int) -> Path:
    src = root / "src"
    (src / "docs").mkdir(parents=True)
    (src / "blob.bin").write_bytes(os.urandom(1_500_000))
    (src / "docs" / "notes.txt").write_text("\n".join(f"belief {seed}-{i}" for i in range(20000)))
    return src


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.fixture
def vault(tmp_path: Path) -> dict:
    home, remotes = init_local_vault(tmp_path, 3, 5, passphrase="pw")
    src = make_tree(tmp_path, 1)
    run(home, "backup", str(src))
    return {"home": home, "remotes": remotes, "src": src, "tmp": tmp_path}


def test_drill_split_lose_everything_recover_restore(vault: dict) -> None:
    """Init, back up, split; delete the keyfile and all local state; recover from 3 shares;
    restore from 3 of the 5 remotes onto an empty machine: byte-identical."""
    home, tmp = vault["home"], vault["tmp"]
    fp = json.loads(run(home, "status", "--json").stdout)["fingerprint"]
    shares = tmp / "shares"
    res = json.loads(
        run(
            home,
            "keys",
            "split",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out-dir",
            str(shares),
            "--json",
        ).stdout
    )
    assert res["fingerprint"] == fp and len(res["files"]) == 5
    for f in res["files"]:
        text = Path(f).read_text()
        assert f"vault fingerprint: {fp}" in text
        assert oct(Path(f).stat().st_mode & 0o777) == "0o600"
    shutil.rmtree(home)  # keyfile, index, queue: all gone
    new_home = tmp / "new-machine"
    few = run(
        new_home,
        "keys",
        "recover",
        "--share-file",
        res["files"][0],
        "--share-file",
        res["files"][2],
        pw="new pass",
        check=False,
    )
    assert few.returncode == 19 and "needs 3" in few.stderr
    assert not (new_home / "key.json").exists()
    rec = run(
        new_home, "keys", "recover",
        "--share-file", res["files"][4], "--share-file", res["files"][0], "--share-file", res["files"][2],
        pw="new pass",
    )  # fmt: skip
    assert fp in rec.stdout and (new_home / "key.json").exists()
    out = tmp / "restored"
    r = vault["remotes"]
    run(new_home, "restore", "--from", str(r[1]), "--from", str(r[3]), "--from", str(r[4]), "--to", str(out), pw="new pass")  # fmt: skip
    same_tree(vault["src"], out / "src")


def test_typed_recovery_on_a_terminal(vault: dict) -> None:
    """No --share-file: the shares are typed; a mistyped word is named and retyped."""
    home, tmp = vault["home"], vault["tmp"]
    res = json.loads(
        run(home, "keys", "split", "--shares", "3", "--threshold", "2", "--json").stdout
    )
    words = res["mnemonics"]
    typo = words[0].split()
    typo[4] = typo[4] + "s" if typo[4] + "s" not in words[0] else typo[4][:-1]
    new_home = tmp / "typed-home"
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    e = {**os.environ, "VAULTFS_HOME": str(new_home), "VAULTFS_PASSPHRASE": "typed pass"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "keys", "recover"],
        cwd=REPO, env=e, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(slave)
    try:
        for line in (" ".join(typo), words[0], words[2]):
            os.write(master, (line + "\n").encode())
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "word 5" in stderr and "try again" in stderr
    assert read_keyfile(new_home / "key.json", "typed pass").fingerprint() == res["fingerprint"]


def test_rotate_passwd_show(vault: dict) -> None:
    home, tmp, remotes = vault["home"], vault["tmp"], vault["remotes"]
    rot = json.loads(run(home, "keys", "rotate", "--json").stdout)
    assert rot["epoch"] == 1 and rot["complete"]
    later = tmp / "later"
    later.mkdir()
    (later / "after-rotation.bin").write_bytes(os.urandom(300_000))
    run(home, "backup", str(later))
    show = json.loads(run(home, "keys", "show", "--json").stdout)
    assert show["epoch"] == 1 and show["suite"] == 1
    segs = {e["epoch"]: e["data_segments"] for e in show["epochs"]}
    assert segs[0] > 0 and segs[1] > 0  # old data kept under epoch 0, new data under epoch 1
    assert show["public_keys"]["slhdsa_sha2_128f"]  # new vaults: SLH-DSA-SHA2-128f
    assert all("newest placed: #" in c["what"] for c in show["keyring_copies"][2:])
    # both epochs restore from remotes alone (the keyring travels in the manifest)
    out = tmp / "out"
    run(tmp / "elsewhere", "restore", "--keyfile", str(home / "key.json"),
        "--from", str(remotes[0]), "--from", str(remotes[2]), "--from", str(remotes[4]),
        "--snapshot", "latest", "--to", str(out))  # fmt: skip
    assert (out / "later" / "after-rotation.bin").read_bytes() == (
        later / "after-rotation.bin"
    ).read_bytes()
    old = tmp / "out-old"
    first = json.loads(run(home, "snapshots", "--json").stdout)[0]["id"]
    run(home, "restore", "--snapshot", first, "--to", str(old))
    same_tree(vault["src"], old / "src")
    # passwd: the old passphrase stops working, the new one works, the seed is unchanged
    run(home, "keys", "passwd", VAULTFS_NEW_PASSPHRASE="correct horse")
    bad = run(home, "status", check=False)
    assert bad.returncode == 10 and "wrong passphrase" in bad.stderr
    assert run(home, "status", "--json", pw="correct horse").returncode == 0
    assert read_keyfile(home / "key.json", "correct horse").fingerprint() == show["fingerprint"]


def test_keys_init_upgrades_a_vault_without_slhdsa(vault: dict) -> None:
    """A vault from before SLH-DSA: `keys init` creates the key; manifests then carry it."""
    home, remotes = vault["home"], vault["remotes"]
    idx = Index(home / "index.db")
    try:
        with idx.tx() as db:
            db.execute(
                "DELETE FROM settings WHERE key IN ('slhdsa_public', 'slhdsa_sealed', 'slhdsa_param')"
            )
    finally:
        idx.close()
    res = json.loads(run(home, "keys", "init", "--json").stdout)
    assert res["slhdsa_created"] is True
    again = json.loads(run(home, "keys", "init", "--json").stdout)
    assert again["slhdsa_created"] is False
    keys = read_keyfile(home / "key.json", "pw")
    r = open_backend(str(remotes[0]))
    newest = sorted(r.list("manifests"))[-1]
    m = manifest.decode(keys, r.cat("manifests", newest))
    assert m.sig_alg == SIG_MLDSA65_ED25519_SLHDSA128F and m.body["slhdsa_sealed"]
    # seed + remotes recover the SLH-DSA secret key: it is sealed in the manifest body
    keys.load_slhdsa(
        bytes.fromhex(m.body["slhdsa_public"]), bytes.fromhex(m.body["slhdsa_sealed"]), SLHDSA_128F
    )
    assert len(keys.sign_slhdsa(b"x")) == 17088
    # the seed's spelling: a vault whose keyfile is gone gets one back from the hex seed
    shown = run(home, "keys", "show", "--reveal-seed")
    line = next(ln for ln in shown.stdout.splitlines() if ln.startswith("master seed: "))
    assert line.removeprefix("master seed: ").replace(" ", "") == keys.seed.hex()
    seed_file = vault["tmp"] / "seed.txt"
    seed_file.write_text(line.removeprefix("master seed: ") + "\n")  # written down by hand
    (home / "key.json").unlink()
    assert run(home, "status", check=False).returncode != 0
    res = json.loads(
        run(home, "keys", "init", "--seed-file", str(seed_file), "--json", pw="pw2").stdout
    )
    assert res["keyfile"] == str(home / "key.json") and res["slhdsa_created"] is False
    assert (
        json.loads(run(home, "status", "--json", pw="pw2").stdout)["fingerprint"]
        == keys.fingerprint()
    )
    other = vault["tmp"] / "other-seed.txt"
    other.write_text("ab" * 32)
    res = run(home, "keys", "init", "--seed-file", str(other), "--force", check=False)
    assert res.returncode == 10 and "belongs to vault id" in res.stderr


def test_a_vault_with_an_older_128s_key_keeps_it(vault: dict) -> None:
    """A vault made before SLH-DSA-SHA2-128f became the default (its key is 128s, the index
    has no slhdsa_param) keeps signing with algorithm 2, and restores from remotes alone."""
    home, remotes, tmp = vault["home"], vault["remotes"], vault["tmp"]
    keys = read_keyfile(home / "key.json", "pw")
    keys.generate_slhdsa(SLHDSA_128S)
    assert keys.slhdsa_public is not None
    idx = Index(home / "index.db")
    try:
        with idx.tx() as db:
            for key, value in (
                ("slhdsa_public", keys.slhdsa_public.hex()),
                ("slhdsa_sealed", keys.seal_slhdsa_secret().hex()),
            ):
                db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
            db.execute("DELETE FROM settings WHERE key='slhdsa_param'")
    finally:
        idx.close()
    write_keyfile(home / "key.json", keys, "pw")  # its keyfile's policy names 128s too
    more = tmp / "more"
    more.mkdir()
    (more / "late.bin").write_bytes(os.urandom(200_000))
    run(home, "backup", str(more))
    r = open_backend(str(remotes[1]))
    newest = sorted(r.list("manifests"))[-1]
    m = manifest.decode(read_keyfile(home / "key.json", "pw"), r.cat("manifests", newest))
    assert m.sig_alg == SIG_MLDSA65_ED25519_SLHDSA
    assert m.body["slhdsa_public"] == keys.slhdsa_public.hex()
    show = json.loads(run(home, "keys", "show", "--json").stdout)
    assert show["public_keys"]["slhdsa_sha2_128s"] == keys.slhdsa_public.hex()
    out = tmp / "out128s"
    run(tmp / "empty-home", "restore", "--keyfile", str(home / "key.json"),
        "--from", str(remotes[1]), "--from", str(remotes[3]), "--from", str(remotes[4]),
        "--to", str(out))  # fmt: skip
    assert (out / "more" / "late.bin").read_bytes() == (more / "late.bin").read_bytes()
