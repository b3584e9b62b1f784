"""HAMi's own table-driven scheduler tests, ported case by case as data.

Each row names the HAMi test function and case (Project-HAMi/HAMi, main) it was translated
from. HAMi's ``DeviceUsage`` rows become a registered node whose usage is written into the
scheduler's view; HAMi's ``ContainerDeviceRequest`` becomes a ``ContainerRequest``
(``Memreq`` -> ``memory_mib``, ``MemPercentagereq`` -> ``memory_percent``, ``Coresreq`` ->
``cores_percent``, ``Nums`` -> ``gpu_count``); pod annotations become the ``PodRequest``
selectors. Where a case needed translating beyond that, its row says how.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from libshared.devices import Device, NodeDevices
from libshared.events import Placement
from libshared.ledgers import Slice, booked
from libshared.resources import ContainerRequest, PodRequest, VendorSelectors
from services.scheduler.core import fitting, scoring
from services.scheduler.core.clusters import Cluster
from services.scheduler.core.deciding import Scheduler


@dataclass(frozen=True)
class Dev:
    """One HAMi ``DeviceUsage`` row."""

    id: str
    count: int = 10
    totalmem: int = 8000
    totalcore: int = 100
    used: int = 0
    usedmem: int = 0
    usedcores: int = 0
    numa: int = 0
    type: str = "NVIDIA"
    health: bool = True
    index: int = 0
    cordoned: bool = False  # in HAMi's hami.io/device-cordon annotation of the node
    vendor: str = "NVIDIA"


@dataclass(frozen=True)
class Req:
    """One HAMi ``ContainerDeviceRequest`` (``pct=0`` with ``mem=0`` is the whole card)."""

    nums: int = 1
    mem: int = 0
    pct: int = 0
    cores: int = 0
    init: bool = False


@dataclass(frozen=True)
class Annos:
    use_uuids: tuple[str, ...] = ()
    nouse_uuids: tuple[str, ...] = ()
    use_types: tuple[str, ...] = ()
    numa_bind: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _cluster(nodes: dict[str, list[Dev]]) -> Cluster:
    c = Cluster(max_devices=max(len(d) for d in nodes.values()))
    for name, devs in nodes.items():
        n = c.upsert_node(
            NodeDevices(
                node=name,
                devices=tuple(
                    Device(
                        uuid=d.id,
                        index=d.index,
                        type=d.type,
                        memory_mib=d.totalmem,
                        cores_percent=d.totalcore,
                        split_count=d.count,
                        numa=d.numa,
                        healthy=d.health,
                        cordoned=d.cordoned,
                        vendor=d.vendor,
                    )
                    for d in devs
                ),
            )
        )
        # HAMi's rows state usage directly; write it into the view the same way
        for slot, d in enumerate(devs):
            c.dev_used[n, slot] = d.used
            c.dev_mem_used[n, slot] = d.usedmem
            c.dev_cores_used[n, slot] = d.usedcores
        c._refresh(n)
    return c


def _pod(reqs: list[Req], annos: Annos = Annos()) -> PodRequest:
    containers = []
    for i, r in enumerate(reqs):
        containers.append(
            ContainerRequest(
                name=f"c{i}",
                index=i,
                init=r.init,
                gpu_count=r.nums,
                memory_mib=r.mem,
                memory_percent=r.pct if r.mem else (r.pct or 100),
                cores_percent=r.cores,
            )
        )
    return PodRequest(
        uid="p",
        name="p",
        containers=tuple(containers),
        use_uuids=annos.use_uuids,
        nouse_uuids=annos.nouse_uuids,
        use_types=annos.use_types,
        numa_bind=annos.numa_bind,
    )


# --- pkg/device/nvidia/device_test.go TestDevices_Fit: Fit walks the list it is given --------

FIT = [
    # (case, devices, request, annotations, devices taken or None, reason)
    (
        "fit success",
        [Dev("dev-0", count=100, totalmem=128), Dev("dev-1", count=100, totalmem=128)],
        Req(1, mem=64, cores=50),
        Annos(),
        ["dev-1"],
        "",
    ),
    (
        "fit fail: memory not enough",
        [Dev("dev-0", count=100, totalmem=128)],
        Req(1, mem=512, cores=50),
        Annos(),
        None,
        "1/1 CardInsufficientMemory",
    ),
    (
        "fit fail: core not enough",
        [Dev("dev-0", count=100, totalmem=1024, usedcores=100)],
        Req(1, mem=512, cores=50),
        Annos(),
        None,
        "1/1 CardInsufficientCore",
    ),
    (
        # HAMi asks another request type; vslice's one type is told apart by use-gputype
        "fit fail: type mismatch",
        [Dev("dev-0", count=100, totalmem=128)],
        Req(1, mem=512, cores=50),
        Annos(use_types=("OtherType",)),
        None,
        "1/1 CardTypeMismatch",
    ),
    (
        "fit fail: user assign use uuid mismatch",
        [Dev("dev-1", count=100, totalmem=1280)],
        Req(2, mem=512, cores=50),
        Annos(use_uuids=("dev-0",)),
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "fit fail: user assign no use uuid match",
        [Dev("dev-0", count=100, totalmem=1280)],
        Req(2, mem=512, cores=50),
        Annos(nouse_uuids=("dev-0",)),
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "fit fail: card overused",
        [Dev("dev-0", count=100, totalmem=1280, used=100)],
        Req(1, mem=512, cores=50),
        Annos(),
        None,
        "1/1 CardTimeSlicingExhausted",
    ),
    (
        "fit success: but core limit can't exceed 100",
        [Dev("dev-0", count=100, totalmem=1280)],
        Req(1, mem=512, cores=120),
        Annos(),
        ["dev-0"],
        "",
    ),
    (
        "fit fail:  card exclusively",
        [Dev("dev-0", count=100, totalmem=1280, used=20)],
        Req(1, mem=512, cores=100),
        Annos(),
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "fit fail:  CardComputeUnitsExhausted",
        [Dev("dev-0", count=100, totalmem=1280, used=20, usedcores=100)],
        Req(1, mem=512, cores=0),
        Annos(),
        None,
        "1/1 CardComputeUnitsExhausted",
    ),
    (
        "fit fail:  AllocatedCardsInsufficientRequest",
        [Dev("dev-0", count=100, totalmem=1280, used=20, usedcores=10)],
        Req(2, mem=512, cores=20),
        Annos(),
        None,
        "1/1 AllocatedCardsInsufficientRequest",
    ),
    (
        "fit fail: partial allocation AllocatedCardsInsufficientRequest for multiple cards",
        [Dev("dev-0", count=100, totalmem=1280), Dev("dev-1", count=100, totalmem=1280, index=1)],
        Req(3, mem=512, cores=20),
        Annos(),
        None,
        "2/2 AllocatedCardsInsufficientRequest",
    ),
    (
        "fit success:  memory percentage",
        [Dev("dev-0", count=100, totalmem=1280, used=20, usedcores=10)],
        Req(1, pct=10, cores=20),
        Annos(),
        ["dev-0"],
        "",
    ),
    (
        "fit fail:  CardNotHealth",
        [Dev("dev-0", count=100, totalmem=1280, used=20, usedcores=10, health=False)],
        Req(1, pct=10, cores=20),
        Annos(),
        None,
        "1/1 CardNotHealth",
    ),
]


# --- pkg/device/nvidia/device_test.go TestFit_DeviceCordon: the node's hami.io/device-cordon
# lists dev-1 (or both); the node agent turns the annotation into Device.cordoned
# (services.nodeagent.core.registrations.parse_cordon, tested with HAMi's "dev-1, ")
FIT += [
    (
        "cordoned device is skipped, healthy sibling still fits",
        [
            Dev("dev-0", count=100, totalmem=128),
            Dev("dev-1", count=100, totalmem=128, cordoned=True),
        ],
        Req(1, mem=64, cores=50),
        Annos(),
        ["dev-0"],
        "",
    ),
    (
        "all devices cordoned fails with CardCordoned reason",
        [
            Dev("dev-0", count=100, totalmem=128, cordoned=True),
            Dev("dev-1", count=100, totalmem=128, cordoned=True),
        ],
        Req(1, mem=64, cores=50),
        Annos(),
        None,
        "2/2 CardCordoned",
    ),
    (
        "running pods on a cordoned device are unaffected",
        [
            Dev("dev-0", count=100, totalmem=128),
            Dev("dev-1", count=100, totalmem=128, used=1, usedcores=50, usedmem=64, cordoned=True),
        ],
        Req(1, mem=64, cores=50),
        Annos(),
        ["dev-0"],
        "",
    ),
    (
        "no annotation or no node info means nothing cordoned",
        [Dev("dev-0", count=100, totalmem=128), Dev("dev-1", count=100, totalmem=128)],
        Req(1, mem=64, cores=50),
        Annos(),
        ["dev-1"],
        "",
    ),
]


@pytest.mark.parametrize(
    ("case", "devices", "request_", "annos", "taken", "reason"), FIT, ids=[r[0] for r in FIT]
)
def test_fit_takes_the_devices_and_gives_the_reasons_hamis_fit_does(
    case: str, devices: list[Dev], request_: Req, annos: Annos, taken: list[str] | None, reason: str
) -> None:
    c = _cluster({"n": devices})
    pod = _pod([request_], annos)
    walk = list(range(len(devices)))[::-1]  # Fit walks the list it is given from the end
    picked, why = fitting.fit_container(c, 0, pod, pod.containers[0], fitting.node_use(c, 0), walk)
    assert why == reason
    got = None if picked is None else [devices[s].id for s in picked]
    assert got == taken


# --- pkg/device/hygon/device_test.go TestDevices_Fit: the DCU's Fit, same walk ----------------


def _dcu(id_: str, **kw: Any) -> Dev:
    return Dev(id_, type="DCU", vendor="DCU", **kw)


DCU_FIT = [
    # (case, devices, request, DCU annotations, GPU policy, devices taken or None, reason).
    # HAMi's "fit fail: type mismatch" (a request of another type handed to the DCU's Fit)
    # has no counterpart: vslice never hands a DCU request another vendor's devices.
    (
        "fit success",
        [_dcu("dev-0", count=100, totalmem=128), _dcu("dev-1", count=100, totalmem=128)],
        Req(1, mem=64, cores=50),
        {},
        "spread",
        ["dev-1"],
        "",
    ),
    (
        "fit fail: memory not enough",
        [_dcu("dev-0", count=100, totalmem=128)],
        Req(1, mem=512, cores=50),
        {},
        "spread",
        None,
        "1/1 CardInsufficientMemory",
    ),
    (
        "fit fail: core not enough",
        [_dcu("dev-0", count=100, totalmem=1024, usedcores=100)],
        Req(1, mem=512, cores=50),
        {},
        "spread",
        None,
        "1/1 CardInsufficientCore",
    ),
    (
        "fit fail: user assign use uuid mismatch",
        [_dcu("dev-1", count=100, totalmem=1280)],
        Req(2, mem=512, cores=50),
        {"hygon.com/use-gpuuuid": "dev-0"},
        "spread",
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "fit fail: user assign no use uuid match",
        [_dcu("dev-0", count=100, totalmem=1280)],
        Req(2, mem=512, cores=50),
        {"hygon.com/nouse-gpuuuid": "dev-0"},
        "spread",
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "fit fail: card overused",
        [_dcu("dev-0", count=100, used=100, totalmem=1280)],
        Req(1, mem=512, cores=50),
        {},
        "spread",
        None,
        "1/1 CardTimeSlicingExhausted",
    ),
    (
        "fit success: but core limit can't exceed 100",
        [_dcu("dev-0", count=100, totalmem=1280)],
        Req(1, mem=512, cores=120),
        {},
        "spread",
        ["dev-0"],
        "",
    ),
    (
        "fit fail:  card exclusively",
        [_dcu("dev-0", count=100, used=20, totalmem=1280)],
        Req(1, mem=512, cores=100),
        {},
        "spread",
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "fit fail:  CardComputeUnitsExhausted",
        [_dcu("dev-0", count=100, used=20, totalmem=1280, usedcores=100)],
        Req(1, mem=512, cores=0),
        {},
        "spread",
        None,
        "1/1 CardComputeUnitsExhausted",
    ),
    (
        "fit fail:  AllocatedCardsInsufficientRequest",
        [_dcu("dev-0", count=100, used=20, totalmem=1280, usedcores=10)],
        Req(2, mem=512, cores=20),
        {},
        "spread",
        None,
        "1/1 AllocatedCardsInsufficientRequest",
    ),
    (
        "fit success:  memory percentage",
        [_dcu("dev-0", count=100, used=20, totalmem=1280, usedcores=10)],
        Req(1, pct=10, cores=20),
        {},
        "spread",
        ["dev-0"],
        "",
    ),
    (
        "mutex policy rejects used device",
        [_dcu("dev-0", count=2, used=1, totalmem=128)],
        Req(1, mem=64, cores=50),
        {},
        "mutex",
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "fit fail: partial allocation AllocatedCardsInsufficientRequest for multiple cards",
        [_dcu("dev-0", count=100, totalmem=1280), _dcu("dev-1", index=1, count=100, totalmem=1280)],
        Req(3, mem=512, cores=20),
        {},
        "spread",
        None,
        "2/2 AllocatedCardsInsufficientRequest",
    ),
    (
        "fit fail: CardNotHealth",
        [_dcu("dev-0", count=100, totalmem=1280, health=False)],
        Req(1, mem=512, cores=50),
        {},
        "spread",
        None,
        "1/1 CardNotHealth",
    ),
]


@pytest.mark.parametrize(
    ("case", "devices", "request_", "annos", "policy", "taken", "reason"),
    DCU_FIT,
    ids=[r[0] for r in DCU_FIT],
)
def test_a_dcu_is_fitted_as_hamis_hygon_fit_fits_it(
    case: str,
    devices: list[Dev],
    request_: Req,
    annos: dict[str, str],
    policy: str,
    taken: list[str] | None,
    reason: str,
) -> None:
    c = _cluster({"n": devices})
    sel = VendorSelectors(
        vendor="DCU",
        use_uuids=tuple(x for x in annos.get("hygon.com/use-gpuuuid", "").split(",") if x),
        nouse_uuids=tuple(x for x in annos.get("hygon.com/nouse-gpuuuid", "").split(",") if x),
    )
    container = ContainerRequest(
        name="c0",
        index=0,
        init=False,
        gpu_count=request_.nums,
        memory_mib=request_.mem,
        memory_percent=request_.pct if request_.mem == 0 else 0,
        cores_percent=min(request_.cores, 100),
        vendor="DCU",
    )
    pod = PodRequest(uid="p", vendor_requests=(container,), vendor_selectors=(sel,))
    walk = list(range(len(devices)))[::-1]
    picked, why = fitting.fit_container(
        c, 0, pod, container, fitting.node_use(c, 0), walk, policy=policy
    )
    assert why == reason
    assert (None if picked is None else [devices[s].id for s in picked]) == taken


def test_a_zero_percentage_books_the_whole_card() -> None:
    """TestZeroMemoryPercentageIsAccountedAsWholeCard: a card of 11264 MiB is booked whole,
    and an almost full card does not fit."""
    for usedmem, fits in ((0, True), (11260, False)):
        c = _cluster({"n": [Dev("dev-0", totalmem=11264, usedmem=usedmem)]})
        pod = _pod([Req(1)])  # gpumem-percentage 0 is unset: the whole card
        picked, why = fitting.fit_node(c, 0, pod, gpu_policy="spread")
        assert (picked is not None) == fits, why
        if fits:
            assert pod.containers[0].memory_on(11264) == 11264
        else:
            assert "CardInsufficientMemory" in why


# --- pkg/scheduler/policy/gpu_policy_test.go TestDeviceUsageList_Less -----------------------

LESS = [
    # (case, policy, numa_bind, device i, device j, i sorts before j); a device is
    # (score, numa, index, used)
    ("Binpack policy with same Numa", "binpack", False, (10, 0, 0, 10), (20, 0, 0, 20), True),
    (
        "Binpack: score primary, lower score sorts first across NUMA",
        "binpack",
        False,
        (10, 1, 0, 10),
        (20, 0, 0, 20),
        True,
    ),
    (
        "Binpack: score primary, higher score sorts last even on lower NUMA",
        "binpack",
        False,
        (10, 0, 0, 10),
        (20, 1, 0, 20),
        True,
    ),
    (
        "Binpack: NUMA tiebreaker when scores equal",
        "binpack",
        False,
        (15, 0, 0, 0),
        (15, 1, 0, 0),
        True,
    ),
    (
        "Binpack: score primary over NUMA, high-NUMA high-score sorts last",
        "binpack",
        False,
        (20, 1, 0, 0),
        (10, 0, 0, 0),
        False,
    ),
    (
        "Spread: score primary, higher score sorts first",
        "spread",
        False,
        (10, 0, 0, 10),
        (20, 0, 0, 20),
        False,
    ),
    (
        "Spread: score primary, lower score sorts last across NUMA",
        "spread",
        False,
        (10, 1, 0, 10),
        (20, 0, 0, 20),
        False,
    ),
    (
        "Spread: score primary over NUMA, high-NUMA high-score sorts first",
        "spread",
        False,
        (20, 1, 0, 0),
        (10, 0, 0, 0),
        True,
    ),
    (
        "Spread: NUMA tiebreaker when scores equal",
        "spread",
        False,
        (15, 0, 0, 0),
        (15, 1, 0, 0),
        True,
    ),
    (
        "Binpack+NumaBind: NUMA primary, higher NUMA sorts first regardless of Score",
        "binpack",
        True,
        (5, 1, 0, 0),
        (99, 0, 0, 0),
        True,
    ),
    (
        "Binpack+NumaBind: same NUMA falls back to lower Score first",
        "binpack",
        True,
        (10, 0, 0, 0),
        (20, 0, 0, 0),
        True,
    ),
    (
        "Spread+NumaBind: NUMA primary, lower NUMA sorts first regardless of Score",
        "spread",
        True,
        (5, 0, 0, 0),
        (99, 1, 0, 0),
        True,
    ),
    (
        "Spread+NumaBind: same NUMA falls back to higher Score first",
        "spread",
        True,
        (20, 0, 0, 0),
        (10, 0, 0, 0),
        True,
    ),
    ("Mutex: busy GPU sorts before idle GPU", "mutex", False, (0, 0, 0, 2), (0, 0, 0, 0), True),
    ("Mutex: idle GPU sorts after busy GPU", "mutex", False, (0, 0, 0, 0), (0, 0, 0, 1), False),
    ("Mutex: NUMA tiebreaker when both idle", "mutex", False, (0, 0, 0, 0), (0, 1, 0, 0), True),
    (
        "Bare numa: NUMA is the sort key regardless of score",
        "numa",
        False,
        (99, 0, 0, 0),
        (5, 1, 0, 0),
        True,
    ),
    (
        "Bare numa: same NUMA falls to deterministic Index tiebreak",
        "numa",
        False,
        (10, 0, 3, 0),
        (20, 0, 1, 0),
        False,
    ),
    (
        "Chain binpack,numa: score primary, numa tiebreak when scores equal",
        "binpack,numa",
        False,
        (15, 0, 0, 0),
        (15, 1, 0, 0),
        True,
    ),
    (
        "Chain spread,numa: score primary, numa tiebreak when scores equal",
        "spread,numa",
        False,
        (15, 0, 0, 0),
        (15, 1, 0, 0),
        True,
    ),
    (
        "Chain numa,spread: numa primary regardless of score",
        "numa,spread",
        False,
        (5, 1, 0, 0),
        (99, 0, 0, 0),
        False,
    ),
    (
        "Chain numa,spread: same NUMA falls back to spread (higher score first)",
        "numa,spread",
        False,
        (20, 0, 0, 0),
        (10, 0, 0, 0),
        True,
    ),
    (
        "Chain mutex,spread: mutex is a Fit() filter, not a sort key; spread decides order",
        "mutex,spread",
        False,
        (10, 0, 0, 5),
        (20, 0, 0, 0),
        False,
    ),
    (
        "Chain with only filter tokens (mutex,topology-aware) falls back to spread",
        "mutex,topology-aware",
        False,
        (10, 0, 0, 0),
        (20, 0, 0, 0),
        False,
    ),
    (
        "Chain binpack,numa: deterministic Index tiebreak when score and numa both tie",
        "binpack,numa",
        False,
        (10, 0, 5, 0),
        (10, 0, 2, 0),
        False,
    ),
    (
        "Chain binpack,spread + NumaBind: numa forced primary to keep groups contiguous",
        "binpack,spread",
        True,
        (99, 0, 0, 0),
        (5, 1, 0, 0),
        True,
    ),
    (
        "Chain spread,numa + NumaBind: numa moved to front, spread breaks same-NUMA ties",
        "spread,numa",
        True,
        (20, 0, 0, 0),
        (10, 0, 0, 0),
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "policy", "numa_bind", "a", "b", "a_first"), LESS, ids=[r[0] for r in LESS]
)
def test_devices_sort_as_hamis_device_list_less_orders_them(
    case: str,
    policy: str,
    numa_bind: bool,
    a: tuple[int, int, int, int],
    b: tuple[int, int, int, int],
    a_first: bool,
) -> None:
    def key(d: tuple[int, int, int, int]) -> tuple[float, ...]:
        score, numa, index, used = d
        return fitting.sort_key(
            policy, numa_bind=numa_bind, score=float(score), numa=numa, index=index, used=used
        )

    assert (key(a) < key(b)) == a_first


# --- pkg/scheduler/policy/gpu_policy_test.go TestComputeScore -------------------------------

SCORES = [
    # (case, device, request, score): HAMi counts the request only on a device of its type
    (
        "Zero capacity device returns score 0 without panic",
        Dev("d", count=0, totalcore=0, totalmem=0, type="type1"),
        Req(0),
        0.0,
    ),
    (
        "Partial zero capacity (Count=0) returns score 0 without panic",
        Dev("d", count=0, totalcore=8, totalmem=4096, type="type1"),
        Req(0),
        0.0,
    ),
    (
        # a device of another type than the request's: its usage alone
        "ContainerDeviceRequests has no data",
        Dev(
            "d", count=10, totalcore=4, totalmem=8192, used=2, usedcores=1, usedmem=2048, type="t1"
        ),
        Req(1, mem=1024, cores=1),
        7.0,
    ),
    (
        # the request's type is vslice's NVIDIA, so the device's type is NVIDIA here
        "Filter other device types and ignore Nums for slots",
        Dev("d", count=10, totalcore=4, totalmem=8192, used=2, usedcores=1, usedmem=2048),
        Req(4, mem=1024, cores=1),
        11.75,
    ),
    (
        "MemPercentagereq calculation evaluates correctly",
        Dev("d", count=10, totalcore=10, totalmem=10000),
        Req(1, pct=50, cores=2),
        8.0,
    ),
]


@pytest.mark.parametrize(
    ("case", "device", "request_", "score"), SCORES, ids=[r[0] for r in SCORES]
)
def test_a_device_scores_as_hamis_compute_score(
    case: str, device: Dev, request_: Req, score: float
) -> None:
    c = _cluster({"n": [device]})
    container = _pod([request_]).containers[0]
    got = fitting.device_score(c, 0, 0, fitting.node_use(c, 0), container)
    assert isinstance(got, np.float32)
    assert got == np.float32(score)


# --- pkg/scheduler/policy/node_policy_test.go TestComputeDefaultScore -----------------------


@pytest.mark.parametrize(
    ("case", "devices", "score"),
    [
        (
            "Zero capacity devices returns score 0 without panic",
            [Dev("a", count=0, totalcore=0, totalmem=0)],
            0.0,
        ),
        (
            "Test with devices",
            [
                Dev(
                    "a", used=50, count=100, usedmem=100, totalmem=100, totalcore=100, usedcores=100
                ),
                Dev(
                    "b", used=75, count=150, usedmem=200, totalmem=200, totalcore=200, usedcores=200
                ),
            ],
            25.0,
        ),
    ],
)
def test_a_node_scores_as_hamis_compute_default_score(
    case: str, devices: list[Dev], score: float
) -> None:
    assert scoring.hami_node_score(_cluster({"n": devices}))[0] == pytest.approx(score)


# --- pkg/scheduler/numa_sort_test.go ---------------------------------------------------------


def test_numa_bind_sort_preserves_affinity() -> None:
    """TestNumaBindSortPreservesAffinity: A(n0, score 5), B(n0, score 1), C(n1, score 3);
    scores here from usage (used slots 5, 1, 3 of 10). A 2-card numa-bind request fits
    only on NUMA 0 and takes A and B."""
    devs = [Dev("A_n0", used=5), Dev("B_n0", used=1), Dev("C_n1", used=3, numa=1)]
    pod = _pod([Req(2, mem=100, cores=10)], Annos(numa_bind=True))
    c = _cluster({"n": devs})
    picked, why = fitting.fit_node(c, 0, pod, gpu_policy="spread")
    assert picked is not None, why
    assert sorted(devs[s].id for s in picked[0]) == ["A_n0", "B_n0"]


def test_score_primary_selects_across_numa() -> None:
    """TestScorePrimarySelectsAcrossNuma (#1806): without numa-bind the idlest device wins
    whatever its NUMA node: P(n0, score 1), Q(n1, 8), R(n1, 5) -> P."""
    devs = [Dev("P_n0", used=1), Dev("Q_n1", used=8, numa=1), Dev("R_n1", used=5, numa=1)]
    c = _cluster({"n": devs})
    picked, _ = fitting.fit_node(c, 0, _pod([Req(1, mem=100, cores=10)]), gpu_policy="spread")
    assert picked is not None
    assert [devs[s].id for s in picked[0]] == ["P_n0"]


# --- pkg/scheduler/score_test.go Test_calcScore / Test_fitInDevices ------------------------

CALC = [
    # (case, gpu policy, devices of node1, containers, devices per container or reason)
    (
        "one node two device one pod one container use one device",
        "spread",
        [Dev("uuid1"), Dev("uuid2")],
        [Req(1, mem=1000, cores=30)],
        [["uuid2"]],
    ),
    (
        "init container requests more memory than any single device has (should filter node)",
        "binpack",
        [Dev("uuid1", usedmem=7500), Dev("uuid2", usedmem=7500)],
        [Req(1, mem=4000, cores=30, init=True), Req(1, mem=100, cores=30)],
        "2/2 CardInsufficientMemory",
    ),
    (
        "one node two device one pod two containers use two device with spread,should not in "
        "same device.",
        "spread",
        [Dev("uuid1"), Dev("uuid2")],
        [Req(1, mem=8000, cores=30), Req(1, mem=1000, cores=30)],
        [["uuid2"], ["uuid1"]],
    ),
    (
        "two init containers, first has no device request, second does - tests slot "
        "alignment (issue #1667)",
        "binpack",
        [Dev("uuid1")],
        [Req(1, mem=1000, cores=30, init=True), Req(1, mem=1000, cores=30)],
        [["uuid1"], ["uuid1"]],
    ),
    (
        "one node two devices, pod has one init container (uses 1 device) and one regular "
        "container (uses 1 device) - tests InitContainer capacity reset",
        "binpack",
        [Dev("uuid1"), Dev("uuid2")],
        [Req(1, mem=1000, cores=30, init=True), Req(1, mem=1000, cores=30)],
        [["uuid2"], ["uuid2"]],
    ),
    (
        "init container requests MORE than app container - needsInitClone=true path",
        "binpack",
        [Dev("uuid1"), Dev("uuid2")],
        [Req(2, mem=1000, cores=30, init=True), Req(1, mem=1000, cores=30)],
        [["uuid2", "uuid1"], ["uuid2"]],
    ),
    (
        "init container requests more cores than any single device has (should filter node)",
        "binpack",
        [Dev("uuid1", usedcores=80), Dev("uuid2", usedcores=80)],
        [Req(1, mem=1000, cores=30, init=True), Req(1, mem=1000, cores=10)],
        "2/2 CardInsufficientCore",
    ),
    (
        # Test_fitInDevices
        "request devices nums cannot exceed the total number of devices on the node",
        "binpack",
        [Dev("uuid1"), Dev("uuid2")],
        [Req(3, mem=1000, cores=30)],
        "NodeInsufficientDevice",
    ),
]


@pytest.mark.parametrize(
    ("case", "policy", "devices", "requests", "want"), CALC, ids=[r[0][:60] for r in CALC]
)
def test_a_pod_is_fitted_on_a_node_as_hamis_score_node_fits_it(
    case: str, policy: str, devices: list[Dev], requests: list[Req], want: object
) -> None:
    c = _cluster({"node1": devices})
    picked, why = fitting.fit_node(c, 0, _pod(requests), gpu_policy=policy)
    if isinstance(want, str):
        assert (picked, why) == (None, want)
    else:
        assert picked is not None, why
        assert [[devices[s].id for s in slots] for slots in picked] == want


def test_hamis_binpack_prefers_a_busy_big_node_to_an_empty_small_one() -> None:
    """HAMi's node score is the usage before the pod (ComputeDefaultScore runs before
    allocateAppContainers): binpack picks the 4-GPU node holding one slice, not the empty
    1-GPU node that adding the pod would fill more."""
    c = _cluster(
        {
            "empty-1gpu": [Dev("e0")],
            "busy-4gpu": [Dev("b0", used=1, usedmem=1000, usedcores=10)]
            + [Dev(f"b{i}", index=i) for i in (1, 2, 3)],
        }
    )
    d = Scheduler(c, policy="hami").decide(_pod([Req(1, mem=1000, cores=10)]))
    assert isinstance(d, Placement)
    assert d.node == "busy-4gpu"
    d = Scheduler(c, policy="hami-spread").decide(_pod([Req(1, mem=1000, cores=10)]))
    assert isinstance(d, Placement)
    assert d.node == "empty-1gpu"


def test_an_init_container_books_its_peak_not_its_sum() -> None:
    """An init container of 5000 MiB and an app container of 4000 MiB on one card book
    5000 MiB (HAMi's CollapseInitContainerUsage), so a second such pod still fits a
    10000 MiB card beside it (summed, 9000 MiB each, it would not)."""
    c = _cluster({"n": [Dev("g", totalmem=10000)]})
    s = Scheduler(c, policy="hami")
    for uid in ("a", "b"):
        pod = _pod([Req(1, mem=5000, init=True), Req(1, mem=4000)])
        pod = PodRequest(uid=uid, name=uid, containers=pod.containers)
        d = s.decide(pod)
        assert isinstance(d, Placement), d
        c.apply(d)
        assert [sl.init for sl in d.slices] == [True, False]
    # each pod books its init peak, 5000 MiB, not 9000: both fit the card
    assert int(c.dev_mem_used[0, 0]) == 5000 + 5000
    assert int(c.dev_used[0, 0]) == 2


# --- pkg/device/initContainer_test.go CollapseInitContainerUsage ----------------------------


def _slice(uuid: str, mem: int, cores: int, *, init: bool, index: int = 0) -> Slice:
    return Slice(
        pod_uid="p",
        namespace="d",
        pod="p",
        container=f"c{index}",
        container_index=index,
        uuid=uuid,
        device_index=0,
        memory_mib=mem,
        cores_percent=cores,
        init=init,
    )


COLLAPSE = [
    # (case, slices (uuid, mem, cores, init), booked per uuid (mem, cores, slots))
    (
        "TestCollapseInitContainerUsage_MixedInitAndApp",
        [("gpu0", 500, 50, True), ("gpu0", 100, 10, False)],
        {"gpu0": (500, 50, 1)},
    ),
    (
        "TestCollapseInitContainerUsage_InitLargerThanApp",
        [("gpu0", 1000, 80, True), ("gpu0", 200, 20, False)],
        {"gpu0": (1000, 80, 1)},
    ),
    (
        "TestCollapseInitContainerUsage_AppLargerThanInit",
        [("gpu0", 100, 10, True), ("gpu0", 200, 20, False), ("gpu0", 300, 30, False)],
        {"gpu0": (500, 50, 2)},
    ),
    (
        "TestCollapseInitContainerUsage_MultipleInitContainersPeak",
        [
            ("gpu0", 100, 10, True),
            ("gpu0", 300, 30, True),
            ("gpu0", 200, 20, True),
            ("gpu0", 50, 5, False),
        ],
        {"gpu0": (300, 30, 1)},
    ),
    (
        "TestCollapseInitContainerUsage_MultipleDevicesSameContainer",
        [
            ("gpu0", 200, 20, True),
            ("gpu1", 300, 30, True),
            ("gpu0", 100, 10, False),
            ("gpu1", 150, 15, False),
        ],
        {"gpu0": (200, 20, 1), "gpu1": (300, 30, 1)},
    ),
    (
        "TestCollapseInitContainerUsage_MultiAppSameGPUSlots",
        [("gpu0", 100, 10, False), ("gpu0", 100, 10, False), ("gpu0", 100, 10, False)],
        {"gpu0": (300, 30, 3)},
    ),
]


@pytest.mark.parametrize(("case", "slices", "want"), COLLAPSE, ids=[r[0] for r in COLLAPSE])
def test_a_pods_slices_book_as_hamis_collapse_init_container_usage(
    case: str, slices: list[tuple[str, int, int, bool]], want: dict[str, tuple[int, int, int]]
) -> None:
    got = booked([_slice(u, m, k, init=i, index=n) for n, (u, m, k, i) in enumerate(slices)])
    assert got == want


def test_numa_not_fit_counts_the_devices_given_up() -> None:
    """Test_fitInCertainDevice "numa not fit": two cards on NUMA 0 and 1, a 2-card
    numa-bind request; the card taken on NUMA 1 is given up at NUMA 0 (NumaNotFit), the one
    taken there is too few (AllocatedCardsInsufficientRequest)."""
    devs = [
        Dev(
            f"test-{i}",
            numa=i,
            used=1,
            count=4,
            totalmem=8192,
            usedmem=2048,
            usedcores=1,
            totalcore=4,
        )
        for i in (0, 1)
    ]
    c = _cluster({"node-1": devs})
    pod = _pod([Req(2, mem=1024, cores=1)], Annos(numa_bind=True, use_types=("NVIDIA",)))
    assert fitting.fit_node(c, 0, pod, gpu_policy="spread") == (
        None,
        "1/2 AllocatedCardsInsufficientRequest, 1/2 NumaNotFit",
    )


def test_numa_switching_starts_the_choice_again() -> None:
    """TestFit_NumaSwitching: walked dev-2 (NUMA 0), dev-1, dev-0 (NUMA 1); dev-2 is given
    up at the switch and the pair comes from NUMA 1, in walk order."""
    devs = [Dev("dev-0", numa=1, totalmem=8192), Dev("dev-1", numa=1, index=1, totalmem=8192)]
    devs.append(Dev("dev-2", numa=0, index=2, totalmem=8192))
    c = _cluster({"n": devs})
    pod = _pod([Req(2, mem=100, cores=10)], Annos(numa_bind=True))
    picked, _ = fitting.fit_container(
        c, 0, pod, pod.containers[0], fitting.node_use(c, 0), [2, 1, 0]
    )
    assert picked is not None
    assert [devs[s].id for s in picked] == ["dev-1", "dev-0"]


@pytest.mark.parametrize(("nums", "taken"), [(1, ["idle"]), (2, None)])
def test_mutex_takes_only_devices_nobody_uses(nums: int, taken: list[str] | None) -> None:
    """TestFit_MutexPolicy: one card used, one idle; mutex takes the idle one and cannot
    give two."""
    devs = [Dev("used", used=1, totalmem=8192), Dev("idle", index=1, totalmem=8192)]
    c = _cluster({"n": devs})
    pod = _pod([Req(nums, mem=100, cores=10)])
    picked, why = fitting.fit_container(
        c, 0, pod, pod.containers[0], fitting.node_use(c, 0), [1, 0], policy="mutex"
    )
    assert (None if picked is None else [devs[s].id for s in picked]) == taken
    if taken is None:
        assert "1/2 ExclusiveDeviceAllocateConflict" in why
    # and through the scheduler, the annotation decides the same
    annotated = PodRequest(uid="m", containers=pod.containers, gpu_policy="mutex")
    assert Scheduler(c).filter(annotated).feasible == ([] if taken is None else ["n"])


# --- pkg/device/nvidia/device_test.go TestFit_Topology* -------------------------------------

LINKS = {
    "scores": {
        "dev-0": {"dev-1": 100, "dev-2": 200},
        "dev-1": {"dev-0": 100, "dev-2": 150},
        "dev-2": {"dev-0": 200, "dev-1": 150},
    },
    "zero": {
        "dev-0": {"dev-1": 0, "dev-2": 0},
        "dev-1": {"dev-0": 0, "dev-2": 0},
        "dev-2": {"dev-0": 0, "dev-1": 0},
    },
    "negative": {
        "dev-0": {"dev-1": -5, "dev-2": -3},
        "dev-1": {"dev-0": -5, "dev-2": -1},
        "dev-2": {"dev-0": -3, "dev-1": -1},
    },
    "none": {},
}

TOPOLOGY = [
    # (case, devices, link scores, GPUs asked, devices taken; sorted when HAMi checks a set)
    ("TestFit_TopologyExactMatch", 2, "none", 2, ["dev-0", "dev-1"]),
    ("TestFit_TopologyWorstSingleCard", 3, "scores", 1, ["dev-1"]),
    ("TestFit_TopologyBestCombination", 3, "scores", 2, ["dev-0", "dev-2"]),
    ("TestFit_TopologyBestCombinationZeroScores", 3, "zero", 2, None),
    ("TestFit_TopologyNegativeScores/SingleGPU", 3, "negative", 1, ["dev-0"]),
    ("TestFit_TopologyNegativeScores/MultiGPU", 3, "negative", 2, ["dev-1", "dev-2"]),
]


@pytest.mark.parametrize(
    ("case", "count", "links", "nums", "taken"), TOPOLOGY, ids=[r[0] for r in TOPOLOGY]
)
def test_topology_aware_chooses_by_link_scores_as_hamis_fit(
    case: str, count: int, links: str, nums: int, taken: list[str] | None
) -> None:
    scores = LINKS[links]
    devices = tuple(
        Device(
            uuid=f"dev-{i}",
            index=i,
            type="NVIDIA",
            memory_mib=8192,
            pair_scores=tuple(sorted(scores.get(f"dev-{i}", {}).items())),
        )
        for i in range(count)
    )
    c = Cluster(max_devices=count)
    c.upsert_node(NodeDevices(node="n", devices=devices))
    pod = _pod([Req(nums, mem=100, cores=10)])
    walk = list(range(count))[::-1]
    picked, why = fitting.fit_container(
        c, 0, pod, pod.containers[0], fitting.node_use(c, 0), walk, policy="topology-aware"
    )
    assert picked is not None, why
    assert len(picked) == nums
    if taken is not None:
        assert sorted(devices[s].uuid for s in picked) == taken


# --- pkg/scheduler/policy/gpu_policy_test.go TestComputeScoreWithResourceWeights ------------

RESOURCE_WEIGHTS = [
    # (case, weights, score of gpu-a, of gpu-b, last under binpack, last under spread)
    ("default weights preserve current score", (1, 1, 1), 16.0, 15.0, None, None),
    ("memory weight changes the device preference", (1, 1, 3), 26.0, 27.0, "gpu-b", "gpu-a"),
    (
        "core weight can independently change the device preference",
        (1, 3, 1),
        34.0,
        17.0,
        "gpu-a",
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "weights", "score_a", "score_b", "binpack_last", "spread_last"),
    RESOURCE_WEIGHTS,
    ids=[r[0] for r in RESOURCE_WEIGHTS],
)
def test_device_scores_follow_the_pods_weights_as_hamis_compute_score(
    case: str,
    weights: tuple[int, int, int],
    score_a: float,
    score_b: float,
    binpack_last: str | None,
    spread_last: str | None,
) -> None:
    # the request is counted (device type NVIDIA, as the test's matching "type1")
    devs = [
        Dev("gpu-a", count=10, totalcore=100, totalmem=100, used=1, usedcores=90, usedmem=10),
        Dev("gpu-b", count=10, totalcore=100, totalmem=100, used=7, usedcores=10, usedmem=20),
    ]
    c = _cluster({"n": devs})
    container = _pod([Req(1, pct=40, cores=0)]).containers[0]
    use = fitting.node_use(c, 0)
    scores = [fitting.device_score(c, 0, s, use, container, weights) for s in (0, 1)]
    assert scores == [np.float32(score_a), np.float32(score_b)]
    for policy, last in (("binpack", binpack_last), ("spread", spread_last)):
        if last is not None:
            order = fitting.sort_devices(
                c, 0, [0, 1], policy, use, container, numa_bind=False, weights=weights
            )
            assert devs[order[-1]].id == last


def test_numa_ordering_remains_independent_from_weighted_score() -> None:
    """TestComputeScoreWithResourceWeights "NUMA ordering remains independent from weighted
    score": under numa-bind binpack, Fit takes gpu-a (NUMA 0) though gpu-b scores higher."""
    devs = [
        Dev("gpu-a", totalcore=100, totalmem=100, used=1, usedcores=90, usedmem=10, numa=0),
        Dev("gpu-b", totalcore=100, totalmem=100, used=7, usedcores=10, usedmem=20, numa=1),
    ]
    c = _cluster({"n": devs})
    container = _pod([Req(1, pct=40, cores=0)]).containers[0]
    order = fitting.sort_devices(
        c,
        0,
        [0, 1],
        "binpack",
        fitting.node_use(c, 0),
        container,
        numa_bind=True,
        weights=(1, 1, 3),
    )
    assert devs[order[-1]].id == "gpu-a"


@pytest.mark.parametrize(
    ("case", "mode", "fits"),
    [
        ("AllocateMode does not contain device mode", "mps", False),
        ("AllocateMode contains device mode", "hami-core", True),
    ],
)
def test_vgpu_mode_selects_devices_as_hamis_check_type(case: str, mode: str, fits: bool) -> None:
    """TestCheckType_AllocateMode: a device of mode hami-core and nvidia.com/vgpu-mode."""
    c = Cluster(max_devices=1)
    dev = Device(uuid="g", index=0, type="NVIDIA-A100", memory_mib=8000, mode="hami-core")
    c.upsert_node(NodeDevices(node="n", devices=(dev,)))
    pod = PodRequest(uid="p", containers=_pod([Req(1, mem=100)]).containers, vgpu_mode=mode)
    result = Scheduler(c).filter(pod)
    assert result.feasible == (["n"] if fits else [])
    if not fits:
        assert result.failed["n"] == "1/1 CardTypeMismatch"
