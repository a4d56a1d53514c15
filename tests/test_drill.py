"""`vaultfs drill`: each of the five disaster drills passes on a 3-of-5 vault over local
directories, run from a clean home, and leaves the live home and remotes exactly as they were
(docs/operations.md, "Disaster drills")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import init_local_vault, run_cli


def _state(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes: what a drill must not change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A 3-of-5 vault over local directories with two snapshots (the newer is restored)."""
    tmp = tmp_path_factory.mktemp("drill")
    home, remotes = init_local_vault(tmp, 3, 5, prefix="remote")
    src = tmp / "src"
    (src / "docs").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(1_500_000))
    (src / "docs" / "a.txt").write_text("alpha\n" * 4000)
    os.symlink("docs/a.txt", src / "link")
    run_cli("backup", str(src), home=home)
    (src / "docs" / "b.txt").write_text("beta\n" * 3000)
    run_cli("backup", str(src), home=home)
    return home, remotes


@pytest.mark.parametrize("scenario", ["disk", "home", "provider", "crypto", "keys"])
def test_drill_passes_and_touches_nothing_live(
    vault: tuple[Path, list[Path]], tmp_path: Path, scenario: str
) -> None:
    home, remotes = vault
    before = {str(r): _state(r) for r in [home, *remotes]}
    scratch = tmp_path / "scratch"
    rep = json.loads(
        run_cli("drill", scenario, "--scratch", str(scratch), "--json", home=home).stdout
    )
    assert rep["ok"], rep
    (d,) = rep["drills"]
    assert d["scenario"] == scenario and d["identical"] and d["mismatched"] == []
    assert d["entries"] == 6 and d["bytes"] == 1_500_000 + 6 * 4000 + 5 * 3000
    assert d["rto"] > 0 and d["rpo"] >= 0 and d["error"] is None
    restored = next(scratch.rglob("restored"))
    assert (restored / "src" / "docs" / "b.txt").read_text() == "beta\n" * 3000
    after = {str(r): _state(r) for r in [home, *remotes]}
    assert after == before
    if scenario == "provider":
        assert len(d["details"]["survivors"]) == 3 and len(d["details"]["dropped"]) == 2
        assert d["details"]["verify_clean"] and len(d["details"]["replaced_onto"]) == 2
    if scenario == "crypto":
        assert d["details"]["retired"] == [d["details"]["from_suite"]]
        assert d["details"]["old_suite_refused"] and "retired" in d["details"]["refusal"]
    if scenario == "keys":
        assert len(d["details"]["shares_used"]) == 3


def test_provider_drill_with_fewer_remotes_than_n(tmp_path: Path) -> None:
    """2-of-4 over 3 remotes: one remote holds two shards of each segment, so a restore
    needs 2 remotes (cli init's warning); the drill keeps exactly that many and replaces the
    third. With two remotes gone the disk drill fails: exit 22 and the reason."""
    home, remotes = init_local_vault(tmp_path, 2, 4, remotes=3, prefix="remote")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(300_000))
    run_cli("backup", str(src), home=home)
    rep = json.loads(run_cli("drill", "provider", "--json", home=home).stdout)
    (d,) = rep["drills"]
    assert rep["ok"] and d["identical"] and d["details"]["verify_clean"]
    assert len(d["details"]["survivors"]) == 2 and len(d["details"]["dropped"]) == 1
    for r in remotes[1:]:
        r.rename(r.with_name(r.name + "-gone"))
    res = run_cli("drill", "disk", "--json", home=home, check=22)
    (d,) = json.loads(res.stdout)["drills"]
    assert not d["ok"] and not d["identical"] and "only 1 intact" in d["error"], d


def test_provider_drill_on_a_single_remote_vault_fails_and_says_why(tmp_path: Path) -> None:
    """1-of-1 on one remote (a strategy's NAS tier): no provider can be lost, so the provider
    drill fails (exit 22) naming why, instead of passing with nothing dropped."""
    home, remote = tmp_path / "home", tmp_path / "nas"
    run_cli("init", "-k", "1", "-n", "1", "--remote", str(remote), home=home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(10_000))
    run_cli("backup", str(src), home=home)
    res = run_cli("drill", "provider", "--json", home=home, check=22)
    (d,) = json.loads(res.stdout)["drills"]
    assert not d["ok"] and "no provider can be lost" in d["error"], d
