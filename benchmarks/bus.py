"""End-to-end speed of the bus: the openb trace through admission and the scheduler
replicas over NATS, for 1 and 2 replicas, with FGD, beside the same decisions in process.

Each multi-replica run goes twice, in turn, with the replicas partitioned (each prefers
near-best nodes of a shard of its own: ``services.scheduler.core.partitioning``, as
``vslice up`` starts them) and without (each decides as if alone, as before), so the two
are compared under the same load. ``rate %`` is lost ledger races per placed pod,
``alloc`` the allocation ratio at 100 % arrived and its change against the in-process
replay (``d %``), ``total`` the CPU milliseconds per placed pod of every process of the
stack (``/proc``). ``--json FILE`` writes the rows.

Prints one row per run: pods/s (every arriving pod, placed or not, over the wall time of
sending them all), latency p50/p99 (ms; over the bus end to end -- admission plus
scheduling as a client sees it -- in process the decision alone), pods placed, lost
ledger races and lost claims, and the CPU milliseconds per pod each process spent while
the pods were driven (nats-server, admission, the scheduler replicas together, the node
agent, the driving client, and their total): on a machine with C cores a run cannot pass
C * 1000 / total pods/s. Each bus run starts a temporary stack of its own
(``vslice.replays_bus``). Figures vary with what else runs on the machine: compare rows of
one run, not runs of different days.

``--profile DIR`` adds one more run with every service under cProfile (slower: compare its
shares, not its speed), writes ``DIR/<process>.prof`` and prints each scheduler replica's
costliest functions.

    .venv/bin/python benchmarks/bus.py --concurrency 4 32      # 1 and 2 replicas each
    .venv/bin/python benchmarks/bus.py --replicas 2 --profile /tmp/prof
    .venv/bin/python benchmarks/bus.py --policy hami fgd --replicas 2 3 --concurrency 4 \
        --tls on --json /tmp/bus.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.scheduler.core import replaying
from vslice import replays_bus, replays_local

PROCESSES = ("nats", "admission", "scheduler", "nodeagent", "client")
# appended to every replica's flags: each decides as if alone (argparse: the last wins)
UNPARTITIONED = ["--replica-count", "1", "--replica-index", "0"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _row(label: str, rate: float, p50: float, p99: float, rest: str) -> str:
    return f"{label:<44}{rate:>8.0f}{p50:>8.1f}{p99:>8.1f}{rest}"


@dataclass(frozen=True)
class BusFigures:
    """One bus run: pods/s over every arrival, end-to-end latency (ms), placements, lost
    ledger races and their rate per placed pod, lost claims, the allocation ratio (0-1)
    at 100 % arrived and its change against the in-process replay (percent; None without
    one), and CPU ms per placed pod by process kind and in total (every process of the
    stack and the driving client, from ``/proc``)."""

    policy: str
    replicas: int
    concurrency: int
    tls: bool
    partitioned: bool
    pods_per_s: float
    latency_ms_p50: float
    latency_ms_p99: float
    pods_placed: int
    conflicts: int
    conflict_rate: float
    claims_lost: int
    alloc_at_100: float
    alloc_delta_pct: float | None
    cpu_ms_per_pod_by_process: dict[str, float]
    cpu_ms_per_pod: float

    @property
    def label(self) -> str:
        plural = "s" if self.replicas > 1 else ""
        label = f"bus, {self.replicas} replica{plural}, {self.concurrency} in flight"
        label += ", TLS" if self.tls else ", no TLS"
        if self.replicas > 1:
            label += ", shards" if self.partitioned else ", alone"
        return label

    def row(self, suffix: str = "") -> str:
        by = self.cpu_ms_per_pod_by_process
        cpu = "".join(f"{by[p]:>7.2f}" for p in PROCESSES)
        delta = "" if self.alloc_delta_pct is None else f"{self.alloc_delta_pct:.2f}"
        rest = (
            f"{self.pods_placed:>7}{self.conflicts:>7}{100 * self.conflict_rate:>7.1f}"
            f"{self.claims_lost:>7}{self.alloc_at_100:>7.3f}{delta:>7}{cpu}"
            f"{self.cpu_ms_per_pod:>7.2f}"
        )
        return _row(
            self.label + suffix, self.pods_per_s, self.latency_ms_p50, self.latency_ms_p99, rest
        )


def _figures(
    result: replaying.SeedResult,
    d: replays_bus.Driven,
    *,
    local_alloc: float | None,
    **run: Any,
) -> BusFigures:
    placed = max(1, result.pods_placed)
    per: dict[str, float] = dict.fromkeys(PROCESSES, 0.0)
    for name, seconds in d.cpu_s.items():
        per[name.split("-")[0]] = per.get(name.split("-")[0], 0.0) + seconds
    alloc = result.allocated_at(1.0)
    return BusFigures(
        **run,
        pods_per_s=len(d.placed) / d.wall_s,
        latency_ms_p50=_percentile(d.latency_ms, 0.5),
        latency_ms_p99=_percentile(d.latency_ms, 0.99),
        pods_placed=result.pods_placed,
        conflicts=d.stats.conflicts,
        conflict_rate=d.stats.conflicts / placed,
        claims_lost=d.stats.claims_lost,
        alloc_at_100=alloc,
        alloc_delta_pct=None if not local_alloc else 100 * (alloc - local_alloc) / local_alloc,
        cpu_ms_per_pod_by_process={p: 1000 * per[p] / placed for p in PROCESSES},
        cpu_ms_per_pod=1000 * sum(per.values()) / placed,
    )


GROUPS = (  # (label, test on a profile entry's file and function name), first match wins
    ("socket send/recv", lambda f, n: "_socket.socket" in n),
    ("epoll wait", lambda f, n: "select.epoll" in n or f.endswith("selectors.py")),
    ("asyncio loop, tasks, futures", lambda f, n: "asyncio" in f or "_asyncio" in n),
    ("nats-py (protocol, JetStream)", lambda f, n: "/nats/" in f),
    ("json (JetStream API answers)", lambda f, n: "/json/" in f or "json" in n.lower()),
    ("msgspec encode/decode", lambda f, n: "msgspec" in n or "msgspec" in f),
    ("scheduling core + numpy", lambda f, n: "/core/" in f or "numpy" in f + n),
    ("services' adapters (bus.py ...)", lambda f, n: "/adapters/" in f or "/services/" in f),
    ("logging", lambda f, n: "/logging/" in f or "/logs.py" in f),
    ("libshared (pod parsing, codecs)", lambda f, n: "/libshared/" in f),
)
# the replica's steps: cumulative CPU of these functions (they overlap: a step's
# share includes what it calls)
STEPS = (
    ("decide (FGD)", "deciding.py", "decide"),
    ("watcher: take in ledger changes", "bus.py", "on_entry"),
    ("claim (kv.create)", "bus.py", "_claim"),
    ("ledger compare-and-set", "bus.py", "_commit"),
    ("announce (JetStream publish)", "bus.py", "_announce"),
    ("catch up before Unschedulable", "bus.py", "_catch_up"),
)


def _group(filename: str, name: str) -> str | None:
    return next((g for g, test in GROUPS if test(filename, name)), None)


def _profile_summary(directory: Path, *, top: int = 12) -> str:
    """Per profiled process: CPU seconds by group (each function's own time counted once;
    a built-in function's time goes to the group of its callers, unless it has its own),
    the scheduler's steps, then the costliest functions."""
    out = []
    for kind in ("scheduler", "admission", "nodeagent"):
        paths = sorted(directory.glob(f"{kind}*.prof"))
        if not paths:
            continue
        text = io.StringIO()
        stats = pstats.Stats(*[str(p) for p in paths], stream=text)
        # The raw table (with each function's callers, which get_stats_profile() drops);
        # typeshed does not declare the attribute.
        entries = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in entries.values()) or 1e-9
        groups: dict[str, float] = {}
        for (filename, _, name), (_, _, own, _, callers) in entries.items():
            label = _group(filename, name)
            if label is None and filename == "~" and callers:
                for (cf, _, cn), (_, _, tt, _) in callers.items():
                    by = _group(cf, cn) or "other"
                    groups[by] = groups.get(by, 0.0) + tt
                continue
            groups[label or "other"] = groups.get(label or "other", 0.0) + own
        lines = [f"--- {kind} ({len(paths)} process(es)): {total:.1f} CPU s under cProfile"]
        for label, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {label:<34}{seconds:>7.1f} s {100 * seconds / total:>5.1f} %")
        if kind == "scheduler":
            lines.append("  steps (cumulative, overlapping):")
            for label, file, func in STEPS:
                cum = sum(
                    v[3] for (f, _, n), v in entries.items() if f.endswith(file) and n == func
                )
                lines.append(f"    {label:<32}{cum:>7.1f} s {100 * cum / total:>5.1f} %")
        stats.sort_stats("tottime").print_stats(top)
        body = text.getvalue()
        lines.append(body[body.find("   ncalls") :].rstrip())
        out.append("\n".join(lines))
    return "\n".join(out)


def main() -> None:
    root = Path(os.environ.get("VSLICE_TRACES", "../shared/traces/openb"))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trace", default=str(root / "openb_pod_list_default.csv"))
    parser.add_argument("--fleet", default=str(root / "openb_node_list_gpu_node.csv"))
    parser.add_argument("--policy", nargs="+", default=["fgd"], help="policies, each a table")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[32], help="pods in flight (each a run)"
    )
    parser.add_argument(
        "--scheduler-arg",
        action="append",
        default=[],
        help="extra scheduler flag, e.g. --scheduler-arg=--max-in-flight=8",
    )
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process row")
    parser.add_argument(
        "--tls",
        choices=("on", "off", "both"),
        default="both",
        help="bus with TLS, without (authorization stays on), or each run both ways",
    )
    parser.add_argument(
        "--partition",
        choices=("on", "off", "both"),
        default="both",
        help="multi-replica runs with the replicas partitioned, alone, or both in turn",
    )
    parser.add_argument("--profile", help="also run under cProfile, writing DIR/<process>.prof")
    parser.add_argument("--json", help="also write every row's figures to this JSON file")
    args = parser.parse_args()
    cpu_head = "".join(f"{p[:6]:>7}" for p in PROCESSES)
    head = (
        f"{'run':<44}{'pods/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'placed':>7}{'races':>7}"
        f"{'rate %':>7}{'claims':>7}{'alloc':>7}{'d %':>7}{cpu_head}{'total':>7}"
    )
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.tls]
    shards = {"on": [True], "off": [False], "both": [False, True]}[args.partition]
    rows: list[dict[str, Any]] = []
    for policy in args.policy:
        print(f"{policy + ', openb':<117}CPU ms per placed pod\n{head}\n{'-' * len(head)}")
        local_alloc = None
        if not args.no_in_process:
            (local,) = replays_local.replay_in_process(
                args.trace, args.fleet, [policy], [args.seed], jobs=1, quiet=True
            )
            pods, wall = local["pods_total"], local["wall_s_per_seed"]
            local_alloc = float(local["alloc_at_100"])
            rest = f"{round(local['pods_placed']):>7}{'':>21}{local_alloc:>7.3f}{'':>42}"
            rest += f"{1000 * wall / local['pods_placed']:>7.2f}"
            p50, p99 = local["decision_ms_p50"], local["decision_ms_p99"]
            print(_row("in process (decisions)", pods / wall, p50, p99, rest), flush=True)
            rows.append({"policy": policy, "mode": "in process", **local})
        runs = [
            (r, c, None, t, p)
            for c in args.concurrency
            for r in args.replicas
            for t in modes
            for p in (shards if r > 1 else [True])
        ]
        if args.profile:
            runs.append(
                (max(args.replicas), max(args.concurrency), args.profile, modes[-1], shards[-1])
            )
        for replicas, concurrency, profile, tls, partitioned in runs:
            extra = [] if partitioned else UNPARTITIONED
            try:
                result, driven = replays_bus.run_seed(
                    args.trace,
                    args.fleet,
                    policy=policy,
                    seed=args.seed,
                    replicas=replicas,
                    concurrency=concurrency,
                    quiet=True,
                    scheduler_args=[*args.scheduler_arg, *extra],
                    profile_dir=profile,
                    tls=tls,
                )
            except Exception as exc:  # one failed run (a timeout under load) ends no table
                print(f"{replicas} replicas, {concurrency} in flight: failed: {exc!r}"[:200])
                rows.append({"mode": "bus", "policy": policy, "replicas": replicas,
                             "partitioned": partitioned, "failed": repr(exc)})  # fmt: skip
                continue
            figures = _figures(
                result,
                driven,
                local_alloc=local_alloc,
                policy=policy,
                replicas=replicas,
                concurrency=concurrency,
                tls=tls,
                partitioned=partitioned,
            )
            print(figures.row(", cProfile" if profile else ""), flush=True)
            rows.append({"mode": "bus", "profiled": profile is not None, **asdict(figures)})
        if args.profile:
            print(_profile_summary(Path(args.profile)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
