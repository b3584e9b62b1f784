"""The replicas' upkeep on a real bus, as the scheduler identity: stale leases release
their pods, orphan claims are deleted, old delete markers purged, and the allocation
stream has every limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js import api

from libshared import connecting, events, kvreads
from libshared import leases as leasing
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from libshared.subjects import pod_key
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus, upkeep
from services.scheduler.core import protocol
from services.scheduler.settings import Settings
from tests.bus import helpers


@pytest.fixture
async def kept(
    nats_server: NatsServer, prefix: str, nc: Client, bus_settings: BusSettings
) -> AsyncIterator[upkeep.Upkeep]:
    """A replica connected as the scheduler identity, with its upkeep (not started: the
    test calls each step with its own clock), on a fleet the operator registered."""
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    settings = nats_server.identity(f"scheduler-{prefix}", Role.SCHEDULER, prefix=prefix)
    replica_nc = await connecting.connect(settings, name="replica")
    js = replica_nc.jetstream()
    opened = await connecting.ensure_bus(js, settings)
    replica = bus.Replica(
        nc=replica_nc,
        js=js,
        bus=opened,
        subjects=settings.subjects,
        scheduler=scheduler_app.build_scheduler(Settings(bus=settings, name="r1")),
        name="r1",
    )
    await replica.start()
    leases = await leasing.open_leases(js, settings, create=True)
    yield upkeep.Upkeep(
        replica=replica, leases=leases, claims=opened.pods, orphan_grace_s=60, marker_age_s=0
    )
    await replica.stop()
    await replica_nc.close()


async def placed(nc: Client, settings: BusSettings, uid: str) -> set[str]:
    answer = await helpers.schedule(nc, settings, helpers.pod(uid, memory_mib=1000))
    assert isinstance(answer, events.Placement), answer
    return pods(await helpers.ledgers(nc, settings))


def pods(ledgers: dict[str, NodeLedger]) -> set[str]:
    return {uid for ledger in ledgers.values() for uid in ledger.pods()}


async def test_a_stale_lease_releases_its_pod_a_renewed_one_and_a_pod_without_lease_stay(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    for uid in ("run-dead", "run-alive", "from-kubernetes"):
        await placed(nc, bus_settings, uid)
    lease = leasing.Lease(pod_uid="run-dead", ttl_s=3)
    await kept.leases.put(pod_key("run-dead"), leasing.ENCODER.encode(lease))
    alive = leasing.Lease(pod_uid="run-alive", ttl_s=3)
    await kept.leases.put(pod_key("run-alive"), leasing.ENCODER.encode(alive))
    assert await kept.expire_leases(now=0.0) == []
    await kept.leases.put(pod_key("run-alive"), leasing.ENCODER.encode(alive))  # renewed
    assert await kept.expire_leases(now=2.0) == []
    assert await kept.expire_leases(now=3.0) == ["run-dead"]
    assert pods(await helpers.ledgers(nc, bus_settings)) == {"run-alive", "from-kubernetes"}
    assert await kept.expire_leases(now=5.0) == ["run-alive"]  # not renewed since 2.0
    assert await kept.expire_leases(now=500.0) == []
    assert pods(await helpers.ledgers(nc, bus_settings)) == {"from-kubernetes"}
    assert kept.released == 2


async def test_a_schedule_request_handled_after_its_lease_ended_places_nothing(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    """The client put its lease, sent its schedule request and died; the lease ended
    before a replica handled the request: the release's tombstone refuses it."""
    lease = leasing.Lease(pod_uid="run-late", ttl_s=1)
    await kept.leases.put(pod_key("run-late"), leasing.ENCODER.encode(lease))
    assert await kept.expire_leases(now=0.0) == []
    assert await kept.expire_leases(now=1.0) == ["run-late"]  # nothing held yet
    answer = await helpers.schedule(nc, bus_settings, helpers.pod("run-late", memory_mib=1000))
    assert isinstance(answer, events.Unschedulable) and "was released" in answer.reason
    assert "run-late" not in pods(await helpers.ledgers(nc, bus_settings))
    assert await kept.expire_leases(now=30.0) == []


async def test_a_pod_in_a_ledger_behind_its_tombstone_is_released_again(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    """A holder committed after the release's tombstone and died before taking its
    slices back: the upkeep frees them."""
    await placed(nc, bus_settings, "left")
    await kept.claims.put(pod_key("left"), protocol.TOMBSTONE)
    assert "left" in pods(await helpers.ledgers(nc, bus_settings))
    await kept.delete_orphan_claims(now=0.0)
    assert "left" not in pods(await helpers.ledgers(nc, bus_settings))
    assert kept.released == 1


async def test_an_orphan_claim_is_deleted_after_the_grace_and_its_marker_purged(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    await placed(nc, bus_settings, "held")
    await kept.claims.put(pod_key("orphan"), b"node-0")  # a replica died before its commit
    assert await kept.delete_orphan_claims(now=0.0) == []
    assert await kept.delete_orphan_claims(now=59.0) == []
    assert await kept.delete_orphan_claims(now=60.0) == [pod_key("orphan")]
    assert await kvreads.keys(kept.claims) == [pod_key("held")]
    stream = f"KV_{bus_settings.subjects.pods_bucket}"
    js = nc.jetstream()
    assert (await js.stream_info(stream)).state.messages == 2  # the claim and a marker
    await kept.purge_markers()
    assert (await js.stream_info(stream)).state.messages == 1  # the held claim alone


async def test_a_released_pod_leaves_no_claim_once_its_tombstone_expired_and_was_purged(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream()
    stream = f"KV_{bus_settings.subjects.pods_bucket}"
    for n in range(5):
        await placed(nc, bus_settings, f"churn-{n}")
        assert isinstance(await helpers.release(nc, bus_settings, f"churn-{n}"), events.Ack)
    assert (await js.stream_info(stream)).state.messages == 5  # one tombstone a pod
    ttl = kept.tombstone_ttl_s
    assert await kept.delete_orphan_claims(now=0.0) == []
    assert await kept.delete_orphan_claims(now=ttl - 1) == []  # past the orphans' grace
    assert len(await kept.delete_orphan_claims(now=ttl)) == 5
    await kept.purge_markers()
    assert (await js.stream_info(stream)).state.messages == 0


async def followed(kept: upkeep.Upkeep) -> upkeep.ClaimsView:
    """Start the upkeep's claims view (as ``Upkeep.start`` does) and wait until it
    follows the bucket."""
    view = upkeep.ClaimsView(kept.claims)
    kept._view = view
    view.start()
    async with asyncio.timeout(20):
        while view.entries is None:
            await asyncio.sleep(0.01)
    return view


async def test_tombstones_carry_their_ttl_and_the_view_leaves_them_to_the_server(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    """Under churn the replicas no longer delete each tombstone nor read the bucket whole:
    the server removes a tombstone by its TTL, and the view forgets it then."""
    js = nc.jetstream()
    stream = f"KV_{bus_settings.subjects.pods_bucket}"
    view = await followed(kept)
    try:
        for n in range(5):
            await placed(nc, bus_settings, f"churn-{n}")
            assert isinstance(await helpers.release(nc, bus_settings, f"churn-{n}"), events.Ack)
        raw = await js.get_last_msg(stream, f"$KV.{bus_settings.subjects.pods_bucket}.churn-0")
        assert raw.headers is not None
        assert float(raw.headers[api.Header.MSG_TTL.value]) == protocol.TOMBSTONE_TTL_S
        async with asyncio.timeout(20):
            while len(view.entries or {}) < 5 or not all(
                c.tombstone for c in (view.entries or {}).values()
            ):
                await asyncio.sleep(0.01)
        assert all(c.ttl_s == protocol.TOMBSTONE_TTL_S for c in view.entries.values())
        t0 = max(c.since for c in view.entries.values())
        assert await kept.delete_orphan_claims(now=t0 + kept.tombstone_ttl_s - 1) == []
        assert len(view.entries) == 5
        assert await kept.delete_orphan_claims(now=t0 + kept.tombstone_ttl_s) == []
        assert view.entries == {}  # forgotten, not deleted: the server removes them
        assert (await js.stream_info(stream)).state.messages == 5
    finally:
        await view.stop()


async def test_the_view_follows_writes_and_removals_and_deletes_an_orphan_claim(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    view = await followed(kept)
    try:
        await placed(nc, bus_settings, "held")
        await kept.claims.put(pod_key("orphan"), b"node-0")
        async with asyncio.timeout(20):
            while set(view.entries or {}) != {pod_key("held"), pod_key("orphan")}:
                await asyncio.sleep(0.01)
        assert view.entries[pod_key("orphan")].ttl_s is None
        t0 = view.entries[pod_key("orphan")].since
        assert await kept.delete_orphan_claims(now=t0 + 59.0) == []
        assert await kept.delete_orphan_claims(now=t0 + 60.0) == [pod_key("orphan")]
        async with asyncio.timeout(20):
            while set(view.entries or {}) != {pod_key("held")}:
                await asyncio.sleep(0.01)
        stream = f"KV_{bus_settings.subjects.pods_bucket}"
        marker = await nc.jetstream().get_last_msg(
            stream, f"$KV.{bus_settings.subjects.pods_bucket}.{pod_key('orphan')}"
        )
        assert marker.headers is not None and marker.headers["KV-Operation"] == "PURGE"
        assert float(marker.headers[api.Header.MSG_TTL.value]) > 0  # the server removes it
    finally:
        await view.stop()


async def test_a_running_upkeep_removes_an_orphan_claim_through_its_view(
    kept: upkeep.Upkeep, nc: Client, bus_settings: BusSettings
) -> None:
    kept.period_s = kept.claims_every_s = 0.05
    kept.orphan_grace_s = 0.5
    await placed(nc, bus_settings, "held")
    await kept.claims.put(pod_key("orphan"), b"node-0")
    kept.start()
    try:
        async with asyncio.timeout(30):
            while await kvreads.keys(kept.claims) != [pod_key("held")]:
                await asyncio.sleep(0.05)
        assert kept.orphans_deleted == 1 and kept._view is not None
        assert kept._view.entries is not None  # it followed the bucket
    finally:
        await kept.stop()
    assert kept._view is None


async def consumers(kept: upkeep.Upkeep, bucket: str) -> int:
    return (await kept.replica.js.stream_info(f"KV_{bucket}")).state.consumer_count


async def test_the_snapshots_consumers_are_gone_from_the_server_seconds_after_they_are_read(
    kept: upkeep.Upkeep,
) -> None:
    # nats.py's default keeps an ephemeral watcher's consumer 5 minutes after it stopped:
    # one per snapshot, hundreds through a churn soak
    s = kept.replica.subjects
    await kept.leases.put(pod_key("run-a"), leasing.ENCODER.encode(leasing.Lease(pod_uid="run-a")))
    before = {b: await consumers(kept, b) for b in (s.leases_bucket, s.pods_bucket)}
    for _ in range(3):
        assert set(await upkeep.snapshot(kept.leases)) == {pod_key("run-a")}
        await upkeep.snapshot(kept.claims, headers_only=True)
    assert await consumers(kept, s.leases_bucket) > before[s.leases_bucket]
    async with asyncio.timeout(kvreads.IDLE_S + 25):
        while {b: await consumers(kept, b) for b in before} != before:
            await asyncio.sleep(0.5)


async def test_the_allocation_stream_has_an_age_a_byte_and_a_message_limit_even_if_made_without(
    nc: Client, bus_settings: BusSettings
) -> None:
    s = bus_settings.subjects
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name=s.alloc_stream, subjects=[s.alloc_all]))
    await connecting.ensure_bus(js, bus_settings)
    config = (await js.stream_info(s.alloc_stream)).config
    assert (config.max_age, config.max_bytes, config.max_msgs) == (
        connecting.ALLOC_MAX_AGE_S,
        connecting.ALLOC_MAX_BYTES,
        connecting.ALLOC_MAX_MSGS,
    )
