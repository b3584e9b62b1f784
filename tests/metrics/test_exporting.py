"""``/metrics`` families drawn from the fleet view: HAMi's names, labels and units (bytes in
bytes, core ratios in percent, ``hami_node_gpu_memory_allocated_ratio`` as a fraction) and
vslice's own figures."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from libshared import events
from libshared.quarantines import LEDGER_DELETED as DELETED
from libshared.quarantines import LEDGER_UNREADABLE as LEDGER
from libshared.quarantines import REGISTRATION_UNREADABLE as REGISTRATION
from services.metrics.adapters.http import ViewCollector
from services.metrics.core import dashboards
from services.metrics.core.views import FleetView, RejectedValue
from tests.metrics import fixtures as fx
from tests.metrics.promtext import labelled, samples

NOW = 1000.0


def scrape(view: FleetView, *, legacy: bool = False) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        ViewCollector(view=view, usage_ttl_s=30, stats_ttl_s=15, clock=lambda: NOW, legacy=legacy)
    )
    return generate_latest(registry).decode()


def fleet() -> tuple[FleetView, list]:
    view = FleetView()
    view.put_node(
        "n1", fx.registration("n1", fx.device("G0", 0, memory_mib=16000), fx.device("G1", 1))
    )
    a = fx.slice_of("a", "G0", memory_mib=4000, cores=25)
    b = fx.slice_of("b", "G0", memory_mib=2000, cores=10, container="side", container_index=1)
    c = fx.slice_of("c", "G1", index=1, memory_mib=16000, cores=100)
    view.put_ledger("n1", fx.ledger("n1", a, b, c), 7)
    return view, [a, b, c]


def test_every_device_has_hamis_limit_and_allocation_series_with_hamis_labels() -> None:
    view, _ = fleet()
    text = scrape(view)
    g0 = {
        "node": "n1",
        "device_uuid": "G0",
        "device_index": "0",
        "device_type": "NVIDIA-A100",
        "zone": "vGPU",
    }
    assert labelled("hami_gpu_memory_limit_bytes", text, **g0) == [16000 * fx.MIB]
    assert labelled("hami_gpu_core_limit_ratio", text, **g0) == [100]
    # device_cores holds the device's total cores, as HAMi puts Totalcore there
    assert labelled("hami_gpu_memory_allocated_bytes", text, **g0, device_cores="100") == [
        6000 * fx.MIB
    ]
    assert labelled("hami_gpu_core_allocated_ratio", text, **g0) == [35]
    assert labelled("hami_gpu_shared_count", text, **g0) == [2]
    assert labelled("hami_node_gpu_memory_allocated_ratio", text, **g0) == [6000 / 16000]
    assert labelled(
        "hami_node_gpu_overview", text, **g0, device_cores="100", device_memory_limit="16000"
    ) == [6000 * fx.MIB]
    assert labelled("hami_gpu_shared_count", text, device_uuid="G1") == [1]


def test_every_slice_has_hamis_per_container_allocation_series() -> None:
    view, slices = fleet()
    text = scrape(view)
    got = samples(text, "hami_vgpu_memory_allocated_bytes")
    expected = {
        frozenset(
            {
                "namespace": "team-a",
                "node": "n1",
                "pod": s.pod,
                "container_index": str(s.container_index),
                "device_uuid": s.uuid,
                "zone": "vGPU",
            }.items()
        ): s.memory_mib * fx.MIB
        for s in slices
    }
    assert got == expected
    assert labelled("hami_vgpu_core_allocated_ratio", text, pod="pod-c") == [100]


def test_a_released_slice_has_no_series_at_the_next_scrape() -> None:
    view, (a, _b, c) = fleet()
    view.put_ledger("n1", fx.ledger("n1", a, c), 8)
    text = scrape(view)
    assert {dict(k)["pod"] for k in samples(text, "hami_vgpu_memory_allocated_bytes")} == {
        "pod-a",
        "pod-c",
    }
    assert labelled("hami_gpu_shared_count", text, device_uuid="G0") == [1]


def test_usage_lines_become_hamis_monitor_series_for_slices_in_the_ledger() -> None:
    view, (a, b, _c) = fleet()
    host = events.DeviceUsage(
        uuid="G0",
        index=0,
        type="NVIDIA-A100",
        used_bytes=5 * fx.MIB,
        total_bytes=16000 * fx.MIB,
        utilization_percent=42.0,
        memory_utilization_percent=17.0,
    )
    view.put_usage(
        "n1",
        fx.usage(
            "n1",
            NOW - 1,
            fx.line(a, used_bytes=3 * fx.MIB, utilization=40.0, last_kernel_at=NOW - 2.5),
            fx.line(b, used_bytes=0),
            devices=(host,),
        ),
        received_at=NOW - 1,
    )
    text = scrape(view)
    labels = {
        "namespace": "team-a",
        "pod": "pod-a",
        "container": "main",
        "vdevice_index": "0",
        "device_uuid": "G0",
        "zone": "vGPU",
    }
    assert labelled("hami_vgpu_memory_used_bytes", text, **labels) == [3 * fx.MIB]
    assert labelled("hami_container_device_memory_bytes", text, **labels) == [3 * fx.MIB]
    assert labelled("hami_vgpu_memory_limit_bytes", text, **labels) == [4000 * fx.MIB]
    assert labelled("hami_container_device_utilization_ratio", text, **labels) == [40.0]
    # whole Unix seconds, as HAMi subtracts them: 1000 - 997
    assert labelled("hami_container_last_kernel_elapsed_seconds", text, **labels) == [3]
    # b reported no kernel and no utilization: HAMi sends the last kernel only once one
    # ran, and the utilization always (its shared region holds 0 then)
    assert labelled("hami_container_last_kernel_elapsed_seconds", text, pod="pod-b") == []
    assert labelled("hami_container_device_utilization_ratio", text, pod="pod-b") == [0.0]
    assert labelled("hami_vgpu_memory_used_bytes", text, pod="pod-b") == [0]
    assert labelled("hami_vgpu_memory_used_bytes", text, pod="pod-c") == []  # no line
    host_labels = {
        "node": "n1",
        "device_index": "0",
        "device_uuid": "G0",
        "device_type": "NVIDIA-A100",
    }
    assert labelled("hami_host_gpu_memory_used_bytes", text, **host_labels) == [5 * fx.MIB]
    assert labelled("hami_host_gpu_utilization_ratio", text, **host_labels) == [42.0]
    # HAMi labels the memory controller's utilization without the node
    controller = samples(text, "hami_host_gpu_memory_controller_utilization_ratio")
    assert controller == {
        frozenset(
            {
                "device_index": "0",
                "device_uuid": "G0",
                "device_type": "NVIDIA-A100",
                "zone": "vGPU",
            }.items()
        ): 17.0
    }


def test_vslice_reports_fragmentation_revision_lag_and_each_replicas_counters() -> None:
    view, _ = fleet()  # G0: 6000/16000 MiB, 35 % -> 625 milli free; G1 full
    view.ledger_last_seq = 10
    view.put_stats(
        events.Stats(
            name="r1", schedule_requests=9, placed=6, unschedulable=2, errors=1, conflicts=4
        ),
        received_at=NOW,
    )
    text = scrape(view)
    assert labelled("vslice_fleet_free_gpus", text) == [0.625]
    assert labelled("vslice_fleet_stranded_gpus", text) == [0.625]
    assert labelled("vslice_fleet_fragmentation_ratio", text) == [100.0]
    assert labelled("vslice_ledger_revision", text) == [7]
    assert labelled("vslice_ledger_revision_lag", text) == [3]
    assert labelled("vslice_scheduler_decisions_total", text, replica="r1", outcome="placed") == [6]
    assert labelled("vslice_scheduler_decisions_total", text, outcome="unschedulable") == [2]
    assert labelled("vslice_scheduler_decisions_total", text, outcome="error") == [1]
    assert labelled("vslice_scheduler_cas_conflicts_total", text, replica="r1") == [4]
    assert labelled("vslice_scheduler_requests_total", text, replica="r1") == [9]


def test_device_cores_of_the_allocated_memory_series_stays_put_across_allocations() -> None:
    # HAMi labels it with the device's total cores: one series per device, not a new one
    # at every allocation change
    view, (a, _b, c) = fleet()
    before = {
        dict(k)["device_cores"] for k in samples(scrape(view), "hami_gpu_memory_allocated_bytes")
    }
    view.put_ledger("n1", fx.ledger("n1", a, c), 8)
    after = {
        dict(k)["device_cores"] for k in samples(scrape(view), "hami_gpu_memory_allocated_bytes")
    }
    assert before == after == {"100"}


def test_hamis_legacy_names_are_served_only_when_asked_with_the_same_values() -> None:
    view, (a, _b, _c) = fleet()
    view.put_usage(
        "n1",
        fx.usage("n1", NOW - 1, fx.line(a, used_bytes=3 * fx.MIB, utilization=40.0)),
        received_at=NOW - 1,
    )
    plain = scrape(view)
    assert samples(plain, "GPUDeviceMemoryAllocated") == {}
    assert samples(plain, "vGPU_device_memory_usage_in_bytes") == {}
    text = scrape(view, legacy=True)
    old = {"nodeid": "n1", "deviceuuid": "G0", "deviceidx": "0", "zone": "vGPU"}
    assert labelled("GPUDeviceMemoryAllocated", text, **old, devicecores="100") == [6000 * fx.MIB]
    assert labelled("nodeGPUMemoryPercentage", text, **old) == [6000 / 16000]
    assert labelled("vGPU_device_memory_usage_in_bytes", text, podname="pod-a", ctrname="main") == [
        3 * fx.MIB
    ]
    # HAMi's legacy memory series spells out the split: all of it is allocations here
    assert labelled(
        "Device_memory_desc_of_container",
        text,
        podname="pod-a",
        context="0",
        module="0",
        data=str(3 * fx.MIB),
        offset="0",
    ) == [3 * fx.MIB]
    assert labelled("hami_vgpu_memory_buffer_bytes", text, pod="pod-a") == [3 * fx.MIB]
    assert labelled("hami_vgpu_memory_context_bytes", text, pod="pod-a") == [0]
    assert labelled("vGPUMemoryAllocated", text, podname="pod-a", nodename="n1") == [4000 * fx.MIB]


def test_build_info_is_one_series_without_zone() -> None:
    view, _ = fleet()
    got = samples(scrape(view), "hami_build_info")
    assert list(got.values()) == [1]
    (labels,) = [dict(k) for k in got]
    assert set(labels) == {
        "version",
        "revision",
        "build_date",
        "go_version",
        "compiler",
        "platform",
    }
    assert labels["version"] and labels["go_version"].startswith("python")


def test_each_quarantined_node_is_reported_with_its_reason_until_a_good_value_lifts_it() -> None:
    view, _ = fleet()
    good = fx.registration("n1", fx.device("G0", 0, memory_mib=16000), fx.device("G1", 1))
    assert labelled("vslice_node_quarantined", scrape(view)) == []
    with pytest.raises(RejectedValue):
        view.put_node("n1", b'{"node": "n1", "devices": "none"}')
    with pytest.raises(RejectedValue):
        view.put_ledger("n1", b"\x00garbage", 20)
    view.put_ledger("n9", None, 21)  # a deleted ledger key
    text = scrape(view)
    assert labelled("vslice_node_quarantined", text, node="n1", reason=REGISTRATION) == [1]
    assert labelled("vslice_node_quarantined", text, node="n1", reason=LEDGER) == [1]
    assert labelled("vslice_node_quarantined", text, node="n9", reason=DELETED) == [1]
    view.put_node("n1", good)
    view.put_ledger("n1", fx.ledger("n1"), 22)
    view.put_ledger("n9", fx.ledger("n9"), 23)
    assert labelled("vslice_node_quarantined", scrape(view)) == []


def test_a_realized_mig_instance_is_served_with_hamis_mig_labels() -> None:
    view = FleetView()
    view.put_node("n1", fx.registration("n1", fx.device("G0", 0, memory_mib=40960)))
    held = msgspec.structs.replace(
        fx.slice_of("a", "G0", memory_mib=20480, cores=0),
        mig_profile="3g.20gb",
        mig_start=4,
        mig_size=4,
    )
    unrealized = msgspec.structs.replace(
        fx.slice_of("b", "G0", memory_mib=10240, cores=0),
        mig_profile="2g.10gb",
        mig_start=0,
        mig_size=2,
    )
    view.put_ledger("n1", fx.ledger("n1", held, unrealized), 3)
    realized = events.MigInstanceUsage(
        uuid="G0",
        mig_uuid="MIG-1234",
        profile="3g.20gb",
        gpu_instance_id=2,
        compute_instance_id=0,
        start=4,
        size=4,
    )
    report = events.ENCODER.encode(events.NodeUsage(node="n1", at=NOW, migs=(realized,)))
    view.put_usage("n1", report, received_at=NOW)
    text = scrape(view, legacy=True)
    assert labelled(
        "hami_node_gpu_mig_instance_info",
        text,
        node="n1",
        device_uuid="G0",
        device_index="0",
        mig_uuid="MIG-1234",
        profile="3g.20gb",
        gpu_instance_id="2",
        compute_instance_id="0",
        placement_start="4",
        placement_size="4",
        zone="vGPU",
    ) == [1]
    assert len(labelled("hami_node_gpu_mig_instance_info", text)) == 1
    assert labelled(
        "hami_mig_device_info", text, pod="pod-a", mig_uuid="MIG-1234", profile="3g.20gb"
    ) == [1]
    assert labelled("hami_mig_device_info", text, pod="pod-b") == []  # not realized yet
    assert labelled("nodeGPUMigInstance", text, migname="3g.20gb") == [1]
    assert labelled("MigInfo", text, podname="pod-a", instanceid="2") == [1]
    # the dashboard's node page shows the same: the instance realized, the other not yet
    detail = dashboards.node_detail(
        view.snapshot(now=NOW, usage_ttl_s=30), "n1", now=NOW, tracker=dashboards.Tracker()
    )
    assert detail is not None
    shown = {s["pod"]: (s["mig_profile"], s["mig_uuid"]) for s in detail["devices"][0]["slices"]}
    assert shown == {"pod-a": ("3g.20gb", "MIG-1234"), "pod-b": ("2g.10gb", "")}
