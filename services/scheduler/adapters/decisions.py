"""Decision lines: one structured log line per schedule decision, ledger conflict and release.

All go to the logger ``vslice.decisions`` at INFO, so an operator turns them down alone
with ``--log-level info,vslice.decisions=warning`` (``libshared.logs.parse_levels``).
Conflicts are at INFO too: with replicas active-active a lost compare-and-set is normal
but it is what explains a slow or ``Unschedulable`` answer, and each line names its pod,
so ``libshared.logs.Collapse`` does not fold them together. Every line has ``event``
(``schedule``, ``conflict``, ``release``), ``replica`` and ``latency_ms`` (milliseconds
since the request was taken in); the other fields:

- ``schedule``: ``pod`` (``namespace/name``), ``pod_uid``, ``policy`` (the replica's;
  ``node_policy``/``gpu_policy`` when the pod's annotations set them), ``outcome``
  (``placed`` or ``unschedulable``), and ``node`` with ``devices`` (per slice
  ``{uuid, container, memory_mib, cores_percent}``), or ``reason`` with ``reasons`` (per
  rejected node, HAMi's counted reasons);
- ``conflict``: ``pod``/``pod_uid`` of the request in hand (when there is one), ``node``
  and ``revision`` (the ledger revision the lost compare-and-set was made against);
- ``release``: ``pod_uid``, ``node`` (``null`` when the pod held nothing) and ``slices``.

The request in hand is found through a context variable set by ``taking`` at the door
(each request runs in its own task, so its variable is its own), which is what lets the
conflict line, written deep in the commit, name its pod. What it leaves to others: the
decisions themselves (``services.scheduler.core``) and the replica's protocol
(``services.scheduler.adapters.bus``), which only calls the functions here.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass

from libshared import events
from libshared.resources import PodRequest

log = logging.getLogger("vslice.decisions")


@dataclass(frozen=True)
class Request:
    """The request in hand: its pod (``None`` for a release) and when it was taken in
    (``time.monotonic()`` seconds)."""

    pod_uid: str
    pod: PodRequest | None
    started_s: float


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "vslice_decision_request", default=None
)


def taking(pod_uid: str, pod: PodRequest | None = None) -> Request:
    """Note the request for ``pod_uid`` as the one in hand for this task (its latency
    counts from now) and return it."""
    request = Request(pod_uid=pod_uid, pod=pod, started_s=time.monotonic())
    _current.set(request)
    return request


def _latency_ms(request: Request | None) -> float | None:
    if request is None:
        return None
    return round((time.monotonic() - request.started_s) * 1000.0, 3)


def _pod_name(pod: PodRequest) -> str:
    return f"{pod.namespace}/{pod.name or pod.uid}"


def decision_fields(
    pod: PodRequest, decision: events.Placement | events.Unschedulable, *, policy: str
) -> dict[str, object]:
    """The ``schedule`` line's fields for ``pod`` and its ``decision`` (no latency). Pure."""
    out: dict[str, object] = {
        "event": "schedule",
        "pod": _pod_name(pod),
        "pod_uid": pod.uid,
        "policy": policy,
    }
    if pod.node_policy:
        out["node_policy"] = pod.node_policy
    if pod.gpu_policy:
        out["gpu_policy"] = pod.gpu_policy
    if isinstance(decision, events.Placement):
        out["outcome"] = "placed"
        out["node"] = decision.node
        out["devices"] = [
            {
                "uuid": s.uuid,
                "container": s.container,
                "memory_mib": s.memory_mib,
                "cores_percent": s.cores_percent,
            }
            for s in decision.slices
        ]
    else:
        out["outcome"] = "unschedulable"
        out["reason"] = decision.reason
        out["reasons"] = dict(decision.node_reasons)
    return out


def scheduled(
    decision: events.Placement | events.Unschedulable,
    *,
    pod: PodRequest,
    policy: str,
    replica: str,
) -> None:
    """Write the ``schedule`` line of ``pod``'s ``decision`` (latency from ``taking``)."""
    if not log.isEnabledFor(logging.INFO):
        return  # turned down: the line is not even built
    fields = decision_fields(pod, decision, policy=policy)
    fields["replica"] = replica
    fields["latency_ms"] = _latency_ms(_current.get())
    log.info("schedule decision", extra=fields)


def conflict(*, node: str, revision: int, replica: str) -> None:
    """Write the ``conflict`` line: a compare-and-set on ``node``'s ledger against
    ``revision`` lost to another writer, while handling this task's request (if any)."""
    if not log.isEnabledFor(logging.INFO):
        return  # turned down: the line is not even built
    request = _current.get()
    fields: dict[str, object] = {
        "event": "conflict",
        "node": node,
        "revision": revision,
        "replica": replica,
    }
    if request is not None:
        fields["pod_uid"] = request.pod_uid
        if request.pod is not None:
            fields["pod"] = _pod_name(request.pod)
    fields["latency_ms"] = _latency_ms(request)
    log.info("ledger conflict", extra=fields)


def released(ack: events.Ack, *, replica: str) -> None:
    """Write the ``release`` line of ``ack`` (latency from ``taking``)."""
    if not log.isEnabledFor(logging.INFO):
        return  # turned down: the line is not even built
    log.info(
        "release",
        extra={
            "event": "release",
            "pod_uid": ack.pod_uid,
            "node": ack.node,
            "slices": ack.slices,
            "replica": replica,
            "latency_ms": _latency_ms(_current.get()),
        },
    )
