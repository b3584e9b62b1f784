"""HAMi's node and device scores, and the FGD paper's BestFit score."""

from __future__ import annotations

import pytest

from libshared.events import Placement
from services.scheduler.core import scoring
from services.scheduler.core.deciding import Scheduler
from tests.scheduler.conftest import cluster, node, pod


def _place(c, p, policy="hami"):
    d = Scheduler(c, policy=policy).decide(p)
    assert isinstance(d, Placement), d
    c.apply(d)
    return d


def test_hami_node_score_is_ten_times_the_three_usage_ratios_before_the_pod():
    c = cluster(node("a", 2, memory_mib=10000, split=10), node("b", 4, memory_mib=10000, split=5))
    _place(c, pod("x", mem=3000, cores=20, use_uuids=("a-gpu0",)))
    score = scoring.hami_node_score(c)
    # HAMi's ComputeDefaultScore runs before the pod is added (pkg/scheduler/score.go
    # scoreNode): node a holds used 1/20, cores 20/200, MiB 3000/20000; node b nothing
    assert score[0] == pytest.approx(10 * (1 / 20 + 20 / 200 + 3000 / 20000))
    assert score[1] == 0


@pytest.mark.parametrize(
    ("policy", "annotation", "expected"),
    [
        ("hami", None, "busy"),
        ("hami-binpack", None, "busy"),
        ("hami-spread", None, "idle"),
        ("hami", "spread", "idle"),
        ("hami-spread", "binpack", "busy"),
        ("bestfit", "spread", "idle"),
    ],
)
def test_node_policy_binpack_takes_the_busiest_node_and_spread_the_idlest(
    policy, annotation, expected
):
    c = cluster(node("idle", 2), node("busy", 2))
    _place(c, pod("x", mem=4000, cores=30, use_uuids=("busy-gpu0",)))
    d = Scheduler(c, policy=policy).decide(pod("q", mem=1000, cores=10, node_policy=annotation))
    assert isinstance(d, Placement)
    assert d.node == expected


@pytest.mark.parametrize(
    ("policy", "annotation", "expected_slot"),
    [
        ("hami", None, 1),
        ("hami-binpack", None, 0),
        ("hami-binpack", "spread", 1),
        ("hami", "binpack", 0),
    ],
)
def test_gpu_policy_binpack_takes_the_busiest_device_and_spread_the_idlest(
    policy, annotation, expected_slot
):
    c = cluster(node("n", 2))
    _place(c, pod("x", mem=4000, cores=30, use_uuids=("n-gpu0",)))
    d = Scheduler(c, policy=policy).decide(pod("q", mem=1000, cores=10, gpu_policy=annotation))
    assert isinstance(d, Placement)
    assert [s.device_index for s in d.slices] == [expected_slot]


def test_bestfit_score_follows_the_papers_leftover_formula():
    c = cluster(node("a", 2, cpu_milli=64000), node("b", 8, cpu_milli=96000))
    raw = scoring.bestfit_score(c, cpu_milli=8000, gpu_milli_total=500)
    left_a = 0.5 * (64000 - 8000) / 128000 + 0.5 * (2000 - 500) / 8000
    left_b = 0.5 * (96000 - 8000) / 128000 + 0.5 * (8000 - 500) / 8000
    assert raw.tolist() == [int((1 - left_a) * 100), int((1 - left_b) * 100)]
    d = Scheduler(c, policy="bestfit").decide(pod("q", pct=50, cores=50, cpu=8000))
    assert isinstance(d, Placement) and d.node == "a"


def test_bestfit_takes_the_least_free_gpu_that_fits_inside_the_node():
    c = cluster(node("n", 3, cpu_milli=64000))
    _place(c, pod("x", pct=30, cores=30, use_uuids=("n-gpu1",)))
    _place(c, pod("y", pct=60, cores=60, use_uuids=("n-gpu2",)))
    d = Scheduler(c, policy="bestfit").decide(pod("q", pct=30, cores=30))
    assert isinstance(d, Placement)
    assert [s.device_index for s in d.slices] == [2]


def test_normalize_scales_feasible_scores_to_0_100_with_integer_division():
    import numpy as np

    out = scoring.normalize(np.array([10, 13, 40, 99]), np.array([True, True, True, False]))
    assert out.tolist() == [0, 10, 100, 0]


def test_ties_go_to_the_same_node_in_a_seeded_order():
    c = cluster(*(node(f"n{i}", 1, cpu_milli=64000) for i in range(8)))
    chosen = set()
    s = Scheduler(c, policy="bestfit", seed=3)
    for k in range(3):
        d = s.decide(pod(f"q{k}", pct=10, cores=10, cpu=1000))
        assert isinstance(d, Placement)
        chosen.add(d.node)
        c.apply(d)
    # after the first placement that node is the best fit; before it all tied
    assert len(chosen) == 1
    other = Scheduler(
        cluster(*(node(f"n{i}", 1, cpu_milli=64000) for i in range(8))), policy="bestfit", seed=3
    )
    d = other.decide(pod("z", pct=10, cores=10, cpu=1000))
    assert isinstance(d, Placement) and d.node in chosen


@pytest.mark.parametrize(
    ("free", "gpu_milli", "gpus", "expected"),
    [
        ((1000, 1000), 500, 1, 31),  # idle node: max(33 - 2, 2)
        ((400, 1000), 300, 1, 96),  # shared GPU: 100 - 40/10
        ((200, 1000), 300, 1, 49),  # must open a free GPU on a used node: 50 - 1
        ((200, 1000), 0, 0, 0),  # CPU-only
    ],
)
def test_gpupacking_scores_follow_the_simulators_tiers(free, gpu_milli, gpus, expected):
    c = cluster(node("n", len(free), cpu_milli=64000))
    for slot, f in enumerate(free):
        if f < 1000:
            _place(
                c,
                pod(
                    f"h{slot}",
                    pct=(1000 - f) // 10,
                    cores=(1000 - f) // 10,
                    use_uuids=(f"n-gpu{slot}",),
                ),
            )
    assert scoring.gpupacking_score(c, gpu_milli=gpu_milli, gpu_count=gpus).tolist() == [expected]
