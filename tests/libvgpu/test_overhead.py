"""libvgpu stays cheap on the hot paths (measured on the mock driver)."""

from __future__ import annotations

import subprocess
import sys

from tests.libvgpu import harness


def cost(container: harness.Container, *args: str, preload: bool) -> float:
    container.preload = harness.LIBVGPU if preload else None
    # bench prints one "<figure>=<value>" line
    return float(container.run("bench", *args).lines[0].command.split("=")[1])


def costs(container: harness.Container, *args: str) -> tuple[float, float]:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "8g"
    return cost(container, *args, preload=False), cost(container, *args, preload=True)


def test_a_launch_without_an_sm_limit_costs_at_most_50_ns_more(
    container: harness.Container,
) -> None:
    without, with_ = costs(container, "launch", "1000000")
    assert with_ - without <= 50.0, (without, with_)


def test_an_alloc_free_pair_costs_at_most_1_us_more(container: harness.Container) -> None:
    without, with_ = costs(container, "allocfree", "50000", str(1 << 20))
    assert with_ - without <= 1000.0, (without, with_)


def test_eight_processes_allocating_at_once_add_at_most_20_us_per_allocation(
    container: harness.Container,
) -> None:
    without, with_ = costs(container, "contend", "8", "3000", str(1 << 20))
    assert with_ - without <= 20.0, (without, with_)


def test_the_benchmark_prints_every_figure_in_one_run(native: None) -> None:
    out = subprocess.run(
        [sys.executable, str(harness.ROOT / "benchmarks" / "libvgpu.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    ).stdout
    for label in ("launch, no SM limit", "alloc+free pair", "8 processes allocating"):
        (row,) = [line for line in out.splitlines() if line.startswith(label)]
        without, with_, difference, ratio = row[36:].split()
        assert (
            float(with_) - float(without) == float(difference)
            or abs(float(with_) - float(without) - float(difference)) < 0.01
        )
        assert ratio.endswith("x")
    for percent in (10, 30, 50, 90):
        assert f"{percent:3d}%: busy" in out
