"""The signed manifest chain (docs/format.md 10.3): a home that goes back in time is refused
or forks explicitly, restore reports forks and restores the branch asked for, repair deletes
nothing a signed manifest references, and rollback anchors hold on an empty machine."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import format_reader
from helpers import PASSPHRASE, init_local_vault, run_cli

from vaultfs.backends import Backend, Wrapper
from vaultfs.keys import read_keyfile


def _init(tmp_path: Path, n: int = 5, k: int = 3) -> tuple[Path, list[str]]:
    vault = init_local_vault(tmp_path, k, n, prefix="remote")
    return vault.home, vault.specs


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

    # the stranger's reader, from docs/format.md alone, restores either branch too
    seed = read_keyfile(home / "key.json", PASSPHRASE).seed
    assert format_reader.recover_file(seed, [Path(r) for r in remotes], "src/doc.txt") == b"four\n"
    got = format_reader.recover_file(seed, [Path(r) for r in remotes], "src/doc.txt", want)
    assert got == b"three\n"

    # verify reports the fork; repair deletes nothing a signed manifest references
    res = run_cli("verify", "--json", home=home, check=None)
    audit = json.loads(res.stdout)
    assert any(r["fork"] for r in audit["remotes"]), audit
    before = _objects(remotes)
    run_cli("repair", home=home, check=None)
    assert before <= _objects(remotes)

    # prune on branch B after deleting the snapshot both branches share: its objects are
    # garbage for B, and kept while the remotes hold branch A
    run_cli("snapshot", "delete", first["snapshot"], home=home)
    res = run_cli("prune", "--json", home=home, check=None)
    assert json.loads(res.stdout)["garbage_deleted"] == 0, res.stdout
    b_seq = json.loads(run_cli("status", "--json", home=home).stdout)["seq"]

    # every snapshot of both branches still restores
    for branch, texts in ((str(b_seq), ["four\n"]), (want, ["one\n", "two\n", "three\n"])):
        listing = _restore(tmp_path, home, remotes, f"list-{branch[0]}", "--manifest", branch)
        snaps = sorted(json.loads(listing.stdout)["snapshots"], key=lambda s: s["seq"])
        assert len(snaps) == len(texts)
        for s, text in zip(snaps, texts, strict=True):
            out = f"b{branch[0]}-{s['id']}"
            _restore(tmp_path, home, remotes, out, "--manifest", branch, "--snapshot", s["id"])
            assert (tmp_path / out / "src" / "doc.txt").read_text() == text


def test_k_remotes_hiding_the_newest_manifest_are_refused_with_an_anchor(tmp_path):
    home, remotes = _init(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "old\n")
    new = _backup(home, src, "new\n")
    receipt = tmp_path / "receipt.json"
    run_cli("receipt", "latest", "--out", str(receipt), home=home)
    assert json.loads(receipt.read_text())["statement"]["manifest_hash"].startswith(
        new["manifest_hash"]
    )
    # the anchors hold against honest remotes
    rep = json.loads(_restore(tmp_path, home, remotes, "ok", "--receipt", str(receipt)).stdout)
    assert (rep["seq"], rep["manifest_hash"]) == (new["seq"], new["manifest_hash"])

    hiding = remotes[:3]  # k = 3 remotes that hide the newest manifest
    for r in hiding:
        for m in (Path(r) / "manifests").iterdir():
            if m.name.startswith(f"{new['seq']:016d}-"):
                m.unlink()
    # with no anchor an empty machine cannot tell: the older snapshot comes back, numbered
    rep = json.loads(_restore(tmp_path, home, hiding, "no-anchor").stdout)
    assert rep["seq"] == new["seq"] - 1
    assert (tmp_path / "no-anchor" / "src" / "doc.txt").read_text() == "old\n"
    for extra in (("--min-seq", str(new["seq"])), ("--receipt", str(receipt))):
        res = _restore(tmp_path, home, hiding, f"r{extra[0]}", *extra, check=12)
        assert b"rollback detected" in res.stderr, res.stderr
        assert not (tmp_path / f"r{extra[0]}").exists()


def test_kill_9_during_commits_leaves_the_chain_linear_and_restorable(tmp_path):
    import torture

    res = torture.Chamber(tmp_path, seed=11).run(torture.OPERATIONS["backup"], 8)
    assert res.recovered == res.trials == 8, res.failures
    assert res.bytes_lost == 0


def test_two_writers_racing_to_one_seq_are_reported_as_a_fork(tmp_path):
    """Two homes that checked at the same moment (no compare-and-swap on remotes) both place
    a manifest #2: restore and verify name the other branch; either restores."""
    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "base\n")
    other = tmp_path / "other-home"
    shutil.copytree(home, other)
    pristine = tmp_path / "pristine"
    for i, r in enumerate(remotes):
        shutil.copytree(r, pristine / str(i))
    a = _backup(home, src, "writer a\n")
    # writer B sees the remotes as they were (it checked before A placed), and places its #2
    for i, r in enumerate(remotes):
        shutil.move(r, tmp_path / f"a-side{i}")
        shutil.copytree(pristine / str(i), r)
    b = _backup(other, src, "writer b\n")
    assert a["seq"] == b["seq"] == 2 and a["manifest_hash"] != b["manifest_hash"]
    for i, r in enumerate(remotes):  # both writers' objects on the remotes
        shutil.copytree(tmp_path / f"a-side{i}", r, dirs_exist_ok=True)

    rep = json.loads(_restore(tmp_path, home, remotes, "default").stdout)
    used, fork = (rep["seq"], rep["manifest_hash"]), rep["fork"]
    assert used in {(2, a["manifest_hash"]), (2, b["manifest_hash"])}
    assert [(f["seq"], f["manifest_hash"]) for f in fork] == [
        (2, a["manifest_hash"] if used[1] == b["manifest_hash"] else b["manifest_hash"])
    ]
    for w, text in ((a, "writer a\n"), (b, "writer b\n")):
        out = f"w{w['manifest_hash'][:4]}"
        _restore(tmp_path, home, remotes, out, "--manifest", f"2/{w['manifest_hash']}")
        assert (tmp_path / out / "src" / "doc.txt").read_text() == text
    audit = json.loads(run_cli("verify", "--json", home=home, check=12).stdout)
    assert all(r["fork"] and r["state"] == "forked" for r in audit["remotes"]), audit
    refused = _backup(home, src, "a again\n", check=21)["stderr"]
    assert f"#2/{b['manifest_hash']}" in refused


def test_a_commit_made_offline_is_checked_again_and_never_placed_when_stale(tmp_path):
    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "one\n")
    shutil.copytree(home, tmp_path / "old-home")
    _backup(home, src, "two\n")
    _backup(home, src, "three\n")
    shutil.rmtree(home)
    shutil.copytree(tmp_path / "old-home", home)
    for i, r in enumerate(remotes):  # the remotes cannot be seen: the commit goes ahead
        shutil.move(r, tmp_path / f"away{i}")
    offline = _backup(home, src, "offline\n", "--no-upload")
    assert offline["seq"] == 2
    for i, r in enumerate(remotes):
        shutil.move(tmp_path / f"away{i}", r)
    names = {p.name for r in remotes for p in (Path(r) / "manifests").iterdir()}

    res = run_cli("flush", "--json", home=home, check=21)
    assert json.loads(res.stdout)["stale_base"].startswith("manifest not placed")
    assert {p.name for r in remotes for p in (Path(r) / "manifests").iterdir()} == names
    res = run_cli("flush", home=home, check=21)
    assert b"vaultfs home rebuild --from" in res.stderr

    forked = _backup(home, src, "forked\n", "--fork")
    assert forked["seq"] == 4 and forked["complete"]
    placed = {p.name for r in remotes for p in (Path(r) / "manifests").iterdir()} - names
    assert {int(n.split("-")[0]) for n in placed} == {4}  # the refused #2 never went out
    rep = json.loads(_restore(tmp_path, home, remotes, "out").stdout)
    assert rep["seq"] == 4 and [f["seq"] for f in rep["fork"]] == [3]
    assert {s["seq"] for s in rep["snapshots"]} == {1, 2, 4}  # the offline snapshot is kept


def _refused_then_quarantined(root: Path, src: Path) -> tuple[Path, list[str], set[str]]:
    """A home refused for a stale base after sending new data, and another home's repair
    moving that unnamed data to quarantine/: (the refused home, its remotes, quarantined)."""
    home, remotes = _init(root, 3, 2)
    (src / "big.bin").unlink(missing_ok=True)
    _backup(home, src, "one\n")
    other = root / "other-home"
    shutil.copytree(home, other)
    _backup(other, src, "two\n")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))  # new data shards, placed early
    _backup(home, src, "three\n", check=21)
    run_cli("verify", home=other, check=12)  # foreign objects on every remote
    run_cli("repair", home=other)
    quarantined = {p.name for r in remotes for p in Path(r).glob("quarantine/data/*")}
    assert quarantined
    return home, remotes, quarantined


def test_a_fork_takes_back_what_another_homes_repair_quarantined(tmp_path):
    """A backup refused for a stale base may already have placed its data (the shards go out
    while the base check waits); another home's repair moves those unnamed objects to
    quarantine/. The later --fork names them: it copies them back first, so its snapshot
    restores; with one of them gone for good it refuses instead of recording it."""
    src = tmp_path / "src"
    src.mkdir()
    home, remotes, quarantined = _refused_then_quarantined(tmp_path / "a", src)
    forked = _backup(home, src, "three\n", "--fork")
    assert forked["complete"], forked
    assert quarantined <= {p.name for r in remotes for p in Path(r).glob("data/*")}
    out = _restore(tmp_path, home, remotes, "out", "--manifest", str(forked["seq"]))
    assert json.loads(out.stdout)["seq"] == forked["seq"]
    assert (tmp_path / "out" / "src" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    res = run_cli("verify", home=home, check=12)  # the fork is reported, no shard is missing
    assert b"fork" in res.stderr and b"absent" not in res.stdout + res.stderr

    # the same with the quarantined objects gone: the fork refuses, recording nothing
    home, remotes, _q = _refused_then_quarantined(tmp_path / "b", src)
    for r in remotes:
        shutil.rmtree(Path(r) / "quarantine")
    before = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    err = _backup(home, src, "three\n", "--fork", check=11)["stderr"]
    assert "fork refused" in err and "vaultfs repair" in err, err
    assert json.loads(run_cli("snapshots", "--json", home=home).stdout) == before


def test_a_backup_surveys_as_it_starts_and_the_flush_still_refuses_a_newer_manifest(tmp_path):
    """The commit's base check runs beside the backup's reading (Vault.survey_ahead); a
    manifest another writer places after that survey goes unseen by the commit, but the
    flush surveys again and never places a manifest on the now stale base (invariant 7)."""
    import io
    import time

    from vaultfs.vault import Entry, Vault

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "base\n")
    other = tmp_path / "other-home"
    shutil.copytree(home, other)
    with Vault.open(home, PASSPHRASE) as v:
        assert v.survey_ahead()().others == []  # the base is current when the backup starts
        theirs = _backup(other, src, "other writer\n")  # ...and stale before it commits
        names = {p.name for r in remotes for p in (Path(r) / "manifests").iterdir()}
        cids, size = v.store_stream(io.BytesIO(b"mine\n"))
        _uid, seq = v.commit([Entry("doc.txt", "f", 0o644, time.time_ns(), size=size, cids=cids)])
        assert seq == theirs["seq"] == 2
        rep = v.flush(quorum=True)
        assert rep.stale_base.startswith("manifest not placed"), rep
    assert {p.name for r in remotes for p in (Path(r) / "manifests").iterdir()} == names
    refused = _backup(home, src, "again\n", check=21)["stderr"]
    assert f"#2/{theirs['manifest_hash']}" in refused


class _LateManifests(Wrapper):
    """A remote whose ``manifests/`` listing answers only once ``release`` is set (or after
    ``wait`` seconds): a slow provider, as the chain survey sees it."""

    def __init__(self, inner: Backend, release: threading.Event, wait: float) -> None:
        super().__init__(inner)
        self.release, self.wait, self.asked = release, wait, 0

    def list_sizes(self, sub: str) -> dict[str, int]:
        if sub == "manifests":
            self.asked += 1
            self.release.wait(self.wait)
        return super().list_sizes(sub)


def _late(monkeypatch, spec: str, release: threading.Event) -> list[_LateManifests]:
    """From now on, the vault's backends of ``spec`` answer manifest listings only once
    ``release`` is set; returns the wrappers made."""
    import vaultfs.vault

    made: list[_LateManifests] = []
    real = vaultfs.vault.open_backend

    def opened(s: str, rid: int | None = None, **kw) -> Backend:
        if s != spec:
            return real(s, rid, **kw)

        def wrap(b: Backend) -> Backend:
            made.append(_LateManifests(b, release, 60))
            return made[-1]

        return real(s, rid, wrap=wrap, **kw)

    monkeypatch.setattr(vaultfs.vault, "open_backend", opened)
    return made


def _manifests(remotes: list[str]) -> dict[str, set[str]]:
    """Remote -> the manifest object names it holds."""
    return {r: {p.name for p in (Path(r) / "manifests").glob("*")} for r in remotes}


def test_a_newer_manifest_on_a_remote_that_answers_late_still_stops_the_flush(
    tmp_path, monkeypatch
):
    """The flush's survey runs beside the shard uploads and placing waits for it: a remote
    that lists its manifests late (after the shards are placed, within chain.CHECK_BOUND)
    is still heard, and another writer's manifest that only it holds still keeps this
    writer's manifest off every remote (invariant 7)."""
    import io
    import time

    from vaultfs.vault import Entry, Vault

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "base\n")
    other = tmp_path / "other-home"
    shutil.copytree(home, other)
    release = threading.Event()
    with Vault.open(home, PASSPHRASE) as v:
        assert v.survey_ahead()().others == []  # the base is current when the backup starts
        mine = _manifests(remotes)
        theirs = _backup(other, src, "other writer\n")  # ...and stale before it commits
        for r in remotes[:-1]:  # their manifest stays on the last remote only
            for name in _manifests([r])[r] - mine[r]:
                (Path(r) / "manifests" / name).unlink()
        before = _manifests(remotes)
        assert before[remotes[-1]] - mine[remotes[-1]], "the last remote holds theirs"
        cids, size = v.store_stream(io.BytesIO(b"mine\n"))
        v.commit([Entry("doc.txt", "f", 0o644, time.time_ns(), size=size, cids=cids)])
        late = _late(monkeypatch, remotes[-1], release)
        timer = threading.Timer(1.0, release.set)  # the last remote answers a second late
        timer.start()
        try:
            rep = v.flush(quorum=True)
        finally:
            timer.cancel()
            release.set()
    assert late and late[0].asked, "the survey asked the late remote"
    assert rep.stale_base and f"#2/{theirs['manifest_hash']}" in rep.stale_base, rep
    assert rep.unchecked == []
    assert _manifests(remotes) == before, "no manifest of this writer was placed"


def test_a_remote_silent_past_the_bound_is_reported_as_not_checked(tmp_path, monkeypatch):
    """A remote that does not list its manifests within chain.CHECK_BOUND does not hold the
    flush: the manifest is placed after the others were surveyed, and the flush names the
    remote it could not check (never silently)."""
    from vaultfs import chain
    from vaultfs.backends import open_backend
    from vaultfs.backup import backup_paths
    from vaultfs.vault import Vault

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc.txt").write_text("one\n")
    monkeypatch.setattr(chain, "CHECK_BOUND", 0.5)
    release = threading.Event()
    before = _manifests(remotes)
    try:
        with Vault.open(home, PASSPHRASE) as v:
            late = _late(monkeypatch, remotes[-1], release)
            backup_paths(v, [src], upload=True)
            rep = v.flush(quorum=True)
    finally:
        release.set()
    assert any(w.asked for w in late)
    label = open_backend(remotes[-1]).label
    assert rep.unchecked == [label] and rep.stale_base is None, rep
    assert label in chain.unchecked_warning(label)
    held = _manifests(remotes)
    assert all(len(held[r] - before[r]) == 1 for r in remotes), held  # placed everywhere


class _LateListing(Wrapper):
    """A remote whose listing comes back only once ``release`` is set: everything a restore
    learns of it (its objects, its newest manifest) arrives late."""

    def __init__(self, inner: Backend, release: threading.Event) -> None:
        super().__init__(inner)
        self.release = release

    def list_tree(self, subs: tuple[str, ...] = ("data", "meta", "manifests")):
        self.release.wait(60)
        return super().list_tree(subs)


def _restore_leaving_one_late(tmp_path: Path, home: Path, remotes: list[str], release):
    """Open the remote index as `vaultfs restore --from` does (late remotes allowed), the last
    remote answering only once ``release`` is set, and restore; (keys, source, branches,
    index, warnings)."""
    from vaultfs.backends import open_backend
    from vaultfs.keys import VaultKeys
    from vaultfs.restore import Branches, ShardSource, open_remote_index, restore_files

    keys = VaultKeys.from_seed(read_keyfile(home / "key.json", PASSPHRASE).seed)
    backends = [open_backend(r) for r in remotes[:-1]]
    backends.append(open_backend(remotes[-1], wrap=lambda b: _LateListing(b, release)))
    src = ShardSource(backends)
    src.start()
    found = Branches()
    index, src, _m, warnings = open_remote_index(
        keys, backends, tmp_path / "work", src=src, branches=found, late_ok=True
    )
    restore_files(keys, index, src, tmp_path / "out")
    return keys, src, found, index, warnings


def test_a_restore_goes_on_without_a_late_remote_and_still_catches_its_newer_manifest(tmp_path):
    """The rollback check of a restore is off its critical path, not weakened: the restore
    starts from the k remotes that answered, and before it reports success it waits for the
    late one; a newer manifest only that remote holds (the others rolled back) is Rollback."""
    import pytest

    from vaultfs.errors import Rollback
    from vaultfs.restore import check_late

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "one\n")
    older = _manifests(remotes)
    newest = _backup(home, src, "two\n")
    for r in remotes[:-1]:  # rolled back: the newest manifest is on the late remote only
        for name in _manifests([r])[r] - older[r]:
            (Path(r) / "manifests" / name).unlink()
    release = threading.Event()
    try:
        keys, source, found, index, _w = _restore_leaving_one_late(tmp_path, home, remotes, release)
        assert list(found.late) == [source.remotes[-1].spec], "it went on without the late one"
        assert (tmp_path / "out" / "src" / "doc.txt").read_text() == "one\n"
        release.set()
        with pytest.raises(Rollback, match=f"#{newest['seq']}"):
            check_late(keys, source, found, index)
        index.close()
    finally:
        release.set()


def test_a_late_remote_that_never_answers_is_named_as_not_checked(tmp_path, monkeypatch):
    from vaultfs import chain
    from vaultfs.restore import check_late

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "one\n")
    monkeypatch.setattr(chain, "CHECK_BOUND", 0.5)
    release = threading.Event()
    try:
        keys, source, found, index, said = _restore_leaving_one_late(
            tmp_path, home, remotes, release
        )
        assert (tmp_path / "out" / "src" / "doc.txt").read_text() == "one\n"
        warnings = check_late(keys, source, found, index, said)
        index.close()
    finally:
        release.set()
    late = source.remotes[-1].label
    assert [w for w in warnings if "not checked" in w] == [
        f"{late} did not answer within 0.5s: not checked for a newer manifest or another branch"
        " (docs/format.md 10.3)"
    ]


class _ReleasesOnIndexRead(Wrapper):
    """A remote that sets ``release`` when the index is first read from it: the moment a
    restore goes on from the remotes that answered first."""

    def __init__(self, inner: Backend, release: threading.Event) -> None:
        super().__init__(inner)
        self.release = release

    def get(self, sub: str, names: list[str], local_dir: Path, max_bytes: int = 0) -> None:
        if sub == "meta":
            self.release.set()
        super().get(sub, names, local_dir, max_bytes)


def test_a_late_remote_heard_within_the_grace_with_a_newer_manifest_is_restored_from(
    tmp_path, monkeypatch
):
    """The grace for a late remote runs while the index of the first k's manifest is
    fetched; a newer manifest heard within it is chosen (and its index fetched) instead of
    failing as a rollback at the end."""
    from vaultfs import hedging, restore
    from vaultfs.backends import open_backend
    from vaultfs.keys import VaultKeys
    from vaultfs.restore import Branches, ShardSource, check_late, open_remote_index

    home, remotes = _init(tmp_path, 3, 2)
    src = tmp_path / "src"
    src.mkdir()
    _backup(home, src, "one\n")
    older = _manifests(remotes)
    newest = _backup(home, src, "two\n")
    for r in remotes[:-1]:  # the newest manifest is on the late remote only
        for name in _manifests([r])[r] - older[r]:
            (Path(r) / "manifests" / name).unlink()
    monkeypatch.setattr(hedging, "GRACE_MIN", 60.0)  # the late remote answers within it
    monkeypatch.setattr(restore, "READ_IN_PLACE", False)  # index reads go through get()
    keys = VaultKeys.from_seed(read_keyfile(home / "key.json", PASSPHRASE).seed)
    release = threading.Event()
    backends = [open_backend(remotes[0], wrap=lambda b: _ReleasesOnIndexRead(b, release))]
    backends.append(open_backend(remotes[1]))
    backends.append(open_backend(remotes[2], wrap=lambda b: _LateListing(b, release)))
    source = ShardSource(backends)
    source.start()
    found = Branches()
    try:
        index, source, m, _w = open_remote_index(
            keys, backends, tmp_path / "work", src=source, branches=found, late_ok=True
        )
        assert release.is_set(), "the index was read before the late remote answered"
        assert m.seq == newest["seq"] and not found.late
        restore.restore_files(keys, index, source, tmp_path / "out")
        assert (tmp_path / "out" / "src" / "doc.txt").read_text() == "two\n"
        assert not [w for w in check_late(keys, source, found, index) if "not checked" in w]
        index.close()
    finally:
        release.set()
        source.stop()
