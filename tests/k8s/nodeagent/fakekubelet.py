"""A fake kubelet: kubelet's side of the device-plugin API v1beta1, over real gRPC on unix
sockets, for tests of vslice's device plugin (here and end to end).

It serves ``Registration`` on ``<directory>/kubelet.sock``; when a plugin registers, it
dials the plugin's socket, asks its options and follows ``ListAndWatch`` (the latest list
is ``devices``). ``admit`` does for one container what kubelet's device manager does:
take healthy replicas nobody holds, ask ``GetPreferredAllocation`` (when the plugin offers
it) and call ``Allocate``::

    kubelet = FakeKubelet(tmp_path / "device-plugins")
    await kubelet.start()
    # ... start the node agent with --device-plugin --kubelet-dir <that directory> ...
    await kubelet.wait_registered()                     # the RegisterRequest
    await kubelet.wait_devices(lambda d: len(d) == 20)  # replica ID -> "Healthy"/...
    got = await kubelet.admit(1)                        # a container asking nvidia.com/gpu: 1
    assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    await kubelet.stop()

Every wait has a deadline (``timeout_s``) and raises ``TimeoutError`` naming what it
waited for. ``Allocate`` errors arrive as ``grpc.aio.AioRpcError`` (``.code()``,
``.details()``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.nodeagent.adapters.kubeletapi import api_pb2 as api
from services.nodeagent.adapters.kubeletapi import api_pb2_grpc as rpc

KUBELET_SOCKET = "kubelet.sock"
VERSION = "v1beta1"


@dataclass(frozen=True)
class Allocation:
    """One container's answer: the replica IDs it was given, ``envs``, ``mounts`` as
    ``(container_path, host_path, read_only)`` and device specs as ``(container_path,
    host_path, permissions)``, and the container's ``annotations`` (CDI requests)."""

    device_ids: tuple[str, ...]
    envs: dict[str, str]
    mounts: tuple[tuple[str, str, bool], ...]
    devices: tuple[tuple[str, str, str], ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)

    def mount(self, container_path: str) -> tuple[str, bool] | None:
        """``(host_path, read_only)`` of the mount at ``container_path``, None if absent."""
        for c, h, ro in self.mounts:
            if c == container_path:
                return h, ro
        return None


def _allocation(ids: Sequence[str], r: api.ContainerAllocateResponse) -> Allocation:
    return Allocation(
        device_ids=tuple(ids),
        envs=dict(r.envs),
        mounts=tuple((m.container_path, m.host_path, m.read_only) for m in r.mounts),
        devices=tuple((d.container_path, d.host_path, d.permissions) for d in r.devices),
        annotations=dict(r.annotations),
    )


class FakeKubelet(rpc.RegistrationServicer):
    """kubelet for one resource (``nvidia.com/gpu``) in ``directory``."""

    def __init__(self, directory: Path | str, *, resource_name: str = "nvidia.com/gpu") -> None:
        self.directory = Path(directory)
        self.resource_name = resource_name
        self.registrations: list[api.RegisterRequest] = []
        self.options: api.DevicePluginOptions | None = None
        self.devices: dict[str, str] = {}
        self.updates = 0  # ListAndWatch messages received
        self.allocated: set[str] = set()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._plugin: rpc.DevicePluginAsyncStub | None = None
        self._watch: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    @property
    def socket(self) -> Path:
        """``<directory>/kubelet.sock``."""
        return self.directory / KUBELET_SOCKET

    async def start(self) -> None:
        """Serve ``Registration`` on a new ``kubelet.sock``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        server = grpc.aio.server()
        rpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Hang up on the plugin and stop serving."""
        await self._disconnect()
        if self._server is not None:
            await self._server.stop(grace=0.05)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    async def restart(self) -> None:
        """What a kubelet restart looks like to a plugin: its connection dropped, every
        socket in the directory removed (kubelet does that when it starts), and a new
        ``kubelet.sock``."""
        await self.stop()
        for p in self.directory.iterdir():
            if p.is_socket():
                p.unlink()
        await self.start()

    # -- Registration --------------------------------------------------------------------

    async def Register(
        self, request: api.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api.Empty:
        """Record the registration, refuse a wrong version or resource as kubelet does,
        then dial the plugin (in the background, as kubelet does)."""
        if request.version != VERSION:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version {request.version}")
        if request.resource_name != self.resource_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"resource {request.resource_name}"
            )
        async with self._changed:
            self.registrations.append(request)
            self._changed.notify_all()
        asyncio.get_running_loop().create_task(self._connect(request.endpoint))
        return api.Empty()

    async def _disconnect(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._plugin = None

    async def _connect(self, endpoint: str) -> None:
        await self._disconnect()
        self._channel = grpc.aio.insecure_channel(f"unix://{self.directory / endpoint}")
        self._plugin = rpc.DevicePluginStub(self._channel)
        options = await self._plugin.GetDevicePluginOptions(api.Empty(), timeout=10)
        async with self._changed:
            self.options = options
            self._changed.notify_all()
        self._watch = asyncio.get_running_loop().create_task(self._follow(self._plugin))

    async def _follow(self, plugin: rpc.DevicePluginAsyncStub) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for message in plugin.ListAndWatch(api.Empty()):
                async with self._changed:
                    self.devices = {d.ID: d.health for d in message.devices}
                    self.updates += 1
                    self._changed.notify_all()

    # -- waiting -------------------------------------------------------------------------

    async def _until(self, what: str, ready: Callable[[], bool], timeout_s: float) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(ready)

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"fake kubelet: no {what} within {timeout_s} s") from None

    async def wait_registered(
        self, count: int = 1, *, timeout_s: float = 30
    ) -> api.RegisterRequest:
        """The ``count``-th registration (and the plugin dialled back)."""
        await self._until(
            f"registration #{count}",
            lambda: len(self.registrations) >= count and self._plugin is not None,
            timeout_s,
        )
        return self.registrations[count - 1]

    async def wait_devices(
        self,
        ready: Callable[[dict[str, str]], bool] = bool,
        *,
        timeout_s: float = 30,
    ) -> dict[str, str]:
        """The latest ``ListAndWatch`` list (replica ID -> health) once ``ready`` holds."""
        await self._until("matching device list", lambda: ready(self.devices), timeout_s)
        return dict(self.devices)

    async def list_and_watch(self, *, timeout_s: float = 30) -> dict[str, str]:
        """The device list once the plugin has sent one."""
        await self._until("ListAndWatch message", lambda: self.updates > 0, timeout_s)
        return dict(self.devices)

    # -- calls ---------------------------------------------------------------------------

    def _stub(self) -> rpc.DevicePluginAsyncStub:
        if self._plugin is None:
            raise RuntimeError("fake kubelet: no plugin registered")
        return self._plugin

    async def preferred(
        self,
        size: int,
        *,
        available: Sequence[str] | None = None,
        must_include: Sequence[str] = (),
    ) -> list[str]:
        """``GetPreferredAllocation`` for one container (``available``: default the healthy
        replicas nobody holds)."""
        free = self.free() if available is None else list(available)
        reply = await self._stub().GetPreferredAllocation(
            api.PreferredAllocationRequest(
                container_requests=[
                    api.ContainerPreferredAllocationRequest(
                        available_deviceIDs=free,
                        must_include_deviceIDs=list(must_include),
                        allocation_size=size,
                    )
                ]
            ),
            timeout=30,
        )
        return list(reply.container_responses[0].deviceIDs)

    async def allocate(self, *containers: Sequence[str]) -> list[Allocation]:
        """``Allocate`` with one container request per argument (replica IDs); raises
        ``grpc.aio.AioRpcError`` when the plugin refuses."""
        reply = await self._stub().Allocate(
            api.AllocateRequest(
                container_requests=[
                    api.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers
                ]
            ),
            timeout=30,
        )
        return [
            _allocation(ids, r)
            for ids, r in zip(containers, reply.container_responses, strict=True)
        ]

    def free(self) -> list[str]:
        """Healthy replicas that no admitted container holds, in advertised order."""
        return [d for d, h in self.devices.items() if h == "Healthy" and d not in self.allocated]

    async def admit(self, count: int) -> Allocation:
        """Admit one container asking for ``count`` of the resource, as kubelet does:
        pick free healthy replicas (the plugin's preference when it offers one), Allocate
        them, and hold them. Raises ``grpc.aio.AioRpcError`` when Allocate fails (nothing
        is held then) and ``RuntimeError`` when too few replicas are free."""
        free = self.free()
        if len(free) < count:
            raise RuntimeError(f"fake kubelet: {count} replicas asked, {len(free)} free")
        ids = free[:count]
        if self.options is not None and self.options.get_preferred_allocation_available:
            ids = await self.preferred(count, available=free)
        [got] = await self.allocate(ids)
        self.allocated.update(ids)
        return got

    def release(self, device_ids: Sequence[str]) -> None:
        """A container ended: its replicas are free again."""
        self.allocated.difference_update(device_ids)
