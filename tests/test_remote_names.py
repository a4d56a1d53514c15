"""How a vault names its remotes: two connection strings with the same path on different servers
get different labels, a name that fits several remotes is refused (exit 18) by every command
that takes one, `home rebuild` shows no secret of a spec, and `init` refuses one directory
given twice under two names. Real `rclone serve webdav` servers on 127.0.0.1 and real local
directories."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers import WebdavServer, run_cli

from vaultfs.errors import InputError
from vaultfs.remotes import Remote

pytestmark = pytest.mark.network


def _legacy(spec: str) -> str:
    """The label as vaultfs showed it before labels were unique: ``:backend:…:path``."""
    return f"{spec.split(',', 1)[0]}:…:{spec.rsplit(':', 1)[-1]}"


def test_same_path_on_two_servers(tmp_path: Path, rclone_bin: Path) -> None:
    servers = [WebdavServer(tmp_path / f"webdav{i}", rclone_bin) for i in range(2)]
    try:
        _same_path_on_two_servers(tmp_path, servers)
    finally:
        for s in servers:
            s.stop()


def _same_path_on_two_servers(tmp_path: Path, servers: list[WebdavServer]) -> None:
    home = tmp_path / "home"
    dav = [s.remote("vault") for s in servers]
    locs = [tmp_path / f"loc{i}" for i in range(2)]
    args = ["init", "-k", "2", "-n", "4", "--segment-mib", "1"]
    for r in [*map(str, locs), *dav]:
        args += ["-r", r]
    run_cli(*args, home=home)
    labels = [Remote(d).label for d in dav]
    assert labels[0] != labels[1] and _legacy(dav[0]) == _legacy(dav[1])
    listed = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    assert {r["remote"] for r in listed} == {*map(str, locs), *labels}

    # every remote has its own entry in the maps keyed by label
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random.Random(1).randbytes(600_000))
    rep = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)
    assert set(rep["pending"]) == {*map(str, locs), *labels}, rep["pending"]
    # a lagging remote is not hidden by its namesake
    servers[0].stop()
    (src / "g.bin").write_bytes(random.Random(2).randbytes(300_000))
    rep = json.loads(run_cli("backup", str(src), "--json", home=home, check=None).stdout)
    assert rep["pending"][labels[0]] > 0 and rep["pending"][labels[1]] == 0, rep["pending"]
    servers[0].start()
    run_cli("flush", home=home)

    # `home rebuild` names the remotes by label: the spec's password is not printed
    secret = servers[0].obscured_password
    for extra in ([], ["--json"]):
        new_home = tmp_path / f"home-rebuilt{len(extra)}"
        out = run_cli(
            "home", "rebuild", "--from", dav[0], "--from", str(locs[0]),
            "--keyfile", str(home / "key.json"), *extra, home=new_home,
        )  # fmt: skip
        text = (out.stdout + out.stderr).decode()
        assert secret not in text and "pass=" not in text, text
        assert labels[0] in text, text
        if extra:
            doc = json.loads(out.stdout)
            assert doc["matched"] == {labels[0]: labels[0], str(locs[0]): str(locs[0])}, doc
            assert set(doc["kept"]) == {str(locs[1]), labels[1]}, doc

    # the old, shared label names both remotes: refused, with the names that tell them apart
    for cmd in (["verify", "--remote", _legacy(dav[0])], ["remote", "remove", _legacy(dav[0])]):
        out = run_cli(*cmd, home=home, check=18)
        msg = out.stderr.decode()
        assert labels[0] in msg and labels[1] in msg and "Traceback" not in msg, msg
    servers[1].stop()  # the provider of the second remote shuts down
    new = tmp_path / "loc-new"
    out = run_cli("remote", "replace", _legacy(dav[1]), str(new), home=home, check=18)
    assert labels[0] in out.stderr.decode() and labels[1] in out.stderr.decode()
    assert not new.exists()  # nothing changed
    # each label names its remote: the dead one is replaced, the healthy one stays
    run_cli("verify", "--remote", labels[0], home=home)
    run_cli("remote", "replace", labels[1], str(new), home=home)
    listed = json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    member = {r["remote"]: r["member"] for r in listed}
    assert member[labels[0]] == "active" and member[str(new)] == "active", member
    assert member[labels[1]] == "removed", member


def test_resolve_remote() -> None:
    """One resolver: a spec or its unique label names one remote; the old label without its
    digest still names a remote when it is the only one with it (an older valence.toml)."""
    from vaultfs.remotes import resolve_remote

    a = ":webdav,url='http://127.0.0.1:1',user=u:vault"
    b = ":webdav,url='http://127.0.0.1:2',user=u:vault"
    c = ":s3,provider=Other,endpoint='http://h:1':bucket"
    rows = [(1, a), (2, b), (3, c), (4, "/srv/r4")]
    assert resolve_remote(a, rows) == (1, a)
    assert resolve_remote(Remote(b).label, rows) == (2, b)
    assert resolve_remote(":s3:…:bucket", rows) == (3, c)
    assert resolve_remote("/srv/r4/../r4", rows) == (4, "/srv/r4")
    assert resolve_remote("/srv/r5", rows) is None
    with pytest.raises(InputError) as e:
        resolve_remote(":webdav:…:vault", rows)
    assert e.value.exit_code == 18
    assert Remote(a).label in e.value.message and Remote(b).label in e.value.message
    # a pure function of the spec: the same in every process and home
    assert Remote(a).label == Remote(a).label and Remote(a).label.startswith(":webdav#")
    assert "u:vault" not in Remote(a).label and Remote(a).label.endswith(":…:vault")


def test_one_directory_under_two_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    same = tmp_path / "same"
    same.mkdir()
    os.symlink(same, tmp_path / "samelink")
    other = tmp_path / "other"
    for r1, r2 in [
        (str(same), str(tmp_path / "samelink")),
        (str(same), f"{same}/../same"),
        (str(same), str(same)),
    ]:
        out = run_cli("init", "-k", "1", "-n", "2", "-r", r1, "-r", r2, home=home, check=18)
        msg = out.stderr.decode()
        assert "separate storage" in msg and "Traceback" not in msg, msg
        assert not home.exists() and not any(same.iterdir())
    # `remote add` of another name for a member directory is refused the same way
    run_cli("init", "-k", "1", "-n", "2", "-r", str(same), "-r", str(other), home=home)
    os.symlink(other, tmp_path / "otherlink")
    out = run_cli("remote", "add", str(tmp_path / "otherlink"), home=home, check=18)
    assert "separate storage" in out.stderr.decode()
    # the engine refuses it too (any caller of Vault.create), before the home is made
    from vaultfs.vault import Vault

    with pytest.raises(InputError) as e:
        Vault.create(tmp_path / "home2", [str(same), str(tmp_path / "samelink")], 1, 2, "pw")
    assert e.value.exit_code == 18 and not (tmp_path / "home2").exists()


def test_init_over_a_vault_hints_the_rebuild_with_the_spec_given(
    tmp_path: Path, rclone_bin: Path
) -> None:
    """`init` over a connection string that already holds a vault refuses (16) with a
    rebuild command naming the remote by the spec the user gave, which runs as printed: the
    label (`:webdav#xxxxxx:…:vault`) it used to print opens nothing."""
    import shlex

    server = WebdavServer(tmp_path / "webdav", rclone_bin)
    try:
        dav = server.remote("vault")
        run_cli("init", "-k", "1", "-n", "2", "-r", dav, "-r", str(tmp_path / "loc"),
                home=tmp_path / "home")  # fmt: skip
        (tmp_path / "f.txt").write_text("kept")
        run_cli("backup", str(tmp_path / "f.txt"), home=tmp_path / "home")  # a manifest
        again = tmp_path / "home 2"
        out = run_cli("init", "-k", "1", "-n", "2", "-r", dav, "-r", str(tmp_path / "loc2"),
                      home=again, check=16)  # fmt: skip
        msg = out.stderr.decode()
        assert f"remote {Remote(dav).label} already holds a vault" in msg, msg
        hint = msg.split("`")[1]
        assert hint.startswith("vaultfs home rebuild --home "), msg
        argv = shlex.split(hint)
        assert argv[argv.index("--from") + 1] == dav and argv[argv.index("--home") + 1] == str(
            again
        ), argv
        rebuilt = run_cli(*argv[1:], "--keyfile", str(tmp_path / "home" / "key.json"),
                          home=tmp_path / "unused")  # fmt: skip
        assert rebuilt.returncode == 0
        assert (again / "index.db").exists()
    finally:
        server.stop()
