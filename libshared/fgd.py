"""FGD's fragmentation measure of a whole fleet against a workload, as one pure function.

Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation
Gradient Descent", USENIX ATC'23, section 3 (restated in ../shared/FGD.md): for a node
whose GPUs have free shares g_1..g_K (milli-GPU, 1000 = a whole GPU) and a task shape m
asking k_m GPUs of d_m milli each,

- if fewer than k_m GPUs have g_i >= d_m, m cannot run there and every idle milli-GPU of
  the node is fragmented for m: F_m = sum g_i;
- else only the GPUs too small for m are: F_m = sum of the g_i < d_m;

and F(node) = sum_m p_m F_m over the target workload (shapes m with probabilities p_m).
The fleet's figure is sum F(node) / sum g_i: the share of idle GPU capacity the workload
cannot use.

The scheduler keeps its own memoised, CPU- and type-aware version for scoring
(``services.scheduler.core.fragmentation``); this one serves read-only figures (the
metrics dashboard) from the GPU shares alone, so services stay independent of each other.
Pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MILLI = 1000  # one whole GPU in milli-GPU, the paper's unit
COVERAGE = 0.95  # share of tasks the target workload covers (the paper's simulator)
WHOLE_GPU = (MILLI, 1)  # the shape used when there is no workload to measure against


@dataclass(frozen=True)
class Workload:
    """Task shapes ``(milli per GPU, GPU count)`` and their probabilities (sum to 1)."""

    shapes: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]


def workload(shapes: Iterable[tuple[int, int]], *, coverage: float = COVERAGE) -> Workload:
    """The target workload of the tasks ``shapes`` (``(milli per GPU 1-1000, GPU count >=
    1)`` each): the most frequent shapes, by decreasing count, until they cover
    ``coverage`` of the tasks, renormalised (the paper's section 3). No task at all gives
    the one whole-GPU shape. Raises ``ValueError`` naming a shape out of range."""
    counts: Counter[tuple[int, int]] = Counter()
    for milli, count in shapes:
        if not 1 <= milli <= MILLI or count < 1:
            raise ValueError(f"shape ({milli}, {count}): milli must be 1-1000, count >= 1")
        counts[(milli, count)] += 1
    if not counts:
        return Workload(shapes=(WHOLE_GPU,), weights=(1.0,))
    total = sum(counts.values())
    chosen: list[tuple[tuple[int, int], int]] = []
    covered = 0
    for shape, n in sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True):
        if covered >= coverage * total:
            break
        chosen.append((shape, n))
        covered += n
    return Workload(
        shapes=tuple(s for s, _ in chosen), weights=tuple(n / covered for _, n in chosen)
    )


def node_fragmentation(free: Sequence[int], load: Workload) -> float:
    """F(node) in milli-GPU: the node's GPUs have free shares ``free`` (milli-GPU each)."""
    total = sum(free)
    value = 0.0
    for (milli, count), p in zip(load.shapes, load.weights, strict=True):
        fits = sum(1 for g in free if g >= milli)
        value += p * (sum(g for g in free if g < milli) if fits >= count else total)
    return value


@dataclass(frozen=True)
class Figure:
    """The fleet's fragmentation: ``free_milli`` idle and ``fragmented_milli`` of it that
    the workload cannot use (both milli-GPU)."""

    free_milli: int
    fragmented_milli: float

    @property
    def ratio_percent(self) -> float:
        """100 x fragmented / free (0-100); 0.0 when nothing is free."""
        return 100.0 * self.fragmented_milli / self.free_milli if self.free_milli else 0.0


def fleet_fragmentation(nodes: Iterable[Sequence[int]], load: Workload) -> Figure:
    """The figure of the fleet whose nodes have these GPU free shares (milli-GPU each)."""
    free = 0
    fragmented = 0.0
    cache: dict[tuple[int, ...], float] = {}
    for shares in nodes:
        key = tuple(sorted(shares))
        if key not in cache:
            cache[key] = node_fragmentation(key, load)
        fragmented += cache[key]
        free += sum(key)
    return Figure(free_milli=free, fragmented_milli=fragmented)
