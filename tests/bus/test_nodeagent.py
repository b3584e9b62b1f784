"""The mock node agent: registers its nodes, answers ready, and misses nothing while down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from services.nodeagent import app
from services.nodeagent.core import fleets
from services.nodeagent.core.fleets import FleetSpec
from services.nodeagent.settings import Settings as AgentSettings
from services.scheduler.settings import Settings as SchedulerSettings
from tests.bus import helpers


@contextlib.asynccontextmanager
async def agent(settings: AgentSettings) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(app.main(settings, stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def registered(nc: Client, bus: BusSettings, count: int) -> list[NodeDevices]:
    kv = (await connecting.ensure_bus(nc.jetstream(), bus)).nodes
    for _ in range(200):
        try:
            keys = await kv.keys()
        except Exception:
            keys = []
        if len(keys) >= count:
            decoder = msgspec.json.Decoder(NodeDevices)
            return [decoder.decode((await kv.get(k)).value or b"") for k in sorted(keys)]
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} nodes registered")


async def test_a_fleet_spec_registers_every_node_and_placements_are_answered_ready(
    nc: Client, bus_settings: BusSettings
) -> None:
    spec = FleetSpec(nodes=3, gpus=2, memory_mib=8000, name_prefix="box")
    readies: asyncio.Queue[events.Ready] = asyncio.Queue()

    async def on_ready(msg: object) -> None:
        answer = events.NODE_ANSWER.decode(msg.data)
        assert isinstance(answer, events.Ready)
        await readies.put(answer)

    await nc.subscribe(f"{bus_settings.prefix}.alloc.*.ready", cb=on_ready)
    async with agent(AgentSettings(bus=bus_settings, spec=spec, name="a1")):
        nodes = await registered(nc, bus_settings, 3)
        assert [n.node for n in nodes] == ["box-0", "box-1", "box-2"]
        assert all(len(n.devices) == 2 and n.devices[0].memory_mib == 8000 for n in nodes)
        async with helpers.replica(SchedulerSettings(bus=bus_settings, name="r")):
            placed = await helpers.schedule(
                nc, bus_settings, helpers.pod("p1", memory_mib=3000, cores=25)
            )
            assert isinstance(placed, events.Placement)
            ready = await asyncio.wait_for(readies.get(), 10)
    assert (ready.pod_uid, ready.node) == ("p1", placed.node)
    env = ready.env["main"]
    assert env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    assert env["CUDA_DEVICE_SM_LIMIT"] == "25"
    assert env["NVIDIA_VISIBLE_DEVICES"] == placed.slices[0].uuid


async def test_placements_decided_while_the_agent_is_down_are_answered_when_it_returns(
    nc: Client, bus_settings: BusSettings, tmp_path: Path
) -> None:
    fleet = tmp_path / "nodes.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nn-a,64000,262144,2,T4\n")
    settings = AgentSettings(bus=bus_settings, fleet_csv=str(fleet), name="csv-agent")
    ready_uids: list[str] = []

    async def on_ready(msg: object) -> None:
        ready_uids.append(events.NODE_ANSWER.decode(msg.data).pod_uid)

    await nc.subscribe(bus_settings.subjects.alloc_ready("n-a"), cb=on_ready)
    async with agent(settings):
        await registered(nc, bus_settings, 1)
    async with helpers.replica(SchedulerSettings(bus=bus_settings, name="r")):
        for uid in ("x1", "x2"):
            reply = await helpers.schedule(nc, bus_settings, helpers.pod(uid, memory_mib=1000))
            assert isinstance(reply, events.Placement) and reply.node == "n-a"
    assert ready_uids == []
    async with agent(settings):
        for _ in range(200):
            if len(ready_uids) == 2:
                break
            await asyncio.sleep(0.05)
    assert sorted(ready_uids) == ["x1", "x2"]


class Heard(logging.Handler):
    """Sets ``event`` when a record with ``message`` is logged."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.event.set()


async def test_an_agent_started_before_the_alloc_stream_exists_waits_for_it_and_serves(
    nc: Client, bus_settings: BusSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the creator makes the buckets first and the alloc stream last; an agent that
    # finds the buckets alone must wait for the stream, not fail its start
    subjects = bus_settings.subjects
    js = nc.jetstream()
    for bucket in (subjects.nodes_bucket, subjects.ledger_bucket, subjects.pods_bucket):
        await js.create_key_value(bucket=bucket)
    fleet = tmp_path / "nodes.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nn-b,64000,262144,1,T4\n")
    readies: asyncio.Queue[str] = asyncio.Queue()

    async def on_ready(msg: object) -> None:
        await readies.put(events.NODE_ANSWER.decode(msg.data).pod_uid)

    await nc.subscribe(subjects.alloc_ready("n-b"), cb=on_ready)
    caplog.set_level(logging.INFO, logger="vslice.nodeagent")
    heard = Heard("waiting for the alloc stream")
    logging.getLogger("vslice.nodeagent").addHandler(heard)
    try:
        settings = AgentSettings(bus=bus_settings, fleet_csv=str(fleet), name="early")
        async with agent(settings) as running:
            waited = asyncio.create_task(heard.event.wait())
            done, _ = await asyncio.wait(
                {waited, running}, timeout=20, return_when=asyncio.FIRST_COMPLETED
            )
            waited.cancel()
            assert waited in done, f"the agent did not wait for the stream: {running}"
            await connecting.ensure_bus(js, bus_settings)  # the stream, last
            async with helpers.replica(SchedulerSettings(bus=bus_settings, name="r")):
                reply = await helpers.schedule(nc, bus_settings, helpers.pod("e1", memory_mib=500))
                assert isinstance(reply, events.Placement) and reply.node == "n-b"
                assert await asyncio.wait_for(readies.get(), 20) == "e1"
            assert not running.done()
    finally:
        logging.getLogger("vslice.nodeagent").removeHandler(heard)


def test_a_device_list_makes_one_node_with_exactly_those_devices() -> None:
    devices = fleets.parse_devices("GPU-a:4000, GPU-b:16384")
    assert devices == (("GPU-a", 4000), ("GPU-b", 16384))
    (node,) = fleets.build(FleetSpec(name_prefix="box", devices=devices))
    assert node.node == "box-0"
    assert [(d.uuid, d.index, d.memory_mib) for d in node.devices] == [
        ("GPU-a", 0, 4000),
        ("GPU-b", 1, 16384),
    ]
    for bad in ("GPU-a", "GPU-a:0", "GPU-a:1,GPU-a:2", ":5"):
        with pytest.raises(ValueError, match=r"GPU-a|:5"):
            fleets.parse_devices(bad)
    with pytest.raises(ValueError, match="one node"):
        fleets.build(FleetSpec(nodes=2, devices=devices))
