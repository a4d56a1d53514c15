"""Tiers after a second new-user review (issue 17), through the real CLI over local
directories: the vault's real k-of-n next to the file's, and the command that makes them
agree; an ancestor of the newest manifest restores without a fork warning; the master key on
a tier's remotes is named as such (exit 10, `strategy seed`); a lost tier home points at
`home rebuild`; `strategy check` checks the sources on this machine; an empty live-tree
snapshot warns; `strategy show` prints the homes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import init_local_vault, run_cli, vaultfs_env


def _strategy(home: Path, tmp_path: Path, tiers: str, sources: str = "") -> Path:
    notes = tmp_path / "notes"
    notes.mkdir(exist_ok=True)
    (notes / "a.md").write_text("# a belief\n")
    home.mkdir(exist_ok=True)
    f = home / "strategy.yaml"
    f.write_text(f"backup_strategy:\n{tiers}sources:\n  - path: {notes}\n{sources}")
    return f


def test_the_file_and_the_vault_are_made_to_agree_after_add_backend(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = [tmp_path / f"d{i}" for i in range(5)]
    _strategy(
        home, tmp_path,
        f"  off: {{backends: [\"{d[0]}\", \"{d[1]}\", \"{d[2]}\"], frequency: daily, "
        "erasure_coding: 2_of_3}\n"
        f"  later: {{backends: [\"{d[3]}\"], frequency: daily}}\n",
    )  # fmt: skip
    run_cli("strategy", "apply", home=home)
    shutil.rmtree(home / "tiers" / "later")  # a tier not made yet: its N grows
    res = run_cli("backup", "config", "--add-backend", "later", str(d[4]), home=home)
    assert b"now 1_of_2" in res.stdout and b"remote add" not in res.stderr

    res = run_cli("backup", "config", "--add-backend", "off", str(tmp_path / "new"), home=home)
    # the made vault keeps 2-of-3, and the file says so: N below the backends' number
    assert b"now 2_of_3 over" in res.stdout, res.stdout
    off_home = home / "tiers" / "off"
    step = f"vaultfs remote add --home {off_home} {tmp_path / 'new'}"
    assert step in " ".join(res.stderr.decode().split()), res.stderr
    differs = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)["differs"]
    assert differs["off"] == [f"{tmp_path / 'new'} is in the file, not a remote of the vault: "
                              f"`{step}`"]  # fmt: skip
    st = json.loads(run_cli("status", "--strategy", str(home / "strategy.yaml"), "--json",
                            home=home).stdout)  # fmt: skip
    off = next(r for r in st["tiers"] if r["tier"] == "off")
    assert off["vault"]["k"] == 2 and off["vault"]["n"] == 3 and not off["vault"]["agrees"]
    table = run_cli("status", home=home)
    assert b"2-of-3" in table.stdout and b"off: the vault differs" in table.stderr

    run_cli(*step.split()[1:], home=home)  # the step named: now they agree
    again = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)
    assert "off" not in again["differs"]
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    off = next(r for r in st["tiers"] if r["tier"] == "off")
    assert off["vault"]["agrees"] and len(off["vault"]["remotes"]) == 4
    assert off["survives_losses_design"] == 1

    # a k-of-n the vault cannot have is named, with what to write instead
    f = home / "strategy.yaml"
    f.write_text(f.read_text().replace("2_of_3", "3_of_4"))
    differs = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)["differs"]
    assert "set `erasure_coding: 2_of_3` in the file" in differs["off"][0]


def test_an_ancestor_of_the_newest_manifest_restores_without_a_fork_warning(
    tmp_path: Path,
) -> None:
    vault = init_local_vault(tmp_path, segment_mib=None)
    home, remotes = vault.home, vault.specs
    src = tmp_path / "src"
    src.mkdir()
    seqs = []
    for text in ("one\n", "two\n", "three\n"):
        (src / "doc.txt").write_text(text)
        seqs.append(json.loads(run_cli("backup", str(src), "--json", home=home).stdout)["seq"])
    for seq, text in zip(seqs, ("one\n", "two\n", "three\n"), strict=True):
        to = tmp_path / f"out{seq}"
        res = run_cli("restore", *[a for r in remotes for a in ("--from", r)], "--keyfile",
                      str(home / "key.json"), "--manifest", str(seq), "--to", str(to),
                      home=tmp_path / f"empty{seq}")  # fmt: skip
        assert b"fork" not in res.stderr, res.stderr
        assert (to / "src" / "doc.txt").read_text() == text


def test_the_master_key_on_a_tier_and_a_lost_tier_home_name_the_way_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    nas = tmp_path / "nas"
    _strategy(home, tmp_path, f'  nas: {{backend: "{nas}", frequency: daily}}\n')
    run_cli("strategy", "apply", home=home)
    run_cli("run", "--tier", "nas", home=home)
    res = run_cli("restore", "--from", str(nas), "--keyfile", str(home / "key.json"), "--to",
                  str(tmp_path / "out"), home=tmp_path / "empty", check=10)  # fmt: skip
    msg = " ".join(res.stderr.decode().split())
    assert "vaultfs strategy seed TIER" in msg and "--seed-file" in msg, msg

    shutil.rmtree(home / "tiers" / "nas")  # the tier's home is lost, its remote is not
    rebuild = f"vaultfs home rebuild --home {home / 'tiers' / 'nas'} --from {nas}"
    res = run_cli("strategy", "apply", home=home, check=16)
    msg = " ".join(res.stderr.decode().split())
    assert "vaultfs strategy seed nas --out SEED" in msg and rebuild in msg, msg
    res = run_cli("run", "--tier", "nas", "--json", home=home, check=20)  # a failed tier
    failed = json.loads(res.stdout)["tiers"]["nas"]["failed"]
    assert "vaultfs strategy seed nas --out SEED" in failed and rebuild in failed, failed
    assert not (home / "tiers" / "nas").exists()  # nothing made over the tier's remote
    seed = tmp_path / "nas.seed"
    run_cli("strategy", "seed", "nas", "--out", str(seed), home=home)
    run_cli("home", "rebuild", "--home", str(home / "tiers" / "nas"), "--from", str(nas),
            "--seed-file", str(seed), home=home)  # fmt: skip
    again = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)
    assert again["made"] == {"nas": False} and again["differs"] == {}
    res = run_cli("run", "--tier", "nas", "--json", home=home)
    assert "failed" not in json.loads(res.stdout)["tiers"]["nas"]


def test_strategy_check_checks_sources_on_this_machine_and_show_prints_homes(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    f = _strategy(
        home, tmp_path, f"  nas: {{backend: \"{tmp_path / 'nas'}\", frequency: daily}}\n",
        "  - path: gone\n"
        "  - pg: {dsn: 'postgresql:///kb', pg_dump: /no/such/pg_dump}\n",
    )  # fmt: skip
    res = run_cli("strategy", "check", home=home, check=2)
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 2 and "Traceback" not in res.stderr.decode(), lines
    assert f"{f}:5: sources[1].path: {home / 'gone'} does not exist" in lines[0]
    assert f"{f}:6: sources[2].pg: pg_dump program '/no/such/pg_dump'" in lines[1]
    (home / "gone").mkdir()
    f.write_text(f.read_text().replace("/no/such/pg_dump", shutil.which("sh") or "/bin/sh"))
    run_cli("strategy", "check", home=home)
    shown = run_cli("strategy", "show", home=home, env=vaultfs_env(home, COLUMNS="400"))
    header, row = [ln for ln in shown.stdout.decode().splitlines() if "┃" in ln or "│" in ln][:2]
    assert header.split("┃")[-2].strip() == "home"
    assert row.split("│")[-2].strip() == str(home / "tiers" / "nas")


def test_a_snapshot_of_an_empty_live_tree_after_backup_warns(tmp_path: Path) -> None:
    home = init_local_vault(tmp_path, 1, 2, segment_mib=None).home
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    run_cli("backup", str(src), home=home)
    res = run_cli("snapshot", home=home)
    msg = " ".join(res.stderr.decode().split())
    assert "the live tree is empty" in msg and "vaultfs snapshot delete" in msg, msg
