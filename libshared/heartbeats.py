"""Heartbeats: each service says, every few seconds, that it still serves the bus.

A pid that lives says nothing about a process that lost its connection, or hangs: a
replica whose connection the server closed stayed "running" for good. So every service
publishes a small ``Heartbeat`` on ``<prefix>.health.<identity>.<instance>`` every
``interval_s`` seconds while it is connected (``beat``), and ``vslice status`` calls a
service healthy only while its last heartbeat is younger than ``STALE_INTERVALS``
intervals (``health``). Each identity may publish under its own identity token only
(``libshared.permissions``), so no service can beat for another.

The ``<prefix>-health`` stream (created with the buckets, ``libshared.connecting``) keeps
the last heartbeat of each subject, in memory, for ``MAX_AGE_S``: a reader gets every
service's last word at once (``latest``) instead of listening for an interval.

What it leaves to others: starting the beat in each service (their ``app.py``), saying
what the figures mean to people (``vslice.statuses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from libshared import bounds
from libshared.subjects import Subjects

log = logging.getLogger("vslice.heartbeats")

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 60.0
STALE_INTERVALS = 3  # a heartbeat older than this many intervals: the service is unhealthy
MAX_AGE_S = 3600.0  # the stream forgets a subject silent this long (a service gone for good)
MAX_MSG_BYTES = 4096  # the stream refuses anything larger (a heartbeat is ~200 bytes)
MAX_BYTES = 1 << 20  # the whole stream, in memory (reserved): ~5,000 services
MAX_PID = 1 << 22  # Linux's pid_max ceiling

_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_LABEL = r"^[A-Za-z0-9_-]+$"

Token = Annotated[str, msgspec.Meta(min_length=1, max_length=bounds.MAX_LABEL, pattern=_LABEL)]
Instance = Annotated[str, msgspec.Meta(min_length=1, max_length=bounds.MAX_NAME, pattern=_LABEL)]


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """One service instance alive on the bus: ``service`` (admission, scheduler,
    nodeagent, metrics), ``instance`` (its name, e.g. ``scheduler-1``), ``identity`` (its
    bus identity), ``pid`` and ``host`` of its process, ``interval_s`` until the next one
    (seconds), ``sent_at`` (Unix seconds, the sender's clock)."""

    service: Token
    instance: Instance
    identity: Instance
    pid: Annotated[int, msgspec.Meta(ge=0, le=MAX_PID)]
    host: bounds.PodName
    interval_s: Annotated[float, msgspec.Meta(ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S)]
    sent_at: Annotated[float, msgspec.Meta(ge=0, le=1e11)]


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(Heartbeat)


def token(name: str) -> str:
    """``name`` as one subject token of at most ``bounds.MAX_NAME`` characters: every
    character other than letters, digits, ``-`` and ``_`` becomes ``-`` ("-" for "").
    Pure."""
    return _TOKEN.sub("-", name)[: bounds.MAX_NAME] or "-"


def subject(subjects: Subjects, *, identity: str, instance: str) -> str:
    """The heartbeat subject of ``instance`` connected as ``identity``. Pure."""
    return subjects.health(token(identity), token(instance))


async def beat(
    nc: Client,
    subjects: Subjects,
    *,
    service: str,
    instance: str,
    identity: str,
    interval_s: float = DEFAULT_INTERVAL_S,
    clock: Callable[[], float] = time.time,
) -> None:
    """Publish this process's ``Heartbeat`` every ``interval_s`` seconds while ``nc`` is
    connected, until cancelled (a failed publish is retried at the next beat). Raises
    ``ValueError`` for an interval outside ``MIN_INTERVAL_S``-``MAX_INTERVAL_S``."""
    if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
        raise ValueError(
            f"heartbeat interval {interval_s!r} s: must be {MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g}"
        )
    to = subject(subjects, identity=identity or "-", instance=instance)
    host = socket.gethostname()[: bounds.MAX_NAME]
    while True:
        if nc.is_connected:
            body = ENCODER.encode(
                Heartbeat(
                    service=token(service)[: bounds.MAX_LABEL],
                    instance=token(instance),
                    identity=token(identity or "-"),
                    pid=os.getpid(),
                    host=host,
                    interval_s=interval_s,
                    sent_at=clock(),
                )
            )
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.publish(to, body)
        await asyncio.sleep(interval_s)


def start(
    nc: Client,
    subjects: Subjects,
    *,
    service: str,
    instance: str,
    identity: str,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> asyncio.Task[None]:
    """``beat`` as a task (cancel it on the way out). Raises ``ValueError`` as ``beat``."""
    if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
        raise ValueError(
            f"heartbeat interval {interval_s!r} s: must be {MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g}"
        )
    return asyncio.create_task(
        beat(
            nc,
            subjects,
            service=service,
            instance=instance,
            identity=identity,
            interval_s=interval_s,
        ),
        name=f"heartbeat-{instance}",
    )


@dataclass(frozen=True)
class Seen:
    """A service's last heartbeat and its ``age_s``: seconds since the server stored it."""

    heartbeat: Heartbeat
    age_s: float

    @property
    def stale(self) -> bool:
        """True when the service missed ``STALE_INTERVALS`` heartbeats."""
        return stale(self.age_s, self.heartbeat.interval_s)


def stale(age_s: float, interval_s: float) -> bool:
    """True when a heartbeat ``age_s`` seconds old, sent every ``interval_s`` seconds,
    is older than ``STALE_INTERVALS`` intervals. Pure."""
    return age_s > STALE_INTERVALS * interval_s


async def latest(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> list[Seen]:
    """The last heartbeat of every instance in the ``<prefix>-health`` stream (empty when
    the stream does not exist yet), by subject; a message that does not decode is
    skipped with a warning. Raises ``nats.errors.Error`` when the bus does not answer."""
    try:
        info = await js.stream_info(subjects.health_stream, subjects_filter=subjects.health_all)
    except NotFoundError:
        return []
    out = []
    for name in sorted(info.state.subjects or {}):
        try:
            msg = await js.get_last_msg(subjects.health_stream, name)
        except NotFoundError:
            continue  # aged out meanwhile
        try:
            heartbeat = DECODER.decode(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("heartbeat skipped", extra={"subject": name, "error": str(exc)})
            continue
        stored = msg.time if isinstance(msg.time, datetime.datetime) else None
        age = (now() - stored).total_seconds() if stored is not None else math.inf
        out.append(Seen(heartbeat=heartbeat, age_s=max(0.0, age)))
    return out
