"""store_kv against the float64 reference, on every backend (SPEC.md section 2)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import ropekv
import reference as ref
from cases import KVCase, build_kv, kv_cases
from conftest import (cuda_kernel_names, small_store_max_tokens, store_rows_pairs, store_rows_wide_enough,
                      tokens_per_block)


def run_store_case(case: KVCase, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    t = build_kv(case, device, gen)
    k_before, v_before = ref.bits(t.k).clone(), ref.bits(t.v).clone()
    want_k, want_v = ref.store_kv(t.k3, t.v3, t.k_cache, t.v_cache, t.loc, t.k_scale, t.v_scale)
    ropekv.store_kv(t.k, t.v, t.k_cache, t.v_cache, t.loc, k_scale=t.k_scale, v_scale=t.v_scale)
    # Whole caches, bit for bit: the named slots hold the converted rows, every
    # other slot (and the padding of strided layouts... which lies outside the
    # views and is checked through the base below) is unchanged.
    assert torch.equal(ref.bits(t.k_cache).cpu(), want_k), f"k_cache differs for {case}"
    assert torch.equal(ref.bits(t.v_cache).cpu(), want_v), f"v_cache differs for {case}"
    assert torch.equal(ref.bits(t.k), k_before) and torch.equal(ref.bits(t.v), v_before), "inputs modified"


@given(case=kv_cases())
def test_store_kv_matches_reference(backend, case):
    run_store_case(case, backend[1])


@given(case=kv_cases(max_tokens=8, max_heads=2, max_dim=16))
def test_store_kv_small_shapes(backend, case):
    run_store_case(case, backend[1])


@given(case=kv_cases(max_tokens=0), extra=st.integers(0, 200))
def test_store_kv_hundreds_of_tokens(backend, case, extra):
    """Every layout, dtype and scale at 128 to 328 tokens: on CUDA, from 128 tokens
    a thread copies two units of a token when the units per head are powers of
    two and the cache holds the input dtype (odd unit counts leave the last
    thread of a token one unit), else blocks stack tokens and threads loop over
    them."""
    run_store_case(dataclasses.replace(case, T=128 + extra), backend[1])


def test_store_kv_padding_outside_views_untouched(backend):
    """Bytes between rows of a strided cache (not part of any slot) stay as they were."""
    device = backend[1]
    base = torch.randn(10, 2 * 64 + 16, device=device).to(torch.bfloat16)
    before = base.clone()
    cache = base[:, : 2 * 64].unflatten(1, (2, 64))
    v_cache = torch.randn(10, 2, 64, device=device).to(torch.bfloat16)
    k = torch.randn(4, 2, 64, device=device).to(torch.bfloat16)
    v = torch.randn(4, 2, 64, device=device).to(torch.bfloat16)
    loc = torch.tensor([0, 9, -1, 4], device=device)
    ropekv.store_kv(k, v, cache, v_cache, loc)
    assert torch.equal(ref.bits(base[:, 128:]), ref.bits(before[:, 128:]))
    assert torch.equal(ref.bits(cache[9]), ref.bits(k[1]))
    assert torch.equal(ref.bits(base[[1, 2, 3, 5, 6, 7, 8]]), ref.bits(before[[1, 2, 3, 5, 6, 7, 8]]))


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]))
def test_fp8_saturation_and_nan(backend, seed, dtype):
    """Out-of-range values saturate at the largest finite value; NaN stays NaN."""
    device = backend[1]
    big = 448.0 if dtype == torch.float8_e4m3fn else 57344.0
    vals = torch.tensor([1e30, -1e30, float("inf"), -float("inf"), big * 1.01, -big * 1.2, 0.0, -0.0], dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    k = torch.cat([vals, torch.randn(8, generator=gen) * 1000]).reshape(1, 2, 8).to(device)
    k[0, 1, 7] = float("nan")
    v = k.clone()
    kc = torch.zeros(3, 2, 8, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    ropekv.store_kv(k, v, kc, vc, torch.tensor([1], device=device), k_scale=0.5)
    got = kc[1].cpu().to(torch.float64).flatten()
    assert got[0] == big and got[1] == -big and got[2] == big and got[3] == -big
    assert got[4] == big and got[5] == -big
    assert torch.isnan(got[15])
    want, _ = ref.store_kv(k, v, kc, vc, torch.tensor([1]), 0.5)
    nan = torch.isnan(kc.cpu().to(torch.float64))
    assert torch.equal(ref.bits(kc).cpu()[~nan], want[~nan])


def test_zero_tokens_is_a_no_op(backend):
    device = backend[1]
    k = torch.empty(0, 2, 64, device=device)
    kc = torch.randn(4, 2, 64, device=device)
    before = kc.clone()
    ropekv.store_kv(k, k, kc, kc.clone(), torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(kc, before)


def test_duplicate_slots_take_one_tokens_values(backend):
    """SPEC.md 2: several tokens naming one slot leave each element equal to one of theirs."""
    device = backend[1]
    T, H, D = 64, 4, 128
    k = torch.randn(T, H, D, device=device).to(torch.bfloat16)
    v = torch.randn(T, H, D, device=device).to(torch.bfloat16)
    kc = torch.randn(8, H, D, device=device).to(torch.bfloat16)
    vc = torch.randn(8, H, D, device=device).to(torch.bfloat16)
    loc = torch.tensor([3, 5] * (T // 2), device=device)
    ropekv.store_kv(k, v, kc, vc, loc)
    for slot, tokens in ((3, k[0::2]), (5, k[1::2])):
        match = (ref.bits(tokens) == ref.bits(kc[slot])[None]).any(dim=0)
        assert bool(match.all())


# 1.7, 0.3 and -0.6: scales where x * fp32(1/s) alone would give other fp8 codes than
# x / s for some inputs (measured: 2 of the 65536 bf16 or fp16 values into e4m3, about
# 60 into e5m2), so a kernel that only multiplies fails here.
FP8_SCALES = [1.0, 0.75, 1.7, 0.3, 2.0**-64, 0.75 * 2.0**-64, 2.0**64, 1.5 * 2.0**64, 1e-38, 6e37]
# As tensors (a Python float must be positive and finite): every class of fp32 value, and
# the first values past each end of the range the GPU's reciprocal serves unscaled.
FP8_TENSOR_SCALES = [-0.6, 0.0, -0.0, 1e-45, 2.0**-65, 2.0**-126, 2.0**-64 * (1 - 2.0**-24),
                     2.0**64 * (1 + 2.0**-23), 3.4028234663852886e38, float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16])
def test_fp8_every_input_value(backend, input_dtype):
    """Every bit pattern of a 16-bit input, converted to both fp8 formats at scales
    across the fp32 range (tiny, huge, negative, zero and subnormal as tensors), bit
    for bit as the reference's IEEE division and rounding: the GPU divides through a
    reciprocal for most scales, which must change no result."""
    device = backend[1]
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(input_dtype).to(device)
    scales = FP8_SCALES + [torch.tensor([s], dtype=torch.float32, device=device) for s in FP8_TENSOR_SCALES]
    # On CUDA, 512 tokens of one head run the unit kernel and 64 of eight the small
    # kernel, which divide in different ways (rope_kv.h, write_cache_chunk).
    shapes = [(512, 1, 128), (64, 8, 128)] if device.type == "cuda" else [(512, 1, 128)]
    for shape, cache_dtype, scale in itertools.product(shapes, (torch.float8_e4m3fn, torch.float8_e5m2), scales):
        x = values.reshape(shape)
        loc = torch.arange(shape[0], device=device)
        kc = torch.zeros(shape, dtype=cache_dtype, device=device)
        vc = torch.zeros_like(kc)
        ropekv.store_kv(x, x, kc, vc, loc, k_scale=scale, v_scale=scale)
        want, _ = ref.store_kv(x, x, kc, vc, loc, scale, scale)
        got = ref.bits(kc).cpu()
        # NaN codes: any NaN will do (SPEC section 2); everything else bit for bit.
        nan = torch.isnan(kc.cpu().to(torch.float64))
        assert torch.equal(nan, torch.isnan(want.view(cache_dtype).to(torch.float64))), (cache_dtype, scale)
        assert torch.equal(got[~nan], want[~nan]), f"{cache_dtype} scale {scale}: {(got != want).sum()} codes differ"
        assert torch.equal(ref.bits(vc).cpu(), got)


@pytest.mark.parametrize("size", ["one", "limit"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("cache", [(None, "3d", 1, "none", "none"),
                                   (torch.float8_e4m3fn, "paged_padded", 16, "per_head", "float")],
                         ids=["same-dtype", "e4m3-paged"])
def test_store_kv_small_calls(backend, cache, d, size):
    """store_kv calls of 1 token and of the most the CUDA small kernel takes,
    with heads of 64, 128 or 256, padding and out-of-range slots among them.
    The test checks which kernel ran: the small kernel, or the rows kernel for
    K and V rows of 64 chunks or more into a cache of the input dtype."""
    T = 1 if size == "one" else small_store_max_tokens(3, d)
    cache_dtype, layout, page_size, k_scale, v_scale = cache
    case = KVCase(T=T, hk=3, dk=d, hv=3, dv=d, dtype=torch.bfloat16, cache_dtype=cache_dtype, input_layout="3d",
                  cache_layout=layout, page_size=page_size, index_dtype=torch.int32, k_scale=k_scale,
                  v_scale=v_scale, pad_frac=0.2, oob_frac=0.1, seed=d + T)
    if backend != ("native", torch.device("cuda")):
        run_store_case(case, backend[1])
        return
    names = cuda_kernel_names(lambda: run_store_case(case, backend[1]))
    rows = cache_dtype is None and store_rows_wide_enough(3, d)
    if names:
        assert any(("store_kv_rows_kernel" if rows else "rope_kv_small_kernel") in n for n in names), names


@pytest.mark.parametrize("T", [1, 37, 64, 65, 66, 128, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [("3d", "3d", 1), ("2d", "2d", 1), ("3d", "paged", 16), ("2d", "slot_padded", 1)],
                         ids=["3d-3d", "2d-2d", "3d-paged", "2d-slot_padded"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_store_kv_rows_kernel(backend, index_dtype, layout, dtype, T):
    """store_kv calls the CUDA rows kernel takes (heads dense in the input and in
    a slot, rows of 64 chunks or more, a cache of the input dtype): 3-D and 2-D
    tensors, contiguous pages, slots further apart than a row; K and V of
    different widths (K's row the wider); padding and out-of-range slots. The
    test checks that the rows kernel ran, two tokens per block for even counts
    from 66 to 128 tokens when a row fits one block (16-bit inputs here; fp32
    rows are twice as many chunks), else one. (Views into a fused qkv tensor
    take it in test_enable_pdl_gives_the_same_bits.)"""
    input_layout, cache_layout, page_size = layout
    hk, hv, dk, dv = 8, 3, 128, 64
    case = KVCase(T=T, hk=hk, dk=dk, hv=hv, dv=dv, dtype=dtype, cache_dtype=None, input_layout=input_layout,
                  cache_layout=cache_layout, page_size=page_size, index_dtype=index_dtype, k_scale="none",
                  v_scale="none", pad_frac=0.2, oob_frac=0.1, seed=T + dk)
    if backend != ("native", torch.device("cuda")):
        run_store_case(case, backend[1])
        return
    names = cuda_kernel_names(lambda: run_store_case(case, backend[1]))
    rows = [n for n in names if "store_kv_rows_kernel" in n]
    if names:
        assert rows, names
        chunk = 16 // dtype.itemsize
        want = 2 if store_rows_pairs(T, hk * dk // chunk, hv * dv // chunk) else 1
        assert all(tokens_per_block(n) == want for n in rows), rows
