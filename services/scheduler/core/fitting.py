"""Fit: which devices and nodes can hold a pod's slices, and why the others cannot.

Rules, order and reason strings are HAMi's (Project-HAMi/HAMi: pkg/device/nvidia/device.go
``NvidiaGPUDevices.Fit``, pkg/scheduler/score.go ``fitInDevices`` and ``scoreNode``,
pkg/device/common/common.go ``GenReason``), checked per device in this order:

1. ``CardNotHealth``                 the device is unhealthy
2. ``CardCordoned``                  the device is cordoned (``hami.io/device-cordon``)
3. ``CardTypeMismatch``              ``nvidia.com/use-gputype`` / ``nouse-gputype``
4. ``CardUuidMismatch``              ``nvidia.com/use-gpuuuid`` / ``nouse-gpuuuid``
5. ``CardTimeSlicingExhausted``      all ``deviceSplitCount`` slots are taken
6. ``CardInsufficientMemory``        free MiB < requested MiB (percent of the card's MiB)
7. ``CardInsufficientCore``          free cores < requested cores (a request over 100 is 100)
8. ``ExclusiveDeviceAllocateConflict`` 100 cores asked on a 100-core device that has slices
9. ``CardComputeUnitsExhausted``     0 cores asked on a device whose cores are all booked

A container is fitted to its vendor's devices only (``ContainerRequest.vendor``,
``libshared.vendors``; HAMi's ``getNodeResources`` keeps the node's devices of the
request's type and counts the reasons over them): the other devices of the node are not
counted. Hygon DCUs are fitted by the same checks (pkg/device/hygon/device.go ``Fit``
checks them in this order, without numa-bind; vslice's cordon applies to every vendor).

Per container: more GPUs than the node has -> ``NodeInsufficientDevice`` alone; devices
are tried in HAMi's order (``walk``); ``nvidia.com/numa-bind`` keeps a container's GPUs on
one NUMA node (devices given up count as ``NumaNotFit``); devices taken short of the count
count as ``AllocatedCardsInsufficientRequest``. The reason reads ``"1/4
AllocatedCardsInsufficientRequest, 3/4 CardInsufficientMemory"`` (whole strings sorted).
CPU and host memory as kube-scheduler's NodeResourcesFit (``Insufficient cpu`` /
``Insufficient memory``). Pure functions over ``Cluster`` arrays.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from libshared import migs, vendors
from libshared.devices import Device
from libshared.migs import Geometry, Instance
from libshared.resources import ContainerRequest, PodRequest
from services.scheduler.core import migplacing
from services.scheduler.core.clusters import BoolArray, Cluster, IntArray
from services.scheduler.core.migplacing import MigChoice

CARD_NOT_HEALTH = "CardNotHealth"
CARD_CORDONED = "CardCordoned"
CARD_TYPE_MISMATCH = "CardTypeMismatch"
CARD_UUID_MISMATCH = "CardUuidMismatch"
CARD_TIME_SLICING_EXHAUSTED = "CardTimeSlicingExhausted"
CARD_INSUFFICIENT_MEMORY = "CardInsufficientMemory"
CARD_INSUFFICIENT_CORE = "CardInsufficientCore"
EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT = "ExclusiveDeviceAllocateConflict"
CARD_COMPUTE_UNITS_EXHAUSTED = "CardComputeUnitsExhausted"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"
ALLOCATED_CARDS_INSUFFICIENT_REQUEST = "AllocatedCardsInsufficientRequest"
NUMA_NOT_FIT = "NumaNotFit"
INSUFFICIENT_CPU = "Insufficient cpu"
INSUFFICIENT_MEMORY = "Insufficient memory"

# Index = code returned by ``device_codes``; 0 = fits; the last, a device of another
# vendor than the container's, is not a reason: such devices are not counted.
DEVICE_REASONS = (
    "",
    CARD_NOT_HEALTH,
    CARD_CORDONED,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_INSUFFICIENT_MEMORY,
    CARD_INSUFFICIENT_CORE,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
    CARD_COMPUTE_UNITS_EXHAUSTED,
    "",  # another vendor's device
)
OTHER_VENDOR = len(DEVICE_REASONS) - 1


def vendor_mask(cluster: Cluster, vendor: str) -> BoolArray:
    """(N, D) True where the slot holds a device of ``vendor``."""
    if vendor not in cluster.vendors:
        return np.zeros(cluster.dev_valid.shape, dtype=bool)
    mask: BoolArray = cluster.dev_vendor == cluster.vendors.index(vendor)
    return mask


def vendor_slots(devices: tuple[Device, ...], vendor: str) -> list[int]:
    """The slots of ``devices`` that are ``vendor``'s, in registration order."""
    return [s for s, d in enumerate(devices) if d.vendor == vendor]


def type_mask(cluster: Cluster, pod: PodRequest, vendor: str = "NVIDIA") -> BoolArray:
    """(N, D) True where the device's type (and mode) passes the pod's type selectors of
    ``vendor`` (``nvidia.com/use-gputype``, ``hygon.com/use-dcutype``, ...)."""
    sel = pod.selectors(vendor)
    if not sel.use_types and not sel.nouse_types:
        mask = cluster.dev_valid
    else:
        allowed = np.array(
            [pod.type_allowed(t, vendor) for t in cluster.types] + [False], dtype=bool
        )
        mask = allowed[cluster.dev_type]  # dev_type -1 (empty slot) maps to the trailing False
    if pod.vgpu_mode is not None and vendor == vendors.NVIDIA.name:
        mask = mask.copy()
        for n, reg in enumerate(cluster.registrations):
            for slot, dev in enumerate(reg.devices):
                mask[n, slot] &= pod.mode_allowed(dev.mode)
    return mask


def uuid_mask(cluster: Cluster, pod: PodRequest, vendor: str = "NVIDIA") -> BoolArray:
    """(N, D) True where the device's UUID passes the pod's UUID selectors of ``vendor``."""
    mask = np.ones(cluster.dev_valid.shape, dtype=bool)
    sel = pod.selectors(vendor)
    if not sel.use_uuids and not sel.nouse_uuids:
        return mask
    for n, reg in enumerate(cluster.registrations):
        for slot, dev in enumerate(reg.devices):
            mask[n, slot] = pod.uuid_allowed(dev.uuid, vendor)
    return mask


def device_codes(
    cluster: Cluster,
    pod: PodRequest,
    container: ContainerRequest,
    *,
    types_ok: BoolArray | None = None,
    uuids_ok: BoolArray | None = None,
) -> IntArray:
    """(N, D) reason code per device for one container (0 = fits; see ``DEVICE_REASONS``).

    The vector form of ``fit_container``'s per-device checks (without numa-bind and
    mutex), for filtering the fleet at once. Empty device slots get ``CardNotHealth`` and
    other vendors' devices ``OTHER_VENDOR``, so neither ever fits. ``types_ok`` and
    ``uuids_ok``, when given, are the masks of the container's vendor.
    """
    c = cluster
    vendor = container.vendor
    mem_req = (
        c.dev_mem * container.memory_percent // 100
        if container.memory_mib == 0
        else container.memory_mib
    )
    cores = slice_cores(container)
    conds = [
        ~(c.dev_valid & c.dev_healthy),
        c.dev_cordoned,
        ~(type_mask(c, pod, vendor) if types_ok is None else types_ok),
        ~(uuid_mask(c, pod, vendor) if uuids_ok is None else uuids_ok),
        c.dev_used >= c.dev_split,
        c.dev_mem - c.dev_mem_used < mem_req,
        c.dev_cores - c.dev_cores_used < cores,
        (c.dev_cores == 100) & (cores == 100) & (c.dev_used > 0),
        (c.dev_cores != 0) & (c.dev_cores_used == c.dev_cores) & (cores == 0),
    ]
    codes = np.select(conds, list(range(1, len(conds) + 1)), default=0).astype(np.int64)
    if len(c.vendors) > 1:
        codes[c.dev_valid & ~vendor_mask(c, vendor)] = OTHER_VENDOR
    # on MIG-mode devices the memory check is the GPU instances': a free start for the
    # smallest profile holding the request (``Cluster.mig_room``)
    short = DEVICE_REASONS.index(CARD_INSUFFICIENT_MEMORY)
    for n in c.mig_nodes:
        for slot, dev in enumerate(c.registrations[n].devices):
            if dev.mode == "mig" and (codes[n, slot] == 0 or codes[n, slot] >= short):
                room = c.mig_room(n, slot, container.memory_on(dev.memory_mib))
                codes[n, slot] = 0 if room else short
    return codes


def node_resources_ok(cluster: Cluster, pod: PodRequest) -> tuple[BoolArray, BoolArray]:
    """(cpu_ok, mem_ok), each (N,): kube-scheduler NodeResourcesFit on declared nodes."""
    c = cluster
    cpu_ok = (c.cpu_total == 0) | (c.cpu_total - c.cpu_used >= pod.cpu_milli)
    mem_ok = (c.mem_total == 0) | (c.mem_total - c.mem_used >= pod.memory_mib)
    return cpu_ok, mem_ok


@dataclass
class DeviceUse:
    """Scratch usage of one node's devices (per slot) while a pod is fitted; ``mig``: the
    GPU instances on each MIG-mode device's slot."""

    mem_used: list[int]
    cores_used: list[int]
    used: list[int]
    mig: dict[int, list[Instance]] = field(default_factory=dict)

    def copy(self) -> DeviceUse:
        """An independent copy (HAMi fits each init container on a fresh copy of the node)."""
        return DeviceUse(
            list(self.mem_used),
            list(self.cores_used),
            list(self.used),
            {slot: list(held) for slot, held in self.mig.items()},
        )

    def add(
        self, slot: int, *, memory_mib: int, cores_percent: int, instance: Instance | None = None
    ) -> None:
        """Book one slice on ``slot`` (HAMi ``AddResourceUsage``: used+1, cores, MiB), and
        on a MIG-mode device the GPU ``instance`` it is."""
        self.mem_used[slot] += memory_mib
        self.cores_used[slot] += cores_percent
        self.used[slot] += 1
        if instance is not None:
            self.mig.setdefault(slot, []).append(instance)


def mig_geometry(dev: Device) -> Geometry | None:
    """The MIG geometry ``dev`` published (None: not a MIG-mode device)."""
    return None if dev.mode != "mig" else migs.of_device(dev)


def mig_choice(
    dev: Device, use: DeviceUse, slot: int, container: ContainerRequest
) -> MigChoice | None:
    """Where ``container``'s slice goes on MIG-mode device ``dev`` at ``slot`` holding the
    instances of ``use`` (``migplacing.choose``: the smallest profile it offers holding the
    container's memory, at the start keeping the most room); None when none fits."""
    geometry = mig_geometry(dev)
    if geometry is None:
        return None
    return migplacing.choose(geometry, use.mig.get(slot, []), container.memory_on(dev.memory_mib))


def node_use(cluster: Cluster, n: int) -> DeviceUse:
    """Node ``n``'s booked device usage as a scratch ``DeviceUse``."""
    c = cluster
    mig: dict[int, list[Instance]] = {}
    if n in c.mig_nodes:
        mig = {slot: list(held) for slot, held in c.mig_instances(n).items()}
    return DeviceUse(
        mem_used=[int(x) for x in c.dev_mem_used[n]],
        cores_used=[int(x) for x in c.dev_cores_used[n]],
        used=[int(x) for x in c.dev_used[n]],
        mig=mig,
    )


def slice_cores(container: ContainerRequest) -> int:
    """Cores a slice of ``container`` books: HAMi's NVIDIA ``Fit`` clamps a request over 100
    to 100 (``core limit can't exceed 100``)."""
    return min(container.cores_percent, 100)


def _usage_reason(
    dev: Device, slot: int, container: ContainerRequest, use: DeviceUse, *, mutex: bool = False
) -> str | None:
    cores = slice_cores(container)
    if use.used[slot] >= dev.split_count:
        return CARD_TIME_SLICING_EXHAUSTED
    if mutex and use.used[slot] > 0:
        # gpu-scheduler-policy mutex: only devices nobody uses
        return EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT
    if mig_geometry(dev) is not None:
        # a GPU instance of the smallest profile holding the memory, at a free start
        return None if mig_choice(dev, use, slot, container) else CARD_INSUFFICIENT_MEMORY
    if dev.memory_mib - use.mem_used[slot] < container.memory_on(dev.memory_mib):
        return CARD_INSUFFICIENT_MEMORY
    if dev.cores_percent - use.cores_used[slot] < cores:
        return CARD_INSUFFICIENT_CORE
    if dev.cores_percent == 100 and cores == 100 and use.used[slot] > 0:
        return EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT
    if dev.cores_percent != 0 and use.cores_used[slot] == dev.cores_percent and cores == 0:
        return CARD_COMPUTE_UNITS_EXHAUSTED
    return None


def device_score(
    cluster: Cluster,
    n: int,
    slot: int,
    use: DeviceUse,
    container: ContainerRequest,
    weights: tuple[int, int, int] = (1, 1, 1),
) -> np.float32:
    """HAMi's device score for one container, in float32 as HAMi computes it:
    ``10 * ((asked + used)/split + (asked + used) cores/cores + (asked + used) MiB/MiB)``.

    Source: pkg/scheduler/policy/gpu_policy.go, ``DeviceListsScore.ComputeScore``, each
    term times its ``weights`` (slot, core, memory; HAMi's
    ``hami.io/device-scoring-weights``, default 1/1/1). The container's own request is
    counted only on a device whose type is exactly the request's vendor word (HAMi compares
    the request's type, ``NVIDIA`` or ``DCU``, with the device's registered type, which is
    the card's model, ``NVIDIA-A100...``), so on registered cards the score is the usage
    before the container. 0 for a device with no split slots, cores or memory.
    """
    dev = cluster.registrations[n].devices[slot]
    if dev.split_count == 0 or dev.cores_percent == 0 or dev.memory_mib == 0:
        return np.float32(0)
    asked = cores = mem = 0
    if dev.type == container.vendor:
        asked, cores, mem = 1, slice_cores(container), container.memory_on(dev.memory_mib)
    f = np.float32
    slots = f(asked + use.used[slot]) / f(dev.split_count)
    core = f(cores + use.cores_used[slot]) / f(dev.cores_percent)
    memory = f(mem + use.mem_used[slot]) / f(dev.memory_mib)
    ws, wc, wm = (f(w) for w in weights)
    return np.float32(f(10) * (ws * slots + wc * core + wm * memory))


def policy_names(policy: str) -> list[str]:
    """The names of a GPU policy, which may be a comma-separated list (``"binpack,numa"``),
    as HAMi reads it (pkg/util/util.go, ``PolicyContains``)."""
    return [p.strip() for p in policy.split(",")]


def _chain(policy: str, *, numa_bind: bool) -> list[str]:
    # HAMi gpu_policy.go gpuSortKeyChain / lessByChain: the sort keys named, in order, once
    # each; spread when none; numa first under numa-bind.
    chain: list[str] = []
    for name in policy_names(policy):
        if name in ("binpack", "spread", "numa") and name not in chain:
            chain.append(name)
    chain = chain or ["spread"]
    if numa_bind and chain[0] != "numa":
        chain = ["numa", *(k for k in chain if k != "numa")]
    return chain


def sort_key(
    policy: str, *, numa_bind: bool, score: float, numa: int, index: int, used: int
) -> tuple[float, ...]:
    """The key HAMi's device list is sorted by (ascending; ``Fit`` walks it from the end).

    Source: pkg/scheduler/policy/gpu_policy.go, ``DeviceUsageList.Less``:

    - a list (``"binpack,numa"``) or bare ``numa``: its keys in order -- binpack score
      ascending, spread score descending, numa NUMA ascending -- then the device index;
      under numa-bind NUMA comes first;
    - ``mutex``: the most used first, then NUMA ascending;
    - numa-bind: binpack NUMA descending then score ascending; otherwise NUMA ascending then
      score descending;
    - ``binpack``: score ascending, then NUMA; anything else (spread, HAMi's default):
      score descending, then NUMA.

    Equal keys keep their order (the sort is stable).
    """
    if "," in policy or policy == "numa":
        by = {"binpack": score, "spread": -score, "numa": float(numa)}
        return (*(by[k] for k in _chain(policy, numa_bind=numa_bind)), float(index))
    if policy == "mutex":
        return (-float(used), float(numa))
    binpack = policy == "binpack"
    if numa_bind:
        return (-float(numa), score) if binpack else (float(numa), -score)
    return (score, float(numa)) if binpack else (-score, float(numa))


def sort_devices(
    cluster: Cluster,
    n: int,
    order: list[int],
    policy: str,
    use: DeviceUse,
    container: ContainerRequest,
    *,
    numa_bind: bool,
    weights: tuple[int, int, int] = (1, 1, 1),
) -> list[int]:
    """``order`` (device slots) sorted by ``sort_key`` over HAMi's ``device_score``, as
    pkg/scheduler/score.go ``fitInDevices`` sorts a node's device list before each container
    (``sort.Sort``, for the few devices of a node an insertion sort, so stable: ties keep
    ``order``). ``Fit`` walks the result from its end (``walk``).
    """
    devices = cluster.registrations[n].devices

    def key(s: int) -> tuple[float, ...]:
        return sort_key(
            policy,
            numa_bind=numa_bind,
            score=float(device_score(cluster, n, s, use, container, weights)),
            numa=devices[s].numa,
            index=devices[s].index,
            used=use.used[s],
        )

    return sorted(order, key=key)


def gen_reason(reasons: Counter[str], cards: int) -> str:
    """HAMi's filter reason: ``"<count>/<cards> <Reason>"`` per reason, the whole strings
    sorted, joined by ``", "`` (pkg/device/common/common.go, ``GenReason``)."""
    return ", ".join(sorted(f"{k}/{cards} {why}" for why, k in reasons.items()))


def fit_container(
    cluster: Cluster,
    n: int,
    pod: PodRequest,
    container: ContainerRequest,
    use: DeviceUse,
    walk: list[int],
    *,
    policy: str = "spread",
) -> tuple[list[int] | None, str]:
    """The devices of node ``n`` one container takes, walking the slots in ``walk`` order.

    Returns ``(slots, "")`` or ``(None, reason)``. HAMi's rules (pkg/device/nvidia/device.go
    ``NvidiaGPUDevices.Fit``): each device is checked in the order of this module's table
    and the first fitting ones are taken; under
    ``nvidia.com/numa-bind`` a device on another NUMA node than the previous one starts the
    choice anew, the devices dropped so counted as ``NumaNotFit``; a ``mutex`` GPU policy
    takes only devices without slices (``ExclusiveDeviceAllocateConflict``);
    ``topology-aware`` gathers every fitting device and chooses among them by their links
    (``best_linked``); when too few fit, the
    devices taken are counted as ``AllocatedCardsInsufficientRequest``, and the reason is
    ``gen_reason`` over the node's devices.
    """
    devices = cluster.registrations[n].devices
    vendor = container.vendor
    numa_bind = pod.numa_bind and vendors.BY_NAME.get(vendor, vendors.NVIDIA).numa_bind
    need = container.gpu_count
    names = policy_names(policy)
    mutex = "mutex" in names
    topology = "topology-aware" in names
    reasons: Counter[str] = Counter()
    taken: list[int] = []
    prev_numa = -1
    cards = 0
    for slot in walk:
        dev = devices[slot]
        if dev.vendor != vendor:
            continue
        cards += 1
        if not dev.healthy:
            reasons[CARD_NOT_HEALTH] += 1
            continue
        if dev.cordoned:
            reasons[CARD_CORDONED] += 1
            continue
        if not (pod.type_allowed(dev.type, vendor) and pod.mode_allowed(dev.mode, vendor)):
            reasons[CARD_TYPE_MISMATCH] += 1
            continue
        if numa_bind and prev_numa != dev.numa:
            # all of a container's GPUs on one NUMA node (HAMi #1806): start again
            if taken and not topology:
                reasons[NUMA_NOT_FIT] += len(taken)
            taken = []
            prev_numa = dev.numa
        if not pod.uuid_allowed(dev.uuid, vendor):
            reasons[CARD_UUID_MISMATCH] += 1
            continue
        why = _usage_reason(dev, slot, container, use, mutex=mutex)
        if why is not None:
            reasons[why] += 1
            continue
        taken.append(slot)
        if len(taken) == need and not topology:
            return taken, ""
    if topology and len(taken) >= need:
        return best_linked(devices, taken, need), ""
    if taken:
        reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(taken)
    return None, gen_reason(reasons, cards)


def best_linked(devices: tuple[Device, ...], candidates: list[int], need: int) -> list[int]:
    """The ``topology-aware`` choice among ``candidates`` (slots, in walk order), by the
    devices' ``pair_scores``: for one GPU the worst-linked candidate (least summed score to
    the others, keeping well-linked sets whole), for more the combination of ``need`` with
    the highest summed pair score; the first found wins ties.

    Source: pkg/device/nvidia/device.go, ``computeWorstSingleCard``,
    ``generateCombinations`` and ``computeBestCombination`` (a pair missing scores 0).
    """
    if len(candidates) == need:
        return list(candidates)

    def link(a: int, b: int) -> int:
        return devices[a].pair_score(devices[b].uuid)

    if need == 1:
        totals = [sum(link(a, b) for b in candidates if b != a) for a in candidates]
        return [candidates[totals.index(min(totals))]]
    best: tuple[int, ...] = ()
    best_score = 0
    for combo in itertools.combinations(candidates, need):
        score = sum(link(a, b) for a, b in itertools.combinations(combo, 2))
        if not best or score > best_score:
            best, best_score = combo, score
    return list(best)


def usage_order(cluster: Cluster, n: int, slots: list[int], use: DeviceUse) -> list[int]:
    """``slots`` least used first (slots/split + cores/cores + MiB/MiB), ties by slot: the
    device order of the non-HAMi policies for the devices they do not choose themselves."""
    devices = cluster.registrations[n].devices

    def used(s: int) -> tuple[float, int]:
        d = devices[s]
        return (
            use.used[s] / max(d.split_count, 1)
            + use.cores_used[s] / max(d.cores_percent, 1)
            + use.mem_used[s] / max(d.memory_mib, 1),
            s,
        )

    return sorted(slots, key=used)


def walk(
    cluster: Cluster,
    n: int,
    order: list[int],
    policy: str,
    use: DeviceUse,
    container: ContainerRequest,
    *,
    numa_bind: bool,
    prefer: list[int] | None = None,
    weights: tuple[int, int, int] = (1, 1, 1),
) -> tuple[list[int], list[int]]:
    """``(sorted order, walk)``: the device list sorted by ``sort_devices`` and the order
    ``Fit`` tries its devices in -- from the sorted list's end (HAMi's ``for i :=
    len(devices) - 1; i >= 0; i--``), so spread tries the least used device first and,
    among equal ones, the last.

    ``prefer`` (not None) is a non-HAMi policy's own device order: those devices first,
    then the rest by ``usage_order``.
    """
    ordered = sort_devices(
        cluster, n, order, policy, use, container, numa_bind=numa_bind, weights=weights
    )
    if prefer is None:
        return ordered, ordered[::-1]
    known = set(order)
    first = [s for s in prefer if s in known]
    rest = usage_order(cluster, n, [s for s in order if s not in first], use)
    return ordered, first + rest


def fit_node(
    cluster: Cluster, n: int, pod: PodRequest, *, gpu_policy: str, prefer: list[int] | None = None
) -> tuple[list[list[int]] | None, str]:
    """Fit every GPU container of ``pod`` on node ``n``, as HAMi's ``scoreNode`` does.

    Returns ``(slots per GPU container, "")`` or ``(None, reason)`` with the reason of the
    first container that does not fit (``fit_container``), e.g. ``"1/4
    AllocatedCardsInsufficientRequest, 3/4 CardInsufficientMemory"``. ``prefer``
    (optional) is a non-HAMi policy's own device order (FGD and the paper's baselines
    choose the device themselves; see ``walk``).

    Source: pkg/scheduler/score.go, ``scoreNode``: each init container is fitted on a fresh
    copy of the node's usage (``allocateInitContainers``: they run one after another), the
    app containers one after another on one copy that each adds to
    (``allocateAppContainers``), the device list re-sorted before each container and that
    order kept for the next; what the pod books is the peak of the two per device
    (``Cluster`` collapses init slices the same way). A container asking more GPUs than the
    node has fails with ``NodeInsufficientDevice`` alone (``fitInDevices``).
    """
    c = cluster
    cpu_ok, mem_ok = node_resources_ok(c, pod)
    if not cpu_ok[n]:
        return None, INSUFFICIENT_CPU
    if not mem_ok[n]:
        return None, INSUFFICIENT_MEMORY
    base = node_use(c, n)
    devices = c.registrations[n].devices
    app_use = base.copy()
    app_orders: dict[str, list[int]] = {}  # per vendor, as HAMi sorts each type's list
    chosen: list[list[int]] = []
    for container in pod.gpu_containers:
        registration_order = vendor_slots(devices, container.vendor)
        app_order = app_orders.get(container.vendor, registration_order)
        if container.gpu_count > len(registration_order):
            return None, NODE_INSUFFICIENT_DEVICE
        if container.init:
            use = base.copy()
            _, steps = walk(
                c,
                n,
                registration_order,
                gpu_policy,
                use,
                container,
                numa_bind=pod.numa_bind,
                prefer=prefer,
                weights=pod.device_weights,
            )
        else:
            use = app_use
            app_order, steps = walk(
                c,
                n,
                app_order,
                gpu_policy,
                use,
                container,
                numa_bind=pod.numa_bind,
                prefer=prefer,
                weights=pod.device_weights,
            )
            app_orders[container.vendor] = app_order
        picked, why = fit_container(c, n, pod, container, use, steps, policy=gpu_policy)
        if picked is None:
            return None, why
        for slot in picked:
            dev = c.registrations[n].devices[slot]
            book_slice(use, dev, slot, container)
        chosen.append(picked)
    return chosen, ""


def book_slice(
    use: DeviceUse, dev: Device, slot: int, container: ContainerRequest
) -> MigChoice | None:
    """Book ``container``'s slice on ``dev`` at ``slot`` in ``use``: its memory and cores,
    or on a MIG-mode device the GPU instance ``mig_choice`` gives (its profile's memory, no
    cores: the instance's compute is its own), which is returned."""
    choice = mig_choice(dev, use, slot, container)
    if choice is not None:
        use.add(
            slot, memory_mib=choice.profile.memory_mib, cores_percent=0, instance=choice.instance()
        )
    else:
        use.add(
            slot,
            memory_mib=container.memory_on(dev.memory_mib),
            cores_percent=slice_cores(container),
        )
    return choice


def explain(codes: IntArray, cluster: Cluster, n: int, need: int) -> str:
    """HAMi's reason for node ``n`` from ``device_codes`` of a pod's only GPU container,
    the string ``fit_node`` gives, without walking the devices one by one: every device is
    counted by its first failed check, the devices that fit count as
    ``AllocatedCardsInsufficientRequest`` when too few, and more GPUs than the node has is
    ``NodeInsufficientDevice`` alone. Not for numa-bind, mutex or several GPU containers
    (``fit_node`` tells those).
    """
    row = codes[n, : len(cluster.registrations[n].devices)].tolist()
    ndev = sum(1 for code in row if code != OTHER_VENDOR)
    if need > ndev:
        return NODE_INSUFFICIENT_DEVICE
    counts: Counter[str] = Counter()
    fits = 0
    for code in row:
        if code == OTHER_VENDOR:
            continue
        if code:
            counts[DEVICE_REASONS[code]] += 1
        else:
            fits += 1
    if 0 < fits < need:
        counts[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = fits
    return gen_reason(counts, ndev)
