"""Fault-injection suite: real `rclone serve s3/sftp/webdav` on 127.0.0.1 plus local directories.

One 3-of-5 vault over five remotes of four kinds. Each fault is injected, then:
`vaultfs verify` must detect it and name the remote and the objects, `vaultfs repair` must
restore full redundancy, a second `verify` must be clean, and a restore from exactly k
remotes (the damaged one among them) must be byte-identical. The suite prints a table:
faults injected, detected, repaired, bytes lost (must be 0).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    RcloneServer,
    WebdavServer,
    run_cli,
    tree_digest,
    vaultfs_env,
)

from vaultfs import repair as repair_mod
from vaultfs import verify as verify_mod
from vaultfs.backends import FaultInjecting, open_backend
from vaultfs.remotes import Remote
from vaultfs.restore import open_remote_index, restore_files
from vaultfs.vault import Vault

pytestmark = pytest.mark.network


@pytest.fixture
def webdav_server(tmp_path: Path, rclone_bin: Path):
    srv = WebdavServer(tmp_path / "webdav0", rclone_bin)
    try:
        yield srv
    finally:
        srv.stop()


def _make_tree(root: Path, seed: int, mib: float) -> None:
    rnd = __import__("random").Random(seed)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    big = rnd.randbytes(int(mib * 1024 * 1024))
    (root / "big.bin").write_bytes(big)
    (root / "copy.bin").write_bytes(big[: len(big) // 2])  # deduplicated against big.bin
    for i in range(5):
        (root / "docs" / f"note{i}.txt").write_text(f"note {i} of {seed}\n" * (200 + i))


class Suite:
    """The vault under test, its remotes and the fault table."""

    def __init__(self, tmp: Path, specs: dict[str, str], servers: dict[str, RcloneServer]):
        self.tmp = tmp
        self.home = tmp / "home"
        self.specs = specs  # short name -> rclone spec
        self.servers = servers  # short name -> server (network remotes)
        self.rows: list[dict] = []
        self._keys = None
        self.src = tmp / "src"
        self.src.mkdir()

    def cli(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        return run_cli(*args, home=self.home, check=check)

    def label(self, name: str) -> str:
        return Remote(self.specs[name]).label

    def verify_json(self, *extra: str, check: int | None = None, cli: bool = False) -> dict:
        """`vaultfs verify --json`; with cli=False the same audit through the library (no
        process start, no scrypt: the suite must stay fast), exit code computed alike."""
        if cli:
            proc = self.cli("verify", "--json", *extra, check=check)
            return json.loads(proc.stdout)
        with Vault.open(self.home, keys=self.keys) as v:
            rep = verify_mod.audit(v).to_dict()
        found = any(
            r["missing"] or r["corrupt"] or r["stale"] or r["foreign"] or r["stale_manifest"]
            for r in rep["remotes"]
        )
        code = 0 if rep["clean"] else (12 if found else 11)
        assert check is None or code == check, rep
        return rep

    def repair_json(self, cli: bool = False) -> dict:
        if cli:
            return json.loads(self.cli("repair", "--json").stdout)
        with Vault.open(self.home, keys=self.keys) as v:
            return repair_mod.repair(v).to_dict()

    @property
    def keys(self):
        if self._keys is None:
            self._keys = _keys(self.home)
        return self._keys

    def remote_report(self, rep: dict, name: str) -> dict:
        return next(r for r in rep["remotes"] if r["remote"] == self.label(name))

    def restore_from(self, names: list[str]) -> int:
        """Restore the latest snapshot from exactly these remotes with no local state; return
        the number of bytes that differ from the source tree (0 = byte-identical)."""
        keys = self.keys
        with tempfile.TemporaryDirectory(prefix="vaultfs-k-", dir=self.tmp) as w:
            db, src, _m, _warn = open_remote_index(
                keys, [open_backend(self.specs[n]) for n in names], Path(w)
            )
            try:
                restore_files(keys, db, src, Path(w) / "out")
            finally:
                db.close()
            return _bytes_lost(self.src, Path(w) / "out" / self.src.name)

    def record(self, fault: str, remote: str, injected: int, detected: int, repaired: bool, lost):
        self.rows.append(
            {
                "fault": fault,
                "remote": remote,
                "injected": injected,
                "detected": detected,
                "repaired": "yes" if repaired else "NO",
                "bytes lost": lost,
            }
        )


def _keys(home: Path):
    from vaultfs.keys import read_keyfile

    return read_keyfile(home / "key.json", PASSPHRASE)


def _bytes_lost(src: Path, out: Path) -> int:
    a, b = tree_digest(src), tree_digest(out) if out.exists() else {}
    assert a, "empty source tree"
    lost = 0
    for rel, d in a.items():
        if d[0] == "f" and b.get(rel) != d:
            lost += d[2]
    return lost


def _objects(root: Path, sub: str = "data") -> list[Path]:
    d = root / sub
    return sorted(p for p in d.iterdir() if p.is_file()) if d.exists() else []


def _check_cycle(
    s: Suite,
    fault: str,
    name: str,
    injected: list[str],
    kinds: tuple[str, ...],
    restore_with: list[str],
    cli: bool = False,
) -> None:
    """verify detects (naming remote and objects) → repair → verify clean → restore from k."""
    rep = s.verify_json(check=12, cli=cli)
    r = s.remote_report(rep, name)
    found = [p for kind in kinds for p in r[kind]]
    detected = sum(1 for obj in injected if any(obj in f for f in found))
    assert detected == len(injected), (fault, injected, r)
    assert not r["clean"] and r["state"] in ("degraded", "stale")
    # the other remotes are not blamed
    for other in rep["remotes"]:
        if other["remote"] != r["remote"]:
            assert other["clean"], (fault, other)
    rj = s.repair_json(cli=cli)
    assert rj["ok"] and not rj["unrecoverable"], rj
    again = s.verify_json(check=0, cli=cli)
    assert again["clean"], again
    lost = s.restore_from(restore_with)
    s.record(fault, name, len(injected), detected, again["clean"], lost)
    assert lost == 0


def test_fault_injection_suite(
    tmp_path: Path, s3_server_factory, sftp_server_factory, webdav_server: WebdavServer, capsys
) -> None:
    s3 = s3_server_factory()
    sftp = sftp_server_factory()
    specs = {
        "s3": s3.remote("vault/a"),
        "sftp": sftp.remote("vault"),
        "webdav": webdav_server.remote("vault"),
        "local1": str(tmp_path / "local1"),
        "local2": str(tmp_path / "local2"),
    }
    s = Suite(tmp_path, specs, {"s3": s3, "sftp": sftp, "webdav": webdav_server})
    order = ["s3", "sftp", "webdav", "local1", "local2"]
    args = ["init", "-k", "3", "-n", "5", "--segment-mib", "1"]
    for n in order:
        args += ["--remote", specs[n]]
    s.cli(*args)
    _make_tree(s.src, 1, 1.2)
    s.cli("backup", str(s.src))
    assert s.verify_json(check=0)["clean"]

    # 1. a server killed mid-backup and restarted later -----------------------------------
    _make_tree(s.src / "more", 2, 0.8)
    env = vaultfs_env(s.home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "backup", str(s.src)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    time.sleep(0.3)
    s3.stop()  # mid-backup: the backup must still succeed on the other four
    _out, errb = proc.communicate(timeout=180)
    assert proc.returncode == 0, errb.decode()
    rep = s.verify_json(check=11, cli=True)  # unreachable only: a distinct state
    r = s.remote_report(rep, "s3")
    assert r["unreachable"] and r["state"] == "unreachable" and not r["missing"]
    assert r["unchecked"] == f"unreachable ({r['error']})" and r["confidence"] == 0, r
    assert r["queued"] > 0  # its share of the backup waits in the local queue
    st = json.loads(s.cli("status", "--json").stdout)
    s3_status = next(x for x in st["remotes"] if x["remote"] == s.label("s3"))
    assert s3_status["health"] == "unreachable"
    assert st["survives_losses_now"] < st["survives_losses_design"]
    s3.start()
    rj = json.loads(s.cli("repair", "--json").stdout)
    assert rj["ok"], rj
    again = s.verify_json(check=0)
    assert again["clean"]
    s.record("server killed mid-backup, restarted", "s3", 1, 1, True, s.restore_from(
        ["s3", "webdav", "local2"]))  # fmt: skip

    # faults on network remotes go through the server, as a provider's own damage would
    # 2. shard objects deleted (webdav) ----------------------------------------------------
    web = open_backend(specs["webdav"])
    names = sorted(web.list("data"))[:2]
    web.delete("data", names)
    _check_cycle(
        s, "shard objects deleted", "webdav", names, ("missing",), ["webdav", "local1", "local2"],
        cli=True,
    )  # fmt: skip

    # 3. truncated (s3) --------------------------------------------------------------------
    bucket = open_backend(specs["s3"])
    name = sorted(bucket.list("data"))[0]
    data = bucket.cat("data", name)
    bucket.put_bytes("data", name, data[: len(data) // 3])
    _check_cycle(s, "shard object truncated", "s3", [name], ("corrupt",), ["s3", "sftp", "local1"])

    # 4. bit-flipped (local1) -----------------------------------------------------------------
    p = _objects(tmp_path / "local1")[-1]
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x04
    p.write_bytes(bytes(b))
    _check_cycle(s, "bit flipped", "local1", [p.name], ("corrupt",), ["local1", "sftp", "webdav"])

    # 5. replaced with another genuine (older) object of the vault (sftp) ------------------------
    box = open_backend(specs["sftp"])
    victim, older = sorted(box.list("data"))[:2]
    box.put_bytes("data", victim, box.cat("data", older))
    _check_cycle(
        s, "object replaced by an older genuine one", "sftp", [victim], ("stale",),
        ["sftp", "s3", "local2"],
    )  # fmt: skip

    # 6. a remote rolled back to an older version of itself (local2) --------------------------
    saved = tmp_path / "local2-yesterday"
    shutil.copytree(tmp_path / "local2", saved)
    _make_tree(s.src / "newer", 3, 0.4)
    s.cli("backup", str(s.src))
    before = {p.name for p in _objects(tmp_path / "local2")}
    shutil.rmtree(tmp_path / "local2")
    shutil.copytree(saved, tmp_path / "local2")
    gone = sorted(before - {p.name for p in _objects(tmp_path / "local2")})
    assert gone
    rep = s.verify_json(check=12, cli=True)
    r = s.remote_report(rep, "local2")
    assert r["stale_manifest"] and r["state"] == "stale", r
    assert set(gone) <= {m.split("/", 1)[1] for m in r["missing"]}
    rj = json.loads(s.cli("repair", "--json").stdout)
    assert rj["ok"] and rj["manifest_seq"], rj
    again = s.verify_json(check=0)
    assert again["clean"]
    s.record(
        "remote rolled back (older version)", "local2", len(gone) + 1, len(gone) + 1,
        True, s.restore_from(["local2", "s3", "sftp"]),
    )  # fmt: skip

    # 7. foreign objects added (local1) ------------------------------------------------------
    (tmp_path / "local1" / "data" / "0badc0ffee0badc0ffee0badc0ffee00").write_bytes(b"junk" * 99)
    (tmp_path / "local1" / "meta" / "not-ours").write_bytes(b"junk")
    _check_cycle(
        s, "foreign objects added", "local1", ["0badc0ffee0badc0ffee0badc0ffee00", "not-ours"],
        ("foreign",), ["local1", "webdav", "s3"],
    )  # fmt: skip
    assert not (tmp_path / "local1" / "meta" / "not-ours").exists()  # repair removed it

    # 8. wrong bytes for range reads (webdav, through a fault-injecting wrapper) ---------------
    lies: list[FaultInjecting] = []

    def liar(b):
        if b.rid == webdav_rid:
            lies.append(FaultInjecting(b, wrong_ranges=3))
            return lies[-1]
        return b

    v = Vault.open(s.home, PASSPHRASE)
    try:
        webdav_rid = repair_mod.find_remote(v, specs["webdav"])[0]
        rep = verify_mod.audit(v, [specs["webdav"]], mode="sample", sample=100, wrap=liar,
                               whole_budget=0)  # fmt: skip
        r = rep.remotes[0]
        injected = sorted(set(lies[0].lied_about))
        assert lies[0].injected == 3 and injected
        caught = sorted(x.split("/", 1)[1] for x in r.corrupt)
        assert caught == injected, r
        assert r.state == "degraded"
        fixed = repair_mod.repair(v)
        assert fixed.ok and fixed.rebuilt >= len(injected)
        again = verify_mod.audit(v, mode="sample", sample=100, whole_budget=0)
        assert again.clean
    finally:
        v.close()
    s.record("wrong bytes for range reads", "webdav", len(injected), len(caught), again.clean,
             s.restore_from(["webdav", "sftp", "local1"]))  # fmt: skip

    # 9. a server killed for good and replaced (sftp → a new sftp server) -----------------------
    sftp.stop()
    rep = s.verify_json(check=11)
    assert s.remote_report(rep, "sftp")["unreachable"]
    new = sftp_server_factory()
    new_spec = new.remote("vault")
    out = s.cli("remote", "replace", specs["sftp"], new_spec, "--json")
    rj = json.loads(out.stdout)
    assert rj["ok"] and rj["rebuilt"] > 0, rj
    specs["sftp-new"] = new_spec
    again = s.verify_json(check=0)
    assert again["clean"]
    old_rid = next(x["id"] for x in json.loads(s.cli("remote", "list", "--json").stdout)
                   if x["member"] == "removed")  # fmt: skip
    assert old_rid not in [r["rid"] for r in again["remotes"]] and len(again["remotes"]) == 5
    s.record("server killed for good, replaced", "sftp", 1, 1, True,
             s.restore_from(["sftp-new", "webdav", "local2"]))  # fmt: skip

    # the table ----------------------------------------------------------------------------
    cols = ["fault", "remote", "injected", "detected", "repaired", "bytes lost"]
    widths = [max(len(c), *(len(str(r[c])) for r in s.rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    for row in s.rows:
        lines.append("  ".join(str(row[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(r["bytes lost"] == 0 and r["repaired"] == "yes" for r in s.rows)
    assert all(r["detected"] == r["injected"] for r in s.rows)
    assert len(s.rows) == 9
