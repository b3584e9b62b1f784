"""The scheduler on the bus: watch the buckets into a view, decide, commit by compare-and-set.

A replica keeps a ``Cluster`` (the core's view) of ``<prefix>-nodes`` and
``<prefix>-ledger`` by watching both buckets, and the ledger revision each node's view
was built from. It trusts the view only for choosing: a placement is committed by
``kv.update(node, ledger, last=revision)`` on that node's ledger key, which fails when any
other replica changed the node in between. The loser re-reads the key and decides again,
up to ``max_attempts`` times, then answers ``Unschedulable`` naming the lost races. There
is no leader and no lock: two replicas can never both commit against the same revision,
so no memory is ever booked twice (the double booking of HAMi #2232).

Before deciding, a replica waits until its view has caught up with the ledger stream as
it was when the request arrived. That is what makes a re-sent request idempotent on any
replica: a pod placed (and answered) before the re-send is in the view, and the core
returns its existing placement instead of placing it twice.

What it leaves to others: the decision (``services.scheduler.core``), wiring and signals
(``services.scheduler.app``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from libshared import events
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger
from libshared.resources import PodRequest
from libshared.subjects import SCHEDULERS_QUEUE, Subjects
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

log = logging.getLogger("vslice.scheduler")

NODE_DEVICES = msgspec.json.Decoder(NodeDevices)
NODE_LEDGER = msgspec.json.Decoder(NodeLedger)


@dataclass
class View:
    """The replica's view of both buckets: the core's ``Cluster`` plus, per node, the
    ledger revision it holds (0 = no ledger key yet), and ``seen_seq``, the highest
    ledger-stream sequence the view has taken in.

    Ledgers of nodes not registered yet wait in ``pending`` until the node registers.
    """

    cluster: Cluster
    revisions: dict[str, int] = field(default_factory=dict)
    pending: dict[str, tuple[NodeLedger, int]] = field(default_factory=dict)
    seen_seq: int = 0

    def put_node(self, reg: NodeDevices) -> None:
        """Add or replace a node's devices (and apply a ledger that waited for it).

        Raises ``ValueError`` (from the core) for a node with too many devices.
        """
        self.cluster.upsert_node(reg)
        waiting = self.pending.pop(reg.node, None)
        if waiting is not None:
            self.put_ledger(waiting[0], waiting[1])

    def put_ledger(self, ledger: NodeLedger, revision: int) -> bool:
        """Take in a node's ledger at ``revision`` unless the view already holds a newer
        one; returns True when the view changed."""
        node = ledger.node
        if revision <= self.revisions.get(node, 0):
            return False
        if node not in self.cluster.node_index:
            held = self.pending.get(node)
            if held is None or held[1] < revision:
                self.pending[node] = (ledger, revision)
            return False
        self.cluster.set_ledger(ledger)
        self.revisions[node] = revision
        return True


class Conflicts(Exception):
    """Every attempt lost the ledger race: ``nodes`` lists the node of each lost attempt."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        super().__init__(f"lost the ledger race {len(nodes)} times (nodes {', '.join(nodes)})")


@dataclass
class Replica:
    """One scheduler replica on the bus. ``start()`` watches the buckets until the view is
    complete, then subscribes; ``stats`` counts what it did."""

    nc: Client
    js: JetStreamContext
    bus: Bus
    subjects: Subjects
    scheduler: Scheduler
    name: str
    max_attempts: int = 8
    explain: bool = True
    sync_timeout_s: float = 2.0
    view: View = field(init=False)
    stats: events.Stats = field(init=False)
    _seen: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _subs: list[Subscription] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.view = View(cluster=self.scheduler.cluster)
        self.stats = events.Stats(name=self.name)

    def _count(self, **deltas: int) -> None:
        self.stats = msgspec.structs.replace(
            self.stats, **{k: getattr(self.stats, k) + v for k, v in deltas.items()}
        )

    # -- watching ------------------------------------------------------------------------

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Watch both buckets, wait until each watcher delivered the bucket's current
        content, then subscribe to the request subjects. Raises ``TimeoutError`` when the
        buckets are not read within ``timeout_s`` seconds."""
        nodes_ready, ledger_ready = asyncio.Event(), asyncio.Event()
        nodes_watch = await self.bus.nodes.watchall()
        self._tasks.append(asyncio.create_task(self._watch_nodes(nodes_watch, nodes_ready)))
        async with asyncio.timeout(timeout_s):
            await nodes_ready.wait()
        ledger_watch = await self.bus.ledger.watchall()
        self._tasks.append(asyncio.create_task(self._watch_ledger(ledger_watch, ledger_ready)))
        async with asyncio.timeout(timeout_s):
            await ledger_ready.wait()
        s = self.subjects
        self._subs = [
            await self.nc.subscribe(s.sched_schedule, queue=SCHEDULERS_QUEUE, cb=self.on_schedule),
            await self.nc.subscribe(s.sched_release, queue=SCHEDULERS_QUEUE, cb=self.on_release),
            await self.nc.subscribe(s.sched_stats, cb=self.on_stats),
        ]
        log.info(
            "replica ready",
            extra={"nodes": self.view.cluster.size, "ledger_seq": self.view.seen_seq},
        )

    async def stop(self) -> None:
        """Stop watching (subscriptions end with the connection's drain)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch_nodes(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:
                ready.set()
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                log.warning("node deleted from bucket; kept in view", extra={"node": entry.key})
                continue
            try:
                reg = NODE_DEVICES.decode(entry.value)
                if reg.node != entry.key:
                    raise ValueError(f"value names node {reg.node!r}")
                self.view.put_node(reg)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                log.error("bad node registration", extra={"node": entry.key, "error": str(exc)})

    async def _watch_ledger(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:
                ready.set()
                continue
            if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
                try:
                    ledger = NODE_LEDGER.decode(entry.value)
                    if ledger.node != entry.key:
                        raise ValueError(f"value names node {ledger.node!r}")
                    self.view.put_ledger(ledger, entry.revision or 0)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                    log.error("bad ledger value", extra={"node": entry.key, "error": str(exc)})
            self.view.seen_seq = max(self.view.seen_seq, entry.revision or 0)
            self._seen.set()

    async def _catch_up(self) -> None:
        """Wait until the view holds every ledger change committed before now (bounded)."""
        try:
            info = await self.js.stream_info(f"KV_{self.subjects.ledger_bucket}")
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot read ledger stream state", extra={"error": str(exc)})
            return
        target = info.state.last_seq
        deadline = time.monotonic() + self.sync_timeout_s
        while self.view.seen_seq < target:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("view behind the ledger", extra={"seen": self.view.seen_seq})
                return
            self._seen.clear()
            try:
                async with asyncio.timeout(left):
                    await self._seen.wait()
            except TimeoutError:
                pass

    async def _reread(self, node: str) -> None:
        try:
            entry = await self.bus.ledger.get(node)
        except KeyNotFoundError:
            return
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("ledger re-read failed", extra={"node": node, "error": str(exc)})
            return
        if entry.value:
            self.view.put_ledger(NODE_LEDGER.decode(entry.value), entry.revision or 0)

    async def _commit(self, ledger: NodeLedger) -> bool:
        """CAS the node's ledger against the view's revision; False when the race was
        lost (or the outcome is unknown, then the key is re-read: a commit that did land
        shows up in the view, and the core returns it)."""
        node = ledger.node
        try:
            rev = await self.bus.ledger.update(
                node, events.ENCODER.encode(ledger), last=self.view.revisions.get(node, 0)
            )
        except KeyWrongLastSequenceError:
            self._count(conflicts=1)
            await self._reread(node)
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("ledger commit uncertain", extra={"node": node, "error": str(exc)})
            await self._reread(node)
            return False
        self.view.put_ledger(ledger, rev)
        return True

    # -- the two operations ---------------------------------------------------------------

    async def schedule(self, pod: PodRequest) -> events.Placement | events.Unschedulable:
        """Place ``pod`` and commit it; the existing placement when it already holds slices.

        Returns ``Unschedulable`` when nothing fits, or after ``max_attempts`` lost races
        (its reason says so).
        """
        await self._catch_up()
        lost: list[str] = []
        for _ in range(self.max_attempts):
            held = self.view.cluster.placement_of(pod.uid) is not None
            decision = self.scheduler.decide(pod, explain=self.explain)
            if isinstance(decision, events.Unschedulable) or held:
                return decision
            if await self._commit(self.view.cluster.ledger_with(decision)):
                await self._announce(self.subjects.alloc_decided(decision.node), decision)
                return decision
            lost.append(decision.node)
        return events.Unschedulable(pod_uid=pod.uid, reason=str(Conflicts(lost)))

    async def release(self, pod_uid: str) -> events.Ack:
        """Free exactly ``pod_uid``'s slices and charge; ``Ack(node=None)`` when it held
        nothing. Raises ``Conflicts`` after ``max_attempts`` lost races."""
        await self._catch_up()
        lost: list[str] = []
        for _ in range(self.max_attempts):
            held = self.view.cluster.placement_of(pod_uid)
            if held is None:
                return events.Ack(pod_uid=pod_uid)
            node, slices, _ = held
            ledger = self.view.cluster.ledgers[self.view.cluster.node_index[node]]
            if await self._commit(ledger.without(pod_uid)):
                await self._announce(
                    self.subjects.alloc_released(node), events.Release(pod_uid=pod_uid)
                )
                return events.Ack(pod_uid=pod_uid, node=node, slices=len(slices))
            lost.append(node)
        raise Conflicts(lost)

    async def _announce(self, subject: str, message: events.Placement | events.Release) -> None:
        # The ledger is the truth; the stream only tells node agents. A lost announcement
        # is logged, not undone.
        try:
            await self.js.publish(subject, events.ENCODER.encode(message))
        except (nats.errors.Error, TimeoutError) as exc:
            log.error("announce failed", extra={"subject": subject, "error": str(exc)})

    # -- message handlers -----------------------------------------------------------------

    async def _reply(self, msg: Msg, body: msgspec.Struct) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(events.ENCODER.encode(body))
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("reply failed", extra={"error": str(exc)})

    async def on_schedule(self, msg: Msg) -> None:
        """``PodRequest`` JSON in; ``Placement``, ``Unschedulable`` or ``BusError`` out."""
        try:
            pod = events.POD_REQUEST.decode(msg.data)
            if not pod.uid:
                raise ValueError("PodRequest.uid is empty")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._count(errors=1)
            log.warning("malformed schedule request", extra={"error": str(exc)})
            await self._reply(msg, events.BusError(reason=f"malformed PodRequest: {exc}"))
            return
        try:
            decision = await self.schedule(pod)
        except Exception as exc:
            self._count(errors=1)
            log.exception("schedule failed", extra={"pod_uid": pod.uid})
            await self._reply(msg, events.BusError(reason=f"schedule failed: {exc}"))
            return
        placed = isinstance(decision, events.Placement)
        self._count(schedule_requests=1, placed=int(placed), unschedulable=int(not placed))
        await self._reply(msg, decision)

    async def on_release(self, msg: Msg) -> None:
        """``Release`` JSON in; ``Ack`` or ``BusError`` out."""
        try:
            request = events.RELEASE_REQUEST.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._count(errors=1)
            log.warning("malformed release request", extra={"error": str(exc)})
            await self._reply(msg, events.BusError(reason=f"malformed Release: {exc}"))
            return
        try:
            ack = await self.release(request.pod_uid)
        except Exception as exc:
            self._count(errors=1)
            log.exception("release failed", extra={"pod_uid": request.pod_uid})
            await self._reply(msg, events.BusError(reason=f"release failed: {exc}"))
            return
        self._count(released=int(ack.node is not None))
        await self._reply(msg, ack)

    async def on_stats(self, msg: Msg) -> None:
        """Any request in; this replica's ``Stats`` out."""
        await self._reply(msg, self.stats)
