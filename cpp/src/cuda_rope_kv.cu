// CUDA backend: one launch per call; each thread runs units of the operation
// (see ropekv/rope_kv.h).
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "launchers.h"
#include "dispatch.h"

namespace ropekv {
namespace {

constexpr int kMaxDevices = 64;
constexpr int kMaxThreadsPerBlock = 512;
constexpr int kMinThreadsPerBlock = 128;
constexpr int kThreadsPerSM = 2048;
// Tokens whose loads a thread issues together. More tokens in flight cost
// registers, and on the H100 the occupancy they cost was worth more (measured:
// 2 tokens and 118 registers ran the Llama fused case 16% slower than 1).
constexpr int kTokensInFlight = 1;
// At most 64 registers, so that an SM holds at least 1024 threads.
constexpr int kMinBlocksPerSM = 2;

// Block: x covers the units of one token (each thread keeps its unit, decoded
// once, across tokens), y stacks tokens when a token has few units. Grid:
// blocks over tokens, at most what the GPU holds at once; each block then
// strides over the remaining tokens, kTokensInFlight at a time.
template <class T, class C, bool NEOX, bool WIDE>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, kMinBlocksPerSM) rope_kv_kernel(const RopeKVParams p, const UnitLayout L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch: wait for the previous kernel's writes, and
  // let the next kernel start launching (it waits for ours the same way).
  // Both are no-ops when the launch did not ask for it.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  constexpr int U = kTokensInFlight;
  const int64_t first = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
  for (int u = threadIdx.x; u < L.total; u += blockDim.x) {
    const Unit unit = decode_unit<T, C>(p, L, u, W);
    int64_t t = first;
    for (; t + (U - 1) * stride < p.num_tokens; t += U * stride) {
      UnitData<T, NEOX, W> d[U];
#pragma unroll
      for (int i = 0; i < U; ++i) load_unit<T, NEOX, WIDE>(p, unit, t + i * stride, d[i]);
#pragma unroll
      for (int i = 0; i < U; ++i) finish_unit<T, C, NEOX, WIDE>(p, unit, t + i * stride, d[i]);
    }
    for (; t < p.num_tokens; t += stride) run_unit<T, C, NEOX, WIDE>(p, unit, t);
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

void rope_kv_cuda(const RopeKVParams& p, DType input, DType cache, int device, uintptr_t stream,
                  bool enable_pdl) {
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
    if (L.total == 0) return;
    const int bx = std::min((L.total + 31) / 32 * 32, kMaxThreadsPerBlock);
    const int by = std::max(1, kMinThreadsPerBlock / bx);
    const int64_t blocks_needed = (p.num_tokens + by - 1) / by;
    const int64_t resident = int64_t(sms) * std::max(1, kThreadsPerSM / (bx * by));
    const int blocks = int(std::min(blocks_needed, resident));
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(bx, by);
    config.stream = reinterpret_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = enable_pdl ? 1 : 0;
    check(cudaLaunchKernelEx(&config, rope_kv_kernel<T, C, NEOX, WIDE>, p, L), "kernel launch");
  });
  if (current != device) check(cudaSetDevice(current), "cudaSetDevice");
}

}  // namespace ropekv
