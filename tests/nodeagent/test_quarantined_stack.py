"""A ``vslice up`` stack whose node's ledger value turns to garbage: ``vslice status`` shows
the quarantine and does not raise, ``vslice run`` says the node is quarantined, a node
agent restarted on it stays up and keeps the running slice, and ``vslice repair`` brings
the node back with that slice in its ledger."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from libshared import connecting, quarantines
from tests.libvgpu import harness
from tests.nodeagent.test_runs import PROBE, Up, finish, held, up, wait_until
from vslice import stacks

__all__ = ["up"]  # the module's stack (module scope: its own, not test_runs's)


def cli(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", *args, "--state-dir", str(up.state)],
        cwd=harness.ROOT,
        env=up.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _put_ledger(up: Up, value: bytes) -> None:
    nc = await connecting.connect(up.operator, name="test")
    try:
        bus = await connecting.ensure_bus(nc.jetstream(), up.operator)
        await bus.ledger.put(up.node, value)
    finally:
        await nc.close()


def restart_agent(up: Up) -> subprocess.Popen[bytes]:
    """Kill the stack's node agent and start it again with the same command line."""
    recorded = json.loads((up.state / stacks.STATE_FILE).read_text())
    pid = recorded["pids"]["nodeagent"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    os.kill(pid, signal.SIGKILL)
    with (up.state / "logs" / "nodeagent-quarantined.log").open("ab") as log:
        restarted = subprocess.Popen(
            [a.decode() for a in argv],
            cwd=harness.ROOT,
            env=up.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    up.children.append(restarted)
    recorded["pids"]["nodeagent"] = restarted.pid
    (up.state / stacks.STATE_FILE).write_text(json.dumps(recorded))
    return restarted


def test_a_garbage_ledger_is_shown_refused_survived_by_the_agent_and_repaired(up: Up) -> None:
    running = up.start("--gpumem", "256", "--", *PROBE, "hold", "64", "120")
    try:
        held(running)
        wait_until(lambda: len(list(up.containers.iterdir())) == 1)
        (kept,) = [p.name for p in up.containers.iterdir()]

        asyncio.run(_put_ledger(up, b"\x00garbage, not a ledger"))
        shown: list[str] = []

        def status_shows_it() -> bool:
            status = cli(up, "status")
            assert status.returncode == 0, status.stderr
            assert "Traceback" not in status.stderr
            shown[:] = [status.stdout]
            return f"{up.node}" in status.stdout and quarantines.LEDGER_UNREADABLE in status.stdout

        wait_until(status_shows_it, timeout_s=20.0)
        as_json = cli(up, "status", "--json")
        assert as_json.returncode == 0, as_json.stderr
        quarantined = json.loads(as_json.stdout)["fleet"]["quarantined"]
        assert quarantined[up.node].startswith(quarantines.LEDGER_UNREADABLE)

        refused = up.run("--gpumem", "64", "--", *PROBE, "meminfo")
        assert refused.returncode != 0
        assert f"node {up.node} is quarantined (NodeLedgerUnreadable)" in refused.stderr

        agent = restart_agent(up)
        log = up.state / "logs" / "nodeagent-quarantined.log"
        wait_until(lambda: log.exists() and "nodeagent serving" in log.read_text(), 30.0)
        assert "ledger unreadable" in log.read_text()
        assert agent.poll() is None, log.read_text()  # started all the way, still up
        assert (up.containers / kept).exists()  # the running slice is left as it is
        assert running.poll() is None

        repaired = cli(up, "repair", up.node)
        assert repaired.returncode == 0, repaired.stderr
        assert "rebuilt its ledger" in repaired.stdout and "1 pod(s)" in repaired.stdout
        wait_until(lambda: quarantines.LEDGER_UNREADABLE not in cli(up, "status").stdout, 20.0)
        # the agent re-reads the ledger and takes the running slice back in
        wait_until(lambda: "reconciled with the ledger" in log.read_text(), 30.0)
        again = up.run("--gpumem", "64", "--", *PROBE, "meminfo")
        assert again.returncode == 0, again.stderr
    finally:
        running.send_signal(signal.SIGTERM)
        finish(running, timeout_s=60)
    wait_until(lambda: not (up.containers / kept).exists(), 30.0)
