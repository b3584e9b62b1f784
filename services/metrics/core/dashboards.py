"""The dashboard's data: the fleet as nodes -> GPUs -> slices, as one JSON-ready object.

The page served at ``/`` fetches this from ``/api/fleet`` and draws each GPU as bars of
allocated and used memory and cores, with the slices and who holds them. Shape::

    {"at": <Unix s>, "ledger_seq": int, "ledger_lag": int,
     "fragmentation": {"ratio_percent": float, "free_gpus": float, "stranded_gpus": float},
     "nodes": [{"node": str, "registered": bool, "usage_age_s": float | None,
                "escapes": int,
                "devices": [{"uuid": str, "index": int, "type": str, "healthy": bool,
                             "registered": bool, "split_count": int,
                             "memory_mib": int, "cores_percent": int,
                             "allocated_mib": int, "allocated_cores": int,
                             "used_bytes": int | None, "utilization_percent": float | None,
                             "free_milli": int,
                             "slices": [{"pod_uid": str, "namespace": str, "pod": str,
                                         "container": str, "container_index": int,
                                         "memory_mib": int, "cores_percent": int,
                                         "used_bytes": int | None,
                                         "utilization_percent": float | None}]}]}]}

``used_bytes`` and ``utilization_percent`` of a device are NVML's host figures when the
node reported them, else the sums over its slices' usage lines (None when neither is
known). Pure.
"""

from __future__ import annotations

from typing import Any

from services.metrics.core import exporting, fragmentation
from services.metrics.core.views import DeviceRow, Snapshot


def _device(row: DeviceRow) -> dict[str, Any]:
    dev = row.device
    lines = [s.usage for s in row.slices if s.usage is not None]
    if row.host is not None:
        used: int | None = row.host.used_bytes
        util = row.host.utilization_percent
    else:
        used = sum(line.used_bytes for line in lines) if lines else None
        known = [line.utilization_percent for line in lines if line.utilization_percent is not None]
        util = min(100.0, sum(known)) if known else None
    return {
        "uuid": row.uuid,
        "index": row.index,
        "type": dev.type if dev else "",
        "healthy": dev.healthy if dev else False,
        "registered": dev is not None,
        "split_count": dev.split_count if dev else 0,
        "memory_mib": dev.memory_mib if dev else 0,
        "cores_percent": dev.cores_percent if dev else 0,
        "allocated_mib": row.allocated_mib,
        "allocated_cores": row.allocated_cores,
        "used_bytes": used,
        "utilization_percent": util,
        "free_milli": row.free_milli,
        "slices": [
            {
                "pod_uid": s.slice.pod_uid,
                "namespace": s.slice.namespace,
                "pod": s.slice.pod,
                "container": s.slice.container,
                "container_index": s.slice.container_index,
                "memory_mib": s.slice.memory_mib,
                "cores_percent": s.slice.cores_percent,
                "used_bytes": s.usage.used_bytes if s.usage else None,
                "utilization_percent": s.usage.utilization_percent if s.usage else None,
            }
            for s in row.slices
        ],
    }


def fleet(snapshot: Snapshot, *, now: float) -> dict[str, Any]:
    """The dashboard object of ``snapshot`` at Unix time ``now`` (shape in the module
    docstring)."""
    figure = exporting.fleet_figure(snapshot)
    return {
        "at": now,
        "ledger_seq": snapshot.ledger_seq,
        "ledger_lag": max(0, snapshot.ledger_last_seq - snapshot.ledger_seq),
        "fragmentation": {
            "ratio_percent": round(figure.ratio_percent, 2),
            "free_gpus": figure.free_milli / fragmentation.MILLI,
            "stranded_gpus": figure.stranded_milli / fragmentation.MILLI,
        },
        "nodes": [
            {
                "node": n.node,
                "registered": n.registered,
                "usage_age_s": n.usage_age_s,
                "escapes": len(n.escapes),
                "devices": [_device(d) for d in n.devices],
            }
            for n in snapshot.nodes
        ],
    }
