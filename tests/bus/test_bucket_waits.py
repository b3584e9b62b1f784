"""Opening the buckets: those that may not create them wait for them, up to a limit; those
that may create them do so once, however many race."""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError

from libshared import connecting
from libshared import leases as leasing
from libshared.connecting import BusSettings


async def test_a_service_that_may_not_create_the_buckets_waits_for_them(
    nc: Client, bus_settings: BusSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vslice.bus")
    js = nc.jetstream()
    waiter = asyncio.create_task(connecting.ensure_bus(js, bus_settings, create=False, wait_s=60))
    leases = asyncio.create_task(leasing.open_leases(js, bus_settings, create=False, wait_s=60))
    kv = asyncio.create_task(connecting.open_bucket(js, bus_settings.subjects.nodes_bucket))
    async with asyncio.timeout(30):  # the bus waiter has found nothing and says so
        while not any("waiting for the scheduler" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    assert not (waiter.done() or leases.done() or kv.done())
    created = await connecting.ensure_bus(js, bus_settings)
    await leasing.open_leases(js, bus_settings, create=True)
    opened = await asyncio.wait_for(waiter, 30)
    assert (await opened.ledger.status()).bucket == (await created.ledger.status()).bucket
    assert (await (await asyncio.wait_for(kv, 30)).status()).bucket == (
        bus_settings.subjects.nodes_bucket
    )
    leases_kv = await asyncio.wait_for(leases, 30)
    assert (await leases_kv.status()).bucket == bus_settings.subjects.leases_bucket


@pytest.mark.parametrize("which", ["bus", "leases", "bucket"])
async def test_a_bucket_still_missing_after_the_wait_is_an_error(
    nc: Client, bus_settings: BusSettings, which: str
) -> None:
    js = nc.jetstream()
    with pytest.raises(BucketNotFoundError):
        if which == "bus":
            await connecting.ensure_bus(js, bus_settings, create=False, wait_s=0.3)
        elif which == "leases":
            await leasing.open_leases(js, bus_settings, create=False, wait_s=0.3)
        else:
            await connecting.open_bucket(js, bus_settings.subjects.ledger_bucket, wait_s=0.3)


async def test_replicas_racing_to_create_the_buckets_all_succeed_with_one_set(
    nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream()
    opened = await asyncio.gather(*(connecting.ensure_bus(js, bus_settings) for _ in range(6)))
    leases = await asyncio.gather(
        *(leasing.open_leases(js, bus_settings, create=True) for _ in range(6))
    )
    buckets = {(await b.ledger.status()).bucket for b in opened}
    buckets |= {(await kv.status()).bucket for kv in leases}
    subjects = bus_settings.subjects
    assert buckets == {subjects.ledger_bucket, subjects.leases_bucket}
    for bucket in (subjects.nodes_bucket, subjects.pods_bucket):
        assert (await js.stream_info(f"KV_{bucket}")).config.num_replicas == 1
