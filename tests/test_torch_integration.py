"""The torch custom ops behind the public functions: opcheck, torch.compile with
no graph break and eager's bits, CUDA-graph capture and replay with new slots,
positions and scales."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ropekv
import reference as ref
from ropekv import _backend, _native, _ops
from ropekv import _validate as V
from test_rope import cos_sin_cache

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


def _rand(gen, *shape, dtype=torch.bfloat16, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


PLAN_IDS = [
    "store-bf16-padded",
    "store-fp8-paged-per-head-scale",
    "store-no-tokens",
    "rope-qkv-views",
    "rope-partial-gptj",
    "rope-key-only",
    "rope-fused-bf16-padded",
    "rope-fused-fp8-e5m2",
]


def _plan(name, device):
    """A call validated as the public functions validate it."""
    g = torch.Generator().manual_seed(0)
    T, Hq, Hk, D = 5, 4, 2, 64
    qkv = _rand(g, T, (Hq + 2 * Hk) * D, device=device)
    q, k, v = qkv.split([Hq * D, Hk * D, Hk * D], dim=1)
    pos = torch.tensor([0, 7, 3, 100, 31], device=device)
    cs = cos_sin_cache(128, D).to(device)
    loc = torch.tensor([4, -1, 0, 9, 2], device=device)  # a CUDA-graph padding slot
    kc, vc = _rand(g, 12, Hk, D, device=device), _rand(g, 12, Hk, D, device=device)
    names = dict(q="query", k="key", positions="positions", cos_sin_cache="cos_sin_cache")

    def fp8_cache(dtype, *shape):
        return _rand(g, *shape, dtype=torch.float32, device=device).to(dtype)

    def fused(plan, *write):
        V.cache_write(plan, *write, V.STORE_NAMES)
        return plan

    if name == "store-bf16-padded":
        return V.plan_store_kv(k, v, kc, vc, loc, None, None, False)
    if name == "store-fp8-paged-per-head-scale":
        kc8, vc8 = (fp8_cache(torch.float8_e4m3fn, 3, 4, Hk, D) for _ in range(2))
        return V.plan_store_kv(k, v, kc8, vc8, loc.int(), torch.tensor([0.5, 2.0], device=device), 3.0, False)
    if name == "store-no-tokens":
        # (fresh tensors: opcheck cannot copy an empty view with a storage offset)
        nothing = torch.empty(0, Hk * D, dtype=k.dtype, device=device)
        return V.plan_store_kv(nothing, nothing.clone(), kc, vc, loc[:0].clone(), None, None, False)
    if name == "rope-qkv-views":
        return V.plan_rope(pos, q, k, D, cs, True, False, names)
    if name == "rope-partial-gptj":
        return V.plan_rope(pos.int(), q.unflatten(1, (Hq, D)), k, D, cos_sin_cache(128, D // 2).to(device),
                           False, False, names)
    if name == "rope-key-only":
        return V.plan_rope(pos, None, k, D, cs, True, False, names)
    if name == "rope-fused-bf16-padded":
        return fused(V.plan_rope(pos, q, k, D, cs, True, False, names), v, kc, vc, loc, None, None)
    assert name == "rope-fused-fp8-e5m2"
    kc5, vc5 = (fp8_cache(torch.float8_e5m2, 12, Hk * D) for _ in range(2))
    return fused(V.plan_rope(pos, q, k, D, cs, True, False, names), v, kc5, vc5, loc,
                 torch.tensor([0.25], device=device), 0.5)


def _mutable_args(op):
    return {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


@pytest.mark.parametrize("name", PLAN_IDS)
def test_opcheck(backend, name):
    """torch.library.opcheck: declared mutations (test_schema), fake tensors, AOT dispatch.

    opcheck's test_schema compares tensors with torch.allclose, which torch does not
    implement for fp8; with fp8 caches the same property is checked here instead:
    exactly the arguments the schema marks as written change.
    """
    op, args = _ops.call_of(_plan(name, backend[1]))
    fp8 = any(isinstance(a, torch.Tensor) and a.dtype in V.FP8_DTYPES for a in args)
    if not fp8:
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    arg_names = [a.name for a in op._schema.arguments]
    before = {n: ref.bits(a).clone() for n, a in zip(arg_names, args) if isinstance(a, torch.Tensor)}
    op(*args)
    changed = {n for n, a in zip(arg_names, args) if isinstance(a, torch.Tensor) and not torch.equal(ref.bits(a), before[n])}
    assert changed <= _mutable_args(op), f"{op} wrote {changed - _mutable_args(op)}, which its schema does not declare"
    assert any("cache" in n for n in changed), "the fp8 cache was not written"


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_public_functions_run_the_ops():
    T, H, D = 3, 2, 64
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    kc, vc = torch.zeros(8, H, D), torch.zeros(8, H, D)
    pos, loc, cs = torch.arange(T), torch.tensor([1, 5, -1]), cos_sin_cache(16, D)
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=kc, v_buffer=vc, cache_loc=loc)
    with _Seen() as seen:
        ropekv.store_kv(k, v, kc, vc, loc)
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, D, cs, True, arg)
        ropekv.rope_and_store(pos, q, k, cs, v=v, k_cache=kc, v_cache=vc, loc=loc)
    ours = [op for op in seen.ops if op.startswith("ropekv.")]  # (the rest: validation's views)
    assert ours == ["ropekv.store_kv.default", "ropekv.rope.default", "ropekv.rope.default"]


T, HQ, HK, D, SLOTS = 6, 4, 2, 64, 32


def _block(qkv, positions, loc, cos_sin, k_cache, v_cache, k8_cache, v8_cache, scale):
    """An attention input block: split the fused qkv, RoPE with the fused KV write,
    the same keys and values into a second (fp8) layer cache, and read both back."""
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    ropekv.apply_rope_with_cos_sin_cache_inplace(
        positions, q, k, D, cos_sin, True,
        ropekv.FusedSetKVBufferArg(value=v, k_buffer=k_cache, v_buffer=v_cache, cache_loc=loc),
    )
    ropekv.store_kv(k, v, k8_cache, v8_cache, loc, k_scale=scale, v_scale=scale)
    slots = loc.clamp(min=0)
    return q.unflatten(-1, (HQ, D)), k_cache[slots], v_cache[slots], k8_cache[slots].float()


def _block_inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randperm(SLOTS, generator=g)[:T]
    loc[2] = -1
    return dict(
        qkv=_rand(g, T, (HQ + 2 * HK) * D, device=device),
        positions=torch.randint(0, 256, (T,), generator=g).to(device),
        loc=loc.to(device),
        cos_sin=cos_sin_cache(256, D).to(device),
        k_cache=_rand(g, SLOTS, HK, D, device=device),
        v_cache=_rand(g, SLOTS, HK, D, device=device),
        k8_cache=_rand(g, SLOTS, HK, D, dtype=torch.float32, device=device).to(torch.float8_e4m3fn),
        v8_cache=_rand(g, SLOTS, HK, D, dtype=torch.float32, device=device).to(torch.float8_e4m3fn),
        scale=torch.rand(1, generator=g).add(0.5).to(device),
    )


def _clone(inputs):
    return {n: x.clone() for n, x in inputs.items()}


def _same_bits(a, b):
    return torch.equal(ref.bits(a), ref.bits(b))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager_bit_for_bit(device):
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True)  # fullgraph: a graph break raises
    for seed in (1, 2):  # the same graph, new slots, positions and scale
        inputs = _block_inputs(device, seed)
        eager_in, compiled_in = _clone(inputs), _clone(inputs)
        want = _block(**eager_in)
        got = compiled(**compiled_in)
        for name in inputs:  # everything the block mutates: qkv and the four caches
            assert _same_bits(compiled_in[name], eager_in[name]), f"{name} differs from eager"
        for i, (a, b) in enumerate(zip(got, want)):
            assert _same_bits(a, b), f"output {i} differs from eager"
        assert not _same_bits(eager_in["k_cache"], inputs["k_cache"])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_graph_replays_see_new_slots_positions_and_scales():
    device = torch.device("cuda")
    if not _native.serves(device) or _backend.requested() == "torch":
        # The pure-torch fallback synchronizes, so only the native path can be captured.
        pytest.skip("CUDA calls do not take the native backend (no CUDA kernels, or ROPEKV_BACKEND=torch)")
    static = _block_inputs(device, 10)
    loc, positions, scale = static["loc"], static["positions"], static["scale"]
    q, k, v = static["qkv"].split([HQ * D, HK * D, HK * D], dim=-1)
    arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=static["k_cache"], v_buffer=static["v_cache"], cache_loc=loc)

    def step():
        ropekv.store_kv(k, v, static["k8_cache"], static["v8_cache"], loc, k_scale=scale, v_scale=scale)
        ropekv.apply_rope_with_cos_sin_cache_inplace(positions, q, k, D, static["cos_sin"], True, arg)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed in (11, 12, 13):
        fresh = _block_inputs(device, seed)
        fresh["loc"][seed % T] = -1  # a different padding slot each time
        for name, x in fresh.items():
            static[name].copy_(x)  # same tensors, new contents
        graph.replay()
        torch.cuda.synchronize()
        want = _clone(fresh)
        wq, wk, wv = want["qkv"].split([HQ * D, HK * D, HK * D], dim=-1)
        ropekv.store_kv(wk, wv, want["k8_cache"], want["v8_cache"], want["loc"], k_scale=want["scale"],
                        v_scale=want["scale"])
        ropekv.apply_rope_with_cos_sin_cache_inplace(
            want["positions"], wq, wk, D, want["cos_sin"], True,
            ropekv.FusedSetKVBufferArg(value=wv, k_buffer=want["k_cache"], v_buffer=want["v_cache"],
                                       cache_loc=want["loc"]))
        for name in ("qkv", "k_cache", "v_cache", "k8_cache", "v8_cache"):
            assert _same_bits(static[name], want[name]), f"replay {seed}: {name} differs from eager"
        # and eager is right: the fp8 layer against the float64 reference
        k3 = fresh["qkv"][:, HQ * D:(HQ + HK) * D].unflatten(1, (HK, D))
        want_k8, _ = ref.store_kv(k3, k3, fresh["k8_cache"], fresh["v8_cache"], fresh["loc"], fresh["scale"], None)
        assert torch.equal(ref.bits(static["k8_cache"]).cpu(), want_k8)
