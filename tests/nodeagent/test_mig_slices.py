"""Dynamic MIG on the node: a MIG slice's container gets its MIG device and no libvgpu;
the slicer creates the GPU instance when the slice is prepared, destroys it once no
container holds it, adopts what a ledger slice names after a restart, and reports what
it realized. NVML is stood in for by an in-memory GPU that refuses what NVIDIA's
placement rules refuse (``libshared.migs``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest

from libshared import annotations as keys
from libshared import events, migs
from libshared.devices import Device
from libshared.errors import AnnotationDecodeError
from libshared.ledgers import NodeLedger, PodCharge, Slice
from services.nodeagent.adapters.migdevices import MigError, Realized
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, fleets, preparing

GPU = "GPU-a100-0"
GEOMETRY = migs.GEOMETRIES["A100-40GB"]


class FakeMig:
    """GPU instances of one A100-40GB in memory; ``busy`` holds GPU instance IDs that
    have processes (destroy refuses them as NVML does with IN_USE)."""

    def __init__(self) -> None:
        self.held: dict[int, Realized] = {}
        self.busy: set[int] = set()
        self.created: list[tuple[str, int]] = []
        self.destroyed: list[int] = []
        self._ids = itertools.count(1)
        self._uuids = itertools.count(1)

    def instances(self, uuid: str) -> list[Realized]:
        return sorted((r for r in self.held.values() if r.parent == uuid), key=lambda r: r.start)

    def create(self, uuid: str, profile: str, start: int, size: int) -> Realized:
        for r in self.instances(uuid):
            if r.profile == profile and r.start == start:
                return r
        placed = [migs.Instance(r.profile, r.start, r.size) for r in self.instances(uuid)]
        why = migs.check(GEOMETRY, [*placed, migs.Instance(profile, start, size)])
        if why:
            raise MigError(f"GPU {uuid}: {why}")
        gi = next(self._ids)
        made = Realized(uuid, f"MIG-{next(self._uuids):04d}", profile, gi, 0, start, size)
        self.held[gi] = made
        self.created.append((profile, start))
        return made

    def destroy(self, uuid: str, gpu_instance_id: int) -> None:
        if gpu_instance_id in self.busy:
            raise MigError(f"instance {gpu_instance_id} in use", in_use=True)
        if self.held.pop(gpu_instance_id, None) is not None:
            self.destroyed.append(gpu_instance_id)


def mig_slice(pod: str, profile: str, start: int, *, container: str = "main") -> Slice:
    found = GEOMETRY.profile(profile)
    size = found.size if found is not None else 1
    return Slice(
        pod_uid=f"uid-{pod}",
        namespace="default",
        pod=pod,
        container=container,
        container_index=0,
        uuid=GPU,
        device_index=0,
        memory_mib=1024,
        cores_percent=0,
        mig_profile=profile,
        mig_start=start,
        mig_size=size,
    )


def placement(*slices: Slice) -> events.Placement:
    s = slices[0]
    return events.Placement(
        pod_uid=s.pod_uid,
        namespace=s.namespace,
        pod=s.pod,
        node="n1",
        slices=slices,
        charge=PodCharge(pod_uid=s.pod_uid),
    )


def layout(tmp_path: Path) -> preparing.Layout:
    return preparing.Layout(root=str(tmp_path / "host"), libvgpu="/opt/vslice/libvgpu.so")


def slicer(tmp_path: Path, mig: FakeMig | None) -> Slicer:
    return Slicer(
        node="n1", layout=layout(tmp_path), grace_s=0.0, mig=mig, mig_gpus=frozenset({GPU})
    )


def test_a_mig_containers_environment_names_its_mig_device_and_no_libvgpu(
    tmp_path: Path,
) -> None:
    s = mig_slice("p1", "2g.10gb", 2)
    (plan,) = preparing.plan(placement(s), layout(tmp_path), {(GPU, 2): "MIG-abc"})
    assert plan.env["NVIDIA_VISIBLE_DEVICES"] == "MIG-abc"
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "MIG-abc"
    assert "LD_PRELOAD" not in plan.env
    assert not any(k.startswith("CUDA_DEVICE_MEMORY_LIMIT") for k in plan.env)
    assert "CUDA_DEVICE_SM_LIMIT" not in plan.env
    assert plan.env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] == plan.cache
    assert plan.libvgpu is False


def test_a_mig_slice_without_its_instance_or_beside_a_sliced_device_is_refused(
    tmp_path: Path,
) -> None:
    s = mig_slice("p1", "2g.10gb", 2)
    with pytest.raises(ValueError, match=r"2g\.10gb at slot 2 not realized"):
        preparing.plan(placement(s), layout(tmp_path), {(GPU, 4): "MIG-other"})
    sliced = Slice(
        pod_uid="uid-p1",
        namespace="default",
        pod="p1",
        container="main",
        container_index=0,
        uuid="GPU-t4",
        device_index=1,
        memory_mib=1000,
        cores_percent=10,
    )
    with pytest.raises(ValueError, match="MIG instances and sliced devices"):
        preparing.plan(placement(s, sliced), layout(tmp_path), {(GPU, 2): "MIG-abc"})


def test_preparing_a_mig_slice_creates_its_instance_and_releasing_it_destroys_it(
    tmp_path: Path,
) -> None:
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    answer = sl.prepare(placement(mig_slice("p1", "3g.20gb", 4)))
    assert isinstance(answer, events.Ready)
    assert mig.created == [("3g.20gb", 4)]
    (made,) = mig.instances(GPU)
    assert answer.env["main"]["NVIDIA_VISIBLE_DEVICES"] == made.mig_uuid
    again = sl.prepare(placement(mig_slice("p1", "3g.20gb", 4)))
    assert isinstance(again, events.Ready)
    assert mig.created == [("3g.20gb", 4)]  # prepared twice, created once
    sl.release("uid-p1", now=0.0)
    sl.sweep(now=1.0)
    assert mig.instances(GPU) == []
    assert mig.destroyed == [made.gpu_instance_id]


def test_an_instance_in_use_is_kept_until_a_later_sweep_finds_it_free(tmp_path: Path) -> None:
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    sl.prepare(placement(mig_slice("p1", "1g.5gb", 0)))
    (made,) = mig.instances(GPU)
    mig.busy.add(made.gpu_instance_id)
    sl.release("uid-p1", now=0.0)
    sl.sweep(now=1.0)
    assert mig.instances(GPU) == [made]
    mig.busy.clear()
    sl.sweep(now=2.0)
    assert mig.instances(GPU) == []


def test_two_pods_get_two_instances_and_a_taken_slot_fails_the_placement(tmp_path: Path) -> None:
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    first = sl.prepare(placement(mig_slice("p1", "4g.20gb", 0)))
    second = sl.prepare(placement(mig_slice("p2", "3g.20gb", 4)))
    assert isinstance(first, events.Ready) and isinstance(second, events.Ready)
    assert {r.profile for r in mig.instances(GPU)} == {"4g.20gb", "3g.20gb"}
    clash = sl.prepare(placement(mig_slice("p3", "2g.10gb", 2)))
    assert isinstance(clash, events.Failed)
    assert "shares a slot" in clash.reason


def test_a_mig_slice_on_a_gpu_not_in_mig_mode_here_fails(tmp_path: Path) -> None:
    sl = Slicer(node="n1", layout=layout(tmp_path), mig=FakeMig(), mig_gpus=frozenset())
    answer = sl.prepare(placement(mig_slice("p1", "1g.5gb", 0)))
    assert isinstance(answer, events.Failed)
    assert "not in MIG mode" in answer.reason
    no_nvml = Slicer(node="n1", layout=layout(tmp_path), mig_gpus=frozenset({GPU}))
    assert isinstance(no_nvml.prepare(placement(mig_slice("p1", "1g.5gb", 0))), events.Failed)


def test_a_restarted_agent_keeps_the_ledgers_instances_and_destroys_the_rest(
    tmp_path: Path,
) -> None:
    mig = FakeMig()
    kept = mig.create(GPU, "2g.10gb", 0, 2)
    orphan = mig.create(GPU, "1g.5gb", 6, 1)
    sl = slicer(tmp_path, mig)
    ledger = NodeLedger(node="n1", slices=(mig_slice("p1", "2g.10gb", 0),))
    prepared, _ = sl.reconcile(ledger)
    assert prepared == ["uid-p1"]
    assert mig.created == [("2g.10gb", 0), ("1g.5gb", 6)]  # nothing made anew
    sl.sweep(now=1e9)
    assert mig.instances(GPU) == [kept]
    assert orphan.gpu_instance_id in mig.destroyed


def test_an_instance_of_another_profile_left_at_the_slot_is_replaced(tmp_path: Path) -> None:
    mig = FakeMig()
    stale = mig.create(GPU, "1g.5gb", 0, 1)
    sl = slicer(tmp_path, mig)
    sl.reconcile(None)
    answer = sl.prepare(placement(mig_slice("p1", "2g.10gb", 0)))
    assert isinstance(answer, events.Ready)
    assert stale.gpu_instance_id in mig.destroyed
    assert [r.profile for r in mig.instances(GPU)] == ["2g.10gb"]


def test_the_usage_report_lists_the_realized_instances(tmp_path: Path) -> None:
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    sl.prepare(placement(mig_slice("p1", "3g.20gb", 4)))
    (made,) = mig.instances(GPU)
    report = sl.usage([], [], margin_bytes=0)
    assert report.migs == (
        events.MigInstanceUsage(
            uuid=GPU,
            mig_uuid=made.mig_uuid,
            profile="3g.20gb",
            gpu_instance_id=made.gpu_instance_id,
            compute_instance_id=0,
            start=4,
            size=4,
        ),
    )


def pending(migs: str | None) -> dict[str, object]:
    annos = {
        keys.BIND_PHASE: keys.BIND_PHASE_ALLOCATING,
        keys.VGPU_DEVICES_TO_ALLOCATE: f"{GPU},NVIDIA,10240,0:;",
    }
    if migs is not None:
        annos[keys.VGPU_MIG_ALLOCATIONS] = migs
    return {
        "metadata": {"name": "p1", "namespace": "default", "uid": "uid-p1", "annotations": annos},
        "spec": {"nodeName": "n1", "containers": [{"name": "main"}]},
    }


A100_DEVICE = Device(
    uuid=GPU,
    index=0,
    type="NVIDIA-A100",
    memory_mib=40960,
    mode="mig",
    mig_slots=8,
    mig_profiles=migs.published(GEOMETRY),
)


# the scheduler's reservation of a 2g.10gb at slot 4 for container 0 (HAMi's JSON)
ALLOCATION = keys.MigAllocation(
    container_index=0,
    device_index=0,
    gpu_uuid=GPU,
    profile="2g.10gb",
    placement=keys.MigPlacement(start=4, size=2),
)


def test_kubelets_allocate_gives_a_mig_container_its_instance_and_no_libvgpu(
    tmp_path: Path,
) -> None:
    pod = allocating.pending_pod(pending(keys.encode_mig_allocations([ALLOCATION])), node="n1")
    assert pod is not None
    match = allocating.choose([f"{GPU}::0"], [pod])
    (s,) = allocating.container_slices(match, [A100_DEVICE])
    assert (s.mig_profile, s.mig_start, s.mig_size) == ("2g.10gb", 4, 2)
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    assert isinstance(sl.prepare(placement(s)), events.Ready)
    (plan,) = sl.plan(placement(s))
    out = allocating.container_response(
        plan, layout=sl.layout, libvgpu="/lib/v.so", preload="/p", disable_control=False
    )
    (made,) = mig.instances(GPU)
    assert out.envs["NVIDIA_VISIBLE_DEVICES"] == made.mig_uuid
    assert allocating.LD_SO_PRELOAD not in {m.container_path for m in out.mounts}
    assert allocating.CONTAINER_LIBVGPU not in {m.container_path for m in out.mounts}


def test_a_grant_on_a_mig_gpu_without_its_instance_annotation_is_refused() -> None:
    pod = allocating.pending_pod(pending(None), node="n1")
    assert pod is not None
    match = allocating.choose([f"{GPU}::0"], [pod])
    with pytest.raises(ValueError, match="vgpu-mig-allocations"):
        allocating.container_slices(match, [A100_DEVICE])


def test_an_unreadable_mig_allocation_annotation_is_refused_naming_it() -> None:
    with pytest.raises(AnnotationDecodeError, match="vgpu-mig-allocations"):
        allocating.pending_pod(pending('[{"gpuUUID": 5}]'), node="n1")


def test_the_realized_instance_completes_the_pods_mig_allocations() -> None:
    pod = allocating.pending_pod(pending(keys.encode_mig_allocations([ALLOCATION])), node="n1")
    assert pod is not None
    assert allocating.realized_migs(pod, {}) == {}  # nothing realized: nothing written
    assert allocating.realized_migs(pod, {(GPU, 2): ("MIG-x", 1, 0)}) == {}
    patch = allocating.realized_migs(pod, {(GPU, 4): ("MIG-abc", 3, 0)})
    (done,) = keys.decode_mig_allocations(str(patch[keys.VGPU_MIG_ALLOCATIONS]))
    assert (done.mig_uuid, done.gpu_instance_id, done.compute_instance_id) == ("MIG-abc", 3, 0)
    assert (done.profile, done.placement) == ("2g.10gb", ALLOCATION.placement)


def test_a_mig_slice_without_a_size_fails_before_nvml_is_asked(tmp_path: Path) -> None:
    mig = FakeMig()
    sl = slicer(tmp_path, mig)
    sized = mig_slice("p1", "1g.5gb", 0)
    answer = sl.prepare(placement(msgspec.structs.replace(sized, mig_size=0)))
    assert isinstance(answer, events.Failed)
    assert "mig_size=0" in answer.reason
    assert mig.created == []


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("GPU-a:40960:" + "A" * 96 + ":mig", "product name"),
        ("GPU-a:40960:NVIDIA\x1bA100:mig", "product name"),
        ("GPU-a:40960::mig", "product name"),
        ("GPU-a:40960:NVIDIA A100:sliced", "product name"),
    ],
)
def test_a_mock_device_list_with_a_bad_product_part_is_refused_naming_it(
    text: str, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        fleets.parse_models(text)


def test_a_mock_device_list_gives_each_device_its_name_and_mig_mode() -> None:
    text = "GPU-a:40960:NVIDIA A100-SXM4-40GB:mig, GPU-b:16384"
    assert fleets.parse_devices(text) == (("GPU-a", 40960), ("GPU-b", 16384))
    assert fleets.parse_models(text) == ("NVIDIA A100-SXM4-40GB:mig", "")
    assert fleets.device_list(fleets.parse_devices(text), fleets.parse_models(text)) == (
        "GPU-a:40960:NVIDIA A100-SXM4-40GB:mig,GPU-b:16384"
    )
