// Every layer of a Llama-family decoder in one call, attention included, over paged pools:
// Llama, Mistral, Qwen 2 (qkv biases), Qwen 3 (q/k norms), Phi-3 (fused checkpoints, partial
// rotary), Gemma (GeGLU, (1 + w) norms folded into their weights), Gemma 2 (sandwich norms,
// soft-capped scores, sliding windows) and Gemma 3 (q/k norms, a local rotary for its sliding
// layers). A layer:
//
//   h = rms_norm(x); qkv = h W_qkv (+ b); q, k = rotary(norm?(q), norm?(k)); store k, v
//   a = attention(q) W_o (+ b)
//   plain:    x = x + a;             x = x + mlp(rms_norm(x))
//   sandwich: x = x + rms_norm(a);   x = x + rms_norm(mlp(rms_norm(x)))
//   mlp(h) = down(act(gate(h)) * up(h))
//
// Eagerly, the same layer is about fifteen Python-level calls; on a decode step of a small
// model their dispatch costs more than the arithmetic (SmolLM2: ~3 ms of a ~10 ms step on two
// cores). The per-layer Python path calls the very same kernels in the same order, so the two
// give the same bits.

#include <algorithm>
#include <vector>

#include "api.h"
#include "kernels.h"

namespace ladle_kernels {

namespace {

constexpr int64_t kMlpRows = 128;  // the MLP's activations a block of rows at a time

Rows rows_at(const float* base, int64_t count, int64_t stride) { return {base, count, 1, stride, 0}; }

// Rows of `heads` heads of D channels out of each row of a [T, row_stride] matrix.
Rows heads_of(const float* base, int64_t T, int64_t heads, int64_t D, int64_t row_stride) {
  return {base, T * heads, heads, row_stride, D};
}

void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void add_bias(float* y, int64_t T, const float* bias, int64_t n) {
  for (int64_t t = 0; t < T; ++t) add_into(y + t * n, bias, n);
}

// The activations of one call, kept per thread between calls (a decode step's are small, a
// prefill chunk's a few MB).
struct Workspace {
  std::vector<float> h, qkv, qk, attn, proj, up, act;
  std::vector<int64_t> slots;
};

// The MLP and the residual for rows [first, first + n) of x.
void mlp_block(const LadleLayer& layer, float eps, float* x, int64_t n, int64_t hidden,
               Workspace& ws) {
  const int64_t F2 = rows_of(layer.gate_up), F = F2 / 2;
  ws.h.resize(n * hidden);
  const float* pre = layer.pre_feedforward_norm ? layer.pre_feedforward_norm
                                                : layer.post_attention_norm;
  rms_norm(rows_at(x, n, hidden), hidden, pre, eps, ws.h.data());
  ws.up.resize(n * F2);
  linear(ws.h.data(), n, layer.gate_up, ws.up.data());
  ws.act.resize(n * F);
  gated_activation(rows_at(ws.up.data(), n, F2), F, Activation(layer.activation), ws.act.data());
  ws.proj.resize(n * hidden);
  linear(ws.act.data(), n, layer.down, ws.proj.data());
  if (layer.post_feedforward_norm) {
    rms_norm(rows_at(ws.proj.data(), n, hidden), hidden, layer.post_feedforward_norm, eps,
             ws.h.data());
    add_into(x, ws.h.data(), n * hidden);
  } else {
    add_into(x, ws.proj.data(), n * hidden);
  }
}

void run_layer(const LadleDecoder& model, const LadleLayer& layer, const PagedStep& step,
               const LadleRope& rope, const int64_t* slots, bool is_decode, float* x, int64_t T,
               Workspace& ws) {
  const int64_t hidden = model.hidden, H = model.num_heads, KVH = model.num_kv_heads;
  const int64_t D = model.head_dim, qkv_cols = (H + 2 * KVH) * D;
  ws.h.resize(T * hidden);
  rms_norm(rows_at(x, T, hidden), hidden, layer.input_norm, model.eps, ws.h.data());
  ws.qkv.resize(T * qkv_cols);
  linear(ws.h.data(), T, layer.qkv, ws.qkv.data());
  if (layer.qkv_bias) add_bias(ws.qkv.data(), T, layer.qkv_bias, qkv_cols);

  const float* cos = layer.rope == 1 ? rope.cos_local : rope.cos;
  const float* sin = layer.rope == 1 ? rope.sin_local : rope.sin;
  ws.qk.resize(T * (H + KVH) * D);
  float* q = ws.qk.data();
  float* k = q + T * H * D;  // with q/k norms: q [T, H, D] then k [T, KVH, D]
  int64_t q_stride = H * D, k_stride = KVH * D;
  if (layer.q_norm) {
    ws.h.resize(std::max(T * hidden, T * (H + KVH) * D));
    float* normed = ws.h.data();
    rms_norm(heads_of(ws.qkv.data(), T, H, D, qkv_cols), D, layer.q_norm, model.eps, normed);
    rms_norm(heads_of(ws.qkv.data() + H * D, T, KVH, D, qkv_cols), D, layer.k_norm, model.eps,
             normed + T * H * D);
    rotary(heads_of(normed, T, H, D, H * D), H, D, cos, sin, rope.rotary_dim, q);
    rotary(heads_of(normed + T * H * D, T, KVH, D, KVH * D), KVH, D, cos, sin, rope.rotary_dim, k);
  } else {  // q and k heads side by side: one rotation for both
    rotary(heads_of(ws.qkv.data(), T, H + KVH, D, qkv_cols), H + KVH, D, cos, sin,
           rope.rotary_dim, q);
    k = q + H * D;
    q_stride = k_stride = (H + KVH) * D;
  }
  const float* v = ws.qkv.data() + (H + KVH) * D;

  store_kv_rows(step, k, k_stride, v, qkv_cols, slots, T);
  ws.attn.resize(T * H * D);
  const ScoreRule rule{layer.window, layer.softcap};
  if (is_decode) {
    decode_attention(step, q, q_stride, H, layer.scale, rule, ws.attn.data());
  } else {
    prefill_attention(step, q, q_stride, H, layer.scale, rule, ws.attn.data());
  }
  ws.proj.resize(T * hidden);
  linear(ws.attn.data(), T, layer.o, ws.proj.data());
  if (layer.o_bias) add_bias(ws.proj.data(), T, layer.o_bias, hidden);
  if (layer.pre_feedforward_norm) {  // sandwich: the attention's output normalized first
    ws.h.resize(T * hidden);
    rms_norm(rows_at(ws.proj.data(), T, hidden), hidden, layer.post_attention_norm, model.eps,
             ws.h.data());
    add_into(x, ws.h.data(), T * hidden);
  } else {
    add_into(x, ws.proj.data(), T * hidden);
  }
  // The MLP a block of rows at a time: its [rows, 2 x intermediate] activations are the
  // largest of a prefill step (SmolLM2: 6 MB a 512-token chunk, 1.5 MB a block), and every
  // row is computed alike either way.
  for (int64_t first = 0; first < T; first += kMlpRows) {
    mlp_block(layer, model.eps, x + first * hidden, std::min(kMlpRows, T - first), hidden, ws);
  }
}

}  // namespace

void decoder_layers(const LadleDecoder& model, const LadleCache& cache, const LadleRope& rope,
                    float* x, int64_t T) {
  thread_local Workspace ws;
  const bool is_decode = cache.is_decode != 0;
  const int64_t* slots = cache.slots;
  if (is_decode) {  // each sequence's one new row goes to the slot of its last position
    ws.slots.resize(cache.num_seqs);
    for (int64_t b = 0; b < cache.num_seqs; ++b) {
      const int64_t p = cache.lengths[b] - 1;
      ws.slots[b] = int64_t(cache.block_tables[b * cache.table_stride + p / cache.block_size]) *
                        cache.block_size + p % cache.block_size;
    }
    slots = ws.slots.data();
  }
  for (int64_t i = 0; i < model.num_layers; ++i) {
    const PagedStep step = paged_step(cache, model.num_kv_heads, model.head_dim, i);
    run_layer(model, model.layers[i], step, rope, slots, is_decode, x, T, ws);
  }
}

}  // namespace ladle_kernels
