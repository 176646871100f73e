"""Runs a Plan on the compiled extension (ropekv._C): CPU or CUDA kernels.

Tensors cross into C++ through DLPack. fp8 caches travel as uint8 views with
their dtype passed alongside, since DLPack support for fp8 varies between
torch versions; the kernels only need the bytes.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from ._validate import Plan

try:
    from . import _C

    IMPORT_ERROR = None
except ImportError as e:  # the fallback takes over; _backend says why, once
    _C = None  # type: ignore[assignment]  # (_C.pyi describes the module when it is there)
    IMPORT_ERROR = e

# Must match ropekv::DType in cpp/include/ropekv/numeric.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 4,
}


def available() -> bool:
    return _C is not None


def serves(device: torch.device) -> bool:
    """Whether the compiled extension has kernels for tensors on this device."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_C.with_cuda) and torch.version.hip is None


def _capsule(t):
    """t as a DLPack capsule, fp8 as uint8 bytes. torch's C exporter rather than the
    Python ``Tensor.__dlpack__`` nanobind would call: the same capsule (no stream
    synchronization either way) in 0.5 instead of 3.2 µs (measured on the development
    machine), for each of the 8-10 tensors of every call."""
    if t is None:
        return None
    if t.dtype.itemsize == 1:
        t = t.view(torch.uint8)
    return _to_dlpack(t)


# The current CUDA stream's handle. torch's raw getter (what torch.compile's generated code
# calls) takes 0.3 µs on the H100 machine; current_stream(...).cuda_stream builds a Stream
# object first, 5 µs. The public route stays for a torch without the getter.
_raw_getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _raw_getter is None:
        return torch.cuda.current_stream(index).cuda_stream
    return int(_raw_getter(index))


def run(plan: Plan) -> None:
    k = plan.k
    stream = _stream(k.device) if k.device.type == "cuda" else 0
    _C.rope_kv(
        _capsule(plan.q),
        _capsule(k),
        _capsule(plan.v),
        _capsule(plan.k_cache),
        _capsule(plan.v_cache),
        DTYPE_CODES[plan.cache_dtype] if plan.cache_dtype is not None else DTYPE_CODES[k.dtype],
        _capsule(plan.loc),
        _capsule(plan.positions),
        _capsule(plan.cos_sin),
        plan.rot_dim,
        plan.neox,
        _capsule(plan.k_scale),
        plan.k_scale_value,
        _capsule(plan.v_scale),
        plan.v_scale_value,
        stream,
        plan.enable_pdl,
    )
