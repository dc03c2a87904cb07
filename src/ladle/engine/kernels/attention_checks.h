// Argument checks the attention operators share: each failure names the operator and the
// argument, and a paged call's lengths and block tables are checked against its pools before
// any slot is read or written.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <utility>

namespace ladle_kernels {

inline void check_layout(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
              " must have unit stride in its last dim, got strides ", t.strides());
}

inline void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_layout(t, op, name, dim);
}

// Cached keys and values [KVH, rows, D]: both float32 or both float16.
inline void check_cached(const at::Tensor& keys, const at::Tensor& values, const char* op,
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

// Pools [KVH, num_slots, D] and [KVH, num_slots, Dv] for queries of H heads of D dims.
inline void check_pools(const at::Tensor& pool_k, const at::Tensor& pool_v, int64_t H, int64_t D,
                        const char* op) {
  check_cached(pool_k, pool_v, op, "pool_k", "pool_v");
  const int64_t KVH = pool_k.size(0);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": q's ", H, " heads are not a multiple of pool_k's ",
              KVH, " kv heads");
  TORCH_CHECK(pool_k.size(2) == D, op, ": pool_k has head dim ", pool_k.size(2), ", q has ", D);
  TORCH_CHECK(pool_v.size(0) == KVH && pool_v.size(1) == pool_k.size(1), op, ": pool_v ",
              pool_v.sizes(), " does not match pool_k ", pool_k.sizes());
}

// block_tables int32 [B, max_blocks] and lengths int64 [B]: every sequence's positions
// 0 .. lengths[b] - 1 lie in blocks of its table that the pools hold.
inline void check_block_tables(const at::Tensor& block_tables, const at::Tensor& lengths,
                               int64_t B, int64_t num_slots, int64_t block_size, const char* op) {
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, op,
              ": block_tables must be int32 [B, max_blocks], got ", block_tables.scalar_type(),
              " ", block_tables.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1, op,
              ": lengths must be int64 [B], got ", lengths.scalar_type(), " ", lengths.sizes());
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
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

}  // namespace ladle_kernels
