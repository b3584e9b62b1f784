"""ResourceQuota on GPU memory end to end against an emulated API server (kmock) and a real
nats-server: two extender replicas watch the namespace's ResourceQuota
(``limits.nvidia.com/gpumem: 8000``), admit two 4,000 MiB pods and refuse the third with
HAMi's ``ResourceQuotaNotFit`` and the figures, also when both replicas filter a pod for
the last 4,000 MiB at the same moment; a deleted pod gives its share back and a raised
quota admits more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from libshared import connecting
from libshared import quotas as schema
from libshared.connecting import BusSettings
from libshared.subjects import pod_key
from tests.bus import helpers
from tests.scheduler.bus.racing import RacingKV
from tests.scheduler.k8s import harness
from tests.scheduler.k8s.harness import bind_pod, create_pod, eventually, filter_pod, post
from tests.scheduler.k8s.kubeapi import ApiServer
from tests.scheduler.k8s.pods import pod, registration

NODES = ["n1", "n2"]
NAMESPACE = "team-a"
WAIT_S = 30.0
REFUSAL = (
    "ResourceQuotaNotFit: namespace team-a asks 4000 MiB of nvidia.com/gpumem with 8000 MiB"
    " in use of its quota 8000 MiB (ResourceQuota limits.nvidia.com/gpumem)"
)


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


def resource_quota(gpumem: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpu", "namespace": NAMESPACE},
        "spec": {"hard": {"limits.nvidia.com/gpumem": gpumem, "pods": "20"}},
    }


async def quota_value(nc: Client, bus: BusSettings) -> schema.NamespaceQuota | None:
    kv = await nc.jetstream().key_value(bus.subjects.quotas_bucket)
    try:
        entry = await kv.get(pod_key(NAMESPACE))
    except KeyNotFoundError:
        return None
    return schema.DECODER.decode(entry.value or b"")


async def wait_value(
    nc: Client, bus: BusSettings, check: Callable[[schema.NamespaceQuota], bool], what: str
) -> schema.NamespaceQuota:
    """The namespace's value once ``check`` holds (polled; a generous 30 s deadline)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = await quota_value(nc, bus)
        if value is not None and check(value):
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"the quota bucket never showed {what} within {WAIT_S} s")


async def wait_limit(nc: Client, bus: BusSettings, memory_mib: int) -> None:
    await wait_value(nc, bus, lambda v: v.memory_mib == memory_mib, f"the limit {memory_mib}")


async def stack(
    nc: Client, bus: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> str:
    """The fleet and the namespace's ResourceQuota; the API server's URL."""
    await helpers.register(nc, bus, [registration(n, memory_mib=16384) for n in NODES])
    await connecting.ensure_bus(nc.jetstream(), bus)
    url = str(api.url).rstrip("/")
    status, _ = await post(
        session, f"{url}/api/v1/namespaces/{NAMESPACE}/resourcequotas", resource_quota("8000")
    )
    assert status in (200, 201)
    return url


async def admitted(
    session: aiohttp.ClientSession, url: str, api_url: str, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create a 4,000 MiB pod in the namespace and filter it on ``url``: the stored pod
    and the filter's answer."""
    stored = await create_pod(
        session, api_url, pod(name, namespace=NAMESPACE, gpumem=4000, gpucores=10)
    )
    return stored, await filter_pod(session, url, stored, NODES)


async def test_a_gpumem_quota_of_8000_admits_two_4000_mib_pods_and_refuses_the_third(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    api_url = await stack(nc, bus_settings, api, session)
    async with harness.replicas(bus_settings, api_url, 2, quota=True) as (x, y):
        await wait_limit(nc, bus_settings, 8000)
        first, a1 = await admitted(session, x.url, api_url, "first")
        second, a2 = await admitted(session, y.url, api_url, "second")
        for p, answer in ((first, a1), (second, a2)):
            assert len(answer["NodeNames"]) == 1, answer
            assert await bind_pod(session, x.url, p, answer["NodeNames"][0]) == ""
        _, third = await admitted(session, x.url, api_url, "third")
        assert third["NodeNames"] == []
        assert third["FailedNodes"] == {n: REFUSAL for n in NODES}
        value = await quota_value(nc, bus_settings)
        assert value is not None and value.used() == (8000, 20)

        # a deleted pod gives its 4,000 MiB back; two replicas race for them
        await session.delete(f"{api_url}/api/v1/namespaces/{NAMESPACE}/pods/first")
        await eventually(
            lambda: x.kube.stats.deleted + y.kube.stats.deleted >= 1,
            timeout_s=WAIT_S,
            what="the deleted pod released",
        )
        await wait_value(nc, bus_settings, lambda v: v.used() == (4000, 10), "4000 MiB used")
        # both replicas read the namespace's quota before either writes it
        barrier = asyncio.Barrier(2)
        gates = [x.replica.quotas, y.replica.quotas]
        for gate in gates:
            assert gate is not None
            gate.kv = RacingKV(gate.kv, barrier)  # type: ignore[assignment]
        got = await asyncio.gather(
            admitted(session, x.url, api_url, "race-x"),
            admitted(session, y.url, api_url, "race-y"),
        )
        answers = [answer for _, answer in got]
        won = [a for a in answers if a["NodeNames"]]
        lost = [a for a in answers if not a["NodeNames"]]
        assert len(won) == 1 and len(lost) == 1, answers
        assert lost[0]["FailedNodes"] == {n: REFUSAL for n in NODES}
        conflicts = sum(g.conflicts for g in gates if g is not None)
        assert conflicts == 1  # the race was run, and lost at the compare-and-set

        ledgers = await helpers.ledgers(nc, bus_settings)
        held = {s.pod_uid for ledger in ledgers.values() for s in ledger.slices}
        assert len(held) == 2  # second and the race's winner: 8,000 MiB, never more
        value = await quota_value(nc, bus_settings)
        assert value is not None
        assert {c.pod_uid for c in value.charges} == held
        print(
            "\n[quota] limit 8000 MiB: 2 pods admitted, the third refused; of two replicas "
            f"racing for the last 4000 MiB one admitted ({conflicts} compare-and-set lost)"
        )


async def test_a_raised_resource_quota_admits_the_pod_it_refused(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    api_url = await stack(nc, bus_settings, api, session)
    async with harness.replicas(bus_settings, api_url, 1, quota=True) as (x,):
        await wait_limit(nc, bus_settings, 8000)
        for name in ("a", "b"):
            _, answer = await admitted(session, x.url, api_url, name)
            assert answer["NodeNames"], answer
        _, refused = await admitted(session, x.url, api_url, "c")
        assert refused["NodeNames"] == []
        async with session.patch(
            f"{api_url}/api/v1/namespaces/{NAMESPACE}/resourcequotas/gpu",
            json={"spec": {"hard": {"limits.nvidia.com/gpumem": "12000"}}},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        await wait_limit(nc, bus_settings, 12000)
        stored = api.pod(NAMESPACE, "c")
        assert stored is not None
        again = await filter_pod(session, x.url, stored, NODES)
        assert len(again["NodeNames"]) == 1, again


async def test_a_deleted_resource_quota_lifts_the_limit_and_keeps_counting(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    api_url = await stack(nc, bus_settings, api, session)
    async with harness.replicas(bus_settings, api_url, 1, quota=True) as (x,):
        await wait_limit(nc, bus_settings, 8000)
        for name in ("a", "b"):
            _, answer = await admitted(session, x.url, api_url, name)
            assert answer["NodeNames"], answer
        await session.delete(f"{api_url}/api/v1/namespaces/{NAMESPACE}/resourcequotas/gpu")
        await wait_value(nc, bus_settings, lambda v: v.memory_mib is None, "no limit")
        _, answer = await admitted(session, x.url, api_url, "c")
        assert answer["NodeNames"], answer
        value = await quota_value(nc, bus_settings)
        assert value is not None and value.used() == (12000, 30)  # usage still counted


async def test_a_replica_whose_api_serves_no_resource_quotas_schedules_and_lists_them_later(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    declared = api.resources.pop("v1/resourcequotas")
    await helpers.register(nc, bus_settings, [registration(n, memory_mib=16384) for n in NODES])
    api_url = str(api.url).rstrip("/")
    async with harness.replicas(bus_settings, api_url, 1, quota=True) as (x,):
        _, answer = await admitted(session, x.url, api_url, "before")
        assert answer["NodeNames"], answer
        api.resources["v1/resourcequotas"] = declared
        status, _ = await post(
            session,
            f"{api_url}/api/v1/namespaces/{NAMESPACE}/resourcequotas",
            resource_quota("4000"),
        )
        assert status in (200, 201)
        await wait_limit(nc, bus_settings, 4000)  # listed again in the background
        _, refused = await admitted(session, x.url, api_url, "after")
        assert refused["NodeNames"] == []
        assert all(r.startswith("ResourceQuotaNotFit") for r in refused["FailedNodes"].values())
