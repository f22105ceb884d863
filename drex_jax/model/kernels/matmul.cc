// Weight-left projection for XLA:CPU through the XLA FFI: y [M, N] = w [M, K] @ x [K, N]
// (f32; N = the tokens of a step, 1-64 where serving lives), with w packed once at load time.
//
// Decode of a few tokens is bound by reading w. XLA:CPU's dot runs N = 1 as a matrix-vector
// product near the memory bandwidth but N = 2-8 through a GEMM library at ~1.5x that cost, and
// is flat from 17 to 64 columns. This kernel streams w from memory once per call whatever N is.
// w is packed in panels of 32 rows, `packed [P, K, 32]` with packed[p, k, i] = w[32 p + i, k]
// (rows past M zero), so a panel is one contiguous stream; a panel's 32 rows x up to 12 columns
// of y live in vector accumulators while k runs (a broadcast of x[k, j] times two 16-float
// vectors of the panel), so no horizontal sums. Later column blocks re-read the panel from L2.
// Panels are tasks on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include <xmmintrin.h>  // _mm_prefetch, _mm_pause

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;    // rows per panel: two AVX-512 vectors (four AVX2 ones)
constexpr int kMaxCols = 12;  // 2 x 12 accumulators + 2 weight vectors fit in 32 registers
constexpr int64_t kChunkBytes = 256 * 1024;  // x columns per pass over the panels: half an L2
constexpr int kPrefetch = 1024;  // floats ahead (4 KB): keeps the stream in flight while we compute
typedef float Vec __attribute__((vector_size(16 * sizeof(float)), aligned(4)));  // unaligned loads ok

// y[32 p + i, c0 + j] for the panel's rows and C columns. U independent accumulator sets over
// k hide the FMA latency when C is small.
template <int C, int U>
void Micro(const float* panel, const float* xb, float* y, int64_t M, int64_t K, int64_t N, int64_t r0, int64_t c0) {
  Vec acc[U][2][C];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) acc[u][0][j] = acc[u][1][j] = Vec{};
  int64_t k = 0;
  for (; k + U <= K; k += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const float* w = panel + (k + u) * kPanel;
      const Vec w0 = *reinterpret_cast<const Vec*>(w);
      const Vec w1 = *reinterpret_cast<const Vec*>(w + 16);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 16), _MM_HINT_T0);
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        const float xs = xb[(k + u) * kMaxCols + j];
        acc[u][0][j] += w0 * xs;
        acc[u][1][j] += w1 * xs;
      }
    }
  }
  for (; k < K; ++k) {
    const Vec w0 = *reinterpret_cast<const Vec*>(panel + k * kPanel);
    const Vec w1 = *reinterpret_cast<const Vec*>(panel + k * kPanel + 16);
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const float xs = xb[k * kMaxCols + j];
      acc[0][0][j] += w0 * xs;
      acc[0][1][j] += w1 * xs;
    }
  }
  const int64_t rows = std::min<int64_t>(kPanel, M - r0);
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
    Vec a0 = acc[0][0][j], a1 = acc[0][1][j];
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) {
      a0 += acc[u][0][j];
      a1 += acc[u][1][j];
    }
    for (int64_t i = 0; i < rows; ++i) y[(r0 + i) * N + c0 + j] = i < 16 ? a0[i] : a1[i - 16];
  }
}

// Columns [c_begin, c_end) of panel p's rows; x_blocks [ceil(N / 12), K, 12]: x's columns in
// blocks of 12, each block's K rows contiguous.
void Panel(const float* packed, const float* x_blocks, float* y, int64_t M, int64_t K, int64_t N, int64_t p,
           int64_t c_begin, int64_t c_end) {
  const float* panel = packed + p * K * kPanel;
  const int64_t r0 = p * kPanel;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kMaxCols) {
    const float* x = x_blocks + (c0 / kMaxCols) * K * kMaxCols;
    switch (std::min<int64_t>(kMaxCols, c_end - c0)) {
      case 1: Micro<1, 4>(panel, x, y, M, K, N, r0, c0); break;
      case 2: Micro<2, 2>(panel, x, y, M, K, N, r0, c0); break;
      case 3: Micro<3, 2>(panel, x, y, M, K, N, r0, c0); break;
      case 4: Micro<4, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 5: Micro<5, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 6: Micro<6, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 7: Micro<7, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 8: Micro<8, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 9: Micro<9, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 10: Micro<10, 1>(panel, x, y, M, K, N, r0, c0); break;
      case 11: Micro<11, 1>(panel, x, y, M, K, N, r0, c0); break;
      default: Micro<12, 1>(panel, x, y, M, K, N, r0, c0); break;
    }
  }
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
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F&& body) {
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body]() {  // body is only called while the caller waits below
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) body(i);
  };
  // the caller is one of the workers: num_threads - 1 helpers keep one worker per core (with one
  // helper per pool thread, three workers shared two cores here and T = 1 ran 1.3x slower)
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads() - 1), n - 1);
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
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> packed, ffi::Buffer<ffi::F32> x,
                  ffi::ResultBuffer<ffi::F32> y, int64_t panels_per_task) {
  auto pd = packed.dimensions();
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (pd.size() != 3 || pd[2] != kPanel || xd.size() != 2 || pd[1] != xd[0] || yd.size() != 2 ||
      yd[1] != xd[1] || yd[0] > pd[0] * kPanel || yd[0] <= (pd[0] - 1) * kPanel) {
    return ffi::Error::InvalidArgument("matmul: expected packed [ceil(M/32), K, 32], x [K, N] and y [M, N]");
  }
  const int64_t P = pd[0], K = pd[1], N = xd[1], M = yd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* wp = packed.typed_data();
  // x [K, N] -> blocks of 12 columns [ceil(N / 12), K, 12]: a micro-kernel then reads one
  // contiguous 48-byte row of its block per k, whatever N is
  const int64_t blocks = (N + kMaxCols - 1) / kMaxCols;
  std::vector<float> x_blocks(static_cast<size_t>(blocks * K * kMaxCols), 0.f);
  const float* xs = x.typed_data();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) x_blocks[((n / kMaxCols) * K + k) * kMaxCols + n % kMaxCols] = xs[k * N + n];
  const float* xp = x_blocks.data();
  float* yp = y->typed_data();
  const int64_t step = std::max<int64_t>(1, panels_per_task);
  const int64_t tasks = (P + step - 1) / step;
  // Many columns (a prefill): chunks of columns whose x blocks stay in L2 while every panel
  // passes over them; the weights are then read once per chunk, which compute hides at that size.
  const int64_t chunk = std::max<int64_t>(kMaxCols, kChunkBytes / (K * int64_t(sizeof(float))) / kMaxCols * kMaxCols);
  for (int64_t c_begin = 0; c_begin < N; c_begin += chunk) {
    const int64_t c_end = std::min(N, c_begin + chunk);
    auto body = [&](int64_t t) {
      for (int64_t p = t * step; p < std::min(P, (t + 1) * step); ++p) Panel(wp, xp, yp, M, K, N, p, c_begin, c_end);
    };
    if (tasks == 1) {
      body(0);
    } else {
      ParallelFor(pool, tasks, body);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrexMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("panels_per_task"));
