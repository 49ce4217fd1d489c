/* Decode attention over the paged float32 KV cache, for x86-64 CPUs with AVX2 and FMA.
 *
 * One query token per sequence attends to its cached keys and values where they lie in the cache's
 * blocks: nothing is gathered or padded, and each key and value row is read once for all the query
 * heads (grouped-query attention: a KV head serves its group of query heads). A batch of decode rows is
 * memory-bound on reading the cache, which this kernel does once and nothing more. Scores are kept per
 * sequence and head (two passes: scores and softmax, then the weighted sum of values).
 *
 * Cache layout: [num_blocks, block_size, num_kv_heads, head_dim] for keys and the same for values;
 * head_dim must be a multiple of 8. Built and loaded like int8_linear.c (tokenmill/kernels/cpu.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

/* q [B, H, D] with row stride q_stride (floats between sequences; heads are D apart), out [B, H, D]
 * contiguous, block_tables [B, table_stride] int64, seq_lens [B] int64. One task per sequence: it reads
 * each cached row (all KV heads, contiguous) once, so no cache line is fetched twice. Returns 0, or -1 if
 * the scratch memory could not be allocated. */
int tm_paged_decode_attention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                              const int64_t* block_tables, int64_t table_stride, const int64_t* seq_lens,
                              float* out, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t block_size,
                              float scale) {
    const int64_t group = H / KV, row = KV * D; /* floats per cached token */
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t b = 0; b < B; b++) {
        const int64_t len = seq_lens[b];
        const int64_t* table = block_tables + b * table_stride;
        const float* queries = q + b * q_stride;
        float* scores = malloc((size_t)(H * len) * sizeof(float)); /* [H, len] */
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        for (int64_t t = 0; t < len; t++) {
            const float* keys = k_cache + (table[t / block_size] * block_size + t % block_size) * row;
            for (int64_t h = 0; h < H; h++) scores[h * len + t] = dot(queries + h * D, keys + (h / group) * D, D);
        }
        for (int64_t h = 0; h < H; h++) {
            float* s = scores + h * len;
            float max = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < len; t++) max = s[t] > max ? s[t] : max;
            for (int64_t t = 0; t < len; t++) sum += (s[t] = expf((s[t] - max) * scale));
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < len; t++) s[t] *= inv;
        }
        float* heads_out = out + b * H * D;
        for (int64_t i = 0; i < H * D; i++) heads_out[i] = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            const float* values = v_cache + (table[t / block_size] * block_size + t % block_size) * row;
            for (int64_t h = 0; h < H; h++) {
                const __m256 p = _mm256_set1_ps(scores[h * len + t]);
                const float* value = values + (h / group) * D;
                float* o = heads_out + h * D;
                for (int64_t i = 0; i < D; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + i), _mm256_loadu_ps(o + i)));
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
