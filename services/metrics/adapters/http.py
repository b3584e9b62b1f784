"""The metrics service's HTTP side (aiohttp): ``/metrics``, the dashboard, its data.

Routes: ``GET /metrics`` (Prometheus text format: the families of
``services.metrics.core.exporting`` drawn from the view at scrape time, plus the latency
histogram and rejection counter), ``GET /`` (the dashboard page, plain HTML and JS, no
build step, nothing fetched from elsewhere), its data from ``services.metrics.core.dashboards``:
``GET /api/summary`` (fleet figures and the last hour's history), ``GET /api/nodes``
(one page of nodes: ``node``, ``type``, ``namespace``, ``pod``, ``sort``, ``offset``,
``limit``; 400 with the parameter named for a bad one), ``GET /api/nodes/{node}`` (one
node's GPUs and slices; 404 for an unknown node), ``GET /api/fleet`` (everything in one
object, for tools), and ``GET /favicon.svg`` / ``/favicon.ico``, ``GET /healthz`` (200
while the process serves and its loop is responsive), ``GET /readyz`` (200 while the view
is fed -- connected to the bus, the bucket watches current, not stopping -- else 503 with
the reasons; ``libshared.probes``). Thin glue: every
figure comes from the core. A background task records the fleet figures every
``history_interval_s`` seconds for the history.

The families are drawn from the view on the event loop (the view is only touched there)
and encoded to text in a worker thread: at the openb fleet's size the encoding is about
nine tenths of a scrape (``benchmarks/metrics.py``), and the loop keeps taking bus
messages meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from libshared import probes
from services.metrics.core import dashboards, exporting, views
from services.metrics.core.views import FleetView

STATS_TTL_INTERVALS = 3  # a replica silent for this many stats intervals is dropped


def build_info() -> exporting.BuildInfo:
    """This process's ``hami_build_info`` labels: the installed vslice version, the
    interpreter and the platform (``revision`` and ``build_date`` from the environment's
    ``VSLICE_REVISION`` / ``VSLICE_BUILD_DATE`` when an image sets them)."""
    try:
        version = importlib.metadata.version("vslice")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return exporting.BuildInfo(
        version=version,
        revision=os.environ.get("VSLICE_REVISION", ""),
        build_date=os.environ.get("VSLICE_BUILD_DATE", ""),
        go_version=f"python{platform.python_version()}",
        compiler=sys.implementation.name,
        platform=f"{sys.platform}/{platform.machine().lower()}",
    )


def no_quotas() -> list[exporting.Quota]:
    """The ResourceQuota source of a collector given none (the service wires the quotas
    bucket's feed, ``adapters.quotas``)."""
    return []


@dataclass(eq=False)  # registries key collectors by identity
class ViewCollector(Collector):
    """A prometheus-client collector drawing HAMi's and vslice's families from ``view`` at
    each scrape (so a released slice's series are gone at the next scrape).

    ``legacy``: serve HAMi's pre-v2.9 names too. ``quotas``: the ResourceQuota source of
    ``hami_resource_quota_used`` / ``_limit``, called at each scrape (the hook a quota
    feed plugs into; none by default). ``build``: ``hami_build_info``'s labels.
    """

    view: FleetView
    usage_ttl_s: float
    stats_ttl_s: float
    zone: str = exporting.ZONE
    clock: Callable[[], float] = time.time
    legacy: bool = False
    quotas: Callable[[], Iterable[exporting.Quota]] = no_quotas
    build: exporting.BuildInfo = field(default_factory=build_info)
    frozen: list[Metric] | None = None

    def families(self) -> list[Metric]:
        """HAMi's and vslice's families of the view as it is now."""
        now = self.clock()
        snapshot = self.view.snapshot(now=now, usage_ttl_s=self.usage_ttl_s)
        stats = self.view.live_stats(now=now, ttl_s=self.stats_ttl_s)
        return [
            exporting.build_family(self.build),
            *exporting.hami_families(
                snapshot, now=now, zone=self.zone, quotas=self.quotas(), legacy=self.legacy
            ),
            *exporting.vslice_families(snapshot, stats=stats),
        ]

    def collect(self) -> Iterable[Metric]:
        """``frozen`` when a scrape drew the families beforehand, else ``families()``."""
        return self.frozen if self.frozen is not None else self.families()


def page(name: str = "index.html") -> bytes:
    """A file of the dashboard (``static/<name>`` of this package)."""
    return resources.files("services.metrics").joinpath(f"static/{name}").read_bytes()


HISTORY_INTERVAL_S = 10.0  # 360 points for the hour the page draws
SNAPSHOT_REUSE_S = 1.0  # a dashboard snapshot of an unchanged view serves this long


def application(
    view: FleetView,
    registry: CollectorRegistry,
    collector: ViewCollector,
    *,
    usage_ttl_s: float,
    clock: Callable[[], float] = time.time,
    unready: Callable[[], str] = lambda: "",
    history_interval_s: float = HISTORY_INTERVAL_S,
    health: probes.Probes | None = None,
) -> web.Application:
    """The aiohttp application serving ``registry`` (which holds ``collector``, drawing
    from ``view``) and the dashboard of ``view``, recording its history every
    ``history_interval_s`` seconds while it runs. ``/healthz`` and ``/readyz`` are
    ``health``'s (``libshared.probes``); without it, ready when ``unready`` says so
    (``""``), else 503 with its reason."""
    own = health is None  # then its ticker runs with this application
    if health is None:
        health = probes.Probes()
        health.ready_when("wiring", unready)
        health.started()
    body = page()
    icon = page("favicon.svg")
    scraping = asyncio.Lock()
    tracker = dashboards.Tracker()

    taken: list[tuple[float, tuple[int, ...], views.Snapshot]] = []

    def snapshot() -> tuple[float, views.Snapshot]:
        # At a thousand nodes a snapshot takes a few hundred ms; the page asks for a summary
        # and a node page at once, so one taken this second of an unchanged view serves both.
        now = clock()
        state = (
            view.ledger_seq,
            sum(map(id, view.nodes.values())),
            sum(map(id, view.ledgers.values())),
            sum(id(report) for report, _ in view.usage.values()),
        )
        if taken and taken[0][1] == state and 0 <= now - taken[0][0] < SNAPSHOT_REUSE_S:
            return now, taken[0][2]
        snap = view.snapshot(now=now, usage_ttl_s=usage_ttl_s)
        taken[:] = [(now, state, snap)]
        return now, snap

    async def as_json(data: object) -> web.Response:
        text = await asyncio.to_thread(json.dumps, data, separators=(",", ":"))
        return web.Response(text=text, content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        async with scraping:
            collector.frozen = collector.families()
            try:
                text = await asyncio.to_thread(generate_latest, registry)
            finally:
                collector.frozen = None
        out = web.Response(body=text)
        out.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return out

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    async def fleet(request: web.Request) -> web.Response:
        now = clock()
        snapshot = view.snapshot(now=now, usage_ttl_s=usage_ttl_s)
        data = dashboards.fleet(snapshot, now=now)
        text = await asyncio.to_thread(json.dumps, data)
        return web.Response(text=text, content_type="application/json")

    async def summary(request: web.Request) -> web.Response:
        now, snap = snapshot()
        return await as_json(dashboards.summary(snap, now=now, tracker=tracker))

    async def nodes(request: web.Request) -> web.Response:
        try:
            query = dashboards.parse_query(request.query)
        except dashboards.QueryError as exc:
            return web.json_response(
                {"error": str(exc), "field": exc.field, "value": exc.value}, status=400
            )
        now, snap = snapshot()
        return await as_json(dashboards.node_page(snap, query, now=now, tracker=tracker))

    async def node(request: web.Request) -> web.Response:
        name = request.match_info["node"]
        now, snap = snapshot()
        detail = dashboards.node_detail(snap, name, now=now, tracker=tracker)
        if detail is None:
            return web.json_response({"error": f"node {name!r}: not in the fleet"}, status=404)
        return await as_json(detail)

    async def favicon(request: web.Request) -> web.Response:
        out = web.Response(body=icon, content_type="image/svg+xml")
        out.headers["Cache-Control"] = "max-age=86400"
        return out

    async def recording(app: web.Application) -> AsyncIterator[None]:
        async def record() -> None:
            while True:
                now, snap = snapshot()
                tracker.record(snap, now=now)
                await asyncio.sleep(history_interval_s)

        task = asyncio.create_task(record())
        await health.start()
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if own:
            await health.stop()

    app = web.Application(client_max_size=1024)
    app.cleanup_ctx.append(recording)
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_get("/api/summary", summary)
    app.router.add_get("/api/nodes", nodes)
    app.router.add_get("/api/nodes/{node}", node)
    app.router.add_get("/favicon.svg", favicon)
    app.router.add_get("/favicon.ico", favicon)
    app.add_routes(health.routes())
    return app


async def serve(app: web.Application, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app`` on ``host:port`` (0: a free port); returns the runner (its
    ``cleanup()`` stops it) and the port bound. Raises ``OSError`` when the port is taken."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    return runner, bound
