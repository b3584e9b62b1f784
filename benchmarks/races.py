"""Races between replicas, in process: R replicas decide a pod each on one view at once,
then commit in turn; a replica whose node another committed in that round has lost the
race (the ledger's compare-and-set on the bus) and decides again on the new view.

Prints per policy and replica count: lost races per placed pod (conflict rate), and the
allocation ratio at 100 % arrived and at the end, beside one replica deciding alone in the
same run (the in-process replay), for each shard epsilon asked and without partitioning
(every replica deciding as if alone: how the bus decided before). No I/O, no timing: the
bus's own figures are benchmarks/bus.py's.

    .venv/bin/python benchmarks/races.py --policies hami fgd --replicas 2 3 --epsilon 0.05 0.5
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from libshared import traces
from libshared.devices import NodeDevices
from libshared.events import Placement
from services.scheduler.core import partitioning, replaying
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

POLICIES = ("hami", "hami-binpack", "hami-spread", "fgd", "steer")


def race(
    fleet: list[NodeDevices],
    pods: list[traces.TracePod],
    *,
    policy: str,
    seed: int,
    replicas: int,
    epsilon: float | None,
) -> dict[str, float]:
    """One run; ``epsilon`` None: no partitioning. Returns conflicts, conflict_rate (per
    placed pod), pods_placed, alloc_at_100 and alloc_final (fractions 0-1)."""
    cluster = Cluster(max_devices=max(len(n.devices) for n in fleet))
    cluster.upsert_nodes(list(fleet))
    capacity = replaying.capacity_milli(fleet)
    workload = replaying.trace_workload(pods)
    deciders = [
        Scheduler(
            cluster,
            policy=policy,
            workload=workload,
            seed=seed + i,
            partition=partitioning.Partition(
                index=0 if epsilon is None else i,
                count=1 if epsilon is None else replicas,
                epsilon=epsilon or 0.0,
            ),
        )
        for i in range(replicas)
    ]
    sequence = replaying.arrivals(pods, seed=seed, capacity=capacity)
    requests = [p.request(f"{seed}-{i}") for i, p in enumerate(sequence)]
    conflicts = placed = 0
    requested = allocated = 0
    at100 = 0.0
    for start in range(0, len(requests), replicas):
        batch = list(zip(deciders, requests[start : start + replicas], strict=False))
        decided = [d.decide(r, explain=False) for d, r in batch]
        taken: set[str] = set()
        for (decider, request), decision in zip(batch, decided, strict=True):
            if isinstance(decision, Placement) and decision.node in taken:
                conflicts += 1
                decision = decider.decide(request, explain=False)
            if isinstance(decision, Placement):
                cluster.apply(decision)
                taken.add(decision.node)
                placed += 1
        for (_, request), pod in zip(batch, sequence[start : start + replicas], strict=True):
            requested += pod.milli_total
            if cluster.placement_of(request.uid) is not None:
                allocated += pod.milli_total
            if requested <= capacity:
                at100 = allocated / capacity
    return {
        "conflicts": conflicts,
        "conflict_rate": conflicts / max(placed, 1),
        "pods_placed": placed,
        "alloc_at_100": at100,
        "alloc_final": allocated / capacity,
    }


def main() -> None:
    root = Path(os.environ.get("VSLICE_TRACES", "../shared/traces/openb"))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trace", default=str(root / "openb_pod_list_default.csv"))
    parser.add_argument("--fleet", default=str(root / "openb_node_list_gpu_node.csv"))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[partitioning.DEFAULT_EPSILON])
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    fleet, pods = traces.read_fleet(args.fleet), traces.read_pods(args.trace)
    head = (
        f"{'policy':<14}{'R':>3}{'epsilon':>9}{'placed':>8}{'races':>7}{'rate %':>8}"
        f"{'alloc@100':>11}{'final':>8}{'d@100 %':>9}{'dfinal %':>9}"
    )
    print(head, flush=True)
    rows = []
    for policy in args.policies:
        alone = race(fleet, pods, policy=policy, seed=args.seed, replicas=1, epsilon=None)
        for replicas in args.replicas:
            for epsilon in [None, *args.epsilon]:
                r = race(
                    fleet, pods, policy=policy, seed=args.seed, replicas=replicas, epsilon=epsilon
                )
                d100 = 100 * (r["alloc_at_100"] - alone["alloc_at_100"]) / alone["alloc_at_100"]
                dfin = 100 * (r["alloc_final"] - alone["alloc_final"]) / alone["alloc_final"]
                eps = "off" if epsilon is None else f"{epsilon:.2f}"
                print(
                    f"{policy:<14}{replicas:>3}{eps:>9}{r['pods_placed']:>8}{r['conflicts']:>7}"
                    f"{100 * r['conflict_rate']:>8.1f}{r['alloc_at_100']:>11.4f}"
                    f"{r['alloc_final']:>8.4f}{d100:>9.2f}{dfin:>9.2f}",
                    flush=True,
                )
                rows.append(
                    {"policy": policy, "replicas": replicas, "epsilon": epsilon, **r,
                     "alone_alloc_at_100": alone["alloc_at_100"],
                     "alone_alloc_final": alone["alloc_final"]}
                )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
