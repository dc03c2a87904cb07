// Prefill attention: the new query rows of one or more sequences (a prompt, a prompt's chunk, the
// tail after a cached prefix, or one decoded token) against their cached keys and values, read
// through block tables; row i of a sequence sees its positions up to its own.
//
// Every row is computed as paged_decode_attention computes a lone decoded token (the functions
// of attention_rows.h, span by span from position 0): a row's output is the same bits whatever
// rows, chunk or cached prefix came with it, so a prompt's logits do not depend on how much of
// it the prefix cache held.
//
// The work is cut into (tile of consecutive rows of one sequence, kv head) items: a tile's rows
// and the query heads of its kv head are scored against each key as it is loaded. Later rows
// see more keys, so items are dealt largest and smallest in turn: torch's pool hands each
// thread one contiguous run of items, and the runs then take about equal time.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "attention_rows.h"
#include "parallel_items.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace ladle_kernels {

namespace {

// Consecutive query rows of one sequence: row r is at position first_length - 1 + r.
struct Tile {
  int64_t seq, first_row, num_rows, first_length;
};

// Where prefill reads: rows [N, H, D] of B sequences; sequence b's query_lens[b] rows follow
// the rows of sequence b - 1 and end at its position lengths[b] - 1.
template <class T>
struct Batch {
  const float* q;
  int64_t q_row_stride, q_head_stride;
  KVPools<T> pools;
  int64_t H, KVH;
  float scale;
};

// Tiles of every sequence's rows, the costliest and the cheapest in turn.
std::vector<Tile> deal_tiles(const int64_t* lengths, const int64_t* query_lens, int64_t B,
                             int64_t rows_per_tile) {
  std::vector<Tile> tiles;
  for (int64_t b = 0, first_row = 0; b < B; first_row += query_lens[b], ++b) {
    const int64_t start = lengths[b] - query_lens[b];
    for (int64_t r = 0; r < query_lens[b]; r += rows_per_tile) {
      tiles.push_back(
          {b, first_row + r, std::min(rows_per_tile, query_lens[b] - r), start + r + 1});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) {
    return a.first_length + a.num_rows < b.first_length + b.num_rows;
  });
  std::vector<Tile> dealt;
  for (size_t low = 0, high = tiles.size(); low < high;) {
    dealt.push_back(tiles[--high]);
    if (low < high) dealt.push_back(tiles[low++]);
  }
  return dealt;
}

// What one thread reuses from tile to tile: a tile's query vectors (rows times the query heads
// of a kv head) and their partials over every span.
template <class T>
struct TileScratch {
  std::vector<float> q_scaled, partials;
  std::vector<int64_t> counts;
  SpanPartials parts;
  SpanScratch<T> span;

  TileScratch(int64_t vectors, int64_t D, int64_t Dv, int64_t max_spans)
      : q_scaled(vectors * D),
        partials(max_spans * SpanPartials::floats(vectors, Dv)),
        counts(vectors),
        parts{partials.data(), vectors, Dv, SpanPartials::floats(vectors, Dv)},
        span(D) {}
};

// The tile's rows of out [N, H, Dv], for the query heads of kv head kv_head.
template <class T>
void attend_tile(const Batch<T>& batch, const Tile& tile, int64_t kv_head, TileScratch<T>& s,
                 float* out) {
  const int64_t G = batch.H / batch.KVH, D = batch.pools.D, Dv = batch.pools.Dv;
  for (int64_t r = 0; r < tile.num_rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* q = batch.q + (tile.first_row + r) * batch.q_row_stride +
                       (kv_head * G + g) * batch.q_head_stride;
      float* scaled = s.q_scaled.data() + (r * G + g) * D;
      for (int64_t d = 0; d < D; ++d) scaled[d] = q[d] * batch.scale;
    }
  }
  const int64_t last_length = tile.first_length + tile.num_rows - 1;
  for (int64_t span = 0, begin = 0; begin < last_length; ++span, begin += kSpan) {
    const int64_t r0 = std::max<int64_t>(0, begin + 1 - tile.first_length);  // rows that reach it
    for (int64_t r = r0; r < tile.num_rows; ++r) {
      std::fill_n(s.counts.data() + r * G, G, std::min(kSpan, tile.first_length + r - begin));
    }
    attend_span(batch.pools, tile.seq, kv_head, begin, s.counts.data() + r0 * G,
                (tile.num_rows - r0) * G, s.q_scaled.data() + r0 * G * D, s.span,
                s.parts.at(span, r0 * G));
  }
  for (int64_t r = 0; r < tile.num_rows; ++r) {
    const int64_t num_spans = (tile.first_length + r + kSpan - 1) / kSpan;
    for (int64_t g = 0; g < G; ++g) {
      float* o = out + ((tile.first_row + r) * batch.H + kv_head * G + g) * Dv;
      merge_spans(s.parts, num_spans, r * G + g, o);
    }
  }
}

// out [N, H, Dv] contiguous.
template <class T>
void attend(const Batch<T>& batch, const int64_t* lengths, const int64_t* query_lens, int64_t B,
            float* out) {
  const int64_t G = batch.H / batch.KVH, D = batch.pools.D, Dv = batch.pools.Dv;
  const int64_t rows_per_tile = std::max<int64_t>(1, kLanes / G);  // rows that fill the lanes
  const std::vector<Tile> tiles = deal_tiles(lengths, query_lens, B, rows_per_tile);
  int64_t work = 0, max_spans = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = lengths[b] - query_lens[b];  // rows see start + 1 .. lengths[b] keys
    work += (start + 1 + lengths[b]) * query_lens[b] / 2 * batch.H * (D + Dv);
    max_spans = std::max(max_spans, (lengths[b] + kSpan - 1) / kSpan);
  }
  parallel_items(int64_t(tiles.size()) * batch.KVH, work, [&](int64_t first, int64_t last) {
    TileScratch<T> scratch(rows_per_tile * G, D, Dv, max_spans);
    for (int64_t item = first; item < last; ++item) {
      attend_tile(batch, tiles[item / batch.KVH], item % batch.KVH, scratch, out);
    }
  });
}

}  // namespace

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& pool_k,
                                   const at::Tensor& pool_v, const at::Tensor& block_tables,
                                   const at::Tensor& lengths, const at::Tensor& query_lens,
                                   int64_t block_size, double scale) {
  const char* op = "paged_prefill_attention";
  check_rows(q, op, "q", 3);
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  check_pools(pool_k, pool_v, H, D, op);
  const int64_t B = block_tables.dim() == 2 ? block_tables.size(0) : 0;
  check_block_tables(block_tables, lengths, B, pool_k.size(1), block_size, op);
  TORCH_CHECK(query_lens.scalar_type() == at::kLong && query_lens.dim() == 1 &&
                  query_lens.size(0) == B,
              op, ": query_lens must be int64 [", B, "], got ", query_lens.scalar_type(), " ",
              query_lens.sizes());
  const at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  const at::Tensor qlens = query_lens.contiguous();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  const int64_t* qlen = qlens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(qlen[b] >= 1 && qlen[b] <= len[b], op, ": query_lens[", b, "] = ", qlen[b],
                " must be in 1 .. lengths[", b, "] = ", len[b]);
  }
  const int64_t total = std::accumulate(qlen, qlen + B, int64_t(0));
  TORCH_CHECK(total == N, op, ": query_lens sum to ", total, " rows, q has ", N);

  const int64_t KVH = pool_k.size(0), Dv = pool_v.size(2);
  at::Tensor out = at::empty({N, H * Dv}, q.options());
  with_cached_type(pool_k, [&](auto tag) {
    using T = decltype(tag);
    const KVPools<T> pools{pool_k.const_data_ptr<T>(), pool_k.stride(0), pool_k.stride(1),
                           pool_v.const_data_ptr<T>(), pool_v.stride(0), pool_v.stride(1),
                           tables.const_data_ptr<int32_t>(), tables.size(1), block_size, D, Dv};
    const Batch<T> batch{q.const_data_ptr<float>(), q.stride(0), q.stride(1), pools, H, KVH,
                         float(scale)};
    attend(batch, len, qlen, B, out.data_ptr<float>());
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(ladle_kernels, m) {
  m.def(
      "paged_prefill_attention(Tensor q, Tensor pool_k, Tensor pool_v, Tensor block_tables, "
      "Tensor lengths, Tensor query_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladle_kernels, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}

}  // namespace ladle_kernels
