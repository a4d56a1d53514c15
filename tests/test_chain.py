"""The signed manifest chain (docs/format.md 10.3): a home that goes back in time is refused
or forks explicitly, restore reports forks and restores the branch asked for, repair deletes
nothing a signed manifest references, and rollback anchors hold on an empty machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import run_cli


def _init(tmp_path: Path, n: int = 5, k: int = 3) -> tuple[Path, list[str]]:
    home = tmp_path / "home"
    remotes = [str(tmp_path / f"remote{i}") for i in range(n)]
    args = ["init", "--segment-mib", "1", "-k", str(k), "-n", str(n)]
    for r in remotes:
        args += ["--remote", r]
    run_cli(*args, home=home)
    return home, remotes


def _backup(home: Path, src: Path, text: str, *extra: str, check: int = 0) -> dict:
    (src / "doc.txt").write_text(text)
    res = run_cli("backup", str(src), "--json", *extra, home=home, check=check)
    return json.loads(res.stdout) if check == 0 else {"stderr": res.stderr.decode()}


def _objects(remotes: list[str]) -> set[str]:
    """Every object on the remotes, as remote/sub/name."""
    return {str(p) for r in remotes for p in Path(r).rglob("*") if p.is_file()}


def _restore(tmp_path: Path, home: Path, remotes: list[str], out: str, *extra: str, check: int = 0):
    return run_cli(
        "restore", *[a for r in remotes for a in ("--from", r)], "--keyfile",
        str(home / "key.json"), "--to", str(tmp_path / out), "--json", *extra,
        home=tmp_path / f"empty-{out}", check=check,
    )  # fmt: skip


def test_a_home_back_in_time_is_refused_or_forks_explicitly_and_both_branches_restore(tmp_path):
    home, remotes = _init(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    first = _backup(home, src, "one\n")
    assert first["seq"] == 1 and len(first["manifest_hash"]) == 16
    shutil.copytree(home, tmp_path / "old-home")  # a disk image of the home, taken now
    a2 = _backup(home, src, "two\n")
    a3 = _backup(home, src, "three\n")
    assert (a2["seq"], a3["seq"]) == (2, 3)
    shutil.move(home, tmp_path / "new-home")
    shutil.copytree(tmp_path / "old-home", home)  # the old copy put back

    before = _objects(remotes)
    refused = _backup(home, src, "four\n", check=21)["stderr"]
    assert "vaultfs home rebuild --from" in refused and "--fork" in refused, refused
    assert "#3/" + a3["manifest_hash"] in refused
    placed = {p for p in _objects(remotes) - before if "/manifests/" in p}
    assert not placed  # a refused commit places no manifest
    assert json.loads(run_cli("snapshots", "--json", home=home).stdout)[-1]["seq"] == 1

    b = _backup(home, src, "four\n", "--fork")
    assert b["seq"] == 4 and b["complete"], b  # numbered above the remotes' newest
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["seq"] == 4 and st["fork"] and "#3/" in st["fork"][0]

    # the other writer (the newer home) now finds a manifest it never wrote: refused too
    refused = _backup(tmp_path / "new-home", src, "five\n", check=21)["stderr"]
    assert "#4/" + b["manifest_hash"] in refused

    # restore from all remotes: the newest branch by default, the fork reported
    res = _restore(tmp_path, home, remotes, "newest")
    rep = json.loads(res.stdout)
    assert (rep["seq"], rep["manifest_hash"]) == (4, b["manifest_hash"])
    assert [f["seq"] for f in rep["fork"]] == [3]
    assert rep["fork"][0]["manifest_hash"] == a3["manifest_hash"]
    assert (tmp_path / "newest" / "src" / "doc.txt").read_text() == "four\n"
    res = run_cli(
        "restore", *[a for r in remotes for a in ("--from", r)], "--keyfile",
        str(home / "key.json"), "--to", str(tmp_path / "human"), home=tmp_path / "e",
    )  # fmt: skip
    assert b"fork: the remotes hold another branch" in res.stderr
    assert f"#4/{b['manifest_hash']}".encode() in res.stdout

    # the branch asked for, by seq/hash prefix
    want = f"3/{a3['manifest_hash'][:8]}"
    rep = json.loads(_restore(tmp_path, home, remotes, "branch-a", "--manifest", want).stdout)
    assert rep["seq"] == 3 and [f["seq"] for f in rep["fork"]] == [4]
    assert (tmp_path / "branch-a" / "src" / "doc.txt").read_text() == "three\n"

    # verify reports the fork; repair deletes nothing a signed manifest references
    res = run_cli("verify", "--json", home=home, check=None)
    audit = json.loads(res.stdout)
    assert any(r["fork"] for r in audit["remotes"]), audit
    before = _objects(remotes)
    run_cli("repair", home=home, check=None)
    assert before <= _objects(remotes)

    # every snapshot of both branches still restores
    for branch, texts in (("4", ["one\n", "four\n"]), (want, ["one\n", "two\n", "three\n"])):
        rep = json.loads(
            _restore(tmp_path, home, remotes, f"list-{branch[0]}", "--manifest", branch).stdout
        )
        snaps = sorted(rep["snapshots"], key=lambda s: s["seq"])
        assert len(snaps) == len(texts)
        for s, text in zip(snaps, texts, strict=True):
            out = f"b{branch[0]}-{s['id']}"
            _restore(tmp_path, home, remotes, out, "--manifest", branch, "--snapshot", s["id"])
            assert (tmp_path / out / "src" / "doc.txt").read_text() == text
