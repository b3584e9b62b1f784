"""Running replays for people: seeds in parallel processes, a progress bar, reports, plots.

The decision logic is ``services.scheduler.core.replaying``; this module only fans seeds
out over processes, shows progress (tqdm) and writes JSON and PNG files.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from libshared import traces
from services.scheduler.core import replaying


def parse_seeds(text: str) -> list[int]:
    """``"42-51"`` -> [42..51]; ``"42,44"`` -> [42, 44]. Raises ``ValueError`` naming the text."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError as exc:
        raise ValueError(f"--seeds {text!r}: expected N, N-M or a comma list") from exc
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed")
    return seeds


def _one(args: tuple[str, str, str, int]) -> replaying.SeedResult:
    trace, fleet_path, policy, seed = args
    fleet = traces.read_fleet(fleet_path)
    pods = traces.read_pods(trace)
    # The trace and the fleet live for the whole run: keep the cyclic collector from
    # rescanning them, so its pauses do not land in the decision times.
    gc.collect()
    gc.freeze()
    try:
        return replaying.run_seed(fleet, pods, policy=policy, seed=seed)
    finally:
        gc.unfreeze()


def replay_in_process(
    trace: str,
    fleet: str,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    jobs: int = 0,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every (policy, seed) experiment and return one report per policy."""
    jobs = jobs or min(os.cpu_count() or 1, len(seeds) * len(policies))
    work = [(trace, fleet, p, s) for p in policies for s in seeds]
    results: dict[str, list[replaying.SeedResult]] = {p: [] for p in policies}
    bar = tqdm(total=len(work), desc="replay", unit="exp", disable=quiet)
    if jobs <= 1:
        for item in work:
            results[item[2]].append(_one(item))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for item, res in zip(work, pool.map(_one, work), strict=True):
                results[item[2]].append(res)
                bar.update(1)
    bar.close()
    reports = []
    for p in policies:
        report = replaying.summarize(p, results[p])
        report["trace"] = trace
        report["fleet"] = fleet
        reports.append(report)
    return reports


def write_json(path: str, reports: list[dict[str, Any]]) -> None:
    """One report -> a JSON object; several -> a JSON list of objects."""
    data: Any = reports[0] if len(reports) == 1 else reports
    Path(path).write_text(json.dumps(data, indent=1))


def plot(path: str, reports: list[dict[str, Any]]) -> None:
    """Allocation-vs-arrival curves of several policies side by side (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        xs = [100 * a for a, _ in r["curve"]]
        ys = [100 * b for _, b in r["curve"]]
        ax.plot(xs, ys, label=f"{r['policy']} ({100 * r['alloc_at_100']:.2f}%)")
    ax.plot([0, 130], [0, 130], color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(100, color="grey", linewidth=0.8)
    ax.set_xlabel("arrived workload (% of GPU capacity)")
    ax.set_ylabel("GPU allocation ratio (%)")
    ax.set_xlim(0, 130)
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title(Path(reports[0]["trace"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(reports: list[dict[str, Any]], gpus: int) -> str:
    """A plain-text summary table of replay reports."""
    head = (
        f"{'policy':<14}{'alloc@100%':>16}{'final':>8}{'unalloc GPUs':>14}{'placed':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'s/seed':>8}"
    )
    rows = [head, "-" * len(head)]
    for r in reports:
        alloc = f"{100 * r['alloc_at_100']:.2f}±{100 * r['alloc_at_100_sd']:.2f}"
        rows.append(
            f"{r['policy']:<14}{alloc:>16}{100 * r['alloc_final']:>8.2f}"
            f"{(1 - r['alloc_at_100']) * gpus:>14.0f}{r['pods_placed']:>9.0f}"
            f"{r['decision_ms_p50']:>8.3f}{r['decision_ms_p99']:>8.3f}{r['wall_s_per_seed']:>8.2f}"
        )
    return "\n".join(rows)


def comparison_table(bus: list[dict[str, Any]], local: list[dict[str, Any]]) -> str:
    """Bus and in-process reports of the same policies side by side: allocation at 100 %
    arrived, final allocation, pods placed, pods/s and latency (bus: end to end per pod;
    in process: per decision), ms."""
    head = (
        f"{'policy':<10}{'run':<22}{'alloc@100%':>11}{'final':>8}{'placed':>9}"
        f"{'pods/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
    )
    rows = [head, "-" * len(head)]
    for b, loc in zip(bus, local, strict=True):
        for r, run in (
            (b, f"bus, {b['replicas']} replicas"),
            (loc, "in process"),
        ):
            rate = r.get("pods_per_s") or r["pods_total"] / max(r["wall_s_per_seed"], 1e-9)
            p50 = r.get("latency_ms_p50", r["decision_ms_p50"])
            p99 = r.get("latency_ms_p99", r["decision_ms_p99"])
            rows.append(
                f"{r['policy']:<10}{run:<22}{100 * r['alloc_at_100']:>11.2f}"
                f"{100 * r['alloc_final']:>8.2f}{r['pods_placed']:>9.0f}{rate:>9.0f}"
                f"{p50:>8.2f}{p99:>8.2f}"
            )
    return "\n".join(rows)
