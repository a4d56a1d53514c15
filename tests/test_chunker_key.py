"""The chunker key's real strength: pyfastcdc's masks reach bit 47 (bit 48 in the shifted
table), so only seed bits 1-47 can move a cut point. docs/keys.md and docs/threat-model.md
state this; the test keeps them honest if pyfastcdc ever changes."""

from __future__ import annotations

import random

import pytest

from vaultfs.chunker import AVG_SIZE, NEW_VAULT_AVG, Chunker

DATA = random.Random(7).randbytes(2 << 20)


@pytest.mark.parametrize("avg", [AVG_SIZE, NEW_VAULT_AVG])
def test_seed_bits_48_to_62_never_move_a_cut_point(avg: int) -> None:
    rng = random.Random(avg)
    seed = (rng.getrandbits(63)) | 1
    base = Chunker(seed, b"k" * 32, avg).spans(DATA)
    assert len(base) > 10
    for _ in range(4):
        high = rng.getrandbits(15) << 48  # any pattern in bits 48..62
        assert Chunker(seed ^ high, b"k" * 32, avg).spans(DATA) == base


@pytest.mark.parametrize("bit", [1, 20, 47])
def test_seed_bits_up_to_47_do_move_cut_points(bit: int) -> None:
    seed = (random.Random(bit).getrandbits(63)) | 1
    a = Chunker(seed, b"k" * 32, AVG_SIZE).spans(DATA)
    b = Chunker(seed ^ (1 << bit), b"k" * 32, AVG_SIZE).spans(DATA)
    assert a != b
