"""End-to-end speed of the bus: the openb trace through admission and the scheduler
replicas over NATS, for 1 and 2 replicas, with FGD, beside the same decisions in process.

Prints one row per run: pods/s (every arriving pod, placed or not, over the wall time of
sending them all), latency p50/p99 (ms; over the bus end to end -- admission plus
scheduling as a client sees it -- in process the decision alone), pods placed, lost
ledger races and lost claims, and the CPU milliseconds per pod each process spent while
the pods were driven (nats-server, admission, the scheduler replicas together, the node
agent, the driving client, and their total): on a machine with C cores a run cannot pass
C * 1000 / total pods/s. Each bus run starts a temporary stack of its own
(``vslice.busreplays``). Figures vary with what else runs on the machine: compare rows of
one run, not runs of different days.

``--profile DIR`` adds one more run with every service under cProfile (slower: compare its
shares, not its speed), writes ``DIR/<process>.prof`` and prints each scheduler replica's
costliest functions.

    .venv/bin/python benchmarks/bus.py --concurrency 4 32      # 1 and 2 replicas each
    .venv/bin/python benchmarks/bus.py --replicas 2 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
from pathlib import Path

from services.scheduler.core import replaying
from vslice import busreplays, replays

PROCESSES = ("nats", "admission", "scheduler", "nodeagent", "client")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _row(label: str, rate: float, p50: float, p99: float, rest: str) -> str:
    return f"{label:<40}{rate:>8.0f}{p50:>8.1f}{p99:>8.1f}{rest}"


def _bus_row(label: str, result: replaying.SeedResult, d: busreplays.Driven) -> str:
    pods = len(d.placed)
    per: dict[str, float] = dict.fromkeys(PROCESSES, 0.0)
    for name, seconds in d.cpu_s.items():
        per[name.split("-")[0]] = per.get(name.split("-")[0], 0.0) + seconds
    cpu = "".join(f"{1000 * per[p] / pods:>7.2f}" for p in PROCESSES)
    rest = (
        f"{result.pods_placed:>7}{d.stats.conflicts:>7}{d.stats.claims_lost:>7}"
        f"{cpu}{1000 * sum(per.values()) / pods:>7.2f}"
    )
    lat = d.latency_ms
    return _row(label, pods / d.wall_s, _percentile(lat, 0.5), _percentile(lat, 0.99), rest)


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
    parser.add_argument("--policy", default="fgd")
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
    parser.add_argument("--profile", help="also run under cProfile, writing DIR/<process>.prof")
    args = parser.parse_args()
    cpu_head = "".join(f"{p[:6]:>7}" for p in PROCESSES)
    head = (
        f"{'run':<40}{'pods/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'placed':>7}{'races':>7}"
        f"{'claims':>7}{cpu_head}{'total':>7}"
    )
    print(f"{args.policy + ', openb':<89}CPU ms per pod\n{head}\n{'-' * len(head)}", flush=True)
    if not args.no_in_process:
        (local,) = replays.replay_in_process(
            args.trace, args.fleet, [args.policy], [args.seed], jobs=1, quiet=True
        )
        pods, wall = local["pods_total"], local["wall_s_per_seed"]
        rest = f"{round(local['pods_placed']):>7}{'':>14}{'':>35}{1000 * wall / pods:>7.2f}"
        p50, p99 = local["decision_ms_p50"], local["decision_ms_p99"]
        print(_row("in process (decisions)", pods / wall, p50, p99, rest), flush=True)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.tls]
    runs = [(r, c, None, t) for c in args.concurrency for r in args.replicas for t in modes]
    if args.profile:
        runs.append((max(args.replicas), max(args.concurrency), args.profile, modes[-1]))
    for replicas, concurrency, profile, tls in runs:
        result, driven = busreplays.run_seed(
            args.trace,
            args.fleet,
            policy=args.policy,
            seed=args.seed,
            replicas=replicas,
            concurrency=concurrency,
            quiet=True,
            scheduler_args=args.scheduler_arg,
            profile_dir=profile,
            tls=tls,
        )
        label = f"bus, {replicas} replica{'s' if replicas > 1 else ''}, {concurrency} in flight"
        label += ", TLS" if tls else ", no TLS"
        print(_bus_row(label + (", cProfile" if profile else ""), result, driven), flush=True)
    if args.profile:
        print(_profile_summary(Path(args.profile)))


if __name__ == "__main__":
    main()
