"""The kubelet device plugin: ``nvidia.com/gpu`` (or ``hygon.com/dcunum``) over the
device-plugin API v1beta1 (gRPC).

``DevicePlugin`` serves the ``DevicePlugin`` service on a unix socket in kubelet's
device-plugin directory and registers it with kubelet's ``Registration`` service on
``kubelet.sock`` there. It

- streams the node's replicas to ``ListAndWatch`` (again on every change of the device
  list or of a GPU's health, ``update``);
- answers ``GetPreferredAllocation`` with replicas of the GPUs the next pending pod's
  slice is on, else spread over GPUs;
- answers ``Allocate`` by finding the pod and container the request is for among the pods
  bound to the node (``services.nodeagent.core.allocating`` decides, from the pods the API
  serves at that moment), preparing the container's slice on disk exactly as ``vslice
  run`` does (``Slicer``), returning its environment and mounts, and patching the pod's
  ``hami.io/bind-phase`` (``success`` once every container is allocated, ``failed`` when
  the slice cannot be given) and devices-to-allocate; the container's GPUs are named to
  the runtime by the node's device list strategies (``services.nodeagent.core.devicelists``:
  ``NVIDIA_VISIBLE_DEVICES``, ``/dev/null`` mounts, CDI annotations, device specs);
- writes the node's ``hami.io/node-nvidia-register`` annotation at start and on every
  change;
- re-registers when kubelet restarts (its socket is a new file: another inode) and serves
  again on a new socket when its own was deleted (kubelet removes the plugin sockets when
  it starts);
- releases the slices of pods that left the node, so their directories are swept after
  the grace period.

Allocate calls are handled one at a time in this process (kubelet makes them one at a time
too); nothing is held between a bind and its Allocate.

A node with Hygon DCUs runs a second ``DevicePlugin`` for vendor ``DCU``
(``PluginSettings.vendor``, ``dcu_settings``): its own socket, ``hygon.com/dcunum``
replicas of the DCUs only, pods matched by ``hami.io/dcu-devices-to-allocate``,
``HIP_VISIBLE_DEVICES`` answered, and the node's ``hami.io/node-dcu-register`` and
``hami.io/node-handshake-dcu`` written. The two share one Allocate lock, so a pod asking
both vendors is read by the second after the first wrote its progress, and its bind phase
ends once both are done. What a real DCU container would also need -- the ``/dev/kfd`` and
``/dev/dri`` device nodes passed to the runtime -- is not given: no DCU was at hand to
check it against, and the mock DCUs have no device nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from libshared import events, vendors
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger, PodCharge
from services.nodeagent.adapters import kube
from services.nodeagent.adapters.kubeletapi import api_pb2 as api
from services.nodeagent.adapters.kubeletapi import api_pb2_grpc as rpc
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, devicelists, registrations

log = logging.getLogger("vslice.nodeagent")

DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_SOCKET = "vslice-nvidia.sock"
DCU_SOCKET = "vslice-dcu.sock"

LedgerReader = Callable[[], Awaitable[NodeLedger | None]]
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class PluginSettings:
    """``kubelet_dir``: kubelet's device-plugin directory (its ``kubelet.sock`` and this
    plugin's ``socket``); ``node``: the Kubernetes node name; ``watch_interval_s``: seconds
    between checks of both sockets; ``register_timeout_s``: seconds a Register call may
    take; ``release_interval_s``: seconds between checks for pods that left the node;
    ``annotate_retry_s``: seconds before writing the node annotation again after a
    failure; ``stop_grace_s``: seconds calls in flight get to finish at stop (the open
    ``ListAndWatch`` streams are cut after it); ``device_list``: how Allocate names the
    GPUs to the runtime (HAMi's ``--device-list-strategy``, ``--pass-device-specs``);
    ``vendor``: whose devices it serves (``resource_name`` is that vendor's count
    resource); ``release_departed``: it releases the slices of pods that left the node
    (one plugin of a node does)."""

    node: str
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    socket: str = DEFAULT_SOCKET
    resource_name: str = allocating.RESOURCE_NAME
    watch_interval_s: float = 0.5
    register_timeout_s: float = 5.0
    release_interval_s: float = 10.0
    annotate_retry_s: float = 2.0
    stop_grace_s: float = 0.5
    device_list: devicelists.DeviceListSettings = field(
        default_factory=devicelists.DeviceListSettings
    )
    vendor: vendors.Vendor = vendors.NVIDIA
    release_departed: bool = True


def dcu_settings(nvidia: PluginSettings) -> PluginSettings:
    """The DCU plugin's settings beside the NVIDIA plugin's ``nvidia``: the same node,
    directory and periods; its own socket, ``hygon.com/dcunum``, vendor ``DCU``, and no
    sweep of departed pods (the NVIDIA plugin does it for the node)."""
    return replace(
        nvidia,
        socket=DCU_SOCKET,
        resource_name=vendors.DCU.count,
        vendor=vendors.DCU,
        release_departed=False,
    )


def _present(strategy: devicelists.DeviceListSettings) -> frozenset[str]:
    """Which of the optional control nodes exist under the device root, as this process
    sees it (HAMi ``apiDeviceSpecs`` stats them the same way before passing them)."""
    return frozenset(
        p
        for p in devicelists.CONTROL_NODES
        if os.path.exists(os.path.join(strategy.dev_root, p.lstrip("/")))
    )


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class AllocateError(VsliceError):
    """An Allocate that cannot be answered: ``code`` for kubelet, ``reason`` for people."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class DevicePlugin(rpc.DevicePluginServicer):
    """The device plugin of one node (see the module docstring).

    ``pods``: the Kubernetes API; ``slicer``: the node's slices on disk; ``registration``:
    the node's devices now; ``libvgpu``: the installed libvgpu file to mount (the versioned
    copy); ``preload``: the ``ld.so.preload`` file to mount; ``ledger``: reads the node's
    ledger entry, to refuse pods whose annotations it does not back (None: no bus);
    ``minors``: each GPU's device minor (UUID -> the ``N`` of ``/dev/nvidiaN``), for
    device specs; ``lock``: the Allocate lock, shared by the plugins of one node.
    """

    def __init__(
        self,
        *,
        settings: PluginSettings,
        pods: kube.Pods,
        slicer: Slicer,
        registration: NodeDevices,
        libvgpu: Path,
        preload: Path,
        ledger: LedgerReader | None = None,
        minors: Mapping[str, int] | None = None,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.settings = settings
        self.pods = pods
        self.slicer = slicer
        self.libvgpu = libvgpu
        self.preload = preload
        self.ledger = ledger
        self.registration = registration
        self.minors = dict(minors or {})
        self.version = 0
        self.registered_with: tuple[int, int, int] | None = None
        self.registrations = 0  # successful Register calls, for logs and tests
        self._changed = asyncio.Condition()
        self._allocating = lock or asyncio.Lock()
        self._annotate = asyncio.Event()
        self._annotate.set()
        self._server: grpc.aio.Server | None = None
        self._serving: tuple[int, int, int] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def directory(self) -> Path:
        """kubelet's device-plugin directory."""
        return Path(self.settings.kubelet_dir)

    @property
    def socket(self) -> Path:
        """This plugin's socket."""
        return self.directory / self.settings.socket

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on the socket, then keep registered, annotated and swept in the background.
        Raises ``OSError`` when the directory cannot hold the socket."""
        await self._serve()
        self._tasks = [
            asyncio.create_task(self._watch(), name="deviceplugin-watch"),
            asyncio.create_task(self._write_annotation(), name="deviceplugin-annotate"),
        ]
        if self.settings.release_departed:
            self._tasks.append(
                asyncio.create_task(self._release_departed(), name="deviceplugin-release")
            )

    async def stop(self) -> None:
        """Stop the background work and the server, and remove the socket."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._stop_server()

    async def _serve(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a socket left by an earlier run
        server = grpc.aio.server()
        rpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        await server.start()
        self._server = server
        self._serving = _identity(self.socket)
        log.info("device plugin serving", extra={"socket": str(self.socket)})

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=self.settings.stop_grace_s)
            self._server = None
            if _identity(self.socket) == self._serving:
                with contextlib.suppress(FileNotFoundError):
                    self.socket.unlink()

    async def register(self) -> None:
        """Register with kubelet (resource, socket, options). Raises ``grpc.aio.AioRpcError``
        when kubelet refuses or does not answer."""
        request = api.RegisterRequest(
            version=allocating.API_VERSION,
            endpoint=self.settings.socket,
            resource_name=self.settings.resource_name,
            options=self._options(),
        )
        target = f"unix://{self.directory / allocating.KUBELET_SOCKET}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rpc.RegistrationStub(channel)
            await stub.Register(request, timeout=self.settings.register_timeout_s)
        self.registrations += 1

    async def _watch(self) -> None:
        kubelet_sock = self.directory / allocating.KUBELET_SOCKET
        failures = 0  # in a row: the first is a warning, later ones every 30 s or so
        while True:
            try:
                if _identity(self.socket) != self._serving:
                    log.warning("device plugin socket gone; serving again")
                    await self._stop_server()
                    await self._serve()
                    self.registered_with = None
                kubelet = _identity(kubelet_sock)
                if kubelet is None:
                    self.registered_with = None
                elif kubelet != self.registered_with:
                    await self.register()
                    self.registered_with = kubelet
                    failures = 0
                    log.info(
                        "registered with kubelet",
                        extra={
                            "resource": self.settings.resource_name,
                            "socket": self.settings.socket,
                            "registrations": self.registrations,
                        },
                    )
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, OSError) as exc:
                every = max(1, round(30 / self.settings.watch_interval_s))
                if failures % every == 0:
                    log.warning(
                        "kubelet registration failed; retrying",
                        extra={"error": str(exc), "failures": failures + 1},
                    )
                failures += 1
            except Exception:  # never let the watch end: kubelet would lose the plugin
                log.exception("socket watch step failed")
            await asyncio.sleep(self.settings.watch_interval_s)

    # -- devices -----------------------------------------------------------------------

    async def update(
        self, registration: NodeDevices, minors: Mapping[str, int] | None = None
    ) -> None:
        """Take ``registration`` as the node's devices (and ``minors``, when given, as
        their device minors): a changed list (GPUs, health) goes to every
        ``ListAndWatch`` stream and into the node annotation."""
        if minors is not None:
            self.minors = dict(minors)
        if registration == self.registration:
            return
        async with self._changed:
            self.registration = registration
            self.version += 1
            self._changed.notify_all()
        self._annotate.set()
        log.info(
            "device list changed",
            extra={
                "gpus": len(registration.devices),
                "unhealthy": [d.uuid for d in registration.devices if not d.healthy],
            },
        )

    def _devices(self) -> list[api.Device]:
        return [
            api.Device(
                ID=r.id,
                health=allocating.HEALTHY if r.healthy else allocating.UNHEALTHY,
                topology=api.TopologyInfo(nodes=[api.NUMANode(ID=r.numa)]),
            )
            for r in allocating.replicas(self.registration.devices, self.settings.vendor)
        ]

    async def _write_annotation(self) -> None:
        while True:
            await self._annotate.wait()
            self._annotate.clear()
            patch = registrations.vendor_annotations(
                self.registration,
                self.settings.vendor,
                now=datetime.datetime.now(datetime.UTC),
            )
            try:
                await self.pods.annotate_node(self.settings.node, dict(patch))
                log.info("node annotated", extra={"node": self.settings.node, "value": patch})
            except Exception as exc:  # KubeError, or anything else: retried, never fatal
                log.warning("node annotation failed; retrying", extra={"error": str(exc)})
                self._annotate.set()
                await asyncio.sleep(self.settings.annotate_retry_s)

    async def _release_departed(self) -> None:
        while True:
            await asyncio.sleep(self.settings.release_interval_s)
            try:
                pods = await self.pods.pods_on(self.settings.node)
                live = {
                    str((p.get("metadata") or {}).get("uid"))
                    for p in pods
                    if (p.get("status") or {}).get("phase") not in allocating.ENDED_PHASES
                }
                released = self.slicer.release_departed(live)
            except Exception as exc:  # KubeError, a malformed pod, the disk: next round
                log.warning("release of departed pods failed", extra={"error": str(exc)})
                continue
            if released:
                log.info("slices of departed pods released", extra={"keys": released})

    # -- the DevicePlugin service ------------------------------------------------------

    def _options(self) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    async def GetDevicePluginOptions(
        self,
        request: api.Empty,
        context: Context,
    ) -> api.DevicePluginOptions:
        """Preferred allocation on, no PreStartContainer calls."""
        return self._options()

    async def ListAndWatch(
        self,
        request: api.Empty,
        context: Context,
    ) -> AsyncIterator[api.ListAndWatchResponse]:
        """Every replica now, then again on every change, until kubelet hangs up."""
        seen = -1
        while True:
            async with self._changed:
                while self.version == seen:
                    await self._changed.wait()
                seen = self.version
                devices = self._devices()
            yield api.ListAndWatchResponse(devices=devices)

    async def GetPreferredAllocation(
        self,
        request: api.PreferredAllocationRequest,
        context: Context,
    ) -> api.PreferredAllocationResponse:
        """Replicas of the GPUs of the slice the next Allocate of that size is expected
        for; spread over GPUs when none is expected or the API cannot be read (a
        preference is never worth failing a pod for)."""
        try:
            pods = await self.pods.pods_on(self.settings.node)
        except kube.KubeError as exc:
            log.warning("pod list failed; preferring by spread", extra={"error": str(exc)})
            pods = []
        pending, problems = allocating.candidates(
            pods, node=self.settings.node, vendor=self.settings.vendor
        )
        if self.ledger is not None and pending:
            try:
                pending = await self._backed_by_ledger(pending, problems)
            except AllocateError as exc:
                log.warning("ledger unreadable; preferring by spread", extra={"error": exc.reason})
                pending = []
        out = []
        for c in request.container_requests:
            ids = allocating.preferred(
                available=list(c.available_deviceIDs),
                must_include=list(c.must_include_deviceIDs),
                size=c.allocation_size,
                wanted=allocating.expected_uuids(pending, c.allocation_size),
            )
            out.append(api.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return api.PreferredAllocationResponse(container_responses=out)

    async def PreStartContainer(
        self,
        request: api.PreStartContainerRequest,
        context: Context,
    ) -> api.PreStartContainerResponse:
        """Nothing to do before a start (not asked for in the options)."""
        return api.PreStartContainerResponse()

    async def Allocate(
        self,
        request: api.AllocateRequest,
        context: Context,
    ) -> api.AllocateResponse:
        """Each container's slice environment and mounts; the pod's annotations patched.
        Answers ``NOT_FOUND`` when no pending pod fits, ``UNAVAILABLE`` when the API (or
        the ledger) cannot be read or written, ``FAILED_PRECONDITION`` when the pod's slice
        cannot be given (the pod is then marked ``failed``)."""
        async with self._allocating:
            try:
                return await self._allocate(request)
            except AllocateError as exc:
                log.error(
                    "Allocate failed",
                    extra={
                        "code": exc.code.name,
                        "reason": exc.reason,
                        "device_ids": [list(c.devices_ids) for c in request.container_requests],
                    },
                )
                await context.abort(exc.code, exc.reason)
                raise  # abort raises; this line is never reached

    async def _allocate(self, request: api.AllocateRequest) -> api.AllocateResponse:
        node = self.settings.node
        try:
            pods = await self.pods.pods_on(node)
        except kube.KubeError as exc:
            raise AllocateError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        vendor = self.settings.vendor
        pending, problems = allocating.candidates(pods, node=node, vendor=vendor)
        if self.ledger is not None and pending:
            pending = await self._backed_by_ledger(pending, problems)
        for line in problems:
            log.warning("pod not allocatable", extra={"reason": line})
        responses = []
        current: allocating.PendingPod | None = None
        for creq in request.container_requests:
            ids = list(creq.devices_ids)
            try:
                match = allocating.choose(
                    ids,
                    pending if current is None else [current],
                    resource=self.settings.resource_name,
                )
            except allocating.NoCandidate as exc:
                if current is not None:
                    await self._fail(current, exc.reason)
                detail = exc.reason + (f"; skipped: {'; '.join(problems)}" if problems else "")
                raise AllocateError(grpc.StatusCode.NOT_FOUND, detail) from exc
            if match.ambiguous:
                log.warning(
                    "Allocate decided by bind order",
                    extra={"pod": f"{match.pod.namespace}/{match.pod.name}", "device_ids": ids},
                )
            responses.append(await self._container(match))
            current = match.pod.consumed(match.entry)
            log.info(
                "container allocated",
                extra={
                    "pod": f"{match.pod.namespace}/{match.pod.name}",
                    "container": match.container.name,
                    "device_ids": ids,
                    "uuid_hits": match.uuid_hits,
                },
            )
        if current is not None:
            realized = {
                k: (r.mig_uuid, r.gpu_instance_id, max(0, r.compute_instance_id))
                for k, r in self.slicer.realized.items()
            }
            patch = allocating.progress_annotations(current, vendor)
            patch |= allocating.realized_migs(current, realized)
            try:
                await self.pods.annotate_pod(current.namespace, current.name, patch)
            except kube.KubeError as exc:
                raise AllocateError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot record the allocation: {exc}"
                ) from exc
        return api.AllocateResponse(container_responses=responses)

    async def _backed_by_ledger(
        self, pending: list[allocating.PendingPod], problems: list[str]
    ) -> list[allocating.PendingPod]:
        assert self.ledger is not None
        try:
            ledger = await self.ledger()
        except Exception as exc:  # whatever the reader meets: the bus, a timeout, decoding
            raise AllocateError(grpc.StatusCode.UNAVAILABLE, f"ledger unreadable: {exc}") from exc
        backed = []
        for p in pending:
            why = allocating.ledger_disagrees(p, ledger)
            if why is None:
                backed.append(p)
            else:
                problems.append(why)
        return backed

    async def _container(self, match: allocating.Match) -> api.ContainerAllocateResponse:
        pod = match.pod
        try:
            slices = allocating.container_slices(
                match, self.registration.devices, self.settings.vendor
            )
        except ValueError as exc:
            await self._fail(pod, str(exc))
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        placement = events.Placement(
            pod_uid=pod.uid,
            namespace=pod.namespace,
            pod=pod.name,
            node=self.slicer.node,
            slices=slices,
            charge=PodCharge(pod_uid=pod.uid),
        )
        answer = self.slicer.prepare(placement)
        if isinstance(answer, events.Failed):
            await self._fail(pod, answer.reason)
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION, answer.reason)
        [plan] = self.slicer.plan(placement)
        strategy = self.settings.device_list
        device_list = None
        try:
            if plan.cuda:  # the device list strategies name NVIDIA GPUs
                device_list = devicelists.device_list(
                    plan.env["NVIDIA_VISIBLE_DEVICES"].split(","),
                    settings=strategy,
                    response_id=str(uuid.uuid4()),
                    minors=self.minors,
                    present=_present(strategy) if strategy.pass_device_specs else frozenset(),
                )
        except ValueError as exc:
            await self._fail(pod, str(exc))
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        out = allocating.container_response(
            plan,
            layout=self.slicer.layout,
            libvgpu=str(self.libvgpu),
            preload=str(self.preload),
            disable_control=match.container.disable_control,
            device_list=device_list,
        )
        return api.ContainerAllocateResponse(
            envs=out.envs,
            mounts=[
                api.Mount(
                    container_path=m.container_path, host_path=m.host_path, read_only=m.read_only
                )
                for m in out.mounts
            ],
            devices=[
                api.DeviceSpec(
                    container_path=d.container_path,
                    host_path=d.host_path,
                    permissions=d.permissions,
                )
                for d in out.devices
            ],
            annotations=out.annotations,
        )

    async def _fail(self, pod: allocating.PendingPod, reason: str) -> None:
        log.error(
            "pod allocation failed",
            extra={"pod": f"{pod.namespace}/{pod.name}", "reason": reason},
        )
        try:
            await self.pods.annotate_pod(pod.namespace, pod.name, allocating.failed_annotations())
        except kube.KubeError as exc:
            log.warning("bind-phase failed not written", extra={"error": str(exc)})
