// x @ w.T for a float32 activation and a float16 weight, accumulated in float32.
//
// A decode step multiplies a few rows by a large weight (SmolLM2's head: 49152 x 576), so the
// cost is reading the weight. Kept in float16 it is half the bytes of float32; each tile of
// kRows weight rows is read from memory once and widened in registers, against all rows of x.
// Without AVX-512F (e.g. another CPU), a portable loop computes the same.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"
#include "parallel_items.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace ladle_kernels {

namespace {

constexpr int64_t kRows = 4;  // weight rows per tile
constexpr int64_t kXRows = 4;  // x rows per pass: kRows * kXRows accumulators fit in registers

#ifdef __AVX512F__

__m512 load_half_tail(const c10::Half* p, int64_t n) {  // n < 16 halves, widened, zeros past n
  alignas(32) c10::Half tail[16] = {};  // a masked 16-bit load would need AVX-512BW
  std::memcpy(tail, p, n * sizeof(c10::Half));
  return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)));
}

// out[n][r] = x[n] . w[r] for NX rows of x and R rows of w (rows K apart, out rows M apart).
template <int NX, int R>
void tile(const float* x, const c10::Half* w, int64_t K, float* out, int64_t M) {
  __m512 acc[NX][R];
  for (int n = 0; n < NX; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps();
  __m512 wr[R];
  // The tile's rows are R short streams, too short for the hardware prefetcher to lock on:
  // fetch the next tile's bytes, in order, while this one computes (past the weight's end, a
  // prefetch is a no-op: it never faults).
  const char* next = reinterpret_cast<const char*>(w + R * K);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int i = 0; i < R * 32; i += 64) _mm_prefetch(next + 2 * R * k + i, _MM_HINT_T0);
    for (int r = 0; r < R; ++r)
      wr[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
    for (int n = 0; n < NX; ++n) {
      const __m512 xn = _mm512_loadu_ps(x + n * K + k);
      for (int r = 0; r < R; ++r) acc[n][r] = _mm512_fmadd_ps(xn, wr[r], acc[n][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = __mmask16((1u << (K - k)) - 1);
    for (int r = 0; r < R; ++r) wr[r] = load_half_tail(w + r * K + k, K - k);
    for (int n = 0; n < NX; ++n) {
      const __m512 xn = _mm512_maskz_loadu_ps(mask, x + n * K + k);
      for (int r = 0; r < R; ++r) acc[n][r] = _mm512_fmadd_ps(xn, wr[r], acc[n][r]);
    }
  }
  for (int n = 0; n < NX; ++n)
    for (int r = 0; r < R; ++r) out[n * M + r] = _mm512_reduce_add_ps(acc[n][r]);
}

template <int R>
void tile_rows(const float* x, int64_t nx, const c10::Half* w, int64_t K, float* out, int64_t M) {
  switch (nx) {
    case 1: return tile<1, R>(x, w, K, out, M);
    case 2: return tile<2, R>(x, w, K, out, M);
    case 3: return tile<3, R>(x, w, K, out, M);
    default: return tile<4, R>(x, w, K, out, M);
  }
}

// rows <= kRows weight rows starting at w, against nx <= kXRows rows of x.
void multiply(const float* x, int64_t nx, const c10::Half* w, int64_t rows, int64_t K, float* out,
              int64_t M) {
  if (rows == kRows) return tile_rows<kRows>(x, nx, w, K, out, M);
  for (int64_t r = 0; r < rows; ++r) tile_rows<1>(x, nx, w + r * K, K, out + r, M);
}

#else

void multiply(const float* x, int64_t nx, const c10::Half* w, int64_t rows, int64_t K, float* out,
              int64_t M) {
  float widened[1024];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < nx; ++n) out[n * M + r] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += 1024) {  // widen a chunk once for all rows of x
      const int64_t width = std::min<int64_t>(1024, K - k0);
      for (int64_t k = 0; k < width; ++k) widened[k] = float(w[r * K + k0 + k]);
      for (int64_t n = 0; n < nx; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < width; ++k) acc += x[n * K + k0 + k] * widened[k];
        out[n * M + r] += acc;
      }
    }
  }
}

#endif

}  // namespace

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "half_linear: x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kHalf, "half_linear: w must be float16, got ",
              w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "half_linear: x must be a contiguous [N, K], got ",
              x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "half_linear: w must be a contiguous [M, K], got ",
              w.sizes());
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  TORCH_CHECK(w.size(1) == K, "half_linear: w has ", w.size(1), " columns, x has ", K);
  at::Tensor out = at::empty({N, M}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const c10::Half* wp = w.const_data_ptr<c10::Half>();
  float* op = out.data_ptr<float>();
  const int64_t num_tiles = (M + kRows - 1) / kRows;
  parallel_items(num_tiles, N * M * K, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t row = t * kRows, rows = std::min(kRows, M - row);
      // the tile's weight rows stay in L1 while the passes over x rows reuse them
      for (int64_t n = 0; n < N; n += kXRows)
        multiply(xp + n * K, std::min(kXRows, N - n), wp + row * K, rows, K, op + n * M + row, M);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def("half_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("half_linear", &half_linear);
}

}  // namespace ladle_kernels
