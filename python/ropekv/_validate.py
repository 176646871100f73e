"""Validation and normalization of every public call, in one place.

Everything here runs before any kernel, so a rejected call has written
nothing. The result is a :class:`Plan`: the same tensors as views the kernels
understand (inputs as ``[T, H, D]``, caches as ``[pages, page_size, H, D]``),
with every dtype, shape, stride and device rule of SPEC.md checked. Every
backend (CUDA, CPU, torch fallback) executes a Plan, so all of them reject the
same inputs with the same exceptions.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Dict, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_NAMES = "float16, bfloat16 or float32"
# Positive doubles that round to 0 resp. to inf as float32 (round to nearest even).
_FP32_ZERO_BELOW = 2.0**-150
_FP32_INF_FROM = 2.0**128 - 2.0**103


@dataclasses.dataclass
class Plan:
    """A validated call, as views every backend executes the same way."""

    k: torch.Tensor  # [T, Hk, D]; rotated in place when rot_dim > 0
    q: Optional[torch.Tensor] = None  # [T, Hq, D]; rotated in place
    positions: Optional[torch.Tensor] = None
    cos_sin: Optional[torch.Tensor] = None  # [max_pos, rot_dim]
    rot_dim: int = 0
    neox: bool = True
    v: Optional[torch.Tensor] = None  # [T, Hv, Dv]; present when writing the cache
    k_cache: Optional[torch.Tensor] = None  # [pages, page_size, Hk, D]
    v_cache: Optional[torch.Tensor] = None  # [pages, page_size, Hv, Dv]
    cache_dtype: Optional[torch.dtype] = None
    loc: Optional[torch.Tensor] = None
    k_scale: Optional[torch.Tensor] = None  # fp32, 1 or Hk elements, on the device
    k_scale_value: float = 1.0  # used when k_scale is None
    v_scale: Optional[torch.Tensor] = None
    v_scale_value: float = 1.0
    check: bool = False
    enable_pdl: bool = False  # CUDA: programmatic dependent launch
    loc_name: str = "loc"  # the caller's names, for check-mode messages
    positions_name: str = "positions"
    # The caller's tensors behind the views q, k, v, k_cache, v_cache: what the
    # torch ops (_ops.py) take, since torch.library wants a mutating op to
    # receive the very tensors it mutates; the op re-derives the views (views()).
    given: Dict[str, Optional[torch.Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.k.shape[0]

    @property
    def writes_cache(self) -> bool:
        return self.v is not None


def check_mode(check: bool) -> bool:
    return bool(check) or os.environ.get("ROPEKV_CHECK", "0") not in ("", "0")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, got {kind}")
    return t


def float_input(name: str, t) -> torch.Tensor:
    _require_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {t.dtype}")
    return t


def _last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension, got shape {_shape(t)} strides {tuple(t.stride())}"
        )


def token_heads(name: str, t: torch.Tensor, heads: int, dim: int, source: str = "") -> torch.Tensor:
    """Views a [T, H*D] or [T, H, D] input as [T, H, D] (never copies).

    source: where heads and dim came from, for the message (e.g. the cache).
    """
    _last_dim_contiguous(name, t)
    why = f" to match {source}" if source else ""
    if dim <= 0 and t.dim() in (2, 3):  # (as_heads cannot view [T, 0] as [T, H, 0])
        raise ValueError(f"{name} has shape {_shape(t)}: its head dim must be positive, got {dim}{why}")
    if t.dim() == 3:
        if tuple(t.shape[1:]) != (heads, dim):
            raise ValueError(f"{name} has shape {_shape(t)}, expected [T, {heads}, {dim}]{why}")
        return t
    if t.dim() == 2:
        if t.shape[1] != heads * dim:
            raise ValueError(
                f"{name} has shape {_shape(t)}, expected [T, {heads * dim}] ({heads} heads of {dim}){why}"
            )
        return as_heads(t, dim)
    raise ValueError(f"{name} must be 2-D [T, H*D] or 3-D [T, H, D], got shape {_shape(t)}")


def as_heads(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The [T, H, D] view of a checked [T, H*D] or [T, H, D] input (D = dim)."""
    if t.dim() == 3:
        return t
    # view rather than unflatten (the same view; unflatten's Python layer made it a tenth
    # of an eager call's host time on the H100 machine, with 6 of them per call).
    return t.view(t.shape[0], t.shape[1] // dim, dim) if dim > 0 else t.unflatten(1, (-1, dim))


def cache_pages(name: str, c: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Views a [S, H*D], [S, H, D] or [pages, page_size, H, D] cache as 4-D."""
    _last_dim_contiguous(name, c)
    if c.dim() == 2:
        if c.shape[1] != heads * dim:
            raise ValueError(f"{name} has shape {_shape(c)}, expected [S, {heads * dim}] ({heads} heads of {dim})")
    elif c.dim() == 3:
        if tuple(c.shape[1:]) != (heads, dim):
            raise ValueError(f"{name} has shape {_shape(c)}, expected [S, {heads}, {dim}]")
    elif c.dim() == 4:
        if tuple(c.shape[2:]) != (heads, dim):
            raise ValueError(f"{name} has shape {_shape(c)}, expected [pages, page_size, {heads}, {dim}]")
    else:
        raise ValueError(f"{name} must be 2-D, 3-D or 4-D (paged), got shape {_shape(c)}")
    return as_pages(c, dim)


def as_pages(c: torch.Tensor, dim: int) -> torch.Tensor:
    """The [pages, page_size, H, D] view of a checked 2-D, 3-D or 4-D cache (D = dim)."""
    if c.dim() == 2:
        return c.view(c.shape[0], 1, c.shape[1] // dim, dim) if dim > 0 else c.unflatten(1, (-1, dim)).unsqueeze(1)
    if c.dim() == 3:
        return c.unsqueeze(1)
    # Pages laid end to end are one run of slots: saves the kernel a division.
    if c.shape[1] > 1 and c.stride(0) == c.shape[1] * c.stride(1):
        return c.flatten(0, 1).unsqueeze(1)
    return c


def infer_heads(name: str, t: torch.Tensor, cache_name: str, cache: torch.Tensor, scale) -> Tuple[int, int, str]:
    """(H, D, source) of an input whose head layout is known from itself, its
    cache, or a per-head scale; source names where it came from."""
    if t.dim() == 3:
        return int(t.shape[1]), int(t.shape[2]), ""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, H*D] or 3-D [T, H, D], got shape {_shape(t)}")
    if isinstance(cache, torch.Tensor) and cache.dim() >= 3:
        return int(cache.shape[-2]), int(cache.shape[-1]), f"{cache_name} of shape {_shape(cache)}"
    width = int(t.shape[1])
    if isinstance(scale, torch.Tensor) and scale.numel() > 1 and width % scale.numel() == 0:
        return scale.numel(), width // scale.numel(), ""
    return 1, width, ""


def index_tensor(name: str, t, num_tokens: int, ref_name: str, device: torch.device) -> torch.Tensor:
    _require_tensor(name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [T], got shape {_shape(t)}")
    if t.shape[0] != num_tokens:
        raise ValueError(f"{name} has {t.shape[0]} entries but there are {num_tokens} tokens (shape {_shape(t)})")
    if t.device != device:
        raise _device_error(name, t, ref_name, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")
    return t


def scale_arg(name: str, s, heads: int, ref_name: str, device: torch.device) -> Tuple[Optional[torch.Tensor], float]:
    """(tensor or None, value) for a scale given as None, a number or an fp32 tensor."""
    if s is None:
        return None, 1.0
    if isinstance(s, bool) or not isinstance(s, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be None, a float or a float32 tensor, got {type(s).__name__}")
    if isinstance(s, torch.Tensor):
        _require_tensor(name, s)
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {s.dtype}")
        if s.numel() not in (1, heads) or s.dim() > 1:
            raise ValueError(f"{name} must hold 1 or {heads} (one per head) values, got shape {_shape(s)}")
        if s.device != device:
            raise _device_error(name, s, ref_name, device)
        if s.numel() > 1 and not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return s.reshape(-1), 1.0
    # The kernels divide by the value as fp32: it must be positive and finite there too,
    # i.e. round to neither 0 nor inf. Bounds, not a struct round trip: torch.compile
    # traces this function, and its struct support breaks on it.
    # Compared before float(): Python compares an int too large for a float exactly,
    # where float() would raise OverflowError.
    number: Any = s  # a numbers.Real, whose comparisons typeshed leaves untyped
    if not _FP32_ZERO_BELOW < number < _FP32_INF_FROM:
        raise ValueError(f"{name} must be a positive number, finite and nonzero as float32, got {repr(s)[:40]}")
    return None, float(s)


def _no_shared_elements(name: str, t: torch.Tensor) -> None:
    """A tensor written in place must not be an expanded view (a stride of 0 over a
    dimension of several elements): its elements would share memory."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(
            f"{name} is written in place but several of its elements share memory (shape {_shape(t)}, "
            f"strides {tuple(t.stride())})"
        )


def _device_error(name: str, t: torch.Tensor, ref_name: str, device: torch.device) -> ValueError:
    # Both names: the reference tensor may be the odd one out.
    return ValueError(f"{name} is on {t.device} but {ref_name} is on {device}; every tensor of a call must be on one device")


def _same_device(ref_name: str, device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise _device_error(name, t, ref_name, device)


def cache_write(plan: Plan, v, k_cache, v_cache, loc, k_scale, v_scale, names) -> None:
    """Checks and adds the KV-cache write to a plan whose k is already set.

    ``names`` maps the roles (v, k_cache, v_cache, loc, k_scale, v_scale) to the
    caller's argument names, so that messages use the names the caller knows.
    """
    k = plan.k
    device = k.device
    float_input(names["v"], v)
    _require_tensor(names["k_cache"], k_cache)
    _require_tensor(names["v_cache"], v_cache)
    if v.dtype != k.dtype:
        raise TypeError(f"{names['v']} is {v.dtype} but {names['k']} is {k.dtype}; they must match")
    for role in ("k_cache", "v_cache"):
        c = k_cache if role == "k_cache" else v_cache
        if c.dtype != k.dtype and c.dtype not in FP8_DTYPES:
            raise TypeError(
                f"{names[role]} is {c.dtype}; a cache must have the input dtype ({k.dtype}) "
                f"or be float8_e4m3fn / float8_e5m2"
            )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{names['k_cache']} is {k_cache.dtype} but {names['v_cache']} is {v_cache.dtype}; they must match")
    _same_device(names["k"], device, **{names["v"]: v, names["k_cache"]: k_cache, names["v_cache"]: v_cache})
    hv, dv, source = infer_heads(names["v"], v, names["v_cache"], v_cache, v_scale)
    v3 = token_heads(names["v"], v, hv, dv, source)
    if v3.shape[0] != k.shape[0]:
        raise ValueError(f"{names['v']} has {v3.shape[0]} tokens, {names['k']} has {k.shape[0]}")
    hk, dk = int(k.shape[1]), int(k.shape[2])
    kc = cache_pages(names["k_cache"], k_cache, hk, dk)
    vc = cache_pages(names["v_cache"], v_cache, hv, dv)
    _no_shared_elements(names["k_cache"], k_cache)
    _no_shared_elements(names["v_cache"], v_cache)
    if kc.shape[0] * kc.shape[1] != vc.shape[0] * vc.shape[1]:
        raise ValueError(
            f"{names['k_cache']} ({_shape(k_cache)}) and {names['v_cache']} ({_shape(v_cache)}) hold different numbers of slots"
        )
    plan.loc = index_tensor(names["loc"], loc, k.shape[0], names["k"], device)
    plan.loc_name = names["loc"]
    plan.v, plan.k_cache, plan.v_cache, plan.cache_dtype = v3, kc, vc, k_cache.dtype
    plan.given.update(v=v, k_cache=k_cache, v_cache=v_cache)
    plan.k_scale, plan.k_scale_value = scale_arg(names["k_scale"], k_scale, hk, names["k"], device)
    plan.v_scale, plan.v_scale_value = scale_arg(names["v_scale"], v_scale, hv, names["k"], device)


STORE_NAMES = dict(k="k", v="v", k_cache="k_cache", v_cache="v_cache", loc="loc", k_scale="k_scale", v_scale="v_scale")


def plan_store_kv(k, v, k_cache, v_cache, loc, k_scale, v_scale, check, names=STORE_NAMES) -> Plan:
    float_input(names["k"], k)
    _require_tensor(names["k_cache"], k_cache)
    hk, dk, source = infer_heads(names["k"], k, names["k_cache"], k_cache, k_scale)
    plan = Plan(k=token_heads(names["k"], k, hk, dk, source), check=check_mode(check), given=dict(k=k))
    cache_write(plan, v, k_cache, v_cache, loc, k_scale, v_scale, names)
    return plan


def plan_rope(positions, query, key, head_size, cos_sin_cache, is_neox, check, names) -> Plan:
    """A plan for RoPE alone; the caller may add a cache write with cache_write().

    query may be None: only key is rotated (vLLM's rotary_embedding without a
    key passes its query here as the key; the kernels always rotate k).
    """
    if query is not None:
        float_input(names["q"], query)
    float_input(names["k"], key)
    _require_tensor(names["cos_sin_cache"], cos_sin_cache)
    if isinstance(head_size, bool) or not isinstance(head_size, numbers.Integral):
        raise TypeError(f"head_size must be an int, got {type(head_size).__name__}")
    head_size = int(head_size)
    if head_size <= 0 or head_size % 2:
        raise ValueError(f"head_size must be a positive even number, got {head_size}")
    if query is not None and query.dtype != key.dtype:
        raise TypeError(f"{names['q']} is {query.dtype} but {names['k']} is {key.dtype}; they must match")
    if cos_sin_cache.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names['cos_sin_cache']} must be {_FLOAT_NAMES}, got {cos_sin_cache.dtype}")
    device = key.device
    _same_device(names["k"], device, **{names["cos_sin_cache"]: cos_sin_cache})
    q3 = None
    if query is not None:
        _same_device(names["k"], device, **{names["q"]: query})
        q3 = token_heads(names["q"], query, _heads(names["q"], query, head_size), head_size)
    k3 = token_heads(names["k"], key, _heads(names["k"], key, head_size), head_size)
    _no_shared_elements(names["k"], key)
    if query is not None:
        _no_shared_elements(names["q"], query)
    if q3 is not None and q3.shape[0] != k3.shape[0]:
        raise ValueError(f"{names['q']} has {q3.shape[0]} tokens ({_shape(query)}), {names['k']} has {k3.shape[0]} ({_shape(key)})")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"{names['cos_sin_cache']} must be 2-D [max_pos, rotary_dim], got shape {_shape(cos_sin_cache)}")
    if not cos_sin_cache.is_contiguous():
        raise ValueError(f"{names['cos_sin_cache']} must be contiguous")
    rot_dim = int(cos_sin_cache.shape[1])
    if rot_dim == 0 or rot_dim % 2:
        raise ValueError(f"the rotary dim ({names['cos_sin_cache']}.shape[1] = {rot_dim}) must be positive and even")
    if rot_dim > head_size:
        raise ValueError(
            f"the rotary dim ({names['cos_sin_cache']}.shape[1] = {rot_dim}) exceeds head_size = {head_size}"
        )
    if not isinstance(is_neox, (bool, int)):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    pos = index_tensor(names["positions"], positions, k3.shape[0], names["k"], device)
    return Plan(k=k3, q=q3, positions=pos, cos_sin=cos_sin_cache, rot_dim=rot_dim, neox=bool(is_neox),
                check=check_mode(check), positions_name=names["positions"], given=dict(q=query, k=key))


def _heads(name: str, t: torch.Tensor, head_size: int) -> int:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D [T, H*D] or 3-D [T, H, D], got shape {_shape(t)}")
    width = t.shape[-1] * (t.shape[-2] if t.dim() == 3 else 1)
    if t.dim() == 3 and t.shape[-1] != head_size:
        raise ValueError(f"{name} has shape {_shape(t)}, its last dimension must equal head_size = {head_size}")
    if width % head_size:
        raise ValueError(f"{name} has shape {_shape(t)}: its width {width} is not a multiple of head_size = {head_size}")
    return width // head_size


def views(
    k: torch.Tensor,
    head_size: int,
    *,
    q: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin: Optional[torch.Tensor] = None,
    neox: bool = True,
    v: Optional[torch.Tensor] = None,
    v_head_size: int = 0,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    loc: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    k_scale_value: float = 1.0,
    v_scale: Optional[torch.Tensor] = None,
    v_scale_value: float = 1.0,
    enable_pdl: bool = False,
) -> Plan:
    """The Plan of a call already checked by plan_store_kv / plan_rope, rebuilt
    from the caller's tensors (views only, no checks): what the torch ops run.

    RoPE is part of the call when cos_sin is given, the cache write when v is.
    """
    plan = Plan(k=as_heads(k, head_size), neox=bool(neox), enable_pdl=bool(enable_pdl))
    if cos_sin is not None:
        plan.q = None if q is None else as_heads(q, head_size)
        plan.positions, plan.cos_sin, plan.rot_dim = positions, cos_sin, int(cos_sin.shape[1])
    if v is not None:
        if k_cache is None or v_cache is None or loc is None:
            raise ValueError("the cache write needs v, k_cache, v_cache and loc together")
        plan.v = as_heads(v, v_head_size)
        plan.k_cache, plan.v_cache = as_pages(k_cache, head_size), as_pages(v_cache, v_head_size)
        plan.cache_dtype, plan.loc = k_cache.dtype, loc
        plan.k_scale, plan.k_scale_value = k_scale, k_scale_value
        plan.v_scale, plan.v_scale_value = v_scale, v_scale_value
    return plan


def check_indices(plan: Plan) -> None:
    """The opt-in range check (check=True / ROPEKV_CHECK=1); synchronizes."""
    if plan.loc is not None and plan.k_cache is not None:
        slots = plan.k_cache.shape[0] * plan.k_cache.shape[1]
        _first_bad(plan.loc_name, plan.loc, plan.loc >= slots, f"out of range for a cache of {slots} slots")
    if plan.positions is not None and plan.cos_sin is not None:
        max_pos = plan.cos_sin.shape[0]
        bad = (plan.positions < 0) | (plan.positions >= max_pos)
        _first_bad(plan.positions_name, plan.positions, bad, f"outside the cos/sin cache of {max_pos} positions")


def _first_bad(name: str, t: torch.Tensor, bad: torch.Tensor, why: str) -> None:
    where = bad.nonzero()
    if where.numel():
        i = int(where[0, 0])
        raise IndexError(f"{name}[{i}] = {int(t[i])} is {why}")
