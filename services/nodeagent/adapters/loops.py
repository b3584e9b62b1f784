"""The node agent's three loops over a machine's GPUs, and the state they share: the
usage report (read NVML or the mock, report each slice's use and the processes over their
slice, end those with ``--enforce=kill``), the XID watch (a device fault marks the device
unhealthy and registers the node again) and the rediscovery of the device list.

What it leaves to others: which processes are over their slice and which of them are
ended (``services.nodeagent.core.usages``), the registration's content
(``services.nodeagent.core.registrations``), wiring (``services.nodeagent.app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client

from libshared import bounds, events, probes
from libshared.devices import NodeDevices
from libshared.subjects import Subjects
from services.nodeagent.adapters import configfiles, dcus, deviceplugin, gpus, hostroots, kube
from services.nodeagent.adapters.bus import Agent
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import nodeconfigs, registrations, usages
from services.nodeagent.core.registrations import Gpu, Scaling

log = logging.getLogger("vslice.nodeagent")

MIB = 1 << 20
XID_WAIT_S = 1.0


def enforce(usage: events.NodeUsage, *, kill: bool) -> events.NodeUsage:
    """Log every escape of ``usage``; with ``kill``, SIGKILL the escaped processes of a
    slice (``usages.to_kill``) and mark them ``killed`` (``usages.with_killed``)."""
    victims = set(usages.to_kill(usage.escapes)) if kill else set()
    killed = {pid for pid in victims if hostroots.kill(pid)}
    for e in usage.escapes:
        log.warning(
            "process over its slice",
            extra={
                "pid": e.pid,
                "uuid": e.uuid,
                "used_bytes": e.used_bytes,
                "limit_bytes": e.limit_bytes,
                "pod_uid": e.pod_uid,
                "killed": e.pid in killed,
            },
        )
    return usages.with_killed(usage, killed)


@dataclass
class NodeLoops:
    """One machine's node: ``found`` (the GPUs discovered last), ``unhealthy`` (UUIDs a
    device fault was seen on), where registrations go (``agent`` on the bus, ``plugin``
    for kubelet) and where usage goes (``nc``, ``subjects``). ``margin_mib``: what a
    process may use beyond its slice before it is an escape (MiB); ``kill``: end escapes;
    ``usage_every_s``, ``rediscover_s``: the loops' periods (seconds). ``settings``: what
    the node registers with (``defaults`` with the entry of ``config_path``, HAMi's device
    plugin config, over them: ``core.nodeconfigs``); ``config_seen``: that file's bytes as
    last read; it is read again every ``config_poll_s`` seconds. ``dcu_backend``: the
    node's Hygon DCUs (None: it has none), ``dcus_found`` those discovered last;
    ``dcu_plugin`` serves them to kubelet."""

    node: str
    backend: gpus.Gpus
    slicer: Slicer
    found: list[Gpu]
    settings: nodeconfigs.NodeSettings
    margin_mib: int
    kill: bool
    usage_every_s: float
    rediscover_s: float
    reported: probes.Beat
    nc: Client | None = None
    subjects: Subjects | None = None
    agent: Agent | None = None
    plugin: deviceplugin.DevicePlugin | None = None
    unhealthy: set[str] = field(default_factory=set)
    defaults: Scaling = field(default_factory=Scaling)
    config_path: str | None = None
    config_poll_s: float = 5.0
    config_seen: bytes = b""
    kube_api: kube.NodeAnnotations | None = None
    cordon_poll_s: float = 10.0
    cordoned: frozenset[str] = frozenset()
    dcu_backend: dcus.Dcus | None = None
    dcus_found: list[Gpu] = field(default_factory=list)
    dcu_plugin: deviceplugin.DevicePlugin | None = None
    _problems: dict[str, str] = field(default_factory=dict)  # what, last error logged
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slicer.mig_gpus = mig_gpus(self.registration())
        self.slicer.dcu_indices = registrations.dcu_indices(self.registration())

    def registration(self) -> NodeDevices:
        """The node's devices as registered now: the GPUs and DCUs found that its settings
        keep."""
        offered = self.settings.gpus(self.found)
        return registrations.node_devices(
            self.node,
            offered,
            scaling=self.settings.scaling,
            unhealthy=frozenset(self.unhealthy),
            cordoned=self.cordoned,
            mig=self.settings.mig(offered),
            mode="mps" if self.slicer.mps is not None else "hami-core",
            dcus=self.settings.dcus(self.dcus_found),
        )

    def _problem(self, what: str, message: str, exc: Exception) -> None:
        """Log ``message`` (a warning) with ``exc``, once while ``what`` keeps failing the
        same way."""
        if self._problems.get(what) != str(exc):
            self._problems[what] = str(exc)
            log.warning(message, extra={"node": self.node, "error": str(exc)})

    async def read_cordon(self) -> None:
        """Read the node's ``hami.io/device-cordon`` annotation (with ``kube_api``); a change
        registers the node again. A node that cannot be read, or an annotation over its
        bound, leaves the cordon as it was (logged once per problem)."""
        assert self.kube_api is not None
        try:
            annotations = await self.kube_api.node_annotations(self.node)
            value = annotations.get(registrations.DEVICE_CORDON, "")
            cordoned = registrations.parse_cordon(value)
        except (kube.KubeError, ValueError) as exc:
            self._problem("cordon", "device cordon not read; the node keeps its cordon", exc)
            return
        self._problems.pop("cordon", None)
        if cordoned == self.cordoned:
            return
        self.cordoned = cordoned
        known = {g.uuid for g in self.found}
        log.info(
            "devices cordoned",
            extra={"uuids": sorted(cordoned & known), "unknown": sorted(cordoned - known)},
        )
        await self.announce()

    async def reload_config(self) -> None:
        """After ``config_poll_s``, read ``config_path`` again; new settings register the
        node again. A file that cannot be read or is refused leaves the settings as they
        are (logged once per problem)."""
        await asyncio.sleep(self.config_poll_s)
        assert self.config_path is not None
        try:
            data, settings = await asyncio.to_thread(
                configfiles.load, self.config_path, self.node, self.defaults
            )
        except (OSError, nodeconfigs.NodeConfigError) as exc:
            self._problem("config", "node config not applied; the node keeps its settings", exc)
            return
        self._problems.pop("config", None)
        if data == self.config_seen:
            return
        self.config_seen = data
        if settings == self.settings:
            return
        if "mps" in (settings.mode, self.settings.mode) and settings.mode != self.settings.mode:
            log.warning(  # the MPS server runs for the agent's life
                "operating mode mps is entered or left at the node agent's next start",
                extra={"mode": settings.mode, "running": self.settings.mode},
            )
        self.settings = settings
        log.info(
            "node config applied",
            extra={
                "path": self.config_path,
                "split_count": settings.scaling.split_count,
                "memory_scaling": settings.scaling.memory_scaling,
                "core_scaling": settings.scaling.core_scaling,
                "filtered": sorted(settings.filter_uuids)
                + sorted(map(str, settings.filter_indices)),
            },
        )
        await self.announce()

    async def announce(self) -> None:
        """Register the node again, on the bus and with kubelet (and tell the slicer which
        GPUs are in MIG mode now, and its DCUs' indices)."""
        now = self.registration()
        self.slicer.mig_gpus = mig_gpus(now)
        self.slicer.dcu_indices = registrations.dcu_indices(now)
        if self.agent is not None:
            await self.agent.register([now])
        for plugin in (self.plugin, self.dcu_plugin):
            if plugin is not None:
                await plugin.update(now, minors=registrations.minors(self.found))

    async def report(self) -> None:
        """One usage report: read the devices, report, end escapes, sweep ended slices."""
        devices, processes = await asyncio.to_thread(self.backend.read)
        usage = self.slicer.usage(devices, processes, margin_bytes=self.margin_mib * MIB)
        if usage.escapes:
            usage = enforce(usage, kill=self.kill)
        usage, left_out = usages.clipped(usage)
        if left_out:
            log.warning("usage report clipped to its bounds", extra={"left_out": left_out})
        problem = bounds.violation(usage, events.NodeUsage)
        if problem:
            # a figure no receiver would take (NVML's, say): the report would be refused
            log.error("usage report over its bounds, not sent", extra={"error": problem})
        elif self.nc is not None and self.subjects is not None:
            await self.nc.publish(self.subjects.usage(self.node), events.ENCODER.encode(usage))
        self.slicer.sweep()
        self.reported.mark()

    async def watch_health(self) -> None:
        """Wait for XIDs up to ``XID_WAIT_S``; a device fault makes its GPU unhealthy."""
        xids = await asyncio.to_thread(self.backend.wait_xids, XID_WAIT_S)
        faults = {u for u, x in xids if registrations.is_device_fault(x)}
        for uuid, xid in xids:
            fault = registrations.is_device_fault(xid)
            log.warning("XID", extra={"uuid": uuid, "xid": xid, "fault": fault})
        if faults - self.unhealthy:
            self.unhealthy.update(faults)
            await self.announce()

    async def rediscover(self) -> None:
        """After ``rediscover_s``, list the GPUs (and DCUs) again; a change registers the
        node again."""
        await asyncio.sleep(self.rediscover_s)
        now = await asyncio.to_thread(self.backend.discover)
        dcus_now = self.dcus_found
        if self.dcu_backend is not None:
            dcus_now = await asyncio.to_thread(self.dcu_backend.discover)
        if now != self.found or dcus_now != self.dcus_found:
            self.found, self.dcus_found = now, dcus_now
            log.info(
                "device list changed",
                extra={"gpus": len(self.found), "dcus": len(self.dcus_found)},
            )
            await self.announce()

    def start(self, health: probes.Probes) -> None:
        """Start the three loops (and the node config's and the cordon's, with a node
        config and the Kubernetes API), each a task the health probes watch."""
        self._tasks = [
            asyncio.create_task(forever("usage", self.report, every_s=self.usage_every_s)),
            asyncio.create_task(forever("health", self.watch_health)),
            asyncio.create_task(forever("rediscover", self.rediscover)),
        ]
        names = ["usage loop", "xid loop", "rediscover loop"]
        if self.config_path is not None:
            self._tasks.append(asyncio.create_task(forever("node config", self.reload_config)))
            names.append("node config loop")
        if self.kube_api is not None:
            self._tasks.append(
                asyncio.create_task(forever("cordon", self.read_cordon, every_s=self.cordon_poll_s))
            )
            names.append("cordon loop")
        for name, task in zip(names, self._tasks, strict=True):
            health.task(name, task)

    async def stop(self) -> None:
        """Cancel the loops and wait for them to end."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def mig_gpus(registration: NodeDevices) -> frozenset[str]:
    """UUIDs of the devices ``registration`` offers in MIG mode."""
    return frozenset(d.uuid for d in registration.devices if d.mode == "mig")


async def forever(name: str, step: Callable[[], Awaitable[None]], *, every_s: float = 0.0) -> None:
    """Run ``step`` again and again (``every_s`` apart); a failing step is logged, never
    fatal."""
    while True:
        started = time.monotonic()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except (Exception, nats.errors.Error) as exc:
            log.exception("%s step failed", name, extra={"error": str(exc)})
            await asyncio.sleep(1.0)
        with contextlib.suppress(ValueError):
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))
