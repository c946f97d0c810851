/* Decode attention on CPU that reads the paged KV cache in place.
 *
 * One query token per (sequence, row) attends over the sequence's context through its block
 * table; `rows` query tokens may share one table (a batch over a shared prefix). The keys of
 * a sequence are cut into `splits` ranges of whole blocks; each (sequence, split) is one work
 * item that walks its blocks in order and, for every kv head, folds the block into a running
 * (max, sum, acc) per query head of the kv head's group (online softmax, one rescale per
 * block); a second pass merges the splits by log-sum-exp. Walking all heads of a block at once
 * reads the cache in address order (a block holds its slots' heads together) and the next block
 * is prefetched while this one is folded. K and V are read once per item: every query head of
 * the group (and every row sharing the table) is scored against a block while it sits in L1.
 *
 * Threads: OpenMP, on the runtime PyTorch already loaded (the same libgomp soname), so the
 * kernel and PyTorch's own operators share one thread pool.
 *
 * Element types: q is 0 float32 or 1 bfloat16; the caches (kv_kind) the same, or 8 / 4 for
 * int8 / int4 codes with a float32 (scale, zero) per row in k_params / v_params, dequantized
 * as they are read (kernels/kv_quant.py's layout). The output and the LSE are float32.
 * Strides are in elements; head_dim is a multiple of 16. Returns 0, 1 when scratch
 * memory could not be had, 2 for a head_dim it does not take.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define DT_F32 0
#define DT_BF16 1
#define KV_INT8 8 /* uint8 codes, one per element */
#define KV_INT4 4 /* uint8 bytes: element j in the low nibble, j + d/2 in the high one */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Row `src` of `d` elements as float: the row itself for float32, else converted into `buf`. */
static inline const float *as_f32(const void *src, int dtype, int d, float *buf) {
    if (dtype == DT_F32) return (const float *)src;
    const uint16_t *h = (const uint16_t *)src;
    for (int i = 0; i < d; i++) buf[i] = bf16_to_f32(h[i]);
    return buf;
}

/* Scores of query `qi` (nc = head_dim / 8 vectors) against keys [0, n), four keys at a time so
 * that one horizontal add serves four of them; s holds sb >= n floats, -inf past n. */
static inline __attribute__((always_inline)) void score_block(
    const float *qi, const float *const *krow, int n, int sb, int nc, float *s) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = krow[j], *k1 = krow[j + 1], *k2 = krow[j + 2], *k3 = krow[j + 3];
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int c = 0; c < nc; c++) {
            const vf q = load(qi + 8 * c);
            a0 += q * load(k0 + 8 * c);
            a1 += q * load(k1 + 8 * c);
            a2 += q * load(k2 + 8 * c);
            a3 += q * load(k3 + 8 * c);
        }
        const vf4 r = hsum4(a0, a1, a2, a3);
        memcpy(s + j, &r, sizeof r);
    }
    for (; j < n; j++) {
        vf a = {};
        for (int c = 0; c < nc; c++) a += load(qi + 8 * c) * load(krow[j] + 8 * c);
        s[j] = hsum(a);
    }
    for (; j < sb; j++) s[j] = -INFINITY;
}

/* acc[0, 8 * nc) = acc * alpha + sum_j s[j] v_j[0, 8 * nc): the accumulator stays in registers
 * for nc <= 8 (64 floats), the widest slice the caller hands in. */
static inline __attribute__((always_inline)) void accumulate(
    const float *const *vrow, int off, int n, const float *s, float alpha, int nc, float *acc) {
    vf av[8];
    for (int c = 0; c < nc; c++) av[c] = load(acc + 8 * c) * alpha;
    for (int j = 0; j < n; j++) {
        const vf p = splat(s[j]);
        const float *vj = vrow[j] + off;
        for (int c = 0; c < nc; c++) av[c] += p * load(vj + 8 * c);
    }
    for (int c = 0; c < nc; c++) store(acc + 8 * c, av[c]);
}

/* Fold keys [0, n) of one block into query i's running (acc, m, l). nc = head_dim / 8; s is the
 * query's scratch row of sb >= n floats (a multiple of 16). Always inlined, so a constant nc (8
 * for head_dim 64, 16 for 128) unrolls the vector loops. */
static inline __attribute__((always_inline)) void fold_block(
    const float *qi, const float *const *krow, const float *const *vrow, int n, int sb, int nc,
    float *s, float *acc, float *m, float *l) {
    score_block(qi, krow, n, sb, nc, s);
    vf mv = load(s);
    for (int c = 8; c < sb; c += 8) mv = vmax(mv, load(s + c));
    const float bmax = hmax(mv), mx = bmax > *m ? bmax : *m;
    vf sum = {};
    for (int c = 0; c < sb; c += 8) {
        const vf p = exp_neg(load(s + c) - mx);
        store(s + c, p);
        sum += p;
    }
    /* Earlier terms shrink by exp(m - mx): 1 without a new max, 0 before any key. */
    const float alpha = exp_neg(splat(*m - mx))[0];
    for (int off = 0; off < 8 * nc; off += 64) {
        const int w = 8 * nc - off < 64 ? (8 * nc - off) / 8 : 8;
        if (w == 8)
            accumulate(vrow, off, n, s, alpha, 8, acc + off);
        else
            accumulate(vrow, off, n, s, alpha, w, acc + off);
    }
    *l = *l * alpha + hsum(sum);
    *m = mx;
}

/* A cache row as float: float32 in place, bfloat16 converted, int8 / int4 codes dequantized
 * as code * scale + zero with the row's (scale, zero) at `params` (kernels/kv_quant.py). */
static inline const float *kv_row(const char *src, const float *params, int kind, int d,
                                  float *buf) {
    if (kind == DT_F32 || kind == DT_BF16) return as_f32(src, kind, d, buf);
    const float scale = params[0], zero = params[1];
    const uint8_t *c = (const uint8_t *)src;
    if (kind == KV_INT8) {
        for (int i = 0; i < d; i++) buf[i] = (float)c[i] * scale + zero;
    } else {
        const int h = d / 2;
        for (int i = 0; i < h; i++) {
            buf[i] = (float)(c[i] & 15) * scale + zero;
            buf[i + h] = (float)(c[i] >> 4) * scale + zero;
        }
    }
    return buf;
}

static inline int64_t table_at(const void *table, int int64, int64_t i) {
    return int64 ? ((const int64_t *)table)[i] : (int64_t)((const int32_t *)table)[i];
}

int dr_paged_decode(
    const void *q, int64_t q_seq, int64_t q_row, int64_t q_head,
    const void *k_cache, const void *v_cache,
    int64_t kc_block, int64_t kc_slot, int64_t kc_head,
    const void *block_tables, int bt_int64, int64_t bt_seq,
    const int64_t *context_lens,
    float *out, int64_t o_seq, int64_t o_row, int64_t o_head,
    float *lse, int64_t l_seq, int64_t l_row,
    int num_seqs, int rows, int kv_heads, int group, int head_dim, int block_size,
    float scale, int dtype, int splits, int64_t blocks_per_split, int num_threads,
    float *work, int kv_kind, const float *k_params, const float *v_params,
    int64_t kp_block, int64_t kp_slot, int64_t kp_head) {
    const int d = head_dim, nq = rows * group, bs = block_size, nc = head_dim / 8;
    if (head_dim % 16 || head_dim > 256) return 2;
    const int sb = (block_size + 15) / 16 * 16; /* a score row, whole vectors */
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
    /* Bytes per cache element (strides count elements of the cache tensor) and per row. */
    const int64_t kv_esize = kv_kind == DT_F32 ? 4 : kv_kind == DT_BF16 ? 2 : 1;
    const int64_t row_bytes = kv_kind == KV_INT4 ? d / 2 : d * kv_esize;
    const int64_t part = (int64_t)nq * (d + 2); /* acc (nq, d), m (nq), l (nq) per item */
    /* One item per (sequence, split) takes every kv head, so that it walks whole cache blocks
     * (all heads of a slot lie together) in address order. Its partial results for kv head h
     * sit at work + ((seq * kv_heads + h) * splits + split) * part. */
    const int64_t items = (int64_t)num_seqs * splits;
    const char *qb = (const char *)q, *kb = (const char *)k_cache, *vb = (const char *)v_cache;
    int failed = 0;

#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        const size_t qn = (size_t)kv_heads * nq * d;
        float *qf = malloc(sizeof(float) * (qn + (size_t)sb + 2 * (size_t)bs * d));
        const float **krow = malloc(sizeof(float *) * 2 * (size_t)bs);
        if (!qf || !krow) failed = 1;
        float *s = qf + qn, *kbuf = s + sb, *vbuf = kbuf + (size_t)bs * d;
        const float **vrow = krow + bs;

#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (failed) continue;
            const int64_t seq = item / splits, split = item % splits;
            for (int kvh = 0; kvh < kv_heads; kvh++) {
                float *acc = work + ((seq * kv_heads + kvh) * splits + split) * part;
                float *m = acc + (int64_t)nq * d, *l = m + nq;
                for (int64_t i = 0; i < (int64_t)nq * d; i++) acc[i] = 0.0f;
                for (int i = 0; i < nq; i++) {
                    m[i] = -INFINITY;
                    l[i] = 0.0f;
                }
            }
            const int64_t ctx = context_lens[seq];
            const int64_t nblk = (ctx + bs - 1) / bs;
            const int64_t blk0 = split * blocks_per_split;
            const int64_t blk1 = blk0 + blocks_per_split < nblk ? blk0 + blocks_per_split : nblk;
            if (blk0 >= blk1) continue;
            /* Every query row in float, pre-scaled, kv head by kv head. */
            for (int kvh = 0; kvh < kv_heads; kvh++)
                for (int r = 0; r < rows; r++)
                    for (int g = 0; g < group; g++) {
                        const int64_t off =
                            seq * q_seq + r * q_row + (int64_t)(kvh * group + g) * q_head;
                        float *dst = qf + ((int64_t)kvh * nq + r * group + g) * d;
                        const float *src = as_f32(qb + off * esize, dtype, d, dst);
                        for (int i = 0; i < d; i++) dst[i] = src[i] * scale;
                    }
            const void *table = (const char *)block_tables + seq * bt_seq * (bt_int64 ? 8 : 4);
            for (int64_t blk = blk0; blk < blk1; blk++) {
                const int64_t block = table_at(table, bt_int64, blk);
                const int64_t left = ctx - blk * bs;
                const int n = left < bs ? (int)left : bs;
                if (blk + 1 < blk1) {
                    /* The next block lies elsewhere in the cache: ask for it (into L2) now. */
                    const int64_t next = table_at(table, bt_int64, blk + 1) * kc_block;
                    for (int j = 0; j < bs; j++)
                        for (int h = 0; h < kv_heads; h++) {
                            const int64_t row = (next + j * kc_slot + h * kc_head) * kv_esize;
                            for (int64_t b = 0; b < row_bytes; b += 64) {
                                __builtin_prefetch(kb + row + b, 0, 2);
                                __builtin_prefetch(vb + row + b, 0, 2);
                            }
                        }
                }
                for (int kvh = 0; kvh < kv_heads; kvh++) {
                    const int64_t base = block * kc_block + kvh * kc_head;
                    const int64_t pbase = block * kp_block + kvh * kp_head;
                    for (int j = 0; j < n; j++) {
                        const int64_t row = (base + j * kc_slot) * kv_esize;
                        const int64_t prow = pbase + j * kp_slot;
                        krow[j] = kv_row(kb + row, k_params + prow, kv_kind, d, kbuf + j * d);
                        vrow[j] = kv_row(vb + row, v_params + prow, kv_kind, d, vbuf + j * d);
                    }
                    float *acc = work + ((seq * kv_heads + kvh) * splits + split) * part;
                    float *m = acc + (int64_t)nq * d, *l = m + nq;
                    for (int i = 0; i < nq; i++) {
                        const float *qi = qf + ((int64_t)kvh * nq + i) * d;
                        float *ai = acc + (int64_t)i * d;
                        if (nc == 8)
                            fold_block(qi, krow, vrow, n, sb, 8, s, ai, m + i, l + i);
                        else if (nc == 16)
                            fold_block(qi, krow, vrow, n, sb, 16, s, ai, m + i, l + i);
                        else
                            fold_block(qi, krow, vrow, n, sb, nc, s, ai, m + i, l + i);
                    }
                }
            }
        }
        free(qf);
        free(krow);
    }
    if (failed) return 1;

    /* Merge each query head's splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M). */
    const int64_t heads_out = (int64_t)num_seqs * kv_heads * nq;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t h = 0; h < heads_out; h++) {
        const int64_t seq = h / ((int64_t)kv_heads * nq);
        const int kvh = (int)(h / nq % kv_heads);
        const int i = (int)(h % nq), r = i / group, g = i % group;
        const float *first = work + (seq * kv_heads + kvh) * splits * part;
        float mx = -INFINITY;
        for (int sp = 0; sp < splits; sp++) {
            const float ms = first[sp * part + (int64_t)nq * d + i];
            mx = ms > mx ? ms : mx;
        }
        float *o = out + seq * o_seq + r * o_row + (int64_t)(kvh * group + g) * o_head;
        float *ls = lse ? lse + seq * l_seq + r * l_row + kvh * group + g : NULL;
        for (int e = 0; e < d; e++) o[e] = 0.0f;
        if (mx == -INFINITY) { /* no key: out 0, lse -inf */
            if (ls) *ls = -INFINITY;
            continue;
        }
        float total = 0.0f;
        for (int sp = 0; sp < splits; sp++) {
            const float *p = first + sp * part;
            const float ms = p[(int64_t)nq * d + i], ls_ = p[(int64_t)nq * d + nq + i];
            if (ms == -INFINITY) continue;
            const float w = expf(ms - mx);
            total += ls_ * w;
            const float *a = p + (int64_t)i * d;
#pragma omp simd
            for (int e = 0; e < d; e++) o[e] += w * a[e];
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int e = 0; e < d; e++) o[e] *= inv;
        if (ls) *ls = mx + logf(total);
    }
    return 0;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFF + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Rotate `heads` head vectors at x (stride `hs` elements) in place by RoPE's rotate-half:
 * out[i] = x[i] c[i] - x[i+h] s[i], out[i+h] = x[i+h] c[i+h] + x[i] s[i+h], in float32. */
static void rotate_heads(char *x, int64_t hs, int heads, int d, int dtype, const float *c,
                         const float *s, float *buf) {
    const int h = d / 2;
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
    for (int head = 0; head < heads; head++) {
        char *row = x + head * hs * esize;
        const float *v = as_f32(row, dtype, d, buf);
        float r[512];
        for (int i = 0; i < h; i++) {
            r[i] = v[i] * c[i] - v[i + h] * s[i];
            r[i + h] = v[i + h] * c[i + h] + v[i] * s[i + h];
        }
        if (dtype == DT_F32) {
            memcpy(row, r, sizeof(float) * d);
        } else {
            uint16_t *o = (uint16_t *)row;
            for (int i = 0; i < d; i++) o[i] = f32_to_bf16(r[i]);
        }
    }
}

/* RoPE on q and k in place (cos / sin: (tokens, head_dim) float32 rows), then k and v written
 * to their cache slots (slot < 0: not written), for float32 / bfloat16 tensors and caches of
 * the same dtype. Strides in elements. */
void dr_rope_store(char *q, int64_t q_tok, int64_t q_head, char *k, int64_t k_tok,
                   int64_t k_head, const char *v, int64_t v_tok, int64_t v_head, const float *cos,
                   const float *sin, char *k_cache, char *v_cache, int64_t kc_block,
                   int64_t kc_slot, int64_t kc_head, const int64_t *slots, int tokens, int q_heads,
                   int kv_heads, int d, int block_size, int dtype, int num_threads) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
#pragma omp parallel for num_threads(num_threads) if (tokens >= 64) schedule(static)
    for (int t = 0; t < tokens; t++) {
        float buf[512];
        const float *c = cos + (int64_t)t * d, *s = sin + (int64_t)t * d;
        rotate_heads(q + t * q_tok * esize, q_head, q_heads, d, dtype, c, s, buf);
        rotate_heads(k + t * k_tok * esize, k_head, kv_heads, d, dtype, c, s, buf);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const int64_t base = (slot / block_size) * kc_block + (slot % block_size) * kc_slot;
        for (int h = 0; h < kv_heads; h++) {
            memcpy(k_cache + (base + h * kc_head) * esize, k + (t * k_tok + h * k_head) * esize,
                   d * esize);
            memcpy(v_cache + (base + h * kc_head) * esize, v + (t * v_tok + h * v_head) * esize,
                   d * esize);
        }
    }
}
