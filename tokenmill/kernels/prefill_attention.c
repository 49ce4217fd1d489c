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
 * tm_prefill_attention_paged reads the keys and values from the paged cache instead (after its keys are
 * written there: a later chunk, a prefix hit and a whole prompt alike), converting them to floats as it
 * transposes them.
 *
 * Part of kernels.c, like int8_linear.c (after paged_attention.c: it reads the cache with its load_kv);
 * head_dim must be a multiple of 8.
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

/* The sequence's tasks, shared among the threads of the enclosing parallel region: the last blocks see the
 * most keys, so they are handed out first and the threads finish together. */
static void prefill_tasks(const float* q, int64_t q_stride, const float* kt, int64_t S_pad, const float* v,
                          int64_t v_stride, float* out, int64_t L, int64_t S, int64_t H, int64_t KV, int64_t D,
                          float scale, int* failed) {
    const int64_t group = H / KV, blocks = (L + QUERY_BLOCK - 1) / QUERY_BLOCK;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < KV * blocks; task++) {
        const int64_t block = blocks - 1 - task / KV, h = task % KV, first = block * QUERY_BLOCK;
        const int64_t count = L - first < QUERY_BLOCK ? L - first : QUERY_BLOCK;
        if (prefill_task(q, q_stride, kt, S_pad, v, v_stride, out, L, S, H, D, scale, h, group, first, count) != 0) {
#pragma omp atomic write
            *failed = 1;
        }
    }
}

/* q [L, H, D] (rows q_stride floats apart, heads contiguous), k and v [S, KV, D] (rows k_stride and
 * v_stride apart, heads contiguous), out [L, H, D] contiguous; the queries are positions S - L .. S - 1.
 * Returns 0, or -1 if the scratch memory could not be allocated. */
int tm_prefill_attention(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                         int64_t v_stride, float* out, int64_t L, int64_t S, int64_t H, int64_t KV, int64_t D,
                         float scale) {
    const int64_t S_pad = round_up(S, KEY_TILE);
    float* kt = malloc((size_t)(KV * D * S_pad) * sizeof(float)); /* [KV, D, S_pad]: keys along a row */
    if (kt == NULL) return -1;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < KV * D; row++) { /* row h * D + d: feature d of head h's keys */
            float* keys = kt + row * S_pad;
            for (int64_t t = 0; t < S; t++) keys[t] = k[t * k_stride + row];
            for (int64_t t = S; t < S_pad; t++) keys[t] = 0.0f;
        }
        prefill_tasks(q, q_stride, kt, S_pad, v, v_stride, out, L, S, H, KV, D, scale, &failed);
    }
    free(kt);
    return failed ? -1 : 0;
}

/* Tokens t0 .. t1 - 1 of a sequence's cached keys and values (kv_format elements, rows KV * D apart, in the
 * blocks of `table`) as floats: keys transposed into kt [KV * D, S_pad], values into vf [S, KV * D]. */
static inline __attribute__((always_inline)) void read_cached_tokens(const void* k_cache, const void* v_cache,
                                                                     const int64_t* table, int64_t block_size,
                                                                     int64_t t0, int64_t t1, int64_t row,
                                                                     int64_t S_pad, float* kt, float* vf,
                                                                     int format) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t at = (table[t / block_size] * block_size + t % block_size) * row;
        for (int64_t e = 0; e < row; e += 8) {
            float keys[8];
            _mm256_storeu_ps(keys, load_kv(k_cache, at + e, format));
            for (int i = 0; i < 8; i++) kt[(e + i) * S_pad + t] = keys[i];
            _mm256_storeu_ps(vf + t * row + e, load_kv(v_cache, at + e, format));
        }
    }
}

/* A prompt chunk's attention over its sequence's keys and values where they lie, in the paged cache
 * (k_cache, v_cache [num_blocks, block_size, KV, D] of kv_format, this step's written already; `table`
 * the sequence's blocks): the same numbers as tm_prefill_attention over the cached values as floats,
 * without the caller gathering and converting them. q and out as there; S counts the cached context and
 * the chunk. Returns 0, or -1 if the scratch memory could not be allocated. */
int tm_prefill_attention_paged(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                               const int64_t* table, int64_t block_size, float* out, int64_t L, int64_t S,
                               int64_t H, int64_t KV, int64_t D, float scale, int kv_format) {
    const int64_t S_pad = round_up(S, KEY_TILE), row = KV * D;
    float* kt = malloc((size_t)(row * S_pad + S * row) * sizeof(float)); /* keys [KV * D, S_pad], values */
    if (kt == NULL) return -1;
    float* vf = kt + row * S_pad;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < S_pad; t0 += KEY_TILE) { /* a cache line of each key row per chunk */
            const int64_t t1 = t0 + KEY_TILE < S ? t0 + KEY_TILE : S;
            if (kv_format == KV_FLOAT16)
                read_cached_tokens(k_cache, v_cache, table, block_size, t0, t1, row, S_pad, kt, vf, KV_FLOAT16);
            else if (kv_format == KV_BFLOAT16)
                read_cached_tokens(k_cache, v_cache, table, block_size, t0, t1, row, S_pad, kt, vf, KV_BFLOAT16);
            else
                read_cached_tokens(k_cache, v_cache, table, block_size, t0, t1, row, S_pad, kt, vf, KV_FLOAT32);
            for (int64_t r = 0; t1 < t0 + KEY_TILE && r < row; r++) /* the last chunk's padding keys */
                for (int64_t t = t1; t < t0 + KEY_TILE; t++) kt[r * S_pad + t] = 0.0f;
        }
        prefill_tasks(q, q_stride, kt, S_pad, vf, row, out, L, S, H, KV, D, scale, &failed);
    }
    free(kt);
    return failed ? -1 : 0;
}
