"""Fixtures of the scheduler's Kubernetes tests: an emulated API server per test (the
nats-server and prefix fixtures are ``tests/conftest.py``'s)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest

from tests.scheduler.k8s.kubeapi import ApiServer


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        yield server
