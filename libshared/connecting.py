"""Connecting to the bus and making sure its streams and buckets exist.

Every service connects through ``connect``: reconnects enabled without a limit (a NATS
restart must not end a service), a bounded drain for SIGTERM, and errors logged instead of
printed. ``ensure_bus`` creates what ``ARCHITECTURE.md`` ("The bus") names -- the
``<prefix>-nodes``, ``<prefix>-ledger`` and ``<prefix>-pods`` KV buckets and the
``<prefix>-alloc`` stream -- idempotently, so whichever service starts first creates
them and replicas racing to do so all succeed (its waits and retries are tenacity's).
Bus settings are one frozen object, read from flags and the environment by
``libshared.settings.ServiceOptions``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nats
import tenacity
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from libshared import permissions, waiting
from libshared.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger("vslice.bus")

DEFAULT_URL = "nats://127.0.0.1:4222"
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
# grew without bound there were the claims' delete markers, which the scheduler replicas
# purge (``services.scheduler.adapters.upkeep``).


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


async def connect(
    settings: BusSettings,
    *,
    name: str,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
) -> Client:
    """Connect as ``settings``' identity (NKEY seed or credentials file, TLS when a CA is
    given, replies on the identity's own inbox prefix) with unlimited reconnects.
    ``error_cb`` receives the server's asynchronous errors (a permissions violation among
    them); by default they are logged.

    Raises ``nats.errors.NoServersError`` when no server answers at first, and
    ``nats.errors.Error`` when the server refuses the identity.
    """
    identity = settings.identity_name
    options: dict[str, object] = {}
    if settings.nkey_seed_path:
        options["nkeys_seed"] = settings.nkey_seed_path
    if settings.creds_path:
        options["user_credentials"] = settings.creds_path
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    if identity:
        options["inbox_prefix"] = permissions.inbox_prefix(identity)
    return await nats.connect(
        servers=list(settings.urls),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        drain_timeout=max(1, int(settings.drain_timeout_s)),
        error_cb=error_cb or _error_cb,
        allow_reconnect=True,
        **options,
    )


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
    """Open the nodes, ledger and pods buckets and the alloc stream; with ``create``
    (the scheduler's and the operator's identities may) create the missing ones, else
    wait up to ``wait_s`` seconds for them to appear (every other role may only open
    them: ``libshared.permissions``).

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
    return Bus(nodes=nodes, ledger=ledger, pods=pods)


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


async def drain_quietly(nc: Client) -> None:
    """Drain ``nc`` on the way out; a connection that is already gone is only logged."""
    try:
        await nc.drain()
    except Exception as exc:  # any failure here: the service is exiting either way
        log.warning("drain failed", extra={"error": str(exc)})
