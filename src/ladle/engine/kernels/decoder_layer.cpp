// A Llama-family decoder layer in two calls, around attention (which reads and writes the KV
// cache, and stays a Python operator):
//
//   attention_inputs: h = rms_norm(x); qkv = h W_qkv (+ b); q, k = rotary(q, k); -> q, k, v
//   mlp_residual:     x = x + attn W_o (+ b); x = x + down(silu_mul(rms_norm(x) W_gate_up))
//
// Eagerly, the same layer is about fifteen Python-level calls; on a decode step of a small
// model their dispatch costs more than the arithmetic (SmolLM2: ~3 ms of a ~10 ms step on two
// cores). These run the very kernels the Python path calls, in the same order, so the result
// is the same to the bit.
//
// A linear layer arrives as the tensors of its resident form (`Linear.kernel_weights`):
// [q, scales] for a native int4 (uint8 q) or int8 (int8 q) weight, [w] for a dense float16 or
// float32 one.

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "ops.h"

namespace ladle_kernels {
namespace {

constexpr int64_t kMlpRows = 128;

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

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def(
      "attention_inputs(Tensor x, Tensor norm, float eps, Tensor[] qkv_proj, Tensor? qkv_bias, "
      "Tensor cos, Tensor sin, int num_heads, int num_kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mlp_residual(Tensor x, Tensor attn, Tensor[] o_proj, Tensor? o_bias, Tensor norm, "
      "float eps, Tensor[] gate_up_proj, Tensor[] down_proj) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("attention_inputs", &attention_inputs);
  m.impl("mlp_residual", &mlp_residual);
}

}  // namespace ladle_kernels
