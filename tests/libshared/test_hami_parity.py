"""HAMi's own table-driven tests of the resource model and the annotation codecs, ported
case by case as data.

Each row names the HAMi test function and case (Project-HAMi/HAMi, main). HAMi's
``ContainerDeviceRequest`` results are compared as vslice's ``ContainerRequest``:
``Nums`` -> ``gpu_count``; ``Memreq`` -> ``memory_mib``; ``MemPercentagereq`` (101 =
unset) -> ``memory_percent`` (0 = unset); ``Coresreq`` -> ``cores_percent``; the empty
request -> ``gpu_count == 0``. HAMi's webhook writes ``gpucores: 100`` for a container
asking the whole card before its scheduler reads the request; vslice's model applies that
rule itself, so those rows expect 100 cores where HAMi's request test, run on the
container before the webhook, sees 0.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from libshared import annotations
from libshared.annotations import DeviceGrant
from libshared.devices import Device
from libshared.errors import InvalidRequest
from libshared.resources import ResourceSettings, parse_container, parse_pod

GPU, MEM, PCT, CORES = (
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
)


def _request(
    limits: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
    settings: ResourceSettings | None = None,
) -> tuple[int, int, int, int]:
    spec = {"name": "c", "resources": {"limits": limits or {}, "requests": requests or {}}}
    c = parse_container(spec, index=0, init=False, settings=settings or ResourceSettings())
    if c.gpu_count == 0:
        return (0, 0, 0, 0)
    return (c.gpu_count, c.memory_mib, c.memory_percent, c.cores_percent)


# --- pkg/device/nvidia/device_test.go TestGenerateResourceRequests -------------------------

GENERATE = [
    # (case, limits, requests, (gpus, MiB, percent, cores)); (0, 0, 0, 0) = no request
    ("gpu count only — defaults to 100% memory", {GPU: 1}, {}, (1, 0, 100, 100)),
    ("gpu count + explicit memory", {GPU: 2, MEM: 4096}, {}, (2, 4096, 0, 0)),
    ("gpu count + memory percentage", {GPU: 1, PCT: 50}, {}, (1, 0, 50, 0)),
    (
        "gpu count + memory percentage above 100 — clamped to 100",
        {GPU: 1, PCT: 150},
        {},
        (1, 0, 100, 0),
    ),
    (
        "gpu count + memory percentage beyond int32 range — clamped to 100 without wrapping",
        {GPU: 1, PCT: (1 << 32) + 50},
        {},
        (1, 0, 100, 0),
    ),
    (
        "gpu count + memory percentage equal to sentinel 101 — clamped to 100",
        {GPU: 1, PCT: 101},
        {},
        (1, 0, 100, 0),
    ),
    ("gpu count + explicit cores", {GPU: 1, CORES: 50}, {}, (1, 0, 100, 50)),
    ("no gpu resource — returns empty request", {}, {}, (0, 0, 0, 0)),
    ("gpu in Requests (not Limits) — falls back to Requests", {}, {GPU: 1}, (1, 0, 100, 100)),
    # a percentage of 0 is unset, and present, so the card is not taken as exclusive
    ("gpu count + memory percentage of 0 — treated as unset", {GPU: 1, PCT: 0}, {}, (1, 0, 100, 0)),
    ("memory percentage of 0 in Requests — treated as unset", {}, {GPU: 1, PCT: 0}, (1, 0, 100, 0)),
    ("negative memory percentage — treated as unset", {GPU: 1, PCT: -1}, {}, (1, 0, 100, 0)),
    (
        "memory percentage of 0 + explicit memory — explicit memory wins",
        {GPU: 1, MEM: 2000, PCT: 0},
        {},
        (1, 2000, 0, 0),
    ),
    (
        "byte-scale memory quantity that overflows int32 is rejected",
        {GPU: 1, MEM: "16Gi"},
        {},
        (0, 0, 0, 0),
    ),
    (
        "decimal-form memory request is rejected, not treated as zero",
        {GPU: 1, MEM: "16.0Gi"},
        {},
        (0, 0, 0, 0),
    ),
]


@pytest.mark.parametrize(
    ("case", "limits", "requests", "want"), GENERATE, ids=[r[0] for r in GENERATE]
)
def test_a_container_asks_what_hamis_generate_resource_requests_reads(
    case: str, limits: dict[str, Any], requests: dict[str, Any], want: tuple[int, int, int, int]
) -> None:
    assert _request(limits, requests) == want


def test_default_memory_applies_to_a_gpu_only_container_and_to_an_unset_percentage() -> None:
    """TestGenerateResourceRequests_DefaultMemory: defaultMemory 512 for gpu only, for
    gpumem-percentage 0 and for gpumem 0 alike."""
    settings = ResourceSettings(default_memory_mib=512)
    only = _request({GPU: 1}, settings=settings)
    assert only[1:3] == (512, 0)
    zero_pct = _request({GPU: 1, PCT: 0}, settings=settings)
    zero_mem = _request({GPU: 1, MEM: 0}, settings=settings)
    assert zero_pct[1:3] == zero_mem[1:3] == (512, 0)


# --- pkg/device/nvidia/device_test.go TestMutateAdmissionDefaultsExclusiveCore -------------

EXCLUSIVE = [
    # (case, limits, requests, cores the container gets)
    ("exclusive via percentage", {GPU: 1, PCT: 100}, {}, 100),
    ("exclusive via percentage in requests only", {}, {GPU: 1, PCT: 100}, 100),
    ("non-exclusive percentage", {GPU: 1, PCT: 50}, {}, 0),
    ("no memory fields defaults to exclusive", {GPU: 1}, {}, 100),
    ("explicit cores remains unchanged", {GPU: 1, CORES: 70}, {}, 70),
    ("explicit cores in requests remains unchanged", {}, {GPU: 1, CORES: 55}, 55),
    ("memory size present treated as shareable", {GPU: 1, MEM: 8192}, {}, 0),
]


@pytest.mark.parametrize(
    ("case", "limits", "requests", "cores"), EXCLUSIVE, ids=[r[0] for r in EXCLUSIVE]
)
def test_a_container_asking_the_whole_card_gets_100_cores_as_hamis_webhook_writes(
    case: str, limits: dict[str, Any], requests: dict[str, Any], cores: int
) -> None:
    assert _request(limits, requests)[3] == cores


# --- pkg/device/nvidia/device_test.go Test_MutateAdmission_MemoryPercentageValidation ------


@pytest.mark.parametrize(
    ("case", "pct", "denied"),
    [
        ("percentage of 0 is accepted", 0, False),
        ("percentage of 100 is accepted", 100, False),
        ("percentage of 101 is rejected", 101, True),
        ("percentage above 100 is rejected", 150, True),
    ],
)
def test_admission_checks_the_percentage_as_hamis_webhook_does(
    case: str, pct: int, denied: bool
) -> None:
    spec = {"name": "test", "resources": {"limits": {GPU: 1, PCT: pct}}}
    settings = ResourceSettings()
    if denied:
        with pytest.raises(InvalidRequest) as info:
            parse_container(spec, index=0, init=False, settings=settings, admission=True)
        assert (info.value.container, info.value.field) == ("test", PCT)
    else:
        parse_container(spec, index=0, init=False, settings=settings, admission=True)


# --- pkg/device/devices_test.go: pod devices -------------------------------------------------

U1, U2 = "GPU-8dcd427f-483b-b48f-d7e5-75fb19a52b76", "GPU-ebe7c3f7-303d-558d-435e-99a160631fe4"


def _g(uuid: str, mem: int, cores: int, vendor: str = "NVIDIA") -> DeviceGrant:
    return DeviceGrant(uuid=uuid, vendor=vendor, memory_mib=mem, cores_percent=cores)


POD_DEVICES = [
    # (case, annotation value, decoded entries)
    ("TestPodDevicesCoding: one pod one container use zero device", "", [[]]),
    (
        "TestPodDevicesCoding: one pod one container use one device",
        "UUID1,Type1,1000,30:;",
        [[_g("UUID1", 1000, 30, "Type1")], []],
    ),
    (
        "TestPodDevicesCoding: one pod two container, every container use one device",
        "UUID1,Type1,1000,30:;UUID1,Type1,1000,30:;",
        [[_g("UUID1", 1000, 30, "Type1")], [_g("UUID1", 1000, 30, "Type1")], []],
    ),
    (
        "TestPodDevicesCoding: one pod one container use two devices",
        "UUID1,Type1,1000,30:UUID2,Type1,1000,30:;",
        [[_g("UUID1", 1000, 30, "Type1"), _g("UUID2", 1000, 30, "Type1")], []],
    ),
    (
        "Test_DecodePodDevices: annos having two device",
        f"{U1},NVIDIA,500,3:;{U2},NVIDIA,500,3:;",
        [[_g(U1, 500, 3)], [_g(U2, 500, 3)], []],
    ),
]


@pytest.mark.parametrize(("case", "value", "want"), POD_DEVICES, ids=[r[0] for r in POD_DEVICES])
def test_pod_devices_decode_as_hamis_decode_pod_devices(
    case: str, value: str, want: list[list[DeviceGrant]]
) -> None:
    assert annotations.decode_pod_devices(value) == want


def test_a_device_entry_with_three_fields_is_an_error() -> None:
    """TestDecodePodDevices_BadAnnotation: "uuid,type,100:;" does not decode."""
    with pytest.raises(annotations.AnnotationDecodeError):
        annotations.decode_pod_devices("uuid,type,100:;")


# --- pkg/device/devices_test.go: node devices ------------------------------------------------

UNMARSHAL = [
    (
        "TestUnMarshalNodeDevices: test one",
        '[{"index":1,"id":"id-1","count":1,"devmem":1024,"devcore":10,"type":"type",'
        '"health":true}]\n',
        [
            Device(
                uuid="id-1",
                index=1,
                type="type",
                memory_mib=1024,
                cores_percent=10,
                split_count=1,
                numa=0,
                healthy=True,
                mode="",
            )
        ],
    ),
    (
        "TestUnMarshalNodeDevices: test two",
        '[{"index":1,"id":"id-1","count":1,"devmem":1024,"devcore":10,"type":"type",'
        '"health":true},{"index":2,"id":"id-2","count":2,"devmem":4096,"devcore":20,'
        '"type":"type2","health":false}]',
        [
            Device(
                uuid="id-1",
                index=1,
                type="type",
                memory_mib=1024,
                cores_percent=10,
                split_count=1,
                numa=0,
                healthy=True,
                mode="",
            ),
            Device(
                uuid="id-2",
                index=2,
                type="type2",
                memory_mib=4096,
                cores_percent=20,
                split_count=2,
                numa=0,
                healthy=False,
                mode="",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("case", "value", "want"), UNMARSHAL, ids=[r[0] for r in UNMARSHAL])
def test_node_devices_decode_as_hamis_unmarshal_node_devices(
    case: str, value: str, want: list[Device]
) -> None:
    assert list(annotations.decode_node_devices(value)) == want


@pytest.mark.parametrize(
    ("case", "devices", "want"),
    [
        (
            "TestMarshalNodeDevices: test one",
            [
                Device(
                    uuid="id-1",
                    index=1,
                    type="type",
                    memory_mib=1024,
                    cores_percent=10,
                    split_count=1,
                    mode="",
                )
            ],
            [
                {
                    "index": 1,
                    "id": "id-1",
                    "count": 1,
                    "devmem": 1024,
                    "devcore": 10,
                    "type": "type",
                    "health": True,
                }
            ],
        ),
        (
            "TestMarshalNodeDevices: test multiple",
            [
                Device(
                    uuid="id-1",
                    index=1,
                    type="type",
                    memory_mib=1024,
                    cores_percent=10,
                    split_count=1,
                    mode="",
                ),
                Device(
                    uuid="id-2",
                    index=2,
                    type="type2",
                    memory_mib=2048,
                    cores_percent=20,
                    split_count=2,
                    numa=1,
                    healthy=False,
                    mode="",
                ),
            ],
            [
                {
                    "index": 1,
                    "id": "id-1",
                    "count": 1,
                    "devmem": 1024,
                    "devcore": 10,
                    "type": "type",
                    "health": True,
                },
                {
                    "index": 2,
                    "id": "id-2",
                    "count": 2,
                    "devmem": 2048,
                    "devcore": 20,
                    "type": "type2",
                    "numa": 1,
                },
            ],
        ),
        ("TestMarshalNodeDevices: test empty", [], []),
    ],
)
def test_node_devices_encode_as_hamis_marshal_node_devices(
    case: str, devices: list[Device], want: list[dict[str, Any]]
) -> None:
    # HAMi's test compares the decoded JSON; its encoder leaves zero fields out (omitempty)
    assert json.loads(annotations.encode_node_devices(devices)) == want


def test_pair_scores_decode_as_hamis_decode_pair_scores() -> None:
    """TestGetNodeDevices_PairScores / DecodePairScores: the JSON list of
    ``{"uuid", "score": {uuid: int}}`` per device; a malformed value is an error."""
    value = '[{"uuid":"dev-0","score":{"dev-1":100}},{"uuid":"dev-1","score":{"dev-0":100}}]'
    assert annotations.decode_pair_scores(value) == {
        "dev-0": {"dev-1": 100},
        "dev-1": {"dev-0": 100},
    }
    with pytest.raises(annotations.AnnotationDecodeError):
        annotations.decode_pair_scores("not json")


@pytest.mark.parametrize(
    ("case", "annos", "bound"),
    [
        ("NumaBind=true enforces numa", {"nvidia.com/numa-bind": "true"}, True),
        ("NumaBind=false does not enforce", {"nvidia.com/numa-bind": "false"}, False),
        ("NumaBind invalid value", {"nvidia.com/numa-bind": "notabool"}, False),
        ("NumaBind key absent", {}, False),
    ],
)
def test_numa_bind_reads_as_hamis_assert_numa(
    case: str, annos: dict[str, str], bound: bool
) -> None:
    """TestAssertNuma."""
    pod = {"metadata": {"uid": "u", "annotations": annos}, "spec": {"containers": []}}
    assert parse_pod(pod).numa_bind is bound


# --- pkg/util/device_scoring_weights_test.go TestParseDeviceScoringWeights -----------------

WEIGHTS = [
    ("valid ordered weights", "slot=1,core=2,memory=3", (1, 2, 3), None),
    ("valid reordered weights and whitespace", " memory = 3, slot = 1, core = 0 ", (1, 0, 3), None),
    ("empty annotation", "", None, "expected slot, core, and memory weights"),
    ("missing dimension", "slot=1,memory=3", None, "expected slot, core, and memory weights"),
    ("malformed entry", "slot=1,core,memory=3", None, "expected key=value entries"),
    ("non-integer", "slot=1,core=high,memory=3", None, "'core' weight must be an integer"),
    ("negative", "slot=1,core=-1,memory=3", None, "'core' weight must not be negative"),
    ("unknown key", "slot=1,bandwidth=2,memory=3", None, "unknown weight 'bandwidth'"),
    ("duplicate key", "slot=1,slot=2,memory=3", None, "duplicate 'slot' weight"),
    ("all zero", "slot=0,core=0,memory=0", None, "at least one weight must be positive"),
]


@pytest.mark.parametrize(("case", "value", "want", "error"), WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_device_scoring_weights_parse_as_hamis_parse_device_scoring_weights(
    case: str, value: str, want: tuple[int, int, int] | None, error: str | None
) -> None:
    pod = {
        "metadata": {"uid": "u", "annotations": {"hami.io/device-scoring-weights": value}},
        "spec": {"containers": []},
    }
    if error is None:
        assert parse_pod(pod).device_weights == want
    else:
        with pytest.raises(InvalidRequest) as info:
            parse_pod(pod)
        assert info.value.field == "hami.io/device-scoring-weights"
        assert error in info.value.reason


def test_without_the_weights_annotation_the_weights_are_equal() -> None:
    """TestGetDeviceScoringWeightsByPod: "missing annotation uses defaults"."""
    pod = {"metadata": {"uid": "u"}, "spec": {"containers": []}}
    assert parse_pod(pod).device_weights == (1, 1, 1)
