"""Usage read back: a node's ``NodeUsage`` from its shared cache files and NVML's figures.

Every container slice on the node has a shared cache file that libvgpu charges; NVML
reports each device and each host process using one. This module puts the two together
into the ``NodeUsage`` the node agent publishes on ``<prefix>.usage.<node>``: per device
(NVML), per container and device (memory charged against the slice's limit, its
processes, its share of SM utilization, its last kernel), unreadable cache files as
problems, and the **host-side check**: a process whose device memory (NVML) passes what
libvgpu charged it while its container is over the slice is an ``Escape`` -- it runs
without libvgpu (``LD_PRELOAD`` unset, say), which HAMi cannot see at all. A process on a
device that belongs to no slice is reported too, and never to be killed. Pure: reading
files and NVML, killing and publishing belong to the adapters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from libshared import bounds, events
from libshared.ledgers import Slice
from services.nodeagent.core.sharedcaches import SharedCache

MIB = 1 << 20


@dataclass(frozen=True)
class Container:
    """A prepared container slice: ``key`` (its directory name), its ``slices`` in CUDA
    device order (``slices[i]`` is device ``i`` of its shared cache file)."""

    key: str
    pod_uid: str
    namespace: str
    pod: str
    container: str
    slices: tuple[Slice, ...]


@dataclass(frozen=True)
class DeviceReading:
    """One GPU as NVML sees it: bytes used and total, utilization percent and memory
    controller utilization percent (None: unknown)."""

    uuid: str
    index: int
    type: str
    used_bytes: int
    total_bytes: int
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None


@dataclass(frozen=True)
class ProcessReading:
    """One host process on one GPU (NVML): device memory in bytes, SM utilization percent
    over the last sampling period (None: unknown)."""

    pid: int
    uuid: str
    used_bytes: int
    sm_percent: float | None = None


def with_host_pids(cache: SharedCache, host_pid_of: Mapping[int, int]) -> SharedCache:
    """``cache`` with each process slot's pid replaced by its host pid. Pure.

    libvgpu writes ``getpid()``, the pid in the container's own PID namespace (a pod's
    first process is pid 1), while NVML names host pids. ``host_pid_of`` maps the
    namespace pids of the container's processes (those tied to it by other means) to
    their host pids; a slot whose pid it lacks keeps its pid (no mapping is needed in
    the host's namespace, as under ``vslice run``).
    """
    slots = tuple(
        msgspec.structs.replace(p, pid=host_pid_of[p.pid]) if p.pid in host_pid_of else p
        for p in cache.processes
    )
    return msgspec.structs.replace(cache, processes=slots)


def owners_from_caches(
    containers: Sequence[Container], caches: Mapping[str, SharedCache]
) -> dict[int, str]:
    """pid -> container key of every process holding a slot in a container's cache. Pure."""
    out: dict[int, str] = {}
    for c in containers:
        cache = caches.get(c.key)
        if cache is not None:
            for p in cache.processes:
                out.setdefault(p.pid, c.key)
    return out


def report(
    *,
    node: str,
    at: float,
    containers: Sequence[Container],
    caches: Mapping[str, SharedCache | str],
    devices: Sequence[DeviceReading],
    processes: Sequence[ProcessReading],
    owners: Mapping[int, str],
    margin_bytes: int = 0,
) -> events.NodeUsage:
    """The node's usage at ``at`` (Unix seconds). Pure.

    ``containers`` are every container slice the node knows, released ones included (their
    processes are still checked); only those in ``caches`` get usage rows. ``caches`` maps
    a container key to its decoded cache, or to the reason it could not be read (reported
    in ``problems``; the container then gets no row but is still checked). ``owners``
    maps host pids to container keys for processes found by other means than a cache
    slot (their environment names the container's cache, or a parent of theirs runs in
    it); a cache slot wins. ``margin_bytes`` is what NVML may show
    per process above libvgpu's charge without counting as an escape (a real CUDA context
    takes a few hundred MiB that no allocation call charges; the mock's takes none).
    """
    good = {k: v for k, v in caches.items() if isinstance(v, SharedCache)}
    problems = tuple(f"{k}: {v}" for k, v in sorted(caches.items()) if isinstance(v, str))
    owner = dict(owners)
    owner.update(owners_from_caches(containers, good))
    by_key = {c.key: c for c in containers}
    sm_of: dict[tuple[int, str], float] = {
        (p.pid, p.uuid): p.sm_percent for p in processes if p.sm_percent is not None
    }
    rows: list[events.ContainerUsage] = []
    for c in sorted(containers, key=lambda c: c.key):
        cache = good.get(c.key)
        if cache is None:
            continue
        for ordinal, s in enumerate(c.slices):
            dev = cache.devices[ordinal]
            pids = tuple(
                sorted(p.pid for p in cache.processes)
                if len(c.slices) == 1
                else sorted(p.pid for p in cache.processes if p.charged_bytes[ordinal] > 0)
            )
            mine = [owner_pid for owner_pid, key in owner.items() if key == c.key]
            shares = [sm_of[(pid, s.uuid)] for pid in mine if (pid, s.uuid) in sm_of]
            rows.append(
                events.ContainerUsage(
                    pod_uid=c.pod_uid,
                    namespace=c.namespace,
                    pod=c.pod,
                    container=c.container,
                    container_index=s.container_index,
                    uuid=s.uuid,
                    device_index=s.device_index,
                    used_bytes=dev.used_bytes,
                    limit_bytes=dev.limit_bytes,
                    sm_limit_percent=dev.sm_limit_percent,
                    utilization_percent=min(100.0, sum(shares)) if shares else None,
                    last_kernel_at=cache.last_kernel_ns / 1e9 if cache.last_kernel_ns else None,
                    pids=pids,
                )
            )
    return events.NodeUsage(
        node=node,
        at=at,
        devices=tuple(
            events.DeviceUsage(
                uuid=d.uuid,
                index=d.index,
                type=d.type,
                used_bytes=d.used_bytes,
                total_bytes=d.total_bytes,
                utilization_percent=d.utilization_percent,
                memory_utilization_percent=d.memory_utilization_percent,
            )
            for d in sorted(devices, key=lambda d: d.index)
        ),
        containers=tuple(rows),
        escapes=escapes(
            containers=by_key,
            caches=good,
            processes=processes,
            owner=owner,
            margin_bytes=margin_bytes,
        ),
        problems=problems,
    )


def clipped(usage: events.NodeUsage) -> tuple[events.NodeUsage, list[str]]:
    """``usage`` within ``NodeUsage``'s bounds, and what was left out (one line per kind,
    empty when nothing was): the first ``events.MAX_USAGE_ROWS`` container rows, the first
    ``events.MAX_USAGE_PIDS`` pids of each, the first ``events.MAX_ESCAPES`` escapes and
    ``events.MAX_PROBLEMS`` problems, each problem cut to ``events.MAX_PROBLEM``
    characters. Devices are not clipped: a node registers at most as many as a report
    holds. Pure."""
    left: list[str] = []
    rows = usage.containers
    if len(rows) > events.MAX_USAGE_ROWS:
        left.append(f"{len(rows) - events.MAX_USAGE_ROWS} container rows")
        rows = rows[: events.MAX_USAGE_ROWS]
    cut = [r for r in rows if len(r.pids) > events.MAX_USAGE_PIDS]
    if cut:
        left.append(
            f"{sum(len(r.pids) - events.MAX_USAGE_PIDS for r in cut)} pids of {len(cut)} rows"
        )
        rows = tuple(
            msgspec.structs.replace(r, pids=r.pids[: events.MAX_USAGE_PIDS])
            if len(r.pids) > events.MAX_USAGE_PIDS
            else r
            for r in rows
        )
    escaped = usage.escapes
    if len(escaped) > events.MAX_ESCAPES:
        left.append(f"{len(escaped) - events.MAX_ESCAPES} escapes")
        escaped = escaped[: events.MAX_ESCAPES]
    problems = usage.problems
    if len(problems) > events.MAX_PROBLEMS:
        left.append(f"{len(problems) - events.MAX_PROBLEMS} problems")
        problems = problems[: events.MAX_PROBLEMS]
    if any(len(p) > events.MAX_PROBLEM for p in problems):
        left.append("the tail of problems over the length bound")
        problems = tuple(bounds.clip(p, events.MAX_PROBLEM) for p in problems)
    if not left:
        return usage, []
    return (
        msgspec.structs.replace(usage, containers=rows, escapes=escaped, problems=problems),
        left,
    )


def escapes(
    *,
    containers: Mapping[str, Container],
    caches: Mapping[str, SharedCache],
    processes: Sequence[ProcessReading],
    owner: Mapping[int, str],
    margin_bytes: int = 0,
) -> tuple[events.Escape, ...]:
    """The host-side check. Pure.

    For each container and device of its slice: when NVML's total for the container's
    processes exceeds the slice's limit (plus ``margin_bytes`` per process), every one of
    those processes whose NVML figure exceeds what libvgpu charged it (plus the margin)
    is an ``Escape``. A process on a device no slice of its container holds, or owned by
    no container, is an ``Escape`` with ``limit_bytes`` 0 (and, for no container, empty
    ``pod_uid``). Sorted by pid, then UUID.
    """
    out: list[events.Escape] = []
    groups: dict[tuple[str, str], list[ProcessReading]] = {}
    for p in processes:
        if p.used_bytes <= 0:
            continue
        key = owner.get(p.pid)
        c = containers.get(key) if key is not None else None
        if c is None:
            out.append(
                events.Escape(pid=p.pid, uuid=p.uuid, used_bytes=p.used_bytes, limit_bytes=0)
            )
            continue
        if not any(s.uuid == p.uuid for s in c.slices):
            out.append(
                events.Escape(
                    pid=p.pid,
                    uuid=p.uuid,
                    used_bytes=p.used_bytes,
                    limit_bytes=0,
                    pod_uid=c.pod_uid,
                    container=c.container,
                )
            )
            continue
        groups.setdefault((c.key, p.uuid), []).append(p)
    for (key, uuid), procs in groups.items():
        c = containers[key]
        ordinal = next(i for i, s in enumerate(c.slices) if s.uuid == uuid)
        limit = c.slices[ordinal].memory_mib * MIB
        if sum(p.used_bytes for p in procs) <= limit + margin_bytes * len(procs):
            continue
        cache = caches.get(key)
        charged = (
            {slot.pid: slot.charged_bytes[ordinal] for slot in cache.processes} if cache else {}
        )
        for p in procs:
            if p.used_bytes > charged.get(p.pid, 0) + margin_bytes:
                out.append(
                    events.Escape(
                        pid=p.pid,
                        uuid=uuid,
                        used_bytes=p.used_bytes,
                        limit_bytes=limit,
                        pod_uid=c.pod_uid,
                        container=c.container,
                    )
                )
    return tuple(sorted(out, key=lambda e: (e.pid, e.uuid)))


def to_kill(found: Sequence[events.Escape]) -> list[int]:
    """The pids ``--enforce=kill`` ends: escapes that belong to a slice (a process outside
    every slice is only reported: the node agent cannot tell it is not the host's own).
    Pure."""
    return sorted({e.pid for e in found if e.pod_uid})


def with_killed(usage: events.NodeUsage, killed: set[int]) -> events.NodeUsage:
    """``usage`` with each escape marked ``killed`` when its pid is in ``killed``. Pure."""
    return msgspec.structs.replace(
        usage,
        escapes=tuple(msgspec.structs.replace(e, killed=e.pid in killed) for e in usage.escapes),
    )
