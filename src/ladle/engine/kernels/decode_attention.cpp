// Decode-step attention: one query token per sequence against all of its cached keys and values.
//
// Flash-decoding on a CPU: the work is cut into (sequence, kv head, span of kSpan positions)
// items, so two threads are both busy even with three kv heads and one sequence. An item
// attends all the query heads of its kv head at once (each key and value row comes from memory
// once), leaving an unnormalised partial result with its max and sum; a second pass merges the
// spans of each head by rescaling. Spans have a fixed size, so the result does not depend on
// the number of threads.
//
// The cached keys and values are float32 or float16 (the engine's KV cache keeps float16: half
// the memory, and half the bytes each step reads). Float16 rows are widened to float32 in
// registers as they are loaded; the scores, the softmax and the sums are float32 either way.

#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "parallel_items.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
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

constexpr int64_t kSpan = 128;  // positions per work item
constexpr int64_t kHeadBlock = 4;  // query heads whose accumulators share registers

// scores[g * kSpan + i] = q[g] . keys[i] and acc[g] = sum_i p[g * kSpan + i] * values[i], for
// GB <= kHeadBlock query heads at once: each key or value chunk is loaded once for all of them.

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

template <int GB, class T>
void score_rows(const float* q, int64_t D, const T* const* keys, int64_t n, float* scores) {
  for (int64_t i = 0; i < n; ++i) {
    __m512 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {  // the tail apart, so the accumulators stay in registers
      const __m512 k = load16(keys[i] + d);
      for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), k, acc[g]);
    }
    if (d < D) {
      const __mmask16 m = tail_mask(D - d);
      const __m512 k = load_masked(keys[i] + d, m);
      for (int g = 0; g < GB; ++g)
        acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + g * D + d), k, acc[g]);
    }
    for (int g = 0; g < GB; ++g) scores[g * kSpan + i] = _mm512_reduce_add_ps(acc[g]);
  }
}

template <int GB, class T>
void accumulate_rows(const float* p, const T* const* values, int64_t n, int64_t Dv,
                     float* acc_out) {
  for (int64_t d = 0; d < Dv; d += 16) {
    const __mmask16 m = tail_mask(Dv - d);
    __m512 even[GB], odd[GB];  // two chains per head: an FMA's latency is four of its issues
    for (int g = 0; g < GB; ++g) even[g] = odd[g] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const __m512 v0 = load_masked(values[i] + d, m);
      const __m512 v1 = load_masked(values[i + 1] + d, m);
      for (int g = 0; g < GB; ++g) {
        even[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * kSpan + i]), v0, even[g]);
        odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * kSpan + i + 1]), v1, odd[g]);
      }
    }
    if (i < n) {
      const __m512 v0 = load_masked(values[i] + d, m);
      for (int g = 0; g < GB; ++g)
        even[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * kSpan + i]), v0, even[g]);
    }
    for (int g = 0; g < GB; ++g)
      _mm512_mask_storeu_ps(acc_out + g * Dv + d, m, _mm512_add_ps(even[g], odd[g]));
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

// exp(x) for x <= 0 (scores minus their max), Cephes' expf polynomial: glibc's vector expf is
// declared only under -ffast-math, and a scalar expf per score costs as much as the dot products.
void exp_inplace(float* x, int64_t n) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 lowest = _mm512_set1_ps(-104.0f);  // exp underflows to 0 well above this
  const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_max_ps(_mm512_maskz_loadu_ps(m, x + i), lowest);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, ln2_hi, v);
    r = _mm512_fnmadd_ps(k, ln2_lo, r);
    __m512 p = _mm512_set1_ps(c[0]);
    for (int j = 1; j < 6; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    _mm512_mask_storeu_ps(x + i, m, _mm512_scalef_ps(p, k));  // p * 2^k, 0 when k is tiny
  }
}

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

#else  // portable fallback: loops the compiler vectorises on its own where it may

template <int GB, class T>
void score_rows(const float* q, int64_t D, const T* const* keys, int64_t n, float* scores) {
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < GB; ++g) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[g * D + d] * float(keys[i][d]);
      scores[g * kSpan + i] = acc;
    }
}

template <int GB, class T>
void accumulate_rows(const float* p, const T* const* values, int64_t n, int64_t Dv,
                     float* acc_out) {
  std::fill(acc_out, acc_out + GB * Dv, 0.0f);
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < GB; ++g)
      for (int64_t d = 0; d < Dv; ++d)
        acc_out[g * Dv + d] += p[g * kSpan + i] * float(values[i][d]);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

void store_halves(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#endif

// A new key or value row into a pool of either type.
void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

void store_row(const float* src, c10::Half* dst, int64_t n) { store_halves(src, dst, n); }

// Calls fn(std::integral_constant<int, GB>) for a runtime block of 1 <= gb <= kHeadBlock heads.
template <class Fn>
void with_head_block(int64_t gb, Fn&& fn) {
  switch (gb) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    default: return fn(std::integral_constant<int, kHeadBlock>());
  }
}

// Where a decode step reads: B sequences, each query [H, D] against its own positions of
// [KVH, rows, D] keys and [KVH, rows, Dv] values. Position p of sequence b is row p, or with
// block tables row block_tables[b][p / block_size] * block_size + p % block_size. Keys and
// values are of type T (float or c10::Half).
template <class T>
struct Batch {
  const float* q;
  int64_t q_seq_stride, q_head_stride;
  const T* k;
  int64_t k_head_stride, k_row_stride;
  const T* v;
  int64_t v_head_stride, v_row_stride;
  const int32_t* block_tables;  // [B, table_stride] or null
  int64_t table_stride, block_size;
  const int64_t* lengths;  // [B]
  int64_t B, H, KVH, D, Dv;
  float scale;

  int64_t row(int64_t b, int64_t p) const {
    if (block_tables == nullptr) return p;
    return int64_t(block_tables[b * table_stride + p / block_size]) * block_size + p % block_size;
  }
};

// The unnormalised attention of one kv head's G query heads over one span of positions.
struct Partial {
  float* acc;  // [G, Dv]: sum over the span of exp(score - max) * value
  float* max;  // [G]
  float* sum;  // [G]: sum over the span of exp(score - max)
};

// q_scaled [G, D] (contiguous, times the softmax scale); scores: scratch of G * kSpan floats;
// rows: scratch of 2 * kSpan pointers.
template <class T>
void attend_span(const Batch<T>& batch, int64_t b, int64_t kv_head, int64_t begin, int64_t end,
                 const float* q_scaled, float* scores, const T** rows, const Partial& out) {
  const int64_t G = batch.H / batch.KVH, D = batch.D, Dv = batch.Dv, n = end - begin;
  const T** keys = rows;
  const T** values = rows + kSpan;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = batch.row(b, begin + i);
    keys[i] = batch.k + kv_head * batch.k_head_stride + row * batch.k_row_stride;
    values[i] = batch.v + kv_head * batch.v_head_stride + row * batch.v_row_stride;
  }
  for (int64_t g = 0; g < G; g += kHeadBlock) {
    with_head_block(std::min(kHeadBlock, G - g), [&](auto gb) {
      score_rows<gb(), T>(q_scaled + g * D, D, keys, n, scores + g * kSpan);
    });
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * kSpan;
    const float m = *std::max_element(s, s + n);
    for (int64_t i = 0; i < n; ++i) s[i] -= m;
    exp_inplace(s, n);
    float total = 0.0f;
    for (int64_t i = 0; i < n; ++i) total += s[i];
    out.max[g] = m;
    out.sum[g] = total;
  }
  for (int64_t g = 0; g < G; g += kHeadBlock) {
    with_head_block(std::min(kHeadBlock, G - g), [&](auto gb) {
      accumulate_rows<gb(), T>(scores + g * kSpan, values, n, Dv, out.acc + g * Dv);
    });
  }
}

// out [B, H, Dv] contiguous.
template <class T>
void attend(const Batch<T>& batch, float* out) {
  const int64_t G = batch.H / batch.KVH, D = batch.D, Dv = batch.Dv, KVH = batch.KVH;
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
  const int64_t num_items = num_spans * KVH, item_floats = G * (Dv + 2);
  std::unique_ptr<float[]> partials(new float[num_items * item_floats]);
  auto partial = [&](int64_t item) {
    float* base = partials.get() + item * item_floats;
    return Partial{base, base + G * Dv, base + G * Dv + G};
  };

  auto run_items = [&](int64_t first, int64_t last) {
    std::vector<float> q_scaled(G * D), scores(G * kSpan);
    std::vector<const T*> rows(2 * kSpan);
    for (int64_t item = first; item < last; ++item) {
      const int64_t span = item / KVH, kv_head = item % KVH, b = span_seq[span];
      for (int64_t g = 0; g < G; ++g) {
        const float* q = batch.q + b * batch.q_seq_stride + (kv_head * G + g) * batch.q_head_stride;
        for (int64_t d = 0; d < D; ++d) q_scaled[g * D + d] = q[d] * batch.scale;
      }
      const int64_t begin = span_begin[span], end = std::min(begin + kSpan, batch.lengths[b]);
      attend_span(batch, b, kv_head, begin, end, q_scaled.data(), scores.data(), rows.data(),
                  partial(item));
    }
  };
  parallel_items(num_items, work, run_items);

  // Merge: each span's sum and accumulator count exp(max_span - max_all) times as much.
  for (int64_t b = 0; b < batch.B; ++b) {
    for (int64_t h = 0; h < batch.H; ++h) {
      const int64_t kv_head = h / G, g = h % G;
      float m = -INFINITY;
      for (int64_t s = first_span[b]; s < first_span[b + 1]; ++s)
        m = std::max(m, partial(s * KVH + kv_head).max[g]);
      float* o = out + (b * batch.H + h) * Dv;
      std::fill(o, o + Dv, 0.0f);
      float total = 0.0f;
      for (int64_t s = first_span[b]; s < first_span[b + 1]; ++s) {
        const Partial p = partial(s * KVH + kv_head);
        const float weight = std::exp(p.max[g] - m);
        total += weight * p.sum[g];
        axpy(weight, p.acc + g * Dv, o, Dv);
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    }
  }
}

void check_layout(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
              " must have unit stride in its last dim, got strides ", t.strides());
}

void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_layout(t, op, name, dim);
}

// Cached keys and values [KVH, rows, D]: both float32 or both float16.
void check_cached(const at::Tensor& keys, const at::Tensor& values, const char* op,
                  const char* keys_name, const char* values_name) {
  for (const auto& [t, name] : {std::pair{&keys, keys_name}, std::pair{&values, values_name}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf, op, ": ", name,
                " must be float32 or float16, got ", t->scalar_type());
    check_layout(*t, op, name, 3);
  }
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), op, ": ", keys_name, " and ",
              values_name, " must have one dtype, got ", keys.scalar_type(), " and ",
              values.scalar_type());
}

// Calls fn(T()) with T the element type of cached keys and values (checked by check_cached).
template <class Fn>
void with_cached_type(const at::Tensor& t, Fn&& fn) {
  if (t.scalar_type() == at::kHalf) {
    fn(c10::Half());
  } else {
    fn(float());
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
    Batch<T> batch{q.const_data_ptr<float>(), 0, q.stride(0),
                   keys.const_data_ptr<T>(), keys.stride(0), keys.stride(1),
                   values.const_data_ptr<T>(), values.stride(0), values.stride(1),
                   nullptr, 0, 1, &L, 1, H, KVH, D, Dv, float(scale)};
    attend(batch, out.data_ptr<float>());
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
    const int64_t slot = batch.row(b, batch.lengths[b] - 1);
    for (int64_t h = 0; h < batch.KVH; ++h) {
      store_row(nk + b * k.stride(0) + h * k.stride(1),
                pk + h * pool_k.stride(0) + slot * pool_k.stride(1), batch.D);
      store_row(nv + b * v.stride(0) + h * v.stride(1),
                pv + h * pool_v.stride(0) + slot * pool_v.stride(1), batch.Dv);
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& pool_k, const at::Tensor& pool_v,
                                  const at::Tensor& block_tables, const at::Tensor& lengths,
                                  int64_t block_size, double scale) {
  const char* op = "paged_decode_attention";
  check_rows(q, op, "q", 3);
  check_rows(k, op, "k", 3);
  check_rows(v, op, "v", 3);
  check_cached(pool_k, pool_v, op, "pool_k", "pool_v");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, op,
              ": block_tables must be int32 [B, max_blocks], got ", block_tables.scalar_type(),
              " ", block_tables.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1, op,
              ": lengths must be int64 [B], got ", lengths.scalar_type(), " ", lengths.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = pool_k.size(0);
  const int64_t num_slots = pool_k.size(1), Dv = pool_v.size(2);
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": q's ", H, " heads are not a multiple of pool_k's ",
              KVH, " kv heads");
  TORCH_CHECK(pool_k.size(2) == D, op, ": pool_k has head dim ", pool_k.size(2), ", q has ", D);
  TORCH_CHECK(pool_v.size(0) == KVH && pool_v.size(1) == num_slots, op, ": pool_v ",
              pool_v.sizes(), " does not match pool_k ", pool_k.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(1) == KVH && k.size(2) == D, op, ": k must be [", B, ", ",
              KVH, ", ", D, "], got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == KVH && v.size(2) == Dv, op, ": v must be [", B,
              ", ", KVH, ", ", Dv, "], got ", v.sizes());
  TORCH_CHECK(block_tables.size(0) == B, op, ": block_tables has ", block_tables.size(0),
              " rows for ", B, " sequences");
  TORCH_CHECK(lengths.size(0) == B, op, ": lengths has ", lengths.size(0), " entries for ", B,
              " sequences");

  const at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  const int32_t* table = tables.const_data_ptr<int32_t>();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1), num_blocks = num_slots / block_size;
  for (int64_t b = 0; b < B; ++b) {  // a bad entry would read or write outside the pools
    TORCH_CHECK(len[b] >= 1 && len[b] <= max_blocks * block_size, op, ": lengths[", b, "] = ",
                len[b], " exceeds its block table of ", max_blocks, " blocks of ", block_size);
    for (int64_t i = 0; i < (len[b] + block_size - 1) / block_size; ++i) {
      const int64_t block = table[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", b, "][", i, "] = ",
                  block, " is outside the pools' ", num_blocks, " blocks");
    }
  }

  at::Tensor out = at::empty({B, H, Dv}, q.options());
  with_cached_type(pool_k, [&](auto tag) {
    using T = decltype(tag);
    Batch<T> batch{q.const_data_ptr<float>(), q.stride(0), q.stride(1),
                   pool_k.const_data_ptr<T>(), pool_k.stride(0), pool_k.stride(1),
                   pool_v.const_data_ptr<T>(), pool_v.stride(0), pool_v.stride(1),
                   table, max_blocks, block_size, len, B, H, KVH, D, Dv, float(scale)};
    store_new_rows(batch, k, v, pool_k, pool_v);
    attend(batch, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

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
