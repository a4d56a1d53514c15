"""Belief history without a database restore: ``show``, ``history`` and ``diff`` read only
the ``kb/`` files they need out of the vault's snapshots (vaultfs/kb/reader.py).

- :func:`show`: one belief's document (the ``<id>.json`` view of docs/kb.md): its row
  without the embedding, and its edges out and in. Reads the belief's bucket of
  ``beliefs/``, ``edges/out/`` and ``edges/in/`` and nothing else (not even the manifest).
- :func:`history`: the belief across every knowledge-base snapshot, oldest first, with what
  changed from one to the next. A bucket file identical to one already read is not fetched
  again (same BLAKE3 in the snapshots' manifests).
- :func:`diff`: beliefs and edges added, changed and removed between two snapshots. Only
  buckets whose files differ between the two manifests are fetched.
"""

from __future__ import annotations

import json
import time
import uuid

from ..errors import InputError
from . import layout, view
from .reader import KbFiles, KbSnap

#: Fields of a belief line compared by history and diff (the id never changes).
BELIEF_FIELDS = ("content", "confidence", "domains", "provenance", "created_at", "superseded_by")
EDGE_FIELDS = (
    "source_belief_id",
    "target_belief_id",
    "edge_type",
    "weight",
    "created_at",
    "metadata",
)


def _snap_json(s: KbSnap) -> dict:
    return {"id": s.uid, "name": s.name, "time": s.created}


def _find_line(data: bytes, key: str, value: str) -> list[dict]:
    """The lines of a bucket file whose ``key`` is ``value`` (a cheap byte search first)."""
    needle = f'"{key}" : "{value}"'.encode()
    if needle not in data:
        return []
    return [
        d for x in layout.split_lines(data) if needle in x and (d := json.loads(x))[key] == value
    ]


def document(files: KbFiles, snap: KbSnap, belief_id: str, single: bool = False) -> dict | None:
    """The belief's document in ``snap``, or None if the snapshot does not hold it.
    ``single``: one lookup, so its three files are read without the kb manifest."""
    bid = str(layout.parse_id(belief_id))
    b = bid[: layout.BUCKET_HEX]
    paths = [layout.beliefs_path(b), layout.edges_out_path(b), layout.edges_in_path(b)]
    got = files.read_present(snap, paths) if single else files.read(snap, paths, cache=True)
    rows = _find_line(got.get(paths[0], b""), "id", bid)
    if not rows:
        return None
    out = _find_line(got.get(paths[1], b""), "source_belief_id", bid)
    inc = _find_line(got.get(paths[2], b""), "target_belief_id", bid)
    return view.document(rows[0], out, inc)


def show(files: KbFiles, belief_id: str, snapshot: str = "latest") -> dict:
    """The document of ``belief_id`` in ``snapshot`` (with ``snapshot`` and ``bytes_read``
    added); InputError for an unknown snapshot or a belief it does not hold."""
    t0 = time.perf_counter()
    snap = files.find(snapshot)
    doc = document(files, snap, belief_id, single=True)
    if doc is None:
        raise InputError(f"belief {belief_id} is not in snapshot {snap.label}")
    doc["snapshot"] = _snap_json(snap)
    doc["bytes_read"] = files.bytes_read
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    return doc


def _edge_key(e: dict) -> str:
    """An edge as a whole: a changed weight or type shows as one removed and one added."""
    return json.dumps(e, sort_keys=True)


def history(files: KbFiles, belief_id: str) -> dict:
    """``belief_id`` across every knowledge-base snapshot: per snapshot its state
    (``added``, ``changed``, ``unchanged``, ``removed``, ``absent``), the fields that changed
    (``[old, new]``) and the edges added and removed (out and in). InputError if no snapshot
    holds it."""
    bid = str(layout.parse_id(belief_id))
    steps = []
    prev: dict | None = None
    ever = False
    for snap in files.snapshots():
        doc = document(files, snap, bid)
        step: dict = {"snapshot": _snap_json(snap)}
        if doc is None:
            step["state"] = "removed" if prev is not None else "absent"
        else:
            ever = True
            step["belief"] = {k: doc.get(k) for k in BELIEF_FIELDS}
            if prev is None:
                step["state"] = "added"
                step["changes"] = {}
                step["edges_added"] = doc["edges"]
                step["edges_removed"] = {"out": [], "in": []}
            else:
                changes = {
                    k: [prev.get(k), doc.get(k)] for k in BELIEF_FIELDS if prev.get(k) != doc.get(k)
                }
                added, removed = {}, {}
                for side in ("out", "in"):
                    old = {_edge_key(e): e for e in prev["edges"][side]}
                    new = {_edge_key(e): e for e in doc["edges"][side]}
                    added[side] = [new[k] for k in new if k not in old]
                    removed[side] = [old[k] for k in old if k not in new]
                touched = any(added.values()) or any(removed.values())
                step["state"] = "changed" if changes or touched else "unchanged"
                step["changes"] = changes
                step["edges_added"], step["edges_removed"] = added, removed
        steps.append(step)
        prev = doc
    if not ever:
        raise InputError(f"belief {belief_id} is in no knowledge-base snapshot")
    return {"belief": bid, "snapshots": steps, "bytes_read": files.bytes_read}


def _by_id(data: bytes, key: str = "id") -> dict[str, dict]:
    return {(d := json.loads(x))[key]: d for x in layout.split_lines(data)}


def diff(files: KbFiles, old: str, new: str) -> dict:
    """Beliefs and edges added, changed (with the fields) and removed from snapshot ``old``
    to ``new``; a changed embedding shows as the field ``embedding``."""
    s1, s2 = files.find(old), files.find(new)
    m1, m2 = files.manifest(s1), files.manifest(s2)

    def differing(kind: str, path) -> list[str]:
        out = []
        for b in sorted(set(m1.buckets(kind)) | set(m2.buckets(kind))):
            f1, f2 = m1.files.get(path(b)), m2.files.get(path(b))
            if (f1 and f1.blake3) != (f2 and f2.blake3):
                out.append(path(b))
        return out

    bel = sorted(
        {p[len("kb/beliefs/") :][: layout.BUCKET_HEX] for p in differing("beliefs", layout.beliefs_path)}
        | {p[len("kb/embeddings/") :][: layout.BUCKET_HEX] for p in differing("embeddings", layout.embeddings_path)}
    )  # fmt: skip
    bpaths = [layout.beliefs_path(b) for b in bel] + [layout.embeddings_path(b) for b in bel]
    epaths = differing("edges/out", layout.edges_out_path)
    a, z = files.read(s1, bpaths + epaths, True), files.read(s2, bpaths + epaths, True)

    def beliefs(got: dict[str, bytes]) -> tuple[dict[str, dict], dict[bytes, bytes]]:
        rows, embs = {}, {}
        for b in bel:
            rows |= _by_id(got.get(layout.beliefs_path(b), b""))
            for id16, _vec, rec in layout.iter_embeddings(got.get(layout.embeddings_path(b), b"")):
                embs[id16] = rec
        return rows, embs

    (r1, e1), (r2, e2) = beliefs(a), beliefs(z)

    changed_b = {}
    for i in sorted(r1.keys() & r2.keys()):
        fields = [k for k in BELIEF_FIELDS if r1[i].get(k) != r2[i].get(k)]
        u = uuid.UUID(i).bytes
        if e1.get(u) != e2.get(u):
            fields.append("embedding")
        if fields:
            changed_b[i] = fields
    ed1, ed2 = {}, {}
    for p in epaths:
        ed1 |= _by_id(a.get(p, b""))
        ed2 |= _by_id(z.get(p, b""))
    changed_e = {
        i: f
        for i in sorted(ed1.keys() & ed2.keys())
        if (f := [k for k in EDGE_FIELDS if ed1[i].get(k) != ed2[i].get(k)])
    }
    out = {
        "from": _snap_json(s1),
        "to": _snap_json(s2),
        "beliefs": {
            "added": sorted(r2.keys() - r1.keys()),
            "changed": changed_b,
            "removed": sorted(r1.keys() - r2.keys()),
        },
        "belief_edges": {
            "added": sorted(ed2.keys() - ed1.keys()),
            "changed": changed_e,
            "removed": sorted(ed1.keys() - ed2.keys()),
        },
        "bytes_read": files.bytes_read,
    }
    out["counts"] = {t: {k: len(v) for k, v in out[t].items()} for t in ("beliefs", "belief_edges")}
    return out
