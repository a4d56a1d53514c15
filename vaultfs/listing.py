"""A remote's listing of one folder, held compactly for a restore.

A full restore keeps every remote's listing of ``data/`` and ``meta/`` for its whole run
(which remote holds which shard object, at which listed size). Held as a dict of str per
object it grows with the vault (about 4,200 objects per remote at 16 GiB, three remotes):
:class:`Listed` keeps each shard object name (32 lowercase hex digits) as 16 bytes in one
sorted ``bytes`` and its size in an ``array``, so the listing costs about 24 bytes per
object and no Python object per object. Any other name (a manifest's, a stray file's) is
kept as it is, beside them.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping

_ID = 16
_HEX_NAME = re.compile(r"[0-9a-f]{32}")


class Listed(Mapping[str, int]):
    """Object name -> listed size (-1: the remote did not say) of one folder of a listing;
    read-only. Built once from (name, size) pairs (a name given twice keeps its last size);
    lookups are a binary search."""

    __slots__ = ("_ids", "_sizes", "_other")

    def __init__(self, items: Iterable[tuple[str, int]]) -> None:
        ids: dict[bytes, int] = {}
        other: dict[str, int] = {}
        for name, size in items:
            if _HEX_NAME.fullmatch(name):
                ids[bytes.fromhex(name)] = size
            else:
                other[name] = size
        order = sorted(ids)
        self._ids = b"".join(order)
        self._sizes = array("q", (ids[i] for i in order))
        self._other = other

    def _at(self, i: int) -> bytes:
        return self._ids[i * _ID : (i + 1) * _ID]

    def _index(self, name: str) -> int:
        """Position of shard object ``name`` among the ids; -1 when it is not one of them."""
        if not _HEX_NAME.fullmatch(name):
            return -1
        key = bytes.fromhex(name)
        n = len(self._sizes)
        i = bisect_left(range(n), key, key=self._at)
        return i if i < n and self._at(i) == key else -1

    def __getitem__(self, name: str) -> int:
        i = self._index(name) if isinstance(name, str) else -1
        return self._sizes[i] if i >= 0 else self._other[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self._index(name) >= 0 or name in self._other)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self._sizes)):
            yield self._at(i).hex()
        yield from self._other

    def __len__(self) -> int:
        return len(self._sizes) + len(self._other)


def compact(tree: Mapping[str, Mapping[str, int]]) -> dict[str, Listed]:
    """``{sub: {name: size}}`` of :meth:`Backend.list_tree`, each folder as a :class:`Listed`."""
    return {sub: Listed(names.items()) for sub, names in tree.items()}
