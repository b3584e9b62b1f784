"""NVIDIA MIG geometry: the GPU instance profiles of each MIG-capable model and where
on the GPU each may start.

Source: NVIDIA's "Multi-Instance GPU User Guide", section "Supported MIG Profiles" (the
profiles and how many instances of each a GPU holds, per model) and the placements
``nvidia-smi mig -lgipp`` lists (NVML ``nvmlDeviceGetGpuInstancePossiblePlacements``).
A GPU is divided into memory slices -- 8 on A100, H100 and H200, 4 on A30 -- and a GPU
instance occupies the slots ``[start, start + size)``; two instances never share a slot.
On an 8-slot GPU a 1g profile may start at 0..6 (slot 7 is reachable only by larger
profiles), the double-memory 1g profile and 2g at even slots (1g at 0, 2, 4, 6; 2g at
0, 2, 4), 3g at 0 or 4 taking 4 slots, 4g at 0 taking 4, 7g at 0 taking all 8. On A30
1g starts at 0..3, 2g at 0 or 2, 4g at 0. The media-extension profiles (``+me``) are left
out: they place as their base profile and add no capacity.

A profile's ``memory_mib`` is the size its name gives (``3g.20gb``: 20 x 1,024 MiB); a
real card's NVML reports somewhat less (an A100-40GB's ``1g.5gb`` has 4,864 MiB), which a
node agent on such a card should publish instead. Pure data and pure functions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from libshared.devices import Device, MigProfileSpec
from libshared.ledgers import Slice

_NAME = re.compile(r"^(\d+)g\.(\d+)gb$")


@dataclass(frozen=True)
class Profile:
    """One GPU instance profile: ``name`` (``"3g.20gb"``), ``compute`` (compute slices,
    the ``g``), ``size`` (memory slices it occupies), ``starts`` (the slots it may start
    at), ``memory_mib``."""

    name: str
    compute: int
    size: int
    starts: tuple[int, ...]
    memory_mib: int


def _named(name: str, compute: int, size: int, starts: tuple[int, ...]) -> Profile:
    """A tabled profile, its memory from its name (GB x 1,024)."""
    found = _NAME.match(name)
    assert found is not None, name
    return Profile(name, compute, size, starts, int(found.group(2)) * 1024)


@dataclass(frozen=True)
class Geometry:
    """A MIG-capable model: ``model`` (its key in ``GEOMETRIES``), ``slots`` (memory
    slices), ``profiles`` (smallest first)."""

    model: str
    slots: int
    profiles: tuple[Profile, ...]

    def profile(self, name: str) -> Profile | None:
        """The profile called ``name`` (None: not a profile of this model)."""
        return next((p for p in self.profiles if p.name == name), None)


def _eight_slots(model: str, gb: int) -> Geometry:
    """The A100/H100/H200 layout: 8 memory slices of ``gb`` / 8 each."""
    one, two, four = gb // 8, gb // 4, gb // 2
    if model == "H200-141GB":  # NVIDIA names H200's by rounding: 18, 35, 71, 141
        one, two, four = 18, 35, 71
    return Geometry(
        model=model,
        slots=8,
        profiles=(
            _named(f"1g.{one}gb", 1, 1, (0, 1, 2, 3, 4, 5, 6)),
            _named(f"1g.{two}gb", 1, 2, (0, 2, 4, 6)),
            _named(f"2g.{two}gb", 2, 2, (0, 2, 4)),
            _named(f"3g.{four}gb", 3, 4, (0, 4)),
            _named(f"4g.{four}gb", 4, 4, (0,)),
            _named(f"7g.{gb}gb", 7, 8, (0,)),
        ),
    )


GEOMETRIES: dict[str, Geometry] = {
    g.model: g
    for g in (
        _eight_slots("A100-40GB", 40),
        _eight_slots("A100-80GB", 80),
        _eight_slots("H100-80GB", 80),
        _eight_slots("H200-141GB", 141),
        Geometry(
            model="A30-24GB",
            slots=4,
            profiles=(
                _named("1g.6gb", 1, 1, (0, 1, 2, 3)),
                _named("2g.12gb", 2, 2, (0, 2)),
                _named("4g.24gb", 4, 4, (0,)),
            ),
        ),
    )
}

# A GPU's product name (NVML's, e.g. "NVIDIA A100-SXM4-40GB") -> its geometry: the first
# rule whose every word the upper-cased name holds.
_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("A100", "80GB"), "A100-80GB"),
    (("A100",), "A100-40GB"),
    (("A30",), "A30-24GB"),
    (("H200",), "H200-141GB"),
    (("H100", "94GB"), ""),  # H100 NVL: another layout, not tabled
    (("H100", "NVL"), ""),
    (("H100",), "H100-80GB"),
)


def geometry_for(product: str) -> Geometry | None:
    """The geometry of the GPU whose product name is ``product`` (None: not a MIG model
    tabled here)."""
    upper = product.upper()
    for words, model in _RULES:
        if all(w in upper for w in words):
            return GEOMETRIES.get(model)
    return None


@dataclass(frozen=True)
class Instance:
    """A GPU instance on a GPU: its ``profile`` name and placement ``[start, start +
    size)``."""

    profile: str
    start: int
    size: int


def occupied(instances: Iterable[Instance]) -> int:
    """The slots the instances take, as a bit mask (bit i: slot i)."""
    mask = 0
    for inst in instances:
        mask |= ((1 << inst.size) - 1) << inst.start
    return mask


def free_starts(profile: Profile, mask: int) -> list[int]:
    """The starts of ``profile`` whose slots are all free under ``mask``."""
    span = (1 << profile.size) - 1
    return [s for s in profile.starts if not (mask >> s) & span]


def check(geometry: Geometry, instances: Sequence[Instance]) -> str:
    """Why ``instances`` cannot all be on one GPU of ``geometry`` ("" when they can): an
    unknown profile, a start or size the profile does not have, two sharing a slot."""
    mask = 0
    for inst in instances:
        profile = geometry.profile(inst.profile)
        if profile is None:
            return f"{inst.profile}: not a profile of {geometry.model}"
        if inst.size != profile.size or inst.start not in profile.starts:
            return (
                f"{inst.profile} at {inst.start} (size {inst.size}): {geometry.model} places it"
                f" at {list(profile.starts)} (size {profile.size})"
            )
        span = ((1 << inst.size) - 1) << inst.start
        if mask & span:
            return f"{inst.profile} at {inst.start} shares a slot with another instance"
        mask |= span
    return ""


def published(
    geometry: Geometry, allowlist: Collection[str] | None = None
) -> tuple[MigProfileSpec, ...]:
    """What a MIG-mode device registers (``Device.mig_profiles``): the profiles of
    ``geometry`` that ``allowlist`` names (None: all; HAMi's ``migProfileAllowlist``)."""
    return tuple(
        MigProfileSpec(
            name=p.name, memory_mib=p.memory_mib, compute=p.compute, size=p.size, starts=p.starts
        )
        for p in geometry.profiles
        if allowlist is None or p.name in allowlist
    )


@functools.lru_cache(maxsize=4096)
def of_device(device: Device) -> Geometry | None:
    """The geometry a MIG-mode device published (None: not in ``mig`` mode, or no
    profile). A profile whose placements reach past ``mig_slots`` is left out: a node's
    registration is untrusted input. Remembered per device value (a registration is
    immutable)."""
    if device.mode != "mig" or not device.mig_profiles or not device.mig_slots:
        return None
    profiles = tuple(
        Profile(p.name, p.compute, p.size, tuple(sorted(set(p.starts))), p.memory_mib)
        for p in device.mig_profiles
        if p.starts and max(p.starts) + p.size <= device.mig_slots
    )
    if not profiles:
        return None
    return Geometry(model=device.uuid, slots=device.mig_slots, profiles=profiles)


def instances_on(slices: Iterable[Slice], uuid: str, geometry: Geometry) -> list[Instance]:
    """The GPU instances the MIG slices of ``slices`` hold on device ``uuid`` of
    ``geometry``, one per pod, profile and start (a pod's init and app containers may
    name the same one), each as large as its slice says (``mig_size``), else as its
    profile is; one of a profile the device no longer offers and of no size is taken to
    reach to the last slot: what it holds is never offered twice."""
    seen: dict[tuple[str, str, int], Instance] = {}
    for s in slices:
        if s.uuid != uuid or not s.mig_profile or s.mig_start < 0:
            continue
        key = (s.pod_uid, s.mig_profile, s.mig_start)
        if key not in seen:
            profile = geometry.profile(s.mig_profile)
            size = s.mig_size or (profile.size if profile else geometry.slots - s.mig_start)
            size = max(1, min(size, geometry.slots - s.mig_start))
            seen[key] = Instance(s.mig_profile, s.mig_start, size)
    return list(seen.values())
