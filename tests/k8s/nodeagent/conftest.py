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
from services.nodeagent.adapters import deviceplugin, gpus, hostroots, kube
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, fleets, preparing, registrations
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
    found = gpus.MockGpus(fleets.parse_devices(MOCKGPU_DEVICES), gpu_type="MOCK").discover()
    scaling = registrations.Scaling(split_count=SPLIT)
    return registrations.node_devices(NODE, found, scaling=scaling, unhealthy=unhealthy)


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


async def start_plugin(
    tmp_path: Path,
    emulator: kmock.KubernetesEmulator,
    *,
    ledger: deviceplugin.LedgerReader | None = None,
) -> tuple[deviceplugin.DevicePlugin, Any]:
    root = tmp_path / "host"
    fake_lib = tmp_path / "libvgpu.so"
    fake_lib.write_bytes(b"\x7fELF not really")  # mounted, never loaded, in these tests
    lib = hostroots.install_libvgpu(root, fake_lib)
    slicer = Slicer(node=NODE, layout=preparing.Layout(root=str(root), libvgpu=str(lib)))
    api = await kube.api_client(str(emulator.url))
    plugin = deviceplugin.DevicePlugin(
        settings=deviceplugin.PluginSettings(
            node=NODE,
            kubelet_dir=str(tmp_path / "dp"),
            watch_interval_s=0.05,
            release_interval_s=0.1,
            annotate_retry_s=0.1,
        ),
        pods=kube.Kube(api),
        slicer=slicer,
        registration=registration(),
        libvgpu=lib.resolve(),
        preload=hostroots.install_preload(root, allocating.preload_text()),
        ledger=ledger,
    )
    await plugin.start()
    return plugin, api


@pytest.fixture
async def stack(tmp_path: Path, emulator: kmock.KubernetesEmulator) -> AsyncIterator[Stack]:
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    plugin, api = await start_plugin(tmp_path, emulator)
    try:
        await kubelet.wait_registered()
        await kubelet.list_and_watch()
        yield Stack(api=emulator, kubelet=kubelet, plugin=plugin, root=tmp_path / "host")
    finally:
        await kubelet.stop()
        await plugin.stop()
        await api.close()


@pytest.fixture(scope="session")
def native() -> None:
    """The mock driver and libvgpu, built (a no-op when current)."""
    from tests.libvgpu import harness

    harness.build_native()
