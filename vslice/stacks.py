"""A local vslice stack as background processes: ``vslice up``, ``status`` and ``down``.

``up`` starts a nats-server with JetStream (``libshared.natsserver``), the admission
service, two scheduler replicas and the node agent of this machine (real slices under
``<state dir>/host``: NVML's GPUs when there are any, else mock GPUs), each in its own
session with its log in ``<state dir>/logs/`` (nats-server's too, ``nats.log``), and
records their pids and the NATS URL in ``<state dir>/stack.json``. ``up`` on a stack some
of whose processes died (a killed nats-server, a crashed replica) starts those again --
nats-server on its port, with its identities and JetStream data, so nothing it
acknowledged is lost -- instead of answering that the stack is up. ``status`` says which
of them still run and reads the fleet's allocation from the ``<prefix>-nodes`` and
``<prefix>-ledger`` buckets. ``down`` stops them (SIGTERM, SIGKILL after a timeout) and
removes the state file and NATS data; the logs stay for a post-mortem.
``service_commands`` is the one list of service commands, so the temporary stack of a bus
replay and the compose file run the same ones.

``up`` also starts the metrics service (``/metrics`` and the dashboard, ``services.metrics``)
on ``$VSLICE_METRICS_PORT``, else 9394 when free, else a free port, and records its URL.

What it leaves to others: the services themselves (``services.*``), the server binary
(``libshared.natsserver``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from libshared import connecting, events, heartbeats, kvreads, kvwrites, quarantines
from libshared import leases as leasing
from libshared import permissions as perms
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger
from libshared.natsserver import NatsServer, free_port
from libshared.subjects import deadline_headers, pod_key
from libshared.trust import TrustStore
from services.nodeagent.core import fleets

STATE_FILE = "stack.json"
NATS_LOG = "nats.log"  # nats-server's own (text) log, beside the services' JSON logs
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
DEFAULT_MOCK_MEMORY_MIB = 16384
DEFAULT_MOCK_GPUS = 2
DEFAULT_METRICS_PORT = 9394
FLEET_AGENT = "nodeagent-fleet"  # identity of a mock node agent hosting a replay's fleet
MAX_DEVICES = 8  # GPUs on one node a stack's replicas take (the scheduler's --max-devices)


class StackError(VsliceError):
    """A stack could not be started or read; the message says which part and why."""


@dataclass(frozen=True)
class Stack:
    """A started stack: ``nats_url``, bus ``prefix``, ``pids`` by process name
    (``nats``, ``admission``, ``scheduler-1`` ..., and a ``replay-agent`` that an attached
    replay added), ``state_dir``, ``started_at`` (Unix s), ``metrics_url`` (the
    dashboard; ``/metrics`` beneath it), ``policy`` of its scheduler replicas,
    ``trust_dir`` (CA and identities), ``tls``, ``nats_http_port`` (nats-server's
    monitoring port, kept across a restart; 0 in records of older stacks)."""

    nats_url: str
    prefix: str
    pids: dict[str, int]
    state_dir: str
    started_at: float = field(default_factory=time.time)
    metrics_url: str = ""
    policy: str = "hami"
    trust_dir: str = ""
    tls: bool = True
    nats_http_port: int = 0

    def settings(self, kind: str = "cli") -> BusSettings:
        """The ``BusSettings`` of identity ``kind`` of this stack (``cli``: what ``vslice
        run`` and an attached replay use; ``operator``: ``status`` and repairs)."""
        if not self.trust_dir:
            return BusSettings(urls=(self.nats_url,), prefix=self.prefix)
        trust = Path(self.trust_dir)
        name = f"operator-{self.prefix}" if kind == "operator" else kind
        return BusSettings(
            urls=(self.nats_url,),
            prefix=self.prefix,
            identity=name,
            nkey_seed_path=str(trust / "nkeys" / f"{name}.nk"),
            tls_ca_path=str(trust / "ca.pem") if self.tls else "",
        )


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
    credentials: Mapping[str, BusSettings] | None = None,
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
    ``metrics_host:metrics_port`` when a port is given. ``credentials``: the bus
    identity of each service kind (``admission``, ``scheduler``, ``nodeagent``,
    ``metrics``; see ``provision``), whose seed and CA flags each command carries. Pure.

    Replica ``i`` gets the tie-breaking seed ``seed + i - 1``: each replica breaks ties
    between equally scored nodes in an order of its own, so replicas deciding at the same
    moment spread over the tied nodes instead of racing for the same one (with FGD on the
    openb fleet, about a tenth of the lost races). Replica ``i`` is also told it is
    index ``i - 1`` of ``replicas``, so each prefers the near-best nodes of a shard of its
    own (``services.scheduler.core.partitioning``)."""
    creds = dict(credentials or {})

    def bus(kind: str) -> list[str]:
        given = creds.get(kind)
        extra = given.credential_arguments() if given else []
        return [*_bus_args(nats_url, prefix, log_level), *extra]

    out = {"admission": [sys.executable, "-m", "services.admission", *bus("admission")]}
    for i in range(1, replicas + 1):
        cmd = [sys.executable, "-m", "services.scheduler", *bus("scheduler")]
        cmd += ["--name", f"scheduler-{i}"]
        cmd += ["--policy", policy, "--seed", str(seed + i - 1)]
        cmd += ["--replica-index", str(i - 1), "--replica-count", str(replicas)]
        if not explain:
            cmd.append("--no-explain")
        if workload_trace:
            cmd += ["--workload-trace", workload_trace]
        out[f"scheduler-{i}"] = [*cmd, *scheduler_args]
    out["nodeagent"] = agent_command(
        nats_url,
        prefix=prefix,
        agent_args=agent_args,
        log_level=log_level,
        credentials=creds.get("nodeagent"),
    )
    if metrics_port is not None:
        out["metrics"] = [sys.executable, "-m", "services.metrics", *bus("metrics")]
        out["metrics"] += ["--host", metrics_host, "--port", str(metrics_port)]
    return out


def agent_command(
    nats_url: str,
    *,
    prefix: str,
    agent_args: Sequence[str] = (),
    log_level: str = "info",
    credentials: BusSettings | None = None,
) -> list[str]:
    """A node agent's command (argv) on the bus of ``nats_url`` and ``prefix`` as the
    identity of ``credentials``, its nodes and backend from ``agent_args``. Pure."""
    bus = _bus_args(nats_url, prefix, log_level)
    if credentials is not None:
        bus += credentials.credential_arguments()
    return [sys.executable, "-m", "services.nodeagent", *bus, *agent_args]


def provision(server: NatsServer, *, prefix: str, node: str) -> dict[str, BusSettings]:
    """Create (or keep) the identities of a stack on ``server`` and return the settings
    of each, by kind: ``admission``, ``scheduler`` (shared by the replicas), ``nodeagent``
    (for ``node``; ``*`` for a mock agent hosting a replay's fleet), ``metrics``, ``cli``
    and ``operator`` (``libshared.permissions``). Raises ``TrustError`` for a bad prefix
    or node."""
    roles = {
        "admission": (perms.Role.ADMISSION, ""),
        "scheduler": (perms.Role.SCHEDULER, ""),
        "nodeagent": (perms.Role.NODEAGENT, node),
        "metrics": (perms.Role.METRICS, ""),
        "cli": (perms.Role.CLI, ""),
        "operator": (perms.Role.OPERATOR, ""),
    }
    out = {}
    for kind, (role, on) in roles.items():
        name = kind if kind != "operator" else f"operator-{prefix}"
        if kind == "nodeagent":
            name = FLEET_AGENT if node == perms.ANY_NODE else f"nodeagent-{node}"
        out[kind] = server.identity(name, role, prefix=prefix, node=on)
    # the mock agent an attached replay adds hosts a whole fleet (``vslice replay --attach``)
    out[FLEET_AGENT] = server.identity(
        FLEET_AGENT, perms.Role.NODEAGENT, prefix=prefix, node=perms.ANY_NODE
    )
    return out


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
    of ``$VSLICE_GPU_BACKEND`` (``auto``, ``nvml`` or ``mock``; default ``auto``), the
    device config of ``$VSLICE_NODE_CONFIG`` (HAMi's ``config.json``) when set, and the
    mock Hygon DCUs of ``$VSLICE_MOCKDCU_DEVICES`` (``<uuid>:<MiB>[:<model>],...``) when
    set. Raises ``StackError`` naming a malformed value."""
    env = os.environ if environ is None else environ
    backend = env.get("VSLICE_GPU_BACKEND", "auto")
    if backend not in ("auto", "nvml", "mock"):
        raise StackError(f"VSLICE_GPU_BACKEND={backend!r}: expected auto, nvml or mock")
    args = ["--host-root", str((state_dir / "host").resolve()), "--backend", backend]
    if env.get("VSLICE_NODE_CONFIG"):
        args += ["--node-config", str(Path(env["VSLICE_NODE_CONFIG"]).resolve())]
    listed = env.get(fleets.MOCKDCU_VARIABLE, "")
    try:
        dcus = fleets.parse_dcus(listed)
    except ValueError as exc:
        raise StackError(f"mock DCU settings: {exc}") from exc
    if dcus:
        args += ["--dcus", fleets.dcu_list(dcus)]
    return args


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
                registered = len(await kvreads.keys(bus.nodes))
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
    nats-server on ``nats_port`` (0: a free port), and wait until it serves; a stack
    recorded there with processes that died (a ``kill -9``, a crash) is completed instead
    (``restart``), its JetStream data, port and identities kept.

    Returns the recorded ``Stack``. Raises ``StackError`` when every process of a stack
    recorded there still runs, or when a part fails to start (everything started now is
    stopped again).
    """
    known = read_state(state_dir)
    if known is not None and all(alive(p) for p in known.pids.values()):
        raise StackError(f"a stack is already up in {state_dir} (nats {known.nats_url})")
    if known is not None and known.trust_dir:
        return restart(state_dir, known, environ=environ)
    if known is not None:
        _remove_state(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    trust = TrustStore(state_dir / "trust").ensure()
    server = NatsServer(
        data_dir=state_dir / "nats",
        name="vslice-nats",
        trust=trust,
        port=nats_port,
        log_file=logs / NATS_LOG,
    )
    server.port = server.port or free_port()
    server.http_port = server.http_port or free_port()
    identities = provision(server, prefix=prefix, node=local_node())
    server.spawn()
    assert server.process is not None
    procs: dict[str, subprocess.Popen[bytes]] = {"nats": server.process}
    try:
        server.wait_healthy()
        env = os.environ if environ is None else environ
        host = env.get("VSLICE_METRICS_HOST", "127.0.0.1")
        port = metrics_port(host, env)
        metrics_url = f"http://{host}:{port}"
        commands = _stack_commands(
            server,
            identities,
            prefix,
            state_dir,
            environ,
            host,
            port,
            replicas=replicas,
            policy=policy,
            workload_trace=workload_trace,
        )
        for name, argv in commands.items():
            procs[name] = spawn(name, argv, logs)
        _wait_started(identities["operator"], procs, logs, metrics_url, schedulers=replicas)
    except BaseException:
        stop(list(procs.values()))
        raise
    stack = Stack(
        nats_url=server.url,
        prefix=prefix,
        pids={name: p.pid for name, p in procs.items()},
        state_dir=str(state_dir),
        metrics_url=metrics_url,
        trust_dir=str(trust.root),
        tls=server.tls,
        nats_http_port=server.http_port,
        policy=policy,
    )
    write_state(state_dir, stack)
    return stack


def _stack_commands(
    server: NatsServer,
    identities: Mapping[str, BusSettings],
    prefix: str,
    state_dir: Path,
    environ: Mapping[str, str] | None,
    host: str,
    port: int,
    *,
    replicas: int = 2,
    policy: str = "hami",
    workload_trace: str | None = None,
) -> dict[str, list[str]]:
    return service_commands(
        server.url,
        credentials=identities,
        prefix=prefix,
        replicas=replicas,
        policy=policy,
        workload_trace=workload_trace,
        agent_args=[*mock_agent_args(environ), *slice_agent_args(state_dir, environ)],
        # the services' level (e.g. info,vslice.decisions=warning) from up's environment
        log_level=(os.environ if environ is None else environ).get("VSLICE_LOG_LEVEL") or "info",
        metrics_port=port,
        metrics_host=host,
        explain=True,
    )


def _wait_started(
    operator: BusSettings,
    procs: Mapping[str, subprocess.Popen[bytes]],
    logs: Path,
    metrics_url: str,
    *,
    schedulers: int = 2,
) -> None:
    services = {k: v for k, v in procs.items() if k != "nats"}
    asyncio.run(wait_serving(operator, schedulers=schedulers, nodes=1, procs=services, logs=logs))
    # so that a `status` right after `up` finds every service healthy
    asyncio.run(wait_heartbeats(operator, {k: p.pid for k, p in services.items()}))
    if "metrics" in procs:
        wait_http(
            f"{metrics_url}/healthz",
            proc=procs["metrics"],
            logs=logs,
            name="metrics",
            timeout_s=START_TIMEOUT_S,
        )


def restart(state_dir: Path, known: Stack, *, environ: Mapping[str, str] | None = None) -> Stack:
    """Start again the processes of the stack ``known`` (recorded in ``state_dir``) that no
    longer run, and wait until the stack serves: nats-server on the same port, with the
    same identities and its JetStream data (``<state_dir>/nats/jetstream``: the ledger,
    claims and allocation stream it acknowledged), the services with the commands ``up``
    gives them (those still running reconnect by themselves). Processes an attached
    replay added are not restarted. Returns the new record.

    Raises ``StackError`` when the port is taken by another process or a part fails to
    start (what was started now is stopped again).
    """
    port = urllib.parse.urlsplit(known.nats_url).port
    if port is None:
        raise StackError(f"{state_dir}: recorded NATS URL {known.nats_url!r} has no port")
    trust = TrustStore(Path(known.trust_dir)).ensure()
    server = NatsServer(
        data_dir=state_dir / "nats",
        name="vslice-nats",
        trust=trust,
        tls=known.tls,
        port=port,
        http_port=known.nats_http_port or free_port(),
        log_file=state_dir / "logs" / NATS_LOG,
    )
    identities = provision(server, prefix=known.prefix, node=local_node())
    logs = state_dir / "logs"
    pids = {n: p for n, p in known.pids.items() if alive(p)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if "nats" not in pids:
            server.spawn()
            assert server.process is not None
            procs["nats"] = server.process
            server.wait_healthy()
        metrics = urllib.parse.urlsplit(known.metrics_url)
        host = metrics.hostname or "127.0.0.1"
        mport = metrics.port or metrics_port(host, os.environ if environ is None else environ)
        replicas = sum(1 for name in known.pids if name.startswith("scheduler-")) or 2
        commands = _stack_commands(
            server,
            identities,
            known.prefix,
            state_dir,
            environ,
            host,
            mport,
            replicas=replicas,
            policy=known.policy,
        )
        for name, argv in commands.items():
            if name not in pids:
                procs[name] = spawn(name, argv, logs)
        _wait_started(
            identities["operator"], procs, logs, f"http://{host}:{mport}", schedulers=replicas
        )
        # the kept services beat again too: a restarted nats-server lost the in-memory
        # health stream, so a `status` right after finds every service healthy
        kept = {n: p for n, p in pids.items() if n != "nats" and n in commands}
        asyncio.run(wait_heartbeats(identities["operator"], kept))
    except BaseException:
        stop(list(procs.values()))
        raise
    pids.update({name: p.pid for name, p in procs.items()})
    stack = dataclasses.replace(
        known,
        pids=pids,
        metrics_url=f"http://{host}:{mport}",
        nats_http_port=server.http_port,
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
    ``cores`` percent used, ``split_count`` slices allowed; ``vendor`` its vendor
    (``libshared.vendors``: ``NVIDIA``, ``DCU``)."""

    node: str
    uuid: str
    slices: int
    memory_mib: int
    memory_total_mib: int
    cores: int
    split_count: int
    vendor: str = "NVIDIA"


@dataclass(frozen=True)
class Fleet:
    """What the nodes and ledger buckets say: every readable registered device's use
    (``devices``), and the nodes ``quarantined``: node -> ``"<reason>: <detail>"``
    (``libshared.quarantines``; a node with an unreadable ledger keeps its devices in
    ``devices``, shown with nothing held)."""

    devices: list[DeviceUse]
    quarantined: dict[str, str]


async def allocation(settings: BusSettings, *, timeout_s: float = 3.0) -> list[DeviceUse]:
    """``read_fleet(settings).devices``: every readable registered device's use, sorted by
    node and device index. Raises ``StackError`` when the bus cannot be read in
    ``timeout_s``."""
    return (await read_fleet(settings, timeout_s=timeout_s)).devices


async def read_fleet(settings: BusSettings, *, timeout_s: float = 3.0) -> Fleet:
    """The fleet as the nodes and ledger buckets hold it; a value that cannot be read
    quarantines its node in the answer and never raises. Raises ``StackError`` when the
    bus cannot be read in ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connecting.connect(settings, name="vslice-status")
            try:
                bus = await connecting.ensure_bus(nc.jetstream(), settings)
                registered = await _snapshot(bus.nodes)
                stored = await _snapshot(bus.ledger, deletes=True)
            finally:
                await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StackError(f"cannot read the fleet from {settings.urls[0]}: {exc!r}") from exc
    quarantined: dict[str, str] = {}
    nodes: list[NodeDevices] = []
    ledgers: dict[str, NodeLedger] = {}
    for key, entry in sorted(registered.items()):
        try:
            nodes.append(quarantines.read_registration(key, entry.value or b""))
        except quarantines.Unreadable as bad:
            quarantined[key] = f"{bad.reason}: {bad.detail}"
    for key, entry in sorted(stored.items()):
        try:
            if entry.operation in (KV_DEL, KV_PURGE):
                raise quarantines.deleted(key, entry.revision or 0)
            ledgers[key] = quarantines.read_ledger(key, entry.value or b"")
        except quarantines.Unreadable as bad:
            quarantined.setdefault(key, f"{bad.reason}: {bad.detail}")
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
                    vendor=dev.vendor,
                )
            )
    return Fleet(devices=out, quarantined=quarantined)


async def read_heartbeats(
    settings: BusSettings, *, timeout_s: float = 3.0
) -> list[heartbeats.Seen]:
    """The last heartbeat of every service on the bus of ``settings`` (an identity that may
    read the health stream: the operator). Raises ``StackError`` when the bus cannot be
    read in ``timeout_s`` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connecting.connect(settings, name="vslice-status")
            try:
                return await heartbeats.latest(nc.jetstream(), settings.subjects)
            finally:
                await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StackError(f"cannot read heartbeats from {settings.urls[0]}: {exc!r}") from exc


async def wait_heartbeats(
    settings: BusSettings, pids: Mapping[str, int], *, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Wait until each process of ``pids`` (name -> pid) has published a heartbeat.
    Raises ``StackError`` naming the silent ones after ``timeout_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    silent = dict(pids)
    while True:
        with contextlib.suppress(StackError):
            seen = {b.heartbeat.pid for b in await read_heartbeats(settings)}
            silent = {n: p for n, p in silent.items() if p not in seen}
        if not silent:
            return
        if loop.time() >= deadline:
            raise StackError(f"no heartbeat after {timeout_s:.0f} s from {', '.join(silent)}")
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class LiveSlice:
    """A pod holding slices: ``pod_uid`` on ``node``, ``memory_mib`` over its ``slices``,
    ``age_s`` since its claim (None when unknown), its ``lease`` (None: placed
    through Kubernetes, no lease): ``lease_ttl_s`` and ``renewed_s_ago``, and ``mig``: the
    GPU instances its MIG slices hold (``"3g.20gb@4"``: profile at placement start)."""

    pod_uid: str
    node: str
    slices: int
    memory_mib: int
    age_s: float | None
    lease: leasing.Lease | None = None
    renewed_s_ago: float | None = None
    mig: tuple[str, ...] = ()


async def _snapshot(kv: KeyValue, *, deletes: bool = False) -> dict[str, KeyValue.Entry]:
    # with ``deletes``, a deleted key's marker is kept (its ``operation`` says so)
    return await kvreads.latest(kv, deletes=deletes)


def _age_s(entry: KeyValue.Entry | None, now: datetime.datetime) -> float | None:
    created = entry.created if entry is not None else None
    return (now - created).total_seconds() if isinstance(created, datetime.datetime) else None


async def live_slices(settings: BusSettings, *, timeout_s: float = 5.0) -> list[LiveSlice]:
    """Every pod in the ledger with its node, age and lease, by node and pod. Raises
    ``StackError`` when the bus cannot be read in ``timeout_s`` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connecting.connect(settings, name="vslice-status")
            try:
                js = nc.jetstream()
                bus = await connecting.ensure_bus(js, settings)
                ledgers = await _snapshot(bus.ledger)
                claims = await _snapshot(bus.pods)
                try:
                    held = await _snapshot(
                        await leasing.open_leases(js, settings, create=False, wait_s=0)
                    )
                except BucketNotFoundError:
                    held = {}
            finally:
                await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StackError(f"cannot read the slices from {settings.urls[0]}: {exc!r}") from exc
    now = datetime.datetime.now(datetime.UTC)
    out = []
    for entry in ledgers.values():
        try:
            ledger = quarantines.read_ledger(entry.key, entry.value) if entry.value else None
        except quarantines.Unreadable:
            ledger = None  # an unreadable ledger: `status` shows the rest
        if ledger is None:
            continue
        for uid in sorted(ledger.pods()):
            mine = [s for s in ledger.slices if s.pod_uid == uid]
            lease_entry = held.get(pod_key(uid))
            lease = None
            if lease_entry is not None:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    lease = leasing.DECODER.decode(lease_entry.value or b"")
            out.append(
                LiveSlice(
                    pod_uid=uid,
                    node=ledger.node,
                    slices=len(mine),
                    memory_mib=sum(s.memory_mib for s in mine),
                    age_s=_age_s(claims.get(pod_key(uid)), now),
                    lease=lease,
                    renewed_s_ago=_age_s(lease_entry, now) if lease is not None else None,
                    mig=tuple(
                        sorted({f"{s.mig_profile}@{s.mig_start}" for s in mine if s.mig_profile})
                    ),
                )
            )
    return sorted(out, key=lambda s: (s.node, s.pod_uid))


def slice_lines(live: Sequence[LiveSlice]) -> list[str]:
    """``vslice status``'s table of live slices. Pure."""
    lines = [f"{'pod':<28}{'node':<24}{'slices':>7}{'MiB':>8}{'age':>9}  lease"]
    for s in live:
        age = f"{s.age_s:.0f}s" if s.age_s is not None else "?"
        if s.lease is None:
            lease = "none (not a vslice run)"
        else:
            ago = f"{s.renewed_s_ago:.0f}s ago" if s.renewed_s_ago is not None else "?"
            lease = f"{s.lease.holder or 'held'}, renewed {ago}, TTL {s.lease.ttl_s:g}s"
        mig = f"  MIG {', '.join(s.mig)}" if s.mig else ""
        lines.append(
            f"{s.pod_uid:<28}{s.node:<24}{s.slices:>7}{s.memory_mib:>8}{age:>9}  {lease}{mig}"
        )
    if not live:
        lines.append("(no slice held)")
    return lines


async def release(settings: BusSettings, pod_uid: str, *, timeout_s: float = 10.0) -> events.Ack:
    """Release ``pod_uid``'s slices through the scheduler replicas and end its lease, if
    any (``vslice release``). Raises ``StackError`` when no replica answers or the
    release fails."""
    try:
        nc = await connecting.connect(settings, name="vslice-release")
    except (OSError, nats.errors.Error) as exc:
        raise StackError(f"cannot reach {settings.urls[0]}: {exc!r}") from exc
    try:
        reply = await nc.request(
            settings.subjects.sched_release,
            events.ENCODER.encode(events.Release(pod_uid=pod_uid)),
            timeout=timeout_s,
            headers=deadline_headers(timeout_s, now=time.time()),
        )
        answer = events.RELEASE_REPLY.decode(reply.data)
        if not isinstance(answer, events.Ack):
            raise StackError(f"release of {pod_uid} failed: {answer}")
        with contextlib.suppress(nats.errors.Error, BucketNotFoundError, TimeoutError):
            leases = await leasing.open_leases(nc.jetstream(), settings, create=False, wait_s=1)
            await kvwrites.purge(leases, pod_key(pod_uid))  # its marker expires
        return answer
    except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
        raise StackError(f"release of {pod_uid}: no answer from the schedulers ({exc!r})") from exc
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


def status_json(state_dir: Path) -> dict[str, object]:
    """What ``vslice status --json`` prints: ``nats_url``, ``prefix``, ``operator_nkey_seed``
    (the operator identity's NKEY seed file, as ``nats.connect(nkeys_seed=...)`` takes it),
    ``operator_creds`` (null: the local stack uses NKEYs, not JWTs), ``tls_ca`` (CA file,
    null without TLS), ``metrics_url``, and ``processes`` (name -> ``pid``, ``state``
    ``running``/``stopped``); ``up`` is false with nothing recorded. Raises
    ``StackError`` for an unreadable state file."""
    stack = read_state(state_dir)
    if stack is None:
        return {"up": False, "state_dir": str(state_dir), "processes": {}}
    operator = stack.settings("operator")
    return {
        "up": alive(stack.pids.get("nats", -1)),
        "state_dir": str(state_dir),
        "nats_url": stack.nats_url,
        "prefix": stack.prefix,
        "operator_nkey_seed": operator.nkey_seed_path or None,
        "operator_creds": None,
        "tls_ca": operator.tls_ca_path or None,
        "metrics_url": stack.metrics_url or None,
        "processes": {
            name: {"pid": pid, "state": "running" if alive(pid) else "stopped"}
            for name, pid in stack.pids.items()
        },
    }


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
    if not all(alive(pid) for pid in stack.pids.values()):
        lines.append("  (`vslice up` starts the stopped ones again, NATS data kept)")
    if not alive(stack.pids.get("nats", -1)):
        lines.append("fleet: unknown (nats-server is not running)")
        return "\n".join(lines)
    settings = stack.settings("operator")
    try:
        fleet = asyncio.run(read_fleet(settings))
    except StackError as exc:
        lines.append(f"fleet: {exc}")
        return "\n".join(lines)
    devices = fleet.devices
    for node, why in sorted(fleet.quarantined.items()):
        lines.append(f"quarantined {node}: {why} (`vslice repair {node}` for a ledger)")
    lines.append(f"{'node':<24}{'device':<28}{'slices':>8}{'memory MiB':>20}{'cores %':>9}")
    for d in devices:
        mem = f"{d.memory_mib}/{d.memory_total_mib}"
        lines.append(
            f"{d.node:<24}{d.uuid:<28}{f'{d.slices}/{d.split_count}':>8}{mem:>20}{d.cores:>9}"
        )
    if not devices:
        lines.append("(no node registered)")
    try:
        lines += slice_lines(asyncio.run(live_slices(settings)))
    except StackError as exc:
        lines.append(f"slices: {exc}")
    return "\n".join(lines)
