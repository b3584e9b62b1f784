"""The ``steer`` policy's rules, each on a small fleet where its choice differs from FGD's
for the stated reason (CPU stranding), or matches it (FGD's scale and node order on ties);
and the earlier rules kept as knobs (the fine score, the least-leftover tie-break)."""

from __future__ import annotations

import numpy as np
import pytest

from libshared.events import Placement
from services.scheduler.core.deciding import Scheduler, task_of
from services.scheduler.core.fragmentation import Shape, Workload, sigmoid_score
from services.scheduler.core.steering import (
    Knobs,
    SteerScorer,
    cpu_per_milli_gpu,
    fgd_scale,
    gpu_weighted,
    stranded,
)
from tests.scheduler.conftest import cluster, node, pod

# Mostly whole-GPU tasks, a few quarter-GPU ones; no CPU asked.
SHARING = Workload(
    shapes=(Shape(cpu_milli=0, gpu_milli=1000, gpu_count=1), Shape(0, 250, 1)),
    weights=(0.98, 0.02),
)
# One whole-GPU shape asking 2 CPUs per GPU: r = 2 CPU milli-cores per milli-GPU.
WHOLE = Workload(shapes=(Shape(cpu_milli=2000, gpu_milli=1000, gpu_count=1),), weights=(1.0,))


def _fill(c, uid: str, node_name: str, pct: int) -> None:
    """Book ``pct`` percent of ``node_name``'s first GPU for a pod ``uid``."""
    d = Scheduler(c, policy="hami").decide(
        pod(uid, pct=pct, cores=pct, use_uuids=(f"{node_name}-gpu0",))
    )
    assert isinstance(d, Placement)
    c.apply(d)


def _fgd_scores(c, workload: Workload, request) -> list[int]:
    scorer = Scheduler(c, policy="fgd", workload=workload).fgd
    assert scorer is not None
    return scorer.scores(c, task_of(request))[0].tolist()


FINE = Knobs(fgd_scale=False, tiebreak=True)  # the earlier rule: fine score, tie-break


def _decide(
    c, policy: str, workload: Workload, request, seed: int, knobs: Knobs | None = None
) -> Placement:
    s = Scheduler(c, policy=policy, workload=workload, seed=seed)
    if knobs is not None:
        s.steer = SteerScorer(workload, knobs=knobs)
    d = s.decide(request)
    assert isinstance(d, Placement)
    return d


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_the_fine_score_knob_separates_placements_that_fgd_scores_alike(seed):
    # A 0.2 task: on "a" (400 free) F falls by 192, on "b" (480 free) by 196. FGD's
    # sigmoid scores both 54 and leaves the choice to node order; the fine score takes "b",
    # although "b" has more GPU left, so the tie-break is not the reason.
    c = cluster(node("a", 1), node("b", 1))
    _fill(c, "fa", "a", 60)
    _fill(c, "fb", "b", 52)
    request = pod("x", pct=20, cores=20)
    scores = _fgd_scores(c, SHARING, request)
    assert scores[0] == scores[1] == 54
    deltas, _ = SteerScorer(SHARING).deltas(c, task_of(request))
    assert deltas[1] < deltas[0]
    assert _decide(c, "steer", SHARING, request, seed, FINE).node == "b"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7])
def test_placements_that_fgd_scores_alike_go_to_the_seeded_node_order_as_under_fgd(seed):
    # Same fleet: steer scores on FGD's scale (54 on both, no CPU asked so no stranding),
    # so its choice is fgd's for every seed; across the seeds both nodes are chosen.
    c = cluster(node("a", 1), node("b", 1))
    _fill(c, "fa", "a", 60)
    _fill(c, "fb", "b", 52)
    request = pod("x", pct=20, cores=20)
    fgd = _decide(c, "fgd", SHARING, request, seed).node
    assert _decide(c, "steer", SHARING, request, seed).node == fgd


def test_the_seeded_node_order_picks_each_of_two_tied_nodes_for_some_seed():
    c = cluster(node("a", 1), node("b", 1))
    _fill(c, "fa", "a", 60)
    _fill(c, "fb", "b", 52)
    request = pod("x", pct=20, cores=20)
    chosen = {_decide(c, "steer", SHARING, request, seed).node for seed in range(8)}
    assert chosen == {"a", "b"}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_a_cpu_only_pod_goes_where_its_cpu_strands_no_gpu(seed):
    # Both nodes keep >= 2 CPUs after the 4-CPU pod, so FGD sees no change on either and
    # ties them. On "short" (7 CPUs, 2 free GPUs) the pod leaves 3 CPUs for 2 GPUs that
    # need 4: 500 milli-GPU would be stranded; on "rich" (64 CPUs) none.
    c = cluster(node("short", 2, cpu_milli=7000), node("rich", 2, cpu_milli=64000))
    request = pod("cpu-only", gpus=0, cpu=4000)
    scores = _fgd_scores(c, WHOLE, request)
    assert scores[0] == scores[1]
    assert _decide(c, "steer", WHOLE, request, seed).node == "rich"


@pytest.mark.parametrize(
    ("fleet", "expected"),
    [
        # F and stranding tie (no CPU counted): the node with fewer GPUs left wins
        ((("four", 4, None), ("two", 2, None)), "two"),
        ((("two", 2, None), ("four", 4, None)), "two"),
        # equal GPUs: the node with less CPU left wins (stranding is 0 on both)
        ((("cpu32", 2, 32000), ("cpu16", 2, 16000)), "cpu16"),
        ((("cpu16", 2, 16000), ("cpu32", 2, 32000)), "cpu16"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_tiebreak_knob_sends_ties_to_the_node_with_least_gpu_then_cpu_left(
    fleet, expected, seed
):
    c = cluster(*(node(name, gpus, cpu_milli=cpu) for name, gpus, cpu in fleet))
    request = pod("x", gpus=1, pct=100, cores=100, cpu=2000)
    scores = _fgd_scores(c, WHOLE, request)
    assert scores[0] == scores[1]
    assert _decide(c, "steer", WHOLE, request, seed, FINE).node == expected


def test_a_sharing_task_takes_the_least_free_of_the_gpus_that_grow_f_least():
    # Both partly used GPUs fall by the same F for a 0.2 task (each keeps >= 250 after
    # it); the one with 480 free wins over 520 (the idle third GPU would grow F).
    c = cluster(node("n", 3))
    d = Scheduler(c, policy="hami").decide(
        pod("f0", gpus=1, pct=48, cores=48, use_uuids=("n-gpu0",))
    )
    assert isinstance(d, Placement)
    c.apply(d)
    d = Scheduler(c, policy="hami").decide(
        pod("f1", gpus=1, pct=52, cores=52, use_uuids=("n-gpu1",))
    )
    assert isinstance(d, Placement)
    c.apply(d)
    placed = _decide(c, "steer", SHARING, pod("x", pct=20, cores=20), 0)
    assert [s.device_index for s in placed.slices] == [1]


@pytest.mark.parametrize(
    ("gpu_free", "cpu_free", "ratio", "expected"),
    [
        ((2000.0,), (8000.0,), 2.0, (0.0,)),  # 8 CPUs feed 4 GPUs: nothing stranded
        ((2000.0,), (3000.0,), 2.0, (500.0,)),  # 3 CPUs feed 1.5 GPUs of 2
        ((2000.0,), (0.0,), 2.0, (2000.0,)),  # no CPU: every idle GPU stranded
        ((0.0,), (0.0,), 2.0, (0.0,)),  # no idle GPU: nothing to strand
    ],
)
def test_stranded_gpu_is_what_the_free_cpu_cannot_feed(gpu_free, cpu_free, ratio, expected):
    got = stranded(np.array(gpu_free), np.array(cpu_free), ratio)
    assert got.tolist() == pytest.approx(list(expected))


def test_the_cpu_ratio_counts_cpu_only_shapes_in_the_cpu_and_not_in_the_gpu():
    w = Workload(
        shapes=(Shape(cpu_milli=4000, gpu_milli=500, gpu_count=1), Shape(8000, 0, 0)),
        weights=(0.5, 0.5),
    )
    # E[cpu] = 6000, E[gpu] = 250 milli-GPU
    assert cpu_per_milli_gpu(w) == pytest.approx(24.0)


def test_gpu_weighting_drops_cpu_only_shapes_and_weighs_by_gpu_demand():
    w = Workload(
        shapes=(Shape(0, 500, 1), Shape(0, 1000, 2), Shape(8000, 0, 0)),
        weights=(0.5, 0.25, 0.25),
    )
    got = gpu_weighted(w)
    assert got.shapes == (Shape(0, 500, 1), Shape(0, 1000, 2))
    # demands 0.5 * 500 = 250 and 0.25 * 2000 = 500
    assert got.weights == pytest.approx((1 / 3, 2 / 3))


@pytest.mark.parametrize("bad", [Workload(shapes=(Shape(8000, 0, 0),), weights=(1.0,))])
def test_a_workload_without_gpu_shapes_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="no GPU shape"):
        SteerScorer(bad, knobs=Knobs())


def test_the_steer_policy_needs_a_target_workload():
    with pytest.raises(ValueError, match="'steer' needs a target workload"):
        Scheduler(cluster(node("n", 1)), policy="steer")


@pytest.mark.parametrize("allowed", [(False, True), (True, False)])
def test_a_node_left_out_of_the_filter_is_never_chosen_even_when_nothing_scores(allowed):
    # Neither node holds the 2-GPU task by FGD's view of a 1-GPU node (every delta is inf),
    # yet the choice stays among the nodes the filter allowed.
    c = cluster(node("a", 1), node("b", 1))
    request = pod("x", gpus=2, pct=100, cores=100)
    ok = np.array(allowed)
    n, _ = SteerScorer(SHARING).choose(c, task_of(request), ok, [0.5, 0.1])
    assert ok[n]


TYPED = Workload(
    shapes=(Shape(cpu_milli=2000, gpu_milli=1000, gpu_count=1, gpu_types=("V100",)),),
    weights=(1.0,),
)


@pytest.mark.parametrize(
    ("workload", "gpu_type", "expected"),
    [
        # untyped workload: the stranding term sends the CPU-only pod to the CPU-rich node
        (WHOLE, "V100M16", "rich"),
        # the workload asks V100 by name: no stranding term on V100 nodes, so the tie goes
        # to the node with less CPU left (the tie-break knob on, to make the tie visible)
        (TYPED, "V100M16", "short"),
        # ... but it still counts on nodes of a type no typed shape asks for
        (TYPED, "T4", "rich"),
    ],
)
def test_stranding_is_not_counted_on_gpu_types_that_typed_shapes_ask_for(
    workload, gpu_type, expected
):
    c = cluster(
        node("short", 2, type=gpu_type, cpu_milli=7000),
        node("rich", 2, type=gpu_type, cpu_milli=64000),
    )
    request = pod("cpu-only", gpus=0, cpu=4000)
    assert _fgd_scores(c, workload, request)[0] == _fgd_scores(c, workload, request)[1]
    assert _decide(c, "steer", workload, request, 0, FINE).node == expected


@pytest.mark.parametrize("x", [-5000.0, -196.0, -192.0, -1.0, 0.0, 40.0, 150.0, 4600.0, 1e9])
def test_the_fgd_scale_is_fgds_integer_sigmoid_score_negated(x):
    assert fgd_scale(np.array([x])).tolist() == [-sigmoid_score(min(x, 1e5))]


def test_a_node_that_cannot_hold_the_task_stays_below_every_fit_on_the_fgd_scale():
    got = fgd_scale(np.array([float("inf"), 1e9]))
    assert got[0] == float("inf")
    assert got[1] == 0.0
