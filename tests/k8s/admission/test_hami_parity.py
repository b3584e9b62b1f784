"""HAMi's own webhook tests (Project-HAMi/HAMi pkg/scheduler/webhook_test.go and the
NVIDIA device's MutateAdmission tests in pkg/device/nvidia/device_test.go), ported case by
case as data: each row names the HAMi test and what HAMi's ``Handle`` answers. HAMi's
``config.SchedulerName`` is vslice's ``scheduler_name``; ``ForceOverwriteDefaultScheduler``
is always on in vslice (HAMi #1162)."""

from __future__ import annotations

from typing import Any

import pytest

from libshared import events
from libshared.resources import ResourceSettings
from services.admission.core import mutating, reviewing
from tests.k8s.admission.reviews import ctr, patched, pod, review

GPU, MEM, PCT, CORES = (
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
)
SETTINGS = mutating.MutationSettings(scheduler_name="hami-scheduler")

CASES: list[tuple[str, dict[str, Any], bool, str | None]] = [
    # (case, pod, allowed, schedulerName after the patch; None = not changed)
    ("TestHandle", pod(ctr(limits={GPU: 1})), True, "hami-scheduler"),
    (
        "TestPodHasNodeName",
        pod(ctr(limits={GPU: 1}), node_name="test-node"),
        False,
        None,
    ),
    (
        "TestPodHasDifferentScheduler",
        pod(ctr(limits={GPU: 1}), scheduler="different-scheduler"),
        True,
        "different-scheduler",
    ),
    ("TestNonGPUPodAllowedAdmission", pod(ctr(limits={"cpu": "1"})), True, "default-scheduler"),
    ("TestEmptyContainersDenied", pod(), False, None),
    # not a HAMi test: webhook.go Handle's privilegedContainerName rule (HAMi #2138)
    (
        "Handle: a privileged sidecar in a GPU pod",
        pod(ctr(limits={GPU: 1}), ctr("net", privileged=True)),
        False,
        None,
    ),
    (
        "Handle: a privileged container in a pod without GPU resources",
        pod(ctr("net", privileged=True)),
        True,
        "default-scheduler",
    ),
    (
        "TestSchedulerNameEmptyNoOverwrite",
        pod(ctr(limits={GPU: 1}), scheduler=None),
        True,
        "hami-scheduler",
    ),
    (
        "Test_MutateAdmission_MemoryPercentageValidation: percentage of 0 is accepted",
        pod(ctr(limits={GPU: 1, PCT: 0})),
        True,
        "hami-scheduler",
    ),
    (
        "Test_MutateAdmission_MemoryPercentageValidation: percentage of 101 is rejected",
        pod(ctr(limits={GPU: 1, PCT: 101})),
        False,
        None,
    ),
    (
        "Test_MutateAdmission_MemoryPercentageValidation: percentage above 100 is rejected",
        pod(ctr(limits={GPU: 1, PCT: 150})),
        False,
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "given", "allowed", "scheduler"), CASES, ids=[c[0] for c in CASES]
)
def test_the_webhook_allows_denies_and_names_the_scheduler_as_hamis_handle(
    case: str, given: dict[str, Any], allowed: bool, scheduler: str | None
) -> None:
    outcome = mutating.decide(review(given), settings=SETTINGS)
    assert outcome.allowed == allowed, outcome.message
    if allowed:
        after = patched(given, outcome.to_review())
        assert after["spec"].get("schedulerName") == scheduler


def test_a_pod_without_containers_is_denied_with_hamis_words() -> None:
    """TestEmptyContainersDenied: "pod has no containers"."""
    outcome = mutating.decide(review(pod()), settings=SETTINGS)
    assert outcome.verdict == "denied"
    assert "pod has no containers" in outcome.message


EXCLUSIVE: list[tuple[str, dict[str, Any], dict[str, Any], str | None]] = [
    # TestMutateAdmissionDefaultsExclusiveCore: (case, limits, requests, gpucores limit after)
    ("exclusive via percentage", {GPU: "1", PCT: "100"}, {}, "100"),
    ("non-exclusive percentage", {GPU: "1", PCT: "50"}, {}, None),
    ("no memory fields defaults to exclusive", {GPU: "1"}, {}, "100"),
    ("explicit cores remains unchanged", {GPU: "1", CORES: "70"}, {}, "70"),
    ("memory size present treated as shareable", {GPU: "1", MEM: "8192"}, {}, None),
]


@pytest.mark.parametrize(
    ("case", "limits", "requests", "cores"), EXCLUSIVE, ids=[c[0] for c in EXCLUSIVE]
)
def test_the_webhook_writes_100_cores_where_hamis_mutate_admission_does(
    case: str, limits: dict[str, Any], requests: dict[str, Any], cores: str | None
) -> None:
    given = pod(ctr(limits=limits, requests=requests or None))
    after = patched(given, mutating.decide(review(given), settings=SETTINGS).to_review())
    assert after["spec"]["containers"][0]["resources"]["limits"].get(CORES) == cores


def test_the_bus_admission_denies_a_pod_without_containers_too() -> None:
    """The same rule over the bus (local mode): HAMi's "pod has no containers"."""
    answer = reviewing.review(
        {"metadata": {"uid": "u"}, "spec": {"containers": []}}, settings=ResourceSettings()
    )
    assert isinstance(answer, events.Denial)
    assert (answer.field, answer.reason) == ("spec.containers", "pod has no containers")
