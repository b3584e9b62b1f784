"""The resource model: a Kubernetes pod spec into a normalized ``PodRequest``.

HAMi's rules (Project-HAMi/HAMi pkg/device/nvidia/device.go, ``GenerateResourceRequests``
and ``MutateAdmission``; docs "config.md"), restated (details in ``parse_container``):

- ``nvidia.com/gpu``: number of physical GPUs for the container.
- ``nvidia.com/gpumem`` (MiB per GPU) wins over ``nvidia.com/gpumem-percentage`` (0-100,
  0 = unset); with neither, ``defaultMemory`` if configured, else the whole card.
- ``nvidia.com/gpucores``: percent of the card's SMs (over 100 books 100); absent -> 100
  for a container asking the whole card (it is exclusive), else ``defaultCores``.
- ``gpumem``/``gpumem-percentage``/``gpucores`` in the limits without ``nvidia.com/gpu``
  -> ``defaultGPUNum`` GPUs (1).
- ``resources.limits`` are read first, then ``resources.requests``.

Node-level CPU and memory follow kube-scheduler's NodeResourcesFit: the pod's request is the
larger of the sum over containers and the largest init container.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal
from typing import Annotated, Any

import msgspec

from libshared import annotations as keys
from libshared import bounds
from libshared.errors import InvalidRequest
from libshared.quantities import parse_quantity

GPU = "nvidia.com/gpu"
GPUMEM = "nvidia.com/gpumem"
GPUMEM_PERCENTAGE = "nvidia.com/gpumem-percentage"
GPUCORES = "nvidia.com/gpucores"
PRIORITY = "nvidia.com/priority"
GPU_RESOURCES = (GPU, GPUMEM, GPUMEM_PERCENTAGE, GPUCORES)
# Hygon DCU (HAMi pkg/device/hygon/device.go, its flags' defaults)
DCUNUM = "hygon.com/dcunum"
DCUMEM = "hygon.com/dcumem"
DCUCORES = "hygon.com/dcucores"
DCU_RESOURCES = (DCUNUM, DCUMEM, DCUCORES)

POLICIES = ("binpack", "spread")
# HAMi's GPU policies (pkg/util/types.go): one, or a comma-separated list of them
GPU_POLICIES = ("binpack", "spread", "numa", "mutex", "topology-aware")
INT32_MAX = 2**31 - 1  # HAMi keeps requests in int32
# What Go's strconv.ParseBool reads as true: HAMi reads nvidia.com/numa-bind with it
# (pkg/device/nvidia/device.go, assertNuma)
GO_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))


class ResourceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Cluster-wide defaults of the resource model (HAMi's scheduler flags).

    ``default_memory_mib``: 0 = whole card. ``default_cores_percent``: cores for a slice
    that names memory but no cores. ``max_gpus_per_node``: largest device count of any
    node; a request above it is rejected (``None`` = not checked).
    ``dcu_memory_factor``: HAMi's Hygon ``memoryFactor``: a ``hygon.com/dcumem`` request is
    multiplied by it when above 1 (a request in units of that many MiB).
    """

    default_memory_mib: int = 0
    default_cores_percent: int = 0
    default_gpu_num: int = 1
    max_gpus_per_node: int | None = None
    dcu_memory_factor: int = 1


class ContainerRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One container's GPU request, per GPU.

    Exactly one of ``memory_mib`` (> 0) and ``memory_percent`` (1-100) is set;
    ``memory_percent=100`` is the whole card. ``cores_percent`` is 0-100.
    ``index`` counts init containers first, then containers (HAMi's annotation order).
    ``vendor``: whose devices it asks for (HAMi's request type; ``libshared.vendors``).
    """

    name: bounds.ContainerName
    index: bounds.Index
    init: bool
    gpu_count: bounds.GpuCount
    memory_mib: bounds.MemoryMiB = 0
    memory_percent: bounds.Percent = 0
    cores_percent: bounds.Percent = 0
    priority: bounds.Priority | None = None
    vendor: bounds.Vendor = "NVIDIA"

    def memory_on(self, device_memory_mib: int) -> int:
        """MiB this container takes on a device of ``device_memory_mib`` (HAMi: total*pct/100)."""
        if self.memory_mib > 0:
            return self.memory_mib
        return device_memory_mib * self.memory_percent // 100

    @property
    def exclusive(self) -> bool:
        """True when the slice is a whole card (100 cores)."""
        return self.cores_percent >= 100


class VendorSelectors(msgspec.Struct, frozen=True, kw_only=True):
    """A pod's device selectors for one vendor other than NVIDIA (whose are
    ``PodRequest``'s own fields): type and UUID, ``use`` and ``nouse``."""

    vendor: bounds.Vendor
    use_types: bounds.Selectors = ()
    nouse_types: bounds.Selectors = ()
    use_uuids: bounds.Selectors = ()
    nouse_uuids: bounds.Selectors = ()


MAX_VENDORS = 8


class PodRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A pod's normalized request: GPU containers, node-level CPU/memory, selectors.

    ``vgpu_mode``: HAMi's ``nvidia.com/vgpu-mode`` (``mode_allowed``).
    ``device_weights``: ``(slot, core, memory)`` weights of HAMi's device score
    (``hami.io/device-scoring-weights``; ``parse_device_weights``).
    ``containers`` holds one NVIDIA request per container (``gpu_count`` 0 when it asks
    none); ``vendor_requests`` the requests for other vendors' devices, one per container
    and vendor asked (a container may ask two vendors: HAMi fits each on the same node),
    and ``vendor_selectors`` their selectors.
    """

    uid: bounds.Uid
    namespace: bounds.Namespace = "default"
    name: bounds.PodName = ""
    containers: Annotated[
        tuple[ContainerRequest, ...], msgspec.Meta(max_length=bounds.MAX_CONTAINERS)
    ] = ()
    cpu_milli: bounds.CpuMilli = 0
    memory_mib: bounds.HostMemoryMiB = 0
    use_types: bounds.Selectors = ()
    nouse_types: bounds.Selectors = ()
    use_uuids: bounds.Selectors = ()
    nouse_uuids: bounds.Selectors = ()
    numa_bind: bool = False
    node_policy: bounds.Policy | None = None
    gpu_policy: bounds.Policy | None = None
    device_weights: tuple[bounds.Weight, bounds.Weight, bounds.Weight] = (1, 1, 1)
    vgpu_mode: bounds.Policy | None = None
    vendor_requests: Annotated[
        tuple[ContainerRequest, ...], msgspec.Meta(max_length=bounds.MAX_CONTAINERS)
    ] = ()
    vendor_selectors: Annotated[
        tuple[VendorSelectors, ...], msgspec.Meta(max_length=MAX_VENDORS)
    ] = ()

    @property
    def gpu_containers(self) -> tuple[ContainerRequest, ...]:
        """The requests for at least one device, of every vendor, in container order (a
        container asking two vendors gives two, NVIDIA's first), as HAMi fits them."""
        asked = [c for c in (*self.containers, *self.vendor_requests) if c.gpu_count > 0]
        return tuple(sorted(asked, key=lambda c: (c.index, c.vendor != "NVIDIA", c.vendor)))

    @property
    def vendors(self) -> frozenset[str]:
        """The vendors whose devices the pod asks for."""
        return frozenset(c.vendor for c in self.gpu_containers)

    def selectors(self, vendor: str) -> VendorSelectors:
        """The pod's type and UUID selectors for ``vendor``'s devices."""
        if vendor == "NVIDIA":
            return VendorSelectors(
                vendor=vendor,
                use_types=self.use_types,
                nouse_types=self.nouse_types,
                use_uuids=self.use_uuids,
                nouse_uuids=self.nouse_uuids,
            )
        found = (s for s in self.vendor_selectors if s.vendor == vendor)
        return next(found, VendorSelectors(vendor=vendor))

    def type_allowed(self, device_type: str, vendor: str = "NVIDIA") -> bool:
        """HAMi's type selector of ``vendor`` (``nvidia.com/use-gputype``,
        ``hygon.com/use-dcutype``, ...): case-insensitive substring match, ``nouse`` wins
        (pkg/device/devices.go, ``CheckType``)."""
        sel = self.selectors(vendor)
        t = device_type.lower()
        if any(x.lower() in t for x in sel.nouse_types):
            return False
        return not sel.use_types or any(x.lower() in t for x in sel.use_types)

    def mode_allowed(self, device_mode: str, vendor: str = "NVIDIA") -> bool:
        """HAMi's mode selector: ``nvidia.com/vgpu-mode``, when set, must contain the
        device's mode as a substring (pkg/device/nvidia/device.go, ``checkType``; a
        mismatch is a ``CardTypeMismatch``). It binds NVIDIA devices only."""
        return vendor != "NVIDIA" or self.vgpu_mode is None or device_mode in self.vgpu_mode

    def uuid_allowed(self, uuid: str, vendor: str = "NVIDIA") -> bool:
        """HAMi's UUID selector of ``vendor``: exact match, ``nouse`` wins."""
        sel = self.selectors(vendor)
        if uuid in sel.nouse_uuids:
            return False
        return not sel.use_uuids or uuid in sel.use_uuids


def _integer(
    container: str, field: str, raw: object, *, low: int | None, high: int | None = None
) -> int:
    try:
        q = parse_quantity(raw)
    except ValueError as exc:
        raise InvalidRequest(
            container=container, field=field, value=raw, reason="not a number"
        ) from exc
    if q != q.to_integral_value():
        raise InvalidRequest(
            container=container, field=field, value=raw, reason="not a whole number"
        )
    n = int(q)
    if low is not None and n < low:
        raise InvalidRequest(
            container=container, field=field, value=raw, reason=f"must be >= {low}"
        )
    if high is not None and n > high:
        raise InvalidRequest(
            container=container, field=field, value=raw, reason=f"must be <= {high}"
        )
    return n


def _scaled_up(container: str, field: str, raw: object, scale: Decimal) -> int:
    """A non-negative quantity times ``scale``, rounded up (host memory, CPU)."""
    try:
        q = parse_quantity(raw)
    except ValueError as exc:
        raise InvalidRequest(
            container=container, field=field, value=raw, reason="not a quantity"
        ) from exc
    if q < 0:
        raise InvalidRequest(container=container, field=field, value=raw, reason="must be >= 0")
    return int((q * scale).to_integral_value(rounding=ROUND_CEILING))


def _mib(container: str, field: str, raw: object) -> int:
    """Host memory quantity (bytes, Kubernetes style) in MiB, rounded up."""
    return _scaled_up(container, field, raw, Decimal(1) / Decimal(2**20))


def _cpu_milli(container: str, field: str, raw: object) -> int:
    """CPU quantity (cores, Kubernetes style) in milli-cores, rounded up."""
    return _scaled_up(container, field, raw, Decimal(1000))


def _resources(spec: Mapping[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    res = spec.get("resources") or {}
    if not isinstance(res, Mapping):
        raise InvalidRequest(container=name, field="resources", value=res, reason="not an object")
    limits = res.get("limits") or {}
    requests = res.get("requests") or {}
    for field, value in (("resources.limits", limits), ("resources.requests", requests)):
        if not isinstance(value, Mapping):
            raise InvalidRequest(container=name, field=field, value=value, reason="not an object")
    return dict(limits), dict(requests)


def parse_container(
    spec: Mapping[str, Any],
    *,
    index: int,
    init: bool,
    settings: ResourceSettings,
    admission: bool = False,
) -> ContainerRequest:
    """One container spec (Kubernetes JSON) into a ``ContainerRequest`` by HAMi's rules.

    Sources: pkg/device/nvidia/device.go -- ``GenerateResourceRequests`` (the request),
    ``mutateContainerResource`` (``defaultGPUNum``) and ``defaultExclusiveCoreIfNeeded``
    (the exclusive card) of ``MutateAdmission``:

    - ``nvidia.com/gpu`` is ``defaultGPUNum`` when the limits name ``gpumem``,
      ``gpumem-percentage`` or ``gpucores`` but not ``nvidia.com/gpu``;
    - ``gpumem`` above int32 (2,147,483,647 MiB, e.g. ``16Gi``) gives no request at all
      (HAMi: "not a plain integer within the int32 range");
    - ``gpumem-percentage`` 0 or below is unset, over 100 is 100; with neither memory
      resource set (or ``gpumem: 0``) the container gets ``defaultMemory`` MiB when
      configured, else the whole card;
    - ``gpucores`` over 100 books 100 (HAMi's ``Fit`` clamps it); absent, it is 100 when the
      container asks the whole card (``gpumem-percentage: 100``, or neither memory
      resource), else ``defaultCores``.

    Raises ``InvalidRequest`` naming the container, field and value for a negative or
    non-numeric value, more GPUs than any node has (``settings.max_gpus_per_node``), and,
    with ``admission=True``, a percentage outside 0-100 (HAMi's webhook denies it:
    ``validateMemoryPercentage``; its scheduler clamps it).
    """
    name = str(spec.get("name") or f"container-{index}")
    limits, requests = _resources(spec, name)

    def pick(field: str) -> object | None:
        return limits[field] if field in limits else requests.get(field)

    raw_gpu, raw_mem, raw_pct, raw_cores = (pick(f) for f in GPU_RESOURCES)
    raw_prio = pick(PRIORITY)
    priority = None if raw_prio is None else _integer(name, PRIORITY, raw_prio, low=0, high=None)
    max_gpus = settings.max_gpus_per_node
    none = ContainerRequest(name=name, index=index, init=init, gpu_count=0, priority=priority)
    asks_slice = any(f in limits for f in (GPUMEM, GPUMEM_PERCENTAGE, GPUCORES))
    if GPU not in limits and asks_slice and settings.default_gpu_num > 0:
        gpu_count = settings.default_gpu_num
    else:
        gpu_count = 0 if raw_gpu is None else _integer(name, GPU, raw_gpu, low=0, high=None)
    if max_gpus is not None and gpu_count > max_gpus:
        raise InvalidRequest(
            container=name,
            field=GPU,
            value=raw_gpu if raw_gpu is not None else gpu_count,
            reason=f"no node has more than {max_gpus} GPUs",
        )
    memory_mib = 0 if raw_mem is None else _integer(name, GPUMEM, raw_mem, low=0, high=None)
    percent = 0 if raw_pct is None else _integer(name, GPUMEM_PERCENTAGE, raw_pct, low=None)
    if admission and not 0 <= percent <= 100:
        # HAMi's webhook denies it (MutateAdmission, validateMemoryPercentage)
        raise InvalidRequest(
            container=name,
            field=GPUMEM_PERCENTAGE,
            value=raw_pct,
            reason="must be an integer between 0 and 100",
        )
    # HAMi's webhook takes the card as asked whole on the value as written (100 exactly)
    whole_card = percent == 100 if raw_pct is not None else raw_mem is None
    percent = min(max(percent, 0), 100)  # over 100 is 100, below 1 unset (HAMi's request)
    cores = None if raw_cores is None else _integer(name, GPUCORES, raw_cores, low=0, high=None)
    if gpu_count == 0 or memory_mib > INT32_MAX:
        return none
    if cores is None:
        cores = 100 if whole_card else settings.default_cores_percent
    if memory_mib > 0:
        percent = 0  # gpumem wins over gpumem-percentage
    elif percent == 0:
        if settings.default_memory_mib > 0:
            memory_mib = settings.default_memory_mib
        else:
            percent = 100
    return ContainerRequest(
        name=name,
        index=index,
        init=init,
        gpu_count=gpu_count,
        memory_mib=memory_mib,
        memory_percent=percent,
        cores_percent=min(cores, 100),
        priority=priority,
    )


def parse_dcu_container(
    spec: Mapping[str, Any],
    *,
    index: int,
    init: bool,
    settings: ResourceSettings,
    admission: bool = False,
) -> ContainerRequest | None:
    """One container's Hygon DCU request by HAMi's rules, None when it asks none.

    Source: pkg/device/hygon/device.go, ``GenerateResourceRequests`` (each resource read
    from the limits, else the requests):

    - ``hygon.com/dcunum``: the number of DCUs; absent or 0 asks none, and above int32 HAMi
      drops the request (so does vslice);
    - ``hygon.com/dcumem``: MiB per DCU, times ``memoryFactor`` when above 1
      (``settings.dcu_memory_factor``); absent or 0 is the whole card (100 %); above int32,
      before or after the factor, no request at all;
    - ``hygon.com/dcucores``: percent of the card, absent -> 100 (not ``defaultCores``:
      a DCU slice without cores is exclusive); over 100 books 100.

    There is no ``defaultGPUNum`` for DCUs and no percentage resource; ``admission`` is
    accepted for symmetry with ``parse_container`` and checks nothing more. Raises
    ``InvalidRequest`` naming the container, field and value for a negative or
    non-numeric value, or more DCUs than any node has.
    """
    del admission
    name = str(spec.get("name") or f"container-{index}")
    limits, requests = _resources(spec, name)

    def pick(field: str) -> object | None:
        return limits[field] if field in limits else requests.get(field)

    raw_num, raw_mem, raw_cores = (pick(f) for f in DCU_RESOURCES)
    if raw_num is None:
        return None
    count = _integer(name, DCUNUM, raw_num, low=0, high=None)
    max_gpus = settings.max_gpus_per_node
    if max_gpus is not None and count > max_gpus:
        raise InvalidRequest(
            container=name,
            field=DCUNUM,
            value=raw_num,
            reason=f"no node has more than {max_gpus} DCUs",
        )
    memory_mib = 0 if raw_mem is None else _integer(name, DCUMEM, raw_mem, low=0, high=None)
    cores = 100 if raw_cores is None else _integer(name, DCUCORES, raw_cores, low=0, high=None)
    if settings.dcu_memory_factor > 1:
        memory_mib *= settings.dcu_memory_factor
    if count == 0 or count > INT32_MAX or memory_mib > INT32_MAX or cores > INT32_MAX:
        return None
    return ContainerRequest(
        name=name,
        index=index,
        init=init,
        gpu_count=count,
        memory_mib=memory_mib,
        memory_percent=0 if memory_mib > 0 else 100,
        cores_percent=min(cores, 100),
        vendor="DCU",
    )


def parse_device_weights(value: str) -> tuple[int, int, int]:
    """``hami.io/device-scoring-weights`` (``"slot=1,core=1,memory=3"``) as ``(slot, core,
    memory)``: all three named once, in any order, whole numbers >= 0, not all 0.

    Source: HAMi pkg/util/device_scoring_weights.go, ``ParseDeviceScoringWeights``.
    Raises ``InvalidRequest`` naming the annotation, its value and HAMi's reason.
    """

    def bad(reason: str) -> InvalidRequest:
        return InvalidRequest(
            container="", field=keys.DEVICE_SCORING_WEIGHTS, value=value, reason=reason
        )

    parts = value.split(",")
    if len(parts) != 3:
        raise bad("expected slot, core, and memory weights")
    weights: dict[str, int] = {}
    for part in parts:
        key, eq, raw = part.strip().partition("=")
        if not eq:
            raise bad("expected key=value entries")
        key = key.strip()
        if key in weights:
            raise bad(f"duplicate {key!r} weight")
        text = raw.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if not (digits.isascii() and digits.isdigit()):
            raise bad(f"{key!r} weight must be an integer")
        if int(text) < 0:
            raise bad(f"{key!r} weight must not be negative")
        if key not in ("slot", "core", "memory"):
            raise bad(f"unknown weight {key!r}")
        weights[key] = int(text)
    if not any(weights.values()):
        raise bad("at least one weight must be positive")
    return (weights["slot"], weights["core"], weights["memory"])


def _split(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def pod_containers(spec: Mapping[str, Any]) -> list[tuple[str, int, bool, Mapping[str, Any]]]:
    """A pod spec's containers in HAMi's order, init containers first, as ``(list key,
    position in that list, init, container)``: the order of ``parse_pod``'s
    ``ContainerRequest``s and of HAMi's ``hami.io/vgpu-devices-*`` annotations.

    Raises ``InvalidRequest`` naming ``spec.<key>`` when a list or one of its entries is
    not what Kubernetes allows there.
    """
    out: list[tuple[str, int, bool, Mapping[str, Any]]] = []
    for init, key in ((True, "initContainers"), (False, "containers")):
        specs = spec.get(key) or []
        if not isinstance(specs, list):
            raise InvalidRequest(
                container="", field=f"spec.{key}", value=specs, reason="not a list"
            )
        for position, c in enumerate(specs):
            if not isinstance(c, Mapping):
                raise InvalidRequest(
                    container="", field=f"spec.{key}", value=c, reason="an entry is not an object"
                )
            out.append((key, position, init, c))
    return out


def parse_pod(
    pod: Mapping[str, Any], *, settings: ResourceSettings | None = None, admission: bool = False
) -> PodRequest:
    """A Kubernetes pod (JSON object with ``metadata`` and ``spec``) into a ``PodRequest``.

    Raises ``InvalidRequest`` (naming container, field and value) for any malformed GPU
    resource, CPU/memory quantity, or scheduler-policy annotation; ``admission=True`` adds
    the checks of HAMi's webhook (``parse_container``).
    """
    settings = settings or ResourceSettings()
    if not isinstance(pod, Mapping):
        raise InvalidRequest(container="", field="pod", value=pod, reason="not an object")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        raise InvalidRequest(
            container="", field="pod", value=pod, reason="metadata/spec not objects"
        )
    annos = meta.get("annotations") or {}
    if not isinstance(annos, Mapping):
        raise InvalidRequest(
            container="", field="metadata.annotations", value=annos, reason="not an object"
        )
    # every vendor's parse (libshared.vendors, which imports this module): NVIDIA's gives
    # each container's own request, the others' what it asks of them
    from libshared import vendors

    containers: list[ContainerRequest] = []
    vendor_requests: list[ContainerRequest] = []
    cpu_sum = mem_sum = cpu_init = mem_init = 0
    for index, (_, _, init, c) in enumerate(pod_containers(spec)):
        req = parse_container(c, index=index, init=init, settings=settings, admission=admission)
        containers.append(req)
        for vendor in vendors.VENDORS:
            if vendor is vendors.NVIDIA:
                continue
            other = vendor.parse(c, index=index, init=init, settings=settings, admission=admission)
            if other is not None and other.gpu_count > 0:
                vendor_requests.append(other)
        limits, requests = _resources(c, req.name)
        raw_cpu = requests.get("cpu", limits.get("cpu"))
        raw_mem = requests.get("memory", limits.get("memory"))
        cpu = 0 if raw_cpu is None else _cpu_milli(req.name, "cpu", raw_cpu)
        mem = 0 if raw_mem is None else _mib(req.name, "memory", raw_mem)
        if init:
            cpu_init, mem_init = max(cpu_init, cpu), max(mem_init, mem)
        else:
            cpu_sum, mem_sum = cpu_sum + cpu, mem_sum + mem
    policies: dict[str, str | None] = {}
    for key, allowed in (
        (keys.NODE_SCHEDULER_POLICY, POLICIES),
        (keys.GPU_SCHEDULER_POLICY, GPU_POLICIES),
    ):
        raw = annos.get(key)
        if raw is None:
            policies[key] = None
            continue
        # the GPU policy may be a list, "binpack,numa" (HAMi pkg/util PolicyContains)
        names = [p.strip() for p in str(raw).lower().split(",")]
        if (key == keys.NODE_SCHEDULER_POLICY and len(names) > 1) or any(
            p not in allowed for p in names
        ):
            raise InvalidRequest(
                container="", field=key, value=raw, reason=f"must be one of {allowed}"
            )
        policies[key] = ",".join(names)
    return PodRequest(
        uid=str(meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"),
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        containers=tuple(containers),
        cpu_milli=max(cpu_sum, cpu_init),
        memory_mib=max(mem_sum, mem_init),
        use_types=_split(str(annos.get(keys.USE_GPUTYPE, ""))),
        nouse_types=_split(str(annos.get(keys.NOUSE_GPUTYPE, ""))),
        use_uuids=_split(str(annos.get(keys.USE_GPUUUID, ""))),
        nouse_uuids=_split(str(annos.get(keys.NOUSE_GPUUUID, ""))),
        numa_bind=str(annos.get(keys.NUMA_BIND, "")) in GO_TRUE,
        vgpu_mode=None if keys.VGPU_MODE not in annos else str(annos[keys.VGPU_MODE]),
        device_weights=(
            (1, 1, 1)
            if keys.DEVICE_SCORING_WEIGHTS not in annos
            else parse_device_weights(str(annos[keys.DEVICE_SCORING_WEIGHTS]))
        ),
        node_policy=policies[keys.NODE_SCHEDULER_POLICY],
        gpu_policy=policies[keys.GPU_SCHEDULER_POLICY],
        vendor_requests=tuple(vendor_requests),
        vendor_selectors=tuple(
            VendorSelectors(
                vendor=v.name,
                use_types=_split(str(annos.get(v.use_type, ""))),
                nouse_types=_split(str(annos.get(v.nouse_type, ""))),
                use_uuids=_split(str(annos.get(v.use_uuid, ""))),
                nouse_uuids=_split(str(annos.get(v.nouse_uuid, ""))),
            )
            for v in vendors.VENDORS
            if any(r.vendor == v.name for r in vendor_requests)
        ),
    )
