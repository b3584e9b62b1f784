"""What libvgpu costs, measured on the mock driver.

Prints, in one run, the per-call cost of a kernel launch (no SM limit) and of an
alloc+free pair with and without libvgpu preloaded, their difference and ratio,
the per-allocation time while 8 processes allocate at once, the p50 and p99
latency of a refused allocation while 8 and 32 processes are refused at once
(the slice's last bytes held, each asking for more than is left), and how
closely the compute limit holds 10/30/50/90 percent over 2 s windows. The
budgets: launch +50 ns, alloc+free +1 us, 8 processes +20 us per allocation
(HAMi-core measured 12.7 ms), compute limit within 3 points; refusals have no
budget (HAMi-core took its global lock, and version 1 of the shared cache a
flock, to reclaim before each refusal).

    python benchmarks/libvgpu.py [--quick] [--no-compute] [--stress N]

``--stress N`` is the long form of the SIGKILL test (tests/libvgpu/test_accounting.py
runs 1,000 iterations): N iterations of 4 workers killed, or stopped, helped and
killed, at random points, each followed by a check that the shared cache's charge
equals what is really held.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBVGPU_DIR = ROOT / "services" / "nodeagent" / "libvgpu"
MOCK_DIR = ROOT / "services" / "nodeagent" / "mockgpu"
BUILD = LIBVGPU_DIR / "build"
WINDOW_NS = 2_000_000_000


def run(program: str, *args: str, preload: bool, env: dict[str, str], tmp: Path) -> str:
    full_env = {
        "LD_LIBRARY_PATH": str(MOCK_DIR),
        "VSLICE_MOCKGPU_STATE": str(tmp / "mockgpu.state"),
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(tmp / "vgpu.cache"),
        **env,
    }
    if preload:
        full_env["LD_PRELOAD"] = str(LIBVGPU_DIR / "libvgpu.so")
    proc = subprocess.run(
        [str(BUILD / program), *args], env=full_env, capture_output=True, text=True, check=True
    )
    return proc.stdout


def figure(output: str) -> float:
    return float(output.strip().split("=", 1)[1])


def overhead(quick: bool) -> list[tuple[str, float, float]]:
    launches = "200000" if quick else "5000000"
    pairs = "20000" if quick else "300000"
    per_proc = "2000" if quick else "20000"
    rows = []
    for label, args in (
        ("launch, no SM limit (ns)", ("launch", launches)),
        ("alloc+free pair, 1 MiB (ns)", ("allocfree", pairs, str(1 << 20))),
        ("8 processes allocating (us/alloc)", ("contend", "8", per_proc, str(1 << 20))),
    ):
        values = []
        for preload in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                env = {"CUDA_DEVICE_MEMORY_LIMIT": "8g"}
                values.append(figure(run("bench", *args, preload=preload, env=env, tmp=Path(tmp))))
        rows.append((label, values[0], values[1]))
    return rows


def refusals(quick: bool) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """(label, (p50, p99) without libvgpu, (p50, p99) with it) in microseconds.

    A 64 MiB card and slice: 32 MiB held, every process asks for 48 MiB. Without
    libvgpu the mock driver refuses; with it, libvgpu does, after reclaiming
    dead processes' charges.
    """
    per_proc = "500" if quick else "5000"
    env = {"VSLICE_MOCKGPU_DEVICES": "GPU-bench:64", "CUDA_DEVICE_MEMORY_LIMIT": "64m"}
    rows = []
    for procs in ("8", "32"):
        pairs = []
        for preload in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                out = run(
                    "bench",
                    "refused",
                    procs,
                    per_proc,
                    str(32 << 20),
                    str(48 << 20),
                    preload=preload,
                    env=env,
                    tmp=Path(tmp),
                )
            values = dict(w.split("=") for w in out.split())
            pairs.append((float(values["refused_p50_us"]), float(values["refused_p99_us"])))
        rows.append((f"refused alloc, {procs} processes (us)", pairs[0], pairs[1]))
    return rows


def stress(iterations: int) -> tuple[int, int, float]:
    """(iterations, mismatches, seconds) of killstress on a 1 TiB mock card, 1000 MiB slice."""
    env = {"VSLICE_MOCKGPU_DEVICES": "GPU-stress:1048576", "CUDA_DEVICE_MEMORY_LIMIT": "1000m"}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        out = run(
            "killstress",
            str(iterations),
            "4",
            str(100 << 20),
            "1",
            preload=True,
            env=env,
            tmp=Path(tmp),
        )
        seconds = time.monotonic() - started
    values = dict(w.split("=") for w in out.split()[1:])
    return int(values["iterations"]), int(values["mismatches"]), seconds


def compute_accuracy(percent: int, seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trace = tmp / "trace"
        env = {"CUDA_DEVICE_SM_LIMIT": str(percent), "VSLICE_MOCKGPU_TRACE": str(trace)}
        out = run(
            "probe", "saturate", "kernel", "2000", str(seconds), preload=True, env=env, tmp=tmp
        )
        values = dict(w.split("=") for w in out.split()[1:])
        stop = int(values["stop_ns"])
        intervals = [tuple(map(int, line.split()[2:4])) for line in trace.read_text().splitlines()]
        t = min(s for s, _ in intervals)
        fractions = []
        while t + WINDOW_NS <= stop:
            busy = sum(max(0, min(e, t + WINDOW_NS) - max(s, t)) for s, e in intervals)
            fractions.append(100.0 * busy / WINDOW_NS)
            t += 50_000_000
        return min(fractions), max(fractions)


# the budgets for the rows overhead() yields, in its order, each in its row's unit
BUDGETS = (50.0, 1000.0, 20.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--no-compute", action="store_true", help="skip the compute-limit runs")
    parser.add_argument(
        "--stress", type=int, default=0, metavar="N", help="N iterations of the SIGKILL stress"
    )
    options = parser.parse_args()
    for folder in (MOCK_DIR, LIBVGPU_DIR):
        subprocess.run(["make", "-s", "-C", str(folder)], check=True, capture_output=True)

    print("libvgpu on the mock driver (best of 5 rounds; 3 for 8 processes)")
    print(f"{'path':36} {'without':>10} {'with':>10} {'difference':>11} {'ratio':>7}  budget")
    for (label, without, with_), budget in zip(overhead(options.quick), BUDGETS, strict=True):
        ratio = with_ / without if without else float("nan")
        verdict = "within" if with_ - without <= budget else "OVER"
        print(
            f"{label:36} {without:10.2f} {with_:10.2f} {with_ - without:+11.2f} {ratio:6.2f}x"
            f"  {verdict} +{budget:g}"
        )
    print(f"{'refusals':36} {'p50 w/o':>10} {'p99 w/o':>10} {'p50 with':>11} {'p99 with':>10}")
    for label, (p50_without, p99_without), (p50_with, p99_with) in refusals(options.quick):
        print(
            f"{label:36} {p50_without:10.2f} {p99_without:10.2f} {p50_with:11.2f} {p99_with:10.2f}"
        )
    if options.stress > 0:
        iterations, mismatches, seconds = stress(options.stress)
        print(
            f"SIGKILL stress: {iterations} iterations x 4 workers, {mismatches} with the charge "
            f"off what is held ({seconds:.1f} s)"
        )
    if not options.no_compute:
        seconds = 2.5 if options.quick else 5.0
        print(f"compute limit, 2 ms kernels, {seconds} s saturating, every 2 s window:")
        for percent in (10, 30, 50, 90):
            low, high = compute_accuracy(percent, seconds)
            worst = max(abs(low - percent), abs(high - percent))
            print(f"  {percent:3d}%: busy {low:6.2f} .. {high:6.2f}%  (worst {worst:.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
