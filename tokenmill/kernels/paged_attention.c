/* Decode attention over the paged KV cache (float32, float16 read through F16C, or bfloat16), for x86-64 CPUs with
 * AVX2 and FMA.
 *
 * Queries, scores and outputs are float32 whatever the cache holds: a half cache halves the bytes read
 * per cached token (decode attention at large batches is bound by them) and rounds keys and values once,
 * when they are written.
 *
 * One query token per sequence attends to its cached keys and values where they lie in the cache's
 * blocks: nothing is gathered or padded. A task is one sequence with all its heads when there are enough
 * sequences to keep the threads busy, else one sequence and one KV head with its group of query heads
 * (grouped-query attention), so a lone sequence still spreads over the threads; either way each cached key
 * and value is read once. A cached token's KV heads are contiguous, so tasks of different heads read
 * different cache lines. Per task and KV head, its query heads up to three at a time: their scores (each
 * key converted to float once for all of them), softmax (vectorised exp), then the weighted sum of values
 * (likewise), kept in registers 32 features at a time.
 *
 * Cache layout: [num_blocks, block_size, num_kv_heads, head_dim] for keys and the same for values;
 * head_dim must be a multiple of 8. Part of kernels.c, like int8_linear.c.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* The cache's element type (`kv_format`): what a kernel call reads and writes. */
#define KV_FLOAT32 0
#define KV_FLOAT16 1
#define KV_BFLOAT16 2

/* 8 cached features from element `offset` of `cache` as floats. A bfloat16 is a float's upper half. */
static inline __attribute__((always_inline)) __m256 load_kv(const void* cache, int64_t offset, int format) {
    const __m128i* halves = (const __m128i*)((const uint16_t*)cache + offset);
    if (format == KV_FLOAT16) return _mm256_cvtph_ps(_mm_loadu_si128(halves));
    if (format == KV_BFLOAT16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(halves)), 16));
    return _mm256_loadu_ps((const float*)cache + offset);
}

/* A float rounded to the nearest bfloat16, ties to even, NaN to the quiet NaN: torch's conversion. */
static inline uint16_t bfloat16_of(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (x != x) return 0x7fc0;
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* The same for 8 floats. */
static inline __m128i bfloat16_of8(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    /* 32-bit lanes to 16-bit ones: packus works within each 128-bit half, so the halves are joined after. */
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    return _mm256_castsi256_si128(packed);
}

/* n floats from src into the cache from element `offset`, rounded to nearest in a half format. */
static inline void store_kv(void* cache, int64_t offset, const float* src, int64_t n, int format) {
    int64_t i = 0;
    if (format == KV_FLOAT16) {
        uint16_t* out = (uint16_t*)cache + offset;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) out[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    } else if (format == KV_BFLOAT16) {
        uint16_t* out = (uint16_t*)cache + offset;
        for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(out + i), bfloat16_of8(_mm256_loadu_ps(src + i)));
        for (; i < n; i++) out[i] = bfloat16_of(src[i]);
    } else {
        float* out = (float*)cache + offset;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_loadu_ps(src + i));
        for (; i < n; i++) out[i] = src[i];
    }
}

typedef struct {
    const void *k_cache, *v_cache;
    const int64_t* rows; /* [len] where each cached token's row starts, in elements */
    int64_t len;
    int64_t span_start, span_width; /* the task's KV heads in a row: elements span_start .. + span_width */
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
 * rows are requested PREFETCH tokens ahead (a token's pass takes ~10 ns, memory ~100). */
#define PREFETCH 24

/* Elements offset .. offset + n of `cache`, asked for ahead (a hint: never faults). Always inlined: as a
 * plain static inline function gcc dropped its calls, and with them every prefetch of this file. */
static inline __attribute__((always_inline)) void prefetch_row(const void* cache, int64_t offset, int64_t n, int format) {
    const int64_t size = format == KV_FLOAT32 ? 4 : 2;
    for (int64_t i = 0; i < n * size; i += 64) _mm_prefetch((const char*)cache + offset * size + i, _MM_HINT_T0);
}

/* Query heads that share a KV head are computed together, up to GROUP_TILE at a time: each cached key and
 * value is converted to float once for all of them (converting it once per query head made the kernel
 * bound by instruction count, not memory). TILE_TOKENS keys are scored at a time. */
#define GROUP_TILE 3
#define TILE_TOKENS 4

/* out[g][d0 .. d0 + 8 * vectors) = sum_t p[g][t] * value_t there, for G query heads (probabilities G rows
 * len_padded apart, outputs D apart) of one KV head at offset `head` of each cached row. */
static inline __attribute__((always_inline)) void weighted_values_pass(const Sequence* seq, int64_t head,
                                                                       const float* p, int64_t len_padded,
                                                                       float* out, int64_t D, int64_t d0,
                                                                       int vectors, int G, int format) {
    __m256 acc[GROUP_TILE][4];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < vectors; i++) acc[g][i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < seq->len; t++) {
        if (t + PREFETCH < seq->len) prefetch_row(seq->v_cache, seq->rows[t + PREFETCH] + head + d0, vectors * 8, format);
        const int64_t value = seq->rows[t] + head + d0;
        for (int i = 0; i < vectors; i++) {
            const __m256 v = load_kv(seq->v_cache, value + 8 * i, format);
            for (int g = 0; g < G; g++)
                acc[g][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * len_padded + t), v, acc[g][i]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < vectors; i++) _mm256_storeu_ps(out + g * D + d0 + 8 * i, acc[g][i]);
}

/* All D features, 32 per pass over the values (a constant width, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void weighted_values(const Sequence* seq, int64_t head, const float* p,
                                                                  int64_t len_padded, float* out, int64_t D, int G,
                                                                  int format) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) weighted_values_pass(seq, head, p, len_padded, out, D, d0, 4, G, format);
    if (d0 < D) weighted_values_pass(seq, head, p, len_padded, out, D, d0, (int)((D - d0) / 8), G, format);
}

/* Lane i (i < 4) of the result: the sum of the 8 lanes of v[i]. */
static inline __m128 reduce_lanes4_ps(const __m256 v[TILE_TOKENS]) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* scores[g][t + j] = scale * (query_g . key_(t + j)), j < TILE_TOKENS, for G query heads (D apart; scores
 * rows len_padded apart), the keys at offset `head` of each row. A token's sum runs in the same order
 * whichever tokens share its tile (the last tile repeats the last token where the sequence ends). */
static inline __attribute__((always_inline)) void tile_scores(const Sequence* seq, const float* query, int64_t head,
                                                              int64_t D, float scale, float* scores,
                                                              int64_t len_padded, int64_t t, int G, int format) {
    int64_t starts[TILE_TOKENS];
    for (int j = 0; j < TILE_TOKENS; j++) starts[j] = seq->rows[t + j < seq->len ? t + j : seq->len - 1] + head;
    __m256 acc[GROUP_TILE][TILE_TOKENS];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < TILE_TOKENS; j++) acc[g][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
        for (int j = 0; j < TILE_TOKENS; j++) {
            const __m256 k = load_kv(seq->k_cache, starts[j] + d, format);
            for (int g = 0; g < G; g++) acc[g][j] = _mm256_fmadd_ps(_mm256_loadu_ps(query + g * D + d), k, acc[g][j]);
        }
    for (int g = 0; g < G; g++) {
        float sums[TILE_TOKENS];
        _mm_storeu_ps(sums, _mm_mul_ps(reduce_lanes4_ps(acc[g]), _mm_set1_ps(scale)));
        for (int j = 0; j < TILE_TOKENS && t + j < seq->len; j++) scores[g * len_padded + t + j] = sums[j];
    }
}

/* Query heads of a task are taken GROUP_TILE at a time, never straddling two KV heads: the tile starting
 * at query head r (of the task) has this many heads. */
static inline int heads_in_tile(int64_t r, int64_t group) {
    const int64_t left = group - r % group;
    return left < GROUP_TILE ? (int)left : GROUP_TILE;
}

/* The scores of all the task's `rows` query heads, one tile of tokens at a time for all of them: the keys
 * stream from memory once, in row order, while the arithmetic runs (a pass per KV head waited on memory),
 * and the values the weighted sums will read are requested along with them. */
static inline __attribute__((always_inline)) void task_scores(const Sequence* seq, const float* queries,
                                                              int64_t first_head, int64_t rows, int64_t group,
                                                              int64_t D, float scale, float* scores,
                                                              int64_t len_padded, int format) {
    for (int64_t t = 0; t < seq->len; t += TILE_TOKENS) {
        for (int64_t ahead = t + PREFETCH; ahead < t + PREFETCH + TILE_TOKENS && ahead < seq->len; ahead++) {
            prefetch_row(seq->k_cache, seq->rows[ahead] + seq->span_start, seq->span_width, format);
            prefetch_row(seq->v_cache, seq->rows[ahead] + seq->span_start, seq->span_width, format);
        }
        for (int64_t r = 0; r < rows;) {
            const int G = heads_in_tile(r, group);
            const int64_t head = (first_head + r / group) * D;
            const float* query = queries + r * D;
            float* tile = scores + r * len_padded;
            /* Constant tile sizes, so each is compiled with its accumulators in registers. */
            if (G == GROUP_TILE)
                tile_scores(seq, query, head, D, scale, tile, len_padded, t, GROUP_TILE, format);
            else if (G == 2)
                tile_scores(seq, query, head, D, scale, tile, len_padded, t, 2, format);
            else
                tile_scores(seq, query, head, D, scale, tile, len_padded, t, 1, format);
            r += G;
        }
    }
}

/* One task: sequence b's KV heads first_head .. first_head + heads_per_task - 1 (see tm_paged_decode_attention). */
static inline __attribute__((always_inline)) int attend(const float* q, int64_t q_stride, void* k_cache, void* v_cache,
                                                        const int64_t* block_tables, int64_t table_stride,
                                                        const int64_t* seq_lens, float* out, int64_t b,
                                                        int64_t first_head, int64_t heads_per_task, int64_t H,
                                                        int64_t KV, int64_t D, int64_t block_size, float scale,
                                                        const float* key, int64_t key_stride, const float* value,
                                                        int64_t value_stride, const int64_t* slots, int format) {
    const int64_t group = H / KV;
    const int64_t len = seq_lens[b], len_padded = (len + 7) / 8 * 8, rows = heads_per_task * group;
    if (key != NULL) {
        const int64_t offset = slots[b] * KV * D + first_head * D;
        store_kv(k_cache, offset, key + b * key_stride + first_head * D, heads_per_task * D, format);
        store_kv(v_cache, offset, value + b * value_stride + first_head * D, heads_per_task * D, format);
    }
    float* scores = malloc((size_t)(rows * len_padded + 1) * sizeof(float)); /* [rows, len_padded] */
    int64_t* token_starts = malloc((size_t)len * sizeof(int64_t));
    if (scores == NULL || token_starts == NULL) {
        free(scores);
        free(token_starts);
        return -1;
    }
    token_rows(block_tables + b * table_stride, len, block_size, KV * D, token_starts);
    const Sequence seq = {k_cache, v_cache, token_starts, len, first_head * D, heads_per_task * D};
    const float* queries = q + b * q_stride + first_head * group * D;
    task_scores(&seq, queries, first_head, rows, group, D, scale, scores, len_padded, format);
    for (int64_t r = 0; r < rows; r++) {
        masked_softmax(scores + r * len_padded, seq.len, len_padded);
    }
    float* heads_out = out + (b * H + first_head * group) * D;
    for (int64_t r = 0; r < rows;) {
        const int G = heads_in_tile(r, group);
        const int64_t head = (first_head + r / group) * D;
        float* tile_out = heads_out + r * D;
        if (G == GROUP_TILE)
            weighted_values(&seq, head, scores + r * len_padded, len_padded, tile_out, D, GROUP_TILE, format);
        else if (G == 2)
            weighted_values(&seq, head, scores + r * len_padded, len_padded, tile_out, D, 2, format);
        else
            weighted_values(&seq, head, scores + r * len_padded, len_padded, tile_out, D, 1, format);
        r += G;
    }
    free(scores);
    free(token_starts);
    return 0;
}

/* q [B, H, D] with row stride q_stride (floats between sequences; heads are D apart), out [B, H, D]
 * contiguous, block_tables [B, table_stride] int64, seq_lens [B] int64 (counting this step's token); the
 * caches hold kv_format's elements (KV_FLOAT32, KV_FLOAT16 or KV_BFLOAT16). When key is not NULL, each
 * sequence's new key and value (key, value [B, KV, D] float32 with row strides key_stride and
 * value_stride, heads contiguous) are first written to its slot (slots [B] int64), by the task that reads
 * them. Returns 0, or -1 if the scratch memory could not be allocated. */
int tm_paged_decode_attention(const float* q, int64_t q_stride, void* k_cache, void* v_cache,
                              const int64_t* block_tables, int64_t table_stride, const int64_t* seq_lens,
                              float* out, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t block_size,
                              float scale, const float* key, int64_t key_stride, const float* value,
                              int64_t value_stride, const int64_t* slots, int kv_format) {
    /* Enough sequences to share among the threads: one task each, reading every cached row whole. Fewer:
     * one task per sequence and KV head, so the threads share a sequence's heads. */
    const int64_t heads_per_task = B >= 2 * omp_get_max_threads() ? KV : 1, tasks_per_seq = KV / heads_per_task;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t task = 0; task < B * tasks_per_seq; task++) {
        const int64_t b = task / tasks_per_seq, first_head = task % tasks_per_seq * heads_per_task;
        /* Constant element types, so each call is compiled for its own. */
#define ATTEND_AS(format)                                                                                           \
    attend(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, b, first_head, heads_per_task, \
           H, KV, D, block_size, scale, key, key_stride, value, value_stride, slots, format)
        if (kv_format == KV_FLOAT16)
            failed |= ATTEND_AS(KV_FLOAT16);
        else if (kv_format == KV_BFLOAT16)
            failed |= ATTEND_AS(KV_BFLOAT16);
        else
            failed |= ATTEND_AS(KV_FLOAT32);
#undef ATTEND_AS
    }
    return failed ? -1 : 0;
}

/* The step's new keys and values into their slots: key [N, KV, D] float32 with rows key_stride floats
 * apart (heads contiguous), value likewise, slots [N] int64 indexing [num_blocks * block_size] cached rows
 * of `row` elements of kv_format. */
void tm_write_kv_cache(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
                       void* k_cache, void* v_cache, const int64_t* slots, int64_t N, int64_t row, int kv_format) {
    for (int64_t n = 0; n < N; n++) {
        store_kv(k_cache, slots[n] * row, key + n * key_stride, row, kv_format);
        store_kv(v_cache, slots[n] * row, value + n * value_stride, row, kv_format);
    }
}
