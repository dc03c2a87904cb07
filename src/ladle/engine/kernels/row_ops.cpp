// The row-wise steps of a decoder layer between its matmuls: RMSNorm, the rotary embedding and
// the gated activations (SiLU, tanh-GELU), one call each.
//
// Eagerly, torch spends 5-30 us of dispatch on each of these (RMSNorm alone is five kernel
// calls), against about 1 us of arithmetic on a decode row. Each row is computed on its own
// in a fixed order, so a row gives the same bits alone or in a batch, on any number of threads
// and any instruction set.

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "simd.h"
#include "thread_pool.h"

namespace ladle_kernels {

namespace {

using namespace simd;

// Rows in parallel when there are enough of them to pay for waking the pool.
template <class Fn>
void for_rows(int64_t rows, int64_t row_work, Fn&& fn) {
  parallel_items(rows, rows * row_work, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) fn(r);
  });
}

float sum_of_squares(const float* x, int64_t n) {
  F acc = zero();
  for (int64_t i = 0; i < n; i += 16) {
    const F v = load_first(x + i, n - i);
    acc = fmadd(v, v, acc);
  }
  return reduce_add(acc);
}

void scale_by(const float* x, float s, const float* w, float* out, int64_t n) {
  const F vs = set1(s);
  for (int64_t i = 0; i < n; i += 16) {
    const F v = mul(load_first(x + i, n - i), vs);
    store_first(out + i, mul(v, load_first(w + i, n - i)), n - i);
  }
}

// out = silu(gate) * up = gate * up / (1 + exp(-gate))
void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  const F one = set1(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const F g = load_first(gate + i, n - i);
    const F denom = add(one, exp(sub(zero(), g)));
    store_first(out + i, div(mul(g, load_first(up + i, n - i)), denom), n - i);
  }
}

// out = gelu_tanh(gate) * up, gelu_tanh(g) = g / 2 (1 + tanh(y)), y = sqrt(2 / pi) (g +
// 0.044715 g^3), as g / (1 + exp(-2y)) (the same function: 1 + tanh(y) = 2 sigmoid(2y)),
// which keeps its relative precision where tanh(y) nears -1
void gelu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  const F one = set1(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const F g = load_first(gate + i, n - i);
    const F y2 = mul(set1(-1.5957691216057308f), fmadd(mul(set1(0.044715f), mul(g, g)), g, g));
    const F gelu = div(g, add(one, exp(y2)));
    store_first(out + i, mul(gelu, load_first(up + i, n - i)), n - i);
  }
}

}  // namespace

void rms_norm(const Rows& x, int64_t n, const float* w, float eps, float* out) {
  for_rows(x.count, n, [&](int64_t r) {
    const float* src = x.row(r);
    const float inv = 1.0f / std::sqrt(sum_of_squares(src, n) / float(n) + eps);
    scale_by(src, inv, w, out + r * n, n);
  });
}

void rotary(const Rows& x, int64_t heads, int64_t D, const float* cos, const float* sin,
            int64_t R, float* out) {
  const int64_t half = R / 2;
  for_rows(x.count, D, [&](int64_t r) {
    const float* src = x.row(r);
    const float* cr = cos + (r / heads) * R;
    const float* sr = sin + (r / heads) * R;
    float* y = out + r * D;
    // the same two products and one sum as torch's `x * cos + roll(x) * sin` (built with
    // -ffp-contract=off: no fused multiply-add), so the bits match the torch path
    for (int64_t j = 0; j < half; ++j) y[j] = src[j] * cr[j] + src[j + half] * sr[j];
    for (int64_t j = half; j < R; ++j) y[j] = src[j] * cr[j] + src[j - half] * sr[j];
    for (int64_t j = R; j < D; ++j) y[j] = src[j];
  });
}

void gated_activation(const Rows& x, int64_t F_, Activation act, float* out) {
  for_rows(x.count, 8 * F_, [&](int64_t r) {
    const float* src = x.row(r);
    if (act == kGeluTanh) {
      gelu_mul_row(src, src + F_, out + r * F_, F_);
    } else {
      silu_mul_row(src, src + F_, out + r * F_, F_);
    }
  });
}

}  // namespace ladle_kernels
