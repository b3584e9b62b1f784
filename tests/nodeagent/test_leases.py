"""Leases of ``vslice run`` slices on a ``vslice up`` stack: a killed client's slice is
released after its lease's TTL, a Kubernetes-style pod (no lease) never is, status lists
the slices with their lease, ``vslice release`` frees one by hand, and a client whose
stack went down says so once and exits with its command's status."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from libshared import connecting, events
from tests.bus import helpers
from tests.libvgpu import harness
from vslice import stacks

GPU = "GPU-1ea5e000-0000-4000-8000-000000000001"
TTL_S = 3
RUN = [sys.executable, "-m", "vslice.cli", "run", "--gpumem", "1000"]
ENV = {
    "VSLICE_MOCKGPU_DEVICES": f"{GPU}:4096",
    "VSLICE_GPU_BACKEND": "mock",
    "VSLICE_GRACE_S": "0.5",
    "VSLICE_LEASE_TTL_S": str(TTL_S),
}


def vslice(state: Path, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", *args, "--state-dir", str(state)],
        cwd=harness.ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_run(state: Path, *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*RUN, "--state-dir", str(state), "--", *command],
        cwd=harness.ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its command is killed with its group at the end
    )


@contextlib.contextmanager
def stack_up(state: Path) -> Iterator[Path]:
    started = vslice(state, "up")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield state
    finally:
        vslice(state, "down", timeout_s=60)


@pytest.fixture(scope="module")
def up(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with stack_up(tmp_path_factory.mktemp("leases")) as state:
        yield state


def live(state: Path) -> dict[str, stacks.LiveSlice]:
    stack = stacks.read_state(state)
    assert stack is not None
    return {s.pod_uid: s for s in asyncio.run(stacks.live_slices(stack.settings("operator")))}


def wait_for(predicate: Callable[[], object], timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"not within {timeout_s} s")


def leased_run(state: Path, proc: subprocess.Popen[str]) -> stacks.LiveSlice | None:
    assert proc.poll() is None, proc.communicate()
    runs = [s for s in live(state).values() if s.lease is not None]
    return runs[0] if runs else None


def place(state: Path, uid: str, memory_mib: int) -> None:
    stack = stacks.read_state(state)
    assert stack is not None
    operator = stack.settings("operator")

    async def go() -> object:
        nc = await connecting.connect(operator, name="t")
        try:
            return await helpers.schedule(nc, operator, helpers.pod(uid, memory_mib=memory_mib))
        finally:
            await nc.close()

    assert isinstance(asyncio.run(go()), events.Placement)


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def test_a_killed_run_client_loses_its_slice_after_the_lease_ttl_and_a_pod_without_lease_stays(
    up: Path,
) -> None:
    place(up, "placed-by-kubernetes", 500)
    proc = start_run(up, "sleep", "600")
    try:
        run = wait_for(lambda: leased_run(up, proc), 60)
        assert isinstance(run, stacks.LiveSlice) and run.lease is not None
        assert run.lease.holder == f"vslice run {proc.pid}" and run.lease.ttl_s == TTL_S
        status = vslice(up, "status")
        row = next(line for line in status.stdout.splitlines() if run.pod_uid in line)
        assert run.node in row and f"vslice run {proc.pid}" in row and "TTL 3s" in row
        assert "none (not a vslice run)" in status.stdout  # the Kubernetes-style pod

        os.kill(proc.pid, signal.SIGKILL)  # the client only: nothing releases its slice
        killed = time.monotonic()
        wait_for(lambda: run.pod_uid not in live(up), 30)
        assert time.monotonic() - killed <= 30
        assert live(up)["placed-by-kubernetes"].lease is None  # never expired
    finally:
        kill_group(proc)


def test_status_lists_a_slice_and_release_frees_it_by_hand(up: Path) -> None:
    place(up, "by-hand", 700)
    listed = vslice(up, "status")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("by-hand"))
    assert row.split()[1:4] == [stacks.local_node(), "1", "700"]
    released = vslice(up, "release", "by-hand")
    assert released.returncode == 0, released.stderr
    assert f"released by-hand: 1 slice(s) on {stacks.local_node()}" in released.stdout
    assert "by-hand" not in live(up)
    again = vslice(up, "release", "by-hand")
    assert again.returncode == 0 and "held no slice" in again.stdout


def test_a_run_whose_stack_goes_down_says_so_once_and_exits_with_its_commands_status(
    native: None, tmp_path: Path
) -> None:
    flag = tmp_path / "finish"
    with stack_up(tmp_path / "state") as state:
        proc = start_run(state, "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.1; done; exit 7")
        try:
            wait_for(lambda: leased_run(state, proc), 60)
            stopped = vslice(state, "down")
            assert stopped.returncode == 0, stopped.stderr
            time.sleep(2)  # reconnect attempts pile up here, if anything prints them
            flag.touch()
            _, stderr = proc.communicate(timeout=20)
        finally:
            kill_group(proc)
    assert proc.returncode == 7, stderr
    lines = stderr.strip().splitlines()
    assert "ConnectionRefusedError" not in stderr
    assert [line for line in lines if "is gone" in line] == [lines[-1]]
    assert len(lines) == 2, lines  # where the slice is, and that the bus went away
