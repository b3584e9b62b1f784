"""CUDA_DEVICE_SM_LIMIT holds the device's busy fraction to the slice.

A saturating program launches mock kernels of a known length as fast as it can;
the mock records when each kernel occupied the device, and every 2 s window
(stepped by 50 ms) must stay within 3 points of the limit. Short kernels must get
their whole share, a switch to long kernels must not flood the device nor block
the program for long, and the cost per launch the limiter learns must match the
kernels' length.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.libvgpu import harness

TOLERANCE_POINTS = 3.0
# the limiter's window (launch.c, WINDOW_NS): no process is kept busy, or kept
# waiting, for more than twice it
WINDOW_S = 1.0
# sm_cost_ns of device 0 in the shared cache (LAYOUT.md): header, then offset 56
COST_OFFSET = 64 + 56
# sm_launches of device 0; then the queue of launches waiting for tokens (launch.c):
# next ticket, ticket served
LAUNCHES_OFFSET = 64 + 64
TICKETS_OFFSET = 64 + 80


def saturate(
    container: harness.Container,
    *,
    kind: str = "kernel",
    kernel_us: int = 2000,
    seconds: float = 4.0,
    processes: int = 1,
    program: tuple[str, ...] = ("probe",),
) -> list[float]:
    trace = container.root / "trace"
    container.env["VSLICE_MOCKGPU_TRACE"] = str(trace)
    args = ("saturate", kind, str(kernel_us), str(seconds))
    runs = [container.start(*program, *args) for _ in range(processes)]
    lines = [run.finish(timeout_s=seconds + 30).of("saturate")[0] for run in runs]
    assert all(line.int("rc") == 0 for line in lines)
    return harness.busy_fractions(
        trace,
        start_ns=min(line.int("start_ns") for line in lines),
        stop_ns=min(line.int("stop_ns") for line in lines),
    )


def assert_within(fractions: list[float], percent: float) -> None:
    worst = max(abs(f - percent) for f in fractions)
    assert worst <= TOLERANCE_POINTS, (
        f"busy {min(fractions):.2f}..{max(fractions):.2f}% for a {percent}% limit"
    )


@pytest.mark.parametrize("percent", [10, 30, 50, 90])
def test_the_busy_fraction_of_every_2_s_window_stays_within_3_points_of_the_limit(
    container: harness.Container, percent: int
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = str(percent)
    assert_within(saturate(container), percent)


@pytest.mark.parametrize("kind", ["ex", "coop", "graph"])
def test_every_launch_path_is_limited(container: harness.Container, kind: str) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "30"
    assert_within(saturate(container, kind=kind, seconds=3.0), 30)


@pytest.mark.parametrize("kind", ["kernel", "graph"])
def test_per_thread_stream_launches_found_through_cuGetProcAddress_are_limited(
    container: harness.Container, kind: str
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "30"
    program = ("probe_dl", "--via=procaddr", "--ptds")
    assert_within(saturate(container, kind=kind, seconds=3.0, program=program), 30)


def loaded() -> bool:
    """The host is oversubscribed: more runnable threads than cores (1-minute load)."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def load_scale() -> float:
    """The part of a core a launching thread can count on, relative to a host loaded as the
    suite's worst case (stress-ng --cpu 2 beside it on 2 cores: twice as many runnable
    threads as cores): 1 up to that load, ``2 * cores / load`` beyond (a floor on what
    short kernels reach scales with it; the cap never does)."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return min(1.0, 2 * cpus / load) if load > 0 else 1.0


@pytest.mark.parametrize("kernel_us", [200, 10000])
def test_the_limit_does_not_depend_on_how_long_kernels_are(
    container: harness.Container, kernel_us: int
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "40"
    busy = saturate(container, kernel_us=kernel_us, seconds=3.0)
    if kernel_us < 1000 and loaded():
        # Short kernels keep the device busy only while the launching thread runs: on an
        # oversubscribed host (CI beside other jobs) it waits for a core and the device
        # idles below the limit. The cap holds whatever the load; reaching the limit is
        # checked when the host has a core for it.
        assert max(busy) <= 40 + TOLERANCE_POINTS, f"busy up to {max(busy):.2f}% for 40%"
        # the floor still tells a starving limiter (5 us kernels once got 3 % of 30 %)
        floor = 40 / 2 * load_scale()
        assert min(busy) >= floor, f"busy down to {min(busy):.2f}% for 40%"
        return
    assert_within(busy, 40)


def test_the_processes_of_one_container_share_its_limit(container: harness.Container) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "40"
    assert_within(saturate(container, seconds=3.0, processes=2), 40)


def test_the_disable_policy_turns_the_limit_off(container: harness.Container) -> None:
    container.env.update({"CUDA_DEVICE_SM_LIMIT": "30", "GPU_CORE_UTILIZATION_POLICY": "disable"})
    assert min(saturate(container, seconds=2.5)) > 97.0


def test_the_force_policy_keeps_the_limit_on(container: harness.Container) -> None:
    container.env.update({"CUDA_DEVICE_SM_LIMIT": "30", "GPU_CORE_UTILIZATION_POLICY": "force"})
    assert_within(saturate(container, seconds=2.5), 30)


def test_without_a_limit_the_device_is_saturated(container: harness.Container) -> None:
    assert min(saturate(container, seconds=2.5)) > 97.0


def run_share(container: harness.Container, *, kernel_us: int, seconds: float) -> float:
    """Percent of the run a saturating program kept the device busy."""
    trace = container.root / "trace"
    container.env["VSLICE_MOCKGPU_TRACE"] = str(trace)
    args = ("saturate", "kernel", str(kernel_us), str(seconds))
    (line,) = container.start("probe", *args).finish(timeout_s=seconds + 30).of("saturate")
    assert line.int("rc") == 0
    runs = harness.busy_intervals(trace)
    return harness.busy_percent(runs, start_ns=runs[0][0], stop_ns=line.int("stop_ns"))


# At 10 % a program of 1 us kernels launches some 100,000 a second: on a host loaded as
# the suite's worst case (stress-ng --cpu 2 beside it) the share holds; beyond, the
# launching thread's part of a core shrinks, and so does the floor (1 us kernels got
# 6.2 % near load 6); benchmarks/libvgpu.py shows every limit.
@pytest.mark.parametrize("kernel_us", [1, 5])
def test_short_kernels_get_their_whole_share(container: harness.Container, kernel_us: int) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "10"
    share = run_share(container, kernel_us=kernel_us, seconds=3.0)
    said = f"{kernel_us} us kernels got {share:.1f}% of 10%"
    assert share <= 10 + TOLERANCE_POINTS, said
    assert share >= (10 - TOLERANCE_POINTS) * load_scale(), said


# A training step launches kernels of very different lengths: a matmul of
# milliseconds, then a norm and an element-wise op of microseconds (on an H200, a
# 4096^2 matmul with a norm and a division gave 19 % busy for a 30 % limit when one
# cost per launch stood for them all).
@pytest.mark.parametrize(("long_us", "short_us", "shorts"), [(2700, 20, 3), (500, 5, 8)])
def test_kernels_of_different_lengths_in_one_loop_get_the_share(
    container: harness.Container, long_us: int, short_us: int, shorts: int
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "30"
    trace = container.root / "trace"
    container.env["VSLICE_MOCKGPU_TRACE"] = str(trace)
    args = ("mixed", "kernel", str(long_us), str(short_us), str(shorts), "4")
    (line,) = container.start("probe", *args).finish(timeout_s=40).of("mixed")
    assert line.int("rc") == 0
    fractions = harness.busy_fractions(
        trace, start_ns=line.int("start_ns"), stop_ns=line.int("stop_ns")
    )
    if loaded():
        # the microsecond kernels need the launching thread on a core every few hundred
        # microseconds (the work in flight is bounded to P % of 2 ms): on an
        # oversubscribed host the device idles below the limit; the cap holds whatever
        # the load (one cost for all kernels kept the device 95..99 % busy). Half the
        # share is asked up to twice as many runnable threads as cores (stress-ng --cpu 2
        # beside the suite on 2 cores); beyond, the launching thread's part of a core
        # shrinks with the load, and so does the floor (it got 14.7 % near load 5)
        assert max(fractions) <= 30 + TOLERANCE_POINTS, f"busy up to {max(fractions):.2f}%"
        share = sum(fractions) / len(fractions)
        floor = 30 / 2 * load_scale()
        assert share >= floor, f"busy {share:.2f}% on average for 30%"
        return
    assert_within(fractions, 30)


@dataclass(frozen=True)
class Switch:
    """A program that launched 5 us kernels, then 50 ms ones, under a 30 % limit."""

    runs: list[tuple[int, int]]  # busy runs of the device, ns
    switch_ns: int | None  # when the 50 ms kernels began; None if it never finished
    longest_wait_ns: int | None  # longest launch call among the 50 ms kernels


@pytest.fixture(scope="module")
def switched(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    root = tmp_path_factory.mktemp("switch")
    container = harness.Container(root=root)
    container.env.update(
        {"CUDA_DEVICE_SM_LIMIT": "30", "VSLICE_MOCKGPU_TRACE": str(root / "trace")}
    )
    running = container.start("probe", "switch", "kernel", "5", "1.5", "50000", "3")
    try:
        (line,) = running.finish(timeout_s=25).of("switch")
        assert line.int("rc") == 0
        yield Switch(
            harness.busy_intervals(root / "trace"), line.int("switch_ns"), line.int("max_call2_ns")
        )
    except subprocess.TimeoutExpired:
        # still blocked in a launch: SIGTERM makes it exit, which writes its trace
        running.proc.terminate()
        running.proc.communicate(timeout=10)
        yield Switch(harness.busy_intervals(root / "trace"), None, None)


def test_after_a_switch_to_long_kernels_the_device_is_never_busy_twice_the_window_straight(
    switched: Switch,
) -> None:
    longest = max(end - start for start, end in switched.runs) / 1e9
    assert longest <= 2 * WINDOW_S, f"the device was busy {longest:.2f} s straight"


def test_after_a_switch_to_long_kernels_no_launch_waits_twice_the_window(
    switched: Switch,
) -> None:
    assert switched.longest_wait_ns is not None, "a launch was still waiting 20 s after the switch"
    # a quarter of the window on top, for a loaded machine's scheduling delays
    assert switched.longest_wait_ns / 1e9 <= 2.25 * WINDOW_S


# Launches waiting for tokens go one after another, each paying its kernel: four
# processes switching to 50 ms kernels at 10 % once waited the 2 s debt plus the
# others' kernels, up to 3.45 s (benchmarks/libvgpu.py, 5us>50ms, 4 processes), and
# a process whose turn another took (the bucket turned positive between two
# waiters' looks) waited 2.5 to 3.4 s. 25 ms kernels here: four processes taking
# turns at 50 ms and 10 % need 2 s a launch, the bound itself, so that case would
# measure the host's timers, not the limiter.
def test_after_four_processes_switch_to_long_kernels_no_launch_waits_twice_the_window(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "10"
    args = ("switch", "kernel", "5", "1.5", "25000", "4")
    runs = [container.start("probe", *args) for _ in range(4)]
    lines = [run.finish(timeout_s=40).of("switch")[0] for run in runs]
    assert all(line.int("rc") == 0 for line in lines)
    longest = max(line.int("max_call2_ns") for line in lines) / 1e9
    # Taking turns is 1 s a launch (4 x 25 ms at 10 %); the launches waiting together
    # at the switch are let wait 1.75 s (launch.c, AIM_NS), a quarter of the window
    # short of the bound for an idle host's scheduling delays; an oversubscribed host
    # (CI beside other jobs) may keep a waiter off a core past its turn
    bound = (2.5 if loaded() else 2.0) * WINDOW_S
    assert longest <= bound, f"a launch waited {longest:.2f} s"


def a_launch_waits(cache: Path) -> bool:
    """Whether, past the container's first two launches on device 0, a launch waits for tokens."""
    data = cache.read_bytes() if cache.exists() else b""
    if len(data) < TICKETS_OFFSET + 8:
        return False  # the first process has not made the file yet
    (admitted,) = struct.unpack_from("<Q", data, LAUNCHES_OFFSET)
    taken, served = struct.unpack_from("<II", data, TICKETS_OFFSET)
    return admitted >= 2 and (taken - served) % (1 << 32) > 0


# A launch waiting for tokens holds the head of the container's queue; one that
# stops looking (SIGSTOP here, a kill or a host that keeps it off a core) is passed
# over, or every other process of the container would wait as long as it is stopped.
def test_a_stopped_process_at_the_head_of_the_queue_does_not_hold_the_others(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "10"
    # 50 ms kernels at 10 %: a launch waits about 0.5 s for tokens
    head = container.start("probe", "saturate", "kernel", "50000", "6")
    try:
        deadline = time.monotonic() + 20
        while not a_launch_waits(container.cache):
            assert time.monotonic() < deadline, "no launch ever waited for tokens"
            assert head.proc.poll() is None, "the first process exited"
            time.sleep(0.001)
        os.kill(head.pid, signal.SIGSTOP)
        args = ("saturate", "kernel", "5", "1.0")
        (line,) = container.start("probe", *args).finish(timeout_s=20).of("saturate")
    finally:
        os.kill(head.pid, signal.SIGCONT)
    assert line.int("rc") == 0
    assert line.int("launches") > 1
    # the stopped launch's debt (0.5 s at most) and the time to tell it is gone
    # (0.1 s), within the limiter's bound on any wait
    assert line.int("max_call_ns") / 1e9 <= 2 * WINDOW_S
    (first,) = head.finish(timeout_s=30).of("saturate")
    assert first.int("rc") == 0


@pytest.fixture(scope="module")
def grown(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    """The same kernel (function and grid) made 1000 times longer: 5 us, then 5 ms, at 90 %."""
    root = tmp_path_factory.mktemp("grow")
    container = harness.Container(root=root)
    container.env.update(
        {"CUDA_DEVICE_SM_LIMIT": "90", "VSLICE_MOCKGPU_TRACE": str(root / "trace")}
    )
    running = container.start("probe", "grow", "kernel", "5", "1.5", "5000", "3")
    try:
        (line,) = running.finish(timeout_s=25).of("grow")
        assert line.int("rc") == 0
        yield Switch(
            harness.busy_intervals(root / "trace"), line.int("switch_ns"), line.int("max_call2_ns")
        )
    except subprocess.TimeoutExpired:
        running.proc.terminate()
        running.proc.communicate(timeout=10)
        yield Switch(harness.busy_intervals(root / "trace"), None, None)


# a known kind of kernel keeps more launches in flight than a new one (launch.c, point
# 4): no more than the same kernels grown 1000 times longer run in 2 windows at P %
def test_a_known_kernel_grown_1000_times_longer_never_keeps_the_device_busy_twice_the_window(
    grown: Switch,
) -> None:
    longest = max(end - start for start, end in grown.runs) / 1e9
    assert longest <= 2 * WINDOW_S, f"the device was busy {longest:.2f} s straight"
    assert grown.longest_wait_ns is not None, "a launch was still waiting 20 s after the growth"
    assert grown.longest_wait_ns / 1e9 <= 2.25 * WINDOW_S


@pytest.mark.parametrize(
    ("kernel_us", "percent", "seconds"),
    [(1, 30, 1.0), (5, 30, 1.0), (2000, 30, 1.0), (200_000, 50, 1.0), (1_000_000, 90, 1.2)],
)
def test_the_learned_cost_per_launch_is_the_kernels_length(
    container: harness.Container, kernel_us: int, percent: int, seconds: float
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = str(percent)
    args = ("saturate", "kernel", str(kernel_us), str(seconds))
    (line,) = container.start("probe", *args).finish(timeout_s=seconds + 30).of("saturate")
    assert line.int("rc") == 0
    (cost_ns,) = struct.unpack_from("<q", Path(container.cache).read_bytes(), COST_OFFSET)
    assert abs(cost_ns / 1000 - kernel_us) <= 0.1 * kernel_us, f"learned {cost_ns} ns"
