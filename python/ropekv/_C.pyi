"""Type stubs for ropekv._C, the compiled kernels (cpp/src/bindings.cpp).

Private: python/ropekv/_native.py is its only caller, with tensors already
validated and viewed by python/ropekv/_validate.py. Tensors cross as DLPack
arrays; fp8 caches as uint8 views plus their dtype code.
"""

from typing import Optional

import torch

with_cuda: bool
"""Whether the CUDA kernels were compiled in."""
with_openmp: bool
"""Whether the CPU kernels run on OpenMP threads."""
cuda_architectures: str
"""The CUDA architectures of the build (CMake syntax, e.g. "80-real;90-real"), "" without CUDA."""

def rope_kv(
    q: Optional[torch.Tensor],
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    cache_dtype: int,
    loc: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    cos_sin: Optional[torch.Tensor],
    rot_dim: int,
    neox: bool,
    k_scale: Optional[torch.Tensor],
    k_scale_value: float,
    v_scale: Optional[torch.Tensor],
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
