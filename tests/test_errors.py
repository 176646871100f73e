"""SPEC.md section 4: every rejected call raises the named exception, names the
argument, and writes nothing (checked on every backend)."""

from __future__ import annotations

import pytest
import torch

import ropekv
import reference as ref
from test_rope import cos_sin_cache

T, H, D, S = 4, 2, 64, 16


def tensors(device):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)
    return dict(
        q=mk(T, 4 * D), k=mk(T, H * D), v=mk(T, H * D),
        k_cache=mk(S, H, D), v_cache=mk(S, H, D),
        loc=torch.tensor([0, 3, -1, 7], device=device),
        pos=torch.tensor([0, 1, 2, 3], device=device),
        cs=cos_sin_cache(32, D).to(device),
    )


def store(t, **over):
    a = dict(k=t["k"], v=t["v"], k_cache=t["k_cache"], v_cache=t["v_cache"], loc=t["loc"])
    a.update(over)
    kw = {n: a.pop(n) for n in ("k_scale", "v_scale", "check") if n in a}
    return lambda: ropekv.store_kv(a["k"], a["v"], a["k_cache"], a["v_cache"], a["loc"], **kw)


def rope(t, fused=True, head_size=D, **over):
    a = dict(positions=t["pos"], query=t["q"], key=t["k"], cos_sin_cache=t["cs"], is_neox=True)
    f = dict(value=t["v"], k_buffer=t["k_cache"], v_buffer=t["v_cache"], cache_loc=t["loc"])
    for n, x in over.items():
        (f if n in f or n in ("k_scale", "v_scale") else a)[n] = x
    check = a.pop("check", False)
    arg = ropekv.FusedSetKVBufferArg(**f) if fused else None
    return lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(
        a["positions"], a["query"], a["key"], head_size, a["cos_sin_cache"], a["is_neox"], arg, check=check)


CASES = [
    # (id, builder, exception, words the message must contain)
    ("k-not-tensor", lambda t: store(t, k=[1, 2]), TypeError, "k"),
    ("k-int-dtype", lambda t: store(t, k=t["k"].to(torch.int32)), TypeError, "k"),
    ("k-fp8", lambda t: store(t, k=t["k"].to(torch.float8_e4m3fn)), TypeError, "k"),
    ("v-dtype-differs", lambda t: store(t, v=t["v"].float()), TypeError, "v"),
    ("cache-dtype", lambda t: store(t, k_cache=t["k_cache"].half(), v_cache=t["v_cache"].half()), TypeError, "k_cache"),
    ("caches-differ", lambda t: store(t, v_cache=t["v_cache"].to(torch.float8_e4m3fn)), TypeError, "v_cache"),
    ("loc-float", lambda t: store(t, loc=t["loc"].float()), TypeError, "loc"),
    ("loc-2d", lambda t: store(t, loc=t["loc"][:, None]), ValueError, "loc"),
    ("loc-length", lambda t: store(t, loc=t["loc"][:3]), ValueError, "loc"),
    ("k-shape", lambda t: store(t, k=t["k"][:, :100]), ValueError, "k"),
    ("k-last-dim-strided", lambda t: store(t, k=t["k"].repeat_interleave(2, dim=1)[:, ::2]), ValueError, "k"),
    ("v-tokens", lambda t: store(t, v=t["v"][:3]), ValueError, "v"),
    ("cache-heads", lambda t: store(t, k_cache=t["k_cache"][:, :1]), ValueError, "k_cache"),
    ("cache-1d", lambda t: store(t, k_cache=t["k_cache"].flatten()), ValueError, "k_cache"),
    ("slot-counts", lambda t: store(t, v_cache=t["v_cache"][:8]), ValueError, "v_cache"),
    ("scale-type", lambda t: store(t, k_scale="2"), TypeError, "k_scale"),
    ("scale-dtype", lambda t: store(t, k_scale=torch.ones(1, dtype=torch.float64, device=t["k"].device)), TypeError, "k_scale"),
    ("scale-shape", lambda t: store(t, v_scale=torch.ones(3, device=t["k"].device)), ValueError, "v_scale"),
    ("scale-negative", lambda t: store(t, k_scale=-1.0), ValueError, "k_scale"),
    ("check-slot-range", lambda t: store(t, loc=torch.tensor([0, 3, 16, 99], device=t["k"].device), check=True), IndexError, "loc[2] = 16"),
    ("rope-odd-rotary", lambda t: rope(t, cos_sin_cache=t["cs"][:, :7].contiguous()), ValueError, "rotary dim"),
    ("rope-rotary-too-big", lambda t: rope(t, head_size=32, query=t["q"], key=t["k"]), ValueError, "exceeds head_size"),
    ("rope-head-size-width", lambda t: rope(t, head_size=48), ValueError, "head_size"),
    ("rope-head-size-odd", lambda t: rope(t, head_size=63), ValueError, "head_size"),
    ("rope-head-size-type", lambda t: rope(t, head_size=64.0), TypeError, "head_size"),
    ("rope-positions-length", lambda t: rope(t, positions=t["pos"][:2]), ValueError, "positions"),
    ("rope-positions-dtype", lambda t: rope(t, positions=t["pos"].float()), TypeError, "positions"),
    ("rope-cos-sin-dtype", lambda t: rope(t, cos_sin_cache=t["cs"].double()), TypeError, "cos_sin_cache"),
    ("rope-q-k-dtypes", lambda t: rope(t, query=t["q"].float()), TypeError, "query"),
    ("rope-q-tokens", lambda t: rope(t, query=t["q"][:3]), ValueError, "query"),
    ("rope-check-positions", lambda t: rope(t, positions=torch.tensor([0, 1, 32, 2], device=t["k"].device), check=True), IndexError, "positions[2] = 32"),
    ("fused-value-dtype", lambda t: rope(t, value=t["v"].float()), TypeError, "fused_set_kv_buffer_arg.value"),
    ("fused-k-buffer-shape", lambda t: rope(t, k_buffer=t["k_cache"][:, :, :32]), ValueError, "fused_set_kv_buffer_arg.k_buffer"),
    ("fused-cache-loc", lambda t: rope(t, cache_loc=t["loc"][:2]), ValueError, "fused_set_kv_buffer_arg.cache_loc"),
    ("fused-cache-loc-none", lambda t: rope(t, cache_loc=None), TypeError, "fused_set_kv_buffer_arg.cache_loc"),
    ("fused-scale", lambda t: rope(t, k_scale=torch.ones(5, device=t["k"].device)), ValueError, "fused_set_kv_buffer_arg.k_scale"),
    ("fused-check-slot", lambda t: rope(t, cache_loc=torch.tensor([0, 1, 2, 16], device=t["k"].device), check=True), IndexError, "cache_loc[3] = 16"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejected_call_writes_nothing(backend, case):
    _, builder, exc, words = case
    t = tensors(backend[1])
    before = {n: ref.bits(x).clone() for n, x in t.items() if isinstance(x, torch.Tensor)}
    call = builder(t)
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value), f"message {str(info.value)!r} does not name {words!r}"
    for n, x in t.items():
        assert torch.equal(ref.bits(x), before[n]), f"{n} was written by a rejected call"


def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    t = tensors("cpu")
    with pytest.raises(ValueError, match="k_cache"):
        ropekv.store_kv(t["k"], t["v"], t["k_cache"].cuda(), t["v_cache"], t["loc"])


def test_check_mode_from_environment(backend, monkeypatch):
    monkeypatch.setenv("ROPEKV_CHECK", "1")
    t = tensors(backend[1])
    with pytest.raises(IndexError, match=r"loc\[1\] = 40"):
        ropekv.store_kv(t["k"], t["v"], t["k_cache"], t["v_cache"], torch.tensor([0, 40, 1, 2], device=backend[1]))
