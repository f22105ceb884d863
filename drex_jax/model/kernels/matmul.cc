// Weight-left projection for XLA:CPU through the XLA FFI: y [M, N] = w [M, K] @ x [K, N]
// (f32; N = the tokens of a step, 1-64 where serving lives), with w packed once at load time.
//
// Decode of a few tokens is bound by reading w. XLA:CPU's dot runs N = 1 as a matrix-vector
// product near the memory bandwidth but N = 2-8 through a GEMM library at ~1.5x that cost, and
// is flat from 17 to 64 columns. This kernel streams w from memory once per call whatever N is.
// w is packed in panels of 32 rows, `packed [P, K, 32]` with packed[p, k, i] = w[32 p + i, k]
// (rows past M zero), so a panel is one contiguous stream; the panel's rows x a block of columns
// of y live in vector accumulators while k runs (a broadcast of x[k, j] times the panel's row
// vectors), so no horizontal sums. AVX-512 holds 32 rows x 12 columns; AVX2 holds 32 rows x 3, so
// wider blocks take several passes over K-chunks that the first pass left in L1.
// Later column blocks re-read the panel from L2. Panels are tasks on XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <xmmintrin.h>  // _mm_prefetch

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;    // rows per panel: two AVX-512 vectors, four AVX2 ones
constexpr int kMaxCols = 12;  // columns per x block
constexpr int64_t kChunkBytes = 256 * 1024;  // x columns per pass over the panels: half an L2
constexpr int kPrefetch = 1024;  // floats ahead (4 KB): keeps the stream in flight while we compute
// DREX_MATMUL_LANES16 / DREX_MATMUL_LANES8 build the 16- / 8-lane path on any CPU (the compiler splits
// or narrows the vectors): how the tests check both paths whatever the machine has
#if (defined(__AVX512F__) || defined(DREX_MATMUL_LANES16)) && !defined(DREX_MATMUL_LANES8)
#define DREX_WIDE 1
constexpr int kLanes = 16;  // 32 registers: a panel's 32 rows (2 vectors) x 12 columns in one pass
#else
#define DREX_WIDE 0
constexpr int kLanes = 8;  // AVX2's 16 registers: 32 rows (4 vectors) x 3 columns
constexpr int kChunkK = 32;  // k rows of a panel (4 KB) that every pass uses while they are in L1
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));  // unaligned loads ok

// The most columns one pass holds in registers beside a broadcast (AVX2: 3 x 4 vectors, the weights
// then read as FMA memory operands).
constexpr int kMaxPassCols = kLanes == 16 ? kMaxCols : 3;
constexpr int kVecs = kPanel / kLanes;  // vectors per panel row: 2 (AVX-512) or 4 (AVX2)

// tile[j][i] (+)= sum over k in [k0, k1) of panel[k][i] * xb[k][j] for the panel's 32 rows and C
// columns; `first` starts from zero instead of the tile. U independent accumulator sets over k hide
// the FMA latency when kVecs * C is small.
template <int C, int U, bool Prefetch>
void Micro(const float* panel, const float* xb, float* tile, int64_t k0, int64_t k1, bool first) {
  Vec acc[U][kVecs][C];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v)
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j)
        acc[u][v][j] = u == 0 && !first ? *reinterpret_cast<const Vec*>(tile + j * kPanel + v * kLanes) : Vec{};
  auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
    const float* w = panel + k * kPanel;
    Vec wv[kVecs];
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) wv[v] = *reinterpret_cast<const Vec*>(w + v * kLanes);
#pragma GCC unroll 4
    for (int line = 0; Prefetch && line < kVecs * kLanes; line += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + line), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const float xs = xb[k * kMaxCols + j];
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) acc[u][v][j] += wv[v] * xs;
    }
  };
  int64_t k = k0;
  for (; k + U <= k1; k += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) step(k + u, u);
  }
  for (; k < k1; ++k) step(k, 0);
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) {
      Vec a = acc[0][v][j];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) a += acc[u][v][j];
      *reinterpret_cast<Vec*>(tile + j * kPanel + v * kLanes) = a;
    }
  }
}

// Micro for 1 <= c <= kMaxPassCols columns, c known only at run time.
template <bool Prefetch, int C = 1>
void Pass(const float* panel, const float* xb, float* tile, int64_t k0, int64_t k1, bool first,
          int64_t c) {
  if constexpr (C < kMaxPassCols) {
    if (c > C) return Pass<Prefetch, C + 1>(panel, xb, tile, k0, k1, first, c);
  }
  Micro<C, (kVecs * C >= 8 ? 1 : kVecs * C >= 4 ? 2 : 4), Prefetch>(panel, xb, tile, k0, k1, first);
}

// y[r0 + i, c0 + j] for a panel's rows and cols <= 12 columns of the x block `xb` [K, 12].
void Block(const float* panel, const float* xb, float* y, int64_t M, int64_t K, int64_t N, int64_t r0, int64_t c0,
           int64_t cols) {
  alignas(64) float tile[kMaxCols * kPanel];  // [column][row]
#if DREX_WIDE
  Pass<true>(panel, xb, tile, 0, K, true, cols);
#else
  if (cols <= kMaxPassCols) {
    // one pass streams the panel: on the AMD EPYC measured, software prefetch only slowed it
    // (qkv at one column 0.147 vs 0.207 ms; the hardware prefetcher follows the stream)
    Pass<false>(panel, xb, tile, 0, K, true, cols);
  } else {
    // more columns than the registers hold: passes of <= 3 columns, interleaved per kChunkK k
    // rows so that the panel streams from memory once, continuously (prefetched one chunk =
    // 4 KB ahead: 12 columns of qkv 0.164 ms with it, 0.213 without), while the other passes
    // read the chunk from L1. Passes over 16-row halves x 6 columns were no faster.
    const int64_t groups = (cols + kMaxPassCols - 1) / kMaxPassCols;
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t k1 = std::min<int64_t>(K, k0 + kChunkK);
      for (int64_t g = 0, j = 0; g < groups; ++g) {
        const int64_t c = (cols - j) / (groups - g);  // balanced: 8 columns as 3 + 3 + 2
        Pass<true>(panel, xb + j, tile + j * kPanel, k0, k1, k0 == 0, c);
        j += c;
      }
    }
  }
#endif
  const int64_t rows = std::min<int64_t>(kPanel, M - r0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) y[(r0 + i) * N + c0 + j] = tile[j * kPanel + i];
  }
}

// Columns [c_begin, c_end) of panel p's rows; x_blocks [ceil(N / 12), K, 12]: x's columns in
// blocks of 12, each block's K rows contiguous.
void Panel(const float* packed, const float* x_blocks, float* y, int64_t M, int64_t K, int64_t N, int64_t p,
           int64_t c_begin, int64_t c_end) {
  const float* panel = packed + p * K * kPanel;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kMaxCols) {
    Block(panel, x_blocks + (c0 / kMaxCols) * K * kMaxCols, y, M, K, N, p * kPanel, c0,
          std::min<int64_t>(kMaxCols, c_end - c0));
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
  if (K == 0) {  // an empty sum: the passes below would leave the tile unwritten
    std::fill(y->typed_data(), y->typed_data() + M * N, 0.f);
    return ffi::Error::Success();
  }
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
      drex::ParallelFor(pool, tasks, body);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// The vector width this library was built for (tests check that a DREX_MATMUL_LANES* define took).
extern "C" int DrexMatmulLanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrexMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("panels_per_task"));
