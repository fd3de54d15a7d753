// Host-only build of the decode kernel's program (lla_decode_math.h) for the tests: compiled with
// g++ by tests/test_lla_decode_cuda.py and called through ctypes on CPU tensors, against the
// float64 reference. decode_block runs here with a Block whose step calls every thread index in
// turn, on a host buffer standing in for the block's shared memory, so every step's arithmetic,
// addressing and order of accumulation is checked on every run; the concurrency of the threads
// within a step (that no two of them write what another reads) is not. Returns nullptr, or the
// error message.
#include <vector>

#include "common/host_guard.h"
#include "lla_decode/lla_decode_math.h"

using namespace pyfastrl;
using namespace pyfastrl::lla_decode;

namespace {

template <int S>
struct HostBlock {
  std::vector<ThreadState<S>> states = std::vector<ThreadState<S>>(kThreads);

  template <typename F>
  void step(F&& f) {
    for (int tid = 0; tid < kThreads; ++tid) f(tid, states[tid]);
  }
};

template <typename T, int S>
void run(const DecodeArgs<T>& a, int64_t blocks) {
  // The block's shared memory, 8-byte aligned as the kernel's; its float tiles and float64 factor
  // share bytes (the tests compile this with -fno-strict-aliasing).
  std::vector<double> shared((shared_bytes(a.head_dim) + 7) / 8);
  for (int64_t block = 0; block < blocks; ++block) {
    HostBlock<S> host;
    decode_block<T, S>(a, block, shared.data(), host);
  }
}

}  // namespace

extern "C" int64_t pyfastrl_lla_decode_shared_bytes(int64_t head_dim) { return shared_bytes(head_dim); }

extern "C" const char* pyfastrl_lla_decode_host(int dtype, uintptr_t q, uintptr_t k, uintptr_t v,
                                                uintptr_t cache_seqlens, uintptr_t ridge, uintptr_t out,
                                                int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                                int64_t max_tokens, int64_t head_dim, const int64_t* strides,
                                                float scale) {
  return guarded([&] {
    check_sizes(num_heads, num_kv_heads, head_dim);
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      const DecodeArgs<T> a = decode_args<T>(q, k, v, cache_seqlens, ridge, out, num_heads, num_kv_heads,
                                             max_tokens, head_dim, strides, scale);
      dispatch_slots(head_dim, [&](auto slots) { run<T, decltype(slots)::value>(a, batch * num_heads); });
    });
  });
}
