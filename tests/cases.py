"""Hypothesis strategies and builders for the tensors of a call: every input and
cache layout of SPEC.md section 1, filled with random (never zero) data."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from hypothesis import strategies as st

FLOATS = [torch.float16, torch.bfloat16, torch.float32]
COMMON_DIMS = [64, 80, 96, 128, 192, 256, 512]
INPUT_LAYOUTS = ["3d", "2d", "qkv", "head_padded"]
CACHE_LAYOUTS = ["3d", "2d", "paged", "slot_padded", "paged_padded", "head_padded"]
SCALES = ["none", "float", "tensor", "per_head"]


def head_dims(max_dim: int = 512):
    """Even head dims from 2 to max_dim, the common ones weighted in."""
    any_even = st.integers(1, max_dim // 2).map(lambda x: 2 * x)
    common = [d for d in COMMON_DIMS if d <= max_dim]
    return st.one_of(st.sampled_from(common), any_even) if common else any_even


def rand(gen: torch.Generator, shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    return x.to(dtype).to(device)


def make_inputs(gen, layout: str, T: int, parts, dtype, device):
    """Tensors for parts [(heads, dim), ...] of one token row, in the given layout.

    'qkv' gives views into one fused tensor with extra leading columns (as a
    query would occupy); 'head_padded' gives 3-D views whose head stride exceeds
    the head dim; '2d' gives [T, H*D]; '3d' gives contiguous [T, H, D].
    """
    if layout == "qkv":
        lead = 2 * int(torch.randint(0, 5, (1,), generator=gen))
        width = lead + sum(h * d for h, d in parts)
        fused = rand(gen, (T, width), dtype, device)
        out, col = [], lead
        for h, d in parts:
            view = fused[:, col : col + h * d]
            out.append(view if (h % 2) else view.unflatten(1, (h, d)))
            col += h * d
        return out
    if layout == "head_padded":
        return [rand(gen, (T, h, d + 2), dtype, device)[..., :d] for h, d in parts]
    if layout == "2d":
        return [rand(gen, (T, h * d), dtype, device) for h, d in parts]
    return [rand(gen, (T, h, d), dtype, device) for h, d in parts]


def make_cache(gen, layout: str, slots: int, heads: int, dim: int, dtype, device, page_size: int):
    """A cache of at least `slots` slots in the given layout, random contents.
    Returns (cache as the caller passes it, number of slots)."""
    fill_dtype = torch.float32 if dtype.itemsize == 1 else dtype
    def filled(*shape):
        return rand(gen, shape, fill_dtype, device, 2.0).to(dtype)
    if layout in ("paged", "paged_padded"):
        pages = -(-slots // page_size)
        if layout == "paged":
            c = filled(pages, page_size, heads, dim)
        else:  # pages not laid end to end: page stride != page_size * slot stride
            c = filled(pages, page_size + 1, heads, dim)[:, :page_size]
        return c, pages * page_size
    if layout == "2d":
        return filled(slots, heads * dim), slots
    if layout == "slot_padded":
        return filled(slots, heads * dim + 8)[:, : heads * dim].unflatten(1, (heads, dim)), slots
    if layout == "head_padded":
        return filled(slots, heads, dim + 2)[..., :dim], slots
    return filled(slots, heads, dim), slots


def make_loc(gen, T: int, slots: int, index_dtype, device, pad_frac: float, oob_frac: float):
    """Unique slots for T tokens, some replaced by padding (< 0) or by >= S."""
    loc = torch.randperm(max(slots, T), generator=gen)[:T]
    r = torch.rand(T, generator=gen)
    loc = torch.where(r < pad_frac, -1 - torch.randint(0, 3, (T,), generator=gen), loc)
    loc = torch.where((r >= pad_frac) & (r < pad_frac + oob_frac), slots + torch.randint(0, 5, (T,), generator=gen), loc)
    return loc.to(index_dtype).to(device)


def make_scale(gen, kind: str, heads: int, device):
    if kind == "none":
        return None
    if kind == "float":
        return float(0.25 + 4 * torch.rand(1, generator=gen))
    n = 1 if kind == "tensor" else heads
    return (0.25 + 4 * torch.rand(n, generator=gen)).to(device)


@dataclasses.dataclass
class KVCase:
    """Drawn parameters of a KV-cache write."""

    T: int
    hk: int
    dk: int
    hv: int
    dv: int
    dtype: torch.dtype
    cache_dtype: Optional[torch.dtype]  # None: same as dtype
    input_layout: str
    cache_layout: str
    page_size: int
    index_dtype: torch.dtype
    k_scale: str
    v_scale: str
    pad_frac: float
    oob_frac: float
    seed: int


@st.composite
def kv_cases(draw, max_tokens: int = 40, max_heads: int = 8, max_dim: int = 512, hk=None, dk=None):
    T = draw(st.integers(0, max_tokens))
    hk = hk if hk is not None else draw(st.integers(1, max_heads))
    dk = dk if dk is not None else draw(head_dims(max_dim))
    return KVCase(
        T=T,
        hk=hk,
        dk=dk,
        hv=draw(st.one_of(st.just(hk), st.integers(1, max_heads))),
        dv=draw(st.one_of(st.just(dk), head_dims(max_dim))),
        dtype=draw(st.sampled_from(FLOATS)),
        cache_dtype=draw(st.sampled_from([None, torch.float8_e4m3fn, torch.float8_e5m2])),
        input_layout=draw(st.sampled_from(INPUT_LAYOUTS)),
        cache_layout=draw(st.sampled_from(CACHE_LAYOUTS)),
        page_size=draw(st.sampled_from([1, 2, 16])),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        k_scale=draw(st.sampled_from(SCALES)),
        v_scale=draw(st.sampled_from(SCALES)),
        pad_frac=draw(st.sampled_from([0.0, 0.2, 0.5])),
        oob_frac=draw(st.sampled_from([0.0, 0.0, 0.1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclasses.dataclass
class KVTensors:
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    loc: torch.Tensor
    k_scale: object
    v_scale: object
    k3: torch.Tensor  # k as [T, Hk, Dk] (a view of k)
    v3: torch.Tensor


def build_kv(case: KVCase, device, gen: torch.Generator, k=None) -> KVTensors:
    """The tensors of a case. A given k ([T, Hk, Dk] view) is used instead of a new one."""
    cache_dtype = case.cache_dtype or case.dtype
    if k is None:
        k, v = make_inputs(gen, case.input_layout, case.T, [(case.hk, case.dk), (case.hv, case.dv)], case.dtype, device)
    else:
        (v,) = make_inputs(gen, case.input_layout, case.T, [(case.hv, case.dv)], case.dtype, device)
    if case.cache_dtype is not None:  # large values too, to exercise saturation
        k.mul_(torch.where(torch.rand(k.shape, generator=gen) < 0.05, 300.0, 1.0).to(device).to(k.dtype))
    slots = case.T + int(torch.randint(1, 40, (1,), generator=gen))
    k_cache, slots = make_cache(gen, case.cache_layout, slots, case.hk, case.dk, cache_dtype, device, case.page_size)
    v_cache, _ = make_cache(gen, case.cache_layout, slots, case.hv, case.dv, cache_dtype, device, case.page_size)
    if case.cache_layout in ("paged", "paged_padded") and v_cache.shape[0] * v_cache.shape[1] != slots:
        raise AssertionError("paged caches must hold the same number of slots")
    loc = make_loc(gen, case.T, slots, case.index_dtype, device, case.pad_frac, case.oob_frac)
    k_scale = make_scale(gen, case.k_scale, case.hk, device)
    v_scale = make_scale(gen, case.v_scale, case.hv, device)
    as3 = lambda x, h, d: x if x.dim() == 3 else x.unflatten(1, (h, d))
    return KVTensors(k, v, k_cache, v_cache, loc, k_scale, v_scale, as3(k, case.hk, case.dk), as3(v, case.hv, case.dv))
