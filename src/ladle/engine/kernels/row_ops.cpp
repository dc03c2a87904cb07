// The row-wise steps of a decoder layer between its matmuls: RMSNorm, the rotary embedding
// and the gated SiLU, one kernel call each.
//
// Eagerly, torch spends 5-30 us of dispatch on each of these (RMSNorm alone is five kernel
// calls), against about 1 us of arithmetic on a decode row; a step of a 30-layer model pays
// it about 150 times. These kernels take float32 rows whose last dimension is contiguous,
// return new contiguous tensors, and compute each row on its own in a fixed order, so a row
// gives the same bits alone or in a batch, on any number of threads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops.h"
#include "parallel_items.h"
#include "vec_exp.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <vector>

namespace ladle_kernels {
namespace {

// A tensor of rows: every dimension but the last indexes rows (at most two of them).
struct Rows {
  const float* base;
  int64_t count, inner, stride0, stride1;  // rows = outer * inner; row r at base + offset(r)

  const float* row(int64_t r) const {
    return base + (r / inner) * stride0 + (r % inner) * stride1;
  }
};

Rows float_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be 2-D or 3-D, got ",
              t.dim(), "-D");
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, "'s last dimension must be contiguous");
  const float* base = t.const_data_ptr<float>();
  if (t.dim() == 2) return {base, t.size(0), 1, t.stride(0), 0};
  return {base, t.size(0) * t.size(1), t.size(1), t.stride(0), t.stride(1)};
}

// Rows in parallel when there are enough of them to pay for waking the thread pool.
void for_rows(int64_t rows, int64_t row_work, c10::function_ref<void(int64_t)> fn) {
  parallel_items(rows, rows * row_work, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) fn(r);
  });
}

#ifdef __AVX512F__

__mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

float sum_of_squares(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void scale_by(const float* x, float s, const float* w, float* out, int64_t n) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
  }
}

// out = silu(gate) * up = gate * up / (1 + exp(-gate))
void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 denom = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    const __m512 y = _mm512_div_ps(_mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, up + i)), denom);
    _mm512_mask_storeu_ps(out + i, m, y);
  }
}

#else  // portable fallback

float sum_of_squares(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

void scale_by(const float* x, float s, const float* w, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * s * w[i];
}

void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * up[i] / (1.0f + std::exp(-gate[i]));
}

#endif

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * w, per row of x [.., N]; w [N].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const Rows rows = float_rows(x, "rms_norm", "x");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == n &&
                  w.is_contiguous(),
              "rms_norm: w must be a contiguous float32 vector of ", n, " values, got ",
              w.scalar_type(), " ", w.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options());
  float* dst = out.data_ptr<float>();
  const float* weight = w.const_data_ptr<float>();
  for_rows(rows.count, n, [&](int64_t r) {
    const float* src = rows.row(r);
    const float inv = 1.0f / std::sqrt(sum_of_squares(src, n) / float(n) + float(eps));
    scale_by(src, inv, weight, dst + r * n, n);
  });
  return out;
}

// The rotate-half rotary embedding of `rotary.py`'s `apply_rotary`: for x [T, heads, D] and
// cos, sin [T, 1, R] (R <= D, both halves of cos holding cos, sin holding -sin then sin),
// y[j] = x[j] cos[j] + x[(j + R/2) mod R] sin[j] for j < R; channels from R on pass through.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rotary";
  const Rows rows = float_rows(x, op, "x");
  TORCH_CHECK(x.dim() == 3, op, ": x must be [tokens, heads, head_dim], got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), R = cos.size(-1);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == T && t->size(1) == 1 && t->size(2) == R,
                op, ": cos and sin must be contiguous float32 [", T, ", 1, R], got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(R % 2 == 0 && R <= D, op, ": the rotary dimension ", R,
              " must be even and at most head_dim ", D);
  at::Tensor out = at::empty({T, H, D}, x.options());
  float* dst = out.data_ptr<float>();
  const float* c = cos.const_data_ptr<float>();
  const float* s = sin.const_data_ptr<float>();
  const int64_t half = R / 2;
  for_rows(rows.count, D, [&](int64_t r) {
    const float* src = rows.row(r);
    const float* cr = c + (r / H) * R;
    const float* sr = s + (r / H) * R;
    float* y = dst + r * D;
    // the same two products and one sum as torch's `x * cos + roll(x) * sin` (built with
    // -ffp-contract=off: no fused multiply-add), so the bits match the torch path
    for (int64_t j = 0; j < half; ++j) y[j] = src[j] * cr[j] + src[j + half] * sr[j];
    for (int64_t j = half; j < R; ++j) y[j] = src[j] * cr[j] + src[j - half] * sr[j];
    for (int64_t j = R; j < D; ++j) y[j] = src[j];
  });
  return out;
}

// silu(x[:, :F]) * x[:, F:] for x [.., 2F]: SwiGLU over a fused [gate | up] projection.
at::Tensor silu_mul(const at::Tensor& x) {
  const Rows rows = float_rows(x, "silu_mul", "x");
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_mul: x's last dimension must be even, got ",
              x.size(-1));
  const int64_t F = x.size(-1) / 2;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = F;
  at::Tensor out = at::empty(sizes, x.options());
  float* dst = out.data_ptr<float>();
  for_rows(rows.count, 8 * F, [&](int64_t r) {
    const float* src = rows.row(r);
    silu_mul_row(src, src + F, dst + r * F, F);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rotary", rotary);
  m.impl("silu_mul", silu_mul);
}

}  // namespace ladle_kernels
