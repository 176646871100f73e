// Python bindings: DLPack tensors in (through nanobind's ndarray), parameters
// out to the launchers. No libtorch: the caller passes its CUDA stream as an
// integer. The Python layer has already validated and reshaped everything
// (python/ropekv/_native.py); the checks here only guard against misuse of
// this private module.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "launchers.h"

namespace nb = nanobind;

namespace ropekv {
namespace {

using OptArray = std::optional<nb::ndarray<>>;

DType input_dtype(const nb::ndarray<>& a) {
  const nb::dlpack::dtype d = a.dtype();
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32) return DType::f32;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 16) return DType::f16;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return DType::bf16;
  throw std::invalid_argument("ropekv._C: inputs must be float32, float16 or bfloat16");
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("ropekv._C: ") + what);
}

// [T, H, D] view, last dimension contiguous.
TokenTensor token_tensor(const nb::ndarray<>& a, const char* name) {
  require(a.ndim() == 3 && (a.shape(2) <= 1 || a.stride(2) == 1), name);
  return TokenTensor{a.data(), a.stride(0), a.stride(1)};
}

// [pages, page_size, H, D] view, last dimension contiguous.
CacheTensor cache_tensor(const nb::ndarray<>& a, const char* name) {
  require(a.ndim() == 4 && (a.shape(3) <= 1 || a.stride(3) == 1), name);
  CacheTensor c;
  c.ptr = a.data();
  c.page_stride = a.stride(0);
  c.page_size = int64_t(a.shape(1));
  c.slot_stride = a.stride(1);
  c.head_stride = a.stride(2);
  if (c.page_size == 1) c.slot_stride = 0;
  return c;
}

int64_t num_slots(const nb::ndarray<>& cache) { return int64_t(cache.shape(0)) * int64_t(cache.shape(1)); }

Scale scale(const OptArray& tensor, float value) {
  Scale s;
  s.value = value;
  if (tensor) {
    s.ptr = static_cast<const float*>(tensor->data());
    s.head_stride = tensor->size() > 1 ? tensor->stride(0) : 0;
  }
  return s;
}

void rope_kv(OptArray q, nb::ndarray<> k, OptArray v, OptArray k_cache, OptArray v_cache,
             int cache_dtype, OptArray loc, OptArray positions, OptArray cos_sin, int rot_dim,
             bool neox, OptArray k_scale, float k_scale_value, OptArray v_scale,
             float v_scale_value, uintptr_t stream, bool enable_pdl) {
  RopeKVParams p;
  const DType input = input_dtype(k);
  p.k = token_tensor(k, "k must be a [T, H, D] view");
  p.num_tokens = int64_t(k.shape(0));
  p.num_k_heads = int(k.shape(1));
  p.head_dim = int(k.shape(2));
  if (q) {
    p.q = token_tensor(*q, "q must be a [T, H, D] view");
    p.num_q_heads = int(q->shape(1));
    require(input_dtype(*q) == input && int(q->shape(2)) == p.head_dim, "q and k differ");
  }
  p.rot_dim = rot_dim;
  p.neox = neox;
  if (rot_dim > 0) {
    require(positions && cos_sin, "rotation needs positions and cos_sin");
    p.positions = positions->data();
    p.positions_i64 = positions->dtype().bits == 64;
    p.cos_sin = cos_sin->data();
    p.cos_sin_dtype = input_dtype(*cos_sin);
    p.max_pos = int64_t(cos_sin->shape(0));
    p.cos_sin_vec4 = p.cos_sin_dtype == DType::f32 && rot_dim % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(p.cos_sin) % 16 == 0;
    require(int(cos_sin->shape(1)) == rot_dim, "cos_sin width must equal rot_dim");
  }
  DType cache = input;
  if (v) {
    require(k_cache && v_cache && loc, "the cache write needs v, both caches and loc");
    p.write_cache = true;
    p.v = token_tensor(*v, "v must be a [T, H, D] view");
    p.num_v_heads = int(v->shape(1));
    p.v_head_dim = int(v->shape(2));
    p.k_cache = cache_tensor(*k_cache, "k_cache must be a [pages, page_size, H, D] view");
    p.v_cache = cache_tensor(*v_cache, "v_cache must be a [pages, page_size, H, D] view");
    p.num_slots = std::min(num_slots(*k_cache), num_slots(*v_cache));
    p.paged = p.k_cache.page_size > 1 || p.v_cache.page_size > 1;
    p.loc = loc->data();
    p.loc_i64 = loc->dtype().bits == 64;
    p.k_scale = scale(k_scale, k_scale_value);
    p.v_scale = scale(v_scale, v_scale_value);
    cache = DType(cache_dtype);
  }
  const int device_type = k.device_type();
  if (device_type == nb::device::cpu::value) {
    nb::gil_scoped_release release;
    rope_kv_cpu(p, input, cache);
    return;
  }
#if defined(ROPEKV_WITH_CUDA)
  if (device_type == nb::device::cuda::value) {
    rope_kv_cuda(p, input, cache, k.device_id(), stream, enable_pdl);
    return;
  }
#endif
  (void)stream;
  (void)enable_pdl;
  throw std::invalid_argument("ropekv._C: tensors on a device this build does not serve");
}

}  // namespace
}  // namespace ropekv

NB_MODULE(_C, m) {
  m.doc() = "ropekv compiled kernels (private; use the ropekv package)";
  m.def("rope_kv", &ropekv::rope_kv, nb::arg("q").none(), nb::arg("k"), nb::arg("v").none(),
        nb::arg("k_cache").none(), nb::arg("v_cache").none(), nb::arg("cache_dtype"),
        nb::arg("loc").none(), nb::arg("positions").none(), nb::arg("cos_sin").none(),
        nb::arg("rot_dim"), nb::arg("neox"), nb::arg("k_scale").none(), nb::arg("k_scale_value"),
        nb::arg("v_scale").none(), nb::arg("v_scale_value"), nb::arg("stream"),
        nb::arg("enable_pdl"),
        "Rotary embedding and/or KV-cache write, in place. See ropekv/rope_kv.h.");
#if defined(ROPEKV_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_architectures") = ROPEKV_CUDA_ARCHITECTURES;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_architectures") = "";
#endif
#if defined(ROPEKV_WITH_OPENMP)
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
