"""Admission on the bus: ``<prefix>.admission.review`` requests answered by the core.

The request body is an ``AdmissionReview`` (``{"type": "admission-review", "pod": {...}}``)
or the bare pod object; the reply is the ``PodRequest`` (untagged JSON), a ``Denial``, or a
``BusError`` for a body that is not a JSON object or is over ``events.MAX_REVIEW_BYTES``
(refused before decoding: the pod object is free-form, so its size is bounded by bytes).
A malformed message is logged and answered, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libshared import bounds, events
from libshared.resources import ResourceSettings
from libshared.subjects import ADMISSION_QUEUE, Subjects
from services.admission.core import reviewing

log = logging.getLogger("vslice.admission")

_BODY: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, Any])


def decode_pod(data: bytes) -> dict[str, Any]:
    """The pod object of a review request body (``AdmissionReview`` or bare pod).

    Raises ``ValueError`` naming what is wrong with the body, one over
    ``events.MAX_REVIEW_BYTES`` before it is decoded.
    """
    if len(data) > events.MAX_REVIEW_BYTES:
        raise ValueError(
            f"request of {len(data)} bytes is over {events.MAX_REVIEW_BYTES} (1 MiB);"
            " a pod object is far smaller"
        )
    try:
        body = _BODY.decode(data)
    except bounds.DECODE_ERRORS as exc:
        raise ValueError(f"request is not a JSON object: {exc}") from exc
    if body.get("type") == "admission-review":
        pod = body.get("pod")
        if not isinstance(pod, dict):
            raise ValueError("AdmissionReview.pod is not an object")
        return pod
    if "type" in body and body.get("kind") != "Pod":
        raise ValueError(f"unknown message type {body['type']!r}")
    return body


@dataclass
class Reviewer:
    """Serves ``admission.review`` in queue group ``admission``."""

    nc: Client
    subjects: Subjects
    resources: ResourceSettings
    reviewed: int = 0
    denied: int = 0
    errors: int = 0

    async def start(self) -> Subscription:
        """Subscribe; returns the subscription (it ends with the connection's drain)."""
        return await self.nc.subscribe(
            self.subjects.admission_review, queue=ADMISSION_QUEUE, cb=self.on_review
        )

    async def on_review(self, msg: Msg) -> None:
        """Review one request and reply (see the module docstring)."""
        reply: msgspec.Struct
        try:
            pod = decode_pod(msg.data)
        except ValueError as exc:
            self.errors += 1
            log.warning("malformed review request", extra={"error": str(exc)})
            reply = events.BusError(reason=str(exc))
        else:
            reply = reviewing.review(pod, settings=self.resources)
            self.reviewed += 1
            if isinstance(reply, events.Denial):
                self.denied += 1
                log.info(
                    "denied",
                    extra={"uid": reply.uid, "field": reply.field, "reason": reply.reason},
                )
        if msg.reply:
            try:
                await msg.respond(events.ENCODER.encode(reply))
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("reply failed", extra={"error": str(exc)})
