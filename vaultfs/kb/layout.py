"""The ``kb/`` layout of a knowledge-base snapshot (docs/kb.md): paths, buckets, the binary
embedding records, the Merkle leaves and ``kb/manifest.json``.

Every file is a pure function of the database's rows, so an unchanged bucket is byte-identical
from one snapshot to the next and CDC dedup stores it once::

    kb/manifest.json               counts, checksums, Merkle roots, every file's BLAKE3
    kb/sources.jsonl               every source, by id
    kb/beliefs/<pp>.jsonl          beliefs whose id starts with hex <pp>, by id (no embedding)
    kb/embeddings/<pp>.bin         their embeddings, same order: binary records
    kb/edges/out/<pp>.jsonl        edges whose source belief starts with <pp>, by (source, id)
    kb/edges/in/<pp>.jsonl         the same edges by target (<pp> of the target): id, ends,
                                   type and weight only; a derived index for ``kb show``

A line is the row as Postgres's ``json_build_object`` writes it (keys in column order, except
that an edge line starts with the belief id it is grouped by; reals in their shortest exact
form, timestamps in UTC, jsonb as its canonical text; JSON escapes control characters, so a
line never holds a raw newline). An embedding
record is ``id (16 bytes) ‖ length (int32 BE, -1 for NULL) ‖ pgvector's binary form``
(``vector_send``: int16 dim, int16 0, dim × float32 BE): bit-exact, no text round trip.

Merkle tree (vaultfs/merkle.py's hashes): a belief's leaf is ``leaf(line ‖ 0x0A ‖ record)``,
an edge's ``leaf(out line)``, a source's ``leaf(line)``; a file's root is the root of its
leaves in file order, a table's root the root of its files' roots in path order, and the
snapshot's root ``root([sources, beliefs, belief_edges])``. A table's checksum is BLAKE3 over
the BLAKE3 hashes of its files in path order (:func:`table_summary`).
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from .. import merkle
from ..errors import InputError, IntegrityError

FORMAT = "vaultfs-kb/1"
ROOT = "kb"
MANIFEST = "kb/manifest.json"
SOURCES = "kb/sources.jsonl"
#: Hex digits of the id that name a bucket: 256 buckets (≈ 1 MB each at 100,000 beliefs).
BUCKET_HEX = 2
DIRS = ("kb", "kb/beliefs", "kb/embeddings", "kb/edges", "kb/edges/in", "kb/edges/out")
TABLE_ORDER = ("sources", "beliefs", "belief_edges")

_LEN = struct.Struct(">i")


def bucket_of(belief_id: str) -> str:
    """The bucket (lower-case hex prefix) a belief id (any UUID spelling) belongs to."""
    return str(parse_id(belief_id))[:BUCKET_HEX]


def parse_id(text: str) -> uuid.UUID:
    """A belief or edge id; an InputError for anything that is not a UUID."""
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise InputError(f"{text!r} is not a belief id (a UUID)") from None


def beliefs_path(b: str) -> str:
    return f"kb/beliefs/{b}.jsonl"


def embeddings_path(b: str) -> str:
    return f"kb/embeddings/{b}.bin"


def edges_out_path(b: str) -> str:
    return f"kb/edges/out/{b}.jsonl"


def edges_in_path(b: str) -> str:
    return f"kb/edges/in/{b}.jsonl"


def embedding_record(id16: bytes, vec: bytes | None) -> bytes:
    """One record of an embeddings file (``vec``: pgvector's binary form, or None)."""
    if vec is None:
        return id16 + _LEN.pack(-1)
    return id16 + _LEN.pack(len(vec)) + vec


def iter_embeddings(data: bytes) -> Iterator[tuple[bytes, bytes | None, bytes]]:
    """(id, vector bytes or None, the whole record) of each record of an embeddings file."""
    pos, n = 0, len(data)
    while pos < n:
        if pos + 20 > n:
            raise IntegrityError("an embeddings file ends inside a record")
        (ln,) = _LEN.unpack_from(data, pos + 16)
        end = pos + 20 + max(ln, 0)
        if end > n:
            raise IntegrityError("an embeddings file ends inside a record")
        yield data[pos : pos + 16], (None if ln < 0 else data[pos + 20 : end]), data[pos:end]
        pos = end


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a ``.jsonl`` file, without their newlines."""
    if not data:
        return []
    if not data.endswith(b"\n"):
        raise IntegrityError("a kb line file does not end with a newline")
    return data[:-1].split(b"\n")


def belief_leaves(lines: list[bytes], records: list[bytes]) -> list[bytes]:
    """The Merkle leaves of beliefs: ``leaf(line ‖ 0x0A ‖ embedding record)`` of each pair."""
    return merkle.leaf_hashes([x + b"\n" + r for x, r in zip(lines, records, strict=True)])


@dataclass(frozen=True)
class FileInfo:
    """A file of the layout as ``kb/manifest.json`` records it (``root``: .jsonl files of
    beliefs, out-edges and sources)."""

    rows: int
    size: int
    blake3: str
    root: str | None = None

    def as_json(self) -> dict:
        d = {"rows": self.rows, "bytes": self.size, "blake3": self.blake3}
        if self.root is not None:
            d["root"] = self.root
        return d


def file_hash(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@dataclass
class KbManifest:
    """``kb/manifest.json``: what a knowledge-base snapshot holds and how to check it."""

    created: str
    dim: int
    files: dict[str, FileInfo]
    #: table -> :func:`table_summary`
    tables: dict[str, dict]
    root: str
    database: dict

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "created": self.created,
            "database": self.database,
            "dim": self.dim,
            "bucket_hex_digits": BUCKET_HEX,
            "tables": self.tables,
            "root": self.root,
            "files": {p: f.as_json() for p, f in sorted(self.files.items())},
        }
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> KbManifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise IntegrityError(f"kb/manifest.json has format {body.get('format')!r}")
            if body.get("bucket_hex_digits") != BUCKET_HEX:
                raise IntegrityError("kb/manifest.json uses another bucket width")
            files = {
                p: FileInfo(f["rows"], f["bytes"], f["blake3"], f.get("root"))
                for p, f in body["files"].items()
            }
            m = cls(
                body["created"], body["dim"], files, body["tables"], body["root"], body["database"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"kb/manifest.json is malformed: {e}") from None
        # the counts, checksums and roots must follow from the file list
        tables = {t: table_summary(files, t) for t in TABLE_ORDER}
        root = merkle.root([bytes.fromhex(tables[t]["root"]) for t in TABLE_ORDER]).hex()
        if tables != m.tables or root != m.root:
            raise IntegrityError("kb/manifest.json: tables or root do not match its file list")
        return m

    def buckets(self, kind: str) -> list[str]:
        """The buckets that have a file of ``kind`` (beliefs, embeddings, edges/out, edges/in)."""
        pre = f"kb/{kind}/"
        return sorted(p[len(pre) : len(pre) + BUCKET_HEX] for p in self.files if p.startswith(pre))

    def summary(self) -> dict:
        """What belongs in the vault's signed manifest: the Merkle root over the belief and
        edge leaves, and each table's row count and checksum."""
        return {
            "format": FORMAT,
            "root": self.root,
            "tables": {
                t: {"rows": v["rows"], "checksum": v["checksum"]} for t, v in self.tables.items()
            },
        }


#: Which files make up each table (path prefixes; kb/edges/in/ is derived, in none).
TABLE_FILES = {
    "sources": (SOURCES,),
    "beliefs": ("kb/beliefs/", "kb/embeddings/"),
    "belief_edges": ("kb/edges/out/",),
}


def table_summary(files: dict[str, FileInfo], table: str) -> dict:
    """A table's ``rows``, ``checksum`` (BLAKE3 over its files' BLAKE3 hashes, in path order)
    and ``root`` (Merkle root over its files' roots, in path order)."""
    paths = sorted(p for p in files if p.startswith(TABLE_FILES[table]))
    digest = blake3.blake3()
    roots = []
    rows = 0
    for p in paths:
        f = files[p]
        digest.update(bytes.fromhex(f.blake3))
        if f.root is not None:
            roots.append(bytes.fromhex(f.root))
            rows += f.rows
    return {"rows": rows, "checksum": digest.hexdigest(), "root": merkle.root(roots).hex()}


def check_file(m: KbManifest, path: str, data: bytes) -> None:
    """IntegrityError unless ``data`` is the file ``path`` the manifest describes."""
    info = m.files.get(path)
    if info is None:
        raise IntegrityError(f"{path} is not listed in kb/manifest.json")
    if len(data) != info.size or file_hash(data) != info.blake3:
        raise IntegrityError(f"{path} does not match its hash in kb/manifest.json")
