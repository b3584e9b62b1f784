"""The manifests wired to the code: each vslice container runs a real ``services.<name>``
module whose settings parser accepts its flags and environment; kube-scheduler's
configuration names vslice's extender at the Service and port the scheduler replicas
serve; the webhook configuration reaches the admission container's port, states its
failure policy and timeout, and its matchConditions (evaluated with a CEL interpreter)
send it exactly the pods it acts on; the node agent mounts what its flags name; every
certificate and seed a pod mounts is one the certificate Job (``vslice.kubecerts``) keeps,
for the names the pod is reached at, mounted read-only; kube-scheduler calls the
extender over mutual TLS."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from libshared import permissions as perms
from services.admission.core import mutating
from services.nodeagent.core import nodeconfigs
from tests.k8s.admission import test_mutating as tables
from tests.k8s.admission.reviews import ctr, pod
from tests.k8s.manifests import built
from vslice import kubecerts

# Flags of the Kubernetes contract that other parts of vslice add to their services
# (scheduler: the extender; nodeagent: the device plugin). Until a service's parser knows
# them they are left out of the parse below -- and once it knows any of them, it must
# know every flag the manifests use. value: whether the flag takes a value.
PENDING: dict[str, dict[str, bool]] = {
    "services.scheduler": {"--extender-port": True, "--kube": False, "--reservation-ttl": True},
    "services.nodeagent": {
        "--device-plugin": False,
        "--kubelet-dir": True,
        "--node-name": True,
        "--kube": False,
    },
}
VSLICE_RESOURCE_NAMES = set(mutating.VSLICE_RESOURCES)


def _help(module: str) -> str:
    parse = importlib.import_module(module + ".settings").parse
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(["--help"], {})
    return out.getvalue()


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _without(args: list[str], drop: set[str], takes_value: dict[str, bool]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = takes_value[name] and "=" not in a
            continue
        out.append(a)
    return out


def _vslice_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = [
        (w, c)
        for w, c in built.base().containers()
        if c["image"] == built.IMAGE and w["kind"] != "Job"
    ]
    assert {c["name"] for _, c in found} == {"admission", "scheduler", "nodeagent", "metrics"}
    return found


@pytest.mark.parametrize("container", ["admission", "scheduler", "nodeagent", "metrics"])
def test_each_container_runs_a_service_whose_parser_accepts_its_flags_and_env(
    container: str, tmp_path: Path
) -> None:
    objects = built.base()
    ((_, spec),) = [(w, c) for w, c in _vslice_containers() if c["name"] == container]
    python, dash_m, module = spec["command"]
    assert (python, dash_m) == ("python", "-m")
    assert re.fullmatch(r"services\.[a-z]+", module)
    assert importlib.util.find_spec(module + ".__main__") is not None, module
    args = list(spec.get("args", []))
    known = set(re.findall(r"--[a-z][a-z0-9-]*", _help(module)))
    pending = PENDING.get(module, {})
    unknown = set(_flags(args)) - known
    assert unknown <= pending.keys(), f"{module}: flags no parser knows: {unknown - pending.keys()}"
    if known & pending.keys():
        assert not unknown, f"{module} has part of the contract's flags; missing {unknown}"
    parse = importlib.import_module(module + ".settings").parse
    settings = parse(_without(args, unknown, pending), _pod_env(spec, tmp_path))
    ports = {p["containerPort"] for p in spec.get("ports", [])}
    if container == "admission":
        assert settings.bus is None  # the webhook needs no NATS
        assert settings.webhook.port in ports
        assert settings.webhook.scheduler_name == "vslice-scheduler"
    else:
        bus = objects.get("ConfigMap", "vslice-bus")["data"]
        assert settings.bus.urls == (bus["nats-url"],)
        assert settings.bus.replicas == int(bus["bucket-replicas"])
    if container == "metrics":
        assert settings.port in ports
    if container == "scheduler":
        assert int(built.flag_value(args, "--extender-port")) in ports
        assert "--kube" in args
    if container == "nodeagent":
        assert settings.slices is not None and settings.slices.backend == "nvml"
        assert {"--device-plugin", "--kube"} <= set(args)
    print(f"{module}: flags parsed by its settings; not yet known to it: {sorted(unknown)}")


def _scheduler_config() -> dict[str, Any]:
    objects = built.base()
    deployment = objects.get("Deployment", "vslice-kube-scheduler")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    path = Path(built.flag_value(container["command"], "--config"))
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    data = objects.get("ConfigMap", volume["configMap"]["name"])["data"]
    config: dict[str, Any] = yaml.safe_load(data[path.name])
    return config


def test_kube_scheduler_runs_the_vslice_profile_with_leader_election() -> None:
    config = _scheduler_config()
    assert (config["apiVersion"], config["kind"]) == (
        "kubescheduler.config.k8s.io/v1",
        "KubeSchedulerConfiguration",
    )
    assert [p["schedulerName"] for p in config["profiles"]] == ["vslice-scheduler"]
    election = config["leaderElection"]
    assert election["leaderElect"] is True
    assert election["resourceNamespace"] == built.NAMESPACE
    # the lease the kube-scheduler's Role lets it update
    role = built.base().get("Role", "vslice-kube-scheduler-lease")
    assert any(election["resourceName"] in r.get("resourceNames", []) for r in role["rules"])
    assert built.base().get("Deployment", "vslice-kube-scheduler")["spec"]["replicas"] >= 2


def test_kube_scheduler_scores_every_feasible_node_so_the_extender_sees_the_best_gpu_node() -> None:
    config = _scheduler_config()
    assert config["percentageOfNodesToScore"] == 100
    for profile in config["profiles"]:  # no profile lowers it again
        assert profile.get("percentageOfNodesToScore", 100) == 100


def test_a_disruption_budget_keeps_one_kube_scheduler_through_a_drain() -> None:
    objects = built.base()
    deployment = objects.get("Deployment", "vslice-kube-scheduler")
    budget = objects.get("PodDisruptionBudget", "vslice-kube-scheduler")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    # a replica that never became ready does not block the drain
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    budgeted = {
        b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for b in objects.of("PodDisruptionBudget")
    }
    several = {
        d["metadata"]["name"]
        for d in objects.of("Deployment") + objects.of("StatefulSet")
        if d["spec"]["replicas"] >= 2
    }
    assert several <= budgeted


def test_the_extender_filters_and_binds_on_the_scheduler_service_and_owns_the_gpu_names() -> None:
    (extender,) = _scheduler_config()["extenders"]
    assert (extender["filterVerb"], extender["bindVerb"]) == ("filter", "bind")
    assert extender["nodeCacheCapable"] is True
    assert extender["weight"] >= 1
    assert extender["ignorable"] is False
    managed = {m["name"]: m["ignoredByScheduler"] for m in extender["managedResources"]}
    assert managed == dict.fromkeys(VSLICE_RESOURCE_NAMES, True)
    url = re.fullmatch(r"https://([a-z-]+)\.([a-z-]+)\.svc:(\d+)", extender["urlPrefix"])
    assert url is not None, extender["urlPrefix"]
    objects = built.base()
    service = objects.get("Service", url.group(1))
    assert service["metadata"]["namespace"] == url.group(2)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(url.group(3))]
    replicas = objects.get("Deployment", "vslice-scheduler")
    assert replicas["spec"]["replicas"] >= 2
    (container,) = replicas["spec"]["template"]["spec"]["containers"]
    (named,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert str(named["containerPort"]) == built.flag_value(container["args"], "--extender-port")


def _webhook() -> dict[str, Any]:
    (config,) = built.base().of("MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert isinstance(hook, dict)
    return hook


def test_the_webhook_states_failure_policy_and_timeout_with_the_reason() -> None:
    hook = _webhook()
    assert hook["failurePolicy"] == "Fail"
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    source = (built.K8S / "base" / "vslice" / "admission.yaml").read_text().splitlines()
    (at,) = [i for i, line in enumerate(source) if line.strip().startswith("failurePolicy:")]
    reason = [line for line in source[at - 8 : at] if line.strip().startswith("#")]
    assert len(reason) >= 3 and any("matchConditions" in line for line in reason)


def test_namespaces_and_pods_labelled_ignore_are_not_sent_to_the_webhook() -> None:
    hook = _webhook()
    ignore = [{"key": "hami.io/webhook", "operator": "NotIn", "values": ["ignore"]}]
    assert hook["namespaceSelector"]["matchExpressions"] == ignore
    assert hook["objectSelector"]["matchExpressions"] == ignore


def test_the_webhook_reaches_the_admission_container_with_the_mounted_certificate() -> None:
    objects = built.base()
    service_ref = _webhook()["clientConfig"]["service"]
    assert service_ref["path"] == "/mutate"
    service = objects.get("Service", service_ref["name"])
    assert service["metadata"]["namespace"] == service_ref["namespace"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    deployment = objects.get("Deployment", "vslice-admission")
    assert deployment["spec"]["replicas"] >= 2
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (named,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert str(named["containerPort"]) == built.flag_value(container["args"], "--webhook-port")
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "vslice-admission-tls"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        assert built.flag_value(container["args"], flag) == f"{mount['mountPath']}/{key}"


def _asks(obj: dict[str, Any]) -> bool:
    """Whether any (init) container names a vslice resource: computed here, apart from
    both the webhook's code and the CEL expression."""
    spec = obj.get("spec", {})
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        res = c.get("resources", {})
        if VSLICE_RESOURCE_NAMES & (set(res.get("limits", {})) | set(res.get("requests", {}))):
            return True
    return False


def _pods() -> list[dict[str, Any]]:
    pods = [given for _, _, given, _ in tables.MUTATIONS]
    pods += [given for _, _, given, _, _ in tables.DENIALS]
    pods += [
        r["request"]["object"] for _, r, _ in tables.SKIPS if r["request"]["kind"]["kind"] == "Pod"
    ]
    for name in sorted(VSLICE_RESOURCE_NAMES):  # each name alone, as limit and as request
        pods += [pod(ctr(limits={name: 1})), pod(ctr(requests={name: 1}))]
        pods += [pod(ctr(), init=(ctr("i", limits={name: 1}),))]
    pods += [
        pod(ctr(limits={"nvidia.com/use-gputype": "A100"})),  # not a resource vslice reads
        pod(ctr(limits={"example.com/fpga": 1}), init=(ctr("i", requests={"cpu": "1"}),)),
        pod(ctr(), init=(ctr("i", requests={"nvidia.com/gpumem": 10}),)),
    ]
    return pods


def test_match_conditions_send_the_webhook_exactly_the_pods_it_acts_on() -> None:
    (condition,) = _webhook()["matchConditions"]
    expression = condition["expression"]
    listed = re.findall(r"'((?:nvidia|hygon)\.com/[a-z-]+)'", expression)
    assert set(listed) == VSLICE_RESOURCE_NAMES
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    pods = _pods()
    assert sum(map(_asks, pods)) >= 30 and sum(not _asks(p) for p in pods) >= 4
    for obj in pods:
        sent = program.evaluate({"object": celpy.json_to_cel(obj)})
        assert bool(sent) is _asks(obj), obj
        if not sent:  # what the webhook is not sent, it would have let through untouched
            outcome = mutating.decide(tables.review(obj), settings=mutating.MutationSettings())
            assert outcome.verdict == "skipped" and outcome.patch == ()


def _pod_env(container: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The container's environment (``built.env``), with a file its parser reads
    (``VSLICE_NODE_CONFIG``) written under ``tmp_path`` from the ConfigMap mounted there."""
    env = built.base().env(container)
    if "VSLICE_NODE_CONFIG" in env:
        mounted = tmp_path / "config.json"
        mounted.write_text(_mounted_file(container, env["VSLICE_NODE_CONFIG"]))
        env["VSLICE_NODE_CONFIG"] = str(mounted)
    return env


def _mounted_file(container: dict[str, Any], path: str) -> str:
    """The text of the ConfigMap key mounted at ``path`` in the node agent's pod."""
    objects = built.base()
    ds = objects.get("DaemonSet", "vslice-nodeagent")
    spec = ds["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == Path(path).parent]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    data: dict[str, str] = objects.get("ConfigMap", volume["configMap"]["name"])["data"]
    return data[Path(path).name]


def test_the_node_agent_reads_hamis_device_config_from_a_configmap_it_mounts() -> None:
    ds = built.base().get("DaemonSet", "vslice-nodeagent")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    text = _mounted_file(container, env["VSLICE_NODE_CONFIG"])
    assert nodeconfigs.parse(text.encode()).nodeconfig == []  # no node overridden


def test_the_node_agent_mounts_the_kubelet_dir_and_host_root_its_flags_name() -> None:
    ds = built.base().get("DaemonSet", "vslice-nodeagent")
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for flag in ("--kubelet-dir", "--host-root"):
        path = built.flag_value(args, flag)
        # the same path inside and on the host: kubelet and Allocate speak host paths
        assert host_paths[mounts[path]] == path
    assert built.flag_value(args, "--kubelet-dir") == "/var/lib/kubelet/device-plugins"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert spec["nodeSelector"] == {"gpu": "on"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_every_service_on_the_bus_uses_the_same_nats_and_bucket_replicas() -> None:
    objects = built.base()
    for name in ("scheduler", "nodeagent", "metrics"):
        ((_, container),) = [(w, c) for w, c in _vslice_containers() if c["name"] == name]
        sources = {
            e["name"]: e["valueFrom"]["configMapKeyRef"]
            for e in container["env"]
            if "configMapKeyRef" in e.get("valueFrom", {})
        }
        assert sources["VSLICE_NATS_URL"] == {"name": "vslice-bus", "key": "nats-url"}
        assert sources["VSLICE_BUCKET_REPLICAS"] == {"name": "vslice-bus", "key": "bucket-replicas"}
    ((_, admission),) = [(w, c) for w, c in _vslice_containers() if c["name"] == "admission"]
    # the webhook uses no bus: nothing in its environment names NATS or the buckets
    names = {e["name"] for e in admission.get("env", [])}
    assert not {n for n in names if "NATS" in n or "BUCKET" in n}, names
    assert objects.has("ConfigMap", "vslice-bus")


def _leaf(secret: str) -> kubecerts.Leaf:
    (leaf,) = [x for x in kubecerts.leaves() if x.secret == secret]
    return leaf


def _in_secret(path: str, mounts: dict[str, str]) -> tuple[str, str]:
    """``(Secret name, key)`` of a file path under one of ``mounts``."""
    p = Path(path)
    (secret,) = [s for m, s in mounts.items() if p.parent == Path(m)]
    return secret, p.name


def test_every_secret_is_mounted_read_only_and_none_mounts_the_ca_key() -> None:
    objects = built.base()
    mounted = set()
    for w, c in objects.containers():
        spec = w["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for m in c.get("volumeMounts", []):
            if m["name"] in secret_volumes:
                assert m.get("readOnly") is True, (built.key(w), c["name"], m)
        mounted |= set(built.secret_mounts(w, c).values())
    assert kubecerts.CA_SECRET not in mounted  # the CA's key stays with the Job
    assert mounted <= kubecerts.secret_names()  # every one of them the Job writes
    for _, c in objects.containers():
        for e in c.get("env", []):  # and no credential in a plain value
            assert "password" not in e["name"].lower() and "SEED" not in e.get("value", "")


@pytest.mark.parametrize(
    ("container", "identity"),
    [("scheduler", "scheduler"), ("nodeagent", "nodeagent"), ("metrics", "metrics")],
)
def test_each_bus_service_connects_over_tls_as_its_own_identity_from_the_jobs_secrets(
    container: str, identity: str, tmp_path: Path
) -> None:
    ((w, spec),) = [(w, c) for w, c in _vslice_containers() if c["name"] == container]
    module = spec["command"][2]
    parse = importlib.import_module(module + ".settings").parse
    args = list(spec.get("args", []))
    pending = PENDING.get(module, {})
    unknown = set(_flags(args)) - set(re.findall(r"--[a-z][a-z0-9-]*", _help(module)))
    bus = parse(_without(args, unknown, pending), _pod_env(spec, tmp_path)).bus
    (wanted,) = [i for i in kubecerts.IDENTITIES if i.name == identity]
    assert bus.identity_name == wanted.name
    mounts = built.secret_mounts(w, spec)
    assert _in_secret(bus.nkey_seed_path, mounts) == (wanted.secret, kubecerts.SEED_KEY)
    assert _in_secret(bus.tls_ca_path, mounts) == (kubecerts.BUS_CA_SECRET, "ca.crt")
    # the server's certificate names the host the service connects to
    (url,) = bus.urls
    host = re.fullmatch(r"nats://([^:/@]+):4222", url)
    assert host is not None and host.group(1) in _leaf("vslice-nats-tls").hosts
    if container == "nodeagent":  # one identity for all nodes (k8s/README.md)
        assert wanted.role is perms.Role.NODEAGENT and wanted.node == perms.ANY_NODE


def test_the_nats_certificate_names_the_client_service_and_every_route() -> None:
    objects = built.base()
    hosts = set(_leaf("vslice-nats-tls").hosts)
    config = objects.get("ConfigMap", "nats-config")["data"]["nats.conf"]
    routes = re.findall(r"nats://([a-z0-9.-]+):6222", config)
    replicas = objects.get("StatefulSet", "nats")["spec"]["replicas"]
    assert len(routes) == replicas and set(routes) <= hosts
    assert {"nats.vslice-system.svc", "*.nats-headless.vslice-system.svc"} <= hosts


def test_kube_scheduler_calls_the_extender_over_mutual_tls_with_the_jobs_certificates() -> None:
    objects = built.base()
    (extender,) = _scheduler_config()["extenders"]
    assert extender["enableHTTPS"] is True
    deployment = objects.get("Deployment", "vslice-kube-scheduler")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = built.secret_mounts(deployment, container)
    tls = extender["tlsConfig"]
    client = "vslice-kube-scheduler-client"
    assert _in_secret(tls["certFile"], mounts) == (client, "tls.crt")
    assert _in_secret(tls["keyFile"], mounts) == (client, "tls.key")
    assert _in_secret(tls["caFile"], mounts) == (client, "ca.crt")
    assert "insecure" not in tls
    # the extender: its certificate names the Service kube-scheduler calls, it listens on
    # the pod's address and asks callers for a certificate from the same CA
    host = re.fullmatch(r"https://([a-z.-]+):\d+", extender["urlPrefix"])
    assert host is not None and host.group(1) in _leaf("vslice-scheduler-tls").hosts
    replicas = objects.get("Deployment", "vslice-scheduler")
    (scheduler,) = replicas["spec"]["template"]["spec"]["containers"]
    settings = importlib.import_module("services.scheduler.settings").parse(
        scheduler["args"], objects.env(scheduler)
    )
    assert settings.extender_host == "<status.podIP>"
    mounts = built.secret_mounts(replicas, scheduler)
    assert settings.tls_cert is not None and settings.tls_key is not None
    assert _in_secret(settings.tls_cert, mounts) == ("vslice-scheduler-tls", "tls.crt")
    assert _in_secret(settings.tls_key, mounts) == ("vslice-scheduler-tls", "tls.key")
    assert settings.tls_client_ca is not None
    assert _in_secret(settings.tls_client_ca, mounts) == ("vslice-scheduler-tls", "ca.crt")


def test_the_webhooks_certificate_names_its_service() -> None:
    service = _webhook()["clientConfig"]["service"]
    assert "caBundle" not in _webhook()["clientConfig"]  # the Job's, kept by apply
    host = f"{service['name']}.{service['namespace']}.svc"
    assert host in _leaf("vslice-admission-tls").hosts
    (config,) = built.base().of("MutatingWebhookConfiguration")
    assert config["metadata"]["name"] == kubecerts.WEBHOOK_CONFIG


def test_the_certificate_job_and_its_monthly_run_provision_this_install() -> None:
    objects = built.base()
    job = objects.get("Job", "vslice-certs")
    cron = objects.get("CronJob", "vslice-certs")
    assert cron["spec"]["jobTemplate"]["spec"] == job["spec"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "vslice-certs"
    assert spec.get("automountServiceAccountToken", True) is True  # it calls the API
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "vslice.kubecerts"]
    settings = kubecerts.parse(container["args"])
    assert settings.namespace == built.NAMESPACE
    assert settings.nats_replicas == objects.get("StatefulSet", "nats")["spec"]["replicas"]
    assert settings.webhook_config == kubecerts.WEBHOOK_CONFIG
    assert not settings.renew  # renews only what is due
    assert "volumeMounts" not in container  # it keeps nothing on disk
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # so a later apply runs it again


def test_the_node_agent_shares_the_host_pid_namespace_to_see_the_pods_processes() -> None:
    # NVML names host pids; the usage read-back and the host-side check read each one's
    # /proc/<pid>/environ and mount namespace, which only the host's /proc shows
    spec = built.base().get("DaemonSet", "vslice-nodeagent")["spec"]["template"]["spec"]
    assert spec.get("hostPID") is True


@pytest.mark.parametrize("container", ["admission", "scheduler", "nodeagent", "metrics"])
def test_each_service_is_probed_over_http_on_healthz_and_readyz_at_the_port_it_serves_them(
    container: str, tmp_path: Path
) -> None:
    ((_, spec),) = [(w, c) for w, c in _vslice_containers() if c["name"] == container]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    liveness, readiness = spec["livenessProbe"], spec["readinessProbe"]
    # HTTP, never tcpSocket: a stalled process still accepts a TCP connection
    assert "tcpSocket" not in liveness and "tcpSocket" not in readiness
    assert liveness["httpGet"]["path"] == "/healthz"
    assert readiness["httpGet"]["path"] == "/readyz"
    for probe in (liveness, readiness):
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP"  # no client certificate
        assert probe["httpGet"]["port"] == liveness["httpGet"]["port"]
    port = ports[liveness["httpGet"]["port"]]
    module = spec["command"][2]
    parse = importlib.import_module(module + ".settings").parse
    pending = PENDING.get(module, {})
    unknown = set(_flags(spec.get("args", []))) - set(
        re.findall(r"--[a-z][a-z0-9-]*", _help(module))
    )
    args = list(spec.get("args", []))
    settings = parse(_without(args, unknown, pending), _pod_env(spec, tmp_path))
    if container == "metrics":  # its own port serves the probes' routes too
        assert port == settings.port
    else:
        assert (settings.health.port, settings.health.host) == (port, "0.0.0.0")
    # a liveness failure restarts the pod: it must not fire on one slow answer
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) >= 30
