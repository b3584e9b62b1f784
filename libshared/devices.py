"""The device model: a node's physical GPUs as the scheduler sees them.

A ``Device`` is one physical GPU (by UUID) advertised ``split_count`` times, with its memory
in MiB and its compute in percent (100 = the whole card's SMs, scaled by
``deviceCoreScaling`` where configured, as in HAMi's node registration). Usage is not kept
here: it lives in the ledger (``libshared.ledgers``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libshared import bounds


class MigProfileSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU instance profile a MIG-mode device offers (HAMi's MIG capability contract:
    ``name``, ``memoryMB``, ``sliceCount``, ``placements``): ``memory_mib``, ``compute``
    (compute slices), ``size`` (memory slices an instance occupies) and ``starts`` (the
    slots an instance may start at; ``libshared.migs`` has NVIDIA's per model)."""

    name: bounds.MigProfileName
    memory_mib: bounds.DeviceMemoryMiB
    compute: bounds.MigSize
    size: bounds.MigSize
    starts: Annotated[tuple[bounds.MigSlot, ...], msgspec.Meta(max_length=bounds.MAX_MIG_SLOTS)]


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """One physical GPU of a node.

    ``memory_mib``: registered memory (physical x ``deviceMemoryScaling``), MiB.
    ``cores_percent``: registered compute, percent (100 for one card).
    ``split_count``: how many slices may share it (HAMi ``deviceSplitCount``, default 10).
    ``pair_scores``: ``(UUID, score)`` of how well it links to each other device of the
    node (HAMi's ``hami.io/node-nvidia-score``; higher is better), read by the
    ``topology-aware`` GPU policy; empty when unknown (every pair then scores 0, as in HAMi).
    ``cordoned``: no new slice goes there, the slices it holds stay (HAMi's node annotation
    ``hami.io/device-cordon``, a comma-separated UUID list, which the node agent reads;
    the scheduler's reason is ``CardCordoned``).
    ``vendor``: the vendor whose requests it serves (HAMi's request type: ``NVIDIA``,
    ``DCU``; ``libshared.vendors``); a container is fitted only to its vendor's devices.
    ``mig_slots``, ``mig_profiles``: on a device in ``mode`` ``mig``, its memory slices and
    the GPU instance profiles it offers (only the allowed ones: HAMi's
    ``migProfileAllowlist`` is applied where they are published); a slice there is one GPU
    instance (``libshared.ledgers.Slice.mig_profile``).
    """

    uuid: bounds.DeviceUuid
    index: bounds.Index
    type: bounds.DeviceType
    memory_mib: bounds.DeviceMemoryMiB
    cores_percent: bounds.DeviceCores = 100
    split_count: bounds.SplitCount = 10
    numa: bounds.Index = 0
    healthy: bool = True
    mode: bounds.Policy = "hami-core"
    pair_scores: Annotated[
        tuple[tuple[bounds.DeviceUuid, int], ...],
        msgspec.Meta(max_length=bounds.MAX_DEVICES_PER_NODE),
    ] = ()
    cordoned: bool = False
    vendor: bounds.Vendor = "NVIDIA"
    mig_slots: bounds.MigSlots = 0
    mig_profiles: Annotated[
        tuple[MigProfileSpec, ...], msgspec.Meta(max_length=bounds.MAX_MIG_PROFILES)
    ] = ()

    def pair_score(self, uuid: str) -> int:
        """This device's link score to device ``uuid`` (0 when unknown)."""
        return next((score for other, score in self.pair_scores if other == uuid), 0)


class NodeDevices(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a node agent registers for its node (value of the ``vslice-nodes`` bucket).

    ``cpu_milli`` and ``memory_mib`` are the node's allocatable CPU (milli-cores) and host
    memory (MiB); ``None`` means the node does not declare them and only GPUs are checked
    (in Kubernetes, kube-scheduler checks them itself).
    """

    node: bounds.NodeName
    devices: Annotated[tuple[Device, ...], msgspec.Meta(max_length=bounds.MAX_DEVICES_PER_NODE)]
    cpu_milli: bounds.CpuMilli | None = None
    memory_mib: bounds.HostMemoryMiB | None = None


MILLI = 1000  # one whole GPU in milli-GPU, the FGD paper's unit


def free_milli(
    *,
    healthy: bool,
    split_count: int,
    slices: int,
    memory_mib: int,
    memory_used_mib: int,
    cores_percent: int,
    cores_used: int,
) -> int:
    """What is left of a device in milli-GPU (0-1000): the smaller of its free memory
    share and its free compute share, as the FGD paper measures a GPU's free capacity
    (Weng et al., ATC'23, section 3). 0 for an unhealthy device, one whose ``split_count``
    slots all hold a slice, or one registered with no memory or cores: nothing more fits.
    ``memory_mib``/``cores_percent``: the device's; ``*_used``: what its slices book."""
    if not healthy or slices >= split_count or memory_mib <= 0 or cores_percent <= 0:
        return 0
    by_mem = MILLI * max(0, memory_mib - memory_used_mib) // memory_mib
    by_cores = MILLI * max(0, cores_percent - cores_used) // cores_percent
    return max(0, min(MILLI, by_mem, by_cores))
