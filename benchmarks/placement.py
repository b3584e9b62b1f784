"""Placement quality and speed of policies on the openb traces, in one run.

Prints, per trace and policy: GPU allocation at arrived = 100 % (mean +- sd over seeds),
unallocated GPUs, pods placed, decision time p50/p99 (ms, pure core), wall time per
experiment (s) and peak memory of the run (MiB), beside the paper simulator's reference
figures where ../shared/FGD.md lists them, and the ``steer`` policy's gain over ``fgd``
per trace; beside them the pooled best-fit estimate of what an online policy can reach
(``ceilings``: every GPU of the fleet in one node, no CPU, memory or type limits) and, on
the default trace, where steer's leftover sits. Then the table of what was tried for
``steer`` (``--ablation`` re-measures it).

    .venv/bin/python benchmarks/placement.py                 # steer, fgd, bestfit; all traces
    .venv/bin/python benchmarks/placement.py --policies all --traces default --seeds-default 42
    .venv/bin/python benchmarks/placement.py --traces default --ablation --seeds-default 42-44
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from libshared import traces
from libshared.events import Placement
from services.scheduler.core import ceilings, replaying, steering
from services.scheduler.core.clusters import MILLI, Cluster
from services.scheduler.core.deciding import Scheduler
from vslice import replays_local

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
ALL_POLICIES = (
    "hami,hami-binpack,hami-spread,fgd,bestfit,dotprod,gpupacking,gpuclustering,random,steer"
)
POLICIES = "steer,fgd,bestfit"

# What was tried for ``steer`` (``steering.Knobs``; None = fgd itself): name, knobs, the
# allocation % at arrived 100 % measured on the default trace when the policy was built
# (seeds 42-44 unless the name says otherwise), and what it did on the multi-GPU variants
# (seed 42 unless said). ``--ablation`` measures the default column again in this run.
FINE: dict[str, object] = {"fgd_scale": False, "tiebreak": True}  # steer before
TRIED: list[tuple[str, dict[str, object] | None, float, str]] = [
    ("fgd (sigmoid score, node order on ties)", None, 95.21, "mg40 96.71"),
    (
        "fine score, no stranding, no tie-break",
        {"strand": 0.0, "fgd_scale": False},
        94.32,
        "mg40 96.74 gs25 93.53",
    ),
    ("fine score, no stranding [42]", {"strand": 0.0, **FINE}, 94.11, "mg40 96.76 gs25 93.45"),
    (
        "fine score quantised to 40, no stranding",
        {"strand": 0.0, "quantum": 40.0, **FINE},
        94.93,
        "",
    ),
    (
        "fine, stranding 0.3 (steer before) [42]",
        {"fgd_scale": False, "tiebreak": True},
        95.76,
        "mg40 96.85 mg30 96.69 mg20 96.21 gs25 93.45 gs33 87.21",
    ),
    (
        "fine, stranding 0.3, also on typed GPUs [42]",
        {"strand_typed": True, **FINE},
        95.76,
        "gs25 89.78; 3 seeds: gs20 91.92 gs25 89.60 gs33 84.98",
    ),
    ("fine, stranding 0.5", {"strand": 0.5, **FINE}, 95.83, "mg40 96.86 mg30 90.21 mg20 95.48"),
    ("fine, stranding 1", {"strand": 1.0, **FINE}, 95.82, "mg40 91.27; 3 seeds: mg30 89.67"),
    ("fine, stranding 2", {"strand": 2.0, **FINE}, 95.83, ""),
    ("fine, stranding 4", {"strand": 4.0, **FINE}, 95.77, ""),
    ("fine, stranding 1, no tie-break", {"strand": 1.0, "fgd_scale": False}, 95.75, "mg40 91.27"),
    (
        "fine, stranding 1, shapes by GPU demand",
        {"strand": 1.0, "gpu_weighted": True, **FINE},
        95.80,
        "",
    ),
    (
        "fine, stranding 2, shapes by GPU demand",
        {"strand": 2.0, "gpu_weighted": True, **FINE},
        95.82,
        "",
    ),
    (
        "fine, stranding 1, score quantised to 40",
        {"strand": 1.0, "quantum": 40.0, **FINE},
        95.81,
        "",
    ),
    (
        "fine, stranding 1, score quantised to 150",
        {"strand": 1.0, "quantum": 150.0, **FINE},
        95.75,
        "",
    ),
    ("fine, stranding 1, CPU ratio x 0.6", {"strand": 1.0, "ratio_scale": 0.6, **FINE}, 95.61, ""),
    ("fine, stranding 1, CPU ratio x 1.5", {"strand": 1.0, "ratio_scale": 1.5, **FINE}, 95.59, ""),
    ("fine, stranding 2, CPU ratio x 1.5", {"strand": 2.0, "ratio_scale": 1.5, **FINE}, 95.53, ""),
    (
        "fine, stranding 1, CPU-only pods only [42]",
        {"strand": 1.0, "strand_gpu_pods": False, **FINE},
        94.11,
        "mg40 96.76",
    ),
    (
        "fine, stranding 1, growth only, no reward [42]",
        {"strand": 1.0, "strand_growth_only": True, **FINE},
        94.28,
        "mg40 96.73 mg30 96.43",
    ),
    (
        "fine, stranding 1, no reward on idle nodes [42]",
        {"strand": 1.0, "strand_idle": False, **FINE},
        95.04,
        "mg40 96.98 mg30 96.45",
    ),
    (
        "FGD's scale, stranding 0.3 (steer) [42]",
        {},
        95.75,
        "gs10 94.52 gs25 94.06 gs33 87.66 mg30 96.72 gshare100 87.04 cpu050 95.82",
    ),
    (
        "FGD's scale, least-leftover tie-break [42]",
        {"tiebreak": True},
        95.76,
        "gs25 93.04 gs33 86.56",
    ),
    ("FGD's scale, stranding 0.5 [42]", {"strand": 0.5}, 95.77, "mg30 90.21 gs25 94.06"),
    ("FGD's scale, stranding 1 [42]", {"strand": 1.0}, 95.72, "mg30 89.30 gs25 94.06"),
    (
        "FGD's scale, shapes by GPU demand [42]",
        {"gpu_weighted": True},
        95.81,
        "mg30 96.26 gs25 86.07",
    ),
]

NOTES = (
    "seed 42 alone: fgd 95.13 and stranding 1 95.85 on the default trace.",
    "FGD's shapes covering 99 % / 100 % of tasks instead of 95 % (a different target workload,"
    " not a knob), stranding 1: 95.86 / 95.83 (seeds 42-43).",
    "Stranding 1 falls off a cliff on the multi-GPU variants: its reward for taking GPUs a"
    " node's CPU cannot feed outweighs FGD's penalty for breaking an idle 8-GPU node, so small"
    " pods open big nodes and 4/8-GPU pods fail early (final allocation is higher, but at"
    " arrived 100 % it is 7 points below fgd). Without the reward the default gain goes too;"
    " 0.3 is the largest weight measured safe on multigpu20/30/40 (0.5 is not, on multigpu30).",
    "mgNN = multigpuNN, gsNN = gpuspecNN (fgd, 3 seeds: mg20 95.50, mg30 96.21, mg40 96.77,"
    " gs20 94.73, gs25 93.90, gs33 87.83). On the gpuspec variants even the fine score alone"
    " stays below fgd (gs25 93.45-93.53 against 93.90), and so did the fine score with"
    " stranding: the reason steer now scores on FGD's integer scale.",
    "fgd, seed 42, measured beside the FGD's-scale rows: default 95.13, gs10 94.41, gs25 93.86,"
    " gs33 87.66, mg30 96.24, gshare100 86.61, cpu050 94.94.",
    "Also tried, seed 42, not kept as a knob: FGD's own score first, then the fine score with"
    " stranding among FGD's ties (lexicographic): default 95.82, gs25 93.45, gs33 87.21"
    " (the fine order among FGD's ties is what loses on the typed variants).",
)


POOLED_NOTES = (
    "An estimate, not a proof: other online rules in the pooled model did not beat best"
    " fit on the default trace (10 seeds): FGD's measure per GPU 95.93 %, the same with"
    " shapes weighed by GPU demand 95.93 %, sum of squares 94.27 %, worst fit 94.93 %"
    " (best fit 95.92 %). Offline, first-fit-decreasing of the sharing pods that arrive"
    " by 100 % (seeds 42-44) leaves 248-251 GPUs free in its bins: about 96.0 %.",
    "On the default trace the 810 milli-GPU shape (1,078 of 8,152 pods) leaves 190 on"
    " each GPU it takes, and only ~105 pods of the trace ask 190 or less: about 3 % of the"
    " fleet stays free whatever the policy (the leftover line below).",
)


def _variant(args: tuple[str, str, dict[str, object] | None, int]) -> float:
    """Allocation at arrived 100 % of one seed with ``steer`` under ``knobs`` (None: fgd)."""
    return _replay(*args)[0]


def _replay(
    trace: str, fleet_path: str, knobs: dict[str, object] | None, seed: int
) -> tuple[float, Cluster]:
    """Allocation at arrived 100 % of one seed with ``steer`` under ``knobs`` (None: fgd),
    and the cluster as it stood then."""
    fleet = traces.read_fleet(fleet_path)
    pods = traces.read_pods(trace)
    cluster = Cluster(max_devices=max(len(n.devices) for n in fleet))
    for node in fleet:
        cluster.upsert_node(node)
    workload = replaying.trace_workload(pods)
    scheduler = Scheduler(
        cluster, policy="fgd" if knobs is None else "steer", workload=workload, seed=seed
    )
    if knobs is not None:
        scheduler.steer = steering.SteerScorer(workload, knobs=steering.Knobs(**knobs))
    capacity = replaying.capacity_milli(fleet)
    requested = allocated = 0
    at100 = 0.0
    for i, pod in enumerate(replaying.arrivals(pods, seed=seed, capacity=capacity)):
        decision = scheduler.decide(pod.request(f"{seed}-{i}"), explain=False)
        if isinstance(decision, Placement):
            cluster.apply(decision)
            allocated += pod.milli_total
        requested += pod.milli_total
        if requested > capacity:
            break
        at100 = allocated / capacity
    return at100, cluster


def ceiling(trace: str, fleet_path: str, seeds: list[int]) -> list[float]:
    """Per seed, the allocation at arrived 100 % of best fit on the fleet's GPUs pooled
    into one node (``ceilings.pooled_best_fit``)."""
    fleet = traces.read_fleet(fleet_path)
    pods = traces.read_pods(trace)
    capacity = replaying.capacity_milli(fleet)
    values = []
    for seed in seeds:
        curve = ceilings.pooled_best_fit(
            replaying.arrivals(pods, seed=seed, capacity=capacity), capacity // MILLI
        )
        values.append(max((a for r, a in curve if r <= 1.0 + 1e-12), default=0.0))
    return values


def leftover_line(trace: str, fleet_path: str, seed: int) -> str:
    """Where steer's free GPU sits at arrived 100 % on one seed: the commonest remainders."""
    at100, cluster = _replay(trace, fleet_path, {}, seed)
    free = cluster.free_milli[cluster.dev_valid].tolist()
    counts = ceilings.leftover(free)
    whole = sum(1 for f in free if f >= MILLI)
    total = sum(f * n for f, n in counts.items())
    top = sorted(counts.items(), key=lambda kv: -kv[0] * kv[1])[:6]
    parts = ", ".join(f"{f} x {n} ({f * n / MILLI:.1f})" for f, n in top)
    return (
        f"steer, seed {seed}: {100 * at100:.2f} %; free then: {whole} whole GPUs and "
        f"{total / MILLI:.1f} GPUs in {sum(counts.values())} remainders; the largest, "
        f"milli x GPUs (GPUs): {parts}"
    )


def ablation(trace: str, fleet: str, seeds: list[int], *, jobs: int, live: bool) -> str:
    """The table of ``TRIED``, with this run's measurement when ``live``."""
    measured: dict[str, float] = {}
    if live:
        work = [(trace, fleet, knobs, s) for _, knobs, _, _ in TRIED for s in seeds]
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            values = list(pool.map(_variant, work))
        for i, (name, _, _, _) in enumerate(TRIED):
            measured[name] = 100 * statistics.fmean(values[i * len(seeds) : (i + 1) * len(seeds)])
    head = f"{'tried (steer knobs)':<50}{'default then':>13}{'now':>8}  other variants"
    rows = [head, "-" * (len(head) + 14)]
    for name, _, then, elsewhere in TRIED:
        now = f"{measured[name]:>8.2f}" if name in measured else f"{'-':>8}"
        rows.append(f"{name:<50}{then:>13.2f}{now}  {elsewhere}")
    rows.extend(f"- {note}" for note in NOTES)
    return "\n".join(rows)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--traces-dir",
        default=os.environ.get("VSLICE_TRACES", str(root.parent / "shared/traces/openb")),
    )
    ap.add_argument("--traces", default="all", help="comma list of variants, or all")
    ap.add_argument("--policies", default=POLICIES, help=f"comma list, or all ({ALL_POLICIES})")
    ap.add_argument("--seeds-default", default="42-51", help="seeds on the default trace")
    ap.add_argument("--seeds", default="42-44", help="seeds on the other traces")
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--ablation", action="store_true", help="re-measure the tried table")
    args = ap.parse_args()
    tdir = Path(args.traces_dir)
    fleet = str(tdir / "openb_node_list_gpu_node.csv")
    gpus = sum(len(n.devices) for n in traces.read_fleet(fleet))
    policies = (ALL_POLICIES if args.policies == "all" else args.policies).split(",")
    names = args.traces.split(",")
    if args.traces == "all":
        found = sorted(
            p.stem.removeprefix("openb_pod_list_") for p in tdir.glob("openb_pod_list_*.csv")
        )
        names = ["default", *(x for x in found if x != "default")]
    started = time.perf_counter()
    gains: list[tuple[str, float]] = []
    pooled_rows: list[tuple[str, float, float]] = []
    for name in names:
        seeds_text = args.seeds_default if name == "default" else args.seeds
        seeds = replays_local.parse_seeds(seeds_text)
        trace = str(tdir / f"openb_pod_list_{name}.csv")
        reports = replays_local.replay_in_process(
            trace, fleet, policies, seeds, jobs=args.jobs, quiet=True
        )
        print(f"\n== {name}  ({len(seeds)} seeds: {seeds_text}; fleet {gpus} GPUs)", flush=True)
        lines = replays_local.table(reports, gpus).splitlines()
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
        by = {r["policy"]: r["alloc_at_100"] for r in reports}
        pooled = 100 * statistics.fmean(ceiling(trace, fleet, seeds))
        best = max(by.values(), default=0.0) * 100
        pooled_rows.append((name, pooled, best))
        print(
            f"pooled best fit (one node of every GPU; no CPU, memory, type or node limits): "
            f"{pooled:.2f} %; the best policy above {best - pooled:+.2f} points from it"
        )
        if "steer" in by and "fgd" in by:
            gains.append((name, 100 * (by["steer"] - by["fgd"])))
            print(f"steer - fgd: {gains[-1][1]:+.2f} points", flush=True)
    if gains:
        print("\n== steer - fgd, allocation points at arrived 100 %")
        for name, gain in gains:
            print(f"{name:<14}{gain:>+8.2f}{'' if gain >= 0 else '   below fgd'}")
    if pooled_rows:
        print("\n== the pooled best-fit estimate of what an online policy can reach")
        print(f"{'trace':<14}{'pooled':>8}{'best policy':>13}{'diff':>8}")
        for name, pooled, best in pooled_rows:
            print(f"{name:<14}{pooled:>8.2f}{best:>13.2f}{best - pooled:>+8.2f}")
        for note in POOLED_NOTES:
            print(f"- {note}")
    if "default" in names:
        trace = str(tdir / "openb_pod_list_default.csv")
        seed = replays_local.parse_seeds(args.seeds_default)[0]
        print("\n== the leftover at arrived 100 % on the default trace")
        print(leftover_line(trace, fleet, seed))
        print("\n== what was tried for steer (default trace, seeds 42-44 when built)")
        seeds = replays_local.parse_seeds(args.seeds_default)
        trace = str(tdir / "openb_pod_list_default.csv")
        print(ablation(trace, fleet, seeds, jobs=args.jobs, live=args.ablation))
    peak = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(
        f"\ntotal wall {time.perf_counter() - started:.1f} s; "
        f"peak RSS (self + largest child) {peak / 1024:.0f} MiB; load average (1 min) "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (decision times scale with it)"
    )


if __name__ == "__main__":
    main()
