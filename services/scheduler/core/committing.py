"""The replica's commit protocol as a state machine: schedule and release as generators
that yield the reads, writes and waits to perform and take back their results. Pure.

Theory of operation. A replica places a pod in five steps: claim (``kv.create`` of the
pod's key in ``<prefix>-pods``), decide, compare-and-set the node's ledger, confirm the
claim (a slow commit only), announce. A release tombstones the claim, then frees the
slices. Each step is an operation yielded here (``ReadClaim``, ``WriteClaim``,
``CommitLedger``, ``Announce``, ...); the adapter (``services.scheduler.adapters.bus``)
performs it on NATS and sends the result back, and the interleaving tests
(``tests/scheduler/test_protocol.py``) perform the same operations on in-memory buckets,
shuffling the steps of two or three replicas. The rules each step applies are
``services.scheduler.core.protocol``'s; the view a replica decides on is read through
``Face``.

- A replica that gets the claim knows no other replica holds or places the pod (a placed
  pod keeps its claim until its release has freed its slices), so a new pod costs no read
  of the ledger stream; one that does not get it waits for the holder's placement and
  answers with it, or takes the claim over once it stayed unchanged ``claim_wait_s`` with
  the pod in no caught-up view.
- A commit that landed within half of ``claim_wait_s`` of its claim is in any view a
  taker could have had; a slower one confirms its claim (``protocol.must_confirm``), and
  one whose claim was taken over or tombstoned meanwhile takes its slices back.
- Before answering ``Unschedulable`` the view is caught up with the ledger stream as it
  was when the request arrived, so a release committed before the request is never missed.
- Every request has a deadline, checked before the claim and right before the ledger
  compare-and-set: nothing is committed for a request whose reply will never be read.
- A release writes the pod's tombstone first, so no request for the UID commits after
  the answer.

Errors: ``Expired`` (the deadline passed before a commit), ``Quarantined`` (the node's
ledger cannot be changed), ``Conflicts`` (every attempt lost the race),
``libshared.errors.TemporaryError`` (the bus could not be read or written well enough to
answer; raised by the operations' performer too).

What it leaves to others: performing the operations and the view's upkeep
(``services.scheduler.adapters.bus``), the decision (``services.scheduler.core.deciding``).
"""

from __future__ import annotations

import enum
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from libshared import events
from libshared.errors import TemporaryError, VsliceError
from libshared.ledgers import NodeLedger, PodCharge
from libshared.resources import PodRequest
from services.scheduler.core import protocol


class Expired(VsliceError):
    """The client's deadline for a schedule request passed before anything was committed."""


class Quarantined(VsliceError):
    """The pod's node is quarantined: its ledger cannot be changed until a readable value
    comes back (``vslice repair NODE``). ``node``, ``reason`` (a ``quarantines`` code)."""

    def __init__(self, node: str, reason: str) -> None:
        self.node, self.reason = node, reason
        super().__init__(
            f"node {node!r} is quarantined ({reason}): its ledger is not changed until it is"
            f" readable again (`vslice repair {node}` rebuilds it)"
        )


class Conflicts(VsliceError):
    """Every attempt lost the ledger race: ``nodes`` lists the node of each lost attempt."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        super().__init__(f"lost the ledger race {len(nodes)} times (nodes {', '.join(nodes)})")


# -- the operations and their results -----------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """Read both clocks: the result is ``Times``."""


@dataclass(frozen=True)
class Times:
    """``monotonic`` seconds (waits) and ``wall`` Unix seconds (deadlines)."""

    monotonic: float
    wall: float


@dataclass(frozen=True)
class ReadClaim:
    """Read the pod's key in ``<prefix>-pods``: ``Entry``, or None when there is none.
    The performer raises ``TemporaryError`` when the bucket cannot be read."""

    key: str


@dataclass(frozen=True)
class Entry:
    """A key's ``value`` at its ``revision``."""

    value: bytes
    revision: int


@dataclass(frozen=True)
class WriteClaim:
    """Write ``value`` at ``key``: create it (``last`` None) or compare-and-set it against
    revision ``last``; with ``ttl_s``, the server removes the write that many seconds
    later unless the key was written again (a tombstone, a refusal marker). Result:
    ``Wrote``, or an ``Outcome``."""

    key: str
    value: bytes
    last: int | None = None
    ttl_s: float | None = None


@dataclass(frozen=True)
class DeleteClaim:
    """Delete ``key`` if its revision is still ``last``. Result: ``Wrote`` or an ``Outcome``."""

    key: str
    last: int


@dataclass(frozen=True)
class Wrote:
    """The write landed; the key's new ``revision``."""

    revision: int


class Outcome(enum.Enum):
    """A write that did not land, or whose answer was lost."""

    LOST = "lost"  # the key's revision was not the one given: nothing written
    UNKNOWN = "unknown"  # no answer (a NATS error or timeout): it may have landed


@dataclass(frozen=True)
class CommitLedger:
    """Compare-and-set ``ledger`` (its node's key) against revision ``last``, the caller
    holding the commit lock. Result: True (committed, the view holds it), False (the race
    was lost and the key re-read), None (unknown: the key was re-read to learn it; the
    performer raises ``TemporaryError`` when it cannot be read)."""

    ledger: NodeLedger
    last: int


@dataclass(frozen=True)
class CatchUp:
    """Make the view hold every ledger change committed before now (``TemporaryError``
    when the ledger cannot be read)."""


@dataclass(frozen=True)
class Reread:
    """Read ``node``'s ledger key into the view (``TemporaryError`` when it cannot be)."""

    node: str


@dataclass(frozen=True)
class WaitView:
    """Return when the view changes, or after ``timeout_s`` seconds."""

    timeout_s: float


@dataclass(frozen=True)
class Lock:
    """Take the replica's commit lock: its decisions and commits go one at a time. Every
    path gives it back with ``Unlock``, but for an exception: the performer gives it back
    when the steps end, however they end."""


@dataclass(frozen=True)
class Unlock:
    """Give the commit lock back."""


@dataclass(frozen=True)
class Announce:
    """Publish ``message`` on the allocation stream for ``node`` (decided or released)."""

    node: str
    message: events.Placement | events.Release


@dataclass(frozen=True)
class ReserveQuota:
    """Charge ``placement`` to its namespace's quota: None when it fits, else the reason
    (``TemporaryError`` when the quota cannot be read)."""

    placement: events.Placement


@dataclass(frozen=True)
class UnreserveQuota:
    """Drop ``pod_uid``'s quota charge in ``namespace``."""

    namespace: str
    pod_uid: str


class Noted(enum.Enum):
    """What a ``Note`` tells."""

    CLAIM_LOST = "claims_lost"  # another request held the pod's claim
    TOOK_OVER = "takeovers"  # a stale claim was taken over


@dataclass(frozen=True)
class Note:
    """Something to count and log, about ``pod_uid`` (no result)."""

    what: Noted
    pod_uid: str


Op = (
    Clock
    | ReadClaim
    | WriteClaim
    | DeleteClaim
    | CommitLedger
    | CatchUp
    | Reread
    | WaitView
    | Lock
    | Unlock
    | Announce
    | ReserveQuota
    | UnreserveQuota
    | Note
)
Steps = Generator[Op, Any, Any]


class Face(Protocol):
    """What the protocol reads of a replica's view (``adapters.bus.View`` and its
    scheduler; an in-memory model in the tests). Nothing here does I/O."""

    @property
    def seen_seq(self) -> int:
        """The highest ledger-stream sequence the view has taken in."""
        ...

    def decide(
        self, pod: PodRequest, *, nodes: list[str] | None, explain: bool
    ) -> events.Placement | events.Unschedulable:
        """The scheduler's decision for ``pod`` on the view (its existing placement when
        it holds slices)."""
        ...

    def node_of(self, pod_uid: str) -> str | None:
        """The node whose ledger holds ``pod_uid`` among registered nodes, or None."""
        ...

    def find(self, pod_uid: str) -> tuple[NodeLedger, int] | None:
        """The ledger holding ``pod_uid`` (a withdrawn node's too) and its revision."""
        ...

    def ledger_at(self, node: str) -> tuple[NodeLedger, int] | None:
        """``node``'s ledger and revision, or None when the view has no such node."""
        ...

    def ledger_with(self, placement: events.Placement) -> tuple[NodeLedger, int]:
        """The ledger of ``placement.node`` with the placement added, and the revision
        the view holds for that node (0: no key yet)."""
        ...

    def quarantine_reason(self, node: str) -> str | None:
        """Why ``node`` is quarantined, or None."""
        ...


@dataclass(frozen=True)
class Rules:
    """One replica's settings, and the one place their defaults are written (the
    replica's flags and ``Replica``'s fields take them from here)."""

    max_attempts: int = 8
    """Decide-and-commit attempts before a lost ledger race is answered Unschedulable."""
    claim_wait_s: float = 2.0
    """Seconds a claim may stay unchanged, its pod in no ledger, before it is taken over
    (its holder presumably died)."""
    claim_poll_s: float = 0.05
    """Seconds between looks of a request waiting for another's claim."""
    explain: bool = True
    """Whether an Unschedulable answer carries per-node reasons."""
    sync_timeout_s: float = 2.0
    """Longest wait, seconds, for the view to catch up with the ledger before deciding
    (then every ledger key is read afresh)."""
    max_in_flight: int = 32
    """Requests a replica handles at once (their bus round trips overlap; decisions and
    commits still go one at a time)."""


@dataclass
class Request:
    """One schedule request: ``pod``, its claim ``key`` and this request's ``token``,
    its ``deadline`` (Unix seconds; None: a caller in process), ``nodes`` a new placement
    is restricted to, ``stale_copy_possible`` (no client deadline header), and the refusal
    marker it took over, if any (``taken_marker``, put back should it expire)."""

    pod: PodRequest
    key: str
    token: bytes
    deadline: float | None = None
    nodes: list[str] | None = None
    stale_copy_possible: bool = False
    taken_marker: bytes | None = field(default=None)


def held_placement(face: Face, pod: PodRequest) -> events.Placement | None:
    """The placement ``pod`` holds in the view's ledgers (a withdrawn node's too)."""
    found = face.find(pod.uid)
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


def check_deadline(pod: PodRequest, deadline: float | None, *, now: float) -> None:
    """Raise ``Expired`` when the client's ``deadline`` (Unix seconds) has passed at ``now``."""
    if not protocol.may_commit(deadline, now=now):
        raise Expired(f"pod {pod.uid}: the client's deadline passed")


# -- schedule ------------------------------------------------------------------------------


def schedule(face: Face, rules: Rules, req: Request) -> Steps:
    """Place ``req.pod`` and commit it; returns ``Placement`` or ``Unschedulable`` (see
    ``adapters.bus.Replica.schedule`` for the answers). Raises ``Expired``,
    ``Quarantined``, ``TemporaryError``."""
    pod = req.pod
    claim: int | None = None  # revision of the claim this request holds
    claimed_at = 0.0  # monotonic time before that claim was written
    caught_up = False
    reserved = False  # a quota charge was reserved for the pod
    lost: list[str] = []
    for _ in range(rules.max_attempts):
        if claim is None:
            now: Times = yield Clock()
            check_deadline(pod, req.deadline, now=now.wall)
            claimed_at = now.monotonic
            placed_before = face.find(pod.uid) is not None
            got = yield from _claim(face, rules, req)
            if isinstance(got, events.Placement | events.Unschedulable):
                return got
            if got is None:  # the holder gave its claim up: claim again
                lost.append("claim")
                continue
            claim = got
        now_held = face.node_of(pod.uid)
        if now_held is not None:
            # Claimed here, yet the view shows the pod placed. Placed after the claim: a
            # stalled former holder committed after this request took its claim over;
            # its confirmation fails and it takes its slices back, or, dead, leaves them:
            # wait for that, then take them back here (they were never answered). Placed
            # before: a pod committed without a claim (``adopt``) or a view lagging a
            # release: wait, then adopt the placement.
            if (yield from _await_gone(face, rules, pod.uid)):
                continue
            if not placed_before:
                if not (yield from _holds_claim(req, claim)):
                    # This request is the stalled one: its claim was taken over and the
                    # slices are the new holder's. Answer as the claim says.
                    claim = None
                    got = yield from _await_holder(face, rules, req)
                    if isinstance(got, events.Unschedulable) and reserved:
                        yield from _unreserve(face, pod.namespace, pod.uid)
                    if isinstance(got, events.Placement | events.Unschedulable):
                        return got
                    if isinstance(got, int):
                        claim = got
                    lost.append("claim")
                    continue
                yield from take_back(face, rules, pod.uid, now_held)
                continue
            held = held_placement(face, pod)
            if held is None:
                continue  # released while this request waited: it decides afresh
            yield from _confirm(req, claim)
            return held
        expired = False
        committed: bool | None = False
        node = ""
        yield Lock()
        if face.node_of(pod.uid) is not None:
            yield Unlock()
            continue  # the view changed while waiting for the lock: see above
        decision = face.decide(pod, nodes=req.nodes, explain=rules.explain)
        if isinstance(decision, events.Placement):
            node = decision.node
            ledger, base = face.ledger_with(decision)
            now = yield Clock()
            if not protocol.may_commit(req.deadline, now=now.wall):
                expired = True
            elif (refused := (yield ReserveQuota(decision))) is not None:
                decision = events.Unschedulable(pod_uid=pod.uid, reason=refused)
                caught_up = True  # the quota was read afresh: no catching up
            else:
                reserved = True
                committed = yield from _commit(face, ledger, base)
                if committed is None:  # learnt from the strict re-read
                    committed = face.node_of(pod.uid) == node
        yield Unlock()
        if isinstance(decision, events.Unschedulable) and not caught_up:
            # Nothing fits in this view: before saying so, make the view hold every
            # commit (a release, say) made before the request arrived, as a caught-up
            # view would have decided; decide again if that changed anything.
            seen = face.seen_seq
            yield CatchUp()
            caught_up = True
            if face.seen_seq != seen:
                continue
        if reserved and (expired or isinstance(decision, events.Unschedulable)):
            yield from _unreserve(face, pod.namespace, pod.uid)
        if expired:
            yield from _unclaim(req.key, claim, restore=req.taken_marker)
            raise Expired(f"pod {pod.uid}: the client's deadline passed")
        if isinstance(decision, events.Unschedulable):
            yield from _refuse(req.key, claim, decision.reason)
            return decision
        if not committed:
            lost.append(node)
            continue
        now = yield Clock()
        slow = protocol.must_confirm(
            elapsed_s=now.monotonic - claimed_at, claim_wait_s=rules.claim_wait_s
        )
        if not slow or (yield from _confirm(req, claim)):
            yield Announce(node, decision)
            return decision
        # Another replica took the claim over, or a release tombstoned it, while this
        # commit was slow: give the slices back and answer as the claim says.
        yield from take_back(face, rules, pod.uid, node)
        claim = None
        now = yield Clock()
        claimed_at = now.monotonic
        got = yield from _await_holder(face, rules, req)
        if isinstance(got, events.Unschedulable) and reserved:
            yield from _unreserve(face, pod.namespace, pod.uid)
        if isinstance(got, events.Placement | events.Unschedulable):
            return got
        if isinstance(got, int):
            claim = got
        lost.append(node)
    if reserved:
        yield from _unreserve(face, pod.namespace, pod.uid)
    answer = events.Unschedulable(pod_uid=pod.uid, reason=str(Conflicts(lost)))
    yield from _refuse(req.key, claim, answer.reason)
    return answer


def adopt(face: Face, rules: Rules, placement: events.Placement) -> Steps:
    """Commit ``placement`` exactly as given (slices a pod already uses); True when the
    ledger holds the pod on ``placement.node`` afterwards, False when it holds it
    elsewhere. Raises ``Conflicts``, ``Quarantined``, ``TemporaryError``; the performer
    raises ``KeyError`` for a node that never registered."""
    yield CatchUp()
    lost: list[str] = []
    for _ in range(rules.max_attempts):
        held = face.node_of(placement.pod_uid)
        if held is not None:
            return held == placement.node
        yield Lock()
        ledger, base = face.ledger_with(placement)
        committed = yield from _commit(face, ledger, base)
        yield Unlock()
        if committed is None:
            yield Reread(placement.node)
            continue
        if committed:
            yield Announce(placement.node, placement)
            return True
        lost.append(placement.node)
    raise Conflicts(lost)


def _commit(face: Face, ledger: NodeLedger, base: int) -> Steps:
    """The compare-and-set of ``ledger`` (``CommitLedger``); raises ``Quarantined`` for a
    quarantined node, before anything is written."""
    reason = face.quarantine_reason(ledger.node)
    if reason is not None:
        raise Quarantined(ledger.node, reason)
    committed: bool | None = yield CommitLedger(ledger, base)
    return committed


def _claim(face: Face, rules: Rules, req: Request) -> Steps:
    """Claim the pod with the request's token: the claim's revision when this request
    got it, else what ``_await_holder`` returns. A create whose answer was lost is settled
    by reading the claim back (its token tells whose it is). Raises ``TemporaryError``."""
    uncertain = False
    for _ in range(3):
        wrote = yield WriteClaim(req.key, req.token)
        if isinstance(wrote, Wrote):
            return wrote.revision
        if wrote is Outcome.UNKNOWN:
            uncertain = True
        if uncertain:
            entry: Entry | None = yield ReadClaim(req.key)
            if entry is None:
                continue  # it did not land: create again
            if entry.value == req.token:
                return entry.revision
        break
    else:
        raise TemporaryError(f"pod {req.pod.uid}: its claim could not be written")
    yield Note(Noted.CLAIM_LOST, req.pod.uid)
    return (yield from _await_holder(face, rules, req))


def _await_holder(face: Face, rules: Rules, req: Request) -> Steps:
    """Wait for the holder of the pod's claim to commit. Returns its placement once the
    view shows it; None when the claim is gone; the revision of the claim when this
    request took it over (its token as the value; unchanged for ``claim_wait_s`` and the
    pod in no ledger, or a refusal it may decide afresh); ``Unschedulable`` when the claim
    is a tombstone or a refusal to repeat (``protocol.on_claim``)."""
    pod = req.pod
    revision, deadline = -1, 0.0
    while True:
        entry: Entry | None = yield ReadClaim(req.key)
        claim = None if entry is None else protocol.decode_claim(entry.value)
        found = protocol.on_claim(
            claim, mine=req.token, stale_copy_possible=req.stale_copy_possible
        )
        if found is protocol.Found.REFUSE:
            assert claim is not None  # REFUSE names a claim
            return events.Unschedulable(
                pod_uid=pod.uid, reason=protocol.refused_reason(pod.uid, claim)
            )
        held = held_placement(face, pod)
        if held is not None:
            return held
        if entry is None:
            return None
        if found is protocol.Found.OURS:
            return entry.revision
        if found is protocol.Found.TAKE_OVER:
            req.taken_marker = entry.value
            wrote = yield WriteClaim(req.key, req.token, last=entry.revision)
            if wrote is Outcome.LOST:
                continue
            if wrote is Outcome.UNKNOWN:
                raise TemporaryError("pods bucket unavailable: a claim's take-over went unanswered")
            return wrote.revision
        now: Times = yield Clock()
        if entry.revision != revision:
            revision, deadline = entry.revision, now.monotonic + rules.claim_wait_s
        elif now.monotonic >= deadline:
            yield CatchUp()
            if protocol.may_take_over(
                unchanged_s=now.monotonic - deadline + rules.claim_wait_s,
                claim_wait_s=rules.claim_wait_s,
                placed=face.find(pod.uid) is not None,
            ):
                wrote = yield WriteClaim(req.key, req.token, last=revision)
                if wrote is Outcome.LOST:
                    continue
                if wrote is Outcome.UNKNOWN:
                    raise TemporaryError(
                        "pods bucket unavailable: a claim's take-over went unanswered"
                    )
                yield Note(Noted.TOOK_OVER, pod.uid)
                return wrote.revision
            continue
        yield WaitView(rules.claim_poll_s)


def _await_gone(face: Face, rules: Rules, pod_uid: str) -> Steps:
    """True once the view shows ``pod_uid`` in no ledger, False after ``claim_wait_s``."""
    start: Times = yield Clock()
    deadline = start.monotonic + rules.claim_wait_s
    while face.node_of(pod_uid) is not None:
        now: Times = yield Clock()
        left = deadline - now.monotonic
        if left <= 0:
            return False
        yield WaitView(min(left, rules.claim_poll_s))
    return True


def _confirm(req: Request, claim: int) -> Steps:
    """Compare-and-set the claim after the ledger commit; False when another replica took
    it over, or a release tombstoned it, meanwhile. An unknown outcome is settled by
    reading the claim back (its token tells); ``TemporaryError`` when that fails too."""
    wrote = yield WriteClaim(req.key, req.token, last=claim)
    if isinstance(wrote, Wrote):
        return True
    if wrote is Outcome.LOST:
        return False
    entry: Entry | None = yield ReadClaim(req.key)
    return entry is not None and entry.value == req.token


def _holds_claim(req: Request, claim: int) -> Steps:
    """True when the claim is still this request's (its token at revision ``claim``)."""
    entry: Entry | None = yield ReadClaim(req.key)
    return entry is not None and entry.value == req.token and entry.revision == claim


def take_back(face: Face, rules: Rules, pod_uid: str, node: str) -> Steps:
    """Remove ``pod_uid``'s slices from ``node``'s ledger (no announcement: the pod was
    never answered from here). Raises ``Conflicts`` after ``max_attempts`` lost races."""
    lost: list[str] = []
    for _ in range(rules.max_attempts):
        yield Lock()
        held = face.ledger_at(node)  # that node's: the pod may be on another too
        if held is None or pod_uid not in held[0].pods():
            yield Unlock()
            return None
        ledger, base = held
        committed = yield from _commit(face, ledger.without(pod_uid), base)
        yield Unlock()
        if committed:
            return None
        lost.append(node)
    raise Conflicts(lost)


def _unclaim(key: str, claim: int | None, *, restore: bytes | None = None) -> Steps:
    """Delete the claim at revision ``claim`` if this request holds one, or put back the
    refusal marker ``restore`` it took over (so late copies of the request that was
    refused stay refused). A failure is left: the claim is taken over after
    ``claim_wait_s``."""
    if claim is None:
        return None
    if restore is not None:
        yield WriteClaim(key, restore, last=claim, ttl_s=protocol.REFUSAL_TTL_S)
    else:
        yield DeleteClaim(key, last=claim)
    return None


def _refuse(key: str, claim: int | None, reason: str) -> Steps:
    """Replace the claim held at revision ``claim`` by a refusal marker with ``reason``;
    a failure is left (taken over after ``claim_wait_s``, or deleted by the upkeep)."""
    if claim is not None:
        yield WriteClaim(key, protocol.refusal(reason), last=claim, ttl_s=protocol.REFUSAL_TTL_S)
    return None


def _unreserve(face: Face, namespace: str, pod_uid: str) -> Steps:
    """Drop ``pod_uid``'s quota charge, unless the pod holds slices (another replica
    placed it meanwhile)."""
    if face.node_of(pod_uid) is None:
        yield UnreserveQuota(namespace, pod_uid)
    return None


# -- release ---------------------------------------------------------------------------------


def release(face: Face, rules: Rules, pod_uid: str, key: str, *, final: bool = True) -> Steps:
    """Free exactly ``pod_uid``'s slices and charge, wherever the ledger holds them;
    returns ``Ack`` (``node`` None when it held nothing). The claim is made its tombstone
    first (``final``); ``final=False`` frees a Kubernetes reservation the same pod is
    placed again after: no tombstone, the held claim is deleted after the commit at the
    revision read before it. Raises ``Conflicts``, ``TemporaryError``, and ``Quarantined``
    when the pod's node is quarantined (its claim is left as it is, for the repair)."""
    yield CatchUp()
    held = face.find(pod_uid)
    reason = None if held is None else face.quarantine_reason(held[0].node)
    if held is not None and reason is not None:
        raise Quarantined(held[0].node, reason)
    # What the pod held before its tombstone: a placement another replica answered before
    # its holder confirmed it is taken back by that holder once the tombstone fails its
    # confirmation -- freed by this release all the same, and so answered.
    before = None if held is None else held[0].node
    count = 0 if held is None else sum(1 for x in held[0].slices if x.pod_uid == pod_uid)
    claim: int | None = None  # the held claim to delete after a release not final
    if final:
        yield from _tombstone(face, rules, pod_uid, key)
        yield CatchUp()  # every commit that landed before the tombstone
    else:
        entry: Entry | None = yield ReadClaim(key)
        if entry is not None:
            kind = protocol.decode_claim(entry.value).kind
            claim = entry.revision if kind is protocol.ClaimKind.HELD else None
    lost: list[str] = []
    for _ in range(rules.max_attempts):
        yield Lock()
        held = face.find(pod_uid)
        if held is None:
            yield Unlock()
            if final and before is not None:
                return events.Ack(pod_uid=pod_uid, node=before, slices=count)
            return events.Ack(pod_uid=pod_uid)
        ledger, base = held
        node = ledger.node
        mine = [s for s in ledger.slices if s.pod_uid == pod_uid]
        slices = len(mine)
        namespace = mine[0].namespace if mine else None
        committed = yield from _commit(face, ledger.without(pod_uid), base)
        if committed is None:  # learnt from the strict re-read
            now = face.find(pod_uid)
            committed = now is None or now[0].node != node
        yield Unlock()
        if committed:
            yield Announce(node, events.Release(pod_uid=pod_uid))
            if namespace is not None:
                yield from _unreserve(face, namespace, pod_uid)
            yield from _unclaim(key, claim)
            return events.Ack(pod_uid=pod_uid, node=node, slices=slices)
        lost.append(node)
    raise Conflicts(lost)


def _tombstone(face: Face, rules: Rules, pod_uid: str, key: str) -> Steps:
    """Write the tombstone of ``pod_uid`` in its claim (``protocol.on_release``): at once
    when the pod is placed, was refused or has no claim; after the placement under way
    settled, or stayed unchanged ``claim_wait_s``, when a request holds it. Raises
    ``TemporaryError`` when the write's answer is lost."""
    revision, since = -1, 0.0
    while True:
        entry: Entry | None = yield ReadClaim(key)
        claim = None if entry is None else protocol.decode_claim(entry.value)
        now: Times = yield Clock()
        rev = 0 if entry is None else entry.revision
        if rev != revision:
            revision, since = rev, now.monotonic
        step = protocol.on_release(
            claim,
            placed=face.find(pod_uid) is not None,
            unchanged_s=now.monotonic - since,
            claim_wait_s=rules.claim_wait_s,
        )
        if step is protocol.Releasing.FREE:
            return None
        if step is protocol.Releasing.WAIT:
            yield WaitView(rules.claim_poll_s)
            continue
        wrote = yield WriteClaim(
            key,
            protocol.TOMBSTONE,
            last=None if entry is None else rev,
            ttl_s=protocol.TOMBSTONE_TTL_S,
        )
        if wrote is Outcome.LOST:
            continue
        if wrote is Outcome.UNKNOWN:
            raise TemporaryError(
                f"pods bucket unavailable: the tombstone of {pod_uid} went unanswered"
            )
        return None
