"""One-off reads of a whole KV bucket that leave no consumer behind on the server.

nats.py reads a bucket's keys (``KeyValue.keys``, ``watchall``) through an ephemeral push
consumer that nats-server deletes only after ``inactive_threshold`` without interest,
5 minutes by default (``nats/js/kv.py``, ``KeyValue.watch``). A service that lists a
bucket every few seconds so kept hundreds of abandoned consumers alive, each replaying
the bucket's last message per key, and nats-server's memory grew with them through a
churn soak (``benchmarks/soak.py``). These reads ask for ``IDLE_S`` instead.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

# Seconds nats-server keeps a read's consumer once the read stopped (its interest gone).
IDLE_S = 5.0


async def latest(
    kv: KeyValue, *, meta_only: bool = False, idle_s: float = IDLE_S
) -> dict[str, KeyValue.Entry]:
    """Every live key of ``kv`` with its latest entry (deleted and purged keys left out;
    empty values with ``meta_only``). Its consumer is gone from the server ``idle_s``
    seconds after it returns. Raises ``nats.errors.Error`` / ``TimeoutError`` when the
    bucket cannot be read."""
    watcher = await kv.watchall(meta_only=meta_only, ignore_deletes=True, inactive_threshold=idle_s)
    out: dict[str, KeyValue.Entry] = {}
    try:
        async for entry in watcher:
            if entry is None:  # the bucket's content as it was is read
                break
            out[entry.key] = entry
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return out
