/* Linear layers over a GGUF file's own quantized weights, for x86-64 CPUs with AVX2, FMA and F16C:
 * y = x . w^T (+ bias), no weight rounded again (the weights are the file's, bit for bit).
 *
 * The file stores each weight row in blocks of 32 (llama.cpp's Q4_1: w = d q + m with q in 0..15; Q8_0:
 * w = d q with q in -127..127; d and m float16). At load (tokenmill/model/gguf_linear.py) the rows are
 * interleaved eight at a time: for each group of 8 output rows and each block, in this order,
 *   Q4_1: 4 x 32 bytes of 4-bit values: load i holds in its low halves the weights 4i .. 4i + 3 of each of
 *         the 8 rows (4 bytes per row, rows in order) and in its high halves the weights 4i + 16 .. 4i + 19;
 *         then the 8 rows' scales d (float16), then their minimums m (float16): 160 bytes, 20 per row;
 *   Q8_0: 8 x 32 bytes of int8 values, load i holding the weights 4i .. 4i + 3 of the 8 rows; then the 8
 *         rows' scales: 272 bytes, 34 per row.
 * (Row counts that are not a multiple of 8 are padded with zero rows.) So one multiply-add instruction
 * takes 4 weights of each of 8 rows against the same 4 activations, broadcast: the 8 lanes of the sums are
 * the 8 outputs, with no horizontal sums, and the 8 rows' scales are one vector.
 *
 * The activations are rounded per token to int8 blocks of 32 features as in int8_linear.c (its
 * quantize_block: kernels.c includes that file first). A weight block and an activation block (scale dx,
 * values qx) give d dx sum(q qx) + m dx sum(qx). For Q4_1 the int16 pair sums of a block's 8 multiply-adds
 * are added as int16 (at most 8 x 2 x 15 x 127 = 30480) and widened once. Built with AVX512-VNNI (build.py,
 * where the CPU has it) the products go through vpdpbusd instead, two groups at a time in 512-bit vectors
 * (Q8_0 with 8 rows or more): the same exact integer sums and the same float operations per output, so the
 * same numbers. Built with AMX-INT8 as well, calls of 16 rows or more multiply on tiles instead (block_amx.c),
 * once more the same numbers.
 */
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define FORMAT_Q4_1 1
#define FORMAT_Q8_0 2
#define COLUMNS 8 /* output rows interleaved per group: one per float lane */

static inline int64_t group_block_bytes(int64_t format) { return format == FORMAT_Q4_1 ? 160 : 272; }

typedef struct {
    const int8_t* xq;  /* [M, K] activations, quantized */
    const uint8_t* xa; /* [M, K] their absolute values (Q8_0: maddubs takes the unsigned side from here) */
    const float* xs;   /* [M, K / 32] their block scales */
    const float* xsum; /* [M, K / 32] each block's scale times the sum of its values */
    const int32_t* qsum; /* [M, K / 32] each block's sum of values (the VNNI Q8_0 sums' offset) */
    int64_t K;
} BlockActivations;

/* The block's sum of values (|sum| <= 32 * 127: exact in float); times its scale it is the term a weight
 * block's minimum multiplies. */
static int32_t block_sum(const int8_t* q) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i*)q));
    __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    return (int32_t)hsum(_mm256_cvtepi32_ps(quads));
}

static inline __m256i broadcast4(const void* p) { /* 4 bytes into every 32-bit lane */
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* An activation row's pointers at one block: its int8 values (and their absolute values), its block scale
 * and block sum. */
typedef struct {
    const int8_t* q;
    const uint8_t* abs;
    const float* scale;
    const float* sum;
    const int32_t* qsum;
} RowCursor;

static inline RowCursor row_cursor(const BlockActivations* a, int64_t m) { /* row m at its first block */
    const int64_t num_blocks = a->K / BLOCK;
    return (RowCursor){a->xq + m * a->K, a->xa + m * a->K, a->xs + m * num_blocks, a->xsum + m * num_blocks,
                       a->qsum + m * num_blocks};
}

static inline void next_block(RowCursor* row) {
    row->q += BLOCK;
    row->abs += BLOCK;
    row->scale++;
    row->sum++;
    row->qsum++;
}

/* sum + maddubs(w, x's 4 bytes broadcast). The empty asm keeps each row's sum one chain in program order:
 * without it gcc re-associates the integer adds into a tree whose partial sums spill to the stack (the
 * kernel ran at 40% of the multiply-add throughput of the core). */
static inline __m256i add_maddubs(__m256i sum, __m256i w, const void* x) {
    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(w, broadcast4(x)));
    __asm__("" : "+x"(sum));
    return sum;
}

/* The 8 rows' int32 sums of one weight block against activation row j, j < rows. The sums are exact, so
 * both ways below give the same numbers. With AVX512-VNNI (where the library is built with it, see
 * build.py) one vpdpbusd does a multiply-add pair and its widening; each row then keeps two accumulators,
 * so that consecutive vpdpbusd of a row do not wait on each other's latency. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline __attribute__((always_inline)) void block_sums(int64_t format, const uint8_t* block,
                                                             const RowCursor* row, int rows, __m256i sums[ROWS]) {
    __m256i even[ROWS], odd[ROWS];
    for (int j = 0; j < rows; j++) even[j] = odd[j] = _mm256_setzero_si256();
    if (format == FORMAT_Q4_1) {
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (int i = 0; i < 4; i++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i*)(block + 32 * i));
            const __m256i first = _mm256_and_si256(packed, low);
            const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            for (int j = 0; j < rows; j++) {
                even[j] = _mm256_dpbusd_epi32(even[j], first, broadcast4(row[j].q + 4 * i));
                odd[j] = _mm256_dpbusd_epi32(odd[j], second, broadcast4(row[j].q + 4 * i + 16));
            }
        }
    } else { /* w + 128 (unsigned) times x, less 128 times the block's sum of x: exactly w times x */
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int i = 0; i < 8; i += 2) {
            const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(block + 32 * i)), flip);
            const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(block + 32 * i + 32)), flip);
            for (int j = 0; j < rows; j++) {
                even[j] = _mm256_dpbusd_epi32(even[j], w0, broadcast4(row[j].q + 4 * i));
                odd[j] = _mm256_dpbusd_epi32(odd[j], w1, broadcast4(row[j].q + 4 * i + 4));
            }
        }
        for (int j = 0; j < rows; j++) even[j] = _mm256_sub_epi32(even[j], _mm256_set1_epi32(128 * *row[j].qsum));
    }
    for (int j = 0; j < rows; j++) sums[j] = _mm256_add_epi32(even[j], odd[j]);
}
#else
static inline __attribute__((always_inline)) void block_sums(int64_t format, const uint8_t* block,
                                                             const RowCursor* row, int rows, __m256i sums[ROWS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int j = 0; j < rows; j++) sums[j] = _mm256_setzero_si256();
    if (format == FORMAT_Q4_1) {
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (int i = 0; i < 4; i++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i*)(block + 32 * i));
            const __m256i first = _mm256_and_si256(packed, low);
            const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            for (int j = 0; j < rows; j++) {
                sums[j] = add_maddubs(sums[j], first, row[j].q + 4 * i);
                sums[j] = add_maddubs(sums[j], second, row[j].q + 4 * i + 16);
            }
        }
        for (int j = 0; j < rows; j++) sums[j] = _mm256_madd_epi16(sums[j], ones);
    } else {
        for (int i = 0; i < 8; i++) {
            const __m256i w = _mm256_loadu_si256((const __m256i*)(block + 32 * i));
            for (int j = 0; j < rows; j++) {
                /* |x| times w with x's sign: the unsigned side of maddubs is the activation's */
                const __m256i signed_w = _mm256_sign_epi8(w, broadcast4(row[j].q + 4 * i));
                const __m256i pairs = _mm256_maddubs_epi16(broadcast4(row[j].abs + 4 * i), signed_w);
                sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(pairs, ones));
                __asm__("" : "+x"(sums[j])); /* one chain per row, as in add_maddubs */
            }
        }
    }
}
#endif

/* acc[j] (8 outputs of activation row j, j < rows) plus one weight block's contribution, for the 8 rows of
 * the group whose block starts at `block`; the cursors point at the block. Each row's sum runs in the same
 * order whatever `rows` is, so a token's output does not depend on which tokens share the call. */
static inline __attribute__((always_inline)) void block_step(int64_t format, const uint8_t* block,
                                                             const RowCursor* row, int rows, __m256 acc[ROWS]) {
    __m256i sums[ROWS];
    block_sums(format, block, row, rows, sums);
    const __m128i* halves = (const __m128i*)(block + (format == FORMAT_Q4_1 ? 128 : 256));
    const __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128(halves));
    for (int j = 0; j < rows; j++) {
        const __m256 dx = _mm256_broadcast_ss(row[j].scale);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[j]), _mm256_mul_ps(scales, dx), acc[j]);
    }
    if (format == FORMAT_Q4_1) {
        const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(halves + 1));
        for (int j = 0; j < rows; j++) acc[j] = _mm256_fmadd_ps(mins, _mm256_broadcast_ss(row[j].sum), acc[j]);
    }
}

/* Outputs n .. n + 7 (the group at `w`) of activation rows m .. m + rows - 1. */
static inline __attribute__((always_inline)) void group_rows(int64_t format, const BlockActivations* a,
                                                             const uint8_t* w, const float* bias, float* y,
                                                             int64_t n, int64_t N, int64_t m, int rows) {
    const int64_t num_blocks = a->K / BLOCK, bytes = group_block_bytes(format);
    __m256 acc[ROWS];
    RowCursor row[ROWS];
    for (int j = 0; j < rows; j++) {
        acc[j] = _mm256_setzero_ps();
        row[j] = row_cursor(a, m + j);
    }
    for (int64_t b = 0; b < num_blocks; b++) {
        if (rows == 1) /* a lone row does too little work per byte for the hardware prefetcher alone */
            for (int64_t line = 0; line < bytes; line += 64)
                _mm_prefetch((const char*)(w + b * bytes + line + PREFETCH_BYTES), _MM_HINT_T0);
        block_step(format, w + b * bytes, row, rows, acc);
        for (int j = 0; j < rows; j++) next_block(&row[j]);
    }
    const int64_t valid = N - n < COLUMNS ? N - n : COLUMNS;
    for (int j = 0; j < rows; j++) {
        float out[COLUMNS];
        _mm256_storeu_ps(out, acc[j]);
        for (int64_t c = 0; c < valid; c++) y[(m + j) * N + n + c] = out[c] + (bias != NULL ? bias[n + c] : 0.0f);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define WIDE 1
#define WIDE_Q8_0_MIN_ROWS 8
static inline __m512i load_pair(const uint8_t* a, const uint8_t* b) { /* 32 bytes of each group */
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                              _mm256_loadu_si256((const __m256i*)b), 1);
}

static inline __m512 halves_pair(const uint8_t* a, const uint8_t* b) { /* 8 float16 of each group */
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                                   _mm_loadu_si128((const __m128i*)b), 1));
}

static inline __m512i broadcast_word(const int8_t* p) { /* folded into vpdpbusd's memory operand */
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Two groups (16 output rows, blocks at b0 and b1) in one 512-bit vector, so that one broadcast activation
 * word serves 16 rows instead of 8. Lane for lane the same integer sums and the same float operations as
 * block_step: the same numbers. */
static inline __attribute__((always_inline)) void wide_block_step(int64_t format, const uint8_t* b0,
                                                                  const uint8_t* b1, const RowCursor* row,
                                                                  int rows, __m512 acc[ROWS]) {
    __m512i even[ROWS], odd[ROWS];
    for (int j = 0; j < rows; j++) even[j] = odd[j] = _mm512_setzero_si512();
    if (format == FORMAT_Q4_1) {
        const __m512i low = _mm512_set1_epi8(0x0F);
        for (int i = 0; i < 4; i++) {
            const __m512i packed = load_pair(b0 + 32 * i, b1 + 32 * i);
            const __m512i first = _mm512_and_si512(packed, low);
            const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            for (int j = 0; j < rows; j++) {
                even[j] = _mm512_dpbusd_epi32(even[j], first, broadcast_word(row[j].q + 4 * i));
                odd[j] = _mm512_dpbusd_epi32(odd[j], second, broadcast_word(row[j].q + 4 * i + 16));
            }
        }
    } else { /* as block_sums: w + 128 times x, less 128 times the sum of x */
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int i = 0; i < 8; i += 2) {
            const __m512i w0 = _mm512_xor_si512(load_pair(b0 + 32 * i, b1 + 32 * i), flip);
            const __m512i w1 = _mm512_xor_si512(load_pair(b0 + 32 * i + 32, b1 + 32 * i + 32), flip);
            for (int j = 0; j < rows; j++) {
                even[j] = _mm512_dpbusd_epi32(even[j], w0, broadcast_word(row[j].q + 4 * i));
                odd[j] = _mm512_dpbusd_epi32(odd[j], w1, broadcast_word(row[j].q + 4 * i + 4));
            }
        }
        for (int j = 0; j < rows; j++) even[j] = _mm512_sub_epi32(even[j], _mm512_set1_epi32(128 * *row[j].qsum));
    }
    const int64_t halves = format == FORMAT_Q4_1 ? 128 : 256;
    const __m512 scales = halves_pair(b0 + halves, b1 + halves);
    for (int j = 0; j < rows; j++) {
        const __m512 dx = _mm512_set1_ps(*row[j].scale);
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(even[j], odd[j]));
        acc[j] = _mm512_fmadd_ps(sums, _mm512_mul_ps(scales, dx), acc[j]);
    }
    if (format == FORMAT_Q4_1) {
        const __m512 mins = halves_pair(b0 + 144, b1 + 144);
        for (int j = 0; j < rows; j++) acc[j] = _mm512_fmadd_ps(mins, _mm512_set1_ps(*row[j].sum), acc[j]);
    }
}

/* Outputs n .. n + 15 (the groups at w and w + group_bytes) of rows m .. m + rows - 1. */
static inline __attribute__((always_inline)) void wide_group_rows(int64_t format, const BlockActivations* a,
                                                                  const uint8_t* w, int64_t group_bytes,
                                                                  const float* bias, float* y, int64_t n,
                                                                  int64_t N, int64_t m, int rows) {
    const int64_t num_blocks = a->K / BLOCK, bytes = group_block_bytes(format);
    __m512 acc[ROWS];
    RowCursor row[ROWS];
    for (int j = 0; j < rows; j++) {
        acc[j] = _mm512_setzero_ps();
        row[j] = row_cursor(a, m + j);
    }
    for (int64_t b = 0; b < num_blocks; b++) {
        const uint8_t *b0 = w + b * bytes, *b1 = b0 + group_bytes;
        if (rows == 1)
            for (int64_t line = 0; line < bytes; line += 64) {
                _mm_prefetch((const char*)(b0 + line + PREFETCH_BYTES), _MM_HINT_T0);
                _mm_prefetch((const char*)(b1 + line + PREFETCH_BYTES), _MM_HINT_T0);
            }
        wide_block_step(format, b0, b1, row, rows, acc);
        for (int j = 0; j < rows; j++) next_block(&row[j]);
    }
    const int64_t valid = N - n < 2 * COLUMNS ? N - n : 2 * COLUMNS;
    for (int j = 0; j < rows; j++) {
        float out[2 * COLUMNS];
        _mm512_storeu_ps(out, acc[j]);
        for (int64_t c = 0; c < valid; c++) y[(m + j) * N + n + c] = out[c] + (bias != NULL ? bias[n + c] : 0.0f);
    }
}

static inline __attribute__((always_inline)) void wide_group_columns(int64_t format, const BlockActivations* a,
                                                                     const uint8_t* w, int64_t group_bytes,
                                                                     const float* bias, float* y, int64_t n,
                                                                     int64_t N, int64_t first, int64_t last) {
    int64_t m = first;
    for (; m + ROWS <= last; m += ROWS) wide_group_rows(format, a, w, group_bytes, bias, y, n, N, m, ROWS);
    for (; m < last; m++) wide_group_rows(format, a, w, group_bytes, bias, y, n, N, m, 1);
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define AMX 1
#include "block_amx.c"
#endif
#else
#define WIDE 0
#endif
#ifndef AMX
#define AMX 0
#endif

static inline __attribute__((always_inline)) void group_columns(int64_t format, const BlockActivations* a,
                                                                const uint8_t* w, const float* bias, float* y,
                                                                int64_t n, int64_t N, int64_t first, int64_t last) {
    int64_t m = first;
    for (; m + ROWS <= last; m += ROWS) group_rows(format, a, w, bias, y, n, N, m, ROWS);
    for (; m < last; m++) group_rows(format, a, w, bias, y, n, N, m, 1);
}

/* Rows from which a pass is bound by arithmetic (its threads then share the column groups dynamically); fewer
 * rows are bound by reading the weights. */
#define DYNAMIC_MIN_ROWS 16
#if AMX
_Static_assert(AMX_MIN_ROWS >= DYNAMIC_MIN_ROWS, "tile passes are handed out with the dynamic ones");
#endif

/* Outputs n .. n + 7 (with the wide step: n .. n + 15) of rows first .. last - 1. Constant formats, so
 * each call is compiled for its layout. */
/* Outputs per pass of group_pass: two groups where the wide step is built. */
#define PASS_COLUMNS (WIDE ? 2 * COLUMNS : COLUMNS)

static inline void group_pass(int64_t format, const BlockActivations* a, const uint8_t* w, int64_t group_bytes,
                              const float* bias, float* y, int64_t n, int64_t N, int64_t first, int64_t last) {
    const uint8_t* group = w + n / COLUMNS * group_bytes;
#if WIDE
    /* Two groups in one wide pass when there are two; but Q8_0 with few rows is bound by reading its
     * weights, and there one stream (one group after the other) reads faster than two side by side. */
    if (n + COLUMNS < N && (format == FORMAT_Q4_1 || last - first >= WIDE_Q8_0_MIN_ROWS)) {
        if (format == FORMAT_Q4_1)
            wide_group_columns(FORMAT_Q4_1, a, group, group_bytes, bias, y, n, N, first, last);
        else
            wide_group_columns(FORMAT_Q8_0, a, group, group_bytes, bias, y, n, N, first, last);
        return;
    }
#endif
    for (int64_t g = n; g < n + PASS_COLUMNS && g < N; g += COLUMNS, group += group_bytes) {
        if (format == FORMAT_Q4_1)
            group_columns(FORMAT_Q4_1, a, group, bias, y, g, N, first, last);
        else
            group_columns(FORMAT_Q8_0, a, group, bias, y, g, N, first, last);
    }
}

/* Bytes of one group of 8 packed weight rows of K features in `format`, or -1 for an unknown format. */
int64_t tm_block_group_bytes(int64_t format, int64_t K) {
    return format == FORMAT_Q4_1 || format == FORMAT_Q8_0 ? K / BLOCK * group_block_bytes(format) : -1;
}

/* x [M, K] float32, w [ceil(N / 8), tm_block_group_bytes(format, K)] packed as above, bias [N] or NULL,
 * y [M, N] float32. K must be a multiple of 32. Returns 0, -1 if the scratch memory could not be
 * allocated, -2 for an unknown format. */
int tm_block_linear(const float* x, const uint8_t* w, int64_t format, const float* bias, float* y, int64_t M,
                    int64_t N, int64_t K) {
    if (format != FORMAT_Q4_1 && format != FORMAT_Q8_0) return -2;
    const int64_t num_blocks = K / BLOCK, group_bytes = num_blocks * group_block_bytes(format);
    int8_t* xq = malloc((size_t)(2 * M * K));
    float* xs = malloc((size_t)(3 * M * num_blocks) * sizeof(float)); /* scales, sums, integer sums */
#if AMX
    const AmxActivations xt = amx_activations(M, num_blocks); /* values NULL: every pass takes the vector path */
#endif
    if (xq == NULL || xs == NULL) {
        free(xq);
        free(xs);
#if AMX
        free(xt.values);
#endif
        return -1;
    }
    int32_t* qsum = (int32_t*)(xs + 2 * M * num_blocks);
    const BlockActivations a = {xq, (const uint8_t*)(xq + M * K), xs, xs + M * num_blocks, qsum, K};
    const int64_t step = PASS_COLUMNS;
#pragma omp parallel
    {
#if AMX
        AmxThread amx = {NULL, NULL, 0};
#endif
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * num_blocks; i++) {
            int8_t* q = xq + i * BLOCK;
            quantize_block(x + i * BLOCK, q, xs + i);
            qsum[i] = block_sum(q);
            xs[M * num_blocks + i] = xs[i] * (float)qsum[i];
            const __m256i v = _mm256_loadu_si256((const __m256i*)q);
            _mm256_storeu_si256((__m256i*)(xq + M * K + i * BLOCK), _mm256_sign_epi8(v, v));
#if AMX
            if (xt.values != NULL) amx_store_block(&xt, num_blocks, i, v, xs[i], xs[M * num_blocks + i]);
#endif
        }
        for (int64_t first = 0; first < M; first += ROW_CHUNK) {
            const int64_t last = first + ROW_CHUNK < M ? first + ROW_CHUNK : M;
            if (last - first >= DYNAMIC_MIN_ROWS) {
                /* Handed out 4 groups at a time: a thread slowed by its core's other tenants takes fewer. */
#pragma omp for schedule(dynamic, 4)
                for (int64_t n = 0; n < N; n += step) {
#if AMX
                    /* Tiles for two groups of enough rows; the same numbers as the vector path. */
                    if (xt.values != NULL && last - first >= AMX_MIN_ROWS && n + COLUMNS < N &&
                        amx_thread_ready(&amx, num_blocks)) {
                        amx_group_pass(format, &a, &xt, w, group_bytes, bias, y, n, N, first, last, &amx);
                        continue;
                    }
#endif
                    group_pass(format, &a, w, group_bytes, bias, y, n, N, first, last);
                }
            } else {
                /* A few rows read the weights from memory: each thread streams one contiguous half. */
#pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n += step) group_pass(format, &a, w, group_bytes, bias, y, n, N, first, last);
            }
        }
#if AMX
        amx_thread_done(&amx);
#endif
    }
    free(xq);
    free(xs);
#if AMX
    free(xt.values);
#endif
    return 0;
}
