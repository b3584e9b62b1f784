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


def dcu_env(slices: tuple[Slice, ...], dcu_indices: Mapping[str, int]) -> dict[str, str]:
    """The variable naming a container's Hygon DCU ``slices`` to it:
    ``HIP_VISIBLE_DEVICES`` (``libshared.vendors.DCU.visible_devices``), their indices in
    the node's DCU numbering (``dcu_indices``: UUID -> index), comma separated, in order.
    Raises ``ValueError`` naming a slice whose DCU is not in ``dcu_indices``. Pure."""
    missing = [s.uuid for s in slices if s.uuid not in dcu_indices]
    if missing:
        raise ValueError(f"slice {missing[0]} of {slices[0].container}: no such DCU on this node")
    return {vendors.DCU.visible_devices: ",".join(str(dcu_indices[s.uuid]) for s in slices)}


def pod_env(placement: Placement, dcu_indices: Mapping[str, int]) -> dict[str, dict[str, str]]:
    """Container name -> its variables, for every container holding a slice: its NVIDIA
    slices' (``container_env``), and for its DCUs ``dcu_env`` (``dcu_indices``: UUID ->
    index of the node's DCUs). Raises ``ValueError`` naming a DCU slice the node lacks."""
    per: dict[str, list[Slice]] = {}
    for s in sorted(placement.slices, key=lambda s: (s.container_index, s.device_index)):
        per.setdefault(s.container, []).append(s)
    out = {}
    for name, slices in per.items():
        gpus = [s for s in slices if s.vendor == vendors.NVIDIA.name]
        dcus = tuple(s for s in slices if s.vendor == vendors.DCU.name)
        env = container_env(gpus) if gpus else {}
        if dcus:
            env |= dcu_env(dcus, dcu_indices)
        out[name] = env
    return out
