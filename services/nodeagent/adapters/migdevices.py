"""Dynamic MIG through NVML: create the GPU instance a slice names, destroy it when the
slice is gone, and list what a GPU holds.

NVIDIA's "Multi-Instance GPU User Guide" (and NVML's reference, "Multi Instance GPU
Management") gives the steps this module takes with ``pynvml``: a GPU in MIG mode
(``nvmlDeviceGetMigMode``) gets a GPU instance of a profile at a placement
(``nvmlDeviceCreateGpuInstanceWithPlacement``), then one compute instance covering it
(``nvmlGpuInstanceCreateComputeInstance`` with the compute profile of the same slice
count); the MIG device this makes has a ``MIG-...`` UUID (``nvmlDeviceGetMigDeviceHandleByIndex``,
``nvmlDeviceGetUUID``), which a container is given in ``NVIDIA_VISIBLE_DEVICES`` and
``CUDA_VISIBLE_DEVICES``. Destroying goes the other way: the compute instances, then the
GPU instance. NVML profile IDs differ by model, so each profile's ID is found by its name
(``nvmlDeviceGetGpuInstanceProfileInfoV``: ``"MIG 1g.10gb"``). The same calls run on the
mock NVML. Every call blocks; the agent runs them in a worker thread.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import pynvml

from libshared.errors import VsliceError

log = logging.getLogger("vslice.nodeagent")


class MigError(VsliceError):
    """NVML refused a MIG step: ``reason`` names the GPU, the profile or instance and the
    call's error; ``in_use`` when the instance still has processes (try again later)."""

    def __init__(self, reason: str, *, in_use: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.in_use = in_use


@dataclass(frozen=True)
class Realized:
    """A GPU instance with its compute instance on GPU ``parent``: ``mig_uuid`` (the MIG
    device's ``MIG-...`` UUID; "" when it has no compute instance), ``profile``
    (``"1g.10gb"``), its NVML ``gpu_instance_id`` and ``compute_instance_id`` (-1: none),
    and its placement ``[start, start + size)`` in memory slices."""

    parent: str
    mig_uuid: str
    profile: str
    gpu_instance_id: int
    compute_instance_id: int
    start: int
    size: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlMig:
    """MIG on the GPUs NVML lists; NVML must be initialized (the node's ``Gpus`` backend
    did it) and stay so while this is used."""

    def __init__(self) -> None:
        self._profile_ids: dict[str, dict[str, int]] = {}  # GPU UUID -> name -> NVML id

    def _handle(self, uuid: str) -> Any:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: not found by NVML ({exc})") from exc

    def enabled(self, uuid: str) -> bool:
        """Whether GPU ``uuid`` is in MIG mode now (False where MIG is not supported)."""
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(self._handle(uuid))
        except pynvml.NVMLError:
            return False
        return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)

    def enable(self, uuid: str) -> bool:
        """Ask NVML to put GPU ``uuid`` in MIG mode; True when it is in MIG mode now (on a
        real GPU the mode is pending until the GPU is reset). Raises ``MigError``."""
        if self.enabled(uuid):
            return True
        try:
            pynvml.nvmlDeviceSetMigMode(self._handle(uuid), pynvml.NVML_DEVICE_MIG_ENABLE)
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: MIG mode not enabled ({exc})") from exc
        return self.enabled(uuid)

    def profile_ids(self, uuid: str) -> dict[str, int]:
        """Profile name -> NVML GPU instance profile ID on GPU ``uuid`` (remembered once
        NVML lists some: it lists none while MIG mode is off)."""
        known = self._profile_ids.get(uuid)
        if known is not None:
            return known
        h = self._handle(uuid)
        out: dict[str, int] = {}
        for pid in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, pid)
            except pynvml.NVMLError:
                continue  # not a profile of this model
            name = _text(info.name).removeprefix("MIG ").strip()
            if name:
                out.setdefault(name, int(info.id))
        if out:  # none while MIG mode is off: asked again once it is on
            self._profile_ids[uuid] = out
        return out

    def instances(self, uuid: str) -> list[Realized]:
        """The GPU instances on GPU ``uuid`` by placement start. Raises ``MigError``."""
        h = self._handle(uuid)
        names = {pid: name for name, pid in self.profile_ids(uuid).items()}
        mig_uuids = self._mig_uuids(h)
        out = []
        for pid, name in names.items():
            for gi in self._gpu_instances(h, pid):
                info = pynvml.nvmlGpuInstanceGetInfo(gi)
                cis = self._compute_instances(gi)
                ci_id = int(pynvml.nvmlComputeInstanceGetInfo(cis[0]).id) if cis else -1
                out.append(
                    Realized(
                        parent=uuid,
                        mig_uuid=mig_uuids.get(int(info.id), ""),
                        profile=name,
                        gpu_instance_id=int(info.id),
                        compute_instance_id=ci_id,
                        start=int(info.placement.start),
                        size=int(info.placement.size),
                    )
                )
        return sorted(out, key=lambda r: r.start)

    def create(self, uuid: str, profile: str, start: int, size: int) -> Realized:
        """The instance of ``profile`` at ``[start, start + size)`` on GPU ``uuid``, with its
        compute instance: the one there already (a prepared slice prepared again, or one
        adopted after a restart) or a new one. Raises ``MigError`` when NVML refuses (a
        slot taken by another instance, a profile the GPU lacks, MIG mode off)."""
        for r in self.instances(uuid):
            if r.start == start and r.profile == profile:
                if r.mig_uuid:
                    return r
                self._add_compute(uuid, r.gpu_instance_id)
                return self._found(uuid, r.gpu_instance_id)
        pid = self.profile_ids(uuid).get(profile)
        if pid is None:
            raise MigError(f"GPU {uuid}: profile {profile} not offered by NVML")
        placement = pynvml.c_nvmlGpuInstancePlacement_t(start=start, size=size)
        try:
            gi = pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                self._handle(uuid), pid, ctypes.byref(placement)
            )
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: {profile} at slot {start} not created ({exc})") from exc
        gi_id = int(pynvml.nvmlGpuInstanceGetInfo(gi).id)
        try:
            self._add_compute(uuid, gi_id)
        except MigError:
            self.destroy(uuid, gi_id)
            raise
        made = self._found(uuid, gi_id)
        log.info(
            "MIG instance created",
            extra={"gpu": uuid, "profile": profile, "start": start, "mig_uuid": made.mig_uuid},
        )
        return made

    def destroy(self, uuid: str, gpu_instance_id: int) -> None:
        """Destroy GPU instance ``gpu_instance_id`` of GPU ``uuid`` and its compute
        instances; one already gone is not an error. Raises ``MigError`` (``in_use`` when
        processes still run there)."""
        h = self._handle(uuid)
        try:
            gi = pynvml.nvmlDeviceGetGpuInstanceById(h, gpu_instance_id)
        except pynvml.NVMLError_NotFound:
            return
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: instance {gpu_instance_id} not found ({exc})") from exc
        try:
            for ci in self._compute_instances(gi):
                pynvml.nvmlComputeInstanceDestroy(ci)
            pynvml.nvmlGpuInstanceDestroy(gi)
        except pynvml.NVMLError_InUse as exc:
            raise MigError(
                f"GPU {uuid}: instance {gpu_instance_id} still in use ({exc})", in_use=True
            ) from exc
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: instance {gpu_instance_id} not destroyed ({exc})") from exc
        log.info("MIG instance destroyed", extra={"gpu": uuid, "gpu_instance_id": gpu_instance_id})

    # -- NVML walks ------------------------------------------------------------------------

    def _found(self, uuid: str, gi_id: int) -> Realized:
        for r in self.instances(uuid):
            if r.gpu_instance_id == gi_id and r.mig_uuid:
                return r
        raise MigError(f"GPU {uuid}: instance {gi_id} has no MIG device")

    def _add_compute(self, uuid: str, gi_id: int) -> None:
        """One compute instance covering GPU instance ``gi_id`` (its compute profile is
        the one with the GPU instance's slice count)."""
        h = self._handle(uuid)
        try:
            gi = pynvml.nvmlDeviceGetGpuInstanceById(h, gi_id)
            info = pynvml.nvmlGpuInstanceGetInfo(gi)
            slices = int(pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, info.profileId).sliceCount)
            for cid in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
                try:
                    ci_info = pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                        gi, cid, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
                    )
                except pynvml.NVMLError:
                    continue
                if int(ci_info.sliceCount) == slices:
                    pynvml.nvmlGpuInstanceCreateComputeInstance(gi, int(ci_info.id))
                    return
        except pynvml.NVMLError as exc:
            raise MigError(f"GPU {uuid}: no compute instance on {gi_id} ({exc})") from exc
        raise MigError(f"GPU {uuid}: no compute profile of {slices} slices for {gi_id}")

    @staticmethod
    def _gpu_instances(h: Any, pid: int) -> list[Any]:
        count = ctypes.c_uint(0)
        room = (pynvml.c_nvmlGpuInstance_t * 8)()
        try:
            pynvml.nvmlDeviceGetGpuInstances(h, pid, room, ctypes.byref(count))
        except pynvml.NVMLError:
            return []
        return [room[i] for i in range(count.value)]

    @staticmethod
    def _compute_instances(gi: Any) -> list[Any]:
        out: list[Any] = []
        for cid in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            count = ctypes.c_uint(0)
            room = (pynvml.c_nvmlComputeInstance_t * 8)()
            try:
                pynvml.nvmlGpuInstanceGetComputeInstances(gi, cid, room, ctypes.byref(count))
            except pynvml.NVMLError:
                continue
            out.extend(room[i] for i in range(count.value))
        return out

    @staticmethod
    def _mig_uuids(h: Any) -> dict[int, str]:
        """GPU instance ID -> the UUID of its MIG device, for every MIG device of ``h``."""
        out: dict[int, str] = {}
        try:
            most = pynvml.nvmlDeviceGetMaxMigDeviceCount(h)
        except pynvml.NVMLError:
            return out
        for i in range(most):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
                out[int(pynvml.nvmlDeviceGetGpuInstanceId(mig))] = _text(
                    pynvml.nvmlDeviceGetUUID(mig)
                )
            except pynvml.NVMLError:
                continue  # NOT_FOUND past the last one
        return out
