"""Builders of pods and AdmissionReview requests for the webhook tests, and the patch
applied the way the API server applies it."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch


def ctr(
    name: str = "main",
    *,
    limits: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
    env: list[dict[str, str]] | None = None,
    privileged: bool | None = None,
) -> dict[str, Any]:
    """A container spec; ``resources`` only when limits or requests are given."""
    c: dict[str, Any] = {"name": name, "image": "cuda:12"}
    res: dict[str, Any] = {}
    if limits is not None:
        res["limits"] = limits
    if requests is not None:
        res["requests"] = requests
    if res:
        c["resources"] = res
    if env is not None:
        c["env"] = env
    if privileged is not None:
        c["securityContext"] = {"privileged": privileged}
    return c


def pod(
    *containers: dict[str, Any],
    init: tuple[dict[str, Any], ...] = (),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    scheduler: str | None = "default-scheduler",
    node_name: str | None = None,
) -> dict[str, Any]:
    """A pod as the API server hands it to a mutating webhook (schedulerName defaulted)."""
    meta: dict[str, Any] = {"name": "train", "namespace": "ml"}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    if scheduler is not None:
        spec["schedulerName"] = scheduler
    if node_name is not None:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def review(
    obj: dict[str, Any] | None,
    *,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    operation: str = "CREATE",
    group: str = "",
    kind: str = "Pod",
) -> dict[str, Any]:
    """An ``admission.k8s.io/v1`` AdmissionReview request for ``obj``, with the fields the
    API server sends (most of which the webhook ignores)."""
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": kind.lower() + "s"},
        "requestKind": {"group": group, "version": "v1", "kind": kind},
        "namespace": "ml",
        "operation": operation,
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        "dryRun": False,
    }
    if obj is not None:
        request["object"] = obj
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def patched(original: dict[str, Any], response_review: dict[str, Any]) -> dict[str, Any]:
    """``original`` with the response's base64 JSONPatch applied (a copy; the response
    must allow, and a missing patch leaves the pod as it was)."""
    response = response_review["response"]
    assert response["allowed"] is True
    if "patch" not in response:
        assert "patchType" not in response
        return copy.deepcopy(original)
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    result: dict[str, Any] = jsonpatch.apply_patch(original, ops)
    return result
