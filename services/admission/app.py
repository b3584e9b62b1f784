"""Wiring of the admission service: the bus handler and/or the HTTPS webhook, until SIGTERM.

The bus handler runs when ``settings.bus`` is set, the webhook when
``settings.webhook.port`` is; both read pods with the same resource model. ``/healthz``
and ``/readyz`` (``libshared.probes``) on ``settings.health.port``: ready once connected
to NATS and the webhook serves. On the way out
the webhook stops first (not ready, then closed), then the bus connection drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from libshared import connecting, probes
from services.admission.adapters import bus, webhook
from services.admission.settings import Settings

log = logging.getLogger("vslice.admission")


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set; without one, until SIGTERM/SIGINT.

    Raises ``ValueError`` when neither the bus nor the webhook is configured, what
    ``webhook.Server.start`` raises for an unreadable certificate or a taken port, and
    ``connecting.BusClosedError`` once drained when the bus connection closed for good.
    """
    if settings.bus is None and not settings.webhook.port:
        raise ValueError("nothing to serve: no bus and no webhook port")
    cert, key = settings.webhook.tls_cert, settings.webhook.tls_key
    if settings.webhook.port and not (cert and key):
        raise ValueError("the webhook needs tls_cert and tls_key (HTTPS only)")
    stop = connecting.stop_on_signals(stop)
    health = probes.Probes()
    async with contextlib.AsyncExitStack() as stack:
        await probes.serving(health, settings.health, stack)
        lifeline = None
        if settings.bus is not None:
            conn = await connecting.connect_service(
                settings.bus, name="admission", service="admission", stop=stop
            )
            stack.push_async_callback(conn.close)
            lifeline = conn.lifeline
            health.ready_when("nats", probes.connected(conn.nc))
            reviewer = bus.Reviewer(
                nc=conn.nc, subjects=settings.bus.subjects, resources=settings.resources
            )
            await reviewer.start()
            log.info("admission serving", extra={"subject": settings.bus.subjects.admission_review})
        if settings.webhook.port:
            assert cert and key  # checked above
            hook = webhook.Webhook(settings=settings.mutation)
            health.ready_when("webhook", lambda: "" if hook.ready else "webhook: not serving")
            server = webhook.Server(
                webhook=hook,
                cert=cert,
                key=key,
                host=settings.webhook.host,
                port=settings.webhook.port,
                reload_s=settings.webhook.tls_reload_s,
            )
            stack.push_async_callback(server.stop)  # also after a failed start
            await server.start()
        health.started()
        await stop.wait()
        health.stopping()
        log.info("draining")
    log.info("stopped")
    if lifeline is not None:
        lifeline.check()
