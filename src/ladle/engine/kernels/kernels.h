// The kernels' C++ entry points, shared by the C ABI (api.cpp) and the decoder (decoder.cpp).
// They trust their arguments: api.cpp checks what a caller may get wrong.
#pragma once

#include <cstdint>

#include "attention_rows.h"

namespace ladle_kernels {

// A linear layer's weight [rows = out features, cols = in features] in one of its resident
// forms (`quant/int4.py`, `quant/int8.py`, or dense). Also the C ABI's `LadleWeight`.
enum WeightFormat : int32_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kInt4 = 3,  // nibbles, fp16 scales (and zeros) per 32 k
  kInt8 = 4,  // bytes, fp16 scales (and zeros) per 32 k
  kInt8Group16 = 5,  // bytes, fp16 scales per 16 k
  kInt6Group16 = 6,  // 6 bits less 32 (a nibble plane, then a top-bit plane), scales per 16 k
};

struct Weight {
  int32_t format;
  int32_t has_zeros;  // quantized forms: scales then zeros per group
  int64_t rows, cols;
  const void* data;
  const void* scales;  // quantized forms only
};

enum Activation : int32_t { kSilu = 0, kGeluTanh = 1 };

// A tensor of rows: every dimension but the last indexes rows (at most two of them).
struct Rows {
  const float* base;
  int64_t count, inner, stride0, stride1;  // rows = outer * inner; row r at base + offset(r)

  const float* row(int64_t r) const {
    return base + (r / inner) * stride0 + (r % inner) * stride1;
  }
};

// out [N, w.rows] (rows ldo apart) = x [N, w.cols] @ w.T
void linear(const float* x, int64_t N, const Weight& w, float* out, int64_t ldo);

// out [count, n] = x / sqrt(mean(x^2) + eps) * w, row by row.
void rms_norm(const Rows& x, int64_t n, const float* w, float eps, float* out);

// The rotate-half rotary embedding of `rotary.py`'s `apply_rotary`: x rows are [T * heads] of
// D channels, cos and sin [T, R] (both halves of cos holding cos, sin holding -sin then sin):
// y[j] = x[j] cos[j] + x[(j + R/2) mod R] sin[j] for j < R; channels from R on pass through.
void rotary(const Rows& x, int64_t heads, int64_t D, const float* cos, const float* sin,
            int64_t R, float* out);

// out [count, F] = act(x[:, :F]) * x[:, F:] for rows x of 2F.
void gated_activation(const Rows& x, int64_t F, Activation act, float* out);

// Where a step's attention reads and writes: the pools of one layer (float32 or float16), and
// each sequence's blocks, lengths (its tokens with this step's) and new rows.
struct PagedStep {
  void* pool_k;  // [KVH, slots, D], rows and heads at the strides below (in elements)
  void* pool_v;  // [KVH, slots, Dv]
  bool half;  // the pools hold float16
  int64_t kv_heads, D, Dv;
  int64_t k_head_stride, k_row_stride, v_head_stride, v_row_stride;
  const int32_t* block_tables;  // [B, table_stride], or null: position p in slot p
  int64_t table_stride, B, block_size;
  const int64_t* lengths;  // [B]
  const int64_t* query_lens;  // [B], summing to the step's rows (prefill only)

  template <class T>
  KVPools<T> pools() const {
    return {static_cast<const T*>(pool_k), k_head_stride, k_row_stride,
            static_cast<const T*>(pool_v), v_head_stride, v_row_stride,
            block_tables, table_stride, block_size, D, Dv};
  }
};

// Calls fn(T()) with T the pools' element type.
template <class Fn>
void with_cached_type(const PagedStep& step, Fn&& fn) {
  if (step.half) {
    fn(Half());
  } else {
    fn(float());
  }
}

// Writes k [N, KVH, D] and v [N, KVH, Dv] (row strides given, heads contiguous) at slots[i].
void store_kv_rows(const PagedStep& step, const float* k, int64_t k_row_stride, const float* v,
                   int64_t v_row_stride, const int64_t* slots, int64_t N);

// out [B, H, Dv]: each sequence's one query row q [B, H, D] (row stride q_stride) over its
// positions 0 .. lengths[b] - 1 (its new row already stored).
void decode_attention(const PagedStep& step, const float* q, int64_t q_stride, int64_t H,
                      float scale, const ScoreRule& rule, float* out);

// out [N, H * Dv]: every sequence's query_lens[b] rows (q [N, H, D], row stride q_stride),
// each over its positions up to its own.
void prefill_attention(const PagedStep& step, const float* q, int64_t q_stride, int64_t H,
                       float scale, const ScoreRule& rule, float* out);

}  // namespace ladle_kernels
