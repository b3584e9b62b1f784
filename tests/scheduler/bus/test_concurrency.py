"""Active-active replicas under contention: no double booking, one answer per request, and
a ledger equal to what the clients hold -- with a replica SIGKILLed mid-run and restarted.

Replicas run as real processes (``python -m services.scheduler``); 16 clients send a mix
of fractional and whole-GPU pods, with releases and re-sends interleaved, to a fleet small
enough that most decisions race for the same devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger, Slice
from libshared.natsserver import NatsServer, start_cluster
from libshared.permissions import Role
from libshared.subjects import deadline_headers
from tests.bus import helpers
from tests.bus.conftest import repo_root

REQUESTS = int(os.environ.get("VSLICE_TEST_BUS_REQUESTS", "5000"))
CLUSTER_REQUESTS = int(os.environ.get("VSLICE_TEST_BUS_CLUSTER_REQUESTS", "2000"))
CLIENTS = 16
REPLICAS = 3
TIMEOUT_S = 5.0


def start_replica(bus: BusSettings, name: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.scheduler",
            "--nats-url",
            ",".join(bus.urls),
            "--prefix",
            bus.prefix,
            *bus.credential_arguments(),
            "--name",
            name,
            "--no-explain",
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=repo_root(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # JSON logs; the replies say what went wrong
    )


async def replica_stats(nc: Client, bus: BusSettings, *, wait_s: float = 0.5) -> list[events.Stats]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(bus.subjects.sched_stats, b"", reply=inbox)
    out = []
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except Exception:
            break
        if msg.data:  # an empty message is the server's "no responders" status
            out.append(events.STATS.decode(msg.data))
    await sub.unsubscribe()
    return out


async def wait_replicas(nc: Client, bus: BusSettings, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(await replica_stats(nc, bus, wait_s=0.3)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} replicas answer"


@dataclass
class Book:
    """What the clients did and hold: answers per request id, the pods each holds."""

    target: int
    answers: Counter[str] = field(default_factory=Counter)
    holdings: dict[str, events.Placement] = field(default_factory=dict)
    sent: int = 0
    placed: int = 0
    unschedulable: int = 0
    released: int = 0
    resent: int = 0
    races_lost: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def random_pod(rng: random.Random, uid: str) -> helpers.PodRequest:
    if rng.random() < 0.7:
        return helpers.pod(
            uid,
            memory_mib=rng.choice([1000, 2000, 3000, 4000, 6000]),
            cores=rng.choice([10, 20, 30, 50]),
        )
    return helpers.pod(uid, gpus=rng.choice([1, 1, 2]))


async def client(cid: int, nc: Client, bus: BusSettings, book: Book) -> None:
    rng = random.Random(cid)
    mine: list[str] = []
    n = 0
    while book.sent < book.target:
        book.sent += 1
        n += 1
        rid = f"c{cid}-{n}"
        roll = rng.random()
        if mine and roll < 0.4:
            uid = mine.pop(rng.randrange(len(mine)))
            subject, body = (
                bus.subjects.sched_release,
                events.ENCODER.encode(events.Release(pod_uid=uid)),
            )
        elif mine and roll < 0.45:
            uid = rng.choice(mine)
            held = book.holdings[uid]
            subject, body = bus.subjects.sched_schedule, events.ENCODER.encode(random_pod(rng, uid))
            book.resent += 1
        else:
            uid = f"pod-{cid}-{n}"
            held = None
            subject, body = bus.subjects.sched_schedule, events.ENCODER.encode(random_pod(rng, uid))
        started = time.perf_counter()
        tries = 0
        for _ in range(60):
            tries += 1
            try:
                # a schedule copy past its deadline is dropped by the replicas, so a copy
                # stuck behind a failover cannot place a pod this client has re-sent
                headers = deadline_headers(TIMEOUT_S, now=time.time())
                msg = await nc.request(subject, body, timeout=TIMEOUT_S, headers=headers)
                retry_after_s = events.retry_after_of(msg.data)
                if retry_after_s is None:
                    break
                book.retries += 1  # the replica could not read the ledger: send again
                await asyncio.sleep(retry_after_s)
            except nats.errors.TimeoutError:
                book.retries += 1  # the replica died with it: send again, same pod
            except nats.errors.NoRespondersError:
                # while a dead NATS node's clients move over, the queue group can be empty
                book.retries += 1
                await asyncio.sleep(0.25)
        else:
            book.errors.append(f"{rid}: no answer after retries")
            continue
        book.latencies_ms.append((time.perf_counter() - started) * 1000)
        book.answers[rid] += 1
        if subject == bus.subjects.sched_release:
            ack = events.RELEASE_REPLY.decode(msg.data)
            # a release re-sent after a timeout may find its first copy already done
            expected = {book.holdings[uid].node} | ({None} if tries > 1 else set())
            if not isinstance(ack, events.Ack) or ack.node not in expected:
                book.errors.append(f"{rid}: release of {uid} (try {tries}) answered {ack}")
            del book.holdings[uid]
            book.released += 1
            continue
        reply = events.SCHEDULE_REPLY.decode(msg.data)
        if isinstance(reply, events.BusError):
            book.errors.append(f"{rid}: {reply.reason}")
        elif held is not None:
            if reply != held:
                book.errors.append(f"{rid}: re-send of {uid} answered {reply}, held {held}")
        elif isinstance(reply, events.Placement):
            book.holdings[uid] = reply
            mine.append(uid)
            book.placed += 1
        else:
            book.unschedulable += 1
            book.races_lost += "lost the ledger race" in reply.reason


def check_capacity(nodes: list[NodeDevices], ledgers: dict[str, NodeLedger]) -> None:
    for node in nodes:
        slices = ledgers.get(node.node, NodeLedger(node=node.node)).slices
        for dev in node.devices:
            on = [s for s in slices if s.uuid == dev.uuid]
            assert sum(s.memory_mib for s in on) <= dev.memory_mib, (node.node, dev.uuid, on)
            assert sum(s.cores_percent for s in on) <= dev.cores_percent, (node.node, dev.uuid, on)
            assert len(on) <= dev.split_count, (node.node, dev.uuid, on)


def check_outcome(book: Book, nodes: list[NodeDevices], ledgers: dict[str, NodeLedger]) -> None:
    """Every request answered once, no device over capacity, ledger == client holdings."""
    assert book.errors == []
    assert sum(book.answers.values()) == len(book.answers) == book.target
    assert set(book.answers.values()) == {1}
    check_capacity(nodes, ledgers)
    in_ledger: dict[str, set[tuple[str, int, int]]] = {}
    for ledger in ledgers.values():
        for uid, held in by_pod(ledger.slices).items():
            assert uid not in in_ledger, f"{uid} holds slices on two nodes"
            in_ledger[uid] = held
    assert in_ledger == {uid: by_pod(p.slices)[uid] for uid, p in book.holdings.items()}
    # a busy, tiny fleet: most requests find it full; enough must still place and release
    assert book.placed > book.target // 40 and book.released > book.target // 40
    assert book.unschedulable > book.target // 100


def summary(book: Book, wall: float, stats: list[events.Stats]) -> str:
    lat = sorted(book.latencies_ms)
    return (
        f"\n{book.target} requests in {wall:.1f} s = {book.target / wall:.0f}/s;"
        f" placed {book.placed}, unschedulable {book.unschedulable},"
        f" released {book.released}, re-sent {book.resent}, retried {book.retries},"
        f" unschedulable after lost races {book.races_lost};"
        f" conflicts {sum(s.conflicts for s in stats)};"
        f" latency p50 {lat[len(lat) // 2]:.1f} ms p99 {lat[int(len(lat) * 0.99)]:.1f} ms"
    )


def by_pod(slices: tuple[Slice, ...]) -> dict[str, set[tuple[str, int, int]]]:
    out: dict[str, set[tuple[str, int, int]]] = {}
    for s in slices:
        out.setdefault(s.pod_uid, set()).add((s.uuid, s.memory_mib, s.cores_percent))
    return out


async def test_three_replicas_under_contention_with_one_killed_never_book_a_device_twice(
    nats_server: NatsServer, prefix: str
) -> None:
    bus = nats_server.bus_settings(prefix=prefix)
    sched = nats_server.identity(f"sched-{prefix}", Role.SCHEDULER, prefix=prefix)
    cli = nats_server.identity(f"cli-{prefix}", Role.CLI, prefix=prefix)
    nodes = helpers.fleet(nodes=3, gpus=2, memory_mib=16000, split=4)
    admin = await connecting.connect(bus, name="admin")
    await helpers.register(admin, bus, nodes)
    procs = [start_replica(sched, f"r{i}") for i in range(REPLICAS)]
    conns = [await connecting.connect(cli, name=f"c{i}") for i in range(4)]
    try:
        await wait_replicas(admin, bus, REPLICAS)
        for garbage in (b"garbage", b'{"uid": 1}', b"{}"):
            msg = await admin.request(bus.subjects.sched_schedule, garbage, timeout=TIMEOUT_S)
            assert isinstance(events.SCHEDULE_REPLY.decode(msg.data), events.BusError)
        book = Book(target=REQUESTS)

        async def chaos() -> None:
            while book.sent < REQUESTS // 3:
                await asyncio.sleep(0.05)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            while book.sent < REQUESTS // 2:
                await asyncio.sleep(0.05)
            procs[0] = start_replica(sched, "r0-restarted")

        started = time.perf_counter()
        await asyncio.gather(
            chaos(), *(client(i, conns[i % len(conns)], bus, book) for i in range(CLIENTS))
        )
        wall = time.perf_counter() - started
        # the restarted replica may still be reading the buckets when the last request is
        # answered (a loaded machine): it is up once three replicas answer again
        await wait_replicas(admin, bus, REPLICAS)
        stats = await replica_stats(admin, bus)
        ledgers = await helpers.ledgers(admin, bus)

        check_outcome(book, nodes, ledgers)
        assert {s.name for s in stats} >= {"r1", "r2", "r0-restarted"}
        print(summary(book, wall, stats))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for c in (*conns, admin):
            await c.close()


async def test_replicas_on_a_three_node_nats_cluster_keep_the_invariant_when_a_nats_node_dies(
    tmp_path: Path, prefix: str
) -> None:
    cluster = start_cluster(tmp_path, size=3)
    bus = dataclasses.replace(cluster.bus_settings(prefix=prefix), replicas=3)
    sched = dataclasses.replace(
        cluster.identity(f"sched-{prefix}", Role.SCHEDULER, prefix=prefix), replicas=3
    )
    nodes = helpers.fleet(nodes=3, gpus=2, memory_mib=16000, split=4)
    procs: list[subprocess.Popen[bytes]] = []
    conns: list[Client] = []
    try:
        admin = await connecting.connect(bus, name="admin")
        conns.append(admin)
        await helpers.register(admin, bus, nodes)
        info = await admin.jetstream().stream_info(f"KV_{bus.subjects.ledger_bucket}")
        assert info.config.num_replicas == 3
        procs = [start_replica(sched, f"r{i}", "--replicas", "3") for i in range(2)]
        for i in range(4):
            conns.append(await connecting.connect(bus, name=f"c{i}"))
        await wait_replicas(admin, bus, 2)
        book = Book(target=CLUSTER_REQUESTS)

        async def chaos() -> None:
            while book.sent < CLUSTER_REQUESTS // 3:
                await asyncio.sleep(0.05)
            cluster.servers[1].kill()

        started = time.perf_counter()
        await asyncio.gather(
            chaos(), *(client(i, conns[1 + i % 4], bus, book) for i in range(CLIENTS))
        )
        wall = time.perf_counter() - started
        stats = await replica_stats(admin, bus)
        check_outcome(book, nodes, await helpers.ledgers(admin, bus))
        print(summary(book, wall, stats))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for c in conns:
            await c.close()
        cluster.stop()
