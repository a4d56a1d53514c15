"""The browsable view of a knowledge-base snapshot in the mount: one document per belief,
``.snapshots/<name>/kb/beliefs/<id>.json``, beside the stored bucket files.

The documents are not stored (docs/kb.md, "Browsing": 100,000 real files would add 100,000
index entries to every snapshot and make its commit several times slower than the export);
they are rendered from the three files of the belief's bucket (``beliefs/<pp>.jsonl``,
``edges/out/<pp>.jsonl``, ``edges/in/<pp>.jsonl``), the same way ``vaultfs kb show`` renders
one. ``kb/edges/`` needs no view: its files hold one edge per line already.

Contract: every method may block (it reads files through ``read``, which fetches and decrypts
chunks) and parses JSON, so the FUSE layer calls them from worker threads only, never on the
event loop. They are thread-safe. ``read(snap, path)`` returns a file of snapshot ``snap``
(its ``snapshots.id``) or None when the snapshot does not hold it. Memory stays bounded: the
rendered documents of :data:`CACHE_BUCKETS` buckets and the document sizes of
:data:`CACHE_SNAPSHOTS` snapshots are kept.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable

from ..errors import InputError, IntegrityError
from . import layout

#: The directory of a snapshot that holds the documents (and the stored bucket files).
VIEW_DIR = b"kb/beliefs"
CACHE_BUCKETS = 16
CACHE_SNAPSHOTS = 2

Reader = Callable[[int, str], bytes | None]


def document(row: dict, out: list[dict], inc: list[dict]) -> dict:
    """A belief's document: its row (without the embedding) and ``edges: {out, in}``, each
    edge without the belief id it is listed under."""
    for e in out:
        e.pop("source_belief_id", None)
    for e in inc:
        e.pop("target_belief_id", None)
    return {**row, "edges": {"out": out, "in": inc}}


def document_bytes(doc: dict) -> bytes:
    """The bytes of a ``<id>.json`` file: the document as indented JSON and a newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"


def doc_name(belief_id: str) -> bytes:
    return f"{belief_id}.json".encode()


def render_bucket(beliefs: bytes, edges_out: bytes, edges_in: bytes) -> dict[bytes, bytes]:
    """{``<id>.json``: document bytes} of every belief in a bucket's three files."""
    try:
        out: dict[str, list[dict]] = {}
        for x in layout.split_lines(edges_out):
            e = json.loads(x)
            out.setdefault(e["source_belief_id"], []).append(e)
        inc: dict[str, list[dict]] = {}
        for x in layout.split_lines(edges_in):
            e = json.loads(x)
            inc.setdefault(e["target_belief_id"], []).append(e)
        docs = {}
        for x in layout.split_lines(beliefs):
            row = json.loads(x)
            bid = row["id"]
            docs[doc_name(bid)] = document_bytes(document(row, out.get(bid, []), inc.get(bid, [])))
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"a kb bucket file is malformed: {e}") from None
    return docs


class BeliefView:
    """Documents of the ``kb/beliefs/`` directories of snapshot views (see the module
    docstring for the threading and memory contract)."""

    def __init__(self, read: Reader) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[int, str], dict[bytes, bytes]] = OrderedDict()
        self._sizes: OrderedDict[int, dict[bytes, int]] = OrderedDict()
        self._kb: dict[int, bool] = {}  # snapshot -> holds a knowledge base

    def listing(self, snap: int, stored: list[bytes]) -> list[tuple[bytes, int]]:
        """(name, size) of every document of snapshot ``snap`` whose ``kb/beliefs/`` holds
        the files named ``stored`` (the buckets are the ``<pp>.jsonl`` among them); none
        for a snapshot without a valid kb/manifest.json (a plain directory named kb/beliefs)."""
        if not self._holds_kb(snap):
            return []
        buckets = sorted(
            n[: -len(".jsonl")].decode()
            for n in stored
            if n.endswith(b".jsonl") and len(n) == layout.BUCKET_HEX + len(".jsonl")
        )
        sizes: dict[bytes, int] = {}
        for b in buckets:
            sizes.update((name, len(doc)) for name, doc in self._bucket(snap, b).items())
        with self._lock:
            self._sizes[snap] = sizes
            self._sizes.move_to_end(snap)
            while len(self._sizes) > CACHE_SNAPSHOTS:
                self._sizes.popitem(last=False)
        return sorted(sizes.items())

    def size(self, snap: int, name: bytes) -> int | None:
        """The size of document ``name`` of snapshot ``snap``, None if there is none."""
        with self._lock:
            known = self._sizes.get(snap)
            if known is not None and name in known:
                return known[name]
        doc = self.document(snap, name)
        return None if doc is None else len(doc)

    def document(self, snap: int, name: bytes) -> bytes | None:
        """Document ``name`` (``<belief id>.json``) of snapshot ``snap``, or None."""
        if not name.endswith(b".json"):
            return None
        try:
            bid = str(layout.parse_id(name[: -len(".json")].decode()))
        except (UnicodeDecodeError, InputError):
            return None
        if doc_name(bid) != name or not self._holds_kb(snap):  # only the canonical spelling
            return None
        return self._bucket(snap, bid[: layout.BUCKET_HEX]).get(name)

    def _holds_kb(self, snap: int) -> bool:
        """Whether snapshot ``snap`` is a knowledge-base snapshot (its kb/manifest.json
        parses and checks), decided once per snapshot."""
        with self._lock:
            known = self._kb.get(snap)
        if known is None:
            data = self._read(snap, layout.MANIFEST)
            try:
                known = data is not None and bool(layout.KbManifest.parse(data))
            except IntegrityError:
                known = False
            with self._lock:
                self._kb[snap] = known
        return known

    def _bucket(self, snap: int, b: str) -> dict[bytes, bytes]:
        key = (snap, b)
        with self._lock:
            hit = self._buckets.get(key)
            if hit is not None:
                self._buckets.move_to_end(key)
                return hit
        paths = (layout.beliefs_path(b), layout.edges_out_path(b), layout.edges_in_path(b))
        data = [self._read(snap, p) or b"" for p in paths]
        docs = render_bucket(*data)
        with self._lock:
            self._buckets[key] = docs
            while len(self._buckets) > CACHE_BUCKETS:
                self._buckets.popitem(last=False)
        return docs
