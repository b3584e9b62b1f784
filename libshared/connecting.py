"""Connecting to the bus and making sure its streams and buckets exist.

Every service connects through ``connect``: reconnects enabled without a limit (a NATS
restart must not end a service), a bounded drain for SIGTERM, and errors logged instead of
printed. ``ensure_bus`` creates what ``ARCHITECTURE.md`` ("The bus") names -- the
``<prefix>-nodes``, ``<prefix>-ledger`` and ``<prefix>-pods`` KV buckets and the
``<prefix>-alloc`` stream -- idempotently, so whichever service starts first creates
them and replicas racing to do so all succeed. Bus settings are one frozen object, read
from flags and the environment by ``add_arguments``/``from_arguments``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from libshared.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger("vslice.bus")

DEFAULT_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class BusSettings:
    """Where the bus is and how to use it.

    ``urls``: NATS server URLs (a client fails over between them). ``prefix``: subject and
    bucket prefix (``Subjects``). ``replicas``: JetStream replicas of the buckets and
    streams this service creates (3 on a 3-node cluster). ``request_timeout_s``: JetStream
    API and publish timeout, seconds. ``drain_timeout_s``: how long SIGTERM's drain may
    take, seconds.
    """

    urls: tuple[str, ...] = (DEFAULT_URL,)
    prefix: str = DEFAULT_PREFIX
    replicas: int = 1
    request_timeout_s: float = 5.0
    drain_timeout_s: float = 3.0

    @property
    def subjects(self) -> Subjects:
        """The names on the bus for ``prefix``."""
        return Subjects(prefix=self.prefix)


TRUE = ("1", "true", "yes", "on")


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """An on/off setting from the environment: on for ``1``, ``true``, ``yes``, ``on`` (any
    case, spaces ignored), off for anything else or when ``name`` is unset."""
    return environ.get(name, "").strip().lower() in TRUE


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add ``--nats-url``, ``--prefix``, ``--replicas`` with defaults from ``VSLICE_NATS_URL``
    (comma list), ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``."""
    parser.add_argument(
        "--nats-url",
        default=environ.get("VSLICE_NATS_URL", DEFAULT_URL),
        help="NATS URL(s), comma-separated (env VSLICE_NATS_URL)",
    )
    parser.add_argument(
        "--prefix",
        default=environ.get("VSLICE_PREFIX", DEFAULT_PREFIX),
        help="subject and bucket prefix (env VSLICE_PREFIX)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=int(environ.get("VSLICE_BUCKET_REPLICAS", "1")),
        help="JetStream replicas of buckets and streams created (env VSLICE_BUCKET_REPLICAS)",
    )


def from_arguments(args: argparse.Namespace) -> BusSettings:
    """The ``BusSettings`` of parsed arguments (see ``add_arguments``).

    Raises ``ValueError`` for an invalid prefix or a replica count outside 1-5.
    """
    urls = tuple(u.strip() for u in str(args.nats_url).split(",") if u.strip())
    if not 1 <= args.replicas <= 5:
        raise ValueError(f"--replicas {args.replicas}: must be 1-5")
    settings = BusSettings(urls=urls or (DEFAULT_URL,), prefix=args.prefix, replicas=args.replicas)
    _ = settings.subjects  # validates the prefix
    return settings


async def _error_cb(exc: Exception) -> None:
    log.warning("nats: %s: %s", type(exc).__name__, exc)


async def connect(settings: BusSettings, *, name: str) -> Client:
    """Connect with unlimited reconnects; raises ``nats.errors.NoServersError`` when no
    server answers at first."""
    return await nats.connect(
        servers=list(settings.urls),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        drain_timeout=max(1, int(settings.drain_timeout_s)),
        error_cb=_error_cb,
        allow_reconnect=True,
    )


async def _bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    for attempt in range(5):
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(
                config=api.KeyValueConfig(bucket=bucket, history=1, replicas=replicas)
            )
        except BadRequestError:
            # another process created it with a different config, or at the same moment
            await asyncio.sleep(0.05 * (attempt + 1))
    return await js.key_value(bucket)


@dataclass(frozen=True)
class Bus:
    """The opened buckets of one prefix: ``nodes``, ``ledger`` and ``pods`` (claims)."""

    nodes: KeyValue
    ledger: KeyValue
    pods: KeyValue


async def ensure_bus(js: JetStreamContext, settings: BusSettings) -> Bus:
    """Open (creating when missing) the nodes, ledger and pods buckets and the alloc stream.

    Raises ``nats.js.errors.Error`` subclasses when JetStream refuses.
    """
    subjects = settings.subjects
    nodes = await _bucket(js, subjects.nodes_bucket, settings.replicas)
    ledger = await _bucket(js, subjects.ledger_bucket, settings.replicas)
    pods = await _bucket(js, subjects.pods_bucket, settings.replicas)
    try:
        await js.stream_info(subjects.alloc_stream)
    except NotFoundError:
        try:
            await js.add_stream(
                api.StreamConfig(
                    name=subjects.alloc_stream,
                    subjects=[subjects.alloc_all],
                    num_replicas=settings.replicas,
                    max_age=24 * 3600.0,
                )
            )
        except BadRequestError:
            await js.stream_info(subjects.alloc_stream)  # created meanwhile by another
    return Bus(nodes=nodes, ledger=ledger, pods=pods)


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
