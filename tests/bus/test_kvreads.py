"""One-off reads of a whole bucket (``libshared.kvreads``) and the watch's ready signal
(``libshared.watching``): complete even when the server has pushed every entry before the
client handled one, which made nats.py's ``watchall`` / ``keys`` end with nothing."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL

from libshared import connecting, kvreads, watching
from libshared.connecting import BusSettings

Callback = Callable[[Msg], Awaitable[None]]


@pytest.fixture
def held_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every push subscription's callback waits until the server has delivered all its
    consumer had pending and the client asked for the consumer's info: the client has
    received the bucket's entries and handled none when it learns nothing is pending."""
    subscribe = JetStreamContext.subscribe
    info = JetStreamContext.PushSubscription.consumer_info
    asked = asyncio.Event()

    async def held_subscribe(self: JetStreamContext, *args: Any, cb: Callback, **kw: Any) -> Any:
        async def later(msg: Msg) -> None:
            await asked.wait()
            await cb(msg)

        return await subscribe(self, *args, cb=later, **kw)

    async def delivered_info(self: JetStreamContext.PushSubscription) -> Any:
        async with asyncio.timeout(20):
            while (got := await info(self)).num_pending:  # the server has yet to push some
                await asyncio.sleep(0.01)
        asked.set()
        return got

    monkeypatch.setattr(JetStreamContext, "subscribe", held_subscribe)
    monkeypatch.setattr(JetStreamContext.PushSubscription, "consumer_info", delivered_info)


async def test_a_read_whose_entries_are_handled_after_the_consumer_info_returns_every_key(
    nc: Client, bus_settings: BusSettings, held_back: None
) -> None:
    nodes = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).nodes
    for i in range(5):
        await nodes.put(f"node-{i}", f"v{i}".encode())
    await nodes.put("node-0", b"newer")
    await nodes.delete("node-4")
    async with asyncio.timeout(20):
        got = await kvreads.latest(nodes)
        with_deletes = await kvreads.latest(nodes, deletes=True)
        keys = await kvreads.keys(nodes)
    assert {k: e.value for k, e in got.items()} == {
        "node-0": b"newer", "node-1": b"v1", "node-2": b"v2", "node-3": b"v3"
    }  # fmt: skip
    assert with_deletes["node-4"].operation == KV_DEL
    assert with_deletes.keys() - got.keys() == {"node-4"}
    assert keys == ["node-0", "node-1", "node-2", "node-3"]


async def test_a_watch_is_ready_only_once_the_content_was_handed_over(
    nc: Client, bus_settings: BusSettings, held_back: None
) -> None:
    js = nc.jetstream()
    ledger = (await connecting.ensure_bus(js, bus_settings)).ledger
    for i in range(3):
        await ledger.put(f"node-{i}", b"{}")
    seen: dict[str, bytes | None] = {}
    ready = asyncio.Event()

    def handle(key: str, value: bytes | None, revision: int) -> None:
        seen[key] = value

    sub = await watching.watch_kv(ledger, handle, ready)
    try:
        async with asyncio.timeout(20):
            await ready.wait()
        assert set(seen) == {"node-0", "node-1", "node-2"}
    finally:
        await sub.unsubscribe()


async def test_an_empty_bucket_reads_empty_at_once_and_a_bucket_of_deleted_keys_too(
    nc: Client, bus_settings: BusSettings
) -> None:
    bus = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with asyncio.timeout(10):
        assert await kvreads.latest(bus.pods) == {}
        assert await kvreads.keys(bus.pods) == []
        await bus.pods.put("a", b"x")
        await bus.pods.purge("a")
        assert await kvreads.latest(bus.pods) == {}
        assert list(await kvreads.latest(bus.pods, deletes=True)) == ["a"]


async def test_a_headers_only_read_has_the_keys_and_no_values(
    nc: Client, bus_settings: BusSettings
) -> None:
    nodes = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).nodes
    await nodes.put("node-0", b"x" * 1000)
    async with asyncio.timeout(10):
        got = await kvreads.latest(nodes, meta_only=True)
    assert list(got) == ["node-0"] and not got["node-0"].value


async def test_hundreds_of_reads_in_a_row_each_return_the_whole_bucket(
    nc: Client, bus_settings: BusSettings
) -> None:
    # nats.py's keys() came back empty about once in 300 such reads on an idle machine
    nodes = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).nodes
    await nodes.put("node-0", b"a")
    await nodes.put("node-1", b"b")
    async with asyncio.timeout(120):
        reads = [await kvreads.keys(nodes, idle_s=1) for _ in range(600)]
    assert [r for r in reads if r != ["node-0", "node-1"]] == []


async def test_purging_markers_removes_the_old_ones_and_leaves_no_subscription(
    nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream()
    pods = (await connecting.ensure_bus(js, bus_settings)).pods
    stream = f"KV_{bus_settings.subjects.pods_bucket}"
    for key in ("gone-a", "gone-b", "kept"):
        await pods.put(key, b"x")
    await pods.delete("gone-a")
    await pods.purge("gone-b")
    subscriptions = len(nc._subs)
    async with asyncio.timeout(20):
        assert await kvreads.purge_markers(pods, older_than_s=60) == 0  # both too young
        assert (await js.stream_info(stream)).state.messages == 3
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=61)
        assert await kvreads.purge_markers(pods, older_than_s=60, now=later) == 2
        assert (await js.stream_info(stream)).state.messages == 1
        assert await kvreads.keys(pods) == ["kept"]
    # nats.py's purge_deletes left its watch subscribed, taking in every later write
    assert len(nc._subs) == subscriptions


async def test_a_key_written_again_after_its_marker_was_read_keeps_the_write(
    nc: Client, bus_settings: BusSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    pods = (await connecting.ensure_bus(nc.jetstream(), bus_settings)).pods
    await pods.put("pod-a", b"claim")
    await pods.delete("pod-a")
    read = kvreads.latest

    async def then_written(kv: Any, **kw: Any) -> dict[str, Any]:
        out = await read(kv, **kw)
        await pods.put("pod-a", b"claimed again")  # between the read and the purge
        return out

    monkeypatch.setattr(kvreads, "latest", then_written)
    async with asyncio.timeout(20):
        assert await kvreads.purge_markers(pods, older_than_s=0) == 1
    assert (await pods.get("pod-a")).value == b"claimed again"
