"""Where shards go: the placement rule over failure domains, and how many domains a
placement survives losing."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

from ..errors import NotEnoughRemotes
from ..index import Index
from ..index import remotes as remote_table


def survivable_losses(placement: list[list[int]], k: int, domains: dict[int, str]) -> int:
    """How many failure domains can be lost, worst case, with every segment still >= k shards.

    ``placement`` lists, per segment, the remote id of each shard. Brute force over domain
    subsets (the number of domains is small).
    """
    doms = sorted(set(domains.values()))
    best = 0
    for lose in range(1, len(doms) + 1):
        ok = True
        for gone in combinations(doms, lose):
            g = set(gone)
            for shards in placement:
                if sum(1 for r in shards if domains.get(r) not in g) < k:
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            break
        best = lose
    return best


def place(remotes: list[tuple[int, str]], seg_id: int, n: int) -> list[int]:
    """Remote id for each of the n shards of segment ``seg_id``, spreading failure domains.

    ``remotes`` lists (id, domain) of the active remotes in position order. Shard i goes to
    domain (i + seg_id) mod D (domains ordered by their first remote's position), and within a
    domain to its remotes in turn, so every domain holds ⌊n/D⌋ or ⌈n/D⌉ shards. With one remote
    per domain this is the plain rule: shard i → remote at position (i + seg_id) mod R.
    """
    doms: dict[str, list[int]] = {}
    for rid, dom in remotes:
        doms.setdefault(dom, []).append(rid)
    order = list(doms.values())
    seen = [0] * len(order)
    out = []
    for i in range(n):
        d = (i + seg_id) % len(order)
        members = order[d]
        out.append(members[(seen[d] + seg_id // len(order)) % len(members)])
        seen[d] += 1
    return out


def shard_remotes(index: Index, seg_id: int, n: int) -> list[int]:
    """Remote id for each of the n shards of segment ``seg_id`` over the vault's active
    remotes (:func:`place`). Raises NotEnoughRemotes when it has none."""
    rows = remote_table.placement_domains(index)
    if not rows:
        raise NotEnoughRemotes("the vault has no active remotes")
    return place(rows, seg_id, n)


def remotes_needed(remotes: int, k: int, n: int) -> tuple[int, int]:
    """(how many remotes any restore needs, most shards of one segment on one remote) for a
    k-of-n vault over ``remotes`` remotes in their own failure domains: the smallest R such
    that every R remotes hold at least k shards of every segment, whichever R they are."""
    rows = [(i, f"d{i}") for i in range(remotes)]
    needed = crowded = 0
    for seg in range(remotes):  # the placement repeats with this period
        per = Counter(place(rows, seg, n))
        crowded = max(crowded, max(per.values()))
        fewest = sorted(per.get(i, 0) for i in range(remotes))
        held = r = 0
        while held < k:
            held += fewest[r]
            r += 1
        needed = max(needed, r)
    return needed, crowded


def restore_needs_now(
    shards: list[list[int]], data: list[list[int]], k: int
) -> tuple[list[int], int | None]:
    """Where the vault's stored segments actually are: (the remotes holding a shard of a
    data segment, in id order; the smallest M such that any M of those remotes hold at least
    k shards of every segment of ``shards``, None when even all of them do not). ``shards``
    lists, per live segment (data and the newest index copy), the remote of each shard that
    is placed or queued; ``data`` those of the data segments alone. After `remote add` the
    stored data stays where it was: this, not :func:`remotes_needed`, says what a restore of
    it needs until new data spreads over the new remote."""
    holders = sorted({r for seg in data for r in seg})
    patterns = {tuple(sorted(seg)) for seg in shards}
    for m in range(1, len(holders) + 1):
        if all(
            sum(1 for r in pat if r in chosen) >= k
            for chosen in map(set, combinations(holders, m))
            for pat in patterns
        ):
            return holders, m
    return holders, None
