"""A small stack in this process for the metrics tests: admission, scheduler replicas and
the metrics service on a test's prefix, and a small replay driven through them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.traces import TracePod
from services.admission import app as admission_app
from services.admission.settings import Settings as AdmissionSettings
from services.metrics import app as metrics_app
from services.metrics.settings import Settings as MetricsSettings
from services.scheduler.settings import Settings as SchedulerSettings
from tests.bus import helpers
from vslice import replays_bus

T = TypeVar("T")


@contextlib.asynccontextmanager
async def admission(bus: BusSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(admission_app.main(AdmissionSettings(bus=bus), stop=stop))
    try:
        await helpers.wait_for_subscribers(bus, bus.subjects.admission_review)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def metrics(bus: BusSettings, **overrides: object) -> AsyncIterator[str]:
    """The metrics service serving on a free loopback port; yields its base URL. The
    buckets are created first, as the scheduler would (metrics only opens them)."""
    nc = await connecting.connect(bus, name="bucket-creator")
    try:
        await connecting.ensure_bus(nc.jetstream(), bus)
    finally:
        await nc.close()
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    base = MetricsSettings(bus=bus, host="127.0.0.1", port=0, stats_interval_s=0.2)
    settings = dataclasses.replace(base, **overrides)
    task = asyncio.create_task(metrics_app.main(settings, stop=stop, on_serving=port.set_result))
    try:
        done, _ = await asyncio.wait({task, port}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        if port not in done:
            raise TimeoutError("the metrics service did not serve within 60 s")
        yield f"http://127.0.0.1:{port.result()}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    return await asyncio.to_thread(fetch)


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, timeout_s: float = 10.0
) -> T:
    """``probe()`` until ``ok`` holds for its result; the last result when time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = await probe()
        if ok(got) or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.1)


def pods(count: int, *, seed: int = 5) -> list[TracePod]:
    """Trace pods of the shapes the openb traces have: fractional GPUs, whole and multi-GPU."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.7:
            out.append(TracePod(f"frac-{i}", 1000, 1024, 1, rng.choice((250, 300, 500)), ()))
        elif kind < 0.9:
            out.append(TracePod(f"whole-{i}", 1000, 1024, 1, 1000, ()))
        else:
            out.append(TracePod(f"pair-{i}", 1000, 1024, 2, 1000, ()))
    return out


async def replay(bus: BusSettings, trace: list[TracePod]) -> replays_bus.Driven:
    """Send ``trace`` through admission and the replicas (``replays_bus.drive``)."""
    specs = [
        events.ENCODER.encode(replays_bus.pod_spec(p, f"uid-{i}")) for i, p in enumerate(trace)
    ]
    return await replays_bus.drive(bus, specs, concurrency=4)


@contextlib.asynccontextmanager
async def schedulers(bus: BusSettings, count: int = 2) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for i in range(count):
            await stack.enter_async_context(
                helpers.replica(SchedulerSettings(bus=bus, name=f"r{i}"))
            )
        yield
