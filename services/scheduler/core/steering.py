"""The ``steer`` placement policy: FGD's fragmentation gradient plus CPU stranding, scored
on FGD's own scale.

FGD (``fragmentation``) is kept as the paper's faithful reproduction; this policy adds one
term to FGD's fragmentation growth and keeps the rest of FGD's choice, each rule measured on
the openb traces (benchmarks/placement.py prints the table of what was tried):

1. CPU stranding. GPU pods and CPU-only pods share a node's CPU; a node whose free CPU
   per free milli-GPU is below the workload's ratio will strand GPU once its CPU runs
   out. Its expected stranded GPU is ``max(0, G - C / r)`` (G free milli-GPU, C free CPU
   milli-cores, r the target workload's CPU milli-cores per milli-GPU, CPU-only shapes
   included); its growth is added to FGD's growth delta (milli-GPU) with weight
   ``Knobs.strand`` (0.3). This steers CPU-only and CPU-heavy pods to CPU-rich nodes and
   GPU pods light on CPU to CPU-poor ones, the largest share of FGD's leftover (most of the
   idle GPU left by FGD sits on nodes short of CPU). The weight is kept below FGD's penalty
   for breaking an idle multi-GPU node: at 0.5 and above, on the multi-GPU-heavy openb
   variants, the reward for taking stranded GPUs opens big nodes for small pods and 4/8-GPU
   pods fail early. The term is left out on nodes of a GPU type that the workload's typed
   shapes ask for: it is blind to types, and there it hands typed pods' GPUs to untyped pods.
2. FGD's scale. The sum is scored as FGD scores delta, floor(100 * sigmoid(-x / 1000))
   (``fragmentation.sigmoid_score``): about 40 milli-GPU per point near zero, a flat 0
   beyond ~4.6 GPUs. A finer score (x itself) and a finer tie-break were measured worse:
   the coarse score leaves near-equal placements to the seeded node order, which keeps
   landing them on the same nodes (packing them), and on the typed openb variants
   (gpuspec10/25/33) the fine score fell 0.2-1.1 points below fgd.
3. Ties: the seeded node order, as FGD. A sharing task takes, among the GPUs of least
   delta, the one with least free milli-GPU.

With ``strand = 0`` the node choice is FGD's.

Pure: no I/O. Per-task deltas are cached against node versions as FGD's are, so a
decision recomputes only the nodes that changed since the task shape was last scored;
the stranding term and the tie-break are vector operations over the fleet.

What it leaves to others: filtering (``deciding``), the measure F (``fragmentation``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.scheduler.core.clusters import MILLI, BoolArray, Cluster, IntArray
from services.scheduler.core.fragmentation import (
    FgdScorer,
    FragMeasure,
    NodeState,
    Task,
    Workload,
)

FloatArray = npt.NDArray[np.float64]
UNFIT = float("inf")


@dataclass(frozen=True)
class Knobs:
    """The policy's settings (defaults: the measured best on the openb default trace).

    ``strand``: weight of the CPU-stranding term (0 = off). ``strand_gpu_pods``: apply
    it to GPU pods too (off: CPU-only pods only). ``strand_growth_only``: count only its
    growth, never a fall (no reward for taking stranded GPUs). ``strand_idle``: let it
    reward placements on idle nodes. ``strand_typed``: count it on nodes whose GPU type
    some shape of the target workload asks for by name (off: the term is type-blind, and
    on the gpuspec variants it hands the GPUs that typed pods need to untyped pods: 4
    points below fgd at arrived 100 %). ``gpu_weighted``: weigh the
    target workload's shapes by their GPU demand (count x milli x GPUs) instead of by count,
    dropping CPU-only shapes (they add the same constant to every node). ``tiebreak``:
    least leftover GPU then CPU among equal scores (off = seeded node order only).
    ``quantum``: round the score down to multiples of this many milli-GPU before comparing
    (0 = off; FGD's sigmoid is about 40 near zero). ``ratio_scale``: multiplies the CPU per
    milli-GPU ratio of the stranding term. ``fgd_scale``: score on FGD's integer sigmoid
    scale (off: the fine score, milli-GPU). All but ``strand`` and ``fgd_scale`` are kept
    for the benchmark's table of what was tried (benchmarks/placement.py); none helped.
    ``fgd_scale=False, tiebreak=True`` is the earlier rule (fine score, least leftover GPU
    then CPU among equal scores).
    """

    strand: float = 0.3
    strand_gpu_pods: bool = True
    strand_growth_only: bool = False
    strand_idle: bool = True
    strand_typed: bool = False
    gpu_weighted: bool = False
    tiebreak: bool = False
    quantum: float = 0.0
    ratio_scale: float = 1.0
    fgd_scale: bool = True


def gpu_weighted(workload: Workload) -> Workload:
    """``workload`` with each shape's weight multiplied by its milli-GPU demand and
    renormalised; CPU-only shapes drop out. Raises ``ValueError`` when no shape asks a GPU."""
    pairs = [
        (s, w * s.gpu_milli * s.gpu_count)
        for s, w in zip(workload.shapes, workload.weights, strict=True)
        if s.gpu_count
    ]
    total = sum(w for _, w in pairs)
    if not total:
        raise ValueError("gpu_weighted: the workload has no GPU shape")
    return Workload(shapes=tuple(s for s, _ in pairs), weights=tuple(w / total for _, w in pairs))


def cpu_per_milli_gpu(workload: Workload) -> float:
    """The workload's CPU milli-cores per milli-GPU (expected CPU over expected GPU of one
    task, CPU-only shapes included). Raises ``ValueError`` when no shape asks a GPU."""
    cpu = sum(w * s.cpu_milli for s, w in zip(workload.shapes, workload.weights, strict=True))
    gpu = sum(
        w * s.gpu_milli * s.gpu_count
        for s, w in zip(workload.shapes, workload.weights, strict=True)
    )
    if not gpu:
        raise ValueError("cpu_per_milli_gpu: the workload has no GPU shape")
    return cpu / gpu


def stranded(gpu_free: FloatArray, cpu_free: FloatArray, ratio: float) -> FloatArray:
    """Expected milli-GPU left idle when the CPU runs out: max(0, G - C / ratio), per node
    (``ratio`` > 0: CPU milli-cores per milli-GPU)."""
    return np.maximum(0.0, gpu_free - cpu_free / ratio)


def fgd_scale(x: FloatArray) -> FloatArray:
    """(N,) ``-fragmentation.sigmoid_score(x)`` per node (-100..0, lower is better) for a
    growth ``x`` in milli-GPU; inf (cannot fit) stays inf, below every fit as FGD's -1."""
    finite = np.isfinite(x)
    safe = np.clip(np.where(finite, x, 0.0), -1e5, 1e5)  # exp stays finite
    return np.where(finite, -np.floor(100.0 / (1.0 + np.exp(safe / 1000.0))), UNFIT)


@dataclass
class _Deltas:
    tid: int
    delta: FloatArray
    versions: IntArray
    best: list[frozenset[int]]


@dataclass
class SteerScorer:
    """Chooses a node (and a sharing task's GPU) for the ``steer`` policy.

    ``workload``: FGD's target workload of the trace; ``knobs``: the settings.
    """

    workload: Workload
    knobs: Knobs = field(default_factory=Knobs)
    measure: FragMeasure = field(init=False)
    ratio: float = field(init=False)
    _states: FgdScorer = field(init=False)
    _cache: dict[Task, _Deltas] = field(init=False, default_factory=dict)
    _ranks: FloatArray = field(init=False, default_factory=lambda: np.zeros(0))
    _typed: BoolArray = field(init=False, default_factory=lambda: np.zeros(0, dtype=bool))
    _memo: dict[tuple[int, int, int], tuple[float, frozenset[int]]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        target = gpu_weighted(self.workload) if self.knobs.gpu_weighted else self.workload
        self.measure = FragMeasure(target)
        self._states = FgdScorer(self.measure)
        self.ratio = cpu_per_milli_gpu(self.workload) * self.knobs.ratio_scale

    def deltas(self, cluster: Cluster, task: Task) -> tuple[FloatArray, list[frozenset[int]]]:
        """(N,) growth of F per node in milli-GPU (inf where the task cannot fit), and per
        node the free milli values of the GPUs that reach it (a sharing task's choice)."""
        entry = self._cache.get(task)
        size = cluster.size
        if entry is None or len(entry.best) != size:
            entry = self._cache[task] = _Deltas(
                tid=len(self._cache),
                delta=np.full(size, UNFIT),
                versions=np.full(size, -1, dtype=np.int64),
                best=[frozenset()] * size,
            )
        thresholds, memo, cpu = self.measure.thresholds, self._memo, task.cpu_milli
        for n in np.flatnonzero(entry.versions != cluster.version).tolist():
            st = self._states.state(cluster, n)
            key = (entry.tid, st.sid, bisect_right(thresholds, st.cpu_free - cpu))
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = self.delta_state(task, st)
            entry.delta[n] = hit[0]
            entry.best[n] = hit[1]
            entry.versions[n] = st.version
        return entry.delta, entry.best

    def delta_state(self, task: Task, st: NodeState) -> tuple[float, frozenset[int]]:
        """Growth of F (milli-GPU) when ``task`` goes onto a node in state ``st`` (inf if it
        cannot fit), and the free values of the GPUs that reach it (least free first among
        equals is the caller's choice)."""
        m = self.measure
        after_bucket = m.bucket(st.cpu_free - task.cpu_milli)
        before = m.frag(st.device_type, m.bucket(st.cpu_free), st.free)
        free = list(st.free)
        d, k = task.milli_on(st.memory_mib), task.gpu_count
        if k == 1 and 0 < d < MILLI:
            best, chosen = UNFIT, set[int]()
            for g in sorted(set(free)):
                if g < d:
                    continue
                after_free = list(free)
                after_free.remove(g)
                after_free.append(g - d)
                delta = m.frag(st.device_type, after_bucket, tuple(sorted(after_free))) - before
                if delta < best - 1e-9:
                    best, chosen = delta, {g}
                elif delta <= best + 1e-9:
                    chosen.add(g)
            return best, frozenset(chosen)
        need = k
        after_free = []
        for g in free:  # ascending: whole GPUs come from the fully free ones
            if need and g >= d and d > 0:
                after_free.append(g - d)
                need -= 1
            else:
                after_free.append(g)
        if need:
            return UNFIT, frozenset()
        after = m.frag(st.device_type, after_bucket, tuple(sorted(after_free)))
        return after - before, frozenset({MILLI}) if k else frozenset()

    def _typed_nodes(self, cluster: Cluster) -> BoolArray:
        """(N,) whether some shape of the target workload asks for the node's GPU type
        (computed once per fleet size: a node re-registered with another type keeps its
        first answer)."""
        if len(self._typed) != cluster.size:
            typed = [s for s in self.workload.shapes if s.gpu_types]
            self._typed = np.array(
                [
                    bool(reg.devices) and any(s.type_ok(reg.devices[0].type) for s in typed)
                    for reg in cluster.registrations
                ],
                dtype=bool,
            )
        return self._typed

    def choose(
        self,
        cluster: Cluster,
        task: Task,
        ok: BoolArray,
        ranks: Sequence[float],
        *,
        narrow: Callable[[BoolArray, FloatArray], BoolArray] | None = None,
    ) -> tuple[int, list[int] | None]:
        """The node for ``task`` among ``ok`` (at least one True) and, for a sharing task,
        the GPU slots to prefer (least free first among those of least delta).

        ``ranks``: (N,) the seeded node order that breaks the last ties (lower first). The
        GPU a task takes, for the stranding term and the tie-break, is counted on a device of
        unknown memory (``Task.milli_on(0)``: a MiB-sized slice counts as a whole GPU).
        ``narrow(ok, score)``: the nodes to choose among, given every node's score (higher
        is better), when replicas decide at once (``partitioning.Partition.narrow``).
        """
        if len(self._ranks) != len(ranks):
            self._ranks = np.asarray(ranks, dtype=np.float64)
        order_of = self._ranks
        delta, best = self.deltas(cluster, task)
        free = np.clip(cluster.free_milli, 0, None).sum(axis=1).astype(np.float64)
        total = task.gpu_count * task.milli_on(0)
        score = delta
        strands = self.knobs.strand and (self.knobs.strand_gpu_pods or not task.gpu_count)
        if strands and self.ratio > 0:  # a workload asking no CPU strands none
            cpu_free = np.where(
                cluster.cpu_total > 0, cluster.cpu_total - cluster.cpu_used, 1 << 40
            ).astype(np.float64)
            grow = stranded(free - total, cpu_free - task.cpu_milli, self.ratio) - stranded(
                free, cpu_free, self.ratio
            )
            if self.knobs.strand_growth_only:
                grow = np.maximum(grow, 0.0)
            if not self.knobs.strand_typed:
                grow = np.where(self._typed_nodes(cluster), 0.0, grow)
            if not self.knobs.strand_idle:
                idle = (cluster.free_milli == MILLI).sum(axis=1) == cluster.dev_valid.sum(axis=1)
                grow = np.where(idle, np.maximum(grow, 0.0), grow)
            score = delta + self.knobs.strand * grow
        if self.knobs.quantum:
            score = np.floor(score / self.knobs.quantum)
        if self.knobs.fgd_scale:
            score = fgd_scale(score)
        if narrow is not None:
            ok = narrow(ok, -score)
        masked = np.where(ok, score, UNFIT)
        low = masked.min()
        top = np.flatnonzero(ok & (masked <= low + 1e-6))
        if len(top) > 1 and self.knobs.tiebreak:
            cpu_left = (cluster.cpu_total - cluster.cpu_used)[top]
            order = np.lexsort((order_of[top], cpu_left, free[top]))
            n = int(top[order[0]])
        else:
            n = int(top[np.argmin(order_of[top])])
        prefer = None
        if task.gpu_count == 1 and best[n] and min(best[n]) < MILLI:
            row = cluster.free_milli[n].tolist()
            prefer = sorted((s for s, g in enumerate(row) if g in best[n]), key=lambda s: row[s])
        return n, prefer
