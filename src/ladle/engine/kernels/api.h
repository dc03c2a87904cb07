/* The library's C ABI: what `native.py` calls through ctypes.
 *
 * Plain C types only, and no torch: one build of the library serves every torch version and
 * every Python, and loads without a compiler. Tensors arrive as pointers with their sizes and
 * strides (in elements); floats are float32 unless named. Calls that read memory through
 * indices a caller gives (block tables, slots, lengths) check them first and return nonzero
 * with a message in ladle_last_error(); the others trust their arguments (native.py checks
 * shapes and dtypes before calling). `native.py` mirrors these structs field for field. */
#ifndef LADLE_KERNELS_API_H_
#define LADLE_KERNELS_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A linear weight [rows, cols]: format 0 float32, 1 float16, 2 bfloat16, 3 int4, 4 int8,
 * 5 int8 with a scale per 16 k, 6 int6 with a scale per 16 k (kernels.h: WeightFormat;
 * quant_linear.cpp: the layouts). */
typedef struct {
  int32_t format;
  int32_t has_zeros;
  int64_t rows, cols;
  const void* data;
  const void* scales;
} LadleWeight;

/* A linear layer's weight: one LadleWeight, or up to three stacked along the rows (a fused
 * projection whose checkpoint parts have different block types: Q4_K_M's q and k in Q4_K
 * beside its v in Q6_K); part i's outputs follow part i - 1's. */
#define LADLE_MAX_PARTS 3
typedef struct {
  int32_t num_parts;
  int32_t reserved;
  LadleWeight parts[LADLE_MAX_PARTS];
} LadleLinear;

/* One decoder layer (decoder.cpp). Norm weights are float32 [hidden] (q/k norms [head_dim]),
 * Gemma's (1 + w) already formed; a pointer that a layer lacks is null. */
typedef struct {
  const float* input_norm;
  LadleLinear qkv;
  const float* qkv_bias;
  const float* q_norm;
  const float* k_norm;
  LadleLinear o;
  const float* o_bias;
  const float* post_attention_norm; /* plain: before the MLP; sandwich: after attention */
  const float* pre_feedforward_norm; /* sandwich only */
  const float* post_feedforward_norm; /* sandwich only */
  LadleLinear gate_up;
  LadleLinear down;
  float scale; /* of the attention scores */
  float softcap; /* > 0: scores soft-capped */
  int64_t window; /* > 0: a sliding-window layer */
  int32_t rope; /* 0: the global cos and sin, 1: the local ones */
  int32_t activation; /* 0: SiLU, 1: tanh-GELU */
} LadleLayer;

typedef struct {
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim;
  float eps;
  const LadleLayer* layers;
} LadleDecoder;

/* cos and sin [T, rotary_dim] for the step's tokens (rotary.py's layout), and the local ones
 * (Gemma 3's sliding layers; the global ones again otherwise). */
typedef struct {
  const float* cos;
  const float* sin;
  const float* cos_local;
  const float* sin_local;
  int64_t rotary_dim;
} LadleRope;

/* A step's cache: per layer, pools [kv_heads, num_slots, head_dim] (contiguous, float32 or
 * float16); slot = block_tables[b][p / block_size] * block_size + p % block_size. The step's
 * T rows are each sequence's query_lens[b] rows in turn, ending at position lengths[b] - 1;
 * prefill writes row i's keys and values at slots[i], decode (one row a sequence) at its last
 * position. */
typedef struct {
  void* const* pools_k;
  void* const* pools_v;
  int32_t half;
  int32_t is_decode;
  int64_t num_slots;
  const int32_t* block_tables;
  int64_t table_stride, num_seqs, block_size;
  const int64_t* lengths;
  const int64_t* query_lens;
  const int64_t* slots; /* [T]; unused by decode */
} LadleCache;

/* One layer's pools for the attention calls: any strides; block_tables null means position p
 * is in slot p (a contiguous cache of `block_size` positions). */
typedef struct {
  void* pool_k;
  void* pool_v;
  int32_t half;
  int64_t kv_heads, num_slots, head_dim, v_head_dim;
  int64_t k_head_stride, k_row_stride, v_head_stride, v_row_stride;
  const int32_t* block_tables;
  int64_t table_stride, num_seqs, block_size;
  const int64_t* lengths;
  const int64_t* query_lens;
} LadleKV;

#define LADLE_API __attribute__((visibility("default")))

LADLE_API const char* ladle_isa(void); /* the instruction set this build targets */
LADLE_API const char* ladle_source_hash(void); /* of the sources it was built from */
LADLE_API const char* ladle_last_error(void); /* the calling thread's last failed call */
LADLE_API void ladle_set_num_threads(int32_t n);
LADLE_API int32_t ladle_get_num_threads(void);

LADLE_API void ladle_linear(const LadleLinear* w, const float* x, int64_t n, float* out);
LADLE_API void ladle_rms_norm(const float* x, int64_t count, int64_t inner, int64_t stride0,
                    int64_t stride1, int64_t n, const float* w, float eps, float* out);
LADLE_API void ladle_rotary(const float* x, int64_t count, int64_t inner, int64_t stride0, int64_t stride1,
                  int64_t heads, int64_t head_dim, const float* cos, const float* sin,
                  int64_t rotary_dim, float* out);
LADLE_API void ladle_gated_activation(const float* x, int64_t count, int64_t inner, int64_t stride0,
                            int64_t stride1, int64_t half_width, int32_t activation, float* out);
/* Writes k [n, kv_heads, head_dim], v [n, kv_heads, v_head_dim] (heads contiguous, rows at the
 * strides given) at slots[i]; with slots null (a decode step), row b at sequence b's last
 * position, lengths[b] - 1. */
LADLE_API int32_t ladle_store_kv(const LadleKV* kv, const float* k, int64_t k_row_stride, const float* v,
                       int64_t v_row_stride, const int64_t* slots, int64_t n);
/* q [n, heads, head_dim] (heads contiguous, rows q_stride apart) -> out [n, heads * v_head_dim].
 * Decode: one row per sequence, over positions 0 .. lengths[b] - 1; else query_lens[b] rows of
 * each sequence. window > 0 and softcap > 0 as LadleLayer's. */
LADLE_API int32_t ladle_attention(const LadleKV* kv, const float* q, int64_t q_stride, int64_t n,
                        int64_t heads, float scale, int64_t window, float softcap,
                        int32_t is_decode, float* out);
/* x [T, hidden] through every layer, in place. */
LADLE_API int32_t ladle_decoder_layers(const LadleDecoder* model, const LadleCache* cache,
                             const LadleRope* rope, float* x, int64_t T);

#ifdef __cplusplus
}  // extern "C"

#include "kernels.h"

namespace ladle_kernels {

inline int64_t rows_of(const LadleLinear& w) {
  int64_t rows = 0;
  for (int32_t i = 0; i < w.num_parts; ++i) rows += w.parts[i].rows;
  return rows;
}

// out [N, rows_of(w)] = x [N, cols] @ w.T, each part into its own columns.
inline void linear(const float* x, int64_t N, const LadleLinear& w, float* out) {
  const int64_t ldo = rows_of(w);
  for (int32_t i = 0, column = 0; i < w.num_parts; column += w.parts[i].rows, ++i) {
    const LadleWeight& p = w.parts[i];
    linear(x, N, Weight{p.format, p.has_zeros, p.rows, p.cols, p.data, p.scales}, out + column,
           ldo);
  }
}

// Layer `layer`'s pools of a LadleCache.
inline PagedStep paged_step(const LadleCache& c, int64_t kv_heads, int64_t head_dim,
                            int64_t layer) {
  const int64_t head_stride = c.num_slots * head_dim;
  return PagedStep{c.pools_k[layer], c.pools_v[layer], c.half != 0, kv_heads, head_dim,
                   head_dim, head_stride, head_dim, head_stride, head_dim, c.block_tables,
                   c.table_stride, c.num_seqs, c.block_size, c.lengths, c.query_lens};
}

void decoder_layers(const LadleDecoder& model, const LadleCache& cache, const LadleRope& rope,
                    float* x, int64_t T);

}  // namespace ladle_kernels
#endif

#endif /* LADLE_KERNELS_API_H_ */
