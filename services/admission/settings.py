"""The admission service's settings: one frozen object, from flags and the environment.

Two front doors share one resource model: the NATS request handler of local mode and the
HTTPS MutatingAdmissionWebhook of Kubernetes (``--webhook-port``). With the webhook on,
the bus is used only when a NATS URL is given (``--nats-url`` or ``VSLICE_NATS_URL``): in
Kubernetes the webhook needs no NATS. With the webhook off, the bus is always used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from libshared import connecting, probes, settings
from libshared.resources import ResourceSettings
from services.admission.core import mutating

HOOK = "Kubernetes mutating admission webhook"  # the webhook's options in --help


class Options(settings.ResourceOptions, frozen=True, kw_only=True):
    """The admission service's flags and variables (``libshared.settings``; the resource
    model's, ``ResourceOptions``, are the scheduler's too)."""

    webhook_port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        settings.option(
            "--webhook-port",
            env="VSLICE_WEBHOOK_PORT",
            help="serve POST /mutate over HTTPS on this port; 0 = off",
            group=HOOK,
        ),
    ] = 0
    webhook_host: Annotated[
        str, settings.option("--webhook-host", env="VSLICE_WEBHOOK_HOST", group=HOOK)
    ] = "0.0.0.0"
    tls_cert: Annotated[
        str | None,
        settings.option(
            "--tls-cert", env="VSLICE_TLS_CERT", help="PEM certificate chain", group=HOOK
        ),
    ] = None
    tls_key: Annotated[
        str | None, settings.option("--tls-key", env="VSLICE_TLS_KEY", help="PEM key", group=HOOK)
    ] = None
    tls_reload: Annotated[
        float,
        msgspec.Meta(gt=0),
        settings.option(
            "--tls-reload",
            env="VSLICE_TLS_RELOAD_S",
            help="seconds between checks for a renewed certificate",
            group=HOOK,
        ),
    ] = 60.0
    scheduler_name: Annotated[
        str,
        msgspec.Meta(min_length=1),
        settings.option(
            "--scheduler-name",
            env="VSLICE_SCHEDULER_NAME",
            help="spec.schedulerName written into GPU pods",
            group=HOOK,
        ),
    ] = "vslice-scheduler"
    sm_policy: Annotated[
        Literal["default", "force", "disable"] | None,
        settings.option(
            "--sm-policy",
            env="VSLICE_SM_POLICY",
            help="GPU_CORE_UTILIZATION_POLICY added to GPU containers (default: none added)",
            group=HOOK,
        ),
    ] = None


# Each default is written once, in the options above; the settings objects below take
# theirs from here.
DEFAULTS = Options()


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

    port: int = DEFAULTS.webhook_port
    host: str = DEFAULTS.webhook_host
    tls_cert: str | None = DEFAULTS.tls_cert
    tls_key: str | None = DEFAULTS.tls_key
    tls_reload_s: float = DEFAULTS.tls_reload
    scheduler_name: str = DEFAULTS.scheduler_name
    core_policy: str | None = DEFAULTS.sm_policy


@dataclass(frozen=True)
class Settings:
    """Bus settings (``None``: no bus), the resource model's defaults (HAMi's
    ``defaultMemory``, ``defaultCores``, ``defaultGPUNum``), the webhook, the log level and
    where ``/healthz`` and ``/readyz`` are served (``health``: ``libshared.probes``)."""

    bus: connecting.BusSettings | None = field(default_factory=connecting.BusSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    log_level: str = DEFAULTS.log_level
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)

    @property
    def mutation(self) -> mutating.MutationSettings:
        """What the webhook writes, from the webhook settings and the resource model."""
        return mutating.MutationSettings(
            scheduler_name=self.webhook.scheduler_name,
            resources=self.resources,
            core_policy=self.webhook.core_policy,
        )


LOADER = settings.Loader(
    Options,
    prog="python -m services.admission",
    description="vslice admission: the bus handler of local mode and the Kubernetes "
    "mutating admission webhook",
)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_DEFAULT_MEMORY_MIB``, ``VSLICE_DEFAULT_CORES``, ``VSLICE_DEFAULT_GPU_NUM``,
    ``VSLICE_WEBHOOK_PORT``, ``VSLICE_WEBHOOK_HOST``, ``VSLICE_TLS_CERT``,
    ``VSLICE_TLS_KEY``, ``VSLICE_TLS_RELOAD_S``, ``VSLICE_SCHEDULER_NAME``,
    ``VSLICE_SM_POLICY``, ``VSLICE_LOG_LEVEL`` (``Options``). Exits (``SystemExit`` 2) on
    an invalid flag or value, naming it, or a webhook port without a certificate and key.
    """
    opts = LOADER.parse(argv, os.environ if environ is None else environ)
    if opts.webhook_port and not (opts.tls_cert and opts.tls_key):
        LOADER.error(
            f"--webhook-port {opts.webhook_port} needs --tls-cert and --tls-key: the API "
            "server calls admission webhooks over HTTPS only"
        )
    try:
        bus = opts.bus()
    except settings.SettingsError as exc:
        LOADER.error(str(exc))
    return Settings(
        bus=bus if opts.nats_url is not None or not opts.webhook_port else None,
        resources=opts.resource_settings(),
        webhook=WebhookSettings(
            port=opts.webhook_port,
            host=opts.webhook_host,
            tls_cert=opts.tls_cert,
            tls_key=opts.tls_key,
            tls_reload_s=opts.tls_reload,
            scheduler_name=opts.scheduler_name,
            core_policy=opts.sm_policy,
        ),
        log_level=opts.log_level,
        health=opts.health(),
    )
