"""The scheduler's decision lines: the fields of each kind, without a bus."""

from __future__ import annotations

import asyncio
import contextvars
import logging

import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from libshared.resources import ContainerRequest, PodRequest
from services.scheduler.adapters import decisions

POD = PodRequest(
    uid="uid-1",
    namespace="ml",
    name="train",
    containers=(
        ContainerRequest(
            name="main", index=0, init=False, gpu_count=1, memory_mib=4000, cores_percent=30
        ),
    ),
)


def placement() -> events.Placement:
    return events.Placement(
        pod_uid="uid-1",
        namespace="ml",
        pod="train",
        node="node-3",
        slices=(
            Slice(
                pod_uid="uid-1",
                namespace="ml",
                pod="train",
                container="main",
                container_index=0,
                uuid="GPU-aaaa",
                device_index=1,
                memory_mib=4000,
                cores_percent=30,
            ),
        ),
        charge=PodCharge(pod_uid="uid-1"),
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vslice.decisions"]


def test_a_placement_line_names_pod_policy_node_devices_and_latency(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    decisions.taking(POD.uid, POD)
    decisions.scheduled(placement(), pod=POD, policy="binpack", replica="r1")
    (line,) = lines(caplog)
    assert line.levelno == logging.INFO
    assert line.event == "schedule"  # type: ignore[attr-defined]
    assert line.pod == "ml/train"  # type: ignore[attr-defined]
    assert line.pod_uid == "uid-1"  # type: ignore[attr-defined]
    assert line.policy == "binpack"  # type: ignore[attr-defined]
    assert line.outcome == "placed"  # type: ignore[attr-defined]
    assert line.node == "node-3"  # type: ignore[attr-defined]
    assert line.devices == [  # type: ignore[attr-defined]
        {"uuid": "GPU-aaaa", "container": "main", "memory_mib": 4000, "cores_percent": 30}
    ]
    assert line.replica == "r1"  # type: ignore[attr-defined]
    assert isinstance(line.latency_ms, float) and line.latency_ms >= 0  # type: ignore[attr-defined]
    assert not hasattr(line, "reasons")


def test_an_unschedulable_line_carries_the_reason_and_each_nodes_reasons(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    pod = PodRequest(uid="uid-2", namespace="ml", name="big", node_policy="spread")
    refused = events.Unschedulable(
        pod_uid="uid-2",
        reason="no node fits",
        node_reasons={"node-0": "1/1 CardInsufficientMemory"},
    )
    decisions.taking(pod.uid, pod)
    decisions.scheduled(refused, pod=pod, policy="hami", replica="r2")
    (line,) = lines(caplog)
    assert line.outcome == "unschedulable"  # type: ignore[attr-defined]
    assert line.reason == "no node fits"  # type: ignore[attr-defined]
    assert line.reasons == {"node-0": "1/1 CardInsufficientMemory"}  # type: ignore[attr-defined]
    assert line.node_policy == "spread"  # type: ignore[attr-defined]
    assert not hasattr(line, "node") and not hasattr(line, "devices")


def test_the_latency_counts_from_the_moment_the_request_was_taken_in(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    clock = iter([100.0, 100.25])
    monkeypatch.setattr(decisions.time, "monotonic", lambda: next(clock))
    decisions.taking(POD.uid, POD)
    decisions.scheduled(placement(), pod=POD, policy="hami", replica="r1")
    assert lines(caplog)[0].latency_ms == 250.0  # type: ignore[attr-defined]


async def test_a_conflict_line_names_the_pod_of_the_request_in_its_own_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")

    async def request(pod: PodRequest, node: str) -> None:
        decisions.taking(pod.uid, pod)
        await asyncio.sleep(0)  # the other request takes its own in between
        decisions.conflict(node=node, revision=7, replica="r1")

    other = PodRequest(uid="uid-9", namespace="ml", name="eval")
    await asyncio.gather(request(POD, "node-1"), request(other, "node-2"))
    got = {(r.pod, r.pod_uid, r.node, r.revision, r.event) for r in lines(caplog)}  # type: ignore[attr-defined]
    assert got == {
        ("ml/train", "uid-1", "node-1", 7, "conflict"),
        ("ml/eval", "uid-9", "node-2", 7, "conflict"),
    }


async def test_a_conflict_outside_a_request_is_logged_without_a_pod(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")

    async def sweep() -> None:  # a fresh task: no request in hand
        decisions.conflict(node="node-1", revision=3, replica="r1")

    await asyncio.create_task(sweep(), context=contextvars.Context())
    (line,) = lines(caplog)
    assert line.node == "node-1" and line.latency_ms is None  # type: ignore[attr-defined]
    assert not hasattr(line, "pod_uid")


@pytest.mark.parametrize(
    ("ack", "node", "slices"),
    [
        (events.Ack(pod_uid="uid-1", node="node-3", slices=2), "node-3", 2),
        (events.Ack(pod_uid="uid-1"), None, 0),
    ],
    ids=["freed", "held nothing"],
)
def test_a_release_line_names_the_pod_its_node_and_slices(
    caplog: pytest.LogCaptureFixture, ack: events.Ack, node: str | None, slices: int
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    decisions.taking("uid-1")
    decisions.released(ack, replica="r1")
    (line,) = lines(caplog)
    assert (line.event, line.pod_uid, line.node, line.slices) == (  # type: ignore[attr-defined]
        "release",
        "uid-1",
        node,
        slices,
    )
    assert line.latency_ms >= 0  # type: ignore[attr-defined]


def test_decision_lines_are_dropped_when_their_logger_is_turned_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vslice.decisions")
    decisions.taking(POD.uid, POD)
    decisions.scheduled(placement(), pod=POD, policy="hami", replica="r1")
    decisions.released(events.Ack(pod_uid="uid-1"), replica="r1")
    assert lines(caplog) == []
