"""The scheduler replica's settings: one frozen object, from flags and the environment.

Every field has a default, so ``Settings()`` is a replica of the default stack (prefix
``vslice``, policy ``hami``, NATS on localhost). Flags win over environment variables.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from libshared import connecting, kubeclients, probes, settings
from libshared.resources import ResourceSettings
from services.scheduler.core import committing, partitioning
from services.scheduler.core.deciding import POLICIES

RULES = committing.Rules  # the protocol's defaults
K8S = "Kubernetes"  # the extender's options in --help


class Options(settings.ResourceOptions, frozen=True, kw_only=True):
    """A replica's flags and variables (``libshared.settings``)."""

    policy: Annotated[
        Literal[POLICIES], settings.option("--policy", env="VSLICE_POLICY")  # type: ignore[valid-type]
    ] = "hami"
    workload_trace: Annotated[
        str | None, settings.option("--workload-trace", env="VSLICE_WORKLOAD_TRACE")
    ] = None
    seed: Annotated[
        str,
        settings.option(
            "--seed",
            env="VSLICE_SEED",
            help="tie-breaking seed: an integer, or `auto` for one drawn from the replica's "
            "name (replicas of one Deployment then break ties apart)",
        ),
    ] = "0"
    replica_index: Annotated[
        str,
        settings.option(
            "--replica-index",
            env="VSLICE_REPLICA_INDEX",
            help="this replica's index, 0 .. --replica-count - 1, or `auto` for one drawn from "
            "the replica's name",
        ),
    ] = "0"
    replica_count: Annotated[
        int,
        msgspec.Meta(ge=1),
        settings.option(
            "--replica-count",
            env="VSLICE_REPLICA_COUNT",
            help="scheduler replicas deciding at once; each prefers near-best nodes of its own "
            "shard (default 1: no shards; --replicas is the buckets')",
        ),
    ] = 1
    shard_epsilon: Annotated[
        float,
        settings.option(
            "--shard-epsilon",
            env="VSLICE_SHARD_EPSILON",
            help="how near the best score a node of the replica's shard must be, as a fraction "
            "0-1 of the fitting nodes' score range",
        ),
    ] = partitioning.DEFAULT_EPSILON
    max_attempts: Annotated[
        int,
        msgspec.Meta(ge=1),
        settings.option(
            "--max-attempts", help="decide-and-commit attempts before a lost race is answered"
        ),
    ] = RULES.max_attempts
    max_devices: Annotated[
        int, msgspec.Meta(ge=1), settings.option("--max-devices", help="most GPUs on one node")
    ] = 8
    claim_wait: Annotated[
        float,
        msgspec.Meta(gt=0),
        settings.option("--claim-wait", help="seconds before a dead claim is taken over"),
    ] = RULES.claim_wait_s
    sync_timeout: Annotated[
        float,
        msgspec.Meta(gt=0),
        settings.option(
            "--sync-timeout",
            env="VSLICE_SYNC_TIMEOUT",
            help="seconds to wait for the view to catch up with the ledger before deciding "
            "(then every ledger key is read afresh)",
        ),
    ] = RULES.sync_timeout_s
    max_in_flight: Annotated[
        int,
        msgspec.Meta(ge=1),
        settings.option("--max-in-flight", help="requests handled at once"),
    ] = RULES.max_in_flight
    explain: Annotated[bool, settings.option("--no-explain", help="leave per-node reasons out")] = (
        RULES.explain
    )
    name: Annotated[str | None, settings.option("--name", help="replica name in logs")] = None
    extender_port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        settings.option(
            "--extender-port",
            env="VSLICE_EXTENDER_PORT",
            help="serve the kube-scheduler extender (/filter, /bind) on this port; 0 = off",
            group=K8S,
        ),
    ] = 0
    extender_host: Annotated[
        str,
        settings.option(
            "--extender-host",
            env="VSLICE_EXTENDER_HOST",
            help="address the extender listens on (default loopback: any other address "
            "needs --tls-cert, --tls-key and --tls-client-ca)",
            group=K8S,
        ),
    ] = "127.0.0.1"
    tls_cert: Annotated[
        str | None, settings.option("--tls-cert", env="VSLICE_TLS_CERT", group=K8S)
    ] = None
    tls_key: Annotated[
        str | None, settings.option("--tls-key", env="VSLICE_TLS_KEY", group=K8S)
    ] = None
    tls_client_ca: Annotated[
        str | None,
        settings.option(
            "--tls-client-ca",
            env="VSLICE_TLS_CLIENT_CA",
            help="CA whose client certificates alone may call the extender: kube-scheduler's"
            " tlsConfig certFile/keyFile",
            group=K8S,
        ),
    ] = None
    kube: Annotated[
        bool,
        settings.option(
            "--kube",
            env="VSLICE_KUBE",
            help="talk to the Kubernetes API: in-cluster config, else $KUBECONFIG",
            group=K8S,
        ),
    ] = False
    reservation_ttl: Annotated[
        float,
        msgspec.Meta(gt=0),
        settings.option(
            "--reservation-ttl",
            env="VSLICE_RESERVATION_TTL",
            help="seconds a reservation waits for its bind",
            group=K8S,
        ),
    ] = 60.0


# Each default is written once: in the options above (or committing.Rules, the
# protocol's), and the settings object below takes it from here.
DEFAULTS = Options()


@dataclass(frozen=True)
class Settings:
    """A scheduler replica.

    ``policy``: one of ``services.scheduler.core.deciding.POLICIES``. ``workload_trace``:
    pod list CSV whose shapes are FGD's target workload (required for ``fgd``). ``seed``:
    tie-breaking seed (``--seed auto``: the CRC-32 of the replica's name, so replicas
    started with one command still break ties apart and race less for one node).
    ``replica_index`` (0 .. ``replicas`` - 1) and ``replicas``: which of how many replicas
    decide at once; each prefers the near-best nodes of its own shard
    (``services.scheduler.core.partitioning``; ``replicas`` 1: decides as a lone replica).
    ``shard_epsilon``: how near the best a node of the shard must score, as a fraction
    (0-1) of the fitting nodes' score range.
    ``max_attempts``: decide-and-commit attempts before a lost ledger
    race is answered ``Unschedulable``. ``max_devices``: most GPUs on one node.
    ``explain``: per-node reasons in ``Unschedulable``. ``sync_timeout_s``: longest wait
    for the view to catch up with the ledger before deciding, seconds. ``claim_wait_s``:
    how long a pod's unchanged claim whose pod is in no ledger is waited for before it is
    taken over (its holder presumably died), seconds. ``max_in_flight``: requests handled
    at once (their bus round trips overlap; decisions and commits still go one at a
    time). ``name``: this replica in logs.

    Kubernetes: ``extender_port`` serves the kube-scheduler extender there (0: off) on
    ``extender_host``, over TLS when ``tls_cert`` and ``tls_key`` (PEM paths) are set,
    taking only callers with a client certificate from ``tls_client_ca`` when it is set
    (required off loopback);
    ``kube`` talks to the API server (``None``: off); ``reservation_ttl_s``: how long a
    reservation may wait for its bind before it is released, seconds.

    ``health``: where ``/healthz`` and ``/readyz`` are served over HTTP (``libshared.probes``;
    the port 0: not served).

    ``resources``: the resource model's defaults the extender parses Kubernetes pods with
    (``ResourceOptions``: the webhook's flags and variables, so one ConfigMap sets both).
    """

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    policy: str = DEFAULTS.policy
    workload_trace: str | None = DEFAULTS.workload_trace
    seed: int = int(DEFAULTS.seed)
    replica_index: int = int(DEFAULTS.replica_index)
    replicas: int = DEFAULTS.replica_count
    shard_epsilon: float = DEFAULTS.shard_epsilon
    max_attempts: int = DEFAULTS.max_attempts
    max_devices: int = DEFAULTS.max_devices
    explain: bool = DEFAULTS.explain
    sync_timeout_s: float = DEFAULTS.sync_timeout
    claim_wait_s: float = DEFAULTS.claim_wait
    max_in_flight: int = DEFAULTS.max_in_flight
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = DEFAULTS.log_level
    extender_port: int = DEFAULTS.extender_port
    extender_host: str = DEFAULTS.extender_host
    tls_cert: str | None = None
    tls_client_ca: str | None = None
    tls_key: str | None = None
    kube: kubeclients.KubeSettings | None = None
    reservation_ttl_s: float = DEFAULTS.reservation_ttl
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)


LOADER = settings.Loader(
    Options, prog="python -m services.scheduler", description="a vslice scheduler replica"
)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (default: none) and ``environ`` (default: ``os.environ``).

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_POLICY``, ``VSLICE_WORKLOAD_TRACE``, ``VSLICE_SEED``, ``VSLICE_REPLICA_INDEX``,
    ``VSLICE_REPLICA_COUNT``, ``VSLICE_SHARD_EPSILON``, ``VSLICE_LOG_LEVEL``,
    ``VSLICE_EXTENDER_PORT``, ``VSLICE_EXTENDER_HOST``, ``VSLICE_TLS_CERT``,
    ``VSLICE_TLS_KEY``, ``VSLICE_TLS_CLIENT_CA``, ``VSLICE_KUBE`` (``1``/``true``),
    ``VSLICE_RESERVATION_TTL``, ``VSLICE_SYNC_TIMEOUT`` (``Options``; and ``KUBECONFIG``
    for ``--kube`` outside a cluster). Exits (``SystemExit`` 2, argparse's way) on an
    invalid flag or value, naming it.
    """
    opts = LOADER.parse(argv, os.environ if environ is None else environ)
    if bool(opts.tls_cert) != bool(opts.tls_key):
        LOADER.error("--tls-cert and --tls-key go together")
    if opts.tls_client_ca and not opts.tls_cert:
        LOADER.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)")
    if opts.extender_port and not _loopback(opts.extender_host) and not opts.tls_client_ca:
        # /filter reserves GPUs and /bind creates Bindings with the scheduler's cluster-wide
        # rights: off loopback only a caller with a certificate from the CA may reach them
        LOADER.error(
            f"--extender-host {opts.extender_host}: an extender off loopback needs "
            "--tls-cert, --tls-key and --tls-client-ca (kube-scheduler's client certificate)"
        )
    if opts.policy in ("fgd", "steer") and not opts.workload_trace:
        LOADER.error(f"--policy {opts.policy} needs --workload-trace (FGD's target workload)")
    try:
        bus = opts.bus()
    except settings.SettingsError as exc:
        LOADER.error(str(exc))
    name = opts.name or Settings().name
    if opts.seed.strip().lower() == "auto":
        seed = zlib.crc32(name.encode())
    else:
        try:
            seed = int(opts.seed)
        except ValueError:
            LOADER.error(f"--seed {opts.seed!r}: must be an integer or 'auto'")
    partition = _partition(opts, name)
    return Settings(
        bus=bus,
        policy=opts.policy,
        workload_trace=opts.workload_trace,
        seed=seed,
        replica_index=partition.index,
        replicas=partition.count,
        shard_epsilon=partition.epsilon,
        max_attempts=opts.max_attempts,
        max_devices=opts.max_devices,
        explain=opts.explain,
        claim_wait_s=opts.claim_wait,
        sync_timeout_s=opts.sync_timeout,
        max_in_flight=opts.max_in_flight,
        log_level=opts.log_level,
        health=opts.health(),
        extender_port=opts.extender_port,
        extender_host=opts.extender_host,
        tls_cert=opts.tls_cert,
        tls_client_ca=opts.tls_client_ca,
        tls_key=opts.tls_key,
        kube=kubeclients.KubeSettings() if opts.kube else None,
        reservation_ttl_s=opts.reservation_ttl,
        name=name,
        resources=opts.resource_settings(),
    )


def _partition(opts: Options, name: str) -> partitioning.Partition:
    """The replica's partition from its options; ``LOADER.error`` (exit 2) names the flag
    and value when one is out of range. ``--replica-index auto``: the CRC-32 of ``name``
    modulo ``--replica-count`` (replicas of a Deployment, whose names are random, may then
    share a shard)."""
    count = opts.replica_count
    if opts.replica_index.strip().lower() == "auto":
        index = zlib.crc32(name.encode()) % count
    else:
        try:
            index = int(opts.replica_index)
        except ValueError:
            LOADER.error(f"--replica-index {opts.replica_index!r}: must be an integer or 'auto'")
    try:
        return partitioning.Partition(index=index, count=count, epsilon=opts.shard_epsilon)
    except partitioning.PartitionError as exc:
        LOADER.error(f"--{exc.field.replace(' ', '-')} {exc.value!r}: {exc.reason}")


def _loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
