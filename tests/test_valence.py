"""The `valence` verbs through the real commands on a real vault: backup config (an s3 backend
with credentials, served by rclone on loopback, and a local directory), run (files and a
pg_dump of a belief database), verify, restore by backend name, keys init/split/recover, and
graph show; the credentials never appear in any output nor in any file but the index."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from helpers import REPO_ROOT, PgServer, S3Server, tree_digest, vaultfs_env

from vaultfs.errors import InputError
from vaultfs.kb.schema import ddl
from vaultfs.remotes import Remote, spec_digest
from vaultfs.valence import Settings, backend_spec, check_dsn

pytestmark = [pytest.mark.pg, pytest.mark.network]

BELIEF = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
OTHER = uuid.UUID("00000000-0000-4000-8000-0000000000b2")


def test_backend_specs() -> None:
    spec = backend_spec("b2", bucket="my-valence-backup", key_id="xxx", key="k'ey")
    assert spec == ":b2,account='xxx',key='k''ey':my-valence-backup"
    assert Remote(spec).label == f":b2#{spec_digest(spec)}:…:my-valence-backup"
    s3 = backend_spec("s3", bucket="b", path="kb", key_id="a", key="s", endpoint="http://h:1")
    assert s3.startswith(":s3,provider='Other',endpoint='http://h:1',") and s3.endswith(":b/kb")
    for kind, kw, msg in [
        ("b2", {"bucket": "b", "key_id": "x"}, "needs --key"),
        ("s3", {"bucket": "b", "key_id": "x", "key": "y"}, "needs --endpoint"),
        ("ftp", {}, "unknown backend"),
    ]:
        with pytest.raises(InputError, match=msg):
            backend_spec(kind, **kw)
    with pytest.raises(InputError, match="password"):
        check_dsn("postgresql://u:pw@h/db")


def _valence(home: Path, *args: str, check: int = 0, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.valence", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        env=env or vaultfs_env(home),
        cwd=REPO_ROOT,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == check, f"valence {' '.join(args)} exited {proc.returncode}:\n{output}"
    assert "Traceback" not in output
    _valence.outputs.append(output)  # type: ignore[attr-defined]
    return proc.stdout


def test_valence_verbs(tmp_path: Path, pg_server: PgServer, s3_server: S3Server) -> None:
    _valence.outputs = []  # type: ignore[attr-defined]
    home = tmp_path / "home"
    _valence(tmp_path / "fresh", "backup", "run", check=18)  # nothing configured: says what to do
    secrets = [s3_server.access_key, s3_server.secret_key]
    src = tmp_path / "notes"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("belief notes\n" * 500)
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    dsn = pg_server.create_database("valencekb")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl(dim=3))
        for bid, text in ((BELIEF, "the vault keeps the graph"), (OTHER, "graphs need backups")):
            conn.execute(
                "INSERT INTO beliefs (id, content, embedding, confidence, created_at) "
                "VALUES (%s, %s, '[1,2,3]', 0.8, now())",
                (bid, text),
            )

    # config: the first backend creates the vault, the second is added; secrets never shown
    s3_args = ["--endpoint", s3_server.endpoint, "--provider", "Rclone", "--bucket", "valence-b"]
    s3_args += ["--key-id", s3_server.access_key, "--key", s3_server.secret_key]
    (s3_server.root / "valence-b").mkdir()
    _valence(home, "backup", "config", "--add-backend", "s3", *s3_args, "--name", "cloud")
    first = _valence.outputs[-1]  # type: ignore[attr-defined]
    # a 3-of-5 vault on one backend holds every shard there: the user is told, with the fix
    assert "5 of each segment's 5 shards share one remote" in first, first
    assert "losing any one loses data" in first and "--add-backend" in first
    usb = tmp_path / "usb"
    usb.mkdir()
    added = json.loads(_valence(home, "backup", "config", "--add-backend", "local", "--dir", str(usb), "--name", "usb", "--json"))  # fmt: skip
    assert any("share one remote" in w for w in added["added"]["warnings"]), added
    _valence(home, "backup", "config", "--add-backend", "local", "--dir", str(usb), check=14)
    _valence(home, "backup", "config", "--dsn", "postgresql://u:pw@h/db", check=18)
    _valence(home, "backup", "config", "--source", str(src), "--dsn", dsn)
    shown = json.loads(_valence(home, "backup", "config", "--json"))
    assert set(shown["backends"]) == {"cloud", "usb"} and shown["sources"] == [str(src)]
    assert stat.S_IMODE(home.stat().st_mode) == 0o700

    # run, verify, restore by backend name
    run = json.loads(_valence(home, "backup", "run", "--json"))
    assert run["complete"] and run["database_dump_bytes"] > 0
    _valence(home, "backup", "verify")
    target = tmp_path / "restore"
    _valence(home, "backup", "restore", "--from", "cloud", "--from", "usb", "--to", str(target))
    assert tree_digest(target / "notes") == tree_digest(src)
    dump = (target / "valence-postgres.sql").read_text()
    assert "CREATE TABLE public.beliefs" in dump and "the vault keeps the graph" in dump
    _valence(home, "backup", "restore", "--from", "nowhere-known", "--to", str(tmp_path / "r2"), check=11)  # fmt: skip

    # keys: init (complete), split, recover from the share files
    _valence(home, "keys", "init")
    shares = tmp_path / "shares"
    _valence(home, "keys", "split", "--shares", "5", "--threshold", "3", "--out-dir", str(shares))
    files = sorted(shares.iterdir())
    assert len(files) == 5
    recover = ["keys", "recover", "--keyfile-out", str(tmp_path / "recovered.json")]
    for f in files[:3]:
        recover += ["--share-file", str(f)]
    _valence(home, *recover)
    assert (tmp_path / "recovered.json").exists()

    # graph
    view = json.loads(_valence(home, "graph", "show", str(BELIEF), "--dsn", dsn, "--json"))
    assert view["content"] == "the vault keeps the graph"
    _valence(home, "graph", "add-edge", str(OTHER), str(BELIEF), "--type", "supports", "--dsn", dsn)  # fmt: skip
    path = json.loads(_valence(home, "graph", "path", str(OTHER), str(BELIEF), "--dsn", dsn, "--json"))  # fmt: skip
    assert path["length"] == 1

    # the credentials: in no output, in no file but the index (docs/valence.md says so)
    for output in _valence.outputs:  # type: ignore[attr-defined]
        assert not any(s in output for s in secrets)
    holders = set()
    for root in (home, target, shares, tmp_path / "usb"):
        for p in root.rglob("*"):
            if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets):
                holders.add(p.name)
    # the index, its log and its kept export (the last index shipped, patched in place)
    assert holders <= {"index.db", "index.db-wal", "index.db-export"}, holders
    cloud = Settings.load(home).backends["cloud"]
    assert re.fullmatch(r":s3#[0-9a-f]{6}:…:valence-b", cloud), cloud
    pg_server.drop_database("valencekb")


def test_b2_as_written_never_shows_its_key(tmp_path: Path) -> None:
    """The specification's line, verbatim but for the secrets: whether Backblaze is reachable
    from here (exit 14, rejected credentials) or not (exit 11), no secret is printed and no
    vault is left behind."""
    args = ["backup", "config", "--add-backend", "b2", "--bucket", "my-valence-backup"]
    args += ["--key-id", "KEYID-8c1f", "--key", "K005-SECRET-42"]
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "cli.valence", *args, "--home", str(home)],
        capture_output=True, text=True, env=vaultfs_env(home), cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode in (11, 14), output
    assert re.search(r":b2#[0-9a-f]{6}:…:my-valence-backup", output), output
    assert "Traceback" not in output
    assert "KEYID-8c1f" not in output and "K005-SECRET-42" not in output
    assert not (home / "index.db").exists() and not (home / "valence.toml").exists()
