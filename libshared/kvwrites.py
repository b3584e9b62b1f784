"""KV writes that leave nothing behind: a key removed by a purge marker that nats-server
itself expires, and the bucket setting that allows it.

A plain ``KeyValue.delete`` leaves a delete marker per key for ever; sweeping them meant
reading the whole bucket and one purge request per marker (``kvreads.purge_markers``),
thousands a minute under churn. A marker written here carries a per-message TTL
(``Nats-TTL``, nats-server 2.11+, ADR-43 "JetStream Per-Message TTL"): its
``Nats-Rollup: sub`` header removes the key's earlier messages at once and the server
removes the marker itself ``MARKER_TTL_S`` seconds later. Watchers see it as the purge it
is (``libshared.watching``, ``libshared.kvreads``) while it lasts.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KV_OP, KV_PURGE, KeyValue

# How long a removed key's marker stays, seconds: long enough for a watcher that was cut
# off for a while to learn the key is gone when it resumes from its last sequence.
MARKER_TTL_S = 300.0
# JetStream's "wrong last sequence" error codes (a compare-and-set that lost)
WRONG_LAST = (10071, 10164)


class TtlUnsupported(nats.js.errors.Error):
    """The server keeps no per-message TTL (nats-server before 2.11)."""


async def purge(
    kv: KeyValue, key: str, *, last: int | None = None, ttl_s: float = MARKER_TTL_S
) -> int:
    """Remove ``key`` from ``kv`` (every revision) by a purge marker the server removes
    after ``ttl_s`` seconds (at least 1); with ``last``, only if the key's revision is
    still ``last`` (0: only if it has none). Returns the marker's revision. Raises
    ``KeyWrongLastSequenceError`` when ``last`` no longer holds, ``nats.errors.Error``
    / ``TimeoutError`` when the bucket cannot be written."""
    headers = {KV_OP: KV_PURGE, api.Header.ROLLUP.value: "sub"}
    if last is not None:
        headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(last)
    return await _publish(kv, key, b"", headers, ttl_s)


async def update(
    kv: KeyValue, key: str, value: bytes, *, last: int, ttl_s: float | None = None
) -> int:
    """Write ``value`` at ``key`` if its revision is still ``last`` (0: only if it has
    none), removed by the server ``ttl_s`` seconds later (at least 1) unless written
    again; ``KeyValue.update`` with the TTL it lacks. Returns the new revision. Raises as
    ``purge``."""
    headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
    return await _publish(kv, key, value, headers, ttl_s)


async def _publish(
    kv: KeyValue, key: str, value: bytes, headers: dict[str, str], ttl_s: float | None
) -> int:
    # nats.py keeps a bucket's JetStream context and subject prefix private
    ttl = None if ttl_s is None else max(1.0, ttl_s)
    try:
        ack = await kv._js.publish(f"{kv._pre}{key}", value, headers=headers, msg_ttl=ttl)
    except nats.js.errors.APIError as exc:
        if exc.err_code in WRONG_LAST:
            raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from exc
        raise
    return ack.seq


async def allow_ttl(js: JetStreamContext, bucket: str) -> None:
    """Make the stream of ``bucket`` keep per-message TTLs (buckets made by an older
    nats.py lack ``allow_msg_ttl``; the setting can be turned on, never off). Raises
    ``TtlUnsupported`` when the server does not keep it (nats-server before 2.11), and
    what JetStream raises when the stream cannot be read or updated."""
    stream = f"KV_{bucket}"
    config = (await js.stream_info(stream)).config
    if config.allow_msg_ttl:
        return
    config.allow_msg_ttl = True
    updated = await js.update_stream(config)
    if not updated.config.allow_msg_ttl:
        raise TtlUnsupported(
            description=f"stream {stream}: allow_msg_ttl not kept: vslice needs nats-server"
            " 2.11 or later (per-message TTL)"
        )
