"""The extender over HTTP against an emulated API server and a real nats-server: filter
and bind as kube-scheduler calls them, bad bodies, the reservation TTL, pods that end,
restart recovery, and replicas filtering at once."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from libshared import annotations as keys
from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from libshared.resources import ResourceSettings
from services.scheduler.core import extending
from tests.bus import helpers
from tests.scheduler.k8s import harness
from tests.scheduler.k8s.harness import bind_pod, create_pod, eventually, filter_pod, post
from tests.scheduler.k8s.kubeapi import ApiServer
from tests.scheduler.k8s.pods import pod, registration

NODES = ["n1", "n2"]


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def fleet(nc: Client, bus: BusSettings, *names: str, memory_mib: int = 16384) -> None:
    await helpers.register(nc, bus, [registration(n, memory_mib=memory_mib) for n in names])


def holders(ledgers: dict[str, NodeLedger]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for node, ledger in ledgers.items():
        for s in ledger.slices:
            out[s.pod_uid].add(node)
    return out


def assert_not_overbooked(ledgers: dict[str, NodeLedger], memory_mib: int = 16384) -> None:
    per_device: dict[str, int] = defaultdict(int)
    for ledger in ledgers.values():
        for s in ledger.slices:
            per_device[s.uuid] += s.memory_mib
    assert all(used <= memory_mib for used in per_device.values()), per_device


# -- filter ------------------------------------------------------------------------------


FILTER_TABLE = [
    # (what, pod overrides, candidates, expected node(s) or None, reason substrings by node)
    ("a HAMi slice fits", {}, ["n1", "n2"], {"n1", "n2"}, {}),
    ("only the candidates count", {}, ["n2"], {"n2"}, {}),
    (
        "memory above every card",
        {"gpumem": 20000},
        ["n1", "n2"],
        None,
        {"n1": "CardInsufficientMemory", "n2": "CardInsufficientMemory"},
    ),
    ("more GPUs than a node has", {"gpus": 3}, ["n1"], None, {"n1": "NodeInsufficientDevice"}),
    ("a node without vslice devices", {}, ["ghost", "n2"], {"n2"}, {"ghost": "unknown node"}),
]


@pytest.mark.parametrize(("what", "overrides", "nodes", "expect", "reasons"), FILTER_TABLE)
async def test_filter_table(
    what: str,
    overrides: dict[str, Any],
    nodes: list[str],
    expect: set[str] | None,
    reasons: dict[str, str],
    nc: Client,
    bus_settings: BusSettings,
    api: ApiServer,
    session: aiohttp.ClientSession,
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = pod("p", **overrides)
        answer = await filter_pod(session, x.url, p, nodes)
        ledgers = await helpers.ledgers(nc, bus_settings)
    if expect is None:
        assert answer["NodeNames"] == [], what
        assert holders(ledgers) == {}
    else:
        assert len(answer["NodeNames"]) == 1 and answer["NodeNames"][0] in expect, what
        assert holders(ledgers) == {p["metadata"]["uid"]: set(answer["NodeNames"])}
    failed = answer.get("FailedNodes", {})
    assert set(failed) == set(reasons), failed
    for node, says in reasons.items():
        assert says in failed[node], failed


async def test_a_full_node_is_failed_with_hamis_reason_and_the_other_chosen(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        big = pod("big", gpus=2, gpumem=16000, gpucores=10)
        first = await filter_pod(session, x.url, big, ["n1"])
        assert first["NodeNames"] == ["n1"]
        answer = await filter_pod(session, x.url, pod("small"), ["n1", "n2"])
    assert answer["NodeNames"] == ["n2"]
    assert list(answer["FailedNodes"]) == ["n1"]
    assert answer["FailedNodes"]["n1"].startswith("2/2 CardInsufficientMemory")


async def test_without_node_cache_the_answer_is_the_chosen_node_object(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    nodes = {
        "items": [
            {"metadata": {"name": n, "labels": {"zone": z}}} for n, z in (("n1", "a"), ("n2", "b"))
        ]
    }
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        status, answer = await post(session, f"{x.url}/filter", {"Pod": pod("p"), "Nodes": nodes})
    assert status == 200
    assert "NodeNames" not in answer
    (chosen,) = answer["Nodes"]["items"]
    assert chosen in nodes["items"]


async def test_a_pod_without_a_gpu_passes_and_an_invalid_one_fails_everywhere(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        plain = await filter_pod(
            session, x.url, pod("cpu", gpus=None, gpumem=None, gpucores=None), NODES
        )
        # gpucores over 100 is clamped as HAMi does; a negative count is refused
        invalid = await filter_pod(session, x.url, pod("bad", gpucores=-5), NODES)
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert plain == {"NodeNames": NODES}
    assert invalid["NodeNames"] == []
    assert set(invalid["FailedAndUnresolvableNodes"]) == set(NODES)
    assert "nvidia.com/gpucores=-5" in invalid["FailedAndUnresolvableNodes"]["n1"]
    assert holders(ledgers) == {}


async def test_filtering_a_reserved_pod_again_on_any_replica_answers_the_same_node(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url), 2) as (a, b):
        p = pod("p")
        first = await filter_pod(session, a.url, p, NODES)
        again = [await filter_pod(session, x.url, p, NODES) for x in (a, b, a)]
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert all(answer["NodeNames"] == first["NodeNames"] for answer in again)
    assert sum(len(ledger.slices) for ledger in ledgers.values()) == 1


async def test_a_reservation_off_the_candidates_is_moved_to_one_of_them(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = pod("p")
        assert (await filter_pod(session, x.url, p, ["n1"]))["NodeNames"] == ["n1"]
        assert (await filter_pod(session, x.url, p, ["n2"]))["NodeNames"] == ["n2"]
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert holders(ledgers) == {p["metadata"]["uid"]: {"n2"}}


BAD_BODIES = [
    ("/filter", b"{not json", "bad ExtenderArgs: ExtenderArgs="),
    (
        "/filter",
        b'{"Pod": {"metadata": {"name": "p"}, "spec": {}}, "NodeNames": ["n1"]}',
        "ExtenderArgs.Pod.metadata.uid=None",
    ),
    (
        "/filter",
        b'{"Pod": {"metadata": {"name": "p", "uid": "u"}, "spec": {}}}',
        "ExtenderArgs.NodeNames",
    ),
    (
        "/bind",
        b'{"PodName": "p", "PodNamespace": "default", "PodUID": "u"}',
        "ExtenderBindingArgs.Node=None",
    ),
    ("/bind", b"[]", "bad ExtenderBindingArgs: ExtenderBindingArgs="),
]


@pytest.mark.parametrize(("path", "raw", "says"), BAD_BODIES)
async def test_a_bad_body_gets_a_400_naming_the_field(
    path: str,
    raw: bytes,
    says: str,
    nc: Client,
    bus_settings: BusSettings,
    api: ApiServer,
    session: aiohttp.ClientSession,
) -> None:
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        status, answer = await post(session, x.url + path, raw)
        healthy = await session.get(x.url + "/healthz")
        assert healthy.status == 200  # the replica keeps serving
        stats = await (await session.get(x.url + "/stats")).json()
    assert status == 400
    assert says in answer["Error"], answer
    assert stats["extender"]["bad_bodies"] == 1


async def test_a_body_over_the_limit_is_refused(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    async with (
        harness.replicas(bus_settings, str(api.url), max_body_bytes=2**16) as (x,),
        session.post(x.url + "/filter", data=b" " * (2**16 + 1)) as resp,
    ):
        assert resp.status == 413


async def test_the_extender_parses_pods_with_the_resource_models_defaults(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    # --default-memory-mib reaches the extender as it reaches the webhook: a container
    # naming no memory resource gets the default memory (the whole card without it)
    await fleet(nc, bus_settings, *NODES)
    model = ResourceSettings(default_memory_mib=2500, default_cores_percent=15)
    async with harness.replicas(bus_settings, str(api.url), 1, resources=model) as (a,):
        p = await create_pod(session, str(api.url), pod("d", gpumem=None, gpucores=None))
        p_cores = await create_pod(session, str(api.url), pod("c", gpumem=None, gpucores=40))
        for obj, cores in ((p, 100), (p_cores, 40)):
            node = (await filter_pod(session, a.url, obj, NODES))["NodeNames"][0]
            assert await bind_pod(session, a.url, obj, node) == ""
            placement = a.replica.view.cluster.placement_of(obj["metadata"]["uid"])
            assert placement is not None
            (s,) = placement.slices
            # no memory resource: the default memory, cores 100 for a GPU-only container
            # (HAMi's exclusive card), else as asked
            assert (s.memory_mib, s.cores_percent) == (2500, cores)


# -- bind --------------------------------------------------------------------------------


async def test_bind_writes_hamis_annotations_then_the_binding(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url), 2) as (a, b):
        p = await create_pod(session, str(api.url), pod("p", namespace="team"))
        node = (await filter_pod(session, a.url, p, NODES))["NodeNames"][0]
        assert await bind_pod(session, b.url, p, node) == ""  # the other replica binds
        stored = api.pod("team", "p")
        assert stored is not None
        uid = p["metadata"]["uid"]
        placement = b.replica.view.cluster.placement_of(uid)
        assert placement is not None
        assert stored["spec"]["nodeName"] == node
        annos = stored["metadata"]["annotations"]
        (s,) = placement.slices
        assert annos[keys.VGPU_NODE] == node
        assert annos[keys.VGPU_DEVICES_ALLOCATED] == f"{s.uuid},NVIDIA,3000,30:;"
        assert annos[keys.VGPU_DEVICES_TO_ALLOCATE] == annos[keys.VGPU_DEVICES_ALLOCATED]
        assert annos[keys.BIND_PHASE] == "allocating"
        assert int(annos[keys.BIND_TIME]) > 1_700_000_000
        # kube-scheduler retries a bind whose answer it lost: still success, same node
        assert await bind_pod(session, a.url, p, node) == ""
        assert b.kube.stats.bound == 1 and a.kube.stats.bound == 1


async def test_a_bind_whose_pod_another_replica_just_bound_succeeds_on_the_apis_409(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p"))
        node = (await filter_pod(session, x.url, p, NODES))["NodeNames"][0]
        await eventually(lambda: p["metadata"]["uid"] in x.kube.pods, what="pod watched")
        stale = x.kube.pods[p["metadata"]["uid"]]
        assert await bind_pod(session, x.url, p, node) == ""
        x.kube.pods[stale.uid] = stale  # as if this replica's watch had not seen the bind
        assert await bind_pod(session, x.url, p, node) == ""
        other = "n2" if node == "n1" else "n1"
        x.kube.pods[stale.uid] = stale
        error = await bind_pod(session, x.url, p, other)
    assert f"bound to node {node}" in error or "held slices" in error


async def test_bind_to_another_node_than_reserved_is_refused_and_frees_the_reservation(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p"))
        node = (await filter_pod(session, x.url, p, NODES))["NodeNames"][0]
        other = "n2" if node == "n1" else "n1"
        error = await bind_pod(session, x.url, p, other)
        ledgers = await helpers.ledgers(nc, bus_settings)
        stored = api.pod("default", "p")
    assert f"held slices on node {node}, not {other}" in error
    assert holders(ledgers) == {}
    assert stored is not None and "nodeName" not in stored["spec"]


async def test_a_failed_bind_releases_the_reservation(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p"))
        node = (await filter_pod(session, x.url, p, NODES))["NodeNames"][0]
        # the pod was recreated under the same name (another UID) before the bind
        await session.delete(f"{api.url}/api/v1/namespaces/default/pods/p")
        await create_pod(session, str(api.url), pod("p"))
        error = await bind_pod(session, x.url, p, node)
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert "(recreated?)" in error or "Precondition failed" in error, error
    assert p["metadata"]["uid"] not in holders(ledgers)


async def test_a_bind_after_the_reservation_expired_reserves_again_on_that_node(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        p = await create_pod(session, str(api.url), pod("p"))
        node = (await filter_pod(session, x.url, p, NODES))["NodeNames"][0]
        # as the reconcile frees a reservation not bound in time (cause "expired")
        await x.replica.release(p["metadata"]["uid"], final=False)
        assert await bind_pod(session, x.url, p, node) == ""
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert holders(ledgers) == {p["metadata"]["uid"]: {node}}


# -- freeing slices ----------------------------------------------------------------------


async def test_a_reservation_not_bound_within_the_ttl_is_released(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url), ttl_s=0.6, sweep_s=0.1) as (x,):
        waiting = await create_pod(session, str(api.url), pod("waiting"))
        bound = await create_pod(session, str(api.url), pod("bound"))
        await filter_pod(session, x.url, waiting, NODES)
        node = (await filter_pod(session, x.url, bound, NODES))["NodeNames"][0]
        assert await bind_pod(session, x.url, bound, node) == ""
        uid = waiting["metadata"]["uid"]
        took = await eventually(
            lambda: x.replica.view.cluster.placement_of(uid) is None, what="TTL release"
        )
        await asyncio.sleep(0.7)  # past another TTL: the bound pod keeps its slices
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert took >= 0.4  # not before its TTL (0.6 s, less the time the filter took)
    assert holders(ledgers) == {bound["metadata"]["uid"]: {node}}
    assert x.kube.stats.expired == 1


@pytest.mark.parametrize("end", ["Succeeded", "Failed", "deleted"])
async def test_a_pod_that_ends_frees_its_slices_through_the_watch(
    end: str,
    nc: Client,
    bus_settings: BusSettings,
    api: ApiServer,
    session: aiohttp.ClientSession,
) -> None:
    await fleet(nc, bus_settings, *NODES)
    async with harness.replicas(bus_settings, str(api.url), 2, sweep_s=60) as (a, b):
        p = await create_pod(session, str(api.url), pod("p"))
        node = (await filter_pod(session, a.url, p, NODES))["NodeNames"][0]
        assert await bind_pod(session, a.url, p, node) == ""
        uid = p["metadata"]["uid"]
        if end == "deleted":
            await session.delete(f"{api.url}/api/v1/namespaces/default/pods/p")
        else:
            await api.set_phase("default", "p", end)
        await eventually(
            lambda: a.replica.view.cluster.placement_of(uid) is None, what="release on end"
        )
        ledgers = await helpers.ledgers(nc, bus_settings)
    assert holders(ledgers) == {}
    counter = "deleted" if end == "deleted" else "ended"
    assert getattr(a.kube.stats, counter) + getattr(b.kube.stats, counter) >= 1


# -- restart recovery --------------------------------------------------------------------


async def test_a_restarted_replica_frees_gone_pods_restores_bound_ones_and_holds_bad_ones(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    await fleet(nc, bus_settings, "n1", "n2")
    async with harness.replicas(bus_settings, str(api.url)) as (x,):
        gone = await create_pod(session, str(api.url), pod("gone"))
        kept = await create_pod(session, str(api.url), pod("kept"))
        for p in (gone, kept):
            node = (await filter_pod(session, x.url, p, ["n1"]))["NodeNames"][0]
            assert await bind_pod(session, x.url, p, node) == ""
    # while no replica runs: one pod is deleted, the ledger loses another's slices (a
    # wiped bucket), and a third pod arrives bound with an annotation nobody can read
    await session.delete(f"{api.url}/api/v1/namespaces/default/pods/gone")
    await api.set_phase("default", "kept", "Running")
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    await opened.ledger.put("n1", events.ENCODER.encode(NodeLedger(node="n1")))
    broken = pod(
        "broken",
        node="n2",
        phase="Running",
        annotations={keys.VGPU_DEVICES_ALLOCATED: "GPU-n2-0,NVIDIA,3000"},
    )
    await create_pod(session, str(api.url), broken)
    await api.set_phase("default", "broken", "Running")
    async with harness.replicas(bus_settings, str(api.url), sweep_s=0.1) as (x,):
        ledgers = await helpers.ledgers(nc, bus_settings)
        assert holders(ledgers) == {kept["metadata"]["uid"]: {"n1"}}  # restored, gone freed
        stored = api.pod("default", "kept")
        assert stored is not None
        (s,) = ledgers["n1"].slices
        assert (
            f"{s.uuid},NVIDIA,3000,30:;"
            == stored["metadata"]["annotations"][keys.VGPU_DEVICES_ALLOCATED]
        )
        assert x.kube.stats.restored == 1
        # the node of the undecodable pod is offered to nobody, with the reason
        answer = await filter_pod(session, x.url, pod("next"), ["n2"])
        assert answer["NodeNames"] == []
        assert extending.UNDECODABLE in answer["FailedNodes"]["n2"]
        assert x.kube.stats.undecodable == 1
        (event,) = [e for e in api.events() if e["involvedObject"]["name"] == "broken"]
        assert event["reason"] == extending.UNDECODABLE and event["type"] == "Warning"
        # once the pod is gone, the node is offered again
        await session.delete(f"{api.url}/api/v1/namespaces/default/pods/broken")
        await eventually(lambda: not x.kube.held_nodes(), what="hold lifted")
        again = await filter_pod(session, x.url, pod("next"), ["n2"])
    assert again["NodeNames"] == ["n2"]


# -- replicas at once --------------------------------------------------------------------


async def test_two_extender_replicas_and_a_bus_replica_never_book_the_same_memory(
    nc: Client, bus_settings: BusSettings, api: ApiServer, session: aiohttp.ClientSession
) -> None:
    # 3 nodes x 2 GPUs x 16384 MiB: 5 pods of 3000 MiB per GPU, 30 in all; 80 pods race
    await fleet(nc, bus_settings, "n1", "n2", "n3")
    nodes = ["n1", "n2", "n3"]
    async with harness.replicas(bus_settings, str(api.url), 2) as (a, b):
        pods = [pod(f"p{i}", gpucores=10) for i in range(60)]
        rng = random.Random(7)

        async def via_extender(p: dict[str, Any]) -> str | None:
            # As kube-scheduler through a Service: each attempt goes to a replica at random,
            # sometimes to both at once (a retry after a timeout); an attempt that lost
            # every ledger race is retried, one that fits nowhere is final.
            for _ in range(20):
                targets = rng.sample([a, b], 2 if rng.random() < 0.3 else 1)
                answers = await asyncio.gather(
                    *(filter_pod(session, x.url, p, nodes) for x in targets)
                )
                chosen = {n for answer in answers for n in answer["NodeNames"]}
                assert len(chosen) <= 1, answers  # one pod, one node, whoever answers
                if chosen:
                    return chosen.pop()
                reasons = " ".join(v for ans in answers for v in ans["FailedNodes"].values())
                if "lost the ledger race" not in reasons:
                    return None
            raise AssertionError(f"pod {p['metadata']['name']} kept losing ledger races")

        async def via_bus(i: int) -> events.Placement | events.Unschedulable:
            return await a.replica.schedule(helpers.pod(f"bus-{i}", memory_mib=3000, cores=10))

        results = await asyncio.gather(
            *(via_extender(p) for p in pods), *(via_bus(i) for i in range(20))
        )
        ledgers = await helpers.ledgers(nc, bus_settings)
    placed_k8s = {
        p["metadata"]["uid"]: node for p, node in zip(pods, results[:60], strict=True) if node
    }
    placed_bus = {r.pod_uid: r.node for r in results[60:] if isinstance(r, events.Placement)}
    held = holders(ledgers)
    assert {uid: {node} for uid, node in {**placed_k8s, **placed_bus}.items()} == held
    assert_not_overbooked(ledgers)
    assert len(held) == 30  # every slot taken: retries filled what lost races left
    races = sum(x.replica.stats.conflicts + x.replica.stats.claims_lost for x in (a, b))
    assert races > 0  # the replicas did contend
