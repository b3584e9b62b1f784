"""NATS subject, stream and KV bucket names of the vslice bus, under one configurable prefix.

Every name a service publishes, subscribes or opens is built here, so two stacks (or two
tests) with different prefixes share one nats-server without seeing each other. The default
prefix ``vslice`` gives the names of ``ARCHITECTURE.md`` ("The bus"): subjects
``vslice.sched.schedule``, buckets ``vslice-nodes`` and ``vslice-ledger``. Pure data: no
connection is made here.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

DEFAULT_PREFIX = "vslice"
SCHEDULERS_QUEUE = "schedulers"
# Header a client puts on a schedule request: the wall-clock time (Unix seconds) after which
# it no longer waits for the answer and may re-send. A replica drops a copy past it, so a
# copy delayed behind a stall cannot place a pod its client has since re-sent or released.
# A request without it is given one at the door, and is kept from placing a released or
# refused pod by the claim's tombstone or refusal (services.scheduler.core.protocol).
DEADLINE_HEADER = "Vslice-Deadline"
ADMISSION_QUEUE = "admission"

# A prefix is one subject token that is also valid inside bucket and stream names.
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A node name must be one subject token and a valid KV key.
_NODE = re.compile(r"^[A-Za-z0-9_=/-]{1,253}$")
# A NATS KV key (nats.py's own check, less the dots we keep for subjects).
_KEY = re.compile(r"^[A-Za-z0-9_=/-]{1,200}$")


def valid_node(node: str) -> bool:
    """True when ``node`` can be a subject token and a KV key (no dots, wildcards, spaces)."""
    return bool(_NODE.match(node))


def pod_key(pod_uid: str) -> str:
    """The ``<prefix>-pods`` key of a pod UID: the UID itself when it is a valid KV key
    (Kubernetes UIDs are), else ``h-`` and the hex SHA-256 of its UTF-8 bytes."""
    if _KEY.match(pod_uid) and not pod_uid.startswith("h-"):
        return pod_uid
    return "h-" + hashlib.sha256(pod_uid.encode()).hexdigest()


class Subjects(msgspec.Struct, frozen=True, kw_only=True):
    """Names on the bus for one ``prefix`` (letters, digits, ``-`` and ``_``; 1-64 chars).

    Raises ``ValueError`` for any other prefix.
    """

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ValueError(
                f"prefix {self.prefix!r}: 1-64 letters, digits, '-' or '_' (it names subjects"
                " and buckets)"
            )

    # -- request/reply ------------------------------------------------------------------

    @property
    def admission_review(self) -> str:
        """Pod spec in, ``PodRequest`` or ``Denial`` out."""
        return f"{self.prefix}.admission.review"

    @property
    def sched_schedule(self) -> str:
        """``PodRequest`` in, ``Placement`` or ``Unschedulable`` out (queue ``schedulers``)."""
        return f"{self.prefix}.sched.schedule"

    @property
    def sched_release(self) -> str:
        """``Release`` in, ``Ack`` out (queue ``schedulers``)."""
        return f"{self.prefix}.sched.release"

    @property
    def sched_stats(self) -> str:
        """Empty request in, ``Stats`` out from every replica (no queue group)."""
        return f"{self.prefix}.sched.stats"

    # -- JetStream -----------------------------------------------------------------------

    @property
    def nodes_bucket(self) -> str:
        """KV bucket: key node, value ``NodeDevices``."""
        return f"{self.prefix}-nodes"

    @property
    def ledger_bucket(self) -> str:
        """KV bucket: key node, value ``NodeLedger``; every change a compare-and-set."""
        return f"{self.prefix}-ledger"

    @property
    def pods_bucket(self) -> str:
        """KV bucket: key ``pod_key(uid)``, value the pod's claim: the token of the replica
        request placing it, a release's tombstone or the last Unschedulable answer
        (``services.scheduler.core.protocol``).

        Created with ``kv.create`` before the ledger compare-and-set, so one pod UID is
        placed on one node even when replicas decide it at the same moment.
        """
        return f"{self.prefix}-pods"

    @property
    def leases_bucket(self) -> str:
        """KV bucket: key ``pod_key(uid)`` of a ``vslice run`` pod, value its ``Lease``;
        its client renews it, a scheduler replica releases the pod once it goes stale
        (``libshared.leases``). Pods placed through Kubernetes have none."""
        return f"{self.prefix}-leases"

    @property
    def quotas_bucket(self) -> str:
        """KV bucket: key ``pod_key(namespace)``, value its ``NamespaceQuota`` (limits on
        GPU memory and cores, and the charge of each pod holding slices there); every
        change a compare-and-set (``libshared.quotas``)."""
        return f"{self.prefix}-quotas"

    @property
    def alloc_stream(self) -> str:
        """JetStream stream holding every ``<prefix>.alloc.>`` message."""
        return f"{self.prefix}-alloc"

    @property
    def alloc_all(self) -> str:
        """Wildcard subject of the allocation stream."""
        return f"{self.prefix}.alloc.>"

    def alloc_decided(self, node: str) -> str:
        """``Placement`` for ``node``, published by the scheduler after its commit."""
        return f"{self.prefix}.alloc.{node}.decided"

    def alloc_released(self, node: str) -> str:
        """``Release`` of a pod on ``node``, published by the scheduler after its commit."""
        return f"{self.prefix}.alloc.{node}.released"

    def alloc_ready(self, node: str) -> str:
        """``Ready``: the node agent prepared the slice."""
        return f"{self.prefix}.alloc.{node}.ready"

    def alloc_failed(self, node: str) -> str:
        """``Failed``: the node agent could not prepare the slice."""
        return f"{self.prefix}.alloc.{node}.failed"

    def node_registered(self, node: str) -> str:
        """``NodeDevices`` announcement of a node agent (core NATS, informational)."""
        return f"{self.prefix}.node.{node}.registered"

    def node_slice(self, node: str) -> str:
        """Request/reply served by the node agent of ``node``: ``SliceQuery`` in, the pod's
        ``Ready`` or ``Failed`` out once its slice is prepared (``vslice run`` waits here:
        it reads its own answer and no one else's)."""
        return f"{self.prefix}.node.{node}.slice"

    def usage(self, node: str) -> str:
        """``NodeUsage`` of a node (core NATS)."""
        return f"{self.prefix}.usage.{node}"

    # -- health --------------------------------------------------------------------------

    def health(self, identity: str, instance: str) -> str:
        """``Heartbeat`` of service ``instance`` connected as ``identity`` (core NATS,
        kept last per subject by ``health_stream``; ``libshared.heartbeats``)."""
        return f"{self.prefix}.health.{identity}.{instance}"

    @property
    def health_all(self) -> str:
        """Wildcard subject of every heartbeat."""
        return f"{self.prefix}.health.>"

    @property
    def health_stream(self) -> str:
        """JetStream stream keeping the last heartbeat of each ``health`` subject."""
        return f"{self.prefix}-health"


def deadline_headers(timeout_s: float, *, now: float) -> dict[str, str]:
    """Headers for a request the client waits ``timeout_s`` seconds for, sent at ``now``."""
    return {DEADLINE_HEADER: f"{now + timeout_s:.3f}"}


def deadline_of(headers: dict[str, str] | None) -> float | None:
    """The request's deadline (Unix seconds), or None when it has none or it is malformed."""
    raw = (headers or {}).get(DEADLINE_HEADER)
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None
