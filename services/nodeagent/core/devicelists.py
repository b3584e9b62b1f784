"""How a container's GPUs are named to the container runtime: the device list strategies.

kubelet hands a device plugin's ``ContainerAllocateResponse`` to the runtime; which of its
parts carries the list of GPUs is the plugin's *device list strategy*, the choice HAMi's
NVIDIA device plugin and NVIDIA's k8s-device-plugin offer as ``--device-list-strategy``
(env ``DEVICE_LIST_STRATEGY``; HAMi ``cmd/device-plugin/nvidia/main.go``, default
``envvar``; several may be given, comma-separated):

- ``envvar``: ``NVIDIA_VISIBLE_DEVICES=<uuid>,<uuid>`` for the NVIDIA container runtime
  hook (HAMi ``plugin/server.go`` ``updateResponseForDeviceListEnvVar``);
- ``volume-mounts``: ``NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices`` and one
  mount of ``/dev/null`` at ``/var/run/nvidia-container-devices/<uuid>`` per GPU, so an
  unprivileged pod cannot widen its GPU list by setting the variable itself (HAMi
  ``updateResponseForDeviceMounts``; the runtime's ``accept-nvidia-visible-devices-as-
  volume-mounts``);
- ``cdi-annotations``: one annotation ``cdi.k8s.io/nvidia-device-plugin_<response id>``
  whose value lists the CDI device names ``nvidia.com/gpu=<uuid>`` (HAMi
  ``updateResponseForCDI`` / ``getCDIDeviceAnnotations``, keys and values as the CDI
  library's ``producer/annotations`` ``Key`` and ``Value`` build them). With only CDI
  strategies nothing else names the devices: HAMi returns before the variable, the mounts
  and the device specs (``getAllocateResponse``, ``AllCDIEnabled``).

**Device specs.** HAMi passes device nodes to kubelet only when ``--pass-device-specs``
(env ``PASS_DEVICE_SPECS``, default off) is set, whatever the strategy, and never when
every strategy is CDI (``getAllocateResponse``); the nodes are ``/dev/nvidia<minor>`` of
each GPU, and ``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools``,
``/dev/nvidia-modeset`` when they exist on the host (``rm/nvml_manager.go``
``GetDevicePaths``, ``plugin/server.go`` ``apiDeviceSpecs``), each ``rw``, the host path
under ``--nvidia-dev-root`` (env ``NVIDIA_DEV_ROOT``). The runtime hook or CDI adds the
nodes itself; the specs matter where the runtime's device cgroup must list them (kubelet's
static CPU manager re-applying cgroups, NVIDIA's ``compatWithCPUManager``).

Pure: which optional nodes exist on the host and which response ID a call uses are the
adapter's to find out and pass in. Left out: HAMi's ``cdi-cri`` strategy, IMEX channels,
the index device ID strategy and a custom CDI annotation prefix.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ENVVAR = "envvar"
VOLUME_MOUNTS = "volume-mounts"
CDI_ANNOTATIONS = "cdi-annotations"
STRATEGIES = (ENVVAR, VOLUME_MOUNTS, CDI_ANNOTATIONS)
CDI_STRATEGIES = frozenset({CDI_ANNOTATIONS})
DEFAULT_STRATEGIES = (ENVVAR,)

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
# HAMi plugin/server.go: deviceListAsVolumeMountsContainerPathRoot / ...HostPath
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
VOLUME_MOUNTS_HOST_PATH = "/dev/null"
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"  # CDI producer/annotations Prefix
CDI_PLUGIN_NAME = "nvidia-device-plugin"  # HAMi getCDIDeviceAnnotations
CDI_KIND = "nvidia.com/gpu"  # vendor nvidia.com, class gpu (HAMi cdi.go QualifiedName)
CDI_MAX_NAME = 63  # plugin name + "_" + response id (CDI producer/annotations Key)

CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
DEVICE_PERMISSIONS = "rw"

_CDI_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_CDI_DEVICE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")


def parse_strategies(text: str) -> tuple[str, ...]:
    """The strategies of a ``--device-list-strategy`` value: comma-separated names of
    ``STRATEGIES``, blanks around them ignored, each kept once in the order given. Pure.

    Raises ``ValueError`` naming the flag and the value when it is empty or names an
    unknown strategy.
    """
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise ValueError(f"--device-list-strategy {text!r}: empty; one of {', '.join(STRATEGIES)}")
    for n in names:
        if n not in STRATEGIES:
            raise ValueError(
                f"--device-list-strategy {text!r}: unknown strategy {n!r}; "
                f"one of {', '.join(STRATEGIES)}"
            )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Mount:
    """A host path the runtime bind-mounts into the container."""

    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class DeviceSpec:
    """A device node the runtime creates in the container (and allows in its cgroup)."""

    container_path: str
    host_path: str
    permissions: str = DEVICE_PERMISSIONS


@dataclass(frozen=True)
class DeviceList:
    """The parts of one container's response that name its GPUs: ``envs`` (at most
    ``NVIDIA_VISIBLE_DEVICES``), ``mounts``, ``annotations`` and ``devices``."""

    envs: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    devices: tuple[DeviceSpec, ...] = ()


@dataclass(frozen=True)
class DeviceListSettings:
    """The node's choice: ``strategies`` (of ``STRATEGIES``, at least one), whether to
    ``pass_device_specs``, and ``dev_root``, the host directory the ``/dev`` paths of
    the specs are under (``/``, or ``/run/nvidia/driver`` with the driver container).

    Raises ``ValueError`` naming the field on an unknown or missing strategy or a
    relative ``dev_root``."""

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    pass_device_specs: bool = False
    dev_root: str = "/"

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ValueError("strategies=(): at least one device list strategy")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"strategies: unknown strategy {s!r}; one of {STRATEGIES}")
        if not posixpath.isabs(self.dev_root):
            raise ValueError(f"dev_root={self.dev_root!r}: must be an absolute path")

    @property
    def only_cdi(self) -> bool:
        """True when every strategy is a CDI one (nothing else names the devices)."""
        return set(self.strategies) <= CDI_STRATEGIES


def cdi_device(uuid: str) -> str:
    """The CDI qualified name of GPU ``uuid``: ``nvidia.com/gpu=<uuid>``. Pure.

    Raises ``ValueError`` when ``uuid`` is not a valid CDI device name (letters, digits
    and ``_.:-``, starting and ending with a letter or digit; CDI ``parser``)."""
    if not _CDI_DEVICE.fullmatch(uuid):
        raise ValueError(f"GPU {uuid!r}: not a valid CDI device name")
    return f"{CDI_KIND}={uuid}"


def cdi_annotation_key(response_id: str) -> str:
    """``cdi.k8s.io/nvidia-device-plugin_<response_id>``, the key of one Allocate's CDI
    request; ``/`` in the ID becomes ``_``. Pure.

    Raises ``ValueError`` when the part after the prefix is over 63 characters or not
    letters, digits and ``_.-`` between a letter or digit at each end (CDI
    ``producer/annotations`` ``Key``)."""
    name = f"{CDI_PLUGIN_NAME}_{response_id.replace('/', '_')}"
    if len(name) > CDI_MAX_NAME or not _CDI_NAME.fullmatch(name):
        raise ValueError(
            f"CDI annotation name {name!r}: must be at most {CDI_MAX_NAME} letters, digits "
            "and _.- starting and ending with a letter or digit"
        )
    return CDI_ANNOTATION_PREFIX + name


def device_list(
    uuids: Sequence[str],
    *,
    settings: DeviceListSettings,
    response_id: str,
    minors: Mapping[str, int],
    present: frozenset[str] = frozenset(),
) -> DeviceList:
    """The parts naming GPUs ``uuids`` (the container's CUDA device order; repeats kept
    once) under ``settings``, for HAMi's strategies as the module docstring lists them.

    ``response_id``: this Allocate's unique ID (the CDI annotation key's suffix; HAMi uses
    a random UUID per response). ``minors``: each GPU's device minor (NVML
    ``nvmlDeviceGetMinorNumber``), read only for device specs. ``present``: which of
    ``CONTROL_NODES`` exist on the host (the others are left out, as HAMi does). Pure.

    Raises ``ValueError`` naming the GPU when device specs are asked for and its minor is
    unknown, or when a UUID or ``response_id`` makes no valid CDI name.
    """
    ids = list(dict.fromkeys(uuids))
    envs: dict[str, str] = {}
    mounts: list[Mount] = []
    annotations: dict[str, str] = {}
    devices: list[DeviceSpec] = []
    if CDI_ANNOTATIONS in settings.strategies and ids:
        annotations[cdi_annotation_key(response_id)] = ",".join(cdi_device(u) for u in ids)
    if settings.only_cdi:
        return DeviceList(annotations=annotations)
    if ENVVAR in settings.strategies:
        envs[VISIBLE_DEVICES] = ",".join(ids)
    if VOLUME_MOUNTS in settings.strategies:
        # as HAMi: with both, the variable points at the mounts (the later strategy wins)
        envs[VISIBLE_DEVICES] = VOLUME_MOUNTS_ROOT
        mounts.extend(
            Mount(
                container_path=posixpath.join(VOLUME_MOUNTS_ROOT, u),
                host_path=VOLUME_MOUNTS_HOST_PATH,
                read_only=False,
            )
            for u in ids
        )
    if settings.pass_device_specs:
        paths = [p for p in CONTROL_NODES if p in present]
        for u in ids:
            minor = minors.get(u)
            if minor is None:
                raise ValueError(f"GPU {u}: device minor unknown, cannot pass its device node")
            paths.append(f"/dev/nvidia{minor}")
        devices.extend(
            DeviceSpec(container_path=p, host_path=posixpath.join(settings.dev_root, p[1:]))
            for p in paths
        )
    return DeviceList(
        envs=envs, mounts=tuple(mounts), annotations=annotations, devices=tuple(devices)
    )
