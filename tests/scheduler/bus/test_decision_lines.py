"""A replica on the bus writes one decision line per decision, ledger conflict and release."""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.client import Client

from libshared import events
from libshared.connecting import BusSettings
from services.scheduler.settings import Settings
from tests.bus import helpers


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "vslice.decisions" and getattr(r, "event", None) == event
    ]


async def stats(nc: Client, bus: BusSettings, count: int) -> list[events.Stats]:
    """The counters of ``count`` replicas (waits for every one to answer)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(bus.subjects.sched_stats, b"", reply=inbox)
    out: dict[str, events.Stats] = {}
    while len(out) < count:
        msg = await sub.next_msg(timeout=10)
        if msg.data:
            one = events.STATS.decode(msg.data)
            out[one.name] = one
    await sub.unsubscribe()
    return list(out.values())


async def test_each_decision_and_release_over_the_bus_writes_one_line(
    nc: Client, bus_settings: BusSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1, memory_mib=8000))
    async with helpers.replica(Settings(bus=bus_settings, name="r1", policy="hami-binpack")):
        placed = await helpers.schedule(nc, bus_settings, helpers.pod("a", memory_mib=3000))
        refused = await helpers.schedule(nc, bus_settings, helpers.pod("b", memory_mib=9000))
        ack = await helpers.release(nc, bus_settings, "a")
    assert isinstance(placed, events.Placement) and isinstance(refused, events.Unschedulable)
    assert isinstance(ack, events.Ack)
    schedule = lines(caplog, "schedule")
    assert [(r.pod_uid, r.outcome, r.policy, r.replica) for r in schedule] == [  # type: ignore[attr-defined]
        ("a", "placed", "hami-binpack", "r1"),
        ("b", "unschedulable", "hami-binpack", "r1"),
    ]
    assert schedule[0].node == placed.node  # type: ignore[attr-defined]
    assert [d["uuid"] for d in schedule[0].devices] == [s.uuid for s in placed.slices]  # type: ignore[attr-defined]
    assert "CardInsufficientMemory" in schedule[1].reasons["node-0"]  # type: ignore[attr-defined]
    assert all(r.latency_ms > 0 for r in schedule)  # type: ignore[attr-defined]
    (release,) = lines(caplog, "release")
    assert (release.pod_uid, release.node, release.slices) == ("a", placed.node, 1)  # type: ignore[attr-defined]


async def test_every_lost_ledger_race_writes_a_conflict_line_naming_its_pod(
    nc: Client, bus_settings: BusSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas placing many pods on one node at once lose compare-and-sets to each
    other; each one lost is a line naming the pod whose commit lost, as many lines as the
    replicas count conflicts."""
    caplog.set_level(logging.INFO, logger="vslice.decisions")
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=4, memory_mib=80000))
    one = Settings(bus=bus_settings, name="r1")
    two = Settings(bus=bus_settings, name="r2")
    uids: set[str] = set()
    async with helpers.replica(one), helpers.replica(two):
        for round_ in range(10):
            batch = [f"p{round_}-{i}" for i in range(16)]
            uids.update(batch)
            await asyncio.gather(
                *(helpers.schedule(nc, bus_settings, helpers.pod(u, memory_mib=10)) for u in batch)
            )
            await asyncio.gather(*(helpers.release(nc, bus_settings, u) for u in batch))
            if lines(caplog, "conflict"):
                break
        counted = sum(s.conflicts for s in await stats(nc, bus_settings, 2))
    conflicts = lines(caplog, "conflict")
    assert conflicts, "two replicas on one node never lost a race in 10 rounds"
    assert len(conflicts) == counted
    assert all(r.node == "node-0" and r.pod_uid in uids for r in conflicts)  # type: ignore[attr-defined]
    assert all(r.revision >= 0 for r in conflicts)  # type: ignore[attr-defined]
