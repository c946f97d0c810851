/* Decode attention on CPU that reads the paged KV cache in place.
 *
 * One query token per (sequence, row) attends over the sequence's context through its block
 * table; `rows` query tokens may share one table (a batch over a shared prefix). The keys of
 * a sequence are cut into `splits` ranges of whole blocks; each (sequence, split) is one work
 * item that walks its blocks in order and, for every kv head, folds the block into a running
 * (max, sum, acc) per query head of the kv head's group (online softmax, one rescale per
 * block); a second pass merges the splits by log-sum-exp. Each block is first converted to
 * float rows grouped by kv head in one pass over its bytes in address order (a block holds its
 * slots' heads together), which the hardware prefetcher follows, so that K and V are read from
 * memory once per item; every query head of the group (and every row sharing the table) is then
 * scored against the converted rows while they sit in L1 / L2, two queries at a time.
 *
 * Threads: OpenMP, on the runtime PyTorch already loaded (the same libgomp soname), so the
 * kernel and PyTorch's own operators share one thread pool.
 *
 * Element types: q is 0 float32 or 1 bfloat16; the caches (kv_kind) the same, or 8 / 4 for
 * int8 / int4 codes with a float32 (scale, zero) per row in k_params / v_params, dequantized
 * in that conversion (kernels/kv_quant.py's layout). The output and the LSE are float32.
 * Strides are in elements; head_dim is a multiple of 16.
 *
 * Sliding window: with window > 0 the query of a sequence of ctx keys (at position ctx - 1)
 * sees only the keys [max(0, ctx - window), ctx); the walk starts at the block holding the
 * first of them, skips that block's earlier slots, and the splits cut the visible range.
 * window 0: every key.
 *
 * Soft-cap (Gemma 2): with softcap > 0 each score s = q.k scale becomes softcap tanh(s /
 * softcap) before the softmax; 0: none. Returns 0, 1 when scratch memory could not be had, 2
 * for a head_dim it does not take, 4 for a negative window or a window with rows > 1 (a shared
 * prefix's rows sit at different positions), 5 for a negative (or NaN) soft-cap.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
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

#define AI static inline __attribute__((always_inline))

/* Scores of the query pair (q0, q1) (prescaled, nc = head_dim / 8 vectors) against the key
 * rows K[0, n4) (head_dim floats apart), n4 a multiple of 4: a 2 x 4 tile of accumulators, so
 * that every key vector loaded serves two queries and eight independent FMA chains hide the FMA
 * latency. */
AI void score_pair(const float *q0, const float *q1, const float *K, int n4, int nc, float *s0,
                   float *s1) {
    const int d = 8 * nc;
    for (int j = 0; j < n4; j += 4) {
        const float *k0 = K + (int64_t)j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
        for (int c = 0; c < nc; c++) {
            const vf x = load(q0 + 8 * c), y = load(q1 + 8 * c);
            vf k = load(k0 + 8 * c);
            a0 += x * k;
            b0 += y * k;
            k = load(k1 + 8 * c);
            a1 += x * k;
            b1 += y * k;
            k = load(k2 + 8 * c);
            a2 += x * k;
            b2 += y * k;
            k = load(k3 + 8 * c);
            a3 += x * k;
            b3 += y * k;
        }
        const vf4 r0 = hsum4(a0, a1, a2, a3), r1 = hsum4(b0, b1, b2, b3);
        memcpy(s0 + j, &r0, sizeof r0);
        memcpy(s1 + j, &r1, sizeof r1);
    }
}

/* Scores of one query against K[0, n4): the pair tile's work split over even and odd vectors
 * instead, for the same eight chains (nc is even). */
AI void score_one(const float *q0, const float *K, int n4, int nc, float *s0) {
    const int d = 8 * nc;
    for (int j = 0; j < n4; j += 4) {
        const float *k0 = K + (int64_t)j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
        for (int c = 0; c < nc; c += 2) {
            const vf x = load(q0 + 8 * c), y = load(q0 + 8 * c + 8);
            a0 += x * load(k0 + 8 * c);
            b0 += y * load(k0 + 8 * c + 8);
            a1 += x * load(k1 + 8 * c);
            b1 += y * load(k1 + 8 * c + 8);
            a2 += x * load(k2 + 8 * c);
            b2 += y * load(k2 + 8 * c + 8);
            a3 += x * load(k3 + 8 * c);
            b3 += y * load(k3 + 8 * c + 8);
        }
        const vf4 r = hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3);
        memcpy(s0 + j, &r, sizeof r);
    }
}

/* Online softmax over one block's score row s (sb floats, -inf past the block's keys): s becomes
 * exp(s - mx) with mx the new running max; (m, l) are updated and the factor by which earlier
 * terms shrink, exp(m_old - mx) (1 without a new max, 0 before any key), is returned. */
AI float softmax_block(float *s, int sb, float *m, float *l) {
    vf mv = load(s);
    for (int c = 8; c < sb; c += 8) mv = vmax(mv, load(s + c));
    const float bmax = hmax(mv), mx = bmax > *m ? bmax : *m;
    vf sum = {};
    for (int c = 0; c < sb; c += 8) {
        const vf p = exp_neg(load(s + c) - mx);
        store(s + c, p);
        sum += p;
    }
    const float alpha = exp_neg(splat(*m - mx))[0];
    *l = *l * alpha + hsum(sum);
    *m = mx;
    return alpha;
}

/* acc_q[off, off + 8 w) = acc_q * alpha_q + sum_j p_q[j] V_j[off, off + 8 w) for the query pair
 * (w = 4: eight accumulator chains in registers, each value vector loaded once for both). */
AI void accumulate_pair(const float *V, int d, int off, int n, const float *p0, const float *p1,
                        float al0, float al1, int w, float *acc0, float *acc1) {
    vf a[4], b[4];
    for (int c = 0; c < w; c++) {
        a[c] = load(acc0 + off + 8 * c) * al0;
        b[c] = load(acc1 + off + 8 * c) * al1;
    }
    for (int j = 0; j < n; j++) {
        const vf x = splat(p0[j]), y = splat(p1[j]);
        const float *vj = V + (int64_t)j * d + off;
        for (int c = 0; c < w; c++) {
            const vf v = load(vj + 8 * c);
            a[c] += x * v;
            b[c] += y * v;
        }
    }
    for (int c = 0; c < w; c++) {
        store(acc0 + off + 8 * c, a[c]);
        store(acc1 + off + 8 * c, b[c]);
    }
}

/* The same for one query, eight vectors at a time. */
AI void accumulate_one(const float *V, int d, int off, int n, const float *p, float alpha, int w,
                       float *acc) {
    vf a[8];
    for (int c = 0; c < w; c++) a[c] = load(acc + off + 8 * c) * alpha;
    for (int j = 0; j < n; j++) {
        const vf x = splat(p[j]);
        const float *vj = V + (int64_t)j * d + off;
        for (int c = 0; c < w; c++) a[c] += x * load(vj + 8 * c);
    }
    for (int c = 0; c < w; c++) store(acc + off + 8 * c, a[c]);
}

/* Gemma 2's soft-cap of the scores s[0, sb) (prescaled), cap > 0: cap tanh(s / cap), as
 * |s| -> cap (1 - e) / (1 + e) with e = e^(-2 |s| / cap) from exp_neg, the sign of s kept
 * (kernels/position_attention.py: soft_cap). */
AI void cap_scores(float *s, int sb, float cap) {
    const vf c = splat(cap), k = splat(2.0f / cap);
    const vi sign = (vi){} + INT32_MIN;
    for (int j = 0; j < sb; j += 8) {
        const vf x = load(s + j);
        const vf neg_abs = (vf)((vi)x | sign);
        const vf e = exp_neg(neg_abs * k);
        const vf t = c * (1.0f - e) / (1.0f + e);
        store(s + j, (vf)((vi)t | ((vi)x & sign)));
    }
}

/* Fold one block's keys [0, n) (float rows K, V of head_dim = 8 nc floats, readable up to n
 * rounded up to 4) into the running (acc, m, l) of the nq queries at q (prescaled rows). S
 * holds nq score rows of sb >= that rounding (a multiple of 16). Always inlined, so a constant
 * nc (8 for head_dim 64, 16 for 128) unrolls the vector loops. */
AI void fold_block(const float *q, int nq, const float *K, const float *V, int n, int sb, int nc,
                   float cap, float *S, float *acc, float *m, float *l) {
    const int d = 8 * nc, n4 = (n + 3) & ~3;
    int i = 0;
    for (; i + 2 <= nq; i += 2) {
        float *s0 = S + (int64_t)i * sb, *s1 = s0 + sb;
        score_pair(q + (int64_t)i * d, q + (int64_t)(i + 1) * d, K, n4, nc, s0, s1);
        if (cap > 0.0f) {
            cap_scores(s0, sb, cap);
            cap_scores(s1, sb, cap);
        }
        for (int j = n; j < sb; j++) s0[j] = s1[j] = -INFINITY;
        const float al0 = softmax_block(s0, sb, m + i, l + i);
        const float al1 = softmax_block(s1, sb, m + i + 1, l + i + 1);
        float *a0 = acc + (int64_t)i * d, *a1 = a0 + d;
        int off = 0;
        for (; off + 32 <= d; off += 32)
            accumulate_pair(V, d, off, n, s0, s1, al0, al1, 4, a0, a1);
        if (off < d) accumulate_pair(V, d, off, n, s0, s1, al0, al1, 2, a0, a1);
    }
    if (i < nq) {
        float *s0 = S + (int64_t)i * sb;
        score_one(q + (int64_t)i * d, K, n4, nc, s0);
        if (cap > 0.0f) cap_scores(s0, sb, cap);
        for (int j = n; j < sb; j++) s0[j] = -INFINITY;
        const float al = softmax_block(s0, sb, m + i, l + i);
        float *a0 = acc + (int64_t)i * d;
        int off = 0;
        for (; off + 64 <= d; off += 64) accumulate_one(V, d, off, n, s0, al, 8, a0);
        if (off < d) accumulate_one(V, d, off, n, s0, al, (d - off) / 8, a0);
    }
}

/* A cache row as float into buf, eight lanes at a time (d is a multiple of 16): float32 copied
 * (a vector loop, not a call to memcpy), bfloat16 widened, int8 / int4 codes dequantized as
 * code * scale + zero with the row's (scale, zero) at `params` (kernels/kv_quant.py). */
AI void load_row(const char *src, const float *params, int kind, int d, float *buf) {
    if (kind == DT_F32) {
        for (int c = 0; c < d; c += 8) store(buf + c, load((const float *)src + c));
    } else if (kind == DT_BF16) {
        for (int c = 0; c < d; c += 8)
            store(buf + c, (vf)(widen_u16((const uint16_t *)src + c) << 16));
    } else if (kind == KV_INT8) {
        const vf scale = splat(params[0]), zero = splat(params[1]);
        for (int c = 0; c < d; c += 8)
            store(buf + c, __builtin_convertvector(widen_u8((const uint8_t *)src + c), vf) * scale +
                               zero);
    } else {
        const vf scale = splat(params[0]), zero = splat(params[1]);
        const int h = d / 2;
        for (int c = 0; c < h; c += 8) {
            const vi w = widen_u8((const uint8_t *)src + c);
            store(buf + c, __builtin_convertvector(w & 15, vf) * scale + zero);
            store(buf + h + c, __builtin_convertvector(w >> 4, vf) * scale + zero);
        }
    }
}

/* Rows [0, n) of one cache block (all kv heads; byte strides slot_b / head_b, parameter strides
 * p_slot / p_head) in address order (a slot holds all its heads together), converted to float
 * rows grouped by kv head (bs4 rows apart): one sequential pass over the block that the
 * hardware prefetcher follows, whatever its place in the cache. Always inlined, so that a
 * constant d unrolls the row loops. */
AI void convert_block(const char *kblk, const char *vblk, const float *kp, const float *vp,
                      int64_t slot_b, int64_t head_b, int64_t p_slot, int64_t p_head, int n,
                      int kv_heads, int kind, int d, int bs4, float *kbuf, float *vbuf) {
#define DR_CONVERT_ROWS(KIND)                                                                    \
    for (int j = 0; j < n; j++)                                                                  \
        for (int h = 0; h < kv_heads; h++) {                                                     \
            const int64_t row = j * slot_b + h * head_b, prow = j * p_slot + h * p_head;         \
            const int64_t at = ((int64_t)h * bs4 + j) * d;                                       \
            load_row(kblk + row, kp ? kp + prow : NULL, KIND, d, kbuf + at);                     \
            load_row(vblk + row, vp ? vp + prow : NULL, KIND, d, vbuf + at);                     \
        }
    /* One loop per kind, so that load_row's branch on it goes. */
    switch (kind) {
    case DT_F32: DR_CONVERT_ROWS(DT_F32) break;
    case DT_BF16: DR_CONVERT_ROWS(DT_BF16) break;
    case KV_INT8: DR_CONVERT_ROWS(KV_INT8) break;
    default: DR_CONVERT_ROWS(KV_INT4) break;
    }
#undef DR_CONVERT_ROWS
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
    int64_t kp_block, int64_t kp_slot, int64_t kp_head, int64_t window, float softcap) {
    const int d = head_dim, nq = rows * group, bs = block_size, nc = head_dim / 8;
    if (head_dim % 16 || head_dim > 256) return 2;
    if (window < 0 || (window > 0 && rows > 1)) return 4;
    if (!(softcap >= 0.0f)) return 5;
    const int sb = (block_size + 15) / 16 * 16; /* a score row, whole vectors */
    const int bs4 = (block_size + 3) & ~3;     /* rows per kv head in a converted block */
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
    /* Bytes per cache element (strides count elements of the cache tensor). */
    const int64_t kv_esize = kv_kind == DT_F32 ? 4 : kv_kind == DT_BF16 ? 2 : 1;
    const int64_t part = (int64_t)nq * (d + 2); /* acc (nq, d), m (nq), l (nq) per item */
    /* One item per (sequence, split) takes every kv head, so that it walks whole cache blocks
     * (all heads of a slot lie together) in address order. Its partial results for kv head h
     * sit at work + ((seq * kv_heads + h) * splits + split) * part. */
    const int64_t items = (int64_t)num_seqs * splits;
    const int quant = kv_kind == KV_INT8 || kv_kind == KV_INT4;
    const char *qb = (const char *)q, *kb = (const char *)k_cache, *vb = (const char *)v_cache;
    int failed = 0;

#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        const size_t qn = (size_t)kv_heads * nq * d;
        const size_t sn = (size_t)nq * sb; /* a score row per query */
        /* A block's K and V as float rows, kv head by kv head (bs4 rows each: the score tile
         * reads up to a multiple of four; zeroed, so rows past a short block hold numbers). */
        const size_t bn = (size_t)kv_heads * bs4 * d;
        float *qf = malloc(sizeof(float) * (qn + sn));
        float *kbuf = calloc(2 * bn, sizeof(float)), *vbuf = kbuf + bn;
        if (!qf || !kbuf) failed = 1;
        float *s = qf + qn;

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
            /* The first key the query sees, and the blocks from the one holding it on. */
            const int64_t start = window > 0 && ctx > window ? ctx - window : 0;
            const int64_t nblk = (ctx + bs - 1) / bs, first = start / bs;
            const int64_t blk0 = first + split * blocks_per_split;
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
                /* Slots [lo, lo + n) of the block: lo skips the first block's slots before
                 * the window, n stops the last block at the context's end. */
                const int64_t lo = blk == first ? start - blk * bs : 0, left = ctx - blk * bs;
                const int n = (int)((left < bs ? left : bs) - lo);
                const int64_t row0 = block * kc_block + lo * kc_slot;
                const char *kblk = kb + row0 * kv_esize, *vblk = vb + row0 * kv_esize;
                const int64_t prow0 = block * kp_block + lo * kp_slot;
                const float *kpb = quant ? k_params + prow0 : NULL;
                const float *vpb = quant ? v_params + prow0 : NULL;
                if (d == 64)
                    convert_block(kblk, vblk, kpb, vpb, kc_slot * kv_esize, kc_head * kv_esize,
                                  kp_slot, kp_head, n, kv_heads, kv_kind, 64, bs4, kbuf, vbuf);
                else if (d == 128)
                    convert_block(kblk, vblk, kpb, vpb, kc_slot * kv_esize, kc_head * kv_esize,
                                  kp_slot, kp_head, n, kv_heads, kv_kind, 128, bs4, kbuf, vbuf);
                else
                    convert_block(kblk, vblk, kpb, vpb, kc_slot * kv_esize, kc_head * kv_esize,
                                  kp_slot, kp_head, n, kv_heads, kv_kind, d, bs4, kbuf, vbuf);
                for (int kvh = 0; kvh < kv_heads; kvh++) {
                    float *acc = work + ((seq * kv_heads + kvh) * splits + split) * part;
                    float *m = acc + (int64_t)nq * d, *l = m + nq;
                    const float *qh = qf + (int64_t)kvh * nq * d;
                    const int64_t at = (int64_t)kvh * bs4 * d;
                    const float *K = kbuf + at, *V = vbuf + at;
                    if (nc == 8)
                        fold_block(qh, nq, K, V, n, sb, 8, softcap, s, acc, m, l);
                    else if (nc == 16)
                        fold_block(qh, nq, K, V, n, sb, 16, softcap, s, acc, m, l);
                    else
                        fold_block(qh, nq, K, V, n, sb, nc, softcap, s, acc, m, l);
                }
            }
        }
        free(qf);
        free(kbuf);
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

/* x (d floats) as `bits` (8 or 4) codes and its (scale, zero), exactly as quantize_kv_ref does
 * in fp32: zero = min x, scale = (max x - zero) / (2^bits - 1) (1 when that is 0), code =
 * clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1) with an IEEE division; int4 packs
 * element i in the low nibble of byte i and element i + d/2 in its high nibble. */
static void quantize_row(const float *x, int d, int bits, uint8_t *codes, float *params) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < d; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float qmax = (float)((1 << bits) - 1);
    float scale = (hi - lo) / qmax;
    if (scale == 0.0f) scale = 1.0f;
    uint8_t c[512];
    for (int i = 0; i < d; i++) {
        float y = floorf((x[i] - lo) / scale + 0.5f);
        y = y < 0.0f ? 0.0f : y > qmax ? qmax : y;
        c[i] = (uint8_t)y;
    }
    if (bits == 8) {
        memcpy(codes, c, d);
    } else {
        const int h = d / 2;
        for (int i = 0; i < h; i++) codes[i] = (uint8_t)(c[i] | c[i + h] << 4);
    }
    params[0] = scale;
    params[1] = lo;
}

/* RoPE on q and k in place (cos / sin: (tokens, head_dim) float32 rows), then k and v written
 * to their cache slots (slot < 0: not written), for float32 / bfloat16 tensors. bits 0: caches of
 * the same dtype; bits 8 / 4: uint8 code caches, each head vector quantized (from k as rotated
 * and rounded to its dtype, as the reference stores it) with its (scale, zero) written to
 * k_params / v_params. Strides in elements. */
void dr_rope_store(char *q, int64_t q_tok, int64_t q_head, char *k, int64_t k_tok,
                   int64_t k_head, const char *v, int64_t v_tok, int64_t v_head, const float *cos,
                   const float *sin, char *k_cache, char *v_cache, int64_t kc_block,
                   int64_t kc_slot, int64_t kc_head, const int64_t *slots, int tokens, int q_heads,
                   int kv_heads, int d, int block_size, int dtype, int num_threads, int bits,
                   float *k_params, float *v_params, int64_t kp_block, int64_t kp_slot,
                   int64_t kp_head) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
#pragma omp parallel for num_threads(num_threads) if (tokens >= 64) schedule(static)
    for (int t = 0; t < tokens; t++) {
        float buf[512];
        const float *c = cos + (int64_t)t * d, *s = sin + (int64_t)t * d;
        rotate_heads(q + t * q_tok * esize, q_head, q_heads, d, dtype, c, s, buf);
        rotate_heads(k + t * k_tok * esize, k_head, kv_heads, d, dtype, c, s, buf);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const int64_t block = slot / block_size, at = slot % block_size;
        const int64_t base = block * kc_block + at * kc_slot;
        for (int h = 0; h < kv_heads; h++) {
            const char *kr = k + (t * k_tok + h * k_head) * esize;
            const char *vr = v + (t * v_tok + h * v_head) * esize;
            if (bits == 0) {
                memcpy(k_cache + (base + h * kc_head) * esize, kr, d * esize);
                memcpy(v_cache + (base + h * kc_head) * esize, vr, d * esize);
                continue;
            }
            const int64_t p = block * kp_block + at * kp_slot + h * kp_head;
            uint8_t *kc = (uint8_t *)k_cache + base + h * kc_head;
            uint8_t *vc = (uint8_t *)v_cache + base + h * kc_head;
            quantize_row(as_f32(kr, dtype, d, buf), d, bits, kc, k_params + p);
            quantize_row(as_f32(vr, dtype, d, buf), d, bits, vc, v_params + p);
        }
    }
}
