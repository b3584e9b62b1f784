"""One way to watch a KV bucket: every key's latest value, then each change, in order.

``kv.watchall()`` has no heartbeat setting: its ordered consumer notices a lost NATS node
only after 10 s. ``watch`` subscribes an ordered consumer from the last value of each key
with a heartbeat every ``HEARTBEAT_S``, so a failover is noticed within about a second
and the consumer resumes from the last sequence it saw. Server-placed TTL markers
(nats-server 2.11+, header ``MARKER_HEADER``) are skipped; a delete or purge reaches the
handler as value None.

Used by the scheduler replicas' view and the metrics service's fleet view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

HEARTBEAT_S = 0.5
MARKER_HEADER = "Nats-Marker-Reason"  # server-placed TTL markers (nats-server 2.11+)

Handler = Callable[[str, bytes | None, int], None]


def is_removal(headers: Mapping[str, str] | None) -> bool:
    """Whether a bucket message with these headers removes its key: a delete or purge
    (``KV-Operation``), or a marker the server placed (``Nats-Marker-Reason``)."""
    if not headers:
        return False
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or MARKER_HEADER in headers


async def watch(
    js: JetStreamContext,
    bucket: str,
    handle: Handler,
    ready: asyncio.Event,
    *,
    seen: Callable[[int], None] | None = None,
) -> Subscription:
    """Watch ``bucket``: ``handle(key, value, revision)`` for each key's latest value and
    then each change (value None: deleted or purged); ``ready`` is set once the bucket's
    content at subscription time has been handed over (at once for an empty bucket);
    ``seen(sequence)`` is told every stream sequence delivered, markers included.
    Returns the subscription (the caller unsubscribes it). Raises what JetStream raises
    when the bucket's stream cannot be read."""
    pre, stream = f"$KV.{bucket}.", f"KV_{bucket}"
    if (await js.stream_info(stream)).state.last_seq == 0:
        ready.set()

    async def on_entry(msg: Msg) -> None:
        meta = msg.metadata
        if seen is not None:
            seen(meta.sequence.stream)
        if not (msg.headers and MARKER_HEADER in msg.headers):
            op = msg.headers.get(KV_OP) if msg.headers else None
            value = None if op in (KV_DEL, KV_PURGE) else msg.data
            handle(msg.subject[len(pre) :], value, meta.sequence.stream)
        if meta.num_pending == 0:
            ready.set()

    return await subscribe_last(js, bucket, on_entry, ready, idle_heartbeat=HEARTBEAT_S)


async def subscribe_last(
    js: JetStreamContext,
    bucket: str,
    on_entry: Callable[[Msg], Awaitable[None]],
    ready: asyncio.Event,
    **options: Any,
) -> Subscription:
    """Subscribe ``on_entry`` to the last message of each key of ``bucket`` and then each
    change, on an ordered consumer (``options``: more of ``js.subscribe``'s). ``on_entry``
    sets ``ready`` on a message with nothing pending after it; this sets it at once when
    the server says it had nothing for the consumer (nothing pending, nothing delivered:
    an empty bucket, or one whose messages were all removed). Both are the server's
    counts: the client's own (what nats.py's ``watchall`` trusts) may lag what the
    server already pushed (``libshared.kvreads``). Raises what JetStream raises."""
    sub = await js.subscribe(
        f"$KV.{bucket}.>",
        stream=f"KV_{bucket}",
        cb=on_entry,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        **options,
    )
    if not ready.is_set():
        try:
            info = await sub.consumer_info()
        except BaseException:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            raise
        if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
            ready.set()
    return sub


async def watch_kv(
    kv: KeyValue,
    handle: Handler,
    ready: asyncio.Event,
    *,
    seen: Callable[[int], None] | None = None,
) -> Subscription:
    """``watch`` for a bucket opened with ``js.key_value`` (same arguments and errors)."""
    # nats.py keeps a bucket's JetStream context and name private
    return await watch(kv._js, kv._name, handle, ready, seen=seen)
