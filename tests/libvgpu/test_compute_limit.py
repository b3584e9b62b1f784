"""CUDA_DEVICE_SM_LIMIT holds the device's busy fraction to the slice.

A saturating program launches mock kernels of a known length as fast as it can;
the mock records when each kernel occupied the device, and every 2 s window
(stepped by 50 ms) must stay within 3 points of the limit.
"""

from __future__ import annotations

import pytest

from tests.libvgpu import harness

TOLERANCE_POINTS = 3.0


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


@pytest.mark.parametrize("kernel_us", [200, 10000])
def test_the_limit_does_not_depend_on_how_long_kernels_are(
    container: harness.Container, kernel_us: int
) -> None:
    container.env["CUDA_DEVICE_SM_LIMIT"] = "40"
    assert_within(saturate(container, kernel_us=kernel_us, seconds=3.0), 40)


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
