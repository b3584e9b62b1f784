"""How much of a trace any online placement can be expected to allocate: best fit on
the fleet's GPUs pooled into one node.

The FGD paper's experiment (``replaying``) places each arriving pod at once or refuses
it. What the leftover at arrived 100 % is made of bounds what a better policy can gain:
on openb most of it is the remainder of sharing pods that no later pod fits (an
810 milli-GPU pod leaves 190, and only a few pods of the trace ask for 190 or less).
This model drops every constraint but the GPUs' own milli-GPU: one node holds every GPU
of the fleet, a pod's CPU, memory and GPU type are ignored, and a multi-GPU pod takes
any whole GPUs. Each pod is placed at once, as in the experiment:

- a pod of more than one GPU or of a whole one takes ``num_gpu`` fully free GPUs (as
  ``TracePod.request`` asks them: whole), or is refused;
- a sharing pod (one GPU, < 1,000 milli) goes to the partly used GPU with the least
  free milli-GPU that holds it (best fit), else to a fully free GPU, or is refused;
- a CPU-only pod allocates no GPU and is never refused here.

It is an estimate, not a proof: an online rule other than best fit may do better in the
pooled model (the ones measured there did not: ``benchmarks/placement.py`` prints
them). Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from libshared.traces import TracePod
from services.scheduler.core.clusters import MILLI


def pooled_best_fit(sequence: Sequence[TracePod], gpus: int) -> list[tuple[float, float]]:
    """The curve [(arrived, allocated)] of ``sequence`` (pods in arrival order) placed by
    best fit on ``gpus`` pooled GPUs (see the module docstring), one point per pod, as
    fractions of the capacity (``gpus`` x 1,000 milli-GPU). Raises ``ValueError`` when
    ``gpus`` < 1."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: at least one GPU is needed")
    capacity = gpus * MILLI
    whole = gpus
    partial: list[int] = []  # free milli-GPU of each partly used GPU, ascending
    requested = allocated = 0
    curve: list[tuple[float, float]] = []
    for pod in sequence:
        requested += pod.milli_total
        if pod.num_gpu > 1 or pod.gpu_milli >= MILLI:
            if whole >= pod.num_gpu:
                whole -= pod.num_gpu
                allocated += pod.milli_total
        elif pod.num_gpu:  # one GPU, < 1,000 milli
            need = pod.gpu_milli
            at = bisect.bisect_left(partial, need)
            if at < len(partial):
                left = partial.pop(at) - need
            elif whole:
                whole -= 1
                left = MILLI - need
            else:
                left = -1  # refused
            if left >= 0:
                allocated += need
                if left:
                    bisect.insort(partial, left)
        curve.append((requested / capacity, allocated / capacity))
    return curve


def leftover(free_milli: Sequence[int]) -> dict[int, int]:
    """How the free milli-GPU of partly used GPUs is split: {free milli: GPUs with that
    much free}, for the values strictly between 0 and 1,000 (``free_milli``: per GPU)."""
    counts: dict[int, int] = {}
    for free in free_milli:
        if 0 < free < MILLI:
            counts[free] = counts.get(free, 0) + 1
    return counts
