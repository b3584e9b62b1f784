"""The scheduler replica's settings: one frozen object, from flags and the environment.

Every field has a default, so ``Settings()`` is a replica of the default stack (prefix
``vslice``, policy ``hami``, NATS on localhost). Flags win over environment variables.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from libshared import connecting, kubeclients, probes
from services.scheduler.core import partitioning
from services.scheduler.core.deciding import POLICIES


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
    """

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    policy: str = "hami"
    workload_trace: str | None = None
    seed: int = 0
    replica_index: int = 0
    replicas: int = 1
    shard_epsilon: float = partitioning.DEFAULT_EPSILON
    max_attempts: int = 8
    max_devices: int = 8
    explain: bool = True
    sync_timeout_s: float = 2.0
    claim_wait_s: float = 2.0
    max_in_flight: int = 32
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = "info"
    extender_port: int = 0
    extender_host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_client_ca: str | None = None
    tls_key: str | None = None
    kube: kubeclients.KubeSettings | None = None
    reservation_ttl_s: float = 60.0
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (default: none) and ``environ`` (default: ``os.environ``).

    Environment: ``VSLICE_NATS_URL``, ``VSLICE_PREFIX``, ``VSLICE_BUCKET_REPLICAS``,
    ``VSLICE_POLICY``, ``VSLICE_WORKLOAD_TRACE``, ``VSLICE_SEED``, ``VSLICE_REPLICA_INDEX``,
    ``VSLICE_REPLICA_COUNT``, ``VSLICE_SHARD_EPSILON``, ``VSLICE_LOG_LEVEL``,
    ``VSLICE_EXTENDER_PORT``, ``VSLICE_TLS_CERT``, ``VSLICE_TLS_KEY``, ``VSLICE_KUBE``
    (``1``/``true``), ``VSLICE_RESERVATION_TTL`` (and ``KUBECONFIG`` for ``--kube``
    outside a cluster).
    Exits (``SystemExit`` 2, argparse's way) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.scheduler", description="a vslice scheduler replica"
    )
    connecting.add_arguments(parser, env)
    parser.add_argument("--policy", default=env.get("VSLICE_POLICY", "hami"), choices=POLICIES)
    parser.add_argument("--workload-trace", default=env.get("VSLICE_WORKLOAD_TRACE") or None)
    parser.add_argument(
        "--seed",
        default=env.get("VSLICE_SEED", "0"),
        help="tie-breaking seed: an integer, or `auto` for one drawn from the replica's name "
        "(replicas of one Deployment then break ties apart; env VSLICE_SEED)",
    )
    parser.add_argument(
        "--replica-index",
        default=env.get("VSLICE_REPLICA_INDEX", "0"),
        help="this replica's index, 0 .. --replica-count - 1, or `auto` for one drawn from the "
        "replica's name (env VSLICE_REPLICA_INDEX)",
    )
    parser.add_argument(
        "--replica-count",
        default=env.get("VSLICE_REPLICA_COUNT", "1"),
        help="scheduler replicas deciding at once; each prefers near-best nodes of its own "
        "shard (default 1: no shards; env VSLICE_REPLICA_COUNT; --replicas is the buckets')",
    )
    parser.add_argument(
        "--shard-epsilon",
        default=env.get("VSLICE_SHARD_EPSILON", str(partitioning.DEFAULT_EPSILON)),
        help="how near the best score a node of the replica's shard must be, as a fraction "
        "0-1 of the fitting nodes' score range (env VSLICE_SHARD_EPSILON)",
    )
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
    k8s = parser.add_argument_group("Kubernetes")
    k8s.add_argument(
        "--extender-port",
        type=int,
        default=int(env.get("VSLICE_EXTENDER_PORT", "0") or 0),
        help="serve the kube-scheduler extender (/filter, /bind) on this port; 0 = off "
        "(env VSLICE_EXTENDER_PORT)",
    )
    k8s.add_argument(
        "--extender-host",
        default=env.get("VSLICE_EXTENDER_HOST", "127.0.0.1"),
        help="address the extender listens on (env VSLICE_EXTENDER_HOST; default loopback:"
        " any other address needs --tls-cert, --tls-key and --tls-client-ca)",
    )
    k8s.add_argument("--tls-cert", default=env.get("VSLICE_TLS_CERT") or None)
    k8s.add_argument("--tls-key", default=env.get("VSLICE_TLS_KEY") or None)
    k8s.add_argument(
        "--tls-client-ca",
        default=env.get("VSLICE_TLS_CLIENT_CA") or None,
        help="CA whose client certificates alone may call the extender: kube-scheduler's"
        " tlsConfig certFile/keyFile (env VSLICE_TLS_CLIENT_CA)",
    )
    k8s.add_argument(
        "--kube",
        action="store_true",
        default=connecting.env_flag(env, "VSLICE_KUBE"),
        help="talk to the Kubernetes API: in-cluster config, else $KUBECONFIG (env VSLICE_KUBE)",
    )
    k8s.add_argument(
        "--reservation-ttl",
        type=float,
        default=float(env.get("VSLICE_RESERVATION_TTL", "60") or 60),
        help="seconds a reservation waits for its bind (env VSLICE_RESERVATION_TTL)",
    )
    probes.add_arguments(parser, env)
    args = parser.parse_args(list(argv or []))
    if not 0 <= args.extender_port <= 65535:
        parser.error(f"--extender-port {args.extender_port}: must be 0-65535")
    if not args.reservation_ttl > 0:
        parser.error(f"--reservation-ttl {args.reservation_ttl}: must be above 0 seconds")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)")
    if args.extender_port and not _loopback(args.extender_host) and not args.tls_client_ca:
        # /filter reserves GPUs and /bind creates Bindings with the scheduler's cluster-wide
        # rights: off loopback only a caller with a certificate from the CA may reach them
        parser.error(
            f"--extender-host {args.extender_host}: an extender off loopback needs "
            "--tls-cert, --tls-key and --tls-client-ca (kube-scheduler's client certificate)"
        )
    if args.policy in ("fgd", "steer") and not args.workload_trace:
        parser.error(f"--policy {args.policy} needs --workload-trace (FGD's target workload)")
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
    name = args.name or Settings().name
    if args.seed.strip().lower() == "auto":
        seed = zlib.crc32(name.encode())
    else:
        try:
            seed = int(args.seed)
        except ValueError:
            parser.error(f"--seed {args.seed!r}: must be an integer or 'auto'")
    partition = _partition(parser, args, name)
    return Settings(
        bus=bus,
        policy=args.policy,
        workload_trace=args.workload_trace,
        seed=seed,
        replica_index=partition.index,
        replicas=partition.count,
        shard_epsilon=partition.epsilon,
        max_attempts=args.max_attempts,
        max_devices=args.max_devices,
        explain=not args.no_explain,
        claim_wait_s=args.claim_wait,
        max_in_flight=args.max_in_flight,
        log_level=args.log_level,
        extender_port=args.extender_port,
        extender_host=args.extender_host,
        tls_cert=args.tls_cert,
        tls_client_ca=args.tls_client_ca,
        tls_key=args.tls_key,
        kube=kubeclients.KubeSettings() if args.kube else None,
        reservation_ttl_s=args.reservation_ttl,
        health=probes.from_arguments(parser, args),
        **extra,
    )


def _partition(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str
) -> partitioning.Partition:
    """The replica's partition from its flags; ``parser.error`` (exit 2) names the flag
    and value when one is not a number or out of range. ``--replica-index auto``: the
    CRC-32 of ``name`` modulo ``--replica-count`` (replicas of a Deployment, whose names are
    random, may then share a shard)."""
    try:
        count = int(args.replica_count)
    except ValueError:
        parser.error(f"--replica-count {args.replica_count!r}: must be an integer")
    try:
        epsilon = float(args.shard_epsilon)
    except ValueError:
        parser.error(f"--shard-epsilon {args.shard_epsilon!r}: must be a number 0-1")
    if count < 1:
        parser.error(f"--replica-count {count}: must be >= 1")
    if args.replica_index.strip().lower() == "auto":
        index = zlib.crc32(name.encode()) % count
    else:
        try:
            index = int(args.replica_index)
        except ValueError:
            parser.error(f"--replica-index {args.replica_index!r}: must be an integer or 'auto'")
    try:
        return partitioning.Partition(index=index, count=count, epsilon=epsilon)
    except partitioning.PartitionError as exc:
        parser.error(f"--{exc.field.replace(' ', '-')} {exc.value!r}: {exc.reason}")


def _loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
