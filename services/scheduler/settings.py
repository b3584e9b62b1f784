"""The scheduler replica's settings: one frozen object, from flags and the environment.

Every field has a default, so ``Settings()`` is a replica of the default stack (prefix
``vslice``, policy ``hami``, NATS on localhost). Flags win over environment variables.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting
from services.scheduler.core.deciding import POLICIES


@dataclass(frozen=True)
class Settings:
    """A scheduler replica.

    ``policy``: one of ``services.scheduler.core.deciding.POLICIES``. ``workload_trace``:
    pod list CSV whose shapes are FGD's target workload (required for ``fgd``). ``seed``:
    tie-breaking seed. ``max_attempts``: decide-and-commit attempts before a lost ledger
    race is answered ``Unschedulable``. ``max_devices``: most GPUs on one node.
    ``explain``: per-node reasons in ``Unschedulable``. ``sync_timeout_s``: longest wait
    for the view to catch up with the ledger before deciding, seconds. ``claim_wait_s``:
    how long a pod's unchanged claim whose pod is in no ledger is waited for before it is
    taken over (its holder presumably died), seconds. ``max_in_flight``: requests handled
    at once (their bus round trips overlap; decisions and commits still go one at a
    time). ``name``: this replica in logs.
    """

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    policy: str = "hami"
    workload_trace: str | None = None
    seed: int = 0
    max_attempts: int = 8
    max_devices: int = 8
    explain: bool = True
    sync_timeout_s: float = 2.0
    claim_wait_s: float = 2.0
    max_in_flight: int = 32
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = "info"


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (default: none) and ``environ`` (default: ``os.environ``).

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_POLICY``, ``VSLICE_WORKLOAD_TRACE``, ``VSLICE_SEED``, ``VSLICE_LOG_LEVEL``.
    Exits (``SystemExit`` 2, argparse's way) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.scheduler", description="a vslice scheduler replica"
    )
    connecting.add_arguments(parser, env)
    parser.add_argument("--policy", default=env.get("VSLICE_POLICY", "hami"), choices=POLICIES)
    parser.add_argument("--workload-trace", default=env.get("VSLICE_WORKLOAD_TRACE") or None)
    parser.add_argument("--seed", type=int, default=int(env.get("VSLICE_SEED", "0")))
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--max-devices", type=int, default=8)
    parser.add_argument(
        "--claim-wait", type=float, default=2.0, help="seconds before a dead claim is taken over"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=32, help="requests handled at once (default 32)"
    )
    parser.add_argument("--no-explain", action="store_true", help="leave per-node reasons out")
    parser.add_argument("--name", default=None, help="replica name in logs")
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    args = parser.parse_args(list(argv or []))
    if args.policy == "fgd" and not args.workload_trace:
        parser.error("--policy fgd needs --workload-trace (FGD's target workload)")
    if args.claim_wait <= 0:
        parser.error("--claim-wait must be > 0")
    if args.max_attempts < 1:
        parser.error("--max-attempts must be >= 1")
    if args.max_in_flight < 1:
        parser.error(f"--max-in-flight {args.max_in_flight}: must be >= 1")
    try:
        bus = connecting.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    extra = {"name": args.name} if args.name else {}
    return Settings(
        bus=bus,
        policy=args.policy,
        workload_trace=args.workload_trace,
        seed=args.seed,
        max_attempts=args.max_attempts,
        max_devices=args.max_devices,
        explain=not args.no_explain,
        claim_wait_s=args.claim_wait,
        max_in_flight=args.max_in_flight,
        log_level=args.log_level,
        **extra,
    )
