"""``libshared.probes``: ``/healthz`` and ``/readyz`` as every service serves them -- 503
with the reason before start, on a failing, raising or hanging check, for an ended task
and a stalled loop, while stopping; a blocked process fails the HTTP probe where a TCP
probe still passes; the flags and their environment variables."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import aiohttp.web
import pytest

from libshared import probes, settings
from libshared.natsserver import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def serving(health: probes.Probes) -> AsyncIterator[str]:
    started = await probes.serve(health, probes.HealthSettings(port=free_port()))
    assert started is not None
    runner, port = started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await health.stop()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_readyz_is_503_until_the_service_started_and_again_once_it_stops() -> None:
    health = probes.Probes()
    async with serving(health) as url:
        assert await get(url + "/readyz") == (503, "starting\n")
        assert await get(url + "/healthz") == (200, "ok\n")
        health.started()
        assert await get(url + "/readyz") == (200, "ok\n")
        health.stopping()
        assert await get(url + "/readyz") == (503, "stopping\n")
        assert await get(url + "/healthz") == (200, "ok\n")


@pytest.mark.parametrize(
    ("check", "reason"),
    [
        (lambda: "NATS: not connected (reconnecting)", "NATS: not connected (reconnecting)"),
        (lambda: 1 / 0, "bus: ZeroDivisionError: division by zero"),
    ],
    ids=["reason", "raises"],
)
async def test_a_failing_readiness_check_gives_503_with_its_reason_and_leaves_healthz_alone(
    check: probes.Check, reason: str
) -> None:
    health = probes.Probes()
    health.started()
    health.ready_when("bus", check)
    async with serving(health) as url:
        assert await get(url + "/readyz") == (503, reason + "\n")
        assert await get(url + "/healthz") == (200, "ok\n")


async def test_a_check_that_hangs_fails_within_its_timeout_naming_itself() -> None:
    health = probes.Probes(check_timeout_s=0.2)
    health.started()
    never = asyncio.Event()

    async def hangs() -> str:
        await never.wait()
        return ""

    health.ready_when("watch of KV_ledger", hangs)
    async with serving(health) as url:
        t0 = time.monotonic()
        assert await get(url + "/readyz") == (503, "watch of KV_ledger: no answer within 0.2 s\n")
        assert time.monotonic() - t0 < 5


async def test_an_async_check_that_passes_lets_readyz_answer_200() -> None:
    health = probes.Probes()
    health.started()
    calls = []

    async def fine() -> str:
        calls.append(1)
        return ""

    health.ready_when("fine", fine)
    async with serving(health) as url:
        assert await get(url + "/readyz") == (200, "ok\n")
    assert calls == [1]


async def test_healthz_fails_once_a_task_the_service_needs_has_ended_naming_how() -> None:
    health = probes.Probes()
    health.started()

    async def consumer() -> None:
        raise RuntimeError("consumer deleted")

    task = asyncio.create_task(consumer())
    with contextlib.suppress(RuntimeError):
        await task
    health.task("placements", task)
    async with serving(health) as url:
        expected = "placements: ended with RuntimeError('consumer deleted')\n"
        assert await get(url + "/healthz") == (503, expected)
        assert await get(url + "/readyz") == (503, expected)


async def test_healthz_fails_when_the_loop_has_not_ticked_within_the_stall_limit() -> None:
    clock = Clock()
    health = probes.Probes(stall_s=5.0, tick_s=1.0, clock=clock)
    await health.start()
    try:
        assert await health.liveness() == []
        clock.now += 4.9
        assert await health.liveness() == []
        clock.now += 0.2
        assert await health.liveness() == ["event loop: no tick for 5.1 s (limit 5 s)"]
        await asyncio.sleep(1.2)  # the ticker runs again: responsive
        assert await health.liveness() == []
    finally:
        await health.stop()
    assert await health.liveness() == ["event loop: health ticker not running"]


@pytest.fixture
def blocked_service() -> Iterator[tuple[asyncio.AbstractEventLoop, int]]:
    """A service's loop with the probes on a port, in a thread of its own."""
    loop = asyncio.new_event_loop()
    port = free_port()
    health = probes.Probes()
    health.started()

    async def start() -> aiohttp.web.AppRunner:
        started = await probes.serve(health, probes.HealthSettings(port=port))
        assert started is not None
        return started[0]

    async def stop(runner: aiohttp.web.AppRunner) -> None:
        await runner.cleanup()
        await health.stop()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield loop, port
    finally:
        asyncio.run_coroutine_threadsafe(stop(runner), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_a_blocked_process_fails_the_http_probe_while_a_tcp_probe_still_passes(
    blocked_service: tuple[asyncio.AbstractEventLoop, int],
) -> None:
    loop, port = blocked_service
    url = f"http://127.0.0.1:{port}/healthz"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
    released = threading.Event()
    loop.call_soon_threadsafe(released.wait, 30)  # a synchronous call stalls the loop
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the kernel still accepts: a tcpSocket probe passes
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=1)
    finally:
        released.set()
    deadline = time.monotonic() + 30
    while True:  # responsive again once the call returns
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    break
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, probes.HealthSettings(port=0, host="127.0.0.1")),
        ([], {"VSLICE_HEALTH_PORT": "8080"}, probes.HealthSettings(port=8080)),
        (
            ["--health-port", "9000", "--health-host", "0.0.0.0"],
            {"VSLICE_HEALTH_PORT": "8080", "VSLICE_HEALTH_HOST": "10.0.0.1"},
            probes.HealthSettings(port=9000, host="0.0.0.0"),
        ),
        ([], {"VSLICE_HEALTH_HOST": "0.0.0.0"}, probes.HealthSettings(host="0.0.0.0")),
    ],
)
def test_the_health_port_and_host_come_from_flags_over_the_environment(
    argv: list[str], environ: dict[str, str], expected: probes.HealthSettings
) -> None:
    loader = settings.Loader(settings.ServiceOptions, prog="svc")
    assert loader.load(argv, environ).health() == expected


def test_a_health_port_out_of_range_is_refused_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    loader = settings.Loader(settings.ServiceOptions, prog="svc")
    with pytest.raises(SystemExit):
        loader.parse(["--health-port", "70000"], {})
    assert "--health-port 70000: Expected `int` <= 65535" in capsys.readouterr().err


def test_a_beat_fails_once_its_loop_missed_the_limit_and_passes_again_after_a_round() -> None:
    clock = Clock()
    beat = probes.Beat("usage", 60.0, clock=clock)
    assert beat() == ""
    clock.now += 60.0
    assert beat() == ""
    clock.now += 1.0
    assert beat() == "usage: no round for 61 s (limit 60 s)"
    beat.mark()
    assert beat() == ""
    with pytest.raises(ValueError, match="limit_s 0"):
        probes.Beat("usage", 0)
