// The C ABI (api.h) over the kernels: argument checks where a bad index would read or write
// outside a buffer, errors as a message per thread instead of exceptions across the ABI.

#include "api.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <numeric>
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

#ifndef LADLE_ISA_NAME
#error "build with -DLADLE_ISA_NAME=\"...\" (build.py does)"
#endif
#ifndef LADLE_SOURCE_HASH
#define LADLE_SOURCE_HASH "unknown"
#endif

namespace {

using namespace ladle_kernels;

thread_local std::string t_error;

// Thrown by the checks below, caught at the ABI.
struct BadArgument {
  std::string message;
};

template <class... Args>
[[noreturn]] void fail(const char* format, Args... args) {
  char buffer[512];
  std::snprintf(buffer, sizeof(buffer), format, args...);
  throw BadArgument{buffer};
}

template <class Fn>
int32_t guarded(const char* op, Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const BadArgument& e) {
    t_error = std::string(op) + ": " + e.message;
  } catch (const std::exception& e) {  // std::bad_alloc, mostly
    t_error = std::string(op) + ": " + e.what();
  }
  return 1;
}

// Every sequence's positions 0 .. lengths[b] - 1 lie in slots the pools hold.
void check_positions(const LadleKV& kv) {
  if (kv.num_seqs < 1) fail("no sequences");
  if (kv.block_size < 1) fail("block_size must be positive, got %lld", (long long)kv.block_size);
  for (int64_t b = 0; b < kv.num_seqs; ++b) {
    const int64_t length = kv.lengths[b];
    if (kv.block_tables == nullptr) {
      if (length < 1 || length > kv.num_slots)
        fail("lengths[%lld] = %lld is outside the cache's %lld positions", (long long)b,
             (long long)length, (long long)kv.num_slots);
      continue;
    }
    if (length < 1 || length > kv.table_stride * kv.block_size)
      fail("lengths[%lld] = %lld exceeds its block table of %lld blocks of %lld", (long long)b,
           (long long)length, (long long)kv.table_stride, (long long)kv.block_size);
    const int64_t num_blocks = kv.num_slots / kv.block_size;
    for (int64_t i = 0; i < (length + kv.block_size - 1) / kv.block_size; ++i) {
      const int64_t block = kv.block_tables[b * kv.table_stride + i];
      if (block < 0 || block >= num_blocks)
        fail("block_tables[%lld][%lld] = %lld is outside the pools' %lld blocks", (long long)b,
             (long long)i, (long long)block, (long long)num_blocks);
    }
  }
}

PagedStep step_of(const LadleKV& kv) {
  return PagedStep{kv.pool_k, kv.pool_v, kv.half != 0, kv.kv_heads, kv.head_dim, kv.v_head_dim,
                   kv.k_head_stride, kv.k_row_stride, kv.v_head_stride, kv.v_row_stride,
                   kv.block_tables, kv.table_stride, kv.num_seqs,
                   kv.block_tables == nullptr ? kv.num_slots : kv.block_size, kv.lengths,
                   kv.query_lens};
}

void check_slots(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] < 0 || slots[i] >= num_slots)
      fail("slots[%lld] = %lld is outside the pools' %lld slots", (long long)i,
           (long long)slots[i], (long long)num_slots);
  }
}

void check_query_lens(const LadleKV& kv, int64_t n) {
  int64_t total = 0;
  for (int64_t b = 0; b < kv.num_seqs; ++b) {
    const int64_t q = kv.query_lens[b];
    if (q < 1 || q > kv.lengths[b])
      fail("query_lens[%lld] = %lld must be in 1 .. lengths[%lld] = %lld", (long long)b,
           (long long)q, (long long)b, (long long)kv.lengths[b]);
    total += q;
  }
  if (total != n) fail("query_lens sum to %lld rows, q has %lld", (long long)total, (long long)n);
}

}  // namespace

extern "C" {

const char* ladle_isa(void) { return LADLE_ISA_NAME; }

const char* ladle_source_hash(void) { return LADLE_SOURCE_HASH; }

const char* ladle_last_error(void) { return t_error.c_str(); }

void ladle_set_num_threads(int32_t n) { set_num_threads(n); }

int32_t ladle_get_num_threads(void) { return num_threads(); }

void ladle_linear(const LadleLinear* w, const float* x, int64_t n, float* out) {
  linear(x, n, *w, out);
}

void ladle_rms_norm(const float* x, int64_t count, int64_t inner, int64_t stride0,
                    int64_t stride1, int64_t n, const float* w, float eps, float* out) {
  rms_norm(Rows{x, count, inner, stride0, stride1}, n, w, eps, out);
}

void ladle_rotary(const float* x, int64_t count, int64_t inner, int64_t stride0, int64_t stride1,
                  int64_t heads, int64_t head_dim, const float* cos, const float* sin,
                  int64_t rotary_dim, float* out) {
  rotary(Rows{x, count, inner, stride0, stride1}, heads, head_dim, cos, sin, rotary_dim, out);
}

void ladle_gated_activation(const float* x, int64_t count, int64_t inner, int64_t stride0,
                            int64_t stride1, int64_t half_width, int32_t activation, float* out) {
  gated_activation(Rows{x, count, inner, stride0, stride1}, half_width, Activation(activation),
                   out);
}

int32_t ladle_store_kv(const LadleKV* kv, const float* k, int64_t k_row_stride, const float* v,
                       int64_t v_row_stride, const int64_t* slots, int64_t n) {
  return guarded("store_kv", [&] {
    std::vector<int64_t> last;
    if (slots == nullptr) {  // a decode step: row b at sequence b's last position
      check_positions(*kv);
      if (n != kv->num_seqs)
        fail("a decode step has one row per sequence: %lld rows for %lld sequences",
             (long long)n, (long long)kv->num_seqs);
      const PagedStep step = step_of(*kv);
      for (int64_t b = 0; b < n; ++b) {
        last.push_back(step.pools<float>().slot(b, kv->lengths[b] - 1));
      }
      slots = last.data();
    }
    check_slots(slots, n, kv->num_slots);
    store_kv_rows(step_of(*kv), k, k_row_stride, v, v_row_stride, slots, n);
  });
}

int32_t ladle_attention(const LadleKV* kv, const float* q, int64_t q_stride, int64_t n,
                        int64_t heads, float scale, int64_t window, float softcap,
                        int32_t is_decode, float* out) {
  return guarded(is_decode ? "decode attention" : "prefill attention", [&] {
    if (kv->kv_heads < 1 || heads % kv->kv_heads != 0)
      fail("q's %lld heads are not a multiple of the pools' %lld kv heads", (long long)heads,
           (long long)kv->kv_heads);
    check_positions(*kv);
    const ScoreRule rule{window, softcap};
    if (is_decode) {
      if (n != kv->num_seqs)
        fail("a decode step has one row per sequence: %lld rows for %lld sequences",
             (long long)n, (long long)kv->num_seqs);
      decode_attention(step_of(*kv), q, q_stride, heads, scale, rule, out);
    } else {
      check_query_lens(*kv, n);
      prefill_attention(step_of(*kv), q, q_stride, heads, scale, rule, out);
    }
  });
}

int32_t ladle_decoder_layers(const LadleDecoder* model, const LadleCache* cache,
                             const LadleRope* rope, float* x, int64_t T) {
  return guarded("decoder_layers", [&] {
    LadleKV kv{nullptr, nullptr, cache->half, model->num_kv_heads, cache->num_slots,
               model->head_dim, model->head_dim, 0, 0, 0, 0, cache->block_tables,
               cache->table_stride, cache->num_seqs, cache->block_size, cache->lengths,
               cache->query_lens};
    check_positions(kv);
    if (cache->is_decode) {
      if (T != cache->num_seqs)
        fail("a decode step has one row per sequence: %lld rows for %lld sequences",
             (long long)T, (long long)cache->num_seqs);
    } else {
      check_query_lens(kv, T);
      check_slots(cache->slots, T, cache->num_slots);
    }
    decoder_layers(*model, *cache, *rope, x, T);
  });
}

}  // extern "C"
