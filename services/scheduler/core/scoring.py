"""Node scores of every policy, vectorised over the fleet.

- HAMi (Project-HAMi/HAMi, pkg/scheduler/policy/node_policy.go ``ComputeDefaultScore``):
  a node's score from its usage before the pod is ``10 * (sum used/sum split + sum used
  cores / sum cores + sum used MiB / sum MiB)``; ``binpack`` takes the highest, ``spread``
  the lowest.
- The FGD paper's baselines (Weng et al., ATC'23, section 6.1; ../shared/FGD.md), in the
  units of its simulator (CPU normalised by 128 cores, GPU by 8 GPUs): BestFit,
  DotProduct, GpuPacking, GpuClustering. Each returns "higher is better" scores.

All functions are pure: (Cluster arrays, request) -> (N,) numpy scores.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.scheduler.core.clusters import MILLI, Cluster, IntArray

FloatArray = npt.NDArray[np.float64]

MAX_SPEC_CPU_MILLI = 128_000  # 128 CPU, the simulator's MaxSpecCpu
MAX_SPEC_GPU_MILLI = 8 * MILLI  # 8 GPUs, the simulator's MaxSpecGpu


def hami_node_score(cluster: Cluster, rows: IntArray | None = None) -> FloatArray:
    """HAMi's node score (0-30) of every node (or of the nodes ``rows``, in their order:
    the same values, for a caller that keeps the others) from its usage *before* the pod:
    ``10 * (sum used/sum split + sum used cores/sum cores + sum used MiB/sum MiB)`` over the
    node's devices, in float32 as HAMi computes it; 0 when any of the three sums is 0.

    Source: pkg/scheduler/policy/node_policy.go, ``NodeScore.ComputeDefaultScore``, called
    in pkg/scheduler/score.go ``scoreNode`` before ``allocateAppContainers`` adds the pod
    (the NVIDIA device's ``ScoreNode`` adds 0). Binpack takes the highest, spread the
    lowest (``NodeScoreList.Less``).
    """
    c = cluster
    at = slice(None) if rows is None else rows
    valid = c.dev_valid[at]
    f = np.float32
    split = np.where(valid, c.dev_split[at], 0).sum(axis=1)
    cores = np.where(valid, c.dev_cores[at], 0).sum(axis=1)
    mem = np.where(valid, c.dev_mem[at], 0).sum(axis=1)
    used = np.where(valid, c.dev_used[at], 0).sum(axis=1)
    cores_used = np.where(valid, c.dev_cores_used[at], 0).sum(axis=1)
    mem_used = np.where(valid, c.dev_mem_used[at], 0).sum(axis=1)
    empty = (split == 0) | (cores == 0) | (mem == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (
            used.astype(f) / split.astype(f)
            + cores_used.astype(f) / cores.astype(f)
            + mem_used.astype(f) / mem.astype(f)
        )
    score = f(10) * score
    return np.asarray(np.where(empty, 0.0, score), dtype=np.float64)


def free_gpu_milli(cluster: Cluster) -> IntArray:
    """(N,) idle milli-GPU per node."""
    return np.asarray(
        np.where(cluster.free_milli > 0, cluster.free_milli, 0).sum(axis=1), dtype=np.int64
    )


def cpu_free(cluster: Cluster) -> IntArray:
    """(N,) free CPU milli-cores per node (0 where the node declares none)."""
    return np.where(cluster.cpu_total > 0, cluster.cpu_total - cluster.cpu_used, 0)


def normalize(scores: IntArray, feasible: npt.NDArray[np.bool_]) -> IntArray:
    """Min-max scale integer scores of feasible nodes to 0-100 with integer division,
    as kube-scheduler score plugins' NormalizeScore does (ties merge as they do there)."""
    out = np.zeros_like(scores)
    if not feasible.any():
        return out
    hi, lo = int(scores[feasible].max()), int(scores[feasible].min())
    if hi == lo:
        return out
    out[feasible] = (scores[feasible] - lo) * 100 // (hi - lo)
    return out


def bestfit_score(cluster: Cluster, *, cpu_milli: int, gpu_milli_total: int) -> IntArray:
    """BestFit: 100 * (1 - (1/2 leftover CPU/128 + 1/2 leftover GPU/8)), truncated."""
    left = (
        0.5 * (cpu_free(cluster) - cpu_milli) / MAX_SPEC_CPU_MILLI
        + 0.5 * (free_gpu_milli(cluster) - gpu_milli_total) / MAX_SPEC_GPU_MILLI
    )
    return ((1.0 - left) * 100.0).astype(np.int64)


def dotprod_score(cluster: Cluster, *, cpu_milli: int, gpu_milli_total: int) -> IntArray:
    """DotProduct (Tetris): ``int(100 * (1 - (free . request) / 2))`` with free and requested
    (CPU, GPU) each scaled by (128 CPU, 8 GPUs), as the simulator's "merge"/"max" variant."""
    dot = cpu_free(cluster) / MAX_SPEC_CPU_MILLI * (
        cpu_milli / MAX_SPEC_CPU_MILLI
    ) + free_gpu_milli(cluster) / MAX_SPEC_GPU_MILLI * (gpu_milli_total / MAX_SPEC_GPU_MILLI)
    return np.asarray((100.0 * (1.0 - dot / 2.0)).astype(np.int64), dtype=np.int64)


def gpupacking_score(cluster: Cluster, *, gpu_milli: int, gpu_count: int) -> IntArray:
    """GpuPacking, integer scores as the paper's simulator computes them (higher first):

    - a node whose GPUs are all free: ``max(33 - free GPUs, free GPUs)``;
    - else, taking the ``gpu_count`` least-free GPUs that fit: if any of them is fully
      free, ``max(50 - fully free GPUs taken, 33)``; otherwise
      ``max(100 - sum(free percent of the taken GPUs) / 10, 50)``;
    - a CPU-only request scores 0 everywhere.
    """
    n = cluster.size
    if gpu_milli <= 0 or gpu_count <= 0:
        return np.zeros(n, dtype=np.int64)
    fm = cluster.free_milli
    ndev = cluster.dev_valid.sum(axis=1)
    full = (fm == MILLI).sum(axis=1)
    fits = np.sort(np.where(fm >= gpu_milli, fm, 1 << 30), axis=1)[:, :gpu_count]
    taken_full = (fits == MILLI).sum(axis=1)
    percent_sum = np.where(fits < 1 << 30, fits * 100 // MILLI, 0).sum(axis=1)
    shared = np.maximum(100 - percent_sum // 10, 50)
    used_node = np.where(taken_full > 0, np.maximum(50 - taken_full, 33), shared)
    idle = np.maximum(33 - full, full)
    return np.asarray(np.where(full == ndev, idle, used_node), dtype=np.int64)


def affinity_class(gpu_count: int, gpu_milli: int) -> str:
    """The GpuClustering class of a request: ``share`` or ``<k>-gpu``; ``""`` for CPU-only."""
    if gpu_count <= 0:
        return ""
    return "share" if gpu_count == 1 and gpu_milli < MILLI else f"{gpu_count}-gpu"


def gpuclustering_score(
    cluster: Cluster, *, cls: str, node_classes: list[frozenset[str]]
) -> IntArray:
    """GpuClustering, integer scores as the paper's simulator computes them: 25 x the node's
    allocated share of 8 GPUs, plus 75 on nodes holding only the pod's class, 50 on nodes
    holding it among others, 25 on idle nodes, 0 on nodes of other classes only; a CPU-only
    request scores 0 everywhere. ``node_classes``: the classes of the pods on each node."""
    n = cluster.size
    if not cls:
        return np.zeros(n, dtype=np.int64)
    base = 25 * (MAX_SPEC_GPU_MILLI - free_gpu_milli(cluster)) // MAX_SPEC_GPU_MILLI
    tier = np.array(
        [
            75 if k == frozenset({cls}) else 50 if cls in k else 25 if not k else 0
            for k in node_classes
        ],
        dtype=np.int64,
    )
    return np.asarray(base + tier, dtype=np.int64)
