"""The k8s/ manifests as objects: every kustomization builds with the kubectl on PATH without a
warning, every object validates offline against the schemas of each supported Kubernetes
minor (strict: no unknown fields) with that minor's kube-scheduler, names resolve
(namespaces, ServiceAccounts, ConfigMaps, Service selectors and ports), images are pinned,
NATS is a 3-node JetStream cluster over TLS whose config -- with the authorization and
certificates the certificate Job writes -- nats-server accepts, and the external-nats
overlay is the base without NATS, pointed elsewhere."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from libshared import trust
from libshared.natsserver import find_binary
from tests.k8s.manifests import built
from vslice import kubecerts

BUILDS = {"base": built.base, "external-nats": built.overlay}
KUSTOMIZATIONS = {
    "k8s": built.BASE,
    "external-nats": built.OVERLAY,
    **{f"kube-{minor}": built.minor_overlay(minor) for minor in built.KUBE_SCHEDULER},
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
NATS_OBJECTS = {
    ("StatefulSet", "vslice-system", "nats"),
    ("Service", "vslice-system", "nats"),
    ("Service", "vslice-system", "nats-headless"),
    ("ConfigMap", "vslice-system", "nats-config"),
    ("PodDisruptionBudget", "vslice-system", "nats"),
    ("NetworkPolicy", "vslice-system", "nats"),
}
# the workloads whose NATS CA the overlay takes from the operator's Secret
BUS_CLIENTS = {
    ("Deployment", "vslice-system", "vslice-scheduler"),
    ("DaemonSet", "vslice-system", "vslice-nodeagent"),
    ("Deployment", "vslice-system", "vslice-metrics"),
}
RELOADER = r"natsio/nats-server-config-reloader:0\.\d+\.\d+"


def _validate_strictly(objects: built.Objects, minor: str) -> None:
    """Every object against ``minor``'s own schemas (kubernetes-validate ships one set per
    minor: a schema of another minor is never taken instead), no unknown field allowed."""
    assert len(objects.items) >= 25
    for obj in objects.items:
        try:
            version = kubernetes_validate.validate(obj, minor, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{minor}: {built.key(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{minor}: {built.key(obj)}: {exc.message}")
        assert version == minor


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_builds_without_a_warning(name: str) -> None:
    done = built.kustomize(KUSTOMIZATIONS[name])
    assert done.stderr == "", done.stderr  # kustomize's deprecations land here


@pytest.mark.parametrize("minor", built.KUBE_SCHEDULER)
def test_each_minors_build_validates_against_its_schemas_with_its_kube_scheduler(
    minor: str,
) -> None:
    objects = built.for_minor(minor)
    _validate_strictly(objects, minor)
    images = {c["name"]: c["image"] for _, c in objects.containers()}
    assert (
        images["kube-scheduler"] == f"registry.k8s.io/kube-scheduler:{built.KUBE_SCHEDULER[minor]}"
    )
    assert built.KUBE_SCHEDULER[minor].startswith(f"v{minor}.")
    # the overlay is the base with another kube-scheduler tag, nothing else
    assert _without_kube_scheduler_image(objects) == _without_kube_scheduler_image(built.base())


def _without_kube_scheduler_image(objects: built.Objects) -> list[dict[str, Any]]:
    out = copy.deepcopy(list(objects.items))
    for obj in out:
        if built.key(obj) == ("Deployment", built.NAMESPACE, "vslice-kube-scheduler"):
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            container["image"] = "<kube-scheduler>"
    return sorted(out, key=built.key)


@pytest.mark.parametrize("name", BUILDS)
def test_the_default_builds_validate_against_the_newest_minor_with_its_kube_scheduler(
    name: str,
) -> None:
    objects = BUILDS[name]()
    _validate_strictly(objects, built.NEWEST)
    images = {c["name"]: c["image"] for _, c in objects.containers()}
    tag = built.KUBE_SCHEDULER[built.NEWEST]
    assert images["kube-scheduler"] == f"registry.k8s.io/kube-scheduler:{tag}"


def test_a_minors_component_sets_kube_scheduler_on_a_kustomization_of_ones_own(
    tmp_path: Path,
) -> None:
    # the external-nats overlay for a 1.31 cluster, as an operator would write it
    ours = tmp_path / "site"
    ours.mkdir()
    overlay = os.path.relpath(built.OVERLAY, ours)
    component = os.path.relpath(built.K8S / "components" / "kube-scheduler-1.31", ours)
    (ours / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [overlay],
                "components": [component],
            }
        )
    )
    done = built.kustomize(ours)
    assert done.stderr == ""
    objects = built.Objects(built.build(ours))
    images = {c["name"]: c["image"] for _, c in objects.containers()}
    assert (
        images["kube-scheduler"] == f"registry.k8s.io/kube-scheduler:{built.KUBE_SCHEDULER['1.31']}"
    )
    assert not objects.has("StatefulSet", "nats")


def test_every_component_and_overlay_of_a_minor_is_in_the_table() -> None:
    components = {p.name for p in (built.K8S / "components").iterdir() if p.is_dir()}
    assert components == {f"kube-scheduler-{minor}" for minor in built.KUBE_SCHEDULER}
    overlays = {p.name for p in (built.K8S / "overlays").iterdir() if p.name.startswith("kube-")}
    assert overlays == {f"kube-{minor}" for minor in built.KUBE_SCHEDULER}


@pytest.mark.parametrize("name", BUILDS)
def test_each_object_is_unique_and_in_vslice_system_unless_cluster_wide(name: str) -> None:
    objects = BUILDS[name]()
    keys = [built.key(o) for o in objects.items]
    assert len(keys) == len(set(keys))
    for obj in objects.items:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert namespace is None, built.key(obj)
        elif built.key(obj) == ("RoleBinding", "kube-system", "vslice-kube-scheduler-auth-reader"):
            continue
        else:
            assert namespace == built.NAMESPACE, built.key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vslice"


def test_the_namespace_is_labelled_so_the_webhook_skips_vslices_own_pods() -> None:
    ns = built.base().get("Namespace", built.NAMESPACE)
    assert ns["metadata"]["labels"]["hami.io/webhook"] == "ignore"


@pytest.mark.parametrize("name", BUILDS)
def test_service_accounts_and_config_maps_that_pods_name_exist(name: str) -> None:
    objects = BUILDS[name]()
    for w in objects.workloads():
        spec = w["spec"]["template"]["spec"]
        account = spec.get("serviceAccountName")
        if account is not None:
            assert objects.has("ServiceAccount", account), built.key(w)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert objects.has("ConfigMap", volume["configMap"]["name"]), built.key(w)
    for _, c in objects.containers():
        objects.env(c)  # every configMapKeyRef resolves to a key of this build


def _ports(workload: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in workload["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            out[p["name"]] = p["containerPort"]
    return out


@pytest.mark.parametrize("name", BUILDS)
def test_every_service_selects_one_workload_and_targets_its_named_ports(name: str) -> None:
    objects = BUILDS[name]()
    for svc in objects.of("Service"):
        selector = svc["spec"]["selector"]
        chosen = [
            w
            for w in objects.workloads()
            if w["metadata"]["namespace"] == svc["metadata"]["namespace"]
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, (built.key(svc), [built.key(w) for w in chosen])
        ports = _ports(chosen[0])
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (built.key(svc), port)
    for w in objects.workloads():
        if w["kind"] == "Job":  # the API server writes a Job's selector
            continue
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", BUILDS)
def test_images_are_pinned_and_vslice_uses_one_image(name: str) -> None:
    images = {c["name"]: c["image"] for _, c in BUILDS[name]().containers()}
    for container, image in images.items():
        assert not image.endswith(":latest") and ":" in image, (container, image)
        if container in ("kube-scheduler", "nats"):
            continue
        if container == "reloader":
            assert re.fullmatch(RELOADER, image), image
            continue
        assert image == built.IMAGE, (container, image)
    assert re.fullmatch(r"registry\.k8s\.io/kube-scheduler:v1\.\d+\.\d+", images["kube-scheduler"])
    if name == "base":
        assert re.fullmatch(r"nats:2\.\d+\.\d+(-alpine)?", images["nats"])


def test_every_container_has_requests_a_memory_limit_and_no_privilege_escalation() -> None:
    for w, c in built.base().containers():
        resources = c["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), built.key(w)
        assert "memory" in resources["limits"], built.key(w)
        security = c["securityContext"]
        if c["name"] == "nodeagent":
            # the device plugin's socket dir, the host root and NVML: documented in place
            assert security["privileged"] is True
            continue
        assert security["allowPrivilegeEscalation"] is False, built.key(w)
        assert security["capabilities"]["drop"] == ["ALL"], built.key(w)


def _nats_config() -> str:
    config: str = built.base().get("ConfigMap", "nats-config")["data"]["nats.conf"]
    return config


def test_nats_is_a_three_node_jetstream_cluster_routed_through_the_headless_service() -> None:
    objects = built.base()
    sts = objects.get("StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3
    headless = objects.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    config = _nats_config()
    routes = re.findall(r"nats://(nats-\d)\.([a-z-]+)\.([a-z-]+)\.svc:6222", config)
    assert routes == [(f"nats-{i}", "nats-headless", "vslice-system") for i in range(3)]
    assert re.search(r"^jetstream \{", config, re.M)
    store = re.search(r"store_dir: (\S+)", config)
    assert store is not None
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == store.group(1)
    config_file = built.flag_value(container["command"], "--config")
    assert Path(config_file).parent == Path(mounts["config"])
    client = objects.get("Service", "nats")
    assert [p["port"] for p in client["spec"]["ports"]] == [4222]
    bus = objects.get("ConfigMap", "vslice-bus")["data"]
    assert bus["nats-url"] == "nats://nats.vslice-system.svc:4222"
    assert bus["bucket-replicas"] == "3"


def _provisioned(directory: Path, mounts: dict[str, str]) -> Path:
    """What the certificate Job writes, at the NATS pod's mount paths under
    ``directory``: its auth.conf (real seeds) and NATS certificate (a real CA)."""
    for path, secret in mounts.items():
        (directory / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        if secret == kubecerts.AUTH_SECRET:
            seeds = {i.name: trust.new_nkey_seed() for i in kubecerts.IDENTITIES}
            conf = kubecerts.authorization_conf(seeds, prefix="vslice")
            (directory / path.lstrip("/") / kubecerts.AUTH_KEY).write_bytes(conf)
        elif secret == "vslice-nats-tls":
            ca_cert, ca_key = trust.new_ca()
            (leaf,) = [x for x in kubecerts.leaves() if x.secret == secret]
            cert, key = trust.issue_certificate(
                ca_cert, ca_key, common_name=leaf.common_name, hosts=leaf.hosts
            )
            for name, data in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca_cert)):
                (directory / path.lstrip("/") / name).write_bytes(data)
    return directory


def test_nats_runs_tls_for_clients_and_routes_and_includes_the_jobs_authorization() -> None:
    config = _nats_config()
    objects = built.base()
    sts = objects.get("StatefulSet", "nats")
    containers = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    mounts = built.secret_mounts(sts, containers["nats"])
    assert sorted(mounts.values()) == [kubecerts.AUTH_SECRET, "vslice-nats-tls"]
    tls_dir = next(p for p, s in mounts.items() if s == "vslice-nats-tls")
    blocks = re.findall(r"tls \{([^}]*)\}", config)
    assert len(blocks) == 2  # clients and, inside cluster {}, routes
    for block in blocks:
        files = (("cert_file", "tls.crt"), ("key_file", "tls.key"), ("ca_file", "ca.crt"))
        for field, key in files:
            assert re.search(rf"{field}: {re.escape(tls_dir)}/{key}\b", block), block
    assert "verify: true" in blocks[1]
    cluster = config[config.index("cluster {") :]
    assert "tls {" in cluster
    (include,) = re.findall(r"^include (\S+)$", config, re.M)
    config_dir = Path(built.flag_value(containers["nats"]["command"], "--config")).parent
    auth_dir = next(p for p, s in mounts.items() if s == kubecerts.AUTH_SECRET)
    assert (config_dir / include).resolve() == Path(auth_dir) / kubecerts.AUTH_KEY
    # the reloader watches every file nats-server reads and signals it through the pid file
    assert sts["spec"]["template"]["spec"]["shareProcessNamespace"] is True
    args = containers["reloader"]["args"]
    watched = {args[i + 1] for i, a in enumerate(args) if a == "-config"}
    assert watched == {
        str(config_dir / "nats.conf"),
        str(Path(auth_dir) / kubecerts.AUTH_KEY),
        *(f"{tls_dir}/{k}" for k in ("tls.crt", "tls.key", "ca.crt")),
    }
    assert built.flag_value(args, "-pid") in built.flag_value(
        containers["nats"]["lifecycle"]["preStop"]["exec"]["command"], "--signal"
    )
    assert built.secret_mounts(sts, containers["reloader"]) == mounts


def test_nats_server_accepts_the_cluster_config_with_the_jobs_files(tmp_path: Path) -> None:
    objects = built.base()
    sts = objects.get("StatefulSet", "nats")
    (container,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats"]
    root = _provisioned(tmp_path, built.secret_mounts(sts, container))
    config_file = built.flag_value(container["command"], "--config")
    conf = root / config_file.lstrip("/")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(_nats_config().replace("/etc/nats/", f"{root}/etc/nats/"))
    done = subprocess.run(
        [str(find_binary()), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, POD_NAME="nats-0"),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout + done.stderr


def test_only_vslice_services_reach_nats_and_only_kube_scheduler_the_extender() -> None:
    objects = built.base()
    nats = objects.get("NetworkPolicy", "nats")["spec"]
    assert nats["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}
    assert nats["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r["from"] for r in nats["ingress"]}
    assert rules.keys() == {"client", "cluster"}  # monitor: no pod
    ((clients,),) = [rules["client"]]
    (expr,) = clients["podSelector"]["matchExpressions"]
    assert (expr["key"], expr["operator"]) == ("app.kubernetes.io/name", "In")
    assert set(expr["values"]) == {"vslice-scheduler", "vslice-nodeagent", "vslice-metrics"}
    nats_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}
    assert rules["cluster"] == [nats_pods]
    for rule in nats["ingress"]:  # same namespace only: no namespaceSelector, no ipBlock
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])
    extender = objects.get("NetworkPolicy", "vslice-scheduler")["spec"]
    assert extender["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vslice-scheduler"}
    ((rule),) = extender["ingress"]
    assert rule["ports"] == [{"port": "extender", "protocol": "TCP"}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vslice-kube-scheduler"}}}
    ]


def test_the_external_nats_overlay_is_the_base_without_nats_pointed_elsewhere() -> None:
    base = {built.key(o): o for o in built.base().items}
    overlay = {built.key(o): o for o in built.overlay().items}
    assert base.keys() >= NATS_OBJECTS
    assert overlay.keys() == base.keys() - NATS_OBJECTS
    bus = ("ConfigMap", "vslice-system", "vslice-bus")
    for k in overlay.keys() - {bus} - BUS_CLIENTS:
        assert overlay[k] == base[k], k
    for k in BUS_CLIENTS:  # the same but for the CA of the NATS server
        changed = copy.deepcopy(overlay[k])
        volumes = changed["spec"]["template"]["spec"]["volumes"]
        (ca,) = [v for v in volumes if v["name"] == "bus-ca"]
        assert ca == {"name": "bus-ca", "secret": {"secretName": "vslice-external-nats-ca"}}
        ca["secret"]["secretName"] = kubecerts.BUS_CA_SECRET
        want = copy.deepcopy(base[k])
        for obj in (changed, want):  # a strategic merge may reorder the list
            obj["spec"]["template"]["spec"]["volumes"].sort(key=lambda v: v["name"])
        assert changed == want, k
    url = overlay[bus]["data"]["nats-url"]
    assert url.startswith("nats://") and url != base[bus]["data"]["nats-url"]
    assert "@" not in url  # no password in a ConfigMap
    assert "nats-headless" not in yaml.safe_dump_all(list(overlay.values()))
    assert "nats.vslice-system" not in yaml.safe_dump_all(list(overlay.values()))


@pytest.mark.parametrize("name", BUILDS)
def test_no_config_map_holds_a_credential(name: str) -> None:
    for config_map in BUILDS[name]().of("ConfigMap"):
        text = yaml.safe_dump(config_map.get("data", {}))
        assert "PRIVATE KEY" not in text, built.key(config_map)
        assert not re.search(r"\bS[UAO][A-Z2-7]{50,}", text), built.key(config_map)  # NKEY seed
        assert not re.search(r"(?i)\bpass(word)?\s*:|://[^/\s]*:[^/\s]*@", text), built.key(
            config_map
        )
