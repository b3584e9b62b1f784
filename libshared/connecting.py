"""Connecting to the bus and making sure its streams and buckets exist.

Every service connects through ``connect``: reconnects enabled without a limit (a NATS
restart must not end a service), a bounded drain for SIGTERM, and errors logged instead of
printed. A connection can still close for good -- the server closes it after a protocol
error (a payload over ``max_payload``, a revoked identity) and nats.py does not reconnect
then -- and a service left so would stay up deaf. A service passes a ``Lifeline``: the
close sets the service's stop event, and ``Lifeline.check`` raises ``BusClosedError``
once it has drained, so the process exits with ``EXIT_BUS_CLOSED`` for its supervisor
(``vslice up``, Kubernetes, compose) to start it again; ``connect_service`` connects
so and starts the service's heartbeats (``libshared.heartbeats``).

``ensure_bus`` creates what ``ARCHITECTURE.md`` ("The bus") names -- the
``<prefix>-nodes``, ``<prefix>-ledger`` and ``<prefix>-pods`` KV buckets, the
``<prefix>-alloc`` stream and the ``<prefix>-health`` stream of heartbeats --
idempotently, so whichever service starts first creates them and replicas racing to do
so all succeed (its waits and retries are tenacity's). Bus settings are one frozen
object, read from flags and the environment by ``libshared.settings.ServiceOptions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from libshared import heartbeats, kvwrites, permissions, tasks, waiting
from libshared.errors import VsliceError
from libshared.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger("vslice.bus")

DEFAULT_URL = "nats://127.0.0.1:4222"
# Refusals of a reconnecting identity in a row before its connection counts as lost.
MAX_REFUSALS = 20
CLOSE_S = 5.0  # longest wait for a client's close on the way out, seconds
VERDICT_S = 20.0  # longest wait for a failed start-up's lost-or-back verdict, seconds
# The exit status of a service whose connection closed for good: sysexits' EX_TEMPFAIL
# ("try again later"), for its supervisor to start it again.
EXIT_BUS_CLOSED = 75
# The allocation stream's limits: a day of messages, and a ceiling on bytes and count so
# churn cannot grow it without bound (about 4 MB per 5 minutes of churn was seen). The
# node agents' durable consumers read it within seconds; what ages out is history.
ALLOC_MAX_AGE_S = 24 * 3600.0
# nats-server reserves a stream's max_bytes on disk when it is created ("insufficient
# storage resources" once they add up), so the ceiling is a modest one: 32 MiB is tens of
# thousands of placements, far more than the agents' consumers ever leave unread.
ALLOC_MAX_BYTES = 32 << 20
ALLOC_MAX_MSGS = 100_000
# The state buckets (nodes, ledger, claims) keep one entry per key (history 1) and no age
# or byte limit: a registration or ledger must not expire or be refused for space; what
# grew without bound there were the claims' tombstones and delete markers, which now
# carry a per-message TTL the server keeps (``libshared.kvwrites``); the scheduler
# replicas sweep what has none (``services.scheduler.adapters.upkeep``).


@dataclass(frozen=True)
class BusSettings:
    """Where the bus is and how to use it.

    ``urls``: NATS server URLs (a client fails over between them). ``prefix``: subject and
    bucket prefix (``Subjects``). ``replicas``: JetStream replicas of the buckets and
    streams this service creates (3 on a 3-node cluster). ``request_timeout_s``: JetStream
    API and publish timeout, seconds. ``drain_timeout_s``: how long SIGTERM's drain may
    take, seconds.

    Who connects (``libshared.permissions``, ``libshared.trust``): ``identity`` names the
    bus identity (its inbox prefix; default: the stem of the seed or credentials file);
    ``nkey_seed_path`` an NKEY seed file, or ``creds_path`` a NATS credentials file (user
    JWT and seed, for a decentralized-auth server); ``tls_ca_path`` the CA that signed the
    server's certificate (TLS on), ``tls_cert_path``/``tls_key_path`` a client
    certificate when the server asks for one.
    """

    urls: tuple[str, ...] = (DEFAULT_URL,)
    prefix: str = DEFAULT_PREFIX
    replicas: int = 1
    request_timeout_s: float = 5.0
    drain_timeout_s: float = 3.0
    heartbeat_s: float = heartbeats.DEFAULT_INTERVAL_S
    identity: str = ""
    nkey_seed_path: str = ""
    creds_path: str = ""
    tls_ca_path: str = ""
    tls_cert_path: str = ""
    tls_key_path: str = ""

    @property
    def identity_name(self) -> str:
        """``identity``, else the stem of the seed or credentials file ("" for none)."""
        if self.identity:
            return self.identity
        path = self.nkey_seed_path or self.creds_path
        return Path(path).stem if path else ""

    def credential_arguments(self) -> list[str]:
        """The flags that give a service these credentials (``libshared.settings``)."""
        out = []
        for flag, value in (
            ("--identity", self.identity),
            ("--nkey-seed", self.nkey_seed_path),
            ("--nats-creds", self.creds_path),
            ("--nats-tls-ca", self.tls_ca_path),
            ("--nats-tls-cert", self.tls_cert_path),
            ("--nats-tls-key", self.tls_key_path),
        ):
            if value:
                out += [flag, value]
        if self.heartbeat_s != heartbeats.DEFAULT_INTERVAL_S:
            out += ["--heartbeat-s", f"{self.heartbeat_s:g}"]
        return out

    @property
    def subjects(self) -> Subjects:
        """The names on the bus for ``prefix``."""
        return Subjects(prefix=self.prefix)


TRUE = ("1", "true", "yes", "on")


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """An on/off setting from the environment: on for ``1``, ``true``, ``yes``, ``on`` (any
    case, spaces ignored), off for anything else or when ``name`` is unset."""
    return environ.get(name, "").strip().lower() in TRUE


def tls_context(settings: BusSettings) -> ssl.SSLContext | None:
    """The client TLS context of ``settings`` (None without ``tls_ca_path``): verifies the
    server against the CA and its host name, presents the client certificate if given.
    Raises ``OSError``/``ssl.SSLError`` when a file cannot be read."""
    if not settings.tls_ca_path:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert_path:
        context.load_cert_chain(settings.tls_cert_path, settings.tls_key_path)
    return context


async def _error_cb(exc: Exception) -> None:
    log.warning("nats: %s: %s", type(exc).__name__, exc)


class BusClosedError(VsliceError):
    """The service's bus connection closed for good without the service asking (the
    server closed it after ``reason``, e.g. ``Maximum Payload Violation`` or
    ``Authorization Violation``); the service exits with ``EXIT_BUS_CLOSED``."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: the bus connection closed for good ({reason})")


class Lifeline:
    """Watches one service's connection for a close the service did not ask for.

    ``stop``: the service's stop event. The service asks for a close by setting ``stop``
    first (SIGTERM, or its own end); a close before that is a loss: it is logged, kept in
    ``lost`` (the reason; "" while none) and sets ``stop``, so the service leaves its
    serving loop, and ``check`` then raises ``BusClosedError``.

    A connection the server refuses on every reconnect (its identity revoked: the server
    drops it without a protocol error, and nats.py retries forever) is lost too, after
    ``max_refusals`` refusals in a row (about half a second apart).
    """

    def __init__(
        self, stop: asyncio.Event, *, name: str = "", max_refusals: int = MAX_REFUSALS
    ) -> None:
        self.stop = stop
        self.name = name
        self.max_refusals = max_refusals
        self.refusals = 0
        self.lost = ""
        self.client: Client | None = None

    def _lose(self, reason: str) -> None:
        if self.stop.is_set() or self.lost:
            return
        self.lost = reason
        log.error(
            "bus connection closed for good", extra={"connection": self.name, "error": reason}
        )
        self.stop.set()

    async def closed(self) -> None:
        """nats.py's ``closed_cb``: the connection is closed and will not reconnect."""
        error = self.client.last_error if self.client is not None else None
        self._lose(f"{type(error).__name__}: {error}" if error is not None else "closed")

    async def reconnected(self) -> None:
        """nats.py's ``reconnected_cb``: the server accepts the identity again."""
        self.refusals = 0

    async def error(self, exc: Exception) -> None:
        """Counts the server's refusals of the identity (see the class)."""
        if "authorization violation" not in str(exc).lower():
            return
        self.refusals += 1
        if self.refusals >= self.max_refusals:
            self._lose(f"refused {self.refusals} times in a row: {exc}")

    def check(self) -> None:
        """Raise ``BusClosedError`` when the connection was lost (see the class)."""
        if self.lost:
            raise BusClosedError(self.name, self.lost)

    async def verdict(self, *, timeout_s: float = VERDICT_S) -> None:
        """After a bus call failed: while the connection is down, wait up to
        ``timeout_s`` seconds for it to come back or be lost for good, then ``check`` --
        so a service whose identity was revoked while it started exits as lost
        (``EXIT_BUS_CLOSED``), not with the traceback of a timed-out start-up request."""
        client = self.client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (
            client is not None
            and not client.is_connected
            and not self.stop.is_set()
            and loop.time() < deadline
        ):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.1)
        self.check()


async def connect(
    settings: BusSettings,
    *,
    name: str,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    lifeline: Lifeline | None = None,
) -> Client:
    """Connect as ``settings``' identity (NKEY seed or credentials file, TLS when a CA is
    given, replies on the identity's own inbox prefix) with unlimited reconnects.
    ``error_cb`` receives the server's asynchronous errors (a permissions violation among
    them); by default they are logged. ``lifeline`` learns of a close for good (see
    ``Lifeline``).

    Raises ``nats.errors.NoServersError`` when no server answers at first, and
    ``nats.errors.Error`` when the server refuses the identity.
    """
    identity = settings.identity_name
    # nats-py types reconnect_time_wait as int; it is slept, a float works
    options: dict[str, Any] = {"reconnect_time_wait": 0.5}
    if settings.nkey_seed_path:
        options["nkeys_seed"] = settings.nkey_seed_path
    if settings.creds_path:
        options["user_credentials"] = settings.creds_path
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    if identity:
        options["inbox_prefix"] = permissions.inbox_prefix(identity)
    report = error_cb or _error_cb
    if lifeline is not None:
        watch = lifeline
        lifeline.name = lifeline.name or name
        options["closed_cb"] = lifeline.closed
        options["reconnected_cb"] = lifeline.reconnected

        async def report_and_count(exc: Exception) -> None:
            await (error_cb or _error_cb)(exc)
            await watch.error(exc)

        report = report_and_count
    nc = Client()
    try:
        await nc.connect(
            servers=list(settings.urls),
            name=name,
            max_reconnect_attempts=-1,
            connect_timeout=2,
            drain_timeout=max(1, int(settings.drain_timeout_s)),
            error_cb=report,
            allow_reconnect=True,
            **options,
        )
    except BaseException:
        # a connect cut short (a caller's timeout, a refusal) leaves no socket behind
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    if lifeline is not None:
        lifeline.client = nc
    return nc


@dataclass
class ServiceConnection:
    """A service's connection (``connect_service``): ``nc``, its ``lifeline`` and the
    task publishing its heartbeats (``beat``)."""

    nc: Client
    lifeline: Lifeline
    beat: asyncio.Task[None]

    async def close(self) -> None:
        """Stop the heartbeats and drain the connection (``drain_quietly``)."""
        await tasks.stop(self.beat)
        await drain_quietly(self.nc)


async def connect_service(
    settings: BusSettings, *, name: str, service: str, stop: asyncio.Event
) -> ServiceConnection:
    """Connect service ``service`` (admission, scheduler, nodeagent, metrics) as
    instance ``name`` with a ``Lifeline`` on ``stop``, and publish its heartbeats every
    ``settings.heartbeat_s`` seconds (``libshared.heartbeats``) until ``close``. The
    instance is ``name`` and the host name, so replicas on several hosts beat apart.
    Raises what ``connect`` raises."""
    lifeline = Lifeline(stop, name=name)
    nc = await connect(settings, name=name, lifeline=lifeline)
    beat = heartbeats.start(
        nc,
        settings.subjects,
        service=service,
        instance=f"{name}-{socket.gethostname()}",
        identity=settings.identity_name,
        interval_s=settings.heartbeat_s,
    )
    return ServiceConnection(nc=nc, lifeline=lifeline, beat=beat)


def run_service(main: Coroutine[Any, Any, None], *, service: str) -> int:
    """Run a service's ``main`` to its end; returns its exit status: 0, or
    ``EXIT_BUS_CLOSED`` (logged) when it ended on ``BusClosedError``."""
    try:
        asyncio.run(main)
    except BusClosedError as exc:
        logging.getLogger(f"vslice.{service}").error(
            "exiting: the bus connection closed for good",
            extra={"error": exc.reason, "exit_code": EXIT_BUS_CLOSED},
        )
        return EXIT_BUS_CLOSED
    return 0


async def _bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    # BadRequestError: another process created it with a different config, or at the same
    # moment; open or create again a little later, and after the last try just open it
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(BadRequestError),
        stop=tenacity.stop_after_attempt(5),
        wait=tenacity.wait_incrementing(start=0.05, increment=0.05),
        reraise=True,
    )
    try:
        return await retrying(_open_or_create, js, bucket, replicas)
    except BadRequestError:
        return await js.key_value(bucket)


async def _open_or_create(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    created = await js.create_key_value(
        config=api.KeyValueConfig(bucket=bucket, history=1, replicas=replicas)
    )
    if replicas > 1:
        # a replicated bucket elects its leader after the create returns: its first
        # writes would find no responders
        await waiting.bucket_ready(js, bucket)
    return created


@dataclass(frozen=True)
class Bus:
    """The opened buckets of one prefix: ``nodes``, ``ledger`` and ``pods`` (claims)."""

    nodes: KeyValue
    ledger: KeyValue
    pods: KeyValue


async def ensure_bus(
    js: JetStreamContext, settings: BusSettings, *, create: bool = True, wait_s: float = 60.0
) -> Bus:
    """Open the nodes, ledger and pods buckets; with ``create`` (the scheduler's and the
    operator's identities may) create the missing ones and the alloc stream (last),
    else wait up to ``wait_s`` seconds for the buckets to appear (every other role may
    only open them: ``libshared.permissions``; not every role may read the stream's
    info, so a consumer of the stream waits for it itself, as the node agent does).

    Raises ``nats.js.errors.Error`` subclasses when JetStream refuses, and
    ``BucketNotFoundError`` when, without ``create``, a bucket is still missing after
    ``wait_s``.
    """
    subjects = settings.subjects
    if not create:
        return await _wait_bus(js, settings, wait_s)
    nodes = await _bucket(js, subjects.nodes_bucket, settings.replicas)
    ledger = await _bucket(js, subjects.ledger_bucket, settings.replicas)
    pods = await _bucket(js, subjects.pods_bucket, settings.replicas)
    # a release's tombstone and a removed claim's marker expire on the server by their
    # per-message TTL (libshared.kvwrites); a bucket made without it gets it
    await kvwrites.allow_ttl(js, subjects.pods_bucket)
    try:
        info = await js.stream_info(subjects.alloc_stream)
    except NotFoundError:
        try:
            await js.add_stream(
                api.StreamConfig(
                    name=subjects.alloc_stream,
                    subjects=[subjects.alloc_all],
                    num_replicas=settings.replicas,
                    max_age=ALLOC_MAX_AGE_S,
                    max_bytes=ALLOC_MAX_BYTES,
                    max_msgs=ALLOC_MAX_MSGS,
                )
            )
        except BadRequestError:
            await js.stream_info(subjects.alloc_stream)  # created meanwhile by another
    else:
        # a stream made before it had every limit gets them (it grew without bound)
        c = info.config
        if any(v in (None, -1, 0) for v in (c.max_age, c.max_bytes, c.max_msgs)):
            await js.update_stream(
                dataclasses.replace(
                    c,
                    max_age=c.max_age or ALLOC_MAX_AGE_S,
                    max_bytes=ALLOC_MAX_BYTES if c.max_bytes in (None, -1, 0) else c.max_bytes,
                    max_msgs=ALLOC_MAX_MSGS if c.max_msgs in (None, -1, 0) else c.max_msgs,
                )
            )
    await _health_stream(js, settings)
    return Bus(nodes=nodes, ledger=ledger, pods=pods)


async def _health_stream(js: JetStreamContext, settings: BusSettings) -> None:
    """Create the ``<prefix>-health`` stream when missing: the last heartbeat of each
    subject, in memory (heartbeats are only worth their last few seconds), none older
    than ``heartbeats.MAX_AGE_S``."""
    subjects = settings.subjects
    try:
        await js.stream_info(subjects.health_stream)
        return
    except NotFoundError:
        pass
    with contextlib.suppress(BadRequestError):  # created meanwhile by another
        await js.add_stream(
            api.StreamConfig(
                name=subjects.health_stream,
                subjects=[subjects.health_all],
                storage=api.StorageType.MEMORY,
                num_replicas=settings.replicas,
                max_msgs_per_subject=1,
                max_age=heartbeats.MAX_AGE_S,
                max_bytes=heartbeats.MAX_BYTES,
                max_msg_size=heartbeats.MAX_MSG_BYTES,
                discard=api.DiscardPolicy.OLD,
            )
        )


async def _wait_bus(js: JetStreamContext, settings: BusSettings, wait_s: float) -> Bus:
    subjects = settings.subjects

    async def opened() -> Bus:
        return Bus(
            nodes=await js.key_value(subjects.nodes_bucket),
            ledger=await js.key_value(subjects.ledger_bucket),
            pods=await js.key_value(subjects.pods_bucket),
        )

    def waiting_for(state: tenacity.RetryCallState) -> None:
        log.info("waiting for the scheduler to create the buckets")

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(BucketNotFoundError),
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_exponential(multiplier=0.05, min=0.05, max=1.0),
        before_sleep=waiting_for,
        reraise=True,
    )
    return await retrying(opened)


async def open_bucket(js: JetStreamContext, bucket: str, *, wait_s: float = 60.0) -> KeyValue:
    """Open an existing bucket, waiting up to ``wait_s`` seconds for it to be created.
    Raises ``BucketNotFoundError`` when it is still missing then."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(BucketNotFoundError),
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_fixed(0.1),
        reraise=True,
    )
    return await retrying(js.key_value, bucket)


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """``stop``, or a new event, set on SIGTERM/SIGINT (call inside the running loop)."""
    if stop is not None:
        return stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def close_quietly(nc: Client, *, timeout_s: float = CLOSE_S) -> None:
    """Close ``nc``, giving up after ``timeout_s`` seconds: a close on the way out of a
    cancelled task (Ctrl-C) could wait forever for a flush nats-py never finishes, with
    nothing left on the event loop to wake it. Never raises."""
    with contextlib.suppress(Exception):  # TimeoutError included: leaving either way
        await asyncio.wait_for(nc.close(), timeout_s)


async def drain_quietly(nc: Client) -> None:
    """Drain ``nc`` on the way out; a connection that is already gone is only logged (and
    closed, so a reconnecting one stops retrying)."""
    try:
        await nc.drain()
    except Exception as exc:  # any failure here: the service is exiting either way
        log.warning("drain failed", extra={"error": str(exc)})
        with contextlib.suppress(Exception):
            await nc.close()
