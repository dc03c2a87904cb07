// A Llama-family decoder layer in two calls, around attention (which reads and writes the KV
// cache, and stays a Python operator):
//
//   attention_inputs: h = rms_norm(x); qkv = h W_qkv (+ b); q, k = rotary(q, k); -> q, k, v
//   mlp_residual:     x = x + attn W_o (+ b); x = x + down(silu_mul(rms_norm(x) W_gate_up))
//
// and every layer of the decoder in one call, attention included, when the cache is a paged
// pool the attention kernels read (decoder_layers).
//
// Eagerly, the same layer is about fifteen Python-level calls; on a decode step of a small
// model their dispatch costs more than the arithmetic (SmolLM2: ~3 ms of a ~10 ms step on two
// cores, and still ~2.4 ms of a 7.7 ms step with a layer in three calls). These run the very
// kernels the Python path calls, in the same order, so the result is the same to the bit.
//
// A linear layer arrives as the tensors of its resident form (`Linear.kernel_weights`):
// [q, scales] for a native int4 (uint8 q) or int8 (int8 q) weight, [w] for a dense float16 or
// float32 one.

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"

namespace ladle_kernels {
namespace {

constexpr int64_t kMlpRows = 128;
// decoder_layers' weights per layer: input norm, qkv_proj (2), qkv bias, o_proj (2), o bias,
// post-attention norm, gate_up_proj (2), down_proj (2).
constexpr int64_t kLayerWeights = 12;
// Which of them a layer must have: a bias, or a dense form's absent second tensor, is None.
constexpr std::array<bool, kLayerWeights> kRequired{true,  true, false, false, true,  false,
                                                    false, true, true,  false, true, false};

at::Tensor linear(const at::Tensor& x, at::TensorList w, const std::optional<at::Tensor>& bias,
                  const char* name) {
  at::Tensor y;
  if (w.size() == 2) {
    y = w[0].scalar_type() == at::kByte ? int4_linear(x, w[0], w[1]) : int8_linear(x, w[0], w[1]);
  } else {
    TORCH_CHECK(w.size() == 1, name, ": a linear weight is [q, scales] or [w], got ", w.size(),
                " tensors");
    y = w[0].scalar_type() == at::kHalf ? half_linear(x, w[0]) : at::linear(x, w[0]);
  }
  return bias ? y.add_(*bias) : y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& x, const at::Tensor& norm, double eps, at::TensorList qkv_proj,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& cos, const at::Tensor& sin,
    int64_t num_heads, int64_t num_kv_heads) {
  const at::Tensor qkv = linear(rms_norm(x, norm, eps), qkv_proj, qkv_bias, "qkv_proj");
  const int64_t T = qkv.size(0), heads = num_heads + num_kv_heads;
  TORCH_CHECK(qkv.size(1) % (heads + num_kv_heads) == 0, "attention_inputs: ", qkv.size(1),
              " projected columns do not split into ", num_heads, " + 2 x ", num_kv_heads,
              " heads");
  const int64_t D = qkv.size(1) / (heads + num_kv_heads);
  const at::Tensor qk = rotary(qkv.narrow(1, 0, heads * D).view({T, heads, D}), cos, sin);
  return {qk.narrow(1, 0, num_heads), qk.narrow(1, num_heads, num_kv_heads),
          qkv.narrow(1, heads * D, num_kv_heads * D).view({T, num_kv_heads, D})};
}

at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& attn, at::TensorList o_proj,
                        const std::optional<at::Tensor>& o_bias, const at::Tensor& norm,
                        double eps, at::TensorList gate_up_proj, at::TensorList down_proj) {
  const at::Tensor h = at::add(x, linear(attn.contiguous(), o_proj, o_bias, "o_proj"));
  at::Tensor out = at::empty_like(h);
  // The MLP a block of rows at a time: its [rows, 2 x intermediate] activations are the
  // largest of a prefill step (SmolLM2: 6 MB a 512-token chunk, 1.5 MB a block), and every
  // row is computed alike either way.
  for (int64_t first = 0; first < h.size(0); first += kMlpRows) {
    const int64_t n = std::min(kMlpRows, h.size(0) - first);
    const at::Tensor rows = h.narrow(0, first, n);
    const at::Tensor up = linear(rms_norm(rows, norm, eps), gate_up_proj, std::nullopt,
                                 "gate_up_proj");
    at::Tensor dst = out.narrow(0, first, n);
    at::add_out(dst, rows, linear(silu_mul(up), down_proj, std::nullopt, "down_proj"));
  }
  return out;
}

namespace {

// A linear weight from decoder_layers' list: [q, scales] or [w] (then the second is None).
std::vector<at::Tensor> linear_weight(const c10::List<std::optional<at::Tensor>>& weights,
                                      int64_t first) {
  std::vector<at::Tensor> w{*weights.get(first)};
  if (const std::optional<at::Tensor> second = weights.get(first + 1)) w.push_back(*second);
  return w;
}

}  // namespace

at::Tensor decoder_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                          const c10::List<std::optional<at::Tensor>>& weights, double eps,
                          int64_t num_heads, int64_t num_kv_heads, double scale,
                          at::TensorList pools_k, at::TensorList pools_v,
                          const at::Tensor& block_tables, const at::Tensor& lengths,
                          const at::Tensor& query_lens, const at::Tensor& slots,
                          int64_t block_size, bool is_decode) {
  const int64_t num_layers = int64_t(pools_k.size());
  TORCH_CHECK(int64_t(pools_v.size()) == num_layers, "decoder_layers: ", pools_k.size(),
              " key pools and ", pools_v.size(), " value pools");
  TORCH_CHECK(int64_t(weights.size()) == num_layers * kLayerWeights, "decoder_layers: ",
              weights.size(), " weights for ", num_layers, " layers of ", kLayerWeights);
  for (int64_t i = 0; i < int64_t(weights.size()); ++i) {
    TORCH_CHECK(weights.get(i).has_value() || !kRequired[i % kLayerWeights],
                "decoder_layers: weight ", i % kLayerWeights, " of layer ", i / kLayerWeights,
                " is None");
  }
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t w = layer * kLayerWeights;
    auto [q, k, v] = attention_inputs(x, *weights.get(w), eps, linear_weight(weights, w + 1),
                                      weights.get(w + 3), cos, sin, num_heads, num_kv_heads);
    at::Tensor attn;
    if (is_decode) {  // the kernel writes k and v at each sequence's last position
      attn = paged_decode_attention(q, k, v, pools_k[layer], pools_v[layer], block_tables,
                                    lengths, block_size, scale)
                 .view({q.size(0), -1});
    } else {
      store_kv_rows(k, v, pools_k[layer], pools_v[layer], slots);
      attn = paged_prefill_attention(q, pools_k[layer], pools_v[layer], block_tables, lengths,
                                     query_lens, block_size, scale);
    }
    x = mlp_residual(x, attn, linear_weight(weights, w + 4), weights.get(w + 6),
                     *weights.get(w + 7), eps, linear_weight(weights, w + 8),
                     linear_weight(weights, w + 10));
  }
  return x;
}

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def(
      "attention_inputs(Tensor x, Tensor norm, float eps, Tensor[] qkv_proj, Tensor? qkv_bias, "
      "Tensor cos, Tensor sin, int num_heads, int num_kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mlp_residual(Tensor x, Tensor attn, Tensor[] o_proj, Tensor? o_bias, Tensor norm, "
      "float eps, Tensor[] gate_up_proj, Tensor[] down_proj) -> Tensor");
  m.def(
      "decoder_layers(Tensor x, Tensor cos, Tensor sin, Tensor?[] weights, float eps, "
      "int num_heads, int num_kv_heads, float scale, Tensor(a!)[] pools_k, Tensor(b!)[] pools_v, "
      "Tensor block_tables, Tensor lengths, Tensor query_lens, Tensor slots, int block_size, "
      "bool is_decode) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("attention_inputs", &attention_inputs);
  m.impl("mlp_residual", &mlp_residual);
  m.impl("decoder_layers", &decoder_layers);
}

}  // namespace ladle_kernels
