"""The kubelet device plugin's decisions: what to advertise, what to prefer, whose slice an
Allocate is for, and what the container gets.

**Advertising.** Each GPU is advertised ``split_count`` times (HAMi's deviceSplitCount) as
replicas ``<uuid>-<i>`` under ``nvidia.com/gpu``, all healthy or all unhealthy with their
GPU, with the GPU's NUMA node as topology. kubelet counts one unit per replica; which
replica a container gets means nothing by itself: the slice -- GPU, memory, cores -- comes
from the pod's ``hami.io/vgpu-devices-to-allocate`` annotation, written at bind.

**Allocate.** kubelet's ``AllocateRequest`` names, per container, the replica IDs it picked
and nothing about the pod (Kubernetes device-plugin API v1beta1). The pod is found among
the *candidates*: pods with ``spec.nodeName`` this node, ``hami.io/bind-phase:
allocating``, not ending, whose next container entry of devices-to-allocate (the first
entry with devices, init containers first, as HAMi consumes them) holds as many devices
as the request. ``choose`` then ranks them:

1. most requested replicas whose GPU UUID is in the entry (a multiset overlap): the
   request carries the pod's GPUs when ``GetPreferredAllocation`` steered kubelet to them
   or when kubelet reuses an init container's replicas;
2. oldest ``hami.io/bind-time`` (seconds), then oldest ``creationTimestamp``, then
   namespace/name: kubelet admits pods in the order their binding reaches it, and sorts a
   batch that arrives together by creation time (kubelet ``HandlePodAdditions``).

No lock spans bind and Allocate: binds on a node run concurrently and the decision is made
from the pods as they are at Allocate time. HAMi instead serializes binds per node with a
node lock (HAMi #374, #810, #1367) and still picks the wrong pod when several are pending
(HAMi #781), and its fallback takes whichever pod names itself in its own annotations
(HAMi #3076). Here, where the node agent reads the ledger (on the bus), a candidate whose
devices-to-allocate the ledger does not hold is dropped (``ledger_disagrees``).

Limits, stated plainly: when two candidates wait for as many devices and the request's
replicas do not tell them apart (both on the same GPUs, or replicas steered by
``GetPreferredAllocation``, which is itself given no pod), the order rule decides. It is
wrong only when kubelet admits the later-bound pod first (e.g. one whose admission an
earlier admit handler delayed); the two pods then swap their slices. Each entry is still
handed out exactly once, so every GPU carries exactly the slices the ledger holds and
nothing is double-booked; what goes wrong is which of the two pods runs with which
slice. ``Match.ambiguous`` marks every decision the order made, for the adapter to log.

**Vendors.** The same rules serve Hygon DCUs (``libshared.vendors.DCU``): a second device
plugin advertises ``hygon.com/dcunum`` replicas of the node's DCUs and matches pods by
``hami.io/dcu-devices-to-allocate``; each vendor's plugin consumes its own annotation, and
``hami.io/bind-phase`` turns ``success`` once no vendor's devices-to-allocate holds a
device (HAMi's ``PodAllocationTrySuccess`` waits for every vendor the same way).

Everything here is pure: the gRPC server, the Kubernetes API and the files are the
adapters' (``services.nodeagent.adapters.deviceplugin``, ``.kube``, ``.slicing``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from libshared import annotations as keys
from libshared import vendors
from libshared.devices import Device
from libshared.errors import AnnotationDecodeError, InvalidRequest, VsliceError
from libshared.ledgers import NodeLedger, Slice
from libshared.resources import GPU, ResourceSettings, parse_container, pod_containers
from services.nodeagent.core import devicelists, preparing

RESOURCE_NAME = GPU  # the extended resource the device plugin advertises
API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

DISABLE_CONTROL = "CUDA_DISABLE_CONTROL"  # HAMi-core's switch: "true" runs without libvgpu
ENDED_PHASES = frozenset({"Succeeded", "Failed"})

# Where the slice appears inside the container.
CONTAINER_ROOT = "/usr/local/vslice"
CONTAINER_LIBVGPU = f"{CONTAINER_ROOT}/libvgpu.so"
CONTAINER_CACHE_DIR = f"{CONTAINER_ROOT}/cache"
CONTAINER_MOCK_DIR = f"{CONTAINER_ROOT}/mockgpu"
CONTAINER_MOCK_STATE = f"{CONTAINER_ROOT}/mockgpu.state"
LD_SO_PRELOAD = "/etc/ld.so.preload"


class NoCandidate(VsliceError):
    """No pending pod fits an Allocate request: ``reason`` says why, for the gRPC error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- advertising ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One advertised unit of ``nvidia.com/gpu``: ``id`` ``<uuid>-<i>`` of GPU ``uuid``."""

    id: str
    uuid: str
    healthy: bool
    numa: int


def replica_id(uuid: str, i: int) -> str:
    """``<uuid>-<i>``. Pure."""
    return f"{uuid}-{i}"


def replica_uuid(device_id: str) -> str | None:
    """The GPU UUID of replica ``device_id`` (``<uuid>-<i>``), None when it has no such
    shape. Pure."""
    uuid, sep, i = device_id.rpartition("-")
    if not sep or not uuid or not (i.isascii() and i.isdigit()):
        return None
    return uuid


def replicas(devices: Iterable[Device], vendor: vendors.Vendor = vendors.NVIDIA) -> list[Replica]:
    """Every replica of the devices of ``vendor`` among ``devices`` (``split_count`` per
    device, by index then replica number), healthy when its device is. Pure."""
    out = []
    for d in sorted((d for d in devices if d.vendor == vendor.name), key=lambda d: d.index):
        for i in range(d.split_count):
            out.append(
                Replica(id=replica_id(d.uuid, i), uuid=d.uuid, healthy=d.healthy, numa=d.numa)
            )
    return out


# -- pending pods --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerInfo:
    """A container of a pending pod: its ``index`` (init containers first, HAMi's
    annotation order), whether its env sets ``CUDA_DISABLE_CONTROL=true``, and its
    ``nvidia.com/priority`` (None: not set)."""

    name: str
    index: int
    init: bool
    disable_control: bool = False
    priority: int | None = None


@dataclass(frozen=True)
class PendingPod:
    """A pod bound to this node whose devices wait to be allocated.

    ``entries``: devices-to-allocate, one tuple of grants per container (empty once
    allocated or for a container without GPUs), aligned with ``containers``;
    ``bind_time``: ``hami.io/bind-time`` in Unix seconds (None: absent or unreadable);
    ``created``: ``metadata.creationTimestamp`` (RFC 3339, compared as text); ``migs``:
    the GPU instances its MIG slices hold (``hami.io/vgpu-mig-allocations``);
    ``others_pending``: another vendor's devices-to-allocate still holds a device (its
    plugin has not allocated it yet, so this one does not end the bind phase).
    """

    uid: str
    namespace: str
    name: str
    bind_time: int | None
    created: str
    entries: tuple[tuple[keys.DeviceGrant, ...], ...]
    containers: tuple[ContainerInfo, ...]
    migs: tuple[keys.MigAllocation, ...] = ()
    others_pending: bool = False

    def next_entry(self) -> int | None:
        """Index of the first entry still holding devices; None when all are done."""
        return next((i for i, e in enumerate(self.entries) if e), None)

    def consumed(self, index: int) -> PendingPod:
        """This pod with entry ``index`` allocated (emptied)."""
        entries = tuple(() if i == index else e for i, e in enumerate(self.entries))
        return replace(self, entries=entries)


def _env_true(spec: Mapping[str, Any], name: str) -> bool:
    for e in spec.get("env") or ():
        if isinstance(e, Mapping) and e.get("name") == name:
            return str(e.get("value", "")).strip().lower() == "true"
    return False


def _containers(spec: Mapping[str, Any]) -> tuple[list[ContainerInfo], int]:
    out: list[ContainerInfo] = []
    try:
        listed = pod_containers(spec)
    except InvalidRequest as exc:
        raise ValueError(f"{exc.field}: {exc.reason}") from exc
    for index, (_, _, init, c) in enumerate(listed):
        try:
            prio = parse_container(c, index=index, init=init, settings=ResourceSettings())
            priority = prio.priority
        except InvalidRequest:
            priority = None  # the webhook vets requests; Allocate only needs the name
        out.append(
            ContainerInfo(
                name=str(c.get("name") or f"container-{index}"),
                index=index,
                init=init,
                disable_control=_env_true(c, DISABLE_CONTROL),
                priority=priority,
            )
        )
    return out, sum(1 for c in out if not c.init)


def _holds_devices(value: object, key: str) -> bool:
    """Whether a devices-to-allocate value still names a device (an unreadable one counts
    as holding: it is not allocated)."""
    if not value:
        return False
    try:
        return any(any(e) for e in keys.decode_pod_devices(str(value), key=key))
    except AnnotationDecodeError:
        return True


def pending_pod(
    pod: Mapping[str, Any], *, node: str, vendor: vendors.Vendor = vendors.NVIDIA
) -> PendingPod | None:
    """``pod`` (Kubernetes JSON) as a ``PendingPod`` of ``node`` for ``vendor``'s devices
    (its devices-to-allocate annotation: ``vendor.to_allocate``), or None when it is not
    one: bound elsewhere, not ``allocating``, being deleted, ended, or with nothing of
    that vendor left to allocate. Pure.

    Raises ``AnnotationDecodeError`` for an unreadable devices-to-allocate and
    ``ValueError`` naming the pod when the annotation names another node or its entries
    cannot be matched to the pod's containers (neither one per container, init
    containers first, nor one per regular container).
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    annos = meta.get("annotations") or {}
    if spec.get("nodeName") != node or annos.get(keys.BIND_PHASE) != keys.BIND_PHASE_ALLOCATING:
        return None
    if meta.get("deletionTimestamp") or status.get("phase") in ENDED_PHASES:
        return None
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    where = f"pod {ns}/{name}"
    vgpu_node = annos.get(keys.VGPU_NODE)
    if vgpu_node is not None and vgpu_node != node:
        raise ValueError(f"{where}: {keys.VGPU_NODE}={vgpu_node!r} but spec.nodeName={node!r}")
    to_allocate = vendor.to_allocate
    raw = annos.get(to_allocate)
    if not raw:
        return None
    decoded = keys.decode_pod_devices(str(raw), key=to_allocate)
    try:
        containers, regular = _containers(spec)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    # HAMi's format leaves an empty entry after the final ';' (keys.container_entries)
    grants = keys.container_entries(decoded, len(containers))
    if len(grants) != len(containers):
        grants = keys.container_entries(decoded, regular)
    if len(grants) == len(containers):
        aligned = containers
    elif len(grants) == regular:
        aligned = [c for c in containers if not c.init]
    else:
        raise ValueError(
            f"{where}: {to_allocate} has {len(grants)} container entries "
            f"for {len(containers)} containers ({regular} regular)"
        )
    bind_raw = str(annos.get(keys.BIND_TIME, ""))
    out = PendingPod(
        uid=str(meta.get("uid") or f"{ns}/{name}"),
        namespace=ns,
        name=name,
        bind_time=int(bind_raw) if bind_raw.isascii() and bind_raw.isdigit() else None,
        created=str(meta.get("creationTimestamp") or ""),
        entries=tuple(tuple(g) for g in grants),
        containers=tuple(aligned),
        migs=tuple(keys.decode_mig_allocations(str(annos.get(keys.VGPU_MIG_ALLOCATIONS) or "[]"))),
        others_pending=any(
            _holds_devices(annos.get(v.to_allocate), v.to_allocate)
            for v in vendors.VENDORS
            if v.to_allocate != to_allocate
        ),
    )
    return out if out.next_entry() is not None else None


def candidates(
    pods: Iterable[Mapping[str, Any]], *, node: str, vendor: vendors.Vendor = vendors.NVIDIA
) -> tuple[list[PendingPod], list[str]]:
    """The pending pods of ``node`` for ``vendor`` among ``pods``, and one problem line per
    pod whose
    annotations cannot be read (it is never a candidate, and never silently: the adapter
    logs the lines and puts them in a failed Allocate's message). Pure."""
    found: list[PendingPod] = []
    problems: list[str] = []
    for pod in pods:
        try:
            p = pending_pod(pod, node=node, vendor=vendor)
        except (AnnotationDecodeError, ValueError) as exc:
            problems.append(str(exc))
            continue
        except (AttributeError, TypeError) as exc:  # not shaped like a pod at all
            problems.append(f"malformed pod object: {exc}")
            continue
        if p is not None:
            found.append(p)
    return found, problems


def ledger_disagrees(pod: PendingPod, ledger: NodeLedger | None) -> str | None:
    """Why the node's ledger does not back ``pod``'s remaining devices-to-allocate, or None
    when every remaining grant is a slice the ledger holds for that pod and container
    (UUID, MiB, percent). Pure.

    A user who may write a pod's annotations could name a GPU and a size the scheduler
    never gave it (HAMi #3076); the ledger, written only by the scheduler's CAS commit, is
    the check.
    """
    held = Counter(
        (s.container_index, s.uuid, s.memory_mib, s.cores_percent)
        for s in (ledger.slices if ledger else ())
        if s.pod_uid == pod.uid
    )
    for c, entry in zip(pod.containers, pod.entries, strict=True):
        for g in entry:
            k = (c.index, g.uuid, g.memory_mib, g.cores_percent)
            if held[k] < 1:
                return (
                    f"pod {pod.namespace}/{pod.name} container {c.name}: "
                    f"{g.uuid} {g.memory_mib} MiB {g.cores_percent} % not in the ledger"
                )
            held[k] -= 1
    return None


# -- Allocate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """The container an Allocate request is for: entry ``entry`` of ``pod`` (its
    ``container``), its ``grants``, how many requested replicas were on the entry's GPUs
    (``uuid_hits``) and whether another candidate ranked as high on them, so that the bind
    order decided (``ambiguous``)."""

    pod: PendingPod
    entry: int
    container: ContainerInfo
    grants: tuple[keys.DeviceGrant, ...]
    uuid_hits: int
    ambiguous: bool


def _order_key(p: PendingPod) -> tuple[int, int, str, str, str]:
    bind = p.bind_time
    return (0 if bind is not None else 1, bind or 0, p.created, p.namespace, p.name)


def choose(
    device_ids: Sequence[str], pods: Sequence[PendingPod], *, resource: str = RESOURCE_NAME
) -> Match:
    """The container of ``pods`` that an Allocate of replicas ``device_ids`` (of
    ``resource``) is for, by the rules of the module docstring. Pure.

    Raises ``NoCandidate`` when no pod's next entry holds ``len(device_ids)`` devices.
    """
    wanted = Counter(u for u in (replica_uuid(d) for d in device_ids) if u is not None)
    return _choose(len(device_ids), wanted, pods, resource=resource)


def _choose(
    size: int, wanted: Counter[str], pods: Sequence[PendingPod], *, resource: str = RESOURCE_NAME
) -> Match:
    ranked: list[tuple[int, PendingPod, int]] = []
    for p in pods:
        entry = p.next_entry()
        if entry is None or len(p.entries[entry]) != size:
            continue
        have = Counter(g.uuid for g in p.entries[entry])
        ranked.append((sum((wanted & have).values()), p, entry))
    if not ranked:
        sizes = sorted({len(p.entries[n]) for p in pods if (n := p.next_entry()) is not None})
        raise NoCandidate(
            f"no pod waiting on this node for {size} {resource} "
            f"(pending pods: {len(pods)}; their next containers ask for {sizes or 'none'})"
        )
    ranked.sort(key=lambda r: (-r[0], _order_key(r[1])))
    hits, pod, entry = ranked[0]
    return Match(
        pod=pod,
        entry=entry,
        container=pod.containers[entry],
        grants=pod.entries[entry],
        uuid_hits=hits,
        ambiguous=len(ranked) > 1 and ranked[1][0] == hits,
    )


def container_slices(
    match: Match, devices: Sequence[Device], vendor: vendors.Vendor = vendors.NVIDIA
) -> tuple[Slice, ...]:
    """The ledger slices of the matched container, in its device order, of ``vendor``
    (``Slice.vendor``). Pure.

    A grant on a MIG-mode device takes its GPU instance from the pod's
    ``hami.io/vgpu-mig-allocations`` entry of that container and GPU.

    Raises ``ValueError`` naming the UUID when a grant names a device this node does not
    have among ``vendor``'s, or a MIG-mode GPU with no instance for the container.
    """
    index = {d.uuid: d.index for d in devices if d.vendor == vendor.name}
    mig_mode = {d.uuid for d in devices if d.mode == "mig"}
    where = f"pod {match.pod.namespace}/{match.pod.name} container {match.container.name}"
    out = []
    for g in match.grants:
        if g.uuid not in index:
            what = "GPU" if vendor is vendors.NVIDIA else vendor.name
            raise ValueError(f"{where}: {what} {g.uuid} is not on this node")
        mig = next(
            (
                m
                for m in match.pod.migs
                if m.gpu_uuid == g.uuid and m.container_index == match.container.index
            ),
            None,
        )
        if g.uuid in mig_mode and mig is None:
            raise ValueError(f"{where}: MIG-mode GPU {g.uuid} has no {keys.VGPU_MIG_ALLOCATIONS}")
        out.append(
            Slice(
                pod_uid=match.pod.uid,
                namespace=match.pod.namespace,
                pod=match.pod.name,
                container=match.container.name,
                container_index=match.container.index,
                uuid=g.uuid,
                device_index=index[g.uuid],
                memory_mib=g.memory_mib,
                cores_percent=g.cores_percent,
                priority=match.container.priority,
                mig_profile=mig.profile if mig else "",
                mig_start=mig.placement.start if mig else -1,
                mig_size=mig.placement.size if mig else 0,
                vendor=vendor.name,
            )
        )
    return tuple(out)


def progress_annotations(
    pod: PendingPod, vendor: vendors.Vendor = vendors.NVIDIA
) -> dict[str, str | None]:
    """The annotation patch after allocating ``vendor``'s devices: ``pod`` as it stands
    with the allocated entries emptied. Entries left: that vendor's devices-to-allocate
    rewritten without the allocated ones (HAMi consumes it the same way); none left: it is
    removed (``None`` in a JSON merge patch), and bind-phase turns ``success`` unless
    another vendor's devices are still to allocate (``PendingPod.others_pending``). Pure."""
    if pod.next_entry() is not None:
        return {vendor.to_allocate: keys.encode_pod_devices([list(e) for e in pod.entries])}
    out: dict[str, str | None] = {vendor.to_allocate: None}
    if not pod.others_pending:
        out[keys.BIND_PHASE] = keys.BIND_PHASE_SUCCESS
    return out


def realized_migs(
    pod: PendingPod, realized: Mapping[tuple[str, int], tuple[str, int, int]]
) -> dict[str, str | None]:
    """The annotation patch that records the MIG instances realized for ``pod``: its
    ``hami.io/vgpu-mig-allocations`` with ``migUUID``, ``gpuInstanceID`` and
    ``computeInstanceID`` filled in for every entry whose instance is in ``realized``
    (``(GPU UUID, placement start)`` -> those three), as HAMi's device plugin completes
    the scheduler's reservation (docs/develop/mig-dynamic-deallocate.md, "Reservation
    Contract"); empty when nothing changes. Pure."""
    out = []
    for m in pod.migs:
        found = realized.get((m.gpu_uuid, m.placement.start))
        if found is not None:
            mig_uuid, gi, ci = found
            m = msgspec.structs.replace(
                m, mig_uuid=mig_uuid, gpu_instance_id=gi, compute_instance_id=ci
            )
        out.append(m)
    if out == list(pod.migs):
        return {}
    return {keys.VGPU_MIG_ALLOCATIONS: keys.encode_mig_allocations(out)}


def failed_annotations() -> dict[str, str | None]:
    """The annotation patch of an Allocate that failed for a known pod. Pure."""
    return {keys.BIND_PHASE: keys.BIND_PHASE_FAILED}


# -- the container's response --------------------------------------------------------------


Mount = devicelists.Mount


@dataclass(frozen=True)
class ContainerResponse:
    """What one container gets: ``envs``, ``mounts``, and where the device list strategy
    asks for them ``annotations`` (CDI) and ``devices`` (device specs); without specs the
    NVIDIA container runtime (or CDI) adds the GPUs the list names."""

    envs: dict[str, str]
    mounts: tuple[Mount, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    devices: tuple[devicelists.DeviceSpec, ...] = ()


def preload_text() -> str:
    """The ``/etc/ld.so.preload`` mounted into containers: libvgpu's path there. Pure."""
    return f"{CONTAINER_LIBVGPU}\n"


def container_response(
    plan: preparing.ContainerPlan,
    *,
    layout: preparing.Layout,
    libvgpu: str,
    preload: str,
    disable_control: bool,
    device_list: devicelists.DeviceList | None = None,
) -> ContainerResponse:
    """The response for a container whose slice ``plan`` was prepared under ``layout``:
    the environment ``vslice run`` gives (``preparing.container_env``) with paths as the
    container sees them and without ``LD_PRELOAD`` (the mounted ``/etc/ld.so.preload``
    loads libvgpu, for every process whatever its environment); mounts of ``libvgpu``
    (the installed versioned file, read-only), the container's cache directory
    (read-write: its processes share the cache file), ``preload`` at
    ``/etc/ld.so.preload`` unless ``disable_control`` (HAMi-core's
    ``CUDA_DISABLE_CONTROL=true``), and on mock GPUs the mock driver; a MIG container or
    an MPS client (``plan.libvgpu`` false) gets neither libvgpu nor the preload,
    and an MPS client the MPS server's directories at their host paths (its pod also needs
    ``hostIPC``, as every MPS client shares the server's memory). With
    ``device_list`` (``devicelists.device_list`` of the plan's GPUs) its parts name the
    GPUs in place of the plan's ``NVIDIA_VISIBLE_DEVICES``; without it that variable
    stays (the ``envvar`` strategy). A container holding only DCUs (``plan.cuda`` false)
    gets its ``HIP_VISIBLE_DEVICES`` and its cache directory, and nothing of CUDA's: no
    libvgpu, preload, mock driver or device list. Pure."""
    envs = dict(plan.env)
    envs.pop("LD_PRELOAD", None)
    if device_list is not None:
        envs.pop(devicelists.VISIBLE_DEVICES, None)
        envs.update(device_list.envs)
    envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = f"{CONTAINER_CACHE_DIR}/{preparing.CACHE_FILE}"
    mounts = [
        Mount(container_path=CONTAINER_LIBVGPU, host_path=libvgpu, read_only=True),
        Mount(container_path=CONTAINER_CACHE_DIR, host_path=plan.directory, read_only=False),
    ]
    if not plan.libvgpu:  # a MIG instance or the MPS server holds it: no libvgpu
        mounts = mounts[1:]
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        if key in envs:  # the MPS server's directories, at the same path
            mounts.append(Mount(container_path=envs[key], host_path=envs[key], read_only=False))
    if not disable_control and plan.libvgpu:
        mounts.append(Mount(container_path=LD_SO_PRELOAD, host_path=preload, read_only=True))
    if layout.mock is not None and plan.cuda:
        envs["LD_LIBRARY_PATH"] = CONTAINER_MOCK_DIR
        envs["VSLICE_MOCKGPU_STATE"] = CONTAINER_MOCK_STATE
        mounts.append(
            Mount(
                container_path=CONTAINER_MOCK_DIR, host_path=layout.mock.library_dir, read_only=True
            )
        )
        mounts.append(
            Mount(container_path=CONTAINER_MOCK_STATE, host_path=layout.mock.state, read_only=False)
        )
    if device_list is None:
        return ContainerResponse(envs=envs, mounts=tuple(mounts))
    return ContainerResponse(
        envs=envs,
        mounts=(*device_list.mounts, *mounts),
        annotations=dict(device_list.annotations),
        devices=device_list.devices,
    )


# -- GetPreferredAllocation ----------------------------------------------------------------


def preferred(
    *,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    wanted: Sequence[str] = (),
) -> list[str]:
    """The replicas to prefer for one container: ``must_include`` first, then one free
    replica of each GPU in ``wanted`` (the UUIDs of the slice the container is expected to
    get, repeated per device), then spread: a GPU not yet in the allocation before one
    that is (a container asking for two GPUs gets two GPUs, not two replicas of one), and
    among those the GPU with the most free replicas. At most ``size`` IDs (all of
    ``must_include`` even beyond). Pure."""
    chosen: list[str] = list(dict.fromkeys(must_include))
    taken = set(chosen)
    free: dict[str, list[str]] = {}
    for d in available:
        u = replica_uuid(d)
        if d not in taken and u is not None:
            free.setdefault(u, []).append(d)
    for ids in free.values():
        ids.sort(key=lambda d: int(d.rpartition("-")[2]))
    need = Counter(wanted) - Counter(u for u in (replica_uuid(d) for d in chosen) if u)
    for u in wanted:
        if len(chosen) >= size:
            break
        if need[u] > 0 and free.get(u):
            chosen.append(free[u].pop(0))
            need[u] -= 1
    while len(chosen) < size:
        used = Counter(u for u in (replica_uuid(d) for d in chosen) if u)
        options = [u for u, ids in free.items() if ids]
        if not options:
            break
        best = min(options, key=lambda u: (used[u], -len(free[u]), u))
        chosen.append(free[best].pop(0))
    return chosen


def expected_uuids(pods: Sequence[PendingPod], size: int) -> list[str]:
    """The GPU UUIDs (one per device) of the container ``choose`` would pick for a request
    of ``size`` replicas that carries no UUID information: what ``GetPreferredAllocation``
    steers kubelet to, so that Allocate's request names the same GPUs. Empty when no
    pod waits for ``size``. Pure."""
    try:
        match = _choose(size, Counter(), pods)
    except NoCandidate:
        return []
    return [g.uuid for g in match.grants]
