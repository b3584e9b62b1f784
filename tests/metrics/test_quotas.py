"""The quota families from the ``<prefix>-quotas`` bucket: ``hami_resource_quota_used``
and ``hami_resource_quota_limit`` with HAMi's labels, per namespace and resource, read by
the metrics identity from a bucket the scheduler creates after the service started."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from libshared import connecting
from libshared import quotas as schema
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from libshared.subjects import pod_key
from services.metrics.adapters import quotas as feeding
from services.metrics.adapters.http import ViewCollector
from services.metrics.core import exporting
from services.metrics.core import quotas as series
from services.metrics.core.views import FleetView
from services.scheduler.adapters import quotas as scheduling
from tests.metrics.promtext import samples

TEAM_A = schema.NamespaceQuota(
    namespace="team-a",
    memory_mib=8000,
    charges=(
        schema.QuotaCharge(pod_uid="p1", memory_mib=4000, cores_percent=10),
        schema.QuotaCharge(pod_uid="p2", memory_mib=2000, cores_percent=30),
    ),
)
TEAM_B = schema.NamespaceQuota(namespace="team-b", cores_percent=0)


def test_each_namespace_reports_both_resources_and_a_limit_only_where_one_is_set() -> None:
    assert series.series([TEAM_B, TEAM_A]) == [
        exporting.Quota("team-a", "nvidia.com/gpumem", used=6000.0, limit=8000.0),
        exporting.Quota("team-a", "nvidia.com/gpucores", used=40.0, limit=0.0, limit_set=False),
        exporting.Quota("team-b", "nvidia.com/gpumem", used=0.0, limit=0.0, limit_set=False),
        exporting.Quota("team-b", "nvidia.com/gpucores", used=0.0, limit=0.0),
    ]


async def test_the_metrics_service_exports_the_quotas_bucket_with_hamis_labels(
    nats_server: NatsServer, prefix: str, bus_settings: BusSettings
) -> None:
    metrics = nats_server.identity(f"metrics-{prefix}", Role.METRICS, prefix=prefix)
    reader = await connecting.connect(metrics, name="metrics")
    operator = await connecting.connect(bus_settings, name="operator")
    feed = feeding.QuotaFeed(js=reader.jetstream(), subjects=metrics.subjects)
    try:
        feed.start()  # before the bucket exists: it waits for it
        kv = await scheduling.open_quotas(operator.jetstream(), bus_settings, create=True)
        await kv.put(pod_key("team-a"), schema.ENCODER.encode(TEAM_A))
        await kv.put(pod_key("team-b"), b"{not json")
        async with asyncio.timeout(30):
            await feed.ready.wait()
            while "team-a" not in {v.namespace for v in feed.values.values()}:
                await asyncio.sleep(0.02)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            ViewCollector(view=FleetView(), usage_ttl_s=30, stats_ttl_s=30, quotas=feed.series)
        )
        text = generate_latest(registry).decode()
        used = samples(text, "hami_resource_quota_used")
        limit = samples(text, "hami_resource_quota_limit")
        zone = ("zone", "vGPU")
        assert used == {
            frozenset(
                {
                    ("namespace", "team-a"),
                    ("quota_name", "nvidia.com/gpumem"),
                    ("limit", "8000"),
                    zone,
                }
            ): 6000.0,
            frozenset(
                {
                    ("namespace", "team-a"),
                    ("quota_name", "nvidia.com/gpucores"),
                    ("limit", "0"),
                    zone,
                }
            ): 40.0,
        }
        assert limit == {
            frozenset({("namespace", "team-a"), ("quota_name", "nvidia.com/gpumem"), zone}): 8000.0
        }
        # a charge given back shows at the next scrape; a deleted value drops its series
        await kv.put(
            pod_key("team-a"),
            schema.ENCODER.encode(schema.NamespaceQuota(namespace="team-a", memory_mib=8000)),
        )
        async with asyncio.timeout(30):
            while feed.series()[0].used != 0.0:
                await asyncio.sleep(0.02)
        await kv.delete(pod_key("team-a"))
        async with asyncio.timeout(30):
            while feed.series():
                await asyncio.sleep(0.02)
    finally:
        await feed.stop()
        await reader.close()
        await operator.close()
