"""The device list strategies: each names a container's GPUs to the runtime the way HAMi's
NVIDIA device plugin does (``plugin/server.go`` ``getAllocateResponse``), device specs only
when asked for and never with CDI alone, and bad settings refused naming the field."""

from __future__ import annotations

import pytest

from services.nodeagent.core import devicelists

G0 = "GPU-0a1b2c3d-0000-4000-8000-0000000000a0"
G1 = "GPU-0a1b2c3d-0000-4000-8000-0000000000a1"
RID = "3f1c2a9e-5b7d-4c1e-9a2f-0e6d8b4c7a15"
CDI_KEY = f"cdi.k8s.io/nvidia-device-plugin_{RID}"
CDI_VALUE = f"nvidia.com/gpu={G0},nvidia.com/gpu={G1}"
MOUNTS = (
    (f"/var/run/nvidia-container-devices/{G0}", "/dev/null", False),
    (f"/var/run/nvidia-container-devices/{G1}", "/dev/null", False),
)
MINORS = {G0: 0, G1: 3}
ALL_CONTROL = frozenset(devicelists.CONTROL_NODES)


def _parts(
    strategies: tuple[str, ...],
    *,
    specs: bool = False,
    dev_root: str = "/",
    present: frozenset[str] = ALL_CONTROL,
    uuids: tuple[str, ...] = (G0, G1),
) -> devicelists.DeviceList:
    return devicelists.device_list(
        uuids,
        settings=devicelists.DeviceListSettings(
            strategies=strategies, pass_device_specs=specs, dev_root=dev_root
        ),
        response_id=RID,
        minors=MINORS,
        present=present,
    )


def _mounts(parts: devicelists.DeviceList) -> tuple[tuple[str, str, bool], ...]:
    return tuple((m.container_path, m.host_path, m.read_only) for m in parts.mounts)


@pytest.mark.parametrize(
    ("strategies", "envs", "mounts", "annotations"),
    [
        (("envvar",), {"NVIDIA_VISIBLE_DEVICES": f"{G0},{G1}"}, (), {}),
        (
            ("volume-mounts",),
            {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
            MOUNTS,
            {},
        ),
        (("cdi-annotations",), {}, (), {CDI_KEY: CDI_VALUE}),
        # both: the variable points at the mounts, as HAMi's later strategy overwrites it
        (
            ("envvar", "volume-mounts"),
            {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
            MOUNTS,
            {},
        ),
        (
            ("cdi-annotations", "envvar"),
            {"NVIDIA_VISIBLE_DEVICES": f"{G0},{G1}"},
            (),
            {CDI_KEY: CDI_VALUE},
        ),
    ],
)
def test_each_strategy_names_the_gpus_in_its_own_part_of_the_response(
    strategies: tuple[str, ...],
    envs: dict[str, str],
    mounts: tuple[tuple[str, str, bool], ...],
    annotations: dict[str, str],
) -> None:
    parts = _parts(strategies)
    assert parts.envs == envs
    assert _mounts(parts) == mounts
    assert parts.annotations == annotations
    assert parts.devices == ()  # not asked for


def test_a_gpu_listed_twice_is_named_once_in_its_cuda_order() -> None:
    parts = _parts(("envvar", "cdi-annotations"), uuids=(G1, G0, G1))
    assert parts.envs == {"NVIDIA_VISIBLE_DEVICES": f"{G1},{G0}"}
    assert parts.annotations == {CDI_KEY: f"nvidia.com/gpu={G1},nvidia.com/gpu={G0}"}


@pytest.mark.parametrize(
    ("dev_root", "present", "expected"),
    [
        (
            "/",
            ALL_CONTROL,
            [
                ("/dev/nvidiactl", "/dev/nvidiactl"),
                ("/dev/nvidia-uvm", "/dev/nvidia-uvm"),
                ("/dev/nvidia-uvm-tools", "/dev/nvidia-uvm-tools"),
                ("/dev/nvidia-modeset", "/dev/nvidia-modeset"),
                ("/dev/nvidia0", "/dev/nvidia0"),
                ("/dev/nvidia3", "/dev/nvidia3"),
            ],
        ),
        # the driver container's root; optional nodes the host lacks are left out
        (
            "/run/nvidia/driver",
            frozenset({"/dev/nvidiactl", "/dev/nvidia-uvm"}),
            [
                ("/dev/nvidiactl", "/run/nvidia/driver/dev/nvidiactl"),
                ("/dev/nvidia-uvm", "/run/nvidia/driver/dev/nvidia-uvm"),
                ("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0"),
                ("/dev/nvidia3", "/run/nvidia/driver/dev/nvidia3"),
            ],
        ),
    ],
)
@pytest.mark.parametrize(
    "strategies", [("envvar",), ("volume-mounts",), ("cdi-annotations", "envvar")]
)
def test_device_specs_name_each_gpus_minor_node_and_the_control_nodes_the_host_has(
    strategies: tuple[str, ...],
    dev_root: str,
    present: frozenset[str],
    expected: list[tuple[str, str]],
) -> None:
    parts = _parts(strategies, specs=True, dev_root=dev_root, present=present)
    assert [(d.container_path, d.host_path) for d in parts.devices] == expected
    assert {d.permissions for d in parts.devices} == {"rw"}


def test_with_cdi_alone_only_the_annotation_names_the_gpus_even_with_device_specs_on() -> None:
    parts = _parts(("cdi-annotations",), specs=True)
    assert parts == devicelists.DeviceList(annotations={CDI_KEY: CDI_VALUE})


def test_device_specs_for_a_gpu_without_a_known_minor_are_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=f"GPU {G1}: device minor unknown"):
        devicelists.device_list(
            [G0, G1],
            settings=devicelists.DeviceListSettings(pass_device_specs=True),
            response_id=RID,
            minors={G0: 0},
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("envvar", ("envvar",)),
        ("volume-mounts", ("volume-mounts",)),
        ("cdi-annotations", ("cdi-annotations",)),
        (" cdi-annotations , envvar,envvar", ("cdi-annotations", "envvar")),
    ],
)
def test_strategy_lists_parse_in_order_each_once(text: str, expected: tuple[str, ...]) -> None:
    assert devicelists.parse_strategies(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--device-list-strategy '': empty"),
        (" , ", "--device-list-strategy ' , ': empty"),
        ("env", "--device-list-strategy 'env': unknown strategy 'env'"),
        ("envvar,cdi-cri", "unknown strategy 'cdi-cri'; one of envvar, volume-mounts"),
    ],
)
def test_an_unknown_or_empty_strategy_is_refused_naming_the_flag_and_value(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        devicelists.parse_strategies(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategies": ()}, "strategies=\\(\\): at least one"),
        ({"strategies": ("cdi",)}, "strategies: unknown strategy 'cdi'"),
        ({"dev_root": "run/nvidia"}, "dev_root='run/nvidia': must be an absolute path"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        devicelists.DeviceListSettings(**kwargs)  # type: ignore[arg-type]


def test_cdi_names_follow_the_cdi_rules_or_are_refused() -> None:
    assert devicelists.cdi_device(G0) == f"nvidia.com/gpu={G0}"
    assert devicelists.cdi_annotation_key("a/b") == "cdi.k8s.io/nvidia-device-plugin_a_b"
    with pytest.raises(ValueError, match="not a valid CDI device name"):
        devicelists.cdi_device("GPU 0")
    with pytest.raises(ValueError, match="at most 63"):
        devicelists.cdi_annotation_key("x" * 43)  # 20 + 1 + 43 = 64 characters
    with pytest.raises(ValueError, match="at most 63"):
        devicelists.cdi_annotation_key("id-")
