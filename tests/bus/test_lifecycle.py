"""Every service runs as ``python -m services.<name>``, serves, and exits within 5 s of SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from tests.bus import helpers
from tests.bus.conftest import repo_root


def spawn(service: str, bus: BusSettings, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", f"services.{service}", "--nats-url", bus.urls[0]]
    cmd += bus.credential_arguments()
    with log.open("wb") as err:
        return subprocess.Popen(
            [*cmd, "--prefix", bus.prefix, *extra],
            cwd=repo_root(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


async def serving(nc: Client, bus: BusSettings, service: str) -> None:
    if service == "scheduler":
        await helpers.wait_for_subscribers(bus, bus.subjects.sched_stats)
    elif service == "admission":
        await helpers.wait_for_subscribers(bus, bus.subjects.admission_review)
    else:
        kv = None
        for _ in range(200):
            try:
                kv = await nc.jetstream().key_value(bus.subjects.nodes_bucket)
                if await kv.keys():
                    return
            except Exception:
                await asyncio.sleep(0.05)
        raise AssertionError("node agent never registered")


ROLES = {
    "scheduler": (Role.SCHEDULER, ""),
    "admission": (Role.ADMISSION, ""),
    "nodeagent": (Role.NODEAGENT, "*"),  # hosts two nodes
}


@pytest.mark.parametrize(
    ("service", "extra"),
    [
        ("scheduler", ("--name", "r1")),
        ("admission", ()),
        ("nodeagent", ("--nodes", "2", "--node-prefix", "box", "--name", "agent")),
    ],
)
async def test_a_service_started_as_a_module_exits_within_5_s_of_sigterm(
    nc: Client,
    nats_server: NatsServer,
    bus_settings: BusSettings,
    service: str,
    extra: tuple[str, ...],
    tmp_path: Path,
) -> None:
    log = tmp_path / f"{service}.log"
    await connecting.ensure_bus(nc.jetstream(), bus_settings)  # as the scheduler would
    role, node = ROLES[service]
    own = nats_server.identity(
        f"{service}-{bus_settings.prefix}", role, prefix=bus_settings.prefix, node=node
    )
    proc = spawn(service, own, log, *extra)
    try:
        await serving(nc, bus_settings, service)
        if service == "scheduler":
            reply = await nc.request(bus_settings.subjects.sched_schedule, b"\x00", timeout=5)
            assert isinstance(events.SCHEDULE_REPLY.decode(reply.data), events.BusError)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 5)
        assert rc == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert '"msg": "stopped"' in log.read_text()
