"""``vslice repair NODE`` rebuilds a node's ledger from its allocation history: the last
placement of each pod on the node not followed by its release, kept only while the pod is
still claimed and held on no other node."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from vslice import cli, repairs


def placed(
    uid: str, node: str = "n1", memory_mib: int = 1000, cpu_milli: int = 0
) -> events.Placement:
    s = Slice(
        pod_uid=uid,
        namespace="ns",
        pod=uid,
        container="main",
        container_index=0,
        uuid="GPU-0",
        device_index=0,
        memory_mib=memory_mib,
        cores_percent=10,
    )
    return events.Placement(
        pod_uid=uid, namespace="ns", pod=uid, node=node, slices=(s,),
        charge=PodCharge(pod_uid=uid, cpu_milli=cpu_milli),
    )  # fmt: skip


def gone(uid: str) -> events.Release:
    return events.Release(pod_uid=uid)


@pytest.mark.parametrize(
    ("history", "claimed", "elsewhere", "pods", "dropped"),
    [
        ([placed("a"), placed("b")], {"a", "b"}, set(), {"a": 1000, "b": 1000}, ()),
        ([placed("a"), placed("b"), gone("a")], {"a", "b"}, set(), {"b": 1000}, ()),
        # released, then placed again on the node: held
        ([placed("a"), gone("a"), placed("a", memory_mib=2000)], {"a"}, set(), {"a": 2000}, ()),
        # its release was committed but not announced: the claim is gone
        ([placed("a"), placed("b")], {"a"}, set(), {"a": 1000}, ("b",)),
        # released here and placed on another node since
        ([placed("a")], {"a"}, {"a"}, {}, ("a",)),
        # another node's placements are not this node's
        ([placed("a", node="n2")], {"a"}, set(), {}, ()),
        ([], set(), set(), {}, ()),
    ],
)
def test_a_rebuilt_ledger_holds_the_claimed_pods_placed_on_the_node_and_not_released(
    history: list[events.Placement | events.Release],
    claimed: set[str],
    elsewhere: set[str],
    pods: dict[str, int],
    dropped: tuple[str, ...],
) -> None:
    ledger, left_out = repairs.rebuilt_ledger(
        "n1", history, claimed=claimed, held_elsewhere=elsewhere
    )
    assert ledger.node == "n1" and left_out == dropped
    assert {s.pod_uid: s.memory_mib for s in ledger.slices} == pods


def test_a_rebuilt_ledger_keeps_only_the_node_level_charges_that_hold_something() -> None:
    ledger, _ = repairs.rebuilt_ledger(
        "n1", [placed("a", cpu_milli=500), placed("b")], claimed={"a", "b"}, held_elsewhere=set()
    )
    assert [(c.pod_uid, c.cpu_milli) for c in ledger.charges] == [("a", 500)]


def test_repair_is_a_command_that_needs_a_running_stack(tmp_path: Path) -> None:
    args = cli.parse(["repair", "node-7", "--state-dir", str(tmp_path)])
    assert args.command == "repair" and args.node == "node-7"
    assert cli.main(["repair", "node-7", "--state-dir", str(tmp_path)]) != 0
