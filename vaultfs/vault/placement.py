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


def _worst_case(counts: list[int], k: int) -> int | None:
    """The smallest R such that any R of the remotes whose shard counts of one segment are
    ``counts`` hold at least k of its shards: the R holding the fewest must (None: all of
    them hold fewer than k)."""
    held = 0
    for r, count in enumerate(sorted(counts), 1):
        held += count
        if held >= k:
            return r
    return None


def remotes_needed(remotes: int, k: int, n: int) -> tuple[int, int]:
    """(how many remotes any restore needs, most shards of one segment on one remote) for a
    k-of-n vault over ``remotes`` remotes in their own failure domains: the smallest R such
    that every R remotes hold at least k shards of every segment, whichever R they are."""
    rows = [(i, f"d{i}") for i in range(remotes)]
    needed = crowded = 0
    for seg in range(remotes):  # the placement repeats with this period
        per = Counter(place(rows, seg, n))
        crowded = max(crowded, max(per.values()))
        needed = max(needed, _worst_case([per.get(i, 0) for i in range(remotes)], k) or 0)
    return needed, crowded


def restore_needs_now(
    shards: list[list[int]], data: list[list[int]], k: int
) -> tuple[list[int], int | None]:
    """Where the vault's stored segments actually are: (remotes holding them, in id order;
    the smallest M such that any M of those remotes hold at least k shards of every segment
    of ``shards``, None when even all of them do not). ``shards`` lists, per live segment
    (data and the newest index copy: a restore needs both), the remote of each shard that is
    placed or queued; ``data`` those of the data segments alone (none: ([], None)). After
    `remote add` the stored data stays where it was while the new index copy spreads over the
    new remote too: this, not :func:`remotes_needed`, says what a restore of what is stored
    needs until new data spreads over the new remote.

    The remotes are those holding data when any M of them also restore the index copy, and
    every holder when that claim survives more losses (more holders than M): "any 3 of
    A…E" over "any 4 of A…F" when equal, never a list that leaves out a needed remote."""
    best: tuple[list[int], int | None] = ([], None)
    if not data:
        return best
    everywhere = sorted({r for seg in shards for r in seg})
    for holders in (sorted({r for seg in data for r in seg}), everywhere):
        needs = [_worst_case([Counter(seg)[r] for r in holders], k) for seg in shards]
        m = None if None in needs else max(needs)
        if m is not None and (best[1] is None or len(holders) - m > len(best[0]) - best[1]):
            best = (holders, m)
    return best if best[1] is not None else (everywhere, None)
