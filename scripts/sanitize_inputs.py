#!/usr/bin/env python3
"""Out-of-range slots and positions, for compute-sanitizer (scripts/sanitize.sh).

Calls every entry point (store_kv, RoPE alone, RoPE fused with the cache write,
rope_and_store) on bf16 and fp8 caches, flat, 2-D and paged, with int32 and
int64 indices, passing slots >= S, slots < 0 and positions past the end of the
cos/sin cache (and before its start); small calls, and calls of thousands of
tokens (the CUDA row kernel for narrow heads; store_kv), whose outputs are
compared with the CPU backend's. SPEC.md: such a slot is skipped, such a
token is left unrotated, and nothing outside the caches or the cos/sin cache is
read or written.

Every tensor is its own, exactly sized allocation (contiguous, no views into
larger buffers) and torch's caching allocator is off
(PYTORCH_NO_CUDA_MEMORY_CACHING=1, set here before torch loads when the caller
has not), so each tensor is one cudaMalloc whose bounds memcheck knows: any
access past a tensor is reported. The results are checked too, so the script
also fails (exit status 1) without the sanitizer when a kernel misbehaves.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_inputs.py
    python3 scripts/sanitize_inputs.py --device cpu        # the same checks on the CPU backend

Prints one line, "sanitize_inputs: OK (...)", when all is well.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

import ropekv  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}


def cos_sin_cache(max_pos: int, rot: int, device) -> torch.Tensor:
    inv_freq = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(F32).to(device)


def bad_slots(index_dtype, slots):
    big = [2**31 - 1, -(2**31)] if index_dtype == torch.int32 else [2**31, 2**32, 2**40 + 3, 2**63 - 1, -(2**63)]
    return [slots, slots + 1, slots + 1000, -1, -2, *big]


def bad_positions(index_dtype, max_pos):
    big = [2**31 - 1, -(2**31)] if index_dtype == torch.int32 else [2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
    return [max_pos, max_pos + 1, max_pos + 4096, -1, *big]


def converted(x: torch.Tensor, cache_dtype, scale: float) -> torch.Tensor:
    """What a cache of cache_dtype holds for x (SPEC.md section 2)."""
    if cache_dtype == x.dtype:
        return x
    q = x.float() / torch.tensor(scale, dtype=F32, device=x.device)
    return q.clamp(-FP8_MAX[cache_dtype], FP8_MAX[cache_dtype]).to(cache_dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class Checker:
    def __init__(self):
        self.calls = 0
        self.failures = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def run_case(c: Checker, device, index_dtype, cache_dtype, layout, api, hk, d, hv, dv, rot, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = BF16
    slots, max_pos, page = 16, 40, 4
    slot_list = [3, 0, slots - 1, 7] + bad_slots(index_dtype, slots)
    pos_list = [0, max_pos - 1, 5] + bad_positions(index_dtype, max_pos)
    n = max(len(slot_list), len(pos_list))
    slot_list = (slot_list + [-1] * n)[:n]
    pos_list = (pos_list + [1] * n)[:n][::-1]  # bad positions on other tokens than bad slots

    def rand(*shape, dt=dtype, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dt).to(device)

    q, k = rand(n, 2 * hk, d), rand(n, hk, d)
    v = rand(n, hv * dv)  # 2-D value: [T, Hv*Dv]
    shapes = {"3d": ((slots, hk, d), (slots, hv, dv)), "2d": ((slots, hk * d), (slots, hv * dv)),
              "paged": ((slots // page, page, hk, d), (slots // page, page, hv, dv))}[layout]
    k_cache, v_cache = rand(*shapes[0], dt=cache_dtype, scale=2.0), rand(*shapes[1], dt=cache_dtype, scale=2.0)
    cs = cos_sin_cache(max_pos, rot, device)
    loc = torch.tensor(slot_list, dtype=index_dtype, device=device)
    pos = torch.tensor(pos_list, dtype=index_dtype, device=device)
    fp8 = cache_dtype in FP8_MAX
    k_scale = torch.full((hk,), 0.5, device=device) if fp8 else None  # per-head, read on the device
    v_scale = 2.0 if fp8 else None
    q0, k0, v0, kc0, vc0 = q.clone(), k.clone(), v.clone(), k_cache.clone(), v_cache.clone()

    if api == "store":
        ropekv.store_kv(k, v, k_cache, v_cache, loc, k_scale=k_scale, v_scale=v_scale)
    elif api == "rope":
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cs, True)
    elif api == "fused":
        arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=k_cache, v_buffer=v_cache, k_scale=k_scale,
                                         v_scale=v_scale, cache_loc=loc)
        ropekv.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cs, False, arg)
    else:
        ropekv.rope_and_store(pos, q, k, cs, head_size=d, v=v, k_cache=k_cache, v_cache=v_cache, loc=loc,
                              k_scale=k_scale, v_scale=v_scale)
    if device.type == "cuda":
        torch.cuda.synchronize()
    c.calls += 1
    # The checks run on CPU copies: few kernels besides ropekv's under the sanitizer.
    q, k, v, k_cache, v_cache, q0, k0, v0, kc0, vc0 = (
        x.cpu() for x in (q, k, v, k_cache, v_cache, q0, k0, v0, kc0, vc0))
    what = f"{api} {layout} cache {cache_dtype} index {index_dtype} Hk={hk} D={d} Hv={hv} Dv={dv} R={rot}"

    # Rotation: tokens with a position outside [0, max_pos) are unchanged, the others rotated.
    rotates = api != "store"
    for t, p in enumerate(pos_list):
        inside = 0 <= p < max_pos
        for x, x0, name in ((q, q0, "query"), (k, k0, "key")):
            unchanged = same_bits(x[t], x0[t])
            if not rotates or not inside:
                c.expect(unchanged, f"{what}: {name}[{t}] (position {p}) changed")
            elif p != 0:
                c.expect(not unchanged and bool(torch.isfinite(x[t].float()).all()), f"{what}: {name}[{t}] not rotated")
            if inside and rotates:
                c.expect(same_bits(x[t][..., rot:], x0[t][..., rot:]), f"{what}: {name}[{t}] tail changed")
    # The caches: named slots hold the (rotated) key and the value, every other slot is unchanged.
    writes = api != "rope"
    kc, vc = k_cache.reshape(slots, -1), v_cache.reshape(slots, -1)
    kc_before, vc_before = kc0.reshape(slots, -1), vc0.reshape(slots, -1)
    named = {}
    for t, s in enumerate(slot_list):
        if writes and 0 <= s < slots:
            named[s] = t
    for s in range(slots):
        if s in named:
            t = named[s]
            want_k = torch.cat([converted(k[t, h], cache_dtype, 0.5 if fp8 else 1.0) for h in range(hk)])
            c.expect(same_bits(kc[s], want_k), f"{what}: k_cache slot {s} is not token {t}")
            c.expect(same_bits(vc[s], converted(v[t], cache_dtype, v_scale or 1.0)), f"{what}: v_cache slot {s}")
        else:
            c.expect(same_bits(kc[s], kc_before[s]) and same_bits(vc[s], vc_before[s]), f"{what}: slot {s} written")
    c.expect(same_bits(v, v0), f"{what}: value changed")


def run_rows_case(c: Checker, device, index_dtype, cache_dtype, layout, api, hq, d, rot, dv, seed):
    """A call large enough for the CUDA row kernel (at least 32 tokens per SM, narrow
    heads; store_kv too), with bad slots and positions spread over it; every output
    compared bit for bit with the same call on the CPU backend."""
    g = torch.Generator().manual_seed(seed)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    n, hk, hv, page, max_pos = 32 * sms + 37, 8, 8, 16, 4096
    slots = (n + 64 + page - 1) // page * page
    loc = torch.randperm(slots, generator=g)[:n]
    pos = torch.randint(0, max_pos, (n,), generator=g)
    for i, bad in enumerate(bad_slots(index_dtype, slots)):
        loc[(97 * i + 5) % n] = bad
    for i, bad in enumerate(bad_positions(index_dtype, max_pos)):
        pos[(89 * i + 11) % n] = bad
    qkv = torch.randn(n, (hq + hk) * d + hv * dv, generator=g).to(BF16)
    shape_k = (slots // page, page, hk, d) if layout == "paged" else (slots, hk, d)
    shape_v = (slots // page, page, hv, dv) if layout == "paged" else (slots, hv, dv)
    k_cache, v_cache = (2 * torch.randn(*shape_k, generator=g)).to(cache_dtype), (2 * torch.randn(*shape_v, generator=g)).to(cache_dtype)
    fp8 = cache_dtype in FP8_MAX
    inputs = dict(qkv=qkv, k_cache=k_cache, v_cache=v_cache, loc=loc.to(index_dtype), pos=pos.to(index_dtype),
                  cs=cos_sin_cache(max_pos, rot, "cpu"), k_scale=torch.full((hk,), 0.5) if fp8 else None)
    results = []
    for dev in (device, torch.device("cpu")):
        x = {key: (t.to(dev) if t is not None else None) for key, t in inputs.items()}
        qkv_d = x["qkv"]
        q, k, v = qkv_d[:, : hq * d], qkv_d[:, hq * d : (hq + hk) * d], qkv_d[:, (hq + hk) * d :]
        v_scale = 2.0 if fp8 else None
        if api == "rope":
            ropekv.apply_rope_with_cos_sin_cache_inplace(x["pos"], q, k, d, x["cs"], True)
        elif api == "store":
            ropekv.store_kv(k, v, x["k_cache"], x["v_cache"], x["loc"], k_scale=x["k_scale"], v_scale=v_scale)
        elif api == "fused":
            arg = ropekv.FusedSetKVBufferArg(value=v, k_buffer=x["k_cache"], v_buffer=x["v_cache"],
                                             k_scale=x["k_scale"], v_scale=v_scale, cache_loc=x["loc"])
            ropekv.apply_rope_with_cos_sin_cache_inplace(x["pos"], q, k, d, x["cs"], True, arg)
        else:
            ropekv.rope_and_store(x["pos"], q, k, x["cs"], head_size=d, v=v, k_cache=x["k_cache"],
                                  v_cache=x["v_cache"], loc=x["loc"], k_scale=x["k_scale"], v_scale=v_scale)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        results.append([x[key].cpu() for key in ("qkv", "k_cache", "v_cache")])
        if device.type == "cpu":
            break
    c.calls += 1
    what = f"rows {api} {layout} cache {cache_dtype} index {index_dtype} T={n} Hq={hq} D={d} R={rot} Dv={dv}"
    for name, a, b in zip(("q/k/v", "k_cache", "v_cache"), results[0], results[-1]):
        c.expect(same_bits(a, b), f"{what}: {name} differs from the CPU backend")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="native", choices=["native", "torch", "auto"],
                    help="ROPEKV_BACKEND for the calls (default native: the compiled kernels)")
    args = ap.parse_args()
    os.environ["ROPEKV_BACKEND"] = args.backend
    device = torch.device(args.device)
    c = Checker()
    seed = 0
    # Head layouts: common (wide, vectorized path) and odd sizes (narrow path), partial rotary.
    heads = [(8, 128, 8, 128, 128), (2, 80, 1, 64, 64), (1, 66, 3, 18, 34)]
    for index_dtype in (torch.int32, torch.int64):
        for cache_dtype in (BF16, E4M3, E5M2):
            for layout in ("3d", "2d", "paged"):
                for api in ("store", "rope", "fused", "native"):
                    if api == "rope" and (cache_dtype != BF16 or layout != "3d"):
                        continue  # RoPE alone has no cache
                    for hk, d, hv, dv, rot in heads:
                        seed += 1
                        run_case(c, device, index_dtype, cache_dtype, layout, api, hk, d, hv, dv, rot, seed)
    # Large calls: narrow heads (the CUDA row kernel when they rotate and write the
    # cache), full and partial rotation; store_kv.
    for index_dtype in (torch.int32, torch.int64):
        for cache_dtype in (BF16, E4M3):
            for layout in ("3d", "paged"):
                for api in ("rope", "fused", "native", "store"):
                    if api == "rope" and (cache_dtype != BF16 or layout != "3d"):
                        continue
                    for hq, d, rot, dv in ((64, 64, 64, 64), (16, 128, 64, 32)):
                        seed += 1
                        run_rows_case(c, device, index_dtype, cache_dtype, layout, api, hq, d, rot, dv, seed)
    if c.failures:
        for f in c.failures[:20]:
            print("FAIL", f)
        print(f"sanitize_inputs: {len(c.failures)} failures in {c.calls} calls on {device}")
        return 1
    print(f"sanitize_inputs: OK ({c.calls} calls on {device}, backend {args.backend}, "
          f"torch {torch.__version__}, caching allocator {'off' if os.environ['PYTORCH_NO_CUDA_MEMORY_CACHING'] == '1' else 'on'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
