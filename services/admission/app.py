"""Wiring of the admission service: connect, serve reviews, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from libshared import connecting
from services.admission.adapters import bus
from services.admission.settings import Settings

log = logging.getLogger("vslice.admission")


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set; without one, until SIGTERM/SIGINT."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    nc = await connecting.connect(settings.bus, name="admission")
    try:
        reviewer = bus.Reviewer(nc=nc, subjects=settings.bus.subjects, resources=settings.resources)
        await reviewer.start()
        log.info("admission serving", extra={"subject": settings.bus.subjects.admission_review})
        await stop.wait()
        log.info("draining")
    finally:
        try:
            await nc.drain()
        except Exception as exc:  # the connection may already be gone; exiting is what matters
            log.warning("drain failed", extra={"error": str(exc)})
    log.info("stopped")
