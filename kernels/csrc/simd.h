/* Eight-float vectors and the helpers the native CPU kernels share (GCC / Clang vector
 * extensions: one AVX2 register, two NEON ones, whatever -march the library is built for). */
#ifndef DR_SIMD_H
#define DR_SIMD_H

#include <stdint.h>
#include <string.h>

/* 8 floats: one AVX2 register, two NEON ones. Wider vectors spill on AVX2, whose 16 registers
 * must hold a query row's accumulators. */
typedef float vf __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(32)));

static inline vf load(const float *p) {
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, vf x) { memcpy(p, &x, sizeof x); }

/* x in every lane (one vbroadcastss; adding x to a zero vector would also turn -0 into +0). */
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }

/* Lane sums of four vectors: (sum a, sum b, sum c, sum d), pairwise adds as AVX's hadd does. */
static inline vf4 hsum4(vf a, vf b, vf c, vf d) {
    const vf ab = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
                  __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    const vf cd = __builtin_shufflevector(c, d, 0, 2, 8, 10, 4, 6, 12, 14) +
                  __builtin_shufflevector(c, d, 1, 3, 9, 11, 5, 7, 13, 15);
    const vf h = __builtin_shufflevector(ab, cd, 0, 2, 8, 10, 4, 6, 12, 14) +
                 __builtin_shufflevector(ab, cd, 1, 3, 9, 11, 5, 7, 13, 15);
    return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
}

static inline float hsum(vf x) {
    const vf4 q = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* Eight bytes / eight uint16 at p, zero-extended to int32 lanes: one vpmovzx on AVX2 (GCC's
 * generic __builtin_convertvector from narrow lanes goes through scalar inserts). */
#if defined(__AVX2__)
#include <immintrin.h>
static inline vi widen_u8(const uint8_t *p) {
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
static inline vi widen_u16(const uint16_t *p) {
    return (vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
}
#else
static inline vi widen_u8(const uint8_t *p) {
    vi r;
    for (int i = 0; i < 8; i++) r[i] = p[i];
    return r;
}
static inline vi widen_u16(const uint16_t *p) {
    vi r;
    for (int i = 0; i < 8; i++) r[i] = p[i];
    return r;
}
#endif

static inline vf vmax(vf a, vf b) {
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

static inline float hmax(vf x) {
    float r = x[0];
    for (int i = 1; i < 8; i++) r = x[i] > r ? x[i] : r;
    return r;
}

/* exp(x) for x <= 0 (scores minus their running max), lane by lane: Cephes' expf polynomial on
 * [-ln2/2, ln2/2] after x = n ln2 + r, about 2 ulp. Below -87 (past float's normal range, and
 * -inf) it is 0: such a term is at most 1.6e-38 of the row's largest one, which is 1. */
static inline vf exp_neg(vf x) {
    const vi keep = x >= -87.0f;
    x = (vf)(((vi)x & keep) | ((vi)splat(-87.0f) & ~keep));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & keep);
}

#endif
