// Prefill attention: the new query rows of one or more sequences (a prompt, a prompt's chunk, the
// tail after a cached prefix, or one decoded token) against their cached keys and values, read
// through block tables; row i of a sequence sees its positions up to its own (within its
// window, for a sliding-window layer).
//
// Every row is computed as the decode kernel computes a lone decoded token (the functions of
// attention_rows.h, span by span): a row's output is the same bits whatever rows, chunk or
// cached prefix came with it, so a prompt's logits do not depend on how much of it the prefix
// cache held.
//
// The work is cut into (tile of consecutive rows of one sequence, kv head) items: a tile's rows
// and the query heads of its kv head are scored against each key as it is loaded. Later rows
// see more keys, so items are dealt largest and smallest in turn, and the pool's chunks then
// take about equal time.

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace ladle_kernels {

namespace {

// Consecutive query rows of one sequence: row r is at position first_length - 1 + r.
struct Tile {
  int64_t seq, first_row, num_rows, first_length;
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
  std::vector<int32_t> starts, counts;
  SpanPartials parts;
  SpanScratch<T> span;

  TileScratch(int64_t vectors, int64_t D, int64_t Dv, int64_t max_spans)
      : q_scaled(vectors * D),
        partials(max_spans * SpanPartials::floats(vectors, Dv)),
        starts(vectors),
        counts(vectors),
        parts{partials.data(), vectors, Dv, SpanPartials::floats(vectors, Dv)},
        span(D) {}
};

struct Query {
  const float* q;
  int64_t q_stride, H;
  float scale;
  ScoreRule rule;
};

// The tile's rows of out [N, H, Dv], for the query heads of kv head kv_head.
template <class T>
void attend_tile(const KVPools<T>& pools, const Query& query, const Tile& tile, int64_t kv_head,
                 int64_t KVH, TileScratch<T>& s, float* out) {
  const int64_t H = query.H, G = H / KVH, D = pools.D, Dv = pools.Dv;
  for (int64_t r = 0; r < tile.num_rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* q = query.q + (tile.first_row + r) * query.q_stride + (kv_head * G + g) * D;
      float* scaled = s.q_scaled.data() + (r * G + g) * D;
      for (int64_t d = 0; d < D; ++d) scaled[d] = q[d] * query.scale;
    }
  }
  // rows at positions first_length - 1 + r see first_visible(position) .. position
  const int64_t first_position = tile.first_length - 1;
  const int64_t last_position = first_position + tile.num_rows - 1;
  const int64_t span0 = query.rule.first_visible(first_position) / kSpan;
  for (int64_t span = span0; span * kSpan <= last_position; ++span) {
    const int64_t begin = span * kSpan;
    const int64_t r0 = std::max<int64_t>(0, begin - first_position);  // rows that reach it
    for (int64_t r = r0; r < tile.num_rows; ++r) {
      const int64_t position = first_position + r;
      const int64_t start = std::max<int64_t>(0, query.rule.first_visible(position) - begin);
      std::fill_n(s.starts.data() + r * G, G, int32_t(std::min(kSpan, start)));
      std::fill_n(s.counts.data() + r * G, G, int32_t(std::min(kSpan, position + 1 - begin)));
    }
    attend_span(pools, tile.seq, kv_head, begin, s.starts.data() + r0 * G,
                s.counts.data() + r0 * G, (tile.num_rows - r0) * G,
                s.q_scaled.data() + r0 * G * D, query.rule.softcap, s.span,
                s.parts.at(span - span0, r0 * G));
  }
  for (int64_t r = 0; r < tile.num_rows; ++r) {
    const int64_t position = first_position + r;
    const int64_t first = query.rule.first_visible(position) / kSpan - span0;
    const int64_t last = position / kSpan + 1 - span0;
    for (int64_t g = 0; g < G; ++g) {
      float* o = out + ((tile.first_row + r) * H + kv_head * G + g) * Dv;
      merge_spans(s.parts, first, last, r * G + g, o);
    }
  }
}

template <class T>
void attend(const PagedStep& step, const Query& query, float* out) {
  const KVPools<T> pools = step.pools<T>();
  const int64_t KVH = step.kv_heads, G = query.H / KVH, D = step.D, Dv = step.Dv;
  const int64_t rows_per_tile = std::max<int64_t>(1, kLanes / G);  // rows that fill the lanes
  const std::vector<Tile> tiles = deal_tiles(step.lengths, step.query_lens, step.B, rows_per_tile);
  int64_t work = 0, max_spans = 0;
  for (int64_t b = 0; b < step.B; ++b) {
    const int64_t start = step.lengths[b] - step.query_lens[b];  // rows see start + 1 .. keys
    work += (start + 1 + step.lengths[b]) * step.query_lens[b] / 2 * query.H * (D + Dv);
    max_spans = std::max(max_spans, (step.lengths[b] + kSpan - 1) / kSpan);
  }
  parallel_items(int64_t(tiles.size()) * KVH, work, [&](int64_t first, int64_t last) {
    TileScratch<T> scratch(rows_per_tile * G, D, Dv, max_spans);
    for (int64_t item = first; item < last; ++item) {
      attend_tile(pools, query, tiles[item / KVH], item % KVH, KVH, scratch, out);
    }
  });
}

}  // namespace

void prefill_attention(const PagedStep& step, const float* q, int64_t q_stride, int64_t H,
                       float scale, const ScoreRule& rule, float* out) {
  const Query query{q, q_stride, H, scale, rule};
  with_cached_type(step, [&](auto tag) { attend<decltype(tag)>(step, query, out); });
}

}  // namespace ladle_kernels
