"""The decision: filter the fleet, score the nodes that fit, choose a node and its devices.

``Scheduler.decide(pod)`` returns a ``Placement`` or an ``Unschedulable`` and changes
nothing; the caller commits the placement (a compare-and-set on the ledger on the bus,
``Cluster.apply`` in process). Policies:

==================  ===============================  =====================================
name                node choice                      device choice
==================  ===============================  =====================================
``hami``            HAMi binpack                     HAMi spread (HAMi's defaults)
``hami-binpack``    HAMi binpack                     HAMi binpack
``hami-spread``     HAMi spread                      HAMi spread
``fgd``             least fragmentation growth       least fragmentation growth
``bestfit``         FGD paper's BestFit              least free GPU that fits
``dotprod``         FGD paper's DotProduct           least free GPU that fits
``gpupacking``      FGD paper's GpuPacking           least free GPU that fits
``gpuclustering``   FGD paper's GpuClustering        least free GPU that fits
``random``          uniform among nodes that fit     uniform among GPUs that fit
``steer``           FGD + CPU stranding              least growth, then least free
==================  ===============================  =====================================

A pod's ``hami.io/node-scheduler-policy`` / ``hami.io/gpu-scheduler-policy`` annotations
override the node / device choice under every policy, as in HAMi; the GPU policy may be any
of HAMi's (``binpack``, ``spread``, ``numa``, ``mutex``, ``topology-aware``, or a list of
them: ``fitting.sort_key``, ``fitting.fit_container``). The HAMi node score is the node's
usage before the pod (``scoring.hami_node_score``). Ties between equally
scored nodes go to the node first in a seeded random order of the nodes, as in the FGD
paper's simulator (HAMi policies keep the lowest node index; ``random`` draws anew each
time).

Replicas deciding at once (``partitioning.Partition`` with a count above 1) narrow every
policy's choice but ``random``'s to the nodes of their own shard that score near the best,
so they do not all race for one node; a lone replica decides as described above.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgspec
import numpy as np

from libshared import quarantines
from libshared.errors import VsliceError
from libshared.events import Placement, Unschedulable, node_reasons_of
from libshared.ledgers import PodCharge, Slice
from libshared.resources import PodRequest
from services.scheduler.core import fitting, partitioning, scoring, steering
from services.scheduler.core.clusters import MILLI, BoolArray, Cluster, IntArray
from services.scheduler.core.fragmentation import FgdScorer, FragMeasure, Task, Workload

HAMI_POLICIES = {
    "hami": ("binpack", "spread"),
    "hami-binpack": ("binpack", "binpack"),
    "hami-spread": ("spread", "spread"),
}
POLICIES = (
    *HAMI_POLICIES,
    "fgd",
    "bestfit",
    "dotprod",
    "gpupacking",
    "gpuclustering",
    "random",
    "steer",
)
# The reason given for a withdrawn node (its registration was deleted). Not one of HAMi's
# names: HAMi has no such state, its nodes leave the cluster.
WITHDRAWN = "NodeWithdrawn"


class UnknownPolicy(VsliceError, ValueError):
    """The policy name is not one of ``POLICIES``."""


@dataclass(frozen=True)
class FilterResult:
    """Nodes that fit and, for each rejected node, its counted HAMi reasons."""

    feasible: list[str]
    failed: dict[str, str]


def task_of(pod: PodRequest) -> Task:
    """The FGD task of a pod: its CPU and the slice size of its (first) GPU container;
    several GPU containers are counted as one request of their total GPUs."""
    gpus = pod.gpu_containers
    if not gpus:
        return Task(cpu_milli=pod.cpu_milli, gpu_count=0)
    first = gpus[0]
    return Task(
        cpu_milli=pod.cpu_milli,
        gpu_count=sum(c.gpu_count for c in gpus),
        cores_percent=first.cores_percent,
        memory_percent=first.memory_percent,
        memory_mib=first.memory_mib,
    )


@dataclass
class Scheduler:
    """Decides placements for one ``Cluster`` view with one policy.

    ``workload`` is FGD's target workload (required for ``fgd``); ``seed`` seeds the
    tie-breaking generator; ``partition``: which replica of how many decides with this
    view (``partitioning``; the default, one replica, changes no choice). Raises
    ``UnknownPolicy`` for an unknown policy name.
    """

    cluster: Cluster
    policy: str = "hami"
    workload: Workload | None = None
    seed: int = 0
    partition: partitioning.Partition = field(default_factory=partitioning.Partition)
    rng: random.Random = field(init=False)
    _shards: IntArray = field(init=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    _hami: np.ndarray = field(init=False, default_factory=lambda: np.zeros(0))
    _hami_versions: IntArray = field(
        init=False, default_factory=lambda: np.zeros(0, dtype=np.int64)
    )
    _ranks: list[float] = field(init=False, default_factory=list)
    _class_cache: list[frozenset[str]] = field(init=False, default_factory=list)
    _class_versions: IntArray = field(
        init=False, default_factory=lambda: np.zeros(0, dtype=np.int64)
    )
    fgd: FgdScorer | None = field(init=False, default=None)
    steer: steering.SteerScorer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UnknownPolicy(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.policy in ("fgd", "steer") and self.workload is None:
            raise ValueError(f"policy {self.policy!r} needs a target workload")
        if self.policy == "fgd" and self.workload is not None:
            self.fgd = FgdScorer(FragMeasure(self.workload))
        if self.policy == "steer" and self.workload is not None:
            self.steer = steering.SteerScorer(self.workload)
        self.rng = random.Random(self.seed)

    # -- filter --------------------------------------------------------------------------

    def _candidates(self, pod: PodRequest) -> BoolArray:
        c = self.cluster
        cpu_ok, mem_ok = fitting.node_resources_ok(c, pod)
        ok = c.offered & c.sound & cpu_ok & mem_ok
        ok &= c.dev_valid.any(axis=1) | (len(pod.gpu_containers) == 0)
        gpus = pod.gpu_containers
        if not gpus:
            return ok
        masks = {
            v: (fitting.type_mask(c, pod, v), fitting.uuid_mask(c, pod, v)) for v in pod.vendors
        }
        for container in gpus:
            types_ok, uuids_ok = masks[container.vendor]
            codes = fitting.device_codes(c, pod, container, types_ok=types_ok, uuids_ok=uuids_ok)
            ok = ok & ((codes == 0).sum(axis=1) >= container.gpu_count)
        policy = self._gpu_policy(pod)
        if len(gpus) > 1 or pod.numa_bind or "mutex" in fitting.policy_names(policy):
            # containers share devices, numa-bind groups them, mutex refuses used ones:
            # only an exact, container-by-container fit tells
            for n in np.flatnonzero(ok).tolist():
                if fitting.fit_node(c, n, pod, gpu_policy=policy)[0] is None:
                    ok[n] = False
        return ok

    def _reasons(self, pod: PodRequest, ok: BoolArray, among: list[int]) -> dict[str, str]:
        c = self.cluster
        cpu_ok, mem_ok = fitting.node_resources_ok(c, pod)
        gpus = pod.gpu_containers
        policy = self._gpu_policy(pod)
        codes = None
        if len(gpus) == 1 and not pod.numa_bind and "mutex" not in fitting.policy_names(policy):
            codes = fitting.device_codes(c, pod, gpus[0])  # the same reasons, vectorised
        out = {}
        for n in among:
            if ok[n]:
                continue
            if not c.offered[n]:
                why = WITHDRAWN
            elif not c.sound[n]:
                why = c.quarantine_reason(c.nodes[n]) or quarantines.LEDGER_UNREADABLE
            elif not cpu_ok[n]:
                why = fitting.INSUFFICIENT_CPU
            elif not mem_ok[n]:
                why = fitting.INSUFFICIENT_MEMORY
            elif codes is not None:
                why = fitting.explain(codes, c, n, gpus[0].gpu_count)
            else:
                # HAMi's reason for the node: the first container that does not fit
                why = (
                    fitting.fit_node(c, n, pod, gpu_policy=policy)[1]
                    or fitting.NODE_INSUFFICIENT_DEVICE
                )
            out[c.nodes[n]] = why
        return out

    def filter(self, pod: PodRequest, nodes: list[str] | None = None) -> FilterResult:
        """Which of ``nodes`` (default: all) can hold the pod, with reasons for the rest
        (``WITHDRAWN`` for a withdrawn node, the quarantine's reason code for a quarantined
        one: ``NodeLedgerUnreadable``, ``NodeLedgerDeleted``, ``NodeRegistrationUnreadable``).

        Unknown node names are reported as failed with ``"unknown node"`` (or the reason
        code of a node quarantined before it ever registered readably).
        """
        c = self.cluster
        ok = self._candidates(pod)
        idx = list(range(c.size)) if nodes is None else [c.node_index.get(x, -1) for x in nodes]
        failed = {
            x: c.quarantine_reason(x) or "unknown node"
            for x, i in zip(nodes or [], idx, strict=False)
            if i < 0
        }
        known = [i for i in idx if i >= 0]
        failed.update(self._reasons(pod, ok, known))
        return FilterResult(feasible=[c.nodes[i] for i in known if ok[i]], failed=failed)

    # -- decide --------------------------------------------------------------------------

    def decide(
        self, pod: PodRequest, *, nodes: list[str] | None = None, explain: bool = True
    ) -> Placement | Unschedulable:
        """Place ``pod`` on one of ``nodes`` (default: all), without changing the view;
        a withdrawn node (``Cluster.withdraw_node``) takes no new pod.

        Re-deciding a pod that already holds slices returns its existing placement. With
        ``explain=False`` the per-node reasons of an ``Unschedulable`` are left out (the
        summary stays), which keeps replays of unschedulable pods cheap.
        """
        c = self.cluster
        held = c.placement_of(pod.uid)
        if held is not None:
            return msgspec.structs.replace(held, namespace=pod.namespace, pod=pod.name)
        ok = self._candidates(pod)
        if nodes is not None:
            allowed = np.zeros(c.size, dtype=bool)
            allowed[[c.node_index[x] for x in nodes if x in c.node_index]] = True
            ok &= allowed
        while ok.any():
            n, prefer, gpu_policy = self._choose(pod, ok)
            picked, _ = fitting.fit_node(c, n, pod, gpu_policy=gpu_policy, prefer=prefer)
            if picked is not None:
                return self._placement(pod, n, picked)
            ok[n] = False  # numa-bind or a multi-container conflict the vector check missed
        return self._unschedulable(pod, ok, explain=explain)

    def _unschedulable(self, pod: PodRequest, ok: BoolArray, *, explain: bool) -> Unschedulable:
        c = self.cluster
        cpu_ok, mem_ok = fitting.node_resources_ok(c, pod)
        offered = c.offered & c.sound
        n_quarantined = int((c.offered & ~c.sound).sum())
        n_offered = int(offered.sum())
        n_cpu = int((offered & ~cpu_ok).sum())
        n_mem = int((offered & cpu_ok & ~mem_ok).sum())
        n_dev = n_offered - n_cpu - n_mem
        parts = [
            f"{k} {why}"
            for k, why in (
                (n_cpu, fitting.INSUFFICIENT_CPU),
                (n_mem, fitting.INSUFFICIENT_MEMORY),
                (n_dev, "no fitting GPU"),
            )
            if k
        ]
        if n_quarantined:
            parts.append(f"{n_quarantined} quarantined")
        among = np.flatnonzero(c.offered).tolist()
        reasons = self._reasons(pod, ok, among) if explain else {}
        return Unschedulable(
            pod_uid=pod.uid,
            reason=f"0/{n_offered} nodes fit: " + ", ".join(parts),
            node_reasons=node_reasons_of(reasons),  # bounded: a fleet's answer fits a message
        )

    def _gpu_policy(self, pod: PodRequest) -> str:
        """The device policy for ``pod``: its annotation, else the policy's, else spread
        (HAMi's default ``gpu-scheduler-policy``)."""
        return pod.gpu_policy or HAMI_POLICIES.get(self.policy, (None, "spread"))[1]

    def _choose(self, pod: PodRequest, ok: BoolArray) -> tuple[int, list[int] | None, str]:
        c = self.cluster
        node_policy = pod.node_policy or HAMI_POLICIES.get(self.policy, (None, None))[0]
        task = task_of(pod)
        first = pod.gpu_containers[0] if pod.gpu_containers else None
        prefer: list[int] | None = None
        if node_policy is not None:
            # HAMi scores a node by its usage before the pod (scoring.hami_node_score)
            score = self._hami_scores()
            ok = self._narrow(ok, score if node_policy == "binpack" else -score)
            score = np.where(ok, score, -np.inf if node_policy == "binpack" else np.inf)
            n = int(np.argmax(score) if node_policy == "binpack" else np.argmin(score))
        elif self.policy == "fgd":
            assert self.fgd is not None
            scores, best = self.fgd.scores(c, task)
            ok = self._narrow(ok, scores.astype(np.float64))
            n = self._pick_max(np.where(ok, scores, -(1 << 40)), ok)
            prefer = []  # FGD's own order: its best devices, else the least used
            if task.gpu_count == 1 and best[n] and min(best[n]) < MILLI:
                row = c.free_milli[n].tolist()
                prefer = [s for s, g in enumerate(row) if g in best[n]]
        elif self.policy == "steer":
            assert self.steer is not None
            narrow = None if self.partition.alone else self._narrow
            n, prefer = self.steer.choose(c, task, ok, self._rank_order(), narrow=narrow)
        elif self.policy == "random":
            candidates = np.flatnonzero(ok)
            n = int(candidates[self.rng.randrange(len(candidates))])
            prefer = list(range(len(c.registrations[n].devices)))
            self.rng.shuffle(prefer)
        else:
            total = task.gpu_count * task.milli_on(
                0 if first is None else int(c.dev_mem[ok].max(initial=0))
            )
            scores_f: np.ndarray
            if self.policy == "bestfit":
                raw = scoring.bestfit_score(c, cpu_milli=task.cpu_milli, gpu_milli_total=total)
                scores_f = scoring.normalize(raw, ok)
            elif self.policy == "dotprod":
                scores_f = scoring.dotprod_score(c, cpu_milli=task.cpu_milli, gpu_milli_total=total)
            elif self.policy == "gpupacking":
                d = task.milli_on(0) if first else 0
                scores_f = scoring.gpupacking_score(c, gpu_milli=d, gpu_count=task.gpu_count)
            else:
                cls = scoring.affinity_class(task.gpu_count, task.milli_on(0) if first else 0)
                scores_f = scoring.gpuclustering_score(c, cls=cls, node_classes=self._classes())
            ok = self._narrow(ok, np.asarray(scores_f, dtype=np.float64))
            n = self._pick_max(np.where(ok, scores_f, -np.inf), ok)
            row = c.free_milli[n].tolist()
            prefer = sorted(range(len(row)), key=lambda s: (row[s], s))
        if pod.gpu_policy is not None:
            prefer = None
        return n, prefer, self._gpu_policy(pod)

    def _hami_scores(self) -> np.ndarray:
        """``scoring.hami_node_score`` of every node, recomputed for the nodes changed since
        (a placement changes one node: the fleet's other rows are kept). Callers must not
        change the array returned."""
        c = self.cluster
        if len(self._hami) < c.size:
            self._hami = np.concatenate([self._hami, np.zeros(c.size - len(self._hami))])
            grown = np.full(c.size, -1, dtype=np.int64)
            grown[: len(self._hami_versions)] = self._hami_versions
            self._hami_versions = grown
        stale = np.flatnonzero(self._hami_versions != c.version)
        if len(stale):
            self._hami[stale] = scoring.hami_node_score(c, stale)
            self._hami_versions[stale] = c.version[stale]
        return self._hami

    def _narrow(self, ok: BoolArray, score: np.ndarray) -> BoolArray:
        """``ok`` narrowed to this replica's near-best shard (``Partition.narrow``;
        ``score``: higher is better); ``ok`` itself for a lone replica."""
        if self.partition.alone:
            return ok
        c = self.cluster
        if len(self._shards) < c.size:  # a node keeps its index in the view
            grown = self.partition.shards(c.nodes[len(self._shards) : c.size])
            self._shards = np.concatenate([self._shards, grown])
        return self.partition.narrow(ok, score, self._shards)

    def _classes(self) -> list[frozenset[str]]:
        """GpuClustering classes of the pods on each node, recomputed for changed nodes."""
        c = self.cluster
        if len(self._class_cache) < c.size:
            self._class_cache.extend([frozenset()] * (c.size - len(self._class_cache)))
            grown = np.full(c.size, -1, dtype=np.int64)
            grown[: len(self._class_versions)] = self._class_versions
            self._class_versions = grown
        for n in np.flatnonzero(self._class_versions != c.version).tolist():
            per_pod: dict[str, list[int]] = {}
            for sl in c.ledgers[n].slices:
                per_pod.setdefault(sl.pod_uid, []).append(sl.cores_percent)
            self._class_cache[n] = frozenset(
                scoring.affinity_class(len(cores), 10 * max(cores)) for cores in per_pod.values()
            )
            self._class_versions[n] = c.version[n]
        return self._class_cache

    def _pick_max(self, scores: np.ndarray, ok: BoolArray) -> int:
        """The best-scored node; ties go to the node first in a seeded random order.

        A fixed order, drawn once per node from the seed, as the FGD paper's simulator
        breaks ties (../shared/FGD.md, "Workload generation" 5): tied placements keep
        landing on the same nodes, which packs them (redrawing per decision spreads them).
        """
        top = np.flatnonzero(ok & (scores == scores[ok].max()))
        if len(top) == 1:
            return int(top[0])
        return int(min(top.tolist(), key=self._rank_order().__getitem__))

    def _rank_order(self) -> list[float]:
        """Each node's place in the seeded tie-breaking order (lower first), drawn once."""
        while len(self._ranks) < self.cluster.size:
            self._ranks.append(self.rng.random())
        return self._ranks

    def _placement(self, pod: PodRequest, n: int, picked: list[list[int]]) -> Placement:
        c = self.cluster
        devices = c.registrations[n].devices
        slices = []
        # MIG-mode devices: the GPU instance of each slice, chosen as fitting chose it
        # (init containers each on the node as it is, app containers one after another)
        base = fitting.node_use(c, n) if n in c.mig_nodes else None
        app = None if base is None else base.copy()
        for container, slots in zip(pod.gpu_containers, picked, strict=True):
            use = app if base is None or not container.init else base.copy()
            for slot in slots:
                dev = devices[slot]
                choice = None if use is None else fitting.book_slice(use, dev, slot, container)
                slices.append(
                    Slice(
                        pod_uid=pod.uid,
                        namespace=pod.namespace,
                        pod=pod.name,
                        container=container.name,
                        container_index=container.index,
                        uuid=dev.uuid,
                        device_index=slot,
                        memory_mib=(
                            choice.profile.memory_mib
                            if choice
                            else container.memory_on(dev.memory_mib)
                        ),
                        cores_percent=0 if choice else container.cores_percent,
                        priority=container.priority,
                        init=container.init,
                        mig_profile=choice.profile.name if choice else "",
                        mig_start=choice.start if choice else -1,
                        mig_size=choice.profile.size if choice else 0,
                        vendor=container.vendor,
                    )
                )
        return Placement(
            pod_uid=pod.uid,
            namespace=pod.namespace,
            pod=pod.name,
            node=c.nodes[n],
            slices=tuple(slices),
            charge=PodCharge(pod_uid=pod.uid, cpu_milli=pod.cpu_milli, memory_mib=pod.memory_mib),
        )
