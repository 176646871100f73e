// The one operation behind every public entry point, described as independent
// "units" of work so that the CUDA kernel (one unit per thread) and the CPU
// loop (units in order) run the same code.
//
// Per token, the units are, in order:
//   q rotation   Hq heads x rot_units   rotate a chunk of each query head in place
//   k rotation   Hk heads x rot_units   rotate a chunk of each key head in place and,
//                                       when writing the cache, store it there too
//   k tail       Hk heads x tail_units  copy the unrotated tail R..D-1 into the cache
//   v copy       Hv heads x v_units     copy the value into the cache
// store_kv is this operation with no query heads and rotary dim 0 (all of k is
// "tail"); RoPE alone is it with the cache write switched off.
#pragma once

#include <type_traits>

#include "ropekv/numeric.h"

namespace ropekv {

// An input viewed as [T, H, D] with the last dimension contiguous.
struct TokenTensor {
  void* ptr = nullptr;
  int64_t token_stride = 0;  // in elements
  int64_t head_stride = 0;   // in elements
};

// A cache viewed as [pages, page_size, H, D]. 3-D caches are pages of one slot.
struct CacheTensor {
  void* ptr = nullptr;
  int64_t page_stride = 0;  // in elements
  int64_t slot_stride = 0;  // in elements, used when page_size > 1
  int64_t head_stride = 0;  // in elements
  int64_t page_size = 1;
};

// fp8 scale: a device/host pointer to fp32 (one value, or one per head), or a
// plain value when ptr is null.
struct Scale {
  const float* ptr = nullptr;
  int64_t head_stride = 0;  // 0: one scale for all heads, 1: per head
  float value = 1.0f;
};

// Field order matters on the GPU: a kernel reads its parameters through the
// constant cache a line at a time, so the fields most units read before their
// first load or store (token count, index and cos/sin pointers, the slot
// count, flags) come first (benchmarks/NOTES.md, v12 and v15).
struct RopeKVParams {
  int64_t num_tokens = 0;
  const void* positions = nullptr;
  const void* cos_sin = nullptr;
  int64_t max_pos = 0;
  const void* loc = nullptr;
  int64_t num_slots = 0;  // slots both caches hold (SPEC.md: others are not written)
  int rot_dim = 0;      // 0: no rotation
  DType cos_sin_dtype = DType::f32;
  bool positions_i64 = false;
  bool loc_i64 = false;
  bool cos_sin_vec4 = false;  // fp32, 16-byte aligned, rot_dim % 4 == 0: float4 loads
  bool write_cache = false;
  bool neox = true;
  bool paged = false;  // a cache has pages of more than one slot
  TokenTensor q, k, v;
  int num_q_heads = 0;  // 0: no query
  int num_k_heads = 0;
  int head_dim = 0;     // of q and k
  int num_v_heads = 0;
  int v_head_dim = 0;
  CacheTensor k_cache, v_cache;
  Scale k_scale, v_scale;
};

// Elements per unit: a 16-byte vector of the input dtype on the wide path;
// on the narrow path one element (NeoX pairs) or one pair (interleaved).
template <class T, bool NEOX, bool WIDE>
constexpr int chunk_elems() {
  return WIDE ? int(16 / sizeof(T)) : (NEOX ? 1 : 2);
}

// Per-token unit counts, derived on the host once per call.
struct UnitLayout {
  int rot_units = 0;   // per head: chunks of the rotated part
  int tail_units = 0;  // per head: chunks of the unrotated tail (cache write only)
  int v_units = 0;     // per head
  // log2 of each count above when it is a power of two (the usual case), else
  // -1: a unit's head is then a shift instead of an integer division.
  int rot_shift = -1, tail_shift = -1, v_shift = -1;
  int q_end = 0, k_rot_end = 0, k_tail_end = 0, total = 0;  // cumulative per token
};

inline int log2_if_power_of_two(int n) {
  if (n <= 0 || (n & (n - 1)) != 0) return -1;
  int s = 0;
  while ((1 << s) < n) ++s;
  return s;
}

template <class T, bool NEOX, bool WIDE>
inline UnitLayout make_layout(const RopeKVParams& p) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  UnitLayout L;
  L.rot_units = (NEOX ? p.rot_dim / 2 : p.rot_dim) / W;
  L.tail_units = p.write_cache ? (p.head_dim - p.rot_dim) / W : 0;
  L.v_units = p.write_cache ? p.v_head_dim / W : 0;
  L.rot_shift = log2_if_power_of_two(L.rot_units);
  L.tail_shift = log2_if_power_of_two(L.tail_units);
  L.v_shift = log2_if_power_of_two(L.v_units);
  L.q_end = p.num_q_heads * L.rot_units;
  L.k_rot_end = L.q_end + p.num_k_heads * L.rot_units;
  L.k_tail_end = L.k_rot_end + p.num_k_heads * L.tail_units;
  L.total = L.k_tail_end + p.num_v_heads * L.v_units;
  return L;
}

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uint64_t(bytes) == 0;
}

// Whether every access of the wide path is a whole, aligned vector: the
// chunk must divide each run of elements and every stride, and each base
// pointer must be aligned to a chunk of its own type.
template <class T, class C, bool NEOX>
inline bool wide_path_ok(const RopeKVParams& p) {
  constexpr int W = chunk_elems<T, NEOX, true>();
  const int rot_step = NEOX ? 2 * W : W;
  bool ok = p.rot_dim % rot_step == 0 && (p.head_dim - p.rot_dim) % W == 0;
  auto tensor_ok = [&](const TokenTensor& x) {
    return aligned_to(x.ptr, W * sizeof(T)) && x.token_stride % W == 0 && x.head_stride % W == 0;
  };
  auto cache_ok = [&](const CacheTensor& c) {
    return aligned_to(c.ptr, W * sizeof(C)) && c.page_stride % W == 0 &&
           c.slot_stride % W == 0 && c.head_stride % W == 0;
  };
  if (p.num_q_heads > 0) ok = ok && tensor_ok(p.q);
  ok = ok && tensor_ok(p.k);
  if (p.write_cache) {
    ok = ok && p.v_head_dim % W == 0 && tensor_ok(p.v) && cache_ok(p.k_cache) && cache_ok(p.v_cache);
  }
  return ok;
}

// ---- small access helpers ---------------------------------------------------

// The dtype of a call's token indices (positions and slots), as kernels know
// it: `any` reads each index as its flag says (the CPU; on the GPU, store_kv
// and calls of more than a few tokens); i32 and i64 mean every index the call
// reads has that dtype, so the load needs no test. On the GPU the test sat
// between a small call's start and its first load: RoPE and fused calls of 1
// to 32 tokens took 0.10-0.20 µs longer with it (benchmarks/NOTES.md, v12).
enum class IndexType : int { any, i32, i64 };
template <IndexType I> using IndexTag = std::integral_constant<IndexType, I>;

template <IndexType I = IndexType::any>
ROPEKV_HD int64_t load_index(const void* ptr, bool is_i64, int64_t i) {
  if constexpr (I == IndexType::i64) return static_cast<const int64_t*>(ptr)[i];
  else if constexpr (I == IndexType::i32) return static_cast<const int32_t*>(ptr)[i];
  else return is_i64 ? static_cast<const int64_t*>(ptr)[i] : int64_t(static_cast<const int32_t*>(ptr)[i]);
}

// The one IndexType that fits every index a call reads, or `any`.
inline IndexType index_type_of(const RopeKVParams& p) {
  const bool rotates = p.rot_dim > 0;
  const bool all64 = (!rotates || p.positions_i64) && (!p.write_cache || p.loc_i64);
  const bool all32 = (!rotates || !p.positions_i64) && (!p.write_cache || !p.loc_i64);
  return all64 ? IndexType::i64 : all32 ? IndexType::i32 : IndexType::any;
}

ROPEKV_HD float load_cos_sin(const void* ptr, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f16: return to_float(static_cast<const half_t*>(ptr)[i]);
    case DType::bf16: return to_float(static_cast<const bf16_t*>(ptr)[i]);
    default: return static_cast<const float*>(ptr)[i];
  }
}

#if defined(__CUDACC__)
// N consecutive floats from src, 16-byte aligned (8-byte for N == 2), as
// float4 (float2) loads.
template <int N>
__device__ __forceinline__ void load_floats_vec(const float* src, float (&out)[N]) {
  static_assert(N % 4 == 0 || N == 2, "whole float4 or one float2");
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int e = 0; e < N; e += 4) {
      const float4 f = *reinterpret_cast<const float4*>(src + e);
      out[e] = f.x; out[e + 1] = f.y; out[e + 2] = f.z; out[e + 3] = f.w;
    }
  } else {
    const float2 f = *reinterpret_cast<const float2*>(src);
    out[0] = f.x; out[1] = f.y;
  }
}
#endif

// N consecutive cos or sin values from element i of the table. When the table
// allows it (p.cos_sin_vec4; i is then a multiple of min(N, 4)), as 16- or
// 8-byte loads.
template <int N>
ROPEKV_HD void load_cos_sin_run(const RopeKVParams& p, int64_t i, float (&out)[N]) {
#if defined(__CUDA_ARCH__)
  if constexpr (N % 4 == 0 || N == 2) {
    if (p.cos_sin_vec4) {
      load_floats_vec<N>(static_cast<const float*>(p.cos_sin) + i, out);
      return;
    }
  }
#else
  // The CPU: one dtype test per run rather than per value, so the copy vectorizes.
  if (p.cos_sin_dtype == DType::f32) {
    std::memcpy(out, static_cast<const float*>(p.cos_sin) + i, sizeof(out));
    return;
  }
#endif
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = load_cos_sin(p.cos_sin, p.cos_sin_dtype, i + e);
}

// Copies N elements; when WIDE, as one aligned vector (16, 8, 4 or 2 bytes).
template <class T, int N, bool WIDE>
ROPEKV_HD void copy_chunk(T* dst, const T* src) {
  constexpr int kBytes = int(sizeof(T)) * N;
  if constexpr (WIDE && kBytes >= 2) {
#if defined(__CUDA_ARCH__)
    if constexpr (kBytes == 16) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    else if constexpr (kBytes == 8) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
    else if constexpr (kBytes == 4) *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
    else *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
#else
    std::memcpy(dst, src, kBytes);
#endif
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

template <class T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Chunk {
  T e[N];
};

template <class T, int N, bool WIDE>
ROPEKV_HD Chunk<T, N> load_chunk(const T* src) {
  Chunk<T, N> c;
  copy_chunk<T, N, WIDE>(c.e, src);
  return c;
}

template <class T, int N, bool WIDE>
ROPEKV_HD void store_chunk(T* dst, const Chunk<T, N>& c) {
  copy_chunk<T, N, WIDE>(dst, c.e);
}

// Where a slot starts in a cache, in elements. Unpaged caches (page_size 1)
// need one multiply; paged ones a division, 32-bit when the values allow it.
ROPEKV_HD int64_t slot_offset(int64_t slot, int64_t page_stride, int64_t slot_stride, int64_t page_size) {
  if (page_size == 1) return slot * page_stride;
  const int64_t page = (uint64_t(slot) | uint64_t(page_size)) <= 0xffffffffu
                           ? int64_t(uint32_t(slot) / uint32_t(page_size))
                           : slot / page_size;
  return page * page_stride + (slot - page * page_size) * slot_stride;
}

// Stores a chunk into a cache. With EVICT_FIRST, on the GPU 16-, 8- and 4-byte
// chunks are marked evict-first (st.global.cs): this kernel never reads the
// cache, so the rows it writes should not push the call's q, k, v and cos/sin
// rows out of L2 (benchmarks/NOTES.md, v8: fused calls of 2048 tokens 14.7 ->
// 12.3 µs). Calls that only copy (store_kv) store plainly: for them it cost
// 1.3% at 32768 tokens and gained only with PDL on 1-token calls (0.13 µs).
template <class C, int N, bool WIDE, bool EVICT_FIRST>
ROPEKV_HD void store_cache_chunk(C* dst, const Chunk<C, N>& c) {
#if defined(__CUDA_ARCH__)
  constexpr int kBytes = int(sizeof(C)) * N;
  if constexpr (EVICT_FIRST && WIDE && kBytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(c.e);
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
    return;
  } else if constexpr (EVICT_FIRST && WIDE && kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(c.e);
    asm volatile("st.global.cs.v2.u32 [%0], {%1, %2};" ::"l"(dst), "r"(v.x), "r"(v.y) : "memory");
    return;
  } else if constexpr (EVICT_FIRST && WIDE && kBytes == 4) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(c.e);
    asm volatile("st.global.cs.u32 [%0], %1;" ::"l"(dst), "r"(v) : "memory");
    return;
  }
#endif
  store_chunk<C, N, WIDE>(dst, c);
}

// Writes N input elements to a cache element; `scale` is the head's fp8 scale
// from cache_scale<SCALED> (unused when the cache holds the input dtype). Two
// exact ways to divide (benchmarks/NOTES.md, v19, A/B of wheels, µs):
// - SCALED: every scale through its power of two (see CacheScale), no branch.
//   For the small kernel, where each instruction before the store sits on a
//   chain of round trips (Llama fp8 fused 1 / 32 tokens 1.80 / 2.00 -> 1.74 /
//   1.92), and the rows kernel (gpt-oss fp8 fused 32768 tokens 248.5 -> 238.8).
// - not SCALED: scales in the reciprocal's range through it, the others through
//   the IEEE division, a branch per chunk. For the unit kernel, whose fp8 calls
//   are near the SMs' instruction rate (SCALED there: store_kv 2048 / 32768
//   tokens 5.66 / 78.3 -> 6.07 / 81.1, fused 2048 11.73 -> 12.23).
template <class T, class C, int N, bool WIDE, bool EVICT_FIRST, bool SCALED = true>
ROPEKV_HD void write_cache_chunk(C* dst, const CacheScale& scale, const Chunk<T, N>& x) {
  if constexpr (std::is_same_v<T, C>) {
    store_cache_chunk<C, N, WIDE, EVICT_FIRST>(dst, x);
  } else {
    Chunk<C, N> out;
    if constexpr (SCALED) {
#pragma unroll
      for (int i = 0; i < N; ++i) out.e[i] = convert_to_cache<T, C>(x.e[i], scale);
    } else if (scale.r != 0.0f) {  // once per chunk, not per element
#pragma unroll
      for (int i = 0; i < N; ++i) out.e[i] = Elem<C>::store(divide<false>(Elem<T>::load(x.e[i]), scale));
    } else {
#if defined(__CUDA_ARCH__)
      // The IEEE division runs in a loop that is not unrolled, so that one copy
      // of its code rather than N sits in the kernel beside the fast path
      // (benchmarks/NOTES.md, v16: fp8 fused calls of 128 tokens 2.87 -> 2.77 µs).
      float f[N];
#pragma unroll
      for (int i = 0; i < N; ++i) f[i] = Elem<T>::load(x.e[i]);
#pragma unroll 1
      for (int i = 0; i < N; ++i) f[i] = div_rn(f[i], scale.s);
#pragma unroll
      for (int i = 0; i < N; ++i) out.e[i] = Elem<C>::store(f[i]);
#else
      // The CPU, which always divides (r is 0 there), keeps the loop unrolled.
#pragma unroll
      for (int i = 0; i < N; ++i) out.e[i] = convert_to_cache<T, C>(x.e[i], scale);
#endif
    }
    store_cache_chunk<C, N, WIDE, EVICT_FIRST>(dst, out);
  }
}

// What unit u does for every token, resolved once per thread: its input
// element at token 0, the cache element at slot 0, the cos/sin column. The
// per-token work (run_plan) is then a few loads, the math and the stores, with
// no decoding and no choice between tensors left in it.
template <class T, class C>
struct UnitPlan {
  T* x = nullptr;           // first input element of the unit, token 0
  int64_t x_stride = 0;     // token stride of that input
  C* cache = nullptr;       // cache element (head, d) of slot 0; null: no cache write
  int64_t page_stride = 0;  // of that cache
  int64_t slot_stride = 0;
  int64_t page_size = 1;
  int cs_col = 0;           // first cos column the unit reads (rotation units)
  bool rotate = false;      // q or k rotation unit
  // The head's fp8 scale (fp8 caches only): read by read_plan_scale, since
  // planning reads no memory. Its reciprocal is prepared where the cache is
  // written, not once per thread: then the first token waits for the scale's
  // load before issuing its own loads (benchmarks/NOTES.md, v9: fp8 fused
  // calls of 1 token 2.35 -> 2.45 µs when prepared once per thread).
  const float* scale_ptr = nullptr;
  float scale = 1.0f;
};

// The four kinds of unit, in the order of the comment at the top of this file.
enum class UnitKind : int { q_rot, k_rot, k_tail, v };
template <UnitKind K> using KindTag = std::integral_constant<UnitKind, K>;

// Calls f(KindTag<kind of unit u>{}). ROT = false: the call has no rotation
// units (q_end == k_rot_end == 0), and those kinds are not instantiated.
template <bool ROT, class F>
ROPEKV_HD void with_unit_kind(const UnitLayout& L, int u, F&& f) {
  if constexpr (ROT) {
    if (u < L.q_end) return f(KindTag<UnitKind::q_rot>{});
    if (u < L.k_rot_end) return f(KindTag<UnitKind::k_rot>{});
  }
  if (u < L.k_tail_end) return f(KindTag<UnitKind::k_tail>{});
  f(KindTag<UnitKind::v>{});
}

// Unit u of a token, of kind K. The kind is a template argument so that each
// field is a fixed kernel parameter (a runtime choice between tensors made
// the GPU read parameters by computed index, on the path to the first load),
// and so that the GPU code of a kind carries only that kind's work. Reads no
// memory: with programmatic dependent launch the GPU plans while the previous
// kernel is still running.
template <class T, class C, bool NEOX, bool WIDE, UnitKind K>
ROPEKV_HD UnitPlan<T, C> plan_kind(const RopeKVParams& p, const UnitLayout& L, int u) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  constexpr bool kQ = K == UnitKind::q_rot, kTail = K == UnitKind::k_tail, kV = K == UnitKind::v;
  const TokenTensor& x = kQ ? p.q : kV ? p.v : p.k;
  const CacheTensor& cache = kV ? p.v_cache : p.k_cache;
  const int first = kQ ? 0 : K == UnitKind::k_rot ? L.q_end : kTail ? L.k_rot_end : L.k_tail_end;
  const int per_head = kV ? L.v_units : kTail ? L.tail_units : L.rot_units;
  const int shift = kV ? L.v_shift : kTail ? L.tail_shift : L.rot_shift;
  const int w = u - first;
  const int head = shift >= 0 ? w >> shift : w / per_head;
  const int j = w - head * per_head;
  const int d = kTail ? p.rot_dim + j * W : j * W;
  UnitPlan<T, C> out;
  out.rotate = !kTail && !kV;
  out.cs_col = NEOX ? j * W : j * W / 2;
  out.x = static_cast<T*>(x.ptr) + head * x.head_stride + d;
  out.x_stride = x.token_stride;
  if (!kQ && p.write_cache) {
    out.cache = static_cast<C*>(cache.ptr) + head * cache.head_stride + d;
    out.page_stride = cache.page_stride;
    out.slot_stride = cache.slot_stride;
    out.page_size = cache.page_size;
    if constexpr (!std::is_same_v<T, C>) {
      const Scale& s = kV ? p.v_scale : p.k_scale;
      if (s.ptr) out.scale_ptr = s.ptr + head * s.head_stride;
      else out.scale = s.value;
    }
  }
  return out;
}

// Unit u of a token, whatever its kind (the CPU plans every unit this way).
template <class T, class C, bool NEOX, bool WIDE, bool ROT>
ROPEKV_HD UnitPlan<T, C> plan_unit(const RopeKVParams& p, const UnitLayout& L, int u) {
  UnitPlan<T, C> out;
  with_unit_kind<ROT>(L, u, [&](auto kind) { out = plan_kind<T, C, NEOX, WIDE, decltype(kind)::value>(p, L, u); });
  return out;
}

// The memory read of a plan: its fp8 scale, when the scale is a tensor.
template <class T, class C>
ROPEKV_HD void read_plan_scale(UnitPlan<T, C>& plan) {
  if constexpr (!std::is_same_v<T, C>) {
    if (plan.scale_ptr) plan.scale = *plan.scale_ptr;
  }
}

// A token's indices, as one unit needs them: its cache slot when the unit
// writes the cache (else -1), its position when it rotates (else 0).
struct TokenIndex {
  int64_t slot = -1;
  int64_t pos = 0;
};

// SPEC.md: a token whose position is outside [0, max_pos) is left unrotated
// (and nothing outside the cos/sin table is read); a slot outside [0, S) is not
// written, S being the slots both caches hold.
ROPEKV_HD bool rotates_at(const RopeKVParams& p, int64_t pos) { return pos >= 0 && pos < p.max_pos; }

// SPEC.md §2: a padding slot (< 0) or one past the caches (a caller bug) is not written.
ROPEKV_HD bool slot_in_range(int64_t slot, int64_t num_slots) { return slot >= 0 && slot < num_slots; }
ROPEKV_HD bool writes_slot(const RopeKVParams& p, int64_t slot) { return slot_in_range(slot, p.num_slots); }

template <IndexType I = IndexType::any>
ROPEKV_HD TokenIndex load_token_index(const RopeKVParams& p, bool rotates, bool writes, int64_t t) {
  TokenIndex ix;
  if (writes) ix.slot = load_index<I>(p.loc, p.loc_i64, t);
  if (rotates) ix.pos = load_index<I>(p.positions, p.positions_i64, t);
  return ix;
}

// The cos/sin values a chunk of a rotated head needs: kPairs cosines from
// element `row` of the table on and the matching sines half a row further.
template <bool NEOX, int W>
struct CosSin {
  static constexpr int kPairs = NEOX ? W : W / 2;
  float c[kPairs], s[kPairs];
};

template <bool NEOX, int W>
ROPEKV_HD CosSin<NEOX, W> load_cos_sin_pairs(const RopeKVParams& p, int64_t row) {
  CosSin<NEOX, W> cs;
  load_cos_sin_run<CosSin<NEOX, W>::kPairs>(p, row, cs.c);
  load_cos_sin_run<CosSin<NEOX, W>::kPairs>(p, row + p.rot_dim / 2, cs.s);
  return cs;
}

// Rotates a chunk in registers. NeoX: lo holds elements [c, c+W) of the
// rotated part and hi their partners R/2 further on. Interleaved: lo holds
// W/2 adjacent pairs.
template <class T, bool NEOX, int W>
ROPEKV_HD void rotate_chunk(const CosSin<NEOX, W>& cs, Chunk<T, W>& lo, Chunk<T, W>& hi) {
  using E = Elem<T>;
#pragma unroll
  for (int i = 0; i < CosSin<NEOX, W>::kPairs; ++i) {
    T& a = NEOX ? lo.e[i] : lo.e[2 * i];
    T& b = NEOX ? hi.e[i] : lo.e[2 * i + 1];
    float ra, rb;
    rotate_pair(E::load(a), E::load(b), cs.c[i], cs.s[i], ra, rb);
    a = E::store(ra);
    b = E::store(rb);
  }
}

// One half of rotate_chunk's NeoX result, with the same roundings: the
// rotated lo (lo * c - hi * s) or, when `upper`, the rotated hi (hi * c +
// lo * s).
template <class T, int W>
ROPEKV_HD Chunk<T, W> rotate_half(const CosSin<true, W>& cs, const Chunk<T, W>& lo, const Chunk<T, W>& hi, bool upper) {
  using E = Elem<T>;
  Chunk<T, W> out;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float ra, rb;
    rotate_pair(E::load(lo.e[i]), E::load(hi.e[i]), cs.c[i], cs.s[i], ra, rb);
    out.e[i] = E::store(upper ? rb : ra);
  }
  return out;
}

// One unit of token t, whose indices the caller loaded (the GPU loads the
// next token's at the end of this one, and the first token's before
// planning). The input chunks are loaded before anything waits on the
// indices; positions outside [0, max_pos) are not rotated (and nothing
// outside the cos/sin table is read); slots outside [0, num_slots) are not
// written. ROT = false: the call rotates nothing.
template <class T, class C, bool NEOX, bool WIDE, bool ROT>
ROPEKV_HD void run_plan(const RopeKVParams& p, const UnitPlan<T, C>& u, int64_t t, const TokenIndex& ix) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  const int half = p.rot_dim / 2;
  T* x = u.x + t * u.x_stride;
  Chunk<T, W> lo = load_chunk<T, W, WIDE>(x), hi;
  if (ROT && u.rotate) {
    if constexpr (NEOX) hi = load_chunk<T, W, WIDE>(x + half);
    if (rotates_at(p, ix.pos)) {
      rotate_chunk<T, NEOX, W>(load_cos_sin_pairs<NEOX, W>(p, ix.pos * p.rot_dim + u.cs_col), lo, hi);
      store_chunk<T, W, WIDE>(x, lo);
      if constexpr (NEOX) store_chunk<T, W, WIDE>(x + half, hi);
    }
  }
  if (u.cache && writes_slot(p, ix.slot)) {
    C* dst = u.cache + slot_offset(ix.slot, u.page_stride, u.slot_stride, u.page_size);
    const CacheScale scale = std::is_same_v<T, C> ? CacheScale{} : cache_scale<false>(u.scale);
    write_cache_chunk<T, C, W, WIDE, ROT, false>(dst, scale, lo);
    if (NEOX && ROT && u.rotate) write_cache_chunk<T, C, W, WIDE, ROT, false>(dst + half, scale, hi);
  }
}

}  // namespace ropekv
