"""Fit rules and reason names, one table row per HAMi rule."""

from __future__ import annotations

import numpy as np
import pytest

from libshared.events import Placement, Unschedulable
from services.scheduler.core import fitting
from services.scheduler.core.deciding import Scheduler
from tests.scheduler.conftest import cluster, node, pod


def _occupy(c, n_name, slot, *, mem, cores, uid="holder"):
    """Put a slice directly into the view, as a placement would."""
    s = Scheduler(c, policy="hami")
    p = pod(uid, mem=mem, cores=cores, use_uuids=(f"{n_name}-gpu{slot}",))
    d = s.decide(p)
    assert isinstance(d, Placement), d
    c.apply(d)


@pytest.mark.parametrize(
    ("setup", "request_kwargs", "reason"),
    [
        ("unhealthy", {"mem": 1000, "cores": 10}, fitting.CARD_NOT_HEALTH),
        ("cordoned", {"mem": 1000, "cores": 10}, fitting.CARD_CORDONED),
        ("cordoned", {"mem": 1000, "cores": 10, "use_types": ("H100",)}, fitting.CARD_CORDONED),
        ("plain", {"mem": 1000, "cores": 10, "use_types": ("H100",)}, fitting.CARD_TYPE_MISMATCH),
        ("plain", {"mem": 1000, "cores": 10, "nouse_types": ("a100",)}, fitting.CARD_TYPE_MISMATCH),
        ("plain", {"mem": 1000, "cores": 10, "use_uuids": ("other",)}, fitting.CARD_UUID_MISMATCH),
        (
            "plain",
            {"mem": 1000, "cores": 10, "nouse_uuids": ("n-gpu0",)},
            fitting.CARD_UUID_MISMATCH,
        ),
        ("split1_used", {"mem": 1000, "cores": 10}, fitting.CARD_TIME_SLICING_EXHAUSTED),
        ("plain", {"mem": 20000, "cores": 10}, fitting.CARD_INSUFFICIENT_MEMORY),
        ("half_used", {"mem": 1000, "cores": 60}, fitting.CARD_INSUFFICIENT_CORE),
        ("half_used", {"mem": 1000, "cores": 100}, fitting.CARD_INSUFFICIENT_CORE),
        ("small_used", {"mem": 1000, "cores": 100}, fitting.EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT),
        ("cores_full", {"mem": 1000, "cores": 0}, fitting.CARD_COMPUTE_UNITS_EXHAUSTED),
    ],
)
def test_each_fit_rule_rejects_with_hamis_reason(setup, request_kwargs, reason):
    split = 1 if setup == "split1_used" else 10
    c = cluster(
        node(
            "n",
            1,
            split=split,
            unhealthy=(0,) if setup == "unhealthy" else (),
            cordoned=(0,) if setup == "cordoned" else (),
        )
    )
    if setup == "split1_used":
        _occupy(c, "n", 0, mem=100, cores=10)
    if setup == "small_used":
        _occupy(c, "n", 0, mem=100, cores=0)  # a slice with no cores reserved
    if setup == "half_used":
        _occupy(c, "n", 0, mem=100, cores=50)
    if setup == "cores_full":
        _occupy(c, "n", 0, mem=100, cores=100)
    p = pod("q", **request_kwargs)
    codes = fitting.device_codes(c, p, p.gpu_containers[0])
    assert fitting.DEVICE_REASONS[int(codes[0, 0])] == reason
    result = Scheduler(c, policy="hami").filter(p)
    assert result.feasible == []
    # HAMi's reason is the counted device reasons alone (GenReason): no NodeInsufficientDevice
    assert result.failed["n"] == f"1/1 {reason}"


def test_a_device_that_fits_has_no_reason():
    c = cluster(node("n", 1))
    p = pod("q", mem=1000, cores=10)
    assert int(fitting.device_codes(c, p, p.gpu_containers[0])[0, 0]) == 0
    assert Scheduler(c).filter(p).feasible == ["n"]


def test_reasons_are_counted_per_device_of_the_node():
    c = cluster(node("n", 4, memory_mib=8000), node("m", 2, memory_mib=30000))
    _occupy(c, "m", 0, mem=100, cores=100)
    p = pod("q", gpus=2, mem=10000, cores=10)
    result = Scheduler(c).filter(p)
    assert result.feasible == []
    assert result.failed["n"] == "4/4 CardInsufficientMemory"
    # the device that fitted is counted as HAMi's AllocatedCardsInsufficientRequest
    assert result.failed["m"] == "1/2 AllocatedCardsInsufficientRequest, 1/2 CardInsufficientCore"


def test_too_few_devices_is_node_insufficient_device():
    c = cluster(node("n", 2))
    result = Scheduler(c).filter(pod("q", gpus=3, mem=1000))
    assert result.failed["n"] == fitting.NODE_INSUFFICIENT_DEVICE


def test_memory_percentage_is_taken_of_each_cards_memory():
    c = cluster(node("small", 1, memory_mib=10000), node("big", 1, memory_mib=40000))
    _occupy(c, "small", 0, mem=5000, cores=0)
    _occupy(c, "big", 0, mem=5000, cores=0, uid="h2")
    # 60 % of 10000 = 6000 > 5000 free; 60 % of 40000 = 24000 <= 35000 free
    result = Scheduler(c).filter(pod("q", pct=60))
    assert result.feasible == ["big"]
    assert "CardInsufficientMemory" in result.failed["small"]


@pytest.mark.parametrize(
    ("cpu", "host_mib", "expected"),
    [
        (4000, 0, fitting.INSUFFICIENT_CPU),
        (0, 9000, fitting.INSUFFICIENT_MEMORY),
        (1000, 1000, None),
    ],
)
def test_node_cpu_and_memory_are_checked_like_node_resources_fit(cpu, host_mib, expected):
    c = cluster(node("n", 1, cpu_milli=2000, host_mib=8192))
    result = Scheduler(c).filter(pod("q", mem=100, cpu=cpu, host_mib=host_mib))
    if expected is None:
        assert result.feasible == ["n"]
    else:
        assert result.failed == {"n": expected}


def test_numa_bind_keeps_a_containers_gpus_on_one_numa_node():
    c = cluster(node("n", 4, numa=[0, 0, 1, 1]))
    _occupy(c, "n", 0, mem=16000, cores=0)
    _occupy(c, "n", 2, mem=16000, cores=0, uid="h2")
    bound = pod("q", gpus=2, mem=1000, numa_bind=True)
    d = Scheduler(c).decide(bound)
    assert isinstance(d, Unschedulable)
    free = pod("r", gpus=2, mem=1000)
    assert isinstance(Scheduler(c).decide(free), Placement)
    c2 = cluster(node("n", 4, numa=[0, 0, 1, 1]))
    d2 = Scheduler(c2).decide(bound)
    assert isinstance(d2, Placement)
    numas = {int(c2.dev_numa[0, s.device_index]) for s in d2.slices}
    assert len(numas) == 1


def test_multi_container_pods_share_devices_exactly():
    from libshared.resources import ContainerRequest, PodRequest

    c = cluster(node("n", 1, memory_mib=10000))
    two = PodRequest(
        uid="two",
        containers=tuple(
            ContainerRequest(name=f"c{i}", index=i, init=False, gpu_count=1, memory_mib=6000)
            for i in range(2)
        ),
    )
    # each container fits alone, both together do not
    assert Scheduler(c).filter(two).feasible == []
    c2 = cluster(node("n", 2, memory_mib=10000))
    d = Scheduler(c2).decide(two)
    assert isinstance(d, Placement)
    assert sorted(s.device_index for s in d.slices) == [0, 1]


def test_vector_fit_and_exact_fit_agree_on_random_fleets():
    rng = np.random.default_rng(7)
    for trial in range(30):
        nodes = [
            node(f"n{i}", int(rng.integers(1, 5)), split=int(rng.integers(1, 4))) for i in range(6)
        ]
        c = cluster(*nodes)
        s = Scheduler(c, policy="hami", seed=trial)
        for k in range(25):
            p = pod(
                f"{trial}-{k}",
                gpus=int(rng.integers(1, 3)),
                mem=int(rng.integers(500, 9000)),
                cores=int(rng.choice([0, 10, 30, 100])),
            )
            ok = s._candidates(p)
            exact = [
                fitting.fit_node(c, n, p, gpu_policy="spread")[0] is not None for n in range(c.size)
            ]
            assert ok.tolist() == exact
            d = s.decide(p)
            if isinstance(d, Placement):
                c.apply(d)
        assert (c.dev_mem_used <= c.dev_mem).all()
        assert (c.dev_cores_used <= np.maximum(c.dev_cores, 100)).all()
        assert (c.dev_used <= c.dev_split).all()


def test_vector_reasons_and_exact_reasons_are_the_same_strings_on_random_fleets():
    rng = np.random.default_rng(11)
    for trial in range(20):
        nodes = [
            node(f"n{i}", int(rng.integers(1, 5)), split=int(rng.integers(1, 4))) for i in range(6)
        ]
        c = cluster(*nodes)
        s = Scheduler(c, policy="hami", seed=trial)
        for k in range(25):
            p = pod(
                f"{trial}-{k}",
                gpus=int(rng.integers(1, 4)),
                mem=int(rng.integers(500, 12000)),
                cores=int(rng.choice([0, 10, 30, 100])),
            )
            failed = s.filter(p).failed
            for n in range(c.size):
                exact = fitting.fit_node(c, n, p, gpu_policy="spread")
                if exact[0] is None:
                    assert failed[c.nodes[n]] == exact[1]
            d = s.decide(p)
            if isinstance(d, Placement):
                c.apply(d)


def test_a_cordoned_device_has_nothing_free_for_the_fragmentation_policies():
    c = cluster(node("n", 2, cordoned=(0,)))
    assert c.free_milli[0].tolist()[:2] == [0, 1000]
    assert Scheduler(c, policy="hami").filter(pod("q", mem=1000, cores=10)).feasible == ["n"]
