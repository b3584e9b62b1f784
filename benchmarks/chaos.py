"""Chaos on a local stack: every process killed in turn (SIGKILL) under concurrent clients,
then the ledger checked against what the clients were told.

A ``vslice up`` stack (nats-server with authorization and TLS, admission, two scheduler
replicas, the mock node agent, metrics) in a temporary state directory serves
``--clients`` concurrent clients, each on its own connection as the ``cli`` identity:
they place pods (directly or through admission's review first), re-send pods they hold
and release them, retrying every request with the same pod until it is answered. Every
``--kill-every`` seconds one process of the stack -- the replicas, the node agent,
metrics, admission and nats-server, in turn, round after round -- gets SIGKILL and
``vslice up`` starts it again (it restarts only the dead ones; nats-server keeps its port
and JetStream data). After ``--seconds`` (and at least one full round) the clients finish
what they have in flight, and the ledger is read and checked:

- ``lost``: a placement a client was told of (acknowledged), not released with an
  acknowledgement, that the ledger does not hold as acknowledged;
- ``double_booked``: acknowledged placements of pods that hold slices on two nodes, a
  slice held twice, a device over its memory, cores or slice count, or a pod answered
  with two different placements;
- ``leaked``: pods in the ledger that no client holds (their answer was never seen);
- ``unresolved``: requests still without an answer after ``RESOLVE_S`` seconds of retries
  (their pods are left out of ``lost`` and ``leaked``).

Afterwards every process must run and the stack must place and release a new pod.

    .venv/bin/python benchmarks/chaos.py                  # 120 s, 12 clients, a kill every 4 s
    .venv/bin/python benchmarks/chaos.py --seconds 600 --clients 16 --json chaos.json

``tests/bus/test_chaos.py`` runs the short form (one round of kills) in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from libshared import connecting, events, kvreads
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger
from libshared.resources import ContainerRequest, PodRequest
from libshared.subjects import deadline_headers
from vslice import running, stacks

ROOT = Path(__file__).resolve().parents[1]
# The order processes are killed in, round after round.
VICTIMS = ("scheduler-1", "nodeagent", "scheduler-2", "metrics", "admission", "nats")
REQUEST_TIMEOUT_S = 5.0
RESOLVE_S = 90.0  # a request unanswered after this long is reported as unresolved
MEMORY_CHOICES_MIB = (1000, 2000, 3000, 4000, 6000)
CORES_CHOICES = (0, 10, 20, 30, 50)


class Unresolved(Exception):
    """A request got no usable answer within ``RESOLVE_S`` seconds."""


@dataclass
class Tally:
    """What the clients were told: ``holdings`` (pod UID -> the acknowledged placement,
    until its release is acknowledged), counts, ``unresolved`` pod UIDs, ``errors``
    (answers that contradict earlier ones)."""

    holdings: dict[str, events.Placement] = field(default_factory=dict)
    acknowledged: int = 0
    released: int = 0
    unschedulable: int = 0
    denied: int = 0
    resent: int = 0
    via_admission: int = 0
    retries: int = 0
    requests: int = 0
    unresolved: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # pod UID -> placements told


@dataclass
class Kill:
    """One SIGKILL: the process ``name``, seconds into the run, and how long ``vslice up``
    took to have the stack serving again (``restart_s``; ``error`` when it failed)."""

    name: str
    at_s: float
    restart_s: float = 0.0
    error: str = ""


@dataclass
class Outcome:
    """The figures of a chaos run (see the module docstring for the counts)."""

    seconds: float
    clients: int
    requests: int
    acknowledged: int
    released: int
    unschedulable: int
    denied: int
    resent: int
    via_admission: int
    retries: int
    held_at_end: int
    lost: int
    double_booked: int
    leaked: int
    unresolved: int
    kills: list[Kill]
    problems: list[str]
    serving_after: bool


def vslice(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the ``vslice`` command line (this interpreter) with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def stack_env(devices: Sequence[tuple[str, int]], metrics_port: int) -> dict[str, str]:
    """The environment of ``vslice up`` for mock ``devices`` (UUID, MiB)."""
    return {
        "VSLICE_MOCKGPU_DEVICES": ",".join(f"{u}:{m}" for u, m in devices),
        "VSLICE_METRICS_PORT": str(metrics_port),
        "VSLICE_GPU_BACKEND": "mock",
    }


def random_request(rng: random.Random, uid: str) -> PodRequest:
    """A one-container pod: mostly a fractional slice, sometimes a whole GPU."""
    if rng.random() < 0.8:
        c = ContainerRequest(
            name="main",
            index=0,
            init=False,
            gpu_count=1,
            memory_mib=rng.choice(MEMORY_CHOICES_MIB),
            cores_percent=rng.choice(CORES_CHOICES),
        )
    else:
        c = ContainerRequest(
            name="main", index=0, init=False, gpu_count=1, memory_percent=100, cores_percent=100
        )
    return PodRequest(uid=uid, namespace="default", name=uid, containers=(c,))


def random_spec(rng: random.Random, uid: str, uuids: Sequence[str]) -> bytes:
    """A pod spec for admission's review (as ``vslice run`` sends one)."""
    request = running.SliceRequest(
        memory_mib=rng.choice(MEMORY_CHOICES_MIB), cores_percent=rng.choice(CORES_CHOICES) or None
    )
    return events.ENCODER.encode(running.pod_spec(request, uid=uid, uuids=uuids))


async def ask(nc: Client, subject: str, body: bytes, tally: Tally) -> bytes:
    """Send a request until a usable answer comes (same body, so the same pod): timeouts,
    no responders, a connection being re-established and errors that say so are retried.
    Raises ``Unresolved`` after ``RESOLVE_S`` seconds."""
    deadline = time.monotonic() + RESOLVE_S
    while time.monotonic() < deadline:
        tally.requests += 1
        try:
            headers = deadline_headers(REQUEST_TIMEOUT_S, now=time.time())
            msg = await nc.request(subject, body, timeout=REQUEST_TIMEOUT_S, headers=headers)
        except (nats.errors.Error, TimeoutError, OSError):
            tally.retries += 1
            await asyncio.sleep(0.2)
            continue
        retry_after_s = events.retry_after_of(msg.data) if msg.data else 0.2
        if retry_after_s is None:
            return bytes(msg.data)
        tally.retries += 1
        await asyncio.sleep(retry_after_s)
    raise Unresolved(subject)


async def client(
    cid: int,
    settings: BusSettings,
    tally: Tally,
    stop: asyncio.Event,
    *,
    uuids: Sequence[str],
    seed: int,
) -> None:
    """One client: place, re-send and release pods until ``stop`` is set."""
    rng = random.Random(seed * 1000 + cid)
    s = settings.subjects
    nc = await connecting.connect(settings, name=f"chaos-{cid}")
    mine: list[str] = []
    n = 0
    try:
        while not stop.is_set():
            n += 1
            roll = rng.random()
            if mine and roll < 0.4:
                uid = mine.pop(rng.randrange(len(mine)))
                try:
                    data = await ask(nc, s.sched_release, release_body(uid), tally)
                except Unresolved:
                    tally.unresolved.add(uid)
                    continue
                ack = events.RELEASE_REPLY.decode(data)
                if not isinstance(ack, events.Ack):
                    tally.errors.append(f"release of {uid} answered {ack}")
                    continue
                del tally.holdings[uid]
                tally.released += 1
                continue
            if mine and roll < 0.45:
                uid = rng.choice(mine)
                held = tally.holdings[uid]
                body = events.ENCODER.encode(random_request(rng, uid))
                tally.resent += 1
            else:
                uid = f"chaos-{seed}-{cid}-{n}"
                held = None
                if roll > 0.75:
                    try:
                        review = events.decode_review_reply(
                            await ask(nc, s.admission_review, random_spec(rng, uid, uuids), tally)
                        )
                    except Unresolved:
                        tally.unresolved.add(uid)
                        continue
                    tally.via_admission += 1
                    if isinstance(review, events.Denial | events.BusError):
                        tally.denied += 1
                        tally.errors.append(f"admission of {uid} answered {review}")
                        continue
                    body = events.ENCODER.encode(review)
                else:
                    body = events.ENCODER.encode(random_request(rng, uid))
            try:
                reply = events.SCHEDULE_REPLY.decode(await ask(nc, s.sched_schedule, body, tally))
            except Unresolved:
                tally.unresolved.add(uid)
                if held is not None:
                    mine.remove(uid)
                continue
            if isinstance(reply, events.BusError):
                tally.errors.append(f"schedule of {uid} answered {reply.reason}")
            elif held is not None:
                if reply != held:
                    tally.errors.append(f"re-send of {uid} answered {reply}, held {held}")
            elif isinstance(reply, events.Placement):
                tally.holdings[uid] = reply
                tally.answers[uid] += 1
                tally.acknowledged += 1
                mine.append(uid)
            else:
                tally.unschedulable += 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def release_body(uid: str) -> bytes:
    return events.ENCODER.encode(events.Release(pod_uid=uid))


async def read_fleet(
    settings: BusSettings, *, timeout_s: float = 60.0
) -> tuple[list[NodeDevices], dict[str, NodeLedger]]:
    """Every registration and ledger of the bus (retried while the bus settles)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nc = await connecting.connect(settings, name="chaos-check")
            try:
                bus = await connecting.ensure_bus(nc.jetstream(), settings)
                nodes = [events.NODE_DEVICES.decode(e.value) for e in await _entries(bus.nodes)]
                ledgers = {
                    le.node: le
                    for le in (
                        events.NODE_LEDGER.decode(e.value) for e in await _entries(bus.ledger)
                    )
                }
                return nodes, ledgers
            finally:
                await nc.close()
        except (nats.errors.Error, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _entries(kv: KeyValue) -> list[KeyValue.Entry]:
    # kvreads, not kv.watchall(): the latter may end before the content (libshared.kvreads)
    return [e for _, e in sorted((await kvreads.latest(kv)).items()) if e.value]


def check(
    tally: Tally, nodes: Sequence[NodeDevices], ledgers: Mapping[str, NodeLedger]
) -> tuple[int, int, int, list[str]]:
    """``(lost, double_booked, leaked, problems)`` of the ledger against ``tally`` (see the
    module docstring). Pure."""
    problems: list[str] = []
    bad: set[str] = set()  # pods of double bookings
    where: dict[str, set[str]] = {}
    held_slices: dict[str, Counter[tuple[str, int, str, int, int]]] = {}
    for ledger in ledgers.values():
        seen: Counter[tuple[str, str, int, bool]] = Counter()
        for s in ledger.slices:
            where.setdefault(s.pod_uid, set()).add(ledger.node)
            held_slices.setdefault(s.pod_uid, Counter())[
                (ledger.node, s.container_index, s.uuid, s.memory_mib, s.cores_percent)
            ] += 1
            seen[(s.pod_uid, s.uuid, s.container_index, s.init)] += 1
        for (uid, uuid, index, _), count in seen.items():
            if count > 1:
                problems.append(f"{uid} container {index} holds {uuid} {count} times")
                bad.add(uid)
    for uid, on in where.items():
        if len(on) > 1:
            problems.append(f"{uid} holds slices on {sorted(on)}")
            bad.add(uid)
    for node in nodes:
        slices = ledgers.get(node.node, NodeLedger(node=node.node)).slices
        for dev in node.devices:
            on_dev = [s for s in slices if s.uuid == dev.uuid]
            memory = sum(s.memory_mib for s in on_dev)
            cores = sum(s.cores_percent for s in on_dev)
            if (
                memory > dev.memory_mib
                or cores > dev.cores_percent
                or len(on_dev) > dev.split_count
            ):
                problems.append(
                    f"{dev.uuid}: {memory}/{dev.memory_mib} MiB, {cores}/{dev.cores_percent} %,"
                    f" {len(on_dev)}/{dev.split_count} slices"
                )
                bad.update(s.pod_uid for s in on_dev)
    for uid, count in tally.answers.items():
        if count > 1:
            problems.append(f"{uid} was acknowledged {count} times")
            bad.add(uid)
    lost = 0
    for uid, placement in tally.holdings.items():
        if uid in tally.unresolved:
            continue
        want = Counter(
            (placement.node, s.container_index, s.uuid, s.memory_mib, s.cores_percent)
            for s in placement.slices
        )
        if held_slices.get(uid) != want:
            lost += 1
            problems.append(f"{uid}: acknowledged {dict(want)}, ledger {held_slices.get(uid)}")
    leaked = [u for u in where if u not in tally.holdings and u not in tally.unresolved]
    problems += [f"{u}: in the ledger, held by no client" for u in leaked]
    double = sum(1 for uid in bad if uid in tally.answers)
    return lost, double, len(leaked), problems


async def serves(
    settings: BusSettings, uid: str, uuids: Sequence[str], *, held: Sequence[str] = ()
) -> str:
    """Why the stack does not serve: '' when it releases the pods ``held`` (what the
    clients still hold, which may fill the fleet) and then admits, places and releases pod
    ``uid`` (each request retried for up to ``RESOLVE_S`` seconds), else what went wrong."""
    tally = Tally()
    nc = await connecting.connect(settings, name="chaos-after")
    try:
        for other in held:
            freed = events.RELEASE_REPLY.decode(
                await ask(nc, settings.subjects.sched_release, release_body(other), tally)
            )
            if not (isinstance(freed, events.Ack) and freed.node is not None):
                return f"release of held pod {other} answered {freed!r}"
        spec = running.pod_spec(running.SliceRequest(memory_mib=100), uid=uid, uuids=uuids)
        s = settings.subjects
        review = events.decode_review_reply(
            await ask(nc, s.admission_review, events.ENCODER.encode(spec), tally)
        )
        if not isinstance(review, PodRequest):
            return f"admission answered {review!r}"
        body = events.ENCODER.encode(review)
        placed = events.SCHEDULE_REPLY.decode(await ask(nc, s.sched_schedule, body, tally))
        if not isinstance(placed, events.Placement):
            return f"schedule answered {placed!r}"
        ack = events.RELEASE_REPLY.decode(await ask(nc, s.sched_release, release_body(uid), tally))
        if not (isinstance(ack, events.Ack) and ack.node == placed.node):
            return f"release answered {ack!r} for a pod placed on {placed.node}"
        return ""
    except Unresolved as exc:
        return f"no usable answer on {exc} within {RESOLVE_S:g} s"
    finally:
        await nc.close()


async def chaos(
    state_dir: Path,
    env: Mapping[str, str],
    kills: list[Kill],
    stop: asyncio.Event,
    *,
    started: float,
    kill_every_s: float,
    victims: Sequence[str],
    say: Callable[[str], None],
) -> None:
    """SIGKILL ``victims`` in turn every ``kill_every_s`` seconds, each followed by
    ``vslice up``, until ``stop`` is set."""
    i = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), kill_every_s)
        if stop.is_set():
            return
        name = victims[i % len(victims)]
        i += 1
        known = stacks.read_state(state_dir)
        assert known is not None
        pid = known.pids[name]
        kill = Kill(name=name, at_s=time.monotonic() - started)
        os.kill(pid, signal.SIGKILL)
        while stacks.alive(pid):
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        again = await asyncio.to_thread(vslice, ["up", "--state-dir", str(state_dir)], env)
        kill.restart_s = time.monotonic() - t0
        if again.returncode != 0 or "restarted" not in again.stdout:
            kill.error = (again.stdout + again.stderr)[-2000:]
        kills.append(kill)
        say(f"  {kill.at_s:6.1f} s  killed {name:<12} back in {kill.restart_s:.1f} s")


async def run(
    *,
    seconds: float,
    clients: int,
    kill_every_s: float,
    devices: Sequence[tuple[str, int]],
    seed: int = 1,
    victims: Sequence[str] = VICTIMS,
    state_dir: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """One chaos run on a fresh ``vslice up`` stack (see the module docstring); the kills
    go on until ``seconds`` passed and every victim was killed at least once. Raises
    ``stacks.StackError`` (via ``RuntimeError``) when the stack does not start."""
    with contextlib.ExitStack() as cleanup:
        if state_dir is None:
            state_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "state"
        env = stack_env(devices, stacks.free_port())
        up = vslice(["up", "--state-dir", str(state_dir)], env)
        if up.returncode != 0:
            raise RuntimeError(f"vslice up failed:\n{up.stdout}\n{up.stderr}")
        try:
            return await _drive(
                state_dir,
                env,
                seconds=seconds,
                clients=clients,
                kill_every_s=kill_every_s,
                uuids=[u for u, _ in devices],
                seed=seed,
                victims=victims,
                say=say,
            )
        finally:
            vslice(["down", "--state-dir", str(state_dir)], env)
    raise AssertionError("unreachable")  # pragma: no cover


async def _drive(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    seconds: float,
    clients: int,
    kill_every_s: float,
    uuids: Sequence[str],
    seed: int,
    victims: Sequence[str],
    say: Callable[[str], None],
) -> Outcome:
    stack = stacks.read_state(state_dir)
    assert stack is not None
    cli, operator = stack.settings("cli"), stack.settings("operator")
    tally = Tally()
    stop_kills, stop_clients = asyncio.Event(), asyncio.Event()
    kills: list[Kill] = []
    started = time.monotonic()
    workers = [
        asyncio.create_task(client(i, cli, tally, stop_clients, uuids=uuids, seed=seed))
        for i in range(clients)
    ]
    killer = asyncio.create_task(
        chaos(
            state_dir,
            env,
            kills,
            stop_kills,
            started=started,
            kill_every_s=kill_every_s,
            victims=victims,
            say=say,
        )
    )
    while time.monotonic() - started < seconds or {k.name for k in kills} < set(victims):
        await asyncio.sleep(0.2)
        if killer.done():
            break
        if any(w.done() for w in workers):
            break
    stop_kills.set()
    await killer
    stop_clients.set()
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - started
    # the last restart has to be serving before the ledger is read
    final = stacks.read_state(state_dir)
    assert final is not None
    dead = sorted(name for name, pid in final.pids.items() if not stacks.alive(pid))
    nodes, ledgers = await read_fleet(operator)
    lost, double, leaked, problems = check(tally, nodes, ledgers)
    problems = [
        *tally.errors,
        *(f"restart after killing {k.name}: {k.error}" for k in kills if k.error),
        *problems,
    ]
    why = f"not running afterwards: {', '.join(dead)}" if dead else ""
    why = why or await serves(cli, f"chaos-after-{seed}", uuids, held=sorted(tally.holdings))
    if why:
        problems.append(f"stack not serving afterwards: {why}")
    return Outcome(
        seconds=elapsed,
        clients=clients,
        requests=tally.requests,
        acknowledged=tally.acknowledged,
        released=tally.released,
        unschedulable=tally.unschedulable,
        denied=tally.denied,
        resent=tally.resent,
        via_admission=tally.via_admission,
        retries=tally.retries,
        held_at_end=len(tally.holdings),
        lost=lost,
        double_booked=double,
        leaked=leaked,
        unresolved=len(tally.unresolved),
        kills=kills,
        problems=problems,
        serving_after=not why,
    )


def report(outcome: Outcome) -> str:
    """The run's figures as lines of text."""
    o = outcome
    restarts = Counter(k.name for k in o.kills)
    slowest = max((k.restart_s for k in o.kills), default=0.0)
    mean = sum(k.restart_s for k in o.kills) / len(o.kills) if o.kills else 0.0
    lines = [
        f"{o.seconds:.0f} s, {o.clients} clients, {o.requests} requests sent"
        f" ({o.retries} retried after a timeout, no responder or temporary error)",
        f"kills: {len(o.kills)} ({', '.join(f'{n} x{c}' for n, c in sorted(restarts.items()))});"
        f" vslice up back in {mean:.1f} s on average, {slowest:.1f} s at most",
        f"acknowledged placements {o.acknowledged} ({o.via_admission} pods admitted first),"
        f" acknowledged releases {o.released}, unschedulable {o.unschedulable},"
        f" re-sends {o.resent}, held at the end {o.held_at_end}",
        f"lost {o.lost}   double-booked {o.double_booked}   leaked {o.leaked}"
        f"   unresolved {o.unresolved}   stack serving afterwards: {o.serving_after}",
    ]
    lines += [f"  problem: {p}" for p in o.problems[:20]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=120.0, help="chaos duration (s)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--gpus", type=int, default=4, help="mock GPUs of the node")
    parser.add_argument("--memory-mib", type=int, default=16000, help="memory of each GPU")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the outcome here")
    args = parser.parse_args(argv)
    # the clients' reconnect notices while nats-server is down are expected here
    logging.getLogger().setLevel(logging.ERROR)
    devices = [(f"GPU-chaos-{i}", args.memory_mib) for i in range(args.gpus)]
    outcome = asyncio.run(
        run(
            seconds=args.seconds,
            clients=args.clients,
            kill_every_s=args.kill_every,
            devices=devices,
            seed=args.seed,
            say=lambda line: print(line, flush=True),
        )
    )
    print(report(outcome))
    if args.json:
        args.json.write_text(json.dumps(asdict(outcome), indent=1))
    clean = not (outcome.lost or outcome.double_booked or outcome.leaked or outcome.problems)
    return 0 if clean and outcome.serving_after else 1


if __name__ == "__main__":
    sys.exit(main())
