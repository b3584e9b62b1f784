"""Per-node device configuration: HAMi's device plugin ``nodeconfig``, read and resolved.

HAMi's device plugin reads a ``config.json`` (the ``hami-device-plugin`` ConfigMap;
HAMi's ``charts/hami/values.yaml``, ``devicePlugin.nodeConfiguration``, and
``pkg/device/nvidia/device.go``, ``DevicePluginConfigs``) whose ``nodeconfig`` list
holds, per node name, values that override the plugin's defaults::

    {"nodeconfig": [{"name": "gpu-7", "operatingmode": "hami-core",
                     "devicememoryscaling": 1.5, "devicecorescaling": 1,
                     "devicesplitcount": 4, "migstrategy": "none",
                     "filterdevices": {"uuid": ["GPU-..."], "index": [3]}}]}

vslice's node agent reads the same file and keys (``--node-config``). A key left out
keeps the agent's default (its ``--memory-scaling``, ``--core-scaling``,
``--split-count`` flags). What each key does here:

- ``devicememoryscaling`` (> 0): memory registered = physical x factor. Above 1 the node
  oversubscribes: the scheduler books slices up to the scaled size, and libvgpu caps each
  process at its slice's limit only, so when the card is physically full an allocation
  within the slice fails with the driver's out-of-memory error (HAMi documents the same
  for its ``deviceMemoryScaling``: virtual device memory beyond the physical memory).
- ``devicecorescaling`` (> 0): compute registered = 100 % x factor.
- ``devicesplitcount`` (>= 1): how many slices may share one GPU.
- ``filterdevices``: GPUs (by ``uuid`` or by ``index``) the node does not offer; they are
  left out of its registration, so no new slice goes there.
- ``preconfigureddevicememory`` (MiB, >= 0; 0 = as discovered): the memory a GPU is
  registered with before scaling (HAMi: for GPUs whose memory NVML does not report, such
  as unified-memory parts).
- ``operatingmode``: ``hami-core`` (slices enforced by libvgpu) or ``mig`` (dynamic MIG:
  each GPU in MIG mode whose model has a tabled geometry, ``libshared.migs``, registers
  its GPU instance profiles, and the agent creates the instance a slice names when the
  slice is prepared and destroys it when it is released) or ``mps`` (NVIDIA's
  Multi-Process Service: every slice's processes run as clients of the node's MPS
  server, which holds each to its slice through ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``; no libvgpu).
- ``migstrategy`` (``none``/``single``/``mixed``), ``enablenumatopology``,
  ``enablegetpreferredallocation``, ``libcudaloglevel``: accepted for compatibility
  with HAMi's file, and not used by vslice's agent.

The file may also hold HAMi's ``migProfileAllowlist`` (HAMi: ``charts/hami/values.yaml``,
``device-config``; ``docs/develop/dynamic-mig-migration.md``): ``[{"models": [...],
"profiles": [...]}]``; with it, a GPU in MIG mode offers only the profiles listed for its
model (its NVML product name, with or without the ``NVIDIA `` prefix), and a model not
listed offers none (so it is not registered); without it, every tabled profile.

Any other key is refused (a misspelt key would otherwise be silently ignored), as are
two entries for one node. The file is untrusted input: its size is bounded
(``MAX_BYTES``), and every error names the entry, the key and the value. Pure: reading
the file and reloading it belong to the adapters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from libshared import bounds
from services.nodeagent.core import registrations
from services.nodeagent.core.registrations import Gpu, Scaling

MAX_BYTES = 1 << 20  # a config file larger than this is refused (1 MiB)
MAX_NODES = 100_000  # entries in ``nodeconfig``
MAX_FILTERED = 1_024  # UUIDs or indices in one ``filterdevices`` list
MAX_ALLOW = 1_024  # entries of migProfileAllowlist, and models or profiles in one

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Uuid = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class NodeConfigError(ValueError):
    """The device configuration is unusable: ``where`` (the file, entry and key) and why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class FilterDevices(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """GPUs a node does not offer, by UUID and by index (HAMi's ``FilterDevice``)."""

    uuid: Annotated[list[Uuid], msgspec.Meta(max_length=MAX_FILTERED)] = []
    index: Annotated[
        list[Annotated[int, msgspec.Meta(ge=0, le=1_023)]], msgspec.Meta(max_length=MAX_FILTERED)
    ] = []


class NodeEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``nodeconfig`` entry as HAMi writes it (keys in lower case, no separators);
    None: the key was left out."""

    name: Name
    operatingmode: Literal["hami-core", "mig", "mps"] | None = None
    devicememoryscaling: float | None = None
    devicecorescaling: float | None = None
    devicesplitcount: Annotated[int, msgspec.Meta(ge=1, le=1_000)] | None = None
    preconfigureddevicememory: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] | None = None
    migstrategy: Literal["none", "single", "mixed"] | None = None
    filterdevices: FilterDevices | None = None
    enablenumatopology: bool | None = None
    enablegetpreferredallocation: bool | None = None
    libcudaloglevel: Annotated[int, msgspec.Meta(ge=0, le=4)] | None = None


class MigAllow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``migProfileAllowlist`` entry: the GPU ``models`` (product names) it covers and
    the ``profiles`` (``"1g.10gb"``) they may offer."""

    models: Annotated[list[Name], msgspec.Meta(max_length=MAX_ALLOW)]
    profiles: Annotated[list[bounds.MigProfileName], msgspec.Meta(max_length=MAX_ALLOW)]


class DeviceConfigFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole file: ``{"nodeconfig": [...], "migProfileAllowlist": [...]}``."""

    nodeconfig: Annotated[list[NodeEntry], msgspec.Meta(max_length=MAX_NODES)] = []
    migProfileAllowlist: Annotated[list[MigAllow], msgspec.Meta(max_length=MAX_ALLOW)] | None = None


@dataclass(frozen=True)
class NodeSettings:
    """What one node registers with, the defaults overridden by its entry: ``scaling``
    (split count, memory and core scaling), ``filter_uuids`` / ``filter_indices`` (GPUs
    left out), ``memory_mib`` (> 0: every GPU's memory before scaling, MiB; 0 = as
    discovered), ``mode`` (``hami-core``, ``mig`` or ``mps``), ``mig_allowlist``
    (product name -> the profiles it may offer; None: every tabled profile)."""

    scaling: Scaling
    filter_uuids: frozenset[str] = frozenset()
    filter_indices: frozenset[int] = frozenset()
    memory_mib: int = 0
    mode: str = "hami-core"
    mig_allowlist: Mapping[str, frozenset[str]] | None = None

    def allowed_profiles(self, model: str) -> frozenset[str] | None:
        """The MIG profiles a GPU of product name ``model`` may offer (None: all); a name
        matches with or without NVML's ``NVIDIA `` prefix."""
        if self.mig_allowlist is None:
            return None
        bare = model.removeprefix("NVIDIA ").strip()
        return self.mig_allowlist.get(model, frozenset()) | self.mig_allowlist.get(
            bare, frozenset()
        )

    def gpus(self, found: Sequence[Gpu]) -> list[Gpu]:
        """The GPUs of ``found`` the node offers, with their memory as configured: not
        filtered, and in the node's mode (``left_out`` says why one is not)."""
        kept = [g for g in found if not self.left_out(g)]
        if self.memory_mib and self.mode != "mig":
            return [msgspec.structs.replace(g, memory_mib=self.memory_mib) for g in kept]
        return kept

    def dcus(self, found: Sequence[Gpu]) -> list[Gpu]:
        """The Hygon DCUs of ``found`` the node offers: those ``filterdevices`` does not
        name by UUID (its indices are the NVIDIA GPUs'; DCUs have their own numbering, and
        operating modes and ``preconfigureddevicememory`` are NVIDIA's)."""
        return [g for g in found if g.uuid not in self.filter_uuids]

    def left_out(self, gpu: Gpu) -> str:
        """Why ``gpu`` is not offered ("" when it is): filtered; in MIG mode on a
        ``hami-core`` node (CUDA sees no device on it until instances exist); on a ``mig``
        node, not in MIG mode or of a model with no tabled or allowed profile."""
        if gpu.uuid in self.filter_uuids or gpu.index in self.filter_indices:
            return "filtered (filterdevices)"
        if self.mode != "mig":
            return f"in MIG mode on a {self.mode} node" if gpu.mig_enabled else ""
        if not gpu.mig_enabled:
            return "not in MIG mode (nvidia-smi -mig 1 and a GPU reset enable it)"
        if registrations.mig_capacity(gpu, self.allowed_profiles(gpu.model)) is None:
            return f"no MIG profile of {gpu.model!r} is tabled and allowed"
        return ""

    def mig(self, gpus: Sequence[Gpu]) -> dict[str, registrations.MigCapacity]:
        """UUID -> what each GPU of ``gpus`` offers in MIG mode (empty off a ``mig`` node)."""
        if self.mode != "mig":
            return {}
        out = {}
        for g in gpus:
            capacity = registrations.mig_capacity(g, self.allowed_profiles(g.model))
            if capacity is not None:
                out[g.uuid] = capacity
        return out


def parse(data: bytes, *, source: str = "<node config>") -> DeviceConfigFile:
    """Decode and check a ``config.json`` (see the module docstring).

    Raises ``NodeConfigError`` naming ``source``, the entry and the key: larger than
    ``MAX_BYTES``, not JSON of that shape, an unknown key, a value out of range, a
    scaling that is not a finite number above 0, two entries for one node.
    """
    if len(data) > MAX_BYTES:
        raise NodeConfigError(source, f"{len(data):,} bytes; at most {MAX_BYTES:,} are read")
    try:
        config = msgspec.json.decode(data, type=DeviceConfigFile)
    except msgspec.ValidationError as exc:
        raise NodeConfigError(source, _with_value(str(exc), data)) from exc
    except msgspec.DecodeError as exc:
        raise NodeConfigError(source, f"not JSON: {exc}") from exc
    seen: set[str] = set()
    for i, entry in enumerate(config.nodeconfig):
        where = f"{source}: nodeconfig[{i}] ({entry.name})"
        if entry.name in seen:
            raise NodeConfigError(where, f"a second entry for node {entry.name!r}")
        seen.add(entry.name)
        for key in ("devicememoryscaling", "devicecorescaling"):
            value = getattr(entry, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise NodeConfigError(f"{where}.{key}", f"{value!r}: must be a number above 0")
    return config


_PATH = re.compile(r"at `(\$[^`]*)`")
_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


def _with_value(message: str, data: bytes) -> str:
    """msgspec's ``message`` (it names the key by its path) with the value found there,
    when that value is a scalar."""
    found = _PATH.search(message)
    if found is None:
        return message
    try:
        value: object = msgspec.json.decode(data)
    except msgspec.DecodeError:  # a number no Python type holds, say
        return message
    for key, index in _STEP.findall(found.group(1)):
        if key and isinstance(value, dict) and key in value:
            value = value[key]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return message
    if isinstance(value, dict | list):
        return message
    return f"{message} (value: {value!r})"


def resolve(config: DeviceConfigFile, node: str, defaults: Scaling) -> NodeSettings:
    """The settings of ``node``: ``defaults`` with its entry's values over them (no entry:
    the defaults)."""
    allow: dict[str, frozenset[str]] | None = None
    if config.migProfileAllowlist is not None:
        allow = {}
        for item in config.migProfileAllowlist:
            for model in item.models:
                allow[model] = allow.get(model, frozenset()) | frozenset(item.profiles)
    entry = next((e for e in config.nodeconfig if e.name == node), None)
    if entry is None:
        return NodeSettings(scaling=defaults, mig_allowlist=allow)
    mode = entry.operatingmode or "hami-core"
    scaling = Scaling(
        split_count=defaults.split_count
        if entry.devicesplitcount is None
        else entry.devicesplitcount,
        memory_scaling=defaults.memory_scaling
        if entry.devicememoryscaling is None
        else entry.devicememoryscaling,
        core_scaling=defaults.core_scaling
        if entry.devicecorescaling is None
        else entry.devicecorescaling,
    )
    filtered = entry.filterdevices or FilterDevices()
    return NodeSettings(
        scaling=scaling,
        filter_uuids=frozenset(filtered.uuid),
        filter_indices=frozenset(filtered.index),
        memory_mib=entry.preconfigureddevicememory or 0,
        mode=mode,
        mig_allowlist=allow,
    )


def load(data: bytes, node: str, defaults: Scaling, *, source: str) -> NodeSettings:
    """``resolve(parse(data))`` for ``node``. Raises ``NodeConfigError``."""
    return resolve(parse(data, source=source), node, defaults)
