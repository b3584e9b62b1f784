"""The node agent's settings: one frozen object, from flags and the environment.

Local mode only has the mock backend so far: the hosted nodes come from an openb node
list CSV (``--fleet``) or a small uniform spec (``--nodes``, ``--gpus``, ...).
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting
from services.nodeagent.core.fleets import DEFAULT_SPLIT_COUNT, FleetSpec, parse_devices


@dataclass(frozen=True)
class Settings:
    """``fleet_csv``: openb node list to host (wins over ``spec``); ``split_count`` for it
    (``None``: the replay default of ``libshared.traces``); ``name``: the agent (and its
    durable consumer's) name."""

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    spec: FleetSpec = field(default_factory=FleetSpec)
    fleet_csv: str | None = None
    split_count: int | None = None
    name: str = field(default_factory=socket.gethostname)
    log_level: str = "info"


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Exits (``SystemExit`` 2) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.nodeagent", description="vslice node agent (mock backend)"
    )
    connecting.add_arguments(parser, env)
    parser.add_argument("--fleet", default=env.get("VSLICE_FLEET") or None, help="node list CSV")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--memory-mib", type=int, default=16384)
    parser.add_argument("--gpu-type", default="MOCK-GPU-16G")
    parser.add_argument("--split-count", type=int, default=None)
    parser.add_argument(
        "--devices",
        default=env.get("VSLICE_MOCKGPU_DEVICES", ""),
        help="one node with these mock GPUs: <uuid>:<memory_mib>[,...] "
        "(env VSLICE_MOCKGPU_DEVICES; wins over --gpus/--memory-mib)",
    )
    parser.add_argument(
        "--node-prefix", default=env.get("VSLICE_NODE_PREFIX", socket.gethostname())
    )
    parser.add_argument("--name", default=env.get("VSLICE_AGENT_NAME", socket.gethostname()))
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    args = parser.parse_args(list(argv or []))
    try:
        bus = connecting.from_arguments(args)
        devices = parse_devices(args.devices)
    except ValueError as exc:
        parser.error(str(exc))
    spec = FleetSpec(
        nodes=args.nodes,
        gpus=args.gpus,
        memory_mib=args.memory_mib,
        gpu_type=args.gpu_type,
        split_count=args.split_count or DEFAULT_SPLIT_COUNT,
        name_prefix=args.node_prefix,
        devices=devices,
    )
    return Settings(
        bus=bus,
        spec=spec,
        fleet_csv=args.fleet,
        split_count=args.split_count,
        name=args.name,
        log_level=args.log_level,
    )
