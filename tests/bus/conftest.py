"""Fixtures of the bus tests: one real nats-server per test session, a unique prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

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
    return BusSettings(urls=(nats_server.url,), prefix=prefix)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
