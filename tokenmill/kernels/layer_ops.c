/* The elementwise pieces of a decoder layer, float32, for x86-64 CPUs with AVX2 and FMA: residual add with
 * RMSNorm, rotary embedding, SiLU-and-multiply.
 *
 * Each is one call where torch runs four to ten small operators: at decode, where a step carries one token
 * per sequence, those operators cost far more in dispatch than in arithmetic. Rows (tokens) are split over
 * the OpenMP threads only when there are enough of them to pay for waking the threads.
 *
 * The rotary embedding rounds exactly as the torch expression it replaces (x * cos + rotate_half(x) * sin:
 * two products and a sum, each rounded; the library is built with -ffp-contract=off so no product is fused
 * into an addition). The norm and the activation sum and exponentiate in their own order, so their results
 * differ from torch's in the last bits. Part of kernels.c, like int8_linear.c.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#define PARALLEL_ROWS 32 /* fewer rows run on the calling thread: an OpenMP fork costs more than they do */

/* residual_out = x + residual (when residual is not NULL), then out = weight * r / sqrt(mean(r^2) + eps)
 * for each of the M rows r of length D. D must be a multiple of 8. */
void tm_rms_norm(const float* x, const float* residual, float* residual_out, const float* weight, float* out,
                 int64_t M, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        const float* row = x + m * D;
        if (residual != NULL) {
            float* summed = residual_out + m * D;
            for (int64_t i = 0; i < D; i += 8)
                _mm256_storeu_ps(summed + i, _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(residual + m * D + i)));
            row = summed;
        }
        __m256 squares = _mm256_setzero_ps();
        for (int64_t i = 0; i < D; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        const __m256 inv_rms = _mm256_set1_ps(1.0f / sqrtf(hsum(squares) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 8) {
            __m256 normed = _mm256_mul_ps(_mm256_loadu_ps(row + i), inv_rms);
            _mm256_storeu_ps(out + m * D + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), normed));
        }
    }
}

/* Rotary embedding, rotate-half layout: out[m, h] = x[m, h] * cos[m] + rotate_half(x[m, h]) * sin[m], where
 * rotate_half(v) = (-v[D/2:], v[:D/2]). x is [M, H, D] with rows x_stride floats apart (heads contiguous),
 * out [M, H, D] contiguous, cos and sin [M, D]. */
void tm_rotary(const float* x, int64_t x_stride, float* out, const float* cos, const float* sin, int64_t M,
               int64_t H, int64_t D) {
    const int64_t half = D / 2, vector_end = half - half % 8;
#pragma omp parallel for schedule(static) if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos + m * D, *s = sin + m * D;
        for (int64_t h = 0; h < H; h++) {
            const float* v = x + m * x_stride + h * D;
            float* o = out + (m * H + h) * D;
            int64_t i = 0;
            for (; i < vector_end; i += 8) {
                __m256 lo = _mm256_loadu_ps(v + i), hi = _mm256_loadu_ps(v + half + i);
                __m256 lo_out = _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + i)),
                                              _mm256_mul_ps(hi, _mm256_loadu_ps(s + i)));
                __m256 hi_out = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + i)),
                                              _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + i)));
                _mm256_storeu_ps(o + i, lo_out);
                _mm256_storeu_ps(o + half + i, hi_out);
            }
            for (; i < half; i++) {
                o[i] = v[i] * c[i] - v[half + i] * s[i];
                o[half + i] = v[half + i] * c[half + i] + v[i] * s[half + i];
            }
        }
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* out[m, i] = silu(x[m, i]) * x[m, D + i]: x is [M, 2D] laid out [gate | up], out [M, D]. */
void tm_silu_and_mul(const float* x, float* out, int64_t M, int64_t D) {
    const int64_t vector_end = D - D % 8;
#pragma omp parallel for schedule(static) if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        const float *gate = x + m * 2 * D, *up = gate + D;
        float* o = out + m * D;
        int64_t i = 0;
        for (; i < vector_end; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, denominator), _mm256_loadu_ps(up + i)));
        }
        for (; i < D; i++) o[i] = silu(gate[i]) * up[i];
    }
}

/* The first index of row r's maximum, NaN counting as the greatest (the first NaN wins): torch.argmax. */
static int64_t argmax_row(const float* r, int64_t D) {
    __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
        const __m256 v = _mm256_loadu_ps(r + i);
        best = _mm256_max_ps(best, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, best);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    int has_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t j = i; j < D; j++) {
        has_nan |= r[j] != r[j];
        top = r[j] > top ? r[j] : top;
    }
    if (has_nan) {
        for (int64_t j = 0; j < D; j++)
            if (r[j] != r[j]) return j;
    }
    const __m256 target = _mm256_set1_ps(top);
    for (i = 0; i + 8 <= D; i += 8) {
        const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + i), target, _CMP_EQ_OQ));
        if (hits != 0) return i + __builtin_ctz((unsigned)hits);
    }
    for (; i < D; i++)
        if (r[i] == top) return i;
    return 0; /* a row of -inf: the max's first index, as torch */
}

/* out[m] = the first index of the maximum of row m of x [M, D] (rows `stride` floats apart). */
void tm_argmax_rows(const float* x, int64_t stride, int64_t* out, int64_t M, int64_t D) {
#pragma omp parallel for schedule(static) if (M >= 2)
    for (int64_t m = 0; m < M; m++) out[m] = argmax_row(x + m * stride, D);
}
