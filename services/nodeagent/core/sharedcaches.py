"""Decoder of libvgpu's shared cache file, layout version 2.

Every process of a container that runs with ``libvgpu.so`` preloaded charges its
device memory in one mmap'd file (``CUDA_DEVICE_MEMORY_SHARED_CACHE``); the node
agent reads that file to report what each container uses. This module turns the
file's bytes into values. It is pure: reading the file belongs to
``services.nodeagent.adapters.cachefiles``, and deciding what to do with the
usage belongs to the caller.

``encode_new`` is the other direction: the file the node agent creates for a new
slice, so the container's limits are the slice's and not whatever the first
process's environment says.

The layout is defined in ``services/nodeagent/libvgpu/sharedcache.h`` and
described in ``services/nodeagent/libvgpu/LAYOUT.md``; the constants below must
match them (a test compares both with a file written by a real libvgpu process).
Little-endian, naturally aligned::

    offset 0     header  64 bytes
    offset 64    16 device entries, 128 bytes each
    offset 2112  16 device accounts (bytes used, tag of the last change), 16 bytes each
    offset 2368  1024 process slots, 352 bytes each
    total        362816 bytes

Version 2 moved each device's charge into its account and each process's
charges into a ledger of 16-byte entries, so that libvgpu can change both
with one 16-byte compare-and-swap each (``LAYOUT.md``, "Changing a charge").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from libshared.errors import VsliceError

MAGIC: Final = 0x434C5356  # "VSLC"
VERSION: Final = 2
HEADER_BYTES: Final = 64
DEVICE_BYTES: Final = 128
ACCOUNT_BYTES: Final = 16
SLOT_BYTES: Final = 352
MAX_DEVICES: Final = 16
MAX_SLOTS: Final = 1024
DEVICES_OFFSET: Final = HEADER_BYTES
ACCOUNTS_OFFSET: Final = DEVICES_OFFSET + MAX_DEVICES * DEVICE_BYTES
SLOTS_OFFSET: Final = ACCOUNTS_OFFSET + MAX_DEVICES * ACCOUNT_BYTES
FILE_BYTES: Final = SLOTS_OFFSET + MAX_SLOTS * SLOT_BYTES

# magic, version, header_bytes, device_count, slot_count, device_bytes, slot_bytes,
# sm_policy, creator_pid, reserved, created_ns, 16 reserved bytes
_HEADER: Final = struct.Struct("<8Iiiq16x")
# limit_bytes, reserved (version 1: used_bytes), sm_limit_percent, reserved, then the compute
# limiter's state (private to libvgpu, 72 bytes read as 5q, 2Q, 2d), observed_ns, 24 bytes
# more of the limiter's state
_DEVICE: Final = struct.Struct("<QQII5qQQddq24x")
# used_bytes, tag of the last change
_ACCOUNT: Final = struct.Struct("<QQ")
# pid, generation, start_ticks, last_kernel_ns, launches, op_seq, reserved, the
# journal of the change in flight (40 bytes), reserved, then per device the
# ledger entry: charged bytes, tag of the last change
_SLOT: Final = struct.Struct(f"<iIQqQQ8x40x8x{2 * MAX_DEVICES}Q")

_POLICIES: Final[dict[int, Literal["default", "force", "disable"]]] = {
    0: "default",
    1: "force",
    2: "disable",
}

_POLICY_CODES: Final = {name: code for code, name in _POLICIES.items()}

assert _HEADER.size == HEADER_BYTES
assert _DEVICE.size == DEVICE_BYTES
assert _ACCOUNT.size == ACCOUNT_BYTES
assert _SLOT.size == SLOT_BYTES
assert FILE_BYTES == 362816


class SharedCacheError(VsliceError, ValueError):
    """The bytes are not a complete version-2 shared cache.

    ``field`` names the first field found wrong (``"header"``, ``"magic"``,
    ``"devices[3].used_bytes"``, ``"slots"`` ...), so the node agent can say which
    container's file is damaged and how.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"shared cache field {field}: {message}")
        self.field = field


class DeviceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One device of the container's slice.

    ``limit_bytes`` is the memory cap (0: none), ``used_bytes`` what all the
    container's processes have charged, ``sm_limit_percent`` the compute cap in
    percent (0: none), ``observed_busy_ns`` the device time the compute limiter
    has seen the container use, in nanoseconds.
    """

    index: int
    limit_bytes: int
    used_bytes: int
    sm_limit_percent: int
    observed_busy_ns: int


class ProcessSlot(msgspec.Struct, frozen=True, kw_only=True):
    """One live process of the container.

    ``charged_bytes`` holds the bytes charged on each device index (16 entries);
    ``last_kernel_ns`` is the CLOCK_REALTIME of its last kernel launch in
    nanoseconds (0: never launched; about 4 ms resolution); ``launches`` counts
    its launches (approximate under thread races).
    """

    slot: int
    pid: int
    start_ticks: int
    last_kernel_ns: int
    launches: int
    charged_bytes: tuple[int, ...]


class SharedCache(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded shared cache: the slice's devices and the live processes."""

    version: int
    sm_policy: Literal["default", "force", "disable"]
    creator_pid: int
    created_ns: int
    devices: tuple[DeviceUsage, ...]
    processes: tuple[ProcessSlot, ...]

    @property
    def last_kernel_ns(self) -> int:
        """The latest kernel launch of any process (CLOCK_REALTIME ns), 0 if none."""
        return max((p.last_kernel_ns for p in self.processes), default=0)


def decode(data: bytes) -> SharedCache:
    """Decode a shared cache file's bytes.

    Pure. Returns every device entry (16, by CUDA device index) and the slots of
    live processes (pid > 0); a slot being reclaimed (pid -1) is left out.
    Raises ``SharedCacheError`` naming the field when the bytes are truncated,
    carry another magic, version or table geometry, or hold an impossible value.
    """
    if len(data) < HEADER_BYTES:
        raise SharedCacheError("header", f"needs {HEADER_BYTES} bytes, the file has {len(data)}")
    (
        magic,
        version,
        header_bytes,
        device_count,
        slot_count,
        device_bytes,
        slot_bytes,
        sm_policy,
        creator_pid,
        _reserved,
        created_ns,
    ) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SharedCacheError("magic", f"is {magic:#010x}, expected {MAGIC:#010x}")
    if version != VERSION:
        raise SharedCacheError("version", f"is {version}, this reader knows {VERSION}")
    for name, got, want in (
        ("header_bytes", header_bytes, HEADER_BYTES),
        ("device_count", device_count, MAX_DEVICES),
        ("slot_count", slot_count, MAX_SLOTS),
        ("device_bytes", device_bytes, DEVICE_BYTES),
        ("slot_bytes", slot_bytes, SLOT_BYTES),
    ):
        if got != want:
            raise SharedCacheError(name, f"is {got}, layout version 2 has {want}")
    policy = _POLICIES.get(sm_policy)
    if policy is None:
        raise SharedCacheError("sm_policy", f"is {sm_policy}, expected 0, 1 or 2")
    if len(data) < SLOTS_OFFSET:
        raise SharedCacheError(
            "devices", f"truncated: needs {SLOTS_OFFSET} bytes, the file has {len(data)}"
        )
    if len(data) < FILE_BYTES:
        raise SharedCacheError(
            "slots", f"truncated: needs {FILE_BYTES} bytes, the file has {len(data)}"
        )
    return SharedCache(
        version=version,
        sm_policy=policy,
        creator_pid=creator_pid,
        created_ns=created_ns,
        devices=tuple(_decode_device(data, i) for i in range(MAX_DEVICES)),
        processes=tuple(
            slot for i in range(MAX_SLOTS) if (slot := _decode_slot(data, i)) is not None
        ),
    )


def _decode_device(data: bytes, index: int) -> DeviceUsage:
    fields = _DEVICE.unpack_from(data, DEVICES_OFFSET + index * DEVICE_BYTES)
    limit_bytes, sm_limit_percent = fields[0], fields[2]
    used_bytes, _tag = _ACCOUNT.unpack_from(data, ACCOUNTS_OFFSET + index * ACCOUNT_BYTES)
    observed_busy_ns = fields[13]
    if sm_limit_percent > 100:
        raise SharedCacheError(
            f"devices[{index}].sm_limit_percent", f"is {sm_limit_percent}, above 100"
        )
    if observed_busy_ns < 0:
        raise SharedCacheError(
            f"devices[{index}].sm_observed_ns", f"is {observed_busy_ns}, below 0"
        )
    return DeviceUsage(
        index=index,
        limit_bytes=limit_bytes,
        used_bytes=used_bytes,
        sm_limit_percent=sm_limit_percent,
        observed_busy_ns=observed_busy_ns,
    )


def _decode_slot(data: bytes, index: int) -> ProcessSlot | None:
    pid, _generation, start_ticks, last_kernel_ns, launches, _op_seq, *ledger = _SLOT.unpack_from(
        data, SLOTS_OFFSET + index * SLOT_BYTES
    )
    charged = ledger[0::2]
    if pid < -1:
        raise SharedCacheError(f"slots[{index}].pid", f"is {pid}, expected -1, 0 or a pid")
    if pid <= 0:
        return None
    if last_kernel_ns < 0:
        raise SharedCacheError(f"slots[{index}].last_kernel_ns", f"is {last_kernel_ns}, below 0")
    return ProcessSlot(
        slot=index,
        pid=pid,
        start_ticks=start_ticks,
        last_kernel_ns=last_kernel_ns,
        launches=launches,
        charged_bytes=tuple(charged),
    )


def encode_new(
    *,
    limits_bytes: Sequence[int],
    sm_limits_percent: Sequence[int],
    sm_policy: Literal["default", "force", "disable"] = "default",
    creator_pid: int = 0,
    created_ns: int = 0,
) -> bytes:
    """The bytes of a new shared cache file (``FILE_BYTES`` long) holding a slice's limits.

    Pure. ``limits_bytes[i]`` / ``sm_limits_percent[i]`` are the memory cap (bytes, 0:
    none) and compute cap (percent, 0: none) of the container's CUDA device ``i``; no
    charges, no processes. The magic is set, so libvgpu follows these limits instead of
    its process's environment (``LAYOUT.md``, "Limits come from the first process").
    Raises ``ValueError`` naming the field for more than 16 devices, a negative limit,
    an SM limit above 100 or an unknown policy.
    """
    if len(limits_bytes) > MAX_DEVICES or len(sm_limits_percent) > MAX_DEVICES:
        raise ValueError(f"limits_bytes: {len(limits_bytes)} devices, the layout has 16")
    if any(b < 0 for b in limits_bytes):
        raise ValueError(f"limits_bytes={list(limits_bytes)}: a limit is negative")
    if any(not 0 <= p <= 100 for p in sm_limits_percent):
        raise ValueError(f"sm_limits_percent={list(sm_limits_percent)}: each must be 0-100")
    if sm_policy not in _POLICY_CODES:
        raise ValueError(f"sm_policy={sm_policy!r}: expected default, force or disable")
    out = bytearray(FILE_BYTES)
    _HEADER.pack_into(
        out,
        0,
        MAGIC,
        VERSION,
        HEADER_BYTES,
        MAX_DEVICES,
        MAX_SLOTS,
        DEVICE_BYTES,
        SLOT_BYTES,
        _POLICY_CODES[sm_policy],
        creator_pid,
        0,
        created_ns,
    )
    for i in range(MAX_DEVICES):
        limit = limits_bytes[i] if i < len(limits_bytes) else 0
        sm = sm_limits_percent[i] if i < len(sm_limits_percent) else 0
        # limit, reserved, sm limit, then the compute limiter's state, all zero
        state = (0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0)
        _DEVICE.pack_into(out, DEVICES_OFFSET + i * DEVICE_BYTES, limit, 0, sm, *state)
    return bytes(out)
