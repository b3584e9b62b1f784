"""The commit protocol over interleavings: two or three replicas placing and releasing a
few pods on a small fleet through an in-memory bucket with compare-and-set revisions,
while Hypothesis shuffles their steps with clients that give up and re-send (with and
without the deadline header) or release, requests held in a paused replica's inbox, a
clock that runs out deadlines and claim waits, lost replies and crashes.

The replicas run the core's own steps (``services.scheduler.core.committing``, which the
adapter ``services.scheduler.adapters.bus`` runs on NATS): every operation they yield --
a read or write of a claim, a ledger compare-and-set, the commit lock, the clock -- is a
point where anything else may happen, and this test performs it on the in-memory buckets.
Several requests of one replica run at once, as on the bus, one at a time through the
commit lock. What is left out: views that lag the buckets (the view here reads the buckets
themselves; the adapter catches its view up before every decision that needs it). Claim
writes whose answer is lost (landed or not) are in.

Invariants, after every step: no device over its memory; no pod answered on two nodes; no
pod in two ledgers but for a commit its maker has not confirmed yet (or crashed before
confirming); every acknowledged placement in the ledger while no release was asked; no
placement answered after a release was acknowledged. When the run ends, every request
still in an inbox is handled (the late copies) and the upkeep's sweep runs, and then:
every acknowledged release is final, and a pod whose last answer was Unschedulable is in
no ledger.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from libshared import events
from libshared.ledgers import NodeLedger, PodCharge, Slice
from libshared.resources import ContainerRequest, PodRequest
from services.scheduler.core import committing, protocol

CLAIM_WAIT_S = 2.0
CLIENT_TIMEOUT_S = 3.0
MAX_ATTEMPTS = 3
NODES = ("n0", "n1")
MEMORY_MIB = 10  # one device a node
NEED_MIB = {"p0": 6, "p1": 5, "p2": 7}  # no two share a node: one of three finds no room
UIDS = tuple(NEED_MIB)

V = TypeVar("V")


class Bucket(Generic[V]):
    """A KV bucket of history 1: key -> (value, revision), revisions from one sequence
    (as a JetStream stream numbers its messages); a missing key has revision 0."""

    def __init__(self) -> None:
        self.seq = 0
        self.data: dict[str, tuple[V, int]] = {}

    def get(self, key: str) -> tuple[V, int] | None:
        return self.data.get(key)

    def revision(self, key: str) -> int:
        held = self.data.get(key)
        return 0 if held is None else held[1]

    def _put(self, key: str, value: V) -> int:
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq

    def create(self, key: str, value: V) -> int | None:
        return None if key in self.data else self._put(key, value)

    def update(self, key: str, value: V, *, last: int) -> int | None:
        return self._put(key, value) if self.revision(key) == last else None

    def delete(self, key: str, *, last: int) -> bool:
        if key not in self.data or self.revision(key) != last:
            return False
        del self.data[key]
        self.seq += 1
        return True


@dataclass(frozen=True)
class Answer:
    kind: str  # "placed", "unschedulable", "released" (an Ack)
    node: str | None = None
    reason: str = ""


@dataclass
class Copy:
    """One request on the bus: a schedule (with the client's deadline or without) or a
    release of ``uid``."""

    id: int
    kind: str  # "schedule" or "release"
    uid: str
    sent_at: float
    client_deadline: float | None = None


@dataclass
class Op:
    """One request in a replica's hands: the core's steps, the operation they wait on."""

    copy: Copy
    steps: committing.Steps
    pending: committing.Op | None = None
    started: bool = False
    lost: bool = False
    committed: set[tuple[str, str]] = field(default_factory=set)  # (uid, node) it committed


@dataclass
class Replica:
    name: str
    incarnation: int = 0
    inbox: list[Copy] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    requests: itertools.count[int] = field(default_factory=itertools.count)
    locked_by: Op | None = None  # the request holding the commit lock


RULES = committing.Rules(max_attempts=MAX_ATTEMPTS, claim_wait_s=CLAIM_WAIT_S, explain=False)


def request(uid: str) -> PodRequest:
    return PodRequest(
        uid=uid,
        namespace="default",
        name=uid,
        containers=(
            ContainerRequest(
                name="main", index=0, init=False, gpu_count=1, memory_mib=NEED_MIB[uid]
            ),
        ),
    )


class World:
    """The buckets and the clock; a replica's view of them (``core.committing.Face``,
    always caught up); the operations of the core's steps performed on them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.claims: Bucket[bytes] = Bucket()
        self.ledgers: Bucket[NodeLedger] = Bucket()
        # (uid, node) of every commit whose request has not answered or given it back yet
        self.unconfirmed: set[tuple[str, str]] = set()
        # the next claim write's answer is lost: it lands (True) or not (False)
        self.lose_next_write: bool | None = None

    def node_ledger(self, node: str) -> NodeLedger:
        held = self.ledgers.get(node)
        return NodeLedger(node=node) if held is None else held[0]

    def ledger(self, node: str) -> set[str]:
        return self.node_ledger(node).pods()

    def holders(self, uid: str) -> list[str]:
        return [n for n in NODES if uid in self.ledger(n)]

    def free_mib(self, node: str) -> int:
        return MEMORY_MIB - sum(s.memory_mib for s in self.node_ledger(node).slices)

    # -- the view (committing.Face) -------------------------------------------------------

    @property
    def seen_seq(self) -> int:
        return self.ledgers.seq

    def decide(
        self, pod: PodRequest, *, nodes: list[str] | None, explain: bool
    ) -> events.Placement | events.Unschedulable:
        held = self.holders(pod.uid)
        fits = held or [n for n in NODES if self.free_mib(n) >= NEED_MIB[pod.uid]]
        if not fits:
            return events.Unschedulable(pod_uid=pod.uid, reason="0/2 nodes fit")
        if held:
            placed = committing.held_placement(self, pod)
            assert placed is not None
            return placed
        return events.Placement(
            pod_uid=pod.uid,
            namespace=pod.namespace,
            pod=pod.name,
            node=fits[0],
            slices=(
                Slice(
                    pod_uid=pod.uid,
                    namespace=pod.namespace,
                    pod=pod.name,
                    container="main",
                    container_index=0,
                    uuid=f"GPU-{fits[0]}",
                    device_index=0,
                    memory_mib=NEED_MIB[pod.uid],
                    cores_percent=0,
                ),
            ),
            charge=PodCharge(pod_uid=pod.uid),
        )

    def node_of(self, pod_uid: str) -> str | None:
        held = self.holders(pod_uid)
        return held[0] if held else None

    def find(self, pod_uid: str) -> tuple[NodeLedger, int] | None:
        node = self.node_of(pod_uid)
        return None if node is None else (self.node_ledger(node), self.ledgers.revision(node))

    def ledger_at(self, node: str) -> tuple[NodeLedger, int] | None:
        return self.node_ledger(node), self.ledgers.revision(node)

    def ledger_with(self, placement: events.Placement) -> tuple[NodeLedger, int]:
        cur = self.node_ledger(placement.node).without(placement.pod_uid)
        ledger = NodeLedger(node=cur.node, slices=(*cur.slices, *placement.slices))
        return ledger, self.ledgers.revision(placement.node)

    def quarantine_reason(self, node: str) -> str | None:
        return None

    # -- the operations (what adapters.bus.Replica._perform does on NATS) -----------------

    def perform(self, op: committing.Op) -> object:
        match op:
            case committing.Clock():
                return committing.Times(monotonic=self.now, wall=self.now)
            case committing.ReadClaim(key=key):
                entry = self.claims.get(key)
                return None if entry is None else committing.Entry(*entry)
            case committing.WriteClaim(key=key, value=value, last=last):
                lands, self.lose_next_write = self.lose_next_write, None
                if lands is not None:
                    if lands:
                        self.perform(op)
                    return committing.Outcome.UNKNOWN
                if last is None:
                    rev = self.claims.create(key, value)
                else:
                    rev = self.claims.update(key, value, last=last)
                return committing.Outcome.LOST if rev is None else committing.Wrote(rev)
            case committing.DeleteClaim(key=key, last=last):
                deleted = self.claims.delete(key, last=last)
                return committing.Wrote(0) if deleted else committing.Outcome.LOST
            case committing.CommitLedger(ledger=ledger, last=last):
                before = self.ledger(ledger.node)
                if self.ledgers.update(ledger.node, ledger, last=last) is None:
                    return False
                after = ledger.pods()
                self.unconfirmed |= {(uid, ledger.node) for uid in after - before}
                self.unconfirmed -= {(uid, ledger.node) for uid in before - after}
                return True
        # CatchUp, Reread, WaitView: the view is always caught up; Announce, quotas, notes:
        # nothing here reads them
        return None


Face: type[committing.Face] = World  # the world is the view the protocol reads


class Interleavings(RuleBasedStateMachine):
    replica_count = 2

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.replicas = [Replica(name=f"r{i}") for i in range(self.replica_count)]
        self.copies = itertools.count()
        self.waiting: dict[str, Copy] = {}  # the copy each client waits for
        self.sent_last: dict[str, int] = {}  # uid -> id of the last schedule copy sent
        self.last_answer: dict[str, tuple[int, Answer]] = {}  # uid -> (copy id, answer)
        self.answered_nodes: dict[str, set[str]] = {}
        self.release_asked: set[str] = set()
        self.release_acked: set[str] = set()

    # -- clients ---------------------------------------------------------------------------

    @rule(
        uid=st.sampled_from(UIDS),
        to=st.integers(0, 2),
        with_deadline=st.booleans(),
        held=st.booleans(),
    )
    def send_schedule(self, uid: str, to: int, with_deadline: bool, held: bool) -> None:
        """A client sends a schedule request; ``held``: its replica is paused, the copy
        waits in its inbox."""
        # a client sends again while it has no answer; an answer ends it (a pod answered
        # Unschedulable is given up on, a placed one is only released)
        if not self._gave_up(uid) or uid in self.last_answer or uid in self.release_asked:
            return
        copy = Copy(
            id=next(self.copies),
            kind="schedule",
            uid=uid,
            sent_at=self.world.now,
            client_deadline=self.world.now + CLIENT_TIMEOUT_S if with_deadline else None,
        )
        self.replicas[to % len(self.replicas)].inbox.append(copy)
        self.waiting[uid] = copy
        self.sent_last[uid] = copy.id
        if not held:
            self.run_through(to)

    @rule(uid=st.sampled_from(UIDS), to=st.integers(0, 2), held=st.booleans())
    def send_release(self, uid: str, to: int, held: bool) -> None:
        if not self._gave_up(uid):
            return
        copy = Copy(id=next(self.copies), kind="release", uid=uid, sent_at=self.world.now)
        self.replicas[to % len(self.replicas)].inbox.append(copy)
        self.waiting[uid] = copy
        self.release_asked.add(uid)
        if not held:
            self.run_through(to)

    def _gave_up(self, uid: str) -> bool:
        """True when the client of ``uid`` waits for nothing (it gives up on a request
        after ``CLIENT_TIMEOUT_S``)."""
        copy = self.waiting.get(uid)
        if copy is not None and self.world.now > copy.sent_at + CLIENT_TIMEOUT_S:
            del self.waiting[uid]
        return uid not in self.waiting

    @rule(seconds=st.sampled_from([0.25, 1.0, 2.5, 4.0]))
    def tick(self, seconds: float) -> None:
        self.world.now += seconds

    # -- replicas --------------------------------------------------------------------------

    @rule(at=st.integers(0, 2))
    def handle_next(self, at: int) -> None:
        r = self.replicas[at % len(self.replicas)]
        if not r.inbox:
            return
        copy = r.inbox.pop(0)
        if copy.kind == "schedule":
            req = committing.Request(
                pod=request(copy.uid),
                key=copy.uid,
                token=protocol.token(r.name, f"{r.incarnation}.{next(r.requests)}"),
                deadline=protocol.door_deadline(copy.client_deadline, now=self.world.now),
                stale_copy_possible=copy.client_deadline is None,
            )
            steps = committing.schedule(self.world, RULES, req)
        else:
            steps = committing.release(self.world, RULES, copy.uid, copy.uid)
        r.ops.append(Op(copy=copy, steps=steps))

    @rule(at=st.integers(0, 2), which=st.integers(0, 7))
    def step(self, at: int, which: int) -> None:
        r = self.replicas[at % len(self.replicas)]
        if r.ops:
            self._advance(r, r.ops[which % len(r.ops)])

    @rule(at=st.integers(0, 2))
    def run_through(self, at: int) -> None:
        """Replica ``at`` handles its inbox and runs its operations on, up to a wait."""
        r = self.replicas[at % len(self.replicas)]
        while r.inbox:
            self.handle_next(at)
        for _ in range(30):
            if not r.ops:
                return
            for op in list(r.ops):
                self._advance(r, op)

    @rule(at=st.integers(0, 2), which=st.integers(0, 7))
    def lose_reply(self, at: int, which: int) -> None:
        r = self.replicas[at % len(self.replicas)]
        if r.ops:
            r.ops[which % len(r.ops)].lost = True

    @rule(lands=st.booleans())
    def lose_a_write_answer(self, lands: bool) -> None:
        """The next claim write's answer never comes (a NATS timeout); it landed or not."""
        self.world.lose_next_write = lands

    @rule(at=st.integers(0, 2))
    def crash(self, at: int) -> None:
        r = self.replicas[at % len(self.replicas)]
        r.ops, r.inbox = [], []  # a restarted replica: requests in hand are gone
        r.locked_by = None
        r.incarnation += 1

    def _advance(self, r: Replica, op: Op) -> None:
        """Perform the operation ``op`` waits on and run its steps to the next one (a
        request waiting for the commit lock another holds stays where it is)."""
        if isinstance(op.pending, committing.Lock) and r.locked_by not in (None, op):
            return
        try:
            if not op.started:
                op.started = True
                op.pending = next(op.steps)
                return
            result = self._perform(r, op)
            op.pending = op.steps.send(result)
        except StopIteration as done:
            self._end(r, op)
            self._deliver(op, done.value)
        except (committing.Expired, committing.Conflicts, committing.TemporaryError):
            self._end(r, op)  # answered with an error, or not at all

    def _perform(self, r: Replica, op: Op) -> object:
        pending = op.pending
        if isinstance(pending, committing.Lock):
            r.locked_by = op
            return None
        if isinstance(pending, committing.Unlock):
            r.locked_by = None
            return None
        assert pending is not None
        if not isinstance(pending, committing.CommitLedger):
            return self.world.perform(pending)
        node = pending.ledger.node
        before = self.world.ledger(node)
        result = self.world.perform(pending)
        if result:
            op.committed |= {(uid, node) for uid in pending.ledger.pods() - before}
        return result

    def _end(self, r: Replica, op: Op) -> None:
        r.ops.remove(op)
        if r.locked_by is op:
            r.locked_by = None

    def _deliver(self, op: Op, value: object) -> None:
        uid = op.copy.uid
        if isinstance(value, events.Placement):
            answer = Answer("placed", value.node)
            if (uid, value.node) in op.committed:
                self.world.unconfirmed.discard((uid, value.node))  # its maker answered it
            assert uid not in self.release_acked, f"{uid} placed after its release was acked"
        elif isinstance(value, events.Unschedulable):
            answer = Answer("unschedulable", reason=value.reason)
        else:
            assert isinstance(value, events.Ack)
            answer = Answer("released", value.node)
        if op.lost or self.waiting.get(uid) is not op.copy:
            return  # nobody reads it
        if self.world.now > op.copy.sent_at + CLIENT_TIMEOUT_S:
            return
        del self.waiting[uid]
        if answer.kind == "released":
            self.release_acked.add(uid)
            return
        self.last_answer[uid] = (op.copy.id, answer)
        if answer.kind == "placed":
            assert answer.node is not None
            self.answered_nodes.setdefault(uid, set()).add(answer.node)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_device_over_its_memory(self) -> None:
        for n in NODES:
            assert self.world.free_mib(n) >= 0, (n, self.world.ledger(n))

    @invariant()
    def no_pod_answered_on_two_nodes(self) -> None:
        for uid, nodes in self.answered_nodes.items():
            assert len(nodes) <= 1, (uid, nodes)

    @invariant()
    def no_pod_in_two_ledgers_but_for_an_unconfirmed_commit(self) -> None:
        for uid in UIDS:
            doomed = {n for u, n in self.world.unconfirmed if u == uid}
            assert len(set(self.world.holders(uid)) - doomed) <= 1, (uid, self.world.holders(uid))

    @invariant()
    def every_acknowledged_placement_is_in_the_ledger(self) -> None:
        for uid, nodes in self.answered_nodes.items():
            if uid not in self.release_asked:
                assert all(uid in self.world.ledger(n) for n in nodes), (uid, nodes)

    def _finish_ops(self) -> None:
        for _ in range(200):
            busy = False
            for r in self.replicas:
                for op in list(r.ops):
                    busy = True
                    self._advance(r, op)
            self.world.now += 1.0
            if not busy:
                return
        raise AssertionError("an operation never finished")

    def teardown(self) -> None:
        # Every operation under way finishes; the pods not answered Unschedulable are
        # released, so there is room; then every request still queued is handled (the
        # late copies), and the upkeep releases whatever sits behind a tombstone.
        self.world.now += 1000.0
        self.world.lose_next_write = None
        self._finish_ops()
        refused = {
            uid
            for uid, (copy_id, answer) in self.last_answer.items()
            if answer.kind == "unschedulable" and copy_id == self.sent_last[uid]
        }
        for uid in UIDS:
            if uid not in refused and uid not in self.release_asked:
                _release(self.world, uid)
                self.release_asked.add(uid)
        for r in self.replicas:
            while r.inbox:
                self.handle_next(self.replicas.index(r))
        self._finish_ops()
        for uid in UIDS:
            entry = self.world.claims.get(uid)
            dead = entry is not None and (
                protocol.decode_claim(entry[0]).kind is protocol.ClaimKind.RELEASED
            )
            if dead and self.world.holders(uid):
                _release(self.world, uid)
        for uid in self.release_acked:
            assert not self.world.holders(uid), f"{uid} came back after its release was acked"
        for uid in refused - self.release_asked:
            assert not self.world.holders(uid), f"{uid} answered Unschedulable, then placed"


def _drain(world: World, steps: committing.Steps) -> object:
    """Run an operation alone to its end, the clock running (no other holds the lock)."""
    try:
        op = next(steps)
        for _ in range(1000):
            op = steps.send(world.perform(op))
            world.now += 0.5
    except StopIteration as done:
        return done.value
    raise AssertionError("an operation never finished")


def _release(world: World, uid: str) -> object:
    return _drain(world, committing.release(world, RULES, uid, uid))


class ThreeReplicas(Interleavings):
    replica_count = 3


RUNS = settings(
    database=None,
    max_examples=int(os.environ.get("VSLICE_TEST_PROTOCOL_EXAMPLES", "200")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [Interleavings, ThreeReplicas], ids=["two", "three"])
def test_replicas_interleaved_with_releases_deadlines_lost_replies_and_crashes_keep_the_ledger(
    machine: Callable[[], RuleBasedStateMachine],
) -> None:
    run_state_machine_as_test(machine, settings=RUNS)


def _settle(m: Interleavings, at: int) -> None:
    m.run_through(at)
    assert not m.replicas[at].ops


@pytest.mark.parametrize("with_deadline", [False, True], ids=["no header", "header"])
def test_a_late_copy_of_a_request_whose_pod_was_released_is_refused(with_deadline: bool) -> None:
    m = Interleavings()
    m.send_schedule("p0", 0, with_deadline, held=True)  # replica 0 paused with it
    m.tick(4.0)  # the client gives up, releases through replica 1
    m.send_release("p0", 1, held=False)
    assert m.release_acked == {"p0"}
    _settle(m, 0)  # replica 0 wakes up
    assert m.world.holders("p0") == []
    m.teardown()


def test_a_late_copy_without_a_deadline_repeats_the_unschedulable_answer() -> None:
    m = Interleavings()
    for uid in ("p0", "p2"):  # the fleet is full
        m.send_schedule(uid, 0, with_deadline=True, held=False)
    m.send_schedule("p1", 1, with_deadline=False, held=True)
    m.tick(4.0)
    m.send_schedule("p1", 0, with_deadline=True, held=False)
    assert m.last_answer["p1"][1].kind == "unschedulable"
    for uid in ("p0", "p2"):  # room again
        m.send_release(uid, 0, held=False)
    _settle(m, 1)
    assert m.world.holders("p1") == []
    m.teardown()


def test_a_slow_commit_after_the_release_tombstoned_its_claim_is_taken_back() -> None:
    m = Interleavings()
    m.send_schedule("p0", 0, with_deadline=False, held=True)
    m.handle_next(0)
    r = m.replicas[0]
    while m.world.claims.get("p0") is None or not m.world.claims.data["p0"][0].startswith(b"r0"):
        m.step(0, 0)  # up to its claim
    m.tick(4.0)  # the client gives up
    m.send_release("p0", 1, held=False)  # waits for the placement under way...
    assert m.release_acked == set()
    m.tick(2.5)  # ...as long as the claim wait, then tombstones the claim
    _settle(m, 1)
    assert m.release_acked == {"p0"}
    _settle(m, 0)  # commits, fails to confirm, gives its slices back
    assert m.world.holders("p0") == [] and not r.ops
    m.teardown()
