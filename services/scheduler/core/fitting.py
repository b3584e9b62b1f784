"""Fit: which devices and nodes can hold a pod's slices, and why the others cannot.

Rules and reason names are HAMi's (Project-HAMi/HAMi, NVIDIA device ``Fit``; docs
"scheduler-event-log"), checked per device in this order:

1. ``CardNotHealth``                 the device is unhealthy
2. ``CardTypeMismatch``              ``nvidia.com/use-gputype`` / ``nouse-gputype``
3. ``CardUuidMismatch``              ``nvidia.com/use-gpuuuid`` / ``nouse-gpuuuid``
4. ``CardTimeSlicingExhausted``      all ``deviceSplitCount`` slots are taken
5. ``CardInsufficientMemory``        free MiB < requested MiB (percent of the card's MiB)
6. ``CardInsufficientCore``          free cores < requested cores
7. ``ExclusiveDeviceAllocateConflict`` 100 cores asked on a device that already has slices
8. ``CardComputeUnitsExhausted``     0 cores asked on a device whose cores are all used

Then per node: fewer fitting devices than ``nvidia.com/gpu`` -> ``NodeInsufficientDevice``;
``nvidia.com/numa-bind`` requires all of a container's GPUs on one NUMA node
(``NumaNotFit``); CPU and host memory as kube-scheduler's NodeResourcesFit
(``Insufficient cpu`` / ``Insufficient memory``). Pure functions over ``Cluster`` arrays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from libshared.resources import ContainerRequest, PodRequest
from services.scheduler.core.clusters import BoolArray, Cluster, IntArray

CARD_NOT_HEALTH = "CardNotHealth"
CARD_TYPE_MISMATCH = "CardTypeMismatch"
CARD_UUID_MISMATCH = "CardUuidMismatch"
CARD_TIME_SLICING_EXHAUSTED = "CardTimeSlicingExhausted"
CARD_INSUFFICIENT_MEMORY = "CardInsufficientMemory"
CARD_INSUFFICIENT_CORE = "CardInsufficientCore"
EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT = "ExclusiveDeviceAllocateConflict"
CARD_COMPUTE_UNITS_EXHAUSTED = "CardComputeUnitsExhausted"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"
NUMA_NOT_FIT = "NumaNotFit"
INSUFFICIENT_CPU = "Insufficient cpu"
INSUFFICIENT_MEMORY = "Insufficient memory"

# Index = code returned by ``device_codes``; 0 = fits.
DEVICE_REASONS = (
    "",
    CARD_NOT_HEALTH,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_INSUFFICIENT_MEMORY,
    CARD_INSUFFICIENT_CORE,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
    CARD_COMPUTE_UNITS_EXHAUSTED,
)


def type_mask(cluster: Cluster, pod: PodRequest) -> BoolArray:
    """(N, D) True where the device's type passes the pod's type selectors."""
    if not pod.use_types and not pod.nouse_types:
        return cluster.dev_valid
    allowed = np.array([pod.type_allowed(t) for t in cluster.types] + [False], dtype=bool)
    return allowed[cluster.dev_type]  # dev_type -1 (empty slot) maps to the trailing False


def uuid_mask(cluster: Cluster, pod: PodRequest) -> BoolArray:
    """(N, D) True where the device's UUID passes the pod's UUID selectors."""
    mask = np.ones(cluster.dev_valid.shape, dtype=bool)
    if not pod.use_uuids and not pod.nouse_uuids:
        return mask
    for n, reg in enumerate(cluster.registrations):
        for slot, dev in enumerate(reg.devices):
            mask[n, slot] = pod.uuid_allowed(dev.uuid)
    return mask


def device_codes(
    cluster: Cluster,
    pod: PodRequest,
    container: ContainerRequest,
    *,
    types_ok: BoolArray | None = None,
    uuids_ok: BoolArray | None = None,
) -> IntArray:
    """(N, D) reason code per device for one container (0 = fits; see ``DEVICE_REASONS``).

    Empty device slots get ``CardNotHealth`` so they never fit; callers count only real
    devices when they report reasons.
    """
    c = cluster
    mem_req = (
        c.dev_mem * container.memory_percent // 100
        if container.memory_mib == 0
        else container.memory_mib
    )
    cores = container.cores_percent
    conds = [
        ~(c.dev_valid & c.dev_healthy),
        ~(type_mask(c, pod) if types_ok is None else types_ok),
        ~(uuid_mask(c, pod) if uuids_ok is None else uuids_ok),
        c.dev_used >= c.dev_split,
        c.dev_mem - c.dev_mem_used < mem_req,
        c.dev_cores - c.dev_cores_used < cores,
        (cores >= 100) & (c.dev_used > 0),
        (c.dev_cores_used >= c.dev_cores) & (cores == 0),
    ]
    return np.select(conds, list(range(1, len(conds) + 1)), default=0).astype(np.int64)


def node_resources_ok(cluster: Cluster, pod: PodRequest) -> tuple[BoolArray, BoolArray]:
    """(cpu_ok, mem_ok), each (N,): kube-scheduler NodeResourcesFit on declared nodes."""
    c = cluster
    cpu_ok = (c.cpu_total == 0) | (c.cpu_total - c.cpu_used >= pod.cpu_milli)
    mem_ok = (c.mem_total == 0) | (c.mem_total - c.mem_used >= pod.memory_mib)
    return cpu_ok, mem_ok


@dataclass(frozen=True)
class DeviceUse:
    """Scratch usage of one node's devices while a multi-container pod is fitted."""

    mem_used: list[int]
    cores_used: list[int]
    used: list[int]


def device_reason(
    cluster: Cluster,
    n: int,
    slot: int,
    pod: PodRequest,
    container: ContainerRequest,
    use: DeviceUse,
) -> str | None:
    """The first HAMi reason device ``slot`` of node ``n`` cannot take ``container``, or None."""
    c = cluster
    dev = c.registrations[n].devices[slot]
    if not dev.healthy:
        return CARD_NOT_HEALTH
    if not pod.type_allowed(dev.type):
        return CARD_TYPE_MISMATCH
    if not pod.uuid_allowed(dev.uuid):
        return CARD_UUID_MISMATCH
    if use.used[slot] >= dev.split_count:
        return CARD_TIME_SLICING_EXHAUSTED
    if dev.memory_mib - use.mem_used[slot] < container.memory_on(dev.memory_mib):
        return CARD_INSUFFICIENT_MEMORY
    if dev.cores_percent - use.cores_used[slot] < container.cores_percent:
        return CARD_INSUFFICIENT_CORE
    if container.cores_percent >= 100 and use.used[slot] > 0:
        return EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT
    if use.cores_used[slot] >= dev.cores_percent and container.cores_percent == 0:
        return CARD_COMPUTE_UNITS_EXHAUSTED
    return None


def device_score(cluster: Cluster, n: int, slot: int, use: DeviceUse) -> float:
    """HAMi's device usage score: used/split + cores used/cores + MiB used/MiB (0-3)."""
    dev = cluster.registrations[n].devices[slot]
    return (
        use.used[slot] / max(dev.split_count, 1)
        + use.cores_used[slot] / max(dev.cores_percent, 1)
        + use.mem_used[slot] / max(dev.memory_mib, 1)
    )


def order_devices(
    cluster: Cluster, n: int, slots: list[int], policy: str, use: DeviceUse
) -> list[int]:
    """Fitting devices in the order a GPU policy takes them (HAMi ``gpu-scheduler-policy``).

    ``binpack``: most used first; ``spread``: least used first; ties by device index.
    """
    sign = -1.0 if policy == "binpack" else 1.0
    return sorted(slots, key=lambda s: (sign * device_score(cluster, n, s, use), s))


def fit_node(
    cluster: Cluster, n: int, pod: PodRequest, *, gpu_policy: str, prefer: list[int] | None = None
) -> tuple[list[list[int]] | None, str]:
    """Fit every GPU container of ``pod`` on node ``n``, in container order.

    Returns ``(slots per GPU container, "")`` or ``(None, counted reasons)``, where the
    reasons read like HAMi's filter result: ``"3/8 CardInsufficientMemory, 1/8
    CardTypeMismatch"``. ``prefer`` (optional) is a device order to try first for a
    single-GPU container (the FGD and best-fit policies choose the device themselves).
    """
    c = cluster
    cpu_ok, mem_ok = node_resources_ok(c, pod)
    if not cpu_ok[n]:
        return None, INSUFFICIENT_CPU
    if not mem_ok[n]:
        return None, INSUFFICIENT_MEMORY
    ndev = len(c.registrations[n].devices)
    use = DeviceUse(
        mem_used=[int(x) for x in c.dev_mem_used[n]],
        cores_used=[int(x) for x in c.dev_cores_used[n]],
        used=[int(x) for x in c.dev_used[n]],
    )
    chosen: list[list[int]] = []
    for container in pod.gpu_containers:
        reasons: Counter[str] = Counter()
        fitting = []
        for slot in range(ndev):
            why = device_reason(c, n, slot, pod, container, use)
            if why is None:
                fitting.append(slot)
            else:
                reasons[why] += 1
        ordered = order_devices(c, n, fitting, gpu_policy, use)
        if prefer is not None:
            ordered = [s for s in prefer if s in fitting] + [s for s in ordered if s not in prefer]
        picked = _pick(c, n, ordered, container.gpu_count, numa_bind=pod.numa_bind)
        if picked is None:
            text = ", ".join(f"{k}/{ndev} {why}" for why, k in sorted(reasons.items()))
            short = (
                NUMA_NOT_FIT
                if pod.numa_bind and len(fitting) >= container.gpu_count
                else NODE_INSUFFICIENT_DEVICE
            )
            return None, f"{text}, {short}" if text else short
        for slot in picked:
            dev = c.registrations[n].devices[slot]
            use.mem_used[slot] += container.memory_on(dev.memory_mib)
            use.cores_used[slot] += container.cores_percent
            use.used[slot] += 1
        chosen.append(picked)
    return chosen, ""


def _pick(
    cluster: Cluster, n: int, ordered: list[int], count: int, *, numa_bind: bool
) -> list[int] | None:
    if len(ordered) < count:
        return None
    if not numa_bind:
        return ordered[:count]
    # all of a container's GPUs on one NUMA node (HAMi nvidia.com/numa-bind)
    groups: dict[int, list[int]] = {}
    for slot in ordered:
        groups.setdefault(int(cluster.dev_numa[n, slot]), []).append(slot)
    for slot in ordered:
        group = groups[int(cluster.dev_numa[n, slot])]
        if len(group) >= count:
            return group[:count]
    return None


def explain(codes: IntArray, cluster: Cluster, n: int, need: int) -> str:
    """Counted device reasons for node ``n`` from ``device_codes`` output."""
    ndev = len(cluster.registrations[n].devices)
    counts = Counter(int(x) for x in codes[n, :ndev] if x)
    parts = [
        f"{k}/{ndev} {DEVICE_REASONS[code]}"
        for code, k in sorted(counts.items(), key=lambda kv: DEVICE_REASONS[kv[0]])
    ]
    if ndev - sum(counts.values()) < need:
        parts.append(NODE_INSUFFICIENT_DEVICE)
    return ", ".join(parts)
