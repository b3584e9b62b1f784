"""The node agent's Kubernetes flags: each also read from its environment variable, and a
device plugin that lacks what it needs refused naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.nodeagent import settings
from services.nodeagent.core import devicelists

PLUGIN = ["--device-plugin", "--kube", "--host-root", "/tmp/h", "--backend", "mock"]


def test_device_plugin_flags_and_their_environment_agree(tmp_path: Path) -> None:
    flagged = settings.parse(
        [*PLUGIN, "--node-name", "node-7", "--kubelet-dir", str(tmp_path)], environ={}
    )
    from_env = settings.parse(
        [],
        environ={
            "VSLICE_DEVICE_PLUGIN": "true",
            "VSLICE_KUBE": "1",
            "VSLICE_HOST_ROOT": "/tmp/h",
            "VSLICE_KUBELET_DIR": str(tmp_path),
            "NODE_NAME": "node-7",
        },
    )
    expected = settings.DevicePluginSettings(node_name="node-7", kubelet_dir=str(tmp_path))
    assert flagged.device_plugin == from_env.device_plugin == expected
    assert flagged.slices is not None and flagged.slices.host_root == "/tmp/h"
    assert not flagged.use_bus and not from_env.use_bus  # no NATS URL given: API only


def test_the_node_name_defaults_to_node_name_and_the_kubelet_dir_to_kubelets() -> None:
    parsed = settings.parse(PLUGIN, environ={"NODE_NAME": "a", "VSLICE_NODE_NAME": "b"})
    assert parsed.device_plugin == settings.DevicePluginSettings(
        node_name="b", kubelet_dir="/var/lib/kubelet/device-plugins"
    )


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        ([*PLUGIN, "--node-name", "n", "--nats-url", "nats://bus:4222"], {}),
        ([*PLUGIN, "--node-name", "n"], {"VSLICE_NATS_URL": "nats://bus:4222"}),
        (["--host-root", "/tmp/h"], {}),  # no device plugin: the bus, as before
        ([], {}),
    ],
)
def test_the_bus_is_used_when_a_nats_url_is_given_or_without_a_device_plugin(
    argv: list[str], environ: dict[str, str]
) -> None:
    assert settings.parse(argv, environ=environ).use_bus


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device-plugin", "--kube", "--node-name", "n"], "--device-plugin needs --host-root"),
        (["--device-plugin", "--host-root", "/h", "--node-name", "n"], "needs --kube"),
        (["--device-plugin", "--kube", "--host-root", "/h"], "needs --node-name or NODE_NAME"),
    ],
)
def test_a_device_plugin_without_what_it_needs_is_refused_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings.parse(argv, environ={})
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_device_list_flags_and_hamis_environment_agree() -> None:
    flagged = settings.parse(
        [
            *PLUGIN,
            "--node-name",
            "n",
            "--device-list-strategy",
            "cdi-annotations,envvar",
            "--pass-device-specs",
            "--nvidia-dev-root",
            "/run/nvidia/driver",
        ],
        environ={},
    )
    from_hami_env = settings.parse(
        [*PLUGIN, "--node-name", "n"],
        environ={
            "DEVICE_LIST_STRATEGY": "cdi-annotations,envvar",
            "PASS_DEVICE_SPECS": "true",
            "NVIDIA_DEV_ROOT": "/run/nvidia/driver",
        },
    )
    expected = devicelists.DeviceListSettings(
        strategies=("cdi-annotations", "envvar"),
        pass_device_specs=True,
        dev_root="/run/nvidia/driver",
    )
    assert flagged.device_plugin is not None and from_hami_env.device_plugin is not None
    assert flagged.device_plugin.device_list == from_hami_env.device_plugin.device_list == expected


def test_the_device_list_defaults_to_envvar_without_specs_and_vslices_variable_wins() -> None:
    parsed = settings.parse([*PLUGIN, "--node-name", "n"], environ={})
    assert parsed.device_plugin is not None
    assert parsed.device_plugin.device_list == devicelists.DeviceListSettings(
        strategies=("envvar",), pass_device_specs=False, dev_root="/"
    )
    parsed = settings.parse(
        [*PLUGIN, "--node-name", "n"],
        environ={
            "VSLICE_DEVICE_LIST_STRATEGY": "volume-mounts",
            "DEVICE_LIST_STRATEGY": "envvar",
        },
    )
    assert parsed.device_plugin is not None
    assert parsed.device_plugin.device_list.strategies == ("volume-mounts",)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--device-list-strategy", "cdi"], {}, "--device-list-strategy 'cdi': unknown strategy"),
        ([], {"DEVICE_LIST_STRATEGY": "envvar,mounts"}, "unknown strategy 'mounts'"),
        (["--nvidia-dev-root", "dev"], {}, "--nvidia-dev-root 'dev': must be an absolute path"),
    ],
)
def test_a_bad_device_list_setting_is_refused_naming_the_flag_and_value(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings.parse([*PLUGIN, "--node-name", "n", *argv], environ=environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
