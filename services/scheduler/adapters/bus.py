"""The scheduler on the bus: watch the buckets into a view, decide, commit by compare-and-set.

A replica keeps a ``Cluster`` (the core's view) of ``<prefix>-nodes`` and
``<prefix>-ledger`` by watching both buckets, and the ledger revision each node's view
was built from. It trusts the view only for choosing: a placement is committed by
``kv.update(node, ledger, last=revision)`` on that node's ledger key, which fails when any
other replica changed the node in between. The loser re-reads the key and decides again,
up to ``max_attempts`` times, then answers ``Unschedulable`` naming the lost races. There
is no leader and no lock: two replicas can never both commit against the same revision,
so no memory is ever booked twice (the double booking of HAMi #2232).

A compare-and-set on one node's key cannot stop two replicas that got the same pod UID at
the same moment from placing it on two different nodes. So before its ledger commit a
replica claims the pod in ``<prefix>-pods`` with ``kv.create`` (key ``pod_key(uid)``,
value the node), which only one replica can do; the others wait until their view shows
the winner's placement and answer with it. After its ledger commit the winner confirms
the claim with a compare-and-set on it. A claim left by a replica that died before
committing is taken over, by compare-and-set, once it stayed unchanged for
``claim_wait_s`` and a caught-up view shows the pod in no ledger; should its slow holder
commit after all, its confirmation fails and it takes its slices back, so the pod ends
on one node. Releasing deletes the claim after the slices are freed.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from libshared import events
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger
from libshared.resources import PodRequest
from libshared.subjects import SCHEDULERS_QUEUE, Subjects, deadline_of, pod_key
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

log = logging.getLogger("vslice.scheduler")

KV_OP_HEADER = KV_OP
MARKER_HEADER = "Nats-Marker-Reason"  # server-placed TTL markers (nats-server 2.11+)
HEARTBEAT_S = 0.5
REREAD_BACKOFF_S = 0.2  # pause before re-reading a node's ledger again after a failed read
CLAIM_POLL_S = 0.05  # how often a replica waiting for a claim's holder re-reads the claim
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


class TemporaryError(Exception):
    """The bus could not be read well enough to answer; the request may be sent again.

    Answered as a ``BusError`` whose reason starts with ``"temporary:"``.
    """


class Expired(Exception):
    """The client's deadline for a schedule request passed before anything was committed."""


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
    claim_wait_s: float = 2.0
    view: View = field(init=False)
    stats: events.Stats = field(init=False)
    _seen: asyncio.Event = field(init=False, default_factory=asyncio.Event)
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
        await self._watch(self.subjects.nodes_bucket, self._node_entry, nodes_ready)
        async with asyncio.timeout(timeout_s):
            await nodes_ready.wait()
        await self._watch(self.subjects.ledger_bucket, self._ledger_entry, ledger_ready)
        async with asyncio.timeout(timeout_s):
            await ledger_ready.wait()
        s = self.subjects
        self._subs += [
            await self.nc.subscribe(s.sched_schedule, queue=SCHEDULERS_QUEUE, cb=self.on_schedule),
            await self.nc.subscribe(s.sched_release, queue=SCHEDULERS_QUEUE, cb=self.on_release),
            await self.nc.subscribe(s.sched_stats, cb=self.on_stats),
        ]
        log.info(
            "replica ready",
            extra={"nodes": self.view.cluster.size, "ledger_seq": self.view.seen_seq},
        )

    async def stop(self) -> None:
        """Nothing to undo beyond the connection's drain (kept for symmetry with start)."""

    async def _watch(
        self, bucket: str, handle: Callable[[str, bytes | None, int], None], ready: asyncio.Event
    ) -> None:
        # kv.watchall() has no heartbeat setting: its ordered consumer notices a lost NATS
        # node only after 10 s. This one checks every HEARTBEAT_S and resumes from the
        # last sequence it saw, so a failover leaves the view stale for about a second.
        pre, stream = f"$KV.{bucket}.", f"KV_{bucket}"
        if (await self.js.stream_info(stream)).state.last_seq == 0:
            ready.set()

        async def on_entry(msg: Msg) -> None:
            meta = msg.metadata
            op = msg.headers.get(KV_OP_HEADER) if msg.headers else None
            if not (msg.headers and MARKER_HEADER in msg.headers):
                value = None if op in (KV_DEL, KV_PURGE) else msg.data
                handle(msg.subject[len(pre) :], value, meta.sequence.stream)
            if meta.num_pending == 0:
                ready.set()

        self._subs.append(
            await self.js.subscribe(
                f"{pre}>",
                stream=stream,
                cb=on_entry,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                idle_heartbeat=HEARTBEAT_S,
            )
        )

    def _node_entry(self, key: str, value: bytes | None, revision: int) -> None:
        if not value:
            # deleted or purged: no new pod goes there; the pods it holds keep their
            # slices in the ledger until they are released
            if self.view.cluster.withdraw_node(key):
                log.info("node withdrawn", extra={"node": key})
            return
        try:
            reg = NODE_DEVICES.decode(value)
            if reg.node != key:
                raise ValueError(f"value names node {reg.node!r}")
            self.view.put_node(reg)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            log.error("bad node registration", extra={"node": key, "error": str(exc)})

    def _ledger_entry(self, key: str, value: bytes | None, revision: int) -> None:
        if value:
            try:
                ledger = NODE_LEDGER.decode(value)
                if ledger.node != key:
                    raise ValueError(f"value names node {ledger.node!r}")
                self.view.put_ledger(ledger, revision)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                log.error("bad ledger value", extra={"node": key, "error": str(exc)})
        self.view.seen_seq = max(self.view.seen_seq, revision)
        self._seen.set()

    async def _catch_up(self) -> None:
        """Make the view hold every ledger change committed before now: wait for the
        watcher (bounded by ``sync_timeout_s``), else re-read every ledger key.

        Raises ``TemporaryError`` when neither works (JetStream unavailable).
        """
        try:
            info = await self.js.stream_info(f"KV_{self.subjects.ledger_bucket}")
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"ledger unavailable: {exc}") from exc
        target = info.state.last_seq
        deadline = time.monotonic() + self.sync_timeout_s
        while self.view.seen_seq < target:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "view behind the ledger; re-reading", extra={"seen": self.view.seen_seq}
                )
                await self._resync(target)
                return
            self._seen.clear()
            try:
                async with asyncio.timeout(left):
                    await self._seen.wait()
            except TimeoutError:
                pass

    async def _resync(self, target: int) -> None:
        try:
            keys = await self.bus.ledger.keys()
        except NoKeysError:
            keys = []
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"ledger unavailable: {exc}") from exc
        for key in keys:
            await self._reread(key, strict=True)
        self.view.seen_seq = max(self.view.seen_seq, target)

    async def _reread(self, node: str, *, strict: bool = False) -> None:
        try:
            entry = await self.bus.ledger.get(node)
        except KeyNotFoundError:
            return
        except (nats.errors.Error, TimeoutError) as exc:
            if strict:
                raise TemporaryError(f"ledger unavailable: {exc}") from exc
            log.warning("ledger re-read failed", extra={"node": node, "error": str(exc)})
            return
        if entry.value:
            self.view.put_ledger(NODE_LEDGER.decode(entry.value), entry.revision or 0)

    async def _commit(self, ledger: NodeLedger, *, last: int | None = None) -> bool | None:
        """CAS the node's ledger against revision ``last`` (default: the view's, read
        before any await, so the ledger and its base revision are the same moment's);
        True when committed, False when the race was lost, None when the outcome is
        unknown (the caller re-reads the key strictly to learn it)."""
        node = ledger.node
        base = self.view.revisions.get(node, 0) if last is None else last
        try:
            rev = await self.bus.ledger.update(node, events.ENCODER.encode(ledger), last=base)
        except KeyWrongLastSequenceError:
            self._count(conflicts=1)
            await self._reread(node)
            if self.view.revisions.get(node, 0) <= base:
                # The re-read failed (a NATS node failing over): retrying at once would
                # lose again against the same stale revision.
                await asyncio.sleep(REREAD_BACKOFF_S)
                await self._reread(node)
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("ledger commit uncertain", extra={"node": node, "error": str(exc)})
            return None
        self.view.put_ledger(ledger, rev)
        return True

    # -- the two operations ---------------------------------------------------------------

    async def schedule(
        self, pod: PodRequest, *, deadline: float | None = None
    ) -> events.Placement | events.Unschedulable:
        """Place ``pod`` and commit it; the existing placement when it already holds slices,
        or the placement of the replica that holds the pod's claim.

        Returns ``Unschedulable`` when nothing fits, or after ``max_attempts`` lost races
        (its reason says so). Raises ``TemporaryError`` when the bus cannot be read, and
        ``Expired`` when the client's ``deadline`` (Unix seconds) passes before a claim or a
        commit: nothing is committed for a request its client has given up on.
        """
        await self._catch_up()
        key = pod_key(pod.uid)
        claim: int | None = None  # revision of the claim this replica holds
        lost: list[str] = []
        for _ in range(self.max_attempts):
            held = self.view.cluster.placement_of(pod.uid) is not None
            decision = self.scheduler.decide(pod, explain=self.explain)
            if held:
                if claim is None:
                    return decision
                # A stalled former holder committed after this replica took its claim
                # over; its confirmation fails and it takes its slices back. Wait for
                # that; a holder that died after committing leaves a placement to adopt.
                if await self._await_gone(pod.uid):
                    continue
                assert isinstance(decision, events.Placement)  # a held pod decides so
                await self._confirm(key, decision.node, claim)
                return decision
            if isinstance(decision, events.Unschedulable):
                await self._unclaim(key, claim)
                return decision
            # The ledger and its revision are taken now: awaiting the claim lets the view
            # move on, and a decision must commit against the state it was made on.
            ledger = self.view.cluster.ledger_with(decision)
            base = self.view.revisions.get(decision.node, 0)
            if deadline is not None and time.time() > deadline:
                await self._unclaim(key, claim)
                raise Expired(f"pod {pod.uid}: the client's deadline passed")
            if claim is None:
                got = await self._claim(pod, key, decision.node)
                if isinstance(got, events.Placement):
                    return got
                if got is None:  # the holder gave its claim up: decide again
                    lost.append("claim")
                    continue
                claim = got
            if deadline is not None and time.time() > deadline:
                await self._unclaim(key, claim)
                raise Expired(f"pod {pod.uid}: the client's deadline passed")
            committed = await self._commit(ledger, last=base)
            if committed is None:
                # Unknown outcome: learn it before anything else, or the pod could be
                # answered Unschedulable while its commit did land (raises TemporaryError
                # while the key cannot be read; the client's re-send then finds it).
                await self._reread(decision.node, strict=True)
                committed = self.view.cluster.placement_of(pod.uid) is not None
            if not committed:
                lost.append(decision.node)
                continue
            if await self._confirm(key, decision.node, claim):
                await self._announce(self.subjects.alloc_decided(decision.node), decision)
                return decision
            # Another replica took the claim over while this commit was slow: give the
            # slices back and answer with its placement.
            await self._take_back(pod.uid, decision.node)
            claim = None
            got = await self._await_holder(pod, key)
            if isinstance(got, events.Placement):
                return got
            if isinstance(got, int):
                claim = got
            lost.append(decision.node)
        await self._unclaim(key, claim)
        return events.Unschedulable(pod_uid=pod.uid, reason=str(Conflicts(lost)))

    async def _claim(self, pod: PodRequest, key: str, node: str) -> int | events.Placement | None:
        """Claim ``pod`` for ``node``: the claim's revision when this replica got it, else
        what ``_await_holder`` returns."""
        try:
            return await self.bus.pods.create(key, node.encode())
        except KeyWrongLastSequenceError:
            self._count(claims_lost=1)
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
        return await self._await_holder(pod, key)

    async def _await_holder(self, pod: PodRequest, key: str) -> int | events.Placement | None:
        """Wait for the holder of ``pod``'s claim to commit. Returns its placement once the
        view shows it; None when the claim is gone; the revision of the claim when this
        replica took it over (unchanged for ``claim_wait_s`` and the pod in no ledger).

        Raises ``TemporaryError`` when the pods bucket cannot be read.
        """
        revision, deadline = -1, 0.0
        while True:
            if self.view.cluster.placement_of(pod.uid) is not None:
                decision = self.scheduler.decide(pod, explain=False)
                assert isinstance(decision, events.Placement)  # a held pod decides so
                return decision
            try:
                entry = await self.bus.pods.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                return None
            except (nats.errors.Error, TimeoutError) as exc:
                raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
            now = time.monotonic()
            if entry.revision != revision:
                revision, deadline = entry.revision or 0, now + self.claim_wait_s
            elif now >= deadline:
                await self._catch_up()
                if self.view.cluster.placement_of(pod.uid) is None:
                    try:
                        taken = await self.bus.pods.update(key, entry.value or b"", last=revision)
                    except KeyWrongLastSequenceError:
                        continue
                    except (nats.errors.Error, TimeoutError) as exc:
                        raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
                    self._count(takeovers=1)
                    log.warning("took over a stale claim", extra={"pod_uid": pod.uid})
                    return taken
                continue
            self._seen.clear()
            try:
                async with asyncio.timeout(CLAIM_POLL_S):
                    await self._seen.wait()
            except TimeoutError:
                pass

    async def _await_gone(self, pod_uid: str) -> bool:
        """True once the view shows ``pod_uid`` in no ledger, False after ``claim_wait_s``."""
        deadline = time.monotonic() + self.claim_wait_s
        while self.view.cluster.placement_of(pod_uid) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._seen.clear()
            try:
                async with asyncio.timeout(min(left, CLAIM_POLL_S)):
                    await self._seen.wait()
            except TimeoutError:
                pass
        return True

    async def _confirm(self, key: str, node: str, claim: int) -> bool:
        """Compare-and-set the claim after the ledger commit; False when another replica
        took it over meanwhile. An unknown outcome counts as confirmed: the commit stands."""
        try:
            await self.bus.pods.update(key, node.encode(), last=claim)
        except KeyWrongLastSequenceError:
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("claim confirmation uncertain", extra={"key": key, "error": str(exc)})
        return True

    async def _take_back(self, pod_uid: str, node: str) -> None:
        """Remove ``pod_uid``'s slices from ``node``'s ledger (no announcement: the pod was
        never answered from here). Raises ``Conflicts`` after ``max_attempts`` lost races."""
        lost: list[str] = []
        for _ in range(self.max_attempts):
            held = self.view.cluster.placement_of(pod_uid)
            if held is None or held[0] != node:
                return
            ledger = self.view.cluster.ledgers[self.view.cluster.node_index[node]]
            if await self._commit(ledger.without(pod_uid)):
                return
            lost.append(node)
        raise Conflicts(lost)

    async def _claim_revision(self, key: str) -> int | None:
        """The revision of the claim ``key``, None when there is none. Raises
        ``TemporaryError`` when the pods bucket cannot be read."""
        try:
            entry = await self.bus.pods.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
        return entry.revision or None

    async def _unclaim(self, key: str, claim: int | None) -> None:
        """Delete the claim at revision ``claim`` if this replica holds one (a failure is
        logged: a claim left behind is taken over after ``claim_wait_s``)."""
        if claim is None:
            return
        try:
            await self.bus.pods.delete(key, last=claim)
        except KeyWrongLastSequenceError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("claim not deleted", extra={"key": key, "error": str(exc)})

    async def release(self, pod_uid: str) -> events.Ack:
        """Free exactly ``pod_uid``'s slices and charge; ``Ack(node=None)`` when it held
        nothing. Then delete the pod's claim, at the revision read before the ledger
        commit: a re-schedule of the same UID that took the claim over meanwhile keeps
        its newer claim. Raises ``Conflicts`` after ``max_attempts`` lost races and
        ``TemporaryError`` when the claim cannot be read."""
        await self._catch_up()
        key = pod_key(pod_uid)
        claim: int | None = None
        lost: list[str] = []
        for attempt in range(self.max_attempts):
            held = self.view.cluster.placement_of(pod_uid)
            if held is None:
                return events.Ack(pod_uid=pod_uid)
            if attempt == 0:
                claim = await self._claim_revision(key)
            node, slices, _ = held
            ledger = self.view.cluster.ledgers[self.view.cluster.node_index[node]]
            committed = await self._commit(ledger.without(pod_uid))
            if committed is None:  # unknown outcome: learn it (see schedule)
                await self._reread(node, strict=True)
                committed = self.view.cluster.placement_of(pod_uid) is None
            if committed:
                await self._announce(
                    self.subjects.alloc_released(node), events.Release(pod_uid=pod_uid)
                )
                await self._unclaim(key, claim)
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
        deadline = deadline_of(msg.headers)
        try:
            if deadline is not None and time.time() > deadline:
                raise Expired(f"pod {pod.uid}: the client's deadline passed")
            decision = await self.schedule(pod, deadline=deadline)
        except Expired as exc:
            # the client has stopped waiting (and may have re-sent): no answer is read
            self._count(errors=1)
            log.warning("schedule request expired", extra={"pod_uid": pod.uid, "error": str(exc)})
            return
        except TemporaryError as exc:
            self._count(errors=1)
            log.warning("schedule deferred", extra={"pod_uid": pod.uid, "error": str(exc)})
            await self._reply(msg, events.BusError(reason=f"temporary: {exc}"))
            return
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
        except TemporaryError as exc:
            self._count(errors=1)
            log.warning("release deferred", extra={"pod_uid": request.pod_uid, "error": str(exc)})
            await self._reply(msg, events.BusError(reason=f"temporary: {exc}"))
            return
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
