"""Prometheus metric families from a fleet snapshot: every family HAMi exports, as HAMi
exports it, and vslice's own.

HAMi v2.10 exports 25 families from three places, and vslice serves all of them from one
exporter with HAMi's names, types (all gauges), label names and values:

- the scheduler's (``cmd/scheduler/metrics.go``, ``collectNodeMetrics``,
  ``collectQuotaMetrics``, ``collectContainerMetrics``), per registered device (labels
  ``node``, ``device_uuid``, ``device_index``, ``device_type``):
  ``hami_gpu_memory_limit_bytes``, ``hami_gpu_core_limit_ratio`` (percent),
  ``hami_gpu_memory_allocated_bytes`` (plus ``device_cores``: the device's total cores,
  as HAMi puts ``Totalcore`` there, so the series stays one series across allocations),
  ``hami_gpu_core_allocated_ratio`` (percent), ``hami_gpu_shared_count`` (slices),
  ``hami_node_gpu_overview`` (memory allocated, bytes; plus ``device_cores`` and
  ``device_memory_limit`` in MiB, as HAMi labels it), and
  ``hami_node_gpu_memory_allocated_ratio`` (a 0-1 fraction; only for a device with
  memory, as HAMi skips a zero total); per slice (labels ``namespace``, ``node``, ``pod``,
  ``container_index``, ``device_uuid``): ``hami_vgpu_memory_allocated_bytes``,
  ``hami_vgpu_core_allocated_ratio`` (percent); per ResourceQuota resource
  (``hami_resource_quota_used``: labels ``namespace``, ``quota_name``, ``limit``;
  ``hami_resource_quota_limit``: ``namespace``, ``quota_name``, only for a limit that is
  set) from ``quotas`` -- the metrics service's wiring passes the namespaces' values of
  the ``<prefix>-quotas`` bucket (``core.quotas``), so a namespace without a quota has
  no series; and per MIG instance the node agent realized (its usage report's ``migs``)
  ``hami_node_gpu_mig_instance_info`` (labels ``node``, ``device_uuid``,
  ``device_index``, ``mig_uuid``, ``profile``, ``gpu_instance_id``,
  ``compute_instance_id``, ``placement_start``, ``placement_size``; value 1);
- the vGPU monitor's (``cmd/vGPUmonitor/metrics.go``), per device with a fresh NVML
  reading (labels ``node``, ``device_index``, ``device_uuid``, ``device_type``):
  ``hami_host_gpu_memory_used_bytes``, ``hami_host_gpu_utilization_ratio`` (percent), and
  without ``node``, as HAMi labels it, ``hami_host_gpu_memory_controller_utilization_ratio``
  (percent; only when the node agent read it); per slice with a fresh usage line (labels
  ``namespace``, ``pod``, ``container``, ``vdevice_index``, ``device_uuid``; no ``node``,
  as HAMi, whose monitor runs per node): ``hami_vgpu_memory_used_bytes`` and
  ``hami_container_device_memory_bytes`` (the same value, as HAMi reports it),
  ``hami_vgpu_memory_limit_bytes``, ``hami_container_device_utilization_ratio``
  (percent; always, 0 when no process of the container was sampled, as HAMi sends the
  shared region's figure), ``hami_vgpu_memory_context_bytes``,
  ``hami_vgpu_memory_module_bytes``, ``hami_vgpu_memory_buffer_bytes`` (libvgpu charges
  device-memory allocations only, which HAMi-core counts as buffers: buffer = used,
  context and module 0), ``hami_container_last_kernel_elapsed_seconds`` (only once a
  kernel ran, as HAMi checks ``lastKernelTime > 0``; whole seconds, as HAMi counts
  them); and ``hami_mig_device_info`` per container holding a realized MIG instance
  (its container labels with ``mig_uuid``, ``profile``, ``gpu_instance_id``,
  ``compute_instance_id``; value 1);
- ``hami_build_info`` (``pkg/metrics/metrics.go``, ``NewBuildInfoCollector``): 1, with
  labels ``version``, ``revision``, ``build_date``, ``go_version``, ``compiler``,
  ``platform`` (see ``BuildInfo``).

Every scheduler and monitor family carries ``zone`` (HAMi registers both collectors
through ``prometheus.WrapRegistererWith({"zone": zone})``; default ``vGPU``);
``hami_build_info`` does not (registered unwrapped). Memory in the ledger is MiB; the
families give bytes (MiB x 1,048,576), as HAMi's ``mibToBytes`` does.

With ``legacy=True`` the names HAMi used up to v2.8 are served as well, with their label
names and the same values (HAMi's ``--legacy-metrics``: ``GPUDeviceMemoryLimit``,
``GPUDeviceCoreLimit``, ``GPUDeviceMemoryAllocated``, ``GPUDeviceSharedNum``,
``GPUDeviceCoreAllocated``, ``nodeGPUOverview``, ``nodeGPUMemoryPercentage``,
``nodeGPUMigInstance``, ``QuotaUsed``, ``vGPUMemoryAllocated``, ``vGPUCoreAllocated``,
``HostGPUMemoryUsage``, ``HostCoreUtilization``, ``vGPU_device_memory_usage_in_bytes``,
``vGPU_device_memory_limit_in_bytes``, ``Device_memory_desc_of_container``,
``Device_utilization_desc_of_container``, ``Device_last_kernel_of_container``,
``MigInfo``); see ``LEGACY``.

vslice's own: ``vslice_fleet_fragmentation_ratio`` (percent, ``fragmentation``),
``vslice_fleet_free_gpus`` and ``vslice_fleet_stranded_gpus`` (GPUs),
``vslice_node_fragmentation_ratio`` (percent, per node), ``vslice_ledger_revision`` and
``vslice_ledger_revision_lag`` (stream sequences the view is behind the ledger),
``vslice_node_usage_age_seconds``, ``vslice_node_escaped_processes``,
``vslice_node_quarantined`` (1 per quarantined node and ``reason``:
``NodeRegistrationUnreadable``, ``NodeLedgerUnreadable``, ``NodeLedgerDeleted``), and from the
replicas' ``Stats``: ``vslice_scheduler_requests_total``,
``vslice_scheduler_decisions_total`` (``outcome``: placed, unschedulable, error),
``vslice_scheduler_releases_total``, ``vslice_scheduler_cas_conflicts_total``,
``vslice_scheduler_claims_lost_total``, ``vslice_scheduler_claim_takeovers_total`` (label
``replica``; counters since that replica started).

Per vendor (``libshared.vendors``): HAMi's families carry no vendor label -- a device's
type (``device_type``, e.g. ``NVIDIA-A100``, ``DCU-Z100``) is how HAMi tells a Hygon DCU
from an NVIDIA GPU there, and so does vslice, leaving HAMi's label sets as they are. The
vendor itself is in vslice's own families: ``vslice_device_info`` (1 per registered
device; labels ``node``, ``device_uuid``, ``device_index``, ``device_type``, ``mode``,
``device_vendor`` -- the word the device registered, HAMi's ``DeviceVendor``: ``NVIDIA``,
``DCU`` -- and ``vendor``, its maker: ``NVIDIA``, ``Hygon``), to join with HAMi's series on
``node`` and ``device_uuid``; and per vendor (labels ``device_vendor``, ``vendor``), as
HAMi has no such totals: ``vslice_vendor_devices`` (registered devices),
``vslice_vendor_memory_limit_bytes`` (their memory), ``vslice_vendor_memory_allocated_bytes``
(memory of the slices on them) and ``vslice_vendor_slices``. A word no vendor of
``libshared.vendors`` has (a registration may carry any word ``bounds.Vendor`` admits: 1-16
letters and digits) is shown as it came in ``device_vendor``, with ``vendor`` ``unknown``.

Pure: the caller passes the snapshot, the quotas, the build facts, the live stats and the
time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from libshared import events, vendors
from services.metrics.core import fragmentation
from services.metrics.core.views import MIB, SliceRow, Snapshot

ZONE = "vGPU"  # HAMi's constant `zone` label of every scheduler and monitor series
UNKNOWN_VENDOR = "unknown"  # the ``vendor`` label of a device word no vendor has
DEVICE_INFO_LABELS = [
    "node",
    "device_uuid",
    "device_index",
    "device_type",
    "mode",
    "device_vendor",
    "vendor",
]
VENDOR_LABELS = ["device_vendor", "vendor"]

DEVICE_LABELS = ["node", "device_uuid", "device_index", "device_type"]
ALLOCATED_LABELS = ["node", "device_uuid", "device_index", "device_cores", "device_type"]
OVERVIEW_LABELS = [
    "node",
    "device_uuid",
    "device_index",
    "device_cores",
    "device_memory_limit",
    "device_type",
]
SLICE_LABELS = ["namespace", "node", "pod", "container_index", "device_uuid"]
CONTAINER_LABELS = ["namespace", "pod", "container", "vdevice_index", "device_uuid"]
HOST_LABELS = ["node", "device_index", "device_uuid", "device_type"]
MEMORY_CONTROLLER_LABELS = ["device_index", "device_uuid", "device_type"]
QUOTA_USED_LABELS = ["namespace", "quota_name", "limit"]
QUOTA_LIMIT_LABELS = ["namespace", "quota_name"]
NODE_MIG_LABELS = [
    "node",
    "device_uuid",
    "device_index",
    "mig_uuid",
    "profile",
    "gpu_instance_id",
    "compute_instance_id",
    "placement_start",
    "placement_size",
]
CONTAINER_MIG_LABELS = [
    *CONTAINER_LABELS,
    "mig_uuid",
    "profile",
    "gpu_instance_id",
    "compute_instance_id",
]
BUILD_LABELS = ["version", "revision", "build_date", "go_version", "compiler", "platform"]

# name -> (help, label names without zone): every HAMi family but hami_build_info
HAMI: dict[str, tuple[str, list[str]]] = {
    "hami_gpu_memory_limit_bytes": ("Device memory of a GPU", DEVICE_LABELS),
    "hami_gpu_core_limit_ratio": ("Device cores of a GPU (percent)", DEVICE_LABELS),
    "hami_gpu_memory_allocated_bytes": ("Device memory allocated on a GPU", ALLOCATED_LABELS),
    "hami_gpu_shared_count": ("Slices sharing a GPU", DEVICE_LABELS),
    "hami_gpu_core_allocated_ratio": ("Device cores allocated on a GPU (percent)", DEVICE_LABELS),
    "hami_node_gpu_overview": ("Device memory allocated on a GPU, with its size", OVERVIEW_LABELS),
    "hami_node_gpu_memory_allocated_ratio": (
        "Fraction (0-1) of a GPU's memory allocated",
        DEVICE_LABELS,
    ),
    "hami_node_gpu_mig_instance_info": (
        "Realized MIG instance identity and scheduler placement",
        NODE_MIG_LABELS,
    ),
    "hami_resource_quota_used": ("ResourceQuota usage of a device resource", QUOTA_USED_LABELS),
    "hami_resource_quota_limit": ("ResourceQuota limit of a device resource", QUOTA_LIMIT_LABELS),
    "hami_vgpu_memory_allocated_bytes": ("Device memory allocated to a container", SLICE_LABELS),
    "hami_vgpu_core_allocated_ratio": (
        "Device cores allocated to a container (percent)",
        SLICE_LABELS,
    ),
    "hami_host_gpu_memory_used_bytes": ("Device memory used on the host (NVML)", HOST_LABELS),
    "hami_host_gpu_utilization_ratio": ("GPU utilization on the host (0-100)", HOST_LABELS),
    "hami_host_gpu_memory_controller_utilization_ratio": (
        "GPU memory controller utilization on the host (0-100)",
        MEMORY_CONTROLLER_LABELS,
    ),
    "hami_vgpu_memory_used_bytes": ("Device memory a container uses", CONTAINER_LABELS),
    "hami_vgpu_memory_limit_bytes": ("Device memory limit of a container", CONTAINER_LABELS),
    "hami_container_device_memory_bytes": ("Device memory a container uses", CONTAINER_LABELS),
    "hami_container_device_utilization_ratio": (
        "A container's share of the device's busy time (0-100)",
        CONTAINER_LABELS,
    ),
    "hami_container_last_kernel_elapsed_seconds": (
        "Seconds since a container's last kernel launch",
        CONTAINER_LABELS,
    ),
    "hami_mig_device_info": ("A container's MIG instance", CONTAINER_MIG_LABELS),
    "hami_vgpu_memory_context_bytes": (
        "Device memory of a container's contexts (not charged by libvgpu: 0)",
        CONTAINER_LABELS,
    ),
    "hami_vgpu_memory_module_bytes": (
        "Device memory of a container's modules (not charged by libvgpu: 0)",
        CONTAINER_LABELS,
    ),
    "hami_vgpu_memory_buffer_bytes": (
        "Device memory of a container's allocations",
        CONTAINER_LABELS,
    ),
}

_OLD_DEVICE = ["nodeid", "deviceuuid", "deviceidx", "devicetype"]
_OLD_SLICE = ["podnamespace", "nodename", "podname", "containeridx", "deviceuuid"]
_OLD_HOST = ["nodeid", "deviceidx", "deviceuuid", "devicetype"]
_OLD_CONTAINER = ["podnamespace", "podname", "ctrname", "vdeviceid", "deviceuuid"]

# legacy name -> (the family whose values it repeats, help, legacy label names)
LEGACY: dict[str, tuple[str, str, list[str]]] = {
    "GPUDeviceMemoryLimit": ("hami_gpu_memory_limit_bytes", "Device memory limit", _OLD_DEVICE),
    "GPUDeviceCoreLimit": ("hami_gpu_core_limit_ratio", "Device core limit", _OLD_DEVICE),
    "GPUDeviceMemoryAllocated": (
        "hami_gpu_memory_allocated_bytes",
        "Device memory allocated",
        ["nodeid", "deviceuuid", "deviceidx", "devicecores", "devicetype"],
    ),
    "GPUDeviceSharedNum": ("hami_gpu_shared_count", "Containers sharing a GPU", _OLD_DEVICE),
    "GPUDeviceCoreAllocated": (
        "hami_gpu_core_allocated_ratio",
        "Device core allocated",
        _OLD_DEVICE,
    ),
    "nodeGPUOverview": (
        "hami_node_gpu_overview",
        "GPU overview",
        ["nodeid", "deviceuuid", "deviceidx", "devicecores", "devicememorylimit", "devicetype"],
    ),
    "nodeGPUMemoryPercentage": (
        "hami_node_gpu_memory_allocated_ratio",
        "GPU memory allocated fraction",
        ["nodeid", "deviceuuid", "deviceidx"],
    ),
    "nodeGPUMigInstance": (
        "hami_node_gpu_mig_instance_info",
        "GPU sharing mode",
        ["nodeid", "deviceuuid", "deviceidx", "migname"],
    ),
    "QuotaUsed": (
        "hami_resource_quota_used",
        "ResourceQuota usage",
        ["quotanamespace", "quotaName", "limit"],
    ),
    "vGPUMemoryAllocated": (
        "hami_vgpu_memory_allocated_bytes",
        "vGPU memory allocated",
        _OLD_SLICE,
    ),
    "vGPUCoreAllocated": ("hami_vgpu_core_allocated_ratio", "vGPU core allocated", _OLD_SLICE),
    "HostGPUMemoryUsage": ("hami_host_gpu_memory_used_bytes", "GPU memory usage", _OLD_HOST),
    "HostCoreUtilization": ("hami_host_gpu_utilization_ratio", "GPU core utilization", _OLD_HOST),
    "vGPU_device_memory_usage_in_bytes": (
        "hami_vgpu_memory_used_bytes",
        "vGPU device usage",
        _OLD_CONTAINER,
    ),
    "vGPU_device_memory_limit_in_bytes": (
        "hami_vgpu_memory_limit_bytes",
        "vGPU device limit",
        _OLD_CONTAINER,
    ),
    "Device_memory_desc_of_container": (
        "hami_container_device_memory_bytes",
        "Container device memory",
        [*_OLD_CONTAINER, "context", "module", "data", "offset"],
    ),
    "Device_utilization_desc_of_container": (
        "hami_container_device_utilization_ratio",
        "Container device utilization",
        _OLD_CONTAINER,
    ),
    "Device_last_kernel_of_container": (
        "hami_container_last_kernel_elapsed_seconds",
        "Container device last kernel",
        _OLD_CONTAINER,
    ),
    "MigInfo": (
        "hami_mig_device_info",
        "Container MIG device",
        [*_OLD_CONTAINER, "instanceid"],
    ),
}


@dataclass(frozen=True)
class Quota:
    """One namespace's ResourceQuota on one device resource, as HAMi's ``QuotaManager``
    keeps it (``pkg/device/quota.go``): ``resource`` is the quota's resource name without
    ``limits.`` (e.g. ``nvidia.com/gpumem``, MiB), ``used`` and ``limit`` in its unit,
    ``limit_set`` whether the ResourceQuota sets a limit (HAMi's ``LimitSet``)."""

    namespace: str
    resource: str
    used: float
    limit: float = 0.0
    limit_set: bool = True


@dataclass(frozen=True)
class BuildInfo:
    """The labels of ``hami_build_info``. vslice is Python: ``go_version`` carries the
    interpreter's version (e.g. ``python3.12.3``) and ``compiler`` its implementation
    (``cpython``), so a query grouping by HAMi's label names still finds one series;
    ``platform`` is ``<os>/<arch>`` as Go writes it."""

    version: str
    revision: str = ""
    build_date: str = ""
    go_version: str = ""
    compiler: str = ""
    platform: str = ""


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def build_family(info: BuildInfo) -> Metric:
    """``hami_build_info``: 1 with ``info`` as labels (no ``zone``, as HAMi)."""
    family = GaugeMetricFamily(
        "hami_build_info", "Build facts as labels, with a constant value of 1", labels=BUILD_LABELS
    )
    family.add_metric(
        [
            info.version,
            info.revision,
            info.build_date,
            info.go_version,
            info.compiler,
            info.platform,
        ],
        1,
    )
    return family


class _Families:
    """HAMi's families by name (with ``zone`` appended to each label set), and their
    legacy twins when asked."""

    def __init__(self, *, zone: str, legacy: bool) -> None:
        self.zone = zone
        self.new = {
            name: GaugeMetricFamily(name, doc, labels=[*labels, "zone"])
            for name, (doc, labels) in HAMI.items()
        }
        self.old = (
            {
                name: GaugeMetricFamily(name, doc, labels=[*labels, "zone"])
                for name, (_, doc, labels) in LEGACY.items()
            }
            if legacy
            else {}
        )
        self.twins: dict[str, list[str]] = {}
        for name, (new, _, _) in LEGACY.items():
            self.twins.setdefault(new, []).append(name)

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        self.new[name].add_metric([*labels, self.zone], value)

    def add_legacy(self, name: str, labels: Sequence[str], value: float) -> None:
        family = self.old.get(name)
        if family is not None:
            family.add_metric([*labels, self.zone], value)

    def both(self, name: str, labels: Sequence[str], value: float) -> None:
        """``name`` and its legacy twins, with the same label values (as HAMi sends them)."""
        self.add(name, labels, value)
        for old in self.twins.get(name, ()):
            self.add_legacy(old, labels, value)

    def all(self) -> list[Metric]:
        return [*self.new.values(), *self.old.values()]


def hami_families(
    snapshot: Snapshot,
    *,
    now: float,
    zone: str = ZONE,
    quotas: Iterable[Quota] = (),
    legacy: bool = False,
) -> list[Metric]:
    """HAMi's scheduler-side and monitor-side families (see the module docstring) of
    ``snapshot`` at Unix time ``now`` (for the seconds since a container's last kernel),
    with ``quotas`` as the ResourceQuota source and, with ``legacy``, HAMi's pre-v2.9
    names as well. Every family is returned, those without series too."""
    out = _Families(zone=zone, legacy=legacy)
    per_slice: dict[tuple[str, ...], list[float]] = {}
    for row in snapshot.devices:
        dev = row.device
        idx = str(row.index)
        if dev is not None:
            labels = [row.node, row.uuid, idx, dev.type]
            total_cores = str(dev.cores_percent)
            out.both("hami_gpu_memory_limit_bytes", labels, dev.memory_mib * MIB)
            out.both("hami_gpu_core_limit_ratio", labels, dev.cores_percent)
            out.both(
                "hami_gpu_memory_allocated_bytes",
                [row.node, row.uuid, idx, total_cores, dev.type],
                row.allocated_mib * MIB,
            )
            out.both("hami_gpu_shared_count", labels, len(row.slices))
            out.both("hami_gpu_core_allocated_ratio", labels, row.allocated_cores)
            out.both(
                "hami_node_gpu_overview",
                [row.node, row.uuid, idx, total_cores, str(dev.memory_mib), dev.type],
                row.allocated_mib * MIB,
            )
            if dev.memory_mib > 0:
                ratio = row.allocated_mib / dev.memory_mib
                out.add("hami_node_gpu_memory_allocated_ratio", labels, ratio)
                out.add_legacy("nodeGPUMemoryPercentage", [row.node, row.uuid, idx], ratio)
        if row.host is not None:
            _host(out, row.node, row.host)
        realized = {m.start: m for m in row.migs}
        for m in row.migs:
            out.add(
                "hami_node_gpu_mig_instance_info",
                [
                    row.node,
                    row.uuid,
                    idx,
                    m.mig_uuid,
                    m.profile,
                    str(m.gpu_instance_id),
                    str(m.compute_instance_id),
                    str(m.start),
                    str(m.size),
                ],
                1,
            )
            out.add_legacy("nodeGPUMigInstance", [row.node, row.uuid, idx, m.profile], 1)
        for sr in row.slices:
            mig = realized.get(sr.slice.mig_start) if sr.slice.mig_profile else None
            if mig is not None and mig.profile == sr.slice.mig_profile:
                _mig_container(out, sr, mig)
            s = sr.slice
            key = (s.namespace, row.node, s.pod, str(s.container_index), s.uuid)
            got = per_slice.setdefault(key, [0.0, 0.0])
            got[0] += s.memory_mib * MIB
            got[1] += s.cores_percent
            if sr.usage is not None:
                _container(out, s.namespace, s.pod, s.container, sr, now=now)
    for slice_key, (mem, cores) in per_slice.items():
        out.both("hami_vgpu_memory_allocated_bytes", slice_key, mem)
        out.both("hami_vgpu_core_allocated_ratio", slice_key, cores)
    for q in quotas:
        limit = _number(q.limit)
        out.both("hami_resource_quota_used", [q.namespace, q.resource, limit], q.used)
        if q.limit_set:
            out.add("hami_resource_quota_limit", [q.namespace, q.resource], q.limit)
    return out.all()


def _number(value: float) -> str:
    """A label value as Go's ``fmt.Sprint`` writes an integer quantity."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _host(out: _Families, node: str, host: events.DeviceUsage) -> None:
    labels = [node, str(host.index), host.uuid, host.type]
    out.both("hami_host_gpu_memory_used_bytes", labels, host.used_bytes)
    if host.utilization_percent is not None:
        out.both("hami_host_gpu_utilization_ratio", labels, host.utilization_percent)
    if host.memory_utilization_percent is not None:
        out.add(
            "hami_host_gpu_memory_controller_utilization_ratio",
            labels[1:],
            host.memory_utilization_percent,
        )


def _mig_container(out: _Families, sr: SliceRow, mig: events.MigInstanceUsage) -> None:
    s = sr.slice
    labels = [s.namespace, s.pod, s.container, str(sr.vdevice_index), s.uuid]
    out.add(
        "hami_mig_device_info",
        [
            *labels,
            mig.mig_uuid,
            mig.profile,
            str(mig.gpu_instance_id),
            str(mig.compute_instance_id),
        ],
        1,
    )
    out.add_legacy("MigInfo", [*labels, str(mig.gpu_instance_id)], 1)


def _container(
    out: _Families, namespace: str, pod: str, container: str, sr: SliceRow, *, now: float
) -> None:
    line = sr.usage
    assert line is not None
    labels = [namespace, pod, container, str(sr.vdevice_index), sr.slice.uuid]
    used = float(line.used_bytes)
    out.both("hami_vgpu_memory_used_bytes", labels, used)
    out.both(
        "hami_vgpu_memory_limit_bytes",
        labels,
        float(line.limit_bytes or sr.slice.memory_mib * MIB),
    )
    out.add("hami_container_device_memory_bytes", labels, used)
    # libvgpu charges allocations only: all of it is HAMi-core's "buffer" class
    context, module, buffer = 0, 0, line.used_bytes
    offset = line.used_bytes - context - module - buffer
    out.add_legacy(
        "Device_memory_desc_of_container",
        [*labels, str(context), str(module), str(buffer), str(offset)],
        used,
    )
    out.both("hami_container_device_utilization_ratio", labels, line.utilization_percent or 0.0)
    out.add("hami_vgpu_memory_context_bytes", labels, context)
    out.add("hami_vgpu_memory_module_bytes", labels, module)
    out.add("hami_vgpu_memory_buffer_bytes", labels, buffer)
    if line.last_kernel_at is not None:
        # whole seconds, as HAMi subtracts Unix seconds (time.Now().Unix() - lastKernelTime)
        elapsed = max(0, int(now) - int(line.last_kernel_at))
        out.both("hami_container_last_kernel_elapsed_seconds", labels, elapsed)


def brand(word: str) -> str:
    """The ``vendor`` label of a device registered with vendor ``word``: its vendor's maker
    (``vendors.Vendor.brand``: ``NVIDIA``, ``Hygon``), ``UNKNOWN_VENDOR`` for a word no
    vendor of ``libshared.vendors`` has."""
    known = vendors.BY_NAME.get(word)
    return known.brand if known is not None else UNKNOWN_VENDOR


@dataclass
class VendorTotals:
    """One vendor's registered devices, their memory (MiB), the memory of the slices on
    them (MiB) and those slices."""

    devices: int = 0
    memory_mib: int = 0
    allocated_mib: int = 0
    slices: int = 0


def vendor_totals(snapshot: Snapshot) -> dict[str, VendorTotals]:
    """Device word (``Device.vendor``) -> its ``VendorTotals`` over the registered devices
    of ``snapshot``, sorted by word. A device the ledger names but its node did not register
    has no vendor and is left out."""
    out: dict[str, VendorTotals] = {}
    for row in snapshot.devices:
        dev = row.device
        if dev is None:
            continue
        t = out.setdefault(dev.vendor, VendorTotals())
        t.devices += 1
        t.memory_mib += dev.memory_mib
        t.allocated_mib += row.allocated_mib
        t.slices += len(row.slices)
    return dict(sorted(out.items()))


def vendor_families(snapshot: Snapshot) -> list[Metric]:
    """``vslice_device_info`` and the per-vendor totals (see the module docstring)."""
    info = _gauge(
        "vslice_device_info",
        "1 per registered device, with its type, mode and vendor as labels",
        DEVICE_INFO_LABELS,
    )
    for row in snapshot.devices:
        dev = row.device
        if dev is not None:
            info.add_metric(
                [
                    row.node,
                    row.uuid,
                    str(row.index),
                    dev.type,
                    dev.mode,
                    dev.vendor,
                    brand(dev.vendor),
                ],
                1,
            )
    devices = _gauge("vslice_vendor_devices", "Registered devices of a vendor", VENDOR_LABELS)
    memory = _gauge(
        "vslice_vendor_memory_limit_bytes",
        "Device memory of a vendor's registered devices",
        VENDOR_LABELS,
    )
    allocated = _gauge(
        "vslice_vendor_memory_allocated_bytes",
        "Device memory allocated to slices on a vendor's devices",
        VENDOR_LABELS,
    )
    slices = _gauge("vslice_vendor_slices", "Slices on a vendor's devices", VENDOR_LABELS)
    for word, t in vendor_totals(snapshot).items():
        labels = [word, brand(word)]
        devices.add_metric(labels, t.devices)
        memory.add_metric(labels, t.memory_mib * MIB)
        allocated.add_metric(labels, t.allocated_mib * MIB)
        slices.add_metric(labels, t.slices)
    return [info, devices, memory, allocated, slices]


def fleet_figure(snapshot: Snapshot) -> fragmentation.Figure:
    """The fragmentation figure of every registered device of ``snapshot``."""
    return fragmentation.figure(d.free_milli for d in snapshot.devices if d.device is not None)


def vslice_families(snapshot: Snapshot, *, stats: Sequence[events.Stats]) -> list[Metric]:
    """vslice's own families (see the module docstring) of ``snapshot`` and the replicas'
    ``stats``."""
    figure = fleet_figure(snapshot)
    ratio = _gauge(
        "vslice_fleet_fragmentation_ratio",
        "Percent of idle GPU capacity on partly used GPUs (useless to a whole-GPU pod)",
        [],
    )
    ratio.add_metric([], figure.ratio_percent)
    free = _gauge("vslice_fleet_free_gpus", "Idle GPU capacity, in GPUs", [])
    free.add_metric([], figure.free_milli / fragmentation.MILLI)
    stranded = _gauge(
        "vslice_fleet_stranded_gpus", "Idle GPU capacity on partly used GPUs, in GPUs", []
    )
    stranded.add_metric([], figure.stranded_milli / fragmentation.MILLI)
    per_node = _gauge(
        "vslice_node_fragmentation_ratio",
        "Percent of a node's idle GPU capacity on partly used GPUs",
        ["node"],
    )
    age = _gauge("vslice_node_usage_age_seconds", "Age of a node's latest usage report", ["node"])
    escaped = _gauge(
        "vslice_node_escaped_processes",
        "Processes using more device memory than their slice allows, in the latest report",
        ["node"],
    )
    for node in snapshot.nodes:
        if node.registered:
            fig = fragmentation.figure(d.free_milli for d in node.devices if d.device is not None)
            per_node.add_metric([node.node], fig.ratio_percent)
        if node.usage_age_s is not None:
            age.add_metric([node.node], node.usage_age_s)
            escaped.add_metric([node.node], len(node.escapes))
    revision = _gauge(
        "vslice_ledger_revision", "Ledger stream sequence this exporter has taken in", []
    )
    revision.add_metric([], snapshot.ledger_seq)
    lag = _gauge(
        "vslice_ledger_revision_lag",
        "Ledger stream sequences committed but not yet taken in by this exporter",
        [],
    )
    lag.add_metric([], max(0, snapshot.ledger_last_seq - snapshot.ledger_seq))
    held_back = _gauge(
        "vslice_node_quarantined",
        "1 for a node offered no new pod because a bucket value of it cannot be read",
        ["node", "reason"],
    )
    for node_name, why in snapshot.quarantined:
        held_back.add_metric([node_name, why], 1)
    out: list[Metric] = [ratio, free, stranded, per_node, age, escaped, revision, lag, held_back]
    out += vendor_families(snapshot)
    out += _stats_families(stats)
    return out


def _stats_families(stats: Sequence[events.Stats]) -> list[Metric]:
    requests = CounterMetricFamily(
        "vslice_scheduler_requests", "Schedule requests a replica answered", labels=["replica"]
    )
    decisions = CounterMetricFamily(
        "vslice_scheduler_decisions",
        "Schedule answers by outcome (placed, unschedulable, error)",
        labels=["replica", "outcome"],
    )
    releases = CounterMetricFamily(
        "vslice_scheduler_releases", "Pods a replica released", labels=["replica"]
    )
    conflicts = CounterMetricFamily(
        "vslice_scheduler_cas_conflicts",
        "Ledger compare-and-sets a replica lost to another",
        labels=["replica"],
    )
    claims = CounterMetricFamily(
        "vslice_scheduler_claims_lost",
        "Pods a replica found claimed by another replica",
        labels=["replica"],
    )
    takeovers = CounterMetricFamily(
        "vslice_scheduler_claim_takeovers",
        "Claims of dead holders a replica took over",
        labels=["replica"],
    )
    for s in stats:
        requests.add_metric([s.name], s.schedule_requests)
        decisions.add_metric([s.name, "placed"], s.placed)
        decisions.add_metric([s.name, "unschedulable"], s.unschedulable)
        decisions.add_metric([s.name, "error"], s.errors)
        releases.add_metric([s.name], s.released)
        conflicts.add_metric([s.name], s.conflicts)
        claims.add_metric([s.name], s.claims_lost)
        takeovers.add_metric([s.name], s.takeovers)
    return [requests, decisions, releases, conflicts, claims, takeovers]
