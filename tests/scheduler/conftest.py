"""Small fleets and pods for the scheduling-core tests."""

from __future__ import annotations

from libshared.devices import Device, NodeDevices
from libshared.resources import ContainerRequest, PodRequest
from services.scheduler.core.clusters import Cluster


def node(
    name: str,
    gpus: int = 2,
    *,
    type: str = "NVIDIA-A100",
    memory_mib: int = 16384,
    split: int = 10,
    cpu_milli: int | None = None,
    host_mib: int | None = None,
    numa: list[int] | None = None,
    unhealthy: tuple[int, ...] = (),
    cordoned: tuple[int, ...] = (),
) -> NodeDevices:
    devices = tuple(
        Device(
            uuid=f"{name}-gpu{i}",
            index=i,
            type=type,
            memory_mib=memory_mib,
            split_count=split,
            numa=(numa or [0] * gpus)[i],
            healthy=i not in unhealthy,
            cordoned=i in cordoned,
        )
        for i in range(gpus)
    )
    return NodeDevices(node=name, devices=devices, cpu_milli=cpu_milli, memory_mib=host_mib)


def cluster(*nodes: NodeDevices) -> Cluster:
    c = Cluster(max_devices=max(len(n.devices) for n in nodes))
    for n in nodes:
        c.upsert_node(n)
    return c


def pod(
    uid: str = "p",
    *,
    gpus: int = 1,
    mem: int = 0,
    pct: int = 0,
    cores: int = 0,
    cpu: int = 0,
    host_mib: int = 0,
    **selectors: object,
) -> PodRequest:
    containers: tuple[ContainerRequest, ...] = ()
    if gpus:
        containers = (
            ContainerRequest(
                name="main",
                index=0,
                init=False,
                gpu_count=gpus,
                memory_mib=mem,
                memory_percent=pct if mem == 0 else 0,
                cores_percent=cores,
            ),
        )
    return PodRequest(
        uid=uid, name=uid, containers=containers, cpu_milli=cpu, memory_mib=host_mib, **selectors
    )
