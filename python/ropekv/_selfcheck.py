"""`python -m ropekv` self-check: every available backend against a float64
computation of the same call, on a realistic shape (Llama-3.1-8B attention
input, bf16, bf16 and fp8 caches, padded slots), printed as a small table."""

from __future__ import annotations

import os
from typing import List, Tuple

import torch

import ropekv
from . import _backend, _native

HQ, HK, D, T, SLOTS, MAX_POS = 32, 8, 128, 64, 4096, 8192


def _expected(q, k, pos, cs):
    """Float64 NeoX rotation of [T, H, D] tensors."""
    out = []
    c = cs.double()[pos.long()][:, None, : D // 2]
    s = cs.double()[pos.long()][:, None, D // 2 :]
    for x in (q, k):
        x = x.double()
        a, b = x[..., : D // 2], x[..., D // 2 :]
        out.append(torch.cat([a * c - b * s, b * c + a * s], dim=-1))
    return out


def _one(device: torch.device, cache_dtype: torch.dtype) -> Tuple[float, bool]:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g).to(torch.bfloat16).to(device)
    q, k, v = qkv[:, : HQ * D], qkv[:, HQ * D : (HQ + HK) * D], qkv[:, (HQ + HK) * D :]
    inv = 500000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * inv
    cs = torch.cat([ang.cos(), ang.sin()], 1).float().to(device)
    pos = torch.randint(0, MAX_POS, (T,), generator=g).to(device)
    loc = torch.randperm(SLOTS, generator=g)[:T]
    loc[::7] = -1  # CUDA-graph padding
    loc = loc.to(device)
    kc = torch.randn(SLOTS, HK, D, generator=g).to(cache_dtype).to(device)
    vc = torch.randn(SLOTS, HK, D, generator=g).to(cache_dtype).to(device)
    kc0, vc0 = kc.clone(), vc.clone()
    want_q, want_k = _expected(q.unflatten(1, (HQ, D)), k.unflatten(1, (HK, D)), pos, cs)
    scale = 0.5 if cache_dtype != torch.bfloat16 else None
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, k_scale=scale, v_scale=scale, cache_loc=loc)
    v_in = v.unflatten(1, (HK, D)).clone()
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, D, cs, True, arg)
    err = max(
        float(((q.unflatten(1, (HQ, D)).double() - want_q).norm() / want_q.norm()).cpu()),
        float(((k.unflatten(1, (HK, D)).double() - want_k).norm() / want_k.norm()).cpu()),
    )
    written = loc >= 0
    slots = loc[written]
    def conv(x):
        return x if scale is None else (x.float() / scale).clamp(-448, 448).to(cache_dtype)
    same = lambda a, b: torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    ok = same(kc[slots], conv(k.unflatten(1, (HK, D))[written])) and same(vc[slots], conv(v_in[written]))
    untouched = torch.ones(SLOTS, dtype=torch.bool, device=device)
    untouched[slots] = False
    ok = ok and same(kc[untouched], kc0[untouched]) and same(vc[untouched], vc0[untouched])
    return err, ok and err < 4e-3


def run() -> bool:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = (["native"] if _native.available() else []) + ["torch"]
    rows: List[Tuple[str, str, str, str, str]] = []
    saved = os.environ.get("ROPEKV_BACKEND")
    all_ok = True
    try:
        for device in devices:
            for name in names:
                if name == "native" and not _native.serves(device):
                    continue
                os.environ["ROPEKV_BACKEND"] = name
                _backend.reset()
                for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
                    err, ok = _one(device, cache_dtype)
                    all_ok &= ok
                    rows.append((name, device.type, str(cache_dtype).replace("torch.", ""), f"{err:.2e}", "ok" if ok else "FAIL"))
    finally:
        if saved is None:
            os.environ.pop("ROPEKV_BACKEND", None)
        else:
            os.environ["ROPEKV_BACKEND"] = saved
        _backend.reset()
    print(f"self-check: fused RoPE + KV write, Llama-3.1-8B shape (Hq={HQ}, Hk={HK}, D={D}), {T} tokens, bf16")
    head = ("backend", "device", "cache", "q/k rel. err", "caches")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return all_ok
