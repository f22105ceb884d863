// Paged decode attention for XLA:CPU, registered through the XLA FFI.
//
// Reads each live page of the KV pool once per (row, KV head) and never materializes a dense
// per-row copy of the cache: for each page it scores the page's keys against every query head
// of the group (and every query token of the row), then folds the page into an online
// softmax (running max m, running sum l, running weighted sum acc). Rows x KV heads are split
// over XLA's intra-op thread pool.
//
// Operands (f32 / s32), shapes as in drex_jax/model/kernels/ffi.py:
//   q            [B, T, NH, D]   queries (RoPE applied)
//   k_pool       [L, KV, N, PS, D]
//   v_pool       [L, KV, N, PS, D]
//   k_new, v_new [B, T, KV, D]   the row's new tokens' keys and values (not yet in the pool)
//   block_tables [B, P]          page ids per row (entries past a row's pages are ignored)
//   positions    [B, T]          each query token's position (-1 = padding: output zeros); a
//                                row's new tokens sit at consecutive positions from positions[b, 0],
//                                the pool holds its positions below that, and a query attends to
//                                every pool key and to the new tokens up to its own position
// Attributes: layer (which layer of the pool), scale (1/sqrt(D)).
// Results: out [B, T, NH, D], then the pools (aliased to the operands) with the new tokens'
// keys and values written into layer `layer` at their positions: the kernel owns the write, so
// the step has no separate scatter per layer and XLA orders layers by data dependence alone.
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

// Online-softmax state of one (query token, query head): running max m, sum l, weighted sum acc.
struct Softmax {
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.f;
};

// Fold `n` keys (rows of `keys`, stride D) and their values into (state, acc) for query qv.
inline void Fold(const float* qv, const float* keys, const float* values, int64_t key_stride, int64_t n,
                 int64_t D, float scale, float* s, Softmax& st, float* acc) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const float* kv = keys + j * key_stride;
    float dot = 0.f;
    for (int64_t e = 0; e < D; ++e) dot += qv[e] * kv[e];
    s[j] = dot * scale;
    block_max = std::max(block_max, s[j]);
  }
  const float m_new = std::max(st.m, block_max);
  const float correction = std::exp(st.m - m_new);  // exp(-inf) = 0 on the first block
  float sum = st.l * correction;
  for (int64_t e = 0; e < D; ++e) acc[e] *= correction;
  for (int64_t j = 0; j < n; ++j) {
    const float w = std::exp(s[j] - m_new);
    sum += w;
    const float* vv = values + j * key_stride;
    for (int64_t e = 0; e < D; ++e) acc[e] += w * vv[e];
  }
  st.l = sum;
  st.m = m_new;
}

// One (row, KV head): all T query tokens x G query heads of the group. The row's keys are the
// pool's positions [0, positions[b, 0]) and its own new tokens (k_new, v_new), a query seeing
// the new tokens up to its own position.
void AttendRowHead(const Dims& d, int64_t b, int64_t h, int64_t layer, float scale, const float* q,
                   float* k_pool, float* v_pool, const float* k_new, const float* v_new,
                   const int32_t* block_tables, const int32_t* positions, float* out) {
  const int64_t TG = d.T * d.G;
  std::vector<Softmax> st(TG);
  std::vector<float> acc(TG * d.D, 0.f), s(std::max<int64_t>(d.PS, d.T));
  const int32_t first = positions[b * d.T];
  const int64_t cached = std::max<int32_t>(first, 0);  // positions already in the pool
  const int64_t pages = std::min<int64_t>((cached + d.PS - 1) / d.PS, d.P);
  for (int64_t p = 0; p < pages; ++p) {
    const int32_t page = block_tables[b * d.P + p];
    if (page < 0 || page >= d.N) continue;  // not a page of the pool: nothing to read
    const int64_t base = (((layer * d.KV + h) * d.N + page) * d.PS) * d.D;
    const int64_t ntok = std::min<int64_t>(d.PS, cached - p * d.PS);
    for (int64_t t = 0; t < d.T; ++t) {
      if (positions[b * d.T + t] < 0) continue;
      for (int64_t g = 0; g < d.G; ++g) {
        const int64_t r = t * d.G + g;
        Fold(q + ((b * d.T + t) * d.NH + h * d.G + g) * d.D, k_pool + base, v_pool + base, d.D, ntok, d.D,
             scale, s.data(), st[r], acc.data() + r * d.D);
      }
    }
  }
  // the row's new tokens: [T, KV, D] per row, so key t' of head h sits at stride KV * D
  const int64_t new_base = (b * d.T * d.KV + h) * d.D;
  for (int64_t t = 0; t < d.T; ++t) {
    const int32_t pos = positions[b * d.T + t];
    if (pos < 0) continue;
    int64_t visible = 0;  // new tokens at positions <= pos (they are consecutive from `first`)
    while (visible < d.T && positions[b * d.T + visible] >= 0 && positions[b * d.T + visible] <= pos) ++visible;
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t r = t * d.G + g;
      Fold(q + ((b * d.T + t) * d.NH + h * d.G + g) * d.D, k_new + new_base, v_new + new_base, d.KV * d.D,
           visible, d.D, scale, s.data(), st[r], acc.data() + r * d.D);
    }
  }
  // then write the row's new keys and values into its pages (this task owns row b, head h)
  for (int64_t t = 0; t < d.T; ++t) {
    const int32_t pos = positions[b * d.T + t];
    if (pos < 0 || pos / d.PS >= d.P) continue;
    const int32_t page = block_tables[b * d.P + pos / d.PS];
    if (page < 0 || page >= d.N) continue;
    const int64_t dst = ((((layer * d.KV + h) * d.N + page) * d.PS) + pos % d.PS) * d.D;
    const int64_t src = ((b * d.T + t) * d.KV + h) * d.D;
    std::copy(k_new + src, k_new + src + d.D, k_pool + dst);
    std::copy(v_new + src, v_new + src + d.D, v_pool + dst);
  }
  for (int64_t t = 0; t < d.T; ++t) {
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t r = t * d.G + g;
      float* o = out + ((b * d.T + t) * d.NH + h * d.G + g) * d.D;
      const float inv = st[r].l > 0.f ? 1.f / st[r].l : 0.f;
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
  auto work = [shared, n, &body]() {  // body is only called while the caller waits below
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) body(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared, work]() {
      shared->active.fetch_add(1);
      work();
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
                          ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                          ffi::Buffer<ffi::S32> block_tables,
                          ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> k_pool_out, ffi::ResultBuffer<ffi::F32> v_pool_out,
                          int64_t layer, float scale) {
  auto qd = q.dimensions();
  auto kd = k_pool.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || bd.size() != 2 || positions.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: expected q [B,T,NH,D], pools [L,KV,N,PS,D], "
                                       "block_tables [B,P], positions [B,T]");
  }
  Dims d{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[2], kd[3], bd[1], 0};
  auto nd = k_new.dimensions();
  if (nd.size() != 4 || nd[0] != d.B || nd[1] != d.T || nd[2] != d.KV || nd[3] != d.D ||
      v_new.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("paged_attention: expected k_new, v_new [B, T, KV, D]");
  }
  if (kd[4] != d.D || d.NH % d.KV != 0 || layer < 0 || layer >= d.L || bd[0] != d.B) {
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes or layer out of range");
  }
  d.G = d.NH / d.KV;
  const float* qp = q.typed_data();
  // the pools are aliased to k_pool_out / v_pool_out (XLA passes one buffer); copy otherwise
  float* kp = k_pool_out->typed_data();
  float* vp = v_pool_out->typed_data();
  if (kp != k_pool.typed_data()) std::copy(k_pool.typed_data(), k_pool.typed_data() + k_pool.element_count(), kp);
  if (vp != v_pool.typed_data()) std::copy(v_pool.typed_data(), v_pool.typed_data() + v_pool.element_count(), vp);
  const float* kn = k_new.typed_data();
  const float* vn = v_new.typed_data();
  const int32_t* bt = block_tables.typed_data();
  const int32_t* pos = positions.typed_data();
  float* op = out->typed_data();
  auto body = [&](int64_t task) {
    AttendRowHead(d, task / d.KV, task % d.KV, layer, scale, qp, kp, vp, kn, vn, bt, pos, op);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale"));
