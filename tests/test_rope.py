"""RoPE, alone and fused with the KV write, against the float64 reference on
every backend (SPEC.md section 3)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import pytest
from hypothesis import given, settings, strategies as st

import ropekv
import reference as ref
from cases import FLOATS, KVCase, build_kv, head_dims, kv_cases, make_inputs
from conftest import STORE_ROWS_MAX_UNITS_PDL, cuda_kernel_names, force_backend, small_store_max_tokens


def cos_sin_cache(max_pos: int, rot_dim: int, dtype=torch.float32, base: float = 10000.0) -> torch.Tensor:
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype)


@dataclasses.dataclass
class RopeCase:
    T: int
    hq: int
    hk: int
    head_size: int
    rot_dim: int
    neox: bool
    dtype: torch.dtype
    cos_sin_dtype: torch.dtype
    layout: str
    index_dtype: torch.dtype
    max_pos: int
    bad_pos_frac: float
    kv: Optional[KVCase]
    seed: int


@st.composite
def rope_cases(draw, fused=None, max_tokens: int = 40):
    hk = draw(st.integers(1, 8))
    ratio = draw(st.sampled_from([1, 2, 4, 8]))
    hq = draw(st.one_of(st.just(hk * ratio), st.integers(1, 64)))
    head_size = draw(head_dims(512 if hq <= 16 else 128))
    rot_dim = draw(st.one_of(st.just(head_size), st.integers(1, head_size // 2).map(lambda x: 2 * x)))
    fused = draw(st.booleans()) if fused is None else fused
    kv = draw(kv_cases(max_tokens=max_tokens, hk=hk, dk=head_size)) if fused else None
    T = kv.T if kv else draw(st.integers(0, max_tokens))
    return RopeCase(
        T=T,
        hq=hq,
        hk=hk,
        head_size=head_size,
        rot_dim=rot_dim,
        neox=draw(st.booleans()),
        dtype=kv.dtype if kv else draw(st.sampled_from(FLOATS)),
        cos_sin_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(["qkv", "2d", "3d", "head_padded"])),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        max_pos=draw(st.integers(1, 4096)),
        bad_pos_frac=draw(st.sampled_from([0.0, 0.0, 0.1])),
        kv=kv,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_rope(case: RopeCase, device):
    gen = torch.Generator().manual_seed(case.seed)
    q, k = make_inputs(gen, case.layout, case.T, [(case.hq, case.head_size), (case.hk, case.head_size)], case.dtype, device)
    cs = cos_sin_cache(case.max_pos, case.rot_dim, case.cos_sin_dtype).to(device)
    pos = torch.randint(0, case.max_pos, (case.T,), generator=gen)
    bad = torch.rand(case.T, generator=gen) < case.bad_pos_frac
    pos = torch.where(bad, case.max_pos + torch.randint(-2 * case.max_pos - 3, 3, (case.T,), generator=gen) * 0 + case.max_pos, pos)
    pos = torch.where(bad & (torch.rand(case.T, generator=gen) < 0.5), -1, pos)
    kv = None
    if case.kv is not None:
        kv = build_kv(dataclasses.replace(case.kv, T=case.T), device, gen, k=k)
    return q, k, pos.to(case.index_dtype).to(device), cs, kv


def as3(x, h, d):
    return x if x.dim() == 3 else x.unflatten(1, (h, d))


def run_rope_case(case: RopeCase, device, api: str = "sgl", enable_pdl: bool = False):
    q, k, pos, cs, kv = build_rope(case, device)
    # The caches as they were: every slot the call does not name must keep its bits.
    caches_before = (kv.k_cache.clone(), kv.v_cache.clone()) if kv is not None else None
    want_q, slack_q = ref.rope(as3(q, case.hq, case.head_size), pos, cs, case.neox)
    want_k, slack_k = ref.rope(as3(k, case.hk, case.head_size), pos, cs, case.neox)
    if api == "sgl":
        arg = None
        if kv is not None:
            arg = ropekv.FusedSetKVBufferArg(
                value=kv.v, k_buffer=kv.k_cache, v_buffer=kv.v_cache,
                k_scale=kv.k_scale, v_scale=kv.v_scale, cache_loc=kv.loc,
            )
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, case.head_size, cs, case.neox, arg,
                                                     enable_pdl=enable_pdl)
    else:
        extra = {}
        if kv is not None:
            extra = dict(v=kv.v, k_cache=kv.k_cache, v_cache=kv.v_cache, loc=kv.loc, k_scale=kv.k_scale, v_scale=kv.v_scale)
        ropekv.rope_and_store(pos, q, k, cs, head_size=case.head_size, is_neox=case.neox, enable_pdl=enable_pdl,
                              **extra)
    ref.assert_close_rope(as3(q, case.hq, case.head_size), want_q, slack_q, f"query of {case}")
    ref.assert_close_rope(as3(k, case.hk, case.head_size), want_k, slack_k, f"key of {case}")
    if kv is not None:
        # The caches hold exactly store_kv(rotated key, value).
        want_kc, want_vc = ref.store_kv(kv.k3, kv.v3, *caches_before, kv.loc, kv.k_scale, kv.v_scale)
        assert torch.equal(ref.bits(kv.k_cache).cpu(), want_kc), f"k_buffer differs for {case}"
        assert torch.equal(ref.bits(kv.v_cache).cpu(), want_vc), f"v_buffer differs for {case}"
    return q, k, kv


@given(case=rope_cases(fused=False))
def test_rope_matches_reference(backend, case):
    run_rope_case(case, backend[1])


@given(case=rope_cases(fused=True))
def test_fused_rope_matches_reference(backend, case):
    run_rope_case(case, backend[1])


@given(case=rope_cases(), api=st.sampled_from(["sgl", "native"]))
def test_rope_both_apis(backend, case, api):
    run_rope_case(case, backend[1], api)


@given(case=rope_cases(fused=True))
def test_fused_equals_rope_then_store_kv(backend, case):
    """Bit-identical to RoPE followed by store_kv on the same backend."""
    device = backend[1]
    q1, k1, kv1 = run_rope_case(case, device)
    q2, k2, pos, cs, kv2 = build_rope(case, device)
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q2, k2, case.head_size, cs, case.neox)
    ropekv.store_kv(kv2.k, kv2.v, kv2.k_cache, kv2.v_cache, kv2.loc, k_scale=kv2.k_scale, v_scale=kv2.v_scale)
    for a, b in ((q1, q2), (k1, k2), (kv1.k_cache, kv2.k_cache), (kv1.v_cache, kv2.v_cache)):
        assert torch.equal(ref.bits(a), ref.bits(b))


@given(case=rope_cases())
def test_native_matches_fallback_bit_for_bit(backend, case):
    """The compiled kernels and the torch fallback round identically."""
    name, device = backend
    if name != "native":
        return
    out_native = run_rope_case(case, device)
    force_backend("torch")
    out_torch = run_rope_case(case, device)
    force_backend("native")
    for a, b in zip(out_native[:2], out_torch[:2]):
        assert torch.equal(ref.bits(a), ref.bits(b))
    if case.kv is not None:
        assert torch.equal(ref.bits(out_native[2].k_cache), ref.bits(out_torch[2].k_cache))
        assert torch.equal(ref.bits(out_native[2].v_cache), ref.bits(out_torch[2].v_cache))


def test_rotated_key_written_back_in_fused_path(backend):
    """Regression: the fused path must update `key` itself, not only the cache."""
    device = backend[1]
    T, H, D = 4, 2, 64
    qkv = torch.randn(T, 3 * H * D, device=device).to(torch.bfloat16)
    q, k, v = qkv[:, : H * D], qkv[:, H * D : 2 * H * D], qkv[:, 2 * H * D :]
    k_before = k.clone()
    kc = torch.randn(8, H, D, device=device).to(torch.bfloat16)
    vc = torch.randn(8, H, D, device=device).to(torch.bfloat16)
    pos = torch.tensor([1, 5, 9, 100], device=device)
    cs = cos_sin_cache(128, D).to(device)
    loc = torch.tensor([0, 2, 4, 6], device=device)
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, cache_loc=loc)
    ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, D, cs, True, arg)
    assert not torch.equal(k, k_before)
    assert torch.equal(ref.bits(kc[[0, 2, 4, 6]]), ref.bits(k.unflatten(1, (H, D))))
    want, slack = ref.rope(k_before.unflatten(1, (H, D)), pos, cs, True)
    ref.assert_close_rope(k.unflatten(1, (H, D)), want, slack, "key")


def test_partial_rotary_tail_unchanged_and_cached(backend):
    device = backend[1]
    T, H, D, R = 3, 2, 128, 64
    q = torch.randn(T, H, D, device=device).to(torch.float16)
    k = torch.randn(T, H, D, device=device).to(torch.float16)
    q0, k0 = q.clone(), k.clone()
    kc = torch.randn(4, H, D, device=device).to(torch.float16)
    vc = torch.randn(4, H, D, device=device).to(torch.float16)
    ropekv.rope_and_store(torch.tensor([3, 7, 11], device=device), q, k, cos_sin_cache(16, R).to(device),
                          v=k0.clone(), k_cache=kc, v_cache=vc, loc=torch.tensor([0, 1, 2], device=device))
    assert torch.equal(q[..., R:], q0[..., R:]) and torch.equal(k[..., R:], k0[..., R:])
    assert not torch.equal(k[..., :R], k0[..., :R])
    assert torch.equal(kc[:3], k)


def test_out_of_range_positions_leave_token_unrotated(backend):
    device = backend[1]
    q = torch.randn(3, 2, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    q0 = q.clone()
    ropekv.apply_rope_with_cos_sin_cache_inplace(torch.tensor([-5, 1, 16], device=device), q, k, 64,
                                                 cos_sin_cache(16, 64).to(device))
    assert torch.equal(q[0], q0[0]) and torch.equal(q[2], q0[2]) and not torch.equal(q[1], q0[1])


@pytest.mark.parametrize("T", [1, 29, 40, 98, 300, 8200])
def test_enable_pdl_gives_the_same_bits(backend, T):
    """enable_pdl=True (programmatic dependent launch on sm_90+, a no-op elsewhere),
    with each call's inputs written by the kernel just before it: the same bits
    as the default launch, for store_kv and the fused call, at sizes that take
    the small (1-98 tokens), general and large-call kernels for the fused
    call (store_kv takes the rows kernel by default, two tokens per block at
    98 tokens, and with PDL up to 2^15 16-byte units, 128 tokens here; past that
    the unit kernel, and from 2^20 units, which 8200 tokens are here, the
    two-unit kernel)."""
    device = backend[1]
    gen = torch.Generator().manual_seed(T)
    H, D, slots, max_pos = 8, 128, T + 50, 4096
    base = torch.randn(T, 3 * H * D, generator=gen).to(torch.bfloat16).to(device)
    loc = torch.randperm(slots, generator=gen)[:T].to(device)
    loc[T // 2] = -1  # a padding slot
    pos = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    cs = cos_sin_cache(max_pos, D).to(device)
    caches = torch.randn(2, slots, H, D, generator=gen).to(torch.bfloat16).to(device)
    results = []
    for pdl in (False, True):
        kc, vc = caches[0].clone(), caches[1].clone()
        qkv = base * 2  # written by the kernel right before the call
        q, k, v = qkv.split(H * D, dim=1)
        ropekv.store_kv(k, v, kc, vc, loc, enable_pdl=pdl)
        kc2, vc2 = caches[0].clone(), caches[1].clone()
        qkv2 = base * 4
        q2, k2, v2 = qkv2.split(H * D, dim=1)
        arg = ropekv.FusedSetKVBufferArg(value=v2, k_buffer=kc2, v_buffer=vc2, cache_loc=loc)
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q2, k2, D, cs, True, arg, enable_pdl=pdl)
        results.append((kc, vc, qkv2, kc2, vc2))
        keep = loc >= 0
        assert torch.equal(ref.bits(kc[loc[keep]]), ref.bits(k.unflatten(1, (H, D))[keep]))
        assert torch.equal(ref.bits(vc2[loc[keep]]), ref.bits(v2.unflatten(1, (H, D))[keep]))
    for a, b in zip(*results):
        assert torch.equal(ref.bits(a), ref.bits(b))


@pytest.mark.parametrize("pdl", [False, True], ids=["default", "pdl"])
@pytest.mark.parametrize("T", [1, 29, 40, 130])
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16-cache", "e4m3-cache"])
@pytest.mark.parametrize("loc_dtype", [None, torch.int32, torch.int64], ids=["rope", "loc32", "loc64"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["pos32", "pos64"])
def test_every_pairing_of_index_dtypes(backend, pos_dtype, loc_dtype, cache_dtype, T, pdl):
    """Rotating CUDA calls with one index dtype run kernels compiled for it (the
    small kernel up to 128 tokens, here), mixed pairs of up to 32 tokens a unit
    kernel that reads each index as its dtype says, and larger calls always
    the latter. Each pairing, at 1, 29, 40 and 130 tokens, with positions
    outside the table and padding and out-of-range slots among the tokens,
    launched by default and, on CUDA, with PDL."""
    if pdl:
        needs_native_cuda(backend)
    if loc_dtype is None and cache_dtype is not None:
        pytest.skip("RoPE alone writes no cache")
    kv = None
    if loc_dtype is not None:
        kv = KVCase(T=T, hk=2, dk=128, hv=2, dv=128, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                    input_layout="qkv", cache_layout="3d", page_size=1, index_dtype=loc_dtype,
                    k_scale="tensor" if cache_dtype else "none", v_scale="float" if cache_dtype else "none",
                    pad_frac=0.2, oob_frac=0.1, seed=5)
    case = RopeCase(T=T, hq=4, hk=2, head_size=128, rot_dim=128, neox=True, dtype=torch.bfloat16,
                    cos_sin_dtype=torch.float32, layout="qkv", index_dtype=pos_dtype, max_pos=512,
                    bad_pos_frac=0.1, kv=kv, seed=11)
    run_rope_case(case, backend[1], enable_pdl=pdl)


@pytest.mark.parametrize("T", [1, 29])
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16-cache", "e4m3-cache"])
def test_pdl_calls_the_small_kernel_does_not_take(backend, cache_dtype, T):
    """With PDL, rotating calls of up to 32 tokens that the small kernel does not
    take (a partial rotation here) run the unit kernel compiled for their index
    dtype: against the reference, with positions outside the table and padding
    and out-of-range slots among the tokens (the test checks that the small
    kernel did not run)."""
    needs_native_cuda(backend)
    kv = KVCase(T=T, hk=2, dk=128, hv=2, dv=128, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                input_layout="qkv", cache_layout="3d", page_size=1, index_dtype=torch.int32,
                k_scale="tensor" if cache_dtype else "none", v_scale="float" if cache_dtype else "none",
                pad_frac=0.2, oob_frac=0.1, seed=7)
    case = RopeCase(T=T, hq=4, hk=2, head_size=128, rot_dim=64, neox=True, dtype=torch.bfloat16,
                    cos_sin_dtype=torch.float32, layout="qkv", index_dtype=torch.int32, max_pos=512,
                    bad_pos_frac=0.1, kv=kv, seed=13)
    names = cuda_kernel_names(lambda: run_rope_case(case, backend[1], enable_pdl=True))
    if names:
        assert not any("rope_kv_small_kernel" in n for n in names), names


# ---- large calls with narrow heads (the CUDA row kernel) ----------------------

def row_kernel_min_tokens() -> int:
    """Rotating calls that write the cache, of at least this many tokens, whose
    rotated half is at most 4 chunks of 16 bytes take the CUDA row kernel
    (cpp/src/cuda_rope_kv.cu)."""
    return 32 * torch.cuda.get_device_properties(0).multi_processor_count


def needs_native_cuda(backend):
    if backend != ("native", torch.device("cuda")):
        pytest.skip("a test of the CUDA backend's kernel choice")


@st.composite
def large_narrow_cases(draw):
    hk = draw(st.integers(1, 8))
    hq = draw(st.one_of(st.just(hk * draw(st.sampled_from([1, 2, 4, 8]))), st.integers(1, 64)))
    head_size = draw(st.sampled_from([32, 48, 64, 64, 96, 128]))
    rot_dim = draw(st.sampled_from([r for r in (16, 32, 48, 64) if r <= head_size]))
    kv = draw(kv_cases(max_tokens=0, hk=hk, dk=head_size))
    kv = dataclasses.replace(kv, T=row_kernel_min_tokens() + draw(st.integers(0, 300)),
                             dv=draw(st.sampled_from([32, 64, 128, min(kv.dv, 256)])))
    return RopeCase(
        T=kv.T, hq=hq, hk=hk, head_size=head_size, rot_dim=rot_dim, neox=draw(st.booleans()), dtype=kv.dtype,
        cos_sin_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        layout=draw(st.sampled_from(["qkv", "2d", "3d", "head_padded"])), index_dtype=kv.index_dtype,
        max_pos=draw(st.integers(1, 4096)), bad_pos_frac=draw(st.sampled_from([0.0, 0.0, 0.1])),
        kv=draw(st.sampled_from([kv, kv, None])), seed=draw(st.integers(0, 2**31 - 1)),
    )


# A quarter of the profile's examples: each is a call of thousands of tokens.
@settings(max_examples=max(2, settings.default.max_examples // 4))
@given(data=st.data())
def test_large_narrow_head_calls_match_reference(backend, data):
    """Every output of the row kernel's calls (and of the unit kernel's, where the
    drawn layout does not allow rows) against the float64 reference."""
    needs_native_cuda(backend)
    run_rope_case(data.draw(large_narrow_cases()), backend[1])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_large_narrow_head_call_takes_the_row_kernel(backend, cache_dtype):
    """The gpt-oss shape at the threshold runs the row kernel, one token fewer the
    unit kernel (kernel names from the profiler), and both give the same bits.
    RoPE alone at the threshold runs the unit kernel."""
    needs_native_cuda(backend)
    T0, hq, hk, d = row_kernel_min_tokens(), 64, 8, 64
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(T0, (hq + 2 * hk) * d, generator=gen).to(torch.bfloat16).cuda()
    cs = cos_sin_cache(4096, d).cuda()
    pos = torch.randint(0, 4096, (T0,), generator=gen).cuda()
    loc = torch.randperm(2 * T0, generator=gen)[:T0].cuda()
    cache0 = (torch.randn(2 * T0, hk, d, generator=gen) * 2).to(cache_dtype).cuda()
    kernels, outs = [], []
    for T in (T0, T0 - 1):
        x = qkv[:T].clone()
        q, k, v = x[:, : hq * d], x[:, hq * d : (hq + hk) * d], x[:, (hq + hk) * d :]
        kc, vc = cache0.clone(), cache0.clone()
        arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, cache_loc=loc[:T],
                                         k_scale=0.5 if cache_dtype != torch.bfloat16 else None,
                                         v_scale=0.5 if cache_dtype != torch.bfloat16 else None)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ropekv.apply_rope_with_cos_sin_cache_inplace(pos[:T], q, k, d, cs, True, arg)
            torch.cuda.synchronize()
        kernels.append({e.name for e in prof.events() if "rope_kv" in e.name})
        outs.append((x, kc, vc))
    x = qkv.clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, x[:, : hq * d], x[:, hq * d : (hq + hk) * d], d, cs, True)
        torch.cuda.synchronize()
    kernels.append({e.name for e in prof.events() if "rope_kv" in e.name})
    assert torch.equal(ref.bits(x[:, : (hq + hk) * d]), ref.bits(outs[0][0][:, : (hq + hk) * d]))
    assert torch.equal(ref.bits(outs[0][0][: T0 - 1]), ref.bits(outs[1][0]))
    others = torch.ones(2 * T0, dtype=torch.bool, device="cuda")
    others[loc[T0 - 1]] = False  # the one slot only the longer call writes
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.equal(ref.bits(a)[others], ref.bits(b)[others])
    if not any(kernels):
        pytest.skip("the profiler records no CUDA kernels here (under compute-sanitizer, for one)")
    assert any("rope_kv_rows_kernel" in n for n in kernels[0]), kernels[0]
    assert not any("rope_kv_rows_kernel" in n for n in kernels[1]), kernels[1]
    assert kernels[2] and not any("rope_kv_rows_kernel" in n for n in kernels[2]), kernels[2]


# Tensor scales of every class (a Python float must be positive and finite): in the
# reciprocal's range, just past each end of it, far past, zero, subnormal, infinite, NaN.
EXTREME_TENSOR_SCALES = [0.37, -1.7, 2.0**-64 * (1 - 2.0**-24), 2.0**64 * (1 + 2.0**-23), 2.0**-100, 1e-45, 0.0,
                         3.4028234663852886e38, float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("size", ["row kernel", "large-call kernel", "small kernel"])
def test_fused_fp8_write_at_extreme_scales(backend, size):
    """The fp8 write of fused calls, through the row kernel (the gpt-oss shape at its
    token threshold), the large-call kernel (heads of 128 at its threshold) and the
    small kernel (the gpt-oss shape, 8 tokens), at scales of every fp32 class, against
    the reference's IEEE division of the rotated key and the value: those kernels
    bring scales outside the reciprocal's range into it by a power of two."""
    device = backend[1]
    if size != "small kernel":
        needs_native_cuda(backend)
    if size == "row kernel":
        T, hq, hk, d = row_kernel_min_tokens(), 64, 8, 64
    elif size == "large-call kernel":
        T, hq, hk, d = large_kernel_min_tokens(), 8, 8, 128
    else:
        T, hq, hk, d = 8, 64, 8, 64
    gen = torch.Generator().manual_seed(11)
    # Magnitudes across the binades (scaled by 2^-20 .. 2^20), so every scale meets quotients that matter.
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=gen) * torch.exp2(torch.randint(-20, 21, (T, 1), generator=gen))
    qkv = qkv.to(torch.bfloat16).to(device)
    cs = cos_sin_cache(4096, d).to(device)
    pos = torch.randint(0, 4096, (T,), generator=gen).to(device)
    loc = torch.randperm(2 * T, generator=gen)[:T].to(device)
    for cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for value in EXTREME_TENSOR_SCALES:
            x = qkv.clone()
            q, k, v = x[:, : hq * d], x[:, hq * d : (hq + hk) * d], x[:, (hq + hk) * d :]
            kc = torch.zeros(2 * T, hk, d, dtype=cache_dtype, device=device)
            vc = torch.zeros_like(kc)
            scale = torch.tensor([value], dtype=torch.float32, device=device)
            arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, cache_loc=loc, k_scale=scale,
                                             v_scale=scale)
            ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cs, True, arg)
            s = torch.tensor([[value]], dtype=torch.float64)
            for cache, src in ((kc, k), (vc, v)):  # src: the key as rotated in place, the value
                want = ref.cache_bits(src.reshape(-1, d).cpu(), cache_dtype, s)
                got = cache[loc].reshape(-1, d).cpu()
                nan = torch.isnan(got.to(torch.float64))  # NaN codes: any NaN will do (SPEC section 2)
                assert torch.equal(nan, torch.isnan(want.view(cache_dtype).to(torch.float64))), (cache_dtype, value)
                assert torch.equal(ref.bits(got)[~nan], want[~nan]), f"{cache_dtype} scale {value}"


# ---- decode-sized calls (the CUDA small kernel) --------------------------------
# CUDA calls of up to 128 rotating tokens (store_kv: see small_store_max_tokens)
# with f16/bf16 inputs, heads of 64, 128 or 256 rotated whole, an fp32 cos/sin
# table and one index dtype run rope_kv_small_kernel (cpp/src/cuda_rope_kv.cu);
# others do not. With PDL too (but not store_kv calls; small_call_head_dim).
SMALL_KERNEL_MAX_TOKENS = 128
# Rotating calls of up to this many tokens that the small kernel does not take
# run a unit kernel compiled for their index dtype (kTypedIndexMaxTokens).
TYPED_INDEX_MAX_TOKENS = 32


def takes_small_kernel(T: int) -> bool:
    """Whether a rotating call that fits the small kernel in every other way takes it."""
    return T <= SMALL_KERNEL_MAX_TOKENS


SMALL_CALL_CASES = [  # dtype, cache dtype, cache layout, page size, k scale, v scale
    (torch.bfloat16, None, "3d", 1, "none", "none"),
    (torch.float16, torch.float8_e4m3fn, "paged", 16, "per_head", "float"),
    (torch.bfloat16, torch.float8_e5m2, "paged_padded", 2, "tensor", "per_head"),
]


def small_kv(T, hk, d, dtype, cache_dtype, cache_layout, page_size, k_scale, v_scale, seed):
    return KVCase(T=T, hk=hk, dk=d, hv=hk, dv=d, dtype=dtype, cache_dtype=cache_dtype, input_layout="2d",
                  cache_layout=cache_layout, page_size=page_size, index_dtype=torch.int64, k_scale=k_scale,
                  v_scale=v_scale, pad_frac=0.2, oob_frac=0.1, seed=seed)


@pytest.mark.parametrize("pdl", [False, True], ids=["default", "pdl"])
@pytest.mark.parametrize("size", ["one", "limit", "past"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "rope"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", range(len(SMALL_CALL_CASES)))
def test_small_calls_match_reference(backend, kind, d, neox, fused, size, pdl):
    """Decode-sized calls of each head size the small kernel compiles, both
    rotation styles, bf16 and fp8 caches (paged among them, every scale kind;
    into an fp8 cache a NeoX k unit is split over several threads), padding and
    out-of-range slots, positions outside the table; at the token limit and one
    token past it (the unit kernel; on CUDA the test checks which kernel ran),
    launched by default and, on CUDA, with PDL."""
    if pdl:
        needs_native_cuda(backend)
    dtype, *cache = SMALL_CALL_CASES[kind]
    T = {"one": 1, "limit": SMALL_KERNEL_MAX_TOKENS, "past": SMALL_KERNEL_MAX_TOKENS + 1}[size]
    kv = small_kv(T, 2, d, dtype, *cache, seed=d + T) if fused else None
    # Contiguous inputs: 16-byte aligned, as the small kernel needs (views into a
    # fused qkv tensor with an odd lead would take the narrow path).
    case = RopeCase(T=T, hq=6, hk=2, head_size=d, rot_dim=d, neox=neox, dtype=dtype, cos_sin_dtype=torch.float32,
                    layout="3d", index_dtype=torch.int64, max_pos=700, bad_pos_frac=0.1, kv=kv, seed=3 * d + T)
    if backend != ("native", torch.device("cuda")):
        run_rope_case(case, backend[1])
        return
    names = cuda_kernel_names(lambda: run_rope_case(case, backend[1], enable_pdl=pdl))
    if names:
        assert any("rope_kv_small_kernel" in n for n in names) == takes_small_kernel(T), names


@pytest.mark.parametrize("rows", [0, 16])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "e4m3"])
def test_small_calls_with_positions_outside_the_table(backend, cache_dtype, rows):
    """Into an fp8 cache the small kernel loads a cos/sin row for every position
    (row 0 for one outside the table) and keeps the rotation only of tokens whose
    position is inside it. Positions far below, just outside and far past a
    16-row table, int32 and int64, with a padding slot and one past the caches:
    q, k and both caches against the reference. A table of no rows has no row 0,
    and the small kernel does not take such a call (on CUDA the test checks
    which kernel ran)."""
    device = backend[1]
    T, hq, hk, d = 8, 3, 2, 128
    gen = torch.Generator().manual_seed(rows)
    for index_dtype in (torch.int32, torch.int64):
        far = 2**31 - 1 if index_dtype == torch.int32 else 2**40
        positions = torch.tensor([-far, -1, 0, 5, 15, 16, far, 3], dtype=index_dtype)
        loc = torch.tensor([3, -1, 7, 31, 32, 0, 12, 20], dtype=index_dtype, device=device)
        qkv = torch.randn(T, (hq + 2 * hk) * d, generator=gen).to(torch.bfloat16).to(device)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=1)
        kc = torch.randn(32, hk, d, generator=gen).to(cache_dtype).to(device)
        vc = torch.randn(32, hk, d, generator=gen).to(cache_dtype).to(device)
        scale = torch.tensor([0.7], device=device) if cache_dtype != torch.bfloat16 else None
        cs = cos_sin_cache(rows, d).to(device)
        caches_before = (kc.clone(), vc.clone())
        q0, k0 = q.clone(), k.clone()
        want_q, slack_q = ref.rope(q.view(T, hq, d), positions, cs, True)
        want_k, slack_k = ref.rope(k.view(T, hk, d), positions, cs, True)
        arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, k_scale=scale, v_scale=scale, cache_loc=loc)

        def call():
            ropekv.apply_rope_with_cos_sin_cache_inplace(positions.to(device), q, k, d, cs, True, arg)

        if backend == ("native", torch.device("cuda")):
            names = cuda_kernel_names(call)
            if names:
                assert any("rope_kv_small_kernel" in n for n in names) == (rows > 0), names
        else:
            call()
        ref.assert_close_rope(q.view(T, hq, d), want_q, slack_q, f"query, {rows} rows, {index_dtype}")
        ref.assert_close_rope(k.view(T, hk, d), want_k, slack_k, f"key, {rows} rows, {index_dtype}")
        # Tokens whose position is outside the table keep their bits.
        outside = (positions < 0) | (positions >= rows)
        assert torch.equal(ref.bits(q)[outside.to(device)], ref.bits(q0)[outside.to(device)])
        assert torch.equal(ref.bits(k)[outside.to(device)], ref.bits(k0)[outside.to(device)])
        want_kc, want_vc = ref.store_kv(k.view(T, hk, d), v.view(T, hk, d), *caches_before, loc, scale, scale)
        assert torch.equal(ref.bits(kc).cpu(), want_kc) and torch.equal(ref.bits(vc).cpu(), want_vc)


@pytest.mark.parametrize("pdl", [False, True], ids=["default", "pdl"])
@pytest.mark.parametrize("hq", [1, 3, 7])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_small_fp8_calls_with_odd_query_heads(backend, d, hq, pdl):
    """Into an fp8 cache the small kernel splits a NeoX k unit over threads
    that each load both halves of the rotated pair and store one: they must
    all load before any stores. With an odd number of query heads the old
    layout (q units first) put one head's threads in two warps, at d = 128 and
    hq = 7 in two blocks. Repeated calls of several sizes, each checked whole,
    launched by default and with PDL; the largest takes the large-call kernel (the
    row kernel at d = 64), whose threads run two units each: with one query
    head, some threads of a k head's warp have a second unit and some do not."""
    needs_native_cuda(backend)
    for T in (1, 8, 33, SMALL_KERNEL_MAX_TOKENS, large_kernel_min_tokens()):
        for rep in range(3):
            seed = 1000 * d + 100 * hq + 10 * T + rep
            kv = small_kv(T, 1, d, torch.bfloat16, torch.float8_e4m3fn, "3d", 1, "tensor", "per_head", seed=seed)
            case = RopeCase(T=T, hq=hq, hk=1, head_size=d, rot_dim=d, neox=True, dtype=torch.bfloat16,
                            cos_sin_dtype=torch.float32, layout="3d", index_dtype=torch.int64, max_pos=700,
                            bad_pos_frac=0.0, kv=kv, seed=seed)
            names = cuda_kernel_names(lambda: run_rope_case(case, backend[1], enable_pdl=pdl))
            small_ran = any("rope_kv_small_kernel" in n for n in names)
            assert not names or small_ran == takes_small_kernel(T), names


def test_small_kernel_takes_the_calls_it_serves(backend):
    """Which calls run the small kernel and which the store_kv rows kernel
    (kernel names from the profiler): fused calls at their token limit (bf16
    and fp8 caches) and narrow store_kv calls at theirs run the small kernel; one token more, a partial rotation, a head size it does not
    compile or a bf16 cos/sin table do not. With PDL, fused calls of every
    size up to the limit do (a partial rotation does not), narrow store_kv
    calls do not. store_kv
    calls with K and V rows of at least 64 chunks into a cache of the input dtype run the rows
    kernel at any size (with PDL up to 2^15 chunks), into an fp8 cache or with
    heads apart in the input they do not. Fused calls from the large-call
    threshold run the large-call kernel (bf16 and fp8 caches, with PDL too); one
    token fewer, a partial rotation or a bf16 cos/sin table do not."""
    needs_native_cuda(backend)
    gen = torch.Generator().manual_seed(3)
    hq, hk, d = 8, 2, 128

    def fused_call(T, head=d, rot=d, cs_dtype=torch.float32, pdl=False, cache_dtype=torch.bfloat16):
        qkv = torch.randn(T, (hq + 2 * hk) * head, generator=gen).to(torch.bfloat16).cuda()
        q, k, v = qkv[:, : hq * head], qkv[:, hq * head : (hq + hk) * head], qkv[:, (hq + hk) * head :]
        cache = [torch.zeros(T + 64, hk, head, dtype=cache_dtype, device="cuda") for _ in range(2)]
        arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=cache[0], v_buffer=cache[1],
                                         cache_loc=torch.randperm(T + 64, generator=gen)[:T].cuda())
        pos = torch.randint(0, 100, (T,), generator=gen).cuda()
        cs = cos_sin_cache(100, rot, cs_dtype).cuda()
        return lambda: ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, head, cs, True, arg, enable_pdl=pdl)

    def store_call(T, heads=hk, cache_dtype=torch.bfloat16, head_gap=0, pdl=False):
        k, v = (torch.randn(T, heads, d + head_gap, generator=gen).to(torch.bfloat16).cuda()[..., :d] for _ in range(2))
        cache = [torch.zeros(T + 64, heads, d, dtype=cache_dtype, device="cuda") for _ in range(2)]
        loc = torch.randperm(T + 64, generator=gen)[:T].cuda()
        return lambda: ropekv.store_kv(k, v, cache[0], cache[1], loc, enable_pdl=pdl)

    fp8 = torch.float8_e4m3fn
    rows_pdl_tokens = STORE_ROWS_MAX_UNITS_PDL // (2 * 8 * d * 2 // 16)
    small, rows, large, other = "rope_kv_small_kernel", "store_kv_rows_kernel", "rope_kv_large_kernel", None
    T0 = large_kernel_min_tokens()
    calls = {
        "fused at the large-call threshold": (fused_call(T0), large),
        "fused one token below it": (fused_call(T0 - 1), other),
        "fused into fp8 at the large-call threshold": (fused_call(T0, cache_dtype=fp8), large),
        "pdl at the large-call threshold": (fused_call(T0, pdl=True), large),
        "partial rotation at the large-call threshold": (fused_call(T0, rot=64), other),
        "bf16 cos/sin at the large-call threshold": (fused_call(T0, cs_dtype=torch.bfloat16), other),
        "fused at the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS), small),
        "fused past the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS + 1), other),
        "fused into fp8 at the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS, cache_dtype=fp8), small),
        "fused into fp8 past the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS + 1, cache_dtype=fp8), other),
        "store_kv at the limit": (store_call(small_store_max_tokens(hk, d)), small),
        "store_kv past the limit": (store_call(small_store_max_tokens(hk, d) + 1), other),
        "wide store_kv, 1 token": (store_call(1, heads=8), rows),
        "wide store_kv, 5000 tokens": (store_call(5000, heads=8), rows),
        "wide store_kv with PDL at its limit": (store_call(rows_pdl_tokens, heads=8, pdl=True), rows),
        "wide store_kv with PDL past it": (store_call(rows_pdl_tokens + 1, heads=8, pdl=True), other),
        "wide store_kv, heads apart in the input": (store_call(4, heads=8, head_gap=8), small),
        "wide store_kv into fp8 at the limit": (store_call(small_store_max_tokens(8, d), heads=8, cache_dtype=fp8), small),
        "wide store_kv into fp8 past the limit": (
            store_call(small_store_max_tokens(8, d) + 1, heads=8, cache_dtype=fp8), other),
        "partial rotation": (fused_call(4, rot=64), other),
        "head size 96": (fused_call(4, head=96, rot=96), other),
        "bf16 cos/sin": (fused_call(4, cs_dtype=torch.bfloat16), other),
        "pdl": (fused_call(4, pdl=True), small),
        "pdl at the typed-index limit": (fused_call(TYPED_INDEX_MAX_TOKENS, pdl=True), small),
        "pdl past the typed-index limit": (fused_call(TYPED_INDEX_MAX_TOKENS + 1, pdl=True), small),
        "pdl, partial rotation": (fused_call(4, rot=64, pdl=True), other),
        "pdl at the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS, pdl=True), small),
        "pdl past the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS + 1, pdl=True), other),
        "pdl into fp8, 1 token": (fused_call(1, pdl=True, cache_dtype=fp8), small),
        "pdl into fp8 at the typed-index limit": (fused_call(TYPED_INDEX_MAX_TOKENS, pdl=True, cache_dtype=fp8), small),
        "pdl into fp8 past the typed-index limit": (
            fused_call(TYPED_INDEX_MAX_TOKENS + 1, pdl=True, cache_dtype=fp8), small),
        "pdl into fp8 past the limit": (fused_call(SMALL_KERNEL_MAX_TOKENS + 1, pdl=True, cache_dtype=fp8), other),
        "pdl, narrow store_kv": (store_call(4, pdl=True), other),
    }
    seen = {name: cuda_kernel_names(fn) for name, (fn, _) in calls.items()}
    if not any(seen.values()):
        pytest.skip("the profiler records no CUDA kernels here (under compute-sanitizer, for one)")
    for name, (_, kernel) in calls.items():
        assert seen[name], name
        for family in (small, rows, large):
            assert any(family in n for n in seen[name]) == (kernel == family), (name, seen[name])


# ---- large calls with a common head size (the CUDA large-call kernel) --------

def large_kernel_min_tokens() -> int:
    """Rotating calls of at least this many tokens with heads of 64, 128 or 256
    rotated whole and an fp32 cos/sin table (any index dtypes), that the row
    kernel does not take, run the CUDA large-call kernel: a token per block,
    two units per thread (cpp/src/cuda_rope_kv.cu)."""
    return 32 * torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("pdl", [False, True], ids=["default", "pdl"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "rope"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", range(len(SMALL_CALL_CASES)))
def test_large_calls_match_reference(backend, kind, d, neox, fused, pdl):
    """Calls of thousands of tokens with each head size the large-call kernel
    compiles: both rotation styles, bf16 and fp8 caches (paged among them, every
    scale kind; into an fp8 cache a NeoX k unit is split over several threads),
    padding and out-of-range slots, positions outside the table, inputs as views
    of one qkv tensor and as separate tensors, int64 indices and int32 positions
    beside int64 slots, launched by default and with PDL.
    Every output against the float64 reference, every other cache slot kept;
    for separate tensors the kernel that ran is the large-call kernel (or, for
    fused calls with heads of 64, the row kernel)."""
    needs_native_cuda(backend)
    dtype, *cache = SMALL_CALL_CASES[kind]
    T = large_kernel_min_tokens()
    kv = small_kv(T, 2, d, dtype, *cache, seed=d + kind) if fused else None
    case = RopeCase(T=T, hq=6, hk=2, head_size=d, rot_dim=d, neox=neox, dtype=dtype, cos_sin_dtype=torch.float32,
                    layout="qkv" if kind == 0 else "3d", index_dtype=torch.int32 if kind == 2 else torch.int64,
                    max_pos=5000, bad_pos_frac=0.1, kv=kv, seed=5 * d + kind)
    names = cuda_kernel_names(lambda: run_rope_case(case, backend[1], enable_pdl=pdl))
    if names and case.layout == "3d":  # qkv views with an odd lead take the narrow path
        assert any("rope_kv_large_kernel" in n or "rope_kv_rows_kernel" in n for n in names), names
