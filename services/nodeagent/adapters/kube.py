"""The node agent's calls to the Kubernetes API (kubernetes-asyncio): the pods bound to its
node, the node's annotations, and annotation patches on a pod and on the node.

Pods are read as plain JSON (no model classes): the device plugin's decisions
(``services.nodeagent.core.allocating``) take the objects as the API serves them. Patches
are kubernetes-asyncio's default for a dict body, a strategic merge patch, which for
annotations (a plain map) merges keys and removes those set to ``None``. Nothing here retries or
decides; callers do.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from libshared import kubeclients
from libshared.errors import VsliceError


class KubeError(VsliceError):
    """A Kubernetes API call failed: ``what`` was asked, ``status`` is the HTTP status
    (0: no answer)."""

    def __init__(self, what: str, status: int, reason: str) -> None:
        super().__init__(f"{what}: {status or 'no answer'} {reason}".strip())
        self.what = what
        self.status = status


class Pods(Protocol):
    """What the device plugin needs from the API."""

    async def pods_on(self, node: str) -> list[dict[str, Any]]:
        """Every pod bound to ``node`` (``spec.nodeName``), as JSON objects."""
        ...

    async def annotate_pod(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge ``annotations`` into the pod's (``None`` removes one)."""
        ...

    async def annotate_node(self, node: str, annotations: Mapping[str, str | None]) -> None:
        """Merge ``annotations`` into the node's."""
        ...


class NodeAnnotations(Protocol):
    """What the node agent's cordon loop needs from the API."""

    async def node_annotations(self, node: str) -> dict[str, str]:
        """The node's annotations, read now."""
        ...


async def api_client(host: str | None = None) -> client.ApiClient:
    """An API client: for ``host`` (a URL, no credentials) when given, else the in-cluster
    service account, else ``$KUBECONFIG`` / ``~/.kube/config`` (``libshared.kubeclients``).
    Raises ``KubeConfigError`` naming the source when none of them is usable."""
    return await kubeclients.api_client(kubeclients.KubeSettings(host=host))


class Kube:
    """``Pods`` over ``api`` (closed by its owner)."""

    def __init__(self, api: client.ApiClient, *, timeout_s: float = 10.0) -> None:
        self.core = client.CoreV1Api(api)
        self.timeout_s = timeout_s

    async def _call(self, what: str, call: Awaitable[Any]) -> bytes:
        try:
            resp = await call
            body: bytes = await resp.read()
            resp.release()
        except ApiException as exc:
            raise KubeError(what, exc.status or 0, str(exc.reason)) from exc
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise KubeError(what, 0, str(exc) or type(exc).__name__) from exc
        if not 200 <= resp.status <= 299:
            raise KubeError(what, resp.status, body[:300].decode(errors="replace"))
        return body

    async def pods_on(self, node: str) -> list[dict[str, Any]]:
        """Pods with ``spec.nodeName=<node>`` in every namespace, read now from the API
        server (no cache: an Allocate must see the latest bind). Raises ``KubeError``."""
        what = f"list pods on {node}"
        body = await self._call(
            what,
            self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}",
                _preload_content=False,
                _request_timeout=self.timeout_s,
            ),
        )
        try:
            items = json.loads(body)["items"] or []
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeError(what, 200, f"unreadable pod list: {exc}") from exc
        return [p for p in items if isinstance(p, dict)]

    async def annotate_pod(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge-patch the pod's annotations. Raises ``KubeError``."""
        await self._call(
            f"annotate pod {namespace}/{name}",
            self.core.patch_namespaced_pod(
                name,
                namespace,
                {"metadata": {"annotations": dict(annotations)}},
                _preload_content=False,
                _request_timeout=self.timeout_s,
            ),
        )

    async def node_annotations(self, node: str) -> dict[str, str]:
        """The node's annotations, read now from the API server. Raises ``KubeError``
        (also for a node object without a readable ``metadata.annotations`` map)."""
        what = f"read node {node}"
        body = await self._call(
            what,
            self.core.read_node(node, _preload_content=False, _request_timeout=self.timeout_s),
        )
        try:
            found = (json.loads(body).get("metadata") or {}).get("annotations") or {}
        except (ValueError, AttributeError) as exc:
            raise KubeError(what, 200, f"unreadable node: {exc}") from exc
        if not isinstance(found, dict):
            raise KubeError(what, 200, "metadata.annotations is not a map")
        return {str(k): str(v) for k, v in found.items()}

    async def annotate_node(self, node: str, annotations: Mapping[str, str | None]) -> None:
        """Merge-patch the node's annotations. Raises ``KubeError``."""
        await self._call(
            f"annotate node {node}",
            self.core.patch_node(
                node,
                {"metadata": {"annotations": dict(annotations)}},
                _preload_content=False,
                _request_timeout=self.timeout_s,
            ),
        )
