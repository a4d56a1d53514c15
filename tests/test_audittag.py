"""The native audit tagger (vaultfs/native/tags.c, built by scripts/build-native) against
the Python reference and a hasher call a piece (docs/format.md, "Audits")."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from vaultfs import audittag, merkle
from vaultfs.audittag import BLOCK_SIZE, PIECE, TAG_LEN

REPO = Path(__file__).resolve().parent.parent
SKIPPED = audittag.NATIVE_LIB.parent / "SKIPPED"


def _need_native() -> None:
    if not audittag.native_available():
        if SKIPPED.exists():  # scripts/build-native could not build it here, and said why
            pytest.skip(f"native tagger not built: {SKIPPED.read_text().strip()}")
        pytest.fail(f"{audittag.NATIVE_LIB} is missing or refused: run scripts/build-native")


def _leaves(body: bytes) -> bytes:
    return b"".join(merkle.block_hashes(body))


# every shape the loop has: empty, one short piece, whole pieces, a short last piece, a
# block boundary on and off a piece boundary, many blocks
LENGTHS = [0, 1, 57, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5, BLOCK_SIZE - 1, BLOCK_SIZE]
LENGTHS += [BLOCK_SIZE + 1, BLOCK_SIZE + PIECE, 3 * BLOCK_SIZE - 7, 1_398_123]


@pytest.mark.parametrize("n", LENGTHS)
def test_native_tags_equal_the_reference(n: int) -> None:
    _need_native()
    rng = random.Random(n)
    body = rng.randbytes(n)
    key = rng.randbytes(32)
    leaves = _leaves(body)
    # 2048 and 2054 take the batched path (a tail of 58 and 64 bytes); the others the hasher
    for piece in (PIECE, 2054, 2000, 1000, 4096):
        want = audittag.piece_tags_py(key, body, leaves, piece)
        assert audittag.piece_tags(key, body, leaves, piece) == want, piece
        assert audittag.piece_tags(key, bytearray(body), leaves, piece) == want, piece
        assert audittag.piece_tags(key, memoryview(body), leaves, piece) == want, piece


def test_native_tags_are_keyed_blake3_of_each_piece() -> None:
    """Independent of both implementations: a hasher call a piece, as docs/format.md says."""
    _need_native()
    rng = random.Random(7)
    body = rng.randbytes(2 * BLOCK_SIZE + 3 * PIECE + 11)
    key = rng.randbytes(32)
    leaves = _leaves(body)
    tags = audittag.piece_tags(key, body, leaves)
    per = BLOCK_SIZE // PIECE
    want = []
    for b in range(3):
        block = body[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
        for j in range(-(-len(block) // PIECE)):
            msg = audittag.TAG_LABEL + leaves[32 * b : 32 * b + 32]
            msg += b.to_bytes(4, "big") + j.to_bytes(2, "big") + block[j * PIECE : (j + 1) * PIECE]
            want.append(blake3.blake3(msg, key=key).digest(TAG_LEN))
    assert tags == b"".join(want)
    assert audittag.stored_tag(tags, 2, 3) == want[2 * per + 3]


def test_native_tags_refuse_a_short_key_or_missing_leaves() -> None:
    _need_native()
    body = bytes(3 * BLOCK_SIZE)
    with pytest.raises(ValueError):
        audittag.piece_tags(bytes(16), body, _leaves(body))
    with pytest.raises(ValueError):
        audittag.piece_tags(bytes(32), body, _leaves(body)[:64])


def test_vaultfs_native_0_uses_the_python_tags() -> None:
    code = "from vaultfs import audittag; print(audittag.native_available())"
    env = {**os.environ, "VAULTFS_NATIVE": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_build_native_builds_once_and_falls_back_with_a_warning(tmp_path: Path) -> None:
    script = REPO / "scripts" / "build-native"
    env = {**os.environ, "VAULTFS_NATIVE_DIR": str(tmp_path / "out")}
    # without the BLAKE3 sources: a warning, exit 0, the reason written down, no library
    gone = subprocess.run(
        [str(script)], env={**env, "VAULTFS_BLAKE3_C": str(tmp_path / "nowhere")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gone.returncode == 0, gone.stderr
    assert "WARNING" in gone.stderr and "librust-blake3-dev" in gone.stderr
    assert "librust-blake3-dev" in (tmp_path / "out" / "SKIPPED").read_text()
    assert not (tmp_path / "out" / "libvaultfs_tags.so").exists()
    if SKIPPED.exists() and not audittag.NATIVE_LIB.exists():
        pytest.skip(f"native tagger not buildable here: {SKIPPED.read_text().strip()}")
    first = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lib = tmp_path / "out" / "libvaultfs_tags.so"
    assert lib.exists() and not (tmp_path / "out" / "SKIPPED").exists()
    built = lib.stat().st_mtime_ns
    again = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr == ""  # nothing changed: nothing rebuilt
    assert lib.stat().st_mtime_ns == built
