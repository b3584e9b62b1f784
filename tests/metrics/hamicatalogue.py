"""HAMi v2.10's metric catalogue, written down from HAMi's source as data: every family's
name, Prometheus type and label names, with the file and line of its descriptor.

Sources (Project-HAMi/HAMi, tag v2.10.0): ``cmd/scheduler/metrics.go`` (S),
``cmd/vGPUmonitor/metrics.go`` (M), ``pkg/metrics/metrics.go`` (B). Both collectors are
registered through ``prometheus.WrapRegistererWith(prometheus.Labels{"zone": zone}, reg)``
(S:409, M:615), so their families carry ``zone`` as well; ``hami_build_info`` is
registered on the bare registry (S:416, M:143 of ``cmd/vGPUmonitor/main.go``) and does not.
Every descriptor is sent with ``prometheus.GaugeValue`` (or is a ``GaugeFunc``): all gauges.
``LEGACY`` lists the names served with ``--legacy-metrics`` (the only names up to v2.8).
"""

from __future__ import annotations

from typing import NamedTuple

S = "cmd/scheduler/metrics.go"
M = "cmd/vGPUmonitor/metrics.go"
B = "pkg/metrics/metrics.go"


class Row(NamedTuple):
    name: str
    type: str
    labels: tuple[str, ...]  # as HAMi declares them, without the wrapping zone
    source: str  # file:line of the name in HAMi's descriptor
    zone: bool = True


DEVICE = ("node", "device_uuid", "device_index", "device_type")
SLICE = ("namespace", "node", "pod", "container_index", "device_uuid")
CONTAINER = ("namespace", "pod", "container", "vdevice_index", "device_uuid")
HOST = ("node", "device_index", "device_uuid", "device_type")

HAMI = [
    Row("hami_gpu_memory_limit_bytes", "gauge", DEVICE, f"{S}:108"),
    Row("hami_gpu_core_limit_ratio", "gauge", DEVICE, f"{S}:113"),
    Row(
        "hami_gpu_memory_allocated_bytes",
        "gauge",
        ("node", "device_uuid", "device_index", "device_cores", "device_type"),
        f"{S}:118",
    ),
    Row("hami_gpu_shared_count", "gauge", DEVICE, f"{S}:123"),
    Row("hami_gpu_core_allocated_ratio", "gauge", DEVICE, f"{S}:128"),
    Row(
        "hami_node_gpu_overview",
        "gauge",
        (
            "node",
            "device_uuid",
            "device_index",
            "device_cores",
            "device_memory_limit",
            "device_type",
        ),
        f"{S}:133",
    ),
    Row("hami_node_gpu_memory_allocated_ratio", "gauge", DEVICE, f"{S}:138"),
    Row(
        "hami_node_gpu_mig_instance_info",
        "gauge",
        (
            "node",
            "device_uuid",
            "device_index",
            "mig_uuid",
            "profile",
            "gpu_instance_id",
            "compute_instance_id",
            "placement_start",
            "placement_size",
        ),
        f"{S}:143",
    ),
    Row("hami_resource_quota_used", "gauge", ("namespace", "quota_name", "limit"), f"{S}:287"),
    Row("hami_resource_quota_limit", "gauge", ("namespace", "quota_name"), f"{S}:292"),
    Row("hami_vgpu_memory_allocated_bytes", "gauge", SLICE, f"{S}:326"),
    Row("hami_vgpu_core_allocated_ratio", "gauge", SLICE, f"{S}:331"),
    Row("hami_host_gpu_memory_used_bytes", "gauge", HOST, f"{M}:59"),
    Row("hami_host_gpu_utilization_ratio", "gauge", HOST, f"{M}:65"),
    Row(
        "hami_host_gpu_memory_controller_utilization_ratio",
        "gauge",
        ("device_index", "device_uuid", "device_type"),
        f"{M}:71",
    ),
    Row("hami_vgpu_memory_used_bytes", "gauge", CONTAINER, f"{M}:77"),
    Row("hami_vgpu_memory_limit_bytes", "gauge", CONTAINER, f"{M}:83"),
    Row("hami_container_device_memory_bytes", "gauge", CONTAINER, f"{M}:88"),
    Row("hami_container_device_utilization_ratio", "gauge", CONTAINER, f"{M}:93"),
    Row("hami_container_last_kernel_elapsed_seconds", "gauge", CONTAINER, f"{M}:98"),
    Row(
        "hami_mig_device_info",
        "gauge",
        (*CONTAINER, "mig_uuid", "profile", "gpu_instance_id", "compute_instance_id"),
        f"{M}:103",
    ),
    Row("hami_vgpu_memory_context_bytes", "gauge", CONTAINER, f"{M}:108"),
    Row("hami_vgpu_memory_module_bytes", "gauge", CONTAINER, f"{M}:114"),
    Row("hami_vgpu_memory_buffer_bytes", "gauge", CONTAINER, f"{M}:120"),
    Row(
        "hami_build_info",
        "gauge",
        ("version", "revision", "build_date", "go_version", "compiler", "platform"),
        f"{B}:30",
        zone=False,
    ),
]

OLD_DEVICE = ("nodeid", "deviceuuid", "deviceidx", "devicetype")
OLD_SLICE = ("podnamespace", "nodename", "podname", "containeridx", "deviceuuid")
OLD_CONTAINER = ("podnamespace", "podname", "ctrname", "vdeviceid", "deviceuuid")

LEGACY = [
    Row("GPUDeviceMemoryLimit", "gauge", OLD_DEVICE, f"{S}:161"),
    Row("GPUDeviceCoreLimit", "gauge", OLD_DEVICE, f"{S}:166"),
    Row(
        "GPUDeviceMemoryAllocated",
        "gauge",
        ("nodeid", "deviceuuid", "deviceidx", "devicecores", "devicetype"),
        f"{S}:171",
    ),
    Row("GPUDeviceSharedNum", "gauge", OLD_DEVICE, f"{S}:176"),
    Row("GPUDeviceCoreAllocated", "gauge", OLD_DEVICE, f"{S}:181"),
    Row(
        "nodeGPUOverview",
        "gauge",
        ("nodeid", "deviceuuid", "deviceidx", "devicecores", "devicememorylimit", "devicetype"),
        f"{S}:186",
    ),
    Row("nodeGPUMemoryPercentage", "gauge", ("nodeid", "deviceuuid", "deviceidx"), f"{S}:191"),
    Row(
        "nodeGPUMigInstance",
        "gauge",
        ("nodeid", "deviceuuid", "deviceidx", "migname"),
        f"{S}:196",
    ),
    Row("QuotaUsed", "gauge", ("quotanamespace", "quotaName", "limit"), f"{S}:299"),
    Row("vGPUMemoryAllocated", "gauge", OLD_SLICE, f"{S}:341"),
    Row("vGPUCoreAllocated", "gauge", OLD_SLICE, f"{S}:346"),
    Row(
        "HostGPUMemoryUsage",
        "gauge",
        ("nodeid", "deviceidx", "deviceuuid", "devicetype"),
        f"{M}:140",
    ),
    Row(
        "HostCoreUtilization",
        "gauge",
        ("nodeid", "deviceidx", "deviceuuid", "devicetype"),
        f"{M}:145",
    ),
    Row("vGPU_device_memory_usage_in_bytes", "gauge", OLD_CONTAINER, f"{M}:150"),
    Row("vGPU_device_memory_limit_in_bytes", "gauge", OLD_CONTAINER, f"{M}:155"),
    Row(
        "Device_memory_desc_of_container",
        "gauge",
        (*OLD_CONTAINER, "context", "module", "data", "offset"),
        f"{M}:160",
    ),
    Row("Device_utilization_desc_of_container", "gauge", OLD_CONTAINER, f"{M}:165"),
    Row("Device_last_kernel_of_container", "gauge", OLD_CONTAINER, f"{M}:170"),
    Row("MigInfo", "gauge", (*OLD_CONTAINER, "instanceid"), f"{M}:175"),
]

# Families vslice serves without series: no MIG mode, and on a stack whose namespaces have
# no quota, none of the quota families (series once a namespace has a value in the quotas
# bucket: tests/metrics/test_quotas.py)
NO_MIG = {
    "hami_node_gpu_mig_instance_info",
    "hami_mig_device_info",
    "nodeGPUMigInstance",
    "MigInfo",
}
NO_QUOTA_SOURCE = {"hami_resource_quota_used", "hami_resource_quota_limit", "QuotaUsed"}
