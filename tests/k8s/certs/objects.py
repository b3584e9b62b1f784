"""The certificate Job's objects in the emulated API server (kmock): Secrets and k8s/'s
MutatingWebhookConfiguration, read back as a pod would see them mounted."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kmock
import yaml

from tests.scheduler.k8s.kubeapi import ApiServer
from vslice import kubecerts

SECRETS = kmock.resource("", "v1", "secrets")
WEBHOOKS = kmock.resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
ADMISSION_YAML = Path(__file__).resolve().parents[3] / "k8s" / "base" / "vslice" / "admission.yaml"


def webhook_configuration() -> dict[str, Any]:
    """The MutatingWebhookConfiguration of k8s/ as written (no caBundle)."""
    (config,) = [
        d
        for d in yaml.safe_load_all(ADMISSION_YAML.read_text())
        if d and d["kind"] == "MutatingWebhookConfiguration"
    ]
    assert isinstance(config, dict)
    return config


def serve_trust_objects(api: ApiServer, *, webhook: bool = True) -> None:
    """Let ``api`` store Secrets and webhook configurations; add k8s/'s one."""
    api.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)
    api.resources["admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"] = (
        kmock.ResourceInfo(kind="MutatingWebhookConfiguration", namespaced=False)
    )
    if webhook:
        api.objects[WEBHOOKS, None, kubecerts.WEBHOOK_CONFIG] = webhook_configuration()


def secrets(api: ApiServer) -> dict[str, dict[str, Any]]:
    """Every stored Secret of vslice-system by name."""
    return {
        name: o.raw
        for (res, ns, name), o in api.objects.items()
        if res == SECRETS and ns == kubecerts.NAMESPACE and not o.deleted
    }


def data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def ca_bundles(api: ApiServer) -> list[bytes]:
    raw = api.objects[WEBHOOKS, None, kubecerts.WEBHOOK_CONFIG].raw
    return [base64.b64decode(h["clientConfig"].get("caBundle", "")) for h in raw["webhooks"]]


def mount(api: ApiServer, directory: Path) -> Path:
    """Every stored Secret's keys as files, ``directory/<secret>/<key>``, as kubelet
    mounts a Secret volume; returns ``directory``."""
    for name, secret in secrets(api).items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        for key, value in data(secret).items():
            (directory / name / key).write_bytes(value)
    return directory
