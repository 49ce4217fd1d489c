/* Every CPU kernel of tokenmill in one library: built once (one compiler run at start-up, cached) and
 * loaded once by tokenmill/kernels/cpu.py. Each included file is a kernel with its own notes. */
#include "int8_linear.c"
#include "block_linear.c" /* after int8_linear.c: it uses its activation rounding */
#include "layer_ops.c"
#include "paged_attention.c"
#include "prefill_attention.c"
#include "decode_layer.c"
