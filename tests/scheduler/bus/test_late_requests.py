"""Late requests cannot resurrect: a schedule request held in a paused replica and handled
after its client gave up places nothing its client was told otherwise -- not a pod whose
release was acknowledged (the release's tombstone refuses it), not a pod answered
Unschedulable meanwhile (the refusal marker repeats the answer to a request without a
deadline header). The clients here send no deadline header; the replica is paused by an
asyncio gate in process, and by SIGSTOP/SIGCONT as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus
from services.scheduler.settings import Settings
from tests.bus import helpers
from tests.scheduler.bus.test_concurrency import replica_stats, start_replica, wait_replicas

GIVE_UP_S = 0.5  # how long the clients here wait for an answer
PODS = 8


@dataclass
class Gate:
    """Holds every schedule request of one replica until opened, as a paused process
    would (the request reaches its handler only then); counts them."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    entered: int = 0
    finished: int = 0

    def wrap(
        self, handler: Callable[[Msg], Coroutine[Any, Any, None]]
    ) -> Callable[[Msg], Coroutine[Any, Any, None]]:
        async def gated(msg: Msg) -> None:
            self.entered += 1
            try:
                await self.opened.wait()
                await handler(msg)
            finally:
                self.finished += 1

        return gated


@contextlib.asynccontextmanager
async def replica(
    settings: BusSettings, name: str, gate: Gate | None = None
) -> AsyncIterator[bus.Replica]:
    nc = await connecting.connect(settings, name=name)
    try:
        js = nc.jetstream()
        s = Settings(bus=settings, name=name, policy="hami")
        r = bus.Replica(
            nc=nc,
            js=js,
            bus=await connecting.ensure_bus(js, settings),
            subjects=settings.subjects,
            scheduler=scheduler_app.build_scheduler(s),
            name=name,
        )
        if gate is not None:
            r._on_schedule = gate.wrap(r._on_schedule)  # type: ignore[method-assign]
        await r.start()
        yield r
    finally:
        await nc.close()


async def ask(nc: Client, subject: str, body: bytes) -> bytes | None:
    """One request without a deadline header; None when no answer came in ``GIVE_UP_S``."""
    try:
        return (await nc.request(subject, body, timeout=GIVE_UP_S)).data
    except nats.errors.TimeoutError:
        return None


async def until_answered(nc: Client, subject: str, body: bytes, *, tries: int = 60) -> bytes:
    """Send again until an answer comes (a copy sent to the paused replica is left there,
    one more late copy)."""
    for _ in range(tries):
        answer = await ask(nc, subject, body)
        if answer is not None:
            return answer
    raise AssertionError(f"no answer on {subject} after {tries} tries")


async def release(nc: Client, settings: BusSettings, uid: str) -> events.Ack:
    body = events.ENCODER.encode(events.Release(pod_uid=uid))
    ack = events.RELEASE_REPLY.decode(
        await until_answered(nc, settings.subjects.sched_release, body)
    )
    assert isinstance(ack, events.Ack), ack
    return ack


async def drained(gate: Gate, *, timeout_s: float = 30.0) -> None:
    """Open ``gate`` and wait until every request it held was handled."""
    gate.opened.set()
    async with asyncio.timeout(timeout_s):
        while gate.finished < gate.entered:
            await asyncio.sleep(0.05)


async def holders(nc: Client, settings: BusSettings) -> set[str]:
    return {
        uid for ledger in (await helpers.ledgers(nc, settings)).values() for uid in ledger.pods()
    }


async def test_schedule_requests_held_in_a_paused_replica_do_not_bring_back_released_pods(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1, split=10))
    gate = Gate()
    uids = [f"gone-{i}" for i in range(PODS)]
    async with replica(bus_settings, "paused", gate) as paused:
        for uid in uids:  # the paused replica is the only one: every copy lands there
            body = events.ENCODER.encode(helpers.pod(uid, memory_mib=1000))
            assert await ask(nc, bus_settings.subjects.sched_schedule, body) is None
        async with replica(bus_settings, "awake"):
            for uid in uids:  # the clients gave up: they release
                assert (await release(nc, bus_settings, uid)).node is None
            await drained(gate)
            assert gate.entered == PODS
            assert await holders(nc, bus_settings) == set()
            assert paused.stats.placed == 0 and paused.stats.unschedulable == PODS


async def test_schedule_requests_held_in_a_paused_replica_do_not_place_pods_answered_unschedulable(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1, memory_mib=16000))
    gate = Gate()
    uids = [f"refused-{i}" for i in range(PODS)]
    async with replica(bus_settings, "paused", gate) as paused:
        # the device is full until the late copies are handled
        big = await paused.schedule(helpers.pod("big", memory_mib=12000))
        assert isinstance(big, events.Placement)
        for uid in uids:
            body = events.ENCODER.encode(helpers.pod(uid, memory_mib=8000))
            assert await ask(nc, bus_settings.subjects.sched_schedule, body) is None
        async with replica(bus_settings, "awake"):
            for uid in uids:  # the clients send again, until the awake replica answers
                body = events.ENCODER.encode(helpers.pod(uid, memory_mib=8000))
                data = await until_answered(nc, bus_settings.subjects.sched_schedule, body)
                answer = events.SCHEDULE_REPLY.decode(data)
                assert isinstance(answer, events.Unschedulable), answer
            assert (await release(nc, bus_settings, "big")).node == "node-0"  # room again
            await drained(gate)
            assert gate.entered >= PODS
            assert await holders(nc, bus_settings) == set()
            assert paused.stats.placed == 0
        # a client with the deadline header is not told the old answer: it may place now
        again = await helpers.schedule(nc, bus_settings, helpers.pod(uids[0], memory_mib=8000))
        assert isinstance(again, events.Placement), again


async def test_a_replica_stopped_with_sigstop_places_nothing_its_clients_released(
    nats_server: NatsServer, prefix: str
) -> None:
    settings = nats_server.bus_settings(prefix=prefix)
    sched = nats_server.identity(f"sched-{prefix}", Role.SCHEDULER, prefix=prefix)
    cli = nats_server.identity(f"cli-{prefix}", Role.CLI, prefix=prefix)
    admin = await connecting.connect(settings, name="admin")
    client = await connecting.connect(cli, name="client")
    procs = [start_replica(sched, "stopped"), start_replica(sched, "running")]
    try:
        await helpers.register(admin, settings, helpers.fleet(nodes=2, gpus=2, split=10))
        await wait_replicas(admin, settings, 2)
        procs[0].send_signal(signal.SIGSTOP)
        released: list[str] = []
        placed: list[str] = []
        for i in range(2 * PODS):
            uid = f"run-{i}"
            body = events.ENCODER.encode(helpers.pod(uid, memory_mib=1000))
            answer = await ask(client, settings.subjects.sched_schedule, body)
            if answer is None:  # sent to the stopped replica: give up and release
                await release(client, settings, uid)
                released.append(uid)
            else:
                assert isinstance(events.SCHEDULE_REPLY.decode(answer), events.Placement)
                placed.append(uid)
        assert released, "no request reached the stopped replica"
        procs[0].send_signal(signal.SIGCONT)
        stopped: list[events.Stats] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = {s.name: s for s in await replica_stats(admin, settings)}
            if "stopped" in stats and stats["stopped"].schedule_requests >= len(released):
                stopped = [stats["stopped"]]
                break
        assert stopped, "the stopped replica did not handle its requests after SIGCONT"
        assert stopped[0].placed == 0
        assert await holders(admin, settings) == set(placed)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        await client.close()
        await admin.close()
