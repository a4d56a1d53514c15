/* Audit tags of a whole shard object in one call (vaultfs/audittag.py, docs/format.md
 * "Audits"): for every piece j of every Merkle block b,
 *
 *     tag = BLAKE3-keyed(key, label || leaf_b || b (4, BE) || j (2, BE) || piece bytes)[:tag_len]
 *
 * The hashing is the BLAKE3 team's C implementation (Debian's librust-blake3-dev ships it;
 * scripts/build-native compiles it beside this file). What this file adds is the batching:
 * hashed one at a time, a 2106-byte message keeps only two of AVX2's eight lanes busy (its
 * two whole chunks), so full pieces go through blake3_hash_many eight messages at a time,
 * chunk 0 of each, then chunk 1 of each, then their parent nodes. Only that exact shape takes
 * the batched path (two whole chunks and a tail of 1..64 bytes, the usual 2 KiB piece);
 * every other piece (a short last piece of an object) goes through the public hasher. Both
 * are checked against the blake3 Python package by tests/test_audittag.py, and at load by
 * audittag.py on a fixed vector.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blake3.h"
#include "blake3_impl.h"

#define EXPORT __attribute__((visibility("default")))
#define LANES 32                      /* full pieces per batch */
#define LEAF_LEN 32
#define ID_LEN 6                      /* block (4) and piece (2) numbers, big-endian */
#define FAST_MIN (2 * BLAKE3_CHUNK_LEN + 1)
#define FAST_MAX (2 * BLAKE3_CHUNK_LEN + BLAKE3_BLOCK_LEN)

/* Pieces of an object of n bytes cut per block: at least one (an empty object has one). */
EXPORT size_t vaultfs_piece_tag_count(size_t n, size_t block, size_t piece) {
  if (n == 0) return 1;
  size_t full = n / block, rest = n % block;
  size_t per = (block + piece - 1) / piece;
  return full * per + (rest ? (rest + piece - 1) / piece : 0);
}

static void put_head(uint8_t *dst, const uint8_t *label, size_t label_len,
                     const uint8_t *leaf, uint32_t b, uint16_t j) {
  memcpy(dst, label, label_len);
  memcpy(dst + label_len, leaf, LEAF_LEN);
  uint8_t *id = dst + label_len + LEAF_LEN;
  id[0] = (uint8_t)(b >> 24);
  id[1] = (uint8_t)(b >> 16);
  id[2] = (uint8_t)(b >> 8);
  id[3] = (uint8_t)b;
  id[4] = (uint8_t)(j >> 8);
  id[5] = (uint8_t)j;
}

struct batch {
  size_t m;                                    /* messages waiting */
  size_t tail;                                 /* bytes after the two chunks (same for all) */
  uint8_t *outs[LANES];                        /* where each one's tag goes */
  uint8_t msg[LANES][FAST_MAX];
};

/* Tags of the batch's messages: chunk CVs by hash_many, parents by hash_many, then the
 * third (tail) chunk and the root node one message at a time. */
static void flush_batch(struct batch *bt, const uint32_t key_words[8], size_t tag_len) {
  size_t m = bt->m;
  if (m == 0) return;
  const uint8_t *in0[LANES], *in1[LANES], *inp[LANES];
  uint8_t cv0[LANES * BLAKE3_OUT_LEN], cv1[LANES * BLAKE3_OUT_LEN];
  uint8_t parents[LANES][BLAKE3_BLOCK_LEN], left[LANES * BLAKE3_OUT_LEN];
  for (size_t i = 0; i < m; i++) {
    in0[i] = bt->msg[i];
    in1[i] = bt->msg[i] + BLAKE3_CHUNK_LEN;
  }
  size_t blocks = BLAKE3_CHUNK_LEN / BLAKE3_BLOCK_LEN;
  blake3_hash_many(in0, m, blocks, key_words, 0, false, KEYED_HASH, CHUNK_START, CHUNK_END, cv0);
  blake3_hash_many(in1, m, blocks, key_words, 1, false, KEYED_HASH, CHUNK_START, CHUNK_END, cv1);
  for (size_t i = 0; i < m; i++) {
    memcpy(parents[i], cv0 + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    memcpy(parents[i] + BLAKE3_OUT_LEN, cv1 + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    inp[i] = parents[i];
  }
  blake3_hash_many(inp, m, 1, key_words, 0, false, KEYED_HASH | PARENT, 0, 0, left);
  for (size_t i = 0; i < m; i++) {
    uint8_t block[BLAKE3_BLOCK_LEN] = {0};
    memcpy(block, bt->msg[i] + 2 * BLAKE3_CHUNK_LEN, bt->tail);
    uint32_t cv2[8];
    memcpy(cv2, key_words, sizeof cv2);
    blake3_compress_in_place(cv2, block, (uint8_t)bt->tail, 2,
                             KEYED_HASH | CHUNK_START | CHUNK_END);
    uint8_t root_block[BLAKE3_BLOCK_LEN];
    memcpy(root_block, left + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    store_cv_words(root_block + BLAKE3_OUT_LEN, cv2);
    uint32_t root[8];
    memcpy(root, key_words, sizeof root);
    blake3_compress_in_place(root, root_block, BLAKE3_BLOCK_LEN, 0, KEYED_HASH | PARENT | ROOT);
    uint8_t out[BLAKE3_OUT_LEN];
    store_cv_words(out, root);
    memcpy(bt->outs[i], out, tag_len);
  }
  bt->m = 0;
}

/* Every tag of object ``body`` (n bytes) whose Merkle leaves are ``leaves`` (32 bytes a
 * block), block-major, into ``out`` (vaultfs_piece_tag_count(...) * tag_len bytes).
 * Returns the number of tags written, or 0 for arguments it cannot take. */
EXPORT size_t vaultfs_piece_tags(const uint8_t key[BLAKE3_KEY_LEN], const uint8_t *label,
                          size_t label_len, const uint8_t *body, size_t n,
                          const uint8_t *leaves, size_t block, size_t piece, uint8_t *out,
                          size_t tag_len) {
  if (tag_len == 0 || tag_len > BLAKE3_OUT_LEN || piece == 0 || block == 0 ||
      label_len > 256 || block / piece > 65535)
    return 0;
  size_t head_len = label_len + LEAF_LEN + ID_LEN;
  uint32_t key_words[8];
  load_key_words(key, key_words);
  static __thread struct batch bt; /* 67 KiB: not on the stack */
  bt.m = 0;
  uint8_t head[256 + LEAF_LEN + ID_LEN];
  size_t t = 0;
  size_t nblocks = n ? (n + block - 1) / block : 1;
  for (size_t b = 0; b < nblocks; b++) {
    size_t boff = b * block, end = boff + block < n ? boff + block : n;
    const uint8_t *leaf = leaves + b * LEAF_LEN;
    size_t j = 0;
    for (size_t poff = boff; poff < end || (poff == boff && j == 0); poff += piece, j++) {
      size_t plen = poff + piece < end ? piece : end - poff;
      size_t len = head_len + plen;
      uint8_t *dst = out + t * tag_len;
      t++;
      if (len >= FAST_MIN && len <= FAST_MAX) {
        if (bt.m && bt.tail != len - 2 * BLAKE3_CHUNK_LEN) flush_batch(&bt, key_words, tag_len);
        bt.tail = len - 2 * BLAKE3_CHUNK_LEN;
        uint8_t *msg = bt.msg[bt.m];
        put_head(msg, label, label_len, leaf, (uint32_t)b, (uint16_t)j);
        memcpy(msg + head_len, body + poff, plen);
        bt.outs[bt.m++] = dst;
        if (bt.m == LANES) flush_batch(&bt, key_words, tag_len);
      } else {
        blake3_hasher h;
        blake3_hasher_init_keyed(&h, key);
        put_head(head, label, label_len, leaf, (uint32_t)b, (uint16_t)j);
        blake3_hasher_update(&h, head, head_len);
        blake3_hasher_update(&h, body + poff, plen);
        blake3_hasher_finalize(&h, dst, tag_len);
      }
      if (plen == 0) break; /* the one empty piece of an empty object */
    }
  }
  flush_batch(&bt, key_words, tag_len);
  return t;
}
