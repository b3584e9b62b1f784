"""Hand-built bucket values and usage reports for the metrics tests."""

from __future__ import annotations

from libshared import events
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, Slice

MIB = 1024 * 1024


def device(uuid: str, index: int, *, memory_mib: int = 16000, split: int = 4) -> Device:
    return Device(
        uuid=uuid, index=index, type="NVIDIA-A100", memory_mib=memory_mib, split_count=split
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
