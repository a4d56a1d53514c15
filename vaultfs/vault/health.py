"""Health and status: where the vault's shards are, what each remote holds, how many
failure domains the vault survives losing (``vaultfs status``)."""

from __future__ import annotations

from ..index import Index, VaultParams, audit, chunks, manifests, segments, snapshots
from ..index import remotes as remote_table
from ..keys import VaultKeys
from ..remotes import Remote
from .placement import place, survivable_losses


def status(index: Index, keys: VaultKeys, params: VaultParams) -> dict:
    """The vault's state as ``vaultfs status`` reports it (docs/operations.md)."""
    remotes = remote_table.active_states(index)
    domains = {rid: (dom or f"remote{rid}") for rid, _s, dom, _o, _e in remotes}
    placed: dict[int, list[int]] = {}
    planned: dict[int, list[int]] = {}
    for seg, rid, state in segments.placements(index):
        planned.setdefault(seg, []).append(rid)
        if state == "placed":
            placed.setdefault(seg, []).append(rid)
    segs = segments.live_ids(index)  # what repair keeps at full redundancy
    placed_lists = [placed.get(s, []) for s in segs]
    planned_lists = [planned.get(s, []) for s in segs]
    per_remote = []
    for rid, spec, _dom, last_ok, last_err in remotes:
        q = segments.remote_totals(index, rid, "queued")
        p = segments.remote_totals(index, rid, "placed")
        per_remote.append(
            {
                "remote": Remote(spec).label,
                "domain": domains[rid],
                "placed_objects": p[0],
                "placed_bytes": p[1],
                "queued_objects": q[0],
                "queued_bytes": q[1],
                "last_ok": last_ok,
                "last_error": last_err,
                **remote_health(index, rid),
            }
        )
    # shards on a remote that is unreachable right now do not count as placed "now"
    down = remote_table.unreachable(index) | {
        rid for rid, spec, *_ in remotes if Remote(spec, rid).missing_root()
    }
    placed_lists = [[r for r in lst if r not in down] for lst in placed_lists]
    under_k = segments.count_under_k(index) if segs else 0
    snaps = snapshots.summary(index)
    logical = chunks.totals(index)
    return {
        "vault_id": keys.vault_id.hex(),
        "fingerprint": keys.fingerprint(),
        "k": params.k,
        "n": params.n,
        "immutable": params.immutable,
        "remotes": per_remote,
        "domains": len(set(domains.values())),
        "segments": len(segs),
        "segments_below_k_placed": under_k,
        "snapshots": snaps[0],
        "last_snapshot": snaps[1],
        "unique_bytes": logical[0],
        "stored_bytes": logical[1],
        "survives_losses_design": survivable_losses(planned_lists, params.k, domains)
        if segs
        else design_losses(domains, params.k, params.n),
        "survives_losses_now": survivable_losses(placed_lists, params.k, domains)
        if segs and under_k == 0
        else (0 if segs else design_losses(domains, params.k, params.n)),
        # what the profile promises over the remotes the vault has now: the placement rule's
        # own figure; shards squeezed onto fewer remotes (a `remote remove`) fall short of it
        # until repair spreads them again
        "survives_losses_promised": design_losses(domains, params.k, params.n),
        "manifests_pending": manifests.pending_uploads(index),
    }


def remote_health(index: Index, rid: int) -> dict:
    """Reachability and last audit of remote ``rid`` (tables remote_health, audit_runs), as
    the ``health``/``last_audit*``/``lost_objects`` fields of its status entry. ``health`` is
    the last audit's finding ('ok', 'unreachable', 'degraded', 'stale'; 'unknown' before
    any), except that a remote found 'ok' (or never audited) whose last operation failed
    since (an upload of a backup or flush: remotes.last_error) is 'failing', with that error
    as the detail, at once and until an operation on it succeeds. A local-directory remote
    whose directory is missing now (one stat: :meth:`Remote.missing_root`) is
    'unreachable' with that reason, whatever was recorded (since when: the recorded time
    of an 'unreachable' finding, else unknown)."""
    h = remote_table.health(index, rid)
    a = audit.last_run(index, rid)
    (lost, _bytes) = segments.remote_totals(index, rid, "lost")
    state, since, detail = (h[0], h[1], h[3]) if h else ("unknown", None, None)
    spec = remote_table.specs(index).get(rid)
    if spec is not None and (gone := Remote(spec, rid).missing_root()):
        state, since, detail = "unreachable", since if state == "unreachable" else None, gone
    elif state in ("ok", "unknown") and (failed := remote_table.last_error(index, rid)):
        state, since, detail = "failing", None, failed  # the error's time is not recorded
    return {
        "health": state,
        "health_since": since,
        "health_detail": detail,
        "lost_objects": lost,
        "last_audit": (a[1] or a[0]) if a else None,
        "last_audit_mode": a[2] if a else None,
        "last_audit_complete": (a[1] is not None) if a else None,
        "last_audit_checks": a[3] if a else 0,
        "last_audit_confidence": a[4] if a else None,
    }


def note_missing_roots(index: Index, now: float) -> list[int]:
    """Record as 'unreachable' at ``now`` (remote_health, the reason as detail) each active
    local-directory remote whose directory is missing (:meth:`Remote.missing_root`, one stat
    each, no rclone), so the time it went missing is kept from one routine pass to the next
    (``remote_unreachable`` alerts past the grace) even while nothing is written to it; the
    mark clears as any audit's does, once a flush reaches the remote again
    (:func:`remote_table.mark_reachable`). Returns their ids."""
    gone = [
        (rid, why)
        for rid, spec, _dom, _ok, _err in remote_table.active_states(index)
        if (why := Remote(spec, rid).missing_root())
    ]
    if gone:
        with index.tx() as db:
            for rid, why in gone:
                remote_table.record_health(db, rid, "unreachable", now, why)
    return [rid for rid, _why in gone]


def design_losses(domains: dict[int, str], k: int, n: int) -> int:
    """Failure domains survivable by the placement rule itself over ``domains`` ({remote
    id: failure domain}): what a k-of-n profile promises over those remotes."""
    rows = [(rid, dom) for rid, dom in domains.items()]
    if not rows:
        return 0
    lists = [place(rows, s, n) for s in range(len(rows))]
    return survivable_losses(lists, k, domains)
