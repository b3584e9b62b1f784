"""Wiring of the node agent: build the nodes, connect, register, consume, report, drain.

Two shapes (``settings.Settings``): mock nodes that only answer placements (a replay's
fleet), or -- with a host root -- this machine's node with real slices: GPUs discovered
(NVML or the mock), libvgpu installed, placements prepared on disk, XIDs watched for
health, the device list re-checked, usage published every few seconds and released
slices swept after their grace period. In Kubernetes the same node also serves kubelet's
device plugin (``adapters.deviceplugin``), with or without the bus; health and device
list changes reach both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path

from libshared import connecting, probes, traces, vendors
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger
from libshared.subjects import valid_node
from services.nodeagent.adapters import (
    bus,
    configfiles,
    dcus,
    deviceplugin,
    gpus,
    hostroots,
    kube,
    loops,
    migdevices,
    mpsservers,
)
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, fleets, nodeconfigs, preparing, registrations
from services.nodeagent.core.registrations import Gpu
from services.nodeagent.settings import DevicePluginSettings, Settings, SliceSettings

log = logging.getLogger("vslice.nodeagent")

NVML_ESCAPE_MARGIN_MIB = 512  # a CUDA context's own memory, which no allocation charges
USAGE_STALL_S = 60.0  # /healthz fails when no usage report went out for this long


def hosted_nodes(settings: Settings) -> list[NodeDevices]:
    """The nodes to host: the ``fleet_csv`` node list, else ``spec``.

    Raises ``OSError``/``TraceFormatError`` for an unreadable CSV and ``ValueError`` for a
    node name that cannot be a subject token.
    """
    if settings.fleet_csv:
        if settings.split_count:
            nodes = traces.read_fleet(settings.fleet_csv, split_count=settings.split_count)
        else:
            nodes = traces.read_fleet(settings.fleet_csv)
    else:
        nodes = fleets.build(settings.spec)
    bad = [n.node for n in nodes if not valid_node(n.node)]
    if bad:
        raise ValueError(f"node names not usable on the bus: {bad[:5]}")
    return nodes


def open_gpus(settings: Settings, real: SliceSettings) -> gpus.Gpus:
    """The GPU backend ``real.backend`` names; ``auto``: NVML when it finds a GPU, else the
    mock: the ``--devices`` list, else the first node of the ``--fleet`` file, else the
    uniform spec. Raises ``gpus.GpuError`` when ``nvml`` was asked for and NVML is
    unusable, ``OSError``/``TraceFormatError`` for an unreadable fleet file."""
    if real.backend in ("auto", "nvml"):
        try:
            nvml = gpus.NvmlGpus(real.nvml_library)
            if nvml.discover() or real.backend == "nvml":
                return nvml
            nvml.close()
        except gpus.GpuError as exc:
            if real.backend == "nvml":
                raise
            log.info("no NVML GPU; using mock GPUs", extra={"reason": exc.reason})
    gpu_type = settings.spec.gpu_type
    models: tuple[str, ...] = ()
    if settings.spec.devices:
        devices = settings.spec.devices
        models = settings.spec.models
    else:  # the first node of the fleet file, else of the uniform spec
        first = hosted_nodes(settings)[0]
        devices = tuple((d.uuid, d.memory_mib) for d in first.devices)
        gpu_type = first.devices[0].type if first.devices else gpu_type
    if not devices:  # a node of DCUs only: the mock NVML would make up its default GPUs
        return gpus.MockGpus((), gpu_type=gpu_type)
    return gpus.open_mock(
        devices,
        models=models,
        gpu_type=gpu_type,
        library_dir=real.mock_dir,
        state=real.mock_state_path,
    )


async def main(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Register the nodes and answer their allocations until ``stop`` (default: SIGTERM).
    Raises ``connecting.BusClosedError`` once drained when the connection closed for good."""
    stop = connecting.stop_on_signals(stop)
    if settings.slices is not None:
        await serve_slices(settings, settings.slices, stop)
        return
    nodes = hosted_nodes(settings)
    health = probes.Probes()
    async with contextlib.AsyncExitStack() as stack:
        await probes.serving(health, settings.health, stack)
        agent, lifeline = await open_agent(settings, stack, nodes, stop=stop)
        _agent_checks(health, agent)
        health.started()
        log.info("nodeagent serving", extra={"agent": settings.name, "nodes": len(nodes)})
        await stop.wait()
        health.stopping()
    log.info("stopped", extra={"agent": settings.name})
    lifeline.check()


async def open_agent(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    nodes: list[NodeDevices],
    *,
    stop: asyncio.Event,
    slicer: Slicer | None = None,
) -> tuple[bus.Agent, connecting.Lifeline]:
    """Connect (heartbeats on, a lifeline on ``stop``: ``connecting.connect_service``),
    register ``nodes`` and start answering their allocations; ``stack`` stops the agent,
    unregisters its nodes (``settings.unregister``) and drains the connection, in that
    order. Returns the agent and its lifeline (``check`` it once ``stack`` is closed).
    Raises ``nats.errors.Error`` when the bus cannot be reached."""
    conn = await connecting.connect_service(
        settings.bus, name=f"nodeagent-{settings.name}", service="nodeagent", stop=stop
    )
    stack.push_async_callback(conn.close)
    nc = conn.nc
    js = nc.jetstream(timeout=settings.bus.request_timeout_s)
    opened = await connecting.ensure_bus(js, settings.bus, create=False)
    agent = bus.Agent(
        nc=nc,
        js=js,
        bus=opened,
        subjects=settings.bus.subjects,
        name=settings.name,
        nodes=nodes,
        slicer=slicer,
    )
    await agent.register()
    if settings.unregister:  # after the stop below (callbacks run last first)
        stack.push_async_callback(agent.unregister)
    await agent.start()
    stack.push_async_callback(agent.stop)
    return agent, conn.lifeline


async def serve_slices(settings: Settings, real: SliceSettings, stop: asyncio.Event) -> None:
    """This machine's node with real slices (see the module docstring) until ``stop``:
    on the bus, as kubelet's device plugin (``settings.device_plugin``), or both.

    Raises ``gpus.GpuError`` (no NVML with ``--backend nvml``), ``OSError`` (libvgpu not
    built, host root not writable, kubelet's directory not writable, ``--node-config``
    unreadable) or ``ValueError`` (an unusable node name, a refused ``--node-config``:
    ``nodeconfigs.NodeConfigError``) at start.
    """
    plugin_settings = settings.device_plugin
    if plugin_settings is not None:
        node = plugin_settings.node_name
    else:
        node = f"{settings.spec.name_prefix}-0"
    if settings.use_bus and not valid_node(node):
        raise ValueError(f"node name {node!r} not usable on the bus")
    root = Path(real.host_root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        lib = hostroots.install_libvgpu(root, Path(real.libvgpu))
    except OSError as exc:
        raise OSError(
            f"cannot install libvgpu from {real.libvgpu} (`make native` builds it): {exc}"
        ) from exc
    node_settings = nodeconfigs.NodeSettings(scaling=real.scaling)
    config_seen = b""
    if real.node_config is not None:
        config_seen, node_settings = await asyncio.to_thread(
            configfiles.load, real.node_config, node, real.scaling
        )
    backend = await asyncio.to_thread(open_gpus, settings, real)
    found = await asyncio.to_thread(backend.discover)
    dcu_backend = dcus.MockDcus(real.dcus) if real.dcus else None
    dcus_found = dcu_backend.discover() if dcu_backend is not None else []
    mig = migdevices.NvmlMig() if backend.nvml_loaded else None
    if mig is not None and node_settings.mode == "mig":
        found = await asyncio.to_thread(_enable_mig, mig, backend, found)
    for g in found:
        why = node_settings.left_out(g)
        if why:
            log.warning("GPU not offered", extra={"uuid": g.uuid, "reason": why})
    mock = None
    if isinstance(backend, gpus.MockGpus):
        mock = preparing.MockDriver(
            library_dir=real.mock_dir,
            state=real.mock_state_path,
            devices=backend.device_list(),
        )
    layout = preparing.Layout(root=str(root), libvgpu=str(lib), sm_policy=real.sm_policy, mock=mock)
    slicer = Slicer(node=node, layout=layout, grace_s=real.grace_s, mig=mig)
    mps_server = None
    if node_settings.mode == "mps":  # decided at start: the daemon runs for the agent's life
        slicer.mps = preparing.Mps.under(str(root))
        mps_server = mpsservers.MpsServer(slicer.mps)
        if backend.kind == "nvml":
            await asyncio.to_thread(mps_server.start)
        else:  # the mock driver applies the MPS variables itself
            mps_server.make_dirs()
    margin = real.escape_margin_mib
    if margin is None:
        margin = 0 if backend.kind == "mock" else NVML_ESCAPE_MARGIN_MIB
    # NVML calls run in threads: one that hangs stalls the usage loop, not the event loop,
    # so the loop's own ticker would not see it
    reported = probes.Beat("usage", max(USAGE_STALL_S, 5 * real.usage_interval_s))
    node_loops = loops.NodeLoops(
        node=node,
        backend=backend,
        slicer=slicer,
        found=found,
        settings=node_settings,
        defaults=real.scaling,
        config_path=real.node_config,
        config_poll_s=real.node_config_poll_s,
        config_seen=config_seen,
        margin_mib=margin,
        kill=real.enforce == "kill",
        usage_every_s=real.usage_interval_s,
        rediscover_s=real.rediscover_s,
        reported=reported,
        subjects=settings.bus.subjects,
        dcu_backend=dcu_backend,
        dcus_found=dcus_found,
    )
    health = probes.Probes()
    lifeline = None
    async with contextlib.AsyncExitStack() as stack:
        await probes.serving(health, settings.health, stack)
        stack.callback(backend.close)
        if mps_server is not None:
            stack.callback(mps_server.stop)
        if settings.use_bus:
            node_loops.agent, lifeline = await open_agent(
                settings, stack, [node_loops.registration()], slicer=slicer, stop=stop
            )
            node_loops.nc = node_loops.agent.nc
            _agent_checks(health, node_loops.agent)
        if plugin_settings is not None:
            node_loops.plugin, node_loops.dcu_plugin = await _device_plugins(
                plugin_settings, node_loops, stack, health, root=root, lib=lib
            )
        log.info(
            "node registered",
            extra={
                "node": node,
                "backend": backend.kind,
                "gpus": len(found),
                "dcus": len(dcus_found),
                "bus": node_loops.agent is not None,
                "device_plugin": plugin_settings is not None,
                "hami_register": registrations.hami_register(node_loops.registration()),
                "dcu_register": registrations.hami_register(node_loops.registration(), vendors.DCU),
            },
        )
        health.alive_when("usage", reported)
        node_loops.start(health)
        stack.push_async_callback(node_loops.stop)
        health.started()
        log.info("nodeagent serving", extra={"agent": settings.name, "node": node})
        await stop.wait()
        health.stopping()
    log.info("stopped", extra={"agent": settings.name})
    if lifeline is not None:
        lifeline.check()


def _enable_mig(mig: migdevices.NvmlMig, backend: gpus.Gpus, found: list[Gpu]) -> list[Gpu]:
    """Ask NVML for MIG mode on every GPU of ``found`` whose model has a MIG geometry and
    that is not in it yet; returns the GPUs discovered again (a GPU whose mode waits for a
    reset stays out of MIG mode, and so unoffered, until then)."""
    asked = False
    for g in found:
        if g.mig_enabled or registrations.mig_capacity(g) is None:
            continue
        asked = True
        try:
            now = mig.enable(g.uuid)
        except migdevices.MigError as exc:
            log.warning("MIG mode not enabled", extra={"uuid": g.uuid, "error": exc.reason})
            continue
        if not now:
            log.warning("MIG mode pending a GPU reset", extra={"uuid": g.uuid})
    return backend.discover() if asked else found


async def _device_plugins(
    plugin_settings: DevicePluginSettings,
    node_loops: loops.NodeLoops,
    stack: contextlib.AsyncExitStack,
    health: probes.Probes,
    *,
    root: Path,
    lib: Path,
) -> tuple[deviceplugin.DevicePlugin | None, deviceplugin.DevicePlugin | None]:
    """Start kubelet's device plugin for the node's GPUs (unless it has none and has
    DCUs: a node of DCUs only serves no ``nvidia.com/gpu``), and a second one for its
    Hygon DCUs when it has any (each ready once kubelet registered it). Returns both (None
    where one is not started); the first started also releases departed pods' slices."""
    api = await kube.api_client()
    stack.push_async_callback(api.close)
    agent = node_loops.agent

    async def read_ledger() -> NodeLedger | None:
        assert agent is not None
        return await agent.ledger_of(node_loops.node)

    pods = kube.Kube(api)
    node_loops.kube_api = pods  # the node's hami.io/device-cordon annotation
    node_loops.cordon_poll_s = plugin_settings.cordon_poll_s
    nvidia = deviceplugin.PluginSettings(
        node=node_loops.node,
        kubelet_dir=plugin_settings.kubelet_dir,
        device_list=plugin_settings.device_list,
    )
    preload = hostroots.install_preload(root, allocating.preload_text())
    lock = asyncio.Lock()  # one Allocate at a time on the node, whatever the vendor
    started = []
    dcu = deviceplugin.dcu_settings(nvidia)
    wanted = [dcu] if node_loops.dcus_found else []
    if node_loops.found or not node_loops.dcus_found:
        wanted.insert(0, nvidia)
    for i, settings in enumerate(wanted):
        settings = replace(settings, release_departed=i == 0)
        plugin = deviceplugin.DevicePlugin(
            settings=settings,
            pods=pods,
            slicer=node_loops.slicer,
            registration=node_loops.registration(),
            libvgpu=lib.resolve(),
            preload=preload,
            ledger=read_ledger if agent is not None else None,
            minors=registrations.minors(node_loops.found),
            lock=lock,
        )
        await plugin.start()
        stack.push_async_callback(plugin.stop)
        started.append(plugin)

    def with_kubelet() -> str:
        waiting = [p.settings.resource_name for p in started if p.registered_with is None]
        if waiting:
            return f"device plugin: not registered with kubelet ({', '.join(waiting)})"
        return ""

    health.ready_when("kubelet", with_kubelet)
    by_vendor = {p.settings.vendor.name: p for p in started}
    return by_vendor.get(vendors.NVIDIA.name), by_vendor.get(vendors.DCU.name)


def _agent_checks(health: probes.Probes, agent: bus.Agent) -> None:
    """Ready while connected and the placements consumer keeps taking what waits."""
    health.ready_when("nats", probes.connected(agent.nc))
    health.ready_when(
        "placements",
        probes.ConsumerCurrent(
            js=agent.js, stream=agent.subjects.alloc_stream, durable=agent.durable
        ),
    )
