"""Partitioned preference: replicas deciding at once prefer different near-best nodes.

N active replicas see one view and, with one policy, choose the same best node for nearly
every pod; all but one then lose the ledger's compare-and-set and decide again
(ARCHITECTURE.md, "The bus"). With HAMi's binpack two replicas lost about a third of
their commits that way. Here each replica owns a shard of the nodes (the CRC-32 of the
node name modulo the replica count: every replica computes the same shards from names
alone, whatever order its view learned the nodes in) and, among the nodes whose score is
within ``epsilon`` of the best, takes the best of its own shard; when its shard holds no
such node it chooses among the others' nodes, leaving out each other shard's best (the
node its replica is choosing at that moment), and among all when nothing else fits. A lone
replica (count 1) chooses exactly as without partitioning. By default ``epsilon`` spans
every score, so a replica keeps to its shard while any node of it fits (``DEFAULT_EPSILON``
says why).

Not a rule of HAMi, which runs one active replica and serializes binds with a node lock
(HAMi #374, #1367); the idea is the "power of partitioned choice" of shared-state
schedulers (Omega, Schwarzkopf et al., EuroSys 2013, section 5: conflicts fall when
schedulers do not all pick the same most-preferred machine).

Pure: no I/O. What it leaves to others: the scores (``scoring``, ``fragmentation``,
``steering``) and the final pick among the narrowed nodes (``deciding``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from libshared.errors import VsliceError

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
# The whole score range: a replica takes the best node of its own shard whenever one fits.
# Measured (benchmarks/races.py, openb): with less, the shards' best scores drift apart --
# binpack fills one node per shard, FGD's deltas differ from node to node -- so the lagging
# replica falls back to the other's best node and races for it again (hami, 2 replicas:
# 25 % of placements lost a race alone, 22 % at 0.05, 21 % at 0.3, 0.5 % at 1), while
# the allocation stays within 0.1 % of one replica's.
DEFAULT_EPSILON = 1.0


class PartitionError(VsliceError, ValueError):
    """A partition field out of range; carries the field's name and value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field} {value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Partition:
    """Which replica of how many this is, and how near the best a node must score to be
    preferred for being in the replica's shard.

    ``index``: 0 .. ``count`` - 1. ``count``: replicas deciding at once (1: no
    partitioning). ``epsilon``: the tolerance as a fraction (0-1) of the score range of
    the nodes that fit (0: only nodes tied with the best). Raises ``PartitionError``
    naming the field for a value out of range.
    """

    index: int = 0
    count: int = 1
    epsilon: float = DEFAULT_EPSILON

    def __post_init__(self) -> None:
        if self.count < 1:
            raise PartitionError("replica count", self.count, "must be >= 1")
        if not 0 <= self.index < self.count:
            raise PartitionError("replica index", self.index, f"must be 0-{self.count - 1}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise PartitionError("shard epsilon", self.epsilon, "must be 0-1")

    @property
    def alone(self) -> bool:
        """True when this is the only replica: nothing to partition."""
        return self.count == 1

    def shard_of(self, node: str) -> int:
        """The replica (0 .. count - 1) whose shard ``node`` is in."""
        return zlib.crc32(node.encode()) % self.count

    def shards(self, nodes: Sequence[str]) -> IntArray:
        """(N,) the shard of each of ``nodes``."""
        return np.fromiter((self.shard_of(n) for n in nodes), dtype=np.int64, count=len(nodes))

    def narrow(self, ok: BoolArray, score: FloatArray, shards: IntArray) -> BoolArray:
        """The nodes to choose among: those of ``ok`` in this replica's shard that score
        within ``epsilon * (best - worst)`` of the best (``score``: higher is better,
        compared over ``ok`` only). When there are none: ``ok`` without the best-scored
        nodes of every other shard, which their replicas are likely choosing at the same
        moment; ``ok`` itself when that leaves nothing.

        Shapes: every argument (N,), ``shards`` as ``shards`` gives them. A new array or
        ``ok``; never changes ``ok``.
        """
        if self.alone or not ok.any():
            return ok
        vals = score[ok]
        best = float(vals.max())
        floor = best - self.epsilon * (best - float(vals.min()))
        near: BoolArray = ok & (shards == self.index) & (score >= floor)
        if near.any():
            return near
        rest = ok.copy()
        for other in range(self.count):
            theirs = ok & (shards == other)
            if other != self.index and theirs.any():
                rest &= ~(theirs & (score >= score[theirs].max()))
        return rest if rest.any() else ok
