"""Hand-built bucket values and usage reports for the metrics tests."""

from __future__ import annotations

from libshared import events
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, Slice
from services.metrics.core.views import FleetView

MIB = 1024 * 1024


def device(
    uuid: str,
    index: int,
    *,
    memory_mib: int = 16000,
    split: int = 4,
    type: str = "NVIDIA-A100",
    vendor: str = "NVIDIA",
) -> Device:
    return Device(
        uuid=uuid,
        index=index,
        type=type,
        memory_mib=memory_mib,
        split_count=split,
        vendor=vendor,
    )


def slice_of(
    uid: str,
    uuid: str,
    *,
    index: int = 0,
    memory_mib: int = 4000,
    cores: int = 25,
    container: str = "main",
    container_index: int = 0,
    vendor: str = "NVIDIA",
) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="team-a",
        pod=f"pod-{uid}",
        container=container,
        container_index=container_index,
        uuid=uuid,
        device_index=index,
        memory_mib=memory_mib,
        cores_percent=cores,
        vendor=vendor,
    )


def registration(node: str, *devices: Device) -> bytes:
    return events.ENCODER.encode(NodeDevices(node=node, devices=devices))


def ledger(node: str, *slices: Slice) -> bytes:
    return events.ENCODER.encode(NodeLedger(node=node, slices=slices))


def line(
    s: Slice,
    *,
    used_bytes: int,
    utilization: float | None = None,
    last_kernel_at: float | None = None,
) -> events.ContainerUsage:
    return events.ContainerUsage(
        pod_uid=s.pod_uid,
        namespace=s.namespace,
        pod=s.pod,
        container=s.container,
        container_index=s.container_index,
        uuid=s.uuid,
        device_index=s.device_index,
        used_bytes=used_bytes,
        limit_bytes=s.memory_mib * MIB,
        sm_limit_percent=s.cores_percent,
        utilization_percent=utilization,
        last_kernel_at=last_kernel_at,
    )


def usage(
    node: str,
    at: float,
    *lines: events.ContainerUsage,
    devices: tuple[events.DeviceUsage, ...] = (),
) -> bytes:
    return events.ENCODER.encode(
        events.NodeUsage(node=node, at=at, devices=devices, containers=lines)
    )


Z100_MIB = 32768  # Hygon Z100: 32 GiB (vendor spec sheet)
K100_MIB = 65536  # Hygon K100: 64 GiB (vendor spec sheet)


def mixed_vendors() -> FleetView:
    """Node ``n1``: one NVIDIA A100 (G0) with a 4000 MiB slice; node ``d1``: a DCU-Z100
    (D0) with an 8192 MiB slice of pod ``pod-dcu`` and an idle DCU-K100 (D1)."""
    view = FleetView()
    view.put_node("n1", registration("n1", device("G0", 0)))
    view.put_ledger("n1", ledger("n1", slice_of("a", "G0")), 1)
    view.put_node(
        "d1",
        registration(
            "d1",
            device("D0", 0, memory_mib=Z100_MIB, type="DCU-Z100", vendor="DCU"),
            device("D1", 1, memory_mib=K100_MIB, type="DCU-K100", vendor="DCU"),
        ),
    )
    dcu = slice_of("dcu", "D0", memory_mib=8192, cores=30, vendor="DCU")
    view.put_ledger("d1", ledger("d1", dcu), 2)
    return view
