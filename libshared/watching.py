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
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

HEARTBEAT_S = 0.5
MARKER_HEADER = "Nats-Marker-Reason"  # server-placed TTL markers (nats-server 2.11+)

Handler = Callable[[str, bytes | None, int], None]


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

    return await js.subscribe(
        f"{pre}>",
        stream=stream,
        cb=on_entry,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        idle_heartbeat=HEARTBEAT_S,
    )
