// Paged decode attention for XLA:CPU, registered through the XLA FFI.
//
// Reads each live page of the KV pool once per (row, KV head) and never materializes a dense
// per-row copy of the cache: for each page it scores the page's keys against every query head
// of the group (and every query token of the row), then folds the page into an online
// softmax (running max m, running sum l, running weighted sum acc). Rows x KV heads are split
// over XLA's intra-op thread pool.
//
// Operands (f32 / s32), shapes as in drex_jax/kernels/ffi.py:
//   q            [B, T, NH, D]   queries (RoPE applied)
//   k_pool       [L, KV, N, PS, D]
//   v_pool       [L, KV, N, PS, D]
//   block_tables [B, P]          page ids per row (entries past a row's pages are ignored)
//   positions    [B, T]          each query token's position (-1 = padding: output zeros);
//                                a query attends to the row's keys at positions <= its own
// Attributes: layer (which layer of the pool), scale (1/sqrt(D)).
// Result: out [B, T, NH, D].
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t B, T, NH, D, L, KV, N, PS, P, G;
};

// One (row, KV head): all T query tokens x G query heads of the group.
void AttendRowHead(const Dims& d, int64_t b, int64_t h, int64_t layer, float scale, const float* q,
                   const float* k_pool, const float* v_pool, const int32_t* block_tables,
                   const int32_t* positions, float* out) {
  const int64_t TG = d.T * d.G;
  std::vector<float> m(TG, -std::numeric_limits<float>::infinity()), l(TG, 0.f), acc(TG * d.D, 0.f);
  std::vector<float> s(d.PS);
  int32_t max_pos = -1;
  for (int64_t t = 0; t < d.T; ++t) max_pos = std::max(max_pos, positions[b * d.T + t]);
  const int64_t pages = max_pos < 0 ? 0 : std::min<int64_t>(max_pos / d.PS + 1, d.P);
  for (int64_t p = 0; p < pages; ++p) {
    const int32_t page = block_tables[b * d.P + p];
    if (page < 0 || page >= d.N) continue;  // not a page of the pool: nothing to read
    const int64_t base = (((layer * d.KV + h) * d.N + page) * d.PS) * d.D;
    const float* kp = k_pool + base;
    const float* vp = v_pool + base;
    const int64_t first = p * d.PS;
    const int64_t ntok = std::min<int64_t>(d.PS, max_pos + 1 - first);
    for (int64_t t = 0; t < d.T; ++t) {
      const int32_t pos = positions[b * d.T + t];
      const int64_t live = std::min<int64_t>(ntok, pos + 1 - first);  // keys this query may see
      if (live <= 0) continue;
      for (int64_t g = 0; g < d.G; ++g) {
        const float* qv = q + ((b * d.T + t) * d.NH + h * d.G + g) * d.D;
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < live; ++j) {
          const float* kv = kp + j * d.D;
          float dot = 0.f;
          for (int64_t e = 0; e < d.D; ++e) dot += qv[e] * kv[e];
          s[j] = dot * scale;
          block_max = std::max(block_max, s[j]);
        }
        const int64_t r = t * d.G + g;
        const float m_new = std::max(m[r], block_max);
        const float correction = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first page
        float* a = acc.data() + r * d.D;
        float sum = l[r] * correction;
        for (int64_t e = 0; e < d.D; ++e) a[e] *= correction;
        for (int64_t j = 0; j < live; ++j) {
          const float w = std::exp(s[j] - m_new);
          sum += w;
          const float* vv = vp + j * d.D;
          for (int64_t e = 0; e < d.D; ++e) a[e] += w * vv[e];
        }
        l[r] = sum;
        m[r] = m_new;
      }
    }
  }
  for (int64_t t = 0; t < d.T; ++t) {
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t r = t * d.G + g;
      float* o = out + ((b * d.T + t) * d.NH + h * d.G + g) * d.D;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t e = 0; e < d.D; ++e) o[e] = acc[r * d.D + e] * inv;
    }
  }
}

// Tasks are claimed from a shared counter by the caller and by helpers on the thread pool; the
// caller waits only for helpers that claimed work, so a busy (or one-thread) pool cannot
// deadlock it. Helpers that start late find no work and touch only the shared state.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F&& body) {
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) body(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared, n, body_ptr = &body]() {
      shared->active.fetch_add(1);
      for (int64_t i; (i = shared->next.fetch_add(1)) < n;) (*body_ptr)(i);
      if (shared->active.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    });
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->active.load() == 0; });
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pool,
                          ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> block_tables,
                          ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out, int64_t layer,
                          float scale) {
  auto qd = q.dimensions();
  auto kd = k_pool.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || bd.size() != 2 || positions.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: expected q [B,T,NH,D], pools [L,KV,N,PS,D], "
                                       "block_tables [B,P], positions [B,T]");
  }
  Dims d{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[2], kd[3], bd[1], 0};
  if (kd[4] != d.D || d.NH % d.KV != 0 || layer < 0 || layer >= d.L || bd[0] != d.B) {
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes or layer out of range");
  }
  d.G = d.NH / d.KV;
  const float* qp = q.typed_data();
  const float* kp = k_pool.typed_data();
  const float* vp = v_pool.typed_data();
  const int32_t* bt = block_tables.typed_data();
  const int32_t* pos = positions.typed_data();
  float* op = out->typed_data();
  auto body = [&](int64_t task) {
    AttendRowHead(d, task / d.KV, task % d.KV, layer, scale, qp, kp, vp, bt, pos, op);
  };
  ParallelFor(pool, d.B * d.KV, body);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrexPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale"));
