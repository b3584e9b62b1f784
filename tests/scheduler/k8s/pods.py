"""Pod and node objects as the API server holds them, for the Kubernetes tests."""

from __future__ import annotations

import uuid
from typing import Any

from libshared.devices import Device, NodeDevices

SCHEDULER_NAME = "vslice-scheduler"


def pod(
    name: str,
    *,
    uid: str | None = None,
    namespace: str = "default",
    gpus: int | None = 1,
    gpumem: int | None = 3000,
    gpucores: int | None = 30,
    node: str | None = None,
    phase: str | None = None,
    annotations: dict[str, str] | None = None,
    init_container: bool = False,
) -> dict[str, Any]:
    """A pod written for HAMi: one container asking ``gpus`` GPUs of ``gpumem`` MiB and
    ``gpucores`` percent (a ``None`` leaves the resource out), for vslice's scheduler."""
    limits: dict[str, Any] = {}
    for key, value in (
        ("nvidia.com/gpu", gpus),
        ("nvidia.com/gpumem", gpumem),
        ("nvidia.com/gpucores", gpucores),
    ):
        if value is not None:
            limits[key] = value
    spec: dict[str, Any] = {
        "schedulerName": SCHEDULER_NAME,
        "containers": [{"name": "main", "image": "cuda:12", "resources": {"limits": limits}}],
    }
    if init_container:
        spec["initContainers"] = [{"name": "setup", "image": "busybox"}]
    if node is not None:
        spec["nodeName"] = node
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "annotations": dict(annotations or {}),
        },
        "spec": spec,
    }
    if phase is not None:
        obj["status"] = {"phase": phase}
    return obj


def registration(
    node: str, *, gpus: int = 2, memory_mib: int = 16384, split: int = 10
) -> NodeDevices:
    """A node's devices as its node agent registers them: GPUs ``GPU-<node>-<i>``."""
    return NodeDevices(
        node=node,
        devices=tuple(
            Device(
                uuid=f"GPU-{node}-{i}",
                index=i,
                type="NVIDIA-A100",
                memory_mib=memory_mib,
                split_count=split,
            )
            for i in range(gpus)
        ),
    )
