"""Every door of the bus fuzzed: random, truncated, oversized, wrong-typed, negative and
huge payloads on every subject the services listen on and in every KV bucket, each sent
by an identity the server lets send it. Afterwards every service still runs and answers
a good request correctly, and the ledger invariants hold (no device over its memory,
cores or slice count, no slice twice, no pod on two nodes).

One stack of real processes (admission, two scheduler replicas, a node agent preparing
real slices on mock GPUs, metrics) serves the whole module on the session's nats-server
(authorization and TLS on). Payloads come from Hypothesis, bounded and derandomized: a
run takes about a minute on a busy 2-core machine and fails the same way twice. Bucket
values go under keys of a node no agent hosts (``fzbad-0``) and of pods no client holds,
so a forged value can cost that node (the architecture's "a bad entry costs one node")
but never the stack.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from libshared import bounds, connecting, events, kvreads, leases, permissions
from libshared.connecting import BusSettings
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, PodCharge, Slice
from libshared.natsserver import NatsServer, free_port
from libshared.subjects import DEADLINE_HEADER, pod_key
from services.admission.adapters import bus as admission_bus
from services.admission.core import mutating
from services.metrics.core import views
from tests.bus import helpers
from vslice import running, stacks

T = TypeVar("T")
NODE = "fzn-0"  # the node of the stack's agent
BAD_NODE = "fzbad-0"  # a node no agent hosts: its registration and ledger are fuzzed
EXAMPLES = 20
LEDGER = msgspec.json.Decoder(NodeLedger)
NODES = msgspec.json.Decoder(NodeDevices)

# -- payloads -----------------------------------------------------------------------------

EDGE_INTS = [-1, -(2**31), 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**40]
EDGE_TEXT = ["", "x" * 300, "../../etc/passwd", "a.b.*", ">", "\x00", "vslice.sched.>", "é" * 80]
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(EDGE_TEXT),
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at] if at else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*at, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _set(doc[head], rest, value)}
    copy = list(doc)
    copy[head] = _set(doc[head], rest, value)
    return copy


def _drop(doc: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(doc, dict):
            return {k: v for k, v in doc.items() if k != path[0]}
        return [v for i, v in enumerate(doc) if i != path[0]]
    return {**doc, path[0]: _drop(doc[path[0]], path[1:])} if isinstance(doc, dict) else doc


@st.composite
def mutated(draw: st.DrawFn, sample: Any) -> Any:
    """``sample`` (a JSON document) with one to three fields replaced by a value of any
    type (negative, huge, wrong-typed), dropped, made huge, or an unknown field added."""
    doc = sample
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            return draw(JSON_VALUES)
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "replace", "drop", "huge", "add"]))
        if how == "replace":
            doc = _set(doc, path, draw(JSON_VALUES))
        elif how == "drop":
            doc = _drop(doc, path)
        elif how == "huge":
            doc = _set(doc, path, draw(st.sampled_from(["y" * 100_000, [0] * 20_000, 10**300])))
        elif isinstance(doc, dict):
            doc = {**doc, draw(st.text(max_size=12)): draw(JSON_VALUES)}
    return doc


def payloads(sample: Any) -> st.SearchStrategy[bytes]:
    """Bytes that are not ``sample`` (a JSON document): random bytes, the document
    mutated, cut short, padded past the server's ``max_payload``, or JSON of another
    shape."""
    valid = json.dumps(sample).encode()
    encoded = mutated(sample).map(lambda d: json.dumps(d).encode())
    return st.one_of(
        st.binary(max_size=256),
        encoded,
        st.integers(0, max(0, len(valid) - 1)).map(lambda n: valid[:n]),
        encoded.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
        JSON_VALUES.map(lambda d: json.dumps(d).encode()),
        st.sampled_from([b"\xff" * 200_000, b"[" * 5_000, b'{"a":' * 3_000, b"{}" * 600_000]),
    )


EXTREMES = [
    b"",
    b"null",
    b'{"a":' * 3_000 + b"1" + b"}" * 3_000,  # nested past msgspec's recursion limit
    b"[" * 3_000 + b"]" * 3_000,
    b"x" * 900_000,  # just under the server's max_payload (1 MiB)
]

# -- the stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    """The module's stack: ``run`` a coroutine on its loop, ``conns`` by identity kind,
    the agent's ``uuids``, the processes, and the bus ``settings`` by kind."""

    loop: asyncio.AbstractEventLoop
    conns: dict[str, Client]
    settings: dict[str, BusSettings]
    procs: dict[str, Any]
    metrics_url: str
    uuids: list[str]
    placed: set[str] = field(default_factory=set)  # pods a fuzzed request placed

    def run(self, coro: Awaitable[T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fuzz")
    prefix = f"fz{uuid.uuid4().hex[:8]}"
    ids = {
        "admission": nats_server.identity(
            f"adm-{prefix}", permissions.Role.ADMISSION, prefix=prefix
        ),
        "scheduler": nats_server.identity(
            f"sch-{prefix}", permissions.Role.SCHEDULER, prefix=prefix
        ),
        "nodeagent": nats_server.identity(
            f"nodeagent-{NODE}-{prefix}", permissions.Role.NODEAGENT, prefix=prefix, node=NODE
        ),
        "badagent": nats_server.identity(
            f"nodeagent-{BAD_NODE}-{prefix}",
            permissions.Role.NODEAGENT,
            prefix=prefix,
            node=BAD_NODE,
        ),
        "metrics": nats_server.identity(f"met-{prefix}", permissions.Role.METRICS, prefix=prefix),
        "cli": nats_server.identity(f"cli-{prefix}", permissions.Role.CLI, prefix=prefix),
        "operator": nats_server.bus_settings(prefix=prefix),
    }
    port = free_port()
    agent = ["--host-root", str(tmp / "host"), "--backend", "mock"]
    agent += ["--nodes", "1", "--gpus", "2", "--memory-mib", "16000"]
    agent += ["--node-prefix", "fzn", "--name", "fzn-agent"]
    commands = stacks.service_commands(
        nats_server.url,
        credentials=ids,
        prefix=prefix,
        replicas=2,
        agent_args=agent,
        log_level="warning",
        metrics_port=port,
    )
    logs = tmp / "logs"
    procs = {name: stacks.spawn(name, argv, logs) for name, argv in commands.items()}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    conns: dict[str, Client] = {}
    try:
        fut = asyncio.run_coroutine_threadsafe(
            stacks.wait_serving(ids["operator"], schedulers=2, nodes=1, procs=procs, logs=logs),
            loop,
        )
        fut.result(90)
        stacks.wait_http(
            f"http://127.0.0.1:{port}/readyz",
            proc=procs["metrics"],
            logs=logs,
            name="metrics",
            timeout_s=60,
        )
        for kind, bus in ids.items():
            conns[kind] = asyncio.run_coroutine_threadsafe(
                connecting.connect(bus, name=f"fuzz-{kind}"), loop
            ).result(30)
        built = Stack(loop, conns, ids, procs, f"http://127.0.0.1:{port}", [])
        nodes, _ = built.run(read_fleet(built))
        built.uuids = [d.uuid for n in nodes if n.node == NODE for d in n.devices]
        assert len(built.uuids) == 2, nodes
        yield built
    finally:
        for c in conns.values():
            asyncio.run_coroutine_threadsafe(c.close(), loop).result(30)
        stacks.stop(list(procs.values()))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def read_fleet(stack: Stack) -> tuple[list[NodeDevices], dict[str, NodeLedger]]:
    """Registrations and ledgers as stored, but the fuzzed node's."""
    nc = stack.conns["operator"]
    bus = await connecting.ensure_bus(nc.jetstream(), stack.settings["operator"])
    out: list[dict[str, bytes]] = []
    for kv in (bus.nodes, bus.ledger):
        values = {}
        for key in await kvreads.keys(kv):
            entry = await kv.get(key)
            if key != BAD_NODE and entry.value:
                values[key] = entry.value
        out.append(values)
    nodes = [NODES.decode(v) for v in out[0].values()]
    return nodes, {k: LEDGER.decode(v) for k, v in out[1].items()}


def invariant_problems(nodes: list[NodeDevices], ledgers: dict[str, NodeLedger]) -> list[str]:
    """Devices over memory, cores or slice count; slices held twice; pods on two nodes."""
    problems = []
    where: dict[str, set[str]] = {}
    for node, ledger in ledgers.items():
        seen: set[tuple[str, int, str, bool]] = set()
        for s in ledger.slices:
            where.setdefault(s.pod_uid, set()).add(node)
            key = (s.pod_uid, s.container_index, s.uuid, s.init)
            if key in seen:
                problems.append(f"slice held twice: {key}")
            seen.add(key)
    problems += [f"{uid} on {sorted(on)}" for uid, on in where.items() if len(on) > 1]
    for node in nodes:
        slices = ledgers.get(node.node, NodeLedger(node=node.node)).slices
        for dev in node.devices:
            on_dev = [s for s in slices if s.uuid == dev.uuid]
            if (
                sum(s.memory_mib for s in on_dev) > dev.memory_mib
                or sum(s.cores_percent for s in on_dev) > dev.cores_percent
                or len(on_dev) > dev.split_count
            ):
                problems.append(f"{dev.uuid} over capacity: {on_dev}")
    return problems


async def good_requests(stack: Stack, uid: str) -> list[str]:
    """A good request to every service; returns what went wrong (empty: all answered)."""
    wrong: list[str] = []
    nc, s = stack.conns["cli"], stack.settings["cli"].subjects
    spec = running.pod_spec(
        running.SliceRequest(memory_mib=1234, cores_percent=10), uid=uid, uuids=stack.uuids
    )
    review = events.decode_review_reply(
        (await nc.request(s.admission_review, events.ENCODER.encode(spec), timeout=10)).data
    )
    if not (isinstance(review, events.PodRequest) and review.uid == uid):
        return [f"admission answered {review}"]
    if review.containers[0].memory_mib != 1234:
        wrong.append(f"admission read {review.containers[0]}")
    placed = await helpers.schedule(nc, stack.settings["cli"], review, timeout_s=10)
    if not isinstance(placed, events.Placement) or placed.node != NODE:
        return [*wrong, f"schedule answered {placed}"]
    if [(x.memory_mib, x.cores_percent) for x in placed.slices] != [(1234, 10)]:
        wrong.append(f"placed {placed.slices}")
    query = events.SliceQuery(pod_uid=uid, wait_s=20)
    answer = events.NODE_ANSWER.decode(
        (await nc.request(s.node_slice(NODE), events.ENCODER.encode(query), timeout=25)).data
    )
    if not isinstance(answer, events.Ready) or answer.pod_uid != uid:
        wrong.append(f"node agent answered {answer}")
    ack = await helpers.release(nc, stack.settings["cli"], uid, timeout_s=10)
    if not (isinstance(ack, events.Ack) and ack.node == NODE):
        wrong.append(f"release answered {ack}")
    stats = await replicas_answering(stack)
    if stats < 2:
        wrong.append(f"{stats} of 2 replicas answer stats")
    try:
        page = await asyncio.to_thread(_get, f"{stack.metrics_url}/metrics")
    except OSError as exc:
        wrong.append(f"metrics: {exc!r}")
    else:
        if not all(u in page for u in stack.uuids):
            wrong.append("metrics page lacks the node's devices")
    return wrong


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def replicas_answering(stack: Stack) -> int:
    nc = stack.conns["operator"]
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(stack.settings["operator"].subjects.sched_stats, b"", reply=inbox)
    names = set()
    try:
        while True:
            msg = await sub.next_msg(timeout=1.0)
            if msg.data:
                names.add(events.STATS.decode(msg.data).name)
    except nats.errors.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return len(names)


# -- the doors ----------------------------------------------------------------------------


def _slice(uid: str) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="default",
        pod=uid,
        container="main",
        container_index=0,
        uuid="GPU-fz-0",
        device_index=0,
        memory_mib=1000,
        cores_percent=10,
    )


def _doc(value: msgspec.Struct | dict[str, Any]) -> Any:
    return json.loads(events.ENCODER.encode(value))


def _placement(node: str) -> events.Placement:
    return events.Placement(
        pod_uid="fz-forged",
        namespace="default",
        pod="fz-forged",
        node=node,
        slices=(_slice("fz-forged"),),
        charge=PodCharge(pod_uid="fz-forged"),
    )


@dataclass(frozen=True)
class Door:
    """Where a payload goes: ``kind`` ``request`` (core NATS, an answer awaited),
    ``publish``, ``stream`` (JetStream publish) or ``kv`` (a put to ``bucket``'s ``key``),
    as identity ``sender``, with ``sample`` the good JSON document it is fuzzed from and
    ``reply`` the decoder an answer must decode with."""

    name: str
    kind: str
    sender: str
    sample: Any
    subject: Callable[[BusSettings], str] = lambda _: ""
    reply: Callable[[bytes], Any] | None = None


REQUEST = helpers.pod("fz-sample", memory_mib=1000, cores=10)
USAGE = events.NodeUsage(
    node=NODE,
    at=1.0,
    devices=(
        events.DeviceUsage(uuid="GPU-fz-0", index=0, type="A100", used_bytes=1, total_bytes=2),
    ),
    containers=(
        events.ContainerUsage(
            pod_uid="fz-sample",
            namespace="default",
            pod="fz-sample",
            container="main",
            container_index=0,
            uuid="GPU-fz-0",
            device_index=0,
            used_bytes=1,
            limit_bytes=2,
        ),
    ),
)
DEVICES = NodeDevices(
    node=BAD_NODE,
    devices=(Device(uuid="GPU-fzbad-0", index=0, type="A100", memory_mib=16000),),
)
DOORS = [
    Door(
        "admission.review",
        "request",
        "cli",
        running.pod_spec(running.SliceRequest(memory_mib=1000), uid="fz-spec", uuids=["GPU-x"]),
        lambda b: b.subjects.admission_review,
        events.decode_review_reply,
    ),
    Door(
        "sched.schedule",
        "request",
        "cli",
        _doc(REQUEST),
        lambda b: b.subjects.sched_schedule,
        events.SCHEDULE_REPLY.decode,
    ),
    Door(
        "sched.release",
        "request",
        "cli",
        _doc(events.Release(pod_uid="fz-sample")),
        lambda b: b.subjects.sched_release,
        events.RELEASE_REPLY.decode,
    ),
    Door("sched.stats", "publish", "cli", {}, lambda b: b.subjects.sched_stats),
    Door(
        "node.<node>.slice",
        "request",
        "cli",
        _doc(events.SliceQuery(pod_uid="fz-sample", wait_s=0.5)),
        lambda b: b.subjects.node_slice(NODE),
        events.NODE_ANSWER.decode,
    ),
    Door("usage.<node>", "publish", "nodeagent", _doc(USAGE), lambda b: b.subjects.usage(NODE)),
    Door(
        "node.<node>.registered",
        "publish",
        "nodeagent",
        _doc(NodeDevices(node=NODE, devices=DEVICES.devices)),
        lambda b: b.subjects.node_registered(NODE),
    ),
    Door(
        "alloc.<node>.decided",
        "stream",
        "scheduler",
        _doc(_placement(NODE)),
        lambda b: b.subjects.alloc_decided(NODE),
    ),
    Door(
        "alloc.<node>.released",
        "stream",
        "scheduler",
        _doc(events.Release(pod_uid="fz-forged")),
        lambda b: b.subjects.alloc_released(NODE),
    ),
    Door(
        "alloc.<node>.ready",
        "stream",
        "nodeagent",
        _doc(events.Ready(pod_uid="fz-forged", node=NODE)),
        lambda b: b.subjects.alloc_ready(NODE),
    ),
    Door("bucket nodes", "kv", "badagent", _doc(DEVICES), lambda b: b.subjects.nodes_bucket),
    Door(
        "bucket ledger",
        "kv",
        "scheduler",
        _doc(NodeLedger(node=BAD_NODE, slices=(_slice("fz-ledgered"),))),
        lambda b: b.subjects.ledger_bucket,
    ),
    Door("bucket pods", "kv", "scheduler", NODE, lambda b: b.subjects.pods_bucket),
    Door(
        "bucket leases",
        "kv",
        "cli",
        _doc(leases.Lease(pod_uid="fz-leased", node=NODE, ttl_s=5)),
        lambda b: b.subjects.leases_bucket,
    ),
]
KV_KEYS = {
    "bucket nodes": [BAD_NODE],
    "bucket ledger": [BAD_NODE],
    "bucket pods": [pod_key(f"fz-claimed-{i}") for i in range(3)],
    "bucket leases": [pod_key(f"fz-leased-{i}") for i in range(3)],
}
HEADERS = st.one_of(
    st.none(),
    st.builds(
        lambda v: {DEADLINE_HEADER: v},
        st.text(max_size=30).filter(lambda t: "\r" not in t and "\n" not in t),
    ),
)


async def send(
    stack: Stack, door: Door, payload: bytes, key_index: int, headers: dict[str, str] | None
) -> None:
    """Send ``payload`` through ``door``; an answer, when one comes, must decode as the
    door's reply type. What the client library or the server refuses (a payload over
    ``max_payload``) never reached a service."""
    nc = stack.conns[door.sender]
    subject = door.subject(stack.settings[door.sender])
    try:
        if door.kind == "request":
            msg = await nc.request(subject, payload, timeout=3, headers=headers)
            assert door.reply is not None
            reply = door.reply(msg.data)
            if isinstance(reply, events.Placement):
                stack.placed.add(reply.pod_uid)
        elif door.kind == "publish":
            await nc.publish(subject, payload, headers=headers)
            await nc.flush()
        elif door.kind == "stream":
            await nc.jetstream().publish(subject, payload, timeout=5)
        else:
            kv = await nc.jetstream().key_value(subject)
            keys = KV_KEYS[door.name]
            await kv.put(keys[key_index % len(keys)], payload)
    except nats.errors.MaxPayloadError:
        pass  # refused by the client: never sent
    except nats.errors.TimeoutError:
        if not _may_wait(door, payload):
            raise AssertionError(f"{door.name}: no answer to {payload[:200]!r}") from None


def _may_wait(door: Door, payload: bytes) -> bool:
    # a valid slice query for a pod never placed is answered after its wait_s (0-60 s)
    if door.name != "node.<node>.slice":
        return False
    try:
        return events.SLICE_QUERY.decode(payload).wait_s >= 2
    except bounds.DECODE_ERRORS:
        return False


async def settle(stack: Stack) -> None:
    """Release what fuzzed requests placed (they are valid pods), so the next good request
    finds room."""
    for uid in sorted(stack.placed):
        await helpers.release(
            stack.conns["operator"], stack.settings["operator"], uid, timeout_s=10
        )
    stack.placed.clear()


# JSON nested past msgspec's limit: decoding raises RecursionError, not a DecodeError
# (``libshared.bounds.DECODE_ERRORS`` holds both); every door answers it with an error.
DEEP = b'{"a":' * 3_000 + b"1" + b"}" * 3_000


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "door",
    [pytest.param(d, id=d.name) for d in DOORS if d.reply is not None],
)
def test_a_request_nested_past_the_decoders_limit_is_answered_with_an_error(
    stack: Stack, door: Door
) -> None:
    assert door.reply is not None
    msg = stack.run(
        stack.conns[door.sender].request(door.subject(stack.settings[door.sender]), DEEP, timeout=3)
    )
    answer = door.reply(msg.data)
    # the door's error answer (a node agent's slice query answers Failed), naming the cause
    assert isinstance(answer, events.BusError | events.Failed), answer
    assert "recursion depth" in answer.reason, answer


@pytest.mark.timeout(240)
@pytest.mark.parametrize("door", [pytest.param(d, id=d.name) for d in DOORS])
def test_after_any_payload_through_a_door_every_service_answers_and_the_ledger_holds(
    stack: Stack, door: Door
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        # no shrinking: an example that gets no answer costs a request timeout, and
        # Hypothesis prints the failing payload as generated
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(payload=payloads(door.sample), key_index=st.integers(0, 5), headers=HEADERS)
    def fuzz(payload: bytes, key_index: int, headers: dict[str, str] | None) -> None:
        stack.run(send(stack, door, payload, key_index, headers if door.kind != "kv" else None))

    for payload in EXTREMES:  # every door sees each of these, whatever is drawn
        fuzz = example(payload=payload, key_index=0, headers=None)(fuzz)
    fuzz()
    dead = {name: p.returncode for name, p in stack.procs.items() if p.poll() is not None}
    assert dead == {}
    stack.run(settle(stack))
    if door.name == "bucket pods":
        # a pod whose claim holds a forged value is still answered (placed once the claim
        # is taken over, or refused), never left without a reply
        for i in range(3):
            uid = f"fz-claimed-{i}"
            answer = stack.run(
                helpers.schedule(
                    stack.conns["cli"],
                    stack.settings["cli"],
                    helpers.pod(uid, memory_mib=100),
                    timeout_s=20,
                )
            )
            assert isinstance(answer, events.Placement | events.Unschedulable | events.BusError)
            stack.run(helpers.release(stack.conns["cli"], stack.settings["cli"], uid, timeout_s=20))
    uid = "fz-good-" + re.sub(r"[^a-z0-9]+", "-", door.name).strip("-")
    assert stack.run(good_requests(stack, uid)) == []
    nodes, ledgers = stack.run(read_fleet(stack))
    assert NODE in {n.node for n in nodes}
    assert invariant_problems(nodes, ledgers) == []


@pytest.mark.parametrize(
    "decode",
    [
        pytest.param(admission_bus.decode_pod, id="admission-review-on-the-bus"),
        pytest.param(mutating.decode_review, id="admission-webhook"),
        pytest.param(lambda raw: views.FleetView().put_node("n", raw), id="metrics-registration"),
        pytest.param(lambda raw: views.FleetView().put_ledger("n", raw, 1), id="metrics-ledger"),
        pytest.param(
            lambda raw: views.FleetView().put_usage("n", raw, received_at=0.0), id="metrics-usage"
        ),
    ],
)
@pytest.mark.parametrize("raw", [DEEP, b"[" * 3_000], ids=["deep-object", "deep-truncated-array"])
def test_json_nested_past_the_decoders_limit_is_refused_as_malformed(
    decode: Callable[[bytes], object], raw: bytes
) -> None:
    with pytest.raises((ValueError, mutating.ReviewError, views.RejectedValue)) as caught:
        decode(raw)
    assert str(caught.value)  # a reason to log and answer with
