/* A whole decoder layer of a quantized Llama-family model (int8, or a GGUF file's blocks) for a decode-only
 * step, in one call.
 *
 * The layer runs the same kernels, in the same order, as the model's modules do one call at a time
 * (tokenmill/model/llama.py with quantized weights: residual add + RMSNorm, QKV, rotary, KV write + paged
 * attention, output projection, residual add + RMSNorm, gate/up, SiLU-and-multiply, down), so its results
 * are bit for bit theirs. What it saves is everything between the kernels: at decode a layer's arithmetic
 * takes a few hundred microseconds and the Python around nine separate kernel calls about a hundred more.
 * Compiled after the kernels it calls, in kernels.c.
 */
#include <stdint.h>

#define FORMAT_INT8 0 /* int8_linear.c's weights; FORMAT_Q4_1 and FORMAT_Q8_0 are block_linear.c's */

typedef struct {
    const void* weight;  /* FORMAT_INT8: int8 [out_features, in_features]; else block_linear.c's rows */
    const float* scales; /* FORMAT_INT8: [out_features]; else unused */
    const float* bias;   /* [out_features] or NULL */
    int64_t out_features, in_features, format;
} LayerWeight;

typedef struct {
    const float *input_norm, *post_attention_norm; /* [hidden] RMSNorm weights */
    float eps;
    LayerWeight qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [num_blocks, block_size, num_kv_heads, head_dim] each */
    int64_t num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int kv_format; /* the caches' element type: KV_FLOAT32, KV_FLOAT16 or KV_BFLOAT16 */
} DecoderLayer;

typedef struct {
    int64_t num_seqs;            /* one new token each */
    const float *cos, *sin;      /* [num_seqs, head_dim]: the tokens' rotations */
    const int64_t* block_tables; /* [num_seqs, table_stride] */
    int64_t table_stride;
    const int64_t *seq_lens, *slots; /* [num_seqs] each: lengths with the new token, its cache slot */
    float* workspace;                /* tm_decode_layer_workspace(layer) floats per sequence */
} DecodeStep;

static int linear(const LayerWeight* w, const float* x, float* y, int64_t rows) {
    if (w->format == FORMAT_INT8)
        return tm_int8_linear(x, w->weight, w->scales, w->bias, y, rows, w->out_features, w->in_features);
    return tm_block_linear(x, w->weight, w->format, w->bias, y, rows, w->out_features, w->in_features) ? -1 : 0;
}

/* Floats of scratch per sequence that tm_decode_layer needs in step->workspace. */
int64_t tm_decode_layer_workspace(const DecoderLayer* layer) {
    const int64_t hidden = layer->o.out_features, qk = (layer->num_heads + layer->num_kv_heads) * layer->head_dim;
    return 2 * hidden + layer->qkv.out_features + qk + layer->o.in_features + layer->gate_up.out_features +
           layer->down.in_features;
}

/* hidden [B, hidden]: the layer's input, overwritten with its output (before the next residual add).
 * residual [B, hidden]: the residual stream, updated in place; with first != 0 it is set from hidden (the
 * first layer has no residual yet). Returns 0, or -1 if a kernel could not allocate its scratch. */
int tm_decode_layer(const DecoderLayer* layer, const DecodeStep* step, float* hidden, float* residual, int first) {
    const int64_t B = step->num_seqs, H = layer->num_heads, KV = layer->num_kv_heads, D = layer->head_dim;
    const int64_t hidden_size = layer->o.out_features, qkv_width = layer->qkv.out_features, qk_width = (H + KV) * D;
    float* normed = step->workspace;
    float* qkv = normed + B * hidden_size;
    float* qk = qkv + B * qkv_width; /* rotated queries and keys */
    float* attention = qk + B * qk_width;
    float* projected = attention + B * layer->o.in_features;
    float* gate_up = projected + B * hidden_size;
    float* activated = gate_up + B * layer->gate_up.out_features;
    int status = 0;

    if (first) {
        for (int64_t i = 0; i < B * hidden_size; i++) residual[i] = hidden[i];
        tm_rms_norm(hidden, NULL, NULL, layer->input_norm, normed, B, hidden_size, layer->eps);
    } else {
        tm_rms_norm(hidden, residual, residual, layer->input_norm, normed, B, hidden_size, layer->eps);
    }
    status |= linear(&layer->qkv, normed, qkv, B);
    tm_rotary(qkv, qkv_width, qk, step->cos, step->sin, B, H + KV, D);
    status |= tm_paged_decode_attention(qk, qk_width, layer->k_cache, layer->v_cache, step->block_tables,
                                        step->table_stride, step->seq_lens, attention, B, H, KV, D,
                                        layer->block_size, layer->scale, qk + H * D, qk_width, qkv + qk_width,
                                        qkv_width, step->slots, layer->kv_format);
    status |= linear(&layer->o, attention, projected, B);
    tm_rms_norm(projected, residual, residual, layer->post_attention_norm, normed, B, hidden_size, layer->eps);
    status |= linear(&layer->gate_up, normed, gate_up, B);
    tm_silu_and_mul(gate_up, activated, B, layer->down.in_features);
    status |= linear(&layer->down, activated, hidden, B);
    return status ? -1 : 0;
}
