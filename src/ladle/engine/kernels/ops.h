// The kernels' C++ entry points, for kernels that are built from the others (decoder_layer.cpp).
// Each but store_kv_rows is also a `torch.ops.ladle_kernels` operator; `native.py` documents
// their contracts.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ladle_kernels {

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales);
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& x, const at::Tensor& norm, double eps, at::TensorList qkv_proj,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& cos, const at::Tensor& sin,
    int64_t num_heads, int64_t num_kv_heads);
at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& attn, at::TensorList o_proj,
                        const std::optional<at::Tensor>& o_bias, const at::Tensor& norm,
                        double eps, at::TensorList gate_up_proj, at::TensorList down_proj);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& pool_k, const at::Tensor& pool_v,
                                  const at::Tensor& block_tables, const at::Tensor& lengths,
                                  int64_t block_size, double scale);
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& pool_k,
                                   const at::Tensor& pool_v, const at::Tensor& block_tables,
                                   const at::Tensor& lengths, const at::Tensor& query_lens,
                                   int64_t block_size, double scale);
// Writes k, v [N, KVH, D] (float32) into slots[i] of pool_k, pool_v (rounded as .half() does
// for float16 pools); not an operator, the paged kernels' own write.
void store_kv_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pool_k,
                   const at::Tensor& pool_v, const at::Tensor& slots);

}  // namespace ladle_kernels
