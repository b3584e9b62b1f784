"""A device plugin in this process, between kmock's Kubernetes API emulator (real HTTP) and
the fake kubelet (real gRPC on unix sockets), on mock GPUs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest

from libshared.devices import NodeDevices
from services.nodeagent.adapters import deviceplugin
from tests.k8s.nodeagent import plugins
from tests.k8s.nodeagent.fakekubelet import FakeKubelet

NODE = "node-a"
G0 = "GPU-0a1b2c3d-0000-4000-8000-0000000000a0"
G1 = "GPU-0a1b2c3d-0000-4000-8000-0000000000a1"
MOCKGPU_DEVICES = f"{G0}:16384,{G1}:16384"  # the VSLICE_MOCKGPU_DEVICES format
SPLIT = 4


@dataclass
class Stack:
    api: kmock.KubernetesEmulator
    kubelet: FakeKubelet
    plugin: deviceplugin.DevicePlugin
    root: Path

    def add_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.api.objects["v1/pods", meta["namespace"], meta["name"]] = pod

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return dict(self.api.objects["v1/pods", namespace, name].raw)

    def annotations(self, name: str, namespace: str = "default") -> dict[str, str]:
        return dict(self.pod(name, namespace)["metadata"].get("annotations") or {})

    def node_annotations(self) -> dict[str, str]:
        return dict(
            self.api.objects["v1/nodes", None, NODE].raw["metadata"].get("annotations") or {}
        )


def registration(unhealthy: frozenset[str] = frozenset()) -> NodeDevices:
    """The node's devices from the mock discovery of ``MOCKGPU_DEVICES``."""
    return plugins.node_devices(NODE, MOCKGPU_DEVICES, split_count=SPLIT, unhealthy=unhealthy)


@pytest.fixture
def emulator(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    """kmock's emulator holding the node and knowing pods (an empty list is a list)."""
    kmock.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod")
    kmock.objects["v1/nodes", None, NODE] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "annotations": {}},
    }
    return kmock


@pytest.fixture
async def stack(tmp_path: Path, emulator: kmock.KubernetesEmulator) -> AsyncIterator[Stack]:
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    try:
        async with plugins.running_plugin(
            tmp_path,
            node=NODE,
            api_url=str(emulator.url),
            kubelet_dir=kubelet.directory,
            devices=MOCKGPU_DEVICES,
            split_count=SPLIT,
        ) as plugin:
            await kubelet.wait_registered()
            await kubelet.list_and_watch()
            yield Stack(api=emulator, kubelet=kubelet, plugin=plugin, root=tmp_path / "host")
    finally:
        await kubelet.stop()


@pytest.fixture(scope="session")
def native() -> None:
    """The mock driver and libvgpu, built (a no-op when current)."""
    from tests.libvgpu import harness

    harness.build_native()
