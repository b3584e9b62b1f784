"""Waiting until a newly created JetStream stream or KV bucket can take writes.

On a NATS cluster a replicated (R3) stream is created before its replicas have elected a
leader; until they have, a write to it finds no responders (``NoRespondersError``) or
times out. Whoever creates a replicated bucket and then uses it waits here first: until
the stream's info names a leader and, on a cluster, every replica is current. On a single
server the info has no cluster part, and the stream is ready as soon as it answers.

What it leaves to others: creating streams and buckets (``libshared.connecting``).
"""

from __future__ import annotations

import nats.errors
import tenacity
from nats.js.api import StreamInfo
from nats.js.client import JetStreamContext

from libshared.errors import VsliceError

KV_STREAM_PREFIX = "KV_"  # a KV bucket's stream is KV_<bucket> (NATS ADR-8)


class NotReadyError(VsliceError):
    """The stream did not get a leader with current replicas in time: ``stream``,
    ``timeout_s``, and ``state`` (what its last info said)."""

    def __init__(self, *, stream: str, timeout_s: float, state: str) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.state = state
        super().__init__(f"stream {stream}: not ready after {timeout_s:.0f} s ({state})")


def readiness(info: StreamInfo) -> str:
    """``""`` when ``info`` says the stream takes writes (no cluster part, or a leader and
    every replica current), else what it still lacks. Pure."""
    cluster = info.cluster
    if cluster is None:
        return ""
    if not cluster.leader:
        return "no leader elected yet"
    behind = [p.name or "?" for p in cluster.replicas or () if not p.current or p.offline]
    if behind:
        return f"leader {cluster.leader}; replicas not current: {', '.join(behind)}"
    return ""


async def stream_ready(
    js: JetStreamContext, stream: str, *, timeout_s: float = 30.0, interval_s: float = 0.05
) -> StreamInfo:
    """Wait until ``stream`` takes writes (``readiness``); returns its info. Raises
    ``NotReadyError`` after ``timeout_s`` seconds, naming what it still lacked."""

    async def attempt() -> tuple[str, StreamInfo | None]:
        try:
            info = await js.stream_info(stream)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            return f"stream info: {type(exc).__name__}", None
        except nats.errors.Error as exc:  # e.g. a cluster still forming: no JetStream yet
            return f"stream info: {exc}", None
        return readiness(info), info

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_result(lambda outcome: bool(outcome[0])),
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(interval_s),
        retry_error_callback=_last_result,
    )
    last: tuple[str, StreamInfo | None] = await retrying(attempt)
    state, info = last
    if state or info is None:
        raise NotReadyError(stream=stream, timeout_s=timeout_s, state=state)
    return info


def _last_result(retry_state: tenacity.RetryCallState) -> tuple[str, StreamInfo | None]:
    assert retry_state.outcome is not None  # called once an attempt has ended
    result: tuple[str, StreamInfo | None] = retry_state.outcome.result()
    return result


async def bucket_ready(js: JetStreamContext, bucket: str, *, timeout_s: float = 30.0) -> StreamInfo:
    """``stream_ready`` for KV ``bucket``'s stream."""
    return await stream_ready(js, KV_STREAM_PREFIX + bucket, timeout_s=timeout_s)
