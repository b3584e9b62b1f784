"""The scheduler on the bus: watch the buckets into a view, decide, commit by compare-and-set.

A replica keeps a ``Cluster`` (the core's view) of ``<prefix>-nodes`` and
``<prefix>-ledger`` by watching both buckets, and the ledger revision each node's view
was built from. It trusts the view only for choosing: a placement is committed by
``kv.update(node, ledger, last=revision)`` on that node's ledger key, which fails when any
other replica changed the node in between. The loser re-reads the key and decides again,
up to ``max_attempts`` times, then answers ``Unschedulable`` naming the lost races. There
is no leader and no lock across replicas: two replicas can never both commit against the
same revision, so no memory is ever booked twice (the double booking of HAMi #2232).

A compare-and-set on one node's key cannot stop two replicas that got the same pod UID at
the same moment from placing it on two different nodes. So a replica first claims the pod
in ``<prefix>-pods`` with ``kv.create`` (key ``pod_key(uid)``, value a token naming the
replica and the request), which only one replica can do; the others wait until their view
shows the winner's placement and answer with it. A pod in a ledger always has its claim
(placing claims before committing, releasing frees the slices before deleting the claim,
at the revision it read), so the claim also makes a re-sent request idempotent on any
replica: a pod placed before the re-send still holds its claim, and the re-send is
answered with its placement. A claim left by a replica that died before committing is
taken over, by compare-and-set, once it stayed unchanged for ``claim_wait_s`` and a
caught-up view shows the pod in no ledger; should its slow holder commit after all, its
confirmation of the claim fails and it takes its slices back, so the pod ends on one node.
Before answering ``Unschedulable`` a replica waits until its view has caught up with the
ledger stream as it was when the request arrived, so a release committed before the
request is never missed.

Late requests cannot bring a pod back (``services.scheduler.core.protocol`` holds the
rules): a release first turns the pod's claim into a tombstone, then frees the slices, so a
schedule request for the UID handled afterwards -- one delayed behind a paused replica,
say -- is refused, and a holder that commits after the tombstone fails its confirmation
and takes its slices back. An ``Unschedulable`` answer leaves a refusal marker in the claim,
repeated to requests without the client's deadline header (a late copy of the request
already answered may be one). Every request has a deadline: its client's
(``DEADLINE_HEADER``), else one given at the door (``default_deadline_s`` after it reached
the handler); it is checked before the claim and right before the ledger compare-and-set.
Release frees a pod's slices wherever the ledger holds them, a withdrawn node's too.

Each replica handles up to ``max_in_flight`` requests at once; their claims,
announcements and replies overlap, while decisions and ledger commits go one at a time.

What it leaves to others: the decision (``services.scheduler.core``), wiring and signals
(``services.scheduler.app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

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
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from libshared import bounds, events, quarantines
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger, PodCharge
from libshared.resources import PodRequest
from libshared.subjects import SCHEDULERS_QUEUE, Subjects, deadline_of, pod_key
from services.scheduler.adapters import decisions
from services.scheduler.adapters.quotas import QuotaGate, QuotaUnavailable
from services.scheduler.core import protocol
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

log = logging.getLogger("vslice.scheduler")

KV_OP_HEADER = KV_OP
MARKER_HEADER = "Nats-Marker-Reason"  # server-placed TTL markers (nats-server 2.11+)
HEARTBEAT_S = 0.5
REREAD_BACKOFF_S = 0.2  # pause before re-reading a node's ledger again after a failed read
CLAIM_POLL_S = 0.05  # how often a replica waiting for a claim's holder re-reads the claim

# what a request that does not decode raises: JSON nested past msgspec's limit raises
# RecursionError (``libshared.bounds.DECODE_ERRORS``); a PodRequest also ValueError
MALFORMED: tuple[type[Exception], ...] = (*bounds.DECODE_ERRORS, msgspec.ValidationError)
MALFORMED_SCHEDULE: tuple[type[Exception], ...] = (*MALFORMED, ValueError)


@dataclass
class View:
    """The replica's view of both buckets: the core's ``Cluster`` plus, per node, the
    ledger revision it holds (0 = no ledger key yet), and ``seen_seq``, the highest
    ledger-stream sequence the view has taken in.

    Ledgers of nodes not registered yet wait in ``pending`` until the node registers.
    A readable value lifts the quarantine an unreadable one (or a deleted ledger key) put
    its node in (``quarantine``).
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
        self.cluster.lift(reg.node, quarantines.REGISTRATION_UNREADABLE)
        waiting = self.pending.pop(reg.node, None)
        if waiting is not None:
            self.put_ledger(waiting[0], waiting[1])

    def put_ledger(self, ledger: NodeLedger, revision: int) -> bool:
        """Take in a node's ledger at ``revision`` unless the view already holds a newer
        one; returns True when the view changed."""
        node = ledger.node
        if revision <= self.revisions.get(node, 0):
            return False
        self.cluster.lift(node, quarantines.LEDGER_UNREADABLE, quarantines.LEDGER_DELETED)
        if node not in self.cluster.node_index:
            held = self.pending.get(node)
            if held is None or held[1] < revision:
                self.pending[node] = (ledger, revision)
            return False
        self.cluster.set_ledger(ledger)
        self.revisions[node] = revision
        return True

    def quarantine(self, bad: quarantines.Unreadable) -> bool:
        """Offer ``bad.node`` no new pod until a readable value of the same bucket comes;
        its last good devices and ledger stay in the view. True when newly quarantined for
        that reason."""
        return self.cluster.quarantine(bad.node, bad.reason, bad.detail)

    def ledger_at(self, node: str) -> tuple[NodeLedger, int] | None:
        """``node``'s ledger and its revision (a withdrawn node's too), or None."""
        i = self.cluster.node_index.get(node)
        if i is not None:
            return self.cluster.ledgers[i], self.revisions.get(node, 0)
        return self.pending.get(node)

    def find(self, pod_uid: str) -> tuple[NodeLedger, int] | None:
        """The ledger holding ``pod_uid`` and its revision, or None. Ledgers of nodes the
        view does not know (withdrawn before this replica started) count too: their pods
        hold their slices until released."""
        held = self.cluster.placement_of(pod_uid)
        if held is not None:
            node = held[0]
            return self.cluster.ledgers[self.cluster.node_index[node]], self.revisions.get(node, 0)
        for ledger, revision in self.pending.values():
            if pod_uid in ledger.pods():
                return ledger, revision
        return None


class TemporaryError(Exception):
    """The bus could not be read well enough to answer; the request may be sent again.

    Answered as a ``BusError`` whose reason starts with ``"temporary:"``.
    """


class Expired(Exception):
    """The client's deadline for a schedule request passed before anything was committed."""


class Quarantined(Exception):
    """The pod's node is quarantined: its ledger cannot be changed until a readable value
    comes back (``vslice repair NODE``). ``node``, ``reason`` (a ``quarantines`` code)."""

    def __init__(self, node: str, reason: str) -> None:
        self.node, self.reason = node, reason
        super().__init__(
            f"node {node!r} is quarantined ({reason}): its ledger is not changed until it is"
            f" readable again (`vslice repair {node}` rebuilds it)"
        )


class Conflicts(Exception):
    """Every attempt lost the ledger race: ``nodes`` lists the node of each lost attempt."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        super().__init__(f"lost the ledger race {len(nodes)} times (nodes {', '.join(nodes)})")


@dataclass
class Replica:
    """One scheduler replica on the bus. ``start()`` watches the buckets until the view is
    complete, then subscribes; ``stats`` counts what it did.

    Up to ``max_in_flight`` requests are handled at once, each in its own task: their
    claims, announcements and replies overlap, while every decision and the ledger
    compare-and-set that commits it run one at a time (``_commits``), so a replica never
    races itself for a node and each decision sees the commits before it.
    """

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
    max_in_flight: int = 32
    quotas: QuotaGate | None = None  # namespace quotas, charged before each commit
    default_deadline_s: float = protocol.DEFAULT_DEADLINE_S
    view: View = field(init=False)
    stats: events.Stats = field(init=False)
    _changed: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _commits: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _slots: asyncio.Semaphore = field(init=False)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _subs: list[Subscription] = field(init=False, default_factory=list)
    _requests: list[Subscription] = field(init=False, default_factory=list)
    _tokens: Iterator[int] = field(init=False, default_factory=itertools.count)
    # tells this process's claims from those of an earlier one of the same name
    _incarnation: str = field(init=False, default_factory=lambda: secrets.token_hex(4))
    # token -> the refusal marker its request took over (put back should it expire)
    _taken_markers: dict[bytes, bytes] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight {self.max_in_flight}: must be >= 1")
        self.view = View(cluster=self.scheduler.cluster)
        self.stats = events.Stats(name=self.name)
        self._slots = asyncio.Semaphore(self.max_in_flight)

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
        self._requests = [
            await self.nc.subscribe(s.sched_schedule, queue=SCHEDULERS_QUEUE, cb=self.on_schedule),
            await self.nc.subscribe(s.sched_release, queue=SCHEDULERS_QUEUE, cb=self.on_release),
        ]
        self._subs.append(await self.nc.subscribe(s.sched_stats, cb=self.on_stats))
        await self.nc.flush()  # the server has the subscriptions before anyone is told
        log.info(
            "replica ready",
            extra={"nodes": self.view.cluster.size, "ledger_seq": self.view.seen_seq},
        )

    async def stop(self, *, timeout_s: float = 2.0) -> None:
        """Take no new request, then wait up to ``timeout_s`` seconds for the ones in hand
        to be answered (the connection's drain follows)."""
        for sub in self._requests:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._requests = []
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

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
            self.view.cluster.lift(key, quarantines.REGISTRATION_UNREADABLE)
            if self.view.cluster.withdraw_node(key):
                log.info("node withdrawn", extra={"node": key})
            return
        try:
            reg = quarantines.read_registration(key, value)
            most = self.view.cluster.max_devices
            if len(reg.devices) > most:
                raise quarantines.Unreadable(
                    key,
                    quarantines.REGISTRATION_UNREADABLE,
                    f"$.devices: {len(reg.devices)} devices, this replica's view holds {most}",
                )
            self.view.put_node(reg)
        except quarantines.Unreadable as exc:
            self._quarantine(exc)
        self._notify()

    def _quarantine(self, bad: quarantines.Unreadable) -> None:
        self.view.quarantine(bad)
        log.warning(
            "node quarantined",
            extra={"node": bad.node, "reason": bad.reason, "error": bad.detail},
        )

    def _ledger_entry(self, key: str, value: bytes | None, revision: int) -> None:
        self._take_ledger(key, value, revision)
        self.view.seen_seq = max(self.view.seen_seq, revision)
        self._notify()

    def _take_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        # A revision the view holds already (this replica's own commit coming back) is
        # not decoded again. A deleted key quarantines the node: what its pods hold is
        # unknown, and an empty ledger would offer their memory to others.
        if revision <= self.view.revisions.get(key, 0):
            return
        try:
            if not value:
                raise quarantines.deleted(key, revision)
            self.view.put_ledger(quarantines.read_ledger(key, value), revision)
        except quarantines.Unreadable as exc:
            self._quarantine(exc)

    def _notify(self) -> None:
        """Wake every task waiting for the view to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _view_change(self, timeout_s: float) -> None:
        """Return when the view changes, or after ``timeout_s`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()

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
            await self._view_change(left)

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

    async def _reread(self, node: str, *, strict: bool = False) -> bool:
        """Read ``node``'s ledger key into the view; False when the read failed (with
        ``strict``, ``TemporaryError`` is raised instead)."""
        try:
            entry = await self.bus.ledger.get(node)
        except KeyNotFoundError as exc:
            deleted_at = quarantines.deletion_of(exc)
            if deleted_at is not None:
                self._take_ledger(node, None, deleted_at)
            return True
        except (nats.errors.Error, TimeoutError) as exc:
            if strict:
                raise TemporaryError(f"ledger unavailable: {exc}") from exc
            log.warning("ledger re-read failed", extra={"node": node, "error": str(exc)})
            return False
        self._take_ledger(node, entry.value, entry.revision or 0)
        return True

    async def _commit(self, ledger: NodeLedger, *, last: int) -> bool | None:
        """Compare-and-set the node's ledger against revision ``last`` (the caller holds
        ``_commits`` and took ``ledger`` and ``last`` from the view at the same moment).
        True when committed (the view takes it in at once); False when the race was lost
        (the key is re-read, so the next decision sees the winner's commit); None when
        the outcome is unknown: the key is re-read strictly to learn it, which raises
        ``TemporaryError`` while it cannot be read, and the caller looks at the view.
        Raises ``Quarantined`` for a quarantined node (nothing is written)."""
        node = ledger.node
        reason = self.view.cluster.quarantine_reason(node)
        if reason is not None:
            raise Quarantined(node, reason)
        try:
            rev = await self.bus.ledger.update(node, events.ENCODER.encode(ledger), last=last)
        except KeyWrongLastSequenceError:
            self._count(conflicts=1)
            decisions.conflict(node=node, revision=last, replica=self.name)
            if not await self._reread(node) or self.view.revisions.get(node, 0) <= last:
                # The re-read failed (a NATS node failing over): retrying at once would
                # lose again against the same stale revision.
                await asyncio.sleep(REREAD_BACKOFF_S)
                await self._reread(node)
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("ledger commit uncertain", extra={"node": node, "error": str(exc)})
            await self._reread(node, strict=True)
            return None
        self.view.put_ledger(ledger, rev)
        self._notify()
        return True

    # -- the two operations ---------------------------------------------------------------

    async def schedule(
        self,
        pod: PodRequest,
        *,
        deadline: float | None = None,
        nodes: list[str] | None = None,
        stale_copy_possible: bool = False,
    ) -> events.Placement | events.Unschedulable:
        """Place ``pod`` and commit it; the existing placement when it already holds slices,
        or the placement of the replica that holds the pod's claim. ``nodes`` restricts a
        new placement to those nodes (kube-scheduler's candidates); an existing placement
        is returned wherever it is.

        The pod is claimed first (one ``kv.create``): a replica that gets the claim knows
        no other replica holds or places the pod (a placed pod keeps its claim until its
        release has freed its slices), so a new pod costs no read of the ledger stream; a
        replica that does not get it answers with the holder's placement.

        Returns ``Unschedulable`` when nothing fits, or after ``max_attempts`` lost races
        (its reason says so), and leaves that answer in the claim (``protocol``); also when
        the pod's claim is a release's tombstone, or a refusal a request that may be a late
        copy (``stale_copy_possible``: it came without its client's deadline) must repeat.
        Raises ``TemporaryError`` when the bus cannot be read, and ``Expired`` when the
        client's ``deadline`` (Unix seconds) passes before a claim or a commit: nothing is
        committed for a request its client has given up on.
        """
        key = pod_key(pod.uid)
        token = protocol.token(self.name, f"{self._incarnation}.{next(self._tokens)}")
        try:
            return await self._schedule(
                pod,
                key=key,
                token=token,
                deadline=deadline,
                nodes=nodes,
                stale_copy_possible=stale_copy_possible,
            )
        finally:
            self._taken_markers.pop(token, None)

    async def _schedule(
        self,
        pod: PodRequest,
        *,
        key: str,
        token: bytes,
        deadline: float | None,
        nodes: list[str] | None,
        stale_copy_possible: bool,
    ) -> events.Placement | events.Unschedulable:
        claim: int | None = None  # revision of the claim this replica holds
        claimed_at = 0.0  # monotonic time before that claim was written
        caught_up = False
        reserved = False  # a quota charge was reserved for the pod
        lost: list[str] = []
        for _ in range(self.max_attempts):
            if claim is None:
                _check(pod, deadline)
                claimed_at = time.monotonic()
                placed_before = self.view.find(pod.uid) is not None
                got = await self._claim(pod, key, token, stale_copy_possible)
                if isinstance(got, events.Placement | events.Unschedulable):
                    return got
                if got is None:  # the holder gave its claim up: claim again
                    lost.append("claim")
                    continue
                claim = got
            now_held = self.view.cluster.placement_of(pod.uid)
            if now_held is not None:
                # Claimed here, yet the view shows the pod placed. Placed after the claim:
                # a stalled former holder committed after this replica took its claim
                # over; its confirmation fails and it takes its slices back, or, dead,
                # leaves them: wait for that, then take them back here (they were never
                # answered). Placed before: a pod committed without a claim (``adopt``)
                # or a view lagging a release: wait, then adopt the placement.
                if await self._await_gone(pod.uid):
                    continue
                if not placed_before:
                    if not await self._holds_claim(key, token, claim):
                        # This replica is the stalled one: its claim was taken over and
                        # the slices are the new holder's. Answer as the claim says.
                        claim = None
                        got = await self._await_holder(pod, key, token, stale_copy_possible)
                        if isinstance(got, events.Unschedulable) and reserved:
                            await self._unreserve_quota(pod.namespace, pod.uid)
                        if isinstance(got, events.Placement | events.Unschedulable):
                            return got
                        if isinstance(got, int):
                            claim = got
                        lost.append("claim")
                        continue
                    await self._take_back(pod.uid, now_held[0])
                    continue
                held = self.scheduler.decide(pod, explain=False)
                assert isinstance(held, events.Placement)  # a held pod decides so
                await self._confirm(key, token, claim)
                return held
            expired = False
            async with self._commits:
                if self.view.cluster.placement_of(pod.uid) is not None:
                    continue  # the view changed while waiting for the lock: see above
                decision = self.scheduler.decide(pod, nodes=nodes, explain=self.explain)
                if isinstance(decision, events.Placement):
                    node = decision.node
                    ledger = self.view.cluster.ledger_with(decision)
                    base = self.view.revisions.get(node, 0)
                    if not protocol.may_commit(deadline, now=time.time()):
                        expired = True
                    elif (refused := await self._reserve_quota(decision)) is not None:
                        decision = events.Unschedulable(pod_uid=pod.uid, reason=refused)
                        caught_up = True  # the quota was read afresh: no catching up
                    else:
                        reserved = True
                        committed = await self._commit(ledger, last=base)
                        if committed is None:  # learnt from the strict re-read
                            now = self.view.cluster.placement_of(pod.uid)
                            committed = now is not None and now[0] == node
            if isinstance(decision, events.Unschedulable) and not caught_up:
                # Nothing fits in this view: before saying so, make the view hold every
                # commit (a release, say) made before the request arrived, as a caught-up
                # view would have decided; decide again if that changed anything.
                seen = self.view.seen_seq
                await self._catch_up()
                caught_up = True
                if self.view.seen_seq != seen:
                    continue
            if reserved and (expired or isinstance(decision, events.Unschedulable)):
                await self._unreserve_quota(pod.namespace, pod.uid)
            if expired:
                await self._unclaim(key, claim, restore=self._taken_markers.get(token))
                raise Expired(f"pod {pod.uid}: the client's deadline passed")
            if isinstance(decision, events.Unschedulable):
                await self._refuse(key, claim, decision.reason)
                return decision
            if not committed:
                lost.append(node)
                continue
            # A claim can be taken over only after it stayed unchanged for claim_wait_s
            # and the taker's caught-up view showed the pod in no ledger. A commit that
            # landed well within claim_wait_s of the claim is in any such view, so only a
            # slower one confirms the claim (a lease's reasoning; clocks only need to
            # run at about the same rate).
            slow = protocol.must_confirm(
                elapsed_s=time.monotonic() - claimed_at, claim_wait_s=self.claim_wait_s
            )
            if not slow or await self._confirm(key, token, claim):
                await self._announce(self.subjects.alloc_decided(node), decision)
                return decision
            # Another replica took the claim over, or a release tombstoned it, while this
            # commit was slow: give the slices back and answer as the claim says.
            await self._take_back(pod.uid, node)
            claim = None
            claimed_at = time.monotonic()
            got = await self._await_holder(pod, key, token, stale_copy_possible)
            if isinstance(got, events.Unschedulable) and reserved:
                await self._unreserve_quota(pod.namespace, pod.uid)
            if isinstance(got, events.Placement | events.Unschedulable):
                return got
            if isinstance(got, int):
                claim = got
            lost.append(node)
        if reserved:
            await self._unreserve_quota(pod.namespace, pod.uid)
        answer = events.Unschedulable(pod_uid=pod.uid, reason=str(Conflicts(lost)))
        await self._refuse(key, claim, answer.reason)
        return answer

    async def adopt(self, placement: events.Placement) -> bool:
        """Commit ``placement`` exactly as given: slices a pod already uses (restored from
        its annotations after the ledger lost them). True when the ledger holds the pod on
        ``placement.node`` afterwards, False when it holds it elsewhere. No capacity check:
        the pod runs on those devices whether they fit or not.

        Raises ``KeyError`` for a node that never registered, ``Conflicts`` after
        ``max_attempts`` lost races, ``TemporaryError`` when the ledger cannot be read,
        ``Quarantined`` when the node is quarantined.
        """
        await self._catch_up()
        lost: list[str] = []
        for _ in range(self.max_attempts):
            held = self.view.cluster.placement_of(placement.pod_uid)
            if held is not None:
                return held[0] == placement.node
            async with self._commits:
                ledger = self.view.cluster.ledger_with(placement)
                base = self.view.revisions.get(placement.node, 0)
                committed = await self._commit(ledger, last=base)
            if committed is None:
                await self._reread(placement.node, strict=True)
                continue
            if committed:
                await self._announce(self.subjects.alloc_decided(placement.node), placement)
                return True
            lost.append(placement.node)
        raise Conflicts(lost)

    async def _claim(
        self, pod: PodRequest, key: str, token: bytes, stale_copy_possible: bool
    ) -> int | events.Placement | events.Unschedulable | None:
        """Claim ``pod`` with ``token`` as the claim's value: the claim's revision when
        this replica got it, else what ``_await_holder`` returns. A create whose answer
        was lost is settled by reading the claim back (its token tells whose it is).

        Raises ``TemporaryError`` when the pods bucket cannot be written or read.
        """
        uncertain = False
        for _ in range(3):
            try:
                return await self.bus.pods.create(key, token)
            except KeyWrongLastSequenceError:
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("claim uncertain", extra={"key": key, "error": str(exc)})
                uncertain = True
            if uncertain:
                try:
                    entry = await self.bus.pods.get(key)
                except (KeyNotFoundError, KeyDeletedError):
                    continue  # it did not land: create again
                except (nats.errors.Error, TimeoutError) as exc:
                    raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
                if entry.value == token:
                    return entry.revision or 0
            break
        else:
            raise TemporaryError(f"pod {pod.uid}: its claim could not be written")
        self._count(claims_lost=1)
        return await self._await_holder(pod, key, token, stale_copy_possible)

    async def _await_holder(
        self, pod: PodRequest, key: str, token: bytes, stale_copy_possible: bool
    ) -> int | events.Placement | events.Unschedulable | None:
        """Wait for the holder of ``pod``'s claim to commit. Returns its placement once the
        view shows it; None when the claim is gone; the revision of the claim when this
        replica took it over (``token`` as its value; unchanged for ``claim_wait_s`` and
        the pod in no ledger, or a refusal it may decide afresh); ``Unschedulable`` when
        the claim is a tombstone or a refusal to repeat (``protocol.on_claim``).

        Raises ``TemporaryError`` when the pods bucket cannot be read.
        """
        revision, deadline = -1, 0.0
        while True:
            try:
                entry = await self.bus.pods.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                entry = None
            except (nats.errors.Error, TimeoutError) as exc:
                raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
            claim = None if entry is None else protocol.decode_claim(entry.value or b"")
            found = protocol.on_claim(claim, mine=token, stale_copy_possible=stale_copy_possible)
            if found is protocol.Found.REFUSE:
                assert claim is not None  # REFUSE names a claim
                return events.Unschedulable(
                    pod_uid=pod.uid, reason=protocol.refused_reason(pod.uid, claim)
                )
            held = self._held(pod)
            if held is not None:
                return held
            if entry is None:
                return None
            if found is protocol.Found.OURS:
                return entry.revision or 0
            if found is protocol.Found.TAKE_OVER:
                try:
                    self._taken_markers[token] = entry.value or b""
                    return await self.bus.pods.update(key, token, last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue
                except (nats.errors.Error, TimeoutError) as exc:
                    raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
            now = time.monotonic()
            if entry.revision != revision:
                revision, deadline = entry.revision or 0, now + self.claim_wait_s
            elif now >= deadline:
                await self._catch_up()
                if protocol.may_take_over(
                    unchanged_s=now - deadline + self.claim_wait_s,
                    claim_wait_s=self.claim_wait_s,
                    placed=self.view.find(pod.uid) is not None,
                ):
                    try:
                        taken = await self.bus.pods.update(key, token, last=revision)
                    except KeyWrongLastSequenceError:
                        continue
                    except (nats.errors.Error, TimeoutError) as exc:
                        raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
                    self._count(takeovers=1)
                    log.warning("took over a stale claim", extra={"pod_uid": pod.uid})
                    return taken
                continue
            await self._view_change(CLAIM_POLL_S)

    def _held(self, pod: PodRequest) -> events.Placement | None:
        """The placement ``pod`` holds in the view's ledgers (a withdrawn node's too)."""
        found = self.view.find(pod.uid)
        if found is None:
            return None
        ledger = found[0]
        return events.Placement(
            pod_uid=pod.uid,
            namespace=pod.namespace,
            pod=pod.name,
            node=ledger.node,
            slices=tuple(s for s in ledger.slices if s.pod_uid == pod.uid),
            charge=next(
                (c for c in ledger.charges if c.pod_uid == pod.uid), PodCharge(pod_uid=pod.uid)
            ),
        )

    async def _await_gone(self, pod_uid: str) -> bool:
        """True once the view shows ``pod_uid`` in no ledger, False after ``claim_wait_s``."""
        deadline = time.monotonic() + self.claim_wait_s
        while self.view.cluster.placement_of(pod_uid) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._view_change(min(left, CLAIM_POLL_S))
        return True

    async def _confirm(self, key: str, token: bytes, claim: int) -> bool:
        """Compare-and-set the claim after the ledger commit; False when another replica
        took it over, or a release tombstoned it, meanwhile. An unknown outcome is settled
        by reading the claim back (its token tells); raises ``TemporaryError`` when that
        fails too: the pod is then not answered, and the claim's holder settles the commit
        (``_schedule`` takes back a placement it did not make)."""
        try:
            await self.bus.pods.update(key, token, last=claim)
        except KeyWrongLastSequenceError:
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("claim confirmation uncertain", extra={"key": key, "error": str(exc)})
            try:
                entry = await self.bus.pods.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                return False
            except (nats.errors.Error, TimeoutError) as again:
                raise TemporaryError(f"pods bucket unavailable: {again}") from again
            return entry.value == token
        return True

    async def _holds_claim(self, key: str, token: bytes, claim: int) -> bool:
        """True when the claim ``key`` is still this request's (``token`` at revision
        ``claim``). Raises ``TemporaryError`` when the pods bucket cannot be read."""
        try:
            entry = await self.bus.pods.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
        return entry.value == token and entry.revision == claim

    async def _take_back(self, pod_uid: str, node: str) -> None:
        """Remove ``pod_uid``'s slices from ``node``'s ledger (no announcement: the pod was
        never answered from here). Raises ``Conflicts`` after ``max_attempts`` lost races."""
        lost: list[str] = []
        for _ in range(self.max_attempts):
            async with self._commits:
                held = self.view.ledger_at(node)  # that node's: the pod may be on another too
                if held is None or pod_uid not in held[0].pods():
                    return
                ledger, base = held
                if await self._commit(ledger.without(pod_uid), last=base):
                    return
            lost.append(node)
        raise Conflicts(lost)

    async def _unclaim(self, key: str, claim: int | None, *, restore: bytes | None = None) -> None:
        """Delete the claim at revision ``claim`` if this replica holds one, or put back
        the refusal marker ``restore`` it took over (so late copies of the request that
        was refused stay refused). A failure is logged: a claim left behind is taken over
        after ``claim_wait_s``."""
        if claim is None:
            return
        try:
            if restore is not None:
                await self.bus.pods.update(key, restore, last=claim)
            else:
                await self.bus.pods.delete(key, last=claim)
        except KeyWrongLastSequenceError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("claim not deleted", extra={"key": key, "error": str(exc)})

    async def _refuse(self, key: str, claim: int | None, reason: str) -> None:
        """Replace the claim held at revision ``claim`` by a refusal marker with
        ``reason`` (``protocol.refusal``); a failure is logged: the claim is then taken
        over after ``claim_wait_s``, or deleted by the upkeep."""
        if claim is None:
            return
        try:
            await self.bus.pods.update(key, protocol.refusal(reason), last=claim)
        except KeyWrongLastSequenceError:
            pass  # taken over or tombstoned meanwhile: that claim stands
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("refusal not written", extra={"key": key, "error": str(exc)})

    async def _tombstone(self, pod_uid: str, key: str) -> None:
        """Write the tombstone of ``pod_uid`` in its claim (``protocol.on_release``): at
        once when the pod is placed, was refused or has no claim; after the placement
        under way settled, or stayed unchanged ``claim_wait_s``, when a request holds it.

        Raises ``TemporaryError`` when the pods bucket cannot be read or written.
        """
        revision, since = -1, 0.0
        while True:
            try:
                entry: KeyValue.Entry | None = await self.bus.pods.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                entry = None
            except (nats.errors.Error, TimeoutError) as exc:
                raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
            claim = None if entry is None else protocol.decode_claim(entry.value or b"")
            now = time.monotonic()
            rev = 0 if entry is None else entry.revision or 0
            if rev != revision:
                revision, since = rev, now
            step = protocol.on_release(
                claim,
                placed=self.view.find(pod_uid) is not None,
                unchanged_s=now - since,
                claim_wait_s=self.claim_wait_s,
            )
            if step is protocol.Releasing.FREE:
                return
            if step is protocol.Releasing.WAIT:
                await self._view_change(CLAIM_POLL_S)
                continue
            try:
                if entry is None:
                    await self.bus.pods.create(key, protocol.TOMBSTONE)
                else:
                    await self.bus.pods.update(key, protocol.TOMBSTONE, last=rev)
                return
            except KeyWrongLastSequenceError:
                continue
            except (nats.errors.Error, TimeoutError) as exc:
                raise TemporaryError(f"pods bucket unavailable: {exc}") from exc

    async def _held_claim(self, key: str) -> int | None:
        """The revision of the claim ``key`` when it is a holder's (not a marker), else
        None. Raises ``TemporaryError`` when the pods bucket cannot be read."""
        try:
            entry = await self.bus.pods.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
        held = protocol.decode_claim(entry.value or b"").kind is protocol.ClaimKind.HELD
        return entry.revision if held else None

    async def release(self, pod_uid: str, *, final: bool = True) -> events.Ack:
        """Free exactly ``pod_uid``'s slices and charge, wherever the ledger holds them (a
        node withdrawn before this replica started too); ``Ack(node=None)`` when it held
        nothing. The pod's claim is made its tombstone first (``_tombstone``), so no
        request for the UID commits after the answer (one that committed in between fails
        its confirmation and takes its slices back). Raises ``Conflicts`` after
        ``max_attempts`` lost races, ``TemporaryError`` when the ledger or the claim
        cannot be read, and ``Quarantined`` when the pod's node is quarantined (its release
        waits for the repair; its claim is left as it is, for the repair to read).

        ``final=False`` frees a Kubernetes reservation the same pod is placed again after
        (moved off kube-scheduler's candidates, or not bound in time): no tombstone, the
        claim is deleted after the commit instead, at the revision read before it (a
        request that took the claim over meanwhile keeps its newer claim)."""
        await self._catch_up()
        held = self.view.find(pod_uid)
        reason = None if held is None else self.view.cluster.quarantine_reason(held[0].node)
        if held is not None and reason is not None:
            raise Quarantined(held[0].node, reason)
        key = pod_key(pod_uid)
        # What the pod held before its tombstone: a placement another replica answered
        # before its holder confirmed it is taken back by that holder once the tombstone
        # fails its confirmation -- freed by this release all the same, and so answered.
        before = None if held is None else held[0].node
        count = 0 if held is None else sum(1 for x in held[0].slices if x.pod_uid == pod_uid)
        claim: int | None = None  # the held claim to delete after a release not final
        if final:
            await self._tombstone(pod_uid, key)
            await self._catch_up()  # every commit that landed before the tombstone
        else:
            claim = await self._held_claim(key)
        lost: list[str] = []
        for _ in range(self.max_attempts):
            async with self._commits:
                held = self.view.find(pod_uid)
                if held is None and final and before is not None:
                    return events.Ack(pod_uid=pod_uid, node=before, slices=count)
                if held is None:
                    return events.Ack(pod_uid=pod_uid)
                ledger, base = held
                node = ledger.node
                mine = [s for s in ledger.slices if s.pod_uid == pod_uid]
                slices = len(mine)
                namespace = mine[0].namespace if mine else None
                committed = await self._commit(ledger.without(pod_uid), last=base)
                if committed is None:  # learnt from the strict re-read
                    now = self.view.find(pod_uid)
                    committed = now is None or now[0].node != node
            if committed:
                await self._announce(
                    self.subjects.alloc_released(node), events.Release(pod_uid=pod_uid)
                )
                if namespace is not None:
                    await self._unreserve_quota(namespace, pod_uid)
                await self._unclaim(key, claim)
                return events.Ack(pod_uid=pod_uid, node=node, slices=slices)
            lost.append(node)
        raise Conflicts(lost)

    # -- namespace quotas (services.scheduler.adapters.quotas) ---------------------------

    async def _reserve_quota(self, placement: events.Placement) -> str | None:
        """Charge ``placement`` to its namespace's quota before its ledger commit: None
        when it fits (or there is no quota), else the refusal's reason. Raises
        ``TemporaryError`` when the quota cannot be read or written."""
        try:
            return None if self.quotas is None else await self.quotas.reserve(placement)
        except QuotaUnavailable as exc:
            raise TemporaryError(str(exc)) from exc

    async def _unreserve_quota(self, namespace: str, pod_uid: str) -> None:
        """Drop ``pod_uid``'s quota charge, unless the pod holds slices (another replica
        placed it meanwhile)."""
        if self.quotas is not None and self.view.cluster.placement_of(pod_uid) is None:
            await self.quotas.unreserve(namespace, pod_uid)

    async def _announce(self, subject: str, message: events.Placement | events.Release) -> None:
        # The ledger is the truth; the stream only tells node agents. A lost announcement
        # is logged, not undone. It is stored before the client is answered, so a node
        # agent gets a pod's placement before its release.
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

    async def _spawn(self, handler: Callable[[Msg], Coroutine[Any, Any, None]], msg: Msg) -> None:
        # Waits for a free slot, so that past max_in_flight the requests queue in the
        # subscription (and the ones in hand finish first).
        await self._slots.acquire()
        task = asyncio.create_task(handler(msg))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())

    async def on_schedule(self, msg: Msg) -> None:
        """``PodRequest`` JSON in; ``Placement``, ``Unschedulable`` or ``BusError`` out
        (handled in a task of its own)."""
        await self._spawn(self._on_schedule, msg)

    async def on_release(self, msg: Msg) -> None:
        """``Release`` JSON in; ``Ack`` or ``BusError`` out (handled in a task of its own)."""
        await self._spawn(self._on_release, msg)

    async def _on_schedule(self, msg: Msg) -> None:
        try:
            pod = events.POD_REQUEST.decode(msg.data)
            if not pod.uid:
                raise ValueError("PodRequest.uid is empty")
        except MALFORMED_SCHEDULE as exc:
            self._count(errors=1)
            decoding = isinstance(exc, MALFORMED)
            why = bounds.describe(exc, msg.data) if decoding else exc
            log.warning("malformed schedule request", extra={"error": str(why)})
            await self._reply(msg, events.BusError(reason=f"malformed PodRequest: {why}"))
            return
        decisions.taking(pod.uid, pod)
        client = deadline_of(msg.headers)
        deadline = protocol.door_deadline(
            client, now=time.time(), default_s=self.default_deadline_s
        )
        try:
            _check(pod, deadline)
            decision = await self.schedule(
                pod, deadline=deadline, stale_copy_possible=client is None
            )
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
        decisions.scheduled(decision, pod=pod, policy=self.scheduler.policy, replica=self.name)
        await self._reply(msg, decision)

    async def _on_release(self, msg: Msg) -> None:
        try:
            request = events.RELEASE_REQUEST.decode(msg.data)
        except MALFORMED as exc:
            self._count(errors=1)
            why = bounds.describe(exc, msg.data)
            log.warning("malformed release request", extra={"error": why})
            await self._reply(msg, events.BusError(reason=f"malformed Release: {why}"))
            return
        decisions.taking(request.pod_uid)
        try:
            ack = await self.release(request.pod_uid)
        except Quarantined as exc:
            self._count(errors=1)
            log.warning("release refused", extra={"pod_uid": request.pod_uid, "error": str(exc)})
            await self._reply(msg, events.BusError(reason=f"release failed: {exc}"))
            return
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
        decisions.released(ack, replica=self.name)
        await self._reply(msg, ack)

    async def on_stats(self, msg: Msg) -> None:
        """Any request in; this replica's ``Stats`` out."""
        await self._reply(msg, self.stats)


def _check(pod: PodRequest, deadline: float | None) -> None:
    """Raise ``Expired`` when the client's ``deadline`` (Unix seconds) has passed."""
    if not protocol.may_commit(deadline, now=time.time()):
        raise Expired(f"pod {pod.uid}: the client's deadline passed")
