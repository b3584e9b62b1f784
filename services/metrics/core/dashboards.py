"""The dashboard's data, for a fleet of a few GPUs or of thousands.

The page served at ``/`` never loads the whole fleet: it draws a fleet summary with an
allocation history (``summary``), one page of nodes matching a search (``node_page``:
filter by node, GPU type, namespace and pod; sort; offset and limit), and one node's GPUs
and slices when it is opened (``node_detail``). ``Tracker`` keeps what the view does not:
the last hour of fleet figures, and when each slice last had a usage line, so a slice
whose usage reports stopped -- a leaked or orphaned slice -- is marked ``stale``.

Fragmentation is FGD's measure (``libshared.fgd``) against the current workload: the
shapes of the pods that hold slices now. A fleet whose small slices leave room for more
small slices is not fragmented for that workload, where a one-shape (whole-GPU) measure
would call every partly used GPU fragmented. With no slice at all, the whole-GPU shape
stands in.

``fleet`` is the whole fleet in one object (``/api/fleet``), for tools. Shape::

    {"at": <Unix s>, "ledger_seq": int, "ledger_lag": int,
     "fragmentation": {"ratio_percent": float, "free_gpus": float, "stranded_gpus": float},
     "nodes": [{"node": str, "registered": bool, "usage_age_s": float | None,
                "escapes": int,
                "devices": [{"uuid": str, "index": int, "type": str, "healthy": bool,
                             "vendor": str, "brand": str,
                             "registered": bool, "split_count": int,
                             "memory_mib": int, "cores_percent": int,
                             "allocated_mib": int, "allocated_cores": int,
                             "used_bytes": int | None, "utilization_percent": float | None,
                             "free_milli": int, "mode": str,
                             "slices": [{"pod_uid": str, "namespace": str, "pod": str,
                                         "container": str, "container_index": int,
                                         "memory_mib": int, "cores_percent": int,
                                         "used_bytes": int | None,
                                         "utilization_percent": float | None,
                                         "mig_profile": str, "mig_start": int,
                                         "mig_uuid": str}]}]}]}

``vendor`` is the word the device registered (``Device.vendor``: ``NVIDIA``, ``DCU``;
"" when not registered) and ``brand`` its maker (``exporting.brand``: ``NVIDIA``,
``Hygon``, ``unknown`` for a word no vendor has; "" when not registered).
``mode`` is the device's (``hami-core`` or ``mig``); a MIG slice has its ``mig_profile``
and ``mig_start``, and ``mig_uuid`` once the node agent reports the instance realized
("" before; "" and -1 on a sliced device).

``used_bytes`` and ``utilization_percent`` of a device are NVML's host figures when the
node reported them, else the sums over its slices' usage lines (None when neither is
known). Pure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from libshared import fgd
from libshared.errors import VsliceError
from services.metrics.core import exporting, fragmentation
from services.metrics.core.views import DeviceRow, NodeRow, SliceRow, Snapshot

HISTORY_S = 3600.0  # the allocation history the page draws: the last hour
HISTORY_FIELDS = ("at", "memory_percent", "cores_percent", "slices", "fragmentation_percent")
SORTS = ("node", "memory", "cores", "slices", "stale", "free")
PAGE_LIMIT = 50
MAX_LIMIT = 500
MAX_TEXT = 253  # a Kubernetes name's bound; longer search text cannot match anything
MAX_NAMES = 500  # namespaces and GPU types the summary lists for the page's filters
SliceKey = tuple[str, str, str]  # pod uid, container, device uuid


class QueryError(VsliceError, ValueError):
    """A node page query parameter that cannot be used: ``field``, ``value``, ``reason``."""

    def __init__(self, *, field: str, value: str, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


@dataclass(frozen=True)
class NodeQuery:
    """Which nodes a page shows: ``node``, ``gpu_type``, ``namespace`` and ``pod`` are
    case-insensitive substrings (empty: any) of the node's name, one of its GPUs' types,
    and the namespace and pod name (or uid) of one of its slices; ``sort`` one of ``SORTS``
    (``node`` by name, the others by allocated memory %, cores %, slices, stale slices or
    free GPU share), ``descending``; ``offset`` and ``limit`` (1-``MAX_LIMIT``) page it."""

    node: str = ""
    gpu_type: str = ""
    namespace: str = ""
    pod: str = ""
    sort: str = "node"
    descending: bool = False
    offset: int = 0
    limit: int = PAGE_LIMIT


def parse_query(params: Mapping[str, str]) -> NodeQuery:
    """The ``NodeQuery`` of URL query parameters ``node``, ``type``, ``namespace``,
    ``pod``, ``sort`` (``-`` before the key: descending), ``offset``, ``limit``. Raises
    ``QueryError`` naming the parameter for a non-integer or out-of-range number, an
    unknown sort key, or text longer than ``MAX_TEXT``."""
    texts = {}
    for key in ("node", "type", "namespace", "pod"):
        value = params.get(key, "").strip()
        if len(value) > MAX_TEXT:
            raise QueryError(field=key, value=value[:40] + "...", reason=f"over {MAX_TEXT} chars")
        texts[key] = value.lower()
    sort = params.get("sort", "node") or "node"
    descending = sort.startswith("-")
    if sort.lstrip("-") not in SORTS:
        raise QueryError(field="sort", value=sort, reason=f"one of {', '.join(SORTS)}")
    numbers = {}
    for key, default, least, most in (
        ("offset", 0, 0, None),
        ("limit", PAGE_LIMIT, 1, MAX_LIMIT),
    ):
        raw = params.get(key, "")
        try:
            number = int(raw) if raw else default
        except ValueError:
            raise QueryError(field=key, value=raw, reason="not an integer") from None
        if number < least or (most is not None and number > most):
            span = f">= {least}" if most is None else f"{least}-{most}"
            raise QueryError(field=key, value=raw, reason=f"must be {span}")
        numbers[key] = number
    return NodeQuery(
        node=texts["node"],
        gpu_type=texts["type"],
        namespace=texts["namespace"],
        pod=texts["pod"],
        sort=sort.lstrip("-"),
        descending=descending,
        offset=numbers["offset"],
        limit=numbers["limit"],
    )


@dataclass
class Tracker:
    """What the dashboard remembers between snapshots: ``seen`` (slice -> the last Unix
    time it had a usage line) and ``history`` (fleet figures, at most ``HISTORY_S`` old,
    one per ``record``). Pure: times are passed in."""

    seen: dict[SliceKey, float] = field(default_factory=dict)
    history: deque[tuple[float, float, float, int, float]] = field(default_factory=deque)

    def observe(self, snapshot: Snapshot, *, now: float) -> None:
        """Note every slice of ``snapshot`` that has a usage line at ``now``."""
        seen = self.seen
        for row in snapshot.devices:
            for s in row.slices:
                if s.usage is not None:
                    seen[(s.slice.pod_uid, s.slice.container, s.slice.uuid)] = now

    def forget_released(self, snapshot: Snapshot) -> None:
        """Forget the slices the ledger of ``snapshot`` no longer holds."""
        held = {_key(s) for row in snapshot.devices for s in row.slices}
        for key in [k for k in self.seen if k not in held]:
            del self.seen[key]

    def stale(self, s: SliceRow) -> bool:
        """Whether the slice had usage lines once and has none now (its container, or its
        node agent, stopped reporting it)."""
        return s.usage is None and _key(s) in self.seen

    def record(self, snapshot: Snapshot, *, now: float) -> None:
        """Observe ``snapshot``, forget released slices, and add its fleet figures at
        ``now`` to the history, dropping points older than ``HISTORY_S``."""
        self.observe(snapshot, now=now)
        self.forget_released(snapshot)
        t = totals(snapshot)
        frag = fragmentation_figure(snapshot)
        self.history.append(
            (
                now,
                round(_percent(t["memory_mib"], t["memory_total_mib"]), 2),
                round(_percent(t["cores_percent"], t["cores_total_percent"]), 2),
                t["slices"],
                round(frag.ratio_percent, 2),
            )
        )
        while self.history and self.history[0][0] < now - HISTORY_S:
            self.history.popleft()


def _key(s: SliceRow) -> SliceKey:
    return (s.slice.pod_uid, s.slice.container, s.slice.uuid)


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def slice_milli(s: SliceRow, row: DeviceRow) -> int:
    """A slice's share of its GPU in milli-GPU, the FGD paper's unit: the larger of its
    cores share and its memory share (rounded up), 1000 for an exclusive slice (100 %
    cores), at least 1."""
    dev = row.device
    if dev is None or dev.memory_mib <= 0 or s.slice.cores_percent >= dev.cores_percent:
        return fgd.MILLI
    mem = -(-s.slice.memory_mib * fgd.MILLI // dev.memory_mib)
    cores = s.slice.cores_percent * fgd.MILLI // max(1, dev.cores_percent)
    return max(1, min(fgd.MILLI, max(mem, cores)))


def current_workload(snapshot: Snapshot) -> fgd.Workload:
    """FGD's target workload of the pods holding slices now: one task per pod, asking as
    many GPUs as it holds devices, each of its largest slice's milli-GPU."""
    pods: dict[str, list[Any]] = {}  # pod uid -> [its devices' uuids, largest milli]
    for row in snapshot.devices:
        for s in row.slices:
            milli = slice_milli(s, row)
            held = pods.get(s.slice.pod_uid)
            if held is None:
                pods[s.slice.pod_uid] = [{row.uuid}, milli]
            else:
                held[0].add(row.uuid)
                held[1] = max(held[1], milli)
    return fgd.workload((milli, len(devices)) for devices, milli in pods.values())


def fragmentation_figure(snapshot: Snapshot, load: fgd.Workload | None = None) -> fgd.Figure:
    """FGD's fleet fragmentation of ``snapshot`` against ``load``, by default its current
    workload (``current_workload``)."""
    load = current_workload(snapshot) if load is None else load
    nodes = ([d.free_milli for d in n.devices if d.device is not None] for n in snapshot.nodes)
    return fgd.fleet_fragmentation(nodes, load)


def totals(snapshot: Snapshot) -> dict[str, int]:
    """Fleet totals: ``nodes``, ``gpus`` (registered), ``gpus_unhealthy``, ``slices``,
    ``memory_mib`` allocated of ``memory_total_mib``, ``cores_percent`` allocated of
    ``cores_total_percent`` (registered GPUs only), ``escapes``."""
    out = dict.fromkeys(
        (
            "gpus",
            "gpus_unhealthy",
            "slices",
            "memory_mib",
            "memory_total_mib",
            "cores_percent",
            "cores_total_percent",
            "escapes",
        ),
        0,
    )
    out["nodes"] = len(snapshot.nodes)
    for n in snapshot.nodes:
        out["escapes"] += len(n.escapes)
        for d in n.devices:
            out["slices"] += len(d.slices)
            if d.device is None:
                continue
            out["gpus"] += 1
            out["gpus_unhealthy"] += 0 if d.device.healthy else 1
            out["memory_mib"] += d.allocated_mib
            out["memory_total_mib"] += d.device.memory_mib
            out["cores_percent"] += d.allocated_cores
            out["cores_total_percent"] += d.device.cores_percent
    return out


def summary(snapshot: Snapshot, *, now: float, tracker: Tracker) -> dict[str, Any]:
    """The fleet summary at ``now``::

        {"at": float, "ledger_seq": int, "ledger_lag": int,
         "nodes", "gpus", "gpus_unhealthy", "slices", "stale_slices", "escapes": int,
         "memory_mib", "memory_total_mib", "cores_percent", "cores_total_percent": int,
         "memory_allocated_percent", "cores_allocated_percent": float,
         "fragmentation": {"measure": "fgd", "shapes": int, "ratio_percent": float,
                           "free_gpus": float, "fragmented_gpus": float},
         "gpu_types": [str], "namespaces": [str],
         "vendors": [{"vendor": str, "brand": str, "gpus": int, "memory_mib": int,
                      "memory_total_mib": int, "slices": int}],
         "history": {"fields": HISTORY_FIELDS, "points": [[...], ...]}}

    ``vendors``: per device vendor word (``exporting.vendor_totals``), by word.
    ``tracker`` observes the snapshot first (stale slices are counted against it)."""
    tracker.observe(snapshot, now=now)
    t = totals(snapshot)
    load = current_workload(snapshot)
    frag = fragmentation_figure(snapshot, load)
    types = sorted({d.device.type for d in snapshot.devices if d.device is not None})
    spaces = sorted({s.slice.namespace for d in snapshot.devices for s in d.slices})
    stale = sum(1 for d in snapshot.devices for s in d.slices if tracker.stale(s))
    return {
        "at": now,
        "ledger_seq": snapshot.ledger_seq,
        "ledger_lag": max(0, snapshot.ledger_last_seq - snapshot.ledger_seq),
        **t,
        "stale_slices": stale,
        "memory_allocated_percent": round(_percent(t["memory_mib"], t["memory_total_mib"]), 2),
        "cores_allocated_percent": round(_percent(t["cores_percent"], t["cores_total_percent"]), 2),
        "fragmentation": {
            "measure": "fgd",
            "shapes": len(load.shapes),
            "ratio_percent": round(frag.ratio_percent, 2),
            "free_gpus": round(frag.free_milli / fgd.MILLI, 3),
            "fragmented_gpus": round(frag.fragmented_milli / fgd.MILLI, 3),
        },
        "gpu_types": types[:MAX_NAMES],
        "namespaces": spaces[:MAX_NAMES],
        "vendors": [
            {
                "vendor": word,
                "brand": exporting.brand(word),
                "gpus": v.devices,
                "memory_mib": v.allocated_mib,
                "memory_total_mib": v.memory_mib,
                "slices": v.slices,
            }
            for word, v in exporting.vendor_totals(snapshot).items()
        ][:MAX_NAMES],
        "history": {"fields": list(HISTORY_FIELDS), "points": [list(p) for p in tracker.history]},
    }


def _matches(n: NodeRow, query: NodeQuery) -> bool:
    if query.node and query.node not in n.node.lower():
        return False
    if query.gpu_type and not any(
        d.device is not None and query.gpu_type in d.device.type.lower() for d in n.devices
    ):
        return False
    if query.namespace or query.pod:
        return any(
            query.namespace in s.slice.namespace.lower()
            and (query.pod in s.slice.pod.lower() or query.pod in s.slice.pod_uid.lower())
            for d in n.devices
            for s in d.slices
        )
    return True


def node_row(n: NodeRow, *, tracker: Tracker) -> dict[str, Any]:
    """One node for the node table::

    {"node": str, "registered": bool, "gpus": int, "types": [str], "brands": [str],
     "memory_mib", "memory_total_mib": int, "memory_percent": float,
     "cores_percent": float, "slices", "stale", "unhealthy", "escapes": int,
     "free_gpus": float, "usage_age_s": float | None}"""
    registered = [d for d in n.devices if d.device is not None]
    memory = sum(d.allocated_mib for d in registered)
    total = sum(d.device.memory_mib for d in registered if d.device is not None)
    cores = sum(d.allocated_cores for d in registered)
    cores_total = sum(d.device.cores_percent for d in registered if d.device is not None)
    return {
        "node": n.node,
        "registered": n.registered,
        "gpus": len(registered),
        "types": sorted({d.device.type for d in registered if d.device is not None}),
        "brands": sorted(
            {exporting.brand(d.device.vendor) for d in registered if d.device is not None}
        ),
        "memory_mib": memory,
        "memory_total_mib": total,
        "memory_percent": round(_percent(memory, total), 1),
        "cores_percent": round(_percent(cores, cores_total), 1),
        "slices": sum(len(d.slices) for d in n.devices),
        "stale": sum(1 for d in n.devices for s in d.slices if tracker.stale(s)),
        "unhealthy": sum(1 for d in registered if d.device is not None and not d.device.healthy),
        "escapes": len(n.escapes),
        "free_gpus": sum(d.free_milli for d in registered) / fgd.MILLI,
        "usage_age_s": n.usage_age_s,
    }


SORT_KEYS = {
    "memory": "memory_percent",
    "cores": "cores_percent",
    "slices": "slices",
    "stale": "stale",
    "free": "free_gpus",
}


def node_page(
    snapshot: Snapshot, query: NodeQuery, *, now: float, tracker: Tracker
) -> dict[str, Any]:
    """One page of the nodes matching ``query``::

        {"total": int (nodes matching), "offset": int, "limit": int,
         "nodes": [node_row, ...]}

    Sorted by ``query.sort``, ties by node name."""
    tracker.observe(snapshot, now=now)
    if query.sort == "node" and not (query.node or query.gpu_type or query.namespace or query.pod):
        # the default page: the snapshot is in name order, only the page's rows are built
        ordered = snapshot.nodes[::-1] if query.descending else snapshot.nodes
        shown = ordered[query.offset : query.offset + query.limit]
        return {
            "total": len(snapshot.nodes),
            "offset": query.offset,
            "limit": query.limit,
            "nodes": [node_row(n, tracker=tracker) for n in shown],
        }
    rows = [node_row(n, tracker=tracker) for n in snapshot.nodes if _matches(n, query)]
    if query.sort == "node":
        rows.sort(key=lambda r: r["node"], reverse=query.descending)
    else:
        key = SORT_KEYS[query.sort]
        rows.sort(key=lambda r: r["node"])
        rows.sort(key=lambda r: r[key], reverse=query.descending)
    return {
        "total": len(rows),
        "offset": query.offset,
        "limit": query.limit,
        "nodes": rows[query.offset : query.offset + query.limit],
    }


def node_detail(
    snapshot: Snapshot, node: str, *, now: float, tracker: Tracker
) -> dict[str, Any] | None:
    """One node: ``node_row``'s fields, ``escaped`` (the processes of its latest usage
    report that escaped their slice, as ``Escape`` objects) and ``devices`` (``fleet``'s
    device shape, each slice with ``stale``); None when the fleet has no such node."""
    tracker.observe(snapshot, now=now)
    for n in snapshot.nodes:
        if n.node == node:
            row = node_row(n, tracker=tracker)
            devices = []
            for d in n.devices:
                out = _device(d)
                for s, shown in zip(d.slices, out["slices"], strict=True):
                    shown["stale"] = tracker.stale(s)
                devices.append(out)
            escaped = [msgspec.to_builtins(e) for e in n.escapes]
            return {**row, "escaped": escaped, "devices": devices}
    return None


def _device(row: DeviceRow) -> dict[str, Any]:
    dev = row.device
    realized = {(m.start, m.profile): m.mig_uuid for m in row.migs}
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
        "vendor": dev.vendor if dev else "",
        "brand": exporting.brand(dev.vendor) if dev else "",
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
        "mode": dev.mode if dev else "",
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
                "mig_profile": s.slice.mig_profile,
                "mig_start": s.slice.mig_start,
                "mig_uuid": realized.get((s.slice.mig_start, s.slice.mig_profile), ""),
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
