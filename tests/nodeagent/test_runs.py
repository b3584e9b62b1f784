"""``vslice run`` on a ``vslice up`` stack with a mock GPU: real slices, end to end.

One stack serves the module (a real nats-server, admission, two scheduler replicas and
the node agent preparing slices under its host root, with ``--enforce=kill``), on one
mock GPU of 2048 MiB. Programs are ``programs/cudaprobe.py`` (ctypes on
``libcuda.so.1``), so they run on whatever driver their environment gives them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from libshared import events
from tests.libvgpu import harness
from vslice import stacks

MIB = 1 << 20
GPU = "GPU-0a1b2c3d-0000-4000-8000-00000000c0de"
PROBE = [sys.executable, str(Path(__file__).parent / "programs" / "cudaprobe.py")]
ENV = {
    "VSLICE_MOCKGPU_DEVICES": f"{GPU}:2048",
    "VSLICE_USAGE_INTERVAL_S": "0.3",
    "VSLICE_GRACE_S": "0.5",
    "VSLICE_ENFORCE": "kill",
    "VSLICE_GPU_BACKEND": "mock",
}


@dataclass(frozen=True)
class Up:
    state: Path
    url: str
    node: str

    @property
    def containers(self) -> Path:
        return self.state / "host" / "containers"

    def env(self) -> dict[str, str]:
        return {**os.environ, **ENV}

    def run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vslice.cli", "run", "--state-dir", str(self.state), *args],
            cwd=harness.ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "vslice.cli", "run", "--state-dir", str(self.state), *args],
            cwd=harness.ROOT,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def up(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    state = tmp_path_factory.mktemp("stack")
    env = {**os.environ, **ENV}
    cli = [sys.executable, "-m", "vslice.cli"]
    started = subprocess.run(
        [*cli, "up", "--state-dir", str(state)],
        cwd=harness.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    recorded = json.loads((state / stacks.STATE_FILE).read_text())
    try:
        yield Up(state=state, url=recorded["nats_url"], node=stacks.local_node())
    finally:
        subprocess.run(
            [*cli, "down", "--state-dir", str(state)],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )


async def _usage(url: str, node: str, duration_s: float) -> list[events.NodeUsage]:
    nc = await nats.connect(url)
    try:
        sub = await nc.subscribe(f"vslice.usage.{node}")
        out = []
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            out.append(events.NODE_USAGE.decode(msg.data))
        return out
    finally:
        await nc.close()


def usage(up: Up, duration_s: float = 1.0) -> list[events.NodeUsage]:
    return asyncio.run(_usage(up.url, up.node, duration_s))


def held(proc: subprocess.Popen[str]) -> dict[str, int]:
    """Wait for a ``hold`` probe's lines; its ``cuMemGetInfo`` figures."""
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("held"), proc.stderr.read() if proc.stderr else ""
    words = proc.stdout.readline().split()
    return {k: int(v) for k, v in (w.split("=") for w in words[1:])}


def finish(proc: subprocess.Popen[str], timeout_s: float = 30) -> int:
    """Wait for a started run and close its pipes; its exit code."""
    proc.communicate(timeout=timeout_s)
    return proc.returncode


def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_program_allocating_64_mib_at_a_time_stops_at_its_slice_with_out_of_memory(
    up: Up,
) -> None:
    done = up.run("--gpumem", "512", "--", *PROBE, "fill", "64")
    assert done.returncode == 0, done.stderr
    assert "cuMemAlloc(64 MiB) after 512 MiB: CUDA_ERROR_OUT_OF_MEMORY" in done.stdout
    assert "filled 512 MiB" in done.stdout


def test_two_runs_on_one_gpu_see_their_own_totals_and_a_third_that_does_not_fit_is_refused(
    up: Up,
) -> None:
    first = up.start("--gpumem", "768", "--", *PROBE, "hold", "100", "4")
    second = up.start("--gpumem", "1024", "--", *PROBE, "hold", "200", "4")
    try:
        totals = sorted([held(first)["total"], held(second)["total"]])
        third = up.run("--gpumem", "512", "--", *PROBE, "meminfo")
    finally:
        codes = [finish(first), finish(second)]
    assert totals == [768 * MIB, 1024 * MIB]
    assert third.returncode == 3
    assert "CardInsufficientMemory" in third.stderr
    assert "meminfo" not in third.stdout  # the command never ran
    assert codes == [0, 0]


def test_usage_shows_a_running_slices_charged_memory_and_drops_it_after_release(up: Up) -> None:
    proc = up.start("--gpumem", "512", "--", *PROBE, "hold", "128", "3")
    try:
        held(proc)
        during = usage(up, 1.0)
    finally:
        assert finish(proc) == 0
    rows = [c for u in during for c in u.containers if c.used_bytes == 128 * MIB]
    assert rows, during
    row = rows[-1]
    assert (row.uuid, row.limit_bytes, row.container) == (GPU, 512 * MIB, "main")
    assert row.pod_uid.startswith("run-") and row.pids
    assert all(e.pod_uid != row.pod_uid for u in during for e in u.escapes)
    wait_until(lambda: not (up.containers / f"{row.pod_uid}_main").exists())
    after = usage(up, 0.8)
    assert after and all(c.pod_uid != row.pod_uid for u in after for c in u.containers)


def test_the_host_side_check_kills_a_process_that_runs_without_libvgpu_past_its_slice(
    up: Up,
) -> None:
    async def scenario() -> tuple[int, list[events.NodeUsage]]:
        watcher = asyncio.create_task(_usage(up.url, up.node, 20.0))
        await asyncio.sleep(0.2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vslice.cli",
            "run",
            "--state-dir",
            str(up.state),
            "--gpumem",
            "256",
            "--",
            "env",
            "-u",
            "LD_PRELOAD",
            *PROBE,
            "hold",
            "512",
            "30",
            cwd=harness.ROOT,
            env=up.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        code = await asyncio.wait_for(proc.wait(), 25)
        watcher.cancel()
        return code, []

    code, _ = asyncio.run(scenario())
    assert code == 128 + signal.SIGKILL  # killed by the node agent, well before its 30 s
    log = (up.state / "logs" / "nodeagent.log").read_text()
    lines = [json.loads(x) for x in log.splitlines() if '"process over its slice"' in x]
    assert lines and lines[-1]["killed"] is True
    assert lines[-1]["used_bytes"] == 512 * MIB and lines[-1]["limit_bytes"] == 256 * MIB
