"""A node with Hygon DCUs beside its GPUs serves two device plugins: ``nvidia.com/gpu`` and
``hygon.com/dcunum``, each between its own fake kubelet and kmock's Kubernetes API. The
DCU plugin advertises the DCUs only, writes ``hami.io/node-dcu-register`` and its
handshake, allocates a pod by ``hami.io/dcu-devices-to-allocate`` with
``HIP_VISIBLE_DEVICES`` and no libvgpu, and a pod asking both vendors ends its bind phase
only once both plugins allocated it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kmock
import pytest

from libshared import annotations as keys
from libshared import vendors
from services.nodeagent.adapters import deviceplugin, hostroots
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import preparing
from tests.k8s.nodeagent import plugins
from tests.k8s.nodeagent.conftest import G0, G1, MOCKGPU_DEVICES, NODE, SPLIT
from tests.k8s.nodeagent.fakekubelet import FakeKubelet
from tests.k8s.nodeagent.pods import bound_pod
from tests.k8s.nodeagent.test_deviceplugin import eventually

D0 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d0"
D1 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d1"
MOCKDCU_DEVICES = f"{D0}:65536:Z100,{D1}:65536:Z100"  # the VSLICE_MOCKDCU_DEVICES format


@dataclass
class MixedNode:
    api: kmock.KubernetesEmulator
    gpu_kubelet: FakeKubelet
    dcu_kubelet: FakeKubelet
    gpu_plugin: deviceplugin.DevicePlugin
    dcu_plugin: deviceplugin.DevicePlugin

    def add_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.api.objects["v1/pods", meta["namespace"], meta["name"]] = pod

    def annotations(self, name: str) -> dict[str, str]:
        raw = self.api.objects["v1/pods", "default", name].raw
        return dict(raw["metadata"].get("annotations") or {})

    def node_annotations(self) -> dict[str, str]:
        raw = self.api.objects["v1/nodes", None, NODE].raw
        return dict(raw["metadata"].get("annotations") or {})


@pytest.fixture
async def node(tmp_path: Path, emulator: kmock.KubernetesEmulator) -> AsyncIterator[MixedNode]:
    gpu_kubelet = FakeKubelet(tmp_path / "dp-gpu")
    dcu_kubelet = FakeKubelet(tmp_path / "dp-dcu", resource_name="hygon.com/dcunum")
    stand_in = tmp_path / "libvgpu.so"
    stand_in.write_bytes(b"\x7fELF stand-in")
    root = tmp_path / "host"
    lib = hostroots.install_libvgpu(root, stand_in)
    # one node: one host root, one slicer and one Allocate lock for both plugins
    slicer = Slicer(node=NODE, layout=preparing.Layout(root=str(root), libvgpu=str(lib)))
    lock = asyncio.Lock()
    common: dict[str, Any] = {
        "node": NODE,
        "api_url": str(emulator.url),
        "devices": MOCKGPU_DEVICES,
        "dcus": MOCKDCU_DEVICES,
        "split_count": SPLIT,
        "slicer": slicer,
        "lock": lock,
    }
    async with contextlib.AsyncExitStack() as stack:
        for kubelet in (gpu_kubelet, dcu_kubelet):
            await kubelet.start()
            stack.push_async_callback(kubelet.stop)
        gpu_plugin = await stack.enter_async_context(
            plugins.running_plugin(tmp_path, kubelet_dir=gpu_kubelet.directory, **common)
        )
        dcu_plugin = await stack.enter_async_context(
            plugins.running_plugin(
                tmp_path, kubelet_dir=dcu_kubelet.directory, vendor=vendors.DCU, **common
            )
        )
        for kubelet in (gpu_kubelet, dcu_kubelet):
            await kubelet.wait_registered()
            await kubelet.list_and_watch()
        yield MixedNode(emulator, gpu_kubelet, dcu_kubelet, gpu_plugin, dcu_plugin)


def replicas_of(uuid: str) -> list[str]:
    return [f"{uuid}-{i}" for i in range(SPLIT)]


async def test_the_dcu_plugin_registers_hygon_dcunum_and_lists_only_the_dcus(
    node: MixedNode,
) -> None:
    reg = node.dcu_kubelet.registrations[0]
    assert (reg.version, reg.resource_name, reg.endpoint) == (
        "v1beta1",
        "hygon.com/dcunum",
        "vslice-dcu.sock",
    )
    assert node.dcu_kubelet.devices == {d: "Healthy" for d in replicas_of(D0) + replicas_of(D1)}
    assert node.gpu_kubelet.devices == {d: "Healthy" for d in replicas_of(G0) + replicas_of(G1)}


async def test_each_plugin_writes_its_vendors_register_and_handshake(node: MixedNode) -> None:
    wanted = {
        keys.NODE_NVIDIA_REGISTER,
        keys.NODE_HANDSHAKE_NVIDIA,
        keys.NODE_DCU_REGISTER,
        keys.NODE_HANDSHAKE_DCU,
    }
    await eventually(lambda: wanted <= set(node.node_annotations()), "both vendors' annotations")
    annos = node.node_annotations()
    nvidia = keys.decode_node_devices(annos[keys.NODE_NVIDIA_REGISTER])
    dcu = keys.decode_node_devices(
        annos[keys.NODE_DCU_REGISTER], key=keys.NODE_DCU_REGISTER, vendor="DCU"
    )
    assert [(d.uuid, d.index) for d in nvidia] == [(G0, 0), (G1, 1)]
    assert [(d.uuid, d.index, d.type, d.vendor, d.cores_percent) for d in dcu] == [
        (D0, 0, "DCU-Z100", "DCU", 100),
        (D1, 1, "DCU-Z100", "DCU", 100),
    ]
    stamp = r"Reported \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(stamp, annos[keys.NODE_HANDSHAKE_DCU])


async def test_allocate_gives_a_dcu_pod_hip_visible_devices_and_no_libvgpu(
    node: MixedNode,
) -> None:
    node.add_pod(bound_pod("p", node=NODE, containers=[[]], dcus=[[(D1, 8192, 50)]]))
    got = await node.dcu_kubelet.admit(1)
    assert got.device_ids[0].startswith(D1)
    assert got.envs["HIP_VISIBLE_DEVICES"] == "1"
    assert got.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"] == "/usr/local/vslice/cache/vgpu.cache"
    assert not {"NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_MEMORY_LIMIT_0", "LD_PRELOAD"} & set(
        got.envs
    )
    assert got.mount("/usr/local/vslice/libvgpu.so") is None
    assert got.mount("/etc/ld.so.preload") is None
    assert got.mount("/usr/local/vslice/cache") is not None
    annos = node.annotations("p")
    assert annos[keys.BIND_PHASE] == keys.BIND_PHASE_SUCCESS
    assert keys.DCU_DEVICES_TO_ALLOCATE not in annos
    assert keys.DCU_DEVICES_ALLOCATED in annos


async def test_a_gpu_replica_request_never_takes_a_dcu_pod(node: MixedNode) -> None:
    node.add_pod(bound_pod("p", node=NODE, containers=[[]], dcus=[[(D0, 8192, 50)]]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.gpu_kubelet.admit(1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nvidia.com/gpu" in str(info.value.details())
    assert node.annotations("p")[keys.BIND_PHASE] == keys.BIND_PHASE_ALLOCATING


async def test_a_pod_asking_both_vendors_succeeds_once_both_plugins_allocated_it(
    node: MixedNode,
) -> None:
    node.add_pod(bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]], dcus=[[(D0, 8192, 50)]]))
    gpu = await node.gpu_kubelet.admit(1)
    assert gpu.envs["NVIDIA_VISIBLE_DEVICES"] == G0
    annos = node.annotations("p")
    assert annos[keys.BIND_PHASE] == keys.BIND_PHASE_ALLOCATING
    assert keys.VGPU_DEVICES_TO_ALLOCATE not in annos
    assert keys.DCU_DEVICES_TO_ALLOCATE in annos
    dcu = await node.dcu_kubelet.admit(1)
    assert dcu.envs["HIP_VISIBLE_DEVICES"] == "0"
    annos = node.annotations("p")
    assert annos[keys.BIND_PHASE] == keys.BIND_PHASE_SUCCESS
    assert keys.DCU_DEVICES_TO_ALLOCATE not in annos
