"""The vendor boundary: what one device vendor contributes to vslice.

HAMi (pkg/device/devices.go, the ``Devices`` interface) gives every vendor the same
contract: its resource names, how a container's request is parsed and defaulted
(``GenerateResourceRequests``), its fit rules (``Fit``), the pod annotations its grants
are written to (``PatchAnnotations``), the node annotation it registers its devices by
(``GetNodeDevices``) and its handshake. vslice keeps that contract as data: one ``Vendor``
per vendor, which the scheduler core, the admission webhook, the node agent and the
metrics service read instead of naming NVIDIA's keys themselves.

Two vendors go through it:

- ``NVIDIA`` (pkg/device/nvidia/device.go): ``nvidia.com/gpu``, ``gpumem``,
  ``gpumem-percentage``, ``gpucores``; slicing by libvgpu, MIG and MPS;
- ``DCU``, Hygon's DCU (pkg/device/hygon/device.go): ``hygon.com/dcunum``, ``dcumem``,
  ``dcucores``; cores default to 100 (an exclusive card) rather than ``defaultCores``, no
  ``defaultGPUNum``, no percentage resource, HAMi's ``memoryFactor``, no NUMA binding;
  its devices are matched by type words ``hygon.com/use-dcutype`` and UUIDs
  ``hygon.com/use-gpuuuid``.

A container is fitted only to devices of its vendor (HAMi: ``getNodeResources`` keeps the
node's devices whose type holds the request's type), so a pod asking both vendors goes to
a node holding both, each request fitted by its vendor's rules; the reason for a node that
does not fit counts that vendor's devices only. Pure data and functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from libshared import annotations as keys
from libshared import resources
from libshared.resources import ContainerRequest

Parse = Callable[..., ContainerRequest | None]


@dataclass(frozen=True)
class Vendor:
    """One device vendor's contract (HAMi's ``Devices`` for it).

    ``name``: HAMi's request type and the vendor word of its grants (``NVIDIA``, ``DCU``);
    ``brand``: the maker, the ``vendor`` label of vslice's metrics.
    ``count``, ``memory``, ``cores``: its resource names; ``memory_percentage`` its
    percentage resource (None: it has none). ``parse``: one container spec into its
    ``ContainerRequest`` (``gpu_count`` 0 or None: asks none; raises ``InvalidRequest``;
    ``libshared.resources.parse_pod`` calls every vendor's).
    ``register``/``handshake``: the node annotations its device plugin writes;
    ``to_allocate``/``allocated``: the pod annotations its grants are written to at bind.
    ``use_type``/``nouse_type``/``use_uuid``/``nouse_uuid``: its pod selector annotations.
    ``numa_bind``: ``nvidia.com/numa-bind`` applies to it; ``modes``: the operating modes
    its devices may register; ``visible_devices``: the variable the device plugin hands
    the container its devices in; ``libvgpu``: libvgpu (CUDA) enforces its slices.
    """

    name: str
    brand: str
    count: str
    memory: str
    memory_percentage: str | None
    cores: str
    parse: Parse
    register: str
    handshake: str
    to_allocate: str
    allocated: str
    use_type: str
    nouse_type: str
    use_uuid: str
    nouse_uuid: str
    numa_bind: bool
    modes: tuple[str, ...]
    visible_devices: str
    libvgpu: bool

    @property
    def resources(self) -> tuple[str, ...]:
        """Its resource names."""
        named = (self.count, self.memory, self.memory_percentage, self.cores)
        return tuple(r for r in named if r is not None)


NVIDIA = Vendor(
    name=keys.NVIDIA_VENDOR,
    brand="NVIDIA",
    count=resources.GPU,
    memory=resources.GPUMEM,
    memory_percentage=resources.GPUMEM_PERCENTAGE,
    cores=resources.GPUCORES,
    parse=resources.parse_container,
    register=keys.NODE_NVIDIA_REGISTER,
    handshake=keys.NODE_HANDSHAKE_NVIDIA,
    to_allocate=keys.VGPU_DEVICES_TO_ALLOCATE,
    allocated=keys.VGPU_DEVICES_ALLOCATED,
    use_type=keys.USE_GPUTYPE,
    nouse_type=keys.NOUSE_GPUTYPE,
    use_uuid=keys.USE_GPUUUID,
    nouse_uuid=keys.NOUSE_GPUUUID,
    numa_bind=True,
    modes=("hami-core", "mig", "mps"),
    visible_devices="NVIDIA_VISIBLE_DEVICES",
    libvgpu=True,
)

DCU = Vendor(
    name=keys.DCU_VENDOR,
    brand="Hygon",
    count=resources.DCUNUM,
    memory=resources.DCUMEM,
    memory_percentage=None,
    cores=resources.DCUCORES,
    parse=resources.parse_dcu_container,
    register=keys.NODE_DCU_REGISTER,
    handshake=keys.NODE_HANDSHAKE_DCU,
    to_allocate=keys.DCU_DEVICES_TO_ALLOCATE,
    allocated=keys.DCU_DEVICES_ALLOCATED,
    use_type=keys.USE_DCUTYPE,
    nouse_type=keys.NOUSE_DCUTYPE,
    use_uuid=keys.USE_DCUUUID,
    nouse_uuid=keys.NOUSE_DCUUUID,
    numa_bind=False,
    modes=("hami-core",),
    # Hygon's DTK (ROCm/HIP) selects devices by index in this variable
    visible_devices="HIP_VISIBLE_DEVICES",
    libvgpu=False,
)

VENDORS: tuple[Vendor, ...] = (NVIDIA, DCU)
BY_NAME: dict[str, Vendor] = {v.name: v for v in VENDORS}


def of(name: str) -> Vendor:
    """The vendor called ``name``; raises ``KeyError`` naming it when none is."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no device vendor {name!r}; known: {', '.join(BY_NAME)}") from None
