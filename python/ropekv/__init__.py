"""ropekv: fused RoPE and KV-cache write kernels for LLM inference.

Public API:

- :func:`store_kv` writes new keys and values into a KV cache, K and V in one launch.
- :func:`apply_rope_with_cos_sin_cache_inplace` rotates query and key in place,
  optionally writing the rotated key and the value into the cache in the same
  launch (:class:`FusedSetKVBufferArg`); drop-in for sgl-kernel's function.
- :func:`rope_and_store` is the same operation with keyword arguments.
- :func:`info` reports the version and the backends this build has.

Each call is validated here, in Python, then runs as a torch custom op
(``torch.ops.ropekv.store_kv`` / ``torch.ops.ropekv.rope``), so the functions work
the same in eager mode, under ``torch.compile`` and in CUDA graphs.
:mod:`ropekv.compat` holds drop-in replacements for sgl-kernel's and vLLM's functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from . import _backend, _native, _ops
from . import _validate as V
from ._version import __version__

Scale = Union[None, float, torch.Tensor]

__all__ = [
    "__version__",
    "store_kv",
    "apply_rope_with_cos_sin_cache_inplace",
    "FusedSetKVBufferArg",
    "rope_and_store",
    "info",
]


def _execute(plan: V.Plan) -> None:
    if plan.check:
        V.check_indices(plan)
    _ops.run(plan)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    loc: torch.Tensor,
    *,
    k_scale: Scale = None,
    v_scale: Scale = None,
    check: bool = False,
    enable_pdl: bool = False,
) -> None:
    """Writes ``k[t]`` and ``v[t]`` into slot ``loc[t]`` of ``k_cache`` / ``v_cache``, in one launch.

    Args:
        k: ``[T, Hk, Dk]`` or ``[T, Hk*Dk]``, float16 / bfloat16 / float32, last dim contiguous
            (views into a fused qkv tensor are fine).
        v: ``[T, Hv, Dv]`` or ``[T, Hv*Dv]``, same dtype as ``k``.
        k_cache: ``[S, Hk, Dk]``, paged ``[pages, page_size, Hk, Dk]`` (slot = page * page_size + offset)
            or ``[S, Hk*Dk]``; k's dtype, or float8_e4m3fn / float8_e5m2. **Mutated.**
        v_cache: like ``k_cache`` with ``Hv, Dv`` and the same dtype and slot count. **Mutated.**
        loc: ``[T]`` int32 / int64 slot of each token. Negative entries are padding (skipped);
            entries >= S are never written (and raise ``IndexError`` with ``check=True``).
        k_scale, v_scale: fp8 scales (cache = saturate(x / scale)): a float, a 1-element fp32 tensor,
            or a per-head ``[H]`` fp32 tensor on the cache's device (read on the device). ``None`` = 1.0.
        check: validate ``loc`` against the cache size first (synchronizes). Also ``ROPEKV_CHECK=1``.
        enable_pdl: CUDA, sm_90+: launch with programmatic dependent launch, so the kernel's
            launch overlaps the end of the previous kernel on the stream.
    """
    plan = V.plan_store_kv(k, v, k_cache, v_cache, loc, k_scale, v_scale, check)
    plan.enable_pdl = bool(enable_pdl)
    _execute(plan)


@dataclasses.dataclass
class FusedSetKVBufferArg:
    """The KV-cache write fused into RoPE; the field names are sgl-kernel's.

    ``value`` ``[T, Hv*Dv]`` or ``[T, Hv, Dv]``; ``k_buffer`` / ``v_buffer`` caches as in
    :func:`store_kv` (mutated); ``cache_loc`` ``[T]`` slots; ``k_scale`` / ``v_scale`` fp8 scales.
    """

    value: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    k_scale: Scale = None
    v_scale: Scale = None
    cache_loc: Optional[torch.Tensor] = None


_SGL_NAMES = dict(q="query", k="key", positions="positions", cos_sin_cache="cos_sin_cache")
_FUSED_NAMES = dict(
    k="key",
    v="fused_set_kv_buffer_arg.value",
    k_cache="fused_set_kv_buffer_arg.k_buffer",
    v_cache="fused_set_kv_buffer_arg.v_buffer",
    loc="fused_set_kv_buffer_arg.cache_loc",
    k_scale="fused_set_kv_buffer_arg.k_scale",
    v_scale="fused_set_kv_buffer_arg.v_scale",
)


def apply_rope_with_cos_sin_cache_inplace(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    fused_set_kv_buffer_arg: Optional[FusedSetKVBufferArg] = None,
    enable_pdl: bool = False,
    *,
    check: bool = False,
) -> None:
    """Applies rotary embedding to ``query`` and ``key`` in place (sgl-kernel's signature).

    Args:
        positions: ``[T]`` int32 / int64 position of each token.
        query: ``[T, Hq*D]`` or ``[T, Hq, D]``, float16 / bfloat16 / float32. **Mutated.**
        key: ``[T, Hk*D]`` or ``[T, Hk, D]``, query's dtype. **Mutated.**
        head_size: D, even.
        cos_sin_cache: ``[max_pos, R]`` (R even, R <= D): row p holds cos(p f_i) for i < R/2, then
            sin(p f_i). float32 (float16 / bfloat16 accepted; math is fp32 either way).
        is_neox: True pairs (x[i], x[i+R/2]) (GPT-NeoX / Llama), False pairs (x[2i], x[2i+1]) (GPT-J).
        fused_set_kv_buffer_arg: when given, the same launch writes the rotated key and the value
            into the caches, with every rule of :func:`store_kv`.
        enable_pdl: CUDA, sm_90+: programmatic dependent launch (see :func:`store_kv`).
        check: raise ``IndexError`` for positions (and slots) out of range first (synchronizes).

    Elements R..D-1 of each head are left as they are. Positions outside the cos/sin cache are
    never read; those tokens are left unrotated.
    """
    plan = V.plan_rope(positions, query, key, head_size, cos_sin_cache, is_neox, check, _SGL_NAMES)
    if fused_set_kv_buffer_arg is not None:
        a = fused_set_kv_buffer_arg
        if not isinstance(a, FusedSetKVBufferArg) and not all(
            hasattr(a, f) for f in ("value", "k_buffer", "v_buffer", "cache_loc")
        ):
            raise TypeError(
                f"fused_set_kv_buffer_arg must be a FusedSetKVBufferArg, got {type(a).__name__}"
            )
        V.cache_write(plan, a.value, a.k_buffer, a.v_buffer, a.cache_loc,
                      getattr(a, "k_scale", None), getattr(a, "v_scale", None), _FUSED_NAMES)
    plan.enable_pdl = bool(enable_pdl)
    _execute(plan)


_NATIVE_NAMES = dict(q="q", k="k", positions="positions", cos_sin_cache="cos_sin_cache")


def rope_and_store(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    head_size: Optional[int] = None,
    is_neox: bool = True,
    v: Optional[torch.Tensor] = None,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    loc: Optional[torch.Tensor] = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    check: bool = False,
    enable_pdl: bool = False,
) -> None:
    """RoPE on ``q`` and ``k`` in place and, when ``v`` is given, the KV write of :func:`store_kv`.

    Same operation as :func:`apply_rope_with_cos_sin_cache_inplace` with the argument names
    of :func:`store_kv`.

    Args:
        positions: ``[T]`` int32 / int64 position of each token.
        q: ``[T, Hq*D]`` or ``[T, Hq, D]``, float16 / bfloat16 / float32. **Mutated.**
        k: ``[T, Hk*D]`` or ``[T, Hk, D]``, q's dtype. **Mutated.**
        cos_sin_cache: ``[max_pos, R]`` (R even, R <= D), cos then sin; float32 (or float16 / bfloat16).
        head_size: D; defaults to the last dimension of a 3-D ``k``.
        is_neox: NeoX pairs (x[i], x[i+R/2]) if True, GPT-J pairs (x[2i], x[2i+1]) if False.
        v, k_cache, v_cache, loc, k_scale, v_scale: the cache write, as in :func:`store_kv`
            (``k_cache`` and ``v_cache`` **mutated**; receives the rotated k). All four tensors
            or none.
        check, enable_pdl: as in :func:`store_kv` (check also covers the positions).
    """
    if head_size is None:
        if not isinstance(k, torch.Tensor) or k.dim() != 3:
            raise ValueError("head_size is required when k is not 3-D [T, H, D]")
        head_size = int(k.shape[-1])
    plan = V.plan_rope(positions, q, k, head_size, cos_sin_cache, is_neox, check, _NATIVE_NAMES)
    parts = dict(v=v, k_cache=k_cache, v_cache=v_cache, loc=loc)
    given = [n for n, x in parts.items() if x is not None]
    if given and len(given) != len(parts):
        missing = [n for n in parts if n not in given]
        raise ValueError(f"the cache write needs v, k_cache, v_cache and loc together; missing {', '.join(missing)}")
    if given:
        V.cache_write(plan, v, k_cache, v_cache, loc, k_scale, v_scale, V.STORE_NAMES)
    plan.enable_pdl = bool(enable_pdl)
    _execute(plan)


def info() -> Dict[str, Any]:
    """Version, compiled backends, and what each device type would use now."""
    C = _native._C
    cuda_ok = torch.cuda.is_available()
    return {
        "version": __version__,
        "extension": "ropekv._C" if C is not None else f"not importable: {_native.IMPORT_ERROR}",
        "compiled_cpu": C is not None,
        "compiled_cuda": bool(C is not None and C.with_cuda),
        "openmp": bool(C is not None and C.with_openmp),
        "cuda_architectures": (C.cuda_architectures if C is not None else ""),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if cuda_ok else None,
        "backend_cpu": _backend.name_of(_backend.backend_for(torch.device("cpu"))),
        "backend_cuda": (_backend.name_of(_backend.backend_for(torch.device("cuda"))) if cuda_ok else None),
        "requested_backend": _backend.requested(),
    }
