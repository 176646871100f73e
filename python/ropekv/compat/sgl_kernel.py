"""sgl-kernel's RoPE and KV-cache write entry points, backed by ropekv.

Swap the import and keep the calls::

    # from sgl_kernel import FusedSetKVBufferArg, apply_rope_with_cos_sin_cache_inplace, set_kv_buffer_kernel
    from ropekv.compat.sgl_kernel import (
        FusedSetKVBufferArg, apply_rope_with_cos_sin_cache_inplace, set_kv_buffer_kernel)

Names, argument order and defaults are sgl-kernel's (``sgl_kernel/elementwise.py``
and ``sgl_kernel/memory.py``). What ropekv accepts beyond sgl-kernel: ``k_scale`` /
``v_scale`` with fp8 caches in the fused write, int32 ``cache_loc``, float16 /
bfloat16 ``cos_sin_cache``, any even head size, negative slots as padding.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import FusedSetKVBufferArg, store_kv
from .. import apply_rope_with_cos_sin_cache_inplace as _rope

__all__ = ["FusedSetKVBufferArg", "apply_rope_with_cos_sin_cache_inplace", "set_kv_buffer_kernel"]

_pdl_ok: Dict[int, bool] = {}


def _supports_pdl(t: object) -> bool:
    """sgl-kernel's default for enable_pdl: on for CUDA devices of compute capability 9.0+."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda" or torch.version.hip is not None:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _pdl_ok:
        _pdl_ok[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _pdl_ok[index]


def apply_rope_with_cos_sin_cache_inplace(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    fused_set_kv_buffer_arg: Optional[FusedSetKVBufferArg] = None,
    enable_pdl: Optional[bool] = None,
) -> None:
    """RoPE on ``query`` and ``key`` in place, optionally fused with the KV-cache write.

    Args:
        positions: ``[T]`` int64 (or int32) position of each token.
        query: ``[T, Hq*D]`` (or ``[T, Hq, D]``), float16 / bfloat16 / float32. **Mutated.**
        key: ``[T, Hk*D]`` (or ``[T, Hk, D]``), query's dtype. **Mutated.**
        head_size: D.
        cos_sin_cache: ``[max_pos, R]``, cos in the first R/2 columns, sin in the rest.
        is_neox: NeoX (halves) pairs if True, GPT-J (interleaved) pairs if False.
        fused_set_kv_buffer_arg: writes the rotated key and ``value`` into ``k_buffer`` /
            ``v_buffer`` (``[S, H*D]`` as sglang passes them, **mutated**) at ``cache_loc``.
        enable_pdl: programmatic dependent launch; ``None`` (sgl-kernel's default) enables it for
            the fused call on CUDA devices of compute capability 9.0 and newer.
    """
    if enable_pdl is None:
        enable_pdl = fused_set_kv_buffer_arg is not None and _supports_pdl(key)
    _rope(positions, query, key, head_size, cos_sin_cache, is_neox, fused_set_kv_buffer_arg, enable_pdl)


def _byte_copy(x: object, cache: object) -> bool:
    """Whether x and its cache hold the same 1-byte type (sglang's uint8 view of fp8)."""
    return (isinstance(x, torch.Tensor) and isinstance(cache, torch.Tensor)
            and x.dtype == cache.dtype and x.dtype.itemsize == 1)


def _as_words(name: str, t: torch.Tensor) -> torch.Tensor:
    """t viewed as 16-bit words, which ropekv copies bit for bit into a cache of the same type."""
    try:
        return t.view(torch.float16)
    except RuntimeError as e:
        raise ValueError(
            f"{name} ({t.dtype}, shape {list(t.shape)}) is copied as bytes, two at a time: its rows "
            f"must be an even number of bytes at even offsets ({e})"
        ) from None


def set_kv_buffer_kernel(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fallback: bool = False,
) -> None:
    """``k_cache[loc] = k`` and ``v_cache[loc] = v`` in one launch (sgl-kernel's argument order).

    Args:
        k_cache, v_cache: ``[S, H, D]`` or ``[S, H*D]`` caches. **Mutated.**
        loc: ``[T]`` int64 / int32 slots; negative entries are skipped.
        k, v: ``[T, H, D]`` or ``[T, H*D]``, the caches' dtype, or float16 / bfloat16 / float32
            converted to an fp8 cache (no scale).
        fallback: sgl-kernel's switch to its torch path (``k_cache[loc] = k``), which exists for
            shapes its kernel rejects. ropekv takes every shape, so the flag changes nothing;
            ``ROPEKV_BACKEND`` picks ropekv's backend.

    sglang keeps fp8 caches as uint8 and passes the already converted keys and values as
    uint8 too: tensors of 1-byte elements matching their cache are copied byte for byte.
    """
    del fallback  # accepted for sgl-kernel's signature; see the docstring
    if _byte_copy(k, k_cache):
        k, k_cache = _as_words("k", k), _as_words("k_cache", k_cache)
    if _byte_copy(v, v_cache):
        v, v_cache = _as_words("v", v), _as_words("v_cache", v_cache)
    store_kv(k, v, k_cache, v_cache, loc)
