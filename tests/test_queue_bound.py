"""The upload queue's bound: a backup that uploads keeps the shards no k remotes have yet
within the bound by uploading while it writes, and when the uploads cannot move them it
fails with the way forward, losing nothing (docs/operations.md, "Local state")."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli, vaultfs_env

from vaultfs.errors import ConfigError, NotEnoughRemotes
from vaultfs.index import segments
from vaultfs.vault import Entry, Vault

MIB = 1024 * 1024


def test_a_bounded_store_uploads_while_it_writes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Vault, "SEALERS", 0)  # sealed on this thread: no segment in flight
    monkeypatch.setenv("VAULTFS_QUEUE_MIB", "2")
    specs = [str(tmp_path / f"r{i}") for i in range(3)]
    v = Vault.create(tmp_path / "home", specs, 2, 3, PASSPHRASE, segment_size=1 << 20)
    try:
        data = os.urandom(12 * MIB)  # 18 MiB of shards, all queued at once without a bound
        cids, total = v.store_stream(io.BytesIO(data), bounded=True)
        assert segments.queued_bytes_under_k(v.index) <= 2 * MIB
        placed = v.index.one("SELECT count(*) FROM shards WHERE state='placed'")[0]
        assert placed > 0  # uploaded while the stream was written, before any flush
        v.commit([Entry("blob", "f", 0o644, 0, total, cids=cids)], "one")
        assert v.flush().complete
        assert b"".join(v.read_chunk(c) for c in cids) == data
    finally:
        v.close()


def test_bad_queue_bound_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VAULTFS_QUEUE_MIB", "lots")
    specs = [str(tmp_path / "r0")]
    v = Vault.create(tmp_path / "home", specs, 1, 1, PASSPHRASE, segment_size=1 << 20)
    try:
        with pytest.raises(ConfigError, match="VAULTFS_QUEUE_MIB") as e:
            v.store_stream(io.BytesIO(os.urandom(MIB)), bounded=True)
        assert e.value.exit_code == 2
    finally:
        v.close()


def test_a_backup_whose_uploads_cannot_drain_fails_clearly_and_loses_nothing(
    tmp_path: Path,
) -> None:
    home, specs = init_local_vault(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(12 * MIB))
    for s in specs[:2]:  # two of three remotes unusable: fewer than k take anything
        shutil.rmtree(s, ignore_errors=True)
        s.write_bytes(b"not a directory")
    # sealed on the command's thread: the bound is checked after every segment is queued
    env = vaultfs_env(home, VAULTFS_QUEUE_MIB="2", VAULTFS_SEALERS="0")
    proc = run_cli("backup", str(src), home=home, env=env, check=NotEnoughRemotes.exit_code)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert "over its bound of 2.0 MiB" in err and "then back up again" in err
    for s in specs[:2]:  # the remotes come back: the same backup goes through
        s.unlink()
        s.mkdir()
    run_cli("backup", str(src), home=home, env=env)
    run_cli("restore", "--to", str(tmp_path / "out"), home=home)
    assert (tmp_path / "out" / "src" / "big").read_bytes() == (src / "big").read_bytes()
