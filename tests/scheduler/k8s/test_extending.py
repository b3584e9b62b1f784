"""The extender's pure core: wire types, the filter answer, bind annotations, restoring
placements from annotations, and the reconcile of the ledger with the pods."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from libshared import annotations as keys
from libshared.errors import AnnotationDecodeError, InvalidRequest
from libshared.events import Placement
from libshared.ledgers import PodCharge, Slice
from services.scheduler.core import extending
from tests.scheduler.k8s.pods import pod, registration

UID = "0b6a3a0c-6f0e-4a36-9a52-1f1f3f6e2a11"
UID2 = "4f3c1d2e-1111-4a36-9a52-1f1f3f6e2a22"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# -- ExtenderArgs ------------------------------------------------------------------------


def test_filter_args_are_read_with_the_go_field_names_kube_scheduler_sends() -> None:
    args = extending.decode_filter_args(
        body(Pod=pod("p", uid=UID), NodeNames=["n1", "n2"], Nodes=None)
    )
    assert (args.uid, args.name, args.namespace) == (UID, "p", "default")
    assert args.candidates == ("n1", "n2")
    assert args.names_given and args.node_objects is None


def test_filter_args_keys_match_case_insensitively_as_in_go() -> None:
    args = extending.decode_filter_args(body(pod=pod("p", uid=UID), nodenames=["n1"]))
    assert args.candidates == ("n1",)


def test_filter_args_with_a_node_list_keep_the_node_objects() -> None:
    nodes = {"items": [{"metadata": {"name": "n1"}}, {"metadata": {"name": "n2"}}]}
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), Nodes=nodes))
    assert args.candidates == ("n1", "n2")
    assert not args.names_given
    assert args.node_objects == {"n1": nodes["items"][0], "n2": nodes["items"][1]}


BAD_FILTER_BODIES = [
    (b"not json", "ExtenderArgs", "malformed"),
    (b"[1, 2]", "ExtenderArgs", "Expected `object`"),
    (body(NodeNames=["n1"]), "ExtenderArgs.Pod", "missing"),
    (body(Pod="p", NodeNames=["n1"]), "ExtenderArgs.Pod", "Pod object"),
    (body(Pod={"spec": {}}, NodeNames=["n1"]), "ExtenderArgs.Pod.metadata", "object"),
    (
        body(Pod={"metadata": {"name": "p"}, "spec": {}}, NodeNames=["n1"]),
        "ExtenderArgs.Pod.metadata.uid",
        "non-empty",
    ),
    (
        body(Pod={"metadata": {"name": "p", "uid": ""}, "spec": {}}, NodeNames=["n1"]),
        "ExtenderArgs.Pod.metadata.uid",
        "non-empty",
    ),
    (
        body(Pod={"metadata": {"uid": UID}, "spec": {}}, NodeNames=["n1"]),
        "ExtenderArgs.Pod.metadata.name",
        "non-empty",
    ),
    (
        body(Pod={"metadata": {"uid": UID, "name": "p"}}, NodeNames=["n1"]),
        "ExtenderArgs.Pod.spec",
        "object",
    ),
    (body(Pod=pod("p", uid=UID)), "ExtenderArgs.NodeNames", "neither NodeNames nor Nodes"),
    (body(Pod=pod("p", uid=UID), NodeNames="n1"), "ExtenderArgs.NodeNames", "list"),
    (body(Pod=pod("p", uid=UID), NodeNames=["n1", 7]), "ExtenderArgs.NodeNames[1]", "node"),
    (body(Pod=pod("p", uid=UID), NodeNames=[""]), "ExtenderArgs.NodeNames[0]", "node"),
    (body(Pod=pod("p", uid=UID), Nodes={"items": 3}), "ExtenderArgs.Nodes.items", "list"),
    (body(Pod=pod("p", uid=UID), Nodes=[1]), "ExtenderArgs.Nodes.items", "list"),
    (
        body(Pod=pod("p", uid=UID), Nodes={"items": [{"metadata": {}}]}),
        "ExtenderArgs.Nodes.items[0].metadata.name",
        "node",
    ),
    (
        b'{"Pod": {}, "pod": {}, "NodeNames": []}',
        "ExtenderArgs.Pod",
        "given twice",
    ),
]


@pytest.mark.parametrize(("raw", "field", "says"), BAD_FILTER_BODIES)
def test_a_bad_filter_body_is_refused_naming_the_field(raw: bytes, field: str, says: str) -> None:
    with pytest.raises(extending.BadBody) as err:
        extending.decode_filter_args(raw)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert says in str(err.value)


# -- ExtenderBindingArgs -----------------------------------------------------------------


def test_binding_args_are_read() -> None:
    args = extending.decode_binding_args(
        body(PodName="p", PodNamespace="ns", PodUID=UID, Node="n1")
    )
    assert args == extending.BindingArgs(pod_name="p", pod_namespace="ns", pod_uid=UID, node="n1")


@pytest.mark.parametrize("missing", ["PodName", "PodNamespace", "PodUID", "Node"])
@pytest.mark.parametrize("value", [None, "", 5])
def test_a_binding_body_without_a_field_is_refused_naming_it(missing: str, value: object) -> None:
    fields: dict[str, object] = {"PodName": "p", "PodNamespace": "ns", "PodUID": UID, "Node": "n"}
    if value is None:
        del fields[missing]
    else:
        fields[missing] = value
    with pytest.raises(extending.BadBody) as err:
        extending.decode_binding_args(body(**fields))
    assert err.value.field == f"ExtenderBindingArgs.{missing}"
    assert err.value.value == value


# -- the filter answer -------------------------------------------------------------------


def encoded(result: extending.ExtenderFilterResult) -> dict[str, Any]:
    out = json.loads(extending.ENCODER.encode(result))
    assert isinstance(out, dict)
    return out


def test_the_answer_names_one_node_and_the_reasons_of_the_other_candidates() -> None:
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), NodeNames=["a", "b", "c"]))
    result = extending.filter_result(
        args,
        chosen="b",
        failed={"a": "1/2 CardInsufficientMemory", "b": "x", "zz": "not a candidate"},
    )
    assert encoded(result) == {
        "NodeNames": ["b"],
        "FailedNodes": {"a": "1/2 CardInsufficientMemory"},
    }


def test_an_unschedulable_answer_has_an_empty_node_list_not_a_missing_one() -> None:
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), NodeNames=["a"]))
    result = extending.filter_result(args, chosen=None, failed={"a": "2/2 CardInsufficientCore"})
    assert encoded(result) == {"NodeNames": [], "FailedNodes": {"a": "2/2 CardInsufficientCore"}}


def test_without_node_cache_the_answer_is_a_node_list_of_the_chosen_node_object() -> None:
    nodes = {"items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b", "labels": {}}}]}
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), Nodes=nodes))
    out = encoded(extending.filter_result(args, chosen="b", failed={}))
    assert out == {
        "Nodes": {
            "apiVersion": "v1",
            "kind": "NodeList",
            "metadata": {},
            "items": [{"metadata": {"name": "b", "labels": {}}}],
        }
    }


def test_a_pod_without_a_gpu_passes_every_candidate_through() -> None:
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), NodeNames=["a", "b"]))
    assert encoded(extending.pass_through(args)) == {"NodeNames": ["a", "b"]}


def test_an_invalid_request_fails_every_candidate_unresolvably_with_the_field() -> None:
    args = extending.decode_filter_args(body(Pod=pod("p", uid=UID), NodeNames=["a", "b"]))
    error = InvalidRequest(container="main", field="nvidia.com/gpucores", value=300, reason="bad")
    out = encoded(extending.invalid_request(args, error))
    assert out["NodeNames"] == []
    assert set(out["FailedAndUnresolvableNodes"]) == {"a", "b"}
    assert "nvidia.com/gpucores=300" in out["FailedAndUnresolvableNodes"]["a"]


# -- bind annotations --------------------------------------------------------------------


def placement(*slices: tuple[int, str, int, int], node: str = "n1") -> Placement:
    return Placement(
        pod_uid=UID,
        namespace="default",
        pod="p",
        node=node,
        slices=tuple(
            Slice(
                pod_uid=UID,
                namespace="default",
                pod="p",
                container="main" if index else "setup",
                container_index=index,
                uuid=uuid,
                device_index=int(uuid[-1]),
                memory_mib=mem,
                cores_percent=cores,
            )
            for index, uuid, mem, cores in slices
        ),
        charge=PodCharge(pod_uid=UID),
    )


def test_bind_annotations_are_hamis_keys_and_formats() -> None:
    got = extending.bind_annotations(
        placement((0, "GPU-n1-1", 3000, 30)), containers=1, now_s=1700000000.7
    )
    assert got == {
        "hami.io/vgpu-node": "n1",
        "hami.io/vgpu-devices-allocated": "GPU-n1-1,NVIDIA,3000,30:;",
        "hami.io/vgpu-devices-to-allocate": "GPU-n1-1,NVIDIA,3000,30:;",
        "hami.io/bind-phase": "allocating",
        "hami.io/bind-time": "1700000000",
    }


def test_bind_annotations_have_an_entry_for_every_container_init_first() -> None:
    got = extending.bind_annotations(
        placement((1, "GPU-n1-0", 1000, 10), (1, "GPU-n1-1", 1000, 10)), containers=2, now_s=0
    )
    assert got[keys.VGPU_DEVICES_ALLOCATED] == ";GPU-n1-0,NVIDIA,1000,10:GPU-n1-1,NVIDIA,1000,10:;"


def test_a_gpu_instance_is_told_in_hamis_mig_allocations_annotation() -> None:
    instance = Slice(
        pod_uid=UID, namespace="default", pod="p", container="main", container_index=1,
        uuid="GPU-n1-0", device_index=0, memory_mib=10240, cores_percent=0,
        mig_profile="1g.10gb", mig_start=6, mig_size=2,
    )  # fmt: skip
    sliced = msgspec.structs.replace(instance, uuid="GPU-n1-1", device_index=1, mig_profile="")
    got = extending.bind_annotations(
        Placement(
            pod_uid=UID, namespace="default", pod="p", node="n1", slices=(instance, sliced),
            charge=PodCharge(pod_uid=UID),
        ),
        containers=2,
        now_s=0,
    )  # fmt: skip
    assert json.loads(got[keys.VGPU_MIG_ALLOCATIONS]) == [
        {
            "containerIndex": 1,
            "deviceIndex": 0,
            "gpuUUID": "GPU-n1-0",
            "profile": "1g.10gb",
            "placement": {"start": 6, "size": 2},
        }
    ]
    (back,) = keys.decode_mig_allocations(got[keys.VGPU_MIG_ALLOCATIONS])
    assert (back.profile, back.placement.start, back.mig_uuid, back.gpu_instance_id) == (
        "1g.10gb",
        6,
        "",
        -1,
    )
    assert keys.VGPU_MIG_ALLOCATIONS not in extending.bind_annotations(
        placement((0, "GPU-n1-1", 3000, 30)), containers=1, now_s=0
    )


GOOD_MIG = (
    '{"containerIndex":0,"deviceIndex":0,"gpuUUID":"G","profile":"1g.5gb",'
    '"placement":{"start":0,"size":1}}'
)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("{", "Expected `array`"),
        ("[", "truncated"),
        ('[{"containerIndex": 0}]', "deviceIndex"),
        (
            '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"G","profile":"1g.5gb",'
            '"placement":{"start":8,"size":1}}]',
            "placement.start",
        ),
        (
            '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"G","profile":"x",'
            '"placement":{"start":0,"size":1}}]',
            "profile",
        ),
        ("[" + ",".join([GOOD_MIG] * 300) + "]", "length <= 256"),
        (" " * (70 << 10), "at most 65,536"),
    ],
)
def test_a_malformed_mig_allocations_annotation_is_refused_naming_it(
    value: str, named: str
) -> None:
    with pytest.raises(AnnotationDecodeError) as caught:
        keys.decode_mig_allocations(value)
    assert "hami.io/vgpu-mig-allocations" in str(caught.value)
    assert named in caught.value.reason


def test_bind_annotations_refuse_a_slice_of_a_container_the_pod_does_not_have() -> None:
    with pytest.raises(ValueError, match="container index 1"):
        extending.bind_annotations(placement((1, "GPU-n1-0", 1, 1)), containers=1, now_s=0)


# -- restoring from annotations ----------------------------------------------------------


def bound_pod(allocated: str | None, *, uid: str = UID, node: str = "n1", **kw: Any) -> Any:
    annos = {} if allocated is None else {keys.VGPU_DEVICES_ALLOCATED: allocated}
    return extending.pod_state(pod("p", uid=uid, node=node, annotations=annos, **kw))


def test_a_placement_survives_its_annotations() -> None:
    original = placement((1, "GPU-n1-1", 3000, 30), (1, "GPU-n1-0", 500, 5))
    annos = extending.bind_annotations(original, containers=2, now_s=0)
    state = extending.pod_state(
        pod("p", uid=UID, node="n1", annotations=annos, init_container=True)
    )
    restored = extending.restored_placement(state, registration("n1"))
    assert restored.slices == original.slices
    assert (restored.node, restored.pod_uid) == ("n1", UID)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "missing"),
        ("GPU-n1-0,NVIDIA,3000,30:", "does not end with ';'"),
        ("GPU-n1-0,NVIDIA,lots,30:;", "not a count"),
        ("GPU-n1-0,NVIDIA,3000:;", "not UUID,VENDOR,MEM,CORES"),
        ("GPU-n1-0,NVIDIA,3000,30:;GPU-n1-1,NVIDIA,3000,30:;", "names 2 containers"),
        ("GPU-other-0,NVIDIA,3000,30:;", "not on node n1"),
    ],
)
def test_an_annotation_that_cannot_be_restored_says_why(value: str | None, says: str) -> None:
    with pytest.raises(AnnotationDecodeError) as err:
        extending.restored_placement(bound_pod(value), registration("n1"))
    assert err.value.key == keys.VGPU_DEVICES_ALLOCATED
    assert says in str(err.value)


def test_pod_state_reads_phase_node_and_container_names() -> None:
    state = extending.pod_state(pod("p", uid=UID, node="n3", phase="Running", init_container=True))
    assert (state.node, state.phase, state.containers) == ("n3", "Running", ("setup", "main"))
    assert state.bound and not state.ended
    unbound = extending.pod_state(pod("q", uid=UID))
    assert (unbound.bound, unbound.phase) == (False, "Pending")
    with pytest.raises(ValueError, match="uid"):
        extending.pod_state({"metadata": {"name": "x"}})


def test_kubernetes_uids_are_uuids() -> None:
    assert extending.kubernetes_uid(UID)
    assert not extending.kubernetes_uid("run-0123456789ab")
    assert not extending.kubernetes_uid("p1")


# -- reconcile ---------------------------------------------------------------------------

ALLOC = "GPU-n1-0,NVIDIA,3000,30:;"


def reconcile(
    pods: list[Any],
    ledger: dict[str, str],
    *,
    listed: bool = False,
    since: dict[str, float] | None = None,
    now: float = 100.0,
    busy: tuple[str, ...] = (),
) -> extending.Plan:
    return extending.reconcile(
        pods={p.uid: p for p in pods},
        ledger=ledger,
        registrations={"n1": registration("n1")},
        unbound_since=since or {},
        now=now,
        ttl_s=60.0,
        listed=listed,
        busy=busy,
    )


def released(plan: extending.Plan) -> dict[str, str]:
    return {r.pod_uid: r.cause for r in plan.releases}


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_pod_that_ended_is_released(phase: str) -> None:
    plan = reconcile([bound_pod(ALLOC, phase=phase)], {UID: "n1"})
    assert released(plan) == {UID: "ended"}


def test_a_pod_gone_from_a_fresh_list_is_released_at_once() -> None:
    assert released(reconcile([], {UID: "n1"}, listed=True)) == {UID: "gone"}


def test_a_pod_missing_from_the_watch_is_released_only_after_the_ttl() -> None:
    first = reconcile([], {UID: "n1"}, now=100.0)
    assert released(first) == {} and first.unbound_since == {UID: 100.0}
    later = reconcile([], {UID: "n1"}, since=first.unbound_since, now=159.0)
    assert released(later) == {}
    assert released(reconcile([], {UID: "n1"}, since=first.unbound_since, now=160.0)) == {
        UID: "gone"
    }


def test_a_reservation_not_bound_within_the_ttl_is_released() -> None:
    waiting = extending.pod_state(pod("p", uid=UID))
    assert released(reconcile([waiting], {UID: "n1"}, since={UID: 50.0}, now=100.0)) == {}
    plan = reconcile([waiting], {UID: "n1"}, since={UID: 40.0}, now=100.0)
    assert released(plan) == {UID: "expired"}
    assert "within 60 s" in plan.releases[0].reason


def test_a_bound_pod_keeps_its_slices_and_loses_its_timer() -> None:
    plan = reconcile([bound_pod(ALLOC, phase="Running")], {UID: "n1"}, since={UID: 0.0})
    assert released(plan) == {} and plan.unbound_since == {}


def test_a_pod_being_bound_is_left_alone() -> None:
    plan = reconcile([], {UID: "n1"}, listed=True, busy=(UID,))
    assert released(plan) == {}


def test_pods_placed_over_the_bus_are_not_kubernetes_business() -> None:
    plan = reconcile([], {"run-0123456789ab": "n1", "p1": "n1"}, listed=True)
    assert plan.releases == []


def test_a_bound_pod_the_ledger_lost_is_restored_from_its_annotation() -> None:
    plan = reconcile([bound_pod(ALLOC, phase="Running")], {})
    assert [p.slices[0].uuid for p in plan.restores] == ["GPU-n1-0"]
    assert plan.restores[0].slices[0].memory_mib == 3000


def test_a_bound_pod_with_an_undecodable_annotation_is_held_not_dropped() -> None:
    plan = reconcile([bound_pod("GPU-n1-0,NVIDIA,3000", phase="Running")], {})
    assert plan.restores == []
    assert [h.pod.uid for h in plan.holds] == [UID]
    assert "UndecodableAllocation" in extending.held_reason(plan.holds[0])


def test_an_undecodable_annotation_of_a_pod_in_the_ledger_is_reported_and_kept() -> None:
    plan = reconcile([bound_pod("garbage", phase="Running")], {UID: "n1"})
    assert plan.releases == [] and plan.holds == []
    assert [u.pod.uid for u in plan.undecodable] == [UID]


def test_a_pod_without_allocation_annotations_or_on_an_unknown_node_is_not_restored() -> None:
    plain = bound_pod(None, phase="Running")
    elsewhere = bound_pod(ALLOC, uid=UID2, node="n9", phase="Running")
    plan = reconcile([plain, elsewhere], {})
    assert plan.restores == [] and plan.holds == []
    assert [w.uid for w in plan.waiting] == [UID2]


def test_a_pod_that_ended_is_not_restored() -> None:
    assert reconcile([bound_pod(ALLOC, phase="Succeeded")], {}).restores == []


def test_results_encode_with_msgspec_like_any_bus_message() -> None:
    result = extending.ExtenderBindingResult(error="")
    assert msgspec.json.encode(result) == b"{}"
    assert json.loads(extending.ENCODER.encode(extending.ExtenderBindingResult(error="x"))) == {
        "Error": "x"
    }
