"""kube-scheduler as vslice's extender sees it: every pod of the ``vslice-scheduler``
profile that is not bound goes to ``/filter`` (node names only: ``nodeCacheCapable``) and
then to ``/bind``; the calls are spread over the extender replicas the way a Service
spreads them, and a pod that failed is tried again after a pause (kube-scheduler's
backoff queue). It follows the pods with a watch on the API server, as kube-scheduler's
informer does. kube-scheduler's own filters and scores are left out: every node is a
candidate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROFILE = "vslice-scheduler"


@dataclass
class FakeKubeScheduler:
    """``api_url``: the API server; ``extenders``: the replicas' base URLs; ``nodes``: the
    candidate node names; ``workers``: pods in flight at once; ``retry_s``: pause before a
    failed pod is tried again; ``tls``: the extender's CA and kube-scheduler's client
    certificate (its ``tlsConfig``) for ``https://`` extenders. ``attempts`` counts
    filter calls per replica URL, ``errors`` keeps the last error per pod name."""

    api_url: str
    extenders: Sequence[str]
    nodes: Sequence[str]
    workers: int = 4
    retry_s: float = 0.1
    tls: ssl.SSLContext | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _seen: set[str] = field(default_factory=set)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._tasks = [asyncio.create_task(self._watch())]
        self._tasks += [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _watch(self) -> None:
        assert self._session is not None
        url = f"{self.api_url}/api/v1/pods?watch=true"
        async with self._session.get(url) as resp:
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                pod = event.get("object") or {}
                if event.get("type") not in ("ADDED", "MODIFIED"):
                    continue
                spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
                if spec.get("schedulerName") != PROFILE or spec.get("nodeName"):
                    continue
                if meta.get("uid") in self._seen:
                    continue
                self._seen.add(meta["uid"])
                self._queue.put_nowait(pod)

    def _replica(self) -> str:
        return self.extenders[next(self._turn) % len(self.extenders)]

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.post(url, json=body, ssl=self.tls or True) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {answer}")
            return answer

    async def _work(self) -> None:
        while True:
            pod = await self._queue.get()
            meta = pod["metadata"]
            try:
                node = await self._schedule(pod)
            except Exception as exc:  # kept for the test's report; tried again
                node, self.errors[meta["name"]] = None, str(exc)
            if node is None:
                await asyncio.sleep(self.retry_s)
                self._queue.put_nowait(pod)

    async def _schedule(self, pod: dict[str, Any]) -> str | None:
        meta = pod["metadata"]
        replica = self._replica()
        self.attempts[replica] = self.attempts.get(replica, 0) + 1
        answer = await self._post(f"{replica}/filter", {"Pod": pod, "NodeNames": list(self.nodes)})
        if answer.get("Error") or not answer.get("NodeNames"):
            self.errors[meta["name"]] = answer.get("Error") or str(answer.get("FailedNodes"))
            return None
        (node,) = answer["NodeNames"]
        bound = await self._post(
            f"{self._replica()}/bind",
            {
                "PodName": meta["name"],
                "PodNamespace": meta["namespace"],
                "PodUID": meta["uid"],
                "Node": node,
            },
        )
        if bound.get("Error"):
            self.errors[meta["name"]] = bound["Error"]
            return None
        return str(node)
