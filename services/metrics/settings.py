"""The metrics service's settings: one frozen object, from flags and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from libshared import connecting, probes, settings

DEFAULT_PORT = 9394  # the port HAMi's vGPU monitor serves its /metrics on (docs/metrics.md)


class Options(settings.ServiceOptions, frozen=True, kw_only=True):
    """The metrics service's flags and variables (``libshared.settings``)."""

    host: Annotated[str, settings.option("--host", env="VSLICE_METRICS_HOST")] = "0.0.0.0"
    port: Annotated[
        int, msgspec.Meta(ge=0, le=65535), settings.option("--port", env="VSLICE_METRICS_PORT")
    ] = DEFAULT_PORT
    usage_ttl: Annotated[
        float, msgspec.Meta(gt=0), settings.option("--usage-ttl", help="seconds")
    ] = 30.0
    stats_interval: Annotated[
        float, msgspec.Meta(gt=0), settings.option("--stats-interval", help="seconds")
    ] = 5.0
    observe_requests: Annotated[
        bool,
        settings.option(
            "--no-observe-requests",
            help="do not subscribe to schedule requests (no scheduling latency histogram)",
        ),
    ] = True
    zone: Annotated[str, settings.option("--zone", help="HAMi's `zone` label")] = "vGPU"
    legacy_metrics: Annotated[
        bool,
        settings.option(
            "--legacy-metrics",
            env="VSLICE_LEGACY_METRICS",
            help="serve HAMi's metric names of v2.8 and before as well (HAMi's --legacy-metrics)",
        ),
    ] = False


# Each default is written once, in the options above; the settings objects below take
# theirs from here.
DEFAULTS = Options()


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
    host: str = DEFAULTS.host
    port: int = DEFAULTS.port
    usage_ttl_s: float = DEFAULTS.usage_ttl
    stats_interval_s: float = DEFAULTS.stats_interval
    observe_requests: bool = DEFAULTS.observe_requests
    zone: str = DEFAULTS.zone
    legacy_metrics: bool = DEFAULTS.legacy_metrics
    log_level: str = DEFAULTS.log_level
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)


LOADER = settings.Loader(
    Options,
    prog="python -m services.metrics",
    description="vslice metrics: HAMi-compatible /metrics and the fleet dashboard",
)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_METRICS_HOST``, ``VSLICE_METRICS_PORT``, ``VSLICE_LEGACY_METRICS``,
    ``VSLICE_LOG_LEVEL`` (``Options``). Exits (``SystemExit`` 2) on an invalid flag or
    value, naming it.
    """
    opts = LOADER.parse(argv, os.environ if environ is None else environ)
    try:
        bus = opts.bus()
    except settings.SettingsError as exc:
        LOADER.error(str(exc))
    return Settings(
        bus=bus,
        host=opts.host,
        port=opts.port,
        usage_ttl_s=opts.usage_ttl,
        stats_interval_s=opts.stats_interval,
        observe_requests=opts.observe_requests,
        zone=opts.zone,
        legacy_metrics=opts.legacy_metrics,
        log_level=opts.log_level,
        health=opts.health(),
    )
