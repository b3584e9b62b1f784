"""Every process of a ``vslice up`` stack SIGKILLed in turn under ten concurrent clients:
no acknowledged placement lost, none double-booked (the short form of
``benchmarks/chaos.py``, which prints the same counts for a long run)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from benchmarks import chaos
from libshared import events
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, PodCharge, Slice

DEVICES = [("GPU-chaos-0", 16000), ("GPU-chaos-1", 16000), ("GPU-chaos-2", 16000)]


@pytest.mark.timeout(400)
async def test_killing_every_process_in_turn_loses_and_double_books_no_acknowledged_placement(
    tmp_path: Path,
) -> None:
    outcome = await chaos.run(
        seconds=15,
        clients=10,
        kill_every_s=1.5,
        devices=DEVICES,
        state_dir=tmp_path / "state",
        say=print,
    )
    print(chaos.report(outcome))
    assert Counter(k.name for k in outcome.kills).keys() == set(chaos.VICTIMS)
    assert [k for k in outcome.kills if k.error] == []
    assert outcome.problems == []
    assert (outcome.lost, outcome.double_booked, outcome.leaked, outcome.unresolved) == (0, 0, 0, 0)
    # the clients did work throughout: enough placed, released and refused to mean something
    assert outcome.acknowledged > 100 and outcome.released > 50 and outcome.unschedulable > 10
    assert outcome.via_admission > 10 and outcome.resent > 5
    assert outcome.serving_after


def _slice(uid: str, uuid: str, memory_mib: int, cores: int = 10) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="default",
        pod=uid,
        container="main",
        container_index=0,
        uuid=uuid,
        device_index=0,
        memory_mib=memory_mib,
        cores_percent=cores,
    )


def _placement(node: str, *slices: Slice) -> events.Placement:
    uid = slices[0].pod_uid
    return events.Placement(
        pod_uid=uid,
        namespace="default",
        pod=uid,
        node=node,
        slices=slices,
        charge=PodCharge(pod_uid=uid),
    )


NODES = [
    NodeDevices(node=n, devices=(Device(uuid=f"GPU-{n}", index=0, type="A100", memory_mib=8000),))
    for n in ("n1", "n2")
]


@pytest.mark.parametrize(
    ("ledger_slices", "want"),
    [
        pytest.param({"n1": [_slice("a", "GPU-n1", 3000)]}, (0, 0, 0), id="as-acknowledged"),
        pytest.param({}, (1, 0, 0), id="acknowledged-but-missing-is-lost"),
        pytest.param({"n1": [_slice("a", "GPU-n1", 2000)]}, (1, 0, 0), id="other-size-is-lost"),
        pytest.param(
            {"n1": [_slice("a", "GPU-n1", 3000), _slice("b", "GPU-n1", 6000)]},
            (0, 1, 1),
            id="over-memory-is-double-booked",
        ),
        pytest.param(
            {"n1": [_slice("a", "GPU-n1", 3000), _slice("a", "GPU-n1", 3000)]},
            (1, 1, 0),
            id="slice-twice-is-double-booked",
        ),
        pytest.param(
            {"n1": [_slice("a", "GPU-n1", 3000)], "n2": [_slice("a", "GPU-n2", 3000)]},
            (1, 1, 0),
            id="pod-on-two-nodes-is-double-booked",
        ),
    ],
)
def test_the_chaos_check_counts_lost_double_booked_and_leaked_pods(
    ledger_slices: dict[str, list[Slice]], want: tuple[int, int, int]
) -> None:
    tally = chaos.Tally()
    tally.holdings["a"] = _placement("n1", _slice("a", "GPU-n1", 3000))
    tally.answers["a"] = 1
    ledgers = {n: NodeLedger(node=n, slices=tuple(s)) for n, s in ledger_slices.items()}
    lost, double, leaked, problems = chaos.check(tally, NODES, ledgers)
    assert (lost, double, leaked) == want
    assert bool(problems) == (want != (0, 0, 0))
