"""Wiring of the admission service: connect, serve reviews, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from libshared import connecting
from services.admission.adapters import bus
from services.admission.settings import Settings

log = logging.getLogger("vslice.admission")


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set; without one, until SIGTERM/SIGINT."""
    stop = connecting.stop_on_signals(stop)
    nc = await connecting.connect(settings.bus, name="admission")
    try:
        reviewer = bus.Reviewer(nc=nc, subjects=settings.bus.subjects, resources=settings.resources)
        await reviewer.start()
        log.info("admission serving", extra={"subject": settings.bus.subjects.admission_review})
        await stop.wait()
        log.info("draining")
    finally:
        await connecting.drain_quietly(nc)
    log.info("stopped")
