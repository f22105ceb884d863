// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels (matmul.cc,
// paged_attention.cc). A call lasts tens of microseconds, so the caller is one of the workers and
// waits by spinning, not on a futex.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_pause
#endif

#include "xla/ffi/api/ffi.h"

namespace drex {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

// Tasks are claimed from a shared counter by the caller and by helpers on the thread pool. The
// caller waits without sleeping (a call lasts tens of microseconds: a futex wake-up would be a
// good part of it) until no helper is inside a task; a helper that starts after every task was
// claimed finds none and touches only the shared counters, which it co-owns.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
};

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F&& body) {
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body]() {  // body is only called while the caller waits below
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) body(i);
  };
  // the caller is one of the workers: num_threads - 1 helpers keep one worker per core (with one
  // helper per pool thread, three workers shared two cores here and T = 1 ran 1.3x slower)
  // (no helpers without a pool: the FFI would run each one inline, with a diagnostic)
  const int64_t helpers =
      pool.num_threads() == 0 ? 0 : std::min<int64_t>(std::max<int64_t>(1, pool.num_threads() - 1), n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared, work]() {
      shared->active.fetch_add(1);
      work();
      shared->active.fetch_sub(1, std::memory_order_release);
    });
  }
  work();
  // spin a little (a helper finishing its last panel), then yield: a helper that was preempted
  // must get a core back, and on an oversubscribed machine it may share ours
  for (int spins = 0; shared->active.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 4096) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace drex
