"""``vslice run``: one program inside a slice of this machine's GPU.

Asks the running ``vslice up`` stack for a slice on the local node -- the request goes
through admission as a one-container pod (HAMi's resource names and annotations), then to
the scheduler replicas -- waits for the node agent's ``.ready``, runs the command with
the slice's environment (libvgpu preloaded; on mock GPUs the mock driver first on the
library path) with stdin, stdout, stderr and the exit code passed through, and releases
the slice when the command exits or this process is interrupted. The slice holds only
the command's processes; what ``vslice run`` itself does is not charged.

What it leaves to others: placing (``services.scheduler``), preparing the slice
(``services.nodeagent``), the stack's processes (``vslice.stacks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from nats.js.errors import KeyNotFoundError

from libshared import annotations as hami_annotations
from libshared import connecting, events, resources
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger
from libshared.subjects import deadline_headers
from vslice import stacks

READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
CONTAINER = "main"
NODE_DEVICES = msgspec.json.Decoder(NodeDevices)
NODE_LEDGER = msgspec.json.Decoder(NodeLedger)
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
    the whole card), ``cores_percent``, ``gpus``, ``gpu_type`` (``nvidia.com/use-gputype``)."""

    memory_mib: int | None = None
    memory_percent: int | None = None
    cores_percent: int | None = None
    gpus: int = 1
    gpu_type: str | None = None


def pod_spec(request: SliceRequest, *, uid: str, uuids: Sequence[str]) -> dict[str, object]:
    """The one-container pod (Kubernetes JSON) that asks for ``request`` on the devices
    ``uuids`` (``nvidia.com/use-gpuuuid``: this node's GPUs). Pure."""
    limits = {resources.GPU: str(request.gpus)}
    if request.memory_mib is not None:
        limits[resources.GPUMEM] = str(request.memory_mib)
    if request.memory_percent is not None:
        limits[resources.GPUMEM_PERCENTAGE] = str(request.memory_percent)
    if request.cores_percent is not None:
        limits[resources.GPUCORES] = str(request.cores_percent)
    annos = {hami_annotations.USE_GPUUUID: ",".join(uuids)}
    if request.gpu_type:
        annos[hami_annotations.USE_GPUTYPE] = request.gpu_type
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
    gpus = f"{request.gpus} GPU" + ("s" if request.gpus != 1 else "")
    kind = f" of type {request.gpu_type}" if request.gpu_type else ""
    return f"{memory}, {cores_text(request.cores_percent or 0)} on {gpus}{kind}"


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
    settings = BusSettings(urls=(stack.nats_url,), prefix=stack.prefix)
    return asyncio.run(_run(settings, request, list(command)))


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


async def _slice(
    nc: Client, settings: BusSettings, request: SliceRequest, node: str
) -> tuple[events.Placement, events.Ready]:
    s = settings.subjects
    bus = await connecting.ensure_bus(nc.jetstream(), settings)
    try:
        entry = await bus.nodes.get(node)
    except KeyNotFoundError as exc:
        raise RunError(f"node {node} is not registered: is its node agent running?") from exc
    registered = NODE_DEVICES.decode(entry.value or b"")
    uid = f"run-{uuid.uuid4().hex[:12]}"
    spec = pod_spec(request, uid=uid, uuids=[d.uuid for d in registered.devices])
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
    answers: asyncio.Queue[events.Ready | events.Failed] = asyncio.Queue()

    async def on_answer(msg: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            answer = events.NODE_ANSWER.decode(msg.data)
            if answer.pod_uid == uid:
                await answers.put(answer)

    subs = [
        await nc.subscribe(s.alloc_ready(node), cb=on_answer),
        await nc.subscribe(s.alloc_failed(node), cb=on_answer),
    ]
    try:
        decided = await _request(
            nc, s.sched_schedule, events.ENCODER.encode(reviewed), timeout_s=REQUEST_TIMEOUT_S
        )
        placed = events.SCHEDULE_REPLY.decode(decided.data)
        if isinstance(placed, events.Unschedulable):
            free = free_devices(registered, await _ledger(bus, node))
            raise RunError(f"no slice fits: {refusal_text(request, free, placed)}")
        if isinstance(placed, events.BusError):
            raise RunError(f"scheduling failed: {placed.reason}")
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                answer = await answers.get()
        except TimeoutError as exc:
            await _release(nc, settings, uid)
            raise RunError(f"no node agent answer for {uid} in {READY_TIMEOUT_S:.0f} s") from exc
        if isinstance(answer, events.Failed):
            await _release(nc, settings, uid)
            raise RunError(f"the node agent could not prepare the slice: {answer.reason}")
        return placed, answer
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _ledger(bus: connecting.Bus, node: str) -> NodeLedger | None:
    """The node's ledger as the bucket holds it now; None when it holds none or it does not
    decode (the refusal then counts every registered device as free)."""
    try:
        entry = await bus.ledger.get(node)
    except (KeyNotFoundError, nats.errors.Error):
        return None
    try:
        return NODE_LEDGER.decode(entry.value or b"")
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
        except RunError:
            pass
        await asyncio.sleep(0.5 * (attempt + 1))
    print(f"vslice run: could not release {uid}; `vslice status` shows it", file=sys.stderr)


async def _run(settings: BusSettings, request: SliceRequest, command: list[str]) -> int:
    nc = await connecting.connect(settings, name="vslice-run")
    try:
        placed, ready = await _slice(nc, settings, request, stacks.local_node())
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
            await _release(nc, settings, placed.pod_uid)
    finally:
        await nc.close()


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
