// Tests only: another CPU's intrinsics on this one, from SIMDe (Debian's libsimde-dev).
//
// `build.py`'s emulated builds (`emulated_isas`) compile the AVX-512 and NEON paths of
// simd.h on an AVX2 machine with -DLADLE_EMULATED, so that the test suite checks those
// paths lane for lane against the native ones where no such CPU is at hand. The few
// intrinsics SIMDe 0.7.4 lacks are written here from their definitions in Intel's and Arm's
// references, lane by lane; they are never part of a build that users run.
#pragma once

#include <cmath>
#include <cstdint>

#define SIMDE_ENABLE_NATIVE_ALIASES
#if LADLE_SIMD_NEON
#include <simde/arm/neon.h>

LADLE_EMULATED_INLINE float32x4_t ladle_emu_lanes(float32x4_t a, float32x4_t b, float32x4_t c,
                                                   float (*op)(float, float, float)) {
  float x[4], y[4], z[4];
  vst1q_f32(x, a);
  vst1q_f32(y, b);
  vst1q_f32(z, c);
  for (int i = 0; i < 4; ++i) x[i] = op(x[i], y[i], z[i]);
  return vld1q_f32(x);
}
// FDIV, FMLS (c - a * b, rounded once), FCVTNS (nearest, ties to even; in range here)
#define vdivq_f32(a, b) \
  ladle_emu_lanes(a, b, b, [](float x, float y, float) { return x / y; })
#define vfmsq_f32(c, a, b) \
  ladle_emu_lanes(c, a, b, [](float z, float x, float y) { return std::fma(-x, y, z); })
LADLE_EMULATED_INLINE int32x4_t vcvtnq_s32_f32(float32x4_t a) {
  float x[4];
  int32_t r[4];
  vst1q_f32(x, a);
  for (int i = 0; i < 4; ++i) r[i] = int32_t(std::nearbyint(x[i]));
  return vld1q_s32(r);
}
#else
#include <simde/x86/avx2.h>
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>

// SIMDe 0.7.4 aliases this name to a four-argument function (its mask_madd's signature).
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
// The horizontal maximum of 16 lanes (a sequence of instructions, not one).
#define _mm512_reduce_max_ps(a) ladle_emu_reduce_max_ps(a)
LADLE_EMULATED_INLINE float ladle_emu_reduce_max_ps(__m512 a) {
  float x[16];
  _mm512_storeu_ps(x, a);
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
// VCVTDQ2PS: 16 int32 lanes to float, rounded to nearest even.
#define _mm512_cvtepi32_ps(a) ladle_emu_cvtepi32_ps(a)
LADLE_EMULATED_INLINE __m512 ladle_emu_cvtepi32_ps(__m512i a) {
  int32_t x[16];
  float r[16];
  _mm512_storeu_si512(x, a);
  for (int i = 0; i < 16; ++i) r[i] = float(x[i]);
  return _mm512_loadu_ps(r);
}
// VCVTPS2DQ with a rounding override: here always to nearest, ties to even.
#define _mm512_cvt_roundps_epi32(a, rounding) ladle_emu_cvt_roundps_epi32(a)
LADLE_EMULATED_INLINE __m512i ladle_emu_cvt_roundps_epi32(__m512 a) {
  float x[16];
  int32_t r[16];
  _mm512_storeu_ps(x, a);
  for (int i = 0; i < 16; ++i) r[i] = int32_t(std::nearbyint(x[i]));
  return _mm512_loadu_si512(r);
}
// VPDPWSSD (AVX-VNNI): vpmaddwd's pair sums added to the accumulator, without saturation.
#define _mm256_dpwssd_avx_epi32(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
// VSHUFF32X4: 128-bit lanes 0-1 from a, 2-3 from b, each picked by two bits of imm.
#define _mm512_shuffle_f32x4(a, b, imm) ladle_emu_shuffle_f32x4(a, b, imm)
LADLE_EMULATED_INLINE __m512 ladle_emu_shuffle_f32x4(__m512 a, __m512 b, int imm) {
  float x[16], y[16], r[16];
  _mm512_storeu_ps(x, a);
  _mm512_storeu_ps(y, b);
  for (int lane = 0; lane < 4; ++lane) {
    const float* from = lane < 2 ? x : y;
    const int pick = (imm >> (2 * lane)) & 3;
    for (int i = 0; i < 4; ++i) r[4 * lane + i] = from[4 * pick + i];
  }
  return _mm512_loadu_ps(r);
}
// VCVTPS2PH / VCVTPH2PS on 16 lanes: the two 8-lane F16C conversions side by side.
#define _mm512_cvtps_ph(a, rounding) ladle_emu_cvtps_ph(a)
LADLE_EMULATED_INLINE __m256i ladle_emu_cvtps_ph(__m512 a) {
  float x[16];
  uint16_t r[16];
  _mm512_storeu_ps(x, a);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r),
                   _mm256_cvtps_ph(_mm256_loadu_ps(x), _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r + 8),
                   _mm256_cvtps_ph(_mm256_loadu_ps(x + 8), _MM_FROUND_TO_NEAREST_INT));
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
}
#define _mm512_cvtph_ps(a) ladle_emu_cvtph_ps(a)
LADLE_EMULATED_INLINE __m512 ladle_emu_cvtph_ps(__m256i a) {
  uint16_t h[16];
  float r[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), a);
  _mm256_storeu_ps(r, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))));
  _mm256_storeu_ps(r + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8))));
  return _mm512_loadu_ps(r);
}
// VMOVUPS with a zero mask: unselected lanes are 0 and their memory is not read.
#define _mm512_maskz_loadu_ps(mask, p) ladle_emu_maskz_loadu_ps(mask, p)
LADLE_EMULATED_INLINE __m512 ladle_emu_maskz_loadu_ps(__mmask16 mask, const void* p) {
  const float* from = static_cast<const float*>(p);
  float r[16];
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? from[i] : 0.0f;
  return _mm512_loadu_ps(r);
}
// VPMOVZXWD: 16 uint16 lanes widened to int32.
#define _mm512_cvtepu16_epi32(a) ladle_emu_cvtepu16_epi32(a)
LADLE_EMULATED_INLINE __m512i ladle_emu_cvtepu16_epi32(__m256i a) {
  uint16_t h[16];
  int32_t r[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), a);
  for (int i = 0; i < 16; ++i) r[i] = h[i];
  return _mm512_loadu_si512(r);
}
// VPMOVZXBW: 32 uint8 lanes widened to int16.
#define _mm512_cvtepu8_epi16(a) ladle_emu_cvtepu8_epi16(a)
LADLE_EMULATED_INLINE __m512i ladle_emu_cvtepu8_epi16(__m256i a) {
  uint8_t b[32];
  int16_t r[32];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b), a);
  for (int i = 0; i < 32; ++i) r[i] = b[i];
  return _mm512_loadu_si512(r);
}
// VMOVUPS with a merge mask: only the selected lanes are written.
#define _mm512_mask_storeu_ps(p, mask, a) ladle_emu_mask_storeu_ps(p, mask, a)
LADLE_EMULATED_INLINE void ladle_emu_mask_storeu_ps(void* p, __mmask16 mask, __m512 a) {
  float x[16];
  _mm512_storeu_ps(x, a);
  float* to = static_cast<float*>(p);
  for (int i = 0; i < 16; ++i) {
    if ((mask >> i) & 1) to[i] = x[i];
  }
}
#endif
