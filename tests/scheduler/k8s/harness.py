"""Scheduler replicas with the extender and the Kubernetes side, run in the test's
process, and the calls kube-scheduler makes to them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from libshared import connecting, kubeclients
from libshared.connecting import BusSettings
from libshared.resources import ResourceSettings
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus, extender, kube, quotas
from services.scheduler.settings import Settings


@dataclass
class Served:
    """One replica: its bus side, Kubernetes side, routes and extender URL."""

    replica: bus.Replica
    kube: kube.Kube
    routes: extender.Extender
    url: str


@contextlib.asynccontextmanager
async def replicas(
    settings: BusSettings,
    api_url: str,
    count: int = 1,
    *,
    ttl_s: float = 60.0,
    sweep_s: float | None = None,
    max_body_bytes: int = extender.MAX_BODY_BYTES,
    events_interval_s: float = 30.0,
    quota: bool = False,
    resources: ResourceSettings | None = None,
) -> AsyncIterator[list[Served]]:
    """``count`` replicas, each with its own NATS connection, API client and extender port;
    they start one after the other (each reconciles the ledger with the pods first).
    With ``quota`` each enforces namespace quotas from the ResourceQuotas it watches."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(count):
            nc = await connecting.connect(settings, name=f"x{i}")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            s = Settings(bus=settings, name=f"x{i}")
            replica = bus.Replica(
                nc=nc,
                js=js,
                bus=await connecting.ensure_bus(js, settings),
                subjects=settings.subjects,
                scheduler=scheduler_app.build_scheduler(s),
                name=s.name,
            )
            if quota:
                gate = quotas.QuotaGate(kv=await quotas.open_quotas(js, settings, create=True))
                await gate.watch()
                stack.push_async_callback(gate.close)
                replica.quotas = gate
            await replica.start()
            api = await kubeclients.api_client(kubeclients.KubeSettings(host=api_url))
            stack.push_async_callback(api.close)
            if replica.quotas is not None:
                watched = quotas.QuotaWatch(
                    api=api,
                    gate=replica.quotas,
                    ledger_view=lambda replica=replica: replica.view.cluster.ledgers,
                )
                await watched.start()
                stack.push_async_callback(watched.stop)
            side = kube.Kube(
                api=api,
                replica=replica,
                ttl_s=ttl_s,
                sweep_s=sweep_s,
                events_interval_s=events_interval_s,
                resources=resources or ResourceSettings(),
            )
            await side.start()
            stack.push_async_callback(side.stop)
            routes = extender.Extender(
                replica=replica, kube=side, max_body_bytes=max_body_bytes, resources=resources
            )
            runner, port = await extender.serve(routes, host="127.0.0.1", port=0)
            stack.push_async_callback(runner.cleanup)
            routes.ready = True
            out.append(
                Served(replica=replica, kube=side, routes=routes, url=f"http://127.0.0.1:{port}")
            )
        yield out


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (JSON, or bytes as they are) and return the status and JSON answer."""
    data = body if isinstance(body, bytes) else None
    async with session.post(url, json=None if data is not None else body, data=data) as resp:
        return resp.status, await resp.json(content_type=None)


async def filter_pod(
    session: aiohttp.ClientSession, base: str, pod: dict[str, Any], nodes: list[str]
) -> dict[str, Any]:
    """kube-scheduler's filter call with ``nodeCacheCapable`` (node names only)."""
    status, answer = await post(session, f"{base}/filter", {"Pod": pod, "NodeNames": nodes})
    assert status == 200, answer
    return answer


async def bind_pod(
    session: aiohttp.ClientSession, base: str, pod: dict[str, Any], node: str
) -> str:
    """kube-scheduler's bind call; returns the answer's ``Error``."""
    meta = pod["metadata"]
    status, answer = await post(
        session,
        f"{base}/bind",
        {
            "PodName": meta["name"],
            "PodNamespace": meta["namespace"],
            "PodUID": meta["uid"],
            "Node": node,
        },
    )
    assert status == 200, answer
    return str(answer.get("Error", ""))


async def create_pod(
    session: aiohttp.ClientSession, api_url: str, pod: dict[str, Any]
) -> dict[str, Any]:
    """Create ``pod`` through the API server; returns the stored object."""
    ns = pod["metadata"].get("namespace", "default")
    status, stored = await post(session, f"{api_url}/api/v1/namespaces/{ns}/pods", pod)
    assert status in (200, 201), stored
    return stored


async def eventually(
    check: Callable[[], bool], *, timeout_s: float = 10.0, what: str = ""
) -> float:
    """Wait until ``check()`` is true; returns the seconds it took. Fails after
    ``timeout_s`` (a generous deadline: this is a wait, not a speed assertion)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start
