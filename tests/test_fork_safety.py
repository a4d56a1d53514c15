"""Commands that delete from remotes never delete what a validly signed manifest of any
branch references (docs/design.md invariant 8, docs/operations.md "Forks"): reencrypt's
garbage collection in a forked vault, and `remote remove` in a forked vault. A `remote remove`
whose repair cannot complete leaves the remote in the vault as it was.

Real parts throughout: rclone local remotes, real crypto, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from helpers import PASSPHRASE, init_local_vault, run_cli

from vaultfs import chain
from vaultfs.index import remotes as remote_table
from vaultfs.vault import Vault


def _init(tmp_path: Path, k: int, n: int) -> tuple[Path, list[str]]:
    vault = init_local_vault(tmp_path, k, n)
    return vault.home, vault.specs


def _backup(home: Path, src: Path, *extra: str) -> dict:
    return json.loads(run_cli("backup", str(src), "--json", *extra, home=home).stdout)


def _restore(tmp_path: Path, key: Path, remotes: list[str], out: str, seq: int) -> Path:
    to = tmp_path / out
    run_cli(
        "restore", *[a for r in remotes for a in ("--from", r)], "--keyfile", str(key),
        "--to", str(to), "--json", "--manifest", str(seq), home=tmp_path / f"empty-{out}",
    )  # fmt: skip
    return to


def _forked(tmp_path: Path, k: int, n: int) -> tuple[Path, Path, list[str], Path, dict, dict]:
    """A vault with one shared snapshot (#1, a random 800 KB file), then two branches: the
    main home's #2 and the old home's explicit fork. Returns (home, old home, remotes, src,
    #2's report, the fork's report)."""
    home, remotes = _init(tmp_path, k, n)
    src = tmp_path / "s"
    src.mkdir()
    (src / "shared.bin").write_bytes(os.urandom(800_000))
    _backup(home, src)
    old = tmp_path / "hb"
    shutil.copytree(home, old)
    (src / "m.txt").write_text("x\n")
    main = _backup(home, src)
    forked = _backup(old, src, "--fork")
    assert forked["seq"] > main["seq"] and forked["complete"], forked
    return home, old, remotes, src, main, forked


def _same(a: Path, b: Path) -> None:
    for f in ("shared.bin", "m.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_reencrypt_in_a_fork_keeps_what_the_other_branch_needs(tmp_path):
    home, old, remotes, src, main, forked = _forked(tmp_path, 2, 3)
    res = run_cli("reencrypt", "--suite", "mlkem1024", "--json", home=old)
    rep = json.loads(res.stdout)
    assert rep["retired"] and rep["garbage_deleted"] == 0 and rep["garbage_left"] > 0, rep

    # both branches restore from the remotes, every file intact
    key = home / "key.json"
    _same(src, _restore(tmp_path, key, remotes, "main", main["seq"]) / "s")
    _same(src, _restore(tmp_path, key, remotes, "fork", forked["seq"]) / "s")
    # the re-encrypting home still sees the other branch (under the suite it retired)
    res = run_cli("verify", "--json", home=old, check=None)
    assert any(r["fork"] for r in json.loads(res.stdout)["remotes"]), res.stdout
    before = {p for r in remotes for p in Path(r).rglob("*") if p.is_file()}
    run_cli("repair", home=old, check=None)
    run_cli("prune", home=old, check=None)
    after = {p for r in remotes for p in Path(r).rglob("*") if p.is_file()}
    assert before <= after
    _same(src, _restore(tmp_path, key, remotes, "main-again", main["seq"]) / "s")


def test_remote_remove_in_a_fork_leaves_the_other_branch_in_place(tmp_path):
    home, old, remotes, src, main, forked = _forked(tmp_path, 2, 3)
    gone = remotes[2]
    held = {p.relative_to(gone) for p in Path(gone).rglob("*") if p.is_file()}
    run_cli("remote", "add", str(tmp_path / "r4"), home=old)
    res = run_cli("remote", "remove", gone, "--json", home=old, check=3)  # not cleared
    rep = json.loads(res.stdout)
    assert rep["fork"] and "left its objects in place" in rep["errors"][gone], rep
    assert rep["not_cleared"] == gone and not rep["ok"], rep
    assert held <= {p.relative_to(gone) for p in Path(gone).rglob("*") if p.is_file()}
    # the main branch still restores from any k of its own remotes, the departed one among them
    key = home / "key.json"
    _same(src, _restore(tmp_path, key, remotes[1:], "main", main["seq"]) / "s")
    _same(src, _restore(tmp_path, key, remotes[:2], "main2", main["seq"]) / "s")
    # the forked home carries on without it
    new = [*remotes[:2], str(tmp_path / "r4")]
    _same(src, _restore(tmp_path, key, new, "fork", forked["seq"] + 2) / "s")


def _files(remote: str) -> set[Path]:
    return {p.relative_to(remote) for p in Path(remote).rglob("*") if p.is_file()}


def _member(home: Path, remote: str) -> str:
    rows = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    return next(r["member"] for r in rows if r["remote"] == remote)


def test_remote_remove_reads_the_departing_remote_and_undoes_a_failed_rebuild(tmp_path):
    home, remotes = _init(tmp_path, 2, 3)
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2_500_000))
    _backup(home, src)
    run_cli("remote", "remove", remotes[2], home=home)
    # r2 holds shards no other remote has a copy of: the rebuild reads them from r2 itself
    rep = json.loads(run_cli("remote", "remove", remotes[1], "--json", home=home).stdout)
    assert rep["ok"] and not rep["unrecoverable"], rep
    out = tmp_path / "only-r1"
    run_cli("restore", "--from", remotes[0], "--keyfile", str(home / "key.json"), "--to",
            str(out), home=tmp_path / "empty")  # fmt: skip
    assert (out / "s" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_a_remote_remove_whose_rebuild_fails_leaves_the_remote_in_the_vault(tmp_path):
    home, remotes = _init(tmp_path, 2, 3)
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2_500_000))
    _backup(home, src)
    for r in (remotes[0], remotes[2]):  # two providers lost their data objects
        shutil.rmtree(Path(r) / "data")
    held = _files(remotes[1])
    res = run_cli("remote", "remove", remotes[1], "--json", home=home, check=12)
    rep = json.loads(res.stdout)
    assert rep["unrecoverable"] and "not removed" in rep["errors"][remotes[1]], rep
    assert _member(home, remotes[1]) == "active"
    assert held <= _files(remotes[1])  # nothing deleted from it
    res = run_cli("verify", "--json", home=home, check=None)
    assert res.returncode != 0 and not json.loads(res.stdout)["clean"], res.stdout


def test_index_copies_are_kept_while_another_branch_exists(tmp_path):
    """The other branch's index may name blocks in this chain's older meta segments (both
    share the copies from before the fork): a flush's pruning of old index copies waits."""
    home, old, remotes, src, main, _forked_rep = _forked(tmp_path, 2, 3)
    with Vault.open(old, PASSPHRASE) as v:
        assert v.prune_index_copies(keep=1) == 0
        found = chain.survey(v.keys, v.index, v.remotes())
        assert found.others and found.hold()
    _same(src, _restore(tmp_path, home / "key.json", remotes, "main", main["seq"]) / "s")


def test_a_remote_remove_cut_short_is_finished_by_a_rerun(tmp_path):
    """What a kill -9 during the rebuild leaves (the remote marked removed, its shards still
    the only placed copies of theirs): verify is not clean, and the rerun reads them from it
    and completes."""
    home, remotes = _init(tmp_path, 2, 3)
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2_500_000))
    _backup(home, src)
    run_cli("remote", "remove", remotes[2], home=home)  # 3 shards over 2 remotes now
    with Vault.open(home, PASSPHRASE) as v:
        rid = next(r.id for r in remote_table.every(v.index) if r.spec == remotes[1])
        with v.index.tx() as db:
            remote_table.remove(db, rid)
    res = run_cli("verify", "--json", home=home, check=12)  # never "clean" below k
    audit = json.loads(res.stdout)
    assert audit["below_k"] and not audit["clean"], audit
    rep = json.loads(run_cli("remote", "remove", remotes[1], "--json", home=home).stdout)
    assert rep["ok"] and rep["rebuilt"] > 0 and rep["deleted"], rep
    assert _member(home, remotes[1]) == "removed"
    assert not list((Path(remotes[1]) / "data").iterdir())
    run_cli("verify", home=home)
    res = run_cli("remote", "remove", remotes[1], home=home, check=14)  # nothing left to do
    assert b"not part of this vault" in res.stderr
    out = _restore(tmp_path, home / "key.json", remotes[:1], "o", rep["manifest_seq"])
    assert (out / "s" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
