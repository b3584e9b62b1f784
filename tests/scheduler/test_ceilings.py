"""The pooled best-fit estimate of what an online placement can allocate."""

from __future__ import annotations

import pytest

from libshared.traces import TracePod
from services.scheduler.core import ceilings


def pod(num_gpu: int, gpu_milli: int, name: str = "p") -> TracePod:
    return TracePod(
        name=name,
        cpu_milli=1000,
        memory_mib=1024,
        num_gpu=num_gpu,
        gpu_milli=gpu_milli,
        gpu_spec=(),
    )


def test_a_sharing_pod_takes_the_tightest_remainder_that_holds_it() -> None:
    # 600 and 700 open two GPUs (400 and 300 left); a 300 fills the 300 exactly, and a
    # 400 then still finds its 400: best fit leaves nothing; first fit would have put
    # the 300 into the 400 and refused the 400
    curve = ceilings.pooled_best_fit([pod(1, 600), pod(1, 700), pod(1, 300), pod(1, 400)], 2)
    assert curve[-1] == (1.0, 1.0)


def test_a_whole_gpu_pod_is_refused_when_every_gpu_is_partly_used() -> None:
    curve = ceilings.pooled_best_fit([pod(1, 500), pod(1, 600), pod(1, 1000)], 2)
    assert [round(a, 2) for _, a in curve] == [0.25, 0.55, 0.55]
    assert [round(r, 2) for r, _ in curve] == [0.25, 0.55, 1.05]


def test_a_multi_gpu_pod_takes_whole_gpus_and_a_cpu_only_pod_none() -> None:
    curve = ceilings.pooled_best_fit([pod(0, 0), pod(2, 1000), pod(1, 100), pod(2, 1000)], 3)
    allocated = [round(a * 3000) for _, a in curve]
    assert allocated == [0, 2000, 2100, 2100]  # the second 2-GPU pod finds one free GPU


def test_a_sharing_pod_that_no_remainder_holds_opens_a_free_gpu_or_is_refused() -> None:
    curve = ceilings.pooled_best_fit([pod(1, 810), pod(1, 810), pod(1, 190)], 1)
    assert [round(a * 1000) for _, a in curve] == [810, 810, 1000]


def test_no_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="gpus=0"):
        ceilings.pooled_best_fit([pod(1, 100)], 0)


def test_leftover_counts_partly_used_gpus_by_their_free_milli() -> None:
    assert ceilings.leftover([190, 1000, 0, 190, 60]) == {190: 2, 60: 1}
