"""A float64 reference for the operations of SPEC.md, written plainly and
independently of the package (it shares no code with ropekv's fallback).

- fp8 rounding is done by searching the format's table of values, not by a
  cast, so the reference does not trust torch's or ropekv's conversion.
- RoPE is computed per token and head in float64; the tests compare the
  kernels' output against it with a bound of one unit in the last place of
  the output dtype plus the error fp32 arithmetic is allowed (SPEC.md: math in
  fp32, one rounding to the output dtype).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for bit-exact comparisons (NaN == NaN, -0 != +0)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def _fp8_table(dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Finite non-negative values of an fp8 format (sorted) and their codes."""
    codes = torch.arange(128, dtype=torch.uint8)
    values = codes.view(dtype).to(torch.float64)
    finite = torch.isfinite(values)
    return values[finite], codes[finite]


def fp8_codes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to fp8 codes: nearest, ties to an even code, saturating
    at the largest finite value, NaN to a NaN code. Returns uint8 codes."""
    values, codes = _fp8_table(dtype)
    x = x.to(torch.float64)
    sign = torch.signbit(x).to(torch.uint8) << 7
    mag = x.abs().clamp(max=float(values[-1]))
    above_i = torch.searchsorted(values, mag.contiguous()).clamp(max=len(values) - 1)
    below_i = (above_i - 1).clamp(min=0)
    d_below = mag - values[below_i]
    d_above = values[above_i] - mag
    odd_above = codes[above_i] % 2 == 1
    take_below = (above_i > 0) & ((d_below < d_above) | ((d_below == d_above) & odd_above))
    out = torch.where(take_below, codes[below_i], codes[above_i]) | sign
    return torch.where(torch.isnan(x), torch.full_like(out, 0x7F) | sign, out)


def _fp32_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # A float64 quotient rounded once to fp32 equals the IEEE fp32 quotient.
    return (x.to(torch.float64) / s.to(torch.float64)).to(torch.float32)


def cache_bits(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """The bits a cache of cache_dtype must hold for input x ([..., H, D]), per SPEC.md section 2.

    scale: float64 tensor broadcastable to [H, 1].
    """
    if cache_dtype == x.dtype:
        return bits(x.clone())
    if cache_dtype not in FP8:
        raise AssertionError(f"unexpected cache dtype {cache_dtype}")
    q = _fp32_div(x.to(torch.float32), scale.to(torch.float32)).to(torch.float64)
    return fp8_codes(q, cache_dtype).view(x.shape)


def scale_per_head(scale, heads: int) -> torch.Tensor:
    if scale is None:
        return torch.ones(heads, 1, dtype=torch.float64)
    if isinstance(scale, torch.Tensor):
        s = scale.detach().cpu().to(torch.float64).flatten()
        return (s if s.numel() == heads else s.expand(heads)).reshape(heads, 1)
    return torch.full((heads, 1), float(scale), dtype=torch.float64)


def store_kv(k3: torch.Tensor, v3: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             loc: torch.Tensor, k_scale=None, v_scale=None, page_size: Optional[int] = None):
    """Expected bits of both caches after store_kv.

    k3, v3: [T, H, D] on any device. Caches as the caller passed them (3-D, 2-D or
    4-D paged); loc: slots. Tokens with loc < 0 or loc >= S are skipped. With
    duplicate slots the last token wins here; callers use unique slots.
    """
    out = []
    slots = loc.detach().cpu().tolist()
    for x, cache, scale in ((k3, k_cache, k_scale), (v3, v_cache, v_scale)):
        x = x.detach().cpu()
        heads, dim = x.shape[1], x.shape[2]
        c = bits(cache.detach().cpu().clone())
        flat = c.reshape(-1, heads * dim)  # one row per slot (a copy; fine)
        # Every token's row at once (the conversion is elementwise), then placed
        # token by token, so that the last of duplicate slots wins.
        rows = cache_bits(x, cache.dtype, scale_per_head(scale, heads)).reshape(len(slots), heads * dim)
        for t, slot in enumerate(slots):
            if 0 <= slot < flat.shape[0]:
                flat[slot] = rows[t]
        out.append(flat.reshape(c.shape))
    return out[0], out[1]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's representable numbers at |x| (x float64)."""
    m = MANTISSA_BITS[dtype]
    _, e = torch.frexp(x.abs())
    e = torch.clamp(e - 1, min=MIN_EXPONENT[dtype])
    return torch.ldexp(torch.ones_like(x), e - m)


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool):
    """Rotated x ([T, H, D]) in float64, and the bound on the fp32 arithmetic error.

    Returns (expected, slack): expected[t, h, i] exact in float64 for the input
    values, slack the absolute error the prescribed fp32 math may add (two
    rounded products and one rounded sum: <= 3 * 2^-24 * (|a c| + |b s|) for the
    first of a pair, likewise with |b c| + |a s| for the second).
    Positions outside the cos/sin cache leave the token unchanged.
    """
    x = x.detach().cpu().to(torch.float64)
    cs = cos_sin.detach().cpu().to(torch.float64)
    pos = positions.detach().cpu().to(torch.int64)
    half = cs.shape[1] // 2
    expected = x.clone()
    slack = torch.zeros_like(x)
    if cs.shape[0] == 0:  # a table of no rows: every position is outside it
        return expected, slack
    ok = (pos >= 0) & (pos < cs.shape[0])
    rows = cs[torch.where(ok, pos, 0)]  # [T, R]
    c = rows[:, None, :half]
    s = rows[:, None, half:]
    ia = torch.arange(half) if neox else torch.arange(half) * 2
    ib = ia + half if neox else ia + 1
    a, b = x[:, :, ia], x[:, :, ib]
    keep = ok[:, None, None]
    expected[:, :, ia] = torch.where(keep, a * c - b * s, a)
    expected[:, :, ib] = torch.where(keep, b * c + a * s, b)
    slack[:, :, ia] = torch.where(keep, 3 * 2.0**-24 * ((a * c).abs() + (b * s).abs()), 0.0)
    slack[:, :, ib] = torch.where(keep, 3 * 2.0**-24 * ((b * c).abs() + (a * s).abs()), 0.0)
    return expected, slack


def assert_close_rope(out: torch.Tensor, expected: torch.Tensor, slack: torch.Tensor, what: str) -> None:
    """out within one ulp of out's dtype of the exact result, plus the fp32 slack."""
    got = out.detach().cpu().to(torch.float64)
    tol = ulp(expected, out.dtype) + slack
    err = (got - expected).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off, first at {i}: got {got[i].item()!r}, "
            f"exact {expected[i].item()!r}, tolerance {tol[i].item()!r}"
        )
