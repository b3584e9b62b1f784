"""A local stack survives a killed nats-server: ``vslice up`` completes it, data kept, and
what was placed before is released after."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from libshared import connecting, events
from tests.bus import helpers
from tests.bus.test_stacks import free_port, vslice
from vslice import stacks


async def place(settings: connecting.BusSettings, uid: str, memory_mib: int) -> object:
    nc = await connecting.connect(settings, name="t")
    try:
        return await helpers.schedule(nc, settings, helpers.pod(uid, memory_mib=memory_mib))
    finally:
        await nc.close()


def test_placements_acknowledged_before_nats_server_is_killed_are_kept_and_released_after_up(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "state")
    env = {"VSLICE_MOCKGPU_DEVICES": "GPU-mock-d:8000", "VSLICE_METRICS_PORT": str(free_port())}
    started = vslice("up", "--state-dir", state, env=env)
    assert started.returncode == 0, started.stderr
    try:
        before = stacks.read_state(Path(state))
        assert before is not None
        operator = before.settings("operator")
        placed = [asyncio.run(place(operator, f"p{i}", 1000 + i)) for i in range(3)]
        assert all(isinstance(p, events.Placement) for p in placed), placed

        os.kill(before.pids["nats"], signal.SIGKILL)
        while stacks.alive(before.pids["nats"]):
            time.sleep(0.05)
        hinted = vslice("status", "--state-dir", state)
        assert "NOT RUNNING" in hinted.stdout and "`vslice up` starts the stopped" in hinted.stdout
        assert hinted.returncode == 1  # not healthy: a monitor sees it
        again = vslice("up", "--state-dir", state, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "restarted" in again.stdout and "nats" in again.stdout
        assert "already up" not in again.stdout

        after = stacks.read_state(Path(state))
        assert after is not None
        assert after.nats_url == before.nats_url and after.pids["nats"] != before.pids["nats"]
        assert {k: v for k, v in after.pids.items() if k != "nats"} == {
            k: v for k, v in before.pids.items() if k != "nats"
        }  # the services were running: kept, reconnected
        (device,) = asyncio.run(stacks.allocation(after.settings("operator")))
        assert (device.slices, device.memory_mib) == (3, 1000 + 1001 + 1002)
        status = vslice("status", "--state-dir", state)
        assert "3/10" in status.stdout and "3003/8000" in status.stdout, status.stdout
        assert status.returncode == 0, status.stdout  # every service beats again
        # a placement made before the kill is released after it
        ack = asyncio.run(stacks.release(operator, "p1"))
        assert (ack.node, ack.slices) == (stacks.local_node(), 1)
        (device,) = asyncio.run(stacks.allocation(after.settings("operator")))
        assert (device.slices, device.memory_mib) == (2, 1000 + 1002)
        # the services reconnected: the restarted stack places again
        assert isinstance(asyncio.run(place(operator, "p3", 500)), events.Placement)
    finally:
        stopped = vslice("down", "--state-dir", state)
        assert stopped.returncode == 0, stopped.stderr
    recorded = tmp_path / "state" / stacks.STATE_FILE
    assert not recorded.exists(), json.loads(recorded.read_text())
