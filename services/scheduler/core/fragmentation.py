"""GPU fragmentation and the FGD placement score (Weng et al., "Beware of Fragmentation:
Scheduling GPU-Sharing Workloads with Fragmentation Gradient Descent", USENIX ATC'23).

The measure (paper section 3; restated in ../shared/FGD.md):

- The target workload M is the most frequent task shapes (CPU, per-GPU milli d, GPU count
  k, GPU types), taken in decreasing frequency until they cover 95 % of tasks, with their
  frequencies renormalised to p_m (``target_workload``).
- For a node with free CPU c and free milli-GPU g_1..g_K, and shape m: if m cannot run on
  the node (CPU-only shape, type mismatch, c < CPU_m, or fewer than k_m GPUs with
  g_i >= d_m) every idle milli-GPU is fragmented for m, F(m) = sum g_i; otherwise only
  the GPUs too small for m are, F(m) = sum of g_i < d_m.
- F(node) = sum_m p_m F(m).

FGD places a task where F grows least: score = floor(100 * sigmoid((F_before - F_after)
/ 1000)), the highest wins (as the paper's simulator, hkust-adsl/kubernetes-scheduler-
simulator, scores it); a sharing task tries each GPU that fits, a whole-GPU task takes
fully free GPUs.

Speed: F depends on the node only through (GPU type, which CPU thresholds its free CPU
clears, the sorted free milli of its GPUs), so values are memoised on that key, and the
per-node scores of a task shape are cached against the node's ``version``: a decision
recomputes only the nodes that changed since that shape was last scored.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from services.scheduler.core.clusters import MILLI, Cluster, IntArray

COVERAGE = 0.95  # share of tasks the target workload covers (FGD simulator's setting)


class Shape(NamedTuple):
    """A task shape: CPU milli-cores, per-GPU milli-GPU (0 = CPU-only), GPU count, types."""

    cpu_milli: int
    gpu_milli: int
    gpu_count: int
    gpu_types: tuple[str, ...] = ()

    def type_ok(self, device_type: str) -> bool:
        """Whether a device of this type can serve the shape (substring, case-insensitive)."""
        t = device_type.lower()
        return not self.gpu_types or any(x.lower() in t for x in self.gpu_types)


@dataclass(frozen=True)
class Workload:
    """The target workload: shapes and their probabilities (sum to 1)."""

    shapes: tuple[Shape, ...]
    weights: tuple[float, ...]


def target_workload(tasks: Iterable[Shape], *, coverage: float = COVERAGE) -> Workload:
    """The most frequent shapes covering ``coverage`` of ``tasks``, renormalised.

    Order: decreasing count, ties by decreasing (CPU, milli, count, types) as the paper's
    simulator sorts them. Raises ``ValueError`` for an empty task list.
    """
    counts = Counter(tasks)
    if not counts:
        raise ValueError("target workload needs at least one task")
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    chosen: list[tuple[Shape, int]] = []
    covered = 0
    for shape, count in ranked:
        if covered >= coverage * total:
            break
        chosen.append((shape, count))
        covered += count
    return Workload(
        shapes=tuple(s for s, _ in chosen), weights=tuple(c / covered for _, c in chosen)
    )


def sigmoid_score(delta: float) -> int:
    """FGD's node score for a fragmentation change ``delta`` (milli-GPU): 0-100."""
    return int(100.0 / (1.0 + math.exp(delta / 1000.0)))


@dataclass
class FragMeasure:
    """F(node) of the target workload, memoised on the node's canonical state."""

    workload: Workload
    thresholds: list[int] = field(default_factory=list)
    _need: list[int] = field(default_factory=list)
    _type_ok: dict[tuple[int, str], bool] = field(default_factory=dict)
    _memo: dict[tuple[str, int, tuple[int, ...]], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.thresholds = sorted({s.cpu_milli for s in self.workload.shapes})
        # cpu_free >= cpu_m  <=>  bucket(cpu_free) >= index(cpu_m) + 1
        self._need = [self.thresholds.index(s.cpu_milli) + 1 for s in self.workload.shapes]

    def bucket(self, cpu_free: int) -> int:
        """How many of the workload's CPU thresholds ``cpu_free`` (milli-cores) clears."""
        return bisect_right(self.thresholds, cpu_free)

    def frag(self, device_type: str, bucket: int, free: tuple[int, ...]) -> float:
        """F(node) in milli-GPU for a node of ``device_type`` with sorted ``free`` milli."""
        key = (device_type, bucket, free)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        total = sum(free)
        value = 0.0
        for m, (shape, p) in enumerate(
            zip(self.workload.shapes, self.workload.weights, strict=True)
        ):
            d = shape.gpu_milli
            if d == 0 or bucket < self._need[m] or not self._shape_type_ok(m, device_type):
                value += p * total
                continue
            fits = 0
            small = 0
            for g in free:
                if g >= d:
                    fits += 1
                else:
                    small += g
            value += p * (small if fits >= shape.gpu_count else total)
        self._memo[key] = value
        return value

    def _shape_type_ok(self, m: int, device_type: str) -> bool:
        key = (m, device_type)
        ok = self._type_ok.get(key)
        if ok is None:
            ok = self._type_ok[key] = self.workload.shapes[m].type_ok(device_type)
        return ok


class NodeState(NamedTuple):
    """A node as FGD sees it: device type and MiB, free CPU (milli), sorted free milli-GPU."""

    version: int
    device_type: str
    memory_mib: int
    cpu_free: int
    free: tuple[int, ...]
    sid: int = -1  # interned (type, MiB, CPU bucket, free) -- set by FgdScorer.state


def node_state(cluster: Cluster, n: int) -> NodeState:
    """The FGD view of node ``n`` (its first device's type stands for the node)."""
    devices = cluster.registrations[n].devices
    row = cluster.free_milli[n].tolist()
    cpu_free = int(cluster.cpu_total[n] - cluster.cpu_used[n]) if cluster.cpu_total[n] else 1 << 40
    return NodeState(
        version=int(cluster.version[n]),
        device_type=devices[0].type if devices else "",
        memory_mib=devices[0].memory_mib if devices else 0,
        cpu_free=cpu_free,
        free=tuple(sorted(g for g in row if g >= 0)),
    )


class Task(NamedTuple):
    """What FGD needs of a request: CPU milli-cores, GPU count and the per-GPU slice size
    (cores percent, memory percent or MiB)."""

    cpu_milli: int
    gpu_count: int
    cores_percent: int = 0
    memory_percent: int = 0
    memory_mib: int = 0

    def milli_on(self, device_memory_mib: int) -> int:
        """Per-GPU size in milli-GPU on a device of ``device_memory_mib``: the larger of the
        cores share and the memory share; 1000 for an exclusive slice; 0 for CPU-only."""
        if self.gpu_count == 0:
            return 0
        if self.cores_percent >= 100:
            return MILLI
        if self.memory_percent:
            mem = self.memory_percent * 10
        elif device_memory_mib > 0:
            mem = -(-self.memory_mib * MILLI // device_memory_mib)
        else:
            mem = MILLI
        return max(1, min(MILLI, max(self.cores_percent * 10, mem)))


@dataclass
class _ShapeScores:
    tid: int
    scores: IntArray
    versions: IntArray
    best: list[frozenset[int]]


@dataclass
class FgdScorer:
    """Per-node FGD scores for a task, cached per task against node versions."""

    measure: FragMeasure
    _states: list[NodeState] = field(default_factory=list)
    _sids: dict[tuple[str, int, int, tuple[int, ...]], int] = field(default_factory=dict)
    _cache: dict[Task, _ShapeScores] = field(default_factory=dict)
    # (task id, state id, CPU bucket after placing) -> (score, best free values)
    _memo: dict[tuple[int, int, int], tuple[int, frozenset[int]]] = field(default_factory=dict)

    def state(self, cluster: Cluster, n: int) -> NodeState:
        """Node ``n``'s canonical state, recomputed only when its version moved."""
        while len(self._states) < cluster.size:
            self._states.append(NodeState(-1, "", 0, 0, ()))
        st = self._states[n]
        if st.version != cluster.version[n]:
            st = node_state(cluster, n)
            key = (st.device_type, st.memory_mib, self.measure.bucket(st.cpu_free), st.free)
            sid = self._sids.setdefault(key, len(self._sids))
            st = self._states[n] = st._replace(sid=sid)
        return st

    def scores(self, cluster: Cluster, task: Task) -> tuple[IntArray, list[frozenset[int]]]:
        """(N,) FGD score per node (-1 where the task cannot fit), and per node the free
        milli values of the GPUs that reach that score (a sharing task's GPU choice)."""
        entry = self._cache.get(task)
        size = cluster.size
        if entry is None or len(entry.best) != size:
            entry = self._cache[task] = _ShapeScores(
                tid=len(self._cache),
                scores=np.full(size, -1, dtype=np.int64),
                versions=np.full(size, -1, dtype=np.int64),
                best=[frozenset()] * size,
            )
        thresholds, memo, cpu = self.measure.thresholds, self._memo, task.cpu_milli
        stale = np.flatnonzero(entry.versions != cluster.version)
        for n in stale.tolist():
            st = self.state(cluster, n)
            key = (entry.tid, st.sid, bisect_right(thresholds, st.cpu_free - cpu))
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = self.score_state(task, st)
            entry.scores[n] = hit[0]
            entry.best[n] = hit[1]
            entry.versions[n] = st.version
        return entry.scores, entry.best

    def score_state(self, task: Task, st: NodeState) -> tuple[int, frozenset[int]]:
        """FGD score of placing ``task`` on a node in state ``st`` (-1 if it cannot fit)."""
        m = self.measure
        before_bucket = m.bucket(st.cpu_free)
        after_bucket = m.bucket(st.cpu_free - task.cpu_milli)
        before = m.frag(st.device_type, before_bucket, st.free)
        free = list(st.free)
        d, k = task.milli_on(st.memory_mib), task.gpu_count
        result: tuple[int, frozenset[int]] = (-1, frozenset())
        if k == 1 and 0 < d < MILLI:
            best, chosen = -1, set()
            for g in sorted(set(free)):
                if g < d:
                    continue
                after_free = list(free)
                after_free.remove(g)
                after_free.append(g - d)
                after = m.frag(st.device_type, after_bucket, tuple(sorted(after_free)))
                score = sigmoid_score(after - before)
                if score > best:
                    best, chosen = score, {g}
                elif score == best:
                    chosen.add(g)
            result = (best, frozenset(chosen))
        else:
            need = k
            after_free = []
            for g in free:  # ascending: whole GPUs come from the fully free ones
                if need and g >= d and d > 0:
                    after_free.append(g - d)
                    need -= 1
                else:
                    after_free.append(g)
            if need == 0:
                after = m.frag(st.device_type, after_bucket, tuple(sorted(after_free)))
                result = (sigmoid_score(after - before), frozenset({MILLI}) if k else frozenset())
        return result
