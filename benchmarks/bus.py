"""End-to-end speed of the bus: the openb trace through admission and the scheduler
replicas over NATS, for 1 and 2 replicas, with FGD.

Prints per replica count: pods/s (every arriving pod, placed or not, over the wall time of
sending them all), end-to-end latency p50/p99 (ms: admission plus scheduling as a client
sees it), pods placed, lost ledger races and lost claims. Each run starts a temporary
stack of its own (``vslice.busreplays``).

    .venv/bin/python benchmarks/bus.py                        # 1 and 2 replicas, 16 in flight
    .venv/bin/python benchmarks/bus.py --replicas 2 --concurrency 32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vslice import busreplays


def main() -> None:
    root = Path(os.environ.get("VSLICE_TRACES", "../shared/traces/openb"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(root / "openb_pod_list_default.csv"))
    parser.add_argument("--fleet", default=str(root / "openb_node_list_gpu_node.csv"))
    parser.add_argument("--policy", default="fgd")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    head = (
        f"{'replicas':>8}{'in flight':>10}{'pods/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'placed':>8}{'lost races':>11}{'lost claims':>12}"
    )
    rows = []
    for replicas in args.replicas:
        result, driven = busreplays.run_seed(
            args.trace,
            args.fleet,
            policy=args.policy,
            seed=args.seed,
            replicas=replicas,
            concurrency=args.concurrency,
            quiet=True,
        )
        lat = sorted(driven.latency_ms)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rows.append(
            f"{replicas:>8}{args.concurrency:>10}{len(lat) / driven.wall_s:>9.0f}{p50:>9.1f}"
            f"{p99:>9.1f}{result.pods_placed:>8}{driven.stats.conflicts:>11}"
            f"{driven.stats.claims_lost:>12}"
        )
        print(rows[-1] if len(rows) > 1 else f"{head}\n{'-' * len(head)}\n{rows[-1]}", flush=True)


if __name__ == "__main__":
    main()
