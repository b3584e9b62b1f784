"""Who may publish and subscribe what on the bus: one permission set per role.

The bus carries what HAMi keeps behind the Kubernetes API server (allocations in pod
annotations, registrations in node annotations, both behind RBAC), so every process
connects as an identity of one role and nats-server enforces what the role may do
(``ARCHITECTURE.md``, "Trust and failure boundaries"). This module is the one place the
roles are written down, as data: ``permissions(role, ...)`` returns the subjects a role
may publish and subscribe, for one bus prefix; ``libshared.trust`` renders them into the
server's ``authorization`` block. Pure: no file, no connection.

JetStream is reached through subjects too, which is where this gets subtle:

- a KV write (put, create, update, delete, purge) is a publish to ``$KV.<bucket>.<key>``,
  so a grant on one key lets an identity write that key and no other; a direct get names
  the key too (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``), so a node agent
  reads back its own registration and no other node's;
- reading a whole bucket is a JetStream API request naming only the bucket's stream
  (``$JS.API.STREAM.MSG.GET.KV_<bucket>``, direct gets), and a watch creates an
  ephemeral ordered consumer on it (``$JS.API.CONSUMER.CREATE.KV_<bucket>...``) whose flow
  control is answered on ``$JS.FC.KV_<bucket>.>``: reading a bucket is granted whole;
- creating a stream or bucket (``$JS.API.STREAM.CREATE.<stream>``) is the scheduler's
  and the operator's alone; every other role opens what exists and waits for it;
- anything not granted (``$JS.API.STREAM.DELETE``, ``PURGE``, other buckets, other
  nodes' subjects) is refused by the server with a permissions violation.

Replies travel on each identity's own inbox prefix (``inbox_prefix``): an identity may
subscribe to its own inbox only, so no one reads another's answers. Services that answer
requests (admission, scheduler replicas, the node agent) publish their replies through
``allow_responses`` (only to the reply subject of a request they received).

Roles (``Role``): ``admission``, ``scheduler``, ``nodeagent`` (one node, or ``*`` for a
mock agent hosting a whole replay fleet), ``metrics`` (read-only), ``cli`` (``vslice run``
and replays: schedule and release requests, its own answers, node registrations to pin a
run to its node, writing a run's lease), ``operator`` (everything: repair and debugging).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from libshared.subjects import ADMISSION_QUEUE, SCHEDULERS_QUEUE, Subjects, valid_node

__all__ = [
    "ADMISSION_QUEUE",
    "SCHEDULERS_QUEUE",
    "Permissions",
    "Role",
    "inbox_prefix",
    "permissions",
]

ANY_NODE = "*"
_IDENTITY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


class Role(enum.StrEnum):
    """The roles of bus identities (see the module docstring)."""

    ADMISSION = "admission"
    SCHEDULER = "scheduler"
    NODEAGENT = "nodeagent"
    METRICS = "metrics"
    CLI = "cli"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Permissions:
    """What one identity may do: subjects it may ``publish`` and ``subscribe`` (NATS
    wildcards allowed), and whether it may answer requests it received
    (``allow_responses``)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def inbox_prefix(identity: str) -> str:
    """The inbox prefix of ``identity`` (``_INBOX_<identity>``): its request replies and
    JetStream deliveries arrive below it, and only it may subscribe there.

    Raises ``ValueError`` for an identity that is not 1-200 letters, digits, ``-``, ``_``.
    """
    if not _IDENTITY.match(identity):
        raise ValueError(f"identity {identity!r}: 1-200 letters, digits, '-' or '_'")
    return f"_INBOX_{identity}"


def _kv_read(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _kv_write(bucket: str) -> list[str]:
    return [*_kv_read(bucket), f"$KV.{bucket}.>"]


def _kv_own_key(bucket: str, key: str) -> list[str]:
    # only this key, to write and to read back (a direct get names the key's subject)
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{key}",
        f"$KV.{bucket}.{key}",
    ]


def _create(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]


def _durable(stream: str, durable: str) -> list[str]:
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def agent_durable(node: str) -> str:
    """The durable consumer of the node agent of ``node`` on the allocation stream:
    ``nodeagent-<node>``; for ``ANY_NODE`` the token wildcard ``*`` (any consumer)."""
    return "*" if node == ANY_NODE else f"nodeagent-{node}"


def permissions(role: Role, *, subjects: Subjects, identity: str, node: str = "") -> Permissions:
    """The permissions of ``identity`` in ``role`` on the bus of ``subjects.prefix``.

    ``node``: for ``Role.NODEAGENT`` the one node the agent answers for (its registration
    key, its subjects, its durable consumer ``nodeagent-<node>``), or ``ANY_NODE`` for a
    mock agent hosting a replay's fleet. Raises ``ValueError`` for a node agent without a
    valid node, or a node given to another role.
    """
    s = subjects
    p = s.prefix
    inbox = f"{inbox_prefix(identity)}.>"
    # its heartbeats, under its own identity only (``libshared.heartbeats``)
    beat = s.health(identity, "*")
    if role is Role.NODEAGENT:
        if not (node == ANY_NODE or valid_node(node)):
            raise ValueError(f"node {node!r}: a node agent identity needs its node name")
    elif node:
        raise ValueError(f"node {node!r}: only a node agent identity names a node")
    if role is Role.OPERATOR:
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    if role is Role.ADMISSION:
        return Permissions(
            publish=(s.sched_schedule, s.sched_release, beat),
            subscribe=(s.admission_review, inbox),
            allow_responses=True,
        )
    if role is Role.SCHEDULER:
        return Permissions(
            publish=(
                *_kv_write(s.ledger_bucket),
                *_kv_write(s.pods_bucket),
                *_kv_read(s.nodes_bucket),
                *_kv_write(s.leases_bucket),
                *_create(f"KV_{s.leases_bucket}"),
                *_kv_write(s.quotas_bucket),
                *_create(f"KV_{s.quotas_bucket}"),
                # purging old delete markers of claims and leases (``adapters.upkeep``)
                f"$JS.API.STREAM.PURGE.KV_{s.pods_bucket}",
                f"$JS.API.STREAM.PURGE.KV_{s.leases_bucket}",
                *_create(f"KV_{s.ledger_bucket}"),
                *_create(f"KV_{s.pods_bucket}"),
                *_create(f"KV_{s.nodes_bucket}"),
                *_create(s.alloc_stream),
                f"$JS.API.STREAM.INFO.{s.alloc_stream}",
                *_create(s.health_stream),
                f"$JS.API.STREAM.INFO.{s.health_stream}",
                s.alloc_decided("*"),
                s.alloc_released("*"),
                s.sched_stats,
                beat,
            ),
            subscribe=(s.sched_schedule, s.sched_release, s.sched_stats, inbox),
            allow_responses=True,
        )
    if role is Role.NODEAGENT:
        return Permissions(
            publish=(
                *_kv_own_key(s.nodes_bucket, node),
                *_kv_read(s.ledger_bucket),
                f"$JS.API.STREAM.INFO.KV_{s.pods_bucket}",
                *_durable(s.alloc_stream, agent_durable(node)),
                s.alloc_ready(node),
                s.alloc_failed(node),
                s.usage(node),
                s.node_registered(node),
                beat,
            ),
            subscribe=(f"{p}.node.{node}.>", inbox),
            allow_responses=True,
        )
    if role is Role.METRICS:
        return Permissions(
            publish=(
                *_kv_read(s.nodes_bucket),
                *_kv_read(s.ledger_bucket),
                *_kv_read(s.pods_bucket),
                *_kv_read(s.quotas_bucket),
                s.sched_stats,
                beat,
            ),
            subscribe=(
                s.usage("*"),
                s.sched_schedule,
                s.alloc_decided("*"),
                s.node_registered("*"),
                inbox,
            ),
        )
    if role is Role.CLI:
        return Permissions(
            publish=(
                s.admission_review,
                s.sched_schedule,
                s.sched_release,
                s.sched_stats,
                s.node_slice("*"),
                *_kv_read(s.nodes_bucket),
                # its runs' leases: put and delete a key, no reading of others' leases
                f"$JS.API.STREAM.INFO.KV_{s.leases_bucket}",
                f"$KV.{s.leases_bucket}.*",
            ),
            subscribe=(inbox,),
        )
    raise ValueError(f"role {role!r}: unknown")  # pragma: no cover - enum is closed
