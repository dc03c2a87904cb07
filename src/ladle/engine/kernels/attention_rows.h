// The arithmetic of one query row's attention, shared by the decode and prefill kernels.
//
// A row at position p attends the positions of its window (all of 0..p, or the last `window`
// of them) span by span (kSpan positions each, spans starting at multiples of kSpan): each
// span leaves an unnormalised partial result with its max and sum, and the row's spans are
// merged in order. Both kernels call these functions, and each row's operations do not depend
// on the other rows computed with it, so a row gives the same bits whether it is decoded
// alone, is one of a prompt's rows, or ends a cached prefix.

#pragma once

#include <cstdint>
#include <vector>

#include "simd.h"

namespace ladle_kernels {

constexpr int64_t kSpan = 128;  // positions per span
constexpr int64_t kLanes = 16;  // query vectors scored at once, one per float32 lane

// Cached keys [KVH, slots, D] and values [KVH, slots, Dv] of type T (float or Half).
// Position p of sequence b is in slot block_tables[b][p / block_size] * block_size +
// p % block_size, or in slot p when block_tables is null (then block_size only says how many
// positions run on in consecutive slots).
template <class T>
struct KVPools {
  const T* k;
  int64_t k_head_stride, k_row_stride;
  const T* v;
  int64_t v_head_stride, v_row_stride;
  const int32_t* block_tables;  // [B, table_stride] or null
  int64_t table_stride, block_size;
  int64_t D, Dv;

  int64_t slot(int64_t b, int64_t p) const {
    if (block_tables == nullptr) return p;
    return int64_t(block_tables[b * table_stride + p / block_size]) * block_size + p % block_size;
  }
};

// What a layer's attention does besides softmax(q k * scale) v.
struct ScoreRule {
  int64_t window;  // > 0: a row at position p sees only positions p - window + 1 .. p
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)

  // The first position a row at position p sees.
  int64_t first_visible(int64_t p) const {
    return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
  }
};

// The unnormalised attention of some query vectors over one span.
struct Partial {
  float* acc;  // [vectors, Dv]: sum over the span of exp(score - max) * value
  float* max;  // [vectors]
  float* sum;  // [vectors]: sum over the span of exp(score - max)
};

// Consecutive spans' partials of `num_vectors` query vectors, one block of
// num_vectors * (Dv + 2) floats per span, `span_stride` floats apart.
struct SpanPartials {
  float* base;
  int64_t num_vectors, Dv, span_stride;

  static int64_t floats(int64_t num_vectors, int64_t Dv) { return num_vectors * (Dv + 2); }

  // Span `span`'s partial, from query vector `j` on.
  Partial at(int64_t span, int64_t j) const {
    float* block = base + span * span_stride;
    float* max = block + num_vectors * Dv;
    return Partial{block + j * Dv, max + j, max + num_vectors + j};
  }
};

// Buffers one thread reuses across calls of attend_span.
template <class T>
struct SpanScratch {
  std::vector<float> scores;  // [kSpan, kLanes]
  std::vector<float> q_chunks;  // [ceil(D / 16) * 16 * kLanes]
  std::vector<const T*> rows;  // [2 * kSpan]: the span's keys, then its values

  explicit SpanScratch(int64_t D)
      : scores(kSpan * kLanes), q_chunks((D + 15) / 16 * 16 * kLanes), rows(2 * kSpan) {}
};

// Attends query vectors j < num_vectors (q_scaled [num_vectors, D] contiguous, already times
// the softmax scale) of sequence b to kv head `kv_head`'s positions begin + starts[j] ..
// begin + counts[j] - 1 (0 <= starts[j], counts[j] <= kSpan; empty when starts[j] >=
// counts[j]), into out's vectors 0 .. num_vectors - 1.
template <class T>
void attend_span(const KVPools<T>& pools, int64_t b, int64_t kv_head, int64_t begin,
                 const int32_t* starts, const int32_t* counts, int64_t num_vectors,
                 const float* q_scaled, float softcap, SpanScratch<T>& scratch,
                 const Partial& out);

// out [Dv] = query vector j's attention: its partials over spans first .. last - 1, merged.
void merge_spans(const SpanPartials& parts, int64_t first, int64_t last, int64_t j, float* out);

}  // namespace ladle_kernels
