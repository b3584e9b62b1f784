"""Preparing a placed pod's slices on this node: what each container gets, decided from data.

For every container of a ``Placement`` holding slices this module decides the container's
directory under the host root (``<root>/containers/<pod-uid>_<container>/``, escaped
by ``container_key`` so that no two pods share one), the limits
its shared cache file starts with, and its environment in HAMi-core's variable names
(``ARCHITECTURE.md``, "The slice inside the container"): ``LD_PRELOAD`` naming
``libvgpu.so``, ``CUDA_DEVICE_MEMORY_LIMIT_<i>``, ``CUDA_DEVICE_SM_LIMIT``,
``GPU_CORE_UTILIZATION_POLICY``, ``CUDA_TASK_PRIORITY``,
``CUDA_DEVICE_MEMORY_SHARED_CACHE``, ``NVIDIA_VISIBLE_DEVICES`` and
``CUDA_VISIBLE_DEVICES`` (the allocated UUIDs, which CUDA accepts there: CUDA C
Programming Guide, "CUDA Environment Variables"). On mock GPUs the environment also puts
the mock driver first on the library path and names the mock card's state file, so any
program that loads ``libcuda.so.1`` runs on the mock GPU.

A container's Hygon DCU slices (``Slice.vendor`` ``DCU``) are named by index in
``HIP_VISIBLE_DEVICES``, the variable Hygon's DTK (ROCm/HIP) selects devices by; libvgpu
interposes CUDA only (``libshared.vendors.DCU.libvgpu`` is false), so a container holding
only DCUs gets no ``LD_PRELOAD``, no CUDA limit and no mock CUDA driver: vslice books its
DCU slices, and nothing inside the container holds them to their size. Pure: creating
directories and files is ``services.nodeagent.adapters.hostroots``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from libshared import vendors
from libshared.events import Placement
from libshared.ledgers import Slice
from services.nodeagent.core import environments, sharedcaches

CACHE_FILE = "vgpu.cache"
CONTAINERS_DIR = "containers"
MIB = 1 << 20
MAX_KEY_BYTES = 255
# What a key keeps as it is (``container_key``): one path component, the same on a
# case-insensitive file system, and never holding the separator ``_``.
_LEGACY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

Policy = Literal["default", "force", "disable"]


@dataclass(frozen=True)
class MockDriver:
    """Where the mock GPU lives: ``library_dir`` holds the mock ``libcuda.so.1`` and
    ``libnvidia-ml.so.1``, ``state`` the mock card's shared state file, ``devices`` the
    ``VSLICE_MOCKGPU_DEVICES`` list (``<uuid>:<memory_mib>,...``)."""

    library_dir: str
    state: str
    devices: str


@dataclass(frozen=True)
class Mps:
    """The node's MPS server (operating mode ``mps``): its ``pipe_dir`` and ``log_dir``
    (``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``), which its clients name."""

    pipe_dir: str
    log_dir: str

    @classmethod
    def under(cls, root: str) -> Mps:
        """The server's directories under host root ``root``."""
        base = f"{root.rstrip('/')}/mps"
        return cls(pipe_dir=f"{base}/pipe", log_dir=f"{base}/log")


@dataclass(frozen=True)
class Layout:
    """The host root and what is installed there: ``root`` (absolute path), ``libvgpu``
    (path of the installed ``libvgpu.so``), ``sm_policy`` (``GPU_CORE_UTILIZATION_POLICY``
    of every container), ``mock`` (None on real GPUs)."""

    root: str
    libvgpu: str
    sm_policy: Policy = "default"
    mock: MockDriver | None = None


@dataclass(frozen=True)
class ContainerPlan:
    """One container's slice: ``key`` (``<pod-uid>_<container>``), its ``directory`` and
    ``cache`` file paths, ``cache_bytes`` (a new shared cache file holding its limits),
    ``env`` (variable -> value), its ``slices`` (NVIDIA ones first, in CUDA device order,
    then its DCUs by index), ``libvgpu``: whether libvgpu holds it to its slice (False: a
    MIG instance or the MPS server does, or it holds only DCUs), and ``cuda``: whether it
    holds NVIDIA devices (the mock CUDA driver and the device list strategies apply)."""

    pod_uid: str
    container: str
    key: str
    directory: str
    cache: str
    cache_bytes: bytes
    env: dict[str, str]
    slices: tuple[Slice, ...]
    libvgpu: bool = True
    cuda: bool = True


def _escape(text: str) -> str:
    # lower-case letters, digits and '-' stay; '.' stays except first (no '.', '..' or
    # hidden name); every other UTF-8 byte becomes %xx, so '_' (the separator), '/', '%'
    # and upper case never appear bare and two different texts never escape alike
    out = []
    for i, ch in enumerate(text):
        if ch in _KEEP or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"%{b:02x}" for b in ch.encode())
    return "".join(out)


def container_key(pod_uid: str, container: str) -> str:
    """``<pod-uid>_<container>``, each part escaped so the key is one path component and
    different (pod UID, container) pairs never share a key: lower-case letters, digits
    and ``-`` stay, ``.`` stays except as first character, every other byte of the UTF-8
    text becomes ``%xx`` (lower-case hex). Kubernetes UIDs (RFC 4122 text) and container
    names (DNS labels) come out unchanged; ``a/b``, ``a-b``, ``A-b`` and ``a_b`` get four
    keys (the earlier ``-`` substitution gave ``a/b`` and ``a-b`` one directory and one
    cache file). ``parse_key`` inverts it.

    Raises ``ValueError`` for an empty UID or container name, or a key longer than 255
    bytes (a path component's limit on Linux). Pure."""
    if not pod_uid or not container:
        raise ValueError(f"pod_uid={pod_uid!r} container={container!r}: both must be set")
    key = f"{_escape(pod_uid)}_{_escape(container)}"
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(
            f"pod_uid={pod_uid!r} container={container!r}: key of {len(key)} bytes,"
            f" more than {MAX_KEY_BYTES}"
        )
    return key


def legacy_key(pod_uid: str, container: str) -> str:
    """The key the earlier naming gave (every character outside ``[A-Za-z0-9._-]`` became
    ``-``: not injective), to recognise its directories on reconcile. Pure."""
    return f"{_LEGACY_UNSAFE.sub('-', pod_uid)}_{_LEGACY_UNSAFE.sub('-', container)}"


def parse_key(key: str) -> tuple[str, str] | None:
    """The (pod UID, container) that ``container_key`` named ``key``, or None when no pair
    gives that key (a directory of the earlier naming, or anything else). Pure."""
    uid, sep, container = key.partition("_")
    if not sep:
        return None
    try:
        pair = (_unescape(uid), _unescape(container))
    except ValueError:
        return None
    if not all(pair):
        return None
    try:
        return pair if container_key(*pair) == key else None
    except ValueError:
        return None


def _unescape(text: str) -> str:
    # raises ValueError (UnicodeDecodeError among them) for text no escape gives
    data = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            data.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            data.extend(text[i].encode())
            i += 1
    return data.decode()


def container_dir(root: str, key: str) -> str:
    """The directory of container ``key`` under ``root``. Pure."""
    return f"{root.rstrip('/')}/{CONTAINERS_DIR}/{key}"


def mig_key(s: Slice) -> tuple[str, int] | None:
    """``(GPU UUID, placement start)`` of the GPU instance a MIG slice names; None for a
    slice that is not one. Pure."""
    return (s.uuid, s.mig_start) if s.mig_profile and s.mig_start >= 0 else None


def plan(
    placement: Placement,
    layout: Layout,
    mig_uuids: Mapping[tuple[str, int], str] | None = None,
    mps: Mps | None = None,
    dcu_indices: Mapping[str, int] | None = None,
) -> list[ContainerPlan]:
    """One ``ContainerPlan`` per container of ``placement`` holding slices, in container
    order. A container whose slices are MIG instances is given their MIG device UUIDs
    (``mig_uuids``: ``mig_key`` -> ``MIG-...``, the instances realized for them) and no
    libvgpu: the GPU instance is the limit (HAMi gives a MIG slice no HAMi-core limit).
    With ``mps`` (a node in ``mps`` mode) every other container is a client of that MPS
    server (``mps_env``). A container's DCUs are named by their index on the node
    (``dcu_indices``: UUID -> index, ``registrations.dcu_indices``). Pure.

    Raises ``ValueError`` naming the field for a container with more than 16 slices, a
    memory size below 1 MiB, cores outside 0-100, an unusable pod UID / container name, a
    MIG slice whose instance is not in ``mig_uuids``, a container holding both MIG
    and sliced devices, or a DCU slice whose UUID is not in ``dcu_indices``.
    """
    per: dict[str, list[Slice]] = {}
    for s in sorted(placement.slices, key=slice_order):
        per.setdefault(s.container, []).append(s)
    out = []
    for container, held in per.items():
        slices = [s for s in held if s.vendor == vendors.NVIDIA.name]
        dcus = [s for s in held if s.vendor == vendors.DCU.name]
        other = sorted({s.vendor for s in held} - {vendors.NVIDIA.name, vendors.DCU.name})
        if other:
            raise ValueError(f"container {container}: slices of unknown vendor {other[0]!r}")
        for s in slices:
            if s.memory_mib < 1:
                raise ValueError(f"slice {s.uuid} of {container}: memory_mib={s.memory_mib}")
            if not 0 <= s.cores_percent <= 100:
                raise ValueError(f"slice {s.uuid} of {container}: cores_percent={s.cores_percent}")
        key = container_key(placement.pod_uid, container)
        directory = container_dir(layout.root, key)
        cache = f"{directory}/{CACHE_FILE}"
        instances = [mig_key(s) for s in slices]
        if any(instances) and not all(instances):
            raise ValueError(f"container {container}: holds MIG instances and sliced devices")
        if not slices:  # DCUs only: no CUDA device, so nothing of libvgpu's
            env = {"CUDA_DEVICE_MEMORY_SHARED_CACHE": cache}
        elif any(instances):
            env = mig_env(tuple(slices), mig_uuids or {}, cache=cache, layout=layout)
        elif mps is not None:
            env = mps_env(tuple(slices), mps, cache=cache, layout=layout)
        else:
            env = container_env(tuple(slices), cache=cache, layout=layout)
        if dcus:
            env |= environments.dcu_env(tuple(dcus), dcu_indices or {})
        # the same SM limit on every device, as libvgpu reads CUDA_DEVICE_SM_LIMIT, so the
        # file and a process's environment agree; the file's devices are the CUDA ones,
        # and the container's DCUs follow them (never charged: libvgpu does not see them)
        sm = int(env.get("CUDA_DEVICE_SM_LIMIT", "0"))
        cache_bytes = sharedcaches.encode_new(
            limits_bytes=[s.memory_mib * MIB for s in (*slices, *dcus)],
            sm_limits_percent=[sm] * sharedcaches.MAX_DEVICES,
            sm_policy=layout.sm_policy,
        )
        out.append(
            ContainerPlan(
                pod_uid=placement.pod_uid,
                container=container,
                key=key,
                directory=directory,
                cache=cache,
                cache_bytes=cache_bytes,
                env=env,
                slices=(*slices, *dcus),
                libvgpu=bool(slices) and not any(instances) and mps is None,
                cuda=bool(slices),
            )
        )
    return out


def slice_order(s: Slice) -> tuple[int, int, int]:
    """How a container's slices are ordered: by container, NVIDIA devices before DCUs (the
    shared cache file's devices are the CUDA ones, first), then by index. Pure."""
    return (s.container_index, 0 if s.vendor == vendors.NVIDIA.name else 1, s.device_index)


def mig_env(
    slices: tuple[Slice, ...],
    mig_uuids: Mapping[tuple[str, int], str],
    *,
    cache: str,
    layout: Layout,
) -> dict[str, str]:
    """The environment of a container holding MIG ``slices``: the MIG device UUIDs in
    ``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` (CUDA accepts ``MIG-<uuid>``
    there: CUDA C Programming Guide, "CUDA Environment Variables"), the cache path (it
    ties the container's processes to it in usage reports) and the mock's variables; no
    ``LD_PRELOAD`` and no limits. Raises ``ValueError`` for a slice whose instance is not
    realized. Pure."""
    visible = []
    for s in slices:
        key = mig_key(s)
        found = mig_uuids.get(key) if key is not None else None
        if not found:
            raise ValueError(
                f"slice {s.uuid} of {s.container}: MIG instance {s.mig_profile} at slot"
                f" {s.mig_start} not realized"
            )
        visible.append(found)
    env = {
        "NVIDIA_VISIBLE_DEVICES": ",".join(visible),
        "CUDA_VISIBLE_DEVICES": ",".join(visible),
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": cache,
    }
    return env | mock_env(layout)


def mps_env(slices: tuple[Slice, ...], mps: Mps, *, cache: str, layout: Layout) -> dict[str, str]:
    """The environment of a container whose ``slices`` (CUDA device order) are held by the
    node's MPS server: the GPUs' UUIDs, the server's directories, each device's memory as
    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (``<ordinal>=<MiB>M``, comma separated) and the
    slice's cores as ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (absent at 0), as NVIDIA's
    "Multi-Process Service" guide names them; no libvgpu: the MPS server enforces both.
    Pure."""
    uuids = ",".join(s.uuid for s in slices)
    env = {
        "NVIDIA_VISIBLE_DEVICES": uuids,
        "CUDA_VISIBLE_DEVICES": uuids,
        "CUDA_MPS_PIPE_DIRECTORY": mps.pipe_dir,
        "CUDA_MPS_LOG_DIRECTORY": mps.log_dir,
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": ",".join(
            f"{i}={s.memory_mib}M" for i, s in enumerate(slices)
        ),
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": cache,
    }
    cores = max((s.cores_percent for s in slices), default=0)
    if cores > 0:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(min(cores, 100))
    return env | mock_env(layout)


def mock_env(layout: Layout) -> dict[str, str]:
    """On mock GPUs, what puts a container's programs on the mock card (its driver first
    on the library path, its state file and device list); nothing on real GPUs. Pure."""
    if layout.mock is None:
        return {}
    return {
        "LD_LIBRARY_PATH": layout.mock.library_dir,
        "VSLICE_MOCKGPU_STATE": layout.mock.state,
        "VSLICE_MOCKGPU_DEVICES": layout.mock.devices,
    }


def container_env(slices: tuple[Slice, ...], *, cache: str, layout: Layout) -> dict[str, str]:
    """The environment of a container holding ``slices`` (CUDA device order) whose shared
    cache file is ``cache``. Pure."""
    env = environments.container_env(list(slices))
    env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"]
    env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = cache
    env["GPU_CORE_UTILIZATION_POLICY"] = layout.sm_policy
    env["LD_PRELOAD"] = layout.libvgpu
    return env | mock_env(layout)
