"""examples/llama_attention.py, shortened: a prefill and decode steps with padding
slots, every step equal to recomputing without a cache."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "llama_attention.py"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _example():
    spec = importlib.util.spec_from_file_location("llama_attention", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("device", DEVICES)
def test_llama_attention_example(device, kv_cache_dtype, capsys):
    example = _example()
    args = ["--device", device, "--kv-cache-dtype", kv_cache_dtype,
            "--layers", "2", "--seqs", "3", "--max-prompt", "12", "--decode-steps", "4"]
    result = example.run(example.parse_args(args))
    out = capsys.readouterr().out
    assert "batch padded to 4" in out  # 3 sequences in a CUDA-graph batch of 4: one padding slot
    assert result["max_diff"] <= result["tolerance"], out
    assert result["tokens_per_s"] > 0
