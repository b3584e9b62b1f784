"""Kubernetes API clients (kubernetes-asyncio) for the services that talk to the API server.

One way to build a client for every service: an explicit API server URL (tests, and
``kubectl proxy``), else the pod's service account when running in a cluster
(``KUBERNETES_SERVICE_HOST`` set), else a kubeconfig file (``$KUBECONFIG``, else
``~/.kube/config``). The settings are one frozen object passed explicitly; no client is
kept in a module global (the habit HAMi's Go code has).

What it leaves to others: which API calls to make (the services' ``adapters/kube.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from libshared.errors import VsliceError

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"  # set by kubelet in every pod


class KubeConfigError(VsliceError):
    """No usable API server configuration: names the source tried and why it failed."""


@dataclass(frozen=True)
class KubeSettings:
    """Where the API server is.

    ``host``: the API server's URL (e.g. ``http://127.0.0.1:8001``); wins over the rest.
    ``kubeconfig``: path of a kubeconfig file (``None``: ``$KUBECONFIG``, else
    ``~/.kube/config``). ``context``: its context (``None``: the current one).
    ``in_cluster``: use the pod's service account (``None``: when ``KUBERNETES_SERVICE_HOST``
    is set). ``request_timeout_s``: timeout of one API request, seconds (watches are not
    bounded by it).
    """

    host: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool | None = None
    request_timeout_s: float = 10.0


def describe(settings: KubeSettings, environ: Mapping[str, str] | None = None) -> str:
    """Which source ``api_client`` would use, for logs: ``host <url>``, ``in-cluster``
    or ``kubeconfig <path>``."""
    env = os.environ if environ is None else environ
    if settings.host:
        return f"host {settings.host}"
    if settings.in_cluster or (settings.in_cluster is None and env.get(IN_CLUSTER_ENV)):
        return "in-cluster"
    return f"kubeconfig {_kubeconfig_path(settings, env)}"


def _kubeconfig_path(settings: KubeSettings, env: Mapping[str, str]) -> str:
    if settings.kubeconfig:
        return settings.kubeconfig
    first = (env.get("KUBECONFIG") or "").split(os.pathsep)[0]
    return first or str(Path.home() / ".kube" / "config")


async def api_client(
    settings: KubeSettings, environ: Mapping[str, str] | None = None
) -> client.ApiClient:
    """A new ``ApiClient`` for ``settings`` (the caller closes it: ``async with``).

    Raises ``KubeConfigError`` naming the source when the in-cluster service account or
    the kubeconfig file cannot be read.
    """
    env = os.environ if environ is None else environ
    conf = client.Configuration()
    source = describe(settings, env)
    try:
        if settings.host:
            conf.host = settings.host.rstrip("/")
        elif source == "in-cluster":
            # kubernetes-asyncio leaves this one loader unannotated
            config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=_kubeconfig_path(settings, env),
                context=settings.context,
                client_configuration=conf,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError) as exc:
        raise KubeConfigError(f"Kubernetes API from {source}: {exc}") from exc
    return client.ApiClient(configuration=conf)
