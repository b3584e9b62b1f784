"""vslice's device plugin in the test's own process, for tests here and end to end.

``running_plugin`` starts a ``DevicePlugin`` for one node on mock GPUs: its host root with
a stand-in libvgpu file (mounted, never loaded: no container runs), the Kubernetes API at
``api_url`` (kmock's emulator), kubelet's directory ``kubelet_dir`` (a ``FakeKubelet``'s)::

    async with running_plugin(
        tmp_path / "node-a", node="node-a", api_url=str(emulator.url),
        kubelet_dir=kubelet.directory, devices="GPU-a0:16384,GPU-a1:16384",
    ) as plugin:
        await kubelet.wait_registered()
        ...

``devices`` is the ``VSLICE_MOCKGPU_DEVICES`` format; ``ledger`` (optional) reads the
node's ledger entry, as the agent does on the bus; ``device_list`` (optional) is the
node's device list strategy, each mock GPU's device minor its index. ``dcus`` (the
``VSLICE_MOCKDCU_DEVICES`` format) gives the node mock Hygon DCUs too, and ``vendor``
``DCU`` starts the node's DCU plugin (``hygon.com/dcunum``) instead of its GPU plugin;
``slicer`` and ``lock`` let two plugins of one node share its slices and Allocate lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from libshared import vendors
from libshared.devices import NodeDevices
from services.nodeagent.adapters import dcus as dcu_backends
from services.nodeagent.adapters import deviceplugin, gpus, hostroots, kube
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, devicelists, fleets, preparing, registrations


def node_devices(
    node: str,
    devices: str,
    *,
    split_count: int = 10,
    unhealthy: frozenset[str] = frozenset(),
    dcus: str = "",
) -> NodeDevices:
    """The registration the agent makes of mock GPUs ``devices`` (``<uuid>:<MiB>,...``)
    and mock DCUs ``dcus`` (``<uuid>:<MiB>[:<model>],...``)."""
    found = gpus.MockGpus(fleets.parse_devices(devices), gpu_type="MOCK").discover()
    found_dcus = dcu_backends.MockDcus(fleets.parse_dcus(dcus)).discover()
    scaling = registrations.Scaling(split_count=split_count)
    return registrations.node_devices(
        node, found, scaling=scaling, unhealthy=unhealthy, dcus=found_dcus
    )


@contextlib.asynccontextmanager
async def running_plugin(
    workdir: Path,
    *,
    node: str,
    api_url: str,
    kubelet_dir: Path,
    devices: str,
    split_count: int = 10,
    ledger: deviceplugin.LedgerReader | None = None,
    device_list: devicelists.DeviceListSettings | None = None,
    dcus: str = "",
    vendor: vendors.Vendor = vendors.NVIDIA,
    slicer: Slicer | None = None,
    lock: asyncio.Lock | None = None,
) -> AsyncIterator[deviceplugin.DevicePlugin]:
    """A started device plugin (stopped, its API client closed, on the way out)."""
    root = workdir / "host"
    stand_in = workdir / "libvgpu.so"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_bytes(b"\x7fELF stand-in")
    lib = hostroots.install_libvgpu(root, stand_in)
    registration = node_devices(node, devices, split_count=split_count, dcus=dcus)
    if slicer is None:
        slicer = Slicer(node=node, layout=preparing.Layout(root=str(root), libvgpu=str(lib)))
    slicer.dcu_indices = registrations.dcu_indices(registration)  # as the node's loops do
    api = await kube.api_client(api_url)
    settings = deviceplugin.PluginSettings(
        node=node,
        kubelet_dir=str(kubelet_dir),
        watch_interval_s=0.05,
        release_interval_s=0.1,
        annotate_retry_s=0.1,
        stop_grace_s=0.05,
        device_list=device_list or devicelists.DeviceListSettings(),
    )
    if vendor is vendors.DCU:
        settings = deviceplugin.dcu_settings(settings)
    plugin = deviceplugin.DevicePlugin(
        settings=settings,
        pods=kube.Kube(api),
        slicer=slicer,
        registration=registration,
        libvgpu=lib.resolve(),
        preload=hostroots.install_preload(root, allocating.preload_text()),
        ledger=ledger,
        minors=registrations.minors(
            gpus.MockGpus(fleets.parse_devices(devices), gpu_type="MOCK").discover()
        ),
        lock=lock,
    )
    try:
        await plugin.start()
        yield plugin
    finally:
        await plugin.stop()
        await api.close()
