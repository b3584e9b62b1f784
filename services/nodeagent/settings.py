"""The node agent's settings: one frozen object, from flags and the environment.

Without ``--host-root`` the agent hosts mock nodes that only answer placements (a
replay's fleet): from an openb node list CSV (``--fleet``) or a small uniform spec
(``--nodes``, ``--gpus``, ...). With ``--host-root`` it hosts one node whose slices are
real: GPUs from NVML (``--backend nvml``), the mock list (``--backend mock``), or NVML
when it finds GPUs and the mock otherwise (``auto``); each slice is prepared under the
host root, and usage is read back every ``--usage-interval`` seconds.

In Kubernetes (``--device-plugin``) that node is the Kubernetes node ``--node-name``
(default ``$NODE_NAME``, from the downward API): the agent serves kubelet's device-plugin
API in ``--kubelet-dir`` and reads pods and writes annotations through the API
(``--kube``: in-cluster config, else ``$KUBECONFIG``). It uses the bus too -- registration,
the ledger check of Allocate, usage reports -- when a NATS URL is given (``--nats-url`` or
``VSLICE_NATS_URL``); without one it runs on the Kubernetes API alone. How Allocate names
the GPUs to the container runtime is HAMi's ``--device-list-strategy`` (``envvar``,
``volume-mounts``, ``cdi-annotations``, comma-separated), with ``--pass-device-specs`` and
``--nvidia-dev-root``; each reads ``VSLICE_<NAME>``, else HAMi's variable
(``DEVICE_LIST_STRATEGY``, ``PASS_DEVICE_SPECS``, ``NVIDIA_DEV_ROOT``).
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from libshared import connecting
from services.nodeagent.core import devicelists
from services.nodeagent.core.fleets import DEFAULT_SPLIT_COUNT, FleetSpec, parse_devices
from services.nodeagent.core.registrations import Scaling

PACKAGE = Path(__file__).resolve().parent
DEFAULT_LIBVGPU = str(PACKAGE / "libvgpu" / "libvgpu.so")
DEFAULT_MOCK_DIR = str(PACKAGE / "mockgpu")
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"


@dataclass(frozen=True)
class SliceSettings:
    """The real-slice node: ``host_root`` (absolute), GPU ``backend``, ``scaling`` (HAMi's
    deviceSplitCount / deviceMemoryScaling / deviceCoreScaling), ``libvgpu`` (the built
    library to install), ``mock_dir`` (mock ``libcuda.so.1`` / ``libnvidia-ml.so.1``),
    ``mock_state`` (the mock card's state file; default ``<host_root>/mockgpu.state``),
    ``nvml_library`` (an NVML to load by path instead of ``libnvidia-ml.so.1``),
    ``usage_interval_s`` (seconds between usage reports), ``grace_s`` (seconds a released
    slice's directory is kept), ``enforce`` (``kill``: end escaped processes),
    ``escape_margin_mib`` (NVML MiB allowed above libvgpu's charge per process; None: 0 on
    the mock, 512 on NVML, for the CUDA context), ``sm_policy``
    (``GPU_CORE_UTILIZATION_POLICY``), ``rediscover_s`` (seconds between device list
    checks)."""

    host_root: str
    backend: Literal["auto", "nvml", "mock"] = "auto"
    scaling: Scaling = field(default_factory=Scaling)
    libvgpu: str = DEFAULT_LIBVGPU
    mock_dir: str = DEFAULT_MOCK_DIR
    mock_state: str | None = None
    nvml_library: str | None = None
    usage_interval_s: float = 2.0
    grace_s: float = 5.0
    enforce: Literal["report", "kill"] = "report"
    escape_margin_mib: int | None = None
    sm_policy: Literal["default", "force", "disable"] = "default"
    rediscover_s: float = 30.0

    @property
    def mock_state_path(self) -> str:
        """The mock card's state file."""
        return self.mock_state or str(Path(self.host_root) / "mockgpu.state")


@dataclass(frozen=True)
class DevicePluginSettings:
    """The kubelet device plugin: ``node_name`` (the Kubernetes node), ``kubelet_dir``
    (kubelet's device-plugin directory), ``device_list`` (how Allocate names the GPUs)."""

    node_name: str
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    device_list: devicelists.DeviceListSettings = field(
        default_factory=devicelists.DeviceListSettings
    )


@dataclass(frozen=True)
class Settings:
    """``fleet_csv``: openb node list to host (wins over ``spec``); ``split_count`` for it
    (``None``: the replay default of ``libshared.traces``); ``name``: the agent (and its
    durable consumer's) name; ``unregister``: on SIGTERM delete the hosted nodes from the
    nodes bucket (a fleet leaving the stack; a restarting agent keeps them)."""

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    spec: FleetSpec = field(default_factory=FleetSpec)
    fleet_csv: str | None = None
    split_count: int | None = None
    name: str = field(default_factory=socket.gethostname)
    log_level: str = "info"
    slices: SliceSettings | None = None
    device_plugin: DevicePluginSettings | None = None
    use_bus: bool = True
    unregister: bool = False


def _names(name: str) -> tuple[str, str]:
    return (f"VSLICE_{name}", name)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """``VSLICE_<name>``, else HAMi's ``<name>``, from ``environ`` (unset or blank: None)."""
    for n in _names(name):
        value = environ.get(n, "").strip()
        if value:
            return value
    return None


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win.

    Exits (``SystemExit`` 2) on an invalid flag or value.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m services.nodeagent", description="vslice node agent (mock backend)"
    )
    connecting.add_arguments(parser, env)
    parser.add_argument("--fleet", default=env.get("VSLICE_FLEET") or None, help="node list CSV")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--memory-mib", type=int, default=16384)
    parser.add_argument("--gpu-type", default="MOCK-GPU-16G")
    parser.add_argument("--split-count", type=int, default=None)
    parser.add_argument(
        "--devices",
        default=env.get("VSLICE_MOCKGPU_DEVICES", ""),
        help="one node with these mock GPUs: <uuid>:<memory_mib>[,...] "
        "(env VSLICE_MOCKGPU_DEVICES; wins over --gpus/--memory-mib)",
    )
    parser.add_argument(
        "--node-prefix", default=env.get("VSLICE_NODE_PREFIX", socket.gethostname())
    )
    parser.add_argument("--name", default=env.get("VSLICE_AGENT_NAME", socket.gethostname()))
    parser.add_argument("--log-level", default=env.get("VSLICE_LOG_LEVEL", "info"))
    parser.add_argument(
        "--unregister",
        action="store_true",
        help="on SIGTERM delete the hosted nodes from the nodes bucket: no new pod goes there",
    )
    real = parser.add_argument_group("real slices (one node)")
    real.add_argument(
        "--host-root",
        default=env.get("VSLICE_HOST_ROOT") or None,
        help="prepare slices under this directory (env VSLICE_HOST_ROOT); without it the "
        "agent only answers placements",
    )
    real.add_argument("--backend", choices=("auto", "nvml", "mock"), default="auto")
    real.add_argument("--memory-scaling", type=float, default=1.0, help="deviceMemoryScaling")
    real.add_argument("--core-scaling", type=float, default=1.0, help="deviceCoreScaling")
    real.add_argument("--libvgpu", default=env.get("VSLICE_LIBVGPU", DEFAULT_LIBVGPU))
    real.add_argument("--mock-dir", default=env.get("VSLICE_MOCKGPU_DIR", DEFAULT_MOCK_DIR))
    real.add_argument("--mock-state", default=env.get("VSLICE_MOCKGPU_STATE") or None)
    real.add_argument("--nvml-library", default=None, help="load this NVML library by path")
    real.add_argument(
        "--usage-interval",
        type=float,
        default=float(env.get("VSLICE_USAGE_INTERVAL_S", "2")),
        help="seconds between usage reports (env VSLICE_USAGE_INTERVAL_S)",
    )
    real.add_argument(
        "--grace",
        type=float,
        default=float(env.get("VSLICE_GRACE_S", "5")),
        help="seconds a released slice's directory stays (env VSLICE_GRACE_S)",
    )
    real.add_argument(
        "--enforce",
        choices=("report", "kill"),
        default=env.get("VSLICE_ENFORCE", "report"),
        help="kill: end processes over their slice (env VSLICE_ENFORCE)",
    )
    real.add_argument("--escape-margin-mib", type=int, default=None)
    real.add_argument("--sm-policy", choices=("default", "force", "disable"), default="default")
    real.add_argument("--rediscover", type=float, default=30.0, help="seconds")
    k8s = parser.add_argument_group("Kubernetes")
    k8s.add_argument(
        "--device-plugin",
        action="store_true",
        default=connecting.env_flag(env, "VSLICE_DEVICE_PLUGIN"),
        help="serve kubelet's device-plugin API for nvidia.com/gpu (env VSLICE_DEVICE_PLUGIN)",
    )
    k8s.add_argument(
        "--kubelet-dir",
        default=env.get("VSLICE_KUBELET_DIR", DEFAULT_KUBELET_DIR),
        help="kubelet's device-plugin directory (env VSLICE_KUBELET_DIR)",
    )
    k8s.add_argument(
        "--node-name",
        default=env.get("VSLICE_NODE_NAME") or env.get("NODE_NAME", ""),
        help="the Kubernetes node (env VSLICE_NODE_NAME, else NODE_NAME)",
    )
    k8s.add_argument(
        "--device-list-strategy",
        default=_env(env, "DEVICE_LIST_STRATEGY") or ",".join(devicelists.DEFAULT_STRATEGIES),
        help="how Allocate names the GPUs to the runtime: envvar, volume-mounts, "
        "cdi-annotations, comma-separated (env VSLICE_DEVICE_LIST_STRATEGY, else "
        "DEVICE_LIST_STRATEGY)",
    )
    k8s.add_argument(
        "--pass-device-specs",
        action="store_true",
        default=any(connecting.env_flag(env, n) for n in _names("PASS_DEVICE_SPECS")),
        help="pass the GPUs' device nodes to kubelet too (env VSLICE_PASS_DEVICE_SPECS, else "
        "PASS_DEVICE_SPECS)",
    )
    k8s.add_argument(
        "--nvidia-dev-root",
        default=_env(env, "NVIDIA_DEV_ROOT") or "/",
        help="host directory the /dev device nodes are under (env VSLICE_NVIDIA_DEV_ROOT, "
        "else NVIDIA_DEV_ROOT)",
    )
    k8s.add_argument(
        "--kube",
        action="store_true",
        default=connecting.env_flag(env, "VSLICE_KUBE"),
        help="talk to the Kubernetes API: in-cluster config, else $KUBECONFIG (env VSLICE_KUBE)",
    )
    argv = list(argv or [])
    args = parser.parse_args(argv)
    try:
        bus = connecting.from_arguments(args)
        devices = parse_devices(args.devices)
        scaling = Scaling(
            split_count=args.split_count or DEFAULT_SPLIT_COUNT,
            memory_scaling=args.memory_scaling,
            core_scaling=args.core_scaling,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for flag, value in (
        ("--usage-interval", args.usage_interval),
        ("--grace", args.grace),
        ("--rediscover", args.rediscover),
    ):
        if not value > 0:
            parser.error(f"{flag} {value}: must be above 0 seconds")
    if args.escape_margin_mib is not None and args.escape_margin_mib < 0:
        parser.error(f"--escape-margin-mib {args.escape_margin_mib}: must be 0 or more")
    device_plugin = None
    if args.device_plugin:
        for missing, why in (
            (not args.host_root, "--host-root (where slices are prepared)"),
            (not args.kube, "--kube (Allocate reads the pods from the Kubernetes API)"),
            (not args.node_name, "--node-name or NODE_NAME (the Kubernetes node)"),
        ):
            if missing:
                parser.error(f"--device-plugin needs {why}")
        try:
            device_list = devicelists.DeviceListSettings(
                strategies=devicelists.parse_strategies(args.device_list_strategy),
                pass_device_specs=args.pass_device_specs,
                dev_root=args.nvidia_dev_root,
            )
        except ValueError as exc:
            parser.error(str(exc).replace("dev_root=", "--nvidia-dev-root "))
        device_plugin = DevicePluginSettings(
            node_name=args.node_name,
            kubelet_dir=str(Path(args.kubelet_dir).resolve()),
            device_list=device_list,
        )
    nats_given = "VSLICE_NATS_URL" in env or any(a.startswith("--nats-url") for a in argv)
    slices = None
    if args.host_root:
        slices = SliceSettings(
            host_root=str(Path(args.host_root).resolve()),
            backend=args.backend,
            scaling=scaling,
            libvgpu=args.libvgpu,
            mock_dir=args.mock_dir,
            mock_state=args.mock_state,
            nvml_library=args.nvml_library,
            usage_interval_s=args.usage_interval,
            grace_s=args.grace,
            enforce=args.enforce,
            escape_margin_mib=args.escape_margin_mib,
            sm_policy=args.sm_policy,
            rediscover_s=args.rediscover,
        )
    spec = FleetSpec(
        nodes=args.nodes,
        gpus=args.gpus,
        memory_mib=args.memory_mib,
        gpu_type=args.gpu_type,
        split_count=args.split_count or DEFAULT_SPLIT_COUNT,
        name_prefix=args.node_prefix,
        devices=devices,
    )
    return Settings(
        bus=bus,
        spec=spec,
        fleet_csv=args.fleet,
        split_count=args.split_count,
        name=args.name,
        log_level=args.log_level,
        slices=slices,
        device_plugin=device_plugin,
        use_bus=device_plugin is None or nats_given,
        unregister=args.unregister,
    )
