/* Linear layers on CPU: y[M][N] = x[M][K] . W^T (+ bias), float32, over a panel-packed weight.
 *
 * The weight [N][K] is packed once after loading into panels of 16 output columns, each
 * stored k-major: panels[p][k][j] = W[16p + j][k] (N padded to a multiple of 16 with zero
 * rows). A tile of up to 6 input rows x 16 outputs keeps its accumulators in registers and
 * streams its panel once, front to back: one 16-wide weight load, then a broadcast and a
 * multiply-add per row, for every k. Decode sizes (M of 1-16) read the weight at close to
 * the memory's sequential rate; prefill re-reads a panel from cache for every 6 rows.
 *
 * Threads: OpenMP over panels (PyTorch's own libgomp, see cpu_decode.c). Rows go in blocks of
 * ROW_BLOCK so a block's activations stay in L2 while every panel passes over them.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* Eight floats: one AVX2 register, two NEON ones (a 16-wide type spills on AVX2). */
typedef float vf8 __attribute__((vector_size(32)));

#define PANEL 16
#define ROW_BLOCK 96

static inline vf8 load8(const float *p) {
    vf8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline vf8 splat(float a) { return (vf8){a, a, a, a, a, a, a, a}; }

/* Store `cols` (<= 16) outputs of one row from its two halves, plus the bias if any. */
static inline void put(float *y, vf8 lo, vf8 hi, const float *bias, int cols) {
    float row[PANEL];
    memcpy(row, &lo, sizeof lo);
    memcpy(row + 8, &hi, sizeof hi);
    if (bias)
        for (int j = 0; j < cols; j++) row[j] += bias[j];
    memcpy(y, row, (size_t)cols * sizeof(float));
}

/* R rows (a compile-time count) x one panel: 2R accumulators held in registers. */
#define TILE(R)                                                                               \
    static void tile_##R(const float *x, int64_t ldx, const float *w, int64_t K, float *y,    \
                         int64_t ldy, const float *bias, int cols) {                          \
        vf8 acc[R][2];                                                                        \
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = splat(0.0f);                      \
        for (int64_t k = 0; k < K; k++) {                                                     \
            vf8 p = load8(w + PANEL * k), q = load8(w + PANEL * k + 8);                       \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                             \
                vf8 b = splat(x[r * ldx + k]);                                                \
                acc[r][0] += b * p;                                                           \
                acc[r][1] += b * q;                                                           \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < R; r++) put(y + r * ldy, acc[r][0], acc[r][1], bias, cols);       \
    }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

/* One row: four partial sums over k hide the multiply-add latency. */
static void tile_row(const float *x, const float *w, int64_t K, float *y, const float *bias,
                     int cols) {
    vf8 a0 = splat(0.0f), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const float *p = w + PANEL * k;
        vf8 s = splat(x[k]);
        a0 += s * load8(p), a1 += s * load8(p + 8);
        s = splat(x[k + 1]);
        b0 += s * load8(p + 16), b1 += s * load8(p + 24);
        s = splat(x[k + 2]);
        c0 += s * load8(p + 32), c1 += s * load8(p + 40);
        s = splat(x[k + 3]);
        d0 += s * load8(p + 48), d1 += s * load8(p + 56);
    }
    for (; k < K; k++) {
        vf8 s = splat(x[k]);
        a0 += s * load8(w + PANEL * k), a1 += s * load8(w + PANEL * k + 8);
    }
    put(y, (a0 + b0) + (c0 + d0), (a1 + b1) + (c1 + d1), bias, cols);
}

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t,
                        const float *, int);
static const tile_fn TILES[7] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

/* x: [M][K] (row stride K); panels: [ceil(N / 16)][K][16]; bias: [N] or NULL; y: [M][N]. */
void dr_linear(const float *x, int64_t M, int64_t K, const float *panels, int64_t N,
               const float *bias, float *y, int num_threads) {
    int64_t num_panels = (N + PANEL - 1) / PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        int64_t m1 = M - m0 < ROW_BLOCK ? M : m0 + ROW_BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < num_panels; p++) {
            const float *w = panels + p * K * PANEL;
            const float *b = bias ? bias + p * PANEL : NULL;
            int cols = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
            float *yp = y + p * PANEL;
            if (M == 1) {
                tile_row(x, w, K, yp, b, cols);
                continue;
            }
            int64_t m = m0;
            for (; m + 6 <= m1; m += 6) tile_6(x + m * K, K, w, K, yp + m * N, N, b, cols);
            if (m < m1) TILES[m1 - m](x + m * K, K, w, K, yp + m * N, N, b, cols);
        }
    }
}
