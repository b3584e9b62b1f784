"""``vslice up`` / ``status`` / ``down``: a whole local stack as background processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from libshared import connecting, events
from libshared.natsserver import NatsServer
from tests.bus import helpers
from tests.bus.conftest import repo_root
from vslice import stacks


def vslice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", *args],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_up_serves_status_shows_the_allocation_and_down_stops_everything(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "state")
    env = {"VSLICE_MOCKGPU_DEVICES": "GPU-mock-a:8000", "VSLICE_METRICS_PORT": str(free_port())}
    started = vslice("up", "--state-dir", state, env=env)
    assert started.returncode == 0, started.stderr
    recorded = json.loads((tmp_path / "state" / stacks.STATE_FILE).read_text())
    pids = recorded["pids"]
    assert sorted(pids) == [
        "admission",
        "metrics",
        "nats",
        "nodeagent",
        "scheduler-1",
        "scheduler-2",
    ]
    dashboard = recorded["metrics_url"]
    assert dashboard == f"http://127.0.0.1:{env['VSLICE_METRICS_PORT']}"
    assert f"dashboard: {dashboard}/" in started.stdout
    try:
        again = vslice("up", "--state-dir", state)
        assert again.returncode == 0 and "already up" in again.stdout
        assert json.loads((tmp_path / "state" / stacks.STATE_FILE).read_text()) == recorded

        bus = stacks.Stack(**recorded).settings("operator")

        async def place() -> events.Placement | events.Unschedulable | events.BusError:
            nc = await connecting.connect(bus, name="t")
            try:
                return await helpers.schedule(nc, bus, helpers.pod("p1", memory_mib=3000))
            finally:
                await nc.close()

        placed = asyncio.run(place())
        assert isinstance(placed, events.Placement)
        assert placed.node == stacks.local_node_name() + "-0"
        assert placed.slices[0].uuid == "GPU-mock-a"

        with urllib.request.urlopen(dashboard + "/metrics", timeout=5) as response:
            scraped = response.read().decode()
        assert 'device_uuid="GPU-mock-a"' in scraped and "hami_gpu_memory_limit_bytes" in scraped
        with urllib.request.urlopen(dashboard + "/", timeout=5) as response:
            assert b"vslice fleet" in response.read()

        described = vslice("status", "--state-dir", state, "--json")
        assert described.returncode == 0, described.stderr
        info = json.loads(described.stdout)
        assert info["nats_url"] == recorded["nats_url"]
        assert {n: p["state"] for n, p in info["processes"].items()} == dict.fromkeys(
            pids, "running"
        )
        assert asyncio.run(closed_to_strangers(info, placed.node)) == []

        status = vslice("status", "--state-dir", state)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("running") == 6 and "NOT RUNNING" not in status.stdout
        assert f"dashboard {dashboard}/" in status.stdout
        row = next(line for line in status.stdout.splitlines() if placed.slices[0].uuid in line)
        assert row.split()[2:] == ["1/10", "3000/8000", "0"]
    finally:
        stopped = vslice("down", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not any(stacks.alive(pid) for pid in pids.values())
    assert not (tmp_path / "state" / stacks.STATE_FILE).exists()
    assert (tmp_path / "state" / "logs" / "scheduler-1.log").exists()
    nats_log = (tmp_path / "state" / "logs" / stacks.NATS_LOG).read_text()
    assert "Server is ready" in nats_log  # nats-server's own log, kept with the others
    replica_lines = [
        json.loads(line)
        for name in ("scheduler-1", "scheduler-2")
        for line in (tmp_path / "state" / "logs" / f"{name}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    (decision,) = [r for r in replica_lines if r.get("event") == "schedule"]
    assert (decision["pod_uid"], decision["node"], decision["outcome"]) == (
        "p1",
        placed.node,
        "placed",
    )

    twice = vslice("down", "--state-dir", state)
    assert twice.returncode == 0 and "nothing up" in twice.stdout
    status = vslice("status", "--state-dir", state)
    assert status.returncode == 0 and "no stack up" in status.stdout


async def closed_to_strangers(info: dict[str, Any], node: str) -> list[str]:
    """What an anonymous client and the stack's CLI identity got that they should not
    have: the operator's credentials from ``status --json`` work, a client without
    credentials is refused, and the CLI identity can neither read the ledger nor forge a
    node agent's answer (empty: nothing)."""
    leaks: list[str] = []
    tls = ssl.create_default_context(cafile=info["tls_ca"])
    operator = await nats.connect(
        info["nats_url"],
        nkeys_seed=info["operator_nkey_seed"],
        tls=tls,
        allow_reconnect=False,
        inbox_prefix="_INBOX_operator-vslice",
    )
    await operator.jetstream().key_value("vslice-ledger")  # the operator may read
    await operator.close()
    try:
        stranger = await nats.connect(
            info["nats_url"], tls=tls, allow_reconnect=False, connect_timeout=2
        )
        leaks.append("an anonymous client was let in")
        await stranger.close()
    except nats.errors.Error:
        pass
    stack = stacks.read_state(Path(info["state_dir"]))
    assert stack is not None
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.set()

    cli = await connecting.connect(stack.settings("cli"), name="t", error_cb=on_error)
    try:
        await cli.publish(f"vslice.alloc.{node}.ready", b'{"type": "ready"}')
        await cli.flush()
        async with asyncio.timeout(10):
            await refused.wait()
        refused.clear()
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await cli.jetstream(timeout=10).key_value("vslice-ledger")
            leaks.append("the CLI identity opened the ledger")
        if not refused.is_set():
            async with asyncio.timeout(10):
                await refused.wait()
    finally:
        await cli.close()
    return leaks


def test_the_state_dir_comes_from_the_environment_else_a_per_user_default() -> None:
    assert stacks.default_state_dir({"VSLICE_STATE_DIR": "/x"}) == Path("/x")
    assert stacks.default_state_dir({"XDG_STATE_HOME": "/s"}) == Path("/s/vslice")
    assert stacks.default_state_dir({}) == Path.home() / ".local" / "state" / "vslice"


def test_every_service_command_of_a_stack_runs_a_vslice_service_module() -> None:
    commands = stacks.service_commands("nats://h:1", replicas=3, policy="fgd", workload_trace="t")
    assert list(commands) == ["admission", "scheduler-1", "scheduler-2", "scheduler-3", "nodeagent"]
    for argv in commands.values():
        assert argv[1:3] == ["-m", argv[2]] and argv[2].startswith("services.")
        assert argv[argv.index("--nats-url") + 1] == "nats://h:1"
    assert commands["scheduler-3"][-2:] == ["--workload-trace", "t"]
    seeds = [
        commands[f"scheduler-{i}"][commands[f"scheduler-{i}"].index("--seed") + 1]
        for i in (1, 2, 3)
    ]
    assert seeds == ["0", "1", "2"]  # each replica breaks ties in an order of its own
    shards = [
        (argv[argv.index("--replica-index") + 1], argv[argv.index("--replica-count") + 1])
        for argv in (commands[f"scheduler-{i}"] for i in (1, 2, 3))
    ]
    assert shards == [("0", "3"), ("1", "3"), ("2", "3")]  # each prefers a shard of its own
    with_metrics = stacks.service_commands("nats://h:1", metrics_port=9999)
    assert with_metrics["metrics"][2] == "services.metrics"
    assert with_metrics["metrics"][-4:] == ["--host", "127.0.0.1", "--port", "9999"]


def test_mock_gpus_come_from_a_device_list_else_a_count_and_size() -> None:
    listed = stacks.mock_agent_args({"VSLICE_MOCKGPU_DEVICES": "GPU-x:4000,GPU-y:8000"})
    assert listed[:2] == ["--devices", "GPU-x:4000,GPU-y:8000"]
    counted = stacks.mock_agent_args({"VSLICE_MOCKGPU_COUNT": "3"})
    assert "--devices" not in counted
    assert counted[counted.index("--gpus") + 1] == "3"
    assert counted[counted.index("--memory-mib") + 1] == "16384"
    for bad in ({"VSLICE_MOCKGPU_DEVICES": "GPU-x"}, {"VSLICE_MOCKGPU_COUNT": "two"}):
        with pytest.raises(stacks.StackError, match="mock GPU settings"):
            stacks.mock_agent_args(bad)


def test_the_metrics_port_comes_from_the_environment_else_9394_else_a_free_one() -> None:
    assert stacks.metrics_port("127.0.0.1", {"VSLICE_METRICS_PORT": "9500"}) == 9500
    with pytest.raises(stacks.StackError, match="VSLICE_METRICS_PORT"):
        stacks.metrics_port("127.0.0.1", {"VSLICE_METRICS_PORT": "nine"})
    with socket.socket() as holder:
        # already taken by another process: the fallback is what is tested either way
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", stacks.DEFAULT_METRICS_PORT))
        port = stacks.metrics_port("127.0.0.1", {})
    assert port != stacks.DEFAULT_METRICS_PORT and 0 < port < 65536


@pytest.mark.parametrize(
    ("environ", "level"),
    [({}, "info"), ({"VSLICE_LOG_LEVEL": "info,vslice.decisions=warning"}, None)],
)
def test_up_gives_every_service_the_log_level_of_its_environment(
    tmp_path: Path, environ: dict[str, str], level: str | None
) -> None:
    server = NatsServer(data_dir=tmp_path / "nats", port=4222)
    commands = stacks._stack_commands(
        server, {}, "vslice", tmp_path, environ, "127.0.0.1", 9394, replicas=2
    )
    wanted = level or environ["VSLICE_LOG_LEVEL"]
    assert sorted(commands) == ["admission", "metrics", "nodeagent", "scheduler-1", "scheduler-2"]
    for argv in commands.values():
        assert argv[argv.index("--log-level") + 1] == wanted
