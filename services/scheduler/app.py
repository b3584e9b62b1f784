"""Wiring of one scheduler replica: connect, open the buckets, build the core, serve, drain.

Lifecycle (nats.py's habit): SIGTERM or SIGINT sets an ``asyncio.Event``; the replica then
drains its connection -- no new requests, the ones in hand answered -- within the drain
timeout, and returns. With ``--kube`` the replica first reconciles the ledger with the
pods (restart recovery) and then watches them; with ``--extender-port`` it serves the
kube-scheduler extender once that is done. Its upkeep (``adapters.upkeep``) releases the
slices of ``vslice run`` clients whose lease went stale and deletes orphan claims; its
quota upkeep keeps the namespaces' quota charges in step with the ledger, and with
``--kube`` the cluster's ResourceQuotas set the namespaces' limits (``adapters.quotas``).
Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors

from libshared import connecting, kubeclients, probes, tlsfiles, traces
from libshared import leases as leasing
from services.scheduler.adapters import bus, extender, kube, quotas, upkeep
from services.scheduler.core import partitioning, replaying
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler
from services.scheduler.settings import Settings

log = logging.getLogger("vslice.scheduler")
TLS_RELOAD_S = 60.0  # how often the extender's certificate files are checked for renewal


def build_scheduler(settings: Settings) -> Scheduler:
    """The core scheduler for ``settings`` over an empty view (reads the workload trace
    for ``fgd``). Raises ``OSError``/``TraceFormatError`` for an unreadable trace."""
    workload = None
    if settings.workload_trace:
        workload = replaying.trace_workload(traces.read_pods(settings.workload_trace))
    cluster = Cluster(max_devices=settings.max_devices)
    partition = partitioning.Partition(
        index=settings.replica_index, count=settings.replicas, epsilon=settings.shard_epsilon
    )
    return Scheduler(
        cluster,
        policy=settings.policy,
        workload=workload,
        seed=settings.seed,
        partition=partition,
    )


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run a replica until ``stop`` is set; without one, until SIGTERM/SIGINT. Raises
    ``connecting.BusClosedError`` once drained when its connection closed for good."""
    stop = connecting.stop_on_signals(stop)
    scheduler = build_scheduler(settings)
    # /readyz: 503 until connected, the buckets open, the view read and Kubernetes
    # reconciled; then while connected and the ledger watch is current
    health = probes.Probes()
    served = contextlib.AsyncExitStack()
    await probes.serving(health, settings.health, served)
    try:
        conn = await connecting.connect_service(
            settings.bus, name=settings.name, service="scheduler", stop=stop
        )
    except BaseException:
        await served.aclose()
        raise
    nc = conn.nc
    health.ready_when("nats", probes.connected(nc))
    try:
        js = nc.jetstream(timeout=settings.bus.request_timeout_s)
        opened = await connecting.ensure_bus(js, settings.bus)
        gate = quotas.QuotaGate(kv=await quotas.open_quotas(js, settings.bus, create=True))
        await gate.watch()
        replica = bus.Replica(
            nc=nc,
            js=js,
            bus=opened,
            subjects=settings.bus.subjects,
            scheduler=scheduler,
            name=settings.name,
            max_attempts=settings.max_attempts,
            explain=settings.explain,
            sync_timeout_s=settings.sync_timeout_s,
            claim_wait_s=settings.claim_wait_s,
            max_in_flight=settings.max_in_flight,
            quotas=gate,
        )
        await replica.start()
        ledger_stream = f"KV_{settings.bus.subjects.ledger_bucket}"
        health.ready_when(
            "ledger watch",
            probes.WatchCurrent(js=js, stream=ledger_stream, seen=lambda: replica.seen_seq),
        )
        leases = await leasing.open_leases(js, settings.bus, create=True)
        upkept = upkeep.Upkeep(replica=replica, leases=leases, claims=opened.pods)
        upkept.start()
        quota_upkeep = quotas.QuotaUpkeep(
            gate=gate, claims=opened.pods, ledger_view=replica.ledgers
        )
        quota_upkeep.start()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(upkept.stop)
            stack.push_async_callback(quota_upkeep.stop)
            await _kubernetes(settings, replica, stack)
            health.started()
            log.info(
                "scheduler serving", extra={"replica": settings.name, "policy": settings.policy}
            )
            await stop.wait()
            health.stopping()
            log.info("draining", extra={"replica": settings.name})
        await replica.stop()
        await gate.close()
    except (nats.errors.Error, TimeoutError):
        await conn.lifeline.verdict()  # a connection lost for good exits as such
        raise
    finally:
        await conn.close()
        await served.aclose()
    log.info("stopped", extra={"replica": settings.name})
    conn.lifeline.check()


async def _kubernetes(
    settings: Settings, replica: bus.Replica, stack: contextlib.AsyncExitStack
) -> None:
    """Start the Kubernetes side and the extender as ``settings`` ask; their shutdown goes
    on ``stack``. Raises ``KubeConfigError`` / ``OSError`` when they cannot start."""
    side = None
    if settings.kube is not None:
        api = await kubeclients.api_client(settings.kube)
        stack.push_async_callback(api.close)
        side = kube.Kube(
            api=api,
            replica=replica,
            ttl_s=settings.reservation_ttl_s,
            request_timeout_s=settings.kube.request_timeout_s,
            resources=settings.resources,
        )
        await side.start()
        stack.push_async_callback(side.stop)
        if replica.quotas is not None:
            watched = quotas.QuotaWatch(
                api=api,
                gate=replica.quotas,
                ledger_view=replica.ledgers,
                request_timeout_s=settings.kube.request_timeout_s,
            )
            await watched.start()
            stack.push_async_callback(watched.stop)
        log.info("pods reconciled", extra={"api": kubeclients.describe(settings.kube)})
    if settings.extender_port:
        tls = None
        if settings.tls_cert and settings.tls_key:
            reloading = tlsfiles.ReloadingContext(
                cert=settings.tls_cert, key=settings.tls_key, client_ca=settings.tls_client_ca
            )
            tls = reloading.context
            watch = asyncio.create_task(reloading.watch(TLS_RELOAD_S), name="tls-reload")
            stack.callback(watch.cancel)
        routes = extender.Extender(replica=replica, kube=side, resources=settings.resources)
        runner, port = await extender.serve(
            routes, host=settings.extender_host, port=settings.extender_port, tls=tls
        )
        stack.push_async_callback(runner.cleanup)
        routes.ready = True
        log.info("extender serving", extra={"port": port, "tls": tls is not None})
