"""Runs a Plan in pure torch: the same contract as the kernels, op by op.

Used when the compiled extension is missing or does not serve the tensors'
device, or when ROPEKV_BACKEND=torch. It performs the same IEEE operations in
the same order as cpp/include/ropekv/numeric.h (separate fp32 multiplies and
adds, a true fp32 division before fp8 rounding), so its results match the
kernels bit for bit. It synchronizes (boolean indexing) and is not meant for
CUDA graphs.
"""

from __future__ import annotations

import torch

from ._validate import Plan

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _rotate(x: torch.Tensor, plan: Plan, cos: torch.Tensor, sin: torch.Tensor, ok: torch.Tensor) -> None:
    """Rotates x ([T, H, D]) in place for tokens where ok is set."""
    r = plan.rot_dim
    part = x[..., :r]
    f = part.float()
    if plan.neox:
        a, b = f[..., : r // 2], f[..., r // 2 :]
    else:
        a, b = f[..., 0::2], f[..., 1::2]
    out_a = a * cos - b * sin
    out_b = b * cos + a * sin
    if plan.neox:
        rotated = torch.cat([out_a, out_b], dim=-1)
    else:
        rotated = torch.stack([out_a, out_b], dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    part.copy_(torch.where(ok[:, None, None], rotated, part))


def _rope(plan: Plan) -> None:
    assert plan.positions is not None and plan.cos_sin is not None  # set with rot_dim
    pos = plan.positions.long()
    max_pos, r = plan.cos_sin.shape
    if max_pos == 0:  # no position is in range: nothing is rotated
        return
    ok = (pos >= 0) & (pos < max_pos)
    rows = plan.cos_sin[torch.where(ok, pos, torch.zeros_like(pos))].float()
    cos = rows[:, None, : r // 2]
    sin = rows[:, None, r // 2 :]
    if plan.q is not None:  # None: only the key is rotated
        _rotate(plan.q, plan, cos, sin, ok)
    _rotate(plan.k, plan, cos, sin, ok)


def _convert(x: torch.Tensor, cache_dtype: torch.dtype, scale, scale_value: float) -> torch.Tensor:
    if cache_dtype == x.dtype:
        return x
    # A tensor divisor keeps this a true division (torch may multiply by the
    # reciprocal of a Python scalar on CUDA).
    if scale is None:
        scale = torch.tensor([scale_value], dtype=torch.float32, device=x.device)
    q = x.float() / scale.reshape(1, -1, 1)
    m = FP8_MAX[cache_dtype]
    return q.clamp(-m, m).to(cache_dtype)


def _store(plan: Plan) -> None:
    # Set whenever the plan writes the cache.
    assert plan.k_cache is not None and plan.v_cache is not None and plan.v is not None
    assert plan.loc is not None and plan.cache_dtype is not None
    cache = plan.k_cache
    slots = cache.shape[0] * cache.shape[1]
    loc = plan.loc.long()
    keep = ((loc >= 0) & (loc < slots)).nonzero().squeeze(1)
    slot = loc[keep]
    for x, c, s, sv in (
        (plan.k, plan.k_cache, plan.k_scale, plan.k_scale_value),
        (plan.v, plan.v_cache, plan.v_scale, plan.v_scale_value),
    ):
        page_size = c.shape[1]
        c[slot // page_size, slot % page_size] = _convert(x[keep], plan.cache_dtype, s, sv)


def run(plan: Plan) -> None:
    if plan.num_tokens == 0:
        return
    if plan.rot_dim:
        _rope(plan)
    if plan.writes_cache:
        _store(plan)
