"""Test configuration: hypothesis profiles and the backends every test runs on.

ROPEKV_HYPOTHESIS_PROFILE=ci (default: bounded, reproducible, no deadline) or
thorough (many more examples; what scripts/gpu-check.sh uses on a GPU).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings

import ropekv
from ropekv import _backend, _native

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("ROPEKV_HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def _backends():
    out = []
    if _native.available():
        out.append(pytest.param(("native", "cpu"), id="native-cpu"))
    out.append(pytest.param(("torch", "cpu"), id="torch-cpu"))
    cuda_skip = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
    out.append(pytest.param(("native", "cuda"), id="native-cuda", marks=cuda_skip))
    out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=cuda_skip))
    return out


BACKENDS = _backends()


# store_kv calls that fit the CUDA small kernel take it up to 127 tokens, and
# those with at least 128 16-byte K and V chunks per token up to 2^17 chunks in
# all (kSmallStore* in cpp/src/cuda_rope_kv.cu).
SMALL_STORE_MAX_TOKENS = 127
SMALL_STORE_WIDE_UNITS = 128
SMALL_STORE_MAX_UNITS = 2**17
# store_kv calls into a cache of the input dtype whose K (or V) row is at least
# this many 16-byte chunks, with heads dense in the input and in a slot, take the
# rows kernel instead, at any size (with PDL up to 2^15 chunks of K and V in
# all): kStoreRows* in cpp/src/cuda_rope_kv.cu.
STORE_ROWS_MIN_UNITS = 64
STORE_ROWS_MAX_UNITS_PDL = 2**15
# Without PDL, calls of an even number of tokens, more than 64 and at most 128,
# whose row fits one block of the rows kernel (at most 128 chunks) stack two
# tokens per block (kStoreRowsPair* and kStoreRowsThreads).
STORE_ROWS_PAIR_TOKENS = range(65, 129)
STORE_ROWS_BLOCK_UNITS = 128


def small_store_max_tokens(num_heads: int, head_dim: int, itemsize: int = 2) -> int:
    """The most tokens of a store_kv call (K and V heads alike) that the small kernel takes."""
    units = 2 * num_heads * head_dim * itemsize // 16
    if units < SMALL_STORE_WIDE_UNITS:
        return SMALL_STORE_MAX_TOKENS
    return max(SMALL_STORE_MAX_TOKENS, SMALL_STORE_MAX_UNITS // units)


def store_rows_wide_enough(num_heads: int, head_dim: int, itemsize: int = 2) -> bool:
    """Whether a store_kv row of num_heads heads is wide enough for the rows kernel."""
    return num_heads * head_dim * itemsize // 16 >= STORE_ROWS_MIN_UNITS


def store_rows_pairs(T: int, k_units: int, v_units: int, pdl: bool = False) -> bool:
    """Whether a store_kv call that takes the rows kernel runs it two tokens per
    block (k_units, v_units: 16-byte chunks per token of K and V)."""
    return not pdl and T % 2 == 0 and T in STORE_ROWS_PAIR_TOKENS and max(k_units, v_units) <= STORE_ROWS_BLOCK_UNITS


def tokens_per_block(kernel_name: str) -> int:
    """The last template argument of a rows-kernel name (tokens per block), from
    a demangled name (`..., 2>(`) or a mangled one (`Li2EEEv`)."""
    m = re.search(r",\s*(\d+)>\s*\(", kernel_name) or re.search(r"Li(\d+)EEEv", kernel_name)
    assert m, kernel_name
    return int(m.group(1))


def cuda_kernel_names(fn) -> set:
    """The names of the package's CUDA kernels that fn launches (empty where the
    profiler records no kernels, as under compute-sanitizer)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "ropekv" in e.name}


def force_backend(name: str):
    """Makes the next calls use backend `name` ('native', 'torch' or 'auto')."""
    os.environ["ROPEKV_BACKEND"] = name
    _backend.reset()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(backend name, device): the test's calls run on that backend."""
    name, device = request.param
    if name == "native" and device == "cuda" and not _native.serves(torch.device("cuda")):
        pytest.skip("this build has no CUDA backend")
    saved = os.environ.get("ROPEKV_BACKEND")
    force_backend(name)
    yield name, torch.device(device)
    if saved is None:
        os.environ.pop("ROPEKV_BACKEND", None)
    else:
        os.environ["ROPEKV_BACKEND"] = saved
    _backend.reset()


@pytest.fixture(autouse=True)
def _no_check_env(monkeypatch):
    monkeypatch.delenv("ROPEKV_CHECK", raising=False)


def pytest_report_header(config):
    info = ropekv.info()
    return (
        f"ropekv {info['version']}: extension {info['extension']}, cuda build {info['compiled_cuda']}, "
        f"archs {info['cuda_architectures'] or '-'}, cuda device {info['cuda_device']}"
    )
