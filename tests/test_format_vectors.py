"""The test vectors of docs/format.md (tests/vectors/format_v2.json), checked twice.

Each vector is recomputed (1) through the vaultfs library and (2) from raw primitives
(`cryptography`, `blake3`, `zstandard`, `zlib`) by tests/format_reader.py, which follows only
the steps the document gives. The second half is the point: if the document were missing a
label, a byte order or a field, the independent computation would disagree with the library.

Values produced by randomised algorithms (the HPKE-wrapped data key, the ML-DSA signature of
the manifest) cannot be recomputed; they are verified instead. Bytes downstream of a zstd
frame or of a liberasurecode header depend on the compressor's version and level or on the
library build, which the format leaves free: the library's output is compared byte for byte
only when it produces the same frame or build, and is always checked by decoding.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import struct
import zlib
from pathlib import Path

import blake3
import format_reader as fr
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pyeclib.ec_iface import LIBERASURECODE_VERSION, ECDriver
from pyfastcdc import FastCDC

from vaultfs import envelope, erasure, indexblocks, manifest, merkle, segment
from vaultfs.chunker import Chunker, content_ref
from vaultfs.errors import IntegrityError
from vaultfs.keys import VaultKeys, read_keyfile

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "tests" / "vectors" / "format_v2.json").read_text())
FORMAT_MD = (ROOT / "docs" / "format.md").read_text()
SEED = bytes.fromhex(VECTORS["master_seed"])
SAME_LIBEC = LIBERASURECODE_VERSION == VECTORS["generated_with"]["liberasurecode"]


# --- thin adapters over the from-scratch reader (tests/format_reader.py) --------------------

KEYS = fr.Keys.from_seed(SEED)


def doc_label(label: str, length: int) -> bytes:
    return fr.hkdf(SEED, b"vaultfs/v1/" + label.encode(), length)


def doc_open(ikm: bytes, vault_id: bytes, info_tail: bytes, ad_tail: bytes, record: bytes):
    return fr.open_record(ikm, vault_id, info_tail, ad_tail, record)


def doc_parse_fragment_header(frag: bytes) -> dict:
    (idx, size, bmeta, orig, ctype, _chk, _mism, bid, _bver, magic, _lv, mchk, _pad) = (
        fr.FRAG_HEADER.unpack_from(frag)
    )
    return {
        "idx": idx,
        "size": size,
        "backend_metadata_size": bmeta,
        "orig_data_size": orig,
        "chksum_type": ctype,
        "backend_id": bid,
        "magic": magic,
        "metadata_chksum_ok": mchk == zlib.crc32(frag[:59]),
    }


# --- the key hierarchy ----------------------------------------------------------------------


def test_hkdf_labels_match_library_and_primitives():
    keys = VaultKeys.from_seed(SEED)
    out = {o["label"]: bytes.fromhex(o["okm"]) for o in VECTORS["hkdf"]["outputs"]}
    for o in VECTORS["hkdf"]["outputs"]:
        assert doc_label(o["label"], o["length"]) == out[o["label"]], o["label"]
    d = VECTORS["derived"]
    assert keys.vault_id.hex() == d["vault_id"] == out["vault-id"].hex()
    assert keys.chunk_id_key.hex() == d["chunk_id_key"] == out["chunk-id"].hex()
    assert keys.metadata_key.hex() == d["metadata_key"] == out["metadata"].hex()
    assert keys.audit_key.hex() == d["audit_key"] == out["audit"].hex()
    gear = (int.from_bytes(out["chunker"], "big") & (2**63 - 1)) | 1
    assert keys.chunker_seed == d["chunker_seed"] == gear


def test_public_keys_and_fingerprint():
    keys = VaultKeys.from_seed(SEED)
    pk = VECTORS["public_keys"]
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(doc_label("kem/mlkem768", 64))
    xk = x25519.X25519PrivateKey.from_private_bytes(doc_label("kem/x25519", 32))
    assert len(fr.raw_pub(mk)) == pk["mlkem768_len"]
    assert blake3.blake3(fr.raw_pub(mk)).hexdigest() == pk["mlkem768_blake3"]
    assert fr.raw_pub(xk).hex() == pk["x25519"]
    sk_m, sk_e = KEYS.mldsa, KEYS.ed25519
    assert len(fr.raw_pub(sk_m)) == pk["mldsa65_len"]
    assert blake3.blake3(fr.raw_pub(sk_m)).hexdigest() == pk["mldsa65_blake3"]
    assert fr.raw_pub(sk_e).hex() == pk["ed25519"]
    lib = keys.public_bytes()
    assert lib["mldsa65"] == fr.raw_pub(sk_m) and lib["ed25519"] == fr.raw_pub(sk_e)
    h = blake3.blake3(
        b"vaultfs/v1/fingerprint" + keys.vault_id + fr.raw_pub(sk_m) + fr.raw_pub(sk_e)
    ).hexdigest()[:32]
    doc_fp = "-".join(h[i : i + 4] for i in range(0, 32, 4))
    assert keys.fingerprint() == VECTORS["fingerprint"] == doc_fp == KEYS.fingerprint()


def test_keyring_wrapped_data_key_unwraps_both_ways():
    keys = VaultKeys.from_seed(SEED)
    kr = VECTORS["keyring"]
    wrapped = bytes.fromhex(kr["wrapped"])
    info = b"vaultfs/v1/keyring" + keys.vault_id + struct.pack(">I", kr["epoch"])
    assert info.hex() == kr["info"]
    assert len(wrapped) == 1120 + 32 + 16
    assert fr.hpke_unwrap(KEYS, wrapped, info).hex() == kr["data_key"]
    assert keys.unwrap_data_key(kr["epoch"], wrapped).hex() == kr["data_key"]
    # and the library's own (randomised) wrapping is readable by the document's procedure
    fresh = keys.wrap_data_key(5, bytes(32))
    assert fr.hpke_unwrap(
        KEYS, fresh, b"vaultfs/v1/keyring" + keys.vault_id + b"\0\0\0\5"
    ) == bytes(32)


def test_keyfile_opens_with_scrypt_and_aes_gcm(tmp_path):
    kf = VECTORS["keyfile"]
    doc = kf["document"]
    kek = Scrypt(
        salt=base64.b64decode(doc["salt"]),
        length=32,
        n=doc["kdf"]["n"],
        r=doc["kdf"]["r"],
        p=doc["kdf"]["p"],
    ).derive(kf["passphrase"].encode())
    seed = AESGCM(kek).decrypt(
        base64.b64decode(doc["nonce"]),
        base64.b64decode(doc["sealed_seed"]),
        b"vaultfs/v1/keyfile" + bytes.fromhex(doc["vault_id"]),
    )
    assert seed == SEED
    p = tmp_path / "key.json"
    p.write_text(json.dumps(doc))
    assert read_keyfile(p, kf["passphrase"]).seed == SEED


# --- chunking and records -------------------------------------------------------------------


def test_chunker_cut_points():
    c = VECTORS["chunker"]
    keys = VaultKeys.from_seed(SEED)
    data = blake3.blake3(b"vaultfs/v1/test/chunker").digest(length=256 * 1024)
    lib = [len(x) for x in Chunker(keys.chunker_seed, keys.chunk_id_key).chunks(io.BytesIO(data))]
    raw = [
        len(x.data)
        for x in FastCDC(c["avg"], min_size=c["min"], max_size=c["max"], seed=c["seed"]).cut_buf(
            data
        )
    ]
    assert lib == raw == c["lengths"]
    assert sum(lib) == len(data)
    assert c["lengths"] != c["lengths_unkeyed"], "the key must move the cut points"


@pytest.mark.parametrize("vec", VECTORS["content_ref"], ids=lambda v: str(len(v["chunk_ids"])))
def test_content_ref(vec):
    """format.md 9: keyed BLAKE3 over the label and the chunk ids in order; order matters."""
    keys = VaultKeys.from_seed(SEED)
    cids = [bytes.fromhex(c) for c in vec["chunk_ids"]]
    doc = blake3.blake3(b"vaultfs/content-ref" + b"".join(cids), key=keys.chunk_id_key)
    assert doc.hexdigest() == vec["ref"] == content_ref(keys.chunk_id_key, cids).hex()


@pytest.mark.parametrize("rec", VECTORS["chunk_records"], ids=lambda r: r["name"])
def test_chunk_record(rec):
    keys = VaultKeys.from_seed(SEED)
    vid = keys.vault_id
    data = bytes.fromhex(rec["plaintext"])
    cid = bytes.fromhex(rec["chunk_id"])
    record = bytes.fromhex(rec["record"])
    salt = bytes.fromhex(rec["salt"])
    dk = bytes.fromhex(rec["data_key"])
    # chunk id: keyed BLAKE3
    assert blake3.blake3(data, key=keys.chunk_id_key).digest() == cid
    assert Chunker(keys.chunker_seed, keys.chunk_id_key).chunk_id(data) == cid
    # key schedule
    info = b"vaultfs/v1/chunk" + cid + salt
    assert info.hex() == rec["hkdf_info"]
    key, nonce, commit = fr.record_keys(dk, vid, b"chunk" + cid + salt)
    assert (key.hex(), nonce.hex(), commit.hex()) == (rec["key"], rec["nonce"], rec["commitment"])
    assert fr.associated_data(vid, cid).hex() == rec["associated_data"]
    # open from primitives, then rebuild the record from primitives
    comp, body, plain = doc_open(dk, vid, b"chunk" + cid, cid, record)
    assert plain == data and comp == rec["compression_id"]
    rebuilt = (
        salt
        + commit
        + AESGCM(key).encrypt(nonce, bytes([comp]) + body, fr.associated_data(vid, cid))
    )
    assert rebuilt == record
    assert len(record) == len(body) + 1 + 16 + 32 + 16
    # library
    assert envelope.open_chunk(dk, vid, cid, record) == data
    if envelope.compress(data) == bytes([comp]) + body:  # same zstd frame (version, level)
        assert envelope.seal_chunk(dk, vid, cid, data, salt=salt) == record
    else:  # another compressor setting: still a valid record of the same chunk
        assert envelope.open_chunk(dk, vid, cid, envelope.seal_chunk(dk, vid, cid, data)) == data
    # a wrong data key fails on the commitment, before AES-GCM runs
    with pytest.raises(fr.FormatError, match="commitment"):
        doc_open(bytes(32), vid, b"chunk" + cid, cid, record)


def test_index_objects():
    """Section 9: an index object's id is keyed BLAKE3 under the metadata key with the id
    prefix; its record is a metadata record of kind "index-block" ‖ id; a map page lists
    (id, segment uid, offset, length) of each block."""
    keys = VaultKeys.from_seed(SEED)
    vid, mk = keys.vault_id, keys.metadata_key
    iv = VECTORS["index_objects"]
    assert bytes.fromhex(iv["id_prefix"]) == b"vaultfs/v1/index-object"
    assert iv["block_size"] == indexblocks.BLOCK_SIZE
    plain = bytes.fromhex(iv["file"])
    page = bytes.fromhex(iv["map_page"]["plaintext"])
    for m, content in ((iv["block"], plain), (iv["map_page"], page)):
        oid = bytes.fromhex(m["id"])
        assert blake3.blake3(b"vaultfs/v1/index-object" + content, key=mk).digest() == oid
        assert indexblocks.object_id(mk, content) == oid
        kind = bytes.fromhex(m["kind"])
        assert kind == b"index-block" + oid
        blob, salt = bytes.fromhex(m["record"]), bytes.fromhex(m["salt"])
        assert (b"vaultfs/v1/meta" + kind + salt).hex() == m["hkdf_info"]
        key, nonce, commit = fr.record_keys(mk, vid, b"meta" + kind + salt)
        assert (key.hex(), nonce.hex(), commit.hex()) == (m["key"], m["nonce"], m["commitment"])
        assert fr.associated_data(vid, kind).hex() == m["associated_data"]
        comp, body, opened = doc_open(mk, vid, b"meta" + kind, kind, blob)
        assert opened == content and comp == m["compression_id"]
        assert indexblocks.open_record(mk, vid, oid, blob, 1) == content
        if envelope.compress(content) == bytes([comp]) + body:  # same zstd frame
            assert envelope.seal_meta(mk, vid, kind, content, salt=salt) == blob
    # the one map entry: the block's id, the meta segment's uid, offset 0, the record length
    assert len(page) == 56
    bid, uid, off, length = struct.unpack(">32s16sII", page)
    assert (bid.hex(), uid.hex(), off) == (iv["block"]["id"], VECTORS["meta_segment"]["uid"], 0)
    assert length == len(bytes.fromhex(iv["block"]["record"]))


# --- Merkle ---------------------------------------------------------------------------------


def test_merkle_rules():
    mv = VECTORS["merkle"]
    assert mv["block_size"] == merkle.BLOCK_SIZE == 65536
    for case in mv["cases"]:
        blocks = [bytes.fromhex(b) for b in case["blocks"]]
        leaves = [fr.leaf(b) for b in blocks]
        assert [h.hex() for h in leaves] == case["leaves"]
        assert [merkle.leaf_hash(b).hex() for b in blocks] == case["leaves"]
        assert fr.merkle_root(leaves).hex() == merkle.root(leaves).hex() == case["root"]
    # three leaves: node(node(a, b), c) — c is promoted, not paired with itself
    a, b, c = (fr.leaf(x) for x in (b"a", b"b", b"c"))
    ab = blake3.blake3(b"\x01" + a + b).digest()
    assert mv["cases"][3]["root"] == blake3.blake3(b"\x01" + ab + c).digest().hex()
    assert mv["cases"][3]["root"] != fr.merkle_root([a, b, c, c]).hex()
    five = [fr.leaf(x) for x in (b"a", b"b", b"c", b"d", b"e")]
    path = [(p["sibling_is_left"], bytes.fromhex(p["hash"])) for p in mv["proof_of_index_2_of_5"]]
    assert path == merkle.proof(five, 2)
    assert merkle.verify_proof(five[2], path, bytes.fromhex(mv["cases"][4]["root"]))
    big = blake3.blake3(b"vaultfs/v1/test/merkle").digest(length=150_000)
    assert [h.hex() for h in fr.block_leaves(big)] == mv["big"]["leaves"]
    assert [h.hex() for h in merkle.block_hashes(big)] == mv["big"]["leaves"]
    assert len(mv["big"]["leaves"]) == 3
    assert fr.merkle_root(fr.block_leaves(big)).hex() == mv["big"]["root"]


# --- segments and shard objects -------------------------------------------------------------


def plain_fragments(sv: dict) -> list[bytes]:
    """The vector's shard objects unwhitened by the document's steps (format.md 7.1)."""
    audit_key = KEYS.audit_key
    return [
        fr.keystream_xor(
            fr.whitening_key(audit_key, s["name"], s["idx"]),
            bytes.fromhex(s["object"])[len(fr.SHARD_HEADER) :],
        )
        for s in sv["shards"]
    ]


def test_whitening_keystream():
    """The per-object key and its AES-256-CTR keystream, from offset 0 and from an unaligned
    offset (a range read), by the document's steps and through the library."""
    wv = VECTORS["whitening"]
    audit_key = bytes.fromhex(wv["audit_key"])
    assert audit_key == KEYS.audit_key == VaultKeys.from_seed(SEED).audit_key
    name, idx = wv["name"], wv["idx"]
    assert (b"vaultfs/v1/whiten" + name.encode() + bytes([idx])).hex() == wv["hkdf_info"]
    key = fr.whitening_key(audit_key, name, idx)
    assert key.hex() == wv["key"] == segment.whitening_key(audit_key, name, idx).hex()
    stream = fr.keystream_xor(key, bytes(1032))
    assert stream[:64].hex() == wv["keystream_0"]
    assert stream[1000:1032].hex() == wv["keystream_1000"]
    assert fr.keystream_xor(key, bytes(32), 1000).hex() == wv["keystream_1000"]
    for off in (0, 1, 15, 16, 17, 999, 1000):
        assert segment.whiten(audit_key, name, idx, bytes(32), off) == stream[off : off + 32]
    # the object it names (data shard 1): its stored bytes are the fragment XOR this stream
    (sh,) = [s for s in VECTORS["data_segment"]["shards"] if s["name"] == name]
    obj = bytes.fromhex(sh["object"])
    assert (
        bytes(a ^ b for a, b in zip(obj[5:85], stream[:80], strict=True)).hex()
        == (sh["fragment_header"])
    )


@pytest.mark.parametrize("which", ["data_segment", "meta_segment"])
def test_shard_objects(which):
    sv = VECTORS[which]
    k, n, size = sv["k"], sv["n"], sv["segment_size"]
    assert sv["ec_alg"] == 1
    objects = [bytes.fromhex(s["object"]) for s in sv["shards"]]
    frags = plain_fragments(sv)
    roots = []
    for s, obj, frag in zip(sv["shards"], objects, frags, strict=True):
        # the plain header is the magic and the version byte, nothing else
        assert obj[:5] == b"VFSH\x02" == fr.SHARD_HEADER and obj[:5].hex() == s["header"]
        assert len(obj) == 5 + len(frag) == s["object_len"]
        assert fr.whitening_key(KEYS.audit_key, s["name"], s["idx"]).hex() == s["whitening_key"]
        assert frag[:80].hex() == s["fragment_header"]
        fh = doc_parse_fragment_header(frag)
        assert fh["magic"] == 0x0B0C5ECC and fh["metadata_chksum_ok"]
        assert (fh["idx"], fh["orig_data_size"], fh["backend_id"]) == (s["idx"], size, 4)
        assert fh["chksum_type"] == 1 and fh["backend_metadata_size"] == 0
        assert fh["size"] == len(frag) - 80 == -(-size // k)
        assert blake3.blake3(frag[80:]).hexdigest() == s["payload_blake3"]
        # hash and Merkle tree are over the stored (whitened) bytes
        assert blake3.blake3(obj).hexdigest() == s["object_blake3"]
        roots.append(fr.merkle_root(fr.block_leaves(obj)))
        assert roots[-1].hex() == s["object_merkle_root"]
        assert fr.open_shard(KEYS.audit_key, obj, s["name"], s["idx"], size).fragment == frag
        # the stored payload is not the plain one: whitening covers every fragment byte
        assert obj[85:] != frag[80:]
    assert fr.merkle_root(roots).hex() == sv["segment_root"]
    # systematic: the data fragments' payloads, concatenated, are the segment
    segment_bytes = b"".join(f[80:] for f in frags[:k])[:size]
    assert blake3.blake3(segment_bytes).hexdigest() == sv["segment_blake3"]
    assert segment_bytes[sv["used"] :] == bytes(size - sv["used"])  # zero padding
    # any k of the n plain fragments decode through liberasurecode directly
    drv = ECDriver(k=k, m=n - k, ec_type="isa_l_rs_vand")
    for subset in itertools.combinations(range(n), k):
        assert drv.decode([frags[i] for i in subset])[:size] == segment_bytes
    # the library builds the same objects under the same names (the liberasurecode header
    # carries its version)
    for s, frag in zip(sv["shards"], frags, strict=True):
        sh = segment.stored_shard(s["idx"], s["name"], frag, KEYS.audit_key)
        assert sh.body.hex() == s["object"]
        assert (
            segment.open_fragment(bytes.fromhex(s["object"]), KEYS.audit_key, s["name"], s["idx"])
            == frag
        )
    built = segment.build_shards(segment_bytes, k, n, KEYS.audit_key)
    for sh, s in zip(built, sv["shards"], strict=True):
        plain = segment.open_fragment(sh.body, KEYS.audit_key, sh.name, sh.idx)
        assert blake3.blake3(plain[80:]).hexdigest() == s["payload_blake3"]
        if SAME_LIBEC:
            assert plain[:80].hex() == s["fragment_header"]
    some = {i: frags[i] for i in (1, 3, 4)}
    assert segment.decode_segment(some, k, n, size, 1) == segment_bytes
    # the document's matrix: parity payloads are GF(2^8) combinations of the data payloads,
    # and any k fragments give the segment back without liberasurecode
    payloads = [f[80:] for f in frags]
    for p in range(k, n):
        assert fr.rs_combine(fr.encode_row(p, k), payloads[:k]) == payloads[p]
    parsed = [
        fr.open_shard(KEYS.audit_key, o, s["name"], s["idx"], size)
        for s, o in zip(sv["shards"], objects, strict=True)
    ]
    for subset in itertools.combinations(parsed, k):
        assert fr.decode_segment(list(subset), k, n, size) == segment_bytes


def test_data_segment_holds_the_records():
    sv = VECTORS["data_segment"]
    seg = b"".join(f[80:] for f in plain_fragments(sv)[: sv["k"]])
    recs = [bytes.fromhex(r["record"]) for r in VECTORS["chunk_records"]]
    assert seg[: sv["used"]] == b"".join(recs)
    meta = VECTORS["meta_segment"]
    mseg = b"".join(f[80:] for f in plain_fragments(meta)[: meta["k"]])
    iv = VECTORS["index_objects"]
    assert mseg[: meta["used"]].hex() == iv["block"]["record"] + iv["map_page"]["record"]
    assert VECTORS["vault_root"] == fr.merkle_root([bytes.fromhex(sv["segment_root"])]).hex()


def test_two_level_index():
    """Section 9.2: the manifest vector's index described in two levels. Both second-level
    pages are index objects (same id rule and record kind); the second-level map page lists
    the map page as a map entry, the segment page is the canonical JSON list of descriptors;
    the library's :func:`manifest.index_description` and the stranger's reader both get the
    one-level description and the index file back from it."""
    keys = VaultKeys.from_seed(SEED)
    vid, mk = keys.vault_id, keys.metadata_key
    tv = VECTORS["index_two_levels"]
    one = VECTORS["manifest"]["body"]["index"]
    plains = {}
    for name in ("map2_page", "segment_page"):
        m = tv[name]
        plain, oid = bytes.fromhex(m["plaintext"]), bytes.fromhex(m["id"])
        assert blake3.blake3(b"vaultfs/v1/index-object" + plain, key=mk).digest() == oid
        kind = bytes.fromhex(m["kind"])
        assert kind == b"index-block" + oid
        _comp, _body, opened = doc_open(mk, vid, b"meta" + kind, kind, bytes.fromhex(m["record"]))
        assert (
            opened == plain == indexblocks.open_record(mk, vid, oid, bytes.fromhex(m["record"]), 1)
        )
        plains[name] = plain
    (entry,) = one["map"]
    assert plains["map2_page"] == struct.pack(
        ">32s16sII", bytes.fromhex(entry["id"]), bytes.fromhex(entry["uid"]),
        entry["offset"], entry["length"],
    )  # fmt: skip
    canonical = json.dumps(one["segments"], separators=(",", ":"), sort_keys=True)
    assert plains["segment_page"] == canonical.encode()
    # the second meta segment holds both records, back to back
    sv = tv["segment"]
    seg = b"".join(f[80:] for f in plain_fragments(sv)[: sv["k"]])
    records = tv["map2_page"]["record"] + tv["segment_page"]["record"]
    assert seg[: sv["used"]].hex() == records
    # the library: the one-level description comes back from the two-level body
    body = manifest.Body.from_dict(VECTORS["manifest"]["body"] | {"index": tv["index"]})
    assert body.index_map == () and body.index_map2 is not None
    two = json.dumps(body.to_dict()["index"], separators=(",", ":"), sort_keys=True)
    assert two == json.dumps(tv["index"], separators=(",", ":"), sort_keys=True)
    by_id = {bytes.fromhex(tv[n]["id"]): plains[n] for n in plains}
    desc = manifest.index_description(body, lambda page: by_id[page.id])
    flat = manifest.Body.from_dict(VECTORS["manifest"]["body"])
    assert desc.map == flat.index_map and desc.segments[:1] == flat.index_segments
    assert [s.uid for s in desc.segments] == [
        flat.index_segments[0].uid,
        body.index_segments[0].uid,
    ]


def test_the_stranger_reads_the_two_level_index(tmp_path):
    remote = tmp_path / "r0"
    (remote / "meta").mkdir(parents=True)
    for sv in (VECTORS["meta_segment"], VECTORS["index_two_levels"]["segment"]):
        for s in sv["shards"][1:4]:  # any k of them
            (remote / "meta" / s["name"]).write_bytes(bytes.fromhex(s["object"]))
    body = VECTORS["manifest"]["body"] | {"index": VECTORS["index_two_levels"]["index"]}
    m = fr.Manifest(VECTORS["manifest"]["seq"], 0, body, b"")
    fr.open_index(KEYS, fr.Remotes([remote]), m, tmp_path / "index.db").close()
    assert (tmp_path / "index.db").read_bytes().hex() == VECTORS["index_objects"]["file"]
    with pytest.raises(fr.FormatError, match="3 levels"):
        fr.open_index(
            KEYS,
            fr.Remotes([remote]),
            fr.Manifest(7, 0, body | {"index": body["index"] | {"levels": 3}}, b""),
            tmp_path / "no.db",
        )


def test_one_copy_segment_erasure_algorithm_3():
    """format.md 7.5: the data segment coded 1-of-1 is one object whose unwhitened fragment
    is the fixed 80-byte header and the segment; the document's reader, the library and
    the vector agree, and a code other than 1-of-1 under algorithm 3 is refused."""
    cv = VECTORS["copy_segment"]
    sh, size = cv["shard"], cv["segment_size"]
    assert (cv["k"], cv["n"], cv["ec_alg"]) == (1, 1, 3)
    obj = bytes.fromhex(sh["object"])
    assert len(obj) == 5 + 80 + size == sh["object_len"]
    assert blake3.blake3(obj).hexdigest() == sh["object_blake3"]
    frag = fr.keystream_xor(fr.whitening_key(KEYS.audit_key, sh["name"], 0), obj[5:])
    assert frag[:80].hex() == sh["fragment_header"]
    fh = doc_parse_fragment_header(frag)
    assert fh["magic"] == 0x0B0C5ECC and fh["metadata_chksum_ok"]
    assert (fh["idx"], fh["size"], fh["orig_data_size"], fh["backend_id"]) == (0, size, size, 0)
    assert (fh["chksum_type"], fh["backend_metadata_size"]) == (1, 0)
    # the payload is the segment itself: the same bytes the 3-of-5 data fragments hold
    data = b"".join(f[80:] for f in plain_fragments(VECTORS["data_segment"])[:3])[:size]
    assert frag[80:] == data and blake3.blake3(data).hexdigest() == cv["segment_blake3"]
    parsed = fr.open_shard(KEYS.audit_key, obj, sh["name"], 0, size)
    assert fr.decode_segment([parsed], 1, 1, size, 3) == data
    # the library writes the same object (no library version in this header) and reads it
    (built,) = erasure.encode(data, 1, 1)
    assert built == frag == erasure.copy_fragment(data)
    assert segment.stored_shard(0, sh["name"], built, KEYS.audit_key).body == obj
    plain = segment.open_fragment(obj, KEYS.audit_key, sh["name"], 0)
    assert segment.decode_segment({0: plain}, 1, 1, size, 3) == data
    assert erasure.decode([plain], 1, 1, 3) == data
    assert erasure.decode_range({0: plain[80 + 100 : 80 + 200]}, 0, 1, 3) == data[100:200]
    # algorithm 3 codes 1-of-1 only, and an unknown id is refused by both readers
    with pytest.raises(fr.FormatError, match="codes 1-of-1"):
        fr.decode_segment([parsed], 1, 2, size, 3)
    with pytest.raises(fr.FormatError, match="erasure algorithm 4"):
        fr.decode_segment([parsed], 1, 1, size, 4)
    with pytest.raises(IntegrityError, match="does not code 1-of-2"):
        erasure.decode([plain], 1, 2, 3)
    with pytest.raises(IntegrityError, match="unknown erasure algorithm id 4"):
        erasure.decode([plain], 1, 1, 4)
    with pytest.raises(IntegrityError, match="cannot be rebuilt|no other fragment"):
        erasure.reconstruct([plain], [0], 1, 1, 3)


# --- manifest -------------------------------------------------------------------------------


def test_manifest_layout_signature_and_body():
    keys = VaultKeys.from_seed(SEED)
    mv = VECTORS["manifest"]
    blob = bytes.fromhex(mv["blob"])
    magic, ver, suite, sig_alg, vid, seq, created, blen = struct.unpack_from(">4sBHB16sQQI", blob)
    assert (magic, ver, suite, sig_alg) == (b"VFSM", 2, 1, 1)
    assert (vid, seq, created) == (keys.vault_id, mv["seq"], mv["created_ms"])
    assert blen == mv["body_length"] and blob[:44].hex() == mv["header"]
    (slen,) = struct.unpack_from(">H", blob, 44 + blen)
    assert slen == mv["signature_length"] == 3309 + 64
    assert len(blob) == 44 + blen + 2 + slen
    sig = blob[46 + blen :]
    signed = bytes.fromhex(mv["sign_label"]) + blob[: 44 + blen]
    assert signed.startswith(b"vaultfs/v1/manifest")
    sk_m, sk_e = KEYS.mldsa, KEYS.ed25519
    sk_m.public_key().verify(sig[:3309], signed)  # raises InvalidSignature if wrong
    sk_e.public_key().verify(sig[3309:], signed)
    kind = b"manifest" + struct.pack(">Q", seq)
    _comp, _b, raw = doc_open(keys.metadata_key, vid, b"meta" + kind, kind, blob[44 : 44 + blen])
    assert raw.decode() == mv["body_json"]
    assert json.loads(raw) == mv["body"]
    assert mv["body"]["keyring"][0]["wrapped"] == VECTORS["keyring"]["wrapped"]
    assert fr.open_manifest(KEYS, blob).body == mv["body"]
    # 10.3: a manifest is named in the chain by BLAKE3 of its whole object
    assert blake3.blake3(blob).hexdigest() == mv["object_blake3"]
    assert fr.open_manifest(KEYS, blob).hash.hex() == mv["object_blake3"]
    assert manifest.decode(keys, blob).link.hash.hex() == mv["object_blake3"]
    assert mv["body"]["prev"]["seq"] == seq - 1
    assert manifest.object_name(seq, "0a1b2c3d").startswith(mv["object_name_prefix"])
    # library: decodes the stored blob; re-encoding gives the same header, a verifiable blob
    assert manifest.decode(keys, blob).body == mv["body"]
    again = manifest.encode(keys, seq, created, mv["body"])
    assert again[:40].hex() == mv["header"][:80]  # the body length varies with zstd settings
    (again_len,) = struct.unpack_from(">I", again, 40)
    assert len(again) == 44 + again_len + 2 + 3373
    assert manifest.decode(keys, again).body == mv["body"]
    assert fr.open_manifest(KEYS, again).body == mv["body"]
    # a flipped signed byte is rejected
    bad = bytearray(blob)
    bad[30] ^= 1
    with pytest.raises(Exception, match="signature|vault id|sequence"):
        manifest.decode(keys, bytes(bad))


def test_manifest_body_schema_reads_the_vector_body():
    """manifest.Body reads the vector's body (an older writer's: no ``retired_suites``) with
    the defaults docs/format.md 10.2 gives, and a current writer's body back to the same
    canonical JSON."""
    doc = VECTORS["manifest"]["body"]
    body = manifest.Body.from_dict(doc)
    assert body.vault_root.hex() == doc["vault_root"] and (body.k, body.n) == (3, 5)
    assert body.keyring[0].wrapped.hex() == VECTORS["keyring"]["wrapped"]
    (seg,) = body.index_segments
    iv = VECTORS["index_objects"]
    used = (len(iv["block"]["record"]) + len(iv["map_page"]["record"])) // 2
    assert (seg.size, seg.used, seg.ec_alg) == (4096, used, 1)
    assert (body.index_length, body.index_block_size) == (len(iv["file"]) // 2, 16384)
    (page,) = body.index_map
    assert (page.id.hex(), page.uid, page.offset) == (
        iv["map_page"]["id"], seg.uid, len(iv["block"]["record"]) // 2,
    )  # fmt: skip
    assert [s.hash.hex() for s in seg.shards] == [
        s["hash"] for s in doc["index"]["segments"][0]["shards"]
    ]
    assert body.retired_suites == frozenset() and body.slhdsa_public is None
    assert body.prev == manifest.Link(6, bytes.fromhex(doc["prev"]["hash"])) and body.fork is None
    current = json.loads(json.dumps(doc))
    current["index"]["segments"][0]["size"] = 4096
    current["retired_suites"] = [2]
    canonical = json.dumps(current, separators=(",", ":"), sort_keys=True)
    again = manifest.Body.from_dict(current).to_dict()
    assert json.dumps(again, separators=(",", ":"), sort_keys=True) == canonical
    current["an_extension"] = {"x": 1}  # readers ignore keys they do not know
    assert manifest.Body.from_dict(current).to_dict() == again


def _set(path: str, value: object):
    """A damage function: set (or with ``...`` delete) the field at a dotted path."""

    def damage(body: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            body = body[p]
        if value is ...:
            del body[last]
        else:
            body[last] = value

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_set("vault_root", ...), "vault_root: missing"),
        (_set("vault_root", "zz"), "vault_root: not hex"),
        (_set("vault_root", "00" * 31), "vault_root: expected 32 bytes, got 31"),
        (_set("k", "3"), "k: expected a non-negative integer"),
        (_set("n", True), "n: expected a non-negative integer"),
        (_set("segment_size", -1), "segment_size: expected a non-negative integer"),
        (_set("keyring", {}), "keyring: expected a list"),
        (_set("keyring.0", 1), "keyring[0]: expected an object"),
        (_set("keyring.0.wrapped", 5), "keyring[0].wrapped: expected a string"),
        (_set("index", ...), "index: missing"),
        (_set("index", []), "index: expected an object"),
        (_set("index.length", None), "index.length: expected a non-negative integer"),
        (_set("index.block_size", 0), "index.block_size: expected a positive integer"),
        (_set("index.map", ...), "index.map: missing"),
        (_set("index.map.0.id", "ab"), "index.map[0].id: expected 32 bytes"),
        (_set("index.map.0.offset", -1), "index.map[0].offset: expected a non-negative"),
        (_set("index.segments.0.k", 6), "index.segments[0].k: k=6, n=5 is not a k-of-n code"),
        (_set("index.segments.0.shards.1.hash", ...), "index.segments[0].shards[1].hash: missing"),
        (_set("index.segments.0.shards.1.name", 0), "index.segments[0].shards[1].name"),
        (_set("retired_suites", ["1"]), "retired_suites[0]: expected a non-negative integer"),
        (_set("slhdsa_public", "ab"), "slhdsa_public: expected 32 bytes"),
        (_set("prev", ...), "prev: missing"),
        (_set("prev", 6), "prev: expected an object"),
        (_set("prev.hash", "00" * 31), "prev.hash: expected 32 bytes, got 31"),
        (_set("prev.seq", -1), "prev.seq: expected a non-negative integer"),
        (_set("fork", {"seq": 3}), "fork.hash: missing"),
    ],
)
def test_manifest_body_schema_refuses_malformed_bodies(damage, message):
    """A malformed body is an IntegrityError naming the field, never a KeyError/TypeError."""
    body = json.loads(json.dumps(VECTORS["manifest"]["body"]))
    damage(body)
    with pytest.raises(IntegrityError, match=re.escape(f"malformed manifest body: {message}")):
        manifest.Body.from_dict(body)


def test_a_signed_manifest_with_a_malformed_body_is_refused(monkeypatch):
    """decode() authenticates any JSON object; read(), what restore and verify use, also
    refuses a body that does not fit the schema. A body that is not a JSON object is refused
    by both."""
    keys = VaultKeys.from_seed(SEED)
    blob = manifest.encode(keys, 7, 1_700_000_000_000, {"vault_root": "00" * 32})
    assert manifest.decode(keys, blob).body == {"vault_root": "00" * 32}
    with pytest.raises(IntegrityError, match="malformed manifest body: index: missing"):
        manifest.read(keys, blob)
    for raw, message in (("{", "not JSON"), ("[1]", "not a JSON object")):
        monkeypatch.setattr(manifest.json, "dumps", lambda *_a, raw=raw, **_k: raw)
        blob = manifest.encode(keys, 7, 1_700_000_000_000, {})
        monkeypatch.undo()
        with pytest.raises(IntegrityError, match=message):
            manifest.decode(keys, blob)


def test_the_kb_key_of_a_body_round_trips_and_a_malformed_one_is_refused():
    """10.2 ``kb``: per knowledge-base snapshot, its root and per-table rows and checksums."""
    summary = {
        "format": "vaultfs-kb/1",
        "root": "ab" * 32,
        "tables": {"beliefs": {"rows": 3, "checksum": "cd" * 32}},
    }
    body = manifest.Body(bytes(32), 2, 3, 1 << 20, (), 0, 16384, (), (), kb={"1a2b3c4d": summary})
    obj = body.to_dict()
    assert obj["kb"] == {"1a2b3c4d": summary}
    assert manifest.Body.from_dict(obj).kb == {"1a2b3c4d": summary}
    assert "kb" not in manifest.Body(bytes(32), 2, 3, 1 << 20, (), 0, 16384, (), ()).to_dict()
    bad = {**summary, "root": "ab"}
    with pytest.raises(IntegrityError, match=r"kb\.1a2b3c4d\.root"):
        manifest.Body.from_dict({**obj, "kb": {"1a2b3c4d": bad}})
    rows = {"beliefs": {"rows": -1, "checksum": "cd" * 32}}
    with pytest.raises(IntegrityError, match=r"kb\.1a2b3c4d\.tables\.beliefs\.rows"):
        manifest.Body.from_dict({**obj, "kb": {"1a2b3c4d": {**summary, "tables": rows}}})


# --- the document carries the vectors -------------------------------------------------------


def test_document_pastes_the_key_vectors():
    """docs/format.md must show the deterministic vectors, so a stranger can check by hand."""
    v = VECTORS
    wanted = [
        v["master_seed"],
        v["derived"]["vault_id"],
        v["derived"]["chunk_id_key"],
        str(v["derived"]["chunker_seed"]),
        v["derived"]["metadata_key"],
        v["public_keys"]["x25519"],
        v["public_keys"]["ed25519"],
        v["public_keys"]["mldsa65_blake3"],
        v["public_keys"]["mlkem768_blake3"],
        v["fingerprint"],
        v["chunk_records"][0]["chunk_id"],
        v["chunk_records"][0]["record"],
        v["merkle"]["cases"][3]["root"],
        v["data_segment"]["shards"][0]["header"],
        v["whitening"]["key"],
        v["whitening"]["keystream_0"][:64],
        v["manifest"]["header"],
        v["keyring"]["info"],
    ] + [o["okm"] for o in v["hkdf"]["outputs"]]
    flat = re.sub(r"\s+", "", FORMAT_MD)
    missing = [w for w in wanted if w not in flat]
    assert not missing, f"docs/format.md lacks vectors: {missing}"


def test_erasure_algorithm_1_is_not_mds_beyond_four_parities():
    """docs/format.md warns that isa_l_rs_vand (algorithm 1) with n - k >= 5 has k-subsets
    that cannot be decoded: the document's matrix and liberasurecode agree on which."""
    k, n = 7, 15  # the "paranoid" profile
    seg = blake3.blake3(b"vaultfs/v1/test/non-mds").digest(length=k * 64)
    frags = ECDriver(k=k, m=n - k, ec_type="isa_l_rs_vand").encode(seg)
    singular = (0, 1, 3, 4, 7, 9, 12)
    with pytest.raises(fr.FormatError, match="not independent"):
        fr.rs_data_payloads({i: frags[i][80:] for i in singular}, k)
    with pytest.raises(Exception, match="decode"):
        ECDriver(k=k, m=n - k, ec_type="isa_l_rs_vand").decode([frags[i] for i in singular])
    fine = (0, 1, 3, 4, 7, 9, 11)
    got = fr.rs_data_payloads({i: frags[i][80:] for i in fine}, k)
    assert b"".join(got)[: len(seg)] == seg
    bad = 0
    for subset in itertools.combinations(range(n), k):
        try:
            fr.rs_data_payloads({i: b"\0" for i in subset}, k)
        except fr.FormatError:
            bad += 1
    assert bad == 36  # of 6435 subsets of 7 shards
    for k, n in ((3, 5), (5, 9)):  # the personal and federation profiles are MDS
        for subset in itertools.combinations(range(n), k):
            fr.rs_data_payloads({i: b"\0" for i in subset}, k)


def test_version_1_manifests_and_shard_objects_are_refused_by_name(monkeypatch):
    """Section 14: a version-1 manifest (validly signed) and a version-1 shard object are
    refused with a message naming the version, by vaultfs and by the stranger's reader."""
    keys = VaultKeys.from_seed(SEED)
    monkeypatch.setattr(manifest, "VERSION", 1)
    old = manifest.encode(keys, 7, 1_700_000_000_000, {"vault_root": "00" * 32})
    monkeypatch.undo()
    assert old[4] == 1
    with pytest.raises(IntegrityError, match="on-remote format version 1; this vaultfs reads"):
        manifest.decode(keys, old)
    with pytest.raises(fr.FormatError, match="format version 1"):
        fr.open_manifest(fr.Keys.from_seed(SEED), old)
    sh = segment.build_shards(bytes(3 * 4096), 3, 5, keys.audit_key)[0]
    v1 = sh.body[:4] + b"\x01" + sh.body[5:]
    with pytest.raises(IntegrityError, match="format version 1; this vaultfs reads version 2"):
        segment.open_fragment(v1, keys.audit_key, sh.name, 0)
    assert segment.open_fragment(sh.body, keys.audit_key, sh.name, 0)
