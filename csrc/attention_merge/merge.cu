// Attention-state merge kernels of the flash backend (see merge.h and merge_math.h).
// Memory-bound: each thread moves 16-byte chunks (one 128-bit load per operand, one store);
// math in fp32. What is arch-specific here is only the thread mapping and the barrier.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "merge.h"
#include "merge_math.h"

namespace pyfastrl {
namespace attention_merge {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunks = kThreads;  // one thread per chunk of a row, one row at least per block

// Block (chunks, rows_per_block): threadIdx.x is the chunk of a (row, head) pair, threadIdx.y the
// pair. Every chunk reads the pair's old LSE, so the new one is stored after a barrier.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(MergeArgs<T> a) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = pair < a.num_rows * a.num_heads;
  const int64_t n = pair / a.num_heads;
  const int64_t h = pair - n * a.num_heads;
  MergeWeights w{};
  if (valid) {
    w = row_weights(a, n, h);
    merge_chunk(a, w, n, h, threadIdx.x);
  }
  __syncthreads();
  if (valid && threadIdx.x == 0) store_lse(a, w, n, h);
}

constexpr int kRowAddTasks = 3;  // dq, dk, dv

template <typename T>
__device__ __forceinline__ void add_rows_at(const RowAdd<T>& a, int64_t i) {
  if (i >= a.num_rows * a.num_heads * a.chunks) return;
  const int64_t pair = i / a.chunks;
  const int64_t n = pair / a.num_heads;
  add_chunk(a, n, pair - n * a.num_heads, i - pair * a.chunks);
}

// blockIdx.y picks the task (dq, dk, dv); a flat thread index walks its (row, head, chunk)s. Each
// branch names its parameter statically: selecting one by a runtime index would copy the
// parameters to a stack frame.
template <typename T>
__global__ void __launch_bounds__(kThreads) add_rows_kernel(RowAdd<T> dq, RowAdd<T> dk, RowAdd<T> dv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blockIdx.y == 0) {
    add_rows_at(dq, i);
  } else if (blockIdx.y == 1) {
    add_rows_at(dk, i);
  } else {
    add_rows_at(dv, i);
  }
}

void check_head_dim(int64_t head_dim, int pack, const char* what) {
  if (head_dim <= 0 || head_dim % pack != 0 || head_dim / pack > kMaxChunks)
    throw std::invalid_argument(std::string(what) + ": head_dim " + std::to_string(head_dim) +
                                " must be a positive multiple of " + std::to_string(pack) + " up to " +
                                std::to_string(pack * kMaxChunks));
}

}  // namespace

void merge(int dtype, uintptr_t out, uintptr_t lse, uintptr_t cross_out, uintptr_t cross_lse, uintptr_t rows,
           int64_t num_rows, int64_t num_heads, int64_t head_dim, int64_t stride_ot, int64_t stride_oh,
           int64_t stride_lh, int64_t stride_ct, int64_t stride_ch, int64_t stride_clh, uintptr_t stream) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    check_head_dim(head_dim, kPack<T>, "merge");
    const MergeArgs<T> a = merge_args<T>(out, lse, cross_out, cross_lse, rows, num_rows, num_heads, head_dim,
                                         stride_ot, stride_oh, stride_lh, stride_ct, stride_ch, stride_clh);
    const int64_t pairs = num_rows * num_heads;
    if (pairs == 0) return;
    const dim3 block(static_cast<unsigned>(a.chunks), static_cast<unsigned>(kThreads / a.chunks));
    const int64_t blocks = (pairs + block.y - 1) / block.y;
    merge_kernel<T><<<static_cast<unsigned>(blocks), block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    check_launch("merge");
  });
}

void add_rows(int dtype, uintptr_t dq, uintptr_t cross_dq, uintptr_t q_rows, int64_t num_q_rows, int64_t num_heads,
              uintptr_t dk, uintptr_t dv, uintptr_t cross_dk, uintptr_t cross_dv, uintptr_t k_rows,
              int64_t num_k_rows, int64_t num_kv_heads, int64_t head_dim, int64_t stride_dqt, int64_t stride_dqh,
              int64_t stride_cqt, int64_t stride_cqh, int64_t stride_dkt, int64_t stride_dkh, int64_t stride_ckt,
              int64_t stride_ckh, uintptr_t stream) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    check_head_dim(head_dim, kPack<T>, "add_rows");
    const RowAdd<T> tasks[kRowAddTasks] = {
        row_add<T>(dq, cross_dq, q_rows, num_q_rows, num_heads, head_dim, stride_dqt, stride_dqh, stride_cqt,
                   stride_cqh),
        row_add<T>(dk, cross_dk, k_rows, num_k_rows, num_kv_heads, head_dim, stride_dkt, stride_dkh, stride_ckt,
                   stride_ckh),
        row_add<T>(dv, cross_dv, k_rows, num_k_rows, num_kv_heads, head_dim, stride_dkt, stride_dkh, stride_ckt,
                   stride_ckh)};
    int64_t most = 0;
    for (const RowAdd<T>& t : tasks) most = std::max(most, t.num_rows * t.num_heads * t.chunks);
    if (most == 0) return;
    const dim3 grid(static_cast<unsigned>((most + kThreads - 1) / kThreads), kRowAddTasks);
    add_rows_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(tasks[0], tasks[1], tasks[2]);
    check_launch("add_rows");
  });
}

}  // namespace attention_merge
}  // namespace pyfastrl
