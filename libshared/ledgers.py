"""The ledger: which slice of which device belongs to which pod.

The value of the ``vslice-ledger`` bucket for one node is a ``NodeLedger``; every change to
it is a compare-and-set on the key's revision, so the ledger is the single truth about what
is allocated. Pure data; the scheduler core derives device usage from it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libshared import bounds

MAX_SLICES = bounds.MAX_DEVICES_PER_NODE * bounds.MAX_SPLIT_COUNT  # in one node's ledger


class Slice(msgspec.Struct, frozen=True, kw_only=True):
    """One container's share of one device: memory in MiB, compute in percent.

    ``init``: the slice is an init container's. Init containers run one after another and
    before the app containers, so a pod books, per device, the larger of its init slices'
    peak and its app slices' sum (``booked``), as HAMi does.
    ``mig_profile``, ``mig_start``, ``mig_size``: on a MIG-mode device, the GPU instance
    the slice is (profile, first memory slice and memory slices taken; HAMi's
    ``hami.io/vgpu-mig-allocations`` ``profile`` and ``placement``); ``""``, -1 and 0 on a
    sliced device.
    ``vendor``: the device's vendor (``libshared.vendors``), which names the annotations
    the slice is written to at bind.
    """

    pod_uid: bounds.Uid
    namespace: bounds.Namespace
    pod: bounds.PodName
    container: bounds.ContainerName
    container_index: bounds.Index
    uuid: bounds.DeviceUuid
    device_index: bounds.Index
    memory_mib: bounds.MemoryMiB
    cores_percent: bounds.Percent
    priority: bounds.Priority | None = None
    init: bool = False
    mig_profile: bounds.MigProfileName = ""
    mig_start: Annotated[int, msgspec.Meta(ge=-1, le=bounds.MAX_MIG_SLOTS - 1)] = -1
    mig_size: Annotated[int, msgspec.Meta(ge=0, le=bounds.MAX_MIG_SLOTS)] = 0
    vendor: bounds.Vendor = "NVIDIA"


def booked(slices: tuple[Slice, ...] | list[Slice]) -> dict[str, tuple[int, int, int]]:
    """What ``slices`` book per device UUID: ``(memory MiB, cores percent, slots)``.

    Per pod and device: app slices add up; init slices count by their peak (memory, cores)
    and one slot; the pod books the larger of the two for each of the three (at least one
    slot). Source: HAMi pkg/device/initContainer.go, ``CollapseInitContainerUsage``. Pure.
    """
    app: dict[tuple[str, str], list[int]] = {}
    init: dict[tuple[str, str], list[int]] = {}
    for s in slices:
        key = (s.pod_uid, s.uuid)
        if s.init:
            cur = init.setdefault(key, [0, 0, 1])
            cur[0], cur[1] = max(cur[0], s.memory_mib), max(cur[1], s.cores_percent)
        else:
            cur = app.setdefault(key, [0, 0, 0])
            cur[0] += s.memory_mib
            cur[1] += s.cores_percent
            cur[2] += 1
    out: dict[str, tuple[int, int, int]] = {}
    zero = [0, 0, 0]
    for key in app.keys() | init.keys():
        a, i = app.get(key, zero), init.get(key, zero)
        mem, cores, slots = out.get(key[1], (0, 0, 0))
        out[key[1]] = (
            mem + max(a[0], i[0]),
            cores + max(a[1], i[1]),
            slots + max(a[2], i[2], 1),
        )
    return out


class PodCharge(msgspec.Struct, frozen=True, kw_only=True):
    """Node-level CPU (milli-cores) and host memory (MiB) a placed pod holds."""

    pod_uid: bounds.Uid
    cpu_milli: bounds.CpuMilli = 0
    memory_mib: bounds.HostMemoryMiB = 0


class NodeLedger(msgspec.Struct, frozen=True, kw_only=True):
    """All slices (and node-level charges) on one node."""

    node: bounds.NodeName
    slices: Annotated[tuple[Slice, ...], msgspec.Meta(max_length=MAX_SLICES)] = ()
    charges: Annotated[
        tuple[PodCharge, ...], msgspec.Meta(max_length=bounds.MAX_PODS_PER_NODE)
    ] = ()

    def pods(self) -> set[str]:
        """UIDs of the pods holding anything on this node."""
        return {s.pod_uid for s in self.slices} | {c.pod_uid for c in self.charges}

    def without(self, pod_uid: str) -> NodeLedger:
        """This ledger with every slice and charge of ``pod_uid`` removed."""
        return NodeLedger(
            node=self.node,
            slices=tuple(s for s in self.slices if s.pod_uid != pod_uid),
            charges=tuple(c for c in self.charges if c.pod_uid != pod_uid),
        )
