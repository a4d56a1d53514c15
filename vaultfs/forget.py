"""Retention applied: what a policy (vaultfs/retention.py, restic's rules) keeps of the
vault's snapshots, and `vaultfs forget [--dry-run] [--prune]` itself, the same code mounted
(in the daemon: vaultfs/maintenance.py) and not (cli/routine.py). The routine's retention
job uses :func:`decide` too (vaultfs/routine.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import clock, retention
from .errors import ImmutableVault, PolicyKeepsNothing
from .index import snapshots as snapshot_table

if TYPE_CHECKING:
    from .vault import Vault


#: why a snapshot the policy drops is kept anyway (:func:`decide`; restic has no such rule)
RESTORABLE = "newest restorable from the remotes"


def decide(v: Vault, policy: retention.Policy, now: float | None = None) -> retention.Decision:
    """What ``policy`` keeps and forgets of the vault's snapshots as of ``now``, changing
    nothing; PolicyKeepsNothing, dry run or not, when it would forget every one (restic
    0.17's rule), before anything is forgotten. Whatever the policy, the newest snapshot the
    remotes restore alone (`status`'s recovery point) is kept, for :data:`RESTORABLE`: while
    newer ones wait in the local queue (remotes down), it is all a lost home disk leaves."""
    rows = snapshot_table.rows(v.index)
    snaps = [retention.Snap(u, c, nm) for u, nm, c, *_ in rows]
    decision = retention.apply(snaps, policy, clock.now() if now is None else now)
    point = snapshot_table.recovery_point(v.index)
    kept = next((s for s in decision.forget if point and s.id == point[0]), None)
    if kept is not None and decision.keep:  # a policy that keeps nothing is refused below
        decision.forget.remove(kept)
        decision.keep.append((kept, [RESTORABLE]))
        made = {s.id: i for i, s in enumerate(snaps)}  # retention's order: ties, later first
        decision.keep.sort(key=lambda e: (e[0].time, made[e[0].id]), reverse=True)
    if snaps and not decision.keep:
        names = sorted({s.name for s in snaps if s.name})
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise PolicyKeepsNothing(
            f"refusing to forget all {len(snaps)} snapshot(s): the policy ({policy.describe()}) "
            f"keeps none of them (their names: {shown or 'none'}). Fix the policy; a "
            "--keep-name glob that matches nothing is the usual typo"
        )
    return decision


def command(
    v: Vault,
    policy: retention.Policy,
    dry_run: bool,
    run_prune: bool,
    delete: Callable[[list[str]], dict],
    hold_references: Callable[[], Callable[[], None]] | None = None,
) -> dict:
    """`vaultfs forget [--dry-run] [--prune]`, mounted (in the daemon: vaultfs/maintenance.py)
    or not: the report the command prints (its ``--json``). ``delete(uids)`` forgets the
    snapshots and uploads, returning the flush's ``uploaded``, ``pending``, ``errors`` and
    ``segments_below_k_placed``. Everything that can refuse (an immutable vault with
    ``run_prune``, a policy that keeps nothing) does so before anything is forgotten. With
    ``run_prune`` and ``dry_run`` the prune is a dry run counted as if the snapshots the policy
    drops were gone (:func:`prune.prune`'s ``forgetting``)."""
    from . import prune

    if run_prune and v.immutable:
        raise ImmutableVault(
            "--prune: this vault is immutable (append-only) and never frees space; run "
            "`vaultfs forget` without --prune to drop snapshots from the index only"
        )
    decision = decide(v, policy)
    gone = [s.id for s in decision.forget]
    result: dict = {
        "policy": policy.describe(),
        "dry_run": dry_run,
        "immutable": v.immutable,
        "keep": [
            {"id": s.id, "name": s.name, "time": s.time, "reasons": r} for s, r in decision.keep
        ],
        "forget": [{"id": s.id, "name": s.name, "time": s.time} for s in decision.forget],
    }
    if gone and not dry_run:
        result |= delete(gone)
    if run_prune:
        release = hold_references() if hold_references is not None else None
        try:
            rep = prune.prune(v, dry_run=dry_run, forgetting=tuple(gone) if dry_run else ())
        finally:
            if release is not None:
                release()
        result["prune"] = rep.as_dict()
    return result
