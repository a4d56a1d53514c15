"""A handful of crash-torture trials (scripts/torture runs 100 per operation): kill -9 a
backup, a key rotation, a repair and the mount daemon under a writer at random points; the next commands recover by themselves,
`verify --read-all` is clean and every committed snapshot restores exactly
(tests/torture.py)."""

from __future__ import annotations

import pytest
import torture
from helpers import needs_fuse


@pytest.mark.parametrize("name", ["backup", "keys rotate", "repair"])
def test_kill_9_then_the_next_commands_recover_and_lose_nothing(tmp_path, name: str) -> None:
    res = torture.Chamber(tmp_path, seed=14).run(torture.OPERATIONS[name], 2)
    assert res.recovered == res.trials == 2, res.failures
    assert res.bytes_lost == 0


@needs_fuse
def test_kill_9_of_the_mount_under_a_writer_loses_nothing_fsynced(tmp_path) -> None:
    """The mount daemon killed while files are fsync'd into it and snapshots taken: every
    fsync'd file and every snapshot that succeeded survives the remount (tests/torture.py)."""
    res = torture.Chamber(tmp_path, seed=14).run(torture.OPERATIONS["mount writes"], 2)
    assert res.recovered == res.trials == 2, res.failures
    assert res.bytes_lost == 0


@pytest.mark.parametrize(
    "at",
    [
        "vaultfs.vault:Vault.ship_index:before",  # after the segment rewrites
        "vaultfs.index.manifests:record:before",  # its index copy recorded, not the manifest
    ],
)
def test_prune_killed_between_its_rewrites_and_its_manifest_publishes_next_time(
    tmp_path, at: str
) -> None:
    """Prune dropped a segment (its rows gone, its objects in ``garbage``) and died before
    recording the manifest of the new index: the signed vault root no longer covered the
    index's data segments and nothing was left for the next prune to rewrite, so it shipped
    nothing and `verify` refused the index (exit 12). The rewrite now marks the index
    unshipped, and the next prune publishes it (docs/design.md, "Crash states")."""
    ok, lost, why = torture.Chamber(tmp_path).trial(torture.OPERATIONS["prune"], at=at)
    assert ok and lost == 0, why


@pytest.mark.parametrize(
    "at",
    [
        "vaultfs.repair:sync_files:before",  # a batch written to tmp/, not yet fsync'd
        "vaultfs.repair:_commit_batch:before",  # fsync'd and queued, no row points at it yet
    ],
)
def test_repair_killed_around_its_batch_fsyncs_loses_nothing(tmp_path, at: str) -> None:
    """Repair writes a batch's rebuilt objects without an fsync each and fsyncs them together
    before they leave ``tmp/`` and before the batch's transaction (docs/design.md, "Repair
    batches", invariant 7): killed at either step, the next open removes the unrecorded
    objects, the next repair rebuilds them, `verify --read-all` is clean and every snapshot
    restores exactly."""
    ok, lost, why = torture.Chamber(tmp_path).trial(torture.OPERATIONS["repair"], at=at)
    assert ok and lost == 0, why
