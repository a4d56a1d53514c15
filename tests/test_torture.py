"""A handful of crash-torture trials (scripts/torture runs 100 per operation): kill -9 a
backup, a key rotation, a repair and the mount daemon under a writer at random points; the next commands recover by themselves,
`verify --read-all` is clean and every committed snapshot restores exactly
(tests/torture.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torture


@pytest.mark.parametrize("name", ["backup", "keys rotate", "repair"])
def test_kill_9_then_the_next_commands_recover_and_lose_nothing(tmp_path, name: str) -> None:
    res = torture.Chamber(tmp_path, seed=14).run(torture.OPERATIONS[name], 2)
    assert res.recovered == res.trials == 2, res.failures
    assert res.bytes_lost == 0


@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)
def test_kill_9_of_the_mount_under_a_writer_loses_nothing_fsynced(tmp_path) -> None:
    """The mount daemon killed while files are fsync'd into it and snapshots taken: every
    fsync'd file and every snapshot that succeeded survives the remount (tests/torture.py)."""
    res = torture.Chamber(tmp_path, seed=14).run(torture.OPERATIONS["mount writes"], 2)
    assert res.recovered == res.trials == 2, res.failures
    assert res.bytes_lost == 0
