"""The metrics service on the bus: watch the buckets, take usage reports, ask for stats.

``Watcher`` keeps a ``FleetView`` of ``<prefix>-nodes`` and ``<prefix>-ledger`` with an
ordered consumer per bucket that starts at the last value of every key, so a restarted
metrics service rebuilds everything from the buckets (usage comes back with the next
reports, seconds later). It subscribes to ``<prefix>.usage.*`` for ``NodeUsage`` reports,
and every ``stats_interval_s`` asks every scheduler replica for its ``Stats`` on
``<prefix>.sched.stats`` and reads the ledger stream's last sequence (for the revision
lag).

Scheduling latency: the replicas' ``Stats`` carry counters, not times, so with
``observe_requests`` the watcher also takes a copy of every schedule request (a plain
subscriber beside the replicas' queue group) and notes when it first saw each pod UID;
when the placement of that pod is announced on ``<prefix>.alloc.<node>.decided`` (after
its ledger commit) the time between the two goes into the latency histogram. It measures
request-seen-to-commit-announced on the bus for placed pods; an unschedulable answer is
not announced and is counted only in the decisions by outcome (from ``Stats``).

A malformed value or report is logged, counted in ``vslice_metrics_rejected_messages_total``
(label ``source``) and skipped; it never stops the watcher.

What it leaves to others: joining and figures (``services.metrics.core``), HTTP
(``adapters.http``), wiring (``app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Histogram

from libshared import bounds, events, tasks, watching
from libshared.subjects import Subjects
from services.metrics.core.views import FleetView, RejectedValue

log = logging.getLogger("vslice.metrics")

STATS_WAIT_S = 0.5  # how long replicas get to answer one stats request
PENDING_TTL_S = 120.0  # a schedule request never placed is forgotten after this
FORGET_AFTER_S = 300.0  # usage and stats not renewed for this long are forgotten
PENDING_MAX = 100_000
# Seconds: from about a millisecond (one replica, idle) to the clients' request timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Instruments:
    """The event-driven metrics of one exporter, registered in ``registry``:
    ``latency`` (``vslice_scheduling_latency_seconds``) and ``rejected``
    (``vslice_metrics_rejected_messages_total``, label ``source``)."""

    latency: Histogram
    rejected: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Instruments:
        """New instruments in ``registry``."""
        return cls(
            latency=Histogram(
                "vslice_scheduling_latency_seconds",
                "Time from a schedule request seen on the bus to its placement announced "
                "after the ledger commit",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            rejected=Counter(
                "vslice_metrics_rejected_messages",
                "Bucket values and usage reports this exporter could not read",
                ["source"],
                registry=registry,
            ),
        )


@dataclass
class Watcher:
    """Keeps ``view`` up to date from the bus (see the module docstring)."""

    nc: Client
    js: JetStreamContext
    subjects: Subjects
    view: FleetView
    instruments: Instruments
    stats_interval_s: float = 5.0
    observe_requests: bool = True
    clock: Callable[[], float] = time.time
    _subs: list[Subscription] = field(init=False, default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _pending: dict[str, float] = field(init=False, default_factory=dict)
    # the last sequence taken in from each bucket's stream (``KV_<bucket>``)
    seen: dict[str, int] = field(init=False, default_factory=dict)

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Watch both buckets until each delivered its current content, then subscribe to
        usage (and requests and placements) and start asking for stats. Raises
        ``TimeoutError`` when the buckets are not read within ``timeout_s`` seconds."""
        s = self.subjects
        nodes_ready, ledger_ready = asyncio.Event(), asyncio.Event()
        await self._watch(s.nodes_bucket, self._node_entry, nodes_ready)
        await self._watch(s.ledger_bucket, self._ledger_entry, ledger_ready)
        async with asyncio.timeout(timeout_s):
            await nodes_ready.wait()
            await ledger_ready.wait()
        self._subs.append(await self.nc.subscribe(s.usage("*"), cb=self._on_usage))
        if self.observe_requests:
            self._subs.append(await self.nc.subscribe(s.sched_schedule, cb=self._on_request))
            self._subs.append(await self.nc.subscribe(s.alloc_decided("*"), cb=self._on_placed))
        await self.nc.flush()  # the server knows the subscriptions before anyone is told
        self._tasks.append(asyncio.create_task(self._poll()))
        log.info(
            "fleet view ready",
            extra={"nodes": len(self.view.nodes), "ledgers": len(self.view.ledgers)},
        )

    async def stop(self) -> None:
        """Stop polling and unsubscribe."""
        for task in self._tasks:
            await tasks.stop(task)
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()

    # -- buckets ---------------------------------------------------------------------------

    async def _watch(self, bucket: str, handle: watching.Handler, ready: asyncio.Event) -> None:
        stream = f"KV_{bucket}"

        def seen(sequence: int) -> None:
            self.seen[stream] = max(self.seen.get(stream, 0), sequence)

        self._subs.append(await watching.watch(self.js, bucket, handle, ready, seen=seen))

    def _reject(self, exc: RejectedValue) -> None:
        self.instruments.rejected.labels(source=exc.source).inc()
        log.error("rejected", extra={"source": exc.source, "key": exc.key, "error": exc.reason})

    def _node_entry(self, key: str, value: bytes | None, revision: int) -> None:
        try:
            self.view.put_node(key, value)
        except RejectedValue as exc:
            self._reject(exc)

    def _ledger_entry(self, key: str, value: bytes | None, revision: int) -> None:
        try:
            self.view.put_ledger(key, value, revision)
        except RejectedValue as exc:
            self._reject(exc)

    # -- usage, requests, placements ---------------------------------------------------------

    async def _on_usage(self, msg: Msg) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        try:
            self.view.put_usage(node, msg.data, received_at=self.clock())
        except RejectedValue as exc:
            self._reject(exc)

    async def _on_request(self, msg: Msg) -> None:
        try:
            uid = events.POD_REQUEST.decode(msg.data).uid
        except bounds.DECODE_ERRORS:
            return  # the replicas answer it with an error; nothing to time
        now = time.monotonic()
        if uid not in self._pending and len(self._pending) < PENDING_MAX:
            self._pending[uid] = now

    async def _on_placed(self, msg: Msg) -> None:
        try:
            uid = events.PLACEMENT.decode(msg.data).pod_uid
        except bounds.DECODE_ERRORS:
            return
        seen = self._pending.pop(uid, None)
        if seen is not None:
            self.instruments.latency.observe(time.monotonic() - seen)

    # -- polling -----------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("stats not read", extra={"error": str(exc)})
            await asyncio.sleep(self.stats_interval_s)

    async def poll_once(self) -> None:
        """Ask every replica for its ``Stats``, read the ledger stream's last sequence and
        forget schedule requests older than ``PENDING_TTL_S`` and the usage and stats of
        nodes and replicas silent for ``FORGET_AFTER_S``."""
        now = self.clock()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(self.subjects.sched_stats, b"", reply=inbox)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATS_WAIT_S):
                    async for msg in sub.messages:
                        if not msg.data:  # the server's "no responders"
                            continue
                        try:
                            self.view.put_stats(events.STATS.decode(msg.data), received_at=now)
                        except bounds.DECODE_ERRORS as exc:
                            self._reject(RejectedValue(source="stats", key=inbox, reason=str(exc)))
        finally:
            await sub.unsubscribe()
        info = await self.js.stream_info(f"KV_{self.subjects.ledger_bucket}")
        self.view.ledger_last_seq = info.state.last_seq
        self.view.forget_silent(now=now, ttl_s=FORGET_AFTER_S)
        horizon = time.monotonic() - PENDING_TTL_S
        for uid in [u for u, t in self._pending.items() if t < horizon]:
            del self._pending[uid]
