"""RBAC at least privilege: no wildcard, no built-in admin role, each ServiceAccount's
permissions exactly what its service does (the certificate Job: the Secrets
``vslice.kubecerts`` keeps, by name, and vslice's own webhook configuration), Secrets
reachable by no other role, and no API token where none is needed."""

from __future__ import annotations

from typing import Any

from tests.k8s.manifests import built
from vslice import kubecerts

BROAD_ROLES = {
    "cluster-admin",
    "admin",
    "edit",
    "view",
    "system:controller:generic-garbage-collector",
}

# (apiGroup, resource, verb, resourceName or "") per ServiceAccount, from every Role and
# ClusterRole vslice defines and binds to it
EXPECTED: dict[str, set[tuple[str, str, str, str]]] = {
    "vslice-scheduler": {
        *(("", "pods", v, "") for v in ("get", "list", "watch", "patch")),
        ("", "pods/binding", "create", ""),
        *(("", "nodes", v, "") for v in ("get", "list", "watch")),
        *(("", "resourcequotas", v, "") for v in ("list", "watch")),
        ("", "events", "create", ""),
        ("", "events", "patch", ""),
        ("events.k8s.io", "events", "create", ""),
    },
    # services/nodeagent/adapters/kube.py: read_node, patch_node,
    # list_pod_for_all_namespaces, patch_namespaced_pod, and nothing more
    "vslice-nodeagent": {
        ("", "nodes", "get", ""),
        ("", "nodes", "patch", ""),
        ("", "pods", "list", ""),
        ("", "pods", "patch", ""),
    },
    # create cannot be limited by name (the authorizer sees no name before the object
    # exists); everything else names exactly the Secrets the Job keeps
    "vslice-certs": {
        ("", "secrets", "create", ""),
        *(("", "secrets", v, name) for v in ("get", "patch") for name in kubecerts.secret_names()),
        *(
            ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", v, "vslice-admission")
            for v in ("get", "patch")
        ),
    },
    "vslice-kube-scheduler": {
        ("coordination.k8s.io", "leases", "create", ""),
        ("coordination.k8s.io", "leases", "get", "vslice-scheduler"),
        ("coordination.k8s.io", "leases", "update", "vslice-scheduler"),
    },
    "vslice-admission": set(),
    "vslice-metrics": set(),
}
# Kubernetes' own roles bound as they are (their rules live in the API server)
BUILT_IN = {
    "vslice-kube-scheduler": {
        ("ClusterRole", "system:kube-scheduler"),
        ("ClusterRole", "system:volume-scheduler"),
        ("Role", "extension-apiserver-authentication-reader"),
    },
}


def _expand(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames", [""]):
                        out.add((group, resource, verb, name))
    return out


def test_no_rule_uses_a_wildcard_and_no_binding_names_a_broad_role() -> None:
    objects = built.base()
    for role in objects.of("Role") + objects.of("ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (built.key(role), rule)
            assert "nonResourceURLs" not in rule
            if "secrets" in rule["resources"]:
                # the certificate Job's Role alone, in its namespace
                assert built.key(role) == ("Role", built.NAMESPACE, "vslice-certs"), rule
                assert rule.get("resourceNames") or rule["verbs"] == ["create"], rule
        assert "aggregationRule" not in role
    for binding in objects.of("RoleBinding") + objects.of("ClusterRoleBinding"):
        assert binding["roleRef"]["name"] not in BROAD_ROLES, built.key(binding)
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount", built.key(binding)
            assert subject["namespace"] == built.NAMESPACE


def test_each_service_account_gets_exactly_what_its_service_needs() -> None:
    objects = built.base()
    granted: dict[str, set[tuple[str, str, str, str]]] = {
        sa["metadata"]["name"]: set() for sa in objects.of("ServiceAccount")
    }
    built_in: dict[str, set[tuple[str, str]]] = {name: set() for name in granted}
    for binding in objects.of("RoleBinding") + objects.of("ClusterRoleBinding"):
        ref = binding["roleRef"]
        defined = objects.has(ref["kind"], ref["name"])
        for subject in binding["subjects"]:
            if defined:
                role = objects.get(ref["kind"], ref["name"])
                if binding["kind"] == "RoleBinding":
                    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
                granted[subject["name"]] |= _expand(role["rules"])
            else:
                assert ref["name"].startswith(("system:", "extension-apiserver-")), ref
                built_in[subject["name"]].add((ref["kind"], ref["name"]))
    assert granted == EXPECTED
    assert {k: v for k, v in built_in.items() if v} == BUILT_IN


def test_pods_that_call_no_api_carry_no_token() -> None:
    objects = built.base()
    for name in ("vslice-admission", "vslice-metrics"):
        assert objects.get("ServiceAccount", name)["automountServiceAccountToken"] is False
        spec = objects.get("Deployment", name)["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
    nats = objects.get("StatefulSet", "nats")["spec"]["template"]["spec"]
    assert nats["automountServiceAccountToken"] is False
