"""``vslice``: the command line.

Every flag is checked when it is parsed -- ranges, output paths -- so a typo or an
impossible value is refused before any file is read or any process started, under the
usage of its own subcommand, with the closest flag names when a flag is unknown. Ctrl-C
ends any command with one line (exit 130), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from libshared import logs, migs, traces
from libshared.errors import VsliceError
from services.nodeagent.adapters import configfiles
from services.nodeagent.core import fleets, nodeconfigs
from services.scheduler.core.deciding import POLICIES
from vslice import certs, repairs, replays_bus, replays_local, running, stacks, statuses

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
PLOT_FORMATS = (".png", ".svg", ".pdf")
UNKNOWN = re.compile(r"unrecognized arguments: (.*)")
INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def version() -> str:
    """The installed vslice version (``0+unknown`` when run from a tree not installed)."""
    try:
        return metadata.version("vslice")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the closest flag or command names
    (``difflib``): ``--gpumen`` -> ``did you mean --gpumem?``."""

    def error(self, message: str) -> NoReturn:
        """Print usage and ``message`` with suggestions, exit 2 (argparse's contract)."""
        unknown = UNKNOWN.search(message)
        if unknown:
            message += suggestions(unknown.group(1).split(), self.flags())
        choice = INVALID_CHOICE.search(message)
        if choice:
            names = [c.strip(" '") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), names, n=3, cutoff=0.5)
            if close:
                message += f"; did you mean {' or '.join(close)}?"
        super().error(message)

    def flags(self) -> list[str]:
        """Every long option string of this parser."""
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]


def suggestions(words: Sequence[str], flags: Sequence[str]) -> str:
    """`` (did you mean --x?)`` for each unknown flag in ``words`` close to one of
    ``flags`` (``""`` when none is). Pure."""
    out = []
    for word in words:
        if not word.startswith("-"):
            continue
        given = word.split("=", 1)[0]
        close = difflib.get_close_matches("--" + given.lstrip("-"), flags, n=2, cutoff=0.6)
        if close:
            out.append((given, " or ".join(close)))
    if len(out) == 1:
        return f" (did you mean {out[0][1]}?)"
    return "".join(f"; {given}: did you mean {close}?" for given, close in out)


def bounded(
    name: str, *, least: int, most: int | None = None, unit: str = "", note: str = ""
) -> Callable[[str], int]:
    """An argparse type for flag ``name``: an integer in ``least..most`` (no upper bound
    when None); the refusal names the value, the range and ``note`` (argparse adds the
    flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least or (most is not None and value > most):
            span = f">= {least}" if most is None else f"{least}-{most}"
            raise argparse.ArgumentTypeError(
                f"{value}: must be {span}{unit}" + (f" ({note})" if note else "")
            )
        return value

    parse.__name__ = name
    return parse


def output_file(name: str, suffixes: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse type: a path a file can be written to (its folder exists and is
    writable; it is not a folder; its suffix one of ``suffixes`` when given) -- checked
    before the work that would fill it starts."""

    def parse(text: str) -> str:
        path = Path(text)
        folder = path.parent
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: must end in {', '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: is a folder")
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise argparse.ArgumentTypeError(f"{text}: not writable")
        return text

    parse.__name__ = name
    return parse


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        close = [m for b in bad for m in difflib.get_close_matches(b, POLICIES, n=1)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise argparse.ArgumentTypeError(
            f"--policy {text!r}: each must be one of {', '.join(POLICIES)}{hint}"
        )
    return names


def _policy(text: str) -> str:
    names = _policies(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"--policy {text!r}: one policy for a stack")
    return names[0]


def _dcus(text: str) -> str:
    """``text`` once it reads as a mock DCU list (``fleets.parse_dcus``)."""
    try:
        fleets.parse_dcus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _seeds(text: str) -> list[int]:
    try:
        return replays_local.parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# name of an `up` flag's destination -> the environment variable it falls back to
UP_ENV = {
    "replicas": "VSLICE_REPLICAS",
    "policy": "VSLICE_POLICY",
    "mock_gpus": "VSLICE_MOCKGPU_COUNT",
    "mock_gpu_memory": "VSLICE_MOCKGPU_MEMORY_MIB",
    "mock_devices": "VSLICE_MOCKGPU_DEVICES",
    "mock_dcus": "VSLICE_MOCKDCU_DEVICES",
    "backend": "VSLICE_GPU_BACKEND",
    "metrics_port": "VSLICE_METRICS_PORT",
    "metrics_host": "VSLICE_METRICS_HOST",
    "nats_port": "VSLICE_NATS_PORT",
    "workload_trace": "VSLICE_WORKLOAD_TRACE",
    "node_config": "VSLICE_NODE_CONFIG",
}
STATE_DIR_HELP = (
    "where pids, logs and NATS data live (default $VSLICE_STATE_DIR, "
    "else $XDG_STATE_HOME/vslice or ~/.local/state/vslice)"
)


def _add_up(sub: Any) -> None:
    up = sub.add_parser(
        "up",
        help="start a local stack: nats-server, admission, scheduler replicas, a node agent,"
        " metrics",
        description="Start nats-server (JetStream), the admission service, the scheduler"
        " replicas, this machine's node agent (NVML's GPUs when there are any, else mock"
        " GPUs) and the metrics service with its dashboard, each in the background with its"
        " log under STATE_DIR/logs. `vslice status` shows them, `vslice down` stops them."
        " Each flag falls back to the environment variable named in its help.",
    )
    up.add_argument("--state-dir", default=None, help=STATE_DIR_HELP)
    up.add_argument(
        "--replicas",
        type=bounded("--replicas", least=1, most=16),
        help="scheduler replicas, active-active (default $VSLICE_REPLICAS, else 2)",
    )
    up.add_argument(
        "--policy",
        type=_policy,
        help=f"the replicas' placement policy, one of {', '.join(POLICIES)}"
        " (default $VSLICE_POLICY, else hami)",
    )
    up.add_argument(
        "--workload-trace",
        metavar="CSV",
        help="FGD's target workload for --policy fgd: a pod list CSV (openb format)"
        " (default $VSLICE_WORKLOAD_TRACE)",
    )
    up.add_argument(
        "--backend",
        choices=("auto", "nvml", "mock"),
        help="GPUs of the node agent: NVML's, mock ones, or NVML's when there are any"
        " (default $VSLICE_GPU_BACKEND, else auto)",
    )
    up.add_argument(
        "--mock-gpus",
        type=bounded("--mock-gpus", least=0, most=stacks.MAX_DEVICES),
        help="mock GPUs of this node (default $VSLICE_MOCKGPU_COUNT, else 2; 0 with"
        " --mock-dcus: a node of DCUs only)",
    )
    up.add_argument(
        "--mock-gpu-memory",
        type=bounded("--mock-gpu-memory", least=1, unit=" MiB"),
        metavar="MIB",
        help="memory of each mock GPU, MiB (default $VSLICE_MOCKGPU_MEMORY_MIB, else 16384)",
    )
    up.add_argument(
        "--mock-devices",
        metavar="UUID:MIB[:NAME[:mig]][,...]",
        help="mock GPUs one by one, instead of --mock-gpus and --mock-gpu-memory; a product"
        " NAME (e.g. 'NVIDIA A100-SXM4-40GB') and ':mig' start a GPU in MIG mode"
        " (default $VSLICE_MOCKGPU_DEVICES)",
    )
    up.add_argument(
        "--mock-dcus",
        metavar="UUID:MIB[:MODEL][,...]",
        help="mock Hygon DCUs of this node, beside its GPUs (hygon.com/dcunum; MODEL default"
        " Z100, type DCU-Z100) (default $VSLICE_MOCKDCU_DEVICES)",
    )
    up.add_argument(
        "--node-config",
        metavar="JSON",
        help="HAMi's device plugin config.json for this node: split count, memory and core"
        " scaling, filtered GPUs, operating mode (hami-core, mig, mps); read again when it"
        " changes (default $VSLICE_NODE_CONFIG)",
    )
    up.add_argument(
        "--metrics-port",
        type=bounded("--metrics-port", least=1, most=65535),
        help="port of the dashboard and /metrics (default $VSLICE_METRICS_PORT, else 9394"
        " when free, else a free port)",
    )
    up.add_argument(
        "--nats-port",
        type=bounded("--nats-port", least=1, most=65535),
        help="client port of nats-server (default $VSLICE_NATS_PORT, else a free port)",
    )
    up.add_argument(
        "--metrics-host",
        help="address the metrics service listens on (default $VSLICE_METRICS_HOST,"
        " else 127.0.0.1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``vslice`` subcommand."""
    parser = Parser(prog="vslice", description="GPU slices for shared GPUs.")
    parser.add_argument("--version", action="version", version=f"vslice {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    rp = sub.add_parser(
        "replay",
        help="replay a cluster trace against a fleet (FGD paper's experiment)",
        description="Replay a pod trace against a fleet of nodes with one or more placement"
        " policies and seeds, over the bus (a temporary stack, or the running one with"
        " --attach) or in this process, and report the GPU allocation each reaches.",
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
        "--replicas",
        type=bounded("--replicas", least=1, most=16),
        default=2,
        help="scheduler replicas of the bus replay (default 2)",
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
        "--concurrency",
        type=bounded("--concurrency", least=1),
        default=16,
        help="pods in flight on the bus (default 16)",
    )
    rp.add_argument(
        "--compare-in-process",
        action="store_true",
        help="after the bus replay, run the in-process one and print both side by side",
    )
    rp.add_argument(
        "--json", dest="json_out", type=output_file("--json"), help="write the report(s) here"
    )
    rp.add_argument(
        "--plot",
        type=output_file("--plot", PLOT_FORMATS),
        help="draw the allocation curves of the policies into this PNG (or SVG, PDF)",
    )
    rp.add_argument(
        "--jobs",
        type=bounded("--jobs", least=0),
        default=0,
        help="parallel processes (default: CPU count)",
    )
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
    mf = sub.add_parser(
        "mig-fleet",
        help="write a node list where a share of the V100 nodes have MIG-mode A100s instead"
        " (the `mode` column), for a replay of sliced and MIG GPUs side by side",
    )
    mf.add_argument("fleet", help="node list CSV (openb_node_list_*.csv format)")
    mf.add_argument("--out", required=True, help="the node list to write")
    mf.add_argument(
        "--share",
        type=_fraction,
        default=0.5,
        help="share of the nodes of the --from models replaced, 0..1 (default 0.5)",
    )
    mf.add_argument(
        "--from",
        dest="from_models",
        default="V100M16,V100M32",
        help="models replaced, comma-separated (default V100M16,V100M32)",
    )
    mf.add_argument(
        "--to",
        choices=sorted(migs.GEOMETRIES),
        default="A100-40GB",
        help="the MIG model they become (default A100-40GB)",
    )
    mf.add_argument("--seed", type=int, default=0, help="which nodes are chosen (default 0)")
    _add_up(sub)
    st = sub.add_parser(
        "status",
        help="show the stack's processes and the fleet's allocation",
        description="Show the stack's processes and the fleet's allocation, in totals per"
        " node group (a node's name without its trailing number). A service is healthy while"
        " it runs and its heartbeat is fresh (at most 3 heartbeat intervals old); exits 1"
        " when a process is stopped or unhealthy, else 0.",
    )
    st.add_argument("--state-dir", default=None, help=STATE_DIR_HELP)
    st.add_argument(
        "--nodes",
        action="store_true",
        help=f"also list every GPU of every node (shown anyway up to {statuses.SMALL_FLEET_GPUS}"
        " GPUs)",
    )
    st.add_argument(
        "--json", action="store_true", help="print one JSON object (nats_url, processes, fleet)"
    )
    dn = sub.add_parser(
        "down",
        help="stop the stack and remove its state",
        description="Stop every process of the stack (SIGTERM, then SIGKILL) and remove its"
        " state and NATS data; the logs stay.",
    )
    dn.add_argument("--state-dir", default=None, help=STATE_DIR_HELP)
    certs = sub.add_parser(
        "certs",
        help="provision a bus's CA, certificates, identities and nats.conf into a directory",
        description="What `vslice up` does for itself, for a stack it does not start (compose).",
    )
    certs.add_argument("--dir", required=True, help="where the trust material goes")
    certs.add_argument("--prefix", default="vslice", help="bus prefix (default vslice)")
    certs.add_argument(
        "--node", action="append", default=[], help="a node agent's node (repeatable)"
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP of the NATS server (repeatable; default localhost, 127.0.0.1)",
    )
    certs.add_argument("--store-dir", default="/data", help="JetStream store in nats.conf")
    certs.add_argument("--renew", action="store_true", help="issue a new server certificate")
    rel = sub.add_parser(
        "release", help="release a pod's slices by hand (operator identity), ending its lease"
    )
    rel.add_argument("pod", help="the pod UID (`vslice status` lists them)")
    rel.add_argument("--state-dir", default=None, help="the stack's state dir (as for `up`)")
    fix = sub.add_parser(
        "repair",
        help="rebuild a quarantined node's ledger (unreadable or deleted) from the allocation"
        " stream and the claims (operator identity)",
    )
    fix.add_argument("node", help="the node (`vslice status` lists quarantined ones)")
    fix.add_argument("--state-dir", default=None, help="the stack's state dir (as for `up`)")
    run = sub.add_parser(
        "run",
        help="run a command inside a slice of this machine's GPU (needs `vslice up`)",
        description="Ask the running stack for a slice of this machine's GPU, run COMMAND"
        " inside it (libvgpu preloaded) and release the slice when it exits. Without"
        " --gpumem or --gpumem-percentage the slice is a whole card's memory; without"
        " --gpucores its compute is not limited. With --dcus the slice is of Hygon DCUs"
        " (hygon.com/dcunum): --gpumem and --gpucores then ask hygon.com/dcumem and"
        " hygon.com/dcucores (default 100: a whole card), and the command gets"
        " HIP_VISIBLE_DEVICES, without libvgpu (no DCU limit is enforced inside it).",
    )
    mem = run.add_mutually_exclusive_group()
    mem.add_argument(
        "--gpumem",
        type=bounded("--gpumem", least=1, unit=" MiB", note="omit it for a whole card's memory"),
        metavar="MIB",
        help="MiB per GPU (nvidia.com/gpumem)",
    )
    mem.add_argument(
        "--gpumem-percentage",
        type=bounded("--gpumem-percentage", least=1, most=100, unit=" %"),
        metavar="PERCENT",
        help="percent of each GPU's memory, 1-100 (nvidia.com/gpumem-percentage)",
    )
    run.add_argument(
        "--gpucores",
        type=bounded("--gpucores", least=0, most=100, unit=" %", note="0: no core limit"),
        metavar="PERCENT",
        help="percent of each GPU's SMs, 0-100 (nvidia.com/gpucores; default: no core limit)",
    )
    run.add_argument(
        "--gpus",
        type=bounded("--gpus", least=1, most=stacks.MAX_DEVICES),
        default=1,
        help="GPUs (nvidia.com/gpu, default 1)",
    )
    run.add_argument(
        "--dcus",
        type=bounded("--dcus", least=1, most=stacks.MAX_DEVICES),
        help="Hygon DCUs (hygon.com/dcunum) instead of GPUs",
    )
    run.add_argument(
        "--gpu-type",
        help="only GPUs of this type (nvidia.com/use-gputype; with --dcus hygon.com/use-dcutype)",
    )
    run.add_argument("--state-dir", default=None, help="the stack's state dir (as for `up`)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; exits 2 (argparse's contract) with the usage of the
    subcommand at fault for an unknown flag or a bad value."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subs.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe closed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vslice`` console script; returns the exit code."""
    logs.quiet_tls_eof()
    try:
        args = parse(argv)
        if args.command == "replay":
            return _replay(args)
        if args.command == "scale-trace":
            return _scale(args)
        if args.command == "mig-fleet":
            return _mig_fleet(args)
        if args.command in ("up", "status", "down"):
            return _stack(args)
        if args.command == "run":
            return _run(args)
        if args.command == "release":
            return _release(args)
        if args.command == "repair":
            return _repair(args)
        if args.command == "certs":
            seeds = certs.provision(
                Path(args.dir),
                prefix=args.prefix,
                nodes=args.node,
                hosts=args.host or ["localhost", "127.0.0.1"],
                store_dir=args.store_dir,
                renew=args.renew,
            )
            print(f"trust material in {args.dir}: CA ca.pem, nats.conf, {len(seeds)} identities")
            return 0
    except KeyboardInterrupt:
        # a progress bar the interrupt left open would redraw itself after this line
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print("\nvslice: interrupted", file=sys.stderr)
        _quiet_from_now_on()
        return EXIT_INTERRUPTED
    except running.RunError as exc:
        print(f"vslice run: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`vslice status | head`): stop quietly, as cat does; point
        # stdout at /dev/null so the interpreter's own flush at exit cannot fail again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (VsliceError, OSError) as exc:
        print(f"vslice: {exc}", file=sys.stderr)
        return 2
    return 1


def _quiet_from_now_on() -> None:
    """Drop what the interpreter would still report on its way out after a Ctrl-C.

    Ctrl-C can land inside ``asyncio.run`` while it builds its event loop: the half-built
    loop's finalizer then fails ("Exception ignored in BaseEventLoop.__del__") and the
    coroutine it never started warns that it was never awaited, both when they are
    collected, after the one line that ends the run. The process is ending: those reports
    are not news to the person who pressed Ctrl-C."""
    sys.unraisablehook = lambda _: None
    warnings.simplefilter("ignore")


def _scale(args: argparse.Namespace) -> int:
    if args.factor < 1:
        print(f"vslice scale-trace: --factor {args.factor}: must be >= 1", file=sys.stderr)
        return 2
    fleet, pods = traces.write_scaled(args.fleet, args.trace, args.out, args.factor)
    nodes = traces.read_fleet(fleet)
    gpus = sum(len(n.devices) for n in nodes)
    print(f"{fleet}: {len(nodes)} nodes, {gpus} GPUs\n{pods}: {len(traces.read_pods(pods))} pods")
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be within 0..1")
    return value


def _mig_fleet(args: argparse.Namespace) -> int:
    models = tuple(m.strip() for m in args.from_models.split(",") if m.strip())
    source = Path(args.fleet)
    text = traces.mig_fleet(
        source.read_text(),
        share=args.share,
        models=models,
        to=args.to,
        seed=args.seed,
        path=str(source),
    )
    Path(args.out).write_text(text)
    nodes = traces.parse_fleet(text, path=args.out)
    mig = sum(1 for n in nodes for d in n.devices if d.mode == "mig")
    total = sum(len(n.devices) for n in nodes)
    print(f"{args.out}: {len(nodes)} nodes, {total} GPUs, {mig} of them {args.to} in MIG mode")
    return 0


def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("vslice run: no command given (vslice run [options] -- CMD ARGS...)", file=sys.stderr)
        return 2
    if args.dcus is not None and args.gpumem_percentage is not None:
        print(
            "vslice run: --gpumem-percentage is not a DCU resource (HAMi's DCUs have none);"
            " give --gpumem MiB with --dcus",
            file=sys.stderr,
        )
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    request = running.SliceRequest(
        dcus=args.dcus,
        memory_mib=args.gpumem,
        memory_percent=args.gpumem_percentage,
        cores_percent=args.gpucores,
        gpus=args.gpus,
        gpu_type=args.gpu_type,
    )
    return running.run(state_dir, request, cmd)


def _release(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    stack = stacks.running(state_dir)
    ack = asyncio.run(stacks.release(stack.settings("operator"), args.pod))
    if ack.node is None:
        print(f"{args.pod} held no slice (its lease, if any, is ended)")
    else:
        print(f"released {args.pod}: {ack.slices} slice(s) on {ack.node}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    stack = stacks.running(state_dir)
    done = asyncio.run(repairs.repair(stack.settings("operator"), args.node))
    print(repairs.summary(done))
    return 0


@dataclass(frozen=True)
class UpSettings:
    """What ``up`` starts: ``environ`` for ``stacks.up`` (the flags as its variables),
    ``replicas``, ``policy`` and ``nats_port`` (0: a free one)."""

    environ: dict[str, str] = field(default_factory=dict)
    replicas: int = 2
    policy: str = "hami"
    nats_port: int = 0
    workload_trace: str | None = None


def _node_config(path: str) -> str:
    """``path`` made absolute, once it reads as a device config (``nodeconfigs.parse``).
    Raises ``StackError`` naming the file and, for a refused one, the key and value."""
    try:
        nodeconfigs.parse(configfiles.read(path), source=path)
    except OSError as exc:
        raise stacks.StackError(f"--node-config {path}: {exc.strerror or exc}") from None
    except nodeconfigs.NodeConfigError as exc:
        raise stacks.StackError(f"--node-config {exc}") from None
    return str(Path(path).resolve())


def up_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> UpSettings:
    """What ``up`` starts, from its flags, else the environment. Raises ``StackError``
    naming a malformed variable. Pure."""
    env = dict(environ)
    for dest, var in UP_ENV.items():
        value = getattr(args, dest, None)
        if value is not None:
            env[var] = str(value)
    checks: dict[str, Callable[[str], Any]] = {
        "VSLICE_REPLICAS": bounded("VSLICE_REPLICAS", least=1, most=16),
        "VSLICE_POLICY": _policy,
        "VSLICE_MOCKGPU_COUNT": bounded("VSLICE_MOCKGPU_COUNT", least=0, most=stacks.MAX_DEVICES),
        "VSLICE_MOCKGPU_MEMORY_MIB": bounded("VSLICE_MOCKGPU_MEMORY_MIB", least=1, unit=" MiB"),
        "VSLICE_NATS_PORT": bounded("VSLICE_NATS_PORT", least=1, most=65535),
        "VSLICE_MOCKDCU_DEVICES": _dcus,
    }
    for var, check in checks.items():
        if env.get(var):
            try:
                check(env[var])
            except argparse.ArgumentTypeError as exc:
                raise stacks.StackError(f"{var}={env[var]!r}: {exc}") from None
    if (
        env.get("VSLICE_MOCKGPU_COUNT") == "0"
        and not env.get("VSLICE_MOCKGPU_DEVICES")
        and not env.get("VSLICE_MOCKDCU_DEVICES")
    ):
        raise stacks.StackError(
            "VSLICE_MOCKGPU_COUNT='0' (--mock-gpus 0) without --mock-dcus: the node would"
            " have no device"
        )
    policy = env.get("VSLICE_POLICY") or "hami"
    trace = env.get("VSLICE_WORKLOAD_TRACE") or None
    if policy in ("fgd", "steer") and not trace:
        raise stacks.StackError(
            f"--policy {policy} needs --workload-trace CSV (FGD's target workload, a pod list)"
        )
    if trace and not Path(trace).is_file():
        raise stacks.StackError(f"--workload-trace {trace}: no such file")
    if env.get("VSLICE_NODE_CONFIG"):
        env["VSLICE_NODE_CONFIG"] = _node_config(env["VSLICE_NODE_CONFIG"])
    return UpSettings(
        environ=env,
        replicas=int(env.get("VSLICE_REPLICAS") or 2),
        policy=policy,
        nats_port=int(env.get("VSLICE_NATS_PORT") or 0),
        workload_trace=str(Path(trace).resolve()) if trace else None,
    )


def _stack(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
    if args.command == "status":
        return _status(state_dir, nodes=args.nodes, as_json=args.json)
    if args.command == "down":
        stack = stacks.down(state_dir)
        print(f"nothing up in {state_dir}" if stack is None else f"stack in {state_dir} stopped")
        return 0
    wanted = up_settings(args, os.environ)
    known = stacks.read_state(state_dir)
    if known is not None and all(stacks.alive(p) for p in known.pids.values()):
        print(f"already up in {state_dir} (NATS {known.nats_url}); `vslice down` stops it")
        return _unhealthy(state_dir, known)
    stack = stacks.up(
        state_dir,
        environ=wanted.environ,
        replicas=wanted.replicas,
        policy=wanted.policy,
        nats_port=wanted.nats_port,
        workload_trace=wanted.workload_trace,
    )
    if known is not None and known.trust_dir:
        again = sorted(n for n, p in stack.pids.items() if known.pids.get(n) != p)
        print(f"restarted in {state_dir}: {', '.join(again)} (NATS {stack.nats_url}, data kept)")
        return 0
    print(f"up in {state_dir}: NATS {stack.nats_url}, logs in {state_dir / 'logs'}")
    print(f"dashboard: {stack.metrics_url}/  (Prometheus: {stack.metrics_url}/metrics)")
    plural = "s" if wanted.replicas != 1 else ""
    print(f"{wanted.replicas} scheduler replica{plural}, policy {wanted.policy}")
    for name, pid in stack.pids.items():
        print(f"  {name:<14} pid {pid}")
    return 0


def _unhealthy(state_dir: Path, stack: stacks.Stack) -> int:
    """What ``up`` says of a stack whose processes all run: each one silent on the bus
    (its heartbeat stale or missing), which ``up`` does not restart; exits
    ``EXIT_UNHEALTHY`` when there is one."""
    beats = None
    with contextlib.suppress(stacks.StackError):
        beats = asyncio.run(stacks.read_heartbeats(stack.settings("operator")))
    processes = {name: {"pid": pid, "state": "running"} for name, pid in stack.pids.items()}
    silent = {n: h for n, h in statuses.health(processes, beats).items() if h["state"] != "healthy"}
    for name, h in silent.items():
        print(f"  {name} (pid {stack.pids[name]}) runs but is UNHEALTHY: {h['reason']}")
    if silent:
        print(
            f"  (see its log in {state_dir}/logs; once it is stopped, `vslice up` starts it again)"
        )
        return EXIT_UNHEALTHY
    return 0


def status_data(state_dir: Path, *, nodes: bool = False) -> dict[str, Any]:
    """``statuses.status`` of the stack in ``state_dir``, with its fleet read from the bus
    when its nats-server runs. Raises ``StackError`` for an unreadable state file."""
    stack = stacks.read_state(state_dir)
    fleet = None
    error = None
    beats = None
    if stack is not None and stacks.alive(stack.pids.get("nats", -1)):
        try:
            fleet = asyncio.run(stacks.read_fleet(stack.settings("operator")))
        except stacks.StackError as exc:
            error = str(exc)
        with contextlib.suppress(stacks.StackError):  # then no service counts as healthy
            beats = asyncio.run(stacks.read_heartbeats(stack.settings("operator")))
    data = statuses.status(
        state_dir,
        stack,
        alive=stacks.alive,
        devices=fleet.devices if fleet else None,
        fleet_error=error,
        nodes=nodes,
        beats=beats,
        quarantined=fleet.quarantined if fleet else None,
    )
    # how an operator connects (README, "Who may do what on the bus")
    operator = stack.settings("operator") if stack is not None else None
    data["operator_nkey_seed"] = (operator.nkey_seed_path or None) if operator else None
    data["operator_creds"] = (operator.creds_path or None) if operator else None
    data["tls_ca"] = (operator.tls_ca_path or None) if operator else None
    return data


SLICE_LINES = 50  # above this many live slices, status lists them only with --nodes


EXIT_UNHEALTHY = 1  # `vslice status`: a process of the stack is stopped or unhealthy


def _status(state_dir: Path, *, nodes: bool, as_json: bool) -> int:
    data = status_data(state_dir, nodes=nodes or not as_json)
    code = EXIT_UNHEALTHY if data["nats_url"] is not None and not data["healthy"] else 0
    if as_json:
        print(json.dumps(data, indent=1))
        return code
    print(statuses.text(data, table=nodes))
    stack = stacks.read_state(state_dir)
    if data["up"] and stack is not None:
        try:
            live = asyncio.run(stacks.live_slices(stack.settings("operator")))
        except stacks.StackError as exc:
            print(f"slices: {exc}")
            return code
        if nodes or len(live) <= SLICE_LINES:
            print("\n".join(stacks.slice_lines(live)))
        else:
            print(f"{len(live)} live slices (`vslice status --nodes` lists them)")
    return code


def _replay(args: argparse.Namespace) -> int:
    attach = None
    if (args.keep and not args.attach) or (args.attach and args.in_process):
        print("vslice replay: --keep needs --attach, --attach no --in-process", file=sys.stderr)
        return 2
    gpus = sum(len(n.devices) for n in traces.read_fleet(args.fleet))
    traces.read_pods(args.trace)  # fail early, in this process, on a malformed trace
    if args.attach:
        attach = Path(args.state_dir) if args.state_dir else stacks.default_state_dir()
        args.policy = args.policy or [stacks.running(attach).policy]
    args.policy = args.policy or ["fgd"]
    if args.in_process:
        reports = replays_local.replay_in_process(
            args.trace, args.fleet, args.policy, args.seeds, jobs=args.jobs, quiet=args.quiet
        )
    else:
        reports = replays_bus.replay_over_bus(
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
    print(replays_local.table(reports, gpus))
    if not args.in_process and args.compare_in_process:
        local = replays_local.replay_in_process(
            args.trace, args.fleet, args.policy, args.seeds, jobs=args.jobs, quiet=args.quiet
        )
        print()
        print(replays_local.comparison_table(reports, local))
    for r in reports:
        if r.get("mode") == "bus":
            print(
                f"{r['policy']} over the bus: {r['pods_per_s']:.0f} pods/s, latency p50"
                f" {r['latency_ms_p50']:.1f} ms p99 {r['latency_ms_p99']:.1f} ms,"
                f" {r['replicas']} replicas, {r['conflicts']} lost ledger races"
                f" ({100 * r['conflict_rate']:.1f} % of placements),"
                f" {r['claims_lost']} lost claims, {r['cpu_ms_per_pod']:.2f} CPU ms per pod"
            )
    if attach is not None:
        kept = "; its fleet and pods stay until `vslice down`" if args.keep else ""
        print(f"replayed on the stack in {attach} (`vslice status` shows it){kept}")
    if args.json_out:
        replays_local.write_json(args.json_out, reports)
        print(f"report: {args.json_out}")
    if args.plot:
        replays_local.plot(args.plot, reports)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
