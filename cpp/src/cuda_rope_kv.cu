// CUDA backend: one launch per call; each thread runs units of the operation
// (see ropekv/rope_kv.h).
#include <atomic>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "launchers.h"
#include "dispatch.h"

namespace ropekv {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

template <class T, class C, bool NEOX, bool WIDE>
__global__ void __launch_bounds__(kThreads) rope_kv_kernel(const RopeKVParams p, const UnitLayout L) {
  const int64_t n = p.num_tokens * L.total;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < n; g += step) {
    const int64_t t = g / L.total;
    run_unit<T, C, NEOX, WIDE>(p, L, t, int(g - t * L.total));
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ropekv: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Multiprocessor count, read once per device and kept.
int sm_count(int device) {
  static std::atomic<int> cached[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return 132;
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "reading the SM count");
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

void rope_kv_cuda(const RopeKVParams& p, DType input, DType cache, int device, uintptr_t stream) {
  if (p.num_tokens == 0) return;
  int current = -1;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
  const bool wide = use_wide_path(p, input, cache);
  const int sms = sm_count(device);
  dispatch_rope_kv(input, cache, p.neox, wide, [&](auto t, auto c, auto n, auto w) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    constexpr bool NEOX = decltype(n)::value;
    constexpr bool WIDE = decltype(w)::value;
    const UnitLayout L = make_layout<T, NEOX, WIDE>(p);
    const int64_t work = p.num_tokens * L.total;
    if (work == 0) return;
    const int64_t blocks_needed = (work + kThreads - 1) / kThreads;
    const int64_t max_blocks = int64_t(sms) * (2048 / kThreads);
    const int blocks = int(blocks_needed < max_blocks ? blocks_needed : max_blocks);
    rope_kv_kernel<T, C, NEOX, WIDE>
        <<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p, L);
    check(cudaGetLastError(), "kernel launch");
  });
  if (current != device) check(cudaSetDevice(current), "cudaSetDevice");
}

}  // namespace ropekv
