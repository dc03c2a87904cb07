// Decode-step attention: one query token per sequence against all of its cached keys and
// values (or the last `window` of them), and the write of new keys and values into the pools.
//
// Flash-decoding on a CPU: the work is cut into (sequence, kv head, span of kSpan positions)
// items, so two threads are both busy even with three kv heads and one sequence. An item
// attends all the query heads of its kv head at once (each key and value row comes from memory
// once), leaving an unnormalised partial result with its max and sum; a second pass merges the
// spans of each head by rescaling. The arithmetic is attention_rows.h's, which prefill
// attention shares: spans have a fixed size, so the result depends neither on the number of
// threads nor on which kernel computed a row.

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"
#include "simd.h"
#include "thread_pool.h"

namespace ladle_kernels {

namespace {

void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

// Rounded to float16 as torch's .half() rounds (to nearest even).
void store_row(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) simd::store(dst + i, simd::load(src + i));
  for (; i < n; ++i) dst[i] = simd::float_to_half(src[i]);
}

template <class T>
void attend(const PagedStep& step, const float* q, int64_t q_stride, int64_t H, float scale,
            const ScoreRule& rule, float* out) {
  const KVPools<T> pools = step.pools<T>();
  const int64_t KVH = step.kv_heads, G = H / KVH, D = step.D, Dv = step.Dv;
  std::vector<int64_t> span_seq, span_begin;  // every (sequence, span), sequences in order
  std::vector<int64_t> first_span(step.B + 1);
  int64_t work = 0;
  for (int64_t b = 0; b < step.B; ++b) {
    first_span[b] = int64_t(span_seq.size());
    const int64_t last = step.lengths[b] - 1, first = rule.first_visible(last);
    for (int64_t p = first / kSpan * kSpan; p <= last; p += kSpan) {
      span_seq.push_back(b);
      span_begin.push_back(p);
    }
    work += (last + 1 - first) * H * (D + Dv);
  }
  const int64_t num_spans = int64_t(span_seq.size());
  first_span[step.B] = num_spans;
  // item s * KVH + kv_head: span s of kv head kv_head, one partial for its G query heads
  const int64_t num_items = num_spans * KVH, item_floats = SpanPartials::floats(G, Dv);
  std::unique_ptr<float[]> partials(new float[num_items * item_floats]);
  auto partials_of = [&](int64_t first_item) {
    return SpanPartials{partials.get() + first_item * item_floats, G, Dv, KVH * item_floats};
  };

  parallel_items(num_items, work, [&](int64_t first, int64_t last) {
    std::vector<float> q_scaled(G * D);
    std::vector<int32_t> starts(G), counts(G);
    SpanScratch<T> scratch(D);
    for (int64_t item = first; item < last; ++item) {
      const int64_t span = item / KVH, kv_head = item % KVH, b = span_seq[span];
      for (int64_t g = 0; g < G; ++g) {
        const float* qh = q + b * q_stride + (kv_head * G + g) * D;
        for (int64_t d = 0; d < D; ++d) q_scaled[g * D + d] = qh[d] * scale;
      }
      const int64_t begin = span_begin[span], length = step.lengths[b];
      const int64_t start = std::max<int64_t>(0, rule.first_visible(length - 1) - begin);
      std::fill(starts.begin(), starts.end(), int32_t(start));
      std::fill(counts.begin(), counts.end(), int32_t(std::min(kSpan, length - begin)));
      attend_span(pools, b, kv_head, begin, starts.data(), counts.data(), G, q_scaled.data(),
                  rule.softcap, scratch, partials_of(item).at(0, 0));
    }
  });

  for (int64_t b = 0; b < step.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kv_head = h / G, first = first_span[b];
      merge_spans(partials_of(first * KVH + kv_head), 0, first_span[b + 1] - first, h % G,
                  out + (b * H + h) * Dv);
    }
  }
}

}  // namespace

void store_kv_rows(const PagedStep& step, const float* k, int64_t k_row_stride, const float* v,
                   int64_t v_row_stride, const int64_t* slots, int64_t N) {
  with_cached_type(step, [&](auto tag) {
    using T = decltype(tag);
    T* pk = static_cast<T*>(step.pool_k);
    T* pv = static_cast<T*>(step.pool_v);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t h = 0; h < step.kv_heads; ++h) {
        store_row(k + i * k_row_stride + h * step.D,
                  pk + h * step.k_head_stride + slots[i] * step.k_row_stride, step.D);
        store_row(v + i * v_row_stride + h * step.Dv,
                  pv + h * step.v_head_stride + slots[i] * step.v_row_stride, step.Dv);
      }
    }
  });
}

void decode_attention(const PagedStep& step, const float* q, int64_t q_stride, int64_t H,
                      float scale, const ScoreRule& rule, float* out) {
  with_cached_type(step, [&](auto tag) {
    attend<decltype(tag)>(step, q, q_stride, H, scale, rule, out);
  });
}

}  // namespace ladle_kernels
