/* A decode step's decoder layers on CPU in one call, float32.
 *
 * Layer by layer from Python, a decode step makes nine kernel calls per layer (two RMSNorms,
 * four linear layers, RoPE + KV store, attention, SiLU-and-mul) and as many rounds of argument
 * checks, output allocations, views and module dispatch around them; at decode sizes that glue
 * costs about as much as the kernels' own work. Here the same kernels run in the same order on
 * the same inputs from C, over buffers the caller allocates once per step, so the results are
 * the layer-by-layer path's bit for bit (the one exception: a batch over a shared prefix merges
 * its two attention partials here, in float32, where the layer path merges them with torch).
 *
 * Work is cut into stages: stage 2l is layer l's attention half (norm, qkv, RoPE + store,
 * attention, o_proj), stage 2l + 1 its MLP half (norm, gate_up, SiLU- or GELU-and-mul, down),
 * stage 2 * num_layers the final norm. Gemma's norm of a half's output is the next stage's
 * first step, so that under tensor parallelism it norms the reduced sum. Each half leaves its output in x (partial sums under tensor
 * parallelism: the caller all-reduces x between stages); the residual stream lives in
 * `residual`; the final norm leaves the hidden states in h. One call may run many stages
 * (all of them when nothing is reduced in between).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define DT_F32 0

/* The model's shapes and the KV cache's layout, fixed for its life (this rank's shard). */
struct dr_decoder {
    int64_t num_layers, hidden, q_heads, kv_heads, head_dim, inter;
    int64_t block_size, kc_block, kc_slot, kc_head; /* cache strides, in elements */
    int64_t kp_block, kp_slot, kp_head;             /* (scale, zero) strides, in floats */
    int64_t bits;                                   /* 0: float32 cache; 8 / 4: codes */
    float eps, scale;
    const float *final_norm;
    int64_t act;   /* the MLP's activation: 0 SiLU, 1 GELU's tanh form (Gemma) */
    float softcap; /* the attention scores' soft-cap (Gemma 2), 0: none */
};

/* One layer's weights (linear ones panel-packed, see cpu_gemm.c; biases may be NULL; q_norm and
 * k_norm, Qwen3's per-head RMSNorm weights of head_dim, NULL for other models) and
 * cache, and its LoRA stacks per linear layer (qkv, o, gate_up, down; NULL: not adapted) from
 * workers/lora.py: A (slots, rank, in) and B by rows (slots, rank, out), the scale folded into
 * B, slot 0 the base model (zeros). */
struct dr_decoder_layer {
    const float *input_norm, *post_norm;
    const float *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
    char *k_cache, *v_cache;
    float *k_params, *v_params;
    const float *q_norm, *k_norm;
    const float *lora_a[4], *lora_b[4];
    int64_t lora_rank[4];
    /* Gemma's norms of the attention's and the MLP's outputs (after the all-reduce, before the
     * residual add; NULL: none), and whether RoPE turns this layer's q and k by the step's
     * local tables (Gemma 3's sliding-window layers, their own base). */
    const float *attn_out_norm, *mlp_out_norm;
    int64_t local_rope;
};

enum { LORA_QKV, LORA_O, LORA_GATE_UP, LORA_DOWN };

/* One step: `tokens` sequences with one new token each, and the buffers it runs over. */
struct dr_decode_step {
    int64_t tokens, num_threads;
    const float *cos, *sin; /* (tokens, head_dim) */
    const int64_t *slots;   /* (tokens,) cache slot of each new token */
    const void *block_tables;
    int64_t bt_int64, bt_stride;
    const int64_t *context_lens;
    int64_t splits, per; /* the attention's split plan */
    /* A batch over a shared cached prefix (shared_blocks > 0): the prefix is read once for
     * every query (prefix_len keys, its own split plan) and each sequence's tail on its own
     * (tail_lens keys from block shared_blocks on), then merged by log-sum-exp. */
    int64_t shared_blocks;
    const int64_t *prefix_len, *tail_lens;
    int64_t prefix_splits, prefix_per;
    /* Sliding windows (NULL: no layer's hides a key of this step): per layer (window, splits,
     * per), a window shorter than the longest context and the split plan over the sequences'
     * windows, which that layer attends within (never over the shared prefix); (0, 0, 0): the
     * layer sees every key, through the plans above. */
    const int64_t *windows;
    float *x;        /* (tokens, hidden): the stage input, then its output */
    float *residual; /* (tokens, hidden) */
    float *h;        /* (tokens, hidden): the normed input; the final hidden states */
    float *qkv;      /* (tokens, q + 2 kv) */
    float *attn;     /* (tokens, q) */
    float *gate_up;  /* (tokens, 2 inter) */
    float *act;      /* (tokens, inter) */
    float *work;     /* attention scratch, for the largest of its calls */
    float *tail_out, *tail_lse, *prefix_lse; /* shared prefix only */
    const int64_t *lora_slots; /* (tokens,) each sequence's adapter slot; NULL: no adapters */
    float *lora_h;             /* (tokens, the largest rank) */
    const float *local_cos, *local_sin; /* (tokens, head_dim), for layers with local_rope */
};

#define LORA_PARALLEL_MIN 32768

static inline float dot(const float *a, const float *b, int64_t n) {
    vf acc = splat(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += load(a + i) * load(b + i);
    float r = hsum(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* out[t] += B[s] (A[s] x[t]) for every sequence t whose adapter slot s is not 0, as the layer
 * path's LinearLora adds it after the linear layer (and its bias); under tensor parallelism to
 * this rank's partial sums of a row-parallel layer, before the all-reduce. h = A x is a dot
 * product per rank; B h adds each rank's row of B, scaled, over the outputs, in chunks. */
static void lora_add(const struct dr_decoder_layer *L, int which, const struct dr_decode_step *s,
                     const float *x, int64_t K, float *out, int64_t N) {
    const float *A = L->lora_a[which], *B = L->lora_b[which];
    const int64_t T = s->tokens, R = L->lora_rank[which];
    if (!s->lora_slots || !A || !B || R <= 0) return;
    const int nt = (int)s->num_threads;
    const int64_t *slots = s->lora_slots;
    float *h = s->lora_h;
#pragma omp parallel for collapse(2) num_threads(nt) if (T * R * K >= LORA_PARALLEL_MIN) \
    schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t t = 0; t < T; t++)
            h[t * R + r] = slots[t] ? dot(A + (slots[t] * R + r) * K, x + t * K, K) : 0.0f;
    const int64_t chunk = 256;
#pragma omp parallel for num_threads(nt) if (T * R * N >= LORA_PARALLEL_MIN) schedule(static)
    for (int64_t c = 0; c < N; c += chunk) {
        const int64_t end = c + chunk < N ? c + chunk : N;
        for (int64_t t = 0; t < T; t++) {
            if (!slots[t]) continue;
            float *o = out + t * N;
            const float *ht = h + t * R, *b = B + slots[t] * R * N;
            int64_t j = c;
            for (; j + 8 <= end; j += 8) { /* each output read and written once */
                vf acc = load(o + j);
                for (int64_t r = 0; r < R; r++) acc += splat(ht[r]) * load(b + r * N + j);
                store(o + j, acc);
            }
            for (; j < end; j++) {
                float acc = o[j];
                for (int64_t r = 0; r < R; r++) acc += ht[r] * b[r * N + j];
                o[j] = acc;
            }
        }
    }
}

/* h = norm(x + residual) and residual = x + residual; stage 0 has no residual yet, so the
 * residual becomes x itself, as the layer path's first norm returns it. out_w: the norm of the
 * previous half's output (Gemma's), applied to x first, in place (NULL: none). */
static void norm_in(const struct dr_decoder *m, const float *w, const struct dr_decode_step *s,
                    int first, const float *out_w) {
    const int64_t T = s->tokens, H = m->hidden;
    const int nt = (int)s->num_threads;
    if (out_w) dr_rms_norm(s->x, H, NULL, 0, NULL, 0, s->x, H, out_w, T, H, m->eps, nt);
    if (first) {
        memcpy(s->residual, s->x, sizeof(float) * T * H);
        dr_rms_norm(s->residual, H, NULL, 0, NULL, 0, s->h, H, w, T, H, m->eps, nt);
    } else {
        dr_rms_norm(s->x, H, s->residual, H, s->residual, H, s->h, H, w, T, H, m->eps, nt);
    }
}

/* out = o_a w_a + o_b w_b with w = e^(lse - logaddexp(lse_a, lse_b)); a side with lse -inf
 * weighs nothing and a head neither side saw stays 0 (kernels/position_attention.py:
 * merge_pair). */
static void merge_pair(float *o_a, const float *l_a, const float *o_b, const float *l_b,
                       int64_t heads, int64_t d) {
    for (int64_t i = 0; i < heads; i++) {
        const float a = l_a[i], b = l_b[i];
        const float mx = a > b ? a : b;
        float s = mx;
        if (mx != -INFINITY && a != b) s = mx + log1pf(expf(-fabsf(a - b)));
        const float shift = s == -INFINITY ? 0.0f : s;
        const float wa = expf(a - shift), wb = expf(b - shift);
        float *oa = o_a + i * d;
        const float *ob = o_b + i * d;
        for (int64_t e = 0; e < d; e++) oa[e] = oa[e] * wa + ob[e] * wb;
    }
}

static int attend(const struct dr_decoder *m, const struct dr_decoder_layer *L,
                  const struct dr_decode_step *s, int64_t layer) {
    const int64_t T = s->tokens, d = m->head_dim;
    const int64_t q_size = m->q_heads * d, qkv_n = q_size + 2 * m->kv_heads * d;
    const int group = (int)(m->q_heads / m->kv_heads), nt = (int)s->num_threads;
    const int kind = m->bits ? (int)m->bits : DT_F32;
    const int64_t *w = s->windows ? s->windows + 3 * layer : NULL;
    if (w && w[0] > 0) /* each sequence's window on its own */
        return dr_paged_decode(
            s->qkv, qkv_n, qkv_n, d, L->k_cache, L->v_cache, m->kc_block, m->kc_slot,
            m->kc_head, s->block_tables, (int)s->bt_int64, s->bt_stride, s->context_lens,
            s->attn, q_size, q_size, d, NULL, 0, 0, (int)T, 1, (int)m->kv_heads, group, (int)d,
            (int)m->block_size, m->scale, DT_F32, (int)w[1], w[2], nt, s->work, kind,
            L->k_params, L->v_params, m->kp_block, m->kp_slot, m->kp_head, w[0], m->softcap);
    if (!s->shared_blocks)
        return dr_paged_decode(
            s->qkv, qkv_n, qkv_n, d, L->k_cache, L->v_cache, m->kc_block, m->kc_slot,
            m->kc_head, s->block_tables, (int)s->bt_int64, s->bt_stride, s->context_lens,
            s->attn, q_size, q_size, d, NULL, 0, 0, (int)T, 1, (int)m->kv_heads, group, (int)d,
            (int)m->block_size, m->scale, DT_F32, (int)s->splits, s->per, nt, s->work, kind,
            L->k_params, L->v_params, m->kp_block, m->kp_slot, m->kp_head, 0, m->softcap);
    /* The prefix: one table row, every sequence's query a row over it. */
    int rc = dr_paged_decode(
        s->qkv, 0, qkv_n, d, L->k_cache, L->v_cache, m->kc_block, m->kc_slot, m->kc_head,
        s->block_tables, (int)s->bt_int64, s->bt_stride, s->prefix_len, s->attn, 0, q_size, d,
        s->prefix_lse, 0, m->q_heads, 1, (int)T, (int)m->kv_heads, group, (int)d,
        (int)m->block_size, m->scale, DT_F32, (int)s->prefix_splits, s->prefix_per, nt, s->work,
        kind, L->k_params, L->v_params, m->kp_block, m->kp_slot, m->kp_head, 0, m->softcap);
    if (rc) return rc;
    const char *tail_table =
        (const char *)s->block_tables + s->shared_blocks * (s->bt_int64 ? 8 : 4);
    rc = dr_paged_decode(
        s->qkv, qkv_n, qkv_n, d, L->k_cache, L->v_cache, m->kc_block, m->kc_slot, m->kc_head,
        tail_table, (int)s->bt_int64, s->bt_stride, s->tail_lens, s->tail_out, q_size, q_size,
        d, s->tail_lse, m->q_heads, m->q_heads, (int)T, 1, (int)m->kv_heads, group, (int)d,
        (int)m->block_size, m->scale, DT_F32, (int)s->splits, s->per, nt, s->work, kind,
        L->k_params, L->v_params, m->kp_block, m->kp_slot, m->kp_head, 0, m->softcap);
    if (rc) return rc;
    merge_pair(s->attn, s->prefix_lse, s->tail_out, s->tail_lse, T * m->q_heads, d);
    return 0;
}

static int attention_half(const struct dr_decoder *m, const struct dr_decoder_layer *L,
                          const struct dr_decode_step *s, int64_t layer, const float *out_w) {
    const int64_t T = s->tokens, H = m->hidden, d = m->head_dim;
    const int64_t q_size = m->q_heads * d, kv_size = m->kv_heads * d;
    const int64_t qkv_n = q_size + 2 * kv_size;
    const int nt = (int)s->num_threads;
    norm_in(m, L->input_norm, s, layer == 0, out_w);
    dr_linear(s->h, T, H, L->qkv, qkv_n, L->qkv_bias, s->qkv, nt);
    lora_add(L, LORA_QKV, s, s->h, H, s->qkv, qkv_n);
    if (L->q_norm && L->k_norm) /* each q and k head normed over head_dim, in place */
        for (int64_t t = 0; t < T; t++) {
            float *qt = s->qkv + t * qkv_n, *kt = qt + q_size;
            dr_rms_norm(qt, d, NULL, 0, NULL, 0, qt, d, L->q_norm, m->q_heads, d, m->eps, nt);
            dr_rms_norm(kt, d, NULL, 0, NULL, 0, kt, d, L->k_norm, m->kv_heads, d, m->eps, nt);
        }
    char *q = (char *)s->qkv, *k = (char *)(s->qkv + q_size), *v = (char *)(s->qkv + q_size + kv_size);
    const float *cos = L->local_rope ? s->local_cos : s->cos;
    const float *sin = L->local_rope ? s->local_sin : s->sin;
    dr_rope_store(q, qkv_n, d, k, qkv_n, d, v, qkv_n, d, cos, sin, L->k_cache, L->v_cache,
                  m->kc_block, m->kc_slot, m->kc_head, s->slots, (int)T, (int)m->q_heads,
                  (int)m->kv_heads, (int)d, (int)m->block_size, DT_F32, nt, (int)m->bits,
                  L->k_params, L->v_params, m->kp_block, m->kp_slot, m->kp_head);
    const int rc = attend(m, L, s, layer);
    if (rc) return rc;
    dr_linear(s->attn, T, q_size, L->o, H, L->o_bias, s->x, nt);
    lora_add(L, LORA_O, s, s->attn, q_size, s->x, H);
    return 0;
}

static void mlp_half(const struct dr_decoder *m, const struct dr_decoder_layer *L,
                     const struct dr_decode_step *s) {
    const int64_t T = s->tokens, H = m->hidden, I = m->inter;
    const int nt = (int)s->num_threads;
    norm_in(m, L->post_norm, s, 0, L->attn_out_norm);
    dr_linear(s->h, T, H, L->gate_up, 2 * I, L->gate_up_bias, s->gate_up, nt);
    lora_add(L, LORA_GATE_UP, s, s->h, H, s->gate_up, 2 * I);
    dr_act_and_mul(s->gate_up, 2 * I, s->act, I, T, I, (int)m->act, nt);
    dr_linear(s->act, T, I, L->down, H, L->down_bias, s->x, nt);
    lora_add(L, LORA_DOWN, s, s->act, I, s->x, H);
}

/* Run stages [first, last); returns 0, or dr_paged_decode's code (1: no scratch memory,
 * 2: a head_dim it does not take, 4: a window it does not take), or 3 for a stage out of
 * range. */
int dr_decoder_stages(const struct dr_decoder *m, const struct dr_decoder_layer *layers,
                      const struct dr_decode_step *s, int64_t first, int64_t last) {
    if (first < 0 || last > 2 * m->num_layers + 1) return 3;
    for (int64_t stage = first; stage < last; stage++) {
        const int64_t layer = stage / 2;
        /* The norm of the previous half's output: the MLP's of the layer before. */
        const float *out_w = layer > 0 ? layers[layer - 1].mlp_out_norm : NULL;
        if (layer == m->num_layers) {
            if (out_w)
                dr_rms_norm(s->x, m->hidden, NULL, 0, NULL, 0, s->x, m->hidden, out_w, s->tokens,
                            m->hidden, m->eps, (int)s->num_threads);
            dr_rms_norm(s->x, m->hidden, s->residual, m->hidden, s->residual, m->hidden, s->h,
                        m->hidden, m->final_norm, s->tokens, m->hidden, m->eps,
                        (int)s->num_threads);
        } else if (stage % 2 == 0) {
            const int rc = attention_half(m, layers + layer, s, layer, out_w);
            if (rc) return rc;
        } else {
            mlp_half(m, layers + layer, s);
        }
    }
    return 0;
}
