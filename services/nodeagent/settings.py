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

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from libshared import connecting, probes, settings
from services.nodeagent.adapters import configfiles
from services.nodeagent.core import devicelists, nodeconfigs
from services.nodeagent.core.fleets import (
    DEFAULT_SPLIT_COUNT,
    MOCKDCU_VARIABLE,
    FleetSpec,
    MockDcu,
    parse_dcus,
    parse_devices,
    parse_models,
)
from services.nodeagent.core.registrations import Scaling

PACKAGE = Path(__file__).resolve().parent
DEFAULT_LIBVGPU = str(PACKAGE / "libvgpu" / "libvgpu.so")
DEFAULT_MOCK_DIR = str(PACKAGE / "mockgpu")
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"


def _memory_scaling(value: float) -> None:
    Scaling(memory_scaling=value)  # raises ValueError naming HAMi's deviceMemoryScaling


def _core_scaling(value: float) -> None:
    Scaling(core_scaling=value)  # raises ValueError naming HAMi's deviceCoreScaling


REAL = "real slices (one node)"  # groups of options in --help
FLEET = FleetSpec()  # the mock fleet's defaults, written there
K8S = "Kubernetes"
Seconds = Annotated[float, msgspec.Meta(gt=0)]


def _names(name: str) -> tuple[str, str]:
    return (f"VSLICE_{name}", name)


class Options(settings.ServiceOptions, frozen=True, kw_only=True):
    """The node agent's flags and variables (``libshared.settings``); ``name`` and
    ``node_prefix`` default to the host name."""

    fleet: Annotated[
        str | None, settings.option("--fleet", env="VSLICE_FLEET", help="node list CSV")
    ] = None
    nodes: Annotated[int, msgspec.Meta(ge=1)] = FLEET.nodes
    gpus: Annotated[int, msgspec.Meta(ge=0)] = FLEET.gpus  # 0: a node of DCUs only
    memory_mib: Annotated[int, msgspec.Meta(ge=1)] = FLEET.memory_mib
    gpu_type: str = FLEET.gpu_type
    split_count: Annotated[int, msgspec.Meta(ge=0)] | None = None  # 0: the default
    devices: Annotated[
        str,
        settings.option(
            "--devices",
            env="VSLICE_MOCKGPU_DEVICES",
            help="one node with these mock GPUs: <uuid>:<memory_mib>[:<product name>[:mig]]"
            "[,...] (wins over --gpus/--memory-mib; a name such as 'NVIDIA A100-SXM4-40GB'"
            " and ':mig' start the GPU in MIG mode)",
            check=parse_devices,
        ),
    ] = ""
    dcus: Annotated[
        str,
        settings.option(
            "--dcus",
            env=MOCKDCU_VARIABLE,
            help="mock Hygon DCUs of this machine's node, beside its GPUs:"
            " <uuid>:<memory_mib>[:<model>][,...] (model default Z100: type DCU-Z100)",
            group=REAL,
            check=parse_dcus,
        ),
    ] = ""
    node_prefix: Annotated[str, settings.option("--node-prefix", env="VSLICE_NODE_PREFIX")] = ""
    name: Annotated[str, settings.option("--name", env="VSLICE_AGENT_NAME")] = ""
    unregister: Annotated[
        bool,
        settings.option(
            "--unregister",
            help="on SIGTERM delete the hosted nodes from the nodes bucket: no new pod goes there",
        ),
    ] = False
    host_root: Annotated[
        str | None,
        settings.option(
            "--host-root",
            env="VSLICE_HOST_ROOT",
            help="prepare slices under this directory; without it the agent only answers "
            "placements",
            group=REAL,
        ),
    ] = None
    backend: Annotated[
        Literal["auto", "nvml", "mock"], settings.option("--backend", group=REAL)
    ] = "auto"
    memory_scaling: Annotated[
        float,
        settings.option(
            "--memory-scaling",
            help="deviceMemoryScaling",
            group=REAL,
            check=_memory_scaling,
        ),
    ] = 1.0
    core_scaling: Annotated[
        float,
        settings.option(
            "--core-scaling",
            help="deviceCoreScaling",
            group=REAL,
            check=_core_scaling,
        ),
    ] = 1.0
    node_config: Annotated[
        str | None,
        settings.option(
            "--node-config",
            env="VSLICE_NODE_CONFIG",
            help="HAMi's device plugin config.json: this node's split count, scaling and "
            "filtered devices, over the flags above; read again when it changes",
            group=REAL,
        ),
    ] = None
    node_config_poll: Annotated[
        Seconds,
        settings.option(
            "--node-config-poll", help="seconds between checks of --node-config", group=REAL
        ),
    ] = 5.0
    libvgpu: Annotated[str, settings.option("--libvgpu", env="VSLICE_LIBVGPU", group=REAL)] = (
        DEFAULT_LIBVGPU
    )
    mock_dir: Annotated[
        str, settings.option("--mock-dir", env="VSLICE_MOCKGPU_DIR", group=REAL)
    ] = DEFAULT_MOCK_DIR
    mock_state: Annotated[
        str | None, settings.option("--mock-state", env="VSLICE_MOCKGPU_STATE", group=REAL)
    ] = None
    nvml_library: Annotated[
        str | None,
        settings.option("--nvml-library", help="load this NVML library by path", group=REAL),
    ] = None
    usage_interval: Annotated[
        Seconds,
        settings.option(
            "--usage-interval",
            env="VSLICE_USAGE_INTERVAL_S",
            help="seconds between usage reports",
            group=REAL,
        ),
    ] = 2.0
    grace: Annotated[
        Seconds,
        settings.option(
            "--grace",
            env="VSLICE_GRACE_S",
            help="seconds a released slice's directory stays",
            group=REAL,
        ),
    ] = 5.0
    enforce: Annotated[
        Literal["report", "kill"],
        settings.option(
            "--enforce",
            env="VSLICE_ENFORCE",
            help="kill: end processes over their slice",
            group=REAL,
        ),
    ] = "report"
    escape_margin_mib: Annotated[
        Annotated[int, msgspec.Meta(ge=0)] | None,
        settings.option("--escape-margin-mib", group=REAL),
    ] = None
    sm_policy: Annotated[
        Literal["default", "force", "disable"], settings.option("--sm-policy", group=REAL)
    ] = "default"
    rediscover: Annotated[Seconds, settings.option("--rediscover", help="seconds", group=REAL)] = (
        30.0
    )
    device_plugin: Annotated[
        bool,
        settings.option(
            "--device-plugin",
            env="VSLICE_DEVICE_PLUGIN",
            help="serve kubelet's device-plugin API for nvidia.com/gpu",
            group=K8S,
        ),
    ] = False
    kubelet_dir: Annotated[
        str,
        settings.option(
            "--kubelet-dir",
            env="VSLICE_KUBELET_DIR",
            help="kubelet's device-plugin directory",
            group=K8S,
        ),
    ] = DEFAULT_KUBELET_DIR
    node_name: Annotated[
        str,
        settings.option(
            "--node-name",
            env=("VSLICE_NODE_NAME", "NODE_NAME"),
            help="the Kubernetes node",
            group=K8S,
        ),
    ] = ""
    device_list_strategy: Annotated[
        str,
        settings.option(
            "--device-list-strategy",
            env=_names("DEVICE_LIST_STRATEGY"),
            help="how Allocate names the GPUs to the runtime: envvar, volume-mounts, "
            "cdi-annotations, comma-separated",
            group=K8S,
        ),
    ] = ",".join(devicelists.DEFAULT_STRATEGIES)
    pass_device_specs: Annotated[
        bool,
        settings.option(
            "--pass-device-specs",
            env=_names("PASS_DEVICE_SPECS"),
            help="pass the GPUs' device nodes to kubelet too",
            group=K8S,
        ),
    ] = False
    nvidia_dev_root: Annotated[
        str,
        settings.option(
            "--nvidia-dev-root",
            env=_names("NVIDIA_DEV_ROOT"),
            help="host directory the /dev device nodes are under",
            group=K8S,
        ),
    ] = "/"
    cordon_poll: Annotated[
        Seconds,
        settings.option(
            "--cordon-poll",
            help="seconds between reads of the node's hami.io/device-cordon annotation",
            group=K8S,
        ),
    ] = 10.0
    kube: Annotated[
        bool,
        settings.option(
            "--kube",
            env="VSLICE_KUBE",
            help="talk to the Kubernetes API: in-cluster config, else $KUBECONFIG",
            group=K8S,
        ),
    ] = False


# Each default is written once, in the options above; the settings objects below take
# theirs from here.
DEFAULTS = Options()


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
    checks), ``node_config`` (HAMi's device plugin ``config.json``, per-node values over
    ``scaling``: ``core.nodeconfigs``; None: none), ``node_config_poll_s`` (seconds between
    checks of it for a change), ``dcus`` (the node's mock Hygon DCUs; no real DCU backend
    exists: ``adapters.dcus``)."""

    host_root: str
    backend: Literal["auto", "nvml", "mock"] = DEFAULTS.backend
    scaling: Scaling = field(default_factory=Scaling)
    libvgpu: str = DEFAULTS.libvgpu
    mock_dir: str = DEFAULTS.mock_dir
    mock_state: str | None = DEFAULTS.mock_state
    nvml_library: str | None = DEFAULTS.nvml_library
    usage_interval_s: float = DEFAULTS.usage_interval
    grace_s: float = DEFAULTS.grace
    enforce: Literal["report", "kill"] = DEFAULTS.enforce
    escape_margin_mib: int | None = DEFAULTS.escape_margin_mib
    sm_policy: Literal["default", "force", "disable"] = DEFAULTS.sm_policy
    rediscover_s: float = DEFAULTS.rediscover
    node_config: str | None = DEFAULTS.node_config
    node_config_poll_s: float = DEFAULTS.node_config_poll
    dcus: tuple[MockDcu, ...] = ()

    @property
    def mock_state_path(self) -> str:
        """The mock card's state file."""
        return self.mock_state or str(Path(self.host_root) / "mockgpu.state")


@dataclass(frozen=True)
class DevicePluginSettings:
    """The kubelet device plugin: ``node_name`` (the Kubernetes node), ``kubelet_dir``
    (kubelet's device-plugin directory), ``cordon_poll_s`` (seconds between reads of the
    node's ``hami.io/device-cordon``), ``device_list`` (how Allocate names the GPUs)."""

    node_name: str
    kubelet_dir: str = DEFAULTS.kubelet_dir
    cordon_poll_s: float = DEFAULTS.cordon_poll
    device_list: devicelists.DeviceListSettings = field(
        default_factory=devicelists.DeviceListSettings
    )


@dataclass(frozen=True)
class Settings:
    """``fleet_csv``: openb node list to host (wins over ``spec``); ``split_count`` for it
    (``None``: the replay default of ``libshared.traces``); ``name``: the agent (and its
    durable consumer's) name; ``unregister``: on SIGTERM delete the hosted nodes from the
    nodes bucket (a fleet leaving the stack; a restarting agent keeps them); ``health``:
    where ``/healthz`` and ``/readyz`` are served (``libshared.probes``)."""

    bus: connecting.BusSettings = field(default_factory=connecting.BusSettings)
    spec: FleetSpec = field(default_factory=FleetSpec)
    fleet_csv: str | None = DEFAULTS.fleet
    split_count: int | None = None
    name: str = field(default_factory=socket.gethostname)
    log_level: str = DEFAULTS.log_level
    slices: SliceSettings | None = None
    device_plugin: DevicePluginSettings | None = None
    use_bus: bool = True
    unregister: bool = DEFAULTS.unregister
    health: probes.HealthSettings = field(default_factory=probes.HealthSettings)


LOADER = settings.Loader(
    Options, prog="python -m services.nodeagent", description="vslice node agent"
)


def _check_node_config(path: str, node: str, defaults: Scaling) -> None:
    """Exit (``SystemExit`` 2) when ``path`` cannot be read or is refused for ``node``
    (the message names the key and value): a bad file stops the agent before it starts,
    while one changed later is only logged (``adapters.loops``)."""
    try:
        configfiles.load(path, node, defaults)
    except OSError as exc:
        LOADER.error(f"--node-config {path}: {exc.strerror or exc}")
    except nodeconfigs.NodeConfigError as exc:
        LOADER.error(f"--node-config {exc}")


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` and ``environ`` (default ``os.environ``); flags win
    (``Options`` names every flag and variable).

    Exits (``SystemExit`` 2) on an invalid flag or value, naming it.
    """
    opts = LOADER.parse(argv, os.environ if environ is None else environ)
    try:
        bus = opts.bus()
        devices = parse_devices(opts.devices)
        dcus = parse_dcus(opts.dcus)
        scaling = Scaling(
            split_count=opts.split_count or DEFAULT_SPLIT_COUNT,
            memory_scaling=opts.memory_scaling,
            core_scaling=opts.core_scaling,
        )
    except ValueError as exc:
        LOADER.error(str(exc))
    device_plugin = None
    if opts.device_plugin:
        for missing, why in (
            (not opts.host_root, "--host-root (where slices are prepared)"),
            (not opts.kube, "--kube (Allocate reads the pods from the Kubernetes API)"),
            (not opts.node_name, "--node-name or NODE_NAME (the Kubernetes node)"),
        ):
            if missing:
                LOADER.error(f"--device-plugin needs {why}")
        try:
            device_list = devicelists.DeviceListSettings(
                strategies=devicelists.parse_strategies(opts.device_list_strategy),
                pass_device_specs=opts.pass_device_specs,
                dev_root=opts.nvidia_dev_root,
            )
        except ValueError as exc:
            LOADER.error(str(exc).replace("dev_root=", "--nvidia-dev-root "))
        device_plugin = DevicePluginSettings(
            node_name=opts.node_name,
            kubelet_dir=str(Path(opts.kubelet_dir).resolve()),
            cordon_poll_s=opts.cordon_poll,
            device_list=device_list,
        )
    if dcus and not opts.host_root:
        LOADER.error("--dcus needs --host-root (mock DCUs belong to this machine's node)")
    if opts.node_config and not opts.host_root:
        LOADER.error("--node-config needs --host-root (it configures this machine's node)")
    slices = None
    if opts.host_root:
        slices = SliceSettings(
            host_root=str(Path(opts.host_root).resolve()),
            backend=opts.backend,
            scaling=scaling,
            libvgpu=opts.libvgpu,
            mock_dir=opts.mock_dir,
            mock_state=opts.mock_state,
            nvml_library=opts.nvml_library,
            usage_interval_s=opts.usage_interval,
            grace_s=opts.grace,
            enforce=opts.enforce,
            escape_margin_mib=opts.escape_margin_mib,
            sm_policy=opts.sm_policy,
            node_config=str(Path(opts.node_config).resolve()) if opts.node_config else None,
            node_config_poll_s=opts.node_config_poll,
            rediscover_s=opts.rediscover,
            dcus=dcus,
        )
    spec = FleetSpec(
        nodes=opts.nodes,
        gpus=opts.gpus,
        memory_mib=opts.memory_mib,
        gpu_type=opts.gpu_type,
        split_count=opts.split_count or DEFAULT_SPLIT_COUNT,
        name_prefix=opts.node_prefix or socket.gethostname(),
        devices=devices,
        models=parse_models(opts.devices),
    )
    if slices is not None and slices.node_config is not None:
        node = device_plugin.node_name if device_plugin else f"{spec.name_prefix}-0"
        _check_node_config(slices.node_config, node, scaling)
    return Settings(
        bus=bus,
        spec=spec,
        fleet_csv=opts.fleet,
        split_count=opts.split_count,
        name=opts.name or socket.gethostname(),
        log_level=opts.log_level,
        health=opts.health(),
        slices=slices,
        device_plugin=device_plugin,
        use_bus=device_plugin is None or opts.nats_url is not None,
        unregister=opts.unregister,
    )
