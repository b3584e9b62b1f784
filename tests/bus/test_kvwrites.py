"""Keys removed by a purge marker that nats-server expires itself (``libshared.kvwrites``):
nothing is left in the stream once the marker's TTL has passed, and a compare-and-set that
lost removes nothing."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from libshared import connecting, kvreads, kvwrites
from libshared.connecting import BusSettings


async def _stream_msgs(nc: Client, bucket: str) -> int:
    return (await nc.jetstream().stream_info(f"KV_{bucket}")).state.messages


async def _until_left(nc: Client, bucket: str, left: int) -> None:
    """Wait until the server's TTL expiry (about once a second) leaves ``left`` messages."""
    async with asyncio.timeout(30):
        while await _stream_msgs(nc, bucket) != left:
            await asyncio.sleep(0.1)


async def test_a_purge_removes_every_revision_and_the_server_removes_its_marker(
    nc: Client, bus_settings: BusSettings
) -> None:
    pods = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).pods
    rev = await pods.put("a", b"claim")
    await pods.put("b", b"kept")
    marker = await kvwrites.purge(pods, "a", last=rev, ttl_s=1)
    assert marker > rev
    with pytest.raises(KeyNotFoundError):
        await pods.get("a")
    got = await kvreads.latest(pods, deletes=True)
    assert got["a"].operation == "PURGE" and got["b"].value == b"kept"
    raw = await nc.jetstream().get_last_msg(pods._stream, f"{pods._pre}a")
    assert raw.headers is not None and raw.headers.get(api.Header.MSG_TTL.value) == "1"
    await _until_left(nc, bus_settings.subjects.pods_bucket, 1)
    left = await kvreads.latest(pods, deletes=True)
    assert {k: e.value for k, e in left.items()} == {"b": b"kept"}


async def test_a_purge_whose_revision_moved_on_removes_nothing(
    nc: Client, bus_settings: BusSettings
) -> None:
    pods = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).pods
    first = await pods.put("a", b"old")
    await pods.put("a", b"new")
    with pytest.raises(KeyWrongLastSequenceError):
        await kvwrites.purge(pods, "a", last=first)
    assert (await pods.get("a")).value == b"new"
    with pytest.raises(KeyWrongLastSequenceError):
        await kvwrites.purge(pods, "a", last=0)  # 0: only a key with no revision
    assert (await pods.get("a")).value == b"new"


async def test_a_bucket_made_without_message_ttls_is_given_them(
    nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream()
    bucket = f"{bus_settings.subjects.pods_bucket}-old"
    await js.add_stream(
        api.StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            allow_rollup_hdrs=True,
            max_msgs_per_subject=1,
            allow_msg_ttl=False,
        )
    )
    kv = await js.key_value(bucket)
    await kv.put("a", b"x")
    await kvwrites.allow_ttl(js, bucket)
    assert (await js.stream_info(f"KV_{bucket}")).config.allow_msg_ttl
    await kvwrites.allow_ttl(js, bucket)  # already on: nothing to do
    await kvwrites.purge(kv, "a", ttl_s=1)
    await _until_left(nc, bucket, 0)


async def test_an_update_with_a_ttl_is_removed_by_the_server_and_one_that_lost_writes_nothing(
    nc: Client, bus_settings: BusSettings
) -> None:
    pods = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).pods
    rev = await pods.put("a", b"claim")
    with pytest.raises(KeyWrongLastSequenceError):
        await kvwrites.update(pods, "a", b"late", last=rev + 5, ttl_s=1)
    assert (await pods.get("a")).value == b"claim"
    await kvwrites.update(pods, "a", b"tombstone", last=rev, ttl_s=1)
    assert (await pods.get("a")).value == b"tombstone"
    await _until_left(nc, bus_settings.subjects.pods_bucket, 0)
    assert await kvreads.keys(pods) == []
