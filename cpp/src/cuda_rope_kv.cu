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
// Calls that rotate and have fewer tokens than SMs spread each token's units
// over blocks of this many threads, so that one token's arithmetic runs on
// several SMs (benchmarks/NOTES.md, v7: 1-token fused calls 10% faster split on
// the v6 kernel, within 0.07 µs either way on this one). For store_kv calls the
// measurements disagreed between kernel versions and are level on this one
// (1.90 split, 1.91 whole on the H100): they keep whole blocks.
constexpr int kSmallCallThreadsPerBlock = 64;
// Tokens are stacked in a block until it has at least this many threads.
constexpr int kMinThreadsPerBlock = 128;
// At most 64 registers, so that an SM holds at least 1024 threads.
constexpr int kMinBlocksPerSM = 2;

// One unit of kind K for the tokens t, t + stride, ... Without programmatic
// dependent launch the previous kernel has finished when this one starts, so
// the first token's indices are loaded first and the plan is made while they
// are in flight (benchmarks/NOTES.md, v9: store_kv at 1 token 1.88 -> 1.51
// µs); with it, the plan comes before griddepcontrol.wait and the indices
// after. The loop is not unrolled: an unrolled loop starts with a 64-bit
// division for its trip count, on the path of a 1-token call.
template <class T, class C, bool NEOX, bool WIDE, bool ROT, UnitKind K>
__device__ __forceinline__ void run_units(const RopeKVParams& p, const UnitLayout& L, int u, int64_t t, bool pdl) {
  constexpr bool kRotates = ROT && (K == UnitKind::q_rot || K == UnitKind::k_rot);
  const bool writes = K != UnitKind::q_rot && p.write_cache;
  TokenIndex ix;
  if (!pdl) ix = load_token_index(p, kRotates, writes, t);
  UnitPlan<T, C> plan = plan_kind<T, C, NEOX, WIDE, K>(p, L, u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch: wait for the previous kernel's writes, and
  // let the next kernel start launching (it plans, then waits for ours the
  // same way). Both are no-ops when the launch did not ask for it.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  if (pdl) ix = load_token_index(p, kRotates, writes, t);
  read_plan_scale(plan);
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
#pragma unroll 1
  for (;;) {
    run_plan<T, C, NEOX, WIDE, ROT>(p, plan, t, ix);
    t += stride;
    if (t >= p.num_tokens) break;
    ix = load_token_index(p, kRotates, writes, t);
  }
}

// One unit per thread: threadIdx.x and blockIdx.y pick the unit, threadIdx.y
// and blockIdx.x the first token, and the grid, no larger than what the GPU
// holds at once, strides over the rest. A unit's kind is a branch that is the
// same for a whole warp when the kinds' unit counts are multiples of 32 (every
// common head size).
template <class T, class C, bool NEOX, bool WIDE, bool ROT>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, kMinBlocksPerSM)
    rope_kv_kernel(const RopeKVParams p, const UnitLayout L, bool pdl) {
  const int u = blockIdx.y * blockDim.x + threadIdx.x;
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (u >= L.total || t >= p.num_tokens) return;
  with_unit_kind<ROT>(L, u, [&](auto kind) { run_units<T, C, NEOX, WIDE, ROT, decltype(kind)::value>(p, L, u, t, pdl); });
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

// Blocks of `threads` threads of one kernel that one SM holds (registers are
// usually the limit), computed once per kernel, block size and device. The
// cache is keyed by the kernel's template arguments: every instantiation has
// the same function pointer type, so a cache keyed by that type would hand
// one kernel's occupancy to another (benchmarks/NOTES.md, v8: fp8 store_kv at
// 32768 tokens took 103.8 µs with the shared cache, 79.0 µs without).
template <class T, class C, bool NEOX, bool WIDE, bool ROT>
int blocks_per_sm(int threads, int device) {
  static std::atomic<int> cached[kMaxDevices][kMaxThreadsPerBlock / 32 + 1] = {};
  const int w = (threads + 31) / 32;
  if (device < 0 || device >= kMaxDevices || w > kMaxThreadsPerBlock / 32) return 1;
  int n = cached[device][w].load(std::memory_order_relaxed);
  if (n == 0) {
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, rope_kv_kernel<T, C, NEOX, WIDE, ROT>, threads, 0),
          "reading the occupancy");
    n = std::max(n, 1);
    cached[device][w].store(n, std::memory_order_relaxed);
  }
  return n;
}

struct LaunchShape {
  dim3 grid, block;
};

// Block and grid for `units` units per token and `tokens` tokens. A block
// holds up to `max_units_per_block` units of one token (fewer for calls with
// fewer tokens than SMs), stacking tokens while it has fewer than
// kMinThreadsPerBlock threads; grid.y covers a token's units, grid.x at most
// the token blocks that the GPU holds at once (blocks_per_sm_of(threads)).
template <class BlocksPerSM>
LaunchShape launch_shape(int units, int64_t tokens, int sms, int max_units_per_block,
                         int small_call_units_per_block, BlocksPerSM&& blocks_per_sm_of) {
  const int cap = tokens < sms ? std::min(max_units_per_block, small_call_units_per_block) : max_units_per_block;
  const int unit_blocks = (units + cap - 1) / cap;
  const int bx = ((units + unit_blocks - 1) / unit_blocks + 31) / 32 * 32;
  // Stacked tokens only when one block holds all of a token's units.
  const int by = unit_blocks > 1 ? 1 : int(std::min<int64_t>(tokens, std::max(1, kMinThreadsPerBlock / bx)));
  const int64_t token_blocks = (tokens + by - 1) / by;
  const int64_t resident = std::max<int64_t>(1, int64_t(sms) * blocks_per_sm_of(bx * by) / unit_blocks);
  LaunchShape s;
  s.block = dim3(unsigned(bx), unsigned(by));
  s.grid = dim3(unsigned(std::min(token_blocks, resident)), unsigned(unit_blocks));
  return s;
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
  dispatch_rope_kv(input, cache, p.neox, wide, p.rot_dim > 0, [&](auto t, auto c, auto n, auto w, auto r) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    constexpr bool NEOX = decltype(n)::value;
    constexpr bool WIDE = decltype(w)::value;
    constexpr bool ROT = decltype(r)::value;
    const UnitLayout L = make_layout<T, NEOX, WIDE>(p);
    if (L.total == 0) return;
    auto kernel = rope_kv_kernel<T, C, NEOX, WIDE, ROT>;
    const LaunchShape shape = launch_shape(L.total, p.num_tokens, sms, kMaxThreadsPerBlock,
                                           ROT ? kSmallCallThreadsPerBlock : kMaxThreadsPerBlock,
                                           [&](int threads) { return blocks_per_sm<T, C, NEOX, WIDE, ROT>(threads, device); });
    cudaLaunchConfig_t config = {};
    config.gridDim = shape.grid;
    config.blockDim = shape.block;
    config.stream = reinterpret_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = enable_pdl ? 1 : 0;
    check(cudaLaunchKernelEx(&config, kernel, p, L, enable_pdl), "kernel launch");
  });
  if (current != device) check(cudaSetDevice(current), "cudaSetDevice");
}

}  // namespace ropekv
