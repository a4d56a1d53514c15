"""Signed manifests: the root of trust a restore starts from (docs/format.md, "Manifest").

offset size   field
0      4      magic "VFSM"
4      1      format version (1)
5      2      suite id (big-endian)
7      1      signature algorithm id (1 = ML-DSA-65 ‖ Ed25519;
                                      2 = ML-DSA-65 ‖ Ed25519 ‖ SLH-DSA-SHA2-128s;
                                      3 = ML-DSA-65 ‖ Ed25519 ‖ SLH-DSA-SHA2-128f)
8      16     vault id
24     8      sequence number (big-endian, strictly increasing per commit)
32     8      creation time, milliseconds since the Unix epoch
40     4      body length L
44     L      body: metadata envelope (envelope.seal_meta, kind "manifest" ‖ seq) of JSON
44+L   2      signature length S
46+L   S      signature over "vaultfs/v1/manifest" ‖ bytes [0, 44+L): algorithm 1 is the
              composite ML-DSA-65 (3309) ‖ Ed25519 (64); algorithm 2 appends SLH-DSA-SHA2-128s
              (7856) over the same message, algorithm 3 SLH-DSA-SHA2-128f (17088), the public
              key named in the body ("slhdsa_public")

The suite id is the vault's current crypto suite when the manifest was written; it is bound
into the body's AEAD associated data, and a reader that knows a suite was retired refuses
manifests under it (a stale pre-re-encryption state). With algorithm 2 or 3 the composite is
checked first, then the body is opened, then SLH-DSA is checked against the pinned public key
(the caller's ``keys.slhdsa_public``, of parameter set ``keys.slhdsa_param``) or, with no pinned
key (a seed-only restore), the one the authenticated body names. A reader with a pinned key
refuses algorithm 1 (a downgrade) and the other SLH-DSA algorithm than its key's.

The body's schema is :class:`Body` (docs/format.md 10.2), the only code that knows its JSON
keys: the vault writes one with :meth:`Body.to_dict`, and restore and verify take manifests
from remotes with :func:`read`, which refuses a body that does not fit it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import blake3

from . import envelope, indexblocks
from .errors import IntegrityError
from .keys import (
    ED25519_SIG_LEN,
    MLDSA65_SIG_LEN,
    SIG_MLDSA65_ED25519,
    SLHDSA_BY_SIG_ALG,
    SLHDSA_PARAMS,
    SUITE_XWING_AES256GCM,
    VaultKeys,
    verify_slhdsa,
)

MAGIC = b"VFSM"
VERSION = 2  # docs/format.md: version 1 vaults are refused by name (section 14)
HEAD = struct.Struct(">4sBHB16sQQI")
assert HEAD.size == 44
SIGN_LABEL = b"vaultfs/v1/manifest"
#: Most bytes a manifest object may have. A real one is tens of KiB (the header, the sealed
#: JSON body naming the index shards, at most ~28 KiB of signatures); readers refuse an
#: object listed larger unread and never read more than this plus one byte of one.
MAX_BYTES = 1 << 20
#: Why a manifest signed for another vault id is refused; a restore whose every refusal is
#: this one was given another vault's key (a strategy's master key on a tier's remotes).
OTHER_VAULT = "manifest belongs to another vault (vault id differs)"


@dataclass(frozen=True)
class ShardRef:
    """One shard object of an index copy (``index.segments[].shards[]``)."""

    idx: int  # fragment index, 0 ≤ idx < n
    name: str  # object name under meta/
    size: int  # object length in bytes
    hash: bytes  # BLAKE3 of the whole object (32 bytes): the signature pins the index by it


@dataclass(frozen=True)
class IndexSegment:
    """One meta segment holding records of index objects (``index.segments[]``)."""

    uid: bytes  # segment uid (16 bytes), as in its shard headers and the map's locations
    used: int  # bytes of records in this segment; the rest is padding
    size: int  # the segment size S that was erasure coded ("size"; absent in older
    #            manifests, where it is the vault-wide segment_size)
    k: int
    n: int
    ec_alg: int | None  # erasure algorithm id; absent in the earliest manifests (None)
    shards: tuple[ShardRef, ...]


@dataclass(frozen=True)
class MapPage:
    """One page of the index's block map (``index.map[]``): an index object and where its
    record is (docs/format.md 9)."""

    id: bytes  # object id (32 bytes): keyed BLAKE3 of the page's plaintext
    uid: bytes  # uid of the meta segment holding its record (one of ``index.segments``)
    offset: int  # the record's offset in that segment
    length: int  # the record's length


@dataclass(frozen=True)
class IndexDescription:
    """A manifest's index as a reader needs it, whatever the number of levels it is written
    in (docs/format.md 9, 9.2): the shipped file's length and block size, every meta segment
    holding an object of it, and every page of its block map. Only
    :func:`index_description` makes one."""

    length: int
    block_size: int
    segments: tuple[IndexSegment, ...]
    map: tuple[MapPage, ...]


@dataclass(frozen=True)
class KeyringEntry:
    """One key epoch (``keyring[]``): its data key, HPKE-wrapped to the seed's KEM keys."""

    epoch: int
    suite: int  # crypto suite id of the wrapping
    wrapped: bytes


@dataclass(frozen=True)
class Link:
    """A manifest named by its sequence number and the BLAKE3 of its whole object bytes
    (``prev`` and ``fork`` in the body; docs/format.md 10.3)."""

    seq: int
    hash: bytes  # 32 bytes: :func:`object_hash` of the manifest object

    def to_dict(self) -> dict:
        return {"seq": self.seq, "hash": self.hash.hex()}

    @property
    def short_hash(self) -> str:
        """The first 16 hex digits of the hash: how outputs name a manifest's hash."""
        return self.hash.hex()[:16]

    @property
    def short(self) -> str:
        """``#seq/hash16``: how every output names a manifest."""
        return f"#{self.seq}/{self.short_hash}"

    def as_json(self) -> dict:
        """``{"seq": N, "manifest_hash": hex16}``, the fields every JSON output carries."""
        return {"seq": self.seq, "manifest_hash": self.short_hash}


def object_hash(blob: bytes) -> bytes:
    """The hash that names a manifest object in the chain: BLAKE3 of all its bytes."""
    return blake3.blake3(blob).digest()


@dataclass(frozen=True)
class Body:
    """The manifest body (docs/format.md 10.2): the only code that knows its JSON keys.

    Every field is in format version 2 (the ``index`` fields a block map, docs/format.md
    9, in one level or, past :data:`vaultfs.vault.metaship.ONE_LEVEL_MAX`, two: 9.2; read
    it through :func:`index_description`). The writer always writes all of them but
    ``slhdsa_public``/``slhdsa_sealed`` (present only with signature algorithm 2 or 3;
    :func:`encode` adds ``slhdsa_public`` from the signing key) and ``fork`` (only on an
    explicit fork). ``prev`` is required (null for the first manifest). A reader takes
    ``retired_suites`` and an index segment's ``size`` and ``ec_alg`` as optional (older
    writers), and ignores keys it does not know.
    """

    vault_root: bytes  # Merkle root over all data segments' roots (32 bytes)
    k: int  # the vault's code parameters
    n: int
    segment_size: int  # the vault's full segment size
    keyring: tuple[KeyringEntry, ...]  # every key epoch, in epoch order
    index_length: int  # length of the shipped SQLite file ("index.length")
    index_block_size: int  # bytes per index block, the last may be shorter ("index.block_size")
    # one level: every meta segment the index objects are in; two levels: those holding the
    # second-level pages (read the whole list through :func:`index_description`)
    index_segments: tuple[IndexSegment, ...]
    index_map: tuple[MapPage, ...]  # one level: the block map's pages, in order; two: ()
    # two levels (docs/format.md 9.2): the pages listing the map pages ("index.map2") and
    # those listing the other meta segments ("index.segment_pages"); None and () for one
    index_map2: tuple[MapPage, ...] | None = None
    index_segment_pages: tuple[MapPage, ...] = ()
    retired_suites: frozenset[int] = frozenset()  # suites whose data readers must refuse
    slhdsa_sealed: bytes | None = None  # the SLH-DSA secret key, sealed under the seed
    slhdsa_public: bytes | None = None  # the SLH-DSA public key that signed this manifest
    # knowledge-base snapshot uid -> {"format", "root", "tables": {table: {"rows", "checksum"}}}
    kb: dict[str, dict] = field(default_factory=dict)
    prev: Link | None = None  # the manifest this one follows (None: the first of the vault)
    fork: Link | None = None  # an explicit fork: the remotes' newest manifest it forked from

    def to_dict(self) -> dict:
        """The JSON object :func:`encode` signs (canonical bytes come from ``encode``)."""
        out: dict = {
            "vault_root": self.vault_root.hex(),
            "k": self.k,
            "n": self.n,
            "segment_size": self.segment_size,
            "keyring": [
                {"epoch": e.epoch, "suite": e.suite, "wrapped": e.wrapped.hex()}
                for e in self.keyring
            ],
            "index": self._index_dict(),
            "retired_suites": sorted(self.retired_suites),
            "prev": None if self.prev is None else self.prev.to_dict(),
        }
        if self.fork is not None:
            out["fork"] = self.fork.to_dict()
        if self.slhdsa_sealed is not None:
            out["slhdsa_sealed"] = self.slhdsa_sealed.hex()
        if self.slhdsa_public is not None:
            out["slhdsa_public"] = self.slhdsa_public.hex()
        if self.kb:
            out["kb"] = self.kb
        return out

    def _index_dict(self) -> dict:
        out: dict = {
            "length": self.index_length,
            "block_size": self.index_block_size,
            "segments": [_segment_dict(seg) for seg in self.index_segments],
        }
        if self.index_map2 is None:
            out["map"] = [_page_dict(p) for p in self.index_map]
        else:  # no "map": a reader of one level refuses the body (index.map missing)
            out["levels"] = 2
            out["map2"] = [_page_dict(p) for p in self.index_map2]
            out["segment_pages"] = [_page_dict(p) for p in self.index_segment_pages]
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> Body:
        """Read a decoded body against the schema. Raises :class:`IntegrityError` naming the
        first field that is missing or of the wrong type (a validly signed but malformed body
        is refused like a corrupt one)."""
        index = _object(_get(obj, "index", ""), "index")
        segment_size = _int(obj, "segment_size", "")
        levels = _int(index, "levels", "index.", 1)
        if levels not in (1, 2):
            raise _malformed(
                "index.levels", f"an index of {levels} levels; this vaultfs reads 1 or 2"
            )
        return cls(
            vault_root=_hex(obj, "vault_root", "", 32),
            k=_int(obj, "k", ""),
            n=_int(obj, "n", ""),
            segment_size=segment_size,
            keyring=tuple(
                KeyringEntry(_int(e, "epoch", w), _int(e, "suite", w), _hex(e, "wrapped", w))
                for w, e in _objects(obj, "keyring", "")
            ),
            index_length=_int(index, "length", "index."),
            index_block_size=_positive(index, "block_size", "index."),
            index_segments=tuple(
                _parse_segment(seg, w, segment_size)
                for w, seg in _objects(index, "segments", "index.")
            ),
            index_map=_pages(index, "map") if levels == 1 else (),
            index_map2=_pages(index, "map2") if levels == 2 else None,
            index_segment_pages=_pages(index, "segment_pages") if levels == 2 else (),
            retired_suites=frozenset(
                _as_int(s, f"retired_suites[{i}]")
                for i, s in enumerate(_list(obj, "retired_suites", "", []))
            ),
            slhdsa_sealed=_hex(obj, "slhdsa_sealed", "") if "slhdsa_sealed" in obj else None,
            slhdsa_public=_hex(obj, "slhdsa_public", "", 32) if "slhdsa_public" in obj else None,
            kb=_parse_kb(_object(_get(obj, "kb", "", {}), "kb")),
            prev=_link(obj, "prev"),
            fork=_link(obj, "fork") if "fork" in obj else None,
        )


def _link(obj: dict, key: str) -> Link | None:
    """``obj[key]``: a link object or null (required: a body without ``prev`` is refused)."""
    v = _get(obj, key, "")
    if v is None:
        return None
    link = _object(v, key)
    return Link(_int(link, "seq", f"{key}."), _hex(link, "hash", f"{key}.", 32))


def _page_dict(p: MapPage) -> dict:
    return {"id": p.id.hex(), "uid": p.uid.hex(), "offset": p.offset, "length": p.length}


def _pages(index: dict, key: str) -> tuple[MapPage, ...]:
    """``index[key]``: a list of index objects and where their records are."""
    return tuple(
        MapPage(
            _hex(p, "id", w, 32), _hex(p, "uid", w, 16), _int(p, "offset", w), _int(p, "length", w)
        )
        for w, p in _objects(index, key, "index.")
    )


def encode_segment_page(segments: list[IndexSegment]) -> bytes:
    """The plaintext of a second-level segment page (docs/format.md 9.2): the descriptors,
    as in ``index.segments``, as a canonical JSON array."""
    return json.dumps(
        [_segment_dict(seg) for seg in segments], separators=(",", ":"), sort_keys=True
    ).encode()


def index_description(body: Body, open_page: Callable[[MapPage], bytes]) -> IndexDescription:
    """The index ``body`` names, whole: the one way every reader (restore, the lazy view,
    home rebuild, verify, repair) learns which meta segments and map pages a
    manifest's index has. One level: the body's lists, read at no cost. Two levels
    (docs/format.md 9.2): ``open_page(page)`` must return the checked plaintext of a
    second-level page, whose record is in one of ``body.index_segments``; the map pages
    they list are checked against the index length, and a meta segment named twice is
    refused. Raises :class:`IntegrityError`."""
    if body.index_map2 is None:
        return IndexDescription(
            body.index_length, body.index_block_size, body.index_segments, body.index_map
        )
    fan = indexblocks.MAP_FANOUT
    npages = indexblocks.map_pages(body.index_length, body.index_block_size)
    if len(body.index_map2) != -(-npages // fan):
        raise IntegrityError("the manifest's second-level map does not cover the index length")
    pages: list[MapPage] = []
    for q, page in enumerate(body.index_map2):
        entries = indexblocks.decode_map_page(open_page(page))
        if len(entries) != min(fan, npages - q * fan):
            raise IntegrityError(f"second-level map page {q} lists {len(entries)} map pages")
        pages += [MapPage(oid, loc.uid, loc.offset, loc.length) for oid, loc in entries]
    listed: list[IndexSegment] = []
    for q, page in enumerate(body.index_segment_pages):
        where = f"index.segment_pages[{q}]"
        part = _json(open_page(page), where)
        if not isinstance(part, list) or not 1 <= len(part) <= fan:
            raise _malformed(where, f"expected a list of 1 to {fan} segments")
        listed += [
            _parse_segment(_object(v, f"{where}[{i}]"), f"{where}[{i}].", body.segment_size)
            for i, v in enumerate(part)
        ]
    # in the order the writer made them: the segments holding blocks and map pages, then
    # those holding the second-level pages (home rebuild numbers the new ones so)
    segments = {seg.uid: seg for seg in (*listed, *body.index_segments)}
    if len(segments) != len(listed) + len(body.index_segments):
        raise IntegrityError("the manifest's index names a meta segment twice")
    return IndexDescription(
        body.index_length, body.index_block_size, tuple(segments.values()), tuple(pages)
    )


def _segment_dict(seg: IndexSegment) -> dict:
    out = {
        "uid": seg.uid.hex(),
        "used": seg.used,
        "size": seg.size,
        "k": seg.k,
        "n": seg.n,
        "shards": [
            {"idx": s.idx, "name": s.name, "size": s.size, "hash": s.hash.hex()} for s in seg.shards
        ],
    }
    if seg.ec_alg is not None:
        out["ec_alg"] = seg.ec_alg
    return out


def _parse_segment(seg: dict, where: str, segment_size: int) -> IndexSegment:
    k, n = _int(seg, "k", where), _int(seg, "n", where)
    if not 1 <= k <= n:
        raise _malformed(f"{where}k", f"k={k}, n={n} is not a k-of-n code")
    return IndexSegment(
        uid=_hex(seg, "uid", where),
        used=_int(seg, "used", where),
        size=_int(seg, "size", where, segment_size),
        k=k,
        n=n,
        ec_alg=_int(seg, "ec_alg", where) if "ec_alg" in seg else None,
        shards=tuple(
            ShardRef(
                _int(s, "idx", w), _str(s, "name", w), _int(s, "size", w), _hex(s, "hash", w, 32)
            )
            for w, s in _objects(seg, "shards", where)
        ),
    )


# -- reading JSON fields: every failure is an IntegrityError naming the field ---------------
_REQUIRED: object = object()


def _parse_kb(kb: dict) -> dict[str, dict]:
    """The ``kb`` key (10.2) checked: per snapshot uid a format, a 32-byte root and, per
    table, a row count and a 32-byte checksum; returned in the same shape."""
    out = {}
    for uid, v in kb.items():
        where = f"kb.{uid}."
        s = _object(v, where[:-1])
        tables = _object(_get(s, "tables", where), where + "tables")
        out[uid] = {
            "format": _str(s, "format", where),
            "root": _hex(s, "root", where, 32).hex(),
            "tables": {
                t: {
                    "rows": _int(_object(tv, f"{where}tables.{t}"), "rows", f"{where}tables.{t}."),
                    "checksum": _hex(tv, "checksum", f"{where}tables.{t}.", 32).hex(),
                }
                for t, tv in tables.items()
            },
        }
    return out


def _malformed(where: str, why: str) -> IntegrityError:
    return IntegrityError(f"malformed manifest body: {where}: {why}")


def _get(obj: dict, key: str, where: str, default: object = _REQUIRED) -> object:
    if key in obj:
        return obj[key]
    if default is _REQUIRED:
        raise _malformed(where + key, "missing")
    return default


def _int(obj: dict, key: str, where: str, default: object = _REQUIRED) -> int:
    return _as_int(_get(obj, key, where, default), where + key)


def _positive(obj: dict, key: str, where: str) -> int:
    v = _int(obj, key, where)
    if v == 0:
        raise _malformed(where + key, "expected a positive integer, got 0")
    return v


def _as_int(v: object, where: str) -> int:
    if type(v) is not int or v < 0:  # bool is an int subclass: refused too
        raise _malformed(where, f"expected a non-negative integer, got {v!r:.40}")
    return v


def _str(obj: dict, key: str, where: str) -> str:
    v = _get(obj, key, where)
    if not isinstance(v, str):
        raise _malformed(where + key, f"expected a string, got {v!r:.40}")
    return v


def _hex(obj: dict, key: str, where: str, length: int | None = None) -> bytes:
    try:
        v = bytes.fromhex(_str(obj, key, where))
    except ValueError:
        raise _malformed(where + key, "not hex") from None
    if length is not None and len(v) != length:
        raise _malformed(where + key, f"expected {length} bytes, got {len(v)}")
    return v


def _list(obj: dict, key: str, where: str, default: object = _REQUIRED) -> list:
    v = _get(obj, key, where, default)
    if not isinstance(v, list):
        raise _malformed(where + key, f"expected a list, got {v!r:.40}")
    return v


def _object(v: object, where: str) -> dict:
    if not isinstance(v, dict):
        raise _malformed(where, f"expected an object, got {v!r:.40}")
    return v


def _objects(obj: dict, key: str, where: str) -> list[tuple[str, dict]]:
    """The list ``obj[key]`` of JSON objects, each with the prefix naming it in errors."""
    return [
        (f"{where}{key}[{i}].", _object(v, f"{where}{key}[{i}]"))
        for i, v in enumerate(_list(obj, key, where))
    ]


@dataclass
class Manifest:
    """A decoded manifest: the header fields and the authenticated body."""

    seq: int
    created_ms: int
    body: dict  # the signed JSON object as decoded; read it through ``contents``
    suite: int = SUITE_XWING_AES256GCM
    sig_alg: int = SIG_MLDSA65_ED25519

    hash: bytes = b""  # :func:`object_hash` of the object it was decoded from

    @property
    def link(self) -> Link:
        """This manifest as a chain link (seq and object hash)."""
        return Link(self.seq, self.hash)

    def summary(self) -> str:
        """``#seq/hash (prev #seq/hash[, an explicit fork from #seq/hash])``: how messages
        name a manifest and its place in the chain."""
        body = self.contents
        prev = body.prev.short if body.prev else "none"
        fork = f", an explicit fork from {body.fork.short}" if body.fork else ""
        return f"{self.link.short} (prev {prev}{fork})"

    @cached_property
    def contents(self) -> Body:
        """The body read against its schema (:meth:`Body.from_dict`); raises
        :class:`IntegrityError` on first use if it does not fit."""
        return Body.from_dict(self.body)


def object_name(seq: int, rnd: str) -> str:
    return f"{seq:016d}-{rnd}"


def seq_of_name(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() and len(head) == 16 else None


def _kind(seq: int) -> bytes:
    return b"manifest" + struct.pack(">Q", seq)


def encode(
    keys: VaultKeys, seq: int, created_ms: int, body: dict, suite: int = SUITE_XWING_AES256GCM
) -> bytes:
    """Seal and sign a manifest; with an SLH-DSA key, signature algorithm 2 or 3 (its
    parameter set's)."""
    sig_alg = SIG_MLDSA65_ED25519
    if keys.slhdsa_secret is not None and keys.slhdsa_public is not None:
        sig_alg = SLHDSA_PARAMS[keys.slhdsa_param][2]
        body = {**body, "slhdsa_public": keys.slhdsa_public.hex()}
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    sealed = envelope.seal_meta(keys.metadata_key, keys.vault_id, _kind(seq), raw, suite)
    head = HEAD.pack(
        MAGIC, VERSION, suite, sig_alg, keys.vault_id, seq, created_ms, len(sealed),
    )  # fmt: skip
    signed = head + sealed
    sig = keys.sign(SIGN_LABEL + signed)
    if sig_alg != SIG_MLDSA65_ED25519:
        sig += keys.sign_slhdsa(SIGN_LABEL + signed)
    return signed + struct.pack(">H", len(sig)) + sig


def _json(raw: bytes, what: str) -> object:
    try:
        return json.loads(raw)
    except ValueError as e:  # also bytes that are not UTF-8
        raise IntegrityError(f"{what} is not JSON: {e}") from None


def _json_object(raw: bytes) -> dict:
    body = _json(raw, "manifest body")
    if not isinstance(body, dict):
        raise IntegrityError("manifest body is not a JSON object")
    return body


def decode(keys: VaultKeys, blob: bytes, retired_ok: bool = False) -> Manifest:
    """Verify the signature first, then decrypt. Raises IntegrityError on any mismatch.

    The body may be any JSON object; :func:`read` also checks it against :class:`Body`.
    ``retired_ok``: accept a manifest under a suite the vault retired (never to restore or
    build on: only to learn what another branch references, :func:`read_branch`)."""
    if len(blob) < HEAD.size + 2:
        raise IntegrityError("manifest too short")
    magic, ver, suite, sig_alg, vid, seq, created, blen = HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError("not a vaultfs manifest (bad magic)")
    if ver != VERSION:
        raise IntegrityError(
            f"manifest of on-remote format version {ver}; this vaultfs reads version {VERSION} "
            "only (docs/format.md, section 14: version 1 vaults)"
        )
    if sig_alg != SIG_MLDSA65_ED25519 and sig_alg not in SLHDSA_BY_SIG_ALG:
        raise IntegrityError(f"manifest uses unknown signature algorithm {sig_alg}")
    if sig_alg == SIG_MLDSA65_ED25519 and keys.slhdsa_public is not None:
        raise IntegrityError(
            "manifest lacks the SLH-DSA signature this vault requires (downgrade refused)"
        )
    param = SLHDSA_BY_SIG_ALG.get(sig_alg)
    if param is not None and keys.slhdsa_public is not None and param != keys.slhdsa_param:
        raise IntegrityError(
            f"manifest is signed with SLH-DSA-{param.upper()}, this vault's key is "
            f"SLH-DSA-{keys.slhdsa_param.upper()}"
        )
    if vid != keys.vault_id:
        raise IntegrityError(OTHER_VAULT)
    end = HEAD.size + blen
    if len(blob) < end + 2:
        raise IntegrityError("manifest truncated")
    (slen,) = struct.unpack_from(">H", blob, end)
    sig = blob[end + 2 : end + 2 + slen]
    if len(blob) != end + 2 + slen:
        raise IntegrityError("manifest has trailing or missing bytes")
    composite_len = (
        len(sig) if sig_alg == SIG_MLDSA65_ED25519 else MLDSA65_SIG_LEN + ED25519_SIG_LEN
    )
    keys.verify(SIGN_LABEL + blob[:end], sig[:composite_len])
    if not (retired_ok and suite in keys.retired_suites):
        keys.check_suite(suite)
    raw = envelope.open_meta(
        keys.metadata_key, keys.vault_id, _kind(seq), blob[HEAD.size : end], suite
    )
    body = _json_object(raw)
    if param is not None:
        named = _hex(body, "slhdsa_public", "") if "slhdsa_public" in body else b""
        if keys.slhdsa_public is not None and named != keys.slhdsa_public:
            raise IntegrityError("manifest names a different SLH-DSA key than the vault's")
        verify_slhdsa(
            keys.slhdsa_public or named, SIGN_LABEL + blob[:end], sig[composite_len:], param
        )
    return Manifest(seq, created, body, suite, sig_alg, object_hash(blob))


def read(keys: VaultKeys, blob: bytes) -> Manifest:
    """:func:`decode` a manifest taken from a remote and read its body against the schema
    (:attr:`Manifest.contents`), so that a malformed body is refused here like a forged
    manifest, not where a field is first used. Raises :class:`IntegrityError`."""
    m = decode(keys, blob)
    m.contents  # noqa: B018  (a cached property: parsed once, here)
    return m


def read_branch(keys: VaultKeys, blob: bytes) -> Manifest:
    """:func:`read` for a manifest off this index's chain (another branch: a fork), which
    may be under a suite this vault has retired since: the other branch's writer did not
    re-encrypt, and its validly signed manifests still reference objects that no command may
    delete (docs/design.md invariant 8). Such a manifest is only ever looked at to keep what
    it references and to report the fork, never restored from or built on; a manifest of
    this chain under a retired suite stays refused (a rolled-back copy)."""
    m = decode(keys, blob, retired_ok=True)
    m.contents  # noqa: B018  (a cached property: parsed once, here)
    return m
