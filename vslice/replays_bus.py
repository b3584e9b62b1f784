"""The replay experiment's bus driver (its in-process one: ``vslice.replays_local``): a
temporary stack, the trace's arrivals through admission and the scheduler replicas, the
in-process replay's report plus throughput and latency.

Per (policy, seed) it starts a stack of its own in a temporary directory -- nats-server,
admission, ``replicas`` scheduler replicas (policy, seed and FGD's target workload from the
trace, as in process) and one mock node agent hosting the fleet -- then sends the arrival
sequence of ``services.scheduler.core.replaying.arrivals`` as Kubernetes-style pod specs
to ``admission.review`` and each admitted ``PodRequest`` to ``sched.schedule``, with up to
``concurrency`` pods in flight, and tears the stack down. The allocation curve is built in
arrival order from the answers, and the report is ``replaying.summarize``'s, so the two
replays compare field by field; ``decision_ms`` are end-to-end latencies here (admission
plus scheduling, as the client sees them).

``run_attached`` replays on the running stack of ``vslice up`` instead, adding a node agent
hosting the fleet to it for the run (see there).

What it leaves to others: the arrivals and the report (``replaying``), the stack's
processes (``vslice.stacks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from tqdm import tqdm

from libshared import annotations as keys
from libshared import (
    connecting,
    events,
    kvreads,
    permissions,
    quarantines,
    tasks,
    traces,
    vendors,
)
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.natsserver import NatsServer, free_port
from libshared.subjects import deadline_headers
from libshared.traces import TracePod
from services.scheduler.core import replaying
from vslice import replays_local, stacks

PREFIX = "vreplay"
# Runs `python -c PROFILED <out> -m <module> <args>`: the module under cProfile, timed in
# CPU seconds (so time spent waiting on the bus does not count), stats written to <out>
# when it exits.
PROFILED = """
import cProfile, runpy, sys, time
out, module = sys.argv[1], sys.argv[3]
sys.argv = [module, *sys.argv[4:]]
profile = cProfile.Profile(time.process_time)
try:
    profile.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    profile.dump_stats(out)
"""
TEMPORARY_RETRIES = 20
REQUEST_TIMEOUT_S = 30.0


class ReplayError(VsliceError):
    """A pod got no usable answer over the bus (the reason names pod and answer)."""


def pod_spec(pod: TracePod, uid: str, *, nouse_uuids: Sequence[str] = ()) -> dict[str, Any]:
    """A Kubernetes-style pod (JSON object) that admission turns into ``pod.request(uid)``:
    HAMi's ``nvidia.com/gpu``, ``gpumem-percentage`` and ``gpucores`` limits, CPU and
    memory requests, and the trace's GPU models as ``nvidia.com/use-gputype``. A pod without
    GPUs keeps one container with no GPU resources (admission lists it with 0 GPUs). A pod
    under 10 milli-GPU asks for 0 %, which admission denies (HAMi wants >= 1); the bus
    replay counts it as not placed (the openb traces hold none). ``nouse_uuids``: devices a
    GPU pod must not use (HAMi's ``nvidia.com/nouse-gpuuuid``).

    A DCU pod (``TracePod.vendor``) asks Hygon's ``hygon.com/dcunum``, ``dcumem`` (MiB, a
    sharing pod only) and ``dcucores`` (``TracePod.vendor_request``), its models as
    ``hygon.com/use-dcutype`` and ``nouse_uuids`` as ``hygon.com/nouse-gpuuuid``
    (``libshared.vendors.DCU``)."""
    if pod.vendor == vendors.DCU.name and pod.num_gpu > 0:
        return _dcu_spec(pod, uid, nouse_uuids=nouse_uuids)
    limits: dict[str, int] = {}
    if pod.num_gpu == 1 and pod.gpu_milli < 1000:
        pct = pod.gpu_milli // 10
        limits = {"nvidia.com/gpu": 1, "nvidia.com/gpumem-percentage": pct}
        limits["nvidia.com/gpucores"] = pct
    elif pod.num_gpu > 0:
        limits = {"nvidia.com/gpu": pod.num_gpu, "nvidia.com/gpumem-percentage": 100}
        limits["nvidia.com/gpucores"] = 100
    meta: dict[str, Any] = {"uid": uid, "namespace": "openb", "name": pod.name}
    notes = {}
    if pod.gpu_spec:
        notes[keys.USE_GPUTYPE] = ",".join(pod.gpu_spec)
    if nouse_uuids and pod.num_gpu > 0:
        notes[keys.NOUSE_GPUUUID] = ",".join(nouse_uuids)
    if notes:
        meta["annotations"] = notes
    requests = {"cpu": f"{pod.cpu_milli}m", "memory": f"{pod.memory_mib}Mi"}
    container = {"name": "main", "resources": {"limits": limits, "requests": requests}}
    return {"metadata": meta, "spec": {"containers": [container]}}


def _dcu_spec(pod: TracePod, uid: str, *, nouse_uuids: Sequence[str]) -> dict[str, Any]:
    dcu = vendors.DCU
    asked = pod.vendor_request()
    limits = {dcu.count: asked.gpu_count, dcu.cores: asked.cores_percent}
    if asked.memory_mib:
        limits[dcu.memory] = asked.memory_mib
    notes = {}
    if pod.gpu_spec:
        notes[dcu.use_type] = ",".join(pod.gpu_spec)
    if nouse_uuids:
        notes[dcu.nouse_uuid] = ",".join(nouse_uuids)
    meta: dict[str, Any] = {"uid": uid, "namespace": "openb", "name": pod.name}
    if notes:
        meta["annotations"] = notes
    requests = {"cpu": f"{pod.cpu_milli}m", "memory": f"{pod.memory_mib}Mi"}
    container = {"name": "main", "resources": {"limits": limits, "requests": requests}}
    return {"metadata": meta, "spec": {"containers": [container]}}


@dataclass
class Driven:
    """What driving one arrival sequence gave: per arrival whether it was placed and its
    end-to-end latency (ms), the wall time (s), the replicas' summed ``Stats``, and the CPU
    seconds each process of the stack used while the pods were driven (``cpu_s``, by
    process name; ``client`` is the driving process; filled on Linux, from ``/proc``), and
    per arrival its ``Placement`` (None: not placed)."""

    placed: list[bool]
    latency_ms: list[float]
    wall_s: float
    stats: events.Stats
    cpu_s: dict[str, float] = field(default_factory=dict)
    placements: list[events.Placement | None] = field(default_factory=list)


async def _request(nc: Client, subject: str, body: bytes) -> bytes:
    headers = deadline_headers(REQUEST_TIMEOUT_S, now=time.time())
    msg = await nc.request(subject, body, timeout=REQUEST_TIMEOUT_S, headers=headers)
    return msg.data


async def _one(nc: Client, subjects: Any, spec: bytes) -> events.Placement | None:
    """Admit and schedule one pod; its placement, None when not placed. Raises
    ``ReplayError``."""
    review = events.decode_review_reply(await _request(nc, subjects.admission_review, spec))
    if isinstance(review, events.Denial):
        return None
    if isinstance(review, events.BusError):
        raise ReplayError(f"admission failed: {review.reason}")
    body = events.ENCODER.encode(review)
    for _ in range(TEMPORARY_RETRIES):
        reply = events.SCHEDULE_REPLY.decode(await _request(nc, subjects.sched_schedule, body))
        if isinstance(reply, events.BusError) and reply.retry_after_s is not None:
            await asyncio.sleep(reply.retry_after_s)
            continue
        if isinstance(reply, events.BusError):
            raise ReplayError(f"pod {review.uid}: {reply.reason}")
        return reply if isinstance(reply, events.Placement) else None
    raise ReplayError(f"pod {review.uid}: the bus stayed unavailable")


async def replica_stats(nc: Client, subject: str, *, wait_s: float = 0.5) -> list[events.Stats]:
    """Every replica's ``Stats`` answering within ``wait_s`` seconds."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[events.Stats] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        try:
            async with asyncio.timeout(wait_s):
                async for msg in sub.messages:
                    if msg.data:  # an empty one is the server's "no responders"
                        out.append(events.STATS.decode(msg.data))
        except TimeoutError:
            pass
    finally:
        await sub.unsubscribe()
    return out


async def drive(
    settings: BusSettings,
    specs: Sequence[bytes],
    *,
    concurrency: int,
    progress: Callable[[int], object] | None = None,
) -> Driven:
    """Send every pod spec (JSON) through admission and the schedulers, at most
    ``concurrency`` at once, in order. Raises ``ReplayError`` for an error answer."""
    nc = await connecting.connect(settings, name="vslice-replay")
    placed = [False] * len(specs)
    placements: list[events.Placement | None] = [None] * len(specs)
    latency = [0.0] * len(specs)
    s = settings.subjects
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(specs):
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            placements[i] = await _one(nc, s, specs[i])
            placed[i] = placements[i] is not None
            latency[i] = (time.perf_counter() - t0) * 1000.0
            if progress is not None:
                progress(1)

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, concurrency)):
                tg.create_task(worker())
        wall = time.perf_counter() - started
        total = events.Stats(name="all")
        for one in await replica_stats(nc, s.sched_stats):
            total = events.Stats(
                name="all",
                **{
                    f: getattr(total, f) + getattr(one, f)
                    for f in events.Stats.__struct_fields__
                    if f != "name"
                },
            )
    finally:
        await connecting.close_quietly(nc)  # also when Ctrl-C cancelled the run
    return Driven(
        placed=placed, latency_ms=latency, wall_s=wall, stats=total, placements=placements
    )


def seed_result(
    seed: int,
    sequence: Sequence[TracePod],
    driven: Driven,
    capacity: int,
    *,
    fleet: Sequence[NodeDevices] = (),
) -> replaying.SeedResult:
    """The in-process replay's ``SeedResult`` of a bus run: curve in arrival order, and
    with ``fleet`` the figures by vendor (``replaying.FleetVendors``) from the placements
    the schedulers answered."""
    curve: list[tuple[float, float]] = []
    requested = allocated = 0
    by_vendor = replaying.FleetVendors.of(fleet)
    at_100 = by_vendor.copy()
    placements = driven.placements or [None] * len(sequence)
    for pod, ok, placement in zip(sequence, driven.placed, placements, strict=True):
        requested += pod.milli_total
        allocated += pod.milli_total if ok else 0
        by_vendor.arrive(pod)
        if placement is not None:
            by_vendor.place(pod, placement)
        if requested <= capacity:
            at_100 = by_vendor.copy()
        curve.append((requested / capacity, allocated / capacity))
    return replaying.SeedResult(
        seed=seed,
        curve=curve,
        pods_total=len(sequence),
        pods_placed=sum(driven.placed),
        decision_ms=driven.latency_ms,
        wall_s=driven.wall_s,
        by_vendor=at_100.report() if fleet else {},
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_seed(
    trace: str,
    fleet_path: str,
    *,
    policy: str,
    seed: int,
    replicas: int,
    concurrency: int,
    quiet: bool = False,
    scheduler_args: Sequence[str] = (),
    profile_dir: str | None = None,
    tls: bool = True,
) -> tuple[replaying.SeedResult, Driven]:
    """One experiment over a temporary stack of its own (see the module docstring).
    ``tls`` False runs the bus without TLS (authorization stays on): the benchmark's
    measure of what TLS costs.
    ``scheduler_args`` are appended to each replica's command; with ``profile_dir`` every
    service runs under cProfile (CPU time) and leaves ``<profile_dir>/<process>.prof``
    when it stops.

    Raises ``StackError`` when the stack does not come up, ``ReplayError`` for an error
    answer, ``OSError``/``TraceFormatError`` for unreadable files.
    """
    fleet = traces.read_fleet(fleet_path)
    pods = traces.read_pods(trace)
    capacity = replaying.capacity_milli(fleet)
    sequence = replaying.arrivals(pods, seed=seed, capacity=capacity)
    specs = [events.ENCODER.encode(pod_spec(pod, f"{seed}-{i}")) for i, pod in enumerate(sequence)]
    max_devices = max((len(n.devices) for n in fleet), default=1) or 1
    with tempfile.TemporaryDirectory(prefix="vslice-replay-") as tmp:
        state = Path(tmp)
        server = NatsServer(data_dir=state / "nats", name="vslice-replay-nats", tls=tls)
        server.port, server.http_port = free_port(), free_port()
        identities = stacks.provision(server, prefix=PREFIX, node=permissions.ANY_NODE)
        with server:
            commands = stacks.service_commands(
                server.url,
                credentials=identities,
                prefix=PREFIX,
                replicas=replicas,
                policy=policy,
                workload_trace=trace,
                seed=seed,
                agent_args=["--fleet", fleet_path, "--name", "replay-agent"],
                scheduler_args=["--max-devices", str(max_devices), *scheduler_args],
                log_level="warning",
            )
            if profile_dir is not None:
                Path(profile_dir).mkdir(parents=True, exist_ok=True)
                for name, argv in commands.items():
                    out = str(Path(profile_dir) / f"{name}.prof")
                    argv[1:1] = ["-c", PROFILED, out]
            logs = state / "logs"
            procs = {name: stacks.spawn(name, argv, logs) for name, argv in commands.items()}
            try:
                settings = identities["cli"]
                tasks.run_interruptibly(
                    stacks.wait_serving(
                        identities["operator"],
                        schedulers=replicas,
                        nodes=len(fleet),
                        procs=procs,
                        logs=logs,
                        timeout_s=120.0,
                    )
                )
                bar = tqdm(
                    total=len(specs), desc=f"{policy} seed {seed}", unit="pod", disable=quiet
                )
                assert server.process is not None
                pids = {"nats": server.process.pid, **{n: p.pid for n, p in procs.items()}}
                before = {name: stacks.cpu_seconds(pid) for name, pid in pids.items()}
                client = time.process_time()
                try:
                    driven = tasks.run_interruptibly(
                        drive(settings, specs, concurrency=concurrency, progress=bar.update)
                    )
                finally:
                    bar.close()
                driven.cpu_s = {
                    name: stacks.cpu_seconds(pid) - before[name] for name, pid in pids.items()
                }
                driven.cpu_s["client"] = time.process_time() - client
            finally:
                stacks.stop(list(procs.values()))
    return seed_result(seed, sequence, driven, capacity, fleet=fleet), driven


AGENT = "replay-agent"  # the process name of an attached replay's node agent
AGENT_STOP_S = 60.0  # longest wait for it to unregister its fleet and exit, seconds


async def _registered_nodes(settings: BusSettings) -> list[NodeDevices]:
    """Every node registered on the bus (for an attached replay)."""
    nc = await connecting.connect(settings, name="vslice-replay")
    try:
        nodes = await connecting.open_bucket(nc.jetstream(), settings.subjects.nodes_bucket)
        out = []
        for key, entry in sorted((await kvreads.latest(nodes)).items()):
            # a node whose registration cannot be read is quarantined: not one of the
            # stack's nodes a replay must keep off
            with contextlib.suppress(quarantines.Unreadable):
                if entry.value:
                    out.append(quarantines.read_registration(key, entry.value))
        return out
    finally:
        await connecting.close_quietly(nc)


async def _wait_registered(
    settings: BusSettings,
    names: set[str],
    *,
    pid: int,
    logs: Path,
    timeout_s: float = 120.0,
) -> None:
    """Wait until every node of ``names`` is in the nodes bucket. Raises ``StackError``
    when the agent (``pid``) exits first or after ``timeout_s`` seconds."""
    nc = await connecting.connect(settings, name="vslice-replay")
    try:
        nodes = await connecting.open_bucket(nc.jetstream(), settings.subjects.nodes_bucket)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not stacks.alive(pid):
                tail = (logs / f"{AGENT}.log").read_text(errors="replace")[-2000:]
                raise stacks.StackError(f"{AGENT} exited:\n{tail}")
            keys = set(await kvreads.keys(nodes))
            if names <= keys:
                return
            await asyncio.sleep(0.1)
        raise stacks.StackError(
            f"the fleet's {len(names)} nodes not registered after {timeout_s} s"
        )
    finally:
        await connecting.close_quietly(nc)


async def release_all(settings: BusSettings, uids: Sequence[str], *, concurrency: int) -> int:
    """Release every pod of ``uids`` through the scheduler replicas, at most
    ``concurrency`` at once; returns how many held slices. Raises ``ReplayError`` when a
    release is answered with an error."""
    nc = await connecting.connect(settings, name="vslice-replay")
    todo = list(uids)
    freed = 0

    async def worker() -> None:
        nonlocal freed
        while todo:
            body = events.ENCODER.encode(events.Release(pod_uid=todo.pop()))
            for _ in range(TEMPORARY_RETRIES):
                reply = events.RELEASE_REPLY.decode(
                    await _request(nc, settings.subjects.sched_release, body)
                )
                if not (isinstance(reply, events.BusError) and reply.retry_after_s is not None):
                    break
                await asyncio.sleep(reply.retry_after_s)
            if isinstance(reply, events.BusError):
                raise ReplayError(f"release failed: {reply.reason}")
            freed += reply.node is not None

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, concurrency)):
                tg.create_task(worker())
    finally:
        await connecting.close_quietly(nc)
    return freed


def run_attached(
    trace: str,
    fleet_path: str,
    *,
    state_dir: Path,
    seed: int,
    concurrency: int,
    keep: bool = False,
    quiet: bool = False,
) -> tuple[replaying.SeedResult, Driven]:
    """One experiment on the running stack of ``state_dir`` (``vslice up``): a node agent
    hosting the fleet (``replay-agent``, recorded in the stack's state so ``vslice status``
    shows it and ``vslice down`` stops it) joins the stack, the trace is driven through
    the stack's admission and scheduler replicas, so its metrics and ``vslice status``
    show the replay. GPU pods are kept off the stack's other nodes (HAMi's
    ``nvidia.com/nouse-gpuuuid``); pod UIDs are unique to the run. At the end the replay's
    pods are released and the agent stops, deleting its nodes from the stack -- unless
    ``keep``, which leaves both for a look (``vslice down`` ends them).

    Raises ``StackError`` when no stack runs there, a replay's fleet is still attached,
    the fleet has more than ``stacks.MAX_DEVICES`` GPUs on a node, or its agent fails;
    ``ReplayError`` for an error answer.
    """
    stack = stacks.running(state_dir)
    if AGENT in stack.pids and stacks.alive(stack.pids[AGENT]):
        raise stacks.StackError(
            f"a replay's fleet is still attached to the stack in {state_dir} (kept with"
            " --keep); `vslice down` ends the stack and it"
        )
    fleet = traces.read_fleet(fleet_path)
    most = max((len(n.devices) for n in fleet), default=0)
    if most > stacks.MAX_DEVICES:
        raise stacks.StackError(
            f"{fleet_path}: a node with {most} GPUs; the stack's replicas take at most"
            f" {stacks.MAX_DEVICES}"
        )
    pods = traces.read_pods(trace)
    capacity = replaying.capacity_milli(fleet)
    sequence = replaying.arrivals(pods, seed=seed, capacity=capacity)
    settings = stack.settings("cli")
    names = {n.node for n in fleet}
    registered = tasks.run_interruptibly(_registered_nodes(settings))
    clash = sorted(names & {n.node for n in registered})
    if clash:
        raise stacks.StackError(f"fleet nodes already registered in the stack: {clash[:5]}")
    nouse = sorted(d.uuid for n in registered for d in n.devices)
    run = f"replay-{int(time.time()) % 100000:05d}-{seed}"
    uids = [f"{run}-{i}" for i in range(len(sequence))]
    specs = [
        events.ENCODER.encode(pod_spec(pod, uid, nouse_uuids=nouse))
        for pod, uid in zip(sequence, uids, strict=True)
    ]
    logs = state_dir / "logs"
    argv = stacks.agent_command(
        stack.nats_url,
        prefix=stack.prefix,
        agent_args=["--fleet", fleet_path, "--unregister", "--name", AGENT],
        log_level="info",
        credentials=stack.settings("nodeagent-fleet"),
    )
    agent = stacks.spawn_detached(AGENT, argv, logs)
    stacks.with_process(state_dir, AGENT, agent)
    driven: Driven | None = None
    try:
        tasks.run_interruptibly(_wait_registered(settings, names, pid=agent, logs=logs))
        bar = tqdm(total=len(specs), desc=f"{stack.policy} seed {seed}", unit="pod", disable=quiet)
        pids = {**stack.pids, AGENT: agent}
        before = {name: stacks.cpu_seconds(pid) for name, pid in pids.items()}
        client = time.process_time()
        try:
            driven = tasks.run_interruptibly(
                drive(settings, specs, concurrency=concurrency, progress=bar.update)
            )
        finally:
            bar.close()
        driven.cpu_s = {name: stacks.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        driven.cpu_s["client"] = time.process_time() - client
    finally:
        if driven is None or not keep:
            # a failed run may have placed any of its pods
            held = uids
            if driven is not None:
                held = [u for u, p in zip(uids, driven.placed, strict=True) if p]
            try:
                tasks.run_interruptibly(release_all(settings, held, concurrency=concurrency))
            finally:
                # its nodes are deleted before it exits: a fleet of 1,000 takes seconds
                stacks.terminate([agent], timeout_s=AGENT_STOP_S)
                stacks.with_process(state_dir, AGENT, None)
    assert driven is not None  # else drive raised
    return seed_result(seed, sequence, driven, capacity, fleet=fleet), driven


def replay_over_bus(
    trace: str,
    fleet: str,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    replicas: int = 2,
    concurrency: int = 16,
    quiet: bool = False,
    attach: Path | None = None,
    keep: bool = False,
) -> list[dict[str, Any]]:
    """One report per policy: ``replaying.summarize``'s fields plus ``pods_per_s``,
    ``latency_ms_p50``/``latency_ms_p99`` (end to end, ms), ``replicas``, ``concurrency``,
    ``conflicts`` (lost ledger compare-and-sets), ``conflict_rate`` (conflicts per placed
    pod), ``claims_lost`` (pods another replica was placing) and ``cpu_ms_per_pod`` (CPU
    milliseconds, user + system from ``/proc``, of every process of the stack and the
    driving client while the pods were driven, per placed pod; 0 where ``/proc`` is
    missing). With ``attach`` (a state dir) the replay runs on that running stack
    (``run_attached``; its replicas decide with its policy, which ``policies`` must name
    alone) and the report names it in ``attached``. Raises what ``run_seed`` and
    ``run_attached`` raise, and ``ReplayError`` for policies an attached stack does not
    run or ``keep`` with several seeds."""
    stack = None
    if attach is not None:
        stack = stacks.running(attach)
        if list(policies) != [stack.policy]:
            raise ReplayError(
                f"the stack in {attach} decides with policy {stack.policy!r}; an attached"
                f" replay runs with it (asked: {', '.join(policies)})"
            )
        if keep and len(seeds) > 1:
            raise ReplayError("--keep leaves one replay's pods in the stack: give one seed")
        replicas = sum(1 for name in stack.pids if name.startswith("scheduler-"))
    reports = []
    for policy in policies:
        results, runs = [], []
        for seed in seeds:
            if attach is not None:
                result, driven = run_attached(
                    trace,
                    fleet,
                    state_dir=attach,
                    seed=seed,
                    concurrency=concurrency,
                    keep=keep,
                    quiet=quiet,
                )
            else:
                result, driven = run_seed(
                    trace,
                    fleet,
                    policy=policy,
                    seed=seed,
                    replicas=replicas,
                    concurrency=concurrency,
                    quiet=quiet,
                )
            results.append(result)
            runs.append(driven)
        report = replaying.summarize(policy, results)
        report["curve_band"] = replays_local.band(report, results)
        latencies = [t for d in runs for t in d.latency_ms]
        placed = max(1, sum(sum(d.placed) for d in runs))
        report.update(
            trace=trace,
            fleet=fleet,
            mode="bus",
            replicas=replicas,
            concurrency=concurrency,
            pods_per_s=sum(len(d.placed) for d in runs) / sum(d.wall_s for d in runs),
            latency_ms_p50=_percentile(latencies, 0.50),
            latency_ms_p99=_percentile(latencies, 0.99),
            conflicts=sum(d.stats.conflicts for d in runs),
            conflict_rate=sum(d.stats.conflicts for d in runs) / placed,
            claims_lost=sum(d.stats.claims_lost for d in runs),
            cpu_ms_per_pod=1000 * sum(sum(d.cpu_s.values()) for d in runs) / placed,
        )
        if stack is not None:
            report["attached"] = stack.state_dir
        reports.append(report)
    return reports
