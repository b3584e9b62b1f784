"""A node agent whose node's ledger is unreadable (or deleted) starts all the same: it
warns, leaves the slices on its host root as they are, consumes and registers as ever,
and reconciles with the ledger once its value is readable again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from libshared import connecting, events, quarantines
from libshared.connecting import BusSettings
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, PodCharge, Slice
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from services.nodeagent.adapters import bus, hostroots
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import preparing

NODE = "node-0"
UUID = "GPU-0-0"


def slice_of(uid: str) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="ns",
        pod=uid,
        container="main",
        container_index=0,
        uuid=UUID,
        device_index=0,
        memory_mib=1000,
        cores_percent=10,
    )


def ledger_of(*uids: str) -> bytes:
    return events.ENCODER.encode(NodeLedger(node=NODE, slices=tuple(slice_of(u) for u in uids)))


@contextlib.asynccontextmanager
async def running_agent(settings: BusSettings, root: Path) -> AsyncIterator[bus.Agent]:
    nc = await connecting.connect(settings, name="agent")
    js = nc.jetstream()
    agent = bus.Agent(
        nc=nc,
        js=js,
        bus=await connecting.ensure_bus(js, settings, create=False),
        subjects=settings.subjects,
        name=NODE,
        nodes=[
            NodeDevices(
                node=NODE,
                devices=(Device(uuid=UUID, index=0, type="A100", memory_mib=16000),),
            )
        ],
        slicer=Slicer(node=NODE, layout=preparing.Layout(root=str(root), libvgpu="/l.so")),
        ledger_retry_s=0.05,
    )
    try:
        await agent.register()
        await agent.start()
        yield agent
    finally:
        await agent.stop()
        await nc.close()


@pytest.mark.parametrize("fault", ["corrupt", "deleted"])
async def test_an_agent_starts_on_an_unreadable_ledger_keeps_its_slices_and_reconciles_later(
    nats_server: NatsServer,
    prefix: str,
    nc: Client,
    bus_settings: BusSettings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    settings = nats_server.identity(f"agent-{prefix}", Role.NODEAGENT, prefix=prefix, node=NODE)
    await opened.ledger.put(NODE, ledger_of("a"))
    async with running_agent(settings, tmp_path) as first:
        assert first.reconciled.is_set()
    assert hostroots.existing(tmp_path) == ["a_main"]

    if fault == "corrupt":
        await opened.ledger.put(NODE, b"\x00 not a ledger")
    else:
        await opened.ledger.delete(NODE)
    with caplog.at_level(logging.WARNING, logger="vslice.nodeagent"):
        async with running_agent(settings, tmp_path) as agent:
            warned = [r for r in caplog.records if "ledger unreadable" in r.getMessage()]
            assert warned and warned[0].levelno == logging.WARNING
            reason = getattr(warned[0], "reason", None)
            assert reason == (
                quarantines.LEDGER_UNREADABLE if fault == "corrupt" else quarantines.LEDGER_DELETED
            )
            assert not agent.reconciled.is_set()
            assert agent._task is not None and not agent._task.done()  # consuming
            assert hostroots.existing(tmp_path) == ["a_main"]  # nothing released
            assert (await opened.nodes.get(NODE)).value  # registered as ever
            # a pod placed meanwhile is still prepared when its placement arrives
            placed = events.Placement(
                pod_uid="b", namespace="ns", pod="b", node=NODE, slices=(slice_of("b"),),
                charge=PodCharge(pod_uid="b"),
            )  # fmt: skip
            await nc.jetstream().publish(
                bus_settings.subjects.alloc_decided(NODE), events.ENCODER.encode(placed)
            )
            async with asyncio.timeout(20):
                while "b" not in agent.answers:
                    await asyncio.sleep(0.02)
            assert isinstance(agent.answers["b"], events.Ready)

            await opened.ledger.put(NODE, ledger_of("b", "c"))
            async with asyncio.timeout(20):
                await agent.reconciled.wait()
            assert "c_main" in hostroots.existing(tmp_path)
            assert agent.slicer is not None and set(agent.slicer.containers) >= {
                "b_main",
                "c_main",
            }
