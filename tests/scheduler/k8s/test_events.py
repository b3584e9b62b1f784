"""Scheduling Events on the pod, as HAMi writes them, against an emulated API server and a
real nats-server: a pod that fits nowhere gets FilteringFailed with HAMi's counted reasons
per node, a bound pod FilteringSucceed and BindingSucceed, a bind that fails
BindingFailed, and a pod retried again and again gets one Event per message whose count
grows, not one Event per retry."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from libshared import annotations as keys
from libshared.connecting import BusSettings
from tests.bus import helpers
from tests.scheduler.k8s import harness
from tests.scheduler.k8s.harness import bind_pod, create_pod, eventually, filter_pod
from tests.scheduler.k8s.kubeapi import ApiServer
from tests.scheduler.k8s.pods import pod, registration

NODES = ["n1", "n2"]


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def fleet(nc: Client, bus: BusSettings) -> None:
    await helpers.register(nc, bus, [registration(n, gpus=2, memory_mib=16384) for n in NODES])


def on_pod(api: ApiServer, p: dict[str, Any]) -> list[dict[str, Any]]:
    """The Events whose involvedObject is ``p``, oldest first."""
    uid = p["metadata"]["uid"]
    return [e for e in api.events() if e["involvedObject"]["uid"] == uid]


def story(api: ApiServer, p: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(type, reason, message) of every Event on ``p``: what ``kubectl describe`` lists."""
    return {(e["type"], e["reason"], e["message"]) for e in on_pod(api, p)}


UNSCHEDULABLE = [
    # (what, pod overrides, annotations, HAMi's FilteringFailed messages)
    (
        "memory above every card",
        {"gpumem": 20000},
        {},
        {"2 nodes CardInsufficientMemory(n1,n2)", "no available node, 2 nodes do not meet"},
    ),
    (
        "a GPU UUID no node has",
        {},
        {keys.USE_GPUUUID: "GPU-elsewhere-0"},
        {"2 nodes CardUuidMismatch(n1,n2)", "no available node, 2 nodes do not meet"},
    ),
    (
        "a UUID on one node, too much memory there",
        {"gpumem": 20000},
        {keys.USE_GPUUUID: "GPU-n2-0"},
        {
            "1 nodes CardInsufficientMemory(n2)",
            "2 nodes CardUuidMismatch(n1,n2)",
            "no available node, 2 nodes do not meet",
        },
    ),
]


@pytest.mark.parametrize(("what", "overrides", "notes", "messages"), UNSCHEDULABLE)
async def test_a_pod_that_fits_nowhere_gets_filtering_failed_with_hamis_counted_reasons(
    what: str,
    overrides: dict[str, Any],
    notes: dict[str, str],
    messages: set[str],
    nc: Client,
    bus_settings: BusSettings,
    api: ApiServer,
    session: aiohttp.ClientSession,
) -> None:
    await fleet(nc, bus_settings)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p", annotations=notes, **overrides))
        answer = await filter_pod(session, x.url, p, NODES)
        assert answer["NodeNames"] == [], what
        want = {("Warning", "FilteringFailed", m) for m in messages}
        await eventually(lambda: story(api, p) == want, what=f"{what}: {story(api, p)}")
    for event in on_pod(api, p):
        assert event["involvedObject"]["kind"] == "Pod"
        assert event["involvedObject"]["name"] == "p"
        assert event["metadata"]["namespace"] == "default"
        assert event["source"]["component"] == "vslice-scheduler"
        assert event["count"] == 1


SUCCEED = re.compile(
    r"^find fit node\((n[12])\), 0 nodes not fit, 2 nodes fit"
    r"\((n[12]):(\d+\.\d\d),(n[12]):(\d+\.\d\d)\)$"
)


async def test_a_bound_pod_gets_filtering_succeed_and_binding_succeed(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        # n1 already half full: HAMi's score (fuller is higher) tells the two apart
        first = await create_pod(session, str(api.url), pod("first", gpumem=8000))
        assert (await filter_pod(session, x.url, first, ["n1"]))["NodeNames"] == ["n1"]
        p = await create_pod(session, str(api.url), pod("p"))
        (node,) = (await filter_pod(session, x.url, p, NODES))["NodeNames"]
        assert await bind_pod(session, x.url, p, node) == ""
        await eventually(lambda: len(on_pod(api, p)) == 2, what=str(story(api, p)))
    (succeed,) = [e for e in on_pod(api, p) if e["reason"] == "FilteringSucceed"]
    assert succeed["type"] == "Normal"
    got = SUCCEED.match(succeed["message"])
    assert got, succeed["message"]
    chosen, low, low_score, high, high_score = got.groups()
    assert chosen == node and {low, high} == set(NODES)
    # ascending by score, the chosen last as in HAMi's sorted list; n1 holds more
    assert float(low_score) <= float(high_score)
    assert high == "n1" and float(high_score) > float(low_score)
    (bound,) = [e for e in on_pod(api, p) if e["reason"] == "BindingSucceed"]
    assert (bound["type"], bound["message"]) == (
        "Normal",
        f"Successfully binding node [{node}] to default/p",
    )


async def test_a_failed_bind_gets_binding_failed_with_the_error_kube_scheduler_got(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p", gpumem=20000))
        error = await bind_pod(session, x.url, p, "n1")
        assert "does not fit node n1" in error
        await eventually(lambda: bool(on_pod(api, p)), what="an Event")
    assert story(api, p) == {("Warning", "BindingFailed", error)}


async def test_a_pod_retried_every_filter_gets_one_event_per_message_with_a_growing_count(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    retries = 40
    await fleet(nc, bus_settings)
    async with harness.replicas(bus_settings, str(api.url), events_interval_s=0.5) as (x,):
        p = await create_pod(session, str(api.url), pod("p", gpumem=20000))
        for _ in range(retries):
            assert (await filter_pod(session, x.url, p, NODES))["NodeNames"] == []

        def counted() -> bool:
            return len(on_pod(api, p)) == 2 and all(
                e.get("count") == retries for e in on_pod(api, p)
            )

        await eventually(counted, what=str([(e["message"], e["count"]) for e in on_pod(api, p)]))
        written = x.kube.stats.events_written
        folded = x.kube.recorder.stats.folded
    assert {e["message"] for e in on_pod(api, p)} == {
        "2 nodes CardInsufficientMemory(n1,n2)",
        "no available node, 2 nodes do not meet",
    }
    for event in on_pod(api, p):
        assert event["firstTimestamp"] <= event["lastTimestamp"]
    # 80 occurrences: two creates, then counts written at most once per half second each
    assert written < 2 * retries / 4, written
    assert folded > retries, folded
