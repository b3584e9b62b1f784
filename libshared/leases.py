"""Leases of ``vslice run`` slices: a slice whose client stops renewing is released.

A ``vslice run`` client is the only thing that knows its slice is still wanted, and it
can die by SIGKILL without a word; nothing else would ever release that slice. So before
it asks for a slice the client puts a ``Lease`` under the pod's key in the
``<prefix>-leases`` bucket and puts it again every ``ttl_s / 3`` seconds; the scheduler
replicas watch the revisions (``services.scheduler.core.upkeeping``) and release the pod
of a lease whose revision has not changed for ``ttl_s`` seconds of their own clock (no
clock is compared across machines). Pods placed through Kubernetes have no lease and are
never released by this. The bucket keeps entries at most ``MAX_AGE_S`` (a lease renewed
every few seconds never gets that old), so what a crash leaves behind goes by itself.

What it leaves to others: renewing (``vslice.running``), releasing
(``services.scheduler.adapters.upkeep``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import tenacity
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from libshared import bounds, kvwrites
from libshared.connecting import BusSettings

DEFAULT_TTL_S = 15.0
MIN_TTL_S = 1.0
MAX_TTL_S = 30.0  # a dead client's slice is released within this (plus a check period)
MAX_AGE_S = 3600.0
MAX_BYTES = 4 << 20  # reserved on disk by nats-server: ~25,000 leases


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """The lease of pod ``pod_uid`` on ``node``: released when not renewed for ``ttl_s``
    seconds (bounded to ``MIN_TTL_S``-``MAX_TTL_S`` by whoever reads it); ``holder``
    names the client (``vslice run`` and its pid) for ``vslice status``. Names are
    bounded as ``libshared.bounds`` bounds them (a lease is a KV value)."""

    pod_uid: bounds.Uid
    node: Annotated[
        str, msgspec.Meta(max_length=bounds.MAX_NAME, pattern=r"^[A-Za-z0-9_=/-]*$")
    ] = ""
    ttl_s: float = DEFAULT_TTL_S
    holder: bounds.PodName = ""

    def bounded_ttl_s(self) -> float:
        """``ttl_s`` within ``MIN_TTL_S``-``MAX_TTL_S`` (a lease cannot ask for forever)."""
        return min(MAX_TTL_S, max(MIN_TTL_S, self.ttl_s))


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(Lease)


async def open_leases(
    js: JetStreamContext, settings: BusSettings, *, create: bool, wait_s: float = 10.0
) -> KeyValue:
    """The ``<prefix>-leases`` bucket; with ``create`` (scheduler and operator identities)
    made when missing (one history entry, entries at most ``MAX_AGE_S`` old, at most
    ``MAX_BYTES``), else waited for up to ``wait_s`` seconds.

    Raises ``BucketNotFoundError`` when, without ``create``, it is still missing then."""
    bucket = settings.subjects.leases_bucket

    async def opened() -> KeyValue:
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            if not create:
                raise
        else:
            if create:  # an ended lease's marker expires by its TTL (libshared.kvwrites)
                await kvwrites.allow_ttl(js, bucket)
            return kv
        # BadRequestError: created meanwhile by another, or with another config
        return await js.create_key_value(
            config=api.KeyValueConfig(
                bucket=bucket,
                history=1,
                ttl=MAX_AGE_S,
                max_bytes=MAX_BYTES,
                replicas=settings.replicas,
            )
        )

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type((BucketNotFoundError, BadRequestError)),
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_fixed(0.1),
        reraise=True,
    )
    return await retrying(opened)
