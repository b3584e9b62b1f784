"""One-off reads of a whole KV bucket: every key's latest entry, complete, with no
consumer left behind on the server.

Why not nats.py's own (``KeyValue.keys``, ``watchall``):

- Their end-of-content marker (``None``) can come before the content. ``KeyValue.watch``
  sends it at once when the consumer's info says nothing is pending *on the server* and
  the client has handed over nothing yet; on a loaded machine the server has already
  pushed every entry then, and they are still queued in the client. The read returns
  an empty or partial bucket (a status that showed no devices, a ledger re-read that
  missed nodes, a quota gate that believed a namespace had no quota). Here a read ends
  with the entry the server sent with nothing pending after it, or, when the consumer
  matched nothing at all (the server says none pending and none delivered), at once.
- Their ephemeral push consumer stays on nats-server ``inactive_threshold`` after the
  read, 5 minutes by default: a service that lists a bucket every few seconds kept
  hundreds alive through a churn soak (``benchmarks/soak.py``). These reads ask for
  ``IDLE_S`` instead.

Server-placed TTL markers (nats-server 2.11+, header ``Nats-Marker-Reason``) are read as
the purge or delete they stand for.

``purge_markers`` replaces ``KeyValue.purge_deletes``, which reads the bucket with a
``watchall`` it never stops: its subscription stays, and every later write of the bucket
piles up in the client behind its full 256-entry queue. A replica purging two buckets once
a minute so held every claim and lease written since (hundreds of MiB in a 15-minute
churn soak, ``benchmarks/soak.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from libshared import watching

# Seconds nats-server keeps a read's consumer once the read stopped (its interest gone).
IDLE_S = 5.0
# a server marker's reason (header ``watching.MARKER_HEADER``) -> the operation it stands
# for; a reason not listed here is not an entry
MARKER_OPS = {"MaxAge": KV_PURGE, "Purge": KV_PURGE, "Remove": KV_DEL}
UNKNOWN_MARKER = "unknown-marker"


async def latest(
    kv: KeyValue, *, meta_only: bool = False, deletes: bool = False, idle_s: float = IDLE_S
) -> dict[str, KeyValue.Entry]:
    """Every key of ``kv`` with its latest entry, as the bucket was when the read began
    (and any later write that arrived before it ended). Deleted and purged keys are left
    out, or kept with their marker's ``operation`` with ``deletes``; values are empty with
    ``meta_only``. Its consumer is gone from the server ``idle_s`` seconds after it
    returns. Raises ``nats.errors.Error`` / ``TimeoutError`` when the bucket cannot be
    read (a caller bounds the wait with ``asyncio.timeout``)."""
    # nats.py keeps a bucket's stream, subject prefix and JetStream context private
    js, pre, name = kv._js, kv._pre, kv._name
    out: dict[str, KeyValue.Entry] = {}
    done = asyncio.Event()

    async def on_entry(msg: Msg) -> None:
        meta = msg.metadata
        headers = msg.headers or {}
        op = headers.get(KV_OP)
        if op is None and watching.MARKER_HEADER in headers:
            op = MARKER_OPS.get(headers[watching.MARKER_HEADER], UNKNOWN_MARKER)
        key = msg.subject[len(pre) :]
        if op in (KV_DEL, KV_PURGE) and not deletes:
            out.pop(key, None)
        elif op != UNKNOWN_MARKER:
            out[key] = KeyValue.Entry(
                bucket=name,
                key=key,
                value=msg.data,
                revision=meta.sequence.stream,
                delta=meta.num_pending,
                # nats.py annotates ``created`` as int yet fills it with this datetime
                # itself (``KeyValue.watch``); callers read it as a datetime
                created=meta.timestamp,  # type: ignore[arg-type]
                operation=op,
            )
        if meta.num_pending == 0:
            done.set()

    sub = await watching.subscribe_last(
        js, name, on_entry, done, headers_only=meta_only or None, inactive_threshold=idle_s
    )
    try:
        await done.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return out


async def keys(kv: KeyValue, *, idle_s: float = IDLE_S) -> list[str]:
    """The live keys of ``kv``, sorted (an empty bucket: ``[]``, never ``NoKeysError``).
    Raises as ``latest``."""
    return sorted(await latest(kv, meta_only=True, idle_s=idle_s))


async def purge_markers(
    kv: KeyValue, *, older_than_s: float, now: datetime.datetime | None = None
) -> int:
    """Remove from ``kv``'s stream every delete or purge marker older than
    ``older_than_s`` seconds (all of them when it is 0 or less) together with its key's
    earlier messages; returns how many keys it removed. A key written again after its
    marker was read keeps that write: each purge stops at the marker's sequence. Leaves
    no subscription behind. Raises ``nats.errors.Error`` / ``TimeoutError`` when the
    bucket cannot be read or purged."""
    now = now or datetime.datetime.now(datetime.UTC)
    markers = await latest(kv, meta_only=True, deletes=True)
    removed = 0
    for key, entry in sorted(markers.items()):
        if entry.operation not in (KV_DEL, KV_PURGE) or entry.revision is None:
            continue
        created = entry.created
        young = isinstance(created, datetime.datetime) and (
            (now - created).total_seconds() < older_than_s
        )
        if older_than_s > 0 and young:
            continue
        # nats.py keeps a bucket's stream and subject prefix private
        await kv._js.purge_stream(kv._stream, seq=entry.revision + 1, subject=f"{kv._pre}{key}")
        removed += 1
    return removed
