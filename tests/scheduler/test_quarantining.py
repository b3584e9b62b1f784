"""A quarantined node (its registration or ledger unreadable, its ledger key deleted) takes
no new pod and is named with its reason; every other node keeps scheduling, and lifting
the quarantine offers the node again."""

from __future__ import annotations

import pytest

from libshared import quarantines
from libshared.events import Placement, Unschedulable
from services.scheduler.core.deciding import POLICIES, Scheduler
from services.scheduler.core.fragmentation import Shape, Workload
from tests.scheduler.conftest import cluster, node, pod


def scheduler(policy: str) -> Scheduler:
    c = cluster(node("a"), node("b"))
    workload = Workload(shapes=(Shape(cpu_milli=0, gpu_milli=200, gpu_count=1),), weights=(1.0,))
    return Scheduler(c, policy=policy, workload=workload, seed=1)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_quarantined_node_takes_no_new_pod_under_any_policy(policy: str) -> None:
    s = scheduler(policy)
    assert s.cluster.quarantine("a", quarantines.LEDGER_UNREADABLE, "$: JSON is malformed")
    for i in range(10):  # node b holds ten, node a (empty) none
        d = s.decide(pod(f"p{i}", mem=3000, cores=10))
        assert isinstance(d, Placement) and d.node == "b", d
        s.cluster.apply(d)
    full = s.decide(pod("p10", mem=3000, cores=10))
    assert isinstance(full, Unschedulable)
    assert full.node_reasons["a"] == quarantines.LEDGER_UNREADABLE
    assert full.reason.startswith("0/1 nodes fit") and "1 quarantined" in full.reason


@pytest.mark.parametrize(
    ("reasons", "named"),
    [
        ((quarantines.LEDGER_UNREADABLE,), quarantines.LEDGER_UNREADABLE),
        ((quarantines.LEDGER_DELETED,), quarantines.LEDGER_DELETED),
        ((quarantines.REGISTRATION_UNREADABLE,), quarantines.REGISTRATION_UNREADABLE),
        (
            (quarantines.LEDGER_UNREADABLE, quarantines.REGISTRATION_UNREADABLE),
            quarantines.REGISTRATION_UNREADABLE,
        ),
    ],
)
def test_filter_names_the_quarantine_of_a_node(reasons: tuple[str, ...], named: str) -> None:
    s = scheduler("hami")
    for r in reasons:
        s.cluster.quarantine("a", r, "detail")
    result = s.filter(pod("small", mem=100), ["a", "b"])
    assert result.feasible == ["b"] and result.failed == {"a": named}


def test_a_node_quarantined_before_it_ever_registered_is_named_by_filter_and_not_offered() -> None:
    s = scheduler("hami")
    s.cluster.quarantine("c", quarantines.REGISTRATION_UNREADABLE, "$.devices: bad")
    result = s.filter(pod("small", mem=100), ["b", "c"])
    assert result.failed == {"c": quarantines.REGISTRATION_UNREADABLE}
    s.cluster.upsert_node(node("c"))  # its last good registration would not lift it
    result = s.filter(pod("small", mem=100), ["b", "c"])
    assert result.feasible == ["b"] and result.failed == {"c": quarantines.REGISTRATION_UNREADABLE}
    assert s.cluster.lift("c", quarantines.REGISTRATION_UNREADABLE)
    assert s.filter(pod("small", mem=100), ["b", "c"]).feasible == ["b", "c"]


def test_lifting_every_quarantine_offers_the_node_again_and_one_left_keeps_it_out() -> None:
    s = scheduler("hami-spread")
    c = s.cluster
    n = c.node_index["a"]
    version = int(c.version[n])
    assert c.quarantine("a", quarantines.LEDGER_UNREADABLE, "x")
    assert not c.quarantine("a", quarantines.LEDGER_UNREADABLE, "y")  # already: detail kept new
    assert c.quarantined["a"] == {quarantines.LEDGER_UNREADABLE: "y"}
    assert c.quarantine("a", quarantines.REGISTRATION_UNREADABLE, "z")
    assert int(c.version[n]) == version + 1  # policies recompute the node once
    assert c.lift("a", quarantines.LEDGER_UNREADABLE)
    assert not c.lift("a", quarantines.LEDGER_UNREADABLE)
    assert not bool(c.sound[n]) and c.quarantine_reason("a") == quarantines.REGISTRATION_UNREADABLE
    assert c.lift("a", quarantines.REGISTRATION_UNREADABLE)
    assert bool(c.sound[n]) and c.quarantine_reason("a") is None and "a" not in c.quarantined
    placed = s.decide(pod("p", mem=3000), nodes=["a"])
    assert isinstance(placed, Placement) and placed.node == "a"


def test_pods_on_a_quarantined_node_keep_their_slices_and_placement() -> None:
    s = scheduler("hami")
    held = s.decide(pod("held", mem=5000))
    assert isinstance(held, Placement)
    s.cluster.apply(held)
    n = s.cluster.node_index[held.node]
    s.cluster.quarantine(held.node, quarantines.LEDGER_DELETED, "deleted")
    assert s.decide(pod("held", mem=5000)) == held
    assert int(s.cluster.dev_mem_used[n].sum()) == 5000


def test_only_ledger_quarantines_make_a_nodes_holdings_unknown() -> None:
    c = scheduler("hami").cluster
    assert c.unknown_ledgers() == set()
    c.quarantine("a", quarantines.REGISTRATION_UNREADABLE, "x")
    assert c.unknown_ledgers() == set()  # its ledger is still read
    c.quarantine("b", quarantines.LEDGER_DELETED, "y")
    c.quarantine("never-registered", quarantines.LEDGER_UNREADABLE, "z")
    assert c.unknown_ledgers() == {"b", "never-registered"}
    c.lift("b", quarantines.LEDGER_DELETED)
    assert c.unknown_ledgers() == {"never-registered"}
