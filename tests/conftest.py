"""Fixtures of every test that talks to a bus: one real nats-server per test session
(authorization and TLS on, as everywhere), a unique prefix per test; the test's own client
is an operator. (The bus tests of each service live with that service's tests.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client

from libshared import connecting
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(data_dir=tmp_path_factory.mktemp("nats"))
    with server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus_settings(nats_server: NatsServer, prefix: str) -> BusSettings:
    """The operator identity on the test's prefix."""
    return nats_server.bus_settings(prefix=prefix)


@pytest.fixture
async def nc(bus_settings: BusSettings) -> AsyncIterator[Client]:
    client = await connecting.connect(bus_settings, name="test")
    yield client
    await client.close()
