"""HAMi's annotation keys and the codecs for the values vslice reads and writes.

Keys and formats follow HAMi (Project-HAMi/HAMi, docs "config.md" and the scheduler's
pod/node annotations) so that HAMi tooling reads vslice clusters and HAMi pod specs work
unchanged. Decoding is strict: a malformed value raises ``AnnotationDecodeError`` and is
never read as "nothing allocated" (HAMi #2958 silently dropped such capacity).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libshared import bounds
from libshared.devices import Device
from libshared.errors import AnnotationDecodeError

# Pod annotations a user sets (HAMi docs: "Device selection", "Scheduler policy").
USE_GPUTYPE = "nvidia.com/use-gputype"
NOUSE_GPUTYPE = "nvidia.com/nouse-gputype"
USE_GPUUUID = "nvidia.com/use-gpuuuid"
NOUSE_GPUUUID = "nvidia.com/nouse-gpuuuid"
NUMA_BIND = "nvidia.com/numa-bind"
VGPU_MODE = "nvidia.com/vgpu-mode"  # the device modes a pod accepts (hami-core, mig, mps)
NODE_SCHEDULER_POLICY = "hami.io/node-scheduler-policy"
GPU_SCHEDULER_POLICY = "hami.io/gpu-scheduler-policy"
DEVICE_SCORING_WEIGHTS = "hami.io/device-scoring-weights"

# Pod annotations the scheduler writes at bind time.
VGPU_NODE = "hami.io/vgpu-node"
VGPU_DEVICES_ALLOCATED = "hami.io/vgpu-devices-allocated"
VGPU_DEVICES_TO_ALLOCATE = "hami.io/vgpu-devices-to-allocate"
VGPU_MIG_ALLOCATIONS = "hami.io/vgpu-mig-allocations"  # the GPU instances of MIG slices
BIND_PHASE = "hami.io/bind-phase"
BIND_TIME = "hami.io/bind-time"
# hami.io/bind-phase values: the scheduler writes "allocating" at bind; the device plugin
# answers "success" or "failed" from Allocate (HAMi's values).
BIND_PHASE_ALLOCATING = "allocating"
BIND_PHASE_SUCCESS = "success"
BIND_PHASE_FAILED = "failed"
# The vendor word of HAMi's NVIDIA entries in hami.io/vgpu-devices-*.
NVIDIA_VENDOR = "NVIDIA"

# Node annotations the device plugin writes.
NODE_NVIDIA_REGISTER = "hami.io/node-nvidia-register"
NODE_NVIDIA_SCORE = "hami.io/node-nvidia-score"
NODE_HANDSHAKE_NVIDIA = "hami.io/node-handshake"

# Hygon DCU (HAMi pkg/device/hygon/device.go): the node's devices, the device plugin's
# handshake, the pod's grants (same "UUID,DCU,MiB,cores:;" format as NVIDIA's) and the
# pod's type and UUID selectors.
DCU_VENDOR = "DCU"
NODE_DCU_REGISTER = "hami.io/node-dcu-register"
NODE_HANDSHAKE_DCU = "hami.io/node-handshake-dcu"
DCU_DEVICES_TO_ALLOCATE = "hami.io/dcu-devices-to-allocate"
DCU_DEVICES_ALLOCATED = "hami.io/dcu-devices-allocated"
USE_DCUTYPE = "hygon.com/use-dcutype"
NOUSE_DCUTYPE = "hygon.com/nouse-dcutype"
USE_DCUUUID = "hygon.com/use-gpuuuid"
NOUSE_DCUUUID = "hygon.com/nouse-gpuuuid"

# Namespace/pod label that makes the webhook skip a pod.
WEBHOOK_IGNORE_LABEL = "hami.io/webhook"


class DeviceGrant(msgspec.Struct, frozen=True, kw_only=True):
    """One device of one container in ``hami.io/vgpu-devices-allocated``."""

    uuid: str
    vendor: str
    memory_mib: int
    cores_percent: int


def encode_pod_devices(containers: list[list[DeviceGrant]]) -> str:
    """Encode per-container device grants, init containers first, as HAMi writes them.

    Each device is ``UUID,VENDOR,<memMiB>,<cores>:`` and each container ends with ``;``,
    so ``[[a], []]`` gives ``"a-uuid,NVIDIA,4000,30:;;"``.
    """
    out: list[str] = []
    for grants in containers:
        for g in grants:
            for text in (g.uuid, g.vendor):
                if not text or any(ch in text for ch in ",:;"):
                    raise ValueError(f"device field {text!r} is empty or holds a separator")
            out.append(f"{g.uuid},{g.vendor},{g.memory_mib},{g.cores_percent}:")
        out.append(";")
    return "".join(out)


def _decode_int(key: str, value: str, text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise AnnotationDecodeError(key=key, value=value, reason=f"{what} {text!r} is not a count")
    return int(text)


def decode_pod_devices(value: str, *, key: str = VGPU_DEVICES_ALLOCATED) -> list[list[DeviceGrant]]:
    """Decode ``hami.io/vgpu-devices-allocated`` (or ``-to-allocate``) into grants, one list
    per ``;``-separated entry, as HAMi does: the entry after the final ``;`` is kept, so
    ``"U,NVIDIA,500,3:;"`` gives ``[[U], []]`` and ``""`` gives ``[[]]`` (HAMi
    pkg/device/devices.go, ``DecodePodDevices``: "Do NOT skip empty ContainerDevices").
    ``container_entries`` drops the surplus empty entries against a pod's containers.

    Stricter than HAMi, which skips a device entry without a comma and accepts a value
    without the final ``;``: raises ``AnnotationDecodeError`` naming the key and value when
    a container entry does not end with ``:``, the value does not end with ``;``, a device
    lacks one of its four fields, or a memory or core count is not a count (HAMi #2958: a
    misread allocation must not read as "nothing allocated").
    """
    if value == "":
        return [[]]
    if not value.endswith(";"):
        raise AnnotationDecodeError(key=key, value=value, reason="does not end with ';'")
    containers: list[list[DeviceGrant]] = []
    for part in value.split(";"):
        grants: list[DeviceGrant] = []
        if part:
            if not part.endswith(":"):
                raise AnnotationDecodeError(
                    key=key, value=value, reason=f"container entry {part!r} does not end with ':'"
                )
            for dev in part[:-1].split(":"):
                fields = dev.split(",")
                if len(fields) != 4 or not fields[0] or not fields[1]:
                    raise AnnotationDecodeError(
                        key=key,
                        value=value,
                        reason=f"device entry {dev!r} is not UUID,VENDOR,MEM,CORES",
                    )
                grants.append(
                    DeviceGrant(
                        uuid=fields[0],
                        vendor=fields[1],
                        memory_mib=_decode_int(key, value, fields[2], "memory"),
                        cores_percent=_decode_int(key, value, fields[3], "cores"),
                    )
                )
        containers.append(grants)
    return containers


def container_entries(grants: list[list[DeviceGrant]], containers: int) -> list[list[DeviceGrant]]:
    """``grants`` without the empty entries past ``containers`` (the entry HAMi's format
    leaves after its final ``;``); entries that hold devices are never dropped."""
    out = list(grants)
    while len(out) > containers and not out[-1]:
        out.pop()
    return out


class _RegisteredDevice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    # HAMi's node-nvidia-register JSON (pkg/device/devices.go, ``DeviceInfo`` written by
    # ``MarshalNodeDevices``): its names and order, every field ``omitempty``, so a field
    # at Go's zero value (index 0, NUMA 0, unhealthy, ...) is absent and reads as zero.
    id: str = ""
    index: int = 0
    count: int = 0
    devmem: int = 0
    devcore: int = 0
    type: str = ""
    numa: int = 0
    mode: str = ""
    health: bool = False


_register_encoder = msgspec.json.Encoder()
_register_decoder = msgspec.json.Decoder(list[_RegisteredDevice])


def encode_node_devices(devices: tuple[Device, ...] | list[Device]) -> str:
    """Encode a node's devices as HAMi's ``hami.io/node-nvidia-register`` JSON list, fields
    at their zero value left out as HAMi's ``MarshalNodeDevices`` leaves them out."""
    return _register_encoder.encode(
        [
            _RegisteredDevice(
                id=d.uuid,
                index=d.index,
                count=d.split_count,
                devmem=d.memory_mib,
                devcore=d.cores_percent,
                type=d.type,
                numa=d.numa,
                mode=d.mode,
                health=d.healthy,
            )
            for d in devices
        ]
    ).decode()


def decode_node_devices(
    value: str, *, key: str = NODE_NVIDIA_REGISTER, vendor: str = NVIDIA_VENDOR
) -> tuple[Device, ...]:
    """Decode ``hami.io/node-nvidia-register`` (or another vendor's register annotation,
    ``key``, of the same JSON: ``hami.io/node-dcu-register``) into devices of ``vendor``.

    A field HAMi left out (``omitempty``) reads as Go's zero value, as HAMi's
    ``UnMarshalNodeDevices`` reads it: 0, ``""``, and ``health`` false; fields vslice does
    not know (``migProfiles``, ``devicevendor``, ...) are ignored. Raises
    ``AnnotationDecodeError`` when the JSON is malformed, a field is of the wrong type, a
    count is negative or a device has no ``id``: the node's capacity is never guessed.
    """
    try:
        entries = _register_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise AnnotationDecodeError(key=key, value=value, reason=str(exc)) from exc
    devices = []
    for e in entries:
        if not e.id:
            raise AnnotationDecodeError(key=key, value=value, reason="a device has no id")
        if min(e.index, e.count, e.devmem, e.devcore) < 0:
            raise AnnotationDecodeError(
                key=key,
                value=value,
                reason=f"device {e.id!r} has a negative field",
            )
        devices.append(
            Device(
                uuid=e.id,
                index=e.index,
                type=e.type,
                memory_mib=e.devmem,
                cores_percent=e.devcore,
                split_count=e.count,
                numa=e.numa,
                healthy=e.health,
                mode=e.mode,
                vendor=vendor,
            )
        )
    return tuple(devices)


class _PairScore(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    # HAMi's hami.io/node-nvidia-score entry (pkg/device/devices.go, DevicePairScore)
    uuid: str = ""
    score: dict[str, int] = msgspec.field(default_factory=dict)


_pair_decoder = msgspec.json.Decoder(list[_PairScore])


def decode_pair_scores(value: str) -> dict[str, dict[str, int]]:
    """Decode ``hami.io/node-nvidia-score`` (HAMi ``DecodePairScores``): per device UUID,
    its link score to each other device UUID (higher links better).

    Raises ``AnnotationDecodeError`` naming the key and value when the JSON is malformed or
    an entry has no ``uuid``.
    """
    try:
        entries = _pair_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise AnnotationDecodeError(key=NODE_NVIDIA_SCORE, value=value, reason=str(exc)) from exc
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        if not e.uuid:
            raise AnnotationDecodeError(
                key=NODE_NVIDIA_SCORE, value=value, reason="an entry has no uuid"
            )
        out[e.uuid] = dict(e.score)
    return out


MAX_MIG_ALLOCATIONS_BYTES = 64 << 10  # a longer hami.io/vgpu-mig-allocations is refused
MAX_MIG_ALLOCATIONS = 256


class MigPlacement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A GPU instance's memory slices: ``[start, start + size)``."""

    start: Annotated[int, msgspec.Meta(ge=0, le=bounds.MAX_MIG_SLOTS - 1)]
    size: Annotated[int, msgspec.Meta(ge=1, le=bounds.MAX_MIG_SLOTS)]


class MigAllocation(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """One entry of ``hami.io/vgpu-mig-allocations`` in HAMi's JSON shape: the scheduler
    writes the container, device, parent GPU, profile and placement; the device plugin
    adds ``mig_uuid`` and the GPU and compute instance IDs once the instance exists
    (HAMi docs/develop/mig-dynamic-deallocate.md, "Reservation Contract"). Key names as
    HAMi writes them: ``containerIndex``, ``deviceIndex``, ``gpuUUID``, ``profile``,
    ``placement``, ``migUUID``, ``gpuInstanceID``, ``computeInstanceID``."""

    container_index: bounds.Index
    device_index: bounds.Index
    gpu_uuid: bounds.DeviceUuid = msgspec.field(name="gpuUUID")
    profile: bounds.MigProfileName
    placement: MigPlacement
    mig_uuid: bounds.DeviceUuid = msgspec.field(default="", name="migUUID")
    gpu_instance_id: Annotated[int, msgspec.Meta(ge=-1, le=1 << 16)] = msgspec.field(
        default=-1, name="gpuInstanceID"
    )
    compute_instance_id: Annotated[int, msgspec.Meta(ge=-1, le=1 << 16)] = msgspec.field(
        default=-1, name="computeInstanceID"
    )


def encode_mig_allocations(allocations: list[MigAllocation]) -> str:
    """``hami.io/vgpu-mig-allocations``: a JSON list of ``MigAllocation``."""
    return msgspec.json.encode(allocations).decode()


def decode_mig_allocations(value: str) -> list[MigAllocation]:
    """Decode ``hami.io/vgpu-mig-allocations``. Raises ``AnnotationDecodeError`` naming
    the key and value when it is longer than ``MAX_MIG_ALLOCATIONS_BYTES``, not a JSON
    list of that shape (the path of the bad field in the reason), or has more than
    ``MAX_MIG_ALLOCATIONS`` entries."""
    key = VGPU_MIG_ALLOCATIONS
    if len(value) > MAX_MIG_ALLOCATIONS_BYTES:
        raise AnnotationDecodeError(
            key=key,
            value=value,
            reason=f"{len(value):,} characters; at most {MAX_MIG_ALLOCATIONS_BYTES:,}",
        )
    try:
        out = msgspec.json.decode(
            value,
            type=Annotated[list[MigAllocation], msgspec.Meta(max_length=MAX_MIG_ALLOCATIONS)],
        )
    except msgspec.DecodeError as exc:  # ValidationError included
        raise AnnotationDecodeError(key=key, value=value, reason=str(exc)) from exc
    return out
