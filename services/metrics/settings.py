"""The metrics service's settings: one frozen object, from flags and the environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting, probes

DEFAULT_PORT = 9394  # the port HAMi's vGPU monitor serves its /metrics on (docs/metrics.md)


@dataclass(frozen=True)
class Settings:
    """The metrics service.

    ``host``/``port``: where ``/metrics`` and the dashboard are served (port 0: a free
    one, logged). ``usage_ttl_s``: a node's usage report older than this is ignored,
    seconds. ``stats_interval_s``: how often the scheduler replicas' ``Stats`` and the
    ledger stream's last sequence are read, seconds; a replica silent for three intervals
    is dropped. ``observe_requests``: measure scheduling latency by watching schedule
    requests and the placements announced on the allocation stream (a second subscriber on
    the schedule subject: with no replica up, clients then wait out their timeout instead
    of getting NATS' "no responders" at once). ``zone``: HAMi's constant ``zone`` label.
    ``legacy_metrics``: serve HAMi's metric names of v2.8 and before as well (HAMi's
    ``--legacy-metrics``), for dashboards that still query them. ``health``: a port of
    their own for ``/healthz`` and ``/readyz`` (``libshared.probes``), which ``port`` serves
    as well.
    """

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    usage_ttl_s: float = 30.0
    stats_interval_s: float = 5.0
    observe_requests: bool = True
    zone: str = "vGPU"
    legacy_metrics: bool = False
    log_level: str = "info"
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_METRICS_HOST``, ``VSLICE_METRICS_PORT``, ``VSLICE_LEGACY_METRICS``,
    ``VSLICE_LOG_LEVEL``. Exits
    (``SystemExit`` 2) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.metrics",
        description="vslice metrics: HAMi-compatible /metrics and the fleet dashboard",
    )
    connecting.add_arguments(parser, env)
    parser.add_argument("--host", default=env.get("VSLICE_METRICS_HOST", "0.0.0.0"))
    parser.add_argument(
        "--port", type=int, default=int(env.get("VSLICE_METRICS_PORT", str(DEFAULT_PORT)))
    )
    parser.add_argument("--usage-ttl", type=float, default=30.0, help="seconds")
    parser.add_argument("--stats-interval", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "--no-observe-requests",
        action="store_true",
        help="do not subscribe to schedule requests (no scheduling latency histogram)",
    )
    parser.add_argument("--zone", default="vGPU", help="HAMi's `zone` label")
    parser.add_argument(
        "--legacy-metrics",
        action="store_true",
        default=connecting.env_flag(env, "VSLICE_LEGACY_METRICS"),
        help="serve HAMi's metric names of v2.8 and before as well (HAMi's --legacy-metrics)",
    )
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    probes.add_arguments(parser, env)
    args = parser.parse_args(list(argv or []))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0-65535")
    if args.usage_ttl <= 0:
        parser.error(f"--usage-ttl {args.usage_ttl}: must be > 0")
    if args.stats_interval <= 0:
        parser.error(f"--stats-interval {args.stats_interval}: must be > 0")
    try:
        bus = connecting.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    return Settings(
        bus=bus,
        host=args.host,
        port=args.port,
        usage_ttl_s=args.usage_ttl,
        stats_interval_s=args.stats_interval,
        observe_requests=not args.no_observe_requests,
        zone=args.zone,
        legacy_metrics=args.legacy_metrics,
        log_level=args.log_level,
        health=probes.from_arguments(parser, args),
    )
