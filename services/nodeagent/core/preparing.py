"""Preparing a placed pod's slices on this node: what each container gets, decided from data.

For every container of a ``Placement`` holding slices this module decides the container's
directory under the host root (``<root>/containers/<pod-uid>_<container>/``), the limits
its shared cache file starts with, and its environment in HAMi-core's variable names
(``ARCHITECTURE.md``, "The slice inside the container"): ``LD_PRELOAD`` naming
``libvgpu.so``, ``CUDA_DEVICE_MEMORY_LIMIT_<i>``, ``CUDA_DEVICE_SM_LIMIT``,
``GPU_CORE_UTILIZATION_POLICY``, ``CUDA_TASK_PRIORITY``,
``CUDA_DEVICE_MEMORY_SHARED_CACHE``, ``NVIDIA_VISIBLE_DEVICES`` and
``CUDA_VISIBLE_DEVICES`` (the allocated UUIDs, which CUDA accepts there: CUDA C
Programming Guide, "CUDA Environment Variables"). On mock GPUs the environment also puts
the mock driver first on the library path and names the mock card's state file, so any
program that loads ``libcuda.so.1`` runs on the mock GPU. Pure: creating directories and
files is ``services.nodeagent.adapters.hostroots``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from libshared.events import Placement
from libshared.ledgers import Slice
from services.nodeagent.core import environments, sharedcaches

CACHE_FILE = "vgpu.cache"
CONTAINERS_DIR = "containers"
MIB = 1 << 20
# A directory name must stay one path component: pod UIDs and container names
# (Kubernetes DNS labels) never hold anything else, but a bus message might.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

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
    ``env`` (variable -> value) and its ``slices`` in CUDA device order."""

    pod_uid: str
    container: str
    key: str
    directory: str
    cache: str
    cache_bytes: bytes
    env: dict[str, str]
    slices: tuple[Slice, ...]


def container_key(pod_uid: str, container: str) -> str:
    """``<pod-uid>_<container>``, with any character outside ``[A-Za-z0-9._-]`` replaced
    by ``-`` so the key is one path component. Raises ``ValueError`` for an empty UID or
    container name, or one made only of dots. Pure."""
    if not pod_uid or not container:
        raise ValueError(f"pod_uid={pod_uid!r} container={container!r}: both must be set")
    key = f"{_UNSAFE.sub('-', pod_uid)}_{_UNSAFE.sub('-', container)}"
    if key.strip("._") == "":
        raise ValueError(f"pod_uid={pod_uid!r} container={container!r}: no usable name")
    return key


def container_dir(root: str, key: str) -> str:
    """The directory of container ``key`` under ``root``. Pure."""
    return f"{root.rstrip('/')}/{CONTAINERS_DIR}/{key}"


def plan(placement: Placement, layout: Layout) -> list[ContainerPlan]:
    """One ``ContainerPlan`` per container of ``placement`` holding slices, in container
    order. Pure.

    Raises ``ValueError`` naming the field for a container with more than 16 slices, a
    memory size below 1 MiB, cores outside 0-100, or an unusable pod UID / container name.
    """
    per: dict[str, list[Slice]] = {}
    for s in sorted(placement.slices, key=lambda s: (s.container_index, s.device_index)):
        per.setdefault(s.container, []).append(s)
    out = []
    for container, slices in per.items():
        for s in slices:
            if s.memory_mib < 1:
                raise ValueError(f"slice {s.uuid} of {container}: memory_mib={s.memory_mib}")
            if not 0 <= s.cores_percent <= 100:
                raise ValueError(f"slice {s.uuid} of {container}: cores_percent={s.cores_percent}")
        key = container_key(placement.pod_uid, container)
        directory = container_dir(layout.root, key)
        cache = f"{directory}/{CACHE_FILE}"
        env = container_env(tuple(slices), cache=cache, layout=layout)
        # the same SM limit on every device, as libvgpu reads CUDA_DEVICE_SM_LIMIT, so the
        # file and a process's environment agree
        sm = int(env.get("CUDA_DEVICE_SM_LIMIT", "0"))
        cache_bytes = sharedcaches.encode_new(
            limits_bytes=[s.memory_mib * MIB for s in slices],
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
                slices=tuple(slices),
            )
        )
    return out


def container_env(slices: tuple[Slice, ...], *, cache: str, layout: Layout) -> dict[str, str]:
    """The environment of a container holding ``slices`` (CUDA device order) whose shared
    cache file is ``cache``. Pure."""
    env = environments.container_env(list(slices))
    env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"]
    env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = cache
    env["GPU_CORE_UTILIZATION_POLICY"] = layout.sm_policy
    env["LD_PRELOAD"] = layout.libvgpu
    if layout.mock is not None:
        env["LD_LIBRARY_PATH"] = layout.mock.library_dir
        env["VSLICE_MOCKGPU_STATE"] = layout.mock.state
        env["VSLICE_MOCKGPU_DEVICES"] = layout.mock.devices
    return env
