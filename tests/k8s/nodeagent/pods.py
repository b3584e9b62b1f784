"""Pods as the scheduler extender leaves them at bind, for the device plugin's tests."""

from __future__ import annotations

from typing import Any

from libshared import annotations as keys


def grants(*devices: tuple[str, int, int]) -> list[keys.DeviceGrant]:
    """One container's grants from ``(uuid, memory_mib, cores_percent)``."""
    return [
        keys.DeviceGrant(uuid=u, vendor="NVIDIA", memory_mib=m, cores_percent=c)
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
) -> dict[str, Any]:
    """A pod bound to ``node``: one container per entry of ``containers`` (its slices as
    ``(uuid, memory_mib, cores_percent)``, empty for a container without GPUs), after
    ``init_containers`` init containers without GPUs; ``env`` on every container."""
    entries = [[] for _ in range(init_containers)] + [grants(*c) for c in containers]
    annotations = {
        keys.VGPU_NODE: node,
        keys.BIND_PHASE: phase,
        keys.VGPU_DEVICES_ALLOCATED: keys.encode_pod_devices(entries),
        keys.VGPU_DEVICES_TO_ALLOCATE: keys.encode_pod_devices(entries),
    }
    if bind_time is not None:
        annotations[keys.BIND_TIME] = str(bind_time)
    env_list = [{"name": k, "value": v} for k, v in (env or {}).items()]

    def container(cname: str, devices: list[tuple[str, int, int]]) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if devices:
            limits = {
                "nvidia.com/gpu": len(devices),
                "nvidia.com/gpumem": devices[0][1],
                "nvidia.com/gpucores": devices[0][2],
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
            "initContainers": [container(f"init{i}", []) for i in range(init_containers)],
            "containers": [container(f"c{i}", c) for i, c in enumerate(containers)],
        },
        "status": {"phase": "Pending"},
    }
