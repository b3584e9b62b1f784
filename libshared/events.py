"""Messages between services (msgspec Structs, frozen, keyword-only, tagged) and their codecs.

``Placement`` is what a scheduler commits to the ledger and sends to the node agent;
``Unschedulable`` carries the reason and, per rejected node, HAMi-style counted reasons
(``{"node-7": "2/8 CardInsufficientMemory"}``). The bus messages of ``ARCHITECTURE.md``
("The bus") are here too, with one module-level JSON encoder and one decoder per reply
kind. Every tagged message carries ``"type": "<tag>"`` in its JSON; a ``PodRequest``
(``libshared.resources``) travels untagged. Pure data: publishing is left to the adapters.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from libshared import bounds
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger, PodCharge, Slice
from libshared.resources import PodRequest

# One pod's slices: one per GPU of each container.
MAX_POD_SLICES = bounds.MAX_CONTAINERS * bounds.MAX_GPUS


class Placement(msgspec.Struct, frozen=True, kw_only=True, tag="placement"):
    """A pod's slices on one node, plus its node-level CPU/memory charge (bounded as the
    ``PodRequest`` and the ledger it comes from)."""

    pod_uid: bounds.Uid
    namespace: bounds.Namespace
    pod: bounds.PodName
    node: bounds.NodeName
    slices: Annotated[tuple[Slice, ...], msgspec.Meta(max_length=MAX_POD_SLICES)]
    charge: PodCharge


# An Unschedulable's per-node reasons: at most this many nodes, each reason at most this
# long (HAMi's counted reasons, "2/8 CardInsufficientMemory, ...", take well under it), so
# the answer about a pod on a fleet of any size stays within max_payload.
MAX_NODE_REASONS = 1024
MAX_REASON = 512
NodeReason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]


class Unschedulable(msgspec.Struct, frozen=True, kw_only=True, tag="unschedulable"):
    """No node fits: ``reason`` for people (every node counted), ``node_reasons`` per
    rejected node, for the first ``MAX_NODE_REASONS`` of them (``node_reasons_of``)."""

    pod_uid: bounds.Uid
    reason: Annotated[str, msgspec.Meta(max_length=4 * MAX_REASON)]
    node_reasons: Annotated[
        dict[bounds.NodeName, NodeReason], msgspec.Meta(max_length=MAX_NODE_REASONS)
    ] = {}


def node_reasons_of(reasons: dict[str, str]) -> dict[str, str]:
    """``reasons`` (node -> reason) within ``Unschedulable``'s bounds: the first
    ``MAX_NODE_REASONS`` nodes, each reason cut to ``MAX_REASON`` characters. Pure."""
    out: dict[str, str] = {}
    for node, why in reasons.items():
        if len(out) == MAX_NODE_REASONS:
            break
        out[node] = why[:MAX_REASON]
    return out


Decision = Placement | Unschedulable


class Release(msgspec.Struct, frozen=True, kw_only=True, tag="release"):
    """Ask the schedulers to free every slice and charge of ``pod_uid``."""

    pod_uid: bounds.Uid


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="ack"):
    """A release done: ``node`` the pod was freed on and how many ``slices`` it held;
    ``node=None`` when the pod held nothing (releasing twice is not an error)."""

    pod_uid: bounds.Uid
    node: bounds.NodeName | None = None
    slices: Annotated[int, msgspec.Meta(ge=0, le=MAX_POD_SLICES)] = 0


# The most bytes an admission review request may have: its pod object is free-form, so
# the door refuses a body over this before decoding it. A pod is far smaller; Kubernetes
# itself stores no object over 1.5 MiB (etcd's request limit, ``--max-request-bytes``,
# https://etcd.io/docs/v3.5/dev-guide/limit/), and the webhook takes at most the same 1 MiB.
MAX_REVIEW_BYTES = 1 << 20


class AdmissionReview(msgspec.Struct, frozen=True, kw_only=True, tag="admission-review"):
    """A pod (Kubernetes JSON object with ``metadata`` and ``spec``) to admit, in a body of
    at most ``MAX_REVIEW_BYTES``.

    The admission service also accepts the bare pod object as the request body.
    """

    pod: dict[str, Any]


class Denial(msgspec.Struct, frozen=True, kw_only=True, tag="denial"):
    """A pod refused at admission: the ``container`` (``""`` for pod-level fields), the
    ``field`` (resource or annotation name) and ``value`` (as given, as text) at fault."""

    uid: str
    container: str
    field: str
    value: str
    reason: str


class BusError(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    """The reply to a message a service could not read or handle: ``reason`` names the
    problem (e.g. the decode error with its JSON path). ``retry_after_s`` (seconds) is set
    when the same request may be sent again after that long (a
    ``libshared.errors.TemporaryError``); None when sending it again cannot help."""

    reason: str
    retry_after_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


_BUS_ERROR = msgspec.json.Decoder(BusError)


def retry_after_of(data: bytes) -> float | None:
    """``retry_after_s`` when ``data`` is a ``BusError`` that may be retried, else None
    (any other reply, or one that does not decode)."""
    try:
        return _BUS_ERROR.decode(data).retry_after_s
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    """A node agent prepared the pod's slices on ``node``; ``env`` is what each container
    gets (container name -> variable -> value): at most ``bounds.MAX_CONTAINERS``
    containers of ``bounds.Environment`` each."""

    pod_uid: bounds.Uid
    node: bounds.NodeName
    env: Annotated[
        dict[bounds.ContainerName, bounds.Environment],
        msgspec.Meta(max_length=bounds.MAX_CONTAINERS),
    ] = {}


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    """A node agent could not prepare the pod's slices on ``node``: ``reason``, at most
    ``bounds.MAX_TEXT`` characters (``bounds.clip``). ``pod_uid`` is empty in the answer
    to a query too malformed to name its pod."""

    pod_uid: bounds.UidOrEmpty
    node: bounds.NodeName
    reason: bounds.Text


class SliceQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Asked of the node agent on ``<prefix>.node.<node>.slice`` (``vslice run``): the
    ``Ready``/``Failed`` of pod ``pod_uid`` once its slice is prepared, waiting at most
    ``wait_s`` seconds (0-60). The answer goes to the asker's inbox alone."""

    pod_uid: bounds.Uid
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 30.0


class Stats(msgspec.Struct, frozen=True, kw_only=True, tag="stats"):
    """One scheduler replica's counters since it started: requests answered, pods
    placed, unschedulable answers, releases, lost ledger races (``conflicts``: failed
    compare-and-sets), pods whose claim another replica held (``claims_lost``: answered
    with that replica's placement), dead claims taken over (``takeovers``), and malformed
    or failed requests (``errors``)."""

    name: bounds.PodName
    schedule_requests: int = 0
    placed: int = 0
    unschedulable: int = 0
    released: int = 0
    conflicts: int = 0
    claims_lost: int = 0
    takeovers: int = 0
    errors: int = 0


# A usage report's collections: a row per container slice and device (a device holds at
# most ``MAX_SPLIT_COUNT`` of them), each naming at most ``MAX_USAGE_PIDS`` processes (a
# CUDA context each: libvgpu has 1,024 slots per container, a container rarely runs more
# than a few), and at most ``MAX_ESCAPES`` escapes and ``MAX_PROBLEMS`` problems. The node
# agent clips its report to these (``services.nodeagent.core.usages.clipped``) and logs
# what it left out, so the largest report (``libshared.payloads``) fits max_payload.
MAX_USAGE_ROWS = bounds.MAX_DEVICES_PER_NODE * bounds.MAX_SPLIT_COUNT
MAX_USAGE_PIDS = 32
MAX_ESCAPES = 256
MAX_PROBLEMS = 64
MAX_PROBLEM = 1024


class ContainerUsage(msgspec.Struct, frozen=True, kw_only=True):
    """What one container's processes use of one device of its slice, read back from its
    shared cache file (libvgpu's charges) and NVML.

    ``used_bytes``: device memory charged by the container's processes, bytes;
    ``limit_bytes``: the slice's memory cap, bytes (0: none); ``sm_limit_percent``: the
    compute cap, percent (0: none); ``utilization_percent``: the container's share of the
    device's busy time over the last sampling period, percent 0-100 (None when unknown);
    ``last_kernel_at``: Unix time (seconds) of the container's last kernel launch (None:
    none yet); ``pids``: host PIDs of its live processes (the first ``MAX_USAGE_PIDS``).
    """

    pod_uid: bounds.Uid
    namespace: bounds.Namespace
    pod: bounds.PodName
    container: bounds.ContainerName
    container_index: bounds.Index
    uuid: bounds.DeviceUuid
    device_index: bounds.Index
    used_bytes: bounds.Bytes
    limit_bytes: bounds.Bytes
    sm_limit_percent: bounds.Percent = 0
    utilization_percent: bounds.Fraction | None = None
    last_kernel_at: bounds.UnixTime | None = None
    pids: Annotated[tuple[bounds.Pid, ...], msgspec.Meta(max_length=MAX_USAGE_PIDS)] = ()


class DeviceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One physical GPU as the host sees it (NVML): memory used and total in bytes,
    utilization percent 0-100 over NVML's last sample period (None when unknown), and its
    memory controller's (``nvmlUtilization_t.memory``, percent of that period the device
    memory was read or written; None when unknown)."""

    uuid: bounds.DeviceUuid
    index: bounds.Index
    type: bounds.DeviceType
    used_bytes: bounds.Bytes
    total_bytes: bounds.Bytes
    utilization_percent: bounds.Fraction | None = None
    memory_utilization_percent: bounds.Fraction | None = None


class Escape(msgspec.Struct, frozen=True, kw_only=True):
    """A host process using more device memory than its slice allows (one that escaped
    ``LD_PRELOAD``, say): NVML's figure ``used_bytes`` against ``limit_bytes`` of the slice
    the process belongs to (``pod_uid``/``container``; empty when it belongs to none), and
    whether the node agent ``killed`` it (``--enforce=kill``)."""

    pid: bounds.Pid
    uuid: bounds.DeviceUuid
    used_bytes: bounds.Bytes
    limit_bytes: bounds.Bytes
    pod_uid: bounds.UidOrEmpty = ""
    container: bounds.ContainerOrEmpty = ""
    killed: bool = False


class MigInstanceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """A MIG instance the node agent realized for a slice (HAMi's
    ``hami_node_gpu_mig_instance_info`` labels): the GPU ``uuid``, the MIG device's
    ``mig_uuid``, its ``profile``, NVML's ``gpu_instance_id`` and ``compute_instance_id``,
    and its placement ``[start, start + size)`` in memory slices."""

    uuid: bounds.DeviceUuid
    mig_uuid: bounds.DeviceUuid
    profile: bounds.MigProfileName
    gpu_instance_id: bounds.Index
    compute_instance_id: bounds.Index
    start: bounds.MigSlot
    size: bounds.MigSize


class NodeUsage(msgspec.Struct, frozen=True, kw_only=True, tag="node-usage"):
    """A node agent's periodic usage report on ``<prefix>.usage.<node>`` (core NATS).

    ``at``: Unix time (seconds) of the reading; ``problems``: cache files that could not
    be read (path and reason), skipped in ``containers``; ``migs``: the MIG instances
    realized on the node. Each collection is bounded
    (``MAX_USAGE_ROWS`` and the constants above it).
    """

    node: bounds.NodeName
    at: bounds.UnixTime
    devices: Annotated[
        tuple[DeviceUsage, ...], msgspec.Meta(max_length=bounds.MAX_DEVICES_PER_NODE)
    ] = ()
    containers: Annotated[tuple[ContainerUsage, ...], msgspec.Meta(max_length=MAX_USAGE_ROWS)] = ()
    escapes: Annotated[tuple[Escape, ...], msgspec.Meta(max_length=MAX_ESCAPES)] = ()
    problems: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=MAX_PROBLEM)], ...],
        msgspec.Meta(max_length=MAX_PROBLEMS),
    ] = ()
    migs: Annotated[
        tuple[MigInstanceUsage, ...],
        msgspec.Meta(max_length=bounds.MAX_DEVICES_PER_NODE * bounds.MAX_MIG_SLOTS),
    ] = ()


ScheduleReply = Placement | Unschedulable | BusError
ReleaseReply = Ack | BusError
AllocEvent = Placement | Release

ENCODER = msgspec.json.Encoder()
"""Encodes any bus message (tagged Structs, ``PodRequest``) to JSON bytes."""

POD_REQUEST = msgspec.json.Decoder(PodRequest)
# the values of the nodes and ledger buckets
NODE_DEVICES = msgspec.json.Decoder(NodeDevices)
NODE_LEDGER = msgspec.json.Decoder(NodeLedger)
SCHEDULE_REPLY = msgspec.json.Decoder(ScheduleReply)
RELEASE_REQUEST = msgspec.json.Decoder(Release)
RELEASE_REPLY = msgspec.json.Decoder(ReleaseReply)
ALLOC_EVENT = msgspec.json.Decoder(AllocEvent)
PLACEMENT = msgspec.json.Decoder(Placement)
STATS = msgspec.json.Decoder(Stats)
NODE_ANSWER = msgspec.json.Decoder(Ready | Failed)
SLICE_QUERY = msgspec.json.Decoder(SliceQuery)
NODE_USAGE = msgspec.json.Decoder(NodeUsage)

_TAGGED_REVIEW_REPLY: msgspec.json.Decoder[Denial | BusError] = msgspec.json.Decoder(
    Denial | BusError
)


class _Tag(msgspec.Struct):
    type: str | None = None


_TAG = msgspec.json.Decoder(_Tag)


def decode_review_reply(data: bytes) -> PodRequest | Denial | BusError:
    """The admission service's reply: an untagged ``PodRequest``, or a ``Denial`` /
    ``BusError`` (tagged). Raises ``msgspec.DecodeError`` / ``ValidationError`` otherwise."""
    if _TAG.decode(data).type is None:
        return POD_REQUEST.decode(data)
    return _TAGGED_REVIEW_REPLY.decode(data)
