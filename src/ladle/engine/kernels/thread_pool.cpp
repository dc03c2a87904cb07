// A small thread pool for the kernels, in place of torch's intra-op pool (the library does not
// link torch, so one build serves every torch version).
//
// A parallel call publishes a job (a chunk count and the function) under a new generation
// number; the caller and the workers claim chunks one at a time with a compare-and-swap on
// (generation, next chunk), so a claim can only ever take a chunk of the current job, and the
// call returns once every chunk is done. Workers spin for a short while after a job (a
// decoder step makes hundreds of parallel calls microseconds apart), then sleep on a futex
// until the next one. Under load from another process, a worker whose core is taken simply
// claims fewer chunks: no thread waits at a barrier for one that is not running, which is
// what slows a statically split OpenMP loop down several times beside a busy process.
//
// Each thread that calls into the kernels gets its own pool and thread count (two models on
// two engine threads never share one), made on first use and rebuilt when the count changes.

#include "thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ladle_kernels {

namespace {

constexpr int64_t kSerialWork = 1 << 17;  // below this many multiply-adds, waking costs more
constexpr int64_t kChunksPerThread = 4;  // room to rebalance when a thread falls behind
constexpr auto kSpin = std::chrono::microseconds(200);  // a worker's spin before it sleeps

std::atomic<int> g_num_threads{1};  // for threads that never set their own
thread_local int t_num_threads = 0;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads), pid_(getpid()) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ~Pool() {
    if (getpid() != pid_) {  // a forked child holds no workers: nothing to join
      for (auto& w : workers_) w.detach();
      return;
    }
    stop_.store(true);
    epoch_.fetch_add(1);
    epoch_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int threads() const { return threads_; }
  bool forked() const { return getpid() != pid_; }

  void run(int64_t num_chunks, FunctionRef<void(int64_t)> chunk) {
    num_chunks_.store(num_chunks, std::memory_order_relaxed);
    fn_.store(&chunk, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32);  // seq_cst: ordered before the sleepers_ load below
    if (sleepers_.load() > 0) {
      epoch_.fetch_add(1);
      epoch_.notify_all();
    }
    claim(gen);
    for (int spins = 0; done_.load(std::memory_order_acquire) < num_chunks; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();  // a worker mid-chunk lost its core: let it have ours
      }
    }
  }

 private:
  // Runs chunks of job `gen` until none is left.
  void claim(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == gen) {
      const int64_t index = int64_t(s & 0xFFFFFFFFu);
      if (index >= num_chunks_.load(std::memory_order_relaxed)) return;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        (*fn_.load(std::memory_order_relaxed))(index);
        done_.fetch_add(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void work() {
    uint64_t seen = state_.load() >> 32;
    while (!stop_.load(std::memory_order_relaxed)) {
      uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spins = 0; gen == seen; ++spins) {
        cpu_relax();
        if (spins % 64 == 63 && std::chrono::steady_clock::now() > until) break;
        gen = state_.load(std::memory_order_acquire) >> 32;
      }
      if (gen == seen) {  // idle: sleep until a job or the end is published
        const uint32_t epoch = epoch_.load();
        sleepers_.fetch_add(1);
        gen = state_.load() >> 32;
        if (gen == seen && !stop_.load()) epoch_.wait(epoch);
        sleepers_.fetch_sub(1);
        continue;
      }
      seen = gen;
      claim(gen);
    }
  }

  const int threads_;
  const pid_t pid_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};  // generation << 32 | next chunk
  std::atomic<int64_t> num_chunks_{0};
  std::atomic<const FunctionRef<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> epoch_{0};  // the futex sleeping workers wait on
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

Pool* pool_for(int threads) {
  thread_local std::unique_ptr<Pool> pool;
  if (pool && pool->forked()) {
    static_cast<void>(pool.release());  // its threads were not forked; its memory stays
  }
  if (!pool || pool->threads() != threads) {
    pool.reset();
    pool = std::make_unique<Pool>(threads);
  }
  return pool.get();
}

// Set while a thread runs a chunk: a parallel call inside it runs inline.
thread_local bool t_in_chunk = false;

}  // namespace

void set_num_threads(int n) {
  t_num_threads = std::max(1, n);
  g_num_threads.store(t_num_threads);
}

int num_threads() { return t_num_threads > 0 ? t_num_threads : g_num_threads.load(); }

void parallel_items(int64_t num_items, int64_t work, FunctionRef<void(int64_t, int64_t)> fn) {
  const int threads = num_threads();
  if (num_items <= 1 || work < kSerialWork || threads == 1 || t_in_chunk) {
    if (num_items > 0) fn(0, num_items);
    return;
  }
  const int64_t num_chunks = std::min<int64_t>(num_items, threads * kChunksPerThread);
  pool_for(threads)->run(num_chunks, [&](int64_t chunk) {
    t_in_chunk = true;
    // chunk c: items [c * n / chunks, (c + 1) * n / chunks), sizes within one of each other
    fn(chunk * num_items / num_chunks, (chunk + 1) * num_items / num_chunks);
    t_in_chunk = false;
  });
}

}  // namespace ladle_kernels
