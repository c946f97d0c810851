/* The native library's entry points, shared by its sources (each includes this header, so a
 * definition that drifts from its declaration does not compile) and mirrored by the ctypes
 * bindings in kernels/cpu_*.py. Strides are in elements. */
#ifndef DR_KERNELS_H
#define DR_KERNELS_H

#include <stdint.h>

/* cpu_elementwise.c */
void dr_rms_norm(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
                 float *h_out, int64_t h_stride, float *out, int64_t o_stride,
                 const float *weight, int64_t rows, int64_t hidden, float eps, int num_threads);
void dr_silu_and_mul(const float *x, int64_t x_stride, float *out, int64_t o_stride,
                     int64_t rows, int64_t inter, int num_threads);
void dr_act_and_mul(const float *x, int64_t x_stride, float *out, int64_t o_stride, int64_t rows,
                    int64_t inter, int act, int num_threads);

/* cpu_shm.c */
void dr_shm_attach(void *segment, int rank, int64_t pid);
int dr_shm_all_reduce(void *segment, int rank, int world, int64_t slot_bytes, int64_t *seq,
                      float *x, int64_t n, double timeout_s, int *peer);
int dr_shm_all_gather(void *segment, int rank, int world, int64_t slot_bytes, int64_t *seq,
                      const void *x, int64_t nbytes, void *out, double timeout_s, int *peer);

/* cpu_gemm.c */
void dr_linear(const float *x, int64_t M, int64_t K, const float *panels, int64_t N,
               const float *bias, float *y, int num_threads);

/* cpu_decode.c */
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
    int64_t kp_block, int64_t kp_slot, int64_t kp_head, int64_t window, float softcap);
void dr_rope_store(char *q, int64_t q_tok, int64_t q_head, char *k, int64_t k_tok,
                   int64_t k_head, const char *v, int64_t v_tok, int64_t v_head, const float *cos,
                   const float *sin, char *k_cache, char *v_cache, int64_t kc_block,
                   int64_t kc_slot, int64_t kc_head, const int64_t *slots, int tokens, int q_heads,
                   int kv_heads, int d, int block_size, int dtype, int num_threads, int bits,
                   float *k_params, float *v_params, int64_t kp_block, int64_t kp_slot,
                   int64_t kp_head);

/* cpu_decoder.c */
typedef struct dr_decoder dr_decoder;
typedef struct dr_decoder_layer dr_decoder_layer;
typedef struct dr_decode_step dr_decode_step;
int dr_decoder_stages(const dr_decoder *m, const dr_decoder_layer *layers,
                      const dr_decode_step *s, int64_t first, int64_t last);

#endif
