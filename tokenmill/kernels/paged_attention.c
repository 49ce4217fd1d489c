/* Decode attention over the paged KV cache (float32, or float16 read through F16C), for x86-64 CPUs with
 * AVX2 and FMA.
 *
 * Queries, scores and outputs are float32 whatever the cache holds: a float16 cache halves the bytes read
 * per cached token (decode attention at large batches is bound by them) and rounds keys and values once,
 * when they are written.
 *
 * One query token per sequence attends to its cached keys and values where they lie in the cache's
 * blocks: nothing is gathered or padded. A task is one sequence with all its heads when there are enough
 * sequences to keep the threads busy, else one sequence and one KV head with its group of query heads
 * (grouped-query attention), so a lone sequence still spreads over the threads; either way each cached key
 * and value is read once. A cached token's KV heads are contiguous, so tasks of different heads read
 * different cache lines. Per task: scores for its heads, softmax (vectorised exp), then the weighted sum
 * of values, kept in registers per 64 features.
 *
 * Cache layout: [num_blocks, block_size, num_kv_heads, head_dim] for keys and the same for values;
 * head_dim must be a multiple of 8. Part of kernels.c, like int8_linear.c.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define CHUNK 8 /* vectors of 8 features per pass of the weighted sum: 64 features in registers */

/* 8 cached features from element `offset` of `cache` as floats: float16 elements when `half`. */
static inline __attribute__((always_inline)) __m256 load_kv(const void* cache, int64_t offset, int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)cache + offset)));
    return _mm256_loadu_ps((const float*)cache + offset);
}

/* n floats from src into the cache from element `offset` (rounded to nearest float16 when `half`). */
static inline void store_kv(void* cache, int64_t offset, const float* src, int64_t n, int half) {
    int64_t i = 0;
    if (half) {
        uint16_t* out = (uint16_t*)cache + offset;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) out[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    } else {
        float* out = (float*)cache + offset;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_loadu_ps(src + i));
        for (; i < n; i++) out[i] = src[i];
    }
}

/* Scores [len_padded] -> probabilities in place; entries from len on are -inf and come out 0. */
static void softmax(float* s, int64_t len_padded) {
    __m256 max = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < len_padded; t += 8) max = _mm256_max_ps(max, _mm256_loadu_ps(s + t));
    const __m256 shift = _mm256_set1_ps(hmax(max));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < len_padded; t += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
    for (int64_t t = 0; t < len_padded; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
}

typedef struct {
    const void *k_cache, *v_cache;
    const int64_t* rows; /* [len] where each cached token's row starts, in elements */
    int64_t len;
} Sequence;

/* rows[t] for each of the sequence's len tokens: block by block, with no division per token (a 64-bit
 * division per token and head cost more than the arithmetic of attention). */
static void token_rows(const int64_t* table, int64_t len, int64_t block_size, int64_t row, int64_t* rows) {
    for (int64_t t = 0, block = 0; t < len; block++) {
        const int64_t base = table[block] * block_size * row;
        for (int64_t j = 0; j < block_size && t < len; j++, t++) rows[t] = base + j * row;
    }
}

/* Cached rows are scattered over blocks, so the hardware prefetcher loses the stream at each block's end:
 * rows are requested PREFETCH tokens ahead. */
#define PREFETCH 8

/* Elements offset .. offset + n of `cache`, asked for ahead (a hint: never faults). */
static inline void prefetch_row(const void* cache, int64_t offset, int64_t n, int half) {
    const int64_t size = half ? 2 : 4;
    for (int64_t i = 0; i < n * size; i += 64) _mm_prefetch((const char*)cache + offset * size + i, _MM_HINT_T0);
}

/* out[0 .. D) = sum_t p[t] * value_t for one query head; `head` is the KV head's offset in a cached row. */
static inline __attribute__((always_inline)) void weighted_values(const Sequence* seq, int64_t head, const float* p,
                                                                  float* out, int64_t D, int half) {
    for (int64_t d0 = 0; d0 < D; d0 += CHUNK * 8) {
        const int64_t vectors = (D - d0) / 8 < CHUNK ? (D - d0) / 8 : CHUNK;
        __m256 acc[CHUNK];
        for (int i = 0; i < CHUNK; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t t = 0; t < seq->len; t++) {
            if (t + PREFETCH < seq->len)
                prefetch_row(seq->v_cache, seq->rows[t + PREFETCH] + head + d0, vectors * 8, half);
            const int64_t value = seq->rows[t] + head + d0;
            const __m256 weight = _mm256_set1_ps(p[t]);
            if (vectors == CHUNK) {
                for (int i = 0; i < CHUNK; i++)
                    acc[i] = _mm256_fmadd_ps(weight, load_kv(seq->v_cache, value + 8 * i, half), acc[i]);
            } else {
                for (int64_t i = 0; i < vectors; i++)
                    acc[i] = _mm256_fmadd_ps(weight, load_kv(seq->v_cache, value + 8 * i, half), acc[i]);
            }
        }
        for (int64_t i = 0; i < vectors; i++) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
    }
}

/* Lane i: the sum of the 8 lanes of v[i]. */
static inline __m256 reduce_lanes_ps(const __m256 v[8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* scores[t] = scale * (query . key_t) for every cached token t, the keys at offset `head` of each row. Eight
 * tokens at a time, one accumulator each, reduced together: a token's sum runs in the same order whichever
 * tokens share its eight (the last eight repeat the last token where the sequence ends). */
static inline __attribute__((always_inline)) void head_scores(const Sequence* seq, const float* query, int64_t head,
                                                              int64_t D, float scale, float* scores, int half) {
    for (int64_t t = 0; t < seq->len; t += 8) {
        int64_t starts[8];
        for (int j = 0; j < 8; j++) starts[j] = seq->rows[t + j < seq->len ? t + j : seq->len - 1] + head;
        for (int64_t ahead = t + PREFETCH; ahead < t + PREFETCH + 8 && ahead < seq->len; ahead++)
            prefetch_row(seq->k_cache, seq->rows[ahead] + head, D, half);
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 q = _mm256_loadu_ps(query + d);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(q, load_kv(seq->k_cache, starts[j] + d, half), acc[j]);
        }
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_mul_ps(reduce_lanes_ps(acc), _mm256_set1_ps(scale)));
        for (int j = 0; j < 8 && t + j < seq->len; j++) scores[t + j] = sums[j];
    }
}

/* One task: sequence b's KV heads first_head .. first_head + heads_per_task - 1 (see tm_paged_decode_attention). */
static inline __attribute__((always_inline)) int attend(const float* q, int64_t q_stride, void* k_cache, void* v_cache,
                                                        const int64_t* block_tables, int64_t table_stride,
                                                        const int64_t* seq_lens, float* out, int64_t b,
                                                        int64_t first_head, int64_t heads_per_task, int64_t H,
                                                        int64_t KV, int64_t D, int64_t block_size, float scale,
                                                        const float* key, int64_t key_stride, const float* value,
                                                        int64_t value_stride, const int64_t* slots, int half) {
    const int64_t group = H / KV;
    const int64_t len = seq_lens[b], len_padded = (len + 7) / 8 * 8, rows = heads_per_task * group;
    if (key != NULL) {
        const int64_t offset = slots[b] * KV * D + first_head * D;
        store_kv(k_cache, offset, key + b * key_stride + first_head * D, heads_per_task * D, half);
        store_kv(v_cache, offset, value + b * value_stride + first_head * D, heads_per_task * D, half);
    }
    float* scores = malloc((size_t)(rows * len_padded + 1) * sizeof(float)); /* [rows, len_padded] */
    int64_t* token_starts = malloc((size_t)len * sizeof(int64_t));
    if (scores == NULL || token_starts == NULL) {
        free(scores);
        free(token_starts);
        return -1;
    }
    token_rows(block_tables + b * table_stride, len, block_size, KV * D, token_starts);
    const Sequence seq = {k_cache, v_cache, token_starts, len};
    const float* queries = q + b * q_stride + first_head * group * D;
    for (int64_t r = 0; r < rows; r++)
        head_scores(&seq, queries + r * D, (first_head + r / group) * D, D, scale, scores + r * len_padded, half);
    float* heads_out = out + (b * H + first_head * group) * D;
    for (int64_t r = 0; r < rows; r++) {
        float* p = scores + r * len_padded;
        for (int64_t t = seq.len; t < len_padded; t++) p[t] = -INFINITY;
        softmax(p, len_padded);
        weighted_values(&seq, (first_head + r / group) * D, p, heads_out + r * D, D, half);
    }
    free(scores);
    free(token_starts);
    return 0;
}

/* q [B, H, D] with row stride q_stride (floats between sequences; heads are D apart), out [B, H, D]
 * contiguous, block_tables [B, table_stride] int64, seq_lens [B] int64 (counting this step's token); the
 * caches hold float16 when kv_half, else float32. When key is not NULL, each sequence's new key and value
 * (key, value [B, KV, D] float32 with row strides key_stride and value_stride, heads contiguous) are first
 * written to its slot (slots [B] int64), by the task that reads them. Returns 0, or -1 if the scratch
 * memory could not be allocated. */
int tm_paged_decode_attention(const float* q, int64_t q_stride, void* k_cache, void* v_cache,
                              const int64_t* block_tables, int64_t table_stride, const int64_t* seq_lens,
                              float* out, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t block_size,
                              float scale, const float* key, int64_t key_stride, const float* value,
                              int64_t value_stride, const int64_t* slots, int kv_half) {
    /* Enough sequences to share among the threads: one task each, reading every cached row whole. Fewer:
     * one task per sequence and KV head, so the threads share a sequence's heads. */
    const int64_t heads_per_task = B >= 2 * omp_get_max_threads() ? KV : 1, tasks_per_seq = KV / heads_per_task;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t task = 0; task < B * tasks_per_seq; task++) {
        const int64_t b = task / tasks_per_seq, first_head = task % tasks_per_seq * heads_per_task;
        /* Constant element types, so each call is compiled for its own. */
        if (kv_half)
            failed |= attend(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, b, first_head,
                             heads_per_task, H, KV, D, block_size, scale, key, key_stride, value, value_stride, slots, 1);
        else
            failed |= attend(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, b, first_head,
                             heads_per_task, H, KV, D, block_size, scale, key, key_stride, value, value_stride, slots, 0);
    }
    return failed ? -1 : 0;
}

/* The step's new keys and values into their slots: key [N, KV, D] float32 with rows key_stride floats
 * apart (heads contiguous), value likewise, slots [N] int64 indexing [num_blocks * block_size] cached rows
 * of `row` elements (float16 when kv_half, else float32). */
void tm_write_kv_cache(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
                       void* k_cache, void* v_cache, const int64_t* slots, int64_t N, int64_t row, int kv_half) {
    for (int64_t n = 0; n < N; n++) {
        store_kv(k_cache, slots[n] * row, key + n * key_stride, row, kv_half);
        store_kv(v_cache, slots[n] * row, value + n * value_stride, row, kv_half);
    }
}
