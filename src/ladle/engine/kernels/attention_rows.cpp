// One span of attention for a few query vectors, and the merge of a vector's spans
// (attention_rows.h). The cached keys and values are float32 or float16 (the engine's KV cache
// keeps float16: half the memory, and half the bytes each step reads). Float16 rows are
// widened to float32 in registers as they are loaded; the scores, the softmax and the sums are
// float32 either way.
//
// Up to kLanes query vectors are scored at once: score j of a key lands in lane j of one
// register, so the softmax runs on all of them with vector instructions, each lane summing
// its own vector's terms in position order. A vector's sums are ordered the same way whatever
// other vectors share its block.

#include "attention_rows.h"
#include "vec_exp.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace ladle_kernels {

namespace {

constexpr int kValueBlock = 8;  // query vectors whose value sums share registers

#ifdef __AVX512F__

__mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// 16 elements of a cached row, of either type, as floats.
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }

__m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The elements that m (a tail_mask) selects, as floats, zeros past them.
__m512 load_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

__m512 load_masked(const c10::Half* p, __mmask16 m) {
  if (m == 0xFFFF) return load16(p);
  alignas(64) float tail[16] = {};  // rare (a head dim no multiple of 16): widen one by one
  for (int j = 0; j < __builtin_popcount(m); ++j) tail[j] = float(p[j]);
  return _mm512_load_ps(tail);
}

// Lane j = _mm512_reduce_add_ps(a[j]) for j < W (2, 4, 8 or 16), bit for bit: reduce_add sums
// lanes l and l + 8, then l and l + 4, l and l + 2, l and l + 1; each step here does one of
// those for several registers at once (two, then four, then eight per register), and the
// last permute puts register j's sum in lane j.
template <int W>
[[gnu::always_inline]] inline __m512 reduce_lanes(const __m512* a) {
  static_assert(W == 2 || W == 4 || W == 8 || W == 16);
  __m512 x[W / 2];  // 128-bit lanes: [a[2k] l, a[2k] l + 4, a[2k + 1] l, a[2k + 1] l + 4]
  for (int k = 0; k < W / 2; ++k) {
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
  }
  constexpr int NY = W / 4 > 0 ? W / 4 : 1;
  __m512 y[NY];  // 128-bit lane t: register 4m + t's four partial sums
  for (int m = 0; m < NY; ++m) {
    const __m512 c = x[2 * m], d = x[std::min(2 * m + 1, W / 2 - 1)];
    y[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
  }
  constexpr int NZ = NY / 2 > 0 ? NY / 2 : 1;
  __m512 z[NZ];  // two partial sums of two registers per 128-bit lane
  for (int n = 0; n < NZ; ++n) {
    const __m512 e = y[2 * n], f = y[std::min(2 * n + 1, NY - 1)];
    z[n] = _mm512_add_ps(_mm512_shuffle_ps(e, f, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(e, f, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 g = z[0], h = z[std::min(1, NZ - 1)];
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(g, h, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(g, h, _MM_SHUFFLE(3, 1, 3, 1)));
  // where register j's sum ended up
  __m512i from;
  if constexpr (W == 16) {
    from = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  } else if constexpr (W == 8) {
    from = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    from = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  }
  return _mm512_permutexvar_ps(from, w);
}

// out[(c * nb + j) * 16 + l] = dim 16 c + l of q[j] ([nb, D]), zeros past D: score_keys'
// layout, in which one pointer reaches every vector's chunk.
void chunk_queries(const float* q, int64_t nb, int64_t D, float* out) {
  for (int64_t j = 0; j < nb; ++j) {
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 chunk = _mm512_maskz_loadu_ps(tail_mask(D - d), q + j * D + d);
      _mm512_storeu_ps(out + (d / 16 * nb + j) * 16, chunk);
    }
  }
}

// scores[i * kLanes + j] = q[j] . keys[i] for NB query vectors (chunked by chunk_queries) and
// the first n keys.
template <int NB, class T>
void score_keys(const float* q, int64_t D, const T* const* keys, int64_t n, float* scores) {
  constexpr int W = NB <= 2 ? 2 : NB <= 4 ? 4 : NB <= 8 ? 8 : 16;
  for (int64_t i = 0; i < n; ++i) {
    __m512 acc[W];
    for (int j = 0; j < W; ++j) acc[j] = _mm512_setzero_ps();
    const float* qc = q;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16, qc += NB * 16) {  // the tail apart: accumulators in registers
      const __m512 k = load16(keys[i] + d);
      for (int j = 0; j < NB; ++j) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qc + j * 16), k, acc[j]);
    }
    if (d < D) {
      const __m512 k = load_masked(keys[i] + d, tail_mask(D - d));
      for (int j = 0; j < NB; ++j) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qc + j * 16), k, acc[j]);
    }
    _mm512_storeu_ps(scores + i * kLanes, reduce_lanes<W>(acc));
  }
}

// Softmax numerators in place: lane j (j < nb) over its first counts[j] keys, where it leaves
// exp(score - max); its max and its sum (in key order) go to max[j] and sum[j].
void softmax_lanes(float* scores, const int64_t* counts, int64_t nb, float* max, float* sum) {
  alignas(64) int32_t lane_counts[kLanes] = {};
  for (int64_t j = 0; j < nb; ++j) lane_counts[j] = int32_t(counts[j]);
  const __m512i count = _mm512_load_si512(lane_counts);
  const int64_t n = *std::max_element(counts, counts + nb);
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; ++i) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(count, _mm512_set1_epi32(int32_t(i)));
    m = _mm512_mask_max_ps(m, seen, m, _mm512_loadu_ps(scores + i * kLanes));
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(count, _mm512_set1_epi32(int32_t(i)));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i * kLanes), m));
    total = _mm512_mask_add_ps(total, seen, total, e);
    _mm512_storeu_ps(scores + i * kLanes, e);
  }
  const __mmask16 used = tail_mask(nb);
  _mm512_mask_storeu_ps(max, used, m);
  _mm512_mask_storeu_ps(sum, used, total);
}

// acc_out[j * Dv + d] = sum over i < counts[j] of p[i * kLanes + j] * values[i][d] for NB
// query vectors: each vector sums its even positions in one chain and its odd ones in another
// (an FMA's latency is four of its issues), then adds the two. The pairs of positions that
// all NB vectors count are summed for all of them at once (each value chunk loaded once), the
// rest vector by vector.
template <int NB, class T>
void accumulate_rows(const float* p, const T* const* values, const int64_t* counts, int64_t Dv,
                     float* acc_out) {
  const int64_t common = *std::min_element(counts, counts + NB) & ~int64_t(1);
  for (int64_t d = 0; d < Dv; d += 16) {
    const __mmask16 m = tail_mask(Dv - d);
    __m512 even[NB], odd[NB];
    for (int j = 0; j < NB; ++j) even[j] = odd[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < common; i += 2) {
      const __m512 v0 = load_masked(values[i] + d, m);
      const __m512 v1 = load_masked(values[i + 1] + d, m);
      for (int j = 0; j < NB; ++j) {
        even[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * kLanes + j]), v0, even[j]);
        odd[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[(i + 1) * kLanes + j]), v1, odd[j]);
      }
    }
    __m512 chains[2 * NB];  // copied out once: indexed at run time below, they would live
    for (int j = 0; j < NB; ++j) {  // in memory during the loop above
      chains[2 * j] = even[j];
      chains[2 * j + 1] = odd[j];
    }
    for (int j = 0; j < NB; ++j) {
      __m512 e = chains[2 * j], o = chains[2 * j + 1];
      int64_t i = common;
      for (; i + 2 <= counts[j]; i += 2) {
        e = _mm512_fmadd_ps(_mm512_set1_ps(p[i * kLanes + j]), load_masked(values[i] + d, m), e);
        o = _mm512_fmadd_ps(_mm512_set1_ps(p[(i + 1) * kLanes + j]),
                            load_masked(values[i + 1] + d, m), o);
      }
      if (i < counts[j])
        e = _mm512_fmadd_ps(_mm512_set1_ps(p[i * kLanes + j]), load_masked(values[i] + d, m), e);
      _mm512_mask_storeu_ps(acc_out + j * Dv + d, m, _mm512_add_ps(e, o));
    }
  }
}

void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 r = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(y + i, m, r);
  }
}

#else  // portable fallback: loops the compiler vectorises on its own where it may

void chunk_queries(const float* q, int64_t nb, int64_t D, float* out) {
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t d = 0; d < (D + 15) / 16 * 16; ++d)
      out[(d / 16 * nb + j) * 16 + d % 16] = d < D ? q[j * D + d] : 0.0f;
}

template <int NB, class T>
void score_keys(const float* q, int64_t D, const T* const* keys, int64_t n, float* scores) {
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < NB; ++j) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[(d / 16 * NB + j) * 16 + d % 16] * float(keys[i][d]);
      scores[i * kLanes + j] = acc;
    }
}

void softmax_lanes(float* scores, const int64_t* counts, int64_t nb, float* max, float* sum) {
  for (int64_t j = 0; j < nb; ++j) {
    float m = -INFINITY, total = 0.0f;
    for (int64_t i = 0; i < counts[j]; ++i) m = std::max(m, scores[i * kLanes + j]);
    for (int64_t i = 0; i < counts[j]; ++i) {
      float& s = scores[i * kLanes + j];
      s = std::exp(s - m);
      total += s;
    }
    max[j] = m;
    sum[j] = total;
  }
}

template <int NB, class T>
void accumulate_rows(const float* p, const T* const* values, const int64_t* counts, int64_t Dv,
                     float* acc_out) {
  std::fill(acc_out, acc_out + NB * Dv, 0.0f);
  for (int j = 0; j < NB; ++j)
    for (int64_t i = 0; i < counts[j]; ++i)
      for (int64_t d = 0; d < Dv; ++d)
        acc_out[j * Dv + d] += p[i * kLanes + j] * float(values[i][d]);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#endif

// Calls fn(std::integral_constant<int, NB>) for a runtime block of 1 <= nb <= Max vectors.
template <int Max, int NB = 1, class Fn>
void with_block(int64_t nb, Fn&& fn) {
  if constexpr (NB < Max) {
    if (nb == NB) return fn(std::integral_constant<int, NB>());
    return with_block<Max, NB + 1>(nb, fn);
  } else {
    return fn(std::integral_constant<int, Max>());
  }
}

}  // namespace

template <class T>
void attend_span(const KVPools<T>& pools, int64_t b, int64_t kv_head, int64_t begin,
                 const int64_t* counts, int64_t num_vectors, const float* q_scaled,
                 SpanScratch<T>& scratch, const Partial& out) {
  const int64_t D = pools.D, Dv = pools.Dv;
  const int64_t n = *std::max_element(counts, counts + num_vectors);
  const T** keys = scratch.rows.data();
  const T** values = keys + kSpan;
  for (int64_t i = 0; i < n;) {  // slots run on to the end of each block
    const int64_t slot = pools.slot(b, begin + i);
    const int64_t run = std::min(n - i, pools.block_size - (begin + i) % pools.block_size);
    for (int64_t r = 0; r < run; ++r, ++i) {
      keys[i] = pools.k + kv_head * pools.k_head_stride + (slot + r) * pools.k_row_stride;
      values[i] = pools.v + kv_head * pools.v_head_stride + (slot + r) * pools.v_row_stride;
    }
  }
  for (int64_t first = 0; first < num_vectors; first += kLanes) {
    const int64_t nb = std::min(kLanes, num_vectors - first);
    const int64_t* block_counts = counts + first;
    chunk_queries(q_scaled + first * D, nb, D, scratch.q_chunks.data());
    // every vector is scored against all n keys: the few past its count are not read after
    with_block<kLanes>(nb, [&](auto NB) {
      score_keys<NB(), T>(scratch.q_chunks.data(), D, keys, n, scratch.scores.data());
    });
    softmax_lanes(scratch.scores.data(), block_counts, nb, out.max + first, out.sum + first);
    for (int64_t j = 0; j < nb; j += kValueBlock) {
      with_block<kValueBlock>(std::min<int64_t>(kValueBlock, nb - j), [&](auto NB) {
        accumulate_rows<NB(), T>(scratch.scores.data() + j, values, block_counts + j, Dv,
                                 out.acc + (first + j) * Dv);
      });
    }
  }
}

template void attend_span<float>(const KVPools<float>&, int64_t, int64_t, int64_t,
                                 const int64_t*, int64_t, const float*,
                                 SpanScratch<float>&, const Partial&);
template void attend_span<c10::Half>(const KVPools<c10::Half>&, int64_t, int64_t, int64_t,
                                     const int64_t*, int64_t, const float*,
                                     SpanScratch<c10::Half>&, const Partial&);

// Each span's sum and accumulator count exp(max_span - max_all) times as much.
void merge_spans(const SpanPartials& parts, int64_t num_spans, int64_t j, float* out) {
  const int64_t Dv = parts.Dv;
  float m = -INFINITY;
  for (int64_t s = 0; s < num_spans; ++s) m = std::max(m, *parts.at(s, j).max);
  std::fill(out, out + Dv, 0.0f);
  float total = 0.0f;
  for (int64_t s = 0; s < num_spans; ++s) {
    const Partial p = parts.at(s, j);
    const float weight = std::exp(*p.max - m);
    total += weight * *p.sum;
    axpy(weight, p.acc, out, Dv);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < Dv; ++d) out[d] *= inv;
}

}  // namespace ladle_kernels
