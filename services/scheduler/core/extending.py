"""The kube-scheduler extender, decided: its wire types, the filter answer, the bind
annotations, and what to do with each pod's slices after a restart.

kube-scheduler calls an extender over HTTP with the types of
``k8s.io/kube-scheduler/extender/v1`` (types.go). Those Go structs carry no JSON tags, so
the keys on the wire are the Go field names (``Pod``, ``NodeNames``, ``FailedNodes``,
``PodUID``...), and Go's decoder matches them case-insensitively; ``decode_filter_args`` /
``decode_binding_args`` do the same and name the field and value of anything malformed.

At bind time the pod gets HAMi's annotations (``libshared.annotations``), so the device
plugin and HAMi tooling read vslice placements: ``hami.io/vgpu-node``,
``hami.io/vgpu-devices-allocated`` and ``-to-allocate`` (one ``UUID,NVIDIA,MiB,cores:``
entry per device, ``;`` after each container, init containers first),
``hami.io/bind-phase: allocating`` and ``hami.io/bind-time`` (Unix seconds); a Hygon
DCU's slices go to ``hami.io/dcu-devices-allocated`` and ``-to-allocate`` instead
(``libshared.vendors``), in the same format with the vendor word ``DCU``.

``reconcile`` compares the ledger with the pods in the API: slices of pods that ended or
are gone are released, a reservation not bound within the TTL is released, a bound pod the
ledger lost is restored from its annotations, and a pod whose annotation cannot be decoded
is reported and its capacity held -- never offered again silently (HAMi #2958).

Pure and synchronous: no I/O; the adapters (``services.scheduler.adapters.extender`` and
``.kube``) decode requests, act on the decisions and talk to the API server.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from libshared import annotations as keys
from libshared import vendors
from libshared.devices import NodeDevices
from libshared.errors import AnnotationDecodeError, InvalidRequest, VsliceError
from libshared.events import Placement
from libshared.ledgers import PodCharge, Slice
from libshared.resources import PodRequest, parse_pod

ENDED_PHASES = ("Succeeded", "Failed")
UNDECODABLE = "UndecodableAllocation"  # reason of a node held for an undecodable annotation
UNKNOWN_NODE = "unknown node"  # the core's reason for a node that registered no devices

# Kubernetes gives every object a RFC 4122 UUID (apimachinery's uuid.NewUUID); pods placed
# over the bus (``vslice run``, replays) use other UIDs and are left to the bus.
_KUBE_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def kubernetes_uid(uid: str) -> bool:
    """True when ``uid`` has the shape of a Kubernetes object UID (a lower-case UUID)."""
    return bool(_KUBE_UID.match(uid))


class BadBody(VsliceError, ValueError):
    """A request body kube-scheduler would never send: ``field`` (its path, e.g.
    ``ExtenderArgs.Pod.metadata.uid``), ``value`` (as given, shortened) and ``reason``."""

    def __init__(self, *, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"{field}={shown}: {reason}")


# -- wire types (k8s.io/kube-scheduler/extender/v1) -------------------------------------


class ExtenderFilterResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to ``/filter``: ``NodeNames`` (nodeCacheCapable) or ``Nodes`` (a
    NodeList), per-node failure messages, and ``Error`` (kube-scheduler fails the
    scheduling attempt when it is set)."""

    nodes: dict[str, Any] | None = msgspec.field(default=None, name="Nodes")
    node_names: list[str] | None = msgspec.field(default=None, name="NodeNames")
    failed_nodes: dict[str, str] = msgspec.field(default_factory=dict, name="FailedNodes")
    failed_and_unresolvable_nodes: dict[str, str] = msgspec.field(
        default_factory=dict, name="FailedAndUnresolvableNodes"
    )
    error: str = msgspec.field(default="", name="Error")


class ExtenderBindingResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to ``/bind``: ``Error`` empty when the pod is bound."""

    error: str = msgspec.field(default="", name="Error")


ENCODER = msgspec.json.Encoder()
"""Encodes the results above (and any JSON value) to bytes."""

_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ANY = msgspec.json.Decoder()


@dataclass(frozen=True)
class FilterArgs:
    """A decoded ``ExtenderArgs``: the pod (Kubernetes JSON), its identity, the candidate
    node names in kube-scheduler's order, and the node objects when they came as a
    ``Nodes`` NodeList (``None`` when only ``NodeNames`` came)."""

    pod: dict[str, Any]
    uid: str
    namespace: str
    name: str
    candidates: tuple[str, ...]
    names_given: bool
    node_objects: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class BindingArgs:
    """A decoded ``ExtenderBindingArgs``."""

    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


def _fields(body: bytes, kind: str, names: tuple[str, ...]) -> dict[str, msgspec.Raw]:
    """The top-level keys of a JSON object matched to ``names`` case-insensitively, as
    Go's encoding/json does; unknown keys are ignored (Go ignores them too)."""
    try:
        top = _OBJECT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadBody(
            field=kind, value=body[:200].decode(errors="replace"), reason=str(exc)
        ) from exc
    canonical = {n.lower(): n for n in names}
    out: dict[str, msgspec.Raw] = {}
    for key, raw in top.items():
        name = canonical.get(key.lower())
        if name is None:
            continue
        if name in out:
            raise BadBody(field=f"{kind}.{name}", value=key, reason="given twice")
        out[name] = raw
    return out


def _value(raw: msgspec.Raw, where: str) -> Any:
    try:
        return _ANY.decode(raw)
    except msgspec.DecodeError as exc:  # pragma: no cover - the outer decode checked it
        raise BadBody(field=where, value=bytes(raw)[:200], reason=str(exc)) from exc


def _text(obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadBody(field=f"{where}.{key}", value=value, reason="must be a non-empty string")
    return value


def _node_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadBody(field=where, value=value, reason="must be a non-empty node name")
    return value


def decode_filter_args(body: bytes) -> FilterArgs:
    """Decode a ``/filter`` body (``ExtenderArgs`` JSON).

    Raises ``BadBody`` naming the field and value when the body is not a JSON object, the
    pod is not an object with ``metadata.uid`` and ``metadata.name``, neither ``NodeNames``
    nor ``Nodes`` is given, a node name is empty or not a string, or a ``Nodes`` item has
    no ``metadata.name``.
    """
    raw = _fields(body, "ExtenderArgs", ("Pod", "Nodes", "NodeNames"))
    if "Pod" not in raw:
        raise BadBody(field="ExtenderArgs.Pod", value=None, reason="missing")
    pod = _value(raw["Pod"], "ExtenderArgs.Pod")
    if not isinstance(pod, dict):
        raise BadBody(field="ExtenderArgs.Pod", value=pod, reason="must be a Pod object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise BadBody(field="ExtenderArgs.Pod.metadata", value=meta, reason="must be an object")
    where = "ExtenderArgs.Pod.metadata"
    uid = _text(meta, "uid", where, required=True)
    name = _text(meta, "name", where, required=True)
    namespace = _text(meta, "namespace", where, required=False) or "default"
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise BadBody(field="ExtenderArgs.Pod.spec", value=spec, reason="must be an object")
    names: list[str] | None = None
    objects: dict[str, dict[str, Any]] | None = None
    if "NodeNames" in raw:
        given = _value(raw["NodeNames"], "ExtenderArgs.NodeNames")
        if given is not None:
            if not isinstance(given, list):
                raise BadBody(
                    field="ExtenderArgs.NodeNames", value=given, reason="must be a list of names"
                )
            names = [_node_name(n, f"ExtenderArgs.NodeNames[{i}]") for i, n in enumerate(given)]
    if "Nodes" in raw:
        node_list = _value(raw["Nodes"], "ExtenderArgs.Nodes")
        if node_list is not None:
            items = node_list.get("items") if isinstance(node_list, dict) else None
            if not isinstance(items, list):
                raise BadBody(
                    field="ExtenderArgs.Nodes.items",
                    value=items if isinstance(node_list, dict) else node_list,
                    reason="must be a list of Node objects",
                )
            objects = {}
            for i, item in enumerate(items):
                item_meta = item.get("metadata") if isinstance(item, dict) else None
                node = _node_name(
                    item_meta.get("name") if isinstance(item_meta, dict) else None,
                    f"ExtenderArgs.Nodes.items[{i}].metadata.name",
                )
                objects[node] = item
    if names is None and objects is None:
        raise BadBody(
            field="ExtenderArgs.NodeNames", value=None, reason="neither NodeNames nor Nodes given"
        )
    candidates = tuple(dict.fromkeys([*(names or []), *(objects or {})]))
    return FilterArgs(
        pod=pod,
        uid=uid,
        namespace=namespace,
        name=name,
        candidates=candidates,
        names_given=names is not None,
        node_objects=objects,
    )


def decode_binding_args(body: bytes) -> BindingArgs:
    """Decode a ``/bind`` body (``ExtenderBindingArgs`` JSON).

    Raises ``BadBody`` naming the field and value when the body is not a JSON object or
    any of ``PodName``, ``PodNamespace``, ``PodUID``, ``Node`` is missing, empty or not a
    string.
    """
    names = ("PodName", "PodNamespace", "PodUID", "Node")
    raw = _fields(body, "ExtenderBindingArgs", names)
    values: dict[str, str] = {}
    for name in names:
        value = _value(raw[name], f"ExtenderBindingArgs.{name}") if name in raw else None
        if not isinstance(value, str) or not value:
            raise BadBody(
                field=f"ExtenderBindingArgs.{name}",
                value=value,
                reason="must be a non-empty string",
            )
        values[name] = value
    return BindingArgs(
        pod_name=values["PodName"],
        pod_namespace=values["PodNamespace"],
        pod_uid=values["PodUID"],
        node=values["Node"],
    )


# -- the filter answer ------------------------------------------------------------------


def filter_result(
    args: FilterArgs,
    *,
    chosen: str | None,
    failed: Mapping[str, str],
    unresolvable: Mapping[str, str] | None = None,
) -> ExtenderFilterResult:
    """The answer for ``args``: ``chosen`` as the only node (none when ``None``), in the
    form kube-scheduler asked for (``NodeNames`` and/or ``Nodes``), with the reasons of
    ``failed`` / ``unresolvable`` for the candidates they name (other names are dropped,
    and so is the chosen node)."""
    picked = [chosen] if chosen is not None else []
    nodes = None
    if args.node_objects is not None:
        items = [args.node_objects[n] for n in picked if n in args.node_objects]
        nodes = {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items}
    cands = set(args.candidates) - set(picked)
    return ExtenderFilterResult(
        nodes=nodes,
        node_names=picked if args.names_given else None,
        failed_nodes={n: why for n, why in failed.items() if n in cands},
        failed_and_unresolvable_nodes={
            n: why for n, why in (unresolvable or {}).items() if n in cands
        },
    )


def pass_through(args: FilterArgs) -> ExtenderFilterResult:
    """Every candidate, unchanged: the answer for a pod that asks for no GPU slice."""
    nodes = None
    if args.node_objects is not None:
        nodes = {
            "apiVersion": "v1",
            "kind": "NodeList",
            "metadata": {},
            "items": list(args.node_objects.values()),
        }
    return ExtenderFilterResult(
        nodes=nodes, node_names=list(args.candidates) if args.names_given else None
    )


def invalid_request(args: FilterArgs, error: InvalidRequest) -> ExtenderFilterResult:
    """Every candidate failed and unresolvable with the request's error: a pod whose GPU
    resources are malformed fits nowhere, and preemption would not change that."""
    return filter_result(
        args,
        chosen=None,
        failed={},
        unresolvable={n: f"InvalidRequest: {error}" for n in args.candidates},
    )


# -- bind annotations -------------------------------------------------------------------


def bind_annotations(placement: Placement, *, containers: int, now_s: float) -> dict[str, str]:
    """HAMi's bind-time pod annotations for ``placement`` (with
    ``hami.io/vgpu-mig-allocations`` when a slice is a GPU instance).

    Each vendor's slices go to its own pair of annotations (``libshared.vendors``:
    ``hami.io/vgpu-devices-*`` for NVIDIA, ``hami.io/dcu-devices-*`` for Hygon DCU), each
    with one entry per container, as HAMi's ``PatchAnnotations`` writes them per device
    type; NVIDIA's are written for a placement with no other vendor's slice too.

    ``containers``: the pod's init containers plus containers (the annotation has one entry
    per container, GPU or not); ``now_s``: Unix seconds for ``hami.io/bind-time``. Raises
    ``ValueError`` when a slice names a container index outside ``containers`` or an
    unknown vendor.
    """
    grants: dict[str, list[list[keys.DeviceGrant]]] = {}
    for s in placement.slices:
        if not 0 <= s.container_index < containers:
            raise ValueError(
                f"slice of container index {s.container_index}: the pod has {containers}"
            )
        if s.vendor not in vendors.BY_NAME:
            raise ValueError(f"slice on a device of unknown vendor {s.vendor!r}")
        per = grants.setdefault(s.vendor, [[] for _ in range(containers)])
        per[s.container_index].append(
            keys.DeviceGrant(
                uuid=s.uuid,
                vendor=s.vendor,
                memory_mib=s.memory_mib,
                cores_percent=s.cores_percent,
            )
        )
    if not grants:
        grants[vendors.NVIDIA.name] = [[] for _ in range(containers)]
    out = {keys.VGPU_NODE: placement.node}
    for name, per in grants.items():
        vendor = vendors.BY_NAME[name]
        devices = keys.encode_pod_devices(per)
        out[vendor.allocated] = devices
        out[vendor.to_allocate] = devices
    out[keys.BIND_PHASE] = keys.BIND_PHASE_ALLOCATING
    out[keys.BIND_TIME] = str(int(now_s))
    migs = [
        keys.MigAllocation(
            container_index=s.container_index,
            device_index=s.device_index,
            gpu_uuid=s.uuid,
            profile=s.mig_profile,
            placement=keys.MigPlacement(start=s.mig_start, size=s.mig_size),
        )
        for s in placement.slices
        if s.mig_profile
    ]
    if migs:
        out[keys.VGPU_MIG_ALLOCATIONS] = keys.encode_mig_allocations(migs)
    return out


# -- pods and the ledger ----------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    """What the scheduler needs of a pod object: identity, ``node`` (``spec.nodeName``,
    ``""`` while unbound), ``phase`` (``status.phase``, ``"Pending"`` when absent),
    ``containers`` (names, init containers first), its annotations, and the object."""

    uid: str
    namespace: str
    name: str
    node: str
    phase: str
    containers: tuple[str, ...]
    annotations: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)
    init_containers: int = 0

    @property
    def bound(self) -> bool:
        """True once the pod has a node."""
        return bool(self.node)

    @property
    def ended(self) -> bool:
        """True when every container has stopped for good (phase Succeeded or Failed)."""
        return self.phase in ENDED_PHASES

    @property
    def allocations(self) -> dict[str, str]:
        """Each vendor's allocation annotation the pod carries, by vendor name
        (``hami.io/vgpu-devices-allocated`` for NVIDIA, ``hami.io/dcu-devices-allocated``
        for DCU); empty when the pod holds none."""
        return {
            v.name: self.annotations[v.allocated]
            for v in vendors.VENDORS
            if v.allocated in self.annotations
        }


def pod_state(obj: Mapping[str, Any]) -> PodState:
    """The ``PodState`` of a pod object (Kubernetes JSON).

    Raises ``ValueError`` for an object without ``metadata.uid`` (the API server always
    sets one).
    """
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    if not isinstance(uid, str) or not uid:
        raise ValueError(f"pod object without metadata.uid: {str(meta)[:200]}")
    annos = meta.get("annotations") or {}
    names = []
    inits = 0
    if isinstance(spec, Mapping):
        for key in ("initContainers", "containers"):
            for c in spec.get(key) or []:
                names.append(str(c.get("name", "")) if isinstance(c, Mapping) else "")
                inits += key == "initContainers"
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return PodState(
        uid=uid,
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        node=node if isinstance(node, str) else "",
        phase=phase if isinstance(phase, str) and phase else "Pending",
        containers=tuple(names),
        annotations={str(k): str(v) for k, v in annos.items()}
        if isinstance(annos, Mapping)
        else {},
        raw=dict(obj),
        init_containers=inits,
    )


def restored_placement(state: PodState, registration: NodeDevices) -> Placement:
    """The placement a bound pod holds by its allocation annotations
    (``PodState.allocations``: ``hami.io/vgpu-devices-allocated``, and
    ``hami.io/dcu-devices-allocated`` for DCUs), on ``registration`` (its node's devices).

    The charge and priorities come from the pod's spec when it parses (else none). Raises
    ``AnnotationDecodeError`` when no annotation is there, one is malformed, names more
    containers than the pod has, or a device that is not on the node or not of the
    annotation's vendor.
    """
    found = state.allocations
    if not found:
        raise AnnotationDecodeError(key=keys.VGPU_DEVICES_ALLOCATED, value="", reason="missing")
    slot_of = {d.uuid: slot for slot, d in enumerate(registration.devices)}
    try:
        request: PodRequest | None = parse_pod(state.raw)
    except InvalidRequest:
        request = None
    priorities = {c.index: c.priority for c in request.containers} if request else {}
    slices = []
    for name, value in found.items():
        key = vendors.BY_NAME[name].allocated
        decoded = keys.decode_pod_devices(value, key=key)
        grants = keys.container_entries(decoded, len(state.containers))
        if len(grants) > len(state.containers):
            raise AnnotationDecodeError(
                key=key,
                value=value,
                reason=f"names {len(grants)} containers, the pod has {len(state.containers)}",
            )
        for index, container in enumerate(grants):
            for g in container:
                slot = slot_of.get(g.uuid)
                if slot is None:
                    raise AnnotationDecodeError(
                        key=key, value=value, reason=f"device {g.uuid} is not on node {state.node}"
                    )
                if registration.devices[slot].vendor != name:
                    raise AnnotationDecodeError(
                        key=key,
                        value=value,
                        reason=f"device {g.uuid} is a {registration.devices[slot].vendor} device",
                    )
                slices.append(
                    Slice(
                        pod_uid=state.uid,
                        namespace=state.namespace,
                        pod=state.name,
                        container=state.containers[index],
                        container_index=index,
                        uuid=g.uuid,
                        device_index=slot,
                        memory_mib=g.memory_mib,
                        cores_percent=g.cores_percent,
                        priority=priorities.get(index) if name == vendors.NVIDIA.name else None,
                        init=index < state.init_containers,
                        vendor=name,
                    )
                )
    charge = PodCharge(
        pod_uid=state.uid,
        cpu_milli=request.cpu_milli if request else 0,
        memory_mib=request.memory_mib if request else 0,
    )
    return Placement(
        pod_uid=state.uid,
        namespace=state.namespace,
        pod=state.name,
        node=registration.node,
        slices=tuple(slices),
        charge=charge,
    )


@dataclass(frozen=True)
class Release:
    """Free ``pod_uid``'s slices on ``node``: ``cause`` is ``"ended"`` (the pod
    finished), ``"gone"`` (not in the API) or ``"expired"`` (not bound within the TTL);
    ``reason`` says it for people."""

    pod_uid: str
    node: str
    cause: str
    reason: str


@dataclass(frozen=True)
class Hold:
    """A bound pod the ledger does not hold whose annotation cannot be decoded: its node
    is offered to no pod until the pod ends or its annotation is fixed."""

    pod: PodState
    error: str


@dataclass(frozen=True)
class Undecodable:
    """A pod the ledger holds whose annotation cannot be decoded: reported; its slices
    stay in the ledger."""

    pod: PodState
    error: str


@dataclass(frozen=True)
class Plan:
    """What ``reconcile`` decided: ``releases``, ``restores`` (placements to commit as
    they are), ``holds``, ``undecodable`` reports, ``waiting`` (bound pods on a node that
    has not registered yet: restored once it does), and ``unbound_since``, the timers to
    keep for the next round (pod UID -> the time it was first seen held but unbound)."""

    releases: list[Release] = field(default_factory=list)
    restores: list[Placement] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    undecodable: list[Undecodable] = field(default_factory=list)
    waiting: list[PodState] = field(default_factory=list)
    unbound_since: dict[str, float] = field(default_factory=dict)


def reconcile(
    *,
    pods: Mapping[str, PodState],
    ledger: Mapping[str, str],
    registrations: Mapping[str, NodeDevices],
    unbound_since: Mapping[str, float],
    now: float,
    ttl_s: float,
    listed: bool,
    busy: Collection[str] = (),
) -> Plan:
    """Compare the ledger (``ledger``: pod UID -> node) with the pods in the API (``pods``:
    UID -> state).

    Only Kubernetes pods count (``kubernetes_uid``); UIDs in ``busy`` (a bind in progress)
    are left alone. A ledger pod that ended is released; one missing from ``pods`` is
    released at once when ``listed`` (``pods`` is a fresh list taken after ``ledger`` was
    read), else after ``ttl_s`` seconds (the watch may lag a new pod); one still unbound
    ``ttl_s`` seconds after it was first seen (``unbound_since``, times in the clock of
    ``now``) is released (the reservation TTL). A bound pod with HAMi's allocation
    annotation that the ledger does not hold is restored on its node, or held when the
    annotation cannot be decoded (HAMi #2958); the undecodable annotation of a pod the
    ledger holds is reported (its slices stay).
    """
    plan = Plan()
    for uid, node in ledger.items():
        if not kubernetes_uid(uid) or uid in busy:
            continue
        state = pods.get(uid)
        if state is not None and state.ended:
            plan.releases.append(
                Release(pod_uid=uid, node=node, cause="ended", reason=f"pod {state.phase}")
            )
            continue
        if state is None and listed:
            plan.releases.append(
                Release(pod_uid=uid, node=node, cause="gone", reason="pod gone from the API")
            )
            continue
        if state is not None and state.bound:
            for name, value in state.allocations.items():
                try:
                    keys.decode_pod_devices(value, key=vendors.BY_NAME[name].allocated)
                except AnnotationDecodeError as exc:
                    plan.undecodable.append(Undecodable(pod=state, error=str(exc)))
                    break
            continue
        since = unbound_since.get(uid, now)
        if now - since >= ttl_s:
            if state is None:
                cause, why = "gone", f"pod not in the API for {ttl_s:g} s"
            else:
                cause, why = "expired", f"reservation not bound within {ttl_s:g} s"
            plan.releases.append(Release(pod_uid=uid, node=node, cause=cause, reason=why))
        else:
            plan.unbound_since[uid] = since
    for uid, state in pods.items():
        if uid in ledger or uid in busy or not state.bound or state.ended:
            continue
        if not state.allocations:
            continue  # not placed by vslice or HAMi: none of the ledger's business
        registration = registrations.get(state.node)
        if registration is None:
            plan.waiting.append(state)
            continue
        try:
            plan.restores.append(restored_placement(state, registration))
        except AnnotationDecodeError as exc:
            plan.holds.append(Hold(pod=state, error=str(exc)))
    return plan


def held_reason(hold: Hold) -> str:
    """The failure message of a node held by ``hold``."""
    return (
        f"{UNDECODABLE}: pod {hold.pod.namespace}/{hold.pod.name} on this node has an "
        f"allocation annotation that cannot be decoded; its capacity is held ({hold.error})"
    )
