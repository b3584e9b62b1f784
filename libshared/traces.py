"""The Alibaba openb traces (cluster-trace-gpu-v2023, as used by the FGD paper): the fleet
and the pods, read into vslice's device model and resource model.

Files: ``openb_node_list_gpu_node.csv`` (``sn,cpu_milli,memory_mib,gpu,model``) and
``openb_pod_list_*.csv`` (``name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]``).
A pod with ``num_gpu=1, gpu_milli<1000`` shares a GPU: it asks ``gpumem-percentage =
gpucores = gpu_milli/10``; otherwise it asks ``num_gpu`` whole GPUs; ``gpu_spec``
(``V100M16|V100M32``) becomes ``nvidia.com/use-gputype`` with the listed models.

Mixed-vendor fleets (``libshared.vendors``): a node whose ``model`` is a Hygon DCU model
(``DCU_MEMORY_MIB``: ``DCU-Z100``, ``DCU-K100``) registers DCUs (``Device.vendor``
``DCU``). A pod whose ``gpu_spec`` names DCUs -- the vendor's word ``DCU`` (any DCU) or
models ``DCU-<name>`` -- asks DCUs instead of NVIDIA GPUs, as ``hygon.com/dcunum``,
``dcumem`` and ``dcucores`` ask them (``vendor_request``); a spec naming both vendors is
refused. The openb files name no DCU: such rows are vslice's own, for replays of a mixed
fleet.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from libshared import migs, vendors
from libshared.devices import Device, NodeDevices
from libshared.errors import TraceFormatError
from libshared.resources import ContainerRequest, PodRequest, VendorSelectors

# Hygon DCU models -> memory MiB: vendor spec sheet values (Z100: 32 GiB, K100: 64 GiB),
# named as HAMi's Hygon device plugin types them ("DCU-<model>"; HAMi's examples/hygon
# select "DCU-K100_AI").
DCU_MEMORY_MIB = {"DCU-Z100": 32768, "DCU-K100": 65536}
# GPU model -> memory MiB. Public models from their data sheets; G1/G2/G3 are undisclosed
# in the trace, so vslice assumes 16 GiB, 24 GiB and 32 GiB cards for them. Memory does not
# change the FGD experiment: trace pods ask for a percentage of the card.
GPU_MEMORY_MIB = {
    "V100M32": 32768,
    "V100M16": 16384,
    "P100": 16384,
    "T4": 15360,
    "A10": 24576,
    "G1": 16384,
    "G2": 24576,
    "G3": 32768,
    # MIG-capable models (libshared.migs): the whole card, as its largest profile names it
    **{model: max(p.memory_mib for p in g.profiles) for model, g in migs.GEOMETRIES.items()},
    **DCU_MEMORY_MIB,
}
DCU_WORD = vendors.DCU.name  # "DCU": a gpu_spec entry asking any DCU

REPLAY_SPLIT_COUNT = 100  # the paper's simulator has no per-GPU pod limit; 100 never binds
# The columns of each file (the openb files' names), and those it cannot do without; other
# columns may follow and are ignored.
POD_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "gpu_spec")
POD_REQUIRED = ("cpu_milli", "memory_mib", "num_gpu")
FLEET_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
FLEET_MODES = ("hami-core", "mig")  # the optional ``mode`` column; empty = hami-core


def _rows(
    text: str, *, path: str, expected: tuple[str, ...], required: tuple[str, ...]
) -> csv.DictReader[str]:
    """The rows of a CSV whose header holds every ``required`` column. Raises
    ``TraceFormatError`` (line 1) naming the missing and the ``expected`` columns."""
    reader = csv.DictReader(io.StringIO(text))
    found = reader.fieldnames or []
    missing = [c for c in required if c not in found]
    if missing:
        raise TraceFormatError(
            path=path,
            line=1,
            field="header",
            value=",".join(found),
            reason=f"missing column(s) {', '.join(missing)}; expected {','.join(expected)}",
        )
    return reader


def model_vendor(model: str) -> str:
    """The vendor word (``libshared.vendors``) of a fleet ``model``: ``DCU`` for a model of
    ``DCU_MEMORY_MIB``, else ``NVIDIA``."""
    return DCU_WORD if model in DCU_MEMORY_MIB else "NVIDIA"


def _spec_vendor(entry: str) -> str:
    return DCU_WORD if entry == DCU_WORD or entry.startswith(DCU_WORD + "-") else "NVIDIA"


def dcu_card_mib(spec: tuple[str, ...]) -> int:
    """The card a DCU pod's share is measured on, MiB: the smallest DCU model of
    ``DCU_MEMORY_MIB`` that ``spec`` names, else (``DCU`` or an unlisted model) the
    smallest DCU model there is."""
    named = [DCU_MEMORY_MIB[m] for m in spec if m in DCU_MEMORY_MIB]
    return min(named or DCU_MEMORY_MIB.values())


@dataclass(frozen=True)
class TracePod:
    """One row of a pod list: CPU milli-cores, memory MiB, GPUs, per-GPU milli, GPU models,
    and the vendor whose devices it asks (``NVIDIA``, or ``DCU`` when ``gpu_spec`` names
    DCUs; see the module docstring)."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...]
    vendor: str = "NVIDIA"

    @property
    def milli_total(self) -> int:
        """Milli-GPU the pod asks for in all (num_gpu x gpu_milli)."""
        return self.num_gpu * self.gpu_milli

    def vendor_request(self) -> ContainerRequest:
        """A DCU pod's request, as admission reads its ``hygon.com/dcunum``, ``dcumem`` and
        ``dcucores`` (``resources.parse_dcu_container``): DCUs have no memory percentage,
        so a sharing pod (one DCU, ``gpu_milli`` < 1000) asks ``gpu_milli`` per mille of
        ``dcu_card_mib(gpu_spec)`` MiB and ``gpu_milli/10`` % of the cores; a whole-DCU pod
        asks ``num_gpu`` whole cards (no ``dcumem``: 100 %, cores 100)."""
        if self.num_gpu == 1 and self.gpu_milli < 1000:
            return ContainerRequest(
                name="main",
                index=0,
                init=False,
                gpu_count=1,
                memory_mib=self.gpu_milli * dcu_card_mib(self.gpu_spec) // 1000,
                cores_percent=self.gpu_milli // 10,
                vendor=DCU_WORD,
            )
        return ContainerRequest(
            name="main",
            index=0,
            init=False,
            gpu_count=self.num_gpu,
            memory_percent=100,
            cores_percent=100,
            vendor=DCU_WORD,
        )

    def request(self, uid: str) -> PodRequest:
        """The pod as a HAMi-style ``PodRequest`` with uid ``uid``; a DCU pod's as admission
        reads its pod spec (``vslice.replays_bus.pod_spec``): one container asking no NVIDIA
        GPU, its ``vendor_request``, and its ``gpu_spec`` as ``hygon.com/use-dcutype``."""
        if self.vendor == DCU_WORD and self.num_gpu > 0:
            return PodRequest(
                uid=uid,
                namespace="openb",
                name=self.name,
                containers=(ContainerRequest(name="main", index=0, init=False, gpu_count=0),),
                cpu_milli=self.cpu_milli,
                memory_mib=self.memory_mib,
                vendor_requests=(self.vendor_request(),),
                vendor_selectors=(VendorSelectors(vendor=DCU_WORD, use_types=self.gpu_spec),),
            )
        containers: tuple[ContainerRequest, ...] = ()
        if self.num_gpu == 1 and self.gpu_milli < 1000:
            pct = self.gpu_milli // 10
            containers = (
                ContainerRequest(
                    name="main",
                    index=0,
                    init=False,
                    gpu_count=1,
                    memory_percent=pct,
                    cores_percent=pct,
                ),
            )
        elif self.num_gpu > 0:
            containers = (
                ContainerRequest(
                    name="main",
                    index=0,
                    init=False,
                    gpu_count=self.num_gpu,
                    memory_percent=100,
                    cores_percent=100,
                ),
            )
        return PodRequest(
            uid=uid,
            namespace="openb",
            name=self.name,
            containers=containers,
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
            use_types=self.gpu_spec,
        )


def _int(path: str, line: int, row: dict[str, str], key: str, *, default: int | None = None) -> int:
    raw = row.get(key)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise TraceFormatError(path=path, line=line, field=key, value=raw, reason="missing")
    try:
        value = int(raw)
    except ValueError as exc:
        raise TraceFormatError(
            path=path, line=line, field=key, value=raw, reason="not an integer"
        ) from exc
    if value < 0:
        raise TraceFormatError(path=path, line=line, field=key, value=raw, reason="negative")
    return value


def parse_fleet(
    text: str, *, path: str = "<fleet>", split_count: int = REPLAY_SPLIT_COUNT
) -> list[NodeDevices]:
    """Parse a node list CSV into ``NodeDevices`` (device UUIDs ``<node>-gpu<i>``).

    A DCU model (``DCU_MEMORY_MIB``) gives DCUs (``Device.vendor`` ``DCU``). An optional
    ``mode`` column puts a node's GPUs in ``mig`` mode (empty or ``hami-core``:
    sliced): they then offer every MIG profile of their model (``libshared.migs``; the
    model must be one of ``migs.GEOMETRIES``, e.g. ``A100-40GB``) and hold as many slices
    as the smallest profile has starts.

    Raises ``TraceFormatError`` for a missing or non-numeric field, an unknown GPU model,
    an unknown mode, or ``mig`` on a model without MIG.
    """
    nodes = []
    for line, row in enumerate(
        _rows(text, path=path, expected=FLEET_COLUMNS, required=FLEET_COLUMNS), start=2
    ):
        name = row.get("sn") or ""
        if not name:
            raise TraceFormatError(path=path, line=line, field="sn", value=name, reason="missing")
        gpus = _int(path, line, row, "gpu")
        model = (row.get("model") or "").strip()
        if gpus and model not in GPU_MEMORY_MIB:
            raise TraceFormatError(
                path=path, line=line, field="model", value=model, reason="unknown GPU model"
            )
        mode = (row.get("mode") or "").strip() or "hami-core"
        if mode not in FLEET_MODES:
            raise TraceFormatError(
                path=path, line=line, field="mode", value=mode, reason=f"not one of {FLEET_MODES}"
            )
        geometry = migs.GEOMETRIES.get(model) if mode == "mig" else None
        if mode == "mig" and geometry is None:
            raise TraceFormatError(
                path=path,
                line=line,
                field="model",
                value=model,
                reason=f"mig mode needs a MIG model: {', '.join(migs.GEOMETRIES)}",
            )
        devices = tuple(
            Device(
                uuid=f"{name}-gpu{i}",
                index=i,
                type=model,
                memory_mib=GPU_MEMORY_MIB[model],
                vendor=model_vendor(model),
                split_count=split_count if geometry is None else len(geometry.profiles[0].starts),
                mode=mode,
                mig_slots=0 if geometry is None else geometry.slots,
                mig_profiles=() if geometry is None else migs.published(geometry),
            )
            for i in range(gpus)
        )
        nodes.append(
            NodeDevices(
                node=name,
                devices=devices,
                cpu_milli=_int(path, line, row, "cpu_milli"),
                memory_mib=_int(path, line, row, "memory_mib"),
            )
        )
    return nodes


def parse_pods(text: str, *, path: str = "<pods>") -> list[TracePod]:
    """Parse a pod list CSV (``POD_COLUMNS``); a ``gpu_spec`` naming DCUs makes a DCU pod
    (module docstring). Raises ``TraceFormatError`` naming file, line and field; for a
    header without one of the columns, the expected ones; for a ``gpu_spec`` naming models
    of both vendors."""
    pods = []
    for line, row in enumerate(
        _rows(text, path=path, expected=POD_COLUMNS, required=POD_REQUIRED), start=2
    ):
        num_gpu = _int(path, line, row, "num_gpu")
        gpu_milli = _int(path, line, row, "gpu_milli", default=0)
        bad_share = num_gpu > 0 and not 10 <= gpu_milli <= 1000
        if gpu_milli > 1000 or bad_share or (num_gpu > 1 and gpu_milli != 1000):
            raise TraceFormatError(
                path=path,
                line=line,
                field="gpu_milli",
                value=gpu_milli,
                reason="a GPU pod asks 10-1000 milli-GPU per GPU, and 1000 when num_gpu > 1",
            )
        spec = tuple(x for x in (row.get("gpu_spec") or "").split("|") if x)
        asked = {_spec_vendor(x) for x in spec}
        if len(asked) > 1:
            raise TraceFormatError(
                path=path,
                line=line,
                field="gpu_spec",
                value="|".join(spec),
                reason="names models of two vendors; a pod asks one vendor's devices",
            )
        pods.append(
            TracePod(
                name=row.get("name") or f"pod-{line}",
                cpu_milli=_int(path, line, row, "cpu_milli"),
                memory_mib=_int(path, line, row, "memory_mib"),
                num_gpu=num_gpu,
                gpu_milli=gpu_milli if num_gpu else 0,
                gpu_spec=spec,
                vendor=asked.pop() if asked else "NVIDIA",
            )
        )
    return pods


def read_fleet(path: str | Path, *, split_count: int = REPLAY_SPLIT_COUNT) -> list[NodeDevices]:
    """Read and parse a node list file."""
    return parse_fleet(Path(path).read_text(), path=str(path), split_count=split_count)


def read_pods(path: str | Path) -> list[TracePod]:
    """Read and parse a pod list file."""
    return parse_pods(Path(path).read_text(), path=str(path))


def _replicated(text: str, *, key: str, factor: int, path: str) -> str:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor {factor!r}: must be an integer >= 1")
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = list(csv.DictReader(io.StringIO(text)).fieldnames or [])
    if key not in fields:
        raise TraceFormatError(path=path, line=1, field=key, value=None, reason="missing column")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for copy in range(factor):
        for line, row in enumerate(rows, start=2):
            if not row.get(key):
                raise TraceFormatError(path=path, line=line, field=key, value="", reason="missing")
            writer.writerow({**row, key: f"{row[key]}-x{copy}"})
    return out.getvalue()


def scaled_fleet(text: str, factor: int, *, path: str = "<fleet>") -> str:
    """A node list CSV ``factor`` times as large: every node of ``text`` repeated ``factor``
    times, copy ``i`` of node ``sn`` named ``sn-x<i>`` (so every name is fresh), all other
    columns kept. For ``factor`` = 10 the openb fleet becomes 12,130 nodes and 62,120 GPUs.

    Raises ``ValueError`` for a ``factor`` below 1, ``TraceFormatError`` for a node without
    a name (``sn``) or a node list that does not parse (``parse_fleet``'s errors).
    """
    parse_fleet(text, path=path)
    return _replicated(text, key="sn", factor=factor, path=path)


def scaled_pods(text: str, factor: int, *, path: str = "<pods>") -> str:
    """The pod list matching ``scaled_fleet(..., factor)``: every pod repeated ``factor``
    times (copy ``i`` of pod ``name`` named ``name-x<i>``), so the shapes keep their
    frequencies (FGD's target workload is unchanged) and the replay's arrivals, 130 % of the
    larger capacity, are ``factor`` times as many.

    Raises ``ValueError`` for a ``factor`` below 1, ``TraceFormatError`` for a pod without a
    ``name`` or a pod list that does not parse (``parse_pods``'s errors).
    """
    parse_pods(text, path=path)
    return _replicated(text, key="name", factor=factor, path=path)


def write_scaled(
    fleet: str | Path, pods: str | Path, out_dir: str | Path, factor: int
) -> tuple[Path, Path]:
    """Write ``scaled_fleet`` and ``scaled_pods`` of the two files into ``out_dir`` (created
    if missing) under the input files' names; returns the two paths. Raises ``OSError``,
    ``ValueError`` and ``TraceFormatError`` as the readers and ``scaled_*`` do."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fleet_out, pods_out = out / Path(fleet).name, out / Path(pods).name
    fleet_out.write_text(scaled_fleet(Path(fleet).read_text(), factor, path=str(fleet)))
    pods_out.write_text(scaled_pods(Path(pods).read_text(), factor, path=str(pods)))
    return fleet_out, pods_out


def mig_fleet(
    text: str,
    *,
    share: float,
    models: tuple[str, ...] = ("V100M16", "V100M32"),
    to: str = "A100-40GB",
    seed: int = 0,
    path: str = "<fleet>",
) -> str:
    """A node list CSV where ``share`` (0..1) of the nodes with a GPU of ``models``
    (chosen with ``seed``) have those GPUs replaced by as many ``to`` GPUs in ``mig``
    mode (the ``mode`` column; every other node ``hami-core``). Raises ``ValueError`` for
    a share outside 0..1 or a ``to`` without MIG, ``TraceFormatError`` for a node list that
    does not parse."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share {share!r}: must be within 0..1")
    if to not in migs.GEOMETRIES:
        raise ValueError(f"{to}: not a MIG model ({', '.join(migs.GEOMETRIES)})")
    parse_fleet(text, path=path)
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = [f for f in (csv.DictReader(io.StringIO(text)).fieldnames or []) if f != "mode"]
    eligible = [i for i, r in enumerate(rows) if (r.get("model") or "").strip() in models]
    chosen = set(random.Random(seed).sample(eligible, round(share * len(eligible))))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*fields, "mode"], lineterminator="\n")
    writer.writeheader()
    for i, row in enumerate(rows):
        row = {k: v for k, v in row.items() if k in fields}
        if i in chosen:
            writer.writerow({**row, "model": to, "mode": "mig"})
        else:
            writer.writerow({**row, "mode": "hami-core"})
    return out.getvalue()
