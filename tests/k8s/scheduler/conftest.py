"""Fixtures of the scheduler's Kubernetes tests: the bus tests' nats-server (one per
session, a unique prefix per test) and an emulated API server per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest

from tests.bus.conftest import bus_settings, nats_server, nc, prefix
from tests.k8s.scheduler.kubeapi import ApiServer

__all__ = ["api", "bus_settings", "nats_server", "nc", "prefix"]


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        yield server
