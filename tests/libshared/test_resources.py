"""The resource model: HAMi's request rules applied to Kubernetes pod specs."""

from __future__ import annotations

from typing import Any

import pytest

from libshared import annotations as keys
from libshared import resources
from libshared.errors import InvalidRequest
from libshared.resources import (
    GPU,
    GPUCORES,
    GPUMEM,
    GPUMEM_PERCENTAGE,
    ContainerRequest,
    PodRequest,
    ResourceSettings,
)

DEFAULTS = ResourceSettings()


def container(
    name: str = "main",
    *,
    limits: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if limits is not None:
        res["limits"] = limits
    if requests is not None:
        res["requests"] = requests
    return {"name": name, "resources": res}


def pod(
    *containers: dict[str, Any],
    init: tuple[dict[str, Any], ...] = (),
    annotations: dict[str, str] | None = None,
    name: str = "p",
    namespace: str = "ns",
    uid: str | None = "uid-1",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid is not None:
        meta["uid"] = uid
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    return {"metadata": meta, "spec": spec}


def one(limits: dict[str, Any], settings: ResourceSettings = DEFAULTS) -> ContainerRequest:
    return resources.parse_container(
        container(limits=limits), index=0, init=False, settings=settings
    )


# --- memory: gpumem, percentage, defaults -----------------------------------------------------


def test_gpumem_wins_over_the_percentage() -> None:
    c = one({GPU: 1, GPUMEM: "3000", GPUMEM_PERCENTAGE: "50"})
    assert (c.memory_mib, c.memory_percent) == (3000, 0)


def test_a_percentage_alone_is_kept_as_a_percentage() -> None:
    c = one({GPU: 1, GPUMEM_PERCENTAGE: "30", GPUCORES: "20"})
    assert (c.memory_mib, c.memory_percent, c.cores_percent) == (0, 30, 20)


@pytest.mark.parametrize(
    ("settings", "memory_mib", "memory_percent"),
    [
        (ResourceSettings(), 0, 100),
        (ResourceSettings(default_memory_mib=2048), 2048, 0),
    ],
)
def test_a_slice_without_memory_gets_the_default_memory_or_the_whole_card(
    settings: ResourceSettings, memory_mib: int, memory_percent: int
) -> None:
    c = one({GPU: 1, GPUCORES: "25"}, settings)
    assert (c.memory_mib, c.memory_percent, c.cores_percent) == (
        memory_mib,
        memory_percent,
        25,
    )


@pytest.mark.parametrize("default_cores", [0, 40])
def test_a_slice_without_cores_gets_the_default_cores(default_cores: int) -> None:
    c = one({GPU: 1, GPUMEM: 1000}, ResourceSettings(default_cores_percent=default_cores))
    assert c.cores_percent == default_cores
    assert not c.exclusive


@pytest.mark.parametrize(
    ("settings", "memory_mib", "memory_percent"),
    [
        (ResourceSettings(), 0, 100),
        # HAMi gives defaultMemory to a gpu-only container too (GenerateResourceRequests,
        # TestGenerateResourceRequests_DefaultMemory); its cores stay exclusive
        (ResourceSettings(default_memory_mib=2048, default_cores_percent=10), 2048, 0),
    ],
)
def test_only_nvidia_gpu_asks_for_exclusive_cards_of_the_default_memory(
    settings: ResourceSettings, memory_mib: int, memory_percent: int
) -> None:
    c = one({GPU: "2"}, settings)
    assert c.gpu_count == 2
    assert (c.memory_mib, c.memory_percent, c.cores_percent) == (
        memory_mib,
        memory_percent,
        100,
    )
    assert c.exclusive


@pytest.mark.parametrize(
    ("limits", "default_gpu_num"),
    [
        ({GPUMEM: "1000"}, 1),
        ({GPUMEM_PERCENTAGE: "20"}, 1),
        ({GPUCORES: "30"}, 1),
        ({GPUMEM: "1000"}, 3),
    ],
)
def test_slice_resources_without_nvidia_gpu_ask_for_the_default_gpu_number(
    limits: dict[str, Any], default_gpu_num: int
) -> None:
    c = one(limits, ResourceSettings(default_gpu_num=default_gpu_num))
    assert c.gpu_count == default_gpu_num


def test_a_container_without_gpu_resources_asks_for_no_gpu() -> None:
    c = one({"cpu": "1", "memory": "1Gi"})
    assert c.gpu_count == 0
    assert (c.memory_mib, c.memory_percent, c.cores_percent) == (0, 0, 0)


def test_zero_gpus_with_slice_resources_asks_for_no_gpu() -> None:
    assert one({GPU: 0, GPUMEM: 1000}).gpu_count == 0


# --- limits before requests -------------------------------------------------------------------


def test_limits_are_read_before_requests() -> None:
    spec = container(
        limits={GPU: "2", GPUMEM: "4000"},
        requests={GPU: "1", GPUMEM: "1000", GPUCORES: "30"},
    )
    c = resources.parse_container(spec, index=0, init=False, settings=DEFAULTS)
    # limits win field by field; a field only in requests is still read
    assert (c.gpu_count, c.memory_mib, c.cores_percent) == (2, 4000, 30)


def test_requests_alone_are_read() -> None:
    spec = container(requests={GPU: "1", GPUMEM_PERCENTAGE: "40", GPUCORES: "40"})
    c = resources.parse_container(spec, index=0, init=False, settings=DEFAULTS)
    assert (c.gpu_count, c.memory_percent, c.cores_percent) == (1, 40, 40)


def test_priority_is_read_as_an_integer() -> None:
    assert one({GPU: 1, resources.PRIORITY: "1"}).priority == 1
    assert one({GPU: 1}).priority is None


# --- memory_on --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "device_mib", "expected"),
    [
        (
            ContainerRequest(name="c", index=0, init=False, gpu_count=1, memory_percent=46),
            16384,
            16384 * 46 // 100,
        ),
        (
            ContainerRequest(name="c", index=0, init=False, gpu_count=1, memory_percent=100),
            16384,
            16384,
        ),
        (
            ContainerRequest(name="c", index=0, init=False, gpu_count=1, memory_mib=3000),
            16384,
            3000,
        ),
        (
            ContainerRequest(name="c", index=0, init=False, gpu_count=1, memory_mib=3000),
            81920,
            3000,
        ),
    ],
)
def test_memory_on_a_card_is_the_fixed_mib_or_the_floored_percentage(
    request_: ContainerRequest, device_mib: int, expected: int
) -> None:
    assert request_.memory_on(device_mib) == expected


def test_forty_six_percent_of_a_16_gib_card_is_7536_mib() -> None:
    c = ContainerRequest(name="c", index=0, init=False, gpu_count=1, memory_percent=46)
    # 16384 * 0.46 = 7536.64, floored as HAMi's integer arithmetic does
    assert c.memory_on(16384) == 7536


# --- container order --------------------------------------------------------------------------


def test_init_containers_come_first_in_index_order() -> None:
    p = resources.parse_pod(
        pod(
            container("app-a", limits={GPU: 1}),
            container("app-b"),
            init=(container("init-a"), container("init-b", limits={GPUMEM: 500})),
        )
    )
    got = [(c.name, c.index, c.init) for c in p.containers]
    assert got == [
        ("init-a", 0, True),
        ("init-b", 1, True),
        ("app-a", 2, False),
        ("app-b", 3, False),
    ]
    assert [c.name for c in p.gpu_containers] == ["init-b", "app-a"]


def test_a_container_without_a_name_is_named_by_its_index() -> None:
    p = resources.parse_pod(
        {"metadata": {"name": "p"}, "spec": {"containers": [{}, {"resources": {}}]}}
    )
    assert [c.name for c in p.containers] == ["container-0", "container-1"]


def test_pod_identity_comes_from_metadata() -> None:
    p = resources.parse_pod(pod(container(), name="web", namespace="team", uid="u-9"))
    assert (p.uid, p.name, p.namespace) == ("u-9", "web", "team")
    q = resources.parse_pod(pod(container(), name="web", namespace="team", uid=None))
    assert q.uid == "team/web"


# --- pod cpu and memory -----------------------------------------------------------------------


def test_pod_cpu_and_memory_are_the_sum_when_containers_ask_more_than_any_init() -> None:
    p = resources.parse_pod(
        pod(
            container("a", requests={"cpu": "500m", "memory": "512Mi"}),
            container("b", requests={"cpu": "1", "memory": "1Gi"}),
            init=(container("i", requests={"cpu": "1", "memory": "1Gi"}),),
        )
    )
    assert (p.cpu_milli, p.memory_mib) == (500 + 1000, 512 + 1024)


def test_pod_cpu_and_memory_are_the_largest_init_container_when_it_asks_more() -> None:
    p = resources.parse_pod(
        pod(
            container("a", requests={"cpu": "100m", "memory": "100Mi"}),
            container("b", requests={"cpu": "200m", "memory": "200Mi"}),
            init=(
                container("i1", requests={"cpu": "2", "memory": "256Mi"}),
                container("i2", requests={"cpu": "1", "memory": "2Gi"}),
            ),
        )
    )
    # each dimension takes its own max: cpu from i1, memory from i2 (not summed over inits)
    assert (p.cpu_milli, p.memory_mib) == (2000, 2048)


@pytest.mark.parametrize(
    ("cpu", "milli"),
    [("1", 1000), ("500m", 500), ("0.1", 100), ("1.5", 1500), (2, 2000), ("0.0001", 1)],
)
def test_cpu_is_read_in_milli_cores_rounded_up(cpu: object, milli: int) -> None:
    assert resources.parse_pod(pod(container(requests={"cpu": cpu}))).cpu_milli == milli


@pytest.mark.parametrize(
    ("memory", "mib"),
    [
        ("1Gi", 1024),
        ("512Mi", 512),
        ("1Mi", 1),
        ("1Ki", 1),
        ("1M", 1),
        (str(2**20 + 1), 2),
        ("1G", -(-(10**9) // 2**20)),
        ("0", 0),
    ],
)
def test_memory_is_read_in_mib_rounded_up_from_bytes(memory: str, mib: int) -> None:
    assert resources.parse_pod(pod(container(requests={"memory": memory}))).memory_mib == mib


def test_cpu_and_memory_fall_back_to_limits_when_not_requested() -> None:
    p = resources.parse_pod(pod(container(limits={"cpu": "2", "memory": "1Gi"})))
    assert (p.cpu_milli, p.memory_mib) == (2000, 1024)


def test_a_pod_without_cpu_or_memory_asks_for_none() -> None:
    p = resources.parse_pod(pod(container(limits={GPU: 1})))
    assert (p.cpu_milli, p.memory_mib) == (0, 0)


# --- selector annotations ---------------------------------------------------------------------


def annotated(annotations: dict[str, str]) -> PodRequest:
    return resources.parse_pod(pod(container(limits={GPU: 1}), annotations=annotations))


def test_gpu_type_lists_are_split_on_commas_and_trimmed() -> None:
    p = annotated({keys.USE_GPUTYPE: " A100, H100 ,", keys.NOUSE_GPUTYPE: "T4"})
    assert p.use_types == ("A100", "H100")
    assert p.nouse_types == ("T4",)


@pytest.mark.parametrize(
    ("use", "nouse", "device_type", "allowed"),
    [
        ("", "", "NVIDIA-Tesla-T4", True),
        ("A100", "", "NVIDIA-A100-SXM4-80GB", True),
        ("a100", "", "NVIDIA-A100-SXM4-80GB", True),
        ("A100", "", "NVIDIA-Tesla-T4", False),
        ("T4,A100", "", "NVIDIA-Tesla-T4", True),
        ("", "t4", "NVIDIA-Tesla-T4", False),
        ("", "T4", "NVIDIA-A100", True),
        ("NVIDIA", "A100", "NVIDIA-A100", False),
        ("A100", "A100", "NVIDIA-A100", False),
    ],
)
def test_gpu_type_selection_is_a_case_insensitive_substring_and_nouse_wins(
    use: str, nouse: str, device_type: str, allowed: bool
) -> None:
    p = annotated({keys.USE_GPUTYPE: use, keys.NOUSE_GPUTYPE: nouse})
    assert p.type_allowed(device_type) is allowed


@pytest.mark.parametrize(
    ("use", "nouse", "uuid", "allowed"),
    [
        ("", "", "GPU-a", True),
        ("GPU-a", "", "GPU-a", True),
        ("GPU-a,GPU-b", "", "GPU-b", True),
        ("GPU-a", "", "GPU-ab", False),
        ("GPU-a", "", "gpu-a", False),
        ("GPU-ab", "", "GPU-a", False),
        ("", "GPU-a", "GPU-a", False),
        ("", "GPU-a", "GPU-b", True),
        ("GPU-a", "GPU-a", "GPU-a", False),
    ],
)
def test_gpu_uuid_selection_is_exact_and_nouse_wins(
    use: str, nouse: str, uuid: str, allowed: bool
) -> None:
    p = annotated({keys.USE_GPUUUID: use, keys.NOUSE_GPUUUID: nouse})
    assert p.uuid_allowed(uuid) is allowed


@pytest.mark.parametrize(
    ("value", "bound"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("t", True),
        # HAMi reads it with Go's strconv.ParseBool: no spaces, no "yes"
        (" TRUE ", False),
        ("false", False),
        ("yes", False),
    ],
)
def test_numa_bind_is_what_go_parse_bool_reads_as_true(value: str, bound: bool) -> None:
    assert annotated({keys.NUMA_BIND: value}).numa_bind is bound


def test_numa_bind_is_off_without_the_annotation() -> None:
    assert annotated({}).numa_bind is False


@pytest.mark.parametrize(
    ("value", "policy"),
    [("binpack", "binpack"), ("spread", "spread"), ("Spread", "spread"), (" BINPACK ", "binpack")],
)
@pytest.mark.parametrize(
    ("key", "attr"),
    [(keys.NODE_SCHEDULER_POLICY, "node_policy"), (keys.GPU_SCHEDULER_POLICY, "gpu_policy")],
)
def test_scheduler_policies_are_binpack_or_spread(
    key: str, attr: str, value: str, policy: str
) -> None:
    assert getattr(annotated({key: value}), attr) == policy


def test_scheduler_policies_are_unset_without_annotations() -> None:
    p = annotated({})
    assert (p.node_policy, p.gpu_policy) == (None, None)


@pytest.mark.parametrize("key", [keys.NODE_SCHEDULER_POLICY, keys.GPU_SCHEDULER_POLICY])
@pytest.mark.parametrize("value", ["fast", "", "bin-pack"])
def test_an_unknown_scheduler_policy_names_the_annotation(key: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        annotated({key: value})
    assert (info.value.container, info.value.field, info.value.value) == ("", key, value)


# --- invalid requests -------------------------------------------------------------------------

EIGHT = ResourceSettings(max_gpus_per_node=8)


@pytest.mark.parametrize(
    ("resources_", "field", "value"),
    [
        ({"limits": {GPU: 1, GPUMEM: "-1"}}, GPUMEM, "-1"),
        ({"limits": {GPU: 1, GPUMEM: "lots"}}, GPUMEM, "lots"),
        ({"limits": {GPU: 1, GPUCORES: "lots"}}, GPUCORES, "lots"),
        ({"limits": {GPU: 1, GPUCORES: "-5"}}, GPUCORES, "-5"),
        ({"limits": {GPU: 1, GPUMEM_PERCENTAGE: "101"}}, GPUMEM_PERCENTAGE, "101"),
        # cores over 100 and a percentage of 0 are no longer here: HAMi accepts them
        # (clamped to 100, unset; tests/libshared/test_hami_parity.py)
        ({"limits": {GPU: "1.5"}}, GPU, "1.5"),
        ({"limits": {GPU: "-1"}}, GPU, "-1"),
        ({"limits": {GPU: True}}, GPU, True),
        ({"limits": {GPU: "9"}}, GPU, "9"),
        ({"requests": {GPU: 9}}, GPU, 9),
        ({"limits": {GPU: 1, resources.PRIORITY: "high"}}, resources.PRIORITY, "high"),
        ({"requests": {"cpu": "-1"}}, "cpu", "-1"),
        ({"requests": {"cpu": "one"}}, "cpu", "one"),
        ({"requests": {"memory": "-1Gi"}}, "memory", "-1Gi"),
        ({"requests": {"memory": "1GB"}}, "memory", "1GB"),
        ("4 GPUs", "resources", "4 GPUs"),
        (["limits"], "resources", ["limits"]),
        ({"limits": ["nvidia.com/gpu"]}, "resources.limits", ["nvidia.com/gpu"]),
        ({"requests": "cpu=1"}, "resources.requests", "cpu=1"),
    ],
)
def test_a_bad_value_names_its_container_field_and_value(
    resources_: object, field: str, value: object
) -> None:
    bad = {"name": "worker", "resources": resources_}
    with pytest.raises(InvalidRequest) as info:
        # admission=True: HAMi's webhook checks (a percentage over 100 is denied there)
        resources.parse_pod(
            pod(container("fine", limits={GPU: 1}), bad), settings=EIGHT, admission=True
        )
    err = info.value
    assert (err.container, err.field, err.value) == ("worker", field, value)
    assert "worker" in str(err)
    assert field in str(err)


@pytest.mark.parametrize("count", ["1", "8"])
def test_gpu_counts_up_to_the_largest_node_are_accepted(count: str) -> None:
    assert one({GPU: count}, EIGHT).gpu_count == int(count)


def test_a_default_gpu_number_over_the_largest_node_is_rejected() -> None:
    settings = ResourceSettings(default_gpu_num=4, max_gpus_per_node=2)
    with pytest.raises(InvalidRequest) as info:
        one({GPUMEM: "1000"}, settings)
    assert (info.value.container, info.value.field, info.value.value) == ("main", GPU, 4)


def test_gpu_counts_are_not_bounded_without_a_largest_node() -> None:
    assert one({GPU: "64"}).gpu_count == 64


@pytest.mark.parametrize(
    ("bad_pod", "field"),
    [
        ("pod", "pod"),
        ({"metadata": ["x"], "spec": {}}, "pod"),
        ({"metadata": {}, "spec": "x"}, "pod"),
        ({"metadata": {"annotations": ["a"]}, "spec": {}}, "metadata.annotations"),
        ({"metadata": {}, "spec": {"containers": {"name": "a"}}}, "spec.containers"),
        ({"metadata": {}, "spec": {"initContainers": "a"}}, "spec.initContainers"),
        ({"metadata": {}, "spec": {"containers": ["a"]}}, "spec.containers"),
    ],
)
def test_a_malformed_pod_names_the_pod_level_field(bad_pod: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resources.parse_pod(bad_pod)
    assert (info.value.container, info.value.field) == ("", field)


@pytest.mark.parametrize(
    "value", ["1e9999999999", float("inf"), float("nan")], ids=["overflow", "inf", "nan"]
)
@pytest.mark.parametrize("field", [GPUMEM, GPUCORES, GPU])
def test_numbers_no_card_can_hold_are_invalid_requests(field: str, value: object) -> None:
    # Webhook bodies are decoded by Python's json, which accepts Infinity and NaN; huge
    # exponents overflow Decimal. Either must surface as InvalidRequest, not a crash.
    limits = {GPU: 1, field: value}
    with pytest.raises(InvalidRequest) as info:
        one(limits)
    assert (info.value.container, info.value.field) == ("main", field)


@pytest.mark.parametrize("field", ["cpu", "memory"])
def test_host_quantities_no_node_can_hold_are_invalid_requests(field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resources.parse_pod(pod(container(requests={field: float("inf")})))
    assert (info.value.container, info.value.field) == ("main", field)
