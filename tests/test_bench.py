"""The benchmark's rule for unsteady measurements, and its launch floor (python -m ropekv bench)."""

from __future__ import annotations

import pytest
import torch

from ropekv import bench

STEADY = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0]
UNSTEADY = [1.0, 2.0, 1.0, 3.0, 1.5, 2.5, 1.0, 2.0]


def measurements(*runs):
    it = iter(runs)
    taken = []

    def measure():
        taken.append(next(it))
        return list(taken[-1])

    return measure, taken


def test_spread_is_interquartile_range_over_median():
    assert bench.spread(STEADY) < 0.03
    assert bench.spread(UNSTEADY) > bench.MAX_SPREAD


def test_steady_measurement_is_taken_once():
    measure, taken = measurements(STEADY, UNSTEADY)
    assert bench.steadiest(measure) == (STEADY, 0)
    assert len(taken) == 1


def test_unsteady_measurement_is_retaken_until_steady():
    measure, taken = measurements(UNSTEADY, STEADY, UNSTEADY)
    assert bench.steadiest(measure) == (STEADY, 1)
    assert len(taken) == 2


def test_retakes_are_bounded_and_the_steadiest_is_kept():
    less = [1.0, 1.5, 1.0, 1.6, 1.2, 1.4, 1.0, 1.5]
    measure, taken = measurements(UNSTEADY, less, UNSTEADY, STEADY)
    assert bench.steadiest(measure) == (less, bench.RETIMES)
    assert len(taken) == 1 + bench.RETIMES


def test_no_empty_kernel_figure_off_cuda():
    assert bench.measure_empty_kernel(torch.device("cpu"), "quick") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_empty_kernel_is_timed_like_the_kernels():
    """The launch floor the bench reports beside the copy baseline: a median of
    the quick mode's replays of a graph of empty kernels, per kernel."""
    empty = bench.measure_empty_kernel(torch.device("cuda"), "quick")
    assert empty is not None and len(empty["us_samples"]) == bench.REPLAYS["quick"]
    assert 0.1 < empty["us"] < 20, empty
