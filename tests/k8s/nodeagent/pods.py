"""Pods as the scheduler extender leaves them at bind, for the device plugin's tests."""

from __future__ import annotations

from typing import Any

from libshared import annotations as keys


def grants(*devices: tuple[str, int, int], vendor: str = "NVIDIA") -> list[keys.DeviceGrant]:
    """One container's grants from ``(uuid, memory_mib, cores_percent)``."""
    return [
        keys.DeviceGrant(uuid=u, vendor=vendor, memory_mib=m, cores_percent=c)
        for u, m, c in devices
    ]


def bound_pod(
    name: str,
    *,
    node: str,
    containers: list[list[tuple[str, int, int]]],
    bind_time: int | None = 1_700_000_000,
    created: str = "2024-01-01T00:00:00Z",
    namespace: str = "default",
    uid: str | None = None,
    phase: str = "allocating",
    init_containers: int = 0,
    env: dict[str, str] | None = None,
    dcus: list[list[tuple[str, int, int]]] | None = None,
) -> dict[str, Any]:
    """A pod bound to ``node``: one container per entry of ``containers`` (its slices as
    ``(uuid, memory_mib, cores_percent)``, empty for a container without GPUs), after
    ``init_containers`` init containers without GPUs; ``env`` on every container. ``dcus``
    (aligned with ``containers``): each container's Hygon DCU slices, written to the DCU
    annotations (``hami.io/dcu-devices-*``); a pod with DCUs and no GPU slice has no
    ``hami.io/vgpu-devices-*``."""
    entries = [[] for _ in range(init_containers)] + [grants(*c) for c in containers]
    annotations = {keys.VGPU_NODE: node, keys.BIND_PHASE: phase}
    if dcus is None or any(any(e) for e in entries):
        annotations[keys.VGPU_DEVICES_ALLOCATED] = keys.encode_pod_devices(entries)
        annotations[keys.VGPU_DEVICES_TO_ALLOCATE] = keys.encode_pod_devices(entries)
    dcu_of: list[list[tuple[str, int, int]]] = list(dcus or [])
    dcu_of += [[] for _ in range(len(containers) - len(dcu_of))]
    if dcus is not None:
        dcu_entries = [[] for _ in range(init_containers)] + [
            grants(*c, vendor="DCU") for c in dcu_of
        ]
        annotations[keys.DCU_DEVICES_ALLOCATED] = keys.encode_pod_devices(dcu_entries)
        annotations[keys.DCU_DEVICES_TO_ALLOCATE] = keys.encode_pod_devices(dcu_entries)
    if bind_time is not None:
        annotations[keys.BIND_TIME] = str(bind_time)
    env_list = [{"name": k, "value": v} for k, v in (env or {}).items()]

    def container(
        cname: str, devices: list[tuple[str, int, int]], dcu: list[tuple[str, int, int]]
    ) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if devices:
            limits = {
                "nvidia.com/gpu": len(devices),
                "nvidia.com/gpumem": devices[0][1],
                "nvidia.com/gpucores": devices[0][2],
            }
        if dcu:
            limits |= {
                "hygon.com/dcunum": len(dcu),
                "hygon.com/dcumem": dcu[0][1],
                "hygon.com/dcucores": dcu[0][2],
            }
        return {"name": cname, "image": "cuda", "env": env_list, "resources": {"limits": limits}}

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-{name}",
            "creationTimestamp": created,
            "annotations": annotations,
        },
        "spec": {
            "nodeName": node,
            "schedulerName": "vslice-scheduler",
            "initContainers": [container(f"init{i}", [], []) for i in range(init_containers)],
            "containers": [
                container(f"c{i}", c, d)
                for i, (c, d) in enumerate(zip(containers, dcu_of, strict=True))
            ],
        },
        "status": {"phase": "Pending"},
    }
