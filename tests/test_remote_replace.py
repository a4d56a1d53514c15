"""`vaultfs remote replace OLD NEW` cut short (kill -9 after OLD left the vault and NEW took
its place, before the rebuild onto NEW): the same command again finishes the replace, and a
replace whose OLD left without NEW taking its place says what to run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT, init_local_vault, run_cli, tree_digest, vaultfs_env


def test_a_replace_cut_short_is_finished_by_its_rerun(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random.Random(7).randbytes(1_500_000))
    run_cli("backup", str(src), home=home)
    new = tmp_path / "rn"

    killed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "killpoint.py"), "vaultfs.repair:repair:before",
         "remote", "replace", str(remotes[2]), str(new)],
        env=vaultfs_env(home), cwd=REPO_ROOT, capture_output=True, start_new_session=True,
        timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr.decode()
    members = {r["remote"]: r["member"] for r in json.loads(
        run_cli("remote", "list", "--json", home=home).stdout
    )}  # fmt: skip
    assert members[str(remotes[2])] == "removed" and members[str(new)] == "active", members

    res = run_cli("remote", "replace", str(remotes[2]), str(new), "--json", home=home)
    assert not json.loads(res.stdout)["unrecoverable"]
    # the vault restores from NEW and one other remote alone
    (remotes[1]).rename(tmp_path / "r1-away")
    run_cli("restore", "--to", str(tmp_path / "out"), home=home)
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)

    other = tmp_path / "elsewhere"
    res = run_cli("remote", "replace", str(remotes[2]), str(other), home=home, check=14)
    said = res.stderr.decode()
    assert "already left this vault" in said and f"vaultfs remote add {other}" in said, said
