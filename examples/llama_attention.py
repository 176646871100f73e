"""A small Llama-style attention stack with a paged KV cache, run as a real
prefill + decode loop on ropekv.

Per layer and step, one ropekv call rotates q and k (GPT-NeoX / Llama RoPE) and
writes the rotated k and the v into the paged cache; attention is torch's
``scaled_dot_product_attention`` over the keys and values gathered through each
sequence's page table. Decode batches are padded to a CUDA-graph batch size with
padding slots (slot -1: ropekv writes nothing for them).

Every step is checked against recomputing the model from scratch without a cache
(plain torch RoPE, causal attention over each sequence's whole history); the
script prints the largest difference and the decode speed, and exits with 1 if
the difference exceeds the tolerance of the dtype.

    python examples/llama_attention.py                      # CUDA if present, else CPU
    python examples/llama_attention.py --device cpu --layers 2 --decode-steps 4
    python examples/llama_attention.py --kv-cache-dtype fp8  # float8_e4m3fn cache with a scale

Random weights, no tokenizer: tokens are ids into a random embedding table, and
each decode step feeds back the greedy choice of the tied output embedding.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import ropekv

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest difference from the uncached recomputation that still counts as equal,
# relative to the hidden state's magnitude: a few roundings of the dtype, since the
# two paths group the same arithmetic differently (batch shapes, one step at a time).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class Config:
    layers: int = 4
    hq: int = 8  # query heads
    hk: int = 2  # key/value heads (grouped-query attention)
    head_dim: int = 64
    vocab: int = 1000
    rope_theta: float = 500000.0
    max_pos: int = 4096
    page_size: int = 16
    num_pages: int = 64
    kv_scale: float = 1.0  # fp8 caches only

    @property
    def hidden(self) -> int:
        return self.hq * self.head_dim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def cos_sin_cache(cfg: Config, device: torch.device) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos(p f_i) for i < D/2, then sin(p f_i)."""
    d = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(cfg.max_pos, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=1).float().to(device)


class Weights:
    """Random weights of the embedding, the attention layers and the norms."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        h, qkv = cfg.hidden, (cfg.hq + 2 * cfg.hk) * cfg.head_dim
        self.embed = rand(cfg.vocab, h, scale=1.0)
        self.norm = [rand(h, scale=0.1).add(1) for _ in range(cfg.layers)]
        self.w_qkv = [rand(qkv, h, scale=h**-0.5) for _ in range(cfg.layers)]
        self.w_o = [rand(h, cfg.hq * cfg.head_dim, scale=(cfg.hq * cfg.head_dim) ** -0.5) for _ in range(cfg.layers)]
        self.final_norm = rand(h, scale=0.1).add(1)


class PagedKVCache:
    """Per-layer K and V caches of [num_pages, page_size, hk, head_dim], and each
    sequence's page table; slot = page * page_size + offset."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_pages, cfg.page_size, cfg.hk, cfg.head_dim)
        self.cfg, self.dtype = cfg, dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        fp8 = dtype.itemsize == 1
        # A tensor scale is read on the device: safe to change between CUDA-graph replays.
        self.scale = torch.tensor([cfg.kv_scale], device=device) if fp8 else None
        self.free = list(range(cfg.num_pages - 1, -1, -1))
        self.pages: Dict[int, List[int]] = {}
        self.device = device

    def slots(self, seq: int, start: int, n: int) -> torch.Tensor:
        """Slots of tokens start..start+n-1 of a sequence, allocating pages as needed."""
        table = self.pages.setdefault(seq, [])
        ps = self.cfg.page_size
        while len(table) * ps < start + n:
            table.append(self.free.pop())
        pos = torch.arange(start, start + n)
        pages = torch.tensor(table)[pos // ps]
        return (pages * ps + pos % ps).to(self.device)

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype):
        """The keys and values at `slots`, as [L, hk, head_dim] of the model's dtype."""
        k = self.k[layer].flatten(0, 1)[slots]
        v = self.v[layer].flatten(0, 1)[slots]
        if self.scale is not None:
            return k.to(dtype) * self.scale.to(dtype), v.to(dtype) * self.scale.to(dtype)
        return k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, hq: int) -> torch.Tensor:
    """Causal attention of q [n, hq, d] at positions q_pos over k, v [L, hk, d] at 0..L-1."""
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1).flatten(1)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    id: int
    tokens: List[int]


class Model:
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.w = Weights(cfg, device, dtype)
        self.cos_sin = cos_sin_cache(cfg, device)
        self.cache = PagedKVCache(cfg, device, cache_dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor,
                rows: List[Optional[Sequence]]) -> torch.Tensor:
        """The cached forward pass of a batch: RoPE and the KV write by ropekv, attention
        over the paged cache. rows[i] is the sequence of token i (None: padding).
        Returns the final hidden state of every row."""
        cfg, w = self.cfg, self.w
        d, q_size, kv_size = cfg.head_dim, cfg.hq * cfg.head_dim, cfg.hk * cfg.head_dim
        # Each sequence's rows in the batch, and the slots of its whole history.
        groups = [(idx, self.cache.slots(seq.id, 0, int(positions[idx[-1]]) + 1))
                  for seq, idx in _rows_by_sequence(rows).items()]
        x = w.embed[tokens]
        for layer in range(cfg.layers):
            qkv = rms_norm(x, w.norm[layer]) @ w.w_qkv[layer].T
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # views: no copies
            ropekv.apply_rope_with_cos_sin_cache_inplace(
                positions, q, k, d, self.cos_sin, is_neox=True,
                fused_set_kv_buffer_arg=ropekv.FusedSetKVBufferArg(
                    value=v, k_buffer=self.cache.k[layer], v_buffer=self.cache.v[layer],
                    k_scale=self.cache.scale, v_scale=self.cache.scale, cache_loc=loc),
            )
            out = torch.zeros(x.shape[0], q_size, dtype=x.dtype, device=x.device)
            for idx, history in groups:
                k_all, v_all = self.cache.gather(layer, history, self.dtype)
                out[idx] = attend(q[idx].unflatten(1, (cfg.hq, d)), k_all, v_all, positions[idx], cfg.hq)
            x = x + out @ w.w_o[layer].T
        return rms_norm(x, w.final_norm)

    def recompute(self, tokens: List[int]) -> torch.Tensor:
        """The model on one sequence from scratch, without a cache: plain torch RoPE and
        causal attention over all its tokens. Returns every token's final hidden state."""
        cfg, w = self.cfg, self.w
        d, q_size, kv_size = cfg.head_dim, cfg.hq * cfg.head_dim, cfg.hk * cfg.head_dim
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.arange(len(tokens), device=self.device)
        x = w.embed[ids]
        for layer in range(cfg.layers):
            qkv = rms_norm(x, w.norm[layer]) @ w.w_qkv[layer].T
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = rope_reference(q.unflatten(1, (cfg.hq, d)), positions, self.cos_sin)
            k = rope_reference(k.unflatten(1, (cfg.hk, d)), positions, self.cos_sin)
            v = v.unflatten(1, (cfg.hk, d))
            if self.cache.scale is not None:  # what an fp8 cache holds
                s = self.cache.scale.to(self.dtype)
                k = (k.float() / self.cache.scale).to(self.cache.dtype).to(self.dtype) * s
                v = (v.float() / self.cache.scale).to(self.cache.dtype).to(self.dtype) * s
            x = x + attend(q, k, v, positions, cfg.hq) @ w.w_o[layer].T
        return rms_norm(x, w.final_norm)

    def next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.w.embed.T).argmax(-1)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotation of x [n, h, d] in float32, rounded once to x's dtype."""
    half = cos_sin.shape[1] // 2
    cos, sin = cos_sin[positions][:, None, :half], cos_sin[positions][:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _rows_by_sequence(rows: List[Optional[Sequence]]) -> Dict[Sequence, List[int]]:
    groups: Dict[Sequence, List[int]] = {}
    for i, seq in enumerate(rows):
        if seq is not None:
            groups.setdefault(seq, []).append(i)
    return groups


def graph_batch_size(n: int) -> int:
    """The smallest captured CUDA-graph batch size that holds n tokens."""
    return next(b for b in GRAPH_BATCH_SIZES if b >= n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> Dict[str, float]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype
    longest = args.max_prompt + args.decode_steps
    cfg = Config(layers=args.layers, kv_scale=0.5 if args.kv_cache_dtype == "fp8" else 1.0,
                 max_pos=longest, num_pages=args.seqs * -(-longest // Config.page_size))
    model = Model(cfg, device, dtype, cache_dtype)
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(3, args.max_prompt + 1, (args.seqs,), generator=g)]
    seqs = [Sequence(i, torch.randint(0, cfg.vocab, (n,), generator=g).tolist()) for i, n in enumerate(lengths)]
    tol = TOLERANCE[dtype]
    worst = 0.0

    def check(what: str, seq: Sequence, got: torch.Tensor, first: int) -> None:
        nonlocal worst
        want = model.recompute(seq.tokens)[first:]
        diff = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        worst = max(worst, diff)
        if args.verbose or diff > tol:
            print(f"  {what}, sequence {seq.id}: max |difference| / max |hidden| = {diff:.3g}")

    # Prefill: all prompts in one ragged batch.
    rows: List[Optional[Sequence]] = [s for s in seqs for _ in s.tokens]
    tokens = torch.tensor([t for s in seqs for t in s.tokens], device=device)
    positions = torch.cat([torch.arange(len(s.tokens)) for s in seqs]).to(device)
    loc = torch.cat([model.cache.slots(s.id, 0, len(s.tokens)) for s in seqs])
    with torch.inference_mode():
        hidden = model.forward(tokens, positions, loc, rows)
        ends = torch.tensor(lengths).cumsum(0) - 1
        start = 0
        for s in seqs:
            check("prefill", s, hidden[start:start + len(s.tokens)], 0)
            start += len(s.tokens)
        next_ids = model.next_token(hidden[ends.to(device)]).tolist()
        print(f"prefill: {len(seqs)} sequences, {sum(lengths)} tokens; max difference {worst:.3g}")

        # Decode: one token per sequence per step, the batch padded with slot -1.
        batch = graph_batch_size(len(seqs))
        pad = batch - len(seqs)
        decode_time, decoded = 0.0, 0
        for step in range(args.decode_steps):
            for s, t in zip(seqs, next_ids):
                s.tokens.append(t)
            pos = [len(s.tokens) - 1 for s in seqs]
            tokens = torch.tensor([s.tokens[-1] for s in seqs] + [0] * pad, device=device)
            positions = torch.tensor(pos + [0] * pad, device=device)
            loc = torch.cat([model.cache.slots(s.id, p, 1) for s, p in zip(seqs, pos)]
                            + [torch.full((pad,), -1, device=device)])
            _sync(device)
            t0 = time.perf_counter()
            hidden = model.forward(tokens, positions, loc, list(seqs) + [None] * pad)
            next_ids = model.next_token(hidden[: len(seqs)]).tolist()
            _sync(device)
            decode_time += time.perf_counter() - t0
            decoded += len(seqs)
            for i, s in enumerate(seqs):
                check(f"decode step {step}", s, hidden[i:i + 1], len(s.tokens) - 1)
        rate = decoded / decode_time if decode_time else float("inf")
    print(f"decode: {args.decode_steps} steps of {len(seqs)} sequences (batch padded to {batch}), "
          f"{decoded} tokens in {decode_time:.3f} s: {rate:.1f} tokens/s")
    print(f"max difference from recomputing without a cache: {worst:.3g} of the largest hidden value "
          f"(tolerance {tol:g}; {dtype}, cache {cache_dtype}, {device})")
    return {"max_diff": worst, "tolerance": tol, "tokens_per_s": rate}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="auto: the model's dtype; fp8: float8_e4m3fn with a scale")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqs", type=int, default=5)
    p.add_argument("--max-prompt", type=int, default=40)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--verbose", action="store_true", help="print every check")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    result = run(parse_args(argv))
    return 0 if result["max_diff"] <= result["tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
