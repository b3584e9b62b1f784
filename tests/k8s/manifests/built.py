"""The k8s/ kustomizations built with the ``kubectl`` on PATH, and lookups over the
objects they produce."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"
BASE = K8S
OVERLAY = K8S / "overlays" / "external-nats"
# Kubernetes minor -> the kube-scheduler patch release its component pins (each one a
# published registry.k8s.io/kube-scheduler tag); k8s/ itself takes the newest.
KUBE_SCHEDULER = {
    "1.29": "v1.29.15",
    "1.30": "v1.30.14",
    "1.31": "v1.31.14",
    "1.32": "v1.32.11",
    "1.33": "v1.33.7",
    "1.34": "v1.34.1",
}
NEWEST = max(KUBE_SCHEDULER, key=lambda minor: tuple(int(p) for p in minor.split(".")))
NAMESPACE = "vslice-system"
IMAGE = "ghcr.io/vslice/vslice:0.1.0"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "Job")


def kubectl() -> str:
    """kubectl's path; fails (never skips) without it: ``make test`` installs it."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: `make kubectl` installs Debian's kubernetes-client")
    return path


def minor_overlay(minor: str) -> Path:
    """The kustomization of vslice for a cluster of Kubernetes ``minor``."""
    return K8S / "overlays" / f"kube-{minor}"


@functools.cache
def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    """``kubectl kustomize directory`` (stdout: the objects, stderr: kustomize's warnings);
    fails naming kubectl's error."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed: {done.stderr}")
    return done


@functools.cache
def build(directory: Path) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize directory`` as objects; fails naming kubectl's error."""
    return tuple(d for d in yaml.safe_load_all(kustomize(directory).stdout) if d)


@dataclass(frozen=True)
class Objects:
    """The objects of one build, with lookups."""

    items: tuple[dict[str, Any], ...]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.items if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.of(kind))

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.items if o["kind"] in WORKLOADS]

    def containers(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``(workload, container)`` for every container, init containers included."""
        for w in self.workloads():
            spec = w["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield w, c

    def env(self, container: dict[str, Any], *, node: str = "gpu-node-1") -> dict[str, str]:
        """The container's environment as the kubelet would set it (ConfigMap keys read
        from this build; ``spec.nodeName`` is ``node``; other field refs by their path)."""
        out: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                out[e["name"]] = e["value"]
                continue
            source = e["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self.get("ConfigMap", ref["name"])["data"]
                assert ref["key"] in data, f"{e['name']}: no key {ref['key']} in {ref['name']}"
                out[e["name"]] = data[ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                out[e["name"]] = node if path == "spec.nodeName" else f"<{path}>"
            else:
                raise AssertionError(f"unexpected env source {source}")
        return out


def base() -> Objects:
    return Objects(build(BASE))


def overlay() -> Objects:
    return Objects(build(OVERLAY))


def for_minor(minor: str) -> Objects:
    return Objects(build(minor_overlay(minor)))


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def flag_value(args: list[str], flag: str) -> str:
    """The value after ``flag`` (or in ``flag=value``) in ``args``."""
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def secret_mounts(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """``{mountPath: Secret name}`` of the container's mounts of Secret volumes."""
    secrets = {
        v["name"]: v["secret"]["secretName"]
        for v in workload["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container.get("volumeMounts", [])
        if m["name"] in secrets
    }
