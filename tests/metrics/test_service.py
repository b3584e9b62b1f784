"""The metrics service on a real bus: after a small replay every ledger slice is in
``/metrics`` with HAMi's labels and the ledger's values, released slices disappear, a
restart rebuilds everything from the buckets, and a ``NodeUsage`` report shows up in
``hami_vgpu_memory_used_bytes``."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from libshared import connecting, events
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from services.metrics.adapters import http
from services.metrics.core.views import FleetView
from tests.bus import helpers
from tests.bus.conftest import repo_root
from tests.metrics import fixtures as fx
from tests.metrics import stack
from tests.metrics.promtext import labelled, samples

MIB = 1024 * 1024


def expected_slices(ledgers: dict[str, NodeLedger]) -> dict[frozenset[tuple[str, str]], float]:
    """``hami_vgpu_memory_allocated_bytes`` as the ledger says it must read."""
    out: dict[frozenset[tuple[str, str]], float] = {}
    for node, ledger in ledgers.items():
        for s in ledger.slices:
            labels = {
                "namespace": s.namespace,
                "node": node,
                "pod": s.pod,
                "container_index": str(s.container_index),
                "device_uuid": s.uuid,
                "zone": "vGPU",
            }
            out[frozenset(labels.items())] = s.memory_mib * MIB
    return out


def expected_devices(ledgers: dict[str, NodeLedger]) -> dict[str, float]:
    """Device UUID -> ``hami_gpu_memory_allocated_bytes`` as the ledger says."""
    out: dict[str, float] = {}
    for ledger in ledgers.values():
        for s in ledger.slices:
            out[s.uuid] = out.get(s.uuid, 0) + s.memory_mib * MIB
    return out


async def replayed(nc: Client, bus: BusSettings, count: int) -> dict[str, NodeLedger]:
    await helpers.register(nc, bus, helpers.fleet(nodes=3, gpus=2, split=4))
    driven = await stack.replay(bus, stack.pods(count))
    assert 0 < sum(driven.placed) < count  # some placed, some did not fit
    return await helpers.ledgers(nc, bus)


async def test_after_a_small_replay_every_ledger_slice_is_in_metrics_with_the_ledgers_values(
    nc: Client, bus_settings: BusSettings
) -> None:
    async with (
        stack.admission(bus_settings),
        stack.schedulers(bus_settings, 2),
        stack.metrics(bus_settings) as url,
    ):
        ledgers = await replayed(nc, bus_settings, 24)
        want = expected_slices(ledgers)
        assert len(want) >= 6
        text = await stack.until(
            lambda: stack.get(url + "/metrics"),
            lambda t: (
                samples(t, "hami_vgpu_memory_allocated_bytes") == want
                and sum(labelled("vslice_scheduler_decisions_total", t, outcome="placed"))
                == len({s.pod_uid for ld in ledgers.values() for s in ld.slices})
            ),
        )
    assert samples(text, "hami_vgpu_memory_allocated_bytes") == want
    for uuid, allocated in expected_devices(ledgers).items():
        assert labelled("hami_gpu_memory_allocated_bytes", text, device_uuid=uuid) == [allocated]
    assert len(samples(text, "hami_gpu_memory_limit_bytes")) == 6
    assert {dict(k)["node"] for k in samples(text, "hami_gpu_shared_count")} == {
        "node-0",
        "node-1",
        "node-2",
    }
    placed = len({s.pod_uid for ld in ledgers.values() for s in ld.slices})
    assert sum(labelled("vslice_scheduler_decisions_total", text, outcome="placed")) == placed
    assert sum(labelled("vslice_scheduler_decisions_total", text, outcome="unschedulable")) > 0
    assert {dict(k)["replica"] for k in samples(text, "vslice_scheduler_requests_total")} == {
        "r0",
        "r1",
    }
    assert labelled("vslice_scheduling_latency_seconds_count", text) == [placed]
    assert labelled("vslice_ledger_revision_lag", text) == [0]
    assert 0 <= labelled("vslice_fleet_fragmentation_ratio", text)[0] <= 100


async def test_released_slices_disappear_from_metrics(
    nc: Client, bus_settings: BusSettings
) -> None:
    async with (
        stack.admission(bus_settings),
        stack.schedulers(bus_settings, 1),
        stack.metrics(bus_settings) as url,
    ):
        ledgers = await replayed(nc, bus_settings, 12)
        held = sorted({s.pod_uid for ld in ledgers.values() for s in ld.slices})
        gone = held[::2]
        for uid in gone:
            assert isinstance(await helpers.release(nc, bus_settings, uid), events.Ack)
        after = await helpers.ledgers(nc, bus_settings)
        want = expected_slices(after)
        text = await stack.until(
            lambda: stack.get(url + "/metrics"),
            lambda t: samples(t, "hami_vgpu_memory_allocated_bytes") == want,
        )
    assert samples(text, "hami_vgpu_memory_allocated_bytes") == want
    shown = {dict(k)["pod"] for k in samples(text, "hami_vgpu_core_allocated_ratio")}
    released_pods = {s.pod for ld in ledgers.values() for s in ld.slices if s.pod_uid in gone}
    assert released_pods and not shown & released_pods
    for uuid in {s.uuid for ld in ledgers.values() for s in ld.slices}:
        assert labelled("hami_gpu_memory_allocated_bytes", text, device_uuid=uuid) == [
            expected_devices(after).get(uuid, 0)
        ]


async def test_a_restarted_metrics_service_rebuilds_every_series_from_the_buckets(
    nc: Client, bus_settings: BusSettings
) -> None:
    async with stack.admission(bus_settings), stack.schedulers(bus_settings, 1):
        ledgers = await replayed(nc, bus_settings, 12)
    want = expected_slices(ledgers)
    async with stack.metrics(bus_settings, observe_requests=False) as url:
        first = await stack.get(url + "/metrics")  # the first scrape, nothing waited for
    assert samples(first, "hami_vgpu_memory_allocated_bytes") == want
    assert len(samples(first, "hami_gpu_memory_limit_bytes")) == 6
    async with stack.metrics(bus_settings, observe_requests=False) as url:
        again = await stack.get(url + "/metrics")
    assert samples(again, "hami_vgpu_memory_allocated_bytes") == want


async def test_usage_from_a_node_usage_report_appears_in_hami_vgpu_memory_used_bytes(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=2))
    held = fx.slice_of("p1", "GPU-0-1", index=1, memory_mib=3000, cores=30)
    kv = await nc.jetstream().key_value(bus_settings.subjects.ledger_bucket)
    await kv.put("node-0", fx.ledger("node-0", held))
    stranger = fx.slice_of("not-in-ledger", "GPU-0-0")
    report = fx.usage(
        "node-0",
        time.time(),
        fx.line(held, used_bytes=1234 * MIB, utilization=55.0),
        fx.line(stranger, used_bytes=9 * MIB),
    )
    subject = bus_settings.subjects.usage("node-0")
    sent = 0
    async with stack.metrics(bus_settings, observe_requests=False) as url:

        async def reported() -> str:
            # as a node agent does every few seconds; core NATS delivers at most once (a
            # message published while a connection reconnects is gone), so each try sends
            # a malformed report and a good one behind it
            nonlocal sent
            await nc.publish(subject, b"{malformed")
            await nc.publish(subject, report)
            await nc.flush()
            sent += 1
            return await stack.get(url + "/metrics")

        def taken(text: str) -> bool:
            rejected = labelled("vslice_metrics_rejected_messages_total", text, source="usage")
            return bool(labelled("hami_vgpu_memory_used_bytes", text)) and bool(rejected)

        text = await stack.until(reported, taken, timeout_s=30)
    labels = {
        "namespace": "team-a",
        "pod": "pod-p1",
        "container": "main",
        "vdevice_index": "0",
        "device_uuid": "GPU-0-1",
    }
    assert labelled("hami_vgpu_memory_used_bytes", text, **labels) == [1234 * MIB]
    assert labelled("hami_vgpu_memory_limit_bytes", text, **labels) == [3000 * MIB]
    assert labelled("hami_container_device_utilization_ratio", text, **labels) == [55.0]
    assert labelled("hami_vgpu_memory_used_bytes", text, pod="pod-not-in-ledger") == []
    (rejected,) = labelled("vslice_metrics_rejected_messages_total", text, source="usage")
    assert 1 <= rejected <= sent  # each malformed report counted once, none taken


async def test_a_usage_report_over_its_bounds_is_refused_naming_the_field_and_the_next_is_taken(
    nc: Client, bus_settings: BusSettings, caplog: pytest.LogCaptureFixture
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1))
    held = fx.slice_of("p1", "GPU-0-0", memory_mib=3000)
    kv = await nc.jetstream().key_value(bus_settings.subjects.ledger_bucket)
    await kv.put("node-0", fx.ledger("node-0", held))
    subject = bus_settings.subjects.usage("node-0")
    over = events.ENCODER.encode(
        events.NodeUsage(
            node="node-0",
            at=time.time(),
            containers=(fx.line(held, used_bytes=7 * MIB),),
            problems=("x" * (events.MAX_PROBLEM + 1),),
        )
    )
    good = fx.usage("node-0", time.time(), fx.line(held, used_bytes=1234 * MIB))
    caplog.set_level(logging.ERROR, logger="vslice.metrics")
    sent = 0
    async with stack.metrics(bus_settings, observe_requests=False) as url:

        async def reported() -> str:
            nonlocal sent  # each try sends both: core NATS delivers at most once
            await nc.publish(subject, over)
            await nc.publish(subject, good)
            await nc.flush()
            sent += 1
            return await stack.get(url + "/metrics")

        def taken(text: str) -> bool:
            rejected = labelled("vslice_metrics_rejected_messages_total", text, source="usage")
            return bool(labelled("hami_vgpu_memory_used_bytes", text)) and bool(rejected)

        text = await stack.until(reported, taken, timeout_s=30)
    assert labelled("hami_vgpu_memory_used_bytes", text, pod="pod-p1") == [1234 * MIB]
    (rejected,) = labelled("vslice_metrics_rejected_messages_total", text, source="usage")
    assert 1 <= rejected <= sent
    refused = [r for r in caplog.records if r.getMessage() == "rejected"]
    assert 1 <= len(refused) <= sent
    for record in refused:
        assert getattr(record, "error", "").startswith("$.problems[0]=")
        assert f"length <= {events.MAX_PROBLEM}" in record.error


async def test_healthz_and_readyz_answer_while_the_service_serves_on_the_bus(
    bus_settings: BusSettings,
) -> None:
    async with stack.metrics(bus_settings, observe_requests=False) as url:
        assert await stack.get(url + "/healthz") == "ok\n"
        assert await stack.get(url + "/readyz") == "ok\n"


async def test_readyz_answers_503_with_the_reason_when_the_wiring_says_not_ready() -> None:
    view = FleetView()
    registry = CollectorRegistry(auto_describe=False)
    collector = http.ViewCollector(view=view, usage_ttl_s=30, stats_ttl_s=30)
    registry.register(collector)
    why = ["not connected to the bus"]
    app = http.application(view, registry, collector, usage_ttl_s=30, unready=lambda: why[0])
    runner, port = await http.serve(app, host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert (resp.status, await resp.text()) == (503, "not connected to the bus\n")
            why[0] = ""
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


def test_the_service_exits_promptly_on_sigterm(
    nats_server: NatsServer, bus_settings: BusSettings, tmp_path: Path
) -> None:
    async def create() -> None:  # as the scheduler does; metrics only opens the buckets
        nc = await connecting.connect(bus_settings, name="operator")
        await connecting.ensure_bus(nc.jetstream(), bus_settings)
        await nc.close()

    asyncio.run(create())
    own = nats_server.identity(
        f"metrics-{bus_settings.prefix}", Role.METRICS, prefix=bus_settings.prefix
    )
    argv = [
        sys.executable,
        "-m",
        "services.metrics",
        *own.credential_arguments(),
        "--nats-url",
        bus_settings.urls[0],
        "--prefix",
        bus_settings.prefix,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    log = tmp_path / "metrics.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=repo_root(), stderr=out, stdout=out)
    try:
        deadline = time.monotonic() + 30
        while "metrics serving" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert "metrics serving" in log.read_text()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert '"msg": "stopped"' in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
