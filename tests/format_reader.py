"""A from-scratch reader of the vaultfs on-remote format, written from docs/format.md alone.

It imports nothing from vaultfs: only `cryptography`, `blake3`, `zstandard`, `sqlite3` and
the standard library. Even Reed-Solomon decoding is done here, from the matrix the document
gives, so liberasurecode is not needed either. tests/test_format_vectors.py checks the
document's test vectors with it and tests/test_format_stranger.py recovers a real backup with
it, which is how we know the document is enough to get data back without our code. Section
names in the comments ("§ Shard object", …) refer to docs/format.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import blake3
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

#: The on-remote format version this reader implements (docs/format.md, section 3).
FORMAT_VERSION = 2


class FormatError(Exception):
    """Something on a remote does not follow docs/format.md (or was tampered with)."""


# --- § Key hierarchy -------------------------------------------------------------------------


def hkdf(ikm: bytes, info: bytes, length: int, salt: bytes = b"vaultfs/v1") -> bytes:
    """HKDF-SHA256 (RFC 5869) with the full info string given by the caller."""
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def raw_pub(private_key) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class Keys:
    seed: bytes
    vault_id: bytes
    chunk_id_key: bytes
    chunker_seed: int
    metadata_key: bytes
    audit_key: bytes
    mlkem: mlkem.MLKEM768PrivateKey
    x25519: x25519.X25519PrivateKey
    mldsa: mldsa.MLDSA65PrivateKey
    ed25519: ed25519.Ed25519PrivateKey

    @classmethod
    def from_seed(cls, seed: bytes) -> Keys:
        def label(name: str, n: int) -> bytes:
            return hkdf(seed, b"vaultfs/v1/" + name.encode(), n)

        gear = (int.from_bytes(label("chunker", 8), "big") & (2**63 - 1)) | 1
        return cls(
            seed=seed,
            vault_id=label("vault-id", 16),
            chunk_id_key=label("chunk-id", 32),
            chunker_seed=gear,
            metadata_key=label("metadata", 32),
            audit_key=label("audit", 32),
            mlkem=mlkem.MLKEM768PrivateKey.from_seed_bytes(label("kem/mlkem768", 64)),
            x25519=x25519.X25519PrivateKey.from_private_bytes(label("kem/x25519", 32)),
            mldsa=mldsa.MLDSA65PrivateKey.from_seed_bytes(label("sign/mldsa65", 32)),
            ed25519=ed25519.Ed25519PrivateKey.from_private_bytes(label("sign/ed25519", 32)),
        )

    def fingerprint(self) -> str:
        h = blake3.blake3(
            b"vaultfs/v1/fingerprint" + self.vault_id + raw_pub(self.mldsa) + raw_pub(self.ed25519)
        ).hexdigest()[:32]
        return "-".join(h[i : i + 4] for i in range(0, 32, 4))


def hpke_unwrap(keys: Keys, wrapped: bytes, info: bytes) -> bytes:
    """HPKE (RFC 9180) base-mode open; KEM MLKEM768-X25519 (X-Wing, 0x647a), HKDF-SHA256,
    AES-256-GCM; empty AAD; sequence number 0."""
    if len(wrapped) < 1120 + 16:
        raise FormatError("wrapped data key too short")
    ct_m, ct_x, ct = wrapped[:1088], wrapped[1088:1120], wrapped[1120:]
    ss_m = keys.mlkem.decapsulate(ct_m)
    ss_x = keys.x25519.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    shared = hashlib.sha3_256(ss_m + ss_x + ct_x + raw_pub(keys.x25519) + b"\\.//^\\").digest()
    suite_id = b"HPKE" + struct.pack(">HHH", 0x647A, 0x0001, 0x0002)

    def extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return hmac.new(salt or bytes(32), b"HPKE-v1" + suite_id + label + ikm, "sha256").digest()

    def expand(prk: bytes, label: bytes, ctx: bytes, length: int) -> bytes:
        info_ = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + ctx
        out, t, i = b"", b"", 1
        while len(out) < length:
            t = hmac.new(prk, t + info_ + bytes([i]), "sha256").digest()
            out, i = out + t, i + 1
        return out[:length]

    ctx = b"\x00" + extract(b"", b"psk_id_hash", b"") + extract(b"", b"info_hash", info)
    secret = extract(shared, b"secret", b"")
    key = expand(secret, b"key", ctx, 32)
    nonce = expand(secret, b"base_nonce", ctx, 12)
    return AESGCM(key).decrypt(nonce, ct, b"")


def keyring_info(vault_id: bytes, epoch: int) -> bytes:
    return b"vaultfs/v1/keyring" + vault_id + struct.pack(">I", epoch)


# --- § Records: chunk records and metadata blobs ----------------------------------------------


def record_keys(ikm: bytes, vault_id: bytes, info_tail: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, nonce, commitment) of a record: HKDF(ikm, salt=vault id, info, 76 bytes)."""
    okm = hkdf(ikm, b"vaultfs/v1/" + info_tail, 76, salt=vault_id)
    return okm[:32], okm[32:44], okm[44:76]


def associated_data(vault_id: bytes, tail: bytes, suite: int = 1) -> bytes:
    return b"VFS1" + bytes([FORMAT_VERSION]) + struct.pack(">H", suite) + vault_id + tail


def open_record(
    ikm: bytes, vault_id: bytes, info_tail: bytes, ad_tail: bytes, record: bytes, suite: int = 1
) -> tuple[int, bytes, bytes]:
    """Open a record. Returns (compression id, stored body, decompressed plaintext).

    For a chunk: info_tail = b"chunk" ‖ chunk id, ad_tail = chunk id, ikm = epoch data key.
    For a metadata blob: info_tail = b"meta" ‖ kind, ad_tail = kind, ikm = metadata key.
    """
    if len(record) < 16 + 32 + 16 + 1:
        raise FormatError("record too short")
    salt, commit, ct = record[:16], record[16:48], record[48:]
    key, nonce, expect = record_keys(ikm, vault_id, info_tail + salt)
    if not hmac.compare_digest(commit, expect):
        raise FormatError("key commitment mismatch (wrong key or corrupt record)")
    payload = AESGCM(key).decrypt(nonce, ct, associated_data(vault_id, ad_tail, suite))
    comp, body = payload[0], payload[1:]
    if comp == 0:
        return comp, body, body
    if comp == 1:
        return comp, body, zstandard.ZstdDecompressor().decompress(body)
    raise FormatError(f"unknown compression id {comp}")


# --- § Merkle tree ----------------------------------------------------------------------------

BLOCK_SIZE = 65536


def leaf(block: bytes) -> bytes:
    return blake3.blake3(b"\x00" + block).digest()


def node(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(b"\x01" + left + right).digest()


def merkle_root(hashes_: list[bytes]) -> bytes:
    if not hashes_:
        return blake3.blake3(b"\x02vaultfs-empty").digest()
    level = list(hashes_)
    while len(level) > 1:
        nxt = [node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])  # promoted unchanged, never paired with itself
        level = nxt
    return level[0]


def block_leaves(obj: bytes) -> list[bytes]:
    return [leaf(obj[i : i + BLOCK_SIZE]) for i in range(0, max(len(obj), 1), BLOCK_SIZE)]


# --- § Shard object and § liberasurecode fragment --------------------------------------------

SHARD_HEADER = b"VFSH" + bytes([FORMAT_VERSION])  # magic, format version: all it shows
FRAG_HEADER = struct.Struct("<IIIQB32sBBIIII9s")


def whitening_key(audit_key: bytes, name: str, idx: int) -> bytes:
    """§ 7.1: HKDF(audit key, "vaultfs/v1", "vaultfs/v1/whiten" ‖ name ‖ idx (1), 32)."""
    return hkdf(audit_key, b"vaultfs/v1/whiten" + name.encode("ascii") + bytes([idx]), 32)


def keystream_xor(key: bytes, data: bytes, offset: int = 0) -> bytes:
    """data XOR AES-256-CTR keystream bytes [offset, offset + len(data)) (initial counter
    block 0, the 128-bit block counter big-endian)."""
    enc = Cipher(algorithms.AES(key), modes.CTR((offset // 16).to_bytes(16, "big"))).encryptor()
    enc.update(bytes(offset % 16))
    return enc.update(data) + enc.finalize()


@dataclass
class Shard:
    idx: int
    fragment: bytes  # unwhitened

    @property
    def payload(self) -> bytes:
        return self.fragment[80:]


def open_shard(audit_key: bytes, obj: bytes, name: str, idx: int, size: int) -> Shard:
    """A stored shard object (BLAKE3 already checked) as its plain fragment, § 7.1-7.2."""
    if len(obj) < len(SHARD_HEADER) + 80 or obj[: len(SHARD_HEADER)] != SHARD_HEADER:
        raise FormatError(f"not a vaultfs shard object of version {FORMAT_VERSION}")
    frag = keystream_xor(whitening_key(audit_key, name, idx), obj[len(SHARD_HEADER) :])
    f_idx, f_size, _bm, f_orig, _ct, _chk, _mm, _bid, _bv, f_magic, _lv, f_mchk, _pad = (
        FRAG_HEADER.unpack_from(frag)
    )
    if f_magic != 0x0B0C5ECC or f_mchk != zlib.crc32(frag[:59]):
        raise FormatError("bad liberasurecode fragment header (wrong audit key?)")
    if f_idx != idx or f_orig != size or f_size != len(frag) - 80:
        raise FormatError("fragment header disagrees with the index")
    return Shard(idx, frag)


# GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2 (as ISA-L)
_EXP = [0] * 512
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i], _LOG[_x] = _x, _i
    _x <<= 1
    if _x & 0x100:
        _x ^= 0x11D
for _i in range(255, 512):
    _EXP[_i] = _EXP[_i - 255]


def gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    return _EXP[255 - _LOG[a]]


_MUL_TABLES = [bytes(gf_mul(c, x) for x in range(256)) for c in range(256)]


def encode_row(idx: int, k: int) -> list[int]:
    """Row ``idx`` of the systematic encoding matrix (ISA-L gf_gen_rs_matrix): the identity
    for data fragments; for parity fragment p = idx - k, coefficients (2^p)^j, j = 0..k-1."""
    if idx < k:
        return [1 if j == idx else 0 for j in range(k)]
    g = _EXP[idx - k]
    row, c = [], 1
    for _ in range(k):
        row.append(c)
        c = gf_mul(c, g)
    return row


def _scaled(c: int, data: bytes) -> int:
    return int.from_bytes(data.translate(_MUL_TABLES[c]), "little")


def rs_combine(coefs: list[int], payloads: list[bytes]) -> bytes:
    """sum_j coefs[j] * payloads[j] over GF(2^8), byte by byte."""
    acc = 0
    for c, data in zip(coefs, payloads, strict=True):
        if c:
            acc ^= _scaled(c, data)
    return acc.to_bytes(len(payloads[0]), "little")


def rs_data_payloads(by_idx: dict[int, bytes], k: int) -> list[bytes]:
    """The k data payloads from any k fragment payloads (Gauss-Jordan over GF(2^8))."""
    idxs = sorted(by_idx)[:k]
    m = [encode_row(i, k) + [1 if t == r else 0 for t in range(k)] for r, i in enumerate(idxs)]
    for col in range(k):
        piv = next((r for r in range(col, k) if m[r][col]), None)
        if piv is None:
            raise FormatError(f"fragments {idxs} are not independent (not MDS for this set)")
        m[col], m[piv] = m[piv], m[col]
        inv = gf_inv(m[col][col])
        m[col] = [gf_mul(inv, v) for v in m[col]]
        for r in range(k):
            if r != col and m[r][col]:
                f = m[r][col]
                m[r] = [v ^ gf_mul(f, w) for v, w in zip(m[r], m[col], strict=True)]
    avail = [by_idx[i] for i in idxs]
    return [by_idx[j] if j in by_idx else rs_combine(m[j][k:], avail) for j in range(k)]


def decode_segment(shards: list[Shard], k: int, n: int, size: int, ec_alg: int = 1) -> bytes:
    """The segment from >= k distinct shards: a copy when the k data fragments are all here
    (systematic code), otherwise Reed-Solomon decoding with the matrix of § Erasure code."""
    by_idx = {s.idx: s.payload for s in shards if s.idx < n}
    if len(by_idx) < k:
        raise FormatError(f"only {len(by_idx)} shards, need {k}")
    if ec_alg == 3:  # § 7.5: one whole copy, k = n = 1: its payload is the segment
        if (k, n) != (1, 1):
            raise FormatError(f"erasure algorithm 3 codes 1-of-1, not {k}-of-{n}")
        return by_idx[0][:size]
    if ec_alg != 1:
        raise FormatError(f"erasure algorithm {ec_alg} is not read here (only 1, § 7.3; 3, § 7.5)")
    return b"".join(rs_data_payloads(by_idx, k))[:size]


# --- § Manifest -------------------------------------------------------------------------------

MANIFEST_HEAD = struct.Struct(">4sBHB16sQQI")


@dataclass
class Manifest:
    seq: int
    created_ms: int
    body: dict
    hash: bytes  # § 10.3: BLAKE3 of the whole object, how the next manifest names this one


#: signature algorithm id -> total signature length (§ Algorithm ids)
SIG_LENGTHS = {1: 3309 + 64, 2: 3309 + 64 + 7856, 3: 3309 + 64 + 17088}


def open_manifest(keys: Keys, blob: bytes) -> Manifest:
    """Verify the signatures over the signed bytes, then decrypt the body."""
    if len(blob) < 46:
        raise FormatError("manifest too short")
    magic, ver, suite, sig_alg, vid, seq, created, blen = MANIFEST_HEAD.unpack_from(blob)
    if magic != b"VFSM" or sig_alg not in SIG_LENGTHS or vid != keys.vault_id:
        raise FormatError("not a manifest of this vault")
    if ver != FORMAT_VERSION:
        raise FormatError(f"manifest of format version {ver}: this reader reads {FORMAT_VERSION}")
    if suite != 1:
        raise FormatError(f"suite {suite} is not described by this reader")
    end = 44 + blen
    (slen,) = struct.unpack_from(">H", blob, end)
    if slen != SIG_LENGTHS[sig_alg] or len(blob) != end + 2 + slen:
        raise FormatError("manifest length fields are inconsistent")
    sig = blob[end + 2 :]
    signed = b"vaultfs/v1/manifest" + blob[:end]
    try:
        keys.mldsa.public_key().verify(sig[:3309], signed)
        keys.ed25519.public_key().verify(sig[3309 : 3309 + 64], signed)
    except InvalidSignature:
        raise FormatError("manifest signature does not verify") from None
    kind = b"manifest" + struct.pack(">Q", seq)
    _c, _b, raw = open_record(keys.metadata_key, vid, b"meta" + kind, kind, blob[44:end], suite)
    body = json.loads(raw)
    prev = body.get("prev", "missing")  # § 10.2: required, an object or null
    if prev is not None and not (
        isinstance(prev, dict) and isinstance(prev.get("seq"), int) and len(prev["hash"]) == 64
    ):
        raise FormatError("manifest body lacks a valid prev")
    if sig_alg in (2, 3):  # SLH-DSA-SHA2-128s / -128f over the same message, key in the body
        from pqcrypto.sign import slh_dsa_sha2_128f, slh_dsa_sha2_128s

        slh = slh_dsa_sha2_128s if sig_alg == 2 else slh_dsa_sha2_128f
        try:  # returns None, raises on a bad signature
            slh.verify(bytes.fromhex(body["slhdsa_public"]), signed, sig[3373:])
        except Exception:
            raise FormatError("manifest SLH-DSA signature does not verify") from None
    return Manifest(seq, created, body, blake3.blake3(blob).digest())


# --- § Recovering without vaultfs -------------------------------------------------------------


class Remotes:
    """Local copies (or mounts) of any set of remotes: each a directory holding data/, meta/
    and manifests/. A shard is looked up by name in every remote."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def manifests(self) -> list[tuple[int, Path]]:
        out = []
        for d in self.dirs:
            for p in (d / "manifests").glob("*"):
                head = p.name.split("-", 1)[0]
                if len(head) == 16 and head.isdigit():
                    out.append((int(head), p))
        return sorted(out, key=lambda t: -t[0])

    def find(self, sub: str, name: str) -> bytes | None:
        for d in self.dirs:
            p = d / sub / name
            if p.exists():
                return p.read_bytes()
        return None


def choose_manifest(keys: Keys, remotes: Remotes, want: str | None = None) -> Manifest:
    """§ 10.3: the highest validly signed manifest whose name agrees with its signed sequence,
    or with ``want`` ("SEQ/HASH-PREFIX") the valid one of that sequence and hash prefix (one
    branch of a fork)."""
    seq_s, _sep, prefix = (want or "").partition("/")
    for seq, path in remotes.manifests():
        if want is not None and seq != int(seq_s):
            continue
        try:
            m = open_manifest(keys, path.read_bytes())
        except (FormatError, ValueError):
            continue
        if m.seq == seq and m.hash.hex().startswith(prefix):
            return m
    raise FormatError("no validly signed manifest on these remotes")


def fetch_segment(
    keys: Keys,
    remotes: Remotes,
    sub: str,
    shards: list[tuple[int, str, bytes]],
    k: int,
    n: int,
    size: int,
    ec_alg: int,
) -> bytes:
    """Fetch shards listed as (idx, name, BLAKE3 hash); keep those whose hash matches;
    unwhiten them and decode."""
    good = []
    for idx, name, h in sorted(shards):
        obj = remotes.find(sub, name)
        if obj is None or blake3.blake3(obj).digest() != h:
            continue  # missing or corrupt: treated alike, decoded around
        good.append(open_shard(keys.audit_key, obj, name, idx, size))
    if len(good) < k:
        raise FormatError(f"a {sub} segment has only {len(good)} intact shards, need {k}")
    return decode_segment(good, k, n, size, ec_alg)


def index_object(
    keys: Keys, segs: dict[bytes, bytes], oid: bytes, uid: bytes, off: int, length: int
) -> bytes:
    """§ The index: open index object ``oid`` at (segment uid, offset, length) and check that
    it hashes to its id. ``segs`` maps uid to the decoded segment's first ``used`` bytes."""
    seg = segs.get(uid)
    if seg is None or off + length > len(seg):
        raise FormatError(f"index object {oid.hex()} lies outside the segments the manifest names")
    kind = b"index-block" + oid
    _c, _b, data = open_record(
        keys.metadata_key, keys.vault_id, b"meta" + kind, kind, seg[off : off + length]
    )
    if blake3.blake3(b"vaultfs/v1/index-object" + data, key=keys.metadata_key).digest() != oid:
        raise FormatError(f"index object {oid.hex()} does not hash to its id")
    return data


def _fetch_meta_segments(
    keys: Keys, remotes: Remotes, listed: list[dict], segment_size: int, segs: dict[bytes, bytes]
) -> None:
    """Decode each meta segment described in ``listed`` (10.2 ``index.segments`` entries)
    into ``segs`` (uid -> its first ``used`` bytes); a uid named twice is refused."""
    for seg in listed:
        uid = bytes.fromhex(seg["uid"])
        if uid in segs:
            raise FormatError(f"meta segment {seg['uid']} is named twice")
        shards = [(s["idx"], s["name"], bytes.fromhex(s["hash"])) for s in seg["shards"]]
        size = seg.get("size", segment_size)  # per-segment size, if the writer gave one
        alg = seg.get("ec_alg", 1)  # the earliest manifests name none: they used 1
        data = fetch_segment(keys, remotes, "meta", shards, seg["k"], seg["n"], size, alg)
        segs[uid] = data[: seg["used"]]


def _page(keys: Keys, segs: dict[bytes, bytes], page: dict) -> bytes:
    """The index object a ``{"id", "uid", "offset", "length"}`` object of the manifest names."""
    return index_object(
        keys, segs, bytes.fromhex(page["id"]), bytes.fromhex(page["uid"]),
        page["offset"], page["length"],
    )  # fmt: skip


def open_index(keys: Keys, remotes: Remotes, m: Manifest, dest: Path) -> sqlite3.Connection:
    """§ Recovering, step 4: decode the meta segments, read the block map, write the blocks.
    A two-level index (9.2) first: the second-level pages, from the segments the manifest
    names, give the map pages and the other meta segments."""
    body = m.body
    index = body["index"]
    segs: dict[bytes, bytes] = {}
    _fetch_meta_segments(keys, remotes, index["segments"], body["segment_size"], segs)
    length, block = index["length"], index["block_size"]
    levels = index.get("levels", 1)
    if levels == 1:
        map_pages = index["map"]
    elif levels == 2:
        map_pages = []
        for page in index["map2"]:
            raw = _page(keys, segs, page)
            if not raw or len(raw) % 56:
                raise FormatError("a second-level map page is not whole 56-byte entries")
            for i in range(0, len(raw), 56):
                e = raw[i : i + 56]
                off, rlen = struct.unpack(">II", e[48:56])
                map_pages.append(
                    {"id": e[:32].hex(), "uid": e[32:48].hex(), "offset": off, "length": rlen}
                )
        blocks = -(-length // block)
        if len(map_pages) != -(-blocks // 128):
            raise FormatError("the second-level map does not list one entry per map page")
        listed = []
        for page in index["segment_pages"]:
            part = json.loads(_page(keys, segs, page))
            if not isinstance(part, list) or not 1 <= len(part) <= 128:
                raise FormatError("a segment page is not a list of 1 to 128 segments")
            listed += part
        _fetch_meta_segments(keys, remotes, listed, body["segment_size"], segs)
    else:
        raise FormatError(f"an index of {levels} levels is not read here")
    length, block = index["length"], index["block_size"]
    entries = []
    for page in map_pages:
        raw = _page(keys, segs, page)
        if not raw or len(raw) % 56:
            raise FormatError("an index map page is not whole 56-byte entries")
        entries += [raw[i : i + 56] for i in range(0, len(raw), 56)]
    if len(entries) != -(-length // block):
        raise FormatError("the index map does not list one entry per block")
    out = bytearray()
    for e in entries:
        oid, uid, off, rlen = e[:32], e[32:48], *struct.unpack(">II", e[48:56])
        data = index_object(keys, segs, oid, uid, off, rlen)
        if len(data) != min(block, length - len(out)):
            raise FormatError("an index block is not block_size bytes (the last: the rest)")
        out += data
    dest.write_bytes(bytes(out))
    return sqlite3.connect(dest)


def check_vault_root(db: sqlite3.Connection, m: Manifest) -> None:
    shard_roots: dict[int, list[bytes]] = {}
    for seg, root in db.execute("SELECT segment, root FROM shards ORDER BY segment, idx"):
        shard_roots.setdefault(seg, []).append(root)
    seg_roots = []
    for sid, root in db.execute("SELECT id, root FROM segments WHERE kind='data' ORDER BY id"):
        if merkle_root(shard_roots.get(sid, [])) != root:
            raise FormatError(f"segment {sid}: root does not match its shards")
        seg_roots.append(root)
    if merkle_root(seg_roots).hex() != m.body["vault_root"]:
        raise FormatError("index does not match the signed vault root")


def canonical_path(path: bytes) -> str | bytes:
    """format.md 9.1: TEXT when the bytes are UTF-8, else a BLOB of the bytes."""
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return path


def recover_file(
    seed: bytes, remote_dirs: list[Path], path: str | bytes, manifest: str | None = None
) -> bytes:
    """The bytes of ``path`` in the newest snapshot, from the seed and any k remotes (of the
    branch whose manifest ``manifest`` names as "SEQ/HASH-PREFIX", § 10.3)."""
    if isinstance(path, str):
        path = path.encode("utf-8")
    keys = Keys.from_seed(seed)
    remotes = Remotes(remote_dirs)
    m = choose_manifest(keys, remotes, manifest)
    data_keys: dict[int, tuple[bytes, int]] = {}  # epoch -> (data key, suite id)
    for e in m.body["keyring"]:
        if e["suite"] != 1:
            raise FormatError(f"epoch {e['epoch']}: suite {e['suite']} is not read here")
        info = keyring_info(keys.vault_id, e["epoch"])
        data_keys[e["epoch"]] = (hpke_unwrap(keys, bytes.fromhex(e["wrapped"]), info), e["suite"])
    with tempfile.TemporaryDirectory() as tmp:
        db = open_index(keys, remotes, m, Path(tmp) / "index.db")
        try:
            check_vault_root(db, m)
            (snap,) = db.execute("SELECT id FROM snapshots ORDER BY id DESC LIMIT 1").fetchone()
            content, size = db.execute(
                "SELECT content, size FROM entries WHERE snapshot=? AND path=? AND type='f'",
                (snap, canonical_path(path)),
            ).fetchone()
            (count,) = db.execute("SELECT chunks FROM contents WHERE id=?", (content,)).fetchone()
            rows = db.execute(
                "SELECT c.cid, c.segment, c.offset, c.length, c.plain FROM content_chunks x"
                " JOIN chunks c ON c.id = x.chunk WHERE x.content=? ORDER BY x.seq",
                (content,),
            ).fetchall()
            if len(rows) != count:
                raise FormatError("the content's chunk list is incomplete")
            segments: dict[int, tuple[bytes, int]] = {}
            out = bytearray()
            for cid, seg_id, off, ln, plain in rows:
                if seg_id not in segments:
                    size_, k, n, epoch, alg = db.execute(
                        "SELECT size, k, n, epoch, ec_alg FROM segments WHERE id=?", (seg_id,)
                    ).fetchone()
                    shards = db.execute(
                        "SELECT idx, name, hash FROM shards WHERE segment=?", (seg_id,)
                    ).fetchall()
                    seg_bytes = fetch_segment(keys, remotes, "data", shards, k, n, size_, alg)
                    segments[seg_id] = (seg_bytes, epoch)
                seg, epoch = segments[seg_id]
                dkey, suite = data_keys[epoch]
                _c, _b, chunk = open_record(
                    dkey, keys.vault_id, b"chunk" + cid, cid, seg[off : off + ln], suite
                )
                if (
                    len(chunk) != plain
                    or blake3.blake3(chunk, key=keys.chunk_id_key).digest() != cid
                ):
                    raise FormatError("chunk does not match its id")
                out += chunk
        finally:
            db.close()
    if len(out) != size:
        raise FormatError("file size differs from the index")
    return bytes(out)
