"""The bus is closed: no anonymous client, and each role's identity may do what its role
needs and nothing else -- every allowed and denied action tried against a real nats-server
(``libshared.permissions``)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.errors import Error as JetStreamError

from libshared import connecting, events, permissions
from libshared import leases as leasing
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from libshared.subjects import Subjects

NODE = "n1"
OTHER = "n2"
JS_TIMEOUT_S = 10.0  # an allowed request is answered well within this, even under load


@dataclass
class Probe:
    """A connected identity and the server's asynchronous errors it received;
    ``refused`` is set at the first permissions violation."""

    nc: Client
    subjects: Subjects
    identity: str = ""
    errors: list[str] = field(default_factory=list)
    refused: asyncio.Event = field(default_factory=asyncio.Event)

    def violated(self) -> bool:
        return self.refused.is_set()


async def _connect(settings: BusSettings) -> Probe:
    errors: list[str] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        if "permissions violation" in str(exc).lower():
            refused.set()

    nc = await connecting.connect(settings, name="probe", error_cb=on_error)
    return Probe(
        nc=nc,
        subjects=settings.subjects,
        identity=settings.identity_name,
        errors=errors,
        refused=refused,
    )


@pytest.fixture
async def bus(nats_server: NatsServer, prefix: str) -> AsyncIterator[BusSettings]:
    """The prefix's buckets and stream, created by the operator, with one ledger entry and
    one registration of another node in place."""
    operator = nats_server.bus_settings(prefix=prefix)
    nc = await connecting.connect(operator, name="operator")
    opened = await connecting.ensure_bus(nc.jetstream(), operator)
    await opened.ledger.put(NODE, b'{"node": "n1", "slices": []}')
    await opened.nodes.put(OTHER, b'{"node": "n2", "devices": []}')
    leases = await leasing.open_leases(nc.jetstream(), operator, create=True)
    await leases.put("run-x", b'{"pod_uid": "run-x"}')
    yield operator
    await nc.close()


def identity(server: NatsServer, prefix: str, role: Role) -> BusSettings:
    node = NODE if role is Role.NODEAGENT else ""
    return server.identity(f"{role}-{prefix}", role, prefix=prefix, node=node)


Action = Callable[[Probe], Awaitable[None]]


async def _publish(c: Probe, subject: str) -> None:
    await c.nc.publish(subject, b"{}")
    await c.nc.flush()


async def _subscribe(c: Probe, subject: str) -> None:
    await c.nc.subscribe(subject)
    await c.nc.flush()


async def _kv(c: Probe, bucket: str, op: str, key: str) -> None:
    js = c.nc.jetstream(timeout=JS_TIMEOUT_S)
    kv = await js.key_value(bucket)
    if op == "get":
        await kv.get(key)
    elif op == "put":
        await kv.put(key, b"{}")
    elif op == "delete":
        await kv.delete(key)
    else:
        await kv.keys()


async def _purge(c: Probe, stream: str) -> None:
    await c.nc.jetstream(timeout=JS_TIMEOUT_S).purge_stream(stream)


ACTIONS: dict[str, Callable[[Probe], Awaitable[None]]] = {
    "read the ledger": lambda c: _kv(c, c.subjects.ledger_bucket, "get", NODE),
    "write the ledger": lambda c: _kv(c, c.subjects.ledger_bucket, "put", NODE),
    "delete a ledger key": lambda c: _kv(c, c.subjects.ledger_bucket, "delete", NODE),
    "purge the ledger": lambda c: _purge(c, f"KV_{c.subjects.ledger_bucket}"),
    "write a claim": lambda c: _kv(c, c.subjects.pods_bucket, "put", "pod-x"),
    "purge the claims": lambda c: _purge(c, f"KV_{c.subjects.pods_bucket}"),
    "write a lease": lambda c: _kv(c, c.subjects.leases_bucket, "put", "run-y"),
    "delete a lease": lambda c: _kv(c, c.subjects.leases_bucket, "delete", "run-x"),
    "read a lease": lambda c: _kv(c, c.subjects.leases_bucket, "get", "run-x"),
    "read a registration": lambda c: _kv(c, c.subjects.nodes_bucket, "get", OTHER),
    "register its own node": lambda c: _kv(c, c.subjects.nodes_bucket, "put", NODE),
    "register another node": lambda c: _kv(c, c.subjects.nodes_bucket, "put", OTHER),
    "publish its node's ready": lambda c: _publish(c, c.subjects.alloc_ready(NODE)),
    "publish another node's ready": lambda c: _publish(c, c.subjects.alloc_ready(OTHER)),
    "publish another node's failed": lambda c: _publish(c, c.subjects.alloc_failed(OTHER)),
    "publish a placement": lambda c: _publish(c, c.subjects.alloc_decided(NODE)),
    "publish its node's usage": lambda c: _publish(c, c.subjects.usage(NODE)),
    "publish another node's usage": lambda c: _publish(c, c.subjects.usage(OTHER)),
    "request a schedule": lambda c: _publish(c, c.subjects.sched_schedule),
    "request a release": lambda c: _publish(c, c.subjects.sched_release),
    "request a review": lambda c: _publish(c, c.subjects.admission_review),
    "listen to schedule requests": lambda c: _subscribe(c, c.subjects.sched_schedule),
    "publish into another's inbox": lambda c: _publish(c, permissions.inbox_prefix("cli") + ".x"),
    "serve reviews": lambda c: _subscribe(c, c.subjects.admission_review),
    "serve its node's slice queries": lambda c: _subscribe(c, c.subjects.node_slice(NODE)),
    "serve another node's slice queries": lambda c: _subscribe(c, c.subjects.node_slice(OTHER)),
    "read every allocation message": lambda c: _subscribe(c, c.subjects.alloc_all),
    "read usage reports": lambda c: _subscribe(c, c.subjects.usage("*")),
    "read every reply inbox": lambda c: _subscribe(c, "_INBOX.>"),
    "beat as itself": lambda c: _publish(c, c.subjects.health(c.identity, "i1")),
    "beat as another identity": lambda c: _publish(c, c.subjects.health("admission-x", "i1")),
    "read the scheduler's inbox": lambda c: _subscribe(
        c, permissions.inbox_prefix("scheduler") + ".>"
    ),
}

# role -> the actions it may do; every other action of ACTIONS is denied to it.
ALLOWED: dict[Role, set[str]] = {
    Role.ADMISSION: {"request a schedule", "request a release", "serve reviews", "beat as itself"},
    Role.SCHEDULER: {
        "read the ledger",
        "write the ledger",
        "delete a ledger key",
        "write a claim",
        "purge the claims",
        "write a lease",
        "delete a lease",
        "read a lease",
        "read a registration",
        "publish a placement",
        "listen to schedule requests",
        "beat as itself",
    },
    Role.NODEAGENT: {
        "read the ledger",
        "register its own node",
        "publish its node's ready",
        "publish its node's usage",
        "serve its node's slice queries",
        "beat as itself",
    },
    Role.METRICS: {
        "read the ledger",
        "read a registration",
        "read usage reports",
        "listen to schedule requests",  # the latency histogram (read-only: cannot answer)
        "beat as itself",
    },
    Role.CLI: {
        "read a registration",
        "request a schedule",
        "request a release",
        "request a review",
        "write a lease",
        "delete a lease",
    },
    Role.OPERATOR: set(ACTIONS),
}
CASES = [
    pytest.param(role, action, action in ALLOWED[role], id=f"{role}-{action.replace(' ', '_')}")
    for role in ALLOWED
    for action in ACTIONS
]


@pytest.mark.parametrize(("role", "action", "allowed"), CASES)
async def test_each_role_may_do_what_it_needs_and_every_other_action_is_refused(
    nats_server: NatsServer, bus: BusSettings, role: Role, action: str, allowed: bool
) -> None:
    own = bus if role is Role.OPERATOR else identity(nats_server, bus.prefix, role)
    client = await _connect(own)
    try:
        if allowed:
            await ACTIONS[action](client)
            await client.nc.flush()
            assert not client.violated(), client.errors
        else:
            # a refused publish or subscribe is reported asynchronously; a refused
            # JetStream request is never answered: the server's report ends the wait
            tried = asyncio.ensure_future(ACTIONS[action](client))
            reported = asyncio.ensure_future(client.refused.wait())
            await asyncio.wait({tried, reported}, timeout=15, return_when="FIRST_COMPLETED")
            if tried.done() and not reported.done():
                await asyncio.wait({reported}, timeout=15)
            for task in (tried, reported):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, JetStreamError):
                    await task
            if not client.violated():
                pytest.fail(f"{role} could {action}: {client.errors}")
    finally:
        await client.nc.close()


async def test_an_anonymous_client_is_refused(nats_server: NatsServer) -> None:
    context = ssl.create_default_context(cafile=str(nats_server.store.ca_path))
    with pytest.raises(nats.errors.Error):
        await nats.connect(nats_server.url, tls=context, allow_reconnect=False, connect_timeout=2)


async def test_a_client_without_tls_is_refused(nats_server: NatsServer) -> None:
    settings = nats_server.bus_settings()
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(
            nats_server.url,
            nkeys_seed=settings.nkey_seed_path,
            allow_reconnect=False,
            connect_timeout=2,
        )


async def test_an_unknown_nkey_is_refused(nats_server: NatsServer, tmp_path: object) -> None:
    from pathlib import Path

    from libshared import trust

    seed = Path(str(tmp_path)) / "stranger.nk"
    seed.write_bytes(trust.new_nkey_seed())
    settings = nats_server.bus_settings()
    stranger = BusSettings(
        urls=settings.urls, nkey_seed_path=str(seed), tls_ca_path=settings.tls_ca_path
    )
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            stranger.urls[0],
            nkeys_seed=stranger.nkey_seed_path,
            tls=connecting.tls_context(stranger),
            allow_reconnect=False,
            connect_timeout=2,
        )


async def test_a_node_agent_cannot_answer_for_a_slice_another_node_prepares(
    nats_server: NatsServer, bus: BusSettings
) -> None:
    """A forged ``Ready`` on another node's subject never reaches a listener."""
    other = nats_server.identity(
        f"agent-{bus.prefix}-{OTHER}", Role.NODEAGENT, prefix=bus.prefix, node=OTHER
    )
    listener = await _connect(bus)
    forger = await _connect(identity(nats_server, bus.prefix, Role.NODEAGENT))
    honest = await _connect(other)
    try:
        got: list[bytes] = []
        seen = asyncio.Event()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.data)
            seen.set()

        await listener.nc.subscribe(bus.subjects.alloc_ready(OTHER), cb=on_msg)
        await listener.nc.flush()
        forged = events.Ready(pod_uid="victim", node=OTHER, env={"main": {"LD_PRELOAD": "/x"}})
        await forger.nc.publish(bus.subjects.alloc_ready(OTHER), events.ENCODER.encode(forged))
        await forger.nc.flush()
        real = events.Ready(pod_uid="victim", node=OTHER)
        await honest.nc.publish(bus.subjects.alloc_ready(OTHER), events.ENCODER.encode(real))
        await honest.nc.flush()
        async with asyncio.timeout(5):
            await seen.wait()
        await listener.nc.flush()
        assert [events.NODE_ANSWER.decode(g) for g in got] == [real]
        assert forger.violated()
    finally:
        for c in (listener, forger, honest):
            await c.nc.close()
