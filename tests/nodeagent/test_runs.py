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
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.ledgers import PodCharge, Slice
from tests import signals
from tests.bus import helpers
from tests.libvgpu import harness
from tests.metrics import promtext
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
    children: list[subprocess.Popen[bytes]]  # services a test restarted, reaped at teardown

    @property
    def containers(self) -> Path:
        return self.state / "host" / "containers"

    @property
    def operator(self) -> BusSettings:
        """The stack's operator identity (the test reads and injects as an operator)."""
        stack = stacks.read_state(self.state)
        assert stack is not None
        return stack.settings("operator")

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
            preexec_fn=signals.interruptible,  # the interrupt test sends SIGINT
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
    children: list[subprocess.Popen[bytes]] = []
    try:
        yield Up(state=state, url=recorded["nats_url"], node=stacks.local_node(), children=children)
    finally:
        stacks.stop(children)  # a restarted agent is this process's child: reap it here
        subprocess.run(
            [*cli, "down", "--state-dir", str(state)],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )


async def _usage(
    settings: BusSettings,
    node: str,
    duration_s: float,
    until: Callable[[events.NodeUsage], bool] | None = None,
) -> list[events.NodeUsage]:
    """The node's usage reports for ``duration_s`` seconds, or up to the first ``until``
    accepts."""
    nc = await connecting.connect(settings, name="test")
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
            if until is not None and until(out[-1]):
                break
        return out
    finally:
        await nc.close()


def usage(up: Up, duration_s: float = 1.0) -> list[events.NodeUsage]:
    return asyncio.run(_usage(up.operator, up.node, duration_s))


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


def test_stdin_stdout_and_the_exit_code_pass_through_vslice_run(up: Up) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vslice.cli",
            "run",
            "--state-dir",
            str(up.state),
            "--gpumem",
            "64",
            "--",
            "sh",
            "-c",
            'read x; echo "got $x in $LD_PRELOAD"; exit 7',
        ],
        cwd=harness.ROOT,
        env=up.env(),
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert done.stdout.startswith("got hello in ") and "libvgpu.so" in done.stdout


def test_an_interrupted_run_releases_its_slice(up: Up) -> None:
    proc = up.start("--gpumem", "300", "--", *PROBE, "hold", "64", "60")
    held(proc)
    wait_until(lambda: len(list(up.containers.iterdir())) == 1)
    (key,) = [p.name for p in up.containers.iterdir()]
    proc.send_signal(signal.SIGINT)
    # a guard against a hang, not a speed target: a loaded machine took over 30 s
    assert finish(proc, timeout_s=120) == 128 + signal.SIGINT
    wait_until(lambda: not (up.containers / key).exists())
    rows: list[list[str]] = []

    def gpu_row_free() -> bool:
        # The status is read until it shows the GPU free: a read that raced the stack
        # (no row yet) is read again, a slice that stays booked fails after the deadline.
        status = subprocess.run(
            [sys.executable, "-m", "vslice.cli", "status", "--state-dir", str(up.state)],
            cwd=harness.ROOT,
            env=up.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows[:] = [line.split() for line in status.stdout.splitlines() if GPU in line]
        return bool(rows) and rows[0][2:] == ["0/10", "0/2048", "0"]

    try:
        wait_until(gpu_row_free, timeout_s=20.0)
    except AssertionError:
        raise AssertionError(f"the GPU's status row after release: {rows}") from None


def test_two_runs_on_one_gpu_see_their_own_totals_and_a_third_that_does_not_fit_is_refused(
    up: Up,
) -> None:
    # the holders outlast the third run's whole way through the stack, even on a loaded
    # machine (a holder that ended first would free its memory for the third)
    done = up.state / "third-done"
    first = up.start("--gpumem", "768", "--", *PROBE, "hold", "100", "60", str(done))
    second = up.start("--gpumem", "1024", "--", *PROBE, "hold", "200", "60", str(done))
    try:
        totals = sorted([held(first)["total"], held(second)["total"]])
        third = up.run("--gpumem", "512", "--", *PROBE, "meminfo")
    finally:
        done.touch()
        codes = [finish(first, timeout_s=90), finish(second, timeout_s=90)]
    assert totals == [768 * MIB, 1024 * MIB]
    assert third.returncode == 3
    assert "CardInsufficientMemory" in third.stderr
    assert "asked 512 MiB, no core limit on 1 GPU; largest free: 256 MiB" in third.stderr
    assert "meminfo" not in third.stdout  # the command never ran
    assert codes == [0, 0]


def test_usage_shows_a_running_slices_charged_memory_and_drops_it_after_release(up: Up) -> None:
    proc = up.start("--gpumem", "512", "--", *PROBE, "hold", "128", "2")
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


def _scrape(metrics_url: str) -> str:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_a_running_slices_usage_reaches_the_metrics_service_and_leaves_it_after_release(
    up: Up,
) -> None:
    metrics_url = json.loads((up.state / stacks.STATE_FILE).read_text())["metrics_url"]
    assert metrics_url, "vslice up records the metrics service's URL"
    proc = up.start("--gpumem", "512", "--", *PROBE, "hold", "192", "3")
    seen: list[float] = []
    try:
        held(proc)

        def charged() -> bool:
            seen[:] = promtext.labelled(
                "hami_vgpu_memory_used_bytes", _scrape(metrics_url), device_uuid=GPU
            )
            return 192 * MIB in seen

        wait_until(charged, timeout_s=15)
        limits = promtext.labelled(
            "hami_vgpu_memory_limit_bytes", _scrape(metrics_url), device_uuid=GPU
        )
        assert 512 * MIB in limits, limits
    finally:
        assert finish(proc) == 0
    wait_until(
        lambda: (
            192 * MIB
            not in promtext.labelled(
                "hami_vgpu_memory_used_bytes", _scrape(metrics_url), device_uuid=GPU
            )
        ),
        timeout_s=15,
    )


def test_the_host_side_check_kills_a_process_that_runs_without_libvgpu_past_its_slice(
    up: Up,
) -> None:
    def killed(u: events.NodeUsage) -> bool:
        return any(e.killed for e in u.escapes)

    async def scenario() -> tuple[int, list[events.NodeUsage]]:
        watcher = asyncio.create_task(_usage(up.operator, up.node, 20.0, until=killed))
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
        _, err = await asyncio.wait_for(proc.communicate(), 25)
        assert proc.returncode is not None, err
        return proc.returncode, await watcher

    code, seen = asyncio.run(scenario())
    assert code == 128 + signal.SIGKILL  # killed by the node agent, well before its 30 s
    (escape,) = [e for u in seen for e in u.escapes if e.killed]
    assert (escape.uuid, escape.used_bytes, escape.limit_bytes) == (GPU, 512 * MIB, 256 * MIB)
    assert escape.pod_uid.startswith("run-") and escape.container == "main"


def test_malformed_and_stale_placements_are_skipped_and_the_agent_keeps_serving(up: Up) -> None:
    stale = events.Placement(
        pod_uid="never-in-ledger",
        namespace="default",
        pod="x",
        node=up.node,
        slices=(
            Slice(
                pod_uid="never-in-ledger",
                namespace="default",
                pod="x",
                container="main",
                container_index=0,
                uuid=GPU,
                device_index=0,
                memory_mib=100,
                cores_percent=0,
            ),
        ),
        charge=PodCharge(pod_uid="never-in-ledger"),
    )

    async def publish() -> list[bytes]:
        nc = await connecting.connect(up.operator, name="test")
        answers: list[bytes] = []

        async def on_answer(msg: nats.aio.msg.Msg) -> None:
            answers.append(msg.data)

        try:
            await nc.subscribe(f"vslice.alloc.{up.node}.*", cb=on_answer)
            js = nc.jetstream()
            subject = f"vslice.alloc.{up.node}.decided"
            await js.publish(subject, b'{"type": "placement", "pod_uid": 7}')
            await js.publish(subject, b"not json")
            await js.publish(subject, events.ENCODER.encode(stale))
            await asyncio.sleep(1.0)
            return [a for a in answers if b'"ready"' in a or b'"failed"' in a]
        finally:
            await nc.close()

    assert asyncio.run(publish()) == []
    assert not (up.containers / "never-in-ledger_main").exists()
    done = up.run("--gpumem", "128", "--", *PROBE, "meminfo")
    assert done.returncode == 0 and f"total={128 * MIB}" in done.stdout


def test_a_node_agent_restart_loses_and_duplicates_no_slice(up: Up) -> None:
    bus = up.operator
    recorded = json.loads((up.state / stacks.STATE_FILE).read_text())
    agent_pid = recorded["pids"]["nodeagent"]
    argv = Path(f"/proc/{agent_pid}/cmdline").read_bytes().split(b"\0")[:-1]
    running = up.start("--gpumem", "256", "--", *PROBE, "hold", "64", "60")
    try:
        held(running)
        # earlier tests' released slices go after their grace
        wait_until(lambda: len(list(up.containers.iterdir())) == 1)
        (kept,) = [p.name for p in up.containers.iterdir()]
        inode = (up.containers / kept / "vgpu.cache").stat().st_ino

        log = (up.state / "logs" / "nodeagent-restarted.log").open("ab")

        async def while_down() -> list[str]:
            nc = await connecting.connect(up.operator, name="test")
            readies: list[str] = []

            async def on_ready(msg: nats.aio.msg.Msg) -> None:
                readies.append(events.NODE_ANSWER.decode(msg.data).pod_uid)

            await nc.subscribe(bus.subjects.alloc_ready(up.node), cb=on_ready)
            try:
                before = await helpers.schedule(nc, bus, helpers.pod("p-before", memory_mib=100))
                assert isinstance(before, events.Placement)
                wait_s = time.monotonic() + 10
                while "p-before" not in readies and time.monotonic() < wait_s:
                    await asyncio.sleep(0.05)
                os.kill(agent_pid, signal.SIGKILL)
                # The killed agent's last pull request lives on in the server until its
                # 1 s fetch timeout: a placement published before then goes to it and is
                # redelivered only after the ack wait (30 s). Let it expire first, so the
                # placement waits in the stream for the restarted agent.
                await asyncio.sleep(1.5)
                assert isinstance(await helpers.release(nc, bus, "p-before"), events.Ack)
                down = await helpers.schedule(nc, bus, helpers.pod("p-down", memory_mib=300))
                assert isinstance(down, events.Placement)
                restarted = subprocess.Popen(
                    [a.decode() for a in argv],
                    cwd=harness.ROOT,
                    env=up.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                # `vslice down` stops the restarted agent with the rest of the stack
                up.children.append(restarted)
                recorded["pids"]["nodeagent"] = restarted.pid
                (up.state / stacks.STATE_FILE).write_text(json.dumps(recorded))
                # The placement may have gone to the killed agent's last pull request:
                # JetStream redelivers it once its ack wait (30 s) has passed.
                wait_s = time.monotonic() + 45
                while "p-down" not in readies and time.monotonic() < wait_s:
                    await asyncio.sleep(0.05)
                return readies
            finally:
                await nc.close()

        try:
            readies = asyncio.run(while_down())
        finally:
            log.close()
        assert readies.count("p-before") == 1 and readies.count("p-down") == 1
        wait_until(
            lambda: sorted(p.name for p in up.containers.iterdir()) == sorted([kept, "p-down_main"])
        )
        assert (up.containers / kept / "vgpu.cache").stat().st_ino == inode
        assert running.poll() is None  # the slice's program never noticed
        reports = usage(up, 1.0)
        assert reports
        for report in reports:
            pods = sorted(c.pod_uid for c in report.containers)
            assert pods == sorted([kept.removesuffix("_main"), "p-down"])
        assert all(
            c.used_bytes == 64 * MIB for u in reports for c in u.containers if c.pod_uid != "p-down"
        )
    finally:
        running.send_signal(signal.SIGTERM)
        finish(running)


def test_a_device_fault_re_registers_the_gpu_unhealthy_and_it_takes_no_new_slice(up: Up) -> None:
    """Runs last: it leaves the module's GPU unhealthy."""
    env = {
        **up.env(),
        "LD_LIBRARY_PATH": str(harness.MOCK_DIR),
        "VSLICE_MOCKGPU_STATE": str(up.state / "host" / "mockgpu.state"),
    }

    async def scenario() -> list[NodeDevices]:
        nc = await connecting.connect(up.operator, name="test")
        try:
            sub = await nc.subscribe(f"vslice.node.{up.node}.registered")
            await nc.flush()
            subprocess.run(
                [sys.executable, "-m", "tests.nodeagent.nvmlcheck", "inject", "0:13", "0:79"],
                cwd=harness.ROOT,
                env=env,
                check=True,
                capture_output=True,
                timeout=30,
            )
            seen = []
            while not seen or seen[-1].devices[0].healthy:
                msg = await sub.next_msg(timeout=10)
                seen.append(msgspec.json.decode(msg.data, type=NodeDevices))
            return seen
        finally:
            await nc.close()

    seen = asyncio.run(scenario())
    assert [d.healthy for d in seen[-1].devices] == [False]
    assert seen[-1].devices[0].uuid == GPU
    refused = up.run("--gpumem", "128", "--", *PROBE, "meminfo")
    assert refused.returncode == 3 and "CardNotHealth" in refused.stderr


def test_vslice_run_without_a_stack_says_how_to_start_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vslice.cli", "run", "--state-dir", str(tmp_path), "--", "true"],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"start one with `vslice up --state-dir {tmp_path}`" in done.stderr
