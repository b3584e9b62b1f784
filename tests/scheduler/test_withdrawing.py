"""A withdrawn node takes no new pod; the pods it holds keep their slices until released."""

from __future__ import annotations

import pytest

from libshared.events import Placement, Unschedulable
from services.scheduler.core.deciding import POLICIES, WITHDRAWN, Scheduler
from services.scheduler.core.fragmentation import Shape, Workload
from tests.scheduler.conftest import cluster, node, pod


def scheduler(policy: str) -> Scheduler:
    c = cluster(node("a"), node("b"))
    workload = Workload(shapes=(Shape(cpu_milli=0, gpu_milli=200, gpu_count=1),), weights=(1.0,))
    return Scheduler(c, policy=policy, workload=workload, seed=1)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_withdrawn_node_takes_no_new_pod_under_any_policy(policy: str) -> None:
    s = scheduler(policy)
    assert s.cluster.withdraw_node("a") is True
    for i in range(10):  # node b holds ten, node a (empty) none
        d = s.decide(pod(f"p{i}", mem=3000, cores=10))
        assert isinstance(d, Placement) and d.node == "b", d
        s.cluster.apply(d)
    assert isinstance(s.decide(pod("p10", mem=3000, cores=10)), Unschedulable)


def test_pods_on_a_withdrawn_node_keep_their_slices_until_released() -> None:
    s = scheduler("hami")
    held = s.decide(pod("held", mem=5000))
    assert isinstance(held, Placement)
    s.cluster.apply(held)
    n = s.cluster.node_index[held.node]
    assert s.cluster.withdraw_node(held.node) and not s.cluster.withdraw_node(held.node)
    assert s.decide(pod("held", mem=5000)) == held  # still its placement
    assert int(s.cluster.dev_mem_used[n].sum()) == 5000
    assert s.cluster.release("held") is not None
    assert int(s.cluster.dev_mem_used[n].sum()) == 0
    assert s.cluster.placement_of("held") is None


def test_unschedulable_counts_and_explains_only_offered_nodes_and_filter_names_withdrawn() -> None:
    s = scheduler("hami")
    s.cluster.withdraw_node("a")
    d = s.decide(pod("big", mem=20000))
    assert isinstance(d, Unschedulable)
    assert d.reason.startswith("0/1 nodes fit") and set(d.node_reasons) == {"b"}
    result = s.filter(pod("small", mem=100), ["a", "b"])
    assert result.feasible == ["b"] and result.failed == {"a": WITHDRAWN}
    s.cluster.withdraw_node("b")
    none = s.decide(pod("small", mem=100))
    assert isinstance(none, Unschedulable) and none.reason == "0/0 nodes fit: "


def test_registering_a_withdrawn_node_again_offers_it_again() -> None:
    s = scheduler("hami-spread")
    s.cluster.withdraw_node("a")
    assert s.cluster.withdraw_node("nowhere") is False
    s.cluster.upsert_node(node("a"))
    nodes = set()
    for i in range(4):
        d = s.decide(pod(f"p{i}", mem=3000))
        assert isinstance(d, Placement)
        s.cluster.apply(d)
        nodes.add(d.node)
    assert nodes == {"a", "b"}
