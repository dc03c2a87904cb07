// Decode-step attention: one query token per sequence against all of its cached keys and values.
//
// Flash-decoding on a CPU: the work is cut into (sequence, kv head, span of kSpan positions)
// items, so two threads are both busy even with three kv heads and one sequence. An item
// attends all the query heads of its kv head at once (each key and value row comes from memory
// once), leaving an unnormalised partial result with its max and sum; a second pass merges the
// spans of each head by rescaling. The arithmetic is attention_rows.h's, which prefill
// attention shares: spans have a fixed size, so the result depends neither on the number of
// threads nor on which kernel computed a row.

#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "attention_rows.h"
#include "parallel_items.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace ladle_kernels {

// Runs fn over [0, num_items) in chunks on torch's intra-op thread pool (set_num_threads), or
// on the calling thread when the call does fewer than kSerialWork multiply-adds in all: waking
// the pool costs 5-10 us.
// at::parallel_for is a header template whose parallel branch exists only when the caller is
// compiled with -fopenmp, which would tie this library to an OpenMP runtime of its own; a
// TensorIterator's for_each runs the same at::parallel_for compiled inside libtorch. The
// iterator walks a dummy byte tensor of num_items elements, and a chunk's offset into it is
// the chunk's first item.
void parallel_items(int64_t num_items, int64_t work,
                    c10::function_ref<void(int64_t, int64_t)> fn) {
  constexpr int64_t kSerialWork = 1 << 17;  // 128 positions of 9 heads of 64 dims: a tie
  if (num_items <= 1 || work < kSerialWork) {
    fn(0, num_items);
    return;
  }
  const at::Tensor items = at::empty({num_items}, at::kByte);
  const char* base = static_cast<const char*>(items.const_data_ptr());
  at::TensorIterator iter = at::TensorIteratorConfig().add_const_input(items).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t j = 0; j < size1; ++j) {
          const int64_t begin = data[0] + j * strides[1] - base;
          fn(begin, begin + size0);
        }
      },
      /*grain_size=*/1);
}

namespace {

#ifdef __AVX512F__

// dst = src rounded to float16 (to nearest even, as torch's .half()).
void store_halves(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#else

void store_halves(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#endif

// A new key or value row into a pool of either type.
void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

void store_row(const float* src, c10::Half* dst, int64_t n) { store_halves(src, dst, n); }

// Where a decode step reads: B sequences, each query [H, D] against its positions
// 0 .. lengths[b] - 1 in the pools.
template <class T>
struct Batch {
  const float* q;
  int64_t q_seq_stride, q_head_stride;
  KVPools<T> pools;
  const int64_t* lengths;  // [B]
  int64_t B, H, KVH;
  float scale;
};

// out [B, H, Dv] contiguous.
template <class T>
void attend(const Batch<T>& batch, float* out) {
  const int64_t G = batch.H / batch.KVH, D = batch.pools.D, Dv = batch.pools.Dv, KVH = batch.KVH;
  std::vector<int64_t> span_seq, span_begin;  // every (sequence, span), sequences in order
  std::vector<int64_t> first_span(batch.B + 1);
  int64_t work = 0;
  for (int64_t b = 0; b < batch.B; ++b) {
    first_span[b] = int64_t(span_seq.size());
    for (int64_t p = 0; p < batch.lengths[b]; p += kSpan) {
      span_seq.push_back(b);
      span_begin.push_back(p);
    }
    work += batch.lengths[b] * batch.H * (D + Dv);
  }
  const int64_t num_spans = int64_t(span_seq.size());
  first_span[batch.B] = num_spans;
  // item s * KVH + kv_head: span s of kv head kv_head, one partial for its G query heads
  const int64_t num_items = num_spans * KVH, item_floats = SpanPartials::floats(G, Dv);
  std::unique_ptr<float[]> partials(new float[num_items * item_floats]);
  auto partials_of = [&](int64_t first_item) {
    return SpanPartials{partials.get() + first_item * item_floats, G, Dv, KVH * item_floats};
  };

  auto run_items = [&](int64_t first, int64_t last) {
    std::vector<float> q_scaled(G * D);
    std::vector<int64_t> counts(G);
    SpanScratch<T> scratch(D);
    for (int64_t item = first; item < last; ++item) {
      const int64_t span = item / KVH, kv_head = item % KVH, b = span_seq[span];
      for (int64_t g = 0; g < G; ++g) {
        const float* q = batch.q + b * batch.q_seq_stride + (kv_head * G + g) * batch.q_head_stride;
        for (int64_t d = 0; d < D; ++d) q_scaled[g * D + d] = q[d] * batch.scale;
      }
      const int64_t begin = span_begin[span];
      std::fill(counts.begin(), counts.end(), std::min(kSpan, batch.lengths[b] - begin));
      attend_span(batch.pools, b, kv_head, begin, counts.data(), G, q_scaled.data(), scratch,
                  partials_of(item).at(0, 0));
    }
  };
  parallel_items(num_items, work, run_items);

  for (int64_t b = 0; b < batch.B; ++b) {
    for (int64_t h = 0; h < batch.H; ++h) {
      const int64_t kv_head = h / G, first = first_span[b];
      merge_spans(partials_of(first * KVH + kv_head), first_span[b + 1] - first, h % G,
                  out + (b * batch.H + h) * Dv);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            double scale) {
  const char* op = "decode_attention";
  check_rows(q, op, "q", 2);
  check_cached(keys, values, op, "keys", "values");
  const int64_t H = q.size(0), D = q.size(1), KVH = keys.size(0), L = keys.size(1);
  TORCH_CHECK(keys.size(2) == D, op, ": keys have head dim ", keys.size(2), ", q has ", D);
  TORCH_CHECK(values.size(0) == KVH && values.size(1) == L, op, ": values ", values.sizes(),
              " do not match keys ", keys.sizes());
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": q's ", H, " heads are not a multiple of keys' ",
              KVH, " kv heads");
  TORCH_CHECK(L > 0, op, ": keys hold no positions");
  const int64_t Dv = values.size(2);
  at::Tensor out = at::empty({H, Dv}, q.options());
  with_cached_type(keys, [&](auto tag) {
    using T = decltype(tag);
    const KVPools<T> pools{keys.const_data_ptr<T>(), keys.stride(0), keys.stride(1),
                           values.const_data_ptr<T>(), values.stride(0), values.stride(1),
                           nullptr, 0, L, D, Dv};  // one block: every slot follows the last
    attend(Batch<T>{q.const_data_ptr<float>(), 0, q.stride(0), pools, &L, 1, H, KVH, float(scale)},
           out.data_ptr<float>());
  });
  return out;
}

// Writes each sequence's new k, v [B, KVH, D] at its last position (lengths[b] - 1).
template <class T>
void store_new_rows(const Batch<T>& batch, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& pool_k, const at::Tensor& pool_v) {
  T* pk = pool_k.data_ptr<T>();
  T* pv = pool_v.data_ptr<T>();
  const float* nk = k.const_data_ptr<float>();
  const float* nv = v.const_data_ptr<float>();
  for (int64_t b = 0; b < batch.B; ++b) {
    const int64_t slot = batch.pools.slot(b, batch.lengths[b] - 1);
    for (int64_t h = 0; h < batch.KVH; ++h) {
      store_row(nk + b * k.stride(0) + h * k.stride(1),
                pk + h * pool_k.stride(0) + slot * pool_k.stride(1), batch.pools.D);
      store_row(nv + b * v.stride(0) + h * v.stride(1),
                pv + h * pool_v.stride(0) + slot * pool_v.stride(1), batch.pools.Dv);
    }
  }
}

}  // namespace

void store_kv_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pool_k,
                   const at::Tensor& pool_v, const at::Tensor& slots) {
  const char* op = "store_kv_rows";
  check_rows(k, op, "k", 3);
  check_rows(v, op, "v", 3);
  check_cached(pool_k, pool_v, op, "pool_k", "pool_v");
  const int64_t N = k.size(0), KVH = pool_k.size(0), D = pool_k.size(2), Dv = pool_v.size(2);
  TORCH_CHECK(k.size(1) == KVH && k.size(2) == D, op, ": k must be [", N, ", ", KVH, ", ", D,
              "], got ", k.sizes());
  TORCH_CHECK(v.size(0) == N && v.size(1) == KVH && v.size(2) == Dv, op, ": v must be [", N,
              ", ", KVH, ", ", Dv, "], got ", v.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == N, op,
              ": slots must be int64 [", N, "], got ", slots.scalar_type(), " ", slots.sizes());
  const at::Tensor where = slots.contiguous();
  const int64_t* slot = where.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {  // a bad slot would write outside the pools
    TORCH_CHECK(slot[i] >= 0 && slot[i] < pool_k.size(1), op, ": slots[", i, "] = ", slot[i],
                " is outside the pools' ", pool_k.size(1), " slots");
  }
  with_cached_type(pool_k, [&](auto tag) {
    using T = decltype(tag);
    T* pk = pool_k.data_ptr<T>();
    T* pv = pool_v.data_ptr<T>();
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t h = 0; h < KVH; ++h) {
        store_row(k.const_data_ptr<float>() + i * k.stride(0) + h * k.stride(1),
                  pk + h * pool_k.stride(0) + slot[i] * pool_k.stride(1), D);
        store_row(v.const_data_ptr<float>() + i * v.stride(0) + h * v.stride(1),
                  pv + h * pool_v.stride(0) + slot[i] * pool_v.stride(1), Dv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& pool_k, const at::Tensor& pool_v,
                                  const at::Tensor& block_tables, const at::Tensor& lengths,
                                  int64_t block_size, double scale) {
  const char* op = "paged_decode_attention";
  check_rows(q, op, "q", 3);
  check_rows(k, op, "k", 3);
  check_rows(v, op, "v", 3);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  check_pools(pool_k, pool_v, H, D, op);
  const int64_t KVH = pool_k.size(0), Dv = pool_v.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == KVH && k.size(2) == D, op, ": k must be [", B, ", ",
              KVH, ", ", D, "], got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == KVH && v.size(2) == Dv, op, ": v must be [", B,
              ", ", KVH, ", ", Dv, "], got ", v.sizes());
  check_block_tables(block_tables, lengths, B, pool_k.size(1), block_size, op);

  const at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  at::Tensor out = at::empty({B, H, Dv}, q.options());
  with_cached_type(pool_k, [&](auto tag) {
    using T = decltype(tag);
    const KVPools<T> pools{pool_k.const_data_ptr<T>(), pool_k.stride(0), pool_k.stride(1),
                           pool_v.const_data_ptr<T>(), pool_v.stride(0), pool_v.stride(1),
                           tables.const_data_ptr<int32_t>(), tables.size(1), block_size, D, Dv};
    const Batch<T> batch{q.const_data_ptr<float>(), q.stride(0), q.stride(1), pools,
                         lens.const_data_ptr<int64_t>(), B, H, KVH, float(scale)};
    store_new_rows(batch, k, v, pool_k, pool_v);
    attend(batch, out.data_ptr<float>());
  });
  return out;
}

TORCH_LIBRARY(ladle_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) pool_k, Tensor(b!) pool_v, "
      "Tensor block_tables, Tensor lengths, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_decode_attention", &paged_decode_attention);
}

}  // namespace ladle_kernels
