/* Causal attention of a prompt chunk over its sequence's keys and values (float32), for x86-64 CPUs with
 * AVX2 and FMA.
 *
 * The chunk's L queries are the last L of S positions: query i sees keys 0 .. S - L + i. A task is one KV
 * head and a block of QUERY_BLOCK queries with all the query heads that share that KV head (grouped-query
 * attention: each key and value is read once for them). Its scores, softmax and weighted sum are two small
 * matrix products with register tiles of 6 query vectors x 16 lanes, no horizontal sums: the keys are
 * transposed once per call (keys along the lanes), the values are read as they lie (features along the
 * lanes). Each query's result depends on its own row only: its dot products, its softmax (masked keys give
 * exact zeros) and its weighted sum run in the same order whichever queries share its task, so a chunked
 * prompt attends as the whole one does.
 *
 * Part of kernels.c, like int8_linear.c; head_dim must be a multiple of 8.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QUERY_BLOCK 16 /* query positions per task */
#define TILE_ROWS 6    /* query vectors per register tile: 12 accumulators of 8 lanes */
#define KEY_TILE 16    /* keys per score tile (two vectors of lanes) */

static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* scores[r][t] = scale * (q_r . key_t) for TILE_ROWS query vectors (D apart) and keys t .. t + 15, keys
 * transposed: kt[d * stride + t]. */
static inline void score_tile(const float* q, int64_t D, const float* kt, int64_t stride, float scale,
                              float* scores, int64_t scores_stride) {
    __m256 acc[TILE_ROWS][2];
    for (int r = 0; r < TILE_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * stride), k1 = _mm256_loadu_ps(kt + d * stride + 8);
        for (int r = 0; r < TILE_ROWS; r++) {
            const __m256 qd = _mm256_broadcast_ss(q + r * D + d);
            acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < TILE_ROWS; r++) {
        _mm256_storeu_ps(scores + r * scores_stride, _mm256_mul_ps(acc[r][0], s));
        _mm256_storeu_ps(scores + r * scores_stride + 8, _mm256_mul_ps(acc[r][1], s));
    }
}

/* out[r][f .. f + 8 * VECTORS) = sum_t p[r][t] * value_t there, for TILE_ROWS query vectors and keys
 * 0 .. keys - 1 (value t at v + t * v_stride). */
static inline __attribute__((always_inline)) void value_tile(const float* p, int64_t p_stride, const float* v,
                                                             int64_t v_stride, int64_t keys, float* out,
                                                             int64_t D, int vectors) {
    __m256 acc[TILE_ROWS][2];
    for (int r = 0; r < TILE_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < keys; t++) {
        const float* row = v + t * v_stride;
        const __m256 v0 = _mm256_loadu_ps(row), v1 = vectors == 2 ? _mm256_loadu_ps(row + 8) : v0;
        for (int r = 0; r < TILE_ROWS; r++) {
            const __m256 w = _mm256_broadcast_ss(p + r * p_stride + t);
            acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
            if (vectors == 2) acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int i = 0; i < vectors; i++) _mm256_storeu_ps(out + r * D + 8 * i, acc[r][i]);
}

/* One task: KV head h, queries first .. first + count - 1 (count <= QUERY_BLOCK) with their `group` heads.
 * Query vector r of the task is query first + r / group, head h * group + r % group. */
static int prefill_task(const float* q, int64_t q_stride, const float* kt, int64_t S_pad, const float* v,
                        int64_t v_stride, float* out, int64_t L, int64_t S, int64_t H, int64_t D, float scale,
                        int64_t h, int64_t group, int64_t first, int64_t count) {
    const int64_t vectors = round_up(count * group, TILE_ROWS);
    const int64_t keys = S - L + first + count; /* the last query's keys; earlier ones mask the rest */
    const int64_t keys_pad = round_up(keys, KEY_TILE);
    float* queries = calloc((size_t)(vectors * D), sizeof(float));
    float* scores = malloc((size_t)(vectors * keys_pad) * sizeof(float));
    float* results = malloc((size_t)(vectors * D) * sizeof(float));
    if (queries == NULL || scores == NULL || results == NULL) {
        free(queries);
        free(scores);
        free(results);
        return -1;
    }
    for (int64_t r = 0; r < count * group; r++)
        memcpy(queries + r * D, q + (first + r / group) * q_stride + (h * group + r % group) * D,
               (size_t)D * sizeof(float));
    const float* keys_t = kt + h * D * S_pad;
    for (int64_t r = 0; r < vectors; r += TILE_ROWS)
        for (int64_t t = 0; t < keys_pad; t += KEY_TILE)
            score_tile(queries + r * D, D, keys_t + t, S_pad, scale, scores + r * keys_pad + t, keys_pad);
    for (int64_t r = 0; r < vectors; r++) /* padding vectors (r >= count * group) see the first key only */
        masked_softmax(scores + r * keys_pad, r < count * group ? S - L + first + r / group + 1 : 1, keys_pad);
    const float* values = v + h * D;
    for (int64_t r = 0; r < vectors; r += TILE_ROWS) {
        int64_t f = 0;
        for (; f + 16 <= D; f += 16)
            value_tile(scores + r * keys_pad, keys_pad, values + f, v_stride, keys, results + r * D + f, D, 2);
        if (f < D) value_tile(scores + r * keys_pad, keys_pad, values + f, v_stride, keys, results + r * D + f, D, 1);
    }
    for (int64_t r = 0; r < count * group; r++)
        memcpy(out + ((first + r / group) * H + h * group + r % group) * D, results + r * D, (size_t)D * sizeof(float));
    free(queries);
    free(scores);
    free(results);
    return 0;
}

/* q [L, H, D] (rows q_stride floats apart, heads contiguous), k and v [S, KV, D] (rows k_stride and
 * v_stride apart, heads contiguous), out [L, H, D] contiguous; the queries are positions S - L .. S - 1.
 * Returns 0, or -1 if the scratch memory could not be allocated. */
int tm_prefill_attention(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                         int64_t v_stride, float* out, int64_t L, int64_t S, int64_t H, int64_t KV, int64_t D,
                         float scale) {
    const int64_t group = H / KV, S_pad = round_up(S, KEY_TILE), blocks = (L + QUERY_BLOCK - 1) / QUERY_BLOCK;
    float* kt = malloc((size_t)(KV * D * S_pad) * sizeof(float)); /* [KV, D, S_pad]: keys along a row */
    if (kt == NULL) return -1;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < KV; h++)
            for (int64_t d = 0; d < D; d++) {
                float* row = kt + (h * D + d) * S_pad;
                for (int64_t t = 0; t < S; t++) row[t] = k[t * k_stride + h * D + d];
                for (int64_t t = S; t < S_pad; t++) row[t] = 0.0f;
            }
        /* The last blocks see the most keys: handed out first, so the threads finish together. */
#pragma omp for schedule(dynamic, 1) reduction(| : failed)
        for (int64_t task = 0; task < KV * blocks; task++) {
            const int64_t block = blocks - 1 - task / KV, h = task % KV, first = block * QUERY_BLOCK;
            const int64_t count = L - first < QUERY_BLOCK ? L - first : QUERY_BLOCK;
            failed |= prefill_task(q, q_stride, kt, S_pad, v, v_stride, out, L, S, H, D, scale, h, group, first, count);
        }
    }
    free(kt);
    return failed ? -1 : 0;
}
