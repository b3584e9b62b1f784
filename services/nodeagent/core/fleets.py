"""Mock fleets: the nodes one mock node agent process hosts, as ``NodeDevices``.

Either a small uniform fleet (``FleetSpec``: N nodes of G identical GPUs) or a whole node
list CSV in the openb format (``libshared.traces.read_fleet``, read by the adapter). Also
the mock Hygon DCUs of a real-slice node (``parse_dcus``: ``VSLICE_MOCKDCU_DEVICES``).
Pure: builds values, reads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libshared import bounds
from libshared.devices import Device, NodeDevices

DEFAULT_SPLIT_COUNT = 10  # HAMi deviceSplitCount default
MAX_PRODUCT_NAME = 95  # NVML's product name buffer (NVML_DEVICE_NAME_V2_BUFFER_SIZE) less NUL

MOCKDCU_VARIABLE = "VSLICE_MOCKDCU_DEVICES"
DEFAULT_DCU_MODEL = "Z100"  # Hygon's DCU Z100, the card HAMi's DCU examples name
DCU_TYPE_PREFIX = "DCU-"  # HAMi's DCU device types start with "DCU" (its use-dcutype words)
MAX_DCU_MODEL = 32  # characters of a mock DCU's model
MAX_DCU_LIST = 4_096  # characters of a whole VSLICE_MOCKDCU_DEVICES value


@dataclass(frozen=True)
class FleetSpec:
    """``nodes`` nodes named ``<name_prefix>-<i>``, each with ``gpus`` GPUs of ``memory_mib``
    MiB and 100 % cores, type ``gpu_type``, shared by at most ``split_count`` slices;
    ``cpu_milli`` / ``host_memory_mib`` per node (``None``: not declared). ``devices``
    (``(uuid, memory_mib)`` pairs) replaces ``gpus`` and ``memory_mib`` with these exact
    devices, for a single node; ``models``: their ``<product name>[:mig]`` on the mock
    NVML (``parse_models``)."""

    nodes: int = 1
    gpus: int = 2
    memory_mib: int = 16384
    gpu_type: str = "MOCK-GPU-16G"
    split_count: int = DEFAULT_SPLIT_COUNT
    name_prefix: str = "mock"
    cpu_milli: int | None = None
    host_memory_mib: int | None = None
    devices: tuple[tuple[str, int], ...] = ()
    models: tuple[str, ...] = ()


def _entries(text: str) -> list[tuple[str, int, str]]:
    """``(uuid, memory_mib, tail)`` of each entry of a device list; ``tail``: the entry's
    ``<product name>[:mig]`` part, "" when it has none."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        uuid, sep, rest = entry.partition(":")
        mib, _, tail = rest.partition(":")
        name, _, flag = tail.partition(":")
        if not sep or not uuid or not mib.isdigit() or int(mib) < 1:
            raise ValueError(
                f"mock device {entry!r}: expected <uuid>:<memory_mib>[:<product name>[:mig]]"
            )
        if len(name) > MAX_PRODUCT_NAME or not name.isprintable():
            raise ValueError(
                f"mock device {entry[:80]!r}...: a product name of at most"
                f" {MAX_PRODUCT_NAME} printable characters"
            )
        if (tail and not name.strip()) or flag not in ("", "mig"):
            raise ValueError(
                f"mock device {entry!r}: the part after the memory must be"
                " <product name> or <product name>:mig"
            )
        out.append((uuid, int(mib), tail))
    if len({u for u, _, _ in out}) != len(out):
        raise ValueError(f"mock devices {text!r}: a UUID appears twice")
    return out


def parse_devices(text: str) -> tuple[tuple[str, int], ...]:
    """``"<uuid>:<memory_mib>[:<product name>[:mig]][,...]"`` (the
    ``VSLICE_MOCKGPU_DEVICES`` format) as ``((uuid, memory_mib), ...)``; ``parse_models``
    has the rest. Raises ``ValueError`` naming the bad entry."""
    return tuple((u, m) for u, m, _ in _entries(text))


def parse_models(text: str) -> tuple[str, ...]:
    """The ``<product name>[:mig]`` part of each entry of a device list ("" where an entry
    has none), in list order: what the mock NVML reports as the product name and whether
    the GPU starts in MIG mode. Raises ``ValueError`` as ``parse_devices``."""
    return tuple(t for _, _, t in _entries(text))


def device_list(devices: Sequence[tuple[str, int]], models: Sequence[str] = ()) -> str:
    """The ``VSLICE_MOCKGPU_DEVICES`` text of ``devices`` and their ``models`` (see
    ``parse_models``; missing ones: none). Pure."""
    tails = list(models) + [""] * (len(devices) - len(models))
    return ",".join(
        f"{u}:{m}:{t}" if t else f"{u}:{m}" for (u, m), t in zip(devices, tails, strict=False)
    )


def build(spec: FleetSpec) -> list[NodeDevices]:
    """The nodes of ``spec``; device UUIDs are ``GPU-<node>-<i>`` (stable across restarts).

    Raises ``ValueError`` for a non-positive count or size.
    """
    if spec.nodes < 1 or spec.gpus < 0 or spec.memory_mib < 1 or spec.split_count < 1:
        raise ValueError(f"fleet spec {spec}: nodes >= 1, gpus >= 0, memory and split >= 1")
    if spec.devices:
        if spec.nodes != 1:
            raise ValueError(f"fleet spec {spec}: listed devices make one node")
        return [
            NodeDevices(
                node=f"{spec.name_prefix}-0",
                devices=tuple(
                    Device(
                        uuid=uuid,
                        index=i,
                        type=spec.gpu_type,
                        memory_mib=mib,
                        split_count=spec.split_count,
                    )
                    for i, (uuid, mib) in enumerate(spec.devices)
                ),
                cpu_milli=spec.cpu_milli,
                memory_mib=spec.host_memory_mib,
            )
        ]
    out = []
    for n in range(spec.nodes):
        name = f"{spec.name_prefix}-{n}"
        out.append(
            NodeDevices(
                node=name,
                devices=tuple(
                    Device(
                        uuid=f"GPU-{name}-{i}",
                        index=i,
                        type=spec.gpu_type,
                        memory_mib=spec.memory_mib,
                        split_count=spec.split_count,
                    )
                    for i in range(spec.gpus)
                ),
                cpu_milli=spec.cpu_milli,
                memory_mib=spec.host_memory_mib,
            )
        )
    return out


@dataclass(frozen=True)
class MockDcu:
    """One mock Hygon DCU: ``uuid``, ``memory_mib`` (MiB) and ``model`` (``Z100``); its
    device type is ``DCU-<model>`` (``type``)."""

    uuid: str
    memory_mib: int
    model: str = DEFAULT_DCU_MODEL

    @property
    def type(self) -> str:
        """``DCU-<model>``: what ``hygon.com/use-dcutype`` words are matched against."""
        return f"{DCU_TYPE_PREFIX}{self.model}"


def _dcu_problem(entry: str, reason: str) -> ValueError:
    shown = entry if len(entry) <= 80 else f"{entry[:80]}..."
    return ValueError(f"{MOCKDCU_VARIABLE} entry {shown!r}: {reason}")


def parse_dcus(text: str) -> tuple[MockDcu, ...]:
    """``"<uuid>:<memory_mib>[:<model>][,...]"`` (the ``VSLICE_MOCKDCU_DEVICES`` format) as
    ``MockDcu`` values, in list order; empty entries are skipped, a missing model is
    ``DEFAULT_DCU_MODEL``. Pure.

    The text is untrusted: raises ``ValueError`` naming the variable and the entry when the
    whole value is over ``MAX_DCU_LIST`` characters, it lists more than
    ``bounds.MAX_DEVICES_PER_NODE`` DCUs, a UUID is empty, over ``bounds.MAX_UUID``
    characters, unprintable or listed twice, the memory is not a whole number of MiB in
    1..``bounds.MAX_MEMORY_MIB``, or the model is empty, over ``MAX_DCU_MODEL`` characters,
    holds anything but letters, digits, ``-``, ``_`` and ``.``, or is followed by more.
    """
    if len(text) > MAX_DCU_LIST:
        raise ValueError(
            f"{MOCKDCU_VARIABLE}: {len(text):,} characters; at most {MAX_DCU_LIST:,} are read"
        )
    out: list[MockDcu] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3):
            raise _dcu_problem(entry, "expected <uuid>:<memory_mib>[:<model>]")
        uuid, mib = parts[0].strip(), parts[1].strip()
        model = parts[2].strip() if len(parts) == 3 else DEFAULT_DCU_MODEL
        if not uuid or len(uuid) > bounds.MAX_UUID or not uuid.isprintable():
            raise _dcu_problem(entry, f"the UUID must be 1-{bounds.MAX_UUID} printable characters")
        if not (mib.isascii() and mib.isdigit()) or not 1 <= int(mib) <= bounds.MAX_MEMORY_MIB:
            raise _dcu_problem(
                entry, f"memory {mib!r}: a whole number of MiB, 1-{bounds.MAX_MEMORY_MIB}"
            )
        if (
            not model
            or len(model) > MAX_DCU_MODEL
            or not model.isascii()
            or not all(c.isalnum() or c in "-_." for c in model)
        ):
            raise _dcu_problem(
                entry,
                f"model {model!r}: 1-{MAX_DCU_MODEL} letters, digits, '-', '_' or '.'",
            )
        out.append(MockDcu(uuid=uuid, memory_mib=int(mib), model=model))
        if len(out) > bounds.MAX_DEVICES_PER_NODE:
            raise ValueError(
                f"{MOCKDCU_VARIABLE}: more than {bounds.MAX_DEVICES_PER_NODE} DCUs"
                " (a node registers at most that many devices)"
            )
    seen: set[str] = set()
    for d in out:
        if d.uuid in seen:
            raise _dcu_problem(d.uuid, "this UUID is listed twice")
        seen.add(d.uuid)
    return tuple(out)


def dcu_list(dcus: Sequence[MockDcu]) -> str:
    """The ``VSLICE_MOCKDCU_DEVICES`` text of ``dcus`` (``parse_dcus`` reads it back). Pure."""
    return ",".join(f"{d.uuid}:{d.memory_mib}:{d.model}" for d in dcus)
