"""Namespace quotas across replicas: the charge is reserved by compare-and-set on the
namespace's key in ``<prefix>-quotas`` before the ledger commit, so two replicas racing
for the last slice of a quota never both admit it; a release gives the charge back and
the upkeep drops the charge of a pod that never committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from libshared import connecting, errors, events
from libshared import quotas as schema
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from libshared.resources import ContainerRequest, PodRequest
from libshared.subjects import pod_key
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus, quotas
from services.scheduler.settings import Settings
from tests.bus import helpers
from tests.scheduler.bus.racing import CountingKV, RacingKV, UnreadableKV

NAMESPACE = "team-a"


def pod(uid: str, memory_mib: int = 4000, *, namespace: str = NAMESPACE) -> PodRequest:
    c = ContainerRequest(
        name="main", index=0, init=False, gpu_count=1, memory_mib=memory_mib, cores_percent=10
    )
    return PodRequest(uid=uid, namespace=namespace, name=uid, containers=(c,))


@contextlib.asynccontextmanager
async def replicas(
    nats_server: NatsServer, prefix: str, count: int, *, racing: bool = False
) -> AsyncIterator[list[bus.Replica]]:
    """``count`` replicas in this process, each as its own scheduler identity with its
    own quota gate, called directly (not through the queue group)."""
    barrier = asyncio.Barrier(count)
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(count):
            settings = nats_server.identity(f"sched-{prefix}-{i}", Role.SCHEDULER, prefix=prefix)
            nc = await connecting.connect(settings, name=f"r{i}")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            kv = await quotas.open_quotas(js, settings, create=True)
            gate = quotas.QuotaGate(kv=RacingKV(kv, barrier) if racing else kv)  # type: ignore[arg-type]
            s = Settings(bus=settings, name=f"r{i}")
            replica = bus.Replica(
                nc=nc,
                js=js,
                bus=await connecting.ensure_bus(js, settings),
                subjects=settings.subjects,
                scheduler=scheduler_app.build_scheduler(s),
                name=s.name,
                quotas=gate,
            )
            await replica.start()
            out.append(replica)
        yield out


async def set_quota(nc: Client, settings: BusSettings, memory_mib: int) -> KeyValue:
    """What an operator does in a bus-only stack: write the namespace's limit."""
    kv = await quotas.open_quotas(nc.jetstream(), settings, create=True)
    value = schema.NamespaceQuota(namespace=NAMESPACE, memory_mib=memory_mib)
    await kv.put(pod_key(NAMESPACE), schema.ENCODER.encode(value))
    return kv


async def stored(kv: KeyValue) -> schema.NamespaceQuota:
    entry = await kv.get(pod_key(NAMESPACE))
    return schema.DECODER.decode(entry.value or b"")


async def test_two_replicas_racing_for_the_last_slice_of_a_quota_admit_it_once(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 2) as (r0, _):
        first = await r0.schedule(pod("first"))
        assert isinstance(first, events.Placement)
    async with replicas(nats_server, prefix, 2, racing=True) as (a, b):
        got = await asyncio.gather(a.schedule(pod("a")), b.schedule(pod("b")))
        placed = [d for d in got if isinstance(d, events.Placement)]
        refused = [d for d in got if isinstance(d, events.Unschedulable)]
        assert len(placed) == 1 and len(refused) == 1, got
        assert refused[0].reason == (
            "ResourceQuotaNotFit: namespace team-a asks 4000 MiB of nvidia.com/gpumem with 8000"
            " MiB in use of its quota 8000 MiB (ResourceQuota limits.nvidia.com/gpumem)"
        )
        # both read the same revision: the race was run, and lost at the compare-and-set
        assert a.quotas is not None and b.quotas is not None
        assert a.quotas.conflicts + b.quotas.conflicts == 1
    quota = await stored(kv)
    assert {c.pod_uid for c in quota.charges} == {"first", placed[0].pod_uid}
    assert quota.used() == (8000, 20)
    ledgers = await helpers.ledgers(nc, bus_settings)
    in_ledger = {s.pod_uid for ledger in ledgers.values() for s in ledger.slices}
    assert in_ledger == {"first", placed[0].pod_uid}


async def test_a_released_pod_gives_its_quota_back_and_the_next_pod_fits(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 1) as (r,):
        assert isinstance(await r.schedule(pod("a")), events.Placement)
        assert isinstance(await r.schedule(pod("b")), events.Placement)
        third = await r.schedule(pod("c"))
        assert isinstance(third, events.Unschedulable)
        assert third.reason.startswith("ResourceQuotaNotFit: namespace team-a")
        assert (await r.release("a")).node == "node-0"
        assert (await stored(kv)).used() == (4000, 10)
        assert isinstance(await r.schedule(pod("c")), events.Placement)
        # another namespace has no quota: it is not charged anywhere
        assert isinstance(await r.schedule(pod("free", 8000, namespace="team-b")), events.Placement)
    assert {c.pod_uid for c in (await stored(kv)).charges} == {"b", "c"}


class LosingGate(quotas.QuotaGate):
    """A gate after whose every reservation another writer changes the pod's node's
    ledger key (same value, new revision): the replica's commit then loses the race."""

    ledger: KeyValue | None = None

    async def reserve(self, placement: events.Placement) -> str | None:
        why = await super().reserve(placement)
        assert self.ledger is not None
        entry = await self.ledger.get(placement.node)
        await self.ledger.put(placement.node, entry.value or b"")
        return why


async def test_a_reservation_whose_ledger_commit_keeps_losing_is_taken_back(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    await opened.ledger.put("node-0", events.ENCODER.encode(NodeLedger(node="node-0")))
    async with replicas(nats_server, prefix, 1) as (r,):
        r.max_attempts = 2
        assert r.quotas is not None
        r.quotas = LosingGate(kv=r.quotas.kv)
        r.quotas.ledger = opened.ledger
        lost = await r.schedule(pod("unlucky"))
        assert isinstance(lost, events.Unschedulable)
        assert "lost the ledger race 2 times" in lost.reason
        assert r.quotas.reserved == 2  # reserved before each commit
    assert (await stored(kv)).charges == ()


async def test_the_upkeep_drops_a_charge_whose_pod_never_committed_and_keeps_claimed_ones(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 1) as (r,):
        assert isinstance(await r.schedule(pod("placed")), events.Placement)
        # a replica that died after reserving: one charge with a claim, one without
        value = await stored(kv)
        dead = schema.QuotaCharge(pod_uid="dead", memory_mib=2000)
        inflight = schema.QuotaCharge(pod_uid="inflight", memory_mib=2000)
        await kv.put(
            pod_key(NAMESPACE),
            schema.ENCODER.encode(
                schema.NamespaceQuota(
                    namespace=NAMESPACE,
                    memory_mib=8000,
                    charges=(*value.charges, dead, inflight),
                )
            ),
        )
        await r.bus.pods.create(pod_key("inflight"), b"r9 0")
        refused = await r.schedule(pod("late", 1000))
        assert isinstance(refused, events.Unschedulable)  # 8000 charged
        assert r.quotas is not None
        upkeep = quotas.QuotaUpkeep(
            gate=r.quotas, claims=r.bus.pods, ledger_view=lambda: r.view.cluster.ledgers
        )
        assert await upkeep.once() == 1
        assert {c.pod_uid for c in (await stored(kv)).charges} == {"placed", "inflight"}
        assert await upkeep.once() == 0
        assert isinstance(await r.schedule(pod("late", 1000)), events.Placement)


async def test_a_gate_following_the_keys_reads_no_quota_for_a_namespace_without_one(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await quotas.open_quotas(nc.jetstream(), bus_settings, create=True)
    async with replicas(nats_server, prefix, 1) as (r,):
        counting = CountingKV(kv)
        gate = quotas.QuotaGate(kv=counting)  # type: ignore[arg-type]
        await gate.watch()
        r.quotas = gate
        try:
            assert gate.known == set()
            assert isinstance(await r.schedule(pod("free", namespace="team-b")), events.Placement)
            assert (await r.release("free")).node == "node-0"
            assert counting.gets == 0
            # a quota written later is enforced once the gate's watch has seen its key
            await set_quota(nc, bus_settings, 4000)
            async with asyncio.timeout(30):
                while pod_key(NAMESPACE) not in (gate.known or set()):
                    await asyncio.sleep(0.02)
            assert isinstance(await r.schedule(pod("a")), events.Placement)
            refused = await r.schedule(pod("b"))
            assert isinstance(refused, events.Unschedulable)
            assert refused.reason.startswith("ResourceQuotaNotFit: namespace team-a")
            assert counting.gets >= 2
            # the key deleted: no quota any more
            await kv.delete(pod_key(NAMESPACE))
            async with asyncio.timeout(30):
                while pod_key(NAMESPACE) in (gate.known or set()):
                    await asyncio.sleep(0.02)
            assert isinstance(await r.schedule(pod("b")), events.Placement)
        finally:
            await gate.close()


async def test_a_quota_that_cannot_be_read_defers_the_pod_as_temporary_and_commits_nothing(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 1) as (r,):
        r.quotas = quotas.QuotaGate(kv=UnreadableKV(kv))  # type: ignore[arg-type]
        with pytest.raises(bus.TemporaryError, match="quota of namespace team-a unreadable"):
            await r.schedule(pod("a"))
        assert r.view.cluster.placement_of("a") is None
    assert (await stored(kv)).charges == ()


async def test_a_pod_deferred_over_the_bus_is_answered_with_when_to_send_it_again(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 1) as (r,):
        r.quotas = quotas.QuotaGate(kv=UnreadableKV(kv))  # type: ignore[arg-type]
        deferred = await helpers.schedule(nc, bus_settings, pod("a"))
        assert isinstance(deferred, events.BusError), deferred
        assert deferred.retry_after_s == errors.RETRY_AFTER_S  # a field, not the text
        r.quotas = quotas.QuotaGate(kv=kv)  # readable again: the same request places
        assert isinstance(await helpers.schedule(nc, bus_settings, pod("a")), events.Placement)


async def test_a_bad_quota_value_refuses_its_namespace_only_naming_the_problem(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings, nc: Client
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    kv = await set_quota(nc, bus_settings, 8000)
    async with replicas(nats_server, prefix, 1) as (r,):
        for bad, says in (
            (b'{"namespace": "team-a", "memory_mib": -1}', "memory_mib"),
            (b'{"namespace": "team-z"}', "names 'team-z'"),
        ):
            await kv.put(pod_key(NAMESPACE), bad)
            refused = await r.schedule(pod(f"p-{len(says)}"))
            assert isinstance(refused, events.Unschedulable)
            assert refused.reason.startswith(
                "ResourceQuotaNotFit: namespace team-a: its quota value does not decode"
            )
            assert says in refused.reason
        other = await r.schedule(pod("elsewhere", namespace="team-b"))
        assert isinstance(other, events.Placement)
