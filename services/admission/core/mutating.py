"""The mutating admission decision: an ``admission.k8s.io/v1`` AdmissionReview in, its
response out -- allowed with a JSONPatch (RFC 6902), allowed unchanged, or denied.

Pure: no I/O, no logging, no clock. The HTTPS adapter (``adapters/webhook.py``) bounds and
decodes the body, calls ``decide`` and encodes ``Outcome.to_review()``; it also logs each
outcome. The resource model is ``libshared.resources`` -- the same rules the bus admission
applies -- so a pod is read one way in both modes.

What a pod with any vslice/HAMi GPU resource (``nvidia.com/gpu``, ``gpumem``,
``gpumem-percentage``, ``gpucores``, ``priority``) gets:

- ``spec.schedulerName`` set to vslice's scheduler, also over ``default-scheduler``, which
  the API server fills in before mutating webhooks run (HAMi #1162).
- the model's defaults written into the spec, so what the scheduler and the device plugin
  read is what the pod says: ``nvidia.com/gpu`` (HAMi's ``defaultGPUNum``) for a container
  that asks memory or cores only, and ``nvidia.com/gpucores: 100`` for a container asking
  the whole card (HAMi's ``defaultExclusiveCoreIfNeeded``: ``nvidia.com/gpu`` with no
  memory resource, or ``gpumem-percentage: 100``).
- env ``CUDA_TASK_PRIORITY`` from ``nvidia.com/priority`` and, when configured,
  ``GPU_CORE_UTILIZATION_POLICY`` (HAMi-core's variables); a variable the container
  already sets is left alone.

Denied, the message naming the container, field and value: a pod without containers
(HAMi's webhook denies it: ``Handle``, "pod has no containers"); a GPU pod with any
privileged container, a sidecar included (it sees every device, so no slice holds it:
HAMi #611, #2138);
``spec.nodeName`` already set (the pod would bypass the scheduler, so no slice would be
reserved for it); a pod created with the scheduler's allocation annotations (forged
allocations: HAMi #3042); any value the resource model rejects (``InvalidRequest``).

Skipped (allowed, no patch): pods without GPU resources, or whose GPU resources HAMi's
``MutateAdmission`` does not take (``gpumem`` only in the requests); pods labelled
``hami.io/webhook: ignore``; pods naming another scheduler than ``default-scheduler`` or
vslice's; mirror pods of static pods (kubelet creates them with ``nodeName`` set, for a
pod already running); operations other than CREATE and objects other than core/v1 Pods. Namespaces
labelled ``hami.io/webhook: ignore`` are excluded by the MutatingWebhookConfiguration's
``namespaceSelector`` (k8s/base): an AdmissionReview carries the namespace's name but not
its labels, and looking them up would need API access the webhook does not have.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from libshared import annotations as keys
from libshared import bounds, resources, vendors
from libshared.errors import InvalidRequest, VsliceError

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
DEFAULT_SCHEDULER = "default-scheduler"  # what the API server defaults schedulerName to
IGNORE_VALUE = "ignore"  # hami.io/webhook: ignore
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"  # set by kubelet on a static pod's mirror
VALUE_CHARS = 200  # a message quotes at most this much of an offending value

# Every resource name that makes a pod vslice's (the model's four plus the priority).
# every vendor's resources (libshared.vendors) and NVIDIA's priority
VSLICE_RESOURCES = (*(r for v in vendors.VENDORS for r in v.resources), resources.PRIORITY)
# Annotations only the scheduler may write; a pod created with them forges an allocation.
SCHEDULER_OWNED = (
    keys.VGPU_NODE,
    *(key for v in vendors.VENDORS for key in (v.allocated, v.to_allocate)),
    keys.VGPU_MIG_ALLOCATIONS,
    keys.BIND_PHASE,
    keys.BIND_TIME,
)
ENV_PRIORITY = "CUDA_TASK_PRIORITY"
ENV_CORE_POLICY = "GPU_CORE_UTILIZATION_POLICY"
CORE_POLICIES = ("default", "force", "disable")


class ReviewError(VsliceError, ValueError):
    """The body is not an ``admission.k8s.io/v1`` AdmissionReview request; the message
    names what is wrong (the JSON path for a type error). The adapter answers HTTP 400."""


class MutationSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the webhook writes.

    ``scheduler_name``: the kube-scheduler profile that calls vslice's extender.
    ``resources``: the resource model's defaults (HAMi's ``defaultGPUNum`` and friends).
    ``core_policy``: ``GPU_CORE_UTILIZATION_POLICY`` for every GPU container (one of
    ``CORE_POLICIES``), or ``None`` to add none.
    """

    scheduler_name: str = "vslice-scheduler"
    resources: resources.ResourceSettings = msgspec.field(
        default_factory=resources.ResourceSettings
    )
    core_policy: str | None = None

    def __post_init__(self) -> None:
        if not self.scheduler_name:
            raise ValueError("scheduler_name: must not be empty")
        if self.core_policy is not None and self.core_policy not in CORE_POLICIES:
            raise ValueError(f"core_policy={self.core_policy!r}: must be one of {CORE_POLICIES}")


class GroupVersionKind(msgspec.Struct, frozen=True, kw_only=True):
    """``request.kind`` of a review (core group: ``group == ""``)."""

    group: str = ""
    version: str = ""
    kind: str = ""


class AdmissionRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The fields of ``request`` the decision reads; the rest is ignored."""

    uid: str
    kind: GroupVersionKind = msgspec.field(default_factory=GroupVersionKind)
    namespace: str = ""
    name: str = ""
    operation: str = ""
    object: dict[str, Any] | None = None
    dry_run: bool = False


class AdmissionReview(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An AdmissionReview request as the API server sends it."""

    api_version: str
    kind: str
    request: AdmissionRequest | None = None


_DECODER = msgspec.json.Decoder(AdmissionReview)


def _checked(review: AdmissionReview) -> AdmissionReview:
    if review.api_version != API_VERSION:
        raise ReviewError(
            f"apiVersion={review.api_version[:VALUE_CHARS]!r}: only {API_VERSION} is served "
            "(set admissionReviewVersions: [v1])"
        )
    if review.kind != KIND:
        raise ReviewError(f"kind={review.kind[:VALUE_CHARS]!r}: expected {KIND}")
    if review.request is None:
        raise ReviewError("request: missing (an AdmissionReview request carries one)")
    if not review.request.uid:
        raise ReviewError("request.uid: missing or empty")
    return review


def decode_review(data: bytes) -> AdmissionReview:
    """An AdmissionReview request from its JSON body.

    Raises ``ReviewError`` naming the problem: not JSON, a field of the wrong type (with
    its JSON path, e.g. ``$.request.uid``), a missing ``request`` or ``request.uid``, or an
    ``apiVersion``/``kind`` other than ``admission.k8s.io/v1`` ``AdmissionReview``.
    """
    try:
        review = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise ReviewError(f"not an AdmissionReview: {exc}") from exc
    except bounds.DECODE_ERRORS as exc:
        raise ReviewError(f"body is not JSON: {exc}") from exc
    return _checked(review)


def review_from(value: AdmissionReview | Mapping[str, Any]) -> AdmissionReview:
    """``value`` as a checked ``AdmissionReview`` (a decoded dict is converted).

    Raises ``ReviewError`` as ``decode_review`` does.
    """
    if isinstance(value, AdmissionReview):
        return _checked(value)
    try:
        review = msgspec.convert(value, AdmissionReview)
    except msgspec.ValidationError as exc:
        raise ReviewError(f"not an AdmissionReview: {exc}") from exc
    return _checked(review)


Verdict = Literal["mutated", "unchanged", "skipped", "denied"]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """The decision on one review.

    ``verdict``: ``mutated`` (allowed with ``patch``), ``unchanged`` (a vslice pod that
    needed nothing), ``skipped`` (not vslice's to handle) or ``denied``. ``message``: why
    (the denial shown to the user, or the reason for a skip). ``code``: the HTTP-style
    status of a denial (403 forbidden by policy, 422 an invalid value). ``patch``: the
    JSONPatch operations. ``pod``: ``namespace/name`` for logs.
    """

    uid: str
    verdict: Verdict
    pod: str = ""
    message: str = ""
    code: int = 200
    patch: tuple[dict[str, Any], ...] = ()

    @property
    def allowed(self) -> bool:
        """True unless denied."""
        return self.verdict != "denied"

    def to_review(self) -> dict[str, Any]:
        """The AdmissionReview response (``admission.k8s.io/v1``): ``patch`` base64-encoded
        JSON with ``patchType: JSONPatch`` when there is one; a denial's ``status`` with
        ``code``, ``reason`` and ``message``."""
        response: dict[str, Any] = {"uid": self.uid, "allowed": self.allowed}
        if self.patch:
            raw = json.dumps(list(self.patch), separators=(",", ":")).encode()
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(raw).decode("ascii")
        if not self.allowed:
            response["status"] = {
                "code": self.code,
                "reason": "Forbidden" if self.code == 403 else "Invalid",
                "message": self.message,
            }
        return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def pointer(*parts: str | int) -> str:
    """A JSON Pointer (RFC 6901) of ``parts``: ``~`` and ``/`` escaped, so
    ``pointer("limits", "nvidia.com/gpu") == "/limits/nvidia.com~1gpu"``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS] + "..."


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _asked(container: Mapping[str, Any]) -> set[str]:
    """The vslice resource names a container names in its limits or requests."""
    res = _mapping(container.get("resources"))
    names: set[str] = set()
    for part in ("limits", "requests"):
        names.update(n for n in _mapping(res.get(part)) if n in VSLICE_RESOURCES)
    return names


def _privileged(container: Mapping[str, Any]) -> bool:
    return _mapping(container.get("securityContext")).get("privileged") is True


class _Patch:
    """JSONPatch operations for one pod, creating the objects and lists they need once:
    a second value for a container whose limits or env this patch created is added into
    what the first created, not over it."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self._created: set[str] = set()

    def add(self, path: str, value: object) -> None:
        self.ops.append({"op": "add", "path": path, "value": value})

    def _into(self, path: str, container_has: bool, key: str | int, value: object) -> None:
        """Add ``value`` at ``path``/``key``, first creating ``path`` (an object for a
        string key, a list for ``-``) unless the pod or this patch already has it."""
        if container_has or path in self._created:
            self.add(path + pointer(key), value)
        else:
            self._created.add(path)
            self.add(path, [value] if key == "-" else {key: value})

    def resource(self, base: str, container: Mapping[str, Any], name: str, value: str) -> None:
        """Set resource ``name`` in the limits (extended resources are set by limit) and,
        when the container's requests already name vslice resources, in the requests too:
        Kubernetes requires an extended resource's request to equal its limit.

        Only called for a container naming a vslice resource, so ``resources`` exists."""
        res = _mapping(container.get("resources"))
        has_limits = isinstance(res.get("limits"), Mapping)
        self._into(base + pointer("resources", "limits"), has_limits, name, value)
        requests = res.get("requests")
        if isinstance(requests, Mapping) and any(n in VSLICE_RESOURCES for n in requests):
            self.add(base + pointer("resources", "requests", name), value)

    def env(self, base: str, container: Mapping[str, Any], name: str, value: str) -> None:
        """Append env ``name=value`` unless the container sets ``name`` itself."""
        env = container.get("env")
        if isinstance(env, list) and any(
            isinstance(e, Mapping) and e.get("name") == name for e in env
        ):
            return
        self._into(
            base + pointer("env"), isinstance(env, list), "-", {"name": name, "value": value}
        )


def decide(review: AdmissionReview | Mapping[str, Any], *, settings: MutationSettings) -> Outcome:
    """The outcome for one AdmissionReview request (see the module docstring).

    Pure. Raises ``ReviewError`` when ``review`` is not an ``admission.k8s.io/v1``
    AdmissionReview request, or a CREATE of a Pod arrives without ``request.object``.
    """
    request = review_from(review).request
    assert request is not None  # _checked guarantees it
    uid = request.uid
    pod_name = f"{request.namespace}/{request.name}" if request.name else request.namespace
    if (request.kind.group, request.kind.kind) != ("", "Pod"):
        kind = "/".join(p for p in (request.kind.group, request.kind.version, request.kind.kind))
        return Outcome(uid=uid, verdict="skipped", pod=pod_name, message=f"not a Pod ({kind})")
    if request.operation != "CREATE":
        return Outcome(
            uid=uid, verdict="skipped", pod=pod_name, message=f"operation {request.operation}"
        )
    pod = request.object
    if pod is None:
        raise ReviewError("request.object: missing for a Pod CREATE")
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    if not request.name:
        name = meta.get("name") or meta.get("generateName") or ""
        pod_name = f"{request.namespace or meta.get('namespace', '')}/{name}"

    def skip(message: str) -> Outcome:
        return Outcome(uid=uid, verdict="skipped", pod=pod_name, message=message)

    def deny(message: str, code: int = 403) -> Outcome:
        return Outcome(uid=uid, verdict="denied", pod=pod_name, message=message, code=code)

    if _mapping(meta.get("labels")).get(keys.WEBHOOK_IGNORE_LABEL) == IGNORE_VALUE:
        return skip(f"label {keys.WEBHOOK_IGNORE_LABEL}={IGNORE_VALUE}")
    if MIRROR_ANNOTATION in _mapping(meta.get("annotations")):
        # kubelet already runs the static pod; refusing its mirror would only hide it
        return skip("a static pod's mirror")
    try:
        containers = resources.pod_containers(spec)
    except InvalidRequest as exc:
        return deny(f"{exc.field}={_shown(exc.value)!r}: {exc.reason}", code=422)
    if not any(init is False for _, _, init, _ in containers):
        # HAMi's webhook denies such a pod (pkg/scheduler/webhook.go, Handle)
        return deny("spec.containers=[]: pod has no containers", code=422)
    if not any(_asked(c) for _, _, _, c in containers):
        return skip("no GPU resources")
    scheduler = spec.get("schedulerName")
    if scheduler not in (None, "", DEFAULT_SCHEDULER, settings.scheduler_name):
        return skip(f"spec.schedulerName={_shown(scheduler)!r} is another scheduler's")

    if spec.get("nodeName"):
        return deny(
            f"spec.nodeName={_shown(spec['nodeName'])!r}: a pod asking for a GPU slice must "
            f"be placed by {settings.scheduler_name}, which reserves the slice; leave "
            "nodeName unset (use a nodeSelector or node affinity to pick nodes)"
        )
    annos = _mapping(meta.get("annotations"))
    for key in SCHEDULER_OWNED:
        if key in annos:
            return deny(
                f"metadata.annotations[{key!r}]={_shown(annos[key])!r}: only "
                f"{settings.scheduler_name} writes this annotation (a pod may not bring "
                "its own allocation)"
            )
    try:
        model = resources.parse_pod(pod, settings=settings.resources, admission=True)
    except InvalidRequest as exc:
        where = f"container {exc.container!r}: " if exc.container else ""
        return deny(f"{where}{exc.field}={_shown(exc.value)!r}: {exc.reason}", code=422)
    if not model.gpu_containers and not any(
        v.count in _mapping(_mapping(c.get("resources")).get("limits"))
        for _, _, _, c in containers
        for v in vendors.VENDORS
    ):
        # HAMi's MutateAdmission finds no resource: gpumem/gpucores only in the requests,
        # or a gpumem past int32 (libshared.resources.parse_container); each vendor's
        # MutateAdmission answers for its own count resource (hygon.com/dcunum)
        return skip("no GPU requested")

    patch = _Patch()
    if scheduler != settings.scheduler_name:
        op = "add" if scheduler is None else "replace"
        patch.ops.append(
            {"op": op, "path": pointer("spec", "schedulerName"), "value": settings.scheduler_name}
        )
    # parse_pod reads pod_containers' order: one ContainerRequest per container.
    for (_, _, _, container), wanted in zip(containers, model.containers, strict=True):
        if not _privileged(container):
            continue
        # the first privileged container, init containers first, as HAMi's webhook names it;
        # any privileged container denies a GPU pod there (HAMi #2138)
        asked = _asked(container)
        what = f"with {', '.join(sorted(asked))}" if asked else "in a pod asking for a GPU"
        return deny(
            f"container {wanted.name!r}: securityContext.privileged=True {what}: a privileged "
            "container sees every GPU of the node, so no slice can hold it"
        )
    for (key, position, _, container), wanted in zip(containers, model.containers, strict=True):
        asked = _asked(container)
        if not asked:
            continue
        name = wanted.name
        base = pointer("spec", key, position)
        if wanted.gpu_count > 0 and resources.GPU not in asked:
            patch.resource(base, container, resources.GPU, str(wanted.gpu_count))
        if wanted.exclusive and resources.GPUCORES not in asked:
            # HAMi writes 100 cores for a container asking the whole card
            # (pkg/device/nvidia/device.go, defaultExclusiveCoreIfNeeded)
            patch.resource(base, container, resources.GPUCORES, str(wanted.cores_percent))
        if wanted.priority is not None:
            patch.env(base, container, ENV_PRIORITY, str(wanted.priority))
        if wanted.gpu_count > 0 and settings.core_policy is not None:
            patch.env(base, container, ENV_CORE_POLICY, settings.core_policy)
    if not patch.ops:
        return Outcome(uid=uid, verdict="unchanged", pod=pod_name, message="nothing to add")
    return Outcome(
        uid=uid,
        verdict="mutated",
        pod=pod_name,
        message=f"{len(patch.ops)} patch operations",
        patch=tuple(patch.ops),
    )
