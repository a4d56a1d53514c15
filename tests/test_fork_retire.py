"""`vaultfs fork retire` ends a fork made on purpose (docs/operations.md, "Living with a
fork"): it deletes the other branch's manifest objects, and nothing else, from every remote,
after which verify reports no fork, repair quarantines the retired branch's objects, prune
frees what the kept branch held back and the routine's audit stops alerting. It refuses in a
stale home, on the older branch, while a remote cannot be looked at, in an immutable vault and
on a remote that locks its objects; a remote that does not delete keeps them for a rerun.

Real parts throughout: rclone local remotes and `rclone serve s3` behind an S3 gateway that
can deny deletes, real crypto, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import PASSPHRASE, run_cli
from s3lock import LockingGateway, TwoKeyS3Server

from vaultfs import chain
from vaultfs.backends import open_backend
from vaultfs.errors import ImmutableVault, InputError, StaleBase, Unreachable
from vaultfs.vault import Vault


def _init(tmp_path: Path, remotes: list[str], *extra: str) -> Path:
    home = tmp_path / "home"
    args = ["init", "--segment-mib", "1", "-k", "2", "-n", "3", *extra]
    for r in remotes:
        args += ["--remote", r]
    run_cli(*args, home=home)
    return home


def _backup(home: Path, src: Path, *extra: str) -> dict:
    return json.loads(run_cli("backup", str(src), "--json", *extra, home=home).stdout)


def _objects(roots: list[Path]) -> set[str]:
    """Every object under the remotes' roots, as root/sub/name."""
    return {str(p) for r in roots for p in r.rglob("*") if p.is_file()}


def _sub(objects: set[str], sub: str) -> set[str]:
    return {o for o in objects if Path(o).parent.name == sub}


def _retire(home: Path, *extra: str, check: int | None = 0) -> tuple[dict, str]:
    res = run_cli("fork", "retire", "--json", *extra, home=home, check=check)
    said = res.stderr.decode()
    assert "Traceback" not in said, said
    return (json.loads(res.stdout) if res.stdout.strip() else {}), said


def test_retiring_a_fork_made_on_purpose(tmp_path: Path) -> None:
    remotes = [tmp_path / f"r{i}" for i in range(3)]
    home = _init(tmp_path, [str(r) for r in remotes])
    src = tmp_path / "src"
    src.mkdir()
    (src / "shared.bin").write_bytes(os.urandom(600_000))
    _backup(home, src)
    old = tmp_path / "old-home"
    shutil.copytree(home, old)
    before = _objects(remotes)
    (src / "main-only.bin").write_bytes(os.urandom(300_000))
    main = _backup(home, src)  # the branch given up below
    given_up = _objects(remotes) - before  # its data, index and manifest objects
    (src / "main-only.bin").unlink()

    # the branch kept: an explicit fork from the old home, then a snapshot it deletes, so its
    # prune has garbage that waits while the fork lasts
    (src / "tmp.bin").write_bytes(os.urandom(1_500_000))
    forked = _backup(old, src, "--fork", "--name", "tmp")
    assert forked["seq"] > main["seq"] and forked["complete"], forked
    (src / "tmp.bin").unlink()
    (src / "kept.txt").write_text("the branch kept\n")
    _backup(old, src)
    run_cli("snapshot", "delete", "tmp", home=old)
    held = json.loads(run_cli("prune", "--json", home=old, check=3).stdout)
    assert held["garbage_left"] > 0 and held["garbage_held"], held
    audit = json.loads(run_cli("verify", "--json", home=old, check=12).stdout)
    fork_objects = {f for r in audit["remotes"] for f in r["fork"]}
    (main_manifest,) = {Path(o).name for o in _sub(given_up, "manifests")}
    assert fork_objects == {f"manifests/{main_manifest}"}, audit

    # the older branch cannot retire the newer one
    snap = _objects(remotes)
    _plan, said = _retire(home, "--yes", check=StaleBase.exit_code)
    assert "newer than this home's" in said and "--fork" in said, said
    assert _objects(remotes) == snap

    # --dry-run lists the other branch's manifest on every remote and deletes nothing
    plan, _said = _retire(old, "--dry-run")
    assert plan["dry_run"] and not plan["deleted"], plan
    (m,) = plan["manifests"]
    assert m["object"] == f"manifests/{main_manifest}" and m["seq"] == main["seq"], m
    assert m["branch"] == f"#{main['seq']}/{main['manifest_hash']}", m
    assert sorted(m["remotes"]) == sorted(str(r) for r in remotes), m
    text = run_cli("fork", "retire", "--dry-run", home=old).stdout.decode()
    assert main_manifest in text and "nothing deleted" in text, text
    # without --yes and no terminal to ask on: nothing deleted either
    res = run_cli("fork", "retire", home=old, check=InputError.exit_code)
    assert b"--yes" in res.stderr and b"Traceback" not in res.stderr, res.stderr
    assert _objects(remotes) == snap

    # --yes deletes exactly that manifest from every remote; `status` no longer shows a fork
    assert json.loads(run_cli("status", "--json", home=old).stdout)["fork"]
    done, _said = _retire(old, "--yes")
    assert json.loads(run_cli("status", "--json", home=old).stdout)["fork"] == []
    assert done["complete"] and not done["errors"], done
    assert done["deleted"] == {str(r): [f"manifests/{main_manifest}"] for r in remotes}, done
    assert snap - _objects(remotes) == {str(r / "manifests" / main_manifest) for r in remotes}
    assert _objects(remotes) <= snap
    again, _said = _retire(old, "--yes")
    assert again["manifests"] == [] and again["complete"], again
    assert "no fork" in run_cli("fork", "retire", home=old).stdout.decode()

    # verify: no fork any more; the given-up branch's objects are foreign (exit 12)
    audit = json.loads(run_cli("verify", "--json", home=old, check=12).stdout)
    assert not any(r["fork"] for r in audit["remotes"]), audit
    foreign = {f"{r['remote']}/{f}" for r in audit["remotes"] for f in r["foreign"]}
    assert _sub(given_up, "data") <= foreign and foreign <= given_up, (foreign, given_up)

    # repair moves them to quarantine/ (nothing else), prune frees the held garbage
    rep = json.loads(run_cli("repair", "--json", home=old).stdout)
    moved = {q.replace(":", "/", 1) for q in rep["quarantined"]}
    assert moved == foreign and not rep["fork"], rep
    for o in foreign:
        p = Path(o)
        assert not p.exists() and (p.parent.parent / "quarantine" / p.parent.name / p.name).exists()
    freed = json.loads(run_cli("prune", "--json", home=old).stdout)
    assert freed["garbage_deleted"] >= held["garbage_left"], freed
    assert not freed["garbage_left"] and not freed["garbage_held"], freed
    run_cli("verify", "--read-all", home=old)

    # the routine's audit no longer alerts
    log = tmp_path / "events.jsonl"
    run_cli("schedule", "set", "verify=1s:100%", f"alert=cat >> {log}", home=old)
    ran = json.loads(run_cli("run", "--json", home=old).stdout)
    assert not ran["failed"], ran
    assert not log.exists() or not log.read_text().strip()

    # the kept branch restores whole; the retired one is gone
    from_all = [a for r in remotes for a in ("--from", str(r))]
    key = ["--keyfile", str(home / "key.json")]
    out = tmp_path / "restored"
    run_cli("restore", *from_all, *key, "--to", str(out), home=tmp_path / "none")
    for f in ("shared.bin", "kept.txt"):
        assert (out / "src" / f).read_bytes() == (src / f).read_bytes()
    res = run_cli("restore", *from_all, *key, "--manifest", str(main["seq"]), "--to",
                  str(tmp_path / "gone"), home=tmp_path / "none2", check=InputError.exit_code)  # fmt: skip
    assert b"Traceback" not in res.stderr


@pytest.fixture
def gateway(tmp_path: Path, rclone_bin: Path):
    """`rclone serve s3` behind an S3 gateway (tests/s3lock.py) whose ``delete_keys`` can
    deny every delete, as an IAM policy would."""
    server = TwoKeyS3Server(tmp_path / "s3", rclone_bin)
    gw = LockingGateway(server)
    try:
        yield gw
    finally:
        gw.stop()
        server.stop()


def test_retire_refuses_stale_unreachable_and_locked_and_a_rerun_finishes(
    tmp_path: Path, gateway: LockingGateway
) -> None:
    local = [tmp_path / "r0", tmp_path / "r1"]
    s3 = gateway.remote("bucket/vault")
    s3_root = gateway.upstream.root / "bucket" / "vault"
    roots = [*local, s3_root]
    home = _init(tmp_path, [*map(str, local), s3])
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(400_000))
    _backup(home, src)
    old = tmp_path / "old-home"
    shutil.copytree(home, old)
    (src / "b.txt").write_text("main\n")
    main = _backup(home, src)

    # a stale home: the remotes continue its chain; that is no fork, nothing to retire
    snap = _objects(roots)
    _plan, said = _retire(old, "--yes", check=StaleBase.exit_code)
    assert "stale home" in said and "home rebuild" in said, said
    assert _objects(roots) == snap

    (src / "b.txt").write_text("forked\n")
    _backup(old, src, "--fork")
    snap = _objects(roots)
    (main_manifest,) = {
        Path(o).name for o in _sub(snap, "manifests") if Path(o).name.startswith(f"{main['seq']:016d}")
    }  # fmt: skip

    # a remote that does not list its manifests: refused, nothing deleted anywhere
    off = tmp_path / "r0.off"
    shutil.move(local[0], off)
    local[0].write_text("not a directory")
    _plan, said = _retire(old, "--yes", check=Unreachable.exit_code)
    assert str(local[0]) in said and "nothing was deleted" in said, said
    assert "fork retire` again" in said, said
    local[0].unlink()
    shutil.move(off, local[0])
    assert _objects(roots) == snap

    # a remote whose spec asks for S3 Object Lock: refused before anything is deleted
    locked = s3.replace(":bucket/vault", ",object_lock_mode=COMPLIANCE:bucket/vault")
    with Vault.open(old, PASSPHRASE) as v:
        backends = [open_backend(str(r)) for r in local] + [open_backend(locked)]
        with pytest.raises(ImmutableVault, match="Object Lock"):
            chain.plan_retirement(v.keys, v.index, backends, v.immutable)
        plan = chain.plan_retirement(v.keys, v.index, v.remotes(), v.immutable)
        assert [s.name for s in plan.manifests] == [main_manifest]
    assert _objects(roots) == snap

    # the S3 remote denies every delete: the local remotes lose the manifest, it keeps it
    gateway.delete_keys = set()
    done, said = _retire(old, "--yes", check=Unreachable.exit_code)
    assert not done["complete"], done
    labels = {r["remote"] for r in json.loads(run_cli("remote", "list", "--json", home=old).stdout)}
    (s3_label,) = labels - {str(r) for r in local}
    assert set(done["errors"]) == {s3_label} and set(done["deleted"]) == set(map(str, local)), done
    assert (
        "stay to be done"
        in run_cli("fork", "retire", "--yes", home=old, check=Unreachable.exit_code).stderr.decode()
    )
    assert (s3_root / "manifests" / main_manifest).exists()
    assert not any((r / "manifests" / main_manifest).exists() for r in local)
    assert gateway.refused
    # allowed again, a rerun finishes on the remote that still holds it
    gateway.delete_keys = None
    done, _said = _retire(old, "--yes")
    assert done["complete"] and done["deleted"] == {s3_label: [f"manifests/{main_manifest}"]}
    assert snap - _objects(roots) == {str(r / "manifests" / main_manifest) for r in roots}
    audit = json.loads(run_cli("verify", "--json", home=old, check=12).stdout)
    assert not any(r["fork"] for r in audit["remotes"]), audit


def test_retire_refuses_in_an_immutable_vault(tmp_path: Path) -> None:
    remotes = [tmp_path / f"r{i}" for i in range(3)]
    home = _init(tmp_path, [str(r) for r in remotes], "--immutable")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    _backup(home, src)
    old = tmp_path / "old-home"
    shutil.copytree(home, old)
    (src / "a.txt").write_text("two\n")
    _backup(home, src)
    (src / "a.txt").write_text("three\n")
    _backup(old, src, "--fork")
    snap = _objects(remotes)
    for extra in ("--yes", "--dry-run"):
        _plan, said = _retire(old, extra, check=ImmutableVault.exit_code)
        assert "immutable" in said and "nothing was deleted" in said, said
    assert _objects(remotes) == snap
