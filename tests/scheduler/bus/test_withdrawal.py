"""A node deleted from ``<prefix>-nodes`` is withdrawn: the replicas offer it to no new pod,
the pods it holds keep their slices until released, and registering it again offers it
again. A node agent run with ``--unregister`` deletes its nodes when it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError

from libshared import connecting, events, kvreads
from libshared.connecting import BusSettings
from services.nodeagent import settings as agent_settings
from services.nodeagent.core.fleets import FleetSpec
from services.nodeagent.settings import Settings as AgentSettings
from services.scheduler.adapters import bus
from tests.bus import helpers
from tests.bus.test_nodeagent import agent, registered
from tests.scheduler.bus.test_claims import replicas


async def until(check: Callable[[], bool], what: str, *, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def offered(r: bus.Replica, node: str) -> bool:
    c = r.view.cluster
    return node in c.node_index and bool(c.offered[c.node_index[node]])


async def test_a_deleted_node_takes_no_new_pod_and_keeps_its_pods_until_released(
    nc: Client, bus_settings: BusSettings
) -> None:
    nodes = helpers.fleet(nodes=2, gpus=1, memory_mib=16000, split=10)
    await helpers.register(nc, bus_settings, nodes)
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 2) as rs:
        held = await rs[0].schedule(helpers.pod("held", memory_mib=4000))
        assert isinstance(held, events.Placement)
        gone, other = held.node, ({"node-0", "node-1"} - {held.node}).pop()
        await opened.nodes.delete(gone)
        await until(lambda: not any(offered(r, gone) for r in rs), "the node is still offered")

        for i in range(6):  # room for all of them on either node
            placed = await rs[i % 2].schedule(helpers.pod(f"p{i}", memory_mib=2000))
            assert isinstance(placed, events.Placement) and placed.node == other, placed
        assert await rs[1].schedule(helpers.pod("held", memory_mib=4000)) == held
        ledgers = await helpers.ledgers(nc, bus_settings)
        assert ledgers[gone].pods() == {"held"}
        full = await rs[0].schedule(helpers.pod("too-big", memory_mib=8000))
        assert isinstance(full, events.Unschedulable) and full.reason.startswith("0/1 nodes")

        ack = await rs[1].release("held")
        assert ack.node == gone and ack.slices == 1
        assert (await helpers.ledgers(nc, bus_settings))[gone].slices == ()

        await helpers.register(nc, bus_settings, [n for n in nodes if n.node == gone])
        await until(lambda: all(offered(r, gone) for r in rs), "the node is not offered again")
        back = await rs[0].schedule(helpers.pod("too-big", memory_mib=8000))
        assert isinstance(back, events.Placement) and back.node == gone


async def test_a_node_agent_with_unregister_deletes_its_nodes_when_it_stops(
    nc: Client, bus_settings: BusSettings
) -> None:
    parsed = agent_settings.parse(["--unregister", "--nodes", "2"], {})
    assert parsed.unregister and not agent_settings.parse([], {}).unregister
    js = nc.jetstream()
    opened = await connecting.ensure_bus(js, bus_settings)
    leaving = AgentSettings(
        bus=bus_settings, spec=FleetSpec(nodes=2, name_prefix="leave"), name="l", unregister=True
    )
    staying = AgentSettings(bus=bus_settings, spec=FleetSpec(nodes=1, name_prefix="stay"), name="s")
    async with replicas(bus_settings, 1) as (r,):
        async with agent(staying), agent(leaving):
            await registered(nc, bus_settings, 3)
            await until(lambda: offered(r, "leave-1"), "the agent's nodes are not offered")
            await js.consumer_info(bus_settings.subjects.alloc_stream, "nodeagent-l")
        await until(lambda: not offered(r, "leave-0") and not offered(r, "leave-1"), "offered")
        assert await kvreads.keys(opened.nodes) == ["stay-0"]
        assert offered(r, "stay-0")
        with pytest.raises(NotFoundError):
            await js.consumer_info(bus_settings.subjects.alloc_stream, "nodeagent-l")
        placed = await r.schedule(helpers.pod("p", memory_mib=1000))
        assert isinstance(placed, events.Placement) and placed.node == "stay-0"


async def test_the_view_of_a_replica_started_after_the_deletion_never_offers_the_node(
    nc: Client, bus_settings: BusSettings
) -> None:
    nodes = helpers.fleet(nodes=2, gpus=1)
    await helpers.register(nc, bus_settings, nodes)
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    await opened.nodes.purge("node-0")
    with pytest.raises((KeyNotFoundError, KeyDeletedError)):
        await opened.nodes.get("node-0")
    async with replicas(bus_settings, 1) as (r,):
        assert not offered(r, "node-0") and offered(r, "node-1")
        for i in range(3):
            placed = await r.schedule(helpers.pod(f"p{i}", memory_mib=1000))
            assert isinstance(placed, events.Placement) and placed.node == "node-1"


async def test_a_release_after_the_node_was_withdrawn_and_the_replicas_restarted_frees_its_slices(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 1) as (r,):
        placed = await r.schedule(helpers.pod("stays", memory_mib=1000))
        assert isinstance(placed, events.Placement)
    await opened.nodes.purge(placed.node)  # withdrawn while no replica runs
    async with replicas(bus_settings, 1) as (r,):
        assert placed.node not in r.view.cluster.node_index  # the view never knew it
        again = await r.schedule(helpers.pod("stays", memory_mib=1000))
        assert again == placed  # a re-sent request is answered where the pod is
        ack = await r.release("stays")
        assert (ack.node, ack.slices) == (placed.node, 1)
        ledgers = await helpers.ledgers(nc, bus_settings)
        assert all("stays" not in ledger.pods() for ledger in ledgers.values())
