"""The metrics service's view of ``<prefix>-quotas``: every namespace's quota value, for
``hami_resource_quota_used`` / ``_limit``.

The scheduler replicas create the bucket; until one has, the feed waits for it in the
background (the quota families have no series meanwhile). Then it watches every key from
its last value; a value that does not decode is logged, counted in
``vslice_metrics_rejected_messages_total{source="quota"}`` and left out.

What it leaves to others: the series (``services.metrics.core.quotas``), the bucket's
values and their rules (``libshared.quotas``, the scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from prometheus_client import Counter

from libshared import quotas as schema
from libshared import tasks, watching
from libshared.subjects import Subjects
from services.metrics.core import exporting
from services.metrics.core import quotas as series

log = logging.getLogger("vslice.metrics")
RETRY_S = 2.0  # pause before opening the bucket or watching it again


@dataclass
class QuotaFeed:
    """Keeps ``values`` (key -> ``NamespaceQuota``) from the bucket (see the module
    docstring); ``rejected``: the counter of undecodable values (label ``source``)."""

    js: JetStreamContext
    subjects: Subjects
    rejected: Counter | None = None
    values: dict[str, schema.NamespaceQuota] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def series(self) -> list[exporting.Quota]:
        """The quota families' series as the bucket is now (``ViewCollector.quotas``)."""
        return series.series(self.values.values())

    def start(self) -> None:
        """Watch in the background until ``stop()``; ``ready`` is set once the bucket's
        content was read."""
        self._task = asyncio.create_task(self._run(), name="vslice-metrics-quotas")

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            await tasks.stop(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.js.key_value(self.subjects.quotas_bucket)  # raises until created
                await self._follow()
            except BucketNotFoundError:
                pass  # no replica created it yet
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("quota watch failed", extra={"error": str(exc)})
            await asyncio.sleep(RETRY_S)

    async def _follow(self) -> None:
        # libshared.watching, not kv.watchall(): the latter's "content read" marker can
        # come before the content on a loaded machine (libshared.kvreads)
        def handle(key: str, value: bytes | None, revision: int) -> None:
            if not value:  # deleted or purged
                self.values.pop(key, None)
                return
            try:
                self.values[key] = schema.DECODER.decode(value)
            except msgspec.MsgspecError as exc:
                self.values.pop(key, None)
                if self.rejected is not None:
                    self.rejected.labels(source="quota").inc()
                log.error("rejected", extra={"source": "quota", "key": key, "error": str(exc)})

        sub = await watching.watch(self.js, self.subjects.quotas_bucket, handle, self.ready)
        try:
            await asyncio.Event().wait()  # until stop() cancels the task
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
