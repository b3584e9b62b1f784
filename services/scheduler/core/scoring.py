"""Node scores of every policy, vectorised over the fleet.

- HAMi (Project-HAMi/HAMi, scheduler ``calcScore``; docs "scheduler-policy"): a node's
  score after the pod's slices are added is ``10 * (sum used/sum split + sum used cores /
  sum cores + sum used MiB / sum MiB)``; ``binpack`` takes the highest, ``spread`` the
  lowest.
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


def hami_node_score(
    cluster: Cluster, *, gpus: int, memory_mib: IntArray | int, cores_percent: int
) -> FloatArray:
    """HAMi's node score (0-30) after adding ``gpus`` slices of the given size to each node."""
    c = cluster
    valid = c.dev_valid
    split = np.where(valid, c.dev_split, 0).sum(axis=1)
    cores = np.where(valid, c.dev_cores, 0).sum(axis=1)
    mem = np.where(valid, c.dev_mem, 0).sum(axis=1)
    used = np.where(valid, c.dev_used, 0).sum(axis=1) + gpus
    cores_used = np.where(valid, c.dev_cores_used, 0).sum(axis=1) + gpus * cores_percent
    mem_used = np.where(valid, c.dev_mem_used, 0).sum(axis=1) + gpus * np.asarray(memory_mib)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = used / split + cores_used / cores + mem_used / mem
    return np.asarray(np.nan_to_num(10.0 * score, nan=0.0, posinf=0.0), dtype=np.float64)


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


def dotprod_score(cluster: Cluster, *, cpu_milli: int, gpu_milli_total: int) -> FloatArray:
    """DotProduct: minus the dot product of normalised free and requested (CPU, GPU)."""
    free = cpu_free(cluster) / MAX_SPEC_CPU_MILLI * (
        cpu_milli / MAX_SPEC_CPU_MILLI
    ) + free_gpu_milli(cluster) / MAX_SPEC_GPU_MILLI * (gpu_milli_total / MAX_SPEC_GPU_MILLI)
    return -free


def gpupacking_score(cluster: Cluster, *, gpu_milli: int, gpu_count: int) -> FloatArray:
    """GpuPacking: shared GPUs that fit first (less free first), then used nodes where the
    task takes whole GPUs (fewer free GPUs first), then idle nodes."""
    fm = cluster.free_milli
    full = (fm == MILLI).sum(axis=1)
    ndev = cluster.dev_valid.sum(axis=1)
    idle = full == ndev
    tier = np.where(idle, 0.0, 1.0)
    score = tier * 1e4 - full
    if gpu_count == 1 and gpu_milli < MILLI:
        partial = (fm > 0) & (fm < MILLI) & (fm >= gpu_milli)
        tightest = np.where(partial, fm, MILLI).min(axis=1)
        score = np.where(partial.any(axis=1), 2e4 - tightest, score)
    return np.asarray(score, dtype=np.float64)


def gpuclustering_score(cluster: Cluster, *, sharing: bool) -> FloatArray:
    """GpuClustering: nodes holding only the task's class (sharing or whole-GPU) first, then
    mixed, then idle, then only the other class; within a tier the more allocated first."""
    c = cluster
    exclusive = (c.dev_used == 1) & (c.dev_cores_used >= c.dev_cores) & c.dev_valid
    shared = (c.dev_used > 0) & ~exclusive & c.dev_valid
    has_ex, has_sh = exclusive.any(axis=1), shared.any(axis=1)
    same, other = (has_sh, has_ex) if sharing else (has_ex, has_sh)
    tier = np.select([same & ~other, same & other, ~same & ~other], [3.0, 2.0, 1.0], default=0.0)
    allocated = 1.0 - free_gpu_milli(c) / np.maximum(c.dev_valid.sum(axis=1) * MILLI, 1)
    return np.asarray(tier * 10.0 + allocated, dtype=np.float64)
