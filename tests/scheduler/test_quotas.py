"""Namespace quotas, the pure rules: which ResourceQuota keys count, what a pod is charged,
when a charge is refused and why, and how the charges follow the ledger.

The fit cases are HAMi's ``TestFitQuota`` and ``TestFitQuotaExplicitZeroBlocks``
(Project-HAMi/HAMi ``pkg/device/quota_test.go``) as data, memory factor 1 (NVIDIA)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from libshared import quotas as schema
from libshared.events import Placement
from libshared.ledgers import NodeLedger, PodCharge, Slice
from services.scheduler.core import quotas


def resource_quota(hard: dict[str, Any], *, namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpu", "namespace": namespace},
        "spec": {"hard": hard},
    }


def sl(
    pod: str,
    uuid: str,
    memory_mib: int,
    cores: int,
    *,
    init: bool = False,
    container: int = 0,
    namespace: str = "team-a",
) -> Slice:
    return Slice(
        pod_uid=pod,
        namespace=namespace,
        pod=pod,
        container=f"c{container}",
        container_index=container,
        uuid=uuid,
        device_index=int(uuid[-1]),
        memory_mib=memory_mib,
        cores_percent=cores,
        init=init,
    )


def charge(pod: str, memory_mib: int, cores: int = 0) -> schema.QuotaCharge:
    return schema.QuotaCharge(pod_uid=pod, memory_mib=memory_mib, cores_percent=cores)


LIMITS_TABLE = [
    # (what, spec.hard, limits, problems)
    (
        "HAMi's keys",
        {"limits.nvidia.com/gpumem": "8000", "limits.nvidia.com/gpucores": 200},
        quotas.Limits(memory_mib=8000, cores_percent=200),
        0,
    ),
    ("a quantity suffix", {"limits.nvidia.com/gpumem": "8k"}, quotas.Limits(memory_mib=8000), 0),
    ("an explicit zero", {"limits.nvidia.com/gpumem": "0"}, quotas.Limits(memory_mib=0), 0),
    ("requests. keys are not HAMi's", {"requests.nvidia.com/gpumem": "8000"}, quotas.Limits(), 0),
    ("the bare resource name is not HAMi's", {"nvidia.com/gpumem": "8000"}, quotas.Limits(), 0),
    ("other resources", {"limits.cpu": "4", "pods": "10"}, quotas.Limits(), 0),
    ("a fraction is skipped", {"limits.nvidia.com/gpumem": "0.5"}, quotas.Limits(), 1),
    (
        "a non-quantity is skipped",
        {"limits.nvidia.com/gpucores": "lots", "limits.nvidia.com/gpumem": 100},
        quotas.Limits(memory_mib=100),
        1,
    ),
    ("a negative is skipped", {"limits.nvidia.com/gpumem": "-1"}, quotas.Limits(), 1),
]


@pytest.mark.parametrize(("what", "hard", "limits", "problems"), LIMITS_TABLE)
def test_only_limits_keys_of_gpumem_and_gpucores_with_whole_values_set_a_limit(
    what: str, hard: dict[str, Any], limits: quotas.Limits, problems: int
) -> None:
    got, found = quotas.limits_of(resource_quota(hard))
    assert got == limits, what
    assert len(found) == problems, found
    for problem in found:
        assert "spec.hard['limits.nvidia.com/" in problem  # names the field and the value


@pytest.mark.parametrize("obj", [{}, {"spec": None}, {"spec": {"hard": "x"}}, {"spec": []}])
def test_a_resource_quota_without_a_hard_map_sets_no_limit(obj: dict[str, Any]) -> None:
    assert quotas.limits_of(obj) == (quotas.Limits(), [])


def test_several_resource_quotas_in_a_namespace_bind_by_their_tightest_limit() -> None:
    got = quotas.tightest(
        [
            quotas.Limits(memory_mib=8000),
            quotas.Limits(memory_mib=6000, cores_percent=300),
            quotas.Limits(cores_percent=100),
            quotas.Limits(),
        ]
    )
    assert got == quotas.Limits(memory_mib=6000, cores_percent=100)
    assert quotas.tightest([]) == quotas.Limits()


def test_a_pod_is_charged_memory_and_cores_per_device_times_devices() -> None:
    two_gpus = [sl("p", "g0", 4000, 30), sl("p", "g1", 4000, 30)]
    assert quotas.charge_of("p", two_gpus) == charge("p", 8000, 60)


def test_a_dcu_slice_is_charged_to_no_nvidia_quota() -> None:
    gpu = sl("p", "g0", 4000, 30)
    dcu = msgspec.structs.replace(sl("p", "d1", 9000, 50), vendor="DCU")
    assert quotas.charge_of("p", [gpu, dcu]) == charge("p", 4000, 30)
    assert quotas.charge_of("p", [dcu]) == charge("p", 0, 0)


def test_init_containers_are_charged_by_their_peak_as_the_pod_books_them() -> None:
    # init 6000/50 then app 2000/20 + 1000/10 on one device: the pod books 6000 MiB, 50 %
    slices = [
        sl("p", "g0", 6000, 50, init=True, container=0),
        sl("p", "g0", 2000, 20, container=1),
        sl("p", "g0", 1000, 10, container=2),
    ]
    assert quotas.charge_of("p", slices) == charge("p", 6000, 50)


FIT_TABLE = [
    # HAMi TestFitQuota: used 1000/2000 MiB and 200/400 %
    ("within both limits", (2000, 400), (1000, 200), (500, 100), None),
    ("memory above its limit", (2000, 400), (1000, 200), (1500, 100), "nvidia.com/gpumem"),
    ("cores above their limit", (2000, 400), (1000, 200), (500, 300), "nvidia.com/gpucores"),
    ("exactly at the limit fits", (2000, 400), (1000, 200), (1000, 200), None),
    ("one MiB past the limit", (2000, 400), (1000, 200), (1001, 0), "nvidia.com/gpumem"),
    # HAMi TestFitQuotaExplicitZeroBlocks
    ("an explicit zero refuses any memory", (0, None), (0, 0), (1, 0), "nvidia.com/gpumem"),
    ("an unset limit is no limit", (None, None), (10**6, 10**6), (10**6, 10**6), None),
    ("cores unlimited, memory limited", (8000, None), (4000, 900), (4000, 900), None),
]


@pytest.mark.parametrize(("what", "limits", "used", "asked", "refused_on"), FIT_TABLE)
def test_a_charge_fits_when_usage_plus_the_charge_stays_within_every_set_limit(
    what: str,
    limits: tuple[int | None, int | None],
    used: tuple[int, int],
    asked: tuple[int, int],
    refused_on: str | None,
) -> None:
    quota = schema.NamespaceQuota(
        namespace="team-a",
        memory_mib=limits[0],
        cores_percent=limits[1],
        charges=(charge("other", *used),),
    )
    why = quotas.refusal(quota, charge("new", *asked))
    if refused_on is None:
        assert why is None, what
    else:
        assert why is not None, what
        assert why.startswith("ResourceQuotaNotFit: namespace team-a asks"), why
        assert refused_on in why, why


def test_the_refusal_names_what_is_asked_used_and_the_limit() -> None:
    quota = schema.NamespaceQuota(
        namespace="team-a", memory_mib=8000, charges=(charge("a", 4000), charge("b", 4000))
    )
    assert quotas.refusal(quota, charge("c", 4000)) == (
        "ResourceQuotaNotFit: namespace team-a asks 4000 MiB of nvidia.com/gpumem with 8000 MiB"
        " in use of its quota 8000 MiB (ResourceQuota limits.nvidia.com/gpumem)"
    )


def test_a_pod_charged_again_does_not_count_its_own_earlier_charge() -> None:
    quota = schema.NamespaceQuota(namespace="team-a", memory_mib=8000, charges=(charge("a", 8000),))
    assert quotas.refusal(quota, charge("a", 8000)) is None
    assert quotas.refusal(quota, charge("b", 1)) is not None
    again = quotas.charged(quota, charge("a", 6000))
    assert again.charges == (charge("a", 6000),)
    assert again.used() == (6000, 0)


def test_charging_and_uncharging_keep_one_charge_per_pod() -> None:
    quota = schema.NamespaceQuota(namespace="team-a", memory_mib=8000)
    quota = quotas.charged(quota, charge("a", 4000, 30))
    quota = quotas.charged(quota, charge("b", 2000, 10))
    assert quota.used() == (6000, 40)
    dropped = quotas.uncharged(quota, "a")
    assert dropped is not None and dropped.used() == (2000, 10)
    assert quotas.uncharged(dropped, "a") is None  # nothing to drop


def test_a_namespace_full_of_charges_refuses_one_more_with_a_clear_error() -> None:
    full = schema.NamespaceQuota(
        namespace="team-a", charges=tuple(charge(f"p{i}", 1) for i in range(schema.MAX_CHARGES))
    )
    with pytest.raises(ValueError, match="team-a: 10000 pods charged"):
        quotas.charged(full, charge("one-more", 1))
    assert len(quotas.charged(full, charge("p0", 2)).charges) == schema.MAX_CHARGES


def test_a_namespace_given_its_first_quota_is_charged_for_the_pods_the_ledger_holds() -> None:
    placed = {"a": charge("a", 4000), "b": charge("b", 2000)}
    new = quotas.limited(None, "team-a", quotas.Limits(memory_mib=8000), placed)
    assert new is not None
    assert (new.memory_mib, new.cores_percent, new.used()) == (8000, None, (6000, 0))
    # the same limits again change nothing; new limits keep the charges
    assert quotas.limited(new, "team-a", quotas.Limits(memory_mib=8000), placed) is None
    lowered = quotas.limited(new, "team-a", quotas.Limits(memory_mib=4000), placed)
    assert lowered is not None and lowered.used() == (6000, 0) and lowered.memory_mib == 4000


def test_reconciling_drops_charges_of_pods_in_no_ledger_and_no_claim_and_adds_missing() -> None:
    quota = schema.NamespaceQuota(
        namespace="team-a",
        memory_mib=8000,
        charges=(charge("placed", 4000), charge("inflight", 2000), charge("dead", 2000)),
    )
    placed = {"placed": charge("placed", 3000), "adopted": charge("adopted", 1000)}
    new = quotas.reconciled(quota, placed=placed, claimed={"inflight"})
    assert new is not None
    assert set(new.charges) == {
        charge("placed", 3000),
        charge("inflight", 2000),
        charge("adopted", 1000),
    }
    assert quotas.reconciled(new, placed=placed, claimed={"inflight"}) is None


def test_placed_charges_group_the_ledger_by_namespace_and_pod() -> None:
    ledgers = [
        NodeLedger(
            node="n1",
            slices=(
                sl("a", "g0", 4000, 30),
                sl("a", "g1", 4000, 30),
                sl("x", "g0", 1000, 10, namespace="other"),
            ),
            charges=(PodCharge(pod_uid="a", cpu_milli=1000),),
        ),
        NodeLedger(node="n2", slices=(sl("b", "g0", 2000, 0),)),
    ]
    assert quotas.placed_charges(ledgers) == {
        "team-a": {"a": charge("a", 8000, 60), "b": charge("b", 2000, 0)},
        "other": {"x": charge("x", 1000, 10)},
    }


def test_a_placement_is_charged_its_slices() -> None:
    placement = Placement(
        pod_uid="p",
        namespace="team-a",
        pod="p",
        node="n1",
        slices=(sl("p", "g0", 4000, 25),),
        charge=PodCharge(pod_uid="p"),
    )
    assert quotas.placement_charge(placement) == charge("p", 4000, 25)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"namespace": "a", "memory_mib": -1}, "memory_mib"),
        ({"namespace": "a", "charges": [{"pod_uid": "p", "memory_mib": -5}]}, "memory_mib"),
        ({"namespace": "a", "charges": [{"pod_uid": "", "memory_mib": 5}]}, "pod_uid"),
    ],
)
def test_a_bad_quota_value_is_refused_naming_its_field(value: dict[str, Any], field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        schema.DECODER.decode(msgspec.json.encode(value))
