"""Merkle trees over shard blocks (docs/format.md, "Merkle tree").

leaf  = BLAKE3(0x00 ‖ block)          node = BLAKE3(0x01 ‖ left ‖ right)

An odd node at the end of a level is promoted unchanged to the next level; it is never
paired with itself (the duplicate-last-leaf ambiguity of CVE-2012-2459). The same node rule
builds a shard root over its blocks, a segment root over its shards' roots (in index order),
and a vault root over the roots of all *data* segments (in segment id order); meta segments
(index copies) are pinned instead by their shards' BLAKE3 hashes in the signed manifest.
"""

from __future__ import annotations

from collections.abc import Iterable

import blake3

BLOCK_SIZE = 64 * 1024
EMPTY_ROOT = blake3.blake3(b"\x02vaultfs-empty").digest()


def leaf_hash(block: bytes | memoryview) -> bytes:
    h = blake3.blake3(b"\x00")
    h.update(block)
    return h.digest()


def leaf_hashes(items: Iterable[bytes]) -> list[bytes]:
    """:func:`leaf_hash` of each of many small items (rows, not 64 KiB blocks): one
    concatenation and one call each instead of three calls, the same bytes."""
    b3 = blake3.blake3
    return [b3(b"\x00" + x).digest() for x in items]


def node_hash(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(b"\x01" + left + right).digest()


def block_hashes(data: bytes | memoryview, block_size: int = BLOCK_SIZE) -> list[bytes]:
    mv = memoryview(data)
    return [leaf_hash(mv[i : i + block_size]) for i in range(0, max(len(mv), 1), block_size)]


def root(hashes: list[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    b3 = blake3.blake3
    level = hashes
    while len(level) > 1:
        # node_hash inlined (a kb snapshot builds trees over 400,000 rows); an odd last
        # node is left out of the pairs and promoted below
        pairs = iter(level)
        nxt = [b3(b"\x01" + a + b).digest() for a, b in zip(pairs, pairs, strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Root:
    """:func:`root` of hashes given one at a time (:meth:`add`), holding one pending node
    per level (O(log n)) instead of every hash: a full restore checks the vault root over
    every data segment with memory flat in the vault's size. Pairing left to right with an
    odd last node promoted builds the tree whose left subtrees are the largest powers of two,
    so equal-height neighbours join as they come and the rest join right to left at the end."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, bytes]] = []  # (height, node), heights decreasing

    def add(self, h: bytes) -> None:
        height = 0
        while self._pending and self._pending[-1][0] == height:
            h = node_hash(self._pending.pop()[1], h)
            height += 1
        self._pending.append((height, h))

    def root(self) -> bytes:
        """:func:`root` of the hashes added so far."""
        if not self._pending:
            return EMPTY_ROOT
        acc = self._pending[-1][1]
        for _height, left in reversed(self._pending[:-1]):
            acc = node_hash(left, acc)
        return acc


def proof(hashes: list[bytes], index: int) -> list[tuple[bool, bytes]]:
    """Audit path for hashes[index]: a list of (sibling_is_left, sibling_hash)."""
    path: list[tuple[bool, bytes]] = []
    level = list(hashes)
    i = index
    while len(level) > 1:
        sib = i ^ 1
        if sib < len(level):
            path.append((sib < i, level[sib]))
        nxt = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        i //= 2
    return path


def verify_proof(leaf: bytes, path: list[tuple[bool, bytes]], expected_root: bytes) -> bool:
    h = leaf
    for is_left, sib in path:
        h = node_hash(sib, h) if is_left else node_hash(h, sib)
    return h == expected_root
