// Arithmetic of the local-linear-attention decode kernel, shared by the CUDA kernel
// (lla_decode.cu) and the host-only check library (host_check.cpp) that the tests compile with g++
// and compare against the float64 reference: everything here is __host__ __device__.
//
// One thread block of kThreads threads per (sequence b, query head h) runs a fixed sequence of
// steps over the block's shared memory (Shared), each step a function of the thread index `tid`
// with a block barrier between steps; the host check calls each step for every tid in turn where
// the kernel's threads run it at once, so both walk the same arithmetic in the same order per value.
// With n = cache_seqlens[b] keys k_j, values v_j (kv head h / rep) and query q:
//
//   pass 1 (stats)  tiles of kTileKeys keys: scores s_j = scale q.k_j (lane j of warp 0), online
//                   softmax max/omega (every thread, identical), kbar_d = sum_j p_j k_jd (thread d);
//   pass 2 (cov)    C = sum_j p_j (k_j - kbar)(k_j - kbar)^T: the keys of a tile are centred in
//                   shared memory, then thread (ty, tx) of a 16 x 16 grid accumulates the entries
//                   (ty + 16 i, tx + 16 c), c <= i < S (the lower triangle and a little more), in
//                   fp32 registers over the keys in order;
//   solve           C + lambda I into a packed float64 lower triangle, right-looking Cholesky (a
//                   column, then the trailing update, per step), forward and backward substitution
//                   for eta = (C + lambda I)^-1 (q - kbar);
//   pass 3 (output) o = sum_j p_j (1 + d_j - dbar) v_j / sum_j p_j with d_j = eta.(k_j - kbar) and
//                   dbar = sum_j p_j d_j / sum_j p_j, 0 in exact arithmetic but removed (as the
//                   Triton decode does):
//                   the rounding of kbar shifts every d_j by one amount, which eta (large along
//                   directions the keys barely span) makes large. p_j and d_j by lane j of warp 0,
//                   the sums over keys by thread d.
//
// Precision: loads, scores, softmax, kbar, C and the output in fp32 (as the Triton decode); the
// factorisation and the solves in float64, from the fp32 C (as the Triton decode's torch solve).
// Centring before the products keeps C accurate relative to itself. A pivot that is not > 0
// (C + lambda I not numerically positive definite; or no key, n = 0) becomes NaN, which reaches
// every eta and so every output of that head: the caller sees NaN, without a host synchronisation.
//
// Layouts (element strides; the head dim has unit stride): q (B, Hq, D), k/v (B, T_max, Hkv, D),
// cache_seqlens (B,) int32, ridge (Hq,) fp32, out (B, Hq, D).
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common/element.h"

namespace pyfastrl {
namespace lla_decode {

constexpr int kThreads = 256;
constexpr int kGrid = 16;       // the covariance tile grid: kGrid x kGrid = kThreads threads
constexpr int kTileKeys = 32;   // keys per tile: one per lane of warp 0
constexpr int kMaxHeadDim = 128;
static_assert(kGrid * kGrid == kThreads, "one covariance tile per thread");
static_assert(kMaxHeadDim <= kThreads, "one head-dim element per thread in the key sums");

// Loops the kernel keeps rolled, or unrolled only so far: fully unrolled, they took up to 126 of the
// 128 registers a thread that two blocks an SM leave (lla_decode.cu), against at most 112 so (nvcc 13.0).
#if defined(__CUDACC__)
#define PFRL_LLA_UNROLL_1 _Pragma("unroll 1")
#define PFRL_LLA_UNROLL_4 _Pragma("unroll 4")
#else
#define PFRL_LLA_UNROLL_1
#define PFRL_LLA_UNROLL_4
#endif

// Covariance slots per thread and dimension: head dims up to 16 S are padded to 16 S.
PFRL_HD int slots_for(int64_t head_dim) { return head_dim <= 32 ? 2 : head_dim <= 64 ? 4 : 8; }

template <typename T>
struct DecodeArgs {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* seqlens;
  const float* ridge;
  T* out;
  int64_t num_heads, rep, max_tokens, head_dim;
  int64_t stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ob,
      stride_oh;
  float scale;
};

// What a block works on: its query row, cache rows (kv head h / rep), output row, length and lambda.
template <typename T>
struct Head {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  int64_t length;  // cache_seqlens[b] clamped to 0..T_max (outside 1..T_max is the caller's error)
  float ridge;
};

template <typename T>
PFRL_HD Head<T> head_of(const DecodeArgs<T>& a, int64_t block) {
  const int64_t b = block / a.num_heads;
  const int64_t h = block - b * a.num_heads;
  const int64_t kv = h / a.rep;
  int64_t length = a.seqlens[b];
  length = length < 0 ? 0 : length > a.max_tokens ? a.max_tokens : length;
  return Head<T>{a.q + b * a.stride_qb + h * a.stride_qh, a.k + b * a.stride_kb + kv * a.stride_kh,
                 a.v + b * a.stride_vb + kv * a.stride_vh, a.out + b * a.stride_ob + h * a.stride_oh, length,
                 a.ridge[h]};
}

// The block's shared memory. `keys`/`values` (tiles of kTileKeys rows of P + 1 floats: an odd row
// stride, so lane j of warp 0 reading row j hits bank (j + d) mod 32, no conflict) are dead once
// pass 2 has accumulated C; the float64 factor and the solve's vectors reuse their bytes, and pass 3
// loads its tiles after the solve.
struct Shared {
  float* keys;     // (kTileKeys, P + 1)
  float* values;   // (kTileKeys, P + 1)
  double* factor;  // C + lambda I, then its Cholesky factor: packed lower triangle, D (D + 1) / 2
  double* rhs;     // (D) q - kbar, reduced by the forward substitution
  double* lower;   // (D) L^-1 (q - kbar), reduced by the backward substitution
  float* q;        // (D)
  float* kbar;     // (D)
  float* eta;      // (D)
  float* weights;  // (kTileKeys) scores, then probabilities of the tile's keys
  float* slopes;   // (kTileKeys) d_j = eta.(k_j - kbar) of the tile's keys
};

PFRL_HD int64_t tile_floats(int padded) { return 2 * kTileKeys * (padded + 1); }
PFRL_HD int64_t packed_size(int64_t head_dim) { return head_dim * (head_dim + 1) / 2; }
PFRL_HD int packed_index(int row, int col) { return row * (row + 1) / 2 + col; }  // col <= row

// Bytes of the union of the tiles and the solve's float64 arrays (a multiple of 8).
PFRL_HD int64_t union_bytes(int64_t head_dim, int padded) {
  const int64_t tiles = 4 * tile_floats(padded);
  const int64_t solve = 8 * (packed_size(head_dim) + 2 * head_dim);
  return tiles > solve ? tiles : solve;
}

// Dynamic shared memory of a block (69,888 bytes at D = 128).
PFRL_HD int64_t shared_bytes(int64_t head_dim) {
  const int padded = 16 * slots_for(head_dim);
  return union_bytes(head_dim, padded) + 4 * (3 * head_dim + 2 * kTileKeys);
}

// `base` 8-byte aligned (the float64 arrays come first).
PFRL_HD Shared carve(void* base, int64_t head_dim, int padded) {
  Shared s;
  s.keys = static_cast<float*>(base);
  s.values = s.keys + kTileKeys * (padded + 1);
  s.factor = static_cast<double*>(base);
  s.rhs = s.factor + packed_size(head_dim);
  s.lower = s.rhs + head_dim;
  s.q = reinterpret_cast<float*>(static_cast<char*>(base) + union_bytes(head_dim, padded));
  s.kbar = s.q + head_dim;
  s.eta = s.kbar + head_dim;
  s.weights = s.eta + head_dim;
  s.slopes = s.weights + kTileKeys;
  return s;
}

// -- per-key arithmetic --------------------------------------------------------------------------------

struct Softmax {
  float max;    // running max of the scores
  float omega;  // sum_j exp(s_j - max)
};

PFRL_HD Softmax empty_softmax() { return Softmax{-INFINITY, 0.0f}; }

PFRL_HD float dot(const float* x, const float* y, int n) {
  float sum = 0.0f;
  for (int d = 0; d < n; ++d) sum += x[d] * y[d];
  return sum;
}

// Fold a tile's scores into the running softmax; returns the factor exp(old max - new max) that
// rescales everything accumulated with the old max (0 on the first tile).
PFRL_HD float softmax_tile(Softmax& s, const float* scores, int count) {
  float top = s.max;
  for (int j = 0; j < count; ++j) top = scores[j] > top ? scores[j] : top;
  const float rescale = expf(s.max - top);
  float sum = 0.0f;
  for (int j = 0; j < count; ++j) sum += expf(scores[j] - top);
  s.omega = s.omega * rescale + sum;
  s.max = top;
  return rescale;
}

// p_j once the softmax has seen every key.
PFRL_HD float probability(float score, const Softmax& s) { return expf(score - s.max) / s.omega; }

// d_j = eta.(k_j - kbar), centred term by term.
PFRL_HD float slope(const float* eta, const float* key, const float* kbar, int head_dim) {
  float sum = 0.0f;
  for (int d = 0; d < head_dim; ++d) sum += eta[d] * (key[d] - kbar[d]);
  return sum;
}

// Pass 3's sums over the keys: sum_j p_j, sum_j p_j d_j (identical in every thread), and thread
// d's sum_j p_j v_jd, sum_j p_j d_j v_jd.
struct OutputSums {
  float p, pd, pv, pdv;
};

// o_d = vbar_d + (sum_j p_j d_j v_jd) / sum_j p_j - dbar vbar_d, with vbar = sum_j p_j v_j / sum_j p_j
// and dbar = sum_j p_j d_j / sum_j p_j.
PFRL_HD float output_value(const OutputSums& sums) {
  const float vbar = sums.pv / sums.p;
  return vbar + sums.pdv / sums.p - (sums.pd / sums.p) * vbar;
}

// Square root of a Cholesky pivot; NaN unless the pivot is > 0 (see the header comment).
PFRL_HD double pivot_root(double pivot) { return pivot > 0.0 ? sqrt(pivot) : NAN; }

// -- the block's steps (barrier after each) --------------------------------------------------------------

// q (fp32) into shared memory.
template <typename T>
PFRL_HD void load_query(const Head<T>& head, const Shared& s, int head_dim, int tid) {
  if (tid < head_dim) s.q[tid] = to_float(head.q[tid]);
}

// Rows t0 .. t0 + count - 1 of one head's cache into a tile (fp32), zero past count and D.
template <typename T, int P>
PFRL_HD void load_tile(const T* rows, int64_t stride_t, int64_t t0, int count, int head_dim, float* tile,
                       int tid) {
PFRL_LLA_UNROLL_4
  for (int i = tid; i < kTileKeys * P; i += kThreads) {
    const int j = i / P;
    const int d = i - j * P;
    tile[j * (P + 1) + d] = j < count && d < head_dim ? to_float(rows[(t0 + j) * stride_t + d]) : 0.0f;
  }
}

// Lane j of warp 0 (tid < kTileKeys): the scaled score of key j of the tile.
template <int P>
PFRL_HD void store_score(const Shared& s, int count, int head_dim, float scale, int tid) {
  if (tid < count) s.weights[tid] = scale * dot(s.q, s.keys + tid * (P + 1), head_dim);
}

// Pass 1: every thread folds the tile into its copy of the softmax; thread d < D its kbar sum.
template <int P>
PFRL_HD void stats_tile(Softmax& softmax, float& key_sum, const Shared& s, int count, int head_dim, int tid) {
  const float rescale = softmax_tile(softmax, s.weights, count);
  if (tid >= head_dim) return;
  float sum = key_sum * rescale;
  for (int j = 0; j < count; ++j) sum += expf(s.weights[j] - softmax.max) * s.keys[j * (P + 1) + tid];
  key_sum = sum;
}

PFRL_HD void finish_kbar(const Softmax& softmax, float key_sum, const Shared& s, int head_dim, int tid) {
  if (tid < head_dim) s.kbar[tid] = key_sum / softmax.omega;
}

// Lane j of warp 0: p_j of the tile's key j (0 past count).
template <int P>
PFRL_HD void store_probability(const Shared& s, const Softmax& softmax, int count, int head_dim, float scale,
                               int tid) {
  if (tid < kTileKeys)
    s.weights[tid] = tid < count ? probability(scale * dot(s.q, s.keys + tid * (P + 1), head_dim), softmax) : 0.0f;
}

// k_j - kbar in place for the tile's keys.
template <int P>
PFRL_HD void centre_tile(const Shared& s, int count, int head_dim, int tid) {
  for (int i = tid; i < kTileKeys * P; i += kThreads) {
    const int j = i / P;
    const int d = i - j * P;
    if (j < count && d < head_dim) s.keys[j * (P + 1) + d] -= s.kbar[d];
  }
}

// Pass 2: thread (ty, tx) = (tid / 16, tid % 16) adds p_j c_j c_j^T over the tile's keys, in key
// order, to its entries (ty + 16 i, tx + 16 c) of C. Only c <= i: the others (i < c) lie above the
// diagonal (ty + 16 i < 16 (i + 1) <= tx + 16 c), and C is symmetric; the untouched half of the
// array takes no registers once the loops are unrolled.
template <int S>
struct CovarianceTile {
  float entry[S][S];  // [i][c], c <= i
};

template <int S>
PFRL_HD void covariance_tile(CovarianceTile<S>& acc, const Shared& s, int count, int tid) {
  constexpr int P = 16 * S;
  const int ty = tid / kGrid;
  const int tx = tid - ty * kGrid;
PFRL_LLA_UNROLL_1
  for (int j = 0; j < count; ++j) {
    const float* centred = s.keys + j * (P + 1);
    float row[S];
    float col[S];
PFRL_UNROLL
    for (int i = 0; i < S; ++i) {
      row[i] = s.weights[j] * centred[ty + kGrid * i];
      col[i] = centred[tx + kGrid * i];
    }
PFRL_UNROLL
    for (int i = 0; i < S; ++i)
PFRL_UNROLL
      for (int c = 0; c <= i; ++c) acc.entry[i][c] += row[i] * col[c];
  }
}

// The lower triangle of C + lambda I (float64) into the factor; rhs = q - kbar. Slot (i, c < i)
// lies below the diagonal; slot (i, i) is on or below it where tx <= ty.
template <int S>
PFRL_HD void store_ridge_matrix(const CovarianceTile<S>& acc, const Shared& s, int head_dim, float ridge, int tid) {
  const int ty = tid / kGrid;
  const int tx = tid - ty * kGrid;
PFRL_UNROLL
  for (int i = 0; i < S; ++i) {
    const int row = ty + kGrid * i;
    if (row >= head_dim) break;
    double* factor_row = s.factor + packed_index(row, 0);
PFRL_UNROLL
    for (int c = 0; c < i; ++c) factor_row[tx + kGrid * c] = acc.entry[i][c];
    if (tx <= ty) factor_row[tx + kGrid * i] = static_cast<double>(acc.entry[i][i]) + (tx == ty ? ridge : 0.0);
  }
  if (tid < head_dim) s.rhs[tid] = static_cast<double>(s.q[tid]) - static_cast<double>(s.kbar[tid]);
}

// Cholesky step k, part 1: column k below the diagonal, L_ik = A_ik / sqrt(A_kk).
PFRL_HD void cholesky_column(const Shared& s, int k, int head_dim, int tid) {
  const double root = pivot_root(s.factor[packed_index(k, k)]);
  for (int i = k + 1 + tid; i < head_dim; i += kThreads) s.factor[packed_index(i, k)] /= root;
}

// Cholesky step k, part 2: A_ij -= L_ik L_jk for k < j <= i, and L_kk stored (no one reads it here).
PFRL_HD void cholesky_update(const Shared& s, int k, int head_dim, int tid) {
  const int m = head_dim - k - 1;
  for (int t = tid; t < m * m; t += kThreads) {
    const int i = k + 1 + t / m;
    const int j = k + 1 + t % m;
    if (j <= i) s.factor[packed_index(i, j)] -= s.factor[packed_index(i, k)] * s.factor[packed_index(j, k)];
  }
  if (tid == 0) s.factor[packed_index(k, k)] = pivot_root(s.factor[packed_index(k, k)]);
}

// Forward substitution step k (L y = rhs): y_k final; rhs_i -= L_ik y_k below it.
PFRL_HD void forward_step(const Shared& s, int k, int head_dim, int tid) {
  const double y = s.rhs[k] / s.factor[packed_index(k, k)];
  if (tid == k) s.lower[k] = y;
  for (int i = k + 1 + tid; i < head_dim; i += kThreads) s.rhs[i] -= s.factor[packed_index(i, k)] * y;
}

// Backward substitution step k = D-1 .. 0 (L^T eta = y): eta_k final; y_i -= L_ki eta_k above it.
PFRL_HD void backward_step(const Shared& s, int k, int tid) {
  const double x = s.lower[k] / s.factor[packed_index(k, k)];
  if (tid == k) s.eta[k] = static_cast<float>(x);
  for (int i = tid; i < k; i += kThreads) s.lower[i] -= s.factor[packed_index(k, i)] * x;
}

// Pass 3, lane j of warp 0: p_j and d_j of the tile's key j (0 past count).
template <int P>
PFRL_HD void store_output_weights(const Shared& s, const Softmax& softmax, int count, int head_dim, float scale,
                                  int tid) {
  if (tid >= kTileKeys) return;
  float p = 0.0f;
  float d = 0.0f;
  if (tid < count) {
    const float* key = s.keys + tid * (P + 1);
    p = probability(scale * dot(s.q, key, head_dim), softmax);
    d = slope(s.eta, key, s.kbar, head_dim);
  }
  s.weights[tid] = p;
  s.slopes[tid] = d;
}

// Pass 3: the tile's keys into the sums, in key order (thread d < D: its value sums too).
template <int P>
PFRL_HD void output_tile(OutputSums& sums, const Shared& s, int count, int head_dim, int tid) {
  OutputSums next = sums;
  for (int j = 0; j < count; ++j) {
    const float p = s.weights[j];
    const float pd = p * s.slopes[j];
    next.p += p;
    next.pd += pd;
    if (tid < head_dim) {
      const float value = s.values[j * (P + 1) + tid];
      next.pv += p * value;
      next.pdv += pd * value;
    }
  }
  sums = next;
}

template <typename T>
PFRL_HD void store_output(const Head<T>& head, const OutputSums& sums, int head_dim, int tid) {
  if (tid < head_dim) head.out[tid] = from_float<T>(output_value(sums));
}

PFRL_HD int tile_count(int64_t length, int64_t t0) {
  return length - t0 < kTileKeys ? static_cast<int>(length - t0) : kTileKeys;
}

// What each thread keeps in registers across steps.
template <int S>
struct ThreadState {
  Softmax softmax;        // identical in every thread
  float key_sum;          // thread d < D: sum_j exp(s_j - max) k_jd
  CovarianceTile<S> cov;  // thread (ty, tx): its entries of C
  OutputSums out;         // pass 3's sums
};

// The block's program for one (sequence, head): `block.step(f)` runs f(tid, state of thread tid)
// for every thread and then a barrier (the kernel: each thread its own, then __syncthreads(); the
// host check: every tid in turn). Every loop bound is the same for all threads.
template <typename T, int S, typename Block>
PFRL_HD void decode_block(const DecodeArgs<T>& a, int64_t block_index, void* shared, Block& block) {
  constexpr int P = 16 * S;
  using State = ThreadState<S>;
  const int dim = static_cast<int>(a.head_dim);  // <= kMaxHeadDim
  const float scale = a.scale;
  const Head<T> head = head_of(a, block_index);
  const Shared s = carve(shared, dim, P);
  block.step([&](int tid, State& t) {
    t = State{};
    t.softmax = empty_softmax();
    load_query(head, s, dim, tid);
  });
  // Pass 1: softmax and kbar.
  for (int64_t t0 = 0; t0 < head.length; t0 += kTileKeys) {
    const int count = tile_count(head.length, t0);
    block.step([&](int tid, State&) { load_tile<T, P>(head.k, a.stride_kt, t0, count, dim, s.keys, tid); });
    block.step([&](int tid, State&) { store_score<P>(s, count, dim, scale, tid); });
    block.step([&](int tid, State& t) { stats_tile<P>(t.softmax, t.key_sum, s, count, dim, tid); });
  }
  block.step([&](int tid, State& t) { finish_kbar(t.softmax, t.key_sum, s, dim, tid); });
  // Pass 2: the centred covariance.
  for (int64_t t0 = 0; t0 < head.length; t0 += kTileKeys) {
    const int count = tile_count(head.length, t0);
    block.step([&](int tid, State&) { load_tile<T, P>(head.k, a.stride_kt, t0, count, dim, s.keys, tid); });
    block.step([&](int tid, State& t) { store_probability<P>(s, t.softmax, count, dim, scale, tid); });
    block.step([&](int tid, State&) { centre_tile<P>(s, count, dim, tid); });
    block.step([&](int tid, State& t) { covariance_tile<S>(t.cov, s, count, tid); });
  }
  // The solve, in the tiles' bytes.
  block.step([&](int tid, State& t) { store_ridge_matrix<S>(t.cov, s, dim, head.ridge, tid); });
  for (int k = 0; k < dim; ++k) {
    block.step([&](int tid, State&) { cholesky_column(s, k, dim, tid); });
    block.step([&](int tid, State&) { cholesky_update(s, k, dim, tid); });
  }
  for (int k = 0; k < dim; ++k) block.step([&](int tid, State&) { forward_step(s, k, dim, tid); });
  for (int k = dim - 1; k >= 0; --k) block.step([&](int tid, State&) { backward_step(s, k, tid); });
  // Pass 3: the output.
  for (int64_t t0 = 0; t0 < head.length; t0 += kTileKeys) {
    const int count = tile_count(head.length, t0);
    block.step([&](int tid, State&) {
      load_tile<T, P>(head.k, a.stride_kt, t0, count, dim, s.keys, tid);
      load_tile<T, P>(head.v, a.stride_vt, t0, count, dim, s.values, tid);
    });
    block.step([&](int tid, State& t) { store_output_weights<P>(s, t.softmax, count, dim, scale, tid); });
    block.step([&](int tid, State& t) { output_tile<P>(t.out, s, count, dim, tid); });
  }
  block.step([&](int tid, State& t) { store_output(head, t.out, dim, tid); });
}

// Host side of the launcher and the host check: std::invalid_argument on sizes the kernel cannot take.
inline void check_sizes(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  if (head_dim < 1 || head_dim > kMaxHeadDim || num_kv_heads < 1 || num_heads % num_kv_heads != 0)
    throw std::invalid_argument("lla_decode: need 1 <= head_dim <= " + std::to_string(kMaxHeadDim) +
                                " and num_kv_heads dividing num_heads, got head_dim " + std::to_string(head_dim) +
                                ", " + std::to_string(num_heads) + " / " + std::to_string(num_kv_heads) + " heads");
}

// Calls f(std::integral_constant<int, S>{}) with the covariance slots of a head dim.
template <typename F>
void dispatch_slots(int head_dim, F&& f) {
  switch (slots_for(head_dim)) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <typename T>
DecodeArgs<T> decode_args(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t seqlens, uintptr_t ridge, uintptr_t out,
                          int64_t num_heads, int64_t num_kv_heads, int64_t max_tokens, int64_t head_dim,
                          const int64_t* strides, float scale) {
  return DecodeArgs<T>{reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
                       reinterpret_cast<const int32_t*>(seqlens), reinterpret_cast<const float*>(ridge),
                       reinterpret_cast<T*>(out), num_heads, num_heads / num_kv_heads, max_tokens, head_dim,
                       strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
                       strides[8], strides[9], scale};
}

}  // namespace lla_decode
}  // namespace pyfastrl
