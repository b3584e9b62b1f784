"""A second vendor (Hygon DCU) through the vendor boundary: parsing, fit, reasons, bind
annotations and restore, table by table (rules of HAMi pkg/device/hygon/device.go)."""

from __future__ import annotations

import pytest

from libshared import annotations as keys
from libshared import vendors
from libshared.devices import Device, NodeDevices
from libshared.errors import AnnotationDecodeError, InvalidRequest
from libshared.events import Placement, Unschedulable
from libshared.resources import ResourceSettings, parse_pod
from services.scheduler.core import extending, fitting
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler

GIB = 1024


def _nvidia(node: str, i: int, mem: int = 16 * GIB, **kw) -> Device:
    return Device(uuid=f"{node}-gpu{i}", index=i, type="NVIDIA-Tesla T4", memory_mib=mem, **kw)


def _dcu(node: str, i: int, mem: int = 32 * GIB, model: str = "Z100", **kw) -> Device:
    return Device(
        uuid=f"{node}-dcu{i}", index=i, type=f"DCU-{model}", memory_mib=mem, vendor="DCU", **kw
    )


def _fleet(*regs: NodeDevices) -> Cluster:
    c = Cluster(max_devices=8)
    for r in regs:
        c.upsert_node(r)
    return c


def _pod(limits: dict, *, annotations: dict | None = None, uid: str = "p", init=None) -> dict:
    spec: dict = {"containers": [{"name": "main", "resources": {"limits": limits}}]}
    if init is not None:
        spec["initContainers"] = [{"name": "init", "resources": {"limits": init}}]
    return {
        "metadata": {"name": uid, "uid": uid, "annotations": annotations or {}},
        "spec": spec,
    }


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "settings", "want"),
    [
        # (count, MiB, percent, cores) of the DCU request, None = asks no DCU
        ({"hygon.com/dcunum": 1}, {}, (1, 0, 100, 100)),
        ({"hygon.com/dcunum": 2, "hygon.com/dcumem": 4000}, {}, (2, 4000, 0, 100)),
        ({"hygon.com/dcunum": 1, "hygon.com/dcucores": 30}, {}, (1, 0, 100, 30)),
        ({"hygon.com/dcunum": 1, "hygon.com/dcucores": 250}, {}, (1, 0, 100, 100)),
        ({"hygon.com/dcunum": 1, "hygon.com/dcumem": 0}, {}, (1, 0, 100, 100)),
        (
            {"hygon.com/dcunum": 1, "hygon.com/dcumem": 1000},
            {"dcu_memory_factor": 4},
            (1, 4000, 0, 100),
        ),
        ({"hygon.com/dcunum": 1, "hygon.com/dcumem": 2**30}, {"dcu_memory_factor": 4}, None),
        ({"hygon.com/dcunum": 1, "hygon.com/dcumem": 2**31}, {}, None),
        ({"hygon.com/dcunum": 0, "hygon.com/dcumem": 1000}, {}, None),
        ({"hygon.com/dcumem": 1000, "hygon.com/dcucores": 10}, {}, None),  # no dcunum
        # NVIDIA's defaults do not reach a DCU request
        (
            {"hygon.com/dcunum": 1, "hygon.com/dcumem": 100},
            {"default_cores_percent": 20},
            (1, 100, 0, 100),
        ),
    ],
)
def test_a_dcu_request_is_parsed_by_hamis_hygon_rules(limits, settings, want):
    pod = parse_pod(_pod(limits), settings=ResourceSettings(**settings))
    dcu = [c for c in pod.gpu_containers if c.vendor == "DCU"]
    if want is None:
        assert dcu == []
        return
    (c,) = dcu
    assert (c.gpu_count, c.memory_mib, c.memory_percent, c.cores_percent) == want
    # asking only DCUs gives no NVIDIA request (no defaultGPUNum from DCU resources)
    assert [c.vendor for c in pod.gpu_containers] == ["DCU"]


def test_the_dcu_count_is_read_from_the_requests_when_the_limits_lack_it():
    pod = {
        "metadata": {"name": "p", "uid": "p"},
        "spec": {
            "containers": [
                {
                    "name": "m",
                    "resources": {"requests": {"hygon.com/dcunum": 1, "hygon.com/dcumem": 512}},
                }
            ]
        },
    }
    (c,) = parse_pod(pod).gpu_containers
    assert (c.vendor, c.gpu_count, c.memory_mib) == ("DCU", 1, 512)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"hygon.com/dcunum": -1}, "hygon.com/dcunum"),
        ({"hygon.com/dcunum": "two"}, "hygon.com/dcunum"),
        ({"hygon.com/dcunum": 1, "hygon.com/dcumem": -5}, "hygon.com/dcumem"),
        ({"hygon.com/dcunum": 1, "hygon.com/dcucores": "1.5"}, "hygon.com/dcucores"),
    ],
)
def test_a_malformed_dcu_request_is_refused_naming_the_field(limits, field):
    with pytest.raises(InvalidRequest) as err:
        parse_pod(_pod(limits))
    assert err.value.field == field
    assert err.value.container == "main"


def test_one_container_may_ask_both_vendors_and_gets_one_request_each_nvidia_first():
    pod = parse_pod(_pod({"hygon.com/dcunum": 1, "nvidia.com/gpu": 1, "nvidia.com/gpumem": 100}))
    assert [(c.vendor, c.index) for c in pod.gpu_containers] == [("NVIDIA", 0), ("DCU", 0)]
    assert pod.vendors == {"NVIDIA", "DCU"}


def test_the_vendor_registry_names_hamis_keys():
    assert vendors.of("DCU").register == "hami.io/node-dcu-register"
    assert vendors.of("DCU").to_allocate == "hami.io/dcu-devices-to-allocate"
    assert vendors.of("NVIDIA").allocated == "hami.io/vgpu-devices-allocated"
    assert set(vendors.DCU.resources) == {
        "hygon.com/dcunum",
        "hygon.com/dcumem",
        "hygon.com/dcucores",
    }
    with pytest.raises(KeyError, match="'ASCEND'"):
        vendors.of("ASCEND")


# -- fit ----------------------------------------------------------------------------------

MIXED = NodeDevices(
    node="mixed", devices=(_nvidia("mixed", 0), _nvidia("mixed", 1), _dcu("mixed", 2))
)
NVIDIA_ONLY = NodeDevices(node="gpus", devices=(_nvidia("gpus", 0), _nvidia("gpus", 1)))
DCU_ONLY = NodeDevices(
    node="dcus", devices=(_dcu("dcus", 0), _dcu("dcus", 1, model="K100", mem=64 * GIB))
)


def test_a_dcu_request_lands_on_a_dcu_and_an_nvidia_request_never_does():
    c = _fleet(NVIDIA_ONLY, DCU_ONLY)
    s = Scheduler(c, policy="hami")
    d = s.decide(parse_pod(_pod({"hygon.com/dcunum": 1, "hygon.com/dcumem": 1000}, uid="d")))
    assert isinstance(d, Placement), d
    assert d.node == "dcus"
    assert [(sl.vendor, sl.uuid.startswith("dcus-dcu")) for sl in d.slices] == [("DCU", True)]
    c.apply(d)
    g = s.decide(parse_pod(_pod({"nvidia.com/gpu": 2, "nvidia.com/gpumem": 1000}, uid="g")))
    assert isinstance(g, Placement), g
    assert g.node == "gpus" and {sl.vendor for sl in g.slices} == {"NVIDIA"}


def test_a_pod_asking_both_vendors_goes_to_the_node_holding_both():
    c = _fleet(NVIDIA_ONLY, DCU_ONLY, MIXED)
    s = Scheduler(c, policy="hami")
    both = parse_pod(
        _pod({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000, "hygon.com/dcunum": 1}, uid="b")
    )
    result = s.filter(both)
    assert result.feasible == ["mixed"]
    assert result.failed["gpus"] == fitting.NODE_INSUFFICIENT_DEVICE  # no DCU there
    assert result.failed["dcus"] == fitting.NODE_INSUFFICIENT_DEVICE  # no NVIDIA GPU there
    d = s.decide(both)
    assert isinstance(d, Placement), d
    assert sorted((sl.vendor, sl.uuid) for sl in d.slices) == [
        ("DCU", "mixed-dcu2"),
        ("NVIDIA", "mixed-gpu1"),
    ]


@pytest.mark.parametrize(
    ("limits", "annotations", "reason"),
    [
        # the node's two NVIDIA GPUs are not counted in a DCU request's reason
        ({"hygon.com/dcunum": 1, "hygon.com/dcumem": 40000}, {}, "1/1 CardInsufficientMemory"),
        ({"hygon.com/dcunum": 2}, {}, fitting.NODE_INSUFFICIENT_DEVICE),
        ({"hygon.com/dcunum": 1}, {"hygon.com/use-dcutype": "K100"}, "1/1 CardTypeMismatch"),
        ({"hygon.com/dcunum": 1}, {"hygon.com/nouse-dcutype": "z100"}, "1/1 CardTypeMismatch"),
        ({"hygon.com/dcunum": 1}, {"hygon.com/use-gpuuuid": "other"}, "1/1 CardUuidMismatch"),
        (
            {"hygon.com/dcunum": 1},
            {"hygon.com/nouse-gpuuuid": "mixed-dcu2"},
            "1/1 CardUuidMismatch",
        ),
        # and a DCU's reason is not an NVIDIA request's
        ({"nvidia.com/gpu": 3, "nvidia.com/gpumem": 10}, {}, fitting.NODE_INSUFFICIENT_DEVICE),
        ({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 20000}, {}, "2/2 CardInsufficientMemory"),
    ],
)
def test_a_nodes_reason_counts_the_requests_vendor_only(limits, annotations, reason):
    c = _fleet(MIXED)
    s = Scheduler(c, policy="hami")
    pod = parse_pod(_pod(limits, annotations=annotations))
    result = s.filter(pod)
    assert result.failed == {"mixed": reason}
    # the exact, container-by-container fit gives the same reason
    assert fitting.fit_node(c, 0, pod, gpu_policy="spread") == (None, reason)


def test_nvidia_selectors_do_not_bind_dcus_nor_dcu_selectors_nvidia_gpus():
    c = _fleet(MIXED)
    s = Scheduler(c, policy="hami")
    annos = {"nvidia.com/use-gputype": "A100", "hygon.com/use-dcutype": "Z100"}
    dcu = s.decide(parse_pod(_pod({"hygon.com/dcunum": 1}, annotations=annos, uid="d")))
    assert isinstance(dcu, Placement), dcu
    gpu = s.decide(parse_pod(_pod({"nvidia.com/gpu": 1}, annotations=annos, uid="g")))
    assert isinstance(gpu, Unschedulable)
    assert gpu.node_reasons == {"mixed": "2/2 CardTypeMismatch"}


def test_numa_bind_does_not_split_a_dcu_request():
    node = NodeDevices(node="n", devices=(_dcu("n", 0, numa=0), _dcu("n", 1, numa=1)))
    c = _fleet(node)
    pod = parse_pod(
        _pod(
            {"hygon.com/dcunum": 2, "hygon.com/dcumem": 10},
            annotations={"nvidia.com/numa-bind": "true"},
        )
    )
    picked, why = fitting.fit_node(c, 0, pod, gpu_policy="spread")
    assert why == "" and sorted(picked[0]) == [0, 1]


def test_a_dcu_without_cores_asked_is_exclusive_and_a_used_dcu_refuses_it():
    c = _fleet(NodeDevices(node="n", devices=(_dcu("n", 0),)))
    s = Scheduler(c, policy="hami")
    first = s.decide(
        parse_pod(
            _pod(
                {"hygon.com/dcunum": 1, "hygon.com/dcumem": 100, "hygon.com/dcucores": 10}, uid="a"
            )
        )
    )
    assert isinstance(first, Placement)
    c.apply(first)
    whole = s.decide(parse_pod(_pod({"hygon.com/dcunum": 1, "hygon.com/dcumem": 100}, uid="b")))
    assert isinstance(whole, Unschedulable)
    assert whole.node_reasons == {"n": "1/1 CardInsufficientCore"}


def test_the_device_score_counts_the_request_on_a_device_typed_exactly_as_its_vendor():
    node = NodeDevices(
        node="n",
        devices=(
            Device(uuid="a", index=0, type="DCU", memory_mib=1000, vendor="DCU"),
            Device(uuid="b", index=1, type="DCU-Z100", memory_mib=1000, vendor="DCU"),
        ),
    )
    c = _fleet(node)
    (req,) = parse_pod(_pod({"hygon.com/dcunum": 1, "hygon.com/dcumem": 500})).gpu_containers
    use = fitting.node_use(c, 0)
    assert fitting.device_score(c, 0, 0, use, req) == pytest.approx(10 * (0.1 + 1 + 0.5))
    assert fitting.device_score(c, 0, 1, use, req) == 0


# -- bind annotations and restore ----------------------------------------------------------


def _placed(
    c: Cluster, limits: dict, uid: str = "11111111-2222-3333-4444-555555555555"
) -> Placement:
    d = Scheduler(c, policy="hami").decide(parse_pod(_pod(limits, uid=uid)))
    assert isinstance(d, Placement), d
    return d


def test_dcu_slices_are_written_to_hamis_dcu_annotations_and_nvidias_to_its_own():
    c = _fleet(MIXED)
    d = _placed(
        c,
        {
            "nvidia.com/gpu": 1,
            "nvidia.com/gpumem": 1000,
            "nvidia.com/gpucores": 20,
            "hygon.com/dcunum": 1,
            "hygon.com/dcumem": 3000,
            "hygon.com/dcucores": 40,
        },
    )
    out = extending.bind_annotations(d, containers=1, now_s=100)
    assert out[keys.DCU_DEVICES_ALLOCATED] == "mixed-dcu2,DCU,3000,40:;"
    assert out[keys.DCU_DEVICES_TO_ALLOCATE] == out[keys.DCU_DEVICES_ALLOCATED]
    assert out[keys.VGPU_DEVICES_ALLOCATED] == "mixed-gpu1,NVIDIA,1000,20:;"
    dcu_only = _placed(
        c,
        {"hygon.com/dcunum": 1, "hygon.com/dcumem": 10},
        uid="22222222-2222-3333-4444-555555555555",
    )
    out = extending.bind_annotations(dcu_only, containers=1, now_s=100)
    assert keys.VGPU_DEVICES_ALLOCATED not in out and keys.VGPU_DEVICES_TO_ALLOCATE not in out
    assert out[keys.DCU_DEVICES_TO_ALLOCATE] == "mixed-dcu2,DCU,10,100:;"


def _bound(annotations: dict, *, limits: dict | None = None) -> extending.PodState:
    obj = _pod(
        limits or {"hygon.com/dcunum": 1},
        annotations=annotations,
        uid="33333333-2222-3333-4444-555555555555",
    )
    obj["spec"]["nodeName"] = "mixed"
    return extending.pod_state(obj)


def _reconciled(state: extending.PodState) -> extending.Plan:
    return extending.reconcile(
        ledger={},
        pods={state.uid: state},
        registrations={"mixed": MIXED},
        busy=set(),
        listed=True,
        now=0.0,
        ttl_s=60.0,
        unbound_since={},
    )


def test_a_bound_dcu_pod_is_restored_from_its_dcu_annotation():
    state = _bound({keys.DCU_DEVICES_ALLOCATED: "mixed-dcu2,DCU,3000,40:;"})
    p = extending.restored_placement(state, MIXED)
    assert [
        (s.vendor, s.uuid, s.memory_mib, s.cores_percent, s.device_index) for s in p.slices
    ] == [("DCU", "mixed-dcu2", 3000, 40, 2)]
    plan = _reconciled(state)
    assert [r.slices for r in plan.restores] == [p.slices]


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        ({keys.DCU_DEVICES_ALLOCATED: "mixed-gpu0,DCU,3000,40:;"}, "is a NVIDIA device"),
        ({keys.VGPU_DEVICES_ALLOCATED: "mixed-dcu2,NVIDIA,3000,40:;"}, "is a DCU device"),
        ({keys.DCU_DEVICES_ALLOCATED: "gone,DCU,3000,40:;"}, "is not on node"),
        ({keys.DCU_DEVICES_ALLOCATED: "mixed-dcu2,DCU,x,40:;"}, "memory 'x' is not a count"),
    ],
)
def test_a_dcu_annotation_naming_a_wrong_device_is_held_not_restored(annotations, reason):
    state = _bound(annotations)
    with pytest.raises(AnnotationDecodeError, match=reason):
        extending.restored_placement(state, MIXED)
    plan = _reconciled(state)
    assert plan.restores == [] and len(plan.holds) == 1


def test_a_registered_dcu_annotation_decodes_to_dcu_devices():
    value = keys.encode_node_devices(DCU_ONLY.devices)
    got = keys.decode_node_devices(value, key=keys.NODE_DCU_REGISTER, vendor="DCU")
    assert [(d.uuid, d.type, d.vendor, d.memory_mib) for d in got] == [
        ("dcus-dcu0", "DCU-Z100", "DCU", 32 * GIB),
        ("dcus-dcu1", "DCU-K100", "DCU", 64 * GIB),
    ]
    with pytest.raises(AnnotationDecodeError) as err:
        keys.decode_node_devices('[{"index": 0}]', key=keys.NODE_DCU_REGISTER, vendor="DCU")
    assert err.value.key == keys.NODE_DCU_REGISTER
