"""What a node registers: its GPUs as ``NodeDevices``, scaled and split as HAMi does.

A discovery backend (NVML or the mock) reports each physical GPU as a ``Gpu``; this
module turns the list into the node's registration, honouring HAMi's device plugin
settings (HAMi docs, "config.md"): ``deviceSplitCount`` (how many slices may share one
GPU), ``deviceMemoryScaling`` (memory registered = physical x factor; above 1 the
node overcommits memory) and ``deviceCoreScaling`` (compute registered = 100 % x
factor). It also decides which XID errors make a device unhealthy. Pure: discovery,
the event loop and publishing belong to the adapters.

A node may hold Hygon DCUs beside (or instead of) NVIDIA GPUs (``libshared.vendors.DCU``).
They register as devices of vendor ``DCU``, indexed from 0 in their own numbering (the
index ``HIP_VISIBLE_DEVICES`` names), in mode ``hami-core``, with their memory as
discovered and 100 % cores: HAMi's ``deviceMemoryScaling``/``deviceCoreScaling`` and MIG
and MPS are NVIDIA device plugin settings, while ``deviceSplitCount`` applies to both.
Each vendor's devices go into its own node annotation (``vendor_annotations``).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from libshared import annotations as hami_annotations
from libshared import migs, vendors
from libshared.devices import Device, MigProfileSpec, NodeDevices

DEFAULT_SPLIT_COUNT = 10  # HAMi deviceSplitCount default

# XIDs caused by the application, not the device: NVIDIA's k8s-device-plugin skips them
# when it decides health (its "applicationErrorXids": 13 graphics engine exception, 31
# GPU memory page fault, 43 GPU stopped processing, 45 preemptive cleanup, 68 video
# processor exception, 109 context switch timeout), and HAMi's device plugin does the same.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    """One physical GPU as discovered: ``memory_mib`` is the physical memory in MiB,
    ``mig_enabled`` whether MIG mode is on (NVML ``nvmlDeviceGetMigMode``, current mode),
    ``numa`` the NUMA node of its PCI device (0 when unknown), ``model`` the product name
    (``"Tesla T4"``); ``type`` is what the scheduler matches ``nvidia.com/use-gputype``
    against; ``minor`` is its device minor (``/dev/nvidia<minor>``; NVML
    ``nvmlDeviceGetMinorNumber``), None when unknown; ``vendor``: ``NVIDIA``, or ``DCU``
    for a Hygon DCU (``libshared.vendors``)."""

    uuid: str
    index: int
    model: str
    type: str
    memory_mib: int
    numa: int = 0
    healthy: bool = True
    minor: int | None = None
    mig_enabled: bool = False
    vendor: str = vendors.NVIDIA.name


@dataclass(frozen=True)
class MigCapacity:
    """What a GPU in MIG mode registers: ``slots`` (its memory slices) and ``profiles``
    (the GPU instance profiles it offers, smallest first)."""

    slots: int
    profiles: tuple[MigProfileSpec, ...]

    @property
    def most_instances(self) -> int:
        """The most GPU instances the GPU holds at once: as many as its profile with the
        most starts has (7 ``1g`` on an A100, though it has 8 memory slices)."""
        return max(len(p.starts) for p in self.profiles)


def mig_capacity(gpu: Gpu, allowed: Collection[str] | None = None) -> MigCapacity | None:
    """What ``gpu`` offers in MIG mode: the profiles of its model's geometry
    (``libshared.migs.geometry_for`` its product name, from NVIDIA's MIG user guide) that
    ``allowed`` names (None: all; HAMi's ``migProfileAllowlist``). None when the model has
    no tabled geometry or no profile is allowed. Pure."""
    geometry = migs.geometry_for(gpu.model)
    if geometry is None:
        return None
    profiles = migs.published(geometry, allowed)
    return MigCapacity(slots=geometry.slots, profiles=profiles) if profiles else None


@dataclass(frozen=True)
class Scaling:
    """HAMi's ``deviceSplitCount``, ``deviceMemoryScaling`` and ``deviceCoreScaling``."""

    split_count: int = DEFAULT_SPLIT_COUNT
    memory_scaling: float = 1.0
    core_scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.split_count < 1:
            raise ValueError(f"deviceSplitCount={self.split_count}: must be at least 1")
        if not (math.isfinite(self.memory_scaling) and self.memory_scaling > 0):
            raise ValueError(f"deviceMemoryScaling={self.memory_scaling}: must be above 0")
        if not (math.isfinite(self.core_scaling) and self.core_scaling > 0):
            raise ValueError(f"deviceCoreScaling={self.core_scaling}: must be above 0")


def minors(gpus: Iterable[Gpu]) -> dict[str, int]:
    """UUID -> device minor of every GPU of ``gpus`` whose minor is known. Pure."""
    return {g.uuid: g.minor for g in gpus if g.minor is not None}


def is_device_fault(xid: int) -> bool:
    """True when XID ``xid`` marks the device unhealthy (every XID but the application
    errors of ``APPLICATION_XIDS``). Pure."""
    return xid not in APPLICATION_XIDS


def node_devices(
    node: str,
    gpus: Iterable[Gpu],
    *,
    scaling: Scaling,
    unhealthy: frozenset[str] = frozenset(),
    cordoned: frozenset[str] = frozenset(),
    cpu_milli: int | None = None,
    host_memory_mib: int | None = None,
    mig: Mapping[str, MigCapacity] | None = None,
    mode: str = "hami-core",
    dcus: Iterable[Gpu] = (),
) -> NodeDevices:
    """The registration of ``node``: one ``Device`` per GPU, ordered by index, with memory
    ``floor(memory_mib x memory_scaling)`` MiB, compute ``floor(100 x core_scaling)``
    percent, ``split_count`` slices, and ``healthy`` false for a GPU in ``unhealthy``
    (UUIDs that had a device fault) or discovered unhealthy, and ``cordoned`` true for a
    GPU in ``cordoned`` (``parse_cordon``). A GPU in ``mig`` (UUID -> ``MigCapacity``)
    registers in mode ``mig`` with its slots and profiles, its physical memory unscaled,
    100 % compute and as many splits as it holds instances (``MigCapacity.most_instances``):
    each slice there is a GPU instance. Every other
    GPU registers in ``mode`` (``hami-core``, or ``mps`` on a node whose slices are MPS
    clients). The node's Hygon DCUs (``dcus``) follow, by index, as ``dcu_device``
    makes them. Pure.

    Raises ``ValueError`` when two devices share a UUID, or two GPUs (or two DCUs) an index.
    """
    ordered = sorted(gpus, key=lambda g: g.index)
    dcu_ordered = sorted(dcus, key=lambda g: g.index)
    if len({g.uuid for g in ordered + dcu_ordered}) != len(ordered) + len(dcu_ordered):
        raise ValueError(f"node {node}: a device UUID appears twice")
    if len({g.index for g in ordered}) != len(ordered):
        raise ValueError(f"node {node}: a GPU index appears twice")
    if len({g.index for g in dcu_ordered}) != len(dcu_ordered):
        raise ValueError(f"node {node}: a DCU index appears twice")
    gpu_devices = tuple(
        _mig_device(
            g,
            mig[g.uuid],
            healthy=g.healthy and g.uuid not in unhealthy,
            cordoned=g.uuid in cordoned,
        )
        if mig and g.uuid in mig
        else Device(
            uuid=g.uuid,
            index=g.index,
            type=g.type,
            memory_mib=max(1, math.floor(g.memory_mib * scaling.memory_scaling)),
            cores_percent=max(1, math.floor(100 * scaling.core_scaling)),
            split_count=scaling.split_count,
            numa=g.numa,
            healthy=g.healthy and g.uuid not in unhealthy,
            cordoned=g.uuid in cordoned,
            mode=mode,
        )
        for g in ordered
    )
    dcu_devices = tuple(
        dcu_device(
            g,
            split_count=scaling.split_count,
            healthy=g.healthy and g.uuid not in unhealthy,
            cordoned=g.uuid in cordoned,
        )
        for g in dcu_ordered
    )
    return NodeDevices(
        node=node,
        devices=gpu_devices + dcu_devices,
        cpu_milli=cpu_milli,
        memory_mib=host_memory_mib,
    )


def dcu_indices(registration: NodeDevices) -> dict[str, int]:
    """UUID -> index of every DCU ``registration`` holds: the index ``HIP_VISIBLE_DEVICES``
    names it by. A ledger slice's ``device_index`` is the device's place in the node's
    registration (the scheduler's slot), which past the node's GPUs is not the DCU's
    index. Pure."""
    return {d.uuid: d.index for d in registration.devices if d.vendor == vendors.DCU.name}


def dcu_device(dcu: Gpu, *, split_count: int, healthy: bool, cordoned: bool) -> Device:
    """The registered ``Device`` of a Hygon DCU: vendor ``DCU``, its type
    (``DCU-<model>``), index (in the DCUs' own numbering) and memory (MiB, as discovered),
    100 % cores (HAMi registers a DCU's ``devcore`` as 100), ``split_count`` slices, mode
    ``hami-core``, NUMA node 0 (DCU requests are not NUMA-bound). Pure."""
    return Device(
        uuid=dcu.uuid,
        index=dcu.index,
        type=dcu.type,
        memory_mib=max(1, dcu.memory_mib),
        cores_percent=100,
        split_count=split_count,
        healthy=healthy,
        cordoned=cordoned,
        vendor=vendors.DCU.name,
    )


def _mig_device(g: Gpu, capacity: MigCapacity, *, healthy: bool, cordoned: bool) -> Device:
    return Device(
        uuid=g.uuid,
        index=g.index,
        type=g.type,
        memory_mib=max(1, g.memory_mib),
        split_count=capacity.most_instances,
        numa=g.numa,
        healthy=healthy,
        cordoned=cordoned,
        mode="mig",
        mig_slots=capacity.slots,
        mig_profiles=capacity.profiles,
    )


DEVICE_CORDON = "hami.io/device-cordon"  # HAMi: pkg/device/nvidia/device.go
MAX_CORDON_CHARS = 65_536  # a longer annotation value is refused


def parse_cordon(value: str) -> frozenset[str]:
    """The GPU UUIDs of HAMi's ``hami.io/device-cordon`` node annotation: a comma-separated
    list, each entry trimmed of white space, empty ones skipped (HAMi's
    ``cordonedDevices``); no new slice goes to those GPUs, the slices they hold stay.
    Raises ``ValueError`` naming the annotation when ``value`` is longer than
    ``MAX_CORDON_CHARS``. Pure."""
    if len(value) > MAX_CORDON_CHARS:
        raise ValueError(
            f"{DEVICE_CORDON}: {len(value):,} characters; at most {MAX_CORDON_CHARS:,} are read"
        )
    return frozenset(u for u in (part.strip() for part in value.split(",")) if u)


def hami_register(registration: NodeDevices, vendor: vendors.Vendor = vendors.NVIDIA) -> str:
    """The node's register annotation value of ``vendor`` (HAMi's JSON list:
    ``hami.io/node-nvidia-register`` for NVIDIA, ``hami.io/node-dcu-register`` for DCU):
    that vendor's devices only, from the same codec the scheduler reads. Pure."""
    return hami_annotations.encode_node_devices(
        [d for d in registration.devices if d.vendor == vendor.name]
    )


def handshake(now: datetime.datetime) -> str:
    """A device plugin's handshake annotation value at ``now`` (an aware time):
    ``Reported <RFC 3339 time, UTC, seconds>``, as HAMi's device plugins answer the
    scheduler's ``Requesting_...`` (HAMi ``pkg/util``, the ``hami.io/node-handshake*``
    keys). Raises ``ValueError`` for a naive ``now``. Pure."""
    if now.tzinfo is None:
        raise ValueError(f"handshake time {now!r} has no time zone")
    stamp = now.astimezone(datetime.UTC).replace(microsecond=0)
    return f"Reported {stamp.isoformat().replace('+00:00', 'Z')}"


def vendor_annotations(
    registration: NodeDevices, vendor: vendors.Vendor, *, now: datetime.datetime
) -> dict[str, str]:
    """The node annotations ``vendor``'s device plugin writes: its register key
    (``hami_register``) and its handshake key (``handshake``). Pure."""
    return {
        vendor.register: hami_register(registration, vendor),
        vendor.handshake: handshake(now),
    }
