"""Hardening: the contract of SPEC.md at its edges.

- Invalid calls (a table, a sweep of every unsupported dtype per argument, and
  hypothesis drawing arbitrary, mostly invalid arguments) raise the exception
  section 4 names, with a message naming the argument, and write nothing.
- Out-of-range slots and positions in the default mode never touch memory
  outside the caches or the cos/sin cache (tensors here are views into larger
  guard buffers whose guard regions must stay bit-identical; on a GPU,
  scripts/sanitize.sh runs compute-sanitizer over scripts/sanitize_inputs.py).
- Check mode (check=True / ROPEKV_CHECK=1) names the first bad token and value
  and writes nothing.
- Tensors of more than 2^31 elements (64-bit offsets).
- Concurrency: two CUDA streams; the lazy backend choice from several threads.
- The torch fallback without the compiled extension (subprocesses).
- Duplicate slots (SPEC.md section 2).

Everything runs on every backend through the `backend` fixture (CPU here and in
CI, the CUDA backends on a GPU); CUDA-only parts skip without a device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ropekv
import reference as ref
from conftest import HAS_CUDA
from ropekv import _backend, _native
from test_rope import cos_sin_cache

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
I32, I64 = torch.int32, torch.int64
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FLOATS = (F16, BF16, F32)
INDEX = (I32, I64)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Set in the subprocesses that run the suite without the extension, so the
# tests that start those subprocesses do not recurse.
IN_SUBPROCESS = os.environ.get("ROPEKV_TEST_SUBPROCESS") == "1"

_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "complex32", "complex64", "complex128", "int8", "int16",
    "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
)
ALL_DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)]


def other_device(device: torch.device) -> torch.device:
    """A device that differs from `device` and exists here: meta next to CPU tensors, the CPU next to CUDA ones."""
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous 1-D tensor (any dtype), on the CPU."""
    return t.detach().view(torch.uint8).cpu()


def mentions(msg: str, word: str) -> bool:
    """Whether msg names `word`: as a whole name for identifiers (k is not in k_cache), else as a substring."""
    if re.fullmatch(r"[\w.]+", word):
        return re.search(r"(?<![\w])" + re.escape(word) + r"(?![\w])", msg) is not None
    return word in msg


def snapshot(t: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {n: ref.bits(x).clone() for n, x in t.items() if isinstance(x, torch.Tensor) and x.device.type != "meta"}


def assert_unchanged(t: Dict[str, Any], before: Dict[str, torch.Tensor], what: str = "a rejected call") -> None:
    for n, b in before.items():
        assert torch.equal(ref.bits(t[n]), b), f"{n} was written by {what}"


def compat(module: str):
    """ropekv.compat.<module>, or a skip while it does not exist."""
    return pytest.importorskip(f"ropekv.compat.{module}")


# ---------------------------------------------------------------------------
# A. The table of invalid calls
# ---------------------------------------------------------------------------

T, H, D, S = 4, 2, 64, 16


def tensors(device):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(BF16).to(device)
    fp8 = lambda *s: (4 * torch.randn(*s, generator=g)).to(E4M3).to(device)
    return dict(
        q=mk(T, 4 * D), k=mk(T, H * D), v=mk(T, H * D),
        k_cache=mk(S, H, D), v_cache=mk(S, H, D),
        kc8=fp8(S, H, D), vc8=fp8(S, H, D),
        loc=torch.tensor([0, 3, -1, 7], device=device),
        pos=torch.tensor([0, 1, 2, 3], device=device),
        cs=cos_sin_cache(32, D).to(device),
        scale=torch.full((1,), 0.5, device=device),
        head_scale=torch.full((H,), 0.5, device=device),
        _other=other_device(torch.device(device)),
    )


def store(t, **over):
    a = dict(k=t["k"], v=t["v"], k_cache=t["k_cache"], v_cache=t["v_cache"], loc=t["loc"])
    a.update(over)
    kw = {n: a.pop(n) for n in ("k_scale", "v_scale", "check") if n in a}
    return lambda: ropekv.store_kv(a["k"], a["v"], a["k_cache"], a["v_cache"], a["loc"], **kw)


def store8(t, **over):
    """store() into the fp8 caches."""
    return store(t, **dict(dict(k_cache=t["kc8"], v_cache=t["vc8"]), **over))


_FUSED_FIELDS = ("value", "k_buffer", "v_buffer", "cache_loc", "k_scale", "v_scale")


def rope(t, fused=True, head_size=D, **over):
    a = dict(positions=t["pos"], query=t["q"], key=t["k"], cos_sin_cache=t["cs"], is_neox=True)
    f = dict(value=t["v"], k_buffer=t["k_cache"], v_buffer=t["v_cache"], cache_loc=t["loc"])
    for n, x in over.items():
        (f if n in _FUSED_FIELDS else a)[n] = x
    check = a.pop("check", False)
    arg = a.pop("fused_set_kv_buffer_arg", None)
    if arg is None and fused:
        arg = ropekv.FusedSetKVBufferArg(**f)
    return lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(
        a["positions"], a["query"], a["key"], head_size, a["cos_sin_cache"], a["is_neox"], arg, check=check)


def rope_only(t, **over):
    return rope(t, fused=False, **over)


_OMIT = object()


def native(t, **over):
    """rope_and_store with the cache write; an argument set to _OMIT is left out."""
    a = dict(positions=t["pos"], q=t["q"], k=t["k"], cos_sin_cache=t["cs"], head_size=D, is_neox=True,
             v=t["v"], k_cache=t["k_cache"], v_cache=t["v_cache"], loc=t["loc"])
    a.update(over)
    a = {n: x for n, x in a.items() if x is not _OMIT}
    first = [a.pop(n) for n in ("positions", "q", "k", "cos_sin_cache")]
    return lambda: ropekv.rope_and_store(*first, **a)


def sgl_store(t, **over):
    m = compat("sgl_kernel")
    a = dict(k_cache=t["k_cache"], v_cache=t["v_cache"], loc=t["loc"], k=t["k"].view(T, H, D), v=t["v"].view(T, H, D))
    a.update(over)
    return lambda: m.set_kv_buffer_kernel(a["k_cache"], a["v_cache"], a["loc"], a["k"], a["v"])


def sgl_rope(t, **over):
    m = compat("sgl_kernel")
    a = dict(positions=t["pos"], query=t["q"], key=t["k"], head_size=D, cos_sin_cache=t["cs"], is_neox=True)
    f = dict(value=t["v"], k_buffer=t["k_cache"].view(S, H * D), v_buffer=t["v_cache"].view(S, H * D), cache_loc=t["loc"])
    for n, x in over.items():
        (f if n in _FUSED_FIELDS else a)[n] = x
    arg = m.FusedSetKVBufferArg(**f)
    return lambda: m.apply_rope_with_cos_sin_cache_inplace(
        a["positions"], a["query"], a["key"], a["head_size"], a["cos_sin_cache"], a["is_neox"], arg)


def vllm_store(t, **over):
    m = compat("vllm")
    a = dict(key=t["k"].view(T, H, D), value=t["v"].view(T, H, D), key_cache=t["k_cache"].view(S // 4, 4, H, D),
             value_cache=t["v_cache"].view(S // 4, 4, H, D), slot_mapping=t["loc"], kv_cache_dtype="auto",
             k_scale=t["scale"], v_scale=t["scale"])
    a.update(over)
    return lambda: m.reshape_and_cache_flash(a["key"], a["value"], a["key_cache"], a["value_cache"],
                                             a["slot_mapping"], a["kv_cache_dtype"], a["k_scale"], a["v_scale"])


def vllm_store8(t, **over):
    return vllm_store(t, **dict(dict(key_cache=t["kc8"].view(S // 4, 4, H, D), value_cache=t["vc8"].view(S // 4, 4, H, D),
                                     kv_cache_dtype="fp8"), **over))


def vllm_rope(t, **over):
    m = compat("vllm")
    a = dict(positions=t["pos"], query=t["q"], key=t["k"], head_size=D, cos_sin_cache=t["cs"], is_neox=True)
    a.update(over)
    return lambda: m.rotary_embedding(a["positions"], a["query"], a["key"], a["head_size"], a["cos_sin_cache"], a["is_neox"])


def dev(t):
    return t["k"].device


def strided_last(x):
    """x with the same shape and a last-dimension stride of 2 (a view of a wider tensor)."""
    return x.repeat_interleave(2, dim=-1)[..., ::2]


def transposed(x):
    """x with the same shape and a non-contiguous last dimension."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def sparse(x):
    return x.to_sparse()


FA = "fused_set_kv_buffer_arg."

CASES = [
    # (id, builder, exception, words the message must name)
    # --- store_kv: wrong Python types ---
    ("k-not-tensor", lambda t: store(t, k=[1, 2]), TypeError, "k"),
    ("k-none", lambda t: store(t, k=None), TypeError, "k"),
    ("v-none", lambda t: store(t, v=None), TypeError, "v"),
    ("v-number", lambda t: store(t, v=1.0), TypeError, "v"),
    ("k-cache-none", lambda t: store(t, k_cache=None), TypeError, "k_cache"),
    ("v-cache-str", lambda t: store(t, v_cache="cache"), TypeError, "v_cache"),
    ("loc-list", lambda t: store(t, loc=[0, 1, 2, 3]), TypeError, "loc"),
    ("loc-none", lambda t: store(t, loc=None), TypeError, "loc"),
    ("k-sparse", lambda t: store(t, k=sparse(t["k"])), TypeError, "k"),
    ("k-cache-sparse", lambda t: store(t, k_cache=sparse(t["k_cache"])), TypeError, "k_cache"),
    ("loc-sparse", lambda t: store(t, loc=sparse(t["loc"])), TypeError, "loc"),
    # --- store_kv: dtypes ---
    ("k-int-dtype", lambda t: store(t, k=t["k"].to(torch.int32)), TypeError, "k"),
    ("k-fp8", lambda t: store(t, k=t["k"].to(E4M3)), TypeError, "k"),
    ("k-float64", lambda t: store(t, k=t["k"].double()), TypeError, ("k", "float64")),
    ("v-fp8", lambda t: store(t, v=t["v"].to(E5M2)), TypeError, "v"),
    ("v-dtype-differs", lambda t: store(t, v=t["v"].float()), TypeError, "v"),
    ("cache-dtype", lambda t: store(t, k_cache=t["k_cache"].half(), v_cache=t["v_cache"].half()), TypeError, "k_cache"),
    ("k-cache-float64", lambda t: store(t, k_cache=t["k_cache"].double()), TypeError, ("k_cache", "float8_e4m3fn")),
    ("k-cache-int8", lambda t: store(t, k_cache=t["k_cache"].to(torch.int8)), TypeError, "k_cache"),
    ("k-cache-e4m3fnuz", lambda t: store(t, k_cache=t["kc8"].view(torch.float8_e4m3fnuz), v_cache=t["vc8"]), TypeError, "k_cache"),
    ("v-cache-fp16", lambda t: store(t, v_cache=t["v_cache"].half()), TypeError, "v_cache"),
    ("caches-differ", lambda t: store(t, v_cache=t["v_cache"].to(E4M3)), TypeError, "v_cache"),
    ("fp8-caches-differ", lambda t: store8(t, v_cache=t["vc8"].view(E5M2)), TypeError, ("k_cache", "v_cache")),
    ("loc-float", lambda t: store(t, loc=t["loc"].float()), TypeError, "loc"),
    ("loc-int16", lambda t: store(t, loc=t["loc"].short()), TypeError, ("loc", "int32")),
    ("loc-uint8", lambda t: store(t, loc=t["loc"].clamp(min=0).to(torch.uint8)), TypeError, "loc"),
    ("loc-bool", lambda t: store(t, loc=t["loc"] > 0), TypeError, "loc"),
    # --- store_kv: shapes, lengths, strides ---
    ("loc-2d", lambda t: store(t, loc=t["loc"][:, None]), ValueError, "loc"),
    ("loc-2d-row", lambda t: store(t, loc=t["loc"][None, :]), ValueError, "loc"),
    ("loc-0d", lambda t: store(t, loc=t["loc"][0]), ValueError, "loc"),
    ("loc-length", lambda t: store(t, loc=t["loc"][:3]), ValueError, "loc"),
    ("loc-too-long", lambda t: store(t, loc=torch.arange(5, device=dev(t))), ValueError, "loc"),
    ("loc-strided", lambda t: store(t, loc=torch.arange(8, device=dev(t))[::2]), ValueError, "loc"),
    ("k-shape", lambda t: store(t, k=t["k"][:, :100]), ValueError, "k"),
    ("k-1d", lambda t: store(t, k=t["k"].flatten()), ValueError, "k"),
    ("k-0d", lambda t: store(t, k=t["k"][0, 0]), ValueError, "k"),
    ("k-4d", lambda t: store(t, k=t["k"].view(T, H, 2, D // 2)), ValueError, "k"),
    ("k-last-dim-strided", lambda t: store(t, k=strided_last(t["k"])), ValueError, "k"),
    ("k3-last-dim-transposed", lambda t: store(t, k=transposed(t["k"].view(T, H, D))), ValueError, "k"),
    ("v-last-dim-strided", lambda t: store(t, v=strided_last(t["v"])), ValueError, "v"),
    ("v-tokens", lambda t: store(t, v=t["v"][:3]), ValueError, "v"),
    ("k-tokens", lambda t: store(t, k=t["k"][:3]), ValueError, "k"),
    ("v-heads-vs-cache", lambda t: store(t, v_cache=t["v_cache"][:, :1]), ValueError, "v_cache"),
    ("cache-heads", lambda t: store(t, k_cache=t["k_cache"][:, :1]), ValueError, "k_cache"),
    ("cache-head-dim", lambda t: store(t, k=t["k"].view(T, H, D), k_cache=t["k_cache"][..., :32]), ValueError, "k_cache"),
    ("cache-1d", lambda t: store(t, k_cache=t["k_cache"].flatten()), ValueError, "k_cache"),
    ("cache-0d", lambda t: store(t, k_cache=t["k_cache"][0, 0, 0]), ValueError, "k_cache"),
    ("v-cache-0d", lambda t: store(t, v_cache=t["v_cache"][0, 0, 0]), ValueError, "v_cache"),
    ("cache-5d", lambda t: store(t, k_cache=t["k_cache"].view(2, 2, 4, H, D)), ValueError, "k_cache"),
    ("cache-2d-width", lambda t: store(t, k=t["k"].view(T, H, D), k_cache=t["k_cache"].view(S, H * D)[:, :100]), ValueError, "k_cache"),
    ("cache-last-dim-transposed", lambda t: store(t, k_cache=transposed(t["k_cache"])), ValueError, "k_cache"),
    ("v-cache-last-dim-strided", lambda t: store(t, v_cache=strided_last(t["v_cache"])), ValueError, "v_cache"),
    ("slot-counts", lambda t: store(t, v_cache=t["v_cache"][:8]), ValueError, "v_cache"),
    ("cache-expanded", lambda t: store(t, k_cache=t["k_cache"][:1].expand(S, H, D)), ValueError, "k_cache"),
    ("v-cache-head-expanded", lambda t: store(t, v_cache=t["v_cache"][:, :1].expand(S, H, D)), ValueError, "v_cache"),
    ("paged-slot-counts", lambda t: store(t, k_cache=t["k_cache"].view(4, 4, H, D), v_cache=t["v_cache"].view(4, 4, H, D)[:2]), ValueError, ("k_cache", "v_cache")),
    # --- store_kv: scales ---
    ("scale-type", lambda t: store(t, k_scale="2"), TypeError, "k_scale"),
    ("scale-list", lambda t: store8(t, k_scale=[1.0]), TypeError, "k_scale"),
    ("scale-bool", lambda t: store8(t, v_scale=True), TypeError, "v_scale"),
    ("scale-dtype", lambda t: store(t, k_scale=torch.ones(1, dtype=torch.float64, device=dev(t))), TypeError, "k_scale"),
    ("scale-fp16", lambda t: store8(t, v_scale=torch.ones(1, dtype=F16, device=dev(t))), TypeError, ("v_scale", "float32")),
    ("scale-int-tensor", lambda t: store8(t, k_scale=torch.ones(1, dtype=I32, device=dev(t))), TypeError, "k_scale"),
    ("scale-sparse", lambda t: store8(t, k_scale=sparse(t["head_scale"])), TypeError, "k_scale"),
    ("scale-shape", lambda t: store(t, v_scale=torch.ones(3, device=dev(t))), ValueError, "v_scale"),
    ("scale-2d", lambda t: store8(t, k_scale=torch.ones(H, 1, device=dev(t))), ValueError, "k_scale"),
    ("scale-empty", lambda t: store8(t, k_scale=torch.ones(0, device=dev(t))), ValueError, "k_scale"),
    ("scale-per-head-strided", lambda t: store8(t, v_scale=torch.ones(2 * H, device=dev(t))[::2]), ValueError, "v_scale"),
    ("scale-negative", lambda t: store(t, k_scale=-1.0), ValueError, "k_scale"),
    ("scale-zero", lambda t: store8(t, k_scale=0.0), ValueError, "k_scale"),
    ("scale-nan", lambda t: store8(t, v_scale=float("nan")), ValueError, "v_scale"),
    ("scale-inf", lambda t: store8(t, k_scale=float("inf")), ValueError, "k_scale"),
    ("scale-fp32-overflow", lambda t: store8(t, k_scale=1e300), ValueError, "k_scale"),
    ("scale-fp32-underflow", lambda t: store8(t, k_scale=1e-300), ValueError, "k_scale"),
    ("scale-huge-int", lambda t: store8(t, v_scale=10**400), ValueError, "v_scale"),
    # --- store_kv: mixed devices (meta next to CPU tensors, CPU next to CUDA ones) ---
    ("v-other-device", lambda t: store(t, v=t["v"].to(t["_other"])), ValueError, "v"),
    # k is the tensor the others are compared with: when it is the odd one, the message names it too.
    ("k-other-device", lambda t: store(t, k=t["k"].to(t["_other"])), ValueError, ("k", "v")),
    ("k-cache-other-device", lambda t: store(t, k_cache=t["k_cache"].to(t["_other"])), ValueError, "k_cache"),
    ("v-cache-other-device", lambda t: store(t, v_cache=t["v_cache"].to(t["_other"])), ValueError, "v_cache"),
    ("loc-other-device", lambda t: store(t, loc=t["loc"].to(t["_other"])), ValueError, "loc"),
    ("scale-other-device", lambda t: store8(t, k_scale=t["scale"].to(t["_other"])), ValueError, "k_scale"),
    ("check-slot-range", lambda t: store(t, loc=torch.tensor([0, 3, 16, 99], device=dev(t)), check=True), IndexError, "loc[2] = 16"),
    # --- RoPE alone ---
    ("rope-positions-none", lambda t: rope_only(t, positions=None), TypeError, "positions"),
    ("rope-positions-list", lambda t: rope_only(t, positions=[0, 1, 2, 3]), TypeError, "positions"),
    ("rope-key-none", lambda t: rope_only(t, key=None), TypeError, "key"),
    ("rope-cos-sin-none", lambda t: rope_only(t, cos_sin_cache=None), TypeError, "cos_sin_cache"),
    ("rope-query-int", lambda t: rope_only(t, query=t["q"].to(I32)), TypeError, "query"),
    ("rope-query-fp8", lambda t: rope_only(t, query=t["q"].to(E4M3)), TypeError, "query"),
    ("rope-key-fp8", lambda t: rope_only(t, key=t["k"].to(E5M2)), TypeError, "key"),
    ("rope-key-float64", lambda t: rope_only(t, key=t["k"].double()), TypeError, "key"),
    ("rope-cos-sin-fp8", lambda t: rope_only(t, cos_sin_cache=t["cs"].to(E4M3)), TypeError, "cos_sin_cache"),
    ("rope-cos-sin-int", lambda t: rope_only(t, cos_sin_cache=t["cs"].to(I32)), TypeError, "cos_sin_cache"),
    ("rope-odd-rotary", lambda t: rope(t, cos_sin_cache=t["cs"][:, :7].contiguous()), ValueError, "rotary dim"),
    ("rope-rotary-zero", lambda t: rope_only(t, cos_sin_cache=t["cs"][:, :0].contiguous()), ValueError, "cos_sin_cache"),
    ("rope-rotary-too-big", lambda t: rope(t, head_size=32, query=t["q"], key=t["k"]), ValueError, "exceeds head_size"),
    ("rope-rotary-wider-than-head", lambda t: rope_only(t, cos_sin_cache=cos_sin_cache(32, 2 * D).to(dev(t))), ValueError, ("cos_sin_cache", "head_size")),
    ("rope-cos-sin-1d", lambda t: rope_only(t, cos_sin_cache=t["cs"][0]), ValueError, "cos_sin_cache"),
    ("rope-cos-sin-3d", lambda t: rope_only(t, cos_sin_cache=t["cs"][None]), ValueError, "cos_sin_cache"),
    ("rope-cos-sin-transposed", lambda t: rope_only(t, cos_sin_cache=cos_sin_cache(D, D).to(dev(t)).t()), ValueError, "cos_sin_cache"),
    ("rope-cos-sin-sparse", lambda t: rope_only(t, cos_sin_cache=sparse(t["cs"])), TypeError, "cos_sin_cache"),
    ("rope-head-size-width", lambda t: rope(t, head_size=48), ValueError, "head_size"),
    ("rope-head-size-odd", lambda t: rope(t, head_size=63), ValueError, "head_size"),
    ("rope-head-size-zero", lambda t: rope_only(t, head_size=0), ValueError, "head_size"),
    ("rope-head-size-negative", lambda t: rope_only(t, head_size=-64), ValueError, "head_size"),
    ("rope-head-size-huge", lambda t: rope_only(t, head_size=2**40), ValueError, "head_size"),
    ("rope-head-size-type", lambda t: rope(t, head_size=64.0), TypeError, "head_size"),
    ("rope-head-size-none", lambda t: rope_only(t, head_size=None), TypeError, "head_size"),
    ("rope-head-size-str", lambda t: rope_only(t, head_size="64"), TypeError, "head_size"),
    ("rope-head-size-bool", lambda t: rope_only(t, head_size=True), TypeError, "head_size"),
    ("rope-head-size-tensor", lambda t: rope_only(t, head_size=torch.tensor(64)), TypeError, "head_size"),
    ("rope-query-3d-head-dim", lambda t: rope_only(t, query=t["q"].view(T, 8, D // 2)), ValueError, "query"),
    ("rope-query-0d", lambda t: rope_only(t, query=t["q"][0, 0]), ValueError, "query"),
    ("rope-key-1d", lambda t: rope_only(t, key=t["k"][0]), ValueError, "key"),
    ("rope-key-width", lambda t: rope_only(t, key=t["k"][:, :96]), ValueError, "key"),
    ("rope-query-last-dim-strided", lambda t: rope_only(t, query=strided_last(t["q"])), ValueError, "query"),
    ("rope-key-last-dim-transposed", lambda t: rope_only(t, key=transposed(t["k"].view(T, H, D))), ValueError, "key"),
    ("rope-key-expanded", lambda t: rope_only(t, key=t["k"][:1].expand(T, H * D)), ValueError, "key"),
    ("rope-query-expanded", lambda t: rope_only(t, query=t["q"].view(T, 4, D)[:, :1].expand(T, 4, D)), ValueError, "query"),
    ("rope-positions-length", lambda t: rope(t, positions=t["pos"][:2]), ValueError, "positions"),
    ("rope-positions-2d", lambda t: rope_only(t, positions=t["pos"][None]), ValueError, "positions"),
    ("rope-positions-strided", lambda t: rope_only(t, positions=torch.arange(8, device=dev(t))[::2]), ValueError, "positions"),
    ("rope-positions-dtype", lambda t: rope(t, positions=t["pos"].float()), TypeError, "positions"),
    ("rope-positions-int16", lambda t: rope_only(t, positions=t["pos"].short()), TypeError, "positions"),
    ("rope-cos-sin-dtype", lambda t: rope(t, cos_sin_cache=t["cs"].double()), TypeError, "cos_sin_cache"),
    ("rope-q-k-dtypes", lambda t: rope(t, query=t["q"].float()), TypeError, "query"),
    ("rope-q-tokens", lambda t: rope(t, query=t["q"][:3]), ValueError, "query"),
    ("rope-is-neox-str", lambda t: rope_only(t, is_neox="yes"), TypeError, "is_neox"),
    ("rope-is-neox-none", lambda t: rope_only(t, is_neox=None), TypeError, "is_neox"),
    ("rope-query-other-device", lambda t: rope_only(t, query=t["q"].to(t["_other"])), ValueError, "query"),
    ("rope-cos-sin-other-device", lambda t: rope_only(t, cos_sin_cache=t["cs"].to(t["_other"])), ValueError, "cos_sin_cache"),
    ("rope-positions-other-device", lambda t: rope_only(t, positions=t["pos"].to(t["_other"])), ValueError, "positions"),
    ("rope-key-other-device", lambda t: rope_only(t, key=t["k"].to(t["_other"])), ValueError, "key"),
    ("fused-key-other-device", lambda t: rope(t, key=t["k"].to(t["_other"])), ValueError, "key"),
    ("rope-check-positions", lambda t: rope(t, positions=torch.tensor([0, 1, 32, 2], device=dev(t)), check=True), IndexError, "positions[2] = 32"),
    # --- RoPE fused with the cache write ---
    ("fused-arg-dict", lambda t: rope(t, fused_set_kv_buffer_arg=dict(value=t["v"])), TypeError, "fused_set_kv_buffer_arg"),
    ("fused-arg-int", lambda t: rope(t, fused_set_kv_buffer_arg=1), TypeError, "fused_set_kv_buffer_arg"),
    ("fused-value-none", lambda t: rope(t, value=None), TypeError, FA + "value"),
    ("fused-value-dtype", lambda t: rope(t, value=t["v"].float()), TypeError, FA + "value"),
    ("fused-value-int", lambda t: rope(t, value=t["v"].to(I32)), TypeError, FA + "value"),
    ("fused-value-fp8", lambda t: rope(t, value=t["v"].to(E4M3)), TypeError, FA + "value"),
    ("fused-k-buffer-none", lambda t: rope(t, k_buffer=None), TypeError, FA + "k_buffer"),
    ("fused-v-buffer-float64", lambda t: rope(t, v_buffer=t["v_cache"].double()), TypeError, FA + "v_buffer"),
    ("fused-buffers-differ", lambda t: rope(t, k_buffer=t["kc8"]), TypeError, FA + "k_buffer"),
    ("fused-k-buffer-shape", lambda t: rope(t, k_buffer=t["k_cache"][:, :, :32]), ValueError, FA + "k_buffer"),
    ("fused-k-buffer-last-dim", lambda t: rope(t, k_buffer=transposed(t["k_cache"])), ValueError, FA + "k_buffer"),
    ("fused-k-buffer-expanded", lambda t: rope(t, k_buffer=t["k_cache"][:1].expand(S, H, D)), ValueError, FA + "k_buffer"),
    ("fused-v-buffer-slots", lambda t: rope(t, v_buffer=t["v_cache"][:5]), ValueError, FA + "v_buffer"),
    ("fused-value-tokens", lambda t: rope(t, value=t["v"][:2]), ValueError, FA + "value"),
    ("fused-value-last-dim", lambda t: rope(t, value=strided_last(t["v"])), ValueError, FA + "value"),
    ("fused-cache-loc", lambda t: rope(t, cache_loc=t["loc"][:2]), ValueError, FA + "cache_loc"),
    ("fused-cache-loc-2d", lambda t: rope(t, cache_loc=t["loc"][:, None]), ValueError, FA + "cache_loc"),
    ("fused-cache-loc-float", lambda t: rope(t, cache_loc=t["loc"].double()), TypeError, FA + "cache_loc"),
    ("fused-cache-loc-none", lambda t: rope(t, cache_loc=None), TypeError, FA + "cache_loc"),
    ("fused-scale", lambda t: rope(t, k_scale=torch.ones(5, device=dev(t))), ValueError, FA + "k_scale"),
    ("fused-scale-str", lambda t: rope(t, k_buffer=t["kc8"], v_buffer=t["vc8"], v_scale="1"), TypeError, FA + "v_scale"),
    ("fused-scale-nan", lambda t: rope(t, k_buffer=t["kc8"], v_buffer=t["vc8"], k_scale=float("nan")), ValueError, FA + "k_scale"),
    ("fused-value-other-device", lambda t: rope(t, value=t["v"].to(t["_other"])), ValueError, FA + "value"),
    ("fused-k-buffer-other-device", lambda t: rope(t, k_buffer=t["k_cache"].to(t["_other"])), ValueError, FA + "k_buffer"),
    ("fused-cache-loc-other-device", lambda t: rope(t, cache_loc=t["loc"].to(t["_other"])), ValueError, FA + "cache_loc"),
    ("fused-check-slot", lambda t: rope(t, cache_loc=torch.tensor([0, 1, 2, 16], device=dev(t)), check=True), IndexError, "cache_loc[3] = 16"),
    # --- rope_and_store ---
    ("native-head-size-needed", lambda t: native(t, head_size=_OMIT), ValueError, "head_size"),
    ("native-cache-args-together", lambda t: native(t, k_cache=_OMIT), ValueError, "k_cache"),
    ("native-loc-missing", lambda t: native(t, loc=_OMIT), ValueError, "loc"),
    ("native-k-cache-type", lambda t: native(t, k_cache=3), TypeError, "k_cache"),
    ("native-q-dtype", lambda t: native(t, q=t["q"].half()), TypeError, "q"),
    ("native-loc-2d", lambda t: native(t, loc=t["loc"][None]), ValueError, "loc"),
    ("native-v-scale-nan", lambda t: native(t, k_cache=t["kc8"], v_cache=t["vc8"], v_scale=float("nan")), ValueError, "v_scale"),
    ("native-rotary-odd", lambda t: native(t, cos_sin_cache=t["cs"][:, :5].contiguous()), ValueError, "cos_sin_cache"),
    ("native-check-positions", lambda t: native(t, positions=torch.tensor([0, -1, 1, 2], device=dev(t)), check=True), IndexError, "positions[1] = -1"),
    # --- compat: sgl-kernel ---
    ("sgl-k-int", lambda t: sgl_store(t, k=t["k"].view(T, H, D).to(I32)), TypeError, "k"),
    ("sgl-k-cache-none", lambda t: sgl_store(t, k_cache=None), TypeError, "k_cache"),
    ("sgl-loc-2d", lambda t: sgl_store(t, loc=t["loc"][:, None]), ValueError, "loc"),
    ("sgl-loc-float", lambda t: sgl_store(t, loc=t["loc"].float()), TypeError, "loc"),
    ("sgl-v-tokens", lambda t: sgl_store(t, v=t["v"].view(T, H, D)[:2]), ValueError, "v"),
    ("sgl-k-cache-heads", lambda t: sgl_store(t, k_cache=t["k_cache"][:, :1]), ValueError, "k_cache"),
    ("sgl-caches-differ", lambda t: sgl_store(t, v_cache=t["vc8"]), TypeError, "v_cache"),
    ("sgl-bytes-k-cache-float", lambda t: sgl_store(t, k=t["kc8"][:T].view(torch.uint8), k_cache=t["k_cache"]), TypeError, "k"),
    ("sgl-loc-other-device", lambda t: sgl_store(t, loc=t["loc"].to(t["_other"])), ValueError, "loc"),
    ("sgl-rope-cache-loc-2d", lambda t: sgl_rope(t, cache_loc=t["loc"][None]), ValueError, "cache_loc"),
    ("sgl-rope-head-size", lambda t: sgl_rope(t, head_size=63), ValueError, "head_size"),
    ("sgl-rope-value-fp8", lambda t: sgl_rope(t, value=t["v"].to(E4M3)), TypeError, "value"),
    # --- compat: vLLM ---
    ("vllm-key-int", lambda t: vllm_store(t, key=t["k"].view(T, H, D).to(I32)), TypeError, "key"),
    ("vllm-key-fp8", lambda t: vllm_store(t, key=t["k"].view(T, H, D).to(E4M3)), TypeError, "key"),
    ("vllm-value-dtype", lambda t: vllm_store(t, value=t["v"].view(T, H, D).half()), TypeError, "value"),
    ("vllm-value-cache-none", lambda t: vllm_store(t, value_cache=None), TypeError, "value_cache"),
    ("vllm-slot-mapping-float", lambda t: vllm_store(t, slot_mapping=t["loc"].float()), TypeError, "slot_mapping"),
    ("vllm-slot-mapping-2d", lambda t: vllm_store(t, slot_mapping=t["loc"][:, None]), ValueError, "slot_mapping"),
    ("vllm-slot-mapping-long", lambda t: vllm_store(t, slot_mapping=torch.arange(T + 1, device=dev(t))), ValueError, "slot_mapping"),
    ("vllm-value-tokens", lambda t: vllm_store(t, value=t["v"].view(T, H, D)[:2]), ValueError, "value"),
    ("vllm-key-cache-heads", lambda t: vllm_store(t, key_cache=t["k_cache"].view(S // 4, 4, H, D)[:, :, :1]), ValueError, "key_cache"),
    ("vllm-key-cache-last-dim", lambda t: vllm_store(t, key_cache=transposed(t["k_cache"].view(S // 4, 4, H, D))), ValueError, "key_cache"),
    ("vllm-kv-cache-dtype", lambda t: vllm_store(t, kv_cache_dtype="int4"), ValueError, "kv_cache_dtype"),
    ("vllm-kv-cache-dtype-none", lambda t: vllm_store(t, kv_cache_dtype=None), ValueError, "kv_cache_dtype"),
    ("vllm-fp8-cache-wrong-dtype", lambda t: vllm_store(t, kv_cache_dtype="fp8"), TypeError, "key_cache"),
    ("vllm-fp8-scale-shape", lambda t: vllm_store8(t, k_scale=torch.ones(3, device=dev(t))), ValueError, "k_scale"),
    ("vllm-fp8-scale-dtype", lambda t: vllm_store8(t, v_scale=torch.ones(1, dtype=torch.float64, device=dev(t))), TypeError, "v_scale"),
    ("vllm-slot-mapping-other-device", lambda t: vllm_store(t, slot_mapping=t["loc"].to(t["_other"])), ValueError, "slot_mapping"),
    ("vllm-rope-query-int", lambda t: vllm_rope(t, query=t["q"].to(I32)), TypeError, "query"),
    ("vllm-rope-positions-length", lambda t: vllm_rope(t, positions=t["pos"][:3]), ValueError, "positions"),
    ("vllm-rope-rotary-odd", lambda t: vllm_rope(t, cos_sin_cache=t["cs"][:, :9].contiguous()), ValueError, "cos_sin_cache"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejected_call_writes_nothing(backend, case):
    _, builder, exc, words = case
    t = tensors(backend[1])
    before = snapshot(t)
    call = builder(t)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in (words,) if isinstance(words, str) else words:
        assert mentions(msg, w), f"message {msg!r} does not name {w!r}"
    assert_unchanged(t, before)


def test_table_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40 + 37


def test_mixed_cuda_and_cpu_devices_rejected():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    t = tensors("cpu")
    before = snapshot(t)
    with pytest.raises(ValueError, match="k_cache"):
        ropekv.store_kv(t["k"], t["v"], t["k_cache"].cuda(), t["v_cache"], t["loc"])
    cuda = {n: x.cuda() for n, x in t.items() if isinstance(x, torch.Tensor)}
    for name, call in [
        ("v_cache", lambda: ropekv.store_kv(cuda["k"], cuda["v"], cuda["k_cache"], t["v_cache"], cuda["loc"])),
        ("loc", lambda: ropekv.store_kv(cuda["k"], cuda["v"], cuda["k_cache"], cuda["v_cache"], t["loc"])),
        ("positions", lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(t["pos"], cuda["q"], cuda["k"], D, cuda["cs"])),
        ("cos_sin_cache", lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(cuda["pos"], cuda["q"], cuda["k"], D, t["cs"])),
        ("query", lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(cuda["pos"], t["q"], cuda["k"], D, cuda["cs"])),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert mentions(str(info.value), name), str(info.value)
    assert_unchanged(t, before)


# ---------------------------------------------------------------------------
# B. Every unsupported dtype, per argument
# ---------------------------------------------------------------------------

def retyped(x: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """x converted to dtype (zeros where torch cannot convert; None where it cannot even make one)."""
    if dtype == torch.bool:
        return x != 0
    try:
        return x.to(dtype)
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    try:
        return torch.zeros(x.shape, dtype=dtype, device=x.device)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


SWEEP = [
    # (id, tensor of tensors() replaced, call with the replacement, dtypes that are fine there, name)
    ("store-k", "k", lambda t, x: store(t, k=x), {BF16}, "k"),
    ("store-v", "v", lambda t, x: store(t, v=x), {BF16}, "v"),
    ("store-k_cache", "k_cache", lambda t, x: store(t, k_cache=x), {BF16, E4M3, E5M2}, "k_cache"),
    ("store-v_cache", "v_cache", lambda t, x: store(t, v_cache=x), {BF16, E4M3, E5M2}, "v_cache"),
    ("store-loc", "loc", lambda t, x: store(t, loc=x), set(INDEX), "loc"),
    ("store-k_scale", "scale", lambda t, x: store8(t, k_scale=x), {F32}, "k_scale"),
    ("store-v_scale", "head_scale", lambda t, x: store8(t, v_scale=x), {F32}, "v_scale"),
    ("rope-positions", "pos", lambda t, x: rope_only(t, positions=x), set(INDEX), "positions"),
    ("rope-query", "q", lambda t, x: rope_only(t, query=x), {BF16}, "query"),
    ("rope-key", "k", lambda t, x: rope_only(t, key=x), {BF16}, "key"),
    ("rope-cos_sin_cache", "cs", lambda t, x: rope_only(t, cos_sin_cache=x), set(FLOATS), "cos_sin_cache"),
    ("fused-value", "v", lambda t, x: rope(t, value=x), {BF16}, FA + "value"),
    ("fused-k_buffer", "k_cache", lambda t, x: rope(t, k_buffer=x), {BF16, E4M3, E5M2}, FA + "k_buffer"),
    ("fused-v_buffer", "v_cache", lambda t, x: rope(t, v_buffer=x), {BF16, E4M3, E5M2}, FA + "v_buffer"),
    ("fused-cache_loc", "loc", lambda t, x: rope(t, cache_loc=x), set(INDEX), FA + "cache_loc"),
    ("fused-v_scale", "scale", lambda t, x: rope(t, k_buffer=t["kc8"], v_buffer=t["vc8"], v_scale=x), {F32}, FA + "v_scale"),
    ("native-q", "q", lambda t, x: native(t, q=x), {BF16}, "q"),
    ("native-k_cache", "k_cache", lambda t, x: native(t, k_cache=x), {BF16, E4M3, E5M2}, "k_cache"),
    ("native-loc", "loc", lambda t, x: native(t, loc=x), set(INDEX), "loc"),
    ("sgl-v", "v", lambda t, x: sgl_store(t, v=x), {BF16}, "v"),
    ("sgl-loc", "loc", lambda t, x: sgl_store(t, loc=x), set(INDEX), "loc"),
    ("vllm-key", "k", lambda t, x: vllm_store(t, key=x.view(T, H, D)), {BF16}, "key"),
    ("vllm-slot_mapping", "loc", lambda t, x: vllm_store(t, slot_mapping=x), set(INDEX), "slot_mapping"),
    ("vllm-rope-cos_sin_cache", "cs", lambda t, x: vllm_rope(t, cos_sin_cache=x), set(FLOATS), "cos_sin_cache"),
]


@pytest.mark.parametrize("entry", SWEEP, ids=[e[0] for e in SWEEP])
def test_every_unsupported_dtype_rejected(backend, entry):
    """TypeError naming the argument and a dtype (the one given or those allowed), for every other dtype."""
    _, key, build, supported, name = entry
    t = tensors(backend[1])
    before = snapshot(t)
    tried = []
    for dtype in ALL_DTYPES:
        if dtype in supported:
            continue
        x = retyped(t[key], dtype)
        if x is None:
            continue
        call = build(t, x)
        with pytest.raises(TypeError) as info:
            call()
        msg = str(info.value)
        dtype_names = [str(d).replace("torch.", "") for d in [dtype, *supported]]
        assert mentions(msg, name), f"{dtype}: message {msg!r} does not name {name!r}"
        assert any(n in msg for n in dtype_names), f"{dtype}: message {msg!r} names no dtype"
        tried.append(dtype)
    assert_unchanged(t, before)
    assert len(tried) >= 12, f"only {tried} could be made here"


# ---------------------------------------------------------------------------
# C. Arbitrary, mostly invalid arguments (hypothesis)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TSpec:
    """A tensor to make: shape, dtype, memory layout, device, and what its values are."""

    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"  # contiguous | transposed | step2 | padded | zero_stride
    other_device: bool = False
    index_bound: int = -1  # >= 0: an index tensor, values mostly in [-3, index_bound + 3]


# Non-tensor values put where tensors belong.
JUNK = [None, 0, 1, -1, 2.5, "x", b"", [1, 2], (), {}, True, torch.float32, slice(None)]


HEAD_SIZES = [0, -2, 1, 63, 2**40, 64.0, "64", None, True, 2, 4]
SCALE_VALUES = [None, 1.0, 0.5, 3, 0.0, -1.0, float("nan"), float("inf"), 1e300, 1e-300, 10**400, True, "1", [1.0]]
NEOX_VALUES = [True, False, 0, 1, 2, None, "yes", 1.0]
KV_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8", "", None, 3, torch.float8_e4m3fn]


def _have(module: str) -> bool:
    try:
        __import__(f"ropekv.compat.{module}")
        return True
    except ImportError:
        return False


APIS = ["store", "rope", "fused", "native", "native_fused"]
APIS += ["sgl_store", "sgl_fused"] if _have("sgl_kernel") else []
APIS += ["vllm_store", "vllm_rope"] if _have("vllm") else []

# The tensors each API may write (in place); every other tensor must stay as it was.
WRITABLE = {
    "store": {"k_cache", "v_cache"},
    "rope": {"query", "key"},
    "fused": {"query", "key", "k_buffer", "v_buffer"},
    "native": {"q", "k"},
    "native_fused": {"q", "k", "k_cache", "v_cache"},
    "sgl_store": {"k_cache", "v_cache"},
    "sgl_fused": {"query", "key", "k_buffer", "v_buffer"},
    "vllm_store": {"key_cache", "value_cache"},
    "vllm_rope": {"query", "key"},
}
SCALE_ARGS = {"k_scale", "v_scale"}


@dataclasses.dataclass
class Call:
    api: str
    args: Dict[str, Any]  # TSpec or a plain value
    check: bool
    seed: int


def _mutate(draw, name: str, value):
    if name == "head_size":
        return draw(st.sampled_from(HEAD_SIZES))
    if name == "is_neox":
        return draw(st.sampled_from(NEOX_VALUES))
    if name == "kv_cache_dtype":
        return draw(st.sampled_from(KV_DTYPES))
    if name == "fused_set_kv_buffer_arg":
        return draw(st.sampled_from(JUNK + [dict(value=None)]))
    if name in SCALE_ARGS and draw(st.booleans()):
        if draw(st.booleans()):
            return draw(st.sampled_from(SCALE_VALUES))
        shape = draw(st.sampled_from([(), (1,), (2,), (3,), (2, 1), (0,)]))
        return TSpec(shape, draw(st.sampled_from([F32, F32, F16, torch.float64, I32])), other_device=draw(st.booleans()))
    if not isinstance(value, TSpec):
        return draw(st.sampled_from(JUNK))
    kind = draw(st.sampled_from(["junk", "dtype", "dtype", "shape", "dim", "ndim", "layout", "device"]))
    if kind == "junk":
        return draw(st.sampled_from(JUNK))
    if kind == "dtype":
        return dataclasses.replace(value, dtype=draw(st.sampled_from(ALL_DTYPES)))
    if kind == "shape":
        return dataclasses.replace(value, shape=tuple(draw(st.lists(st.integers(0, 6), max_size=5))))
    if kind == "dim" and value.shape:
        i = draw(st.integers(0, len(value.shape) - 1))
        n = value.shape[i]
        new = draw(st.sampled_from([0, 1, n + 1, max(n - 1, 0), 2 * n]))
        return dataclasses.replace(value, shape=value.shape[:i] + (new,) + value.shape[i + 1:])
    if kind == "ndim":
        shape = value.shape
        if shape and len(shape) >= 2 and draw(st.booleans()):
            shape = shape[:-2] + (shape[-2] * shape[-1],)
        else:
            i = draw(st.integers(0, len(shape)))
            shape = shape[:i] + (1,) + shape[i:]
        return dataclasses.replace(value, shape=shape)
    if kind == "layout":
        return dataclasses.replace(value, layout=draw(st.sampled_from(["transposed", "step2", "padded", "zero_stride"])))
    return dataclasses.replace(value, other_device=True)


@st.composite
def arbitrary_calls(draw):
    api = draw(st.sampled_from(APIS))
    T = draw(st.integers(0, 5))
    hk, hv, hq = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dk = draw(st.sampled_from([2, 4, 8, 16, 64]))
    dv = draw(st.sampled_from([dk, 2, 8, 64]))
    dtype = draw(st.sampled_from(FLOATS))
    cache_dtype = dtype if api.startswith(("vllm", "sgl")) else draw(st.sampled_from([dtype, dtype, E4M3, E5M2]))
    index = draw(st.sampled_from(INDEX))
    S = draw(st.integers(1, 12))
    page = draw(st.sampled_from([1, 2, 4]))
    layout = "paged" if api == "vllm_store" else draw(st.sampled_from(["3d", "2d", "paged"]))
    if api == "sgl_fused":
        layout = "2d"
    pages = -(-S // page)
    slots = pages * page if layout == "paged" else S
    as_2d = False if api.startswith("vllm_store") or api == "sgl_store" else draw(st.booleans())
    rot = 2 * draw(st.integers(1, dk // 2))
    max_pos = draw(st.integers(1, 20))

    def inp(h, d):
        return TSpec((T, h * d) if as_2d else (T, h, d), dtype)

    def cache(h, d):
        shape = {"3d": (S, h, d), "2d": (S, h * d), "paged": (pages, page, h, d)}[layout]
        return TSpec(shape, cache_dtype)

    def scale(h):
        return draw(st.sampled_from([None, 2.0, TSpec((1,), F32), TSpec((h,), F32)]))

    def idx(bound):
        return TSpec((T,), index, index_bound=bound)

    rope_args = dict(positions=idx(max_pos), query=inp(hq, dk), key=inp(hk, dk), head_size=dk,
                     cos_sin_cache=TSpec((max_pos, rot), draw(st.sampled_from(FLOATS))), is_neox=draw(st.booleans()))
    cache_args = dict(v=inp(hv, dv), k_cache=cache(hk, dk), v_cache=cache(hv, dv), loc=idx(slots),
                      k_scale=scale(hk), v_scale=scale(hv))
    if api == "store":
        args = dict(k=inp(hk, dk), **cache_args)
    elif api == "rope":
        args = rope_args
    elif api in ("fused", "sgl_fused"):
        args = dict(rope_args, value=cache_args["v"], k_buffer=cache_args["k_cache"], v_buffer=cache_args["v_cache"],
                    cache_loc=cache_args["loc"], k_scale=cache_args["k_scale"], v_scale=cache_args["v_scale"],
                    fused_set_kv_buffer_arg="<built from the fields>")
    elif api == "native":
        args = dict(rope_args, q=rope_args["query"], k=rope_args["key"])
        del args["query"], args["key"]
    elif api == "native_fused":
        args = dict(rope_args, q=rope_args["query"], k=rope_args["key"], **cache_args)
        del args["query"], args["key"]
    elif api == "sgl_store":
        args = dict(k=inp(hk, dk), v=cache_args["v"], k_cache=cache_args["k_cache"], v_cache=cache_args["v_cache"],
                    loc=cache_args["loc"])
    elif api == "vllm_store":
        args = dict(key=inp(hk, dk), value=cache_args["v"], key_cache=cache_args["k_cache"],
                    value_cache=cache_args["v_cache"], slot_mapping=cache_args["loc"], kv_cache_dtype="auto",
                    k_scale=TSpec((1,), F32), v_scale=TSpec((1,), F32))
    else:  # vllm_rope
        args = rope_args
    # Mostly invalid: up to three arguments replaced by something else.
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(args)))
        args[name] = _mutate(draw, name, args[name])
    return Call(api, args, check=draw(st.sampled_from([False, False, False, True])), seed=draw(st.integers(0, 2**31 - 1)))


@dataclasses.dataclass
class Slab:
    """A tensor made as a view into the middle of a larger buffer (base)."""

    name: str
    base: torch.Tensor
    view: torch.Tensor
    strides: tuple
    offset: int

    def footprint_bytes(self) -> torch.Tensor:
        """Bytes of base that the view covers (where a write through the view may land)."""
        n = self.base.numel()
        mask = torch.zeros(n, dtype=torch.bool)
        if self.view.numel():
            idx = torch.arange(n).as_strided(tuple(self.view.shape), self.strides, self.offset)
            mask[idx.flatten()] = True
        return mask.repeat_interleave(self.base.element_size())


def _contiguous_strides(shape) -> List[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return strides[::-1]


def _fill(n: int, dtype: torch.dtype, gen: torch.Generator, index_bound: int) -> torch.Tensor:
    """n values of dtype on the CPU: indices mostly in range for index tensors, else random."""
    if index_bound >= 0 and dtype in INDEX:
        lo, hi = (-2**31, 2**31 - 1) if dtype == I32 else (-2**63, 2**63 - 1)
        v = torch.randint(-3, index_bound + 4, (n,), generator=gen)
        extreme = torch.tensor([lo, hi, 2**31 - 1, -1, index_bound, 2**32 if dtype == I64 else 7])
        pick = torch.randint(0, len(extreme), (n,), generator=gen)
        v = torch.where(torch.rand(n, generator=gen) < 0.1, extreme[pick], v)
        return v.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        try:
            return (2 * torch.randn(n, generator=gen)).to(dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    try:
        return torch.randint(0, 100, (n,), generator=gen).to(dtype)
    except (RuntimeError, TypeError, NotImplementedError):
        return torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.uint8).view(dtype)


def make_slab(name: str, spec: TSpec, device, gen: torch.Generator, guard: int = 8) -> Slab:
    shape = tuple(spec.shape)
    if spec.layout == "transposed" and len(shape) >= 2:
        st_ = _contiguous_strides(shape[:-2] + (shape[-1], shape[-2]))
        strides = st_[:-2] + [st_[-1], st_[-2]]
    elif spec.layout == "step2" and shape:
        strides = _contiguous_strides(shape[:-1] + (2 * shape[-1],))
        strides[-1] = 2
    elif spec.layout == "padded" and shape:
        strides = _contiguous_strides(shape[:-1] + (shape[-1] + 3,))
    elif spec.layout == "zero_stride" and shape:
        strides = _contiguous_strides(shape)
        strides[0] = 0
    else:
        strides = _contiguous_strides(shape)
    numel = math.prod(shape)
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if numel else 0
    base = _fill(span + 2 * guard, spec.dtype, gen, spec.index_bound).to(device)
    view = base.as_strided(shape, strides, guard)
    return Slab(name, base, view, tuple(strides), guard)


def _invoke(api: str, a: Dict[str, Any], check: bool) -> None:
    if api == "store":
        ropekv.store_kv(a["k"], a["v"], a["k_cache"], a["v_cache"], a["loc"], k_scale=a["k_scale"],
                        v_scale=a["v_scale"], check=check)
    elif api in ("rope", "fused"):
        arg = a.get("fused_set_kv_buffer_arg")
        if arg == "<built from the fields>":
            arg = ropekv.FusedSetKVBufferArg(value=a["value"], k_buffer=a["k_buffer"], v_buffer=a["v_buffer"],
                                             k_scale=a["k_scale"], v_scale=a["v_scale"], cache_loc=a["cache_loc"])
        ropekv.apply_rope_with_cos_sin_cache_inplace(a["positions"], a["query"], a["key"], a["head_size"],
                                                     a["cos_sin_cache"], a["is_neox"], arg, check=check)
    elif api in ("native", "native_fused"):
        kw = {n: a[n] for n in ("v", "k_cache", "v_cache", "loc", "k_scale", "v_scale") if n in a}
        ropekv.rope_and_store(a["positions"], a["q"], a["k"], a["cos_sin_cache"], head_size=a["head_size"],
                              is_neox=a["is_neox"], check=check, **kw)
    elif api == "sgl_store":
        compat("sgl_kernel").set_kv_buffer_kernel(a["k_cache"], a["v_cache"], a["loc"], a["k"], a["v"])
    elif api == "sgl_fused":
        m = compat("sgl_kernel")
        arg = a["fused_set_kv_buffer_arg"]
        if arg == "<built from the fields>":
            arg = m.FusedSetKVBufferArg(value=a["value"], k_buffer=a["k_buffer"], v_buffer=a["v_buffer"],
                                        k_scale=a["k_scale"], v_scale=a["v_scale"], cache_loc=a["cache_loc"])
        m.apply_rope_with_cos_sin_cache_inplace(a["positions"], a["query"], a["key"], a["head_size"],
                                                a["cos_sin_cache"], a["is_neox"], arg)
    elif api == "vllm_store":
        compat("vllm").reshape_and_cache_flash(a["key"], a["value"], a["key_cache"], a["value_cache"],
                                               a["slot_mapping"], a["kv_cache_dtype"], a["k_scale"], a["v_scale"])
    elif api == "vllm_rope":
        compat("vllm").rotary_embedding(a["positions"], a["query"], a["key"], a["head_size"], a["cos_sin_cache"],
                                        a["is_neox"])
    else:
        raise AssertionError(api)


@settings(max_examples=3 * settings.default.max_examples)
@given(call=arbitrary_calls())
def test_arbitrary_arguments_raise_only_documented_errors(backend, call):
    """Only TypeError, ValueError or IndexError ever escapes, and a call that raises writes nothing.
    A call that succeeds writes nothing outside the tensors it may write (guard buffers)."""
    device = backend[1]
    gen = torch.Generator().manual_seed(call.seed)
    args, slabs = {}, []
    for name, spec in call.args.items():
        if isinstance(spec, TSpec):
            slab = make_slab(name, spec, other_device(device) if spec.other_device else device, gen)
            slabs.append(slab)
            args[name] = slab.view
        else:
            args[name] = spec
    before = [(s, raw(s.base).clone()) for s in slabs if s.base.device.type != "meta"]
    try:
        _invoke(call.api, args, call.check)
    except (TypeError, ValueError, IndexError) as e:
        for s, b in before:
            assert torch.equal(raw(s.base), b), f"{s.name} was written by a call that raised {type(e).__name__}: {e}"
        return
    for s, b in before:
        now = raw(s.base)
        if s.name in WRITABLE[call.api]:
            outside = ~s.footprint_bytes()
            assert torch.equal(now[outside], b[outside]), f"a write landed outside {s.name}"
        else:
            assert torch.equal(now, b), f"{s.name} is read-only here but was written"


# ---------------------------------------------------------------------------
# D. Out-of-range slots and positions (default mode): guard buffers
# ---------------------------------------------------------------------------

def guarded(shape, dtype, device, gen, strides=None, guard=256, guard_value=None):
    """A view of `shape` into the middle of a larger buffer; returns the Slab.

    Contents random; the guard regions hold guard_value when given (NaN around a
    cos/sin cache shows any read outside it in the results).
    """
    strides = list(strides) if strides is not None else _contiguous_strides(shape)
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    fill_dtype = F32 if dtype.itemsize == 1 else dtype
    base = (2 * torch.randn(span + 2 * guard, generator=gen)).to(fill_dtype)
    if guard_value is not None:
        base[:guard] = guard_value
        base[guard + span:] = guard_value
    base = base.to(dtype).to(device)
    return Slab("", base, base.as_strided(tuple(shape), tuple(strides), guard), tuple(strides), guard)


def assert_guards_intact(slab: Slab, before: torch.Tensor, what: str) -> None:
    outside = ~slab.footprint_bytes()
    assert torch.equal(raw(slab.base)[outside], before[outside]), f"a write landed outside {what}"


BAD_SLOTS = {
    I32: [2**31 - 1, -2**31, -7],
    # 2**32 + 1 and -(2**32) + 3 are slots 1 and 3 once truncated to 32 bits; 1 and 3 are never valid targets here.
    I64: [2**31, 2**32, 2**32 + 1, -(2**32) + 3, 2**40 + 5, 2**63 - 1, -2**63],
}
BAD_POSITIONS = {
    I32: [2**31 - 1, -2**31, -1],
    I64: [2**32, 2**32 + 7, 2**62, 2**63 - 1, -2**63, -(2**32) + 2],
}


def _cache_layout(layout: str, slots: int, h: int, d: int):
    """(shape, strides) of a cache view with `slots` slots."""
    if layout == "paged":
        return (slots // 4, 4, h, d), None
    if layout == "2d":
        return (slots, h * d), None
    if layout == "slot_padded":
        return (slots, h, d), [h * d + 24, d, 1]
    if layout == "paged_padded":  # pages not laid end to end
        return (slots // 4, 4, h, d), [5 * h * d, h * d, d, 1]
    return (slots, h, d), None


@pytest.mark.parametrize("index_dtype", INDEX, ids=["int32", "int64"])
@pytest.mark.parametrize("api", ["store", "rope", "fused", "native"])
def test_out_of_range_indices_touch_nothing_outside(backend, api, index_dtype):
    """Slots >= S or < 0 and positions outside [0, max_pos): no write outside the caches, no read
    outside the cos/sin cache (its guard rows are NaN, which would show in the results)."""
    device = backend[1]
    gen = torch.Generator().manual_seed(7)
    hq, hk, d, hv, dv, slots, max_pos, rot = 3, 2, 64, 1, 32, 12, 24, 48
    bad_slots = [slots, slots + 1, *BAD_SLOTS[index_dtype]]
    bad_pos = [max_pos, max_pos + 1, *BAD_POSITIONS[index_dtype]]
    n = max(len(bad_slots), len(bad_pos)) + 4
    good_slots = [2, 5, 11, -1]  # never 0, 1 or 3: truncated bad slots would land there
    loc = (good_slots + bad_slots + [-1] * n)[:n]
    pos = ([0, 7, max_pos - 1, 3] + bad_pos + [1] * n)[:n]
    pos = pos[2:] + pos[:2]  # good and bad positions on other tokens than good and bad slots
    combos = [(BF16, BF16, "3d"), (BF16, E4M3, "paged"), (F16, F16, "2d"), (F32, E5M2, "slot_padded"),
              (BF16, BF16, "paged_padded")]
    for dtype, cache_dtype, layout in combos:
        q = guarded((n, hq, d), dtype, device, gen)
        k = guarded((n, hk, d), dtype, device, gen)
        v = guarded((n, hv, dv), dtype, device, gen)
        cs_table = cos_sin_cache(max_pos, rot)
        cs = guarded((max_pos, rot), F32, device, gen, guard=4 * rot, guard_value=float("nan"))
        cs.view.copy_(cs_table.to(device))
        (kshape, kstrides), (vshape, vstrides) = _cache_layout(layout, slots, hk, d), _cache_layout(layout, slots, hv, dv)
        kc = guarded(kshape, cache_dtype, device, gen, strides=kstrides)
        vc = guarded(vshape, cache_dtype, device, gen, strides=vstrides)
        loc_t = torch.tensor(loc, dtype=index_dtype, device=device)
        pos_t = torch.tensor(pos, dtype=index_dtype, device=device)
        k_scale = torch.full((hk,), 0.75, device=device) if cache_dtype in (E4M3, E5M2) else None
        slabs = dict(q=q, k=k, v=v, cs=cs, kc=kc, vc=vc)
        before = {name: raw(s.base).clone() for name, s in slabs.items()}
        k_in, q_in, v_in = k.view.clone(), q.view.clone(), v.view.clone()
        kc_in, vc_in = kc.view.clone(), vc.view.clone()
        if api == "store":
            ropekv.store_kv(k.view, v.view, kc.view, vc.view, loc_t, k_scale=k_scale, v_scale=2.0)
        elif api == "rope":
            ropekv.apply_rope_with_cos_sin_cache_inplace(pos_t, q.view, k.view, d, cs.view, True)
        elif api == "fused":
            arg = ropekv.FusedSetKVBufferArg(value=v.view, k_buffer=kc.view, v_buffer=vc.view, k_scale=k_scale,
                                             v_scale=2.0, cache_loc=loc_t)
            ropekv.apply_rope_with_cos_sin_cache_inplace(pos_t, q.view, k.view, d, cs.view, False, arg)
        else:
            ropekv.rope_and_store(pos_t, q.view, k.view, cs.view, is_neox=True, v=v.view, k_cache=kc.view,
                                  v_cache=vc.view, loc=loc_t, k_scale=k_scale, v_scale=2.0)
        what = f"({api}, {dtype}, cache {cache_dtype}, {layout}, {index_dtype})"
        for name, s in slabs.items():
            assert_guards_intact(s, before[name], f"{name} {what}")
        assert torch.equal(ref.bits(v.view), ref.bits(v_in)), f"value written {what}"
        assert torch.equal(ref.bits(cs.view.cpu()), ref.bits(cs_table)), f"cos/sin cache written {what}"
        if api == "store":
            assert torch.equal(ref.bits(k.view), ref.bits(k_in)) and torch.equal(ref.bits(q.view), ref.bits(q_in))
        else:
            neox = api != "fused"
            for x, x_in in ((q, q_in), (k, k_in)):
                want, slack = ref.rope(x_in, pos_t, cs_table, neox)
                ref.assert_close_rope(x.view, want, slack, f"rotation {what}")
        if api == "rope":
            assert torch.equal(ref.bits(kc.view), ref.bits(kc_in)) and torch.equal(ref.bits(vc.view), ref.bits(vc_in))
        else:
            want_k, want_v = ref.store_kv(k.view, v.view, kc_in, vc_in, loc_t, k_scale, 2.0)
            assert torch.equal(ref.bits(kc.view).cpu(), want_k), f"k cache {what}"
            assert torch.equal(ref.bits(vc.view).cpu(), want_v), f"v cache {what}"


# ---------------------------------------------------------------------------
# E. Check mode: IndexError naming the first bad token and value, nothing written
# ---------------------------------------------------------------------------

CHECK_T, CHECK_S, CHECK_MAX_POS = 7, 12, 32
GOOD_LOC = [0, 3, -1, 7, 2, 5, -4]
GOOD_POS = [0, 1, 2, 31, 4, 5, 6]
# Several bad entries: the message names the first (negative slots are padding, not bad).
BAD_LOC = {I32: ([0, -1, 3, 12, 99, 2**31 - 1, 13], 3, 12), I64: ([0, -5, 3, 2**40, 12, -1, 2**63 - 1], 3, 2**40)}
BAD_POS = {I32: ([0, 1, 33, -1, 32, 2**31 - 1, 2], 2, 33), I64: ([0, -2**63, 32, 5, 2**40, -1, 1], 1, -2**63)}

CHECK_APIS = [
    # (api, which index tensor is bad, the name the message uses)
    ("store", "loc", "loc"),
    ("rope", "positions", "positions"),
    ("fused", "loc", "cache_loc"),
    ("fused", "positions", "positions"),
    ("native", "loc", "loc"),
    ("native", "positions", "positions"),
    ("sgl_store", "loc", "loc"),
    ("vllm_store", "loc", "slot_mapping"),
]


def _check_call(api, t, loc, pos, check):
    kw = dict(check=True) if check else {}
    k3, v3 = t["k"].view(CHECK_T, H, D), t["v"].view(CHECK_T, H, D)
    if api == "store":
        return lambda: ropekv.store_kv(t["k"], t["v"], t["kc"], t["vc"], loc, k_scale=t["scale"], **kw)
    if api == "rope":
        return lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(pos, t["q"], t["k"], D, t["cs"], True, **kw)
    if api == "fused":
        arg = ropekv.FusedSetKVBufferArg(value=t["v"], k_buffer=t["kc"], v_buffer=t["vc"], k_scale=t["scale"], cache_loc=loc)
        return lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(pos, t["q"], t["k"], D, t["cs"], False, arg, **kw)
    if api == "native":
        return lambda: ropekv.rope_and_store(pos, t["q"], t["k"], t["cs"], head_size=D, v=t["v"], k_cache=t["kc"],
                                             v_cache=t["vc"], loc=loc, k_scale=t["scale"], **kw)
    if api == "sgl_store":
        m = compat("sgl_kernel")
        return lambda: m.set_kv_buffer_kernel(t["kc"], t["vc"], loc, k3, v3)
    if api == "vllm_store":
        m = compat("vllm")
        return lambda: m.reshape_and_cache_flash(k3, v3, t["kc"].view(CHECK_S // 4, 4, H, D), t["vc"].view(CHECK_S // 4, 4, H, D),
                                                 loc, "auto", None, None)
    raise AssertionError(api)


def _check_tensors(device, cache_dtype):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s, dt=BF16: (2 * torch.randn(*s, generator=g)).to(dt).to(device)
    return dict(q=mk(CHECK_T, 3 * D), k=mk(CHECK_T, H * D), v=mk(CHECK_T, H * D),
                kc=mk(CHECK_S, H, D, dt=cache_dtype), vc=mk(CHECK_S, H, D, dt=cache_dtype),
                cs=cos_sin_cache(CHECK_MAX_POS, D).to(device), scale=torch.full((H,), 0.5, device=device))


@pytest.mark.parametrize("via", ["argument", "environment"])
@pytest.mark.parametrize("index_dtype", INDEX, ids=["int32", "int64"])
@pytest.mark.parametrize("api,bad,name", CHECK_APIS, ids=[f"{a}-{b}" for a, b, _ in CHECK_APIS])
def test_check_mode_names_first_bad_index(backend, monkeypatch, api, bad, name, index_dtype, via):
    device = backend[1]
    if api in ("sgl_store", "vllm_store") and via == "argument":
        pytest.skip("the compat entry points take check mode from ROPEKV_CHECK only")
    cache_dtype = E4M3 if api in ("store", "fused") and index_dtype == I32 else BF16
    t = _check_tensors(device, cache_dtype)
    if bad == "loc":
        values, first, value = BAD_LOC[index_dtype]
        loc, pos = torch.tensor(values, dtype=index_dtype, device=device), torch.tensor(GOOD_POS, dtype=index_dtype, device=device)
    else:
        values, first, value = BAD_POS[index_dtype]
        loc, pos = torch.tensor(GOOD_LOC, dtype=index_dtype, device=device), torch.tensor(values, dtype=index_dtype, device=device)
    if via == "environment":
        monkeypatch.setenv("ROPEKV_CHECK", "1")
    before = snapshot(t)
    with pytest.raises(IndexError) as info:
        _check_call(api, t, loc, pos, via == "argument")()
    msg = str(info.value)
    assert f"{name}[{first}] = {value}" in msg, msg
    assert_unchanged(t, before, "a call that failed its index check")


@pytest.mark.parametrize("api", ["store", "rope", "fused", "native", "sgl_store", "vllm_store"])
def test_check_mode_accepts_valid_indices(backend, monkeypatch, api):
    """Padding (negative slots) and every in-range index pass the check; results equal unchecked ones."""
    device = backend[1]
    loc, pos = torch.tensor(GOOD_LOC, device=device), torch.tensor(GOOD_POS, dtype=I32, device=device)
    t1, t2 = _check_tensors(device, BF16), _check_tensors(device, BF16)
    _check_call(api, t1, loc, pos, False)()
    monkeypatch.setenv("ROPEKV_CHECK", "1")
    _check_call(api, t2, loc, pos, False)()
    for n in t1:
        assert torch.equal(ref.bits(t1[n]), ref.bits(t2[n])), n


# ---------------------------------------------------------------------------
# F. Tensors of more than 2^31 elements: 64-bit offsets
# ---------------------------------------------------------------------------
# torch.empty does not touch the memory, so a 4 GiB CPU cache costs only the
# pages written. Only the rows of interest (and their neighbours) are set and
# compared. On the GPU the same tests allocate the same sizes.

BIG = 2**31


def _big_rows(rows_total: int, width: int) -> List[int]:
    """Rows to write: the last ones, the one straddling element 2^31 and those around it, and row 5."""
    straddle = BIG // width
    return sorted({rows_total - 1, rows_total - 3, straddle - 1, straddle, straddle + 1, 5})


def _patterned(view2d: torch.Tensor, rows: List[int], value: float) -> None:
    """Sets rows (and their neighbours) of a [rows, width] view to a known value."""
    idx = sorted({r + o for r in rows for o in (-1, 0, 1) if 0 <= r + o < view2d.shape[0]})
    if view2d.dtype.itemsize == 1:
        view2d.view(torch.uint8)[idx] = 0x3A
    else:
        view2d[idx] = value


def _check_rows(view2d, rows, tokens2d, cache_dtype, scale, value, what):
    """Rows hold the converted tokens; their neighbours still hold the pattern."""
    for r, x in zip(rows, tokens2d):
        want = ref.cache_bits(x.cpu().reshape(1, -1), cache_dtype, torch.tensor([[float(scale)]], dtype=torch.float64))
        assert torch.equal(ref.bits(view2d[r]).cpu(), want.reshape(-1)), f"row {r} of {what}"
    pattern = torch.full((view2d.shape[1],), 0x3A, dtype=torch.uint8) if view2d.dtype.itemsize == 1 else None
    for r in {r + o for r in rows for o in (-1, 1)} - set(rows):
        if 0 <= r < view2d.shape[0]:
            row = view2d[r].cpu()
            if pattern is not None:
                assert torch.equal(row.view(torch.uint8), pattern), f"neighbour row {r} of {what} written"
            else:
                assert bool((row == value).all()), f"neighbour row {r} of {what} written"


@pytest.mark.parametrize("layout", ["3d", "paged", "2d", "fp8", "int32"])
def test_store_kv_cache_over_2g_elements(backend, layout):
    device = backend[1]
    h, d = 1, 96  # 96 does not divide 2^31: one row straddles element 2^31
    width = h * d
    rows_total = -(-(BIG + 8 * width) // (8 * width)) * 8
    cache_dtype = E4M3 if layout == "fp8" else BF16
    k_cache = torch.empty(rows_total * width, dtype=cache_dtype, device=device)
    assert k_cache.numel() > BIG
    flat = k_cache.view(rows_total, width)
    shaped = {"paged": flat.view(rows_total // 8, 8, h, d), "2d": flat}.get(layout, flat.view(rows_total, h, d))
    v_cache = torch.empty(rows_total, 1, 2, dtype=cache_dtype, device=device)
    rows = _big_rows(rows_total, width)
    _patterned(flat, rows, -3.0)
    _patterned(v_cache.view(rows_total, 2), rows, -3.0)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(len(rows), h, d, generator=g).to(BF16).to(device)
    v = torch.randn(len(rows), 1, 2, generator=g).to(BF16).to(device)
    loc = torch.tensor(rows, dtype=I32 if layout == "int32" else I64, device=device)
    ropekv.store_kv(k, v, shaped, v_cache, loc, k_scale=0.5 if layout == "fp8" else None)
    _check_rows(flat, rows, k.reshape(len(rows), -1), cache_dtype, 0.5 if layout == "fp8" else 1.0, -3.0, "k_cache")
    _check_rows(v_cache.view(rows_total, 2), rows, v.reshape(len(rows), -1), cache_dtype, 1.0, -3.0, "v_cache")


def test_fused_rope_k_cache_over_2g_elements(backend):
    device = backend[1]
    h, d = 2, 96
    width = h * d
    rows_total = BIG // width + 16
    k_cache = torch.empty(rows_total, h, d, dtype=BF16, device=device)
    assert k_cache.numel() > BIG
    flat = k_cache.view(rows_total, width)
    v_cache = torch.empty(rows_total, 2, dtype=BF16, device=device)
    rows = _big_rows(rows_total, width)
    _patterned(flat, rows, 9.0)
    _patterned(v_cache, rows, 9.0)
    g = torch.Generator().manual_seed(6)
    n = len(rows)
    q = torch.randn(n, 4, d, generator=g).to(BF16).to(device)
    k = torch.randn(n, h, d, generator=g).to(BF16).to(device)
    v = torch.randn(n, 2, generator=g).to(BF16).to(device)
    pos = torch.arange(n, device=device) * 7
    cs = cos_sin_cache(64, 64).to(device)
    k0 = k.clone()
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=k_cache, v_buffer=v_cache, cache_loc=torch.tensor(rows, device=device))
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cs, True, arg)
    want, slack = ref.rope(k0, pos, cs, True)
    ref.assert_close_rope(k, want, slack, "key")
    _check_rows(flat, rows, k.reshape(n, -1), BF16, 1.0, 9.0, "k_buffer")
    _check_rows(v_cache, rows, v, BF16, 1.0, 9.0, "v_buffer")


def test_rope_cos_sin_cache_over_2g_elements(backend):
    """Positions whose row starts past element 2^31 of the cos/sin cache."""
    device = backend[1]
    rot = 64
    max_pos = BIG // rot + 4
    table = torch.empty(max_pos, rot, dtype=BF16, device=device)
    assert table.numel() > BIG
    used = [max_pos - 1, BIG // rot, BIG // rot - 1, 3]
    inv_freq = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.tensor(used, dtype=torch.float64)[:, None] * inv_freq[None]
    rows = torch.cat([angles.cos(), angles.sin()], dim=1).to(BF16)
    table[used] = rows.to(device)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(used), 3, 128, generator=g).to(device)
    k = torch.randn(len(used), 1, 128, generator=g).to(device)
    q0, k0 = q.clone(), k.clone()
    ropekv.apply_rope_with_cos_sin_cache_inplace(torch.tensor(used, device=device), q, k, 128, table, False)
    small_pos = torch.arange(len(used))
    for x, x0 in ((q, q0), (k, k0)):
        want, slack = ref.rope(x0, small_pos, rows, False)
        ref.assert_close_rope(x, want, slack, "rotation with a > 2^31-element cos/sin cache")


def test_inputs_with_offsets_over_2g_elements(backend):
    """k and v (and q) as views whose last token starts past element 2^31 of their buffer."""
    device = backend[1]
    h, d, n = 2, 64, 3
    stride = BIG // (n - 1) + 64
    buf = torch.empty(stride * (n - 1) + 2 * h * d, dtype=BF16, device=device)
    assert buf.numel() > BIG
    k = buf.as_strided((n, h, d), (stride, d, 1))
    v = buf.as_strided((n, h, d), (stride, d, 1), h * d)
    g = torch.Generator().manual_seed(9)
    for i in range(n):
        buf[i * stride: i * stride + 2 * h * d] = torch.randn(2 * h * d, generator=g).to(BF16).to(device)
    kc = torch.zeros(8, h, d, dtype=BF16, device=device)
    vc = torch.zeros(8, h, d, dtype=BF16, device=device)
    loc = torch.tensor([6, 0, 3], device=device)
    ropekv.store_kv(k, v, kc, vc, loc)
    assert torch.equal(ref.bits(kc[loc]), ref.bits(k)) and torch.equal(ref.bits(vc[loc]), ref.bits(v))
    q = buf.as_strided((n, h, d), (stride, d, 1), h * d)  # the v rows serve as a query
    q0, k0 = q.clone(), k.clone()
    cs = cos_sin_cache(16, d).to(device)
    pos = torch.tensor([1, 15, 4], device=device)
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cs, True)
    for x, x0 in ((q, q0), (k, k0)):
        want, slack = ref.rope(x0, pos, cs, True)
        ref.assert_close_rope(x, want, slack, "rotation of a view past element 2^31")


# ---------------------------------------------------------------------------
# G. Concurrency
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("forced", ["auto", "torch"])
def test_lazy_backend_choice_from_many_threads(monkeypatch, forced):
    """The first calls come from 8 threads at once: all succeed, results are right, one choice is made
    (and, for the fallback, one log line)."""
    monkeypatch.setenv("ROPEKV_BACKEND", forced)
    _backend.reset()
    choices = []
    real_choose = _backend._choose

    def slow_choose(device):
        choices.append(device)
        time.sleep(0.05)  # widen the window in which other threads could choose too
        return real_choose(device)

    monkeypatch.setattr(_backend, "_choose", slow_choose)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("ropekv")
    log.addHandler(handler)
    n = 8
    barrier = threading.Barrier(n)
    errors, done = [], []

    def work(i):
        try:
            g = torch.Generator().manual_seed(i)
            k, v = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
            kc, vc = torch.zeros(10, 2, 64), torch.zeros(10, 2, 64)
            loc = torch.tensor([9, 0, 4, 2, 7])
            barrier.wait()
            ropekv.store_kv(k, v, kc, vc, loc)
            assert torch.equal(kc[loc], k) and torch.equal(vc[loc], v)
            assert not kc[[1, 3, 5, 6, 8]].any()
            done.append(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        log.removeHandler(handler)
        _backend.reset()
    assert not errors, errors
    assert sorted(done) == list(range(n))
    assert len(choices) == 1, f"{len(choices)} backend choices were made"
    fallback_lines = [r for r in records if "fallback" in r.getMessage()]
    if forced == "torch" or not _native.available():
        assert len(fallback_lines) == 1, [r.getMessage() for r in records]
    else:
        assert fallback_lines == []


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("api", ["store", "fused"])
def test_two_cuda_streams_write_disjoint_slots(api, monkeypatch):
    monkeypatch.setenv("ROPEKV_BACKEND", "native")
    _backend.reset()
    if not _native.serves(torch.device("cuda")):
        pytest.skip("this build has no CUDA backend")
    dev = torch.device("cuda")
    n, h, d, slots = 16384, 8, 128, 2 * 16384
    g = torch.Generator(device=dev).manual_seed(11)
    kc = torch.zeros(slots, h, d, dtype=BF16, device=dev)
    vc = torch.zeros(slots, h, d, dtype=BF16, device=dev)
    perm = torch.randperm(slots, generator=g, device=dev)
    locs = [perm[:n], perm[n:]]  # disjoint, interleaved across the cache
    ks = [torch.randn(n, h, d, generator=g, device=dev).to(BF16) for _ in range(2)]
    vs = [torch.randn(n, h, d, generator=g, device=dev).to(BF16) for _ in range(2)]
    qs = [torch.randn(n, 2 * h, d, generator=g, device=dev).to(BF16) for _ in range(2)]
    pos = [torch.randint(0, 4096, (n,), generator=g, device=dev) for _ in range(2)]
    cs = cos_sin_cache(4096, d).to(dev)
    k0 = [k.clone() for k in ks]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    try:
        for _ in range(3):  # the same writes again: idempotent for store, rotation repeated for fused
            for i, s in enumerate(streams):
                with torch.cuda.stream(s):
                    if api == "store":
                        ropekv.store_kv(ks[i], vs[i], kc, vc, locs[i])
                    else:
                        ks[i].copy_(k0[i])
                        arg = ropekv.FusedSetKVBufferArg(value=vs[i], k_buffer=kc, v_buffer=vc, cache_loc=locs[i])
                        ropekv.apply_rope_with_cos_sin_cache_inplace(pos[i], qs[i], ks[i], d, cs, True, arg)
        torch.cuda.synchronize()
    finally:
        _backend.reset()
    for i in range(2):
        assert torch.equal(ref.bits(kc[locs[i]]), ref.bits(ks[i])), f"k of stream {i}"
        assert torch.equal(ref.bits(vc[locs[i]]), ref.bits(vs[i])), f"v of stream {i}"


# ---------------------------------------------------------------------------
# H. The torch fallback without the compiled extension (subprocesses)
# ---------------------------------------------------------------------------

BLOCK_EXTENSION = '''
import importlib.abc, sys
class _NoExtension(importlib.abc.MetaPathFinder):
    """Makes `import ropekv._C` fail, as when the wheel has no extension for this platform."""
    def find_spec(self, name, path=None, target=None):
        if name == "ropekv._C":
            raise ImportError("simulated by the test: ropekv._C is unavailable")
        return None
sys.meta_path.insert(0, _NoExtension())
'''

RUN_SUITE = '''
import os, sys
if os.environ.get("BLOCK") == "1":
    exec(os.environ["BLOCK_CODE"])
    import ropekv._native
    assert ropekv._native._C is None, "the extension was imported"
from hypothesis import HealthCheck, settings
settings.register_profile("ropekv-subprocess", max_examples=int(os.environ["EXAMPLES"]), deadline=None,
                          derandomize=True, suppress_health_check=list(HealthCheck))
import pytest
sys.exit(pytest.main(sys.argv[1:]))
'''


def _subprocess_env(**extra) -> Dict[str, str]:
    env = {n: x for n, x in os.environ.items() if n not in ("ROPEKV_BACKEND", "ROPEKV_CHECK")}
    env.update(ROPEKV_TEST_SUBPROCESS="1", PYTHONUNBUFFERED="1", BLOCK_CODE=BLOCK_EXTENSION, **extra)
    return env


# Under the sanitizer (or any run) these subprocess suites can be switched off.
_no_subprocess = pytest.mark.skipif(IN_SUBPROCESS or os.environ.get("ROPEKV_SKIP_SUBPROCESS_SUITE") == "1",
                                    reason="inside the subprocess suite, or ROPEKV_SKIP_SUBPROCESS_SUITE=1")


@_no_subprocess
@pytest.mark.parametrize("mode", ["no-extension", "ROPEKV_BACKEND=torch"])
def test_whole_suite_on_the_fallback(tmp_path, mode):
    """The test suite passes with the extension made unimportable (fewer hypothesis examples; the
    native-* parametrizations do not exist then), and with ROPEKV_BACKEND=torch.

    With ROPEKV_BACKEND=torch only the tests without the `backend` fixture run: the fixture sets
    ROPEKV_BACKEND itself, so its torch-* parametrizations are already that run, in this process."""
    extra = dict(EXAMPLES="8", ROPEKV_HYPOTHESIS_PROFILE="ropekv-subprocess")
    args = [TESTS_DIR, "-q", "-p", "no:cacheprovider", "-x", "-W", "ignore::DeprecationWarning"]
    if mode == "no-extension":
        extra["BLOCK"] = "1"
        least = 300
    else:
        extra["ROPEKV_BACKEND"] = "torch"
        args += ["-k", "not native-cpu and not native-cuda and not torch-cpu and not torch-cuda"]
        least = 8
    proc = subprocess.run([sys.executable, "-c", RUN_SUITE, *args], env=_subprocess_env(**extra), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    counts = re.findall(r"(\d+) passed", proc.stdout)
    assert counts and int(counts[-1]) >= least, proc.stdout[-2000:]
    if mode == "no-extension":
        assert "native-cpu" not in out


LOG_SCRIPT = '''
import json, logging, os, sys, threading
if os.environ.get("BLOCK") == "1":
    exec(os.environ["BLOCK_CODE"])
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("ropekv").addHandler(Keep())
import torch, ropekv
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ok = []
def calls(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 64, generator=g).to(device) for _ in range(3))
    kc, vc = torch.zeros(8, 2, 64, device=device), torch.zeros(8, 2, 64, device=device)
    loc = torch.tensor([1, 6, -1, 3], device=device)
    for _ in range(3):
        ropekv.store_kv(k, v, kc, vc, loc)
    ok.append(bool(torch.equal(kc[loc[[0, 1, 3]]], k[[0, 1, 3]])))
    kc8 = torch.zeros(8, 2, 64, device=device, dtype=torch.float8_e4m3fn)
    ropekv.store_kv(k, v, kc8, kc8.clone(), loc, k_scale=0.5)
    cs = torch.randn(16, 64, device=device)
    pos = torch.tensor([0, 3, 5, 15], device=device)
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 64, cs)
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, cache_loc=loc)
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 64, cs, True, arg)
    ok.append(bool(torch.equal(kc[loc[[0, 1, 3]]], k[[0, 1, 3]])))
    ropekv.rope_and_store(pos, q, k, cs, v=v, k_cache=kc, v_cache=vc, loc=loc)
    try:
        ropekv.store_kv(k, v, kc, vc, loc[:2])
    except ValueError:
        ok.append(True)
for device in devices:
    calls(device)
threads = [threading.Thread(target=calls, args=("cpu",)) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
info = ropekv.info()
print(json.dumps(dict(records=records, ok=ok, backend_cpu=info["backend_cpu"], extension=info["extension"])))
'''


@_no_subprocess
@pytest.mark.parametrize("mode", ["no-extension", "ROPEKV_BACKEND=torch"])
def test_fallback_logs_why_exactly_once(tmp_path, mode):
    extra = dict(BLOCK="1") if mode == "no-extension" else dict(ROPEKV_BACKEND="torch")
    proc = subprocess.run([sys.executable, "-c", LOG_SCRIPT], env=_subprocess_env(**extra), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and all(result["ok"]), result
    assert result["backend_cpu"] == "torch", result
    lines = [r for r in result["records"] if "fallback" in r]
    assert len(lines) == 1 and len(result["records"]) == 1, result["records"]
    why = "could not be imported" if mode == "no-extension" else "ROPEKV_BACKEND=torch"
    assert why in lines[0], lines[0]
    if mode == "no-extension":
        assert "not importable" in result["extension"]


# ---------------------------------------------------------------------------
# I. Duplicate slots (SPEC.md section 2)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype", [None, E4M3, E5M2], ids=["same", "e4m3fn", "e5m2"])
@pytest.mark.parametrize("api", ["store", "fused", "native"])
def test_duplicate_slots_take_each_element_from_one_token(backend, api, cache_dtype):
    """Each element of a slot several tokens name equals that element of one of those tokens
    (after conversion); slots named once are exact, the others untouched."""
    device = backend[1]
    g = torch.Generator().manual_seed(12)
    n, hk, dk, hv, dv, slots = 96, 2, 64, 3, 32, 12
    dtype = BF16
    cdt = cache_dtype or dtype
    # Tokens 0..79 alternate between slots 3 and 5 and 7 (three-way); 80..95 unique slots or padding.
    loc_list = [(3, 5, 7)[i % 3] for i in range(80)] + [0, 1, 2, 4, 6, 8, 9, 10, -1, -1, -2, -1, -1, -1, -1, -3]
    loc = torch.tensor(loc_list, dtype=I32 if api == "native" else I64, device=device)
    q = (torch.randn(n, 4, dk, generator=g) * 3).to(dtype).to(device)
    k = (torch.randn(n, hk, dk, generator=g) * 3).to(dtype).to(device)
    v = (torch.randn(n, hv * dv, generator=g) * 3).to(dtype).to(device)
    fill = lambda *s: (torch.randn(*s, generator=g)).to(cdt).to(device)
    kc = fill(slots, hk, dk) if api != "native" else fill(slots // 4, 4, hk, dk)
    vc = fill(slots, hv * dv)
    kc0, vc0 = kc.clone(), vc.clone()
    k_scale = torch.tensor([0.5, 2.0], device=device) if cache_dtype else None
    v_scale = 0.25 if cache_dtype else None
    if api == "store":
        ropekv.store_kv(k, v, kc, vc, loc, k_scale=k_scale, v_scale=v_scale)
    elif api == "fused":
        pos = torch.randint(0, 64, (n,), generator=g).to(device)
        arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, k_scale=k_scale, v_scale=v_scale, cache_loc=loc)
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, dk, cos_sin_cache(64, dk).to(device), False, arg)
    else:
        pos = torch.randint(0, 64, (n,), generator=g).to(device)
        ropekv.rope_and_store(pos, q, k, cos_sin_cache(64, 32).to(device), head_size=dk, v=v, k_cache=kc,
                              v_cache=vc, loc=loc, k_scale=k_scale, v_scale=v_scale)
    # k holds the rotated keys now (what the fused paths store).
    k_rows = ref.bits(kc).cpu().reshape(slots, -1)
    v_rows = ref.bits(vc).cpu().reshape(slots, -1)
    ks = ref.scale_per_head(k_scale, hk)
    vs = ref.scale_per_head(v_scale, hv)
    want_k = torch.stack([ref.cache_bits(k[t].cpu(), cdt, ks).reshape(-1) for t in range(n)])
    want_v = torch.stack([ref.cache_bits(v[t].cpu().view(hv, dv), cdt, vs).reshape(-1) for t in range(n)])
    for slot in range(slots):
        tokens = [t for t, s in enumerate(loc_list) if s == slot]
        for got, want, before, what in ((k_rows, want_k, ref.bits(kc0).cpu().reshape(slots, -1), "k"),
                                        (v_rows, want_v, ref.bits(vc0).cpu().reshape(slots, -1), "v")):
            if not tokens:
                assert torch.equal(got[slot], before[slot]), f"{what} slot {slot} written"
            elif len(tokens) == 1:
                assert torch.equal(got[slot], want[tokens[0]]), f"{what} slot {slot}"
            else:
                from_one = (want[tokens] == got[slot][None]).any(dim=0)
                assert bool(from_one.all()), f"{what} slot {slot}: {int((~from_one).sum())} elements from no token"
