"""Every service's ``/healthz`` and ``/readyz`` on its health port (``libshared.probes``)
against the session's nats-server: 503 while the service is still connecting, 200 once it
is connected with its buckets open and its views read, and 503 with the reason when the
scheduler's ledger watch stops following the bucket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest

from libshared import connecting, probes
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer, free_port
from libshared.permissions import Role
from services.admission import app as admission_app
from services.admission.settings import Settings as AdmissionSettings
from services.metrics import app as metrics_app
from services.metrics.settings import Settings as MetricsSettings
from services.nodeagent import app as nodeagent_app
from services.nodeagent.settings import Settings as AgentSettings
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus as scheduler_bus
from services.scheduler.settings import Settings as SchedulerSettings

Main = Callable[[BusSettings, probes.HealthSettings, asyncio.Event], Coroutine[Any, Any, None]]


def _scheduler(bus: BusSettings, health: probes.HealthSettings, stop: asyncio.Event) -> Any:
    return scheduler_app.main(SchedulerSettings(bus=bus, name="probed", health=health), stop=stop)


def _admission(bus: BusSettings, health: probes.HealthSettings, stop: asyncio.Event) -> Any:
    return admission_app.main(AdmissionSettings(bus=bus, health=health), stop=stop)


def _nodeagent(bus: BusSettings, health: probes.HealthSettings, stop: asyncio.Event) -> Any:
    return nodeagent_app.main(AgentSettings(bus=bus, name="probed", health=health), stop=stop)


def _metrics(bus: BusSettings, health: probes.HealthSettings, stop: asyncio.Event) -> Any:
    settings = MetricsSettings(bus=bus, host="127.0.0.1", port=0, health=health)
    return metrics_app.main(settings, stop=stop)


# service -> (its bus role, its identity's node, how to run it)
SERVICES: dict[str, tuple[Role, str, Main]] = {
    "scheduler": (Role.SCHEDULER, "", _scheduler),
    "admission": (Role.ADMISSION, "", _admission),
    "nodeagent": (Role.NODEAGENT, "*", _nodeagent),
    "metrics": (Role.METRICS, "", _metrics),
}


async def get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def until_ready(url: str, task: asyncio.Task[None], *, timeout_s: float = 60.0) -> str:
    """Poll ``url/readyz`` until 200; fails when the service ends first."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: tuple[int, str] = (0, "")
    while asyncio.get_running_loop().time() < deadline:
        if task.done():
            task.result()
            pytest.fail("the service ended before it was ready")
        with contextlib.suppress(aiohttp.ClientConnectionError):
            last = await get(url + "/readyz")
            if last[0] == 200:
                return last[1]
        await asyncio.sleep(0.1)
    pytest.fail(f"not ready within {timeout_s} s: {last}")


@contextlib.asynccontextmanager
async def running(
    main: Main, bus: BusSettings, health: probes.HealthSettings
) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(main(bus, health, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@contextlib.asynccontextmanager
async def held_proxy(target: str) -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A TCP proxy to the NATS server at ``target`` that holds every connection silent
    (a client waits for the server's INFO) until ``release`` is set; yields its URL, the
    event set on the first connection, and ``release``."""
    host, port = target.removeprefix("nats://").rsplit(":", 1)
    accepted, release = asyncio.Event(), asyncio.Event()
    pipes: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()
        await release.wait()
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writers.append(up_writer)
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            pipes.add(asyncio.create_task(task))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"nats://127.0.0.1:{bound}", accepted, release
    finally:
        server.close()
        for w in writers:
            w.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()


async def make_buckets(nats_server: NatsServer, prefix: str) -> None:
    nc = await connecting.connect(nats_server.bus_settings(prefix=prefix), name="bucket-maker")
    try:
        await connecting.ensure_bus(nc.jetstream(), nats_server.bus_settings(prefix=prefix))
    finally:
        await nc.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_readyz_is_503_while_connecting_and_200_once_connected_with_the_buckets_read(
    service: str, nats_server: NatsServer, prefix: str
) -> None:
    role, node, main = SERVICES[service]
    await make_buckets(nats_server, prefix)  # metrics and the node agent only open them
    bus = nats_server.identity(f"{service}-{prefix}", role, prefix=prefix, node=node)
    health = probes.HealthSettings(port=free_port())
    url = f"http://127.0.0.1:{health.port}"
    async with held_proxy(nats_server.url) as (proxy_url, accepted, release):
        held = dataclasses.replace(bus, urls=(proxy_url,))
        async with running(main, held, health) as task:
            async with asyncio.timeout(30):
                await accepted.wait()  # the service is in the middle of connecting
            assert not task.done()
            assert await get(url + "/readyz") == (503, "starting\n")
            assert await get(url + "/healthz") == (200, "ok\n")
            release.set()
            assert await until_ready(url, task) == "ok\n"
            assert await get(url + "/healthz") == (200, "ok\n")


async def test_the_schedulers_readyz_turns_503_when_its_ledger_watch_stops_following(
    nats_server: NatsServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probes, "STALE_S", 0.5)
    stuck = [False]
    take_in = scheduler_bus.Replica._ledger_entry

    def watching(replica: scheduler_bus.Replica, key: str, value: bytes | None, rev: int) -> None:
        if not stuck[0]:  # a stuck watch takes in nothing more
            take_in(replica, key, value, rev)

    monkeypatch.setattr(scheduler_bus.Replica, "_ledger_entry", watching)
    bus = nats_server.identity(f"scheduler-{prefix}", Role.SCHEDULER, prefix=prefix)
    health = probes.HealthSettings(port=free_port())
    url = f"http://127.0.0.1:{health.port}"
    async with running(_scheduler, bus, health) as task:
        await until_ready(url, task)
        stuck[0] = True
        operator = nats_server.bus_settings(prefix=prefix)
        nc = await connecting.connect(operator, name="ledger-writer")
        try:
            ledger = (await connecting.ensure_bus(nc.jetstream(), operator)).ledger
            await ledger.put("node-stale", b"{}")  # the replica never takes it in
        finally:
            await nc.close()
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # the first look grants the watch STALE_S to catch up
            status, body = await get(url + "/readyz")
            if status == 503:
                break
            assert asyncio.get_running_loop().time() < deadline, "never reported stale"
            await asyncio.sleep(0.2)
        assert body.startswith(f"watch of KV_{bus.subjects.ledger_bucket}: at sequence "), body
        assert await get(url + "/healthz") == (200, "ok\n")  # alive: only not ready
        stuck[0] = False


async def test_a_watch_is_current_until_it_lags_the_stream_for_longer_than_stale_s(
    nats_server: NatsServer, prefix: str
) -> None:
    operator = nats_server.bus_settings(prefix=prefix)
    nc = await connecting.connect(operator, name="watch-check")
    try:
        js = nc.jetstream()
        ledger = (await connecting.ensure_bus(js, operator)).ledger
        stream = f"KV_{operator.subjects.ledger_bucket}"
        now, seen = [100.0], [0]
        check = probes.WatchCurrent(
            js=js, stream=stream, seen=lambda: seen[0], stale_s=5.0, clock=lambda: now[0]
        )
        assert await check() == ""  # an empty stream: nothing to follow
        first = await ledger.put("n1", b"{}")
        assert await check() == ""  # behind, but just now
        now[0] += 4.0
        assert await check() == ""
        now[0] += 2.0
        assert await check() == (
            f"watch of {stream}: at sequence 0, the stream was at {first} 6 s ago (now {first})"
        )
        seen[0] = first  # caught up
        assert await check() == ""
        second = await ledger.put("n2", b"{}")
        now[0] += 100.0
        assert await check() == ""  # a new end: it gets stale_s again
        third = await ledger.put("n3", b"{}")
        now[0] += 4.0
        seen[0] = second  # it reached what it was given time for; the stream moved on
        assert await check() == ""
        now[0] += 4.0
        assert await check() == ""
        now[0] += 2.0
        assert await check() == (
            f"watch of {stream}: at sequence {second}, the stream was at {third} 6 s ago "
            f"(now {third})"
        )
    finally:
        await nc.close()


async def test_a_consumer_is_current_until_messages_wait_on_it_longer_than_stale_s(
    nats_server: NatsServer, prefix: str
) -> None:
    operator = nats_server.bus_settings(prefix=prefix)
    nc = await connecting.connect(operator, name="consumer-check")
    try:
        js = nc.jetstream()
        await connecting.ensure_bus(js, operator)
        s = operator.subjects
        sub = await js.pull_subscribe(
            s.alloc_decided("n1"), durable="probed", stream=s.alloc_stream
        )
        now = [100.0]
        check = probes.ConsumerCurrent(
            js=js, stream=s.alloc_stream, durable="probed", stale_s=5.0, clock=lambda: now[0]
        )
        assert await check() == ""  # nothing waits
        await js.publish(s.alloc_decided("n1"), b"{}")
        await js.publish(s.alloc_decided("n1"), b"{}")
        assert await check() == ""  # waiting, just now
        now[0] += 6.0
        assert await check() == (
            f"consumer probed of {s.alloc_stream}: 2 messages waiting, none taken for 6 s"
        )
        (msg,) = await sub.fetch(1, timeout=10)
        await msg.ack()
        assert await check() == ""  # it took one: it gets stale_s again
        now[0] += 6.0
        assert (await check()).endswith("1 messages waiting, none taken for 6 s")
        (msg,) = await sub.fetch(1, timeout=10)
        await msg.ack()
        assert await check() == ""  # nothing waits
    finally:
        await nc.close()
