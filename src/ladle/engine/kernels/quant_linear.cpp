// x @ w.T for a float32 activation and a weight of 4 or 8 bits in groups of 32 along k:
//   int4: w = q * scale + zero, q in 0..15 (GGML Q4_0 / Q4_1 / Q4_K, HQQ4);
//   int8: w = q * scale (+ zero), q in -128..127 (GGML Q8_0; Q5_0, Q5_1 and Q5_K as their
//         5-bit values, whole);
//   int8 in groups of 16: w = q * scale, a scale per 16 k;
//   int6 in groups of 16: w = (q - 32) * scale, q in 0..63, a scale per 16 k (GGML Q6_K,
//         whose sub-blocks these are: 0.875 bytes a weight where int8 takes 1.125).
//
// A tile of rows of x shares each decoded weight vector, and each output is one sum over k in
// a fixed order whatever the number of rows, threads or instruction set, so a sequence gets
// the same logits alone, in a batch, and on any CPU.
//
// x enters as int16 per group of 32 (scale: the group's largest magnitude / 32767, so within
// 2e-5 of float32 at the output, where bf16 activations cost 4e-3), and a group's dot products
// are integer: two k per 32-bit lane, by vpdpwssd (AVX-512 VNNI, AVX-VNNI) or vpmaddwd and an
// add (AVX-512BW, AVX2), widening multiplies on NEON. The group's sum becomes float once,
// times the weight's and x's scales, and the weight's zero point meets x's exact float sum
// over the group. (int8 activations, as llama.cpp uses for Q4 weights, ran 1.5x faster on
// AVX-512 VNNI but moved SmolLM2's logits 9% from float32: too much.)
//
// Layout (made by `quant/int4.py` and `quant/int8.py`), per block of 16 output columns:
//   q      int4: uint8 [M / 16, K / 2, 16], byte i of pair p holding column i / 2 (low
//          nibble) and column 8 + i / 2 (high nibble) at k = 2p + i % 2: one widening to
//          16-bit words, a mask and a shift give all 16 columns' pairs (simd.h);
//          int8: int8 [M / 16, K / 2, 32], bytes 2j and 2j + 1 of pair p holding them;
//          int6: uint8 [M / 16, K / 2, 24], the low four bits as int4's 16 bytes, then 8
//          bytes of top bits, byte c holding word c + 8s's in bits 2s, 2s + 1 (s = 0..3);
//          either way a pair widens to the two 16-bit words of lane j;
//   scales fp16 [M / 16, K / G, R, 16]: per group of G k, the 16 columns' scales, then
//          (R = 2) their zeros.

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "simd.h"
#include "thread_pool.h"

namespace ladle_kernels {

namespace {

using namespace simd;

constexpr int64_t kCols = 16;  // output columns per block
constexpr int64_t kGroup = 32;  // k per activation scale
constexpr float kInt16Max = 32767.0f;
// Pairs ahead of the one being read that a block's stream is prefetched: each block is a
// short stream (K / 2 pairs), too short for the hardware prefetcher to ramp up on its own.
constexpr int64_t kPrefetchPairs = 32;

// How a weight format stores a block's k pair, its scale groups and its zero points.
struct Nibbles {
  static constexpr int64_t kPairBytes = kCols;
  static constexpr int64_t kScaleGroup = 32;
  LADLE_INLINE static W widen(const uint8_t* pair) { return widen_nibbles(pair); }
};

struct Bytes {
  static constexpr int64_t kPairBytes = 2 * kCols;
  static constexpr int64_t kScaleGroup = 32;
  LADLE_INLINE static W widen(const uint8_t* pair) { return widen_bytes(pair); }
};

struct Bytes16 : Bytes {  // a scale per 16 k: two per activation group
  static constexpr int64_t kScaleGroup = 16;
};

struct Sixes {  // Q6_K's 6 bits: a nibble plane and a plane of top bits, a scale per 16 k
  static constexpr int64_t kPairBytes = kCols + kCols / 2;
  static constexpr int64_t kScaleGroup = 16;
  LADLE_INLINE static W widen(const uint8_t* pair) { return widen_sixes(pair); }
};

template <class Format>
struct WeightView {
  const uint8_t* q;
  const Half* scales;
  int64_t K;
  int64_t scale_rows;  // 1: scales, 2: scales and zeros
  const uint8_t* pair(int64_t b, int64_t p) const {
    return q + (b * (K / 2) + p) * Format::kPairBytes;
  }
  // The 16 columns' scales (then zeros) of scale group `g` of column block `b`.
  const Half* group_scales(int64_t b, int64_t g) const {
    return scales + (b * (K / Format::kScaleGroup) + g) * scale_rows * kCols;
  }
};

// x's rows in int16, each group of 32 with its own scale: x[k] ~ xq[k] * dx[g] within 1/65534
// of the group's largest value, and the exact float sum of the group, which meets the weight's
// zero points.
struct QuantizedRows {
  std::vector<int16_t> xq;
  std::vector<float> dx, sum;
};

void quantize_group(const float* v, int16_t* q, float* dx, float* sum) {
  const F lo = load(v), hi = load(v + 16);
  const float amax = reduce_max(max(abs(lo), abs(hi)));
  const float inv = amax > 0.0f ? kInt16Max / amax : 0.0f;
  round_to_int16(lo, inv, q);  // |x * inv| <= 32767: nothing saturates
  round_to_int16(hi, inv, q + 16);
  *dx = amax / kInt16Max;
  *sum = reduce_add(add(lo, hi));
}

void quantize_rows(const float* x, int64_t N, int64_t K, QuantizedRows& r) {
  r.xq.resize(N * K);
  r.dx.resize(N * K / kGroup);
  r.sum.resize(N * K / kGroup);
  for (int64_t g = 0; g < N * K / kGroup; ++g) {
    quantize_group(x + g * kGroup, r.xq.data() + g * kGroup, &r.dx[g], &r.sum[g]);
  }
}

// Where a tile reads a column block's pairs, widened to 16-bit lanes: from the weight itself
// (a decode step reads each weight once), or from a copy of the block widened once for every
// row of a prompt (the widening costs as much as the dot products of three rows on AVX2).
template <class Format>
struct Streamed {
  const WeightView<Format>& w;

  LADLE_INLINE W operator()(int64_t b, int64_t p) const {
    // once per cache line: the pair that starts in it (int6's 24-byte pairs straddle lines)
    if ((p * Format::kPairBytes) % 64 < Format::kPairBytes) {
      __builtin_prefetch(w.pair(b, p + kPrefetchPairs));
    }
    return Format::widen(w.pair(b, p));
  }
};

struct Widened {
  const int16_t* block;  // block b0's K / 2 pairs, 32 int16 each

  LADLE_INLINE W operator()(int64_t, int64_t p) const { return load_w(block + p * 32); }
};

// out[n][b * 16 + j] for NX rows of x and NB column blocks starting at block b0. The sums
// accumulate in `out` itself: touched once per group, they leave the registers to the
// integer dot products.
template <class Format, int NX, int NB, class Pairs>
void tile(const QuantizedRows& x, int64_t row0, const WeightView<Format>& w, const Pairs& pairs,
          int64_t b0, float* out, int64_t ldo) {
  const int64_t K = w.K, groups = K / kGroup;
  for (int n = 0; n < NX; ++n)
    for (int c = 0; c < NB; ++c) store(out + n * ldo + (b0 + c) * kCols, zero());
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.xq.data() + row0 * K);  // k pairs
  const float* dx = x.dx.data() + row0 * groups;
  const float* xsum = x.sum.data() + row0 * groups;
  constexpr int64_t kSubgroups = kGroup / Format::kScaleGroup;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t s = 0; s < kSubgroups; ++s) {
      I dot[NX][NB];
      for (int n = 0; n < NX; ++n)
        for (int c = 0; c < NB; ++c) dot[n][c] = izero();
      const int64_t p0 = (g * kGroup + s * Format::kScaleGroup) / 2;
      for (int64_t p = p0; p < p0 + Format::kScaleGroup / 2; ++p) {
        for (int c = 0; c < NB; ++c) {
          const W wq = pairs(b0 + c, p);
          for (int n = 0; n < NX; ++n) dot[n][c] = dot_pairs(dot[n][c], wq, xq[n * K / 2 + p]);
        }
      }
      for (int c = 0; c < NB; ++c) {
        const Half* sz = w.group_scales(b0 + c, g * kSubgroups + s);
        const F scale = load(sz);
        for (int n = 0; n < NX; ++n) {
          float* o = out + n * ldo + (b0 + c) * kCols;
          F acc = fmadd(to_float(dot[n][c]), mul(scale, set1(dx[n * groups + g])), load(o));
          if (w.scale_rows == 2) acc = fmadd(load(sz + kCols), set1(xsum[n * groups + g]), acc);
          store(o, acc);
        }
      }
    }
  }
}

// As many column blocks per tile as the accumulators leave registers for (32 zmm, 16 ymm).
// One row of x (a decode step) reads each weight once: on AVX2 it streams from memory fastest
// one block at a time, a single stream through the thread's consecutive blocks (measured on an
// AMD EPYC Zen 3: 7.2 GB/s from DRAM on one thread, 5.6 with two blocks interleaved).
template <class Format, int NX>
void blocks(const QuantizedRows& x, int64_t row0, const WeightView<Format>& w, int64_t first,
            int64_t last, float* out, int64_t ldo) {
#if LADLE_SIMD_AVX512
  constexpr int NB = NX <= 2 ? 4 : NX <= 4 ? 2 : 1;
#else
  constexpr int NB = 1;
#endif
  const Streamed<Format> pairs{w};
  int64_t b = first;
  for (; b + NB <= last; b += NB) tile<Format, NX, NB>(x, row0, w, pairs, b, out, ldo);
  for (; b < last; ++b) tile<Format, NX, 1>(x, row0, w, pairs, b, out, ldo);
}

template <class Format>
void rows(const QuantizedRows& x, int64_t row0, int64_t nx, const WeightView<Format>& w,
          int64_t first, int64_t last, float* out, int64_t ldo) {
  switch (nx) {
    case 1: return blocks<Format, 1>(x, row0, w, first, last, out, ldo);
    case 2: return blocks<Format, 2>(x, row0, w, first, last, out, ldo);
    default: return blocks<Format, 3>(x, row0, w, first, last, out, ldo);
  }
}

// Rows of x per pass over a widened block: their dot products fill the vector registers
// with the block's pair (12 of 16 ymm; 24 of 32 zmm on AVX-512, whose pair is one register).
#if LADLE_SIMD_AVX512
constexpr int kWideRows = 12;
#else
constexpr int kWideRows = 4;
#endif

// Every row of x against the column blocks [first, last), each block widened once.
template <class Format>
void wide_blocks(const QuantizedRows& x, int64_t N, const WeightView<Format>& w, int64_t first,
                 int64_t last, float* out, int64_t ldo) {
  thread_local std::vector<int16_t> buffer;
  buffer.resize(w.K / 2 * 32);
  for (int64_t b = first; b < last; ++b) {
    for (int64_t p = 0; p < w.K / 2; ++p) store_w(buffer.data() + p * 32, Format::widen(w.pair(b, p)));
    const Widened pairs{buffer.data()};
    int64_t n = 0;
    for (; n + kWideRows <= N; n += kWideRows)
      tile<Format, kWideRows, 1>(x, n, w, pairs, b, out + n * ldo, ldo);
    for (; n < N; ++n) tile<Format, 1, 1>(x, n, w, pairs, b, out + n * ldo, ldo);
  }
}

template <class Format>
void quant_linear(const float* x, int64_t N, int64_t K, const WeightView<Format>& w, int64_t M,
                  float* out, int64_t ldo) {
  thread_local QuantizedRows buffers;  // reused: a decode step calls this ~100 times
  QuantizedRows& xq = buffers;  // the caller's: a lambda would name the worker's own
  quantize_rows(x, N, K, xq);
  parallel_items(M / kCols, N * M * K, [&](int64_t first, int64_t last) {
    if (N >= kWideRows) return wide_blocks(xq, N, w, first, last, out, ldo);
    // the chunk's column blocks, a few rows of x at a time: its weight slice stays in cache
    for (int64_t n = 0; n < N; n += 3)
      rows(xq, n, std::min<int64_t>(3, N - n), w, first, last, out + n * ldo, ldo);
  });
}

// out[n][r] = x[n] . w[r] for NX rows of x and R rows of w (rows K apart, out rows ldo apart),
// each a 16-lane float32 sum over k in chunks of 16, reduced in simd's one tree.
template <class T, int NX, int R>
void dense_tile(const float* x, const T* w, int64_t K, float* out, int64_t ldo) {
  F acc[NX][R];
  for (int n = 0; n < NX; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = zero();
  F wr[R];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int r = 0; r < R; ++r) wr[r] = load(w + r * K + k);
    for (int n = 0; n < NX; ++n) {
      const F xn = load(x + n * K + k);
      for (int r = 0; r < R; ++r) acc[n][r] = fmadd(xn, wr[r], acc[n][r]);
    }
  }
  if (k < K) {
    for (int r = 0; r < R; ++r) wr[r] = load_first(w + r * K + k, K - k);
    for (int n = 0; n < NX; ++n) {
      const F xn = load_first(x + n * K + k, K - k);
      for (int r = 0; r < R; ++r) acc[n][r] = fmadd(xn, wr[r], acc[n][r]);
    }
  }
  for (int n = 0; n < NX; ++n)
    for (int r = 0; r < R; ++r) out[n * ldo + r] = reduce_add(acc[n][r]);
}

#if LADLE_SIMD_AVX512
constexpr int64_t kDenseRows = 4;  // weight rows per tile
constexpr int64_t kDenseXRows = 4;  // x rows per pass: kDenseRows * kDenseXRows accumulators
#else
constexpr int64_t kDenseRows = 2;
constexpr int64_t kDenseXRows = 3;
#endif

template <class T, int R>
void dense_rows(const float* x, int64_t nx, const T* w, int64_t K, float* out, int64_t ldo) {
  switch (nx) {
    case 1: return dense_tile<T, 1, R>(x, w, K, out, ldo);
    case 2: return dense_tile<T, 2, R>(x, w, K, out, ldo);
#if LADLE_SIMD_AVX512
    case 3: return dense_tile<T, 3, R>(x, w, K, out, ldo);
#endif
    default: return dense_tile<T, kDenseXRows, R>(x, w, K, out, ldo);
  }
}

template <class T>
void dense_linear(const float* x, int64_t N, int64_t K, const T* w, int64_t M, float* out,
                  int64_t ldo) {
  const int64_t num_tiles = (M + kDenseRows - 1) / kDenseRows;
  parallel_items(num_tiles, N * M * K, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t row = t * kDenseRows, rows = std::min(kDenseRows, M - row);
      // the tile's weight rows stay in L1 while the passes over x rows reuse them
      for (int64_t n = 0; n < N; n += kDenseXRows) {
        const int64_t nx = std::min(kDenseXRows, N - n);
        if (rows == kDenseRows) {
          dense_rows<T, kDenseRows>(x + n * K, nx, w + row * K, K, out + n * ldo + row, ldo);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            dense_rows<T, 1>(x + n * K, nx, w + (row + r) * K, K, out + n * ldo + row + r, ldo);
        }
      }
    }
  });
}

}  // namespace

void linear(const float* x, int64_t N, const Weight& w, float* out, int64_t ldo) {
  const auto* q = static_cast<const uint8_t*>(w.data);
  const auto* scales = static_cast<const Half*>(w.scales);
  const int64_t K = w.cols, M = w.rows;
  switch (w.format) {
    case kInt4:
      return quant_linear(x, N, K, WeightView<Nibbles>{q, scales, K, 1 + w.has_zeros}, M, out, ldo);
    case kInt8:
      return quant_linear(x, N, K, WeightView<Bytes>{q, scales, K, 1 + w.has_zeros}, M, out, ldo);
    case kInt8Group16:
      return quant_linear(x, N, K, WeightView<Bytes16>{q, scales, K, 1}, M, out, ldo);
    case kInt6Group16:
      return quant_linear(x, N, K, WeightView<Sixes>{q, scales, K, 1}, M, out, ldo);
    case kF32:
      return dense_linear(x, N, K, static_cast<const float*>(w.data), M, out, ldo);
    case kF16:
      return dense_linear(x, N, K, static_cast<const Half*>(w.data), M, out, ldo);
    case kBF16:
      return dense_linear(x, N, K, static_cast<const BFloat16*>(w.data), M, out, ldo);
  }
}

}  // namespace ladle_kernels
