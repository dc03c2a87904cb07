// One span of attention for a few query vectors, and the merge of a vector's spans
// (attention_rows.h). The cached keys and values are float32 or float16 (the engine's KV cache
// keeps float16: half the memory, and half the bytes each step reads). Float16 rows are
// widened to float32 in registers as they are loaded; the scores, the softmax and the sums are
// float32 either way.
//
// Up to kLanes query vectors are scored at once: score j of a key lands in lane j of one
// vector, so the softmax runs on all of them with vector instructions, each lane summing its
// own vector's terms in position order. A vector's sums are ordered the same way whatever
// other vectors share its block.

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention_rows.h"
#include "simd.h"

namespace ladle_kernels {

namespace {

using namespace simd;

constexpr int kValueBlock = 8;  // query vectors whose value sums share registers
// Rows ahead that a span's keys and values are prefetched: a decode step reads each layer's
// cache from DRAM (the weights between two steps evict it), a row at a time.
constexpr int64_t kPrefetchRows = 8;

// A head's whole row, every cache line of it (128 bytes for 64 halves, 512 for 256 floats).
template <class T>
LADLE_INLINE void prefetch_row(const T* row, int64_t length) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < length * int64_t(sizeof(T)); at += 64) __builtin_prefetch(bytes + at);
}

// out[(c * nb + j) * 16 + l] = dim 16 c + l of q[j] ([nb, D]), zeros past D: score_keys'
// layout, in which one pointer reaches every vector's chunk.
void chunk_queries(const float* q, int64_t nb, int64_t D, float* out) {
  for (int64_t j = 0; j < nb; ++j) {
    for (int64_t d = 0; d < D; d += 16) {
      store(out + (d / 16 * nb + j) * 16, load_first(q + j * D + d, D - d));
    }
  }
}

// Lane j = reduce_add(a[j]) for j < W, bit for bit.
template <int W>
LADLE_INLINE F reduce_lanes(const F* a) {
#if LADLE_SIMD_AVX512
  // reduce_add's steps (l and l + 8, l + 4, l + 2, l + 1), each for several vectors at once
  // (two, then four, then eight per register); the last permute puts vector j's sum in lane j
  static_assert(W == 2 || W == 4 || W == 8 || W == 16);
  __m512 x[W / 2];  // 128-bit lanes: [a[2k] l, a[2k] l + 4, a[2k + 1] l, a[2k + 1] l + 4]
  for (int k = 0; k < W / 2; ++k) {
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k].v, a[2 * k + 1].v, 0x44),
                         _mm512_shuffle_f32x4(a[2 * k].v, a[2 * k + 1].v, 0xEE));
  }
  constexpr int NY = W / 4 > 0 ? W / 4 : 1;
  __m512 y[NY];  // 128-bit lane t: vector 4m + t's four partial sums
  for (int m = 0; m < NY; ++m) {
    const __m512 c = x[2 * m], d = x[std::min(2 * m + 1, W / 2 - 1)];
    y[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
  }
  constexpr int NZ = NY / 2 > 0 ? NY / 2 : 1;
  __m512 z[NZ];  // two partial sums of two vectors per 128-bit lane
  for (int n = 0; n < NZ; ++n) {
    const __m512 e = y[2 * n], f = y[std::min(2 * n + 1, NY - 1)];
    z[n] = _mm512_add_ps(_mm512_shuffle_ps(e, f, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(e, f, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 g = z[0], h = z[std::min(1, NZ - 1)];
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(g, h, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(g, h, _MM_SHUFFLE(3, 1, 3, 1)));
  __m512i from;  // where vector j's sum ended up
  if constexpr (W == 16) {
    from = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  } else if constexpr (W == 8) {
    from = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    from = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  }
  return {_mm512_permutexvar_ps(from, w)};
#elif LADLE_SIMD_AVX2
  // per vector: (l, l + 8) and (l, l + 4) within it; then (l, l + 2) and (l, l + 1) for four
  // vectors at once, shuffled so that each lane ends with one vector's sum
  __m128 s4[16];
  for (int j = 0; j < W; ++j) {
    const __m256 s8 = _mm256_add_ps(a[j].lo, a[j].hi);
    s4[j] = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  }
  __m128 sums[4];
  for (int g = 0; g < W / 4 || g == 0; ++g) {
    const __m128 p = s4[4 * g], q = s4[std::min(4 * g + 1, W - 1)];
    const __m128 r = s4[std::min(4 * g + 2, W - 1)], t = s4[std::min(4 * g + 3, W - 1)];
    const __m128 pq = _mm_add_ps(_mm_shuffle_ps(p, q, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm_shuffle_ps(p, q, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m128 rt = _mm_add_ps(_mm_shuffle_ps(r, t, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm_shuffle_ps(r, t, _MM_SHUFFLE(3, 2, 3, 2)));
    sums[g] = _mm_add_ps(_mm_shuffle_ps(pq, rt, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm_shuffle_ps(pq, rt, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m128 zero4 = _mm_setzero_ps();
  return {_mm256_set_m128(W > 4 ? sums[1] : zero4, sums[0]),
          W > 8 ? _mm256_set_m128(sums[3], sums[2]) : _mm256_setzero_ps()};
#else
  alignas(64) float sums[16] = {};
  for (int j = 0; j < W; ++j) sums[j] = reduce_add(a[j]);
  return load(sums);
#endif
}

// scores[i * kLanes + j] = q[j] . keys[i] for NB query vectors (chunked by chunk_queries) and
// the first n keys.
template <int NB, class T>
void score_keys(const float* q, int64_t D, const T* const* keys, int64_t n, float* scores) {
  constexpr int W = NB <= 2 ? 2 : NB <= 4 ? 4 : NB <= 8 ? 8 : 16;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kPrefetchRows < n) prefetch_row(keys[i + kPrefetchRows], D);
    F acc[W];
    for (int j = 0; j < W; ++j) acc[j] = zero();
    const float* qc = q;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16, qc += NB * 16) {  // the tail apart: accumulators in registers
      const F k = load(keys[i] + d);
      for (int j = 0; j < NB; ++j) acc[j] = fmadd(load(qc + j * 16), k, acc[j]);
    }
    if (d < D) {
      const F k = load_first(keys[i] + d, D - d);
      for (int j = 0; j < NB; ++j) acc[j] = fmadd(load(qc + j * 16), k, acc[j]);
    }
    store(scores + i * kLanes, reduce_lanes<W>(acc));
  }
}

// Softmax numerators in place: lane j over its keys starts[j] .. counts[j] - 1, where it
// leaves exp(score - max), and zeros elsewhere; its max (-inf when it has no key) and its sum
// (in key order) go to max[j] and sum[j] for j < nb.
void softmax_lanes(float* scores, const int32_t* starts, const int32_t* counts, int64_t nb,
                   int64_t n, float softcap, float* max_out, float* sum_out) {
  const F neg_inf = set1(-INFINITY);
  F m = neg_inf;
  for (int64_t i = 0; i < n; ++i) {
    F s = load(scores + i * kLanes);
    if (softcap > 0.0f) {
      s = mul(tanh(div(s, set1(softcap))), set1(softcap));
      store(scores + i * kLanes, s);
    }
    const Mask seen = both(lanes_above(counts, int32_t(i)), lanes_at_most(starts, int32_t(i)));
    m = select(seen, max(m, s), m);
  }
  F total = zero();
  for (int64_t i = 0; i < n; ++i) {
    const Mask seen = both(lanes_above(counts, int32_t(i)), lanes_at_most(starts, int32_t(i)));
    const F e = select(seen, exp(sub(load(scores + i * kLanes), m)), zero());
    total = add(total, e);  // adds 0 where unseen: the same bits as adding nothing
    store(scores + i * kLanes, e);
  }
  alignas(64) float lanes[16];
  store(lanes, m);
  for (int64_t j = 0; j < nb; ++j) max_out[j] = lanes[j];
  store(lanes, total);
  for (int64_t j = 0; j < nb; ++j) sum_out[j] = lanes[j];
}

// acc_out[j * Dv + d] = sum over i < counts[j] of p[i * kLanes + j] * values[i][d] for NB
// query vectors: each vector sums its even positions in one chain and its odd ones in another
// (an FMA's latency is four of its issues), then adds the two. The pairs of positions that
// all NB vectors count are summed for all of them at once (each value chunk loaded once), the
// rest vector by vector.
template <int NB, class T>
void accumulate_rows(const float* p, const T* const* values, const int32_t* counts, int64_t Dv,
                     float* acc_out) {
  const int64_t common = *std::min_element(counts, counts + NB) & ~int64_t(1);
  for (int64_t d = 0; d < Dv; d += 16) {
    const int64_t width = Dv - d;
    F even[NB], odd[NB];
    for (int j = 0; j < NB; ++j) even[j] = odd[j] = zero();
    for (int64_t i = 0; i < common; i += 2) {
      if (d == 0 && i + kPrefetchRows + 1 < common) {
        prefetch_row(values[i + kPrefetchRows], Dv);
        prefetch_row(values[i + kPrefetchRows + 1], Dv);
      }
      const F v0 = load_first(values[i] + d, width);
      const F v1 = load_first(values[i + 1] + d, width);
      for (int j = 0; j < NB; ++j) {
        even[j] = fmadd(set1(p[i * kLanes + j]), v0, even[j]);
        odd[j] = fmadd(set1(p[(i + 1) * kLanes + j]), v1, odd[j]);
      }
    }
    F chains[2 * NB];  // copied out once: indexed at run time below, they would live
    for (int j = 0; j < NB; ++j) {  // in memory during the loop above
      chains[2 * j] = even[j];
      chains[2 * j + 1] = odd[j];
    }
    for (int j = 0; j < NB; ++j) {
      F e = chains[2 * j], o = chains[2 * j + 1];
      int64_t i = common;
      for (; i + 2 <= counts[j]; i += 2) {
        e = fmadd(set1(p[i * kLanes + j]), load_first(values[i] + d, width), e);
        o = fmadd(set1(p[(i + 1) * kLanes + j]), load_first(values[i + 1] + d, width), o);
      }
      if (i < counts[j]) e = fmadd(set1(p[i * kLanes + j]), load_first(values[i] + d, width), e);
      store_first(acc_out + j * Dv + d, add(e, o), width);
    }
  }
}

void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const F a = set1(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    store_first(y + i, fmadd(a, load_first(x + i, n - i), load_first(y + i, n - i)), n - i);
  }
}

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
                 const int32_t* starts, const int32_t* counts, int64_t num_vectors,
                 const float* q_scaled, float softcap, SpanScratch<T>& scratch,
                 const Partial& out) {
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
    alignas(64) int32_t lane_starts[kLanes] = {}, lane_counts[kLanes] = {};
    std::copy(starts + first, starts + first + nb, lane_starts);
    std::copy(counts + first, counts + first + nb, lane_counts);
    chunk_queries(q_scaled + first * D, nb, D, scratch.q_chunks.data());
    // every vector is scored against all n keys: those outside its range get a zero weight
    with_block<kLanes>(nb, [&](auto NB) {
      score_keys<NB(), T>(scratch.q_chunks.data(), D, keys, n, scratch.scores.data());
    });
    softmax_lanes(scratch.scores.data(), lane_starts, lane_counts, nb, n, softcap,
                  out.max + first, out.sum + first);
    for (int64_t j = 0; j < nb; j += kValueBlock) {
      with_block<kValueBlock>(std::min<int64_t>(kValueBlock, nb - j), [&](auto NB) {
        accumulate_rows<NB(), T>(scratch.scores.data() + j, values, lane_counts + j, Dv,
                                 out.acc + (first + j) * Dv);
      });
    }
  }
}

template void attend_span<float>(const KVPools<float>&, int64_t, int64_t, int64_t,
                                 const int32_t*, const int32_t*, int64_t, const float*, float,
                                 SpanScratch<float>&, const Partial&);
template void attend_span<Half>(const KVPools<Half>&, int64_t, int64_t, int64_t, const int32_t*,
                                const int32_t*, int64_t, const float*, float,
                                SpanScratch<Half>&, const Partial&);

// Each span's sum and accumulator count exp(max_span - max_all) times as much; a span where
// the vector saw no position (max -inf, outside its window) adds nothing.
void merge_spans(const SpanPartials& parts, int64_t first, int64_t last, int64_t j, float* out) {
  const int64_t Dv = parts.Dv;
  float m = -INFINITY;
  for (int64_t s = first; s < last; ++s) m = std::max(m, *parts.at(s, j).max);
  std::fill(out, out + Dv, 0.0f);
  float total = 0.0f;
  for (int64_t s = first; s < last; ++s) {
    const Partial p = parts.at(s, j);
    if (*p.max == -INFINITY) continue;
    const float weight = std::exp(*p.max - m);
    total += weight * *p.sum;
    axpy(weight, p.acc, out, Dv);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < Dv; ++d) out[d] *= inv;
}

}  // namespace ladle_kernels
