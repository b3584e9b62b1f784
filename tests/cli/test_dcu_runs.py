"""``vslice up --mock-dcus`` and ``vslice run --dcus``: the flags, the pod a DCU run asks
with (HAMi's ``hygon.com/*`` resources and selectors), and the check of the node agent's
answer for a DCU slice (``HIP_VISIBLE_DEVICES``, nothing of libvgpu's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from vslice import cli, running, stacks

ROOT = Path("/var/lib/vslice-test-host")
D0 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d0"
D1 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d1"


def test_a_dcu_run_asks_hygons_resources_on_this_nodes_dcus() -> None:
    request = running.SliceRequest(dcus=2, memory_mib=8192, cores_percent=40, gpu_type="Z100")
    spec: Any = running.pod_spec(request, uid="run-1", uuids=[D0, D1])
    assert spec["spec"]["containers"][0]["resources"]["limits"] == {
        "hygon.com/dcunum": "2",
        "hygon.com/dcumem": "8192",
        "hygon.com/dcucores": "40",
    }
    assert spec["metadata"]["annotations"] == {
        "hygon.com/use-gpuuuid": f"{D0},{D1}",
        "hygon.com/use-dcutype": "Z100",
    }
    assert running.asked_text(running.SliceRequest(dcus=1)) == (
        "a whole card's memory, 100% cores on 1 DCU"
    )


def test_run_takes_dcus_and_refuses_a_memory_percentage_with_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = cli.parse(["run", "--dcus", "1", "--gpumem", "4096", "--", "true"])
    assert (args.dcus, args.gpumem) == (1, 4096)
    with pytest.raises(SystemExit):
        cli.parse(["run", "--dcus", "0", "--", "true"])
    assert "--dcus" in capsys.readouterr().err
    code = cli.main(["run", "--dcus", "1", "--gpumem-percentage", "50", "--", "true"])
    assert code == 2
    assert "--gpumem-percentage is not a DCU resource" in capsys.readouterr().err


def test_up_gives_the_node_agent_the_mock_dcus_of_its_flag_or_variable(tmp_path: Path) -> None:
    listed = f"{D0}:65536:Z100"
    wanted = cli.up_settings(cli.parse(["up", "--mock-dcus", listed]), {})
    assert wanted.environ["VSLICE_MOCKDCU_DEVICES"] == listed
    args = stacks.slice_agent_args(tmp_path, wanted.environ)
    assert args[args.index("--dcus") + 1] == listed
    assert "--dcus" not in stacks.slice_agent_args(tmp_path, {})
    fallback = cli.up_settings(cli.parse(["up"]), {"VSLICE_MOCKDCU_DEVICES": listed})
    assert fallback.environ["VSLICE_MOCKDCU_DEVICES"] == listed


def test_up_runs_a_node_of_dcus_only_but_not_a_node_of_no_device() -> None:
    listed = f"{D0}:65536:Z100"
    only = cli.up_settings(cli.parse(["up", "--mock-gpus", "0", "--mock-dcus", listed]), {})
    assert only.environ["VSLICE_MOCKGPU_COUNT"] == "0"
    with pytest.raises(stacks.StackError, match=r"--mock-gpus 0.*no device"):
        cli.up_settings(cli.parse(["up", "--mock-gpus", "0"]), {})
    with pytest.raises(stacks.StackError, match="VSLICE_MOCKGPU_COUNT='-1'"):
        cli.up_settings(cli.parse(["up"]), {"VSLICE_MOCKGPU_COUNT": "-1"})


def test_a_malformed_mock_dcu_list_stops_up_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VSLICE_MOCKDCU_DEVICES", f"{D0}:sixteen")
    assert cli.main(["up", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "VSLICE_MOCKDCU_DEVICES" in err and "memory 'sixteen'" in err
    assert not (tmp_path / "nats").exists()  # nothing started


def dcu_placement(*indices: int) -> events.Placement:
    return events.Placement(
        pod_uid="run-1",
        namespace="default",
        pod="run-1",
        node="vm-0",
        slices=tuple(
            Slice(
                pod_uid="run-1",
                namespace="default",
                pod="run-1",
                container="main",
                container_index=0,
                uuid=f"DCU-{i}",
                device_index=i + 2,  # the scheduler's slot: two GPUs come first
                memory_mib=8192,
                cores_percent=100,
                vendor="DCU",
            )
            for i in indices
        ),
        charge=PodCharge(pod_uid="run-1"),
    )


def honest_dcu_env() -> dict[str, str]:
    return {
        "HIP_VISIBLE_DEVICES": "1,3",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(ROOT / "containers/run-1_main/vgpu.cache"),
    }


def dcu_problems(env: dict[str, str]) -> list[str]:
    ready = events.Ready(pod_uid="run-1", node="vm-0", env={"main": env})
    indices = {f"DCU-{i}": i for i in range(4)}
    return running.verify_ready(ready, dcu_placement(1, 3), host_root=ROOT, dcu_indices=indices)


def test_the_node_agents_answer_for_a_dcu_slice_is_accepted() -> None:
    assert dcu_problems(honest_dcu_env()) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"HIP_VISIBLE_DEVICES": "0"}, "HIP_VISIBLE_DEVICES='0'"),
        ({"HIP_VISIBLE_DEVICES": "3,1"}, "HIP_VISIBLE_DEVICES='3,1'"),
        ({"LD_PRELOAD": str(ROOT / "lib/libvgpu.so")}, "LD_PRELOAD"),
        ({"CUDA_DEVICE_MEMORY_LIMIT_0": "8192m"}, "memory limits"),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-a"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"LD_LIBRARY_PATH": str(ROOT)}, "LD_LIBRARY_PATH"),
        ({"CUDA_DEVICE_MEMORY_SHARED_CACHE": "/tmp/x"}, "outside the host root"),
        ({"ROCR_VISIBLE_DEVICES": "0"}, "unexpected variables"),
    ],
)
def test_a_forged_answer_for_a_dcu_slice_is_refused(change: dict[str, str], named: str) -> None:
    found = dcu_problems({**honest_dcu_env(), **change})
    assert any(named in p for p in found), found


def test_a_dcu_the_node_did_not_register_is_refused() -> None:
    ready = events.Ready(pod_uid="run-1", node="vm-0", env={"main": honest_dcu_env()})
    found = running.verify_ready(ready, dcu_placement(1, 3), host_root=ROOT, dcu_indices={})
    assert found == ["DCU DCU-1 is not registered on the node"]


def test_hip_visible_devices_on_a_gpu_slice_is_refused() -> None:
    ready = events.Ready(
        pod_uid="run-1",
        node="vm-0",
        env={
            "main": {
                "NVIDIA_VISIBLE_DEVICES": "GPU-a",
                "CUDA_VISIBLE_DEVICES": "GPU-a",
                "CUDA_DEVICE_MEMORY_LIMIT_0": "1000m",
                "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(ROOT / "containers/run-1_main/vgpu.cache"),
                "LD_PRELOAD": str(ROOT / "lib/libvgpu.so"),
                "HIP_VISIBLE_DEVICES": "0",
            }
        },
    )
    gpu = events.Placement(
        pod_uid="run-1",
        namespace="default",
        pod="run-1",
        node="vm-0",
        slices=(
            Slice(
                pod_uid="run-1",
                namespace="default",
                pod="run-1",
                container="main",
                container_index=0,
                uuid="GPU-a",
                device_index=0,
                memory_mib=1000,
                cores_percent=0,
            ),
        ),
        charge=PodCharge(pod_uid="run-1"),
    )
    found = running.verify_ready(ready, gpu, host_root=ROOT)
    assert any("HIP_VISIBLE_DEVICES on a slice of GPUs" in p for p in found), found
