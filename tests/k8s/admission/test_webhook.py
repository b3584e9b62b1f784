"""The webhook over real HTTPS (a trustme certificate, aiohttp's client): reviews
answered, bad bodies answered 400/413 with a message, wrong methods 405, probes, a
renewed certificate picked up without a restart -- and the server still serving after
every bad request."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import trustme

from services.admission.adapters import webhook
from services.admission.core import mutating
from tests.k8s.admission.conftest import SERVICE_NAMES, Running, Tls
from tests.k8s.admission.reviews import ctr, patched, pod, review

HAMI_POD = pod(
    ctr(limits={"nvidia.com/gpu": 1, "nvidia.com/gpumem": 3000, "nvidia.com/gpucores": 30})
)


async def post(running: Running, body: bytes | Any, **kwargs: Any) -> tuple[int, Any]:
    if isinstance(body, bytes):
        body = io.BytesIO(body)  # aiohttp warns on a large raw bytes body
    async with running.session.post(
        running.url + "/mutate", data=body, headers={"Content-Type": "application/json"}, **kwargs
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_a_hami_pod_is_mutated_over_https(running: Running) -> None:
    status, answer = await post(running, json.dumps(review(HAMI_POD)).encode())
    assert status == 200
    assert answer["response"]["uid"] == review(None)["request"]["uid"]
    assert patched(HAMI_POD, answer)["spec"]["schedulerName"] == "vslice-scheduler"
    assert running.server.webhook.counters.mutated == 1


async def test_a_denial_is_a_200_review_with_allowed_false(running: Running) -> None:
    bad = pod(ctr("main", limits={"nvidia.com/gpu": 1, "nvidia.com/gpumem-percentage": 150}))
    status, answer = await post(running, json.dumps(review(bad)).encode())
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert "nvidia.com/gpumem-percentage='150'" in answer["response"]["status"]["message"]
    assert running.server.webhook.counters.denied == 1


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"<xml/>", "not JSON"),
    ("empty", b"", "not JSON"),
    ("a JSON array", b"[]", "not an AdmissionReview"),
    (
        "v1beta1",
        json.dumps(dict(review(HAMI_POD), apiVersion="admission.k8s.io/v1beta1")).encode(),
        "apiVersion='admission.k8s.io/v1beta1'",
    ),
    ("no request", b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request"),
    ("binary", bytes(range(256)), "not JSON"),
]


@pytest.mark.parametrize(("case", "body", "words"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_a_bad_body_gets_400_naming_the_problem_and_the_server_goes_on(
    running: Running, case: str, body: bytes, words: str
) -> None:
    status, answer = await post(running, body)
    assert status == 400, case
    assert words in answer["error"], answer
    assert running.server.webhook.counters.errors == 1
    status, _ = await post(running, json.dumps(review(HAMI_POD)).encode())
    assert status == 200


async def test_a_body_over_one_mib_gets_413_with_a_message(running: Running) -> None:
    big = json.dumps(review(dict(HAMI_POD, padding="x" * (1 << 20)))).encode()
    status, answer = await post(running, big)
    assert status == 413
    assert "1 MiB" in answer["error"] and str(len(big)) in answer["error"]


async def test_a_chunked_body_over_one_mib_gets_413_too(running: Running) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 32768  # 1.25 MiB, no Content-Length

    status, answer = await post(running, chunks())
    assert status == 413
    assert "1 MiB" in answer["error"]
    assert running.server.webhook.counters.errors == 1
    status, _ = await post(running, json.dumps(review(HAMI_POD)).encode())
    assert status == 200


async def test_a_body_just_under_one_mib_is_reviewed(running: Running) -> None:
    body = json.dumps(review(HAMI_POD)).encode()
    body = body[:-1] + b" " * (webhook.MAX_BODY_BYTES - len(body)) + b"}"
    assert len(body) == webhook.MAX_BODY_BYTES
    status, answer = await post(running, body)
    assert status == 200 and answer["response"]["allowed"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/mutate"), ("PUT", "/mutate"), ("DELETE", "/mutate"), ("POST", "/healthz")],
)
async def test_a_wrong_method_gets_405(running: Running, method: str, path: str) -> None:
    async with running.session.request(method, running.url + path) as resp:
        assert resp.status == 405


async def test_an_unknown_path_gets_404(running: Running) -> None:
    async with running.session.post(running.url + "/validate", data=b"{}") as resp:
        assert resp.status == 404


async def test_health_and_readiness_answer_while_serving(running: Running) -> None:
    for path in ("/healthz", "/readyz"):
        async with running.session.get(running.url + path) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")


async def test_readiness_is_503_when_not_accepting_reviews(running: Running) -> None:
    running.server.webhook.ready = False  # as between stop's first step and the close
    async with running.session.get(running.url + "/readyz") as resp:
        assert resp.status == 503
    async with running.session.get(running.url + "/healthz") as resp:
        assert resp.status == 200


async def test_a_client_that_does_not_trust_the_ca_cannot_connect(running: Running) -> None:
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=other)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(running.url + "/healthz")


async def test_plain_http_is_not_served(running: Running) -> None:
    plain = running.url.replace("https://", "http://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(plain + "/healthz") as resp:
                await resp.read()


async def test_a_renewed_certificate_is_served_without_a_restart(
    running: Running, tls: Tls
) -> None:
    renewed = trustme.CA()
    tls.issue(renewed)
    for _ in range(200):
        if running.server.reloads:
            break
        await asyncio.sleep(0.05)
    assert running.server.reloads == 1
    connector = aiohttp.TCPConnector(ssl=tls.client_context(renewed))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(running.url + "/readyz") as resp,
    ):
        assert resp.status == 200


@pytest.mark.parametrize("broken", ["key", "pair"])
async def test_a_broken_renewal_keeps_the_old_certificate(
    running: Running, tls: Tls, broken: str
) -> None:
    if broken == "key":
        tls.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    else:  # a new certificate beside the old key: the two do not match
        issued = trustme.CA().issue_cert(*SERVICE_NAMES)
        tls.cert.write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    await asyncio.sleep(0.3)  # several reload periods
    assert running.server.reloads == 0
    connector = aiohttp.TCPConnector(ssl=tls.client_context(), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(running.url + "/healthz") as resp,
    ):
        assert resp.status == 200


async def test_a_missing_certificate_fails_start_with_the_path(tmp_path: Any) -> None:
    server = webhook.Server(
        webhook=webhook.Webhook(settings=mutating.MutationSettings()),
        cert=str(tmp_path / "absent.crt"),
        key=str(tmp_path / "absent.key"),
        host="127.0.0.1",
    )
    with pytest.raises(OSError, match="No such file"):
        await server.start()
    await server.stop()  # nothing started: a no-op


async def test_after_stop_nothing_listens(tls: Tls) -> None:
    server = webhook.Server(
        webhook=webhook.Webhook(settings=mutating.MutationSettings()),
        cert=str(tls.cert),
        key=str(tls.key),
        host="127.0.0.1",
    )
    port = await server.start()
    assert server.webhook.ready
    await server.stop()
    assert not server.webhook.ready
    connector = aiohttp.TCPConnector(ssl=tls.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(f"https://127.0.0.1:{port}/healthz")
