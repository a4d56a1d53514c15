"""What a user is told about a stale home and a fork (docs/operations.md, "Living with a
fork"): verify in a home the remotes' chain merely extends says "stale home" and how to
catch up, not "fork"; `vaultfs run` whose audit finds a fork fails and alerts as `verify`
exits 12; a receipt whose manifest is on the other branch names --manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import init_local_vault, run_cli


def _backup(home: Path, src: Path, text: str, *extra: str) -> dict:
    (src / "doc.txt").write_text(text)
    return json.loads(run_cli("backup", str(src), "--json", *extra, home=home).stdout)


def test_stale_home_fork_routine_and_receipt_messages(tmp_path: Path) -> None:
    vault = init_local_vault(tmp_path, segment_mib=None)
    home, remotes = vault.home, vault.specs
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "one\n")
    old = tmp_path / "old-home"
    shutil.copytree(home, old)  # a copy of the home, left behind by the next backup
    _backup(home, src, "two\n")
    receipt = tmp_path / "receipt.json"
    run_cli("receipt", "latest", "--out", str(receipt), home=home)
    ours = json.loads(receipt.read_text())["statement"]

    # merely stale: the remotes' chain goes on past the old home's newest manifest
    res = run_cli("verify", "--json", home=old, check=12)
    assert all(r["ahead"] for r in json.loads(res.stdout)["remotes"] if r["fork"])
    res = run_cli("verify", home=old, check=12)
    said = res.stderr.decode()
    assert "stale home" in said and "vaultfs home rebuild --from" in said, said
    assert "fork:" not in said and "another branch" not in said, said

    # an explicit fork from the old home: now both homes see a fork
    forked = _backup(old, src, "three\n", "--fork")
    said = run_cli("verify", home=home, check=12).stderr.decode()
    assert "fork: the remotes hold manifests off this vault's chain" in said, said
    assert "stale home" not in said

    # the routine's audit fails and alerts like `verify` exits 12
    log = tmp_path / "events.jsonl"
    run_cli("schedule", "set", "verify=1s:100%", f"alert=cat >> {log}", home=home)
    out = json.loads(run_cli("run", "--json", home=home, check=20).stdout)
    assert "verify" in out["failed"] and "a fork" in out["failed"]["verify"]
    (ev,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert ev["event"] == "audit_failed" and "a fork" in ev["message"]

    # a receipt of the older branch: the newest manifest is the fork's, so the restore
    # refuses, naming the way to that branch
    from_all = [a for r in remotes for a in ("--from", r)]
    keyfile = ["--keyfile", str(home / "key.json"), "--receipt", str(receipt)]
    res = run_cli("restore", *from_all, *keyfile, "--to", str(tmp_path / "o1"),
                  home=tmp_path / "none", check=12)  # fmt: skip
    said = res.stderr.decode()
    link = f"#{ours['manifest_seq']}/{ours['manifest_hash'][:16]}"
    assert f"--manifest {link}" in said and "Traceback" not in said, said
    assert forked["seq"] > ours["manifest_seq"]
    run_cli("restore", *from_all, *keyfile, "--manifest", link, "--to", str(tmp_path / "o2"),
            home=tmp_path / "none")  # fmt: skip
    assert (tmp_path / "o2" / "src" / "doc.txt").read_text() == "two\n"
