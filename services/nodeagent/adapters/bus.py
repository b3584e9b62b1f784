"""The node agent on the bus: register nodes, consume their allocations, answer ready.

One process may host many mock nodes (a replay's fleet), or one node whose slices are
real (``slicer`` set: each placement is prepared on disk by
``services.nodeagent.adapters.slicing``). Each node is registered (``NodeDevices``) under
its key in ``<prefix>-nodes`` and announced on ``<prefix>.node.<node>.registered``.
Allocations reach the agent through one durable JetStream pull consumer on the
``<prefix>-alloc`` stream, named after the agent, so what was decided while the
agent was down is delivered when it comes back: the per-node ``decided`` and ``released``
subjects of its nodes when it hosts a few, the wildcards (skipping other agents' nodes)
when it hosts many. For each ``Placement`` it answers ``Ready`` (with the slice's
environment) on ``<prefix>.alloc.<node>.ready``; a malformed message is logged, answered
``Failed`` when its node is known, and acknowledged so it is not redelivered forever.

With a ``slicer`` the ledger is the truth: ``start`` first reconciles the host root with
the node's ledger entry, and a ``Placement`` the ledger no longer holds (a stale
redelivery of a pod released since) is acknowledged without preparing anything. A
placement is acknowledged only after it was answered, so one that was being prepared
when the agent died is delivered again; preparing is idempotent.

A ledger value that cannot be read, or a deleted ledger key (``libshared.quarantines``),
does not stop the agent: it logs a warning, leaves the host root as it is (releasing the
slices of pods it cannot see would take live pods' slices away), serves on, and
reconciles once a re-read every ``ledger_retry_s`` finds the value readable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import nats.errors
import tenacity
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError

from libshared import bounds, events, permissions, quarantines, tasks, vendors
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger
from libshared.subjects import Subjects
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import environments, registrations

log = logging.getLogger("vslice.nodeagent")

PER_NODE_FILTERS = 32  # above this many hosted nodes, filter by wildcard instead
FETCH_BATCH = 128
UNREGISTER_AT_ONCE = 64  # node deletions in flight when an agent leaves
COALESCE_S = 0.02  # pause after a fetch that brought less than a full batch, seconds


@dataclass
class Agent:
    """Hosts ``nodes``; ``prepared`` maps each pod UID it made ready to its ``Ready``.
    With ``slicer`` it hosts one node whose slices are prepared on disk."""

    nc: Client
    js: JetStreamContext
    bus: Bus
    subjects: Subjects
    name: str
    nodes: list[NodeDevices]
    slicer: Slicer | None = None
    ledger_retry_s: float = 5.0
    stream_wait_s: float = 60.0
    prepared: dict[str, events.Ready] = field(default_factory=dict)
    answers: dict[str, events.Ready | events.Failed] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _queries: list[Subscription] = field(init=False, default_factory=list)
    _answered: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _sub: JetStreamContext.PullSubscription | None = field(init=False, default=None)
    _retry: asyncio.Task[None] | None = field(init=False, default=None)
    reconciled: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    @property
    def durable(self) -> str:
        """The durable consumer's name: ``nodeagent-<node>`` for an agent of one node
        (the name its bus identity may use, ``libshared.permissions.agent_durable``),
        ``nodeagent-<agent name>`` for an agent hosting a fleet."""
        if len(self.nodes) == 1:
            return permissions.agent_durable(self.nodes[0].node)
        return f"nodeagent-{self.name}"

    async def register(self, nodes: list[NodeDevices] | None = None) -> None:
        """Write every hosted node's ``NodeDevices`` into the nodes bucket and announce it
        on ``<prefix>.node.<node>.registered``; ``nodes`` replaces the hosted list (a
        re-registration after a health or device change). Raises ``nats.errors.Error``
        when the bucket write fails."""
        if nodes is not None:
            self.nodes = nodes
        for node in self.nodes:
            data = events.ENCODER.encode(node)
            await self.bus.nodes.put(node.node, data)
            try:
                await self.nc.publish(self.subjects.node_registered(node.node), data)
            except nats.errors.Error as exc:
                log.warning("announce failed", extra={"node": node.node, "error": str(exc)})
        log.info("registered", extra={"nodes": len(self.nodes)})

    async def unregister(self) -> None:
        """Delete every hosted node from the nodes bucket -- the schedulers withdraw it:
        no new pod goes there, the slices it holds stay booked until released -- and the
        agent's durable consumer. Failures are logged (the agent is leaving either way)."""
        slots = asyncio.Semaphore(UNREGISTER_AT_ONCE)  # a fleet of 1,000 nodes leaves fast

        async def delete(node: str) -> None:
            async with slots:
                try:
                    await self.bus.nodes.delete(node)
                except (nats.errors.Error, TimeoutError) as exc:
                    log.warning("unregister failed", extra={"node": node, "error": str(exc)})

        await asyncio.gather(*(delete(node.node) for node in self.nodes))
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.js.delete_consumer(self.subjects.alloc_stream, self.durable)
        log.info("unregistered", extra={"nodes": len(self.nodes)})

    async def ledger_of(self, node: str) -> NodeLedger | None:
        """The node's ledger entry (None: the node never had one: it holds nothing).
        Raises ``nats.errors.Error`` when it cannot be read, ``quarantines.Unreadable``
        when its value does not decode or its key was deleted (what the node holds is
        unknown then)."""
        try:
            entry = await self.bus.ledger.get(node)
        except (KeyNotFoundError, KeyDeletedError) as exc:
            deleted_at = quarantines.deletion_of(exc)
            if deleted_at is not None:
                raise quarantines.deleted(node, deleted_at) from exc
            return None
        return quarantines.read_ledger(node, entry.value or b"")

    async def reconcile(self) -> bool:
        """Make the host root agree with the ledger (only with a slicer). Returns False,
        changing nothing, when the ledger is unreadable or deleted (a warning is logged).
        Raises ``nats.errors.Error`` when the bus cannot be read."""
        if self.slicer is None:
            return True
        try:
            ledger = await self.ledger_of(self.slicer.node)
        except quarantines.Unreadable as exc:
            log.warning(
                "ledger unreadable: host root left as it is until it is readable",
                extra={"node": exc.node, "reason": exc.reason, "error": exc.detail},
            )
            return False
        prepared, orphans = self.slicer.reconcile(ledger)
        log.info(
            "reconciled with the ledger",
            extra={"prepared": len(prepared), "released": len(orphans)},
        )
        self.reconciled.set()
        return True

    async def _reconcile_later(self) -> None:
        while True:
            await asyncio.sleep(self.ledger_retry_s)
            try:
                if await self.reconcile():
                    return
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("ledger re-read failed", extra={"error": str(exc)})

    def _filters(self) -> list[str]:
        s = self.subjects
        if len(self.nodes) > PER_NODE_FILTERS:
            return [f"{s.prefix}.alloc.*.decided", f"{s.prefix}.alloc.*.released"]
        return [f(n.node) for n in self.nodes for f in (s.alloc_decided, s.alloc_released)]

    async def start(self) -> None:
        """Reconcile with the ledger (later, when it is unreadable now), create (or reuse)
        the durable consumer (waiting for the alloc stream: ``_consumer``) and start
        consuming. Raises ``nats.js.errors.NotFoundError`` when the stream does not
        appear within ``stream_wait_s`` seconds."""
        if not await self.reconcile():
            self._retry = asyncio.create_task(self._reconcile_later())
        config = api.ConsumerConfig(
            durable_name=self.durable,
            filter_subjects=self._filters(),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            # a message a dead agent had fetched is redelivered after this (seconds)
            ack_wait=30.0,
        )
        sub = await self._consumer(config)
        self._sub = sub
        self._task = asyncio.create_task(self._consume(sub))
        if len(self.nodes) <= PER_NODE_FILTERS:
            for node in self.nodes:
                self._queries.append(
                    await self.nc.subscribe(self.subjects.node_slice(node.node), cb=self._on_query)
                )

    async def _consumer(self, config: api.ConsumerConfig) -> JetStreamContext.PullSubscription:
        """Create (or reuse) the durable consumer of the alloc stream, waiting up to
        ``stream_wait_s`` seconds for the stream: its creator (the scheduler or the
        operator, ``connecting.ensure_bus(create=True)``) makes it after the buckets
        that ``ensure_bus(create=False)`` waits for, and an agent may not read the
        stream's info to wait there (``libshared.permissions``). Raises
        ``nats.js.errors.NotFoundError`` when the stream is still missing then."""

        def waiting(state: tenacity.RetryCallState) -> None:
            log.info(
                "waiting for the alloc stream",
                extra={"stream": self.subjects.alloc_stream, "attempt": state.attempt_number},
            )

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(NotFoundError),
            stop=tenacity.stop_after_delay(self.stream_wait_s),
            wait=tenacity.wait_exponential(multiplier=0.05, min=0.05, max=1.0),
            before_sleep=waiting,
            reraise=True,
        )
        return await retrying(
            self.js.pull_subscribe,
            "",
            durable=self.durable,
            stream=self.subjects.alloc_stream,
            config=config,
        )

    async def _on_query(self, msg: Msg) -> None:
        """Answer a ``SliceQuery`` with the pod's ``Ready``/``Failed`` once known, waiting
        up to the query's ``wait_s``; an unknown pod after that gets ``Failed``. The
        answer goes only to the asker's inbox."""
        if not msg.reply:
            return
        node = msg.subject.split(".")[-2]
        try:
            query = events.SLICE_QUERY.decode(msg.data)
        except bounds.DECODE_ERRORS as exc:
            answer: events.Ready | events.Failed = events.Failed(
                pod_uid="", node=node, reason=bounds.clip(f"malformed slice query: {exc}")
            )
        else:
            answer = await self._wait_answer(node, query)
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(events.ENCODER.encode(answer))

    async def _wait_answer(
        self, node: str, query: events.SliceQuery
    ) -> events.Ready | events.Failed:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.wait_s
        while True:
            known = self.answers.get(query.pod_uid)
            if known is not None and known.node == node:
                return known
            remaining = deadline - loop.time()
            if remaining <= 0:
                return events.Failed(
                    pod_uid=query.pod_uid,
                    node=node,
                    reason=f"no slice prepared for {query.pod_uid} within {query.wait_s:g} s",
                )
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._answered.wait()

    async def stop(self) -> None:
        """Stop consuming (unacknowledged messages are redelivered to the next start)."""
        for query in self._queries:
            with contextlib.suppress(nats.errors.Error):
                await query.unsubscribe()
        self._queries.clear()
        if self._retry is not None:
            await tasks.stop(self._retry)
        if self._task is not None:
            await tasks.stop(self._task)
        if self._sub is not None:
            # a fetch cancelled mid-request leaves the subscription waiting, which would
            # hold the connection's drain until its timeout
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        hosted = {n.node for n in self.nodes}
        prefix = self.subjects.prefix
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("fetch failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            mine = []
            for msg in msgs:
                parts = msg.subject.split(".")
                node = parts[2] if len(parts) == 4 and msg.subject.startswith(prefix) else ""
                if node in hosted:
                    mine.append((node, msg.data))
            if self.slicer is None:
                # Mock nodes only answer: a batch's answers are sent together (their
                # publish round trips overlap), each started in the batch's order.
                await asyncio.gather(*(self._handle(node, data) for node, data in mine))
            else:
                for node, data in mine:
                    await self._handle(node, data)
            for msg in msgs:
                try:
                    await msg.ack()
                except nats.errors.Error as exc:
                    log.warning("ack failed", extra={"error": str(exc)})
            if len(msgs) < FETCH_BATCH:
                # A fetch costs the agent and the server two pull requests however few
                # messages it brings: a short pause lets the next one carry several (on
                # the openb replay the agent's CPU per pod falls to about a third, the
                # server's by a fifth), for at most COALESCE_S more before a slice is
                # ready.
                await asyncio.sleep(COALESCE_S)

    async def _handle(self, node: str, data: bytes) -> None:
        try:
            event = events.ALLOC_EVENT.decode(data)
        except bounds.DECODE_ERRORS as exc:
            log.error("malformed allocation", extra={"node": node, "error": str(exc)})
            return
        if isinstance(event, events.Release):
            self.prepared.pop(event.pod_uid, None)
            self.answers.pop(event.pod_uid, None)
            if self.slicer is not None:
                keys = self.slicer.release(event.pod_uid)
                log.info("released", extra={"pod_uid": event.pod_uid, "containers": len(keys)})
            return
        answer: events.Ready | events.Failed
        if event.node != node:
            answer = events.Failed(
                pod_uid=event.pod_uid,
                node=node,
                reason=bounds.clip(f"placement names node {event.node!r}"),
            )
        elif self.slicer is not None:
            if not await self._held(node, event.pod_uid):
                log.info("placement no longer in the ledger", extra={"pod_uid": event.pod_uid})
                return
            answer = self.slicer.prepare(event)
        else:
            indices: dict[str, int] = {}
            if any(s.vendor != vendors.NVIDIA.name for s in event.slices):
                # only then: a fleet of thousands answers GPU placements without the search
                registered = next((n for n in self.nodes if n.node == node), None)
                if registered is not None:
                    indices = registrations.dcu_indices(registered)
            try:
                env = environments.pod_env(event, indices)
            except ValueError as exc:  # a DCU slice naming a device the node lacks
                answer = events.Failed(
                    pod_uid=event.pod_uid, node=node, reason=bounds.clip(str(exc))
                )
            else:
                answer = events.Ready(pod_uid=event.pod_uid, node=node, env=env)
        problem = bounds.violation(answer, type(answer))
        if problem:
            # an environment no receiver would take (a value over its length, a non-ASCII
            # path): the pod fails, saying why, instead of its answer being refused unread
            log.error("answer over its bounds", extra={"pod_uid": event.pod_uid, "error": problem})
            answer = events.Failed(
                pod_uid=event.pod_uid,
                node=node,
                reason=bounds.clip(f"the node agent's answer is over its bounds: {problem}"),
            )
        if isinstance(answer, events.Ready):
            self.prepared[event.pod_uid] = answer
            subject = self.subjects.alloc_ready(node)
        else:
            subject = self.subjects.alloc_failed(node)
        if len(self.nodes) <= PER_NODE_FILTERS:
            self.answers[event.pod_uid] = answer
            self._answered.set()
        try:
            await self.js.publish(subject, events.ENCODER.encode(answer))
        except (nats.errors.Error, TimeoutError) as exc:
            log.error("answer failed", extra={"node": node, "error": str(exc)})

    async def _held(self, node: str, pod_uid: str) -> bool:
        # A ledger that cannot be read counts as holding the pod: preparing a slice that
        # turns out released costs a directory until the release arrives, while skipping
        # a live one would leave its pod waiting for an answer.
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type((nats.errors.Error, TimeoutError)),
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_incrementing(start=0.2, increment=0.2),
            after=lambda state: _unreadable(node, state),
        )
        try:
            ledger: NodeLedger | None = await retrying(self.ledger_of, node)
        except quarantines.Unreadable:
            return True  # no new placement commits there until it is readable
        except tenacity.RetryError:
            return True
        return ledger is not None and pod_uid in ledger.pods()


def _unreadable(node: str, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning("ledger unreadable", extra={"node": node, "error": str(error)})
