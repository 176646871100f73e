// Runtime dtypes and flags -> template arguments, shared by the CPU and CUDA
// launchers so both instantiate exactly the same set of kernels.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "ropekv/rope_kv.h"

namespace ropekv {

template <class T> struct Tag { using type = T; };

// Calls f(Tag<T>{}, Tag<C>{}, bool_constant<NEOX>, bool_constant<WIDE>,
// bool_constant<ROT>). ROT is false for calls that rotate nothing (store_kv):
// their kernels carry no rotation code and need far fewer registers, and the
// NeoX flag means nothing to them, so they exist only with NEOX = false.
// Caches hold the input dtype or fp8; the Python layer rejects anything else
// before a call gets here. The index dtypes (int32/int64 positions and slots)
// are not template arguments here: each is one load per token behind a branch
// that is uniform across the grid. Only the CUDA launcher adds kernels compiled
// for one index dtype, for small rotating calls, where that branch measured
// 0.1-0.2 µs (IndexType in ropekv/rope_kv.h).
template <class F>
void dispatch_rope_kv(DType input, DType cache, bool neox, bool wide, bool rot, F&& f) {
  auto with_wide = [&](auto t, auto c, auto n, auto r) {
    if (wide) f(t, c, n, std::true_type{}, r);
    else f(t, c, n, std::false_type{}, r);
  };
  auto with_neox = [&](auto t, auto c) {
    if (!rot) with_wide(t, c, std::false_type{}, std::false_type{});
    else if (neox) with_wide(t, c, std::true_type{}, std::true_type{});
    else with_wide(t, c, std::false_type{}, std::true_type{});
  };
  auto with_cache = [&](auto t) {
    using T = typename decltype(t)::type;
    if (cache == Elem<T>::code) with_neox(t, Tag<T>{});
    else if (cache == DType::e4m3) with_neox(t, Tag<e4m3_t>{});
    else if (cache == DType::e5m2) with_neox(t, Tag<e5m2_t>{});
    else throw std::invalid_argument("ropekv: cache dtype must equal the input dtype or be fp8");
  };
  switch (input) {
    case DType::f32: with_cache(Tag<float>{}); break;
    case DType::f16: with_cache(Tag<half_t>{}); break;
    case DType::bf16: with_cache(Tag<bf16_t>{}); break;
    default: throw std::invalid_argument("ropekv: inputs must be float32, float16 or bfloat16");
  }
}

// Picks the wide path when every access allows it.
inline bool use_wide_path(const RopeKVParams& p, DType input, DType cache) {
  bool wide = false;
  dispatch_rope_kv(input, cache, p.neox, false, p.rot_dim > 0, [&](auto t, auto c, auto n, auto, auto) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    wide = wide_path_ok<T, C, decltype(n)::value>(p);
  });
  return wide;
}

}  // namespace ropekv
