"""GPU discovery and readings behind one interface: NVML through pynvml, or the mock.

``NvmlGpus`` asks NVML (``pynvml``, NVIDIA's bindings) for every GPU -- UUID, index,
product name, memory, the NUMA node of its PCI device from sysfs -- and, each usage
round, for memory used, utilization and the processes on each device; XID events come
from an NVML event set. It loads ``libnvidia-ml.so.1`` by name, or the library at
``library`` (the mock NVML in local mode and in tests). ``MockGpus`` takes its GPUs
from a ``VSLICE_MOCKGPU_DEVICES`` list (the variable the mock driver reads) and its
readings and XIDs from the mock NVML when that is loaded, so the host-side check works on
the mock card too.

Every call blocks (NVML is a C library); the app runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pynvml

from libshared.errors import VsliceError
from services.nodeagent.core import fleets
from services.nodeagent.core.registrations import Gpu
from services.nodeagent.core.usages import DeviceReading, ProcessReading

log = logging.getLogger("vslice.nodeagent")

MIB = 1 << 20
SYSFS_PCI = Path("/sys/bus/pci/devices")


class GpuError(VsliceError):
    """NVML could not be loaded or answered with an error: ``reason`` says which call."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Gpus(Protocol):
    """What the node agent needs from a GPU backend (all calls block)."""

    kind: str

    @property
    def nvml_loaded(self) -> bool:
        """Whether NVML (the real one or the mock's) answers: MIG needs it."""
        ...

    def discover(self) -> list[Gpu]:
        """Every GPU of the node; raises ``GpuError`` when the backend cannot answer."""
        ...

    def read(self) -> tuple[list[DeviceReading], list[ProcessReading]]:
        """Devices and host processes now (empty lists when the backend has no readings)."""
        ...

    def wait_xids(self, timeout_s: float) -> list[tuple[str, int]]:
        """``(uuid, xid)`` of XID errors seen within ``timeout_s`` seconds (sleeps that
        long when there are none, or when the backend has no events)."""
        ...

    def close(self) -> None:
        """Release NVML."""
        ...


def numa_of(bus_id: str, sysfs: Path = SYSFS_PCI) -> int:
    """The NUMA node of PCI device ``bus_id`` (NVML's ``00000000:3B:00.0``) from
    ``/sys/bus/pci/devices/0000:3b:00.0/numa_node``; 0 when unknown (no file, or -1 on a
    machine with one NUMA node)."""
    domain, _, rest = bus_id.lower().partition(":")
    name = f"{domain[-4:]}:{rest}" if rest else bus_id.lower()
    try:
        value = int((sysfs / name / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return 0
    return max(0, value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlGpus:
    """GPUs through NVML. Raises ``GpuError`` from the constructor when the library cannot
    be loaded or initialized (no driver: the caller falls back to the mock)."""

    kind = "nvml"
    nvml_loaded = True

    def __init__(self, library: str | None = None) -> None:
        try:
            if library is not None:
                # pynvml loads "libnvidia-ml.so.1" by name unless a library is set already;
                # function pointers it looked up in another library must go with it
                pynvml.nvmlLib = ctypes.CDLL(library)
                pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml.nvmlInit()
        except (OSError, pynvml.NVMLError) as exc:
            raise GpuError(f"NVML unavailable ({library or 'libnvidia-ml.so.1'}): {exc}") from exc
        self._events: Any = None
        self._uuid_by_handle: dict[int, str] = {}
        self._last_seen_us: dict[str, int] = {}

    def _handles(self) -> list[Any]:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def discover(self) -> list[Gpu]:
        """Every GPU NVML lists, typed ``NVIDIA-<product name>`` as HAMi's device plugin
        registers them."""
        try:
            out = []
            for i, h in enumerate(self._handles()):
                name = _text(pynvml.nvmlDeviceGetName(h))
                try:
                    numa = numa_of(_text(pynvml.nvmlDeviceGetPciInfo(h).busId))
                except pynvml.NVMLError:
                    numa = 0
                try:
                    minor: int | None = int(pynvml.nvmlDeviceGetMinorNumber(h))
                except pynvml.NVMLError:
                    minor = None  # device specs then refuse this GPU; nothing else needs it
                try:
                    mig_mode = pynvml.nvmlDeviceGetMigMode(h)[0]
                except pynvml.NVMLError:
                    mig_mode = pynvml.NVML_DEVICE_MIG_DISABLE  # NOT_SUPPORTED: no MIG
                out.append(
                    Gpu(
                        uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                        index=i,
                        model=name,
                        type=f"NVIDIA-{name}",
                        memory_mib=int(pynvml.nvmlDeviceGetMemoryInfo(h).total) // MIB,
                        numa=numa,
                        minor=minor,
                        mig_enabled=mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE,
                    )
                )
            return out
        except pynvml.NVMLError as exc:
            raise GpuError(f"NVML discovery failed: {exc}") from exc

    def read(self) -> tuple[list[DeviceReading], list[ProcessReading]]:
        """Memory and utilization per device; memory and SM utilization per process."""
        devices, processes = [], []
        try:
            handles = self._handles()
        except pynvml.NVMLError as exc:
            raise GpuError(f"NVML read failed: {exc}") from exc
        for i, h in enumerate(handles):
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(h))
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                util: float | None
                mem_util: float | None
                try:
                    rates = pynvml.nvmlDeviceGetUtilizationRates(h)
                    util, mem_util = float(rates.gpu), float(rates.memory)
                except pynvml.NVMLError:
                    util = mem_util = None
                devices.append(
                    DeviceReading(
                        uuid=uuid,
                        index=i,
                        type=f"NVIDIA-{_text(pynvml.nvmlDeviceGetName(h))}",
                        used_bytes=int(mem.used),
                        total_bytes=int(mem.total),
                        utilization_percent=util,
                        memory_utilization_percent=mem_util,
                    )
                )
                sm = self._process_sm(uuid, h)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    processes.append(
                        ProcessReading(
                            pid=int(p.pid),
                            uuid=uuid,
                            used_bytes=int(p.usedGpuMemory or 0),
                            sm_percent=sm.get(int(p.pid)),
                        )
                    )
            except pynvml.NVMLError as exc:
                log.warning("NVML reading failed", extra={"index": i, "error": str(exc)})
        return devices, processes

    def _process_sm(self, uuid: str, handle: Any) -> dict[int, float]:
        last = self._last_seen_us.get(uuid, 0)
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, last)
        except pynvml.NVMLError:
            return {}  # NOT_FOUND: no process ran kernels since the last call
        out: dict[int, float] = {}
        for s in samples:
            out[int(s.pid)] = out.get(int(s.pid), 0.0) + float(s.smUtil)
            self._last_seen_us[uuid] = max(self._last_seen_us.get(uuid, 0), int(s.timeStamp))
        return out

    def wait_xids(self, timeout_s: float) -> list[tuple[str, int]]:
        """XIDs from an NVML event set registered for ``nvmlEventTypeXidCriticalError`` on
        every device that supports it (created on first call)."""
        if self._events is None:
            self._events = pynvml.nvmlEventSetCreate()
            for h in self._handles():
                try:
                    supported = pynvml.nvmlDeviceGetSupportedEventTypes(h)
                    if supported & pynvml.nvmlEventTypeXidCriticalError:
                        pynvml.nvmlDeviceRegisterEvents(
                            h, pynvml.nvmlEventTypeXidCriticalError, self._events
                        )
                except pynvml.NVMLError as exc:
                    log.warning("no XID events for a device", extra={"error": str(exc)})
        out: list[tuple[str, int]] = []
        wait_ms = max(1, int(timeout_s * 1000))
        while True:
            try:
                data = pynvml.nvmlEventSetWait(self._events, wait_ms)
            except pynvml.NVMLError_Timeout:
                return out
            except pynvml.NVMLError as exc:
                raise GpuError(f"NVML event wait failed: {exc}") from exc
            if data.eventType == pynvml.nvmlEventTypeXidCriticalError:
                out.append((_text(pynvml.nvmlDeviceGetUUID(data.device)), int(data.eventData)))
            wait_ms = 1  # drain what is queued, then return

    def close(self) -> None:
        """Free the event set and shut NVML down."""
        with contextlib.suppress(pynvml.NVMLError):
            if self._events is not None:
                pynvml.nvmlEventSetFree(self._events)
                self._events = None
            pynvml.nvmlShutdown()


class MockGpus:
    """Mock GPUs: ``devices`` (``(uuid, memory_mib)``) typed ``gpu_type``; readings and XIDs
    from ``nvml`` (the mock NVML on the same card) when given."""

    kind = "mock"

    def __init__(
        self,
        devices: Sequence[tuple[str, int]],
        *,
        gpu_type: str,
        nvml: NvmlGpus | None = None,
        models: Sequence[str] = (),
    ) -> None:
        self.devices = list(devices)
        self.models = tuple(models)
        self.gpu_type = gpu_type
        self.nvml = nvml

    def device_list(self) -> str:
        """The ``VSLICE_MOCKGPU_DEVICES`` text of these devices (with their models)."""
        return fleets.device_list(self.devices, self.models)

    @property
    def nvml_loaded(self) -> bool:
        """Whether the mock NVML is loaded."""
        return self.nvml is not None

    def discover(self) -> list[Gpu]:
        """The listed devices, in list order; each one's minor is its index, as the mock
        NVML answers ``nvmlDeviceGetMinorNumber``; product name and MIG mode as the mock
        NVML reports them (``VSLICE_MOCKGPU_DEVICES``), when it is loaded."""
        seen = {g.uuid: g for g in self.nvml.discover()} if self.nvml is not None else {}
        out = []
        for i, (u, m) in enumerate(self.devices):
            nvml = seen.get(u)
            out.append(
                Gpu(
                    uuid=u,
                    index=i,
                    model=nvml.model if nvml is not None else "vslice mock GPU",
                    type=self.gpu_type,
                    memory_mib=m,
                    minor=i,
                    mig_enabled=nvml.mig_enabled if nvml is not None else False,
                )
            )
        return out

    def read(self) -> tuple[list[DeviceReading], list[ProcessReading]]:
        """The mock NVML's readings, typed as registered; nothing without it."""
        if self.nvml is None:
            return [], []
        devices, processes = self.nvml.read()
        devices = [
            DeviceReading(
                uuid=d.uuid,
                index=d.index,
                type=self.gpu_type,
                used_bytes=d.used_bytes,
                total_bytes=d.total_bytes,
                utilization_percent=d.utilization_percent,
                memory_utilization_percent=d.memory_utilization_percent,
            )
            for d in devices
        ]
        return devices, processes

    def wait_xids(self, timeout_s: float) -> list[tuple[str, int]]:
        """The mock NVML's XIDs (vsliceMockInjectXid); a plain sleep without it."""
        if self.nvml is None:
            time.sleep(timeout_s)
            return []
        return self.nvml.wait_xids(timeout_s)

    def close(self) -> None:
        """Shut the mock NVML down."""
        if self.nvml is not None:
            self.nvml.close()


def open_mock(
    devices: Sequence[tuple[str, int]],
    *,
    models: Sequence[str] = (),
    gpu_type: str,
    library_dir: str | None,
    state: str | None,
) -> MockGpus:
    """``MockGpus`` reading the mock card through the mock NVML in ``library_dir`` (state
    file ``state``), or without readings when that library is missing; ``models``: each
    device's ``<product name>[:mig]`` (``fleets.parse_models``).

    The mock NVML reads ``VSLICE_MOCKGPU_STATE`` and ``VSLICE_MOCKGPU_DEVICES`` from the
    process environment on first use, so both are set here, before loading it; a process
    can watch one mock card only.
    """
    library = Path(library_dir or "") / "libnvidia-ml.so.1"
    if not library_dir or not library.exists():
        log.warning("mock NVML not found: no usage readings", extra={"path": str(library)})
        return MockGpus(devices, gpu_type=gpu_type, models=models)
    if state:
        os.environ["VSLICE_MOCKGPU_STATE"] = state
    os.environ["VSLICE_MOCKGPU_DEVICES"] = fleets.device_list(devices, models)
    try:
        nvml = NvmlGpus(str(library))
    except GpuError as exc:
        log.warning("mock NVML unusable: no usage readings", extra={"error": exc.reason})
        return MockGpus(devices, gpu_type=gpu_type, models=models)
    return MockGpus(devices, gpu_type=gpu_type, nvml=nvml, models=models)
