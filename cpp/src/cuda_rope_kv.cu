// CUDA backend: one launch per call; each thread runs units of the operation
// (see ropekv/rope_kv.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
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
// Calls that rotate, on the wide path, of at most this many tokens run a kernel
// compiled for their index dtype: 1-32 tokens 0.10-0.20 µs faster than with the
// dtype tested per load, 128 tokens up to 0.2 µs slower, larger calls level
// (benchmarks/NOTES.md, v12). Larger calls, the narrow path and store_kv (no
// faster with it; 32768 tokens 1% slower) test it per load.
constexpr int64_t kTypedIndexMaxTokens = 32;
// Tokens are stacked in a block until it has at least this many threads.
constexpr int kMinThreadsPerBlock = 128;
// At most 64 registers, so that an SM holds at least 1024 threads.
constexpr int kMinBlocksPerSM = 2;

// Programmatic dependent launch: wait for the previous kernel's writes, and
// let the next kernel start launching (it makes its addresses, then waits for
// ours the same way). Both are no-ops when the launch did not ask for it.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// One unit of kind K for the tokens t, t + stride, ... Without programmatic
// dependent launch the previous kernel has finished when this one starts, so
// the first token's indices are loaded first and the plan is made while they
// are in flight (benchmarks/NOTES.md, v9: store_kv at 1 token 1.88 -> 1.51
// µs); with it, the plan comes before griddepcontrol.wait and the indices
// after. The loop is not unrolled: an unrolled loop starts with a 64-bit
// division for its trip count, on the path of a 1-token call.
template <class T, class C, bool NEOX, bool WIDE, bool ROT, IndexType I, UnitKind K>
__device__ __forceinline__ void run_units(const RopeKVParams& p, const UnitLayout& L, int u, int64_t t, bool pdl) {
  constexpr bool kRotates = ROT && (K == UnitKind::q_rot || K == UnitKind::k_rot);
  const bool writes = K != UnitKind::q_rot && p.write_cache;
  TokenIndex ix;
  if (!pdl) ix = load_token_index<I>(p, kRotates, writes, t);
  UnitPlan<T, C> plan = plan_kind<T, C, NEOX, WIDE, K>(p, L, u);
  wait_for_previous_kernel();
  if (pdl) ix = load_token_index<I>(p, kRotates, writes, t);
  read_plan_scale(plan);
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
#pragma unroll 1
  for (;;) {
    run_plan<T, C, NEOX, WIDE, ROT>(p, plan, t, ix);
    t += stride;
    if (t >= p.num_tokens) break;
    ix = load_token_index<I>(p, kRotates, writes, t);
  }
}

// One unit per thread: threadIdx.x and blockIdx.y pick the unit, threadIdx.y
// and blockIdx.x the first token, and the grid, no larger than what the GPU
// holds at once, strides over the rest. A unit's kind is a branch that is the
// same for a whole warp when the kinds' unit counts are multiples of 32 (every
// common head size). The layout comes before the call's parameters, for the
// reason given at RopeKVParams.
template <class T, class C, bool NEOX, bool WIDE, bool ROT, IndexType I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, kMinBlocksPerSM)
    rope_kv_kernel(const UnitLayout L, bool pdl, const RopeKVParams p) {
  const int u = blockIdx.y * blockDim.x + threadIdx.x;
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (u >= L.total || t >= p.num_tokens) return;
  with_unit_kind<ROT>(L, u, [&](auto kind) { run_units<T, C, NEOX, WIDE, ROT, I, decltype(kind)::value>(p, L, u, t, pdl); });
}

// ---- Small calls with a common head size: the head geometry compiled in -----
// Decode-sized calls are a chain of dependent memory round trips (position,
// then its cos/sin row, then the stores), and every instruction before a load
// on that chain adds to the call. This kernel serves calls whose heads all
// have one of a few common sizes D, rotated whole (or not at all: store_kv),
// with an fp32 cos/sin table read as float4 and one index dtype (with PDL,
// rotating calls only: see small_call_head_dim): a unit's head and column are
// then a constant shift and mask, its cos/sin offsets constants, and nothing
// is planned, tested per load or looped over (one token per grid column).
// Everything else about the call (strides, paged caches, fp8 scales, padding
// slots) stays as general as in the unit kernel, through the same helpers.
// Measured (benchmarks/NOTES.md, v15, Llama shape, 1 / 8 / 32 tokens):
// fused 1.72 / 1.83 / 1.91 -> 1.58 / 1.65 / 1.78 µs, RoPE alone 1.69 / 1.77 /
// 1.82 -> 1.54 / 1.62 / 1.73, store_kv 1.45 / 1.54 / 1.61 -> 1.40 / 1.48 /
// 1.53. Rotating calls take it up to kSmallRotMaxTokens tokens (v17, A/B of
// wheels, Llama fused, unit kernel -> this one at 64 / 128 tokens: bf16 cache
// 2.23 / 2.33 -> 1.95 / 2.23 µs, fp8 cache 2.55 / 2.73 -> 2.05 / 2.25; at 33
// tokens 2.07 -> 1.80).
constexpr int64_t kSmallRotMaxTokens = 128;
// Into an fp8 cache the conversion (a division made exact by two corrections)
// is most of a k unit's work after its cos/sin row arrives, so a NeoX k unit is
// split over small_fp8_k_threads(D) threads: two, one per half of the rotated
// pair, and for heads of up to 128 four, one per half of each half, each
// converting a quarter of the unit's 2W elements. Two threads took 0.11-0.20
// µs off fp8 fused calls of 1-32 tokens in an experiment kernel (0.05-0.10 in
// the bench), while splitting a bf16 call's q or k units gained nothing
// (benchmarks/NOTES.md, v17); four took another 0.03-0.08 µs off (v20). A
// head's threads are at most a warp (see SmallLayout).
constexpr int small_fp8_k_threads(int d) { return d <= 128 ? 4 : 2; }
// store_kv calls take it up to kSmallStoreMaxTokens tokens, and calls with at
// least kSmallStoreWideUnits units per token (K and V chunks: a block of 128
// threads or more) up to kSmallStoreMaxUnits units in all: 512 tokens of the
// Llama shape, 1024 of gpt-oss. Measured against the two-unit kernel
// (benchmarks/NOTES.md, v16, Llama shape): 192 / 256 / 512 tokens 1.86 / 1.99
// / 2.26 -> 1.79 / 1.90 / 2.20 µs, level at 128; 1024 tokens 2.96 -> 3.14,
// slower (gpt-oss at 1024, the same units: 2.26 -> 2.22). Calls with fewer
// units per token (one or two KV heads, as under tensor parallelism) would run
// blocks of 32 or 64 threads, which were not measured past 127 tokens.
constexpr int64_t kSmallStoreMaxTokens = 127;
constexpr int kSmallStoreWideUnits = 128;
constexpr int64_t kSmallStoreMaxUnits = int64_t(1) << 17;

// Whether the small kernel splits a NeoX k unit into an fp8 cache over
// small_fp8_k_threads(D) threads.
template <class T, class C, bool NEOX, bool ROT>
constexpr bool kSmallSplitK = ROT && NEOX && !std::is_same_v<T, C>;

// The small kernel's rotating calls run blocks of this many threads, and a
// NeoX q or k unit there holds four rotary pairs (half a 16-byte vector of
// each half of the pair, as an interleaved unit holds four), not eight. After
// its cos/sin row arrives a thread is on the call's critical path until its
// stores issue, so half the pairs per thread shortens that path; in lean
// kernels of the call, four pairs in blocks of 128 beat eight in blocks of 64
// or 128 (Llama fused 1 / 8 / 32 tokens 1.48 / 1.58 / 1.70 -> 1.40 / 1.48 /
// 1.60 µs), and two pairs or other block sizes did not (benchmarks/NOTES.md,
// v24). A/B of wheels: Llama fused 1.59 / 1.65 / 1.73 -> 1.48-1.52 / 1.54-1.57
// / 1.69-1.72, RoPE alone 1.51 / 1.60 / 1.71 -> 1.41-1.44 / 1.52 / 1.66,
// gpt-oss fused 1.58 / 1.65 / 1.72 -> 1.47-1.51 / 1.53-1.59 / 1.67-1.68; fp8
// caches, whose k units were already split (small_fp8_k_threads), level to
// 0.07 faster. v units keep whole vectors (half-width v units measured level,
// and fp8 calls in blocks of 64 no faster).
constexpr int kSmallRotThreadsPerBlock = 128;

// A token's units in the small kernel where it splits k units: [0, k_end) k
// units, [k_end, q_end) q units, [q_end, total) v units. With k first, a
// head's k threads start at a multiple of their count, which divides 32, so
// the threads that split a k unit share a warp (see SmallUnit). Behind an
// odd number of q heads they did not: v19's layout (q first, as UnitLayout)
// put them in two warps, and a thread could store before another loaded. The
// counts come last in 48 bytes, so that RopeKVParams, passed after this,
// starts where it does after UnitLayout. Other small calls take UnitLayout
// (q, k, v units), as the unit kernel.
struct SplitKLayout {
  int unused[9] = {};
  int k_end = 0, q_end = 0, total = 0;
};
static_assert(sizeof(SplitKLayout) == 48 && sizeof(UnitLayout) <= 48 && alignof(RopeKVParams) == 8);
template <class T, class C, bool NEOX, bool ROT>
using SmallLayout = std::conditional_t<kSmallSplitK<T, C, NEOX, ROT>, SplitKLayout, UnitLayout>;

// One unit of the small kernel, in two steps: load() issues the unit's loads
// (indices, data, fp8 scale), finish() rotates and stores. The small kernel
// runs them back to back; the large-call kernel below issues the loads of a
// thread's two units before it finishes either.
template <class T, class C, bool NEOX, int D, bool ROT, IndexType I, bool PDL, bool NARROW, UnitKind K>
struct SmallUnit {
  static constexpr bool kQ = K == UnitKind::q_rot, kV = K == UnitKind::v;
  static constexpr bool kRotates = K == UnitKind::q_rot || K == UnitKind::k_rot;
  static constexpr bool kFp8 = !std::is_same_v<T, C>;
  // Into an fp8 cache a NeoX k unit is small_fp8_k_threads(D) threads of W
  // elements each: `half` picks the lo or hi half of the rotated pair.
  static constexpr bool kSplit = kSmallSplitK<T, C, NEOX, ROT> && K == UnitKind::k_rot;
  // NARROW (the small kernel, not the large-call one): a NeoX q or k unit
  // holds half a vector of each half of the rotated pair, four pairs (see
  // kSmallRotThreadsPerBlock).
  static constexpr bool kNarrow = NARROW && kRotates && NEOX && !kSplit;
  static constexpr int W = kSplit    ? 2 * chunk_elems<T, NEOX, true>() / small_fp8_k_threads(D)
                           : kNarrow ? chunk_elems<T, NEOX, true>() / 2
                                     : chunk_elems<T, NEOX, true>();
  // Into an fp8 cache, in the small kernel: the position and slot tests are
  // unsigned compares, and a rotating unit loads its cos/sin row whatever the
  // position (row 0 when it is out of range, its rotation then discarded; the
  // small kernel is never given an empty table, see small_call_head_dim). Both
  // keep the semantics; A/B of wheels (benchmarks/NOTES.md, v25): fp8 fused
  // calls of 1 / 8 / 32 tokens 0.03-0.07 µs faster (Llama 1.61-1.63 / 1.69-1.72
  // / 1.78-1.82 -> 1.57-1.58 / 1.64-1.66 / 1.73-1.75), while in bf16 calls the
  // unsigned tests alone made them up to 0.06 slower, so those keep signed
  // tests and a guarded load.
  static constexpr bool kUnguarded = kFp8 && NARROW;
  static constexpr int kPerHead = kRotates && NEOX ? D / 2 / W : D / W;
  static constexpr int kThreadsPerHead = kSplit ? 2 * kPerHead : kPerHead;
  static_assert(!kSplit || 32 % kThreadsPerHead == 0, "a split head's threads within one warp");

  int64_t slot = -1, pos = 0;
  int head = 0, j = 0, half = 0;
  bool writes = false;
  T* src = nullptr;
  Chunk<T, W> lo, hi;
  float scale_value = 1.0f;

  __device__ __forceinline__ void load(const RopeKVParams& p, int w, int64_t t) {
    const TokenTensor& x = kQ ? p.q : kV ? p.v : p.k;
    writes = !kQ && p.write_cache;
    // Without PDL the indices are loaded first and the addresses made while
    // they are in flight; with it, the addresses are made while the previous
    // kernel runs, and every load comes after the wait (that kernel may have
    // written this call's inputs, indices and scales included). Loading the
    // indices after the address arithmetic in both forms cost default launches
    // 0.03-0.07 µs (benchmarks/NOTES.md, v20).
    const auto load_indices = [&] {
      if (writes) slot = load_index<I>(p.loc, p.loc_i64, t);
      if (kRotates) pos = load_index<I>(p.positions, p.positions_i64, t);
    };
    if constexpr (!PDL) load_indices();
    head = int(unsigned(w) / kThreadsPerHead);
    j = int(unsigned(w) % kPerHead);
    if constexpr (kSplit) half = int(unsigned(w) % kThreadsPerHead) / kPerHead;
    src = static_cast<T*>(x.ptr) + t * x.token_stride + head * x.head_stride + j * W;
    if constexpr (PDL) {
      wait_for_previous_kernel();
      load_indices();
    }
    lo = load_chunk<T, W, true>(src);
    if constexpr (kRotates && NEOX) hi = load_chunk<T, W, true>(src + D / 2);
    // An fp8 cache's scale is loaded with the unit's other loads. Read where the
    // cache is written, it came after the in-place stores of q and k, which the
    // compiler may not move it above (they might alias), and the write waited a
    // round trip for it.
    if constexpr (kFp8) {
      const Scale& s = kV ? p.v_scale : p.k_scale;
      if (writes) scale_value = s.ptr ? s.ptr[head * s.head_stride] : s.value;
    }
  }

  __device__ __forceinline__ void finish(const RopeKVParams& p) {
    const CacheTensor& cache = kV ? p.v_cache : p.k_cache;
    CacheScale scale{};
    if constexpr (kRotates) {
      const bool rotates = kUnguarded ? uint64_t(pos) < uint64_t(p.max_pos) : rotates_at(p, pos);
      CosSin<NEOX, W> cs;
      if (kUnguarded || rotates) {
        const int64_t row_pos = rotates ? pos : 0;
        const float* row = static_cast<const float*>(p.cos_sin) + row_pos * D + (NEOX ? j * W : j * W / 2);
        load_floats_vec(row, cs.c);
        load_floats_vec(row + D / 2, cs.s);
      }
      // The reciprocal is made while the cos/sin row is in flight.
      if constexpr (kFp8 && !kQ) scale = cache_scale(scale_value);
      if constexpr (kSplit) {
        // This thread's half of each rotated pair, into lo.
        if (rotates) {
          lo = rotate_half<T, W>(cs, lo, hi, half);
          // The head's other threads load what this one stores: all of them
          // have loaded before any stores (`rotates` is the same for a token).
          constexpr unsigned kGroup = kThreadsPerHead == 32 ? ~0u : (1u << kThreadsPerHead) - 1u;
          __syncwarp(kGroup << (threadIdx.x % 32 & ~unsigned(kThreadsPerHead - 1)));
          store_chunk<T, W, true>(src + half * (D / 2), lo);
        } else if (half) {
          lo = hi;
        }
      } else if (rotates) {
        rotate_chunk<T, NEOX, W>(cs, lo, hi);
        store_chunk<T, W, true>(src, lo);
        if constexpr (NEOX) store_chunk<T, W, true>(src + D / 2, hi);
      }
    }
    if (writes && (kUnguarded ? uint64_t(slot) < uint64_t(p.num_slots) : writes_slot(p, slot))) {
      // Unpaged caches (the flag is read with the call's first fields) skip
      // slot_offset's test of the cache's page size, read from further on.
      const int64_t at = p.paged ? slot_offset(slot, cache.page_stride, cache.slot_stride, cache.page_size)
                                 : slot * cache.page_stride;
      C* const dst = static_cast<C*>(cache.ptr) + at + head * cache.head_stride + j * W + half * (D / 2);
      if constexpr (kFp8 && !kRotates) scale = cache_scale(scale_value);
      write_cache_chunk<T, C, W, true, ROT>(dst, scale, lo);
      if constexpr (kRotates && NEOX && !kSplit) write_cache_chunk<T, C, W, true, ROT>(dst + D / 2, scale, hi);
    }
  }
};

// Calls f(KindTag<kind of unit u>{}, u's index among its kind's units) for the
// small kernel's layout (see SplitKLayout). Rotating calls have q, k and v
// units (no tail: the heads are rotated whole; into an fp8 cache,
// small_fp8_k_threads(D) threads per NeoX k unit, k first), store_kv k and v
// units.
template <class T, class C, bool NEOX, bool ROT, class F>
__device__ __forceinline__ void with_small_unit(const SmallLayout<T, C, NEOX, ROT>& L, int u, F&& f) {
  if constexpr (kSmallSplitK<T, C, NEOX, ROT>) {
    // k units first, but q tested first: the code of the first test's unit
    // follows the tests in the kernel, and with q's placed after k's, 1-32
    // token calls ran 0.02-0.04 µs slower (benchmarks/NOTES.md, v20): the
    // instruction fetch of a jump, on the q units' path.
    if (u >= L.k_end && u < L.q_end) return f(KindTag<UnitKind::q_rot>{}, u - L.k_end);
    if (u < L.k_end) return f(KindTag<UnitKind::k_rot>{}, u);
    f(KindTag<UnitKind::v>{}, u - L.q_end);
  } else {
    if constexpr (ROT) {
      if (u < L.q_end) return f(KindTag<UnitKind::q_rot>{}, u);
      if (u < L.k_rot_end) return f(KindTag<UnitKind::k_rot>{}, u - L.q_end);
    } else {
      if (u < L.k_tail_end) return f(KindTag<UnitKind::k_tail>{}, u);
    }
    f(KindTag<UnitKind::v>{}, u - L.k_tail_end);
  }
}

// threadIdx.x and blockIdx.y pick the unit, blockIdx.x the token.
template <class T, class C, bool NEOX, int D, bool ROT, IndexType I, bool PDL>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    rope_kv_small_kernel(const SmallLayout<T, C, NEOX, ROT> L, const RopeKVParams p) {
  // Rotating calls always launch blocks of kSmallRotThreadsPerBlock threads;
  // the constant in place of blockDim.x takes a read off the path to the first
  // load (bf16 calls of 1-128 tokens 0.02-0.08 µs faster, benchmarks/NOTES.md, v18).
  const int u = blockIdx.y * (ROT ? kSmallRotThreadsPerBlock : blockDim.x) + threadIdx.x;
  const int64_t t = blockIdx.x;
  if (u >= L.total) return;
  with_small_unit<T, C, NEOX, ROT>(L, u, [&](auto kind, int w) {
    SmallUnit<T, C, NEOX, D, ROT, I, PDL, true, decltype(kind)::value> unit;
    unit.load(p, w, t);
    unit.finish(p);
  });
}

// ---- Large rotating calls: one token per block, two units per thread ------
// A call of thousands of tokens moves its bytes at the rate the GPU keeps them
// in flight. The unit kernel holds one unit per thread in a grid that strides
// over the tokens; this kernel gives each token its own block and each thread
// two units (x and x + blockDim.x: blockDim.x is half the token's units,
// rounded up to whole warps), the loads of both issued before either is
// finished. Measured (benchmarks/NOTES.md, v23, H100, 32768 tokens): Llama
// fused 317.7 -> 304.9 µs (92.4 -> 96.4% of copy), into an fp8 cache 300.6 ->
// 284.5, RoPE alone 238.0 -> 235.3; at 2048 tokens, where a call's data fits
// in L2, the unit kernel's grid is faster (fused 11.4 against 12.4), so calls
// take this kernel from kLargeMinTokensPerSM tokens per SM. Into an fp8 cache
// the kernel is held to 48 registers (four blocks of a Llama token per SM
// instead of three: 302.6 -> 284.5 µs); a 16-bit cache keeps 64 (48 spills
// and ran 306.4). One form serves every call: the units wait for the previous
// kernel before their loads (a no-op when the launch did not ask for
// programmatic dependent launch) and test the index dtype per load; a form per
// index dtype and launch kind quadrupled the kernels, whose nested unit kinds
// dominate the build, for 0.4% (bf16 cache) and 1.6% (fp8 cache) at 32768
// tokens (`--full` with this form: 305.3 and 289.0 µs).
constexpr int kLargeMinTokensPerSM = 32;
template <class T, class C>
constexpr int kLargeMaxRegisters = std::is_same_v<T, C> ? 64 : 48;

template <class T, class C, bool NEOX, int D, bool ROT>
__global__ void __maxnreg__((kLargeMaxRegisters<T, C>))
    rope_kv_large_kernel(const SmallLayout<T, C, NEOX, ROT> L, const RopeKVParams p) {
  const int u = threadIdx.x, u2 = u + blockDim.x;
  const int64_t t = blockIdx.x;
  if (u >= L.total) return;
  with_small_unit<T, C, NEOX, ROT>(L, u, [&](auto kind, int w) {
    SmallUnit<T, C, NEOX, D, ROT, IndexType::any, true, false, decltype(kind)::value> a;
    a.load(p, w, t);
    if (u2 >= L.total) return a.finish(p);
    with_small_unit<T, C, NEOX, ROT>(L, u2, [&](auto kind2, int w2) {
      SmallUnit<T, C, NEOX, D, ROT, IndexType::any, true, false, decltype(kind2)::value> b;
      b.load(p, w2, t);
      a.finish(p);
      b.finish(p);
    });
  });
}

// The head size of a call that the small and large-call kernels can serve
// (every head rotated whole, or none, with a common size; fp32 cos/sin read as
// float4), or 0.
template <bool ROT>
int compiled_head_dim(const RopeKVParams& p) {
  if (ROT && (p.rot_dim != p.head_dim || !p.cos_sin_vec4)) return 0;
  if (p.write_cache && p.v_head_dim != p.head_dim) return 0;
  return p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256 ? p.head_dim : 0;
}

// With PDL the small kernel takes rotating calls only (store_kv keeps the rows
// and unit kernels). Up to v24 it took only those of more than 32 tokens, where
// the unit kernel loses its compiled index dtype (v21); with v24's four pairs per
// thread it wins at 1-32 tokens too (benchmarks/NOTES.md, v26, `--pdl`, Llama
// fused 1 / 8 / 32 tokens 1.22 / 1.29 / 1.40 -> 1.01 / 1.18 / 1.22 µs, into an
// fp8 cache 1.42 / 1.50 / 1.56 -> 1.12 / 1.17 / 1.23; 128 tokens level).
template <bool ROT>
int small_call_head_dim(const RopeKVParams& p, const UnitLayout& L, IndexType index_type, bool enable_pdl) {
  if (index_type == IndexType::any) return 0;  // one index dtype, compiled in
  if (ROT && p.max_pos == 0) return 0;          // no row 0 to load (SmallUnit::kUnguarded)
  if (enable_pdl && !ROT) return 0;
  if (ROT && p.num_tokens > kSmallRotMaxTokens) return 0;
  if (!ROT && p.num_tokens > kSmallStoreMaxTokens &&
      (L.total < kSmallStoreWideUnits || p.num_tokens * L.total > kSmallStoreMaxUnits))
    return 0;
  return compiled_head_dim<ROT>(p);
}

// ---- store_kv from kStorePairMinTokens tokens: two units per thread ----------
// (Calls that the rows kernel below serves, and calls without PDL that the
// small kernel serves, take those instead.) Thread x of a token copies its
// units x and x + P (P threads per token: half the token's units, rounded up
// to whole warps), both loads issued before either store: twice the bytes in
// flight per thread, half the threads, and the slot's offset computed once per
// cache rather than once per unit. Blocks of kStorePairThreads threads stack
// tokens, one token per thread and a block for every token. For caches of the input dtype with power-of-two units per head
// (every common head size); measured (benchmarks/NOTES.md, v12, Llama shape):
// 128 tokens 1.93 -> 1.75 µs, 2048 tokens 4.57 -> 4.30, 32768 tokens 97.4 ->
// 95.6. Three things the unit kernel does cost this one 0.1-0.25 µs each at
// 32-2048 tokens and are left out: a division for other unit counts, a
// runtime PDL flag (PDL is a template argument here), and griddepcontrol in
// launches without PDL. fp8 caches keep the unit kernel: the one measurement
// into them, of a version with those three, was slower (v12).
constexpr int64_t kStorePairMinTokens = 128;
// With PDL it beats the unit kernel only from this many units per call (16 MiB
// of bf16 input). Measured with PDL (benchmarks/NOTES.md, v13), unit kernel
// against this one: Llama shape 512 tokens 1.68 / 1.87 µs, 2048 tokens 3.61 /
// 3.80, 4096 tokens (2^20 units) 14.06 / 13.72; gpt-oss shape 4096 tokens
// (2^19 units) 3.72 / 3.85, 8192 tokens 13.73 / 13.73.
constexpr int64_t kStorePairMinUnitsPDL = int64_t(1) << 20;
constexpr int kStorePairThreads = 256;

// What the two-unit kernel reads, in the order it reads it: three lines of the
// constant cache instead of the five its fields span in UnitLayout and
// RopeKVParams, where the caches' fields come last (benchmarks/NOTES.md, v16).
struct StorePairParams {
  int64_t num_tokens = 0;
  const void* loc = nullptr;
  int total = 0, k_end = 0;  // units per token; k units come first
  int k_shift = 0, v_shift = 0;  // log2 of units per head
  int k_units = 0, v_units = 0;
  bool loc_i64 = false;
  bool paged = false;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_token_stride = 0, v_token_stride = 0, k_head_stride = 0, v_head_stride = 0;
  int64_t num_slots = 0;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t kc_head_stride = 0, vc_head_stride = 0;
  int64_t kc_page_stride = 0, vc_page_stride = 0, kc_slot_stride = 0, vc_slot_stride = 0;
  int64_t kc_page_size = 1, vc_page_size = 1;
};

StorePairParams store_pair_params(const RopeKVParams& p, const UnitLayout& L) {
  StorePairParams s;
  s.num_tokens = p.num_tokens;
  s.loc = p.loc;
  s.total = L.total;
  s.k_end = L.k_tail_end;
  s.k_shift = L.tail_shift;
  s.v_shift = L.v_shift;
  s.k_units = L.tail_units;
  s.v_units = L.v_units;
  s.loc_i64 = p.loc_i64;
  s.paged = p.paged;
  s.k = p.k.ptr;
  s.v = p.v.ptr;
  s.k_token_stride = p.k.token_stride;
  s.v_token_stride = p.v.token_stride;
  s.k_head_stride = p.k.head_stride;
  s.v_head_stride = p.v.head_stride;
  s.num_slots = p.num_slots;
  s.k_cache = p.k_cache.ptr;
  s.v_cache = p.v_cache.ptr;
  s.kc_head_stride = p.k_cache.head_stride;
  s.vc_head_stride = p.v_cache.head_stride;
  s.kc_page_stride = p.k_cache.page_stride;
  s.vc_page_stride = p.v_cache.page_stride;
  s.kc_slot_stride = p.k_cache.slot_stride;
  s.vc_slot_stride = p.v_cache.slot_stride;
  s.kc_page_size = p.k_cache.page_size;
  s.vc_page_size = p.v_cache.page_size;
  return s;
}

template <class T, bool PDL>
__global__ void __launch_bounds__(kStorePairThreads) store_kv_pairs_kernel(const StorePairParams p) {
  constexpr int W = chunk_elems<T, false, true>();
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.num_tokens) return;
  int64_t slot = -1;
  if constexpr (!PDL) slot = load_index(p.loc, p.loc_i64, t);
  // Each field is picked by value, as in plan_kind (for the reason given there).
  const T* src[2];
  int64_t dst_offset[2];
  bool to_v[2], live[2];
  Chunk<T, W> x[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int u = int(threadIdx.x) + i * int(blockDim.x);
    live[i] = u < p.total;
    to_v[i] = u >= p.k_end;
    const int w = to_v[i] ? u - p.k_end : u;
    const int head = w >> (to_v[i] ? p.v_shift : p.k_shift);  // powers of two: the launcher checks
    const int d = (w - head * (to_v[i] ? p.v_units : p.k_units)) * W;
    src[i] = static_cast<const T*>(to_v[i] ? p.v : p.k) + t * (to_v[i] ? p.v_token_stride : p.k_token_stride) +
             head * (to_v[i] ? p.v_head_stride : p.k_head_stride) + d;
    dst_offset[i] = head * (to_v[i] ? p.vc_head_stride : p.kc_head_stride) + d;
    if (!PDL && live[i]) x[i] = load_chunk<T, W, true>(src[i]);
  }
  if constexpr (PDL) {
    // The addresses are made while the previous kernel runs; its outputs may be
    // this call's inputs, so every load comes after the wait.
    wait_for_previous_kernel();
    slot = load_index(p.loc, p.loc_i64, t);
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (live[i]) x[i] = load_chunk<T, W, true>(src[i]);
  }
  if (!slot_in_range(slot, p.num_slots)) return;
  T* const k_dst = static_cast<T*>(p.k_cache) +
                   (p.paged ? slot_offset(slot, p.kc_page_stride, p.kc_slot_stride, p.kc_page_size) : slot * p.kc_page_stride);
  T* const v_dst = static_cast<T*>(p.v_cache) +
                   (p.paged ? slot_offset(slot, p.vc_page_stride, p.vc_slot_stride, p.vc_page_size) : slot * p.vc_page_stride);
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (live[i]) store_chunk<T, W, true>((to_v[i] ? v_dst : k_dst) + dst_offset[i], x[i]);
}

// ---- store_kv into a cache of the input dtype: whole rows ------------------
// When a token's K heads lie back to back in the input and in a cache slot
// (head stride = head size: views into a fused qkv tensor, contiguous or
// paged caches), the token's K row and V row are each one run of chunks, and
// thread i of a token copies K chunk i and V chunk i: no head or unit to
// decode, both loads issued together, one token per block of up to
// kStoreRowsThreads threads (a column of blocks when a row has more chunks).
// Everything the kernel reads fits in 64 bytes of parameters. Measured against the two-unit and small kernels
// (benchmarks/NOTES.md, v17, Llama shape, µs at 1 / 8 / 32 / 128 / 512 / 2048
// / 8192 / 32768 tokens): 1.29 / 1.49 / 1.56 / 1.75 / 2.17 / 4.24 / 25.2 /
// 94.3 -> 1.27 / 1.32 / 1.38 / 1.62 / 2.04 / 4.09 / 25.1 / 94.4. Tokens of
// fewer than kStoreRowsMinThreads chunks (one or two heads, as under tensor
// parallelism) were not measured and keep the other kernels.
constexpr int kStoreRowsThreads = 128;
constexpr int kStoreRowsMinThreads = 64;
// With PDL it is faster up to this many units (K and V chunks) per call and
// slower past it (v17: Llama 128 tokens 1.29 -> 1.08 µs, 512 tokens 1.65 ->
// 1.74; gpt-oss 2048 tokens 2.42 -> 2.97).
constexpr int64_t kStoreRowsMaxUnitsPDL = int64_t(1) << 15;
// Calls of an even number of tokens, more than kStoreRowsPairMinTokens and at
// most kStoreRowsPairMaxTokens, without PDL, whose row fits one block, stack
// two tokens per block: half the blocks, each twice the threads. Measured
// (benchmarks/NOTES.md, v22, four interleaved passes, one token per block ->
// two): Llama shape 128 tokens 1.53-1.55 -> 1.50-1.52 µs, 96 level; gpt-oss
// 96 / 128 tokens 1.40 / 1.45 -> 1.37 / 1.42 (and 64, 1.39 -> 1.35). Elsewhere
// two per block were slower: Llama 32 / 64 tokens +0.05 / +0.02, both shapes
// at 256 tokens +0.03-0.09; four per block were slower at every Llama size.
// Odd counts keep one token per block: the bound test for the last block's
// second token (the token count, a parameter past the first 64 bytes, read
// before the slot's load) took most of the gain (Llama 128 tokens 1.53-1.54 ->
// 1.52-1.53 with it).
constexpr int64_t kStoreRowsPairMinTokens = 64;
constexpr int64_t kStoreRowsPairMaxTokens = 128;

struct StoreRowsParams {
  const void* loc = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int32_t k_token_stride = 0, v_token_stride = 0;  // in elements
  int32_t k_slot_stride = 0, v_slot_stride = 0;    // in elements: slot s starts at s * stride
  int32_t num_slots = 0;
  uint16_t k_units = 0, v_units = 0;  // chunks per token
};

// The slot stride of a cache whose slots are evenly spaced (unpaged, or pages
// of page_size slots back to back) and whose heads are dense, or -1.
int64_t even_slot_stride(const CacheTensor& c, int head_dim) {
  if (c.head_stride != head_dim) return -1;
  if (c.page_size == 1) return c.page_stride;
  return c.page_stride == c.page_size * c.slot_stride ? c.slot_stride : -1;
}

// The rows kernel's parameters for a store_kv call into a cache of the input
// dtype, or false when the call's layout or sizes do not fit it.
template <class T>
bool store_rows_params(const RopeKVParams& p, StoreRowsParams& s) {
  constexpr int W = chunk_elems<T, false, true>();
  const int64_t kc = even_slot_stride(p.k_cache, p.head_dim), vc = even_slot_stride(p.v_cache, p.v_head_dim);
  const int64_t k_units = int64_t(p.num_k_heads) * p.head_dim / W, v_units = int64_t(p.num_v_heads) * p.v_head_dim / W;
  const auto fits = [](int64_t x) { return x >= 0 && x <= INT32_MAX; };
  if (p.k.head_stride != p.head_dim || p.v.head_stride != p.v_head_dim || kc < 0 || vc < 0) return false;
  if (!fits(p.k.token_stride) || !fits(p.v.token_stride) || !fits(kc) || !fits(vc) || !fits(p.num_slots)) return false;
  if (std::max(k_units, v_units) < kStoreRowsMinThreads || std::max(k_units, v_units) > UINT16_MAX) return false;
  s.loc = p.loc;
  s.k = p.k.ptr;
  s.v = p.v.ptr;
  s.k_cache = p.k_cache.ptr;
  s.v_cache = p.v_cache.ptr;
  s.k_token_stride = int32_t(p.k.token_stride);
  s.v_token_stride = int32_t(p.v.token_stride);
  s.k_slot_stride = int32_t(kc);
  s.v_slot_stride = int32_t(vc);
  s.num_slots = int32_t(p.num_slots);
  s.k_units = uint16_t(k_units);
  s.v_units = uint16_t(v_units);
  return true;
}

// COLUMN: a row has more chunks than a block has threads, and blockIdx.y picks
// the block's part of it. Only then is blockIdx.y read: that special-register
// read came before the slot's load and cost 0.03-0.07 µs at 32-2048 tokens
// (benchmarks/NOTES.md, v18). TOKENS: tokens per block (1, or 2 with COLUMN
// false: threadIdx.y picks the token; the launcher covers an even token count
// with whole blocks, so no token is out of range).
template <class T, IndexType I, bool PDL, bool COLUMN, int TOKENS = 1>
__global__ void __launch_bounds__(kStoreRowsThreads * TOKENS) store_kv_rows_kernel(const StoreRowsParams p) {
  static_assert(TOKENS == 1 || (TOKENS == 2 && !COLUMN), "two tokens per block only for rows of one block");
  constexpr int W = chunk_elems<T, false, true>();
  const int64_t t = TOKENS == 1 ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * TOKENS + threadIdx.y;
  const int i = COLUMN ? int(blockIdx.y) * kStoreRowsThreads + int(threadIdx.x) : int(threadIdx.x);
  int64_t slot = -1;
  if constexpr (!PDL) slot = load_index<I>(p.loc, false, t);
  const bool has_k = i < p.k_units, has_v = i < p.v_units;
  const T* const k_src = static_cast<const T*>(p.k) + t * p.k_token_stride + i * W;
  const T* const v_src = static_cast<const T*>(p.v) + t * p.v_token_stride + i * W;
  if constexpr (PDL) {
    // The addresses are made while the previous kernel runs; its outputs may be
    // this call's inputs, so every load comes after the wait.
    wait_for_previous_kernel();
    slot = load_index<I>(p.loc, false, t);
  }
  Chunk<T, W> kx, vx;
  if (has_k) kx = load_chunk<T, W, true>(k_src);
  if (has_v) vx = load_chunk<T, W, true>(v_src);
  if (!slot_in_range(slot, p.num_slots)) return;
  if (has_k) store_chunk<T, W, true>(static_cast<T*>(p.k_cache) + slot * p.k_slot_stride + i * W, kx);
  if (has_v) store_chunk<T, W, true>(static_cast<T*>(p.v_cache) + slot * p.v_slot_stride + i * W, vx);
}

// ---- Large calls with narrow heads: rows of heads per warp ------------------
// A row is 32 lanes over 32/P heads x P chunk columns of one kind (P: the
// kind's units per head, a power of two of at most 32). In the row kernel a
// warp owns N consecutive rows of one kind, so a lane carries the same column
// of N heads: N times the bytes in flight per warp, one cos/sin load for N
// heads. Measured (benchmarks/NOTES.md, v10): gpt-oss shape (head 64) fused at
// 32768 tokens 260.6 -> 247.5 µs with N = 2 (bf16 cache) and 270.9 -> 239.2 µs
// with N = 4 (fp8 cache); with head 128 (Llama) 318.2 -> 325-330, slower, and
// below about 2048 tokens slower for both. So only large calls that write the
// cache and whose rotated half is at most kRowsMaxRotUnits chunks take it: RoPE
// alone in the gpt-oss shape ran slower in it (208.8 -> 216.9 µs at 32768
// tokens, v10).
constexpr int kRowsMaxRotUnits = 4;
constexpr int kRowsMinTokensPerSM = 32;

struct RowLayout {
  int warp_end[4] = {};   // cumulative warps per token, by UnitKind
  int col_shift[4] = {};  // log2 of the kind's units per head
  int heads[4] = {};      // 0: the call has no unit of that kind
  int warps = 0;
};

// The row layout of a call, or warps == 0 when some kind's units per head is
// not a power of two of at most 32.
template <int N>
RowLayout make_row_layout(const RopeKVParams& p, const UnitLayout& L) {
  const int per_head[4] = {L.rot_units, L.rot_units, L.tail_units, L.v_units};
  const int shift[4] = {L.rot_shift, L.rot_shift, L.tail_shift, L.v_shift};
  const int heads[4] = {p.num_q_heads, p.num_k_heads, p.num_k_heads, p.num_v_heads};
  RowLayout R;
  int warps = 0;
  for (int k = 0; k < 4; ++k) {
    const bool present = per_head[k] > 0 && heads[k] > 0;
    if (present && (shift[k] < 0 || per_head[k] > 32)) return RowLayout{};
    const int rows = present ? (heads[k] * per_head[k] + 31) / 32 : 0;
    warps += (rows + N - 1) / N;
    R.warp_end[k] = warps;
    R.col_shift[k] = present ? shift[k] : 0;
    R.heads[k] = present ? heads[k] : 0;
  }
  R.warps = warps;
  return R;
}

// Warp w (counted within kind K) of token t on: lane's column of the heads
// head0, head0 + 32/P, ... (N of them, fewer at the end of the kind). The
// same per-token work as run_plan, for N chunks at once; the CPU and the unit
// kernel compute the same bits (the tests compare them).
template <class T, class C, bool NEOX, int N, UnitKind K>
__device__ __forceinline__ void run_rows(const RopeKVParams& p, const RowLayout& R, int w, int lane, int64_t t,
                                         bool pdl) {
  constexpr int W = chunk_elems<T, NEOX, true>();
  constexpr bool kQ = K == UnitKind::q_rot, kTail = K == UnitKind::k_tail, kV = K == UnitKind::v;
  constexpr bool kRotates = K == UnitKind::q_rot || K == UnitKind::k_rot;
  const bool writes = !kQ && p.write_cache;
  TokenIndex ix;
  if (!pdl) ix = load_token_index(p, kRotates, writes, t);
  const TokenTensor& x = kQ ? p.q : kV ? p.v : p.k;
  const CacheTensor& cache = kV ? p.v_cache : p.k_cache;
  const Scale& scale_of = kV ? p.v_scale : p.k_scale;
  const int col_shift = R.col_shift[int(K)];
  const int head_shift = 5 - col_shift;  // log2 of heads per row
  const int head0 = ((w * N) << head_shift) + (lane >> col_shift);
  const int j = lane & ((1 << col_shift) - 1);
  const int heads = R.heads[int(K)];
  const int valid = head0 < heads ? min(N, ((heads - 1 - head0) >> head_shift) + 1) : 0;
  const int d = (kTail ? p.rot_dim : 0) + j * W;
  T* const x0 = static_cast<T*>(x.ptr) + head0 * x.head_stride + d;
  const int64_t x_step = x.head_stride << head_shift;
  C* const c0 = writes ? static_cast<C*>(cache.ptr) + head0 * cache.head_stride + d : nullptr;
  const int64_t c_step = cache.head_stride << head_shift;
  const int cs_col = NEOX ? j * W : j * W / 2;
  const int half = p.rot_dim / 2;
  wait_for_previous_kernel();
  if (pdl) ix = load_token_index(p, kRotates, writes, t);
  float scale[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    scale[k] = scale_of.value;
    if (!std::is_same_v<T, C> && writes && k < valid && scale_of.ptr)
      scale[k] = scale_of.ptr[(head0 + (k << head_shift)) * scale_of.head_stride];
  }
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
#pragma unroll 1
  for (;;) {
    T* const xt = x0 + t * x.token_stride;
    Chunk<T, W> lo[N], hi[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < valid) {
        lo[k] = load_chunk<T, W, true>(xt + k * x_step);
        if constexpr (kRotates && NEOX) hi[k] = load_chunk<T, W, true>(xt + k * x_step + half);
      }
    }
    if constexpr (kRotates) {
      if (rotates_at(p, ix.pos)) {
        const CosSin<NEOX, W> cs = load_cos_sin_pairs<NEOX, W>(p, ix.pos * p.rot_dim + cs_col);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          if (k < valid) {
            rotate_chunk<T, NEOX, W>(cs, lo[k], hi[k]);
            store_chunk<T, W, true>(xt + k * x_step, lo[k]);
            if constexpr (NEOX) store_chunk<T, W, true>(xt + k * x_step + half, hi[k]);
          }
        }
      }
    }
    if (writes && writes_slot(p, ix.slot)) {
      C* const dst = c0 + slot_offset(ix.slot, cache.page_stride, cache.slot_stride, cache.page_size);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (k < valid) {
          const CacheScale sc = std::is_same_v<T, C> ? CacheScale{} : cache_scale(scale[k]);
          write_cache_chunk<T, C, W, true, true>(dst + k * c_step, sc, lo[k]);
          if constexpr (kRotates && NEOX) write_cache_chunk<T, C, W, true, true>(dst + k * c_step + half, sc, hi[k]);
        }
      }
    }
    t += stride;
    if (t >= p.num_tokens) break;
    ix = load_token_index(p, kRotates, writes, t);
  }
}

// threadIdx.x / 32 and blockIdx.y pick the warp of a token, threadIdx.y and
// blockIdx.x the first token (as rope_kv_kernel). The kind is the same for a
// whole warp by construction. Up to 128 registers: N chunks (and their NeoX
// partners) stay in registers across the loads.
template <class T, class C, bool NEOX, int N>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, 1)
    rope_kv_rows_kernel(const RowLayout R, bool pdl, const RopeKVParams p) {
  const int w = int(blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32);
  const int lane = int(threadIdx.x % 32);
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (w >= R.warps || t >= p.num_tokens) return;
  if (w < R.warp_end[0]) return run_rows<T, C, NEOX, N, UnitKind::q_rot>(p, R, w, lane, t, pdl);
  if (w < R.warp_end[1]) return run_rows<T, C, NEOX, N, UnitKind::k_rot>(p, R, w - R.warp_end[0], lane, t, pdl);
  if (w < R.warp_end[2]) return run_rows<T, C, NEOX, N, UnitKind::k_tail>(p, R, w - R.warp_end[1], lane, t, pdl);
  run_rows<T, C, NEOX, N, UnitKind::v>(p, R, w - R.warp_end[2], lane, t, pdl);
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
// cache is keyed by the kernel itself: every instantiation has the same
// function pointer type, so a cache keyed by that type would hand one
// kernel's occupancy to another (benchmarks/NOTES.md, v8: fp8 store_kv at
// 32768 tokens took 103.8 µs with the shared cache, 79.0 µs without).
template <auto Kernel>
int blocks_per_sm(int threads, int device) {
  static std::atomic<int> cached[kMaxDevices][kMaxThreadsPerBlock / 32 + 1] = {};
  const int w = (threads + 31) / 32;
  if (device < 0 || device >= kMaxDevices || w > kMaxThreadsPerBlock / 32) return 1;
  int n = cached[device][w].load(std::memory_order_relaxed);
  if (n == 0) {
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, threads, 0), "reading the occupancy");
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

// Launches kernel(args...) with the shape, on the stream, with programmatic
// dependent launch when asked.
template <class Kernel, class... Args>
void launch(Kernel kernel, const LaunchShape& shape, uintptr_t stream, bool enable_pdl, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.stream = reinterpret_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = enable_pdl ? 1 : 0;
  check(cudaLaunchKernelEx(&config, kernel, args...), "kernel launch");
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
    if constexpr (ROT && WIDE) {
      // Two rows per warp into a cache of the input dtype, four into an fp8
      // one (measured best for each, benchmarks/NOTES.md, v10).
      constexpr int N = std::is_same_v<T, C> ? 2 : 4;
      if (p.write_cache && p.num_tokens >= int64_t(kRowsMinTokensPerSM) * sms && L.rot_units <= kRowsMaxRotUnits) {
        const RowLayout R = make_row_layout<N>(p, L);
        if (R.warps > 0) {
          constexpr auto kernel = rope_kv_rows_kernel<T, C, NEOX, N>;
          const LaunchShape shape = launch_shape(R.warps * 32, p.num_tokens, sms, kMaxThreadsPerBlock, kMaxThreadsPerBlock,
                                                 [&](int threads) { return blocks_per_sm<kernel>(threads, device); });
          launch(kernel, shape, stream, enable_pdl, R, enable_pdl, p);
          return;
        }
      }
    }
    if constexpr (!ROT && WIDE && std::is_same_v<T, C>) {
      StoreRowsParams sr;
      const bool small_enough = !enable_pdl || p.num_tokens * L.total <= kStoreRowsMaxUnitsPDL;
      if (small_enough && p.num_tokens <= INT32_MAX && store_rows_params<T>(p, sr)) {
        const int per_token = (std::max(sr.k_units, sr.v_units) + 31) / 32 * 32;
        LaunchShape shape;
        shape.block = dim3(unsigned(std::min(per_token, kStoreRowsThreads)));
        shape.grid = dim3(unsigned(p.num_tokens), unsigned((per_token + shape.block.x - 1) / shape.block.x));
        const bool pairs = !enable_pdl && shape.grid.y == 1 && p.num_tokens % 2 == 0 &&
                           p.num_tokens > kStoreRowsPairMinTokens && p.num_tokens <= kStoreRowsPairMaxTokens;
        if (pairs) {
          shape.block.y = 2;
          shape.grid.x = unsigned(p.num_tokens / 2);
        }
        auto go = [&](auto index_type, auto column) {
          constexpr IndexType I = decltype(index_type)::value;
          constexpr bool COLUMN = decltype(column)::value;
          if (enable_pdl) return launch(store_kv_rows_kernel<T, I, true, COLUMN>, shape, stream, true, sr);
          if constexpr (!COLUMN) {
            if (pairs) return launch(store_kv_rows_kernel<T, I, false, false, 2>, shape, stream, false, sr);
          }
          launch(store_kv_rows_kernel<T, I, false, COLUMN>, shape, stream, false, sr);
        };
        auto with_index = [&](auto column) {
          if (p.loc_i64) return go(IndexTag<IndexType::i64>{}, column);
          go(IndexTag<IndexType::i32>{}, column);
        };
        if (shape.grid.y > 1) return with_index(std::true_type{});
        return with_index(std::false_type{});
      }
    }
    if constexpr (WIDE && sizeof(T) == 2) {
      const IndexType index_type = index_type_of(p);
      // Rotating calls of kLargeMinTokensPerSM tokens per SM or more that the
      // row kernel did not take run the large-call kernel; smaller calls may
      // run the small kernel. Both need a compiled head size.
      const bool large = ROT && p.num_tokens >= int64_t(kLargeMinTokensPerSM) * sms && p.num_tokens <= INT32_MAX;
      if (const int d = large ? compiled_head_dim<ROT>(p) : small_call_head_dim<ROT>(p, L, index_type, enable_pdl)) {
        constexpr bool kSplitK = kSmallSplitK<T, C, NEOX, ROT>;
        // The small kernel's NeoX q and k units are half as wide (SmallUnit::kNarrow):
        // twice as many per head. Both kernels read only the layout's cumulative
        // counts (with_small_unit), so those are all that is rescaled.
        const int rot = !large && NEOX ? 2 : 1;
        SmallLayout<T, C, NEOX, ROT> S = {};
        if constexpr (kSplitK) {  // k first, small_fp8_k_threads(d) threads per unit
          S.k_end = (L.k_rot_end - L.q_end) * small_fp8_k_threads(d);
          S.q_end = S.k_end + L.q_end * rot;
          S.total = S.q_end + (L.total - L.k_rot_end);
        } else if constexpr (ROT) {  // heads rotated whole: no tail units
          S = L;
          S.q_end = L.q_end * rot;
          S.k_rot_end = S.k_tail_end = S.q_end + (L.k_rot_end - L.q_end) * rot;
          S.total = S.k_tail_end + (L.total - L.k_tail_end);
        } else {
          S = L;
        }
        LaunchShape shape;
        if (large) {  // a token per block, two units per thread
          shape.block = dim3(unsigned(((S.total + 1) / 2 + 31) / 32 * 32));
          shape.grid = dim3(unsigned(p.num_tokens));
        } else {
          const int threads = ROT ? kSmallRotThreadsPerBlock : std::min(kMaxThreadsPerBlock, (S.total + 31) / 32 * 32);
          shape.block = dim3(unsigned(threads));
          shape.grid = dim3(unsigned(p.num_tokens), unsigned((S.total + threads - 1) / threads));
        }
        auto go = [&](auto dim, auto index_type) {
          constexpr int D = decltype(dim)::value;
          constexpr IndexType I = decltype(index_type)::value;
          if constexpr (ROT) {
            if (large) return launch(rope_kv_large_kernel<T, C, NEOX, D, ROT>, shape, stream, enable_pdl, S, p);
            if (enable_pdl) return launch(rope_kv_small_kernel<T, C, NEOX, D, ROT, I, true>, shape, stream, true, S, p);
          }
          launch(rope_kv_small_kernel<T, C, NEOX, D, ROT, I, false>, shape, stream, false, S, p);
        };
        auto with_index = [&](auto dim) {  // (the large-call kernel takes any index dtype)
          if (index_type == IndexType::i64) go(dim, IndexTag<IndexType::i64>{});
          else go(dim, IndexTag<IndexType::i32>{});
        };
        if (shape.block.x <= unsigned(kMaxThreadsPerBlock)) {
          if (d == 64) with_index(std::integral_constant<int, 64>{});
          else if (d == 128) with_index(std::integral_constant<int, 128>{});
          else with_index(std::integral_constant<int, 256>{});
          return;
        }
      }
    }
    auto launch_units = [&](auto index_type) {
      constexpr auto kernel = rope_kv_kernel<T, C, NEOX, WIDE, ROT, decltype(index_type)::value>;
      const LaunchShape shape = launch_shape(L.total, p.num_tokens, sms, kMaxThreadsPerBlock,
                                             ROT ? kSmallCallThreadsPerBlock : kMaxThreadsPerBlock,
                                             [&](int threads) { return blocks_per_sm<kernel>(threads, device); });
      launch(kernel, shape, stream, enable_pdl, L, enable_pdl, p);
    };
    // Calls of up to kTypedIndexMaxTokens tokens that rotate on the wide path
    // know their index dtype at compile time (see IndexType).
    if constexpr (ROT && WIDE) {
      if (p.num_tokens <= kTypedIndexMaxTokens) {
        switch (index_type_of(p)) {
          case IndexType::i64: return launch_units(IndexTag<IndexType::i64>{});
          case IndexType::i32: return launch_units(IndexTag<IndexType::i32>{});
          default: break;
        }
      }
    }
    if constexpr (!ROT && WIDE && std::is_same_v<T, C>) {
      const int per_token = ((L.total + 1) / 2 + 31) / 32 * 32;
      LaunchShape shape;
      shape.block = dim3(unsigned(per_token), unsigned(std::max(1, kStorePairThreads / per_token)));
      const int64_t token_blocks = (p.num_tokens + shape.block.y - 1) / shape.block.y;
      shape.grid = dim3(unsigned(token_blocks));
      const bool large_enough = enable_pdl ? p.num_tokens * L.total >= kStorePairMinUnitsPDL
                                           : p.num_tokens >= kStorePairMinTokens;
      if (large_enough && per_token <= kStorePairThreads && L.tail_shift >= 0 && L.v_shift >= 0 &&
          token_blocks <= INT32_MAX) {
        const StorePairParams sp = store_pair_params(p, L);
        if (enable_pdl) return launch(store_kv_pairs_kernel<T, true>, shape, stream, true, sp);
        return launch(store_kv_pairs_kernel<T, false>, shape, stream, false, sp);
      }
    }
    launch_units(IndexTag<IndexType::any>{});
  });
  if (current != device) check(cudaSetDevice(current), "cudaSetDevice");
}

}  // namespace ropekv
