// Element types and the per-element math, written once for host and device.
//
// Every backend (CUDA, CPU) rounds through these functions, and the pure-torch
// fallback performs the same IEEE operations in the same order, so all three
// produce the same bits. That is why the conversions are spelled out here
// instead of using cuda_fp16.h / cuda_bf16.h: the CPU build must not need the
// CUDA toolkit, and host and device must agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#define ROPEKV_HD __host__ __device__ __forceinline__
#else
#define ROPEKV_HD inline
#endif

namespace ropekv {

// Storage types. Each is a plain bit container; arithmetic happens in fp32.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
struct e4m3_t { uint8_t bits; };
struct e5m2_t { uint8_t bits; };

// Runtime dtype codes shared with the Python layer (python/ropekv/_native.py).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, e4m3 = 3, e5m2 = 4 };

ROPEKV_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ROPEKV_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE single operations that the CUDA compiler must not fuse into an FMA:
// an FMA rounds once where the CPU and torch round twice, and the backends
// would then disagree in the last bit.
ROPEKV_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ROPEKV_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ROPEKV_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ROPEKV_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round to nearest integer, ties to even (the default rounding mode on host).
ROPEKV_HD float rint_rn(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}

// ---- fp32 <-> bf16 -------------------------------------------------------
ROPEKV_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

ROPEKV_HD bf16_t bf16_from_float(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // The conversion instruction rounds to nearest-even like the code below;
  // only its NaN differs (0x7fff), so NaN keeps torch's 0x7fc0.
  if (f != f) return bf16_t{0x7fc0};
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return bf16_t{h};
#endif
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // NaN, as torch
  u += 0x7fffu + ((u >> 16) & 1u);                              // nearest-even
  return bf16_t{uint16_t(u >> 16)};
}

// ---- fp32 <-> fp16 -------------------------------------------------------
ROPEKV_HD float to_float(half_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float mag = mul_rn(float(man), 5.9604644775390625e-08f);
    return bits_float(sign | float_bits(mag));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

ROPEKV_HD half_t half_from_float(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};  // NaN, as torch
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal result, scale by 2^24 exactly
    const float m = rint_rn(mul_rn(bits_float(a), 16777216.0f));
    return half_t{uint16_t(sign | uint16_t(m))};
  }
  a += 0xfffu + ((a >> 13) & 1u);
  return half_t{uint16_t(sign | ((a - (112u << 23)) >> 13))};
}

// ---- fp32 -> fp8, saturating ---------------------------------------------
// EBITS/MBITS: exponent and mantissa widths. MAX_BITS: fp32 bits of the largest
// finite value, MAX_CODE its fp8 code. Values beyond it (infinities included)
// saturate to it; NaN stays NaN; everything else rounds to nearest-even.
template <int EBITS, int MBITS, uint32_t MAX_BITS, uint8_t MAX_CODE>
ROPEKV_HD uint8_t fp8_from_float(float f) {
  constexpr int kBias = (1 << (EBITS - 1)) - 1;
  constexpr uint32_t kMinNormalBits = uint32_t(127 - kBias + 1) << 23;
  // 2^(kBias - 1 + MBITS): maps the subnormal step to 1.
  constexpr float kSubScale = float(1u << (kBias - 1 + MBITS));
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= MAX_BITS) return uint8_t(sign | MAX_CODE);
  if (a < kMinNormalBits) {
    const float m = rint_rn(mul_rn(bits_float(a), kSubScale));
    return uint8_t(sign | uint8_t(m));
  }
  a += ((1u << (22 - MBITS)) - 1u) + ((a >> (23 - MBITS)) & 1u);
  return uint8_t(sign | uint8_t((a >> (23 - MBITS)) - (uint32_t(127 - kBias) << MBITS)));
}

// ---- traits: load as fp32, store from fp32 --------------------------------
template <class T> struct Elem;
template <> struct Elem<float> {
  static constexpr DType code = DType::f32;
  ROPEKV_HD static float load(float x) { return x; }
  ROPEKV_HD static float store(float f) { return f; }
};
template <> struct Elem<half_t> {
  static constexpr DType code = DType::f16;
  ROPEKV_HD static float load(half_t x) { return to_float(x); }
  ROPEKV_HD static half_t store(float f) { return half_from_float(f); }
};
template <> struct Elem<bf16_t> {
  static constexpr DType code = DType::bf16;
  ROPEKV_HD static float load(bf16_t x) { return to_float(x); }
  ROPEKV_HD static bf16_t store(float f) { return bf16_from_float(f); }
};
// On sm_89 and newer the conversion instruction (cvt.rn.satfinite) does exactly
// what fp8_from_float spells out: nearest-even, saturate to the largest
// finite value, NaN to NaN.
template <> struct Elem<e4m3_t> {  // float8_e4m3fn: max 448 (0x43e00000), code 0x7e
  static constexpr DType code = DType::e4m3;
  ROPEKV_HD static e4m3_t store(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return e4m3_t{uint8_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3))};
#else
    return e4m3_t{fp8_from_float<4, 3, 0x43e00000u, 0x7e>(f)};
#endif
  }
};
template <> struct Elem<e5m2_t> {  // float8_e5m2: max 57344 (0x47600000), code 0x7b
  static constexpr DType code = DType::e5m2;
  ROPEKV_HD static e5m2_t store(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return e5m2_t{uint8_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E5M2))};
#else
    return e5m2_t{fp8_from_float<5, 2, 0x47600000u, 0x7b>(f)};
#endif
  }
};

template <class T> constexpr bool is_fp8 = false;
template <> constexpr bool is_fp8<e4m3_t> = true;
template <> constexpr bool is_fp8<e5m2_t> = true;

// An fp8 cache's scale, ready for many divisions. On the GPU, where an IEEE
// division is a dozen instructions and a branch, x / s is computed from the
// correctly rounded reciprocal r: q = x*r, then two corrections with the exact
// residual x - s*q (an FMA). For normal x and q that is the correctly rounded
// quotient (Markstein), and a scale in [2^-64, 2^64] keeps every quotient the
// fp8 conversion can tell apart (|q| from 2^-17 to past 2^16) in that case:
// tinier quotients become 0 and larger ones saturate either way. Zero,
// infinities, NaN and quotients past fp32 keep q = x*r, which has the right
// sign and class.
//
// Scales outside that range are brought into it by a power of two p applied to
// both operands: x/s = (x*p)/(s*p) exactly, and x*p is exact wherever the
// quotient can matter (where x*p overflows, the quotient saturates; where it
// turns subnormal, the quotient is below 2^-126 and becomes 0). So every scale
// takes the same instructions, with no IEEE division beside them: that branch
// cost fp8 calls of 1-32 tokens about 0.07 µs (benchmarks/NOTES.md, v19). An
// infinite scale takes p = 0 (x*p = +-0, divided by +-inf: +-0, as x/inf; inf
// and NaN inputs give NaN, as inf/inf); a NaN scale gives NaN throughout.
//
// SCALED = false gives the unit kernel's form instead, measured faster there
// (see write_cache_chunk): s the scale itself, r its reciprocal for scales in
// the range and 0 for the others, which the caller divides by s (IEEE).
struct CacheScale {
  float s = 1.0f;  // the scale times p (the scale itself where p is 0)
  float r = 0.0f;  // 1/s, correctly rounded (GPU only)
  float p = 1.0f;  // the power of two each input is multiplied by first
};

template <bool SCALED = true>
ROPEKV_HD CacheScale cache_scale(float s) {
  CacheScale c;
  c.s = s;
#if defined(__CUDA_ARCH__)
  const float a = fabsf(s);
  const bool in_range = a >= 0x1p-64f && a <= 0x1p64f;
  if (!SCALED) {
    if (in_range) c.r = __frcp_rn(s);
    return c;
  }
  // Within the range p = 1; above it (to FLT_MAX) s * 2^-64 lies in (1, 2^64];
  // below it (subnormals and zero included) s * 2^127 lies in [2^-22, 2^63] or is
  // zero (x/0 is then x*2^127 / 0, the same infinity or NaN); NaN takes 2^127 too.
  c.p = in_range ? 1.0f : a > 0x1p64f ? (a <= 3.40282347e38f ? 0x1p-64f : 0.0f) : 0x1p127f;
  if (c.p != 0.0f) c.s = __fmul_rn(s, c.p);
  c.r = __frcp_rn(c.s);
#endif
  return c;
}

// x / s (the scale cache_scale<SCALED> was given), rounded to fp32 as an IEEE
// division would. On the GPU through the reciprocal (see CacheScale; with
// SCALED = false only where c.r != 0): both corrections are computed for every
// x and the special cases picked by a select rather than branches per element
// (benchmarks/NOTES.md, v8: fused RoPE + KV write into an fp8 cache 9% faster
// at 32768 tokens).
template <bool SCALED = true>
ROPEKV_HD float divide(float x, const CacheScale& c) {
#if defined(__CUDA_ARCH__)
  const float xp = SCALED ? __fmul_rn(x, c.p) : x;
  const float q = __fmul_rn(xp, c.r);
  const float q1 = __fmaf_rn(c.r, __fmaf_rn(-c.s, q, xp), q);
  const float q2 = __fmaf_rn(c.r, __fmaf_rn(-c.s, q1, xp), q1);
  return (xp == 0.0f || !(fabsf(q) <= 3.40282347e38f)) ? q : q2;
#else
  return div_rn(x, c.s);  // the CPU divides (cache_scale leaves s the scale there)
#endif
}

// The value a cache of type C holds for input element x: a bit copy when the
// types match, otherwise saturate(float(x) / scale) rounded to nearest-even.
template <class T, class C>
ROPEKV_HD C convert_to_cache(T x, const CacheScale& scale) {
  if constexpr (std::is_same_v<T, C>) {
    return x;
  } else {
    static_assert(is_fp8<C>, "caches hold the input dtype or fp8");
    return Elem<C>::store(divide(Elem<T>::load(x), scale));
  }
}

// One rotary pair (a, b) by angle with cosine c and sine s, in fp32, two
// roundings per product and one per sum: (a*c - b*s, b*c + a*s).
ROPEKV_HD void rotate_pair(float a, float b, float c, float s, float& out_a, float& out_b) {
  out_a = sub_rn(mul_rn(a, c), mul_rn(b, s));
  out_b = add_rn(mul_rn(b, c), mul_rn(a, s));
}

}  // namespace ropekv
