// x @ w.T for a float32 activation and a weight of 4 or 8 bits in groups of 32 along k:
//   int4_linear: w = q * scale + zero, q in 0..15 (GGML Q4_0 / Q4_1 / Q4_K, HQQ4);
//   int8_linear: w = q * scale, q in -128..127 (GGML Q8_0).
//
// torch's CPU int4 kernel takes bf16 activations and decodes the weight again for every 4 rows
// of x, so a decode step of 8 sequences costs 3-4x one sequence; its int8 kernel wants one scale
// per row, so Q8_0 would be rounded again. Here a tile of up to 8 rows of x shares each decoded
// weight vector, and each output is one sum over k in a fixed order whatever the number of rows
// or threads, so a sequence gets the same logits alone and in a batch.
//
// x enters as int16 per group of 32 (scale: the group's largest magnitude / 32767, so within
// 2e-5 of float32 at the output, where bf16 activations cost 4e-3), and a group's dot products
// are integer: AVX-512 VNNI's vpdpwssd multiplies 16-bit pairs, two k per lane. The group's
// sum becomes float once, times the weight's and x's scales, and the weight's zero point meets
// x's exact float sum over the group. (int8 activations with vpdpbusd, as llama.cpp does for
// Q4 weights, ran 1.5x faster still but moved SmolLM2's logits 9% from float32: too much.)
//
// Layout (made by `quant/int4.py` and `quant/int8.py`), per block of 16 output columns:
//   q      int4: uint8 [M / 16, K / 2, 16], byte j of pair p holding column j's values at
//          k = 2p (low nibble) and 2p + 1 (high nibble);
//          int8: int8 [M / 16, K / 2, 32], bytes 2j and 2j + 1 of pair p holding them;
//          either way a pair widens to the two 16-bit words of lane j;
//   scales fp16 [M / 16, K / 32, R, 16]: per group of 32 k, the 16 columns' scales, then
//          (int4, R = 2) their zeros.
// Without AVX-512 VNNI (another CPU), a portable loop computes the same sums.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"
#include "parallel_items.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace ladle_kernels {

namespace {

constexpr int64_t kCols = 16;  // output columns per block
constexpr int64_t kGroup = 32;  // k per scale and zero, and per activation scale
constexpr int64_t kMaxRows = 8;  // rows of x per pass
constexpr float kInt16Max = 32767.0f;

// How a weight format stores a block's k pair, and whether it has zero points.
struct Nibbles {
  static constexpr int64_t kPairBytes = kCols;
  static constexpr int64_t kScaleRows = 2;  // scale, zero
  static int32_t value(const uint8_t* pair, int64_t j, int h) {
    return h ? pair[j] >> 4 : pair[j] & 15;
  }
};

struct Bytes {
  static constexpr int64_t kPairBytes = 2 * kCols;
  static constexpr int64_t kScaleRows = 1;  // scale
  static int32_t value(const uint8_t* pair, int64_t j, int h) {
    return static_cast<int8_t>(pair[2 * j + h]);
  }
};

template <class Format>
struct WeightView {
  const uint8_t* q;
  const c10::Half* scales;
  int64_t K;
  const uint8_t* pair(int64_t b, int64_t p) const {
    return q + (b * (K / 2) + p) * Format::kPairBytes;
  }
  const c10::Half* group_scales(int64_t b, int64_t g) const {
    return scales + (b * (K / kGroup) + g) * Format::kScaleRows * kCols;
  }
};

// x's rows in int16, each group of 32 with its own scale: x[k] ~ xq[k] * dx[g] within 1/65534
// of the group's largest value, and the exact float sum of the group, which meets the weight's
// zero points.
struct QuantizedRows {
  std::vector<int16_t> xq;
  std::vector<float> dx, sum;
};

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

// One group: 32 values as two vectors, rounded to nearest even as std::nearbyint rounds them.
void quantize_group(const float* v, int16_t* q, float* dx, float* sum) {
  const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? kInt16Max / amax : 0.0f);
  const auto round = [&](const __m512 x) {  // |x * inv| <= 32767: no saturation happens
    return _mm512_cvtsepi32_epi16(_mm512_cvt_roundps_epi32(
        _mm512_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  };
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), round(lo));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), round(hi));
  *dx = amax / kInt16Max;
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
}

#else

void quantize_group(const float* v, int16_t* q, float* dx, float* sum) {
  float amax = 0.0f;
  for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.0f ? kInt16Max / amax : 0.0f;
  for (int64_t i = 0; i < kGroup; ++i) q[i] = static_cast<int16_t>(std::nearbyint(v[i] * inv));
  *dx = amax / kInt16Max;
  // the order of _mm512_reduce_add_ps(lo + hi): pairs i, i + 16, then halves, down to one
  float lanes[16];
  for (int64_t i = 0; i < 16; ++i) lanes[i] = v[i] + v[i + 16];
  for (int64_t width = 8; width >= 1; width /= 2)
    for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  *sum = lanes[0];
}

#endif

QuantizedRows quantize_rows(const float* x, int64_t N, int64_t K) {
  QuantizedRows r{std::vector<int16_t>(N * K), std::vector<float>(N * K / kGroup),
                  std::vector<float>(N * K / kGroup)};
  for (int64_t g = 0; g < N * K / kGroup; ++g) {
    quantize_group(x + g * kGroup, r.xq.data() + g * kGroup, &r.dx[g], &r.sum[g]);
  }
  return r;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

// out[n][b * 16 + j] for NX rows of x and NB column blocks starting at block b0. A group's
// integer dot products (16-bit weights x activations, 2 per lane per vpdpwssd) become float
// once, scaled by the weight's and the activation's scales.
// Lane j of the result: column j's two values of pair p, as 16-bit words.
inline __m512i widen_pair(const Nibbles&, const uint8_t* pair) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
  return _mm512_and_si512(_mm512_or_si512(bytes, _mm512_slli_epi32(bytes, 12)),
                          _mm512_set1_epi32(0x000F000F));
}

inline __m512i widen_pair(const Bytes&, const uint8_t* pair) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair)));
}

template <class Format, int NX, int NB>
void tile(const QuantizedRows& x, int64_t row0, const WeightView<Format>& w, int64_t b0,
          float* out, int64_t M) {
  const int64_t K = w.K, groups = K / kGroup;
  __m512 acc[NX][NB];
  for (int n = 0; n < NX; ++n)
    for (int c = 0; c < NB; ++c) acc[n][c] = _mm512_setzero_ps();
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.xq.data() + row0 * K);  // k pairs
  const float* dx = x.dx.data() + row0 * groups;
  const float* xsum = x.sum.data() + row0 * groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[NX][NB];
    for (int n = 0; n < NX; ++n)
      for (int c = 0; c < NB; ++c) dot[n][c] = _mm512_setzero_si512();
    for (int64_t t = 0; t < kGroup / 2; ++t) {  // 2 values of k per lane
      const int64_t pair = g * (kGroup / 2) + t;
      for (int c = 0; c < NB; ++c) {
        const __m512i wq = widen_pair(Format{}, w.pair(b0 + c, pair));
        for (int n = 0; n < NX; ++n)
          dot[n][c] = _mm512_dpwssd_epi32(dot[n][c], wq, _mm512_set1_epi32(xq[n * K / 2 + pair]));
      }
    }
    for (int c = 0; c < NB; ++c) {
      const __m256i* sz = reinterpret_cast<const __m256i*>(w.group_scales(b0 + c, g));
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(sz));
      for (int n = 0; n < NX; ++n) {
        const __m512 s = _mm512_mul_ps(scale, _mm512_set1_ps(dx[n * groups + g]));
        acc[n][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[n][c]), s, acc[n][c]);
      }
      if constexpr (Format::kScaleRows == 2) {
        const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256(sz + 1));
        for (int n = 0; n < NX; ++n)
          acc[n][c] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[n * groups + g]), acc[n][c]);
      }
    }
  }
  for (int n = 0; n < NX; ++n)
    for (int c = 0; c < NB; ++c) _mm512_storeu_ps(out + n * M + (b0 + c) * kCols, acc[n][c]);
}

// As many column blocks per tile as the accumulators leave registers for: one row of x needs
// several independent chains to hide latency, eight rows fill the register file.
template <class Format, int NX>
void blocks(const QuantizedRows& x, int64_t row0, const WeightView<Format>& w, int64_t first,
            int64_t last, float* out, int64_t M) {
  constexpr int NB = NX <= 2 ? 4 : NX <= 4 ? 2 : 1;
  int64_t b = first;
  for (; b + NB <= last; b += NB) tile<Format, NX, NB>(x, row0, w, b, out, M);
  for (; b < last; ++b) tile<Format, NX, 1>(x, row0, w, b, out, M);
}

#else

template <class Format, int NX>
void blocks(const QuantizedRows& x, int64_t row0, const WeightView<Format>& w, int64_t first,
            int64_t last, float* out, int64_t M) {
  const int64_t K = w.K, groups = K / kGroup;
  for (int64_t b = first; b < last; ++b) {
    for (int64_t j = 0; j < kCols; ++j) {
      for (int n = 0; n < NX; ++n) {
        const int64_t row = row0 + n;
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t dot = 0;
          for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k)
            dot += Format::value(w.pair(b, k / 2), j, k % 2) * x.xq[row * K + k];
          const c10::Half* sz = w.group_scales(b, g);
          acc = std::fma(float(dot), float(sz[j]) * x.dx[row * groups + g], acc);
          if constexpr (Format::kScaleRows == 2)
            acc = std::fma(float(sz[kCols + j]), x.sum[row * groups + g], acc);
        }
        out[n * M + b * kCols + j] = acc;
      }
    }
  }
}

#endif

template <class Format>
void rows(const QuantizedRows& x, int64_t row0, int64_t nx, const WeightView<Format>& w,
          int64_t first, int64_t last, float* out, int64_t M) {
  switch (nx) {
    case 1: return blocks<Format, 1>(x, row0, w, first, last, out, M);
    case 2: return blocks<Format, 2>(x, row0, w, first, last, out, M);
    case 3: return blocks<Format, 3>(x, row0, w, first, last, out, M);
    case 4: return blocks<Format, 4>(x, row0, w, first, last, out, M);
    case 5: return blocks<Format, 5>(x, row0, w, first, last, out, M);
    case 6: return blocks<Format, 6>(x, row0, w, first, last, out, M);
    case 7: return blocks<Format, 7>(x, row0, w, first, last, out, M);
    default: return blocks<Format, 8>(x, row0, w, first, last, out, M);
  }
}

template <class Format>
at::Tensor quant_linear(const char* op, const at::Tensor& x, const at::Tensor& q,
                        const at::Tensor& scales, at::ScalarType q_type) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [N, K], got ",
              x.sizes());
  TORCH_CHECK(q.scalar_type() == q_type && q.dim() == 3 && q.size(2) == Format::kPairBytes &&
                  q.is_contiguous(),
              op, ": q must be a contiguous ", q_type, " [M / 16, K / 2, ", Format::kPairBytes,
              "], got ", q.scalar_type(), " ", q.sizes());
  const int64_t N = x.size(0), K = x.size(1), num_blocks = q.size(0), M = num_blocks * kCols;
  TORCH_CHECK(K % kGroup == 0 && q.size(1) * 2 == K, op, ": q holds ", q.size(1) * 2,
              " values per column, x has ", K, " (a multiple of 32 is needed)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == num_blocks * (K / kGroup) * Format::kScaleRows * kCols,
              op, ": scales must be a contiguous float16 [M / 16, K / 32, ", Format::kScaleRows,
              ", 16], got ", scales.scalar_type(), " ", scales.sizes());
  at::Tensor out = at::empty({N, M}, x.options());
  const WeightView<Format> w{static_cast<const uint8_t*>(q.const_data_ptr()),
                             scales.const_data_ptr<c10::Half>(), K};
  const QuantizedRows xq = quantize_rows(x.const_data_ptr<float>(), N, K);
  float* op_out = out.data_ptr<float>();
  parallel_items(num_blocks, N * M * K, [&](int64_t first, int64_t last) {
    // a thread's column blocks, kMaxRows rows of x at a time: its weight slice stays in cache
    // across the passes of a long prompt
    for (int64_t n = 0; n < N; n += kMaxRows)
      rows(xq, n, std::min(kMaxRows, N - n), w, first, last, op_out + n * M, M);
  });
  return out;
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  return quant_linear<Nibbles>("int4_linear", x, q, scales, at::kByte);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  return quant_linear<Bytes>("int8_linear", x, q, scales, at::kChar);
}

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def("int4_linear(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace ladle_kernels
