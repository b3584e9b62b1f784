"""MIG placement: which profile a request gets, and where on a GPU it goes.

A container's memory request (MiB) is fitted to the smallest allowed profile that holds
it (least memory, then fewest compute slices): the profile allowlist is HAMi's
``migProfileAllowlist`` (none: every profile of the model). A GPU fits when that profile
has a free legal start (``libshared.migs``: NVIDIA's placements, no two instances on one
slot).

Which start: MIG placements fragment. A 1g instance at slot 0 of an empty A100 leaves
room for six more 1g, but no 7g, no 4g and only one 3g; at slot 6 the 4g, a 3g and every
2g stay placeable. ``keep-largest`` (vslice's rule) takes the start that leaves the most
room for the largest profiles: for each profile a request can get (``reachable``: the
allowed ones not hidden by one of as much memory and fewer compute slices), largest
first, how many more instances of it the GPU could still take, compared in that order;
ties to the lowest start. Counting the hidden profiles too (a ``4g.20gb`` that no memory
request gets while ``3g.20gb`` is allowed) kept room nobody asks for and measured no
better than ``first``, the plain rule (lowest free start), kept as the baseline
``benchmarks/mig.py`` measures against.

Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from libshared.migs import Geometry, Instance, Profile, free_starts, occupied

Rule = Literal["keep-largest", "first"]


@dataclass(frozen=True)
class MigChoice:
    """Where a request goes on one GPU: ``profile`` at ``start``."""

    profile: Profile
    start: int

    def instance(self) -> Instance:
        """The GPU instance this choice creates."""
        return Instance(profile=self.profile.name, start=self.start, size=self.profile.size)


def smallest_profile(
    geometry: Geometry, memory_mib: int, allowlist: Collection[str] | None = None
) -> Profile | None:
    """The allowed profile of least memory (then fewest compute slices) holding
    ``memory_mib``; ``allowlist`` names the allowed ones (None: all). None when none
    holds it."""
    held = [
        p
        for p in geometry.profiles
        if p.memory_mib >= memory_mib and (allowlist is None or p.name in allowlist)
    ]
    return min(held, key=lambda p: (p.memory_mib, p.compute, p.name), default=None)


def reachable(geometry: Geometry, allowlist: Collection[str] | None = None) -> list[Profile]:
    """The profiles a memory request can get: ``smallest_profile`` of each allowed
    profile's memory (an allowed profile with as much memory and fewer compute slices
    than another hides it: ``4g.20gb`` behind ``3g.20gb``, ``2g.10gb`` behind
    ``1g.10gb``), in the geometry's order."""
    allowed = [p for p in geometry.profiles if allowlist is None or p.name in allowlist]
    got = {smallest_profile(geometry, p.memory_mib, allowlist) for p in allowed}
    return [p for p in geometry.profiles if p in got]


def room(
    geometry: Geometry, mask: int, profiles: Sequence[Profile] | None = None
) -> tuple[int, ...]:
    """For each of ``profiles`` (default: every profile of ``geometry``), largest first
    (size, then compute), how many more instances of it alone the free slots of ``mask``
    could take."""
    out = []
    chosen = geometry.profiles if profiles is None else profiles
    for p in sorted(chosen, key=lambda p: (-p.size, -p.compute, p.name)):
        taken, count = mask, 0
        for start in p.starts:  # ascending, equal sizes: taking the earliest is optimal
            span = ((1 << p.size) - 1) << start
            if not taken & span:
                taken |= span
                count += 1
        out.append(count)
    return tuple(out)


def choose(
    geometry: Geometry,
    instances: Sequence[Instance],
    memory_mib: int,
    *,
    allowlist: Collection[str] | None = None,
    rule: Rule = "keep-largest",
) -> MigChoice | None:
    """Where a request of ``memory_mib`` goes on a GPU of ``geometry`` holding
    ``instances``: the smallest allowed profile holding it, at the start ``rule`` picks
    (see the module docstring). None when no allowed profile holds the request or the
    profile has no free start on this GPU."""
    profile = smallest_profile(geometry, memory_mib, allowlist)
    if profile is None:
        return None
    mask = occupied(instances)
    starts = free_starts(profile, mask)
    if not starts:
        return None
    if rule == "first":
        return MigChoice(profile, starts[0])
    span = (1 << profile.size) - 1
    wanted = reachable(geometry, allowlist)
    best = max(starts, key=lambda s: (room(geometry, mask | (span << s), wanted), -s))
    return MigChoice(profile, best)
