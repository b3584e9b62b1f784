"""The FGD paper's experiment on a trace, run against the scheduling core in process.

As the paper's simulator (hkust-adsl/kubernetes-scheduler-simulator) runs it (described
in ../shared/FGD.md): per seed, shuffle the trace's pods, then append pods drawn uniformly
with replacement until the next one would push the requested milli-GPU past 1.3 x the
fleet's capacity (a larger trace is cut by removing random pods instead). Pods only
arrive; each is placed at once or fails for good. After every arrival: ``arrived`` =
milli-GPU requested so far / capacity, ``allocated`` = milli-GPU placed / capacity. The
headline is ``allocated`` at ``arrived`` = 100 %.

A fleet may hold devices of several vendors (``libshared.vendors``; a trace pod asks one
vendor's, ``TracePod.vendor``): the report splits the figures at ``arrived`` = 100 % by
device mode (``by_mode``) and by vendor (``by_vendor``), where capacity is each vendor's
devices and a pod's milli-GPU count for the vendor whose devices it landed on.

Pure: no I/O; progress is reported through a callback the caller supplies.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from libshared.devices import NodeDevices
from libshared.events import Placement
from libshared.traces import TracePod
from services.scheduler.core.clusters import MILLI, Cluster
from services.scheduler.core.deciding import Scheduler
from services.scheduler.core.fragmentation import Shape, Workload, target_workload

INFLATION = 1.3  # arrivals stop at 130 % of capacity, as in the paper


def shape_of(pod: TracePod) -> Shape:
    """The FGD task shape of a trace pod."""
    return Shape(
        cpu_milli=pod.cpu_milli,
        gpu_milli=pod.gpu_milli,
        gpu_count=pod.num_gpu,
        gpu_types=pod.gpu_spec,
    )


def trace_workload(pods: Sequence[TracePod]) -> Workload:
    """FGD's target workload of a trace: its most frequent shapes covering 95 %."""
    return target_workload(shape_of(p) for p in pods)


def capacity_milli(fleet: Sequence[NodeDevices]) -> int:
    """The fleet's GPU capacity in milli-GPU."""
    return MILLI * sum(len(n.devices) for n in fleet)


def arrivals(
    pods: Sequence[TracePod], *, seed: int, capacity: int, ratio: float = INFLATION
) -> list[TracePod]:
    """The arrival sequence of one experiment (see the module docstring)."""
    rng = random.Random(seed)
    order = list(pods)
    rng.shuffle(order)
    target = ratio * capacity
    total = sum(p.milli_total for p in order)
    if total > target:
        while order and total > target:
            total -= order.pop(rng.randrange(len(order))).milli_total
        return order
    while True:
        extra = pods[rng.randrange(len(pods))]
        if total + extra.milli_total > target:
            return order
        order.append(extra)
        total += extra.milli_total


@dataclass
class SeedResult:
    """One seed: the curve [(arrived, allocated)], counts and per-decision times (ms);
    ``by_mode``: per device mode (``hami-core``, ``mig``) at arrived = 100 %: ``gpus``,
    ``allocated`` (milli-GPU the placed pods asked there over that mode's capacity) and,
    for ``mig``, ``occupied`` (memory slices held by GPU instances over all of them);
    ``by_vendor``: per device vendor word (``NVIDIA``, ``DCU``) at arrived = 100 %
    (``FleetVendors.report``)."""

    seed: int
    curve: list[tuple[float, float]]
    pods_total: int
    pods_placed: int
    decision_ms: list[float] = field(repr=False)
    wall_s: float
    by_mode: dict[str, dict[str, float]] = field(default_factory=dict)
    by_vendor: dict[str, dict[str, float]] = field(default_factory=dict)

    def allocated_at(self, arrived: float) -> float:
        """Allocation ratio at the last arrival whose arrived ratio is <= ``arrived``."""
        value = 0.0
        for a, alloc in self.curve:
            if a > arrived + 1e-12:
                break
            value = alloc
        return value


@dataclass(frozen=True)
class FleetModes:
    """The fleet's devices by mode: ``mode_of`` (UUID -> mode), ``gpus`` (mode ->
    devices), ``slots`` (memory slices of every MIG-mode device)."""

    mode_of: dict[str, str]
    gpus: dict[str, int]
    slots: int

    @staticmethod
    def of(fleet: Sequence[NodeDevices]) -> FleetModes:
        """The modes of ``fleet``'s devices."""
        mode_of: dict[str, str] = {}
        gpus: dict[str, int] = {}
        slots = 0
        for node in fleet:
            for d in node.devices:
                mode_of[d.uuid] = d.mode
                gpus[d.mode] = gpus.get(d.mode, 0) + 1
                if d.mode == "mig":
                    slots += d.mig_slots
        return FleetModes(mode_of=mode_of, gpus=gpus, slots=slots)

    def report(self, asked: dict[str, int], slots_held: int) -> dict[str, dict[str, float]]:
        """``SeedResult.by_mode`` from the milli-GPU placed per mode and the memory slices
        held."""
        out: dict[str, dict[str, float]] = {}
        for mode, gpus in sorted(self.gpus.items()):
            row = {"gpus": float(gpus), "allocated": asked.get(mode, 0) / (gpus * MILLI)}
            if mode == "mig":
                row["occupied"] = slots_held / self.slots if self.slots else 0.0
            out[mode] = row
        return out


@dataclass
class FleetVendors:
    """The fleet's devices by vendor and what the placed pods hold there.

    ``vendor_of``: UUID -> the device's vendor word; ``gpus``: vendor -> devices;
    ``arrived``: vendor -> milli-GPU asked by the pods of that vendor that arrived;
    ``placed``: vendor -> milli-GPU placed on its devices; ``pods``: vendor -> pods placed
    on its devices; ``foreign``: vendor -> slices on its devices of pods asking another
    vendor (0 when every container is fitted to its own vendor's devices)."""

    vendor_of: dict[str, str]
    gpus: dict[str, int]
    arrived: dict[str, int] = field(default_factory=dict)
    placed: dict[str, int] = field(default_factory=dict)
    pods: dict[str, int] = field(default_factory=dict)
    foreign: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of(fleet: Sequence[NodeDevices]) -> FleetVendors:
        """The vendors of ``fleet``'s devices, nothing placed yet."""
        vendor_of: dict[str, str] = {}
        gpus: dict[str, int] = {}
        for node in fleet:
            for d in node.devices:
                vendor_of[d.uuid] = d.vendor
                gpus[d.vendor] = gpus.get(d.vendor, 0) + 1
        return FleetVendors(vendor_of=vendor_of, gpus=gpus)

    def arrive(self, pod: TracePod) -> None:
        """Count ``pod``'s milli-GPU as asked of its vendor."""
        self.arrived[pod.vendor] = self.arrived.get(pod.vendor, 0) + pod.milli_total

    def place(self, pod: TracePod, placement: Placement) -> None:
        """Count ``placement`` of ``pod`` on the vendors of the devices it holds."""
        landed: set[str] = set()
        for sl in placement.slices:
            vendor = self.vendor_of.get(sl.uuid, "NVIDIA")
            landed.add(vendor)
            self.placed[vendor] = self.placed.get(vendor, 0) + pod.gpu_milli
            if vendor != pod.vendor:
                self.foreign[vendor] = self.foreign.get(vendor, 0) + 1
        for vendor in landed:
            self.pods[vendor] = self.pods.get(vendor, 0) + 1

    def copy(self) -> FleetVendors:
        """The counts as they stand now (the UUID table shared)."""
        return FleetVendors(
            vendor_of=self.vendor_of,
            gpus=self.gpus,
            arrived=dict(self.arrived),
            placed=dict(self.placed),
            pods=dict(self.pods),
            foreign=dict(self.foreign),
        )

    def report(self) -> dict[str, dict[str, float]]:
        """``SeedResult.by_vendor``: per vendor of the fleet, by word, ``gpus``,
        ``arrived`` and ``allocated`` (milli-GPU asked by its pods, and placed on its
        devices, over its devices' capacity; fractions), ``pods_placed`` (pods holding one
        of its devices) and ``foreign_slices`` (slices there of pods asking another
        vendor)."""
        out: dict[str, dict[str, float]] = {}
        for vendor, gpus in sorted(self.gpus.items()):
            out[vendor] = {
                "gpus": float(gpus),
                "arrived": self.arrived.get(vendor, 0) / (gpus * MILLI),
                "allocated": self.placed.get(vendor, 0) / (gpus * MILLI),
                "pods_placed": float(self.pods.get(vendor, 0)),
                "foreign_slices": float(self.foreign.get(vendor, 0)),
            }
        return out


def run_seed(
    fleet: Sequence[NodeDevices],
    pods: Sequence[TracePod],
    *,
    policy: str,
    seed: int,
    workload: Workload | None = None,
    progress: Callable[[int], None] | None = None,
) -> SeedResult:
    """Run one experiment; ``progress(n)`` is called with the number of pods just handled."""
    started = time.perf_counter()
    cluster = Cluster(max_devices=max((len(n.devices) for n in fleet), default=1) or 1)
    cluster.upsert_nodes(list(fleet))
    capacity = capacity_milli(fleet)
    scheduler = Scheduler(
        cluster, policy=policy, workload=workload or trace_workload(pods), seed=seed
    )
    sequence = arrivals(pods, seed=seed, capacity=capacity)
    curve: list[tuple[float, float]] = []
    times: list[float] = []
    requested = allocated = placed = 0
    modes = FleetModes.of(fleet)
    asked = dict.fromkeys(modes.gpus, 0)  # milli-GPU placed per device mode
    slots_held = 0  # memory slices of the GPU instances placed
    snapshot = (dict(asked), slots_held)  # as they stood at arrived = 100 %
    by_vendor = FleetVendors.of(fleet)
    vendors_at_100 = by_vendor.copy()
    for i, pod in enumerate(sequence):
        request = pod.request(f"{seed}-{i}")
        t0 = time.perf_counter()
        decision = scheduler.decide(request, explain=False)
        if isinstance(decision, Placement):
            cluster.apply(decision)
        times.append((time.perf_counter() - t0) * 1000.0)
        requested += pod.milli_total
        by_vendor.arrive(pod)
        if isinstance(decision, Placement):
            allocated += pod.milli_total
            placed += 1
            by_vendor.place(pod, decision)
            for sl in decision.slices:
                mode = modes.mode_of.get(sl.uuid, "hami-core")
                asked[mode] = asked.get(mode, 0) + pod.gpu_milli
                slots_held += sl.mig_size  # 0 unless the slice is a GPU instance
        if requested <= capacity:
            snapshot = (dict(asked), slots_held)
            vendors_at_100 = by_vendor.copy()
        curve.append((requested / capacity, allocated / capacity))
        if progress is not None and (i + 1) % 100 == 0:
            progress(100)
    if progress is not None and len(sequence) % 100:
        progress(len(sequence) % 100)
    return SeedResult(
        seed=seed,
        curve=curve,
        pods_total=len(sequence),
        pods_placed=placed,
        decision_ms=times,
        wall_s=time.perf_counter() - started,
        by_mode=modes.report(*snapshot),
        by_vendor=vendors_at_100.report(),
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(
    policy: str, results: Sequence[SeedResult], *, grid_step: float = 0.01
) -> dict[str, object]:
    """The replay report: means over seeds, the mean curve on an ``arrived`` grid, timings.

    Ratios are fractions 0-1; ``alloc_at_100_sd`` is the sample standard deviation (0 for
    one seed); times in ms and s; ``by_mode`` and ``by_vendor``: ``SeedResult.by_mode``'s
    and ``by_vendor``'s means (``{}`` when the seeds have none).
    """
    at100 = [r.allocated_at(1.0) for r in results]
    final = [r.curve[-1][1] if r.curve else 0.0 for r in results]
    steps = round(INFLATION / grid_step)
    grid = [round(i * grid_step, 6) for i in range(steps + 1)]
    curve = [[a, statistics.fmean(r.allocated_at(a) for r in results)] for a in grid]
    times = [t for r in results for t in r.decision_ms]
    n = len(results)
    return {
        "policy": policy,
        "seeds": [r.seed for r in results],
        "pods_total": sum(r.pods_total for r in results) / n,
        "pods_placed": sum(r.pods_placed for r in results) / n,
        "pods_rejected": sum(r.pods_total - r.pods_placed for r in results) / n,
        "alloc_at_100": statistics.fmean(at100),
        "alloc_at_100_sd": statistics.stdev(at100) if n > 1 else 0.0,
        "alloc_final": statistics.fmean(final),
        "curve": curve,
        "decision_ms_p50": _percentile(times, 0.50),
        "decision_ms_p99": _percentile(times, 0.99),
        "wall_s": sum(r.wall_s for r in results),
        "wall_s_per_seed": sum(r.wall_s for r in results) / n,
        "by_mode": {
            mode: {
                key: statistics.fmean(r.by_mode[mode][key] for r in results)
                for key in results[0].by_mode[mode]
            }
            for mode in (results[0].by_mode if results else {})
        },
        "by_vendor": {
            vendor: {
                key: statistics.fmean(r.by_vendor[vendor][key] for r in results)
                for key in results[0].by_vendor[vendor]
            }
            for vendor in (results[0].by_vendor if results else {})
        },
        "per_seed": [
            {
                "seed": r.seed,
                "pods_total": r.pods_total,
                "pods_placed": r.pods_placed,
                "alloc_at_100": a,
                "alloc_final": f,
                "wall_s": r.wall_s,
            }
            for r, a, f in zip(results, at100, final, strict=True)
        ],
    }
