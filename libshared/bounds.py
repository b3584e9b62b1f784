"""The bounds of every value on the bus, as msgspec constraints checked on decode.

Everything that arrives over NATS or from a KV bucket is decoded with these bounds, so a
negative size, a cores percent above 100, a GPU count of -1 or a 600 KB pod name is
refused at the door, with the field's path, before any decision or write
(``ARCHITECTURE.md``, "Trust and failure boundaries"). Constructing a struct in code
checks nothing (msgspec validates on decode only); the bounds are for what comes in.

Names follow Kubernetes: a pod name is a DNS-1123 subdomain (at most 253 characters), a
namespace and a container name DNS-1123 labels (at most 63), an object UID at most 128
characters (Kubernetes' are 36). Sizes are bounded far above any GPU made today.

The bounds also bound the largest KV value: a node ledger holds at most
``MAX_DEVICES_PER_NODE * MAX_SPLIT_COUNT`` slices and ``MAX_PODS_PER_NODE`` charges, each
of bounded size, so its largest value (``libshared.payloads.worst_bytes``) stays well
under ``MAX_PAYLOAD_BYTES``, the ``max_payload`` every vslice nats-server is configured
with.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

MAX_UID = 128
MAX_NAME = 253  # DNS-1123 subdomain (pod names)
MAX_LABEL = 63  # DNS-1123 label (namespaces, container names)
MAX_UUID = 128
MAX_TYPE = 128
MAX_POLICY = 128  # a policy name or a comma list of them
MAX_GPUS = 16  # GPUs one container asks for, and devices one node registers
MAX_DEVICES_PER_NODE = 16
MAX_SPLIT_COUNT = 100  # slices one device may hold (HAMi deviceSplitCount)
MAX_PODS_PER_NODE = 1024  # node-level charges in one ledger
MAX_CONTAINERS = 64  # containers of a pod, init containers included
MAX_SELECTORS = 256  # entries of a use/nouse type or UUID list
MAX_MEMORY_MIB = 1 << 24  # 16 TiB: one device's memory, scaled
MAX_HOST_MEMORY_MIB = 1 << 32
MAX_CPU_MILLI = 10**9
MAX_DEVICE_CORES = 10_000  # percent, with deviceCoreScaling up to 100
MAX_INDEX = 1023
MAX_PAYLOAD_BYTES = 8 << 20  # nats-server max_payload of every vslice server
MAX_TEXT = 4096  # a reason or problem for people (an exception's text, clipped: ``clip``)
MAX_ENV_VARS = 32  # variables of one container's environment (the node agent sets <= 27)
MAX_ENV_NAME = 128
MAX_ENV_VALUE = 1024  # NVIDIA_VISIBLE_DEVICES of 16 UUIDs of 63 characters, a host path
MAX_BYTES = MAX_MEMORY_MIB << 20  # one device's memory (or a process's share), bytes
MAX_PID = 1 << 22  # Linux PID_MAX_LIMIT on 64-bit

# A UID, name or UUID holds no control character (it ends up in file names, logs, keys).
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_NODE = r"^[A-Za-z0-9_=/-]+$"  # one NATS subject token and a KV key
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a C identifier, as the node agent's variables are
_ASCII_PRINTABLE = r"^[\x20-\x7e]*$"

Uid = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_UID, pattern=_PRINTABLE)]
PodName = Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=_PRINTABLE)]
Namespace = Annotated[str, msgspec.Meta(max_length=MAX_LABEL, pattern=_PRINTABLE)]
ContainerName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL, pattern=_PRINTABLE)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=_NODE)]
DeviceUuid = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_UUID, pattern=_PRINTABLE)]
DeviceType = Annotated[str, msgspec.Meta(max_length=MAX_TYPE, pattern=_PRINTABLE)]
Policy = Annotated[str, msgspec.Meta(max_length=MAX_POLICY, pattern=_PRINTABLE)]
Selectors = Annotated[tuple[DeviceType, ...], msgspec.Meta(max_length=MAX_SELECTORS)]
# a device vendor's word, as HAMi types its requests ("NVIDIA", "DCU"; libshared.vendors)
Vendor = Annotated[
    str, msgspec.Meta(min_length=1, max_length=16, pattern=r"^[A-Za-z][A-Za-z0-9]*$")
]
Index = Annotated[int, msgspec.Meta(ge=0, le=MAX_INDEX)]
GpuCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPUS)]
MemoryMiB = Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMORY_MIB)]
DeviceMemoryMiB = Annotated[int, msgspec.Meta(ge=1, le=MAX_MEMORY_MIB)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
MAX_MIG_SLOTS = 8  # memory slices of a MIG-capable GPU (8 on A100/H100/H200, 4 on A30)
MAX_MIG_PROFILES = 32  # GPU instance profiles one device publishes
MigSlots = Annotated[int, msgspec.Meta(ge=0, le=MAX_MIG_SLOTS)]
MigSlot = Annotated[int, msgspec.Meta(ge=0, le=MAX_MIG_SLOTS - 1)]
MigSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_MIG_SLOTS)]
# a GPU instance profile's name as NVIDIA writes it ("3g.20gb"); "" = not a MIG slice
_MIG_PROFILE = r"^(|[0-9]{1,2}g\.[0-9]{1,4}gb)$"
MigProfileName = Annotated[str, msgspec.Meta(max_length=16, pattern=_MIG_PROFILE)]
# The longest string a structured pattern admits, for the patterns no string of one
# repeated character matches (``libshared.payloads`` builds the largest values).
WIDEST_BY_PATTERN = {_MIG_PROFILE: "99g.9999gb"}
DeviceCores = Annotated[int, msgspec.Meta(ge=1, le=MAX_DEVICE_CORES)]
SplitCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_SPLIT_COUNT)]
CpuMilli = Annotated[int, msgspec.Meta(ge=0, le=MAX_CPU_MILLI)]
HostMemoryMiB = Annotated[int, msgspec.Meta(ge=0, le=MAX_HOST_MEMORY_MIB)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=100)]
Weight = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]  # a device-score weight
# A UID or empty (an answer to a query too malformed to name its pod).
UidOrEmpty = Annotated[str, msgspec.Meta(max_length=MAX_UID, pattern=_PRINTABLE)]
ContainerOrEmpty = Annotated[str, msgspec.Meta(max_length=MAX_LABEL, pattern=_PRINTABLE)]
# A reason or problem for people: any characters (an exception's text), clipped (``clip``).
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
# One container's environment: C-identifier names, printable ASCII values (4-byte UTF-8
# would take four times the bytes of a value this long; the paths and UUIDs vslice puts
# there are ASCII, and the node agent answers Failed for one that is not).
EnvName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ENV_NAME, pattern=_ENV_NAME)]
EnvValue = Annotated[str, msgspec.Meta(max_length=MAX_ENV_VALUE, pattern=_ASCII_PRINTABLE)]
Environment = Annotated[dict[EnvName, EnvValue], msgspec.Meta(max_length=MAX_ENV_VARS)]
Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=MAX_PID)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=100)]  # a percent measured, 0-100
UnixTime = Annotated[float, msgspec.Meta(ge=0)]  # seconds

# What decoding untrusted JSON may raise: msgspec's errors, and RecursionError for a value
# nested deeper than its recursion limit (``[[[[...`` or ``{"a":{"a":...``, a few KB, far
# under ``max_payload``), which is not a ``msgspec.DecodeError``. Every door catches both.
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)


def clip(text: str, n: int = MAX_TEXT) -> str:
    """``text`` cut to at most ``n`` characters (``n`` >= 4), ending in ``...`` when cut,
    so an exception's text fits a ``Text`` field. Pure."""
    return text if len(text) <= n else text[: n - 3] + "..."


def violation(value: Any, tp: Any) -> str:
    """What in ``value`` (a Struct as it would be sent) breaks a bound of type ``tp``, as
    ``describe`` names it, or ``""`` when it would pass the receiver's door. For a sender
    to check before it sends what it built from outside figures. Pure."""
    raw = msgspec.json.encode(value)
    try:
        msgspec.json.decode(raw, type=tp)
    except DECODE_ERRORS as exc:
        return describe(exc, raw)
    return ""


_PATH = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def describe(exc: Exception, raw: bytes) -> str:
    """The decode error ``exc`` of ``raw`` as one line naming the field and the value it
    had, e.g. ``$.containers[0].memory_percent=-100: Expected `int` >= 0``. Pure; falls back
    to the error's own text when the path or value cannot be read."""
    text = str(exc)
    where = text.rsplit(" - at `$", 1)
    if len(where) != 2:
        return text
    message, path = where[0], where[1].rstrip("`")
    try:
        value: Any = msgspec.json.decode(raw)
        for name, index in _PATH.findall(path):
            value = value[name] if name else value[int(index)]
    except (msgspec.DecodeError, RecursionError, KeyError, IndexError, TypeError, ValueError):
        return f"${path}: {message}"
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"${path}={shown}: {message}"
