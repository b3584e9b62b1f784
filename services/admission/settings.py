"""The admission service's settings: one frozen object, from flags and the environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting
from libshared.resources import ResourceSettings


@dataclass(frozen=True)
class Settings:
    """Bus settings plus the resource model's defaults (HAMi's ``defaultMemory``,
    ``defaultCores``, ``defaultGPUNum``) and the log level."""

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    log_level: str = "info"


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Exits (``SystemExit`` 2) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.admission", description="vslice admission (local mode)"
    )
    connecting.add_arguments(parser, env)
    parser.add_argument(
        "--default-memory-mib", type=int, default=int(env.get("VSLICE_DEFAULT_MEMORY_MIB", "0"))
    )
    parser.add_argument(
        "--default-cores", type=int, default=int(env.get("VSLICE_DEFAULT_CORES", "0"))
    )
    parser.add_argument(
        "--default-gpu-num", type=int, default=int(env.get("VSLICE_DEFAULT_GPU_NUM", "1"))
    )
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    args = parser.parse_args(list(argv or []))
    try:
        bus = connecting.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    return Settings(
        bus=bus,
        resources=ResourceSettings(
            default_memory_mib=args.default_memory_mib,
            default_cores_percent=args.default_cores,
            default_gpu_num=args.default_gpu_num,
        ),
        log_level=args.log_level,
    )
