"""vLLM's KV-cache write and rotary embedding ops (``vllm._custom_ops``), backed by ropekv.

Swap the import and keep the calls::

    # from vllm import _custom_ops as ops
    from ropekv.compat import vllm as ops

    ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                kv_cache_dtype, layer._k_scale, layer._v_scale)
    ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)

Names, argument order and layouts are vLLM's (csrc/cache_kernels.cu and
csrc/pos_encoding_kernels.cu). fp8 caches are e4m3fn / e5m2 as on NVIDIA GPUs; ROCm's
e4m3fnuz is not supported.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .. import _execute
from .. import _validate as V

__all__ = ["reshape_and_cache_flash", "rotary_embedding"]

Scale = Union[None, float, torch.Tensor]

# vLLM's kv_cache_dtype strings; "auto" is the model's dtype (a bit copy).
KV_CACHE_DTYPES: Dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

_CACHE_NAMES = dict(k="key", v="value", k_cache="key_cache", v_cache="value_cache", loc="slot_mapping",
                    k_scale="k_scale", v_scale="v_scale")
_ROPE_NAMES = dict(q="query", k="key", positions="positions", cos_sin_cache="cos_sin_cache")


def _fp8_cache(name: str, cache: torch.Tensor, dtype: torch.dtype, kv_cache_dtype: str) -> torch.Tensor:
    """The cache as `dtype`: vLLM allocates fp8 caches as uint8 (or, newer, as the fp8 type)."""
    if not isinstance(cache, torch.Tensor):
        return cache  # validation names the wrong type
    if cache.dtype == torch.uint8:
        return cache.view(dtype)
    if cache.dtype != dtype:
        raise TypeError(f"{name} is {cache.dtype}, but kv_cache_dtype={kv_cache_dtype!r} stores {dtype} (or uint8)")
    return cache


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: Scale,
    v_scale: Scale,
) -> None:
    """Writes each token's key and value into its slot of a paged cache (vLLM's op).

    Args:
        key, value: ``[N, H, D]`` (also ``[N, H*D]``), float16 / bfloat16 / float32. N may exceed
            the number of slots (vLLM pads the batch): only the first ``len(slot_mapping)`` are written.
        key_cache, value_cache: ``[num_blocks, block_size, H, D]`` (any block and slot stride, e.g.
            ``kv_cache[:, 0]``); slot = block * block_size + offset. **Mutated.**
        slot_mapping: ``[T]`` int64 (or int32); negative slots are skipped.
        kv_cache_dtype: ``"auto"`` (the caches have key's dtype; a bit copy), or ``"fp8"`` /
            ``"fp8_e4m3"`` (float8_e4m3fn) or ``"fp8_e5m2"``; fp8 caches may be allocated as uint8.
        k_scale, v_scale: fp8 scales, cache = saturate(x / scale): a 1-element float32 tensor
            (vLLM's ``layer._k_scale``, read on the device) or a float. Ignored for ``"auto"``.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {kv_cache_dtype!r}")
    fp8 = KV_CACHE_DTYPES[kv_cache_dtype]
    if fp8 is None:
        k_scale = v_scale = None  # vLLM ignores them too
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            if isinstance(cache, torch.Tensor) and cache.dtype.itemsize == 1:
                raise TypeError(f"{name} is {cache.dtype}; kv_cache_dtype='auto' stores key's dtype "
                                f"(an fp8 cache needs kv_cache_dtype='fp8', 'fp8_e4m3' or 'fp8_e5m2')")
    else:
        key_cache = _fp8_cache("key_cache", key_cache, fp8, kv_cache_dtype)
        value_cache = _fp8_cache("value_cache", value_cache, fp8, kv_cache_dtype)
    if isinstance(slot_mapping, torch.Tensor) and slot_mapping.dim() == 1:
        n = slot_mapping.shape[0]
        if isinstance(key, torch.Tensor) and key.dim() > 0 and key.shape[0] > n:
            key = key[:n]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > n:
            value = value[:n]
    _execute(V.plan_store_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, False,
                             names=_CACHE_NAMES))


def _tokens(name: str, t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """[B, S, ...] as [B*S, ...] without a copy (the tensor is rotated in place)."""
    if batch_dims == 1 or not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    try:
        return t.view((-1,) + tuple(t.shape[2:]))
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {list(t.shape)} and strides {tuple(t.stride())} cannot be viewed as "
            f"[batch * seq_len, ...] without a copy"
        ) from None


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: Optional[torch.Tensor],
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """RoPE on ``query`` and ``key`` in place (vLLM's op).

    Args:
        positions: ``[T]`` or ``[B, S]``, int64 (or int32).
        query: ``[T, Hq*D]``, ``[T, Hq, D]``, ``[B, S, Hq*D]`` or ``[B, S, Hq, D]``,
            float16 / bfloat16 / float32. **Mutated.**
        key: like query with Hk heads, or None (only query is rotated). **Mutated.**
        head_size: D.
        cos_sin_cache: ``[max_pos, R]`` (cos in the first R/2 columns, sin in the rest), R <= D;
            float32, or query's dtype as vLLM keeps it.
        is_neox: NeoX (halves) pairs if True, GPT-J (interleaved) pairs if False.

    The first R elements of each head are rotated, the rest left as they are.
    """
    batch_dims = positions.dim() if isinstance(positions, torch.Tensor) else 1
    if batch_dims == 2:
        positions = positions.reshape(-1)  # read only: a copy would do
    query = _tokens("query", query, batch_dims)
    if key is None:
        # The kernels always rotate their k and optionally a q: the query is that k.
        plan = V.plan_rope(positions, None, query, head_size, cos_sin_cache, is_neox, False,
                           dict(_ROPE_NAMES, k="query"))
    else:
        key = _tokens("key", key, batch_dims)
        plan = V.plan_rope(positions, query, key, head_size, cos_sin_cache, is_neox, False, _ROPE_NAMES)
    _execute(plan)
