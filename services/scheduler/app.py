"""Wiring of one scheduler replica: connect, open the buckets, build the core, serve, drain.

Lifecycle (nats.py's habit): SIGTERM or SIGINT sets an ``asyncio.Event``; the replica then
drains its connection -- no new requests, the ones in hand answered -- within the drain
timeout, and returns. Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import logging

from libshared import connecting, traces
from services.scheduler.adapters import bus
from services.scheduler.core import replaying
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler
from services.scheduler.settings import Settings

log = logging.getLogger("vslice.scheduler")


def build_scheduler(settings: Settings) -> Scheduler:
    """The core scheduler for ``settings`` over an empty view (reads the workload trace
    for ``fgd``). Raises ``OSError``/``TraceFormatError`` for an unreadable trace."""
    workload = None
    if settings.workload_trace:
        workload = replaying.trace_workload(traces.read_pods(settings.workload_trace))
    cluster = Cluster(max_devices=settings.max_devices)
    return Scheduler(cluster, policy=settings.policy, workload=workload, seed=settings.seed)


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run a replica until ``stop`` is set; without one, until SIGTERM/SIGINT."""
    stop = connecting.stop_on_signals(stop)
    scheduler = build_scheduler(settings)
    nc = await connecting.connect(settings.bus, name=f"scheduler-{settings.name}")
    try:
        js = nc.jetstream(timeout=settings.bus.request_timeout_s)
        opened = await connecting.ensure_bus(js, settings.bus)
        replica = bus.Replica(
            nc=nc,
            js=js,
            bus=opened,
            subjects=settings.bus.subjects,
            scheduler=scheduler,
            name=settings.name,
            max_attempts=settings.max_attempts,
            explain=settings.explain,
            sync_timeout_s=settings.sync_timeout_s,
            claim_wait_s=settings.claim_wait_s,
            max_in_flight=settings.max_in_flight,
        )
        await replica.start()
        log.info("scheduler serving", extra={"replica": settings.name, "policy": settings.policy})
        await stop.wait()
        log.info("draining", extra={"replica": settings.name})
        await replica.stop()
    finally:
        await connecting.drain_quietly(nc)
    log.info("stopped", extra={"replica": settings.name})
