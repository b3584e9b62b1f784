"""The libvgpu benchmark prints its per-call figures (the targets are checked there, in
`benchmarks/libvgpu.py`, never as timed unit tests)."""

from __future__ import annotations

import subprocess
import sys

from tests.libvgpu import harness


def test_the_benchmark_prints_every_figure_in_one_run(native: None) -> None:
    out = subprocess.run(
        # one second per compute run: the figures are checked for their form, not values
        [
            *(sys.executable, str(harness.ROOT / "benchmarks" / "libvgpu.py")),
            *("--quick", "--seconds", "1"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    ).stdout
    for label in ("launch, no SM limit", "alloc+free pair", "8 processes allocating"):
        (row,) = [line for line in out.splitlines() if line.startswith(label)]
        without, with_, difference, ratio, verdict, budget = row[36:].split()
        # each figure is printed rounded to 0.01, so the printed difference may be
        # off the difference of the printed figures by up to 0.015
        assert abs(float(with_) - float(without) - float(difference)) <= 0.015 + 1e-9, row
        assert ratio.endswith("x")
        assert verdict in ("within", "OVER") and budget.startswith("+"), row
    for procs in (8, 32):
        label = f"refused alloc, {procs} processes (us)"
        (row,) = [line for line in out.splitlines() if line.startswith(label)]
        p50_without, p99_without, p50_with, p99_with = map(float, row[36:].split())
        assert p50_without <= p99_without and p50_with <= p99_with, row
    shares = [line.split() for line in out.splitlines() if line.startswith(("5us ", "2ms "))]
    assert sorted((row[0], int(row[2])) for row in shares) == sorted(
        (kernels, percent) for kernels in ("5us", "2ms") for percent in (10, 30, 50, 90)
    )
    for kernels, _procs, percent, baseline, share, error, *_rest, verdict in shares:
        # the error is the share less the limit, or less the unlimited share when lower
        target = min(float(percent), float(baseline))
        assert abs(float(share) - target - float(error)) <= 0.015 + 1e-9, (kernels, percent)
        assert verdict in ("within", "OUT")
