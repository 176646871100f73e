"""Benchmark of ropekv's kernels against plain torch: ``python -m ropekv bench``.

For each model shape, cache dtype and token count it times five variants:

- ``store_kv``: ropekv.store_kv alone (K and V into the cache, one launch);
- ``rope``: ropekv.apply_rope_with_cos_sin_cache_inplace without the cache write;
- ``fused``: the same call with FusedSetKVBufferArg (RoPE and the cache write in one launch);
- ``unfused``: ``rope`` then ``store_kv`` (two launches);
- ``torch``: what an engine does without these kernels: RoPE in plain torch ops (neox style)
  and ``k_cache[loc] = k; v_cache[loc] = v``.

Every ropekv variant is first checked against the torch baseline on the same data; a variant
that fails is reported loudly and not timed. benchmarks/README.md describes the method (CUDA
graphs of 50 calls, CUDA-event medians, L2 rotation, how bytes are counted, the copy
baseline); this file is the method, so keep the two in step.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import ropekv

# name: (Hq, Hk, Hv, D, rope base). The base only shapes the cos/sin values; any works.
SHAPES = {
    "llama-3.1-8b": (32, 8, 8, 128, 500000.0),
    "gpt-oss": (64, 8, 8, 64, 150000.0),
}
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
INPUT_DTYPE = torch.bfloat16
VARIANTS = ("store_kv", "rope", "fused", "unfused", "torch")

TOKENS = {
    ("cuda", "quick"): [1, 32, 512, 8192, 32768],
    ("cuda", "full"): [1, 8, 32, 128, 512, 2048, 8192, 32768],
    ("cpu", "quick"): [1, 32, 512, 2048],
    ("cpu", "full"): [1, 8, 32, 128, 512, 2048, 8192],
}
# A long-context model's cos/sin table: far larger than one call needs, as in an engine, so
# the rows a call reads are scattered and (for large positions) not in cache.
MAX_POS = 131072
# Cache slots: max(2 * tokens, MIN_SLOTS). A CPU run keeps them smaller: the CPU path must finish
# in well under a minute on two cores, and every check clones the caches.
MIN_SLOTS = {"cuda": 65536, "cpu": 16384}
# Not a power of two, so a kernel that multiplies by 1/scale instead of dividing (SPEC §2)
# has a chance to fail the bit-exact fp8 check.
FP8_SCALE = 0.75

# CUDA timing. 50 calls per graph amortize the replay launch; at least 15 timed replays.
CALLS_PER_GRAPH = 50
REPLAYS = {"quick": 15, "full": 40}
WARMUP_REPLAYS = 3
# A CUDA measurement whose replays spread by more than MAX_SPREAD (interquartile range over the
# median) is taken again, up to RETIMES more times, and the steadiest one is kept: a transient
# on the machine should not become the figure (seen on the H100: one store_kv measurement at
# 512 tokens with replays from 2.6 to 6.5 µs, median 3.8, where other runs measured 2.4-2.5).
MAX_SPREAD = 0.10
RETIMES = 2
# A call whose data is larger than L2 cannot find it there in a model either: such cases rotate
# among enough buffer sets that the data touched by the 50 calls of one replay is
# ROTATE_FACTOR x L2, so the timing is of HBM, not of L2. A call whose data fits in L2 finds it
# there in an engine too (q, k, v were just written by the QKV projection; positions, loc and
# the cos/sin rows are shared by every layer), so those cases reuse one set, unless --cold-l2
# asks for rotation at every size.
ROTATE_FACTOR = 4
COLD_L2 = False
SET_MEMORY_FRACTION = 0.4  # of free GPU memory, for the rotated sets; the rest for graphs/checks
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}

# CPU timing: perf_counter per call, median; at least CPU_MIN_REPS calls, more while time is left.
CPU_BUDGET_S = {"quick": 0.08, "full": 0.25}
CPU_MIN_REPS = {"quick": 5, "full": 10}
CPU_MAX_REPS = 500

# q/k after RoPE vs the torch baseline: bf16 tolerance (the kernel may round differently in
# the last bf16 place); caches are compared bit for bit.
RTOL, ATOL = 1.6e-2, 1e-3


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Case:
    shape: str
    hq: int
    hk: int
    hv: int
    d: int
    cache_name: str
    cache_dtype: torch.dtype
    tokens: int
    slots: int

    @property
    def label(self) -> str:
        return f"{self.shape} {self.cache_name} T={self.tokens}"


@dataclasses.dataclass
class Buffers:
    """Everything one call touches, with the views each API takes.

    q, k and v are views into one fused qkv tensor, as an engine's QKV projection leaves them.
    """

    qkv: torch.Tensor  # [T, (Hq + Hk + Hv) * D]
    positions: torch.Tensor  # [T] int64, random in [0, MAX_POS)
    loc: torch.Tensor  # [T] int64, distinct random slots
    k_cache: torch.Tensor  # [S, Hk, D]
    v_cache: torch.Tensor  # [S, Hv, D]
    k_scale: Optional[torch.Tensor]
    v_scale: Optional[torch.Tensor]
    hq: int
    hk: int
    hv: int
    d: int

    def __post_init__(self) -> None:
        t, d = self.qkv.shape[0], self.d
        a, b = self.hq * d, (self.hq + self.hk) * d
        self.q2, self.k2, self.v2 = self.qkv[:, :a], self.qkv[:, a:b], self.qkv[:, b:]
        self.q3 = self.q2.view(t, self.hq, d)
        self.k3 = self.k2.view(t, self.hk, d)
        self.v3 = self.v2.view(t, self.hv, d)
        # Built once: the CPU timings would otherwise include constructing it.
        self.fused_arg = ropekv.FusedSetKVBufferArg(
            value=self.v2, k_buffer=self.k_cache, v_buffer=self.v_cache,
            k_scale=self.k_scale, v_scale=self.v_scale, cache_loc=self.loc)

    def clone(self) -> "Buffers":
        """A copy whose qkv and caches can be mutated without touching this one."""
        return Buffers(self.qkv.clone(), self.positions, self.loc, self.k_cache.clone(),
                       self.v_cache.clone(), self.k_scale, self.v_scale, self.hq, self.hk, self.hv, self.d)


def random_tensor(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard-normal values in ``dtype``: finite, never all zeros, in range for fp8.

    On the CPU, large tensors repeat one random block: torch.randn makes only ~100 M values/s
    on a small machine, and the exact values matter to neither timing nor the checks.
    """
    gen_dtype = torch.bfloat16 if dtype.itemsize == 1 else dtype  # no randn for fp8
    n = math.prod(shape)
    block = 1 << 20
    if device.type != "cpu" or n <= block:
        return torch.randn(shape, dtype=gen_dtype, device=device).to(dtype)
    out = torch.empty(n, dtype=dtype)
    src = torch.randn(block, dtype=gen_dtype).to(dtype)
    whole = n // block * block
    out[:whole].view(-1, block).copy_(src)
    out[whole:].copy_(src[: n - whole])
    return out.view(shape)


def make_buffers(case: Case, device: torch.device, k_scale, v_scale) -> Buffers:
    t = case.tokens
    width = (case.hq + case.hk + case.hv) * case.d
    return Buffers(
        qkv=random_tensor((t, width), INPUT_DTYPE, device),
        positions=torch.randint(0, MAX_POS, (t,), dtype=torch.int64, device=device),
        loc=torch.randperm(case.slots, device=device)[:t].contiguous(),
        k_cache=random_tensor((case.slots, case.hk, case.d), case.cache_dtype, device),
        v_cache=random_tensor((case.slots, case.hv, case.d), case.cache_dtype, device),
        k_scale=k_scale, v_scale=v_scale, hq=case.hq, hk=case.hk, hv=case.hv, d=case.d)


def make_cos_sin(d: int, base: float, device: torch.device) -> torch.Tensor:
    """[MAX_POS, D] fp32; row p = cos(p f_i) for i < D/2, then sin(p f_i) (sgl-kernel's layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float64, device=device), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=1).float().contiguous()


# ----------------------------------------------------------------------------- variants


def torch_rope(positions: torch.Tensor, q3: torch.Tensor, k3: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Neox-style RoPE in plain torch ops, as engines' native fallbacks write it (fp32 math)."""
    half = cos_sin.shape[1] // 2
    rows = cos_sin[positions]
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    for x in (q3, k3):
        f = x.float()
        a, b = f[..., :half], f[..., half:]
        x.copy_(torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1))


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """SPEC §2's convert: a copy for the same dtype; fp8 = saturate(fp32(x) / scale), RNE."""
    if dtype == x.dtype:
        return x
    assert scale is not None, "an fp8 conversion needs its scale"
    m = torch.finfo(dtype).max
    # Dividing by a tensor keeps it a true division (torch may use a reciprocal for a Python float).
    return (x.float() / scale).clamp(-m, m).to(dtype)


def torch_store(k3, v3, k_cache, v_cache, loc, k_scale, v_scale) -> None:
    """``k_cache[loc] = k; v_cache[loc] = v`` (with the fp8 conversion when the cache is fp8)."""
    for x, cache, scale in ((k3, k_cache, k_scale), (v3, v_cache, v_scale)):
        y = to_cache_dtype(x, cache.dtype, scale)
        if cache.dtype.itemsize == 1:
            # index_put lacks fp8 kernels in some torch builds; engines store fp8 as bytes too.
            cache.view(torch.uint8)[loc] = y.view(torch.uint8)
        else:
            cache[loc] = y


# --pdl: ropekv's kernels launch with programmatic dependent launch (sm_90+).
PDL = False


def make_variants(d: int, cos_sin: torch.Tensor) -> Dict[str, Callable[[Buffers], None]]:
    rope_fn = ropekv.apply_rope_with_cos_sin_cache_inplace
    pdl = PDL

    def store_kv(b: Buffers) -> None:
        ropekv.store_kv(b.k3, b.v3, b.k_cache, b.v_cache, b.loc, k_scale=b.k_scale, v_scale=b.v_scale,
                        enable_pdl=pdl)

    def rope(b: Buffers) -> None:
        rope_fn(b.positions, b.q2, b.k2, d, cos_sin, True, None, pdl)

    def fused(b: Buffers) -> None:
        rope_fn(b.positions, b.q2, b.k2, d, cos_sin, True, b.fused_arg, pdl)

    def unfused(b: Buffers) -> None:
        rope(b)
        store_kv(b)

    def baseline(b: Buffers) -> None:
        torch_rope(b.positions, b.q3, b.k3, cos_sin)
        torch_store(b.k3, b.v3, b.k_cache, b.v_cache, b.loc, b.k_scale, b.v_scale)

    return {"store_kv": store_kv, "rope": rope, "fused": fused, "unfused": unfused, "torch": baseline}


def bytes_moved(case: Case, variant: str) -> int:
    """The least traffic a variant can have: each input read once, each output written once.

    The caches count only the slots written; the cos/sin table only the T fp32 rows used.
    ``unfused`` and ``torch`` are two passes, so k is read twice (once per pass).
    """
    t, eb, cb = case.tokens, INPUT_DTYPE.itemsize, case.cache_dtype.itemsize
    q, k, v = (t * h * case.d * eb for h in (case.hq, case.hk, case.hv))
    k_cache, v_cache = t * case.hk * case.d * cb, t * case.hv * case.d * cb
    cos_sin = t * case.d * 4
    index = t * 8  # int64 positions or loc
    store = k + v + k_cache + v_cache + index  # read k, v, loc; write both caches
    rope = 2 * q + 2 * k + cos_sin + index  # read+write q, k; read cos/sin rows, positions
    return {"store_kv": store, "rope": rope, "fused": rope + store - k}.get(variant, rope + store)


def footprint(case: Case) -> int:
    """Bytes one call touches (each once): what must not stay in L2 between calls."""
    t, eb, cb = case.tokens, INPUT_DTYPE.itemsize, case.cache_dtype.itemsize
    return (t * (case.hq + case.hk + case.hv) * case.d * eb + t * (case.hk + case.hv) * case.d * cb
            + t * case.d * 4 + 2 * t * 8)


def allocation(case: Case) -> int:
    """Bytes one buffer set allocates (the whole caches, not just the slots written)."""
    width = (case.hq + case.hk + case.hv) * case.d
    return (case.tokens * width * INPUT_DTYPE.itemsize + case.slots * (case.hk + case.hv) * case.d
            * case.cache_dtype.itemsize + 2 * case.tokens * 8)


# ----------------------------------------------------------------------------- correctness


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _compare_cache(name: str, got: torch.Tensor, want: torch.Tensor, loc: torch.Tensor) -> Optional[str]:
    """Bit-exact, whole cache: the written slots and every slot that must be left alone."""
    bad = (_bits(got) != _bits(want)).flatten(1).any(1)
    if not bool(bad.any()):
        return None
    written = torch.zeros_like(bad)
    written[loc] = True
    n_written = int((bad & written).sum())
    n_other = int((bad & ~written).sum())
    first = int(bad.nonzero()[0, 0])
    return (f"{name}: {n_written} of {loc.numel()} written slots and {n_other} untouched slots differ "
            f"from the expected bits (first bad slot {first})")


def _compare_close(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    g, w = got.float(), want.float()
    bad = ~((g - w).abs() <= ATOL + RTOL * w.abs())  # also catches NaN
    if not bool(bad.any()):
        return None
    return (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ from the torch baseline beyond "
            f"rtol={RTOL} atol={ATOL} (max abs diff {float((g - w).abs().nan_to_num(float('inf')).max()):.4g})")


def _compare_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if torch.equal(_bits(got), _bits(want)):
        return None
    return f"{name}: changed, but must not be"


def check_variants(base: Buffers, variants: Dict[str, Callable[[Buffers], None]]) -> Dict[str, Optional[str]]:
    """Runs each ropekv variant once on a copy of ``base`` and compares with the torch baseline.

    The caches start as random garbage (no NaNs), so a slot the kernel forgot to write, or one
    it should not have written, shows up. Returns variant -> None (passed) or what failed.
    """
    ref = base.clone()
    variants["torch"](ref)
    outs: Dict[str, Buffers] = {}
    result: Dict[str, Optional[str]] = {}
    for name in VARIANTS:
        if name == "torch":
            continue
        out = base.clone()
        try:
            variants[name](out)
        except Exception as e:  # a raise here is a failure to report, not a crash
            result[name] = f"raised {type(e).__name__}: {e}"
            continue
        outs[name] = out
        problems = [_compare_equal("v (input)", out.v2, base.v2)]
        if name == "store_kv":
            problems += [_compare_equal("q (input)", out.q2, base.q2), _compare_equal("k (input)", out.k2, base.k2)]
        else:
            problems += [_compare_close("q after RoPE", out.q2, ref.q2), _compare_close("k after RoPE", out.k2, ref.k2)]
        if name != "rope":
            # The cache must hold exactly the key this variant produced (rotated or not) and
            # the value, converted per SPEC §2, and nothing else may have changed.
            want_k, want_v = base.k_cache.clone(), base.v_cache.clone()
            torch_store(out.k3, base.v3, want_k, want_v, base.loc, base.k_scale, base.v_scale)
            problems += [_compare_cache("k_cache", out.k_cache, want_k, base.loc),
                         _compare_cache("v_cache", out.v_cache, want_v, base.loc)]
        else:
            problems += [_compare_equal("k_cache", out.k_cache, base.k_cache),
                         _compare_equal("v_cache", out.v_cache, base.v_cache)]
        result[name] = "; ".join(p for p in problems if p) or None
    # SPEC §3: the fused launch is bit-identical to RoPE then store_kv.
    if result.get("fused") is None and result.get("unfused") is None:
        f, u = outs["fused"], outs["unfused"]
        if not (torch.equal(_bits(f.qkv), _bits(u.qkv)) and torch.equal(_bits(f.k_cache), _bits(u.k_cache))
                and torch.equal(_bits(f.v_cache), _bits(u.v_cache))):
            result["fused"] = "not bit-identical to rope followed by store_kv (SPEC §3)"
    return result


# ----------------------------------------------------------------------------- timing


def time_cuda(fn: Callable, sets: list, replays: int) -> List[float]:
    """Per-call µs of each timed replay of a CUDA graph holding CALLS_PER_GRAPH calls.

    The graph removes Python and launch overhead from the figure (an engine replays graphs
    too); call i uses buffer set i % len(sets).
    """
    # Warm-up on a side stream before capture, as the torch docs ask (lazy init, allocator).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            fn(sets[i % len(sets)])
    for _ in range(WARMUP_REPLAYS):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return [start.elapsed_time(end) * 1000.0 / CALLS_PER_GRAPH for start, end in events]


def spread(times: List[float]) -> float:
    """Interquartile range over the median."""
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)


def steadiest(measure: Callable[[], List[float]]) -> Tuple[List[float], int]:
    """measure(), taken again while its spread exceeds MAX_SPREAD (at most RETIMES more
    times); returns the samples of the steadiest measurement and how many were retaken."""
    times = measure()
    retimed = 0
    while spread(times) > MAX_SPREAD and retimed < RETIMES:
        again = measure()
        retimed += 1
        if spread(again) < spread(times):
            times = again
    return times, retimed


def time_cpu(fn: Callable, sets: list, mode: str) -> List[float]:
    """Per-call µs of single calls timed with perf_counter (no graphs on the CPU)."""
    for _ in range(2):
        fn(sets[0])
    times: List[float] = []
    deadline = time.perf_counter() + CPU_BUDGET_S[mode]
    while len(times) < CPU_MAX_REPS and (len(times) < CPU_MIN_REPS[mode] or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn(sets[0])
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def measure_copy(device: torch.device, mode: str) -> dict:
    """Device-to-device copy bandwidth (bytes read + written), timed like the kernels."""
    nbytes = COPY_BYTES[device.type]
    if device.type == "cuda":
        nbytes = min(nbytes, int(torch.cuda.mem_get_info()[0] * 0.3) // 2 >> 20 << 20)
    src = random_tensor((nbytes // 2,), torch.bfloat16, device)
    dst = torch.empty_like(src)
    # The faster of the memcpy path and an elementwise kernel: the baseline is the
    # best copy torch has, so "% of copy" is not flattered by a slow copy.
    copies = [lambda _: dst.copy_(src), lambda _: torch.neg(src, out=dst)]
    best = None
    for fn in copies:
        if device.type == "cuda":
            times, _ = steadiest(lambda: time_cuda(fn, [None], REPLAYS[mode]))
        else:
            times = time_cpu(fn, [None], mode)
        if best is None or statistics.median(times) < statistics.median(best):
            best = times
    assert best is not None
    times = best
    us = statistics.median(times)
    del src, dst
    return {"bytes_copied": nbytes, "bytes_moved": 2 * nbytes, "us": us, "us_samples": [round(x, 3) for x in times],
            "GBps": 2 * nbytes / us / 1e3}


def measure_empty_kernel(device: torch.device, mode: str) -> Optional[dict]:
    """Per-call µs of a kernel that does nothing (torch's one-thread spin kernel, told to
    spin 0 cycles), timed like the kernels: the launch floor under every small call's
    figure. None off CUDA or where torch lacks the kernel."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if device.type != "cuda" or sleep is None:
        return None
    times, _ = steadiest(lambda: time_cuda(lambda _: sleep(0), [None], REPLAYS[mode]))
    return {"us": statistics.median(times), "us_samples": [round(x, 3) for x in times]}


# ----------------------------------------------------------------------------- environment


def _driver_info() -> dict:
    out: dict = {}
    try:  # the driver's CUDA version (what the driver supports), from libcuda itself
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            out["cuda_driver_api"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except Exception:
        pass
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            drv, sm, mem = (x.strip() for x in r.stdout.strip().splitlines()[0].split(","))
            out.update(driver_version=drv, max_sm_clock=sm, max_mem_clock=mem)
    except Exception:
        pass
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ropekv": ropekv.__version__,
        "ropekv_info": ropekv.info(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "l2_bytes": getattr(p, "L2_cache_size", None),
            **_driver_info(),
        }
    else:
        env["device"] = {"name": env["cpu"], "threads": torch.get_num_threads()}
    return env


# ----------------------------------------------------------------------------- output


class Progress:
    """One updating line on stderr when it is a terminal; otherwise one line per case."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.last: Optional[str] = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, case: Case, what: str) -> None:
        msg = f"[{self.done + 1}/{self.total}] {case.label}: {what}  ({time.perf_counter() - self.t0:.0f} s)"
        if self.tty:
            sys.stderr.write("\r\033[K" + msg)
        elif case.label != self.last:
            sys.stderr.write(f"[{self.done + 1}/{self.total}] {case.label}\n")
        self.last = case.label
        sys.stderr.flush()

    def case_done(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _fmt_us(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def table(rows: List[dict]) -> str:
    head = ["shape", "cache", "tokens", *[f"{v} us" for v in VARIANTS], "fused GB/s", "% copy", "torch/fused"]
    lines = [head]
    for r in rows:
        cells = [r["shape"], r["cache"], str(r["tokens"])]
        for v in VARIANTS:
            res = r["variants"][v]
            cells.append("FAIL" if res.get("check") else "ERR" if res.get("error") else _fmt_us(res.get("us")))
        fused, base = r["variants"]["fused"], r["variants"]["torch"]
        cells.append(f"{fused['GBps']:.1f}" if "GBps" in fused else "-")
        cells.append(f"{fused['pct_copy']:.1f}%" if "pct_copy" in fused else "-")
        cells.append(f"{base['us'] / fused['us']:.1f}x" if "us" in fused and "us" in base else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(report: dict, path: str) -> bool:
    """Time per call vs tokens, log-log, one panel per shape and cache dtype. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    panels: Dict[tuple, List[dict]] = {}
    for r in report["results"]:
        panels.setdefault((r["shape"], r["cache"]), []).append(r)
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    copy_gbps = report["copy"]["GBps"]
    for ax, ((shape, cache), rows) in zip(axes.flat, panels.items()):
        for v in VARIANTS:
            pts = [(r["tokens"], r["variants"][v]["us"]) for r in rows if "us" in r["variants"][v]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        # Where the fused kernel would be if it moved its bytes at copy bandwidth.
        ideal = [(r["tokens"], r["variants"]["fused"]["bytes"] / copy_gbps / 1e3) for r in rows]
        ax.plot(*zip(*ideal), linestyle="--", color="gray", label="fused bytes at copy BW")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{shape}, {cache} cache")
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = report["environment"]
    fig.suptitle(f"ropekv {env['ropekv']} on {env['device']['name']} (torch {env['torch']}, "
                 f"copy {copy_gbps:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _n_sets(case: Case) -> int:
    """How many buffer sets the 50 captured calls rotate among (see ROTATE_FACTOR)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or (50 << 20)
    if footprint(case) <= l2 and not COLD_L2:
        return 1
    wanted = math.ceil(ROTATE_FACTOR * l2 / footprint(case))
    fits = int(torch.cuda.mem_get_info()[0] * SET_MEMORY_FRACTION) // allocation(case)
    return max(1, min(CALLS_PER_GRAPH, wanted, fits))


def run_case(case: Case, device: torch.device, mode: str, cos_sin, scale, copy_gbps, progress) -> dict:
    progress.update(case, "allocating")
    n_sets = _n_sets(case) if device.type == "cuda" else 1
    sets = [make_buffers(case, device, scale, scale) for _ in range(n_sets)]
    variants = make_variants(case.d, cos_sin)
    progress.update(case, "checking")
    checks = check_variants(sets[0], variants)
    row: Dict[str, Any] = {"shape": case.shape, "hq": case.hq, "hk": case.hk, "hv": case.hv, "head_dim": case.d,
           "input": "bf16", "cache": case.cache_name, "tokens": case.tokens, "slots": case.slots,
           "buffer_sets": n_sets, "variants": {}}
    for name in VARIANTS:
        res: dict = {"bytes": bytes_moved(case, name)}
        row["variants"][name] = res
        if checks.get(name):
            res["check"] = checks[name]
            continue
        progress.update(case, f"timing {name}")
        try:
            if device.type == "cuda":
                times, res["retimed"] = steadiest(lambda: time_cuda(variants[name], sets, REPLAYS[mode]))
            else:
                times = time_cpu(variants[name], sets, mode)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            _free(device)
            continue
        us = statistics.median(times)
        res.update(us=us, us_min=min(times), us_samples=[round(x, 3) for x in times],
                   GBps=res["bytes"] / us / 1e3, pct_copy=100.0 * res["bytes"] / us / 1e3 / copy_gbps)
    del sets
    _free(device)
    progress.case_done()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ropekv bench",
        description="Times ropekv's store_kv, RoPE, fused RoPE+KV write, unfused, and a plain-torch baseline.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="fewer token counts and repeats (the default; under a minute on an H100)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="all token counts")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    ap.add_argument("--tokens", help="comma-separated token counts, overriding the mode's list")
    ap.add_argument("--pdl", action="store_true", help="launch ropekv's kernels with programmatic dependent launch")
    ap.add_argument("--cold-l2", action="store_true",
                    help="rotate buffers at every size, not only where a call's data exceeds L2")
    ap.add_argument("--out-dir", help="folder for the default JSON and PNG names (created)")
    ap.add_argument("--json", help="JSON output path (default: ropekv-bench.json)")
    ap.add_argument("--plot", help="PNG plot path (default: ropekv-bench.png; needs matplotlib)")
    args = ap.parse_args(argv)
    global PDL, COLD_L2
    PDL = bool(args.pdl)
    COLD_L2 = bool(args.cold_l2)
    mode_name = args.mode or "quick"

    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda" and not torch.cuda.is_available():
        print("ropekv bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(dev_type)
    info = ropekv.info()
    backend = info[f"backend_{dev_type}"]
    if backend != "native":
        # The fallback synchronizes (no CUDA graphs) and is not what this benchmark is about.
        print(f"ropekv bench: ropekv would use its '{backend}' backend on {dev_type} "
              f"(ROPEKV_BACKEND={info['requested_backend']}, extension: {info['extension']}); "
              "there are no compiled kernels to time", file=sys.stderr)
        return 1
    if os.environ.pop("ROPEKV_CHECK", "0") not in ("", "0"):
        # Check mode synchronizes, which breaks graph capture and is not the path engines use.
        print("ropekv bench: ignoring ROPEKV_CHECK (the bench times the default path)", file=sys.stderr)

    tokens = ([int(x) for x in args.tokens.split(",")] if args.tokens else TOKENS[(dev_type, mode_name)])
    out_dir = args.out_dir or "."
    json_path = args.json or os.path.join(out_dir, "ropekv-bench.json")
    plot_path = args.plot or os.path.join(out_dir, "ropekv-bench.png")
    for path in (json_path, plot_path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    torch.manual_seed(0)
    started = time.perf_counter()
    env = environment(device)
    print(f"ropekv {env['ropekv']} | torch {env['torch']} | {dev_type}: {env['device']['name']} | "
          f"mode {mode_name}", file=sys.stderr)
    copy = measure_copy(device, mode_name)
    print(f"copy bandwidth (read + write): {copy['GBps']:.1f} GB/s", file=sys.stderr)
    empty = measure_empty_kernel(device, mode_name)
    if empty is not None:
        print(f"empty kernel: {empty['us']:.2f} µs per call", file=sys.stderr)

    cases = [(s, c, t) for s in SHAPES for c in CACHE_DTYPES for t in tokens]
    progress = Progress(len(cases))
    rows = []
    try:
        for shape, (hq, hk, hv, d, base) in SHAPES.items():
            cos_sin = make_cos_sin(d, base, device)
            for cache_name, cache_dtype in CACHE_DTYPES.items():
                # fp8 scales as engines pass them: a 1-element fp32 tensor on the device.
                scale = (torch.full((1,), FP8_SCALE, dtype=torch.float32, device=device)
                         if cache_dtype.itemsize == 1 else None)
                for t in tokens:
                    case = Case(shape, hq, hk, hv, d, cache_name, cache_dtype, t,
                                max(2 * t, MIN_SLOTS[dev_type]))
                    rows.append(run_case(case, device, mode_name, cos_sin, scale, copy["GBps"], progress))
            del cos_sin
            _free(device)
    finally:
        progress.close()

    report = {
        "benchmark": "ropekv",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv if argv is None else argv,
        "mode": mode_name,
        "pdl": PDL,
        "device_type": dev_type,
        "environment": env,
        "method": {
            "timing": (f"CUDA graph of {CALLS_PER_GRAPH} calls, {WARMUP_REPLAYS} warm-up replays, median of "
                       f"{REPLAYS[mode_name]} replays timed with CUDA events, divided by {CALLS_PER_GRAPH}; "
                       f"retaken up to {RETIMES} times while the replays' interquartile range exceeds "
                       f"{MAX_SPREAD:.0%} of the median, the steadiest kept (field retimed)"
                       if dev_type == "cuda" else
                       f"perf_counter per call after 2 warm-up calls, median of >= {CPU_MIN_REPS[mode_name]} "
                       f"calls ({CPU_BUDGET_S[mode_name]} s per variant)"),
            "l2_rotation": (f"{'every case' if COLD_L2 else 'cases whose data exceeds L2'}: call i uses buffer "
                            f"set i % buffer_sets; enough sets that {ROTATE_FACTOR} x L2 is touched per replay, "
                            f"capped at {CALLS_PER_GRAPH} and by memory; other cases reuse one set"
                            if dev_type == "cuda" else "none (one buffer set)"),
            "bytes": "minimum traffic: inputs read once, outputs written once (see bytes_moved in bench.py)",
            "GB": 1e9,
            "input_dtype": "bf16",
            "max_pos": MAX_POS,
            "min_slots": MIN_SLOTS[dev_type],
            "fp8_scale": FP8_SCALE,
            "tokens": tokens,
        },
        "copy": copy,
        "empty_kernel": empty,
        "results": rows,
        "elapsed_s": None,
    }
    failures = [(r, v, r["variants"][v]) for r in rows for v in VARIANTS
                if r["variants"][v].get("check") or r["variants"][v].get("error")]
    report["failures"] = [{"shape": r["shape"], "cache": r["cache"], "tokens": r["tokens"], "variant": v,
                           "check": res.get("check"), "error": res.get("error")} for r, v, res in failures]
    report["elapsed_s"] = round(time.perf_counter() - started, 2)

    print(f"\nropekv {env['ropekv']} on {env['device']['name']} ({dev_type}), torch {env['torch']}; "
          f"µs per call (median); copy {copy['GBps']:.1f} GB/s"
          + (f"; empty kernel {empty['us']:.2f} µs" if empty is not None else "") + ("; PDL on" if PDL else ""))
    print(table(rows))
    if dev_type == "cpu":
        print(f"(CPU: {torch.get_num_threads()} threads; warm caches, perf_counter medians)")

    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {json_path}", file=sys.stderr)
    if plot(report, plot_path):
        print(f"wrote {plot_path}", file=sys.stderr)
    elif args.plot:
        print("no plot: matplotlib is not importable", file=sys.stderr)
    print(f"done in {report['elapsed_s']:.1f} s", file=sys.stderr)

    if failures:
        bar = "!" * 78
        print(f"\n{bar}\nropekv bench: {len(failures)} FAILURES (not timed):", file=sys.stderr)
        for r, v, res in failures:
            what = f"wrong results: {res['check']}" if res.get("check") else f"error: {res['error']}"
            print(f"  {r['shape']} {r['cache']} T={r['tokens']} {v}: {what}", file=sys.stderr)
        print(bar, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
