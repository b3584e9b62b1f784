"""Wiring of the metrics service: connect, watch the bus into a view, serve HTTP, drain.

Lifecycle (nats.py's habit): SIGTERM or SIGINT sets an ``asyncio.Event``; the service then
stops serving HTTP, unsubscribes and drains its connection within the drain timeout.
Nothing here computes a figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from libshared import connecting, probes
from services.metrics.adapters import bus, http, quotas
from services.metrics.core.views import FleetView
from services.metrics.settings import Settings

log = logging.getLogger("vslice.metrics")


async def main(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set; without one, until SIGTERM/SIGINT. ``on_serving`` is
    called with the HTTP port once the view holds the buckets' content and HTTP serves.
    Raises ``connecting.BusClosedError`` once drained when its connection closed for
    good."""
    stop = connecting.stop_on_signals(stop)
    view = FleetView()
    registry = CollectorRegistry(auto_describe=False)
    instruments = bus.Instruments.create(registry)
    collector = http.ViewCollector(
        view=view,
        usage_ttl_s=settings.usage_ttl_s,
        stats_ttl_s=http.STATS_TTL_INTERVALS * settings.stats_interval_s,
        zone=settings.zone,
        legacy=settings.legacy_metrics,
    )
    registry.register(collector)
    health = probes.Probes()
    served = contextlib.AsyncExitStack()
    await probes.serving(health, settings.health, served)
    try:
        conn = await connecting.connect_service(
            settings.bus, name="metrics", service="metrics", stop=stop
        )
    except BaseException:
        await served.aclose()
        raise
    nc = conn.nc
    health.ready_when("nats", probes.connected(nc))
    runner = None
    feed: quotas.QuotaFeed | None = None
    try:
        js = nc.jetstream(timeout=settings.bus.request_timeout_s)
        await connecting.ensure_bus(js, settings.bus, create=False)
        watcher = bus.Watcher(
            nc=nc,
            js=js,
            subjects=settings.bus.subjects,
            view=view,
            instruments=instruments,
            stats_interval_s=settings.stats_interval_s,
            observe_requests=settings.observe_requests,
        )
        await watcher.start()
        for bucket in (settings.bus.subjects.nodes_bucket, settings.bus.subjects.ledger_bucket):
            health.ready_when(f"{bucket} watch", _watch_current(js, watcher, f"KV_{bucket}"))
        feed = quotas.QuotaFeed(
            js=js, subjects=settings.bus.subjects, rejected=instruments.rejected
        )
        feed.start()
        collector.quotas = feed.series
        app = http.application(
            view, registry, collector, usage_ttl_s=settings.usage_ttl_s, health=health
        )
        runner, port = await http.serve(app, host=settings.host, port=settings.port)
        log.info("metrics serving", extra={"host": settings.host, "port": port})
        health.started()
        if on_serving is not None:
            on_serving(port)
        await stop.wait()
        health.stopping()
        log.info("draining")
        await runner.cleanup()
        runner = None
        await watcher.stop()
    except (nats.errors.Error, TimeoutError):
        await conn.lifeline.verdict()  # a connection lost for good exits as such
        raise
    finally:
        if feed is not None:
            await feed.stop()
        if runner is not None:
            await runner.cleanup()
        await conn.close()
        await served.aclose()
    log.info("stopped")
    conn.lifeline.check()


def _watch_current(js: JetStreamContext, watcher: bus.Watcher, stream: str) -> probes.Check:
    """``/readyz`` fails while the watch of ``stream`` lags its end (``probes.WatchCurrent``)."""

    def seen() -> int:
        return watcher.seen.get(stream, 0)

    return probes.WatchCurrent(js=js, stream=stream, seen=seen)
