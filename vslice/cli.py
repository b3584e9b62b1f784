"""``vslice``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from libshared import traces
from libshared.errors import VsliceError
from services.scheduler.core.deciding import POLICIES
from vslice import busreplays, replays, running, stacks


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--policy {text!r}: each must be one of {', '.join(POLICIES)}"
        )
    return names


def _seeds(text: str) -> list[int]:
    try:
        return replays.parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``vslice`` subcommand."""
    parser = argparse.ArgumentParser(prog="vslice", description="GPU slices for shared GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser(
        "replay", help="replay a cluster trace against a fleet (FGD paper's experiment)"
    )
    rp.add_argument("trace", help="pod list CSV (openb_pod_list_*.csv format)")
    rp.add_argument("--fleet", required=True, help="node list CSV (openb_node_list_*.csv format)")
    rp.add_argument(
        "--policy",
        type=_policies,
        default=None,
        help=f"comma list of: {', '.join(POLICIES)} (default fgd; with --attach the stack's)",
    )
    rp.add_argument(
        "--seeds", type=_seeds, default=[42], help="seeds, e.g. 42-51 or 42,43 (default 42)"
    )
    rp.add_argument(
        "--in-process", action="store_true", help="run the scheduling core in this process"
    )
    rp.add_argument(
        "--replicas", type=int, default=2, help="scheduler replicas of the bus replay (default 2)"
    )
    rp.add_argument(
        "--attach",
        action="store_true",
        help="replay on the running stack of `vslice up` (its replicas, metrics and status),"
        " adding the fleet's mock nodes to it for the run",
    )
    rp.add_argument(
        "--keep",
        action="store_true",
        help="with --attach: leave the fleet's nodes and the replay's pods in the stack",
    )
    rp.add_argument("--state-dir", default=None, help="with --attach: the stack's (as for `up`)")
    rp.add_argument(
        "--concurrency", type=int, default=16, help="pods in flight on the bus (default 16)"
    )
    rp.add_argument(
        "--compare-in-process",
        action="store_true",
        help="after the bus replay, run the in-process one and print both side by side",
    )
    rp.add_argument("--json", dest="json_out", help="write the report(s) here")
    rp.add_argument("--plot", help="draw the allocation curves of the policies into this PNG")
    rp.add_argument("--jobs", type=int, default=0, help="parallel processes (default: CPU count)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    sc = sub.add_parser(
        "scale-trace",
        help="write a fleet and a pod list N times as large (every node and pod repeated"
        " with fresh names), for replays at scale",
    )
    sc.add_argument("trace", help="pod list CSV (openb_pod_list_*.csv format)")
    sc.add_argument("--fleet", required=True, help="node list CSV (openb_node_list_*.csv format)")
    sc.add_argument("--factor", type=int, required=True, help="copies of each node and pod")
    sc.add_argument("--out", required=True, help="directory for the two files (same names)")
    for name, text in (
        ("up", "start nats-server, admission, 2 scheduler replicas, a mock node agent, metrics"),
        ("status", "show the stack's processes and the fleet's allocation"),
        ("down", "stop the stack and remove its state"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument(
            "--state-dir",
            default=None,
            help="where pids, logs and NATS data live (default $VSLICE_STATE_DIR, "
            "else $XDG_STATE_HOME/vslice or ~/.local/state/vslice)",
        )
    run = sub.add_parser(
        "run", help="run a command inside a slice of this machine's GPU (needs `vslice up`)"
    )
    mem = run.add_mutually_exclusive_group()
    mem.add_argument("--gpumem", type=int, help="MiB per GPU (nvidia.com/gpumem)")
    mem.add_argument(
        "--gpumem-percentage", type=int, help="percent of each GPU (nvidia.com/gpumem-percentage)"
    )
    run.add_argument("--gpucores", type=int, help="percent of each GPU's SMs (nvidia.com/gpucores)")
    run.add_argument("--gpus", type=int, default=1, help="GPUs (nvidia.com/gpu, default 1)")
    run.add_argument("--gpu-type", help="only GPUs of this type (nvidia.com/use-gputype)")
    run.add_argument("--state-dir", default=None, help="the stack's state dir (as for `up`)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vslice`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "replay":
            return _replay(args)
        if args.command == "scale-trace":
            return _scale(args)
        if args.command in ("up", "status", "down"):
            return _stack(args)
        if args.command == "run":
            return _run(args)
    except running.RunError as exc:
        print(f"vslice run: {exc}", file=sys.stderr)
        return exc.exit_code
    except (VsliceError, OSError) as exc:
        print(f"vslice: {exc}", file=sys.stderr)
        return 2
    return 1


def _scale(args: argparse.Namespace) -> int:
    if args.factor < 1:
        print(f"vslice scale-trace: --factor {args.factor}: must be >= 1", file=sys.stderr)
        return 2
    fleet, pods = traces.write_scaled(args.fleet, args.trace, args.out, args.factor)
    nodes = traces.read_fleet(fleet)
    gpus = sum(len(n.devices) for n in nodes)
    print(f"{fleet}: {len(nodes)} nodes, {gpus} GPUs\n{pods}: {len(traces.read_pods(pods))} pods")
    return 0


def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("vslice run: no command given (vslice run [options] -- CMD ARGS...)", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    request = running.SliceRequest(
        memory_mib=args.gpumem,
        memory_percent=args.gpumem_percentage,
        cores_percent=args.gpucores,
        gpus=args.gpus,
        gpu_type=args.gpu_type,
    )
    return running.run(state_dir, request, cmd)


def _stack(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    if args.command == "status":
        print(stacks.status_text(state_dir))
        return 0
    if args.command == "down":
        stack = stacks.down(state_dir)
        print(f"nothing up in {state_dir}" if stack is None else f"stack in {state_dir} stopped")
        return 0
    known = stacks.read_state(state_dir)
    if known is not None and any(stacks.alive(p) for p in known.pids.values()):
        print(f"already up in {state_dir} (NATS {known.nats_url}); `vslice down` stops it")
        return 0
    stack = stacks.up(state_dir)
    print(f"up in {state_dir}: NATS {stack.nats_url}, logs in {state_dir / 'logs'}")
    print(f"dashboard: {stack.metrics_url}/  (Prometheus: {stack.metrics_url}/metrics)")
    for name, pid in stack.pids.items():
        print(f"  {name:<14} pid {pid}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    gpus = sum(len(n.devices) for n in traces.read_fleet(args.fleet))
    traces.read_pods(args.trace)  # fail early, in this process, on a malformed trace
    attach = None
    if args.attach or args.keep:
        if not args.attach or args.in_process:
            print("vslice replay: --keep needs --attach, --attach no --in-process", file=sys.stderr)
            return 2
        attach = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
        args.policy = args.policy or [stacks.running(attach).policy]
    args.policy = args.policy or ["fgd"]
    if args.in_process:
        reports = replays.replay_in_process(
            args.trace, args.fleet, args.policy, args.seeds, jobs=args.jobs, quiet=args.quiet
        )
    else:
        if args.replicas < 1 or args.concurrency < 1:
            print("vslice replay: --replicas and --concurrency must be >= 1", file=sys.stderr)
            return 2
        reports = busreplays.replay_over_bus(
            args.trace,
            args.fleet,
            args.policy,
            args.seeds,
            replicas=args.replicas,
            concurrency=args.concurrency,
            quiet=args.quiet,
            attach=attach,
            keep=args.keep,
        )
    print(replays.table(reports, gpus))
    if not args.in_process and args.compare_in_process:
        local = replays.replay_in_process(
            args.trace, args.fleet, args.policy, args.seeds, jobs=args.jobs, quiet=args.quiet
        )
        print()
        print(replays.comparison_table(reports, local))
    for r in reports:
        if r.get("mode") == "bus":
            print(
                f"{r['policy']} over the bus: {r['pods_per_s']:.0f} pods/s, latency p50"
                f" {r['latency_ms_p50']:.1f} ms p99 {r['latency_ms_p99']:.1f} ms,"
                f" {r['replicas']} replicas, {r['conflicts']} lost ledger races,"
                f" {r['claims_lost']} lost claims"
            )
    if attach is not None:
        kept = "; its fleet and pods stay until `vslice down`" if args.keep else ""
        print(f"replayed on the stack in {attach} (`vslice status` shows it){kept}")
    if args.json_out:
        replays.write_json(args.json_out, reports)
        print(f"report: {args.json_out}")
    if args.plot:
        replays.plot(args.plot, reports)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
