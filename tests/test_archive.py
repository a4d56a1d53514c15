"""Archive storage (docs/operations.md, "Archive storage"): rclone's "restore first" error is
a ThawNeeded (exit 24) that is not retried; a restore that cannot reach k shards because
remotes hold them archived names those remotes; an audit names them too; `init`, `remote
add` and `remote replace` refuse a spec asking for an archive storage class without
--archive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_local_vault, run_cli

from vaultfs import verify as verify_mod
from vaultfs.backends import FaultInjecting, Retrying, Wrapper, open_backend
from vaultfs.errors import BadRemote, ThawNeeded
from vaultfs.keys import read_keyfile
from vaultfs.remotes import archive_class, classify
from vaultfs.restore import open_remote_index, restore_files
from vaultfs.vault import Vault

GLACIER = 'Object in GLACIER, restore first: bucket="kb", key="vault/data/{name}"'


class Frozen(Wrapper):
    """A remote whose ``data/`` objects a lifecycle rule moved to Glacier: every read of one
    fails as rclone reports it; listings and the other folders work."""

    @property
    def local_dir(self) -> Path | None:
        return None  # an S3 bucket: nothing to read in place

    def _op(self, fn, *args):
        sub, names = args[0], args[1] if len(args) > 1 else []
        archived = sub == "data" or (
            sub == "" and isinstance(names, list) and any(n.startswith("data/") for n in names)
        )
        if fn.__name__ in ("get", "cat", "copy_dir_async") and archived:
            raise classify(self.label, "download from data", GLACIER.format(name="x"))
        return fn(*args)


def test_thaw_error_is_classified_and_not_retried() -> None:
    e = classify("s3:kb", "read data/x", GLACIER.format(name="x"))
    assert isinstance(e, ThawNeeded) and e.exit_code == 24 and "thaw needed" in e.message
    e = classify("s3:kb", "read", "operation error S3: GetObject, InvalidObjectState: archived")
    assert isinstance(e, ThawNeeded)  # not a rejected spec, despite "Invalid"
    calls = []

    class Always(FaultInjecting):
        def _op(self, fn, *args):
            calls.append(fn.__name__)
            raise classify("s3:kb", "read", GLACIER.format(name="x"))

    r = Retrying(Always(open_backend("/nonexistent-never-used")), sleep=lambda s: None)
    with pytest.raises(ThawNeeded):
        r.cat("data", "x")
    assert calls == ["cat"]  # a thaw takes hours: no retry


def test_archive_storage_class_refused_without_flag(tmp_path: Path) -> None:
    spec = ":s3,provider=AWS,env_auth=true,storage_class=DEEP_ARCHIVE:bucket/vault"
    assert archive_class(spec) == "DEEP_ARCHIVE"
    assert archive_class(":s3,provider=AWS,storage_class=GLACIER_IR:b") is None
    assert archive_class("/mnt/usb/vault") is None
    home = tmp_path / "home"
    res = run_cli("init", "-k", "1", "-n", "2", "--remote", spec, "--remote",
                  str(tmp_path / "r"), home=home, check=BadRemote.exit_code)  # fmt: skip
    assert b"DEEP_ARCHIVE" in res.stderr and b"--archive" in res.stderr
    assert not home.exists()
    init_local_vault(tmp_path, 1, 2, home=home, segment_mib=None)
    res = run_cli("remote", "add", spec, home=home, check=BadRemote.exit_code)
    assert b"thaw" in res.stderr
    res = run_cli("remote", "replace", str(tmp_path / "r1"), spec, home=home, check=14)
    assert b"DEEP_ARCHIVE" in res.stderr


def test_restore_and_audit_name_the_remotes_needing_a_thaw(tmp_path: Path) -> None:
    home, remotes = init_local_vault(tmp_path, 3, 5, prefix="remote")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(600_000))
    run_cli("backup", str(src), home=home)
    keys = read_keyfile(home / "key.json", PASSPHRASE)
    backends = [open_backend(str(r), wrap=Frozen if i < 3 else None) for i, r in enumerate(remotes)]
    index, src_shards, _m, _w = open_remote_index(keys, backends, tmp_path / "work")
    try:
        with pytest.raises(ThawNeeded) as got:
            restore_files(keys, index, src_shards, tmp_path / "out")
    finally:
        index.close()
    named = got.value.message.split("thaw needed on ", 1)[1].split(" (archive", 1)[0]
    # the remotes asked for the shards a decode needed, each archived one named
    assert len(named.split(", ")) >= 2 and set(named.split(", ")) <= {str(r) for r in remotes[:3]}
    with Vault.open(home, PASSPHRASE, lock=False) as v:
        frozen_rids = {b.rid for b in v.remotes()[:3]}
        rep = verify_mod.audit(
            v, mode="read-all", wrap=lambda b: Frozen(b) if b.rid in frozen_rids else b
        )
    bad = {r.remote: r.error for r in rep.remotes if r.error}
    assert set(bad) == {str(r) for r in remotes[:3]}
    assert all("thaw needed" in e for e in bad.values())
