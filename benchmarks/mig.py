"""MIG placement on a synthetic trace: vslice's ``keep-largest`` start against the plain
``first`` free start (``services/scheduler/core/migplacing.py``), in one run.

A fleet of MIG GPUs of one model receives MIG requests (memory in MiB, drawn from a mix)
one at a time, as the FGD paper's experiment does for shares (``replaying``): each goes
at once to a GPU or is refused. The GPU: the most used one (slots taken) whose free
starts hold the request's profile, ties to the lowest index (binpack). Per rule and mix:
the share of the fleet's memory slices allocated when the requests reach 100 % of the
fleet's memory (in MiB, the largest profile's per GPU), when the first request was
refused, and how many were refused by then; mean over seeds. (Slices, not the profiles'
MiB: H200's names round, so seven 1g.18gb name more than its 141 GB.)

    .venv/bin/python benchmarks/mig.py
    .venv/bin/python benchmarks/mig.py --gpus 200 --seeds 1-10
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from libshared.migs import GEOMETRIES, Geometry, Instance, occupied
from services.scheduler.core import migplacing

# name -> (model, allowlist or None, [(MiB asked, weight)])
MIXES: dict[str, tuple[str, frozenset[str] | None, list[tuple[int, float]]]] = {
    "a100-80 every profile": (
        "A100-80GB",
        None,
        [(9_000, 0.40), (18_000, 0.25), (38_000, 0.20), (80_000, 0.15)],
    ),
    "a100-80 no double-memory 1g": (
        "A100-80GB",
        frozenset({"1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"}),
        [(9_000, 0.45), (18_000, 0.25), (38_000, 0.20), (80_000, 0.10)],
    ),
    "a100-40 small-heavy": (
        "A100-40GB",
        None,
        [(4_000, 0.55), (9_000, 0.25), (19_000, 0.15), (40_000, 0.05)],
    ),
    "h200 mixed": (
        "H200-141GB",
        None,
        [(16_000, 0.35), (30_000, 0.25), (70_000, 0.25), (140_000, 0.15)],
    ),
    "a30": ("A30-24GB", None, [(6_000, 0.5), (12_000, 0.3), (24_000, 0.2)]),
}


@dataclass
class Result:
    at_100: float  # memory slices allocated / the fleet's when requests reached 100 %
    first_refusal: float  # requested / fleet memory at the first refusal
    refused_by_100: int


def run(
    geometry: Geometry,
    allowlist: frozenset[str] | None,
    mix: list[tuple[int, float]],
    *,
    gpus: int,
    seed: int,
    rule: migplacing.Rule,
) -> Result:
    """One seed of one mix under ``rule`` (see the module docstring)."""
    rng = random.Random(seed)
    sizes, weights = zip(*mix, strict=True)
    full = max(p.memory_mib for p in geometry.profiles)
    capacity = gpus * full
    fleet: list[list[Instance]] = [[] for _ in range(gpus)]
    used = [0] * gpus  # slots taken per GPU
    requested = allocated = refused = 0
    first = 0.0
    at_100 = 0.0
    while requested < 1.3 * capacity:
        ask = rng.choices(sizes, weights)[0]
        requested += ask
        best = None
        for g in sorted(range(gpus), key=lambda g: (-used[g], g)):
            choice = migplacing.choose(geometry, fleet[g], ask, allowlist=allowlist, rule=rule)
            if choice is not None:
                best = (g, choice)
                break
        if best is None:
            if requested <= capacity:
                refused += 1
            if not first:
                first = requested / capacity
        else:
            g, choice = best
            fleet[g].append(choice.instance())
            used[g] = bin(occupied(fleet[g])).count("1")
            allocated += choice.profile.size
        if requested <= capacity:
            at_100 = allocated / (gpus * geometry.slots)
    return Result(at_100=at_100, first_refusal=first, refused_by_100=refused)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpus", type=int, default=100)
    ap.add_argument("--seeds", default="1-5", help="a range a-b")
    args = ap.parse_args()
    low, _, high = args.seeds.partition("-")
    seeds = list(range(int(low), int(high or low) + 1))
    started = time.perf_counter()
    head = f"{'mix':<30}{'rule':<14}{'alloc@100%':>11}{'first refusal':>15}{'refused by 100%':>17}"
    print(f"{args.gpus} GPUs per fleet, seeds {args.seeds}\n{head}\n{'-' * len(head)}")
    for name, (model, allowlist, mix) in MIXES.items():
        means = {}
        for rule in ("first", "keep-largest"):
            runs = [
                run(GEOMETRIES[model], allowlist, mix, gpus=args.gpus, seed=s, rule=rule)
                for s in seeds
            ]
            means[rule] = 100 * statistics.fmean(r.at_100 for r in runs)
            print(
                f"{name:<30}{rule:<14}{means[rule]:>10.2f}%"
                f"{100 * statistics.fmean(r.first_refusal for r in runs):>14.1f}%"
                f"{statistics.fmean(r.refused_by_100 for r in runs):>17.1f}"
            )
        print(f"{'':<30}{'gain':<14}{means['keep-largest'] - means['first']:>+10.2f} points")
    print(f"\nwall {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
