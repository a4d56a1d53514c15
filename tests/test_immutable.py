"""Immutable (append-only) vaults: no command asks a remote to delete, move or overwrite an
object (a recording backend under every remote proves it), prune refuses, repair places its
replacement under a new name and keeps the old object; and the ransomware test: remotes made
write-once on the "server" side (``chattr``) survive a process with the vault's credentials
that deletes and overwrites everything it can, and every snapshot still restores
(docs/operations.md and docs/threat-model.md, "Immutable vaults")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import PASSPHRASE, init_local_vault, rclone_path, remote_args, run_cli, tree_digest
from s3lock import ADMIN_ACCESS_KEY, LockingGateway, TwoKeyS3Server

from vaultfs import backends, objectlock, rotation
from vaultfs import repair as repair_mod
from vaultfs import verify as verify_mod
from vaultfs.errors import ImmutableVault, InputError
from vaultfs.keys import SUITE_MLKEM1024_AES256GCM
from vaultfs.prune import prune
from vaultfs.vault import Vault

WRITES = ("put_bytes", "put_file", "move_dir")
REMOVALS = ("delete", "quarantine")


class Recording(backends.Wrapper):
    """Records every call that reaches the remote: (method, its first two arguments)."""

    def __init__(self, inner: backends.Backend, calls: list[tuple[str, Any, Any]]) -> None:
        super().__init__(inner)
        self.calls = calls

    def _op(self, fn, *args):
        self.calls.append((fn.__name__, *(list(args) + [None, None])[:2]))
        return fn(*args)


def _objects(remotes: list[Path]) -> dict[str, bytes]:
    return {
        str(p.relative_to(r.parent)): p.read_bytes()
        for r in remotes
        for p in sorted(r.rglob("*"))
        if p.is_file()
    }


def _make(tmp: Path, backups: int) -> tuple[Path, list[Path], Path, list[dict]]:
    """An immutable 3-of-5 vault over local directories after ``backups`` backups of a tree
    that changes between them; returns (home, remotes, source, each backup's tree digest)."""
    home, remotes = init_local_vault(tmp, 3, 5, "--immutable", prefix="remote")
    src = tmp / "src"
    src.mkdir()
    trees = []
    for i in range(backups):
        (src / f"part{i}.bin").write_bytes(os.urandom(700_000))
        (src / "notes.txt").write_text(f"version {i}\n" * 1000)
        run_cli("backup", str(src), "--name", f"b{i}", home=home)
        trees.append(tree_digest(src))
    return home, remotes, src, trees


def test_a_missing_object_of_an_immutable_vault_comes_back_under_a_new_name(
    tmp_path: Path,
) -> None:
    """Elsewhere repair writes a missing object back to its remote under its own name (the
    same bytes); in an immutable vault it never names an object twice: "missing" may be a
    listing that left the object out, and a write-once remote refuses the name again (the
    upload would fail for good). The replacement gets a new name; the audit is clean."""
    home, remotes, _src, _trees = _make(tmp_path, 1)
    lost = sorted(p.name for p in (remotes[1] / "data").iterdir())
    for name in lost:
        (remotes[1] / "data" / name).unlink()
    with Vault.open(home, PASSPHRASE) as v:
        rep = repair_mod.repair(v)
        items = [it for it in rep.items if it.kind == "data"]
        assert rep.ok and len(items) == len(lost)
        assert all(it.new != it.old for it in items)
        assert not set(lost) & {p.name for p in (remotes[1] / "data").iterdir()}
        assert verify_mod.audit(v, mode="read-all").clean


def test_immutable_vault_never_deletes_or_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, remotes, src, trees = _make(tmp_path, 4)
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["immutable"] is True
    # more commits than the index copies a vault keeps: every manifest is still on every remote
    for r in remotes:
        assert len(list((r / "manifests").iterdir())) >= 4
    # --prune is refused before anything is forgotten; plain forget drops index rows only
    res = run_cli("forget", "--keep-last", "1", "--prune", home=home, check=23)
    assert b"without --prune" in res.stderr
    assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 4
    res = run_cli("forget", "--keep-last", "1", home=home)
    assert b"keep every object" in res.stdout and b"vaultfs prune" not in res.stdout
    res = run_cli("prune", home=home, check=23)
    assert b"immutable" in res.stderr

    calls: list[tuple[str, Any, Any]] = []
    plain_stack = backends.stack
    monkeypatch.setattr(
        backends, "stack",
        lambda base, wrap=None, pace=None: plain_stack(
            base, lambda b: Recording(wrap(b) if wrap else b, calls), pace
        ),
    )  # fmt: skip
    victim = next((remotes[0] / "data").iterdir())
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 0xFF  # bit rot on one shard object
    victim.write_bytes(bytes(blob))
    before = _objects(remotes)
    with Vault.open(home, PASSPHRASE) as v:
        with pytest.raises(ImmutableVault):
            prune(v)
        assert not verify_mod.audit(v, mode="read-all").clean  # finds the rot
        rep = repair_mod.repair(v)
        assert rep.rebuilt == 1 and rep.deleted == [] and rep.quarantined == []
        assert rep.retained == [f"data/{victim.name}"]
        re = rotation.reencrypt(v, SUITE_MLKEM1024_AES256GCM)
        assert re.rewritten > 0 and (re.garbage_deleted, re.garbage_left) == (0, 0)
        audit = verify_mod.audit(v, mode="read-all")
        assert audit.clean
    # local directories report no object lock: said plainly, not taken for a lock
    assert all(r.locked is False and "no object lock" in (r.lock or "") for r in audit.remotes)
    assert calls and not [c for c in calls if c[0] in REMOVALS]
    written = [c for c in calls if c[0] in WRITES]
    assert written  # repair and re-encryption uploaded, each object under a new name
    after = _objects(remotes)
    assert {p: b for p, b in after.items() if p in before} == before  # nothing changed or gone
    assert len(after) > len(before)
    restored = tmp_path / "restored"
    run_cli("restore", "--to", str(restored), home=home)
    assert tree_digest(restored / "src") == trees[-1]


def test_object_lock_read_back_from_an_s3_listing() -> None:
    now = datetime(2026, 12, 6, tzinfo=UTC)
    meta = {
        "object-lock-mode": "COMPLIANCE",
        "object-lock-retain-until-date": "2027-12-06T00:00:00Z",
    }
    listing = [
        {"Name": "0000000000000001-aa", "Metadata": meta},
        {"Name": "0000000000000002-bb", "Metadata": {**meta, "object-lock-mode": "GOVERNANCE"}},
    ]
    st = objectlock.parse(listing, now)
    assert st.ok and st.locked == 2 and st.modes == ["COMPLIANCE", "GOVERNANCE"]
    assert st.until is not None and st.until.startswith("2027-12-06")
    expired = {**meta, "object-lock-retain-until-date": "2026-01-01T00:00:00Z"}
    listing += [{"Name": "old", "Metadata": expired}, {"Name": "plain", "Metadata": {"mtime": "x"}}]
    st = objectlock.parse(listing, now)
    assert not st.ok and sorted(st.unlocked) == ["old", "plain"] and "2 of 4" in st.summary()
    assert "ended 2026-01-01" in st.unlocked["old"]
    assert not objectlock.parse([], now).ok
    # held to a retention: a lock shorter than 1y from the upload (btime) is short, one
    # within a day of it is not (the uploader's clock and the server's may differ)
    up = {"btime": "2026-12-01T00:00:00Z"}
    full = {**meta, **up, "object-lock-retain-until-date": "2027-11-30T12:00:00Z"}
    brief = {**meta, **up, "object-lock-retain-until-date": "2027-01-01T00:00:00Z"}
    st = objectlock.parse(
        [{"Path": "data/a", "Metadata": full}, {"Path": "data/b", "Metadata": brief}], now, "1y"
    )
    assert st.locked == 1 and list(st.short) == ["data/b"] and "retention 1y" in st.short["data/b"]
    assert objectlock.parse([{"Path": "data/b", "Metadata": brief}], now, "").ok
    spec = ":s3,provider=Rclone,object_lock_mode=COMPLIANCE,object_lock_retain_until_date=30d:b/v"
    assert objectlock.wanted(spec) == "30d"
    assert objectlock.wanted(":s3,object_lock_mode=GOVERNANCE:b") == ""
    assert objectlock.wanted(":s3,provider=AWS:b") is None and objectlock.wanted("/x") is None


def test_lock_spec_adds_object_lock_to_s3_remotes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "rclone.conf"
    conf.write_text("[mys3]\ntype = s3\nprovider = AWS\n\n[nas]\ntype = sftp\nhost = h\n")
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))
    lock = "object_lock_mode=COMPLIANCE,object_lock_retain_until_date=30d"
    s3 = ":s3,provider=Rclone,endpoint='http://127.0.0.1:9000',access_key_id=a:bkt/v"
    assert objectlock.lock_spec(s3, "30d") == s3.replace(":bkt/v", f",{lock}:bkt/v")
    assert objectlock.lock_spec("mys3:bkt/v", "30d") == f"mys3,{lock}:bkt/v"
    for unchanged in ("nas:vault", "/mnt/usb/vault", ":sftp,host=h:v", f":s3,{lock}:b"):
        assert objectlock.lock_spec(unchanged, "30d") == unchanged
    assert objectlock.lock_spec(s3, None) == s3
    assert objectlock.check_retention("1y") == "1y"
    with pytest.raises(InputError):
        objectlock.check_retention("forever")


def test_object_lock_set_on_upload_and_read_back_by_verify(tmp_path: Path, s3_server) -> None:
    """`rclone serve s3` records the lock rclone sends (it does not enforce it): enough to
    show vaultfs asks for it on every upload and verify reads it back."""
    home = tmp_path / "home"
    specs = [s3_server.remote(f"bucket{i}/vault") for i in range(3)]
    run_cli("init", "--immutable", "--object-lock", "30d", "-k", "2", "-n", "3",
            *remote_args(specs), home=home)  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(200_000))
    run_cli("backup", str(src), home=home)
    rep = json.loads(run_cli("verify", "--json", home=home).stdout)
    assert rep["clean"]
    for r in rep["remotes"]:
        assert r["locked"] is True and "COMPLIANCE" in r["lock"], r
    res = run_cli("init", "--object-lock", "30d", "--remote", str(tmp_path / "x"),
                  home=tmp_path / "h2", check=InputError.exit_code)  # fmt: skip
    assert b"--immutable" in res.stderr

    # one shard object put back without a lock, one with a retention shorter than asked (as a
    # bucket without Object Lock or a spec that lost its options would leave them)
    rclone = str(rclone_path())
    plain = s3_server.remote("bucket0/vault")
    data, meta = (
        sorted((s3_server.root / "bucket0/vault" / sub).iterdir()) for sub in ("data", "meta")
    )
    copy = tmp_path / "copy"
    for obj, extra in (
        (data[0], ""),
        (meta[0], ",object_lock_mode=COMPLIANCE,object_lock_retain_until_date=2d"),
    ):
        shutil.copy(obj, copy)
        dest = (
            plain.replace(":bucket0/vault", f"{extra}:bucket0/vault")
            + f"/{obj.parent.name}/{obj.name}"
        )
        subprocess.run([rclone, "copyto", str(copy), dest], check=True, capture_output=True)
    res = run_cli("verify", "--read-all", "--json", home=home, check=12)
    rep = json.loads(res.stdout)
    bad = rep["remotes"][0]
    assert not rep["clean"] and bad["locked"] is False
    assert sorted(bad["unlocked"]) == [f"data/{data[0].name}", f"meta/{meta[0].name}"]
    assert "no object lock reported" in bad["details"][f"data/{data[0].name}"]
    assert "less than the retention 30d" in bad["details"][f"meta/{meta[0].name}"]
    assert all(r["clean"] and r["locked"] for r in rep["remotes"][1:])
    res = run_cli("verify", "--read-all", home=home, check=12)
    assert f"data/{data[0].name}: unlocked".encode() in res.stderr
    assert b"unlocked objects" in res.stderr and b"vaultfs repair" not in res.stderr
    # a sampled audit reads the newest manifest and a sample of the shard objects
    rep = json.loads(run_cli("verify", "--sample", "1", "--json", home=home, check=None).stdout)
    assert all("2 of 2 objects read" in r["lock"] for r in rep["remotes"][1:]), rep


def _lock(remotes: list[Path]) -> None:
    """The "server" makes what it holds write-once: every object immutable, every directory
    append-only (entries may be added, none removed or renamed)."""
    for r in remotes:
        files = [str(p) for p in r.rglob("*") if p.is_file()]
        dirs = [str(r), *(str(p) for p in r.rglob("*") if p.is_dir())]
        subprocess.run(["chattr", "+i", *files], check=True, capture_output=True)
        subprocess.run(["chattr", "+a", *dirs], check=True, capture_output=True)


ATTACKER = r"""
import os, subprocess, sys
rclone, remotes = sys.argv[1], sys.argv[2:]
done = 0
for r in remotes:
    for how in (["purge", r], ["delete", r], ["deletefile", r + "/manifests"]):
        done += subprocess.run([rclone, *how], capture_output=True).returncode == 0
    for dirpath, dirs, files in os.walk(r):
        for f in files:
            p = os.path.join(dirpath, f)
            for attack in (
                lambda: os.remove(p),
                lambda: open(p, "r+b").write(b"ENCRYPTED BY RANSOMWARE"),
                lambda: os.truncate(p, 0),
                lambda: os.rename(p, p + ".locked"),
                lambda: subprocess.run([rclone, "copyto", __file__, p], check=True,
                                       capture_output=True),
            ):
                try:
                    attack()
                    done += 1
                except (OSError, subprocess.CalledProcessError):
                    pass
        for d in dirs:
            try:
                os.rename(os.path.join(dirpath, d), os.path.join(dirpath, d + ".gone"))
                done += 1
            except OSError:
                pass
    # what it can do: add objects of its own (a forged manifest, junk shards)
    open(os.path.join(r, "manifests", "9999999999999999-deadbeef"), "wb").write(b"pay up")
    open(os.path.join(r, "data", "0" * 32), "wb").write(os.urandom(4096))
print(done)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i/+a needs root (CAP_LINUX_IMMUTABLE)")
def test_ransomware_with_the_vaults_credentials_cannot_destroy_a_locked_vault(
    tmp_path: Path,
) -> None:
    home, remotes, _src, trees = _make(tmp_path, 3)
    try:
        _lock(remotes)
        before = _objects(remotes)
        script = tmp_path / "attacker.py"
        script.write_text(ATTACKER)
        res = subprocess.run(
            [sys.executable, str(script), str(rclone_path()), *map(str, remotes)],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        assert res.stdout.strip() == "0"  # not one delete, overwrite or rename succeeded
        after = _objects(remotes)
        assert {p: b for p, b in after.items() if p in before} == before
        keyfile = tmp_path / "key.json"
        shutil.copy(home / "key.json", keyfile)
        shutil.rmtree(home)  # the laptop is gone too
        froms = [a for r in remotes for a in ("--from", str(r))]
        for i, tree in enumerate(trees):
            out = tmp_path / f"restored{i}"
            rep = run_cli(
                "restore", *froms, "--snapshot", f"b{i}", "--keyfile", str(keyfile),
                "--to", str(out), "--json", home=tmp_path / f"h{i}",
            )  # fmt: skip
            assert json.loads(rep.stdout)["snapshot"]
            assert tree_digest(out / "src") == tree
    finally:
        subprocess.run(["chattr", "-R", "-i", "-a", *map(str, remotes)], capture_output=True)


LAPTOP_ATTACK = r"""
import json, subprocess, sys
rclone, junk, remotes = sys.argv[1], sys.argv[2], sys.argv[3:]
done = []  # the destructive calls that succeeded
def attack(*args):
    if subprocess.run([rclone, *args], capture_output=True).returncode == 0:
        done.append(" ".join(args[:1] + args[-1:]))
for r in remotes:
    listing = subprocess.run([rclone, "lsjson", "-R", "--files-only", r], capture_output=True)
    paths = [o["Path"] for o in json.loads(listing.stdout or b"[]")]
    for how in (["purge", r], ["delete", r], ["sync", junk + "/empty", r]):
        attack(*how)
    for i, p in enumerate(paths):
        other = paths[i - 1]
        attack("deletefile", f"{r}/{p}")
        # --ignore-times: rclone would otherwise skip (and exit 0 for) a copy whose source has
        # the size and modification time (S3: to the second) of the object it replaces
        attack("copyto", "--ignore-times", junk + "/ransom.txt", f"{r}/{p}")  # overwrite
        attack("copyto", "--ignore-times", f"{r}/{other}", f"{r}/{p}")  # server-side copy
        attack("moveto", f"{r}/{p}", f"{r}/{p}.locked")
    # what it can do: add objects of its own (a forged manifest, a junk shard)
    subprocess.run([rclone, "copyto", junk + "/ransom.txt", f"{r}/manifests/9999999999999999-deadbeef"])
    subprocess.run([rclone, "copyto", junk + "/ransom.txt", f"{r}/data/" + "0" * 32])
print(json.dumps(done))
"""


def _locked_vault(
    tmp: Path, gw: LockingGateway, backups: int
) -> tuple[Path, list[str], list[dict], list[datetime]]:
    """An immutable 2-of-3 vault with S3 Object Lock (COMPLIANCE, 30 days) on three buckets
    behind ``gw`` after ``backups`` backups of a tree that changes between them (one file,
    ``base.bin``, never does); returns (home, remote specs, each backup's tree digest, the
    time each backup started)."""
    home = tmp / "home"
    specs = [gw.remote(f"bucket{i}/vault") for i in range(3)]
    run_cli("init", "--immutable", "--object-lock", "30d", "-k", "2", "-n", "3",
            "--segment-mib", "1", *remote_args(specs), home=home)  # fmt: skip
    src = tmp / "src"
    src.mkdir()
    (src / "base.bin").write_bytes(os.urandom(300_000))
    trees, started = [], []
    for i in range(backups):
        (src / f"part{i}.bin").write_bytes(os.urandom(400_000))
        (src / "notes.txt").write_text(f"version {i}\n" * 1000)
        started.append(datetime.now(UTC))
        run_cli("backup", str(src), "--name", f"b{i}", home=home)
        trees.append(tree_digest(src))
    return home, specs, trees, started


def _restore_all(tmp: Path, home: Path, specs: list[str], trees: list[dict], tag: str) -> None:
    """Every snapshot restores byte-identical from ``specs`` with only the keyfile (the home,
    the laptop, is gone)."""
    keyfile = tmp / "key.json"
    shutil.copy(home / "key.json", keyfile)
    froms = [a for s in specs for a in ("--from", s)]
    for i, tree in enumerate(trees):
        out = tmp / f"{tag}{i}"
        run_cli("restore", *froms, "--snapshot", f"b{i}", "--keyfile", str(keyfile),
                "--to", str(out), home=tmp / f"{tag}-home{i}")  # fmt: skip
        assert tree_digest(out / "src") == tree


@pytest.fixture
def gateway(tmp_path: Path, rclone_bin: Path):
    """A LockingGateway (tests/s3lock.py) enforcing Object Lock in front of `rclone serve s3`
    with the laptop's key and an administrator's; ``gateway.shift`` moves its clock."""
    server = TwoKeyS3Server(tmp_path / "s3", rclone_bin)
    shift = [timedelta(0)]
    gw = LockingGateway(server, now=lambda: datetime.now(UTC) + shift[0])
    gw.shift = shift  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.stop()
        server.stop()


def test_ransomware_with_the_laptops_s3_key_against_an_enforced_object_lock(
    tmp_path: Path, gateway: LockingGateway
) -> None:
    """The ransomware test of issue 17 with the lock enforced as S3 Object Lock does: every
    object the vault wrote is locked (verify reads it back through the gateway), a process
    holding the laptop's S3 key deletes, purges, syncs over, overwrites, copies over and
    renames every object it can list; not one succeeds, and every snapshot restores from the
    remotes alone."""
    home, specs, trees, _ = _locked_vault(tmp_path, gateway, 3)
    rep = json.loads(run_cli("verify", "--read-all", "--json", home=home).stdout)
    assert rep["clean"] and all(r["locked"] for r in rep["remotes"]), rep
    served = gateway.upstream.root
    before = {p: p.read_bytes() for p in served.rglob("*") if p.is_file()}
    junk = tmp_path / "junk"
    (junk / "empty").mkdir(parents=True)
    (junk / "ransom.txt").write_text("ENCRYPTED BY RANSOMWARE")
    script = tmp_path / "attacker.py"
    script.write_text(LAPTOP_ATTACK)
    res = subprocess.run(
        [sys.executable, str(script), str(rclone_path()), str(junk), *specs],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    assert json.loads(res.stdout) == []  # not one delete, overwrite or rename succeeded
    assert gateway.refused.get("DELETE", 0) > 0 and gateway.refused.get("PUT", 0) > 0
    after = {p: p.read_bytes() for p in served.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p in before} == before
    _restore_all(tmp_path, home, specs, trees, "restored")
    # the attacker's own objects are found by verify, not taken for the vault's
    res = run_cli("verify", "--json", home=home, check=12)
    assert any(
        "manifests/9999999999999999-deadbeef" in r["foreign"]
        for r in json.loads(res.stdout)["remotes"]
    )


def test_freeing_an_immutable_vault_needs_the_administrators_key_and_whole_buckets(
    tmp_path: Path, gateway: LockingGateway
) -> None:
    """docs/operations.md, "Immutable vaults", freeing space: the laptop's key lacks
    s3:DeleteObject (modelled by the gateway), so it frees nothing even once the locks end; the
    administrator's key deletes nothing while they hold (COMPLIANCE). An age rule on current
    objects ("expire what is older than the oldest snapshot kept") run by the administrator
    breaks the snapshots it should keep: they share the older objects (deduplication, index
    blocks). What works is retiring the vault whole: its buckets, emptied by the
    administrator's key once the locks have ended."""
    gateway.delete_keys = {ADMIN_ACCESS_KEY}  # the laptop's key: no s3:DeleteObject
    home, specs, _trees, started = _locked_vault(tmp_path, gateway, 2)
    run_cli("prune", home=home, check=ImmutableVault.exit_code)
    rclone = str(rclone_path())
    admin = [gateway.admin_remote(f"bucket{i}/vault") for i in range(3)]
    served = gateway.upstream.root

    def objects() -> int:
        return sum(1 for p in served.rglob("*") if p.is_file())

    held = objects()
    assert subprocess.run([rclone, "purge", admin[0]], capture_output=True).returncode != 0
    assert objects() == held  # COMPLIANCE: the administrator cannot lift it either
    gateway.shift[0] = timedelta(days=31)  # type: ignore[attr-defined]  # the locks have ended
    assert subprocess.run([rclone, "purge", specs[0]], capture_output=True).returncode != 0
    assert objects() == held  # the laptop's key deletes nothing, locked or not

    # the age rule: expire every object uploaded before the oldest snapshot to keep (b1)
    old = []
    for a in admin:
        listing = subprocess.run([rclone, "lsjson", "-R", "--files-only", "--metadata", a],
                                 capture_output=True, check=True)  # fmt: skip
        for o in json.loads(listing.stdout):
            if datetime.fromisoformat(o["Metadata"]["btime"].replace("Z", "+00:00")) < started[1]:
                old.append(f"{a}/{o['Path']}")
    assert old
    for path in old:
        subprocess.run([rclone, "deletefile", path], capture_output=True, check=True)
    keyfile = tmp_path / "key.json"
    shutil.copy(home / "key.json", keyfile)
    froms = [a for s in specs for a in ("--from", s)]
    res = run_cli("restore", *froms, "--snapshot", "b1", "--keyfile", str(keyfile),
                  "--to", str(tmp_path / "kept"), home=tmp_path / "h-kept", check=None)  # fmt: skip
    # b1 shares b0's objects (an unchanged file, index blocks): they took it with them
    assert res.returncode == 11 and b"intact shard" in res.stderr, res.stderr
    assert not (tmp_path / "kept" / "src").is_dir()

    # retiring the vault whole: the administrator's key empties its buckets
    for a in admin:
        subprocess.run([rclone, "purge", a], capture_output=True, check=True)
    assert objects() == 0
