"""``vslice run`` refuses a node agent's answer that does not match its placement: the
environment a slice gets is vslice's, never what a peer on the bus shaped
(``vslice.running.verify_ready``)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from vslice import running

ROOT = Path("/var/lib/vslice-test-host")
MOCK = Path("/opt/mockgpu")


def placement(*slices: tuple[str, int, int]) -> events.Placement:
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
                uuid=uuid,
                device_index=i,
                memory_mib=mib,
                cores_percent=cores,
            )
            for i, (uuid, mib, cores) in enumerate(slices)
        ),
        charge=PodCharge(pod_uid="run-1"),
    )


def honest_env() -> dict[str, str]:
    return {
        "NVIDIA_VISIBLE_DEVICES": "GPU-a",
        "CUDA_VISIBLE_DEVICES": "GPU-a",
        "CUDA_DEVICE_MEMORY_LIMIT_0": "1000m",
        "CUDA_DEVICE_SM_LIMIT": "30",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(ROOT / "containers/run-1_main/vgpu.cache"),
        "GPU_CORE_UTILIZATION_POLICY": "default",
        "LD_PRELOAD": str(ROOT / "lib/libvgpu.so"),
        "LD_LIBRARY_PATH": str(MOCK),
        "VSLICE_MOCKGPU_STATE": str(ROOT / "mockgpu.state"),
    }


def problems(env: dict[str, str], *, node: str = "vm-0", uid: str = "run-1") -> list[str]:
    ready = events.Ready(pod_uid=uid, node=node, env={"main": env})
    return running.verify_ready(
        ready, placement(("GPU-a", 1000, 30)), host_root=ROOT, library_dirs=(MOCK,)
    )


def test_the_node_agents_own_answer_is_accepted() -> None:
    assert problems(honest_env()) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"LD_PRELOAD": ""}, "LD_PRELOAD"),
        ({"LD_PRELOAD": "/tmp/evil.so"}, "LD_PRELOAD"),
        ({"LD_PRELOAD": str(ROOT / "lib/../../../tmp/evil.so")}, "LD_PRELOAD"),
        ({"LD_PRELOAD": f"{ROOT / 'lib/libvgpu.so'} /tmp/evil.so"}, "LD_PRELOAD"),
        ({"CUDA_DEVICE_MEMORY_LIMIT_0": "999999m"}, "memory limits"),
        ({"CUDA_DEVICE_MEMORY_LIMIT_1": "1000m"}, "memory limits"),
        ({"CUDA_DEVICE_SM_LIMIT": "100"}, "CUDA_DEVICE_SM_LIMIT"),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-b"}, "CUDA_VISIBLE_DEVICES"),
        ({"CUDA_DEVICE_MEMORY_SHARED_CACHE": "/tmp/other.cache"}, "SHARED_CACHE"),
        ({"LD_LIBRARY_PATH": "/tmp/fake-driver"}, "LD_LIBRARY_PATH"),
        ({"GPU_CORE_UTILIZATION_POLICY": "off"}, "GPU_CORE_UTILIZATION_POLICY"),
        ({"PYTHONPATH": "/tmp/x"}, "unexpected variables"),
        ({"CUDA_DISABLE_CONTROL": "1"}, "unexpected variables"),
    ],
)
def test_an_answer_with_a_forged_variable_is_refused(change: dict[str, str], named: str) -> None:
    env = {**honest_env(), **change}
    found = problems(env)
    assert any(named in p for p in found), found


def test_a_missing_limit_is_refused() -> None:
    env = honest_env()
    del env["CUDA_DEVICE_MEMORY_LIMIT_0"]
    assert any("memory limits" in p for p in problems(env))


def test_an_answer_for_another_pod_or_node_is_refused() -> None:
    assert problems(honest_env(), uid="run-2")
    assert problems(honest_env(), node="vm-1")


def mig_placement() -> events.Placement:
    held = placement(("GPU-a", 10240, 0))
    (s,) = held.slices
    mig = Slice(**{**msgspec.structs.asdict(s), "mig_profile": "1g.10gb", "mig_start": 2})
    return msgspec.structs.replace(held, slices=(mig,))


def honest_mig_env() -> dict[str, str]:
    mig = "MIG-5bbd93c5-5105-4fc6-ae13-91961f65ade3"
    return {
        "NVIDIA_VISIBLE_DEVICES": mig,
        "CUDA_VISIBLE_DEVICES": mig,
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(ROOT / "containers/run-1_main/vgpu.cache"),
        "LD_LIBRARY_PATH": str(MOCK),
        "VSLICE_MOCKGPU_STATE": str(ROOT / "mockgpu.state"),
    }


def mig_problems(env: dict[str, str]) -> list[str]:
    ready = events.Ready(pod_uid="run-1", node="vm-0", env={"main": env})
    return running.verify_ready(ready, mig_placement(), host_root=ROOT, library_dirs=(MOCK,))


def test_the_node_agents_answer_for_a_mig_slice_is_accepted() -> None:
    assert mig_problems(honest_mig_env()) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-a"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"NVIDIA_VISIBLE_DEVICES": "MIG-a,MIG-b"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"NVIDIA_VISIBLE_DEVICES": "MIG-a;rm -rf"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"CUDA_VISIBLE_DEVICES": "MIG-other"}, "CUDA_VISIBLE_DEVICES"),
        ({"LD_PRELOAD": "/tmp/evil.so"}, "LD_PRELOAD"),
        ({"CUDA_DEVICE_MEMORY_LIMIT_0": "999999m"}, "memory limits"),
        ({"CUDA_DEVICE_SM_LIMIT": "10"}, "CUDA_DEVICE_SM_LIMIT"),
        ({"LD_LIBRARY_PATH": "/tmp/fake-driver"}, "LD_LIBRARY_PATH"),
        ({"PYTHONPATH": "/tmp/x"}, "unexpected variables"),
    ],
)
def test_a_forged_answer_for_a_mig_slice_is_refused(change: dict[str, str], named: str) -> None:
    found = mig_problems({**honest_mig_env(), **change})
    assert any(named in p for p in found), found


def honest_mps_env() -> dict[str, str]:
    return {
        "NVIDIA_VISIBLE_DEVICES": "GPU-a",
        "CUDA_VISIBLE_DEVICES": "GPU-a",
        "CUDA_MPS_PIPE_DIRECTORY": str(ROOT / "mps/pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(ROOT / "mps/log"),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1000M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(ROOT / "containers/run-1_main/vgpu.cache"),
        "LD_LIBRARY_PATH": str(MOCK),
        "VSLICE_MOCKGPU_STATE": str(ROOT / "mockgpu.state"),
    }


def test_the_node_agents_answer_for_an_mps_client_is_accepted() -> None:
    assert problems(honest_mps_env()) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=999999M"}, "PINNED_DEVICE_MEM_LIMIT"),
        ({"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1000M,1=1000M"}, "PINNED_DEVICE_MEM_LIMIT"),
        ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}, "ACTIVE_THREAD_PERCENTAGE"),
        ({"CUDA_MPS_PIPE_DIRECTORY": "/tmp/rogue-mps"}, "CUDA_MPS_PIPE_DIRECTORY"),
        ({"CUDA_MPS_LOG_DIRECTORY": str(ROOT / "containers")}, "CUDA_MPS_LOG_DIRECTORY"),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-b"}, "NVIDIA_VISIBLE_DEVICES"),
        ({"LD_PRELOAD": str(ROOT / "lib/libvgpu.so")}, "LD_PRELOAD"),
        ({"CUDA_DEVICE_MEMORY_LIMIT_0": "1000m"}, "memory limits"),
        ({"PYTHONPATH": "/tmp/x"}, "unexpected variables"),
    ],
)
def test_a_forged_answer_for_an_mps_client_is_refused(change: dict[str, str], named: str) -> None:
    found = problems({**honest_mps_env(), **change})
    assert any(named in p for p in found), found


def test_mps_variables_beside_libvgpu_or_a_mig_device_are_refused() -> None:
    sliced = {**honest_env(), "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1000M"}
    assert any("without an MPS server" in p for p in problems(sliced))
    mig = {**honest_mig_env(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "10"}
    assert any("on a MIG slice" in p for p in mig_problems(mig))
