"""FGD's fragmentation measure on hand-computed examples from the paper's definitions."""

from __future__ import annotations

import math

import pytest

from libshared.events import Placement
from services.scheduler.core.deciding import Scheduler
from services.scheduler.core.fragmentation import (
    FgdScorer,
    FragMeasure,
    Shape,
    Task,
    Workload,
    sigmoid_score,
    target_workload,
)
from tests.scheduler.conftest import cluster, node, pod

# Two task shapes, equally likely: a 0.3-GPU task needing 4 CPUs and a whole-GPU task
# needing 8 CPUs.
WORKLOAD = Workload(
    shapes=(
        Shape(cpu_milli=4000, gpu_milli=300, gpu_count=1),
        Shape(cpu_milli=8000, gpu_milli=1000, gpu_count=1),
    ),
    weights=(0.5, 0.5),
)


@pytest.mark.parametrize(
    ("cpu_free", "free", "expected"),
    [
        # both shapes fit; GPUs smaller than d_m count: 0.5*(200) + 0.5*(200+700)
        (16000, (200, 700, 1000), 0.5 * 200 + 0.5 * 900),
        # no whole GPU free: the 1-GPU shape cannot run, all idle milli count for it
        (16000, (200, 700), 0.5 * 200 + 0.5 * 900),
        # 6 CPUs: the whole-GPU shape lacks CPU, all 1900 count for it
        (6000, (200, 700, 1000), 0.5 * 200 + 0.5 * 1900),
        # 2 CPUs: neither shape fits
        (2000, (200, 700, 1000), 1900.0),
        # nothing idle, nothing fragmented
        (16000, (0, 0), 0.0),
    ],
)
def test_node_fragmentation_matches_the_definition(cpu_free, free, expected):
    m = FragMeasure(WORKLOAD)
    assert m.frag("T4", m.bucket(cpu_free), tuple(sorted(free))) == pytest.approx(expected)


def test_a_cpu_only_shape_counts_every_idle_gpu_as_fragmented():
    m = FragMeasure(
        Workload(shapes=(Shape(cpu_milli=1000, gpu_milli=0, gpu_count=0),), weights=(1.0,))
    )
    assert m.frag("T4", m.bucket(64000), (500, 1000)) == 1500


def test_a_shape_of_another_gpu_type_cannot_use_the_node():
    w = Workload(
        shapes=(Shape(cpu_milli=0, gpu_milli=500, gpu_count=1, gpu_types=("V100",)),),
        weights=(1.0,),
    )
    m = FragMeasure(w)
    assert m.frag("T4", m.bucket(0), (1000,)) == 1000
    assert m.frag("V100M16", m.bucket(0), (1000,)) == 0


def test_fgd_score_is_a_sigmoid_of_the_fragmentation_change():
    assert sigmoid_score(0) == 50
    assert sigmoid_score(-1000) == int(100 / (1 + math.exp(-1)))
    assert sigmoid_score(2000) == int(100 / (1 + math.exp(2)))


def test_fgd_puts_a_sharing_task_where_the_leftover_is_useless_anyway():
    # GPU0 has 300 free: a 0.3 task there leaves nothing; on GPU1 (idle) it would break a
    # whole GPU that the whole-GPU shape needs.
    c = cluster(node("n", 2, cpu_milli=64000))
    first = Scheduler(c, policy="hami").decide(pod("x", pct=70, cores=70, use_uuids=("n-gpu0",)))
    assert isinstance(first, Placement)
    c.apply(first)
    d = Scheduler(c, policy="fgd", workload=WORKLOAD).decide(pod("q", pct=30, cores=30, cpu=1000))
    assert isinstance(d, Placement)
    assert [s.device_index for s in d.slices] == [0]


def test_fgd_prefers_the_node_whose_fragmentation_grows_least():
    c = cluster(node("a", 1, cpu_milli=64000), node("b", 1, cpu_milli=64000))
    half = Scheduler(c, policy="hami").decide(pod("x", pct=50, cores=50, use_uuids=("b-gpu0",)))
    assert isinstance(half, Placement)
    c.apply(half)
    scorer = FgdScorer(FragMeasure(WORKLOAD))
    scores, _ = scorer.scores(
        c, Task(cpu_milli=1000, gpu_count=1, cores_percent=30, memory_percent=30)
    )
    # a: idle -> (700): F 0 -> 0.5*700 = 350; b: (500) -> (200): F 250 -> 0.5*200+0.5*200 = 200
    assert scores.tolist() == [sigmoid_score(350), sigmoid_score(-50)]
    d = Scheduler(c, policy="fgd", workload=WORKLOAD).decide(pod("q", pct=30, cores=30, cpu=1000))
    assert isinstance(d, Placement) and d.node == "b"


def test_cached_scores_follow_node_changes():
    c = cluster(node("a", 1, cpu_milli=64000), node("b", 1, cpu_milli=64000))
    scorer = FgdScorer(FragMeasure(WORKLOAD))
    task = Task(cpu_milli=1000, gpu_count=1, cores_percent=30, memory_percent=30)
    before = scorer.scores(c, task)[0].tolist()
    assert before[0] == before[1]
    d = Scheduler(c, policy="hami").decide(pod("x", pct=50, cores=50, use_uuids=("b-gpu0",)))
    c.apply(d)
    after = scorer.scores(c, task)[0].tolist()
    assert after[0] == before[0] and after[1] != before[1]


def test_target_workload_covers_95_percent_of_tasks_in_frequency_order():
    a, b, c = Shape(1, 100, 1), Shape(2, 1000, 1), Shape(3, 0, 0)
    tasks = [a] * 60 + [b] * 36 + [c] * 4
    w = target_workload(tasks)
    assert w.shapes == (a, b)
    assert w.weights == pytest.approx((60 / 96, 36 / 96))
    with pytest.raises(ValueError):
        target_workload([])
