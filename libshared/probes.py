"""Health endpoints every service serves over HTTP: ``GET /healthz`` and ``GET /readyz``.

``/healthz`` (liveness: restart me when it fails) answers 200 while the process is alive
and its event loop responsive: a ticker task on the loop must have ticked within
``stall_s`` seconds, and every task the service registered with ``Probes.task`` must still
be running. A loop blocked outright answers nothing at all, so an HTTP probe times out
where a TCP probe would still pass (the kernel accepts the connection for a stalled
process).

``/readyz`` (readiness: send me work) answers 200 once the service said it started and
every readiness check passes -- connected to NATS, buckets open, watches current, as each
service registers them -- and 503 with one reason per line otherwise: while starting, when
a check fails, once the service is stopping, and whenever ``/healthz`` would fail.

A check is a callable returning ``""`` when it passes, else the reason (or an awaitable
of that); one that raises or takes longer than ``check_timeout_s`` fails with that as
its reason. The endpoints go on a port of their own (``serve``; ``--health-port`` /
``$VSLICE_HEALTH_PORT``, 0 = off) or into a service's own aiohttp application
(``Probes.routes``). Kubernetes' probe semantics: kubernetes.io docs, "Configure
Liveness, Readiness and Startup Probes" (any code from 200 to 399 passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger("vslice.probes")

Check = Callable[[], str | Awaitable[str]]

STALL_S = 10.0  # a loop that did not tick for this long fails /healthz
TICK_S = 0.5
CHECK_TIMEOUT_S = 2.0  # the kubelet's probe timeout defaults to 1 s; checks fail faster than
STALE_S = 10.0  # a watch that has not reached the stream's end seen this long ago is stale


@dataclass(frozen=True)
class HealthSettings:
    """Where ``/healthz`` and ``/readyz`` are served: ``port`` (0: not on a port of their
    own) on ``host``."""

    port: int = 0
    host: str = "127.0.0.1"


@dataclass
class Probes:
    """A service's liveness and readiness. ``stall_s``: longest time between two ticks of
    the loop before ``/healthz`` fails, seconds; ``tick_s``: the ticker's period, seconds;
    ``check_timeout_s``: longest a check may take, seconds. Call ``start()`` on the loop
    before serving, ``started()`` once the service is ready to take work, ``stopping()``
    when it begins to drain."""

    stall_s: float = STALL_S
    tick_s: float = TICK_S
    check_timeout_s: float = CHECK_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    _live: dict[str, Check] = field(default_factory=dict)
    _ready: dict[str, Check] = field(default_factory=dict)
    _started: bool = False
    _stopping: bool = False
    _last_tick: float | None = None
    _ticker: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.tick_s < self.stall_s:
            raise ValueError(
                f"tick_s {self.tick_s}, stall_s {self.stall_s}: need 0 < tick_s < stall_s"
            )

    # -- what the service registers ------------------------------------------------------

    def alive_when(self, name: str, check: Check) -> None:
        """``/healthz`` (and so ``/readyz``) fails with ``check``'s reason."""
        self._live[name] = check

    def ready_when(self, name: str, check: Check) -> None:
        """``/readyz`` fails with ``check``'s reason."""
        self._ready[name] = check

    def task(self, name: str, task: asyncio.Task[object]) -> None:
        """``/healthz`` fails once ``task`` -- a loop the service cannot work without --
        has ended, naming how (cancelled, its exception, or returned)."""

        def running() -> str:
            if not task.done():
                return ""
            if task.cancelled():
                return f"{name}: cancelled"
            exc = task.exception()
            return f"{name}: ended" + ("" if exc is None else f" with {exc!r}")

        self._live[name] = running

    def started(self) -> None:
        """The service is ready to take work (its checks still apply)."""
        self._started = True

    def stopping(self) -> None:
        """The service drains: ``/readyz`` fails from now on."""
        self._stopping = True

    # -- the ticker ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the ticker on the running loop (idempotent)."""
        if self._ticker is None:
            self._last_tick = self.clock()
            self._ticker = asyncio.create_task(self._tick(), name="health-ticker")

    async def stop(self) -> None:
        """Stop the ticker."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        while True:
            self._last_tick = self.clock()
            await asyncio.sleep(self.tick_s)

    # -- the answers ---------------------------------------------------------------------

    async def liveness(self) -> list[str]:
        """Why the process is not alive (``[]``: it is)."""
        reasons = []
        if self._last_tick is None or self._ticker is None or self._ticker.done():
            reasons.append("event loop: health ticker not running")
        else:
            since = self.clock() - self._last_tick
            if since > self.stall_s:
                reasons.append(f"event loop: no tick for {since:.1f} s (limit {self.stall_s:g} s)")
        reasons += await self._run(self._live)
        return reasons

    async def readiness(self) -> list[str]:
        """Why the service should get no work (``[]``: it should)."""
        reasons = await self.liveness()
        if self._stopping:
            reasons.append("stopping")
        elif not self._started:
            reasons.append("starting")
        reasons += await self._run(self._ready)
        return reasons

    async def _run(self, checks: Mapping[str, Check]) -> list[str]:
        reasons = []
        for name, check in list(checks.items()):
            try:
                async with asyncio.timeout(self.check_timeout_s):
                    outcome = check()
                    why = await outcome if inspect.isawaitable(outcome) else outcome
            except TimeoutError:
                why = f"{name}: no answer within {self.check_timeout_s:g} s"
            except Exception as exc:  # a failing check is a reason, never a 500
                why = f"{name}: {type(exc).__name__}: {exc}"
            if why:
                reasons.append(why)
        return reasons

    def routes(self) -> list[web.RouteDef]:
        """``GET /healthz`` and ``GET /readyz``: 200 ``ok``, or 503 with the reasons, one
        per line."""
        return [web.get("/healthz", self._on_healthz), web.get("/readyz", self._on_readyz)]

    async def _on_healthz(self, request: web.Request) -> web.Response:
        return _answer(await self.liveness())

    async def _on_readyz(self, request: web.Request) -> web.Response:
        return _answer(await self.readiness())


def _answer(reasons: list[str]) -> web.Response:
    if reasons:
        return web.Response(status=503, text="\n".join(reasons) + "\n")
    return web.Response(text="ok\n")


async def serve(probes: Probes, settings: HealthSettings) -> tuple[web.AppRunner, int] | None:
    """Start ``probes``' ticker and serve its routes on ``settings.host:settings.port``;
    ``None`` when the port is 0. Returns the runner (``cleanup()`` stops it) and the bound
    port. Raises ``OSError`` when the port is taken."""
    await probes.start()
    if not settings.port:
        return None
    app = web.Application(client_max_size=1024)
    app.add_routes(probes.routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1]) if runner.addresses else settings.port
    log.info("health serving", extra={"host": settings.host, "port": port})
    return runner, port


async def serving(
    probes: Probes, settings: HealthSettings, stack: contextlib.AsyncExitStack
) -> int | None:
    """``serve`` with its shutdown (and the ticker's) pushed on ``stack``; the bound port."""
    stack.push_async_callback(probes.stop)
    started = await serve(probes, settings)
    if started is None:
        return None
    runner, port = started
    stack.push_async_callback(runner.cleanup)
    return port


# -- checks every bus service uses ---------------------------------------------------------


def connected(nc: Client) -> Check:
    """Passes while ``nc`` is connected to a NATS server (not while it reconnects)."""

    def check() -> str:
        if nc.is_closed:
            return "NATS: connection closed"
        if not nc.is_connected:
            return "NATS: not connected (reconnecting)"
        return ""

    return check


@dataclass
class WatchCurrent:
    """A watch of a JetStream stream is current when the sequence it has taken in
    (``seen()``) reaches the stream's last sequence as it stood at most ``stale_s`` seconds
    ago. Each call reads the stream's last sequence (one request); while the watch lags
    behind a sequence it has had ``stale_s`` seconds to reach, the check fails naming both
    sequences. ``stream`` names the stream (``KV_<bucket>`` for a bucket)."""

    js: JetStreamContext
    stream: str
    seen: Callable[[], int]
    stale_s: float = field(default_factory=lambda: STALE_S)
    clock: Callable[[], float] = time.monotonic
    _target: int = 0
    _since: float | None = None

    async def __call__(self) -> str:
        last = (await self.js.stream_info(self.stream)).state.last_seq
        seen = self.seen()
        now = self.clock()
        if seen >= last:
            self._since = None
            return ""
        if self._since is None or seen >= self._target:
            # behind a new end of the stream: give it stale_s to get there
            self._target, self._since = last, now
            return ""
        behind = now - self._since
        if behind > self.stale_s:
            return (
                f"watch of {self.stream}: at sequence {seen}, the stream was at {self._target} "
                f"{behind:.0f} s ago (now {last})"
            )
        return ""


@dataclass
class ConsumerCurrent:
    """A durable pull consumer is current while nothing waits for it (``num_pending``, the
    stream's messages it has not been handed yet, is 0) or while it keeps taking messages:
    the check fails when messages have waited ``stale_s`` seconds with the consumer's
    delivered sequence unchanged, naming how many wait. One request per call."""

    js: JetStreamContext
    stream: str
    durable: str
    stale_s: float = field(default_factory=lambda: STALE_S)
    clock: Callable[[], float] = time.monotonic
    _delivered: int = -1
    _since: float | None = None

    async def __call__(self) -> str:
        info = await self.js.consumer_info(self.stream, self.durable)
        pending = info.num_pending or 0
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        delivered = delivered or 0
        now = self.clock()
        if pending == 0:
            self._since = None
            return ""
        if self._since is None or delivered != self._delivered:
            self._delivered, self._since = delivered, now
            return ""
        waited = now - self._since
        if waited > self.stale_s:
            return (
                f"consumer {self.durable} of {self.stream}: {pending} messages waiting, "
                f"none taken for {waited:.0f} s"
            )
        return ""


@dataclass
class Beat:
    """A loop that must keep going: ``mark()`` each time it completes a round; the check
    fails once no round completed for ``limit_s`` seconds (counted from creation before
    the first)."""

    name: str
    limit_s: float
    clock: Callable[[], float] = time.monotonic
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.limit_s > 0:
            raise ValueError(f"Beat {self.name!r}: limit_s {self.limit_s} must be above 0")
        self._last = self.clock()

    def mark(self) -> None:
        self._last = self.clock()

    def __call__(self) -> str:
        since = self.clock() - self._last
        if since > self.limit_s:
            return f"{self.name}: no round for {since:.0f} s (limit {self.limit_s:g} s)"
        return ""
