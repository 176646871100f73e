"""Type stubs for ropekv._C, the compiled kernels (cpp/src/bindings.cpp).

Private: python/ropekv/_native.py is its only caller, with tensors already
validated and viewed by python/ropekv/_validate.py. Tensors cross as DLPack
capsules (or any object nanobind imports as an ndarray: a tensor works too);
fp8 caches as uint8 views plus their dtype code.
"""

from typing import Any, Optional


Array = Any  # a DLPack capsule, or a torch.Tensor

with_cuda: bool
"""Whether the CUDA kernels were compiled in."""
with_openmp: bool
"""Whether the CPU kernels run on OpenMP threads."""
cuda_architectures: str
"""The CUDA architectures of the build (CMake syntax, e.g. "80-real;90-real"), "" without CUDA."""

def rope_kv(
    q: Optional[Array],
    k: Array,
    v: Optional[Array],
    k_cache: Optional[Array],
    v_cache: Optional[Array],
    cache_dtype: int,
    loc: Optional[Array],
    positions: Optional[Array],
    cos_sin: Optional[Array],
    rot_dim: int,
    neox: bool,
    k_scale: Optional[Array],
    k_scale_value: float,
    v_scale: Optional[Array],
    v_scale_value: float,
    stream: int,
    enable_pdl: bool,
) -> None:
    """Rotary embedding and/or KV-cache write, in place (cpp/include/ropekv/rope_kv.h).

    q, k, v: [T, H, D] views, last dimension contiguous; q is rotated when given and
    k when rot_dim > 0. k_cache, v_cache: [pages, page_size, H, D] views (uint8 for
    fp8); written when v is given, at the slots in loc. cache_dtype: the caches'
    ropekv::DType code. stream: the CUDA stream as an integer (0 on the CPU).
    """
