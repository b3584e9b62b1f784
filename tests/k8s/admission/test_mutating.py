"""The webhook's decision, table by table: every mutation (the patch applied with
``jsonpatch`` gives exactly the expected pod), every denial (the message names the
container, field and value), every skip, and every malformed review."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import msgspec
import pytest

from libshared.resources import ResourceSettings, parse_pod
from services.admission.core import mutating
from tests.k8s.admission.reviews import ctr, patched, pod, review

GPU, MEM, PCT, CORES, PRIO = (
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
    "nvidia.com/priority",
)
VS = "vslice-scheduler"
DEFAULTS = mutating.MutationSettings()


def env(**pairs: str) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


# (case, settings, pod given to the webhook, the pod the API server stores afterwards)
MUTATIONS: list[tuple[str, mutating.MutationSettings, dict[str, Any], dict[str, Any]]] = [
    (
        "a HAMi pod only gets the scheduler name, also over default-scheduler",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30})),
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), scheduler=VS),
    ),
    (
        "a pod without schedulerName gets one added",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), scheduler=None),
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), scheduler=VS),
    ),
    (
        "memory only gets defaultGPUNum GPUs",
        DEFAULTS,
        pod(ctr(limits={MEM: "3000"})),
        pod(ctr(limits={MEM: "3000", GPU: "1"}), scheduler=VS),
    ),
    (
        "cores only gets defaultGPUNum GPUs",
        DEFAULTS,
        pod(ctr(limits={CORES: 30})),
        pod(ctr(limits={CORES: 30, GPU: "1"}), scheduler=VS),
    ),
    (
        "a configured defaultGPUNum is what memory percentage only gets",
        mutating.MutationSettings(resources=ResourceSettings(default_gpu_num=2)),
        pod(ctr(limits={PCT: 50})),
        pod(ctr(limits={PCT: 50, GPU: "2"}), scheduler=VS),
    ),
    (
        # HAMi's defaultExclusiveCoreIfNeeded writes the cores only
        "a GPU-only container is exclusive: 100 cores written out",
        DEFAULTS,
        pod(ctr(limits={GPU: 2})),
        pod(ctr(limits={GPU: 2, CORES: "100"}), scheduler=VS),
    ),
    (
        # HAMi writes only the cores; the scheduler then gives defaultMemory
        # (TestMutateAdmissionDefaultsExclusiveCore, TestGenerateResourceRequests_DefaultMemory)
        "an exclusive container gets 100 cores and no memory under a configured defaultMemory",
        mutating.MutationSettings(resources=ResourceSettings(default_memory_mib=4000)),
        pod(ctr(limits={GPU: 1})),
        pod(ctr(limits={GPU: 1, CORES: "100"}), scheduler=VS),
    ),
    (
        "defaultCores 100 makes a memory slice exclusive: 100 cores written",
        mutating.MutationSettings(resources=ResourceSettings(default_cores_percent=100)),
        pod(ctr(limits={GPU: 1, MEM: 4000})),
        pod(ctr(limits={GPU: 1, MEM: 4000, CORES: "100"}), scheduler=VS),
    ),
    (
        "requests naming GPU resources get the added ones too (request equals limit)",
        DEFAULTS,
        pod(ctr(limits={MEM: 3000}, requests={MEM: 3000, "cpu": "1"})),
        pod(
            ctr(limits={MEM: 3000, GPU: "1"}, requests={MEM: 3000, "cpu": "1", GPU: "1"}),
            scheduler=VS,
        ),
    ),
    (
        "a GPU-only request without limits gets one limits object holding all it adds",
        DEFAULTS,
        pod(ctr(requests={GPU: 1})),
        pod(ctr(requests={GPU: 1, CORES: "100"}, limits={CORES: "100"}), scheduler=VS),
    ),
    (
        # HAMi's Fit clamps cores over 100 to 100 and reads a percentage of 0 as unset
        # (TestDevices_Fit "core limit can't exceed 100", TestGenerateResourceRequests)
        "cores over 100 and a percentage of 0 are accepted as HAMi accepts them",
        DEFAULTS,
        pod(ctr("a", limits={GPU: 1, CORES: 150}), ctr("b", limits={GPU: 1, PCT: 0})),
        pod(ctr("a", limits={GPU: 1, CORES: 150}), ctr("b", limits={GPU: 1, PCT: 0}), scheduler=VS),
    ),
    (
        "priority and a core policy without an env list both land in one new list",
        mutating.MutationSettings(core_policy="disable"),
        pod(ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 1})),
        pod(
            ctr(
                limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 1},
                env=env(CUDA_TASK_PRIORITY="1", GPU_CORE_UTILIZATION_POLICY="disable"),
            ),
            scheduler=VS,
        ),
    ),
    (
        "requests of CPU only stay as they are",
        DEFAULTS,
        pod(ctr(limits={CORES: 20}, requests={"cpu": "2"})),
        pod(ctr(limits={CORES: 20, GPU: "1"}, requests={"cpu": "2"}), scheduler=VS),
    ),
    (
        "priority becomes CUDA_TASK_PRIORITY in a new env list",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 0})),
        pod(
            ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 0}, env=env(CUDA_TASK_PRIORITY="0")),
            scheduler=VS,
        ),
    ),
    (
        "priority is appended to an existing env list",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: "1"}, env=env(A="b"))),
        pod(
            ctr(
                limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: "1"},
                env=env(A="b", CUDA_TASK_PRIORITY="1"),
            ),
            scheduler=VS,
        ),
    ),
    (
        "a CUDA_TASK_PRIORITY the container sets itself is left alone",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 1}, env=env(CUDA_TASK_PRIORITY="0"))),
        pod(
            ctr(limits={GPU: 1, MEM: 1000, CORES: 10, PRIO: 1}, env=env(CUDA_TASK_PRIORITY="0")),
            scheduler=VS,
        ),
    ),
    (
        "a configured core policy goes to GPU containers only",
        mutating.MutationSettings(core_policy="force"),
        pod(ctr(limits={GPU: 1, MEM: 1000, CORES: 10}), ctr("sidecar", limits={"cpu": "1"})),
        pod(
            ctr(
                limits={GPU: 1, MEM: 1000, CORES: 10},
                env=env(GPU_CORE_UTILIZATION_POLICY="force"),
            ),
            ctr("sidecar", limits={"cpu": "1"}),
            scheduler=VS,
        ),
    ),
    (
        "init containers are mutated at their own path",
        DEFAULTS,
        pod(ctr(), init=(ctr("warmup", limits={MEM: 2000, CORES: 10}),)),
        pod(ctr(), init=(ctr("warmup", limits={MEM: 2000, CORES: 10, GPU: "1"}),), scheduler=VS),
    ),
    (
        "each container of several is patched at its own index",
        DEFAULTS,
        pod(ctr("a", limits={MEM: 1000}), ctr("b"), ctr("c", limits={CORES: 5})),
        pod(
            ctr("a", limits={MEM: 1000, GPU: "1"}),
            ctr("b"),
            ctr("c", limits={CORES: 5, GPU: "1"}),
            scheduler=VS,
        ),
    ),
    (
        "a configured scheduler name is the one written",
        mutating.MutationSettings(scheduler_name="gpu-scheduler"),
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30})),
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), scheduler="gpu-scheduler"),
    ),
    (
        "a label hami.io/webhook with another value than ignore does not skip",
        DEFAULTS,
        pod(ctr(limits={MEM: 3000}), labels={"hami.io/webhook": "yes"}),
        pod(ctr(limits={MEM: 3000, GPU: "1"}), labels={"hami.io/webhook": "yes"}, scheduler=VS),
    ),
    (
        # HAMi's Hygon MutateAdmission: a dcunum in the limits makes the pod the scheduler's;
        # no cores or count are written for a DCU (its cores default to 100 when parsed)
        "a Hygon DCU pod only gets the scheduler name",
        DEFAULTS,
        pod(ctr(limits={"hygon.com/dcunum": 1, "hygon.com/dcumem": 2000})),
        pod(ctr(limits={"hygon.com/dcunum": 1, "hygon.com/dcumem": 2000}), scheduler=VS),
    ),
    (
        "a container asking both vendors: NVIDIA's defaults only for NVIDIA's resources",
        DEFAULTS,
        pod(ctr(limits={"hygon.com/dcunum": 1, MEM: 3000})),
        pod(ctr(limits={"hygon.com/dcunum": 1, MEM: 3000, GPU: "1"}), scheduler=VS),
    ),
]


def _respond(settings: mutating.MutationSettings, obj: dict[str, Any]) -> dict[str, Any]:
    outcome = mutating.decide(review(copy.deepcopy(obj)), settings=settings)
    # the response must survive JSON, as it does on the wire
    encoded: dict[str, Any] = json.loads(json.dumps(outcome.to_review()))
    return encoded


@pytest.mark.parametrize(
    ("case", "settings", "given", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS]
)
def test_every_mutation_gives_exactly_the_expected_pod(
    case: str, settings: mutating.MutationSettings, given: dict[str, Any], expected: dict[str, Any]
) -> None:
    answer = _respond(settings, given)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review(None)["request"]["uid"]
    assert "patch" in answer["response"], case
    assert patched(given, answer) == expected, case


@pytest.mark.parametrize(
    ("case", "settings", "given", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS]
)
def test_the_model_reads_a_mutated_pod_as_it_read_the_original(
    case: str, settings: mutating.MutationSettings, given: dict[str, Any], expected: dict[str, Any]
) -> None:
    before = parse_pod(given, settings=settings.resources)
    after = parse_pod(patched(given, _respond(settings, given)), settings=settings.resources)
    assert after.containers == before.containers, case


@pytest.mark.parametrize(
    ("case", "settings", "given", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS]
)
def test_a_mutated_pod_reviewed_again_needs_nothing_more(
    case: str, settings: mutating.MutationSettings, given: dict[str, Any], expected: dict[str, Any]
) -> None:
    # reinvocationPolicy: IfNeeded may send the webhook its own output
    again = mutating.decide(review(expected), settings=settings)
    assert again.verdict == "unchanged", case
    assert again.patch == ()
    assert "patch" not in again.to_review()["response"]


def test_the_patch_escapes_resource_names_as_json_pointers() -> None:
    outcome = mutating.decide(review(pod(ctr(limits={MEM: 10}))), settings=DEFAULTS)
    paths = [op["path"] for op in outcome.patch]
    assert "/spec/containers/0/resources/limits/nvidia.com~1gpu" in paths
    assert mutating.pointer("a/b", "c~d", 3) == "/a~1b/c~0d/3"


# (case, settings, pod, HTTP-style code, words the message must hold)
DENIALS: list[tuple[str, mutating.MutationSettings, dict[str, Any], int, tuple[str, ...]]] = [
    (
        "nodeName already set",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 3000}), node_name="gpu-node-7"),
        403,
        ("spec.nodeName", "'gpu-node-7'", VS),
    ),
    (
        "a privileged container asking a GPU",
        DEFAULTS,
        pod(ctr("cuda", limits={GPU: 1, MEM: 3000}, privileged=True)),
        403,
        ("container 'cuda'", "securityContext.privileged", "True", GPU),
    ),
    (
        "a privileged container asking memory only (its GPU is defaulted)",
        DEFAULTS,
        pod(ctr("side"), ctr("cuda", limits={MEM: 3000}, privileged=True)),
        403,
        ("container 'cuda'", "securityContext.privileged", MEM),
    ),
    (
        # HAMi's webhook denies a GPU pod with any privileged container (HAMi #2138, #2139)
        "a privileged sidecar without GPU resources in a GPU pod",
        DEFAULTS,
        pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), ctr("net", privileged=True)),
        403,
        ("container 'net'", "securityContext.privileged", "asking for a GPU"),
    ),
    (
        "a privileged init container asking a GPU",
        DEFAULTS,
        pod(ctr(), init=(ctr("prep", limits={GPU: 1}, privileged=True),)),
        403,
        ("container 'prep'", "securityContext.privileged"),
    ),
    (
        "memory percentage over 100",
        DEFAULTS,
        pod(ctr("main", limits={GPU: 1, PCT: "101"})),
        422,
        ("container 'main'", PCT, "101", "between 0 and 100"),
    ),
    (
        "a GPU count that is not a number",
        DEFAULTS,
        pod(ctr("main", limits={GPU: "two"})),
        422,
        ("container 'main'", GPU, "two", "not a number"),
    ),
    (
        "negative memory",
        DEFAULTS,
        pod(ctr("main", limits={GPU: 1, MEM: "-5"})),
        422,
        ("container 'main'", MEM, "-5", ">= 0"),
    ),
    (
        "fractional memory",
        DEFAULTS,
        pod(ctr("main", limits={GPU: 1, MEM: "1.5"})),
        422,
        ("container 'main'", MEM, "1.5", "whole number"),
    ),
    (
        "a priority that is not a number",
        DEFAULTS,
        pod(ctr("main", limits={GPU: 1, PRIO: "high"})),
        422,
        ("container 'main'", PRIO, "high"),
    ),
    (
        "an invalid value in an init container",
        DEFAULTS,
        pod(ctr(), init=(ctr("prep", limits={CORES: "-1"}),)),
        422,
        ("container 'prep'", CORES, "-1"),
    ),
    (
        "more GPUs than any node has",
        mutating.MutationSettings(resources=ResourceSettings(max_gpus_per_node=4)),
        pod(ctr("main", limits={GPU: 8})),
        422,
        ("container 'main'", GPU, "8", "4 GPUs"),
    ),
    (
        "a scheduler policy annotation outside binpack/spread",
        DEFAULTS,
        pod(ctr(limits={GPU: 1}), annotations={"hami.io/node-scheduler-policy": "random"}),
        422,
        ("hami.io/node-scheduler-policy", "random", "binpack"),
    ),
    (
        "a pod created with the scheduler's allocation annotation (HAMi #3042)",
        DEFAULTS,
        pod(
            ctr(limits={GPU: 1, MEM: 1000}),
            annotations={"hami.io/vgpu-devices-allocated": "GPU-abc,NVIDIA,1000,10:;"},
        ),
        403,
        ("hami.io/vgpu-devices-allocated", "GPU-abc,NVIDIA,1000,10:;"),
    ),
    (
        "a pod created with the scheduler's DCU allocation annotation",
        DEFAULTS,
        pod(
            ctr(limits={"hygon.com/dcunum": 1}),
            annotations={"hami.io/dcu-devices-to-allocate": "DCU-abc,DCU,1000,10:;"},
        ),
        403,
        ("hami.io/dcu-devices-to-allocate", "DCU-abc,DCU,1000,10:;"),
    ),
    (
        "a negative DCU memory",
        DEFAULTS,
        pod(ctr(limits={"hygon.com/dcunum": 1, "hygon.com/dcumem": -1})),
        422,
        ("container 'main'", "hygon.com/dcumem", "-1"),
    ),
    (
        "a pod created with a bind phase",
        DEFAULTS,
        pod(ctr(limits={GPU: 1}), annotations={"hami.io/bind-phase": "success"}),
        403,
        ("hami.io/bind-phase", "success"),
    ),
]


@pytest.mark.parametrize(
    ("case", "settings", "given", "code", "words"), DENIALS, ids=[d[0] for d in DENIALS]
)
def test_every_denial_names_the_container_field_and_value(
    case: str,
    settings: mutating.MutationSettings,
    given: dict[str, Any],
    code: int,
    words: tuple[str, ...],
) -> None:
    outcome = mutating.decide(review(given), settings=settings)
    assert outcome.verdict == "denied", case
    response = json.loads(json.dumps(outcome.to_review()))["response"]
    assert response["allowed"] is False
    assert "patch" not in response and "patchType" not in response
    assert response["status"]["code"] == code
    assert response["status"]["reason"] == ("Forbidden" if code == 403 else "Invalid")
    for word in words:
        assert word in response["status"]["message"], (case, word, response["status"])


def test_a_long_offending_value_is_quoted_shortened() -> None:
    outcome = mutating.decide(review(pod(ctr(limits={GPU: "x" * 5000}))), settings=DEFAULTS)
    assert outcome.verdict == "denied"
    assert len(outcome.message) < 400
    assert "xxx..." in outcome.message


# (case, review) that are allowed untouched, and the reason the outcome gives
SKIPS: list[tuple[str, dict[str, Any], str]] = [
    ("a pod without GPU resources", review(pod(ctr(limits={"cpu": "1"}), ctr("b"))), "no GPU"),
    # HAMi defaults nvidia.com/gpu only for gpumem/gpucores in the limits
    # (mutateContainerResource); requests alone give no GPU, so the pod is not the webhook's
    ("gpumem in the requests only", review(pod(ctr(requests={MEM: 3000}))), "no GPU requested"),
    # a DCU request without hygon.com/dcunum asks nothing (HAMi's GenerateResourceRequests)
    (
        "dcumem without dcunum",
        review(pod(ctr(limits={"hygon.com/dcumem": 3000}))),
        "no GPU requested",
    ),
    (
        "a pod labelled hami.io/webhook: ignore",
        review(pod(ctr(limits={GPU: 1}), labels={"hami.io/webhook": "ignore"})),
        "hami.io/webhook=ignore",
    ),
    (
        "a pod for another scheduler",
        review(pod(ctr(limits={GPU: 1, MEM: 1000}), scheduler="volcano")),
        "volcano",
    ),
    (
        "a pod for another scheduler, even with nodeName and bad values",
        review(pod(ctr(limits={GPU: "bad"}), scheduler="volcano", node_name="n1")),
        "another scheduler",
    ),
    (
        "a static pod's mirror, created by kubelet with nodeName set",
        review(
            pod(
                ctr(limits={GPU: 1}),
                node_name="n1",
                annotations={"kubernetes.io/config.mirror": "0f1e"},
            )
        ),
        "mirror",
    ),
    ("an UPDATE", review(pod(ctr(limits={MEM: 1000})), operation="UPDATE"), "UPDATE"),
    (
        "an object that is not a Pod",
        review({"kind": "Deployment"}, group="apps", kind="Deployment"),
        "apps/v1/Deployment",
    ),
    (
        "a privileged pod without GPU resources",
        review(pod(ctr(privileged=True))),
        "no GPU",
    ),
    (
        "a pod without GPU resources naming another scheduler",
        review(pod(ctr(limits={"cpu": 1}), scheduler="other")),
        "no GPU",
    ),
]


@pytest.mark.parametrize(("case", "given", "reason"), SKIPS, ids=[k[0] for k in SKIPS])
def test_pods_not_vslices_are_allowed_without_a_patch(
    case: str, given: dict[str, Any], reason: str
) -> None:
    outcome = mutating.decide(given, settings=DEFAULTS)
    assert outcome.verdict == "skipped", case
    assert reason in outcome.message
    response = outcome.to_review()["response"]
    assert response == {"uid": given["request"]["uid"], "allowed": True}


def test_a_pod_already_complete_for_vslice_is_allowed_unchanged() -> None:
    given = pod(ctr(limits={GPU: 1, MEM: 3000, CORES: 30}), scheduler=VS)
    outcome = mutating.decide(review(given), settings=DEFAULTS)
    assert (outcome.verdict, outcome.patch) == ("unchanged", ())
    assert outcome.to_review()["response"] == {
        "uid": review(None)["request"]["uid"],
        "allowed": True,
    }


def test_a_decoded_dict_a_struct_and_the_json_bytes_decide_alike() -> None:
    as_dict = review(pod(ctr(limits={MEM: 3000})))
    as_bytes = json.dumps(as_dict).encode()
    as_struct = mutating.decode_review(as_bytes)
    outcomes = [mutating.decide(x, settings=DEFAULTS) for x in (as_dict, as_struct)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].verdict == "mutated"
    ops = json.loads(base64.b64decode(outcomes[0].to_review()["response"]["patch"]))
    assert {op["path"] for op in ops} == {
        "/spec/schedulerName",
        "/spec/containers/0/resources/limits/nvidia.com~1gpu",
    }


def _wrong(path: tuple[str, ...], value: object) -> dict[str, Any]:
    body = review(pod(ctr(limits={GPU: 1})))
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


_DELETE = object()

# (case, body, words the ReviewError names)
MALFORMED: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("not JSON", b"{not json", ("not JSON",)),
    ("empty", b"", ("not JSON",)),
    ("a JSON list", b"[1, 2]", ("not an AdmissionReview", "object")),
    ("a JSON string", b'"review"', ("not an AdmissionReview",)),
    (
        "apiVersion v1beta1",
        json.dumps(_wrong(("apiVersion",), "admission.k8s.io/v1beta1")).encode(),
        ("apiVersion", "v1beta1", "admission.k8s.io/v1"),
    ),
    ("no apiVersion", json.dumps(_wrong(("apiVersion",), _DELETE)).encode(), ("apiVersion",)),
    (
        "kind ConversionReview",
        json.dumps(_wrong(("kind",), "ConversionReview")).encode(),
        ("kind", "ConversionReview"),
    ),
    ("no request", json.dumps(_wrong(("request",), _DELETE)).encode(), ("request",)),
    ("no uid", json.dumps(_wrong(("request", "uid"), _DELETE)).encode(), ("uid",)),
    ("an empty uid", json.dumps(_wrong(("request", "uid"), "")).encode(), ("request.uid",)),
    (
        "a uid that is a number",
        json.dumps(_wrong(("request", "uid"), 42)).encode(),
        ("$.request.uid", "str"),
    ),
    (
        "an object that is a list",
        json.dumps(_wrong(("request", "object"), [1])).encode(),
        ("$.request.object",),
    ),
    (
        "a Pod CREATE without object",
        json.dumps(_wrong(("request", "object"), _DELETE)).encode(),
        ("request.object", "missing"),
    ),
    (
        "a kind that is a string",
        json.dumps(_wrong(("request", "kind"), "Pod")).encode(),
        ("$.request.kind",),
    ),
]


@pytest.mark.parametrize(("case", "body", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_review_raises_a_review_error_naming_what_is_wrong(
    case: str, body: bytes, words: tuple[str, ...]
) -> None:
    with pytest.raises(mutating.ReviewError) as raised:
        mutating.decide(mutating.decode_review(body), settings=DEFAULTS)
    for word in words:
        assert word in str(raised.value), (case, word, str(raised.value))


def test_a_decoded_dict_that_is_malformed_raises_the_same_error() -> None:
    with pytest.raises(mutating.ReviewError, match=r"\$\.request\.uid"):
        mutating.decide(_wrong(("request", "uid"), 7), settings=DEFAULTS)
    with pytest.raises(mutating.ReviewError, match="v1beta1"):
        mutating.decide(_wrong(("apiVersion",), "admission.k8s.io/v1beta1"), settings=DEFAULTS)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"scheduler_name": ""}, "scheduler_name"), ({"core_policy": "always"}, "'always'")],
)
def test_bad_mutation_settings_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises((ValueError, msgspec.ValidationError), match=words):
        mutating.MutationSettings(**kwargs)
