// Sixteen float lanes on every instruction set the kernels are built for.
//
// The kernels are written once, on the types and functions below; each ISA build of the
// library (`build.py`: avx512_vnni, avx512, avx_vnni, avx2, neon, portable) compiles them to
// its own instructions. Every operation is defined lane by lane as IEEE single precision
// computes it (fmadd rounds once, reduce_add sums in one fixed tree, exp is one polynomial
// evaluated in one order), so every SIMD build gives the same bits: an AVX2 laptop, an
// AVX-512 server and an ARM board compute the same logits. The portable build is the same
// code on plain arrays; it equals the others where its target has a fused multiply-add
// (aarch64), and rounds a*b+c twice where it has none (x86-64 before AVX2).
//
// F is 16 floats (one zmm; two ymm; four NEON q registers), I 16 int32, W 16 lanes of two
// int16 (a pair of k for one output column), Mask 16 lane flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(LADLE_ISA_AVX512_VNNI) || defined(LADLE_ISA_AVX512)
#define LADLE_SIMD_AVX512 1
#elif defined(LADLE_ISA_AVX_VNNI) || defined(LADLE_ISA_AVX2)
#define LADLE_SIMD_AVX2 1
#elif defined(LADLE_ISA_NEON)
#define LADLE_SIMD_NEON 1
#elif defined(LADLE_ISA_PORTABLE)
#define LADLE_SIMD_PORTABLE 1
#else
#error "build with one of -DLADLE_ISA_{AVX512_VNNI,AVX512,AVX_VNNI,AVX2,NEON,PORTABLE}"
#endif

#if defined(LADLE_EMULATED)
// Tests only (`build.py --emulate`): another CPU's intrinsics from SIMDe, computed lane by
// lane as that CPU does, so the paths this machine cannot execute are still checked here.
#define SIMDE_ENABLE_NATIVE_ALIASES
#define LADLE_EMULATED_INLINE static inline
#include "simd_emulated.h"
#elif LADLE_SIMD_AVX512 || LADLE_SIMD_AVX2
#include <immintrin.h>
#elif LADLE_SIMD_NEON
#include <arm_neon.h>
#endif

#define LADLE_INLINE [[gnu::always_inline]] inline

namespace ladle_kernels {

// Storage types: the bits of an IEEE half and of a bfloat16.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

namespace simd {

LADLE_INLINE float from_bits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

LADLE_INLINE uint32_t to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  return w;
}

// Exact widening of a half (FP16 library's fp16_ieee_to_fp32_value, as c10::Half).
LADLE_INLINE float half_to_float(Half h) {
  const uint32_t w = uint32_t(h.bits) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized)));
}

// Rounded to nearest even (fp16_ieee_from_fp32_value, as torch's `.half()` and vcvtps2ph).
LADLE_INLINE Half float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return Half{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

LADLE_INLINE float bf16_to_float(BFloat16 b) { return from_bits(uint32_t(b.bits) << 16); }

LADLE_INLINE float to_float(float x) { return x; }
LADLE_INLINE float to_float(Half x) { return half_to_float(x); }
LADLE_INLINE float to_float(BFloat16 x) { return bf16_to_float(x); }

// a * b + c rounded once where the target has the instruction (every SIMD build, aarch64).
LADLE_INLINE float fmadd(float a, float b, float c) {
#if LADLE_SIMD_PORTABLE && !defined(__FMA__) && !defined(__aarch64__)
  return a * b + c;  // built with -ffp-contract=off: two roundings, as the comment says
#else
  return std::fma(a, b, c);
#endif
}

// =========================================================================================
#if LADLE_SIMD_AVX512

struct F {
  __m512 v;
};
struct I {
  __m512i v;
};
struct W {
  __m512i v;
};
struct Mask {
  __mmask16 m;
};

LADLE_INLINE F zero() { return {_mm512_setzero_ps()}; }
LADLE_INLINE F set1(float x) { return {_mm512_set1_ps(x)}; }
LADLE_INLINE F load(const float* p) { return {_mm512_loadu_ps(p)}; }
LADLE_INLINE F load(const Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
LADLE_INLINE F load(const BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
LADLE_INLINE Mask first_lanes(int64_t n) {
  return {n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1)};
}
LADLE_INLINE F load_first(const float* p, int64_t n) {
  return {_mm512_maskz_loadu_ps(first_lanes(n).m, p)};
}
LADLE_INLINE void store(float* p, F a) { _mm512_storeu_ps(p, a.v); }
LADLE_INLINE void store_first(float* p, F a, int64_t n) {
  _mm512_mask_storeu_ps(p, first_lanes(n).m, a.v);
}
LADLE_INLINE void store(Half* p, F a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
LADLE_INLINE F add(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
LADLE_INLINE F sub(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
LADLE_INLINE F mul(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
LADLE_INLINE F div(F a, F b) { return {_mm512_div_ps(a.v, b.v)}; }
LADLE_INLINE F max(F a, F b) { return {_mm512_max_ps(a.v, b.v)}; }
LADLE_INLINE F min(F a, F b) { return {_mm512_min_ps(a.v, b.v)}; }
LADLE_INLINE F abs(F a) { return {_mm512_abs_ps(a.v)}; }
LADLE_INLINE F fmadd(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
LADLE_INLINE F fnmadd(F a, F b, F c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
LADLE_INLINE F round_even(F a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
LADLE_INLINE F select(Mask m, F if_true, F if_false) {
  return {_mm512_mask_blend_ps(m.m, if_false.v, if_true.v)};
}
LADLE_INLINE Mask lanes_above(const int32_t* counts, int32_t i) {  // counts[j] > i
  return {_mm512_cmpgt_epi32_mask(_mm512_loadu_si512(counts), _mm512_set1_epi32(i))};
}
LADLE_INLINE Mask lanes_at_most(const int32_t* starts, int32_t i) {  // starts[j] <= i
  return {_mm512_cmple_epi32_mask(_mm512_loadu_si512(starts), _mm512_set1_epi32(i))};
}
LADLE_INLINE Mask both(Mask a, Mask b) { return {__mmask16(a.m & b.m)}; }
// p * 2^k for integral k in [-150, 127], rounded once (as the two-step product elsewhere).
LADLE_INLINE F scale_pow2(F p, F k) { return {_mm512_scalef_ps(p.v, k.v)}; }
LADLE_INLINE void store_lanes(float* p, F a) { _mm512_storeu_ps(p, a.v); }

// (l, l + 8), (l, l + 4), (l, l + 2), (l, l + 1): one tree for every build.
LADLE_INLINE float reduce_add(F a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a.v),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
LADLE_INLINE float reduce_max(F a) { return _mm512_reduce_max_ps(a.v); }

LADLE_INLINE I izero() { return {_mm512_setzero_si512()}; }
LADLE_INLINE F to_float(I a) { return {_mm512_cvtepi32_ps(a.v)}; }

// Lane j: column j's values at k = 2p and 2p + 1, as two int16, from a pair's 16 bytes:
// byte i holds column i / 2 (low nibble) and column 8 + i / 2 (high nibble) at k = 2p + i % 2,
// so the low nibbles are lanes 0-7 and the high ones lanes 8-15, each in order.
LADLE_INLINE W widen_nibbles(const uint8_t* pair) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
  const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(b, 4);
  return {_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)};
}
// Lane j: bytes 2j and 2j + 1, sign-extended.
LADLE_INLINE W widen_bytes(const uint8_t* pair) {
  return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair)))};
}
// Lane j: column j's 6-bit values at k = 2p and 2p + 1, less 32, from a pair's 24 bytes: the
// low four bits as `widen_nibbles` reads its 16, then 8 bytes of the top two bits, byte c
// holding word c + 8s's in bits 2s and 2s + 1 (s = 0..3), words in the order of W's int16.
LADLE_INLINE W widen_sixes(const uint8_t* pair) {
  const W low = widen_nibbles(pair);
  int64_t top_bytes;
  std::memcpy(&top_bytes, pair + 16, 8);
  const __m512i top = _mm512_cvtepu8_epi16(_mm256_set1_epi64x(top_bytes));  // word w: byte w % 8
  const __m512i shifts = _mm512_set_epi64(
      0x0006000600060006, 0x0006000600060006, 0x0004000400040004, 0x0004000400040004,
      0x0002000200020002, 0x0002000200020002, 0, 0);
  const __m512i high = _mm512_slli_epi16(
      _mm512_and_si512(_mm512_srlv_epi16(top, shifts), _mm512_set1_epi16(3)), 4);
  return {_mm512_sub_epi16(_mm512_or_si512(low.v, high), _mm512_set1_epi16(32))};
}
LADLE_INLINE W load_w(const int16_t* p) { return {_mm512_loadu_si512(p)}; }
LADLE_INLINE void store_w(int16_t* p, W w) { _mm512_storeu_si512(p, w.v); }
// Lane j + w_j.lo * x.lo + w_j.hi * x.hi, for x_pair two int16 (lo in the low half).
LADLE_INLINE I dot_pairs(I acc, W w, int32_t x_pair) {
#if defined(LADLE_ISA_AVX512_VNNI)
  return {_mm512_dpwssd_epi32(acc.v, w.v, _mm512_set1_epi32(x_pair))};
#else
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(w.v, _mm512_set1_epi32(x_pair)))};
#endif
}

// 16 rounded int16 values of a * inv (|a * inv| <= 32767).
LADLE_INLINE void round_to_int16(F a, float inv, int16_t* out) {
  const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a.v, _mm512_set1_ps(inv)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtsepi32_epi16(r));
}

// =========================================================================================
#elif LADLE_SIMD_AVX2

struct F {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
struct I {
  __m256i lo, hi;
};
struct W {
  __m256i lo, hi;
};
struct Mask {
  __m256 lo, hi;  // all ones where set
};

LADLE_INLINE F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
LADLE_INLINE F set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
LADLE_INLINE F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
LADLE_INLINE F load(const Half* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
LADLE_INLINE F load(const BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
}
LADLE_INLINE __m256i lane_ids(int first) {
  return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
}
LADLE_INLINE Mask first_lanes(int64_t n) {
  const __m256i v = _mm256_set1_epi32(int32_t(n < 16 ? n : 16));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, lane_ids(0))),
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, lane_ids(8)))};
}
LADLE_INLINE F load_first(const float* p, int64_t n) {
  const Mask m = first_lanes(n);
  return {_mm256_maskload_ps(p, _mm256_castps_si256(m.lo)),
          _mm256_maskload_ps(p + 8, _mm256_castps_si256(m.hi))};
}
LADLE_INLINE void store(float* p, F a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
LADLE_INLINE void store_first(float* p, F a, int64_t n) {
  const Mask m = first_lanes(n);
  _mm256_maskstore_ps(p, _mm256_castps_si256(m.lo), a.lo);
  _mm256_maskstore_ps(p + 8, _mm256_castps_si256(m.hi), a.hi);
}
LADLE_INLINE void store(Half* p, F a) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.lo, kRound));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(a.hi, kRound));
}
#define LADLE_AVX2_BINARY(name, op) \
  LADLE_INLINE F name(F a, F b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
LADLE_AVX2_BINARY(add, _mm256_add_ps)
LADLE_AVX2_BINARY(sub, _mm256_sub_ps)
LADLE_AVX2_BINARY(mul, _mm256_mul_ps)
LADLE_AVX2_BINARY(div, _mm256_div_ps)
LADLE_AVX2_BINARY(max, _mm256_max_ps)
LADLE_AVX2_BINARY(min, _mm256_min_ps)
#undef LADLE_AVX2_BINARY
LADLE_INLINE F abs(F a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
LADLE_INLINE F fmadd(F a, F b, F c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
LADLE_INLINE F fnmadd(F a, F b, F c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
LADLE_INLINE F round_even(F a) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kRound), _mm256_round_ps(a.hi, kRound)};
}
LADLE_INLINE F select(Mask m, F if_true, F if_false) {
  return {_mm256_blendv_ps(if_false.lo, if_true.lo, m.lo),
          _mm256_blendv_ps(if_false.hi, if_true.hi, m.hi)};
}
LADLE_INLINE Mask lanes_above(const int32_t* counts, int32_t i) {
  const __m256i v = _mm256_set1_epi32(i);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(counts));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(counts + 8));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(lo, v)), _mm256_castsi256_ps(_mm256_cmpgt_epi32(hi, v))};
}
LADLE_INLINE Mask lanes_at_most(const int32_t* starts, int32_t i) {  // i + 1 > starts[j]
  const __m256i v = _mm256_set1_epi32(i + 1);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(starts));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(starts + 8));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, lo)), _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, hi))};
}
LADLE_INLINE Mask both(Mask a, Mask b) {
  return {_mm256_and_ps(a.lo, b.lo), _mm256_and_ps(a.hi, b.hi)};
}
LADLE_INLINE __m256 pow2(__m256i k) {  // 2^k for k in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}
LADLE_INLINE __m256 scale_pow2_8(__m256 p, __m256 kf) {
  const __m256i k = _mm256_cvtps_epi32(kf);
  const __m256i k1 = _mm256_srai_epi32(k, 1);  // floor(k / 2): both halves in [-75, 64]
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(_mm256_sub_epi32(k, k1)));
}
LADLE_INLINE F scale_pow2(F p, F k) { return {scale_pow2_8(p.lo, k.lo), scale_pow2_8(p.hi, k.hi)}; }
LADLE_INLINE void store_lanes(float* p, F a) { store(p, a); }

LADLE_INLINE float reduce_add(F a) {
  const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
LADLE_INLINE float reduce_max(F a) {
  const __m256 s8 = _mm256_max_ps(a.lo, a.hi);
  const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

LADLE_INLINE I izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
LADLE_INLINE F to_float(I a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }

LADLE_INLINE W widen_nibbles(const uint8_t* pair) {  // the layout: AVX-512's widen_nibbles
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
  return {_mm256_and_si256(b, _mm256_set1_epi16(15)), _mm256_srli_epi16(b, 4)};
}
LADLE_INLINE W widen_bytes(const uint8_t* pair) {
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair))),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16)))};
}
LADLE_INLINE W widen_sixes(const uint8_t* pair) {  // the layout: AVX-512's widen_sixes
  const W low = widen_nibbles(pair);
  const __m128i top8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + 16));
  const __m256i top = _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(top8, top8));  // word i: byte i % 8
  // words 0-15 want bits 0-1 (i < 8) or 2-3 at bits 4-5; words 16-31 bits 4-5 or 6-7
  const __m256i to_lo = _mm256_set_epi16(4, 4, 4, 4, 4, 4, 4, 4, 16, 16, 16, 16, 16, 16, 16, 16);
  const __m256i to_hi = _mm256_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4);
  const __m256i mask = _mm256_set1_epi16(0x30), bias = _mm256_set1_epi16(32);
  const __m256i lo = _mm256_and_si256(_mm256_mullo_epi16(top, to_lo), mask);
  const __m256i hi = _mm256_and_si256(_mm256_mullo_epi16(_mm256_srli_epi16(top, 2), to_hi), mask);
  return {_mm256_sub_epi16(_mm256_or_si256(low.lo, lo), bias),
          _mm256_sub_epi16(_mm256_or_si256(low.hi, hi), bias)};
}
LADLE_INLINE W load_w(const int16_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))};
}
LADLE_INLINE void store_w(int16_t* p, W w) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), w.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), w.hi);
}
LADLE_INLINE I dot_pairs(I acc, W w, int32_t x_pair) {
  const __m256i x = _mm256_set1_epi32(x_pair);
#if defined(LADLE_ISA_AVX_VNNI)
  return {_mm256_dpwssd_avx_epi32(acc.lo, w.lo, x), _mm256_dpwssd_avx_epi32(acc.hi, w.hi, x)};
#else
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(w.lo, x)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(w.hi, x))};
#endif
}

LADLE_INLINE void round_to_int16(F a, float inv, int16_t* out) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(a.lo, s));  // nearest even (MXCSR)
  const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(a.hi, s));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
}

// =========================================================================================
#elif LADLE_SIMD_NEON

struct F {
  float32x4_t q[4];
};
struct I {
  int32x4_t q[4];
};
struct W {
  int16x8_t q[4];  // q[i]: lanes 4i .. 4i + 3, each two int16
};
struct Mask {
  uint32x4_t q[4];
};

#define LADLE_NEON_EACH(expr) \
  F r;                        \
  for (int i = 0; i < 4; ++i) r.q[i] = expr; \
  return r

LADLE_INLINE F zero() { LADLE_NEON_EACH(vdupq_n_f32(0.0f)); }
LADLE_INLINE F set1(float x) { LADLE_NEON_EACH(vdupq_n_f32(x)); }
LADLE_INLINE F load(const float* p) { LADLE_NEON_EACH(vld1q_f32(p + 4 * i)); }
LADLE_INLINE F load(const Half* p) {
  LADLE_NEON_EACH(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(&p[4 * i].bits))));
}
LADLE_INLINE F load(const BFloat16* p) {
  LADLE_NEON_EACH(vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(&p[4 * i].bits), 16)));
}
LADLE_INLINE Mask first_lanes(int64_t n) {
  Mask m;
  const int32x4_t ids = {0, 1, 2, 3};
  const int32x4_t v = vdupq_n_s32(int32_t(n < 16 ? n : 16));
  for (int i = 0; i < 4; ++i) m.q[i] = vcgtq_s32(v, vaddq_s32(ids, vdupq_n_s32(4 * i)));
  return m;
}
LADLE_INLINE F load_first(const float* p, int64_t n) {
  alignas(16) float tail[16] = {};
  std::memcpy(tail, p, (n < 16 ? n : 16) * sizeof(float));
  return load(tail);
}
LADLE_INLINE void store(float* p, F a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.q[i]);
}
LADLE_INLINE void store_first(float* p, F a, int64_t n) {
  alignas(16) float tail[16];
  store(tail, a);
  std::memcpy(p, tail, (n < 16 ? n : 16) * sizeof(float));
}
LADLE_INLINE void store(Half* p, F a) {
  for (int i = 0; i < 4; ++i) vst1_u16(&p[4 * i].bits, vreinterpret_u16_f16(vcvt_f16_f32(a.q[i])));
}
LADLE_INLINE F add(F a, F b) { LADLE_NEON_EACH(vaddq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F sub(F a, F b) { LADLE_NEON_EACH(vsubq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F mul(F a, F b) { LADLE_NEON_EACH(vmulq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F div(F a, F b) { LADLE_NEON_EACH(vdivq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F max(F a, F b) { LADLE_NEON_EACH(vmaxq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F min(F a, F b) { LADLE_NEON_EACH(vminq_f32(a.q[i], b.q[i])); }
LADLE_INLINE F abs(F a) { LADLE_NEON_EACH(vabsq_f32(a.q[i])); }
LADLE_INLINE F fmadd(F a, F b, F c) { LADLE_NEON_EACH(vfmaq_f32(c.q[i], a.q[i], b.q[i])); }
LADLE_INLINE F fnmadd(F a, F b, F c) { LADLE_NEON_EACH(vfmsq_f32(c.q[i], a.q[i], b.q[i])); }
LADLE_INLINE F round_even(F a) { LADLE_NEON_EACH(vrndnq_f32(a.q[i])); }
LADLE_INLINE F select(Mask m, F if_true, F if_false) {
  LADLE_NEON_EACH(vbslq_f32(m.q[i], if_true.q[i], if_false.q[i]));
}
LADLE_INLINE Mask lanes_above(const int32_t* counts, int32_t i) {
  Mask m;
  for (int j = 0; j < 4; ++j) m.q[j] = vcgtq_s32(vld1q_s32(counts + 4 * j), vdupq_n_s32(i));
  return m;
}
LADLE_INLINE Mask lanes_at_most(const int32_t* starts, int32_t i) {
  Mask m;
  for (int j = 0; j < 4; ++j) m.q[j] = vcleq_s32(vld1q_s32(starts + 4 * j), vdupq_n_s32(i));
  return m;
}
LADLE_INLINE Mask both(Mask a, Mask b) {
  Mask m;
  for (int j = 0; j < 4; ++j) m.q[j] = vandq_u32(a.q[j], b.q[j]);
  return m;
}
LADLE_INLINE float32x4_t pow2(int32x4_t k) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k, vdupq_n_s32(127)), 23));
}
LADLE_INLINE F scale_pow2(F p, F kf) {
  F r;
  for (int i = 0; i < 4; ++i) {
    const int32x4_t k = vcvtnq_s32_f32(kf.q[i]);
    const int32x4_t k1 = vshrq_n_s32(k, 1);
    r.q[i] = vmulq_f32(vmulq_f32(p.q[i], pow2(k1)), pow2(vsubq_s32(k, k1)));
  }
  return r;
}
LADLE_INLINE void store_lanes(float* p, F a) { store(p, a); }

LADLE_INLINE float reduce_add(F a) {
  const float32x4_t s8a = vaddq_f32(a.q[0], a.q[2]), s8b = vaddq_f32(a.q[1], a.q[3]);
  const float32x4_t s4 = vaddq_f32(s8a, s8b);
  const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
  return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
}
LADLE_INLINE float reduce_max(F a) {
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(a.q[0], a.q[1]), vmaxq_f32(a.q[2], a.q[3])));
}

LADLE_INLINE I izero() {
  I r;
  for (int i = 0; i < 4; ++i) r.q[i] = vdupq_n_s32(0);
  return r;
}
LADLE_INLINE F to_float(I a) { LADLE_NEON_EACH(vcvtq_f32_s32(a.q[i])); }

LADLE_INLINE W widen_nibbles(const uint8_t* pair) {  // the layout: AVX-512's widen_nibbles
  const uint8x16_t b = vld1q_u8(pair);
  const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
  W w;
  w.q[0] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo)));
  w.q[1] = vreinterpretq_s16_u16(vmovl_high_u8(lo));
  w.q[2] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi)));
  w.q[3] = vreinterpretq_s16_u16(vmovl_high_u8(hi));
  return w;
}
LADLE_INLINE W widen_bytes(const uint8_t* pair) {
  const int8x16_t a = vld1q_s8(reinterpret_cast<const int8_t*>(pair));
  const int8x16_t b = vld1q_s8(reinterpret_cast<const int8_t*>(pair + 16));
  W w;
  w.q[0] = vmovl_s8(vget_low_s8(a));
  w.q[1] = vmovl_high_s8(a);
  w.q[2] = vmovl_s8(vget_low_s8(b));
  w.q[3] = vmovl_high_s8(b);
  return w;
}
LADLE_INLINE W widen_sixes(const uint8_t* pair) {  // the layout: AVX-512's widen_sixes
  W w = widen_nibbles(pair);
  const int16x8_t top = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(pair + 16)));  // word i: byte i
  const int16x8_t three = vdupq_n_s16(3), bias = vdupq_n_s16(32);
  w.q[0] = vsubq_s16(vorrq_s16(w.q[0], vshlq_n_s16(vandq_s16(top, three), 4)), bias);
  w.q[1] = vsubq_s16(vorrq_s16(w.q[1], vshlq_n_s16(vandq_s16(vshrq_n_s16(top, 2), three), 4)), bias);
  w.q[2] = vsubq_s16(vorrq_s16(w.q[2], vshlq_n_s16(vandq_s16(vshrq_n_s16(top, 4), three), 4)), bias);
  w.q[3] = vsubq_s16(vorrq_s16(w.q[3], vshlq_n_s16(vshrq_n_s16(top, 6), 4)), bias);
  return w;
}
LADLE_INLINE W load_w(const int16_t* p) {
  W w;
  for (int i = 0; i < 4; ++i) w.q[i] = vld1q_s16(p + 8 * i);
  return w;
}
LADLE_INLINE void store_w(int16_t* p, W w) {
  for (int i = 0; i < 4; ++i) vst1q_s16(p + 8 * i, w.q[i]);
}
LADLE_INLINE I dot_pairs(I acc, W w, int32_t x_pair) {
  const int16x8_t x = vreinterpretq_s16_s32(vdupq_n_s32(x_pair));
  for (int i = 0; i < 4; ++i) {
    const int32x4_t p0 = vmull_s16(vget_low_s16(w.q[i]), vget_low_s16(x));
    const int32x4_t p1 = vmull_high_s16(w.q[i], x);
    acc.q[i] = vaddq_s32(acc.q[i], vpaddq_s32(p0, p1));
  }
  return acc;
}

LADLE_INLINE void round_to_int16(F a, float inv, int16_t* out) {
  for (int i = 0; i < 4; ++i) {
    const int32x4_t r = vcvtnq_s32_f32(vmulq_f32(a.q[i], vdupq_n_f32(inv)));
    vst1_s16(out + 4 * i, vqmovn_s32(r));
  }
}
#undef LADLE_NEON_EACH

// =========================================================================================
#else  // portable: plain arrays the compiler vectorizes as its target allows

struct F {
  float v[16];
};
struct I {
  int32_t v[16];
};
struct W {
  int16_t v[32];  // lane j: v[2j], v[2j + 1]
};
struct Mask {
  bool v[16];
};

#define LADLE_EACH(expr)                      \
  F r;                                        \
  for (int j = 0; j < 16; ++j) r.v[j] = expr; \
  return r

LADLE_INLINE F zero() { LADLE_EACH(0.0f); }
LADLE_INLINE F set1(float x) { LADLE_EACH(x); }
LADLE_INLINE F load(const float* p) { LADLE_EACH(p[j]); }
LADLE_INLINE F load(const Half* p) { LADLE_EACH(half_to_float(p[j])); }
LADLE_INLINE F load(const BFloat16* p) { LADLE_EACH(bf16_to_float(p[j])); }
LADLE_INLINE Mask first_lanes(int64_t n) {
  Mask m;
  for (int j = 0; j < 16; ++j) m.v[j] = j < n;
  return m;
}
LADLE_INLINE F load_first(const float* p, int64_t n) { LADLE_EACH(j < n ? p[j] : 0.0f); }
LADLE_INLINE void store(float* p, F a) { std::memcpy(p, a.v, sizeof(a.v)); }
LADLE_INLINE void store_first(float* p, F a, int64_t n) {
  std::memcpy(p, a.v, (n < 16 ? n : 16) * sizeof(float));
}
LADLE_INLINE void store(Half* p, F a) {
  for (int j = 0; j < 16; ++j) p[j] = float_to_half(a.v[j]);
}
LADLE_INLINE F add(F a, F b) { LADLE_EACH(a.v[j] + b.v[j]); }
LADLE_INLINE F sub(F a, F b) { LADLE_EACH(a.v[j] - b.v[j]); }
LADLE_INLINE F mul(F a, F b) { LADLE_EACH(a.v[j] * b.v[j]); }
LADLE_INLINE F div(F a, F b) { LADLE_EACH(a.v[j] / b.v[j]); }
// as maxps/minps: the second operand when either is NaN
LADLE_INLINE F max(F a, F b) { LADLE_EACH(a.v[j] > b.v[j] ? a.v[j] : b.v[j]); }
LADLE_INLINE F min(F a, F b) { LADLE_EACH(a.v[j] < b.v[j] ? a.v[j] : b.v[j]); }
LADLE_INLINE F abs(F a) { LADLE_EACH(std::fabs(a.v[j])); }
LADLE_INLINE F fmadd(F a, F b, F c) { LADLE_EACH(simd::fmadd(a.v[j], b.v[j], c.v[j])); }
LADLE_INLINE F fnmadd(F a, F b, F c) { LADLE_EACH(simd::fmadd(-a.v[j], b.v[j], c.v[j])); }
LADLE_INLINE F round_even(F a) { LADLE_EACH(std::nearbyint(a.v[j])); }
LADLE_INLINE F select(Mask m, F if_true, F if_false) {
  LADLE_EACH(m.v[j] ? if_true.v[j] : if_false.v[j]);
}
LADLE_INLINE Mask lanes_above(const int32_t* counts, int32_t i) {
  Mask m;
  for (int j = 0; j < 16; ++j) m.v[j] = counts[j] > i;
  return m;
}
LADLE_INLINE Mask lanes_at_most(const int32_t* starts, int32_t i) {
  Mask m;
  for (int j = 0; j < 16; ++j) m.v[j] = starts[j] <= i;
  return m;
}
LADLE_INLINE Mask both(Mask a, Mask b) {
  Mask m;
  for (int j = 0; j < 16; ++j) m.v[j] = a.v[j] && b.v[j];
  return m;
}
LADLE_INLINE float pow2(int32_t k) { return from_bits(uint32_t(k + 127) << 23); }
LADLE_INLINE F scale_pow2(F p, F kf) {
  F r;
  for (int j = 0; j < 16; ++j) {
    const int32_t k = int32_t(kf.v[j]), k1 = k >> 1;
    r.v[j] = p.v[j] * pow2(k1) * pow2(k - k1);
  }
  return r;
}
LADLE_INLINE void store_lanes(float* p, F a) { store(p, a); }

LADLE_INLINE float reduce_add(F a) {
  float s[8];
  for (int j = 0; j < 8; ++j) s[j] = a.v[j] + a.v[j + 8];
  for (int j = 0; j < 4; ++j) s[j] += s[j + 4];
  s[0] += s[2];
  s[1] += s[3];
  return s[0] + s[1];
}
LADLE_INLINE float reduce_max(F a) {
  float m = a.v[0];
  for (int j = 1; j < 16; ++j) m = a.v[j] > m ? a.v[j] : m;
  return m;
}

LADLE_INLINE I izero() {
  I r;
  for (int j = 0; j < 16; ++j) r.v[j] = 0;
  return r;
}
LADLE_INLINE F to_float(I a) { LADLE_EACH(float(a.v[j])); }

LADLE_INLINE W widen_nibbles(const uint8_t* pair) {  // the layout: AVX-512's widen_nibbles
  W w;
  for (int i = 0; i < 16; ++i) {
    w.v[i] = int16_t(pair[i] & 15);
    w.v[16 + i] = int16_t(pair[i] >> 4);
  }
  return w;
}
LADLE_INLINE W widen_bytes(const uint8_t* pair) {
  W w;
  for (int j = 0; j < 32; ++j) w.v[j] = int16_t(int8_t(pair[j]));
  return w;
}
LADLE_INLINE W widen_sixes(const uint8_t* pair) {  // the layout: AVX-512's widen_sixes
  W w = widen_nibbles(pair);
  for (int i = 0; i < 32; ++i) {
    w.v[i] = int16_t((w.v[i] | (((pair[16 + i % 8] >> (2 * (i / 8))) & 3) << 4)) - 32);
  }
  return w;
}
LADLE_INLINE W load_w(const int16_t* p) {
  W w;
  std::memcpy(w.v, p, sizeof(w.v));
  return w;
}
LADLE_INLINE void store_w(int16_t* p, W w) { std::memcpy(p, w.v, sizeof(w.v)); }
LADLE_INLINE I dot_pairs(I acc, W w, int32_t x_pair) {
  const int32_t x0 = int16_t(uint32_t(x_pair) & 0xFFFF), x1 = int16_t(uint32_t(x_pair) >> 16);
  for (int j = 0; j < 16; ++j) acc.v[j] += int32_t(w.v[2 * j]) * x0 + int32_t(w.v[2 * j + 1]) * x1;
  return acc;
}

LADLE_INLINE void round_to_int16(F a, float inv, int16_t* out) {
  for (int j = 0; j < 16; ++j) out[j] = int16_t(std::nearbyint(a.v[j] * inv));
}
#undef LADLE_EACH

#endif
// =========================================================================================

// The elements of any cached row type, 16 at a time, zeros past n.
template <class T>
LADLE_INLINE F load_first(const T* p, int64_t n) {
  if (n >= 16) return load(p);
  alignas(64) T tail[16] = {};
  std::memcpy(tail, p, n * sizeof(T));
  return load(tail);
}

// exp over 16 lanes: Cephes' expf polynomial, inputs clamped to [-104, 88] (exp is 0 below
// and finite above). A scalar expf per element costs as much as the dot products around it.
LADLE_INLINE F exp(F x) {
  const F v = min(max(x, set1(-104.0f)), set1(88.0f));
  const F k = round_even(mul(v, set1(1.44269504088896341f)));
  F r = fnmadd(k, set1(0.693359375f), v);  // ln 2, in two parts
  r = fnmadd(k, set1(-2.12194440e-4f), r);
  F p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale_pow2(p, k);  // p * 2^k
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at both ends, within 1e-7 absolute.
LADLE_INLINE F tanh(F x) {
  const F one = set1(1.0f);
  return sub(one, div(set1(2.0f), add(exp(add(x, x)), one)));
}

}  // namespace simd
}  // namespace ladle_kernels
