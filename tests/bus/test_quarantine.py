"""A bad bucket value costs one node, not the fleet: a registration or ledger value that
does not decode, fails the bounds or names another node quarantines that node only (no
new pod, releases refused with a clear error, named in filters); every other node keeps
scheduling, on running replicas and on ones started afterwards; a good value lifts the
quarantine. A deleted ledger key quarantines its node until ``vslice repair NODE``
rebuilds its ledger from the allocation stream and the claims."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from libshared import connecting, events, kvreads, quarantines
from libshared import leases as leasing
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger, Slice
from libshared.subjects import pod_key
from services.metrics.adapters import bus as metrics_bus
from services.metrics.core import exporting
from services.metrics.core.views import FleetView
from services.scheduler.adapters import bus, upkeep
from tests.bus import helpers
from tests.scheduler.bus.test_claims import replicas
from vslice import repairs, stacks, statuses


async def until(check: Callable[[], bool], what: str, *, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def reason(r: bus.Replica, node: str) -> str | None:
    return r.view.cluster.quarantine_reason(node)


def garbage_ledgers(node: str) -> list[bytes]:
    """Ledger values of ``node`` that must quarantine it: not JSON, out of bounds, another
    node's name."""
    one = Slice(
        pod_uid="x", namespace="ns", pod="x", container="main", container_index=0,
        uuid="GPU-0-0", device_index=0, memory_mib=100, cores_percent=10,
    )  # fmt: skip
    good = msgspec.json.decode(
        events.ENCODER.encode(NodeLedger(node=node, slices=(one,))), type=dict[str, Any]
    )
    slice_dict = good["slices"][0]
    return [
        b"\x00\xffnot json at all",
        msgspec.json.encode({**good, "slices": [{**slice_dict, "cores_percent": 500}]}),
        msgspec.json.encode({**good, "node": "node-2"}),
    ]


async def place_on(r: bus.Replica, uid: str, node: str) -> events.Placement:
    placed = await r.schedule(helpers.pod(uid, memory_mib=1000), nodes=[node])
    assert isinstance(placed, events.Placement) and placed.node == node, placed
    return placed


@pytest.mark.parametrize("bad", range(3), ids=["garbage", "out-of-bounds", "other-node"])
async def test_an_unreadable_ledger_quarantines_its_node_only_until_a_good_value_comes(
    nc: Client, bus_settings: BusSettings, bad: int
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=3, gpus=1, split=100))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 2) as rs:
        held = await place_on(rs[0], "held", "node-0")
        good = (await opened.ledger.get("node-0")).value
        assert good is not None
        await opened.ledger.put("node-0", garbage_ledgers("node-0")[bad])
        await until(
            lambda: all(reason(r, "node-0") == quarantines.LEDGER_UNREADABLE for r in rs),
            "the node is not quarantined",
        )
        detail = rs[0].view.cluster.quarantined["node-0"][quarantines.LEDGER_UNREADABLE]
        assert ["JSON is malformed", "cores_percent=500", "node-2"][bad] in detail, detail
        # every other node keeps scheduling, over the bus and on both replicas, the
        # unpinned requests too
        for i in range(6):
            placed = await helpers.schedule(nc, bus_settings, helpers.pod(f"p{i}", memory_mib=500))
            assert isinstance(placed, events.Placement) and placed.node != "node-0", placed
        pinned = await rs[1].schedule(helpers.pod("pinned", memory_mib=500), nodes=["node-0"])
        assert isinstance(pinned, events.Unschedulable)
        assert pinned.node_reasons["node-0"] == quarantines.LEDGER_UNREADABLE
        assert rs[0].scheduler.filter(helpers.pod("f", memory_mib=1), ["node-0"]).failed == {
            "node-0": quarantines.LEDGER_UNREADABLE
        }
        refused = await helpers.release(nc, bus_settings, "held")
        assert isinstance(refused, events.BusError)
        assert "quarantined (NodeLedgerUnreadable)" in refused.reason
        assert "vslice repair node-0" in refused.reason
        # a released pod on a sound node is released as ever
        other = await helpers.release(nc, bus_settings, "p0")
        assert isinstance(other, events.Ack) and other.node not in (None, "node-0")

        async with replicas(bus_settings, 1) as (late,):
            assert reason(late, "node-0") == quarantines.LEDGER_UNREADABLE
            placed = await late.schedule(helpers.pod("late", memory_mib=500))
            assert isinstance(placed, events.Placement) and placed.node != "node-0"

        await opened.ledger.put("node-0", good)
        await until(lambda: all(reason(r, "node-0") is None for r in rs), "still quarantined")
        ack = await helpers.release(nc, bus_settings, "held")
        assert isinstance(ack, events.Ack) and ack.node == "node-0" and ack.slices == 1
        assert held.node == "node-0"
        again = await rs[1].schedule(helpers.pod("again", memory_mib=500), nodes=["node-0"])
        assert isinstance(again, events.Placement)


def bad_registrations() -> list[tuple[bytes, str]]:
    """Registrations of node-0 that must quarantine it, and what the detail names."""
    nine = helpers.fleet(nodes=1, gpus=9)[0]  # within the bounds, past the replica's 8
    good = msgspec.json.decode(events.ENCODER.encode(nine), type=dict[str, Any])
    devices = good["devices"]
    return [
        (b'{"node": "node-0", "devices": [{"uuid": 7}]}', "$.devices[0]"),
        (msgspec.json.encode({**good, "devices": devices[:1], "node": "node-1"}), "node-1"),
        (
            msgspec.json.encode({**good, "devices": [{**devices[0], "memory_mib": -1}]}),
            "$.devices[0].memory_mib=-1",
        ),
        (msgspec.json.encode(good), "9 devices"),
    ]


@pytest.mark.parametrize("bad", range(4), ids=["wrong-type", "other-node", "negative", "nine"])
async def test_an_unreadable_registration_quarantines_its_node_until_it_registers_again(
    nc: Client, bus_settings: BusSettings, bad: int
) -> None:
    nodes = helpers.fleet(nodes=2, gpus=1, split=100)
    await helpers.register(nc, bus_settings, nodes)
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    value, named = bad_registrations()[bad]
    async with replicas(bus_settings, 1) as (r,):
        await opened.nodes.put("node-0", value)
        await until(lambda: reason(r, "node-0") is not None, "not quarantined")
        assert reason(r, "node-0") == quarantines.REGISTRATION_UNREADABLE
        detail = r.view.cluster.quarantined["node-0"][quarantines.REGISTRATION_UNREADABLE]
        assert named in detail, detail
        for i in range(4):
            placed = await r.schedule(helpers.pod(f"p{i}", memory_mib=500))
            assert isinstance(placed, events.Placement) and placed.node == "node-1", placed
        async with replicas(bus_settings, 1) as (late,):
            assert reason(late, "node-0") == quarantines.REGISTRATION_UNREADABLE
        await helpers.register(nc, bus_settings, nodes[:1])
        await until(lambda: reason(r, "node-0") is None, "still quarantined")
        placed = await r.schedule(helpers.pod("back", memory_mib=500), nodes=["node-0"])
        assert isinstance(placed, events.Placement)


async def test_a_deleted_ledger_key_quarantines_its_node_until_repair_rebuilds_it(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1, split=100))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 2) as rs:
        kept = [await place_on(rs[i % 2], f"kept{i}", "node-0") for i in range(3)]
        await place_on(rs[0], "gone", "node-0")
        assert isinstance(await rs[1].release("gone"), events.Ack)
        before = (await helpers.ledgers(nc, bus_settings))["node-0"]
        await opened.ledger.delete("node-0")
        await until(
            lambda: all(reason(r, "node-0") == quarantines.LEDGER_DELETED for r in rs),
            "the deleted ledger did not quarantine the node",
        )
        for i in range(6):  # no "lost the ledger race": the other node takes them
            placed = await rs[i % 2].schedule(helpers.pod(f"p{i}", memory_mib=500))
            assert isinstance(placed, events.Placement) and placed.node == "node-1", placed
        async with replicas(bus_settings, 1) as (late,):
            # a replica started after the deletion does not forget the node's slices by
            # offering it empty
            assert reason(late, "node-0") == quarantines.LEDGER_DELETED

        done = await repairs.repair(bus_settings, "node-0")
        assert done.ledger is not None and done.problem is not None
        assert "deleted" in done.problem and done.dropped == ()
        assert done.ledger.pods() == {p.pod_uid for p in kept} == before.pods()
        assert sorted(done.ledger.slices, key=lambda s: s.pod_uid) == sorted(
            before.slices, key=lambda s: s.pod_uid
        )
        assert "rebuilt its ledger" in repairs.summary(done)
        await until(lambda: all(reason(r, "node-0") is None for r in rs), "still quarantined")
        ack = await rs[0].release("kept0")
        assert ack.node == "node-0" and ack.slices == 1
        again = await repairs.repair(bus_settings, "node-0")
        assert again.ledger is None and "nothing to repair" in repairs.summary(again)


async def test_repair_rebuilds_an_unreadable_ledger_and_leaves_out_pods_without_a_claim(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1, split=100))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 1) as (r,):
        await place_on(r, "a", "node-0")
        await place_on(r, "b", "node-0")
        await opened.ledger.put("node-0", b"garbage")
        await until(lambda: reason(r, "node-0") is not None, "not quarantined")
        # b's release was committed by hand with its announcement lost: only its claim is gone
        await opened.pods.delete("b")
        done = await repairs.repair(bus_settings, "node-0")
        assert done.ledger is not None and done.ledger.pods() == {"a"} and done.dropped == ("b",)
        assert "JSON is malformed" in (done.problem or "")
        await until(lambda: reason(r, "node-0") is None, "still quarantined")
        assert r.view.cluster.placement_of("b") is None


# (bucket, key, corrupt: True = garbage bytes, False = key deleted), and the quarantine
# reason node-0 must get (None: no node is quarantined)
BUCKET_FAULTS = [
    ("nodes", "node-0", True, quarantines.REGISTRATION_UNREADABLE),
    ("nodes", "node-0", False, None),  # a withdrawal, as ever
    ("ledger", "node-0", True, quarantines.LEDGER_UNREADABLE),
    ("ledger", "node-0", False, quarantines.LEDGER_DELETED),
    ("pods", "leased", True, None),
    ("pods", "leased", False, None),
    ("leases", "leased", True, None),
    ("leases", "leased", False, None),
]


@pytest.mark.parametrize(
    ("bucket", "key", "corrupt", "quarantined"),
    BUCKET_FAULTS,
    ids=[f"{b}-{'corrupt' if c else 'deleted'}" for b, _, c, _ in BUCKET_FAULTS],
)
async def test_one_bad_key_in_any_bucket_leaves_other_nodes_scheduling_and_status_readable(
    nc: Client, bus_settings: BusSettings, bucket: str, key: str, corrupt: bool,
    quarantined: str | None,
) -> None:  # fmt: skip
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1, split=100))
    js = nc.jetstream()
    opened = await connecting.ensure_bus(js, bus_settings)
    leases = await leasing.open_leases(js, bus_settings, create=True)
    kvs = {"nodes": opened.nodes, "ledger": opened.ledger, "pods": opened.pods, "leases": leases}
    async with replicas(bus_settings, 1) as (r,):
        kept = upkeep.Upkeep(replica=r, leases=leases, claims=opened.pods, orphan_grace_s=1)
        leased = await place_on(r, "leased", "node-0")
        await leases.put("leased", leasing.ENCODER.encode(leasing.Lease(pod_uid="leased")))
        await place_on(r, "plain", "node-1")
        if corrupt:
            await kvs[bucket].put(key, b"\xff{not json")
        else:
            await kvs[bucket].delete(key)
        if bucket in ("nodes", "ledger"):
            await until(
                lambda: (
                    reason(r, "node-0") == quarantined
                    and (corrupt or bucket == "ledger" or not bool(r.view.cluster.offered[0]))
                ),
                "the fault is not in the view",
            )
        for i in range(4):
            placed = await helpers.schedule(nc, bus_settings, helpers.pod(f"p{i}", memory_mib=500))
            assert isinstance(placed, events.Placement), placed
            assert bucket not in ("nodes", "ledger") or placed.node == "node-1", placed
        assert await r.schedule(helpers.pod("leased", memory_mib=1000)) == leased  # re-sent
        await kept.expire_leases(now=0.0)
        orphans = await kept.delete_orphan_claims(now=0.0)
        orphans += await kept.delete_orphan_claims(now=10.0)
        assert pod_key("plain") not in orphans and pod_key("p0") not in orphans
        if bucket == "ledger":  # its pods' claims are what a repair keeps
            assert orphans == []

        fleet = await stacks.read_fleet(bus_settings)
        live = await stacks.live_slices(bus_settings)
        data = statuses.status(
            Path("/s"), STACK, alive=lambda pid: True, devices=fleet.devices, nodes=True,
            quarantined=fleet.quarantined,
        )  # fmt: skip
        text = statuses.text(data, table=True) + "\n".join(stacks.slice_lines(live))
        assert {s.pod_uid for s in live} >= {"plain", "p0", "p1", "p2", "p3"}
        if quarantined is None:
            assert fleet.quarantined == {}
        else:
            assert fleet.quarantined["node-0"].startswith(quarantined), fleet.quarantined
            assert f"node-0                  {quarantined}: " in text, text
        if quarantined != quarantines.REGISTRATION_UNREADABLE and bucket != "nodes":
            assert {d.node for d in fleet.devices} == {"node-0", "node-1"}

        # the metrics exporter, started after the fault, reports the same quarantine
        watcher = metrics_bus.Watcher(
            nc=nc, js=js, subjects=bus_settings.subjects, view=FleetView(),
            instruments=metrics_bus.Instruments.create(CollectorRegistry()),
            observe_requests=False,
        )  # fmt: skip
        await watcher.start()
        try:
            snapshot = watcher.view.snapshot(now=0, usage_ttl_s=1)
            (family,) = [
                f
                for f in exporting.vslice_families(snapshot, stats=[])
                if f.name == "vslice_node_quarantined"
            ]
            shown = {(s.labels["node"], s.labels["reason"]) for s in family.samples}
            assert shown == (set() if quarantined is None else {("node-0", quarantined)})
        finally:
            await watcher.stop()


STACK = stacks.Stack(nats_url="nats://127.0.0.1:4222", prefix="t", pids={"nats": 1}, state_dir="/s")


async def test_a_stale_lease_on_a_quarantined_ledger_is_kept_and_its_pod_released_after_repair(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1, split=100))
    js = nc.jetstream()
    opened = await connecting.ensure_bus(js, bus_settings)
    leases = await leasing.open_leases(js, bus_settings, create=True)
    async with replicas(bus_settings, 1) as (r,):
        kept = upkeep.Upkeep(replica=r, leases=leases, claims=opened.pods)
        for uid, node in (("dead-0", "node-0"), ("dead-1", "node-1")):
            await place_on(r, uid, node)
            lease = leasing.Lease(pod_uid=uid, node=node, ttl_s=1)
            await leases.put(uid, leasing.ENCODER.encode(lease))
        await opened.ledger.delete("node-0")
        await until(lambda: reason(r, "node-0") is not None, "not quarantined")
        assert await kept.expire_leases(now=0.0) == []
        # the pod on the sound node is released; the other's lease waits for the repair
        assert await kept.expire_leases(now=100.0) == ["dead-1"]
        assert await kept.expire_leases(now=200.0) == []
        assert await kvreads.keys(leases) == ["dead-0"]
        async with replicas(bus_settings, 1) as (late,):  # knows no slice of node-0 at all
            late_kept = upkeep.Upkeep(replica=late, leases=leases, claims=opened.pods)
            assert await late_kept.expire_leases(now=0.0) == []
            assert await late_kept.expire_leases(now=100.0) == []
            assert await kvreads.keys(leases) == ["dead-0"]

        done = await repairs.repair(bus_settings, "node-0")
        assert done.ledger is not None and done.ledger.pods() == {"dead-0"}
        await until(lambda: reason(r, "node-0") is None, "still quarantined")
        assert await kept.expire_leases(now=300.0) == ["dead-0"]
        assert (await helpers.ledgers(nc, bus_settings))["node-0"].pods() == set()
