"""The admission service's settings: one frozen object, from flags and the environment.

Two front doors share one resource model: the NATS request handler of local mode and the
HTTPS MutatingAdmissionWebhook of Kubernetes (``--webhook-port``). With the webhook on,
the bus is used only when a NATS URL is given (``--nats-url`` or ``VSLICE_NATS_URL``): in
Kubernetes the webhook needs no NATS. With the webhook off, the bus is always used.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting, probes
from libshared.resources import ResourceSettings
from services.admission.core import mutating


@dataclass(frozen=True)
class WebhookSettings:
    """The HTTPS webhook.

    ``port``: 0 = off. ``host``: address to listen on. ``tls_cert``/``tls_key``: PEM files
    (the mounted Secret), required when ``port`` is set: the API server calls webhooks
    over HTTPS only. ``tls_reload_s``: how often the files are checked for a renewed
    certificate, seconds. ``scheduler_name``: written into ``spec.schedulerName``.
    ``core_policy``: ``GPU_CORE_UTILIZATION_POLICY`` added to GPU containers (``None``:
    none added).
    """

    port: int = 0
    host: str = "0.0.0.0"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_reload_s: float = 60.0
    scheduler_name: str = "vslice-scheduler"
    core_policy: str | None = None


@dataclass(frozen=True)
class Settings:
    """Bus settings (``None``: no bus), the resource model's defaults (HAMi's
    ``defaultMemory``, ``defaultCores``, ``defaultGPUNum``), the webhook, the log level and
    where ``/healthz`` and ``/readyz`` are served (``health``: ``libshared.probes``)."""

    bus: connecting.BusSettings | None = field(default_factory=connecting.BusSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    log_level: str = "info"
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)

    @property
    def mutation(self) -> mutating.MutationSettings:
        """What the webhook writes, from the webhook settings and the resource model."""
        return mutating.MutationSettings(
            scheduler_name=self.webhook.scheduler_name,
            resources=self.resources,
            core_policy=self.webhook.core_policy,
        )


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_DEFAULT_MEMORY_MIB``, ``VSLICE_DEFAULT_CORES``, ``VSLICE_DEFAULT_GPU_NUM``,
    ``VSLICE_WEBHOOK_PORT``, ``VSLICE_WEBHOOK_HOST``, ``VSLICE_TLS_CERT``,
    ``VSLICE_TLS_KEY``, ``VSLICE_TLS_RELOAD_S``, ``VSLICE_SCHEDULER_NAME``,
    ``VSLICE_SM_POLICY``, ``VSLICE_LOG_LEVEL``. Exits (``SystemExit`` 2) on an invalid
    flag or value, or a webhook port without a certificate and key.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.admission",
        description="vslice admission: the bus handler of local mode and the Kubernetes "
        "mutating admission webhook",
    )
    connecting.add_arguments(parser, env)
    if "VSLICE_NATS_URL" not in env:
        parser.set_defaults(nats_url=None)  # tells "no NATS given" from the default URL
    parser.add_argument(
        "--default-memory-mib", type=int, default=env.get("VSLICE_DEFAULT_MEMORY_MIB", "0")
    )
    parser.add_argument("--default-cores", type=int, default=env.get("VSLICE_DEFAULT_CORES", "0"))
    parser.add_argument(
        "--default-gpu-num", type=int, default=env.get("VSLICE_DEFAULT_GPU_NUM", "1")
    )
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    hook = parser.add_argument_group("Kubernetes mutating admission webhook")
    hook.add_argument(
        "--webhook-port",
        type=int,
        default=env.get("VSLICE_WEBHOOK_PORT", "0"),
        help="serve POST /mutate over HTTPS on this port; 0 = off (env VSLICE_WEBHOOK_PORT)",
    )
    hook.add_argument("--webhook-host", default=env.get("VSLICE_WEBHOOK_HOST", "0.0.0.0"))
    hook.add_argument(
        "--tls-cert", default=env.get("VSLICE_TLS_CERT") or None, help="PEM certificate chain"
    )
    hook.add_argument("--tls-key", default=env.get("VSLICE_TLS_KEY") or None, help="PEM key")
    hook.add_argument(
        "--tls-reload",
        type=float,
        default=env.get("VSLICE_TLS_RELOAD_S", "60"),
        help="seconds between checks for a renewed certificate",
    )
    hook.add_argument(
        "--scheduler-name",
        default=env.get("VSLICE_SCHEDULER_NAME", "vslice-scheduler"),
        help="spec.schedulerName written into GPU pods (env VSLICE_SCHEDULER_NAME)",
    )
    hook.add_argument(
        "--sm-policy",
        choices=mutating.CORE_POLICIES,
        default=env.get("VSLICE_SM_POLICY") or None,
        help="GPU_CORE_UTILIZATION_POLICY added to GPU containers (default: none added)",
    )
    probes.add_arguments(parser, env)
    args = parser.parse_args(list(argv or []))
    if not 0 <= args.webhook_port <= 65535:
        parser.error(f"--webhook-port {args.webhook_port}: must be 0-65535")
    if args.webhook_port and not (args.tls_cert and args.tls_key):
        parser.error(
            f"--webhook-port {args.webhook_port} needs --tls-cert and --tls-key: the API "
            "server calls admission webhooks over HTTPS only"
        )
    if args.sm_policy is not None and args.sm_policy not in mutating.CORE_POLICIES:
        parser.error(f"--sm-policy {args.sm_policy!r}: must be one of {mutating.CORE_POLICIES}")
    if not args.tls_reload > 0:
        parser.error(f"--tls-reload {args.tls_reload}: must be above 0 seconds")
    if not args.scheduler_name:
        parser.error("--scheduler-name: must not be empty")
    for flag, value, low in (
        ("--default-memory-mib", args.default_memory_mib, 0),
        ("--default-cores", args.default_cores, 0),
        ("--default-gpu-num", args.default_gpu_num, 0),
    ):
        if value < low:
            parser.error(f"{flag} {value}: must be >= {low}")
    if args.default_cores > 100:
        parser.error(f"--default-cores {args.default_cores}: must be <= 100")
    nats_given = args.nats_url is not None
    if not nats_given:
        args.nats_url = connecting.DEFAULT_URL
    try:
        bus = connecting.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    return Settings(
        bus=bus if nats_given or not args.webhook_port else None,
        resources=ResourceSettings(
            default_memory_mib=args.default_memory_mib,
            default_cores_percent=args.default_cores,
            default_gpu_num=args.default_gpu_num,
        ),
        webhook=WebhookSettings(
            port=args.webhook_port,
            host=args.webhook_host,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_reload_s=args.tls_reload,
            scheduler_name=args.scheduler_name,
            core_policy=args.sm_policy,
        ),
        log_level=args.log_level,
        health=probes.from_arguments(parser, args),
    )
