"""The commit protocol over interleavings: two or three replicas placing and releasing a
few pods on a small fleet through an in-memory bucket with compare-and-set revisions,
while Hypothesis shuffles their steps with clients that give up and re-send (with and
without the deadline header) or release, requests held in a paused replica's inbox, a
clock that runs out deadlines and claim waits, lost replies and crashes.

The replicas are step-by-step transcriptions of ``services.scheduler.adapters.bus``'s
schedule and release: every ``yield`` is a point where anything else may happen, and every
choice is made by ``services.scheduler.core.protocol``. What they leave out: views that
lag the buckets (a step here reads the bucket itself; the adapter catches its view up
before every decision that needs it) and several commits of one replica at once.

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
from collections.abc import Callable, Generator
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

from services.scheduler.core import protocol

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
    copy: Copy
    steps: Generator[None, None, Answer | None]
    lost: bool = False


@dataclass
class Replica:
    name: str
    incarnation: int = 0
    inbox: list[Copy] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    requests: itertools.count[int] = field(default_factory=itertools.count)


Step = Generator[None, None, Answer | None]


class World:
    """The buckets, the clock, and the steps of a replica's schedule and release."""

    def __init__(self) -> None:
        self.now = 0.0
        self.claims: Bucket[bytes] = Bucket()
        self.ledgers: Bucket[frozenset[str]] = Bucket()
        # (uid, node) of every commit its maker has not confirmed or given back yet
        self.unconfirmed: set[tuple[str, str]] = set()

    def ledger(self, node: str) -> frozenset[str]:
        held = self.ledgers.get(node)
        return frozenset() if held is None else held[0]

    def holders(self, uid: str) -> list[str]:
        return [n for n in NODES if uid in self.ledger(n)]

    def free_mib(self, node: str) -> int:
        return MEMORY_MIB - sum(NEED_MIB[u] for u in self.ledger(node))

    # -- schedule (Replica.schedule) --------------------------------------------------

    def schedule(self, r: Replica, copy: Copy) -> Step:
        uid, key = copy.uid, copy.uid
        stale = copy.client_deadline is None
        deadline = protocol.door_deadline(copy.client_deadline, now=self.now)
        token = protocol.token(r.name, f"{r.incarnation}.{next(r.requests)}")
        taken: bytes | None = None  # the refusal marker this request took over
        claim: int | None = None
        claimed_at = 0.0
        for _ in range(MAX_ATTEMPTS):
            if claim is None:
                if not protocol.may_commit(deadline, now=self.now):
                    return None  # expired: no answer
                claimed_at = self.now
                placed_before = bool(self.holders(uid))
                got = yield from self._claim(uid, key, token, stale)
                if isinstance(got, Answer):
                    return got
                if got is None:
                    continue
                claim, taken = got
            held = self.holders(uid)
            if held:
                # claimed here, yet placed: a doomed commit of a former holder (placed
                # after the claim) is taken back; one placed before is adopted
                if not placed_before:
                    yield from self._take_back(uid, held[0])
                    continue
                self.claims.update(key, token, last=claim)
                return Answer("placed", held[0])
            fits = [n for n in NODES if self.free_mib(n) >= NEED_MIB[uid]]
            if not fits:
                yield
                reason = "0/2 nodes fit"
                self.claims.update(key, protocol.refusal(reason), last=claim)
                return Answer("unschedulable", reason=reason)
            node = fits[0]
            base = self.ledgers.revision(node)
            value = self.ledger(node) | {uid}
            yield  # a decision and its commit are apart: the replica may stall here
            if not protocol.may_commit(deadline, now=self.now):
                if taken is not None:
                    self.claims.update(key, taken, last=claim)
                else:
                    self.claims.delete(key, last=claim)
                return None
            if self.ledgers.update(node, value, last=base) is None:
                yield
                continue
            self.unconfirmed.add((uid, node))
            yield
            slow = protocol.must_confirm(elapsed_s=self.now - claimed_at, claim_wait_s=CLAIM_WAIT_S)
            if not slow or self.claims.update(key, token, last=claim) is not None:
                self.unconfirmed.discard((uid, node))
                return Answer("placed", node)
            yield
            # taken over or tombstoned meanwhile: give the slices back, answer as the
            # claim says
            yield from self._take_back(uid, node)
            claim, taken = None, None
            got = yield from self._await_holder(uid, key, token, stale)
            if isinstance(got, Answer):
                return got
            if got is not None:
                claim, taken = got
        reason = "lost the ledger race"
        if claim is not None:
            self.claims.update(key, protocol.refusal(reason), last=claim)
        return Answer("unschedulable", reason=reason)

    def _claim(
        self, uid: str, key: str, token: bytes, stale: bool
    ) -> Generator[None, None, tuple[int, bytes | None] | Answer | None]:
        rev = self.claims.create(key, token)
        yield
        if rev is not None:
            return rev, None
        return (yield from self._await_holder(uid, key, token, stale))

    def _await_holder(
        self, uid: str, key: str, token: bytes, stale: bool
    ) -> Generator[None, None, tuple[int, bytes | None] | Answer | None]:
        revision, since = -1, 0.0
        while True:
            entry = self.claims.get(key)
            claim = None if entry is None else protocol.decode_claim(entry[0])
            found = protocol.on_claim(claim, mine=token, stale_copy_possible=stale)
            if found is protocol.Found.REFUSE:
                assert claim is not None
                return Answer("unschedulable", reason=protocol.refused_reason(uid, claim))
            held = self.holders(uid)
            if held:
                return Answer("placed", held[0])
            if entry is None:
                return None
            if found is protocol.Found.OURS:
                return entry[1], None
            if found is protocol.Found.TAKE_OVER:
                rev = self.claims.update(key, token, last=entry[1])
                yield
                if rev is not None:
                    return rev, entry[0]
                continue
            if entry[1] != revision:
                revision, since = entry[1], self.now
            elif protocol.may_take_over(
                unchanged_s=self.now - since,
                claim_wait_s=CLAIM_WAIT_S,
                placed=bool(self.holders(uid)),
            ):
                rev = self.claims.update(key, token, last=revision)
                yield
                if rev is not None:
                    return rev, None
                continue
            yield  # wait for the holder

    def _take_back(self, uid: str, node: str) -> Generator[None, None, None]:
        for _ in range(MAX_ATTEMPTS * 4):
            if uid not in self.ledger(node):
                break
            base = self.ledgers.revision(node)
            yield
            if self.ledgers.update(node, self.ledger(node) - {uid}, last=base) is not None:
                break
        self.unconfirmed.discard((uid, node))

    # -- release (Replica.release) ------------------------------------------------------

    def release(self, uid: str) -> Step:
        key = uid
        revision, since = -1, 0.0
        while True:  # _tombstone
            entry = self.claims.get(key)
            claim = None if entry is None else protocol.decode_claim(entry[0])
            rev = 0 if entry is None else entry[1]
            if rev != revision:
                revision, since = rev, self.now
            step = protocol.on_release(
                claim,
                placed=bool(self.holders(uid)),
                unchanged_s=self.now - since,
                claim_wait_s=CLAIM_WAIT_S,
            )
            yield
            if step is protocol.Releasing.FREE:
                break
            if step is protocol.Releasing.WAIT:
                continue
            if entry is None:
                written = self.claims.create(key, protocol.TOMBSTONE)
            else:
                written = self.claims.update(key, protocol.TOMBSTONE, last=rev)
            yield
            if written is not None:
                break
        for _ in range(MAX_ATTEMPTS * 4):
            held = self.holders(uid)
            if not held:
                return Answer("released")
            node = held[0]
            base = self.ledgers.revision(node)
            value = self.ledger(node) - {uid}
            yield
            if self.ledgers.update(node, value, last=base) is not None:
                return Answer("released", node)
        return None  # conflicts: an error answer, no ack


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
        steps = (
            self.world.schedule(r, copy)
            if copy.kind == "schedule"
            else self.world.release(copy.uid)
        )
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

    @rule(at=st.integers(0, 2))
    def crash(self, at: int) -> None:
        r = self.replicas[at % len(self.replicas)]
        r.ops, r.inbox = [], []  # a restarted replica: requests in hand are gone
        r.incarnation += 1

    def _advance(self, r: Replica, op: Op) -> None:
        try:
            next(op.steps)
        except StopIteration as done:
            r.ops.remove(op)
            if done.value is not None:
                self._deliver(op, done.value)

    def _deliver(self, op: Op, answer: Answer) -> None:
        uid = op.copy.uid
        if answer.kind == "placed":
            assert uid not in self.release_acked, f"{uid} placed after its release was acked"
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
        self._finish_ops()
        refused = {
            uid
            for uid, (copy_id, answer) in self.last_answer.items()
            if answer.kind == "unschedulable" and copy_id == self.sent_last[uid]
        }
        for uid in UIDS:
            if uid not in refused and uid not in self.release_asked:
                _drain(self.world, self.world.release(uid))
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
                _drain(self.world, self.world.release(uid))
        for uid in self.release_acked:
            assert not self.world.holders(uid), f"{uid} came back after its release was acked"
        for uid in refused - self.release_asked:
            assert not self.world.holders(uid), f"{uid} answered Unschedulable, then placed"


def _drain(world: World, steps: Step) -> Answer | None:
    """Run an operation alone to its end, the clock running."""
    for _ in range(1000):
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        world.now += 0.5
    raise AssertionError("an operation never finished")


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
