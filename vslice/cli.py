"""``vslice``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from libshared import traces
from libshared.errors import VsliceError
from services.scheduler.core.deciding import POLICIES
from vslice import replays


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
        "--policy", type=_policies, default=["fgd"], help=f"comma list of: {', '.join(POLICIES)}"
    )
    rp.add_argument(
        "--seeds", type=_seeds, default=[42], help="seeds, e.g. 42-51 or 42,43 (default 42)"
    )
    rp.add_argument(
        "--in-process", action="store_true", help="run the scheduling core in this process"
    )
    rp.add_argument("--json", dest="json_out", help="write the report(s) here")
    rp.add_argument("--plot", help="draw the allocation curves of the policies into this PNG")
    rp.add_argument("--jobs", type=int, default=0, help="parallel processes (default: CPU count)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vslice`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "replay":
            return _replay(args)
    except (VsliceError, OSError) as exc:
        print(f"vslice: {exc}", file=sys.stderr)
        return 2
    return 1


def _replay(args: argparse.Namespace) -> int:
    if not args.in_process:
        print(
            "vslice replay: only --in-process is available; the bus replay comes with `vslice up`.",
            file=sys.stderr,
        )
        return 2
    gpus = sum(len(n.devices) for n in traces.read_fleet(args.fleet))
    traces.read_pods(args.trace)  # fail early, in this process, on a malformed trace
    reports = replays.replay_in_process(
        args.trace, args.fleet, args.policy, args.seeds, jobs=args.jobs, quiet=args.quiet
    )
    print(replays.table(reports, gpus))
    if args.json_out:
        replays.write_json(args.json_out, reports)
        print(f"report: {args.json_out}")
    if args.plot:
        replays.plot(args.plot, reports)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
