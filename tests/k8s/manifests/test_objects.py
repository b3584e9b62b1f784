"""The k8s/ manifests as objects: both kustomizations build with the kubectl on PATH,
every object validates offline against the Kubernetes 1.30 schemas (strict: no unknown
fields), names resolve (namespaces, ServiceAccounts, ConfigMaps, Service selectors and
ports), images are pinned, NATS is a 3-node JetStream cluster whose config nats-server
accepts, and the external-nats overlay is the base without NATS, pointed elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from libshared.natsserver import find_binary
from tests.k8s.manifests import built

KUBERNETES = "1.30"
BUILDS = {"base": built.base, "external-nats": built.overlay}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
NATS_OBJECTS = {
    ("StatefulSet", "vslice-system", "nats"),
    ("Service", "vslice-system", "nats"),
    ("Service", "vslice-system", "nats-headless"),
    ("ConfigMap", "vslice-system", "nats-config"),
    ("PodDisruptionBudget", "vslice-system", "nats"),
}


@pytest.mark.parametrize("name", BUILDS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(name: str) -> None:
    objects = BUILDS[name]()
    assert len(objects.items) >= 25
    for obj in objects.items:
        try:
            version = kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{built.key(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{built.key(obj)}: {exc.message}")
        assert version == KUBERNETES


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
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", BUILDS)
def test_images_are_pinned_and_vslice_uses_one_image(name: str) -> None:
    images = {c["name"]: c["image"] for _, c in BUILDS[name]().containers()}
    for container, image in images.items():
        assert not image.endswith(":latest") and ":" in image, (container, image)
        if container in ("kube-scheduler", "nats"):
            continue
        assert image == built.IMAGE, (container, image)
    assert re.fullmatch(r"registry\.k8s\.io/kube-scheduler:v1\.30\.\d+", images["kube-scheduler"])
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
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == store.group(1)
    config_file = built.flag_value(container["command"], "--config")
    assert Path(config_file).parent == Path(mounts["config"])
    client = objects.get("Service", "nats")
    assert [p["port"] for p in client["spec"]["ports"]] == [4222]
    bus = objects.get("ConfigMap", "vslice-bus")["data"]
    assert bus["nats-url"] == "nats://nats.vslice-system.svc:4222"
    assert bus["bucket-replicas"] == "3"


def test_nats_server_accepts_the_cluster_config(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(_nats_config())
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


def test_the_external_nats_overlay_is_the_base_without_nats_pointed_elsewhere() -> None:
    base = {built.key(o): o for o in built.base().items}
    overlay = {built.key(o): o for o in built.overlay().items}
    assert base.keys() >= NATS_OBJECTS
    assert overlay.keys() == base.keys() - NATS_OBJECTS
    bus = ("ConfigMap", "vslice-system", "vslice-bus")
    for k in overlay.keys() - {bus}:
        assert overlay[k] == base[k], k
    url = overlay[bus]["data"]["nats-url"]
    assert url.startswith("nats://") and url != base[bus]["data"]["nats-url"]
    assert "nats-headless" not in yaml.safe_dump_all(list(overlay.values()))
    assert "nats.vslice-system" not in yaml.safe_dump_all(list(overlay.values()))
