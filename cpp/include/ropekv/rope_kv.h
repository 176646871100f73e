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
  int64_t num_slots = 0;
};

// fp8 scale: a device/host pointer to fp32 (one value, or one per head), or a
// plain value when ptr is null.
struct Scale {
  const float* ptr = nullptr;
  int64_t head_stride = 0;  // 0: one scale for all heads, 1: per head
  float value = 1.0f;
};

struct RopeKVParams {
  int64_t num_tokens = 0;
  TokenTensor q, k, v;
  int num_q_heads = 0;  // 0: no query
  int num_k_heads = 0;
  int head_dim = 0;     // of q and k
  int num_v_heads = 0;
  int v_head_dim = 0;
  int rot_dim = 0;      // 0: no rotation
  bool neox = true;
  const void* positions = nullptr;
  bool positions_i64 = false;
  const void* cos_sin = nullptr;
  DType cos_sin_dtype = DType::f32;
  bool cos_sin_vec4 = false;  // fp32, 16-byte aligned, rot_dim % 4 == 0: float4 loads
  int64_t max_pos = 0;
  bool write_cache = false;
  CacheTensor k_cache, v_cache;
  Scale k_scale, v_scale;
  const void* loc = nullptr;
  bool loc_i64 = false;
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
  int q_end = 0, k_rot_end = 0, k_tail_end = 0, total = 0;  // cumulative per token
};

template <class T, bool NEOX, bool WIDE>
inline UnitLayout make_layout(const RopeKVParams& p) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  UnitLayout L;
  L.rot_units = (NEOX ? p.rot_dim / 2 : p.rot_dim) / W;
  L.tail_units = p.write_cache ? (p.head_dim - p.rot_dim) / W : 0;
  L.v_units = p.write_cache ? p.v_head_dim / W : 0;
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

ROPEKV_HD int64_t load_index(const void* ptr, bool is_i64, int64_t i) {
  return is_i64 ? static_cast<const int64_t*>(ptr)[i] : int64_t(static_cast<const int32_t*>(ptr)[i]);
}

ROPEKV_HD float load_cos_sin(const void* ptr, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f16: return to_float(static_cast<const half_t*>(ptr)[i]);
    case DType::bf16: return to_float(static_cast<const bf16_t*>(ptr)[i]);
    default: return static_cast<const float*>(ptr)[i];
  }
}

// N consecutive cos or sin values from element i of the table. When the table
// allows it (p.cos_sin_vec4; i is then a multiple of min(N, 4)), as 16- or
// 8-byte loads.
template <int N>
ROPEKV_HD void load_cos_sin_run(const RopeKVParams& p, int64_t i, float (&out)[N]) {
#if defined(__CUDA_ARCH__)
  if constexpr (N % 4 == 0 || N == 2) {
    if (p.cos_sin_vec4) {
      const float* src = static_cast<const float*>(p.cos_sin) + i;
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
      return;
    }
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

ROPEKV_HD int64_t cache_slot_offset(const CacheTensor& c, int64_t slot) {
  if (c.page_size == 1) return slot * c.page_stride;
  return (slot / c.page_size) * c.page_stride + (slot % c.page_size) * c.slot_stride;
}

ROPEKV_HD float scale_for_head(const Scale& s, int head) {
  return s.ptr ? s.ptr[head * s.head_stride] : s.value;
}

// Writes N input elements into the cache at (slot, head, d); `scale` is the
// head's fp8 scale (unused when the cache holds the input dtype).
template <class T, class C, int N, bool WIDE>
ROPEKV_HD void write_cache_chunk(const CacheTensor& cache, float scale, int64_t slot,
                                 int head, int d, const Chunk<T, N>& x) {
  C* dst = static_cast<C*>(cache.ptr) + cache_slot_offset(cache, slot) + head * cache.head_stride + d;
  if constexpr (std::is_same_v<T, C>) {
    store_chunk<T, N, WIDE>(dst, x);
  } else {
    Chunk<C, N> out;
#pragma unroll
    for (int i = 0; i < N; ++i) out.e[i] = convert_to_cache<T, C>(x.e[i], scale);
    store_chunk<C, N, WIDE>(dst, out);
  }
}

// What unit u of every token does: which tensor, which head, which element.
// Decoded once per thread on the GPU (a thread keeps its unit across tokens).
struct Unit {
  enum Kind : int { kQRot, kKRot, kKTail, kVCopy } kind;
  int head;
  int j;  // chunk index within the head (rotation) or first element (copies)
  // The head's fp8 scale (fp8 caches only), read once here: read where the
  // cache is written, it added a dependent memory round trip to every unit.
  float scale;
};

template <class T, class C>
ROPEKV_HD Unit decode_unit(const RopeKVParams& p, const UnitLayout& L, int u, int w) {
  Unit out;
  int per_head;
  if (u < L.q_end) {
    out.kind = Unit::kQRot; per_head = L.rot_units;
  } else if (u < L.k_rot_end) {
    out.kind = Unit::kKRot; u -= L.q_end; per_head = L.rot_units;
  } else if (u < L.k_tail_end) {
    out.kind = Unit::kKTail; u -= L.k_rot_end; per_head = L.tail_units;
  } else {
    out.kind = Unit::kVCopy; u -= L.k_tail_end; per_head = L.v_units;
  }
  out.head = u / per_head;
  out.j = u - out.head * per_head;
  if (out.kind == Unit::kKTail) out.j = p.rot_dim + out.j * w;
  if (out.kind == Unit::kVCopy) out.j = out.j * w;
  out.scale = 1.0f;
  if (!std::is_same_v<T, C> && p.write_cache && out.kind != Unit::kQRot) {
    out.scale = scale_for_head(out.kind == Unit::kVCopy ? p.v_scale : p.k_scale, out.head);
  }
  return out;
}

// A unit's work is split in two so that a thread can issue the loads of
// several tokens before it waits on any of them (memory-level parallelism):
// load_unit reads the indices and the input chunk, finish_unit reads cos/sin,
// computes and writes.
//
// NeoX rotation chunk j: elements [jW, jW+W) paired with the W elements R/2
// further on. Interleaved: elements [jW, jW+W), W/2 adjacent pairs.
template <class T, bool NEOX, int W>
struct UnitData {
  static constexpr int kPairs = NEOX ? W : W / 2;
  Chunk<T, W> lo, hi;  // hi: NeoX partners only
  int64_t pos;
  int64_t slot;
  bool rotate;
};

template <class T, bool NEOX, bool WIDE>
ROPEKV_HD void load_unit(const RopeKVParams& p, const Unit& unit, int64_t t,
                         UnitData<T, NEOX, chunk_elems<T, NEOX, WIDE>()>& d) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  const bool rot = unit.kind == Unit::kQRot || unit.kind == Unit::kKRot;
  const bool needs_slot = unit.kind != Unit::kQRot && p.write_cache;
  d.slot = needs_slot ? load_index(p.loc, p.loc_i64, t) : -1;
  if (rot) {
    const TokenTensor& x = unit.kind == Unit::kQRot ? p.q : p.k;
    const T* head_ptr = static_cast<const T*>(x.ptr) + t * x.token_stride + unit.head * x.head_stride;
    d.pos = load_index(p.positions, p.positions_i64, t);
    d.lo = load_chunk<T, W, WIDE>(head_ptr + unit.j * W);
    if constexpr (NEOX) d.hi = load_chunk<T, W, WIDE>(head_ptr + unit.j * W + p.rot_dim / 2);
    d.rotate = d.pos >= 0 && d.pos < p.max_pos;
  } else {
    const TokenTensor& x = unit.kind == Unit::kKTail ? p.k : p.v;
    d.lo = load_chunk<T, W, WIDE>(static_cast<const T*>(x.ptr) + t * x.token_stride +
                                  unit.head * x.head_stride + unit.j);
    d.rotate = false;
  }
}

// Rotates the chunk in registers. The cos/sin values are read here, four
// pairs at a time, to keep few registers live.
template <class T, bool NEOX, int W>
ROPEKV_HD void rotate_unit(const RopeKVParams& p, const Unit& unit, UnitData<T, NEOX, W>& d) {
  using E = Elem<T>;
  constexpr int kPairs = UnitData<T, NEOX, W>::kPairs;
  constexpr int kRun = kPairs >= 4 ? 4 : kPairs;
  const int64_t row = d.pos * p.rot_dim + (NEOX ? unit.j * W : unit.j * W / 2);
#pragma unroll
  for (int r0 = 0; r0 < kPairs; r0 += kRun) {
    float c[kRun], s[kRun];
    load_cos_sin_run<kRun>(p, row + r0, c);
    load_cos_sin_run<kRun>(p, row + p.rot_dim / 2 + r0, s);
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      const int i = r0 + e;
      T& a = NEOX ? d.lo.e[i] : d.lo.e[2 * i];
      T& b = NEOX ? d.hi.e[i] : d.lo.e[2 * i + 1];
      float ra, rb;
      rotate_pair(E::load(a), E::load(b), c[e], s[e], ra, rb);
      a = E::store(ra);
      b = E::store(rb);
    }
  }
}

// Positions outside [0, max_pos) are not rotated (and nothing outside the
// cos/sin cache is read); slots outside [0, num_slots) are not written.
template <class T, class C, bool NEOX, bool WIDE>
ROPEKV_HD void finish_unit(const RopeKVParams& p, const Unit& unit, int64_t t,
                           UnitData<T, NEOX, chunk_elems<T, NEOX, WIDE>()>& d) {
  constexpr int W = chunk_elems<T, NEOX, WIDE>();
  if (unit.kind == Unit::kQRot || unit.kind == Unit::kKRot) {
    if (d.rotate) {
      rotate_unit<T, NEOX, W>(p, unit, d);
      const TokenTensor& x = unit.kind == Unit::kQRot ? p.q : p.k;
      T* head_ptr = static_cast<T*>(x.ptr) + t * x.token_stride + unit.head * x.head_stride;
      store_chunk<T, W, WIDE>(head_ptr + unit.j * W, d.lo);
      if constexpr (NEOX) store_chunk<T, W, WIDE>(head_ptr + unit.j * W + p.rot_dim / 2, d.hi);
    }
    if (unit.kind == Unit::kKRot && d.slot >= 0 && d.slot < p.k_cache.num_slots) {
      write_cache_chunk<T, C, W, WIDE>(p.k_cache, unit.scale, d.slot, unit.head, unit.j * W, d.lo);
      if constexpr (NEOX) {
        write_cache_chunk<T, C, W, WIDE>(p.k_cache, unit.scale, d.slot, unit.head,
                                         unit.j * W + p.rot_dim / 2, d.hi);
      }
    }
    return;
  }
  const bool is_k = unit.kind == Unit::kKTail;
  const CacheTensor& cache = is_k ? p.k_cache : p.v_cache;
  if (d.slot < 0 || d.slot >= cache.num_slots) return;
  write_cache_chunk<T, C, W, WIDE>(cache, unit.scale, d.slot, unit.head, unit.j, d.lo);
}

template <class T, class C, bool NEOX, bool WIDE>
ROPEKV_HD void run_unit(const RopeKVParams& p, const Unit& unit, int64_t t) {
  UnitData<T, NEOX, chunk_elems<T, NEOX, WIDE>()> d;
  load_unit<T, NEOX, WIDE>(p, unit, t, d);
  finish_unit<T, C, NEOX, WIDE>(p, unit, t, d);
}

}  // namespace ropekv
