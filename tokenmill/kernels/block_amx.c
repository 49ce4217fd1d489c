/* The GGUF block kernel's integer products on AMX tiles (block_linear.c includes this file where the
 * library is built with AMX-INT8, which build.py adds on CPUs that have it).
 *
 * One tile multiply per weight block: C [16 tokens, 16 outputs] int32 = A [16 tokens, 32 int8 activations]
 * . B, where B holds the block's 32 weights of 16 output rows (two groups) as AMX wants them: row r the 4
 * weights 4r .. 4r + 3 of each output, output after output. That is the groups' own layout (load i of a
 * group holds weights 4i .. 4i + 3 of its 8 rows), so B's rows are the two groups' loads side by side,
 * and a Q4_1 block's nibbles split into rows 0-3 (low halves) and 4-7 (high halves). Activations are
 * signed and Q4_1's values unsigned (tdpbsud), Q8_0's signed (tdpbssd, no offset needed).
 *
 * The sums are the exact integers the vector steps compute, and each output's float operations are
 * wide_block_step's, in the same order (scale product, one multiply-add per block, Q4_1's minimum term
 * after it): the outputs equal the vector kernel's bit for bit, so a row's result does not depend on
 * whether its call had enough rows for the tiles. The tiles pay where a call has many rows (prefill, the
 * LM head of a large batch): the weight tiles of a pass are prepared once and serve every 16 rows.
 *
 * Only whole tiles of 16 rows take the tiles (a call's last few rows take the vector path): with a constant
 * row count gcc keeps the 16 accumulators in registers (with a variable one they lived on the stack, each
 * multiply-add a load and a store: 1.2x slower). Each row's block scales are stored in tile order too,
 * so a block's 16 scales are read at constant offsets from one pointer (another 1.1x).
 *
 * Linux hands out the tile registers only to a process that asks (arch_prctl); where it refuses, every
 * call takes the vector path.
 */
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TILE_ROWS 16 /* activation rows of one tile */
#define AMX_MIN_ROWS 16  /* rows of a pass from which the tiles are used (fewer: bound by weight reads) */
#define AMX_WEIGHT_TILE_BYTES 512 /* 8 rows of 64 bytes: one block of 16 outputs */
#define AMX_ACTIVATION_TILE_BYTES 512 /* 16 rows of 32 bytes: one block of 16 rows */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether this process may use the tile registers (asked of the kernel once). */
static int amx_permitted(void) {
    static int state; /* 0: not asked yet, 1: granted, -1: refused */
    int seen = __atomic_load_n(&state, __ATOMIC_RELAXED);
    if (seen == 0) {
        seen = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&state, seen, __ATOMIC_RELAXED);
    }
    return seen == 1;
}

/* A call's activations in tile order, for its rows in whole tiles of 16: the tiles one after the other,
 * each its blocks in order. A block holds its 16 rows' 32 values contiguous (one tile load reads 8 whole
 * cache lines in a row instead of 16 rows K bytes apart), and likewise their 16 scales and scaled sums. */
typedef struct {
    int8_t* values; /* NULL: the call takes the vector path */
    float* scales;
    float* sums;
    int64_t rows; /* a multiple of 16 */
} AmxActivations;

/* Room for the tile-ordered activations of a call of M rows; values NULL where the call takes the vector
 * path (too few rows, the tile registers refused, no memory). */
static AmxActivations amx_activations(int64_t M, int64_t num_blocks) {
    AmxActivations t = {NULL, NULL, NULL, M / AMX_TILE_ROWS * AMX_TILE_ROWS};
    if (M < AMX_MIN_ROWS || !amx_permitted()) return t;
    const int64_t blocks = t.rows * num_blocks; /* of 32 values */
    t.values = aligned_alloc(64, (size_t)(blocks * (BLOCK + 2 * sizeof(float))));
    if (t.values != NULL) t.scales = (float*)(t.values + blocks * BLOCK), t.sums = t.scales + blocks;
    return t;
}

/* Where block i of the call (row i / num_blocks, block i % num_blocks) lies among the tile-ordered blocks. */
static inline int64_t amx_block_index(int64_t num_blocks, int64_t i) {
    const int64_t m = i / num_blocks, b = i % num_blocks;
    return (m / AMX_TILE_ROWS * num_blocks + b) * AMX_TILE_ROWS + m % AMX_TILE_ROWS;
}

/* Block i's quantized values, scale and scaled sum, in tile order (rows past t->rows are not kept). */
static inline void amx_store_block(const AmxActivations* t, int64_t num_blocks, int64_t i, __m256i values,
                                   float scale, float sum) {
    if (i >= t->rows * num_blocks) return;
    const int64_t at = amx_block_index(num_blocks, i);
    _mm256_store_si256((__m256i*)(t->values + at * BLOCK), values);
    t->scales[at] = scale, t->sums[at] = sum;
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles 0 and 1: sums; 2 and 3: activations; 4 and 5: weights (two sets, so that one block's multiply
 * runs while the previous block's sums are scaled). Per thread: each OpenMP thread configures its own. */
static void amx_configure(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 2; t++) {
        config.rows[t] = AMX_TILE_ROWS, config.bytes_per_row[t] = 64;
        config.rows[2 + t] = AMX_TILE_ROWS, config.bytes_per_row[2 + t] = BLOCK;
        config.rows[4 + t] = 8, config.bytes_per_row[4 + t] = 64;
    }
    _tile_loadconfig(&config);
}

/* The weight tiles of every block of the two groups at g0 and g1, into `tiles` (num_blocks x 512 bytes). */
static inline __attribute__((always_inline)) void amx_weight_tiles(int64_t format, const uint8_t* g0,
                                                                   const uint8_t* g1, int64_t num_blocks,
                                                                   uint8_t* tiles) {
    const int64_t bytes = group_block_bytes(format);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < num_blocks; b++, tiles += AMX_WEIGHT_TILE_BYTES) {
        const uint8_t *b0 = g0 + b * bytes, *b1 = g1 + b * bytes;
        if (format == FORMAT_Q4_1) {
            for (int i = 0; i < 4; i++) {
                const __m512i packed = load_pair(b0 + 32 * i, b1 + 32 * i);
                _mm512_store_si512(tiles + 64 * i, _mm512_and_si512(packed, low));
                _mm512_store_si512(tiles + 64 * (4 + i), _mm512_and_si512(_mm512_srli_epi16(packed, 4), low));
            }
        } else {
            for (int i = 0; i < 8; i++) _mm512_store_si512(tiles + 64 * i, load_pair(b0 + 32 * i, b1 + 32 * i));
        }
    }
}

/* acc[j] (16 outputs of row j) plus one block's contribution, from the block's tile of sums; xs and xsum
 * hold the 16 rows' block scales and scaled block sums. As wide_block_step. */
static inline __attribute__((always_inline)) void amx_scale_sums(int64_t format, const int32_t* sums,
                                                                 const uint8_t* b0, const uint8_t* b1,
                                                                 const float* xs, const float* xsum,
                                                                 __m512 acc[AMX_TILE_ROWS]) {
    const int64_t halves = format == FORMAT_Q4_1 ? 128 : 256;
    const __m512 scales = halves_pair(b0 + halves, b1 + halves);
    const __m512 mins = format == FORMAT_Q4_1 ? halves_pair(b0 + 144, b1 + 144) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < AMX_TILE_ROWS; j++) {
        const __m512 block_sums = _mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * j));
        acc[j] = _mm512_fmadd_ps(block_sums, _mm512_mul_ps(scales, _mm512_set1_ps(xs[j])), acc[j]);
        if (format == FORMAT_Q4_1) acc[j] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xsum[j]), acc[j]);
    }
}

/* Tile loads and stores that name the memory they read and write (each tile here is 512 or 1024 contiguous
 * bytes): gcc's _tile_loadd names none, so the compiler could move the stores that just filled a tile's
 * bytes (amx_weight_tiles) past it; its _tile_stored clobbers all memory. */
#define AMX_LOAD(tile, base, stride)                                                                 \
    __asm__ volatile("tileloadd (%1,%2,1), %%tmm" #tile ::"m"(*(const uint8_t(*)[512])(const void*)(base)), \
                     "r"((const void*)(base)), "r"((long)(stride)))
#define AMX_STORE_SUMS(tile, sums)                                                                   \
    __asm__ volatile("tilestored %%tmm" #tile ", (%1,%2,1)"                                          \
                     : "=m"(*(int32_t(*)[256])(void*)(sums))                                         \
                     : "r"((void*)(sums)), "r"(64L))

#define AMX_MULTIPLY(format, sums, activations, weights)                    \
    do {                                                                    \
        if ((format) == FORMAT_Q4_1)                                        \
            _tile_dpbsud(sums, activations, weights); /* signed x unsigned */ \
        else                                                                \
            _tile_dpbssd(sums, activations, weights);                        \
    } while (0)

/* Outputs n .. n + 15 of the tile of rows m .. m + 15. */
static inline __attribute__((always_inline)) void amx_tile_rows(int64_t format, const AmxActivations* x,
                                                                int64_t num_blocks, const uint8_t* tiles,
                                                                const uint8_t* g0, const uint8_t* g1,
                                                                const float* bias, float* y, int64_t n, int64_t N,
                                                                int64_t m, int32_t* sums) {
    const int64_t bytes = group_block_bytes(format), first_block = m / AMX_TILE_ROWS * num_blocks;
    const int8_t* tile = x->values + first_block * AMX_ACTIVATION_TILE_BYTES; /* this tile's blocks */
    const float *xs = x->scales + first_block * AMX_TILE_ROWS, *xsum = x->sums + first_block * AMX_TILE_ROWS;
    __m512 acc[AMX_TILE_ROWS];
#pragma GCC unroll 16
    for (int j = 0; j < AMX_TILE_ROWS; j++) {
        acc[j] = _mm512_setzero_ps();
        /* Output rows N floats apart fall in one L1 set when N * 4 is a multiple of 4 KB (the LM head,
         * gate/up): fetched into L2 now, their stores at the end do not wait on memory. */
        _mm_prefetch((const char*)(y + (m + j) * N + n), _MM_HINT_T1);
    }
    /* Block b's multiply into a sums tile, and later its sums stored and scaled into acc. */
#define AMX_MULTIPLY_BLOCK(b, sums_tile, activation_tile, weight_tile)                  \
    do {                                                                              \
        AMX_LOAD(activation_tile, tile + AMX_ACTIVATION_TILE_BYTES * (b), BLOCK);     \
        AMX_LOAD(weight_tile, tiles + AMX_WEIGHT_TILE_BYTES * (b), 64);               \
        _tile_zero(sums_tile);                                                        \
        AMX_MULTIPLY(format, sums_tile, activation_tile, weight_tile);                \
    } while (0)
#define AMX_SCALE_BLOCK(b, sums_tile, buffer)                                                                     \
    do {                                                                                                          \
        AMX_STORE_SUMS(sums_tile, buffer);                                                                        \
        amx_scale_sums(format, buffer, g0 + (b) * bytes, g1 + (b) * bytes, xs + AMX_TILE_ROWS * (b),             \
                       xsum + AMX_TILE_ROWS * (b), acc);                                                           \
    } while (0)
    int64_t b = 0;
    for (; b + 2 <= num_blocks; b += 2) { /* the second block multiplies while the first is scaled */
        AMX_MULTIPLY_BLOCK(b, 0, 2, 4);
        AMX_MULTIPLY_BLOCK(b + 1, 1, 3, 5);
        AMX_SCALE_BLOCK(b, 0, sums);
        AMX_SCALE_BLOCK(b + 1, 1, sums + 256);
    }
    if (b < num_blocks) {
        AMX_MULTIPLY_BLOCK(b, 0, 2, 4);
        AMX_SCALE_BLOCK(b, 0, sums);
    }
#undef AMX_MULTIPLY_BLOCK
#undef AMX_SCALE_BLOCK
    const int64_t valid = N - n < 2 * COLUMNS ? N - n : 2 * COLUMNS;
    if (valid == 2 * COLUMNS) { /* the vector path's scalar additions, 16 at a time */
        const __m512 add = bias != NULL ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int j = 0; j < AMX_TILE_ROWS; j++) _mm512_storeu_ps(y + (m + j) * N + n, _mm512_add_ps(acc[j], add));
        return;
    }
#pragma GCC unroll 16
    for (int j = 0; j < AMX_TILE_ROWS; j++) {
        float out[2 * COLUMNS];
        _mm512_storeu_ps(out, acc[j]);
        for (int64_t c = 0; c < valid; c++) y[(m + j) * N + n + c] = out[c] + (bias != NULL ? bias[n + c] : 0.0f);
    }
}

/* A thread's tile state and scratch: configured and allocated on its first tile pass of a call. */
typedef struct {
    uint8_t* weight_tiles; /* num_blocks x 512 bytes */
    int32_t* sums;         /* two tiles of 16 x 16 int32 */
    int failed;            /* the scratch could not be allocated: the vector path */
} AmxThread;

static int amx_thread_ready(AmxThread* t, int64_t num_blocks) {
    if (t->weight_tiles == NULL && !t->failed) {
        t->weight_tiles = aligned_alloc(64, (size_t)(num_blocks * AMX_WEIGHT_TILE_BYTES + 2 * 256 * sizeof(int32_t)));
        t->failed = t->weight_tiles == NULL;
        if (!t->failed) {
            t->sums = (int32_t*)(t->weight_tiles + num_blocks * AMX_WEIGHT_TILE_BYTES);
            amx_configure();
        }
    }
    return !t->failed;
}

static void amx_thread_done(AmxThread* t) {
    if (t->weight_tiles != NULL) {
        _tile_release(); /* tile state back to its initial value: nothing more to save at context switches */
        free(t->weight_tiles);
    }
}

/* Outputs n .. n + 15 of the tiles of rows first .. last - 1 (whole tiles). */
static inline __attribute__((always_inline)) void amx_format_pass(int64_t format, const AmxActivations* x,
                                                                  int64_t num_blocks, const uint8_t* g0,
                                                                  const uint8_t* g1, const float* bias, float* y,
                                                                  int64_t n, int64_t N, int64_t first, int64_t last,
                                                                  const AmxThread* t) {
    amx_weight_tiles(format, g0, g1, num_blocks, t->weight_tiles);
    for (int64_t m = first; m < last; m += AMX_TILE_ROWS)
        amx_tile_rows(format, x, num_blocks, t->weight_tiles, g0, g1, bias, y, n, N, m, t->sums);
}

static inline void group_pass(int64_t format, const BlockActivations* a, const uint8_t* w, int64_t group_bytes,
                              const float* bias, float* y, int64_t n, int64_t N, int64_t first, int64_t last);

/* Outputs n .. n + 15 (two groups; the caller checks there are two) of rows first .. last - 1 (first a
 * multiple of 16): whole tiles of rows on the tiles, the rest on the vector path. Constant formats, so
 * each call is compiled for its layout. */
static void amx_group_pass(int64_t format, const BlockActivations* a, const AmxActivations* x, const uint8_t* w,
                           int64_t group_bytes, const float* bias, float* y, int64_t n, int64_t N, int64_t first,
                           int64_t last, const AmxThread* t) {
    const uint8_t* g0 = w + n / COLUMNS * group_bytes;
    const int64_t num_blocks = a->K / BLOCK, tiled = first + (last - first) / AMX_TILE_ROWS * AMX_TILE_ROWS;
    if (format == FORMAT_Q4_1)
        amx_format_pass(FORMAT_Q4_1, x, num_blocks, g0, g0 + group_bytes, bias, y, n, N, first, tiled, t);
    else
        amx_format_pass(FORMAT_Q8_0, x, num_blocks, g0, g0 + group_bytes, bias, y, n, N, first, tiled, t);
    if (tiled < last) group_pass(format, a, w, group_bytes, bias, y, n, N, tiled, last);
}
