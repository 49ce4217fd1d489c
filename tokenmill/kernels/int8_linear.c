/* Int8 linear layers for x86-64 CPUs with AVX2 and FMA: y = x . w^T (+ bias).
 *
 * Weights are int8 with one float scale per output channel. Each call quantizes its activations per
 * token in blocks of 32 input features with one scale per block (llama.cpp's Q8_0 layout): a model whose
 * activations have a few outlier channels would otherwise see the other channels rounded to a handful of
 * levels. A block's 32 products are summed in integers (two instructions), scaled by the activation
 * block's scale, and accumulated in float; the channel scale is applied once at the end.
 *
 * Part of kernels.c, built on first use by tokenmill/kernels/cpu.py with the system C compiler and loaded
 * with ctypes. It links the libgomp that torch has already loaded, so its threads are torch's OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define BLOCK 32
#define ROWS 4 /* activation rows per weight load: enough accumulators, few enough registers */
/* Activation rows per pass over the weights: 256 rows of int8 activations stay in a core's L2 cache for
 * the pass (long prefill chunks would otherwise stream them from memory for every weight row). */
#define ROW_CHUNK 256
/* A lone row (decode at batch 1) does too little work per weight byte for the hardware prefetcher alone to
 * keep the memory busy: its weight stream is also requested this far ahead (2 KB: 1 row 15.7 -> 19.2 GB/s
 * over 106 MB of weights on the 2-vCPU EPYC, benchmarks/RESULTS.md). */
#define PREFETCH_BYTES 2048

/* One block of 32 floats -> 32 int8 (round to nearest even) and its scale max|x| / 127. */
static void quantize_block(const float* x, int8_t* q, float* scale) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
    }
    float d = hmax(amax) / 127.0f;
    *scale = d;
    __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
    /* The packs work per 128-bit lane; the permute puts the 32 bytes back in order. */
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)q, packed);
}

#define LOAD_BLOCK(p) _mm256_loadu_si256((const __m256i*)(p))

/* The 32 products of a weight block (|w| and its signs given apart) and an activation block, as 8 float
 * partial sums. maddubs multiplies unsigned by signed bytes, so |w| and x with w's sign go in; |w|, |x| <=
 * 127 keeps its int16 pair sums exact. */
static inline __m256 block_dot(__m256i w_abs, __m256i w, __m256i x) {
    __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

typedef struct {
    const int8_t* xq; /* [M, K] activations, quantized */
    const float* xs;  /* [M, K / 32] their block scales */
    int64_t K;
} Activations;

/* Unscaled sums of output columns w0 and w1 (two weight rows) for activation rows m .. m + ROWS - 1:
 * each weight block is loaded once for ROWS rows. */
static inline __attribute__((always_inline)) void two_columns(const Activations* a, const int8_t* w0,
                                                              const int8_t* w1, int64_t m, float out[2][ROWS]) {
    const int64_t K = a->K, num_blocks = K / BLOCK;
    const int8_t* xq[ROWS];
    const float* xs[ROWS];
    __m256 acc[2][ROWS];
    for (int j = 0; j < ROWS; j++) {
        xq[j] = a->xq + (m + j) * K;
        xs[j] = a->xs + (m + j) * num_blocks;
        acc[0][j] = acc[1][j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < num_blocks; b++) {
        __m256i u = LOAD_BLOCK(w0 + b * BLOCK), v = LOAD_BLOCK(w1 + b * BLOCK);
        __m256i u_abs = _mm256_sign_epi8(u, u), v_abs = _mm256_sign_epi8(v, v);
        for (int j = 0; j < ROWS; j++) {
            __m256i x = LOAD_BLOCK(xq[j] + b * BLOCK);
            __m256 scale = _mm256_broadcast_ss(xs[j] + b);
            acc[0][j] = _mm256_fmadd_ps(block_dot(u_abs, u, x), scale, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(block_dot(v_abs, v, x), scale, acc[1][j]);
        }
    }
    for (int j = 0; j < ROWS; j++) out[0][j] = hsum(acc[0][j]), out[1][j] = hsum(acc[1][j]);
}

/* The same sum for one column and one row, in the same order: a token's output does not depend on which
 * other tokens share the call. */
static inline __attribute__((always_inline)) float one_column(const Activations* a, const int8_t* w, int64_t m) {
    const int64_t K = a->K, num_blocks = K / BLOCK;
    const int8_t* xq = a->xq + m * K;
    const float* xs = a->xs + m * num_blocks;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < num_blocks; b++) {
        _mm_prefetch((const char*)(w + b * BLOCK + PREFETCH_BYTES), _MM_HINT_T0); /* a hint: never faults */
        __m256i u = LOAD_BLOCK(w + b * BLOCK);
        __m256i x = LOAD_BLOCK(xq + b * BLOCK);
        acc = _mm256_fmadd_ps(block_dot(_mm256_sign_epi8(u, u), u, x), _mm256_broadcast_ss(xs + b), acc);
    }
    return hsum(acc);
}

/* x [M, K] float32, w [N, K] int8 with w_scales [N], bias [N] or NULL, y [M, N] float32.
 * K must be a multiple of 32. Returns 0, or -1 if the scratch memory could not be allocated. */
int tm_int8_linear(const float* x, const int8_t* w, const float* w_scales, const float* bias, float* y,
                   int64_t M, int64_t N, int64_t K) {
    const int64_t num_blocks = K / BLOCK;
    int8_t* xq = malloc((size_t)(M * K));
    float* xs = malloc((size_t)(M * num_blocks) * sizeof(float));
    if (xq == NULL || xs == NULL) {
        free(xq);
        free(xs);
        return -1;
    }
    const Activations a = {xq, xs, K};
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * num_blocks; i++) quantize_block(x + i * BLOCK, xq + i * BLOCK, xs + i);

        for (int64_t first = 0; first < M; first += ROW_CHUNK) {
            const int64_t last = first + ROW_CHUNK < M ? first + ROW_CHUNK : M;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += 2) {
                const int64_t num_columns = n + 1 == N ? 1 : 2; /* odd N: the last column alone */
                const int8_t* w0 = w + n * K;
                float scale[2], shift[2] = {0.0f, 0.0f};
                for (int64_t c = 0; c < num_columns; c++) {
                    scale[c] = w_scales[n + c];
                    if (bias != NULL) shift[c] = bias[n + c];
                }
                int64_t m = first;
                for (; num_columns == 2 && m + ROWS <= last; m += ROWS) {
                    float out[2][ROWS];
                    two_columns(&a, w0, w0 + K, m, out);
                    for (int j = 0; j < ROWS; j++)
                        for (int c = 0; c < 2; c++) y[(m + j) * N + n + c] = out[c][j] * scale[c] + shift[c];
                }
                for (; m < last; m++)
                    for (int64_t c = 0; c < num_columns; c++)
                        y[m * N + n + c] = one_column(&a, w0 + c * K, m) * scale[c] + shift[c];
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}
