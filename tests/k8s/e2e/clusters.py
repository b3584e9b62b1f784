"""A whole vslice Kubernetes cluster for end-to-end tests, every component speaking its
real protocol:

- the API server: kmock's emulator (``tests/scheduler/k8s/kubeapi.py``, HTTP), which sends
  each new pod to the admission webhook (HTTPS ``/mutate``, ``python -m
  services.admission``) and applies its JSONPatch, as the API server does;
- the certificate Job (``python -m vslice.kubecerts``) run first against it: the
  webhook and the extenders serve the certificates it wrote into Secrets (mounted as
  kubelet mounts them), and the API server trusts the webhook through the caBundle the
  Job patched into k8s/'s MutatingWebhookConfiguration, checking the Service's name;
- kube-scheduler: ``kubescheduler.FakeKubeScheduler`` (watches pods, calls ``/filter``
  and ``/bind`` over mutual TLS with the Job's client certificate, spread over the
  replicas as a Service spreads them);
- two scheduler replicas serving the extender (``python -m services.scheduler
  --extender-port ... --kube``, HTTPS, callers' certificates checked against the CA),
  committing on the JetStream ledger of a real nats-server;
- per node (``NodeSpec``: its mock GPUs, optionally HAMi's device-plugin config.json) a
  node agent serving the device plugin (``python -m services.nodeagent --device-plugin
  --kube``) and a fake kubelet (gRPC, the deviceplugin tests' ``FakeKubelet``) that
  calls its ``Allocate``.

``cluster(...)`` starts it all, waits until every part answers (each wait has a deadline
and fails with the tail of every process's log) and yields a ``Cluster``; the tests say
what pods to create and what to check. What each node's GPUs are, and how many device
replicas its kubelet must see, is the caller's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import nats.aio.client

from libshared import connecting
from libshared.connecting import BusSettings
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from tests.k8s.certs.objects import WEBHOOKS, mount, serve_trust_objects
from tests.k8s.e2e.kubescheduler import FakeKubeScheduler
from tests.k8s.nodeagent.fakekubelet import FakeKubelet
from tests.libvgpu import harness
from tests.scheduler.k8s.kubeapi import ApiServer, Refused

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VSLICE_", "KUBERNETES_")) and k not in ("NODE_NAME", "KUBECONFIG")
    }
    env.update(extra)
    return env


class Logs:
    """Where every process writes; ``tail()`` for failure messages."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def tail(self, lines: int = 15) -> str:
        out = []
        for p in sorted(self.folder.glob("*.log")):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)


@contextlib.asynccontextmanager
async def process(
    logs: Logs, name: str, argv: list[str], env: dict[str, str]
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m <argv>`` in the repository, stopped with SIGTERM on the way out."""
    with logs.path(name).open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=harness.ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


async def until(
    check: Callable[[], Any],
    what: str | Callable[[], str],
    logs: Logs,
    *,
    timeout_s: float = START_TIMEOUT_S,
) -> float:
    """Wait (polling) until ``check()`` (sync or async) is true; the seconds it took.
    Raises ``AssertionError`` naming ``what`` (called then, when it is a function, so it
    can tell the state at the deadline) with the tails of the logs after ``timeout_s``."""
    start = time.monotonic()
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            said = what() if callable(what) else what
            raise AssertionError(f"no {said} within {timeout_s} s\n{logs.tail()}")
        await asyncio.sleep(0.02)


async def answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def has_count(count: int, devices: dict[str, str]) -> bool:
    """Whether the kubelet's device list holds ``count`` device IDs."""
    return len(devices) == count


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: e2e, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: e2e, user: {token: e2e}}]\n"
        "contexts: [{name: e2e, context: {cluster: e2e, user: e2e}}]\n"
        "current-context: e2e\n"
    )
    return path


class WebhookClient:
    """How the API server reaches the webhook: the MutatingWebhookConfiguration stored in
    ``api`` names the Service and carries the caBundle; the connection goes to ``url``
    (where the Service would send it) and checks the certificate against that bundle for
    ``<service>.<namespace>.svc``, as the API server does."""

    def __init__(self, api: ApiServer, session: aiohttp.ClientSession, url: str) -> None:
        self.api, self.session, self.url = api, session, url
        self.contexts: dict[str, ssl.SSLContext] = {}

    def tls(self) -> tuple[ssl.SSLContext, str]:
        """The TLS context of the current caBundle and the host name to check."""
        config = self.api.objects[WEBHOOKS, None, "vslice-admission"].raw
        (hook,) = config["webhooks"]
        bundle = hook["clientConfig"]["caBundle"]  # KeyError: the Job did not set it
        if bundle not in self.contexts:
            context = ssl.create_default_context(cadata=base64.b64decode(bundle).decode())
            self.contexts[bundle] = context
        service = hook["clientConfig"]["service"]
        return self.contexts[bundle], f"{service['name']}.{service['namespace']}.svc"

    async def ready(self) -> bool:
        context, host = self.tls()
        try:
            async with self.session.get(
                f"{self.url}/readyz", ssl=context, server_hostname=host
            ) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False


def webhook_admission(webhook: WebhookClient) -> Any:
    """The API server's part of mutating admission: defaults, an AdmissionReview to the
    webhook over the TLS its configuration names, its JSONPatch applied (``Refused`` when
    it says no)."""

    async def admit(pod: dict[str, Any]) -> dict[str, Any]:
        pod = copy.deepcopy(pod)
        pod["spec"].setdefault("schedulerName", "default-scheduler")  # API defaulting
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod["metadata"].get("name", ""),
                "namespace": pod["metadata"].get("namespace", "default"),
                "operation": "CREATE",
                "userInfo": {"username": "e2e"},
                "object": pod,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        context, host = webhook.tls()
        async with webhook.session.post(
            f"{webhook.url}/mutate", json=review, ssl=context, server_hostname=host
        ) as resp:
            assert resp.status == 200, await resp.text()
            answer = (await resp.json())["response"]
        if not answer.get("allowed"):
            raise Refused((answer.get("status") or {}).get("message", "denied"))
        if answer.get("patch"):
            ops = jsonpatch.JsonPatch.from_string(base64.b64decode(answer["patch"]).decode())
            pod = ops.apply(pod)
        return pod

    return admit


def mig_node_config(node: str) -> str:
    """HAMi's device-plugin ``config.json`` putting ``node`` in dynamic-MIG mode."""
    return json.dumps({"nodeconfig": [{"name": node, "operatingmode": "mig"}]})


@dataclass(frozen=True)
class NodeSpec:
    """One node: ``name``; ``devices``, its mock GPUs as ``VSLICE_MOCKGPU_DEVICES`` reads
    them (``<uuid>:<memory_mib>[:<product name>[:mig]]``, comma-separated); ``replicas``,
    how many device IDs its kubelet must see in ``ListAndWatch`` before the node counts as
    up; ``node_config``, the text of HAMi's device-plugin ``config.json`` given to its
    node agent as ``--node-config`` (None: no such file); ``dcus``, its mock Hygon DCUs
    as ``VSLICE_MOCKDCU_DEVICES`` reads them (``<uuid>:<memory_mib>[:<model>]``). A node
    of DCUs only (no ``devices``) serves ``hygon.com/dcunum`` alone: its kubelet is that
    resource's and ``replicas`` counts DCU replicas."""

    name: str
    devices: str
    replicas: int
    node_config: str | None = None
    dcus: str = ""

    @property
    def resource(self) -> str:
        """The resource its kubelet takes registrations for."""
        return "hygon.com/dcunum" if self.dcus and not self.devices else "nvidia.com/gpu"

    @property
    def gpus(self) -> int:
        """How many GPUs ``devices`` lists."""
        return len([d for d in self.devices.split(",") if d])

    @property
    def all_devices(self) -> int:
        """How many devices it registers: its GPUs and its DCUs."""
        return self.gpus + len([d for d in self.dcus.split(",") if d])


@dataclass(frozen=True)
class Cluster:
    """The running cluster: ``api`` (the emulator, its objects and Events) at ``api_url``;
    ``session`` (plain HTTP, for the API server); ``kubelets`` by node name; ``extenders``
    (the replicas' base URLs) and ``extender_session`` (kube-scheduler's mutual TLS);
    ``client_tls``, the mounted Secret of kube-scheduler's client certificate; ``scheduler``
    (the fake kube-scheduler, started); ``nc`` and ``bus``, a NATS connection to the
    cluster's bus; ``logs``; ``root``, the folder every node's files lie under."""

    api: ApiServer
    api_url: str
    session: aiohttp.ClientSession
    kubelets: dict[str, FakeKubelet]
    extenders: list[str]
    extender_session: aiohttp.ClientSession
    client_tls: Path
    scheduler: FakeKubeScheduler
    nc: nats.aio.client.Client
    bus: BusSettings
    logs: Logs
    root: Path

    def host_root(self, node: str) -> Path:
        """The node agent's ``--host-root`` (the mock card's ``mockgpu.state`` lies in it)."""
        return self.root / node / "host"

    def bound(self, name: str, namespace: str = "default") -> str:
        """The node pod ``namespace/name`` is bound to; ``""`` while it is not."""
        pod = self.api.pod(namespace, name) or {}
        return str((pod.get("spec") or {}).get("nodeName", ""))

    def events_of(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        """The Events about pod ``namespace/name``."""
        uid = ((self.api.pod(namespace, name) or {}).get("metadata") or {}).get("uid")
        return [e for e in self.api.events() if e["involvedObject"].get("uid") == uid]

    async def create(self, pod: dict[str, Any]) -> None:
        """POST ``pod`` to the API server (admission included); fails unless it is stored."""
        namespace = pod["metadata"].get("namespace", "default")
        async with self.session.post(
            f"{self.api_url}/api/v1/namespaces/{namespace}/pods", json=pod
        ) as resp:
            assert resp.status in (200, 201), await resp.text()


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    nats_server: NatsServer,
    *,
    nodes: Sequence[NodeSpec],
    split_count: int,
    replicas: int = 2,
) -> AsyncIterator[Cluster]:
    """Start the API server, the certificate Job, the admission webhook, per node in
    ``nodes`` a node agent (``--split-count split_count``) and its kubelet, ``replicas``
    scheduler replicas serving the extender and the fake kube-scheduler; yield once each
    answers (the kubelets see their ``replicas`` device IDs, every node is in the nodes
    bucket, the webhook and every extender answer ``/readyz``). Everything started is
    stopped on the way out. Raises ``AssertionError`` (with the logs' tails) or
    ``TimeoutError`` when a part does not come up within ``START_TIMEOUT_S``."""
    assert harness.LIBVGPU.is_file(), "libvgpu is not built: run `make native`"
    names = [n.name for n in nodes]
    logs = Logs(tmp_path / "logs")
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    bus = nats_server.bus_settings(prefix=prefix)
    sched = nats_server.identity(f"sched-{prefix}", Role.SCHEDULER, prefix=prefix)
    hook_port = free_port()
    hook_url = f"https://127.0.0.1:{hook_port}"

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        api = await stack.enter_async_context(ApiServer())
        await stack.enter_async_context(kmock.Server(api))
        api_url = str(api.url).rstrip("/")
        serve_trust_objects(api)
        webhook = WebhookClient(api, session, hook_url)
        api.admit = webhook_admission(webhook)
        for name in names:
            api.objects["v1/nodes", None, name] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "annotations": {}},
            }
        config = kubeconfig(tmp_path / "kubeconfig", api_url)

        # the certificate Job, then its Secrets as the pods mount them
        job = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "vslice.kubecerts", "--webhook-wait", "30"],
            cwd=harness.ROOT,
            env=clean_env(KUBECONFIG=str(config)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        mounted = mount(api, tmp_path / "secrets")
        hook_tls = mounted / "vslice-admission-tls"
        extender_tls = mounted / "vslice-scheduler-tls"
        client_tls = mounted / "vslice-kube-scheduler-client"
        kube_scheduler_tls = ssl.create_default_context(cafile=str(client_tls / "ca.crt"))
        kube_scheduler_tls.load_cert_chain(client_tls / "tls.crt", client_tls / "tls.key")
        await stack.enter_async_context(
            process(
                logs,
                "admission",
                [
                    *("services.admission", "--webhook-port", str(hook_port)),
                    *("--webhook-host", "127.0.0.1", "--tls-cert", str(hook_tls / "tls.crt")),
                    *("--tls-key", str(hook_tls / "tls.key"), "--log-level", "warning"),
                ],
                clean_env(),
            )
        )

        # per node: a fake kubelet and a node agent serving the device plugin
        kubelets: dict[str, FakeKubelet] = {}
        for spec in nodes:
            node = spec.name
            kubelet = FakeKubelet(tmp_path / node / "device-plugins", resource_name=spec.resource)
            await kubelet.start()
            stack.push_async_callback(kubelet.stop)
            kubelets[node] = kubelet
            node_config: list[str] = []
            if spec.node_config is not None:
                path = tmp_path / node / "config.json"
                path.write_text(spec.node_config)
                node_config = ["--node-config", str(path)]
            await stack.enter_async_context(
                process(
                    logs,
                    f"nodeagent-{node}",
                    [
                        *("services.nodeagent", "--device-plugin", "--kube"),
                        *("--kubelet-dir", str(kubelet.directory), "--node-name", node),
                        *("--host-root", str(tmp_path / node / "host"), "--backend", "mock"),
                        *("--split-count", str(split_count), "--name", f"agent-{node}"),
                        *("--nats-url", nats_server.url, "--prefix", bus.prefix),
                        *nats_server.identity(
                            f"agent-{prefix}-{node}", Role.NODEAGENT, prefix=prefix, node=node
                        ).credential_arguments(),
                        *("--usage-interval", "5", "--log-level", "warning"),
                        *node_config,
                        *(() if spec.devices else ("--gpus", "0")),
                    ],
                    clean_env(
                        KUBECONFIG=str(config),
                        VSLICE_MOCKGPU_DEVICES=spec.devices,
                        VSLICE_MOCKDCU_DEVICES=spec.dcus,
                        NODE_NAME=node,
                    ),
                )
            )
        # the scheduler replicas serving the extender
        max_devices = max(spec.all_devices for spec in nodes)
        extenders = []
        for r in range(replicas):
            port = free_port()
            extenders.append(f"https://127.0.0.1:{port}")
            await stack.enter_async_context(
                process(
                    logs,
                    f"scheduler-{r}",
                    [
                        *("services.scheduler", "--nats-url", nats_server.url),
                        *sched.credential_arguments(),
                        *("--prefix", bus.prefix, "--name", f"extender-{r}"),
                        *("--extender-port", str(port), "--extender-host", "127.0.0.1"),
                        *("--tls-cert", str(extender_tls / "tls.crt")),
                        *("--tls-key", str(extender_tls / "tls.key")),
                        *("--tls-client-ca", str(extender_tls / "ca.crt")),
                        *("--kube", "--max-devices", str(max_devices), "--log-level", "warning"),
                    ],
                    clean_env(KUBECONFIG=str(config)),
                )
            )
        nc = await connecting.connect(bus, name="e2e")
        stack.push_async_callback(nc.close)
        opened = await connecting.ensure_bus(nc.jetstream(), bus)

        async def every_node_registered() -> bool:
            try:
                registered = await opened.nodes.keys()
            except Exception:  # no keys yet
                return False
            return set(names) <= set(registered)

        started = time.monotonic()
        for spec in nodes:
            kubelet = kubelets[spec.name]
            try:
                await kubelet.wait_registered(timeout_s=START_TIMEOUT_S)
                await kubelet.wait_devices(functools.partial(has_count, spec.replicas))
            except TimeoutError as exc:
                raise AssertionError(
                    f"{spec.name}: {exc}; {spec.replicas} device IDs wanted, the kubelet"
                    f" sees {len(kubelet.devices)}\n{logs.tail()}"
                ) from exc
        await until(every_node_registered, "node registration in the nodes bucket", logs)
        await until(webhook.ready, "webhook ready over the Job's certificate", logs)
        extender_session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=kube_scheduler_tls))
        )
        for url in extenders:
            await until(
                functools.partial(answers, extender_session, url + "/readyz"), "extender", logs
            )
        print(f"\n[e2e] stack up in {time.monotonic() - started:.1f} s")

        scheduler = FakeKubeScheduler(
            api_url=api_url, extenders=extenders, nodes=names, tls=kube_scheduler_tls
        )
        await scheduler.start()
        stack.push_async_callback(scheduler.stop)
        yield Cluster(
            api=api,
            api_url=api_url,
            session=session,
            kubelets=kubelets,
            extenders=extenders,
            extender_session=extender_session,
            client_tls=client_tls,
            scheduler=scheduler,
            nc=nc,
            bus=bus,
            logs=logs,
            root=tmp_path,
        )
