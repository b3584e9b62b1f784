"""Prometheus metric families from a fleet snapshot: HAMi's names and labels, and vslice's own.

HAMi's names, labels and units are taken from HAMi's metrics reference (``docs/metrics.md``
and the scheduler / vGPU monitor catalogue, Project-HAMi/HAMi) and the monitoring pages of
its documentation ("Cluster device allocation", "Real-time device usage"), so HAMi's
Grafana dashboards read a vslice fleet unchanged:

- scheduler side, per device (labels ``node``, ``device_uuid``, ``device_index``,
  ``device_type``): ``hami_gpu_memory_limit_bytes``, ``hami_gpu_core_limit_ratio``
  (percent), ``hami_gpu_memory_allocated_bytes`` (plus ``device_cores``: the cores
  allocated, as HAMi labels it), ``hami_gpu_core_allocated_ratio`` (percent),
  ``hami_gpu_shared_count`` (slices), and ``hami_node_gpu_memory_allocated_ratio``
  (labels ``node``, ``device_uuid``, ``device_index``; a 0-1 fraction, the one "ratio"
  HAMi's catalogue gives unit ``ratio`` rather than percent);
- scheduler side, per slice (labels ``namespace``, ``node``, ``pod``, ``container_index``,
  ``device_uuid``): ``hami_vgpu_memory_allocated_bytes``, ``hami_vgpu_core_allocated_ratio``
  (percent);
- monitor side, per slice with a fresh usage line (labels ``namespace``, ``pod``,
  ``container``, ``vdevice_index``, ``device_uuid``, plus ``node`` because one vslice
  exporter serves every node): ``hami_vgpu_memory_used_bytes``,
  ``hami_container_device_memory_bytes`` (the same value, as HAMi reports it),
  ``hami_vgpu_memory_limit_bytes``, ``hami_container_device_utilization_ratio`` (percent),
  ``hami_container_last_kernel_elapsed_seconds`` (only once a kernel ran);
- monitor side, per device with a fresh NVML reading (labels ``node``, ``device_index``,
  ``device_uuid``, ``device_type``): ``hami_host_gpu_memory_used_bytes``,
  ``hami_host_gpu_utilization_ratio`` (percent).

Every HAMi family carries ``zone`` (HAMi's constant label, ``vGPU``). Memory in the ledger
is MiB; the families give bytes (MiB x 1,048,576), as HAMi does.

vslice's own: ``vslice_fleet_fragmentation_ratio`` (percent, ``fragmentation``),
``vslice_fleet_free_gpus`` and ``vslice_fleet_stranded_gpus`` (GPUs),
``vslice_node_fragmentation_ratio`` (percent, per node), ``vslice_ledger_revision`` and
``vslice_ledger_revision_lag`` (stream sequences the view is behind the ledger),
``vslice_node_usage_age_seconds``, ``vslice_node_escaped_processes``, and from the
replicas' ``Stats``: ``vslice_scheduler_requests_total``,
``vslice_scheduler_decisions_total`` (``outcome``: placed, unschedulable, error),
``vslice_scheduler_releases_total``, ``vslice_scheduler_cas_conflicts_total``,
``vslice_scheduler_claims_lost_total``, ``vslice_scheduler_claim_takeovers_total`` (label
``replica``; counters since that replica started).

Pure: the caller passes the snapshot, the live stats and the time.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from libshared import events
from services.metrics.core import fragmentation
from services.metrics.core.views import MIB, Snapshot

ZONE = "vGPU"  # HAMi's constant `zone` label of every scheduler and monitor series

DEVICE_LABELS = ["node", "device_uuid", "device_index", "device_type", "zone"]
ALLOCATED_LABELS = ["node", "device_uuid", "device_index", "device_cores", "device_type", "zone"]
RATIO_LABELS = ["node", "device_uuid", "device_index", "zone"]
SLICE_LABELS = ["namespace", "node", "pod", "container_index", "device_uuid", "zone"]
CONTAINER_LABELS = ["namespace", "pod", "container", "vdevice_index", "device_uuid", "node", "zone"]
HOST_LABELS = ["node", "device_index", "device_uuid", "device_type", "zone"]


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def hami_families(snapshot: Snapshot, *, now: float, zone: str = ZONE) -> list[Metric]:
    """HAMi's scheduler-side and monitor-side families (see the module docstring) of
    ``snapshot`` at Unix time ``now`` (for the seconds since a container's last kernel)."""
    mem_limit = _gauge("hami_gpu_memory_limit_bytes", "Device memory of a GPU", DEVICE_LABELS)
    core_limit = _gauge("hami_gpu_core_limit_ratio", "Device cores of a GPU", DEVICE_LABELS)
    mem_alloc = _gauge(
        "hami_gpu_memory_allocated_bytes", "Device memory allocated on a GPU", ALLOCATED_LABELS
    )
    core_alloc = _gauge(
        "hami_gpu_core_allocated_ratio", "Device cores allocated on a GPU", DEVICE_LABELS
    )
    shared = _gauge("hami_gpu_shared_count", "Slices sharing a GPU", DEVICE_LABELS)
    mem_ratio = _gauge(
        "hami_node_gpu_memory_allocated_ratio",
        "Fraction (0-1) of a GPU's memory allocated",
        RATIO_LABELS,
    )
    vmem_alloc = _gauge(
        "hami_vgpu_memory_allocated_bytes", "Device memory allocated to a container", SLICE_LABELS
    )
    vcore_alloc = _gauge(
        "hami_vgpu_core_allocated_ratio", "Device cores allocated to a container", SLICE_LABELS
    )
    used = _gauge("hami_vgpu_memory_used_bytes", "Device memory a container uses", CONTAINER_LABELS)
    used_too = _gauge(
        "hami_container_device_memory_bytes", "Device memory a container uses", CONTAINER_LABELS
    )
    limit = _gauge(
        "hami_vgpu_memory_limit_bytes", "Device memory limit of a container", CONTAINER_LABELS
    )
    util = _gauge(
        "hami_container_device_utilization_ratio",
        "A container's share of the device's busy time (0-100)",
        CONTAINER_LABELS,
    )
    kernel = _gauge(
        "hami_container_last_kernel_elapsed_seconds",
        "Seconds since a container's last kernel launch",
        CONTAINER_LABELS,
    )
    host_used = _gauge(
        "hami_host_gpu_memory_used_bytes", "Device memory used on the host (NVML)", HOST_LABELS
    )
    host_util = _gauge(
        "hami_host_gpu_utilization_ratio", "GPU utilization on the host (0-100)", HOST_LABELS
    )
    per_slice: dict[tuple[str, ...], list[float]] = {}
    per_container: dict[tuple[str, ...], tuple[float, float, float | None, float | None]] = {}
    for row in snapshot.devices:
        dev = row.device
        idx = str(row.index)
        if dev is not None:
            labels = [row.node, row.uuid, idx, dev.type, zone]
            mem_limit.add_metric(labels, dev.memory_mib * MIB)
            core_limit.add_metric(labels, dev.cores_percent)
            mem_alloc.add_metric(
                [row.node, row.uuid, idx, str(row.allocated_cores), dev.type, zone],
                row.allocated_mib * MIB,
            )
            core_alloc.add_metric(labels, row.allocated_cores)
            shared.add_metric(labels, len(row.slices))
            mem_ratio.add_metric(
                [row.node, row.uuid, idx, zone],
                row.allocated_mib / dev.memory_mib if dev.memory_mib else 0.0,
            )
        if row.host is not None:
            host = row.host
            host_labels = [row.node, str(host.index), host.uuid, host.type, zone]
            host_used.add_metric(host_labels, host.used_bytes)
            if host.utilization_percent is not None:
                host_util.add_metric(host_labels, host.utilization_percent)
        for sr in row.slices:
            s = sr.slice
            key = (s.namespace, row.node, s.pod, str(s.container_index), s.uuid, zone)
            got = per_slice.setdefault(key, [0.0, 0.0])
            got[0] += s.memory_mib * MIB
            got[1] += s.cores_percent
            line = sr.usage
            if line is None:
                continue
            ckey = (s.namespace, s.pod, s.container, str(sr.vdevice_index), s.uuid, row.node, zone)
            elapsed = None if line.last_kernel_at is None else max(0.0, now - line.last_kernel_at)
            per_container[ckey] = (
                float(line.used_bytes),
                float(line.limit_bytes or s.memory_mib * MIB),
                line.utilization_percent,
                elapsed,
            )
    for slice_key, (mem, cores) in per_slice.items():
        vmem_alloc.add_metric(list(slice_key), mem)
        vcore_alloc.add_metric(list(slice_key), cores)
    for container_key, (u, lim, ut, el) in per_container.items():
        labels = list(container_key)
        used.add_metric(labels, u)
        used_too.add_metric(labels, u)
        limit.add_metric(labels, lim)
        if ut is not None:
            util.add_metric(labels, ut)
        if el is not None:
            kernel.add_metric(labels, el)
    return [
        mem_limit,
        core_limit,
        mem_alloc,
        core_alloc,
        shared,
        mem_ratio,
        vmem_alloc,
        vcore_alloc,
        used,
        used_too,
        limit,
        util,
        kernel,
        host_used,
        host_util,
    ]


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
    out: list[Metric] = [ratio, free, stranded, per_node, age, escaped, revision, lag]
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
