"""A Kubernetes API server for tests: kmock's ``KubernetesEmulator`` (real HTTP, the API's
URLs, list, watch, create, merge and JSON patch, delete) plus what the scheduler needs
that kmock 0.8 does not do itself:

- kubernetes-asyncio asks for a watch with ``?watch=True``; the real API server accepts
  any spelling Go's ``strconv.ParseBool`` does, kmock only ``true``: the query is
  normalized before kmock reads it;
- a created pod gets what the API server sets: ``metadata.uid`` (a UUID),
  ``resourceVersion``, ``creationTimestamp`` and ``status.phase: Pending``;
- ``POST .../pods/<name>/binding`` (the Binding subresource) sets ``spec.nodeName``,
  answers a ``Status`` 201, and 409 Conflict for a pod already bound or a UID
  precondition that does not match, as the API server does;
- a merge patch naming ``metadata.uid`` is a precondition: 409 when it does not match;
- ``admit``: an optional admission step for created pods (the end-to-end test sends them
  to the mutating webhook and applies its JSONPatch), a refusal answered 400;
- the ResourceQuotas the scheduler watches are served like any namespaced object;
- kmock keeps every request for assertions and finds each new one's reaction by scanning
  all the requests it keeps, so a request costs more the more came before (about 0.3 s
  after a thousand on this machine): this server keeps only the requests not dispatched
  yet (its tests assert on the objects, not on the requests).
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering

Admit = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
PODS = kmock.resource("", "v1", "pods")


class Refused(Exception):
    """The admission step refused a pod: the message goes back to the client."""


def _conflict(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=409, reason="Conflict", message=message)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """See the module docstring. ``objects`` holds what was stored and ``bindings`` the
    Binding objects accepted, for assertions."""

    admit: Admit | None = None
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _dispatching: set[int] = attrs.field(factory=set, init=False)
    bindings: list[dict[str, Any]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        self.resources["v1/nodes"] = kmock.ResourceInfo(kind="Node", namespaced=False)
        self.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True)
        self.resources["v1/resourcequotas"] = kmock.ResourceInfo(
            kind="ResourceQuota", namespaced=True
        )

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        watch = raw.query.get("watch")
        if watch is not None and watch.lower() in ("true", "1", "t") and watch != "true":
            raw = raw.clone(rel_url=raw.rel_url.update_query(watch="true"))
        return await super().__call__(raw)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored pod, or None when there is none (or it was deleted)."""
        key = (PODS, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def pods(self) -> list[dict[str, Any]]:
        """Every stored pod."""
        return [o.raw for (res, _, _), o in self.objects.items() if res == PODS and not o.deleted]

    def events(self) -> list[dict[str, Any]]:
        """Every stored Event."""
        events = kmock.resource("", "v1", "events")
        return [o.raw for (res, _, _), o in self.objects.items() if res == events and not o.deleted]

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            if request.resource == PODS:
                if request.subresource == "binding" and request.method == kmock.method.POST:
                    return await self._bind(request)
                if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                    await self._create(request.data)
                elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
                    self._precondition(request)
            # kmock finds a request's reaction by scanning the requests it keeps: keep only
            # the ones not dispatched yet (see the module docstring)
            self._dispatching.add(id(request))
            self._requests[:] = [r for r in self._requests if id(r) in self._dispatching]
            if not any(r is request for r in self._requests):
                self._requests.append(request)
            return await super()._handle(request)
        finally:
            self._dispatching.discard(id(request))

    def _dispatched(self, request: rendering.Request) -> None:
        self._dispatching.discard(id(request))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        self._dispatched(request)
        return await super()._serve_list(request)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        self._dispatched(request)
        async for item in super()._serve_watch(request):
            yield item

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        self._dispatched(request)
        return await super()._serve_fetch(request)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        self._dispatched(request)
        return await super()._serve_create(request)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        self._dispatched(request)
        return await super()._serve_update(request)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        self._dispatched(request)
        return await super()._serve_delete(request)

    async def _create(self, data: dict[str, Any]) -> None:
        if self.admit is not None:
            try:
                admitted = await self.admit(data)
            except Refused as exc:
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message=f"admission webhook denied: {exc}"
                ) from exc
            data.clear()
            data.update(admitted)
        meta = data.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("namespace", "default")
        meta["resourceVersion"] = str(next(self._versions))
        meta.setdefault(
            "creationTimestamp",
            datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
        )
        data.setdefault("status", {}).setdefault("phase", "Pending")

    def _precondition(self, request: rendering.Request) -> None:
        want = (request.data.get("metadata") or {}).get("uid")
        stored = self.pod(request.namespace or "", request.name or "")
        if want and stored is not None and stored["metadata"].get("uid") != want:
            raise _conflict(
                f"Precondition failed: UID in precondition: {want}, UID in object meta: "
                f"{stored['metadata'].get('uid')}"
            )

    async def _bind(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (PODS, request.namespace, request.name)
        data = request.data if isinstance(request.data, dict) else {}
        target = (data.get("target") or {}).get("name")
        if not target:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="Binding.target.name is empty"
            )
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self.objects[key]
            uid = obj.raw["metadata"].get("uid")
            want = (data.get("metadata") or {}).get("uid")
            if want and want != uid:
                raise _conflict(
                    f"Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                )
            bound = obj.raw["spec"].get("nodeName")
            if bound:
                raise _conflict(f"pod {request.name} is already assigned to node {bound!r}")
            obj.patch(
                {
                    "metadata": {"resourceVersion": str(next(self._versions))},
                    "spec": {"nodeName": target},
                    "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]},
                }
            )
            await self._buses[PODS].put({"type": "MODIFIED", "object": obj.raw})
            self.bindings.append(data)
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Success",
                "code": 201,
            },
            status=201,
        )

    async def set_phase(self, namespace: str, name: str, phase: str) -> None:
        """What kubelet does when the pod's containers end: ``status.phase`` and a
        MODIFIED event."""
        async with self._lock:
            obj = self.objects[PODS, namespace, name]
            obj.patch({"status": {"phase": phase}})
            await self._buses[PODS].put({"type": "MODIFIED", "object": obj.raw})
