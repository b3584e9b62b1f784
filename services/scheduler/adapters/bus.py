"""The scheduler on the bus: watch the buckets into a view, perform the commit protocol's
steps on NATS, answer the request subjects.

A replica keeps a ``Cluster`` (the core's view) of ``<prefix>-nodes`` and
``<prefix>-ledger`` by watching both buckets, and the ledger revision each node's view
was built from. It trusts the view only for choosing: a placement is committed by
``kv.update(node, ledger, last=revision)`` on that node's ledger key, which fails when any
other replica changed the node in between, so no memory is ever booked twice (the double
booking of HAMi #2232); there is no leader and no lock across replicas. A pod is claimed in
``<prefix>-pods`` before it is placed, and a release leaves a tombstone there.

What to do, step by step, is ``services.scheduler.core.committing`` (its module docstring
is the protocol's theory of operation; the rules are ``services.scheduler.core.protocol``):
``schedule``, ``release`` and ``adopt`` yield operations, which ``Replica._perform``
carries out here -- KV reads and writes, the ledger compare-and-set (a lost race re-reads
the key), catching the view up with the ledger stream, waiting for the view to change,
announcing on the allocation stream, charging quotas. Each replica handles up to
``max_in_flight`` requests at once; their claims, announcements and replies overlap, while
decisions and ledger commits go one at a time (the commit lock).

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
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from libshared import bounds, events, kvreads, kvwrites, quarantines, watching
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.errors import TemporaryError
from libshared.ledgers import NodeLedger
from libshared.resources import PodRequest
from libshared.subjects import SCHEDULERS_QUEUE, Subjects, deadline_of, pod_key
from services.scheduler.adapters import decisions
from services.scheduler.adapters.quotas import QuotaGate, QuotaUnavailable
from services.scheduler.core import committing, protocol, recording
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

log = logging.getLogger("vslice.scheduler")

REREAD_BACKOFF_S = 0.2  # pause before re-reading a node's ledger again after a failed read

# what a request that does not decode raises: JSON nested past msgspec's limit raises
# RecursionError (``libshared.bounds.DECODE_ERRORS``); a PodRequest also ValueError
MALFORMED: tuple[type[Exception], ...] = (*bounds.DECODE_ERRORS, msgspec.ValidationError)
MALFORMED_SCHEDULE: tuple[type[Exception], ...] = (*MALFORMED, ValueError)


Perform = Callable[[committing.Op], Awaitable[object]]
"""Carries out one operation of the commit protocol on the bus, returning its result."""
Interpose = Callable[[committing.Op, Perform], Awaitable[object]]
"""``interpose(op, perform)``: called instead of ``perform(op)`` for every operation but
the commit lock's; returns the operation's result (normally ``await perform(op)``, after
whatever it adds: a delay, a write of its own, a count)."""


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
        node = self.cluster.node_of(pod_uid)
        if node is not None:
            return self.cluster.ledgers[self.cluster.node_index[node]], self.revisions.get(node, 0)
        for ledger, revision in self.pending.values():
            if pod_uid in ledger.pods():
                return ledger, revision
        return None


# the protocol's errors, raised by its steps (and by the performer: TemporaryError,
# libshared.errors')
Expired = committing.Expired
Quarantined = committing.Quarantined
Conflicts = committing.Conflicts


@dataclass
class ReplicaFace:
    """The replica's view and scheduler as the protocol reads them
    (``core.committing.Face``)."""

    view: View
    scheduler: Scheduler

    @property
    def seen_seq(self) -> int:
        return self.view.seen_seq

    def decide(
        self, pod: PodRequest, *, nodes: list[str] | None, explain: bool
    ) -> events.Placement | events.Unschedulable:
        return self.scheduler.decide(pod, nodes=nodes, explain=explain)

    def node_of(self, pod_uid: str) -> str | None:
        return self.view.cluster.node_of(pod_uid)

    def find(self, pod_uid: str) -> tuple[NodeLedger, int] | None:
        return self.view.find(pod_uid)

    def ledger_at(self, node: str) -> tuple[NodeLedger, int] | None:
        return self.view.ledger_at(node)

    def ledger_with(self, placement: events.Placement) -> tuple[NodeLedger, int]:
        return self.view.cluster.ledger_with(placement), self.view.revisions.get(placement.node, 0)

    def quarantine_reason(self, node: str) -> str | None:
        return self.view.cluster.quarantine_reason(node)


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
    # defaults: committing.Rules, where each is written once
    max_attempts: int = committing.Rules.max_attempts
    explain: bool = committing.Rules.explain
    sync_timeout_s: float = committing.Rules.sync_timeout_s
    claim_wait_s: float = committing.Rules.claim_wait_s
    max_in_flight: int = committing.Rules.max_in_flight
    quotas: QuotaGate | None = None  # namespace quotas, charged before each commit
    # wraps the performing of each operation of the commit protocol (``Interpose``):
    # where a fault injector or a test delays, fails or races a named step
    interpose: Interpose | None = None
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
    _face: ReplicaFace = field(init=False)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight {self.max_in_flight}: must be >= 1")
        self.view = View(cluster=self.scheduler.cluster)
        self._face = ReplicaFace(self.view, self.scheduler)
        self.stats = events.Stats(name=self.name)
        self._slots = asyncio.Semaphore(self.max_in_flight)

    @property
    def _rules(self) -> committing.Rules:
        """The protocol's settings, as the fields are now (tests and callers may change
        them after the replica is made)."""
        return committing.Rules(
            max_attempts=self.max_attempts,
            claim_wait_s=self.claim_wait_s,
            explain=self.explain,
            sync_timeout_s=self.sync_timeout_s,
            max_in_flight=self.max_in_flight,
        )

    def _count(self, **deltas: int) -> None:
        self.stats = msgspec.structs.replace(
            self.stats, **{k: getattr(self.stats, k) + v for k, v in deltas.items()}
        )

    # -- what callers read of the view (pure; no I/O) ------------------------------------

    @property
    def policy(self) -> str:
        """The placement policy this replica decides with."""
        return self.scheduler.policy

    @property
    def seen_seq(self) -> int:
        """The highest ledger-stream sequence the view has taken in."""
        return self.view.seen_seq

    def placement_of(self, pod_uid: str) -> events.Placement | None:
        """The placement ``pod_uid`` holds in the view, or None."""
        return self.view.cluster.placement_of(pod_uid)

    def node_of(self, pod_uid: str) -> str | None:
        """The node whose ledger holds ``pod_uid`` in the view, or None."""
        return self.view.cluster.node_of(pod_uid)

    def ledgers(self, *, waiting: bool = False) -> list[NodeLedger]:
        """The registered nodes' ledgers; with ``waiting``, also those that wait for their
        node's registration."""
        held = list(self.view.cluster.ledgers)
        return [*held, *(ledger for ledger, _ in self.view.pending.values())] if waiting else held

    def ledger_pods(self) -> dict[str, str]:
        """Pod UID -> node, for every pod the view's ledgers hold."""
        c = self.view.cluster
        return {uid: c.nodes[n] for uid, n in c.pod_nodes.items()}

    def unknown_ledgers(self) -> set[str]:
        """The nodes whose ledger is quarantined (what their pods hold is unknown)."""
        return set(self.view.cluster.unknown_ledgers())

    def registrations(self) -> list[NodeDevices]:
        """Every registered node's devices."""
        return list(self.view.cluster.registrations)

    def filtered(self, pod: PodRequest, nodes: list[str]) -> dict[str, str]:
        """Node -> why ``pod`` does not fit it, for those of ``nodes`` it does not fit."""
        return dict(self.scheduler.filter(pod, nodes).failed)

    def node_scores(self, pod: PodRequest, nodes: list[str]) -> dict[str, float]:
        """Each of ``nodes``' score for ``pod`` as the scheduling events report it."""
        return recording.node_scores(self.view.cluster, pod, nodes)

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

    async def _watch(self, bucket: str, handle: watching.Handler, ready: asyncio.Event) -> None:
        self._subs.append(await watching.watch(self.js, bucket, handle, ready))

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
            keys = await kvreads.keys(self.bus.ledger)
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
        The core checks the node's quarantine before (``committing``)."""
        node = ledger.node
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

    # -- the two operations: the core's steps, performed on the bus ---------------------

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
        is returned wherever it is. The steps are ``core.committing.schedule``'s.

        Returns ``Unschedulable`` when nothing fits, or after ``max_attempts`` lost races
        (its reason says so), and leaves that answer in the claim (``protocol``); also when
        the pod's claim is a release's tombstone, or a refusal a request that may be a late
        copy (``stale_copy_possible``: it came without its client's deadline) must repeat.
        Raises ``TemporaryError`` when the bus cannot be read, ``Expired`` when the
        client's ``deadline`` (Unix seconds) passes before a claim or a commit (nothing is
        committed for a request its client has given up on), ``Quarantined`` when the
        chosen node is quarantined.
        """
        request = committing.Request(
            pod=pod,
            key=pod_key(pod.uid),
            token=protocol.token(self.name, f"{self._incarnation}.{next(self._tokens)}"),
            deadline=deadline,
            nodes=nodes,
            stale_copy_possible=stale_copy_possible,
        )
        answer = await self._run(committing.schedule(self._face, self._rules, request))
        assert isinstance(answer, events.Placement | events.Unschedulable)
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
        return bool(await self._run(committing.adopt(self._face, self._rules, placement)))

    async def release(self, pod_uid: str, *, final: bool = True) -> events.Ack:
        """Free exactly ``pod_uid``'s slices and charge, wherever the ledger holds them (a
        node withdrawn before this replica started too); ``Ack(node=None)`` when it held
        nothing. The pod's claim is made its tombstone first, so no request for the UID
        commits after the answer (one that committed in between fails its confirmation
        and takes its slices back). Raises ``Conflicts`` after ``max_attempts`` lost
        races, ``TemporaryError`` when the ledger or the claim cannot be read, and
        ``Quarantined`` when the pod's node is quarantined (its release waits for the
        repair; its claim is left as it is, for the repair to read).

        ``final=False`` frees a Kubernetes reservation the same pod is placed again after
        (moved off kube-scheduler's candidates, or not bound in time): no tombstone, the
        claim is deleted after the commit instead, at the revision read before it (a
        request that took the claim over meanwhile keeps its newer claim). The steps are
        ``core.committing.release``'s."""
        steps = committing.release(self._face, self._rules, pod_uid, pod_key(pod_uid), final=final)
        ack = await self._run(steps)
        assert isinstance(ack, events.Ack)
        return ack

    async def _run(self, steps: committing.Steps) -> object:
        """Perform ``steps``' operations in turn and return what they return; what an
        operation raises ends them. The commit lock is given back however they end."""
        locked = False
        result: object = None
        try:
            while True:
                try:
                    op = steps.send(result)
                except StopIteration as stop:
                    return stop.value
                result = None
                if isinstance(op, committing.Lock):
                    await self._commits.acquire()
                    locked = True
                elif isinstance(op, committing.Unlock):
                    self._commits.release()
                    locked = False
                elif self.interpose is not None:
                    result = await self.interpose(op, self._perform)
                else:
                    result = await self._perform(op)
        finally:
            if locked:
                self._commits.release()
            steps.close()

    async def _perform(self, op: committing.Op) -> object:
        """Carry out one operation of the core's steps on the bus (see each operation's
        docstring for its result). Raises ``TemporaryError`` when a read fails."""
        match op:
            case committing.Clock():
                return committing.Times(monotonic=time.monotonic(), wall=time.time())
            case committing.ReadClaim(key=key):
                try:
                    entry = await self.bus.pods.get(key)
                except (KeyNotFoundError, KeyDeletedError):
                    return None
                except (nats.errors.Error, TimeoutError) as exc:
                    raise TemporaryError(f"pods bucket unavailable: {exc}") from exc
                return committing.Entry(value=entry.value or b"", revision=entry.revision or 0)
            case committing.WriteClaim(key=key, value=value, last=last, ttl_s=ttl_s):
                try:
                    if last is None:
                        revision = await (
                            self.bus.pods.create(key, value)
                            if ttl_s is None
                            else self.bus.pods.create(key, value, msg_ttl=ttl_s)
                        )
                    else:
                        revision = await kvwrites.update(
                            self.bus.pods, key, value, last=last, ttl_s=ttl_s
                        )
                except KeyWrongLastSequenceError:
                    return committing.Outcome.LOST
                except (nats.errors.Error, TimeoutError) as exc:
                    log.warning("claim write uncertain", extra={"key": key, "error": str(exc)})
                    return committing.Outcome.UNKNOWN
                return committing.Wrote(revision=revision)
            case committing.DeleteClaim(key=key, last=last):
                try:
                    # a marker the server removes itself (libshared.kvwrites)
                    await kvwrites.purge(self.bus.pods, key, last=last)
                except KeyWrongLastSequenceError:
                    return committing.Outcome.LOST
                except (nats.errors.Error, TimeoutError) as exc:
                    log.warning("claim not deleted", extra={"key": key, "error": str(exc)})
                    return committing.Outcome.UNKNOWN
                return committing.Wrote(revision=0)
            case committing.CommitLedger(ledger=ledger, last=last):
                return await self._commit(ledger, last=last)
            case committing.CatchUp():
                await self._catch_up()
            case committing.Reread(node=node):
                await self._reread(node, strict=True)
            case committing.WaitView(timeout_s=timeout_s):
                await self._view_change(timeout_s)
            case committing.Announce(node=node, message=message):
                if isinstance(message, events.Release):
                    await self._announce(self.subjects.alloc_released(node), message)
                else:
                    await self._announce(self.subjects.alloc_decided(node), message)
            case committing.ReserveQuota(placement=placement):
                try:
                    return None if self.quotas is None else await self.quotas.reserve(placement)
                except QuotaUnavailable as exc:
                    raise TemporaryError(str(exc)) from exc
            case committing.UnreserveQuota(namespace=namespace, pod_uid=pod_uid):
                if self.quotas is not None:
                    await self.quotas.unreserve(namespace, pod_uid)
            case committing.Note(what=committing.Noted.CLAIM_LOST):
                self._count(claims_lost=1)
            case committing.Note(what=committing.Noted.TOOK_OVER, pod_uid=pod_uid):
                self._count(takeovers=1)
                log.warning("took over a stale claim", extra={"pod_uid": pod_uid})
            case _:  # pragma: no cover - every operation is matched above
                raise AssertionError(f"unknown operation {op!r}")
        return None

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
            await self._reply(
                msg, events.BusError(reason=f"temporary: {exc}", retry_after_s=exc.retry_after_s)
            )
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
            await self._reply(
                msg, events.BusError(reason=f"temporary: {exc}", retry_after_s=exc.retry_after_s)
            )
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
    committing.check_deadline(pod, deadline, now=time.time())
