"""The replay experiment's in-process driver: seeds in parallel processes, a progress bar,
reports, plots.

One name per role: the experiment is ``services.scheduler.core.replaying`` (pure: the
arrivals, the decisions, the report); this module drives it in process, fanning seeds out
over processes, showing progress (tqdm) and writing JSON and PNG files; its bus driver is
``vslice.replays_bus``.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from libshared import traces
from services.scheduler.core import replaying


def parse_seeds(text: str) -> list[int]:
    """``"42-51"`` -> [42..51]; ``"42,44"`` -> [42, 44]. Raises ``ValueError`` naming the
    text (and, for a range that runs backwards, the range the caller likely meant)."""
    ranges: list[tuple[int, int]] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part[1:]:
                first, last = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                ranges.append((int(first), int(last)))
            elif part:
                ranges.append((int(part), int(part)))
    except ValueError as exc:
        raise ValueError(f"--seeds {text!r}: expected N, N-M or a comma list") from exc
    for lo, hi in ranges:
        if hi < lo:
            raise ValueError(f"--seeds {text!r}: the range {lo}-{hi} runs backwards; {hi}-{lo}?")
    seeds = [s for lo, hi in ranges for s in range(lo, hi + 1)]
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


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the parent alone ends the run (and its pool),
    # so each worker does not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def replay_in_process(
    trace: str,
    fleet: str,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    jobs: int = 0,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every (policy, seed) experiment and return one report per policy.

    With ``jobs`` > 1 the experiments run in a pool of worker processes; an interrupt
    (Ctrl-C) of this process ends the workers at once and propagates as
    ``KeyboardInterrupt``."""
    jobs = jobs or min(os.cpu_count() or 1, len(seeds) * len(policies))
    work = [(trace, fleet, p, s) for p in policies for s in seeds]
    results: dict[str, list[replaying.SeedResult]] = {p: [] for p in policies}
    bar = tqdm(total=len(work), desc="replay", unit="exp", disable=quiet)
    try:
        if jobs <= 1:
            for item in work:
                results[item[2]].append(_one(item))
                bar.update(1)
        else:
            # leaving the block terminates the workers, also on an interrupt
            with multiprocessing.Pool(jobs, initializer=_ignore_interrupts) as pool:
                for item, res in zip(work, pool.imap(_one, work), strict=True):
                    results[item[2]].append(res)
                    bar.update(1)
    finally:
        bar.close()
    reports = []
    for p in policies:
        report = replaying.summarize(p, results[p])
        report["curve_band"] = band(report, results[p])
        report["trace"] = trace
        report["fleet"] = fleet
        reports.append(report)
    return reports


def write_json(path: str, reports: list[dict[str, Any]]) -> None:
    """One report -> a JSON object; several -> a JSON list of objects."""
    data: Any = reports[0] if len(reports) == 1 else reports
    Path(path).write_text(json.dumps(data, indent=1))


def band(report: dict[str, Any], results: Sequence[replaying.SeedResult]) -> list[list[float]]:
    """The seed band of a report's curve: ``[arrived, lowest, highest]`` allocation ratio
    over the seeds' ``results`` at each point of ``report["curve"]``'s grid. Pure."""
    out = []
    for arrived, _ in report["curve"]:
        at = [r.allocated_at(arrived) for r in results]
        out.append([arrived, min(at, default=0.0), max(at, default=0.0)])
    return out


ZOOM_PERCENT = (80.0, 100.0)  # where policies differ: the paper's Figure 7 insets


def plot(path: str, reports: list[dict[str, Any]]) -> None:
    """Allocation-vs-arrival curves of several policies (matplotlib; PNG, SVG or PDF by the
    file's suffix) in two panels: the whole run (0-130 % arrived), and the allocation range
    of ``ZOOM_PERCENT`` where the policies part. Each curve is the mean over seeds, with
    the seeds' min-max band shaded when the report has one (``curve_band``, from ``band``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.8))
    lo, hi = ZOOM_PERCENT
    for i, r in enumerate(reports):
        color = f"C{i}"
        xs = [100 * a for a, _ in r["curve"]]
        ys = [100 * b for _, b in r["curve"]]
        seeds = len(r.get("seeds", ())) or 1
        label = f"{r['policy']} ({100 * r['alloc_at_100']:.2f}%"
        label += f" ±{100 * r['alloc_at_100_sd']:.2f}, {seeds} seeds)" if seeds > 1 else ")"
        for ax in (whole, zoom):
            ax.plot(xs, ys, color=color, label=label, linewidth=1.2)
            if r.get("curve_band"):
                bx = [100 * a for a, _, _ in r["curve_band"]]
                ax.fill_between(
                    bx,
                    [100 * m for _, m, _ in r["curve_band"]],
                    [100 * m for _, _, m in r["curve_band"]],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
    for ax in (whole, zoom):
        ax.plot([0, 130], [0, 130], color="grey", linestyle=":", linewidth=0.8)
        ax.axvline(100, color="grey", linewidth=0.8)
        ax.set_xlabel("arrived workload (% of GPU capacity)")
        ax.grid(alpha=0.3)
    whole.set_ylabel("GPU allocation ratio (%)")
    whole.set_xlim(0, 130)
    whole.set_ylim(0, 100)
    whole.axhspan(lo, hi, color="grey", alpha=0.08)
    whole.set_title(Path(reports[0]["trace"]).name)
    zoom.set_xlim(lo * 0.9, 130)
    zoom.set_ylim(lo, hi)
    zoom.set_title(f"zoom: allocation {lo:.0f}-{hi:.0f} % (band: seeds' min-max)")
    zoom.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(reports: list[dict[str, Any]], gpus: int) -> str:
    """A plain-text summary table of replay reports; below it, per report, the figures by
    device mode (when a MIG mode is present) and by vendor (when the fleet has two)."""
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
    for r in reports:
        modes = r.get("by_mode") or {}
        if "mig" not in modes:
            continue
        parts = []
        for mode, row in modes.items():
            part = f"{mode}: {row['gpus']:.0f} GPUs, {100 * row['allocated']:.2f} % allocated"
            if "occupied" in row:
                part += f", {100 * row['occupied']:.2f} % of memory slices held"
            parts.append(part)
        rows.append(f"  {r['policy']} at 100 %: " + "; ".join(parts))
    for r in reports:
        by_vendor = r.get("by_vendor") or {}
        if len(by_vendor) < 2:
            continue
        parts = []
        for vendor, row in by_vendor.items():
            part = (
                f"{vendor}: {row['gpus']:.0f} GPUs, {100 * row['arrived']:.2f} % asked, "
                f"{100 * row['allocated']:.2f} % allocated, {row['pods_placed']:.0f} pods"
            )
            if row["foreign_slices"]:
                part += f", {row['foreign_slices']:.0f} slices of another vendor's pods"
            parts.append(part)
        rows.append(f"  {r['policy']} by vendor at 100 %: " + "; ".join(parts))
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
