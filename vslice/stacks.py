"""A local vslice stack as background processes: ``vslice up``, ``status`` and ``down``.

``up`` starts a nats-server with JetStream (``libshared.natsserver``), the admission
service, two scheduler replicas and the node agent of this machine (real slices under
``<state dir>/host``: NVML's GPUs when there are any, else mock GPUs), each in its own
session with its log in ``<state dir>/logs/``, and records their pids and the NATS URL in
``<state dir>/stack.json``. ``status`` says which of them still run and reads the fleet's
allocation from the ``<prefix>-nodes`` and ``<prefix>-ledger`` buckets. ``down`` stops
them (SIGTERM, SIGKILL after a timeout) and removes the state file and NATS data; the
logs stay for a post-mortem. ``service_commands`` is the one list of service commands, so
the temporary stack of a bus replay and the compose file run the same ones.

``up`` also starts the metrics service (``/metrics`` and the dashboard, ``services.metrics``)
on ``$VSLICE_METRICS_PORT``, else 9394 when free, else a free port, and records its URL.

What it leaves to others: the services themselves (``services.*``), the server binary
(``libshared.natsserver``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import NoKeysError

from libshared import connecting
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger
from libshared.natsserver import NatsServer
from services.nodeagent.core import fleets

STATE_FILE = "stack.json"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
DEFAULT_MOCK_MEMORY_MIB = 16384
DEFAULT_MOCK_GPUS = 2
DEFAULT_METRICS_PORT = 9394
MAX_DEVICES = 8  # GPUs on one node a stack's replicas take (the scheduler's --max-devices)


class StackError(VsliceError):
    """A stack could not be started or read; the message says which part and why."""


@dataclass(frozen=True)
class Stack:
    """A started stack: ``nats_url``, bus ``prefix``, ``pids`` by process name
    (``nats``, ``admission``, ``scheduler-1`` ..., and a ``replay-agent`` that an attached
    replay added), ``state_dir``, ``started_at`` (Unix s), ``metrics_url`` (the
    dashboard; ``/metrics`` beneath it), ``policy`` of its scheduler replicas."""

    nats_url: str
    prefix: str
    pids: dict[str, int]
    state_dir: str
    started_at: float = field(default_factory=time.time)
    metrics_url: str = ""
    policy: str = "hami"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$VSLICE_STATE_DIR``, else ``$XDG_STATE_HOME/vslice``, else ``~/.local/state/vslice``."""
    env = os.environ if environ is None else environ
    if env.get("VSLICE_STATE_DIR"):
        return Path(env["VSLICE_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vslice"


def local_node_name() -> str:
    """This machine's host name as a node name (characters a subject token cannot hold
    become ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "localhost"


def service_commands(
    nats_url: str,
    *,
    prefix: str = "vslice",
    replicas: int = 2,
    policy: str = "hami",
    workload_trace: str | None = None,
    seed: int = 0,
    agent_args: Sequence[str] = (),
    scheduler_args: Sequence[str] = (),
    log_level: str = "info",
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    explain: bool = False,
) -> dict[str, list[str]]:
    """The command (argv, ``python -m services.<name> ...``) of each service of a stack,
    by process name: ``admission``, ``scheduler-1`` .. ``scheduler-<replicas>`` (with
    ``scheduler_args`` appended; per-node reasons in ``Unschedulable`` only with
    ``explain``), ``nodeagent`` (its fleet from ``agent_args``), and ``metrics`` on
    ``metrics_host:metrics_port`` when a port is given. Pure.

    Replica ``i`` gets the tie-breaking seed ``seed + i - 1``: each replica breaks ties
    between equally scored nodes in an order of its own, so replicas deciding at the same
    moment spread over the tied nodes instead of racing for the same one (with FGD on the
    openb fleet, about a tenth of the lost races), while ``scheduler-1`` decides as the
    in-process replay with ``seed`` does."""
    bus = _bus_args(nats_url, prefix, log_level)
    out = {"admission": [sys.executable, "-m", "services.admission", *bus]}
    for i in range(1, replicas + 1):
        cmd = [sys.executable, "-m", "services.scheduler", *bus, "--name", f"scheduler-{i}"]
        cmd += ["--policy", policy, "--seed", str(seed + i - 1)]
        if not explain:
            cmd.append("--no-explain")
        if workload_trace:
            cmd += ["--workload-trace", workload_trace]
        out[f"scheduler-{i}"] = [*cmd, *scheduler_args]
    out["nodeagent"] = agent_command(
        nats_url, prefix=prefix, agent_args=agent_args, log_level=log_level
    )
    if metrics_port is not None:
        out["metrics"] = [sys.executable, "-m", "services.metrics", *bus]
        out["metrics"] += ["--host", metrics_host, "--port", str(metrics_port)]
    return out


def agent_command(
    nats_url: str, *, prefix: str, agent_args: Sequence[str] = (), log_level: str = "info"
) -> list[str]:
    """A node agent's command (argv) on the bus of ``nats_url`` and ``prefix``, its nodes
    and backend from ``agent_args``. Pure."""
    bus = _bus_args(nats_url, prefix, log_level)
    return [sys.executable, "-m", "services.nodeagent", *bus, *agent_args]


def _bus_args(nats_url: str, prefix: str, log_level: str) -> list[str]:
    return ["--nats-url", nats_url, "--prefix", prefix, "--log-level", log_level]


def metrics_port(host: str, environ: Mapping[str, str] | None = None) -> int:
    """The metrics service's port: ``$VSLICE_METRICS_PORT``, else 9394 when it is free on
    ``host``, else a free port. Raises ``StackError`` for a malformed value."""
    env = os.environ if environ is None else environ
    if env.get("VSLICE_METRICS_PORT"):
        try:
            port = int(env["VSLICE_METRICS_PORT"])
        except ValueError as exc:
            raise StackError(f"VSLICE_METRICS_PORT={env['VSLICE_METRICS_PORT']!r}: {exc}") from exc
        if not 1 <= port <= 65535:
            raise StackError(f"VSLICE_METRICS_PORT={port}: must be 1-65535")
        return port
    for candidate in (DEFAULT_METRICS_PORT, 0):
        with socket.socket() as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise StackError(f"no free port for the metrics service on {host}")


def wait_http(
    url: str, *, proc: subprocess.Popen[bytes], logs: Path, name: str, timeout_s: float
) -> None:
    """Wait until ``url`` answers 200. Raises ``StackError`` when ``proc`` exits first
    (with its log's tail) or after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode}:\n{_log_tail(logs, name)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise StackError(f"{name} not serving {url} after {timeout_s:.0f} s")


def local_node() -> str:
    """The node name of this machine's node agent in a ``vslice up`` stack."""
    return f"{local_node_name()}-0"


def slice_agent_args(state_dir: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """Node agent flags for real slices under ``<state_dir>/host``, with the GPU backend
    of ``$VSLICE_GPU_BACKEND`` (``auto``, ``nvml`` or ``mock``; default ``auto``)."""
    env = os.environ if environ is None else environ
    backend = env.get("VSLICE_GPU_BACKEND", "auto")
    if backend not in ("auto", "nvml", "mock"):
        raise StackError(f"VSLICE_GPU_BACKEND={backend!r}: expected auto, nvml or mock")
    return ["--host-root", str((state_dir / "host").resolve()), "--backend", backend]


def mock_agent_args(environ: Mapping[str, str] | None = None) -> list[str]:
    """Node agent flags for this machine's mock GPUs: one node named after the host with
    the devices of ``$VSLICE_MOCKGPU_DEVICES`` (``<uuid>:<memory_mib>[,...]``), else
    ``$VSLICE_MOCKGPU_COUNT`` (default 2) devices of ``$VSLICE_MOCKGPU_MEMORY_MIB``
    (default 16384) MiB. Raises ``StackError`` for a malformed value."""
    env = os.environ if environ is None else environ
    try:
        listed = env.get("VSLICE_MOCKGPU_DEVICES", "")
        devices = fleets.parse_devices(listed)
        gpus = int(env.get("VSLICE_MOCKGPU_COUNT", DEFAULT_MOCK_GPUS))
        memory = int(env.get("VSLICE_MOCKGPU_MEMORY_MIB", DEFAULT_MOCK_MEMORY_MIB))
    except ValueError as exc:
        raise StackError(f"mock GPU settings: {exc}") from exc
    node = local_node_name()
    return [
        *(["--devices", listed] if devices else []),
        "--nodes",
        "1",
        "--gpus",
        str(gpus),
        "--memory-mib",
        str(memory),
        "--node-prefix",
        node,
        "--name",
        f"{node}-agent",
    ]


# -- processes ----------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True when process ``pid`` runs (a finished child of this process is reaped; a
    finished process that another one has not reaped yet counts as ended)."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ValueError, IndexError):
        return _proc_stat(pid)[0] != "Z"
    return True


def _proc_stat(pid: int) -> list[str]:
    """The fields of Linux's ``/proc/<pid>/stat`` after the command name, from the state
    (field 3) on. Raises ``OSError``/``ValueError`` when it cannot be read."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def terminate(pids: Sequence[int], *, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM every pid, SIGKILL those still running after ``timeout_s`` seconds; returns
    the pids that had to be killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in killed:
        while alive(pid):
            time.sleep(0.02)
    return killed


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) process ``pid`` used so far, from Linux's
    ``/proc/<pid>/stat``; 0.0 when it cannot be read (another system, a process gone)."""
    try:
        fields = _proc_stat(pid)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def stop(procs: Sequence[subprocess.Popen[bytes]], *, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """``terminate`` processes this process started, and collect their exit status."""
    terminate([p.pid for p in procs], timeout_s=timeout_s)
    for proc in procs:
        proc.wait()


def spawn(name: str, argv: Sequence[str], logs: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr into ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def spawn_detached(name: str, argv: Sequence[str], logs: Path) -> int:
    """Start ``argv`` like ``spawn``, for a process that may outlive this one (it belongs
    to the stack, which ``down`` stops): no ``Popen`` handle, just its pid."""
    logs.mkdir(parents=True, exist_ok=True)
    fd = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _log_tail(logs: Path, name: str, chars: int = 2000) -> str:
    try:
        return (logs / f"{name}.log").read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def wait_serving(
    settings: BusSettings,
    *,
    schedulers: int,
    nodes: int,
    procs: Mapping[str, subprocess.Popen[bytes]],
    logs: Path,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Wait until ``schedulers`` replicas answer stats, admission answers a review and
    ``nodes`` nodes are registered. Raises ``StackError`` naming a process that exited
    (with its log's tail) or what was still missing after ``timeout_s`` seconds."""
    nc = await connecting.connect(settings, name="vslice-up")
    try:
        s = settings.subjects
        deadline = time.monotonic() + timeout_s
        missing = "the bus"
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise StackError(
                        f"{name} exited with {proc.returncode}:\n{_log_tail(logs, name)}"
                    )
            try:
                bus = await connecting.ensure_bus(nc.jetstream(), settings)
                answered = await _stats_replies(nc, s.sched_stats, wait_s=0.2)
                if answered < schedulers:
                    missing = f"scheduler replicas ({answered}/{schedulers} answer)"
                    continue
                try:
                    registered = len(await bus.nodes.keys())
                except NoKeysError:
                    registered = 0
                if registered < nodes:
                    missing = f"node registrations ({registered}/{nodes})"
                    await asyncio.sleep(0.1)
                    continue
                await nc.request(s.admission_review, b"{}", timeout=0.5)
                return
            except Exception as exc:  # not up yet: any bus error means "try again"
                missing = f"the bus ({type(exc).__name__})"
                await asyncio.sleep(0.1)
        raise StackError(f"stack not serving after {timeout_s:.0f} s: waiting for {missing}")
    finally:
        await nc.close()


async def _stats_replies(nc: Client, subject: str, *, wait_s: float) -> int:
    """How many replicas answer a stats request within ``wait_s`` seconds."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        count = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for msg in sub.messages:
                    count += bool(msg.data)  # an empty one is the server's "no responders"
        return count
    finally:
        await sub.unsubscribe()


# -- up / status / down --------------------------------------------------------------------


def read_state(state_dir: Path) -> Stack | None:
    """The recorded stack of ``state_dir``, or None when there is none.

    Raises ``StackError`` for an unreadable state file.
    """
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return Stack(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StackError(f"{path}: unreadable stack state: {exc}") from exc


def up(
    state_dir: Path,
    *,
    prefix: str = "vslice",
    environ: Mapping[str, str] | None = None,
    replicas: int = 2,
    policy: str = "hami",
    nats_port: int = 0,
    workload_trace: str | None = None,
) -> Stack:
    """Start the stack of this machine in ``state_dir``, with ``replicas`` scheduler
    replicas deciding by ``policy`` (FGD's target workload from ``workload_trace``) and
    nats-server on ``nats_port`` (0: a free port), and wait until it serves.

    Returns the recorded ``Stack``. Raises ``StackError`` when a stack recorded there
    still runs, or when a part fails to start (everything started is stopped again).
    """
    known = read_state(state_dir)
    if known is not None and any(alive(p) for p in known.pids.values()):
        raise StackError(f"a stack is already up in {state_dir} (nats {known.nats_url})")
    if known is not None:
        _remove_state(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    server = NatsServer(data_dir=state_dir / "nats", name="vslice-nats", port=nats_port)
    server.spawn()
    assert server.process is not None
    procs: dict[str, subprocess.Popen[bytes]] = {"nats": server.process}
    try:
        server.wait_healthy()
        env = os.environ if environ is None else environ
        host = env.get("VSLICE_METRICS_HOST", "127.0.0.1")
        port = metrics_port(host, env)
        metrics_url = f"http://{host}:{port}"
        commands = service_commands(
            server.url,
            prefix=prefix,
            replicas=replicas,
            policy=policy,
            workload_trace=workload_trace,
            agent_args=[*mock_agent_args(environ), *slice_agent_args(state_dir, environ)],
            metrics_port=port,
            metrics_host=host,
            explain=True,
        )
        for name, argv in commands.items():
            procs[name] = spawn(name, argv, logs)
        settings = BusSettings(urls=(server.url,), prefix=prefix)
        services = {k: v for k, v in procs.items() if k != "nats"}
        asyncio.run(wait_serving(settings, schedulers=replicas, nodes=1, procs=services, logs=logs))
        wait_http(
            f"{metrics_url}/healthz",
            proc=procs["metrics"],
            logs=logs,
            name="metrics",
            timeout_s=START_TIMEOUT_S,
        )
    except BaseException:
        stop(list(procs.values()))
        raise
    stack = Stack(
        nats_url=server.url,
        prefix=prefix,
        pids={name: p.pid for name, p in procs.items()},
        state_dir=str(state_dir),
        metrics_url=metrics_url,
        policy=policy,
    )
    write_state(state_dir, stack)
    return stack


def write_state(state_dir: Path, stack: Stack) -> None:
    """Record ``stack`` as the stack of ``state_dir`` (replacing the file at once, so a
    reader never sees half of it)."""
    path = state_dir / STATE_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(stack), indent=1))
    partial.replace(path)


def running(state_dir: Path) -> Stack:
    """The stack recorded in ``state_dir`` whose NATS server runs. Raises ``StackError``
    when there is none (saying how to start one) or its state file is unreadable."""
    stack = read_state(state_dir)
    if stack is None or not alive(stack.pids.get("nats", -1)):
        raise StackError(f"no stack up in {state_dir}; `vslice up` starts one")
    return stack


def with_process(state_dir: Path, name: str, pid: int | None) -> Stack:
    """Record process ``name`` (``pid``) as part of the stack of ``state_dir``, or forget
    it with ``pid=None``, so ``status`` shows it and ``down`` stops it. Returns the new
    record; raises ``StackError`` when no stack is recorded there."""
    stack = read_state(state_dir)
    if stack is None:
        raise StackError(f"no stack recorded in {state_dir}")
    pids = {k: v for k, v in stack.pids.items() if k != name}
    if pid is not None:
        pids[name] = pid
    new = dataclasses.replace(stack, pids=pids)
    write_state(state_dir, new)
    return new


def down(state_dir: Path, *, timeout_s: float = STOP_TIMEOUT_S) -> Stack | None:
    """Stop the stack recorded in ``state_dir`` -- services first, NATS last -- and remove
    its state; returns it, or None when none was recorded. Raises ``StackError`` for an
    unreadable state file."""
    stack = read_state(state_dir)
    if stack is None:
        return None
    services = [pid for name, pid in stack.pids.items() if name != "nats"]
    terminate(services, timeout_s=timeout_s)
    terminate([pid for name, pid in stack.pids.items() if name == "nats"], timeout_s=timeout_s)
    _remove_state(state_dir)
    return stack


def _remove_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(state_dir / "nats", ignore_errors=True)


@dataclass(frozen=True)
class DeviceUse:
    """One device's allocation: ``slices`` held, ``memory_mib`` used of ``memory_total_mib``,
    ``cores`` percent used, ``split_count`` slices allowed."""

    node: str
    uuid: str
    slices: int
    memory_mib: int
    memory_total_mib: int
    cores: int
    split_count: int


NODES = msgspec.json.Decoder(NodeDevices)
LEDGERS = msgspec.json.Decoder(NodeLedger)


async def allocation(settings: BusSettings, *, timeout_s: float = 3.0) -> list[DeviceUse]:
    """Every registered device's use, from the nodes and ledger buckets, sorted by node
    and device index. Raises ``StackError`` when the bus cannot be read in ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connecting.connect(settings, name="vslice-status")
            try:
                bus = await connecting.ensure_bus(nc.jetstream(), settings)
                nodes, ledgers = [], {}
                with contextlib.suppress(NoKeysError):
                    for key in sorted(await bus.nodes.keys()):
                        entry = await bus.nodes.get(key)
                        if entry.value:
                            nodes.append(NODES.decode(entry.value))
                with contextlib.suppress(NoKeysError):
                    for key in await bus.ledger.keys():
                        entry = await bus.ledger.get(key)
                        if entry.value:
                            ledgers[key] = LEDGERS.decode(entry.value)
            finally:
                await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StackError(f"cannot read the fleet from {settings.urls[0]}: {exc!r}") from exc
    out = []
    for node in nodes:
        ledger = ledgers.get(node.node)
        for dev in sorted(node.devices, key=lambda d: d.index):
            held = [s for s in (ledger.slices if ledger else ()) if s.uuid == dev.uuid]
            out.append(
                DeviceUse(
                    node=node.node,
                    uuid=dev.uuid,
                    slices=len(held),
                    memory_mib=sum(s.memory_mib for s in held),
                    memory_total_mib=dev.memory_mib,
                    cores=sum(s.cores_percent for s in held),
                    split_count=dev.split_count,
                )
            )
    return out


def status_text(state_dir: Path) -> str:
    """What ``vslice status`` prints: each process and whether it runs, then each device's
    slices, MiB and cores in use. Raises ``StackError`` for an unreadable state file."""
    stack = read_state(state_dir)
    if stack is None:
        return f"no stack up in {state_dir}"
    lines = [f"stack in {state_dir}, NATS {stack.nats_url} (prefix {stack.prefix})"]
    if stack.metrics_url:
        lines.append(f"dashboard {stack.metrics_url}/ (Prometheus {stack.metrics_url}/metrics)")
    for name, pid in stack.pids.items():
        lines.append(f"  {name:<14} pid {pid:<8} {'running' if alive(pid) else 'NOT RUNNING'}")
    if not alive(stack.pids.get("nats", -1)):
        lines.append("fleet: unknown (nats-server is not running)")
        return "\n".join(lines)
    settings = BusSettings(urls=(stack.nats_url,), prefix=stack.prefix)
    try:
        devices = asyncio.run(allocation(settings))
    except StackError as exc:
        lines.append(f"fleet: {exc}")
        return "\n".join(lines)
    lines.append(f"{'node':<24}{'device':<28}{'slices':>8}{'memory MiB':>20}{'cores %':>9}")
    for d in devices:
        mem = f"{d.memory_mib}/{d.memory_total_mib}"
        lines.append(
            f"{d.node:<24}{d.uuid:<28}{f'{d.slices}/{d.split_count}':>8}{mem:>20}{d.cores:>9}"
        )
    if not devices:
        lines.append("(no node registered)")
    return "\n".join(lines)
