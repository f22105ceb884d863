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
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

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

// Eight floats in one vector (GCC/Clang vector extensions: AVX2 registers where the CPU has them,
// split by the compiler where it does not).
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int64_t kExpLanes = 8;

// max(a, b) per lane, by the comparison mask (a vector ?: is GCC's, not every compiler's)
inline F8 Max8(F8 a, F8 b) {
  const I8 a_lower = a < b;  // all ones where a < b
  I8 ai, bi;
  __builtin_memcpy(&ai, &a, sizeof(ai));
  __builtin_memcpy(&bi, &b, sizeof(bi));
  const I8 out = (ai & ~a_lower) | (bi & a_lower);
  F8 r;
  __builtin_memcpy(&r, &out, sizeof(r));
  return r;
}

// exp(x) for x <= 0, eight at a time (std::exp one score at a time cost more than the dot products):
// x = n ln2 + r with |r| <= ln2 / 2, Cephes' expf polynomial for exp(r), times 2^n built in the
// exponent bits; relative error <= 3e-7 as built here (the flags let the compiler merge the two-part
// ln2). Below -87.3 it returns ~1e-38 instead of 0: a weight 38 orders under the block's largest.
inline F8 Exp8(F8 x) {
  x = Max8(x, F8{} - 87.3f);
  const F8 fx = x * 1.44269504088896341f + 0.5f;
  I8 n = __builtin_convertvector(fx, I8);  // truncates toward zero: floor for fx >= 0
  n = n - ((__builtin_convertvector(n, F8) > fx) & 1);  // ... and one lower where fx < 0
  const F8 nf = __builtin_convertvector(n, F8);
  const F8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  F8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I8 bits = (n + 127) << 23;
  F8 two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// n rounded up to whole vectors: the length of a head's score row in the scratch
inline int64_t PaddedLanes(int64_t n) { return (n + kExpLanes - 1) / kExpLanes * kExpLanes; }

inline F8 Load8(const float* p) {
  F8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum8(F8 v) {
#if defined(__clang__) || __GNUC__ >= 12
  const F8 h = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const F8 q = h + __builtin_shufflevector(h, h, 2, 3, 0, 1, 6, 7, 4, 5);
  return q[0] + q[1];
#else  // GCC < 12 has no __builtin_shufflevector
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}

// Scores -> weights for one head's block of n keys (sg[0, n_pad)): the running max and sum move on,
// the returned factor rescales the head's accumulated values.
inline float BlockWeights(float* sg, int64_t n, int64_t n_pad, Softmax& st) {
  float block_max = sg[0];
  for (int64_t j = 1; j < n; ++j) block_max = std::max(block_max, sg[j]);
  const float m_new = std::max(st.m, block_max);
  const float correction = std::exp(st.m - m_new);  // exp(-inf) = 0 on the first block
  for (int64_t j = n; j < n_pad; ++j) sg[j] = m_new;  // padding: finite, and not summed below
  for (int64_t j = 0; j < n_pad; j += kExpLanes) {
    F8 v = Exp8(Load8(sg + j) - m_new);
    __builtin_memcpy(sg + j, &v, sizeof(v));
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += sg[j];
  st.l = st.l * correction + sum;
  st.m = m_new;
  return correction;
}

// FoldGroup for D = 8 * DV: the dot products and the value sums unrolled over the head dimension,
// one head's weighted sum (up to 8 vectors) held in registers while the block's value rows pass.
template <int DV>
void FoldGroupFixed(const float* q, const float* keys, const float* values, int64_t stride, int64_t n,
                    int64_t G, float scale, float* s, Softmax* st, float* acc) {
  static_assert(DV % 2 == 0, "two dot accumulators");
  constexpr int64_t D = DV * kExpLanes;
  constexpr int kHalf = DV > 8 ? 8 : DV;
  const int64_t n_pad = PaddedLanes(n);
  for (int64_t j = 0; j < n; ++j) {
    const float* kv = keys + j * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qv = q + g * D;
      F8 x = {}, y = {};
#pragma GCC unroll 16
      for (int v = 0; v + 1 < DV; v += 2) {
        x += Load8(qv + v * kExpLanes) * Load8(kv + v * kExpLanes);
        y += Load8(qv + (v + 1) * kExpLanes) * Load8(kv + (v + 1) * kExpLanes);
      }
      s[g * n_pad + j] = Sum8(x + y) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n_pad;
    const float correction = BlockWeights(sg, n, n_pad, st[g]);
    float* ag = acc + g * D;
#pragma GCC unroll 2
    for (int v0 = 0; v0 < DV; v0 += kHalf) {
      F8 a[kHalf];
#pragma GCC unroll 8
      for (int c = 0; c < kHalf; ++c) a[c] = Load8(ag + (v0 + c) * kExpLanes) * correction;
      for (int64_t j = 0; j < n; ++j) {
        const float w = sg[j];
        const float* vv = values + j * stride + v0 * kExpLanes;
#pragma GCC unroll 8
        for (int c = 0; c < kHalf; ++c) a[c] += w * Load8(vv + c * kExpLanes);
      }
#pragma GCC unroll 8
      for (int c = 0; c < kHalf; ++c) __builtin_memcpy(ag + (v0 + c) * kExpLanes, &a[c], sizeof(F8));
    }
  }
}

// FoldGroup for any D: plain loops, which the compiler vectorizes.
inline void FoldGroupAny(const float* q, const float* keys, const float* values, int64_t stride, int64_t n,
                         int64_t D, int64_t G, float scale, float* s, Softmax* st, float* acc) {
  const int64_t n_pad = PaddedLanes(n);
  for (int64_t j = 0; j < n; ++j) {
    const float* kv = keys + j * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qv = q + g * D;
      float dot = 0.f;
      for (int64_t e = 0; e < D; ++e) dot += qv[e] * kv[e];
      s[g * n_pad + j] = dot * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float correction = BlockWeights(s + g * n_pad, n, n_pad, st[g]);
    float* ag = acc + g * D;
    for (int64_t e = 0; e < D; ++e) ag[e] *= correction;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* vv = values + j * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float w = s[g * n_pad + j];
      float* ag = acc + g * D;
      for (int64_t e = 0; e < D; ++e) ag[e] += w * vv[e];
    }
  }
}

// Fold keys [0, n) (rows of `keys` and `values`, `stride` floats apart) into the running softmax
// of the G query heads `q` [G, D] of one query token: each key and value row is read from memory
// once for the whole group (the heads of a KV head sit next to each other in q). `s` is scratch of
// G x n_pad floats (n_pad = n rounded up to 8). The usual head sizes take an unrolled path.
inline void FoldGroup(const float* q, const float* keys, const float* values, int64_t stride, int64_t n,
                      int64_t D, int64_t G, float scale, float* s, Softmax* st, float* acc) {
  if (n <= 0) return;
  switch (D) {
    case 64: return FoldGroupFixed<8>(q, keys, values, stride, n, G, scale, s, st, acc);
    case 128: return FoldGroupFixed<16>(q, keys, values, stride, n, G, scale, s, st, acc);
    case 32: return FoldGroupFixed<4>(q, keys, values, stride, n, G, scale, s, st, acc);
    case 16: return FoldGroupFixed<2>(q, keys, values, stride, n, G, scale, s, st, acc);
    default: return FoldGroupAny(q, keys, values, stride, n, D, G, scale, s, st, acc);
  }
}

// One (row, KV head): all T query tokens x G query heads of the group. The row's keys are the
// pool's positions [0, positions[b, 0]) and its own new tokens (k_new, v_new), a query seeing
// the new tokens up to its own position.
void AttendRowHead(const Dims& d, int64_t b, int64_t h, int64_t layer, float scale, const float* q,
                   float* k_pool, float* v_pool, const float* k_new, const float* v_new,
                   const int32_t* block_tables, const int32_t* positions, float* out) {
  const int64_t TG = d.T * d.G;
  const int64_t n_pad = PaddedLanes(std::max<int64_t>(d.PS, d.T));
  // per-thread scratch, grown to the largest call seen: no allocation per task in steady state
  thread_local std::vector<Softmax> st;
  thread_local std::vector<float> acc, s;
  st.assign(TG, Softmax{});
  acc.assign(TG * d.D, 0.f);
  s.resize(d.G * n_pad);
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
      const int64_t r = t * d.G;
      FoldGroup(q + ((b * d.T + t) * d.NH + h * d.G) * d.D, k_pool + base, v_pool + base, d.D, ntok, d.D, d.G,
                scale, s.data(), st.data() + r, acc.data() + r * d.D);
    }
  }
  // the row's new tokens: [T, KV, D] per row, so key t' of head h sits at stride KV * D
  const int64_t new_base = (b * d.T * d.KV + h) * d.D;
  for (int64_t t = 0; t < d.T; ++t) {
    const int32_t pos = positions[b * d.T + t];
    if (pos < 0) continue;
    int64_t visible = 0;  // new tokens at positions <= pos (they are consecutive from `first`)
    while (visible < d.T && positions[b * d.T + visible] >= 0 && positions[b * d.T + visible] <= pos) ++visible;
    const int64_t r = t * d.G;
    FoldGroup(q + ((b * d.T + t) * d.NH + h * d.G) * d.D, k_new + new_base, v_new + new_base, d.KV * d.D,
              visible, d.D, d.G, scale, s.data(), st.data() + r, acc.data() + r * d.D);
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
  drex::ParallelFor(pool, d.B * d.KV, body);
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
