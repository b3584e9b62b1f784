"""Helpers of the bus tests: a small fleet, pods, requests, replicas run in process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import nats.errors
from nats.aio.client import Client

from libshared import connecting, events, kvreads
from libshared.connecting import BusSettings
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger
from libshared.resources import ContainerRequest, PodRequest
from libshared.subjects import deadline_headers
from services.scheduler import app as scheduler_app
from services.scheduler.settings import Settings as SchedulerSettings

LEDGER = msgspec.json.Decoder(NodeLedger)


def fleet(
    nodes: int = 2, gpus: int = 2, memory_mib: int = 16384, split: int = 4
) -> list[NodeDevices]:
    return [
        NodeDevices(
            node=f"node-{n}",
            devices=tuple(
                Device(
                    uuid=f"GPU-{n}-{g}",
                    index=g,
                    type="NVIDIA-A100",
                    memory_mib=memory_mib,
                    split_count=split,
                )
                for g in range(gpus)
            ),
        )
        for n in range(nodes)
    ]


def pod(uid: str, *, gpus: int = 1, memory_mib: int = 0, cores: int = 0) -> PodRequest:
    """A one-container pod: a fractional slice when ``memory_mib`` is set, else whole GPUs."""
    if memory_mib:
        c = ContainerRequest(
            name="main",
            index=0,
            init=False,
            gpu_count=gpus,
            memory_mib=memory_mib,
            cores_percent=cores,
        )
    else:
        c = ContainerRequest(
            name="main",
            index=0,
            init=False,
            gpu_count=gpus,
            memory_percent=100,
            cores_percent=100,
        )
    return PodRequest(uid=uid, namespace="default", name=uid, containers=(c,))


async def register(nc: Client, settings: BusSettings, nodes: list[NodeDevices]) -> None:
    """Put every node into the nodes bucket (retried while a new replicated bucket has no
    leader yet: its first writes find no responders)."""
    bus = await connecting.ensure_bus(nc.jetstream(), settings)
    for node in nodes:
        for attempt in range(40):
            try:
                await bus.nodes.put(node.node, events.ENCODER.encode(node))
                break
            except nats.errors.Error:
                if attempt == 39:
                    raise
                await asyncio.sleep(0.25)


async def ledgers(nc: Client, settings: BusSettings) -> dict[str, NodeLedger]:
    """Every node's ledger as stored (retried while a NATS node fails over)."""
    for attempt in range(40):
        try:
            bus = await connecting.ensure_bus(nc.jetstream(), settings)
            async with asyncio.timeout(10):
                entries = await kvreads.latest(bus.ledger)
            return {key: LEDGER.decode(e.value or b"") for key, e in entries.items()}
        except (nats.errors.Error, TimeoutError):
            if attempt == 39:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")


async def schedule(
    nc: Client, settings: BusSettings, request: PodRequest, *, timeout_s: float = 5.0
) -> events.Placement | events.Unschedulable | events.BusError:
    msg = await nc.request(
        settings.subjects.sched_schedule,
        events.ENCODER.encode(request),
        timeout=timeout_s,
        headers=deadline_headers(timeout_s, now=time.time()),
    )
    return events.SCHEDULE_REPLY.decode(msg.data)


async def release(
    nc: Client, settings: BusSettings, uid: str, *, timeout_s: float = 5.0
) -> events.Ack | events.BusError:
    msg = await nc.request(
        settings.subjects.sched_release,
        events.ENCODER.encode(events.Release(pod_uid=uid)),
        timeout=timeout_s,
    )
    return events.RELEASE_REPLY.decode(msg.data)


@contextlib.asynccontextmanager
async def replica(settings: SchedulerSettings) -> AsyncIterator[None]:
    """A scheduler replica in this process, serving once it subscribed."""
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler_app.main(settings, stop=stop))
    try:
        await wait_for_subscribers(settings.bus, settings.bus.subjects.sched_stats)
        if task.done():
            task.result()
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_for_subscribers(
    settings: BusSettings, subject: str, *, timeout_s: float = 20.0
) -> None:
    nc = await connecting.connect(settings, name="probe")
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await nc.request(subject, b"", timeout=0.2)
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
    finally:
        await nc.close()
