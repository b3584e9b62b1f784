"""A service that lost the bus does not stay up deaf, and `vslice status` tells a silent
service from a live one: the connection's close for good ends the process with
``EXIT_BUS_CLOSED`` (``libshared.connecting.Lifeline``), and health comes from each
service's heartbeats (``libshared.heartbeats``), not from its pid alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from libshared import connecting, heartbeats
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from tests.bus.conftest import repo_root
from vslice import stacks, statuses

BEAT_S = 0.3  # heartbeats of the services these tests start
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout_s} s")


def beats_of(operator: BusSettings, pid: int) -> list[heartbeats.Seen]:
    with contextlib.suppress(stacks.StackError):
        return [b for b in asyncio.run(stacks.read_heartbeats(operator)) if b.heartbeat.pid == pid]
    return []


@contextlib.contextmanager
def service(
    module: str, settings: BusSettings, log: Path, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    argv = [
        sys.executable, "-m", module, "--nats-url", settings.urls[0], "--prefix", settings.prefix,
        "--heartbeat-s", str(BEAT_S), *settings.credential_arguments(), *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=repo_root(), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def operator_of(server: NatsServer, prefix: str) -> BusSettings:
    """The operator identity of ``prefix`` as a stack names it, with the bus created."""
    operator = server.identity(f"operator-{prefix}", Role.OPERATOR, prefix=prefix)

    async def create() -> None:
        nc = await connecting.connect(operator, name="t")
        try:
            await connecting.ensure_bus(nc.jetstream(timeout=30), operator)
        finally:
            await nc.close()

    asyncio.run(create())
    return operator


async def test_a_close_the_service_did_not_ask_for_is_a_lost_bus_and_a_stop_is_not(
    bus_settings: BusSettings,
) -> None:
    stop = asyncio.Event()
    lifeline = connecting.Lifeline(stop)
    nc = await connecting.connect(bus_settings, name="t", lifeline=lifeline)
    await nc.close()  # closed under the service: as the server closing it for good
    await asyncio.wait_for(stop.wait(), 10)  # the service leaves its serving loop
    with pytest.raises(connecting.BusClosedError, match="closed for good"):
        lifeline.check()

    asked = asyncio.Event()  # a close asked for
    calm = connecting.Lifeline(asked)
    nc = await connecting.connect(bus_settings, name="t", lifeline=calm)
    asked.set()  # SIGTERM: the service stops, then drains
    await connecting.drain_quietly(nc)
    assert nc.is_closed and calm.lost == ""
    calm.check()


async def test_a_payload_over_max_payload_with_its_headers_closes_the_connection_as_a_lost_bus(
    bus_settings: BusSettings,
) -> None:
    # how the replica of the report went deaf: a value just under max_payload, its
    # compare-and-set header over it; the client checks the payload alone, the server
    # closes the connection for good
    stop = asyncio.Event()
    lifeline = connecting.Lifeline(stop)
    nc = await connecting.connect(bus_settings, name="t", lifeline=lifeline)
    body = b"x" * nc.max_payload
    await nc.publish(
        f"{bus_settings.prefix}.big", body, headers={"Nats-Expected-Last-Subject-Sequence": "7"}
    )
    await asyncio.wait_for(stop.wait(), 30)
    assert nc.is_closed
    with pytest.raises(connecting.BusClosedError, match=r"(?i)maximum payload violation"):
        lifeline.check()


@pytest.mark.parametrize(
    ("module", "role", "extra"),
    [
        ("services.scheduler", Role.SCHEDULER, ("--name", "r1")),
        ("services.admission", Role.ADMISSION, ()),
    ],
)
def test_a_service_whose_connection_the_server_closes_exits_non_zero_for_its_supervisor(
    nats_server: NatsServer, prefix: str, tmp_path: Path, module: str, role: Role,
    extra: tuple[str, ...],
) -> None:  # fmt: skip
    operator = operator_of(nats_server, prefix)
    name = f"{role}-{prefix}"
    settings = nats_server.identity(name, role, prefix=prefix)
    log = tmp_path / "service.log"
    with service(module, settings, log, *extra) as proc:
        wait_for(lambda: beats_of(operator, proc.pid), 60, "heartbeat")
        # the server drops its connection and refuses every reconnect: identity revoked
        assert nats_server.store.remove_identity(name)
        nats_server.reload()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running, deaf:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert code == connecting.EXIT_BUS_CLOSED, text[-3000:]
    assert "closed for good" in text and "Authorization" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def vslice_status(state_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", "status", "--state-dir", str(state_dir), *argv],
        cwd=repo_root(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_status_and_up_call_a_service_silent_on_the_bus_unhealthy_though_its_pid_lives(
    nats_server: NatsServer, prefix: str, tmp_path: Path
) -> None:
    operator = operator_of(nats_server, prefix)
    settings = nats_server.identity(f"admission-{prefix}", Role.ADMISSION, prefix=prefix)
    with service("services.admission", settings, tmp_path / "admission.log") as proc:
        stacks.write_state(
            tmp_path,
            stacks.Stack(
                nats_url=settings.urls[0], prefix=prefix,
                pids={"nats": os.getpid(), "admission": proc.pid}, state_dir=str(tmp_path),
                trust_dir=str(nats_server.store.root),
            ),
        )  # fmt: skip
        wait_for(lambda: beats_of(operator, proc.pid), 60, "heartbeat")

        def health() -> tuple[int, dict[str, Any]]:
            out = vslice_status(tmp_path, "--json")
            return out.returncode, json.loads(out.stdout)["health"]["admission"]

        code, well = health()
        assert (code, well["state"]) == (0, "healthy"), well
        assert 0 <= well["heartbeat_age_s"] <= heartbeats.STALE_INTERVALS * BEAT_S

        os.kill(proc.pid, signal.SIGSTOP)  # alive, and silent

        def unhealthy() -> tuple[int, dict[str, Any]] | None:
            got = health()
            return got if got[1]["state"] == "unhealthy" else None

        code, well = wait_for(unhealthy, 60, "unhealthy")
        assert code == 1 and well["reason"].startswith("no heartbeat for"), well
        assert stacks.alive(proc.pid)
        shown = vslice_status(tmp_path)
        assert shown.returncode == 1
        (line,) = [x for x in shown.stdout.splitlines() if x.strip().startswith("admission")]
        assert "running, UNHEALTHY: no heartbeat for" in line, shown.stdout
        again = subprocess.run(
            [sys.executable, "-m", "vslice.cli", "up", "--state-dir", str(tmp_path)],
            cwd=repo_root(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert again.returncode == 1, again.stdout + again.stderr  # up cannot mend it
        assert f"admission (pid {proc.pid}) runs but is UNHEALTHY" in again.stdout

        os.kill(proc.pid, signal.SIGCONT)  # beating again: healthy again
        wait_for(lambda: health()[1]["state"] == "healthy", 60, "healthy again")
        assert vslice_status(tmp_path).returncode == 0


def seen(pid: int, age_s: float, interval_s: float = 2.0) -> heartbeats.Seen:
    beat = heartbeats.Heartbeat(
        service="scheduler", instance="scheduler-1-h", identity="scheduler", pid=pid, host="h",
        interval_s=interval_s, sent_at=0.0,
    )  # fmt: skip
    return heartbeats.Seen(heartbeat=beat, age_s=age_s)


@pytest.mark.parametrize(
    ("running", "beats", "state", "reason"),
    [
        (True, [seen(7, 1.0)], "healthy", ""),
        (True, [seen(7, 5.9)], "healthy", ""),  # within 3 intervals of 2 s
        (True, [seen(7, 6.1)], "unhealthy", "no heartbeat for 6 s (one every 2 s)"),
        (True, [seen(7, 60.0), seen(7, 0.5)], "healthy", ""),  # the freshest counts
        (True, [seen(8, 0.5)], "unhealthy", "no heartbeat"),  # another process's
        (True, None, "unhealthy", "heartbeats unreadable"),
        (False, [seen(7, 0.5)], "stopped", "not running"),
    ],
)
def test_a_service_is_healthy_only_while_it_runs_and_beat_within_three_intervals(
    running: bool, beats: list[heartbeats.Seen] | None, state: str, reason: str
) -> None:
    processes = {
        "nats": {"pid": 1, "state": "running"},
        "scheduler-1": {"pid": 7, "state": "running" if running else "stopped"},
    }
    well = statuses.health(processes, beats)
    assert well["nats"]["state"] == "healthy"
    assert (well["scheduler-1"]["state"], well["scheduler-1"]["reason"]) == (state, reason)
    stack = stacks.Stack(
        nats_url="nats://127.0.0.1:1", prefix="vslice", pids={"nats": 1, "scheduler-1": 7},
        state_dir="/s",
    )  # fmt: skip
    data = statuses.status(
        Path("/s"), stack, alive=lambda pid: pid == 1 or running, devices=[], beats=beats
    )
    assert data["healthy"] is (state == "healthy")


async def test_a_failed_start_up_call_waits_for_the_lifelines_verdict() -> None:
    # a start-up request timed out while the connection was down: the service exits as
    # lost when the lifeline decides so, and keeps the original error when it came back
    class Down:
        is_connected = False

    stop = asyncio.Event()
    lifeline = connecting.Lifeline(stop, name="s")
    lifeline.client = Down()  # type: ignore[assignment]
    asyncio.get_running_loop().call_soon(lifeline._lose, "Authorization Violation")
    with pytest.raises(connecting.BusClosedError, match="Authorization Violation"):
        await lifeline.verdict(timeout_s=30)

    back = connecting.Lifeline(asyncio.Event(), name="s")
    back.client = Down()  # type: ignore[assignment]
    await back.verdict(timeout_s=0.2)  # still down, never lost: no verdict, no raise
    assert back.lost == ""
