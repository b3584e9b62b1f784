"""Fixtures of the CLI tests: the bus tests' nats-server and a unique prefix per test."""

from __future__ import annotations

from tests.bus.conftest import bus_settings, nats_server, nc, prefix

__all__ = ["bus_settings", "nats_server", "nc", "prefix"]
