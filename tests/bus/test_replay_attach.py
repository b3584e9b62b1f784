"""``vslice replay --attach``: the replay runs on the stack of ``vslice up`` -- its replicas,
its metrics, its ``vslice status`` -- with the fleet's mock nodes added for the run, and
leaves the stack as it found it unless ``--keep``."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from libshared import connecting
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from tests.bus import helpers
from tests.bus.test_replays_bus import small_trace
from tests.bus.test_stacks import free_port, vslice
from vslice import cli, replays_bus, stacks


def replay(
    trace: str, fleet: str, state: str, out: Path, *extra: str
) -> tuple[int, dict[str, object]]:
    argv = ["replay", trace, "--fleet", fleet, "--attach", "--state-dir", state, "--quiet"]
    code = cli.main([*argv, "--concurrency", "8", "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if code == 0 else {})


def ledgers(bus: BusSettings) -> dict[str, NodeLedger]:
    async def read() -> dict[str, NodeLedger]:
        nc = await connecting.connect(bus, name="t")
        try:
            return await helpers.ledgers(nc, bus)
        finally:
            await nc.close()

    return asyncio.run(read())


def replay_pods(bus: BusSettings) -> dict[str, set[str]]:
    """The replay's pods in the stack's ledger, by node."""
    return {
        node: {uid for uid in ledger.pods() if uid.startswith("replay-")}
        for node, ledger in ledgers(bus).items()
    }


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def allocated_on_fleet(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hami_gpu_memory_allocated_bytes{") and 'node="node-' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_an_attached_replay_shows_in_the_stack_and_leaves_it_as_found_unless_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, fleet = small_trace(tmp_path)
    state = str(tmp_path / "state")
    env = {"VSLICE_MOCKGPU_DEVICES": "GPU-mock-a:8000", "VSLICE_METRICS_PORT": str(free_port())}
    started = vslice("up", "--state-dir", state, env=env)
    assert started.returncode == 0, started.stderr
    stack = stacks.read_state(Path(state))
    assert stack is not None
    bus = stack.settings("operator")
    kept = stack
    try:
        code, report = replay(trace, fleet, state, tmp_path / "one.json", "--seeds", "5")
        assert code == 0, capsys.readouterr().err
        assert report["attached"] == state and report["replicas"] == 2
        assert report["policy"] == stack.policy == "hami"
        assert 0 < report["pods_placed"] < report["pods_total"]  # type: ignore[operator]
        # gone again: the fleet's agent, its nodes and the replay's pods
        after = stacks.read_state(Path(state))
        assert after is not None and replays_bus.AGENT not in after.pids
        status = vslice("status", "--nodes", "--state-dir", state).stdout
        assert "node-00" not in status and "GPU-mock-a" in status
        assert not any(replay_pods(bus).values())

        code, report = replay(trace, fleet, state, tmp_path / "two.json", "--seeds", "6", "--keep")
        assert code == 0, capsys.readouterr().err
        now = stacks.read_state(Path(state))
        assert now is not None and stacks.alive(now.pids[replays_bus.AGENT])
        kept = now
        held = replay_pods(bus)
        placed = sum(len(uids) for uids in held.values())
        assert placed == report["pods_placed"] > 0
        # GPU pods are kept off the stack's own node (CPU-only ones may land there)
        local = ledgers(bus).get(stacks.local_node(), NodeLedger(node="local"))
        assert not [s for s in local.slices if s.pod_uid.startswith("replay-")]
        status = vslice("status", "--nodes", "--state-dir", state).stdout
        assert "replay-agent" in status and "NOT RUNNING" not in status
        rows = [line.split() for line in status.splitlines() if line.startswith("node-")]
        assert len({r[0] for r in rows}) == 12
        assert any(int(r[2].split("/")[0]) > 0 for r in rows)  # slices in use
        deadline = time.monotonic() + 20
        while allocated_on_fleet(scrape(kept.metrics_url)) == 0:
            assert time.monotonic() < deadline, "the fleet's allocation never reached /metrics"
            time.sleep(0.2)
        code, _ = replay(trace, fleet, state, tmp_path / "three.json", "--seeds", "7")
        assert code == 2 and "still attached" in capsys.readouterr().err
    finally:
        down = vslice("down", "--state-dir", state)
    assert down.returncode == 0
    assert not any(stacks.alive(pid) for pid in kept.pids.values())


def test_attach_needs_a_running_stack_and_the_stacks_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, fleet = small_trace(tmp_path)
    state = str(tmp_path / "nothing")
    code, _ = replay(trace, fleet, state, tmp_path / "r.json")
    assert code == 2 and "no stack up" in capsys.readouterr().err
    argv = ["replay", trace, "--fleet", fleet, "--keep"]
    assert cli.main(argv) == 2 and "--keep needs --attach" in capsys.readouterr().err
    recorded = tmp_path / "recorded"  # a stack whose "nats" is this very process
    recorded.mkdir()
    here = {"nats": os.getpid()}
    stacks.write_state(
        recorded, stacks.Stack(nats_url="nats://x:1", prefix="p", pids=here, state_dir="x")
    )
    with pytest.raises(replays_bus.ReplayError, match="decides with policy 'hami'"):
        replays_bus.replay_over_bus(trace, fleet, ["fgd"], [1], attach=recorded)
    with pytest.raises(replays_bus.ReplayError, match="one seed"):
        replays_bus.replay_over_bus(trace, fleet, ["hami"], [1, 2], attach=recorded, keep=True)
