"""ropekv.compat: sgl-kernel's and vLLM's entry points, called as sglang and vLLM
call them, against the float64 reference, on every backend."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import ropekv
import reference as ref
from ropekv.compat import sgl_kernel, vllm
from test_rope import cos_sin_cache


def _rand(gen, *shape, dtype=torch.bfloat16, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def _random_bytes(gen, *shape, device):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)


# --- sgl-kernel ---------------------------------------------------------------


def test_sgl_kernel_signatures():
    """Names, order and defaults as in sgl_kernel/elementwise.py and memory.py."""
    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    empty = inspect.Parameter.empty
    assert params(sgl_kernel.apply_rope_with_cos_sin_cache_inplace) == [
        ("positions", empty), ("query", empty), ("key", empty), ("head_size", empty), ("cos_sin_cache", empty),
        ("is_neox", True), ("fused_set_kv_buffer_arg", None), ("enable_pdl", None)]
    assert params(sgl_kernel.set_kv_buffer_kernel) == [
        ("k_cache", empty), ("v_cache", empty), ("loc", empty), ("k", empty), ("v", empty), ("fallback", False)]
    fields = [f.name for f in dataclasses.fields(sgl_kernel.FusedSetKVBufferArg)]
    assert fields == ["value", "k_buffer", "v_buffer", "k_scale", "v_scale", "cache_loc"]
    assert sgl_kernel.FusedSetKVBufferArg is ropekv.FusedSetKVBufferArg


class _SglangLayer:
    """What sglang's attention layer and memory pool hold: a RotaryEmbedding's cos/sin
    cache (float32), and per-layer K and V buffers of [size + page_size, H, D]."""

    def __init__(self, device, dtype, hq, hk, head_size, rot_dim, neox, size=40, page_size=1):
        g = torch.Generator().manual_seed(head_size + rot_dim + int(neox))
        self.hq, self.hk, self.head_size, self.is_neox_style = hq, hk, head_size, neox
        self.cos_sin_cache = cos_sin_cache(4096, rot_dim).to(device)
        self.k_buffer = _rand(g, size + page_size, hk, head_size, dtype=dtype, device=device)
        self.v_buffer = _rand(g, size + page_size, hk, head_size, dtype=dtype, device=device)
        self.k_scale = self.v_scale = None  # sglang's fused path asserts both are None
        self.gen, self.device, self.dtype = g, device, dtype

    def batch(self, T):
        """qkv from the projection, positions and out_cache_loc (int64) of a forward batch."""
        g = self.gen
        qkv = _rand(g, T, (self.hq + 2 * self.hk) * self.head_size, dtype=self.dtype, device=self.device)
        positions = torch.randint(0, 4096, (T,), generator=g).to(self.device)
        out_cache_loc = torch.randperm(self.k_buffer.shape[0] - 1, generator=g)[:T].add(1).to(self.device)
        return qkv, positions, out_cache_loc


@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (128, 128), (128, 64), (256, 256)])
@pytest.mark.parametrize("neox", [True, False])
def test_sgl_fused_rope_as_sglang_calls_it(backend, head_size, rot_dim, neox):
    layer = _SglangLayer(backend[1], torch.bfloat16, 8, 2, head_size, rot_dim, neox)
    qkv, positions, out_cache_loc = layer.batch(T=9)
    q_size, kv_size = layer.hq * head_size, layer.hk * head_size
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # sglang's split of the fused projection
    want_q, slack_q = ref.rope(q.unflatten(1, (layer.hq, head_size)), positions, layer.cos_sin_cache, neox)
    want_k, slack_k = ref.rope(k.unflatten(1, (layer.hk, head_size)), positions, layer.cos_sin_cache, neox)
    k_buffer, v_buffer = layer.k_buffer, layer.v_buffer
    k_before, v_before, value_before = k_buffer.clone(), v_buffer.clone(), v.clone()
    # sglang/srt/models/utils.py create_fused_set_kv_buffer_arg, then RotaryEmbedding.forward_cuda:
    sgl_kernel.apply_rope_with_cos_sin_cache_inplace(
        positions=positions,
        query=q,
        key=k,
        head_size=layer.head_size,
        cos_sin_cache=layer.cos_sin_cache,
        is_neox=layer.is_neox_style,
        fused_set_kv_buffer_arg=sgl_kernel.FusedSetKVBufferArg(
            value=v,
            k_buffer=k_buffer.view(k_buffer.shape[0], -1),
            v_buffer=v_buffer.view(v_buffer.shape[0], -1),
            k_scale=layer.k_scale,
            v_scale=layer.v_scale,
            cache_loc=out_cache_loc,
        ),
    )
    ref.assert_close_rope(q.unflatten(1, (layer.hq, head_size)), want_q, slack_q, "query")
    ref.assert_close_rope(k.unflatten(1, (layer.hk, head_size)), want_k, slack_k, "key")
    # The buffers hold exactly the rotated key and the value; every other slot is untouched.
    want_kb, want_vb = ref.store_kv(k.unflatten(1, (layer.hk, head_size)), v.unflatten(1, (layer.hk, head_size)),
                                    k_before, v_before, out_cache_loc)
    assert torch.equal(ref.bits(k_buffer).cpu(), want_kb) and torch.equal(ref.bits(v_buffer).cpu(), want_vb)
    assert torch.equal(v, value_before)


@pytest.mark.parametrize("neox", [True, False])
def test_sgl_rope_alone_positional_defaults(backend, neox):
    """RotaryEmbedding.forward_cuda without a fused write; is_neox left to its default when True."""
    device = backend[1]
    g = torch.Generator().manual_seed(3)
    query, key = _rand(g, 7, 32 * 128, device=device), _rand(g, 7, 8 * 128, device=device)
    positions, cs = torch.arange(7, device=device) * 11, cos_sin_cache(128, 128).to(device)
    want_q, slack_q = ref.rope(query.unflatten(1, (32, 128)), positions, cs, neox)
    want_k, slack_k = ref.rope(key.unflatten(1, (8, 128)), positions, cs, neox)
    if neox:
        sgl_kernel.apply_rope_with_cos_sin_cache_inplace(positions, query, key, 128, cs)
    else:
        sgl_kernel.apply_rope_with_cos_sin_cache_inplace(positions, query, key, 128, cs, False)
    ref.assert_close_rope(query.unflatten(1, (32, 128)), want_q, slack_q, "query")
    ref.assert_close_rope(key.unflatten(1, (8, 128)), want_k, slack_k, "key")


@pytest.mark.parametrize("fallback", [False, True])
def test_sgl_set_kv_buffer_kernel(backend, fallback):
    """MHATokenToKVPool.set_kv_buffer: k_buffer[layer] (``[size + page_size, H, D]``), loc, cache_k, cache_v."""
    device = backend[1]
    g = torch.Generator().manual_seed(4)
    k_buffer, v_buffer = _rand(g, 33, 4, 64, device=device), _rand(g, 33, 4, 64, device=device)
    cache_k, cache_v = _rand(g, 6, 4, 64, device=device), _rand(g, 6, 4, 64, device=device)
    loc = torch.tensor([3, 9, 1, 32, 0, 17], device=device)
    want_k, want_v = ref.store_kv(cache_k, cache_v, k_buffer, v_buffer, loc)
    sgl_kernel.set_kv_buffer_kernel(k_buffer, v_buffer, loc, cache_k, cache_v, fallback)
    assert torch.equal(ref.bits(k_buffer).cpu(), want_k) and torch.equal(ref.bits(v_buffer).cpu(), want_v)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_sgl_set_kv_buffer_kernel_uint8_store(backend, fp8):
    """sglang's fp8 pool: buffers of store_dtype uint8, and keys and values converted
    (divided by k_scale, cast to fp8) then viewed as uint8 before the write: a byte copy."""
    device = backend[1]
    g = torch.Generator().manual_seed(5)
    k_buffer, v_buffer = _random_bytes(g, 17, 2, 128, device=device), _random_bytes(g, 17, 2, 128, device=device)
    k_before, v_before = k_buffer.clone(), v_buffer.clone()
    k, v = _rand(g, 4, 2, 128, device=device), _rand(g, 4, 2, 128, device=device)
    cache_k, cache_v = k.to(fp8).view(torch.uint8), v.to(fp8).view(torch.uint8)
    loc = torch.tensor([16, 2, 5, 0], device=device)
    sgl_kernel.set_kv_buffer_kernel(k_buffer, v_buffer, loc, cache_k, cache_v)
    rest = torch.ones(17, dtype=torch.bool, device=device)
    rest[loc] = False
    assert torch.equal(k_buffer[loc], cache_k) and torch.equal(v_buffer[loc], cache_v)
    assert torch.equal(k_buffer[rest], k_before[rest]) and torch.equal(v_buffer[rest], v_before[rest])


def test_sgl_set_kv_buffer_kernel_odd_byte_rows_rejected():
    k_buffer = torch.zeros(8, 3, dtype=torch.uint8)
    k = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="k "):
        sgl_kernel.set_kv_buffer_kernel(k_buffer, k_buffer.clone(), torch.tensor([0, 1]), k, k.clone())


# --- vLLM ---------------------------------------------------------------------


def _vllm_kv_cache(gen, layout, num_blocks, block_size, hk, d, dtype, device):
    """vLLM's per-layer cache and its K and V views: FlashAttention's
    ``[2, num_blocks, block_size, H, D]`` (``kv_cache.unbind(0)``) or the
    ``[num_blocks, 2, block_size, H, D]`` of newer backends (``kv_cache[:, 0]``)."""
    shape = (2, num_blocks, block_size, hk, d) if layout == "kv-first" else (num_blocks, 2, block_size, hk, d)
    if dtype == torch.uint8:
        kv_cache = _random_bytes(gen, *shape, device=device)
    else:
        kv_cache = _rand(gen, *shape, dtype=torch.float32, device=device).to(dtype)
    if layout == "kv-first":
        return kv_cache.unbind(0)
    return kv_cache[:, 0], kv_cache[:, 1]


def _vllm_attention_inputs(gen, num_tokens, hq, hk, d, dtype, device):
    """query, key, value as vLLM's attention layer passes them: split from the fused
    projection and viewed as [N, H, D]."""
    qkv = _rand(gen, num_tokens, (hq + 2 * hk) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)


@pytest.mark.parametrize("layout", ["kv-first", "blocks-first"])
@pytest.mark.parametrize("kv_cache_dtype,storage", [
    ("auto", None),
    ("fp8", torch.uint8),
    ("fp8_e4m3", torch.uint8),
    ("fp8_e5m2", torch.uint8),
    ("fp8", torch.float8_e4m3fn),
])
def test_vllm_reshape_and_cache_flash(backend, layout, kv_cache_dtype, storage):
    device = backend[1]
    g = torch.Generator().manual_seed(6)
    num_blocks, block_size, hk, d = 5, 16, 2, 128
    dtype = torch.bfloat16
    key_cache, value_cache = _vllm_kv_cache(g, layout, num_blocks, block_size, hk, d, storage or dtype, device)
    _, key, value = _vllm_attention_inputs(g, 12, 8, hk, d, dtype, device)
    # 12 padded tokens, 9 slots (the real tokens), one of them a padding slot
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:9]
    slot_mapping[4] = -1
    slot_mapping = slot_mapping.to(device)
    k_scale = torch.tensor(0.37, dtype=torch.float32, device=device)  # layer._k_scale
    v_scale = torch.tensor(1.9, dtype=torch.float32, device=device)
    fp8 = vllm.KV_CACHE_DTYPES[kv_cache_dtype]
    as_cache = (lambda c: c) if fp8 is None else (lambda c: c.view(fp8))
    scales = (None, None) if fp8 is None else (k_scale, v_scale)
    want_k, want_v = ref.store_kv(key[:9], value[:9], as_cache(key_cache), as_cache(value_cache), slot_mapping, *scales)
    vllm.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
    assert torch.equal(ref.bits(key_cache).cpu(), want_k) and torch.equal(ref.bits(value_cache).cpu(), want_v)


def test_vllm_reshape_and_cache_flash_rejects(backend):
    device = backend[1]
    g = torch.Generator().manual_seed(7)
    key_cache, value_cache = _vllm_kv_cache(g, "kv-first", 2, 16, 2, 64, torch.float8_e4m3fn, device)
    _, key, value = _vllm_attention_inputs(g, 3, 2, 2, 64, torch.float16, device)
    slots, one = torch.arange(3, device=device), torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        vllm.reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8_inc", one, one)
    with pytest.raises(TypeError, match="key_cache"):
        vllm.reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8_e5m2", one, one)
    with pytest.raises(TypeError, match="slot_mapping"):
        vllm.reshape_and_cache_flash(key, value, key_cache, value_cache, slots.float(), "fp8", one, one)
    with pytest.raises(TypeError, match="key_cache"):  # "auto" means the caches have key's dtype
        vllm.reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "auto", one, one)


@pytest.mark.parametrize("form", ["flat", "heads", "batched-flat", "batched-heads", "no-key"])
@pytest.mark.parametrize("neox", [True, False])
def test_vllm_rotary_embedding(backend, form, neox):
    """RotaryEmbedding.forward_cuda: ops.rotary_embedding(positions, query, key, head_size,
    cos_sin_cache, is_neox) with the cache in the query's dtype, rotary dim < head size."""
    device = backend[1]
    g = torch.Generator().manual_seed(8)
    B, S, hq, hk, d, rot = 2, 5, 4, 2, 128, 64
    dtype = torch.bfloat16
    cs = cos_sin_cache(512, rot).to(dtype).to(device)
    positions = torch.randint(0, 512, (B * S,), generator=g).to(device)
    query = _rand(g, B * S, hq * d, dtype=dtype, device=device)
    key = _rand(g, B * S, hk * d, dtype=dtype, device=device)
    want_q, slack_q = ref.rope(query.unflatten(1, (hq, d)), positions, cs, neox)
    want_k, slack_k = ref.rope(key.unflatten(1, (hk, d)), positions, cs, neox)
    key_before = key.clone()
    args = dict(flat=(positions, query, key),
                heads=(positions, query.view(-1, hq, d), key.view(-1, hk, d)),
                **{"batched-flat": (positions.view(B, S), query.view(B, S, -1), key.view(B, S, -1)),
                   "batched-heads": (positions.view(B, S), query.view(B, S, hq, d), key.view(B, S, hk, d)),
                   "no-key": (positions, query, None)})[form]
    vllm.rotary_embedding(args[0], args[1], args[2], d, cs, neox)
    ref.assert_close_rope(query.unflatten(1, (hq, d)), want_q, slack_q, "query")
    if form == "no-key":
        assert torch.equal(key, key_before)
    else:
        ref.assert_close_rope(key.unflatten(1, (hk, d)), want_k, slack_k, "key")


def test_vllm_rotary_embedding_needs_a_view():
    query = torch.randn(5, 2, 4 * 64)[:, :, : 2 * 64].transpose(0, 1)  # [B, S, ...] whose B, S cannot merge
    with pytest.raises(ValueError, match="query"):
        vllm.rotary_embedding(torch.zeros(2, 5, dtype=torch.long), query, None, 64, cos_sin_cache(8, 64), True)
