"""HAMi's annotation codecs: exact formats, exact round trips, strict decoding."""

from __future__ import annotations

import json

import pytest

from libshared import annotations
from libshared.annotations import DeviceGrant
from libshared.devices import Device
from libshared.errors import AnnotationDecodeError


def grant(uuid: str, memory_mib: int = 1000, cores_percent: int = 10) -> DeviceGrant:
    return DeviceGrant(
        uuid=uuid, vendor="NVIDIA", memory_mib=memory_mib, cores_percent=cores_percent
    )


# --- pod devices: format ----------------------------------------------------------------------

POD_TABLE = [
    pytest.param([], "", id="empty-pod"),
    pytest.param([[]], ";", id="one-container-without-devices"),
    pytest.param(
        [[grant("GPU-a", 4000, 30)], []],
        "GPU-a,NVIDIA,4000,30:;;",
        id="hami-docstring-example",
    ),
    pytest.param(
        [[grant("GPU-a", 4000, 30), grant("GPU-b", 8000, 0)]],
        "GPU-a,NVIDIA,4000,30:GPU-b,NVIDIA,8000,0:;",
        id="one-container-two-devices",
    ),
    pytest.param(
        [[], [grant("GPU-c", 16384, 100)]],
        ";GPU-c,NVIDIA,16384,100:;",
        id="init-without-devices-then-container-with-one",
    ),
    pytest.param(
        [
            [grant("GPU-a", 1, 1)],
            [grant("GPU-b", 2, 2), grant("GPU-c", 3, 3)],
            [grant("GPU-a", 0, 0)],
        ],
        "GPU-a,NVIDIA,1,1:;GPU-b,NVIDIA,2,2:GPU-c,NVIDIA,3,3:;GPU-a,NVIDIA,0,0:;",
        id="three-containers",
    ),
]


@pytest.mark.parametrize(("containers", "text"), POD_TABLE)
def test_pod_devices_encode_as_uuid_vendor_mem_cores_and_a_semicolon_per_container(
    containers: list[list[DeviceGrant]], text: str
) -> None:
    assert annotations.encode_pod_devices(containers) == text


@pytest.mark.parametrize(("containers", "text"), POD_TABLE)
def test_pod_devices_decode_the_hami_format(containers: list[list[DeviceGrant]], text: str) -> None:
    # HAMi keeps the empty entry after the final ';' (DecodePodDevices, TestPodDevicesCoding)
    assert annotations.decode_pod_devices(text) == [*containers, []]


@pytest.mark.parametrize(("containers", "text"), POD_TABLE)
def test_pod_devices_round_trip_exactly(containers: list[list[DeviceGrant]], text: str) -> None:
    n = len(containers)
    decoded = annotations.decode_pod_devices(annotations.encode_pod_devices(containers))
    assert annotations.container_entries(decoded, n) == containers
    again = annotations.container_entries(annotations.decode_pod_devices(text), n)
    assert annotations.encode_pod_devices(again) == text


def test_every_container_gets_a_semicolon_even_without_devices() -> None:
    n = 5
    text = annotations.encode_pod_devices([[] for _ in range(n)])
    assert text == ";" * n
    decoded = annotations.decode_pod_devices(text)
    assert len(decoded) == n + 1  # HAMi's entry after the final ';'
    assert len(annotations.container_entries(decoded, n)) == n


def test_the_vendor_is_kept_as_given() -> None:
    g = DeviceGrant(uuid="GPU-x", vendor="Hygon", memory_mib=5, cores_percent=6)
    assert annotations.encode_pod_devices([[g]]) == "GPU-x,Hygon,5,6:;"
    assert annotations.decode_pod_devices("GPU-x,Hygon,5,6:;") == [[g], []]


def test_surplus_entries_that_hold_devices_are_never_dropped() -> None:
    decoded = annotations.decode_pod_devices("GPU-a,NVIDIA,1,1:;GPU-b,NVIDIA,1,1:;")
    assert len(annotations.container_entries(decoded, 1)) == 2


@pytest.mark.parametrize(
    ("uuid", "vendor"),
    [
        ("", "NVIDIA"),
        ("GPU-a", ""),
        ("GPU,a", "NVIDIA"),
        ("GPU:a", "NVIDIA"),
        ("GPU;a", "NVIDIA"),
        ("GPU-a", "NV,IDIA"),
    ],
)
def test_encoding_refuses_empty_fields_and_separators(uuid: str, vendor: str) -> None:
    g = DeviceGrant(uuid=uuid, vendor=vendor, memory_mib=1, cores_percent=1)
    with pytest.raises(ValueError):
        annotations.encode_pod_devices([[g]])


# --- pod devices: strict decoding -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("GPU-a,NVIDIA,4000,30:", id="missing-trailing-semicolon"),
        pytest.param("GPU-a,NVIDIA,4000,30:;GPU-b,NVIDIA,1,1:", id="last-container-unterminated"),
        pytest.param("GPU-a,NVIDIA,4000:;", id="three-fields"),
        pytest.param("GPU-a,NVIDIA,4000,30,1:;", id="five-fields"),
        pytest.param("GPU-a,NVIDIA,lots,30:;", id="non-numeric-memory"),
        pytest.param("GPU-a,NVIDIA,4000,-1:;", id="negative-cores"),
        pytest.param("GPU-a,NVIDIA,-4000,1:;", id="negative-memory"),
        pytest.param("GPU-a,NVIDIA,4000,:;", id="empty-cores"),
        pytest.param("GPU-a,NVIDIA,4000,30;", id="missing-colon-terminator"),
        pytest.param("GPU-a,NVIDIA,1,1:GPU-b,NVIDIA,1,1;", id="second-device-unterminated"),
        pytest.param(",NVIDIA,4000,30:;", id="empty-uuid"),
        pytest.param("GPU-a,,4000,30:;", id="empty-vendor"),
        pytest.param("GPU-a,NVIDIA,1,1::;", id="empty-device-entry"),
        pytest.param(":;", id="only-a-colon"),
        pytest.param("GPU-a,NVIDIA,4.5,30:;", id="fractional-memory"),
        pytest.param("GPU-a,NVIDIA,\u00b2,30:;", id="superscript-digit-memory"),
        pytest.param("garbage", id="garbage"),
    ],
)
def test_a_malformed_pod_devices_value_raises_instead_of_dropping_devices(value: str) -> None:
    key = annotations.VGPU_DEVICES_TO_ALLOCATE
    with pytest.raises(AnnotationDecodeError) as info:
        annotations.decode_pod_devices(value, key=key)
    assert (info.value.key, info.value.value) == (key, value)


def test_the_default_key_is_devices_allocated() -> None:
    with pytest.raises(AnnotationDecodeError) as info:
        annotations.decode_pod_devices("x")
    assert info.value.key == annotations.VGPU_DEVICES_ALLOCATED


# --- node devices -----------------------------------------------------------------------------

NODE_TABLE = [
    pytest.param((), id="no-devices"),
    pytest.param(
        (Device(uuid="GPU-0", index=0, type="NVIDIA-A100", memory_mib=40960),),
        id="one-default-device",
    ),
    pytest.param(
        (
            Device(
                uuid="GPU-0",
                index=0,
                type="NVIDIA-Tesla-T4",
                memory_mib=15360,
                cores_percent=100,
                split_count=10,
                numa=0,
                healthy=True,
                mode="hami-core",
            ),
            Device(
                uuid="GPU-1",
                index=1,
                type="NVIDIA-Tesla-T4",
                memory_mib=30720,
                cores_percent=200,
                split_count=4,
                numa=1,
                healthy=False,
                mode="mig",
            ),
        ),
        id="two-devices-every-field-set",
    ),
]


@pytest.mark.parametrize("devices", NODE_TABLE)
def test_node_devices_round_trip_exactly(devices: tuple[Device, ...]) -> None:
    assert annotations.decode_node_devices(annotations.encode_node_devices(devices)) == devices


@pytest.mark.parametrize("devices", NODE_TABLE)
def test_node_devices_accept_a_list_as_well_as_a_tuple(devices: tuple[Device, ...]) -> None:
    assert annotations.encode_node_devices(list(devices)) == annotations.encode_node_devices(
        devices
    )


def test_node_devices_use_hamis_json_keys_in_hamis_order() -> None:
    d = Device(
        uuid="GPU-7",
        index=3,
        type="NVIDIA-H100",
        memory_mib=81559,
        cores_percent=100,
        split_count=8,
        numa=1,
        healthy=True,
        mode="hami-core",
    )
    (entry,) = json.loads(annotations.encode_node_devices((d,)))
    assert list(entry) == [
        "id",
        "index",
        "count",
        "devmem",
        "devcore",
        "type",
        "numa",
        "mode",
        "health",
    ]
    assert entry == {
        "id": "GPU-7",
        "index": 3,
        "count": 8,
        "devmem": 81559,
        "devcore": 100,
        "type": "NVIDIA-H100",
        "numa": 1,
        "mode": "hami-core",
        "health": True,
    }


def test_node_devices_leave_out_zero_fields_as_hami_does() -> None:
    # HAMi's DeviceInfo fields are all omitempty (TestMarshalNodeDevices)
    d = Device(uuid="GPU-0", index=0, type="NVIDIA-T4", memory_mib=15360, numa=0, healthy=False)
    (entry,) = json.loads(annotations.encode_node_devices((d,)))
    assert entry == {
        "id": "GPU-0",
        "count": 10,
        "devmem": 15360,
        "devcore": 100,
        "type": "NVIDIA-T4",
        "mode": "hami-core",
    }


@pytest.mark.parametrize(
    ("missing", "field", "zero"),
    [
        ("numa", "numa", 0),
        ("index", "index", 0),
        ("mode", "mode", ""),
        ("health", "healthy", False),
        ("devmem", "memory_mib", 0),
        ("count", "split_count", 0),
        ("devcore", "cores_percent", 0),
        ("type", "type", ""),
    ],
)
def test_a_field_hami_left_out_reads_as_its_zero_value(
    missing: str, field: str, zero: object
) -> None:
    (device,) = annotations.decode_node_devices(json.dumps([_without(missing)]))
    assert getattr(device, field) == zero


def test_fields_vslice_does_not_know_are_ignored() -> None:
    extra = _entry(devicevendor="NVIDIA", migProfiles=[{"name": "1g.10gb"}], custominfo={})
    (device,) = annotations.decode_node_devices(json.dumps([extra]))
    assert device.uuid == "GPU-x"


def test_node_devices_decode_json_written_by_hami() -> None:
    value = json.dumps(
        [
            {
                "id": "GPU-x",
                "index": 0,
                "count": 10,
                "devmem": 24576,
                "devcore": 100,
                "type": "NVIDIA-A10",
                "numa": 0,
                "mode": "hami-core",
                "health": True,
            }
        ]
    )
    assert annotations.decode_node_devices(value) == (
        Device(uuid="GPU-x", index=0, type="NVIDIA-A10", memory_mib=24576, split_count=10),
    )


def _entry(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "GPU-x",
        "index": 0,
        "count": 10,
        "devmem": 24576,
        "devcore": 100,
        "type": "NVIDIA-A10",
        "numa": 0,
        "mode": "hami-core",
        "health": True,
    }
    base.update(changes)
    return base


def _without(field: str) -> dict[str, object]:
    e = _entry()
    del e[field]
    return e


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("[{", id="truncated-json"),
        pytest.param("not json", id="not-json"),
        pytest.param("{}", id="object-not-list"),
        pytest.param("null", id="null"),
        # a missing devmem or health is HAMi's omitempty zero, no longer an error
        # (test_a_field_hami_left_out_reads_as_its_zero_value); a missing id still is
        pytest.param(json.dumps([_without("id")]), id="missing-id"),
        pytest.param(json.dumps([_entry(devmem="24576")]), id="string-devmem"),
        pytest.param(json.dumps([_entry(count="10")]), id="string-count"),
        pytest.param(json.dumps([_entry(index=1.5)]), id="float-index"),
        pytest.param(json.dumps([_entry(devmem=-1)]), id="negative-devmem"),
        pytest.param(json.dumps([_entry(devcore=-100)]), id="negative-devcore"),
        pytest.param(json.dumps([_entry(count=-1)]), id="negative-count"),
        pytest.param(json.dumps([_entry(index=-1)]), id="negative-index"),
        pytest.param(json.dumps([_entry(id="")]), id="empty-id"),
        pytest.param(json.dumps([_entry(), _entry(id="GPU-y", devmem=-5)]), id="second-bad"),
    ],
)
def test_a_malformed_node_register_value_raises_instead_of_guessing_capacity(value: str) -> None:
    with pytest.raises(AnnotationDecodeError) as info:
        annotations.decode_node_devices(value)
    assert (info.value.key, info.value.value) == (annotations.NODE_NVIDIA_REGISTER, value)
