"""Wiring of the mock node agent: build the fleet, connect, register, consume, drain."""

from __future__ import annotations

import asyncio
import logging

from libshared import connecting, traces
from libshared.devices import NodeDevices
from libshared.subjects import valid_node
from services.nodeagent.adapters import bus
from services.nodeagent.core import fleets
from services.nodeagent.settings import Settings

log = logging.getLogger("vslice.nodeagent")


def hosted_nodes(settings: Settings) -> list[NodeDevices]:
    """The nodes to host: the ``fleet_csv`` node list, else ``spec``.

    Raises ``OSError``/``TraceFormatError`` for an unreadable CSV and ``ValueError`` for a
    node name that cannot be a subject token.
    """
    if settings.fleet_csv:
        if settings.split_count:
            nodes = traces.read_fleet(settings.fleet_csv, split_count=settings.split_count)
        else:
            nodes = traces.read_fleet(settings.fleet_csv)
    else:
        nodes = fleets.build(settings.spec)
    bad = [n.node for n in nodes if not valid_node(n.node)]
    if bad:
        raise ValueError(f"node names not usable on the bus: {bad[:5]}")
    return nodes


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Register the nodes and answer their allocations until ``stop`` (default: SIGTERM)."""
    stop = connecting.stop_on_signals(stop)
    nodes = hosted_nodes(settings)
    nc = await connecting.connect(settings.bus, name=f"nodeagent-{settings.name}")
    try:
        js = nc.jetstream(timeout=settings.bus.request_timeout_s)
        opened = await connecting.ensure_bus(js, settings.bus)
        agent = bus.Agent(
            js=js, bus=opened, subjects=settings.bus.subjects, name=settings.name, nodes=nodes
        )
        await agent.register()
        await agent.start()
        log.info("nodeagent serving", extra={"agent": settings.name, "nodes": len(nodes)})
        await stop.wait()
        await agent.stop()
    finally:
        await connecting.drain_quietly(nc)
    log.info("stopped", extra={"agent": settings.name})
