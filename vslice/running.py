"""``vslice run``: one program inside a slice of this machine's GPU.

Asks the running ``vslice up`` stack for a slice on the local node -- the request goes
through admission as a one-container pod (HAMi's resource names and annotations), then to
the scheduler replicas -- waits for the node agent's ``.ready``, runs the command with
the slice's environment (libvgpu preloaded; on mock GPUs the mock driver first on the
library path) with stdin, stdout, stderr and the exit code passed through, and releases
the slice when the command exits or this process is interrupted. The slice holds only
the command's processes; what ``vslice run`` itself does is not charged.

The slice is held by a lease (``libshared.leases``): put before the slice is asked for,
renewed every third of its TTL (``$VSLICE_LEASE_TTL_S``, default 15 s), deleted after the
release. A client killed by SIGKILL stops renewing and a scheduler replica releases its
slice once the TTL has passed. When the bus went away meanwhile (``vslice down``), the
client still waits for its command and exits with its status, after one line saying
the slice was not released by it.

What it leaves to others: placing (``services.scheduler``), preparing the slice
(``services.nodeagent``), the stack's processes (``vslice.stacks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from libshared import bounds, connecting, events, kvwrites, quarantines, vendors
from libshared import leases as leasing
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger, Slice
from libshared.subjects import deadline_headers, pod_key
from services.nodeagent import settings as nodeagent_settings
from services.nodeagent.core import registrations
from vslice import stacks

log = logging.getLogger("vslice.run")

READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
TEMPORARY_RETRIES = 20  # schedule requests answered with retry_after_s, sent again
CONTAINER = "main"
EXIT_NO_SLICE = 3  # the slice was refused or could not be prepared
# Variables that list paths: the slice's entries go first, the caller's stay after them.
PATH_LISTS = {"LD_PRELOAD": " ", "LD_LIBRARY_PATH": ":"}


class RunError(VsliceError):
    """No slice for the command: ``exit_code`` is what ``vslice run`` exits with."""

    def __init__(self, message: str, *, exit_code: int = EXIT_NO_SLICE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SliceRequest:
    """What ``vslice run`` asks for: ``memory_mib`` or ``memory_percent`` per GPU (neither:
    the whole card), ``cores_percent``, ``gpus``, ``gpu_type`` (``nvidia.com/use-gputype``).
    With ``dcus`` (a count) it asks Hygon DCUs instead (``libshared.vendors.DCU``):
    ``memory_mib`` and ``cores_percent`` per DCU, ``gpu_type`` a DCU type word;
    ``memory_percent`` has no DCU resource."""

    memory_mib: int | None = None
    memory_percent: int | None = None
    cores_percent: int | None = None
    gpus: int = 1
    gpu_type: str | None = None
    dcus: int | None = None

    @property
    def vendor(self) -> vendors.Vendor:
        """The vendor whose devices it asks for."""
        return vendors.DCU if self.dcus is not None else vendors.NVIDIA

    @property
    def count(self) -> int:
        """How many devices it asks for."""
        return self.dcus if self.dcus is not None else self.gpus


def pod_spec(request: SliceRequest, *, uid: str, uuids: Sequence[str]) -> dict[str, object]:
    """The one-container pod (Kubernetes JSON) that asks for ``request`` on the devices
    ``uuids`` (its vendor's UUID selector, ``nvidia.com/use-gpuuuid`` or
    ``hygon.com/use-gpuuuid``: this node's devices of that vendor). Pure."""
    vendor = request.vendor
    limits = {vendor.count: str(request.count)}
    if request.memory_mib is not None:
        limits[vendor.memory] = str(request.memory_mib)
    if request.memory_percent is not None and vendor.memory_percentage is not None:
        limits[vendor.memory_percentage] = str(request.memory_percent)
    if request.cores_percent is not None:
        limits[vendor.cores] = str(request.cores_percent)
    annos = {vendor.use_uuid: ",".join(uuids)}
    if request.gpu_type:
        annos[vendor.use_type] = request.gpu_type
    return {
        "metadata": {"name": uid, "namespace": "default", "uid": uid, "annotations": annos},
        "spec": {"containers": [{"name": CONTAINER, "resources": {"limits": limits}}]},
    }


def command_env(base: Mapping[str, str], slice_env: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the slice's variables; for ``LD_PRELOAD`` and ``LD_LIBRARY_PATH`` the
    slice's entries come first and the caller's follow. Pure."""
    env = dict(base)
    for key, value in slice_env.items():
        sep = PATH_LISTS.get(key)
        env[key] = f"{value}{sep}{base[key]}" if sep and base.get(key) else value
    return env


def cores_text(cores_percent: int) -> str:
    """A slice's compute share for people: ``30% cores``, or ``no core limit`` for 0 (HAMi
    reads ``nvidia.com/gpucores`` 0 as "not limited", not as "no compute"). Pure."""
    return f"{cores_percent}% cores" if cores_percent else "no core limit"


def describe(placement: events.Placement) -> str:
    """One line saying where the slice is. Pure."""
    parts = [
        f"{s.uuid} {s.memory_mib:,} MiB {cores_text(s.cores_percent)}" for s in placement.slices
    ]
    return f"slice of pod {placement.pod_uid} on {placement.node}: {', '.join(parts)}"


@dataclass(frozen=True)
class FreeDevice:
    """What a registered device has left: ``memory_mib`` (MiB), ``cores_percent`` and
    ``slots`` (slices it may still take of its ``split_count``)."""

    node: str
    uuid: str
    type: str
    healthy: bool
    memory_mib: int
    cores_percent: int
    slots: int


def free_devices(registered: NodeDevices, ledger: NodeLedger | None) -> list[FreeDevice]:
    """Each registered device of the node with what its ledger leaves free, largest free
    memory first. Pure."""
    held = ledger.slices if ledger is not None else ()
    out = []
    for dev in registered.devices:
        mine = [s for s in held if s.uuid == dev.uuid]
        out.append(
            FreeDevice(
                node=registered.node,
                uuid=dev.uuid,
                type=dev.type,
                healthy=dev.healthy,
                memory_mib=max(0, dev.memory_mib - sum(s.memory_mib for s in mine)),
                cores_percent=max(0, dev.cores_percent - sum(s.cores_percent for s in mine)),
                slots=max(0, dev.split_count - len(mine)),
            )
        )
    return sorted(out, key=lambda f: (-f.memory_mib, f.uuid))


def asked_text(request: SliceRequest) -> str:
    """What ``request`` asks for, for people: ``999,999 MiB, no core limit on 1 GPU``. Pure."""
    if request.memory_mib is not None:
        memory = f"{request.memory_mib:,} MiB"
    elif request.memory_percent is not None:
        memory = f"{request.memory_percent}% of the memory"
    else:
        memory = "a whole card's memory"
    noun = "DCU" if request.dcus is not None else "GPU"
    gpus = f"{request.count} {noun}" + ("s" if request.count != 1 else "")
    kind = f" of type {request.gpu_type}" if request.gpu_type else ""
    cores = request.cores_percent
    if cores is None and request.dcus is not None:
        cores = 100  # HAMi's default for a DCU: the whole card
    return f"{memory}, {cores_text(cores or 0)} on {gpus}{kind}"


def refusal_text(
    request: SliceRequest, free: Sequence[FreeDevice], answer: events.Unschedulable
) -> str:
    """Why no slice fits, for people: what was asked, the largest free device (healthy, with
    a free slot), and the scheduler's own reasons. Pure.

    ``asked 999,999 MiB, no core limit on 1 GPU; largest free: 16,384 MiB, 100% cores on
    vm-0/GPU-0 (scheduler: ...)``."""
    usable = [f for f in free if f.healthy and f.slots > 0]
    if usable:
        best = usable[0]
        where = (
            f"largest free: {best.memory_mib:,} MiB, {best.cores_percent}% cores"
            f" on {best.node}/{best.uuid}"
        )
        if len(usable) > 1:
            where += f" ({len(usable)} GPUs with a free slot)"
    elif free:
        where = "no GPU of this node has a free slot or is healthy"
    else:
        where = "this node registered no GPU"
    return f"asked {asked_text(request)}; {where} (scheduler: {unschedulable_text(answer)})"


def unschedulable_text(answer: events.Unschedulable) -> str:
    """The refusal as one line: the summary and each node's reasons. Pure."""
    nodes = "; ".join(f"{n}: {why}" for n, why in sorted(answer.node_reasons.items()))
    return answer.reason + (f" ({nodes})" if nodes else "")


# The variables a slice's environment may hold (``services.nodeagent.core.preparing``);
# anything else in a node agent's answer is refused, not passed on.
_MEMORY_LIMIT = re.compile(r"^CUDA_DEVICE_MEMORY_LIMIT_(\d+)$")
_MIG_UUID = re.compile(
    r"MIG-[0-9A-Za-z][0-9A-Za-z/-]{0,120}"
)  # MIG-<uuid> (or MIG-GPU-<uuid>/<gi>/<ci>)
_KNOWN = frozenset(
    {
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_SM_LIMIT",
        "CUDA_TASK_PRIORITY",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE",
        "GPU_CORE_UTILIZATION_POLICY",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "VSLICE_MOCKGPU_STATE",
        "VSLICE_MOCKGPU_DEVICES",
        "CUDA_MPS_PIPE_DIRECTORY",
        "CUDA_MPS_LOG_DIRECTORY",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
        "HIP_VISIBLE_DEVICES",
    }
)


def _inside(path: str, roots: Sequence[Path]) -> bool:
    if not path or not os.path.isabs(path):
        return False
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def verify_ready(
    ready: events.Ready,
    placement: events.Placement,
    *,
    host_root: Path,
    library_dirs: Sequence[Path] = (),
    dcu_indices: Mapping[str, int] | None = None,
) -> list[str]:
    """What is wrong with a node agent's ``Ready`` for ``placement`` (empty: nothing).

    The answer must be for this pod on this node, and the container's environment must be
    the one the placement implies (for MIG slices: one ``MIG-<uuid>`` per slice and no
    libvgpu or limit, ``_mig_problems``; for MPS clients, ``_mps_problems``; for Hygon
    DCUs, ``_dcu_problems``, their indices from ``dcu_indices``, UUID -> index, the node's
    registration): the
    placement's device UUIDs in order, one memory limit
    per device equal to its slice (``<MiB>m``), the SM limit of its cores (absent at 0),
    ``LD_PRELOAD`` naming only libraries in the node agent's own ``<host_root>/lib``, the
    shared cache under ``<host_root>/containers``, library paths under ``host_root`` or
    ``library_dirs`` (the mock driver), and no variable outside the slice's set. An
    answer that passes was not shaped by anyone but vslice; one that fails is refused
    before any command runs. Pure (reads only symbolic links of the paths named).
    """
    problems: list[str] = []
    if ready.pod_uid != placement.pod_uid or ready.node != placement.node:
        problems.append(f"answer for {ready.pod_uid} on {ready.node}, not this slice")
    env = ready.env.get(CONTAINER)
    if env is None:
        return [*problems, f"no environment for container {CONTAINER!r}"]
    mine = sorted(
        (s for s in placement.slices if s.container == CONTAINER), key=lambda s: s.device_index
    )
    dcus = [s for s in mine if s.vendor == vendors.DCU.name]
    if dcus and len(dcus) != len(mine):
        problems.append("a slice of GPUs and DCUs at once, which vslice run never asks")
    elif dcus:
        problems += _dcu_problems(env, dcus, dcu_indices or {})
    elif mine and all(s.mig_profile for s in mine):
        problems += _mig_problems(env, len(mine))
    elif "CUDA_MPS_PIPE_DIRECTORY" in env:
        problems += _mps_problems(env, mine, host_root)
    else:
        problems += _sliced_problems(env, mine, host_root)
        mps = sorted(k for k in env if k.startswith("CUDA_MPS_"))
        if mps:
            problems.append(f"MPS variables {mps} without an MPS server")
        if vendors.DCU.visible_devices in env:
            problems.append(f"{vendors.DCU.visible_devices} on a slice of GPUs")
    cache = env.get("CUDA_DEVICE_MEMORY_SHARED_CACHE", "")
    if not _inside(cache, [host_root / "containers"]):
        problems.append(f"CUDA_DEVICE_MEMORY_SHARED_CACHE={cache!r} is outside the host root")
    for key in ("LD_LIBRARY_PATH", "VSLICE_MOCKGPU_STATE"):
        for part in filter(None, env.get(key, "").split(":")):
            if not _inside(part, [host_root, *library_dirs]):
                problems.append(f"{key} names {part!r}, outside the node agent's directories")
    unknown = sorted(k for k in env if k not in _KNOWN and not _MEMORY_LIMIT.match(k))
    if unknown:
        problems.append(f"unexpected variables {unknown}")
    return problems


def _visible_problems(env: Mapping[str, str], mine: Sequence[Slice]) -> list[str]:
    """Both visible-devices variables must name the slices' GPUs, in order."""
    uuids = ",".join(s.uuid for s in mine)
    return [
        f"{key}={env.get(key)!r}, the slice holds {uuids!r}"
        for key in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
        if env.get(key) != uuids
    ]


def _sliced_problems(env: Mapping[str, str], mine: Sequence[Slice], host_root: Path) -> list[str]:
    """What is wrong with the environment of a container holding sliced devices."""
    problems = _visible_problems(env, mine)
    limits = {int(m.group(1)): v for k, v in env.items() if (m := _MEMORY_LIMIT.match(k))}
    wanted = {i: f"{s.memory_mib}m" for i, s in enumerate(mine)}
    if limits != wanted:
        problems.append(f"memory limits {limits}, the slice holds {wanted}")
    cores = max((s.cores_percent for s in mine), default=0)
    sm = env.get("CUDA_DEVICE_SM_LIMIT")
    if (str(min(cores, 100)) if cores > 0 else None) != sm:
        problems.append(f"CUDA_DEVICE_SM_LIMIT={sm!r}, the slice holds {cores}% cores")
    if env.get("GPU_CORE_UTILIZATION_POLICY", "default") not in ("default", "force", "disable"):
        problems.append(f"GPU_CORE_UTILIZATION_POLICY={env['GPU_CORE_UTILIZATION_POLICY']!r}")
    preload = env.get("LD_PRELOAD", "").split()
    lib = host_root / "lib"
    if not preload or not all(_inside(p, [lib]) for p in preload):
        problems.append(f"LD_PRELOAD={env.get('LD_PRELOAD')!r} is not the node agent's libvgpu")
    return problems


def _mps_problems(env: Mapping[str, str], mine: Sequence[Slice], host_root: Path) -> list[str]:
    """What is wrong with the environment of a container whose slices are MPS clients: the
    slices' UUIDs, each device's memory in ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``, its cores
    in ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (absent at 0), the MPS directories under the
    host root, and no libvgpu or libvgpu limit."""
    problems = _visible_problems(env, mine)
    pinned = ",".join(f"{i}={s.memory_mib}M" for i, s in enumerate(mine))
    if env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT") != pinned:
        problems.append(
            f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={env.get('CUDA_MPS_PINNED_DEVICE_MEM_LIMIT')!r},"
            f" the slice holds {pinned!r}"
        )
    cores = max((s.cores_percent for s in mine), default=0)
    threads = env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if (str(min(cores, 100)) if cores > 0 else None) != threads:
        problems.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={threads!r}, the slice holds {cores}%")
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        if not _inside(env.get(key, ""), [host_root / "mps"]):
            problems.append(f"{key}={env.get(key)!r} is not the node agent's MPS server")
    return problems + _no_libvgpu(env, "an MPS slice")


def _dcu_problems(
    env: Mapping[str, str], mine: Sequence[Slice], dcu_indices: Mapping[str, int]
) -> list[str]:
    """What is wrong with the environment of a container holding Hygon DCU slices: their
    indices on the node (``dcu_indices``), in order, in ``HIP_VISIBLE_DEVICES``, and
    nothing of CUDA's (no visible GPU, no libvgpu or limit, no mock CUDA driver: libvgpu
    does not hold a DCU)."""
    key = vendors.DCU.visible_devices
    unknown = [s.uuid for s in mine if s.uuid not in dcu_indices]
    if unknown:
        return [f"DCU {unknown[0]} is not registered on the node"]
    indices = ",".join(str(dcu_indices[s.uuid]) for s in mine)
    problems = (
        [] if env.get(key) == indices else [f"{key}={env.get(key)!r}, the slice holds {indices!r}"]
    )
    problems += [
        f"{k}={env[k]!r} on a DCU slice"
        for k in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
        if k in env
    ]
    problems += _no_libvgpu(env, "a DCU slice")
    mps = sorted(k for k in env if k.startswith("CUDA_MPS_"))
    if mps:
        problems.append(f"MPS variables {mps} on a DCU slice")
    return problems


def _mig_problems(env: Mapping[str, str], count: int) -> list[str]:
    """What is wrong with the environment of a container holding ``count`` MIG slices:
    one MIG device UUID each in both visible-devices variables, and no libvgpu or limit
    (the GPU instance is the limit)."""
    problems = []
    visible = env.get("NVIDIA_VISIBLE_DEVICES", "")
    named = visible.split(",") if visible else []
    if len(named) != count or not all(_MIG_UUID.fullmatch(u) for u in named):
        problems.append(f"NVIDIA_VISIBLE_DEVICES={visible!r}: not {count} MIG device UUID(s)")
    if env.get("CUDA_VISIBLE_DEVICES") != visible:
        problems.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} != {visible!r}")
    problems += _no_libvgpu(env, "a MIG slice")
    mps = sorted(k for k in env if k.startswith("CUDA_MPS_"))
    if mps:
        problems.append(f"MPS variables {mps} on a MIG slice")
    return problems


def _no_libvgpu(env: Mapping[str, str], what: str) -> list[str]:
    """libvgpu's preload or limits in the environment of ``what`` (a slice something else
    holds to its size)."""
    problems = [
        f"{k}={env[k]!r} on {what}" for k in ("LD_PRELOAD", "CUDA_DEVICE_SM_LIMIT") if k in env
    ]
    limits = sorted(k for k in env if _MEMORY_LIMIT.match(k))
    if limits:
        problems.append(f"memory limits {limits} on {what}")
    return problems


def run(state_dir: Path, request: SliceRequest, command: Sequence[str]) -> int:
    """Run ``command`` in a slice from the stack in ``state_dir``; returns its exit code
    (128 + N when a signal N ended it). Raises ``RunError`` when no stack is up, or the
    slice is refused or cannot be prepared."""
    stack = stacks.read_state(state_dir)
    if stack is None or not stacks.alive(stack.pids.get("nats", -1)):
        raise RunError(
            f"no vslice stack is up in {state_dir}; start one with `vslice up"
            + (f" --state-dir {state_dir}`" if state_dir != stacks.default_state_dir() else "`"),
            exit_code=2,
        )
    checks = Checks(
        host_root=state_dir / "host",
        library_dirs=(Path(nodeagent_settings.DEFAULT_MOCK_DIR),),
        operator=stack.settings("operator"),
    )
    # asyncio warns on every TLS connection the server drops ("returning true from
    # eof_received()"): noise in the terminal of a run whose stack went down
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    return asyncio.run(_run(stack.settings("cli"), request, list(command), checks))


@dataclass(frozen=True)
class Checks:
    """Where the node agent of a local stack keeps what a slice's environment may name:
    ``host_root`` (libvgpu under ``lib/``, caches under ``containers/``) and
    ``library_dirs`` (the mock driver); ``operator`` the identity that reads the ledger
    for a refusal's free figures."""

    host_root: Path
    library_dirs: tuple[Path, ...] = ()
    operator: BusSettings | None = None  # reads the free figures of a refusal


async def _request(nc: Client, subject: str, body: bytes, *, timeout_s: float) -> Msg:
    try:
        return await nc.request(
            subject,
            body,
            timeout=timeout_s,
            headers=deadline_headers(timeout_s, now=time.time()),
        )
    except nats.errors.NoRespondersError as exc:
        raise RunError(f"nothing serves {subject}: see `vslice status`") from exc
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        raise RunError(f"no answer on {subject} within {timeout_s:.0f} s") from exc


async def ask_node(
    nc: Client, settings: BusSettings, node: str, *, uid: str, wait_s: float
) -> events.Ready | events.Failed:
    """The node agent's ``Ready``/``Failed`` for pod ``uid`` on ``node``, waiting up to
    ``wait_s`` seconds (0-60) for the slice to be prepared.

    Asked of the node agent itself: only its identity may serve this subject (the server
    enforces it), and the answer comes to this client's inbox alone. Raises ``RunError``
    when none comes, or for an answer that does not decode or breaks a bound of its type
    (the field and value named, ``bounds.describe``; logged too).
    """
    answered = await _request(
        nc,
        settings.subjects.node_slice(node),
        events.ENCODER.encode(events.SliceQuery(pod_uid=uid, wait_s=wait_s)),
        timeout_s=wait_s + 5,
    )
    try:
        return events.NODE_ANSWER.decode(answered.data)
    except bounds.DECODE_ERRORS as exc:
        why = bounds.describe(exc, answered.data)
        log.warning("node agent answer refused", extra={"node": node, "error": why})
        raise RunError(f"no node agent answer for {uid}: refused {why}") from exc


async def _slice(
    nc: Client,
    settings: BusSettings,
    request: SliceRequest,
    node: str,
    checks: Checks,
    *,
    uid: str,
) -> tuple[events.Placement, events.Ready]:
    s = settings.subjects
    try:
        nodes = await connecting.open_bucket(nc.jetstream(), s.nodes_bucket, wait_s=2.0)
        entry = await nodes.get(node)
    except (KeyNotFoundError, BucketNotFoundError) as exc:
        raise RunError(f"node {node} is not registered: is its node agent running?") from exc
    try:
        registered = events.NODE_DEVICES.decode(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RunError(f"node {node}: unreadable registration ({exc})") from exc
    vendor = request.vendor
    mine = [d.uuid for d in registered.devices if d.vendor == vendor.name]
    if not mine and vendor is not vendors.NVIDIA:  # no GPU: the scheduler's refusal says so
        raise RunError(
            f"node {node} registered no {vendor.name}: `vslice up --mock-dcus` adds some"
        )
    spec = pod_spec(request, uid=uid, uuids=mine)
    reply = await _request(
        nc,
        s.admission_review,
        events.ENCODER.encode(events.AdmissionReview(pod=spec)),
        timeout_s=REQUEST_TIMEOUT_S,
    )
    reviewed = events.decode_review_reply(reply.data)
    if isinstance(reviewed, events.Denial):
        raise RunError(f"refused: {reviewed.field}={reviewed.value!r}: {reviewed.reason}")
    if isinstance(reviewed, events.BusError):
        raise RunError(f"admission failed: {reviewed.reason}")
    body = events.ENCODER.encode(reviewed)
    for _ in range(TEMPORARY_RETRIES):  # the same pod: a re-send is answered alike
        decided = await _request(nc, s.sched_schedule, body, timeout_s=REQUEST_TIMEOUT_S)
        placed = events.SCHEDULE_REPLY.decode(decided.data)
        if not (isinstance(placed, events.BusError) and placed.retry_after_s is not None):
            break
        await asyncio.sleep(placed.retry_after_s)
    if isinstance(placed, events.Unschedulable):
        why = placed.node_reasons.get(node, "")
        if why in quarantines.REASONS:
            raise RunError(
                f"node {node} is quarantined ({why}): `vslice status` says why,"
                f" `vslice repair {node}` rebuilds an unreadable or deleted ledger"
            )
        free = [
            f
            for f in free_devices(registered, await _ledger(checks.operator, node))
            if f.uuid in mine
        ]
        raise RunError(f"no slice fits: {refusal_text(request, free, placed)}")
    if isinstance(placed, events.BusError):
        raise RunError(f"scheduling failed: {placed.reason}")
    if placed.pod_uid != uid or placed.node != node:
        await _release(nc, settings, uid)
        raise RunError(f"the scheduler answered for {placed.pod_uid} on {placed.node}")
    try:
        answer = await ask_node(nc, settings, node, uid=uid, wait_s=READY_TIMEOUT_S)
    except RunError:
        await _release(nc, settings, uid)
        raise
    if isinstance(answer, events.Failed):
        await _release(nc, settings, uid)
        raise RunError(f"the node agent could not prepare the slice: {answer.reason}")
    problems = verify_ready(
        answer,
        placed,
        host_root=checks.host_root,
        library_dirs=checks.library_dirs,
        dcu_indices=registrations.dcu_indices(registered),
    )
    if problems:
        await _release(nc, settings, uid)
        raise RunError("refusing the node agent's answer: " + "; ".join(problems))
    return placed, answer


async def _ledger(operator: BusSettings | None, node: str) -> NodeLedger | None:
    """The node's ledger as the bucket holds it now, read as the stack's operator (the
    CLI identity may not read the ledger; the local stack's owner holds the operator's
    seed); None without one, when it holds none or it does not decode (the refusal then
    counts every registered device as free)."""
    if operator is None:
        return None
    try:
        async with asyncio.timeout(5):
            nc = await connecting.connect(operator, name="vslice-run-free")
            try:
                kv = await nc.jetstream().key_value(operator.subjects.ledger_bucket)
                entry = await kv.get(node)
            finally:
                await nc.close()
    except (KeyNotFoundError, nats.errors.Error, TimeoutError, OSError):
        return None
    try:
        return events.NODE_LEDGER.decode(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def _release(nc: Client, settings: BusSettings, uid: str) -> None:
    for attempt in range(5):
        try:
            reply = await _request(
                nc,
                settings.subjects.sched_release,
                events.ENCODER.encode(events.Release(pod_uid=uid)),
                timeout_s=REQUEST_TIMEOUT_S,
            )
            if isinstance(events.RELEASE_REPLY.decode(reply.data), events.Ack):
                return
        except (RunError, nats.errors.Error, msgspec.DecodeError):
            pass
        await asyncio.sleep(0.5 * (attempt + 1))
    print(f"vslice run: could not release {uid}; `vslice status` shows it", file=sys.stderr)


def lease_ttl_s(environ: Mapping[str, str]) -> float:
    """The lease TTL of a run, seconds: ``$VSLICE_LEASE_TTL_S`` within the bounds of
    ``libshared.leases`` (default ``DEFAULT_TTL_S``). Raises ``RunError`` naming a
    malformed value."""
    text = environ.get("VSLICE_LEASE_TTL_S", "")
    if not text:
        return leasing.DEFAULT_TTL_S
    try:
        ttl = float(text)
    except ValueError as exc:
        raise RunError(f"VSLICE_LEASE_TTL_S={text!r}: not a number", exit_code=2) from exc
    if not leasing.MIN_TTL_S <= ttl <= leasing.MAX_TTL_S:
        raise RunError(
            f"VSLICE_LEASE_TTL_S={text!r}: must be {leasing.MIN_TTL_S:g}-{leasing.MAX_TTL_S:g}",
            exit_code=2,
        )
    return ttl


async def _renew(kv: KeyValue, key: str, body: bytes, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        # a missed renewal is retried at the next; only a TTL of them loses the slice
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await kv.put(key, body)


async def _quiet(exc: Exception) -> None:
    # a stack that went down makes the client retry; one line says so when the run ends
    pass


async def _connected(nc: Client, *, wait_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not nc.is_connected:
        if nc.is_closed or loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _run(
    settings: BusSettings, request: SliceRequest, command: list[str], checks: Checks
) -> int:
    ttl = lease_ttl_s(os.environ)
    nc = await connecting.connect(settings, name="vslice-run", error_cb=_quiet)
    uid = f"run-{uuid.uuid4().hex[:12]}"
    node = stacks.local_node()
    renewing: asyncio.Task[None] | None = None
    try:
        try:
            leases = await leasing.open_leases(nc.jetstream(), settings, create=False, wait_s=5)
        except (BucketNotFoundError, nats.errors.Error, TimeoutError) as exc:
            raise RunError(f"no leases bucket on the bus ({exc!r}): see `vslice status`") from exc
        # the lease exists before the slice does: a client killed at any moment after
        # this leaves nothing that its lease's end does not release
        lease = leasing.ENCODER.encode(
            leasing.Lease(pod_uid=uid, node=node, ttl_s=ttl, holder=f"vslice run {os.getpid()}")
        )
        key = pod_key(uid)
        await leases.put(key, lease)
        renewing = asyncio.create_task(_renew(leases, key, lease, ttl / 3), name="lease")
        try:
            placed, ready = await _slice(nc, settings, request, node, checks, uid=uid)
        except BaseException:
            await _end_lease(leases, key)
            raise
        try:
            print(f"vslice run: {describe(placed)}", file=sys.stderr)
            slice_env = ready.env.get(CONTAINER, {})
            cache = slice_env.get("CUDA_DEVICE_MEMORY_SHARED_CACHE")
            if cache:
                # this process's children belong to the slice, whatever their environment
                with contextlib.suppress(OSError), open(Path(cache).parent / "owner.pid", "a") as f:
                    f.write(f"{os.getpid()}\n")
            return await _child(command, command_env(os.environ, slice_env))
        finally:
            renewing.cancel()
            if await _connected(nc, wait_s=2.0):
                await _release(nc, settings, placed.pod_uid)
                await _end_lease(leases, key)
            else:
                print(
                    f"vslice run: the bus at {settings.urls[0]} is gone (`vslice down`?);"
                    f" slice {uid} not released by this client: its lease ends in"
                    f" {ttl:.0f} s and a scheduler replica, if one runs, releases it",
                    file=sys.stderr,
                )
    finally:
        if renewing is not None:
            renewing.cancel()
        # closing over a TLS transport the server already dropped raises AttributeError
        # inside nats-py; the run is over either way and its status is what matters
        with contextlib.suppress(Exception):
            await nc.close()


async def _end_lease(leases: KeyValue, key: str) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await kvwrites.purge(leases, key)  # its marker expires (libshared.kvwrites)


async def _child(command: list[str], env: dict[str, str]) -> int:
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"vslice run: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, proc.send_signal, sig)
    try:
        code = await asyncio.to_thread(proc.wait)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 128 - code if code < 0 else code
