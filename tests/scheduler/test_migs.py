"""MIG geometry (NVIDIA's profiles and placements per model) and MIG placement: the
smallest allowed profile, legal starts, and the start that keeps the largest profiles."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libshared import migs
from libshared.devices import Device, MigProfileSpec, NodeDevices
from libshared.events import Placement, Unschedulable
from libshared.ledgers import Slice
from libshared.migs import GEOMETRIES, Instance
from services.scheduler.core import migplacing
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler
from tests.scheduler.conftest import cluster, node, pod

A100 = GEOMETRIES["A100-40GB"]


def instance(geometry: migs.Geometry, name: str, start: int) -> Instance:
    """An instance of profile ``name`` at ``start`` (size 1 for a name the model lacks)."""
    profile = geometry.profile(name)
    return Instance(name, start, profile.size if profile is not None else 1)


@pytest.mark.parametrize(
    ("product", "model"),
    [
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A30", "A30-24GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA H100 PCIe", "H100-80GB"),
        ("NVIDIA H200", "H200-141GB"),
        ("NVIDIA H100 NVL", None),
        ("Tesla T4", None),
        ("NVIDIA L40S", None),
    ],
)
def test_a_product_name_finds_its_models_geometry(product: str, model: str | None) -> None:
    found = migs.geometry_for(product)
    assert (found.model if found else None) == model


# NVIDIA's "Supported MIG Profiles" tables: instances of each profile one GPU holds
EIGHT = (7, 4, 3, 2, 1, 1)  # 1g, 1g of double memory, 2g, 3g, 4g, 7g


def counts(*names: str) -> dict[str, int]:
    return dict(zip(names, EIGHT, strict=True))


COUNTS = {
    "A100-40GB": counts("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    "A100-80GB": counts("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-80GB": counts("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H200-141GB": counts("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
    "A30-24GB": {"1g.6gb": 4, "2g.12gb": 2, "4g.24gb": 1},
}


@pytest.mark.parametrize("model", sorted(COUNTS))
def test_an_empty_gpu_holds_as_many_of_each_profile_as_nvidia_lists(model: str) -> None:
    geometry = GEOMETRIES[model]
    assert {p.name for p in geometry.profiles} == set(COUNTS[model])
    for profile in geometry.profiles:
        one = migs.Geometry(model=model, slots=geometry.slots, profiles=(profile,))
        assert migplacing.room(one, 0) == (COUNTS[model][profile.name],), profile.name


# (model, instances as (profile, start), why not -- "" when they fit together)
LAYOUTS = [
    ("A100-40GB", [("1g.5gb", 6)], ""),
    ("A100-40GB", [("1g.5gb", 7)], "places it at [0, 1, 2, 3, 4, 5, 6]"),
    ("A100-40GB", [("1g.10gb", 6)], ""),
    ("A100-40GB", [("1g.10gb", 1)], "places it at [0, 2, 4, 6]"),
    ("A100-40GB", [("2g.10gb", 6)], "places it at [0, 2, 4]"),
    ("A100-40GB", [("3g.20gb", 4)], ""),
    ("A100-40GB", [("3g.20gb", 2)], "places it at [0, 4]"),
    ("A100-40GB", [("4g.20gb", 4)], "places it at [0]"),
    ("A100-40GB", [("4g.20gb", 0), ("3g.20gb", 4)], ""),
    ("A100-40GB", [("3g.20gb", 0), ("4g.20gb", 0)], "shares a slot"),
    ("A100-40GB", [("2g.10gb", 0), ("2g.10gb", 2), ("2g.10gb", 4), ("1g.5gb", 6)], ""),
    ("A100-40GB", [("1g.5gb", s) for s in range(7)], ""),
    ("A100-40GB", [("7g.40gb", 0), ("1g.5gb", 3)], "shares a slot"),
    ("A100-40GB", [("3g.40gb", 0)], "not a profile of A100-40GB"),
    ("A100-80GB", [("3g.40gb", 4), ("2g.20gb", 0), ("1g.10gb", 2), ("1g.10gb", 3)], ""),
    ("H200-141GB", [("3g.71gb", 4), ("4g.71gb", 0)], ""),
    ("H200-141GB", [("7g.141gb", 0)], ""),
    ("A30-24GB", [("2g.12gb", 2), ("1g.6gb", 0), ("1g.6gb", 1)], ""),
    ("A30-24GB", [("2g.12gb", 1)], "places it at [0, 2]"),
    ("A30-24GB", [("4g.24gb", 0), ("1g.6gb", 3)], "shares a slot"),
]


@pytest.mark.parametrize(("model", "layout", "why"), LAYOUTS)
def test_placements_are_nvidias(model: str, layout: list[tuple[str, int]], why: str) -> None:
    geometry = GEOMETRIES[model]
    instances = [instance(geometry, name, start) for name, start in layout]
    got = migs.check(geometry, instances)
    assert (why in got) if why else got == ""


# (model, MiB asked, allowlist, the profile)
SMALLEST = [
    ("A100-40GB", 4000, None, "1g.5gb"),
    ("A100-40GB", 5120, None, "1g.5gb"),
    ("A100-40GB", 9000, None, "1g.10gb"),
    ("A100-40GB", 9000, {"1g.5gb", "2g.10gb", "7g.40gb"}, "2g.10gb"),
    ("A100-40GB", 20480, None, "3g.20gb"),  # 3g before 4g: same memory, fewer slices
    ("A100-40GB", 20480, {"4g.20gb", "7g.40gb"}, "4g.20gb"),
    ("A100-40GB", 40960, None, "7g.40gb"),  # the full GPU
    ("A100-40GB", 40961, None, None),
    ("A100-40GB", 9000, {"1g.5gb"}, None),
    ("A100-80GB", 9000, None, "1g.10gb"),
    ("H100-80GB", 30000, None, "3g.40gb"),
    ("H200-141GB", 9000, None, "1g.18gb"),
    ("H200-141GB", 100000, None, "7g.141gb"),
    ("A30-24GB", 9000, None, "2g.12gb"),
    ("A30-24GB", 6144, None, "1g.6gb"),
]


@pytest.mark.parametrize(("model", "mib", "allowed", "name"), SMALLEST)
def test_a_request_gets_the_smallest_allowed_profile_holding_it(
    model: str, mib: int, allowed: set[str] | None, name: str | None
) -> None:
    found = migplacing.smallest_profile(GEOMETRIES[model], mib, allowed)
    assert (found.name if found else None) == name


def test_keep_largest_puts_an_instance_where_more_of_what_is_asked_stays_placeable() -> None:
    # a 1g.10gb (2 slots) at 6 takes slot 7, which no 1g.5gb can use; at 0 it takes two
    # slots a 1g.5gb could: six 1g.5gb fit beside it at 6, five beside it at 0
    keep = migplacing.choose(A100, [], 9000)
    first = migplacing.choose(A100, [], 9000, rule="first")
    assert keep is not None and first is not None
    assert (keep.profile.name, keep.start, first.start) == ("1g.10gb", 6, 0)

    def smalls_beside(instance: Instance) -> int:
        placed = [instance]
        while (more := migplacing.choose(A100, placed, 4000)) is not None:
            placed.append(more.instance())
        return len(placed) - 1

    assert (smalls_beside(keep.instance()), smalls_beside(first.instance())) == (6, 5)


def test_a_profile_no_memory_request_gets_is_not_kept_room_for() -> None:
    # 4g.20gb has 3g.20gb's memory and more compute: a 20 GB request gets the 3g
    assert [p.name for p in migplacing.reachable(A100)] == [
        "1g.5gb",
        "1g.10gb",
        "3g.20gb",
        "7g.40gb",
    ]
    allowed = {"2g.10gb", "4g.20gb", "7g.40gb"}
    assert [p.name for p in migplacing.reachable(A100, allowed)] == allowed_order(allowed)


def allowed_order(names: set[str]) -> list[str]:
    return [p.name for p in A100.profiles if p.name in names]


@pytest.mark.parametrize(
    ("layout", "mib", "want"),
    [
        ([("7g.40gb", 0)], 4000, None),  # a full GPU
        ([("4g.20gb", 0)], 20000, ("3g.20gb", 4)),
        ([("3g.20gb", 4)], 20000, ("3g.20gb", 0)),
        ([("3g.20gb", 0), ("3g.20gb", 4)], 4000, None),  # no 1g start is free
        ([("2g.10gb", 0), ("2g.10gb", 2)], 9000, ("1g.10gb", 6)),  # keeps the 2g at 4
        ([("1g.5gb", 6)], 4000, ("1g.5gb", 4)),  # 4 and 5 leave the same room: the lower
    ],
)
def test_choose_takes_a_free_legal_start(
    layout: list[tuple[str, int]], mib: int, want: tuple[str, int] | None
) -> None:
    instances = [instance(A100, n, s) for n, s in layout]
    got = migplacing.choose(A100, instances, mib)
    assert (None if got is None else (got.profile.name, got.start)) == want


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(sorted(GEOMETRIES)),
    asks=st.lists(st.integers(min_value=1, max_value=150_000), max_size=20),
    rule=st.sampled_from(["keep-largest", "first"]),
)
def test_choices_never_overlap_and_a_refusal_means_no_free_start(
    model: str, asks: list[int], rule: migplacing.Rule
) -> None:
    geometry = GEOMETRIES[model]
    instances: list[Instance] = []
    for mib in asks:
        got = migplacing.choose(geometry, instances, mib, rule=rule)
        profile = migplacing.smallest_profile(geometry, mib)
        if got is None:
            assert profile is None or not migs.free_starts(profile, migs.occupied(instances))
            continue
        assert got.profile == profile
        instances.append(got.instance())
        assert migs.check(geometry, instances) == ""


# --- the scheduler on a node whose GPU is in MIG mode ----------------------------------------


def mig_node(
    name: str = "m", model: str = "A100-40GB", allow: set[str] | None = None
) -> NodeDevices:
    geometry = GEOMETRIES[model]
    full = max(p.memory_mib for p in geometry.profiles)
    device = Device(
        uuid=f"GPU-{name}",
        index=0,
        type=f"NVIDIA-{model}",
        memory_mib=full,
        split_count=7,
        mode="mig",
        mig_slots=geometry.slots,
        mig_profiles=migs.published(geometry, allow),
    )
    return NodeDevices(node=name, devices=(device,))


def placed(s: Scheduler, c: Cluster, uid: str, mib: int) -> Slice:
    decision = s.decide(pod(uid, mem=mib, cores=30))
    assert isinstance(decision, Placement), decision
    c.apply(decision)
    (only,) = decision.slices
    return only


def test_each_request_gets_a_gpu_instance_recorded_in_its_slice_until_none_fits() -> None:
    c = cluster(mig_node())
    s = Scheduler(c, policy="hami")
    first = placed(s, c, "a", 9000)
    assert (first.mig_profile, first.mig_start, first.memory_mib, first.cores_percent) == (
        "1g.10gb",
        6,
        10240,
        0,
    )
    assert first.mig_size == 2  # a double-memory 1g takes two memory slices
    second = placed(s, c, "b", 20000)  # 3g at 4 would take slot 6: only 0 is free
    assert (second.mig_profile, second.mig_start) == ("3g.20gb", 0)
    third = placed(s, c, "c", 4000)
    assert (third.mig_profile, third.mig_start) == ("1g.5gb", 4)
    refused = s.decide(pod("d", mem=20000, cores=30))
    assert isinstance(refused, Unschedulable)
    assert s.filter(pod("d", mem=20000)).failed["m"] == "1/1 CardInsufficientMemory"
    assert s.filter(pod("e", mem=4000)).feasible == ["m"]  # slot 5 is still free
    held = migs.instances_on(c.ledgers[0].slices, "GPU-m", GEOMETRIES["A100-40GB"])
    assert migs.check(GEOMETRIES["A100-40GB"], held) == ""
    assert sorted((i.profile, i.start) for i in held) == [
        ("1g.10gb", 6),
        ("1g.5gb", 4),
        ("3g.20gb", 0),
    ]


def test_a_released_instance_frees_its_slots() -> None:
    c = cluster(mig_node())
    s = Scheduler(c, policy="hami")
    placed(s, c, "big", 40000)
    assert isinstance(s.decide(pod("small", mem=4000)), Unschedulable)
    c.release("big")
    assert placed(s, c, "small", 4000).mig_profile == "1g.5gb"


def test_only_the_published_profiles_are_offered() -> None:
    # the allowlist is applied where the profiles are published (the node agent)
    c = cluster(mig_node(allow={"2g.10gb", "7g.40gb"}))
    got = placed(Scheduler(c, policy="hami"), c, "a", 4000)
    assert (got.mig_profile, got.memory_mib) == ("2g.10gb", 10240)


def test_a_pod_that_asks_for_slicing_is_kept_off_a_mig_gpu() -> None:
    c = cluster(mig_node(), node("n", 1))
    s = Scheduler(c, policy="hami")
    sliced = s.decide(pod("h", mem=4000, vgpu_mode="hami-core"))
    assert isinstance(sliced, Placement) and sliced.node == "n"
    assert sliced.slices[0].mig_profile == ""
    mig = s.decide(pod("g", mem=4000, vgpu_mode="mig"))
    assert isinstance(mig, Placement) and mig.node == "m"


def test_published_profiles_past_the_gpus_slots_are_left_out() -> None:
    bad = MigProfileSpec(name="3g.20gb", memory_mib=20480, compute=3, size=4, starts=(6,))
    good = MigProfileSpec(name="1g.5gb", memory_mib=5120, compute=1, size=1, starts=(0, 1))
    dev = Device(
        uuid="GPU-x", index=0, type="t", memory_mib=40960, mode="mig", mig_slots=8,
        mig_profiles=(bad, good),
    )  # fmt: skip
    geometry = migs.of_device(dev)
    assert geometry is not None and [p.name for p in geometry.profiles] == ["1g.5gb"]
    assert migs.of_device(msgspec.structs.replace(dev, mode="hami-core")) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("mig_profile", "7g"), ("mig_profile", "1g.5gb; rm"), ("mig_start", 8), ("mig_start", -2)],
)
def test_a_slice_with_a_malformed_mig_placement_is_refused_on_decode(
    field: str, value: object
) -> None:
    good = Slice(
        pod_uid="u", namespace="ns", pod="p", container="c", container_index=0, uuid="GPU-m",
        device_index=0, memory_mib=5120, cores_percent=0, mig_profile="1g.5gb", mig_start=3,
    )  # fmt: skip
    raw = msgspec.json.decode(msgspec.json.encode(good))
    assert msgspec.json.decode(msgspec.json.encode(raw), type=Slice) == good
    raw[field] = value
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(msgspec.json.encode(raw), type=Slice)
