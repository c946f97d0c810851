/* A decoder layer's elementwise steps on CPU, float32: the residual add with RMSNorm, and the
 * MLP's act(gate) * up (SiLU, or GELU's tanh form), each one pass over its rows.
 *
 * As torch operators these are five to eight calls each (add, pow, mean, rsqrt, two products;
 * chunk, silu, product), every one a trip through memory at prefill sizes and a dispatch at
 * decode sizes. Rows are the leading dimension at any stride; the last one is contiguous.
 * Threads: OpenMP over rows once a call is large enough to pay for the fork (PyTorch's own
 * libgomp, see cpu_decode.c).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

/* Elements below which a call runs on the calling thread. */
#define PARALLEL_MIN 32768

/* h = x + residual, written to h_out (both NULL: h = x); out = weight * h / sqrt(mean(h^2) +
 * eps). Each row's sum of squares is accumulated in float32 over eight lanes, then added lane
 * by lane. */
void dr_rms_norm(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
                 float *h_out, int64_t h_stride, float *out, int64_t o_stride,
                 const float *weight, int64_t rows, int64_t hidden, float eps, int num_threads) {
    const int64_t vec = hidden / 8 * 8;
#pragma omp parallel for num_threads(num_threads) if (rows * hidden >= PARALLEL_MIN) \
    schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        const float *rr = residual ? residual + r * r_stride : NULL;
        float *hr = residual ? h_out + r * h_stride : NULL;
        float *orow = out + r * o_stride;
        vf acc = {};
        float tail = 0.0f;
        for (int64_t i = 0; i < vec; i += 8) {
            vf h = load(xr + i);
            if (rr) {
                h += load(rr + i);
                store(hr + i, h);
            }
            acc += h * h;
        }
        for (int64_t i = vec; i < hidden; i++) {
            const float h = rr ? xr[i] + rr[i] : xr[i];
            if (rr) hr[i] = h;
            tail += h * h;
        }
        const float inv = 1.0f / sqrtf((hsum(acc) + tail) / (float)hidden + eps);
        const float *h = rr ? hr : xr;
        const vf iv = splat(inv);
        for (int64_t i = 0; i < vec; i += 8) store(orow + i, load(weight + i) * (load(h + i) * iv));
        for (int64_t i = vec; i < hidden; i++) orow[i] = weight[i] * (h[i] * inv);
    }
}

/* out[r] = act(gate) * up for x[r] = [gate | up] of 2 * inter elements, act 0 SiLU, 1 GELU's
 * tanh form (`gelu_pytorch_tanh`). Both are g sigmoid(y): y = g for SiLU, and for GELU
 * y = 2 sqrt(2/pi) (g + 0.044715 g^3), since 0.5 (1 + tanh(z)) = sigmoid(2 z). sigmoid(y) =
 * 1 / (1 + e^-y), with e^-|y| from exp_neg (about 2 ulp) so that no exponent overflows:
 * y >= 0: 1 / (1 + e^-y); y < 0: e^y / (1 + e^y). */
#define GELU_K0 1.5957691216057308f /* 2 sqrt(2 / pi) */
#define GELU_K1 0.044715f

static inline float gelu_arg(float g) { return g * (GELU_K0 + GELU_K0 * GELU_K1 * g * g); }

void dr_act_and_mul(const float *x, int64_t x_stride, float *out, int64_t o_stride, int64_t rows,
                    int64_t inter, int act, int num_threads) {
    const int64_t vec = inter / 8 * 8;
#pragma omp parallel for num_threads(num_threads) if (rows * inter >= PARALLEL_MIN) \
    schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * x_stride, *u = g + inter;
        float *o = out + r * o_stride;
        for (int64_t i = 0; i < vec; i += 8) {
            const vf gv = load(g + i);
            const vf y = act ? gv * (GELU_K0 + GELU_K0 * GELU_K1 * gv * gv) : gv;
            const vi pos = y >= 0.0f;
            const vf neg_abs = (vf)((vi)y | ((vi){} + INT32_MIN)); /* -|y|: the sign bit set */
            const vf e = exp_neg(neg_abs);
            const vf num = (vf)(((vi)splat(1.0f) & pos) | ((vi)e & ~pos));
            store(o + i, gv * load(u + i) * num / (1.0f + e));
        }
        for (int64_t i = vec; i < inter; i++) {
            const float y = act ? gelu_arg(g[i]) : g[i];
            const float e = expf(-fabsf(y));
            o[i] = g[i] * u[i] * (y >= 0.0f ? 1.0f : e) / (1.0f + e);
        }
    }
}

void dr_silu_and_mul(const float *x, int64_t x_stride, float *out, int64_t o_stride,
                     int64_t rows, int64_t inter, int num_threads) {
    dr_act_and_mul(x, x_stride, out, o_stride, rows, inter, 0, num_threads);
}
