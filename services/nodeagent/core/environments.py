"""The environment each container of a placed pod gets, in HAMi-core's variable names.

``CUDA_DEVICE_MEMORY_LIMIT_<i>`` (``<MiB>m``, one per visible device, in the container's
device order), ``CUDA_DEVICE_SM_LIMIT`` (percent, for every device; left out at 0),
``NVIDIA_VISIBLE_DEVICES`` (the allocated UUIDs), ``CUDA_TASK_PRIORITY`` when the pod set
``nvidia.com/priority`` (``ARCHITECTURE.md``, "The slice inside the container"); a
container's Hygon DCUs are named by index in ``HIP_VISIBLE_DEVICES`` instead. Pure:
the node agent's adapter hands this to the runtime (or, for mock nodes, only reports it).
"""

from __future__ import annotations

from collections.abc import Mapping

from libshared import vendors
from libshared.events import Placement
from libshared.ledgers import Slice


def container_env(slices: list[Slice]) -> dict[str, str]:
    """The variables of one container from its slices (one per device, ordered)."""
    env = {"NVIDIA_VISIBLE_DEVICES": ",".join(s.uuid for s in slices)}
    for i, s in enumerate(slices):
        env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{s.memory_mib}m"
    cores = max((s.cores_percent for s in slices), default=0)
    if cores > 0:
        # the percent as asked; whether 100 % is limited is GPU_CORE_UTILIZATION_POLICY's
        # call, made by libvgpu (HAMi-core: "default" leaves 100 alone, "force" does not)
        env["CUDA_DEVICE_SM_LIMIT"] = str(min(cores, 100))
    priority = next((s.priority for s in slices if s.priority is not None), None)
    if priority is not None:
        env["CUDA_TASK_PRIORITY"] = str(priority)
    return env


def pod_env(
    placement: Placement, dcu_indices: Mapping[str, int] | None = None
) -> dict[str, dict[str, str]]:
    """Container name -> its variables, for every container holding a slice: its NVIDIA
    slices' (``container_env``), and ``HIP_VISIBLE_DEVICES`` for its DCUs: their indices
    on the node (``dcu_indices``, UUID -> index; a DCU it lacks is named by its slice's
    ``device_index``)."""
    per: dict[str, list[Slice]] = {}
    for s in sorted(placement.slices, key=lambda s: (s.container_index, s.device_index)):
        per.setdefault(s.container, []).append(s)
    out = {}
    for name, slices in per.items():
        gpus = [s for s in slices if s.vendor == vendors.NVIDIA.name]
        dcus = [s for s in slices if s.vendor == vendors.DCU.name]
        env = container_env(gpus) if gpus else {}
        if dcus:
            index = dcu_indices or {}
            env[vendors.DCU.visible_devices] = ",".join(
                str(index.get(s.uuid, s.device_index)) for s in dcus
            )
        out[name] = env
    return out
