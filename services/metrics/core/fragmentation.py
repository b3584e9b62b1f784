"""The fleet fragmentation figure the metrics service reports: how much of the idle GPU
capacity sits on partly used GPUs, where a pod asking for a whole GPU cannot use it.

This is vslice's own figure, not the scheduler's FGD score
(``services.scheduler.core.fragmentation``): FGD (Weng et al., "Beware of Fragmentation",
USENIX ATC'23, section 3) measures fragmentation against a target workload of task shapes,
which the metrics service does not have. The figure here is the paper's measure F for a
workload of one shape -- one whole GPU -- divided by the free capacity:

- a device's free share ``free_milli`` (milli-GPU, 1000 = a whole GPU) is the smaller of
  its free memory share and its free compute share; 0 when it is unhealthy, cordoned or every one of
  its ``split_count`` slots holds a slice (the same rule as the scheduler's view);
- for a whole-GPU shape every idle milli-GPU of a device with ``0 < free_milli < 1000`` is
  fragmented ("stranded"); a fully free device is not;
- ``ratio_percent`` = 100 x stranded / free over the devices counted (0 when nothing is
  free): 0 means every idle GPU is whole, 100 that no idle capacity can take a whole-GPU
  pod.

Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from libshared import devices
from libshared.devices import Device

MILLI = devices.MILLI  # one whole GPU in milli-GPU, the FGD paper's unit


def free_milli(device: Device, *, slices: int, memory_mib: int, cores: int) -> int:
    """The free share of ``device`` holding ``slices`` slices of ``memory_mib`` MiB and
    ``cores`` percent in all, in milli-GPU (0-1000; ``libshared.devices.free_milli``)."""
    return devices.free_milli(
        healthy=device.healthy and not device.cordoned,
        split_count=device.split_count,
        slices=slices,
        memory_mib=device.memory_mib,
        memory_used_mib=memory_mib,
        cores_percent=device.cores_percent,
        cores_used=cores,
    )


@dataclass(frozen=True)
class Figure:
    """Fragmentation of a set of devices: ``free_milli`` and ``stranded_milli`` (milli-GPU)
    and ``ratio_percent`` (0-100)."""

    free_milli: int
    stranded_milli: int

    @property
    def ratio_percent(self) -> float:
        """100 x stranded / free; 0.0 when nothing is free."""
        return 100.0 * self.stranded_milli / self.free_milli if self.free_milli else 0.0


def figure(free_shares: Iterable[int]) -> Figure:
    """The figure of devices with these free shares (milli-GPU each, 0-1000)."""
    free = stranded = 0
    for share in free_shares:
        free += share
        if 0 < share < MILLI:
            stranded += share
    return Figure(free_milli=free, stranded_milli=stranded)
