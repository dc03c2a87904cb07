// exp over 16 floats at once, for the kernels' softmax and SiLU (AVX-512 builds only).
#pragma once

#ifdef __AVX512F__
#include <immintrin.h>

namespace ladle_kernels {

// Cephes' expf polynomial: glibc's vector expf is declared only under -ffast-math, and a
// scalar expf per element costs as much as the dot products around it. Inputs are clamped to
// [-104, 88], where exp is 0 below and finite above.
[[gnu::always_inline]] inline __m512 exp16(__m512 x) {
  const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const __m512 v = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
  const __m512 k =
      _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);  // ln 2, in two parts
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(c[0]);
  for (int j = 1; j < 6; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);  // p * 2^k
}

}  // namespace ladle_kernels

#endif
