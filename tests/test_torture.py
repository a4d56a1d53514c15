"""A handful of crash-torture trials (scripts/torture runs 100 per operation): kill -9 a
backup, a key rotation and a repair at random points; the next commands recover by themselves,
`verify --read-all` is clean and every committed snapshot restores exactly
(tests/torture.py)."""

from __future__ import annotations

import pytest
import torture


@pytest.mark.parametrize("name", ["backup", "keys rotate", "repair"])
def test_kill_9_then_the_next_commands_recover_and_lose_nothing(tmp_path, name: str) -> None:
    res = torture.Chamber(tmp_path, seed=14).run(torture.OPERATIONS[name], 2)
    assert res.recovered == res.trials == 2, res.failures
    assert res.bytes_lost == 0
