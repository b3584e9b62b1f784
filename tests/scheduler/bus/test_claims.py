"""One pod UID, one node: replicas deciding the same pod at the same moment agree through
its claim in ``<prefix>-pods``, a dead holder's claim is taken over, release clears it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.subjects import pod_key
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus, upkeep
from services.scheduler.core import committing, protocol
from services.scheduler.settings import Settings
from tests.bus import helpers


@contextlib.asynccontextmanager
async def replicas(
    settings: BusSettings, count: int, *, claim_wait_s: float = 2.0, max_in_flight: int = 32
) -> AsyncIterator[list[bus.Replica]]:
    """``count`` replicas in this process, each on its own connection, called directly
    (not through the queue group) so that all of them get the same request."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(count):
            nc = await connecting.connect(settings, name=f"r{i}")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            s = Settings(bus=settings, name=f"r{i}", policy="hami")
            replica = bus.Replica(
                nc=nc,
                js=js,
                bus=await connecting.ensure_bus(js, settings),
                subjects=settings.subjects,
                scheduler=scheduler_app.build_scheduler(s),
                name=s.name,
                claim_wait_s=claim_wait_s,
                max_in_flight=max_in_flight,
            )
            await replica.start()
            out.append(replica)
        yield out


async def test_the_same_pod_sent_to_three_replicas_at_once_is_placed_exactly_once(
    nc: Client, bus_settings: BusSettings
) -> None:
    # many small nodes, so that replicas with stale views would pick different ones
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=6, gpus=1, split=100))
    async with replicas(bus_settings, 3) as rs:
        for i in range(60):
            pod = helpers.pod(f"p{i}", memory_mib=100 + i)
            answers = await asyncio.gather(*(r.schedule(pod) for r in rs))
            assert all(isinstance(a, events.Placement) for a in answers), answers
            assert len(set(answers)) == 1, answers
        ledgers = await helpers.ledgers(nc, bus_settings)
        holders: dict[str, list[str]] = {}
        for node, ledger in ledgers.items():
            for slice_ in ledger.slices:
                holders.setdefault(slice_.pod_uid, []).append(node)
        assert sorted(holders) == sorted(f"p{i}" for i in range(60))
        assert all(len(nodes) == 1 for nodes in holders.values()), holders
        assert sum(r.stats.claims_lost for r in rs) > 0  # the races did happen


async def test_a_claim_left_by_a_dead_replica_is_taken_over_after_the_claim_wait(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    await opened.pods.create(pod_key("orphan"), b"node-1")  # claimed, never committed
    async with replicas(bus_settings, 1, claim_wait_s=0.3) as (r,):
        started = time.monotonic()
        answer = await r.schedule(helpers.pod("orphan", memory_mib=1000))
        assert isinstance(answer, events.Placement)
        assert 0.3 <= time.monotonic() - started < 3.0
        assert r.stats.takeovers == 1
        claim = await opened.pods.get(pod_key("orphan"))
        assert (claim.value or b"").startswith(b"r0 ")  # the taker's token replaced it


async def test_release_leaves_a_tombstone_that_refuses_the_uid_until_the_upkeep_deletes_it(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 1, claim_wait_s=5.0) as (r,):
        first = await r.schedule(helpers.pod("again", memory_mib=1000))
        assert isinstance(first, events.Placement)
        assert (await r.release("again")).node == "node-0"
        claim = await opened.pods.get(pod_key("again"))
        assert protocol.decode_claim(claim.value or b"").kind is protocol.ClaimKind.RELEASED
        started = time.monotonic()
        late = await r.schedule(helpers.pod("again", memory_mib=1000))
        assert isinstance(late, events.Unschedulable) and "was released" in late.reason
        # refused at once: no wait for a holder (that would take claim_wait_s, 5 s)
        assert time.monotonic() - started < 4.0
        assert (await helpers.ledgers(nc, bus_settings))["node-0"].slices == ()
        # once the tombstone outlived its TTL the upkeep deletes it: the UID may come back
        keep = upkeep.Upkeep(replica=r, leases=opened.pods, claims=opened.pods)
        keep.tombstone_ttl_s = 0.0
        await keep.delete_orphan_claims(now=time.monotonic())
        assert isinstance(await r.schedule(helpers.pod("again", memory_mib=1000)), events.Placement)


async def test_a_reservation_freed_to_be_placed_again_leaves_no_tombstone(
    nc: Client, bus_settings: BusSettings
) -> None:
    # the Kubernetes extender frees a reservation kube-scheduler moved or that expired
    # unbound, and places the same pod again: that release is not final
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    async with replicas(bus_settings, 1) as (r,):
        assert isinstance(await r.schedule(helpers.pod("moved", memory_mib=1000)), events.Placement)
        ack = await r.release("moved", final=False)
        assert (ack.node, ack.slices) == ("node-0", 1)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await opened.pods.get(pod_key("moved"))  # claim deleted, no tombstone
        again = await r.schedule(helpers.pod("moved", memory_mib=2000))
        assert isinstance(again, events.Placement), again
        # the pod's final release (deleted from the API) leaves the tombstone
        assert (await r.release("moved")).slices == 1
        late = await r.schedule(helpers.pod("moved", memory_mib=1000))
        assert isinstance(late, events.Unschedulable) and "was released" in late.reason
        assert (await helpers.ledgers(nc, bus_settings))["node-0"].slices == ()


def test_pod_keys_are_uids_when_valid_and_hashes_otherwise() -> None:
    assert pod_key("0f5c-11ee") == "0f5c-11ee"
    assert pod_key("a.b c").startswith("h-") and len(pod_key("a.b c")) == 66
    assert pod_key("h-x") != "h-x"


async def test_a_release_racing_a_re_schedule_of_its_uid_ends_with_the_pod_released(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1))
    opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
    key = pod_key("raced")
    async with replicas(bus_settings, 1) as (r,):
        assert isinstance(await r.schedule(helpers.pod("raced", memory_mib=1000)), events.Placement)
        read = (await opened.pods.get(key)).revision
        taken: list[BaseException] = []

        async def re_claimed_meanwhile(op: committing.Op, perform: bus.Perform) -> object:
            # between the release's tombstone and its ledger commit another replica
            # re-scheduling the same UID tries to take the claim it read before over
            if isinstance(op, committing.CommitLedger):
                try:
                    await opened.pods.update(key, b"other-replica 0", last=read)
                except nats.js.errors.KeyWrongLastSequenceError as exc:
                    taken.append(exc)
            return await perform(op)

        r.interpose = re_claimed_meanwhile
        assert (await r.release("raced")).node == "node-0"
        assert len(taken) == 1  # the tombstone came first: the take-over lost
        claim = await opened.pods.get(key)
        assert protocol.decode_claim(claim.value or b"").kind is protocol.ClaimKind.RELEASED
        assert (await helpers.ledgers(nc, bus_settings))["node-0"].slices == ()


async def test_a_replica_handles_up_to_max_in_flight_requests_at_once(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=2, split=10))
    async with replicas(bus_settings, 1, max_in_flight=3) as (r,):
        entered, gate = 0, asyncio.Event()

        async def held_at_the_claim(op: committing.Op, perform: bus.Perform) -> object:
            nonlocal entered
            if isinstance(op, committing.WriteClaim) and op.last is None:  # the claim
                entered += 1
                await gate.wait()
            return await perform(op)

        r.interpose = held_at_the_claim
        sent = [
            asyncio.create_task(
                helpers.schedule(nc, bus_settings, helpers.pod(f"p{i}", memory_mib=500))
            )
            for i in range(5)
        ]
        deadline = time.monotonic() + 10
        while entered < 3:
            assert time.monotonic() < deadline, f"only {entered} requests in hand"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert entered == 3  # three in hand at once; the other two wait for a slot
        gate.set()
        answers = await asyncio.gather(*sent)
        assert all(isinstance(a, events.Placement) for a in answers) and entered == 5
        assert len({(a.node, a.slices[0].uuid, a.pod_uid) for a in answers}) == 5


async def test_a_claim_whose_create_answer_was_lost_is_settled_by_reading_it_back(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1))
    async with replicas(bus_settings, 1, claim_wait_s=5.0) as (r,):
        create = r.bus.pods.create

        async def lands_but_times_out(key: str, value: bytes) -> int:
            await create(key, value)
            raise nats.errors.TimeoutError

        r.bus.pods.create = lands_but_times_out  # type: ignore[method-assign]
        started = time.monotonic()
        placed = await r.schedule(helpers.pod("lost-answer", memory_mib=1000))
        assert isinstance(placed, events.Placement)
        assert time.monotonic() - started < 2.0  # no wait for its own claim to go stale
        assert r.stats.takeovers == 0 and r.stats.claims_lost == 0


async def test_a_fast_commit_writes_the_claim_once_and_a_slow_one_confirms_it(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1))
    js = nc.jetstream()
    stream = f"KV_{bus_settings.subjects.pods_bucket}"
    async with replicas(bus_settings, 1, claim_wait_s=0.4) as (r,):
        assert isinstance(await r.schedule(helpers.pod("fast", memory_mib=1000)), events.Placement)
        assert (await js.stream_info(stream)).state.last_seq == 1  # the create alone

        async def slow(op: committing.Op, perform: bus.Perform) -> object:
            if isinstance(op, committing.CommitLedger):
                await asyncio.sleep(0.3)  # past half the claim wait
            return await perform(op)

        r.interpose = slow
        assert isinstance(await r.schedule(helpers.pod("slow", memory_mib=1000)), events.Placement)
        assert (await js.stream_info(stream)).state.last_seq == 3  # create and confirmation


async def test_a_holder_that_commits_after_its_claim_was_taken_over_gives_its_slices_back(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=2, gpus=1, split=10))
    async with replicas(bus_settings, 2, claim_wait_s=0.3) as (stalled, other):
        # the stalled holder places on node-0, the taker (which does not offer it) on
        # node-1, so both commits land
        other.view.cluster.withdraw_node("node-0")
        gate = asyncio.Event()

        async def stalls(op: committing.Op, perform: bus.Perform) -> object:
            if isinstance(op, committing.CommitLedger):
                await gate.wait()  # held until the other replica took the claim over
            return await perform(op)

        stalled.interpose = stalls
        pod = helpers.pod("contested", memory_mib=1000)
        first = asyncio.create_task(stalled.schedule(pod))
        await asyncio.sleep(0.05)
        second = await other.schedule(pod)  # waits out the claim, takes it over, places
        assert isinstance(second, events.Placement) and other.stats.takeovers == 1
        gate.set()
        assert await first == second  # the stalled holder answers with the taker's placement
        ledgers = await helpers.ledgers(nc, bus_settings)
        holders = [node for node, ledger in ledgers.items() if "contested" in ledger.pods()]
        assert holders == [second.node] == ["node-1"]
        assert ledgers["node-0"].slices == ()  # committed, then given back


async def test_a_stalled_holder_whose_claim_was_taken_over_leaves_the_takers_slices_on_its_node(
    nc: Client, bus_settings: BusSettings
) -> None:
    # one node: the taker commits there first, the stalled holder's commit then loses the
    # race and finds the pod placed; those slices are the taker's, answered to its client
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1, split=10))
    async with replicas(bus_settings, 2, claim_wait_s=0.3) as (stalled, other):
        gate, entered = asyncio.Event(), asyncio.Event()
        written: list[str] = []  # what the stalled replica commits once let go

        async def stalls(op: committing.Op, perform: bus.Perform) -> object:
            if not isinstance(op, committing.CommitLedger):
                return await perform(op)
            entered.set()
            await gate.wait()  # held until the other replica took the claim over
            done = await perform(op)
            if done:
                written.append(",".join(sorted(op.ledger.pods())) or "-")
            return done

        stalled.interpose = stalls
        pod = helpers.pod("same-node", memory_mib=1000)
        first = asyncio.create_task(stalled.schedule(pod))
        await entered.wait()  # claimed and decided, its commit held
        second = await other.schedule(pod)  # waits out the claim, takes it over, places
        assert isinstance(second, events.Placement) and other.stats.takeovers == 1
        gate.set()
        assert await first == second  # the stalled holder answers with the taker's placement
        # ... and never touched the ledger: taking the taker's slices back (and placing
        # the pod again itself) would leave the taker's answer without its commit
        assert written == []
        ledgers = await helpers.ledgers(nc, bus_settings)
        assert ledgers["node-0"].pods() == {"same-node"}, ledgers["node-0"]
        assert len(ledgers["node-0"].slices) == 1
