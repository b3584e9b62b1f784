"""Placement quality and speed of every policy on the openb traces, in one run.

Prints, per trace and policy: GPU allocation at arrived = 100 % (mean +- sd over seeds),
unallocated GPUs, pods placed, decision time p50/p99 (ms, pure core), wall time per
experiment (s) and peak memory of the run (MiB), beside the paper simulator's reference
figures where ../shared/FGD.md lists them.

    .venv/bin/python benchmarks/placement.py --seeds 42-51            # the full experiment
    .venv/bin/python benchmarks/placement.py --traces default --seeds 42
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from libshared import traces
from vslice import replays

REFERENCE = {  # allocation % at arrived 100 %, mean of seeds 42-51 (FGD paper's simulator)
    "default": {
        "random": 86.30,
        "dotprod": 90.62,
        "gpuclustering": 91.65,
        "gpupacking": 91.78,
        "bestfit": 92.86,
        "fgd": 95.23,
    },
    "gpushare60": {
        "random": 82.81,
        "dotprod": 86.82,
        "gpuclustering": 86.90,
        "gpupacking": 87.15,
        "bestfit": 89.06,
        "fgd": 91.25,
    },
    "gpushare100": {
        "random": 78.90,
        "dotprod": 81.98,
        "gpuclustering": 82.22,
        "gpupacking": 82.13,
        "bestfit": 84.62,
        "fgd": 86.64,
    },
    "multigpu20": {
        "random": 86.92,
        "dotprod": 91.85,
        "gpuclustering": 93.34,
        "gpupacking": 93.50,
        "bestfit": 93.73,
        "fgd": 95.53,
    },
    "multigpu50": {
        "random": 81.28,
        "dotprod": 94.73,
        "gpuclustering": 95.69,
        "gpupacking": 96.06,
        "bestfit": 95.62,
        "fgd": 97.09,
    },
    "gpuspec33": {
        "random": 83.87,
        "dotprod": 79.82,
        "gpuclustering": 81.09,
        "gpupacking": 82.22,
        "bestfit": 80.40,
        "fgd": 87.84,
    },
}
POLICIES = "hami,hami-binpack,hami-spread,fgd,bestfit,dotprod,gpupacking,gpuclustering,random"


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--traces-dir",
        default=os.environ.get("VSLICE_TRACES", str(root.parent / "shared/traces/openb")),
    )
    ap.add_argument(
        "--traces", default="default,gpushare60,gpushare100,multigpu20,multigpu50,gpuspec33"
    )
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--seeds", default="42-44")
    ap.add_argument("--jobs", type=int, default=0)
    args = ap.parse_args()
    tdir = Path(args.traces_dir)
    fleet = str(tdir / "openb_node_list_gpu_node.csv")
    gpus = sum(len(n.devices) for n in traces.read_fleet(fleet))
    seeds = replays.parse_seeds(args.seeds)
    policies = args.policies.split(",")
    started = time.perf_counter()
    for name in args.traces.split(","):
        trace = str(tdir / f"openb_pod_list_{name}.csv")
        reports = replays.replay_in_process(
            trace, fleet, policies, seeds, jobs=args.jobs, quiet=True
        )
        print(f"\n== {name}  ({len(seeds)} seeds: {args.seeds}; fleet {gpus} GPUs)")
        lines = replays.table(reports, gpus).splitlines()
        ref = REFERENCE.get(name, {})
        print(lines[0] + f"{'reference':>11}{'diff':>8}")
        print(lines[1] + "-" * 19)
        for line, r in zip(lines[2:], reports, strict=True):
            want = ref.get(r["policy"])
            extra = (
                f"{want:>11.2f}{100 * r['alloc_at_100'] - want:>+8.2f}"
                if want
                else f"{'-':>11}{'':>8}"
            )
            print(line + extra)
    peak = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(
        f"\ntotal wall {time.perf_counter() - started:.1f} s; "
        f"peak RSS (self + largest child) {peak / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
