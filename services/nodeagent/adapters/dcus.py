"""Hygon DCU discovery behind one interface: the mock DCUs of ``VSLICE_MOCKDCU_DEVICES``.

A node agent lists its DCUs beside its NVIDIA GPUs (``services.nodeagent.adapters.gpus``);
each one is registered as a device of vendor ``DCU`` (``core.registrations.dcu_device``).
Only the mock backend exists: a real one would ask Hygon's management library (``hy-smi``,
``rocm-smi``'s library in the DTK) for each card's UUID, model and memory, and no such
library or card is at hand to build or test it against, so none is written here. The mock
has no readings: no usage is read back from a DCU, and no fault marks one unhealthy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from libshared import vendors
from services.nodeagent.core import fleets
from services.nodeagent.core.registrations import Gpu


class Dcus(Protocol):
    """What the node agent needs from a DCU backend (calls may block)."""

    kind: str

    def discover(self) -> list[Gpu]:
        """Every DCU of the node, indexed from 0 in the DCUs' own numbering, vendor ``DCU``."""
        ...


class MockDcus:
    """The DCUs of a ``VSLICE_MOCKDCU_DEVICES`` list (``fleets.parse_dcus``), as listed."""

    kind = "mock"

    def __init__(self, dcus: Sequence[fleets.MockDcu]) -> None:
        self.dcus = tuple(dcus)

    def discover(self) -> list[Gpu]:
        """The listed DCUs in list order: index ``i`` is the ``i``-th entry, type
        ``DCU-<model>``, memory as listed (MiB), healthy."""
        return [
            Gpu(
                uuid=d.uuid,
                index=i,
                model=d.model,
                type=d.type,
                memory_mib=d.memory_mib,
                vendor=vendors.DCU.name,
            )
            for i, d in enumerate(self.dcus)
        ]
