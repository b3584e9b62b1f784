"""Reviewing a pod: the resource model applied, or a denial naming the field and value.

Pure: no I/O, no logging. The same function serves the NATS handler of local mode and,
later, the Kubernetes MutatingAdmissionWebhook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from libshared import events
from libshared.errors import InvalidRequest
from libshared.resources import PodRequest, ResourceSettings, parse_pod

VALUE_CHARS = 200  # a denial quotes at most this much of the offending value


def _uid(pod: object) -> str:
    if isinstance(pod, Mapping):
        meta = pod.get("metadata")
        if isinstance(meta, Mapping):
            return str(
                meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
            )
    return ""


def review(pod: Mapping[str, Any], *, settings: ResourceSettings) -> PodRequest | events.Denial:
    """The pod's normalized ``PodRequest`` by HAMi's rules (``libshared.resources``), or a
    ``Denial`` naming the container, field and value that ``parse_pod`` rejected, or
    ``spec.containers`` for a pod without containers (HAMi's webhook denies it: ``Handle``,
    "pod has no containers")."""
    try:
        request = parse_pod(pod, settings=settings, admission=True)
        if not any(not c.init for c in request.containers):
            raise InvalidRequest(
                container="", field="spec.containers", value=[], reason="pod has no containers"
            )
        return request
    except InvalidRequest as exc:
        value = repr(exc.value) if not isinstance(exc.value, str) else exc.value
        return events.Denial(
            uid=_uid(pod),
            container=exc.container,
            field=exc.field,
            value=value[:VALUE_CHARS],
            reason=exc.reason,
        )
