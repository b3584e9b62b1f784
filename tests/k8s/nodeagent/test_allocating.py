"""The device plugin's pure decisions: replicas, candidates, the Allocate match, the
annotation progress, the container's response and the preferred replicas."""

from __future__ import annotations

from typing import Any

import pytest

from libshared import annotations as keys
from libshared import events
from libshared.devices import Device
from libshared.ledgers import NodeLedger, PodCharge, Slice
from services.nodeagent.core import allocating, preparing
from tests.k8s.nodeagent.pods import bound_pod

NODE = "node-a"
G0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
G1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
DEVICES = (
    Device(uuid=G0, index=0, type="T", memory_mib=16384, split_count=3, numa=0),
    Device(uuid=G1, index=1, type="T", memory_mib=16384, split_count=3, numa=1, healthy=False),
)


def pending(*pods: dict[str, Any]) -> list[allocating.PendingPod]:
    found, problems = allocating.candidates(pods, node=NODE)
    assert problems == []
    return found


def test_every_gpu_is_advertised_split_count_times_with_its_health_and_numa() -> None:
    reps = allocating.replicas(DEVICES)
    assert [r.id for r in reps] == [
        f"{G0}-0",
        f"{G0}-1",
        f"{G0}-2",
        f"{G1}-0",
        f"{G1}-1",
        f"{G1}-2",
    ]
    assert [r.healthy for r in reps] == [True] * 3 + [False] * 3
    assert {r.numa for r in reps if r.uuid == G1} == {1}


@pytest.mark.parametrize(
    ("device_id", "uuid"),
    [
        (f"{G0}-7", G0),
        (f"{G0}-12", G0),
        ("GPU-x", None),  # no replica number
        ("-3", None),  # no UUID
        ("GPU-1f-x2", None),  # the replica number is decimal
        ("nonsense", None),
    ],
)
def test_a_replica_id_names_its_gpu(device_id: str, uuid: str | None) -> None:
    assert allocating.replica_uuid(device_id) == uuid


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"spec": {"nodeName": "node-b"}}, "bound to another node"),
        ({"metadata": {"annotations": {keys.BIND_PHASE: "success"}}}, "allocated already"),
        ({"metadata": {"annotations": {keys.BIND_PHASE: "failed"}}}, "failed"),
        ({"metadata": {"deletionTimestamp": "2024-01-01T00:00:09Z"}}, "being deleted"),
        ({"status": {"phase": "Failed"}}, "ended"),
        ({"metadata": {"annotations": {keys.VGPU_DEVICES_TO_ALLOCATE: ";"}}}, "nothing left"),
    ],
)
def test_pods_that_do_not_wait_for_devices_here_are_no_candidates(
    change: dict[str, Any], why: str
) -> None:
    pod = bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]])
    for part, values in change.items():
        for k, v in values.items():
            if k == "annotations":
                pod[part][k].update(v)
            else:
                pod[part][k] = v
    assert allocating.candidates([pod], node=NODE) == ([], []), why


@pytest.mark.parametrize(
    ("annotations", "init", "message"),
    [
        ({keys.VGPU_DEVICES_TO_ALLOCATE: f"{G0},NVIDIA,lots,30:;"}, 0, "not a count"),
        # empty entries past the containers are HAMi's trailing entry and are dropped;
        # an entry holding devices past them is not
        (
            {keys.VGPU_DEVICES_TO_ALLOCATE: f"{G0},NVIDIA,3000,30:;{G0},NVIDIA,1,1:;"},
            0,
            "2 container entries",
        ),
        ({keys.VGPU_NODE: "node-b"}, 0, "hami.io/vgpu-node='node-b'"),
    ],
)
def test_unreadable_pods_are_reported_never_taken(
    annotations: dict[str, str], init: int, message: str
) -> None:
    pod = bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]], init_containers=init)
    pod["metadata"]["annotations"].update(annotations)
    found, problems = allocating.candidates([pod], node=NODE)
    assert found == []
    assert len(problems) == 1 and message in problems[0], problems


def test_entries_align_with_init_containers_first_or_regular_containers_only() -> None:
    with_init = bound_pod("a", node=NODE, containers=[[(G0, 3000, 30)]], init_containers=2)
    [p] = pending(with_init)
    assert p.next_entry() == 2 and p.containers[2].name == "c0"
    regular_only = bound_pod("b", node=NODE, containers=[[(G0, 3000, 30)]], init_containers=2)
    regular_only["metadata"]["annotations"][keys.VGPU_DEVICES_TO_ALLOCATE] = (
        f"{G0},NVIDIA,3000,30:;"
    )
    [q] = pending(regular_only)
    assert q.next_entry() == 0 and q.containers[0].name == "c0" and not q.containers[0].init


def test_allocate_takes_the_pod_whose_gpus_the_request_names_before_the_bind_order() -> None:
    first = bound_pod("first", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=100)
    second = bound_pod("second", node=NODE, containers=[[(G1, 5000, 50)]], bind_time=200)
    # HAMi #3076's shape: kubelet admits the second-bound pod first
    m = allocating.choose([f"{G1}-2"], pending(first, second))
    assert (m.pod.name, m.uuid_hits, m.ambiguous) == ("second", 1, False)
    assert m.grants[0].memory_mib == 5000
    m = allocating.choose([f"{G0}-0"], pending(first, second))
    assert m.pod.name == "first"


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        ({"bind_time": 100}, {"bind_time": 200}, "a"),
        ({"bind_time": 300}, {"bind_time": 200}, "b"),
        ({"bind_time": 100, "created": "2024-01-01T00:00:05Z"}, {"bind_time": 100}, "b"),
        ({"bind_time": None}, {"bind_time": 900}, "b"),  # a bind time beats none
    ],
)
def test_pods_the_request_cannot_tell_apart_go_by_bind_time_then_creation(
    a: dict[str, Any], b: dict[str, Any], winner: str
) -> None:
    pods = pending(
        bound_pod("a", node=NODE, containers=[[(G0, 3000, 30)]], **a),
        bound_pod("b", node=NODE, containers=[[(G0, 4000, 30)]], **b),
    )
    m = allocating.choose([f"{G0}-1"], pods)
    assert m.pod.name == winner and m.ambiguous


def test_only_pods_waiting_for_as_many_devices_as_the_request_are_candidates() -> None:
    one = bound_pod("one", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=1)
    two = bound_pod("two", node=NODE, containers=[[(G0, 1000, 10), (G1, 1000, 10)]], bind_time=2)
    m = allocating.choose([f"{G0}-0", f"{G0}-1"], pending(one, two))
    assert m.pod.name == "two" and not m.ambiguous
    with pytest.raises(allocating.NoCandidate, match=r"for 3 nvidia.com/gpu.*\[1, 2\]"):
        allocating.choose(["x-0", "x-1", "x-2"], pending(one, two))
    with pytest.raises(allocating.NoCandidate, match="pending pods: 0"):
        allocating.choose([f"{G0}-0"], [])


def test_containers_are_allocated_in_order_and_the_last_one_marks_success() -> None:
    pod = bound_pod("p", node=NODE, containers=[[(G0, 1000, 10)], [], [(G1, 2000, 20)]])
    [p] = pending(pod)
    m = allocating.choose([f"{G0}-0"], [p])
    assert (m.entry, m.container.name) == (0, "c0")
    p = p.consumed(m.entry)
    patch = allocating.progress_annotations(p)
    assert patch == {keys.VGPU_DEVICES_TO_ALLOCATE: f";;{G1},NVIDIA,2000,20:;"}
    m = allocating.choose([f"{G1}-0"], [p])
    assert (m.entry, m.container.name) == (2, "c2")
    assert allocating.progress_annotations(p.consumed(m.entry)) == {
        keys.BIND_PHASE: "success",
        keys.VGPU_DEVICES_TO_ALLOCATE: None,
    }
    assert allocating.failed_annotations() == {keys.BIND_PHASE: "failed"}


def test_the_matched_container_becomes_slices_on_this_nodes_gpus() -> None:
    pod = bound_pod("p", node=NODE, containers=[[(G1, 3000, 30)]])
    pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/priority"] = 1
    m = allocating.choose([f"{G1}-0"], pending(pod))
    [s] = allocating.container_slices(m, DEVICES)
    assert (s.uuid, s.device_index, s.memory_mib, s.cores_percent) == (G1, 1, 3000, 30)
    assert (s.pod_uid, s.container, s.container_index, s.priority) == ("uid-p", "c0", 0, 1)
    with pytest.raises(ValueError, match=f"GPU {G1} is not on this node"):
        allocating.container_slices(m, DEVICES[:1])


def _response(*, disable: bool, mock: bool) -> allocating.ContainerResponse:
    pod = bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]])
    m = allocating.choose([f"{G0}-0"], pending(pod))
    driver = preparing.MockDriver(library_dir="/opt/mock", state="/h/mock.state", devices="x")
    layout = preparing.Layout(root="/h", libvgpu="/h/lib/libvgpu.so", mock=driver if mock else None)
    placement = events.Placement(
        pod_uid=m.pod.uid,
        namespace=m.pod.namespace,
        pod=m.pod.name,
        node=NODE,
        slices=allocating.container_slices(m, DEVICES),
        charge=PodCharge(pod_uid=m.pod.uid),
    )
    [plan] = preparing.plan(placement, layout)
    return allocating.container_response(
        plan,
        layout=layout,
        libvgpu="/h/lib/libvgpu-abc.so",
        preload="/h/lib/ld.so.preload",
        disable_control=disable,
    )


def test_a_container_gets_its_limits_and_libvgpu_through_ld_so_preload() -> None:
    r = _response(disable=False, mock=False)
    assert r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    assert r.envs["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert r.envs["CUDA_VISIBLE_DEVICES"] == r.envs["NVIDIA_VISIBLE_DEVICES"] == G0
    assert r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"] == "/usr/local/vslice/cache/vgpu.cache"
    assert "LD_PRELOAD" not in r.envs
    mounts = {m.container_path: (m.host_path, m.read_only) for m in r.mounts}
    assert mounts == {
        "/usr/local/vslice/libvgpu.so": ("/h/lib/libvgpu-abc.so", True),
        "/usr/local/vslice/cache": ("/h/containers/uid-p_c0", False),
        "/etc/ld.so.preload": ("/h/lib/ld.so.preload", True),
    }
    assert allocating.preload_text() == "/usr/local/vslice/libvgpu.so\n"


def test_cuda_disable_control_leaves_out_ld_so_preload_and_mock_gpus_bring_their_driver() -> None:
    r = _response(disable=True, mock=True)
    paths = {m.container_path for m in r.mounts}
    assert "/etc/ld.so.preload" not in paths
    assert {"/usr/local/vslice/mockgpu", "/usr/local/vslice/mockgpu.state"} <= paths
    assert r.envs["LD_LIBRARY_PATH"] == "/usr/local/vslice/mockgpu"
    assert r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"


def test_a_pod_env_with_cuda_disable_control_true_is_read_per_container() -> None:
    pod = bound_pod(
        "p", node=NODE, containers=[[(G0, 3000, 30)]], env={"CUDA_DISABLE_CONTROL": "True"}
    )
    [p] = pending(pod)
    assert p.containers[0].disable_control
    [q] = pending(bound_pod("q", node=NODE, containers=[[(G0, 3000, 30)]], env={"X": "true"}))
    assert not q.containers[0].disable_control


def _ids(uuid: str, n: int) -> list[str]:
    return [f"{uuid}-{i}" for i in range(n)]


def test_preferred_replicas_are_on_the_expected_gpus_then_spread() -> None:
    available = _ids(G0, 3) + _ids(G1, 3)
    got = allocating.preferred(available=available, must_include=[], size=1, wanted=[G1])
    assert got == [f"{G1}-0"]
    # two GPUs asked, nothing expected: two different GPUs, not two replicas of one
    got = allocating.preferred(available=available, must_include=[], size=2)
    assert {allocating.replica_uuid(d) for d in got} == {G0, G1}
    # spread: the GPU with the most free replicas first
    got = allocating.preferred(available=[f"{G0}-2", *_ids(G1, 3)], must_include=[], size=1)
    assert got == [f"{G1}-0"]
    # what kubelet must include stays, and counts towards the expected GPUs
    got = allocating.preferred(
        available=available, must_include=[f"{G0}-2"], size=2, wanted=[G0, G1]
    )
    assert got == [f"{G0}-2", f"{G1}-0"]


def test_get_preferred_allocation_expects_the_pod_allocate_would_take() -> None:
    a = bound_pod("a", node=NODE, containers=[[(G1, 3000, 30)]], bind_time=100)
    b = bound_pod("b", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=200)
    assert allocating.expected_uuids(pending(a, b), 1) == [G1]
    assert allocating.expected_uuids(pending(a, b), 2) == []


def _slice(uid: str, uuid: str, mib: int, cores: int) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="default",
        pod="p",
        container="c0",
        container_index=0,
        uuid=uuid,
        device_index=0,
        memory_mib=mib,
        cores_percent=cores,
    )


def test_a_pod_whose_annotation_the_ledger_does_not_hold_is_refused() -> None:
    [p] = pending(bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]]))
    held = NodeLedger(node=NODE, slices=(_slice("uid-p", G0, 3000, 30),))
    assert allocating.ledger_disagrees(p, held) is None
    bigger = NodeLedger(node=NODE, slices=(_slice("uid-p", G0, 1000, 30),))
    reason = allocating.ledger_disagrees(p, bigger)
    assert reason is not None and "3000 MiB 30 % not in the ledger" in reason
    assert allocating.ledger_disagrees(p, None) is not None
    other = NodeLedger(node=NODE, slices=(_slice("uid-q", G0, 3000, 30),))
    assert allocating.ledger_disagrees(p, other) is not None


def test_an_object_not_shaped_like_a_pod_is_a_problem_not_a_crash() -> None:
    good = bound_pod("good", node=NODE, containers=[[(G0, 3000, 30)]])
    odd = bound_pod("odd", node=NODE, containers=[[(G0, 3000, 30)]])
    odd["spec"]["containers"] = [["not", "a", "container"]]
    found, problems = allocating.candidates([{"metadata": ["x"]}, odd, good], node=NODE)
    assert [p.name for p in found] == ["good"]
    assert len(problems) == 2
    assert problems[0].startswith("malformed pod object")
    assert problems[1] == "pod default/odd: spec.containers: an entry is not an object"
